//! The ipcache as the proxy looks it up on every connection and request: longest-prefix match
//! by one hash lookup per distinct prefix length (at most 33 for IPv4, 129 for IPv6), whatever
//! the number of CIDRs, instead of a scan of the whole list. Same answer as
//! `redirector_policy::identity_in` (which the kernel's snapshot keeps for policy-api).

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;
use redirector_policy::identity;

#[derive(Default)]
pub struct IpcacheIndex {
    /// (prefix length, network address -> identity), longest prefix first.
    v4: Vec<(u8, HashMap<u32, u32>)>,
    v6: Vec<(u8, HashMap<u128, u32>)>,
}

fn mask4(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    }
}

fn mask6(len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len))
    }
}

impl IpcacheIndex {
    /// From the published list; a CIDR listed twice keeps its last identity (as the scan did).
    pub fn new(entries: &[(IpNet, u32)]) -> Self {
        let mut v4: HashMap<u8, HashMap<u32, u32>> = HashMap::new();
        let mut v6: HashMap<u8, HashMap<u128, u32>> = HashMap::new();
        for (net, id) in entries {
            match net {
                IpNet::V4(n) => {
                    let len = n.prefix_len();
                    v4.entry(len).or_default().insert(u32::from(n.addr()) & mask4(len), *id);
                }
                IpNet::V6(n) => {
                    let len = n.prefix_len();
                    v6.entry(len).or_default().insert(u128::from(n.addr()) & mask6(len), *id);
                }
            }
        }
        let mut v4: Vec<_> = v4.into_iter().collect();
        let mut v6: Vec<_> = v6.into_iter().collect();
        v4.sort_unstable_by_key(|e| std::cmp::Reverse(e.0));
        v6.sort_unstable_by_key(|e| std::cmp::Reverse(e.0));
        IpcacheIndex { v4, v6 }
    }

    /// The identity the kernel gives `ip` before its local-listener step: the longest prefix
    /// holding it, else `host` for loopback and `world` for the rest.
    pub fn identity_of(&self, ip: IpAddr) -> u32 {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
            v4 => v4,
        };
        let found = match ip {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                self.v4.iter().find_map(|(len, nets)| nets.get(&(a & mask4(*len))).copied())
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                self.v6.iter().find_map(|(len, nets)| nets.get(&(a & mask6(*len))).copied())
            }
        };
        found.unwrap_or(if ip.is_loopback() { identity::HOST } else { identity::WORLD })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Same answers as the kernel snapshot's scan, on overlapping CIDRs of every length, both
    /// families, IPv4-mapped addresses, duplicates and host bits set in a CIDR.
    #[test]
    fn longest_prefix_match_agrees_with_the_scan() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut entries: Vec<(IpNet, u32)> = Vec::new();
        for i in 0..3000u32 {
            let r = next();
            let net: IpNet = if r % 4 == 0 {
                let a = std::net::Ipv6Addr::from((u128::from(next()) << 64) | u128::from(next() % 4));
                IpNet::new(a.into(), (next() % 129) as u8).unwrap()
            } else {
                // Few distinct first octets, so that the CIDRs overlap.
                let a = std::net::Ipv4Addr::from(((10 + (r % 3) as u32) << 24) | (next() as u32 & 0x00ff_ffff));
                IpNet::new(a.into(), (next() % 33) as u8).unwrap()
            };
            entries.push((net, 1000 + i));
        }
        entries.push(("10.0.0.0/8".parse().unwrap(), 7));
        entries.push(("10.0.0.0/8".parse().unwrap(), 8));
        entries.push(("10.9.9.9/16".parse().unwrap(), 9));
        let index = IpcacheIndex::new(&entries);
        let mut probes: Vec<IpAddr> = vec![
            "10.9.1.1".parse().unwrap(),
            "::ffff:10.9.1.1".parse().unwrap(),
            "127.0.0.1".parse().unwrap(),
            "::1".parse().unwrap(),
            "8.8.8.8".parse().unwrap(),
        ];
        for _ in 0..20_000 {
            let r = next();
            probes.push(if r % 5 == 0 {
                std::net::Ipv6Addr::from((u128::from(next()) << 64) | u128::from(next() % 4)).into()
            } else {
                std::net::Ipv4Addr::from(((10 + (r % 4) as u32) << 24) | (next() as u32 & 0x00ff_ffff)).into()
            });
        }
        let mut matched = 0;
        for ip in probes {
            let want = redirector_policy::identity_in(&entries, ip);
            assert_eq!(index.identity_of(ip), want, "{ip}");
            matched += usize::from(want >= 1000 || (7..=9).contains(&want));
        }
        assert!(matched > 10_000, "the probes mostly hit CIDRs: {matched}");
        assert_eq!(IpcacheIndex::default().identity_of("127.0.0.1".parse().unwrap()), identity::HOST);
        assert_eq!(IpcacheIndex::default().identity_of("1.1.1.1".parse().unwrap()), identity::WORLD);
    }
}

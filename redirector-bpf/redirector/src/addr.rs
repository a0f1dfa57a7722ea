//! Conversions between std addresses and the 16-byte network-order words the kernel uses.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An address as the maps store it: IPv6, or IPv4 as IPv4-mapped IPv6.
pub fn to_words(ip: IpAddr) -> [u32; 4] {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let o = v6.octets();
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}

/// The inverse of [`to_words`]: IPv4-mapped addresses come back as IPv4.
pub fn from_words(words: [u32; 4]) -> IpAddr {
    let mut o = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(o);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// The wildcard address of either family, as the listener map stores it.
pub fn is_unspecified(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4 == Ipv4Addr::UNSPECIFIED,
        IpAddr::V6(v6) => v6 == Ipv6Addr::UNSPECIFIED,
    }
}

/// Prefix length of `net` within the 128-bit mapped address space.
pub fn mapped_prefix_len(net: &ipnet::IpNet) -> u32 {
    match net {
        ipnet::IpNet::V4(n) => 96 + u32::from(n.prefix_len()),
        ipnet::IpNet::V6(n) => u32::from(n.prefix_len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_both_families() {
        for ip in ["127.0.0.1", "10.1.2.3", "::1", "fd00::6", "::ffff:1.2.3.4"] {
            let ip: IpAddr = ip.parse().unwrap();
            let back = from_words(to_words(ip));
            match ip {
                IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => {
                    assert_eq!(back, IpAddr::V4(v6.to_ipv4_mapped().unwrap()))
                }
                _ => assert_eq!(back, ip),
            }
        }
    }

    #[test]
    fn v4_words_match_the_kernel_layout() {
        let words = to_words("127.0.0.1".parse().unwrap());
        assert_eq!(words, redirector_common::v4_mapped(u32::from_ne_bytes([127, 0, 0, 1])));
    }
}

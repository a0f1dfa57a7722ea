//! Seeding the listener map from sockets that existed before the programs were attached:
//! walk the workload cgroups, their processes' socket inodes, and the bound entries of
//! `/proc/<pid>/net/{tcp,tcp6,udp,udp6}` in each process's network namespace.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use crate::{cgroup_id, sys, Listener, Protocol, Result};

/// What seeding found.
#[derive(Clone, Debug, Default)]
pub struct SeedReport {
    pub listeners: Vec<Listener>,
    /// Processes that went away or could not be read while scanning (not an error).
    pub skipped_pids: usize,
}

/// TCP_LISTEN in /proc/net/tcp; UDP sockets are listed in state 07 (TCP_CLOSE) once bound.
const TCP_LISTEN: &str = "0A";
const UDP_BOUND: &str = "07";

pub(crate) fn scan(workload_root: &Path) -> Result<SeedReport> {
    let mut report = SeedReport::default();
    let mut netns_cookies: HashMap<u64, u64> = HashMap::new();
    let mut seen: HashSet<(u64, SocketAddr, u8)> = HashSet::new();
    for cgroup in cgroup_tree(workload_root) {
        let cgroup_id = cgroup_id(&cgroup)?;
        let procs = fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
            match scan_pid(pid, cgroup_id, &mut netns_cookies) {
                Some(found) => {
                    for l in found {
                        if seen.insert((l.netns_cookie, l.addr, l.protocol.as_raw())) {
                            report.listeners.push(l);
                        }
                    }
                }
                None => report.skipped_pids += 1,
            }
        }
    }
    Ok(report)
}

fn cgroup_tree(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![root.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        if let Ok(entries) = fs::read_dir(&out[i]) {
            for e in entries.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    out.push(e.path());
                }
            }
        }
        i += 1;
    }
    out
}

fn scan_pid(pid: u32, cgroup_id: u64, cookies: &mut HashMap<u64, u64>) -> Option<Vec<Listener>> {
    use std::os::unix::fs::MetadataExt as _;
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let mut inodes = HashSet::new();
    for fd in fs::read_dir(proc_dir.join("fd")).ok()?.flatten() {
        if let Ok(target) = fs::read_link(fd.path()) {
            let t = target.to_string_lossy();
            if let Some(inode) = t.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
                if let Ok(inode) = inode.parse::<u64>() {
                    inodes.insert(inode);
                }
            }
        }
    }
    if inodes.is_empty() {
        return Some(Vec::new());
    }
    let ns_path = proc_dir.join("ns/net");
    let ns_inode = fs::metadata(&ns_path).ok()?.ino();
    let netns_cookie = match cookies.get(&ns_inode) {
        Some(c) => *c,
        None => {
            let c = sys::netns_cookie_of(&ns_path).ok()?;
            cookies.insert(ns_inode, c);
            c
        }
    };
    let mut out = Vec::new();
    for (file, protocol, state, v6) in [
        ("tcp", Protocol::Tcp, TCP_LISTEN, false),
        ("tcp6", Protocol::Tcp, TCP_LISTEN, true),
        ("udp", Protocol::Udp, UDP_BOUND, false),
        ("udp6", Protocol::Udp, UDP_BOUND, true),
    ] {
        let Ok(table) = fs::read_to_string(proc_dir.join("net").join(file)) else {
            continue;
        };
        for (addr, st, inode) in parse_table(&table, v6) {
            if st == state && inodes.contains(&inode) && addr.port() != 0 {
                out.push(Listener { netns_cookie, addr, protocol, cgroup_id });
            }
        }
    }
    Some(out)
}

/// (local address, state, inode) of each row of a /proc/net/{tcp,udp}{,6} table.
fn parse_table(table: &str, v6: bool) -> Vec<(SocketAddr, String, u64)> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let (addr_hex, port_hex) = cols.get(1)?.split_once(':')?;
            let port = u16::from_str_radix(port_hex, 16).ok()?;
            let ip = parse_hex_addr(addr_hex, v6)?;
            let inode = cols.get(9)?.parse().ok()?;
            Some((SocketAddr::new(ip, port), cols.get(3)?.to_string(), inode))
        })
        .collect()
}

/// /proc/net prints addresses as native-endian 32-bit words in hex.
fn parse_hex_addr(hex: &str, v6: bool) -> Option<IpAddr> {
    let word = |i: usize| u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok().map(|w| w.to_ne_bytes());
    if v6 {
        let mut o = [0u8; 16];
        for i in 0..4 {
            o[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
        }
        Some(IpAddr::V6(Ipv6Addr::from(o)))
    } else {
        Some(IpAddr::V4(Ipv4Addr::from(word(0)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_rows() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0\n";
        let rows = parse_table(tcp, false);
        assert_eq!(rows, vec![("127.0.0.1:8080".parse().unwrap(), "0A".to_string(), 12345)]);
        let tcp6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 777 1 0000000000000000 100 0 0 10 0\n";
        let rows = parse_table(tcp6, true);
        assert_eq!(rows, vec![("[::1]:8080".parse().unwrap(), "0A".to_string(), 777)]);
    }
}

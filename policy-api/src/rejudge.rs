//! Re-judging established connections after a policy change. Each connection of the node's
//! workloads is judged under the version in force before the change and under the new one, as
//! the kernel and the proxy would judge it when it starts: denied, passed directly, or carried
//! by the proxy on a given stack with given TLS settings. It is closed when the new version
//! denies it, or carries it differently from how it is carried now (an unredirected connection
//! newly marked for the proxy; a proxied one whose TLS handling or stack changed, or that is
//! no longer marked); a connection whose handling did not change is never touched.
//!
//! The proxy's upstream legs (l7proxy's own sockets, and the workload ends of them) are not
//! judged by their addresses (they come from the client's own address, the node's, or the
//! proxy's dedicated source: told apart by the proxy's socket with the same 4-tuple): they are
//! the connections they carry, which are judged by their downstream side.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use redirector_policy::{Connection, Decision, Direction, Protocol, ProtocolHint};
use serde::Serialize;
use tracing::warn;

use l7mesh_api::tables::TlsContext;
use l7policy::compile::{Compiled, Peers, L7};

/// How one policy version handles a connection when it starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Handling {
    /// An enforced deny (kernel: EPERM / refused).
    Deny,
    /// Passed by the kernel (allowed, or denied by an audit-mode policy).
    Direct,
    /// Redirected to the proxy, which picks its stack and TLS path from this.
    Proxy(Route),
}

/// What decides how the proxy carries a redirected connection from its first byte: the
/// kernel's protocol hint per party and the TLS settings and L7 kinds of the proxy's rules for
/// that port and peer. (Request rules are not here: the proxy judges every request with the
/// tables in force, so changing them needs no reconnect.)
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// The redirect's hint from the source's egress and the destination's ingress.
    pub hints: [Option<ProtocolHint>; 2],
    /// Per party, each distinct TLS setting of the port's rules for this peer.
    pub tls: Vec<TlsKey>,
    /// Per party, the kinds of L7 rules for this peer (`http`, `kafka`, `grpc`, `tls`).
    pub kinds: BTreeSet<(u8, &'static str)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsKey {
    pub party: u8,
    pub terminating: Option<TlsContext>,
    pub originating: Option<TlsContext>,
    /// The SNI is judged once, on the ClientHello: a changed list needs a new handshake.
    pub server_names: Vec<String>,
}

/// How a connection is carried now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Carried {
    Direct,
    Proxy,
}

/// Why a connection is closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseReason {
    /// The new version denies it.
    Denied,
    /// Not through the proxy, and the new version marks it for the proxy (or changed the
    /// proxy handling a fail-open connection was owed).
    NowProxied,
    /// Through the proxy, and the new version carries it differently (another TLS handling or
    /// stack, or no longer through the proxy).
    Rerouted,
}

/// The connection's fate: `None` keeps it.
pub fn close_reason(carried: Carried, old: Option<&Handling>, new: &Handling) -> Option<CloseReason> {
    // Denied is closed whatever it was before: nothing denied outlives an apply.
    if *new == Handling::Deny {
        return Some(CloseReason::Denied);
    }
    if old == Some(new) {
        return None;
    }
    match (carried, new, old) {
        (Carried::Direct, Handling::Direct, _) => None,
        (Carried::Direct, Handling::Proxy(_), _) => Some(CloseReason::NowProxied),
        (Carried::Proxy, Handling::Direct, _) => Some(CloseReason::Rerouted),
        (Carried::Proxy, Handling::Proxy(_), Some(Handling::Proxy(_))) => Some(CloseReason::Rerouted),
        // Proxied, and proxied now, but not under the version before (or that version is not
        // known, as after a policy-api restart): how it was carried cannot differ from a change
        // this version made.
        (Carried::Proxy, Handling::Proxy(_), _) => None,
        (_, Handling::Deny, _) => Some(CloseReason::Denied),
    }
}

/// One connection as both versions judge it: from a workload (`src`, by cgroup) or from the
/// address `src_ip`, to `dst` (the original destination), served by workload `dst_cgroup`
/// when a workload listens there.
#[derive(Clone, Debug)]
pub struct Flow {
    pub src: Option<u64>,
    pub src_ip: IpAddr,
    pub dst: SocketAddr,
    pub dst_cgroup: Option<u64>,
}

/// `flow` under `compiled`, as the kernel's fold and the proxy's stack choice would take it;
/// `None` when that version does not know the workloads it names.
pub fn handling(compiled: &Compiled, flow: &Flow) -> Option<Handling> {
    let snap = &compiled.snapshot;
    let src = match flow.src {
        Some(c) => Some(compiled.endpoint_by_cgroup(c)?),
        None => None,
    };
    let mut dst_identity = snap.identity_of(flow.dst.ip());
    let mut dst = None;
    // As the kernel does: a `host` destination with a workload listening is that workload.
    if dst_identity == redirector_policy::identity::HOST || flow.src.is_none() {
        if let Some(c) = flow.dst_cgroup {
            match compiled.endpoint_by_cgroup(c) {
                Some(e) => {
                    dst_identity = e.identity;
                    dst = Some(e);
                }
                None if flow.src.is_none() => return None,
                None => {}
            }
        }
    }
    let src_identity = src.map(|e| e.identity).unwrap_or_else(|| snap.identity_of(flow.src_ip));
    let port = flow.dst.port();
    let conn = Connection { src, dst, protocol: Protocol::Tcp, src_identity, dst_identity, port };
    let judgement = snap.judge(&conn);
    let parties = [
        (0u8, src, Direction::Egress, dst_identity, judgement.egress),
        (1u8, dst, Direction::Ingress, src_identity, judgement.ingress),
    ];
    let mut route = Route { hints: [None, None], tls: Vec::new(), kinds: BTreeSet::new() };
    for (party, endpoint, direction, peer, decision) in parties {
        let (Some(endpoint), Some(decision)) = (endpoint, decision) else { continue };
        match decision {
            Decision::Redirect(hint) => {
                route.hints[party as usize] = Some(hint);
                for r in compiled.published.proxy_rules.iter().filter(|r| {
                    r.endpoint_id == endpoint.endpoint_id
                        && r.direction == direction
                        && r.ports.0 <= port
                        && port <= r.ports.1
                        && match &r.peers {
                            Peers::Any => true,
                            Peers::Identities(ids) => ids.contains(&peer),
                        }
                }) {
                    let kind = match r.l7 {
                        L7::AllowAll => None,
                        L7::Http { .. } => Some("http"),
                        L7::Kafka { .. } => Some("kafka"),
                        L7::Grpc { .. } => Some("grpc"),
                        L7::Tls => Some("tls"),
                    };
                    if let Some(kind) = kind {
                        route.kinds.insert((party, kind));
                    }
                    let mut server_names = r.server_names.clone();
                    server_names.sort();
                    let key = TlsKey {
                        party,
                        terminating: r.terminating_tls.clone(),
                        originating: r.originating_tls.clone(),
                        server_names,
                    };
                    if !route.tls.contains(&key) {
                        route.tls.push(key);
                    }
                }
            }
            Decision::Deny { .. } | Decision::Allow | Decision::Audit => {}
        }
    }
    // Order-free: the proxy's rules come in policy order, which an unrelated edit may change.
    route.tls.sort_by_key(|k| format!("{k:?}"));
    Some(match judgement.decision() {
        Decision::Deny { .. } => Handling::Deny,
        Decision::Redirect(_) => Handling::Proxy(route),
        Decision::Allow | Decision::Audit => Handling::Direct,
    })
}

/// Who owns an established socket in the node's cgroups.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Owner {
    Workload(String),
    Proxy,
}

/// One established TCP socket in the node's cgroups, as `ss` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSocket {
    pub owner: Owner,
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

/// Established TCP sockets of the node's workloads and of l7proxy, from `ss --cgroup` (iproute2
/// is always present where l7mesh runs; sock_diag through netlink would need a crate for what
/// one command already does).
pub fn node_sockets(cgroup_root: &Path) -> Vec<NodeSocket> {
    let Ok(out) = std::process::Command::new("ss").args(["-tnH", "--cgroup", "state", "established"]).output() else {
        warn!("ss not found: established connections cannot be re-checked after a policy change");
        return Vec::new();
    };
    let cgroup2 = l7mesh_api::layout::cgroup2_mount();
    let root = format!("/{}/", cgroup_root.strip_prefix(&cgroup2).unwrap_or(Path::new("")).display());
    parse_ss(&String::from_utf8_lossy(&out.stdout), &root)
}

fn parse_ss(text: &str, root: &str) -> Vec<NodeSocket> {
    text.lines()
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let cgroup = cols.iter().find_map(|c| c.strip_prefix("cgroup:"))?;
            let rest = cgroup.strip_prefix(root)?;
            let owner = if let Some(w) = rest.strip_prefix("workloads/") {
                Owner::Workload(w.split('/').next()?.to_string())
            } else if rest == "proxy" || rest.starts_with("proxy/") {
                Owner::Proxy
            } else {
                return None;
            };
            let local = parse_ss_addr(cols.get(2)?)?;
            let remote = parse_ss_addr(cols.get(3)?)?;
            Some(NodeSocket { owner, local, remote })
        })
        .collect()
}

pub fn parse_ss_addr(s: &str) -> Option<SocketAddr> {
    let (host, port) = s.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let host = host.split('%').next()?;
    let ip: IpAddr = host.parse().ok()?;
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    Some(SocketAddr::new(ip, port.parse().ok()?))
}

/// The proxy's addresses, as the kernel's config names them.
#[derive(Clone, Debug)]
pub struct ProxyView {
    pub listen: Vec<IpAddr>,
    pub egress_port: u16,
    pub ingress_port: u16,
    pub upstream_src: Vec<IpAddr>,
}

/// A connection to re-judge: how it is carried, the flow both versions judge, and the socket
/// that closes it (the workload's, or for proxied ones the proxy's downstream peer).
#[derive(Clone, Debug)]
pub struct Candidate {
    pub carried: Carried,
    pub flow: Flow,
    /// The socket to destroy in the kernel (direct connections, or proxied ones when no proxy
    /// answers).
    pub socket: NodeSocket,
    /// The downstream peer l7proxy knows a proxied connection by.
    pub proxy_peer: Option<SocketAddr>,
}

/// Sorts the node's sockets into connections to judge; the proxy's upstream legs, the proxy's
/// accepted egress sockets (judged from the workload side) and the server ends of workload-to-
/// workload connections (judged from the client end) are left out.
pub fn candidates(
    sockets: &[NodeSocket],
    cgroups: &BTreeMap<String, u64>,
    listener_owner: &dyn Fn(SocketAddr) -> Option<u64>,
    original_destination: &dyn Fn(SocketAddr) -> Option<SocketAddr>,
    proxy: &ProxyView,
) -> Vec<Candidate> {
    let proxy_locals: BTreeSet<SocketAddr> =
        sockets.iter().filter(|s| s.owner == Owner::Proxy).map(|s| s.local).collect();
    let workload_pairs: BTreeSet<(SocketAddr, SocketAddr)> =
        sockets.iter().filter(|s| matches!(s.owner, Owner::Workload(_))).map(|s| (s.local, s.remote)).collect();
    let is_proxy_listener = |a: SocketAddr| {
        proxy.listen.contains(&a.ip()) && (a.port() == proxy.egress_port || a.port() == proxy.ingress_port)
    };
    let mut out = Vec::new();
    for s in sockets {
        match &s.owner {
            Owner::Workload(name) => {
                let Some(&cgroup) = cgroups.get(name) else { continue };
                if s.remote.port() == proxy.egress_port && proxy.listen.contains(&s.remote.ip()) {
                    let Some(dst) = original_destination(s.local) else { continue };
                    out.push(Candidate {
                        carried: Carried::Proxy,
                        flow: Flow { src: Some(cgroup), src_ip: s.local.ip(), dst, dst_cgroup: listener_owner(dst) },
                        socket: s.clone(),
                        proxy_peer: Some(s.local),
                    });
                } else if listener_owner(s.local) == Some(cgroup) {
                    // The server end: the proxy's upstream legs are judged as what they carry,
                    // a local workload client from its own end. Legs are known by the proxy's
                    // socket with the same 4-tuple, never by an address: any node process may
                    // bind the proxy's old source, and its connection must be judged.
                    if proxy_locals.contains(&s.remote) || workload_pairs.contains(&(s.remote, s.local)) {
                        continue;
                    }
                    out.push(Candidate {
                        carried: Carried::Direct,
                        flow: Flow { src: None, src_ip: s.remote.ip(), dst: s.local, dst_cgroup: Some(cgroup) },
                        socket: s.clone(),
                        proxy_peer: None,
                    });
                } else {
                    out.push(Candidate {
                        carried: Carried::Direct,
                        flow: Flow {
                            src: Some(cgroup),
                            src_ip: s.local.ip(),
                            dst: s.remote,
                            dst_cgroup: listener_owner(s.remote),
                        },
                        socket: s.clone(),
                        proxy_peer: None,
                    });
                }
            }
            Owner::Proxy => {
                // sk_lookup keeps the packet's destination, so a steered connection's local
                // address is the workload's own; the proxy's upstream legs come from its
                // dedicated source (or connect to a listener).
                if is_proxy_listener(s.local)
                    || proxy.upstream_src.contains(&s.local.ip())
                    || listener_owner(s.remote).is_some()
                {
                    continue;
                }
                let Some(owner) = listener_owner(s.local) else { continue };
                out.push(Candidate {
                    carried: Carried::Proxy,
                    flow: Flow { src: None, src_ip: s.remote.ip(), dst: s.local, dst_cgroup: Some(owner) },
                    socket: s.clone(),
                    proxy_peer: Some(s.remote),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(hint: ProtocolHint, terminating: bool) -> Handling {
        Handling::Proxy(Route {
            hints: [Some(hint), None],
            tls: if terminating {
                vec![TlsKey {
                    party: 0,
                    terminating: Some(TlsContext::default()),
                    originating: None,
                    server_names: vec![],
                }]
            } else {
                vec![]
            },
            kinds: [(0, "http")].into_iter().collect(),
        })
    }

    #[test]
    fn what_closes() {
        let l7 = route(ProtocolHint::Http, false);
        let l7_tls = route(ProtocolHint::Http, true);
        use CloseReason::*;
        use Handling::{Deny, Direct};
        let cases = [
            // (carried, old, new, expected)
            (Carried::Direct, Some(&Direct), &l7, Some(NowProxied)),
            (Carried::Direct, None, &l7, Some(NowProxied)),
            (Carried::Direct, Some(&Direct), &Direct, None),
            (Carried::Direct, Some(&l7), &l7, None),
            (Carried::Direct, Some(&l7), &Direct, None),
            (Carried::Direct, Some(&Direct), &Deny, Some(Denied)),
            (Carried::Direct, Some(&Deny), &Deny, Some(Denied)),
            (Carried::Proxy, Some(&l7), &l7, None),
            (Carried::Proxy, Some(&l7), &l7_tls, Some(Rerouted)),
            (Carried::Proxy, Some(&l7_tls), &l7, Some(Rerouted)),
            (Carried::Proxy, Some(&l7), &Direct, Some(Rerouted)),
            (Carried::Proxy, None, &Direct, Some(Rerouted)),
            (Carried::Proxy, None, &l7, None),
            (Carried::Proxy, Some(&Direct), &l7, None),
            (Carried::Proxy, Some(&l7), &Deny, Some(Denied)),
        ];
        for (carried, old, new, expected) in cases {
            assert_eq!(close_reason(carried, old, new), expected, "{carried:?} {old:?} -> {new:?}");
        }
    }

    #[test]
    fn ss_lines_by_owner() {
        let text = "0 0 127.0.0.1:40000 127.0.0.1:8444 cgroup:/l7mesh/workloads/client\n\
                    0 0 127.0.0.1:15001 127.0.0.1:40001 cgroup:/l7mesh/proxy\n\
                    0 0 127.0.0.1:22 127.0.0.1:40002 cgroup:/system.slice/ssh.service\n\
                    0 0 [::ffff:127.0.0.1]:8080 [::ffff:127.0.0.6]:5000 cgroup:/l7mesh/workloads/server/x\n";
        let s = parse_ss(text, "/l7mesh/");
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].owner, Owner::Workload("client".into()));
        assert_eq!(s[1].owner, Owner::Proxy);
        assert_eq!(s[2].owner, Owner::Workload("server".into()));
        assert_eq!(s[2].remote, "127.0.0.6:5000".parse().unwrap());
    }

    fn sock(owner: Owner, local: &str, remote: &str) -> NodeSocket {
        NodeSocket { owner, local: local.parse().unwrap(), remote: remote.parse().unwrap() }
    }

    #[test]
    fn upstream_legs_and_local_server_ends_are_not_judged() {
        let proxy = ProxyView {
            listen: vec!["127.0.0.1".parse().unwrap()],
            egress_port: 15001,
            ingress_port: 15006,
            upstream_src: vec!["127.0.0.6".parse().unwrap()],
        };
        let w = |n: &str| Owner::Workload(n.into());
        let sockets = vec![
            // client -> proxy (egress, redirected), and the proxy's two legs of it.
            sock(w("client"), "127.0.0.1:40000", "127.0.0.1:15001"),
            sock(Owner::Proxy, "127.0.0.1:15001", "127.0.0.1:40000"),
            sock(Owner::Proxy, "127.0.0.6:50000", "127.0.0.1:8080"),
            sock(w("server"), "127.0.0.1:8080", "127.0.0.6:50000"),
            // client -> server directly: judged from the client's end only.
            sock(w("client"), "127.0.0.1:40001", "127.0.0.1:8080"),
            sock(w("server"), "127.0.0.1:8080", "127.0.0.1:40001"),
            // another host -> server, directly and steered to the proxy.
            sock(w("server"), "10.0.0.1:8080", "10.0.0.2:33000"),
            sock(Owner::Proxy, "10.0.0.1:8080", "10.0.0.2:33001"),
        ];
        let cgroups: BTreeMap<String, u64> = [("client".to_string(), 1), ("server".to_string(), 2)].into();
        let owner = |a: SocketAddr| (a.port() == 8080).then_some(2);
        let orig = |_: SocketAddr| Some("127.0.0.1:8080".parse().unwrap());
        let c = candidates(&sockets, &cgroups, &owner, &orig, &proxy);
        let got: Vec<(Carried, String, Option<String>)> =
            c.iter().map(|c| (c.carried, c.socket.local.to_string(), c.proxy_peer.map(|p| p.to_string()))).collect();
        assert_eq!(
            got,
            [
                (Carried::Proxy, "127.0.0.1:40000".into(), Some("127.0.0.1:40000".into())),
                (Carried::Direct, "127.0.0.1:40001".into(), None),
                (Carried::Direct, "10.0.0.1:8080".into(), None),
                (Carried::Proxy, "10.0.0.1:8080".into(), Some("10.0.0.2:33001".into())),
            ]
        );
    }

    #[test]
    fn upstream_legs_from_the_clients_own_address_are_judged_as_what_they_carry() {
        let proxy = ProxyView {
            listen: vec!["127.0.0.1".parse().unwrap()],
            egress_port: 15001,
            ingress_port: 15006,
            upstream_src: vec!["127.0.0.6".parse().unwrap()],
        };
        let w = |n: &str| Owner::Workload(n.into());
        let sockets = vec![
            // client -> proxy, and the proxy's leg from the client's own 127.0.0.1.
            sock(w("client"), "127.0.0.1:40000", "127.0.0.1:15001"),
            sock(Owner::Proxy, "127.0.0.1:15001", "127.0.0.1:40000"),
            sock(Owner::Proxy, "127.0.0.1:50000", "127.0.0.1:8080"),
            sock(w("server"), "127.0.0.1:8080", "127.0.0.1:50000"),
            // another host steered to the proxy; its leg from the node's own address.
            sock(Owner::Proxy, "10.0.0.1:8080", "10.0.0.2:33001"),
            sock(Owner::Proxy, "10.0.0.1:50001", "10.0.0.1:8080"),
            sock(w("server"), "10.0.0.1:8080", "10.0.0.1:50001"),
            // A node process straight to the server from the same address: judged.
            sock(w("server"), "127.0.0.1:8080", "127.0.0.1:50002"),
            // And one that bound the proxy's old source: judged too (no proxy socket is its peer).
            sock(w("server"), "127.0.0.1:8080", "127.0.0.6:50003"),
        ];
        let cgroups: BTreeMap<String, u64> = [("client".to_string(), 1), ("server".to_string(), 2)].into();
        let owner = |a: SocketAddr| (a.port() == 8080).then_some(2);
        let orig = |_: SocketAddr| Some("127.0.0.1:8080".parse().unwrap());
        let c = candidates(&sockets, &cgroups, &owner, &orig, &proxy);
        let got: Vec<(Carried, String, String)> =
            c.iter().map(|c| (c.carried, c.socket.local.to_string(), c.socket.remote.to_string())).collect();
        assert_eq!(
            got,
            [
                (Carried::Proxy, "127.0.0.1:40000".into(), "127.0.0.1:15001".into()),
                (Carried::Proxy, "10.0.0.1:8080".into(), "10.0.0.2:33001".into()),
                (Carried::Direct, "127.0.0.1:8080".into(), "127.0.0.1:50002".into()),
                (Carried::Direct, "127.0.0.1:8080".into(), "127.0.0.6:50003".into()),
            ]
        );
    }
}

//! The client's address towards the upstream (README, "The client's address upstream").
//!
//! - The upstream leg keeps the client's own IP as its source where the node can route the
//!   answer back to the proxy: the client is a process of this node (an egress connection, or
//!   an ingress one from a local address) and its address may reach the destination (a
//!   loopback address only towards loopback). The leg is still the proxy's own to the kernel:
//!   its SO_MARK makes sock_ops record it in `L7_LOCAL_DECIDED`, so sk_lookup neither judges nor
//!   steers it again (without a mark, as in the in-process tests, which run no kernel
//!   programs, the proxy's dedicated loopback source is used instead).
//! - Elsewhere (another host's address: the backend's answer would be routed to that host,
//!   not to the proxy) the kernel picks the source, and HTTP requests say who the client was in
//!   `X-Forwarded-For` and `Forwarded: for=`. Those fields are written on every request, whose
//!   client-sent copies are replaced (by default) or appended to ([`ForwardedMode`]).
//! - Opaque TCP to the ports `--proxy-protocol-ports` names starts with a PROXY protocol v2
//!   header naming the client and the original destination.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, HeaderName, HeaderValue};
use redirector::ProxyAddrs;

use crate::context::Direction;

/// What becomes of a client's own `X-Forwarded-For` and `Forwarded` fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ForwardedMode {
    /// Removed; the proxy's fields name the client alone. A workload could otherwise claim any
    /// address to a backend that trusts these fields.
    #[default]
    Replace,
    /// Kept, with the client's address appended (for clients that are proxies themselves,
    /// whose hops the backend trusts).
    Append,
}

/// How the proxy tells the upstream who the client is (l7proxy's flags).
#[derive(Clone, Debug, Default)]
pub struct ClientAddressConfig {
    pub forwarded: ForwardedMode,
    /// Original destination ports whose opaque TCP connections start with a PROXY v2 header.
    pub proxy_protocol_ports: BTreeSet<u16>,
}

/// The upstream leg's source address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UpstreamSource {
    /// The client's own IP (port chosen at connect).
    Client(IpAddr),
    /// The proxy's dedicated loopback source (127.0.0.6 / fd00:6c37::6).
    Proxy(IpAddr),
    /// Left to the kernel's routing, as for any outgoing connection of the node.
    Kernel,
}

impl UpstreamSource {
    /// The address to bind before connecting, if any.
    pub fn bind(self) -> Option<IpAddr> {
        match self {
            UpstreamSource::Client(ip) | UpstreamSource::Proxy(ip) => Some(ip),
            UpstreamSource::Kernel => None,
        }
    }

    /// Whether the upstream sees the client's own address as the connection's source.
    pub fn keeps_client(self) -> bool {
        matches!(self, UpstreamSource::Client(_))
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
pub fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// The source of the upstream leg for a client at `client` whose connection goes to `target`.
pub fn upstream_source(direction: Direction, client: IpAddr, target: SocketAddr, proxy: &ProxyAddrs) -> UpstreamSource {
    let client = unmapped(client);
    let target_ip = unmapped(target.ip());
    // A node-local client: every egress connection (it reached the proxy's loopback listener
    // from this netns), an ingress one from loopback or from the destination's own address
    // (the node connecting to itself). Another host's address would have the backend's answer
    // routed to that host: it cannot be the source.
    let local = match direction {
        Direction::Egress => true,
        Direction::Ingress => client.is_loopback() || client == target_ip,
    };
    let keep = proxy.mark != 0
        && local
        && client.is_ipv4() == target_ip.is_ipv4()
        && !client.is_unspecified()
        // A loopback address cannot leave loopback.
        && (!client.is_loopback() || target_ip.is_loopback());
    if keep {
        return UpstreamSource::Client(client);
    }
    if target_ip.is_loopback() {
        return UpstreamSource::Proxy(match target_ip {
            IpAddr::V4(_) => proxy.upstream_src4.into(),
            IpAddr::V6(_) => proxy.upstream_src6.into(),
        });
    }
    UpstreamSource::Kernel
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// What a client may claim about the hop it came by, in `-` spelling: removed in `replace`
/// mode ([`set_forwarded`] then writes the first two itself).
const HOP_CLAIMS: [&str; 10] = [
    "x-forwarded-for",
    "forwarded",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-real-ip",
    "true-client-ip",
    "x-client-ip",
    "x-original-forwarded-for",
];

/// Writes `X-Forwarded-For` and `Forwarded: for=` naming `client`, the client's own copies
/// replaced or appended to as `mode` says. After it each is one field. Spellings with `_` for
/// `-` (`X_Forwarded_For`) are removed in either mode: a backend that maps both to one
/// variable (CGI's `HTTP_X_FORWARDED_FOR`) would otherwise take the client's copy.
///
/// In `replace` mode the client's other claims about the hop (`X-Forwarded-Host`, `-Proto`,
/// `-Port`, `-Prefix`, `X-Real-IP`, `True-Client-IP`, `X-Client-IP`,
/// `X-Original-Forwarded-For`, in either spelling) are removed too: a backend that trusts the
/// proxy's hop for them would route or authorize by what a workload wrote (a `Host` the rules
/// allowed, an `X-Forwarded-Host` they never saw).
pub fn set_forwarded(headers: &mut HeaderMap, ours: &ForwardedFields, mode: ForwardedMode) {
    // (Per request, on every header: compared in place, no allocation.)
    let is = |name: &str, claim: &str| {
        name.len() == claim.len() && name.bytes().zip(claim.bytes()).all(|(a, b)| a == b || (a == b'_' && b == b'-'))
    };
    let claimed = |k: &HeaderName| match mode {
        ForwardedMode::Replace => HOP_CLAIMS.iter().any(|c| is(k.as_str(), c)),
        ForwardedMode::Append => k.as_str().contains('_') && is(k.as_str(), X_FORWARDED_FOR.as_str()),
    };
    if headers.keys().any(claimed) {
        let names: Vec<HeaderName> = headers.keys().filter(|k| claimed(k)).cloned().collect();
        for name in names {
            headers.remove(name);
        }
    }
    for (name, ours) in [(X_FORWARDED_FOR, &ours.x_forwarded_for), (http::header::FORWARDED, &ours.forwarded)] {
        // `insert` replaces every value the client sent; `replace` wants no more.
        if mode == ForwardedMode::Replace || !headers.contains_key(&name) {
            headers.insert(name, ours.clone());
            continue;
        }
        let mut value = Vec::new();
        for v in headers.get_all(&name).iter().map(HeaderValue::as_bytes) {
            let v = v.trim_ascii();
            if !v.is_empty() {
                value.extend_from_slice(v);
                value.extend_from_slice(b", ");
            }
        }
        value.extend_from_slice(ours.as_bytes());
        // Field values the client sent were valid; with ours (ASCII) they still are.
        if let Ok(v) = HeaderValue::from_bytes(&value) {
            headers.insert(name, v);
        }
    }
}

/// The `X-Forwarded-For` and `Forwarded` values naming one client, made once per downstream
/// connection (a request then only shares their bytes).
#[derive(Clone, Debug)]
pub struct ForwardedFields {
    x_forwarded_for: HeaderValue,
    forwarded: HeaderValue,
}

impl ForwardedFields {
    pub fn new(client: IpAddr) -> Self {
        let client = unmapped(client);
        // RFC 7239: an IPv6 address is bracketed and the value then quoted.
        let forwarded = match client {
            IpAddr::V4(v4) => format!("for={v4}"),
            IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
        };
        let value = |s: String| HeaderValue::from_str(&s).expect("an IP address is a valid field value");
        ForwardedFields { x_forwarded_for: value(client.to_string()), forwarded: value(forwarded) }
    }
}

/// The PROXY protocol v2 header (haproxy.org's proxy-protocol.txt, section 2.2) of a TCP
/// connection from `client` to `destination`: a fixed layout of 28 or 52 bytes, written here
/// rather than with a crate. Mixed families are written as IPv6 (IPv4-mapped).
pub fn proxy_v2_header(client: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
    // Version 2, command PROXY.
    const PROXY: u8 = 0x21;
    let (src, dst) = (unmapped(client.ip()), unmapped(destination.ip()));
    let mut out = Vec::with_capacity(52);
    out.extend_from_slice(&SIGNATURE);
    out.push(PROXY);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            // AF_INET, STREAM.
            out.push(0x11);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, d) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            // AF_INET6, STREAM.
            out.push(0x21);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
        }
    }
    out.extend_from_slice(&client.port().to_be_bytes());
    out.extend_from_slice(&destination.port().to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy() -> ProxyAddrs {
        ProxyAddrs::default()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_node_local_client_keeps_its_address_where_the_answer_comes_back() {
        use Direction::*;
        use UpstreamSource::*;
        let p = proxy();
        let cases = [
            // A workload to a local server on loopback: its own loopback address.
            (Egress, "127.0.0.1", "127.0.0.1:8080", Client(ip("127.0.0.1"))),
            (Egress, "::ffff:127.0.0.1", "127.0.0.1:8080", Client(ip("127.0.0.1"))),
            (Egress, "::1", "[::1]:8080", Client(ip("::1"))),
            (Egress, "127.0.0.9", "127.0.0.1:8080", Client(ip("127.0.0.9"))),
            // A loopback client towards another host: the kernel's source, as a direct
            // connection would have had.
            (Egress, "127.0.0.1", "10.0.0.2:80", Kernel),
            (Egress, "127.0.0.1", "10.231.1.1:8080", Kernel),
            // A client that bound the node's own address keeps it.
            (Egress, "10.231.1.1", "10.231.1.2:80", Client(ip("10.231.1.1"))),
            (Egress, "10.231.1.1", "127.0.0.1:80", Client(ip("10.231.1.1"))),
            // Families that differ cannot be one socket's.
            (Egress, "127.0.0.1", "[::1]:8080", Proxy(ip("fd00:6c37::6"))),
            // Ingress: a local client (loopback, or the node to its own address) keeps it.
            (Ingress, "127.0.0.1", "127.0.0.1:8080", Client(ip("127.0.0.1"))),
            (Ingress, "10.231.1.1", "10.231.1.1:8080", Client(ip("10.231.1.1"))),
            // Another host: its answer would go to it, not to the proxy.
            (Ingress, "10.231.1.2", "10.231.1.1:8080", Kernel),
            (Ingress, "fd00:231:1::2", "[fd00:231:1::1]:8080", Kernel),
        ];
        for (direction, client, target, expected) in cases {
            assert_eq!(
                upstream_source(direction, ip(client), sa(target), &p),
                expected,
                "{direction:?} {client} -> {target}"
            );
        }
    }

    #[test]
    fn without_a_mark_nothing_tells_the_kernel_the_leg_is_the_proxys_but_its_source() {
        let p = ProxyAddrs { mark: 0, ..proxy() };
        let s = upstream_source(Direction::Egress, ip("127.0.0.1"), sa("127.0.0.1:8080"), &p);
        assert_eq!(s, UpstreamSource::Proxy(ip("127.0.0.6")));
        assert!(!s.keeps_client());
        assert_eq!(upstream_source(Direction::Egress, ip("127.0.0.1"), sa("10.0.0.2:80"), &p), UpstreamSource::Kernel);
    }

    fn fields(h: &HeaderMap, name: &str) -> Vec<String> {
        h.get_all(name).iter().map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()).collect()
    }

    #[test]
    fn replace_drops_every_client_copy_whatever_its_case_or_number() {
        let mut h = HeaderMap::new();
        h.append("X-Forwarded-For", HeaderValue::from_static("1.2.3.4"));
        h.append("x-forwarded-for", HeaderValue::from_static("5.6.7.8, 9.9.9.9"));
        h.append("FORWARDED", HeaderValue::from_static("for=1.2.3.4;proto=https"));
        h.append("forwarded", HeaderValue::from_static("for=\"[2001:db8::1]\""));
        h.append("x_forwarded_for", HeaderValue::from_static("1.2.3.4"));
        h.append("X-Forwarded_For", HeaderValue::from_static("1.2.3.4"));
        h.append("x_request_id", HeaderValue::from_static("kept"));
        set_forwarded(&mut h, &ForwardedFields::new(ip("10.231.1.2")), ForwardedMode::Replace);
        assert_eq!(fields(&h, "x-forwarded-for"), ["10.231.1.2"]);
        assert_eq!(fields(&h, "forwarded"), ["for=10.231.1.2"]);
        assert!(h.get("x_forwarded_for").is_none() && h.get("x-forwarded_for").is_none(), "{h:?}");
        assert_eq!(fields(&h, "x_request_id"), ["kept"], "other fields with `_` pass");
        assert_eq!(h.len(), 3);
        // Nothing sent: the same.
        let mut h = HeaderMap::new();
        set_forwarded(&mut h, &ForwardedFields::new(ip("::ffff:127.0.0.1")), ForwardedMode::Replace);
        assert_eq!(fields(&h, "x-forwarded-for"), ["127.0.0.1"]);
        assert_eq!(fields(&h, "forwarded"), ["for=127.0.0.1"]);
    }

    /// A workload's other claims about the hop do not reach a backend that trusts the proxy's.
    #[test]
    fn replace_drops_the_clients_other_hop_claims() {
        let mut h = HeaderMap::new();
        for name in [
            "X-Forwarded-Host",
            "x-forwarded-proto",
            "X-Forwarded-Port",
            "x-forwarded-prefix",
            "X-Real-IP",
            "True-Client-IP",
            "x-client-ip",
            "X-Original-Forwarded-For",
            "x_forwarded_host",
            "X_Real_IP",
        ] {
            h.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_static("admin.example"));
        }
        h.append("x-forwarded-hosts", HeaderValue::from_static("kept: not a claim of the hop"));
        set_forwarded(&mut h, &ForwardedFields::new(ip("10.231.1.2")), ForwardedMode::Replace);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["forwarded", "x-forwarded-for", "x-forwarded-hosts"]);
        // append: the client's hops are kept, as the mode says.
        let mut h = HeaderMap::new();
        h.append("x-forwarded-proto", HeaderValue::from_static("https"));
        set_forwarded(&mut h, &ForwardedFields::new(ip("10.231.1.2")), ForwardedMode::Append);
        assert_eq!(fields(&h, "x-forwarded-proto"), ["https"]);
    }

    #[test]
    fn append_keeps_the_clients_hops_and_names_the_client_last() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
        h.append("x-forwarded-for", HeaderValue::from_static(" 5.6.7.8 "));
        h.append("x-forwarded-for", HeaderValue::from_static(""));
        h.append("forwarded", HeaderValue::from_static("for=1.2.3.4"));
        h.append("x_forwarded_for", HeaderValue::from_static("6.6.6.6"));
        set_forwarded(&mut h, &ForwardedFields::new(ip("fd00:231:1::2")), ForwardedMode::Append);
        assert!(h.get("x_forwarded_for").is_none(), "a lookalike is no hop, appended or not");
        assert_eq!(fields(&h, "x-forwarded-for"), ["1.2.3.4, 5.6.7.8, fd00:231:1::2"]);
        assert_eq!(fields(&h, "forwarded"), ["for=1.2.3.4, for=\"[fd00:231:1::2]\""]);
        // Obs-text a client sent survives append (it was a valid field value).
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_bytes(b"\xe9t\xe9").unwrap());
        set_forwarded(&mut h, &ForwardedFields::new(ip("127.0.0.1")), ForwardedMode::Append);
        assert_eq!(h.get("x-forwarded-for").unwrap().as_bytes(), b"\xe9t\xe9, 127.0.0.1");
    }

    #[test]
    fn proxy_v2_headers_byte_for_byte() {
        let h = proxy_v2_header(sa("10.231.1.2:40000"), sa("10.231.1.1:9000"));
        let mut want = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        want.extend_from_slice(&[0x21, 0x11, 0, 12, 10, 231, 1, 2, 10, 231, 1, 1, 0x9c, 0x40, 0x23, 0x28]);
        assert_eq!(h, want);
        // IPv4-mapped addresses are IPv4.
        assert_eq!(proxy_v2_header(sa("[::ffff:10.231.1.2]:40000"), sa("10.231.1.1:9000")), want);
        let h = proxy_v2_header(sa("[fd00::2]:1"), sa("[fd00::1]:2"));
        assert_eq!(h.len(), 16 + 36);
        assert_eq!(&h[12..16], &[0x21, 0x21, 0, 36]);
        assert_eq!(&h[16..32], &ip("fd00::2").to_string().parse::<std::net::Ipv6Addr>().unwrap().octets());
        assert_eq!(&h[48..52], &[0, 1, 0, 2]);
        // Mixed families: IPv6, the IPv4 side mapped.
        let h = proxy_v2_header(sa("10.0.0.2:1"), sa("[fd00::1]:2"));
        assert_eq!(&h[13..16], &[0x21, 0, 36]);
        assert_eq!(&h[16..32], &std::net::Ipv4Addr::new(10, 0, 0, 2).to_ipv6_mapped().octets());
    }
}

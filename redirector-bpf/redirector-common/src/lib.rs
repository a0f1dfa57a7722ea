//! Types shared by the l7mesh kernel programs and their userspace loader.
//!
//! Every map key and value is defined here once, `#[repr(C)]` with explicit padding, so the
//! kernel programs (built for `bpfel-unknown-none`) and the loader (built for the host) agree
//! on layout. The `layout` tests pin sizes and field offsets.
//!
//! Addresses are always 16 bytes in network order: IPv6 as is, IPv4 as IPv4-mapped IPv6
//! (`::ffff:a.b.c.d`). They are stored as `[u32; 4]` because that is how the kernel hands
//! them to programs (each word already in network byte order). Ports are host order.
#![no_std]

/// Map names as they appear in the object and under `<pin dir>/maps/`.
pub mod map_names {
    pub const CONFIG: &str = "L7_CONFIG";
    pub const GENERATION: &str = "L7_GENERATION";
    pub const ENDPOINTS: &str = "L7_ENDPOINTS";
    pub const IPCACHE: &str = "L7_IPCACHE";
    pub const POLICY: &str = "L7_POLICY";
    pub const LISTENERS: &str = "L7_LISTENERS";
    pub const BOUND: &str = "L7_BOUND";
    pub const CONNECT_DECISIONS: &str = "L7_CONNECT_DECISIONS";
    pub const ORIGINAL_DST: &str = "L7_ORIGINAL_DST";
    pub const LOCAL_DECIDED: &str = "L7_LOCAL_DECIDED";
    pub const SOCKETS: &str = "L7_SOCKETS";
    pub const PROXY_LISTENERS: &str = "L7_PROXY_LISTENERS";
    pub const COUNTERS: &str = "L7_COUNTERS";
    pub const EVENTS: &str = "L7_EVENTS";
}

/// Program names (the Rust function names in the eBPF crate).
pub mod program_names {
    pub const CONNECT4: &str = "l7_connect4";
    pub const CONNECT6: &str = "l7_connect6";
    pub const SENDMSG4: &str = "l7_sendmsg4";
    pub const SENDMSG6: &str = "l7_sendmsg6";
    pub const GETPEERNAME4: &str = "l7_getpeername4";
    pub const GETPEERNAME6: &str = "l7_getpeername6";
    pub const POST_BIND4: &str = "l7_post_bind4";
    pub const POST_BIND6: &str = "l7_post_bind6";
    pub const SOCK_RELEASE: &str = "l7_sock_release";
    pub const SOCK_OPS: &str = "l7_sock_ops";
    pub const SK_MSG: &str = "l7_sk_msg";
    pub const SK_LOOKUP: &str = "l7_sk_lookup";
    pub const GETSOCKOPT: &str = "l7_getsockopt";
}

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

pub const DIRECTION_EGRESS: u8 = 0;
pub const DIRECTION_INGRESS: u8 = 1;

/// Reserved peer identities (numbered as Cilium numbers them where Cilium has one).
pub mod identity {
    /// Wildcard: a policy entry with this peer applies to every peer.
    pub const ANY: u32 = 0;
    /// This node's own processes outside any workload.
    pub const HOST: u32 = 1;
    /// Any address the ipcache does not know.
    pub const WORLD: u32 = 2;
    /// First identity the compiler may hand out for label sets and CIDR groups.
    pub const FIRST_ALLOCATED: u32 = 256;
}

/// What a policy entry tells the kernel to do with a connection.
pub mod action {
    pub const ALLOW: u8 = 1;
    pub const DENY: u8 = 2;
    /// Allowed at L4, but the connection goes through the proxy for L7 rules or TLS.
    pub const REDIRECT: u8 = 3;
}

/// `PolicyValue::flags` bits.
pub const POLICY_FLAG_AUDIT: u8 = 1;

/// Protocol hints the compiler attaches to a marked port; the proxy trusts a hint before sniffing.
pub mod proto_hint {
    pub const NONE: u8 = 0;
    pub const HTTP: u8 = 1;
    pub const GRPC: u8 = 2;
    pub const KAFKA: u8 = 3;
    pub const TLS: u8 = 4;
}

/// `EndpointInfo::flags` bits: a direction becomes default-deny once a policy selects the endpoint in it.
pub const ENDPOINT_EGRESS_ENFORCED: u32 = 1;
pub const ENDPOINT_INGRESS_ENFORCED: u32 = 2;
/// Only audit-mode policies select the endpoint in that direction: the default deny is
/// reported (AUDIT), not enforced.
pub const ENDPOINT_EGRESS_AUDIT: u32 = 4;
pub const ENDPOINT_INGRESS_AUDIT: u32 = 8;

/// `Config::flags` bits.
pub const CONFIG_FAIL_OPEN: u32 = 1;
/// Do not put app <-> proxy sockets in the sockhash: every byte takes the loopback TCP path
/// (for measuring what the sk_msg short-circuit saves, and as an operational escape hatch).
pub const CONFIG_NO_SHORT_CIRCUIT: u32 = 2;

/// Node-wide settings, slot 0 of the `L7_CONFIG` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Where egress redirects go (the proxy's egress listener), IPv4 and IPv6.
    pub proxy_addr4: [u32; 4],
    pub proxy_addr6: [u32; 4],
    /// Source addresses the proxy binds its upstream sockets to; `sk_lookup` never steers them.
    pub upstream_src4: [u32; 4],
    pub upstream_src6: [u32; 4],
    pub egress_port: u16,
    pub ingress_port: u16,
    /// `SO_MARK` the proxy sets on its upstream sockets; connect hooks never redirect them.
    pub proxy_mark: u32,
    pub flags: u32,
    pub _pad: u32,
    /// Cookie of the network namespace sk_lookup is attached to (sk_lookup programs cannot
    /// call bpf_get_netns_cookie, and each node attaches to exactly one namespace).
    pub netns_cookie: u64,
}

/// Key of `L7_ENDPOINTS`: which workload a cgroup is, in one policy generation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    pub generation: u32,
    pub _pad: u32,
    pub cgroup_id: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointInfo {
    /// Subject of `PolicyKey::endpoint_id`.
    pub endpoint_id: u32,
    /// The workload's security identity, used as `peer_identity` when it is the other side.
    pub identity: u32,
    pub flags: u32,
    pub _pad: u32,
}

/// Data part of the `L7_IPCACHE` LPM key: prefix length covers 32 bits of generation plus
/// the address prefix (an IPv4 /24 is `32 + 96 + 24`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpcacheKey {
    pub generation: u32,
    pub addr: [u32; 4],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpcacheValue {
    pub identity: u32,
}

/// Data part of the `L7_POLICY` LPM key. Everything before `port` is matched exactly
/// (`POLICY_KEY_FIXED_BITS`); a port range becomes one or more port prefixes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyKey {
    pub generation: u32,
    pub endpoint_id: u32,
    pub peer_identity: u32,
    pub direction: u8,
    pub protocol: u8,
    /// Big-endian, so that LPM prefix bits run from the port's most significant bit.
    pub port: [u8; 2],
}

/// Bits of `PolicyKey` before the port: generation, endpoint, peer, direction, protocol.
pub const POLICY_KEY_FIXED_BITS: u32 = 112;
pub const IPCACHE_KEY_FIXED_BITS: u32 = 32;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyValue {
    pub action: u8,
    pub flags: u8,
    pub proto_hint: u8,
    pub _pad: u8,
    pub policy_id: u32,
}

/// Key of `L7_LISTENERS`: an address a workload bound (`addr` all zero for a wildcard bind).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    pub netns_cookie: u64,
    pub addr: [u32; 4],
    pub port: u16,
    pub protocol: u8,
    pub _pad: [u8; 5],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenerValue {
    pub cgroup_id: u64,
    /// The bound socket, so that only its release forgets the entry (0 when seeded from /proc).
    pub socket_cookie: u64,
}

/// `ConnectDecision::flags` bits.
pub const DECISION_REDIRECTED: u8 = 1;
/// The connect hook already applied the destination workload's ingress policy.
pub const DECISION_INGRESS_CHECKED: u8 = 2;
pub const DECISION_AUDIT: u8 = 4;

/// What a connect hook decided for one socket (`L7_CONNECT_DECISIONS`, keyed by socket
/// cookie) and, once the client port is known, for one client address (`L7_ORIGINAL_DST`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectDecision {
    pub original_addr: [u32; 4],
    pub original_port: u16,
    pub protocol: u8,
    pub flags: u8,
    pub egress_policy_id: u32,
    pub cgroup_id: u64,
    pub ingress_policy_id: u32,
    pub proto_hint: u8,
    pub _pad: [u8; 3],
}

/// Key of `L7_ORIGINAL_DST` and `L7_LOCAL_DECIDED` halves: one socket end in one netns.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerKey {
    pub netns_cookie: u64,
    pub addr: [u32; 4],
    pub port: u16,
    pub protocol: u8,
    pub _pad: [u8; 5],
}

/// Key of `L7_LOCAL_DECIDED` and of the `L7_SOCKETS` sockhash: a TCP connection as seen
/// from one end, with the netns cookie so equal loopback tuples in two namespaces never collide.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub netns_cookie: u64,
    pub local_addr: [u32; 4],
    pub remote_addr: [u32; 4],
    pub local_port: u16,
    pub remote_port: u16,
    pub _pad: u32,
}

/// Indices of the per-CPU `L7_COUNTERS` array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Egress connections rewritten to the proxy.
    Redirected = 0,
    /// Workload connections and sends left alone (allowed, unmarked).
    Passed = 1,
    /// Connections and sends refused by L4 policy (egress EPERM, ingress refused).
    Denied = 2,
    /// Would-be denials let through because the policy is in audit mode.
    Audited = 3,
    /// Messages `sk_msg` delivered straight to the peer socket.
    SkMsgRedirects = 4,
    /// `sk_msg` found no peer socket and let the message take the loopback path.
    SkMsgMisses = 5,
    /// Original-destination lookups (`SO_ORIGINAL_DST`, connect → peer) that found nothing.
    LookupMisses = 6,
    /// Marked connections that found no proxy listener.
    ProxyAbsent = 7,
    /// Marked connections passed unredirected because the node runs fail-open.
    FailOpenPassed = 8,
    /// Inbound connections `sk_lookup` steered to the proxy's ingress listener.
    IngressRedirected = 9,
    /// Sockets added to the sockhash.
    SockhashInserts = 10,
    /// Events dropped because the ring buffer was full.
    EventsDropped = 11,
    /// Listener ownership learned at bind time.
    ListenersLearned = 12,
}

pub const COUNTER_COUNT: u32 = 13;

impl Counter {
    pub const ALL: [Counter; COUNTER_COUNT as usize] = [
        Counter::Redirected,
        Counter::Passed,
        Counter::Denied,
        Counter::Audited,
        Counter::SkMsgRedirects,
        Counter::SkMsgMisses,
        Counter::LookupMisses,
        Counter::ProxyAbsent,
        Counter::FailOpenPassed,
        Counter::IngressRedirected,
        Counter::SockhashInserts,
        Counter::EventsDropped,
        Counter::ListenersLearned,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Counter::Redirected => "redirected",
            Counter::Passed => "passed",
            Counter::Denied => "denied",
            Counter::Audited => "audited",
            Counter::SkMsgRedirects => "sk_msg_redirects",
            Counter::SkMsgMisses => "sk_msg_misses",
            Counter::LookupMisses => "lookups_missed",
            Counter::ProxyAbsent => "proxy_absent",
            Counter::FailOpenPassed => "fail_open_passed",
            Counter::IngressRedirected => "ingress_redirected",
            Counter::SockhashInserts => "sockhash_inserts",
            Counter::EventsDropped => "events_dropped",
            Counter::ListenersLearned => "listeners_learned",
        }
    }
}

/// `L4Event::verdict` values (the flow verdicts).
pub mod verdict {
    pub const ALLOWED: u8 = 1;
    pub const DENIED: u8 = 2;
    pub const AUDIT: u8 = 3;
}

/// `L4Event::flags` bits.
pub const EVENT_REDIRECTED: u8 = 1;

/// Which hook made an event.
pub mod hook {
    pub const CONNECT: u8 = 1;
    pub const SENDMSG: u8 = 2;
    pub const SK_LOOKUP: u8 = 3;
}

/// An L4 verdict, sent to userspace through the `L7_EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct L4Event {
    pub timestamp_ns: u64,
    /// Source workload's cgroup (0 for traffic from outside the workload tree).
    pub cgroup_id: u64,
    pub src_addr: [u32; 4],
    pub dst_addr: [u32; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub policy_id: u32,
    pub verdict: u8,
    pub direction: u8,
    pub protocol: u8,
    pub flags: u8,
    pub hook: u8,
    pub _pad: [u8; 3],
}

/// `[u32; 4]` for an IPv4 address given as the kernel gives it (network order in a u32).
#[inline(always)]
pub const fn v4_mapped(ip4_network_order: u32) -> [u32; 4] {
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), ip4_network_order]
}

/// True for an IPv4-mapped address; its last word is then the IPv4 address.
#[inline(always)]
pub const fn is_v4_mapped(addr: &[u32; 4]) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff])
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)] plain data with explicit padding fields and no
    // invalid bit patterns, as aya::Pod requires.
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for EndpointKey {}
    unsafe impl aya::Pod for EndpointInfo {}
    unsafe impl aya::Pod for IpcacheKey {}
    unsafe impl aya::Pod for IpcacheValue {}
    unsafe impl aya::Pod for PolicyKey {}
    unsafe impl aya::Pod for PolicyValue {}
    unsafe impl aya::Pod for ListenerKey {}
    unsafe impl aya::Pod for ListenerValue {}
    unsafe impl aya::Pod for ConnectDecision {}
    unsafe impl aya::Pod for PeerKey {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for L4Event {}
}

#[cfg(test)]
mod layout {
    use super::*;
    use core::mem::{align_of, offset_of, size_of};

    #[test]
    fn sizes_and_alignment_are_fixed() {
        assert_eq!(size_of::<Config>(), 88);
        assert_eq!(size_of::<EndpointKey>(), 16);
        assert_eq!(align_of::<EndpointKey>(), 8);
        assert_eq!(size_of::<EndpointInfo>(), 16);
        assert_eq!(size_of::<IpcacheKey>(), 20);
        assert_eq!(size_of::<PolicyKey>(), 16);
        assert_eq!(size_of::<PolicyValue>(), 8);
        assert_eq!(size_of::<ListenerKey>(), 32);
        assert_eq!(size_of::<ListenerValue>(), 16);
        assert_eq!(size_of::<ConnectDecision>(), 40);
        assert_eq!(size_of::<PeerKey>(), 32);
        assert_eq!(size_of::<FlowKey>(), 48);
        assert_eq!(size_of::<L4Event>(), 64);
    }

    #[test]
    fn policy_key_port_follows_the_exact_part() {
        // The LPM prefix covers generation..protocol exactly, then port bits.
        assert_eq!(offset_of!(PolicyKey, port) as u32 * 8, POLICY_KEY_FIXED_BITS);
        assert_eq!(offset_of!(IpcacheKey, addr) as u32 * 8, IPCACHE_KEY_FIXED_BITS);
    }

    #[test]
    fn v4_mapped_is_the_ipv6_layout() {
        let mapped = v4_mapped(u32::from_ne_bytes([127, 0, 0, 1]));
        let mut bytes = [0u8; 16];
        for (i, word) in mapped.iter().enumerate() {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
        assert_eq!(bytes, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1]);
        assert!(is_v4_mapped(&mapped));
    }
}

//! l7mesh kernel programs.
//!
//! - `connect4/6`, `sendmsg4/6` (workload cgroup tree): L4 verdicts for a workload's TCP and
//!   UDP traffic; connections policy marks for L7 are rewritten to the proxy's egress listener.
//! - `getpeername4/6` (workload tree): a redirected app still sees its original peer.
//! - `post_bind4/6`, `sock_release` (workload tree): which workload owns which bound address.
//! - `sock_ops` (node cgroup): turns a connect decision into a lookup by client address, marks
//!   connections whose ingress policy was already applied, and puts the app <-> proxy sockets in
//!   a sockhash; `sk_msg` then hands each message straight to the other socket.
//! - `sk_lookup` (per network namespace): ingress verdicts; marked connections are steered
//!   to the proxy's ingress listener, denied ones refused.
//! - `getsockopt` (proxy cgroup): answers `SO_ORIGINAL_DST` for the proxy's accepted sockets.
//!
//! Every policy map key carries a generation; programs read the current generation once, so a
//! new policy version takes effect in one step (userspace writes the new generation's entries,
//! flips `L7_GENERATION`, then deletes the old entries).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        bpf_sock, bpf_sock_tuple, sk_action, BPF_F_CURRENT_NETNS, BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_TCP_CONNECT_CB,
    },
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_sk_lookup_tcp,
        bpf_sk_release,
    },
    macros::{cgroup_sock, cgroup_sock_addr, cgroup_sockopt, map, sk_lookup, sk_msg, sock_ops},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, SockHash, SockMap},
    programs::{SkLookupContext, SkMsgContext, SockAddrContext, SockContext, SockOpsContext, SockoptContext},
    EbpfContext,
};
use redirector_common::{
    action, hook, identity, is_v4_mapped, v4_mapped, verdict, Config, ConnectDecision, Counter, EndpointInfo,
    EndpointKey, FlowKey, IpcacheKey, IpcacheValue, L4Event, ListenerKey, ListenerValue, PeerKey, PolicyKey,
    PolicyValue, CONFIG_FAIL_OPEN, CONFIG_NO_SHORT_CIRCUIT, COUNTER_COUNT, DECISION_AUDIT, DECISION_INGRESS_CHECKED,
    DECISION_REDIRECTED, DIRECTION_EGRESS, DIRECTION_INGRESS, ENDPOINT_EGRESS_AUDIT, ENDPOINT_EGRESS_ENFORCED,
    ENDPOINT_INGRESS_AUDIT, ENDPOINT_INGRESS_ENFORCED, EVENT_REDIRECTED, IPCACHE_KEY_FIXED_BITS, IPPROTO_TCP,
    IPPROTO_UDP, POLICY_FLAG_AUDIT, POLICY_KEY_FIXED_BITS,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
/// `SO_ORIGINAL_DST` and `IP6T_SO_ORIGINAL_DST` share the number.
const SO_ORIGINAL_DST: i32 = 80;

/// A context field read as one fixed-offset load: LLVM otherwise computes `ctx + offset` for a
/// field chosen at run time, and the verifier refuses modified context pointers.
macro_rules! rd {
    ($place:expr) => {
        unsafe { core::ptr::read_volatile(&raw const $place) }
    };
}

/// The four words of an IPv6 context field, each read at its own fixed offset.
macro_rules! rd6 {
    ($place:expr) => {
        [rd!($place[0]), rd!($place[1]), rd!($place[2]), rd!($place[3])]
    };
}

const ALLOW: i32 = 1;
const REJECT: i32 = 0;

#[map(name = "L7_CONFIG")]
static CONFIG: Array<Config> = Array::pinned(1, 0);
#[map(name = "L7_GENERATION")]
static GENERATION: Array<u32> = Array::pinned(1, 0);
#[map(name = "L7_ENDPOINTS")]
static ENDPOINTS: HashMap<EndpointKey, EndpointInfo> = HashMap::pinned(16384, 0);
#[map(name = "L7_IPCACHE")]
static IPCACHE: LpmTrie<IpcacheKey, IpcacheValue> = LpmTrie::pinned(65536, 0);
#[map(name = "L7_POLICY")]
static POLICY: LpmTrie<PolicyKey, PolicyValue> = LpmTrie::pinned(262144, 0);
#[map(name = "L7_LISTENERS")]
static LISTENERS: HashMap<ListenerKey, ListenerValue> = HashMap::pinned(65536, 0);
/// Socket cookie -> the address it bound: sock_release may not read the socket's address.
#[map(name = "L7_BOUND")]
static BOUND: LruHashMap<u64, ListenerKey> = LruHashMap::pinned(65536, 0);
#[map(name = "L7_CONNECT_DECISIONS")]
static CONNECT_DECISIONS: LruHashMap<u64, ConnectDecision> = LruHashMap::pinned(65536, 0);
#[map(name = "L7_ORIGINAL_DST")]
static ORIGINAL_DST: LruHashMap<PeerKey, ConnectDecision> = LruHashMap::pinned(65536, 0);
#[map(name = "L7_LOCAL_DECIDED")]
static LOCAL_DECIDED: LruHashMap<FlowKey, u8> = LruHashMap::pinned(65536, 0);
#[map(name = "L7_SOCKETS")]
static SOCKETS: SockHash<FlowKey> = SockHash::pinned(65536, 0);
/// Slot 0: the proxy's IPv4 ingress listener; slot 1: its IPv6 one.
#[map(name = "L7_PROXY_LISTENERS")]
static PROXY_LISTENERS: SockMap = SockMap::pinned(2, 0);
#[map(name = "L7_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_COUNT, 0);
#[map(name = "L7_EVENTS")]
static EVENTS: RingBuf = RingBuf::pinned(1 << 20, 0);

#[inline(always)]
fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // Per-CPU slot: no other writer.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn emit(event: &L4Event) {
    match EVENTS.reserve::<L4Event>(0) {
        Some(mut entry) => {
            entry.write(*event);
            entry.submit(0);
        }
        None => count(Counter::EventsDropped),
    }
}

#[inline(always)]
fn config() -> Option<&'static Config> {
    CONFIG.get(0)
}

#[inline(always)]
fn generation() -> u32 {
    GENERATION.get(0).copied().unwrap_or(0)
}

#[inline(always)]
fn is_loopback(addr: &[u32; 4]) -> bool {
    if is_v4_mapped(addr) {
        (u32::from_be(addr[3]) >> 24) == 127
    } else {
        addr[0] == 0 && addr[1] == 0 && addr[2] == 0 && u32::from_be(addr[3]) == 1
    }
}

#[inline(always)]
fn port_from_be16(raw: u32) -> u16 {
    u16::from_be(raw as u16)
}

/// sock_ops and sk_msg give the remote port in network order in the upper 16 bits.
#[inline(always)]
fn port_from_be32_upper(raw: u32) -> u16 {
    u16::from_be((raw >> 16) as u16)
}

#[inline(always)]
fn peer_identity(generation: u32, addr: &[u32; 4]) -> u32 {
    let key = Key::new(IPCACHE_KEY_FIXED_BITS + 128, IpcacheKey { generation, addr: *addr });
    match IPCACHE.get(&key) {
        Some(value) => value.identity,
        None if is_loopback(addr) => identity::HOST,
        None => identity::WORLD,
    }
}

/// The workload that bound `addr:port` in this netns, exact address first, then wildcard.
#[inline(always)]
fn listener_owner(netns_cookie: u64, addr: &[u32; 4], port: u16, protocol: u8) -> Option<u64> {
    let mut key = ListenerKey { netns_cookie, addr: *addr, port, protocol, _pad: [0; 5] };
    if let Some(owner) = unsafe { LISTENERS.get(&key) } {
        return Some(owner.cgroup_id);
    }
    key.addr = [0; 4];
    unsafe { LISTENERS.get(&key) }.map(|owner| owner.cgroup_id)
}

#[inline(always)]
fn endpoint(generation: u32, cgroup_id: u64) -> Option<&'static EndpointInfo> {
    // A reference into the map, not a copy: an Option of a by-value struct leaves undefined
    // bytes that LLVM spills and the verifier rejects (`R3 !read_ok`).
    unsafe { ENDPOINTS.get(&EndpointKey { generation, _pad: 0, cgroup_id }) }
}

/// The policy verdict for one direction of one endpoint: the most specific port prefix for
/// the exact peer wins, then the wildcard peer; with neither, the direction's default.
#[inline(always)]
fn evaluate(generation: u32, ep: &EndpointInfo, direction: u8, protocol: u8, peer: u32, port: u16) -> PolicyValue {
    let mut data = PolicyKey {
        generation,
        endpoint_id: ep.endpoint_id,
        peer_identity: peer,
        direction,
        protocol,
        port: port.to_be_bytes(),
    };
    if let Some(value) = POLICY.get(&Key::new(POLICY_KEY_FIXED_BITS + 16, data)) {
        return *value;
    }
    data.peer_identity = identity::ANY;
    if let Some(value) = POLICY.get(&Key::new(POLICY_KEY_FIXED_BITS + 16, data)) {
        return *value;
    }
    let (enforced, audit) = if direction == DIRECTION_EGRESS {
        (ep.flags & ENDPOINT_EGRESS_ENFORCED != 0, ep.flags & ENDPOINT_EGRESS_AUDIT != 0)
    } else {
        (ep.flags & ENDPOINT_INGRESS_ENFORCED != 0, ep.flags & ENDPOINT_INGRESS_AUDIT != 0)
    };
    PolicyValue {
        action: if enforced || audit { action::DENY } else { action::ALLOW },
        flags: if audit && !enforced { POLICY_FLAG_AUDIT } else { 0 },
        proto_hint: 0,
        _pad: 0,
        policy_id: 0,
    }
}

/// Egress and (for a local destination) ingress verdicts folded into one.
struct Combined {
    action: u8,
    audit: bool,
    enforced: bool,
    egress_policy_id: u32,
    ingress_policy_id: u32,
    proto_hint: u8,
    ingress_checked: bool,
}

impl Combined {
    #[inline(always)]
    fn fold(&mut self, value: &PolicyValue) {
        let mut act = value.action;
        if act == action::DENY && value.flags & POLICY_FLAG_AUDIT != 0 {
            self.audit = true;
            act = action::ALLOW;
        }
        if act == action::DENY {
            self.action = action::DENY;
        } else if act == action::REDIRECT && self.action != action::DENY {
            self.action = action::REDIRECT;
            if self.proto_hint == 0 {
                self.proto_hint = value.proto_hint;
            }
        }
    }

    #[inline(always)]
    fn policy_id(&self) -> u32 {
        if self.egress_policy_id != 0 {
            self.egress_policy_id
        } else {
            self.ingress_policy_id
        }
    }
}

#[inline(always)]
fn decide_local(netns_cookie: u64, cgroup_id: u64, dst: &[u32; 4], dst_port: u16, protocol: u8) -> Combined {
    let generation = generation();
    let src = endpoint(generation, cgroup_id);
    let mut combined = Combined {
        action: action::ALLOW,
        audit: false,
        enforced: false,
        egress_policy_id: 0,
        ingress_policy_id: 0,
        proto_hint: 0,
        ingress_checked: false,
    };
    let mut dst_identity = peer_identity(generation, dst);
    let mut dst_endpoint = None;
    if dst_identity == identity::HOST {
        if let Some(owner) = listener_owner(netns_cookie, dst, dst_port, protocol) {
            if let Some(ep) = endpoint(generation, owner) {
                dst_identity = ep.identity;
                dst_endpoint = Some(ep);
            }
        }
    }
    if let Some(ep) = src {
        let value = evaluate(generation, ep, DIRECTION_EGRESS, protocol, dst_identity, dst_port);
        combined.enforced |= value.policy_id != 0 || ep.flags & ENDPOINT_EGRESS_ENFORCED != 0;
        combined.egress_policy_id = value.policy_id;
        combined.fold(&value);
    }
    if let Some(ep) = dst_endpoint {
        let src_identity = match src {
            Some(s) => s.identity,
            None => identity::HOST,
        };
        let value = evaluate(generation, ep, DIRECTION_INGRESS, protocol, src_identity, dst_port);
        combined.enforced |= value.policy_id != 0 || ep.flags & ENDPOINT_INGRESS_ENFORCED != 0;
        combined.ingress_policy_id = value.policy_id;
        combined.ingress_checked = true;
        combined.fold(&value);
    }
    combined
}

#[inline(always)]
fn event(cgroup_id: u64, dst: &[u32; 4], dst_port: u16, protocol: u8, c: &Combined, hook_kind: u8) -> L4Event {
    L4Event {
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        cgroup_id,
        src_addr: [0; 4],
        dst_addr: *dst,
        src_port: 0,
        dst_port,
        policy_id: c.policy_id(),
        verdict: verdict::ALLOWED,
        direction: DIRECTION_EGRESS,
        protocol,
        flags: 0,
        hook: hook_kind,
        _pad: [0; 3],
    }
}

#[inline(always)]
fn sock_protocol(ctx: &SockAddrContext) -> u8 {
    let protocol = unsafe { (*ctx.sock_addr).protocol };
    protocol as u8
}

#[inline(always)]
fn sock_mark(ctx: &SockAddrContext) -> u32 {
    unsafe {
        let sk: *mut bpf_sock = (*ctx.sock_addr).__bindgen_anon_1.sk;
        if sk.is_null() {
            0
        } else {
            (*sk).mark
        }
    }
}

/// Whether the proxy's egress listener exists in this netns (fail-open needs this in-kernel).
#[inline(always)]
fn proxy_listening(ctx: &SockAddrContext, cfg: &Config, v6: bool) -> bool {
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size;
    unsafe {
        if v6 {
            let t = &mut tuple.__bindgen_anon_1.ipv6;
            t.daddr = cfg.proxy_addr6;
            t.dport = cfg.egress_port.to_be();
            size = core::mem::size_of_val(t) as u32;
        } else {
            let t = &mut tuple.__bindgen_anon_1.ipv4;
            t.daddr = cfg.proxy_addr4[3];
            t.dport = cfg.egress_port.to_be();
            size = core::mem::size_of_val(t) as u32;
        }
        let sk = bpf_sk_lookup_tcp(ctx.as_ptr(), &mut tuple, size, BPF_F_CURRENT_NETNS as u64, 0);
        if sk.is_null() {
            false
        } else {
            bpf_sk_release(sk.cast());
            true
        }
    }
}

/// Shared body of connect4/connect6/sendmsg4/sendmsg6. `dst` is v4-mapped for IPv4.
#[inline(always)]
fn on_connect(ctx: &SockAddrContext, dst: [u32; 4], dst_port: u16, v6_socket: bool, hook_kind: u8) -> Result<i32, i32> {
    let cfg = config().ok_or(ALLOW)?;
    let protocol = sock_protocol(ctx);
    if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
        return Ok(ALLOW);
    }
    // The proxy's own sockets, and connections already aimed at the proxy, are never touched.
    if cfg.proxy_mark != 0 && sock_mark(ctx) == cfg.proxy_mark {
        return Ok(ALLOW);
    }
    if dst_port == cfg.egress_port || dst_port == cfg.ingress_port {
        if dst == cfg.proxy_addr4 || dst == cfg.proxy_addr6 {
            return Ok(ALLOW);
        }
    }
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let combined = decide_local(netns_cookie, cgroup_id, &dst, dst_port, protocol);
    let mut ev = event(cgroup_id, &dst, dst_port, protocol, &combined, hook_kind);

    if combined.action == action::DENY {
        count(Counter::Denied);
        ev.verdict = verdict::DENIED;
        emit(&ev);
        return Ok(REJECT);
    }
    if combined.audit {
        count(Counter::Audited);
        ev.verdict = verdict::AUDIT;
    }
    let mut decision = ConnectDecision {
        original_addr: dst,
        original_port: dst_port,
        protocol,
        flags: 0,
        egress_policy_id: combined.egress_policy_id,
        cgroup_id,
        ingress_policy_id: combined.ingress_policy_id,
        proto_hint: combined.proto_hint,
        _pad: [0; 3],
    };
    if combined.audit {
        decision.flags |= DECISION_AUDIT;
    }
    if combined.ingress_checked {
        decision.flags |= DECISION_INGRESS_CHECKED;
    }
    // Only TCP connects go to the proxy; for UDP a marked port is an L4 allow.
    let redirect = combined.action == action::REDIRECT && protocol == IPPROTO_TCP && hook_kind == hook::CONNECT;
    if redirect {
        let to_v6_listener = v6_socket && !is_v4_mapped(&dst);
        if !proxy_listening(ctx, cfg, to_v6_listener) {
            count(Counter::ProxyAbsent);
            if cfg.flags & CONFIG_FAIL_OPEN != 0 {
                count(Counter::FailOpenPassed);
                store_decision(ctx, &decision);
                emit(&ev);
                return Ok(ALLOW);
            }
            // Fail closed: still rewritten, so the client is refused by the absent listener.
        }
        decision.flags |= DECISION_REDIRECTED;
        store_decision(ctx, &decision);
        unsafe {
            let sa = ctx.sock_addr;
            if v6_socket {
                let target = if to_v6_listener { cfg.proxy_addr6 } else { v4_mapped(cfg.proxy_addr4[3]) };
                // One 4-byte store per word: the verifier rejects wider context stores.
                core::ptr::write_volatile(&mut (*sa).user_ip6[0], target[0]);
                core::ptr::write_volatile(&mut (*sa).user_ip6[1], target[1]);
                core::ptr::write_volatile(&mut (*sa).user_ip6[2], target[2]);
                core::ptr::write_volatile(&mut (*sa).user_ip6[3], target[3]);
            } else {
                core::ptr::write_volatile(&mut (*sa).user_ip4, cfg.proxy_addr4[3]);
            }
            core::ptr::write_volatile(&mut (*sa).user_port, cfg.egress_port.to_be() as u32);
        }
        count(Counter::Redirected);
        ev.flags |= EVENT_REDIRECTED;
        emit(&ev);
        return Ok(ALLOW);
    }
    if combined.ingress_checked && protocol == IPPROTO_TCP && hook_kind == hook::CONNECT {
        store_decision(ctx, &decision);
    }
    count(Counter::Passed);
    // An audited pass is reported too: audit mode exists to show what it would deny.
    if combined.enforced || combined.audit {
        emit(&ev);
    }
    Ok(ALLOW)
}

#[inline(always)]
fn store_decision(ctx: &SockAddrContext, decision: &ConnectDecision) {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = CONNECT_DECISIONS.insert(&cookie, decision, 0);
}

#[inline(always)]
fn user_dst4(ctx: &SockAddrContext) -> ([u32; 4], u16) {
    let sa = ctx.sock_addr;
    (v4_mapped(rd!((*sa).user_ip4)), port_from_be16(rd!((*sa).user_port)))
}

#[inline(always)]
fn user_dst6(ctx: &SockAddrContext) -> ([u32; 4], u16) {
    let sa = ctx.sock_addr;
    (rd6!((*sa).user_ip6), port_from_be16(rd!((*sa).user_port)))
}

#[cgroup_sock_addr(connect4)]
pub fn l7_connect4(ctx: SockAddrContext) -> i32 {
    let (dst, port) = user_dst4(&ctx);
    on_connect(&ctx, dst, port, false, hook::CONNECT).unwrap_or_else(|v| v)
}

#[cgroup_sock_addr(connect6)]
pub fn l7_connect6(ctx: SockAddrContext) -> i32 {
    let (dst, port) = user_dst6(&ctx);
    on_connect(&ctx, dst, port, true, hook::CONNECT).unwrap_or_else(|v| v)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn l7_sendmsg4(ctx: SockAddrContext) -> i32 {
    let (dst, port) = user_dst4(&ctx);
    on_connect(&ctx, dst, port, false, hook::SENDMSG).unwrap_or_else(|v| v)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn l7_sendmsg6(ctx: SockAddrContext) -> i32 {
    let (dst, port) = user_dst6(&ctx);
    on_connect(&ctx, dst, port, true, hook::SENDMSG).unwrap_or_else(|v| v)
}

/// A redirected app's getpeername() shows the destination it asked for, not the proxy.
#[inline(always)]
fn on_getpeername(ctx: &SockAddrContext, v6: bool) -> i32 {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(decision) = (unsafe { CONNECT_DECISIONS.get(&cookie) }) else {
        return ALLOW;
    };
    if decision.flags & DECISION_REDIRECTED == 0 {
        return ALLOW;
    }
    unsafe {
        let sa = ctx.sock_addr;
        if v6 {
            core::ptr::write_volatile(&mut (*sa).user_ip6[0], decision.original_addr[0]);
            core::ptr::write_volatile(&mut (*sa).user_ip6[1], decision.original_addr[1]);
            core::ptr::write_volatile(&mut (*sa).user_ip6[2], decision.original_addr[2]);
            core::ptr::write_volatile(&mut (*sa).user_ip6[3], decision.original_addr[3]);
        } else {
            core::ptr::write_volatile(&mut (*sa).user_ip4, decision.original_addr[3]);
        }
        core::ptr::write_volatile(&mut (*sa).user_port, decision.original_port.to_be() as u32);
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn l7_getpeername4(ctx: SockAddrContext) -> i32 {
    on_getpeername(&ctx, false)
}

#[cgroup_sock_addr(getpeername6)]
pub fn l7_getpeername6(ctx: SockAddrContext) -> i32 {
    on_getpeername(&ctx, true)
}

#[inline(always)]
fn bound_key(ctx: &SockContext, v6: bool) -> ListenerKey {
    let sk = ctx.sock;
    // post_bind4 may read only src_ip4 and post_bind6 only src_ip6; `v6` is a constant at
    // each (inlined) call site, so each program has one of these loads.
    let addr = if v6 {
        rd6!((*sk).src_ip6)
    } else {
        let ip4 = rd!((*sk).src_ip4);
        if ip4 == 0 {
            [0; 4]
        } else {
            v4_mapped(ip4)
        }
    };
    ListenerKey {
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        addr,
        port: rd!((*sk).src_port) as u16,
        protocol: rd!((*sk).protocol) as u8,
        _pad: [0; 5],
    }
}

#[inline(always)]
fn on_post_bind(ctx: &SockContext, v6: bool) -> i32 {
    let key = bound_key(ctx, v6);
    if key.port == 0 {
        return ALLOW;
    }
    let value = ListenerValue {
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        socket_cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
    };
    if LISTENERS.insert(&key, &value, 0).is_ok() {
        count(Counter::ListenersLearned);
        let _ = BOUND.insert(&value.socket_cookie, &key, 0);
    }
    ALLOW
}

#[cgroup_sock(post_bind4)]
pub fn l7_post_bind4(ctx: SockContext) -> i32 {
    on_post_bind(&ctx, false)
}

#[cgroup_sock(post_bind6)]
pub fn l7_post_bind6(ctx: SockContext) -> i32 {
    on_post_bind(&ctx, true)
}

/// Forget what a closing socket left behind: its bound address (only if it still owns it) and
/// its connect decision. (Entries indexed by client address age out of their LRU map; a new
/// redirected connection from the same address overwrites its entry before the proxy reads it.)
#[cgroup_sock(sock_release)]
pub fn l7_sock_release(ctx: SockContext) -> i32 {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some(key) = unsafe { BOUND.get(&cookie) } {
        let key = *key;
        if let Some(owner) = unsafe { LISTENERS.get(&key) } {
            if owner.socket_cookie == cookie {
                let _ = LISTENERS.remove(&key);
            }
        }
        let _ = BOUND.remove(&cookie);
    }
    let _ = CONNECT_DECISIONS.remove(&cookie);
    ALLOW
}

#[inline(always)]
fn ops_addrs(ops: &aya_ebpf::bindings::bpf_sock_ops) -> ([u32; 4], [u32; 4]) {
    let (l4, r4) = (rd!(ops.local_ip4), rd!(ops.remote_ip4));
    let (l6, r6) = (rd6!(ops.local_ip6), rd6!(ops.remote_ip6));
    if rd!(ops.family) == AF_INET {
        (v4_mapped(l4), v4_mapped(r4))
    } else {
        (l6, r6)
    }
}

#[sock_ops]
pub fn l7_sock_ops(ctx: SockOpsContext) -> u32 {
    let _ = try_sock_ops(&ctx);
    0
}

#[inline(always)]
fn try_sock_ops(ctx: &SockOpsContext) -> Result<(), ()> {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB
        && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
        && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB
    {
        return Ok(());
    }
    let family = ctx.family();
    if family != AF_INET && family != AF_INET6 {
        return Ok(());
    }
    let cfg = config().ok_or(())?;
    let ops = unsafe { &mut *ctx.ops };
    let (local, remote) = ops_addrs(ops);
    let local_port = rd!(ops.local_port) as u16;
    let remote_port = port_from_be32_upper(rd!(ops.remote_port));
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let mut flow = FlowKey { netns_cookie, local_addr: local, remote_addr: remote, local_port, remote_port, _pad: 0 };

    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        // The client port is known now: index the connect decision by client address, before
        // the SYN reaches sk_lookup or the proxy.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        if let Some(decision) = unsafe { CONNECT_DECISIONS.get(&cookie) } {
            if decision.flags & DECISION_REDIRECTED != 0 {
                let peer = PeerKey { netns_cookie, addr: local, port: local_port, protocol: IPPROTO_TCP, _pad: [0; 5] };
                let _ = ORIGINAL_DST.insert(&peer, decision, 0);
            } else if decision.flags & DECISION_INGRESS_CHECKED != 0 {
                let _ = LOCAL_DECIDED.insert(&flow, &1, 0);
            }
        } else if cfg.proxy_mark != 0 {
            let sk = unsafe { ops.__bindgen_anon_2.sk };
            if !sk.is_null() && unsafe { (*sk).mark } == cfg.proxy_mark {
                // The proxy's upstream leg: already policed, never steered again.
                let _ = LOCAL_DECIDED.insert(&flow, &1, 0);
            }
        }
        return Ok(());
    }

    let is_proxy_addr = |addr: &[u32; 4]| *addr == cfg.proxy_addr4 || *addr == cfg.proxy_addr6;
    let app_side = op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && remote_port == cfg.egress_port && is_proxy_addr(&remote);
    let proxy_side =
        op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB && local_port == cfg.egress_port && is_proxy_addr(&local);
    if (app_side || proxy_side) && cfg.flags & CONFIG_NO_SHORT_CIRCUIT == 0 {
        if SOCKETS.update(&mut flow, ops, 0).is_ok() {
            count(Counter::SockhashInserts);
        }
    }
    Ok(())
}

/// Hands a message on an app <-> proxy socket straight to the other end's receive queue.
#[sk_msg]
pub fn l7_sk_msg(ctx: SkMsgContext) -> u32 {
    let md = unsafe { &*ctx.msg };
    let (l4, r4) = (rd!(md.local_ip4), rd!(md.remote_ip4));
    let (l6, r6) = (rd6!(md.local_ip6), rd6!(md.remote_ip6));
    let (local, remote) = if rd!(md.family) == AF_INET { (v4_mapped(l4), v4_mapped(r4)) } else { (l6, r6) };
    // The other socket's own view: its local end is our remote end.
    let mut peer = FlowKey {
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        local_addr: remote,
        remote_addr: local,
        local_port: port_from_be32_upper(rd!(md.remote_port)),
        remote_port: rd!(md.local_port) as u16,
        _pad: 0,
    };
    // A missing peer (not inserted yet, or closed) is not an error: the message takes the
    // ordinary loopback path, so nothing is ever dropped here.
    if SOCKETS.redirect_msg(&ctx, &mut peer, BPF_F_INGRESS as u64) == sk_action::SK_PASS as i64 {
        count(Counter::SkMsgRedirects);
    } else {
        count(Counter::SkMsgMisses);
    }
    sk_action::SK_PASS
}

#[sk_lookup]
pub fn l7_sk_lookup(ctx: SkLookupContext) -> u32 {
    match try_sk_lookup(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

#[inline(always)]
fn try_sk_lookup(ctx: &SkLookupContext) -> Result<u32, u32> {
    const PASS: u32 = sk_action::SK_PASS;
    const DROP: u32 = sk_action::SK_DROP;
    let cfg = config().ok_or(PASS)?;
    let lk = unsafe { &*ctx.lookup };
    let protocol = rd!(lk.protocol) as u8;
    if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
        return Ok(PASS);
    }
    let v6 = rd!(lk.family) == AF_INET6;
    let (l4, r4) = (rd!(lk.local_ip4), rd!(lk.remote_ip4));
    let (l6, r6) = (rd6!(lk.local_ip6), rd6!(lk.remote_ip6));
    let (local, remote) = if v6 { (l6, r6) } else { (v4_mapped(l4), v4_mapped(r4)) };
    // The proxy's upstream legs are known by their 4-tuple (sock_ops recorded the marked leg
    // in LOCAL_DECIDED, below), never by their source address: any local process may bind
    // the proxy's dedicated source, and would pass unjudged.
    let local_port = rd!(lk.local_port) as u16;
    let remote_port = u16::from_be(rd!(lk.remote_port));
    let netns_cookie = cfg.netns_cookie;
    if protocol == IPPROTO_TCP {
        let client_view = FlowKey {
            netns_cookie,
            local_addr: remote,
            remote_addr: local,
            local_port: remote_port,
            remote_port: local_port,
            _pad: 0,
        };
        if unsafe { LOCAL_DECIDED.get(&client_view) }.is_some() {
            // One SYN, one use: a later connection that happens to reuse the 4-tuple (another
            // process, after TIME_WAIT) must be judged on its own.
            let _ = LOCAL_DECIDED.remove(&client_view);
            return Ok(PASS);
        }
    } else if is_loopback(&remote) {
        // Local UDP senders in the workload tree were policed by sendmsg/connect.
        return Ok(PASS);
    }
    let owner = listener_owner(netns_cookie, &local, local_port, protocol).ok_or(PASS)?;
    let generation = generation();
    let ep = endpoint(generation, owner).ok_or(PASS)?;
    let peer = peer_identity(generation, &remote);
    let value = evaluate(generation, ep, DIRECTION_INGRESS, protocol, peer, local_port);
    let mut combined = Combined {
        action: action::ALLOW,
        audit: false,
        enforced: value.policy_id != 0 || ep.flags & ENDPOINT_INGRESS_ENFORCED != 0,
        egress_policy_id: 0,
        ingress_policy_id: value.policy_id,
        proto_hint: 0,
        ingress_checked: true,
    };
    combined.fold(&value);
    let mut ev = L4Event {
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        cgroup_id: 0,
        src_addr: remote,
        dst_addr: local,
        src_port: remote_port,
        dst_port: local_port,
        policy_id: value.policy_id,
        verdict: verdict::ALLOWED,
        direction: DIRECTION_INGRESS,
        protocol,
        flags: 0,
        hook: hook::SK_LOOKUP,
        _pad: [0; 3],
    };
    if combined.action == action::DENY {
        count(Counter::Denied);
        ev.verdict = verdict::DENIED;
        emit(&ev);
        return Ok(DROP);
    }
    if combined.audit {
        count(Counter::Audited);
        ev.verdict = verdict::AUDIT;
    }
    if combined.action == action::REDIRECT && protocol == IPPROTO_TCP {
        let slot = if v6 { 1 } else { 0 };
        if PROXY_LISTENERS.redirect_sk_lookup(ctx, slot, 0).is_ok() {
            count(Counter::IngressRedirected);
            ev.flags |= EVENT_REDIRECTED;
            emit(&ev);
            return Ok(PASS);
        }
        count(Counter::ProxyAbsent);
        if cfg.flags & CONFIG_FAIL_OPEN == 0 {
            ev.verdict = verdict::DENIED;
            emit(&ev);
            return Ok(DROP);
        }
        count(Counter::FailOpenPassed);
    }
    if combined.enforced || combined.audit {
        emit(&ev);
    }
    Ok(PASS)
}

/// `SO_ORIGINAL_DST` for the proxy's accepted sockets, from the entry sock_ops indexed by the
/// client's address. Anything else is left to the kernel's own answer.
#[cgroup_sockopt(getsockopt)]
pub fn l7_getsockopt(ctx: SockoptContext) -> i32 {
    let _ = try_getsockopt(&ctx);
    ALLOW
}

#[inline(always)]
fn try_getsockopt(ctx: &SockoptContext) -> Result<(), ()> {
    let so = unsafe { &mut *ctx.sockopt };
    if so.optname != SO_ORIGINAL_DST || (so.level != SOL_IP && so.level != SOL_IPV6) {
        return Ok(());
    }
    let sk = unsafe { so.__bindgen_anon_1.sk };
    if sk.is_null() {
        return Err(());
    }
    // Every field is loaded before choosing, so no load has a run-time offset.
    let port = u16::from_be(rd!((*sk).dst_port));
    let ip4 = rd!((*sk).dst_ip4);
    let ip6 = rd6!((*sk).dst_ip6);
    let (client, client_port) = if rd!((*sk).family) == AF_INET { (v4_mapped(ip4), port) } else { (ip6, port) };
    let key = PeerKey {
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        addr: client,
        port: client_port,
        protocol: IPPROTO_TCP,
        _pad: [0; 5],
    };
    let Some(decision) = (unsafe { ORIGINAL_DST.get(&key) }) else {
        count(Counter::LookupMisses);
        return Err(());
    };
    let optval = unsafe { so.__bindgen_anon_2.optval } as *mut u8;
    let optval_end = unsafe { so.__bindgen_anon_3.optval_end } as *mut u8;
    let port = decision.original_port.to_be();
    unsafe {
        if so.level == SOL_IP {
            // struct sockaddr_in
            if !is_v4_mapped(&decision.original_addr) || optval.add(16) > optval_end {
                return Err(());
            }
            core::ptr::write_volatile(optval as *mut u16, AF_INET as u16);
            core::ptr::write_volatile(optval.add(2) as *mut u16, port);
            core::ptr::write_volatile(optval.add(4) as *mut u32, decision.original_addr[3]);
            core::ptr::write_volatile(optval.add(8) as *mut u64, 0);
            core::ptr::write_volatile(&mut so.optlen, 16);
        } else {
            // struct sockaddr_in6
            if optval.add(28) > optval_end {
                return Err(());
            }
            core::ptr::write_volatile(optval as *mut u16, AF_INET6 as u16);
            core::ptr::write_volatile(optval.add(2) as *mut u16, port);
            core::ptr::write_volatile(optval.add(4) as *mut u32, 0);
            core::ptr::write_volatile(optval.add(8) as *mut u32, decision.original_addr[0]);
            core::ptr::write_volatile(optval.add(12) as *mut u32, decision.original_addr[1]);
            core::ptr::write_volatile(optval.add(16) as *mut u32, decision.original_addr[2]);
            core::ptr::write_volatile(optval.add(20) as *mut u32, decision.original_addr[3]);
            core::ptr::write_volatile(optval.add(24) as *mut u32, 0);
            core::ptr::write_volatile(&mut so.optlen, 28);
        }
        core::ptr::write_volatile(&mut so.retval, 0);
    }
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

//! The kernel's policy model: what the policy compiler produces and the redirector's
//! `Maps::apply` writes as one generation, and the one L4 fold ([`fold`]) that the kernel's
//! expanded entries, the controller's re-judging and simulation all compute (ARCHITECTURE.md,
//! "The kernel's policy model"). No aya, so the pure side links it without the loader.
//!
//! Kernel lookups take the most specific port prefix for the exact peer, then for the wildcard
//! peer. To keep Cilium's semantics (allow rules add up, deny wins) under that lookup, the
//! entries are expanded here: for each (endpoint, direction, protocol, peer) the port space is
//! cut at every rule boundary, each piece gets the fold of every rule covering it (wildcard-peer
//! rules included in every exact-peer group), and each piece becomes port prefixes.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use ipnet::IpNet;
pub use redirector_common::identity;
use redirector_common::{action, proto_hint, PolicyValue, POLICY_FLAG_AUDIT};

/// The one direction type of the house (flows, tables and the kernel's maps all use it).
pub use l7mesh_api::Direction;

/// The kernel's encoding of a direction (`redirector_common::DIRECTION_*`).
pub fn direction_raw(direction: Direction) -> u8 {
    match direction {
        Direction::Egress => redirector_common::DIRECTION_EGRESS,
        Direction::Ingress => redirector_common::DIRECTION_INGRESS,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_raw(self) -> u8 {
        match self {
            Protocol::Tcp => redirector_common::IPPROTO_TCP,
            Protocol::Udp => redirector_common::IPPROTO_UDP,
        }
    }

    pub fn from_raw(raw: u8) -> Option<Self> {
        match raw {
            redirector_common::IPPROTO_TCP => Some(Protocol::Tcp),
            redirector_common::IPPROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }
}

/// The protocol the proxy should expect on a marked port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ProtocolHint {
    #[default]
    None,
    Http,
    Grpc,
    Kafka,
    Tls,
}

impl ProtocolHint {
    pub fn as_raw(self) -> u8 {
        match self {
            ProtocolHint::None => proto_hint::NONE,
            ProtocolHint::Http => proto_hint::HTTP,
            ProtocolHint::Grpc => proto_hint::GRPC,
            ProtocolHint::Kafka => proto_hint::KAFKA,
            ProtocolHint::Tls => proto_hint::TLS,
        }
    }

    pub fn from_raw(raw: u8) -> Self {
        match raw {
            proto_hint::HTTP => ProtocolHint::Http,
            proto_hint::GRPC => ProtocolHint::Grpc,
            proto_hint::KAFKA => ProtocolHint::Kafka,
            proto_hint::TLS => ProtocolHint::Tls,
            _ => ProtocolHint::None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Allow,
    Deny,
    /// Allowed at L4, through the proxy for L7 rules or TLS.
    Redirect(ProtocolHint),
}

/// What one rule says about the connections it covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Verdict {
    pub action: Action,
    /// The policy that made this rule (flows and events name it).
    pub policy_id: u32,
    /// A deny of an audit-mode policy is reported, not enforced.
    pub audit: bool,
}

impl Verdict {
    /// [`fold`] order: enforced deny > redirect > audited deny > allow.
    fn rank(&self) -> u8 {
        match (self.action, self.audit) {
            (Action::Deny, false) => 3,
            (Action::Redirect(_), _) => 2,
            (Action::Deny, true) => 1,
            (Action::Allow, _) => 0,
        }
    }

    fn to_value(self) -> PolicyValue {
        let (act, hint) = match self.action {
            Action::Allow => (action::ALLOW, 0),
            Action::Deny => (action::DENY, 0),
            Action::Redirect(h) => (action::REDIRECT, h.as_raw()),
        };
        PolicyValue {
            action: act,
            flags: if self.audit && self.action == Action::Deny { POLICY_FLAG_AUDIT } else { 0 },
            proto_hint: hint,
            _pad: 0,
            policy_id: self.policy_id,
        }
    }
}

/// One L4 rule for one endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyRule {
    pub endpoint_id: u32,
    pub direction: Direction,
    pub protocol: Protocol,
    /// [`identity::ANY`] for every peer.
    pub peer_identity: u32,
    /// Inclusive; `0..=65535` for every port.
    pub ports: (u16, u16),
    pub verdict: Verdict,
}

/// A workload the policy knows: its cgroup and what the policy made of its labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointEntry {
    pub cgroup_id: u64,
    pub endpoint_id: u32,
    pub identity: u32,
    pub egress_enforced: bool,
    pub ingress_enforced: bool,
    /// Only audit-mode policies select it in that direction: default deny is reported only.
    pub egress_audit: bool,
    pub ingress_audit: bool,
}

/// Everything one policy generation puts in the kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicySnapshot {
    pub endpoints: Vec<EndpointEntry>,
    /// Address prefixes and the identity of the peers behind them (CIDR groups, `host`).
    pub ipcache: Vec<(IpNet, u32)>,
    pub rules: Vec<PolicyRule>,
}

/// One LPM entry of the policy map, before the generation is added.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortPrefixEntry {
    pub endpoint_id: u32,
    pub direction: u8,
    pub protocol: u8,
    pub peer_identity: u32,
    pub port: u16,
    /// Significant bits of `port` (0..=16).
    pub bits: u8,
    pub value: PolicyValue,
}

type Group = (u32, Direction, Protocol, u32);

/// The L4 fold: of the verdicts of every rule covering a connection on one side, the one that
/// decides it (enforced deny > redirect > audited deny > allow; among equals the lowest policy
/// id, which flows name). `None`: no rule covers it, the direction's default applies. The
/// kernel gets it precomputed ([`expand_rules`]); userspace calls it through
/// [`PolicySnapshot::verdict`].
pub fn fold(verdicts: impl IntoIterator<Item = Verdict>) -> Option<Verdict> {
    verdicts.into_iter().max_by_key(|v| (v.rank(), std::cmp::Reverse(v.policy_id)))
}

/// Expands rules into non-overlapping port prefixes carrying folded verdicts.
pub fn expand_rules(rules: &[PolicyRule]) -> Vec<PortPrefixEntry> {
    let mut groups: BTreeMap<Group, Vec<&PolicyRule>> = BTreeMap::new();
    for rule in rules {
        groups.entry((rule.endpoint_id, rule.direction, rule.protocol, rule.peer_identity)).or_default().push(rule);
    }
    // Wildcard-peer rules also apply inside every exact-peer group of the same subject.
    let wildcard: BTreeMap<(u32, Direction, Protocol), Vec<&PolicyRule>> =
        rules.iter().filter(|r| r.peer_identity == identity::ANY).fold(BTreeMap::new(), |mut m, r| {
            m.entry((r.endpoint_id, r.direction, r.protocol)).or_insert_with(Vec::new).push(r);
            m
        });

    let mut out = Vec::new();
    for ((endpoint_id, direction, protocol, peer), mut group) in groups {
        if peer != identity::ANY {
            if let Some(extra) = wildcard.get(&(endpoint_id, direction, protocol)) {
                group.extend(extra.iter().copied());
            }
        }
        for (lo, hi, verdict) in fold_intervals(&group) {
            for (port, bits) in range_to_prefixes(lo, hi) {
                out.push(PortPrefixEntry {
                    endpoint_id,
                    direction: direction_raw(direction),
                    protocol: protocol.as_raw(),
                    peer_identity: peer,
                    port,
                    bits,
                    value: verdict.to_value(),
                });
            }
        }
    }
    out
}

/// Cuts the port space at every rule boundary and folds the rules covering each piece.
fn fold_intervals(rules: &[&PolicyRule]) -> Vec<(u16, u16, Verdict)> {
    let mut cuts: Vec<u32> = Vec::with_capacity(rules.len() * 2);
    for r in rules {
        cuts.push(u32::from(r.ports.0));
        cuts.push(u32::from(r.ports.1) + 1);
    }
    cuts.sort_unstable();
    cuts.dedup();
    let mut out: Vec<(u16, u16, Verdict)> = Vec::new();
    for pair in cuts.windows(2) {
        let (lo, hi) = (pair[0], pair[1] - 1);
        let covering = rules.iter().filter(|r| u32::from(r.ports.0) <= lo && hi <= u32::from(r.ports.1));
        let Some(best) = fold(covering.map(|r| r.verdict)) else { continue };
        match out.last_mut() {
            // Merge neighbours with the same verdict into fewer prefixes.
            Some(last) if u32::from(last.1) + 1 == lo && last.2 == best => last.1 = hi as u16,
            _ => out.push((lo as u16, hi as u16, best)),
        }
    }
    out
}

/// The minimal set of (value, prefix bits) covering `lo..=hi` in a 16-bit space.
pub fn range_to_prefixes(lo: u16, hi: u16) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let mut start = u32::from(lo);
    let end = u32::from(hi);
    while start <= end {
        // Largest aligned block starting at `start` that stays within `end`.
        let mut size_bits = if start == 0 { 16 } else { start.trailing_zeros().min(16) };
        while start + (1u32 << size_bits) - 1 > end {
            size_bits -= 1;
        }
        out.push((start as u16, (16 - size_bits) as u8));
        start += 1u32 << size_bits;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The house's one Direction is written to the maps with the kernel's own constants.
    #[test]
    fn the_one_direction_is_written_with_the_kernels_encoding() {
        assert_eq!(direction_raw(Direction::Egress), redirector_common::DIRECTION_EGRESS);
        assert_eq!(direction_raw(Direction::Ingress), redirector_common::DIRECTION_INGRESS);
        assert_ne!(redirector_common::DIRECTION_EGRESS, redirector_common::DIRECTION_INGRESS);
    }

    fn rule(peer: u32, ports: (u16, u16), action: Action, policy_id: u32) -> PolicyRule {
        PolicyRule {
            endpoint_id: 1,
            direction: Direction::Egress,
            protocol: Protocol::Tcp,
            peer_identity: peer,
            ports,
            verdict: Verdict { action, policy_id, audit: false },
        }
    }

    #[test]
    fn ranges_become_minimal_prefixes() {
        assert_eq!(range_to_prefixes(0, 65535), vec![(0, 0)]);
        assert_eq!(range_to_prefixes(80, 80), vec![(80, 16)]);
        assert_eq!(range_to_prefixes(8000, 8003), vec![(8000, 14)]);
        assert_eq!(range_to_prefixes(1, 3), vec![(1, 16), (2, 15)]);
        let many = range_to_prefixes(1024, 65535);
        assert_eq!(many, vec![(1024, 6), (2048, 5), (4096, 4), (8192, 3), (16384, 2), (32768, 1)]);
    }

    #[test]
    fn deny_wins_over_a_narrower_allow() {
        let rules = [rule(identity::ANY, (0, 65535), Action::Deny, 1), rule(identity::ANY, (80, 80), Action::Allow, 2)];
        let entries = expand_rules(&rules);
        assert!(entries.iter().all(|e| e.value.action == action::DENY));
        assert_eq!(entries.len(), 1, "one /0 deny, no hole for port 80: {entries:?}");
    }

    #[test]
    fn wildcard_rules_fold_into_exact_peer_groups() {
        let rules = [
            rule(identity::ANY, (8080, 8080), Action::Redirect(ProtocolHint::Http), 1),
            rule(300, (8000, 8100), Action::Allow, 2),
        ];
        let entries = expand_rules(&rules);
        let exact_8080 = entries
            .iter()
            .find(|e| e.peer_identity == 300 && e.bits == 16 && e.port == 8080)
            .expect("exact peer keeps the redirect for 8080");
        assert_eq!(exact_8080.value.action, action::REDIRECT);
        assert_eq!(exact_8080.value.proto_hint, proto_hint::HTTP);
        let covered: u32 = entries.iter().filter(|e| e.peer_identity == 300).map(|e| 1u32 << (16 - e.bits)).sum();
        assert_eq!(covered, 101, "8000..=8100 covered exactly once");
    }

    /// The kernel's lookup of the expanded entries: the longest port prefix for the exact peer,
    /// else for the wildcard peer.
    fn kernel_lookup(entries: &[PortPrefixEntry], peer: u32, port: u16) -> Option<PolicyValue> {
        let longest = |p: u32| {
            entries
                .iter()
                .filter(|e| e.peer_identity == p && (e.bits == 0 || (port ^ e.port) >> (16 - e.bits) == 0))
                .max_by_key(|e| e.bits)
                .map(|e| e.value)
        };
        longest(peer).or_else(|| longest(identity::ANY))
    }

    #[test]
    fn expanded_entries_give_the_fold_of_every_covering_rule() {
        let mut seed = 0x2545_f491_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let endpoint = EndpointEntry {
            cgroup_id: 1,
            endpoint_id: 1,
            identity: 300,
            egress_enforced: true,
            ingress_enforced: false,
            egress_audit: false,
            ingress_audit: false,
        };
        for _ in 0..200 {
            let rules: Vec<PolicyRule> = (0..1 + next() % 6)
                .map(|i| {
                    let lo = (next() % 120) as u16;
                    let action = match next() % 4 {
                        0 => Action::Allow,
                        1 => Action::Deny,
                        _ => Action::Redirect(ProtocolHint::Http),
                    };
                    let mut r = rule(
                        [identity::ANY, 300, 301][(next() % 3) as usize],
                        (lo, lo + (next() % 40) as u16),
                        action,
                        i as u32 + 1,
                    );
                    r.verdict.audit = next() % 5 == 0;
                    r
                })
                .collect();
            let snap = PolicySnapshot { endpoints: vec![endpoint], ipcache: Vec::new(), rules: rules.clone() };
            let entries = expand_rules(&rules);
            for peer in [300, 301, 302] {
                for port in 0..170 {
                    let want = match snap.verdict(&endpoint, Direction::Egress, Protocol::Tcp, peer, port) {
                        Decision::Deny { policy_id: 0 } => None,
                        Decision::Allow => Some((action::ALLOW, 0)),
                        Decision::Deny { .. } => Some((action::DENY, 0)),
                        Decision::Audit => Some((action::DENY, POLICY_FLAG_AUDIT)),
                        Decision::Redirect(_) => Some((action::REDIRECT, 0)),
                    };
                    let got = kernel_lookup(&entries, peer, port).map(|v| (v.action, v.flags));
                    assert_eq!(got, want, "peer {peer} port {port} rules {rules:?}");
                }
            }
        }
    }

    #[test]
    fn a_deny_on_either_side_wins_then_a_redirect() {
        let j = |egress, ingress| Judgement { egress, ingress }.decision();
        let deny = Some(Decision::Deny { policy_id: 4 });
        let redirect = Some(Decision::Redirect(ProtocolHint::Grpc));
        assert_eq!(j(redirect, deny), Decision::Deny { policy_id: 4 });
        assert_eq!(j(Some(Decision::Deny { policy_id: 1 }), deny), Decision::Deny { policy_id: 1 }, "egress first");
        assert_eq!(j(Some(Decision::Audit), redirect), Decision::Redirect(ProtocolHint::Grpc));
        assert_eq!(j(Some(Decision::Allow), Some(Decision::Audit)), Decision::Audit);
        assert_eq!(j(None, None), Decision::Allow);
    }

    #[test]
    fn audited_deny_is_flagged_and_loses_to_redirect() {
        let mut audited = rule(identity::ANY, (0, 65535), Action::Deny, 7);
        audited.verdict.audit = true;
        let entries = expand_rules(&[audited.clone()]);
        assert_eq!(entries[0].value.flags, POLICY_FLAG_AUDIT);
        let entries = expand_rules(&[audited, rule(identity::ANY, (443, 443), Action::Redirect(ProtocolHint::Tls), 8)]);
        let at_443 = entries.iter().find(|e| e.port == 443 && e.bits == 16).unwrap();
        assert_eq!(at_443.value.action, action::REDIRECT);
    }
}

/// The identity the kernel's ipcache lookup gives `ip`: the most specific prefix, else `host`
/// for loopback, else `world`. (Userspace mirrors of the kernel's lookup call this.)
pub fn identity_in(ipcache: &[(IpNet, u32)], ip: std::net::IpAddr) -> u32 {
    let ip = match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4).unwrap_or(std::net::IpAddr::V6(v6)),
        v4 => v4,
    };
    ipcache
        .iter()
        .filter(|(net, _)| net.contains(&ip))
        .max_by_key(|(net, _)| net.prefix_len())
        .map(|(_, id)| *id)
        .unwrap_or(if ip.is_loopback() { identity::HOST } else { identity::WORLD })
}

/// The kernel's decision for one side of a connection, computed in userspace from the same
/// snapshot (simulation, and finding established connections a new policy denies).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Allowed at L4 and carried by the proxy, which picks its stack from the hint when the
    /// connection starts (so a change of hint changes how an open connection would be carried).
    Redirect(ProtocolHint),
    Deny {
        /// 0: the direction's default deny.
        policy_id: u32,
    },
    /// Denied by an audit-mode policy (or its default deny): allowed, reported.
    Audit,
}

/// One connection as the kernel sees it: the source workload's egress is judged when the
/// source is a workload, the destination workload's ingress when the destination is one.
#[derive(Clone, Copy, Debug)]
pub struct Connection<'a> {
    pub src: Option<&'a EndpointEntry>,
    pub dst: Option<&'a EndpointEntry>,
    pub protocol: Protocol,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub port: u16,
}

/// Both sides' decisions for one [`Connection`] (`None`: that side is not a workload).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Judgement {
    pub egress: Option<Decision>,
    pub ingress: Option<Decision>,
}

impl Judgement {
    /// What happens to the connection: a deny on either side (the egress side's first) wins,
    /// then a redirect (the proxy carries it), then an audited deny, else allow.
    pub fn decision(&self) -> Decision {
        let sides = [self.egress, self.ingress];
        let sides = sides.iter().flatten();
        let first = |pick: fn(&Decision) -> bool| sides.clone().find(|d| pick(d)).copied();
        first(|d| matches!(d, Decision::Deny { .. }))
            .or_else(|| first(|d| matches!(d, Decision::Redirect(_))))
            .or_else(|| first(|d| *d == Decision::Audit))
            .unwrap_or(Decision::Allow)
    }
}

impl PolicySnapshot {
    /// The identity the kernel gives `ip` (before the local-listener step).
    pub fn identity_of(&self, ip: std::net::IpAddr) -> u32 {
        identity_in(&self.ipcache, ip)
    }

    /// The decision for `endpoint` in `direction` towards/from `peer` on `port`: the [`fold`]
    /// of every rule covering it (which is what the kernel's exact-peer-then-wildcard lookup
    /// of the expanded entries yields), else the direction's default.
    pub fn verdict(
        &self,
        endpoint: &EndpointEntry,
        direction: Direction,
        protocol: Protocol,
        peer: u32,
        port: u16,
    ) -> Decision {
        let covering = self.rules.iter().filter(|r| {
            r.endpoint_id == endpoint.endpoint_id
                && r.direction == direction
                && r.protocol == protocol
                && (r.peer_identity == peer || r.peer_identity == identity::ANY)
                && r.ports.0 <= port
                && port <= r.ports.1
        });
        match fold(covering.map(|r| r.verdict)) {
            Some(v) => match (v.action, v.audit) {
                (Action::Deny, false) => Decision::Deny { policy_id: v.policy_id },
                (Action::Deny, true) => Decision::Audit,
                (Action::Redirect(hint), _) => Decision::Redirect(hint),
                (Action::Allow, _) => Decision::Allow,
            },
            None => {
                let (enforced, audit) = match direction {
                    Direction::Egress => (endpoint.egress_enforced, endpoint.egress_audit),
                    Direction::Ingress => (endpoint.ingress_enforced, endpoint.ingress_audit),
                };
                if enforced {
                    Decision::Deny { policy_id: 0 }
                } else if audit {
                    Decision::Audit
                } else {
                    Decision::Allow
                }
            }
        }
    }

    /// Both sides of `conn`, as the kernel's connect (egress) and its local-listener step
    /// (ingress) judge them.
    pub fn judge(&self, conn: &Connection<'_>) -> Judgement {
        let side = |ep: Option<&EndpointEntry>, direction, peer| {
            ep.map(|ep| self.verdict(ep, direction, conn.protocol, peer, conn.port))
        };
        Judgement {
            egress: side(conn.src, Direction::Egress, conn.dst_identity),
            ingress: side(conn.dst, Direction::Ingress, conn.src_identity),
        }
    }
}

//! The compiler: (validated policies, registered workloads, the node's addresses) -> the
//! redirector's map entries and the proxy's rule tables, with Cilium's semantics:
//!
//! - a direction is default-allow until a policy selects the workload in it (an `ingress` /
//!   `ingressDeny` section, unless `enableDefaultDeny` says otherwise), then default-deny;
//! - allow rules add up; deny rules win; an L7 rule list on a port allows only matching
//!   requests from the peers it names, and an L3/L4 allow of the same peer and port allows all
//!   its requests (the proxy table gets an allow-all entry for it);
//! - a rule with `toPorts` and no peer selector applies to every peer; `{}` selects nothing;
//! - CIDR selectors select the identities of every policy prefix inside them and outside their
//!   `except`s (each prefix is its own identity, so the kernel's longest-prefix match decides);
//!   they never select this node's own addresses, which are `host`.
//!
//! Ports with L7 rules or TLS settings are redirected to the proxy; the rest is enforced in the
//! kernel. The result is a value: applying it is one generation flip in the redirector.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use l7mesh_api::tables::{self, Published};
use redirector_policy::{
    identity, Action, Direction, EndpointEntry, PolicyRule, PolicySnapshot, Protocol, ProtocolHint, Verdict,
};
use serde::Serialize;

use crate::labels::{Labels, Matcher};
use crate::model::{self, PortRule, Selector};

use crate::validate::{parse_cidr, parse_port, LoadedPolicy};
/// The proxy's tables are the published contract's types (one definition for writer and reader).
pub use l7mesh_api::tables::{Peers, ProxyRule, WorkloadInfo, L7};

/// Identities of CIDR prefixes start here (workloads count up from `identity::FIRST_ALLOCATED`).
pub const CIDR_IDENTITY_BASE: u32 = 1 << 24;

/// A workload as the registry knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Workload {
    pub name: String,
    pub labels: Labels,
    pub cgroup_id: u64,
}

/// What an identity stands for (flows and `get` show it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum IdentityInfo {
    Reserved {
        name: &'static str,
    },
    Workload {
        name: String,
        namespace: String,
        labels: String,
    },
    /// Another node of the cluster (its addresses).
    Node {
        name: String,
    },
    Cidr {
        prefix: IpNet,
    },
}

/// One compiled policy version: the tables the proxy gets, and what only policy-api needs.
#[derive(Clone, Debug)]
pub struct Compiled {
    /// What the policy stream carries to l7proxy; dry runs and simulation judge with the same
    /// value, so what they judge with is what the proxy loads.
    pub published: Published,
    /// The kernel's maps.
    pub snapshot: PolicySnapshot,
    pub identities: BTreeMap<u32, IdentityInfo>,
    pub warnings: Vec<String>,
    /// Contradictions between policies (a set with any is refused).
    pub conflicts: Vec<String>,
}

impl Compiled {
    pub fn endpoint_by_cgroup(&self, cgroup_id: u64) -> Option<&EndpointEntry> {
        self.snapshot.endpoints.iter().find(|e| e.cgroup_id == cgroup_id)
    }
}

#[derive(Default)]
struct Enforcement {
    egress: bool,
    ingress: bool,
    egress_audit: bool,
    ingress_audit: bool,
    /// The policies that select the workload in each direction (audit ones too), in order.
    egress_by: Vec<String>,
    ingress_by: Vec<String>,
}

/// The ids the kernel reports: one per rule (`toPorts` entry) of each policy, so that a kernel
/// verdict names the very rule that made it. Numbered in policy order, so the kernel's "lowest
/// id among equal verdicts" still picks the first policy (then its first rule).
#[derive(Default)]
struct RuleIds {
    ids: BTreeMap<(String, String), u32>,
    policy_ids: BTreeMap<u32, String>,
    rule_ids: BTreeMap<u32, tables::RuleRef>,
}

impl RuleIds {
    fn id(&mut self, policy: &str, rule: &str, direction: Direction, deny: bool) -> u32 {
        let key = (policy.to_string(), rule.to_string());
        if let Some(id) = self.ids.get(&key) {
            return *id;
        }
        let id = self.ids.len() as u32 + 1;
        self.ids.insert(key, id);
        self.policy_ids.insert(id, policy.to_string());
        self.rule_ids.insert(id, tables::RuleRef { rule: rule.to_string(), direction, deny });
        id
    }
}

/// A rule's field path in its document: `spec.` is left out (most policies have one spec).
fn rule_path(spec: &str, list: &str, index: usize) -> String {
    match spec {
        "spec" => format!("{list}[{index}]"),
        specs => format!("{specs}.{list}[{index}]"),
    }
}

fn push_once(list: &mut Vec<String>, key: &str) {
    if !list.iter().any(|k| k == key) {
        list.push(key.to_string());
    }
}

/// Compiles `policies` for `workloads` on a node whose own addresses are `host_prefixes`.
/// Other nodes' workloads (peers a policy here may name by labels) and the other nodes (their
/// addresses, and whether they serve the tunnel), as the cluster's kvstore lists them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterView {
    /// This node's name.
    pub this_node: String,
    pub workloads: Vec<RemoteWorkload>,
    pub nodes: Vec<tables::RemoteNode>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RemoteWorkload {
    pub node: String,
    pub name: String,
    pub labels: Labels,
}

/// The identities of other nodes (their addresses in the ipcache): one per node, from here.
pub const NODE_IDENTITY_BASE: u32 = 1 << 23;

/// The cgroup id a workload of another node goes by in the proxy's tables: stable across
/// versions (a tunnelled connection resolves it again in each), never a local cgroup's (the
/// top bit set; kernfs ids are far below it).
pub fn remote_cgroup_id(node: &str, name: &str) -> u64 {
    // FNV-1a over "node/name": a fixed function of the names, the same on every version.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in node.bytes().chain(std::iter::once(b'/')).chain(name.bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h | (1 << 63)
}

pub fn compile(policies: &[LoadedPolicy], workloads: &[Workload], host_prefixes: &[IpNet], version: u64) -> Compiled {
    compile_in_cluster(policies, workloads, None, host_prefixes, version)
}

/// [`compile`] on a node of a cluster: other nodes' workloads are peers policies may select by
/// labels (judged by this node's proxy when their connections arrive through the tunnel),
/// other nodes' addresses are identities of their own, and this node's workloads whose egress
/// no policy enforces are carried to nodes that serve the tunnel through this node's proxy.
pub fn compile_in_cluster(
    policies: &[LoadedPolicy],
    workloads: &[Workload],
    cluster: Option<&ClusterView>,
    host_prefixes: &[IpNet],
    version: u64,
) -> Compiled {
    let mut warnings = Vec::new();
    let mut workloads: Vec<&Workload> = workloads.iter().collect();
    workloads.sort_by(|a, b| a.name.cmp(&b.name));
    let mut identities = BTreeMap::new();
    identities.insert(identity::HOST, IdentityInfo::Reserved { name: "host" });
    identities.insert(identity::WORLD, IdentityInfo::Reserved { name: "world" });
    let endpoint_id = |i: usize| i as u32 + 1;
    let workload_identity = |i: usize| identity::FIRST_ALLOCATED + i as u32;
    for (i, w) in workloads.iter().enumerate() {
        identities.insert(
            workload_identity(i),
            IdentityInfo::Workload {
                name: w.name.clone(),
                namespace: w.labels.namespace().to_string(),
                labels: w.labels.display(),
            },
        );
    }

    let remote: Vec<&RemoteWorkload> = cluster.map(|c| c.workloads.iter().collect()).unwrap_or_default();
    let remote_identity = |j: usize| identity::FIRST_ALLOCATED + (workloads.len() + j) as u32;
    for (j, w) in remote.iter().enumerate() {
        identities.insert(
            remote_identity(j),
            IdentityInfo::Workload {
                name: format!("{}/{}", w.node, w.name),
                namespace: w.labels.namespace().to_string(),
                labels: w.labels.display(),
            },
        );
    }
    // Other nodes' addresses, as their records in the kvstore say: only addresses that can be
    // another host's (not loopback, link-local, multicast or unspecified, not this node's, not
    // claimed by two nodes at once: a node record could otherwise turn any address into a
    // node and every policy's CIDR into nothing for it).
    let mut nodes: Vec<tables::RemoteNode> = cluster.map(|c| c.nodes.clone()).unwrap_or_default();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    let mut claimed: BTreeMap<std::net::IpAddr, usize> = BTreeMap::new();
    for n in &nodes {
        for ip in &n.addresses {
            *claimed.entry(*ip).or_default() += 1;
        }
    }
    for n in &mut nodes {
        let name = n.name.clone();
        n.addresses.retain(|ip| {
            let bad = ip.is_loopback()
                || ip.is_unspecified()
                || ip.is_multicast()
                || match ip {
                    std::net::IpAddr::V4(v4) => v4.is_link_local() || v4.is_broadcast(),
                    std::net::IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
                }
                || host_prefixes.iter().any(|h| h.contains(ip))
                || claimed.get(ip).copied().unwrap_or(0) > 1;
            if bad {
                warnings.push(format!(
                    "node {name} lists address {ip}, which cannot be another node's; it is not taken as node {name}"
                ));
            }
            !bad
        });
    }
    let node_identity = |k: usize| NODE_IDENTITY_BASE + k as u32;
    for (k, n) in nodes.iter_mut().enumerate() {
        n.identity = node_identity(k);
        identities.insert(node_identity(k), IdentityInfo::Node { name: n.name.clone() });
    }
    let nodes: Vec<&tables::RemoteNode> = nodes.iter().collect();
    let node_addrs: Vec<(std::net::IpAddr, u32)> =
        nodes.iter().flat_map(|n| n.addresses.iter().map(move |ip| (*ip, n.identity))).collect();

    // Every prefix any policy names gets an identity; host addresses stay `host`.
    let mut prefixes: BTreeSet<IpNet> = BTreeSet::new();
    for p in policies {
        for (_, rule) in p.doc.rules() {
            for r in rule.ingress.iter().flatten().chain(rule.ingress_deny.iter().flatten()) {
                collect_prefixes(&r.from_cidr, &r.from_cidr_set, &mut prefixes);
            }
            for r in rule.egress.iter().flatten().chain(rule.egress_deny.iter().flatten()) {
                collect_prefixes(&r.to_cidr, &r.to_cidr_set, &mut prefixes);
            }
        }
    }
    let mut cidr_identity: BTreeMap<IpNet, u32> = BTreeMap::new();
    for net in prefixes {
        if host_prefixes.iter().any(|h| h.contains(&net)) {
            warnings.push(format!("CIDR {net} is inside this node's own addresses, which are the `host` entity; CIDR rules never select them"));
            continue;
        }
        let id = CIDR_IDENTITY_BASE + cidr_identity.len() as u32;
        cidr_identity.insert(net, id);
        identities.insert(id, IdentityInfo::Cidr { prefix: net });
    }
    let mut ipcache: Vec<(IpNet, u32)> = host_prefixes.iter().map(|h| (h.trunc(), identity::HOST)).collect();
    ipcache.extend(cidr_identity.iter().map(|(n, id)| (*n, *id)));
    for n in &nodes {
        for ip in &n.addresses {
            let net = IpNet::from(*ip);
            // A policy's own CIDR of exactly this address keeps its entry (the CIDR's selectors
            // name the node's identity too, below).
            if !cidr_identity.contains_key(&net) {
                ipcache.push((net, n.identity));
            }
        }
    }

    let mut policies: Vec<&LoadedPolicy> = policies.iter().collect();
    policies.sort_by_key(|p| p.doc.key());
    let mut ids = RuleIds::default();
    let mut rules = Vec::new();
    let mut proxy_rules = Vec::new();
    let mut enforcement: Vec<Enforcement> = workloads.iter().map(|_| Enforcement::default()).collect();

    let ctx = Ctx {
        workloads: &workloads,
        remote: &remote,
        remote_base: identity::FIRST_ALLOCATED + workloads.len() as u32,
        cidr_identity: &cidr_identity,
        node_addrs: &node_addrs,
    };
    for policy in policies.iter() {
        let key = policy.doc.key();
        let audit = policy.doc.audit();
        let ns = policy.doc.namespace();
        for (path, rule) in policy.doc.rules() {
            let Some(selector) = &rule.endpoint_selector else { continue };
            let matcher = Matcher::new(selector, ns);
            let selected: Vec<usize> =
                (0..workloads.len()).filter(|&i| matcher.matches(&workloads[i].labels)).collect();
            if selected.is_empty() {
                warnings.push(format!(
                    "{} ({}:{}): {path}.endpointSelector selects no workload",
                    key, policy.file, policy.line
                ));
            }
            let default_deny = rule.enable_default_deny.clone().unwrap_or_default();
            for &i in &selected {
                let ep = endpoint_id(i);
                let e = &mut enforcement[i];
                if (rule.ingress.is_some() || rule.ingress_deny.is_some()) && default_deny.ingress != Some(false) {
                    push_once(&mut e.ingress_by, &key);
                    if audit {
                        e.ingress_audit = true
                    } else {
                        e.ingress = true
                    }
                }
                if (rule.egress.is_some() || rule.egress_deny.is_some()) && default_deny.egress != Some(false) {
                    push_once(&mut e.egress_by, &key);
                    if audit {
                        e.egress_audit = true
                    } else {
                        e.egress = true
                    }
                }
                let meta = RuleMeta { endpoint: &workloads[i].name, endpoint_id: ep, policy: &key, audit };
                for (deny, name, list) in [(false, "ingress", &rule.ingress), (true, "ingressDeny", &rule.ingress_deny)]
                {
                    for (ri, r) in list.iter().flatten().enumerate() {
                        let peers = ctx.peers(
                            &r.from_endpoints,
                            &r.from_cidr,
                            &r.from_cidr_set,
                            &r.from_entities,
                            r.to_ports.is_some(),
                            ns,
                        );
                        let peers = ctx.authenticated(peers, &r.authentication);
                        let at = rule_path(&path, name, ri);
                        emit(
                            &meta,
                            &at,
                            Direction::Ingress,
                            deny,
                            &peers,
                            &r.to_ports,
                            &mut ids,
                            &mut rules,
                            &mut proxy_rules,
                        );
                    }
                }
                for (deny, name, list) in [(false, "egress", &rule.egress), (true, "egressDeny", &rule.egress_deny)] {
                    for (ri, r) in list.iter().flatten().enumerate() {
                        let peers = ctx.peers(
                            &r.to_endpoints,
                            &r.to_cidr,
                            &r.to_cidr_set,
                            &r.to_entities,
                            r.to_ports.is_some(),
                            ns,
                        );
                        let peers = ctx.authenticated(peers, &r.authentication);
                        let at = rule_path(&path, name, ri);
                        emit(
                            &meta,
                            &at,
                            Direction::Egress,
                            deny,
                            &peers,
                            &r.to_ports,
                            &mut ids,
                            &mut rules,
                            &mut proxy_rules,
                        );
                    }
                }
            }
        }
    }

    let endpoints = workloads
        .iter()
        .enumerate()
        .map(|(i, w)| EndpointEntry {
            cgroup_id: w.cgroup_id,
            endpoint_id: endpoint_id(i),
            identity: workload_identity(i),
            egress_enforced: enforcement[i].egress,
            ingress_enforced: enforcement[i].ingress,
            egress_audit: enforcement[i].egress_audit && !enforcement[i].egress,
            ingress_audit: enforcement[i].ingress_audit && !enforcement[i].ingress,
        })
        .collect();
    // The tunnel: every workload reaches the other nodes that serve it through this node's
    // proxy, which asks the far node who listens where the connection goes, judges the
    // workload's egress rules for that workload (the kernel sees only the node's address, which
    // all its workloads share: a rule naming one of them cannot be judged here), and carries
    // what they allow as the workload (the far node judges its ingress by the identity the
    // tunnel proves). A deny of the node's address itself (a CIDR) still wins in the kernel.
    // (The identities the kernel gives the nodes' addresses: the node's, or a policy's CIDR of
    // exactly that address, which keeps its own.)
    let tunnel_peers: BTreeSet<u32> = nodes
        .iter()
        .filter(|n| n.tunnel_port.is_some())
        .flat_map(|n| n.addresses.iter().map(|ip| redirector_policy::identity_in(&ipcache, *ip)))
        .collect();
    for (i, _) in workloads.iter().enumerate() {
        for &peer_identity in &tunnel_peers {
            rules.push(PolicyRule {
                endpoint_id: endpoint_id(i),
                direction: Direction::Egress,
                protocol: Protocol::Tcp,
                peer_identity,
                ports: (1, 65535),
                verdict: Verdict { action: Action::Redirect(ProtocolHint::None), policy_id: 0, audit: false },
            });
        }
    }
    let cluster_tables = cluster.map(|view| {
        let mut remote_ids: BTreeSet<u32> = (0..remote.len()).map(remote_identity).collect();
        remote_ids.extend(nodes.iter().map(|n| n.identity));
        // The policy's own rules (not the tunnel's redirects, policy id 0) that can name what
        // is on another node.
        let l4_rules = |direction: Direction| -> Vec<tables::L4Rule> {
            rules
                .iter()
                .filter(|r| r.direction == direction && r.protocol == Protocol::Tcp)
                .filter(|r| !(direction == Direction::Egress && r.verdict.policy_id == 0))
                .filter(|r| r.peer_identity == identity::ANY || remote_ids.contains(&r.peer_identity))
                .map(|r| tables::L4Rule {
                    endpoint_id: r.endpoint_id,
                    peer: r.peer_identity,
                    ports: r.ports,
                    action: match r.verdict.action {
                        Action::Allow => tables::L4Action::Allow,
                        Action::Deny => tables::L4Action::Deny,
                        Action::Redirect(_) => tables::L4Action::Redirect,
                    },
                    policy_id: r.verdict.policy_id,
                    audit: r.verdict.audit,
                })
                .collect()
        };
        tables::ClusterTables {
            this_node: view.this_node.clone(),
            nodes: nodes.iter().map(|n| (*n).clone()).collect(),
            ingress: l4_rules(Direction::Ingress),
            ingress_defaults: (0..workloads.len())
                .map(|i| {
                    (endpoint_id(i), enforcement[i].ingress, enforcement[i].ingress_audit && !enforcement[i].ingress)
                })
                .collect(),
            egress: l4_rules(Direction::Egress),
            egress_defaults: (0..workloads.len())
                .map(|i| (endpoint_id(i), enforcement[i].egress, enforcement[i].egress_audit && !enforcement[i].egress))
                .collect(),
        }
    });
    let remote_infos: Vec<WorkloadInfo> = remote
        .iter()
        .enumerate()
        .map(|(j, w)| WorkloadInfo {
            cgroup_id: remote_cgroup_id(&w.node, &w.name),
            node: w.node.clone(),
            endpoint_id: 0,
            identity: remote_identity(j),
            name: w.name.clone(),
            namespace: w.labels.namespace().to_string(),
            labels: w.labels.entries.iter().map(|(k, (_, v))| (k.clone(), v.clone())).collect(),
            egress_enforced_by: Vec::new(),
            ingress_enforced_by: Vec::new(),
        })
        .collect();
    let workloads = workloads
        .iter()
        .enumerate()
        .map(|(i, w)| WorkloadInfo {
            node: String::new(),
            cgroup_id: w.cgroup_id,
            endpoint_id: endpoint_id(i),
            identity: workload_identity(i),
            name: w.name.clone(),
            namespace: w.labels.namespace().to_string(),
            labels: w.labels.entries.iter().map(|(k, (_, v))| (k.clone(), v.clone())).collect(),
            egress_enforced_by: enforcement[i].egress_by.clone(),
            ingress_enforced_by: enforcement[i].ingress_by.clone(),
        })
        .chain(remote_infos)
        .collect();
    // L7 rules next to serverNames without terminatingTLS or originatingTLS judge traffic the
    // proxy cannot read: it closes such connections (fail closed); say so once per policy and port.
    let mut tls_ports = BTreeSet::new();
    for r in &proxy_rules {
        let needs_tls_stack =
            r.terminating_tls.is_none() && r.originating_tls.is_none() && !r.server_names.is_empty() && r.l7 != L7::Tls;
        if needs_tls_stack && tls_ports.insert((r.policy.clone(), r.ports)) {
            let ports =
                if r.ports.0 == r.ports.1 { r.ports.0.to_string() } else { format!("{}-{}", r.ports.0, r.ports.1) };
            warnings.push(format!(
                "{}: port {ports} has L7 rules next to serverNames but neither terminatingTLS nor originatingTLS, so the proxy cannot read the traffic they judge; its connections are closed (fail-closed)",
                r.policy
            ));
        }
    }
    let conflicts = tls_conflicts(&proxy_rules);
    Compiled {
        published: Published {
            version,
            ipcache: ipcache.clone(),
            proxy_rules,
            policy_ids: ids.policy_ids,
            rule_ids: ids.rule_ids,
            workloads,
            cluster: cluster_tables,
        },
        snapshot: PolicySnapshot { endpoints, ipcache, rules },
        identities,
        warnings,
        conflicts,
    }
}

/// Rules that ask the proxy for two different things on one connection: different
/// `terminatingTLS` or `originatingTLS` secrets for the same workload, direction and port (one
/// connection can present one certificate and trust one CA). Such a set is refused whole.
fn tls_conflicts(rules: &[ProxyRule]) -> Vec<String> {
    let with_tls: Vec<&ProxyRule> =
        rules.iter().filter(|r| r.terminating_tls.is_some() || r.originating_tls.is_some()).collect();
    let mut out = BTreeSet::new();
    for (i, a) in with_tls.iter().enumerate() {
        for b in &with_tls[i + 1..] {
            if a.endpoint_id != b.endpoint_id
                || a.direction != b.direction
                || a.ports.1 < b.ports.0
                || b.ports.1 < a.ports.0
            {
                continue;
            }
            for (field, x, y) in [
                ("terminatingTLS", &a.terminating_tls, &b.terminating_tls),
                ("originatingTLS", &a.originating_tls, &b.originating_tls),
            ] {
                if let (Some(x), Some(y)) = (x, y) {
                    if x != y {
                        let port = a.ports.0.max(b.ports.0);
                        out.insert(format!(
                            "conflicting TLS settings: {} and {} give {} {field} with different secrets on {} port {port}",
                            a.policy,
                            b.policy,
                            a.endpoint,
                            tables::direction_word(a.direction)
                        ));
                    }
                }
            }
        }
    }
    out.into_iter().collect()
}

fn collect_prefixes(
    cidrs: &Option<Vec<String>>,
    sets: &Option<Vec<crate::model::CidrRule>>,
    out: &mut BTreeSet<IpNet>,
) {
    for c in cidrs.iter().flatten() {
        if let Ok(n) = parse_cidr(c) {
            out.insert(n.trunc());
        }
    }
    for s in sets.iter().flatten() {
        for c in s.cidr.iter().chain(s.except.iter()) {
            if let Ok(n) = parse_cidr(c) {
                out.insert(n.trunc());
            }
        }
    }
}

struct Ctx<'a> {
    workloads: &'a [&'a Workload],
    /// Other nodes' workloads: peers only.
    remote: &'a [&'a RemoteWorkload],
    remote_base: u32,
    cidr_identity: &'a BTreeMap<IpNet, u32>,
    /// Other nodes' addresses and their identities: a CIDR or `world` that covers one names
    /// that node too (as it did before the node was known).
    node_addrs: &'a [(std::net::IpAddr, u32)],
}

/// The peers of one rule: `None` means every peer.
type PeerSet = Option<BTreeSet<u32>>;

impl Ctx<'_> {
    /// `authentication: {mode: required}`: only the peers whose identity is proven, the
    /// workloads (this node's, by the kernel's cgroup; other nodes', by the tunnel's mutual
    /// TLS): never an address (a CIDR, `world`, `host`, another node's address).
    fn authenticated(&self, peers: PeerSet, authentication: &Option<serde_json::Value>) -> PeerSet {
        if !crate::validate::authentication_required(authentication) {
            return peers;
        }
        let local = (0..self.workloads.len()).map(|i| identity::FIRST_ALLOCATED + i as u32);
        let remote = (0..self.remote.len()).map(|j| self.remote_base + j as u32);
        let proven: BTreeSet<u32> = local.chain(remote).collect();
        Some(match peers {
            None => proven,
            Some(set) => set.intersection(&proven).copied().collect(),
        })
    }
}

impl Ctx<'_> {
    fn peers(
        &self,
        endpoints: &Option<Vec<Selector>>,
        cidrs: &Option<Vec<String>>,
        cidr_sets: &Option<Vec<crate::model::CidrRule>>,
        entities: &Option<Vec<String>>,
        has_ports: bool,
        namespace: Option<&str>,
    ) -> PeerSet {
        let any_selector = endpoints.is_some() || cidrs.is_some() || cidr_sets.is_some() || entities.is_some();
        if !any_selector {
            // `toPorts` alone: every peer on those ports. `{}`: nobody.
            return if has_ports { None } else { Some(BTreeSet::new()) };
        }
        let mut out = BTreeSet::new();
        for sel in endpoints.iter().flatten() {
            let m = Matcher::new(sel, namespace);
            if let Some(reserved) = m.reserved() {
                for name in reserved {
                    match name {
                        "host" => out.insert(identity::HOST),
                        _ => out.insert(identity::WORLD),
                    };
                }
                continue;
            }
            for (i, w) in self.workloads.iter().enumerate() {
                if m.matches(&w.labels) {
                    out.insert(identity::FIRST_ALLOCATED + i as u32);
                }
            }
            for (j, w) in self.remote.iter().enumerate() {
                if m.matches(&w.labels) {
                    out.insert(self.remote_base + j as u32);
                }
            }
        }
        let mut select_cidr = |net: IpNet, except: &[IpNet]| {
            for (prefix, id) in self.cidr_identity {
                if net.contains(prefix) && !except.iter().any(|e| e.contains(prefix)) {
                    out.insert(*id);
                }
            }
            for (ip, id) in self.node_addrs {
                if net.contains(ip) && !except.iter().any(|e| e.contains(ip)) {
                    out.insert(*id);
                }
            }
        };
        for c in cidrs.iter().flatten() {
            if let Ok(n) = parse_cidr(c) {
                select_cidr(n.trunc(), &[]);
            }
        }
        for s in cidr_sets.iter().flatten() {
            if let Some(Ok(n)) = s.cidr.as_deref().map(parse_cidr) {
                let except: Vec<IpNet> =
                    s.except.iter().filter_map(|e| parse_cidr(e).ok()).map(|n| n.trunc()).collect();
                select_cidr(n.trunc(), &except);
            }
        }
        for e in entities.iter().flatten() {
            match e.as_str() {
                "all" => return None,
                "host" => {
                    out.insert(identity::HOST);
                }
                "world" => {
                    out.insert(identity::WORLD);
                    out.extend(self.cidr_identity.values().copied());
                    out.extend(self.node_addrs.iter().map(|(_, id)| *id));
                }
                "cluster" => {
                    out.insert(identity::HOST);
                    out.extend((0..self.workloads.len()).map(|i| identity::FIRST_ALLOCATED + i as u32));
                    out.extend((0..self.remote.len()).map(|j| self.remote_base + j as u32));
                    out.extend(self.node_addrs.iter().map(|(_, id)| *id));
                }
                _ => {}
            }
        }
        Some(out)
    }
}

struct RuleMeta<'a> {
    endpoint: &'a str,
    endpoint_id: u32,
    policy: &'a str,
    audit: bool,
}

fn hint_of(pr: &PortRule) -> Option<(ProtocolHint, L7)> {
    let tls = pr.terminating_tls.is_some() || pr.originating_tls.is_some();
    let rules = pr.rules.as_ref();
    let l7 = if let Some(http) = rules.and_then(|r| r.http.as_ref()) {
        (ProtocolHint::Http, L7::Http { rules: http.iter().map(published_http).collect() })
    } else if let Some(kafka) = rules.and_then(|r| r.kafka.as_ref()) {
        (ProtocolHint::Kafka, L7::Kafka { rules: kafka.iter().map(published_kafka).collect() })
    } else if let Some(grpc) = rules.and_then(|r| r.grpc.as_ref()) {
        let rules = grpc.iter().map(|g| tables::GrpcRule { service: g.service.clone(), method: g.method.clone() });
        (ProtocolHint::Grpc, L7::Grpc { rules: rules.collect() })
    } else if tls || pr.server_names.is_some() {
        (ProtocolHint::Tls, L7::Tls)
    } else {
        return None;
    };
    // TLS comes first on the wire: the proxy's detection starts there.
    Some(if tls { (ProtocolHint::Tls, l7.1) } else { l7 })
}

// The policy language's rules as the tables carry them. (Fields validation refuses, such as
// `headerMatches.mismatch` or file-based TLS material, have no place in the tables.)
fn published_http(h: &model::HttpRule) -> tables::HttpRule {
    tables::HttpRule {
        method: h.method.clone(),
        path: h.path.clone(),
        host: h.host.clone(),
        headers: h.headers.clone(),
        header_matches: h
            .header_matches
            .iter()
            .map(|m| tables::HeaderMatch { name: m.name.clone(), value: m.value.clone() })
            .collect(),
    }
}

fn published_kafka(k: &model::KafkaRule) -> tables::KafkaRule {
    tables::KafkaRule {
        role: k.role.clone(),
        api_key: k.api_key.clone(),
        api_version: k.api_version.clone(),
        client_id: k.client_id.clone(),
        topic: k.topic.clone(),
    }
}

fn published_tls(tls: &Option<model::TlsContext>) -> Option<tables::TlsContext> {
    tls.as_ref().map(|t| tables::TlsContext {
        secret: t.secret.as_ref().map(|s| tables::SecretRef { namespace: s.namespace.clone(), name: s.name.clone() }),
    })
}

#[allow(clippy::too_many_arguments)]
fn emit(
    meta: &RuleMeta,
    rule_at: &str,
    direction: Direction,
    deny: bool,
    peers: &PeerSet,
    ports: &Option<Vec<PortRule>>,
    ids: &mut RuleIds,
    rules: &mut Vec<PolicyRule>,
    proxy_rules: &mut Vec<ProxyRule>,
) {
    if peers.as_ref().is_some_and(|p| p.is_empty()) {
        return;
    }
    let peer_ids: Vec<u32> = match peers {
        None => vec![identity::ANY],
        Some(set) => set.iter().copied().collect(),
    };
    let all_ports = [PortRule::default()];
    let port_rules: &[PortRule] = match ports {
        Some(p) => p,
        None => &all_ports,
    };
    for (pi, pr) in port_rules.iter().enumerate() {
        let rule = match ports {
            Some(_) => format!("{rule_at}.toPorts[{pi}]"),
            None => rule_at.to_string(),
        };
        let policy_id = ids.id(meta.policy, &rule, direction, deny);
        let l7 = if deny { None } else { hint_of(pr) };
        let ranges: Vec<(u16, u16, Vec<&'static str>)> = if pr.ports.is_empty() {
            vec![(0, 65535, vec!["TCP", "UDP"])]
        } else {
            pr.ports.iter().filter_map(|p| parse_port(p).ok()).collect()
        };
        for (lo, hi, protos) in ranges {
            for proto in protos {
                let protocol = if proto == "TCP" { Protocol::Tcp } else { Protocol::Udp };
                let action = match (&l7, deny, protocol) {
                    (_, true, _) => Action::Deny,
                    (Some((hint, _)), false, Protocol::Tcp) => Action::Redirect(*hint),
                    _ => Action::Allow,
                };
                for &peer in &peer_ids {
                    rules.push(PolicyRule {
                        endpoint_id: meta.endpoint_id,
                        direction,
                        protocol,
                        peer_identity: peer,
                        ports: (lo, hi),
                        verdict: Verdict { action, policy_id, audit: meta.audit },
                    });
                }
            }
            if deny {
                continue;
            }
            let (l7_rule, tls) = match &l7 {
                Some((_, l7)) => (l7.clone(), true),
                None => (L7::AllowAll, false),
            };
            proxy_rules.push(ProxyRule {
                endpoint: meta.endpoint.to_string(),
                endpoint_id: meta.endpoint_id,
                direction,
                ports: (lo, hi),
                peers: match peers {
                    None => Peers::Any,
                    Some(s) => Peers::Identities(s.clone()),
                },
                l7: l7_rule,
                terminating_tls: if tls { published_tls(&pr.terminating_tls) } else { None },
                originating_tls: if tls { published_tls(&pr.originating_tls) } else { None },
                server_names: if tls { pr.server_names.clone().unwrap_or_default() } else { Vec::new() },
                policy: meta.policy.to_string(),
                rule: rule.clone(),
                policy_id,
                audit: meta.audit,
            });
        }
    }
}

#[cfg(test)]
mod tests;

//! The proxy's policy tables: what policy-api compiled for ports marked for L7 (the
//! `Published` value it streams to l7proxy), with regexes compiled once per policy version,
//! and the pure decision for one request. No I/O here: l7proxy enforces with it and
//! policy-api's simulation replays recorded flows through the very same code.
//!
//! Audit mode: rules of a policy annotated `l7mesh.io/audit: "true"` carry `audit`. A request
//! that all rules deny but the enforced rules alone allow is [`Decision::Audit`]: let through,
//! recorded as AUDIT.
#![forbid(unsafe_code)]

mod explain;
mod ipcache;
mod kafka_api;
pub use explain::{Explanation, KernelExplanation, KernelSide};
pub use ipcache::IpcacheIndex;
pub use kafka_api::{kafka_api, kafka_api_key, kafka_api_names, kafka_apis, KafkaApi};

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use l7mesh_api::Verdict;
use regex::Regex;

/// Reserved identities (as the redirector numbers them).
pub const HOST: u32 = redirector_policy::identity::HOST;
#[cfg(test)]
pub const WORLD: u32 = redirector_policy::identity::WORLD;

use l7mesh_api::tables::{Peers, TlsContext, L7};
/// The published tables [`Tables::build`] indexes, and the workloads it names flows with.
pub use l7mesh_api::tables::{Published, WorkloadInfo};

/// Which side of a connection a rule judges: the selected workload's egress or ingress, the
/// same words as a flow's direction.
pub use l7mesh_api::Direction;

struct HttpMatcher {
    path: Option<Arc<WholeRegex>>,
    method: Option<Arc<WholeRegex>>,
    host: Option<Arc<WholeRegex>>,
    /// (lower-case name, exact value or any)
    headers: Vec<(String, Option<String>)>,
}

/// Each field's check on its own: enforcement ([`HttpMatcher::matches`]) and the explanation
/// of a denial (`explain`) are the same checks.
impl HttpMatcher {
    fn path_ok(&self, req: &RequestInfo) -> bool {
        self.path.as_ref().is_none_or(|r| r.is_match(req.path))
    }
    fn method_ok(&self, req: &RequestInfo) -> bool {
        self.method.as_ref().is_none_or(|r| r.is_match(req.method))
    }
    fn host_ok(&self, req: &RequestInfo) -> bool {
        self.host.as_ref().is_none_or(|r| r.is_match(req.host))
    }
    fn header_ok(req: &RequestInfo, name: &str, value: &Option<String>) -> bool {
        let mut present = req.headers.get_all(name).iter();
        match value {
            None => present.next().is_some(),
            Some(v) => present.any(|hv| hv.as_bytes() == v.as_bytes()),
        }
    }
    fn matches(&self, req: &RequestInfo) -> bool {
        self.path_ok(req)
            && self.method_ok(req)
            && self.host_ok(req)
            && self.headers.iter().all(|(name, value)| Self::header_ok(req, name, value))
    }
}

/// A port's HTTP rules, compiled once per policy version and indexed by the literal prefix of
/// their path pattern (`/api/v1/.*` -> `/api/v1/`): a request is checked only against the rules
/// whose prefix its path starts with, plus those without one, so the cost of a request does not
/// grow with the number of rules that cannot match it.
struct HttpRules {
    rules: Vec<HttpMatcher>,
    by_prefix: HashMap<Box<str>, Vec<usize>>,
    /// The distinct prefix lengths in `by_prefix`, ascending.
    prefix_lens: Vec<usize>,
    /// Rules with no path pattern, or one without a literal prefix: always checked.
    always: Vec<usize>,
}

impl HttpRules {
    fn new(rules: Vec<HttpMatcher>, prefixes: Vec<Option<String>>) -> Self {
        let mut by_prefix: HashMap<Box<str>, Vec<usize>> = HashMap::new();
        let mut always = Vec::new();
        for (i, p) in prefixes.into_iter().enumerate() {
            match p {
                Some(p) => by_prefix.entry(p.into_boxed_str()).or_default().push(i),
                None => always.push(i),
            }
        }
        let mut prefix_lens: Vec<usize> = by_prefix.keys().map(|k| k.len()).collect();
        prefix_lens.sort_unstable();
        prefix_lens.dedup();
        HttpRules { rules, by_prefix, prefix_lens, always }
    }

    /// The rules `path` could match.
    fn candidates<'a>(&'a self, path: &'a str) -> impl Iterator<Item = &'a HttpMatcher> + 'a {
        let prefixed = self
            .prefix_lens
            .iter()
            .take_while(move |&&l| l <= path.len())
            .filter(move |&&l| path.is_char_boundary(l))
            .filter_map(move |&l| self.by_prefix.get(&path[..l]))
            .flatten();
        self.always.iter().chain(prefixed).map(move |&i| &self.rules[i])
    }
}

/// The literal every match of `pattern` starts with, if it has one.
fn literal_prefix(pattern: &str) -> Option<String> {
    let hir = regex_syntax::Parser::new().parse(pattern).ok()?;
    let seq = regex_syntax::hir::literal::Extractor::new().extract(&hir);
    if !seq.is_finite() {
        return None;
    }
    let lcp = seq.longest_common_prefix()?;
    (!lcp.is_empty()).then(|| String::from_utf8(lcp.to_vec()).ok()).flatten()
}

/// One Kafka rule: the API keys it allows (a role expands to a set), and its constraints but
/// the topic (`KafkaRules` files it under its topic).
struct KafkaMatcher {
    api_keys: KafkaKeys,
    api_version: Option<i16>,
    client_id: Option<String>,
}

/// One rule's own checks, field by field (the index in [`KafkaFits`] answers the same
/// question for all rules at once; `explain` asks each rule, and a test holds the two equal).
impl KafkaMatcher {
    fn key_ok(&self, req: &KafkaRequest) -> bool {
        match &self.api_keys {
            KafkaKeys::Any => true,
            KafkaKeys::These(keys) => keys.contains(&req.api_key),
        }
    }
    fn version_ok(&self, req: &KafkaRequest) -> bool {
        self.api_version.is_none_or(|v| v == req.version)
    }
    fn client_ok(&self, req: &KafkaRequest) -> bool {
        self.client_id.as_deref().is_none_or(|c| c == req.client_id)
    }
}

/// The API keys one Kafka rule allows: only a rule naming neither a role nor an apiKey allows
/// every key; a name the table does not know (which validation refuses) allows none.
enum KafkaKeys {
    Any,
    These(Vec<i16>),
}

/// Client ids a set of Kafka rules allows for one (API key, version) pair.
#[derive(Default)]
struct ClientIds {
    any: bool,
    ids: HashSet<Box<str>>,
}

/// The (API key, version, client id) constraints of a set of Kafka rules, as a set: whether a
/// request fits one of them is at most eight hash lookups, however many rules there are.
/// (`None` is a rule's "any".)
#[derive(Default)]
struct KafkaFits(HashMap<(Option<i16>, Option<i16>), ClientIds>);

impl KafkaFits {
    fn insert(&mut self, m: &KafkaMatcher) {
        let keys: Vec<Option<i16>> = match &m.api_keys {
            KafkaKeys::Any => vec![None],
            KafkaKeys::These(keys) => keys.iter().copied().map(Some).collect(),
        };
        for key in keys {
            let ids = self.0.entry((key, m.api_version)).or_default();
            match &m.client_id {
                None => ids.any = true,
                Some(c) => {
                    ids.ids.insert(c.as_str().into());
                }
            }
        }
    }

    fn fits(&self, req: &KafkaRequest) -> bool {
        [None, Some(req.api_key)].into_iter().any(|key| {
            [None, Some(req.version)].into_iter().any(|version| {
                self.0.get(&(key, version)).is_some_and(|ids| ids.any || ids.ids.contains(req.client_id))
            })
        })
    }
}

/// One policy rule's Kafka rules, indexed by topic: a request naming a topic is checked against
/// that topic's rules and those naming none, and one naming no topic against all of them, in a
/// few hash lookups however many topics the policy lists.
struct KafkaRules {
    by_topic: HashMap<String, KafkaFits>,
    any_topic: KafkaFits,
    /// Every rule, whatever its topic: for requests that name none.
    all: KafkaFits,
    /// The rules one by one (with what they say, for explaining a denial).
    list: Vec<(Option<String>, KafkaMatcher, l7mesh_api::tables::KafkaRule)>,
}

impl KafkaRules {
    /// From (topic, rule) pairs.
    fn new(rules: impl IntoIterator<Item = (Option<String>, KafkaMatcher, l7mesh_api::tables::KafkaRule)>) -> Self {
        let mut index = KafkaRules {
            by_topic: HashMap::new(),
            any_topic: KafkaFits::default(),
            all: KafkaFits::default(),
            list: Vec::new(),
        };
        for (topic, k, raw) in rules {
            index.all.insert(&k);
            match &topic {
                Some(t) => index.by_topic.entry(t.clone()).or_default().insert(&k),
                None => index.any_topic.insert(&k),
            }
            index.list.push((topic, k, raw));
        }
        index
    }

    fn matches(&self, req: &KafkaRequest) -> bool {
        match req.topic {
            Some(topic) => self.by_topic.get(topic).is_some_and(|k| k.fits(req)) || self.any_topic.fits(req),
            // A request naming no topic is not constrained by the rules' topics.
            None => self.all.fits(req),
        }
    }
}

/// One policy rule's gRPC rules, indexed by service (exact): method `None` allows them all;
/// and the rules in order (for explaining a denial).
struct GrpcRules(HashMap<String, Vec<Option<String>>>, Vec<(String, Option<String>)>);

impl GrpcRules {
    fn new(rules: impl IntoIterator<Item = (String, Option<String>)>) -> Self {
        let mut index: HashMap<String, Vec<Option<String>>> = HashMap::new();
        let mut list = Vec::new();
        for (service, method) in rules {
            index.entry(service.clone()).or_default().push(method.clone());
            list.push((service, method));
        }
        GrpcRules(index, list)
    }

    fn matches(&self, service: &str, method: &str) -> bool {
        self.0.get(service).is_some_and(|methods| methods.iter().any(|m| m.as_deref().is_none_or(|m| m == method)))
    }
}

/// A Kafka request as policy sees it (one topic at a time).
pub struct KafkaRequest<'a> {
    pub api_key: i16,
    pub version: i16,
    pub client_id: &'a str,
    /// `None` for requests that name no topic.
    pub topic: Option<&'a str>,
}

/// API keys each role stands for: Cilium's sets, plus what today's clients need for them
/// (idempotent producers' InitProducerId, OffsetForLeaderEpoch, KIP-848 heartbeats, KIP-714
/// telemetry, SASL handshakes).
pub const PRODUCE_KEYS: &[i16] = &[0, 3, 10, 17, 18, 22, 36, 71, 72];
pub const CONSUME_KEYS: &[i16] = &[1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 15, 17, 18, 23, 36, 68, 71, 72];

enum Matcher {
    AllowAll,
    Http(HttpRules),
    Grpc(GrpcRules),
    Kafka(KafkaRules),
    /// A TLS port: judged by `Rule::server_names` on the ClientHello, never by an HTTP or Kafka
    /// request (termination, which would expose those, is not implemented yet).
    Tls,
}

struct Rule {
    endpoint_id: u32,
    direction: Direction,
    ports: (u16, u16),
    peers: Option<HashSet<u32>>,
    matcher: Matcher,
    /// `terminatingTLS`: the proxy terminates with this secret's certificate, or (None) one the
    /// broker mints for the requested name.
    terminates: Option<Option<SecretName>>,
    /// `originatingTLS`: the proxy opens TLS upstream, trusting this secret's CA and presenting
    /// its certificate, or (None) trusting the mesh CA and the system roots.
    originates: Option<Option<SecretName>>,
    /// `serverNames`: the SNI values allowed (exact, or `*.` for one label); empty: any.
    server_names: Vec<String>,
    policy: Arc<str>,
    /// The field path of its `toPorts` entry in the policy (`ingress[0].toPorts[0]`).
    rule: Arc<str>,
    /// From an audit-mode policy: what only it denies is allowed and recorded as AUDIT.
    audit: bool,
}

/// One request as policy sees it.
pub struct RequestInfo<'a> {
    pub method: &'a str,
    /// Path with query.
    pub path: &'a str,
    /// The request's authority as `host` rules see it: [`host_rule_value`].
    pub host: &'a str,
    pub headers: &'a http::HeaderMap,
    /// (service, method) for a gRPC request.
    pub grpc: Option<(&'a str, &'a str)>,
}

/// The name a `host` rule matches, from a request's validated authority (its host, with IPv6
/// literals bracketed, and port): lower case (names compare case-insensitively), one trailing
/// dot dropped, and without the port when it is the connection's original destination port
/// (as Envoy's `strip_matching_host_port`); any other port stays, as `name:port`. The proxy
/// and the simulation both judge this value, so they cannot disagree.
pub fn host_rule_value(host: &str, port: Option<u16>, destination_port: u16) -> std::borrow::Cow<'_, str> {
    use std::borrow::Cow;
    let host = host.strip_suffix('.').unwrap_or(host);
    let lower: Cow<'_, str> = if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    };
    match port {
        Some(port) if port != destination_port => Cow::Owned(format!("{lower}:{port}")),
        _ => lower,
    }
}

/// `host[:port]` split at the port (IPv6 literals keep their brackets); a port that is not a
/// number stays part of the host.
pub fn split_authority(authority: &str) -> (&str, Option<u16>) {
    let split_at = match authority.rfind(':') {
        Some(i) if !authority[i..].contains(']') => i,
        _ => return (authority, None),
    };
    match authority[split_at + 1..].parse() {
        Ok(port) => (&authority[..split_at], Some(port)),
        Err(_) => (authority, None),
    }
}

/// A connection's workload that a policy version does not know (it stopped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("workload (cgroup {cgroup_id}) is not in policy version {version}")]
pub struct UnknownWorkload {
    pub cgroup_id: u64,
    pub version: u64,
}

/// The policy of the rule that allowed, and the side whose rule it is.
type AllowedBy = (Arc<str>, Direction);

/// Which side of a connection a rule table applies to.
#[derive(Clone, Copy, Debug)]
pub struct Party {
    pub endpoint_id: u32,
    pub direction: Direction,
    /// The other side's identity.
    pub peer: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow {
        policy: Option<Arc<str>>,
    },
    Deny {
        policy: Arc<str>,
    },
    /// Denied only by audit-mode policies: let through, recorded as AUDIT.
    Audit {
        policy: Arc<str>,
    },
}

impl Decision {
    /// The flow verdict: allowed, denied or audit.
    pub fn verdict(&self) -> Verdict {
        match self {
            Decision::Allow { .. } => Verdict::Allowed,
            Decision::Deny { .. } => Verdict::Denied,
            Decision::Audit { .. } => Verdict::Audit,
        }
    }
    pub fn allows(&self) -> bool {
        !matches!(self, Decision::Deny { .. })
    }
    /// The deciding policy (shared with the tables: cloning it does not allocate).
    pub fn policy(&self) -> Option<&Arc<str>> {
        match self {
            Decision::Allow { policy } => policy.as_ref(),
            Decision::Deny { policy } | Decision::Audit { policy } => Some(policy),
        }
    }
}

#[derive(Default)]
pub struct Tables {
    pub version: u64,
    workloads: HashMap<u64, Arc<WorkloadInfo>>,
    policies: HashMap<u32, Arc<str>>,
    /// What each id the kernel reports stands for (a rule of a policy).
    rule_ids: HashMap<u32, l7mesh_api::tables::RuleRef>,
    ipcache: IpcacheIndex,
    /// Every topic a Kafka rule names: the values the topic label of the metrics may take.
    kafka_topics: HashSet<Box<str>>,
    rules: Vec<Rule>,
    /// Rule indices by (endpoint, direction), then port and peer: a request looks only at its
    /// parties' rules on its port.
    by_party: HashMap<(u32, Direction), PartyRules>,
    /// Errors met while compiling the published rules (a rule that fails closes its port).
    pub errors: Vec<String>,
    /// In a cluster: the tunnel's part (other nodes, ingress at L4 for tunnelled connections).
    cluster: Option<ClusterIndex>,
}

/// Another node that serves the tunnel: its name, an IPv4 address of it, its tunnel port.
pub type TunnelNode = (String, IpAddr, u16);

/// The cluster's part of a version, indexed.
struct ClusterIndex {
    this_node: String,
    nodes: Vec<l7mesh_api::tables::RemoteNode>,
    /// Other nodes' workloads by (node, name).
    remote: HashMap<(String, String), Arc<WorkloadInfo>>,
    /// The ingress rules and defaults of local endpoints at L4, as the kernel's fold takes them.
    l4: redirector_policy::PolicySnapshot,
}

/// How a connection that arrived through the tunnel is judged at L4 (the kernel's fold, for
/// the identity the tunnel proved).
pub use redirector_policy::Decision as L4Decision;

/// A pattern that must match a whole value, compiled on first use. policy-api compiled every
/// pattern when the policy was applied (its errors went to the user); here the prefix index keeps
/// most rules of a large set from ever being tried, and compiling them all up front held about
/// 17 KiB per pattern (10,000 rules: 185 MiB) and slowed the allocator-heavy HTTP/2 path.
struct WholeRegex {
    /// The pattern as written (explanations quote it).
    pattern: Box<str>,
    anchored: String,
    compiled: OnceLock<Option<Regex>>,
}

impl WholeRegex {
    fn is_match(&self, value: &str) -> bool {
        // A pattern that fails to compile (beyond its syntax, checked when built) matches
        // nothing: fail closed.
        self.compiled.get_or_init(|| Regex::new(&self.anchored).ok()).as_ref().is_some_and(|r| r.is_match(value))
    }
}

/// `pattern` as a whole-value matcher; identical patterns (the many `GET`s) share one.
fn whole(
    pattern: &Option<String>,
    cache: &mut HashMap<String, Arc<WholeRegex>>,
    errors: &mut Vec<String>,
) -> Result<Option<Arc<WholeRegex>>, ()> {
    let Some(p) = pattern else { return Ok(None) };
    if let Some(r) = cache.get(p) {
        return Ok(Some(r.clone()));
    }
    // The pattern must parse on its own before it is wrapped: `GET)|(.*` does not, but its
    // wrapped form `^(?:GET)|(.*)$` does, and would match every value (the validator refuses
    // it too; this is the enforcing side's own check).
    regex_syntax::Parser::new().parse(p).map_err(|e| errors.push(format!("regex `{p}`: {e}")))?;
    let anchored = format!("^(?:{p})$");
    regex_syntax::Parser::new().parse(&anchored).map_err(|e| errors.push(format!("regex `{p}`: {e}")))?;
    let r = Arc::new(WholeRegex { pattern: p.as_str().into(), anchored, compiled: OnceLock::new() });
    cache.insert(p.clone(), r.clone());
    Ok(Some(r))
}

impl ClusterIndex {
    fn new(c: &l7mesh_api::tables::ClusterTables, workloads: &[WorkloadInfo]) -> Self {
        use l7mesh_api::tables::L4Action;
        use redirector_policy::{Action, EndpointEntry, PolicyRule, Protocol, ProtocolHint};
        let remote = workloads
            .iter()
            .filter(|w| !w.node.is_empty())
            .map(|w| ((w.node.clone(), w.name.clone()), Arc::new(w.clone())))
            .collect();
        let mut endpoints: std::collections::BTreeMap<u32, EndpointEntry> = std::collections::BTreeMap::new();
        let entry = |endpoint_id| EndpointEntry {
            cgroup_id: 0,
            endpoint_id,
            identity: 0,
            egress_enforced: false,
            ingress_enforced: false,
            egress_audit: false,
            ingress_audit: false,
        };
        for &(endpoint_id, enforced, audit) in &c.ingress_defaults {
            let e = endpoints.entry(endpoint_id).or_insert_with(|| entry(endpoint_id));
            (e.ingress_enforced, e.ingress_audit) = (enforced, audit);
        }
        for &(endpoint_id, enforced, audit) in &c.egress_defaults {
            let e = endpoints.entry(endpoint_id).or_insert_with(|| entry(endpoint_id));
            (e.egress_enforced, e.egress_audit) = (enforced, audit);
        }
        let endpoints = endpoints.into_values().collect();
        let rule = |direction, r: &l7mesh_api::tables::L4Rule| PolicyRule {
            endpoint_id: r.endpoint_id,
            direction,
            protocol: Protocol::Tcp,
            peer_identity: r.peer,
            ports: r.ports,
            verdict: redirector_policy::Verdict {
                action: match r.action {
                    L4Action::Allow => Action::Allow,
                    L4Action::Deny => Action::Deny,
                    L4Action::Redirect => Action::Redirect(ProtocolHint::None),
                },
                policy_id: r.policy_id,
                audit: r.audit,
            },
        };
        let rules = (c.ingress.iter().map(|r| rule(redirector_policy::Direction::Ingress, r)))
            .chain(c.egress.iter().map(|r| rule(redirector_policy::Direction::Egress, r)))
            .collect();
        ClusterIndex {
            this_node: c.this_node.clone(),
            nodes: c.nodes.clone(),
            remote,
            l4: redirector_policy::PolicySnapshot { endpoints, ipcache: Vec::new(), rules },
        }
    }
}

impl Tables {
    pub fn build(published: &Published) -> Self {
        let mut errors = Vec::new();
        let mut regexes: HashMap<String, Arc<WholeRegex>> = HashMap::new();
        let mut rules = Vec::new();
        let mut kafka_topics = HashSet::new();
        for raw in &published.proxy_rules {
            if let L7::Kafka { rules } = &raw.l7 {
                kafka_topics.extend(rules.iter().filter_map(|k| k.topic.as_deref()).map(Box::<str>::from));
            }
            let matcher = match &raw.l7 {
                L7::AllowAll => Matcher::AllowAll,
                L7::Tls => Matcher::Tls,
                L7::Kafka { rules } => Matcher::Kafka(KafkaRules::new(rules.iter().map(|k| {
                    let matcher = KafkaMatcher {
                        api_keys: match (
                            k.role.as_deref().map(str::to_ascii_lowercase).as_deref(),
                            k.api_key.as_deref(),
                        ) {
                            (Some("produce"), _) => KafkaKeys::These(PRODUCE_KEYS.to_vec()),
                            (Some("consume"), _) => KafkaKeys::These(CONSUME_KEYS.to_vec()),
                            (Some(role), _) => {
                                errors.push(format!("unknown Kafka role `{role}`: the rule allows nothing"));
                                KafkaKeys::These(Vec::new())
                            }
                            (None, Some(name)) => match kafka_api_key(name) {
                                Some(key) => KafkaKeys::These(vec![key]),
                                None => {
                                    errors.push(format!("unknown Kafka apiKey `{name}`: the rule allows nothing"));
                                    KafkaKeys::These(Vec::new())
                                }
                            },
                            // Neither: every API key, constrained by the other fields.
                            (None, None) => KafkaKeys::Any,
                        },
                        // An unparsable version (which validation refuses) matches no request.
                        api_version: k.api_version.as_ref().map(|v| {
                            v.parse().unwrap_or_else(|_| {
                                errors.push(format!("Kafka apiVersion `{v}` is not a number: the rule allows nothing"));
                                -1
                            })
                        }),
                        client_id: k.client_id.clone(),
                    };
                    (k.topic.clone(), matcher, k.clone())
                }))),
                L7::Grpc { rules } => {
                    Matcher::Grpc(GrpcRules::new(rules.iter().map(|g| (g.service.clone(), g.method.clone()))))
                }
                L7::Http { rules } => {
                    let mut out = Vec::new();
                    let mut prefixes = Vec::new();
                    for h in rules {
                        // A rule whose regex does not compile matches nothing (fail closed).
                        let (Ok(method), Ok(path), Ok(host)) = (
                            whole(&h.method, &mut regexes, &mut errors),
                            whole(&h.path, &mut regexes, &mut errors),
                            whole(&h.host, &mut regexes, &mut errors),
                        ) else {
                            continue;
                        };
                        prefixes.push(h.path.as_deref().and_then(literal_prefix));
                        let mut headers: Vec<(String, Option<String>)> = h
                            .headers
                            .iter()
                            .map(|line| match line.split_once(':') {
                                Some((n, v)) => (n.trim().to_ascii_lowercase(), Some(v.trim().to_string())),
                                None => (line.trim().to_ascii_lowercase(), None),
                            })
                            .collect();
                        headers.extend(h.header_matches.iter().map(|m| (m.name.to_ascii_lowercase(), m.value.clone())));
                        out.push(HttpMatcher { path, method, host, headers });
                    }
                    Matcher::Http(HttpRules::new(out, prefixes))
                }
            };
            rules.push(Rule {
                endpoint_id: raw.endpoint_id,
                direction: raw.direction,
                ports: raw.ports,
                peers: match &raw.peers {
                    Peers::Any => None,
                    Peers::Identities(ids) => Some(ids.iter().copied().collect()),
                },
                matcher,
                terminates: raw.terminating_tls.as_ref().map(SecretName::of_tls_context),
                originates: raw.originating_tls.as_ref().map(SecretName::of_tls_context),
                server_names: raw.server_names.iter().map(|n| n.to_ascii_lowercase()).collect(),
                policy: raw.policy.as_str().into(),
                rule: raw.rule.as_str().into(),
                audit: raw.audit,
            });
        }
        let mut by_party: HashMap<(u32, Direction), PartyRules> = HashMap::new();
        for (i, r) in rules.iter().enumerate() {
            by_party.entry((r.endpoint_id, r.direction)).or_default().insert(i, r);
        }
        Tables {
            by_party,
            version: published.version,
            workloads: published.workloads.iter().map(|w| (w.cgroup_id, Arc::new(w.clone()))).collect(),
            policies: published.policy_ids.iter().map(|(id, name)| (*id, name.as_str().into())).collect(),
            rule_ids: published.rule_ids.iter().map(|(id, r)| (*id, r.clone())).collect(),
            ipcache: IpcacheIndex::new(&published.ipcache),
            kafka_topics,
            rules,
            errors,
            cluster: published.cluster.as_ref().map(|c| ClusterIndex::new(c, &published.workloads)),
        }
    }

    /// Another node's workload, as this version knows it (its labels came from the kvstore).
    pub fn remote_workload(&self, node: &str, name: &str) -> Option<Arc<WorkloadInfo>> {
        self.cluster.as_ref()?.remote.get(&(node.to_string(), name.to_string())).cloned()
    }

    /// The node of the cluster `ip` belongs to, with its tunnel port, if it serves one, and
    /// the identity its addresses have in this version.
    pub fn tunnel_to(&self, ip: IpAddr) -> Option<(&str, u16, u32)> {
        let c = self.cluster.as_ref()?;
        let n = c.nodes.iter().find(|n| n.addresses.contains(&ip))?;
        Some((n.name.as_str(), n.tunnel_port?, n.identity))
    }

    /// This node's name and the other nodes serving the tunnel (name, an address, port).
    pub fn cluster_nodes(&self) -> Option<(String, Vec<TunnelNode>)> {
        let c = self.cluster.as_ref()?;
        let others = c
            .nodes
            .iter()
            .filter_map(|n| Some((n.name.clone(), *n.addresses.iter().find(|a| a.is_ipv4())?, n.tunnel_port?)))
            .collect();
        Some((c.this_node.clone(), others))
    }

    /// Whether this version was compiled for a node of a cluster.
    pub fn in_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    /// The L4 ingress verdict for a connection from `src` (another node's workload, as the
    /// tunnel proved it) to local endpoint `endpoint_id` on TCP `port`: the kernel's fold over
    /// the rules for its identity, for its node's identity (the address its connections came
    /// from before the tunnel: a CIDR deny of that node still denies them) and for any peer;
    /// with none, the endpoint's ingress default.
    pub fn tunnel_ingress(&self, endpoint_id: u32, src: &WorkloadInfo, port: u16) -> L4Decision {
        let Some(c) = self.cluster.as_ref() else { return L4Decision::Deny { policy_id: 0 } };
        let node = c.nodes.iter().find(|n| n.name == src.node).map(|n| n.identity);
        self.cluster_fold(redirector_policy::Direction::Ingress, endpoint_id, &[Some(src.identity), node], port)
    }

    /// Whether local endpoint `endpoint_id`'s egress to another node needs to know which of that
    /// node's workloads it goes to: some rule of its egress or its egress default could tell
    /// them apart. Otherwise every connection to another node is allowed at L4, and the
    /// question is not asked.
    pub fn tunnel_egress_judged(&self, endpoint_id: u32) -> bool {
        let Some(c) = self.cluster.as_ref() else { return false };
        c.l4.endpoints.iter().any(|e| e.endpoint_id == endpoint_id && (e.egress_enforced || e.egress_audit))
            || c.l4
                .rules
                .iter()
                .any(|r| r.endpoint_id == endpoint_id && r.direction == redirector_policy::Direction::Egress)
    }

    /// The L4 egress verdict of local endpoint `endpoint_id` for a TCP connection to `port` of
    /// another node with identity `node_identity`, where workload `dst` of that node listens
    /// (none: a service of the node itself): the kernel's fold over its egress rules for
    /// `dst`'s identity, for the node's (its address: a CIDR of it still names it) and for any
    /// peer; with none, the endpoint's egress default.
    pub fn tunnel_egress(
        &self,
        endpoint_id: u32,
        node_identity: u32,
        dst: Option<&WorkloadInfo>,
        port: u16,
    ) -> L4Decision {
        self.cluster_fold(
            redirector_policy::Direction::Egress,
            endpoint_id,
            &[dst.map(|w| w.identity), Some(node_identity)],
            port,
        )
    }

    fn cluster_fold(
        &self,
        direction: redirector_policy::Direction,
        endpoint_id: u32,
        peers: &[Option<u32>],
        port: u16,
    ) -> L4Decision {
        use redirector_policy::{Action, Direction as D, Protocol};
        let Some(c) = self.cluster.as_ref() else { return L4Decision::Deny { policy_id: 0 } };
        let Some(ep) = c.l4.endpoints.iter().find(|e| e.endpoint_id == endpoint_id) else {
            return L4Decision::Deny { policy_id: 0 };
        };
        let covering = c.l4.rules.iter().filter(|r| {
            r.endpoint_id == endpoint_id
                && r.direction == direction
                && r.protocol == Protocol::Tcp
                && (r.peer_identity == redirector_policy::identity::ANY || peers.contains(&Some(r.peer_identity)))
                && r.ports.0 <= port
                && port <= r.ports.1
        });
        let (enforced, audit) = match direction {
            D::Ingress => (ep.ingress_enforced, ep.ingress_audit),
            D::Egress => (ep.egress_enforced, ep.egress_audit),
        };
        match redirector_policy::fold(covering.map(|r| r.verdict)) {
            Some(v) => match (v.action, v.audit) {
                (Action::Deny, false) => L4Decision::Deny { policy_id: v.policy_id },
                (Action::Deny, true) => L4Decision::Audit,
                (Action::Redirect(hint), _) => L4Decision::Redirect(hint),
                (Action::Allow, _) => L4Decision::Allow,
            },
            None if enforced => L4Decision::Deny { policy_id: 0 },
            None if audit => L4Decision::Audit,
            None => L4Decision::Allow,
        }
    }

    pub fn workload(&self, cgroup_id: u64) -> Option<Arc<WorkloadInfo>> {
        self.workloads.get(&cgroup_id).cloned()
    }

    /// The parties whose rules judge traffic from `src` (a workload's cgroup, else none) at
    /// `src_ip` to `dst` at `dst_ip`, in *these* tables: the source workload's egress and the
    /// destination workload's ingress. Endpoint ids and identities are numbered afresh in each
    /// version (a workload starting renumbers the others), so a long-lived connection resolves
    /// its parties from the cgroups it carries against the tables judging each request, never
    /// keeps one version's numbers for the next. A workload these tables no longer know is an
    /// error (judged as denied: its connections are about to be closed).
    pub fn parties(
        &self,
        src: Option<u64>,
        src_ip: IpAddr,
        dst: Option<u64>,
        dst_ip: IpAddr,
    ) -> Result<Vec<Party>, UnknownWorkload> {
        let known = |cgroup: Option<u64>| match cgroup {
            Some(c) => self.workloads.get(&c).map(Some).ok_or(UnknownWorkload { cgroup_id: c, version: self.version }),
            None => Ok(None),
        };
        let (src, dst) = (known(src)?, known(dst)?);
        let dst_identity = dst.map(|w| w.identity).unwrap_or_else(|| self.identity_of(dst_ip));
        let src_identity = src.map(|w| w.identity).unwrap_or_else(|| self.identity_of(src_ip));
        let mut parties = Vec::with_capacity(2);
        // Another node's workload has no egress rules here (its own node judged them).
        if let Some(w) = src.filter(|w| w.node.is_empty()) {
            parties.push(Party { endpoint_id: w.endpoint_id, direction: Direction::Egress, peer: dst_identity });
        }
        // Another node's workload has no ingress rules here either (its own node judges them).
        if let Some(w) = dst.filter(|w| w.node.is_empty()) {
            parties.push(Party { endpoint_id: w.endpoint_id, direction: Direction::Ingress, peer: src_identity });
        }
        Ok(parties)
    }

    pub fn policy_name(&self, id: u32) -> Option<Arc<str>> {
        self.policies.get(&id).cloned()
    }

    /// The identity the kernel gives `ip` before its local-listener step.
    pub fn identity_of(&self, ip: IpAddr) -> u32 {
        self.ipcache.identity_of(ip)
    }

    /// True when a Kafka rule of this version names `topic` (metrics label only such topics).
    pub fn names_kafka_topic(&self, topic: &str) -> bool {
        self.kafka_topics.contains(topic)
    }

    /// True when some L7 rule (not an allow-all) covers `port` for the party: the connection
    /// needs the HTTP stack rather than opaque forwarding.
    pub fn has_http_rules(&self, endpoint_id: u32, direction: Direction, port: u16) -> bool {
        self.party_rules(endpoint_id, direction, port)
            .any(|r| r.ports.0 <= port && port <= r.ports.1 && matches!(r.matcher, Matcher::Http(_) | Matcher::Grpc(_)))
    }

    /// True when a rule covering `port` for the party has L7 rules next to `serverNames` with
    /// neither termination nor origination: rules for traffic the proxy cannot read.
    pub fn needs_unsupported_tls(&self, endpoint_id: u32, direction: Direction, port: u16) -> bool {
        self.party_rules(endpoint_id, direction, port).any(|r| {
            r.ports.0 <= port
                && port <= r.ports.1
                && r.terminates.is_none()
                && r.originates.is_none()
                && !r.server_names.is_empty()
                && !matches!(r.matcher, Matcher::Tls)
        })
    }

    /// `originatingTLS` on `port` for any of the parties: Some(secret, or None for the bundle).
    pub fn origination(&self, parties: &[Party], port: u16) -> Option<Option<SecretName>> {
        parties.iter().find_map(|party| {
            self.party_rules(party.endpoint_id, party.direction, port)
                .filter(|r| r.ports.0 <= port && port <= r.ports.1)
                .find_map(|r| r.originates.clone())
        })
    }

    /// The first exact `serverNames` entry on `port`: the name an originated connection verifies.
    pub fn first_server_name(&self, parties: &[Party], port: u16) -> Option<String> {
        parties.iter().find_map(|party| {
            self.party_rules(party.endpoint_id, party.direction, port)
                .filter(|r| r.ports.0 <= port && port <= r.ports.1)
                .find_map(|r| r.server_names.iter().find(|n| !n.starts_with("*.")).cloned())
        })
    }

    /// `terminatingTLS` on `port` for any of the parties: Some(secret, or None to mint).
    pub fn termination(&self, parties: &[Party], port: u16) -> Option<Option<SecretName>> {
        parties.iter().find_map(|party| {
            self.party_rules(party.endpoint_id, party.direction, port)
                .filter(|r| r.ports.0 <= port && port <= r.ports.1)
                .find_map(|r| r.terminates.clone())
        })
    }

    /// True when a rule covering `port` for the party restricts TLS server names.
    pub fn has_server_names(&self, endpoint_id: u32, direction: Direction, port: u16) -> bool {
        self.party_rules(endpoint_id, direction, port)
            .any(|r| r.ports.0 <= port && port <= r.ports.1 && !r.server_names.is_empty())
    }

    /// Whether every party with rules on `port` allows a TLS connection whose ClientHello names
    /// `sni` (None: no SNI, which no `serverNames` entry matches). Rules without `serverNames`
    /// on the port allow any name, as in Cilium (allows are a union).
    pub fn decide_sni(&self, parties: &[Party], port: u16, sni: Option<&str>) -> Decision {
        self.decide_by(parties, port, |r| {
            let names_match = || {
                r.server_names.is_empty()
                    || sni.is_some_and(|sni| r.server_names.iter().any(|p| server_name_matches(p, sni)))
            };
            match &r.matcher {
                // Terminated: the L7 rules judge the decrypted traffic afterwards.
                _ if r.terminates.is_some() => names_match(),
                Matcher::AllowAll => true,
                Matcher::Tls => names_match(),
                // HTTP, gRPC or Kafka rules cannot judge encrypted traffic.
                _ => false,
            }
        })
    }

    /// Every party with rules on `port` must have one that applies to its peer and `allows`;
    /// a party without rules on the port has no say. Audit-mode rules count only with
    /// `with_audit`. Ok(the policy and side of the last allowing rule) or Err(the index of the
    /// party that denies, and the rule it was denied by).
    fn judge_parties(
        &self,
        parties: &[Party],
        port: u16,
        with_audit: bool,
        allows: &impl Fn(&Rule) -> bool,
    ) -> Result<Option<AllowedBy>, (usize, &Rule)> {
        let mut allowed_by = None;
        for (pi, party) in parties.iter().enumerate() {
            let mut on_port = self.port_rules_of(party, port, with_audit).peekable();
            let Some(first) = on_port.peek() else { continue };
            let mut denied_by = *first;
            match self.for_peer(party, port, with_audit).find(|r| {
                denied_by = r;
                allows(r)
            }) {
                Some(r) => allowed_by = Some((r.policy.clone(), party.direction)),
                None => return Err((pi, denied_by)),
            }
        }
        Ok(allowed_by)
    }

    /// The party's rules on `port` (audit-mode ones only `with_audit`).
    fn port_rules_of<'a>(&'a self, party: &Party, port: u16, with_audit: bool) -> impl Iterator<Item = &'a Rule> {
        self.party_rules(party.endpoint_id, party.direction, port)
            .filter(move |r| (with_audit || !r.audit) && r.ports.0 <= port && port <= r.ports.1)
    }

    /// The party's rules on `port` that apply to its peer, in order (the index holds them apart).
    fn for_peer<'a>(&'a self, party: &Party, port: u16, with_audit: bool) -> impl Iterator<Item = &'a Rule> {
        let peer = party.peer;
        self.peer_rules(party.endpoint_id, party.direction, port, peer)
            .filter(move |r| (with_audit || !r.audit) && r.peers.as_ref().is_none_or(|p| p.contains(&peer)))
    }

    /// The decision with audit mode applied: denied with every rule but allowed by the enforced
    /// rules alone is AUDIT.
    fn decide_by(&self, parties: &[Party], port: u16, allows: impl Fn(&Rule) -> bool) -> Decision {
        self.decide_by_sided(parties, port, allows).0
    }

    /// [`Tables::decide_by`], and the side whose rules decided: the party whose rule denied,
    /// else the last party whose rule allowed (a server's ingress rules judge after the
    /// client's egress ones); `None` when no party has rules on the port.
    fn decide_by_sided(
        &self,
        parties: &[Party],
        port: u16,
        allows: impl Fn(&Rule) -> bool,
    ) -> (Decision, Option<Direction>) {
        match self.judge_parties(parties, port, true, &allows) {
            Ok(allowed) => {
                let side = allowed.as_ref().map(|(_, d)| *d);
                (Decision::Allow { policy: allowed.map(|(p, _)| p) }, side)
            }
            Err((pi, rule)) => match self.judge_parties(parties, port, false, &allows) {
                Ok(_) => (Decision::Audit { policy: rule.policy.clone() }, Some(parties[pi].direction)),
                Err((pi, rule)) => (Decision::Deny { policy: rule.policy.clone() }, Some(parties[pi].direction)),
            },
        }
    }

    /// True when gRPC rules cover `port` for the party.
    pub fn has_grpc_rules(&self, endpoint_id: u32, direction: Direction, port: u16) -> bool {
        self.party_rules(endpoint_id, direction, port)
            .any(|r| r.ports.0 <= port && port <= r.ports.1 && matches!(r.matcher, Matcher::Grpc(_)))
    }

    /// True when Kafka rules cover `port` for the party.
    pub fn has_kafka_rules(&self, endpoint_id: u32, direction: Direction, port: u16) -> bool {
        self.party_rules(endpoint_id, direction, port)
            .any(|r| r.ports.0 <= port && port <= r.ports.1 && matches!(r.matcher, Matcher::Kafka(_)))
    }

    /// Whether every party with rules on `port` allows this Kafka request (one topic).
    pub fn decide_kafka(&self, parties: &[Party], port: u16, req: &KafkaRequest) -> Decision {
        self.decide_by(parties, port, |r| Self::kafka_allows(r, req))
    }

    fn kafka_allows(r: &Rule, req: &KafkaRequest) -> bool {
        match &r.matcher {
            Matcher::AllowAll => true,
            Matcher::Tls => false,
            Matcher::Kafka(rules) => rules.matches(req),
            _ => false,
        }
    }

    /// Whether a connection that does not speak HTTP may pass opaquely: every party with rules
    /// on `port` has an L3/L4 allow (allow-all) for its peer there.
    pub fn allows_opaque(&self, parties: &[Party], port: u16) -> Decision {
        self.decide_by(parties, port, |r| matches!(r.matcher, Matcher::AllowAll))
    }

    /// The party's rules on `port`, in order: a hash lookup, then only those rules (plus any
    /// with a port range wider than [`EXPAND_RANGE`]), however many rules the party has.
    fn party_rules(&self, endpoint_id: u32, direction: Direction, port: u16) -> impl Iterator<Item = &Rule> {
        let party = self.by_party.get(&(endpoint_id, direction));
        let bucket = party.and_then(|p| p.by_port.get(&port));
        let wide = party.into_iter().flat_map(|p| &p.wide).copied().filter(move |&i| self.rules[i].covers(port));
        merge(bucket.into_iter().flat_map(|b| &b.all).copied(), wide).map(|i| &self.rules[i])
    }

    /// The party's rules on `port` that may apply to `peer` (those naming it, and those for any
    /// peer), in order.
    fn peer_rules(&self, endpoint_id: u32, direction: Direction, port: u16, peer: u32) -> impl Iterator<Item = &Rule> {
        let party = self.by_party.get(&(endpoint_id, direction));
        let bucket = party.and_then(|p| p.by_port.get(&port));
        let any = bucket.into_iter().flat_map(|b| &b.any_peer).copied();
        let named = bucket.and_then(|b| b.by_peer.get(&peer)).into_iter().flatten().copied();
        let wide = party.into_iter().flat_map(|p| &p.wide).copied().filter(move |&i| self.rules[i].covers(port));
        merge(merge(any, named), wide).map(|i| &self.rules[i])
    }

    /// The verdict for one request: every party with rules on `port` must allow it (first
    /// matching rule). A party with no rule for the port does not restrict it (the kernel
    /// already judged L4).
    pub fn decide(&self, parties: &[Party], port: u16, req: &RequestInfo) -> Decision {
        self.decide_by(parties, port, |r| r.matches(req))
    }

    /// [`Tables::decide`], and the direction of the side whose rules decided (see
    /// [`Tables::decide_by_sided`]).
    pub fn decide_sided(&self, parties: &[Party], port: u16, req: &RequestInfo) -> (Decision, Option<Direction>) {
        self.decide_by_sided(parties, port, |r| r.matches(req))
    }

    /// [`Tables::decide_kafka`], and the direction of the side whose rules decided.
    pub fn decide_kafka_sided(
        &self,
        parties: &[Party],
        port: u16,
        req: &KafkaRequest,
    ) -> (Decision, Option<Direction>) {
        self.decide_by_sided(parties, port, |r| Self::kafka_allows(r, req))
    }
}

/// A secret held by the broker, as `terminatingTLS.secret` names it (namespace default: `default`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SecretName {
    pub namespace: String,
    pub name: String,
}

impl SecretName {
    /// The secret a compiled `terminatingTLS` / `originatingTLS` names, if any.
    fn of_tls_context(tls: &TlsContext) -> Option<SecretName> {
        tls.secret
            .as_ref()
            .map(|s| SecretName { namespace: s.namespace_or_default().to_string(), name: s.name.clone() })
    }
}

/// `pattern` is a lower-case DNS name or `*.` followed by one; a wildcard covers exactly one label.
fn server_name_matches(pattern: &str, sni: &str) -> bool {
    let sni = sni.trim_end_matches('.').to_ascii_lowercase();
    match pattern.strip_prefix("*.") {
        Some(suffix) => sni.split_once('.').is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
        None => sni == pattern,
    }
}

/// Port ranges up to this wide are indexed port by port; wider ones are checked one by one.
const EXPAND_RANGE: u32 = 64;

/// One party's rules (indices into `Tables::rules`, ascending), by port.
#[derive(Default)]
struct PartyRules {
    by_port: HashMap<u16, PortRules>,
    /// Rules whose port range is wider than [`EXPAND_RANGE`].
    wide: Vec<usize>,
}

/// A party's rules on one port: all of them, and apart by the peers they name.
#[derive(Default)]
struct PortRules {
    all: Vec<usize>,
    any_peer: Vec<usize>,
    by_peer: HashMap<u32, Vec<usize>>,
}

impl PartyRules {
    fn insert(&mut self, i: usize, r: &Rule) {
        let (lo, hi) = r.ports;
        if lo > hi {
            return;
        }
        if u32::from(hi) - u32::from(lo) >= EXPAND_RANGE {
            self.wide.push(i);
            return;
        }
        for port in lo..=hi {
            let bucket = self.by_port.entry(port).or_default();
            bucket.all.push(i);
            match &r.peers {
                None => bucket.any_peer.push(i),
                Some(peers) => {
                    for p in peers {
                        bucket.by_peer.entry(*p).or_default().push(i);
                    }
                }
            }
        }
    }
}

/// Two ascending index sequences as one.
fn merge(a: impl Iterator<Item = usize>, b: impl Iterator<Item = usize>) -> impl Iterator<Item = usize> {
    let (mut a, mut b) = (a.peekable(), b.peekable());
    std::iter::from_fn(move || match (a.peek(), b.peek()) {
        (Some(x), Some(y)) if x <= y => a.next(),
        (Some(_), Some(_)) => b.next(),
        (Some(_), None) => a.next(),
        (None, _) => b.next(),
    })
}

impl Rule {
    fn covers(&self, port: u16) -> bool {
        self.ports.0 <= port && port <= self.ports.1
    }

    fn matches(&self, req: &RequestInfo) -> bool {
        match &self.matcher {
            Matcher::AllowAll => true,
            Matcher::Tls => false,
            // Kafka rules never match an HTTP request.
            Matcher::Kafka(_) => false,
            Matcher::Grpc(rules) => req.grpc.is_some_and(|(service, method)| rules.matches(service, method)),
            Matcher::Http(set) => set.candidates(req.path).any(|h| h.matches(req)),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn host_rule_values_and_authority_splitting() {
        use super::{host_rule_value, split_authority};
        assert_eq!(host_rule_value("API.Example.", Some(8080), 8080), "api.example");
        assert_eq!(host_rule_value("api.example", Some(9999), 8080), "api.example:9999");
        assert_eq!(host_rule_value("[::1]", None, 80), "[::1]");
        assert_eq!(split_authority("a:8080"), ("a", Some(8080)));
        assert_eq!(split_authority("[::1]:80"), ("[::1]", Some(80)));
        assert_eq!(split_authority("[::1]"), ("[::1]", None));
        assert_eq!(split_authority("a"), ("a", None));
    }

    use super::*;

    #[test]
    fn server_name_wildcards_cover_exactly_one_label() {
        assert!(server_name_matches("api.example.com", "API.example.com."));
        assert!(server_name_matches("*.example.com", "a.example.com"));
        assert!(!server_name_matches("*.example.com", "example.com"));
        assert!(!server_name_matches("*.example.com", "a.b.example.com"));
        assert!(!server_name_matches("*.example.com", ".example.com"));
        assert!(!server_name_matches("api.example.com", "api.example.com.evil"));
    }

    fn tables(json: serde_json::Value) -> Tables {
        Tables::build(&serde_json::from_value(json).unwrap())
    }

    fn req<'a>(method: &'a str, path: &'a str, headers: &'a http::HeaderMap) -> RequestInfo<'a> {
        RequestInfo { method, path, host: "deathstar", headers, grpc: None }
    }

    #[test]
    fn getting_started_http_rules() {
        let t = tables(serde_json::json!({
            "proxy_rules": [{
                "endpoint": "deathstar", "endpoint_id": 1, "direction": "ingress", "ports": [80, 80],
                "peers": {"identities": [257]},
                "l7": {"type": "http", "rules": [{"method": "POST", "path": "/v1/request-landing"}]},
                "policy": "default/rule1", "policy_id": 1, "audit": false
            }]
        }));
        let h = http::HeaderMap::new();
        let tie = [Party { endpoint_id: 1, direction: Direction::Ingress, peer: 257 }];
        assert_eq!(
            t.decide(&tie, 80, &req("POST", "/v1/request-landing", &h)),
            Decision::Allow { policy: Some("default/rule1".into()) }
        );
        assert_eq!(
            t.decide(&tie, 80, &req("PUT", "/v1/exhaust-port", &h)),
            Decision::Deny { policy: "default/rule1".into() }
        );
        assert_eq!(
            t.decide(&tie, 80, &req("POST", "/v1/request-landing?x", &h)),
            Decision::Deny { policy: "default/rule1".into() },
            "whole-value path match includes the query"
        );
        let other = [Party { endpoint_id: 1, direction: Direction::Ingress, peer: 300 }];
        assert!(matches!(t.decide(&other, 80, &req("POST", "/v1/request-landing", &h)), Decision::Deny { .. }));
        assert!(matches!(t.decide(&tie, 8080, &req("PUT", "/", &h)), Decision::Allow { .. }), "no rule on that port");
    }

    /// A version's numbers (endpoint ids, identities) are its own: a workload starting before
    /// `client` in name order renumbers it. Parties resolved from the cgroups in each version's
    /// tables judge the same connection the same way; the old version's numbers do not.
    #[test]
    fn parties_are_resolved_from_cgroups_in_each_version() {
        let version = |v: u64, workloads: &[(&str, u64)]| {
            let listed: Vec<_> = workloads
                .iter()
                .enumerate()
                .map(|(i, (name, cgroup))| {
                    serde_json::json!({"cgroup_id": cgroup, "endpoint_id": i + 1, "identity": 256 + i,
                                       "name": name, "namespace": "default"})
                })
                .collect();
            let at = |name: &str| workloads.iter().position(|(n, _)| *n == name).unwrap();
            tables(serde_json::json!({
                "version": v,
                "workloads": listed,
                "proxy_rules": [{
                    "endpoint_id": at("server") + 1, "direction": "ingress", "ports": [80, 80],
                    "peers": {"identities": [256 + at("client")]},
                    "l7": {"type": "http", "rules": [{"method": "GET"}]}, "policy": "p"
                }]
            }))
        };
        let v1 = version(1, &[("client", 10), ("server", 20)]);
        let v2 = version(2, &[("a-new", 30), ("client", 10), ("server", 20)]);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let h = http::HeaderMap::new();
        let get = req("GET", "/", &h);
        for t in [&v1, &v2] {
            let parties = t.parties(Some(10), ip, Some(20), ip).unwrap();
            assert!(matches!(t.decide(&parties, 80, &get), Decision::Allow { .. }), "version {}", t.version);
        }
        // Version 1's numbers name other workloads in version 2 (endpoint 2 is `client` there).
        let kept = v1.parties(Some(10), ip, Some(20), ip).unwrap();
        let fresh = v2.parties(Some(10), ip, Some(20), ip).unwrap();
        assert_ne!(v2.decide(&kept, 80, &get), v2.decide(&fresh, 80, &get));
        assert_eq!(
            v1.parties(Some(30), ip, Some(20), ip).unwrap_err(),
            UnknownWorkload { cgroup_id: 30, version: 1 },
            "a workload the version does not know has no parties"
        );
        let outside = v2.parties(None, "10.1.2.3".parse().unwrap(), Some(20), ip).unwrap();
        assert_eq!(outside.len(), 1);
        assert!(matches!(v2.decide(&outside, 80, &get), Decision::Deny { .. }));
    }

    #[test]
    fn headers_grpc_and_allow_all() {
        let t = tables(serde_json::json!({
            "ipcache": [["10.0.0.0/8", 16777216]],
            "proxy_rules": [
                {"endpoint_id": 2, "direction": "egress", "ports": [80, 80], "peers": "any", "policy": "p",
                 "l7": {"type": "http", "rules": [{"headers": ["X-Token: yes", "X-Trace"]}]}},
                {"endpoint_id": 2, "direction": "egress", "ports": [50051, 50051], "peers": "any", "policy": "g",
                 "l7": {"type": "grpc", "rules": [{"service": "helloworld.Greeter", "method": "SayHello"}]}},
                {"endpoint_id": 2, "direction": "egress", "ports": [80, 80], "peers": {"identities": [9]}, "policy": "l4",
                 "l7": {"type": "allowall"}}
            ]
        }));
        let party = |peer| [Party { endpoint_id: 2, direction: Direction::Egress, peer }];
        let mut h = http::HeaderMap::new();
        assert!(matches!(t.decide(&party(5), 80, &req("GET", "/", &h)), Decision::Deny { .. }));
        h.insert("x-token", "yes".parse().unwrap());
        h.insert("x-trace", "1".parse().unwrap());
        assert!(matches!(t.decide(&party(5), 80, &req("GET", "/", &h)), Decision::Allow { .. }));
        let empty = http::HeaderMap::new();
        assert!(
            matches!(t.decide(&party(9), 80, &req("GET", "/", &empty)), Decision::Allow { .. }),
            "L3 allow of the peer lifts the L7 rules"
        );
        let g = |method| RequestInfo {
            method: "POST",
            path: "/",
            host: "",
            headers: &empty,
            grpc: Some(("helloworld.Greeter", method)),
        };
        assert!(matches!(t.decide(&party(5), 50051, &g("SayHello")), Decision::Allow { .. }));
        assert!(matches!(t.decide(&party(5), 50051, &g("SayGoodbye")), Decision::Deny { .. }));
        assert_eq!(t.identity_of("10.1.2.3".parse().unwrap()), 16777216);
        assert_eq!(t.identity_of("127.0.0.1".parse().unwrap()), HOST);
        assert_eq!(t.identity_of("8.8.8.8".parse().unwrap()), WORLD);
    }

    #[test]
    fn audit_rules_let_through_what_only_they_deny() {
        let t = tables(serde_json::json!({
            "proxy_rules": [
                {"endpoint_id": 3, "direction": "egress", "ports": [80, 80], "peers": "any", "policy": "enforced",
                 "l7": {"type": "http", "rules": [{"path": "/public/.*"}]}},
                {"endpoint_id": 3, "direction": "egress", "ports": [81, 81], "peers": "any", "policy": "dry-run",
                 "audit": true, "l7": {"type": "http", "rules": [{"path": "/public/.*"}]}},
                {"endpoint_id": 3, "direction": "egress", "ports": [9092, 9092], "peers": "any", "policy": "kafka",
                 "l7": {"type": "kafka", "rules": [{"role": "produce", "topic": "ok"}]}}
            ]
        }));
        let h = http::HeaderMap::new();
        let party = [Party { endpoint_id: 3, direction: Direction::Egress, peer: 9 }];
        assert_eq!(t.decide(&party, 81, &req("GET", "/private", &h)), Decision::Audit { policy: "dry-run".into() });
        assert_eq!(
            t.decide(&party, 81, &req("GET", "/public/a", &h)),
            Decision::Allow { policy: Some("dry-run".into()) }
        );
        assert_eq!(t.decide(&party, 80, &req("GET", "/private", &h)), Decision::Deny { policy: "enforced".into() });
        let k = |topic| KafkaRequest { api_key: 0, version: 9, client_id: "c", topic: Some(topic) };
        assert_eq!(t.decide_kafka(&party, 9092, &k("ok")), Decision::Allow { policy: Some("kafka".into()) });
        assert_eq!(t.decide_kafka(&party, 9092, &k("secret")), Decision::Deny { policy: "kafka".into() });
        assert_eq!(t.decide_kafka(&party, 9092, &KafkaRequest { api_key: 1, ..k("ok") }).verdict(), Verdict::Denied);
    }

    #[test]
    fn patterns_compile_on_first_use_and_a_bad_one_matches_nothing() {
        let t = tables(serde_json::json!({
            "proxy_rules": [
                {"endpoint_id": 5, "direction": "egress", "ports": [80, 80], "peers": "any", "policy": "p",
                 "l7": {"type": "http", "rules": [{"path": "/ok/[0-9]+"}, {"path": "/bad/(unclosed"}]}}
            ]
        }));
        assert_eq!(t.errors.len(), 1, "{:?}", t.errors);
        assert!(t.errors[0].contains("/bad/(unclosed"), "{:?}", t.errors);
        let h = http::HeaderMap::new();
        let party = [Party { endpoint_id: 5, direction: Direction::Egress, peer: 9 }];
        assert_eq!(t.decide(&party, 80, &req("GET", "/ok/12", &h)).verdict(), Verdict::Allowed);
        assert_eq!(
            t.decide(&party, 80, &req("GET", "/ok/12x", &h)).verdict(),
            Verdict::Denied,
            "anchored at both ends"
        );
        assert_eq!(t.decide(&party, 80, &req("GET", "/bad/(unclosed", &h)).verdict(), Verdict::Denied);
    }

    /// A pattern that closes the wrapper's group (`GET)|(.*`) would, wrapped, match every value:
    /// it is refused as a pattern, so the rule allows nothing.
    #[test]
    fn a_pattern_cannot_break_out_of_its_anchors() {
        let t = tables(serde_json::json!({
            "proxy_rules": [
                {"endpoint_id": 5, "direction": "egress", "ports": [80, 80], "peers": "any", "policy": "p",
                 "l7": {"type": "http", "rules": [{"method": "GET)|(.*"}, {"path": "/x)|(/.*"}]}}
            ]
        }));
        assert_eq!(t.errors.len(), 2, "{:?}", t.errors);
        let h = http::HeaderMap::new();
        let party = [Party { endpoint_id: 5, direction: Direction::Egress, peer: 9 }];
        for (m, p) in [("DELETE", "/"), ("GET", "/anything"), ("GET)|(.*", "/")] {
            assert_eq!(t.decide(&party, 80, &req(m, p, &h)).verdict(), Verdict::Denied, "{m} {p}");
        }
    }

    #[test]
    fn grpc_services_and_kafka_topics_are_indexed() {
        let mut services: Vec<serde_json::Value> =
            (0..1000).map(|i| serde_json::json!({"service": format!("bench.Service{i}"), "method": "Get"})).collect();
        services.push(serde_json::json!({"service": "open.Everything"}));
        let mut topics: Vec<serde_json::Value> =
            (0..1000).map(|i| serde_json::json!({"role": "produce", "topic": format!("t{i}")})).collect();
        topics.push(serde_json::json!({"apiKey": "metadata"}));
        topics.push(serde_json::json!({"role": "consume", "topic": "t7", "clientID": "reader"}));
        let t = tables(serde_json::json!({
            "proxy_rules": [
                {"endpoint_id": 4, "direction": "egress", "ports": [50051, 50051], "peers": "any", "policy": "g",
                 "l7": {"type": "grpc", "rules": services}},
                {"endpoint_id": 4, "direction": "egress", "ports": [9092, 9092], "peers": "any", "policy": "k",
                 "l7": {"type": "kafka", "rules": topics}}
            ]
        }));
        let party = [Party { endpoint_id: 4, direction: Direction::Egress, peer: 9 }];
        let h = http::HeaderMap::new();
        let g = |service, method| RequestInfo {
            method: "POST",
            path: "/",
            host: "",
            headers: &h,
            grpc: Some((service, method)),
        };
        let grpc = |service, method| t.decide(&party, 50051, &g(service, method)).verdict();
        assert_eq!(grpc("bench.Service999", "Get"), Verdict::Allowed);
        assert_eq!(grpc("bench.Service999", "Put"), Verdict::Denied);
        assert_eq!(grpc("bench.Service1000", "Get"), Verdict::Denied);
        assert_eq!(grpc("open.Everything", "Anything"), Verdict::Allowed, "a service rule without a method allows all");
        let k = |api_key, client_id, topic| KafkaRequest { api_key, version: 9, client_id, topic };
        let kafka = |r: &KafkaRequest| t.decide_kafka(&party, 9092, r).verdict();
        assert_eq!(kafka(&k(0, "w", Some("t999"))), Verdict::Allowed);
        assert_eq!(kafka(&k(0, "w", Some("t1000"))), Verdict::Denied);
        assert_eq!(kafka(&k(1, "w", Some("t7"))), Verdict::Denied, "fetch of t7 needs client id reader");
        assert_eq!(kafka(&k(1, "reader", Some("t7"))), Verdict::Allowed);
        assert_eq!(kafka(&k(3, "w", None)), Verdict::Allowed, "metadata for no topic: the apiKey rule");
        assert_eq!(kafka(&k(3, "w", Some("t1000"))), Verdict::Allowed, "metadata names no topic in its rule");
        assert_eq!(
            kafka(&k(0, "w", None)),
            Verdict::Allowed,
            "produce naming no topic: topic rules do not constrain it"
        );
        assert_eq!(kafka(&k(19, "w", None)), Verdict::Denied, "create topics: no rule allows the key");
        assert_eq!(kafka(&k(1, "reader", None)), Verdict::Allowed, "a topicless fetch: t7's consume rule for reader");
        assert_eq!(kafka(&k(1, "w", None)), Verdict::Denied, "no consume rule for client w");
        assert!(t.names_kafka_topic("t999") && t.names_kafka_topic("t7"));
        assert!(!t.names_kafka_topic("t1000") && !t.names_kafka_topic(""));
    }

    /// Rules are found by party, port and peer: the same verdicts (and deciding policies) as a
    /// scan of every rule, with wide port ranges, expanded ranges and thousands of ports.
    #[test]
    fn rules_are_indexed_by_port_and_peer() {
        let http = |path: &str| serde_json::json!({"type": "http", "rules": [{"path": path}]});
        let mut rules = vec![
            serde_json::json!({"endpoint_id": 8, "direction": "ingress", "ports": [1000, 9000], "peers": "any",
                               "policy": "wide", "l7": http("/wide")}),
            serde_json::json!({"endpoint_id": 8, "direction": "ingress", "ports": [80, 80], "peers": {"identities": [5]},
                               "policy": "a", "l7": http("/a")}),
            serde_json::json!({"endpoint_id": 8, "direction": "ingress", "ports": [80, 80], "peers": {"identities": [6, 5]},
                               "policy": "b", "l7": http("/b")}),
            serde_json::json!({"endpoint_id": 8, "direction": "ingress", "ports": [81, 90], "peers": "any",
                               "policy": "l4", "l7": {"type": "allowall"}}),
            serde_json::json!({"endpoint_id": 8, "direction": "ingress", "ports": [5000, 5000], "peers": {"identities": [9]},
                               "policy": "narrow", "l7": http("/narrow")}),
        ];
        for i in 0..2000u32 {
            rules.push(serde_json::json!({"endpoint_id": 8, "direction": "ingress", "ports": [20000 + i, 20000 + i],
                                          "peers": {"identities": [1000 + i]}, "policy": format!("p{i}"), "l7": http("/x")}));
        }
        let t = tables(serde_json::json!({ "proxy_rules": rules }));
        let h = http::HeaderMap::new();
        let d = |peer: u32, port: u16, path: &str| {
            t.decide(&[Party { endpoint_id: 8, direction: Direction::Ingress, peer }], port, &req("GET", path, &h))
        };
        assert_eq!(d(5, 80, "/a"), Decision::Allow { policy: Some("a".into()) });
        assert_eq!(d(5, 80, "/b"), Decision::Allow { policy: Some("b".into()) });
        assert_eq!(d(6, 80, "/a"), Decision::Deny { policy: "b".into() }, "the last rule tried for the peer");
        assert_eq!(d(7, 80, "/a"), Decision::Deny { policy: "a".into() }, "no rule for the peer: the port's first");
        assert_eq!(d(7, 85, "/anything").verdict(), Verdict::Allowed);
        assert_eq!(d(7, 5000, "/wide"), Decision::Allow { policy: Some("wide".into()) });
        assert_eq!(d(9, 5000, "/narrow"), Decision::Allow { policy: Some("narrow".into()) }, "wide and exact merge");
        assert_eq!(d(7, 5000, "/narrow"), Decision::Deny { policy: "wide".into() });
        assert_eq!(d(1500, 20500, "/x"), Decision::Allow { policy: Some("p500".into()) });
        assert_eq!(d(1501, 20500, "/x"), Decision::Deny { policy: "p500".into() });
        assert_eq!(d(1, 9001, "/"), Decision::Allow { policy: None }, "no rule on the port");
        assert!(t.has_http_rules(8, Direction::Ingress, 21999) && !t.has_http_rules(8, Direction::Ingress, 22000));
        assert!(t.has_http_rules(8, Direction::Ingress, 9000) && !t.has_http_rules(8, Direction::Ingress, 85));
    }

    /// A rule's apiVersion and clientID constrain it whatever the topic index holds beside it.
    #[test]
    fn kafka_version_and_client_id_constraints() {
        let t = tables(serde_json::json!({
            "proxy_rules": [
                {"endpoint_id": 6, "direction": "egress", "ports": [9092, 9092], "peers": "any", "policy": "k",
                 "l7": {"type": "kafka", "rules": [
                    {"apiKey": "produce", "apiVersion": "9", "topic": "a"},
                    {"apiKey": "produce", "clientID": "w", "topic": "a"},
                    {"apiKey": "fetch", "apiVersion": "11", "clientID": "r"},
                    {"apiKey": "produce", "apiVersion": "x", "topic": "b"}
                 ]}}
            ]
        }));
        let party = [Party { endpoint_id: 6, direction: Direction::Egress, peer: 9 }];
        let k = |api_key, version, client_id, topic| {
            t.decide_kafka(&party, 9092, &KafkaRequest { api_key, version, client_id, topic }).allows()
        };
        assert!(k(0, 9, "any", Some("a")) && k(0, 7, "w", Some("a")));
        assert!(!k(0, 7, "other", Some("a")), "neither the version nor the client fits");
        assert!(k(1, 11, "r", Some("whatever")) && !k(1, 11, "x", Some("a")) && !k(1, 12, "r", None));
        assert!(!k(0, 9, "w", Some("b")), "an unparsable version allows nothing");
        assert!(k(0, 9, "q", None) && !k(0, 8, "q", None), "topicless: any rule of the key fits");
    }

    #[test]
    fn path_rules_are_indexed_by_their_literal_prefix() {
        assert_eq!(literal_prefix("/v1/.*").as_deref(), Some("/v1/"));
        assert_eq!(literal_prefix("/api/v1/resource-7/[0-9]+").as_deref(), Some("/api/v1/resource-7/"));
        assert_eq!(literal_prefix("/a|/b").as_deref(), Some("/"));
        assert_eq!(literal_prefix("(?i)/Admin").as_deref(), Some("/"));
        assert_eq!(literal_prefix(".*"), None);
        assert_eq!(literal_prefix("[a-z]+/x"), None);
        let mut rules: Vec<serde_json::Value> = (0..2000)
            .map(|i| serde_json::json!({"method": "GET", "path": format!("/api/v1/resource-{i}/[0-9]+")}))
            .collect();
        rules.push(serde_json::json!({"path": "(?i)/PUBLIC/.*"}));
        rules.push(serde_json::json!({"method": "POST"}));
        let t = tables(serde_json::json!({
            "proxy_rules": [{"endpoint_id": 4, "direction": "egress", "ports": [80, 80], "peers": "any", "policy": "p",
                             "l7": {"type": "http", "rules": rules}}]
        }));
        let h = http::HeaderMap::new();
        let party = [Party { endpoint_id: 4, direction: Direction::Egress, peer: 1 }];
        let ok = |m: &str, p: &str| t.decide(&party, 80, &req(m, p, &h)).allows();
        assert!(ok("GET", "/api/v1/resource-1999/42"));
        assert!(ok("GET", "/api/v1/resource-0/1"));
        assert!(!ok("GET", "/api/v1/resource-0/x"), "the regex still decides after the prefix");
        assert!(!ok("GET", "/api/v1/resource-2000/1"));
        assert!(!ok("PUT", "/api/v1/resource-5/1"));
        assert!(ok("GET", "/public/a") && ok("GET", "/Public/b"), "case-insensitive pattern");
        assert!(ok("POST", "/anything"), "a rule without a path");
        assert!(!ok("GET", "/"));
        assert!(!ok("GET", "/ä/"), "non-ASCII paths are looked up safely");
    }
}

//! Context labels (`--metrics-context`): opt-in labels naming who talked to whom (workload,
//! namespace, chosen workload labels) and what the request was (HTTP method, status class,
//! gRPC status), on the connection and request families.
//!
//! Every value comes from what the node knows, never from the wire as is: a workload is one the
//! policy stream registered (a peer it does not know is `world`, a local socket it cannot name
//! `unknown`), a method outside the standard set is `other`, a status is a class. And each
//! family holds at most `--metrics-max-series` label sets: past it a new label set is counted
//! with every context value `other` (and `l7mesh_limits_tripped_total{limit="metrics_series"}`
//! counts it), so no peer can grow the exporter without bound.

use std::borrow::Cow;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use l7mesh_api::Direction;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};

use crate::registry::WorkloadInfo;

/// The context labels of one series, in the order the configuration names them (the keys
/// are shared with the configuration; the values are the node's words or its workloads' names).
pub type ContextLabels = Vec<(Arc<str>, Cow<'static, str>)>;

/// The value of a peer the node does not know (an address outside the node).
pub const WORLD: &str = "world";
/// The value of a local socket the tables do not name (a cgroup no workload registered).
pub const UNKNOWN: &str = "unknown";
/// The value every context label takes in a series past the bound, and a method outside the
/// standard set.
pub const OTHER: &str = "other";
/// The value of what a request does not have (no answer yet, no gRPC status in the head).
pub const NONE: &str = "none";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Source,
    Destination,
}

impl Side {
    fn prefix(self) -> &'static str {
        match self {
            Side::Source => "source",
            Side::Destination => "destination",
        }
    }
}

/// One context label.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Item {
    Workload(Side),
    Namespace(Side),
    /// A workload label (its key as the workload carries it).
    Label(Side, String),
    Method,
    StatusClass,
    GrpcStatus,
}

impl Item {
    /// Whether the item describes a request (not applicable to connections, nor to Kafka,
    /// whose family carries its own `api_key`).
    fn is_http(&self) -> bool {
        matches!(self, Item::Method | Item::StatusClass | Item::GrpcStatus)
    }
}

/// What `--metrics-context` chose; empty (the default) adds no label at all.
#[derive(Clone, Debug, Default)]
pub struct MetricsContext {
    items: Vec<(Item, Arc<str>)>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ContextError {
    #[error(
        "unknown metrics context `{0}` (known: workload, source_workload, destination_workload, namespace, \
         source_namespace, destination_namespace, label:KEY, source_label:KEY, destination_label:KEY, method, \
         status_class, grpc_status)"
    )]
    Unknown(String),
    #[error("metrics context `{0}`: a label key must be non-empty and printable")]
    BadLabelKey(String),
    #[error("metrics context: `{0}` is named twice (or two label keys give the same label name)")]
    Duplicate(String),
}

/// The Prometheus label name for a workload label key: `[a-zA-Z0-9_]`, the rest `_`.
fn label_name(side: Side, key: &str) -> String {
    let clean: String = key.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    format!("{}_label_{clean}", side.prefix())
}

impl std::str::FromStr for MetricsContext {
    type Err = ContextError;

    /// A comma-separated list, e.g. `workload,namespace,label:app,method,status_class`.
    fn from_str(s: &str) -> Result<Self, ContextError> {
        let both = [Side::Source, Side::Destination];
        let mut items: Vec<(Item, Arc<str>)> = Vec::new();
        for word in s.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            let (sides, what): (&[Side], &str) = match word.split_once('_') {
                Some(("source", rest)) => (&both[..1], rest),
                Some(("destination", rest)) => (&both[1..], rest),
                _ => (&both[..], word),
            };
            let mut add = |item: Item, name: String| -> Result<(), ContextError> {
                if items.iter().any(|(i, n)| *i == item || **n == *name) {
                    return Err(ContextError::Duplicate(name));
                }
                items.push((item, name.into()));
                Ok(())
            };
            match what {
                "workload" | "namespace" => {
                    for &side in sides {
                        let item = if what == "workload" { Item::Workload(side) } else { Item::Namespace(side) };
                        add(item, format!("{}_{what}", side.prefix()))?;
                    }
                }
                _ if what.starts_with("label:") => {
                    let key = what["label:".len()..].trim().trim_start_matches("k8s:");
                    if key.is_empty() || key.chars().any(|c| c.is_control() || c.is_whitespace()) {
                        return Err(ContextError::BadLabelKey(word.to_string()));
                    }
                    for &side in sides {
                        add(Item::Label(side, key.to_string()), label_name(side, key))?;
                    }
                }
                "method" | "status_class" | "grpc_status" if sides.len() == 2 => {
                    let item = match what {
                        "method" => Item::Method,
                        "status_class" => Item::StatusClass,
                        _ => Item::GrpcStatus,
                    };
                    add(item, what.to_string())?;
                }
                _ => return Err(ContextError::Unknown(word.to_string())),
            }
        }
        Ok(MetricsContext { items })
    }
}

/// The two ends of a connection or request, as the node knows them.
#[derive(Clone, Copy, Debug)]
pub struct Parties<'a> {
    pub direction: Direction,
    pub source: Option<&'a WorkloadInfo>,
    pub destination: Option<&'a WorkloadInfo>,
}

impl Parties<'_> {
    fn end(&self, side: Side) -> Result<&WorkloadInfo, &'static str> {
        let (w, local) = match side {
            // An egress connection's source, and an ingress one's destination, are sockets of
            // this node: not named means not registered, not the outside world.
            Side::Source => (self.source, self.direction == Direction::Egress),
            Side::Destination => (self.destination, self.direction == Direction::Ingress),
        };
        w.ok_or(if local { UNKNOWN } else { WORLD })
    }
}

/// What a request carried, for the request items.
#[derive(Clone, Copy, Debug)]
pub struct RequestFacts<'a> {
    pub method: &'a str,
    /// The HTTP status answered; 0 when there was none.
    pub code: u16,
    /// The `grpc-status` of the answer's head, for gRPC.
    pub grpc_status: Option<&'a str>,
}

/// The standard methods (RFC 9110 and PATCH), lower case; anything else is `other`.
pub fn method_value(method: &str) -> &'static str {
    const STANDARD: [(&str, &str); 9] = [
        ("GET", "get"),
        ("HEAD", "head"),
        ("POST", "post"),
        ("PUT", "put"),
        ("DELETE", "delete"),
        ("CONNECT", "connect"),
        ("OPTIONS", "options"),
        ("TRACE", "trace"),
        ("PATCH", "patch"),
    ];
    STANDARD.iter().find(|(m, _)| *m == method).map_or(OTHER, |(_, v)| v)
}

/// `1xx` .. `5xx`; `none` for no answer, `other` for a code outside 100..=599.
pub fn status_class(code: u16) -> &'static str {
    match code {
        0 => NONE,
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => OTHER,
    }
}

/// gRPC's status codes by name, lower case; a value outside them is `other`, no status `none`.
pub fn grpc_status_value(status: Option<&str>) -> &'static str {
    const CODES: [&str; 17] = [
        "ok",
        "cancelled",
        "unknown",
        "invalid_argument",
        "deadline_exceeded",
        "not_found",
        "already_exists",
        "permission_denied",
        "resource_exhausted",
        "failed_precondition",
        "aborted",
        "out_of_range",
        "unimplemented",
        "internal",
        "unavailable",
        "data_loss",
        "unauthenticated",
    ];
    match status {
        None => NONE,
        Some(s) => s.parse::<usize>().ok().and_then(|n| CODES.get(n)).copied().unwrap_or(OTHER),
    }
}

impl MetricsContext {
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The label names, in order (for documentation and tests).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.items.iter().map(|(_, n)| &**n)
    }

    /// The context labels of a connection (workload items only).
    pub fn connection(&self, parties: Parties<'_>) -> ContextLabels {
        self.labels(parties, None)
    }

    /// The context labels of a Kafka request (workload items only: the family has `api_key`).
    pub fn kafka(&self, parties: Parties<'_>) -> ContextLabels {
        self.labels(parties, None)
    }

    /// The context labels of an HTTP or gRPC request.
    pub fn request(&self, parties: Parties<'_>, facts: RequestFacts<'_>) -> ContextLabels {
        self.labels(parties, Some(facts))
    }

    fn labels(&self, parties: Parties<'_>, facts: Option<RequestFacts<'_>>) -> ContextLabels {
        if self.items.is_empty() {
            return Vec::new();
        }
        let name = |w: &WorkloadInfo| escaped(&w.name);
        self.items
            .iter()
            .filter(|(item, _)| facts.is_some() || !item.is_http())
            .map(|(item, key)| {
                let value: Cow<'static, str> = match item {
                    Item::Workload(side) => parties.end(*side).map_or_else(Cow::Borrowed, name),
                    Item::Namespace(side) => parties.end(*side).map_or_else(Cow::Borrowed, |w| escaped(&w.namespace)),
                    // A known workload without the label: empty (Prometheus reads it as absent).
                    Item::Label(side, k) => parties
                        .end(*side)
                        .map_or_else(Cow::Borrowed, |w| w.labels.get(k).map_or(Cow::Borrowed(""), |v| escaped(v))),
                    Item::Method => Cow::Borrowed(facts.map_or(NONE, |f| method_value(f.method))),
                    Item::StatusClass => Cow::Borrowed(facts.map_or(NONE, |f| status_class(f.code))),
                    Item::GrpcStatus => Cow::Borrowed(facts.map_or(NONE, |f| grpc_status_value(f.grpc_status))),
                };
                (key.clone(), value)
            })
            .collect()
    }
}

/// A name the node was given, as the text exposition writes a label value (the encoder writes
/// values as they are: a quote or a line break would end the line early).
fn escaped(s: &str) -> Cow<'static, str> {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// A family whose series carry context labels, bounded: at most `bound` label sets with
/// context, past it new ones collapse to the `other` set of their fixed labels. Without
/// context labels (the default) it is a plain family: its fixed labels are few by design.
pub struct Bounded<S, M, C = fn() -> M> {
    family: Family<(S, ContextLabels), M, C>,
    bound: usize,
    /// The label sets with context created so far, held while one is created (so that two
    /// creations cannot both pass the bound). Series are never removed.
    created: Arc<Mutex<usize>>,
    /// `l7mesh_limits_tripped_total{limit="metrics_series"}`.
    tripped: Counter,
}

impl<S, M, C> Clone for Bounded<S, M, C>
where
    Family<(S, ContextLabels), M, C>: Clone,
{
    fn clone(&self) -> Self {
        Bounded {
            family: self.family.clone(),
            bound: self.bound,
            created: self.created.clone(),
            tripped: self.tripped.clone(),
        }
    }
}

impl<S, M, C> Bounded<S, M, C>
where
    S: Clone + Hash + Eq + EncodeLabelSet,
    M: Clone,
    C: MetricConstructor<M>,
{
    pub fn new(family: Family<(S, ContextLabels), M, C>, bound: usize, tripped: Counter) -> Self {
        Bounded { family, bound, created: Arc::new(Mutex::new(0)), tripped }
    }

    /// The family, for registering.
    pub fn family(&self) -> Family<(S, ContextLabels), M, C>
    where
        Family<(S, ContextLabels), M, C>: Clone,
    {
        self.family.clone()
    }

    /// Label sets with context labels held now.
    pub fn series(&self) -> usize {
        *self.created.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the series of `labels` with `context`; past the bound, on the `other` one.
    pub fn with<R>(&self, labels: S, context: ContextLabels, f: impl FnOnce(&M) -> R) -> R {
        let key = (labels, context);
        if key.1.is_empty() {
            return f(&self.family.get_or_create(&key));
        }
        if let Some(m) = self.family.get(&key) {
            return f(&m);
        }
        let mut created = self.created.lock().unwrap_or_else(|e| e.into_inner());
        let key = if self.family.get(&key).is_some() || *created < self.bound {
            key
        } else {
            self.tripped.inc();
            let (labels, context) = key;
            (labels, context.into_iter().map(|(k, _)| (k, Cow::Borrowed(OTHER))).collect())
        };
        if self.family.get(&key).is_none() {
            *created += 1;
        }
        let metric = self.family.get_or_create_owned(&key);
        drop(created);
        f(&metric)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(name: &str, app: &str) -> WorkloadInfo {
        WorkloadInfo {
            cgroup_id: 1,
            node: String::new(),
            endpoint_id: 1,
            identity: 1,
            name: name.into(),
            namespace: "prod".into(),
            labels: [("app".to_string(), app.to_string())].into(),
            egress_enforced_by: Vec::new(),
            ingress_enforced_by: Vec::new(),
        }
    }

    #[test]
    fn parses_the_context_words_and_refuses_the_rest() {
        let c: MetricsContext = "workload, namespace,label:app,method,status_class,grpc_status".parse().unwrap();
        assert_eq!(
            c.names().collect::<Vec<_>>(),
            [
                "source_workload",
                "destination_workload",
                "source_namespace",
                "destination_namespace",
                "source_label_app",
                "destination_label_app",
                "method",
                "status_class",
                "grpc_status"
            ]
        );
        let c: MetricsContext = "source_workload,destination_label:app.kubernetes.io/name".parse().unwrap();
        assert_eq!(c.names().collect::<Vec<_>>(), ["source_workload", "destination_label_app_kubernetes_io_name"]);
        assert!("".parse::<MetricsContext>().unwrap().is_empty());
        for bad in ["ip", "source_ip", "source_method", "label:", "label:a b", "pod"] {
            assert!(bad.parse::<MetricsContext>().is_err(), "{bad}");
        }
        // Two keys that give the same label name would make one series of two.
        assert!(matches!("label:a.b,label:a_b".parse::<MetricsContext>(), Err(ContextError::Duplicate(_))));
        assert!(matches!("workload,source_workload".parse::<MetricsContext>(), Err(ContextError::Duplicate(_))));
    }

    #[test]
    fn values_are_what_the_node_knows() {
        let c: MetricsContext = "workload,namespace,label:app,method,status_class,grpc_status".parse().unwrap();
        let web = workload("web", "frontend");
        let egress_to_world = Parties { direction: Direction::Egress, source: Some(&web), destination: None };
        let facts = RequestFacts { method: "BREW", code: 418, grpc_status: None };
        let values: Vec<String> = c.request(egress_to_world, facts).into_iter().map(|(_, v)| v.into_owned()).collect();
        assert_eq!(values, ["web", "world", "prod", "world", "frontend", "world", "other", "4xx", "none"]);
        // An unregistered local socket is `unknown`, an outside peer `world`.
        let ingress = Parties { direction: Direction::Ingress, source: None, destination: None };
        let facts = RequestFacts { method: "GET", code: 200, grpc_status: Some("7") };
        let values: Vec<String> = c.request(ingress, facts).into_iter().map(|(_, v)| v.into_owned()).collect();
        assert_eq!(
            values,
            ["world", "unknown", "world", "unknown", "world", "unknown", "get", "2xx", "permission_denied"]
        );
        // Connections carry the workload items only.
        assert_eq!(c.connection(ingress).len(), 6);
        assert_eq!(grpc_status_value(Some("17")), OTHER);
        assert_eq!(grpc_status_value(Some("-1")), OTHER);
        assert_eq!(status_class(0), NONE);
        assert_eq!(status_class(999), OTHER);
        assert_eq!(method_value("get"), OTHER, "methods are case-sensitive: `get` is not GET");
    }

    /// A name with a quote, a backslash or a line break cannot end the exposition line early
    /// nor forge another sample.
    #[test]
    fn names_are_escaped_for_the_exposition() {
        #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
        struct Fixed {
            verdict: &'static str,
        }
        let c: MetricsContext = "source_workload,source_label:app".parse().unwrap();
        let evil = workload("w\"} 1e9\nl7mesh_forged 1\\", "a\nb");
        let parties = Parties { direction: Direction::Egress, source: Some(&evil), destination: None };
        let mut registry = prometheus_client::registry::Registry::default();
        let family = Family::<(Fixed, ContextLabels), Counter>::default();
        registry.register("requests", "x", family.clone());
        Bounded::new(family, 10, Counter::default())
            .with(Fixed { verdict: "allowed" }, c.connection(parties), |c| c.inc());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            samples,
            [
                r#"requests_total{verdict="allowed",source_workload="w\"} 1e9\nl7mesh_forged 1\\",source_label_app="a\nb"} 1"#
            ],
            "{text}"
        );
    }

    #[test]
    fn series_past_the_bound_collapse_to_other_and_are_counted() {
        #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
        struct Fixed {
            verdict: &'static str,
        }
        let tripped = Counter::default();
        let family = Family::<(Fixed, ContextLabels), Counter>::default();
        let bounded = Bounded::new(family, 3, tripped.clone());
        let key: Arc<str> = "source_workload".into();
        for i in 0..1000 {
            let context = vec![(key.clone(), Cow::Owned(format!("w{i}")))];
            bounded.with(Fixed { verdict: "allowed" }, context, |c| c.inc());
        }
        // Three real series and the overflow one.
        assert_eq!(bounded.series(), 4);
        assert_eq!(tripped.get(), 997);
        let other = (Fixed { verdict: "allowed" }, vec![(key.clone(), Cow::Borrowed(OTHER))]);
        assert_eq!(bounded.family.get(&other).unwrap().get(), 997);
        // A series that existed before the bound keeps counting as itself.
        bounded.with(Fixed { verdict: "allowed" }, vec![(key.clone(), Cow::Borrowed("w1"))], |c| c.inc());
        assert_eq!(tripped.get(), 997);
        // Without context the fixed labels are the series, unbounded (they are few by design).
        let tripped = Counter::default();
        let plain = Bounded::new(Family::<(Fixed, ContextLabels), Counter>::default(), 1, tripped.clone());
        plain.with(Fixed { verdict: "allowed" }, Vec::new(), |c| c.inc());
        plain.with(Fixed { verdict: "denied" }, Vec::new(), |c| c.inc());
        assert!(plain.family.get(&(Fixed { verdict: "denied" }, Vec::new())).is_some());
        assert_eq!(tripped.get(), 0);
    }
}

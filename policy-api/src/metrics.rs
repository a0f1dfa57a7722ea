//! policy-api's own metrics at `/metrics` (`l7mesh_` prefix): how long applies take, why
//! applies were refused, the version each part of the node has in force, and the REST requests
//! served; beside them the build info and process metrics every l7mesh process exports.

use l7mesh_api::rest::{ApplyStep, InForce};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::node::NodeError;
use crate::server::ServerError;

/// Where a policy change came from.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Origin {
    /// `l7ctl apply` / `l7ctl delete` (`POST`/`DELETE /v1/policies`).
    Api,
    /// A `--policy` file that changed.
    File,
    /// The cluster's policy set, from the kvstore's watch.
    Cluster,
}

/// Why an apply put nothing in force.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum RejectReason {
    /// The documents did not validate (or the upload could not be read).
    Invalid,
    /// They contradict each other or what is stored (conflicts, bad names or labels).
    Conflict,
    /// The version does not fit the kernel's maps.
    TooBig,
    /// l7proxy did not load it in time.
    Proxy,
    /// Writing the kernel's maps failed.
    Kernel,
    /// The store could not commit it.
    Store,
    /// Anything else (an I/O error, the controller task failing).
    Other,
}

impl EncodeLabelValue for Origin {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(
            &match self {
                Origin::Api => "api",
                Origin::File => "file",
                Origin::Cluster => "cluster",
            },
            encoder,
        )
    }
}

impl EncodeLabelValue for RejectReason {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

impl RejectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Invalid => "invalid",
            RejectReason::Conflict => "conflict",
            RejectReason::TooBig => "too_big",
            RejectReason::Proxy => "proxy",
            RejectReason::Kernel => "kernel",
            RejectReason::Store => "store",
            RejectReason::Other => "other",
        }
    }

    pub fn of(e: &ServerError) -> Self {
        match e {
            ServerError::Node(NodeError::Conflicts(_) | NodeError::BadName(_) | NodeError::Labels(_)) => {
                RejectReason::Conflict
            }
            ServerError::Node(NodeError::TooBig(_) | NodeError::Apply { too_big: true, .. }) => RejectReason::TooBig,
            ServerError::Node(NodeError::Apply { step, .. }) => match step {
                ApplyStep::Proxy => RejectReason::Proxy,
                ApplyStep::Kernel => RejectReason::Kernel,
                ApplyStep::Store => RejectReason::Store,
            },
            ServerError::Node(NodeError::Diverged { .. } | NodeError::Store(_)) => RejectReason::Store,
            _ => RejectReason::Other,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OriginLabels {
    pub origin: Origin,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    pub origin: Origin,
    pub reason: RejectReason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ComponentLabels {
    /// `store`, `kernel` or `l7proxy`.
    pub component: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RestLabels {
    /// The route template (`/v1/policies/{*key}`), `unmatched` for a path no route serves:
    /// never the path a client sent.
    pub route: String,
    /// Lower case; a method outside the standard set is `other`.
    pub method: &'static str,
    pub code: u16,
}

pub struct ApiMetrics {
    registry: Registry,
    pub apply_duration: Family<OriginLabels, Histogram>,
    pub rejected_applies: Family<RejectLabels, Counter>,
    pub version_in_force: Family<ComponentLabels, Gauge>,
    pub rest_requests: Family<RestLabels, Counter>,
    /// 1 while the cluster's kvstore answers (only registered in a cluster: a node alone has
    /// no such series).
    kvstore_connected: Gauge,
    kvstore_revision: Gauge,
    kvstore_disconnects: Counter,
}

fn apply_histogram() -> Histogram {
    Histogram::new([0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
}

impl Default for ApiMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ApiMetrics {
    pub fn new() -> Self {
        let mut root = Registry::default();
        l7mesh_api::metrics::register_common(&mut root, "policy-api", env!("CARGO_PKG_VERSION"));
        let registry = root.sub_registry_with_prefix("l7mesh");
        let apply_duration = Family::<OriginLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            apply_histogram as fn() -> Histogram,
        );
        registry.register(
            "policy_apply_duration_seconds",
            "Time to put a policy change in force on the node (validate, compile, l7proxy, kernel, store), by origin",
            apply_duration.clone(),
        );
        let rejected_applies = Family::<RejectLabels, Counter>::default();
        registry.register(
            "policy_rejected_applies",
            "Policy changes that put nothing in force (the last good version stayed), by origin and reason",
            rejected_applies.clone(),
        );
        let version_in_force = Family::<ComponentLabels, Gauge>::default();
        registry.register(
            "policy_version_in_force",
            "The policy version each part of the node has in force (store: committed; kernel: the maps; l7proxy: as it reported loading)",
            version_in_force.clone(),
        );
        let rest_requests = Family::<RestLabels, Counter>::default();
        registry.register(
            "api_requests",
            "REST API requests served, by route, method and status code",
            rest_requests.clone(),
        );
        ApiMetrics {
            registry: root,
            apply_duration,
            rejected_applies,
            version_in_force,
            rest_requests,
            kvstore_connected: Gauge::default(),
            kvstore_revision: Gauge::default(),
            kvstore_disconnects: Counter::default(),
        }
    }

    /// Registers the cluster's series (`--kvstore`): called once, before serving.
    pub fn with_kvstore(mut self) -> Self {
        let registry = self.registry.sub_registry_with_prefix("l7mesh");
        registry.register(
            "kvstore_connected",
            "1 while the cluster's kvstore (etcd) answers; 0 while it does not (the node keeps enforcing the last policy set it had)",
            self.kvstore_connected.clone(),
        );
        registry.register(
            "kvstore_policy_revision",
            "The kvstore revision of the cluster's policy set this node has in force",
            self.kvstore_revision.clone(),
        );
        registry.register(
            "kvstore_disconnects",
            "Times the session with the kvstore ended (unreachable, lease lost, watch cancelled)",
            self.kvstore_disconnects.clone(),
        );
        self
    }

    /// The kvstore session's state now.
    pub fn kvstore(&self, connected: bool, revision: i64) {
        if self.kvstore_connected.get() == 1 && !connected {
            self.kvstore_disconnects.inc();
        }
        self.kvstore_connected.set(connected as i64);
        self.kvstore_revision.set(revision);
    }

    /// The parts' versions as `in_force` says (a part that has none yet is left as it was).
    pub fn in_force(&self, in_force: &InForce) {
        let set = |component, v: Option<u64>| {
            if let Some(v) = v {
                self.version_in_force.get_or_create(&ComponentLabels { component }).set(v as i64);
            }
        };
        set("store", Some(in_force.store));
        set("kernel", in_force.kernel);
        set("l7proxy", in_force.proxy);
    }

    pub fn rejected(&self, origin: Origin, reason: RejectReason) {
        self.rejected_applies.get_or_create(&RejectLabels { origin, reason }).inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The standard methods, lower case; anything else `other`.
pub fn method_label(method: &http::Method) -> &'static str {
    match *method {
        http::Method::GET => "get",
        http::Method::HEAD => "head",
        http::Method::POST => "post",
        http::Method::PUT => "put",
        http::Method::DELETE => "delete",
        http::Method::OPTIONS => "options",
        http::Method::PATCH => "patch",
        http::Method::TRACE => "trace",
        http::Method::CONNECT => "connect",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_its_families_with_operator_values() {
        let m = ApiMetrics::new();
        m.apply_duration.get_or_create(&OriginLabels { origin: Origin::Api }).observe(0.02);
        m.rejected(Origin::File, RejectReason::TooBig);
        m.in_force(&InForce { store: 7, kernel: Some(7), proxy: None, ..Default::default() });
        let text = m.encode();
        assert!(text.contains("l7mesh_policy_rejected_applies_total{origin=\"file\",reason=\"too_big\"} 1"), "{text}");
        assert!(text.contains("l7mesh_policy_version_in_force{component=\"kernel\"} 7"), "{text}");
        assert!(!text.contains("component=\"l7proxy\""), "no version reported yet: no series\n{text}");
        assert!(text.contains("l7mesh_policy_apply_duration_seconds_bucket{le=\"0.025\",origin=\"api\"} 1"), "{text}");
        assert!(text.contains("l7mesh_build_info{component=\"policy-api\""), "{text}");
        assert!(text.contains("\nprocess_resident_memory_bytes "), "{text}");
        let step = |step| {
            ServerError::Node(NodeError::Apply { step, version: 2, in_force: 1, reason: "x".into(), too_big: false })
        };
        assert_eq!(RejectReason::of(&step(ApplyStep::Proxy)), RejectReason::Proxy);
        assert_eq!(RejectReason::of(&step(ApplyStep::Kernel)), RejectReason::Kernel);
        assert_eq!(RejectReason::of(&ServerError::Node(NodeError::Conflicts(vec![]))), RejectReason::Conflict);
        assert_eq!(method_label(&http::Method::from_bytes(b"BREW").unwrap()), "other");
    }
}

//! Prometheus metrics (`l7mesh_` prefix). BPF counters are read from the kernel at scrape time.

use std::sync::Arc;

use l7mesh_api::{Direction, Verdict};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

pub use crate::metric_context::{Bounded, ContextLabels, MetricsContext, Parties, RequestFacts};

/// A verdict as a label value: the flows' words in lower case (`allowed`, `denied`, `audit`,
/// `forwarded`, `error`), like every label value the node chooses.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct VerdictLabel(pub Verdict);

impl VerdictLabel {
    pub fn as_str(self) -> &'static str {
        match self.0 {
            Verdict::Allowed => "allowed",
            Verdict::Denied => "denied",
            Verdict::Audit => "audit",
            Verdict::Forwarded => "forwarded",
            Verdict::Error => "error",
        }
    }
}

impl EncodeLabelValue for VerdictLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

/// The `direction` label of every family: `egress` or `ingress`.
pub fn direction_label(direction: Direction) -> &'static str {
    match direction {
        Direction::Egress => "egress",
        Direction::Ingress => "ingress",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabels {
    pub verdict: VerdictLabel,
    pub direction: &'static str,
    pub hook: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub protocol: &'static str,
    pub direction: &'static str,
    pub verdict: VerdictLabel,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KafkaLabels {
    pub api_key: String,
    /// A topic the policy in force names, [`OTHER_TOPIC`], or empty (the request names none):
    /// never a name only the client chose, so the series stay as many as the policy's topics.
    pub topic: String,
    pub verdict: VerdictLabel,
}

/// The `topic` label of every topic no policy in force names (Kafka topic names cannot hold
/// parentheses, so it never reads as a real topic).
pub const OTHER_TOPIC: &str = "(other)";

/// A bound of the proxy (README, "Bounds"): `l7mesh_limits_tripped_total{limit}` counts each
/// time one is reached. One family for every bound; add a variant per new bound.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Limit {
    /// `--max-kafka-frame`: a client's request frame over the bound (connection closed).
    KafkaRequestFrame,
    /// `--max-kafka-response-frame`: a broker's response frame over the bound (closed).
    KafkaResponseFrame,
    /// `--max-kafka-in-flight`: requests awaiting their answer on one connection; the proxy
    /// reads no further request until one is answered.
    KafkaInFlight,
    /// `--max-kafka-pending-bytes`: bytes held for answers not yet sent on one connection;
    /// the proxy reads no further request until they drain.
    KafkaPendingBytes,
    /// `--max-kafka-items`: a Kafka request (or merged response) decoding into more items
    /// than the bound (connection closed).
    KafkaItems,
    /// `--kafka-frame-timeout`: a Kafka request frame begun and not finished in time (closed).
    KafkaFrameTimeout,
    /// `--max-kafka-frame-bytes`: large request frames being read across all connections
    /// held that many bytes; a further one waited.
    KafkaFrameBytes,
    /// `--kafka-response-timeout`: a broker silent that long while an answer was owed (closed).
    KafkaResponseTimeout,
    /// `--upstream-connect-timeout`: an upstream connect (TCP, TLS, HTTP/2 handshake) took
    /// longer (that request answered 504 / UNAVAILABLE).
    UpstreamConnectTimeout,
    /// `--upstream-max-destinations`: the pool held that many destinations; the least
    /// recently used one was dropped.
    UpstreamPoolDestinations,
    /// `--cert-cache-size`: the certificate cache was full; the least recently used one went.
    TlsCertCache,
    /// `--cert-broker-backoff`: a handshake for a name the broker failed for a moment ago was
    /// refused at once, without asking the broker again.
    TlsBrokerBackoff,
    /// `--upstream-max-connections-per-workload`: a workload held that many upstream
    /// connections and none of its own freed in time (that request answered 503).
    UpstreamConnectionsPerWorkload,
    /// `--max-connections-per-workload`: a workload (or remote address) held that many
    /// proxied connections; its new one was closed at accept.
    ConnectionsPerWorkload,
    /// `--metrics-max-series`: a family held that many label sets with context labels; a new
    /// one was counted with its context labels `other`.
    MetricsSeries,
}

impl Limit {
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::KafkaRequestFrame => "kafka_request_frame",
            Limit::KafkaResponseFrame => "kafka_response_frame",
            Limit::KafkaInFlight => "kafka_in_flight",
            Limit::KafkaPendingBytes => "kafka_pending_bytes",
            Limit::KafkaItems => "kafka_items",
            Limit::KafkaFrameTimeout => "kafka_frame_timeout",
            Limit::KafkaFrameBytes => "kafka_frame_bytes",
            Limit::KafkaResponseTimeout => "kafka_response_timeout",
            Limit::UpstreamConnectTimeout => "upstream_connect_timeout",
            Limit::UpstreamPoolDestinations => "upstream_pool_destinations",
            Limit::TlsCertCache => "tls_cert_cache",
            Limit::TlsBrokerBackoff => "tls_broker_backoff",
            Limit::UpstreamConnectionsPerWorkload => "upstream_connections_per_workload",
            Limit::ConnectionsPerWorkload => "connections_per_workload",
            Limit::MetricsSeries => "metrics_series",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    pub limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub direction: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsLabels {
    /// `terminate`, `originate` or `server_names`.
    pub mode: &'static str,
    /// `ok`, `denied` (policy refused the name) or `failed` (handshake or verification).
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BrokerLabels {
    /// `ok` or `failed` (unreachable, timed out, refused, a bad reply).
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    /// `http1` (idle connections) or `http2` (multiplexed connections).
    pub protocol: &'static str,
}

/// How the request and connection families are labelled (`--metrics-context`,
/// `--metrics-max-series`).
#[derive(Clone, Debug)]
pub struct MetricsConfig {
    pub context: MetricsContext,
    /// Label sets with context one family may hold; past it they collapse to `other`.
    pub max_series: usize,
}

/// The default bound of label sets per family (`--metrics-max-series`): a few thousand
/// workload pairs by method and status, a few megabytes of series at most.
pub const DEFAULT_MAX_SERIES: usize = 10_000;

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { context: MetricsContext::default(), max_series: DEFAULT_MAX_SERIES }
    }
}

/// The request latency buckets, in seconds.
fn request_histogram() -> Histogram {
    Histogram::new([0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0])
}

pub struct Metrics {
    pub registry: Registry,
    /// The context labels `--metrics-context` chose (empty: none).
    pub context: MetricsContext,
    pub redirected_connections: Bounded<DirectionLabels, Counter>,
    pub active_connections: Family<DirectionLabels, Gauge>,
    pub connection_failures: Family<FailureLabels, Counter>,
    pub l4_verdicts: Family<VerdictLabels, Counter>,
    pub requests: Bounded<RequestLabels, Counter>,
    pub request_duration: Bounded<RequestLabels, Histogram>,
    pub kafka_topic_verdicts: Bounded<KafkaLabels, Counter>,
    pub tls_handshakes: Family<TlsLabels, Counter>,
    pub policy_connection_verdicts: Family<crate::flows::PolicyConnectionLabels, Counter>,
    pub policy_request_verdicts: Family<crate::flows::PolicyRequestLabels, Counter>,
    pub limits_tripped: Family<LimitLabels, Counter>,
    pub upstream_pool_destinations: Gauge,
    pub upstream_pool_connections: Family<PoolLabels, Gauge>,
    pub upstream_retries: Counter,
    pub cert_cache_entries: Gauge,
    pub tls_broker_requests: Family<BrokerLabels, Counter>,
    pub flow_history: crate::flow_history::HistoryMetrics,
}

impl Metrics {
    /// Counts one trip of `limit`.
    pub fn limit_tripped(&self, limit: Limit) {
        self.limits_tripped.get_or_create(&LimitLabels { limit: limit.as_str() }).inc();
    }

    pub fn tls_broker_request(&self, result: &'static str) {
        self.tls_broker_requests.get_or_create(&BrokerLabels { result }).inc();
    }

    pub fn tls(&self, mode: &'static str, result: &'static str) {
        self.tls_handshakes.get_or_create(&TlsLabels { mode, result }).inc();
    }
}

impl Metrics {
    /// The families with today's labels only, and (given the datapath's maps) the BPF
    /// counters read at scrape time.
    pub fn new(maps: Option<Arc<dyn crate::datapath::Datapath>>) -> Self {
        Self::configured(maps, MetricsConfig::default())
    }

    /// The families, labelled as `config` says.
    pub fn configured(maps: Option<Arc<dyn crate::datapath::Datapath>>, config: MetricsConfig) -> Self {
        let mut root = Registry::default();
        l7mesh_api::metrics::register_common(&mut root, "l7proxy", env!("CARGO_PKG_VERSION"));
        let registry = root.sub_registry_with_prefix("l7mesh");
        let limits_tripped = Family::<LimitLabels, Counter>::default();
        let series_tripped = limits_tripped.get_or_create_owned(&LimitLabels { limit: Limit::MetricsSeries.as_str() });
        let bound = config.max_series;
        let redirected_connections = Bounded::new(Family::default(), bound, series_tripped.clone());
        registry.register(
            "redirected_connections",
            "Connections the kernel redirected to the proxy and the proxy accepted, by direction",
            redirected_connections.family(),
        );
        let active_connections = Family::<DirectionLabels, Gauge>::default();
        registry.register(
            "proxy_active_connections",
            "Connections the proxy holds open now, by direction",
            active_connections.clone(),
        );
        let connection_failures = Family::<FailureLabels, Counter>::default();
        registry.register(
            "proxy_connection_failures",
            "Proxied connections that ended in an error or were refused, by direction and reason",
            connection_failures.clone(),
        );
        let l4_verdicts = Family::<VerdictLabels, Counter>::default();
        registry.register(
            "l4_verdicts",
            "Connection decisions the kernel reported (its L4 policy), by verdict, direction and hook",
            l4_verdicts.clone(),
        );
        let requests = Bounded::new(Family::default(), bound, series_tripped.clone());
        registry.register(
            "requests",
            "HTTP requests and gRPC calls the proxy judged, by protocol, direction and verdict",
            requests.family(),
        );
        let request_duration = Bounded::new(
            Family::new_with_constructor(request_histogram as fn() -> Histogram),
            bound,
            series_tripped.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from a request's arrival at the proxy to its answer's head, by protocol, direction and verdict",
            request_duration.family(),
        );
        let kafka_topic_verdicts = Bounded::new(Family::default(), bound, series_tripped);
        registry.register(
            "kafka_topic_verdicts",
            "Kafka decisions, one per topic a request names (one for a request naming none), by API key, topic and verdict",
            kafka_topic_verdicts.family(),
        );
        let tls_handshakes = Family::<TlsLabels, Counter>::default();
        registry.register(
            "tls_handshakes",
            "TLS handshakes the proxy made or checked, by mode (terminate, originate, server_names) and result",
            tls_handshakes.clone(),
        );
        let policy_connection_verdicts = Family::<crate::flows::PolicyConnectionLabels, Counter>::default();
        registry.register(
            "policy_connection_verdicts",
            "Connections a named policy decided, by policy, verdict and observer (kernel or proxy)",
            policy_connection_verdicts.clone(),
        );
        let policy_request_verdicts = Family::<crate::flows::PolicyRequestLabels, Counter>::default();
        registry.register(
            "policy_request_verdicts",
            "Requests a named policy decided (HTTP requests, gRPC calls, Kafka topics with a flow), by policy, verdict and protocol",
            policy_request_verdicts.clone(),
        );
        registry.register(
            "limits_tripped",
            "Times a bound of the proxy was reached (the request or connection concerned was refused, waited or was closed), by bound",
            limits_tripped.clone(),
        );
        let flow_history = crate::flow_history::HistoryMetrics::default();
        registry.register(
            "flow_history_written",
            "Flow records written to the flow history (--flow-history-dir)",
            flow_history.written.clone(),
        );
        registry.register(
            "flow_history_lost",
            "Flow records the ring dropped before the history writer took them (a gap in the history: raise --flow-capacity)",
            flow_history.lost.clone(),
        );
        registry.register(
            "flow_history_write_errors",
            "Failed writes, segment creations or deletions of the flow history (disk full, directory gone); flows stay in the ring",
            flow_history.write_errors.clone(),
        );
        registry.register(
            "flow_history_skipped_lines",
            "Lines of the flow history a read skipped: cut by a crash, corrupt, or longer than 1 MiB",
            flow_history.skipped_lines.clone(),
        );
        registry.register(
            "flow_history_bytes",
            "Bytes the flow history's segments take on disk now",
            flow_history.bytes.clone(),
        );
        let upstream_pool_destinations = Gauge::default();
        registry.register(
            "upstream_pool_destinations",
            "Upstream destinations (source workload, address, server name) the HTTP connection pool holds now",
            upstream_pool_destinations.clone(),
        );
        let upstream_pool_connections = Family::<PoolLabels, Gauge>::default();
        registry.register(
            "upstream_pool_connections",
            "Upstream HTTP connections in the pool now, by protocol",
            upstream_pool_connections.clone(),
        );
        let upstream_retries = Counter::default();
        registry.register(
            "upstream_retries",
            "Requests sent again on a new connection after a reused HTTP/1.1 one failed before answering",
            upstream_retries.clone(),
        );
        let cert_cache_entries = Gauge::default();
        registry.register(
            "tls_cert_cache_entries",
            "Server certificates cached for TLS termination now",
            cert_cache_entries.clone(),
        );
        let tls_broker_requests = Family::<BrokerLabels, Counter>::default();
        registry.register(
            "tls_broker_requests",
            "Certificate requests the proxy sent to the TLS broker, by result",
            tls_broker_requests.clone(),
        );
        // The fixed label sets start at 0, so that a dashboard reads a rate of 0, not "no data".
        for direction in [Direction::Egress, Direction::Ingress] {
            let _ = active_connections.get_or_create(&DirectionLabels { direction: direction_label(direction) });
        }
        for direction in ["egress", "ingress"] {
            for reason in crate::proxy::FAILURE_REASONS {
                let _ = connection_failures.get_or_create(&FailureLabels { direction, reason });
            }
        }
        for (mode, results) in [
            ("terminate", &["ok", "denied", "failed"][..]),
            ("originate", &["ok", "failed"]),
            ("server_names", &["ok", "denied"]),
        ] {
            for &result in results {
                let _ = tls_handshakes.get_or_create(&TlsLabels { mode, result });
            }
        }
        for result in ["ok", "failed"] {
            let _ = tls_broker_requests.get_or_create(&BrokerLabels { result });
        }
        if let Some(maps) = maps {
            registry.register_collector(Box::new(BpfCounters { maps }));
        }
        registry.register_collector(Box::new(RuntimeTasks));
        Metrics {
            registry: root,
            context: config.context,
            redirected_connections,
            active_connections,
            connection_failures,
            l4_verdicts,
            requests,
            request_duration,
            tls_handshakes,
            policy_connection_verdicts,
            policy_request_verdicts,
            kafka_topic_verdicts,
            limits_tripped,
            upstream_pool_destinations,
            upstream_pool_connections,
            upstream_retries,
            cert_cache_entries,
            tls_broker_requests,
            flow_history,
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// `l7mesh_bpf_<counter>_total`, summed over CPUs, read when scraped.
#[derive(Debug)]
struct BpfCounters {
    maps: Arc<dyn crate::datapath::Datapath>,
}

impl Collector for BpfCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(counters) = self.maps.counters() else {
            return Ok(());
        };
        for (counter, value) in counters.values {
            let name = format!("bpf_{}", counter.name());
            let metric = ConstCounter::new(value);
            let metric_encoder = encoder.encode_descriptor(&name, bpf_help(counter), None, metric.metric_type())?;
            metric.encode(metric_encoder)?;
        }
        Ok(())
    }
}

/// What each kernel counter counts, for operators.
fn bpf_help(counter: redirector::CounterKind) -> &'static str {
    use redirector::CounterKind as C;
    match counter {
        C::Redirected => "Workload connections the kernel sent to the proxy's egress listener",
        C::Passed => "Workload connections and datagrams the kernel let through without the proxy",
        C::Denied => "Workload connections and datagrams the kernel refused (L4 policy)",
        C::Audited => "Connections and datagrams an audit-mode policy would have refused, let through",
        C::SkMsgRedirects => {
            "Messages passed straight between a workload's socket and the proxy's (loopback hop skipped)"
        }
        C::SkMsgMisses => "Messages that found no peer socket and took the loopback path",
        C::LookupMisses => "Original-destination lookups that found no entry",
        C::ProxyAbsent => "Connections marked for the proxy that found no proxy listening (refused)",
        C::FailOpenPassed => {
            "Connections marked for the proxy let through unredirected (fail-open, no proxy listening)"
        }
        C::IngressRedirected => "Inbound connections the kernel steered to the proxy's ingress listener",
        C::SockhashInserts => "Sockets added to the loopback shortcut's socket map",
        C::EventsDropped => "Kernel verdict events lost because the event ring was full",
        C::ListenersLearned => "Listening sockets whose workload the kernel learned at bind time",
    }
}

/// `l7mesh_proxy_tasks`: tokio's live task count of the runtime that serves the scrape (the
/// proxy's only runtime), read when scraped; a count that only grows is a task leak.
#[derive(Debug)]
struct RuntimeTasks;

impl Collector for RuntimeTasks {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return Ok(());
        };
        let metric = ConstGauge::new(handle.metrics().num_alive_tasks() as i64);
        let metric_encoder = encoder.encode_descriptor(
            "proxy_tasks",
            "Tasks alive in the proxy's runtime now (connections, streams, background work)",
            None,
            metric.metric_type(),
        )?;
        metric.encode(metric_encoder)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every l7proxy family the Grafana dashboard in examples/ queries is one this exporter writes.
    #[test]
    fn the_grafana_dashboard_queries_exported_families() {
        let m = Metrics::new(None);
        let d = "egress";
        m.redirected_connections.with(DirectionLabels { direction: d }, Vec::new(), |c| c.inc());
        m.active_connections.get_or_create(&DirectionLabels { direction: d }).inc();
        m.connection_failures.get_or_create(&FailureLabels { direction: d, reason: "x" }).inc();
        m.l4_verdicts
            .get_or_create(&VerdictLabels { verdict: VerdictLabel(Verdict::Denied), direction: d, hook: "connect" })
            .inc();
        let r = RequestLabels { protocol: "http", direction: d, verdict: VerdictLabel(Verdict::Allowed) };
        m.requests.with(r.clone(), Vec::new(), |c| c.inc());
        m.request_duration.with(r, Vec::new(), |h| h.observe(0.001));
        let k = KafkaLabels { api_key: "Produce".into(), topic: "t".into(), verdict: VerdictLabel(Verdict::Allowed) };
        m.kafka_topic_verdicts.with(k, Vec::new(), |c| c.inc());
        m.tls("terminate", "ok");
        let policy = crate::flows::PolicyLabel("p".into());
        let verdict = VerdictLabel(Verdict::Denied);
        m.policy_connection_verdicts
            .get_or_create(&crate::flows::PolicyConnectionLabels {
                policy: policy.clone(),
                verdict,
                observer: "kernel",
            })
            .inc();
        m.policy_request_verdicts
            .get_or_create(&crate::flows::PolicyRequestLabels { policy, verdict, protocol: "http" })
            .inc();
        let text = m.encode();
        let dashboard = include_str!("../../examples/grafana/l7mesh-dashboard.json");
        let mut rest = dashboard;
        let mut checked = 0;
        while let Some(i) = rest.find("l7mesh_") {
            let tail = &rest[i..];
            let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
            let name = &tail[..end];
            rest = &tail[end..];
            if name.starts_with("l7mesh_bpf_") {
                continue; // the BPF counters come from the kernel's maps (a name pattern)
            }
            // policy-api's own families (its unit test, and the integration test that runs every
            // query through Prometheus, check them).
            if ["l7mesh_policy_version_in_force", "l7mesh_policy_apply_duration_seconds_bucket"].contains(&name)
                || ["l7mesh_policy_rejected_applies_total", "l7mesh_api_requests_total"].contains(&name)
            {
                continue;
            }
            assert!(text.contains(&format!("\n{name}{{")), "the dashboard queries {name}, not exported:\n{text}");
            checked += 1;
        }
        assert!(checked >= 9, "{checked}");
    }

    /// The live task count is exported from inside the runtime, and follows spawned tasks.
    #[tokio::test]
    async fn live_task_count_is_a_gauge() {
        let m = Metrics::new(None);
        let count = |text: &str| -> i64 {
            let line = text.lines().find(|l| l.starts_with("l7mesh_proxy_tasks ")).expect("no l7mesh_proxy_tasks");
            line.split_whitespace().nth(1).unwrap().parse().unwrap()
        };
        let before = count(&m.encode());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let held: Vec<_> = (0..5).map(|_| tokio::spawn(async {})).collect();
        let task = tokio::spawn(async move {
            let _ = rx.await;
        });
        for h in held {
            h.await.unwrap();
        }
        assert!(m.encode().contains("# TYPE l7mesh_proxy_tasks gauge"));
        assert_eq!(count(&m.encode()), before + 1);
        tx.send(()).unwrap();
        task.await.unwrap();
        assert_eq!(count(&m.encode()), before);
    }
}

//! The flow log: a bounded ring of flow records (Hubble-like JSON; the fields are in ARCHITECTURE.md, "The proxy"), fed by proxied
//! connections and by the kernel's L4 verdict events. A record is written as
//! `l7mesh_api::flow::FlowView`, the borrowed form of the `Flow` readers read.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use l7mesh_api::flow::{DecidedBy, GrpcPart, KafkaPart, Reason};
use l7mesh_api::flow::{EndpointView, FlowView, HttpView, L4View, L7View, LabelsView, ProxyView};
use l7mesh_api::{Direction, Verdict};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::Serialize;

use crate::metrics::VerdictLabel;

/// One side of a flow. Compact (the ring holds thousands): the address as is, the workload as
/// the tables' shared `Arc`; written out as `l7mesh_api::flow::EndpointView`.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// None: a local workload whose socket has no address yet (seen at connect time).
    pub addr: Option<SocketAddr>,
    /// The workload's cgroup id, when the endpoint is a local workload.
    pub cgroup_id: Option<u64>,
    pub workload: Option<Arc<crate::registry::WorkloadInfo>>,
}

impl Endpoint {
    pub fn new(addr: SocketAddr, cgroup_id: Option<u64>) -> Self {
        Endpoint { addr: Some(addr), cgroup_id, workload: None }
    }

    /// A local workload whose socket has no address yet (seen at connect time).
    pub fn unbound(cgroup_id: u64) -> Self {
        Endpoint { addr: None, cgroup_id: Some(cgroup_id), workload: None }
    }

    /// Names the endpoint after the workload it is.
    pub fn named(mut self, workload: Option<Arc<crate::registry::WorkloadInfo>>) -> Self {
        if let Some(w) = workload {
            self.cgroup_id = Some(w.cgroup_id);
            self.workload = Some(w);
        }
        self
    }

    fn name(&self) -> Option<&str> {
        self.workload.as_deref().map(|w| w.name.as_str())
    }

    fn namespace(&self) -> Option<&str> {
        self.workload.as_deref().map(|w| w.namespace.as_str())
    }

    /// The workload's labels without Kubernetes' own (`io.kubernetes.*`).
    fn labels(&self) -> impl Iterator<Item = (&str, &str)> {
        self.workload.iter().flat_map(|w| LabelsView(&w.labels).iter())
    }

    fn ip(&self) -> Cow<'static, str> {
        match self.addr {
            Some(a) => Cow::Owned(a.ip().to_string()),
            None => Cow::Borrowed(""),
        }
    }

    fn view(&self) -> EndpointView<'_> {
        let w = self.workload.as_deref();
        EndpointView {
            workload: w.map(|w| w.name.as_str()),
            namespace: w.map(|w| w.namespace.as_str()),
            labels: w.map(|w| LabelsView(&w.labels)),
            ip: self.ip(),
            port: self.addr.map(|a| a.port()).unwrap_or(0),
            cgroup_id: self.cgroup_id,
        }
    }
}

/// When a flow happened; written as RFC 3339.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct FlowTime(pub time::OffsetDateTime);

impl FlowTime {
    pub fn now() -> Self {
        FlowTime(time::OffsetDateTime::now_utc())
    }

    fn rfc3339(self) -> String {
        self.0.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
    }
}

#[derive(Clone, Debug)]
pub struct L4 {
    pub protocol: &'static str,
}

/// How the proxy took a connection over; absent for kernel-only verdicts.
#[derive(Clone, Debug)]
pub struct ProxyInfo {
    /// How the original destination was learned: `getsockopt` (SO_ORIGINAL_DST answered by the
    /// cgroup/getsockopt program), `map` (lookup by peer address), or `getsockname` (ingress).
    pub original_dst_via: &'static str,
    /// The proxy's local address towards the upstream (written "" before one was used).
    pub upstream: Option<SocketAddr>,
}

/// The HTTP part of a flow: `l7mesh_api::flow::HttpPart` in compact form.
#[derive(Clone, Debug)]
pub struct HttpFlow {
    /// Standard methods are stored without an allocation.
    pub method: http::Method,
    pub url: String,
    pub code: u16,
    pub protocol: &'static str,
}

/// The L7 part of a flow (Hubble's `l7`); gRPC and Kafka parts are the readers' own types.
#[derive(Clone, Debug)]
pub enum L7Flow {
    Http { http: HttpFlow },
    Grpc { grpc: GrpcPart },
    Kafka { kafka: KafkaPart },
}

impl L7Flow {
    pub fn grpc(service: &str, method: &str, authority: &str, status: Option<String>) -> Self {
        L7Flow::Grpc {
            grpc: GrpcPart {
                service: service.to_string(),
                method: method.to_string(),
                authority: authority.to_string(),
                status,
            },
        }
    }
}

/// One flow in the ring, written as `l7mesh_api::flow::FlowView`.
#[derive(Clone, Debug)]
pub struct FlowRecord {
    pub time: FlowTime,
    pub verdict: Verdict,
    pub direction: Direction,
    pub source: Endpoint,
    pub destination: Endpoint,
    pub l4: L4,
    /// Which component decided: `kernel:<hook>` or `proxy`.
    pub observer: Cow<'static, str>,
    pub redirected: bool,
    pub proxy: Option<ProxyInfo>,
    pub policy: Option<u32>,
    pub policy_name: Option<Arc<str>>,
    /// The policy rule that decided a DENIED or AUDIT flow.
    pub decided_by: Option<DecidedBy>,
    pub latency_ns: Option<u64>,
    /// Why a connection was refused or failed, when it was.
    pub reason: Option<Reason>,
    pub l7: Option<L7Flow>,
}

/// Built when a record is written (`/v1/flows`), not when it is recorded: the ring keeps the
/// compact form.
impl Serialize for FlowRecord {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.view().serialize(serializer)
    }
}

impl FlowRecord {
    /// The record as the shared flow form (what `/v1/flows` writes and Hubble's API converts).
    pub fn view(&self) -> FlowView<'_> {
        FlowView {
            time: Cow::Owned(self.time.rfc3339()),
            verdict: self.verdict,
            direction: self.direction,
            source: self.source.view(),
            destination: self.destination.view(),
            l4: L4View { protocol: self.l4.protocol },
            observer: &self.observer,
            redirected: self.redirected,
            proxy: self.proxy.as_ref().map(|p| ProxyView {
                original_dst_via: p.original_dst_via,
                upstream: p.upstream.map_or(Cow::Borrowed(""), |a| Cow::Owned(a.to_string())),
            }),
            policy: self.policy,
            policy_name: self.policy_name.as_deref(),
            decided_by: self.decided_by.as_ref(),
            latency_ns: self.latency_ns,
            reason: self.reason.as_ref(),
            l7: self.l7.as_ref().map(|l7| match l7 {
                L7Flow::Http { http } => L7View::Http {
                    http: HttpView {
                        method: http.method.as_str(),
                        url: &http.url,
                        code: http.code,
                        protocol: http.protocol,
                    },
                },
                L7Flow::Grpc { grpc } => L7View::Grpc { grpc },
                L7Flow::Kafka { kafka } => L7View::Kafka { kafka },
            }),
        }
    }
}

/// Records a follower may fall behind by before it misses some (it is told how many).
const FOLLOW_BACKLOG: usize = 1024;

impl FlowRecord {
    /// A request's flow, built before it went upstream, once its answer is back: now, with the
    /// answer's status (HTTP code, or gRPC status), the upstream leg and the latency.
    pub fn answered(
        &mut self,
        code: u16,
        grpc_status: Option<String>,
        upstream: Option<SocketAddr>,
        elapsed: Duration,
    ) {
        self.time = FlowTime::now();
        self.latency_ns = Some(elapsed.as_nanos() as u64);
        if let Some(proxy) = self.proxy.as_mut() {
            proxy.upstream = upstream;
        }
        match self.l7.as_mut() {
            Some(L7Flow::Http { http }) => http.code = code,
            Some(L7Flow::Grpc { grpc }) => grpc.status = grpc_status,
            _ => {}
        }
    }

    /// A flow the proxy decided on a TCP connection it carries, now; callers fill in the
    /// policy, latency, reason and L7 parts that apply.
    pub fn proxied(
        verdict: Verdict,
        direction: Direction,
        source: Endpoint,
        destination: Endpoint,
        proxy: Option<ProxyInfo>,
    ) -> Self {
        FlowRecord {
            time: FlowTime::now(),
            verdict,
            direction,
            source,
            destination,
            l4: L4 { protocol: "TCP" },
            observer: "proxy".into(),
            redirected: true,
            proxy,
            policy: None,
            policy_name: None,
            decided_by: None,
            latency_ns: None,
            reason: None,
            l7: None,
        }
    }
}

pub struct FlowLog {
    capacity: usize,
    ring: Mutex<Ring>,
    /// Live followers (`/v1/flows?follow=true`); a slow follower misses records rather than
    /// holding the ring.
    live: tokio::sync::broadcast::Sender<FlowRecord>,
    /// `l7mesh_policy_connection_verdicts_total` and `l7mesh_policy_request_verdicts_total`:
    /// every flow a named policy decided, counted as a connection or as a request.
    policy_verdicts: Option<PolicyVerdicts>,
}

/// The records held, each with its sequence number: one more than the record before, across
/// restarts when there is a flow history (it resumes after the newest record on disk), so
/// that the history writer and its readers can tell exactly which records the ring still has.
struct Ring {
    records: VecDeque<(u64, FlowRecord)>,
    next_seq: u64,
    /// The number the first record of this process got (after the history's newest): records
    /// pushed since the start (Hubble's `seen_flows`) are `next_seq - started_at`.
    started_at: u64,
}

impl Ring {
    /// The sequence number of the oldest record held (`next_seq` when none is).
    fn first_seq(&self) -> u64 {
        self.next_seq - self.records.len() as u64
    }
}

/// The two families of decisions by named policies: a flow without an L7 part is a connection
/// (decided by the kernel or by the proxy), one with it a request.
#[derive(Clone, Debug)]
pub struct PolicyVerdicts {
    pub connections: Family<PolicyConnectionLabels, Counter>,
    pub requests: Family<PolicyRequestLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyConnectionLabels {
    pub policy: PolicyLabel,
    pub verdict: VerdictLabel,
    /// `kernel` (its L4 policy, at a hook) or `proxy`.
    pub observer: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyRequestLabels {
    pub policy: PolicyLabel,
    pub verdict: VerdictLabel,
    /// `http`, `grpc` or `kafka`.
    pub protocol: &'static str,
}

/// A policy's name as a label value: shares the decision's `Arc<str>`, so counting a request
/// does not copy the name.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct PolicyLabel(pub Arc<str>);

impl EncodeLabelValue for PolicyLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&&*self.0, encoder)
    }
}

/// Filters of `GET /v1/flows` (and `l7ctl observe`); every given one must match.
#[derive(Debug, Default)]
pub struct FlowFilter {
    pub verdict: Option<Verdict>,
    pub direction: Option<Direction>,
    pub observer_prefix: Option<String>,
    /// `k=v[,k=v]` on the source: labels, or `workload` / `namespace` / `ip`.
    pub from: Vec<(String, String)>,
    pub to: Vec<(String, String)>,
    /// `http`, `grpc`, `kafka` (the L7 type), or `tcp` / `udp` (connections without L7 data).
    pub protocol: Option<String>,
    /// Only flows at or after this time.
    pub since: Option<time::OffsetDateTime>,
    pub follow: bool,
    /// Every node's flows (in a cluster): this node's and, through the tunnel, the others'.
    pub cluster: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error(
        "unknown flow filter `{0}` (known: verdict, direction, observer, from, to, protocol, since, follow, cluster)"
    )]
    Unknown(String),
    #[error("{0}: expected k=v[,k=v], got `{1}`")]
    Selector(&'static str, String),
    #[error("verdict: expected allowed, denied, audit, forwarded or error, got `{0}`")]
    Verdict(String),
    #[error("direction: expected egress or ingress, got `{0}`")]
    Direction(String),
    #[error("protocol: expected http, grpc, kafka, tcp or udp, got `{0}`")]
    Protocol(String),
    #[error("since: expected a duration such as 30s, 5m, 2h, got `{0}`")]
    Since(String),
}

fn endpoint_matches(e: &Endpoint, want: &[(String, String)]) -> bool {
    want.iter().all(|(k, v)| match k.as_str() {
        "workload" => e.name() == Some(v.as_str()),
        "namespace" => e.namespace() == Some(v.as_str()),
        "ip" => e.ip() == v.as_str(),
        _ => e.labels().any(|(lk, lv)| lk == k && lv == v),
    })
}

/// `30s`, `5m`, `2h`, `1d` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Option<std::time::Duration> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n.parse().ok()?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        "d" => n.checked_mul(86400)?,
        _ => return None,
    };
    Some(std::time::Duration::from_secs(secs))
}

impl FlowFilter {
    /// Parses a query string (`verdict=denied&from=app%3Dweb&since=5m&follow=true`).
    pub fn parse(query: &str) -> Result<Self, FilterError> {
        let mut f = FlowFilter::default();
        let selector = |what: &'static str, v: &str| -> Result<Vec<(String, String)>, FilterError> {
            v.split(',')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    p.split_once('=')
                        .map(|(k, v)| (k.trim().trim_start_matches("k8s:").to_string(), v.trim().to_string()))
                        .ok_or_else(|| FilterError::Selector(what, v.to_string()))
                })
                .collect()
        };
        // application/x-www-form-urlencoded, as browsers and curl --data-urlencode write it.
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            let v = v.into_owned();
            match &*k {
                "verdict" => f.verdict = Some(v.parse().map_err(|_| FilterError::Verdict(v.to_ascii_uppercase()))?),
                "direction" => f.direction = Some(v.parse().map_err(|_| FilterError::Direction(v.clone()))?),
                "observer" => f.observer_prefix = Some(v),
                "from" => f.from.extend(selector("from", &v)?),
                "to" => f.to.extend(selector("to", &v)?),
                "protocol" => {
                    let v = v.to_ascii_lowercase();
                    if !["http", "grpc", "kafka", "tcp", "udp"].contains(&v.as_str()) {
                        return Err(FilterError::Protocol(v));
                    }
                    f.protocol = Some(v)
                }
                "since" => {
                    // A window reaching before the representable past (`since=99999999d`) is
                    // refused like any other bad duration, never an overflow.
                    let since = parse_duration(&v)
                        .and_then(|d| time::Duration::try_from(d).ok())
                        .and_then(|d| time::OffsetDateTime::now_utc().checked_sub(d))
                        .ok_or_else(|| FilterError::Since(v.clone()))?;
                    f.since = Some(since)
                }
                "follow" => f.follow = v == "true" || v == "1",
                "cluster" => f.cluster = v == "true" || v == "1",
                other => return Err(FilterError::Unknown(other.to_string())),
            }
        }
        Ok(f)
    }

    pub fn matches(&self, r: &FlowRecord) -> bool {
        self.verdict.is_none_or(|v| r.verdict == v)
            && self.direction.is_none_or(|d| r.direction == d)
            && self.observer_prefix.as_deref().is_none_or(|p| r.observer.starts_with(p))
            && endpoint_matches(&r.source, &self.from)
            && endpoint_matches(&r.destination, &self.to)
            && self.protocol.as_deref().is_none_or(|p| match (&r.l7, p) {
                (Some(L7Flow::Http { .. }), "http") | (Some(L7Flow::Grpc { .. }), "grpc") => true,
                (Some(L7Flow::Kafka { .. }), "kafka") => true,
                (None, "tcp") => r.l4.protocol == "TCP",
                (None, "udp") => r.l4.protocol == "UDP",
                _ => false,
            })
            && self.since.is_none_or(|since| r.time.0 >= since)
    }

    /// [`FlowFilter::matches`] for a flow read back from its JSON line (the flow history): the
    /// same test on the same fields as they were written (a test holds the two to each other).
    pub fn matches_flow(&self, f: &l7mesh_api::flow::Flow) -> bool {
        use l7mesh_api::flow::{FlowEndpoint, L7Part};
        fn endpoint(e: &FlowEndpoint, want: &[(String, String)]) -> bool {
            want.iter().all(|(k, v)| match k.as_str() {
                "workload" => e.workload.as_deref() == Some(v.as_str()),
                "namespace" => e.namespace.as_deref() == Some(v.as_str()),
                "ip" => e.ip == *v,
                _ => e.labels.as_ref().is_some_and(|l| l.get(k) == Some(v)),
            })
        }
        self.verdict.is_none_or(|v| f.verdict == v)
            && self.direction.is_none_or(|d| f.direction == d)
            && self.observer_prefix.as_deref().is_none_or(|p| f.observer.starts_with(p))
            && endpoint(&f.source, &self.from)
            && endpoint(&f.destination, &self.to)
            && self.protocol.as_deref().is_none_or(|p| match (&f.l7, p) {
                (Some(L7Part::Http { .. }), "http") | (Some(L7Part::Grpc { .. }), "grpc") => true,
                (Some(L7Part::Kafka { .. }), "kafka") => true,
                (None, "tcp") => f.l4.protocol == "TCP",
                (None, "udp") => f.l4.protocol == "UDP",
                _ => false,
            })
            && self.since.is_none_or(|since| {
                time::OffsetDateTime::parse(&f.time, &time::format_description::well_known::Rfc3339)
                    .is_ok_and(|t| t >= since)
            })
    }
}

impl FlowLog {
    pub fn new(capacity: usize) -> Self {
        FlowLog {
            capacity: capacity.max(1),
            ring: Mutex::new(Ring { records: VecDeque::with_capacity(capacity.min(4096)), next_seq: 1, started_at: 1 }),
            live: tokio::sync::broadcast::channel(FOLLOW_BACKLOG).0,
            policy_verdicts: None,
        }
    }

    /// Numbers records from `next_seq` on (the flow history's: after the newest it holds).
    pub fn starting_at(self, next_seq: u64) -> Self {
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        ring.next_seq = next_seq.max(1);
        ring.started_at = ring.next_seq;
        drop(ring);
        self
    }

    /// Counts every flow decided by a named policy in `families`.
    pub fn with_policy_verdicts(mut self, families: PolicyVerdicts) -> Self {
        self.policy_verdicts = Some(families);
        self
    }

    pub fn push(&self, record: FlowRecord) {
        if let (Some(families), Some(policy)) = (&self.policy_verdicts, &record.policy_name) {
            let (policy, verdict) = (PolicyLabel(policy.clone()), VerdictLabel(record.verdict));
            let protocol = match &record.l7 {
                None => None,
                Some(L7Flow::Http { .. }) => Some("http"),
                Some(L7Flow::Grpc { .. }) => Some("grpc"),
                Some(L7Flow::Kafka { .. }) => Some("kafka"),
            };
            match protocol {
                Some(protocol) => {
                    families.requests.get_or_create(&PolicyRequestLabels { policy, verdict, protocol }).inc();
                }
                None => {
                    let observer = if record.observer.starts_with("kernel") { "kernel" } else { "proxy" };
                    families.connections.get_or_create(&PolicyConnectionLabels { policy, verdict, observer }).inc();
                }
            }
        }
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        // Sent under the ring's lock, so `follow` sees each record exactly once.
        if self.live.receiver_count() > 0 {
            let _ = self.live.send(record.clone());
        }
        if ring.records.len() == self.capacity {
            ring.records.pop_front();
        }
        let seq = ring.next_seq;
        ring.next_seq = ring.next_seq.saturating_add(1);
        ring.records.push_back((seq, record));
    }

    /// Records in the ring now, its capacity, and records pushed since the start.
    pub fn counts(&self) -> (usize, usize, u64) {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        (ring.records.len(), self.capacity, ring.next_seq - ring.started_at)
    }

    pub fn snapshot(&self, filter: &FlowFilter) -> Vec<FlowRecord> {
        self.held(filter).1
    }

    /// The matching records in the ring, and the sequence number of the oldest record it holds
    /// (matching or not): a reader of the history takes the records before it from there.
    pub fn held(&self, filter: &FlowFilter) -> (u64, Vec<FlowRecord>) {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        (ring.first_seq(), ring.records.iter().map(|(_, r)| r).filter(|r| filter.matches(r)).cloned().collect())
    }

    /// What is in the ring now (as [`FlowLog::held`]), and every record pushed from this moment
    /// on (none is lost or repeated between the two: both are taken under the ring's lock).
    pub fn follow(&self, filter: &FlowFilter) -> (u64, Vec<FlowRecord>, tokio::sync::broadcast::Receiver<FlowRecord>) {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let rx = self.live.subscribe();
        let past = ring.records.iter().map(|(_, r)| r).filter(|r| filter.matches(r)).cloned().collect();
        (ring.first_seq(), past, rx)
    }

    /// At most `max` records numbered after `seq`, oldest first, and how many records after
    /// `seq` the ring no longer holds (they were dropped before anyone took them).
    pub fn after(&self, seq: u64, max: usize) -> (Vec<(u64, FlowRecord)>, u64) {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let first = ring.first_seq();
        let from = seq.saturating_add(1);
        let gone = first.saturating_sub(from);
        let skip = from.saturating_sub(first).min(ring.records.len() as u64) as usize;
        (ring.records.iter().skip(skip).take(max).cloned().collect(), gone)
    }

    /// How many records the ring holds at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Holds the ring's lock (a test of what waits on it).
    #[cfg(test)]
    pub(crate) fn hold_ring_for_test(&self) -> impl Sized + '_ {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The sequence number the next record gets.
    pub fn next_seq(&self) -> u64 {
        self.ring.lock().unwrap_or_else(|e| e.into_inner()).next_seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(verdict: Verdict) -> FlowRecord {
        FlowRecord {
            time: FlowTime::now(),
            verdict,
            direction: Direction::Egress,
            source: Endpoint::new("127.0.0.1:1".parse().unwrap(), None),
            destination: Endpoint::new("127.0.0.1:2".parse().unwrap(), None),
            l4: L4 { protocol: "TCP" },
            observer: "proxy".into(),
            redirected: true,
            proxy: None,
            policy: None,
            policy_name: None,
            decided_by: None,
            latency_ns: None,
            reason: None,
            l7: None,
        }
    }

    /// The records behind l7mesh-api's sample lines, one per kind of flow.
    fn sample_records() -> Vec<FlowRecord> {
        let at = FlowTime(time::OffsetDateTime::from_unix_timestamp(1_790_000_000).unwrap());
        let web = Arc::new(crate::registry::WorkloadInfo {
            cgroup_id: 4242,
            node: String::new(),
            endpoint_id: 3,
            identity: 70001,
            name: "web".into(),
            namespace: "default".into(),
            labels: [("app", "web"), ("io.kubernetes.pod.namespace", "default")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .into(),
            egress_enforced_by: Vec::new(),
            ingress_enforced_by: Vec::new(),
        });
        let src = Endpoint::new("10.0.0.5:40001".parse().unwrap(), None).named(Some(web.clone()));
        let dst = Endpoint::new("10.0.0.9:80".parse().unwrap(), None);
        let via = Some(ProxyInfo { original_dst_via: "getsockopt", upstream: Some("10.0.0.5:50000".parse().unwrap()) });
        let mut http = FlowRecord::proxied(Verdict::Denied, Direction::Egress, src.clone(), dst.clone(), via.clone());
        http.time = at;
        http.policy = Some(7);
        http.policy_name = Some("default/web-egress".into());
        http.latency_ns = Some(125_000);
        http.l7 = Some(L7Flow::Http {
            http: HttpFlow { method: http::Method::PUT, url: "http://api/x".into(), code: 403, protocol: "HTTP/1.1" },
        });
        let mut grpc = FlowRecord::proxied(Verdict::Allowed, Direction::Ingress, dst.clone(), src.clone(), None);
        grpc.time = at;
        grpc.l7 = Some(L7Flow::grpc("helloworld.Greeter", "SayHello", "greeter:50051", Some("0".into())));
        let mut kafka = FlowRecord::proxied(Verdict::Audit, Direction::Egress, src.clone(), dst.clone(), via.clone());
        kafka.time = at;
        kafka.l7 = Some(L7Flow::Kafka {
            kafka: KafkaPart {
                api_key: "Produce".into(),
                correlation_id: 9,
                api_version: 9,
                topic: Some("orders".into()),
                client_id: "w".into(),
                error_code: 0,
            },
        });
        let mut ended = FlowRecord::proxied(Verdict::Forwarded, Direction::Egress, src.clone(), dst.clone(), via);
        ended.time = at;
        ended.reason = Some("upstream reset the connection".into());
        let mut explained = http.clone();
        explained.direction = Direction::Ingress;
        explained.decided_by =
            Some(DecidedBy { policy: "default/web".into(), rule: "ingress[0].toPorts[0].rules.http".into() });
        explained.reason = Some(Reason::Policy(l7mesh_api::flow::PolicyReason::NoRuleMatched {
            rules: vec![l7mesh_api::flow::RuleMiss {
                allows: "GET /public/.*".into(),
                missed: vec![l7mesh_api::flow::Miss::Path { got: "/x".into() }],
            }],
            more: 0,
        }));
        let mut default_deny = record(Verdict::Denied);
        default_deny.time = at;
        default_deny.direction = Direction::Ingress;
        default_deny.source = Endpoint::unbound(4242).named(Some(web.clone()));
        default_deny.observer = "kernel:connect".into();
        default_deny.redirected = false;
        default_deny.decided_by = Some(DecidedBy { policy: "default/db".into(), rule: String::new() });
        default_deny.reason = Some(Reason::Policy(l7mesh_api::flow::PolicyReason::DefaultDeny {
            workload: "db".into(),
            direction: Direction::Ingress,
            enforced_by: vec!["default/db".into()],
            peer: "web".into(),
        }));
        let mut failed = FlowRecord::proxied(Verdict::Error, Direction::Egress, src.clone(), dst.clone(), None);
        failed.time = at;
        failed.reason = Some("Connection refused (os error 111)".into());
        let mut kernel = record(Verdict::Denied);
        kernel.time = at;
        kernel.direction = Direction::Ingress;
        kernel.source = Endpoint::unbound(4242).named(Some(web));
        kernel.observer = "kernel:connect4".into();
        kernel.redirected = false;
        vec![http, grpc, kafka, ended, kernel, explained, default_deny, failed]
    }

    /// The flow JSON is a contract (stored flows, `l7ctl observe`, policy-api's readers in
    /// `l7mesh_api::flow`): these records write exactly the committed sample lines, and the
    /// shared reader reads every one.
    #[test]
    fn writes_the_shared_sample_lines() {
        let sample = include_str!("../../l7mesh-api/tests/flows.jsonl");
        let written: Vec<String> = sample_records().iter().map(|r| serde_json::to_string(r).unwrap()).collect();
        assert_eq!(written, sample.lines().collect::<Vec<_>>());
        assert_eq!(l7mesh_api::flow::parse_lines(&written.join("\n")).len(), written.len());
    }

    /// A flow read back from the history is filtered as its record was in the ring: every
    /// filter gives the same answer for every kind of sample record.
    #[test]
    fn filters_judge_a_written_flow_as_its_record() {
        let filters = [
            "",
            "verdict=denied",
            "verdict=allowed",
            "verdict=forwarded",
            "direction=ingress",
            "direction=egress",
            "observer=kernel",
            "observer=proxy",
            "from=app%3Dweb",
            "from=workload%3Dweb,namespace%3Ddefault",
            "from=namespace%3Dother",
            "from=io.kubernetes.pod.namespace%3Ddefault",
            "to=ip%3D10.0.0.9",
            "to=ip%3D",
            "from=ip%3D10.0.0.5",
            "protocol=http",
            "protocol=grpc",
            "protocol=kafka",
            "protocol=tcp",
            "protocol=udp",
            "since=1m",
            "since=99999d",
            "verdict=denied&direction=ingress&protocol=tcp",
        ];
        let mut records = sample_records();
        let mut recent = record(Verdict::Audit);
        recent.l4.protocol = "UDP";
        records.push(recent);
        for r in &records {
            let flow: l7mesh_api::flow::Flow = serde_json::from_str(&serde_json::to_string(r).unwrap()).unwrap();
            for q in filters {
                let f = FlowFilter::parse(q).unwrap();
                assert_eq!(f.matches(r), f.matches_flow(&flow), "{q} on {}", serde_json::to_string(r).unwrap());
            }
        }
        // Some filters do match (the comparison is not all `false`).
        let matched = |q: &str| records.iter().filter(|r| FlowFilter::parse(q).unwrap().matches(r)).count();
        assert!(matched("from=app%3Dweb") > 0 && matched("protocol=udp") == 1 && matched("since=1m") == 1);
        // A flow whose time does not read is not in any window.
        let mut flow: l7mesh_api::flow::Flow =
            serde_json::from_str(&serde_json::to_string(&records[0]).unwrap()).unwrap();
        flow.time = "yesterday".into();
        assert!(!FlowFilter::parse("since=99999d").unwrap().matches_flow(&flow));
    }

    #[test]
    fn ring_numbers_records_and_tells_what_it_dropped() {
        let log = FlowLog::new(3).starting_at(10);
        for _ in 0..5 {
            log.push(record(Verdict::Allowed));
        }
        // 10..=14 pushed, 12..=14 held.
        assert_eq!(log.next_seq(), 15);
        assert_eq!(log.held(&FlowFilter::default()).0, 12);
        let (after, gone) = log.after(9, 100);
        assert_eq!((after.iter().map(|(s, _)| *s).collect::<Vec<_>>(), gone), (vec![12, 13, 14], 2));
        let (after, gone) = log.after(12, 1);
        assert_eq!((after.iter().map(|(s, _)| *s).collect::<Vec<_>>(), gone), (vec![13], 0));
        assert_eq!(log.after(14, 100).0.len(), 0);
        assert_eq!(FlowLog::new(3).held(&FlowFilter::default()).0, 1);
        // Hubble's counts: held, capacity, and pushed by this process (not the history's numbers).
        assert_eq!(log.counts(), (3, 3, 5));
    }

    #[test]
    fn ring_is_bounded_and_filters() {
        let log = FlowLog::new(2);
        log.push(record(Verdict::Allowed));
        log.push(record(Verdict::Denied));
        log.push(record(Verdict::Allowed));
        assert_eq!(log.snapshot(&FlowFilter::default()).len(), 2);
        let denied = FlowFilter::parse("verdict=denied").unwrap();
        assert_eq!(log.snapshot(&denied).len(), 1);
        assert!(FlowFilter::parse("verdict=maybe").is_err());
        // A proxied connection's end (a peer closed or reset it) is FORWARDED, and filterable.
        assert_eq!(log.snapshot(&FlowFilter::parse("verdict=forwarded").unwrap()).len(), 0);
        assert!(FlowFilter::parse("colour=red").is_err());
        assert_eq!(log.snapshot(&FlowFilter::parse("direction=EGRESS").unwrap()).len(), 2);
        assert_eq!(log.snapshot(&FlowFilter::parse("direction=ingress").unwrap()).len(), 0);
        assert!(matches!(FlowFilter::parse("direction=sideways"), Err(FilterError::Direction(_))));
        assert_eq!(log.snapshot(&FlowFilter::parse("protocol=tcp&since=1m").unwrap()).len(), 2);
        assert_eq!(log.snapshot(&FlowFilter::parse("protocol=http").unwrap()).len(), 0);
        assert_eq!(log.snapshot(&FlowFilter::parse("to=ip%3D127.0.0.1").unwrap()).len(), 2);
        assert_eq!(log.snapshot(&FlowFilter::parse("from=app%3Dweb").unwrap()).len(), 0);
        // Encoded separators, and multi-byte text after a `%` (that panicked the decoder found
        // by the flow_filter fuzz target).
        let f = FlowFilter::parse("to=app%3Db%2Cc%3Dd+e").unwrap();
        assert_eq!(f.to, [("app".to_string(), "b".to_string()), ("c".to_string(), "d e".to_string())]);
        let f = FlowFilter::parse("observer=%a\u{1d6}p").unwrap();
        assert_eq!(f.observer_prefix.as_deref(), Some("%a\u{1d6}p"));
        assert_eq!(parse_duration("5m"), Some(std::time::Duration::from_secs(300)));
        assert_eq!(parse_duration("999999999999999999d"), None);
        for huge in ["since=99999999d", "since=18446744073709551615", "since=213503982334601d"] {
            assert!(matches!(FlowFilter::parse(huge), Err(FilterError::Since(_))), "{huge}");
        }
    }
}

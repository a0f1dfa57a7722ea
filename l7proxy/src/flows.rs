//! The flow log: a bounded ring of flow records (Hubble-like JSON, DESIGN.md), fed by proxied
//! connections and by the kernel's L4 verdict events.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Mutex;

use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct Endpoint {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labels: Option<std::collections::BTreeMap<String, String>>,
    pub ip: String,
    pub port: u16,
    /// The workload's cgroup id, when the endpoint is a local workload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup_id: Option<u64>,
}

impl Endpoint {
    pub fn new(addr: SocketAddr, cgroup_id: Option<u64>) -> Self {
        Endpoint {
            workload: None,
            namespace: None,
            labels: None,
            ip: addr.ip().to_string(),
            port: addr.port(),
            cgroup_id,
        }
    }

    /// A local workload whose socket has no address yet (seen at connect time).
    pub fn unbound(cgroup_id: u64) -> Self {
        Endpoint {
            workload: None,
            namespace: None,
            labels: None,
            ip: String::new(),
            port: 0,
            cgroup_id: Some(cgroup_id),
        }
    }

    /// Names the endpoint after the workload it is.
    pub fn named(mut self, workload: Option<std::sync::Arc<crate::registry::WorkloadInfo>>) -> Self {
        if let Some(w) = workload {
            self.workload = Some(w.name.clone());
            self.namespace = Some(w.namespace.clone());
            let labels = w.labels.iter().filter(|(k, _)| !k.starts_with("io.kubernetes."));
            self.labels = Some(labels.map(|(k, v)| (k.clone(), v.clone())).collect());
            self.cgroup_id = Some(w.cgroup_id);
        }
        self
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct L4 {
    pub protocol: &'static str,
}

/// How the proxy took a connection over; absent for kernel-only verdicts.
#[derive(Clone, Debug, Serialize)]
pub struct ProxyInfo {
    /// How the original destination was learned: `getsockopt` (SO_ORIGINAL_DST answered by the
    /// cgroup/getsockopt program), `map` (lookup by peer address), or `getsockname` (ingress).
    pub original_dst_via: &'static str,
    pub upstream: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct HttpFlow {
    pub method: String,
    pub url: String,
    pub code: u16,
    pub protocol: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct GrpcFlow {
    pub service: String,
    pub method: String,
    /// The grpc-status the proxy saw in the response headers (trailers are streamed through).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct KafkaFlow {
    pub api_key: String,
    /// Requests of one connection are told apart by it (one flow per topic of a request).
    pub correlation_id: i32,
    pub api_version: i16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    pub client_id: String,
    pub error_code: i16,
}

/// The L7 part of a flow (Hubble's `l7`).
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum L7Flow {
    Http { http: HttpFlow },
    Grpc { grpc: GrpcFlow },
    Kafka { kafka: KafkaFlow },
}

impl L7Flow {
    pub fn grpc(service: &str, method: &str, status: Option<String>) -> Self {
        L7Flow::Grpc { grpc: GrpcFlow { service: service.to_string(), method: method.to_string(), status } }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct FlowRecord {
    pub time: String,
    pub verdict: &'static str,
    pub direction: &'static str,
    pub source: Endpoint,
    pub destination: Endpoint,
    pub l4: L4,
    /// Which component decided: `kernel:<hook>` or `proxy`.
    pub observer: String,
    pub redirected: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy: Option<ProxyInfo>,
    pub policy: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ns: Option<u64>,
    /// Why a connection was refused or failed, when it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub l7: Option<L7Flow>,
}

pub struct FlowLog {
    capacity: usize,
    ring: Mutex<VecDeque<FlowRecord>>,
}

/// Filters of `GET /v1/flows`.
#[derive(Debug, Default)]
pub struct FlowFilter {
    pub verdict: Option<String>,
    pub direction: Option<String>,
    pub observer_prefix: Option<String>,
}

impl FlowFilter {
    fn matches(&self, r: &FlowRecord) -> bool {
        self.verdict.as_deref().is_none_or(|v| r.verdict.eq_ignore_ascii_case(v))
            && self.direction.as_deref().is_none_or(|d| r.direction.eq_ignore_ascii_case(d))
            && self.observer_prefix.as_deref().is_none_or(|p| r.observer.starts_with(p))
    }
}

impl FlowLog {
    pub fn new(capacity: usize) -> Self {
        FlowLog { capacity: capacity.max(1), ring: Mutex::new(VecDeque::with_capacity(capacity.min(4096))) }
    }

    pub fn push(&self, record: FlowRecord) {
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        if ring.len() == self.capacity {
            ring.pop_front();
        }
        ring.push_back(record);
    }

    pub fn snapshot(&self, filter: &FlowFilter) -> Vec<FlowRecord> {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        ring.iter().filter(|r| filter.matches(r)).cloned().collect()
    }
}

pub fn now_rfc3339() -> String {
    wall_time_rfc3339(time::OffsetDateTime::now_utc())
}

pub fn wall_time_rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(verdict: &'static str) -> FlowRecord {
        FlowRecord {
            time: now_rfc3339(),
            verdict,
            direction: "EGRESS",
            source: Endpoint::new("127.0.0.1:1".parse().unwrap(), None),
            destination: Endpoint::new("127.0.0.1:2".parse().unwrap(), None),
            l4: L4 { protocol: "TCP" },
            observer: "proxy".into(),
            redirected: true,
            proxy: None,
            policy: None,
            policy_name: None,
            latency_ns: None,
            reason: None,
            l7: None,
        }
    }

    #[test]
    fn ring_is_bounded_and_filters() {
        let log = FlowLog::new(2);
        log.push(record("ALLOWED"));
        log.push(record("DENIED"));
        log.push(record("ALLOWED"));
        assert_eq!(log.snapshot(&FlowFilter::default()).len(), 2);
        let denied = FlowFilter { verdict: Some("denied".into()), ..Default::default() };
        assert_eq!(log.snapshot(&denied).len(), 1);
    }
}

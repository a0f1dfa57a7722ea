//! Flows as l7proxy records them (`/v1/flows`, JSON Lines), as policy-api and l7ctl read them
//! back (simulation, the service map, `l7ctl observe`). [`Flow`] holds every field l7proxy
//! writes; l7proxy writes its compact ring records through [`FlowView`], the borrowed form of
//! the same JSON (tests check both write every line of `tests/flows.jsonl` byte for byte).

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::reason::{DecidedBy, Miss, PolicyReason, Reason, RuleMiss, MAX_RULES_SHOWN};
use crate::{Direction, Verdict};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FlowEndpoint {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// Empty for a local workload whose socket had no address yet (a kernel connect verdict).
    #[serde(default)]
    pub ip: String,
    #[serde(default)]
    pub port: u16,
    /// The workload's cgroup id, when the endpoint is a local workload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_id: Option<u64>,
}

impl FlowEndpoint {
    /// The name a person reads: the workload, else the address.
    pub fn display(&self) -> String {
        match &self.workload {
            Some(w) => w.clone(),
            None if self.ip.is_empty() => "?".into(),
            None => self.ip.clone(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HttpPart {
    pub method: String,
    pub url: String,
    #[serde(default)]
    pub code: u16,
    /// `HTTP/1.1`, `HTTP/2` ...
    #[serde(default)]
    pub protocol: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GrpcPart {
    pub service: String,
    pub method: String,
    /// The authority as the proxy's `host` rules judged it (absent in older records).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub authority: String,
    /// The grpc-status the proxy saw in the response headers (trailers are streamed through).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KafkaPart {
    pub api_key: String,
    /// Requests of one connection are told apart by it (one flow per topic of a request).
    #[serde(default)]
    pub correlation_id: i32,
    pub api_version: i16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    #[serde(default)]
    pub client_id: String,
    #[serde(default)]
    pub error_code: i16,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum L7Part {
    Http { http: HttpPart },
    Grpc { grpc: GrpcPart },
    Kafka { kafka: KafkaPart },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct L4Part {
    pub protocol: String,
}

/// How the proxy took a connection over; absent for kernel-only verdicts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProxyPart {
    /// How the original destination was learned: `getsockopt`, `map` or `getsockname`.
    pub original_dst_via: String,
    /// The proxy's local address towards the upstream ("" before one was used).
    #[serde(default)]
    pub upstream: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Flow {
    /// The node that recorded it, in a cluster-wide answer (`cluster=true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// RFC 3339.
    pub time: String,
    pub verdict: Verdict,
    pub direction: Direction,
    pub source: FlowEndpoint,
    pub destination: FlowEndpoint,
    pub l4: L4Part,
    /// Which component decided: `kernel:<hook>` or `proxy`.
    pub observer: String,
    #[serde(default)]
    pub redirected: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<ProxyPart>,
    /// The kernel's policy id (written even when null).
    #[serde(default)]
    pub policy: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_name: Option<String>,
    /// The policy rule that decided a DENIED or AUDIT flow (absent in older records, and for
    /// refusals no rule made: bounds, TLS failures).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<DecidedBy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ns: Option<u64>,
    /// Why a connection was refused or failed, when it was: typed for policy decisions, in
    /// words otherwise (older records: always words).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l7: Option<L7Part>,
}

impl Flow {
    /// `http`, `grpc`, `kafka`, or the L4 protocol in lower case.
    pub fn protocol(&self) -> String {
        match &self.l7 {
            Some(L7Part::Http { .. }) => "http".into(),
            Some(L7Part::Grpc { .. }) => "grpc".into(),
            Some(L7Part::Kafka { .. }) => "kafka".into(),
            None => self.l4.protocol.to_ascii_lowercase(),
        }
    }

    /// What was asked, for a person: `GET http://host/path`, `helloworld.Greeter/SayHello`,
    /// `Produce topic=t`, or `tcp/80`.
    pub fn detail(&self) -> String {
        match &self.l7 {
            Some(L7Part::Http { http }) => format!("{} {}", http.method, http.url),
            Some(L7Part::Grpc { grpc }) => format!("{}/{}", grpc.service, grpc.method),
            Some(L7Part::Kafka { kafka }) => match &kafka.topic {
                Some(t) => format!("{} topic={t}", kafka.api_key),
                None => kafka.api_key.clone(),
            },
            None => format!("{}/{}", self.l4.protocol.to_ascii_lowercase(), self.destination.port),
        }
    }

    /// The proxy's per-connection record (its requests are flows of their own).
    pub fn is_proxy_connection(&self) -> bool {
        self.observer == "proxy" && self.l7.is_none()
    }

    /// This flow as its borrowed writer: the same JSON.
    pub fn view(&self) -> FlowView<'_> {
        fn endpoint(e: &FlowEndpoint) -> EndpointView<'_> {
            EndpointView {
                workload: e.workload.as_deref(),
                namespace: e.namespace.as_deref(),
                labels: e.labels.as_ref().map(LabelsView),
                ip: Cow::Borrowed(&e.ip),
                port: e.port,
                cgroup_id: e.cgroup_id,
            }
        }
        FlowView {
            time: Cow::Borrowed(&self.time),
            verdict: self.verdict,
            direction: self.direction,
            source: endpoint(&self.source),
            destination: endpoint(&self.destination),
            l4: L4View { protocol: &self.l4.protocol },
            observer: &self.observer,
            redirected: self.redirected,
            proxy: self
                .proxy
                .as_ref()
                .map(|p| ProxyView { original_dst_via: &p.original_dst_via, upstream: Cow::Borrowed(&p.upstream) }),
            policy: self.policy,
            policy_name: self.policy_name.as_deref(),
            decided_by: self.decided_by.as_ref(),
            latency_ns: self.latency_ns,
            reason: self.reason.as_ref(),
            l7: self.l7.as_ref().map(|l7| match l7 {
                L7Part::Http { http } => L7View::Http {
                    http: HttpView { method: &http.method, url: &http.url, code: http.code, protocol: &http.protocol },
                },
                L7Part::Grpc { grpc } => L7View::Grpc { grpc },
                L7Part::Kafka { kafka } => L7View::Kafka { kafka },
            }),
        }
    }
}

/// A flow borrowed from its writer's own record (l7proxy's ring holds compact records, so it
/// writes them through this instead of building a [`Flow`] per line): serializes to exactly
/// the JSON of the [`Flow`] with the same contents (the tests hold both to the sample lines).
/// Serialize only: readers read [`Flow`].
#[derive(Clone, Debug, Serialize)]
pub struct FlowView<'a> {
    pub time: Cow<'a, str>,
    pub verdict: Verdict,
    pub direction: Direction,
    pub source: EndpointView<'a>,
    pub destination: EndpointView<'a>,
    pub l4: L4View<'a>,
    pub observer: &'a str,
    pub redirected: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy: Option<ProxyView<'a>>,
    pub policy: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<&'a DecidedBy>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ns: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'a Reason>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub l7: Option<L7View<'a>>,
}

/// [`FlowEndpoint`], borrowed.
#[derive(Clone, Debug, Serialize)]
pub struct EndpointView<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labels: Option<LabelsView<'a>>,
    pub ip: Cow<'a, str>,
    pub port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup_id: Option<u64>,
}

/// A workload's labels as a flow carries them: without Kubernetes' own (`io.kubernetes.*`),
/// which every pod has and no reader selects on.
#[derive(Clone, Copy, Debug)]
pub struct LabelsView<'a>(pub &'a BTreeMap<String, String>);

impl<'a> LabelsView<'a> {
    pub fn iter(self) -> impl Iterator<Item = (&'a str, &'a str)> {
        self.0.iter().filter(|(k, _)| !k.starts_with("io.kubernetes.")).map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

impl Serialize for LabelsView<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

/// [`L4Part`], borrowed.
#[derive(Clone, Debug, Serialize)]
pub struct L4View<'a> {
    pub protocol: &'a str,
}

/// [`ProxyPart`], borrowed.
#[derive(Clone, Debug, Serialize)]
pub struct ProxyView<'a> {
    pub original_dst_via: &'a str,
    pub upstream: Cow<'a, str>,
}

/// [`HttpPart`], borrowed.
#[derive(Clone, Debug, Serialize)]
pub struct HttpView<'a> {
    pub method: &'a str,
    pub url: &'a str,
    pub code: u16,
    pub protocol: &'a str,
}

/// [`L7Part`], borrowed (the gRPC and Kafka parts are the writer's own).
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum L7View<'a> {
    Http { http: HttpView<'a> },
    Grpc { grpc: &'a GrpcPart },
    Kafka { kafka: &'a KafkaPart },
}

/// Parses JSON Lines; lines that are not flows are skipped.
pub fn parse_lines(text: &str) -> Vec<Flow> {
    text.lines().filter(|l| !l.trim().is_empty()).filter_map(|l| serde_json::from_str(l).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines exactly as l7proxy writes them (l7mesh-api/tests/flows.jsonl; l7proxy's flow
    /// tests check it writes these bytes): each is read, and the fields readers use come out right.
    #[test]
    fn reads_todays_lines() {
        let flows = parse_lines(include_str!("../tests/flows.jsonl"));
        let lines = include_str!("../tests/flows.jsonl").lines().filter(|l| !l.trim().is_empty()).count();
        assert_eq!(flows.len(), lines, "every sample line is a flow");
        assert!(flows.iter().any(|f| f.verdict == Verdict::Denied && f.protocol() == "http"));
        assert!(flows.iter().any(|f| f.direction == Direction::Ingress));
        assert!(flows.iter().any(|f| f.protocol() == "grpc"));
        assert!(flows.iter().any(|f| f.protocol() == "kafka"));
        assert!(flows.iter().any(|f| f.is_proxy_connection() && f.verdict == Verdict::Forwarded));
        assert!(flows.iter().any(|f| f.verdict == Verdict::Error && matches!(f.reason, Some(Reason::Text(_)))));
        // Denials name their rule and reason, typed; older lines without them still read.
        let l7 = flows.iter().find(|f| f.decided_by.as_ref().is_some_and(|d| !d.rule.is_empty())).unwrap();
        assert_eq!(l7.decided_by.as_ref().unwrap().rule, "ingress[0].toPorts[0].rules.http");
        assert_eq!(l7.reason.as_ref().unwrap().to_string(), "no rule matched path /x (rule allows GET /public/.*)");
        let kernel = flows.iter().find(|f| matches!(f.reason, Some(Reason::Policy(PolicyReason::DefaultDeny { .. }))));
        assert_eq!(kernel.unwrap().decided_by.as_ref().unwrap().to_string(), "policy default/db");
        assert!(flows.iter().any(|f| f.verdict == Verdict::Denied && f.decided_by.is_none() && f.reason.is_none()));
        for f in &flows {
            // Round trip: what a reader re-serializes reads back the same.
            let again: Flow = serde_json::from_str(&serde_json::to_string(f).unwrap()).unwrap();
            assert_eq!(&again, f);
        }
    }

    /// The owned reader type and the borrowed writer both write every sample line exactly.
    #[test]
    fn flow_and_its_view_write_the_same_lines() {
        let sample = include_str!("../tests/flows.jsonl");
        for line in sample.lines().filter(|l| !l.trim().is_empty()) {
            let flow: Flow = serde_json::from_str(line).unwrap();
            assert_eq!(serde_json::to_string(&flow).unwrap(), line);
            assert_eq!(serde_json::to_string(&flow.view()).unwrap(), line);
        }
        // Kubernetes' own labels are not written.
        let labels: BTreeMap<String, String> =
            [("app", "web"), ("io.kubernetes.pod.name", "p")].map(|(k, v)| (k.into(), v.into())).into();
        assert_eq!(serde_json::to_string(&LabelsView(&labels)).unwrap(), r#"{"app":"web"}"#);
    }

    #[test]
    fn unknown_verdicts_are_not_flows() {
        let line = r#"{"time":"t","verdict":"MAYBE","direction":"EGRESS","source":{},"destination":{},"l4":{"protocol":"TCP"},"observer":"proxy"}"#;
        assert!(parse_lines(line).is_empty());
        assert_eq!(parse_lines(&line.replace("MAYBE", "AUDIT")).len(), 1);
    }
}

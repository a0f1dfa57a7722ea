//! An l7mesh flow as a Hubble `flow.Flow`: what each l7mesh field becomes (README, "Hubble").
//!
//! - verdict: ALLOWED -> FORWARDED (REDIRECTED for the kernel's record of a connection it sent
//!   to the proxy), DENIED -> DROPPED, AUDIT -> AUDIT, FORWARDED -> FORWARDED, ERROR -> ERROR;
//! - a request (HTTP, gRPC, Kafka) is one L7 flow, an access-log event (type 129) of type
//!   RESPONSE once answered (REQUEST otherwise), source the client, `is_reply` false: l7mesh keeps
//!   one record per request and answer, where Cilium writes two;
//! - a kernel verdict is a policy-verdict event (type 5); the proxy's record of a connection a
//!   trace to the proxy (type 4, TO_PROXY), or a drop (type 1) when it refused it;
//! - local workloads are endpoints with their endpoint id, identity, namespace, pod name
//!   (the workload's name) and labels (`k8s:key=value`); other peers have only their address.

use l7mesh_api::flow::{DecidedBy, EndpointView, FlowView, L7View, PolicyReason, Reason};
use l7mesh_api::tables::WorkloadInfo;
use l7mesh_api::{Direction, Verdict};

use crate::proto::{self, event_type};

/// Cilium's label for a pod's namespace, which every pod endpoint carries.
const NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";

/// The workloads a flow's endpoints are (`None`: not a local workload).
#[derive(Clone, Copy, Debug, Default)]
pub struct Workloads<'a> {
    pub source: Option<&'a WorkloadInfo>,
    pub destination: Option<&'a WorkloadInfo>,
}

/// `flow` as Hubble's message, observed on `node_name`.
pub fn to_hubble(flow: &FlowView<'_>, workloads: Workloads<'_>, node_name: &str) -> proto::Flow {
    let kernel = flow.observer.starts_with("kernel");
    let verdict = match flow.verdict {
        Verdict::Allowed if kernel && flow.redirected => proto::Verdict::Redirected,
        Verdict::Allowed | Verdict::Forwarded => proto::Verdict::Forwarded,
        Verdict::Denied => proto::Verdict::Dropped,
        Verdict::Audit => proto::Verdict::Audit,
        Verdict::Error => proto::Verdict::Error,
    };
    let drop_reason = drop_reason(flow);
    let (kind, event, l7) = match &flow.l7 {
        Some(l7) => (proto::FlowType::L7, (event_type::ACCESS_LOG, 0), Some(layer7(l7, flow.latency_ns))),
        None if kernel => (proto::FlowType::L3L4, (event_type::POLICY_VERDICT, 0), None),
        None if flow.verdict == Verdict::Denied => {
            (proto::FlowType::L3L4, (event_type::DROP, drop_reason as i32), None)
        }
        None => (proto::FlowType::L3L4, (event_type::TRACE, proto::TraceObservationPoint::ToProxy as i32), None),
    };
    let trace_point = if event.0 == event_type::TRACE {
        proto::TraceObservationPoint::ToProxy
    } else {
        proto::TraceObservationPoint::UnknownPoint
    };
    let mut out = proto::Flow {
        time: timestamp(&flow.time),
        verdict: verdict as i32,
        ip: Some(ip(&flow.source, &flow.destination)),
        l4: Some(layer4(flow)),
        source: Some(endpoint(&flow.source, workloads.source)),
        destination: Some(endpoint(&flow.destination, workloads.destination)),
        r#type: kind as i32,
        node_name: node_name.to_string(),
        l7,
        event_type: Some(proto::CiliumEventType { r#type: event.0, sub_type: event.1 }),
        traffic_direction: match flow.direction {
            Direction::Ingress => proto::TrafficDirection::Ingress,
            Direction::Egress => proto::TrafficDirection::Egress,
        } as i32,
        policy_match_type: 0,
        trace_observation_point: trace_point as i32,
        drop_reason_desc: drop_reason as i32,
        is_reply: Some(false),
        summary: summary(flow),
        ..Default::default()
    };
    let denied = matches!(flow.verdict, Verdict::Denied | Verdict::Audit);
    let policies = match (denied, flow.decided_by, flow.policy_name) {
        (true, Some(d), _) => Some((true, policy(d))),
        (false, _, Some(name)) if flow.verdict == Verdict::Allowed => {
            Some((false, policy(&DecidedBy { policy: name.to_string(), rule: String::new() })))
        }
        _ => None,
    };
    if let Some((denied, p)) = policies {
        let list = match (denied, flow.direction) {
            (true, Direction::Egress) => &mut out.egress_denied_by,
            (true, Direction::Ingress) => &mut out.ingress_denied_by,
            (false, Direction::Egress) => &mut out.egress_allowed_by,
            (false, Direction::Ingress) => &mut out.ingress_allowed_by,
        };
        list.push(p);
    }
    out
}

/// Hubble's drop reason: an explicit deny rule, else any other policy decision; refusals no
/// policy made (bounds, TLS failures) have none Hubble names.
fn drop_reason(flow: &FlowView<'_>) -> proto::DropReason {
    if flow.verdict != Verdict::Denied {
        return proto::DropReason::Unknown;
    }
    match flow.reason {
        Some(Reason::Policy(PolicyReason::DenyRule { .. })) => proto::DropReason::PolicyDeny,
        Some(Reason::Policy(_)) => proto::DropReason::PolicyDenied,
        _ if flow.decided_by.is_some() => proto::DropReason::PolicyDenied,
        _ => proto::DropReason::Unknown,
    }
}

fn timestamp(rfc3339: &str) -> Option<prost_types::Timestamp> {
    let t = time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339).ok()?;
    Some(prost_types::Timestamp { seconds: t.unix_timestamp(), nanos: t.nanosecond() as i32 })
}

fn ip(source: &EndpointView<'_>, destination: &EndpointView<'_>) -> proto::Ip {
    let version = [&source.ip, &destination.ip]
        .iter()
        .find_map(|ip| ip.parse::<std::net::IpAddr>().ok())
        .map_or(proto::IpVersion::IpNotUsed, |ip| if ip.is_ipv4() { proto::IpVersion::IPv4 } else { proto::IpVersion::IPv6 });
    proto::Ip { source: source.ip.to_string(), destination: destination.ip.to_string(), ip_version: version as i32 }
}

fn layer4(flow: &FlowView<'_>) -> proto::Layer4 {
    let ports = proto::Ports { source_port: flow.source.port.into(), destination_port: flow.destination.port.into() };
    let protocol = if flow.l4.protocol.eq_ignore_ascii_case("udp") {
        proto::layer4::Protocol::Udp(ports)
    } else {
        proto::layer4::Protocol::Tcp(ports)
    };
    proto::Layer4 { protocol: Some(protocol) }
}

/// `k8s:key=value` per label, the namespace's label among them as Cilium writes it.
pub fn labels(w: &WorkloadInfo) -> Vec<String> {
    let mut out: Vec<String> = w
        .labels
        .iter()
        .map(|(k, v)| if k.contains(':') { format!("{k}={v}") } else { format!("k8s:{k}={v}") })
        .collect();
    if !w.labels.contains_key(NAMESPACE_LABEL) && !w.labels.contains_key(&format!("k8s:{NAMESPACE_LABEL}")) {
        out.push(format!("k8s:{NAMESPACE_LABEL}={}", w.namespace));
    }
    out.sort();
    out
}

fn endpoint(view: &EndpointView<'_>, workload: Option<&WorkloadInfo>) -> proto::Endpoint {
    match workload {
        Some(w) => proto::Endpoint {
            id: w.endpoint_id,
            identity: w.identity,
            namespace: w.namespace.clone(),
            labels: labels(w),
            pod_name: w.name.clone(),
            workloads: Vec::new(),
        },
        None => proto::Endpoint {
            namespace: view.namespace.unwrap_or_default().to_string(),
            pod_name: view.workload.unwrap_or_default().to_string(),
            ..Default::default()
        },
    }
}

fn layer7(l7: &L7View<'_>, latency_ns: Option<u64>) -> proto::Layer7 {
    use proto::layer7::Record;
    let (answered, record) = match l7 {
        L7View::Http { http } => (
            http.code != 0,
            Record::Http(proto::Http {
                code: http.code.into(),
                method: http.method.to_string(),
                url: http.url.to_string(),
                protocol: http.protocol.to_string(),
                headers: Vec::new(),
            }),
        ),
        // gRPC is HTTP/2 to Hubble, as Envoy logs it: POST of /service/method; an answer with a
        // grpc-status is HTTP 200 (gRPC's errors travel in the status, not the HTTP code).
        L7View::Grpc { grpc } => (
            grpc.status.is_some(),
            Record::Http(proto::Http {
                code: if grpc.status.is_some() { 200 } else { 0 },
                method: "POST".into(),
                url: format!("http://{}/{}/{}", grpc.authority, grpc.service, grpc.method),
                protocol: "HTTP/2".into(),
                headers: grpc
                    .status
                    .iter()
                    .map(|s| proto::HttpHeader { key: "grpc-status".into(), value: s.clone() })
                    .collect(),
            }),
        ),
        L7View::Kafka { kafka } => (
            latency_ns.is_some(),
            Record::Kafka(proto::Kafka {
                error_code: kafka.error_code.into(),
                api_version: kafka.api_version.into(),
                api_key: kafka.api_key.clone(),
                correlation_id: kafka.correlation_id,
                topic: kafka.topic.clone().unwrap_or_default(),
            }),
        ),
    };
    let kind = if answered { proto::L7FlowType::Response } else { proto::L7FlowType::Request };
    proto::Layer7 { r#type: kind as i32, latency_ns: latency_ns.unwrap_or(0), record: Some(record) }
}

/// A policy key (`namespace/name`, or a clusterwide policy's name) as Hubble's `Policy`, with the
/// labels Cilium derives for it.
fn policy(d: &DecidedBy) -> proto::Policy {
    let (namespace, name, kind) = match d.policy.split_once('/') {
        Some((ns, name)) => (ns, name, "CiliumNetworkPolicy"),
        None => ("", d.policy.as_str(), "CiliumClusterwideNetworkPolicy"),
    };
    let mut labels = vec![
        format!("k8s:io.cilium.k8s.policy.derived-from={kind}"),
        format!("k8s:io.cilium.k8s.policy.name={name}"),
    ];
    if !namespace.is_empty() {
        labels.push(format!("k8s:io.cilium.k8s.policy.namespace={namespace}"));
    }
    proto::Policy {
        name: name.to_string(),
        namespace: namespace.to_string(),
        labels,
        revision: 0,
        kind: kind.to_string(),
    }
}

/// Hubble's one-line summary (what `hubble observe` prints in brackets), with l7mesh's reason
/// for a refusal after it.
fn summary(flow: &FlowView<'_>) -> String {
    let ms = |ns: Option<u64>| ns.unwrap_or(0) / 1_000_000;
    let mut s = match &flow.l7 {
        Some(L7View::Http { http }) if http.code != 0 => {
            format!("{} {} {}ms ({} {})", http.protocol, http.code, ms(flow.latency_ns), http.method, http.url)
        }
        Some(L7View::Http { http }) => format!("{} {} {}", http.protocol, http.method, http.url),
        Some(L7View::Grpc { grpc }) => match &grpc.status {
            Some(st) => format!("gRPC {}/{} grpc-status {st} {}ms", grpc.service, grpc.method, ms(flow.latency_ns)),
            None => format!("gRPC {}/{}", grpc.service, grpc.method),
        },
        Some(L7View::Kafka { kafka }) => match &kafka.topic {
            Some(t) => format!("Kafka {} v{} topic {t} error {}", kafka.api_key, kafka.api_version, kafka.error_code),
            None => format!("Kafka {} v{} error {}", kafka.api_key, kafka.api_version, kafka.error_code),
        },
        None => format!("{} {}", flow.l4.protocol, flow.observer),
    };
    if let Some(d) = flow.decided_by {
        s.push_str(&format!("; {d}"));
    }
    if let Some(r) = flow.reason {
        s.push_str(&format!(": {r}"));
    }
    s
}

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
    let version = [&source.ip, &destination.ip].iter().find_map(|ip| ip.parse::<std::net::IpAddr>().ok()).map_or(
        proto::IpVersion::IpNotUsed,
        |ip| if ip.is_ipv4() { proto::IpVersion::IPv4 } else { proto::IpVersion::IPv6 },
    );
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
    let mut labels =
        vec![format!("k8s:io.cilium.k8s.policy.derived-from={kind}"), format!("k8s:io.cilium.k8s.policy.name={name}")];
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

#[cfg(test)]
mod tests {
    use super::*;
    use l7mesh_api::flow::{parse_lines, Flow};
    use prost::Message as _;
    use proto::layer7::Record;

    fn sample() -> Vec<Flow> {
        parse_lines(include_str!("../../l7mesh-api/tests/flows.jsonl"))
    }

    fn web() -> WorkloadInfo {
        WorkloadInfo {
            cgroup_id: 4242,
            node: String::new(),
            endpoint_id: 3,
            identity: 70001,
            name: "web".into(),
            namespace: "default".into(),
            labels: [("app".to_string(), "web".to_string())].into(),
            egress_enforced_by: Vec::new(),
            ingress_enforced_by: Vec::new(),
        }
    }

    /// Hubble's field numbers, checked against bytes worked out by hand from flow.proto (not
    /// from this encoder): a flow with a few fields of each kind, the large numbers among them.
    #[test]
    fn encodes_with_hubbles_field_numbers() {
        let flow = proto::Flow {
            verdict: proto::Verdict::Dropped as i32,
            l4: Some(proto::Layer4 {
                protocol: Some(proto::layer4::Protocol::Tcp(proto::Ports { source_port: 1234, destination_port: 80 })),
            }),
            node_name: "n".into(),
            l7: Some(proto::Layer7 {
                r#type: proto::L7FlowType::Response as i32,
                latency_ns: 0,
                record: Some(Record::Http(proto::Http { code: 403, ..Default::default() })),
            }),
            traffic_direction: proto::TrafficDirection::Ingress as i32,
            is_reply: Some(false),
            summary: "x".into(),
            egress_denied_by: vec![proto::Policy { name: "p".into(), ..Default::default() }],
            ..Default::default()
        };
        let mut want: Vec<u8> = vec![0x10, 0x02]; // 2 verdict = DROPPED (2)
        want.extend([0x32, 0x07, 0x0a, 0x05, 0x08, 0xd2, 0x09, 0x10, 0x50]); // 6 l4 { 1 TCP { 1234, 80 } }
        want.extend([0x5a, 0x01, b'n']); // 11 node_name
                                         // 15 l7 { 1 type = RESPONSE (2), 101 http { 1 code = 403 } }
        want.extend([0x7a, 0x08, 0x08, 0x02, 0xaa, 0x06, 0x03, 0x08, 0x93, 0x03]);
        want.extend([0xb0, 0x01, 0x01]); // 22 traffic_direction = INGRESS (1)
        want.extend([0xd2, 0x01, 0x00]); // 26 is_reply = BoolValue { false }
        let summary = [0x82, 0xea, 0x30, 0x01, b'x']; // 100000 Summary
        let denied = [0xe2, 0xa0, 0x0a, 0x03, 0x0a, 0x01, b'p']; // 21004 egress_denied_by { 1 name }
        let got = flow.encode_to_vec();
        // Protobuf allows fields in any order: the two large ones are compared apart.
        let tail = got.len() - summary.len() - denied.len();
        assert_eq!(got[..tail], want[..], "{got:02x?}");
        let rest = &got[tail..];
        assert!(
            rest == [&denied[..], &summary[..]].concat() || rest == [&summary[..], &denied[..]].concat(),
            "{rest:02x?}"
        );
        assert_eq!(proto::Flow::decode(&got[..]).unwrap(), flow);
    }

    /// A request as hubble sends it (packed enums, as Go writes them), and a field this
    /// server does not define: kept by number, not dropped.
    #[test]
    fn decodes_requests_and_keeps_unknown_fields() {
        // 1 number = 5, 3 follow, 6 whitelist { 5 verdict [DROPPED], 2 source_pod "ns/", 50: 1 }
        let bytes =
            [0x08, 0x05, 0x18, 0x01, 0x32, 0x0b, 0x2a, 0x01, 0x02, 0x12, 0x03, b'n', b's', b'/', 0x90, 0x03, 0x01];
        let req = proto::Checked::<proto::GetFlowsRequest>::decode(&bytes[..]).unwrap();
        assert!(req.unknown_fields.is_empty());
        let r = &req.message;
        assert_eq!((r.number, r.follow, r.first), (5, true, false));
        let filter = &r.whitelist[0];
        assert_eq!(filter.message.verdict, [proto::Verdict::Dropped as i32]);
        assert_eq!(filter.message.source_pod, ["ns/"]);
        assert_eq!(filter.unknown_fields, [50]);
        // The same at the top level.
        let req = proto::Checked::<proto::GetFlowsRequest>::decode(&[0x08, 0x05, 0xa0, 0x06, 0x01][..]).unwrap();
        assert_eq!((req.message.number, req.unknown_fields.as_slice()), (5, &[100][..]));
    }

    #[test]
    fn l7mesh_flows_as_hubble_flows() {
        let flows = sample();
        let w = web();
        let side = |f: &Flow| Workloads {
            source: f.source.workload.is_some().then_some(&w),
            destination: f.destination.workload.is_some().then_some(&w),
        };
        let hubble: Vec<proto::Flow> = flows.iter().map(|f| to_hubble(&f.view(), side(f), "node-1")).collect();

        // An HTTP request the proxy denied (egress): DROPPED, L7 access log, the answer.
        let h = &hubble[0];
        assert_eq!((h.verdict, h.r#type), (proto::Verdict::Dropped as i32, proto::FlowType::L7 as i32));
        assert_eq!(h.event_type, Some(proto::CiliumEventType { r#type: event_type::ACCESS_LOG, sub_type: 0 }));
        assert_eq!(h.traffic_direction, proto::TrafficDirection::Egress as i32);
        assert_eq!(h.time, Some(prost_types::Timestamp { seconds: 1_790_000_000, nanos: 0 }));
        assert_eq!(h.node_name, "node-1");
        assert_eq!(h.is_reply, Some(false));
        let l7 = h.l7.as_ref().unwrap();
        assert_eq!((l7.r#type, l7.latency_ns), (proto::L7FlowType::Response as i32, 125_000));
        let Some(Record::Http(http)) = &l7.record else { panic!("{l7:?}") };
        assert_eq!(
            (http.code, http.method.as_str(), http.url.as_str(), http.protocol.as_str()),
            (403, "PUT", "http://api/x", "HTTP/1.1")
        );
        let src = h.source.as_ref().unwrap();
        assert_eq!((src.id, src.identity, src.pod_name.as_str(), src.namespace.as_str()), (3, 70001, "web", "default"));
        assert_eq!(src.labels, ["k8s:app=web", "k8s:io.kubernetes.pod.namespace=default"]);
        let ip = h.ip.as_ref().unwrap();
        assert_eq!((ip.source.as_str(), ip.destination.as_str(), ip.ip_version), ("10.0.0.5", "10.0.0.9", 1));
        let dst = h.destination.as_ref().unwrap();
        assert_eq!((dst.identity, dst.pod_name.as_str()), (0, ""), "a peer that is no local workload");
        assert_eq!(h.summary, "HTTP/1.1 403 0ms (PUT http://api/x)");

        // gRPC: HTTP/2 POST of /service/method, its grpc-status a header.
        let Some(Record::Http(grpc)) = hubble[1].l7.as_ref().and_then(|l| l.record.clone()) else { panic!() };
        assert_eq!(grpc.url, "http://greeter:50051/helloworld.Greeter/SayHello");
        assert_eq!((grpc.method.as_str(), grpc.protocol.as_str(), grpc.code), ("POST", "HTTP/2", 200));
        assert_eq!(grpc.headers, [proto::HttpHeader { key: "grpc-status".into(), value: "0".into() }]);
        assert_eq!(hubble[1].verdict, proto::Verdict::Forwarded as i32);
        assert_eq!(hubble[1].traffic_direction, proto::TrafficDirection::Ingress as i32);

        // Kafka, audited.
        assert_eq!(hubble[2].verdict, proto::Verdict::Audit as i32);
        let Some(Record::Kafka(k)) = hubble[2].l7.as_ref().and_then(|l| l.record.clone()) else { panic!() };
        assert_eq!(
            (k.api_key.as_str(), k.topic.as_str(), k.api_version, k.correlation_id),
            ("Produce", "orders", 9, 9)
        );
        assert_eq!(hubble[2].l7.as_ref().unwrap().r#type, proto::L7FlowType::Request as i32, "no answer yet");

        // A proxied connection a peer reset: a trace to the proxy, FORWARDED.
        let ended = &hubble[3];
        assert_eq!((ended.verdict, ended.r#type), (proto::Verdict::Forwarded as i32, proto::FlowType::L3L4 as i32));
        assert_eq!(ended.event_type, Some(proto::CiliumEventType { r#type: event_type::TRACE, sub_type: 1 }));
        assert_eq!(ended.trace_observation_point, proto::TraceObservationPoint::ToProxy as i32);
        assert_eq!(ended.summary, "TCP proxy: upstream reset the connection");

        // A kernel denial: a policy verdict; unbound source (no address yet).
        let k = &hubble[4];
        assert_eq!(k.event_type, Some(proto::CiliumEventType { r#type: event_type::POLICY_VERDICT, sub_type: 0 }));
        assert_eq!((k.verdict, k.drop_reason_desc), (proto::Verdict::Dropped as i32, 0), "no rule named");
        assert_eq!(k.ip.as_ref().unwrap().source, "");

        // Denials that name their rule: the deciding side's *_denied_by, Cilium's policy labels.
        let explained = &hubble[5];
        assert_eq!(explained.drop_reason_desc, proto::DropReason::PolicyDenied as i32);
        assert!(explained.egress_denied_by.is_empty());
        let p = &explained.ingress_denied_by[0];
        assert_eq!((p.name.as_str(), p.namespace.as_str(), p.kind.as_str()), ("web", "default", "CiliumNetworkPolicy"));
        assert!(p.labels.contains(&"k8s:io.cilium.k8s.policy.name=web".to_string()), "{:?}", p.labels);
        assert!(explained.summary.ends_with(
            "; policy default/web ingress[0].toPorts[0].rules.http: no rule matched path /x (rule allows GET /public/.*)"
        ), "{}", explained.summary);
        let default_deny = &hubble[6];
        assert_eq!(default_deny.ingress_denied_by[0].name, "db");
        assert_eq!(default_deny.drop_reason_desc, proto::DropReason::PolicyDenied as i32);
        assert_eq!(hubble[7].verdict, proto::Verdict::Error as i32);

        // An explicit deny rule is Hubble's POLICY_DENY; a clusterwide policy has no namespace.
        let mut deny = flows[6].clone();
        deny.reason = Some(Reason::Policy(PolicyReason::DenyRule { peer: "web".into() }));
        deny.decided_by = Some(DecidedBy { policy: "lockdown".into(), rule: "ingressDeny[0]".into() });
        let h = to_hubble(&deny.view(), Workloads::default(), "n");
        assert_eq!(h.drop_reason_desc, proto::DropReason::PolicyDeny as i32);
        let p = &h.ingress_denied_by[0];
        assert_eq!(
            (p.name.as_str(), p.namespace.as_str(), p.kind.as_str()),
            ("lockdown", "", "CiliumClusterwideNetworkPolicy")
        );
        // A kernel record of a connection sent to the proxy is REDIRECTED; an allowed request
        // names the policy that allowed it.
        let mut redirected = flows[4].clone();
        (redirected.verdict, redirected.redirected) = (Verdict::Allowed, true);
        assert_eq!(to_hubble(&redirected.view(), Workloads::default(), "n").verdict, proto::Verdict::Redirected as i32);
        let mut allowed = flows[0].clone();
        allowed.verdict = Verdict::Allowed;
        let h = to_hubble(&allowed.view(), Workloads::default(), "n");
        assert_eq!(h.egress_allowed_by[0].name, "web-egress");
        assert!(h.egress_denied_by.is_empty() && h.drop_reason_desc == 0);
    }
}

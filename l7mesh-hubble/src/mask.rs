//! GetFlows' field mask (`field_mask`, or the older `experimental.field_mask`): only the named
//! fields of each flow are sent (`hubble observe --experimental-field-mask`, and the CLI's
//! default masks for its compact, dict and table output). Paths are Hubble's field names
//! (`time`, `source.pod_name`, `l7.http.url`); one Hubble does not define is refused. The mask
//! is applied to the encoded flow, field number by field number, after the filters judged the
//! whole flow.

use std::collections::BTreeMap;

use prost::bytes::Buf;
use prost::encoding::{decode_key, decode_varint, encode_key, encode_varint, WireType};
use prost::Message as _;

use crate::proto;

/// A message type's fields.
type Fields = &'static [F];

/// A field: its name, its number, and the fields of the message it holds (if any).
struct F(&'static str, u32, Option<Fields>);

const TCP_FLAGS: Fields = &[
    F("FIN", 1, None),
    F("SYN", 2, None),
    F("RST", 3, None),
    F("PSH", 4, None),
    F("ACK", 5, None),
    F("URG", 6, None),
    F("ECE", 7, None),
    F("CWR", 8, None),
    F("NS", 9, None),
];
const TCP: Fields = &[F("source_port", 1, None), F("destination_port", 2, None), F("flags", 3, Some(TCP_FLAGS))];
const PORTS: Fields = &[F("source_port", 1, None), F("destination_port", 2, None)];
const ICMP: Fields = &[F("type", 1, None), F("code", 2, None)];
const LAYER4: Fields = &[
    F("TCP", 1, Some(TCP)),
    F("UDP", 2, Some(PORTS)),
    F("ICMPv4", 3, Some(ICMP)),
    F("ICMPv6", 4, Some(ICMP)),
    F("SCTP", 5, Some(PORTS)),
];
const IP: Fields = &[
    F("source", 1, None),
    F("source_xlated", 5, None),
    F("destination", 2, None),
    F("ipVersion", 3, None),
    F("encrypted", 4, None),
];
const ETHERNET: Fields = &[F("source", 1, None), F("destination", 2, None)];
const WORKLOAD: Fields = &[F("name", 1, None), F("kind", 2, None)];
const ENDPOINT: Fields = &[
    F("ID", 1, None),
    F("identity", 2, None),
    F("cluster_name", 7, None),
    F("namespace", 3, None),
    F("labels", 4, None),
    F("pod_name", 5, None),
    F("workloads", 6, Some(WORKLOAD)),
];
const HEADER: Fields = &[F("key", 1, None), F("value", 2, None)];
const HTTP: Fields = &[
    F("code", 1, None),
    F("method", 2, None),
    F("url", 3, None),
    F("protocol", 4, None),
    F("headers", 5, Some(HEADER)),
];
const KAFKA: Fields = &[
    F("error_code", 1, None),
    F("api_version", 2, None),
    F("api_key", 3, None),
    F("correlation_id", 4, None),
    F("topic", 5, None),
];
const DNS: Fields = &[
    F("query", 1, None),
    F("ips", 2, None),
    F("ttl", 3, None),
    F("cnames", 4, None),
    F("observation_source", 5, None),
    F("rcode", 6, None),
    F("qtypes", 7, None),
    F("rrtypes", 8, None),
];
const LAYER7: Fields = &[
    F("type", 1, None),
    F("latency_ns", 2, None),
    F("dns", 100, Some(DNS)),
    F("http", 101, Some(HTTP)),
    F("kafka", 102, Some(KAFKA)),
];
const EVENT_TYPE: Fields = &[F("type", 1, None), F("sub_type", 2, None)];
const SERVICE: Fields = &[F("name", 1, None), F("namespace", 2, None)];
const POLICY: Fields =
    &[F("name", 1, None), F("namespace", 2, None), F("labels", 3, None), F("revision", 4, None), F("kind", 5, None)];
const INTERFACE: Fields = &[F("index", 1, None), F("name", 2, None)];

/// `flow.Flow`'s fields, all of Hubble v1.18's (those l7mesh never fills are simply empty).
const FLOW: Fields = &[
    F("time", 1, None),
    F("uuid", 34, None),
    F("verdict", 2, None),
    F("drop_reason", 3, None),
    F("auth_type", 35, None),
    F("ethernet", 4, Some(ETHERNET)),
    F("IP", 5, Some(IP)),
    F("l4", 6, Some(LAYER4)),
    F("tunnel", 39, None),
    F("source", 8, Some(ENDPOINT)),
    F("destination", 9, Some(ENDPOINT)),
    F("Type", 10, None),
    F("node_name", 11, None),
    F("node_labels", 37, None),
    F("source_names", 13, None),
    F("destination_names", 14, None),
    F("l7", 15, Some(LAYER7)),
    F("reply", 16, None),
    F("event_type", 19, Some(EVENT_TYPE)),
    F("source_service", 20, Some(SERVICE)),
    F("destination_service", 21, Some(SERVICE)),
    F("traffic_direction", 22, None),
    F("policy_match_type", 23, None),
    F("trace_observation_point", 24, None),
    F("trace_reason", 36, None),
    F("file", 38, None),
    F("drop_reason_desc", 25, None),
    F("is_reply", 26, None),
    F("debug_capture_point", 27, None),
    F("interface", 28, Some(INTERFACE)),
    F("proxy_port", 29, None),
    F("trace_context", 30, None),
    F("sock_xlate_point", 31, None),
    F("socket_cookie", 32, None),
    F("cgroup_id", 33, None),
    F("Summary", 100000, None),
    F("extensions", 150000, None),
    F("egress_allowed_by", 21001, Some(POLICY)),
    F("ingress_allowed_by", 21002, Some(POLICY)),
    F("egress_denied_by", 21004, Some(POLICY)),
    F("ingress_denied_by", 21005, Some(POLICY)),
    F("policy_log", 21006, None),
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("field_mask path `{0}` names no field of Hubble's flow.Flow")]
pub struct MaskError(pub String);

#[derive(Clone, Debug, PartialEq, Eq)]
enum Keep {
    Whole,
    Some(BTreeMap<u32, Keep>),
}

/// A compiled mask: which field numbers to keep, per level.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldMask(BTreeMap<u32, Keep>);

impl FieldMask {
    pub fn new(paths: &[String]) -> Result<Self, MaskError> {
        let mut root = BTreeMap::new();
        for path in paths {
            let mut level = &mut root;
            let mut fields = FLOW;
            let parts: Vec<&str> = path.split('.').collect();
            for (i, part) in parts.iter().enumerate() {
                let &F(_, number, sub) = fields.iter().find(|f| f.0 == *part).ok_or_else(|| MaskError(path.clone()))?;
                let last = i + 1 == parts.len();
                if last {
                    level.insert(number, Keep::Whole);
                    break;
                }
                let sub = sub.ok_or_else(|| MaskError(path.clone()))?;
                let entry = level.entry(number).or_insert_with(|| Keep::Some(BTreeMap::new()));
                match entry {
                    // A whole field already kept stays whole.
                    Keep::Whole => break,
                    Keep::Some(next) => level = next,
                }
                fields = sub;
            }
        }
        Ok(FieldMask(root))
    }

    /// `flow` with only the mask's fields.
    pub fn apply(&self, flow: &proto::Flow) -> proto::Flow {
        let bytes = flow.encode_to_vec();
        let mut out = Vec::with_capacity(bytes.len());
        // The bytes are this process's own encoding: they always walk and decode.
        if keep(&bytes, &self.0, &mut out).is_err() {
            return proto::Flow::default();
        }
        proto::Flow::decode(&out[..]).unwrap_or_default()
    }
}

/// Bytes that do not walk as protobuf (never this process's own encoding).
struct Malformed;

fn keep(mut buf: &[u8], wanted: &BTreeMap<u32, Keep>, out: &mut Vec<u8>) -> Result<(), Malformed> {
    while buf.has_remaining() {
        let start = buf;
        let (tag, wire_type) = decode_key(&mut buf).map_err(|_| Malformed)?;
        let inner: Option<&[u8]> = match wire_type {
            WireType::Varint => {
                decode_varint(&mut buf).map_err(|_| Malformed)?;
                None
            }
            WireType::SixtyFourBit => {
                buf.advance(8.min(buf.len()));
                None
            }
            WireType::ThirtyTwoBit => {
                buf.advance(4.min(buf.len()));
                None
            }
            WireType::LengthDelimited => {
                let len = usize::try_from(decode_varint(&mut buf).map_err(|_| Malformed)?)
                    .unwrap_or(usize::MAX)
                    .min(buf.len());
                let (inner, rest) = buf.split_at(len);
                buf = rest;
                Some(inner)
            }
            // Groups: flow.Flow has none.
            _ => return Err(Malformed),
        };
        match (wanted.get(&tag), inner) {
            (Some(Keep::Whole), _) => out.extend_from_slice(&start[..start.len() - buf.len()]),
            (Some(Keep::Some(sub)), Some(inner)) => {
                let mut kept = Vec::new();
                keep(inner, sub, &mut kept)?;
                encode_key(tag, WireType::LengthDelimited, out);
                encode_varint(kept.len() as u64, out);
                out.extend_from_slice(&kept);
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow() -> proto::Flow {
        proto::Flow {
            time: Some(prost_types::Timestamp { seconds: 5, nanos: 0 }),
            verdict: 2,
            source: Some(proto::Endpoint {
                pod_name: "web".into(),
                identity: 9,
                labels: vec!["k8s:app=web".into()],
                ..Default::default()
            }),
            destination: Some(proto::Endpoint { pod_name: "db".into(), ..Default::default() }),
            l7: Some(proto::Layer7 {
                r#type: 2,
                latency_ns: 7,
                record: Some(proto::layer7::Record::Http(proto::Http {
                    code: 403,
                    url: "http://x/".into(),
                    ..Default::default()
                })),
            }),
            summary: "s".into(),
            ingress_denied_by: vec![proto::Policy { name: "p".into(), kind: "k".into(), ..Default::default() }],
            ..Default::default()
        }
    }

    #[test]
    fn keeps_only_the_named_fields() {
        let paths = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let m =
            FieldMask::new(&paths(&["time", "source.pod_name", "l7.http.code", "Summary", "ingress_denied_by.name"]))
                .unwrap();
        let got = m.apply(&flow());
        let want = proto::Flow {
            time: Some(prost_types::Timestamp { seconds: 5, nanos: 0 }),
            source: Some(proto::Endpoint { pod_name: "web".into(), ..Default::default() }),
            l7: Some(proto::Layer7 {
                record: Some(proto::layer7::Record::Http(proto::Http { code: 403, ..Default::default() })),
                ..Default::default()
            }),
            summary: "s".into(),
            ingress_denied_by: vec![proto::Policy { name: "p".into(), ..Default::default() }],
            ..Default::default()
        };
        assert_eq!(got, want);
        // A whole message, and a path below one already kept whole.
        let m = FieldMask::new(&paths(&["source", "source.pod_name", "verdict"])).unwrap();
        let got = m.apply(&flow());
        assert_eq!((got.source, got.verdict, got.destination), (flow().source, 2, None));
        // The CLI's default mask for its compact output is valid.
        let cli = [
            "time",
            "source.identity",
            "source.namespace",
            "source.pod_name",
            "destination.identity",
            "destination.namespace",
            "destination.pod_name",
            "source_service",
            "destination_service",
            "l4",
            "IP",
            "ethernet",
            "l7",
            "Type",
            "node_name",
            "is_reply",
            "event_type",
            "verdict",
            "Summary",
        ];
        let got = FieldMask::new(&paths(&cli)).unwrap().apply(&flow());
        assert_eq!((got.l7, got.ingress_denied_by.len()), (flow().l7, 0));
    }

    #[test]
    fn refuses_paths_hubble_does_not_define() {
        for bad in ["colour", "source.colour", "time.seconds", "l7.http.url.host", ""] {
            assert_eq!(FieldMask::new(&[bad.to_string()]), Err(MaskError(bad.to_string())), "{bad}");
        }
    }
}

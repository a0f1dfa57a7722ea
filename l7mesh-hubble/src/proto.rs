//! Hubble's wire messages (packages `flow` and `observer`, Hubble v1.18's `flow.proto` and
//! `observer.proto`), written by hand with prost's derive: only the fields l7mesh fills in or
//! reads, each with Hubble's own field number and enum values. Fields a client sends that are
//! not here are not dropped unseen: [`Checked`] keeps their numbers, and the server refuses
//! them (see `filter.rs`).

use prost::bytes::{Buf, BufMut};
use prost::encoding::{DecodeContext, WireType};
use prost::{DecodeError, Message};

/// `flow.Flow`.
#[derive(Clone, PartialEq, Message)]
pub struct Flow {
    #[prost(message, optional, tag = "1")]
    pub time: Option<prost_types::Timestamp>,
    #[prost(enumeration = "Verdict", tag = "2")]
    pub verdict: i32,
    #[prost(message, optional, tag = "5")]
    pub ip: Option<Ip>,
    #[prost(message, optional, tag = "6")]
    pub l4: Option<Layer4>,
    #[prost(message, optional, tag = "8")]
    pub source: Option<Endpoint>,
    #[prost(message, optional, tag = "9")]
    pub destination: Option<Endpoint>,
    #[prost(enumeration = "FlowType", tag = "10")]
    pub r#type: i32,
    #[prost(string, tag = "11")]
    pub node_name: String,
    #[prost(message, optional, tag = "15")]
    pub l7: Option<Layer7>,
    #[prost(message, optional, tag = "19")]
    pub event_type: Option<CiliumEventType>,
    #[prost(enumeration = "TrafficDirection", tag = "22")]
    pub traffic_direction: i32,
    #[prost(uint32, tag = "23")]
    pub policy_match_type: u32,
    #[prost(enumeration = "TraceObservationPoint", tag = "24")]
    pub trace_observation_point: i32,
    #[prost(enumeration = "DropReason", tag = "25")]
    pub drop_reason_desc: i32,
    /// google.protobuf.BoolValue.
    #[prost(message, optional, tag = "26")]
    pub is_reply: Option<bool>,
    #[prost(string, tag = "100000")]
    pub summary: String,
    #[prost(message, repeated, tag = "21001")]
    pub egress_allowed_by: Vec<Policy>,
    #[prost(message, repeated, tag = "21002")]
    pub ingress_allowed_by: Vec<Policy>,
    #[prost(message, repeated, tag = "21004")]
    pub egress_denied_by: Vec<Policy>,
    #[prost(message, repeated, tag = "21005")]
    pub ingress_denied_by: Vec<Policy>,
}

/// `flow.FlowType`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum FlowType {
    UnknownType = 0,
    L3L4 = 1,
    L7 = 2,
    Sock = 3,
}

/// `flow.Verdict`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Verdict {
    Unknown = 0,
    Forwarded = 1,
    Dropped = 2,
    Error = 3,
    Audit = 4,
    Redirected = 5,
    Traced = 6,
    Translated = 7,
}

/// `flow.TrafficDirection`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum TrafficDirection {
    Unknown = 0,
    Ingress = 1,
    Egress = 2,
}

/// `flow.TraceObservationPoint` (the values l7mesh uses).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum TraceObservationPoint {
    UnknownPoint = 0,
    ToProxy = 1,
}

/// `flow.DropReason` (the values l7mesh uses).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum DropReason {
    Unknown = 0,
    /// Nothing allows it (a default deny, or no L7 rule matched).
    PolicyDenied = 133,
    /// An explicit deny rule.
    PolicyDeny = 181,
}

/// `flow.IPVersion`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum IpVersion {
    IpNotUsed = 0,
    IPv4 = 1,
    IPv6 = 2,
}

/// `flow.L7FlowType`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum L7FlowType {
    UnknownL7Type = 0,
    Request = 1,
    Response = 2,
    Sample = 3,
}

/// `flow.LostEventSource`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum LostEventSource {
    UnknownLostEventSource = 0,
    PerfEventRingBuffer = 1,
    ObserverEventsQueue = 2,
    HubbleRingBuffer = 3,
}

/// `flow.IP`.
#[derive(Clone, PartialEq, Message)]
pub struct Ip {
    #[prost(string, tag = "1")]
    pub source: String,
    #[prost(string, tag = "2")]
    pub destination: String,
    #[prost(enumeration = "IpVersion", tag = "3")]
    pub ip_version: i32,
}

/// `flow.Layer4`.
#[derive(Clone, PartialEq, Message)]
pub struct Layer4 {
    #[prost(oneof = "layer4::Protocol", tags = "1, 2")]
    pub protocol: Option<layer4::Protocol>,
}

pub mod layer4 {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Protocol {
        #[prost(message, tag = "1")]
        Tcp(super::Ports),
        #[prost(message, tag = "2")]
        Udp(super::Ports),
    }
}

/// `flow.TCP` and `flow.UDP` (their ports are fields 1 and 2 in both).
#[derive(Clone, PartialEq, Message)]
pub struct Ports {
    #[prost(uint32, tag = "1")]
    pub source_port: u32,
    #[prost(uint32, tag = "2")]
    pub destination_port: u32,
}

/// `flow.Endpoint`.
#[derive(Clone, PartialEq, Message)]
pub struct Endpoint {
    #[prost(uint32, tag = "1")]
    pub id: u32,
    #[prost(uint32, tag = "2")]
    pub identity: u32,
    #[prost(string, tag = "3")]
    pub namespace: String,
    /// `k8s:key=value`, as Cilium writes a pod's labels.
    #[prost(string, repeated, tag = "4")]
    pub labels: Vec<String>,
    #[prost(string, tag = "5")]
    pub pod_name: String,
    #[prost(message, repeated, tag = "6")]
    pub workloads: Vec<Workload>,
}

/// `flow.Workload`.
#[derive(Clone, PartialEq, Message)]
pub struct Workload {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub kind: String,
}

/// `flow.Layer7`.
#[derive(Clone, PartialEq, Message)]
pub struct Layer7 {
    #[prost(enumeration = "L7FlowType", tag = "1")]
    pub r#type: i32,
    #[prost(uint64, tag = "2")]
    pub latency_ns: u64,
    #[prost(oneof = "layer7::Record", tags = "101, 102")]
    pub record: Option<layer7::Record>,
}

pub mod layer7 {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Record {
        #[prost(message, tag = "101")]
        Http(super::Http),
        #[prost(message, tag = "102")]
        Kafka(super::Kafka),
    }
}

/// `flow.HTTP`.
#[derive(Clone, PartialEq, Message)]
pub struct Http {
    #[prost(uint32, tag = "1")]
    pub code: u32,
    #[prost(string, tag = "2")]
    pub method: String,
    #[prost(string, tag = "3")]
    pub url: String,
    #[prost(string, tag = "4")]
    pub protocol: String,
    #[prost(message, repeated, tag = "5")]
    pub headers: Vec<HttpHeader>,
}

/// `flow.HTTPHeader`.
#[derive(Clone, PartialEq, Message)]
pub struct HttpHeader {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

/// `flow.Kafka`.
#[derive(Clone, PartialEq, Message)]
pub struct Kafka {
    #[prost(int32, tag = "1")]
    pub error_code: i32,
    #[prost(int32, tag = "2")]
    pub api_version: i32,
    #[prost(string, tag = "3")]
    pub api_key: String,
    #[prost(int32, tag = "4")]
    pub correlation_id: i32,
    #[prost(string, tag = "5")]
    pub topic: String,
}

/// `flow.Policy`.
#[derive(Clone, PartialEq, Message)]
pub struct Policy {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub namespace: String,
    #[prost(string, repeated, tag = "3")]
    pub labels: Vec<String>,
    #[prost(uint64, tag = "4")]
    pub revision: u64,
    #[prost(string, tag = "5")]
    pub kind: String,
}

/// `flow.CiliumEventType`: Cilium's monitor message type (see [`event_type`]).
#[derive(Clone, PartialEq, Message)]
pub struct CiliumEventType {
    #[prost(int32, tag = "1")]
    pub r#type: i32,
    #[prost(int32, tag = "2")]
    pub sub_type: i32,
}

/// Cilium's monitor message types, as `event_type.type` carries them.
pub mod event_type {
    pub const DROP: i32 = 1;
    pub const TRACE: i32 = 4;
    pub const POLICY_VERDICT: i32 = 5;
    /// An L7 proxy's access log record.
    pub const ACCESS_LOG: i32 = 129;
}

/// `flow.LostEvent`.
#[derive(Clone, PartialEq, Message)]
pub struct LostEvent {
    #[prost(enumeration = "LostEventSource", tag = "1")]
    pub source: i32,
    #[prost(uint64, tag = "2")]
    pub num_events_lost: u64,
}

/// `flow.EventTypeFilter`.
#[derive(Clone, PartialEq, Message)]
pub struct EventTypeFilter {
    #[prost(int32, tag = "1")]
    pub r#type: i32,
    #[prost(bool, tag = "2")]
    pub match_sub_type: bool,
    #[prost(int32, tag = "3")]
    pub sub_type: i32,
}

/// `flow.FlowFilter`: every field Hubble v1.18 defines, so that one l7mesh cannot honour is
/// refused by name rather than dropped (unknown numbers: [`Checked`]).
#[derive(Clone, PartialEq, Message)]
pub struct FlowFilter {
    #[prost(string, repeated, tag = "29")]
    pub uuid: Vec<String>,
    #[prost(string, repeated, tag = "1")]
    pub source_ip: Vec<String>,
    #[prost(string, repeated, tag = "34")]
    pub source_ip_xlated: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub source_pod: Vec<String>,
    #[prost(string, repeated, tag = "7")]
    pub source_fqdn: Vec<String>,
    #[prost(string, repeated, tag = "10")]
    pub source_label: Vec<String>,
    #[prost(string, repeated, tag = "16")]
    pub source_service: Vec<String>,
    #[prost(message, repeated, tag = "26")]
    pub source_workload: Vec<Workload>,
    #[prost(string, repeated, tag = "37")]
    pub source_cluster_name: Vec<String>,
    #[prost(string, repeated, tag = "3")]
    pub destination_ip: Vec<String>,
    #[prost(string, repeated, tag = "4")]
    pub destination_pod: Vec<String>,
    #[prost(string, repeated, tag = "8")]
    pub destination_fqdn: Vec<String>,
    #[prost(string, repeated, tag = "11")]
    pub destination_label: Vec<String>,
    #[prost(string, repeated, tag = "17")]
    pub destination_service: Vec<String>,
    #[prost(message, repeated, tag = "27")]
    pub destination_workload: Vec<Workload>,
    #[prost(string, repeated, tag = "38")]
    pub destination_cluster_name: Vec<String>,
    #[prost(enumeration = "TrafficDirection", repeated, tag = "30")]
    pub traffic_direction: Vec<i32>,
    #[prost(enumeration = "Verdict", repeated, tag = "5")]
    pub verdict: Vec<i32>,
    #[prost(int32, repeated, tag = "33")]
    pub drop_reason_desc: Vec<i32>,
    /// `flow.NetworkInterface` (kept as bytes: refused whenever given).
    #[prost(bytes = "vec", repeated, tag = "35")]
    pub interface: Vec<Vec<u8>>,
    #[prost(message, repeated, tag = "6")]
    pub event_type: Vec<EventTypeFilter>,
    #[prost(string, repeated, tag = "9")]
    pub http_status_code: Vec<String>,
    #[prost(string, repeated, tag = "12")]
    pub protocol: Vec<String>,
    #[prost(string, repeated, tag = "13")]
    pub source_port: Vec<String>,
    #[prost(string, repeated, tag = "14")]
    pub destination_port: Vec<String>,
    #[prost(bool, repeated, tag = "15")]
    pub reply: Vec<bool>,
    #[prost(string, repeated, tag = "18")]
    pub dns_query: Vec<String>,
    #[prost(uint32, repeated, tag = "19")]
    pub source_identity: Vec<u32>,
    #[prost(uint32, repeated, tag = "20")]
    pub destination_identity: Vec<u32>,
    #[prost(string, repeated, tag = "21")]
    pub http_method: Vec<String>,
    #[prost(string, repeated, tag = "22")]
    pub http_path: Vec<String>,
    #[prost(string, repeated, tag = "31")]
    pub http_url: Vec<String>,
    #[prost(message, repeated, tag = "32")]
    pub http_header: Vec<HttpHeader>,
    /// `flow.TCPFlags` (kept as bytes: refused whenever given).
    #[prost(bytes = "vec", repeated, tag = "23")]
    pub tcp_flags: Vec<Vec<u8>>,
    #[prost(string, repeated, tag = "24")]
    pub node_name: Vec<String>,
    #[prost(string, repeated, tag = "36")]
    pub node_labels: Vec<String>,
    #[prost(enumeration = "IpVersion", repeated, tag = "25")]
    pub ip_version: Vec<i32>,
    #[prost(string, repeated, tag = "28")]
    pub trace_id: Vec<String>,
    #[prost(message, optional, tag = "999")]
    pub experimental: Option<FlowFilterExperimental>,
}

/// `flow.FlowFilter.Experimental`.
#[derive(Clone, PartialEq, Message)]
pub struct FlowFilterExperimental {
    #[prost(string, repeated, tag = "1")]
    pub cel_expression: Vec<String>,
}

/// Field numbers a message type defines (what [`Checked`] does not count as unknown).
pub trait KnownFields {
    const FIELDS: &'static [u32];
}

impl KnownFields for FlowFilter {
    const FIELDS: &'static [u32] = &[
        1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30,
        31, 32, 33, 34, 35, 36, 37, 38, 999,
    ];
}

impl KnownFields for GetFlowsRequest {
    const FIELDS: &'static [u32] = &[1, 3, 5, 6, 7, 8, 9, 10, 999, 150000];
}

/// A message with the numbers of the fields it carried that its type does not define (a newer
/// client's): decoding keeps going, and the caller decides (the server refuses them).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Checked<M> {
    pub message: M,
    pub unknown_fields: Vec<u32>,
}

impl<M: Message + KnownFields + Default> Message for Checked<M> {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        self.message.encode_raw(buf)
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        if M::FIELDS.contains(&tag) {
            self.message.merge_field(tag, wire_type, buf, ctx)
        } else {
            if !self.unknown_fields.contains(&tag) {
                self.unknown_fields.push(tag);
            }
            prost::encoding::skip_field(wire_type, tag, buf, ctx)
        }
    }

    fn encoded_len(&self) -> usize {
        self.message.encoded_len()
    }

    fn clear(&mut self) {
        self.message.clear();
        self.unknown_fields.clear();
    }
}

/// `observer.GetFlowsRequest`.
#[derive(Clone, PartialEq, Message)]
pub struct GetFlowsRequest {
    #[prost(uint64, tag = "1")]
    pub number: u64,
    #[prost(bool, tag = "9")]
    pub first: bool,
    #[prost(bool, tag = "3")]
    pub follow: bool,
    #[prost(message, repeated, tag = "5")]
    pub blacklist: Vec<Checked<FlowFilter>>,
    #[prost(message, repeated, tag = "6")]
    pub whitelist: Vec<Checked<FlowFilter>>,
    #[prost(message, optional, tag = "7")]
    pub since: Option<prost_types::Timestamp>,
    #[prost(message, optional, tag = "8")]
    pub until: Option<prost_types::Timestamp>,
    #[prost(message, optional, tag = "10")]
    pub field_mask: Option<prost_types::FieldMask>,
    #[prost(message, optional, tag = "999")]
    pub experimental: Option<GetFlowsRequestExperimental>,
    #[prost(message, optional, tag = "150000")]
    pub extensions: Option<prost_types::Any>,
}

/// `observer.GetFlowsRequest.Experimental`.
#[derive(Clone, PartialEq, Message)]
pub struct GetFlowsRequestExperimental {
    #[prost(message, optional, tag = "1")]
    pub field_mask: Option<prost_types::FieldMask>,
}

/// `observer.GetFlowsResponse`.
#[derive(Clone, PartialEq, Message)]
pub struct GetFlowsResponse {
    #[prost(oneof = "get_flows_response::ResponseTypes", tags = "1, 3")]
    pub response_types: Option<get_flows_response::ResponseTypes>,
    #[prost(string, tag = "1000")]
    pub node_name: String,
    #[prost(message, optional, tag = "1001")]
    pub time: Option<prost_types::Timestamp>,
}

pub mod get_flows_response {
    // Built once per flow sent and moved straight into the encoder: a box would only add an
    // allocation.
    #[allow(clippy::large_enum_variant)]
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum ResponseTypes {
        #[prost(message, tag = "1")]
        Flow(super::Flow),
        #[prost(message, tag = "3")]
        LostEvents(super::LostEvent),
    }
}

/// `observer.ServerStatusResponse`.
#[derive(Clone, PartialEq, Message)]
pub struct ServerStatusResponse {
    #[prost(uint64, tag = "1")]
    pub num_flows: u64,
    #[prost(uint64, tag = "2")]
    pub max_flows: u64,
    #[prost(uint64, tag = "3")]
    pub seen_flows: u64,
    #[prost(uint64, tag = "4")]
    pub uptime_ns: u64,
    #[prost(string, tag = "8")]
    pub version: String,
    #[prost(double, tag = "9")]
    pub flows_rate: f64,
}

/// `observer.GetNamespacesResponse`.
#[derive(Clone, PartialEq, Message)]
pub struct GetNamespacesResponse {
    #[prost(message, repeated, tag = "1")]
    pub namespaces: Vec<Namespace>,
}

/// `observer.Namespace`.
#[derive(Clone, PartialEq, Message)]
pub struct Namespace {
    #[prost(string, tag = "1")]
    pub cluster: String,
    #[prost(string, tag = "2")]
    pub namespace: String,
}

/// `observer.ServerStatusRequest` and `observer.GetNamespacesRequest`: no fields.
#[derive(Clone, PartialEq, Message)]
pub struct Empty {}

//! The Kafka stack: a framed request/response loop built on `kafka-protocol`.
//!
//! Each request frame is bounded, its header decoded, and, for the APIs that name topics
//! (Produce, Fetch, ListOffsets, Metadata), its body decoded so every topic is judged on its
//! own: denied topics are removed from the request before it goes upstream, and their entries
//! come back in the response with TOPIC_AUTHORIZATION_FAILED (29), so the allowed topics of the
//! same request go through. A request with nothing left is answered here. Responses are matched
//! to requests by order (Kafka answers in order on a connection) and checked by correlation id.
//! ApiVersions responses are capped at Produce and Fetch v12, the last versions that carry topic
//! names, so a topic ID never hides a topic from policy.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsResponse, FetchRequest, FetchResponse, ListOffsetsRequest, ListOffsetsResponse, ProduceRequest,
    ProduceResponse, RequestHeader, RequestKind, ResponseHeader, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::flows::{Endpoint, FlowRecord, KafkaFlow, L7Flow, ProxyInfo};
use crate::metrics::KafkaLabels;
use crate::proxy::{Direction, Shared};
use crate::registry::WorkloadInfo;
use crate::tables::{Decision, KafkaRequest, Party};

pub const TOPIC_AUTHORIZATION_FAILED: i16 = 29;
pub const CLUSTER_AUTHORIZATION_FAILED: i16 = 31;
/// The last Produce and Fetch versions whose requests name topics (v13 uses topic IDs).
pub const MAX_TOPIC_NAMED_VERSION: i16 = 12;

pub struct KafkaConnection {
    pub shared: Arc<Shared>,
    pub direction: Direction,
    pub peer: SocketAddr,
    pub target: SocketAddr,
    pub via: &'static str,
    pub src: Option<Arc<WorkloadInfo>>,
    pub dst: Option<Arc<WorkloadInfo>>,
    pub parties: Vec<Party>,
    pub upstream_local: Option<std::net::SocketAddr>,
}

/// What the response path must do for one request, in order.
enum Pending {
    /// Forwarded: read the upstream's response, then add the denied topics' errors.
    Upstream { api_key: ApiKey, version: i16, correlation_id: i32, denied: Vec<String> },
    /// Answered here.
    Local(Bytes),
}

#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    #[error("frame of {0} bytes is over the {1}-byte bound")]
    FrameTooLarge(usize, usize),
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("{api} denied, and l7mesh has no error response for it: connection closed")]
    DeniedWithoutTopics { api: String },
    #[error("response correlation id {got} does not match request {want}")]
    Correlation { got: i32, want: i32 },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

async fn read_frame(stream: &mut (impl AsyncReadExt + Unpin), max: usize) -> Result<Option<Bytes>, KafkaError> {
    let mut len = [0u8; 4];
    match stream.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let n = i32::from_be_bytes(len);
    if n < 0 {
        return Err(KafkaError::Malformed(format!("negative frame length {n}")));
    }
    let n = n as usize;
    if n > max {
        return Err(KafkaError::FrameTooLarge(n, max));
    }
    let mut buf = BytesMut::zeroed(n);
    stream.read_exact(&mut buf).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => KafkaError::Malformed("truncated frame".into()),
        _ => e.into(),
    })?;
    Ok(Some(buf.freeze()))
}

fn frame(parts: &[&[u8]]) -> Bytes {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut out = BytesMut::with_capacity(4 + len);
    out.put_i32(len as i32);
    for p in parts {
        out.put_slice(p);
    }
    out.freeze()
}

fn malformed(e: impl std::fmt::Display) -> KafkaError {
    KafkaError::Malformed(e.to_string())
}

fn encode<T: Encodable>(value: &T, version: i16) -> Result<BytesMut, KafkaError> {
    let mut buf = BytesMut::new();
    value.encode(&mut buf, version).map_err(malformed)?;
    Ok(buf)
}

fn name(t: &TopicName) -> String {
    t.0.to_string()
}

fn topic(s: &str) -> TopicName {
    TopicName(StrBytes::from_string(s.to_string()))
}

/// Serves one Kafka connection until either side closes.
pub async fn serve(downstream: TcpStream, upstream: TcpStream, conn: Arc<KafkaConnection>) -> Result<(), KafkaError> {
    let max = conn.shared.limits.max_kafka_frame;
    let conn_for_requests = conn.clone();
    let (mut down_read, mut down_write) = downstream.into_split();
    let (mut up_read, mut up_write) = upstream.into_split();
    let (pending_tx, mut pending_rx) = mpsc::unbounded_channel::<Pending>();

    // Responses, in request order.
    let responses = async move {
        while let Some(p) = pending_rx.recv().await {
            let out = match p {
                Pending::Local(bytes) => bytes,
                Pending::Upstream { api_key, version, correlation_id, denied } => {
                    let Some(resp) = read_frame(&mut up_read, usize::MAX / 2).await? else { return Ok(()) };
                    rewrite_response(resp, api_key, version, correlation_id, &denied)?
                }
            };
            down_write.write_all(&out).await?;
        }
        Ok::<(), KafkaError>(())
    };
    let requests = async move {
        while let Some(request) = read_frame(&mut down_read, max).await? {
            if let Some((pending, forward)) = handle_request(&conn_for_requests, request)? {
                if let Some(bytes) = forward {
                    up_write.write_all(&bytes).await?;
                }
                if let Some(p) = pending {
                    if pending_tx.send(p).is_err() {
                        break;
                    }
                }
            }
        }
        // The client is done: let the upstream finish its responses.
        let _ = up_write.shutdown().await;
        Ok::<(), KafkaError>(())
    };
    tokio::pin!(responses, requests);
    // Either side's error ends the connection (both halves drop); a clean end of the requests
    // waits for the outstanding responses.
    let result = tokio::select! {
        r = &mut requests => match r {
            Ok(()) => responses.await,
            Err(e) => Err(e),
        },
        r = &mut responses => r,
    };
    if let Err(e) = &result {
        warn!(peer = %conn.peer, error = %e, "kafka connection closed");
        conn.flow("DENIED", None, Some(e.to_string()));
    }
    result
}

type Handled = Option<(Option<Pending>, Option<Bytes>)>;

/// Judges one request frame: what goes upstream (possibly rewritten), what the response path
/// must do.
fn handle_request(conn: &KafkaConnection, mut frame_body: Bytes) -> Result<Handled, KafkaError> {
    let started = Instant::now();
    let raw = frame_body.clone();
    if frame_body.remaining() < 4 {
        return Err(KafkaError::Malformed("frame shorter than a request header".into()));
    }
    let api_key_raw = i16::from_be_bytes([frame_body[0], frame_body[1]]);
    let version = i16::from_be_bytes([frame_body[2], frame_body[3]]);
    let api_key =
        ApiKey::try_from(api_key_raw).map_err(|_| KafkaError::Malformed(format!("unknown api key {api_key_raw}")))?;
    let header_version = api_key.request_header_version(version);
    let header = RequestHeader::decode(&mut frame_body, header_version).map_err(malformed)?;
    let header_len = raw.len() - frame_body.remaining();
    let client_id = header.client_id.as_ref().map(|c| c.to_string()).unwrap_or_default();
    let correlation_id = header.correlation_id;
    let tables = conn.shared.registry.tables();
    let judge = |topic: Option<&str>| {
        tables.decide_kafka(
            &conn.parties,
            conn.target.port(),
            &KafkaRequest { api_key: api_key_raw, version, client_id: &client_id, topic },
        )
    };
    let api = format!("{api_key:?}");
    let upstream = |denied: Vec<String>| Pending::Upstream { api_key, version, correlation_id, denied };
    let response_header = ResponseHeader::default().with_correlation_id(correlation_id);
    let response_header_version = api_key.response_header_version(version);

    // Topic-bearing requests: judge every topic, drop the denied ones.
    macro_rules! per_topic {
        ($req_ty:ty, $topics:ident, $get:expr, $resp:expr) => {{
            let mut req = <$req_ty>::decode(&mut frame_body, version).map_err(malformed)?;
            let judged: Vec<_> = std::mem::take(&mut req.$topics)
                .into_iter()
                .map(|t| {
                    let decision = judge(Some(&$get(&t)));
                    (t, decision)
                })
                .collect();
            let mut allowed = Vec::new();
            let mut denied = Vec::new();
            for (t, decision) in judged {
                let name = $get(&t);
                conn.request_flow(
                    &api,
                    version,
                    correlation_id,
                    &client_id,
                    Some(&name),
                    &decision,
                    TOPIC_AUTHORIZATION_FAILED,
                    started,
                );
                if decision.allows() {
                    allowed.push(t);
                } else {
                    denied.push(t);
                }
            }
            let denied_names: Vec<String> = denied.iter().map(|t| $get(t)).collect();
            req.$topics = allowed;
            (req, denied_names, denied)
        }};
    }

    let result = match api_key {
        ApiKey::Produce => {
            let (req, denied_names, denied) = per_topic!(
                ProduceRequest,
                topic_data,
                |t: &kafka_protocol::messages::produce_request::TopicProduceData| name(&t.name),
                ()
            );
            let acks_zero = req.acks == 0;
            if req.topic_data.is_empty() {
                if acks_zero || denied.is_empty() {
                    return Ok(Some((None, None)));
                }
                let mut resp = ProduceResponse::default();
                add_produce_denied(&mut resp, &denied_names, &denied);
                let local = local_response(&response_header, response_header_version, &resp, version)?;
                Some((Some(Pending::Local(local)), None))
            } else {
                let forward = if denied_names.is_empty() {
                    frame(&[&raw])
                } else {
                    frame(&[&raw[..header_len], &encode(&req, version)?])
                };
                // acks=0: the broker sends no response, so nothing waits for one.
                let pending = (!acks_zero).then(|| upstream(denied_names));
                Some((pending, Some(forward)))
            }
        }
        ApiKey::Fetch => {
            let (req, denied_names, _) = per_topic!(
                FetchRequest,
                topics,
                |t: &kafka_protocol::messages::fetch_request::FetchTopic| name(&t.topic),
                ()
            );
            let forward = if denied_names.is_empty() {
                frame(&[&raw])
            } else {
                frame(&[&raw[..header_len], &encode(&req, version)?])
            };
            Some((Some(upstream(denied_names)), Some(forward)))
        }
        ApiKey::ListOffsets => {
            let (req, denied_names, _) = per_topic!(
                ListOffsetsRequest,
                topics,
                |t: &kafka_protocol::messages::list_offsets_request::ListOffsetsTopic| name(&t.name),
                ()
            );
            let forward = if denied_names.is_empty() {
                frame(&[&raw])
            } else {
                frame(&[&raw[..header_len], &encode(&req, version)?])
            };
            Some((Some(upstream(denied_names)), Some(forward)))
        }
        // Metadata is judged by API key, not per topic: topic reads and writes are enforced per
        // topic (Fetch, ListOffsets, Produce), and clients surface those errors, while a
        // Metadata topic error leaves an assigned consumer waiting without one.
        _ => {
            // A malformed body never reaches the broker: every request is decoded once.
            RequestKind::decode(api_key, &mut frame_body.clone(), version).map_err(malformed)?;
            // No topic to answer per topic: the request is judged as a whole.
            let decision = judge(None);
            let ok = decision.allows();
            conn.request_flow(
                &api,
                version,
                correlation_id,
                &client_id,
                None,
                &decision,
                CLUSTER_AUTHORIZATION_FAILED,
                started,
            );
            if ok {
                Some((Some(upstream(Vec::new())), Some(frame(&[&raw]))))
            } else {
                match no_topic_denial(api_key, version, &mut frame_body)? {
                    Some(body) => {
                        let local = frame(&[&encode(&response_header, response_header_version)?, &body]);
                        Some((Some(Pending::Local(local)), None))
                    }
                    None => return Err(KafkaError::DeniedWithoutTopics { api }),
                }
            }
        }
    };
    Ok(result)
}

/// The request's own response type with CLUSTER_AUTHORIZATION_FAILED, for the APIs without
/// topics that clients use (group membership, coordinators, producer ids). Others: `None`, and
/// the connection is closed instead.
fn no_topic_denial(api_key: ApiKey, version: i16, body: &mut Bytes) -> Result<Option<BytesMut>, KafkaError> {
    use kafka_protocol::messages::find_coordinator_response::Coordinator;
    use kafka_protocol::messages::*;
    macro_rules! with_error {
        ($t:ty) => {{
            let mut r = <$t>::default();
            r.error_code = CLUSTER_AUTHORIZATION_FAILED;
            Some(encode(&r, version)?)
        }};
    }
    Ok(match api_key {
        ApiKey::JoinGroup => with_error!(JoinGroupResponse),
        ApiKey::SyncGroup => with_error!(SyncGroupResponse),
        ApiKey::Heartbeat => with_error!(HeartbeatResponse),
        ApiKey::LeaveGroup => with_error!(LeaveGroupResponse),
        ApiKey::InitProducerId => with_error!(InitProducerIdResponse),
        ApiKey::ListGroups => with_error!(ListGroupsResponse),
        ApiKey::FindCoordinator => {
            let req = FindCoordinatorRequest::decode(body, version).map_err(malformed)?;
            let mut r = FindCoordinatorResponse::default();
            if version >= 4 {
                for key in req.coordinator_keys {
                    let mut c = Coordinator::default();
                    c.key = key;
                    c.node_id = BrokerId(-1);
                    c.port = -1;
                    c.error_code = CLUSTER_AUTHORIZATION_FAILED;
                    r.coordinators.push(c);
                }
            } else {
                r.error_code = CLUSTER_AUTHORIZATION_FAILED;
                r.node_id = BrokerId(-1);
                r.port = -1;
            }
            Some(encode(&r, version)?)
        }
        _ => None,
    })
}

fn local_response<T: Encodable>(
    header: &ResponseHeader,
    header_version: i16,
    body: &T,
    version: i16,
) -> Result<Bytes, KafkaError> {
    Ok(frame(&[&encode(header, header_version)?, &encode(body, version)?]))
}

fn add_produce_denied(
    resp: &mut ProduceResponse,
    names: &[String],
    denied: &[kafka_protocol::messages::produce_request::TopicProduceData],
) {
    use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
    for (n, t) in names.iter().zip(denied) {
        let mut tr = TopicProduceResponse::default();
        tr.name = topic(n);
        for p in &t.partition_data {
            let mut pr = PartitionProduceResponse::default();
            pr.index = p.index;
            pr.error_code = TOPIC_AUTHORIZATION_FAILED;
            pr.base_offset = -1;
            pr.log_append_time_ms = -1;
            pr.log_start_offset = -1;
            tr.partition_responses.push(pr);
        }
        resp.responses.push(tr);
    }
}

/// Post-processes an upstream response: the denied topics' errors added, ApiVersions capped.
fn rewrite_response(
    mut resp: Bytes,
    api_key: ApiKey,
    version: i16,
    want: i32,
    denied: &[String],
) -> Result<Bytes, KafkaError> {
    let raw = resp.clone();
    let header_version = api_key.response_header_version(version);
    let header = ResponseHeader::decode(&mut resp, header_version).map_err(malformed)?;
    if header.correlation_id != want {
        return Err(KafkaError::Correlation { got: header.correlation_id, want });
    }
    let header_len = raw.len() - resp.remaining();
    let body = match api_key {
        ApiKey::ApiVersions => {
            // ApiVersions answers with a v0 header whatever the request version.
            let mut r = ApiVersionsResponse::decode(&mut resp, version).map_err(malformed)?;
            for k in &mut r.api_keys {
                if k.api_key == ApiKey::Produce as i16 || k.api_key == ApiKey::Fetch as i16 {
                    k.max_version = k.max_version.min(MAX_TOPIC_NAMED_VERSION);
                }
            }
            encode(&r, version)?
        }
        _ if denied.is_empty() => return Ok(frame(&[&raw])),
        ApiKey::Produce => {
            let mut r = ProduceResponse::decode(&mut resp, version).map_err(malformed)?;
            use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
            for n in denied {
                let mut tr = TopicProduceResponse::default();
                tr.name = topic(n);
                let mut pr = PartitionProduceResponse::default();
                pr.error_code = TOPIC_AUTHORIZATION_FAILED;
                pr.base_offset = -1;
                tr.partition_responses.push(pr);
                r.responses.push(tr);
            }
            encode(&r, version)?
        }
        ApiKey::Fetch => {
            let mut r = FetchResponse::decode(&mut resp, version).map_err(malformed)?;
            use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
            for n in denied {
                let mut t = FetchableTopicResponse::default();
                t.topic = topic(n);
                let mut p = PartitionData::default();
                p.error_code = TOPIC_AUTHORIZATION_FAILED;
                p.high_watermark = -1;
                t.partitions.push(p);
                r.responses.push(t);
            }
            encode(&r, version)?
        }
        ApiKey::ListOffsets => {
            let mut r = ListOffsetsResponse::decode(&mut resp, version).map_err(malformed)?;
            use kafka_protocol::messages::list_offsets_response::{
                ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
            };
            for n in denied {
                let mut t = ListOffsetsTopicResponse::default();
                t.name = topic(n);
                let mut p = ListOffsetsPartitionResponse::default();
                p.error_code = TOPIC_AUTHORIZATION_FAILED;
                p.offset = -1;
                p.timestamp = -1;
                t.partitions.push(p);
                r.topics.push(t);
            }
            encode(&r, version)?
        }
        _ => return Ok(frame(&[&raw])),
    };
    debug!(?api_key, denied = denied.len(), "response rewritten");
    Ok(frame(&[&raw[..header_len], &body]))
}

impl KafkaConnection {
    #[allow(clippy::too_many_arguments)]
    fn request_flow(
        &self,
        api: &str,
        version: i16,
        correlation_id: i32,
        client_id: &str,
        topic: Option<&str>,
        decision: &Decision,
        denied_code: i16,
        started: Instant,
    ) {
        let verdict = decision.verdict();
        let error_code = if decision.allows() { 0 } else { denied_code };
        let labels = KafkaLabels { api_key: api.to_string(), topic: topic.unwrap_or("").to_string(), verdict };
        self.shared.metrics.kafka_requests.get_or_create(&labels).inc();
        self.shared.flows.push(FlowRecord {
            policy_name: decision.policy().cloned(),
            latency_ns: Some(started.elapsed().as_nanos() as u64),
            l7: Some(L7Flow::Kafka {
                kafka: KafkaFlow {
                    api_key: api.to_string(),
                    correlation_id,
                    api_version: version,
                    topic: topic.map(str::to_string),
                    client_id: client_id.to_string(),
                    error_code,
                },
            }),
            ..self.record(verdict)
        });
    }

    fn flow(&self, verdict: &'static str, l7: Option<L7Flow>, reason: Option<String>) {
        self.shared.flows.push(FlowRecord { reason, l7, ..self.record(verdict) });
    }

    /// This connection's flow record, before its L7 part.
    fn record(&self, verdict: &'static str) -> FlowRecord {
        FlowRecord::proxied(
            verdict,
            self.direction.as_str(),
            Endpoint::new(self.peer, None).named(self.src.clone()),
            Endpoint::new(self.target, None).named(self.dst.clone()),
            Some(ProxyInfo { original_dst_via: self.via, upstream: self.upstream_local }),
        )
    }
}

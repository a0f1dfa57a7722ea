//! The Kafka stack: a framed request/response loop built on `kafka-protocol`.
//!
//! Each request frame is bounded, its header and body decoded, and every topic it names judged
//! on its own (`kafka_topics` classifies every request type): denied topics are removed from the
//! request before it goes upstream, and their entries come back in the response with
//! TOPIC_AUTHORIZATION_FAILED (29), so the allowed topics of the same request go through. A
//! request with nothing left, or denied as a whole, is answered here in its own response type
//! with the API's authorization error; only an undecodable frame closes the connection.
//! Responses are matched to requests by order (Kafka answers in order on a connection) and
//! checked by correlation id. ApiVersions responses are capped at the versions the codec decodes
//! and, for the APIs that later name topics by ID only, at their last topic-named versions.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, ApiVersionsResponse, RequestHeader, RequestKind, ResponseHeader, ResponseKind};
use kafka_protocol::protocol::{Decodable, Encodable};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};

use crate::flows::{Endpoint, FlowRecord, KafkaFlow, L7Flow, ProxyInfo};
use crate::kafka_topics::{
    self, add_denied, all_topics_denied, reencode, retain_topics, whole_denial, whole_denial_code, Judged,
    TOPIC_AUTHORIZATION_FAILED,
};
use crate::metrics::{KafkaLabels, Limit, OTHER_TOPIC};
use crate::proxy::{Direction, Shared};
use crate::registry::WorkloadInfo;
use crate::tables::{Decision, KafkaRequest, Party, Tables};

/// The Kafka stack's bounds, per connection (flags; README, "Bounds").
#[derive(Clone, Copy, Debug)]
pub struct KafkaLimits {
    /// Largest request frame from the client; larger closes the connection.
    pub max_request_frame: usize,
    /// Largest response frame from the broker; larger closes the connection.
    pub max_response_frame: usize,
    /// Requests awaiting their answer; at the bound no further request is read until one is
    /// answered (as a broker, which serves one request per connection at a time).
    pub max_in_flight: usize,
    /// Bytes held for answers not yet sent (local answers, the requests kept to merge denied
    /// topics into the broker's answer); at the bound no further request is read until they drain.
    pub max_pending_bytes: usize,
}

/// Frames are read this much at a time: memory follows the bytes that arrive, never the length
/// a peer claims.
const READ_CHUNK: usize = 64 << 10;

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

/// The topics removed from a forwarded request, to answer in the broker's response.
struct Denied {
    /// The request as the client sent it.
    request: RequestKind,
    /// The denied topics, as judged (`None`: an item that names no topic).
    topics: HashSet<Option<String>>,
}

/// What the response path must do for one request, in order.
enum Pending {
    /// Forwarded: read the upstream's response, then add the denied topics' errors.
    Upstream { api_key: ApiKey, version: i16, correlation_id: i32, denied: Option<Box<Denied>> },
    /// Answered here.
    Local(Bytes),
}

#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    #[error("{} frame of {len} bytes is over the {max}-byte bound ({})", side(*limit), flag(*limit))]
    FrameTooLarge { limit: Limit, len: usize, max: usize },
    #[error("the broker sent {0} bytes that answer no request")]
    Unsolicited(usize),
    #[error("refused: {0}")]
    Refused(String),
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("could not encode a response: {0}")]
    Encode(String),
    #[error("response correlation id {got} does not match request {want}")]
    Correlation { got: i32, want: i32 },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn side(limit: Limit) -> &'static str {
    if limit == Limit::KafkaResponseFrame {
        "response"
    } else {
        "request"
    }
}

fn flag(limit: Limit) -> &'static str {
    if limit == Limit::KafkaResponseFrame {
        "--max-kafka-response-frame"
    } else {
        "--max-kafka-frame"
    }
}

/// One length-prefixed frame, at most `max` bytes (`limit` names the bound in the error). The
/// buffer grows with the bytes received, so a peer that claims a large frame and sends it
/// slowly (or never) holds only what it sent.
async fn read_frame(
    stream: &mut (impl AsyncReadExt + Unpin),
    max: usize,
    limit: Limit,
) -> Result<Option<Bytes>, KafkaError> {
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
        return Err(KafkaError::FrameTooLarge { limit, len: n, max });
    }
    let mut buf = BytesMut::with_capacity(n.min(READ_CHUNK));
    while buf.len() < n {
        let want = (n - buf.len()).min(READ_CHUNK);
        buf.reserve(want);
        // `take`: never read past this frame into the next one.
        if (&mut *stream).take(want as u64).read_buf(&mut buf).await? == 0 {
            return Err(KafkaError::Malformed("truncated frame".into()));
        }
    }
    Ok(Some(buf.freeze()))
}

/// Takes `n` permits of `bound`, waiting (and counting one trip of `limit`) when they are not
/// free now. None only if the semaphore closed, which it never does.
async fn hold(bound: &Arc<Semaphore>, n: u32, limit: Limit, conn: &KafkaConnection) -> Option<OwnedSemaphorePermit> {
    match bound.clone().try_acquire_many_owned(n) {
        Ok(p) => Some(p),
        Err(_) => {
            conn.shared.metrics.limit_tripped(limit);
            debug!(peer = %conn.peer, limit = limit.as_str(), "bound reached; reading no further request until answers drain");
            bound.clone().acquire_many_owned(n).await.ok()
        }
    }
}

/// A queued answer and the bounds' share it holds until it is written.
struct Queued {
    pending: Pending,
    _slot: OwnedSemaphorePermit,
    _bytes: OwnedSemaphorePermit,
}

impl Pending {
    /// What it keeps in memory until it is answered (the request copy kept to merge denied
    /// topics is counted as its frame's size).
    fn held_bytes(&self, frame_len: usize) -> usize {
        match self {
            Pending::Local(bytes) => bytes.len(),
            Pending::Upstream { denied: Some(_), .. } => frame_len,
            Pending::Upstream { denied: None, .. } => 0,
        }
    }
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

/// Serves one Kafka connection until either side closes.
pub async fn serve(downstream: TcpStream, upstream: TcpStream, conn: Arc<KafkaConnection>) -> Result<(), KafkaError> {
    let limits = conn.shared.limits.kafka;
    let conn_for_requests = conn.clone();
    let (mut down_read, mut down_write) = downstream.into_split();
    let (mut up_read, mut up_write) = upstream.into_split();
    // Unbounded as a channel, bounded by the permits each entry holds.
    let (pending_tx, mut pending_rx) = mpsc::unbounded_channel::<Queued>();
    let in_flight = Arc::new(Semaphore::new(limits.max_in_flight.clamp(1, Semaphore::MAX_PERMITS)));
    let byte_cap = limits.max_pending_bytes.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
    let pending_bytes = Arc::new(Semaphore::new(byte_cap));

    // Responses, in request order.
    let responses = async move {
        let mut probe = [0u8; 1];
        loop {
            let queued = tokio::select! {
                biased;
                next = pending_rx.recv() => match next {
                    Some(q) => q,
                    None => return Ok(()),
                },
                // Nothing is owed: a broker speaks only to answer. Bytes now answer no request
                // (an answer is queued before its request is forwarded), and the end of the
                // stream ends the connection.
                peeked = up_read.peek(&mut probe) => return match peeked? {
                    0 => Ok(()),
                    n => Err(KafkaError::Unsolicited(n)),
                },
            };
            let out = match queued.pending {
                Pending::Local(bytes) => bytes,
                Pending::Upstream { api_key, version, correlation_id, denied } => {
                    let Some(resp) =
                        read_frame(&mut up_read, limits.max_response_frame, Limit::KafkaResponseFrame).await?
                    else {
                        return Ok(());
                    };
                    rewrite_response(resp, api_key, version, correlation_id, denied.as_deref())?
                }
            };
            down_write.write_all(&out).await?;
        }
    };
    let requests = async move {
        let conn = &conn_for_requests;
        loop {
            let Some(slot) = hold(&in_flight, 1, Limit::KafkaInFlight, conn).await else { break };
            let Some(request) = read_frame(&mut down_read, limits.max_request_frame, Limit::KafkaRequestFrame).await?
            else {
                break;
            };
            let frame_len = request.len();
            let Some((pending, forward)) = handle_request(conn, request)? else { continue };
            if let Some(pending) = pending {
                let held = pending.held_bytes(frame_len).min(byte_cap) as u32;
                let Some(bytes) = hold(&pending_bytes, held, Limit::KafkaPendingBytes, conn).await else { break };
                if pending_tx.send(Queued { pending, _slot: slot, _bytes: bytes }).is_err() {
                    break;
                }
            }
            if let Some(bytes) = forward {
                up_write.write_all(&bytes).await?;
            }
        }
        // The client is done: let the upstream finish its responses (and the responses end
        // once the queue is empty: the sender goes here).
        drop(pending_tx);
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
        // The flow first: whoever sees the count or the log finds the flow too.
        conn.flow("DENIED", None, Some(e.to_string()));
        if let KafkaError::FrameTooLarge { limit, .. } = e {
            conn.shared.metrics.limit_tripped(*limit);
            info!(peer = %conn.peer, limit = limit.as_str(), "kafka bound reached; closing this connection");
        }
        warn!(peer = %conn.peer, error = %e, "kafka connection closed");
    }
    result
}

type Handled = Option<(Option<Pending>, Option<Bytes>)>;

/// Judges one request frame: what goes upstream (possibly rewritten), what the response path
/// must do. Only a frame that does not decode is an error (and closes the connection); every
/// denial is answered with the request's own response type.
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
    let versions = api_key.valid_versions();
    if version < versions.min || version > versions.max {
        return Err(KafkaError::Malformed(format!("{api_key:?} v{version} is not a version l7mesh decodes")));
    }
    let header_version = api_key.request_header_version(version);
    let header = RequestHeader::decode(&mut frame_body, header_version).map_err(malformed)?;
    let header_len = raw.len() - frame_body.remaining();
    let client_id = header.client_id.as_ref().map(|c| c.to_string()).unwrap_or_default();
    let correlation_id = header.correlation_id;
    // A malformed body never reaches the broker: every request is decoded once.
    let original = RequestKind::decode(api_key, &mut frame_body, version).map_err(malformed)?;
    // Bytes after the body are not refused: librdkafka's Metadata v12 carries 3 the codec does
    // not read. A request forwarded as is keeps them; a rewritten one is re-encoded from what was
    // judged, without them.
    let tables = conn.shared.registry.tables();
    let api = format!("{api_key:?}");
    let judge_key = |key: i16, topic: Option<&str>| {
        tables.decide_kafka(
            &conn.parties,
            conn.target.port(),
            &KafkaRequest { api_key: key, version, client_id: &client_id, topic },
        )
    };
    let flow = |topic: Option<&str>, decision: &Decision, code: i16| {
        conn.request_flow(&tables, &api, version, correlation_id, &client_id, topic, decision, code, started)
    };
    let response_header = ResponseHeader::default().with_correlation_id(correlation_id);
    let response_header_version = api_key.response_header_version(version);
    let local = |body: Result<BytesMut, String>| -> Result<Handled, KafkaError> {
        let body = body.map_err(KafkaError::Encode)?;
        let bytes = frame(&[&encode(&response_header, response_header_version)?, &body]);
        Ok(Some((Some(Pending::Local(bytes)), None)))
    };

    // Every topic judged once per request (a topic named twice gets one decision).
    let mut decisions: HashMap<Option<String>, bool> = HashMap::new();
    let mut req = original.clone();
    let judged = retain_topics(&mut req, version, &mut |topic| {
        let key = topic.map(str::to_string);
        if let Some(&ok) = decisions.get(&key) {
            return ok;
        }
        let decision = judge_key(api_key_raw, topic);
        flow(topic, &decision, TOPIC_AUTHORIZATION_FAILED);
        let ok = decision.allows();
        decisions.insert(key, ok);
        ok
    });
    let upstream = |denied: Option<Box<Denied>>| Pending::Upstream { api_key, version, correlation_id, denied };
    // Produce with acks=0 has no response: nothing may wait for one.
    let acks_zero = matches!(&original, RequestKind::Produce(p) if p.acks == 0);
    let forward_only = |bytes: Bytes, pending: Pending| Ok(Some(((!acks_zero).then_some(pending), Some(bytes))));

    match judged {
        Judged::NoTopic => {
            // Names no topic: judged as a whole by its API key.
            let decision = judge_key(api_key_raw, None);
            let code = whole_denial_code(&original, judged);
            flow(None, &decision, code);
            if decision.allows() {
                // The implied creation's denial is a CreateTopics flow (what was judged, so a
                // simulation replays the same decision).
                let create_flow = |topic: Option<&str>, decision: &Decision, code: i16| {
                    let api = format!("{:?}", ApiKey::CreateTopics);
                    conn.request_flow(
                        &tables,
                        &api,
                        version,
                        correlation_id,
                        &client_id,
                        topic,
                        decision,
                        code,
                        started,
                    )
                };
                let forward = metadata_auto_create(&original, version, &judge_key, &create_flow)?
                    .map(|body| frame(&[&raw[..header_len], &body]))
                    .unwrap_or_else(|| frame(&[&raw]));
                forward_only(forward, upstream(None))
            } else if acks_zero {
                Ok(Some((None, None)))
            } else {
                local(whole_denial(api_key, version, &original, code))
            }
        }
        Judged::Whole { allowed: true } | Judged::Items { removed: 0, .. } => {
            forward_only(frame(&[&raw]), upstream(None))
        }
        Judged::Whole { allowed: false } => {
            if acks_zero {
                return Ok(Some((None, None)));
            }
            local(whole_denial(api_key, version, &original, whole_denial_code(&original, judged)))
        }
        Judged::Items { kept: 0, .. } => {
            if acks_zero {
                return Ok(Some((None, None)));
            }
            local(all_topics_denied(api_key, version, &original))
        }
        Judged::Items { .. } => {
            let body = reencode(api_key, version, &req).map_err(KafkaError::Malformed)?;
            let denied: HashSet<Option<String>> =
                decisions.into_iter().filter(|(_, ok)| !ok).map(|(topic, _)| topic).collect();
            let forward = frame(&[&raw[..header_len], &body]);
            forward_only(forward, upstream(Some(Box::new(Denied { request: original, topics: denied }))))
        }
    }
}

/// Metadata may create the topics it names (`allow_auto_topic_creation`): that creation is
/// judged as CreateTopics of each topic, and turned off when any is denied. The rewritten body,
/// if it changed.
fn metadata_auto_create(
    req: &RequestKind,
    version: i16,
    judge: &dyn Fn(i16, Option<&str>) -> Decision,
    flow: &dyn Fn(Option<&str>, &Decision, i16),
) -> Result<Option<BytesMut>, KafkaError> {
    let RequestKind::Metadata(m) = req else { return Ok(None) };
    // Metadata v0-3 has no allow_auto_topic_creation: a broker may create every topic it names.
    if version >= 4 && !m.allow_auto_topic_creation {
        return Ok(None);
    }
    let mut deny = false;
    for name in m.topics.iter().flatten().filter_map(|t| t.name.as_ref()) {
        let decision = judge(ApiKey::CreateTopics as i16, Some(&name.0));
        if !decision.allows() {
            flow(Some(&name.0), &decision, TOPIC_AUTHORIZATION_FAILED);
            deny = true;
        }
    }
    if !deny {
        return Ok(None);
    }
    if version < 4 {
        // It cannot ask the broker not to create them: refused (the proxy advertises
        // Metadata v4 and later only, so a client that negotiates never sends this).
        return Err(KafkaError::Refused(format!(
            "Metadata v{version} cannot turn off topic creation and names a topic whose creation is denied"
        )));
    }
    let mut m = m.clone();
    m.allow_auto_topic_creation = false;
    Ok(Some(encode(&m, version)?))
}

/// Caps ApiVersions at what l7mesh decodes and judges by name: every key at the codec's own
/// maximum (a version it cannot decode would close the connection), keys it does not know
/// dropped, and the APIs whose later versions name topics by ID only (Produce and Fetch v13+,
/// OffsetCommit and OffsetFetch v10) at their last topic-named version.
fn cap_api_versions(r: &mut ApiVersionsResponse) {
    r.api_keys.retain_mut(|k| {
        let Ok(api) = ApiKey::try_from(k.api_key) else { return false };
        let ours = api.valid_versions();
        let mut max = k.max_version.min(ours.max);
        match api {
            ApiKey::Produce | ApiKey::Fetch => max = max.min(MAX_TOPIC_NAMED_VERSION),
            ApiKey::OffsetCommit | ApiKey::OffsetFetch => max = max.min(9),
            // v4 is the first that can ask the broker not to create the topics it names.
            ApiKey::Metadata => k.min_version = k.min_version.max(4),
            _ => {}
        }
        k.min_version = k.min_version.max(ours.min);
        k.max_version = max;
        k.min_version <= k.max_version
    });
}

/// Post-processes an upstream response: the denied topics' errors added, ApiVersions capped.
fn rewrite_response(
    mut resp: Bytes,
    api_key: ApiKey,
    version: i16,
    want: i32,
    denied: Option<&Denied>,
) -> Result<Bytes, KafkaError> {
    let raw = resp.clone();
    let header_version = api_key.response_header_version(version);
    let header = ResponseHeader::decode(&mut resp, header_version).map_err(malformed)?;
    if header.correlation_id != want {
        return Err(KafkaError::Correlation { got: header.correlation_id, want });
    }
    let header_len = raw.len() - resp.remaining();
    let body = match (api_key, denied) {
        (ApiKey::ApiVersions, _) => {
            // ApiVersions answers with a v0 header whatever the request version.
            let mut r = ApiVersionsResponse::decode(&mut resp, version).map_err(malformed)?;
            cap_api_versions(&mut r);
            encode(&r, version)?
        }
        (_, None) => return Ok(frame(&[&raw])),
        (_, Some(denied)) => {
            let mut r = ResponseKind::decode(api_key, &mut resp, version).map_err(malformed)?;
            add_denied(&mut r, &denied.request, &|t| denied.topics.contains(&t.map(str::to_string)));
            kafka_topics::encode(&r, version).map_err(KafkaError::Encode)?
        }
    };
    debug!(?api_key, "response rewritten");
    Ok(frame(&[&raw[..header_len], &body]))
}

/// The metrics' topic label: a topic the policy in force names, else [`OTHER_TOPIC`] (a client
/// choosing thousands of names adds one series, not thousands), or empty for none.
fn topic_label<'a>(tables: &Tables, topic: Option<&'a str>) -> &'a str {
    match topic {
        None => "",
        Some(t) if tables.names_kafka_topic(t) => t,
        Some(_) => OTHER_TOPIC,
    }
}

impl KafkaConnection {
    #[allow(clippy::too_many_arguments)]
    fn request_flow(
        &self,
        tables: &Tables,
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
        let labels = KafkaLabels { api_key: api.to_string(), topic: topic_label(tables, topic).to_string(), verdict };
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

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
    use kafka_protocol::messages::{MetadataRequest, TopicName};
    use kafka_protocol::protocol::StrBytes;

    fn metadata(topics: &[&str], auto_create: bool) -> RequestKind {
        RequestKind::Metadata(
            MetadataRequest::default().with_allow_auto_topic_creation(auto_create).with_topics(Some(
                topics
                    .iter()
                    .map(|t| {
                        MetadataRequestTopic::default().with_name(Some(TopicName(StrBytes::from_string(t.to_string()))))
                    })
                    .collect(),
            )),
        )
    }

    /// Metadata may create the topics it names: that is judged as CreateTopics of each, and
    /// turned off before the broker sees it when any is denied.
    #[test]
    fn metadata_auto_creation_is_judged_as_create_topics() {
        let judge = |key: i16, topic: Option<&str>| {
            if key == ApiKey::CreateTopics as i16 && topic == Some("fresh") {
                Decision::Allow { policy: None }
            } else {
                Decision::Deny { policy: "p".into() }
            }
        };
        let no_flow = |_: Option<&str>, _: &Decision, _: i16| {};
        for version in 4..=12 {
            let allowed = metadata(&["fresh"], true);
            assert!(metadata_auto_create(&allowed, version, &judge, &no_flow).unwrap().is_none(), "v{version}");
            let mixed = metadata(&["fresh", "evil"], true);
            let body = metadata_auto_create(&mixed, version, &judge, &no_flow).unwrap().expect("rewritten");
            let decoded = MetadataRequest::decode(&mut body.freeze(), version).unwrap();
            assert!(!decoded.allow_auto_topic_creation, "v{version}");
            assert_eq!(decoded.topics.unwrap().len(), 2, "the topics are still described");
            let off = metadata(&["evil"], false);
            assert!(metadata_auto_create(&off, version, &judge, &no_flow).unwrap().is_none());
        }
        // v0-3 cannot turn creation off (the field is not on the wire, whatever it says here):
        // naming a topic whose creation is denied is refused; allowed ones go as they are.
        for version in 0..4 {
            let allowed = metadata(&["fresh"], false);
            assert!(metadata_auto_create(&allowed, version, &judge, &no_flow).unwrap().is_none(), "v{version}");
            let evil = metadata(&["fresh", "evil"], false);
            let refused = metadata_auto_create(&evil, version, &judge, &no_flow);
            assert!(matches!(refused, Err(KafkaError::Refused(_))), "v{version}");
        }
    }

    /// A frame over its bound is refused from its length alone; one within it is read as it
    /// arrives (a peer that claims much and sends little holds little), never past its end.
    #[tokio::test]
    async fn frames_are_bounded_and_read_as_they_arrive() {
        let huge = [0x7f, 0xff, 0xff, 0xff, 0];
        let e = read_frame(&mut &huge[..], 64 << 20, Limit::KafkaResponseFrame).await.unwrap_err();
        assert!(matches!(e, KafkaError::FrameTooLarge { limit: Limit::KafkaResponseFrame, len: 0x7fff_ffff, .. }));
        assert!(e.to_string().contains("--max-kafka-response-frame"), "{e}");
        let negative = [0xff, 0xff, 0xff, 0xfe];
        assert!(matches!(
            read_frame(&mut &negative[..], 1 << 20, Limit::KafkaRequestFrame).await,
            Err(KafkaError::Malformed(_))
        ));
        // Two frames back to back: each read stops at its own end.
        let mut two = Vec::new();
        for body in [vec![1u8; 200_000], vec![2u8; 3]] {
            two.extend_from_slice(&(body.len() as i32).to_be_bytes());
            two.extend_from_slice(&body);
        }
        let mut r = &two[..];
        let a = read_frame(&mut r, 1 << 20, Limit::KafkaRequestFrame).await.unwrap().unwrap();
        assert!(a.len() == 200_000 && a.iter().all(|b| *b == 1));
        let b = read_frame(&mut r, 1 << 20, Limit::KafkaRequestFrame).await.unwrap().unwrap();
        assert_eq!(&b[..], &[2, 2, 2]);
        assert!(read_frame(&mut r, 1 << 20, Limit::KafkaRequestFrame).await.unwrap().is_none(), "clean end");
        // A claimed 60 MiB frame dripped 10 bytes at a time, then cut: the buffer held what came.
        let (mut w, mut rd) = tokio::io::duplex(64);
        let reader = tokio::spawn(async move {
            let r = read_frame(&mut rd, 64 << 20, Limit::KafkaResponseFrame).await;
            (r.map(|_| ()).map_err(|e| e.to_string()), rd)
        });
        w.write_all(&(60i32 << 20).to_be_bytes()).await.unwrap();
        for _ in 0..100 {
            w.write_all(&[7u8; 10]).await.unwrap();
        }
        drop(w);
        let (r, _) = reader.await.unwrap();
        assert_eq!(r.unwrap_err(), "malformed frame: truncated frame");
    }

    /// Metrics label a topic only when the policy in force names it: a client naming thousands
    /// of topics adds one series.
    #[test]
    fn topic_labels_are_the_policys_topics_or_other() {
        let t = Tables::build(
            serde_json::from_value(serde_json::json!({
                "proxy_rules": [{"endpoint_id": 1, "direction": "ingress", "ports": [9092, 9092], "peers": "any",
                    "policy": "k", "l7": {"type": "kafka", "rules": [{"role": "produce", "topic": "orders"}]}}]
            }))
            .unwrap(),
        );
        assert_eq!(topic_label(&t, Some("orders")), "orders");
        assert_eq!(topic_label(&t, None), "");
        let labels: HashSet<&str> =
            (0..5000).map(|i| topic_label(&t, Some(if i % 2 == 0 { "orders" } else { "x" }))).collect();
        assert_eq!(labels.len(), 2);
        for random in ["x", "orders2", "(other)", "", "ORDERS"] {
            assert_eq!(topic_label(&t, Some(random)), OTHER_TOPIC, "{random}");
        }
    }

    /// ApiVersions never advertises a version the codec cannot decode, a key it does not know,
    /// or a version that names topics by ID only.
    #[test]
    fn api_versions_are_capped_at_what_is_judged() {
        use kafka_protocol::messages::api_versions_response::ApiVersion;
        let key = |k: i16, min: i16, max: i16| {
            ApiVersion::default().with_api_key(k).with_min_version(min).with_max_version(max)
        };
        let mut r = ApiVersionsResponse::default().with_api_keys(vec![
            key(0, 0, 13),
            key(1, 0, 18),
            key(8, 2, 10),
            key(3, 0, 99),
            key(4, 0, 7),
            key(999, 0, 1),
        ]);
        cap_api_versions(&mut r);
        let got: Vec<_> = r.api_keys.iter().map(|k| (k.api_key, k.min_version, k.max_version)).collect();
        assert_eq!(got, [(0, 3, 12), (1, 4, 12), (8, 2, 9), (3, 4, 13)]);
    }
}

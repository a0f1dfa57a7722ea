//! The Kafka stack: a framed request/response loop built on `kafka-protocol`.
//!
//! Each request frame is bounded (its size, the items it decodes into, the time its bytes take
//! to arrive), its header and body decoded, and every topic it names judged on its own
//! (`kafka_topics` classifies every request type): denied topics are removed from the request
//! before it goes upstream, and their entries come back in the response with
//! TOPIC_AUTHORIZATION_FAILED (29), so the allowed topics of the same request go through. A
//! request with nothing left, or denied as a whole, is answered here in its own response type
//! with the API's authorization error; only an undecodable frame or a bound closes the
//! connection. What to do with a frame is decided by one pure function, [`classify`] (no I/O:
//! the proxy and the fuzz target call the same code); the loop here only moves bytes.
//! Responses are matched to requests by order (Kafka answers in order on a connection) and
//! checked by correlation id ([`rewrite_response`]). ApiVersions responses are capped at the
//! versions the codec decodes and, for the APIs that later name topics by ID only, at their
//! last topic-named versions.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, ApiVersionsResponse, RequestHeader, RequestKind, ResponseHeader, ResponseKind};
use kafka_protocol::protocol::budget::with_item_budget;
use kafka_protocol::protocol::{Decodable, Encodable};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};

use crate::context::{Direction, Shared};
use crate::flows::{Endpoint, FlowRecord, KafkaPart, L7Flow, ProxyInfo, Reason};
use crate::kafka_topics::{
    self, add_denied, all_topics_denied, reencode, retain_topics, whole_denial, whole_denial_code, Judged,
    TOPIC_AUTHORIZATION_FAILED,
};
pub use crate::limits::KafkaLimits;
use crate::metrics::{KafkaLabels, Limit, VerdictLabel, OTHER_TOPIC};
use crate::registry::WorkloadInfo;
use crate::tables::{Decision, KafkaRequest, Tables};
use l7mesh_api::Verdict;

/// Frames are read this much at a time: memory follows the bytes that arrive, never the length
/// a peer claims.
const READ_CHUNK: usize = 64 << 10;

/// Request frames at least this large are decoded and judged on tokio's blocking pool, so a
/// multi-MiB frame does not stall the other connections of its worker (judging a 16 MiB frame
/// at the item bound takes tens of ms: `large_frames_are_judged_in_bounded_time`).
pub const BLOCKING_FRAME: usize = 128 << 10;

/// Flow records one request writes (one per topic judged); past it, one record says how many
/// more were judged and how many of those were denied.
pub const FLOWS_PER_REQUEST: usize = 16;

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
    pub upstream_local: Option<std::net::SocketAddr>,
}

/// The part of a forwarded request whose topics were removed, to answer in the broker's
/// response: only its denied items (the allowed ones went upstream and are not kept).
#[derive(Debug)]
pub struct Denied {
    request: RequestKind,
}

impl Denied {
    /// The items of `req` whose topic `denied` names.
    pub fn of(mut req: RequestKind, version: i16, denied: &mut dyn FnMut(Option<&str>) -> bool) -> Self {
        retain_topics(&mut req, version, &mut |t| denied(t));
        Denied { request: req }
    }

    /// What is kept: the request as the client sent it, less its allowed items.
    pub fn request(&self) -> &RequestKind {
        &self.request
    }
}

/// A forwarded request's answer to come: what the response path checks and adds.
#[derive(Debug)]
pub struct Expect {
    pub api_key: ApiKey,
    pub version: i16,
    pub correlation_id: i32,
    pub denied: Option<Box<Denied>>,
}

/// What to do with one request frame.
#[derive(Debug)]
pub enum Action {
    /// Send `frame` upstream (as it came, or rewritten); `expect` is its answer to come, `None`
    /// for a Produce with acks=0 (which has none).
    Forward { frame: Bytes, expect: Option<Expect> },
    /// Answer the client with this frame; nothing goes upstream.
    Answer(Bytes),
    /// Nothing either way: a denied Produce with acks=0 gets no answer.
    Drop,
}

/// One decision taken for a request, to record as a flow.
#[derive(Debug, Clone)]
pub struct Judgment {
    pub api_key: ApiKey,
    pub topic: Option<String>,
    pub decision: Decision,
    /// The error code the client gets if it is a denial.
    pub code: i16,
}

/// A request frame, decided.
#[derive(Debug)]
pub struct Classified {
    pub api_key: ApiKey,
    pub version: i16,
    pub correlation_id: i32,
    pub client_id: String,
    /// The first [`FLOWS_PER_REQUEST`] decisions.
    pub judgments: Vec<Judgment>,
    /// Decisions past those, and how many of them denied.
    pub unrecorded: usize,
    pub unrecorded_denied: usize,
    pub action: Action,
}

/// What the response path owes the client for one request, in order.
enum Pending {
    /// Forwarded: read the broker's answer and post-process it ([`rewrite_response`]).
    Upstream(Expect),
    /// Answered here.
    Local(Bytes),
}

#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    #[error("{} frame of {len} bytes is over the {max}-byte bound ({})", side(*limit), flag(*limit))]
    FrameTooLarge { limit: Limit, len: usize, max: usize },
    #[error("{what} decodes into more than {max} items (--max-kafka-items)")]
    TooManyItems { what: &'static str, max: usize },
    #[error("{}", timeout_message(*limit, *after))]
    Timeout { limit: Limit, after: Duration },
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
    #[error("judging a request failed: {0}")]
    Task(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl KafkaError {
    /// The bound this error trips, if it is one.
    pub fn limit(&self) -> Option<Limit> {
        match self {
            KafkaError::FrameTooLarge { limit, .. } | KafkaError::Timeout { limit, .. } => Some(*limit),
            KafkaError::TooManyItems { .. } => Some(Limit::KafkaItems),
            _ => None,
        }
    }

    /// The connection failed rather than being refused (an I/O error that is not a peer's
    /// close, an encoder or task failure): its flow is ERROR, not DENIED.
    pub fn is_failure(&self) -> bool {
        matches!(self, KafkaError::Io(_) | KafkaError::Encode(_) | KafkaError::Task(_)) && !self.is_peer_close()
    }

    /// A peer closed or reset its side: the connection's normal end, not a denial.
    pub fn is_peer_close(&self) -> bool {
        use std::io::ErrorKind::*;
        matches!(self, KafkaError::Io(e) if matches!(e.kind(), BrokenPipe | ConnectionReset | ConnectionAborted | UnexpectedEof))
    }
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

fn timeout_message(limit: Limit, after: Duration) -> String {
    if limit == Limit::KafkaResponseTimeout {
        format!("the broker sent no answer for {after:?} while one was owed (--kafka-response-timeout)")
    } else {
        format!("a request frame was begun and not finished within {after:?} (--kafka-frame-timeout)")
    }
}

/// Bytes of request frames being read, across every Kafka connection of the process
/// (`--max-kafka-frame-bytes`). A frame over [`READ_CHUNK`] takes its length's share before its
/// body is read and holds it until it is judged; at the bound a frame waits for a share (its
/// frame deadline running). Smaller frames, the usual request, never wait: each connection
/// holds at most one such buffer.
pub struct FrameBudget {
    bytes: Arc<Semaphore>,
    total: usize,
}

impl FrameBudget {
    pub fn new(total: usize) -> Self {
        let total = total.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
        FrameBudget { bytes: Arc::new(Semaphore::new(total)), total }
    }

    /// The process's budget (sized by the first caller: the flags).
    fn global(total: usize) -> &'static FrameBudget {
        static BUDGET: std::sync::OnceLock<FrameBudget> = std::sync::OnceLock::new();
        BUDGET.get_or_init(|| FrameBudget::new(total))
    }
}

/// A share of the [`FrameBudget`] a frame holds, and whether it had to wait for it.
#[derive(Default)]
struct Held {
    _permit: Option<OwnedSemaphorePermit>,
    waited: bool,
}

/// A budget, and what to do when a frame must wait for its share (count the trip).
type Budget<'a> = (&'a FrameBudget, &'a (dyn Fn() + Sync));

/// One length-prefixed frame, at most `max` bytes (`limit` names the bound in the error). The
/// buffer grows with the bytes received, so a peer that claims a large frame and sends it
/// slowly (or never) holds only what it sent.
async fn read_frame(
    stream: &mut (impl AsyncReadExt + Unpin),
    max: usize,
    limit: Limit,
    deadline: Option<(Duration, Limit)>,
) -> Result<Option<Bytes>, KafkaError> {
    Ok(read_frame_held(stream, max, limit, deadline, None).await?.map(|(b, _)| b))
}

/// [`read_frame`], with `deadline`: the frame must arrive whole within it once its first byte
/// has (waiting for that first byte has no deadline); with `budget`, a large frame's bytes are
/// taken from it first.
async fn read_frame_held(
    stream: &mut (impl AsyncReadExt + Unpin),
    max: usize,
    limit: Limit,
    deadline: Option<(Duration, Limit)>,
    budget: Option<Budget<'_>>,
) -> Result<Option<(Bytes, Held)>, KafkaError> {
    let mut first = [0u8; 1];
    if stream.read(&mut first).await? == 0 {
        return Ok(None);
    }
    let rest = read_frame_rest(stream, first[0], max, limit, budget);
    match deadline {
        None => rest.await.map(Some),
        Some((after, limit)) => match tokio::time::timeout(after, rest).await {
            Ok(r) => r.map(Some),
            Err(_) => Err(KafkaError::Timeout { limit, after }),
        },
    }
}

async fn read_frame_rest(
    stream: &mut (impl AsyncReadExt + Unpin),
    first: u8,
    max: usize,
    limit: Limit,
    budget: Option<Budget<'_>>,
) -> Result<(Bytes, Held), KafkaError> {
    let mut len = [first, 0, 0, 0];
    match stream.read_exact(&mut len[1..]).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(KafkaError::Malformed("truncated frame length".into()))
        }
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
    let mut held = Held::default();
    if let Some((budget, on_wait)) = budget.filter(|_| n > READ_CHUNK) {
        let share = n.min(budget.total) as u32;
        held._permit = match budget.bytes.clone().try_acquire_many_owned(share) {
            Ok(p) => Some(p),
            Err(_) => {
                held.waited = true;
                on_wait();
                budget.bytes.clone().acquire_many_owned(share).await.ok()
            }
        };
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
    Ok((buf.freeze(), held))
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
    /// What it keeps in memory until it is answered (the denied items kept to merge into the
    /// broker's answer are counted as their request frame's size, an upper bound).
    fn held_bytes(&self, frame_len: usize) -> usize {
        match self {
            Pending::Local(bytes) => bytes.len(),
            Pending::Upstream(Expect { denied: Some(_), .. }) => frame_len,
            Pending::Upstream(Expect { denied: None, .. }) => 0,
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

/// A response made or merged here (a whole frame, length prefix included) goes to the client
/// only within the response bound the client's side is promised.
fn bounded_response(out: Bytes, limits: &KafkaLimits) -> Result<Bytes, KafkaError> {
    let len = out.len() - 4;
    if len > limits.max_response_frame {
        return Err(KafkaError::FrameTooLarge {
            limit: Limit::KafkaResponseFrame,
            len,
            max: limits.max_response_frame,
        });
    }
    Ok(out)
}

/// Serves one Kafka connection until either side closes.
pub async fn serve(downstream: TcpStream, upstream: TcpStream, conn: Arc<KafkaConnection>) -> Result<(), KafkaError> {
    let (down_read, down_write) = downstream.into_split();
    serve_halves(down_read, down_write, upstream, conn).await
}

/// [`serve`] for a downstream that is not a socket of its own (a stream of the tunnel between
/// nodes). The upstream is always a socket: the broker's silence is read by peeking at it.
pub async fn serve_stream(
    downstream: impl AsyncRead + AsyncWrite + Send,
    upstream: TcpStream,
    conn: Arc<KafkaConnection>,
) -> Result<(), KafkaError> {
    let (down_read, down_write) = tokio::io::split(downstream);
    serve_halves(down_read, down_write, upstream, conn).await
}

async fn serve_halves(
    mut down_read: impl AsyncRead + Unpin,
    mut down_write: impl AsyncWrite + Unpin,
    upstream: TcpStream,
    conn: Arc<KafkaConnection>,
) -> Result<(), KafkaError> {
    let limits = conn.shared.limits.kafka;
    let conn_for_requests = conn.clone();
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
                // stream ends the connection. No deadline here: nothing is owed.
                peeked = up_read.peek(&mut probe) => return match peeked? {
                    0 => Ok(()),
                    n => Err(KafkaError::Unsolicited(n)),
                },
            };
            let out = match queued.pending {
                Pending::Local(bytes) => bytes,
                Pending::Upstream(expect) => {
                    // An answer is owed: the broker has `response_timeout` to give it whole.
                    let read = read_frame(&mut up_read, limits.max_response_frame, Limit::KafkaResponseFrame, None);
                    let resp = match tokio::time::timeout(limits.response_timeout, read).await {
                        Ok(r) => r?,
                        Err(_) => {
                            return Err(KafkaError::Timeout {
                                limit: Limit::KafkaResponseTimeout,
                                after: limits.response_timeout,
                            })
                        }
                    };
                    let Some(resp) = resp else { return Ok(()) };
                    rewrite_response(resp, &expect, &limits)?
                }
            };
            down_write.write_all(&out).await?;
        }
    };
    let requests = async move {
        let conn = &conn_for_requests;
        let deadline = Some((limits.frame_timeout, Limit::KafkaFrameTimeout));
        loop {
            let Some(slot) = hold(&in_flight, 1, Limit::KafkaInFlight, conn).await else { break };
            let budget = FrameBudget::global(limits.max_frame_bytes);
            let on_wait = || {
                conn.shared.metrics.limit_tripped(Limit::KafkaFrameBytes);
                debug!(peer = %conn.peer, "large request frames being read hold --max-kafka-frame-bytes; this one waits");
            };
            let read = read_frame_held(
                &mut down_read,
                limits.max_request_frame,
                Limit::KafkaRequestFrame,
                deadline,
                Some((budget, &on_wait)),
            );
            let Some((request, held)) = read.await? else { break };
            let frame_len = request.len();
            let (pending, forward) = if frame_len >= BLOCKING_FRAME {
                // Off the event loop; this connection waits for it (its order is kept), the
                // others do not.
                let c = conn.clone();
                tokio::task::spawn_blocking(move || handle_request(&c, request))
                    .await
                    .map_err(|e| KafkaError::Task(e.to_string()))??
            } else {
                handle_request(conn, request)?
            };
            // Judged: the frame's share of the budget goes back (what is kept of it is counted
            // by the pending bytes bound).
            drop(held);
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
        if e.is_peer_close() {
            // A peer hung up or reset: the connection's end, as it carried it (policy and
            // bounds are what DENIED stands for).
            conn.flow(Verdict::Forwarded, None, Some(e.to_string()));
            debug!(peer = %conn.peer, error = %e, "kafka connection closed by a peer");
            return Ok(());
        }
        // The flow first: whoever sees the count or the log finds the flow too. DENIED is what
        // a bound or the protocol's rules refused; a failure is ERROR.
        let verdict = if e.is_failure() { Verdict::Error } else { Verdict::Denied };
        conn.flow(verdict, None, Some(e.to_string()));
        if let Some(limit) = e.limit() {
            conn.shared.metrics.limit_tripped(limit);
            info!(peer = %conn.peer, limit = limit.as_str(), error = %e, "kafka bound reached; closing this connection");
        }
        warn!(peer = %conn.peer, error = %e, "kafka connection closed");
    }
    result
}

/// Judges one request frame and records its flows: what goes upstream (possibly rewritten),
/// what the response path must do.
fn handle_request(conn: &KafkaConnection, frame_body: Bytes) -> Result<(Option<Pending>, Option<Bytes>), KafkaError> {
    let started = Instant::now();
    let tables = conn.shared.registry.tables();
    let port = conn.target.port();
    // Resolved against the tables judging this request (a new version renumbers workloads);
    // a workload they no longer know is judged by no rule of theirs: denied.
    let parties = tables.parties(
        conn.src.as_ref().map(|w| w.cgroup_id),
        conn.peer.ip(),
        conn.dst.as_ref().map(|w| w.cgroup_id),
        conn.target.ip(),
    );
    let context = if conn.shared.metrics.context.is_empty() {
        Vec::new()
    } else {
        conn.shared.metrics.context.kafka(crate::metrics::Parties {
            direction: conn.direction,
            source: conn.src.as_deref(),
            destination: conn.dst.as_deref(),
        })
    };
    let mut judge = |r: &KafkaRequest| {
        let decision = match &parties {
            Ok(parties) => tables.decide_kafka(parties, port, r),
            Err(gone) => Decision::Deny { policy: Arc::from(gone.to_string()) },
        };
        // Counted for every decision (the flows are capped per request, the counts are not).
        let api = ApiKey::try_from(r.api_key).map(|k| format!("{k:?}")).unwrap_or_default();
        let labels = KafkaLabels {
            api_key: api,
            topic: topic_label(&tables, r.topic).to_string(),
            verdict: VerdictLabel(decision.verdict()),
        };
        conn.shared.metrics.kafka_topic_verdicts.with(labels, context.clone(), |c| c.inc());
        decision
    };
    let c = classify(frame_body, &conn.shared.limits.kafka, &mut judge)?;
    for j in &c.judgments {
        conn.request_flow(&c, j, started, &tables, parties.as_deref().ok());
    }
    if c.unrecorded > 0 {
        let verdict = if c.unrecorded_denied > 0 { Verdict::Denied } else { Verdict::Allowed };
        conn.shared.flows.push(FlowRecord {
            reason: Some(Reason::Text(format!(
                "{} more topics judged in this request ({} denied); flows are kept for the first {FLOWS_PER_REQUEST}",
                c.unrecorded, c.unrecorded_denied
            ))),
            latency_ns: Some(started.elapsed().as_nanos() as u64),
            l7: Some(c.kafka_flow(c.api_key, None, 0)),
            ..conn.record(verdict)
        });
    }
    Ok(match c.action {
        Action::Forward { frame, expect } => (expect.map(Pending::Upstream), Some(frame)),
        Action::Answer(bytes) => (Some(Pending::Local(bytes)), None),
        Action::Drop => (None, None),
    })
}

/// The decisions of one request, as they are taken.
pub struct Judging<'a> {
    judge: &'a mut dyn FnMut(&KafkaRequest) -> Decision,
    version: i16,
    client_id: &'a str,
    judgments: Vec<Judgment>,
    unrecorded: usize,
    unrecorded_denied: usize,
}

impl<'a> Judging<'a> {
    pub fn new(judge: &'a mut dyn FnMut(&KafkaRequest) -> Decision, version: i16, client_id: &'a str) -> Self {
        Judging { judge, version, client_id, judgments: Vec::new(), unrecorded: 0, unrecorded_denied: 0 }
    }

    fn decide(&mut self, api_key: ApiKey, topic: Option<&str>) -> Decision {
        (self.judge)(&KafkaRequest { api_key: api_key as i16, version: self.version, client_id: self.client_id, topic })
    }

    fn record(&mut self, api_key: ApiKey, topic: Option<&str>, decision: &Decision, code: i16) {
        if self.judgments.len() < FLOWS_PER_REQUEST {
            self.judgments.push(Judgment {
                api_key,
                topic: topic.map(str::to_string),
                decision: decision.clone(),
                code,
            });
        } else {
            self.unrecorded += 1;
            self.unrecorded_denied += usize::from(!decision.allows());
        }
    }
}

/// Decides what to do with one request frame (its body, after the length): decoded within the
/// item bound, every topic judged by `judge`, rewritten, answered here or forwarded. No I/O:
/// the proxy records the flows and moves the bytes. Only a frame that does not decode, or a
/// bound, is an error (and closes the connection); every denial is answered with the
/// request's own response type.
pub fn classify(
    frame_body: Bytes,
    limits: &KafkaLimits,
    judge: &mut dyn FnMut(&KafkaRequest) -> Decision,
) -> Result<Classified, KafkaError> {
    let raw = frame_body.clone();
    let mut body = frame_body;
    if body.remaining() < 4 {
        return Err(KafkaError::Malformed("frame shorter than a request header".into()));
    }
    let api_key_raw = i16::from_be_bytes([body[0], body[1]]);
    let version = i16::from_be_bytes([body[2], body[3]]);
    let api_key =
        ApiKey::try_from(api_key_raw).map_err(|_| KafkaError::Malformed(format!("unknown api key {api_key_raw}")))?;
    let versions = api_key.valid_versions();
    if version < versions.min || version > versions.max {
        return Err(KafkaError::Malformed(format!("{api_key:?} v{version} is not a version l7mesh decodes")));
    }
    let header_version = api_key.request_header_version(version);
    // A malformed body never reaches the broker: every request is decoded once, within the
    // item bound (charged as each count is read, so a frame of a million empty entries stops
    // at the count, before they are built).
    let (decoded, over) = with_item_budget(limits.max_items, || {
        let header = RequestHeader::decode(&mut body, header_version).map_err(malformed)?;
        let header_len = raw.len() - body.remaining();
        let req = RequestKind::decode(api_key, &mut body, version).map_err(malformed)?;
        Ok::<_, KafkaError>((header, header_len, req))
    });
    if over {
        return Err(KafkaError::TooManyItems { what: "a request", max: limits.max_items });
    }
    let (header, header_len, original) = decoded?;
    // Bytes after the body are not refused: librdkafka's Metadata v12 carries 3 the codec does
    // not read. A request forwarded as is keeps them; a rewritten one is re-encoded from what was
    // judged, without them.
    let client_id = header.client_id.as_ref().map(|c| c.to_string()).unwrap_or_default();
    let correlation_id = header.correlation_id;
    let mut j = Judging::new(judge, version, &client_id);
    let response_header = ResponseHeader::default().with_correlation_id(correlation_id);
    let response_header_version = api_key.response_header_version(version);
    let answer = |body: Result<BytesMut, String>| -> Result<Action, KafkaError> {
        let body = body.map_err(KafkaError::Encode)?;
        let bytes = frame(&[&encode(&response_header, response_header_version)?, &body]);
        Ok(Action::Answer(bounded_response(bytes, limits)?))
    };

    // Every topic judged once per request (a topic named twice gets one decision).
    let mut decisions: HashMap<Option<String>, bool> = HashMap::new();
    let mut req = original.clone();
    let judged = retain_topics(&mut req, version, &mut |topic| {
        let key = topic.map(str::to_string);
        if let Some(&ok) = decisions.get(&key) {
            return ok;
        }
        let decision = j.decide(api_key, topic);
        j.record(api_key, topic, &decision, TOPIC_AUTHORIZATION_FAILED);
        let ok = decision.allows();
        decisions.insert(key, ok);
        ok
    });
    let expect = |denied: Option<Box<Denied>>| Expect { api_key, version, correlation_id, denied };
    // Produce with acks=0 has no response: nothing may wait for one.
    let acks_zero = matches!(&original, RequestKind::Produce(p) if p.acks == 0);
    let forward = |frame: Bytes, expect: Expect| Ok(Action::Forward { frame, expect: (!acks_zero).then_some(expect) });
    let denied_quietly = || Ok(Action::Drop);

    let action = match judged {
        Judged::NoTopic => {
            // Names no topic: judged as a whole by its API key.
            let decision = j.decide(api_key, None);
            let code = whole_denial_code(&original, judged);
            j.record(api_key, None, &decision, code);
            if decision.allows() {
                let rewritten = metadata_auto_create(&original, version, &mut j)?;
                let out = rewritten.map(|body| frame(&[&raw[..header_len], &body])).unwrap_or_else(|| frame(&[&raw]));
                forward(out, expect(None))
            } else if acks_zero {
                denied_quietly()
            } else {
                answer(whole_denial(api_key, version, &original, code))
            }
        }
        Judged::Whole { allowed: true } | Judged::Items { removed: 0, .. } => forward(frame(&[&raw]), expect(None)),
        Judged::Whole { allowed: false } if acks_zero => denied_quietly(),
        Judged::Whole { allowed: false } => {
            answer(whole_denial(api_key, version, &original, whole_denial_code(&original, judged)))
        }
        Judged::Items { kept: 0, .. } if acks_zero => denied_quietly(),
        Judged::Items { kept: 0, .. } => answer(all_topics_denied(api_key, version, &original)),
        Judged::Items { .. } => {
            let body = reencode(api_key, version, &req).map_err(KafkaError::Malformed)?;
            drop(req);
            // Only the denied items are kept for the answer, not the whole request.
            let denied =
                Denied::of(original, version, &mut |t| decisions.get(&t.map(str::to_string)).is_some_and(|ok| !ok));
            forward(frame(&[&raw[..header_len], &body]), expect(Some(Box::new(denied))))
        }
    }?;
    Ok(Classified {
        api_key,
        version,
        correlation_id,
        judgments: j.judgments,
        unrecorded: j.unrecorded,
        unrecorded_denied: j.unrecorded_denied,
        client_id,
        action,
    })
}

/// Metadata may create the topics it names (`allow_auto_topic_creation`): that creation is
/// judged as CreateTopics of each topic, and turned off when any is denied (each denial is a
/// CreateTopics flow: what was judged, so a simulation replays the same decision). The
/// rewritten body, if it changed.
fn metadata_auto_create(req: &RequestKind, version: i16, j: &mut Judging) -> Result<Option<BytesMut>, KafkaError> {
    let RequestKind::Metadata(m) = req else { return Ok(None) };
    // Metadata v0-3 has no allow_auto_topic_creation: a broker may create every topic it names.
    if version >= 4 && !m.allow_auto_topic_creation {
        return Ok(None);
    }
    let mut deny = false;
    for name in m.topics.iter().flatten().filter_map(|t| t.name.as_ref()) {
        let decision = j.decide(ApiKey::CreateTopics, Some(&name.0));
        if !decision.allows() {
            j.record(ApiKey::CreateTopics, Some(&name.0), &decision, TOPIC_AUTHORIZATION_FAILED);
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
pub fn cap_api_versions(r: &mut ApiVersionsResponse) {
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

/// Post-processes an upstream response frame (its body, after the length) for the request it
/// answers: the correlation id checked, the denied topics' errors added, ApiVersions capped.
/// Decoded, when it is, within the item bound; the frame it makes is within the response bound.
/// No I/O.
pub fn rewrite_response(mut resp: Bytes, expect: &Expect, limits: &KafkaLimits) -> Result<Bytes, KafkaError> {
    let Expect { api_key, version, correlation_id: want, ref denied } = *expect;
    let raw = resp.clone();
    let header_version = api_key.response_header_version(version);
    let header = ResponseHeader::decode(&mut resp, header_version).map_err(malformed)?;
    if header.correlation_id != want {
        return Err(KafkaError::Correlation { got: header.correlation_id, want });
    }
    let header_len = raw.len() - resp.remaining();
    let decode_bounded = |resp: &mut Bytes| {
        let (r, over) = with_item_budget(limits.max_items, || ResponseKind::decode(api_key, resp, version));
        if over {
            return Err(KafkaError::TooManyItems { what: "a response to merge", max: limits.max_items });
        }
        r.map_err(malformed)
    };
    let body = match (api_key, denied) {
        (ApiKey::ApiVersions, _) => {
            // ApiVersions answers with a v0 header whatever the request version.
            let ResponseKind::ApiVersions(mut r) = decode_bounded(&mut resp)? else {
                return Err(KafkaError::Malformed("not an ApiVersions response".into()));
            };
            cap_api_versions(&mut r);
            encode(&r, version)?
        }
        (_, None) => return bounded_response(frame(&[&raw]), limits),
        (_, Some(denied)) => {
            let mut r = decode_bounded(&mut resp)?;
            add_denied(&mut r, &denied.request, &|_| true);
            kafka_topics::encode(&r, version).map_err(KafkaError::Encode)?
        }
    };
    debug!(?api_key, "response rewritten");
    bounded_response(frame(&[&raw[..header_len], &body]), limits)
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

impl Classified {
    fn kafka_flow(&self, api_key: ApiKey, topic: Option<&str>, error_code: i16) -> L7Flow {
        L7Flow::Kafka {
            kafka: KafkaPart {
                api_key: format!("{api_key:?}"),
                correlation_id: self.correlation_id,
                api_version: self.version,
                topic: topic.map(str::to_string),
                client_id: self.client_id.clone(),
                error_code,
            },
        }
    }
}

impl KafkaConnection {
    /// One topic's flow: its direction is the side whose rules decided, and a denial or audit
    /// names the rule list and why none of its rules matched (judged again with the same
    /// tables, for the recorded flows only: the hot path judges once).
    fn request_flow(
        &self,
        c: &Classified,
        j: &Judgment,
        started: Instant,
        tables: &crate::tables::Tables,
        parties: Option<&[crate::tables::Party]>,
    ) {
        let error_code = if j.decision.allows() { 0 } else { j.code };
        let l7 = c.kafka_flow(j.api_key, j.topic.as_deref(), error_code);
        let req = KafkaRequest {
            api_key: j.api_key as i16,
            version: c.version,
            client_id: &c.client_id,
            topic: j.topic.as_deref(),
        };
        let port = self.target.port();
        let (side, why) = match parties {
            Some(p) => (tables.decide_kafka_sided(p, port, &req).1, tables.explain_kafka(p, port, &req, &j.decision)),
            None => (None, None),
        };
        let mut record = self.record(j.decision.verdict());
        record.direction = why.as_ref().map(|e| e.direction).or(side).unwrap_or(self.direction);
        self.shared.flows.push(FlowRecord {
            policy_name: j.decision.policy().cloned(),
            decided_by: why.as_ref().map(|e| e.decided_by.clone()),
            reason: why.map(|e| Reason::Policy(e.reason)),
            latency_ns: Some(started.elapsed().as_nanos() as u64),
            l7: Some(l7),
            ..record
        });
    }

    fn flow(&self, verdict: Verdict, l7: Option<L7Flow>, reason: Option<String>) {
        self.shared.flows.push(FlowRecord { reason: reason.map(Reason::Text), l7, ..self.record(verdict) });
    }

    /// This connection's flow record, before its L7 part.
    fn record(&self, verdict: Verdict) -> FlowRecord {
        FlowRecord::proxied(
            verdict,
            self.direction,
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
    use std::collections::HashSet;

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
        let mut judge = |r: &KafkaRequest| {
            if r.api_key == ApiKey::CreateTopics as i16 && r.topic == Some("fresh") {
                Decision::Allow { policy: None }
            } else {
                Decision::Deny { policy: "p".into() }
            }
        };
        let mut auto = |req: &RequestKind, version: i16| {
            let mut j = Judging::new(&mut judge, version, "c");
            let r = metadata_auto_create(req, version, &mut j);
            (r, j.judgments.len())
        };
        for version in 4..=12 {
            let allowed = metadata(&["fresh"], true);
            assert!(auto(&allowed, version).0.unwrap().is_none(), "v{version}");
            let mixed = metadata(&["fresh", "evil"], true);
            let (body, flows) = auto(&mixed, version);
            let body = body.unwrap().expect("rewritten");
            assert_eq!(flows, 1, "the denied creation is a flow");
            let decoded = MetadataRequest::decode(&mut body.freeze(), version).unwrap();
            assert!(!decoded.allow_auto_topic_creation, "v{version}");
            assert_eq!(decoded.topics.unwrap().len(), 2, "the topics are still described");
            let off = metadata(&["evil"], false);
            assert!(auto(&off, version).0.unwrap().is_none());
        }
        // v0-3 cannot turn creation off (the field is not on the wire, whatever it says here):
        // naming a topic whose creation is denied is refused; allowed ones go as they are.
        for version in 0..4 {
            let allowed = metadata(&["fresh"], false);
            assert!(auto(&allowed, version).0.unwrap().is_none(), "v{version}");
            let evil = metadata(&["fresh", "evil"], false);
            assert!(matches!(auto(&evil, version).0, Err(KafkaError::Refused(_))), "v{version}");
        }
    }

    /// A frame over its bound is refused from its length alone; one within it is read as it
    /// arrives (a peer that claims much and sends little holds little), never past its end.
    #[tokio::test]
    async fn frames_are_bounded_and_read_as_they_arrive() {
        let huge = [0x7f, 0xff, 0xff, 0xff, 0];
        let e = read_frame(&mut &huge[..], 64 << 20, Limit::KafkaResponseFrame, None).await.unwrap_err();
        assert!(matches!(e, KafkaError::FrameTooLarge { limit: Limit::KafkaResponseFrame, len: 0x7fff_ffff, .. }));
        assert!(e.to_string().contains("--max-kafka-response-frame"), "{e}");
        let negative = [0xff, 0xff, 0xff, 0xfe];
        assert!(matches!(
            read_frame(&mut &negative[..], 1 << 20, Limit::KafkaRequestFrame, None).await,
            Err(KafkaError::Malformed(_))
        ));
        // Two frames back to back: each read stops at its own end.
        let mut two = Vec::new();
        for body in [vec![1u8; 200_000], vec![2u8; 3]] {
            two.extend_from_slice(&(body.len() as i32).to_be_bytes());
            two.extend_from_slice(&body);
        }
        let mut r = &two[..];
        let a = read_frame(&mut r, 1 << 20, Limit::KafkaRequestFrame, None).await.unwrap().unwrap();
        assert!(a.len() == 200_000 && a.iter().all(|b| *b == 1));
        let b = read_frame(&mut r, 1 << 20, Limit::KafkaRequestFrame, None).await.unwrap().unwrap();
        assert_eq!(&b[..], &[2, 2, 2]);
        assert!(read_frame(&mut r, 1 << 20, Limit::KafkaRequestFrame, None).await.unwrap().is_none(), "clean end");
        // A claimed 60 MiB frame dripped 10 bytes at a time, then cut: the buffer held what came.
        let (mut w, mut rd) = tokio::io::duplex(64);
        let reader = tokio::spawn(async move {
            let r = read_frame(&mut rd, 64 << 20, Limit::KafkaResponseFrame, None).await;
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
            &serde_json::from_value(serde_json::json!({
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

    fn request_frame(api_key: ApiKey, version: i16, req: &RequestKind) -> Bytes {
        let header = RequestHeader::default()
            .with_request_api_key(api_key as i16)
            .with_request_api_version(version)
            .with_correlation_id(9)
            .with_client_id(Some(StrBytes::from_static_str("t")));
        let mut b = BytesMut::new();
        header.encode(&mut b, api_key.request_header_version(version)).unwrap();
        req.encode(&mut b, version).unwrap();
        b.freeze()
    }

    /// Produce v3 naming `n` empty topics, written by hand as an attacker would (6 bytes each).
    fn empty_topics_produce(n: usize) -> Bytes {
        let mut b = BytesMut::new();
        b.put_i16(0);
        b.put_i16(3);
        b.put_i32(9);
        b.put_i16(1);
        b.put_slice(b"x");
        b.put_i16(-1); // no transactional id
        b.put_i16(1); // acks
        b.put_i32(5000);
        b.put_i32(n as i32);
        for _ in 0..n {
            b.put_i16(0); // an empty name
            b.put_i32(0); // no partitions
        }
        b.freeze()
    }

    fn produce(topics: usize, partitions: usize, record_bytes: usize) -> RequestKind {
        use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
        use kafka_protocol::messages::ProduceRequest;
        let records = Bytes::from(vec![7u8; record_bytes]);
        RequestKind::Produce(
            ProduceRequest::default().with_acks(1).with_timeout_ms(5000).with_topic_data(
                (0..topics)
                    .map(|t| {
                        TopicProduceData::default()
                            .with_name(TopicName(StrBytes::from_string(format!("t{t}"))))
                            .with_partition_data(
                                (0..partitions)
                                    .map(|p| {
                                        PartitionProduceData::default()
                                            .with_index(p as i32)
                                            .with_records(Some(records.clone()))
                                    })
                                    .collect(),
                            )
                    })
                    .collect(),
            ),
        )
    }

    /// Denies the topics whose number is odd (`t1`, `t3`...).
    fn odd_denied(r: &KafkaRequest) -> Decision {
        let odd =
            r.topic.and_then(|t| t.strip_prefix('t')).and_then(|n| n.parse::<u32>().ok()).is_some_and(|n| n % 2 == 1);
        if odd {
            Decision::Deny { policy: "p".into() }
        } else {
            Decision::Allow { policy: None }
        }
    }

    fn allow_all(_: &KafkaRequest) -> Decision {
        Decision::Allow { policy: None }
    }

    /// The item bound is charged when a count is read: a frame of a million empty topic
    /// entries (6 MB, within the frame bound) stops at its count, before one entry is built; so
    /// do topics x partitions past the bound, at any nesting, in any request type.
    #[test]
    fn the_item_bound_is_charged_before_the_entries_are_built() {
        let limits = KafkaLimits::default();
        let huge = empty_topics_produce(1_000_000);
        assert!(huge.len() < limits.max_request_frame);
        let started = Instant::now();
        let e = classify(huge, &limits, &mut allow_all).unwrap_err();
        assert!(matches!(e, KafkaError::TooManyItems { max: 100_000, .. }), "{e}");
        assert_eq!(e.limit(), Some(Limit::KafkaItems));
        assert!(e.to_string().contains("--max-kafka-items"), "{e}");
        assert!(started.elapsed() < Duration::from_millis(50), "refused at the count: {:?}", started.elapsed());
        // Within the bound it decodes and goes through.
        let ok = classify(empty_topics_produce(50_000), &limits, &mut allow_all).unwrap();
        assert!(matches!(ok.action, Action::Forward { expect: Some(_), .. }));
        // 600 topics x 200 partitions: each array fits, together they do not.
        let nested = request_frame(ApiKey::Produce, 7, &produce(600, 200, 0));
        assert!(matches!(classify(nested, &limits, &mut allow_all), Err(KafkaError::TooManyItems { .. })));
        // Other request types, flexible versions too.
        let fetch = RequestKind::Fetch(
            kafka_protocol::messages::FetchRequest::default().with_topics(
                (0..150_000)
                    .map(|i| {
                        kafka_protocol::messages::fetch_request::FetchTopic::default()
                            .with_topic(TopicName(StrBytes::from_string(format!("t{i}"))))
                    })
                    .collect(),
            ),
        );
        for (key, version, req) in [
            (ApiKey::Fetch, 12, &fetch),
            (ApiKey::Fetch, 4, &fetch),
            (ApiKey::Metadata, 12, &metadata(&vec!["t"; 150_000], false)),
        ] {
            let frame = request_frame(key, version, req);
            let e = classify(frame, &limits, &mut allow_all).unwrap_err();
            assert!(matches!(e, KafkaError::TooManyItems { .. }), "{key:?} v{version}: {e}");
        }
        // Unknown tagged fields count too (each is a map entry once decoded).
        let mut tagged = BytesMut::new();
        RequestHeader::default()
            .with_request_api_key(ApiKey::ApiVersions as i16)
            .with_request_api_version(3)
            .encode(&mut tagged, 2)
            .unwrap();
        // The header's own (empty) tagged fields, replaced by 200,000 (an unsigned varint).
        tagged.truncate(tagged.len() - 1);
        tagged.put_slice(&[0xc0, 0x9a, 0x0c]);
        for tag in 0..200_000u32 {
            let mut v = tag;
            loop {
                let b = (v & 0x7f) as u8;
                v >>= 7;
                if v == 0 {
                    tagged.put_u8(b);
                    break;
                }
                tagged.put_u8(b | 0x80);
            }
            tagged.put_u8(0);
        }
        let e = classify(tagged.freeze(), &limits, &mut allow_all).unwrap_err();
        assert!(matches!(e, KafkaError::TooManyItems { .. }), "{e}");
    }

    /// One flow per topic up to [`FLOWS_PER_REQUEST`], then counts; only the denied items are
    /// kept for the answer, and the forwarded request names only the allowed ones.
    #[test]
    fn flows_are_capped_and_only_denied_items_are_kept() {
        let limits = KafkaLimits::default();
        let frame = request_frame(ApiKey::Produce, 7, &produce(100, 3, 10));
        let c = classify(frame, &limits, &mut odd_denied).unwrap();
        assert_eq!(c.judgments.len(), FLOWS_PER_REQUEST);
        assert_eq!((c.unrecorded, c.unrecorded_denied), (100 - FLOWS_PER_REQUEST, (100 - FLOWS_PER_REQUEST) / 2));
        let Action::Forward { frame, expect: Some(expect) } = c.action else { panic!("{:?}", c.action) };
        let RequestKind::Produce(kept) = &expect.denied.as_ref().unwrap().request else { panic!() };
        assert_eq!(kept.topic_data.len(), 50);
        assert!(kept.topic_data.iter().all(|t| odd_denied(&KafkaRequest {
            api_key: 0,
            version: 7,
            client_id: "",
            topic: Some(&t.name.0)
        }) != Decision::Allow { policy: None }));
        let mut forwarded = frame.slice(4..);
        RequestHeader::decode(&mut forwarded, 1).unwrap();
        let RequestKind::Produce(sent) = RequestKind::decode(ApiKey::Produce, &mut forwarded, 7).unwrap() else {
            panic!()
        };
        assert_eq!(sent.topic_data.len(), 50);
        assert!(sent.topic_data.iter().all(|t| t.name.0.trim_start_matches('t').parse::<u32>().unwrap() % 2 == 0));
        // The broker's answer gets the denied topics' errors merged in.
        let mut answer = BytesMut::new();
        ResponseHeader::default().with_correlation_id(9).encode(&mut answer, 0).unwrap();
        kafka_protocol::messages::ProduceResponse::default().encode(&mut answer, 7).unwrap();
        let merged = rewrite_response(answer.clone().freeze(), &expect, &limits).unwrap();
        let mut merged = merged.slice(4..);
        ResponseHeader::decode(&mut merged, 0).unwrap();
        let r = kafka_protocol::messages::ProduceResponse::decode(&mut merged, 7).unwrap();
        assert_eq!(r.responses.len(), 50);
        assert!(r.responses.iter().flat_map(|t| &t.partition_responses).all(|p| p.error_code == 29));
        // A merged answer past the response bound closes instead.
        let small = KafkaLimits { max_response_frame: 100, ..limits };
        let e = rewrite_response(answer.freeze(), &expect, &small).unwrap_err();
        assert!(matches!(e, KafkaError::FrameTooLarge { limit: Limit::KafkaResponseFrame, .. }), "{e}");
    }

    /// A hostile broker's answer to a request with denied topics (which the proxy decodes to
    /// merge their errors in) is decoded within `--max-kafka-items` like a request: a million
    /// empty topics, 6 MB on the wire (within the response frame bound), close the connection
    /// at the count, before the entries are built; ApiVersions answers (always decoded) too.
    #[test]
    fn a_hostile_brokers_answer_to_merge_is_within_the_item_bound() {
        let limits = KafkaLimits::default();
        let frame = request_frame(ApiKey::Produce, 7, &produce(4, 1, 0));
        let c = classify(frame, &limits, &mut odd_denied).unwrap();
        let Action::Forward { expect: Some(expect), .. } = c.action else { panic!("{:?}", c.action) };
        assert!(expect.denied.is_some(), "merged");
        // Produce v7 response, written by hand as a hostile broker would (6 bytes a topic).
        let answer = |topics: usize| {
            let mut b = BytesMut::new();
            b.put_i32(9); // correlation id
            b.put_i32(topics as i32);
            for _ in 0..topics {
                b.put_i16(0); // an empty name
                b.put_i32(0); // no partitions
            }
            b.put_i32(0); // throttle time
            b.freeze()
        };
        let huge = answer(1_000_000);
        assert!(huge.len() < limits.max_response_frame);
        let started = Instant::now();
        let e = rewrite_response(huge, &expect, &limits).unwrap_err();
        assert!(matches!(e, KafkaError::TooManyItems { what: "a response to merge", max: 100_000 }), "{e}");
        assert_eq!(e.limit(), Some(Limit::KafkaItems));
        assert!(started.elapsed() < Duration::from_millis(200), "refused at the count: {:?}", started.elapsed());
        // Within the bound it merges: the broker's entries and the denied topics' errors.
        let merged = rewrite_response(answer(1000), &expect, &limits).unwrap();
        let mut merged = merged.slice(4..);
        ResponseHeader::decode(&mut merged, 0).unwrap();
        let r = kafka_protocol::messages::ProduceResponse::decode(&mut merged, 7).unwrap();
        assert_eq!(r.responses.len(), 1000 + 2);
        // ApiVersions: decoded to cap the versions, under the same bound.
        let api_versions = Expect { api_key: ApiKey::ApiVersions, version: 0, correlation_id: 9, denied: None };
        let mut b = BytesMut::new();
        b.put_i32(9);
        b.put_i16(0); // no error
        b.put_i32(1_000_000);
        for _ in 0..1_000_000 {
            b.put_slice(&[0, 0, 0, 0, 0, 0]); // api key, min and max version
        }
        let e = rewrite_response(b.freeze(), &api_versions, &limits).unwrap_err();
        assert!(matches!(e, KafkaError::TooManyItems { what: "a response to merge", .. }), "{e}");
    }

    /// An answer made here (every topic denied) is within the response bound, or the
    /// connection closes: a small request cannot make the proxy send an unbounded answer.
    #[test]
    fn answers_made_here_stay_within_the_response_bound() {
        let limits = KafkaLimits { max_response_frame: 4096, ..KafkaLimits::default() };
        let deny_all = &mut |_: &KafkaRequest| Decision::Deny { policy: "p".into() };
        let small = classify(request_frame(ApiKey::Produce, 7, &produce(3, 1, 0)), &limits, deny_all).unwrap();
        assert!(matches!(small.action, Action::Answer(_)));
        let big = classify(request_frame(ApiKey::Produce, 7, &produce(200, 20, 0)), &limits, deny_all).unwrap_err();
        assert!(matches!(big, KafkaError::FrameTooLarge { limit: Limit::KafkaResponseFrame, .. }), "{big}");
    }

    /// Judging the largest frame the bounds allow (16 MiB, topics x partitions near the item
    /// bound, half of them denied so it is rewritten) takes far more than a millisecond, which
    /// is why frames from [`BLOCKING_FRAME`] on are judged off the event loop. Prints the time.
    #[test]
    fn large_frames_are_judged_in_bounded_time() {
        let limits = KafkaLimits::default();
        // 1000 topics x 90 partitions x 170 record bytes: about 16 MiB, 91,000 items.
        let frame = request_frame(ApiKey::Produce, 7, &produce(1000, 90, 170));
        assert!(frame.len() <= limits.max_request_frame && frame.len() > 15 << 20, "{}", frame.len());
        let started = Instant::now();
        let c = classify(frame.clone(), &limits, &mut odd_denied).unwrap();
        let rewritten = started.elapsed();
        assert!(matches!(c.action, Action::Forward { .. }));
        let started = Instant::now();
        classify(frame.clone(), &limits, &mut allow_all).unwrap();
        let allowed = started.elapsed();
        let small = request_frame(ApiKey::Produce, 7, &produce(2, 2, 100));
        let started = Instant::now();
        classify(small, &limits, &mut odd_denied).unwrap();
        let tiny = started.elapsed();
        println!(
            "judging a {} byte frame: {rewritten:?} rewritten, {allowed:?} allowed; a small one {tiny:?}",
            frame.len()
        );
        assert!(rewritten < Duration::from_secs(10), "{rewritten:?}");
        // A frame just under the threshold stays on the event loop: it must be quick there.
        let under = request_frame(ApiKey::Produce, 7, &produce(20, 20, 250));
        assert!(under.len() < BLOCKING_FRAME, "{}", under.len());
    }

    /// Once a frame's first byte is in, the rest must come within the deadline; waiting for that
    /// first byte (a consumer idle between requests) has none.
    #[tokio::test]
    async fn a_begun_frame_has_a_deadline_and_idle_has_none() {
        let deadline = Some((Duration::from_millis(200), Limit::KafkaFrameTimeout));
        let (mut w, mut rd) = tokio::io::duplex(1024);
        // Idle for longer than the deadline: still waiting, no error.
        let idle = tokio::time::timeout(
            Duration::from_millis(500),
            read_frame(&mut rd, 1 << 20, Limit::KafkaRequestFrame, deadline),
        )
        .await;
        assert!(idle.is_err(), "an idle connection was cut: {idle:?}");
        // Then a frame whose length and half the body come, and nothing more.
        w.write_all(&100i32.to_be_bytes()).await.unwrap();
        w.write_all(&[1u8; 50]).await.unwrap();
        let started = Instant::now();
        let e = read_frame(&mut rd, 1 << 20, Limit::KafkaRequestFrame, deadline).await.unwrap_err();
        assert!(matches!(e, KafkaError::Timeout { limit: Limit::KafkaFrameTimeout, .. }), "{e}");
        assert_eq!(e.limit(), Some(Limit::KafkaFrameTimeout));
        assert!(e.to_string().contains("--kafka-frame-timeout"), "{e}");
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(190) && took < Duration::from_secs(2), "{took:?}");
        // A frame that arrives in time, in pieces, is read whole.
        let (mut w, mut rd) = tokio::io::duplex(1024);
        let writer = tokio::spawn(async move {
            w.write_all(&[0, 0]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            w.write_all(&[0, 3, 1, 2]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            w.write_all(&[3]).await.unwrap();
            w
        });
        let f = read_frame(&mut rd, 1 << 20, Limit::KafkaRequestFrame, deadline).await.unwrap().unwrap();
        assert_eq!(&f[..], &[1, 2, 3]);
        drop(writer.await.unwrap());
    }

    /// A peer's hang-up or reset ends the connection as it carried it; bounds and refusals
    /// are denials.
    #[test]
    fn a_peer_closing_is_not_a_denial() {
        use std::io::{Error, ErrorKind};
        for kind in [ErrorKind::BrokenPipe, ErrorKind::ConnectionReset, ErrorKind::ConnectionAborted] {
            assert!(KafkaError::Io(Error::from(kind)).is_peer_close(), "{kind:?}");
        }
        assert!(!KafkaError::Io(Error::from(ErrorKind::PermissionDenied)).is_peer_close());
        assert!(!KafkaError::TooManyItems { what: "a request", max: 1 }.is_peer_close());
        assert!(!KafkaError::Malformed("x".into()).is_peer_close());
    }

    /// Large frames being read share one budget across connections: at the bound the next one
    /// waits until one is judged; small frames never wait.
    #[tokio::test]
    async fn large_frames_share_one_budget() {
        let budget = FrameBudget::new(150 << 10);
        let framed = |n: usize| [&(n as i32).to_be_bytes()[..], &vec![1u8; n]].concat();
        let big = framed(100 << 10);
        let (a, held_a) =
            read_frame_held(&mut &big[..], 1 << 20, Limit::KafkaRequestFrame, None, Some((&budget, &|| {})))
                .await
                .unwrap()
                .unwrap();
        assert_eq!(a.len(), 100 << 10);
        assert!(!held_a.waited);
        // A small frame goes by while the budget is short.
        let small = framed(1000);
        let (_, held) =
            read_frame_held(&mut &small[..], 1 << 20, Limit::KafkaRequestFrame, None, Some((&budget, &|| {})))
                .await
                .unwrap()
                .unwrap();
        assert!(!held.waited);
        // A second large one waits, past its deadline if nothing is released.
        let deadline = Some((Duration::from_millis(200), Limit::KafkaFrameTimeout));
        let e = read_frame_held(&mut &big[..], 1 << 20, Limit::KafkaRequestFrame, deadline, Some((&budget, &|| {})))
            .await
            .err()
            .unwrap();
        assert!(matches!(e, KafkaError::Timeout { limit: Limit::KafkaFrameTimeout, .. }), "{e}");
        // Once the first is judged (its share dropped) the next one is read.
        let release = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            drop(held_a);
        });
        let (b, held_b) =
            read_frame_held(&mut &big[..], 1 << 20, Limit::KafkaRequestFrame, None, Some((&budget, &|| {})))
                .await
                .unwrap()
                .unwrap();
        assert_eq!(b.len(), 100 << 10);
        assert!(held_b.waited);
        release.await.unwrap();
        // A frame larger than the whole budget takes all of it rather than waiting forever.
        drop(held_b);
        let huge = framed(200 << 10);
        let (c, _) = read_frame_held(&mut &huge[..], 1 << 20, Limit::KafkaRequestFrame, None, Some((&budget, &|| {})))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(c.len(), 200 << 10);
    }
}

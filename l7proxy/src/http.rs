//! The HTTP/1.1 and HTTP/2 (and gRPC) stack: hyper serves the downstream connection (HTTP/1.1,
//! or HTTP/2 with prior knowledge), every request is checked against the current policy tables,
//! denials are answered here (403, or a gRPC PERMISSION_DENIED), and allowed requests go to
//! the original destination over pooled upstream connections (per original destination), in
//! the downstream's own protocol version (gRPC is never downgraded).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tracing::{debug, warn};

pub use crate::body::{MalformedTrailers, RequestBody};
use crate::canonical::{self, HostFields};
use crate::context::{Direction, Shared};
use crate::flows::{Endpoint, FlowRecord, HttpFlow, L7Flow, ProxyInfo, Reason};
use crate::framing::{Scanner, ScanningStream, Verdicts};
pub use crate::limits::HttpLimits;
use crate::metrics::{direction_label, ContextLabels, Parties, RequestFacts, RequestLabels, VerdictLabel};
use crate::registry::WorkloadInfo;
use crate::tables::{Decision, RequestInfo};
use l7mesh_api::Verdict;

type Body = BoxBody<Bytes, hyper::Error>;

use crate::respond::Refused;
pub use crate::respond::ACCESS_DENIED;

/// One downstream connection's view of the world.
pub struct HttpConnection {
    pub shared: Arc<Shared>,
    pub direction: Direction,
    pub peer: SocketAddr,
    pub target: SocketAddr,
    pub via: &'static str,
    pub src: Option<Arc<WorkloadInfo>>,
    pub dst: Option<Arc<WorkloadInfo>>,
    /// Framing verdicts of the HTTP/1 request heads, in order (see `framing`).
    verdicts: Verdicts,
    /// `originatingTLS`: requests go upstream over TLS.
    pub originate: Option<crate::tls::Originate>,
    /// `https` when the proxy terminated TLS from the client: the scheme flows show.
    pub scheme: &'static str,
    /// The server name of the client's ClientHello, when the proxy terminated its TLS: every
    /// request on the connection must be for that name (421 otherwise).
    pub server_name: Option<String>,
    /// The source address of this client's upstream connections (its own, where it can be).
    pub upstream_source: crate::upstream::UpstreamSource,
    /// The `X-Forwarded-For` / `Forwarded` values naming this client, made once.
    forwarded: crate::client_addr::ForwardedFields,
}

impl HttpConnection {
    /// Records a request refused for its framing or syntax (400, or an HTTP/2 stream reset
    /// recorded as code 0) as a flow and in the metrics.
    fn refused(&self, reason: String, method: &str, url: &str, code: u16, version: Version) {
        warn!(peer = %self.peer, %reason, "malformed request refused");
        let shared = &self.shared;
        let labels = RequestLabels {
            protocol: "http",
            direction: direction_label(self.direction),
            verdict: VerdictLabel(Verdict::Denied),
        };
        let context = self.context(RequestFacts { method, code, grpc_status: None });
        shared.metrics.requests.with(labels, context, |c| c.inc());
        shared.flows.push(FlowRecord {
            reason: Some(reason.into()),
            l7: Some(L7Flow::Http {
                http: HttpFlow {
                    method: http::Method::from_bytes(method.as_bytes()).unwrap_or_default(),
                    url: url.to_string(),
                    code,
                    protocol: protocol_name(version),
                },
            }),
            ..FlowRecord::proxied(
                Verdict::Denied,
                self.direction,
                Endpoint::new(self.peer, None).named(self.src.clone()),
                Endpoint::new(self.target, None).named(self.dst.clone()),
                Some(ProxyInfo { original_dst_via: self.via, upstream: None }),
            )
        });
    }

    /// The `--metrics-context` labels of a request on this connection (none unless configured).
    fn context(&self, facts: RequestFacts<'_>) -> ContextLabels {
        let context = &self.shared.metrics.context;
        if context.is_empty() {
            return Vec::new();
        }
        let parties =
            Parties { direction: self.direction, source: self.src.as_deref(), destination: self.dst.as_deref() };
        context.request(parties, facts)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn new(
        shared: Arc<Shared>,
        direction: Direction,
        peer: SocketAddr,
        target: SocketAddr,
        via: &'static str,
        src: Option<Arc<WorkloadInfo>>,
        dst: Option<Arc<WorkloadInfo>>,
    ) -> Self {
        let upstream_source = crate::client_addr::upstream_source(direction, peer.ip(), target, &shared.proxy);
        HttpConnection {
            upstream_source,
            forwarded: crate::client_addr::ForwardedFields::new(peer.ip()),
            shared,
            direction,
            peer,
            target,
            via,
            src,
            dst,
            verdicts: Verdicts::default(),
            originate: None,
            scheme: "http",
            server_name: None,
        }
    }
}

/// One request's flow and metrics: set once by whichever path answers the request, recorded
/// once when `handle` ends and drops it, so no path records twice or forgets to. A request
/// sent upstream whose answer never came back through the proxy (its client went away, or its
/// connection was closed, mid-forward: the future dropped) still reached the upstream, so it
/// records its flow without a status and with [`GONE_BEFORE_THE_ANSWER`] as the reason.
struct RequestLog<'a> {
    conn: &'a HttpConnection,
    outcome: Option<Outcome>,
}

// One per request, in its already boxed future: boxing the flow would cost an allocation each.
#[allow(clippy::large_enum_variant)]
enum Outcome {
    /// Refused for its framing or syntax before the rules judged it (`HttpConnection::refused`).
    Refused { reason: String, method: String, url: String, code: u16, version: Version },
    /// Judged by the rules and answered: the flow, and the labels and latency of its metrics.
    Judged { flow: FlowRecord, protocol: &'static str, verdict: Verdict, code: u16, elapsed: Duration },
    /// Judged by the rules and sent upstream, the answer not back yet (the flow's code is 0).
    Forwarded { flow: FlowRecord, protocol: &'static str, verdict: Verdict, started: Instant },
}

/// The reason of a request sent upstream whose answer never came back through the proxy.
pub const GONE_BEFORE_THE_ANSWER: &str = "the client went away before the answer (or the connection was closed)";

impl<'a> RequestLog<'a> {
    fn new(conn: &'a HttpConnection) -> Self {
        RequestLog { conn, outcome: None }
    }

    /// Sent upstream: recorded as such unless an answer or a refusal replaces it.
    fn forwarding(&mut self, flow: FlowRecord, protocol: &'static str, verdict: Verdict, started: Instant) {
        self.outcome = Some(Outcome::Forwarded { flow, protocol, verdict, started });
    }

    fn refused(&mut self, reason: String, method: &str, url: &str, code: u16, version: Version) {
        self.outcome =
            Some(Outcome::Refused { reason, method: method.to_string(), url: url.to_string(), code, version });
    }
}

impl Drop for RequestLog<'_> {
    fn drop(&mut self) {
        let conn = self.conn;
        let outcome = match self.outcome.take() {
            Some(Outcome::Forwarded { mut flow, protocol, verdict, started }) => {
                let elapsed = started.elapsed();
                flow.latency_ns = Some(elapsed.as_nanos() as u64);
                flow.reason = Some(GONE_BEFORE_THE_ANSWER.into());
                Some(Outcome::Judged { flow, protocol, verdict, code: 0, elapsed })
            }
            other => other,
        };
        match outcome {
            None | Some(Outcome::Forwarded { .. }) => {}
            Some(Outcome::Refused { reason, method, url, code, version }) => {
                conn.refused(reason, &method, &url, code, version)
            }
            Some(Outcome::Judged { flow, protocol, verdict, code, elapsed }) => {
                let labels = RequestLabels {
                    protocol,
                    direction: direction_label(conn.direction),
                    verdict: VerdictLabel(verdict),
                };
                let context = match &flow.l7 {
                    _ if conn.shared.metrics.context.is_empty() => Vec::new(),
                    Some(L7Flow::Http { http }) => {
                        conn.context(RequestFacts { method: http.method.as_str(), code, grpc_status: None })
                    }
                    Some(L7Flow::Grpc { grpc }) => {
                        conn.context(RequestFacts { method: "POST", code, grpc_status: grpc.status.as_deref() })
                    }
                    _ => conn.context(RequestFacts { method: "", code, grpc_status: None }),
                };
                let metrics = &conn.shared.metrics;
                metrics.requests.with(labels.clone(), context.clone(), |c| c.inc());
                metrics.request_duration.with(labels, context, |h| h.observe(elapsed.as_secs_f64()));
                conn.shared.flows.push(flow);
            }
        }
    }
}

/// Serves one downstream connection until it closes.
pub async fn serve<S>(downstream: S, conn: Arc<HttpConnection>) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let downstream = ScanningStream::new(downstream, Some(Scanner::new(conn.verdicts.clone())));
    let for_service = conn.clone();
    let service = hyper::service::service_fn(move |req| {
        let conn = for_service.clone();
        // Boxed: hyper moves the service future into each stream's task; a pointer is cheaper
        // to move than this state machine (memmove was 13% of the HTTP/2 profile).
        Box::pin(handle(conn, req))
    });
    let limits = conn.shared.limits;
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // A client may send its (pipelined) requests and half-close: answer all of them.
    builder
        .http1()
        .half_close(true)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        // Never above the framing scanner's bound: a head it gives up on, hyper refuses.
        .max_buf_size(limits.max_header_bytes.clamp(8192, crate::framing::MAX_HEAD))
        .max_headers(limits.max_headers);
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(limits.max_header_bytes as u32);
    let result = builder.serve_connection(TokioIo::new(downstream), service).await;
    match result {
        Ok(()) => Ok(()),
        Err(e) => {
            // hyper answered a request it could not parse with 400 and closed: a flow too.
            let parse = e.downcast_ref::<hyper::Error>().is_some_and(|h| h.is_parse() || h.is_parse_too_large());
            if parse {
                conn.refused(e.to_string(), "", "", 400, Version::HTTP_11);
            }
            Err(e.to_string())
        }
    }
}

fn full(text: &'static str) -> Body {
    Full::new(Bytes::from_static(text.as_bytes())).map_err(|never| match never {}).boxed()
}

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// A trailers-only gRPC response (HTTP 200, status in the headers).
fn grpc_status(code: u8, message: &str) -> Response<Body> {
    let mut resp = Response::new(empty());
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert("grpc-status", HeaderValue::from(u16::from(code)));
    if let Ok(v) = HeaderValue::from_str(&percent_encode(message)) {
        h.insert("grpc-message", v);
    }
    resp
}

/// gRPC's grpc-message encoding: printable ASCII except '%' as is, the rest %XX.
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| if (0x20..0x7f).contains(&b) && b != b'%' { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

/// True when a Connection field lists Host (which would make the judged authority hop-by-hop).
fn connection_names_host(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|name| name.trim().eq_ignore_ascii_case("host"))
}

/// Connection-specific headers (RFC 9110 §7.6.1) are never forwarded.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .collect();
    for name in listed {
        headers.remove(name.as_str());
    }
    for name in ["connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"] {
        headers.remove(name);
    }
    // `te: trailers` is the one TE value that may cross (gRPC needs it).
    if headers.get(header::TE).is_some_and(|v| v.as_bytes() != b"trailers") {
        headers.remove(header::TE);
    }
}

/// Message framing a proxy must not guess at (RFC 9112 §6): each would let a lenient upstream
/// see a different request boundary than ours. Stricter than the RFC where it allows a choice.
fn framing_problem(req: &Request<Incoming>) -> Option<&'static str> {
    if req.version() != Version::HTTP_11 && req.version() != Version::HTTP_10 {
        return None;
    }
    let h = req.headers();
    let cl = h.get_all(header::CONTENT_LENGTH).iter().count();
    let te = h.get_all(header::TRANSFER_ENCODING).iter().count();
    if cl > 1 {
        return Some("duplicate Content-Length");
    }
    if h.get(header::CONTENT_LENGTH).is_some_and(|v| v.as_bytes().contains(&b',')) {
        return Some("Content-Length list");
    }
    if te > 1 {
        return Some("repeated Transfer-Encoding");
    }
    if te == 1 && cl == 1 {
        return Some("both Content-Length and Transfer-Encoding");
    }
    if let Some(v) = h.get(header::TRANSFER_ENCODING) {
        if req.version() == Version::HTTP_10 {
            return Some("Transfer-Encoding in an HTTP/1.0 request");
        }
        if !v.to_str().is_ok_and(|t| t.trim().eq_ignore_ascii_case("chunked")) {
            return Some("unsupported transfer coding (only chunked)");
        }
    }
    None
}

fn protocol_name(version: Version) -> &'static str {
    match version {
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    }
}

/// How hyper is told to reset an HTTP/2 stream: the service fails with an h2 error whose
/// reason hyper puts in the RST_STREAM.
fn stream_reset() -> h2::Error {
    h2::Error::from(h2::Reason::PROTOCOL_ERROR)
}

fn bad_request() -> Response<Body> {
    // Nothing after a request we could not frame may be read as a request (the answer closes).
    answer(&Refused::Malformed, false)
}

/// The proxy's own answer to a refused request, as `respond` says it (gRPC: trailers-only).
fn answer(refused: &Refused, grpc: bool) -> Response<Body> {
    if grpc {
        let (code, message) = refused.grpc();
        return grpc_status(code, &message);
    }
    let a = refused.http();
    let mut resp = text(StatusCode::from_u16(a.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), a.body);
    if a.close {
        resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// Answers one request. An `Err` resets its HTTP/2 stream (never returned for HTTP/1).
async fn handle(conn: Arc<HttpConnection>, req: Request<Incoming>) -> Result<Response<Body>, h2::Error> {
    let started = Instant::now();
    let shared = &conn.shared;
    let mut log = RequestLog::new(&conn);
    let scanned = if req.version() == Version::HTTP_11 || req.version() == Version::HTTP_10 {
        conn.verdicts.lock().ok().and_then(|mut v| v.pop_front()).flatten()
    } else {
        None
    };
    if let Some(problem) = scanned.or_else(|| framing_problem(&req)) {
        log.refused(problem.to_string(), req.method().as_str(), &req.uri().to_string(), 400, req.version());
        return Ok(bad_request());
    }
    // CONNECT would turn the connection into an unpoliced tunnel: refused, deliberately.
    // (Upgrade requests are forwarded as plain requests: the Upgrade header is hop-by-hop and
    // stripped, so no protocol switch happens through the proxy.)
    if req.method() == http::Method::CONNECT {
        log.refused(
            "CONNECT is not supported through the proxy".into(),
            "CONNECT",
            &req.uri().to_string(),
            405,
            req.version(),
        );
        return Ok(answer(&Refused::MethodNotAllowed, false));
    }
    let tables = shared.registry.tables();
    let version = req.version();
    let grpc = is_grpc(req.headers()) && version == Version::HTTP_2;
    // Hop-by-hop fields go before the rules see the request, so that what they judge is what
    // is forwarded; a Connection field naming Host would strip the judged authority.
    let mut req = req;
    if connection_names_host(req.headers()) {
        log.refused("Connection names Host".into(), req.method().as_str(), &req.uri().to_string(), 400, version);
        return if version == Version::HTTP_2 { Err(stream_reset()) } else { Ok(bad_request()) };
    }
    strip_hop_by_hop(req.headers_mut());
    // Who the client is, as the upstream is told it (a client's own claim replaced or kept as
    // --forwarded-headers says), before the rules judge the fields: they see what is sent.
    crate::client_addr::set_forwarded(req.headers_mut(), &conn.forwarded, shared.client_address.forwarded);
    // The URI and Host field outlive the request (it moves upstream) for the decision and the
    // flow record: both clones share their bytes.
    let uri = req.uri().clone();
    let hosts = HostFields::of(req.headers());
    // What the rules judge is what the upstream gets (see `canonical`).
    let checked = canonical::canonicalize(version, req.method(), &uri, &hosts, conn.target.port()).and_then(|c| {
        if version == Version::HTTP_2 {
            canonical::check_h2_fields(req.headers())?;
        }
        Ok(c)
    });
    let mut canonical = match checked {
        Ok(c) => c,
        Err(problem) => {
            log.refused(
                problem.to_string(),
                req.method().as_str(),
                &uri.to_string(),
                if version == Version::HTTP_2 { 0 } else { 400 },
                version,
            );
            return if version == Version::HTTP_2 { Err(stream_reset()) } else { Ok(bad_request()) };
        }
    };
    if let Some(sni) = conn.server_name.as_deref().filter(|sni| !canonical::same_name(canonical.name, sni)) {
        let reason = format!("request for `{}` on a TLS connection for `{sni}`", canonical.name);
        log.refused(reason, req.method().as_str(), &uri.to_string(), 421, version);
        let mut resp = text(StatusCode::MISDIRECTED_REQUEST, "Misdirected Request\r\n");
        if version != Version::HTTP_2 {
            resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        return Ok(resp);
    }
    let path: &str = &canonical.path_and_query;
    let host: &str = &canonical.host;
    let grpc_parts = grpc.then(|| {
        let p = path.split_once('?').map(|(p, _)| p).unwrap_or(path).trim_start_matches('/');
        p.split_once('/').unwrap_or((p, ""))
    });
    // A gRPC path is `/service/method`: with more segments, servers that split at the last `/`
    // would see another service than the rules.
    if grpc_parts.is_some_and(|(_, method)| method.contains('/')) {
        log.refused(format!("gRPC path `{path}` is not /service/method"), "POST", &uri.to_string(), 0, version);
        return Err(stream_reset());
    }
    // Resolved against the tables judging this request: a new version renumbers workloads.
    let parties = match tables.parties(
        conn.src.as_ref().map(|w| w.cgroup_id),
        conn.peer.ip(),
        conn.dst.as_ref().map(|w| w.cgroup_id),
        conn.target.ip(),
    ) {
        Ok(p) => p,
        Err(gone) => {
            log.refused(gone.to_string(), req.method().as_str(), &uri.to_string(), 403, version);
            if version == Version::HTTP_2 {
                return Err(stream_reset());
            }
            return Ok(answer(&Refused::PartiesGone, false));
        }
    };
    let info = RequestInfo { method: req.method().as_str(), path, host, headers: req.headers(), grpc: grpc_parts };
    let (decision, side) = tables.decide_sided(&parties, conn.target.port(), &info);
    // A denial or audit names its rule list and why none of its rules matched (the same
    // checks, asked again on this path only).
    let why = tables.explain(&parties, conn.target.port(), &info, &decision);
    // The flow's direction is the side whose rules decided (the server's ingress rules judge
    // after the client's egress ones on one proxy hop).
    let direction = why.as_ref().map(|e| e.direction).or(side).unwrap_or(conn.direction);
    let method = req.method().clone();
    let verdict = decision.verdict();
    if let Some(target) = canonical.rewrite.take() {
        *req.uri_mut() = target;
    }
    let protocol = if grpc { "grpc" } else { "http" };
    // The request's flow, with its answer's status once there is one (0 while it is upstream).
    let flow =
        |policy_name: Option<Arc<str>>, code: u16, grpc_code: Option<String>, upstream_local, elapsed: Duration| {
            let l7 = match grpc_parts {
                Some((service, method)) => L7Flow::grpc(service, method, host, grpc_code),
                None => L7Flow::Http {
                    http: HttpFlow {
                        method: method.clone(),
                        // The authority as sent (rules saw it canonicalized), the path as judged.
                        url: format!(
                            "{}://{}{path}",
                            conn.scheme,
                            uri.authority()
                                .map(|a| a.as_str())
                                .or_else(|| hosts.first.as_ref().and_then(|h| h.to_str().ok()))
                                .unwrap_or_default()
                        ),
                        code,
                        protocol: protocol_name(version),
                    },
                },
            };
            FlowRecord {
                policy_name,
                decided_by: why.as_ref().map(|e| e.decided_by.clone()),
                reason: why.as_ref().map(|e| Reason::Policy(e.reason.clone())),
                latency_ns: Some(elapsed.as_nanos() as u64),
                l7: Some(l7),
                ..FlowRecord::proxied(
                    verdict,
                    direction,
                    Endpoint::new(conn.peer, None).named(conn.src.clone()),
                    Endpoint::new(conn.target, None).named(conn.dst.clone()),
                    Some(ProxyInfo { original_dst_via: conn.via, upstream: upstream_local }),
                )
            }
        };
    let (response, policy, upstream_local) = match decision {
        Decision::Deny { policy } => {
            let resp = answer(&Refused::Denied { policy: policy.to_string() }, grpc);
            (resp, Some(policy), None)
        }
        Decision::Allow { policy } => {
            log.forwarding(flow(policy.clone(), 0, None, None, Duration::ZERO), protocol, verdict, started);
            let (resp, local) = forward(&conn, req, &mut log).await?;
            (resp, policy, local)
        }
        Decision::Audit { policy } => {
            debug!(%policy, "audit: a request the policy would deny, let through");
            log.forwarding(flow(Some(policy.clone()), 0, None, None, Duration::ZERO), protocol, verdict, started);
            let (resp, local) = forward(&conn, req, &mut log).await?;
            (resp, Some(policy), local)
        }
    };
    let elapsed = started.elapsed();
    let code = response.status().as_u16();
    let grpc_code = response.headers().get("grpc-status").and_then(|v| v.to_str().ok()).map(str::to_string);
    // A forwarded request's flow was built before it went upstream: completed in place, so the
    // hot path builds one flow a request (its URL is an allocation), not two.
    let flow = match log.outcome.take() {
        Some(Outcome::Forwarded { mut flow, .. }) => {
            flow.answered(code, grpc_code, upstream_local, elapsed);
            flow
        }
        _ => flow(policy, code, grpc_code, upstream_local, elapsed),
    };
    log.outcome = Some(Outcome::Judged { flow, protocol, verdict, code, elapsed });
    Ok(response)
}

/// The request's host name (authority, else Host header), without a port.
fn request_host<B>(req: &Request<B>) -> Option<String> {
    let authority = match req.uri().authority() {
        Some(a) => a.host().to_string(),
        None => {
            let host = req.headers().get(header::HOST)?.to_str().ok()?;
            host.parse::<http::uri::Authority>().ok()?.host().to_string()
        }
    };
    let host = authority.trim_start_matches('[').trim_end_matches(']').to_string();
    (!host.is_empty()).then_some(host)
}

/// Sends an allowed request upstream. `Err`: the HTTP/2 request turned out malformed on the
/// way (its trailers), and its stream is reset.
async fn forward(
    conn: &HttpConnection,
    req: Request<Incoming>,
    log: &mut RequestLog<'_>,
) -> Result<(Response<Body>, crate::pool::Local), h2::Error> {
    let malformed = (req.version() == Version::HTTP_2).then(|| Arc::new(AtomicBool::new(false)));
    let req = req.map(|inner| RequestBody::new(inner, malformed.clone()));
    let grpc = is_grpc(req.headers());
    let h2 = req.version() == Version::HTTP_2;
    let shared = &conn.shared;
    let tls = conn.originate.as_ref().map(|o| crate::pool::UpstreamTls {
        config: o.config.clone(),
        server_name: o
            .server_name
            .clone()
            // A client-chosen name: one form per name (case, trailing dot), so one name is one
            // pool key and one name to verify.
            .unwrap_or_else(|| {
                request_host(&req)
                    .map(|h| crate::pool::server_name_key(&h))
                    .unwrap_or_else(|| conn.target.ip().to_string())
            }),
        settings: o.settings.clone(),
        metrics: shared.metrics.clone(),
    });
    // The source workload owns the upstream connections its requests open (pool.rs).
    let owner = match &conn.src {
        Some(w) => crate::pool::Owner::Workload(w.clone()),
        None => crate::pool::Owner::Peer(conn.peer.ip()),
    };
    let sent = shared.pool.send(owner, conn.target, conn.upstream_source, &shared.proxy, req, h2, tls.as_ref());
    let result = match tokio::time::timeout(shared.limits.request_timeout, sent).await {
        Ok(r) => r,
        Err(_) => {
            warn!(target = %conn.target, "upstream did not answer in time");
            return Ok((answer(&Refused::UpstreamTimeout, grpc), None));
        }
    };
    match result {
        Ok((resp, local)) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Ok((Response::from_parts(parts, body.boxed()), local))
        }
        Err(e) if e.caused_by::<MalformedTrailers>() || malformed.is_some_and(|m| m.load(Ordering::Relaxed)) => {
            warn!(target = %conn.target, error = %e, "malformed request trailers: stream reset");
            log.refused(e.to_string(), "", "", 0, Version::HTTP_2);
            Err(stream_reset())
        }
        Err(e @ crate::pool::PoolError::WorkloadLimit { .. }) => {
            // Counted and logged by the pool: this workload's own requests wait, no one else's.
            Ok((answer(&Refused::WorkloadLimit(e.to_string()), grpc), None))
        }
        Err(e @ crate::pool::PoolError::ConnectTimeout { .. }) => {
            // Logged and counted by the pool; only this request (and those waiting for the
            // same connect) get this answer.
            Ok((answer(&Refused::ConnectTimeout(e.to_string()), grpc), None))
        }
        Err(e) => {
            warn!(target = %conn.target, error = %e, "upstream request failed");
            Ok((answer(&Refused::Unavailable, grpc), None))
        }
    }
}

//! The admin listener (127.0.0.1:15000): `/healthz`, `/readyz`, `/metrics` open to every
//! local process (health checks, Prometheus); `/v1/flows` and `/v1/counters` (who talked to
//! whom, and what was asked) only with the node's API token (`Authorization: Bearer`, from the
//! root-only `<run dir>/api-token` that policy-api also wants), read from its file at each
//! call so that a token policy-api made anew is the one in force.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::warn;

use crate::flows::{FlowFilter, FlowLog};
use crate::metrics::Metrics;

type Body = BoxBody<Bytes, Infallible>;

pub struct Admin {
    pub ready: AtomicBool,
    /// The policy version loaded from policy-api (0: none yet; `None`: the proxy runs without
    /// policy-api, as the redirector tests drive it).
    pub policy_version: Option<Arc<std::sync::atomic::AtomicU64>>,
    pub flows: Arc<FlowLog>,
    pub metrics: Arc<Metrics>,
    pub maps: Arc<dyn crate::datapath::Datapath>,
    /// The node's API token file.
    pub api_token_file: std::path::PathBuf,
    /// The flow history (`--flow-history-dir`), read by `/v1/flows?since=`.
    pub history: Option<crate::flow_history::History>,
    /// What `/v1/flows?cluster=true` asks the other nodes' proxies through (in a cluster).
    pub shared: Option<Arc<crate::context::Shared>>,
}

pub async fn serve(listener: TcpListener, admin: Arc<Admin>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => { warn!(error = %e, "admin accept failed"); continue; }
            },
            _ = shutdown.changed() => return,
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(route(&admin, req)) }
            });
            if let Err(e) =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await
            {
                warn!(error = %e, "admin connection");
            }
        });
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>, content_type: &'static str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

/// A streamed response body: one chunk per message until the sender goes.
struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    }
}

fn json_line(r: &crate::flows::FlowRecord) -> String {
    let mut line = serde_json::to_string(r).unwrap_or_default();
    line.push('\n');
    line
}

/// Streams the history's lines that `filter` matches, numbered before `before_seq` (the
/// oldest record the ring holds), into `tx` in chunks; false when the reader went away.
fn send_history(
    history: &crate::flow_history::History,
    filter: &FlowFilter,
    before_seq: u64,
    tx: &tokio::sync::mpsc::Sender<Bytes>,
) -> bool {
    const CHUNK: usize = 64 * 1024;
    let mut chunk = Vec::with_capacity(CHUNK);
    let mut open = true;
    history.read(filter, before_seq, |line| {
        chunk.extend_from_slice(line);
        chunk.push(b'\n');
        if chunk.len() >= CHUNK {
            open = tx.blocking_send(Bytes::from(std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK)))).is_ok();
        }
        open
    });
    open && (chunk.is_empty() || tx.blocking_send(Bytes::from(chunk)).is_ok())
}

/// The history to read, with a place among the reads at once.
type Reading = (crate::flow_history::History, tokio::sync::OwnedSemaphorePermit);

/// The history to read for `filter`: with `since` only (without it, `/v1/flows` is the ring's,
/// as it always was).
fn history_for(admin: &Admin, filter: &FlowFilter) -> Option<crate::flow_history::History> {
    admin.history.clone().filter(|_| filter.since.is_some())
}

fn streamed(rx: tokio::sync::mpsc::Receiver<Bytes>) -> Response<Body> {
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(ChannelBody(rx).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

/// `/v1/flows?since=` with a history: what the history keeps of the window, then the ring,
/// streamed (the window may be larger than memory should hold).
fn with_history(history: Reading, admin: &Admin, filter: FlowFilter) -> Response<Body> {
    let (first_held, held) = admin.flows.held(&filter);
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    tokio::task::spawn_blocking(move || {
        let (history, _place) = history;
        if send_history(&history, &filter, first_held, &tx) {
            let ring: String = held.iter().map(json_line).collect();
            if !ring.is_empty() {
                let _ = tx.blocking_send(Bytes::from(ring));
            }
        }
    });
    streamed(rx)
}

/// `/v1/flows?follow=true`: the matching records in the history (with `since`) and the ring,
/// then each new one as it comes, until the client goes away.
fn follow(admin: &Admin, filter: FlowFilter, history: Option<Reading>) -> Response<Body> {
    let (first_held, past, mut live) = admin.flows.follow(&filter);
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let filter = Arc::new(filter);
        if let Some((history, place)) = history {
            let (filter, tx) = (filter.clone(), tx.clone());
            let sent = tokio::task::spawn_blocking(move || {
                let _place = place;
                send_history(&history, &filter, first_held, &tx)
            })
            .await;
            if !matches!(sent, Ok(true)) {
                return;
            }
        }
        for r in &past {
            if tx.send(Bytes::from(json_line(r))).await.is_err() {
                return;
            }
        }
        loop {
            match live.recv().await {
                Ok(r) if filter.matches(&r) => {
                    if tx.send(Bytes::from(json_line(&r))).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    warn!(missed = n, "a flow follower fell behind");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    streamed(rx)
}

/// Every node's flows that match (this node's ring and, through the tunnel, each other
/// node's), each naming its node, oldest first. A node that does not answer is named in a
/// line of its own (`{"node": .., "error": ..}`) rather than failing the whole answer.
fn cluster_flows(admin: &Admin, filter: FlowFilter, query: String) -> Response<Body> {
    let Some(shared) = admin.shared.clone() else {
        return text(StatusCode::BAD_REQUEST, "cluster=true: this proxy runs without a cluster\n", "text/plain");
    };
    let Some((this_node, others)) = shared.registry.tables().cluster_nodes() else {
        return text(StatusCode::BAD_REQUEST, "cluster=true: this node is not in a cluster\n", "text/plain");
    };
    let local = admin.flows.snapshot(&filter);
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let named = |line: &str, node: &str| -> Option<(String, String)> {
            let mut v: serde_json::Value = serde_json::from_str(line).ok()?;
            let time = v.get("time")?.as_str()?.to_string();
            v.as_object_mut()?.insert("node".into(), serde_json::Value::String(node.to_string()));
            Some((time, v.to_string()))
        };
        let mut all: Vec<(String, String)> =
            local.iter().filter_map(|r| named(&serde_json::to_string(r).unwrap_or_default(), &this_node)).collect();
        let mut asks = tokio::task::JoinSet::new();
        for (node, ip, port) in others {
            let (shared, query) = (shared.clone(), query.clone());
            asks.spawn(async move {
                let got = crate::tunnel::fetch_flows(&shared, &node, ip, port, &query).await;
                (node, got)
            });
        }
        let mut errors = Vec::new();
        while let Some(done) = asks.join_next().await {
            match done {
                Ok((node, Ok(lines))) => all.extend(lines.iter().filter_map(|l| named(l, &node))),
                Ok((node, Err(e))) => errors.push(serde_json::json!({"node": node, "error": e}).to_string()),
                Err(e) => errors.push(serde_json::json!({"error": e.to_string()}).to_string()),
            }
        }
        all.sort_by(|a, b| a.0.cmp(&b.0));
        for line in errors.into_iter().chain(all.into_iter().map(|(_, l)| l)) {
            if tx.send(Bytes::from(line + "\n")).await.is_err() {
                return;
            }
        }
    });
    streamed(rx)
}

/// Why a `/v1/*` request is refused, if it is: its token is not the node's.
fn unauthorized(admin: &Admin, req: &Request<Incoming>) -> Option<Response<Body>> {
    let token = match l7mesh_api::token::read(&admin.api_token_file) {
        Ok(t) => t,
        Err(e) => {
            warn!(file = %admin.api_token_file.display(), error = %e, "no API token: /v1/* refused");
            let why = format!("l7proxy has no API token ({e}); /v1/* is refused until there is one\n");
            return Some(text(StatusCode::SERVICE_UNAVAILABLE, why, "text/plain"));
        }
    };
    let given = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| l7mesh_api::token::from_authorization(v.as_bytes()))
        .unwrap_or_default();
    if l7mesh_api::token::same(given, token.as_bytes()) {
        return None;
    }
    Some(text(
        StatusCode::UNAUTHORIZED,
        "/v1/* needs the node's API token (Authorization: Bearer, from <run dir>/api-token, readable by root only)\n",
        "text/plain",
    ))
}

fn route(admin: &Admin, req: Request<Incoming>) -> Response<Body> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n", "text/plain");
    }
    if req.uri().path().starts_with("/v1/") {
        if let Some(refused) = unauthorized(admin, &req) {
            return refused;
        }
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n", "text/plain"),
        // Ready: datapath attached, listeners up, and a policy generation loaded.
        "/readyz" => match (admin.ready.load(Ordering::Acquire), admin.maps.generation()) {
            (true, Ok(_)) if admin.policy_version.as_ref().is_some_and(|v| v.load(Ordering::Acquire) == 0) => {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready: no policy tables from policy-api yet\n", "text/plain")
            }
            (true, Ok(generation)) if generation > 0 => {
                text(StatusCode::OK, format!("ready: policy generation {generation}\n"), "text/plain")
            }
            (true, Ok(_)) => text(StatusCode::SERVICE_UNAVAILABLE, "not ready: no policy loaded yet\n", "text/plain"),
            (true, Err(e)) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n"), "text/plain"),
            (false, _) => {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready: datapath or listeners not up\n", "text/plain")
            }
        },
        // OpenMetrics for Prometheus (it asks for it), the classic text format for the rest
        // (promtool, curl).
        "/metrics" => {
            let accept = req.headers().get(hyper::header::ACCEPT).and_then(|v| v.to_str().ok());
            let text_out = admin.metrics.encode();
            if l7mesh_api::metrics::wants_openmetrics(accept) {
                text(StatusCode::OK, text_out, l7mesh_api::metrics::OPENMETRICS)
            } else {
                text(StatusCode::OK, l7mesh_api::metrics::to_classic_text(&text_out), l7mesh_api::metrics::CLASSIC_TEXT)
            }
        }
        "/v1/counters" => match admin.maps.counters() {
            Ok(c) => {
                let counters = l7mesh_api::rest::DatapathCounters(
                    c.values.iter().map(|(k, v)| (k.name().to_string(), *v)).collect(),
                );
                let json = serde_json::to_string(&counters).unwrap_or_default();
                text(StatusCode::OK, json + "\n", "application/json")
            }
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("reading BPF counters: {e}\n"), "text/plain"),
        },
        "/v1/flows" => {
            let filter = match FlowFilter::parse(req.uri().query().unwrap_or("")) {
                Ok(f) => f,
                Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n"), "text/plain"),
            };
            let history = match history_for(admin, &filter) {
                Some(history) => match history.reader() {
                    Some(place) => Some((history, place)),
                    None => {
                        return text(
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!(
                                "{} flow history reads are under way, the most at once: try again\n",
                                crate::flow_history::MAX_READERS
                            ),
                            "text/plain",
                        )
                    }
                },
                None => None,
            };
            if filter.cluster {
                if filter.follow {
                    return text(
                        StatusCode::BAD_REQUEST,
                        "cluster=true with follow=true is not served yet: follow one node at a time\n",
                        "text/plain",
                    );
                }
                let query: String = req
                    .uri()
                    .query()
                    .unwrap_or("")
                    .split('&')
                    .filter(|kv| !kv.starts_with("cluster="))
                    .collect::<Vec<_>>()
                    .join("&");
                return cluster_flows(admin, filter, query);
            }
            if filter.follow {
                return follow(admin, filter, history);
            }
            if let Some(history) = history {
                return with_history(history, admin, filter);
            }
            // JSON Lines: one flow per line, oldest first.
            let body: String = admin.flows.snapshot(&filter).iter().map(json_line).collect();
            text(StatusCode::OK, body, "application/x-ndjson")
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n", "text/plain"),
    }
}

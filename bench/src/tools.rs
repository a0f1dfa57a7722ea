//! Small load tools the benchmark runs inside the test node (as workloads where the l7proxy
//! variant needs it): an HTTP/2 responder (gRPC unary calls and plain requests), an open-loop
//! HTTP/1.1 client, and a holder of idle connections. Each prints one JSON line (or `ready`) on stdout.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::body::{Body, Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

/// The responder's reply: to a gRPC call one message (`HelloReply{message: "hello"}`) then
/// `grpc-status: 0` in the trailers; to any other request `ok\n` (as the nginx upstream of the
/// HTTP/1.1 scenarios answers).
struct Reply {
    grpc: bool,
    step: u8,
}

impl Body for Reply {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let step = self.step;
        self.step += 1;
        Poll::Ready(match (self.grpc, step) {
            (false, 0) => Some(Ok(Frame::data(Bytes::from_static(b"ok\n")))),
            // gRPC framing: not compressed, 4-byte length, then field 1 (string) "hello".
            (true, 0) => Some(Ok(Frame::data(Bytes::from_static(b"\x00\x00\x00\x00\x07\x0a\x05hello")))),
            (true, 1) => {
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                Some(Ok(Frame::trailers(trailers)))
            }
            _ => None,
        })
    }
}

/// An HTTP/2 (prior knowledge) server answering gRPC calls as successful unary calls and other
/// requests with `200 ok`.
pub fn h2_responder(addr: &str) -> Result<()> {
    runtime()?.block_on(async {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req: http::Request<Incoming>| async move {
                    let grpc = req
                        .headers()
                        .get(http::header::CONTENT_TYPE)
                        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
                    // Read the request message before answering, as a server does.
                    let _ = req.into_body().collect().await;
                    let mut resp = http::Response::new(Reply { grpc, step: 0 });
                    let content_type = if grpc { "application/grpc" } else { "text/plain" };
                    resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct OpenLoopResult {
    pub rate: f64,
    pub sent: usize,
    pub errors: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// The first few failures, as the client saw them (a status, or the error).
    #[serde(default)]
    pub first_errors: Vec<String>,
}

/// One client connection, HTTP/1.1 or HTTP/2 (prior knowledge).
enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

impl Sender {
    async fn connect(addr: SocketAddr, h2: bool) -> Result<Self> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let io = TokioIo::new(stream);
        Ok(if h2 {
            let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(conn);
            Sender::H2(sender)
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(conn);
            Sender::H1(sender)
        })
    }

    /// GET `uri` (with `token` as its `authorization` header, when given): whether it was
    /// answered 2xx (with the whole body read).
    async fn get(&mut self, uri: &http::Uri, authority: &str, token: Option<&http::HeaderValue>) -> Result<bool> {
        Ok(self.status(uri, authority, token).await?.is_success())
    }

    /// GET `uri`: the response's status (with the whole body read).
    async fn status(
        &mut self,
        uri: &http::Uri,
        authority: &str,
        token: Option<&http::HeaderValue>,
    ) -> Result<http::StatusCode> {
        let mut req = http::Request::get(uri.clone()).header("host", authority);
        if let Some(token) = token {
            req = req.header(http::header::AUTHORIZATION, token.clone());
        }
        let req = req.body(Empty::<Bytes>::new()).map_err(|e| anyhow::anyhow!("{e}"))?;
        // Ready first: hyper refuses a request on a connection whose task has not yet caught up
        // ("connection was not ready"), which a fresh HTTP/2 connection often has not.
        let resp = match self {
            Sender::H1(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
            Sender::H2(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
        };
        let status = resp.status();
        resp.into_body().collect().await?;
        Ok(status)
    }
}

fn target(url: &str) -> Result<(http::Uri, String, SocketAddr)> {
    let uri: http::Uri = url.parse().context("url")?;
    let authority = uri.authority().context("url has no host:port")?.to_string();
    let addr: SocketAddr = authority.parse().context("url host must be ip:port")?;
    Ok((uri, authority, addr))
}

/// Open-loop HTTP/1.1 (or, with `h2`, HTTP/2) load: request i is due at start + i/rate, spread
/// over `connections` keep-alive connections; each latency is measured from when the request
/// was due, so a slow response delays (and counts against) the ones queued behind it, as a
/// real arrival process would see it.
pub fn open_loop(url: &str, rate: f64, seconds: f64, connections: usize, h2: bool) -> Result<OpenLoopResult> {
    let (uri, authority, addr) = target(url)?;
    let total = (rate * seconds) as usize;
    runtime()?.block_on(async move {
        let start = tokio::time::Instant::now() + Duration::from_millis(200);
        let mut tasks = Vec::new();
        for c in 0..connections {
            let uri = uri.clone();
            let authority = authority.clone();
            tasks.push(tokio::spawn(async move {
                let mut sender = Sender::connect(addr, h2).await?;
                let mut latencies = Vec::new();
                let mut errors = 0;
                let mut seen = Vec::new();
                let mut i = c;
                while i < total {
                    let due = start + Duration::from_secs_f64(i as f64 / rate);
                    tokio::time::sleep_until(due).await;
                    match sender.status(&uri, &authority, None).await {
                        Ok(s) if s.is_success() => latencies.push(due.elapsed().as_micros() as u32),
                        failed => {
                            errors += 1;
                            if seen.len() < 3 {
                                seen.push(match failed {
                                    Err(e) => format!("{e:#}"),
                                    Ok(s) => format!("answered {s}"),
                                });
                            }
                        }
                    }
                    i += connections;
                }
                Ok::<_, anyhow::Error>((latencies, errors, seen))
            }));
        }
        let mut all = Vec::with_capacity(total);
        let (mut errors, mut first_errors) = (0, Vec::new());
        for t in tasks {
            let (l, e, seen) = t.await??;
            all.extend(l);
            errors += e;
            first_errors.extend(seen.into_iter().take(5usize.saturating_sub(first_errors.len())));
        }
        all.sort_unstable();
        let pct = |p: f64| {
            if all.is_empty() {
                0.0
            } else {
                all[((all.len() - 1) as f64 * p) as usize] as f64 / 1000.0
            }
        };
        Ok(OpenLoopResult {
            rate,
            sent: total,
            errors,
            p50_ms: pct(0.50),
            p99_ms: pct(0.99),
            p999_ms: pct(0.999),
            max_ms: pct(1.0),
            first_errors,
        })
    })
}

/// What [`hold_http`] saw over its connections' lifetime.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct HoldResult {
    pub held: usize,
    pub requests: u64,
    pub failures: u64,
    /// Connections that failed and were given up on (never reopened).
    pub lost: usize,
}

/// Opens `count` HTTP (HTTP/2 with `h2`) connections to `url`'s host, says `ready N`, and keeps
/// them open for `seconds`, each sending one GET `url` every `every` seconds (spread evenly) to
/// prove it still works; one JSON line at the end. A connection whose request fails is counted
/// as lost and not reopened.
///
/// With `token_bytes` > 0 each request carries an `authorization: Bearer` token of that many
/// bytes, marked sensitive so that HPACK never indexes it (as HTTP/2 clients send credentials):
/// each request then puts that many bytes through the proxy's read buffer of the connection, as
/// real clients' cookies and tokens do, instead of the ~35 bytes of an indexed GET.
pub fn hold_http(url: &str, count: usize, seconds: u64, every: u64, h2: bool, token_bytes: usize) -> Result<()> {
    let (uri, authority, addr) = target(url)?;
    let token = (token_bytes > 0)
        .then(|| {
            let mut v = http::HeaderValue::from_str(&format!("Bearer {}", "t".repeat(token_bytes.saturating_sub(7))))?;
            v.set_sensitive(true);
            Ok::<_, anyhow::Error>(v)
        })
        .transpose()?;
    runtime()?.block_on(async move {
        let mut senders = Vec::with_capacity(count);
        for i in 0..count {
            let mut s = Sender::connect(addr, h2).await.with_context(|| format!("connection {i}"))?;
            if !s
                .get(&uri, &authority, token.as_ref())
                .await
                .with_context(|| format!("first request on connection {i}"))?
            {
                anyhow::bail!("connection {i}: first request not answered 2xx");
            }
            senders.push(s);
        }
        println!("ready {}", senders.len());
        use std::io::Write as _;
        std::io::stdout().flush()?;
        let end = tokio::time::Instant::now() + Duration::from_secs(seconds);
        let every = Duration::from_secs(every.max(1));
        let mut tasks = tokio::task::JoinSet::new();
        for (i, mut s) in senders.into_iter().enumerate() {
            let (uri, authority, token) = (uri.clone(), authority.clone(), token.clone());
            let offset = every.mul_f64(i as f64 / count as f64);
            tasks.spawn(async move {
                let (mut requests, mut failures) = (0u64, 0u64);
                let mut next = tokio::time::Instant::now() + offset;
                loop {
                    next += every;
                    if next >= end {
                        tokio::time::sleep_until(end).await;
                        return (requests, failures, false);
                    }
                    tokio::time::sleep_until(next).await;
                    requests += 1;
                    if !matches!(s.get(&uri, &authority, token.as_ref()).await, Ok(true)) {
                        failures += 1;
                        return (requests, failures, true);
                    }
                }
            });
        }
        let mut r = HoldResult { held: count, ..HoldResult::default() };
        while let Some(done) = tasks.join_next().await {
            let (requests, failures, lost) = done?;
            r.requests += requests;
            r.failures += failures;
            r.lost += usize::from(lost);
        }
        println!("{}", serde_json::to_string(&r)?);
        Ok::<_, anyhow::Error>(())
    })
}

/// Opens `count` TCP connections to `addr`, says `ready`, and keeps them open and silent for
/// `seconds`.
pub fn hold(addr: &str, count: usize, seconds: u64) -> Result<()> {
    let addr: SocketAddr = addr.parse()?;
    runtime()?.block_on(async move {
        let mut held = Vec::with_capacity(count);
        for _ in 0..count {
            held.push(
                tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connection {}", held.len()))?,
            );
        }
        println!("ready {}", held.len());
        use std::io::Write as _;
        std::io::stdout().flush()?;
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        drop(held);
        Ok::<_, anyhow::Error>(())
    })
}

/// Lets this process and its children hold many descriptors: up to `n`, else the hard limit
/// (where the hard limit cannot be raised).
pub fn raise_fd_limit(n: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if setrlimit(Resource::RLIMIT_NOFILE, n.max(hard), n.max(hard)).is_err() {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

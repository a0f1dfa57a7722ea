//! Upstream HTTP connections, reused per original destination across downstream connections:
//! one multiplexed HTTP/2 connection per destination, and a bounded set of idle HTTP/1.1
//! connections per destination (one request at a time each). A destination reached with TLS
//! (`originatingTLS`) is pooled apart, per server name and trust settings.
//!
//! No lock is held across I/O: the pool's map sits behind a plain mutex taken only to look up,
//! insert or remove. Connecting (TCP, TLS, HTTP handshake) runs outside it under the connect
//! timeout, so a destination that never answers delays only the requests sent to it. HTTP/2
//! has one connect in flight per destination; the requests that arrive meanwhile wait for it
//! (or for their own request timeout), never for another destination. HTTP/1.1 opens a
//! connection per concurrent request, as it must. Idle connections are closed after the idle
//! timeout; the number of destinations is bounded (the least recently used one goes, with its
//! connections). A request on a reused HTTP/1.1 connection that the upstream had dropped is
//! sent once more on a new connection when that is safe (see [`Replay`]).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use hashlink::LruCache;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::OnceCell;
use tracing::{debug, warn};

use crate::http::RequestBody;
use crate::metrics::{Limit, Metrics, PoolLabels};
use crate::proxy::connect_upstream;
use redirector::ProxyAddrs;

/// Idle HTTP/1.1 connections kept per destination; more are closed when their response ends.
pub const MAX_IDLE_PER_DESTINATION: usize = 64;

/// The pool's bounds (flags of l7proxy; README, "Bounds").
#[derive(Clone, Copy, Debug)]
pub struct PoolConfig {
    /// TCP connect + TLS + HTTP handshake to a new upstream connection.
    pub connect_timeout: Duration,
    /// An idle connection (HTTP/1.1: no request; HTTP/2: no new request) is closed after this.
    pub idle_timeout: Duration,
    /// Destinations (pool keys) held at once; the least recently used goes first.
    pub max_destinations: usize,
}

type H1 = (http1::SendRequest<RequestBody>, Local);
type H2 = (http2::SendRequest<RequestBody>, Local);

/// Why an upstream request failed: reaching the upstream, or the exchange itself (kept as
/// hyper's error, whose source says whether the request body failed on its way).
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("{0}")]
    Connect(String),
    #[error("connecting to upstream {addr} took longer than {after:?}")]
    ConnectTimeout { addr: SocketAddr, after: Duration },
    #[error("upstream request: {0}")]
    Request(#[from] hyper::Error),
}

impl PoolError {
    /// True when `T` is somewhere in the error's source chain.
    pub fn caused_by<T: std::error::Error + 'static>(&self) -> bool {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = cause {
            if e.is::<T>() {
                return true;
            }
            cause = e.source();
        }
        false
    }
}

/// A failed connect, shared with every request that waited for it.
#[derive(Clone, Debug)]
enum ConnectFailure {
    Timeout(SocketAddr, Duration),
    Failed(String),
}

impl From<ConnectFailure> for PoolError {
    fn from(f: ConnectFailure) -> Self {
        match f {
            ConnectFailure::Timeout(addr, after) => PoolError::ConnectTimeout { addr, after },
            ConnectFailure::Failed(e) => PoolError::Connect(e),
        }
    }
}

/// The proxy's local address of an upstream connection (for flows).
pub type Local = Option<SocketAddr>;

/// A destination and, when TLS is originated to it, the server name and trust settings.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    addr: SocketAddr,
    tls: Option<(String, String)>,
}

/// TLS towards one upstream: the config (without ALPN) and the name to verify.
pub struct UpstreamTls {
    pub config: Arc<rustls::ClientConfig>,
    pub server_name: String,
    /// Tells different trust settings apart in the pool.
    pub settings: String,
    pub metrics: Arc<crate::metrics::Metrics>,
}

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// What the pool asks of a connection (hyper's senders; fakes in the unit tests).
trait Conn {
    fn closed(&self) -> bool;
    /// Free for a request (HTTP/1.1: its last response ended).
    fn ready(&self) -> bool;
}

impl Conn for H1 {
    fn closed(&self) -> bool {
        self.0.is_closed()
    }
    fn ready(&self) -> bool {
        self.0.is_ready()
    }
}

impl Conn for H2 {
    fn closed(&self) -> bool {
        self.0.is_closed()
    }
    fn ready(&self) -> bool {
        !self.0.is_closed()
    }
}

type Connecting<C2> = Arc<OnceCell<Result<C2, ConnectFailure>>>;

struct Entry<C1, C2> {
    /// Connections handed back, with when they were last seen busy or handed back.
    h1: Vec<(C1, Instant)>,
    /// The multiplexed connection and when it last took a request.
    h2: Option<(C2, Instant)>,
    /// The HTTP/2 connect in flight, which later requests wait for.
    connecting: Option<Connecting<C2>>,
}

impl<C1, C2> Default for Entry<C1, C2> {
    fn default() -> Self {
        Entry { h1: Vec::new(), h2: None, connecting: None }
    }
}

/// What an HTTP/2 request finds for its destination.
enum H2Slot<C2> {
    Ready(C2),
    /// Wait for (or, first, run) this connect.
    Connect(Connecting<C2>),
}

/// The pool's bookkeeping, apart from I/O (unit-tested with fake connections).
struct Slots<K, C1, C2> {
    map: LruCache<K, Entry<C1, C2>>,
    max_destinations: usize,
    idle_timeout: Duration,
    /// Pooled connections, kept as they change: the gauges never need a walk of the map.
    h1: usize,
    h2: usize,
}

/// How many destinations and connections a [`Slots`] holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counts {
    destinations: usize,
    h1: usize,
    h2: usize,
}

impl<K: std::hash::Hash + Eq + Clone, C1: Conn, C2: Conn + Clone> Slots<K, C1, C2> {
    fn new(max_destinations: usize, idle_timeout: Duration) -> Self {
        Slots { map: LruCache::new_unbounded(), max_destinations: max_destinations.max(1), idle_timeout, h1: 0, h2: 0 }
    }

    /// `key`'s entry, made most recently used; a new key past the bound evicts the least
    /// recently used one (returned, so the caller can count and log it).
    fn entry(&mut self, key: &K) -> (&mut Entry<C1, C2>, Option<K>) {
        let mut evicted = None;
        if !self.map.contains_key(key) {
            if self.map.len() >= self.max_destinations {
                evicted = self.map.remove_lru().map(|(k, e)| {
                    self.h1 -= e.h1.len();
                    self.h2 -= usize::from(e.h2.is_some());
                    k
                });
            }
            self.map.insert(key.clone(), Entry::default());
        }
        (self.map.get_mut(key).expect("just inserted"), evicted)
    }

    /// A ready idle HTTP/1.1 connection to `key`, dropping closed ones.
    fn take_h1(&mut self, key: &K) -> Option<C1> {
        let entry = self.map.get_mut(key)?;
        let before = entry.h1.len();
        entry.h1.retain(|(c, _)| !c.closed());
        let found = entry.h1.iter().position(|(c, _)| c.ready()).map(|i| entry.h1.swap_remove(i).0);
        self.h1 -= before - entry.h1.len();
        found
    }

    /// Hands a connection back (it turns ready when its response ends); false when the
    /// destination already holds enough (the connection is then dropped: closed when done).
    fn put_h1(&mut self, key: &K, conn: C1, now: Instant) -> (bool, Option<K>) {
        let (entry, evicted) = self.entry(key);
        if entry.h1.len() >= MAX_IDLE_PER_DESTINATION {
            return (false, evicted);
        }
        entry.h1.push((conn, now));
        self.h1 += 1;
        (true, evicted)
    }

    fn h2(&mut self, key: &K, now: Instant) -> (H2Slot<C2>, Option<K>) {
        let (entry, evicted) = self.entry(key);
        let mut dropped = false;
        let slot = match &mut entry.h2 {
            Some((c, used)) if !c.closed() => {
                *used = now;
                H2Slot::Ready(c.clone())
            }
            _ => {
                dropped = entry.h2.take().is_some();
                H2Slot::Connect(entry.connecting.get_or_insert_with(Default::default).clone())
            }
        };
        self.h2 -= usize::from(dropped);
        (slot, evicted)
    }

    /// The connect `cell` ended: its connection (if any) becomes `key`'s, unless another
    /// connect has replaced it meanwhile (or the destination was evicted).
    fn h2_done(&mut self, key: &K, cell: &Connecting<C2>, now: Instant) {
        let Some(entry) = self.map.peek_mut(key) else { return };
        if !entry.connecting.as_ref().is_some_and(|c| Arc::ptr_eq(c, cell)) {
            return;
        }
        entry.connecting = None;
        if let Some(Ok(c)) = cell.get() {
            if entry.h2.replace((c.clone(), now)).is_none() {
                self.h2 += 1;
            }
        }
    }

    /// Closes what has been idle for the idle timeout and forgets empty destinations.
    fn sweep(&mut self, now: Instant) -> Counts {
        let idle = self.idle_timeout;
        let mut closed = Counts::default();
        self.map.retain(|_, entry| {
            let before = entry.h1.len();
            entry.h1.retain_mut(|(c, seen)| {
                if c.closed() {
                    return false;
                }
                if !c.ready() {
                    // Still streaming its response: idle time counts from when it ends.
                    *seen = now;
                    return true;
                }
                now.duration_since(*seen) < idle
            });
            closed.h1 += before - entry.h1.len();
            if let Some((c, used)) = &entry.h2 {
                if c.closed() || now.duration_since(*used) >= idle {
                    // Streams in flight keep the connection until they end (hyper holds it
                    // for them); only new requests go elsewhere.
                    entry.h2 = None;
                    closed.h2 += 1;
                }
            }
            let keep = !entry.h1.is_empty() || entry.h2.is_some() || entry.connecting.is_some();
            closed.destinations += usize::from(!keep);
            keep
        });
        self.h1 -= closed.h1;
        self.h2 -= closed.h2;
        closed
    }

    fn counts(&self) -> Counts {
        let n = Counts { destinations: self.map.len(), h1: self.h1, h2: self.h2 };
        #[cfg(test)]
        assert_eq!(n, self.recount(), "running counts");
        n
    }

    /// [`Slots::counts`] the slow way (the unit tests' check of the running counts).
    #[cfg(test)]
    fn recount(&self) -> Counts {
        let mut n = Counts { destinations: self.map.len(), ..Counts::default() };
        for (_, e) in self.map.iter() {
            n.h1 += e.h1.len();
            n.h2 += usize::from(e.h2.is_some());
        }
        n
    }
}

pub struct UpstreamPool {
    slots: Mutex<Slots<Key, H1, H2>>,
    config: PoolConfig,
    metrics: Arc<Metrics>,
}

/// A bodiless request with an idempotent method (RFC 9110, 9.2.2), kept to send again if the
/// reused connection it goes out on turns out dropped before any answer: repeating it cannot
/// do what the client did not ask. Anything with a body, or a method like POST, is never
/// sent twice.
struct Replay {
    method: http::Method,
    uri: http::Uri,
    version: http::Version,
    headers: http::HeaderMap,
}

impl Replay {
    fn of(req: &http::Request<RequestBody>) -> Option<Self> {
        use http::Method;
        use hyper::body::Body as _;
        let idempotent = [Method::GET, Method::HEAD, Method::OPTIONS, Method::TRACE, Method::PUT, Method::DELETE];
        let bodiless = req.body().is_end_stream()
            && !req.headers().contains_key(http::header::TRANSFER_ENCODING)
            && req.headers().get(http::header::CONTENT_LENGTH).is_none_or(|v| v.as_bytes() == b"0");
        (idempotent.contains(req.method()) && bodiless).then(|| Replay {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
        })
    }

    fn request(self) -> http::Request<RequestBody> {
        let mut req = http::Request::new(RequestBody::empty());
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers;
        req
    }
}

/// A reused connection failed in a way that says the upstream had dropped it: closed before
/// (or while) the request went out, or before a complete response head.
fn dropped_by_upstream(e: &hyper::Error) -> bool {
    if e.is_incomplete_message() || e.is_canceled() || e.is_closed() {
        return true;
    }
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            return matches!(io.kind(), ConnectionReset | BrokenPipe | ConnectionAborted | UnexpectedEof);
        }
        cause = c.source();
    }
    false
}

impl UpstreamPool {
    /// A pool with `config`'s bounds; a background task closes idle connections (it ends when
    /// the pool is dropped).
    pub fn new(config: PoolConfig, metrics: Arc<Metrics>) -> Arc<Self> {
        let pool = Arc::new(UpstreamPool {
            slots: Mutex::new(Slots::new(config.max_destinations, config.idle_timeout)),
            config,
            metrics,
        });
        let weak = Arc::downgrade(&pool);
        let every = (config.idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
        tokio::spawn(sweep(weak, every));
        pool
    }

    pub fn connect_timeout(&self) -> Duration {
        self.config.connect_timeout
    }

    fn with_slots<R>(&self, f: impl FnOnce(&mut Slots<Key, H1, H2>) -> (R, Option<Key>)) -> R {
        let mut slots = self.slots.lock().expect("pool lock");
        let (r, evicted) = f(&mut slots);
        if let Some(key) = evicted {
            self.metrics.limit_tripped(Limit::UpstreamPoolDestinations);
            warn!(
                evicted = %key.addr,
                max = self.config.max_destinations,
                "upstream pool full: closed the least recently used destination's idle connections"
            );
        }
        self.publish(&slots);
        r
    }

    fn publish(&self, slots: &Slots<Key, H1, H2>) {
        let n = slots.counts();
        self.metrics.upstream_pool_destinations.set(n.destinations as i64);
        self.metrics.upstream_pool_connections.get_or_create(&PoolLabels { protocol: "http1" }).set(n.h1 as i64);
        self.metrics.upstream_pool_connections.get_or_create(&PoolLabels { protocol: "http2" }).set(n.h2 as i64);
    }

    /// Sends `req` to `target` over a pooled connection of the request's own version (or a new
    /// one). Returns the response head and the upstream connection's local address.
    pub async fn send(
        &self,
        target: SocketAddr,
        proxy: &ProxyAddrs,
        req: http::Request<RequestBody>,
        h2: bool,
        tls: Option<&UpstreamTls>,
    ) -> Result<(http::Response<Incoming>, Local), PoolError> {
        let key = Key { addr: target, tls: tls.map(|t| (t.server_name.clone(), t.settings.clone())) };
        if h2 {
            let (mut sender, local) = self.h2_sender(&key, proxy, tls).await?;
            let resp = sender.send_request(req).await?;
            return Ok((resp, local));
        }
        let idle = self.with_slots(|s| (s.take_h1(&key), None));
        let req = match idle {
            None => req,
            Some((mut sender, local)) => {
                let replay = Replay::of(&req);
                match sender.try_send_request(req).await {
                    Ok(resp) => {
                        self.with_slots(|s| s.put_h1(&key, (sender, local), Instant::now()));
                        return Ok((resp, local));
                    }
                    Err(mut e) => {
                        let unsent = e.take_message();
                        let again = match unsent {
                            Some(req) => Some(req),
                            None if dropped_by_upstream(e.error()) => replay.map(Replay::request),
                            None => None,
                        };
                        let Some(req) = again else { return Err(e.into_error().into()) };
                        self.metrics.upstream_retries.inc();
                        debug!(target = %target, error = %e.error(), "reused upstream connection was dropped; sending again on a new one");
                        req
                    }
                }
            }
        };
        let (mut sender, local) = self.timed_connect(&key, proxy, tls, connect_h1).await?;
        sender.ready().await?;
        let resp = sender.send_request(req).await?;
        // Back to the pool at once: it turns ready again when this response's body ends, and
        // `take_h1` only hands out ready connections.
        self.with_slots(|s| s.put_h1(&key, (sender, local), Instant::now()));
        Ok((resp, local))
    }

    /// Runs `connect` (TCP, TLS, HTTP handshake) under the connect timeout; a timeout is
    /// counted and logged here, whichever step it struck.
    async fn timed_connect<'a, T, F>(
        &self,
        key: &'a Key,
        proxy: &'a ProxyAddrs,
        tls: Option<&'a UpstreamTls>,
        connect: impl FnOnce(SocketAddr, &'a ProxyAddrs, Option<&'a UpstreamTls>, Duration) -> F,
    ) -> Result<T, ConnectFailure>
    where
        F: std::future::Future<Output = Result<T, ConnectFailure>>,
    {
        let after = self.config.connect_timeout;
        let result = match tokio::time::timeout(after, connect(key.addr, proxy, tls, after)).await {
            Ok(r) => r,
            Err(_) => Err(ConnectFailure::Timeout(key.addr, after)),
        };
        if let Err(ConnectFailure::Timeout(..)) = result {
            self.metrics.limit_tripped(Limit::UpstreamConnectTimeout);
            warn!(target = %key.addr, timeout = ?after, "upstream connect timed out");
        }
        result
    }

    async fn h2_sender(&self, key: &Key, proxy: &ProxyAddrs, tls: Option<&UpstreamTls>) -> Result<H2, PoolError> {
        let cell = match self.with_slots(|s| s.h2(key, Instant::now())) {
            H2Slot::Ready(c) => return Ok(c),
            H2Slot::Connect(cell) => cell,
        };
        // The first request here connects; the others wait for its result. If the first one
        // is cancelled (its client went away), the next waiter connects instead.
        let result = cell.get_or_init(|| self.timed_connect(key, proxy, tls, connect_h2)).await.clone();
        self.with_slots(|s| {
            s.h2_done(key, &cell, Instant::now());
            ((), None)
        });
        Ok(result?)
    }
}

/// Closes idle connections every `every` until the pool is gone.
async fn sweep(pool: Weak<UpstreamPool>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        let closed = pool.with_slots(|s| (s.sweep(Instant::now()), None));
        if closed != Counts::default() {
            debug!(
                h1 = closed.h1,
                h2 = closed.h2,
                destinations = closed.destinations,
                "closed idle upstream connections"
            );
        }
    }
}

/// A new upstream connection, with TLS (offering `alpn`, if any) when `tls` says so; the TCP
/// connect gives up after `connect_timeout`.
pub async fn connect(
    target: SocketAddr,
    proxy: &ProxyAddrs,
    tls: Option<&UpstreamTls>,
    alpn: Option<&[u8]>,
    connect_timeout: Duration,
) -> Result<(Box<dyn Io>, Local), String> {
    establish(target, proxy, tls, alpn, connect_timeout).await.map_err(|e| PoolError::from(e).to_string())
}

async fn establish(
    target: SocketAddr,
    proxy: &ProxyAddrs,
    tls: Option<&UpstreamTls>,
    alpn: Option<&[u8]>,
    connect_timeout: Duration,
) -> Result<(Box<dyn Io>, Local), ConnectFailure> {
    let stream = connect_upstream(target, proxy, connect_timeout).await.map_err(|e| match e {
        crate::proxy::ConnectionError::UpstreamTimeout(_) => ConnectFailure::Timeout(target, connect_timeout),
        e => ConnectFailure::Failed(e.to_string()),
    })?;
    let local = stream.local_addr().ok();
    let Some(tls) = tls else { return Ok((Box::new(stream), local)) };
    let mut config = (*tls.config).clone();
    config.alpn_protocols = alpn.map(|a| vec![a.to_vec()]).unwrap_or_default();
    let name = ServerName::try_from(tls.server_name.clone())
        .map_err(|e| ConnectFailure::Failed(format!("upstream server name `{}`: {e}", tls.server_name)))?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, stream).await;
    tls.metrics.tls("originate", if stream.is_ok() { "ok" } else { "failed" });
    let stream = stream
        .map_err(|e| ConnectFailure::Failed(format!("upstream TLS to {target} as `{}`: {e}", tls.server_name)))?;
    Ok((Box::new(stream), local))
}

async fn connect_h1(
    target: SocketAddr,
    proxy: &ProxyAddrs,
    tls: Option<&UpstreamTls>,
    timeout: Duration,
) -> Result<H1, ConnectFailure> {
    let (stream, local) = establish(target, proxy, tls, Some(b"http/1.1"), timeout).await?;
    let (sender, connection) =
        http1::handshake(TokioIo::new(stream)).await.map_err(|e| ConnectFailure::Failed(e.to_string()))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            debug!(error = %e, "upstream h1 connection ended");
        }
    });
    Ok((sender, local))
}

async fn connect_h2(
    target: SocketAddr,
    proxy: &ProxyAddrs,
    tls: Option<&UpstreamTls>,
    timeout: Duration,
) -> Result<H2, ConnectFailure> {
    let (stream, local) = establish(target, proxy, tls, Some(b"h2"), timeout).await?;
    let (sender, connection) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .map_err(|e| ConnectFailure::Failed(e.to_string()))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            debug!(error = %e, "upstream h2 connection ended");
        }
    });
    Ok((sender, local))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    /// A connection whose state the test sets.
    #[derive(Clone, Default)]
    struct Fake {
        id: u32,
        closed: Rc<Cell<bool>>,
        busy: Rc<Cell<bool>>,
    }

    impl Fake {
        fn new(id: u32) -> Self {
            Fake { id, ..Fake::default() }
        }
    }

    impl Conn for Fake {
        fn closed(&self) -> bool {
            self.closed.get()
        }
        fn ready(&self) -> bool {
            !self.closed.get() && !self.busy.get()
        }
    }

    type TestSlots = Slots<u16, Fake, Fake>;
    const IDLE: Duration = Duration::from_secs(10);

    #[test]
    fn idle_h1_connections_are_reused_only_when_ready_and_closed_after_the_idle_timeout() {
        let mut s = TestSlots::new(8, IDLE);
        let t0 = Instant::now();
        let (a, b) = (Fake::new(1), Fake::new(2));
        a.busy.set(true);
        s.put_h1(&1, a.clone(), t0);
        s.put_h1(&1, b.clone(), t0);
        assert_eq!(s.take_h1(&1).map(|c| c.id), Some(2), "the busy one is not handed out");
        assert!(s.take_h1(&1).is_none());
        s.put_h1(&1, b.clone(), t0);
        // A sweep while `a` is busy restarts its idle time; `b`, idle since t0, goes at t0+10s.
        assert_eq!(s.sweep(t0 + Duration::from_secs(5)), Counts::default());
        a.busy.set(false);
        assert_eq!(s.sweep(t0 + IDLE), Counts { h1: 1, ..Counts::default() });
        assert_eq!(s.counts(), Counts { destinations: 1, h1: 1, h2: 0 });
        assert_eq!(s.sweep(t0 + Duration::from_secs(15)), Counts { h1: 1, destinations: 1, h2: 0 });
        assert_eq!(s.counts(), Counts::default(), "an empty destination is forgotten");
        // A connection the upstream closed is dropped, never handed out.
        let c = Fake::new(3);
        s.put_h1(&2, c.clone(), t0);
        c.closed.set(true);
        assert!(s.take_h1(&2).is_none());
    }

    #[test]
    fn a_destination_past_the_bound_evicts_the_least_recently_used() {
        let mut s = TestSlots::new(2, IDLE);
        let now = Instant::now();
        assert_eq!(s.put_h1(&1, Fake::new(1), now).1, None);
        assert_eq!(s.put_h1(&2, Fake::new(2), now).1, None);
        // Using 1 makes 2 the least recently used.
        let _ = s.h2(&1, now);
        assert_eq!(s.put_h1(&3, Fake::new(3), now).1, Some(2));
        assert_eq!(s.counts(), Counts { destinations: 2, h1: 2, h2: 0 });
        assert!(s.take_h1(&2).is_none() && s.take_h1(&3).is_some());
        // Per destination, idle HTTP/1.1 connections are bounded too.
        for i in 1..MAX_IDLE_PER_DESTINATION as u32 {
            assert!(s.put_h1(&1, Fake::new(i), now).0);
        }
        assert!(!s.put_h1(&1, Fake::new(99), now).0);
    }

    #[test]
    fn one_h2_connect_in_flight_per_destination_and_none_shared_across_destinations() {
        let mut s = TestSlots::new(8, IDLE);
        let now = Instant::now();
        let H2Slot::Connect(first) = s.h2(&1, now).0 else { panic!("nothing to reuse yet") };
        let H2Slot::Connect(second) = s.h2(&1, now).0 else { panic!("still connecting") };
        assert!(Arc::ptr_eq(&first, &second), "later requests wait for the same connect");
        let H2Slot::Connect(other) = s.h2(&2, now).0 else { panic!() };
        assert!(!Arc::ptr_eq(&first, &other), "another destination never waits for this one");
        // The connect ends: its connection serves the next requests.
        first.set(Ok(Fake::new(7))).map_err(|_| ()).unwrap();
        s.h2_done(&1, &first, now);
        assert!(matches!(s.h2(&1, now).0, H2Slot::Ready(c) if c.id == 7));
        assert_eq!(s.counts(), Counts { destinations: 2, h1: 0, h2: 1 });
        // A failed connect is not kept: the next request connects anew.
        other.set(Err(ConnectFailure::Failed("refused".into()))).map_err(|_| ()).unwrap();
        s.h2_done(&2, &other, now);
        let H2Slot::Connect(again) = s.h2(&2, now).0 else { panic!("a new connect") };
        assert!(!Arc::ptr_eq(&again, &other));
    }

    #[test]
    fn an_h2_connection_is_dropped_from_the_pool_after_the_idle_timeout_or_when_closed() {
        let mut s = TestSlots::new(8, IDLE);
        let t0 = Instant::now();
        let H2Slot::Connect(cell) = s.h2(&1, t0).0 else { panic!() };
        let conn = Fake::new(1);
        cell.set(Ok(conn.clone())).map_err(|_| ()).unwrap();
        s.h2_done(&1, &cell, t0);
        // Each request restarts the idle time.
        assert!(matches!(s.h2(&1, t0 + Duration::from_secs(8)).0, H2Slot::Ready(_)));
        assert_eq!(s.sweep(t0 + Duration::from_secs(12)), Counts::default());
        assert_eq!(s.sweep(t0 + Duration::from_secs(18)), Counts { h2: 1, destinations: 1, h1: 0 });
        // A closed one is replaced by a new connect.
        let H2Slot::Connect(cell) = s.h2(&1, t0).0 else { panic!() };
        cell.set(Ok(conn.clone())).map_err(|_| ()).unwrap();
        s.h2_done(&1, &cell, t0);
        assert_eq!(s.counts().h2, 1);
        conn.closed.set(true);
        assert!(matches!(s.h2(&1, t0).0, H2Slot::Connect(_)));
        assert_eq!(s.counts().h2, 0);
    }

    #[test]
    fn only_bodiless_idempotent_requests_are_replayed() {
        let req = |method: &str, headers: &[(&str, &str)]| {
            let mut r = http::Request::new(RequestBody::empty());
            *r.method_mut() = method.parse().unwrap();
            for (k, v) in headers {
                let name: http::HeaderName = k.parse().unwrap();
                r.headers_mut().insert(name, v.parse().unwrap());
            }
            r
        };
        assert!(Replay::of(&req("GET", &[])).is_some());
        assert!(Replay::of(&req("DELETE", &[("content-length", "0")])).is_some());
        assert!(Replay::of(&req("POST", &[])).is_none(), "POST is never sent twice");
        assert!(Replay::of(&req("PUT", &[("content-length", "3")])).is_none(), "a body is never sent twice");
        assert!(Replay::of(&req("GET", &[("transfer-encoding", "chunked")])).is_none());
        let again = Replay::of(&req("GET", &[("x-a", "1")])).unwrap().request();
        assert_eq!((again.method(), again.headers()["x-a"].as_bytes()), (&http::Method::GET, &b"1"[..]));
    }
}

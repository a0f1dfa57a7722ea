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
//!
//! Connections belong to the source workload ([`Owner`]) whose request opened them: pool keys
//! carry it, so no connection is shared across workloads, and each workload may hold at most
//! `--upstream-max-connections-per-workload` upstream connections (a permit per connection,
//! held by its task until it closes). At that cap a workload's new connection first closes one
//! of its own idle ones and waits briefly for one of its own to end, else that request gets
//! 503. When the destination bound is reached, the workload holding the most keys loses its
//! least recently used one: a workload's pressure on the pool falls on itself.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use hashlink::LruCache;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OnceCell, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

use crate::body::RequestBody;
use crate::metrics::{Limit, Metrics, PoolLabels};
use crate::upstream::{connect_upstream, UpstreamError, UpstreamSource};
use redirector::ProxyAddrs;

/// Idle HTTP/1.1 connections kept per destination; more are closed when their response ends.
pub const MAX_IDLE_PER_DESTINATION: usize = 64;

/// How long a request of a workload at its connection cap waits for one of its own
/// connections to end (after closing one of its idle ones) before it gets 503.
pub const OWN_CONNECTION_WAIT: Duration = Duration::from_secs(1);

/// The pool's bounds (flags of l7proxy; README, "Bounds").
#[derive(Clone, Copy, Debug)]
pub struct PoolConfig {
    /// TCP connect + TLS + HTTP handshake to a new upstream connection.
    pub connect_timeout: Duration,
    /// An idle connection (HTTP/1.1: no request; HTTP/2: no new request) is closed after this.
    pub idle_timeout: Duration,
    /// Destinations (pool keys) held at once; past it, the least recently used key of the
    /// workload holding the most goes.
    pub max_destinations: usize,
    /// Upstream connections one source workload may hold open (pooled, busy or connecting).
    pub max_connections_per_workload: usize,
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
    #[error("this workload holds {max} upstream connections (--upstream-max-connections-per-workload)")]
    WorkloadLimit { max: usize },
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
    WorkloadLimit(usize),
}

impl From<ConnectFailure> for PoolError {
    fn from(f: ConnectFailure) -> Self {
        match f {
            ConnectFailure::Timeout(addr, after) => PoolError::ConnectTimeout { addr, after },
            ConnectFailure::Failed(e) => PoolError::Connect(e),
            ConnectFailure::WorkloadLimit(max) => PoolError::WorkloadLimit { max },
        }
    }
}

/// The proxy's local address of an upstream connection (for flows).
pub type Local = Option<SocketAddr>;

/// Whose requests a pooled connection carries: the source workload (by namespace and name,
/// unique on the node at any time, so a restarted workload finds its own connections again),
/// or, for a source that is no workload (another host, a local process), its address.
#[derive(Clone, Debug)]
pub enum Owner {
    Workload(Arc<crate::registry::WorkloadInfo>),
    Peer(IpAddr),
}

impl Owner {
    fn id(&self) -> Result<(&str, &str), IpAddr> {
        match self {
            Owner::Workload(w) => Ok((&w.namespace, &w.name)),
            Owner::Peer(ip) => Err(*ip),
        }
    }
}

impl PartialEq for Owner {
    fn eq(&self, other: &Self) -> bool {
        self.id() == other.id()
    }
}

impl Eq for Owner {}

impl std::hash::Hash for Owner {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.id().hash(state)
    }
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Owner::Workload(w) => write!(f, "workload {}/{}", w.namespace, w.name),
            Owner::Peer(ip) => write!(f, "peer {ip}"),
        }
    }
}

/// The source workload, a destination, the source address its connections are bound to (a
/// client's own address is never lent to another client) and, when TLS is originated to it,
/// the server name (normalized: see [`server_name_key`]) and trust settings.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    owner: Owner,
    addr: SocketAddr,
    source: UpstreamSource,
    tls: Option<(String, String)>,
}

/// A pool key and whose it is.
trait PoolKey: std::hash::Hash + Eq + Clone {
    type Owner: std::hash::Hash + Eq + Clone + std::fmt::Debug;
    fn owner(&self) -> Self::Owner;
}

impl PoolKey for Key {
    type Owner = Owner;
    fn owner(&self) -> Owner {
        self.owner.clone()
    }
}

/// A server name as a pool key: the forms one name takes (case, a trailing dot) are one key,
/// so a client cannot make several keys of one name.
pub fn server_name_key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
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

/// One source workload's part of the pool.
struct OwnerSlots<K> {
    /// Its keys, least recently used first.
    keys: LruCache<K, ()>,
    /// One per upstream connection it holds (moved into the connection's task).
    permits: Arc<Semaphore>,
}

/// The pool's bookkeeping, apart from I/O (unit-tested with fake connections).
struct Slots<K: PoolKey, C1, C2> {
    map: LruCache<K, Entry<C1, C2>>,
    owners: HashMap<K::Owner, OwnerSlots<K>>,
    max_destinations: usize,
    max_per_owner: usize,
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

impl<K: PoolKey, C1: Conn, C2: Conn + Clone> Slots<K, C1, C2> {
    fn new(max_destinations: usize, max_per_owner: usize, idle_timeout: Duration) -> Self {
        Slots {
            map: LruCache::new_unbounded(),
            owners: HashMap::new(),
            max_destinations: max_destinations.max(1),
            max_per_owner: max_per_owner.max(1),
            idle_timeout,
            h1: 0,
            h2: 0,
        }
    }

    fn owner_slots(&mut self, owner: K::Owner) -> &mut OwnerSlots<K> {
        let max = self.max_per_owner;
        self.owners
            .entry(owner)
            .or_insert_with(|| OwnerSlots { keys: LruCache::new_unbounded(), permits: Arc::new(Semaphore::new(max)) })
    }

    /// `key`'s entry, made most recently used; a new key past the bound evicts the least
    /// recently used key of the owner holding the most (returned, so the caller can count and
    /// log it): one workload's new destinations never push out another's while it holds more.
    fn entry(&mut self, key: &K) -> (&mut Entry<C1, C2>, Option<K>) {
        let mut evicted = None;
        if !self.map.contains_key(key) {
            if self.map.len() >= self.max_destinations {
                evicted = self.evict_for(&key.owner());
            }
            self.map.insert(key.clone(), Entry::default());
            self.owner_slots(key.owner()).keys.insert(key.clone(), ());
        } else if let Some(o) = self.owners.get_mut(&key.owner()) {
            o.keys.get(key);
        }
        (self.map.get_mut(key).expect("just inserted"), evicted)
    }

    /// Removes the least recently used key of the owner with the most keys (`inserting` on a
    /// tie). A walk of the owners, only when the bound is reached; the inserting owner is
    /// usually that one.
    fn evict_for(&mut self, inserting: &K::Owner) -> Option<K> {
        let mine = self.owners.get(inserting).map_or(0, |o| o.keys.len());
        let victim = self
            .owners
            .iter()
            .map(|(owner, o)| (o.keys.len(), owner))
            .filter(|(n, _)| *n > mine)
            .max_by_key(|(n, _)| *n)
            .map(|(_, owner)| owner.clone())
            .unwrap_or_else(|| inserting.clone());
        let key = match self.owners.get_mut(&victim).and_then(|o| o.keys.remove_lru()) {
            Some((key, ())) => key,
            // The inserting owner holds none: the pool's least recently used key.
            None => {
                let key = self.map.iter().next().map(|(k, _)| k.clone())?;
                if let Some(o) = self.owners.get_mut(&key.owner()) {
                    o.keys.remove(&key);
                }
                key
            }
        };
        let e = self.map.remove(&key)?;
        self.h1 -= e.h1.len();
        self.h2 -= usize::from(e.h2.is_some());
        Some(key)
    }

    /// The permits of `owner`'s connections.
    fn permits(&mut self, owner: &K::Owner) -> Arc<Semaphore> {
        self.owner_slots(owner.clone()).permits.clone()
    }

    /// Closes one of `owner`'s pooled connections to make room for a new one of its own: an
    /// idle HTTP/1.1 one (least recently used destination first), else an HTTP/2 one (which
    /// ends once its streams do). False when it holds none (all busy).
    fn free_one_of(&mut self, owner: &K::Owner) -> bool {
        let Some(o) = self.owners.get(owner) else { return false };
        for (key, ()) in o.keys.iter() {
            if let Some(entry) = self.map.peek_mut(key) {
                if let Some(i) = entry.h1.iter().position(|(c, _)| c.ready() || c.closed()) {
                    entry.h1.swap_remove(i);
                    self.h1 -= 1;
                    return true;
                }
            }
        }
        for (key, ()) in o.keys.iter() {
            if let Some(entry) = self.map.peek_mut(key) {
                if entry.h2.take().is_some() {
                    self.h2 -= 1;
                    return true;
                }
            }
        }
        false
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
        let owners = &mut self.owners;
        self.map.retain(|key, entry| {
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
            if !keep {
                if let Some(o) = owners.get_mut(&key.owner()) {
                    o.keys.remove(key);
                }
            }
            keep
        });
        // An owner is forgotten once it holds no key and no connection (a permit of a
        // connection still open keeps it: forgetting it would hand out a fresh set of permits).
        let max = self.max_per_owner;
        self.owners.retain(|_, o| !o.keys.is_empty() || o.permits.available_permits() < max);
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
        let keys: usize = self.owners.values().map(|o| o.keys.len()).sum();
        assert_eq!(keys, self.map.len(), "every key is its owner's");
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
            slots: Mutex::new(Slots::new(
                config.max_destinations,
                config.max_connections_per_workload,
                config.idle_timeout,
            )),
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
                owner = %key.owner,
                max = self.config.max_destinations,
                "upstream pool full: closed the idle connections of the least recently used destination of the workload holding the most"
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
    #[allow(clippy::too_many_arguments)]
    pub async fn send(
        &self,
        owner: Owner,
        target: SocketAddr,
        source: UpstreamSource,
        proxy: &ProxyAddrs,
        req: http::Request<RequestBody>,
        h2: bool,
        tls: Option<&UpstreamTls>,
    ) -> Result<(http::Response<Incoming>, Local), PoolError> {
        let tls_key = tls.map(|t| (server_name_key(&t.server_name), t.settings.clone()));
        let key = Key { owner, addr: target, source, tls: tls_key };
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

    /// A permit for one more upstream connection of `owner`: at its cap, one of its own idle
    /// connections is closed and one of its own is waited for (briefly), never another's.
    async fn permit(&self, owner: Owner) -> Result<OwnedSemaphorePermit, ConnectFailure> {
        let permits = self.with_slots(|s| (s.permits(&owner), None));
        if let Ok(p) = permits.clone().try_acquire_owned() {
            return Ok(p);
        }
        // Its connections turn idle as their responses end: look again every 50 ms.
        let deadline = Instant::now() + OWN_CONNECTION_WAIT;
        let mut freed = 0;
        loop {
            freed += usize::from(self.with_slots(|s| (s.free_one_of(&owner), None)));
            let left = deadline.saturating_duration_since(Instant::now());
            let step = left.min(Duration::from_millis(50));
            if let Ok(Ok(p)) = tokio::time::timeout(step, permits.clone().acquire_owned()).await {
                return Ok(p);
            }
            if left <= step {
                break;
            }
        }
        let max = self.config.max_connections_per_workload;
        self.metrics.limit_tripped(Limit::UpstreamConnectionsPerWorkload);
        warn!(%owner, max, freed, "workload at its upstream connection cap: request refused (503)");
        Err(ConnectFailure::WorkloadLimit(max))
    }

    /// Runs `connect` (TCP, TLS, HTTP handshake) under the connect timeout, with a permit of
    /// the key's owner that the connection holds until it closes; a timeout is counted and
    /// logged here, whichever step it struck.
    async fn timed_connect<'a, T, F>(
        &self,
        key: &'a Key,
        proxy: &'a ProxyAddrs,
        tls: Option<&'a UpstreamTls>,
        connect: impl FnOnce(
            SocketAddr,
            &'a ProxyAddrs,
            UpstreamSource,
            Option<&'a UpstreamTls>,
            Duration,
            OwnedSemaphorePermit,
        ) -> F,
    ) -> Result<T, ConnectFailure>
    where
        F: std::future::Future<Output = Result<T, ConnectFailure>>,
    {
        let permit = self.permit(key.owner.clone()).await?;
        let after = self.config.connect_timeout;
        let result = match tokio::time::timeout(after, connect(key.addr, proxy, key.source, tls, after, permit)).await {
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
    source: UpstreamSource,
    tls: Option<&UpstreamTls>,
    alpn: Option<&[u8]>,
    connect_timeout: Duration,
) -> Result<(Box<dyn Io>, Local), String> {
    establish(target, proxy, source, tls, alpn, connect_timeout).await.map_err(|e| PoolError::from(e).to_string())
}

async fn establish(
    target: SocketAddr,
    proxy: &ProxyAddrs,
    source: UpstreamSource,
    tls: Option<&UpstreamTls>,
    alpn: Option<&[u8]>,
    connect_timeout: Duration,
) -> Result<(Box<dyn Io>, Local), ConnectFailure> {
    let stream = connect_upstream(target, proxy, source, connect_timeout).await.map_err(|e| match e {
        UpstreamError::Timeout(_) => ConnectFailure::Timeout(target, connect_timeout),
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
    source: UpstreamSource,
    tls: Option<&UpstreamTls>,
    timeout: Duration,
    permit: OwnedSemaphorePermit,
) -> Result<H1, ConnectFailure> {
    let (stream, local) = establish(target, proxy, source, tls, Some(b"http/1.1"), timeout).await?;
    let (sender, connection) =
        http1::handshake(TokioIo::new(stream)).await.map_err(|e| ConnectFailure::Failed(e.to_string()))?;
    tokio::spawn(async move {
        // Its owner's permit, given back when the connection ends.
        let _permit = permit;
        if let Err(e) = connection.await {
            debug!(error = %e, "upstream h1 connection ended");
        }
    });
    Ok((sender, local))
}

async fn connect_h2(
    target: SocketAddr,
    proxy: &ProxyAddrs,
    source: UpstreamSource,
    tls: Option<&UpstreamTls>,
    timeout: Duration,
    permit: OwnedSemaphorePermit,
) -> Result<H2, ConnectFailure> {
    let (stream, local) = establish(target, proxy, source, tls, Some(b"h2"), timeout).await?;
    let (sender, connection) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .map_err(|e| ConnectFailure::Failed(e.to_string()))?;
    tokio::spawn(async move {
        let _permit = permit;
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

    /// Test keys: destinations 1..=99 are owner 0's, 101..=199 owner 1's, and so on.
    impl PoolKey for u16 {
        type Owner = u16;
        fn owner(&self) -> u16 {
            self / 100
        }
    }

    type TestSlots = Slots<u16, Fake, Fake>;
    const IDLE: Duration = Duration::from_secs(10);

    #[test]
    fn idle_h1_connections_are_reused_only_when_ready_and_closed_after_the_idle_timeout() {
        let mut s = TestSlots::new(8, 64, IDLE);
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
        let mut s = TestSlots::new(2, 64, IDLE);
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
        let mut s = TestSlots::new(8, 64, IDLE);
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
        let mut s = TestSlots::new(8, 64, IDLE);
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
    fn a_workload_filling_the_pool_evicts_its_own_keys_never_anothers() {
        let mut s = TestSlots::new(4, 64, IDLE);
        let now = Instant::now();
        // Owner 1 (the victim) holds one destination, used once long ago.
        s.put_h1(&101, Fake::new(101), now);
        // Owner 0 (hostile) opens 50 destinations: the bound is 4, and every eviction is its own.
        for d in 1..=50u16 {
            let (_, evicted) = s.put_h1(&d, Fake::new(u32::from(d)), now);
            if let Some(k) = evicted {
                assert_eq!(k / 100, 0, "evicted {k}, another workload's");
            }
        }
        assert_eq!(s.counts(), Counts { destinations: 4, h1: 4, h2: 0 });
        assert_eq!(s.take_h1(&101).map(|c| c.id), Some(101), "the victim's connection stayed pooled");
        // The hostile owner's most recent three stayed.
        assert!(s.take_h1(&50).is_some() && s.take_h1(&48).is_some() && s.take_h1(&47).is_none());
        // A third owner's first key takes one of the owner holding the most, not the victim's.
        s.put_h1(&101, Fake::new(101), now);
        assert_eq!(s.put_h1(&201, Fake::new(201), now).1.map(|k| k / 100), Some(0));
        assert_eq!(s.put_h1(&202, Fake::new(202), now).1.map(|k| k / 100), Some(0));
        // Now each holds at most two: owner 2's next key is its own (a tie goes to the inserter).
        assert_eq!(s.put_h1(&203, Fake::new(203), now).1.map(|k| k / 100), Some(2));
        assert!(s.take_h1(&101).is_some(), "still the victim's");
    }

    #[test]
    fn at_its_cap_a_workload_frees_its_own_idle_connections_first() {
        let mut s = TestSlots::new(8, 64, IDLE);
        let now = Instant::now();
        let (busy, idle, theirs) = (Fake::new(1), Fake::new(2), Fake::new(101));
        busy.busy.set(true);
        s.put_h1(&1, busy.clone(), now);
        s.put_h1(&2, idle.clone(), now);
        s.put_h1(&101, theirs.clone(), now);
        assert!(s.free_one_of(&0), "its idle connection");
        assert!(s.take_h1(&2).is_none() && s.take_h1(&101).is_some(), "its own went, not owner 1's");
        // Only busy ones left: nothing to close (a busy one is never cut).
        assert!(!s.free_one_of(&0));
        // An HTTP/2 connection goes when nothing idle is left (hyper keeps it for its streams).
        let H2Slot::Connect(cell) = s.h2(&3, now).0 else { panic!() };
        cell.set(Ok(Fake::new(3))).map_err(|_| ()).unwrap();
        s.h2_done(&3, &cell, now);
        assert!(s.free_one_of(&0));
        assert_eq!(s.counts().h2, 0);
    }

    #[test]
    fn an_owner_is_forgotten_only_when_it_holds_no_key_and_no_connection() {
        let mut s = TestSlots::new(8, 2, IDLE);
        let t0 = Instant::now();
        let permits = s.permits(&0);
        let held = permits.clone().try_acquire_owned().unwrap();
        s.put_h1(&1, Fake::new(1), t0);
        s.sweep(t0 + IDLE);
        assert_eq!(s.counts(), Counts::default());
        assert!(Arc::ptr_eq(&s.permits(&0), &permits), "a connection still holds a permit: same set");
        drop(held);
        s.sweep(t0 + IDLE);
        assert!(s.owners.is_empty(), "forgotten");
    }

    #[test]
    fn server_names_differing_only_in_case_or_a_trailing_dot_are_one_key() {
        assert_eq!(server_name_key("API.Example.COM."), "api.example.com");
        assert_eq!(server_name_key("api.example.com"), "api.example.com");
        assert_ne!(server_name_key("a.example.com"), server_name_key("b.example.com"));
    }

    #[tokio::test]
    async fn a_workload_past_its_connection_cap_is_refused_and_others_are_not() {
        let metrics = Arc::new(Metrics::new(None));
        let config = PoolConfig {
            connect_timeout: Duration::from_secs(1),
            idle_timeout: IDLE,
            max_destinations: 16,
            max_connections_per_workload: 3,
        };
        let pool = UpstreamPool::new(config, metrics.clone());
        let workload = |name: &str| {
            Owner::Workload(Arc::new(crate::registry::WorkloadInfo {
                cgroup_id: 1,
                node: String::new(),
                endpoint_id: 1,
                identity: 1,
                name: name.into(),
                namespace: "default".into(),
                labels: Default::default(),
                egress_enforced_by: Vec::new(),
                ingress_enforced_by: Vec::new(),
            }))
        };
        let hostile = workload("hostile");
        let held: Vec<_> = futures_lite(3, || pool.permit(hostile.clone())).await;
        let started = Instant::now();
        // The same workload (a restart: another cgroup, the same name) holds the same permits.
        assert!(matches!(pool.permit(workload("hostile")).await, Err(ConnectFailure::WorkloadLimit(3))));
        assert!(started.elapsed() >= OWN_CONNECTION_WAIT, "it waited for one of its own");
        assert!(metrics
            .encode()
            .contains("l7mesh_limits_tripped_total{limit=\"upstream_connections_per_workload\"} 1"));
        // Another workload is not affected.
        assert!(pool.permit(workload("victim")).await.is_ok());
        assert!(pool.permit(Owner::Peer(IpAddr::from([10, 0, 0, 1]))).await.is_ok());
        // One of its own ends while it waits: it goes ahead.
        let mut held = held;
        let one = held.pop().unwrap();
        let waiting = pool.permit(hostile);
        let release = async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            drop(one);
        };
        let (got, ()) = tokio::join!(waiting, release);
        assert!(got.is_ok());
    }

    /// `n` results of `f`, each unwrapped.
    async fn futures_lite<F, Fut, T>(n: usize, f: F) -> Vec<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, ConnectFailure>>,
    {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(f().await.map_err(|e| PoolError::from(e).to_string()).unwrap());
        }
        out
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

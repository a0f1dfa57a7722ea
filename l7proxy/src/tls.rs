//! TLS termination. Certificates and keys come only from the broker, over its proxy socket (the
//! broker checks this process's uid and cgroup); they live in memory, never on disk. The
//! broker is asked through [`BrokerClient`]: its socket on a node, or [`MemoryBroker`] in tests
//! that run the proxy without root (l7proxy/tests/direct.rs).
//!
//! Server configs are cached per name or secret in a bounded LRU (client-chosen SNIs must not
//! grow it without end), with one broker request in flight per name: concurrent handshakes for
//! a new name wait for the same fetch. Each entry's windows follow its own certificate's
//! notAfter: refreshed after half its remaining life (or `--cert-refresh`, if sooner), in the
//! background, while handshakes go on being served the cached certificate at once, until
//! shortly before it expires (so a short leaf lifetime never serves an expired certificate).
//! Only a name not cached, or one whose certificate is that close to its end, waits for the
//! broker. A broker failure for a name is remembered for `--cert-broker-backoff` (a bounded
//! negative cache): meanwhile that name is not asked for again, and a handshake that would
//! wait for it fails at once.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use hashlink::LruCache;
use l7mesh_api::broker::{Reply, Request};
use prometheus_client::metrics::gauge::Gauge;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::OnceCell;
use tracing::{debug, warn};

use crate::metrics::{Limit, Metrics};
use crate::tables::SecretName;

/// How long one broker request may take; then the handshakes waiting for it fail (a cached
/// certificate still valid is served meanwhile, whatever the broker does).
pub const BROKER_TIMEOUT: Duration = Duration::from_secs(5);

/// Default `--cert-broker-backoff`: how long a broker failure for one name is remembered.
/// As long as a broker request may take: a broker that is down costs one request per name
/// per period, not one per handshake.
pub const BROKER_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("the TLS broker at {path} cannot be reached: {source}")]
    BrokerUnreachable { path: PathBuf, source: std::io::Error },
    #[error("the TLS broker did not answer within {0:?}")]
    BrokerTimeout(Duration),
    #[error("the TLS broker refused: {0}")]
    BrokerRefused(String),
    #[error("the TLS broker's reply: {0}")]
    BadReply(String),
    #[error("the certificate or key: {0}")]
    Material(String),
    /// The fetch another handshake ran for the same name failed so.
    #[error("{0}")]
    Shared(String),
    /// The broker failed for this name a moment ago; it is not asked again yet.
    #[error("{error} (not asked again for {left:?})")]
    Backoff { error: String, left: Duration },
}

impl TlsError {
    /// The broker is down, stuck or broken (remembered per name for the backoff period). Its
    /// own answers (a refusal: no such secret yet, a name it cannot mint for) are not: the next
    /// handshake asks again, so an import takes effect at once, and a refusal costs the broker
    /// no more than the question.
    fn broker_unavailable(&self) -> bool {
        matches!(self, TlsError::BrokerUnreachable { .. } | TlsError::BrokerTimeout(_) | TlsError::BadReply(_))
    }
}

/// What a terminated connection is served with.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum CertKey {
    /// A leaf the broker mints from the mesh CA for this DNS name or IP.
    Minted(String),
    /// An imported secret.
    Secret(SecretName),
}

impl std::fmt::Display for CertKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CertKey::Minted(name) => write!(f, "mesh certificate for `{name}`"),
            CertKey::Secret(s) => write!(f, "secret {}/{}", s.namespace, s.name),
        }
    }
}

/// A value fetched from the broker and the windows its certificate allows.
struct Cached<T> {
    value: Arc<T>,
    /// Served from the cache until then; refreshed in the background after.
    refresh_at: Instant,
    /// Served until then at the latest (never past the certificate's life); after, a
    /// handshake waits for a new one.
    serve_until: Instant,
}

impl<T> Clone for Cached<T> {
    fn clone(&self) -> Self {
        Cached { value: self.value.clone(), refresh_at: self.refresh_at, serve_until: self.serve_until }
    }
}

/// The windows of a value fetched at `now` whose certificate ends at `not_after` (None: no
/// certificate, e.g. a trust-only client config: `refresh` and 23/12 of it).
fn windows(now: Instant, wall: SystemTime, not_after: Option<SystemTime>, refresh: Duration) -> (Instant, Instant) {
    let Some(not_after) = not_after else { return (now + refresh, now + refresh * 23 / 12) };
    let left = not_after.duration_since(wall).unwrap_or_default();
    if left.is_zero() {
        // Expired material (an imported secret): served as it is, asked for again each second
        // rather than per handshake, never served from the cache.
        return (now + Duration::from_secs(1), now);
    }
    // A twenty-fourth of the life left is kept back for the handshake and the client's clock.
    (now + refresh.min(left / 2), now + (left - left / 24))
}

/// One fetch, shared by every handshake that asked for its key meanwhile.
type Flight<T> = Arc<OnceCell<Result<Cached<T>, String>>>;

/// Fetch results for one kind of key: a bounded LRU, one fetch in flight per key, and the
/// recent failures (as bounded).
struct Cache<K, T> {
    entries: Mutex<LruCache<K, Cached<T>>>,
    inflight: Mutex<HashMap<K, Flight<T>>>,
    /// Key -> (not asked again before, the error).
    failures: Mutex<LruCache<K, (Instant, String)>>,
    capacity: usize,
    /// Set to the number of entries (server configs only).
    gauge: Option<Gauge>,
}

impl<K: Hash + Eq + Clone + std::fmt::Debug, T> Cache<K, T> {
    fn new(capacity: usize, gauge: Option<Gauge>) -> Self {
        let capacity = capacity.max(1);
        Cache {
            entries: Mutex::new(LruCache::new_unbounded()),
            inflight: Mutex::new(HashMap::new()),
            failures: Mutex::new(LruCache::new(capacity)),
            capacity,
            gauge,
        }
    }

    fn get(&self, key: &K) -> Option<Cached<T>> {
        self.entries.lock().expect("TLS cache").get(key).cloned()
    }

    /// Inserts, evicting the least recently used entry past the bound (returned).
    fn insert(&self, key: K, value: Cached<T>) -> Option<K> {
        let mut entries = self.entries.lock().expect("TLS cache");
        let mut evicted = None;
        if !entries.contains_key(&key) && entries.len() >= self.capacity {
            evicted = entries.remove_lru().map(|(k, _)| k);
        }
        entries.insert(key, value);
        if let Some(g) = &self.gauge {
            g.set(entries.len() as i64);
        }
        evicted
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().expect("TLS cache").len()
    }

    /// The fetch in flight for `key`, or a new one to run.
    fn flight(&self, key: &K) -> Flight<T> {
        self.inflight.lock().expect("TLS cache").entry(key.clone()).or_default().clone()
    }

    /// A new fetch for `key`, unless one is in flight already (None).
    fn new_flight(&self, key: &K) -> Option<Flight<T>> {
        let mut inflight = self.inflight.lock().expect("TLS cache");
        if inflight.contains_key(key) {
            return None;
        }
        let cell = Flight::default();
        inflight.insert(key.clone(), cell.clone());
        Some(cell)
    }

    fn landed(&self, key: &K, cell: &Flight<T>) {
        let mut inflight = self.inflight.lock().expect("TLS cache");
        if inflight.get(key).is_some_and(|c| Arc::ptr_eq(c, cell)) {
            inflight.remove(key);
        }
    }

    /// The error of a failure for `key` still remembered at `now`, and how long it still is.
    fn failed(&self, key: &K, now: Instant) -> Option<(String, Duration)> {
        let mut failures = self.failures.lock().expect("TLS cache");
        match failures.get(key) {
            Some((until, error)) if now < *until => Some((error.clone(), *until - now)),
            Some(_) => {
                failures.remove(key);
                None
            }
            None => None,
        }
    }

    /// Remembers a failure until `until` (the oldest remembered one goes past the bound: the
    /// negative cache is as bounded as the cache).
    fn fail(&self, key: K, until: Instant, error: String) {
        self.failures.lock().expect("TLS cache").insert(key, (until, error));
    }

    fn succeeded(&self, key: &K) {
        self.failures.lock().expect("TLS cache").remove(key);
    }
}

/// Where certificates and trust come from, one request and its reply at a time: the broker's
/// proxy socket on a node ([`SocketBroker`]), or [`MemoryBroker`], which tests fill (as
/// `crate::datapath::Datapath` stands in front of the pinned maps). The cache, single-flight,
/// refresh and backoff above it are the same for both.
pub trait BrokerClient: Send + Sync + 'static {
    /// One exchange: the reply as the broker sent it (a refusal is `ok: false`, not an error).
    fn exchange(&self, request: Request) -> Pin<Box<dyn Future<Output = Result<Reply, TlsError>> + Send + '_>>;
}

/// The broker's proxy socket (the broker checks this process's uid, cgroup and executable).
pub struct SocketBroker {
    pub socket: PathBuf,
}

impl SocketBroker {
    async fn exchange_once(&self, request: Request) -> Result<Reply, TlsError> {
        let unreachable = |source| TlsError::BrokerUnreachable { path: self.socket.clone(), source };
        let mut stream = UnixStream::connect(&self.socket).await.map_err(unreachable)?;
        let mut line = serde_json::to_string(&request).map_err(|e| TlsError::BadReply(e.to_string()))?;
        line.push('\n');
        stream.write_all(line.as_bytes()).await.map_err(unreachable)?;
        let mut reply = String::new();
        BufReader::new(stream).read_line(&mut reply).await.map_err(unreachable)?;
        serde_json::from_str(&reply).map_err(|e| TlsError::BadReply(e.to_string()))
    }
}

impl BrokerClient for SocketBroker {
    fn exchange(&self, request: Request) -> Pin<Box<dyn Future<Output = Result<Reply, TlsError>> + Send + '_>> {
        Box::pin(self.exchange_once(request))
    }
}

/// A broker held in memory, for tests that run the proxy without root (the real one admits
/// only root in l7proxy's cgroup): it answers from the CA, leaves and secrets a test sets,
/// and refuses the rest as the broker refuses what it has not (it mints nothing itself).
#[derive(Debug, Default)]
pub struct MemoryBroker {
    state: Mutex<MemoryState>,
}

#[derive(Debug, Default)]
struct MemoryState {
    ca: Option<String>,
    /// Name -> (certificate chain PEM, key PEM), what `IssueServer` for that name returns.
    leaves: HashMap<String, (String, String)>,
    secrets: HashMap<SecretName, Reply>,
    asked: Vec<Request>,
}

impl MemoryBroker {
    fn state(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The mesh CA (PEM), what `Ca` returns: the trust of origination without a secret.
    pub fn set_ca(&self, pem: impl Into<String>) {
        self.state().ca = Some(pem.into());
    }

    /// The leaf (chain and key, PEM) the broker would mint for `name`.
    pub fn set_leaf(&self, name: impl Into<String>, cert: impl Into<String>, key: impl Into<String>) {
        self.state().leaves.insert(name.into(), (cert.into(), key.into()));
    }

    /// An imported secret: its certificate and key (either may be absent) and CA.
    pub fn set_secret(&self, secret: SecretName, cert: Option<String>, key: Option<String>, ca: Option<String>) {
        self.state().secrets.insert(secret, Reply { ok: true, cert, key, ca, error: None });
    }

    /// Every request asked so far, oldest first.
    pub fn asked(&self) -> Vec<Request> {
        self.state().asked.clone()
    }

    fn answer(&self, request: Request) -> Reply {
        let mut state = self.state();
        state.asked.push(request.clone());
        match request {
            Request::Ca => match &state.ca {
                Some(ca) => Reply { ok: true, ca: Some(ca.clone()), ..Reply::default() },
                None => Reply::error("no mesh CA"),
            },
            Request::IssueServer { names } => match names.first().and_then(|n| state.leaves.get(n)) {
                Some((cert, key)) => {
                    Reply { ok: true, cert: Some(cert.clone()), key: Some(key.clone()), ..Reply::default() }
                }
                None => Reply::error(format!("no leaf for {names:?}")),
            },
            Request::Secret { namespace, name } => state
                .secrets
                .get(&SecretName { namespace, name })
                .cloned()
                .unwrap_or_else(|| Reply::error("no such secret")),
            other => Reply::error(format!("not a proxy request: {other:?}")),
        }
    }
}

impl BrokerClient for MemoryBroker {
    fn exchange(&self, request: Request) -> Pin<Box<dyn Future<Output = Result<Reply, TlsError>> + Send + '_>> {
        let reply = self.answer(request);
        Box::pin(async move { Ok(reply) })
    }
}

/// The broker, and the counter of requests sent to it.
#[derive(Clone)]
struct Broker {
    client: Arc<dyn BrokerClient>,
    metrics: Arc<Metrics>,
}

impl Broker {
    /// One request, bounded by [`BROKER_TIMEOUT`], counted in
    /// `l7mesh_tls_broker_requests_total{result}`; a refusal is [`TlsError::BrokerRefused`].
    async fn ask(&self, request: Request) -> Result<Reply, TlsError> {
        let reply = tokio::time::timeout(BROKER_TIMEOUT, self.client.exchange(request))
            .await
            .unwrap_or(Err(TlsError::BrokerTimeout(BROKER_TIMEOUT)))
            .and_then(|reply| match reply.ok {
                true => Ok(reply),
                false => Err(TlsError::BrokerRefused(reply.error.unwrap_or_default())),
            });
        self.metrics.tls_broker_request(if reply.is_ok() { "ok" } else { "failed" });
        reply
    }

    /// A server config presenting `key`'s certificate, from the broker.
    async fn server_config(&self, key: CertKey) -> Result<(Arc<ServerConfig>, Option<SystemTime>), TlsError> {
        let request = match &key {
            CertKey::Minted(name) => Request::IssueServer { names: vec![name.clone()] },
            CertKey::Secret(s) => Request::Secret { namespace: s.namespace.clone(), name: s.name.clone() },
        };
        let reply = self.ask(request).await?;
        let (Some(cert), Some(private_key)) = (reply.cert, reply.key) else {
            return Err(TlsError::Material(format!("{key} has no certificate and key")));
        };
        let (chain, private_key) = parse_pair(&cert, &private_key)?;
        let not_after = not_after(&chain);
        Ok((server_config(chain, private_key)?, not_after))
    }

    /// A client config for origination: trusting the secret's CA (else the mesh CA and the
    /// system roots) and presenting the secret's certificate when it has one (mTLS).
    async fn client_config(
        &self,
        secret: Option<SecretName>,
    ) -> Result<(Arc<ClientConfig>, Option<SystemTime>), TlsError> {
        let (trust, identity) = match &secret {
            Some(s) => {
                let reply = self.ask(Request::Secret { namespace: s.namespace.clone(), name: s.name.clone() }).await?;
                let identity = match (reply.cert, reply.key) {
                    (Some(cert), Some(key)) => Some(parse_pair(&cert, &key)?),
                    _ => None,
                };
                (reply.ca, identity)
            }
            None => (None, None),
        };
        let mut roots = RootCertStore::empty();
        match trust {
            Some(ca) => add_pem(&mut roots, &ca)?,
            None => {
                let mesh = self.ask(Request::Ca).await?;
                add_pem(&mut roots, mesh.ca.as_deref().unwrap_or_default())?;
                if let Ok(system) = std::fs::read_to_string(SYSTEM_ROOTS) {
                    add_pem(&mut roots, &system)?;
                }
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::Material(e.to_string()))?
            .with_root_certificates(roots);
        let (config, not_after) = match identity {
            Some((chain, key)) => {
                let not_after = not_after(&chain);
                let config =
                    builder.with_client_auth_cert(chain, key).map_err(|e| TlsError::Material(e.to_string()))?;
                (config, not_after)
            }
            None => (builder.with_no_client_auth(), None),
        };
        Ok((Arc::new(config), not_after))
    }
}

pub struct CertSource {
    broker: Broker,
    cache: Arc<Cache<CertKey, ServerConfig>>,
    clients: Arc<Cache<Option<SecretName>, ClientConfig>>,
    refresh_after: Duration,
    backoff: Duration,
    metrics: Arc<Metrics>,
}

/// The system trust roots, next to the mesh CA, for origination without a secret CA.
pub const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// How the proxy opens TLS to a destination (`originatingTLS`).
#[derive(Clone)]
pub struct Originate {
    /// ALPN is set per upstream connection from the request's version.
    pub config: Arc<ClientConfig>,
    /// The name the upstream certificate must carry: the port's first serverNames entry; else
    /// (None) the request's host, else the destination IP.
    pub server_name: Option<String>,
    /// Tells pooled connections of different trust settings apart.
    pub settings: String,
}

/// What a fetch's result is stored with (owned: a refresh runs in a task of its own).
struct Store<K, T> {
    cache: Arc<Cache<K, T>>,
    key: K,
    refresh_after: Duration,
    backoff: Duration,
    metrics: Arc<Metrics>,
}

impl<K: Hash + Eq + Clone + std::fmt::Debug, T> Store<K, T> {
    /// Runs `fetch` and caches its result, or remembers its failure.
    async fn run(
        self,
        fetch: impl Future<Output = Result<(Arc<T>, Option<SystemTime>), TlsError>>,
    ) -> Result<Cached<T>, String> {
        match fetch.await {
            Ok((value, not_after)) => {
                let (refresh_at, serve_until) =
                    windows(Instant::now(), SystemTime::now(), not_after, self.refresh_after);
                let entry = Cached { value, refresh_at, serve_until };
                self.cache.succeeded(&self.key);
                if let Some(evicted) = self.cache.insert(self.key, entry.clone()) {
                    self.metrics.limit_tripped(Limit::TlsCertCache);
                    warn!(
                        ?evicted,
                        capacity = self.cache.capacity,
                        "TLS certificate cache full: dropped the least recently used"
                    );
                }
                Ok(entry)
            }
            Err(e) if e.broker_unavailable() => {
                let e = e.to_string();
                warn!(error = %e, key = ?self.key, backoff = ?self.backoff, "TLS broker request failed; not asked again for this name meanwhile");
                self.cache.fail(self.key, Instant::now() + self.backoff, e.clone());
                Err(e)
            }
            Err(e) => {
                warn!(error = %e, key = ?self.key, "TLS broker request failed");
                Err(e.to_string())
            }
        }
    }
}

impl CertSource {
    /// Certificates are fetched anew after half their remaining life, or after `refresh_after`
    /// if that is sooner; at most `capacity` server configs are kept; a broker failure for a
    /// name is remembered for `backoff`.
    pub fn new(
        socket: PathBuf,
        refresh_after: Duration,
        capacity: usize,
        backoff: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self::with_broker(Arc::new(SocketBroker { socket }), refresh_after, capacity, backoff, metrics)
    }

    /// As [`CertSource::new`], asking `client` instead of the broker's socket.
    pub fn with_broker(
        client: Arc<dyn BrokerClient>,
        refresh_after: Duration,
        capacity: usize,
        backoff: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        CertSource {
            broker: Broker { client, metrics: metrics.clone() },
            cache: Arc::new(Cache::new(capacity, Some(metrics.cert_cache_entries.clone()))),
            clients: Arc::new(Cache::new(capacity, None)),
            refresh_after,
            backoff,
            metrics,
        }
    }

    /// A client config for origination: trusting the secret's CA (else the mesh CA and the
    /// system roots) and presenting the secret's certificate when it has one (mTLS).
    /// One request to the broker, bounded and counted as every other (the tunnel's identities).
    pub async fn ask_broker(&self, request: Request) -> Result<Reply, TlsError> {
        self.broker.ask(request).await
    }

    pub async fn client_config(&self, secret: Option<&SecretName>) -> Result<Arc<ClientConfig>, TlsError> {
        let (broker, owned) = (self.broker.clone(), secret.cloned());
        self.cached(&self.clients, secret.cloned(), move || async move { broker.client_config(owned).await }).await
    }

    /// A server config presenting `key`'s certificate: cached, else from the broker.
    pub async fn server_config(&self, key: &CertKey) -> Result<Arc<ServerConfig>, TlsError> {
        let (broker, owned) = (self.broker.clone(), key.clone());
        self.cached(&self.cache, key.clone(), move || async move { broker.server_config(owned).await }).await
    }

    /// The cached value for `key` while it may be served: at once, with a refresh started in
    /// the background once it is due (one per key at a time; none while a failure for the key
    /// is remembered). Otherwise (not cached, or too close to its end) `fetch`ed now, one
    /// fetch per key at a time (the others wait for it), unless the broker failed for this
    /// key a moment ago: then at once that error.
    async fn cached<K, T, F, Fut>(&self, cache: &Arc<Cache<K, T>>, key: K, fetch: F) -> Result<Arc<T>, TlsError>
    where
        K: Hash + Eq + Clone + std::fmt::Debug + Send + Sync + 'static,
        T: Send + Sync + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(Arc<T>, Option<SystemTime>), TlsError>> + Send + 'static,
    {
        let now = Instant::now();
        let store = |key: K| Store {
            cache: cache.clone(),
            key,
            refresh_after: self.refresh_after,
            backoff: self.backoff,
            metrics: self.metrics.clone(),
        };
        if let Some(c) = cache.get(&key) {
            if now < c.refresh_at {
                return Ok(c.value);
            }
            if now < c.serve_until {
                // Due for a refresh but still good: the handshake never waits for it.
                if cache.failed(&key, now).is_none() {
                    if let Some(cell) = cache.new_flight(&key) {
                        debug!(?key, "refreshing a cached TLS certificate in the background");
                        let (store, cache) = (store(key.clone()), cache.clone());
                        tokio::spawn(async move {
                            let _ = cell.get_or_init(|| store.run(fetch())).await;
                            cache.landed(&key, &cell);
                        });
                    }
                }
                return Ok(c.value);
            }
        }
        if let Some((error, left)) = cache.failed(&key, now) {
            self.metrics.limit_tripped(Limit::TlsBrokerBackoff);
            return Err(TlsError::Backoff { error, left });
        }
        let cell = cache.flight(&key);
        let fetched = cell.get_or_init(|| store(key.clone()).run(fetch())).await.clone();
        cache.landed(&key, &cell);
        fetched.map(|entry| entry.value).map_err(TlsError::Shared)
    }
}

fn parse_pair(cert: &str, key: &str) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Material(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| TlsError::Material(e.to_string()))?;
    Ok((chain, key))
}

/// The leaf's notAfter (the chain's first certificate); None if it does not parse.
fn not_after(chain: &[CertificateDer<'_>]) -> Option<SystemTime> {
    let (_, cert) = x509_parser::parse_x509_certificate(chain.first()?.as_ref()).ok()?;
    let secs = u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0);
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

fn add_pem(roots: &mut RootCertStore, pem: &str) -> Result<(), TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Material(e.to_string()))?;
    roots.add_parsable_certificates(certs);
    Ok(())
}

/// TLS 1.3 and 1.2 with rustls's default (modern) suites; no client certificate is requested
/// (never merely because a secret carries a CA). ALPN is set per connection (`with_alpn`).
fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Material(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Material(e.to_string()))?;
    Ok(Arc::new(config))
}

/// What ALPN a terminated connection offers, from what the plaintext upstream can be assumed to
/// speak: gRPC needs h2 (the HTTP stack keeps a request's version upstream, and gRPC is never
/// downgraded); other HTTP gets http/1.1, which every HTTP server speaks; opaque forwarding
/// offers nothing, so the client's protocol reaches the server unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alpn {
    Grpc,
    Http,
    Opaque,
}

pub fn with_alpn(config: &ServerConfig, alpn: Alpn) -> Arc<ServerConfig> {
    let mut config = config.clone();
    config.alpn_protocols = match alpn {
        Alpn::Grpc => vec![b"h2".to_vec()],
        Alpn::Http => vec![b"http/1.1".to_vec()],
        Alpn::Opaque => Vec::new(),
    };
    Arc::new(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const DAY: Duration = Duration::from_secs(24 * 3600);

    #[test]
    fn windows_follow_the_certificates_own_not_after() {
        let (now, wall) = (Instant::now(), SystemTime::now());
        // A day-long leaf with a 12 h --cert-refresh: refreshed at 12 h, stale until 23 h.
        let (refresh, stale) = windows(now, wall, Some(wall + DAY), DAY / 2);
        assert_eq!((refresh - now, stale - now), (DAY / 2, DAY - DAY / 24));
        // A 20 s leaf under the same flag: refreshed at 10 s, never served past ~19.2 s.
        let short = Duration::from_secs(20);
        let (refresh, stale) = windows(now, wall, Some(wall + short), DAY / 2);
        assert_eq!(refresh - now, Duration::from_secs(10));
        assert!(stale - now < short && stale > refresh, "{:?}", stale - now);
        // An expired imported certificate: asked for again after a second, never served stale.
        let (refresh, stale) = windows(now, wall, Some(wall - short), DAY / 2);
        assert_eq!((refresh - now, stale), (Duration::from_secs(1), now));
        // No certificate (a trust-only client config): the flag's windows.
        assert_eq!(windows(now, wall, None, short), (now + short, now + short * 23 / 12));
    }

    fn source(capacity: usize) -> CertSource {
        source_with(capacity, BROKER_BACKOFF)
    }

    fn source_with(capacity: usize, backoff: Duration) -> CertSource {
        let metrics = Arc::new(Metrics::new(None));
        CertSource::new("/nonexistent/broker.sock".into(), DAY / 2, capacity, backoff, metrics)
    }

    type Fetched = Result<(Arc<u32>, Option<SystemTime>), TlsError>;

    /// A fetch that counts its runs, waits `delay`, then yields `value` living `life` (or fails).
    fn counted(
        asked: &Arc<AtomicUsize>,
        delay: Duration,
        value: Option<u32>,
        life: Duration,
    ) -> impl FnOnce() -> std::pin::Pin<Box<dyn Future<Output = Fetched> + Send>> + Send + 'static {
        let asked = asked.clone();
        move || {
            Box::pin(async move {
                asked.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(delay).await;
                match value {
                    Some(v) => Ok((Arc::new(v), Some(SystemTime::now() + life))),
                    None => Err(TlsError::BrokerTimeout(BROKER_TIMEOUT)),
                }
            })
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_fetches_of_one_name_ask_the_broker_once() {
        let certs = Arc::new(source(8));
        let cache = Arc::new(Cache::<Option<SecretName>, u32>::new(8, None));
        let asked = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (certs, asked, cache) = (certs.clone(), asked.clone(), cache.clone());
            tasks.push(tokio::spawn(async move {
                let fetch = counted(&asked, Duration::from_millis(200), Some(7), DAY);
                certs.cached(&cache, None, fetch).await.map(|v| *v)
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), 7);
        }
        assert_eq!(asked.load(Ordering::SeqCst), 1);
        // Another name is not held up by a slow fetch of this one.
        let slow = certs.cached(&cache, Some(secret("slow")), counted(&asked, Duration::from_secs(30), Some(0), DAY));
        let quick = certs.cached(&cache, Some(secret("quick")), counted(&asked, Duration::ZERO, Some(1), DAY));
        tokio::select! {
            _ = slow => panic!("the slow fetch ended first"),
            got = quick => assert_eq!(*got.unwrap(), 1),
        }
    }

    fn secret(name: &str) -> SecretName {
        SecretName { namespace: "default".into(), name: name.into() }
    }

    #[tokio::test]
    async fn the_cache_is_bounded_and_its_trips_are_counted() {
        let certs = source(3);
        let cache = Arc::new(Cache::<Option<SecretName>, u32>::new(3, None));
        let asked = Arc::new(AtomicUsize::new(0));
        for i in 0..10u32 {
            let fetch = counted(&asked, Duration::ZERO, Some(i), DAY);
            certs.cached(&cache, Some(secret(&format!("s{i}"))), fetch).await.unwrap();
        }
        assert_eq!(cache.len(), 3);
        assert!(certs.metrics.encode().contains("l7mesh_limits_tripped_total{limit=\"tls_cert_cache\"} 7"));
        // The most recent ones stayed.
        assert!(cache.get(&Some(secret("s9"))).is_some() && cache.get(&Some(secret("s0"))).is_none());
        // Failures are remembered as boundedly.
        for i in 0..10u32 {
            let fetch = counted(&asked, Duration::ZERO, None, DAY);
            assert!(certs.cached(&cache, Some(secret(&format!("f{i}"))), fetch).await.is_err());
        }
        assert_eq!(cache.failures.lock().unwrap().len(), 3);
    }

    #[tokio::test]
    async fn a_due_refresh_runs_in_the_background_and_the_cached_one_is_served_meanwhile() {
        let certs = source(8);
        let cache = Arc::new(Cache::<Option<SecretName>, u32>::new(8, None));
        let key = Some(secret("web"));
        let asked = Arc::new(AtomicUsize::new(0));
        // Fetched with 4 s left: refreshed after 2 s, served until ~3.8 s.
        let life = Duration::from_secs(4);
        certs.cached(&cache, key.clone(), counted(&asked, Duration::ZERO, Some(1), life)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2100)).await;
        // Due: a slow refresh (a broker that hangs) starts, and every handshake meanwhile gets
        // the cached value at once, starting no second refresh.
        let started = Instant::now();
        for _ in 0..20 {
            let fetch = counted(&asked, Duration::from_millis(500), Some(2), life);
            assert_eq!(*certs.cached(&cache, key.clone(), fetch).await.unwrap(), 1);
        }
        assert!(started.elapsed() < Duration::from_millis(100), "{:?}", started.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(asked.load(Ordering::SeqCst), 2, "one refresh in flight");
        // It lands: the next handshake gets the new one.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let fetch = counted(&asked, Duration::ZERO, Some(3), life);
        assert_eq!(*certs.cached(&cache, key.clone(), fetch).await.unwrap(), 2);
        assert_eq!(asked.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_failed_refresh_serves_the_cached_one_only_inside_its_life_and_is_not_retried_per_handshake() {
        let certs = source(8);
        let cache = Arc::new(Cache::<Option<SecretName>, u32>::new(8, None));
        let key = Some(secret("web"));
        let asked = Arc::new(AtomicUsize::new(0));
        // Fetched with 2 s left: refreshed after 1 s, served until ~1.9 s.
        let life = Duration::from_secs(2);
        certs.cached(&cache, key.clone(), counted(&asked, Duration::ZERO, Some(1), life)).await.unwrap();
        let failing = || counted(&asked, Duration::ZERO, None, life);
        assert_eq!(*certs.cached(&cache, key.clone(), failing()).await.unwrap(), 1, "fresh: no fetch");
        assert_eq!(asked.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_millis(1200)).await;
        for _ in 0..10 {
            assert_eq!(*certs.cached(&cache, key.clone(), failing()).await.unwrap(), 1, "due, still valid");
            tokio::task::yield_now().await;
        }
        assert_eq!(asked.load(Ordering::SeqCst), 2, "one refresh; its failure is remembered");
        tokio::time::sleep(Duration::from_millis(800)).await;
        // Past its window: never served; the remembered failure answers at once.
        let e = certs.cached(&cache, key, failing()).await.unwrap_err();
        assert!(matches!(e, TlsError::Backoff { .. }) && e.to_string().contains("did not answer"), "{e}");
        assert_eq!(asked.load(Ordering::SeqCst), 2);
        assert!(certs.metrics.encode().contains("l7mesh_limits_tripped_total{limit=\"tls_broker_backoff\"} 1"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_name_is_asked_for_once_per_backoff_period() {
        // A broker request that takes 200 ms to fail, remembered for 600 ms.
        let (timeout, backoff) = (Duration::from_millis(200), Duration::from_millis(600));
        let certs = Arc::new(source_with(8, backoff));
        let cache = Arc::new(Cache::<Option<SecretName>, u32>::new(8, None));
        let asked = Arc::new(AtomicUsize::new(0));
        let key = Some(secret("down"));
        let wave = |n: usize| {
            let tasks: Vec<_> = (0..n)
                .map(|_| {
                    let (certs, cache, key, asked) = (certs.clone(), cache.clone(), key.clone(), asked.clone());
                    tokio::spawn(async move {
                        let fetch = counted(&asked, timeout, None, DAY);
                        certs.cached(&cache, key, fetch).await.map(|v| *v)
                    })
                })
                .collect();
            async move {
                let mut errors = Vec::new();
                for t in tasks {
                    errors.push(t.await.unwrap().unwrap_err());
                }
                errors
            }
        };
        // 30 handshakes at once for a name the broker cannot serve: one request, all fail.
        let errors = wave(30).await;
        assert_eq!(asked.load(Ordering::SeqCst), 1);
        assert!(errors.iter().all(|e| matches!(e, TlsError::Shared(_))), "{errors:?}");
        // Within the backoff period: at once, and no request.
        let started = Instant::now();
        let errors = wave(30).await;
        assert!(errors.iter().all(|e| matches!(e, TlsError::Backoff { .. })), "{errors:?}");
        assert_eq!((asked.load(Ordering::SeqCst), started.elapsed() < Duration::from_millis(100)), (1, true));
        // After it: one request again.
        tokio::time::sleep(backoff).await;
        wave(30).await;
        assert_eq!(asked.load(Ordering::SeqCst), 2);
        // A refusal (the broker's own answer, e.g. no such secret yet) is not remembered.
        let refused =
            || async { Err::<(Arc<u32>, Option<SystemTime>), _>(TlsError::BrokerRefused("no secret".into())) };
        let before = asked.load(Ordering::SeqCst);
        for _ in 0..3 {
            let asked = asked.clone();
            let fetch = move || async move {
                asked.fetch_add(1, Ordering::SeqCst);
                refused().await
            };
            assert!(matches!(certs.cached(&cache, Some(secret("new")), fetch).await, Err(TlsError::Shared(_))));
        }
        assert_eq!(asked.load(Ordering::SeqCst), before + 3, "asked each time");
    }
}

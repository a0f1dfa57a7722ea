//! TLS termination. Certificates and keys come only from the broker, over its proxy socket (the
//! broker checks this process's uid and cgroup); they live in memory, never on disk.
//!
//! Server configs are cached per name or secret in a bounded LRU (client-chosen SNIs must not
//! grow it without end), with one broker request in flight per name: concurrent handshakes for
//! a new name wait for the same fetch. Each entry's windows follow its own certificate's
//! notAfter: fetched anew after half its remaining life (or `--cert-refresh`, if sooner), and,
//! when the broker cannot answer, served stale only until shortly before it expires (and says
//! so), so a short leaf lifetime never serves an expired certificate.

use std::collections::HashMap;
use std::hash::Hash;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use hashlink::LruCache;
use prometheus_client::metrics::gauge::Gauge;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::OnceCell;
use tracing::warn;

use crate::metrics::{Limit, Metrics};
use crate::tables::SecretName;

/// How long one broker request may take; then the handshakes waiting for it fail (a cached
/// certificate still inside its stale window is served instead).
pub const BROKER_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// Served from the cache until then; fetched anew after.
    refresh_at: Instant,
    /// Served while the broker cannot answer until then (never past the certificate's life).
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
        // rather than per handshake, never served stale.
        return (now + Duration::from_secs(1), now);
    }
    // A twenty-fourth of the life left is kept back for the handshake and the client's clock.
    (now + refresh.min(left / 2), now + (left - left / 24))
}

/// One fetch, shared by every handshake that asked for its key meanwhile.
type Flight<T> = Arc<OnceCell<Result<Cached<T>, String>>>;

/// Fetch results for one kind of key: a bounded LRU, and one fetch in flight per key.
struct Cache<K, T> {
    entries: Mutex<LruCache<K, Cached<T>>>,
    inflight: Mutex<HashMap<K, Flight<T>>>,
    capacity: usize,
    /// Set to the number of entries (server configs only).
    gauge: Option<Gauge>,
}

impl<K: Hash + Eq + Clone + std::fmt::Debug, T> Cache<K, T> {
    fn new(capacity: usize, gauge: Option<Gauge>) -> Self {
        Cache {
            entries: Mutex::new(LruCache::new_unbounded()),
            inflight: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
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

    fn landed(&self, key: &K, cell: &Flight<T>) {
        let mut inflight = self.inflight.lock().expect("TLS cache");
        if inflight.get(key).is_some_and(|c| Arc::ptr_eq(c, cell)) {
            inflight.remove(key);
        }
    }
}

pub struct CertSource {
    socket: PathBuf,
    cache: Cache<CertKey, ServerConfig>,
    clients: Cache<Option<SecretName>, ClientConfig>,
    refresh_after: Duration,
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

impl CertSource {
    /// Certificates are fetched anew after half their remaining life, or after `refresh_after`
    /// if that is sooner; at most `capacity` server configs are kept.
    pub fn new(socket: PathBuf, refresh_after: Duration, capacity: usize, metrics: Arc<Metrics>) -> Self {
        CertSource {
            socket,
            cache: Cache::new(capacity, Some(metrics.cert_cache_entries.clone())),
            clients: Cache::new(capacity, None),
            refresh_after,
            metrics,
        }
    }

    /// A client config for origination: trusting the secret's CA (else the mesh CA and the
    /// system roots) and presenting the secret's certificate when it has one (mTLS).
    pub async fn client_config(&self, secret: Option<&SecretName>) -> Result<Arc<ClientConfig>, TlsError> {
        let fetch = async {
            let (trust, identity) = match secret {
                Some(s) => {
                    let reply = self
                        .ask(tls_broker::Request::Secret { namespace: s.namespace.clone(), name: s.name.clone() })
                        .await?;
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
                    let mesh = self.ask(tls_broker::Request::Ca).await?;
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
            Ok::<_, TlsError>((Arc::new(config), not_after))
        };
        self.cached(&self.clients, secret.cloned(), fetch).await
    }

    /// The cached value for `key` before its refresh time; else `fetch`ed anew (one fetch per
    /// key at a time: the others wait for it) and cached; when fetching fails, the cached one
    /// still inside its stale window.
    async fn cached<K: Hash + Eq + Clone + std::fmt::Debug, T>(
        &self,
        cache: &Cache<K, T>,
        key: K,
        fetch: impl std::future::Future<Output = Result<(Arc<T>, Option<SystemTime>), TlsError>>,
    ) -> Result<Arc<T>, TlsError> {
        let cached = cache.get(&key);
        if let Some(c) = &cached {
            if Instant::now() < c.refresh_at {
                return Ok(c.value.clone());
            }
        }
        let cell = cache.flight(&key);
        let fetched = cell
            .get_or_init(|| async {
                let (value, not_after) = fetch.await.map_err(|e| e.to_string())?;
                let (refresh_at, serve_until) =
                    windows(Instant::now(), SystemTime::now(), not_after, self.refresh_after);
                let entry = Cached { value, refresh_at, serve_until };
                if let Some(evicted) = cache.insert(key.clone(), entry.clone()) {
                    self.metrics.limit_tripped(Limit::TlsCertCache);
                    warn!(
                        ?evicted,
                        capacity = cache.capacity,
                        "TLS certificate cache full: dropped the least recently used"
                    );
                }
                Ok(entry)
            })
            .await
            .clone();
        cache.landed(&key, &cell);
        match fetched {
            Ok(entry) => Ok(entry.value),
            Err(e) => match cached {
                Some(c) if Instant::now() < c.serve_until => {
                    warn!(error = %e, ?key, "broker unavailable; using the cached TLS settings");
                    Ok(c.value)
                }
                _ => Err(TlsError::Shared(e)),
            },
        }
    }

    /// One request on the broker's proxy socket.
    async fn ask(&self, request: tls_broker::Request) -> Result<tls_broker::Reply, TlsError> {
        tokio::time::timeout(BROKER_TIMEOUT, self.ask_once(request))
            .await
            .unwrap_or(Err(TlsError::BrokerTimeout(BROKER_TIMEOUT)))
    }

    async fn ask_once(&self, request: tls_broker::Request) -> Result<tls_broker::Reply, TlsError> {
        let unreachable = |source| TlsError::BrokerUnreachable { path: self.socket.clone(), source };
        let mut stream = UnixStream::connect(&self.socket).await.map_err(unreachable)?;
        let mut line = serde_json::to_string(&request).map_err(|e| TlsError::BadReply(e.to_string()))?;
        line.push('\n');
        stream.write_all(line.as_bytes()).await.map_err(unreachable)?;
        let mut reply = String::new();
        BufReader::new(stream).read_line(&mut reply).await.map_err(unreachable)?;
        let reply: tls_broker::Reply = serde_json::from_str(&reply).map_err(|e| TlsError::BadReply(e.to_string()))?;
        if !reply.ok {
            return Err(TlsError::BrokerRefused(reply.error.unwrap_or_default()));
        }
        Ok(reply)
    }

    /// A server config presenting `key`'s certificate: cached, else from the broker.
    pub async fn server_config(&self, key: &CertKey) -> Result<Arc<ServerConfig>, TlsError> {
        self.cached(&self.cache, key.clone(), self.fetch(key)).await
    }

    async fn fetch(&self, key: &CertKey) -> Result<(Arc<ServerConfig>, Option<SystemTime>), TlsError> {
        let request = match key {
            CertKey::Minted(name) => tls_broker::Request::IssueServer { names: vec![name.clone()] },
            CertKey::Secret(s) => tls_broker::Request::Secret { namespace: s.namespace.clone(), name: s.name.clone() },
        };
        let reply = self.ask(request).await?;
        let (Some(cert), Some(private_key)) = (reply.cert, reply.key) else {
            return Err(TlsError::Material(format!("{key} has no certificate and key")));
        };
        let (chain, private_key) = parse_pair(&cert, &private_key)?;
        let not_after = not_after(&chain);
        Ok((server_config(chain, private_key)?, not_after))
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
        let metrics = Arc::new(Metrics::new(None));
        CertSource::new("/nonexistent/broker.sock".into(), DAY / 2, capacity, metrics)
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
                let fetch = async {
                    asked.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Ok((Arc::new(7u32), Some(SystemTime::now() + DAY)))
                };
                certs.cached(&cache, None, fetch).await.map(|v| *v)
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), 7);
        }
        assert_eq!(asked.load(Ordering::SeqCst), 1);
        // Another name is not held up by a slow fetch of this one.
        let slow = certs.cached(&cache, Some(secret("slow")), async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok((Arc::new(0u32), None))
        });
        let quick = certs.cached(&cache, Some(secret("quick")), async { Ok((Arc::new(1u32), None)) });
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
        let cache = Cache::<Option<SecretName>, u32>::new(3, None);
        for i in 0..10u32 {
            let fetch = async move { Ok((Arc::new(i), Some(SystemTime::now() + DAY))) };
            certs.cached(&cache, Some(secret(&format!("s{i}"))), fetch).await.unwrap();
        }
        assert_eq!(cache.len(), 3);
        assert!(certs.metrics.encode().contains("l7mesh_limits_tripped_total{limit=\"tls_cert_cache\"} 7"));
        // The most recent ones stayed.
        assert!(cache.get(&Some(secret("s9"))).is_some() && cache.get(&Some(secret("s0"))).is_none());
    }

    #[tokio::test]
    async fn a_failed_refresh_serves_the_cached_one_only_inside_its_life() {
        let certs = source(8);
        let cache = Cache::<Option<SecretName>, u32>::new(8, None);
        let key = Some(secret("web"));
        // Fetched with 2 s left: refreshed after 1 s, stale until ~1.9 s.
        let fetch = async { Ok((Arc::new(1u32), Some(SystemTime::now() + Duration::from_secs(2)))) };
        certs.cached(&cache, key.clone(), fetch).await.unwrap();
        let failing = || async { Err::<(Arc<u32>, _), _>(TlsError::BrokerTimeout(BROKER_TIMEOUT)) };
        assert_eq!(*certs.cached(&cache, key.clone(), failing()).await.unwrap(), 1, "fresh: no fetch");
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(*certs.cached(&cache, key.clone(), failing()).await.unwrap(), 1, "stale, still valid");
        tokio::time::sleep(Duration::from_millis(800)).await;
        let e = certs.cached(&cache, key, failing()).await.unwrap_err();
        assert!(e.to_string().contains("did not answer"), "{e}");
    }
}

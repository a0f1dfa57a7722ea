//! TLS termination. Certificates and keys come only from the broker, over its proxy socket (the
//! broker checks this process's uid and cgroup); they live in memory, never on disk. Server
//! configs are cached per name or secret and refetched after half the leaf lifetime; when the
//! broker cannot answer, a cached config still inside its lifetime keeps serving (and says so).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tracing::warn;

use crate::tables::SecretName;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("the TLS broker at {path} cannot be reached: {source}")]
    BrokerUnreachable { path: PathBuf, source: std::io::Error },
    #[error("the TLS broker refused: {0}")]
    BrokerRefused(String),
    #[error("the TLS broker's reply: {0}")]
    BadReply(String),
    #[error("the certificate or key: {0}")]
    Material(String),
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

/// A value fetched from the broker, and when.
type Cached<T> = (Arc<T>, Instant);

pub struct CertSource {
    socket: PathBuf,
    cache: Mutex<HashMap<CertKey, Cached<ServerConfig>>>,
    clients: Mutex<HashMap<Option<SecretName>, Cached<ClientConfig>>>,
    refresh_after: Duration,
    serve_at_most: Duration,
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
    /// A certificate fetched `refresh_after` ago is refetched (about half the broker's leaf
    /// lifetime); past 23/12 of it a cached one is no longer served, broker or not.
    pub fn new(socket: PathBuf, refresh_after: Duration) -> Self {
        CertSource {
            socket,
            cache: Mutex::new(HashMap::new()),
            clients: Mutex::new(HashMap::new()),
            refresh_after,
            serve_at_most: refresh_after * 23 / 12,
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
            let config = match identity {
                Some((chain, key)) => {
                    builder.with_client_auth_cert(chain, key).map_err(|e| TlsError::Material(e.to_string()))?
                }
                None => builder.with_no_client_auth(),
            };
            Ok::<_, TlsError>(Arc::new(config))
        };
        self.cached(&self.clients, secret.cloned(), fetch).await
    }

    /// The cached value for `key` while it is younger than `refresh_after`; else `fetch`ed anew
    /// and cached; when fetching fails, the cached one still younger than `serve_at_most`.
    async fn cached<K: std::hash::Hash + Eq + std::fmt::Debug, T>(
        &self,
        cache: &Mutex<HashMap<K, Cached<T>>>,
        key: K,
        fetch: impl std::future::Future<Output = Result<Arc<T>, TlsError>>,
    ) -> Result<Arc<T>, TlsError> {
        let cached = cache.lock().expect("TLS cache").get(&key).cloned();
        if let Some((value, fetched)) = &cached {
            if fetched.elapsed() < self.refresh_after {
                return Ok(value.clone());
            }
        }
        match fetch.await {
            Ok(value) => {
                cache.lock().expect("TLS cache").insert(key, (value.clone(), Instant::now()));
                Ok(value)
            }
            Err(e) => match cached {
                Some((value, fetched)) if fetched.elapsed() < self.serve_at_most => {
                    warn!(error = %e, ?key, "broker unavailable; using the cached TLS settings");
                    Ok(value)
                }
                _ => Err(e),
            },
        }
    }

    /// One request on the broker's proxy socket.
    async fn ask(&self, request: tls_broker::Request) -> Result<tls_broker::Reply, TlsError> {
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

    async fn fetch(&self, key: &CertKey) -> Result<Arc<ServerConfig>, TlsError> {
        let request = match key {
            CertKey::Minted(name) => tls_broker::Request::IssueServer { names: vec![name.clone()] },
            CertKey::Secret(s) => tls_broker::Request::Secret { namespace: s.namespace.clone(), name: s.name.clone() },
        };
        let reply = self.ask(request).await?;
        let (Some(cert), Some(private_key)) = (reply.cert, reply.key) else {
            return Err(TlsError::Material(format!("{key} has no certificate and key")));
        };
        let (chain, private_key) = parse_pair(&cert, &private_key)?;
        server_config(chain, private_key)
    }
}

fn parse_pair(cert: &str, key: &str) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Material(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| TlsError::Material(e.to_string()))?;
    Ok((chain, key))
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

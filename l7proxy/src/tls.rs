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
use rustls::ServerConfig;
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tracing::warn;

use crate::tables::SecretName;

/// A certificate fetched this long ago is refetched (the broker's leaves live 24 h).
pub const REFRESH_AFTER: Duration = Duration::from_secs(12 * 3600);
/// Past this age a cached certificate is no longer served, broker or not.
pub const SERVE_AT_MOST: Duration = Duration::from_secs(23 * 3600);

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

pub struct CertSource {
    socket: PathBuf,
    cache: Mutex<HashMap<CertKey, (Arc<ServerConfig>, Instant)>>,
}

impl CertSource {
    pub fn new(socket: PathBuf) -> Self {
        CertSource { socket, cache: Mutex::new(HashMap::new()) }
    }

    /// A server config presenting `key`'s certificate: cached, else from the broker.
    pub async fn server_config(&self, key: &CertKey) -> Result<Arc<ServerConfig>, TlsError> {
        let cached = self.cache.lock().expect("cert cache").get(key).cloned();
        if let Some((config, fetched)) = &cached {
            if fetched.elapsed() < REFRESH_AFTER {
                return Ok(config.clone());
            }
        }
        match self.fetch(key).await {
            Ok(config) => {
                self.cache.lock().expect("cert cache").insert(key.clone(), (config.clone(), Instant::now()));
                Ok(config)
            }
            Err(e) => match cached {
                Some((config, fetched)) if fetched.elapsed() < SERVE_AT_MOST => {
                    warn!(error = %e, cert = %key, "broker unavailable; serving the cached certificate");
                    Ok(config)
                }
                _ => Err(e),
            },
        }
    }

    async fn fetch(&self, key: &CertKey) -> Result<Arc<ServerConfig>, TlsError> {
        let request = match key {
            CertKey::Minted(name) => tls_broker::Request::IssueServer { names: vec![name.clone()] },
            CertKey::Secret(s) => tls_broker::Request::Secret { namespace: s.namespace.clone(), name: s.name.clone() },
        };
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
        let (Some(cert), Some(private_key)) = (reply.cert, reply.key) else {
            return Err(TlsError::Material(format!("{key} has no certificate and key")));
        };
        let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Material(e.to_string()))?;
        let private_key =
            PrivateKeyDer::from_pem_slice(private_key.as_bytes()).map_err(|e| TlsError::Material(e.to_string()))?;
        server_config(chain, private_key)
    }
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

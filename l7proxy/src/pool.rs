//! Upstream HTTP connections, reused per original destination across downstream connections:
//! one multiplexed HTTP/2 connection per destination, and a bounded set of idle HTTP/1.1
//! connections per destination (one request at a time each). A destination reached with TLS
//! (`originatingTLS`) is pooled apart, per server name and trust settings.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use hyper::body::Incoming;

use crate::http::RequestBody;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Mutex;
use tracing::debug;

use crate::proxy::connect_upstream;
use redirector::ProxyAddrs;

/// Idle HTTP/1.1 connections kept per destination; more are closed when their response ends.
pub const MAX_IDLE_PER_DESTINATION: usize = 64;

type H1 = (http1::SendRequest<RequestBody>, Local);
type H2 = (http2::SendRequest<RequestBody>, Local);

/// Why an upstream request failed: reaching the upstream, or the exchange itself (kept as
/// hyper's error, whose source says whether the request body failed on its way).
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("{0}")]
    Connect(String),
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

#[derive(Default)]
pub struct UpstreamPool {
    h1: Mutex<HashMap<Key, Vec<H1>>>,
    h2: Mutex<HashMap<Key, H2>>,
}

impl UpstreamPool {
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
            let (mut sender, local) = self.h2_sender(&key, proxy, tls).await.map_err(PoolError::Connect)?;
            let resp = sender.send_request(req).await?;
            return Ok((resp, local));
        }
        let (mut sender, local) = match self.idle_h1(&key).await {
            Some(s) => s,
            None => connect_h1(target, proxy, tls).await.map_err(PoolError::Connect)?,
        };
        sender.ready().await?;
        let resp = sender.send_request(req).await?;
        // Back to the pool at once: it turns ready again when this response's body ends, and
        // `idle_h1` only hands out ready connections.
        let mut pool = self.h1.lock().await;
        let idle = pool.entry(key).or_default();
        if idle.len() < MAX_IDLE_PER_DESTINATION {
            idle.push((sender, local));
        }
        Ok((resp, local))
    }

    async fn idle_h1(&self, key: &Key) -> Option<H1> {
        let mut pool = self.h1.lock().await;
        let idle = pool.get_mut(key)?;
        idle.retain(|(s, _)| !s.is_closed());
        let i = idle.iter().position(|(s, _)| s.is_ready())?;
        Some(idle.swap_remove(i))
    }

    async fn h2_sender(&self, key: &Key, proxy: &ProxyAddrs, tls: Option<&UpstreamTls>) -> Result<H2, String> {
        let mut pool = self.h2.lock().await;
        if let Some((s, local)) = pool.get(key) {
            if !s.is_closed() {
                return Ok((s.clone(), *local));
            }
        }
        let (stream, local) = connect(key.addr, proxy, tls, Some(b"h2")).await?;
        let (sender, connection) =
            http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(error = %e, "upstream h2 connection ended");
            }
        });
        pool.insert(key.clone(), (sender.clone(), local));
        Ok((sender, local))
    }
}

/// A new upstream connection, with TLS (offering `alpn`, if any) when `tls` says so.
pub async fn connect(
    target: SocketAddr,
    proxy: &ProxyAddrs,
    tls: Option<&UpstreamTls>,
    alpn: Option<&[u8]>,
) -> Result<(Box<dyn Io>, Local), String> {
    let stream = connect_upstream(target, proxy).await.map_err(|e| e.to_string())?;
    let local = stream.local_addr().ok();
    let Some(tls) = tls else { return Ok((Box::new(stream), local)) };
    let mut config = (*tls.config).clone();
    config.alpn_protocols = alpn.map(|a| vec![a.to_vec()]).unwrap_or_default();
    let name = ServerName::try_from(tls.server_name.clone())
        .map_err(|e| format!("upstream server name `{}`: {e}", tls.server_name))?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, stream).await;
    tls.metrics.tls("originate", if stream.is_ok() { "ok" } else { "failed" });
    let stream = stream.map_err(|e| format!("upstream TLS to {target} as `{}`: {e}", tls.server_name))?;
    Ok((Box::new(stream), local))
}

async fn connect_h1(target: SocketAddr, proxy: &ProxyAddrs, tls: Option<&UpstreamTls>) -> Result<H1, String> {
    let (stream, local) = connect(target, proxy, tls, Some(b"http/1.1")).await?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            debug!(error = %e, "upstream h1 connection ended");
        }
    });
    Ok((sender, local))
}

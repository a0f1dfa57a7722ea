//! Upstream HTTP connections, reused per original destination across downstream connections:
//! one multiplexed HTTP/2 connection per destination, and a bounded set of idle HTTP/1.1
//! connections per destination (one request at a time each).

use std::collections::HashMap;
use std::net::SocketAddr;

use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::Mutex;
use tracing::debug;

use crate::proxy::connect_upstream;
use redirector::ProxyAddrs;

/// Idle HTTP/1.1 connections kept per destination; more are closed when their response ends.
pub const MAX_IDLE_PER_DESTINATION: usize = 64;

type H1 = (http1::SendRequest<Incoming>, String);
type H2 = (http2::SendRequest<Incoming>, String);

#[derive(Default)]
pub struct UpstreamPool {
    h1: Mutex<HashMap<SocketAddr, Vec<H1>>>,
    h2: Mutex<HashMap<SocketAddr, H2>>,
}

impl UpstreamPool {
    /// Sends `req` to `target` over a pooled connection of the request's own version (or a new
    /// one). Returns the response head and the upstream connection's local address.
    pub async fn send(
        &self,
        target: SocketAddr,
        proxy: &ProxyAddrs,
        req: http::Request<Incoming>,
        h2: bool,
    ) -> Result<(http::Response<Incoming>, String), String> {
        if h2 {
            let (mut sender, local) = self.h2_sender(target, proxy).await?;
            let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
            return Ok((resp, local));
        }
        let (mut sender, local) = match self.idle_h1(target).await {
            Some(s) => s,
            None => connect_h1(target, proxy).await?,
        };
        sender.ready().await.map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        // Back to the pool at once: it turns ready again when this response's body ends, and
        // `idle_h1` only hands out ready connections.
        let mut pool = self.h1.lock().await;
        let idle = pool.entry(target).or_default();
        if idle.len() < MAX_IDLE_PER_DESTINATION {
            idle.push((sender, local.clone()));
        }
        Ok((resp, local))
    }

    async fn idle_h1(&self, target: SocketAddr) -> Option<H1> {
        let mut pool = self.h1.lock().await;
        let idle = pool.get_mut(&target)?;
        idle.retain(|(s, _)| !s.is_closed());
        let i = idle.iter().position(|(s, _)| s.is_ready())?;
        Some(idle.swap_remove(i))
    }

    async fn h2_sender(&self, target: SocketAddr, proxy: &ProxyAddrs) -> Result<H2, String> {
        let mut pool = self.h2.lock().await;
        if let Some((s, local)) = pool.get(&target) {
            if !s.is_closed() {
                return Ok((s.clone(), local.clone()));
            }
        }
        let stream = connect_upstream(target, proxy).await.map_err(|e| e.to_string())?;
        let local = stream.local_addr().map(|a| a.to_string()).unwrap_or_default();
        let (sender, connection) =
            http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(error = %e, "upstream h2 connection ended");
            }
        });
        pool.insert(target, (sender.clone(), local.clone()));
        Ok((sender, local))
    }
}

async fn connect_h1(target: SocketAddr, proxy: &ProxyAddrs) -> Result<H1, String> {
    let stream = connect_upstream(target, proxy).await.map_err(|e| e.to_string())?;
    let local = stream.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let (sender, connection) = http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            debug!(error = %e, "upstream h1 connection ended");
        }
    });
    Ok((sender, local))
}

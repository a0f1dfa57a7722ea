//! The policy stream: l7proxy keeps one connection to policy-api's proxy socket
//! (`<run dir>/policy-proxy.sock`, root only). policy-api sends every compiled version as one
//! JSON line (`{"version": N, "published": {...}}`) the moment it exists, and the current one
//! on connect; the proxy builds the tables, swaps them in and answers `{"loaded": N}`.
//! policy-api flips the kernel's generation only after that answer, so the proxy never judges
//! with an older policy than the kernel (see ARCHITECTURE.md, "The policy pipeline").
//!
//! When policy-api is away the proxy keeps the tables it has and reconnects.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use l7mesh_api::stream::{Close, FromProxy, ToProxy, Update};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::registry::Registry;
use crate::tables::{Published, Tables};

/// A message made ready to apply (off the runtime).
enum Built {
    Tables { version: u64, seq: u64, tables: Arc<Tables> },
    Close { version: u64, seq: u64, close: Vec<std::net::SocketAddr>, reroute: Vec<std::net::SocketAddr> },
}

/// Follows policy-api until shutdown. `loaded` tracks the version in force (readiness).
pub async fn follow(
    socket: PathBuf,
    registry: Arc<Registry>,
    live: Arc<crate::context::LiveConnections>,
    loaded: Arc<AtomicU64>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut said_waiting = false;
    loop {
        let session = async {
            let stream = UnixStream::connect(&socket).await?;
            info!(socket = %socket.display(), "following policy-api");
            said_waiting = false;
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            while let Some(line) = lines.next_line().await? {
                // Parsing a version and building its tables (work that grows with the policy)
                // happen on the blocking pool, never on a thread that serves connections.
                let parsed = tokio::task::spawn_blocking(move || {
                    ToProxy::<Published>::parse(&line).map(|m| match m {
                        ToProxy::Update(Update { version, seq, published }) => {
                            Built::Tables { version, seq, tables: Arc::new(Tables::build(published)) }
                        }
                        ToProxy::Close(Close { version, seq, close, reroute }) => {
                            Built::Close { version, seq, close, reroute }
                        }
                    })
                })
                .await
                .map_err(std::io::Error::other)?;
                let ack = match parsed {
                    Ok(Built::Tables { version, seq, tables }) => {
                        for e in &tables.errors {
                            warn!(error = %e, "policy table rule skipped (it matches nothing)");
                        }
                        let errors = tables.errors.clone();
                        let old = registry.set_tables(tables);
                        tokio::task::spawn_blocking(move || drop(old));
                        loaded.store(version, Ordering::Release);
                        info!(version, "policy tables loaded");
                        FromProxy::Loaded { loaded: version, seq, errors }
                    }
                    Ok(Built::Close { version, seq, close, reroute }) => {
                        let (closed, rerouted) = live.close(&close, &reroute).await;
                        info!(
                            version,
                            asked = close.len() + reroute.len(),
                            closed,
                            rerouted,
                            "closed proxied connections the policy denies or carries differently"
                        );
                        FromProxy::Closed { closed, rerouted, seq }
                    }
                    Err(e) => {
                        // Keep what is in force: a garbled update must not open anything.
                        warn!(error = %e, "unreadable policy stream message; keeping the current tables");
                        continue;
                    }
                };
                let ack = serde_json::to_string(&ack).map_err(std::io::Error::other)?;
                write.write_all(format!("{ack}\n").as_bytes()).await?;
            }
            Ok::<_, std::io::Error>(())
        };
        tokio::select! {
            result = session => {
                match result {
                    Ok(()) => warn!("policy-api closed the policy stream; keeping the current tables"),
                    Err(e) if !said_waiting => {
                        warn!(socket = %socket.display(), error = %e, "policy-api not reachable; keeping the current tables and retrying");
                        said_waiting = true;
                    }
                    Err(_) => {}
                }
            }
            _ = shutdown.changed() => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

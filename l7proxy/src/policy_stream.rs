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

use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::registry::Registry;
use crate::tables::{Published, Tables};

/// A new policy version.
#[derive(Deserialize)]
struct Update {
    version: u64,
    #[serde(default)]
    seq: u64,
    published: Published,
}

/// Connections a new version denies (`close`) or carries differently (`reroute`), by
/// downstream peer, to close.
#[derive(Deserialize)]
struct Close {
    version: u64,
    seq: u64,
    close: Option<Vec<std::net::SocketAddr>>,
    #[serde(default)]
    reroute: Vec<std::net::SocketAddr>,
}

/// One line from policy-api. (Not an untagged enum: serde's buffering of untagged content
/// cannot read the tables' integer map keys.)
enum Message {
    Update(Update),
    Close { version: u64, seq: u64, close: Vec<std::net::SocketAddr>, reroute: Vec<std::net::SocketAddr> },
}

/// A message made ready to apply (off the runtime).
enum Built {
    Tables { version: u64, seq: u64, tables: Arc<Tables> },
    Close { version: u64, seq: u64, close: Vec<std::net::SocketAddr>, reroute: Vec<std::net::SocketAddr> },
}

fn parse(line: &str) -> Result<Message, serde_json::Error> {
    if let Ok(Close { version, seq, close: Some(close), reroute }) = serde_json::from_str::<Close>(line) {
        return Ok(Message::Close { version, seq, close, reroute });
    }
    serde_json::from_str::<Update>(line).map(Message::Update)
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
                    parse(&line).map(|m| match m {
                        Message::Update(Update { version, seq, published }) => {
                            Built::Tables { version, seq, tables: Arc::new(Tables::build(published)) }
                        }
                        Message::Close { version, seq, close, reroute } => {
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
                        serde_json::json!({ "loaded": version, "seq": seq, "errors": errors })
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
                        serde_json::json!({ "closed": closed, "rerouted": rerouted, "seq": seq })
                    }
                    Err(e) => {
                        // Keep what is in force: a garbled update must not open anything.
                        warn!(error = %e, "unreadable policy stream message; keeping the current tables");
                        continue;
                    }
                };
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

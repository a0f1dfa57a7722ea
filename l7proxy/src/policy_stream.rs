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
use crate::tables::Tables;
use l7mesh_api::tables::Published;

/// A message made ready to apply (off the runtime).
enum Built {
    Tables { version: u64, seq: u64, tables: Arc<Tables> },
    Close { version: u64, seq: u64, close: Vec<std::net::SocketAddr>, reroute: Vec<std::net::SocketAddr> },
}

/// Whether a stream line is a version (not a close command), without parsing its tables:
/// only an update carries `"published"` at its top level. (Serialized by `l7mesh_api::stream`:
/// an update's fields are `version`, `seq`, `published`, in that order.)
fn is_update(line: &str) -> bool {
    matches!(serde_json::from_str::<UpdateHead>(line), Ok(UpdateHead { published: Some(_) }))
}

#[derive(serde::Deserialize)]
struct UpdateHead {
    #[serde(default)]
    published: Option<serde::de::IgnoredAny>,
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
            let mut pending = std::collections::VecDeque::new();
            loop {
                if pending.is_empty() {
                    let Some(line) = lines.next_line().await? else { break };
                    pending.push_back(line);
                }
                // Whatever else has arrived already (a proxy that was stopped, or slow, finds
                // the version policy-api refused followed by the one it put back in force):
                // only the newest version is loaded, so one that was refused is never judged
                // with. (`next_line` is cancel-safe: a line not complete yet stays buffered.)
                loop {
                    match tokio::time::timeout(Duration::ZERO, lines.next_line()).await {
                        Ok(Ok(Some(line))) => pending.push_back(line),
                        Ok(Err(e)) => return Err(e),
                        // Nothing more yet, or the end (the next read sees it again).
                        Ok(Ok(None)) | Err(_) => break,
                    }
                }
                let line = pending.pop_front().expect("a line");
                if pending.iter().any(|l| is_update(l)) && is_update(&line) {
                    warn!("a newer policy version is already here: skipping the one before it");
                    continue;
                }
                // Parsing a version and building its tables (work that grows with the policy)
                // happen on the blocking pool, never on a thread that serves connections.
                let parsed = tokio::task::spawn_blocking(move || {
                    ToProxy::<Published>::parse(&line).map(|m| match m {
                        ToProxy::Update(Update { version, seq, published }) => {
                            Built::Tables { version, seq, tables: Arc::new(Tables::build(&published)) }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn updates_are_told_from_close_commands_without_their_tables() {
        let update = ToProxy::Update(Update { version: 3, seq: 9, published: serde_json::json!({"version": 3}) });
        let close = ToProxy::<serde_json::Value>::Close(Close { version: 3, seq: 10, close: vec![], reroute: vec![] });
        assert!(is_update(&update.to_line().unwrap()));
        assert!(!is_update(&close.to_line().unwrap()));
        assert!(!is_update("garbled"));
    }
}

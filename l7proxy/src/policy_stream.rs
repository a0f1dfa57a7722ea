//! The policy stream: l7proxy keeps one connection to policy-api's proxy socket
//! (`<run dir>/policy-proxy.sock`, root only). policy-api sends every compiled version as one
//! JSON line (`{"version": N, "published": {...}}`) the moment it exists, and the current one
//! on connect; the proxy builds the tables, swaps them in and answers `{"loaded": N}`.
//! policy-api flips the kernel's generation only after that answer, so the proxy never judges
//! with an older policy than the kernel (see ARCHITECTURE.md, "Live apply").
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

#[derive(Deserialize)]
struct Update {
    version: u64,
    #[serde(default)]
    seq: u64,
    published: Published,
}

/// Follows policy-api until shutdown. `loaded` tracks the version in force (readiness).
pub async fn follow(
    socket: PathBuf,
    registry: Arc<Registry>,
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
                let update: Update = match serde_json::from_str(&line) {
                    Ok(u) => u,
                    Err(e) => {
                        // Keep what is in force: a garbled update must not open anything.
                        warn!(error = %e, "unreadable policy update; keeping the current tables");
                        continue;
                    }
                };
                let tables = Tables::build(update.published);
                for e in &tables.errors {
                    warn!(error = %e, "policy table rule skipped (it matches nothing)");
                }
                let errors = tables.errors.clone();
                registry.set_tables(Arc::new(tables));
                loaded.store(update.version, Ordering::Release);
                info!(version = update.version, "policy tables loaded");
                let ack = serde_json::json!({ "loaded": update.version, "seq": update.seq, "errors": errors });
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

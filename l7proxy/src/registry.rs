//! What the node controller publishes in `<state dir>/proxy-rules.json` (workloads, policy
//! names, the ipcache and the L7 rule tables), compiled into [`Tables`], plus the kernel's
//! listener table; both re-read at most every [`REFRESH`], or at once when a lookup misses.
//! Each request takes the current `Arc<Tables>`, so a new policy version applies from the next
//! request on every open connection.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use redirector::Maps;
use tracing::{info, warn};

pub use crate::tables::WorkloadInfo;
use crate::tables::{Published, Tables};

pub const REFRESH: Duration = Duration::from_millis(250);

#[derive(Default)]
struct State {
    checked: Option<Instant>,
    mtime: Option<SystemTime>,
    tables: Arc<Tables>,
    listeners: Vec<redirector::Listener>,
}

pub struct Registry {
    path: Option<PathBuf>,
    maps: Arc<Maps>,
    state: RwLock<State>,
}

impl Registry {
    pub fn new(path: Option<PathBuf>, maps: Arc<Maps>) -> Self {
        Registry { path, maps, state: RwLock::new(State::default()) }
    }

    /// Re-reads the sources when `REFRESH` has passed, or at once when `force`.
    fn refresh(&self, force: bool) {
        let fresh = self.state.read().map(|s| s.checked.is_some_and(|t| t.elapsed() < REFRESH)).unwrap_or(false);
        if fresh && !force {
            return;
        }
        let Ok(mut s) = self.state.write() else { return };
        s.checked = Some(Instant::now());
        s.listeners = self.maps.listeners();
        let Some(path) = &self.path else { return };
        let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        if mtime == s.mtime {
            return;
        }
        s.mtime = mtime;
        let published: Published = match std::fs::read(path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(p) => p,
                Err(e) => {
                    // Keep the tables we have: a half-written file must not open anything.
                    warn!(path = %path.display(), error = %e, "unreadable policy tables; keeping the current ones");
                    s.mtime = None;
                    return;
                }
            },
            Err(_) => Published::default(),
        };
        let tables = Tables::build(published);
        for e in &tables.errors {
            warn!(error = %e, "policy table rule skipped");
        }
        info!(version = tables.version, "policy tables loaded");
        s.tables = Arc::new(tables);
    }

    /// The current tables.
    pub fn tables(&self) -> Arc<Tables> {
        self.refresh(false);
        self.state.read().map(|s| s.tables.clone()).unwrap_or_default()
    }

    pub fn workload(&self, cgroup_id: u64) -> Option<Arc<WorkloadInfo>> {
        if let Some(w) = self.tables().workload(cgroup_id) {
            return Some(w);
        }
        self.refresh(true);
        self.tables().workload(cgroup_id)
    }

    /// The workload listening on `addr` (exact address, then wildcard).
    pub fn listener(&self, addr: SocketAddr) -> Option<Arc<WorkloadInfo>> {
        let lookup = |s: &State| {
            let owner = s
                .listeners
                .iter()
                .filter(|l| l.protocol == redirector::Protocol::Tcp && l.addr.port() == addr.port())
                .find(|l| l.addr.ip() == addr.ip() || l.addr.ip().is_unspecified())?;
            s.tables.workload(owner.cgroup_id)
        };
        self.refresh(false);
        if let Some(w) = self.state.read().ok().and_then(|s| lookup(&s)) {
            return Some(w);
        }
        self.refresh(true);
        self.state.read().ok().and_then(|s| lookup(&s))
    }

    pub fn policy_name(&self, id: u32) -> Option<String> {
        self.tables().policy_name(id)
    }
}

//! Names for flow endpoints: the workload registry and policy names the node controller
//! publishes in `<state dir>/proxy-rules.json`, and the kernel's listener table, both re-read
//! at most every [`REFRESH`] (the controller rewrites the file on every policy change).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use redirector::Maps;
use serde::Deserialize;

pub const REFRESH: Duration = Duration::from_millis(250);

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct WorkloadInfo {
    pub cgroup_id: u64,
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
struct Published {
    #[serde(default)]
    workloads: Vec<WorkloadInfo>,
    #[serde(default)]
    policy_ids: BTreeMap<u32, String>,
}

#[derive(Default)]
struct State {
    checked: Option<Instant>,
    mtime: Option<SystemTime>,
    workloads: HashMap<u64, Arc<WorkloadInfo>>,
    policies: HashMap<u32, String>,
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

    /// Re-reads the sources when `REFRESH` has passed, or at once when `force` (a lookup
    /// missed: a workload may have registered a moment ago).
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
        let published: Published =
            std::fs::read(path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        s.workloads = published.workloads.into_iter().map(|w| (w.cgroup_id, Arc::new(w))).collect();
        s.policies = published.policy_ids.into_iter().collect();
    }

    pub fn workload(&self, cgroup_id: u64) -> Option<Arc<WorkloadInfo>> {
        self.refresh(false);
        if let Some(w) = self.state.read().ok()?.workloads.get(&cgroup_id) {
            return Some(w.clone());
        }
        self.refresh(true);
        self.state.read().ok()?.workloads.get(&cgroup_id).cloned()
    }

    /// The workload listening on `addr` (exact address, then wildcard).
    pub fn listener(&self, addr: SocketAddr) -> Option<Arc<WorkloadInfo>> {
        self.refresh(false);
        let s = self.state.read().ok()?;
        let owner = s
            .listeners
            .iter()
            .filter(|l| l.protocol == redirector::Protocol::Tcp && l.addr.port() == addr.port())
            .find(|l| l.addr.ip() == addr.ip())
            .or_else(|| s.listeners.iter().find(|l| l.addr.port() == addr.port() && l.addr.ip().is_unspecified()))?;
        s.workloads.get(&owner.cgroup_id).cloned()
    }

    pub fn policy_name(&self, id: u32) -> Option<String> {
        self.refresh(false);
        self.state.read().ok()?.policies.get(&id).cloned()
    }
}

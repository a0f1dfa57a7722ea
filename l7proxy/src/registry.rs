//! The current [`Tables`] (what policy-api streams: workloads, policy names, the ipcache and the
//! L7 rule tables; swapped whole by `policy_stream`), plus the kernel's listener table, re-read
//! at most every [`REFRESH`] or at once when a lookup misses. Each request takes the current
//! `Arc<Tables>`, so a new policy version applies from the next request on every open
//! connection.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use redirector::Maps;

use crate::tables::Tables;
pub use crate::tables::WorkloadInfo;

pub const REFRESH: Duration = Duration::from_millis(250);

#[derive(Default)]
struct State {
    checked: Option<Instant>,
    tables: Arc<Tables>,
    listeners: Vec<redirector::Listener>,
}

pub struct Registry {
    maps: Arc<Maps>,
    state: RwLock<State>,
    /// The tables come from policy-api: until the first version is in, nothing is judged.
    requires_policy: bool,
}

impl Registry {
    pub fn new(maps: Arc<Maps>, requires_policy: bool) -> Self {
        Registry { maps, state: RwLock::new(State::default()), requires_policy }
    }

    /// True when the tables come from policy-api (the proxy judges nothing without them).
    pub fn requires_policy(&self) -> bool {
        self.requires_policy
    }

    /// True while the policy stream has not delivered its first version.
    pub fn awaiting_policy(&self) -> bool {
        self.requires_policy && self.state.read().map(|s| s.tables.version == 0).unwrap_or(true)
    }

    /// Swaps in a new policy version: one pointer store; requests in flight keep the `Arc`
    /// they took.
    pub fn set_tables(&self, tables: Arc<Tables>) {
        if let Ok(mut s) = self.state.write() {
            s.tables = tables;
        }
    }

    /// Re-reads the kernel's listener table when `REFRESH` has passed, or at once when `force`.
    fn refresh(&self, force: bool) {
        let fresh = self.state.read().map(|s| s.checked.is_some_and(|t| t.elapsed() < REFRESH)).unwrap_or(false);
        if fresh && !force {
            return;
        }
        let Ok(mut s) = self.state.write() else { return };
        s.checked = Some(Instant::now());
        s.listeners = self.maps.listeners();
    }

    /// The current tables.
    pub fn tables(&self) -> Arc<Tables> {
        self.refresh(false);
        self.state.read().map(|s| s.tables.clone()).unwrap_or_default()
    }

    /// The workload of `cgroup_id` in the tables in force (policy-api pushes every change).
    pub fn workload(&self, cgroup_id: u64) -> Option<Arc<WorkloadInfo>> {
        self.tables().workload(cgroup_id)
    }

    /// The workload listening on `addr` as of the last listener refresh (at most [`REFRESH`]
    /// old): for naming flow endpoints.
    pub fn listener(&self, addr: SocketAddr) -> Option<Arc<WorkloadInfo>> {
        self.refresh(false);
        self.state.read().ok().and_then(|s| Self::lookup(&s, addr))
    }

    fn lookup(s: &State, addr: SocketAddr) -> Option<Arc<WorkloadInfo>> {
        let owner = s
            .listeners
            .iter()
            .filter(|l| l.protocol == redirector::Protocol::Tcp && l.addr.port() == addr.port())
            .find(|l| l.addr.ip() == addr.ip() || l.addr.ip().is_unspecified())?;
        s.tables.workload(owner.cgroup_id)
    }

    /// The workload listening on `addr` when the kernel says one does: re-reads the kernel's
    /// listener table on a miss, since that workload's rules must be applied. (Only called
    /// for such connections, so a busy proxy does not re-read it per connection.)
    pub fn local_listener(&self, addr: SocketAddr) -> Option<Arc<WorkloadInfo>> {
        if let Some(w) = self.listener(addr) {
            return Some(w);
        }
        self.refresh(true);
        self.state.read().ok().and_then(|s| Self::lookup(&s, addr))
    }

    pub fn policy_name(&self, id: u32) -> Option<Arc<str>> {
        self.tables().policy_name(id)
    }
}

//! The current [`Tables`] (what policy-api streams: workloads, policy names, the ipcache and the
//! L7 rule tables; built off the runtime and swapped whole by `policy_stream`), plus a snapshot
//! of the kernel's listener table. Each request takes the current `Arc<Tables>`, so a new
//! policy version applies from the next request on every open connection.
//!
//! Nothing here reads a BPF map or walks a table on the data path: the listener table is
//! re-read on a thread of its own (every [`REFRESH`], or soon after a connection misses) and
//! published as an indexed snapshot; a lookup is a lock held for a pointer copy, then hash
//! lookups.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::tables::Tables;
pub use crate::tables::WorkloadInfo;

pub const REFRESH: Duration = Duration::from_millis(250);
/// Least time between two reads of the listener table, however many connections miss.
pub const MIN_REFRESH_GAP: Duration = Duration::from_millis(10);
/// How long a connection to a local workload waits for a fresher listener snapshot after a miss.
pub const MISS_WAIT: Duration = Duration::from_millis(200);

/// The kernel's TCP listeners, indexed: bound address -> cgroup, and port -> cgroup for
/// wildcard binds.
#[derive(Default, Debug)]
pub struct Listeners {
    exact: HashMap<SocketAddr, u64>,
    wildcard: HashMap<u16, u64>,
}

impl Listeners {
    pub fn new(all: impl IntoIterator<Item = redirector::Listener>) -> Self {
        let mut l = Listeners::default();
        for listener in all.into_iter().filter(|l| l.protocol == redirector::Protocol::Tcp) {
            if listener.addr.ip().is_unspecified() {
                l.wildcard.insert(listener.addr.port(), listener.cgroup_id);
            } else {
                l.exact.insert(
                    SocketAddr::new(canonical_ip(listener.addr.ip()), listener.addr.port()),
                    listener.cgroup_id,
                );
            }
        }
        l
    }

    /// The cgroup listening on `addr`: a bind to that address, else a wildcard bind of its port.
    pub fn owner(&self, addr: SocketAddr) -> Option<u64> {
        self.exact
            .get(&SocketAddr::new(canonical_ip(addr.ip()), addr.port()))
            .or_else(|| self.wildcard.get(&addr.port()))
            .copied()
    }
}

fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// A value re-read in the background and published whole: readers copy an `Arc`, never wait
/// for a read. `request()` asks for a fresher one (coalesced: many requests, one read).
pub struct Snapshot<T> {
    current: RwLock<Arc<T>>,
    /// Generation of `current` (watched by those waiting for a fresher one).
    published: watch::Sender<u64>,
    reads: Mutex<Reads>,
    wake: Condvar,
}

/// The reader thread's bookkeeping, under one lock with the requests.
struct Reads {
    /// A read was asked for since the last one started.
    wanted: bool,
    /// Reads started (the generation the read under way will publish).
    started: u64,
}

impl<T: Send + Sync + 'static> Snapshot<T> {
    /// Starts the reader thread: `read` runs there every `every`, or soon after a request.
    pub fn spawn(name: &str, every: Duration, mut read: impl FnMut() -> T + Send + 'static) -> Arc<Self> {
        let first = read();
        let snapshot = Arc::new(Snapshot {
            current: RwLock::new(Arc::new(first)),
            published: watch::channel(1).0,
            reads: Mutex::new(Reads { wanted: false, started: 1 }),
            wake: Condvar::new(),
        });
        let weak = Arc::downgrade(&snapshot);
        let spawned = std::thread::Builder::new().name(name.into()).spawn(move || {
            let mut last = Instant::now();
            loop {
                let Some(s) = weak.upgrade() else { return };
                let generation = {
                    let mut reads = s.reads.lock().unwrap_or_else(|e| e.into_inner());
                    let deadline = last + every;
                    while !reads.wanted {
                        let now = Instant::now();
                        if now >= deadline {
                            break;
                        }
                        reads = s.wake.wait_timeout(reads, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
                    }
                    reads.wanted = false;
                    reads.started += 1;
                    reads.started
                };
                let gap = last.elapsed();
                if gap < MIN_REFRESH_GAP {
                    std::thread::sleep(MIN_REFRESH_GAP - gap);
                }
                last = Instant::now();
                let fresh = Arc::new(read());
                *s.current.write().unwrap_or_else(|e| e.into_inner()) = fresh;
                s.published.send_replace(generation);
                // The thread holds the snapshot for one period at a time: it ends within a
                // period of the snapshot's owner letting go.
                drop(s);
            }
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "could not start the {name} reader; the snapshot stays as first read");
        }
        snapshot
    }

    pub fn get(&self) -> Arc<T> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Asks for a read and waits (up to `wait`) for a snapshot taken after this call.
    pub async fn fresher(&self, wait: Duration) -> Arc<T> {
        let mut rx = self.published.subscribe();
        // The next read to start begins after this request (it clears `wanted` under the same
        // lock); one under way now may predate it.
        let target = {
            let mut reads = self.reads.lock().unwrap_or_else(|e| e.into_inner());
            reads.wanted = true;
            reads.started + 1
        };
        self.wake.notify_one();
        let _ = tokio::time::timeout(wait, rx.wait_for(|g| *g >= target)).await;
        self.get()
    }
}

pub struct Registry {
    tables: RwLock<Arc<Tables>>,
    listeners: Arc<Snapshot<Listeners>>,
    /// The tables come from policy-api: until the first version is in, nothing is judged.
    requires_policy: bool,
    /// Bumped at each swap: connections the proxy judges itself (tunnelled ones) judge again.
    swapped: watch::Sender<u64>,
}

impl Registry {
    pub fn new(maps: Arc<dyn crate::datapath::Datapath>, requires_policy: bool) -> Self {
        let listeners = Snapshot::spawn("listener-table", REFRESH, move || Listeners::new(maps.listeners()));
        Registry { tables: RwLock::new(Arc::default()), listeners, requires_policy, swapped: watch::channel(0).0 }
    }

    /// True when the tables come from policy-api (the proxy judges nothing without them).
    pub fn requires_policy(&self) -> bool {
        self.requires_policy
    }

    /// True while the policy stream has not delivered its first version.
    pub fn awaiting_policy(&self) -> bool {
        self.requires_policy && self.tables().version == 0
    }

    /// Swaps in a new policy version (built beforehand, off the runtime): one pointer store;
    /// requests in flight keep the `Arc` they took. Returns the version it replaces, for the
    /// caller to free off the runtime too.
    pub fn set_tables(&self, tables: Arc<Tables>) -> Arc<Tables> {
        let old = std::mem::replace(&mut *self.tables.write().unwrap_or_else(|e| e.into_inner()), tables);
        self.swapped.send_modify(|n| *n += 1);
        old
    }

    /// Wakes at every swap of the tables.
    pub fn swaps(&self) -> watch::Receiver<u64> {
        self.swapped.subscribe()
    }

    /// The current tables.
    pub fn tables(&self) -> Arc<Tables> {
        self.tables.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The workload of `cgroup_id` in the tables in force (policy-api pushes every change).
    pub fn workload(&self, cgroup_id: u64) -> Option<Arc<WorkloadInfo>> {
        self.tables().workload(cgroup_id)
    }

    /// The workload listening on `addr` as of the last listener snapshot (at most about
    /// [`REFRESH`] old): for naming flow endpoints.
    pub fn listener(&self, addr: SocketAddr) -> Option<Arc<WorkloadInfo>> {
        self.listeners.get().owner(addr).and_then(|cgroup| self.workload(cgroup))
    }

    /// The workload listening on `addr` when the kernel says one does: on a miss (a listener
    /// newer than the snapshot), asks for a fresh snapshot and waits for it briefly, since that
    /// workload's rules must be applied. Misses of many connections share one read.
    pub async fn local_listener(&self, addr: SocketAddr) -> Option<Arc<WorkloadInfo>> {
        if let Some(w) = self.listener(addr) {
            return Some(w);
        }
        self.listeners.fresher(MISS_WAIT).await.owner(addr).and_then(|cgroup| self.workload(cgroup))
    }

    pub fn policy_name(&self, id: u32) -> Option<Arc<str>> {
        self.tables().policy_name(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn listener(addr: &str, protocol: redirector::Protocol, cgroup_id: u64) -> redirector::Listener {
        redirector::Listener { netns_cookie: 1, addr: addr.parse().unwrap(), protocol, cgroup_id }
    }

    #[test]
    fn listeners_are_found_by_address_then_by_wildcard_port() {
        use redirector::Protocol::{Tcp, Udp};
        let l = Listeners::new([
            listener("127.0.0.1:8080", Tcp, 1),
            listener("0.0.0.0:9092", Tcp, 2),
            listener("10.0.0.5:9092", Tcp, 3),
            listener("[::]:443", Tcp, 4),
            listener("127.0.0.1:53", Udp, 5),
        ]);
        assert_eq!(l.owner("127.0.0.1:8080".parse().unwrap()), Some(1));
        assert_eq!(l.owner("[::ffff:127.0.0.1]:8080".parse().unwrap()), Some(1), "IPv4-mapped");
        assert_eq!(l.owner("127.0.0.2:8080".parse().unwrap()), None);
        assert_eq!(l.owner("10.0.0.5:9092".parse().unwrap()), Some(3), "the exact bind first");
        assert_eq!(l.owner("127.0.0.1:9092".parse().unwrap()), Some(2));
        assert_eq!(l.owner("127.0.0.1:443".parse().unwrap()), Some(4), "a wildcard of either family");
        assert_eq!(l.owner("127.0.0.1:53".parse().unwrap()), None, "UDP binds do not own TCP ports");
    }

    /// Lookups never read the source; the reader thread re-reads on its period and soon after a
    /// request, and requests from many waiters share reads.
    #[tokio::test]
    async fn snapshots_refresh_in_the_background() {
        let reads = Arc::new(AtomicUsize::new(0));
        let counter = reads.clone();
        let snap = Snapshot::spawn("test-snapshot", Duration::from_secs(3600), move || {
            counter.fetch_add(1, Ordering::SeqCst) + 1
        });
        assert_eq!(*snap.get(), 1);
        for _ in 0..10_000 {
            assert_eq!(*snap.get(), 1);
        }
        assert_eq!(reads.load(Ordering::SeqCst), 1, "get() does not read");
        let fresh = snap.fresher(Duration::from_secs(5)).await;
        assert!(*fresh >= 2, "{fresh}");
        let before = reads.load(Ordering::SeqCst);
        let mut waiters = tokio::task::JoinSet::new();
        for _ in 0..50 {
            let snap = snap.clone();
            waiters.spawn(async move { *snap.fresher(Duration::from_secs(5)).await });
        }
        while let Some(r) = waiters.join_next().await {
            assert!(r.unwrap() > before);
        }
        let after = reads.load(Ordering::SeqCst);
        assert!(after - before <= 2, "50 waiters, {} reads", after - before);

        let periodic = Snapshot::spawn("test-periodic", Duration::from_millis(20), Instant::now);
        let first = *periodic.get();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(*periodic.get() > first, "re-read on its period");
    }
}

//! A node in a cluster (`l7ctl up --kvstore etcd://HOST:PORT[,..]`): the cluster's policy set,
//! its nodes and its workloads live in etcd (keys: `l7mesh_api::cluster::Keys`), and this
//! module is the one place that talks to it.
//!
//! - Policies: `l7ctl apply` on any node writes them to etcd in one transaction
//!   ([`Cluster::write`]); every node (this one too) watches the prefix, validates the whole
//!   set again and puts it in force through the same pipeline as a local apply
//!   (`Controller::sync_cluster`: the store, l7proxy, the kernel), then says which revision it
//!   has in force under `in-force/<node>`. The writer waits for every node's word.
//! - Workloads and the node itself: written under the node's lease (kept alive every third of
//!   its TTL); a node that dies stops renewing it and etcd deletes its keys, so its workloads
//!   leave every other node's view.
//! - etcd unreachable: the node keeps the version in force (its own store holds it, restarts
//!   included), local workloads still start, and `/v1/status`, `/readyz` and
//!   `l7mesh_kvstore_connected` say so; the session starts over (a full read, then a watch)
//!   when etcd answers again, so a partition heals without a restart.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp};
use l7mesh_api::cluster::{
    ClusterPolicy, FailedRevision, Keys, KvstoreStatus, NodeApplied, NodeInForce, NodeRecord, NodeView, WorkloadRecord,
};
use l7policy::validate::{load_text, LoadedPolicy, Severity};
use thiserror::Error;
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

use crate::server::NodeServer;

#[derive(Debug, Error)]
pub enum ClusterError {
    #[error("--kvstore {0}: {1}")]
    BadEndpoints(String, String),
    #[error("`{0}` is not a valid node name (1-63 of a-z, 0-9 and '-', starting and ending alphanumeric)")]
    BadNodeName(String),
    #[error("reading {what} {path}: {source}")]
    Read { what: &'static str, path: String, source: std::io::Error },
    #[error("etcd ({endpoints}): {source}")]
    Etcd { endpoints: String, source: etcd_client::Error },
    #[error("the kvstore is unreachable ({0}); nothing was written, the policy in force stays")]
    Unreachable(String),
    #[error("no policy {}; nothing was deleted", .0.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", "))]
    NotFound(Vec<String>),
    #[error("a value of {what} could not be written: {source}")]
    Encode { what: &'static str, source: serde_json::Error },
    #[error("{0}; nothing was written")]
    TooLarge(String),
    #[error(
        "the kvstore did not confirm the write ({0}): it may or may not be stored; `l7ctl get policies` on any node \
         shows the set in force"
    )]
    Unconfirmed(String),
    #[error(
        "node name `{node}` is held by a live registration (lease {lease:x}): another node runs under this name, or \
         this node restarted within its lease ({ttl} s; it joins once that lease ends)"
    )]
    NameTaken { node: String, lease: i64, ttl: i64 },
    #[error("the cluster's policy set changed under {0} writes in a row; nothing was written, try again")]
    Contended(usize),
}

/// How the node reaches etcd.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// As given: `etcd://host:port,host:port`.
    pub display: String,
    /// As the client takes them: `http(s)://host:port`.
    pub endpoints: Vec<String>,
    pub tls: Option<ClusterTls>,
    pub node: String,
    pub prefix: String,
    /// The node's lease (seconds): how long after its death its workloads stay listed.
    pub lease_ttl: i64,
    /// Where the node remembers its cluster (`<state dir>/cluster.json`).
    pub state_file: std::path::PathBuf,
    /// The node's run dir (its broker's admin socket tells whether the tunnel can be served).
    pub run_dir: Option<std::path::PathBuf>,
    /// Take the cluster's set even where it would replace policies of this node's own or a
    /// set that came from another etcd cluster (`--kvstore-adopt`).
    pub adopt: bool,
}

/// TLS to etcd: the CA that signed etcd's certificate, and the node's client certificate.
#[derive(Clone, Debug)]
pub struct ClusterTls {
    pub ca: std::path::PathBuf,
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
}

impl ClusterConfig {
    /// `etcd://host:port[,host:port..]` (and `etcd+tls://` or a CA file for TLS).
    pub fn new(
        kvstore: &str,
        tls: Option<ClusterTls>,
        node: String,
        prefix: String,
        lease_ttl: i64,
    ) -> Result<Self, ClusterError> {
        Self::with_state(kvstore, tls, node, prefix, lease_ttl, std::path::PathBuf::from("cluster.json"), false)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn with_state(
        kvstore: &str,
        tls: Option<ClusterTls>,
        node: String,
        prefix: String,
        lease_ttl: i64,
        state_file: std::path::PathBuf,
        adopt: bool,
    ) -> Result<Self, ClusterError> {
        let bad = |why: &str| ClusterError::BadEndpoints(kvstore.to_string(), why.to_string());
        let (scheme_tls, rest) = if let Some(r) = kvstore.strip_prefix("etcd+tls://") {
            (true, r)
        } else if let Some(r) = kvstore.strip_prefix("etcd://") {
            (false, r)
        } else {
            return Err(bad("expected etcd://HOST:PORT[,HOST:PORT..] (or etcd+tls://)"));
        };
        if scheme_tls && tls.is_none() {
            return Err(bad("etcd+tls:// needs --kvstore-ca (the CA that signed etcd's certificate)"));
        }
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut endpoints = Vec::new();
        for hostport in rest.split(',').map(str::trim) {
            let Some((host, port)) = hostport.rsplit_once(':') else {
                return Err(bad(&format!("`{hostport}` has no port")));
            };
            if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) || hostport.contains(['/', '@', '?']) {
                return Err(bad(&format!("`{hostport}` is not HOST:PORT")));
            }
            endpoints.push(format!("{scheme}://{hostport}"));
        }
        if !valid_node_name(&node) {
            return Err(ClusterError::BadNodeName(node));
        }
        if !(2..=3600).contains(&lease_ttl) {
            return Err(bad("the lease TTL must be 2 to 3600 seconds"));
        }
        if !prefix.starts_with('/') || prefix.len() < 2 {
            return Err(bad("the key prefix must start with '/' and name something (/l7mesh/v1)"));
        }
        Ok(ClusterConfig {
            display: kvstore.to_string(),
            endpoints,
            tls,
            node,
            prefix,
            lease_ttl,
            state_file,
            adopt,
            run_dir: None,
        })
    }

    async fn connect(&self) -> Result<Client, ClusterError> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        if let Some(tls) = &self.tls {
            let read = |what: &'static str, p: &std::path::Path| {
                std::fs::read(p).map_err(|source| ClusterError::Read { what, path: p.display().to_string(), source })
            };
            let mut t = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(read("the kvstore CA", &tls.ca)?));
            if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
                t = t.identity(etcd_client::Identity::from_pem(
                    read("the kvstore client certificate", cert)?,
                    read("the kvstore client key", key)?,
                ));
            }
            options = options.with_tls(t);
        }
        Client::connect(&self.endpoints, Some(options)).await.map_err(|e| self.etcd(e))
    }

    fn etcd(&self, source: etcd_client::Error) -> ClusterError {
        ClusterError::Etcd { endpoints: self.display.clone(), source }
    }
}

/// Workload and node names: what a DNS label allows, lowercase.
pub fn valid_node_name(name: &str) -> bool {
    let b = name.as_bytes();
    (1..=63).contains(&b.len())
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// The node's name by default: its hostname, if that is a valid node name.
pub fn default_node_name() -> Option<String> {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let h = h.trim().to_ascii_lowercase();
    valid_node_name(&h).then_some(h)
}

/// What the node knows of the cluster, as the watch last told it.
#[derive(Debug, Default)]
struct View {
    connected: bool,
    since: String,
    error: Option<String>,
    /// The revision of the policy set in force here (0: none yet).
    revision: i64,
    /// The newest revision this node could not put in force, and why.
    failed: Option<FailedRevision>,
    nodes: BTreeMap<String, NodeRecord>,
    in_force: BTreeMap<String, NodeInForce>,
    /// Every node's workloads (this one's too), by `node/name`.
    workloads: BTreeMap<String, WorkloadRecord>,
}

/// What the node remembers of its cluster across restarts (`<state dir>/cluster.json`): which
/// etcd cluster and prefix its policy set came from, the revision in force, its last lease.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Remembered {
    /// The cluster's marker (`<prefix>/cluster`, made once by the first node): an etcd that
    /// was wiped, or another one, does not hold it.
    pub marker: String,
    pub prefix: String,
    pub revision: i64,
    pub lease: i64,
}

impl Remembered {
    fn load(path: &std::path::Path) -> Option<Self> {
        serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
    }

    fn save(&self, path: &std::path::Path) {
        let tmp = path.with_extension("json.tmp");
        let write = || -> std::io::Result<()> {
            std::fs::write(&tmp, serde_json::to_vec(self).map_err(std::io::Error::other)?)?;
            std::fs::rename(&tmp, path)
        };
        if let Err(e) = write() {
            warn!(path = %path.display(), error = %e, "could not remember the cluster's state");
        }
    }
}

/// One policy key of the cluster's set as read: its value, or why it cannot be read.
type Entry = (String, Result<String, String>);

/// The cluster's policy set at one revision, and the guard key's revision for a write that
/// must not cross another.
pub struct Snapshot {
    pub revision: i64,
    guard: i64,
    entries: Vec<Entry>,
}

/// A policy change, as a write to the cluster's set.
pub enum SetChange {
    /// Create or replace these (by key).
    Apply(Vec<LoadedPolicy>),
    /// Delete these keys (each must be in the set).
    Delete(Vec<String>),
    /// Make the set exactly this (a rollback).
    Replace(Vec<LoadedPolicy>),
}

/// At most this many operations in one etcd transaction (etcd's default `--max-txn-ops`).
pub const MAX_TXN_OPS: usize = 128;
/// At most this large one policy value (etcd refuses requests over 1.5 MiB by default).
pub const MAX_POLICY_BYTES: usize = 1 << 20;
/// The largest answer read from etcd (tonic's default of 4 MiB would stop a session reading a
/// large set for good).
const MAX_DECODE: usize = 256 << 20;

pub struct Cluster {
    pub config: ClusterConfig,
    keys: Keys,
    view: Mutex<View>,
    /// Bumped whenever the view changes (a writer waiting for nodes wakes on it).
    changed: watch::Sender<u64>,
    /// Local workloads changed: publish them.
    workloads_changed: Notify,
    /// The client of the current session, for writes (None while disconnected).
    client: Mutex<Option<Client>>,
    /// The lease of the current (or last) session.
    lease: Mutex<Option<i64>>,
    /// What was remembered at start and since.
    remembered: Mutex<Option<Remembered>>,
}

/// How long a write waits for every node to say it has the written revision in force.
pub const NODES_WAIT: Duration = Duration::from_secs(15);

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Cluster {
    pub fn new(config: ClusterConfig) -> Arc<Self> {
        let keys = Keys::new(&config.prefix);
        let remembered = Remembered::load(&config.state_file);
        // While etcd does not answer after a restart, the node says which revision its store holds.
        let revision = remembered.as_ref().filter(|r| r.prefix == config.prefix).map(|r| r.revision).unwrap_or(0);
        Arc::new(Cluster {
            keys,
            config,
            view: Mutex::new(View { since: now_rfc3339(), revision, ..View::default() }),
            changed: watch::channel(0).0,
            workloads_changed: Notify::new(),
            client: Mutex::new(None),
            lease: Mutex::new(remembered.as_ref().map(|r| r.lease)),
            remembered: Mutex::new(remembered),
        })
    }

    fn view(&self) -> std::sync::MutexGuard<'_, View> {
        lock(&self.view)
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// Local workloads were registered or deregistered.
    pub fn local_workloads_changed(&self) {
        self.workloads_changed.notify_one();
    }

    pub fn connected(&self) -> bool {
        self.view().connected
    }

    /// For `/v1/status`.
    pub fn status(&self) -> KvstoreStatus {
        let v = self.view();
        let nodes = v
            .nodes
            .values()
            .map(|n| {
                let f = v.in_force.get(&n.name);
                NodeView {
                    name: n.name.clone(),
                    addresses: n.addresses.clone(),
                    tunnel_port: n.tunnel_port,
                    revision: f.map(|f| f.revision),
                    failed: f.and_then(|f| f.failed.clone()),
                }
            })
            .collect();
        KvstoreStatus {
            endpoints: self.config.display.clone(),
            node: self.config.node.clone(),
            connected: v.connected,
            since: v.since.clone(),
            error: v.error.clone(),
            revision: v.revision,
            nodes,
        }
    }

    /// The workloads of other nodes, as the watch last listed them.
    pub fn remote_workloads(&self) -> Vec<WorkloadRecord> {
        self.view().workloads.values().filter(|w| w.node != self.config.node).cloned().collect()
    }

    fn set_connected(&self, connected: bool, error: Option<String>) {
        let mut v = self.view();
        if v.connected != connected {
            v.since = now_rfc3339();
        }
        v.connected = connected;
        v.error = error;
        drop(v);
        self.bump();
    }

    fn client(&self) -> Result<Client, ClusterError> {
        let c = lock(&self.client).clone();
        c.ok_or_else(|| {
            ClusterError::Unreachable(self.view().error.clone().unwrap_or_else(|| "not connected yet".into()))
        })
    }

    fn kv(client: &Client) -> etcd_client::KvClient {
        client.kv_client().max_decoding_message_size(MAX_DECODE)
    }

    fn guard_key(&self) -> String {
        format!("{}/policy-set", self.config.prefix.trim_end_matches('/'))
    }

    /// The cluster's policy set now, for a write.
    pub async fn snapshot(&self) -> Result<Snapshot, ClusterError> {
        let client = self.client()?;
        let mut kv = Self::kv(&client);
        let unreachable = |e: etcd_client::Error| ClusterError::Unreachable(e.to_string());
        let got = kv.get(self.keys.policies(), Some(GetOptions::new().with_prefix())).await.map_err(unreachable)?;
        let revision = got.header().map(|h| h.revision()).unwrap_or(0);
        let guard = kv
            .get(self.guard_key(), Some(GetOptions::new().with_revision(revision)))
            .await
            .map_err(unreachable)?
            .kvs()
            .first()
            .map(|kv| kv.mod_revision())
            .unwrap_or(0);
        Ok(Snapshot { revision, guard, entries: entries(got.kvs()) })
    }

    /// The set `change` makes of `snapshot`, each policy validated as if applied here, and what
    /// happens to each key. A key that stays and does not read refuses the write (by name),
    /// unless the write repairs another such key (replaces or deletes it: then the rest are
    /// left out of the checks and named in the warnings, since no node takes the set until
    /// they are repaired too).
    #[allow(clippy::type_complexity)]
    pub fn result_of(
        &self,
        snapshot: &Snapshot,
        change: &SetChange,
    ) -> Result<(Vec<LoadedPolicy>, Vec<(String, l7mesh_api::rest::Change)>, Vec<String>), String> {
        use l7mesh_api::rest::Change;
        let name = |k: &str| k.strip_prefix(&self.keys.policies()).unwrap_or(k).to_string();
        let current: Vec<(String, &Result<String, String>)> =
            snapshot.entries.iter().map(|(k, v)| (name(k), v)).collect();
        let read_one = |key: &str, v: &Result<String, String>| self.read_set(&[(self.keys.policy(key), v.clone())]);
        let mut out = Vec::new();
        let mut changes = Vec::new();
        let (puts, deletes, replace): (&[LoadedPolicy], Vec<String>, bool) = match change {
            SetChange::Apply(p) => (p, Vec::new(), false),
            SetChange::Delete(keys) => {
                let missing: Vec<String> =
                    keys.iter().filter(|k| !current.iter().any(|(c, _)| c == *k)).cloned().collect();
                if !missing.is_empty() {
                    return Err(ClusterError::NotFound(missing).to_string());
                }
                (&[], keys.clone(), false)
            }
            SetChange::Replace(p) => (p, Vec::new(), true),
        };
        let mut repaired = false;
        let mut unreadable = Vec::new();
        for (key, value) in &current {
            let put = puts.iter().find(|p| &p.doc.key() == key);
            let before = read_one(key, value);
            if deletes.contains(key) || (replace && put.is_none()) {
                repaired |= before.is_err();
                changes.push((key.clone(), Change::Deleted));
                continue;
            }
            match put {
                Some(p) => {
                    repaired |= before.is_err();
                    let change = match before.ok().and_then(|mut v| v.pop()) {
                        Some(b) if b.doc == p.doc => Change::Unchanged,
                        _ => Change::Updated,
                    };
                    changes.push((key.clone(), change));
                    out.push(p.clone());
                }
                None => match before {
                    Ok(p) => out.extend(p),
                    Err(e) => unreadable.push(e),
                },
            }
        }
        if let Some(first) = unreadable.first() {
            if !repaired {
                return Err(first.clone());
            }
        }
        let warnings = unreadable
            .into_iter()
            .map(|e| format!("{e}: no node takes the cluster's set until that policy is replaced or deleted too"))
            .collect();
        for p in puts {
            if !current.iter().any(|(c, _)| c == &p.doc.key()) {
                changes.push((p.doc.key(), Change::Created));
                out.push(p.clone());
            }
        }
        Ok((out, changes, warnings))
    }

    /// Writes `change` over `snapshot` in one transaction, unless the set changed since (then
    /// `Ok(None)`: read it again and retry). Returns the revision.
    pub async fn commit(
        &self,
        snapshot: &Snapshot,
        change: &SetChange,
        by: Option<String>,
    ) -> Result<Option<i64>, ClusterError> {
        let client = self.client()?;
        let mut kv = Self::kv(&client);
        let updated = now_rfc3339();
        let mut ops = Vec::new();
        let (puts, deletes): (&[LoadedPolicy], Vec<String>) = match change {
            SetChange::Apply(p) => (p, Vec::new()),
            SetChange::Delete(keys) => (&[], keys.clone()),
            SetChange::Replace(p) => {
                let gone = snapshot
                    .entries
                    .iter()
                    .map(|(k, _)| k.strip_prefix(&self.keys.policies()).unwrap_or(k).to_string())
                    .filter(|k| !p.iter().any(|p| &p.doc.key() == k))
                    .collect();
                (p, gone)
            }
        };
        for p in puts {
            let value = ClusterPolicy {
                document: serde_json::to_value(&p.doc)
                    .map_err(|source| ClusterError::Encode { what: "a policy", source })?,
                file: p.file.clone(),
                line: p.line,
                written_on: self.config.node.clone(),
                by: by.clone(),
                updated: updated.clone(),
            };
            let json = value.json()?;
            if json.len() > MAX_POLICY_BYTES {
                return Err(ClusterError::TooLarge(format!(
                    "policy `{}` is {} bytes as stored; the cluster keeps policies of at most {} bytes",
                    p.doc.key(),
                    json.len(),
                    MAX_POLICY_BYTES
                )));
            }
            ops.push(TxnOp::put(self.keys.policy(&p.doc.key()), json, None));
        }
        ops.extend(deletes.iter().map(|k| TxnOp::delete(self.keys.policy(k), None)));
        ops.push(TxnOp::put(self.guard_key(), updated.clone(), None));
        if ops.len() > MAX_TXN_OPS {
            return Err(ClusterError::TooLarge(format!(
                "this write is {} etcd operations; etcd takes at most {MAX_TXN_OPS} in one transaction (its default --max-txn-ops): write the policies in parts",
                ops.len()
            )));
        }
        // The set is as read: the guard key (rewritten by every write) has not moved.
        let unchanged = if snapshot.guard == 0 {
            Compare::create_revision(self.guard_key(), CompareOp::Equal, 0)
        } else {
            Compare::mod_revision(self.guard_key(), CompareOp::Equal, snapshot.guard)
        };
        match kv.txn(Txn::new().when([unchanged]).and_then(ops)).await {
            Ok(resp) if resp.succeeded() => Ok(Some(resp.header().map(|h| h.revision()).unwrap_or(0))),
            Ok(_) => Ok(None),
            // Sent, perhaps applied: the caller must not be told nothing was written.
            Err(e) => Err(ClusterError::Unconfirmed(e.to_string())),
        }
    }

    /// Waits (up to `within`) until every node the store lists has `revision` in force or
    /// has failed on it; what each said, this node first.
    pub async fn wait_in_force(&self, revision: i64, within: Duration) -> Vec<NodeApplied> {
        let started = Instant::now();
        let mut rx = self.changed.subscribe();
        let mut seen: BTreeMap<String, u64> = BTreeMap::new();
        loop {
            let (all_said, answers) = {
                let v = self.view();
                let mut answers = Vec::new();
                let mut all = true;
                let mut names: Vec<&String> = v.nodes.keys().collect();
                if !names.contains(&&self.config.node) {
                    names.push(&self.config.node);
                }
                for name in names {
                    let f = v.in_force.get(name);
                    let in_force = f.is_some_and(|f| f.revision >= revision);
                    let failed = f.and_then(|f| f.failed.as_ref()).filter(|e| e.revision >= revision && !in_force);
                    if in_force || failed.is_some() {
                        seen.entry(name.clone()).or_insert(started.elapsed().as_millis() as u64);
                    } else {
                        all = false;
                    }
                    answers.push(NodeApplied {
                        node: name.clone(),
                        in_force,
                        error: failed.map(|e| e.error.clone()),
                        after_ms: seen.get(name).copied(),
                    });
                }
                (all, answers)
            };
            if all_said || started.elapsed() >= within {
                let mut answers = answers;
                for a in &mut answers {
                    if !a.in_force && a.error.is_none() {
                        a.error =
                            Some(format!("did not say within {within:?} that it has revision {revision} in force"));
                    }
                }
                answers.sort_by_key(|a| (a.node != self.config.node, a.node.clone()));
                return answers;
            }
            let left = within.saturating_sub(started.elapsed());
            let _ = tokio::time::timeout(left, rx.changed()).await;
        }
    }

    /// Leaves the cluster at a stop: the lease is revoked, so the node's workloads and its
    /// record go at once (not after the lease's time) and writes stop waiting for it.
    pub async fn leave(&self) {
        let (Some(lease), Ok(mut client)) = (*lock(&self.lease), self.client()) else { return };
        match tokio::time::timeout(Duration::from_secs(1), client.lease_revoke(lease)).await {
            Ok(Ok(_)) => info!(node = %self.config.node, "left the cluster (lease revoked)"),
            Ok(Err(e)) => warn!(error = %e, "could not revoke the node's lease; its keys expire with it"),
            Err(_) => warn!("etcd did not answer the lease revoke within 1 s; the node's keys expire with its lease"),
        }
    }

    /// Runs the node's sessions with etcd until the process ends: each one a full read, then
    /// a watch; a failure ends the session, which starts over after a pause.
    pub async fn run(self: Arc<Self>, server: Arc<NodeServer>) {
        let mut pause = Duration::from_millis(200);
        let mut last_error = String::new();
        loop {
            let started = Instant::now();
            if let Err(e) = self.session(&server).await {
                let message = e.to_string();
                if message != last_error {
                    warn!(error = %e, "the kvstore session ended; the policy in force stays, local workloads still start");
                    last_error = message.clone();
                }
                *lock(&self.client) = None;
                self.set_connected(false, Some(message));
                let revision = self.view().revision;
                server.metrics.kvstore(false, revision);
            }
            if started.elapsed() > Duration::from_secs(10) {
                pause = Duration::from_millis(200);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }

    /// The cluster's marker: read, or made (create-if-absent) by a node that remembers no
    /// cluster (its first join) or adopts this one. A node that remembers a cluster never
    /// makes one: an etcd that was wiped stays markerless until an operator adopts it.
    async fn marker(&self, kv: &mut etcd_client::KvClient) -> Result<Option<String>, ClusterError> {
        let key = format!("{}/cluster", self.config.prefix.trim_end_matches('/'));
        let etcd = |e| self.config.etcd(e);
        let read =
            |r: &etcd_client::GetResponse| r.kvs().first().and_then(|kv| kv.value_str().ok()).map(str::to_string);
        if let Some(m) = read(&kv.get(key.clone(), None).await.map_err(etcd)?) {
            return Ok(Some(m));
        }
        let remembers = lock(&self.remembered).as_ref().is_some_and(|r| !r.marker.is_empty());
        if remembers && !self.config.adopt {
            return Ok(None);
        }
        let mut id = [0u8; 16];
        use std::io::Read as _;
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut id))
            .map_err(|e| ClusterError::Unreachable(format!("reading /dev/urandom: {e}")))?;
        let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
        kv.txn(Txn::new().when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)]).and_then([TxnOp::put(
            key.clone(),
            id,
            None,
        )]))
        .await
        .map_err(etcd)?;
        Ok(read(&kv.get(key, None).await.map_err(etcd)?))
    }

    /// Whether this node can serve the tunnel: its broker holds the node's intermediate (asked
    /// on the broker's admin socket, which answers with certificates only).
    async fn tunnel_ready(&self) -> bool {
        let Some(run_dir) = &self.config.run_dir else { return false };
        let path = l7mesh_api::layout::broker_admin_socket(run_dir);
        let ask = move || -> std::io::Result<bool> {
            use std::io::{BufRead as _, Write as _};
            let mut s = std::os::unix::net::UnixStream::connect(&path)?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.set_write_timeout(Some(Duration::from_secs(2)))?;
            let mut line =
                serde_json::to_string(&l7mesh_api::broker::Request::ClusterTrust).map_err(std::io::Error::other)?;
            line.push('\n');
            s.write_all(line.as_bytes())?;
            let mut answer = String::new();
            std::io::BufReader::new(s).read_line(&mut answer)?;
            let reply: l7mesh_api::broker::Reply = serde_json::from_str(&answer).map_err(std::io::Error::other)?;
            Ok(reply.ok)
        };
        // And l7proxy really serves it: its port answers on this node's own address.
        let probe = node_addresses().into_iter().find(|ip| ip.is_ipv4());
        let listening = move || {
            probe.is_some_and(|ip| {
                std::net::TcpStream::connect_timeout(
                    &std::net::SocketAddr::new(ip, l7mesh_api::layout::TUNNEL_PORT),
                    Duration::from_millis(500),
                )
                .is_ok()
            })
        };
        tokio::task::spawn_blocking(move || ask().unwrap_or(false) && listening()).await.unwrap_or(false)
    }

    /// What the next compile should know of the cluster: the other nodes' workloads and the
    /// other nodes, from the view.
    fn cluster_view(&self) -> l7policy::compile::ClusterView {
        let v = self.view();
        let workloads = v
            .workloads
            .values()
            .filter(|w| w.node != self.config.node)
            .filter_map(|w| {
                let labels = l7policy::labels::Labels::parse(&w.labels)
                    .inspect_err(|e| warn!(node = %w.node, workload = %w.name, error = %e, "a workload's labels in the kvstore do not read; it is no peer here"))
                    .ok()?;
                Some(l7policy::compile::RemoteWorkload { node: w.node.clone(), name: w.name.clone(), labels })
            })
            .collect();
        let nodes = v
            .nodes
            .values()
            .filter(|n| n.name != self.config.node)
            .map(|n| l7mesh_api::tables::RemoteNode {
                name: n.name.clone(),
                addresses: n.addresses.clone(),
                tunnel_port: n.tunnel_port,
                identity: 0,
            })
            .collect();
        l7policy::compile::ClusterView { this_node: self.config.node.clone(), workloads, nodes }
    }

    /// Registers the node under `lease`: refused while another live registration holds the
    /// name (another node of that name, or this node's own from before a restart, until its
    /// lease ends; one this process remembers as its own is taken over at once).
    /// This node's record, as it is now.
    fn node_record(&self, tunnel: bool) -> NodeRecord {
        NodeRecord {
            name: self.config.node.clone(),
            addresses: node_addresses(),
            joined: now_rfc3339(),
            release: env!("CARGO_PKG_VERSION").to_string(),
            tunnel_port: tunnel.then_some(l7mesh_api::layout::TUNNEL_PORT),
        }
    }

    async fn register_node(
        &self,
        kv: &mut etcd_client::KvClient,
        lease: i64,
        tunnel: bool,
    ) -> Result<(), ClusterError> {
        let record = self.node_record(tunnel);
        let key = self.keys.node(&self.config.node);
        let put = TxnOp::put(key.clone(), record.json()?, Some(PutOptions::new().with_lease(lease)));
        let etcd = |e| self.config.etcd(e);
        let resp = kv
            .txn(
                Txn::new()
                    .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                    .and_then([put.clone()])
                    .or_else([TxnOp::get(key.clone(), None)]),
            )
            .await
            .map_err(etcd)?;
        if resp.succeeded() {
            return Ok(());
        }
        let holder = resp
            .op_responses()
            .into_iter()
            .find_map(|r| match r {
                etcd_client::TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.lease()),
                _ => None,
            })
            .unwrap_or(0);
        let ours = *lock(&self.lease);
        if holder != 0 && Some(holder) == ours {
            // This node's own registration from before: take it over under the new lease.
            kv.txn(Txn::new().when([Compare::lease(key.clone(), CompareOp::Equal, holder)]).and_then([put]))
                .await
                .map_err(etcd)?;
            return Ok(());
        }
        Err(ClusterError::NameTaken { node: self.config.node.clone(), lease: holder, ttl: self.config.lease_ttl })
    }

    async fn session(&self, server: &Arc<NodeServer>) -> Result<(), ClusterError> {
        let mut client = self.config.connect().await?;
        let mut kv = Self::kv(&client);
        let etcd = |e| self.config.etcd(e);
        let lease = client.lease_grant(self.config.lease_ttl, None).await.map_err(etcd)?.id();
        let mut tunnel = self.tunnel_ready().await;
        self.register_node(&mut kv, lease, tunnel).await?;
        let previous = lock(&self.lease).replace(lease);
        if let Some(old) = previous.filter(|old| *old != lease) {
            // Whatever the last session held moves to this lease below; the old one goes.
            let _ = client.lease_revoke(old).await;
        }
        // Keepalives in a task of their own: a slow controller step (a proxy that does not
        // answer) must not let the lease expire.
        let (mut keeper, mut answers) = client.lease_keep_alive(lease).await.map_err(etcd)?;
        let every = Duration::from_millis((self.config.lease_ttl as u64 * 1000 / 3).max(500));
        let (lost_tx, mut lost) = tokio::sync::oneshot::channel::<String>();
        let keepalive = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let why = loop {
                tick.tick().await;
                if let Err(e) = keeper.keep_alive().await {
                    break format!("keeping the lease alive: {e}");
                }
                match answers.message().await {
                    Ok(Some(a)) if a.ttl() > 0 => {}
                    Ok(_) => break "the node's lease expired".to_string(),
                    Err(e) => break format!("keeping the lease alive: {e}"),
                }
            };
            let _ = lost_tx.send(why);
        });
        struct AbortOnDrop(tokio::task::JoinHandle<()>);
        impl Drop for AbortOnDrop {
            fn drop(&mut self) {
                self.0.abort();
            }
        }
        let _keepalive = AbortOnDrop(keepalive);

        // Each kind read whole at one revision, then the watch from the next.
        let marker = self.marker(&mut kv).await?;
        let policies = kv.get(self.keys.policies(), Some(GetOptions::new().with_prefix())).await.map_err(etcd)?;
        let revision = policies.header().map(|h| h.revision()).unwrap_or(0);
        {
            let mut reads = Vec::new();
            for prefix in [self.keys.nodes(), self.keys.in_force(), self.keys.workloads()] {
                let got = kv
                    .get(prefix, Some(GetOptions::new().with_prefix().with_revision(revision)))
                    .await
                    .map_err(etcd)?;
                reads.push(got);
            }
            let mut v = self.view();
            v.nodes.clear();
            v.in_force.clear();
            v.workloads.clear();
            for got in &reads {
                for kv in got.kvs() {
                    if let (Ok(key), Ok(value)) = (kv.key_str(), kv.value_str()) {
                        self.learn(&mut v, key, Some(value));
                    }
                }
            }
        }
        *lock(&self.client) = Some(client.clone());
        self.set_connected(true, None);
        info!(endpoints = %self.config.display, node = %self.config.node, revision, "joined the cluster");
        let mut pending = Some((revision, entries(policies.kvs())));
        // A set refused for what this node holds (a conflict with a local workload): tried
        // again when local workloads change.
        let mut parked: Option<(i64, Vec<Entry>)> = None;
        self.publish_workloads(&mut kv, server, lease).await?;
        let mut pushed_view = self.cluster_view();
        server.cluster_view(pushed_view.clone()).await;

        let mut watch = client
            .watch_client()
            .max_decoding_message_size(MAX_DECODE)
            .watch(
                format!("{}/", self.config.prefix.trim_end_matches('/')),
                Some(etcd_client::WatchOptions::new().with_prefix().with_start_revision(revision + 1)),
            )
            .await
            .map_err(etcd)?;
        let mut retry = tokio::time::interval(Duration::from_secs(2));
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Whether the broker holds the node's intermediate (the operator may install it later).
        let mut trust_check = tokio::time::interval(Duration::from_secs(3));
        trust_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // A policy set read and not yet in force (just read, or one that failed): put it in force.
            if let Some((rev, set)) = pending.take() {
                match self.put_in_force(&mut kv, server, lease, &marker, rev, set).await? {
                    InForce::Done => {}
                    InForce::Retry(keep) => {
                        pending = Some(keep);
                        retry.reset();
                    }
                    InForce::Park(keep) => parked = Some(keep),
                }
            }
            tokio::select! {
                why = &mut lost => {
                    return Err(ClusterError::Unreachable(why.unwrap_or_else(|_| "the keepalive task ended".into())));
                }
                _ = self.workloads_changed.notified() => {
                    self.publish_workloads(&mut kv, server, lease).await?;
                    if pending.is_none() {
                        pending = parked.take();
                    }
                }
                _ = retry.tick(), if pending.is_some() => {}
                _ = trust_check.tick() => {
                    let now = self.tunnel_ready().await;
                    if now != tunnel {
                        info!(tunnel = now, "the node's tunnel trust changed; its record says so");
                        tunnel = now;
                        let record = self.node_record(tunnel);
                        kv.put(self.keys.node(&self.config.node), record.json()?, Some(PutOptions::new().with_lease(lease)))
                            .await
                            .map_err(etcd)?;
                    }
                }
                message = watch.message() => {
                    let Some(resp) = message.map_err(etcd)? else {
                        return Err(ClusterError::Unreachable("the watch ended".into()));
                    };
                    if resp.canceled() {
                        return Err(ClusterError::Unreachable(format!(
                            "the watch was cancelled (compacted at revision {}): {}",
                            resp.compact_revision(),
                            resp.cancel_reason()
                        )));
                    }
                    let mut policies_changed = false;
                    {
                        let mut v = self.view();
                        for ev in resp.events() {
                            let Some(kv) = ev.kv() else { continue };
                            let key = String::from_utf8_lossy(kv.key()).into_owned();
                            if key.starts_with(&self.keys.policies()) {
                                policies_changed = true;
                                continue;
                            }
                            let value = match ev.event_type() {
                                EventType::Put => kv.value_str().ok(),
                                EventType::Delete => None,
                            };
                            self.learn(&mut v, &key, value);
                        }
                    }
                    self.bump();
                    let view = self.cluster_view();
                    if view != pushed_view {
                        server.cluster_view(view.clone()).await;
                        pushed_view = view;
                    }
                    if policies_changed {
                        let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
                        let set = kv
                            .get(self.keys.policies(), Some(GetOptions::new().with_prefix().with_revision(rev)))
                            .await
                            .map_err(etcd)?;
                        pending = Some((rev, entries(set.kvs())));
                        parked = None;
                    }
                }
            }
        }
    }

    /// Takes one key's value (None: deleted) into the view.
    fn learn(&self, v: &mut View, key: &str, value: Option<&str>) {
        fn parse<T: serde::de::DeserializeOwned>(key: &str, value: Option<&str>) -> Option<T> {
            let value = value?;
            serde_json::from_str(value)
                .inspect_err(|e| warn!(key, error = %e, "an unreadable value in the kvstore; skipped"))
                .ok()
        }
        if let Some(name) = key.strip_prefix(&self.keys.nodes()) {
            match parse::<NodeRecord>(key, value) {
                Some(n) if n.name == name => {
                    v.nodes.insert(name.to_string(), n);
                }
                _ => {
                    v.nodes.remove(name);
                }
            }
        } else if let Some(name) = key.strip_prefix(&self.keys.in_force()) {
            match parse::<NodeInForce>(key, value) {
                Some(f) if f.node == name => {
                    v.in_force.insert(name.to_string(), f);
                }
                _ => {
                    v.in_force.remove(name);
                }
            }
        } else if let Some(path) = key.strip_prefix(&self.keys.workloads()) {
            match parse::<WorkloadRecord>(key, value) {
                // The key names the node: a record cannot claim another node's workload.
                Some(w) if path == format!("{}/{}", w.node, w.name) => {
                    v.workloads.insert(path.to_string(), w);
                }
                _ => {
                    v.workloads.remove(path);
                }
            }
        }
    }

    /// Validates the cluster's set at `revision` and puts it in force here; says so in etcd.
    async fn put_in_force(
        &self,
        kv: &mut etcd_client::KvClient,
        server: &Arc<NodeServer>,
        lease: i64,
        marker: &Option<String>,
        revision: i64,
        set: Vec<Entry>,
    ) -> Result<InForce, ClusterError> {
        let remembered = lock(&self.remembered).clone();
        let foreign = remembered
            .as_ref()
            .filter(|r| !r.marker.is_empty() && (Some(&r.marker) != marker.as_ref() || r.prefix != self.config.prefix));
        let outcome = match (self.read_set(&set), foreign) {
            (Err(e), _) => Err((e, Retry::No)),
            (Ok(_), Some(r)) if !self.config.adopt => Err((
                format!(
                    "this node's policy set came from cluster {} (prefix {}); this etcd holds {} under prefix {}: \
                     refusing to replace it (a wiped or different etcd, or another prefix); restart the node with \
                     --kvstore-adopt to take this cluster's set",
                    r.marker,
                    r.prefix,
                    marker.as_deref().map(|m| format!("cluster {m}")).unwrap_or_else(|| "no cluster".into()),
                    self.config.prefix
                ),
                Retry::No,
            )),
            (Ok(policies), _) => {
                let n = policies.len();
                // A node joining for the first time keeps policies of its own unless the
                // cluster's set holds them as they are (or the operator adopts the set).
                let keep_own = remembered.is_none() && !self.config.adopt;
                match server.sync_cluster(policies, revision, keep_own).await {
                    Ok(version) => Ok((version, n)),
                    Err((e, retry)) => Err((e, retry)),
                }
            }
        };
        let (record, next, revision_now) = {
            let mut v = self.view();
            let (record, next) = match outcome {
                Ok((version, n)) => {
                    if v.revision != revision {
                        info!(revision, version, policies = n, "cluster policy set in force");
                    }
                    v.revision = revision;
                    v.failed = None;
                    let r = NodeInForce {
                        node: self.config.node.clone(),
                        revision,
                        version,
                        failed: None,
                        updated: now_rfc3339(),
                    };
                    (r, InForce::Done)
                }
                Err((error, retry)) => {
                    if v.failed.as_ref().is_none_or(|f| f.revision != revision || f.error != error) {
                        warn!(revision, error = %error, "the cluster's policy set was not put in force; the last good one stays");
                    }
                    v.failed = Some(FailedRevision { revision, error });
                    let version = v.in_force.get(&self.config.node).map(|f| f.version).unwrap_or(0);
                    let r = NodeInForce {
                        node: self.config.node.clone(),
                        revision: v.revision,
                        version,
                        failed: v.failed.clone(),
                        updated: now_rfc3339(),
                    };
                    let next = match retry {
                        Retry::Later => InForce::Retry((revision, set)),
                        Retry::OnLocalChange => InForce::Park((revision, set)),
                        Retry::No => InForce::Done,
                    };
                    (r, next)
                }
            };
            // This node's own answer counts at once (the watch echoes it later).
            v.in_force.insert(self.config.node.clone(), record.clone());
            (record, next, v.revision)
        };
        self.bump();
        server.metrics.kvstore(true, revision_now);
        if matches!(next, InForce::Done) && record.failed.is_none() {
            let r = Remembered {
                marker: marker.clone().unwrap_or_default(),
                prefix: self.config.prefix.clone(),
                revision,
                lease,
            };
            r.save(&self.config.state_file);
            *lock(&self.remembered) = Some(r);
        }
        kv.put(self.keys.node_in_force(&self.config.node), record.json()?, Some(PutOptions::new().with_lease(lease)))
            .await
            .map_err(|e| self.config.etcd(e))?;
        Ok(next)
    }

    /// The set's values, each validated as if applied here: all, or the first error.
    fn read_set(&self, set: &[Entry]) -> Result<Vec<LoadedPolicy>, String> {
        let mut out = Vec::new();
        for (key, value) in set {
            let name = key.strip_prefix(&self.keys.policies()).unwrap_or(key);
            let value = value.as_ref().map_err(|e| format!("policy `{name}` in the kvstore: {e}"))?;
            let p: ClusterPolicy = serde_json::from_str(value)
                .map_err(|e| format!("policy `{name}` in the kvstore is unreadable: {e}"))?;
            let text = p.document.to_string();
            let (mut loaded, diags) = load_text(&p.file, &text);
            if let Some(d) = diags.iter().find(|d| d.severity == Severity::Error) {
                return Err(format!("policy `{name}` in the kvstore does not validate here: {d}"));
            }
            let (Some(mut one), true) = (loaded.pop(), loaded.is_empty()) else {
                return Err(format!("policy `{name}` in the kvstore is not one policy document"));
            };
            if one.doc.key() != name {
                return Err(format!("policy stored as `{name}` in the kvstore is named `{}`", one.doc.key()));
            }
            one.line = p.line;
            out.push(one);
        }
        Ok(out)
    }

    /// Makes `workloads/<node>/` hold exactly this node's registered workloads (in
    /// transactions of at most [`MAX_TXN_OPS`]). Nothing is changed while the store cannot
    /// say which workloads run.
    async fn publish_workloads(
        &self,
        kv: &mut etcd_client::KvClient,
        server: &Arc<NodeServer>,
        lease: i64,
    ) -> Result<(), ClusterError> {
        let local = match server.local_workloads().await {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "the node's workloads cannot be read: their records in the kvstore are left as they are");
                return Ok(());
            }
        };
        let etcd = |e| self.config.etcd(e);
        let prefix = self.keys.node_workloads(&self.config.node);
        let stored = kv.get(prefix.clone(), Some(GetOptions::new().with_prefix())).await.map_err(etcd)?;
        let mut ops = Vec::new();
        for kv in stored.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let name = key.strip_prefix(&prefix).unwrap_or(&key).to_string();
            if !local.iter().any(|w| w.name == name) {
                ops.push(TxnOp::delete(key, None));
            }
        }
        for w in &local {
            let record =
                WorkloadRecord { name: w.name.clone(), node: self.config.node.clone(), labels: w.labels.clone() };
            let value = record.json()?;
            let same = stored.kvs().iter().any(|kv| {
                kv.key_str().ok() == Some(&self.keys.workload(&self.config.node, &w.name))
                    && kv.value_str().ok() == Some(value.as_str())
                    && kv.lease() == lease
            });
            if !same {
                ops.push(TxnOp::put(
                    self.keys.workload(&self.config.node, &w.name),
                    value,
                    Some(PutOptions::new().with_lease(lease)),
                ));
            }
        }
        for batch in ops.chunks(MAX_TXN_OPS) {
            kv.txn(Txn::new().and_then(batch.to_vec())).await.map_err(etcd)?;
        }
        Ok(())
    }
}

/// What to do with a set that was read.
enum InForce {
    Done,
    /// Not in force for a reason that may pass (a proxy that did not answer): again in 2 s.
    Retry((i64, Vec<Entry>)),
    /// Refused for what this node holds (its workloads): again when they change.
    Park((i64, Vec<Entry>)),
}

/// When a refused set is worth another try.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retry {
    No,
    Later,
    OnLocalChange,
}

/// The policy keys and values of a read; a key or value that is not UTF-8 stays, as an error.
fn entries(kvs: &[etcd_client::KeyValue]) -> Vec<Entry> {
    kvs.iter()
        .map(|kv| {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let value = match (std::str::from_utf8(kv.key()), kv.value_str()) {
                (Ok(_), Ok(v)) => Ok(v.to_string()),
                (Err(_), _) => Err("its key is not UTF-8".to_string()),
                (_, Err(_)) => Err("its value is not UTF-8".to_string()),
            };
            (key, value)
        })
        .collect()
}

/// A local workload as the cluster lists it.
pub struct LocalWorkload {
    pub name: String,
    pub labels: String,
}

/// The node's addresses other nodes may reach it on: every non-loopback interface address.
fn node_addresses() -> Vec<std::net::IpAddr> {
    let mut out: Vec<std::net::IpAddr> = nix::ifaddrs::getifaddrs()
        .map(|addrs| {
            addrs
                .filter_map(|a| {
                    let a = a.address?;
                    a.as_sockaddr_in()
                        .map(|s| std::net::IpAddr::V4(s.ip()))
                        .or_else(|| a.as_sockaddr_in6().map(|s| std::net::IpAddr::V6(s.ip())))
                })
                .filter(|ip| !ip.is_loopback() && !is_link_local(ip))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out.dedup();
    out
}

fn is_link_local(ip: &std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => v4.is_link_local(),
        std::net::IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

/// Values written to etcd: JSON, one error type.
mod erased {
    pub trait Json {
        fn json(&self) -> Result<String, super::ClusterError>;
    }
    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> Result<String, super::ClusterError> {
            serde_json::to_string(self)
                .map_err(|source| super::ClusterError::Encode { what: "a kvstore value", source })
        }
    }
}
use erased::Json as _;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_checked_and_named() {
        let c =
            ClusterConfig::new("etcd://10.0.0.2:2379,10.0.0.3:2379", None, "node-a".into(), "/l7mesh/v1".into(), 10)
                .unwrap();
        assert_eq!(c.endpoints, ["http://10.0.0.2:2379", "http://10.0.0.3:2379"]);
        for bad in
            ["http://a:1", "etcd://a", "etcd://a:0", "etcd://a:99999", "etcd://u@a:1", "etcd://:1", "etcd+tls://a:1"]
        {
            let e = ClusterConfig::new(bad, None, "n".into(), "/p".into(), 10).unwrap_err();
            assert!(e.to_string().starts_with(&format!("--kvstore {bad}: ")), "{e}");
        }
        let tls = ClusterTls { ca: "/ca.pem".into(), cert: None, key: None };
        let c = ClusterConfig::new("etcd+tls://a:2379", Some(tls), "n".into(), "/p".into(), 10).unwrap();
        assert_eq!(c.endpoints, ["https://a:2379"]);
        assert!(matches!(
            ClusterConfig::new("etcd://a:1", None, "Node_A".into(), "/p".into(), 10),
            Err(ClusterError::BadNodeName(_))
        ));
    }

    #[test]
    fn a_record_cannot_claim_another_nodes_key() {
        let c = Cluster::new(ClusterConfig::new("etcd://a:1", None, "a".into(), "/p".into(), 10).unwrap());
        let mut v = View::default();
        let w = WorkloadRecord { name: "web".into(), node: "b".into(), labels: "app=web".into() };
        // Stored under node c's prefix, claiming node b: not taken.
        c.learn(&mut v, "/p/workloads/c/web", Some(&serde_json::to_string(&w).unwrap()));
        assert!(v.workloads.is_empty());
        c.learn(&mut v, "/p/workloads/b/web", Some(&serde_json::to_string(&w).unwrap()));
        assert_eq!(v.workloads.len(), 1);
        c.learn(&mut v, "/p/workloads/b/web", None);
        assert!(v.workloads.is_empty());
        // An unreadable node record is no node.
        c.learn(&mut v, "/p/nodes/b", Some("{not json"));
        assert!(v.nodes.is_empty());
    }

    #[test]
    fn a_set_that_does_not_validate_is_refused_whole_and_named() {
        let c = Cluster::new(ClusterConfig::new("etcd://a:1", None, "a".into(), "/p".into(), 10).unwrap());
        let good = ClusterPolicy {
            document: serde_json::json!({
                "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
                "metadata": {"name": "allow", "namespace": "default"},
                "spec": {"endpointSelector": {"matchLabels": {"app": "web"}}, "ingress": [{}]}
            }),
            file: "p.yaml".into(),
            line: 3,
            written_on: "b".into(),
            by: None,
            updated: String::new(),
        };
        let set: Vec<Entry> =
            vec![("/p/policies/default/allow".to_string(), Ok(serde_json::to_string(&good).unwrap()))];
        let read = c.read_set(&set).unwrap();
        assert_eq!((read[0].doc.key().as_str(), read[0].line), ("default/allow", 3));
        // Stored under another name than the document's.
        let renamed = vec![("/p/policies/default/other".to_string(), set[0].1.clone())];
        assert!(c.read_set(&renamed).unwrap_err().contains("is named `default/allow`"));
        // A field this release does not know.
        let mut bad = good.clone();
        bad.document["spec"]["ingress"][0]["fromNowhere"] = serde_json::json!([]);
        let set2 = vec![set[0].clone(), ("/p/policies/default/bad".into(), Ok(serde_json::to_string(&bad).unwrap()))];
        let e = c.read_set(&set2).unwrap_err();
        assert!(
            e.contains("policy `default/bad` in the kvstore does not validate here") && e.contains("fromNowhere"),
            "{e}"
        );
        // A value that is not UTF-8 refuses the set, it does not drop out of it.
        let set3 = vec![set[0].clone(), ("/p/policies/default/x".into(), Err("its value is not UTF-8".into()))];
        assert!(c.read_set(&set3).unwrap_err().contains("policy `default/x` in the kvstore: its value is not UTF-8"));
    }

    fn loaded(name: &str, path: &str) -> LoadedPolicy {
        let yaml = format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: {name}\nspec:\n  endpointSelector:\n    matchLabels:\n      app: {name}\n  egress:\n  - toEntities: [host]\n    toPorts:\n    - ports:\n      - port: \"80\"\n        protocol: TCP\n      rules:\n        http:\n        - path: \"{path}\"\n"
        );
        let (mut p, d) = load_text("t.yaml", &yaml);
        assert!(d.iter().all(|d| d.severity != Severity::Error), "{d:?}");
        p.pop().unwrap()
    }

    fn stored(c: &Cluster, p: &LoadedPolicy) -> Entry {
        let v = ClusterPolicy {
            document: serde_json::to_value(&p.doc).unwrap(),
            file: p.file.clone(),
            line: p.line,
            written_on: "n".into(),
            by: None,
            updated: String::new(),
        };
        (c.keys.policy(&p.doc.key()), Ok(serde_json::to_string(&v).unwrap()))
    }

    #[test]
    fn a_write_is_judged_on_the_set_it_makes_and_may_repair_what_does_not_read() {
        use l7mesh_api::rest::Change;
        let c = Cluster::new(ClusterConfig::new("etcd://a:1", None, "a".into(), "/p".into(), 10).unwrap());
        let (a, b) = (loaded("a", "/a"), loaded("b", "/b"));
        let broken: Entry = (c.keys.policy("default/broken"), Ok("{not json".into()));
        let snap = Snapshot { revision: 5, guard: 4, entries: vec![stored(&c, &a), broken.clone()] };
        // Adding b while `broken` stays: refused, naming it.
        let e = c.result_of(&snap, &SetChange::Apply(vec![b.clone()])).unwrap_err();
        assert!(e.contains("policy `default/broken` in the kvstore is unreadable"), "{e}");
        // Deleting it repairs the set; deleting what is not there is refused by name.
        let (set, changes, _) = c.result_of(&snap, &SetChange::Delete(vec!["default/broken".into()])).unwrap();
        assert_eq!(set.iter().map(|p| p.doc.key()).collect::<Vec<_>>(), ["default/a"]);
        assert_eq!(changes, [("default/broken".to_string(), Change::Deleted)]);
        let e = c.result_of(&snap, &SetChange::Delete(vec!["default/nope".into()])).unwrap_err();
        assert!(e.contains("no policy `default/nope`"), "{e}");
        // A replacement (rollback) drops every key it does not hold, the broken one too.
        let (set, changes, _) = c.result_of(&snap, &SetChange::Replace(vec![b.clone()])).unwrap();
        assert_eq!(set.iter().map(|p| p.doc.key()).collect::<Vec<_>>(), ["default/b"]);
        assert!(changes.contains(&("default/a".to_string(), Change::Deleted)));
        assert!(changes.contains(&("default/broken".to_string(), Change::Deleted)));
        assert!(changes.contains(&("default/b".to_string(), Change::Created)));
        // The same document again is unchanged; another one an update.
        let good = Snapshot { revision: 5, guard: 4, entries: vec![stored(&c, &a)] };
        let (_, changes, _) = c.result_of(&good, &SetChange::Apply(vec![a.clone()])).unwrap();
        assert_eq!(changes, [("default/a".to_string(), Change::Unchanged)]);
        let (_, changes, _) = c.result_of(&good, &SetChange::Apply(vec![loaded("a", "/other")])).unwrap();
        assert_eq!(changes, [("default/a".to_string(), Change::Updated)]);
        // Two unreadable keys: deleting one is a repair (allowed, the other named).
        let two = Snapshot {
            revision: 5,
            guard: 4,
            entries: vec![broken.clone(), (c.keys.policy("default/junk"), Err("its value is not UTF-8".into()))],
        };
        let (set, _, warnings) = c.result_of(&two, &SetChange::Delete(vec!["default/broken".into()])).unwrap();
        assert!(set.is_empty());
        assert!(warnings.len() == 1 && warnings[0].contains("`default/junk`"), "{warnings:?}");
    }
}

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
        Ok(ClusterConfig { display: kvstore.to_string(), endpoints, tls, node, prefix, lease_ttl })
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
}

/// How long a write waits for every node to say it has the written revision in force.
pub const NODES_WAIT: Duration = Duration::from_secs(15);

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

impl Cluster {
    pub fn new(config: ClusterConfig) -> Arc<Self> {
        let keys = Keys::new(&config.prefix);
        Arc::new(Cluster {
            keys,
            config,
            view: Mutex::new(View { since: now_rfc3339(), ..View::default() }),
            changed: watch::channel(0).0,
            workloads_changed: Notify::new(),
            client: Mutex::new(None),
        })
    }

    fn view(&self) -> std::sync::MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|e| e.into_inner())
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
        let c = self.client.lock().unwrap_or_else(|e| e.into_inner()).clone();
        c.ok_or_else(|| {
            ClusterError::Unreachable(self.view().error.clone().unwrap_or_else(|| "not connected yet".into()))
        })
    }

    /// Writes `policies` into the cluster's set (created or replaced by key) and deletes
    /// `deletes` (each must exist), in one transaction: all or none. Returns the revision.
    pub async fn write(
        &self,
        policies: &[LoadedPolicy],
        deletes: &[String],
        by: Option<String>,
    ) -> Result<i64, ClusterError> {
        let mut client = self.client()?;
        let updated = now_rfc3339();
        let mut ops = Vec::new();
        for p in policies {
            let value = ClusterPolicy {
                document: serde_json::to_value(&p.doc)
                    .map_err(|source| ClusterError::Encode { what: "a policy", source })?,
                file: p.file.clone(),
                line: p.line,
                written_on: self.config.node.clone(),
                by: by.clone(),
                updated: updated.clone(),
            };
            let json =
                serde_json::to_string(&value).map_err(|source| ClusterError::Encode { what: "a policy", source })?;
            ops.push(TxnOp::put(self.keys.policy(&p.doc.key()), json, None));
        }
        let compares: Vec<Compare> =
            deletes.iter().map(|k| Compare::version(self.keys.policy(k), CompareOp::Greater, 0)).collect();
        ops.extend(deletes.iter().map(|k| TxnOp::delete(self.keys.policy(k), None)));
        let resp = client
            .txn(Txn::new().when(compares).and_then(ops))
            .await
            .map_err(|e| ClusterError::Unreachable(e.to_string()))?;
        if !resp.succeeded() {
            // Which of them is missing (read once; the answer names them).
            let mut missing = Vec::new();
            for k in deletes {
                let r = client
                    .get(self.keys.policy(k), Some(GetOptions::new().with_count_only()))
                    .await
                    .map_err(|e| ClusterError::Unreachable(e.to_string()))?;
                if r.count() == 0 {
                    missing.push(k.clone());
                }
            }
            return Err(ClusterError::NotFound(missing));
        }
        Ok(resp.header().map(|h| h.revision()).unwrap_or(0))
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

    /// Runs the node's sessions with etcd until the process ends: each one a full read, then
    /// a watch; a failure ends the session, which starts over after a pause.
    pub async fn run(self: Arc<Self>, server: Arc<NodeServer>) {
        let mut pause = Duration::from_millis(200);
        loop {
            let started = Instant::now();
            match self.session(&server).await {
                Ok(()) => {}
                Err(e) => {
                    let first = {
                        let v = self.view();
                        v.connected || v.error.is_none()
                    };
                    if first {
                        warn!(error = %e, "the kvstore is unreachable; the policy in force stays, local workloads still start");
                    }
                    *self.client.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    self.set_connected(false, Some(e.to_string()));
                    let revision = self.view().revision;
                    server.metrics.kvstore(false, revision);
                }
            }
            if started.elapsed() > Duration::from_secs(10) {
                pause = Duration::from_millis(200);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }

    async fn session(&self, server: &Arc<NodeServer>) -> Result<(), ClusterError> {
        let mut client = self.config.connect().await?;
        let etcd = |e| self.config.etcd(e);
        let lease = client.lease_grant(self.config.lease_ttl, None).await.map_err(etcd)?.id();
        let (mut keeper, mut keepalive) = client.lease_keep_alive(lease).await.map_err(etcd)?;
        let leased = || Some(PutOptions::new().with_lease(lease));
        let record = NodeRecord {
            name: self.config.node.clone(),
            addresses: node_addresses(),
            joined: now_rfc3339(),
            release: env!("CARGO_PKG_VERSION").to_string(),
        };
        client.put(self.keys.node(&self.config.node), record.json()?, leased()).await.map_err(etcd)?;

        // Everything under the prefix at one revision, then the watch from the next.
        let all = client
            .get(format!("{}/", self.config.prefix.trim_end_matches('/')), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(etcd)?;
        let revision = all.header().map(|h| h.revision()).unwrap_or(0);
        {
            let mut v = self.view();
            v.nodes.clear();
            v.in_force.clear();
            v.workloads.clear();
            for kv in all.kvs() {
                if let (Ok(key), Ok(value)) = (kv.key_str(), kv.value_str()) {
                    self.learn(&mut v, key, Some(value));
                }
            }
        }
        *self.client.lock().unwrap_or_else(|e| e.into_inner()) = Some(client.clone());
        self.set_connected(true, None);
        info!(endpoints = %self.config.display, node = %self.config.node, revision, "joined the cluster");
        let policies: Vec<(String, String)> = all
            .kvs()
            .iter()
            .filter_map(|kv| Some((kv.key_str().ok()?.to_string(), kv.value_str().ok()?.to_string())))
            .filter(|(k, _)| k.starts_with(&self.keys.policies()))
            .collect();
        let mut pending = Some((revision, policies));
        self.publish_workloads(&mut client, server, lease).await?;

        let mut watch = client
            .watch(
                format!("{}/", self.config.prefix.trim_end_matches('/')),
                Some(etcd_client::WatchOptions::new().with_prefix().with_start_revision(revision + 1)),
            )
            .await
            .map_err(etcd)?;
        let mut keepalive_tick = tokio::time::interval(Duration::from_secs((self.config.lease_ttl / 3).max(1) as u64));
        let mut retry = tokio::time::interval(Duration::from_secs(2));
        loop {
            // A policy set read and not yet in force (just read, or one that failed): put it in force.
            if let Some((rev, set)) = pending.take() {
                if let Err(keep) = self.put_in_force(&mut client, server, lease, rev, set).await? {
                    pending = Some(keep);
                }
            }
            tokio::select! {
                _ = keepalive_tick.tick() => {
                    keeper.keep_alive().await.map_err(etcd)?;
                }
                answer = keepalive.message() => {
                    match answer.map_err(etcd)? {
                        Some(a) if a.ttl() > 0 => {}
                        _ => return Err(ClusterError::Unreachable("the node's lease expired".into())),
                    }
                }
                _ = self.workloads_changed.notified() => {
                    self.publish_workloads(&mut client, server, lease).await?;
                }
                _ = retry.tick(), if pending.is_some() => {}
                message = watch.message() => {
                    let Some(resp) = message.map_err(etcd)? else {
                        return Err(ClusterError::Unreachable("the watch ended".into()));
                    };
                    if resp.canceled() {
                        return Err(ClusterError::Unreachable(format!("the watch was cancelled: {}", resp.cancel_reason())));
                    }
                    let mut policies_changed = false;
                    {
                        let mut v = self.view();
                        for ev in resp.events() {
                            let Some(kv) = ev.kv() else { continue };
                            let Ok(key) = kv.key_str() else { continue };
                            if key.starts_with(&self.keys.policies()) {
                                policies_changed = true;
                            }
                            let value = match ev.event_type() {
                                EventType::Put => kv.value_str().ok(),
                                EventType::Delete => None,
                            };
                            self.learn(&mut v, key, value);
                        }
                    }
                    self.bump();
                    if policies_changed {
                        let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
                        let set = client
                            .get(self.keys.policies(), Some(GetOptions::new().with_prefix().with_revision(rev)))
                            .await
                            .map_err(etcd)?;
                        let set = set
                            .kvs()
                            .iter()
                            .filter_map(|kv| Some((kv.key_str().ok()?.to_string(), kv.value_str().ok()?.to_string())))
                            .collect();
                        pending = Some((rev, set));
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
    /// `Ok(Err(set))`: not in force (the error is recorded and reported), try again later.
    #[allow(clippy::type_complexity)]
    async fn put_in_force(
        &self,
        client: &mut Client,
        server: &Arc<NodeServer>,
        lease: i64,
        revision: i64,
        set: Vec<(String, String)>,
    ) -> Result<Result<(), (i64, Vec<(String, String)>)>, ClusterError> {
        let outcome = match self.read_set(&set) {
            Err(e) => Err((e, false)),
            Ok(policies) => {
                let n = policies.len();
                match server.sync_cluster(policies, revision).await {
                    Ok(version) => Ok((version, n)),
                    // A proxy that did not answer in time is worth another try; a set that
                    // does not compile is not (until the next change).
                    Err((e, retry)) => Err((e, retry)),
                }
            }
        };
        let (record, keep, revision_now) = {
            let mut v = self.view();
            let (record, keep) = match outcome {
                Ok((version, n)) => {
                    if v.revision != revision {
                        info!(revision, version, policies = n, "cluster policy set in force");
                    }
                    v.revision = revision;
                    v.failed = None;
                    (
                        NodeInForce {
                            node: self.config.node.clone(),
                            revision,
                            version,
                            failed: None,
                            updated: now_rfc3339(),
                        },
                        None,
                    )
                }
                Err((error, retry)) => {
                    if v.failed.as_ref().is_none_or(|f| f.revision != revision || f.error != error) {
                        warn!(revision, error = %error, "the cluster's policy set was not put in force; the last good one stays");
                    }
                    v.failed = Some(FailedRevision { revision, error });
                    let version = v.in_force.get(&self.config.node).map(|f| f.version).unwrap_or(0);
                    (
                        NodeInForce {
                            node: self.config.node.clone(),
                            revision: v.revision,
                            version,
                            failed: v.failed.clone(),
                            updated: now_rfc3339(),
                        },
                        retry.then_some((revision, set)),
                    )
                }
            };
            // This node's own answer counts at once (the watch echoes it later).
            v.in_force.insert(self.config.node.clone(), record.clone());
            (record, keep, v.revision)
        };
        self.bump();
        server.metrics.kvstore(true, revision_now);
        client
            .put(self.keys.node_in_force(&self.config.node), record.json()?, Some(PutOptions::new().with_lease(lease)))
            .await
            .map_err(|e| self.config.etcd(e))?;
        Ok(match keep {
            Some(k) => Err(k),
            None => Ok(()),
        })
    }

    /// The set's values, each validated as if applied here: all, or the first error.
    fn read_set(&self, set: &[(String, String)]) -> Result<Vec<LoadedPolicy>, String> {
        let mut out = Vec::new();
        for (key, value) in set {
            let name = key.strip_prefix(&self.keys.policies()).unwrap_or(key);
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

    /// Makes `workloads/<node>/` hold exactly this node's registered workloads.
    async fn publish_workloads(
        &self,
        client: &mut Client,
        server: &Arc<NodeServer>,
        lease: i64,
    ) -> Result<(), ClusterError> {
        let local = server.local_workloads().await;
        let etcd = |e| self.config.etcd(e);
        let prefix = self.keys.node_workloads(&self.config.node);
        let stored = client.get(prefix.clone(), Some(GetOptions::new().with_prefix())).await.map_err(etcd)?;
        let mut ops = Vec::new();
        for kv in stored.kvs() {
            let Ok(key) = kv.key_str() else { continue };
            let name = key.strip_prefix(&prefix).unwrap_or(key);
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
        if !ops.is_empty() {
            client.txn(Txn::new().and_then(ops)).await.map_err(etcd)?;
        }
        Ok(())
    }
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
        let set = vec![("/p/policies/default/allow".to_string(), serde_json::to_string(&good).unwrap())];
        let read = c.read_set(&set).unwrap();
        assert_eq!((read[0].doc.key().as_str(), read[0].line), ("default/allow", 3));
        // Stored under another name than the document's.
        let renamed = vec![("/p/policies/default/other".to_string(), set[0].1.clone())];
        assert!(c.read_set(&renamed).unwrap_err().contains("is named `default/allow`"));
        // A field this release does not know.
        let mut bad = good.clone();
        bad.document["spec"]["ingress"][0]["fromNowhere"] = serde_json::json!([]);
        let set2 = vec![set[0].clone(), ("/p/policies/default/bad".into(), serde_json::to_string(&bad).unwrap())];
        let e = c.read_set(&set2).unwrap_err();
        assert!(
            e.contains("policy `default/bad` in the kvstore does not validate here") && e.contains("fromNowhere"),
            "{e}"
        );
    }
}

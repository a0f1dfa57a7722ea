//! The node controller behind `l7ctl up`: it keeps the store, the workload cgroups and the
//! redirector's maps in step. Every change (a policy file edit, a workload starting or
//! stopping) ends in [`Controller::reconcile`]: compile from the store, apply as one generation,
//! then close established connections the new policy denies or carries differently.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use redirector::{Direction, Maps, Protocol};
use thiserror::Error;
use tracing::{info, warn};

// The views of the node policy-api shows (REST contracts, l7mesh-api).
pub use l7mesh_api::rest::{ApplyStep, Divergence, InForce, ReconcileReport};

use l7mesh_api::layout::NodePaths;

use crate::proxy_channel::ProxyHub;
use crate::rejudge::{self, CloseReason};
use crate::store::{Staged, Store, StoreError};
use l7policy::compile::{compile_in_cluster, Compiled, Workload};
use l7policy::labels::Labels;
use l7policy::validate::{load_path, Diagnostic, Severity};

/// How long a reconcile waits for l7proxy to load a new version before flipping the kernel
/// anyway (a proxy that does not answer is restarted by `l7ctl up`).
pub const PROXY_ACK_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Error)]
pub enum NodeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("redirector: {0}")]
    Redirector(#[from] redirector::Error),
    #[error("`{0}` is not a valid workload name (1-63 of a-z, 0-9 and '-', starting and ending alphanumeric)")]
    BadName(String),
    #[error("workload name `{0}` is taken by a running workload")]
    NameTaken(String),
    #[error("namespace `{0}` is l7mesh's own (the node proxies' identity between nodes); a workload cannot run in it")]
    ReservedNamespace(String),
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("labels: {0}")]
    Labels(#[from] l7policy::labels::LabelError),
    #[error("{}; nothing was applied", .0.join("; "))]
    Conflicts(Vec<String>),
    /// A step of putting a new version in force failed; everything was rolled back.
    #[error("policy version {version} was not applied: {step} failed: {reason}; version {in_force} is still in force")]
    Apply { step: ApplyStep, version: u64, in_force: u64, reason: String, too_big: bool },
    /// The store refused a version the kernel and l7proxy already had, and putting every part
    /// back did not fully succeed: the parts disagree until [`Controller::converge`] brings
    /// them to one version.
    #[error(
        "policy version {version} was not applied: the store step (committing) failed: {reason}; undoing it \
         failed ({undone}), so the node has not converged: {parts}; it keeps trying (every 300 ms) to bring every \
         part to version {target}"
    )]
    Diverged { version: u64, reason: String, undone: String, parts: String, target: u64 },
    /// A dry run found that the version would not fit the kernel's maps.
    #[error("{0}; nothing was applied")]
    TooBig(String),
    /// An API write to policies that `--policy` files manage, without `force`.
    #[error(
        "{}: managed by the policy files of `l7ctl up --policy` (edit the file instead, or pass --force to write \
         through the API anyway, until the files change next); nothing was changed",
        .0.iter().map(|(key, file)| format!("policy `{key}` comes from {file}")).collect::<Vec<_>>().join("; ")
    )]
    FileManaged(Vec<(String, String)>),
    /// The cluster's set would replace policies this node had before it joined.
    #[error(
        "the cluster's set would replace this node's own {} (from before it joined): apply {} to the cluster \
         (`l7ctl apply -f` on any node) and the node takes the set, or restart it with --kvstore-adopt to take the \
         cluster's set as it is; meanwhile the node keeps what it has",
        .0.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", "),
        if .0.len() == 1 { "it" } else { "them" }
    )]
    OwnPolicies(Vec<String>),
    /// A delete names policies that are not stored.
    #[error("no policy {}; nothing was deleted", .0.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", "))]
    NotFound(Vec<String>),
}

/// Whether a change must be in force in l7proxy before it counts (policy writes), or may go
/// ahead in the kernel while no proxy answers (workloads starting and stopping: refusing them
/// would leave a workload without policy or a stale one registered; the proxy loads the
/// version when it connects and meanwhile refuses the connections of workloads it lacks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyStep {
    Required,
    BestEffort,
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> NodeError + 'a {
    move |source| NodeError::Io { what, path: path.to_path_buf(), source }
}

pub struct Controller {
    pub paths: NodePaths,
    store: Store,
    policy_source: Option<PathBuf>,
    fingerprint: Option<String>,
    pub compiled: Option<Compiled>,
    hub: Option<Arc<ProxyHub>>,
    /// The node's own control ports on `host` (policy-api's API, l7proxy's admin); workloads
    /// may not connect to them, whatever policy says.
    reserved_ports: Vec<u16>,
    /// The version the kernel's current generation holds, once this process applied one.
    kernel_version: Option<u64>,
    /// The last version this process saw committed (what `in_force` says while the store
    /// cannot be read).
    committed: u64,
    /// Set when a failed commit left the parts apart; cleared once they agree.
    divergence: Option<Divergence>,
    /// In a cluster: other nodes' workloads and the other nodes, as the kvstore last listed
    /// them (what the next compile sees).
    cluster_view: Option<l7policy::compile::ClusterView>,
}

impl Controller {
    /// What a workload must not see: the state (store, broker keys), the sockets and token,
    /// the pins, and the policy files (re-applied when they change).
    pub fn private_paths(&self) -> Vec<PathBuf> {
        let p = &self.paths;
        let mut v = vec![p.state_dir.clone(), p.run_dir.clone(), p.pin_dir.clone()];
        v.extend(self.policy_source.clone());
        v
    }

    pub fn open(paths: NodePaths, policy_source: Option<PathBuf>) -> Result<Self, NodeError> {
        create_private_dir(&paths.state_dir)?;
        let store = Store::open(&paths.store())?;
        let committed = store.ensure_version()?;
        Ok(Controller {
            committed,
            divergence: None,
            cluster_view: None,
            paths,
            store,
            policy_source,
            fingerprint: None,
            compiled: None,
            hub: None,
            reserved_ports: Vec::new(),
            kernel_version: None,
        })
    }

    /// Denies every workload's TCP connections to these ports of the node itself (`host`):
    /// the control plane is root's, not the workloads'.
    pub fn with_reserved_ports(mut self, ports: Vec<u16>) -> Self {
        self.reserved_ports = ports;
        self
    }

    /// Every reconcile hands the compiled tables to l7proxy through `hub` (and waits for it to
    /// load them) before the kernel's generation flips.
    pub fn with_proxy_hub(mut self, hub: Arc<ProxyHub>) -> Self {
        self.hub = Some(hub);
        self
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Forgets workloads left registered by an earlier node whose processes are gone.
    pub fn forget_stale_workloads(&mut self) -> Result<Vec<String>, NodeError> {
        let mut gone = Vec::new();
        for w in self.store.workloads()? {
            let procs =
                std::fs::read_to_string(self.paths.workloads().join(&w.name).join("cgroup.procs")).unwrap_or_default();
            if procs.trim().is_empty() {
                self.store.deregister(&w.name)?;
                let _ = std::fs::remove_dir(self.paths.workloads().join(&w.name));
                gone.push(w.name);
            }
        }
        Ok(gone)
    }

    /// Re-reads the policy files when they changed. `Ok(None)`: unchanged. `Ok(Some(diags))`:
    /// read; if any diagnostic is an error nothing was stored and the last good set stays;
    /// otherwise the new set is put in force (or, `Err`, nothing changed).
    #[allow(clippy::type_complexity)]
    pub fn reload_policy_files(&mut self) -> Result<Option<(Vec<Diagnostic>, Option<ReconcileReport>)>, NodeError> {
        let Some(source) = self.policy_source.clone() else { return Ok(None) };
        let fingerprint = fingerprint(&source);
        if self.fingerprint.as_ref() == Some(&fingerprint) {
            return Ok(None);
        }
        self.fingerprint = Some(fingerprint);
        let (policies, mut diags) = load_path(&source);
        if diags.iter().any(|d| d.severity == Severity::Error) {
            return Ok(Some((diags, None)));
        }
        let origin = format!("file:{}", source.display());
        let conflicts = self.conflicts_with(&policies, Replacing::Origin(&origin))?;
        if !conflicts.is_empty() {
            diags.extend(conflicts.into_iter().map(|message| Diagnostic {
                severity: Severity::Error,
                file: source.display().to_string(),
                line: None,
                path: String::new(),
                message,
            }));
            return Ok(Some((diags, None)));
        }
        let staged = self.store.stage_replace_origin(&origin, &policies, &crate::store::Actor::default())?;
        match self.transact(Some(staged), ProxyStep::Required) {
            Ok(report) => Ok(Some((diags, Some(report)))),
            Err(e) => {
                // A proxy that did not answer is transient: try the files again next time.
                if matches!(e, NodeError::Apply { step: ApplyStep::Proxy, .. }) {
                    self.fingerprint = None;
                }
                Err(e)
            }
        }
    }

    /// True when no process is left in workload `name`'s cgroup (or it has none).
    pub fn workload_is_empty(&self, name: &str) -> bool {
        std::fs::read_to_string(self.paths.workloads().join(name).join("cgroup.procs"))
            .map(|p| p.trim().is_empty())
            .unwrap_or(true)
    }

    /// Creates the workload's cgroup, registers it and puts the version with it in force.
    /// Returns the cgroup path.
    pub fn register(&mut self, name: &str, labels: &str) -> Result<(PathBuf, ReconcileReport), NodeError> {
        if !is_dns_label(name) {
            return Err(NodeError::BadName(name.to_string()));
        }
        let labels = Labels::parse(labels)?;
        if labels.namespace() == l7mesh_identity::PROXY_NAMESPACE {
            // The node proxies' own identity lives there (the tunnel's server certificate).
            return Err(NodeError::ReservedNamespace(labels.namespace().to_string()));
        }
        let dir = self.paths.workloads().join(name);
        if self.store.workloads()?.iter().any(|w| w.name == name) {
            return Err(NodeError::NameTaken(name.to_string()));
        }
        std::fs::create_dir_all(&dir).map_err(io_err("creating cgroup", &dir))?;
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        if !procs.trim().is_empty() {
            return Err(NodeError::NameTaken(name.to_string()));
        }
        let cgroup_id = redirector::cgroup_id(&dir)?;
        let staged = match self.store.stage_register(&Workload { name: name.to_string(), labels, cgroup_id }) {
            Err(StoreError::NameTaken(n)) => return Err(NodeError::NameTaken(n)),
            other => other?,
        };
        let report = self.transact(Some(staged), ProxyStep::BestEffort).inspect_err(|_| {
            let _ = std::fs::remove_dir(&dir);
        })?;
        Ok((dir, report))
    }

    /// Deregisters a workload (putting the version without it in force) and removes its
    /// cgroup, ending any process left in it.
    pub fn deregister(&mut self, name: &str) -> Result<ReconcileReport, NodeError> {
        let staged = self.store.stage_deregister(name)?;
        let report = self.transact(Some(staged), ProxyStep::BestEffort)?;
        let dir = self.paths.workloads().join(name);
        let _ = std::fs::write(dir.join("cgroup.kill"), "1");
        if !crate::cgroup_events::wait_until_empty(&dir, std::time::Duration::from_secs(1)) {
            warn!(workload = name, "processes still in the cgroup a second after cgroup.kill");
        }
        match std::fs::remove_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(workload = name, error = %e, cgroup = %dir.display(), "could not remove the workload's cgroup")
            }
        }
        Ok(report)
    }

    /// Compiles the stored policy for the registered workloads and puts it in force (see
    /// [`Controller::transact`]); what runs at start and after a restart.
    pub fn reconcile(&mut self) -> Result<ReconcileReport, NodeError> {
        self.transact(None, ProxyStep::BestEffort)
    }

    /// What each part has in force.
    pub fn in_force(&self) -> Result<InForce, NodeError> {
        let (proxy_connected, proxy) = match &self.hub {
            Some(hub) => hub.status(),
            None => (0, None),
        };
        let kernel_generation = Maps::open(&self.paths.pin_dir).and_then(|m| m.generation()).unwrap_or(0);
        let (store, store_error) = match self.store.version() {
            Ok(v) => (v, None),
            Err(e) => (self.committed, Some(e.to_string())),
        };
        Ok(InForce {
            store,
            store_error,
            kernel: self.kernel_version,
            kernel_generation,
            proxy,
            proxy_connected,
            converged: self.divergence.is_none(),
            divergence: self.divergence.clone(),
        })
    }

    /// Puts a version in force everywhere or nowhere: compiles `staged` (a store change written
    /// but not committed; `None`: what is stored), hands l7proxy its tables and waits until it
    /// has swapped them in, flips the kernel to a new generation, and only then commits the
    /// store. A failing step undoes the ones before it (the proxy gets the version in force
    /// again, the kernel's unflipped generation is purged, the transaction is dropped) and the
    /// error names the step. Last, established connections that the new version denies or
    /// carries differently are closed.
    ///
    /// Proxy first, kernel second: a connection the old kernel generation still redirects is
    /// judged by the new tables, and one the new generation redirects finds them in place, so
    /// no moment lets through what both the old and the new policy would deny at L7.
    pub fn transact(&mut self, staged: Option<Staged>, proxy_step: ProxyStep) -> Result<ReconcileReport, NodeError> {
        let started = Instant::now();
        let (policies, workloads, version) = match &staged {
            Some(s) => (s.policies()?, s.workloads()?, s.version),
            None => (self.store.policies()?, self.store.workloads()?, self.store.version()?),
        };
        let policies: Vec<_> = policies.into_iter().map(|p| p.policy).collect();
        let in_force = version.saturating_sub(u64::from(staged.is_some()));
        let failed = |step, reason: String, too_big| NodeError::Apply { step, version, in_force, reason, too_big };
        let mut compiled =
            compile_in_cluster(&policies, &workloads, self.cluster_view.as_ref(), &host_prefixes(), version);
        if staged.is_some() && proxy_step == ProxyStep::Required && !compiled.conflicts.is_empty() {
            return Err(NodeError::Conflicts(compiled.conflicts));
        }
        // (Before the proxy step: nothing to undo yet.)
        let mut maps = Maps::open(&self.paths.pin_dir).map_err(|e| failed(ApplyStep::Kernel, e.to_string(), false))?;
        // (The proxy's own listeners need no entry: the connect hook passes connections to them
        // before any policy, and the proxy refuses one whose original destination is itself.)
        reserve_ports(&mut compiled, &self.reserved_ports);
        let compile_us = started.elapsed().as_micros() as u64;
        let step = Instant::now();
        let proxy_note = match &self.hub {
            Some(hub) => hub.publish_and_wait(&compiled, PROXY_ACK_TIMEOUT).err(),
            None => None,
        };
        if let Some(note) = &proxy_note {
            if proxy_step == ProxyStep::Required {
                let reason = self.withdraw_from_proxy(version, note.clone());
                return Err(failed(ApplyStep::Proxy, reason, false));
            }
            warn!(version, "{note}");
        }
        let proxy_us = step.elapsed().as_micros() as u64;
        let step = Instant::now();
        let generation = match maps.apply(&compiled.snapshot) {
            Ok(g) => g,
            Err(e) => {
                let too_big = maps.check_fits(&compiled.snapshot).ok().flatten();
                let reason = match &too_big {
                    Some(why) => format!("{why} ({e})"),
                    None => e.to_string(),
                };
                let reason = self.withdraw_from_proxy(version, reason);
                return Err(failed(ApplyStep::Kernel, reason, too_big.is_some()));
            }
        };
        let kernel_us = step.elapsed().as_micros() as u64;
        if let Some(staged) = staged {
            if let Err(e) = staged.commit() {
                return Err(self.after_failed_commit(&mut maps, version, in_force, e));
            }
        }
        self.kernel_version = Some(version);
        self.committed = version;
        if let Some(d) = self.divergence.take() {
            info!(version, failed_version = d.failed_version, "every part has version {version} again: converged");
        }
        let step = Instant::now();
        let closed = close_changed_connections(
            &self.paths,
            self.compiled.as_ref(),
            &compiled,
            &workloads,
            &maps,
            self.hub.as_deref(),
        );
        let report = ReconcileReport {
            version,
            generation,
            policies: policies.len(),
            workloads: workloads.len(),
            kernel_rules: compiled.snapshot.rules.len(),
            closed_connections: closed.denied + closed.rerouted,
            closed_rerouted: closed.rerouted,
            warnings: compiled.warnings.clone(),
            compile_us,
            proxy_us,
            kernel_us,
            close_us: step.elapsed().as_micros() as u64,
            proxy_note,
        };
        self.compiled = Some(compiled);
        Ok(report)
    }

    /// The kernel and l7proxy have `version` and the store refused it: every part goes back to
    /// `in_force`, the last version all of them had (the kernel first, then l7proxy), and the
    /// store is opened again to read what it holds (redb refuses every later call on a handle
    /// after a failed write). If all of that works the apply failed cleanly; otherwise the
    /// parts disagree, the error says which holds what, and [`Controller::converge`] keeps
    /// trying.
    fn after_failed_commit(&mut self, maps: &mut Maps, version: u64, in_force: u64, e: StoreError) -> NodeError {
        let reason = e.to_string();
        warn!(version, error = %reason, "the store refused version {version}; putting every part back to version {in_force}");
        let mut undone = Vec::new();
        let kernel = match &self.compiled {
            Some(old) => match maps.apply(&old.snapshot) {
                Ok(_) => in_force,
                Err(e) => {
                    undone.push(format!("the kernel stays at version {version}: {e}"));
                    version
                }
            },
            None => {
                undone.push(format!("the kernel stays at version {version}: no earlier version to go back to"));
                version
            }
        };
        self.kernel_version = Some(kernel);
        if let Some(hub) = &self.hub {
            if let Err(note) = hub.republish(self.compiled.as_ref(), PROXY_ACK_TIMEOUT) {
                undone.push(format!("l7proxy did not load version {in_force} again: {note}"));
            }
        }
        self.store.close(&reason);
        let stored = match self.store.reopen().and_then(|()| self.store.version()) {
            Ok(v) => Some(v),
            Err(e) => {
                undone.push(format!("the store could not be read again: {e}"));
                None
            }
        };
        if undone.is_empty() && stored == Some(in_force) {
            return NodeError::Apply { step: ApplyStep::Store, version, in_force, reason, too_big: false };
        }
        let target = stored.unwrap_or(in_force);
        let undone = undone.join("; ");
        self.divergence =
            Some(Divergence { failed_version: version, target, reason: undone.clone(), attempts: 0, last_error: None });
        let parts = self.in_force().map(|f| f.describe()).unwrap_or_default();
        warn!(version, target, "the node's parts disagree: {parts}");
        NodeError::Diverged { version, reason, undone, parts, target }
    }

    /// After a failed apply left the parts apart: opens the store again if it is closed and
    /// puts the version it holds in force in l7proxy and the kernel. `Ok(None)`: nothing to
    /// do; `Ok(Some(_))`: every part has the store's version now; `Err`: not yet (the reason
    /// is kept for `in_force`).
    pub fn converge(&mut self) -> Result<Option<ReconcileReport>, NodeError> {
        let Some(mut d) = self.divergence.clone() else { return Ok(None) };
        d.attempts += 1;
        let result = if self.store.is_open() { Ok(()) } else { self.store.reopen() };
        let result = result.map_err(NodeError::from).and_then(|()| Ok(self.store.version()?)).and_then(|target| {
            d.target = target;
            self.transact(None, ProxyStep::Required)
        });
        match result {
            Ok(report) => Ok(Some(report)),
            Err(e) => {
                if d.attempts % 30 == 1 {
                    warn!(attempts = d.attempts, error = %e, "the node's parts still disagree");
                }
                d.last_error = Some(e.to_string());
                self.divergence = Some(d);
                Err(e)
            }
        }
    }

    /// After a step failed for `version` (why: `reason`): l7proxy gets the version in force
    /// again (a proxy that is away loads it when it connects). A connected proxy that has not
    /// taken it back within the wait (a stopped one) may still load `version` first, then the
    /// one in force: the returned reason says so rather than claim the proxy has it.
    fn withdraw_from_proxy(&self, version: u64, reason: String) -> String {
        let Some(hub) = &self.hub else { return reason };
        match hub.republish(self.compiled.as_ref(), PROXY_ACK_TIMEOUT) {
            Err(note) if hub.status().0 > 0 => {
                warn!("{note}");
                format!(
                    "{reason} (and l7proxy has not taken the version in force back yet: it may load version \
                     {version} before it: {note})"
                )
            }
            Err(note) => {
                warn!("{note}");
                reason
            }
            Ok(()) => reason,
        }
    }

    /// The policies of `keys` that `--policy` files manage, with their files (for an API
    /// write, refused unless forced).
    fn file_managed<'a>(&self, keys: impl IntoIterator<Item = &'a str>) -> Result<Vec<(String, String)>, NodeError> {
        let stored = self.store.policies()?;
        Ok(keys
            .into_iter()
            .filter_map(|key| {
                stored
                    .iter()
                    .find(|p| p.origin.starts_with("file:") && p.policy.doc.key() == key)
                    .map(|p| (key.to_string(), p.policy.file.clone()))
            })
            .collect())
    }

    fn refuse_file_managed<'a>(&self, keys: impl IntoIterator<Item = &'a str>, force: bool) -> Result<(), NodeError> {
        if force {
            return Ok(());
        }
        let managed = self.file_managed(keys)?;
        if managed.is_empty() {
            Ok(())
        } else {
            Err(NodeError::FileManaged(managed))
        }
    }

    /// Stores `policies` as `origin` (all or none) and puts them in force, unless, together
    /// with what is stored, they contradict each other, or (unless `force`) `--policy` files
    /// manage any of them.
    #[allow(clippy::type_complexity)]
    pub fn apply(
        &mut self,
        origin: &str,
        policies: &[l7policy::validate::LoadedPolicy],
        actor: &crate::store::Actor,
        force: bool,
    ) -> Result<(Vec<(String, crate::store::Change)>, ReconcileReport), NodeError> {
        let keys: Vec<String> = policies.iter().map(|p| p.doc.key()).collect();
        self.refuse_file_managed(keys.iter().map(String::as_str), force)?;
        let conflicts = self.conflicts_with(policies, Replacing::Nothing)?;
        if !conflicts.is_empty() {
            return Err(NodeError::Conflicts(conflicts));
        }
        let staged = self.store.stage_apply(origin, policies, actor)?;
        let changes = staged.changes.clone();
        Ok((changes, self.transact(Some(staged), ProxyStep::Required)?))
    }

    /// Every check [`Controller::apply`] makes, changing nothing: conflicts with what is
    /// stored, the compiled version's own conflicts, whether it fits the kernel's maps beside
    /// the version in force (both are in the maps until the flip), and l7proxy's tables built
    /// from it. Returns what would change and the warnings (the compiler's, the rules l7proxy
    /// would skip).
    #[allow(clippy::type_complexity)]
    pub fn dry_run(
        &mut self,
        origin: &str,
        policies: &[l7policy::validate::LoadedPolicy],
        force: bool,
    ) -> Result<(Vec<(String, crate::store::Change)>, Vec<String>), NodeError> {
        let keys: Vec<String> = policies.iter().map(|p| p.doc.key()).collect();
        self.refuse_file_managed(keys.iter().map(String::as_str), force)?;
        let conflicts = self.conflicts_with(policies, Replacing::Nothing)?;
        if !conflicts.is_empty() {
            return Err(NodeError::Conflicts(conflicts));
        }
        // Staged in a transaction that is dropped, never committed.
        let staged = self.store.stage_apply(origin, policies, &crate::store::Actor::default())?;
        let warnings = self.check_staged(&staged)?;
        Ok((staged.changes.clone(), warnings))
    }

    /// A dry run's checks of what `staged` would store: the compiled version's own conflicts,
    /// whether it fits the kernel's maps beside the version in force, and l7proxy's tables
    /// built from it (the very tables a real apply publishes; the rules it would skip are
    /// warnings, as an apply logs them). The warnings.
    fn check_staged(&self, staged: &Staged) -> Result<Vec<String>, NodeError> {
        let stored: Vec<_> = staged.policies()?.into_iter().map(|p| p.policy).collect();
        let mut compiled = compile_in_cluster(
            &stored,
            &staged.workloads()?,
            self.cluster_view.as_ref(),
            &host_prefixes(),
            staged.version,
        );
        if !compiled.conflicts.is_empty() {
            return Err(NodeError::Conflicts(compiled.conflicts));
        }
        reserve_ports(&mut compiled, &self.reserved_ports);
        if let Some(why) = Maps::open(&self.paths.pin_dir)?.check_fits(&compiled.snapshot)? {
            return Err(NodeError::TooBig(why));
        }
        let tables = l7rules::Tables::build(&compiled.published);
        let mut warnings = compiled.warnings;
        warnings.extend(tables.errors.iter().map(|e| format!("l7proxy would skip a rule: {e}")));
        Ok(warnings)
    }

    /// In a cluster: other nodes' workloads or the nodes themselves changed. The version in
    /// force is compiled again with them (a new version when that changes what it says) and
    /// put in force as a workload change is (l7proxy when it answers).
    pub fn set_cluster_view(
        &mut self,
        view: l7policy::compile::ClusterView,
    ) -> Result<Option<ReconcileReport>, NodeError> {
        self.cluster_view = Some(view);
        if self.compiled.is_none() || !self.store.is_open() {
            return Ok(None);
        }
        self.reconcile().map(Some)
    }

    /// In a cluster: makes the stored set exactly `policies` (the cluster's set, read and
    /// validated from the kvstore; origin `cluster`) and puts it in force as any write does
    /// (l7proxy required; all or nothing). `Ok(None)`: the store holds that set already.
    pub fn sync_cluster(
        &mut self,
        policies: &[l7policy::validate::LoadedPolicy],
        actor: &crate::store::Actor,
        keep_own: bool,
    ) -> Result<Option<ReconcileReport>, NodeError> {
        let stored = self.store.policies()?;
        if keep_own {
            // A node's own policies (from before it joined) go only where the cluster's set
            // holds them as they are.
            let own: Vec<String> = stored
                .iter()
                .filter(|s| s.origin != CLUSTER_ORIGIN)
                .filter(|s| !policies.iter().any(|p| p.doc.key() == s.policy.doc.key() && p.doc == s.policy.doc))
                .map(|s| s.policy.doc.key())
                .collect();
            if !own.is_empty() {
                return Err(NodeError::OwnPolicies(own));
            }
        }
        let same = stored.len() == policies.len()
            && stored.iter().all(|s| {
                s.origin == CLUSTER_ORIGIN
                    && policies.iter().any(|p| p.doc.key() == s.policy.doc.key() && p.doc == s.policy.doc)
            });
        if same && self.divergence.is_none() && self.compiled.is_some() {
            return Ok(None);
        }
        let conflicts = self.conflicts_with(policies, Replacing::All)?;
        if !conflicts.is_empty() {
            return Err(NodeError::Conflicts(conflicts));
        }
        let staged = self.store.stage_replace_all(CLUSTER_ORIGIN, policies, actor)?;
        self.transact(Some(staged), ProxyStep::Required).map(Some)
    }

    /// Every check [`Controller::apply`] makes, for `set` as the node's whole set (a cluster
    /// write: the cluster's set with the change made), changing nothing; the warnings.
    pub fn dry_run_set(&mut self, set: &[l7policy::validate::LoadedPolicy]) -> Result<Vec<String>, NodeError> {
        let conflicts = self.conflicts_with(set, Replacing::All)?;
        if !conflicts.is_empty() {
            return Err(NodeError::Conflicts(conflicts));
        }
        let staged = self.store.stage_replace_all(CLUSTER_ORIGIN, set, &crate::store::Actor::default())?;
        self.check_staged(&staged)
    }

    /// Deletes stored policies (all or none) and puts the version without them in force;
    /// `NotFound` names those not stored, `FileManaged` (unless `force`) those that `--policy`
    /// files manage.
    pub fn delete(
        &mut self,
        keys: &[String],
        actor: &crate::store::Actor,
        force: bool,
    ) -> Result<ReconcileReport, NodeError> {
        let stored: Vec<String> = self.store.policies()?.iter().map(|p| p.policy.doc.key()).collect();
        let missing: Vec<String> = keys.iter().filter(|k| !stored.contains(k)).cloned().collect();
        if !missing.is_empty() {
            return Err(NodeError::NotFound(missing));
        }
        self.refuse_file_managed(keys.iter().map(String::as_str), force)?;
        let Some(staged) = self.store.stage_delete(keys, actor)? else {
            return Err(NodeError::NotFound(keys.to_vec()));
        };
        self.transact(Some(staged), ProxyStep::Required)
    }

    /// Puts the API's policies of `version` back as a new version: the policies `l7ctl apply`
    /// wrote become exactly those that version had (created, updated back, or deleted). Those
    /// that `--policy` files manage, now or then, are left as the files have them (returned).
    /// As any write: all or nothing, and on any failure the version in force stays.
    #[allow(clippy::type_complexity)]
    pub fn rollback(
        &mut self,
        version: u64,
        by: Option<String>,
    ) -> Result<(Vec<(String, crate::store::Change)>, Vec<String>, ReconcileReport), NodeError> {
        let target = self.store.policy_set(version)?;
        let now_from_files: Vec<String> = self
            .store
            .policies()?
            .into_iter()
            .filter(|p| p.origin.starts_with("file:"))
            .map(|p| p.policy.doc.key())
            .collect();
        let (file_managed, api): (Vec<_>, Vec<_>) = target
            .into_iter()
            .partition(|p| p.origin.starts_with("file:") || now_from_files.contains(&p.policy.doc.key()));
        let policies: Vec<_> = api.into_iter().map(|p| p.policy).collect();
        let file_managed: Vec<String> = file_managed.iter().map(|p| p.policy.doc.key()).collect();
        let conflicts = self.conflicts_with(&policies, Replacing::Origin("api"))?;
        if !conflicts.is_empty() {
            return Err(NodeError::Conflicts(conflicts));
        }
        let actor = crate::store::Actor { by, rollback_of: Some(version) };
        let staged = self.store.stage_replace_origin("api", &policies, &actor)?;
        let changes = staged.changes.clone();
        Ok((changes, file_managed, self.transact(Some(staged), ProxyStep::Required)?))
    }

    /// The stored set with `policies` applied over it (replacing `replacing`'s policies, if
    /// given), compiled in memory: the contradictions it would have.
    fn conflicts_with(
        &self,
        policies: &[l7policy::validate::LoadedPolicy],
        replacing: Replacing<'_>,
    ) -> Result<Vec<String>, NodeError> {
        let mut set: Vec<_> = self
            .store
            .policies()?
            .into_iter()
            .filter(|p| match replacing {
                Replacing::Nothing => true,
                Replacing::Origin(o) => p.origin != o,
                Replacing::All => false,
            })
            .map(|p| p.policy)
            .filter(|p| !policies.iter().any(|n| n.doc.key() == p.doc.key()))
            .collect();
        set.extend(policies.iter().cloned());
        // The registered workloads, plus one stand-in per endpointSelector's matchLabels, so
        // that policies selecting the same workloads conflict before any such workload runs.
        let mut workloads = self.store.workloads()?;
        for p in &set {
            for (_, rule) in p.doc.rules() {
                let Some(labels) = rule.endpoint_selector.as_ref().and_then(|s| s.match_labels.as_ref()) else {
                    continue;
                };
                let mut spec: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                if let Some(ns) = p.doc.namespace() {
                    spec.push(format!("{}={ns}", l7policy::labels::NAMESPACE_KEY));
                }
                if let Ok(labels) = Labels::parse(&spec.join(",")) {
                    let n = workloads.len() as u64;
                    workloads.push(Workload {
                        name: format!("(selector of {})", p.doc.key()),
                        labels,
                        cgroup_id: u64::MAX - n,
                    });
                }
            }
        }
        Ok(compile_in_cluster(&set, &workloads, self.cluster_view.as_ref(), &host_prefixes(), 0).conflicts)
    }
}

/// The origin of policies that come from the cluster's kvstore.
pub const CLUSTER_ORIGIN: &str = "cluster";

/// Which stored policies a set of new ones replaces, for the conflict check.
#[derive(Clone, Copy)]
enum Replacing<'a> {
    Nothing,
    Origin(&'a str),
    All,
}

/// Adds, for every workload, an egress deny of TCP to `host` on `ports` (deny wins over any
/// allow; it switches no default-deny on).
pub fn reserve_ports(compiled: &mut Compiled, ports: &[u16]) {
    let mut ports = ports.to_vec();
    ports.sort_unstable();
    ports.dedup();
    let endpoints: Vec<u32> = compiled.snapshot.endpoints.iter().map(|e| e.endpoint_id).collect();
    for endpoint_id in endpoints {
        for &port in &ports {
            compiled.snapshot.rules.push(redirector::PolicyRule {
                endpoint_id,
                direction: Direction::Egress,
                protocol: Protocol::Tcp,
                peer_identity: redirector::identity::HOST,
                ports: (port, port),
                verdict: redirector::Verdict { action: redirector::Action::Deny, policy_id: 0, audit: false },
            });
        }
    }
}

fn create_private_dir(dir: &Path) -> Result<(), NodeError> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io_err("chmod 0700", dir))
}

/// Names, sizes and modification times of the policy files: a change in any means reload.
fn fingerprint(source: &Path) -> String {
    let files = l7policy::validate::policy_files(source).unwrap_or_default();
    let mut out = String::new();
    for f in files {
        let meta = std::fs::metadata(&f).ok();
        let mtime = meta.as_ref().and_then(|m| m.modified().ok()).map(|t| format!("{t:?}")).unwrap_or_default();
        out.push_str(&format!("{}|{}|{mtime};", f.display(), meta.map(|m| m.len()).unwrap_or(0)));
    }
    if out.is_empty() {
        out = format!("missing:{}", source.display());
    }
    out
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// This node's own addresses (the `host` entity): loopback and every interface address.
pub fn host_prefixes() -> Vec<IpNet> {
    let mut out: Vec<IpNet> = vec!["127.0.0.0/8".parse().expect("literal"), "::1/128".parse().expect("literal")];
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for a in addrs {
            let Some(addr) = a.address else { continue };
            let ip: Option<IpAddr> = if let Some(v4) = addr.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            };
            if let Some(ip) = ip {
                let net = IpNet::from(ip);
                if !out.iter().any(|n| n.contains(&net)) {
                    out.push(net);
                }
            }
        }
    }
    out
}

/// How many connections a reconcile closed, by why.
#[derive(Debug, Default, Clone, Copy)]
struct Closed {
    denied: usize,
    rerouted: usize,
}

/// Re-judges every established connection of the node's workloads under the version before
/// (`old`, when known) and `compiled` (see `rejudge`), and closes those the new version denies
/// or carries differently: connections through the proxy by the proxy, both sides, with a flow
/// saying why (policy-api names their downstream peers on the policy stream); the rest in the
/// kernel (sock_diag destroy, through `ss -K`), as are proxied ones when no proxy answers.
fn close_changed_connections(
    paths: &NodePaths,
    old: Option<&Compiled>,
    compiled: &Compiled,
    workloads: &[Workload],
    maps: &Maps,
    hub: Option<&ProxyHub>,
) -> Closed {
    let cgroups: BTreeMap<String, u64> = workloads.iter().map(|w| (w.name.clone(), w.cgroup_id)).collect();
    let listeners = maps.listeners();
    let netns_cookie = redirector::current_netns_cookie().unwrap_or(0);
    let config = maps.config().ok();
    let listener_owner = |addr: SocketAddr| {
        listeners
            .iter()
            .filter(|l| l.protocol == Protocol::Tcp && l.addr.port() == addr.port())
            .find(|l| l.addr.ip() == addr.ip() || l.addr.ip().is_unspecified())
            .map(|l| l.cgroup_id)
    };
    let original_destination = |peer: SocketAddr| maps.original_destination(netns_cookie, peer).map(|o| o.addr);
    let proxy = rejudge::ProxyView {
        listen: config
            .iter()
            .flat_map(|c| [redirector::from_words(c.proxy_addr4), redirector::from_words(c.proxy_addr6)])
            .collect(),
        egress_port: config.map(|c| c.egress_port).unwrap_or(0),
        ingress_port: config.map(|c| c.ingress_port).unwrap_or(0),
        upstream_src: config
            .iter()
            .flat_map(|c| [redirector::from_words(c.upstream_src4), redirector::from_words(c.upstream_src6)])
            .collect(),
    };
    let sockets = rejudge::node_sockets(&paths.cgroup_root);
    let mut closed = Closed::default();
    let mut proxied: Vec<(rejudge::Candidate, CloseReason)> = Vec::new();
    let mut direct: Vec<(rejudge::Candidate, CloseReason)> = Vec::new();
    for c in rejudge::candidates(&sockets, &cgroups, &listener_owner, &original_destination, &proxy) {
        let Some(new) = rejudge::handling(compiled, &c.flow) else { continue };
        let before = old.and_then(|o| rejudge::handling(o, &c.flow));
        let Some(reason) = rejudge::close_reason(c.carried, before.as_ref(), &new) else { continue };
        if c.proxy_peer.is_some() {
            proxied.push((c, reason));
        } else {
            direct.push((c, reason));
        }
    }
    for ((c, reason), gone) in direct.iter().zip(destroy_all(direct.iter().map(|(c, _)| &c.socket))) {
        if gone {
            info!(owner = ?c.socket.owner, local = %c.socket.local, remote = %c.socket.remote, ?reason, "closed an established connection the new policy version changes");
            count(&mut closed, *reason);
        }
    }
    if !proxied.is_empty() {
        let peers = |r: CloseReason| -> Vec<SocketAddr> {
            proxied
                .iter()
                .filter(|(_, why)| (*why == CloseReason::Denied) == (r == CloseReason::Denied))
                .filter_map(|(c, _)| c.proxy_peer)
                .collect()
        };
        let (deny, reroute) = (peers(CloseReason::Denied), peers(CloseReason::Rerouted));
        match hub.map(|h| h.close_proxied(compiled.published.version, &deny, &reroute, PROXY_ACK_TIMEOUT)) {
            Some(Ok((d, r))) => {
                info!(
                    denied = d,
                    rerouted = r,
                    "l7proxy closed the proxied connections the new policy version changes"
                );
                closed.denied += d;
                closed.rerouted += r;
            }
            other => {
                if let Some(Err(e)) = other {
                    warn!(error = %e, "closing proxied connections in the kernel instead");
                }
                for ((_, reason), gone) in proxied.iter().zip(destroy_all(proxied.iter().map(|(c, _)| &c.socket))) {
                    if gone {
                        count(&mut closed, *reason);
                    }
                }
            }
        }
    }
    closed
}

fn count(closed: &mut Closed, reason: CloseReason) {
    match reason {
        CloseReason::Denied => closed.denied += 1,
        CloseReason::NowProxied | CloseReason::Rerouted => closed.rerouted += 1,
    }
}

/// Destroys `sockets` in the kernel (sock_diag, through one `ss -K` for all of them: a process
/// per socket cost milliseconds each); for each, whether it was found and destroyed.
fn destroy_all<'a>(sockets: impl Iterator<Item = &'a rejudge::NodeSocket>) -> Vec<bool> {
    let sockets: Vec<&rejudge::NodeSocket> = sockets.collect();
    if sockets.is_empty() {
        return Vec::new();
    }
    let mut args = vec!["-tnHK".to_string(), "state".into(), "established".into()];
    for (i, s) in sockets.iter().enumerate() {
        let (src, dst) = (s.local, s.remote);
        if i > 0 {
            args.push("or".into());
        }
        let filter = format!(
            "( src {} sport = :{} dst {} dport = :{} )",
            bracket(src.ip()),
            src.port(),
            bracket(dst.ip()),
            dst.port()
        );
        args.extend(filter.split(' ').map(str::to_string));
    }
    let destroyed: Vec<(SocketAddr, SocketAddr)> = match std::process::Command::new("ss").args(&args).output() {
        Ok(out) => String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| {
                let cols: Vec<&str> = line.split_whitespace().collect();
                Some((rejudge::parse_ss_addr(cols.get(2)?)?, rejudge::parse_ss_addr(cols.get(3)?)?))
            })
            .collect(),
        Err(e) => {
            warn!(error = %e, "ss -K failed");
            Vec::new()
        }
    };
    sockets.iter().map(|s| destroyed.contains(&(s.local, s.remote))).collect()
}

fn bracket(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::rejudge::parse_ss_addr;

    #[test]
    fn ss_addresses() {
        assert_eq!(parse_ss_addr("127.0.0.1:8080"), Some("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(parse_ss_addr("[::1]:80"), Some("[::1]:80".parse().unwrap()));
        assert_eq!(parse_ss_addr("[::ffff:127.0.0.1]:80"), Some("127.0.0.1:80".parse().unwrap()));
        assert_eq!(parse_ss_addr("[fe80::1%eth0]:22"), Some("[fe80::1]:22".parse().unwrap()));
    }

    #[test]
    fn workload_names() {
        assert!(is_dns_label("tiefighter-1"));
        assert!(!is_dns_label("Tie"));
        assert!(!is_dns_label("-x"));
        assert!(!is_dns_label(""));
    }
}

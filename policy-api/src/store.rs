//! The embedded persistent store (redb): policies, the workload registry and the policy
//! version. Every change is one write transaction, so a set of policies is stored whole or not
//! at all, and a restart finds exactly what was last committed.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use thiserror::Error;

use l7policy::compile::Workload;
use l7policy::validate::LoadedPolicy;

/// policy key (`namespace/name` or `name`) -> JSON of [`StoredPolicy`].
const POLICIES: TableDefinition<&str, &str> = TableDefinition::new("policies");
/// workload name -> JSON of [`Workload`].
const WORKLOADS: TableDefinition<&str, &str> = TableDefinition::new("workloads");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// policy version -> JSON of [`HistoryEntry`]: what each version changed.
const HISTORY: TableDefinition<u64, &str> = TableDefinition::new("history");
/// policy version (of a history entry) -> JSON of the policy set after it: each key with the
/// version that wrote its document ([`REVISIONS`]), what `l7ctl rollback` puts back.
const SETS: TableDefinition<u64, &str> = TableDefinition::new("policy_sets");
/// `key` NUL `version` -> JSON of the [`StoredPolicy`] that version wrote (a key's document
/// is kept once per change, not once per version that holds it).
const REVISIONS: TableDefinition<&str, &str> = TableDefinition::new("policy_revisions");
const VERSION_KEY: &str = "policy_version";

/// How many policy versions the history keeps (with their policy sets, for `l7ctl rollback`):
/// the oldest go as new ones come, and with them the documents no kept version holds.
pub const HISTORY_LIMIT: usize = 100;

/// Who is behind a write, for the history: what the API client said (`by`), and for a
/// rollback the version it puts back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Actor {
    pub by: Option<String>,
    pub rollback_of: Option<u64>,
}

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Db(#[from] redb::Error),
    #[error("store: corrupt record {key}: {source}")]
    Corrupt { key: String, source: serde_json::Error },
    #[error("workload name `{0}` is taken by a running workload")]
    NameTaken(String),
    /// The store was closed after a failed write (redb refuses every later use of a handle
    /// after an I/O error) and could not be opened again yet.
    #[error("store: {path} is not open ({why})")]
    Closed { path: String, why: String },
    #[error("version {version} is not in the policy history ({kept})")]
    NotInHistory { version: u64, kept: String },
    #[error("version {0} was recorded before this node kept whole policy sets: its policies cannot be put back")]
    NoPolicySet(u64),
}

impl From<redb::DatabaseError> for StoreError {
    fn from(e: redb::DatabaseError) -> Self {
        StoreError::Db(e.into())
    }
}
impl From<redb::TransactionError> for StoreError {
    fn from(e: redb::TransactionError) -> Self {
        StoreError::Db(e.into())
    }
}
impl From<redb::TableError> for StoreError {
    fn from(e: redb::TableError) -> Self {
        StoreError::Db(e.into())
    }
}
impl From<redb::StorageError> for StoreError {
    fn from(e: redb::StorageError) -> Self {
        StoreError::Db(e.into())
    }
}
impl From<redb::CommitError> for StoreError {
    fn from(e: redb::CommitError) -> Self {
        StoreError::Db(e.into())
    }
}

/// A policy as stored: the validated document, where it came from and who put it there
/// (`file:<path>` for `l7ctl up --policy`, `api` for `l7ctl apply`), its revision (1 when
/// created, +1 at each change of the document) and when it last changed.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StoredPolicy {
    pub policy: LoadedPolicy,
    pub origin: String,
    #[serde(default)]
    pub revision: u64,
    #[serde(default)]
    pub updated: String,
}

// What a write did, and each version in the history: REST views too (l7mesh-api).
pub use l7mesh_api::rest::{Change, HistoryEntry};

fn open_db(path: &Path) -> Result<Database, StoreError> {
    let db = Database::create(path)?;
    let txn = db.begin_write()?;
    {
        txn.open_table(POLICIES)?;
        txn.open_table(WORKLOADS)?;
        txn.open_table(META)?;
        txn.open_table(HISTORY)?;
        txn.open_table(SETS)?;
        txn.open_table(REVISIONS)?;
    }
    txn.commit()?;
    Ok(db)
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// Which stored policies a write replaces (those it does not name are deleted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Replace {
    Nothing,
    Origin,
    All,
}

pub struct Store {
    /// None after [`Store::close`] until [`Store::reopen`] succeeds.
    db: Option<Database>,
    path: PathBuf,
    /// Why the store is closed.
    closed_why: String,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Ok(Store { db: Some(open_db(path)?), path: path.to_path_buf(), closed_why: String::new() })
    }

    /// Drops the handle: after a failed commit redb answers every later call on it with an
    /// error, and only a fresh open reads what the file holds.
    pub fn close(&mut self, why: &str) {
        self.db = None;
        self.closed_why = why.to_string();
    }

    /// Opens the file again (closing the current handle first: redb locks the file per handle).
    pub fn reopen(&mut self) -> Result<(), StoreError> {
        self.db = None;
        match open_db(&self.path) {
            Ok(db) => {
                self.db = Some(db);
                Ok(())
            }
            Err(e) => {
                self.closed_why = e.to_string();
                Err(e)
            }
        }
    }

    pub fn is_open(&self) -> bool {
        self.db.is_some()
    }

    fn db(&self) -> Result<&Database, StoreError> {
        self.db
            .as_ref()
            .ok_or_else(|| StoreError::Closed { path: self.path.display().to_string(), why: self.closed_why.clone() })
    }

    /// Replaces every policy of `origin` with `policies`, in one transaction, and bumps the
    /// policy version. Returns the new version.
    pub fn replace_origin(&self, origin: &str, policies: &[LoadedPolicy]) -> Result<u64, StoreError> {
        let staged = self.stage_replace_origin(origin, policies, &Actor::default())?;
        let version = staged.version;
        staged.commit()?;
        Ok(version)
    }

    /// Creates or updates `policies` (by key) in one transaction: all or none. Returns the
    /// new version and what happened to each.
    pub fn apply(&self, origin: &str, policies: &[LoadedPolicy]) -> Result<(u64, Vec<(String, Change)>), StoreError> {
        let staged = self.stage_apply(origin, policies, &Actor::default())?;
        let out = (staged.version, staged.changes.clone());
        staged.commit()?;
        Ok(out)
    }

    /// [`Store::replace_origin`], written but not committed.
    pub fn stage_replace_origin(
        &self,
        origin: &str,
        policies: &[LoadedPolicy],
        actor: &Actor,
    ) -> Result<Staged, StoreError> {
        self.write(origin, policies, Replace::Origin, actor)
    }

    /// Makes the stored set exactly `policies`, all of `origin` (a cluster's set, which owns
    /// every policy of the node), written but not committed.
    pub fn stage_replace_all(
        &self,
        origin: &str,
        policies: &[LoadedPolicy],
        actor: &Actor,
    ) -> Result<Staged, StoreError> {
        self.write(origin, policies, Replace::All, actor)
    }

    /// [`Store::apply`], written but not committed.
    pub fn stage_apply(&self, origin: &str, policies: &[LoadedPolicy], actor: &Actor) -> Result<Staged, StoreError> {
        self.write(origin, policies, Replace::Nothing, actor)
    }

    fn write(
        &self,
        origin: &str,
        policies: &[LoadedPolicy],
        replace: Replace,
        actor: &Actor,
    ) -> Result<Staged, StoreError> {
        let txn = self.db()?.begin_write()?;
        let version;
        let mut changes = Vec::new();
        let now = now_rfc3339();
        {
            let mut table = txn.open_table(POLICIES)?;
            let mut existing = read_policies(&table)?;
            if replace != Replace::Nothing {
                let gone: Vec<String> = existing
                    .iter()
                    .filter(|(_, stored)| replace == Replace::All || stored.origin == origin)
                    .filter(|(k, _)| !policies.iter().any(|p| &p.doc.key() == *k))
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in gone {
                    table.remove(k.as_str())?;
                    let stored = existing.remove(&k).expect("listed above");
                    changes.push((k, Change::Deleted, stored.revision));
                }
            }
            for p in policies {
                let key = p.doc.key();
                let (change, revision, updated) = match existing.get(&key) {
                    None => (Change::Created, 1, now.clone()),
                    Some(old) if old.policy.doc == p.doc => (Change::Unchanged, old.revision, old.updated.clone()),
                    Some(old) => (Change::Updated, old.revision + 1, now.clone()),
                };
                let stored = StoredPolicy { policy: p.clone(), origin: origin.to_string(), revision, updated };
                let json = serde_json::to_string(&stored)
                    .map_err(|source| StoreError::Corrupt { key: key.clone(), source })?;
                table.insert(key.as_str(), json.as_str())?;
                existing.insert(key.clone(), stored);
                changes.push((key, change, revision));
            }
            version = bump(&txn)?;
            record(&txn, version, origin, actor, &changes, &existing)?;
        }
        Ok(Staged { txn, version, changes: changes.into_iter().map(|(k, c, _)| (k, c)).collect() })
    }

    /// Deletes one policy. `Ok(None)`: there is no such policy (nothing changed).
    pub fn delete(&self, key: &str) -> Result<Option<u64>, StoreError> {
        let Some(staged) = self.stage_delete(&[key.to_string()], &Actor::default())? else { return Ok(None) };
        let version = staged.version;
        staged.commit()?;
        Ok(Some(version))
    }

    /// Deletes `keys` in one transaction, written but not committed. `Ok(None)`: one of them
    /// is not stored (nothing is deleted, the caller says which).
    pub fn stage_delete(&self, keys: &[String], actor: &Actor) -> Result<Option<Staged>, StoreError> {
        let txn = self.db()?.begin_write()?;
        let version;
        let mut changes = Vec::new();
        {
            let mut table = txn.open_table(POLICIES)?;
            let mut existing = read_policies(&table)?;
            for key in keys {
                let Some(old) = existing.remove(key) else { return Ok(None) };
                table.remove(key.as_str())?;
                changes.push((key.clone(), Change::Deleted, old.revision));
            }
            version = bump(&txn)?;
            record(&txn, version, "api", actor, &changes, &existing)?;
        }
        Ok(Some(Staged { txn, version, changes: changes.into_iter().map(|(k, c, _)| (k, c)).collect() }))
    }

    /// The policy set in the store right after `version` (a version of the history), each
    /// policy as that version had it.
    pub fn policy_set(&self, version: u64) -> Result<Vec<StoredPolicy>, StoreError> {
        let txn = self.db()?.begin_read()?;
        let history = txn.open_table(HISTORY)?;
        if history.get(version)?.is_none() {
            let first = history.first()?.map(|(k, _)| k.value());
            let last = history.last()?.map(|(k, _)| k.value());
            let kept = match (first, last) {
                (Some(a), Some(b)) => format!(
                    "it keeps versions {a} to {b}, those that changed policies (workloads starting and stopping make \
                     versions too; `l7ctl history` lists them)"
                ),
                _ => "it is empty".to_string(),
            };
            return Err(StoreError::NotInHistory { version, kept });
        }
        let sets = txn.open_table(SETS)?;
        let Some(set) = sets.get(version)? else { return Err(StoreError::NoPolicySet(version)) };
        let set: Vec<(String, u64)> = serde_json::from_str(set.value())
            .map_err(|source| StoreError::Corrupt { key: format!("policy set {version}"), source })?;
        let revisions = txn.open_table(REVISIONS)?;
        let mut out = Vec::new();
        for (key, written) in set {
            let rk = revision_key(&key, written);
            let Some(json) = revisions.get(rk.as_str())? else { return Err(StoreError::NoPolicySet(version)) };
            out.push(serde_json::from_str(json.value()).map_err(|source| StoreError::Corrupt { key: rk, source })?);
        }
        Ok(out)
    }

    /// Every recorded policy version, oldest first.
    pub fn history(&self) -> Result<Vec<HistoryEntry>, StoreError> {
        self.read_all(HISTORY)
    }

    /// Makes the version at least 1, so that every policy set in force has a version.
    pub fn ensure_version(&self) -> Result<u64, StoreError> {
        if self.version()? > 0 {
            return self.version();
        }
        let txn = self.db()?.begin_write()?;
        let v = bump(&txn)?;
        txn.commit()?;
        Ok(v)
    }

    pub fn policies(&self) -> Result<Vec<StoredPolicy>, StoreError> {
        self.read_all(POLICIES)
    }

    /// Every JSON record of `table`, decoded.
    fn read_all<K, T>(&self, table: TableDefinition<K, &str>) -> Result<Vec<T>, StoreError>
    where
        K: redb::Key + 'static,
        for<'a> K::SelfType<'a>: std::fmt::Display,
        T: serde::de::DeserializeOwned,
    {
        let txn = self.db()?.begin_read()?;
        let table = txn.open_table(table)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (k, v) = row?;
            out.push(
                serde_json::from_str(v.value())
                    .map_err(|source| StoreError::Corrupt { key: k.value().to_string(), source })?,
            );
        }
        Ok(out)
    }

    /// Registers a workload; fails if the name is taken.
    pub fn register(&self, workload: &Workload) -> Result<u64, StoreError> {
        let staged = self.stage_register(workload)?;
        let version = staged.version;
        staged.commit()?;
        Ok(version)
    }

    /// [`Store::register`], written but not committed.
    pub fn stage_register(&self, workload: &Workload) -> Result<Staged, StoreError> {
        let txn = self.db()?.begin_write()?;
        let version;
        {
            let mut table = txn.open_table(WORKLOADS)?;
            if table.get(workload.name.as_str())?.is_some() {
                return Err(StoreError::NameTaken(workload.name.clone()));
            }
            let json = serde_json::to_string(workload)
                .map_err(|source| StoreError::Corrupt { key: workload.name.clone(), source })?;
            table.insert(workload.name.as_str(), json.as_str())?;
            version = bump(&txn)?;
        }
        Ok(Staged { txn, version, changes: Vec::new() })
    }

    pub fn deregister(&self, name: &str) -> Result<u64, StoreError> {
        let staged = self.stage_deregister(name)?;
        let version = staged.version;
        staged.commit()?;
        Ok(version)
    }

    /// [`Store::deregister`], written but not committed.
    pub fn stage_deregister(&self, name: &str) -> Result<Staged, StoreError> {
        let txn = self.db()?.begin_write()?;
        let version;
        {
            let mut table = txn.open_table(WORKLOADS)?;
            table.remove(name)?;
            version = bump(&txn)?;
        }
        Ok(Staged { txn, version, changes: Vec::new() })
    }

    pub fn workloads(&self) -> Result<Vec<Workload>, StoreError> {
        self.read_all(WORKLOADS)
    }

    pub fn version(&self) -> Result<u64, StoreError> {
        let txn = self.db()?.begin_read()?;
        let table = txn.open_table(META)?;
        Ok(table.get(VERSION_KEY)?.map(|v| v.value()).unwrap_or(0))
    }
}

/// A change written in an open write transaction but not committed: what it would store is
/// readable ([`Staged::policies`], [`Staged::workloads`]) so the node can compile it and put it
/// in force in l7proxy and the kernel first; [`Staged::commit`] makes it the stored version, and
/// dropping it leaves the store as it was. (redb holds one write transaction at a time; the
/// controller's mutex serializes changes anyway.)
pub struct Staged {
    txn: redb::WriteTransaction,
    /// The policy version this change becomes (the stored one + 1).
    pub version: u64,
    pub changes: Vec<(String, Change)>,
}

impl Staged {
    pub fn policies(&self) -> Result<Vec<StoredPolicy>, StoreError> {
        read_table(&self.txn.open_table(POLICIES)?)
    }

    pub fn workloads(&self) -> Result<Vec<Workload>, StoreError> {
        read_table(&self.txn.open_table(WORKLOADS)?)
    }

    pub fn commit(self) -> Result<(), StoreError> {
        Ok(self.txn.commit()?)
    }
}

fn read_table<T: serde::de::DeserializeOwned>(
    table: &impl ReadableTable<&'static str, &'static str>,
) -> Result<Vec<T>, StoreError> {
    let mut out = Vec::new();
    for row in table.iter()? {
        let (k, v) = row?;
        out.push(
            serde_json::from_str(v.value())
                .map_err(|source| StoreError::Corrupt { key: k.value().to_string(), source })?,
        );
    }
    Ok(out)
}

fn read_policies(
    table: &impl ReadableTable<&'static str, &'static str>,
) -> Result<std::collections::BTreeMap<String, StoredPolicy>, StoreError> {
    let mut out = std::collections::BTreeMap::new();
    for row in table.iter()? {
        let (k, v) = row?;
        let stored: StoredPolicy = serde_json::from_str(v.value())
            .map_err(|source| StoreError::Corrupt { key: k.value().to_string(), source })?;
        out.insert(k.value().to_string(), stored);
    }
    Ok(out)
}

fn revision_key(key: &str, written: u64) -> String {
    format!("{key}\0{written}")
}

/// Records what `version` changed and the policy set after it (`after`), and drops the
/// versions beyond [`HISTORY_LIMIT`]. A write that changed no policy records nothing.
fn record(
    txn: &redb::WriteTransaction,
    version: u64,
    origin: &str,
    actor: &Actor,
    changes: &[(String, Change, u64)],
    after: &std::collections::BTreeMap<String, StoredPolicy>,
) -> Result<(), StoreError> {
    let changed: Vec<_> = changes.iter().filter(|(_, c, _)| *c != Change::Unchanged).cloned().collect();
    if changed.is_empty() {
        return Ok(());
    }
    let corrupt = |key: String| move |source| StoreError::Corrupt { key, source };
    let entry = HistoryEntry {
        version,
        time: now_rfc3339(),
        origin: origin.to_string(),
        changes: changed.clone(),
        by: actor.by.clone(),
        rollback_of: actor.rollback_of,
    };
    let json = serde_json::to_string(&entry).map_err(corrupt(format!("history {version}")))?;
    let mut history = txn.open_table(HISTORY)?;
    history.insert(version, json.as_str())?;
    // Each policy of the set points at the version that wrote its document: this one for those
    // it changed, the previous set's for the rest (a key deleted and created again gets a new
    // one, so a document is never confused with an earlier life's).
    let mut sets = txn.open_table(SETS)?;
    let previous: std::collections::BTreeMap<String, u64> = match sets.last()? {
        Some((_, v)) => serde_json::from_str::<Vec<(String, u64)>>(v.value())
            .map_err(corrupt("the last policy set".into()))?
            .into_iter()
            .collect(),
        None => Default::default(),
    };
    let mut revisions = txn.open_table(REVISIONS)?;
    let mut set = Vec::with_capacity(after.len());
    for (key, stored) in after {
        let was_changed = changed.iter().any(|(k, _, _)| k == key);
        let written = match previous.get(key) {
            Some(&w) if !was_changed => w,
            _ => {
                let json = serde_json::to_string(stored).map_err(corrupt(key.clone()))?;
                revisions.insert(revision_key(key, version).as_str(), json.as_str())?;
                version
            }
        };
        set.push((key.clone(), written));
    }
    let json = serde_json::to_string(&set).map_err(corrupt(format!("policy set {version}")))?;
    sets.insert(version, json.as_str())?;
    // The oldest versions go; a document goes with the last kept set that holds it. A key's
    // document is held by consecutive sets only (a change writes a new one), so a dropped
    // set's document that the oldest kept set does not hold is held by no kept set.
    while history.len()? > HISTORY_LIMIT as u64 {
        let oldest = match history.pop_first()? {
            Some((k, _)) => k.value(),
            None => break,
        };
        let dropped: Vec<(String, u64)> = match sets.remove(oldest)? {
            Some(v) => serde_json::from_str(v.value()).map_err(corrupt(format!("policy set {oldest}")))?,
            None => continue,
        };
        let kept: Vec<(String, u64)> = match sets.first()? {
            Some((_, v)) => serde_json::from_str(v.value()).map_err(corrupt("the oldest policy set".into()))?,
            None => Vec::new(),
        };
        for (key, written) in dropped {
            if !kept.iter().any(|(k, w)| *k == key && *w == written) {
                revisions.remove(revision_key(&key, written).as_str())?;
            }
        }
    }
    Ok(())
}

fn bump(txn: &redb::WriteTransaction) -> Result<u64, StoreError> {
    let mut meta = txn.open_table(META)?;
    let next = meta.get(VERSION_KEY)?.map(|v| v.value()).unwrap_or(0) + 1;
    meta.insert(VERSION_KEY, next)?;
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use l7policy::labels::Labels;
    use l7policy::validate::load_text;

    fn policy(name: &str) -> LoadedPolicy {
        let text = format!("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n  endpointSelector: {{}}\n  ingress: [{{}}]\n");
        load_text("t.yaml", &text).0.remove(0)
    }

    #[test]
    fn policies_and_workloads_survive_reopening() {
        let dir = std::env::temp_dir().join(format!("l7mesh-store-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("store.redb");
        {
            let store = Store::open(&path).unwrap();
            assert_eq!(store.replace_origin("file:a", &[policy("one"), policy("two")]).unwrap(), 1);
            store.replace_origin("api", &[policy("three")]).unwrap();
            // Replacing an origin drops what it no longer has and leaves other origins alone.
            store.replace_origin("file:a", &[policy("two")]).unwrap();
            let w = Workload { name: "web".into(), labels: Labels::parse("app=web").unwrap(), cgroup_id: 7 };
            store.register(&w).unwrap();
            assert!(matches!(store.register(&w), Err(StoreError::NameTaken(n)) if n == "web"));
        }
        let store = Store::open(&path).unwrap();
        let mut keys: Vec<String> = store.policies().unwrap().iter().map(|p| p.policy.doc.key()).collect();
        keys.sort();
        assert_eq!(keys, vec!["default/three", "default/two"]);
        assert_eq!(store.workloads().unwrap()[0].cgroup_id, 7);
        assert_eq!(store.version().unwrap(), 4);
        let (_, changes) = store.apply("api", &[policy("three"), policy("four")]).unwrap();
        assert_eq!(
            changes,
            vec![("default/three".into(), Change::Unchanged), ("default/four".into(), Change::Created)]
        );
        assert_eq!(store.delete("default/four").unwrap(), Some(6));
        assert_eq!(store.delete("default/four").unwrap(), None);
        let history = store.history().unwrap();
        assert_eq!(history.last().unwrap().changes, vec![("default/four".to_string(), Change::Deleted, 1)]);
        assert_eq!(history.iter().map(|h| h.version).collect::<Vec<_>>(), vec![1, 2, 3, 5, 6]);
        store.deregister("web").unwrap();
        assert!(store.workloads().unwrap().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn policy_with(name: &str, port: u16) -> LoadedPolicy {
        let text = format!("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n  endpointSelector: {{}}\n  ingress: [{{toPorts: [{{ports: [{{port: \"{port}\"}}]}}]}}]\n");
        load_text("t.yaml", &text).0.remove(0)
    }

    fn temp_store(tag: &str) -> (std::path::PathBuf, Store) {
        let dir = std::env::temp_dir().join(format!("l7mesh-store-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let store = Store::open(&dir.join("store.redb")).unwrap();
        (dir, store)
    }

    /// (key, port of its first rule) of each policy of a set, sorted.
    fn ports(set: &[StoredPolicy]) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = set
            .iter()
            .map(|p| {
                let v = serde_json::to_value(&p.policy.doc).unwrap();
                let port = v["spec"]["ingress"][0]["toPorts"][0]["ports"][0]["port"].as_str().unwrap_or("").to_string();
                (p.policy.doc.key(), port)
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn each_version_keeps_its_whole_policy_set() {
        let (dir, store) = temp_store("sets");
        let actor = Actor { by: Some("alice (l7ctl apply -f a.yaml)".into()), rollback_of: None };
        let v1 = store.stage_apply("api", &[policy_with("a", 80), policy_with("b", 81)], &actor).unwrap();
        let v1 = {
            let v = v1.version;
            v1.commit().unwrap();
            v
        };
        let (v2, _) = store.apply("api", &[policy_with("a", 8080)]).unwrap();
        let v3 = store.delete("default/b").unwrap().unwrap();
        // b created again: a new life, whose document must not be confused with the first's.
        let (v4, _) = store.apply("api", &[policy_with("b", 9999)]).unwrap();
        let at = |v| ports(&store.policy_set(v).unwrap());
        let pair = |k: &str, p: &str| (k.to_string(), p.to_string());
        assert_eq!(at(v1), vec![pair("default/a", "80"), pair("default/b", "81")]);
        assert_eq!(at(v2), vec![pair("default/a", "8080"), pair("default/b", "81")]);
        assert_eq!(at(v3), vec![pair("default/a", "8080")]);
        assert_eq!(at(v4), vec![pair("default/a", "8080"), pair("default/b", "9999")]);
        let history = store.history().unwrap();
        assert_eq!(history[0].by.as_deref(), Some("alice (l7ctl apply -f a.yaml)"));
        assert_eq!(history[1].by, None);
        // A version that changed no policy (a workload registered) is not in the history.
        let w = Workload { name: "web".into(), labels: Labels::parse("app=web").unwrap(), cgroup_id: 7 };
        let v5 = store.register(&w).unwrap();
        assert!(matches!(store.policy_set(v5), Err(StoreError::NotInHistory { version, .. }) if version == v5));
        assert!(matches!(store.policy_set(0), Err(StoreError::NotInHistory { .. })));
        assert!(matches!(store.policy_set(u64::MAX), Err(StoreError::NotInHistory { .. })));
        // The sets survive reopening.
        drop(store);
        let store = Store::open(&dir.join("store.redb")).unwrap();
        assert_eq!(ports(&store.policy_set(v2).unwrap()), vec![pair("default/a", "8080"), pair("default/b", "81")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_history_is_bounded_and_drops_the_documents_no_kept_version_holds() {
        let (dir, store) = temp_store("bound");
        // `steady` never changes after the first version: its one document is held by every set.
        store.apply("api", &[policy_with("steady", 1)]).unwrap();
        let mut versions = Vec::new();
        for i in 0..(HISTORY_LIMIT as u16 + 30) {
            versions.push(store.apply("api", &[policy_with("churn", 1000 + i)]).unwrap().0);
        }
        let history = store.history().unwrap();
        assert_eq!(history.len(), HISTORY_LIMIT);
        let kept: Vec<u64> = history.iter().map(|h| h.version).collect();
        assert_eq!(kept, versions[versions.len() - HISTORY_LIMIT..].to_vec(), "the newest are kept");
        let oldest_kept = kept[0];
        assert!(matches!(store.policy_set(oldest_kept - 1), Err(StoreError::NotInHistory { .. })));
        // Every kept version can still be put back whole, `steady` included.
        let set = ports(&store.policy_set(oldest_kept).unwrap());
        assert_eq!(set.len(), 2, "{set:?}");
        assert_eq!(set[1], ("default/steady".to_string(), "1".to_string()));
        let txn = store.db().unwrap().begin_read().unwrap();
        assert_eq!(txn.open_table(SETS).unwrap().len().unwrap(), HISTORY_LIMIT as u64);
        // One document per kept change of churn, plus steady's one.
        assert_eq!(txn.open_table(REVISIONS).unwrap().len().unwrap(), HISTORY_LIMIT as u64 + 1);
        drop(txn);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_closed_store_refuses_every_call_until_it_is_opened_again() {
        let dir = std::env::temp_dir().join(format!("l7mesh-store-close-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut store = Store::open(&dir.join("store.redb")).unwrap();
        store.apply("api", &[policy("one")]).unwrap();
        store.close("a failed commit");
        assert!(!store.is_open());
        assert!(matches!(store.policies(), Err(StoreError::Closed { why, .. }) if why == "a failed commit"));
        assert!(store.stage_apply("api", &[policy("two")], &Actor::default()).is_err());
        store.reopen().unwrap();
        assert_eq!(store.policies().unwrap().len(), 1);
        assert_eq!(store.version().unwrap(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_staged_change_is_stored_only_when_committed() {
        let dir = std::env::temp_dir().join(format!("l7mesh-store-stage-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let store = Store::open(&dir.join("store.redb")).unwrap();
        store.apply("api", &[policy("one")]).unwrap();
        let before = store.version().unwrap();
        let staged = store.stage_apply("api", &[policy("two")], &Actor::default()).unwrap();
        assert_eq!(staged.version, before + 1);
        // The staged set is readable in the transaction, and invisible outside it.
        assert_eq!(staged.policies().unwrap().len(), 2);
        assert_eq!(store.policies().unwrap().len(), 1);
        drop(staged);
        assert_eq!(store.version().unwrap(), before);
        assert_eq!(store.policies().unwrap().len(), 1);
        assert_eq!(store.history().unwrap().len(), 1);
        // The next change takes the same version number the dropped one had.
        let staged = store.stage_delete(&["default/one".to_string()], &Actor::default()).unwrap().unwrap();
        assert_eq!(staged.version, before + 1);
        staged.commit().unwrap();
        assert!(store.policies().unwrap().is_empty());
        assert_eq!(store.version().unwrap(), before + 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

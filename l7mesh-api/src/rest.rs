//! policy-api's REST answers as it writes them and l7ctl reads them: the views (status,
//! policies, workloads, history, an apply's result) and the error answers.

use serde::{Deserialize, Serialize};

use crate::Verdict;

/// One finding about an uploaded policy file, as an error answer lists them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diagnostic {
    pub severity: String,
    pub file: String,
    #[serde(default)]
    pub line: Option<usize>,
    #[serde(default)]
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{l}: {}: ", self.file, self.severity)?,
            None => write!(f, "{}: {}: ", self.file, self.severity)?,
        }
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        write!(f, "{}", self.message)
    }
}

/// The body of every non-2xx answer (policy-api adds fields about a failed apply; readers
/// that need them read them from the same body).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub error: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub diagnostics: Vec<Diagnostic>,
}

impl ErrorReply {
    /// The answer's body read as an error reply; a body that is not one (a proxy's or an old
    /// server's plain text) becomes its message.
    pub fn from_body(body: &[u8]) -> Self {
        serde_json::from_slice(body).unwrap_or_else(|_| ErrorReply {
            error: String::from_utf8_lossy(body).trim().to_string(),
            ..Self::default()
        })
    }
}

/// A call policy-api answered with an error status: told apart by its status, not its text.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message} ({status} {reason})")]
pub struct ApiFailure {
    pub status: u16,
    /// The status's canonical reason (`Not Found`).
    pub reason: String,
    pub message: String,
}

impl ApiFailure {
    pub fn is_not_found(&self) -> bool {
        self.status == 404
    }
}

/// The steps of putting a version in force, in order (after compiling): l7proxy loads it,
/// the kernel flips to it, the store commits it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApplyStep {
    Proxy,
    Kernel,
    Store,
}

impl std::fmt::Display for ApplyStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ApplyStep::Proxy => "the l7proxy step (loading the tables)",
            ApplyStep::Kernel => "the kernel step (writing the maps)",
            ApplyStep::Store => "the store step (committing)",
        })
    }
}

/// The policy version each part has in force.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InForce {
    /// The committed version (the last one policy-api saw committed, while the store cannot
    /// be read: see `store_error`).
    pub store: u64,
    /// Why the store cannot be read now, if it cannot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_error: Option<String>,
    /// The version the kernel's current generation holds (None: not applied by this process yet).
    pub kernel: Option<u64>,
    pub kernel_generation: u32,
    /// The version l7proxy last said it loaded (None: no proxy has loaded one from this process).
    pub proxy: Option<u64>,
    pub proxy_connected: usize,
    /// Every part known to hold the store's version (false while a [`Divergence`] lasts).
    pub converged: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub divergence: Option<Divergence>,
}

impl InForce {
    /// "kernel: version 8, l7proxy: version 8, store: version 7 (committed)", for errors and logs.
    pub fn describe(&self) -> String {
        let v = |x: Option<u64>| x.map_or("none".to_string(), |n| format!("version {n}"));
        let store = match &self.store_error {
            Some(why) => format!("cannot be read ({why}); it last committed version {}", self.store),
            None => format!("version {} (committed)", self.store),
        };
        format!("kernel: {}, l7proxy: {}, store: {store}", v(self.kernel), v(self.proxy))
    }
}

/// Why the node's parts disagree, and the version it brings them to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Divergence {
    /// The version whose commit failed.
    pub failed_version: u64,
    /// The version every part is being brought to: the store's (the last one all parts had
    /// while the store cannot be read).
    pub target: u64,
    /// What could not be undone after the failed commit.
    pub reason: String,
    /// Attempts to converge so far (policy-api makes one every 300 ms), and why the last one
    /// failed.
    pub attempts: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// What a reconcile did, and how long each step took.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconcileReport {
    pub version: u64,
    pub generation: u32,
    pub policies: usize,
    pub workloads: usize,
    pub kernel_rules: usize,
    /// Established connections closed: those the new version denies, plus `closed_rerouted`.
    pub closed_connections: usize,
    /// Of those, connections the new version carries differently (newly marked for the proxy,
    /// other TLS handling, no longer through the proxy): their clients reconnect and are
    /// judged anew.
    pub closed_rerouted: usize,
    pub warnings: Vec<String>,
    pub compile_us: u64,
    /// Until l7proxy said it swapped its tables in (0 when no proxy is connected).
    pub proxy_us: u64,
    /// The kernel maps' generation flip.
    pub kernel_us: u64,
    /// Re-judging (and closing) established connections.
    pub close_us: u64,
    /// Why the proxy step did not complete, if it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_note: Option<String>,
}

/// `GET /v1/status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The committed version (as `in_force.store`).
    pub version: u64,
    /// The version each part has in force: store, kernel, l7proxy.
    pub in_force: InForce,
    /// How many the store holds (null while it cannot be read).
    pub policies: Option<usize>,
    pub workloads: Option<usize>,
    pub proxy_connected: usize,
    pub proxy_version: Option<u64>,
    pub last_apply: Option<ReconcileReport>,
    /// policy-api's own version (its `--version`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub api_version: String,
    /// The last failed writes and rejected policy file changes, oldest first (at most
    /// [`RECENT_ERRORS`]; policy-api keeps them in memory, so a restart forgets them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recent_errors: Vec<RecentError>,
    /// In a cluster (`l7ctl up --kvstore`): how the node stands with the kvstore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kvstore: Option<crate::cluster::KvstoreStatus>,
}

/// How many failures `/v1/status` keeps in `recent_errors`.
pub const RECENT_ERRORS: usize = 10;

/// One failure `/v1/status` remembers: when, what failed, and the error as it was answered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecentError {
    pub time: String,
    pub during: ErrorSource,
    pub error: String,
}

/// What was being done when a [`RecentError`] happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorSource {
    /// An apply through the API (`l7ctl apply`).
    Apply,
    /// A delete through the API (`l7ctl delete`).
    Delete,
    /// `l7ctl rollback`.
    Rollback,
    /// A change of the `--policy` files that did not validate or could not be put in force.
    PolicyFiles,
    /// The cluster's policy set (from the kvstore) that could not be put in force here.
    Cluster,
}

impl std::fmt::Display for ErrorSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ErrorSource::Apply => "apply",
            ErrorSource::Delete => "delete",
            ErrorSource::Rollback => "rollback",
            ErrorSource::PolicyFiles => "policy files",
            ErrorSource::Cluster => "cluster",
        })
    }
}

/// What a write did to one policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    Created,
    Updated,
    Unchanged,
    Deleted,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Change::Created => "created",
            Change::Updated => "updated",
            Change::Unchanged => "unchanged",
            Change::Deleted => "deleted",
        })
    }
}

/// The answer to an apply (`POST /v1/policies`, also a dry run: version 0, an empty report)
/// and a delete (`DELETE /v1/policies/{key}`): each policy key with what happened to it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub version: u64,
    pub changes: Vec<(String, Change)>,
    pub warnings: Vec<String>,
    pub report: ReconcileReport,
    /// In a cluster: the kvstore revision the write made and what each node said of it
    /// (`report` and `version` are then this node's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterApplied>,
}

/// A cluster write: its kvstore revision and, per node, whether that node has it in force.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterApplied {
    pub revision: i64,
    pub nodes: Vec<crate::cluster::NodeApplied>,
}

/// One policy version of `GET /v1/history` (also how the store keeps it): when, what changed
/// (policy key, change, revision after it), where from (`origin`: `api`, or `file:PATH` for
/// `l7ctl up --policy`) and who said so (`by`, as the API client named itself: l7ctl sends
/// the user and the command).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub version: u64,
    pub time: String,
    pub origin: String,
    pub changes: Vec<(String, Change, u64)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// The version whose policy set this one put back (`l7ctl rollback`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_of: Option<u64>,
}

/// How an API client names who is behind a write (recorded in the history as `by`); l7ctl
/// sends `USER (l7ctl COMMAND)`.
pub const ACTOR_HEADER: &str = "l7mesh-actor";

/// `POST /v1/rollback`: put the policy set of `version` back, as a new version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollback {
    pub version: u64,
}

/// The answer to a rollback: the new version and what it did to each API policy, plus the
/// policies it left alone because their files manage them (`l7ctl up --policy`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolledBack {
    pub applied: Applied,
    pub rollback_of: u64,
    /// Policy keys of that version's set that `--policy` files manage (now or then): left as
    /// the files have them.
    pub file_managed: Vec<String>,
}

/// A stored policy as `GET /v1/policies` shows it. The document is generic: policy-api
/// writes its parsed `PolicyDocument`, l7ctl reads it as JSON to print as YAML (the policy
/// model stays policy-api's, not a contract of its own).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyView<D = serde_json::Value> {
    pub key: String,
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
    pub origin: String,
    pub revision: u64,
    pub updated: String,
    pub audit: bool,
    pub document: D,
    /// The registered workloads its endpointSelectors select (by name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub selects: Vec<String>,
}

/// A registered workload as `GET /v1/workloads` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadView {
    pub name: String,
    /// The node it runs on (in a cluster; empty on a node alone). A workload of another node
    /// has no cgroup, endpoint or identity here (`cgroup_id` 0).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
    pub namespace: String,
    pub labels: String,
    pub cgroup_id: u64,
    pub endpoint_id: Option<u32>,
    pub identity: Option<u32>,
    pub ingress_enforced: bool,
    pub egress_enforced: bool,
}

/// One kind of change a simulation found, with how often it happened and one concrete example.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeGroup {
    /// The verdict the flow was recorded with.
    pub before: Verdict,
    /// The candidate's verdict for it.
    pub after: Verdict,
    pub from: String,
    pub to: String,
    pub protocol: String,
    pub detail: String,
    pub count: u64,
    /// The candidate policy that decides it, when one does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    pub example_time: String,
}

/// `POST /v1/simulate`: recorded flows replayed against a candidate policy set.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimulationReport {
    pub flows: u64,
    pub replayed: u64,
    pub skipped: u64,
    pub unchanged: u64,
    pub newly_denied: u64,
    pub newly_allowed: u64,
    pub newly_audit: u64,
    pub changes: Vec<ChangeGroup>,
    pub notes: Vec<String>,
    /// The flows not replayed (`skipped`), by why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped_by: Vec<SkippedFlows>,
}

/// Recorded flows of one kind that a simulation could not replay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedFlows {
    pub reason: SkipReason,
    pub count: u64,
}

/// Why a recorded flow cannot be replayed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SkipReason {
    /// The proxy's own record of a connection it carried (its requests are flows of their
    /// own, replayed one by one).
    ProxyConnection,
    /// Neither end is a workload (of this node, or one that ran here before).
    NoWorkload,
    /// Neither TCP nor UDP.
    Protocol,
    /// An end whose address cannot be read, so its identity is unknown.
    UnknownPeer,
    /// A Kafka request of an API key the rules do not know.
    KafkaApiKey,
}

impl SkipReason {
    /// Why flows of this kind are not replayed, for the report.
    pub fn explain(self) -> &'static str {
        match self {
            SkipReason::ProxyConnection => {
                "the proxy's record of a connection it carried: its requests are replayed one by one instead"
            }
            SkipReason::NoWorkload => "neither end is a workload, so no policy of this node judges it",
            SkipReason::Protocol => "neither TCP nor UDP: policies judge only those",
            SkipReason::UnknownPeer => "an end without a readable address: its identity cannot be known",
            SkipReason::KafkaApiKey => "a Kafka request of an API key the rules do not know",
        }
    }
}

/// A policy upload (`POST /v1/policies`, `/v1/simulate`) as l7ctl sends it, with the
/// [`Upload::CONTENT_TYPE`], so that diagnostics name the user's files.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upload {
    pub files: Vec<UploadFile>,
}

impl Upload {
    pub const CONTENT_TYPE: &'static str = "application/vnd.l7mesh.upload+json";
}

/// One uploaded file: its name (for diagnostics) and its YAML or JSON text.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadFile {
    pub name: String,
    pub text: String,
}

/// `GET /v1/servicemap?format=json`: who talks to whom, from flows.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceMap {
    pub nodes: Vec<ServiceMapNode>,
    pub edges: Vec<ServiceMapEdge>,
}

/// A workload, or a peer that is not one (by its address).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceMapNode {
    pub name: String,
    pub kind: NodeKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// What a service map node is: a workload of this node, or an address that is not one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeKind {
    Workload,
    External,
}

/// Traffic from one node to another.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceMapEdge {
    pub from: String,
    pub to: String,
    pub protocols: std::collections::BTreeSet<String>,
    /// L7 requests (HTTP, gRPC, Kafka per topic).
    pub requests: u64,
    /// Connections the kernel judged (connect / sendmsg / sk_lookup).
    pub connections: u64,
    pub denied: u64,
    pub audit: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_replies_read_back() {
        let reply = ErrorReply {
            error: "invalid policy".into(),
            diagnostics: vec![Diagnostic {
                severity: "error".into(),
                file: "p.yaml".into(),
                line: Some(3),
                path: "spec.ingress".into(),
                message: "unknown field".into(),
            }],
        };
        let body = serde_json::to_vec(&reply).unwrap();
        assert_eq!(ErrorReply::from_body(&body), reply);
        assert_eq!(reply.diagnostics[0].to_string(), "p.yaml:3: error: spec.ingress: unknown field");
        // Extra fields of a failed apply are skipped; plain text becomes the message.
        let failed = ErrorReply::from_body(br#"{"error":"kernel step failed","failed_step":"kernel","in_force":3}"#);
        assert_eq!(failed.error, "kernel step failed");
        assert_eq!(ErrorReply::from_body(b"bad gateway\n").error, "bad gateway");
    }

    #[test]
    fn failures_tell_not_found_by_status() {
        let missing = ApiFailure { status: 404, reason: "Not Found".into(), message: "no policy default/x".into() };
        assert!(missing.is_not_found());
        assert_eq!(missing.to_string(), "no policy default/x (404 Not Found)");
        // A message that merely mentions 404 is not a 404.
        let other = ApiFailure { status: 400, reason: "Bad Request".into(), message: "port 404 is reserved".into() };
        assert!(!other.is_not_found());
    }

    /// Reads `sample` as `T` and writes it back: the same bytes (the samples are what
    /// policy-api's server types wrote before they moved here).
    fn round_trips<T: Serialize + serde::de::DeserializeOwned>(sample: &str) -> T {
        let view: T = serde_json::from_str(sample).unwrap();
        assert_eq!(serde_json::to_string(&view).unwrap(), sample);
        view
    }

    #[test]
    fn status_round_trips() {
        let status: Status = round_trips(
            r#"{"version":7,"in_force":{"store":7,"store_error":"disk","kernel":7,"kernel_generation":3,"proxy":null,"proxy_connected":0,"converged":false,"divergence":{"failed_version":8,"target":7,"reason":"r","attempts":2,"last_error":"e"}},"policies":2,"workloads":null,"proxy_connected":0,"proxy_version":null,"last_apply":{"version":7,"generation":3,"policies":2,"workloads":2,"kernel_rules":11,"closed_connections":3,"closed_rerouted":1,"warnings":["w1"],"compile_us":120,"proxy_us":2500,"kernel_us":800,"close_us":40,"proxy_note":"no l7proxy connected"}}"#,
        );
        assert!(!status.in_force.converged);
        assert_eq!(status.in_force.divergence.as_ref().map(|d| d.target), Some(7));
        assert_eq!(status.last_apply.as_ref().map(|r| r.closed_rerouted), Some(1));
        // Absent optional fields (no store error, no divergence) stay absent.
        let fresh: Status = round_trips(
            r#"{"version":0,"in_force":{"store":0,"kernel":null,"kernel_generation":0,"proxy":null,"proxy_connected":0,"converged":false},"policies":null,"workloads":0,"proxy_connected":1,"proxy_version":3,"last_apply":null}"#,
        );
        assert_eq!(fresh.in_force.store_error, None);
        assert_eq!(fresh.proxy_version, Some(3));
    }

    #[test]
    fn applied_round_trips() {
        let applied: Applied = round_trips(
            r#"{"version":7,"changes":[["default/a","created"],["b","unchanged"]],"warnings":[],"report":{"version":0,"generation":0,"policies":0,"workloads":0,"kernel_rules":0,"closed_connections":0,"closed_rerouted":0,"warnings":[],"compile_us":0,"proxy_us":0,"kernel_us":0,"close_us":0}}"#,
        );
        assert_eq!(applied.changes[0], ("default/a".to_string(), Change::Created));
        assert_eq!(applied.changes[1].1.to_string(), "unchanged");
    }

    #[test]
    fn workloads_round_trip() {
        let workloads: Vec<WorkloadView> = round_trips(
            r#"[{"name":"web","namespace":"default","labels":"app=web","cgroup_id":1234,"endpoint_id":5,"identity":70000,"ingress_enforced":true,"egress_enforced":false},{"name":"db","namespace":"prod","labels":"app=db,ns=prod","cgroup_id":9,"endpoint_id":null,"identity":null,"ingress_enforced":false,"egress_enforced":false}]"#,
        );
        assert_eq!(workloads[0].identity, Some(70000));
        assert_eq!(workloads[1].endpoint_id, None);
    }

    #[test]
    fn history_round_trips() {
        let history: Vec<HistoryEntry> = round_trips(
            r#"[{"version":2,"time":"2026-12-02T13:00:00Z","origin":"api","changes":[["default/a","updated",2],["x","deleted",1]]}]"#,
        );
        assert_eq!(history[0].changes[1], ("x".to_string(), Change::Deleted, 1));
    }

    #[test]
    fn history_with_who_and_rollbacks_round_trips() {
        let history: Vec<HistoryEntry> = round_trips(
            r#"[{"version":9,"time":"2026-12-03T14:00:00Z","origin":"api","changes":[["default/a","updated",3]],"by":"alice (l7ctl rollback 7)","rollback_of":7}]"#,
        );
        assert_eq!(history[0].rollback_of, Some(7));
        assert_eq!(history[0].by.as_deref(), Some("alice (l7ctl rollback 7)"));
        let rolled: RolledBack = round_trips(
            r#"{"applied":{"version":9,"changes":[["default/a","updated"]],"warnings":[],"report":{"version":9,"generation":4,"policies":1,"workloads":0,"kernel_rules":0,"closed_connections":0,"closed_rerouted":0,"warnings":[],"compile_us":1,"proxy_us":2,"kernel_us":3,"close_us":4}},"rollback_of":7,"file_managed":["default/f"]}"#,
        );
        assert_eq!(rolled.file_managed, ["default/f"]);
        let _: Rollback = round_trips(r#"{"version":7}"#);
    }

    #[test]
    fn status_with_recent_errors_round_trips() {
        let status: Status = round_trips(
            r#"{"version":3,"in_force":{"store":3,"kernel":3,"kernel_generation":2,"proxy":3,"proxy_connected":1,"converged":true},"policies":1,"workloads":2,"proxy_connected":1,"proxy_version":3,"last_apply":null,"api_version":"0.1.0","recent_errors":[{"time":"2026-12-03T14:00:00Z","during":"policy-files","error":"p.yaml:3: error: bad"},{"time":"t","during":"rollback","error":"e"}]}"#,
        );
        assert_eq!(status.recent_errors[0].during, ErrorSource::PolicyFiles);
        assert_eq!(status.recent_errors[1].during.to_string(), "rollback");
    }

    #[test]
    fn skipped_flows_round_trip_with_their_reasons() {
        let report: SimulationReport = round_trips(
            r#"{"flows":3,"replayed":0,"skipped":3,"unchanged":0,"newly_denied":0,"newly_allowed":0,"newly_audit":0,"changes":[],"notes":[],"skipped_by":[{"reason":"proxy-connection","count":2},{"reason":"no-workload","count":1}]}"#,
        );
        assert_eq!(report.skipped_by[0].reason, SkipReason::ProxyConnection);
        assert!(report.skipped_by[1].reason.explain().contains("neither end is a workload"));
    }

    #[test]
    fn policies_round_trip() {
        let policies: Vec<PolicyView> = round_trips(
            r#"[{"key":"default/a","kind":"CiliumNetworkPolicy","namespace":"default","name":"a","origin":"api","revision":1,"updated":"2026-12-02T13:00:00Z","audit":false,"document":{"apiVersion":"cilium.io/v2","kind":"CiliumNetworkPolicy","metadata":{"name":"a","namespace":"default"},"spec":{"endpointSelector":{"matchLabels":{"app":"web"}},"ingress":[{"fromEndpoints":[{"matchLabels":{"app":"client"}}],"toPorts":[{"ports":[{"port":"80","protocol":"TCP"}],"rules":{"http":[{"method":"GET","path":"/"}]}}]}]}}}]"#,
        );
        assert_eq!(policies[0].key, "default/a");
        assert_eq!(policies[0].document["spec"]["endpointSelector"]["matchLabels"]["app"], "web");
    }

    #[test]
    fn simulation_report_round_trips() {
        let report: SimulationReport = round_trips(
            r#"{"flows":9,"replayed":8,"skipped":1,"unchanged":5,"newly_denied":2,"newly_allowed":1,"newly_audit":0,"changes":[{"before":"ALLOWED","after":"DENIED","from":"default/client","to":"default/web","protocol":"http","detail":"GET /admin","count":2,"policy":"default/web","example_time":"2026-12-02T13:00:00Z"},{"before":"DENIED","after":"ALLOWED","from":"default/client","to":"10.0.0.1:443","protocol":"tcp","detail":"","count":1,"example_time":"2026-12-02T13:00:01Z"}],"notes":["1 flow has no source workload"]}"#,
        );
        assert_eq!(report.changes[0].policy.as_deref(), Some("default/web"));
        assert_eq!(report.changes[1].policy, None);
    }

    #[test]
    fn upload_round_trips() {
        let upload: Upload = round_trips(r#"{"files":[{"name":"p.yaml","text":"kind: x\n"}]}"#);
        assert_eq!(upload.files[0], UploadFile { name: "p.yaml".into(), text: "kind: x\n".into() });
    }

    #[test]
    fn service_map_round_trips() {
        let map: ServiceMap = round_trips(
            r#"{"nodes":[{"name":"10.0.0.1","kind":"external"},{"name":"a","kind":"workload","namespace":"default"},{"name":"b","kind":"workload"}],"edges":[{"from":"a","to":"10.0.0.1","protocols":["tcp"],"requests":0,"connections":1,"denied":1,"audit":0},{"from":"a","to":"b","protocols":["http","tcp"],"requests":1,"connections":1,"denied":1,"audit":0}]}"#,
        );
        assert_eq!(map.nodes[0].kind, NodeKind::External);
        assert_eq!(map.nodes[1].namespace.as_deref(), Some("default"));
        assert_eq!(map.edges[1].protocols.len(), 2);
    }
}

/// l7proxy's admin `/v1/counters`: the kernel datapath's counters, by name (`redirected`,
/// `denied`, ...), as one JSON object.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DatapathCounters(pub std::collections::BTreeMap<String, u64>);

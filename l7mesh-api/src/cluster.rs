//! What nodes of one cluster keep in the key-value store (etcd): every value is one of these
//! types, as JSON, under the keys [`Keys`] makes. policy-api writes and reads them; nothing
//! else does. A value a node cannot read (another release, a hand edit) is reported by key and
//! skipped, never guessed at: for policies, the node keeps the last set it could read whole.

use serde::{Deserialize, Serialize};

/// The layout of one cluster's keys below a prefix (`/l7mesh/v1` by default).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

/// The default key prefix: the API version is in it, so a later layout can live beside it.
pub const DEFAULT_PREFIX: &str = "/l7mesh/v1";

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Keys { prefix: prefix.trim_end_matches('/').to_string() }
    }

    /// `<prefix>/policies/` (then `namespace/name`, or `name` for a cluster-wide policy):
    /// the cluster's policy set, one [`ClusterPolicy`] per key, no lease (it outlives nodes).
    pub fn policies(&self) -> String {
        format!("{}/policies/", self.prefix)
    }

    pub fn policy(&self, key: &str) -> String {
        format!("{}{key}", self.policies())
    }

    /// `<prefix>/nodes/<node>`: a [`NodeRecord`] under the node's lease.
    pub fn nodes(&self) -> String {
        format!("{}/nodes/", self.prefix)
    }

    pub fn node(&self, node: &str) -> String {
        format!("{}{node}", self.nodes())
    }

    /// `<prefix>/workloads/<node>/<name>`: a [`WorkloadRecord`] under the node's lease, so a
    /// node that dies has its workloads expire from every other node.
    pub fn workloads(&self) -> String {
        format!("{}/workloads/", self.prefix)
    }

    pub fn node_workloads(&self, node: &str) -> String {
        format!("{}{node}/", self.workloads())
    }

    pub fn workload(&self, node: &str, name: &str) -> String {
        format!("{}{name}", self.node_workloads(node))
    }

    /// `<prefix>/in-force/<node>`: a [`NodeInForce`] under the node's lease: which cluster
    /// revision of the policy set the node has in force (what `l7ctl apply` waits for).
    pub fn in_force(&self) -> String {
        format!("{}/in-force/", self.prefix)
    }

    pub fn node_in_force(&self, node: &str) -> String {
        format!("{}{node}", self.in_force())
    }

    /// The part of `key` after `prefix`, if it starts with it.
    pub fn strip<'a>(prefix: &str, key: &'a str) -> Option<&'a str> {
        key.strip_prefix(prefix)
    }
}

/// One policy of the cluster's set: the validated policy as `l7ctl apply` sent it (each node
/// validates it again before it uses it), who wrote it and from which node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterPolicy {
    /// The policy document (a CiliumNetworkPolicy or CiliumClusterwideNetworkPolicy) as JSON.
    pub document: serde_json::Value,
    /// The file and line it came from, for errors and `get policies`.
    pub file: String,
    pub line: usize,
    /// The node whose API took the write.
    pub written_on: String,
    /// Who the API client said it was (l7ctl sends the user and the command).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// When (RFC 3339).
    pub updated: String,
}

/// A node of the cluster, while its lease lives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    /// The addresses other nodes reach it on (its non-loopback interface addresses).
    pub addresses: Vec<std::net::IpAddr>,
    /// When its policy-api joined (RFC 3339).
    pub joined: String,
    /// The l7mesh release it runs.
    pub release: String,
    /// The port its proxy serves the tunnel between nodes on, when its broker holds the node's
    /// intermediate of the cluster's trust (none: connections to it stay direct).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel_port: Option<u16>,
}

/// A workload registered on some node, while that node's lease lives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadRecord {
    pub name: String,
    pub node: String,
    /// Its labels as `l7ctl run --labels` takes them (`k=v,...`, namespace included as
    /// `io.kubernetes.pod.namespace=...` when set).
    pub labels: String,
}

/// A node's tunnel answering another node's proxy which workload listens where one of that
/// node's workloads is about to connect (the address is the node's, shared by all its
/// workloads): the asking proxy judges its workload's egress rules with the answer before
/// anything reaches the listener.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelListener {
    /// The listening workload (namespace, name), or none: a service of the node itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<(String, String)>,
}

/// Which version of the cluster's policy set a node has in force.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInForce {
    pub node: String,
    /// The etcd revision of the policy set in force (every policy key's newest change at or
    /// below it); 0 before the node has put any cluster set in force.
    pub revision: i64,
    /// The node's own policy version for it (its store's numbering).
    pub version: u64,
    /// When the node last failed to put a newer revision in force, why (the revision it
    /// failed on and the error); cleared when a later one goes in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<FailedRevision>,
    pub updated: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedRevision {
    pub revision: i64,
    pub error: String,
}

/// `/v1/status`'s `kvstore`: how this node stands with the cluster's store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvstoreStatus {
    /// The endpoints as configured (`etcd://host:port,...`).
    pub endpoints: String,
    pub node: String,
    pub connected: bool,
    /// Since when it is (dis)connected (RFC 3339).
    pub since: String,
    /// The last error talking to the store, while disconnected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The cluster revision of the policy set this node has in force (0: none yet).
    pub revision: i64,
    /// Every node the store lists (this one included), with what each has in force.
    #[serde(default)]
    pub nodes: Vec<NodeView>,
}

/// One node as `l7ctl get nodes` and `apply` show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    pub name: String,
    pub addresses: Vec<std::net::IpAddr>,
    /// Its tunnel port, while it serves the tunnel between nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel_port: Option<u16>,
    /// The revision it has in force, when it has said.
    pub revision: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<FailedRevision>,
}

/// What a cluster write waited for: each node and whether it has the written revision in
/// force (`in_force`), or why not (`error`: it failed on it, or did not say in time).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeApplied {
    pub node: String,
    pub in_force: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How long it took the node to say so, from the write (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_ms: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_nest_under_their_prefix_and_a_node_name_cannot_reach_another_kind() {
        let k = Keys::new("/l7mesh/v1/");
        assert_eq!(k.policy("default/allow"), "/l7mesh/v1/policies/default/allow");
        assert_eq!(k.workload("node-a", "web"), "/l7mesh/v1/workloads/node-a/web");
        assert_eq!(k.node_in_force("node-a"), "/l7mesh/v1/in-force/node-a");
        // A node's workloads prefix ends in '/': node `a` does not own node `ab`'s keys.
        assert!(!k.workload("ab", "x").starts_with(&k.node_workloads("a")));
    }

    #[test]
    fn values_round_trip() {
        let s = NodeInForce {
            node: "a".into(),
            revision: 7,
            version: 3,
            failed: Some(FailedRevision { revision: 8, error: "no".into() }),
            updated: "t".into(),
        };
        let back: NodeInForce = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }
}

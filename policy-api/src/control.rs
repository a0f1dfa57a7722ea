//! The node's local control channel: `l7ctl run` <-> `l7ctl up`, JSON lines over a root-only
//! Unix socket (`/run/l7mesh/node.sock`). A workload stays registered as long as the
//! connection that registered it is open, so a killed `l7ctl run` is deregistered too.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    /// Register workload `name` with `labels` (`k=v,...`); the reply carries its cgroup.
    Run { name: String, labels: String },
    /// The workload's command exited: deregister it now.
    Done,
    /// Is a node running?
    Status,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// The node's own paths (state, sockets, pins, policy files), which `l7ctl run` hides from
    /// the workload.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hide: Vec<String>,
}

impl Reply {
    pub fn ok() -> Self {
        Reply { ok: true, ..Reply::default() }
    }
    pub fn error(message: impl Into<String>) -> Self {
        Reply { ok: false, error: Some(message.into()), ..Reply::default() }
    }
}

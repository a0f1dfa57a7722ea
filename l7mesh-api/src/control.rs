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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip() {
        // The lines policy-api's control socket wrote and read before these types moved here.
        let replies = [
            r#"{"ok":true,"cgroup":"/sys/fs/cgroup/l7mesh/web","version":4,"hide":["/run/l7mesh"]}"#,
            r#"{"ok":false,"error":"no"}"#,
        ];
        for line in replies {
            let reply: Reply = serde_json::from_str(line).unwrap();
            assert_eq!(serde_json::to_string(&reply).unwrap(), line);
        }
        assert_eq!(serde_json::from_str::<Reply>(replies[1]).unwrap(), Reply::error("no"));
        let requests = [
            (
                Request::Run { name: "web".into(), labels: "app=web".into() },
                r#"{"op":"run","name":"web","labels":"app=web"}"#,
            ),
            (Request::Done, r#"{"op":"done"}"#),
            (Request::Status, r#"{"op":"status"}"#),
        ];
        for (request, line) in requests {
            assert_eq!(serde_json::to_string(&request).unwrap(), line);
            assert_eq!(serde_json::from_str::<Request>(line).unwrap(), request);
        }
    }
}

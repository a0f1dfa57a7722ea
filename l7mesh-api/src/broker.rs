//! One JSON request and one JSON reply per line on the broker's sockets.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Admin: the mesh CA certificate (never a key).
    Ca,
    /// Admin: store a secret.
    Import { namespace: String, name: String, cert: Option<String>, key: Option<String>, ca: Option<String> },
    /// Proxy: a server certificate for these names (DNS names or IPs).
    IssueServer { names: Vec<String> },
    /// Proxy: a client certificate for an identity.
    IssueClient { identity: String },
    /// Proxy: an imported secret.
    Secret { namespace: String, name: String },
    /// Admin: install (or rotate) this node's intermediate of the cluster's trust: a bundle of
    /// the node's certificate, the cluster root's and the node's key (`l7ctl ca issue-node`).
    InstallNodeIssuer { bundle: String },
    /// Admin or proxy: the cluster's trust as this node holds it: the root (`ca`) and the
    /// node's intermediate (`cert`); never a key.
    ClusterTrust,
    /// Proxy: a certificate chain (leaf, then the node's intermediate) and key for workload
    /// `namespace/name` of this node, naming it `spiffe://<trust domain>/ns/<ns>/sa/<name>`.
    IssueWorkload { namespace: String, name: String },
}

impl Request {
    /// The request's name as sent (`op`), for errors and logs: never its fields, which may
    /// hold a key.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Ca => "ca",
            Request::Import { .. } => "import",
            Request::IssueServer { .. } => "issue_server",
            Request::IssueClient { .. } => "issue_client",
            Request::Secret { .. } => "secret",
            Request::InstallNodeIssuer { .. } => "install_node_issuer",
            Request::ClusterTrust => "cluster_trust",
            Request::IssueWorkload { .. } => "issue_workload",
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
}

impl Reply {
    pub fn error(message: impl Into<String>) -> Self {
        Reply { ok: false, error: Some(message.into()), ..Reply::default() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_in_todays_form() {
        let requests = [
            (Request::Ca, r#"{"op":"ca"}"#),
            (Request::IssueServer { names: vec!["web".into()] }, r#"{"op":"issue_server","names":["web"]}"#),
            (
                Request::IssueClient { identity: "default/web".into() },
                r#"{"op":"issue_client","identity":"default/web"}"#,
            ),
            (
                Request::Secret { namespace: "default".into(), name: "api-tls".into() },
                r#"{"op":"secret","namespace":"default","name":"api-tls"}"#,
            ),
            (
                Request::Import {
                    namespace: "n".into(),
                    name: "s".into(),
                    cert: Some("C".into()),
                    key: None,
                    ca: None,
                },
                r#"{"op":"import","namespace":"n","name":"s","cert":"C","key":null,"ca":null}"#,
            ),
        ];
        let requests: Vec<(Request, &str)> = requests
            .into_iter()
            .chain([
                (Request::ClusterTrust, r#"{"op":"cluster_trust"}"#),
                (
                    Request::IssueWorkload { namespace: "default".into(), name: "web".into() },
                    r#"{"op":"issue_workload","namespace":"default","name":"web"}"#,
                ),
                (Request::InstallNodeIssuer { bundle: "B".into() }, r#"{"op":"install_node_issuer","bundle":"B"}"#),
            ])
            .collect();
        for (request, line) in requests {
            assert!(line.starts_with(&format!(r#"{{"op":"{}""#, request.op())), "{line}");
            assert_eq!(serde_json::to_string(&request).unwrap(), line);
            assert_eq!(serde_json::from_str::<Request>(line).unwrap(), request);
        }
        let reply = Reply { ok: true, cert: Some("C".into()), ..Reply::default() };
        assert_eq!(serde_json::to_string(&reply).unwrap(), r#"{"ok":true,"cert":"C"}"#);
        assert_eq!(serde_json::from_str::<Reply>(r#"{"ok":true,"cert":"C"}"#).unwrap(), reply);
        let refused = Reply::error("no such secret");
        assert_eq!(serde_json::from_str::<Reply>(&serde_json::to_string(&refused).unwrap()).unwrap(), refused);
    }
}

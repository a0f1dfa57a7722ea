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

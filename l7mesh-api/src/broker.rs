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
        for (request, line) in requests {
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

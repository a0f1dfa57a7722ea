//! policy-api's REST answers as l7ctl reads them.

use serde::{Deserialize, Serialize};

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
}

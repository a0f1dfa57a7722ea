//! The words a flow is judged and oriented with, written as today's upper-case strings.

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("expected allowed, denied, audit, forwarded or error, got `{0}`")]
    Verdict(String),
    #[error("expected egress or ingress, got `{0}`")]
    Direction(String),
}

/// What became of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Verdict {
    Allowed,
    Denied,
    /// Allowed, but only because an audit-mode policy would have denied it.
    Audit,
    /// A proxied connection that ended without a policy decision (a peer closed or reset it).
    Forwarded,
    /// Neither policy nor a bound refused it, and it failed: the upstream could not be reached,
    /// an I/O error. (DENIED is kept for what policy or a bound refused.)
    Error,
}

impl Verdict {
    pub const ALL: [Verdict; 5] =
        [Verdict::Allowed, Verdict::Denied, Verdict::Audit, Verdict::Forwarded, Verdict::Error];

    pub const fn as_str(self) -> &'static str {
        match self {
            Verdict::Allowed => "ALLOWED",
            Verdict::Denied => "DENIED",
            Verdict::Audit => "AUDIT",
            Verdict::Forwarded => "FORWARDED",
            Verdict::Error => "ERROR",
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Case-insensitive, as flow filters and `l7ctl observe --verdict` take it.
impl std::str::FromStr for Verdict {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Verdict::ALL
            .into_iter()
            .find(|v| v.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| ParseError::Verdict(s.into()))
    }
}

/// Which way a flow went, seen from the workload the policy selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Direction {
    Egress,
    Ingress,
}

impl Direction {
    pub const fn as_str(self) -> &'static str {
        match self {
            Direction::Egress => "EGRESS",
            Direction::Ingress => "INGRESS",
        }
    }
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Direction {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Direction::Egress, Direction::Ingress]
            .into_iter()
            .find(|d| d.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| ParseError::Direction(s.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_as_todays_strings() {
        for v in Verdict::ALL {
            assert_eq!(serde_json::to_string(&v).unwrap(), format!("\"{}\"", v.as_str()));
            assert_eq!(serde_json::from_str::<Verdict>(&serde_json::to_string(&v).unwrap()).unwrap(), v);
            assert_eq!(v.as_str().to_ascii_lowercase().parse::<Verdict>(), Ok(v));
        }
        assert_eq!(serde_json::to_string(&Direction::Ingress).unwrap(), "\"INGRESS\"");
        assert_eq!("egress".parse::<Direction>(), Ok(Direction::Egress));
        assert!("maybe".parse::<Verdict>().is_err());
        assert!("sideways".parse::<Direction>().is_err());
    }
}

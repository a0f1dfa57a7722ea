//! Why a flow was denied (or, in audit mode, would have been): which policy rule decided it
//! ([`DecidedBy`]) and a typed [`Reason`] with a human rendering (`l7ctl explain`). l7proxy
//! builds them from the kernel's own verdict (the rule id the kernel reports) and from the
//! same pure matching functions that enforce L7 rules (`l7rules`), never from a second matcher.

use serde::{Deserialize, Serialize};

use crate::Direction;

/// The policy rule that decided a flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecidedBy {
    /// The policy's key: `namespace/name`, or a clusterwide policy's name.
    pub policy: String,
    /// The rule (list) within the policy, as a field path of its document: `ingressDeny[0]`,
    /// `egress[1].toPorts[0].rules.http`, `specs[1].ingress[0]`. Empty for a default deny,
    /// which no rule makes (the policy is the one that selects the workload in that direction).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub rule: String,
}

impl std::fmt::Display for DecidedBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.rule.is_empty() {
            write!(f, "policy {}", self.policy)
        } else {
            write!(f, "policy {} {}", self.policy, self.rule)
        }
    }
}

/// Why a flow was refused or failed. Old flow lines carry a plain string: [`Reason::Text`],
/// written back as the same string.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Reason {
    /// A policy decision, typed.
    Policy(PolicyReason),
    /// Everything else in words: a bound, a TLS failure, a peer's reset, an upstream that
    /// could not be reached.
    Text(String),
}

impl From<String> for Reason {
    fn from(s: String) -> Self {
        Reason::Text(s)
    }
}

impl From<&str> for Reason {
    fn from(s: &str) -> Self {
        Reason::Text(s.to_string())
    }
}

impl From<PolicyReason> for Reason {
    fn from(r: PolicyReason) -> Self {
        Reason::Policy(r)
    }
}

/// A policy decision against the flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PolicyReason {
    /// Policies select `workload` in `direction` (so it is default-deny there) and no rule of
    /// theirs allows `peer` on the port.
    DefaultDeny {
        workload: String,
        direction: Direction,
        /// The policies that select the workload in that direction (bounded: the first few).
        enforced_by: Vec<String>,
        peer: String,
    },
    /// An explicit deny rule (`ingressDeny` / `egressDeny`) covers `peer` on the port.
    DenyRule { peer: String },
    /// The request was judged against an L7 rule list and none of its rules matched.
    NoRuleMatched {
        /// The rules judged, each with what of the request it did not match (the first
        /// [`MAX_RULES_SHOWN`]).
        rules: Vec<RuleMiss>,
        /// Rules judged beyond those listed.
        #[serde(default, skip_serializing_if = "is_zero")]
        more: usize,
    },
    /// The port's rule list names other peers only: nothing in it applies to `peer`.
    NoRuleForPeer { peer: String },
}

/// Rules a [`PolicyReason::NoRuleMatched`] lists at most (a list of thousands stays one line).
pub const MAX_RULES_SHOWN: usize = 4;

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// One rule a request was judged against, and what of the request it did not match.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleMiss {
    /// What the rule allows, in short: `GET /public/.*`, `helloworld.Greeter/SayHello`,
    /// `produce topic=orders`, `any request`.
    pub allows: String,
    pub missed: Vec<Miss>,
}

/// One field of a request that a rule did not match, with the request's value (header values
/// are not recorded: they may be credentials).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "field", rename_all = "snake_case")]
pub enum Miss {
    Method {
        got: String,
    },
    Path {
        got: String,
    },
    Host {
        got: String,
    },
    /// A header the rule requires is absent or has another value.
    Header {
        name: String,
    },
    /// gRPC service.
    Service {
        got: String,
    },
    /// gRPC method.
    GrpcMethod {
        got: String,
    },
    /// Kafka topic (`None`: the request names none).
    Topic {
        got: Option<String>,
    },
    ApiKey {
        got: String,
    },
    ApiVersion {
        got: i16,
    },
    ClientId {
        got: String,
    },
    /// The rule judges another protocol than the request's (a gRPC list for a plain HTTP
    /// request, a TLS-only rule): it cannot match.
    Protocol,
}

impl Miss {
    fn field(&self) -> &'static str {
        match self {
            Miss::Method { .. } => "method",
            Miss::Path { .. } => "path",
            Miss::Host { .. } => "host",
            Miss::Header { .. } => "header",
            Miss::Service { .. } => "service",
            Miss::GrpcMethod { .. } => "method",
            Miss::Topic { .. } => "topic",
            Miss::ApiKey { .. } => "apiKey",
            Miss::ApiVersion { .. } => "apiVersion",
            Miss::ClientId { .. } => "clientID",
            Miss::Protocol => "protocol",
        }
    }
}

impl std::fmt::Display for Miss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let field = self.field();
        match self {
            Miss::Method { got }
            | Miss::Path { got }
            | Miss::Host { got }
            | Miss::Service { got }
            | Miss::GrpcMethod { got }
            | Miss::ApiKey { got }
            | Miss::ClientId { got } => write!(f, "{field} {got}"),
            Miss::Header { name } => write!(f, "header {name}"),
            Miss::Topic { got: Some(t) } => write!(f, "topic {t}"),
            Miss::Topic { got: None } => write!(f, "a request naming no topic"),
            Miss::ApiVersion { got } => write!(f, "apiVersion {got}"),
            Miss::Protocol => write!(f, "the protocol"),
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Text(s) => f.write_str(s),
            Reason::Policy(p) => p.fmt(f),
        }
    }
}

impl std::fmt::Display for PolicyReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PolicyReason::DefaultDeny { workload, direction, enforced_by, peer } => {
                let by = if enforced_by.is_empty() { "a policy".to_string() } else { enforced_by.join(", ") };
                let dir = crate::tables::direction_word(*direction);
                write!(f, "default deny: {workload} is {dir}-enforced by {by}, no rule allows {peer}")
            }
            PolicyReason::DenyRule { peer } => write!(f, "a deny rule covers {peer}"),
            PolicyReason::NoRuleForPeer { peer } => write!(f, "no rule on the port applies to {peer}"),
            PolicyReason::NoRuleMatched { rules, more } => {
                // The fields every listed rule missed say it shortest ("path /admin"); else
                // each rule's own misses.
                let common: Vec<&Miss> = rules
                    .first()
                    .map(|first| first.missed.iter().filter(|m| rules.iter().all(|r| r.missed.contains(m))).collect())
                    .unwrap_or_default();
                if rules.is_empty() {
                    f.write_str("no rule matched")?;
                } else if !common.is_empty() {
                    let words: Vec<String> = common.iter().map(|m| m.to_string()).collect();
                    write!(f, "no rule matched {}", words.join(", "))?;
                } else {
                    let each: Vec<String> = rules
                        .iter()
                        .map(|r| {
                            let words: Vec<String> = r.missed.iter().map(|m| m.to_string()).collect();
                            format!("`{}` missed {}", r.allows, words.join(", "))
                        })
                        .collect();
                    write!(f, "no rule matched ({})", each.join("; "))?;
                }
                if !rules.is_empty() {
                    let allows: Vec<&str> = rules.iter().map(|r| r.allows.as_str()).collect();
                    let word = if rules.len() + more == 1 { "rule allows" } else { "rules allow" };
                    write!(f, " ({word} {}", allows.join("; "))?;
                    if *more > 0 {
                        write!(f, "; {more} more")?;
                    }
                    f.write_str(")")?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_string_reasons_read_and_write_as_strings() {
        let r: Reason = serde_json::from_str("\"upstream reset the connection\"").unwrap();
        assert_eq!(r, Reason::Text("upstream reset the connection".into()));
        assert_eq!(serde_json::to_string(&r).unwrap(), "\"upstream reset the connection\"");
        let typed = Reason::Policy(PolicyReason::DenyRule { peer: "app=client".into() });
        let line = serde_json::to_string(&typed).unwrap();
        assert_eq!(line, r#"{"kind":"deny_rule","peer":"app=client"}"#);
        assert_eq!(serde_json::from_str::<Reason>(&line).unwrap(), typed);
        assert!(serde_json::from_str::<Reason>(r#"{"kind":"made_up"}"#).is_err(), "an unknown kind is not a reason");
    }

    #[test]
    fn reasons_in_words() {
        let default = PolicyReason::DefaultDeny {
            workload: "server".into(),
            direction: Direction::Ingress,
            enforced_by: vec!["default/web".into()],
            peer: "client".into(),
        };
        assert_eq!(
            default.to_string(),
            "default deny: server is ingress-enforced by default/web, no rule allows client"
        );
        let path = |p: &str| Miss::Path { got: p.into() };
        let one = PolicyReason::NoRuleMatched {
            rules: vec![RuleMiss { allows: "GET /public/.*".into(), missed: vec![path("/admin")] }],
            more: 0,
        };
        assert_eq!(one.to_string(), "no rule matched path /admin (rule allows GET /public/.*)");
        let two = PolicyReason::NoRuleMatched {
            rules: vec![
                RuleMiss {
                    allows: "GET /public/.*".into(),
                    missed: vec![Miss::Method { got: "POST".into() }, path("/x")],
                },
                RuleMiss { allows: "POST /upload".into(), missed: vec![path("/x")] },
            ],
            more: 3,
        };
        assert_eq!(two.to_string(), "no rule matched path /x (rules allow GET /public/.*; POST /upload; 3 more)");
        let apart = PolicyReason::NoRuleMatched {
            rules: vec![
                RuleMiss { allows: "GET".into(), missed: vec![Miss::Method { got: "PUT".into() }] },
                RuleMiss { allows: "host api".into(), missed: vec![Miss::Host { got: "evil".into() }] },
            ],
            more: 0,
        };
        assert_eq!(
            apart.to_string(),
            "no rule matched (`GET` missed method PUT; `host api` missed host evil) (rules allow GET; host api)"
        );
        let header = Miss::Header { name: "x-token".into() };
        assert_eq!(header.to_string(), "header x-token");
        assert_eq!(Miss::Topic { got: None }.to_string(), "a request naming no topic");
    }
}

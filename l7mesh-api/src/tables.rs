//! The published proxy tables (ARCHITECTURE.md, "The policy pipeline"): what l7policy's
//! compiler builds, what policy-api streams to l7proxy and what l7rules' `Tables::build`
//! indexes. One type for writer and reader, so a renamed field cannot silently drop rules.
//!
//! Reading is lenient (missing fields take their defaults), as l7proxy read the stream before.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::Direction;

/// One policy version's tables.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    #[serde(default)]
    pub version: u64,
    /// The ipcache the kernel got, for the proxy's own identity lookups.
    #[serde(default)]
    pub ipcache: Vec<(IpNet, u32)>,
    #[serde(default)]
    pub proxy_rules: Vec<ProxyRule>,
    /// Policy keys by the id the kernel reports in events (one id per rule: every id of a
    /// policy's rules maps to the policy).
    #[serde(default)]
    pub policy_ids: BTreeMap<u32, String>,
    /// The rule each id the kernel reports stands for (absent from older streams: flows then
    /// name the policy only).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rule_ids: BTreeMap<u32, RuleRef>,
    /// The registered workloads, for naming flow endpoints; in a cluster, other nodes'
    /// workloads too (`node` set, a cgroup id of their own that no local cgroup has, endpoint
    /// id 0: they are peers here, never endpoints).
    #[serde(default)]
    pub workloads: Vec<WorkloadInfo>,
    /// In a cluster: what the node proxies need for the tunnel between nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterTables>,
}

/// The tunnel's part of a version: the other nodes (where the tunnel goes) and the ingress
/// rules of this node's workloads at L4, which the proxy judges for connections that arrive
/// through the tunnel (the kernel never sees their source's identity).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterTables {
    /// This node's name in the cluster.
    #[serde(default)]
    pub this_node: String,
    pub nodes: Vec<RemoteNode>,
    /// TCP ingress rules of local endpoints whose peer is another node's workload, another
    /// node (its address: what its workloads' connections came from before the tunnel), or any
    /// peer.
    pub ingress: Vec<L4Rule>,
    /// Each local endpoint's ingress default: (endpoint id, enforced, audit).
    pub ingress_defaults: Vec<(u32, bool, bool)>,
    /// TCP egress rules of local endpoints whose peer is another node's workload, another node
    /// or any peer: the proxy judges a local workload's connection to another node with them,
    /// once that node has said which of its workloads listens where the connection goes (the
    /// kernel sees only the node's address, which all its workloads share).
    #[serde(default)]
    pub egress: Vec<L4Rule>,
    /// Each local endpoint's egress default: (endpoint id, enforced, audit).
    #[serde(default)]
    pub egress_defaults: Vec<(u32, bool, bool)>,
}

/// Another node of the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteNode {
    pub name: String,
    pub addresses: Vec<std::net::IpAddr>,
    /// Its tunnel port, when it serves one.
    pub tunnel_port: Option<u16>,
    /// The identity its addresses have in this version (set by the compiler).
    #[serde(default)]
    pub identity: u32,
}

/// One L4 rule of a local endpoint (the direction is the list it is in), as the kernel's
/// policy map holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct L4Rule {
    pub endpoint_id: u32,
    /// 0: every peer.
    pub peer: u32,
    pub ports: (u16, u16),
    /// `allow`, `deny` or `redirect`.
    pub action: L4Action,
    pub policy_id: u32,
    #[serde(default)]
    pub audit: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum L4Action {
    Allow,
    Deny,
    /// Allowed at L4, with L7 rules (or TLS) for the proxy to apply.
    Redirect,
}

/// A workload as flows name it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadInfo {
    pub cgroup_id: u64,
    /// The node it runs on, for another node's workload (empty: this node's).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
    #[serde(default)]
    pub endpoint_id: u32,
    #[serde(default)]
    pub identity: u32,
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The policies that select it in each direction (which makes that direction
    /// default-deny), in policy order: what a default-deny flow names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress_enforced_by: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress_enforced_by: Vec<String>,
}

impl WorkloadInfo {
    /// The policies that select the workload in `direction`.
    pub fn enforced_by(&self, direction: Direction) -> &[String] {
        match direction {
            Direction::Egress => &self.egress_enforced_by,
            Direction::Ingress => &self.ingress_enforced_by,
        }
    }
}

/// One rule of a policy, as the kernel's rule ids and the proxy's rules name it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleRef {
    /// The field path of the rule in its policy: `ingress[0].toPorts[1]`, `specs[1].egressDeny[0]`.
    pub rule: String,
    #[serde(with = "lowercase_direction")]
    pub direction: Direction,
    /// From `ingressDeny` / `egressDeny`.
    #[serde(default)]
    pub deny: bool,
}

/// One entry of the proxy's rule table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyRule {
    #[serde(default)]
    pub endpoint: String,
    pub endpoint_id: u32,
    #[serde(with = "lowercase_direction")]
    pub direction: Direction,
    pub ports: (u16, u16),
    pub peers: Peers,
    pub l7: L7,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminating_tls: Option<TlsContext>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub originating_tls: Option<TlsContext>,
    /// The SNI values allowed (exact, or `*.` for one label); empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub server_names: Vec<String>,
    pub policy: String,
    /// The field path of the rule's `toPorts` entry (or the rule, without one) in its policy:
    /// `ingress[0].toPorts[0]` (flows name the L7 list under it).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub rule: String,
    #[serde(default)]
    pub policy_id: u32,
    /// From an audit-mode policy.
    #[serde(default)]
    pub audit: bool,
}

/// Peers a proxy rule applies to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Peers {
    Any,
    Identities(BTreeSet<u32>),
}

/// What the proxy allows on a redirected port from those peers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum L7 {
    /// An L3/L4 allow of the same peer and port: every request.
    AllowAll,
    Http {
        rules: Vec<HttpRule>,
    },
    Kafka {
        rules: Vec<KafkaRule>,
    },
    Grpc {
        rules: Vec<GrpcRule>,
    },
    /// TLS settings without request rules: every request, after the TLS step.
    Tls,
}

/// One HTTP rule: every pattern must match the whole value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// `Name: value` or `Name` (present).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub header_matches: Vec<HeaderMatch>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderMatch {
    pub name: String,
    /// `None`: the header must be present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// One Kafka rule, in Cilium's words (`role` or `apiKey`, by name).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KafkaRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    #[serde(default, rename = "clientID", skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
}

/// One gRPC rule: `method` `None` allows every method of the service.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrpcRule {
    pub service: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

/// `terminatingTLS` / `originatingTLS`: the broker's secret to use, or none (mint for the
/// requested name, or trust the mesh CA and the system roots).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsContext {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<SecretRef>,
}

/// A secret held by the broker (namespace default: `default`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretRef {
    #[serde(default)]
    pub namespace: Option<String>,
    pub name: String,
}

impl SecretRef {
    /// The namespace the broker files the secret under.
    pub fn namespace_or_default(&self) -> &str {
        self.namespace.as_deref().unwrap_or("default")
    }
}

/// A rule's direction as the tables (and messages about them) have always written it.
pub fn direction_word(direction: Direction) -> &'static str {
    match direction {
        Direction::Egress => "egress",
        Direction::Ingress => "ingress",
    }
}

mod lowercase_direction {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    use crate::Direction;

    pub fn serialize<S: Serializer>(d: &Direction, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(super::direction_word(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Direction, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `compile()`'s output before the tables were one type (l7policy checks it still writes
    /// exactly this): an HTTP, Kafka, gRPC, TLS and allow-all rule, CIDR identities, audit.
    const SAMPLE: &str = include_str!("../testdata/published_sample.json");

    #[test]
    fn todays_tables_round_trip() {
        let json: serde_json::Value = serde_json::from_str(SAMPLE).unwrap();
        let published: Published = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(serde_json::to_value(&published).unwrap(), json, "every field read is written back");
        assert_eq!(published.version, 7);
        assert_eq!(published.proxy_rules.len(), 6);
        let tls = &published.proxy_rules[3];
        assert_eq!(tls.direction, Direction::Ingress);
        assert_eq!(tls.l7, L7::Tls);
        assert_eq!(tls.peers, Peers::Any);
        let upstream = tls.originating_tls.as_ref().and_then(|t| t.secret.as_ref()).unwrap();
        assert_eq!((upstream.namespace_or_default(), upstream.name.as_str()), ("default", "upstream-ca"));
        assert_eq!(published.proxy_rules[5].direction, Direction::Egress);
        assert!(
            matches!(&published.proxy_rules[1].l7, L7::Kafka { rules } if rules[1].api_key.as_deref() == Some("metadata"))
        );
        assert_eq!(published.policy_ids[&1], "default/sample");
    }

    #[test]
    fn missing_fields_take_defaults_and_a_bad_direction_is_refused() {
        let rule = r#"{"endpoint_id": 2, "direction": "egress", "ports": [80, 80], "peers": {"identities": [6, 5]},
                       "l7": {"type": "allowall"}, "policy": "p"}"#;
        let published: Published = serde_json::from_str(&format!(r#"{{"proxy_rules": [{rule}]}}"#)).unwrap();
        let r = &published.proxy_rules[0];
        assert_eq!((r.policy_id, r.audit, r.endpoint.as_str()), (0, false, ""));
        assert_eq!(r.peers, Peers::Identities([5, 6].into()));
        assert!(serde_json::from_str::<ProxyRule>(&rule.replace("egress", "sideways")).is_err());
        assert_eq!(serde_json::from_str::<Published>("{}").unwrap(), Published::default());
    }
}

//! Why a request or a kernel verdict was denied (or audited): the deciding side, policy and
//! rule, and a typed reason (`l7mesh_api::flow::PolicyReason`). Only asked on the denial
//! path, and built from the very checks that enforce: [`Tables::judge_parties`] finds the
//! deciding rule as `decide` does, and each rule's misses come from the field checks its
//! `matches` is made of.

use super::*;
use l7mesh_api::flow::{DecidedBy, Miss, PolicyReason, RuleMiss, MAX_RULES_SHOWN};

/// Why a request was denied or audited.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    /// The side whose rules decided: the client's egress or the server's ingress.
    pub direction: Direction,
    pub decided_by: DecidedBy,
    pub reason: PolicyReason,
}

/// Why the kernel denied or audited a connection, from the rule id it reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelExplanation {
    pub direction: Direction,
    /// None when the tables know neither the rule nor a policy enforcing the side.
    pub decided_by: Option<DecidedBy>,
    pub reason: PolicyReason,
}

/// The two sides of a kernel verdict, as the event names them.
pub struct KernelSide<'a> {
    /// The local workload, when the side is one.
    pub workload: Option<&'a WorkloadInfo>,
    /// How a flow names it (the workload, else the address).
    pub name: String,
}

/// Policies a default-deny reason names at most.
const ENFORCERS_SHOWN: usize = 4;

impl Tables {
    /// Why `decision` (from [`Tables::decide`] with the same arguments) denied or audited `req`;
    /// None for an allow.
    pub fn explain(&self, parties: &[Party], port: u16, req: &RequestInfo, decision: &Decision) -> Option<Explanation> {
        self.explain_by(parties, port, decision, |r| r.matches(req), |r| http_misses(r, req))
    }

    /// [`Tables::explain`] for one Kafka request (one topic).
    pub fn explain_kafka(
        &self,
        parties: &[Party],
        port: u16,
        req: &KafkaRequest,
        decision: &Decision,
    ) -> Option<Explanation> {
        self.explain_by(parties, port, decision, |r| Self::kafka_allows(r, req), |r| kafka_misses(r, req))
    }

    fn explain_by(
        &self,
        parties: &[Party],
        port: u16,
        decision: &Decision,
        allows: impl Fn(&Rule) -> bool,
        misses: impl Fn(&Rule) -> (Vec<RuleMiss>, usize),
    ) -> Option<Explanation> {
        // An audit is what the rules with the audit-mode ones deny; a deny, what the enforced
        // ones deny (as `decide_by` judges them).
        let with_audit = match decision {
            Decision::Allow { .. } => return None,
            Decision::Audit { .. } => true,
            Decision::Deny { .. } => false,
        };
        let (pi, rule) = self.judge_parties(parties, port, with_audit, &allows).err()?;
        let party = &parties[pi];
        let peer = self.identity_name(party.peer);
        let tried: Vec<&Rule> = self.for_peer(party, port, with_audit).collect();
        let (path, reason) = if tried.is_empty() {
            (rule.rule.to_string(), PolicyReason::NoRuleForPeer { peer })
        } else {
            let mut rules = Vec::new();
            let mut more = 0;
            for r in &tried {
                let (listed, total) = misses(r);
                let mut taken = 0;
                for m in listed {
                    if rules.len() < MAX_RULES_SHOWN {
                        rules.push(m);
                        taken += 1;
                    }
                }
                more += total - taken;
            }
            (format!("{}{}", rule.rule, l7_list(&rule.matcher)), PolicyReason::NoRuleMatched { rules, more })
        };
        Some(Explanation {
            direction: party.direction,
            decided_by: DecidedBy { policy: rule.policy.to_string(), rule: path },
            reason,
        })
    }

    /// Why the kernel denied (or audited) a connection from `src` to `dst`: `rule_id` is the id
    /// the kernel reported, `hook` the direction its hook judged (a connect judges the source's
    /// egress and a local destination's ingress; sk_lookup, ingress only).
    ///
    /// The kernel reports the egress side's id when it has one, else the ingress side's. So a
    /// deny rule's id names that rule; otherwise a default deny decided, on the side the id
    /// does not belong to (an egress allow's id: the ingress side denied; an ingress allow's
    /// or none: the egress side, if policies select the source for egress).
    pub fn explain_kernel(
        &self,
        hook: Direction,
        rule_id: u32,
        src: &KernelSide,
        dst: &KernelSide,
    ) -> KernelExplanation {
        let rule = (rule_id != 0).then(|| self.rule_ids.get(&rule_id)).flatten();
        let policy = self.policy_name(rule_id);
        if let (Some(r), Some(policy)) = (rule, &policy) {
            if r.deny {
                let peer = match r.direction {
                    Direction::Egress => &dst.name,
                    Direction::Ingress => &src.name,
                };
                return KernelExplanation {
                    direction: r.direction,
                    decided_by: Some(DecidedBy { policy: policy.to_string(), rule: r.rule.clone() }),
                    reason: PolicyReason::DenyRule { peer: peer.clone() },
                };
            }
        }
        let src_egress_enforced = src.workload.is_some_and(|w| !w.egress_enforced_by.is_empty());
        let side = match (hook, rule.map(|r| r.direction)) {
            (Direction::Ingress, _) => Direction::Ingress,
            (Direction::Egress, Some(Direction::Egress)) => Direction::Ingress,
            (Direction::Egress, Some(Direction::Ingress)) => Direction::Egress,
            (Direction::Egress, None) if src_egress_enforced || dst.workload.is_none() => Direction::Egress,
            (Direction::Egress, None) => Direction::Ingress,
        };
        let (me, peer) = match side {
            Direction::Egress => (src, dst),
            Direction::Ingress => (dst, src),
        };
        let enforced_by: Vec<String> = me
            .workload
            .map(|w| w.enforced_by(side).iter().take(ENFORCERS_SHOWN).cloned().collect())
            .unwrap_or_default();
        KernelExplanation {
            direction: side,
            decided_by: enforced_by.first().map(|p| DecidedBy { policy: p.clone(), rule: String::new() }),
            reason: PolicyReason::DefaultDeny {
                workload: me.name.clone(),
                direction: side,
                enforced_by,
                peer: peer.name.clone(),
            },
        }
    }

    /// How an explanation names an identity: the workload, `host`, `world`, or the CIDR
    /// identity's number.
    fn identity_name(&self, identity: u32) -> String {
        if identity == HOST {
            return "host".into();
        }
        if identity == redirector_policy::identity::WORLD {
            return "world".into();
        }
        match self.workloads.values().find(|w| w.identity == identity) {
            Some(w) => w.name.clone(),
            None => format!("identity {identity}"),
        }
    }
}

/// Bytes of a client's value (a path, a host, a topic) an explanation keeps: a flow holds it
/// once per rule listed, and the ring holds thousands of flows.
pub const MAX_VALUE_SHOWN: usize = 128;

/// `value`, cut to [`MAX_VALUE_SHOWN`] bytes (at a character boundary) with `...` after.
fn bounded(value: &str) -> String {
    if value.len() <= MAX_VALUE_SHOWN {
        return value.to_string();
    }
    let mut end = MAX_VALUE_SHOWN;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &value[..end])
}

/// The L7 list under a `toPorts` entry that judged the request.
fn l7_list(m: &Matcher) -> &'static str {
    match m {
        Matcher::Http(_) => ".rules.http",
        Matcher::Grpc(_) => ".rules.grpc",
        Matcher::Kafka(_) => ".rules.kafka",
        Matcher::AllowAll | Matcher::Tls => "",
    }
}

/// A rule list that judges something other than the request's protocol.
fn other_protocol(allows: &str) -> (Vec<RuleMiss>, usize) {
    (vec![RuleMiss { allows: allows.into(), missed: vec![Miss::Protocol] }], 1)
}

/// What the first few rules of `r` did not match in an HTTP (or gRPC) request (the rules the
/// path index offers first: the likeliest to be the one meant), and how many rules `r` has.
/// Only those few are asked (a pattern compiles on first use: explaining a denial must not
/// compile a list of thousands).
fn http_misses(r: &Rule, req: &RequestInfo) -> (Vec<RuleMiss>, usize) {
    match &r.matcher {
        Matcher::AllowAll => (Vec::new(), 0),
        Matcher::Tls => other_protocol("TLS server names"),
        Matcher::Kafka(_) => other_protocol("Kafka requests"),
        Matcher::Grpc(rules) => match req.grpc {
            None => other_protocol("gRPC calls"),
            Some((service, method)) => (
                rules
                    .1
                    .iter()
                    .map(|(s, m)| {
                        let mut missed = Vec::new();
                        if s != service {
                            missed.push(Miss::Service { got: bounded(service) });
                        } else if m.as_deref().is_some_and(|m| m != method) {
                            missed.push(Miss::GrpcMethod { got: bounded(method) });
                        }
                        RuleMiss { allows: format!("{s}/{}", m.as_deref().unwrap_or("*")), missed }
                    })
                    .filter(|m| !m.missed.is_empty())
                    .take(MAX_RULES_SHOWN)
                    .collect(),
                rules.1.len(),
            ),
        },
        Matcher::Http(set) => {
            let candidates: Vec<&HttpMatcher> = set.candidates(req.path).collect();
            let rest = set.rules.iter().filter(|h| !candidates.iter().any(|c| std::ptr::eq(*c, *h)));
            let ordered = candidates.iter().copied().chain(rest);
            let listed = ordered
                .map(|h| {
                    let mut missed = Vec::new();
                    if !h.method_ok(req) {
                        missed.push(Miss::Method { got: bounded(req.method) });
                    }
                    if !h.path_ok(req) {
                        missed.push(Miss::Path { got: bounded(req.path) });
                    }
                    if !h.host_ok(req) {
                        missed.push(Miss::Host { got: bounded(req.host) });
                    }
                    for (name, value) in &h.headers {
                        if !HttpMatcher::header_ok(req, name, value) {
                            missed.push(Miss::Header { name: name.clone() });
                        }
                    }
                    RuleMiss { allows: http_summary(h), missed }
                })
                .filter(|m| !m.missed.is_empty())
                .take(MAX_RULES_SHOWN)
                .collect();
            (listed, set.rules.len())
        }
    }
}

/// `GET /public/.*`, `host api.example`, `header x-token`; `any request` for an empty rule.
fn http_summary(h: &HttpMatcher) -> String {
    let mut parts: Vec<String> = Vec::new();
    if let Some(m) = &h.method {
        parts.push(m.pattern.to_string());
    }
    if let Some(p) = &h.path {
        parts.push(p.pattern.to_string());
    }
    if let Some(host) = &h.host {
        parts.push(format!("host {}", host.pattern));
    }
    for (name, value) in &h.headers {
        parts.push(match value {
            Some(_) => format!("header {name}: ..."),
            None => format!("header {name}"),
        });
    }
    if parts.is_empty() {
        "any request".into()
    } else {
        parts.join(" ")
    }
}

/// What each Kafka rule of `r` did not match in one request (one topic).
fn kafka_misses(r: &Rule, req: &KafkaRequest) -> (Vec<RuleMiss>, usize) {
    match &r.matcher {
        Matcher::AllowAll => (Vec::new(), 0),
        Matcher::Tls => other_protocol("TLS server names"),
        Matcher::Http(_) => other_protocol("HTTP requests"),
        Matcher::Grpc(_) => other_protocol("gRPC calls"),
        Matcher::Kafka(rules) => (
            rules
                .list
                .iter()
                .map(|(topic, k, raw)| {
                    let mut missed = Vec::new();
                    // A request naming no topic is not constrained by the rules' topics.
                    if let (Some(want), Some(got)) = (topic, req.topic) {
                        if want != got {
                            missed.push(Miss::Topic { got: Some(bounded(got)) });
                        }
                    }
                    if !k.key_ok(req) {
                        missed.push(Miss::ApiKey { got: kafka_api_name(req.api_key) });
                    }
                    if !k.version_ok(req) {
                        missed.push(Miss::ApiVersion { got: req.version });
                    }
                    if !k.client_ok(req) {
                        missed.push(Miss::ClientId { got: bounded(req.client_id) });
                    }
                    RuleMiss { allows: kafka_summary(raw), missed }
                })
                .filter(|m| !m.missed.is_empty())
                .take(MAX_RULES_SHOWN)
                .collect(),
            rules.list.len(),
        ),
    }
}

fn kafka_api_name(key: i16) -> String {
    kafka_api(key).map(|a| a.name.to_string()).unwrap_or_else(|| key.to_string())
}

/// `produce topic=orders`, `apiKey=metadata apiVersion=4 clientID=c1`.
fn kafka_summary(k: &l7mesh_api::tables::KafkaRule) -> String {
    let mut parts: Vec<String> = Vec::new();
    if let Some(role) = &k.role {
        parts.push(role.clone());
    }
    if let Some(key) = &k.api_key {
        parts.push(format!("apiKey={key}"));
    }
    if let Some(v) = &k.api_version {
        parts.push(format!("apiVersion={v}"));
    }
    if let Some(c) = &k.client_id {
        parts.push(format!("clientID={c}"));
    }
    if let Some(t) = &k.topic {
        parts.push(format!("topic={t}"));
    }
    if parts.is_empty() {
        "any request".into()
    } else {
        parts.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tables(json: serde_json::Value) -> Tables {
        Tables::build(&serde_json::from_value(json).unwrap())
    }

    fn workloads() -> serde_json::Value {
        serde_json::json!([
            {"cgroup_id": 10, "endpoint_id": 1, "identity": 256, "name": "client", "namespace": "default",
             "egress_enforced_by": ["default/client-out"]},
            {"cgroup_id": 20, "endpoint_id": 2, "identity": 257, "name": "server", "namespace": "default",
             "ingress_enforced_by": ["default/web", "default/other"]}
        ])
    }

    fn req<'a>(method: &'a str, path: &'a str, host: &'a str, headers: &'a http::HeaderMap) -> RequestInfo<'a> {
        RequestInfo { method, path, host, headers, grpc: None }
    }

    const CLIENT: Party = Party { endpoint_id: 1, direction: Direction::Egress, peer: 257 };
    const SERVER: Party = Party { endpoint_id: 2, direction: Direction::Ingress, peer: 256 };

    /// The explanation of an HTTP denial names the server's ingress rule list and each field
    /// its rules missed; the reason holds what `decide` decided, never the other way round.
    #[test]
    fn http_path_method_host_and_header_misses() {
        let t = tables(serde_json::json!({
            "workloads": workloads(),
            "proxy_rules": [{"endpoint_id": 2, "direction": "ingress", "ports": [8080, 8080], "peers": "any",
                             "policy": "default/web", "rule": "ingress[0].toPorts[0]",
                             "l7": {"type": "http", "rules": [
                                {"method": "GET", "path": "/public/.*"},
                                {"method": "POST", "path": "/upload", "host": "api", "headers": ["X-Token: yes"]}
                             ]}}]
        }));
        let h = http::HeaderMap::new();
        let parties = [CLIENT, SERVER];
        let explain = |r: &RequestInfo| {
            let d = t.decide(&parties, 8080, r);
            (d.clone(), t.explain(&parties, 8080, r, &d))
        };
        let (d, e) = explain(&req("GET", "/admin", "api", &h));
        assert_eq!(d, Decision::Deny { policy: "default/web".into() });
        let e = e.unwrap();
        assert_eq!(e.direction, Direction::Ingress, "the server's ingress rules decided");
        assert_eq!(
            e.decided_by,
            DecidedBy { policy: "default/web".into(), rule: "ingress[0].toPorts[0].rules.http".into() }
        );
        let PolicyReason::NoRuleMatched { rules, more } = &e.reason else { panic!("{e:?}") };
        assert_eq!(*more, 0);
        assert_eq!(
            rules[0],
            RuleMiss { allows: "GET /public/.*".into(), missed: vec![Miss::Path { got: "/admin".into() }] }
        );
        assert_eq!(
            rules[1].missed,
            vec![
                Miss::Method { got: "GET".into() },
                Miss::Path { got: "/admin".into() },
                Miss::Header { name: "x-token".into() }
            ]
        );
        assert_eq!(
            e.reason.to_string(),
            "no rule matched path /admin (rules allow GET /public/.*; POST /upload host api header x-token: ...)"
        );
        // The method alone.
        let e = explain(&req("PUT", "/public/a", "api", &h)).1.unwrap();
        let PolicyReason::NoRuleMatched { rules, .. } = &e.reason else { panic!() };
        assert_eq!(rules[0].missed, vec![Miss::Method { got: "PUT".into() }], "the path index offers this rule first");
        // Host and header.
        let e = explain(&req("POST", "/upload", "evil", &h)).1.unwrap();
        let PolicyReason::NoRuleMatched { rules, .. } = &e.reason else { panic!() };
        let upload = rules.iter().find(|r| r.allows.starts_with("POST")).unwrap();
        assert_eq!(upload.missed, vec![Miss::Host { got: "evil".into() }, Miss::Header { name: "x-token".into() }]);
        // Allowed: nothing to explain.
        let mut ok = http::HeaderMap::new();
        ok.insert("x-token", "yes".parse().unwrap());
        let (d, e) = explain(&req("POST", "/upload", "api", &ok));
        assert!(d.allows() && e.is_none());
        // A wrong header value is a miss too, and its value is not recorded.
        let mut wrong = http::HeaderMap::new();
        wrong.insert("x-token", "secret-guess".parse().unwrap());
        let e = explain(&req("POST", "/upload", "api", &wrong)).1.unwrap();
        assert!(!format!("{e:?}").contains("secret-guess"));
    }

    /// The client's egress rules deny first: the explanation is the client's, EGRESS.
    #[test]
    fn the_side_that_decided_is_named() {
        let t = tables(serde_json::json!({
            "workloads": workloads(),
            "proxy_rules": [
                {"endpoint_id": 1, "direction": "egress", "ports": [80, 80], "peers": "any",
                 "policy": "default/client-out", "rule": "egress[0].toPorts[0]",
                 "l7": {"type": "http", "rules": [{"path": "/a"}]}},
                {"endpoint_id": 2, "direction": "ingress", "ports": [80, 80], "peers": "any",
                 "policy": "default/web", "rule": "ingress[1].toPorts[0]",
                 "l7": {"type": "http", "rules": [{"path": "/b"}]}}
            ]
        }));
        let h = http::HeaderMap::new();
        let parties = [CLIENT, SERVER];
        for (path, side, policy, rule) in [
            ("/b", Direction::Egress, "default/client-out", "egress[0].toPorts[0].rules.http"),
            ("/a", Direction::Ingress, "default/web", "ingress[1].toPorts[0].rules.http"),
        ] {
            let r = req("GET", path, "", &h);
            let (d, decided) = t.decide_sided(&parties, 80, &r);
            assert_eq!(decided, Some(side), "{path}");
            let e = t.explain(&parties, 80, &r, &d).unwrap();
            assert_eq!((e.direction, e.decided_by.policy.as_str(), e.decided_by.rule.as_str()), (side, policy, rule));
        }
        // Neither side has rules on the port: no side decided.
        assert_eq!(t.decide_sided(&parties, 81, &req("GET", "/", "", &h)), (Decision::Allow { policy: None }, None));
        // Both allow: the server's ingress judged last.
        let t2 = tables(serde_json::json!({
            "workloads": workloads(),
            "proxy_rules": [
                {"endpoint_id": 1, "direction": "egress", "ports": [80, 80], "peers": "any", "policy": "c", "l7": {"type": "allowall"}},
                {"endpoint_id": 2, "direction": "ingress", "ports": [80, 80], "peers": "any", "policy": "s", "l7": {"type": "allowall"}}
            ]
        }));
        assert_eq!(t2.decide_sided(&parties, 80, &req("GET", "/", "", &h)).1, Some(Direction::Ingress));
        assert_eq!(t2.decide_sided(&parties[..1], 80, &req("GET", "/", "", &h)).1, Some(Direction::Egress));
    }

    #[test]
    fn grpc_service_and_method_misses() {
        let t = tables(serde_json::json!({
            "workloads": workloads(),
            "proxy_rules": [{"endpoint_id": 2, "direction": "ingress", "ports": [50051, 50051], "peers": "any",
                             "policy": "default/g", "rule": "ingress[0].toPorts[0]",
                             "l7": {"type": "grpc", "rules": [{"service": "helloworld.Greeter", "method": "SayHello"}]}}]
        }));
        let h = http::HeaderMap::new();
        let g = |service, method| RequestInfo {
            method: "POST",
            path: "/",
            host: "",
            headers: &h,
            grpc: Some((service, method)),
        };
        let why = |r: &RequestInfo| {
            let d = t.decide(&[SERVER], 50051, r);
            t.explain(&[SERVER], 50051, r, &d).unwrap()
        };
        let e = why(&g("helloworld.Greeter", "SayGoodbye"));
        assert_eq!(e.decided_by.rule, "ingress[0].toPorts[0].rules.grpc");
        assert_eq!(e.reason.to_string(), "no rule matched method SayGoodbye (rule allows helloworld.Greeter/SayHello)");
        let e = why(&g("other.Svc", "SayHello"));
        assert_eq!(e.reason.to_string(), "no rule matched service other.Svc (rule allows helloworld.Greeter/SayHello)");
        // A plain HTTP request on a gRPC port.
        let e = why(&req("GET", "/", "", &h));
        assert_eq!(e.reason.to_string(), "no rule matched the protocol (rule allows gRPC calls)");
    }

    #[test]
    fn kafka_topic_api_key_version_and_client_misses() {
        let t = tables(serde_json::json!({
            "workloads": workloads(),
            "proxy_rules": [{"endpoint_id": 1, "direction": "egress", "ports": [9092, 9092], "peers": "any",
                             "policy": "default/k", "rule": "egress[0].toPorts[0]",
                             "l7": {"type": "kafka", "rules": [
                                {"role": "produce", "topic": "orders"},
                                {"apiKey": "fetch", "apiVersion": "11", "clientID": "reader", "topic": "orders"}
                             ]}}]
        }));
        let k = |api_key, version, client_id, topic| KafkaRequest { api_key, version, client_id, topic };
        let why = |r: &KafkaRequest| {
            let d = t.decide_kafka(&[CLIENT], 9092, r);
            (d.clone(), t.explain_kafka(&[CLIENT], 9092, r, &d))
        };
        let e = why(&k(0, 9, "w", Some("secret"))).1.unwrap();
        assert_eq!(e.direction, Direction::Egress);
        assert_eq!(e.decided_by.rule, "egress[0].toPorts[0].rules.kafka");
        assert_eq!(
            e.reason.to_string(),
            "no rule matched topic secret (rules allow produce topic=orders; apiKey=fetch apiVersion=11 clientID=reader topic=orders)"
        );
        // Fetch of orders by the wrong client at the wrong version: the fetch rule's misses.
        let e = why(&k(1, 12, "w", Some("orders"))).1.unwrap();
        let PolicyReason::NoRuleMatched { rules, .. } = &e.reason else { panic!() };
        assert_eq!(rules[0].missed, vec![Miss::ApiKey { got: "fetch".into() }]);
        assert_eq!(rules[1].missed, vec![Miss::ApiVersion { got: 12 }, Miss::ClientId { got: "w".into() }]);
        // CreateTopics: no rule allows the key.
        let e = why(&k(19, 4, "w", None)).1.unwrap();
        assert!(e.reason.to_string().starts_with("no rule matched apiKey createtopics"), "{}", e.reason);
        assert!(why(&k(0, 9, "w", Some("orders"))).1.is_none(), "allowed");
    }

    /// A dry-run policy: the explanation of an AUDIT names the audit rule that would deny.
    #[test]
    fn audit_is_explained_by_the_rule_that_would_deny() {
        let t = tables(serde_json::json!({
            "workloads": workloads(),
            "proxy_rules": [{"endpoint_id": 2, "direction": "ingress", "ports": [80, 80], "peers": "any",
                             "policy": "default/dry", "rule": "ingress[0].toPorts[0]", "audit": true,
                             "l7": {"type": "http", "rules": [{"path": "/public/.*"}]}}]
        }));
        let h = http::HeaderMap::new();
        let r = req("GET", "/private", "", &h);
        let (d, side) = t.decide_sided(&[SERVER], 80, &r);
        assert_eq!((d.clone(), side), (Decision::Audit { policy: "default/dry".into() }, Some(Direction::Ingress)));
        let e = t.explain(&[SERVER], 80, &r, &d).unwrap();
        assert_eq!(e.decided_by.policy, "default/dry");
        assert_eq!(e.reason.to_string(), "no rule matched path /private (rule allows /public/.*)");
    }

    /// A client's value is kept bounded in the explanation, whatever its size or its bytes:
    /// a 60 KiB path judged against many rules costs a flow a few hundred bytes.
    #[test]
    fn hostile_values_are_bounded() {
        let rules: Vec<serde_json::Value> = (0..50).map(|i| serde_json::json!({"path": format!("/r{i}")})).collect();
        let t = tables(serde_json::json!({
            "workloads": workloads(),
            "proxy_rules": [{"endpoint_id": 2, "direction": "ingress", "ports": [80, 80], "peers": "any",
                             "policy": "p", "rule": "ingress[0].toPorts[0]", "l7": {"type": "http", "rules": rules}}]
        }));
        let h = http::HeaderMap::new();
        let long = format!("/{}", "ä".repeat(30_000));
        let r = req("GET", &long, &long, &h);
        let d = t.decide(&[SERVER], 80, &r);
        let e = t.explain(&[SERVER], 80, &r, &d).unwrap();
        let json = serde_json::to_string(&e.reason).unwrap();
        assert!(json.len() < 2048, "{} bytes", json.len());
        let PolicyReason::NoRuleMatched { rules, more } = &e.reason else { panic!() };
        assert_eq!((rules.len(), *more), (MAX_RULES_SHOWN, 46), "four listed, the rest counted");
        assert!(e.reason.to_string().contains("..."));
        assert_eq!(bounded("short"), "short");
    }

    /// Rules that name other peers only: the reason says so rather than listing rules that were
    /// never tried.
    #[test]
    fn no_rule_for_the_peer() {
        let t = tables(serde_json::json!({
            "workloads": workloads(),
            "proxy_rules": [{"endpoint_id": 2, "direction": "ingress", "ports": [80, 80], "peers": {"identities": [999]},
                             "policy": "default/web", "rule": "ingress[0].toPorts[0]",
                             "l7": {"type": "http", "rules": [{"path": "/"}]}}]
        }));
        let h = http::HeaderMap::new();
        let r = req("GET", "/", "", &h);
        let d = t.decide(&[SERVER], 80, &r);
        let e = t.explain(&[SERVER], 80, &r, &d).unwrap();
        assert_eq!(e.reason, PolicyReason::NoRuleForPeer { peer: "client".into() });
        assert_eq!(e.decided_by.rule, "ingress[0].toPorts[0]");
    }

    /// Explanations agree with enforcement: a rule reported as missing nothing would have
    /// matched, so every listed rule has a miss, and a request is explained iff it is denied.
    #[test]
    fn explanations_agree_with_decisions() {
        let t = tables(serde_json::json!({
            "workloads": workloads(),
            "proxy_rules": [{"endpoint_id": 2, "direction": "ingress", "ports": [80, 80], "peers": "any",
                             "policy": "p", "rule": "ingress[0].toPorts[0]",
                             "l7": {"type": "http", "rules": [
                                {"method": "GET|HEAD", "path": "/a/[0-9]+"}, {"path": "/b/.*", "host": "x"},
                                {"headers": ["X-K"]}, {"method": "DELETE"}
                             ]}}]
        }));
        let mut with_k = http::HeaderMap::new();
        with_k.insert("x-k", "1".parse().unwrap());
        let none = http::HeaderMap::new();
        for method in ["GET", "HEAD", "POST", "DELETE"] {
            for path in ["/a/1", "/a/x", "/b/", "/b/zz", "/", "/a/12?q"] {
                for host in ["x", "y"] {
                    for headers in [&none, &with_k] {
                        let r = req(method, path, host, headers);
                        let d = t.decide(&[SERVER], 80, &r);
                        let e = t.explain(&[SERVER], 80, &r, &d);
                        assert_eq!(d.allows(), e.is_none(), "{method} {path} {host}");
                        if let Some(Explanation { reason: PolicyReason::NoRuleMatched { rules, .. }, .. }) = e {
                            assert!(rules.iter().all(|r| !r.missed.is_empty()));
                            assert!(!rules.is_empty());
                        }
                    }
                }
            }
        }
    }

    fn kernel_tables() -> Tables {
        tables(serde_json::json!({
            "workloads": workloads(),
            "policy_ids": {"1": "default/client-out", "2": "default/web", "3": "default/web"},
            "rule_ids": {
                "1": {"rule": "egress[0].toPorts[0]", "direction": "egress"},
                "2": {"rule": "ingress[0].toPorts[0]", "direction": "ingress"},
                "3": {"rule": "ingressDeny[0]", "direction": "ingress", "deny": true}
            }
        }))
    }

    #[test]
    fn kernel_explicit_deny_rule() {
        let t = kernel_tables();
        let (c, s) = (t.workload(10).unwrap(), t.workload(20).unwrap());
        let src = KernelSide { workload: Some(&c), name: "client".into() };
        let dst = KernelSide { workload: Some(&s), name: "server".into() };
        let e = t.explain_kernel(Direction::Egress, 3, &src, &dst);
        assert_eq!(e.direction, Direction::Ingress, "the server's ingressDeny decided, at the client's connect");
        assert_eq!(e.decided_by, Some(DecidedBy { policy: "default/web".into(), rule: "ingressDeny[0]".into() }));
        assert_eq!(e.reason, PolicyReason::DenyRule { peer: "client".into() });
    }

    #[test]
    fn kernel_default_deny_names_the_enforcing_side() {
        let t = kernel_tables();
        let (c, s) = (t.workload(10).unwrap(), t.workload(20).unwrap());
        let src = KernelSide { workload: Some(&c), name: "client".into() };
        let dst = KernelSide { workload: Some(&s), name: "server".into() };
        // The client's egress allowed (its rule's id reported): the server's ingress denied.
        let e = t.explain_kernel(Direction::Egress, 1, &src, &dst);
        assert_eq!(e.direction, Direction::Ingress);
        assert_eq!(e.decided_by, Some(DecidedBy { policy: "default/web".into(), rule: String::new() }));
        assert_eq!(
            e.reason.to_string(),
            "default deny: server is ingress-enforced by default/web, default/other, no rule allows client"
        );
        // The server's ingress allowed: the client's egress had no rule, and is enforced.
        let e = t.explain_kernel(Direction::Egress, 2, &src, &dst);
        assert_eq!(e.direction, Direction::Egress);
        assert_eq!(
            e.reason.to_string(),
            "default deny: client is egress-enforced by default/client-out, no rule allows server"
        );
        // No id at all: the enforced egress.
        assert_eq!(t.explain_kernel(Direction::Egress, 0, &src, &dst).direction, Direction::Egress);
        // ... and with an unenforced source, the destination's ingress.
        let free = WorkloadInfo { egress_enforced_by: Vec::new(), ..(*c).clone() };
        let free_src = KernelSide { workload: Some(&free), name: "client".into() };
        assert_eq!(t.explain_kernel(Direction::Egress, 0, &free_src, &dst).direction, Direction::Ingress);
        // sk_lookup: from outside the node, the listener's ingress.
        let outside = KernelSide { workload: None, name: "10.1.2.3".into() };
        let e = t.explain_kernel(Direction::Ingress, 0, &outside, &dst);
        assert_eq!(e.direction, Direction::Ingress);
        assert!(e.reason.to_string().ends_with("no rule allows 10.1.2.3"), "{}", e.reason);
        // A destination outside the node: the client's egress.
        let away = KernelSide { workload: None, name: "8.8.8.8".into() };
        let e = t.explain_kernel(Direction::Egress, 0, &free_src, &away);
        assert_eq!(e.direction, Direction::Egress);
        assert_eq!(e.decided_by, None, "no policy selects the client: nothing to name");
    }
}

//! One connection's classification as a value: what the proxy learned about it (`ConnInfo`) and
//! what the policy tables make of it (`PortPlan`), computed in one pass without I/O so that
//! every branch of `proxy::forward` is a unit test (ARCHITECTURE.md, "The proxy").

use std::net::SocketAddr;
use std::sync::Arc;

use redirector::ProtocolHint;

use crate::context::Direction;
use crate::tables::{Party, SecretName, Tables, WorkloadInfo};

/// What the proxy knows about an accepted connection before judging it.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub direction: Direction,
    /// The downstream peer.
    pub peer: SocketAddr,
    /// Where the client meant to connect.
    pub original: SocketAddr,
    /// The policy's protocol hint for the port (ingress connections carry none).
    pub hint: ProtocolHint,
    /// Whether the kernel's redirect entry names the source workload (egress only).
    pub redirected: bool,
    /// The source workload, in the tables judging the connection.
    pub src: Option<Arc<WorkloadInfo>>,
    /// The destination workload, in the same tables.
    pub dst: Option<Arc<WorkloadInfo>>,
    /// The kernel's redirect entry says the destination is a workload of this node (whose
    /// ingress it judged): its ingress rules must judge the requests too.
    pub local_destination: bool,
    /// The proxy runs with policy-api: a workload the tables do not know is refused.
    pub requires_policy: bool,
}

/// Which stack carries the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stack {
    Http,
    /// HTTP/2 with gRPC rules (ALPN h2 where TLS is terminated).
    Grpc,
    Kafka,
    /// The ClientHello's server name is judged, then the bytes pass untouched.
    SniForward,
    Opaque,
}

/// Why the plan refuses the connection before any byte is read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A redirected workload the loaded version does not know yet.
    UnknownWorkload { version: u64 },
    /// The parties could not be resolved in these tables.
    NoParties(String),
    /// L7 rules next to serverNames with neither termination nor origination.
    TlsUnsupported,
    /// Kafka rules on a port where TLS is terminated or originated: the Kafka stack does not
    /// run inside TLS, and passing the bytes opaquely would let every request through.
    KafkaInsideTls,
}

/// What the tables say to do with one connection.
#[derive(Clone, Debug)]
pub struct PortPlan {
    pub stack: Stack,
    /// The parties whose rules judge it: the source's egress and the destination's ingress.
    /// Built once here and reused for every request on the connection.
    pub parties: Vec<Party>,
    /// Some: terminate TLS downstream, with this secret's certificate (None: minted).
    pub terminate: Option<Option<SecretName>>,
    /// Some: originate TLS upstream, trusting this secret (None: the bundle).
    pub originate: Option<Option<SecretName>>,
    /// The server name TLS origination presents (the first non-wildcard serverName).
    pub server_name: Option<String>,
    /// The ClientHello's SNI is judged against serverNames before the stack runs (without
    /// termination; terminating judges it in the handshake).
    pub judge_sni: bool,
    /// Not HTTP on an HTTP port: true where an L4 allow lets it pass opaquely.
    pub opaque_fallback: bool,
    pub refusal: Option<Refusal>,
}

impl PortPlan {
    /// Classifies `conn` against `tables` (the version that judges it).
    pub fn new(conn: &ConnInfo, tables: &Tables) -> PortPlan {
        let mut plan = PortPlan {
            stack: Stack::Opaque,
            parties: Vec::new(),
            terminate: None,
            originate: None,
            server_name: None,
            judge_sni: false,
            opaque_fallback: false,
            refusal: None,
        };
        let unknown = match conn.direction {
            // A destination workload these tables do not know (a server registered after
            // them, or missing from the listener snapshot) would leave its ingress rules out:
            // refused like an unknown source, never judged by the source's rules alone.
            Direction::Egress => {
                conn.redirected && (conn.src.is_none() || (conn.local_destination && conn.dst.is_none()))
            }
            Direction::Ingress => conn.dst.is_none(),
        };
        if unknown && conn.requires_policy {
            plan.refusal = Some(Refusal::UnknownWorkload { version: tables.version });
            return plan;
        }
        let port = conn.original.port();
        // Either side's own rules on this port, as the kernel's hint would have said.
        let sides = |has: fn(&Tables, u32, Direction, u16) -> bool| {
            conn.src.as_ref().is_some_and(|w| has(tables, w.endpoint_id, Direction::Egress, port))
                || conn.dst.as_ref().is_some_and(|w| has(tables, w.endpoint_id, Direction::Ingress, port))
        };
        let http_port = match conn.hint {
            ProtocolHint::Http | ProtocolHint::Grpc => true,
            ProtocolHint::None => sides(Tables::has_http_rules),
            ProtocolHint::Kafka | ProtocolHint::Tls => false,
        };
        let parties = match tables.parties(
            conn.src.as_ref().map(|w| w.cgroup_id),
            conn.peer.ip(),
            conn.dst.as_ref().map(|w| w.cgroup_id),
            conn.original.ip(),
        ) {
            Ok(p) => p,
            Err(e) => {
                plan.refusal = Some(Refusal::NoParties(e.to_string()));
                return plan;
            }
        };
        let any = |has: fn(&Tables, u32, Direction, u16) -> bool| {
            parties.iter().any(|p| has(tables, p.endpoint_id, p.direction, port))
        };
        // Fail closed: L7 rules meant for traffic the proxy cannot read.
        if any(Tables::needs_unsupported_tls) {
            plan.refusal = Some(Refusal::TlsUnsupported);
            plan.parties = parties;
            return plan;
        }
        plan.terminate = tables.termination(&parties, port);
        plan.originate = tables.origination(&parties, port);
        if plan.terminate.is_some() || plan.originate.is_some() {
            // Fail closed (policy-api refuses such a policy; tables that skipped it must not
            // fall through to the opaque stack).
            if any(Tables::has_kafka_rules) {
                plan.refusal = Some(Refusal::KafkaInsideTls);
                plan.parties = parties;
                return plan;
            }
            if plan.originate.is_some() {
                plan.server_name = tables.first_server_name(&parties, port);
            }
            plan.stack = if any(Tables::has_grpc_rules) {
                Stack::Grpc
            } else if any(Tables::has_http_rules) {
                Stack::Http
            } else {
                Stack::Opaque
            };
            plan.parties = parties;
            return plan;
        }
        plan.judge_sni = conn.hint == ProtocolHint::Tls || any(Tables::has_server_names);
        let kafka_port = match conn.hint {
            ProtocolHint::Kafka => true,
            ProtocolHint::None => sides(Tables::has_kafka_rules),
            _ => false,
        };
        plan.stack = if kafka_port {
            Stack::Kafka
        } else if http_port {
            plan.opaque_fallback = tables.allows_opaque(&parties, port).allows();
            if conn.hint == ProtocolHint::Grpc || any(Tables::has_grpc_rules) {
                Stack::Grpc
            } else {
                Stack::Http
            }
        } else if plan.judge_sni {
            Stack::SniForward
        } else {
            Stack::Opaque
        };
        plan.parties = parties;
        plan
    }

    /// Whether TLS is terminated or originated here.
    pub fn tls(&self) -> bool {
        self.terminate.is_some() || self.originate.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    const CLIENT: u64 = 10;
    const SERVER: u64 = 20;

    /// Tables with `client` (endpoint 1, identity 256) and `server` (endpoint 2, identity 257),
    /// and `rules` (each gets the fields every rule needs unless it names them).
    fn tables(rules: &[Value]) -> Tables {
        let rules: Vec<Value> = rules
            .iter()
            .map(|r| {
                let mut full = json!({"endpoint_id": 2, "direction": "ingress", "ports": [80, 80],
                                      "peers": "any", "policy": "p", "l7": {"type": "allowall"}});
                for (k, v) in r.as_object().unwrap() {
                    full[k] = v.clone();
                }
                full
            })
            .collect();
        Tables::build(
            &serde_json::from_value(json!({
                "version": 7,
                "workloads": [
                    {"cgroup_id": CLIENT, "endpoint_id": 1, "identity": 256, "name": "client", "namespace": "default"},
                    {"cgroup_id": SERVER, "endpoint_id": 2, "identity": 257, "name": "server", "namespace": "default"},
                ],
                "proxy_rules": rules,
            }))
            .unwrap(),
        )
    }

    /// An egress connection from `client` to `server` on `port`, as the kernel redirected it.
    fn egress(t: &Tables, port: u16, hint: ProtocolHint) -> ConnInfo {
        ConnInfo {
            direction: Direction::Egress,
            peer: "10.0.0.1:40000".parse().unwrap(),
            original: SocketAddr::new("10.0.0.2".parse().unwrap(), port),
            hint,
            redirected: true,
            src: t.workload(CLIENT),
            dst: t.workload(SERVER),
            local_destination: true,
            requires_policy: true,
        }
    }

    /// An ingress connection to `server` from an outside peer.
    fn ingress(t: &Tables, port: u16) -> ConnInfo {
        ConnInfo { direction: Direction::Ingress, src: None, redirected: false, ..egress(t, port, ProtocolHint::None) }
    }

    fn http_rule() -> Value {
        json!({"l7": {"type": "http", "rules": [{"method": "GET"}]}})
    }
    fn grpc_rule() -> Value {
        json!({"l7": {"type": "grpc", "rules": [{"service": "helloworld.Greeter"}]}})
    }
    fn kafka_rule() -> Value {
        json!({"ports": [9092, 9092], "l7": {"type": "kafka", "rules": [{"role": "produce", "topic": "orders"}]}})
    }
    fn secret(name: &str) -> Value {
        json!({"secret": {"namespace": "default", "name": name}})
    }
    fn plan(conn: &ConnInfo, t: &Tables) -> PortPlan {
        PortPlan::new(conn, t)
    }

    #[test]
    fn http_rules_choose_the_http_stack() {
        let t = tables(&[http_rule()]);
        let p = plan(&egress(&t, 80, ProtocolHint::None), &t);
        assert_eq!((p.stack, p.refusal.clone(), p.tls(), p.judge_sni), (Stack::Http, None, false, false));
        assert!(!p.opaque_fallback, "HTTP rules only: what is not HTTP is closed");
    }

    #[test]
    fn the_hint_chooses_http_without_rules() {
        let t = tables(&[]);
        assert_eq!(plan(&egress(&t, 80, ProtocolHint::Http), &t).stack, Stack::Http);
        assert_eq!(plan(&egress(&t, 80, ProtocolHint::Grpc), &t).stack, Stack::Grpc);
    }

    #[test]
    fn grpc_rules_choose_grpc() {
        let t = tables(&[grpc_rule()]);
        assert_eq!(plan(&egress(&t, 80, ProtocolHint::None), &t).stack, Stack::Grpc);
    }

    #[test]
    fn ingress_uses_the_destinations_rules() {
        let t = tables(&[http_rule()]);
        let p = plan(&ingress(&t, 80), &t);
        assert_eq!((p.stack, p.parties.len()), (Stack::Http, 1));
        assert!(matches!(p.parties[0].direction, Direction::Ingress));
    }

    #[test]
    fn parties_are_both_sides() {
        let t = tables(&[http_rule()]);
        let p = plan(&egress(&t, 80, ProtocolHint::None), &t);
        let sides: Vec<_> = p.parties.iter().map(|p| (p.endpoint_id, p.direction, p.peer)).collect();
        assert_eq!(sides, vec![(1, Direction::Egress, 257), (2, Direction::Ingress, 256)]);
    }

    #[test]
    fn an_l4_allow_next_to_http_rules_lets_other_bytes_pass() {
        let t = tables(&[http_rule(), json!({})]);
        let p = plan(&egress(&t, 80, ProtocolHint::None), &t);
        assert_eq!((p.stack, p.opaque_fallback), (Stack::Http, true));
    }

    #[test]
    fn kafka_rules_choose_kafka() {
        let t = tables(&[kafka_rule()]);
        assert_eq!(plan(&egress(&t, 9092, ProtocolHint::None), &t).stack, Stack::Kafka);
        assert_eq!(plan(&ingress(&t, 9092), &t).stack, Stack::Kafka);
        let none = tables(&[]);
        assert_eq!(plan(&egress(&none, 9092, ProtocolHint::Kafka), &none).stack, Stack::Kafka, "the hint");
    }

    #[test]
    fn the_hint_overrides_the_rules() {
        let t = tables(&[kafka_rule()]);
        assert_eq!(plan(&egress(&t, 9092, ProtocolHint::Http), &t).stack, Stack::Http, "a hint says which");
    }

    #[test]
    fn an_l4_port_is_opaque() {
        let t = tables(&[json!({})]);
        let p = plan(&egress(&t, 80, ProtocolHint::None), &t);
        assert_eq!((p.stack, p.refusal.clone(), p.tls()), (Stack::Opaque, None, false));
    }

    #[test]
    fn an_unknown_port_is_opaque() {
        let t = tables(&[http_rule()]);
        let p = plan(&egress(&t, 8080, ProtocolHint::None), &t);
        assert_eq!((p.stack, p.judge_sni, p.tls()), (Stack::Opaque, false, false));
    }

    #[test]
    fn server_names_forward_after_judging_sni() {
        let t = tables(&[json!({"ports": [443, 443], "l7": {"type": "tls"}, "server_names": ["api.example.com"]})]);
        let p = plan(&egress(&t, 443, ProtocolHint::None), &t);
        assert_eq!((p.stack, p.judge_sni, p.tls(), p.refusal), (Stack::SniForward, true, false, None));
    }

    #[test]
    fn the_tls_hint_judges_sni() {
        let t = tables(&[]);
        let p = plan(&egress(&t, 443, ProtocolHint::Tls), &t);
        assert_eq!((p.stack, p.judge_sni), (Stack::SniForward, true));
    }

    #[test]
    fn l7_rules_next_to_server_names_without_tls_are_refused() {
        let mut rule = http_rule();
        rule["server_names"] = json!(["api.example.com"]);
        let t = tables(&[rule]);
        assert_eq!(plan(&egress(&t, 80, ProtocolHint::None), &t).refusal, Some(Refusal::TlsUnsupported));
    }

    #[test]
    fn terminate_with_http_rules_is_http_over_tls() {
        let mut rule = http_rule();
        rule["terminating_tls"] = secret("server-cert");
        let t = tables(&[rule]);
        let p = plan(&egress(&t, 80, ProtocolHint::None), &t);
        assert_eq!(p.stack, Stack::Http);
        assert_eq!(p.terminate, Some(Some(SecretName { namespace: "default".into(), name: "server-cert".into() })));
        assert_eq!((p.originate, p.judge_sni), (None, false));
    }

    #[test]
    fn terminate_without_a_secret_mints() {
        let mut rule = grpc_rule();
        rule["terminating_tls"] = json!({});
        let t = tables(&[rule]);
        let p = plan(&egress(&t, 80, ProtocolHint::None), &t);
        assert_eq!((p.stack, p.terminate), (Stack::Grpc, Some(None)));
    }

    #[test]
    fn kafka_rules_with_tls_are_refused_not_passed_opaquely() {
        for tls in ["terminating_tls", "originating_tls"] {
            let mut rule = kafka_rule();
            rule[tls] = secret("c");
            let t = tables(&[rule]);
            for hint in [ProtocolHint::None, ProtocolHint::Kafka] {
                let p = plan(&egress(&t, 9092, hint), &t);
                assert_eq!(p.refusal, Some(Refusal::KafkaInsideTls), "{tls} {hint:?}");
            }
        }
    }

    #[test]
    fn terminate_without_l7_rules_is_opaque_over_tls() {
        let t = tables(&[json!({"terminating_tls": secret("c")})]);
        let p = plan(&egress(&t, 80, ProtocolHint::None), &t);
        assert_eq!((p.stack, p.tls(), p.originate), (Stack::Opaque, true, None));
    }

    #[test]
    fn originate_names_the_first_exact_server_name() {
        let mut rule = http_rule();
        rule["originating_tls"] = secret("ca");
        rule["server_names"] = json!(["*.example.com", "api.example.com"]);
        let t = tables(&[rule]);
        let p = plan(&egress(&t, 80, ProtocolHint::None), &t);
        assert_eq!(
            (p.stack, p.terminate.is_none(), p.server_name.as_deref()),
            (Stack::Http, true, Some("api.example.com"))
        );
        assert!(p.originate.is_some());
    }

    #[test]
    fn terminate_and_originate() {
        let mut rule = http_rule();
        rule["terminating_tls"] = secret("cert");
        rule["originating_tls"] = json!({});
        let t = tables(&[rule]);
        let p = plan(&egress(&t, 80, ProtocolHint::None), &t);
        assert_eq!((p.stack, p.terminate.is_some(), p.originate.clone()), (Stack::Http, true, Some(None)));
        assert_eq!(p.server_name, None, "no serverNames: the upstream IP is the name");
    }

    #[test]
    fn a_workload_the_version_lacks_is_refused() {
        let t = tables(&[http_rule()]);
        let mut conn = egress(&t, 80, ProtocolHint::None);
        conn.src = None;
        assert_eq!(plan(&conn, &t).refusal, Some(Refusal::UnknownWorkload { version: 7 }));
        conn.requires_policy = false;
        assert_eq!(plan(&conn, &t).refusal, None, "standalone: judged without the source's rules");
        let mut inbound = ingress(&t, 80);
        inbound.dst = None;
        assert_eq!(plan(&inbound, &t).refusal, Some(Refusal::UnknownWorkload { version: 7 }));
        // A local server the version lacks: its ingress rules cannot be left out.
        let mut to_new_server = egress(&t, 80, ProtocolHint::None);
        to_new_server.dst = None;
        assert_eq!(plan(&to_new_server, &t).refusal, Some(Refusal::UnknownWorkload { version: 7 }));
        to_new_server.local_destination = false;
        assert_eq!(plan(&to_new_server, &t).refusal, None, "a destination off the node has no ingress here");
    }

    #[test]
    fn parties_from_another_version_are_refused() {
        let t = tables(&[http_rule()]);
        let conn = egress(&t, 80, ProtocolHint::None);
        let next = Tables::build(&serde_json::from_value(json!({"version": 8})).unwrap());
        let mut moved = conn.clone();
        moved.dst = None;
        moved.requires_policy = false;
        assert!(matches!(plan(&moved, &next).refusal, Some(Refusal::NoParties(_))));
    }

    #[test]
    fn an_unredirected_egress_peer_has_no_source_party() {
        let t = tables(&[http_rule()]);
        let mut conn = egress(&t, 80, ProtocolHint::None);
        conn.redirected = false;
        conn.src = None;
        let p = plan(&conn, &t);
        assert_eq!((p.refusal, p.parties.len(), p.stack), (None, 1, Stack::Http));
    }
}

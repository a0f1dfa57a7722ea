//! Simulation: replay recorded flows against a candidate policy set, with the kernel's fold
//! (`PolicySnapshot::judge`, as the node uses to re-judge connections) and the proxy's own
//! decision code (`l7rules`, fed the very tables l7proxy would load), and say what would change.
//!
//! What a flow does not record cannot be replayed: request headers (HTTP rules on headers are
//! judged as if the request had none) and the proxy's per-connection records (their requests
//! are flows of their own). Those are counted as `skipped` or noted, never guessed silently.

use std::collections::BTreeMap;

use l7mesh_api::Verdict;
use redirector_policy::{Connection, Decision as L4Decision, Protocol};

use crate::flows::{Flow, FlowEndpoint, L7Part};
use l7policy::compile::Compiled;

// The report is a REST view (`/v1/simulate`): l7mesh-api's.
pub use l7mesh_api::rest::{ChangeGroup, SimulationReport, SkipReason, SkippedFlows};

struct Judge<'a> {
    compiled: &'a Compiled,
    tables: l7rules::Tables,
}

impl<'a> Judge<'a> {
    fn workload(&self, e: &FlowEndpoint) -> Option<&'a l7policy::compile::WorkloadInfo> {
        let name = e.workload.as_ref()?;
        self.compiled.published.workloads.iter().find(|w| &w.name == name)
    }

    fn identity(&self, e: &FlowEndpoint) -> Option<u32> {
        if let Some(w) = self.workload(e) {
            return Some(w.identity);
        }
        e.ip.parse().ok().map(|ip| self.compiled.snapshot.identity_of(ip))
    }

    /// The candidate's verdict for `flow` and the policy behind it, or why the flow cannot be
    /// replayed.
    fn verdict(&self, flow: &Flow) -> Result<(Verdict, Option<String>), SkipReason> {
        if flow.is_proxy_connection() {
            return Err(SkipReason::ProxyConnection);
        }
        let protocol = match flow.l4.protocol.as_str() {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            _ => return Err(SkipReason::Protocol),
        };
        let port = flow.destination.port;
        let (src, dst) = (self.workload(&flow.source), self.workload(&flow.destination));
        if src.is_none() && dst.is_none() {
            return Err(SkipReason::NoWorkload);
        }
        let src_id = self.identity(&flow.source).ok_or(SkipReason::UnknownPeer)?;
        let dst_id = self.identity(&flow.destination).ok_or(SkipReason::UnknownPeer)?;
        let endpoint = |w: &l7policy::compile::WorkloadInfo| self.compiled.endpoint_by_cgroup(w.cgroup_id);
        let conn = Connection {
            src: src.and_then(endpoint),
            dst: dst.and_then(endpoint),
            protocol,
            src_identity: src_id,
            dst_identity: dst_id,
            port,
        };
        match self.compiled.snapshot.judge(&conn).decision() {
            L4Decision::Deny { policy_id } => {
                return Ok((Verdict::Denied, self.compiled.published.policy_ids.get(&policy_id).cloned()))
            }
            L4Decision::Audit => return Ok((Verdict::Audit, None)),
            L4Decision::Allow => return Ok((Verdict::Allowed, None)),
            L4Decision::Redirect(_) => {}
        }
        let Some(l7) = &flow.l7 else {
            // A connection the kernel hands to the proxy: allowed at L4.
            return Ok((Verdict::Allowed, None));
        };
        let mut parties = Vec::new();
        if let Some(w) = src {
            parties.push(l7rules::Party {
                endpoint_id: w.endpoint_id,
                direction: l7rules::Direction::Egress,
                peer: dst_id,
            });
        }
        if let Some(w) = dst {
            parties.push(l7rules::Party {
                endpoint_id: w.endpoint_id,
                direction: l7rules::Direction::Ingress,
                peer: src_id,
            });
        }
        let no_headers = http::HeaderMap::new();
        match l7 {
            L7Part::Http { http } => {
                let (authority, path) = split_url(&http.url);
                let (host, authority_port) = l7rules::split_authority(authority);
                let host = l7rules::host_rule_value(host, authority_port, port);
                let req =
                    l7rules::RequestInfo { method: &http.method, path, host: &host, headers: &no_headers, grpc: None };
                let d = self.tables.decide(&parties, port, &req);
                Ok((d.verdict(), d.policy().map(|p| p.to_string())))
            }
            L7Part::Grpc { grpc } => {
                let path = format!("/{}/{}", grpc.service, grpc.method);
                let req = l7rules::RequestInfo {
                    method: "POST",
                    path: &path,
                    host: &grpc.authority,
                    headers: &no_headers,
                    grpc: Some((&grpc.service, &grpc.method)),
                };
                let d = self.tables.decide(&parties, port, &req);
                Ok((d.verdict(), d.policy().map(|p| p.to_string())))
            }
            L7Part::Kafka { kafka } => {
                let api_key = l7rules::kafka_api_key(&kafka.api_key).ok_or(SkipReason::KafkaApiKey)?;
                let req = l7rules::KafkaRequest {
                    api_key,
                    version: kafka.api_version,
                    client_id: &kafka.client_id,
                    topic: kafka.topic.as_deref(),
                };
                let d = self.tables.decide_kafka(&parties, port, &req);
                Ok((d.verdict(), d.policy().map(|p| p.to_string())))
            }
        }
    }
}

/// Workloads that flows name but that are no longer registered (their command ended), rebuilt
/// from the labels the flows recorded, so their traffic is replayed too. Their cgroup ids are
/// placeholders no real cgroup has.
pub fn departed_workloads(
    endpoints: &[FlowEndpoint],
    registered: &[l7policy::compile::Workload],
) -> Vec<l7policy::compile::Workload> {
    let mut out: Vec<l7policy::compile::Workload> = Vec::new();
    for e in endpoints {
        let Some(name) = &e.workload else { continue };
        if registered.iter().chain(out.iter()).any(|w| &w.name == name) {
            continue;
        }
        let mut spec: Vec<String> = e.labels.iter().flatten().map(|(k, v)| format!("{k}={v}")).collect();
        spec.push(format!("{}={}", l7policy::labels::NAMESPACE_KEY, e.namespace.as_deref().unwrap_or("default")));
        let Ok(labels) = l7policy::labels::Labels::parse(&spec.join(",")) else { continue };
        let cgroup_id = u64::MAX - out.len() as u64;
        out.push(l7policy::compile::Workload { name: name.clone(), labels, cgroup_id });
    }
    out
}

/// `scheme://host/path?query` -> (host, path with query).
/// The proxy records the path as it judged it: `/...` (with the query), or `*` for
/// `OPTIONS *`; the authority ends where either begins.
fn split_url(url: &str) -> (&str, &str) {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    match rest.find(['/', '*']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    }
}

/// Replays `flows` against `candidate`, judged by the tables it publishes to l7proxy.
pub fn simulate(candidate: &Compiled, flows: &[Flow]) -> SimulationReport {
    let judge = Judge { compiled: candidate, tables: l7rules::Tables::build(&candidate.published) };
    let mut report = SimulationReport { flows: flows.len() as u64, ..SimulationReport::default() };
    let mut groups: BTreeMap<(Verdict, Verdict, String, String, String, String), ChangeGroup> = BTreeMap::new();
    let mut header_rules_noted = false;
    let mut skipped: BTreeMap<SkipReason, u64> = BTreeMap::new();
    for f in flows {
        let (after, policy) = match judge.verdict(f) {
            Ok(v) => v,
            Err(why) => {
                report.skipped += 1;
                *skipped.entry(why).or_default() += 1;
                continue;
            }
        };
        report.replayed += 1;
        if after == f.verdict {
            report.unchanged += 1;
            continue;
        }
        match after {
            Verdict::Denied => report.newly_denied += 1,
            Verdict::Audit => report.newly_audit += 1,
            Verdict::Allowed | Verdict::Forwarded | Verdict::Error => report.newly_allowed += 1,
        }
        if matches!(f.l7, Some(L7Part::Http { .. })) && !header_rules_noted {
            header_rules_noted = true;
            report.notes.push(
                "flows do not record request headers: HTTP rules on headers are judged as if there were none".into(),
            );
        }
        let key = (f.verdict, after, f.source.display(), f.destination.display(), f.protocol(), f.detail());
        let group = groups.entry(key.clone()).or_insert_with(|| ChangeGroup {
            before: key.0,
            after: key.1,
            from: key.2.clone(),
            to: key.3.clone(),
            protocol: key.4.clone(),
            detail: key.5.clone(),
            count: 0,
            policy: policy.clone(),
            example_time: f.time.clone(),
        });
        group.count += 1;
    }
    let mut changes: Vec<ChangeGroup> = groups.into_values().collect();
    changes.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.detail.cmp(&b.detail)));
    report.changes = changes;
    report.skipped_by = skipped.into_iter().map(|(reason, count)| SkippedFlows { reason, count }).collect();
    report
}

#[cfg(test)]
mod tests {
    use l7policy::compile::{compile, Workload};
    use l7policy::labels::Labels;

    /// The star-wars example judged: the empire's landing request still passes, the exhaust
    /// port is newly denied. Both need the candidate's L7 tables (with empty ones the landing
    /// request would be denied too, as simulation did when its schema drifted).
    #[test]
    fn judges_with_the_candidates_tables() {
        let (policies, diagnostics) =
            l7policy::validate::load_text("star-wars.yaml", include_str!("../../examples/policies/star-wars.yaml"));
        assert!(diagnostics.is_empty(), "{diagnostics:?}");
        let workload = |name: &str, labels: &str, cgroup_id| Workload {
            name: name.into(),
            labels: Labels::parse(labels).unwrap(),
            cgroup_id,
        };
        let workloads = [
            workload("deathstar", "org=empire,class=deathstar", 21),
            workload("tiefighter", "org=empire,class=tiefighter", 22),
        ];
        let candidate = compile(&policies, &workloads, &[], 1);
        assert!(!candidate.published.proxy_rules.is_empty(), "the candidate publishes proxy rules");
        let flow = |path: &str| {
            format!(
                r#"{{"time":"t","verdict":"ALLOWED","direction":"INGRESS","source":{{"workload":"tiefighter","namespace":"default","ip":"127.0.0.1","port":5}},"destination":{{"workload":"deathstar","namespace":"default","ip":"127.0.0.1","port":8080}},"l4":{{"protocol":"TCP"}},"observer":"proxy","l7":{{"type":"http","http":{{"method":"POST","url":"http://deathstar:8080{path}","code":200}}}}}}"#
            )
        };
        let flows = crate::flows::parse_lines(&[flow("/v1/request-landing"), flow("/v1/exhaust-port")].join("\n"));
        assert_eq!(flows.len(), 2);
        let report = super::simulate(&candidate, &flows);
        assert_eq!((report.replayed, report.unchanged, report.newly_denied), (2, 1, 1), "{report:#?}");
        assert_eq!(report.changes[0].detail, "POST http://deathstar:8080/v1/exhaust-port");
    }

    /// Flows that cannot be replayed are counted by why, each kind once, none dropped silently.
    #[test]
    fn skipped_flows_are_counted_by_why() {
        let candidate = compile(&[], &[], &[], 1);
        let line = |observer: &str, src: &str, dst: &str, l4: &str| {
            format!(
                r#"{{"time":"t","verdict":"ALLOWED","direction":"EGRESS","source":{{{src}"ip":"127.0.0.1","port":5}},"destination":{{{dst}"ip":"127.0.0.1","port":80}},"l4":{{"protocol":"{l4}"}},"observer":"{observer}"}}"#
            )
        };
        let lines = [
            line("proxy", r#""workload":"a","#, "", "TCP"),
            line("proxy", r#""workload":"a","#, "", "TCP"),
            line("kernel", "", "", "TCP"),
            line("kernel", r#""workload":"a","#, "", "ICMP"),
        ];
        let flows = crate::flows::parse_lines(&lines.join("\n"));
        assert_eq!(flows.len(), 4);
        let report = super::simulate(&candidate, &flows);
        assert_eq!((report.replayed, report.skipped), (0, 4));
        let by: Vec<(super::SkipReason, u64)> = report.skipped_by.iter().map(|s| (s.reason, s.count)).collect();
        use super::SkipReason::*;
        assert_eq!(by, vec![(ProxyConnection, 2), (NoWorkload, 1), (Protocol, 1)]);
        assert_eq!(report.skipped_by.iter().map(|s| s.count).sum::<u64>(), report.skipped);
    }

    #[test]
    fn urls_split_into_host_and_path() {
        assert_eq!(super::split_url("http://deathstar/v1/x?y=1"), ("deathstar", "/v1/x?y=1"));
        assert_eq!(super::split_url("https://a:8443"), ("a:8443", "/"));
        assert_eq!(super::split_url("http://a:8080*"), ("a:8080", "*"));
    }
}

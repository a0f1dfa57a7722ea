//! Hubble's flow filters (`flow.FlowFilter`), judged on the Hubble form of each flow with Hubble's
//! semantics: within a filter every field given must match, any one of a field's values may;
//! a flow is sent when it matches one allow-list filter (or there is none) and no deny-list
//! filter. A field l7mesh has no data for is refused by name (`InvalidArgument`), never ignored:
//! a filter that cannot be judged must not look like one that matched nothing.

use std::net::IpAddr;

use regex::Regex;

use crate::proto::{self, Checked, FlowFilter};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    #[error("flow filter field `{0}` is not supported by l7mesh (it has no such data); leave it out")]
    Unsupported(&'static str),
    #[error("flow filter field number {0} is unknown to l7mesh (a newer Hubble?); leave it out")]
    UnknownField(u32),
    #[error("flow filter `{field}`: {why}")]
    Invalid { field: &'static str, why: String },
}

fn invalid(field: &'static str, why: impl std::fmt::Display) -> FilterError {
    FilterError::Invalid { field, why: why.to_string() }
}

type Check = Box<dyn Fn(&proto::Flow) -> bool + Send + Sync>;

/// One compiled `FlowFilter`: every check must hold.
struct Compiled(Vec<Check>);

impl Compiled {
    fn matches(&self, f: &proto::Flow) -> bool {
        self.0.iter().all(|c| c(f))
    }
}

/// A request's allow list (`whitelist`) and deny list (`blacklist`), compiled.
pub struct Filters {
    allow: Vec<Compiled>,
    deny: Vec<Compiled>,
}

impl std::fmt::Debug for Filters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Filters({} allow, {} deny)", self.allow.len(), self.deny.len())
    }
}

impl Filters {
    pub fn compile(allow: &[Checked<FlowFilter>], deny: &[Checked<FlowFilter>]) -> Result<Self, FilterError> {
        Ok(Filters {
            allow: allow.iter().map(compile).collect::<Result<_, _>>()?,
            deny: deny.iter().map(compile).collect::<Result<_, _>>()?,
        })
    }

    pub fn matches(&self, f: &proto::Flow) -> bool {
        (self.allow.is_empty() || self.allow.iter().any(|c| c.matches(f))) && !self.deny.iter().any(|c| c.matches(f))
    }
}

fn compile(checked: &Checked<FlowFilter>) -> Result<Compiled, FilterError> {
    if let Some(&n) = checked.unknown_fields.first() {
        return Err(FilterError::UnknownField(n));
    }
    let ff = &checked.message;
    let unsupported: [(&'static str, bool); 15] = [
        ("uuid", !ff.uuid.is_empty()),
        ("source_ip_xlated", !ff.source_ip_xlated.is_empty()),
        ("source_fqdn", !ff.source_fqdn.is_empty()),
        ("destination_fqdn", !ff.destination_fqdn.is_empty()),
        ("source_service", !ff.source_service.is_empty()),
        ("destination_service", !ff.destination_service.is_empty()),
        ("source_workload", !ff.source_workload.is_empty()),
        ("destination_workload", !ff.destination_workload.is_empty()),
        ("source_cluster_name", !ff.source_cluster_name.is_empty()),
        ("destination_cluster_name", !ff.destination_cluster_name.is_empty()),
        ("interface", !ff.interface.is_empty()),
        ("dns_query", !ff.dns_query.is_empty()),
        ("http_header", !ff.http_header.is_empty()),
        ("tcp_flags", !ff.tcp_flags.is_empty()),
        ("node_labels", !ff.node_labels.is_empty()),
    ];
    if let Some((name, _)) = unsupported.iter().find(|(_, given)| *given) {
        return Err(FilterError::Unsupported(name));
    }
    if !ff.trace_id.is_empty() {
        return Err(FilterError::Unsupported("trace_id"));
    }
    if ff.experimental.as_ref().is_some_and(|e| !e.cel_expression.is_empty()) {
        return Err(FilterError::Unsupported("experimental.cel_expression"));
    }

    let mut checks: Vec<Check> = Vec::new();
    if !ff.source_ip.is_empty() {
        let ips = ip_matchers("source_ip", &ff.source_ip)?;
        checks.push(Box::new(move |f| ip_matches(&ips, f.ip.as_ref().map(|i| i.source.as_str()))));
    }
    if !ff.destination_ip.is_empty() {
        let ips = ip_matchers("destination_ip", &ff.destination_ip)?;
        checks.push(Box::new(move |f| ip_matches(&ips, f.ip.as_ref().map(|i| i.destination.as_str()))));
    }
    if !ff.source_pod.is_empty() {
        let pods = pod_matchers("source_pod", &ff.source_pod)?;
        checks.push(Box::new(move |f| pod_matches(&pods, f.source.as_ref())));
    }
    if !ff.destination_pod.is_empty() {
        let pods = pod_matchers("destination_pod", &ff.destination_pod)?;
        checks.push(Box::new(move |f| pod_matches(&pods, f.destination.as_ref())));
    }
    if !ff.source_label.is_empty() {
        let sel = selectors("source_label", &ff.source_label)?;
        checks.push(Box::new(move |f| sel.iter().any(|s| s.matches(endpoint_labels(f.source.as_ref())))));
    }
    if !ff.destination_label.is_empty() {
        let sel = selectors("destination_label", &ff.destination_label)?;
        checks.push(Box::new(move |f| sel.iter().any(|s| s.matches(endpoint_labels(f.destination.as_ref())))));
    }
    if !ff.traffic_direction.is_empty() {
        let want = ff.traffic_direction.clone();
        checks.push(Box::new(move |f| want.contains(&f.traffic_direction)));
    }
    if !ff.verdict.is_empty() {
        let want = ff.verdict.clone();
        checks.push(Box::new(move |f| want.contains(&f.verdict)));
    }
    if !ff.drop_reason_desc.is_empty() {
        let want = ff.drop_reason_desc.clone();
        checks.push(Box::new(move |f| want.contains(&f.drop_reason_desc)));
    }
    if !ff.event_type.is_empty() {
        let want = ff.event_type.clone();
        checks.push(Box::new(move |f| {
            let Some(e) = &f.event_type else { return false };
            want.iter().any(|w| w.r#type == e.r#type && (!w.match_sub_type || w.sub_type == e.sub_type))
        }));
    }
    if !ff.http_status_code.is_empty() {
        let codes = status_matchers(&ff.http_status_code)?;
        checks.push(Box::new(move |f| {
            let Some(http) = http_of(f) else { return false };
            if http.code == 0 {
                return false;
            }
            let code = format!("{:03}", http.code);
            codes.iter().any(|c| match c {
                StatusMatch::Full(full) => *full == code,
                StatusMatch::Prefix(p) => code.starts_with(p.as_str()),
            })
        }));
    }
    if !ff.protocol.is_empty() {
        let mut want = Vec::new();
        for p in &ff.protocol {
            let p = p.to_ascii_lowercase();
            match p.as_str() {
                "tcp" | "udp" | "http" | "kafka" => want.push(p),
                // Hubble knows these; l7mesh never sees such a flow, so none matches.
                "icmp" | "icmpv4" | "icmpv6" | "sctp" | "dns" => want.push(p),
                _ => return Err(invalid("protocol", format!("unknown protocol {p:?}"))),
            }
        }
        checks.push(Box::new(move |f| {
            want.iter().any(|p| match p.as_str() {
                "tcp" => {
                    matches!(f.l4.as_ref().and_then(|l| l.protocol.as_ref()), Some(proto::layer4::Protocol::Tcp(_)))
                }
                "udp" => {
                    matches!(f.l4.as_ref().and_then(|l| l.protocol.as_ref()), Some(proto::layer4::Protocol::Udp(_)))
                }
                "http" => http_of(f).is_some(),
                "kafka" => {
                    matches!(f.l7.as_ref().and_then(|l| l.record.as_ref()), Some(proto::layer7::Record::Kafka(_)))
                }
                _ => false,
            })
        }));
    }
    if !ff.source_port.is_empty() {
        let ports = port_matchers("source_port", &ff.source_port)?;
        checks.push(Box::new(move |f| ports_of(f).is_some_and(|(s, _)| ports.contains(&s))));
    }
    if !ff.destination_port.is_empty() {
        let ports = port_matchers("destination_port", &ff.destination_port)?;
        checks.push(Box::new(move |f| ports_of(f).is_some_and(|(_, d)| ports.contains(&d))));
    }
    if !ff.reply.is_empty() {
        let want = ff.reply.clone();
        checks.push(Box::new(move |f| f.is_reply.is_some_and(|r| want.contains(&r))));
    }
    if !ff.source_identity.is_empty() {
        let want = ff.source_identity.clone();
        checks.push(Box::new(move |f| f.source.as_ref().is_some_and(|e| want.contains(&e.identity))));
    }
    if !ff.destination_identity.is_empty() {
        let want = ff.destination_identity.clone();
        checks.push(Box::new(move |f| f.destination.as_ref().is_some_and(|e| want.contains(&e.identity))));
    }
    if !ff.http_method.is_empty() {
        let want = ff.http_method.clone();
        checks.push(Box::new(move |f| {
            http_of(f).is_some_and(|h| !h.method.is_empty() && want.iter().any(|m| m.eq_ignore_ascii_case(&h.method)))
        }));
    }
    if !ff.http_path.is_empty() {
        let re = regexes("http_path", &ff.http_path)?;
        checks.push(Box::new(move |f| {
            http_of(f).and_then(|h| url_path(&h.url)).is_some_and(|p| re.iter().any(|r| r.is_match(p)))
        }));
    }
    if !ff.http_url.is_empty() {
        let re = regexes("http_url", &ff.http_url)?;
        checks.push(Box::new(move |f| {
            http_of(f).is_some_and(|h| !h.url.is_empty() && re.iter().any(|r| r.is_match(&h.url)))
        }));
    }
    if !ff.node_name.is_empty() {
        let re = node_name_pattern(&ff.node_name)?;
        checks.push(Box::new(move |f| {
            if f.node_name.is_empty() {
                return false;
            }
            let name = if f.node_name.contains('/') { f.node_name.clone() } else { format!("default/{}", f.node_name) };
            re.is_match(&name.to_ascii_lowercase())
        }));
    }
    if !ff.ip_version.is_empty() {
        let want = ff.ip_version.clone();
        checks.push(Box::new(move |f| f.ip.as_ref().is_some_and(|i| want.contains(&i.ip_version))));
    }
    Ok(Compiled(checks))
}

fn http_of(f: &proto::Flow) -> Option<&proto::Http> {
    match f.l7.as_ref()?.record.as_ref()? {
        proto::layer7::Record::Http(h) => Some(h),
        _ => None,
    }
}

fn ports_of(f: &proto::Flow) -> Option<(u32, u32)> {
    match f.l4.as_ref()?.protocol.as_ref()? {
        proto::layer4::Protocol::Tcp(p) | proto::layer4::Protocol::Udp(p) => Some((p.source_port, p.destination_port)),
    }
}

fn endpoint_labels(e: Option<&proto::Endpoint>) -> &[String] {
    e.map_or(&[], |e| e.labels.as_slice())
}

/// The path of a request URL (`http://host/p?q` or `/p?q`): what Hubble's `http_path` matches.
fn url_path(url: &str) -> Option<&str> {
    let rest = match url.split_once("://") {
        Some((_, rest)) => &rest[rest.find('/')?..],
        None if url.starts_with('/') => url,
        None => return None,
    };
    Some(rest.split(['?', '#']).next().unwrap_or(rest))
}

enum IpMatch {
    Exact(IpAddr),
    Net(ipnet::IpNet),
}

fn ip_matchers(field: &'static str, values: &[String]) -> Result<Vec<IpMatch>, FilterError> {
    values
        .iter()
        .map(|v| {
            if v.contains('/') {
                v.parse().map(IpMatch::Net).map_err(|e| invalid(field, format!("{v:?}: {e}")))
            } else {
                v.parse().map(IpMatch::Exact).map_err(|e| invalid(field, format!("{v:?}: {e}")))
            }
        })
        .collect()
}

fn ip_matches(want: &[IpMatch], ip: Option<&str>) -> bool {
    let Some(ip) = ip.and_then(|s| s.parse::<IpAddr>().ok()) else { return false };
    want.iter().any(|w| match w {
        IpMatch::Exact(a) => *a == ip,
        IpMatch::Net(n) => n.contains(&ip),
    })
}

/// `namespace/pod-prefix`, `namespace/` (every pod in it) or `pod-prefix` (in `default`), as
/// Hubble reads them.
fn pod_matchers(field: &'static str, values: &[String]) -> Result<Vec<(String, String)>, FilterError> {
    values
        .iter()
        .map(|v| {
            if v.is_empty() {
                return Err(invalid(field, "a name must not be empty"));
            }
            let mut parts = v.split('/');
            let first = parts.next().unwrap_or_default();
            Ok(match parts.next() {
                Some(name) => (first.to_string(), name.to_string()),
                None => ("default".to_string(), first.to_string()),
            })
        })
        .collect()
}

fn pod_matches(want: &[(String, String)], e: Option<&proto::Endpoint>) -> bool {
    let Some(e) = e else { return false };
    if e.namespace.is_empty() && e.pod_name.is_empty() {
        return false;
    }
    want.iter().any(|(ns, prefix)| {
        (prefix.is_empty() || e.pod_name.starts_with(prefix.as_str())) && (ns.is_empty() || *ns == e.namespace)
    })
}

enum StatusMatch {
    Full(String),
    Prefix(String),
}

fn status_matchers(values: &[String]) -> Result<Vec<StatusMatch>, FilterError> {
    values
        .iter()
        .map(|v| {
            let b = v.as_bytes();
            let digit = |c: u8| c.is_ascii_digit();
            match b {
                [a, b2, c] if (b'1'..=b'5').contains(a) && digit(*b2) && digit(*c) => Ok(StatusMatch::Full(v.clone())),
                [a, b'+'] if (b'1'..=b'5').contains(a) => Ok(StatusMatch::Prefix(v[..1].to_string())),
                [a, b2, b'+'] if (b'1'..=b'5').contains(a) && digit(*b2) => Ok(StatusMatch::Prefix(v[..2].to_string())),
                _ => Err(invalid("http_status_code", format!("invalid status code prefix {v:?} (e.g. 404, 5+)"))),
            }
        })
        .collect()
}

fn port_matchers(field: &'static str, values: &[String]) -> Result<Vec<u32>, FilterError> {
    values.iter().map(|v| v.parse::<u16>().map(u32::from).map_err(|e| invalid(field, format!("{v:?}: {e}")))).collect()
}

fn regexes(field: &'static str, values: &[String]) -> Result<Vec<Regex>, FilterError> {
    values.iter().map(|v| Regex::new(v).map_err(|e| invalid(field, format!("{v:?}: {e}")))).collect()
}

/// `cluster/node` or `node` patterns with `*` (the cluster is `default`), as one anchored regex.
fn node_name_pattern(values: &[String]) -> Result<Regex, FilterError> {
    const NAME: &str = "[-0-9_a-z]+(?:\\.[-0-9_a-z]+)*";
    let part = |p: &str| -> Result<String, FilterError> {
        let p = p.trim().trim_end_matches('.').to_ascii_lowercase();
        if p.is_empty() {
            return Ok(NAME.to_string());
        }
        p.chars()
            .map(|c| match c {
                '.' => Ok("\\.".to_string()),
                '*' => Ok("[-.0-9a-z]*".to_string()),
                c if c == '-' || c == '_' || c.is_ascii_digit() || c.is_ascii_lowercase() => Ok(c.to_string()),
                c => Err(invalid("node_name", format!("{c:?}: invalid character in pattern"))),
            })
            .collect()
    };
    let mut alternatives = Vec::new();
    for v in values {
        if v.is_empty() {
            return Err(invalid("node_name", "empty pattern"));
        }
        let (cluster, node) = match v.split('/').collect::<Vec<_>>()[..] {
            [node] => ("", node),
            [cluster, node] => (cluster, node),
            _ => return Err(invalid("node_name", format!("{v:?}: too many slashes"))),
        };
        alternatives.push(format!("{}/{}", part(cluster)?, part(node)?));
    }
    Regex::new(&format!("^(?:{})$", alternatives.join("|"))).map_err(|e| invalid("node_name", e))
}

/// A Kubernetes label selector as Hubble takes it (`key=value`, `key!=value`, `key`, `!key`,
/// `key in (a,b)`, `key notin (a,b)`, comma-separated, all must hold), keys with or without a
/// source (`k8s:app`; no source: any).
struct Selector(Vec<Requirement>);

struct Requirement {
    source: Option<String>,
    key: String,
    op: Op,
}

enum Op {
    Exists,
    NotExists,
    In(Vec<String>),
    NotIn(Vec<String>),
}

fn selectors(field: &'static str, values: &[String]) -> Result<Vec<Selector>, FilterError> {
    values.iter().map(|v| parse_selector(v).map_err(|why| invalid(field, format!("{v:?}: {why}")))).collect()
}

/// Splits on commas outside parentheses.
fn split_requirements(s: &str) -> Vec<&str> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn parse_selector(s: &str) -> Result<Selector, String> {
    let mut reqs = Vec::new();
    for raw in split_requirements(s) {
        let r = raw.trim();
        if r.is_empty() {
            return Err("empty requirement".into());
        }
        let key_of = |k: &str| -> Result<(Option<String>, String), String> {
            let k = k.trim();
            if k.is_empty() || k.contains(char::is_whitespace) {
                return Err(format!("invalid key {k:?}"));
            }
            Ok(match k.split_once(':') {
                Some((src, key)) if src != "any" => (Some(src.to_string()), key.to_string()),
                Some((_, key)) => (None, key.to_string()),
                None => (None, k.to_string()),
            })
        };
        let set = |v: &str| -> Result<Vec<String>, String> {
            let v = v.trim();
            let inner = v.strip_prefix('(').and_then(|v| v.strip_suffix(')')).ok_or("expected (a,b,...)")?;
            Ok(inner.split(',').map(|x| x.trim().to_string()).collect())
        };
        let (key, op) = if let Some(k) = r.strip_prefix('!') {
            (key_of(k)?, Op::NotExists)
        } else if let Some((k, v)) = r.split_once("!=") {
            (key_of(k)?, Op::NotIn(vec![v.trim().to_string()]))
        } else if let Some((k, v)) = r.split_once("==").or_else(|| r.split_once('=')) {
            (key_of(k)?, Op::In(vec![v.trim().to_string()]))
        } else if let Some((k, v)) = r.split_once(" notin ") {
            (key_of(k)?, Op::NotIn(set(v)?))
        } else if let Some((k, v)) = r.split_once(" in ") {
            (key_of(k)?, Op::In(set(v)?))
        } else {
            (key_of(r)?, Op::Exists)
        };
        reqs.push(Requirement { source: key.0, key: key.1, op });
    }
    Ok(Selector(reqs))
}

impl Selector {
    /// `labels` as a flow carries them (`source:key=value`).
    fn matches(&self, labels: &[String]) -> bool {
        self.0.iter().all(|r| {
            let values: Vec<&str> = labels
                .iter()
                .filter_map(|l| {
                    let (src_key, value) = l.split_once('=').unwrap_or((l.as_str(), ""));
                    let (src, key) = src_key.split_once(':').unwrap_or(("", src_key));
                    (key == r.key && r.source.as_deref().is_none_or(|s| s == src)).then_some(value)
                })
                .collect();
            match &r.op {
                Op::Exists => !values.is_empty(),
                Op::NotExists => values.is_empty(),
                Op::In(set) => values.iter().any(|v| set.iter().any(|s| s == v)),
                Op::NotIn(set) => !values.iter().any(|v| set.iter().any(|s| s == v)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{layer4, layer7, Endpoint, Flow, Http, Layer4, Layer7, Ports};

    fn flow() -> Flow {
        Flow {
            verdict: proto::Verdict::Dropped as i32,
            ip: Some(proto::Ip { source: "10.0.0.5".into(), destination: "10.0.1.9".into(), ip_version: 1 }),
            l4: Some(Layer4 {
                protocol: Some(layer4::Protocol::Tcp(Ports { source_port: 40000, destination_port: 8080 })),
            }),
            source: Some(Endpoint {
                pod_name: "client-7d9".into(),
                namespace: "default".into(),
                labels: vec!["k8s:app=client".into(), "k8s:tier=web".into()],
                identity: 70001,
                ..Default::default()
            }),
            destination: Some(Endpoint { pod_name: "server".into(), namespace: "shop".into(), ..Default::default() }),
            node_name: "node-1".into(),
            l7: Some(Layer7 {
                r#type: 2,
                latency_ns: 1,
                record: Some(layer7::Record::Http(Http {
                    code: 403,
                    method: "PUT".into(),
                    url: "http://api:8080/admin/x?q=1".into(),
                    ..Default::default()
                })),
            }),
            traffic_direction: proto::TrafficDirection::Ingress as i32,
            event_type: Some(proto::CiliumEventType { r#type: 129, sub_type: 0 }),
            is_reply: Some(false),
            ..Default::default()
        }
    }

    fn one(f: FlowFilter) -> Result<bool, FilterError> {
        Filters::compile(&[Checked { message: f, unknown_fields: vec![] }], &[]).map(|c| c.matches(&flow()))
    }

    #[test]
    fn each_supported_field_matches_and_misses() {
        let cases: Vec<(FlowFilter, FlowFilter)> = vec![
            (
                FlowFilter { source_ip: vec!["10.0.0.0/24".into()], ..Default::default() },
                FlowFilter { source_ip: vec!["10.0.0.6".into()], ..Default::default() },
            ),
            (
                FlowFilter { destination_ip: vec!["10.0.1.9".into()], ..Default::default() },
                FlowFilter { destination_ip: vec!["10.0.0.0/24".into()], ..Default::default() },
            ),
            (
                FlowFilter { source_pod: vec!["client".into()], ..Default::default() },
                FlowFilter { source_pod: vec!["shop/client".into()], ..Default::default() },
            ),
            (
                FlowFilter { destination_pod: vec!["shop/".into()], ..Default::default() },
                FlowFilter { destination_pod: vec!["server".into()], ..Default::default() }, // default/server
            ),
            (
                FlowFilter { source_label: vec!["app=client,tier in (web,api)".into()], ..Default::default() },
                FlowFilter { source_label: vec!["app=client,!tier".into()], ..Default::default() },
            ),
            (
                FlowFilter { source_label: vec!["k8s:app".into()], ..Default::default() },
                FlowFilter { source_label: vec!["reserved:app".into()], ..Default::default() },
            ),
            (
                FlowFilter { destination_label: vec!["app!=client".into()], ..Default::default() },
                FlowFilter { destination_label: vec!["app".into()], ..Default::default() },
            ),
            (
                FlowFilter { verdict: vec![1, 2], ..Default::default() },
                FlowFilter { verdict: vec![1], ..Default::default() },
            ),
            (
                FlowFilter { traffic_direction: vec![1], ..Default::default() },
                FlowFilter { traffic_direction: vec![2], ..Default::default() },
            ),
            (
                FlowFilter { http_status_code: vec!["4+".into()], ..Default::default() },
                FlowFilter { http_status_code: vec!["404".into(), "5+".into()], ..Default::default() },
            ),
            (
                FlowFilter { http_method: vec!["put".into()], ..Default::default() },
                FlowFilter { http_method: vec!["GET".into()], ..Default::default() },
            ),
            (
                FlowFilter { http_path: vec!["^/admin/".into()], ..Default::default() },
                FlowFilter { http_path: vec!["q=1".into()], ..Default::default() }, // the query is not the path
            ),
            (
                FlowFilter { http_url: vec!["q=1$".into()], ..Default::default() },
                FlowFilter { http_url: vec!["^https:".into()], ..Default::default() },
            ),
            (
                FlowFilter { protocol: vec!["HTTP".into()], ..Default::default() },
                FlowFilter { protocol: vec!["kafka".into(), "udp".into()], ..Default::default() },
            ),
            (
                FlowFilter { destination_port: vec!["8080".into()], ..Default::default() },
                FlowFilter { source_port: vec!["8080".into()], ..Default::default() },
            ),
            (
                FlowFilter { source_identity: vec![70001], ..Default::default() },
                FlowFilter { destination_identity: vec![70001], ..Default::default() },
            ),
            (
                FlowFilter { node_name: vec!["default/node-*".into()], ..Default::default() },
                FlowFilter { node_name: vec!["other/*".into()], ..Default::default() },
            ),
            (
                FlowFilter {
                    event_type: vec![proto::EventTypeFilter { r#type: 129, match_sub_type: true, sub_type: 0 }],
                    ..Default::default()
                },
                FlowFilter {
                    event_type: vec![proto::EventTypeFilter { r#type: 5, ..Default::default() }],
                    ..Default::default()
                },
            ),
            (
                FlowFilter { reply: vec![false], ..Default::default() },
                FlowFilter { reply: vec![true], ..Default::default() },
            ),
            (
                FlowFilter { ip_version: vec![1], ..Default::default() },
                FlowFilter { ip_version: vec![2], ..Default::default() },
            ),
            (
                FlowFilter { drop_reason_desc: vec![0], ..Default::default() },
                FlowFilter { drop_reason_desc: vec![133], ..Default::default() },
            ),
        ];
        for (hit, miss) in cases {
            assert_eq!(one(hit.clone()), Ok(true), "{hit:?}");
            assert_eq!(one(miss.clone()), Ok(false), "{miss:?}");
        }
        // Every field of one filter must match.
        let both = FlowFilter { verdict: vec![2], http_method: vec!["GET".into()], ..Default::default() };
        assert_eq!(one(both), Ok(false));
    }

    #[test]
    fn allow_and_deny_lists() {
        let c = |f: FlowFilter| Checked { message: f, unknown_fields: vec![] };
        let dropped = FlowFilter { verdict: vec![2], ..Default::default() };
        let forwarded = FlowFilter { verdict: vec![1], ..Default::default() };
        let f = flow();
        assert!(Filters::compile(&[], &[]).unwrap().matches(&f));
        assert!(Filters::compile(&[c(forwarded.clone()), c(dropped.clone())], &[]).unwrap().matches(&f));
        assert!(!Filters::compile(&[c(forwarded.clone())], &[]).unwrap().matches(&f));
        assert!(!Filters::compile(&[], &[c(dropped.clone())]).unwrap().matches(&f));
        assert!(Filters::compile(&[], &[c(forwarded)]).unwrap().matches(&f));
        assert!(!Filters::compile(&[c(dropped.clone())], &[c(dropped)]).unwrap().matches(&f), "deny wins");
    }

    /// What l7mesh cannot judge is refused by name, as is a bad value: never "matched nothing".
    #[test]
    fn refuses_what_it_cannot_judge() {
        let refused = |f: FlowFilter| one(f).unwrap_err().to_string();
        assert!(refused(FlowFilter { source_fqdn: vec!["a.b".into()], ..Default::default() }).contains("`source_fqdn`"));
        assert!(refused(FlowFilter { http_header: vec![Default::default()], ..Default::default() })
            .contains("`http_header`"));
        assert!(refused(FlowFilter { source_workload: vec![Default::default()], ..Default::default() })
            .contains("`source_workload`"));
        assert!(refused(FlowFilter { tcp_flags: vec![vec![]], ..Default::default() }).contains("`tcp_flags`"));
        assert!(refused(FlowFilter { trace_id: vec!["t".into()], ..Default::default() }).contains("`trace_id`"));
        let cel = FlowFilter {
            experimental: Some(proto::FlowFilterExperimental { cel_expression: vec!["true".into()] }),
            ..Default::default()
        };
        assert!(refused(cel).contains("cel_expression"));
        let unknown = Filters::compile(&[Checked { message: FlowFilter::default(), unknown_fields: vec![77] }], &[]);
        assert_eq!(unknown.unwrap_err(), FilterError::UnknownField(77));
        for bad in [
            FlowFilter { source_ip: vec!["10.0.0.300".into()], ..Default::default() },
            FlowFilter { source_pod: vec!["".into()], ..Default::default() },
            FlowFilter { http_status_code: vec!["40".into()], ..Default::default() },
            FlowFilter { http_status_code: vec!["6+".into()], ..Default::default() },
            FlowFilter { http_path: vec!["(".into()], ..Default::default() },
            FlowFilter { destination_port: vec!["65536".into()], ..Default::default() },
            FlowFilter { protocol: vec!["carrier-pigeon".into()], ..Default::default() },
            FlowFilter { node_name: vec!["a/b/c".into()], ..Default::default() },
            FlowFilter { node_name: vec!["nöde".into()], ..Default::default() },
            FlowFilter { source_label: vec!["app=x,".into()], ..Default::default() },
            FlowFilter { source_label: vec!["tier in web".into()], ..Default::default() },
        ] {
            assert!(matches!(one(bad.clone()), Err(FilterError::Invalid { .. })), "{bad:?}");
        }
    }
}

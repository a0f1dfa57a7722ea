//! Loading and validating policy files. Every problem is a [`Diagnostic`] naming the file, the
//! line and the field path, and saying what is wrong; features l7mesh does not support are
//! refused by name.

use std::fmt;
use std::path::{Path, PathBuf};

use ipnet::IpNet;

use crate::model::*;
use crate::source::{parse_documents, LineIndex};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Diagnostic {
    pub severity: Severity,
    pub file: String,
    pub line: Option<usize>,
    /// Field path in the document, e.g. `spec.ingress[0].toPorts[0].rules.http[1].path`.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        match self.line {
            Some(line) => write!(f, "{}:{}: {sev}: ", self.file, line)?,
            None => write!(f, "{}: {sev}: ", self.file)?,
        }
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// A policy document that validated, and where it came from.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoadedPolicy {
    pub doc: PolicyDocument,
    pub file: String,
    pub line: usize,
}

/// Every document of `text` that validated, and every problem found. A caller applying a set
/// must apply none of it when any diagnostic is an error.
pub fn load_text(file: &str, text: &str) -> (Vec<LoadedPolicy>, Vec<Diagnostic>) {
    let mut policies = Vec::new();
    let mut diags = Vec::new();
    let docs = match parse_documents(file, text) {
        Ok(docs) => docs,
        Err(e) => {
            diags.push(Diagnostic {
                severity: Severity::Error,
                file: file.to_string(),
                line: Some(e.line),
                path: String::new(),
                message: format!("invalid YAML at column {}: {}", e.column, e.message),
            });
            return (policies, diags);
        }
    };
    for d in docs {
        let err = |path: &str, message: String| Diagnostic {
            severity: Severity::Error,
            file: file.to_string(),
            line: d.index.line_of(path).or(Some(d.line)),
            path: path.to_string(),
            message,
        };
        if d.value.is_array() {
            diags.push(err("", "a bare list of rules (Cilium's JSON rule format) is not supported; wrap the rules in a CiliumNetworkPolicy".into()));
            continue;
        }
        let mut value = d.value.clone();
        normalize_field_names(&mut value, false);
        match value.get("kind").and_then(|k| k.as_str()) {
            Some(KIND_CNP) | Some(KIND_CCNP) => {}
            Some(other) => {
                diags.push(err(
                    "kind",
                    format!("`{other}` is not a CiliumNetworkPolicy or CiliumClusterwideNetworkPolicy"),
                ));
                continue;
            }
            None => {
                diags.push(err(
                    "kind",
                    "missing: a policy needs `kind: CiliumNetworkPolicy` (or CiliumClusterwideNetworkPolicy)".into(),
                ));
                continue;
            }
        }
        let doc: PolicyDocument = match serde_path_to_error::deserialize(&value) {
            Ok(doc) => doc,
            Err(e) => {
                let path = e.path().to_string();
                let path = if path == "." { String::new() } else { path };
                let message = e.into_inner().to_string();
                // Unknown fields: point at the field itself.
                let path = match message.strip_prefix("unknown field `").and_then(|m| m.split('`').next()) {
                    Some(field) if !path.ends_with(field) => join(&path, field),
                    _ => path,
                };
                diags.push(err(&path, message));
                continue;
            }
        };
        let mut found = Vec::new();
        validate(&doc, &mut found);
        let has_error = found.iter().any(|(s, _, _)| *s == Severity::Error);
        diags.extend(found.into_iter().map(|(severity, path, message)| Diagnostic {
            severity,
            file: file.to_string(),
            line: line_of(&d.index, &path).or(Some(d.line)),
            path,
            message,
        }));
        if !has_error {
            policies.push(LoadedPolicy { doc, file: file.to_string(), line: d.line });
        }
    }
    (policies, diags)
}

/// Every field name of the policy model. Cilium's decoder (Go's encoding/json) matches field
/// names case-insensitively, so `rules.HTTP` is `rules.http`; this table gives each its
/// canonical spelling. Keys inside label maps and metadata are data, never renamed.
const FIELD_NAMES: &[&str] = &[
    "apiVersion",
    "kind",
    "metadata",
    "spec",
    "specs",
    "status",
    "description",
    "endpointSelector",
    "nodeSelector",
    "ingress",
    "ingressDeny",
    "egress",
    "egressDeny",
    "labels",
    "enableDefaultDeny",
    "log",
    "matchLabels",
    "matchExpressions",
    "key",
    "operator",
    "values",
    "fromEndpoints",
    "fromCIDR",
    "fromCIDRSet",
    "fromEntities",
    "toPorts",
    "fromRequires",
    "fromGroups",
    "fromNodes",
    "icmps",
    "authentication",
    "toEndpoints",
    "toCIDR",
    "toCIDRSet",
    "toEntities",
    "toRequires",
    "toServices",
    "toFQDNs",
    "toGroups",
    "toNodes",
    "cidr",
    "except",
    "cidrGroupRef",
    "cidrGroupSelector",
    "ports",
    "rules",
    "terminatingTLS",
    "originatingTLS",
    "serverNames",
    "listener",
    "port",
    "endPort",
    "protocol",
    "secret",
    "trustedCA",
    "certificate",
    "privateKey",
    "namespace",
    "name",
    "http",
    "kafka",
    "grpc",
    "dns",
    "l7proto",
    "l7",
    "method",
    "path",
    "host",
    "headers",
    "headerMatches",
    "value",
    "mismatch",
    "role",
    "apiKey",
    "apiVersion",
    "clientID",
    "topic",
    "service",
];

fn normalize_field_names(value: &mut serde_json::Value, data: bool) {
    match value {
        serde_json::Value::Object(map) => {
            if !data {
                let renames: Vec<(String, &str)> = map
                    .keys()
                    .filter(|k| !FIELD_NAMES.contains(&k.as_str()))
                    .filter_map(|k| FIELD_NAMES.iter().find(|f| f.eq_ignore_ascii_case(k)).map(|f| (k.clone(), *f)))
                    .collect();
                for (from, to) in renames {
                    if !map.contains_key(to) {
                        if let Some(v) = map.remove(&from) {
                            map.insert(to.to_string(), v);
                        }
                    }
                }
            }
            for (k, v) in map.iter_mut() {
                let is_data = data || matches!(k.as_str(), "matchLabels" | "labels" | "annotations" | "metadata");
                normalize_field_names(v, is_data);
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(|v| normalize_field_names(v, data)),
        _ => {}
    }
}

fn line_of(index: &LineIndex, path: &str) -> Option<usize> {
    index.line_of(path)
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

/// Policy files under `path`: the file itself, or a directory's `*.yaml`, `*.yml` and
/// `*.json` files (not recursive), sorted by name.
pub fn policy_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json")))
            .collect();
        files.sort();
        Ok(files)
    } else {
        Ok(vec![path.to_path_buf()])
    }
}

/// Loads every policy file under `path`.
pub fn load_path(path: &Path) -> (Vec<LoadedPolicy>, Vec<Diagnostic>) {
    let mut policies = Vec::new();
    let mut diags = Vec::new();
    let files = match policy_files(path) {
        Ok(f) => f,
        Err(e) => {
            diags.push(Diagnostic {
                severity: Severity::Error,
                file: path.display().to_string(),
                line: None,
                path: String::new(),
                message: format!("cannot read: {e}"),
            });
            return (policies, diags);
        }
    };
    for file in files {
        let name = file.display().to_string();
        match std::fs::read_to_string(&file) {
            Ok(text) => {
                let (p, d) = load_text(&name, &text);
                policies.extend(p);
                diags.extend(d);
            }
            Err(e) => diags.push(Diagnostic {
                severity: Severity::Error,
                file: name,
                line: None,
                path: String::new(),
                message: format!("cannot read: {e}"),
            }),
        }
    }
    (policies, diags)
}

type Found = Vec<(Severity, String, String)>;

fn error(found: &mut Found, path: impl Into<String>, message: impl Into<String>) {
    found.push((Severity::Error, path.into(), message.into()));
}

fn unsupported(found: &mut Found, present: bool, path: &str, field: &str, what: &str) {
    if present {
        error(found, join(path, field), format!("{field} ({what}) is not supported by l7mesh"));
    }
}

/// Entities l7mesh can enforce on one node.
pub const SUPPORTED_ENTITIES: &[&str] = &["world", "host", "all", "cluster"];
const KNOWN_ENTITIES: &[&str] = &[
    "world",
    "host",
    "all",
    "cluster",
    "remote-node",
    "kube-apiserver",
    "health",
    "init",
    "ingress",
    "unmanaged",
    "none",
];

fn validate(doc: &PolicyDocument, found: &mut Found) {
    if doc.api_version != API_VERSION {
        error(found, "apiVersion", format!("`{}` is not supported; use `{API_VERSION}`", doc.api_version));
    }
    if doc.metadata.name.is_empty() {
        error(found, "metadata.name", "must not be empty");
    } else if !is_dns_subdomain(&doc.metadata.name) {
        error(
            found,
            "metadata.name",
            format!("`{}` is not a valid name (lowercase letters, digits, '-' and '.')", doc.metadata.name),
        );
    }
    if doc.is_clusterwide() && doc.metadata.namespace.is_some() {
        error(found, "metadata.namespace", "a CiliumClusterwideNetworkPolicy has no namespace");
    }
    if let Some(v) = doc.metadata.annotations.get(AUDIT_ANNOTATION) {
        if v != "true" && v != "false" {
            error(
                found,
                format!("metadata.annotations.{AUDIT_ANNOTATION}"),
                format!("`{v}` must be \"true\" or \"false\""),
            );
        }
    }
    let rules = doc.rules();
    if rules.is_empty() {
        error(found, "spec", "missing: a policy needs `spec` or `specs`");
    }
    for (path, rule) in rules {
        validate_rule(rule, &path, found);
    }
}

fn validate_rule(rule: &Rule, path: &str, found: &mut Found) {
    unsupported(found, rule.node_selector.is_some(), path, "nodeSelector", "host policies");
    match &rule.endpoint_selector {
        Some(sel) => validate_selector(sel, &join(path, "endpointSelector"), found),
        None if rule.node_selector.is_none() => {
            error(found, join(path, "endpointSelector"), "missing: every rule selects the workloads it applies to")
        }
        None => {}
    }
    for (field, list, deny) in [("ingress", &rule.ingress, false), ("ingressDeny", &rule.ingress_deny, true)] {
        for (i, r) in list.iter().flatten().enumerate() {
            let p = format!("{}[{i}]", join(path, field));
            unsupported(found, r.from_requires.is_some(), &p, "fromRequires", "requirement-based selection");
            unsupported(found, r.from_groups.is_some(), &p, "fromGroups", "cloud provider groups");
            unsupported(found, r.from_nodes.is_some(), &p, "fromNodes", "node selectors");
            unsupported(found, r.icmps.is_some(), &p, "icmps", "ICMP rules");
            unsupported(found, r.authentication.is_some(), &p, "authentication", "mutual authentication");
            unsupported(found, r.auth.is_some(), &p, "auth", "mutual authentication");
            for (j, s) in r.from_endpoints.iter().flatten().enumerate() {
                validate_selector(s, &format!("{p}.fromEndpoints[{j}]"), found);
            }
            validate_peers_l3(&r.from_cidr, &r.from_cidr_set, &r.from_entities, &p, "from", found);
            validate_ports(&r.to_ports, &p, deny, found);
        }
    }
    for (field, list, deny) in [("egress", &rule.egress, false), ("egressDeny", &rule.egress_deny, true)] {
        for (i, r) in list.iter().flatten().enumerate() {
            let p = format!("{}[{i}]", join(path, field));
            unsupported(found, r.to_requires.is_some(), &p, "toRequires", "requirement-based selection");
            unsupported(found, r.to_services.is_some(), &p, "toServices", "Kubernetes services");
            unsupported(found, r.to_fqdns.is_some(), &p, "toFQDNs", "DNS-based policy");
            unsupported(found, r.to_groups.is_some(), &p, "toGroups", "cloud provider groups");
            unsupported(found, r.to_nodes.is_some(), &p, "toNodes", "node selectors");
            unsupported(found, r.icmps.is_some(), &p, "icmps", "ICMP rules");
            unsupported(found, r.authentication.is_some(), &p, "authentication", "mutual authentication");
            unsupported(found, r.auth.is_some(), &p, "auth", "mutual authentication");
            for (j, s) in r.to_endpoints.iter().flatten().enumerate() {
                validate_selector(s, &format!("{p}.toEndpoints[{j}]"), found);
            }
            validate_peers_l3(&r.to_cidr, &r.to_cidr_set, &r.to_entities, &p, "to", found);
            validate_ports(&r.to_ports, &p, deny, found);
        }
    }
}

fn validate_selector(sel: &Selector, path: &str, found: &mut Found) {
    for (i, e) in sel.match_expressions.iter().flatten().enumerate() {
        let p = format!("{path}.matchExpressions[{i}]");
        match canonical_operator(&e.operator).unwrap_or(e.operator.as_str()) {
            "In" | "NotIn" if e.values.is_empty() => {
                error(found, join(&p, "values"), format!("operator {} needs at least one value", e.operator))
            }
            "Exists" | "DoesNotExist" if !e.values.is_empty() => {
                error(found, join(&p, "values"), format!("operator {} takes no values", e.operator))
            }
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => error(
                found,
                join(&p, "operator"),
                format!("unknown operator `{other}` (In, NotIn, Exists, DoesNotExist)"),
            ),
        }
    }
    for key in sel.match_labels.iter().flatten().map(|(k, _)| k) {
        if let (Some("reserved"), name) = crate::labels::split_source(key) {
            if !["host", "world"].contains(&name) {
                error(
                    found,
                    join(&join(path, "matchLabels"), key),
                    format!("reserved label `{name}` is not supported (host, world)"),
                );
            }
        }
    }
}

/// Selector operators, as Cilium reads them (it lower-cases them: `in` is `In`).
pub fn canonical_operator(op: &str) -> Option<&'static str> {
    ["In", "NotIn", "Exists", "DoesNotExist"].into_iter().find(|o| o.eq_ignore_ascii_case(op))
}

/// Parses a CIDR as Cilium accepts it: a prefix, or a bare address meaning a host prefix.
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net);
    }
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    Err(format!("`{s}` is not a CIDR (e.g. 10.0.0.0/8 or 2001:db8::/32)"))
}

fn validate_peers_l3(
    cidrs: &Option<Vec<String>>,
    sets: &Option<Vec<CidrRule>>,
    entities: &Option<Vec<String>>,
    path: &str,
    dir: &str,
    found: &mut Found,
) {
    for (i, c) in cidrs.iter().flatten().enumerate() {
        if let Err(e) = parse_cidr(c) {
            error(found, format!("{path}.{dir}CIDR[{i}]"), e);
        }
    }
    for (i, set) in sets.iter().flatten().enumerate() {
        let p = format!("{path}.{dir}CIDRSet[{i}]");
        unsupported(found, set.cidr_group_ref.is_some(), &p, "cidrGroupRef", "CiliumCIDRGroup references");
        unsupported(found, set.cidr_group_selector.is_some(), &p, "cidrGroupSelector", "CiliumCIDRGroup selectors");
        let Some(cidr) = &set.cidr else {
            if set.cidr_group_ref.is_none() && set.cidr_group_selector.is_none() {
                error(found, join(&p, "cidr"), "missing");
            }
            continue;
        };
        let net = match parse_cidr(cidr) {
            Ok(n) => n,
            Err(e) => {
                error(found, join(&p, "cidr"), e);
                continue;
            }
        };
        for (j, ex) in set.except.iter().enumerate() {
            match parse_cidr(ex) {
                Ok(e) if !net.contains(&e) => {
                    error(found, format!("{p}.except[{j}]"), format!("{ex} is not inside {cidr}"))
                }
                Ok(_) => {}
                Err(e) => error(found, format!("{p}.except[{j}]"), e),
            }
        }
    }
    for (i, e) in entities.iter().flatten().enumerate() {
        let p = format!("{path}.{dir}Entities[{i}]");
        if SUPPORTED_ENTITIES.contains(&e.as_str()) {
            continue;
        }
        if KNOWN_ENTITIES.contains(&e.as_str()) {
            error(
                found,
                p,
                format!("entity `{e}` is not supported by l7mesh (supported: {})", SUPPORTED_ENTITIES.join(", ")),
            );
        } else {
            error(found, p, format!("unknown entity `{e}` (supported: {})", SUPPORTED_ENTITIES.join(", ")));
        }
    }
}

/// A port rule's ports, parsed: (first, last, protocols).
pub fn parse_port(p: &PortProtocol) -> Result<(u16, u16, Vec<&'static str>), (String, String)> {
    let protocols: Vec<&'static str> = match p.protocol.as_deref().unwrap_or("ANY") {
        "TCP" => vec!["TCP"],
        "UDP" => vec!["UDP"],
        "ANY" => vec!["TCP", "UDP"],
        "SCTP" => return Err(("protocol".into(), "protocol SCTP is not supported by l7mesh".into())),
        other => return Err(("protocol".into(), format!("unknown protocol `{other}` (TCP, UDP, ANY)"))),
    };
    if p.port.is_empty() || p.port == "0" {
        if p.end_port.is_some_and(|e| e != 0) {
            return Err(("endPort".into(), "endPort needs a port".into()));
        }
        return Ok((0, 65535, protocols));
    }
    let port: u32 = match p.port.parse() {
        Ok(n) => n,
        Err(_) if p.port.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') => {
            return Err(("port".into(), format!("named port `{}` is not supported by l7mesh (use a number)", p.port)))
        }
        Err(_) => return Err(("port".into(), format!("`{}` is not a port number", p.port))),
    };
    if port > 65535 {
        return Err(("port".into(), format!("port {port} is out of range (1-65535)")));
    }
    let end = match p.end_port {
        None | Some(0) => port,
        Some(e) if !(0..=65535).contains(&e) => {
            return Err(("endPort".into(), format!("endPort {e} is out of range (1-65535)")))
        }
        Some(e) if (e as u32) < port => return Err(("endPort".into(), format!("endPort {e} is below port {port}"))),
        Some(e) => e as u32,
    };
    Ok((port as u16, end as u16, protocols))
}

fn validate_ports(ports: &Option<Vec<PortRule>>, path: &str, deny: bool, found: &mut Found) {
    for (i, pr) in ports.iter().flatten().enumerate() {
        let p = format!("{path}.toPorts[{i}]");
        unsupported(found, pr.listener.is_some(), &p, "listener", "custom Envoy listeners");
        let mut tcp_only_ok = true;
        for (j, port) in pr.ports.iter().enumerate() {
            match parse_port(port) {
                Ok((_, _, protos)) => {
                    if protos == ["UDP"] {
                        tcp_only_ok = false;
                    }
                }
                Err((field, message)) => error(found, format!("{p}.ports[{j}].{field}"), message),
            }
        }
        let has_l7 = pr.rules.is_some()
            || pr.terminating_tls.is_some()
            || pr.originating_tls.is_some()
            || pr.server_names.is_some();
        if deny && has_l7 {
            error(found, p.clone(), "deny rules cannot carry L7 rules, TLS settings or serverNames");
            continue;
        }
        if has_l7 && !tcp_only_ok {
            error(found, p.clone(), "L7 rules and TLS apply to TCP; this port rule is UDP only");
        }
        if let Some(rules) = &pr.rules {
            validate_l7(rules, &join(&p, "rules"), found);
            if rules.kafka.as_ref().is_some_and(|k| !k.is_empty())
                && (pr.terminating_tls.is_some() || pr.originating_tls.is_some())
            {
                error(
                    found,
                    join(&p, "rules.kafka"),
                    "conflicting TLS settings: Kafka rules cannot be combined with terminatingTLS or originatingTLS (the proxy terminates and originates TLS for HTTP and gRPC)",
                );
            }
        }
        for (field, tls) in [("terminatingTLS", &pr.terminating_tls), ("originatingTLS", &pr.originating_tls)] {
            if let Some(tls) = tls {
                let tp = join(&p, field);
                unsupported(found, tls.trusted_ca.is_some(), &tp, "trustedCA", "file-based TLS material; use a secret");
                unsupported(
                    found,
                    tls.certificate.is_some(),
                    &tp,
                    "certificate",
                    "file-based TLS material; use a secret",
                );
                unsupported(
                    found,
                    tls.private_key.is_some(),
                    &tp,
                    "privateKey",
                    "file-based TLS material; use a secret",
                );
                if let Some(secret) = &tls.secret {
                    if secret.name.is_empty() {
                        error(found, format!("{tp}.secret.name"), "must not be empty");
                    }
                }
            }
        }
        for (j, name) in pr.server_names.iter().flatten().enumerate() {
            if !is_server_name(name) {
                error(found, format!("{p}.serverNames[{j}]"), format!("`{name}` is not a DNS name or `*.`-wildcard"));
            }
        }
    }
}

/// Compiles a policy regex as Envoy matches it: against the whole value.
pub fn whole_value_regex(pattern: &str) -> Result<regex::Regex, String> {
    regex::Regex::new(&format!("^(?:{pattern})$")).map_err(|e| match e {
        regex::Error::Syntax(text) => format!("invalid regex `{pattern}`: {}", text.trim().replace("\n", " ")),
        other => format!("invalid regex `{pattern}`: {other}"),
    })
}

pub const KAFKA_ROLES: &[&str] = &["produce", "consume"];
fn validate_l7(rules: &L7Rules, path: &str, found: &mut Found) {
    unsupported(found, rules.dns.is_some(), path, "dns", "DNS proxy rules");
    unsupported(found, rules.l7proto.is_some(), path, "l7proto", "generic L7 parsers");
    unsupported(found, rules.l7.is_some(), path, "l7", "generic L7 parsers");
    let kinds = [rules.http.is_some(), rules.kafka.is_some(), rules.grpc.is_some()].iter().filter(|b| **b).count();
    if kinds > 1 {
        error(found, path.to_string(), "one port rule takes one kind of L7 rules (http, kafka or grpc)");
    }
    for (i, h) in rules.http.iter().flatten().enumerate() {
        let p = format!("{path}.http[{i}]");
        for (field, value) in [("method", &h.method), ("path", &h.path), ("host", &h.host)] {
            if let Some(v) = value {
                if let Err(e) = whole_value_regex(v) {
                    error(found, join(&p, field), e);
                }
            }
        }
        for (j, header) in h.headers.iter().enumerate() {
            let name = header.split_once(':').map(|(n, _)| n).unwrap_or(header).trim();
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)) {
                error(found, format!("{p}.headers[{j}]"), format!("`{header}` is not `Name` or `Name: value`"));
            }
        }
        for (j, m) in h.header_matches.iter().enumerate() {
            let mp = format!("{p}.headerMatches[{j}]");
            if m.name.is_empty() {
                error(found, join(&mp, "name"), "must not be empty");
            }
            unsupported(found, m.mismatch.is_some(), &mp, "mismatch", "header rewriting on mismatch");
            unsupported(found, m.secret.is_some(), &mp, "secret", "header values from secrets");
        }
    }
    for (i, k) in rules.kafka.iter().flatten().enumerate() {
        let p = format!("{path}.kafka[{i}]");
        if let Some(role) = &k.role {
            if !KAFKA_ROLES.contains(&role.to_ascii_lowercase().as_str()) {
                error(found, join(&p, "role"), format!("unknown role `{role}` (produce, consume)"));
            }
            if k.api_key.is_some() {
                error(found, join(&p, "apiKey"), "role and apiKey are mutually exclusive");
            }
        }
        if let Some(key) = &k.api_key {
            if l7rules::kafka_api_key(key).is_none() {
                error(
                    found,
                    join(&p, "apiKey"),
                    format!("unknown Kafka apiKey `{key}` (Cilium's names such as produce, fetch, offsets, deletetopics, or Kafka's lower-cased)"),
                );
            }
        }
        if let Some(v) = &k.api_version {
            if v.parse::<i16>().map(|n| n < 0).unwrap_or(true) {
                error(found, join(&p, "apiVersion"), format!("`{v}` is not a Kafka API version (0-32767)"));
            }
        }
        if let Some(t) = &k.topic {
            if t.is_empty() || t.len() > 255 || !t.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
                error(found, join(&p, "topic"), format!("`{t}` is not a Kafka topic name (1-255 of [a-zA-Z0-9._-])"));
            }
        }
        if let Some(c) = &k.client_id {
            if c.is_empty() {
                error(found, join(&p, "clientID"), "must not be empty");
            }
        }
    }
    for (i, g) in rules.grpc.iter().flatten().enumerate() {
        let p = format!("{path}.grpc[{i}]");
        let ident = |s: &str| {
            !s.is_empty()
                && s.split('.')
                    .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        };
        if !ident(&g.service) {
            error(
                found,
                join(&p, "service"),
                format!("`{}` is not a gRPC service name (e.g. helloworld.Greeter)", g.service),
            );
        }
        if let Some(m) = &g.method {
            if m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                error(found, join(&p, "method"), format!("`{m}` is not a gRPC method name"));
            }
        }
    }
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

fn is_server_name(s: &str) -> bool {
    let s = s.strip_prefix("*.").unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.split('.')
            .all(|l| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        let (_, d) = load_text("p.yaml", text);
        d.iter().map(|d| d.to_string()).collect()
    }

    const HEAD: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: p\nspec:\n  endpointSelector:\n    matchLabels:\n      app: web\n";

    #[test]
    fn a_good_policy_loads() {
        let text = format!("{HEAD}  ingress:\n  - fromEndpoints:\n    - matchLabels:\n        org: empire\n    toPorts:\n    - ports:\n      - port: \"80\"\n        protocol: TCP\n      rules:\n        http:\n        - method: POST\n          path: /v1/request-landing\n");
        let (p, d) = load_text("p.yaml", &text);
        assert!(d.is_empty(), "{d:?}");
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].doc.key(), "default/p");
    }

    #[test]
    fn regex_error_names_file_line_field_and_position() {
        let text = format!("{HEAD}  ingress:\n  - toPorts:\n    - ports:\n      - port: \"80\"\n      rules:\n        http:\n        - path: /ok\n        - path: \"/v1/(unclosed\"\n");
        let e = errors(&text);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("p.yaml:16: error: spec.ingress[0].toPorts[0].rules.http[1].path: invalid regex"),
            "{}",
            e[0]
        );
        assert!(e[0].contains("unclosed group"), "{}", e[0]);
    }

    #[test]
    fn kafka_api_keys_come_from_the_one_table() {
        let rules = |keys: &[&str]| {
            let list: String = keys.iter().map(|k| format!("        - apiKey: {k}\n          topic: t\n")).collect();
            format!("{HEAD}  egress:\n  - toPorts:\n    - ports:\n      - port: \"9092\"\n      rules:\n        kafka:\n{list}")
        };
        let good = [
            "produce",
            "offsets",
            "ListOffsets",
            "deletetopics",
            "DeleteTopics",
            "gettelemetrysubscriptions",
            "leaderandisr",
        ];
        assert!(errors(&rules(&good)).is_empty(), "{:?}", errors(&rules(&good)));
        let e = errors(&rules(&["produce", "deletetopic", "\"*\""]));
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(
            e[0].starts_with(
                "p.yaml:17: error: spec.egress[0].toPorts[0].rules.kafka[1].apiKey: unknown Kafka apiKey `deletetopic`"
            ),
            "{e:?}"
        );
        assert!(
            e[1].starts_with(
                "p.yaml:19: error: spec.egress[0].toPorts[0].rules.kafka[2].apiKey: unknown Kafka apiKey `*`"
            ),
            "{e:?}"
        );
    }

    #[test]
    fn port_out_of_range_and_unknown_field() {
        let text = format!("{HEAD}  egress:\n  - toPorts:\n    - ports:\n      - port: \"70000\"\n");
        let e = errors(&text);
        assert!(
            e[0].starts_with("p.yaml:12: error: spec.egress[0].toPorts[0].ports[0].port: port 70000 is out of range"),
            "{e:?}"
        );
        let text = format!("{HEAD}  egress:\n  - toPorst:\n    - ports: []\n");
        let e = errors(&text);
        assert!(e[0].starts_with("p.yaml:10: error: spec.egress[0].toPorst: unknown field `toPorst`"), "{e:?}");
    }

    #[test]
    fn unsupported_features_are_refused_by_name() {
        let text = format!("{HEAD}  egress:\n  - toFQDNs:\n    - matchName: example.com\n  - toEntities: [kube-apiserver]\n  - toPorts:\n    - ports: [{{port: \"53\", protocol: UDP}}]\n      rules:\n        dns: [{{matchPattern: \"*\"}}]\n");
        let e = errors(&text).join("\n");
        assert!(e.contains("spec.egress[0].toFQDNs: toFQDNs (DNS-based policy) is not supported"), "{e}");
        assert!(e.contains("spec.egress[1].toEntities[0]: entity `kube-apiserver` is not supported"), "{e}");
        assert!(e.contains("spec.egress[2].toPorts[0].rules.dns: dns (DNS proxy rules) is not supported"), "{e}");
    }

    #[test]
    fn syntax_error_has_a_line() {
        let e = errors("apiVersion: cilium.io/v2\nkind: [oops\n");
        assert!(e[0].starts_with("p.yaml:"), "{e:?}");
        assert!(e[0].contains("invalid YAML"), "{e:?}");
    }
}

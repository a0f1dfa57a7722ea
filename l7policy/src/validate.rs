//! Loading and validating policy files. Every problem is a [`Diagnostic`] naming the file, the
//! line and the field path, and saying what is wrong; features l7mesh does not support are
//! refused by name.
//!
//! A document Cilium refuses is refused here for the same reason. Cilium's checks (its rule
//! validation: `Rule`, `IngressRule`/`EgressRule` and their deny forms, `PortRule`,
//! `PortProtocol`, `L7Rules`, `CIDR`/`CIDRRule`, `EndpointSelector`, the HTTP and Kafka rules),
//! each with where it is made here; every one has a refused document and a near miss Cilium
//! accepts in the tests below (`cilium_checks`):
//!
//! | Cilium refuses | here |
//! |---|---|
//! | a rule with neither `endpointSelector` nor `nodeSelector` | `validate_rule` |
//! | a rule with both | `validate_rule` (and `nodeSelector` is unsupported) |
//! | a selector Kubernetes' label selector validation refuses: operator, values for In/NotIn and none for Exists/DoesNotExist, key syntax, value syntax | `validate_selector`, `label_key`, `label_value` |
//! | two kinds of peer in one rule (`fromEndpoints` and `fromCIDR`, `toCIDR` and `toEntities`, `toEndpoints` and `toFQDNs`, ...; empty lists do not count) | `one_peer_kind` |
//! | `icmps` next to `toPorts` in one rule | `icmps_without_ports` |
//! | an entity not in its entity table | `validate_peers_l3` (`KNOWN_ENTITIES`; l7mesh enforces `SUPPORTED_ENTITIES`) |
//! | an empty CIDR, one that parses neither as a prefix nor as an address | `parse_cidr` |
//! | a CIDR set entry with none, or more than one, of `cidr`, `cidrGroupRef`, `cidrGroupSelector` | `validate_peers_l3` |
//! | a CIDR set `cidr` or `except` not in prefix notation; an `except` not inside its `cidr` (other family, shorter prefix, elsewhere) | `parse_prefix`, `validate_peers_l3` |
//! | DNS rules on ingress | `validate_ports` (and `rules.dns` is unsupported) |
//! | `serverNames` next to L7 rules without `terminatingTLS`; an empty server name | `validate_ports` (l7mesh also allows them with `originatingTLS`, where they name the upstream) |
//! | more than 40 ports in a port rule (allow or deny) | `validate_ports` (`MAX_PORTS`) |
//! | a port not given; one that is neither a service name nor a 16-bit number | `parse_port` (named ports are unsupported) |
//! | a protocol other than TCP, UDP, SCTP, ANY | `parse_port` (SCTP is unsupported) |
//! | L7 rules (other than DNS) on a protocol other than TCP, given or not (ANY is the default) | `validate_ports` |
//! | L7 rules on port 0 | `validate_ports` |
//! | a `listener` on ingress, or next to L7 rules | `validate_ports` (and `listener` is unsupported) |
//! | two kinds of L7 rules on one port rule | `validate_l7` (`rules.grpc` counts as a kind) |
//! | `l7` without `l7proto` | `validate_l7` (both are unsupported) |
//! | an HTTP `path` or `method` that is not a regex | `regex_problem` (also `host`, which Envoy compiles too) |
//! | a header match without a name, with a mismatch action other than LOG/ADD/DELETE/REPLACE, with a secret without a name | `validate_l7` (mismatch and secrets are unsupported) |
//! | a Kafka rule with both `role` and `apiKey`, an unknown role or apiKey, an apiVersion not in 0-32767, a topic over 255 characters or of other characters than `[a-zA-Z0-9._-]` | `validate_l7` |
//!
//! Not mirrored: ICMP field checks, `toFQDNs` patterns, DNS port ranges, host-policy L7 limits and
//! the node-selector flag (the features are refused by name first), and newer Cilium's refusal of
//! a rule with no ingress or egress section, which would refuse Cilium's own default-deny example
//! (`egress:` with no rules). Stricter than Cilium: a port with a leading zero (Cilium reads
//! "010" as octal 8), `endPort` below `port`, an empty Kafka topic or clientID.

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
        for (path, from, to) in canonical_field_names(&mut value) {
            // Kubernetes' API server prunes the fields a CRD's schema does not name: stored
            // there, `HTTP` would be lost, not read as `http`.
            diags.push(Diagnostic {
                severity: Severity::Warning,
                message: format!(
                    "`{from}` is read as `{to}`, as Cilium's decoder does; write `{to}`: Kubernetes' API server drops fields it does not know"
                ),
                ..err(&path, String::new())
            });
        }
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
                diags.push(err(&path, with_suggestion(&message)));
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

/// serde's "unknown field `x`, expected one of `a`, `b`" (or "expected `a` or `b`"), with the
/// known field at that place closest to the typo offered first: "did you mean `toPorts`?".
fn with_suggestion(message: &str) -> String {
    let Some((field, expected)) = message.strip_prefix("unknown field `").and_then(|m| m.split_once('`')) else {
        return message.to_string();
    };
    // Backquoted names alternate with the text between them.
    let known: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    match did_you_mean(field, &known) {
        Some(best) => {
            let list = known.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ");
            format!("unknown field `{field}`: did you mean `{best}`? (known here: {list})")
        }
        None => message.to_string(),
    }
}

/// The known name nearest to `typo` (edit distance, case-insensitive), if it is near enough to
/// be what was meant: at most a third of the name's length in edits (at least one).
pub fn did_you_mean<'a>(typo: &str, known: &[&'a str]) -> Option<&'a str> {
    let typo = typo.to_ascii_lowercase();
    known
        .iter()
        .map(|k| (strsim::damerau_levenshtein(&typo, &k.to_ascii_lowercase()), *k))
        .filter(|(d, k)| *d <= (k.len().max(typo.len()) / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
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
    "auth",
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

/// Gives every field name its canonical spelling, as Cilium's decoder reads them; returns each
/// renamed field: (its path as written, the name written, the canonical name).
pub fn canonical_field_names(value: &mut serde_json::Value) -> Vec<(String, String, &'static str)> {
    let mut renamed = Vec::new();
    normalize_field_names(value, false, "", &mut renamed);
    renamed
}

fn normalize_field_names(
    value: &mut serde_json::Value,
    data: bool,
    written: &str,
    renamed: &mut Vec<(String, String, &'static str)>,
) {
    match value {
        serde_json::Value::Object(map) => {
            let mut was: std::collections::HashMap<&'static str, String> = Default::default();
            if !data {
                let renames: Vec<(String, &'static str)> = map
                    .keys()
                    .filter(|k| !FIELD_NAMES.contains(&k.as_str()))
                    .filter_map(|k| FIELD_NAMES.iter().find(|f| f.eq_ignore_ascii_case(k)).map(|f| (k.clone(), *f)))
                    .collect();
                for (from, to) in renames {
                    if !map.contains_key(to) {
                        if let Some(v) = map.remove(&from) {
                            map.insert(to.to_string(), v);
                            renamed.push((join(written, &from), from.clone(), to));
                            was.insert(to, from);
                        }
                    }
                }
            }
            for (k, v) in map.iter_mut() {
                let is_data = data || matches!(k.as_str(), "matchLabels" | "labels" | "annotations" | "metadata");
                let key = was.get(k.as_str()).unwrap_or(k);
                normalize_field_names(v, is_data, &join(written, key), renamed);
            }
        }
        serde_json::Value::Array(items) => {
            for (i, v) in items.iter_mut().enumerate() {
                normalize_field_names(v, data, &format!("{written}[{i}]"), renamed);
            }
        }
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

/// Cilium's `authentication: {mode: required | disabled}` on a rule. `required`: only peers
/// whose identity is proven match (on this node the kernel's, by cgroup; from another node the
/// tunnel's mutual TLS); `disabled`: as without. Cilium's older `auth` is refused by name.
fn validate_authentication(
    authentication: &Option<serde_json::Value>,
    auth: &Option<serde_json::Value>,
    path: &str,
    found: &mut Found,
) {
    unsupported(
        found,
        auth.is_some(),
        path,
        "auth",
        "the pre-1.14 name of `authentication`: write `authentication: {mode: required}`",
    );
    let Some(a) = authentication else { return };
    let at = join(path, "authentication");
    let Some(obj) = a.as_object() else {
        return error(found, at, "authentication must be an object: `{mode: required}` or `{mode: disabled}`");
    };
    for k in obj.keys().filter(|k| k.as_str() != "mode") {
        error(found, join(&at, k), format!("unknown field `{k}` (known here: `mode`)"));
    }
    match obj.get("mode").and_then(serde_json::Value::as_str) {
        Some("required" | "disabled") => {}
        Some(other) => error(
            found,
            join(&at, "mode"),
            format!("authentication mode `{other}` is not supported (`required` or `disabled`)"),
        ),
        None => error(found, join(&at, "mode"), "authentication needs a mode: `required` or `disabled`"),
    }
}

/// True when a rule asks that only peers of proven identity match.
pub fn authentication_required(authentication: &Option<serde_json::Value>) -> bool {
    authentication.as_ref().and_then(|a| a.get("mode")).and_then(serde_json::Value::as_str) == Some("required")
}

fn unsupported(found: &mut Found, present: bool, path: &str, field: &str, what: &str) {
    if present {
        error(found, join(path, field), format!("{field} ({what}) is not supported by l7mesh"));
    }
}

/// How many entries a list field holds, as Go's `len()` counts it (absent or null: 0). Fields
/// kept as raw values (unsupported features) count as one when they are not a list.
fn count<T>(list: &Option<Vec<T>>) -> usize {
    list.as_ref().map_or(0, Vec::len)
}

/// A raw (unsupported) field as Go sees it: set unless absent, null or an empty string.
fn raw_given(value: &Option<serde_json::Value>) -> bool {
    !matches!(value, None | Some(serde_json::Value::Null)) && value.as_ref().and_then(|v| v.as_str()) != Some("")
}

fn count_raw(value: &Option<serde_json::Value>) -> usize {
    match value {
        None | Some(serde_json::Value::Null) => 0,
        Some(serde_json::Value::Array(items)) => items.len(),
        Some(_) => 1,
    }
}

/// Entities l7mesh can enforce on one node.
pub const SUPPORTED_ENTITIES: &[&str] = &["world", "host", "all", "cluster"];
/// Every entity Cilium knows (its `EntitySelectorMapping`).
const KNOWN_ENTITIES: &[&str] = &[
    "world",
    "world-ipv4",
    "world-ipv6",
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

/// Cilium's limit on the ports of one port rule.
pub const MAX_PORTS: usize = 40;

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
    match (&rule.endpoint_selector, &rule.node_selector) {
        (None, None) => error(
            found,
            join(path, "endpointSelector"),
            "missing: a rule must have one of endpointSelector or nodeSelector (the workloads it applies to)",
        ),
        (Some(_), Some(_)) => {
            error(found, join(path, "nodeSelector"), "a rule cannot have both endpointSelector and nodeSelector")
        }
        _ => {}
    }
    unsupported(found, rule.node_selector.is_some(), path, "nodeSelector", "host policies");
    if let Some(sel) = &rule.endpoint_selector {
        validate_selector(sel, &join(path, "endpointSelector"), found);
    }
    for (field, list, deny) in [("ingress", &rule.ingress, false), ("ingressDeny", &rule.ingress_deny, true)] {
        for (i, r) in list.iter().flatten().enumerate() {
            let p = format!("{}[{i}]", join(path, field));
            one_peer_kind(
                &[
                    ("fromEndpoints", count(&r.from_endpoints)),
                    ("fromCIDR", count(&r.from_cidr)),
                    ("fromCIDRSet", count(&r.from_cidr_set)),
                    ("fromEntities", count(&r.from_entities)),
                    ("fromNodes", count_raw(&r.from_nodes)),
                    ("fromGroups", count_raw(&r.from_groups)),
                ],
                &p,
                found,
            );
            unsupported(found, r.from_requires.is_some(), &p, "fromRequires", "requirement-based selection");
            unsupported(found, r.from_groups.is_some(), &p, "fromGroups", "cloud provider groups");
            unsupported(found, r.from_nodes.is_some(), &p, "fromNodes", "node selectors");
            icmps_without_ports(&r.icmps, &r.to_ports, &p, found);
            unsupported(found, r.icmps.is_some(), &p, "icmps", "ICMP rules");
            validate_authentication(&r.authentication, &r.auth, &p, found);
            for (j, s) in r.from_endpoints.iter().flatten().enumerate() {
                validate_selector(s, &format!("{p}.fromEndpoints[{j}]"), found);
            }
            validate_peers_l3(&r.from_cidr, &r.from_cidr_set, &r.from_entities, &p, "from", found);
            validate_ports(&r.to_ports, &p, deny, true, found);
        }
    }
    for (field, list, deny) in [("egress", &rule.egress, false), ("egressDeny", &rule.egress_deny, true)] {
        for (i, r) in list.iter().flatten().enumerate() {
            let p = format!("{}[{i}]", join(path, field));
            let mut kinds = vec![
                ("toCIDR", count(&r.to_cidr)),
                ("toCIDRSet", count(&r.to_cidr_set)),
                ("toEndpoints", count(&r.to_endpoints)),
                ("toEntities", count(&r.to_entities)),
                ("toServices", count_raw(&r.to_services)),
                ("toGroups", count_raw(&r.to_groups)),
                ("toNodes", count_raw(&r.to_nodes)),
            ];
            if !deny {
                // Cilium's egressDeny has no toFQDNs at all.
                kinds.push(("toFQDNs", count_raw(&r.to_fqdns)));
            }
            one_peer_kind(&kinds, &p, found);
            unsupported(found, r.to_requires.is_some(), &p, "toRequires", "requirement-based selection");
            unsupported(found, r.to_services.is_some(), &p, "toServices", "Kubernetes services");
            unsupported(found, r.to_fqdns.is_some(), &p, "toFQDNs", "DNS-based policy");
            unsupported(found, r.to_groups.is_some(), &p, "toGroups", "cloud provider groups");
            unsupported(found, r.to_nodes.is_some(), &p, "toNodes", "node selectors");
            icmps_without_ports(&r.icmps, &r.to_ports, &p, found);
            unsupported(found, r.icmps.is_some(), &p, "icmps", "ICMP rules");
            validate_authentication(&r.authentication, &r.auth, &p, found);
            for (j, s) in r.to_endpoints.iter().flatten().enumerate() {
                validate_selector(s, &format!("{p}.toEndpoints[{j}]"), found);
            }
            validate_peers_l3(&r.to_cidr, &r.to_cidr_set, &r.to_entities, &p, "to", found);
            validate_ports(&r.to_ports, &p, deny, false, found);
        }
    }
}

/// Cilium selects peers of one kind per rule: `fromEndpoints` next to `fromCIDR` is refused,
/// not combined (neither as "and" nor as "or"). The error sits on the second kind.
fn one_peer_kind(kinds: &[(&str, usize)], path: &str, found: &mut Found) {
    let present: Vec<&str> = kinds.iter().filter(|(_, n)| *n > 0).map(|(k, _)| *k).collect();
    if let [first, second, ..] = present.as_slice() {
        error(
            found,
            join(path, second),
            format!("combining {first} and {second} is not supported (Cilium refuses it too): write one rule per kind of peer"),
        );
    }
}

fn icmps_without_ports(
    icmps: &Option<serde_json::Value>,
    ports: &Option<Vec<PortRule>>,
    path: &str,
    found: &mut Found,
) {
    if count_raw(icmps) > 0 && count(ports) > 0 {
        error(
            found,
            join(path, "icmps"),
            "the icmps block may only be present without toPorts; define a separate rule to use toPorts",
        );
    }
}

fn validate_selector(sel: &Selector, path: &str, found: &mut Found) {
    for (i, e) in sel.match_expressions.iter().flatten().enumerate() {
        let p = format!("{path}.matchExpressions[{i}]");
        if let Err(why) = label_key(&e.key) {
            error(found, join(&p, "key"), format!("invalid label selector: key `{}`: {why}", e.key));
        }
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
        for (j, v) in e.values.iter().enumerate() {
            if let Err(why) = label_value(v) {
                error(found, format!("{p}.values[{j}]"), format!("invalid label selector: value `{v}`: {why}"));
            }
        }
    }
    for (key, value) in sel.match_labels.iter().flatten() {
        let p = join(&join(path, "matchLabels"), key);
        if let Err(why) = label_key(key) {
            error(found, p.clone(), format!("invalid label selector: key `{key}`: {why}"));
        }
        if let Err(why) = label_value(value) {
            error(found, p.clone(), format!("invalid label selector: value `{value}`: {why}"));
        }
        if let (Some("reserved"), name) = crate::labels::split_source(key) {
            if !["host", "world"].contains(&name) {
                error(found, p, format!("reserved label `{name}` is not supported (host, world)"));
            }
        }
    }
}

/// The name part of a Kubernetes label key, or a label value (non-empty): at most 63 of
/// [A-Za-z0-9-_.], starting and ending alphanumeric.
fn label_name(s: &str) -> Result<(), String> {
    if s.len() > 63 {
        return Err(format!("must be no more than 63 characters (it has {})", s.len()));
    }
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !alnum(s.chars().next())
        || !alnum(s.chars().last())
        || !s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(
            "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"
                .into(),
        );
    }
    Ok(())
}

/// A selector key as Kubernetes validates it (`[prefix/]name`), after Cilium's label source
/// (`k8s:`, `any:`, ...), which Cilium turns into part of the prefix before validating.
fn label_key(key: &str) -> Result<(), String> {
    let (_, key) = crate::labels::split_source(key);
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        if prefix.is_empty() || !is_dns_subdomain(prefix) {
            return Err(format!("prefix `{prefix}` must be a lowercase DNS subdomain (e.g. example.com)"));
        }
    }
    if name.is_empty() {
        return Err("name part must not be empty".into());
    }
    label_name(name).map_err(|e| format!("name part {e}"))
}

fn label_value(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Ok(());
    }
    label_name(value)
}

/// Selector operators, as Cilium reads them (it lower-cases them: `in` is `In`).
pub fn canonical_operator(op: &str) -> Option<&'static str> {
    ["In", "NotIn", "Exists", "DoesNotExist"].into_iter().find(|o| o.eq_ignore_ascii_case(op))
}

/// Parses a CIDR as Cilium accepts it in `toCIDR`/`fromCIDR`: a prefix, or a bare address
/// meaning a host prefix.
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    if s.is_empty() {
        return Err("IP must be specified".into());
    }
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net);
    }
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    Err(format!("unable to parse CIDR `{s}` (e.g. 10.0.0.0/8, 2001:db8::/32 or an address)"))
}

/// A CIDR as Cilium accepts it in a `CIDRSet` (`cidr` and `except`): prefix notation only.
pub fn parse_prefix(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>().map_err(|_| {
        if s.parse::<std::net::IpAddr>().is_ok() {
            format!("unable to parse CIDR prefix `{s}`: no '/' (in a CIDR set write a prefix, e.g. {s}/32)")
        } else {
            format!("unable to parse CIDR prefix `{s}` (e.g. 10.0.0.0/8 or 2001:db8::/32)")
        }
    })
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
        let given = [
            set.cidr.as_deref().is_some_and(|c| !c.is_empty()),
            raw_given(&set.cidr_group_ref),
            raw_given(&set.cidr_group_selector),
        ];
        match given.iter().filter(|g| **g).count() {
            0 => {
                error(found, join(&p, "cidr"), "missing: one of cidr, cidrGroupRef or cidrGroupSelector is required");
                continue;
            }
            1 => {}
            _ => error(found, p.clone(), "more than one of cidr, cidrGroupRef or cidrGroupSelector may not be set"),
        }
        unsupported(found, set.cidr_group_ref.is_some(), &p, "cidrGroupRef", "CiliumCIDRGroup references");
        unsupported(found, set.cidr_group_selector.is_some(), &p, "cidrGroupSelector", "CiliumCIDRGroup selectors");
        let Some(cidr) = set.cidr.as_deref().filter(|c| !c.is_empty()) else { continue };
        let net = match parse_prefix(cidr) {
            Ok(n) => n,
            Err(e) => {
                error(found, join(&p, "cidr"), e);
                continue;
            }
        };
        for (j, ex) in set.except.iter().enumerate() {
            match parse_prefix(ex) {
                // Same family, and no shorter than the allowed prefix.
                Ok(e) if !net.contains(&e) => error(
                    found,
                    format!("{p}.except[{j}]"),
                    format!("allow CIDR prefix {cidr} does not contain exclude CIDR prefix {ex}"),
                ),
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
            error(found, p, format!("unsupported entity: `{e}` (supported: {})", SUPPORTED_ENTITIES.join(", ")));
        }
    }
}

/// An IANA service name (RFC 6335), which Cilium takes as a named port: 1-15 of [a-z0-9-],
/// at least one letter, no leading, trailing or double '-'.
fn is_service_name(s: &str) -> bool {
    let s = s.to_ascii_lowercase();
    (1..=15).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

/// A port rule's ports, parsed: (first, last, protocols). Port "0" means every port.
pub fn parse_port(p: &PortProtocol) -> Result<(u16, u16, Vec<&'static str>), (String, String)> {
    let protocols: Vec<&'static str> = match p.protocol.as_deref().unwrap_or("ANY") {
        "TCP" => vec!["TCP"],
        "UDP" => vec!["UDP"],
        "ANY" => vec!["TCP", "UDP"],
        "SCTP" => return Err(("protocol".into(), "protocol SCTP is not supported by l7mesh".into())),
        other => return Err(("protocol".into(), format!("invalid protocol `{other}`, must be TCP, UDP or ANY"))),
    };
    if p.port.is_empty() {
        return Err(("port".into(), "port must be specified (\"0\" means every port)".into()));
    }
    if is_service_name(&p.port) {
        return Err(("port".into(), format!("named port `{}` is not supported by l7mesh (use a number)", p.port)));
    }
    if p.port.len() > 1 && p.port.starts_with('0') {
        // Cilium parses ports as Go integer literals: "010" is octal 8 there.
        return Err((
            "port".into(),
            format!("unable to parse port `{}`: a leading 0 makes it octal in Cilium; write it without", p.port),
        ));
    }
    let port: u32 = match p.port.parse() {
        Ok(n) => n,
        Err(_) => return Err(("port".into(), format!("unable to parse port `{}`: not a port number", p.port))),
    };
    if port > 65535 {
        return Err(("port".into(), format!("port {port} is out of range (1-65535)")));
    }
    if port == 0 {
        if p.end_port.is_some_and(|e| e != 0) {
            return Err(("endPort".into(), "endPort needs a port".into()));
        }
        return Ok((0, 65535, protocols));
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

/// Cilium's `L7Rules.IsEmpty`: no kind of L7 rule given (an empty list is given).
fn has_l7_rules(rules: &Option<L7Rules>) -> bool {
    rules.as_ref().is_some_and(|r| {
        r.http.is_some()
            || r.kafka.is_some()
            || r.grpc.is_some()
            || r.dns.is_some()
            || r.l7.is_some()
            || r.l7proto.is_some()
    })
}

fn validate_ports(ports: &Option<Vec<PortRule>>, path: &str, deny: bool, ingress: bool, found: &mut Found) {
    for (i, pr) in ports.iter().flatten().enumerate() {
        let p = format!("{path}.toPorts[{i}]");
        let l7_rules = has_l7_rules(&pr.rules);
        let dns_rules = pr.rules.as_ref().is_some_and(|r| count_raw(&r.dns) > 0);
        if ingress && dns_rules {
            error(found, join(&p, "rules.dns"), "DNS rules are not allowed on ingress");
        }
        unsupported(found, pr.listener.is_some(), &p, "listener", "custom Envoy listeners");
        if pr.listener.is_some() && ingress {
            error(found, join(&p, "listener"), "listener is not allowed on ingress");
        }
        if pr.listener.is_some() && l7_rules {
            error(found, join(&p, "listener"), "listener is not allowed with L7 rules");
        }
        if pr.server_names.as_ref().is_some_and(|s| !s.is_empty())
            && l7_rules
            && pr.terminating_tls.is_none()
            && pr.originating_tls.is_none()
        {
            // Cilium requires terminatingTLS; l7mesh also reads originatingTLS's serverNames
            // as the name the upstream is verified as (the client speaks plain text).
            error(
                found,
                join(&p, "serverNames"),
                "serverNames are not allowed with L7 rules without TLS termination (terminatingTLS) or origination (originatingTLS): the proxy cannot read requests inside TLS it does not terminate",
            );
        }
        if pr.ports.len() > MAX_PORTS {
            error(found, join(&p, "ports"), format!("too many ports ({}), the max is {MAX_PORTS}", pr.ports.len()));
        }
        let mut tcp_only_ok = true;
        for (j, port) in pr.ports.iter().enumerate() {
            let pp = format!("{p}.ports[{j}]");
            match parse_port(port) {
                Ok((lo, _, protos)) => {
                    if protos == ["UDP"] {
                        tcp_only_ok = false;
                    }
                    if l7_rules && !dns_rules && !deny {
                        if protos != ["TCP"] {
                            let what = match port.protocol.as_deref() {
                                Some(proto) => proto.to_string(),
                                None => "ANY, the protocol when none is given".to_string(),
                            };
                            error(
                                found,
                                join(&pp, "protocol"),
                                format!("L7 rules can only apply to TCP (not {what}); set `protocol: TCP`"),
                            );
                        }
                        if lo == 0 {
                            error(found, join(&pp, "port"), "L7 rules can not be used when a port is 0 (every port)");
                        }
                    }
                }
                Err((field, message)) => error(found, join(&pp, &field), message),
            }
        }
        let tls_or_names = pr.terminating_tls.is_some() || pr.originating_tls.is_some() || pr.server_names.is_some();
        if deny && (pr.rules.is_some() || tls_or_names) {
            // Cilium's deny port rules have no such fields.
            error(found, p.clone(), "deny rules cannot carry L7 rules, TLS settings or serverNames");
            continue;
        }
        // (L7 rules on UDP are refused port by port above; `rules: {}` is no L7 rule, as in Cilium.)
        if tls_or_names && !tcp_only_ok {
            error(found, p.clone(), "TLS settings and serverNames apply to TCP; this port rule is UDP only");
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
            if name.is_empty() {
                error(found, format!("{p}.serverNames[{j}]"), "empty server name is not allowed");
            } else if !is_server_name(name) {
                error(found, format!("{p}.serverNames[{j}]"), format!("`{name}` is not a DNS name or `*.`-wildcard"));
            }
        }
    }
}

/// Why `pattern` is not a regex, said about the pattern as written: its own syntax first
/// (alone, so that `a)|(b`, which parses once wrapped as `^(?:a)|(b)$`, is refused and never
/// widened), then the whole-value form the proxy compiles.
pub fn regex_problem(pattern: &str) -> Option<String> {
    if let Err(e) = regex_syntax::Parser::new().parse(pattern) {
        let (kind, span) = match &e {
            regex_syntax::Error::Parse(e) => (e.kind().to_string(), *e.span()),
            regex_syntax::Error::Translate(e) => (e.kind().to_string(), *e.span()),
            other => (other.to_string(), regex_syntax::ast::Span::splat(regex_syntax::ast::Position::new(0, 1, 1))),
        };
        let at = pattern[..span.start.offset.min(pattern.len())].chars().count() + 1;
        return Some(format!("invalid regex `{pattern}`: {kind} (at character {at})"));
    }
    match regex::Regex::new(&format!("^(?:{pattern})$")) {
        Ok(_) => None,
        Err(regex::Error::CompiledTooBig(limit)) => {
            Some(format!("invalid regex `{pattern}`: it compiles to more than the {limit}-byte limit"))
        }
        Err(e) => Some(format!("invalid regex `{pattern}`: {}", e.to_string().lines().last().unwrap_or_default())),
    }
}

/// Compiles a policy regex as Envoy matches it: against the whole value.
pub fn whole_value_regex(pattern: &str) -> Result<regex::Regex, String> {
    if let Some(problem) = regex_problem(pattern) {
        return Err(problem);
    }
    regex::Regex::new(&format!("^(?:{pattern})$")).map_err(|e| format!("invalid regex `{pattern}`: {e}"))
}

pub const KAFKA_ROLES: &[&str] = &["produce", "consume"];
const HEADER_ACTIONS: &[&str] = &["LOG", "ADD", "DELETE", "REPLACE"];

fn validate_l7(rules: &L7Rules, path: &str, found: &mut Found) {
    unsupported(found, rules.dns.is_some(), path, "dns", "DNS proxy rules");
    unsupported(found, rules.l7proto.is_some(), path, "l7proto", "generic L7 parsers");
    unsupported(found, rules.l7.is_some(), path, "l7", "generic L7 parsers");
    let l7proto_given = rules.l7proto.as_ref().is_some_and(|v| !v.is_null() && v.as_str() != Some(""));
    if rules.l7.is_some() && !l7proto_given {
        error(found, join(path, "l7"), "'l7' may only be specified when a 'l7proto' is also specified");
    }
    let kinds: Vec<&str> = [
        ("http", rules.http.is_some()),
        ("kafka", rules.kafka.is_some()),
        ("grpc", rules.grpc.is_some()),
        ("dns", rules.dns.is_some()),
        ("l7proto", l7proto_given),
    ]
    .iter()
    .filter(|(_, given)| *given)
    .map(|(k, _)| *k)
    .collect();
    if kinds.len() > 1 {
        error(
            found,
            path.to_string(),
            format!(
                "multiple L7 protocol rule types specified in single rule ({}): one port rule takes one kind",
                kinds.join(", ")
            ),
        );
    }
    for (i, h) in rules.http.iter().flatten().enumerate() {
        let p = format!("{path}.http[{i}]");
        for (field, value) in [("method", &h.method), ("path", &h.path), ("host", &h.host)] {
            if let Some(problem) = value.as_deref().and_then(regex_problem) {
                error(found, join(&p, field), problem);
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
                error(found, join(&mp, "name"), "header name missing");
            }
            match m.mismatch.as_deref() {
                Some(action) if !action.is_empty() && !HEADER_ACTIONS.contains(&action) => error(
                    found,
                    join(&mp, "mismatch"),
                    format!("invalid header action `{action}` (LOG, ADD, DELETE, REPLACE)"),
                ),
                _ => unsupported(found, m.mismatch.is_some(), &mp, "mismatch", "header rewriting on mismatch"),
            }
            if let Some(secret) = &m.secret {
                if secret.get("name").and_then(|n| n.as_str()).is_none_or(str::is_empty) {
                    error(found, join(&mp, "secret.name"), "secret name missing");
                }
            }
            unsupported(found, m.secret.is_some(), &mp, "secret", "header values from secrets");
        }
    }
    for (i, k) in rules.kafka.iter().flatten().enumerate() {
        let p = format!("{path}.kafka[{i}]");
        if let Some(role) = &k.role {
            if !KAFKA_ROLES.contains(&role.to_ascii_lowercase().as_str()) {
                error(found, join(&p, "role"), format!("invalid Kafka role `{role}` (produce, consume)"));
            }
            if let Some(key) = &k.api_key {
                error(found, join(&p, "apiKey"), format!("cannot set both role `{role}` and apiKey `{key}` together"));
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
            if t.len() > 255 {
                error(found, join(&p, "topic"), format!("Kafka topic exceeds maximum length of 255 ({})", t.len()));
            } else if t.is_empty() || !t.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
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
        let text = format!("{HEAD}  ingress:\n  - toPorts:\n    - ports:\n      - port: \"80\"\n        protocol: TCP\n      rules:\n        http:\n        - path: /ok\n        - path: \"/v1/(unclosed\"\n");
        let e = errors(&text);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with(
                "p.yaml:17: error: spec.ingress[0].toPorts[0].rules.http[1].path: invalid regex `/v1/(unclosed`: unclosed group (at character 5)"
            ),
            "{}",
            e[0]
        );
        // The pattern as written, never the anchored form the proxy compiles.
        assert!(!e[0].contains("^(?:"), "{}", e[0]);
    }

    #[test]
    fn kafka_api_keys_come_from_the_one_table() {
        let rules = |keys: &[&str]| {
            let list: String = keys.iter().map(|k| format!("        - apiKey: {k}\n          topic: t\n")).collect();
            format!("{HEAD}  egress:\n  - toPorts:\n    - ports:\n      - port: \"9092\"\n        protocol: TCP\n      rules:\n        kafka:\n{list}")
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
                "p.yaml:18: error: spec.egress[0].toPorts[0].rules.kafka[1].apiKey: unknown Kafka apiKey `deletetopic`"
            ),
            "{e:?}"
        );
        assert!(
            e[1].starts_with(
                "p.yaml:20: error: spec.egress[0].toPorts[0].rules.kafka[2].apiKey: unknown Kafka apiKey `*`"
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
    fn authentication_required_or_disabled_is_taken_and_anything_else_is_refused() {
        let ok = format!("{HEAD}  ingress:\n  - fromEntities: [all]\n    authentication:\n      mode: required\n");
        assert!(errors(&ok).is_empty(), "{:?}", errors(&ok));
        let disabled = ok.replace("required", "disabled");
        assert!(errors(&disabled).is_empty());
        let bad = ok.replace("required", "test-always-fail");
        assert!(
            errors(&bad).join("\n").contains(
                "spec.ingress[0].authentication.mode: authentication mode `test-always-fail` is not supported"
            ),
            "{:?}",
            errors(&bad)
        );
        let extra = format!(
            "{HEAD}  egress:\n  - toEntities: [all]\n    authentication:\n      mode: required\n      spire: true\n"
        );
        assert!(
            errors(&extra).join("\n").contains("spec.egress[0].authentication.spire: unknown field"),
            "{:?}",
            errors(&extra)
        );
        let old = format!("{HEAD}  egress:\n  - toEntities: [all]\n    auth:\n      type: spire\n");
        assert!(
            errors(&old).join("\n").contains("spec.egress[0].auth: auth (the pre-1.14 name of `authentication`"),
            "{:?}",
            errors(&old)
        );
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

    const DOC: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: p\nspec:\n";
    const SEL: &str = "  endpointSelector: {matchLabels: {app: web}}\n";

    /// One of Cilium's checks: a rule it refuses and the error it gets here, and a near miss
    /// Cilium accepts, which must not get that error (and loads unless `near_loads` is false:
    /// the near miss then uses a feature l7mesh refuses by name).
    struct Check {
        what: &'static str,
        refused: String,
        path: &'static str,
        message: &'static str,
        near: String,
        near_loads: bool,
    }

    fn check(what: &'static str, refused: &str, path: &'static str, message: &'static str, near: &str) -> Check {
        Check { what, refused: refused.into(), path, message, near: near.into(), near_loads: true }
    }

    fn check_unsupported_near(
        what: &'static str,
        refused: &str,
        path: &'static str,
        message: &'static str,
        near: &str,
    ) -> Check {
        Check { near_loads: false, ..check(what, refused, path, message, near) }
    }

    /// A document: the fragment after `spec:`, with the endpoint selector in front unless it
    /// names its own (`!` in front: no selector at all).
    fn doc(fragment: &str) -> String {
        match fragment.strip_prefix('!') {
            Some(rest) => format!("{DOC}{rest}"),
            None => format!("{DOC}{SEL}{fragment}"),
        }
    }

    fn port_rule(direction: &str, rule: &str) -> String {
        format!("  {direction}:\n  - toPorts:\n    - {rule}\n")
    }

    fn http_on(ports: &str) -> String {
        port_rule("egress", &format!("{{ports: [{ports}], rules: {{http: [{{method: GET}}]}}}}"))
    }

    fn many_ports(n: usize) -> String {
        (0..n).map(|i| format!("{{port: \"{}\", protocol: TCP}}", 1000 + i)).collect::<Vec<_>>().join(", ")
    }

    fn cilium_checks() -> Vec<Check> {
        let tcp80 = "{port: \"80\", protocol: TCP}";
        let kafka = |rule: &str| {
            port_rule("egress", &format!("{{ports: [{{port: \"9092\", protocol: TCP}}], rules: {{kafka: [{rule}]}}}}"))
        };
        let header_match = |m: &str| {
            port_rule("egress", &format!("{{ports: [{tcp80}], rules: {{http: [{{headerMatches: [{m}]}}]}}}}"))
        };
        let cidr_set = |set: &str| format!("  egress:\n  - toCIDRSet: [{set}]\n");
        vec![
            // Rule.Validate / Sanitize
            check(
                "neither endpointSelector nor nodeSelector",
                "!  ingress:\n  - {}\n",
                "spec.endpointSelector",
                "missing: a rule must have one of endpointSelector or nodeSelector",
                "!  endpointSelector: {}\n  ingress:\n  - {}\n",
            ),
            check(
                "both endpointSelector and nodeSelector",
                "!  endpointSelector: {}\n  nodeSelector: {}\n  ingress:\n  - {}\n",
                "spec.nodeSelector",
                "a rule cannot have both endpointSelector and nodeSelector",
                "!  endpointSelector: {}\n  ingress:\n  - {}\n",
            ),
            // EndpointSelector.Sanitize: Kubernetes' label selector validation
            check(
                "In without values",
                "  ingress:\n  - fromEndpoints: [{matchExpressions: [{key: app, operator: In}]}]\n",
                "spec.ingress[0].fromEndpoints[0].matchExpressions[0].values",
                "operator In needs at least one value",
                "  ingress:\n  - fromEndpoints: [{matchExpressions: [{key: app, operator: In, values: [a]}]}]\n",
            ),
            check(
                "Exists with values",
                "  ingress:\n  - fromEndpoints: [{matchExpressions: [{key: app, operator: Exists, values: [a]}]}]\n",
                "spec.ingress[0].fromEndpoints[0].matchExpressions[0].values",
                "operator Exists takes no values",
                "  ingress:\n  - fromEndpoints: [{matchExpressions: [{key: app, operator: Exists}]}]\n",
            ),
            check(
                "unknown operator",
                "  ingress:\n  - fromEndpoints: [{matchExpressions: [{key: app, operator: Equals, values: [a]}]}]\n",
                "spec.ingress[0].fromEndpoints[0].matchExpressions[0].operator",
                "unknown operator `Equals`",
                "  ingress:\n  - fromEndpoints: [{matchExpressions: [{key: app, operator: notin, values: [a]}]}]\n",
            ),
            check(
                "invalid label key",
                "  ingress:\n  - fromEndpoints: [{matchLabels: {\"bad key\": x}}]\n",
                "spec.ingress[0].fromEndpoints[0].matchLabels.bad key",
                "invalid label selector: key `bad key`",
                "  ingress:\n  - fromEndpoints: [{matchLabels: {\"k8s:app.kubernetes.io/name\": x}}]\n",
            ),
            check(
                "invalid label key prefix",
                "  ingress:\n  - fromEndpoints: [{matchExpressions: [{key: \"Example.COM/app\", operator: Exists}]}]\n",
                "spec.ingress[0].fromEndpoints[0].matchExpressions[0].key",
                "invalid label selector: key `Example.COM/app`: prefix",
                "  ingress:\n  - fromEndpoints: [{matchExpressions: [{key: \"example.com/App_1\", operator: Exists}]}]\n",
            ),
            check(
                "invalid label value",
                "  ingress:\n  - fromEndpoints: [{matchLabels: {app: \"a b\"}}]\n",
                "spec.ingress[0].fromEndpoints[0].matchLabels.app",
                "invalid label selector: value `a b`",
                "  ingress:\n  - fromEndpoints: [{matchLabels: {app: \"\"}}]\n",
            ),
            check(
                "invalid label value in an expression",
                "  ingress:\n  - fromEndpoints: [{matchExpressions: [{key: app, operator: In, values: [\"-a\"]}]}]\n",
                "spec.ingress[0].fromEndpoints[0].matchExpressions[0].values[0]",
                "invalid label selector: value `-a`",
                "  ingress:\n  - fromEndpoints: [{matchExpressions: [{key: app, operator: In, values: [a-1.b_c]}]}]\n",
            ),
            // IngressCommonRule / EgressCommonRule: one kind of peer per rule
            check(
                "fromEndpoints with fromCIDR",
                "  ingress:\n  - fromEndpoints: [{}]\n    fromCIDR: [10.0.0.0/8]\n",
                "spec.ingress[0].fromCIDR",
                "combining fromEndpoints and fromCIDR is not supported",
                "  ingress:\n  - fromEndpoints: [{}]\n  - fromCIDR: [10.0.0.0/8]\n",
            ),
            check(
                "fromCIDR with fromCIDRSet",
                "  ingressDeny:\n  - fromCIDR: [10.0.0.0/8]\n    fromCIDRSet: [{cidr: 11.0.0.0/8}]\n",
                "spec.ingressDeny[0].fromCIDRSet",
                "combining fromCIDR and fromCIDRSet is not supported",
                "  ingressDeny:\n  - fromCIDR: [10.0.0.0/8]\n    fromCIDRSet: []\n",
            ),
            check(
                "toCIDR with toEntities",
                "  egress:\n  - toCIDR: [10.0.0.0/8]\n    toEntities: [world]\n",
                "spec.egress[0].toEntities",
                "combining toCIDR and toEntities is not supported",
                "  egress:\n  - toCIDRSet: []\n    toEntities: [world]\n",
            ),
            check_unsupported_near(
                "toEndpoints with toFQDNs",
                "  egress:\n  - toEndpoints: [{}]\n    toFQDNs: [{matchName: example.com}]\n",
                "spec.egress[0].toFQDNs",
                "combining toEndpoints and toFQDNs is not supported",
                "  egress:\n  - toEndpoints: [{}]\n  - toFQDNs: [{matchName: example.com}]\n",
            ),
            check_unsupported_near(
                "icmps with toPorts",
                &format!("  egress:\n  - icmps: [{{fields: [{{type: 8}}]}}]\n    toPorts: [{{ports: [{tcp80}]}}]\n"),
                "spec.egress[0].icmps",
                "the icmps block may only be present without toPorts",
                &format!("  egress:\n  - icmps: [{{fields: [{{type: 8}}]}}]\n  - toPorts: [{{ports: [{tcp80}]}}]\n"),
            ),
            check(
                "unknown entity",
                "  egress:\n  - toEntities: [everything]\n",
                "spec.egress[0].toEntities[0]",
                "unsupported entity: `everything`",
                "  egress:\n  - toEntities: [world]\n",
            ),
            // CIDR.Validate and CIDRRule.Validate
            check(
                "empty CIDR",
                "  egress:\n  - toCIDR: [\"\"]\n",
                "spec.egress[0].toCIDR[0]",
                "IP must be specified",
                "  egress:\n  - toCIDR: [10.0.0.1]\n",
            ),
            check(
                "CIDR that does not parse",
                "  egress:\n  - toCIDR: [10.0.0.0/33]\n",
                "spec.egress[0].toCIDR[0]",
                "unable to parse CIDR `10.0.0.0/33`",
                "  egress:\n  - toCIDR: [10.0.0.0/32]\n",
            ),
            check(
                "CIDR set with a bare address",
                &cidr_set("{cidr: 10.0.0.1}"),
                "spec.egress[0].toCIDRSet[0].cidr",
                "unable to parse CIDR prefix `10.0.0.1`: no '/'",
                &cidr_set("{cidr: 10.0.0.1/32}"),
            ),
            check(
                "except outside the CIDR",
                &cidr_set("{cidr: 10.0.0.0/8, except: [11.0.0.0/16]}"),
                "spec.egress[0].toCIDRSet[0].except[0]",
                "allow CIDR prefix 10.0.0.0/8 does not contain exclude CIDR prefix 11.0.0.0/16",
                &cidr_set("{cidr: 10.0.0.0/8, except: [10.1.0.0/16]}"),
            ),
            check(
                "except wider than the CIDR",
                &cidr_set("{cidr: 10.0.0.0/16, except: [10.0.0.0/8]}"),
                "spec.egress[0].toCIDRSet[0].except[0]",
                "does not contain exclude CIDR prefix 10.0.0.0/8",
                &cidr_set("{cidr: 10.0.0.0/16, except: [10.0.0.0/16]}"),
            ),
            check(
                "except of the other family",
                &cidr_set("{cidr: 10.0.0.0/8, except: [\"::/64\"]}"),
                "spec.egress[0].toCIDRSet[0].except[0]",
                "does not contain exclude CIDR prefix ::/64",
                &cidr_set("{cidr: \"2001:db8::/32\", except: [\"2001:db8::/64\"]}"),
            ),
            check(
                "except as a bare address",
                &cidr_set("{cidr: 10.0.0.0/8, except: [10.0.0.1]}"),
                "spec.egress[0].toCIDRSet[0].except[0]",
                "unable to parse CIDR prefix `10.0.0.1`",
                &cidr_set("{cidr: 10.0.0.0/8, except: [10.0.0.1/32]}"),
            ),
            check(
                "CIDR set with none of cidr, cidrGroupRef, cidrGroupSelector",
                &cidr_set("{except: [10.0.0.0/16]}"),
                "spec.egress[0].toCIDRSet[0].cidr",
                "missing: one of cidr, cidrGroupRef or cidrGroupSelector is required",
                &cidr_set("{cidr: 10.0.0.0/8, except: [10.0.0.0/16]}"),
            ),
            check_unsupported_near(
                "CIDR set with both cidr and cidrGroupRef",
                &cidr_set("{cidr: 10.0.0.0/8, cidrGroupRef: group}"),
                "spec.egress[0].toCIDRSet[0]",
                "more than one of cidr, cidrGroupRef or cidrGroupSelector may not be set",
                &cidr_set("{cidrGroupRef: group}"),
            ),
            // PortRule.Validate
            check_unsupported_near(
                "DNS rules on ingress",
                &port_rule("ingress", "{ports: [{port: \"53\", protocol: UDP}], rules: {dns: [{matchPattern: \"*\"}]}}"),
                "spec.ingress[0].toPorts[0].rules.dns",
                "DNS rules are not allowed on ingress",
                &port_rule("egress", "{ports: [{port: \"53\", protocol: UDP}], rules: {dns: [{matchPattern: \"*\"}]}}"),
            ),
            check(
                "serverNames with L7 rules and no TLS termination",
                &port_rule(
                    "egress",
                    "{ports: [{port: \"443\", protocol: TCP}], serverNames: [a.example], rules: {http: [{method: GET}]}}",
                ),
                "spec.egress[0].toPorts[0].serverNames",
                "serverNames are not allowed with L7 rules without TLS termination",
                &port_rule(
                    "egress",
                    "{ports: [{port: \"443\", protocol: TCP}], serverNames: [a.example], terminatingTLS: {}, rules: {http: [{method: GET}]}}",
                ),
            ),
            check(
                "empty server name",
                &port_rule("egress", "{ports: [{port: \"443\", protocol: TCP}], serverNames: [\"\"]}"),
                "spec.egress[0].toPorts[0].serverNames[0]",
                "empty server name is not allowed",
                &port_rule("egress", "{ports: [{port: \"443\", protocol: TCP}], serverNames: [a.example]}"),
            ),
            check(
                "too many ports",
                &port_rule("egress", &format!("{{ports: [{}]}}", many_ports(MAX_PORTS + 1))),
                "spec.egress[0].toPorts[0].ports",
                "too many ports (41), the max is 40",
                &port_rule("egress", &format!("{{ports: [{}]}}", many_ports(MAX_PORTS))),
            ),
            check(
                "too many ports in a deny rule",
                &port_rule("egressDeny", &format!("{{ports: [{}]}}", many_ports(MAX_PORTS + 1))),
                "spec.egressDeny[0].toPorts[0].ports",
                "too many ports (41), the max is 40",
                &port_rule("egressDeny", &format!("{{ports: [{}]}}", many_ports(MAX_PORTS))),
            ),
            check_unsupported_near(
                "listener on ingress",
                &port_rule("ingress", "{ports: [{port: \"80\", protocol: TCP}], listener: {envoyConfig: {kind: CiliumEnvoyConfig, name: x}, name: l}}"),
                "spec.ingress[0].toPorts[0].listener",
                "listener is not allowed on ingress",
                &port_rule("egress", "{ports: [{port: \"80\", protocol: TCP}], listener: {envoyConfig: {kind: CiliumEnvoyConfig, name: x}, name: l}}"),
            ),
            check_unsupported_near(
                "listener with L7 rules",
                &port_rule("egress", "{ports: [{port: \"80\", protocol: TCP}], listener: {name: l}, rules: {http: [{}]}}"),
                "spec.egress[0].toPorts[0].listener",
                "listener is not allowed with L7 rules",
                &port_rule("egress", "{ports: [{port: \"80\", protocol: TCP}], listener: {name: l}}"),
            ),
            check(
                "L7 rules on protocol ANY",
                &http_on("{port: \"80\", protocol: ANY}"),
                "spec.egress[0].toPorts[0].ports[0].protocol",
                "L7 rules can only apply to TCP (not ANY)",
                &http_on(tcp80),
            ),
            check(
                "L7 rules without a protocol",
                &http_on("{port: \"80\"}"),
                "spec.egress[0].toPorts[0].ports[0].protocol",
                "L7 rules can only apply to TCP (not ANY, the protocol when none is given)",
                &port_rule("egress", "{ports: [{port: \"80\"}]}"),
            ),
            check(
                "L7 rules on UDP",
                &http_on("{port: \"80\", protocol: TCP}, {port: \"80\", protocol: UDP}"),
                "spec.egress[0].toPorts[0].ports[1].protocol",
                "L7 rules can only apply to TCP (not UDP)",
                &http_on("{port: \"80\", protocol: TCP}, {port: \"81\", protocol: TCP}"),
            ),
            check(
                "L7 rules on UDP, empty rules are none",
                &port_rule("egress", "{ports: [{port: \"53\", protocol: UDP}], rules: {http: []}}"),
                "spec.egress[0].toPorts[0].ports[0].protocol",
                "L7 rules can only apply to TCP (not UDP)",
                &port_rule("egress", "{ports: [{port: \"53\", protocol: UDP}], rules: {}}"),
            ),
            check(
                "L7 rules on port 0",
                &http_on("{port: \"0\", protocol: TCP}"),
                "spec.egress[0].toPorts[0].ports[0].port",
                "L7 rules can not be used when a port is 0",
                &port_rule("egress", "{ports: [{port: \"0\", protocol: TCP}]}"),
            ),
            // PortProtocol.Validate
            check(
                "port not given",
                &port_rule("egress", "{ports: [{protocol: TCP}]}"),
                "spec.egress[0].toPorts[0].ports[0].port",
                "port must be specified",
                &port_rule("egress", "{ports: [{port: \"0\", protocol: TCP}]}"),
            ),
            check(
                "port that does not parse",
                &port_rule("egress", "{ports: [{port: \"1_000\", protocol: TCP}]}"),
                "spec.egress[0].toPorts[0].ports[0].port",
                "unable to parse port `1_000`",
                &port_rule("egress", "{ports: [{port: \"1000\", protocol: TCP}]}"),
            ),
            check(
                "port beyond 16 bits",
                &port_rule("egress", "{ports: [{port: 65536, protocol: TCP}]}"),
                "spec.egress[0].toPorts[0].ports[0].port",
                "port 65536 is out of range",
                &port_rule("egress", "{ports: [{port: 65535, protocol: TCP}]}"),
            ),
            check(
                "invalid protocol",
                &port_rule("egress", "{ports: [{port: \"80\", protocol: XTP}]}"),
                "spec.egress[0].toPorts[0].ports[0].protocol",
                "invalid protocol `XTP`",
                &port_rule("egress", "{ports: [{port: \"80\", protocol: ANY}]}"),
            ),
            // L7Rules.Validate
            check(
                "two kinds of L7 rules on one port rule",
                &port_rule("egress", &format!("{{ports: [{tcp80}], rules: {{http: [{{}}], kafka: [{{topic: t}}]}}}}")),
                "spec.egress[0].toPorts[0].rules",
                "multiple L7 protocol rule types specified in single rule (http, kafka)",
                &format!(
                    "  egress:\n  - toPorts:\n    - {{ports: [{tcp80}], rules: {{http: [{{}}]}}}}\n    - {{ports: [{{port: \"9092\", protocol: TCP}}], rules: {{kafka: [{{topic: t}}]}}}}\n"
                ),
            ),
            check_unsupported_near(
                "l7 without l7proto",
                &port_rule("egress", &format!("{{ports: [{tcp80}], rules: {{l7: [{{cmd: x}}]}}}}")),
                "spec.egress[0].toPorts[0].rules.l7",
                "'l7' may only be specified when a 'l7proto' is also specified",
                &port_rule("egress", &format!("{{ports: [{tcp80}], rules: {{l7proto: memcache, l7: [{{cmd: x}}]}}}}")),
            ),
            // PortRuleHTTP.Sanitize
            check(
                "path that is not a regex",
                &port_rule("egress", &format!("{{ports: [{tcp80}], rules: {{http: [{{path: \"/a[\"}}]}}}}")),
                "spec.egress[0].toPorts[0].rules.http[0].path",
                "invalid regex `/a[`: unclosed character class (at character 3)",
                &port_rule("egress", &format!("{{ports: [{tcp80}], rules: {{http: [{{path: \"/a[]]\"}}]}}}}")),
            ),
            check(
                "method that is not a regex",
                &port_rule("egress", &format!("{{ports: [{tcp80}], rules: {{http: [{{method: \"GET|*\"}}]}}}}")),
                "spec.egress[0].toPorts[0].rules.http[0].method",
                "invalid regex `GET|*`: repetition operator missing expression (at character 5)",
                &port_rule("egress", &format!("{{ports: [{tcp80}], rules: {{http: [{{method: \"GET|.*\"}}]}}}}")),
            ),
            check(
                "header match without a name",
                &header_match("{name: \"\", value: x}"),
                "spec.egress[0].toPorts[0].rules.http[0].headerMatches[0].name",
                "header name missing",
                &header_match("{name: X-A, value: x}"),
            ),
            check_unsupported_near(
                "header match with an invalid mismatch action",
                &header_match("{name: X-A, value: x, mismatch: DROP}"),
                "spec.egress[0].toPorts[0].rules.http[0].headerMatches[0].mismatch",
                "invalid header action `DROP`",
                &header_match("{name: X-A, value: x, mismatch: LOG}"),
            ),
            check_unsupported_near(
                "header match with a secret without a name",
                &header_match("{name: X-A, secret: {namespace: n}}"),
                "spec.egress[0].toPorts[0].rules.http[0].headerMatches[0].secret.name",
                "secret name missing",
                &header_match("{name: X-A, secret: {namespace: n, name: s}}"),
            ),
            // kafka.PortRule.Sanitize
            check(
                "role and apiKey together",
                &kafka("{role: produce, apiKey: produce}"),
                "spec.egress[0].toPorts[0].rules.kafka[0].apiKey",
                "cannot set both role `produce` and apiKey `produce` together",
                &kafka("{role: produce}"),
            ),
            check(
                "invalid Kafka apiKey",
                &kafka("{apiKey: producer}"),
                "spec.egress[0].toPorts[0].rules.kafka[0].apiKey",
                "unknown Kafka apiKey `producer`",
                &kafka("{apiKey: Produce}"),
            ),
            check(
                "invalid Kafka role",
                &kafka("{role: admin}"),
                "spec.egress[0].toPorts[0].rules.kafka[0].role",
                "invalid Kafka role `admin`",
                &kafka("{role: Consume}"),
            ),
            check(
                "invalid Kafka apiVersion",
                &kafka("{apiKey: fetch, apiVersion: \"-1\"}"),
                "spec.egress[0].toPorts[0].rules.kafka[0].apiVersion",
                "`-1` is not a Kafka API version",
                &kafka("{apiKey: fetch, apiVersion: \"0\"}"),
            ),
            check(
                "Kafka topic too long",
                &kafka(&format!("{{topic: {}}}", "t".repeat(256))),
                "spec.egress[0].toPorts[0].rules.kafka[0].topic",
                "Kafka topic exceeds maximum length of 255",
                &kafka(&format!("{{topic: {}}}", "t".repeat(255))),
            ),
            check(
                "invalid Kafka topic",
                &kafka("{topic: \"a b\"}"),
                "spec.egress[0].toPorts[0].rules.kafka[0].topic",
                "`a b` is not a Kafka topic name",
                &kafka("{topic: a.b_c-D9}"),
            ),
        ]
    }

    #[test]
    fn what_cilium_refuses_is_refused_with_its_reason_and_near_misses_load() {
        let checks = cilium_checks();
        for c in &checks {
            let refused = doc(&c.refused);
            let (policies, diags) = load_text("p.yaml", &refused);
            let all: Vec<String> = diags.iter().map(ToString::to_string).collect();
            assert!(policies.is_empty(), "{}: loaded\n{refused}", c.what);
            let hit = diags.iter().find(|d| d.path == c.path && d.message.contains(c.message));
            let hit = hit
                .unwrap_or_else(|| panic!("{}: expected `{}: {}` in {all:#?}\n{refused}", c.what, c.path, c.message));
            assert!(hit.line.is_some_and(|l| l >= 5), "{}: no line in the rule: {hit}", c.what);

            let near = doc(&c.near);
            let (policies, diags) = load_text("p.yaml", &near);
            let all: Vec<String> = diags.iter().map(ToString::to_string).collect();
            assert!(
                !diags.iter().any(|d| d.message.contains(c.message)),
                "{}: near miss refused: {all:#?}\n{near}",
                c.what
            );
            assert_eq!(policies.len() == 1, c.near_loads, "{}: near miss: {all:#?}\n{near}", c.what);
        }
        assert!(checks.len() >= 45);
    }

    #[test]
    fn a_leading_zero_port_is_refused_as_cilium_would_read_it_as_octal() {
        let e = errors(&doc(&port_rule("egress", "{ports: [{port: \"010\", protocol: TCP}]}")));
        assert!(e.iter().any(|d| d.contains("ports[0].port: unable to parse port `010`: a leading 0")), "{e:?}");
        assert!(errors(&doc(&port_rule("egress", "{ports: [{port: \"10\", protocol: TCP}]}"))).is_empty());
    }

    #[test]
    fn server_names_with_origination_are_l7meshs_extension() {
        // Cilium wants terminatingTLS; here originatingTLS names the upstream by them.
        let text = doc(&port_rule(
            "egress",
            "{ports: [{port: \"443\", protocol: TCP}], serverNames: [api.example], originatingTLS: {}, rules: {http: [{method: GET}]}}",
        ));
        assert!(errors(&text).is_empty(), "{:?}", errors(&text));
    }

    #[test]
    fn a_pattern_that_parses_only_once_wrapped_is_refused() {
        // `^(?:GET)|(.*)$` would match every method.
        for (pattern, what) in [("GET)|(.*", "unopened group"), ("/a)|(/", "unopened group")] {
            let text = doc(&port_rule(
                "egress",
                &format!("{{ports: [{{port: \"80\", protocol: TCP}}], rules: {{http: [{{method: \"{pattern}\"}}]}}}}"),
            ));
            let e = errors(&text);
            assert!(e.iter().any(|d| d.contains(&format!("invalid regex `{pattern}`: {what}"))), "{e:?}");
        }
    }

    #[test]
    fn unknown_fields_get_the_nearest_known_field_of_their_place() {
        let cases = [
            (format!("{DOC}{SEL}  egress:\n  - toPort:\n    - ports: []\n"), "spec.egress[0].toPort", "toPort", "toPorts"),
            (format!("{DOC}  endpointSelecter: {{}}\n  ingress: [{{}}]\n"), "spec.endpointSelecter", "endpointSelecter", "endpointSelector"),
            (format!("{DOC}  endpointSelector: {{matchLabel: {{app: web}}}}\n"), "spec.endpointSelector.matchLabel", "matchLabel", "matchLabels"),
            (format!("{DOC}{SEL}  ingress:\n  - fromEndpoint: [{{}}]\n"), "spec.ingress[0].fromEndpoint", "fromEndpoint", "fromEndpoints"),
            (format!("{DOC}{SEL}  egress:\n  - toPorts: [{{ports: [{{port: \"80\", protocol: TCP}}], rules: {{http: [{{methd: GET}}]}}}}]\n"), "spec.egress[0].toPorts[0].rules.http[0].methd", "methd", "method"),
            (format!("{DOC}{SEL}  egress:\n  - toPorts: [{{ports: [{{port: \"80\", protcol: TCP}}]}}]\n"), "spec.egress[0].toPorts[0].ports[0].protcol", "protcol", "protocol"),
            (format!("{DOC}{SEL}  egres: []\n"), "spec.egres", "egres", "egress"),
        ];
        for (text, path, typo, meant) in cases {
            let (policies, d) = load_text("p.yaml", &text);
            assert!(policies.is_empty(), "{text}");
            assert_eq!(d.len(), 1, "{d:?}");
            assert_eq!(d[0].path, path, "{d:?}");
            assert!(d[0].line.is_some_and(|l| l > 5), "{d:?}");
            assert!(
                d[0].message.starts_with(&format!("unknown field `{typo}`: did you mean `{meant}`? (known here: ")),
                "{}",
                d[0]
            );
        }
        // Nothing near: serde's own list, no guess.
        let (_, d) = load_text("p.yaml", &format!("{DOC}{SEL}  colour: blue\n"));
        assert!(d[0].message.starts_with("unknown field `colour`, expected one of"), "{d:?}");
        assert!(!d[0].message.contains("did you mean"), "{d:?}");
    }

    #[test]
    fn did_you_mean_takes_the_nearest_and_only_near_names() {
        let known = ["toPorts", "toEndpoints", "toEntities", "toCIDR", "toCIDRSet"];
        assert_eq!(did_you_mean("toPort", &known), Some("toPorts"));
        assert_eq!(did_you_mean("toEndpionts", &known), Some("toEndpoints"));
        assert_eq!(did_you_mean("tocidrset", &known), Some("toCIDRSet"));
        assert_eq!(did_you_mean("toCIDRs", &known), Some("toCIDR"));
        assert_eq!(did_you_mean("from", &known), None);
        assert_eq!(did_you_mean("x", &known), None);
        assert_eq!(did_you_mean("", &known), None);
    }

    #[test]
    fn field_names_in_another_case_load_with_a_warning() {
        let text = format!("{DOC}{SEL}  Ingress:\n  - toPorts:\n    - ports: [{{port: \"80\", protocol: TCP}}]\n      rules:\n        HTTP: [{{method: GET}}]\n");
        let (policies, d) = load_text("p.yaml", &text);
        assert_eq!(policies.len(), 1, "{d:?}");
        assert!(policies[0].doc.spec.as_ref().unwrap().ingress.as_ref().unwrap()[0].to_ports.as_ref().unwrap()[0]
            .rules
            .as_ref()
            .unwrap()
            .http
            .is_some());
        let w: Vec<String> = d.iter().map(ToString::to_string).collect();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].starts_with("p.yaml:7: warning: spec.Ingress: `Ingress` is read as `ingress`"), "{w:?}");
        assert!(
            w[1].starts_with("p.yaml:11: warning: spec.Ingress[0].toPorts[0].rules.HTTP: `HTTP` is read as `http`"),
            "{w:?}"
        );
        assert!(d.iter().all(|d| d.severity == Severity::Warning));
    }

    #[test]
    fn a_port_of_the_wrong_type_says_what_a_port_is() {
        let e = errors(&doc(&port_rule("egress", "{ports: [{port: true, protocol: TCP}]}")));
        assert!(
            e[0].contains(
                "ports[0].port: invalid type: boolean `true`, expected a port number, as a string (\"80\") or a number"
            ),
            "{e:?}"
        );
    }
}

//! The commands that operate a running node through policy-api: apply, get, delete,
//! simulate, servicemap (`observe` and `explain`: [`crate::observe`]).

use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http::Method;
use l7mesh_api::rest::{
    ApiFailure, Applied, Change, HistoryEntry, PolicyView, Rollback, RolledBack, ServiceMap, SimulationReport, Status,
    Upload, UploadFile, WorkloadView,
};
use l7mesh_client as client;

use crate::cli::{GetWhat, Output};
use crate::client::{api_call, Api};
use crate::render::*;

/// The files of `-f` as an upload: a file, a directory's policy files, or `-` (stdin).
pub(crate) fn upload(file: &Path) -> Result<Bytes> {
    let files: Vec<(String, String)> = if file == Path::new("-") {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)?;
        vec![("<stdin>".into(), text)]
    } else {
        let paths = l7policy::validate::policy_files(file).with_context(|| format!("reading {}", file.display()))?;
        if paths.is_empty() {
            bail!("{}: no *.yaml, *.yml or *.json files", file.display());
        }
        paths
            .iter()
            .map(|p| {
                Ok((
                    p.display().to_string(),
                    std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
                ))
            })
            .collect::<Result<_>>()?
    };
    let files = files.into_iter().map(|(name, text)| UploadFile { name, text }).collect();
    Ok(Bytes::from(serde_json::to_vec(&Upload { files })?))
}

pub(crate) async fn apply(api: &Api, file: &Path, dry_run: bool, force: bool) -> Result<ExitCode> {
    let mut query = Vec::new();
    if dry_run {
        query.push("dryRun=true");
    }
    if force {
        query.push("force=true");
    }
    let path = format!("/v1/policies?{}", query.join("&"));
    let body = api_call(api, Method::POST, &path, Some(Upload::CONTENT_TYPE), upload(file)?).await?;
    let applied: Applied = serde_json::from_slice(&body)?;
    for w in &applied.warnings {
        eprintln!("warning: {w}");
    }
    if dry_run {
        for (key, change) in &applied.changes {
            println!("{key} would be {change}");
        }
        println!(
            "{} policies valid; nothing applied (dry run: every check of an apply passed: conflicts, compile, \
             kernel map capacity)",
            applied.changes.len()
        );
        return Ok(ExitCode::SUCCESS);
    }
    for (key, change) in &applied.changes {
        println!("{key} {change}");
    }
    println!("{}", in_force(&applied));
    Ok(cluster_exit(&applied))
}

/// A cluster write that some node did not put in force fails the command (the write itself
/// is stored: the nodes that lack it keep trying, `l7ctl get status` shows them).
fn cluster_exit(applied: &Applied) -> ExitCode {
    match &applied.cluster {
        Some(c) if c.nodes.iter().any(|n| !n.in_force) => ExitCode::FAILURE,
        _ => ExitCode::SUCCESS,
    }
}

/// A policy's key from what the user typed: `NS/NAME`, `NAME` in `namespace`, or `NAME` in
/// default (the caller falls back to a clusterwide policy `NAME` when that is not found).
fn policy_key(name: &str, namespace: Option<&str>) -> String {
    match (name.contains('/'), namespace) {
        (true, _) => name.to_string(),
        (false, Some(ns)) => format!("{ns}/{name}"),
        (false, None) => format!("default/{name}"),
    }
}

/// `method /v1/policies/KEY` for `name`; with no namespace given and no such policy in
/// default, the clusterwide policy of that name.
async fn policy_call(api: &Api, method: Method, name: &str, namespace: Option<&str>, query: &str) -> Result<Bytes> {
    // A name or namespace is a Kubernetes name (lower-case letters, digits, `-`, `.`): anything
    // else could only be mistaken for URL syntax (`web?force=true`, `a#b`, `..`).
    for part in name.split('/').chain(namespace) {
        if part.is_empty()
            || part == "."
            || part == ".."
            || !part.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        {
            bail!("`{part}` is not a policy name or namespace (lower-case letters, digits, `-` and `.`)");
        }
    }
    if name.matches('/').count() > 1 {
        bail!("`{name}` is not NAME or NAMESPACE/NAME");
    }
    let key = policy_key(name, namespace);
    let result = api_call(api, method.clone(), &format!("/v1/policies/{key}{query}"), None, Bytes::new()).await;
    match result {
        Err(e)
            if namespace.is_none()
                && !name.contains('/')
                && e.downcast_ref::<ApiFailure>().is_some_and(ApiFailure::is_not_found) =>
        {
            api_call(api, method, &format!("/v1/policies/{name}{query}"), None, Bytes::new()).await.map_err(|_| e)
        }
        other => other,
    }
}

fn policy_rows(policies: Vec<PolicyView>) -> Vec<Vec<String>> {
    policies
        .into_iter()
        .map(|p| {
            vec![
                or_dash(p.namespace),
                p.name,
                p.kind,
                if p.audit { "audit".into() } else { "enforce".into() },
                p.revision.to_string(),
                p.origin,
                if p.selects.is_empty() { "-".into() } else { p.selects.join(",") },
                p.updated,
            ]
        })
        .collect()
}

const POLICY_HEADERS: [&str; 8] = ["NAMESPACE", "NAME", "KIND", "MODE", "REVISION", "ORIGIN", "SELECTS", "UPDATED"];

pub(crate) async fn get(
    api: &Api,
    what: GetWhat,
    name: Option<&str>,
    namespace: Option<&str>,
    output: Output,
) -> Result<ExitCode> {
    if output == Output::Dot {
        bail!("-o dot is for `l7ctl servicemap`");
    }
    match (what, name) {
        (GetWhat::Status, _) => bail!("`get status` takes no name"),
        (GetWhat::Policies, Some(name)) => {
            let p: PolicyView = serde_json::from_slice(&policy_call(api, Method::GET, name, namespace, "").await?)?;
            match output {
                Output::Yaml => print!("{}", yaml_document(&p.document)),
                Output::Json => println!("{}", json_line(&p)?),
                _ => print_table(&POLICY_HEADERS, &policy_rows(vec![p])),
            }
        }
        (GetWhat::Policies, None) => {
            let body = api_call(api, Method::GET, "/v1/policies", None, Bytes::new()).await?;
            let policies = serde_json::from_slice::<Vec<PolicyView>>(&body)?;
            match output {
                Output::Json => {
                    for p in policies {
                        println!("{}", json_line(&p)?);
                    }
                }
                Output::Yaml => {
                    // One multi-document stream, as `apply -f` takes it back.
                    for p in policies {
                        print!("{}", yaml_document(&p.document));
                    }
                }
                _ => {
                    print_table(&POLICY_HEADERS, &policy_rows(policies));
                    if let Ok(status) = api_call(api, Method::GET, "/v1/status", None, Bytes::new()).await {
                        if let Ok(status) = serde_json::from_slice::<Status>(&status) {
                            eprintln!("policy version in force: {}", versions_in_force(&status));
                        }
                    }
                }
            }
        }
        (GetWhat::Workloads, name) => {
            let body = api_call(api, Method::GET, "/v1/workloads", None, Bytes::new()).await?;
            let mut workloads = serde_json::from_slice::<Vec<WorkloadView>>(&body)?;
            if let Some(name) = name {
                let (ns, n) = match name.split_once('/') {
                    Some((ns, n)) => (Some(ns), n),
                    None => (namespace, name),
                };
                workloads.retain(|w| w.name == n && ns.is_none_or(|ns| w.namespace == ns));
                if workloads.is_empty() {
                    bail!("no workload `{name}` is registered (`l7ctl get workloads` lists them)");
                }
            } else if let Some(ns) = namespace {
                workloads.retain(|w| w.namespace == ns);
            }
            match output {
                Output::Json => {
                    for w in workloads {
                        println!("{}", json_line(&w)?);
                    }
                }
                Output::Yaml => {
                    for w in workloads {
                        print!("{}", yaml_document(&json_line(&w)?));
                    }
                }
                _ => {
                    // The NODE column only in a cluster.
                    let clustered = workloads.iter().any(|w| !w.node.is_empty());
                    let rows: Vec<Vec<String>> = workloads
                        .into_iter()
                        .map(|w| {
                            let enforced = match (w.ingress_enforced, w.egress_enforced) {
                                (true, true) => "ingress,egress",
                                (true, false) => "ingress",
                                (false, true) => "egress",
                                _ => "-",
                            };
                            let mut row = vec![w.namespace, w.name];
                            if clustered {
                                row.push(w.node);
                            }
                            row.extend([w.labels, or_dash(w.identity), enforced.into()]);
                            row
                        })
                        .collect();
                    let headers: &[&str] = if clustered {
                        &["NAMESPACE", "NAME", "NODE", "LABELS", "IDENTITY", "ENFORCED"]
                    } else {
                        &["NAMESPACE", "NAME", "LABELS", "IDENTITY", "ENFORCED"]
                    };
                    print_table(headers, &rows);
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn delete(api: &Api, name: &str, namespace: Option<&str>, force: bool) -> Result<ExitCode> {
    let query = if force { "?force=true" } else { "" };
    let applied: Applied = serde_json::from_slice(&policy_call(api, Method::DELETE, name, namespace, query).await?)?;
    for w in &applied.warnings {
        eprintln!("warning: {w}");
    }
    let key = policy_key(name, namespace);
    let deleted = applied.changes.first().map_or(key.as_str(), |(k, _)| k.as_str());
    println!("{deleted} deleted; {}", in_force(&applied));
    Ok(cluster_exit(&applied))
}

/// `delete -f FILE`: the policies the file's documents name, in one version (all or none).
pub(crate) async fn delete_files(api: &Api, file: &Path, force: bool) -> Result<ExitCode> {
    let path = if force { "/v1/policies?force=true" } else { "/v1/policies" };
    let body = api_call(api, Method::DELETE, path, Some(Upload::CONTENT_TYPE), upload(file)?).await?;
    let applied: Applied = serde_json::from_slice(&body)?;
    for w in &applied.warnings {
        eprintln!("warning: {w}");
    }
    for (key, _) in &applied.changes {
        println!("{key} deleted");
    }
    println!("{}", in_force(&applied));
    Ok(cluster_exit(&applied))
}

pub(crate) async fn history(api: &Api, output: Output) -> Result<ExitCode> {
    let body = api_call(api, Method::GET, "/v1/history", None, Bytes::new()).await?;
    let history: Vec<HistoryEntry> = serde_json::from_slice(&body)?;
    match output {
        Output::Json => {
            for h in &history {
                println!("{}", json_line(h)?);
            }
        }
        Output::Table => {
            let rows: Vec<Vec<String>> = history
                .iter()
                .map(|h| {
                    let changes: Vec<String> = h.changes.iter().map(|(k, c, _)| format!("{c} {k}")).collect();
                    let mut from = h.origin.clone();
                    if let Some(v) = h.rollback_of {
                        from.push_str(&format!(" (rollback to {v})"));
                    }
                    vec![
                        h.version.to_string(),
                        h.time.clone(),
                        changes.join(", "),
                        from,
                        h.by.clone().unwrap_or("-".into()),
                    ]
                })
                .collect();
            print_table(&["VERSION", "TIME", "CHANGES", "FROM", "BY"], &rows);
        }
        other => bail!("-o {other:?}: the history prints as a table or json"),
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn rollback(api: &Api, version: u64) -> Result<ExitCode> {
    let request = Bytes::from(serde_json::to_vec(&Rollback { version })?);
    let body = api_call(api, Method::POST, "/v1/rollback", Some("application/json"), request).await?;
    let rolled: RolledBack = serde_json::from_slice(&body)?;
    for w in &rolled.applied.warnings {
        eprintln!("warning: {w}");
    }
    let mut changed = 0;
    for (key, change) in &rolled.applied.changes {
        if *change != Change::Unchanged {
            println!("{key} {change}");
            changed += 1;
        }
    }
    for key in &rolled.file_managed {
        println!("{key} left as its --policy file has it");
    }
    if changed == 0 {
        println!("the policies of version {version} were already in force; nothing changed");
    }
    println!("rolled back to the policies of version {}; {}", rolled.rollback_of, in_force(&rolled.applied));
    Ok(cluster_exit(&rolled.applied))
}
/// What `simulate` exits with when the candidate changes a verdict (and --fail-on-change).
pub(crate) const EXIT_VERDICTS_CHANGE: u8 = 3;

pub(crate) async fn simulate(
    api: &Api,
    file: &Path,
    since: Option<String>,
    output: Output,
    fail_on_change: bool,
) -> Result<ExitCode> {
    let mut path = "/v1/simulate".to_string();
    if let Some(s) = &since {
        path.push_str(&format!("?since={}", client::encode_query_value(s)));
    }
    let body = api_call(api, Method::POST, &path, Some(Upload::CONTENT_TYPE), upload(file)?).await?;
    let report: SimulationReport = serde_json::from_slice(&body)?;
    let changed = report.newly_denied + report.newly_allowed + report.newly_audit;
    let code = if fail_on_change && changed > 0 { ExitCode::from(EXIT_VERDICTS_CHANGE) } else { ExitCode::SUCCESS };
    if output == Output::Json {
        println!("{}", json_line(&report)?);
        return Ok(code);
    }
    println!(
        "replayed {} of {} recorded flows{} against the candidate: {} unchanged, {} newly denied, {} newly allowed, {} newly audit ({} not replayable)",
        report.replayed,
        report.flows,
        since.map(|s| format!(" (last {s})")).unwrap_or_default(),
        report.unchanged,
        report.newly_denied,
        report.newly_allowed,
        report.newly_audit,
        report.skipped,
    );
    for s in &report.skipped_by {
        println!("  {} not replayable: {}", s.count, s.reason.explain());
    }
    let rows: Vec<Vec<String>> = report
        .changes
        .into_iter()
        .map(|c| {
            vec![
                c.count.to_string(),
                format!("{} -> {}", c.before, c.after),
                c.from,
                c.to,
                c.protocol,
                c.detail,
                or_dash(c.policy),
            ]
        })
        .collect();
    if !rows.is_empty() {
        println!();
        print_table(&["COUNT", "CHANGE", "FROM", "TO", "PROTOCOL", "EXAMPLE", "POLICY"], &rows);
    }
    for note in &report.notes {
        println!("note: {note}");
    }
    if changed > 0 && fail_on_change {
        eprintln!(
            "l7ctl: the candidate changes {changed} verdict(s): exit {EXIT_VERDICTS_CHANGE} (--no-fail-on-change to only report)"
        );
    }
    Ok(code)
}

pub(crate) async fn servicemap(api: &Api, since: Option<String>, output: Output) -> Result<ExitCode> {
    let format = match output {
        Output::Dot => "dot",
        Output::Json => "json",
        other => bail!("-o {other:?}: the service map prints as dot or json"),
    };
    let mut path = format!("/v1/servicemap?format={format}");
    if let Some(s) = &since {
        path.push_str(&format!("&since={}", client::encode_query_value(s)));
    }
    let body = api_call(api, Method::GET, &path, None, Bytes::new()).await?;
    if output == Output::Json {
        let map: ServiceMap = serde_json::from_slice(&body)?;
        let mut lines: Vec<serde_json::Value> = Vec::new();
        for n in &map.nodes {
            lines.push(serde_json::json!({ "node": n }));
        }
        for e in &map.edges {
            lines.push(serde_json::json!({ "edge": e }));
        }
        print_json_lines(&lines);
    } else {
        print!("{}", String::from_utf8_lossy(&body));
    }
    Ok(ExitCode::SUCCESS)
}

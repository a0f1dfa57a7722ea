//! The commands that operate a running node through policy-api: apply, get, delete,
//! simulate, servicemap (`observe` and `explain`: [`crate::observe`]).

use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http::Method;
use l7mesh_api::rest::{
    ApiFailure, Applied, PolicyView, ServiceMap, SimulationReport, Status, Upload, UploadFile, WorkloadView,
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

pub(crate) async fn apply(api: &Api, file: &Path, dry_run: bool) -> Result<ExitCode> {
    let path = if dry_run { "/v1/policies?dryRun=true" } else { "/v1/policies" };
    let body = api_call(api, Method::POST, path, Some(Upload::CONTENT_TYPE), upload(file)?).await?;
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
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn get(api: &Api, what: GetWhat, output: Output) -> Result<ExitCode> {
    let path = match what {
        GetWhat::Policies => "/v1/policies",
        GetWhat::Workloads => "/v1/workloads",
        GetWhat::Status => "/v1/status",
    };
    if let GetWhat::Status = what {
        let status: Status = serde_json::from_slice(&api_call(api, Method::GET, path, None, Bytes::new()).await?)?;
        match output {
            Output::Json => println!("{}", json_line(&status)?),
            Output::Yaml => println!("{}", to_yaml(&json_line(&status)?)),
            Output::Table => {
                let f = &status.in_force;
                let store_detail = match &f.store_error {
                    Some(why) => format!("last committed; cannot be read: {why}"),
                    None => "committed".into(),
                };
                let rows = vec![
                    vec!["store".into(), f.store.to_string(), store_detail],
                    vec!["kernel".into(), or_dash(f.kernel), format!("generation {}", f.kernel_generation)],
                    vec!["l7proxy".into(), or_dash(f.proxy), format!("{} connected", f.proxy_connected)],
                ];
                print_table(&["PART", "VERSION", "DETAIL"], &rows);
                if !f.converged {
                    let d = f.divergence.as_ref();
                    println!(
                        "converged: false (version {} was refused by the store; {}); bringing every part to version {}{}",
                        or_dash(d.map(|d| d.failed_version)),
                        d.map_or("-", |d| d.reason.as_str()),
                        or_dash(d.map(|d| d.target)),
                        d.and_then(|d| d.last_error.as_ref()).map(|e| format!(", last attempt: {e}")).unwrap_or_default()
                    );
                } else {
                    println!("converged: true");
                }
            }
            Output::Dot => bail!("-o dot is for `l7ctl servicemap`"),
        }
        return Ok(ExitCode::SUCCESS);
    }
    let body = api_call(api, Method::GET, path, None, Bytes::new()).await?;
    match (what, output) {
        (GetWhat::Policies, Output::Json) => {
            for p in serde_json::from_slice::<Vec<PolicyView>>(&body)? {
                println!("{}", json_line(&p)?);
            }
        }
        (GetWhat::Workloads, Output::Json) => {
            for w in serde_json::from_slice::<Vec<WorkloadView>>(&body)? {
                println!("{}", json_line(&w)?);
            }
        }
        (GetWhat::Policies, Output::Yaml) => {
            for p in serde_json::from_slice::<Vec<PolicyView>>(&body)? {
                println!("{}", to_yaml(&p.document));
            }
        }
        (GetWhat::Workloads, Output::Yaml) => {
            for w in serde_json::from_slice::<Vec<WorkloadView>>(&body)? {
                println!("{}", to_yaml(&json_line(&w)?));
            }
        }
        (GetWhat::Policies, Output::Table) => {
            let rows: Vec<Vec<String>> = serde_json::from_slice::<Vec<PolicyView>>(&body)?
                .into_iter()
                .map(|p| {
                    vec![
                        or_dash(p.namespace),
                        p.name,
                        p.kind,
                        if p.audit { "audit".into() } else { "enforce".into() },
                        p.revision.to_string(),
                        p.origin,
                        p.updated,
                    ]
                })
                .collect();
            print_table(&["NAMESPACE", "NAME", "KIND", "MODE", "REVISION", "ORIGIN", "UPDATED"], &rows);
            if let Ok(status) = api_call(api, Method::GET, "/v1/status", None, Bytes::new()).await {
                if let Ok(status) = serde_json::from_slice::<Status>(&status) {
                    eprintln!("policy version in force: {}", versions_in_force(&status));
                }
            }
        }
        (GetWhat::Workloads, Output::Table) => {
            let rows: Vec<Vec<String>> = serde_json::from_slice::<Vec<WorkloadView>>(&body)?
                .into_iter()
                .map(|w| {
                    let enforced = match (w.ingress_enforced, w.egress_enforced) {
                        (true, true) => "ingress,egress",
                        (true, false) => "ingress",
                        (false, true) => "egress",
                        _ => "-",
                    };
                    vec![w.namespace, w.name, w.labels, or_dash(w.identity), enforced.into()]
                })
                .collect();
            print_table(&["NAMESPACE", "NAME", "LABELS", "IDENTITY", "ENFORCED"], &rows);
        }
        (_, Output::Dot) => bail!("-o dot is for `l7ctl servicemap`"),
        (GetWhat::Status, _) => unreachable!("answered above"),
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn delete(api: &Api, name: &str, namespace: Option<&str>) -> Result<ExitCode> {
    let key = match (name.contains('/'), namespace) {
        (true, _) => name.to_string(),
        (false, Some(ns)) => format!("{ns}/{name}"),
        (false, None) => format!("default/{name}"),
    };
    let path = format!("/v1/policies/{key}");
    let result = api_call(api, Method::DELETE, &path, None, Bytes::new()).await;
    // No namespace given and none there: a clusterwide policy by that name.
    let result = match result {
        Err(e)
            if namespace.is_none()
                && !name.contains('/')
                && e.downcast_ref::<ApiFailure>().is_some_and(ApiFailure::is_not_found) =>
        {
            api_call(api, Method::DELETE, &format!("/v1/policies/{name}"), None, Bytes::new()).await.map_err(|_| e)
        }
        other => other,
    };
    let applied: Applied = serde_json::from_slice(&result?)?;
    let deleted = applied.changes.first().map_or(key.as_str(), |(k, _)| k.as_str());
    println!("{deleted} deleted; {}", in_force(&applied));
    Ok(ExitCode::SUCCESS)
}
pub(crate) async fn simulate(api: &Api, file: &Path, since: Option<String>, output: Output) -> Result<ExitCode> {
    let mut path = "/v1/simulate".to_string();
    if let Some(s) = &since {
        path.push_str(&format!("?since={}", client::encode_query_value(s)));
    }
    let body = api_call(api, Method::POST, &path, Some(Upload::CONTENT_TYPE), upload(file)?).await?;
    let report: SimulationReport = serde_json::from_slice(&body)?;
    if output == Output::Json {
        println!("{}", json_line(&report)?);
        return Ok(ExitCode::SUCCESS);
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
    Ok(ExitCode::SUCCESS)
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

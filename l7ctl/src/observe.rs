//! `l7ctl observe` and `l7ctl explain`: recorded flows as a table, JSON Lines, or (explain)
//! one sentence per denial. Output goes through [`Out`], so a reader that stops early
//! (`l7ctl observe | head`) ends the command quietly with success, never a panic.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{bail, Result};
use bytes::Bytes;
use http::Method;
use l7mesh_api::flow::Flow;
use l7mesh_api::Verdict;
use l7mesh_client as client;

use crate::cli::{ObserveArgs, Output};
use crate::client::{api_call, api_unreachable, Api};
use crate::render::{explain_line, flow_row, table_lines, FLOW_HEADERS};

/// Standard output that notices a closed pipe.
struct Out(std::io::Stdout);

/// The reader went away: stop, successfully.
struct Closed;

impl Out {
    fn line(&mut self, line: &str) -> Result<(), Closed> {
        let mut lock = self.0.lock();
        match writeln!(lock, "{line}").and_then(|_| lock.flush()) {
            Ok(()) => Ok(()),
            // A closed pipe (`| head`) or any other write failure ends the output; nothing
            // more can be shown.
            Err(_) => Err(Closed),
        }
    }
}

/// How one command shows flows.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    Table,
    Json,
    Explain,
}

/// What the table shows of the flows it is given: the kernel's record of a connection it
/// redirected is the proxy's connection row, in other words; only the proxy's is shown.
fn shown_in_table(f: &Flow) -> bool {
    !(f.observer.starts_with("kernel") && f.redirected && f.verdict == Verdict::Allowed)
}

/// `explain` shows denials and audits unless a verdict was asked for.
fn shown_explained(f: &Flow, verdict_asked: bool) -> bool {
    verdict_asked || matches!(f.verdict, Verdict::Denied | Verdict::Audit)
}

/// Reads one line as a flow; a line that is not one is reported on stderr with its number
/// (`-o json` must not drop one silently) and counted.
fn read_line(n: usize, line: &str, unreadable: &mut usize) -> Option<(Flow, serde_json::Value)> {
    // A cluster-wide answer names a node that did not answer in a line of its own.
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
        if let (Some(node), Some(error)) =
            (v.get("node").and_then(|n| n.as_str()), v.get("error").and_then(|e| e.as_str()))
        {
            eprintln!("l7ctl: node {node}'s flows are missing: {error}");
            return None;
        }
    }
    let parsed = serde_json::from_str::<serde_json::Value>(line)
        .and_then(|v| serde_json::from_value::<Flow>(v.clone()).map(|f| (f, v)));
    match parsed {
        Ok(x) => Some(x),
        Err(e) => {
            *unreadable += 1;
            let shown: String = line.chars().take(200).collect();
            eprintln!("l7ctl: flow line {n} is not a flow l7ctl can read ({e}): {shown}");
            None
        }
    }
}

/// Prints what `shape` shows of one flow; Err when the reader went away.
fn show(out: &mut Out, shape: Shape, verdict_asked: bool, flow: &Flow, raw: &serde_json::Value) -> Result<(), Closed> {
    match shape {
        Shape::Json => out.line(&raw.to_string()),
        Shape::Table if shown_in_table(flow) => out.line(&flow_row(flow).join("  ")),
        Shape::Explain if shown_explained(flow, verdict_asked) => out.line(&explain_line(flow)),
        _ => Ok(()),
    }
}

pub(crate) async fn observe(api: &Api, args: ObserveArgs) -> Result<ExitCode> {
    let shape = match (args.explain, args.output) {
        (true, Output::Table) => Shape::Explain,
        (true, other) => bail!("--explain prints sentences; -o {other:?} is not for it"),
        (false, Output::Table) => Shape::Table,
        (false, Output::Json) => Shape::Json,
        (false, other) => bail!("-o {other:?} is not a flow format (table or json)"),
    };
    let mut query = Vec::new();
    let mut add = |k: &str, v: &Option<String>| {
        if let Some(v) = v {
            query.push(format!("{k}={}", client::encode_query_value(v)));
        }
    };
    add("verdict", &args.verdict);
    add("from", &args.from);
    add("to", &args.to);
    add("protocol", &args.protocol);
    add("since", &args.since);
    if args.follow {
        query.push("follow=true".into());
    }
    if args.cluster {
        query.push("cluster=true".into());
    }
    let path = format!("/v1/flows?{}", query.join("&"));
    let verdict_asked = args.verdict.is_some();
    let mut out = Out(std::io::stdout());
    let mut unreadable = 0;
    // With `--since` the answer may be the whole flow history (hundreds of MiB): lines are
    // printed as they come, not held, except for the aligned table, which needs every row.
    let streamed = args.follow || (args.since.is_some() && shape != Shape::Table);
    if !streamed {
        let body = api_call(api, Method::GET, &path, None, Bytes::new()).await?;
        let text = String::from_utf8_lossy(&body);
        let flows: Vec<(Flow, serde_json::Value)> = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .filter_map(|(i, l)| read_line(i + 1, l, &mut unreadable))
            .collect();
        let printed = match shape {
            Shape::Table => {
                let rows: Vec<Vec<String>> =
                    flows.iter().filter(|(f, _)| shown_in_table(f)).map(|(f, _)| flow_row(f)).collect();
                table_lines(&FLOW_HEADERS, &rows).iter().try_for_each(|l| out.line(l))
            }
            _ => flows.iter().try_for_each(|(f, raw)| show(&mut out, shape, verdict_asked, f, raw)),
        };
        return Ok(finish(printed, unreadable));
    }
    let (status, mut body) = client::send(api.addr, Method::GET, &path, api.headers(None), Bytes::new())
        .await
        .map_err(|e| api_unreachable(api, e))?;
    if !status.is_success() {
        let text = http_body_util::BodyExt::collect(body).await.map(|b| b.to_bytes()).unwrap_or_default();
        bail!("{} ({status})", String::from_utf8_lossy(&text).trim());
    }
    if shape == Shape::Table && out.line(&FLOW_HEADERS.join("  ")).is_err() {
        return Ok(ExitCode::SUCCESS);
    }
    let mut pending = Vec::new();
    let mut n = 0;
    while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
        let Ok(data) = frame?.into_data() else { continue };
        pending.extend_from_slice(&data);
        while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=pos).collect();
            n += 1;
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let Some((flow, raw)) = read_line(n, &String::from_utf8_lossy(&line), &mut unreadable) else { continue };
            if show(&mut out, shape, verdict_asked, &flow, &raw).is_err() {
                return Ok(ExitCode::SUCCESS);
            }
        }
    }
    Ok(finish(Ok(()), unreadable))
}

/// Success, unless a line could not be read (each was reported on stderr); a reader that went
/// away is success.
fn finish(printed: Result<(), Closed>, unreadable: usize) -> ExitCode {
    if printed.is_err() {
        return ExitCode::SUCCESS;
    }
    if unreadable > 0 {
        eprintln!("l7ctl: {unreadable} flow line(s) could not be read (above)");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Flow> {
        l7mesh_api::flow::parse_lines(include_str!("../../l7mesh-api/tests/flows.jsonl"))
    }

    /// A line that is not a flow is reported with its number and counted, never dropped
    /// silently; the others still read.
    #[test]
    fn unreadable_lines_are_reported_and_counted() {
        let mut unreadable = 0;
        let good = serde_json::to_string(&sample()[0]).unwrap();
        assert!(read_line(1, &good, &mut unreadable).is_some());
        assert!(read_line(2, "{not json", &mut unreadable).is_none());
        assert!(read_line(3, r#"{"verdict":"MAYBE"}"#, &mut unreadable).is_none());
        assert_eq!(unreadable, 2);
        assert_eq!(finish(Ok(()), 2), ExitCode::FAILURE);
        assert_eq!(finish(Ok(()), 0), ExitCode::SUCCESS);
        assert_eq!(finish(Err(Closed), 2), ExitCode::SUCCESS, "a reader that went away is not a failure");
    }

    /// The kernel's record of a redirected connection is not a second row beside the proxy's;
    /// its denials are.
    #[test]
    fn one_row_per_connection() {
        let mut kernel_allow = sample()[4].clone();
        kernel_allow.verdict = Verdict::Allowed;
        kernel_allow.redirected = true;
        assert!(!shown_in_table(&kernel_allow));
        kernel_allow.redirected = false;
        assert!(shown_in_table(&kernel_allow), "an unredirected connection has only the kernel's row");
        assert!(shown_in_table(&sample()[4]), "a kernel denial");
        assert!(sample().iter().filter(|f| f.observer == "proxy").all(shown_in_table));
        assert!(!shown_explained(&sample()[1], false) && shown_explained(&sample()[1], true));
    }
}

//! Policy propagation: how long `l7ctl apply` takes to put a new version in force, and whether
//! the very next request on connections that were already open obeys it. One node, nginx, and a
//! workload holding an HTTP/1.1 keep-alive and an HTTP/2 connection open; the policy flips
//! between "GET /public and /private" and "GET /public only", `--rounds x 4` times.
//!
//! Then connections that predate the policy: a second workload holds an HTTP/1.1 keep-alive
//! and an HTTP/2 connection opened under an L4-only allow (not through the proxy); `l7ctl
//! apply` marks the ports for L7 (GET /public only), and the client sends GET /private on both
//! as soon as apply returns: it finds them closed, reconnects through the proxy and gets 403.
//! Measured: apply's start to that first enforced answer, `--rounds x 4` times.

use std::time::Instant;

use anyhow::{ensure, Result};
use integration::{HeldAt, HeldClient, LiveClient, TestNode};
use serde::Serialize;

use crate::{median, write_result, write_section, Args};

fn policy(paths: &str) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: live\nspec:\n  endpointSelector:\n    matchLabels:\n      app: client\n  egress:\n  - toEntities: [host]\n    toPorts:\n    - ports:\n      - port: \"8443\"\n        protocol: TCP\n      - port: \"8444\"\n        protocol: TCP\n      rules:\n        http:\n        - method: GET\n          path: \"{paths}\"\n"
    )
}

#[derive(Serialize)]
struct Result_ {
    applies: usize,
    /// `l7ctl apply` run to its exit (process start, upload, validation, store, l7proxy
    /// tables, kernel flip, connection re-check), milliseconds.
    apply_ms_p50: f64,
    apply_ms_max: f64,
    /// policy-api's own report of the two enforcement steps.
    proxy_ms_p50: f64,
    kernel_ms_p50: f64,
    /// Applies after which the first request on both open connections obeyed the new version.
    first_request_obeyed: usize,
}

/// A policy file for `l7ctl apply`, outside the directory the node watches (a file there would
/// be loaded by the node itself, beside what `apply` stores).
fn candidate(node: &TestNode, name: &str, yaml: &str) -> Result<std::path::PathBuf> {
    let dir = node.log_dir.join("candidates");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(name);
    std::fs::write(&path, yaml)?;
    Ok(path)
}

/// The held workload's egress on nginx's ports: L4 only, or GET /public only.
fn held_policy(l7: bool) -> String {
    let rules =
        if l7 { "      rules:\n        http:\n        - method: GET\n          path: \"/public/.*\"\n" } else { "" };
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: held\nspec:\n  endpointSelector:\n    matchLabels:\n      app: held\n  egress:\n  - toEntities: [host]\n    toPorts:\n    - ports:\n      - port: \"8443\"\n        protocol: TCP\n      - port: \"8444\"\n        protocol: TCP\n{rules}"
    )
}

#[derive(Serialize)]
struct OldConnections {
    applies: usize,
    /// `l7ctl apply` start to the first enforced answer (403 on a new connection through the
    /// proxy, after the old one was found closed), milliseconds, over both connections.
    first_enforced_ms_p50: f64,
    first_enforced_ms_p99: f64,
    /// Of which `l7ctl apply` itself (to its exit).
    apply_ms_p50: f64,
    /// Applies after which both old connections were found closed and both new ones got 403.
    enforced: usize,
}

/// The `q`-quantile (nearest rank) of `v`.
fn quantile(mut v: Vec<f64>, q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1]
}

fn old_connections(node: &mut TestNode, rounds: usize) -> Result<OldConnections> {
    let l4 = candidate(node, "held-l4.yaml", &held_policy(false))?;
    let l7 = candidate(node, "held-l7.yaml", &held_policy(true))?;
    let apply = |node: &TestNode, file: &std::path::Path| -> Result<String> {
        let o = node.l7ctl(&["apply", "-f", file.to_str().unwrap_or_default()])?;
        ensure!(o.status.success(), "apply: {}", String::from_utf8_lossy(&o.stderr));
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    };
    apply(node, &l4)?;
    let at = HeldAt::Workload { name: "held", labels: "app=held" };
    let mut held = HeldClient::start(node, at, "held", &["h1=h1:127.0.0.1:8444", "h2=h2:127.0.0.1:8443"])?;
    ensure!(held.statuses("/private/x")? == "h1:200 same, h2:200 same", "the held client's first request");
    let (mut first, mut apply_ms) = (Vec::new(), Vec::new());
    let mut enforced = 0;
    for i in 0..rounds {
        // L4 only: the (proxied) connections of the round before reconnect directly.
        apply(node, &l4)?;
        held.get("/private/x")?;
        let direct = held.statuses("/private/x")?;
        ensure!(direct.matches("200 ").count() == 2, "round {i}: not allowed directly: {direct}");
        let started = Instant::now();
        let out = apply(node, &l7)?;
        apply_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        let closed = held.statuses("/private/x")?;
        let judged = held.statuses("/private/x")?;
        first.push(started.elapsed().as_secs_f64() * 1000.0);
        let found_closed = closed == "h1:closed same, h2:closed same" || closed == "h1:closed new, h2:closed new";
        if found_closed && judged == "h1:403 new, h2:403 new" && out.contains("2 rerouted") {
            enforced += 1;
            continue;
        }
        eprintln!("round {i}: {closed} then {judged}; {out}");
    }
    held.quit();
    Ok(OldConnections {
        applies: rounds,
        first_enforced_ms_p50: quantile(first.clone(), 0.5),
        first_enforced_ms_p99: quantile(first, 0.99),
        apply_ms_p50: median(apply_ms),
        enforced,
    })
}

fn ms(line: &str, what: &str) -> Option<f64> {
    let rest = &line[line.find(what)? + what.len()..];
    rest.split_whitespace().next()?.parse().ok()
}

pub fn run(args: &Args) -> Result<()> {
    let mut node = TestNode::new("bench-propagation")?;
    let dir = node.log_dir.join("policies");
    std::fs::create_dir_all(&dir)?;
    node.start_node(&dir, &[])?;
    node.start_nginx_h1_h2()?;
    let open = candidate(&node, "open.yaml", &policy("/(public|private)/.*"))?;
    let strict = candidate(&node, "strict.yaml", &policy("/public/.*"))?;
    let apply = |node: &TestNode, file: &std::path::Path| -> Result<(f64, String)> {
        let started = Instant::now();
        let o = node.l7ctl(&["apply", "-f", file.to_str().unwrap_or_default()])?;
        let took = started.elapsed().as_secs_f64() * 1000.0;
        ensure!(o.status.success(), "apply: {}", String::from_utf8_lossy(&o.stderr));
        Ok((took, String::from_utf8_lossy(&o.stdout).into_owned()))
    };
    apply(&node, &open)?;
    let mut client = LiveClient::start(&mut node)?;
    let got = client.get(&node, "/private/x");
    ensure!(got == "200 200 same", "the live client's first request: {got}");
    let (mut apply_ms, mut proxy_ms, mut kernel_ms) = (Vec::new(), Vec::new(), Vec::new());
    let mut obeyed = 0;
    let n = args.rounds * 4;
    for i in 0..n {
        let (file, expect) = if i % 2 == 0 { (&strict, "403 403 same") } else { (&open, "200 200 same") };
        let (took, out) = apply(&node, file)?;
        let got = client.get(&node, "/private/x");
        if got == expect {
            obeyed += 1;
        } else {
            eprintln!("apply {i}: expected {expect}, got {got}");
        }
        apply_ms.push(took);
        proxy_ms.push(ms(&out, "l7proxy tables ").unwrap_or(f64::NAN));
        kernel_ms.push(ms(&out, "kernel ").unwrap_or(f64::NAN));
    }
    client.quit();
    let max = apply_ms.iter().cloned().fold(0.0, f64::max);
    let r = Result_ {
        applies: n,
        apply_ms_p50: median(apply_ms),
        apply_ms_max: max,
        proxy_ms_p50: median(proxy_ms),
        kernel_ms_p50: median(kernel_ms),
        first_request_obeyed: obeyed,
    };
    let old = old_connections(&mut node, n)?;
    write_result(
        args,
        "propagation.json",
        &(serde_json::to_string_pretty(&serde_json::json!({ "open": r, "predating": old }))? + "\n"),
    )?;
    let body = format!(
        "Command: `make bench` (= `cargo run --release -p l7mesh-bench -- --scenario propagation --rounds {}`). \
         A workload holds an HTTP/1.1 keep-alive and an HTTP/2 connection open through l7proxy; `l7ctl apply` flips \
         its policy between allowing and denying `GET /private/x`, {n} times; after each apply returns, the next request \
         on both open connections is sent at once.\n\n\
         | measure | value |\n|---|---|\n\
         | `l7ctl apply` to its exit, p50 | {:.1} ms |\n\
         | `l7ctl apply` to its exit, max | {:.1} ms |\n\
         | of which l7proxy loading the tables, p50 | {:.2} ms |\n\
         | of which the kernel generation flip, p50 | {:.2} ms |\n\
         | first request on the open connections obeyed the new version | {} of {n} |\n\n\
         `l7ctl apply` returns only once the version is in force, so enforcement on an open connection follows the \
         return with no further delay; the issue's goal is under 100 ms.\n\n\
         Connections that predate the policy: a second workload holds an HTTP/1.1 keep-alive and an HTTP/2 \
         connection opened under an L4-only allow (not through the proxy); `l7ctl apply` marks both ports for L7 \
         (GET /public only), closing both before it returns; the client then sends GET /private on each, finds it \
         closed, reconnects (through the proxy) and sends again. {n} applies; the held client is a Python process \
         that takes its commands from files (a few milliseconds of the time below are that).\n\n\
         | measure | value |\n|---|---|\n\
         | apply -> first enforced request (403 on the reconnected connections), p50 | {:.1} ms |\n\
         | apply -> first enforced request, p99 (of {n}: the maximum) | {:.1} ms |\n\
         | of which `l7ctl apply` to its exit, p50 | {:.1} ms |\n\
         | old connections found closed and new ones denied | {} of {n} |\n",
        args.rounds,
        r.apply_ms_p50,
        r.apply_ms_max,
        r.proxy_ms_p50,
        r.kernel_ms_p50,
        r.first_request_obeyed,
        old.first_enforced_ms_p50,
        old.first_enforced_ms_p99,
        old.apply_ms_p50,
        old.enforced,
    );
    println!("{body}");
    write_section(&args.out, "propagation", &body)?;
    ensure!(obeyed == n, "{} of {n} first requests did not obey the new policy", n - obeyed);
    ensure!(old.enforced == n, "{} of {n} predating connections were not closed and judged anew", n - old.enforced);
    Ok(())
}

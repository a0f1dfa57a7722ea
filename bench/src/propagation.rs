//! Policy propagation: how long `l7ctl apply` takes to put a new version in force, and whether
//! the very next request on connections that were already open obeys it. One node, nginx, and a
//! workload holding an HTTP/1.1 keep-alive and an HTTP/2 connection open; the policy flips
//! between "GET /public and /private" and "GET /public only", `--rounds x 4` times.

use std::time::Instant;

use anyhow::{ensure, Result};
use integration::{LiveClient, TestNode};
use serde::Serialize;

use crate::{median, write_result, write_section, Args};

fn policy(paths: &str) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: live\nspec:\n  endpointSelector:\n    matchLabels:\n      app: client\n  egress:\n  - toEntities: [host]\n    toPorts:\n    - ports:\n      - port: \"8443\"\n      - port: \"8444\"\n      rules:\n        http:\n        - method: GET\n          path: \"{paths}\"\n"
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
    let open = node.policy_file("open.yaml", &policy("/(public|private)/.*"))?;
    let strict = node.policy_file("strict.yaml", &policy("/public/.*"))?;
    let apply = |node: &TestNode, file: &std::path::Path| -> Result<(f64, String)> {
        let started = Instant::now();
        let o = node.l7ctl(&["apply", "-f", file.to_str().unwrap_or_default()])?;
        let took = started.elapsed().as_secs_f64() * 1000.0;
        ensure!(o.status.success(), "apply: {}", String::from_utf8_lossy(&o.stderr));
        Ok((took, String::from_utf8_lossy(&o.stdout).into_owned()))
    };
    apply(&node, &open)?;
    let mut client = LiveClient::start(&mut node)?;
    ensure!(client.get(&node, "/private/x") == "200 200 same", "the live client's first request");
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
    write_result(args, "propagation.json", &(serde_json::to_string_pretty(&r)? + "\n"))?;
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
         return with no further delay; the issue's goal is under 100 ms.\n",
        args.rounds, r.apply_ms_p50, r.apply_ms_max, r.proxy_ms_p50, r.kernel_ms_p50, r.first_request_obeyed
    );
    println!("{body}");
    write_section(&args.out, "propagation", &body)?;
    ensure!(obeyed == n, "{} of {n} first requests did not obey the new policy", n - obeyed);
    Ok(())
}

//! The l7mesh demo node: `l7ctl up` with the policy in examples/policies/, workloads started
//! with `l7ctl run`, real clients and servers, in a network namespace of its own.
//!
//! Cilium's getting-started cast: the `deathstar` (examples/workloads/deathstar.py) is guarded
//! by examples/policies/star-wars.yaml; the `tiefighter` (org=empire) is let through the proxy;
//! the `xwing` (org=alliance) is refused in the kernel; an `observer` no policy selects talks to
//! another service untouched. Everything is removed at the end.
#![forbid(unsafe_code)]

use std::path::Path;

use anyhow::{ensure, Context, Result};
use integration::*;

fn step(title: &str) {
    println!("\n==> {title}");
}

fn examples() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn show(o: &std::process::Output) -> (i32, String) {
    let text = String::from_utf8_lossy(&o.stdout).trim().to_string() + String::from_utf8_lossy(&o.stderr).trim();
    (o.status.code().unwrap_or(-1), text)
}

fn main() -> Result<()> {
    println!("l7mesh demo: l7ctl up + CiliumNetworkPolicy + l7ctl run, real workloads, real traffic");
    let mut node = TestNode::new("demo")?;
    let policy = examples().join("policies/star-wars.yaml");
    println!("policy file: {}\n{}", policy.display(), std::fs::read_to_string(&policy)?);

    step("l7ctl validate -f examples/policies/star-wars.yaml");
    println!("{}", show(&node.l7ctl(&["validate", "-f", policy.to_str().context("path")?])?).1);

    step("l7ctl up --policy examples/policies/star-wars.yaml (in network namespace of its own)");
    node.start_node(&policy, &[])?;
    println!("node ready (l7proxy + redirector + policy controller)");

    step("l7ctl run --name deathstar --labels org=empire,class=deathstar -- deathstar.py 8080");
    let deathstar = node.log_dir.join("deathstar.py");
    std::fs::copy(examples().join("workloads/deathstar.py"), &deathstar)?;
    node.spawn_l7ctl_run(
        "deathstar",
        "org=empire,class=deathstar",
        &["/usr/bin/python3", "-u", deathstar.to_str().context("path")?, "8080"],
        "deathstar.log",
    )?;
    for _ in 0..100 {
        if node.log("deathstar.log").contains("serving") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    node.http_server(None, "127.0.0.1", 9000, "public information\n")?;

    step("tiefighter (org=empire): curl -X POST http://127.0.0.1:8080/v1/request-landing  [marked: through the proxy]");
    let (code, text) = show(&node.l7ctl_run(
        "tiefighter",
        "org=empire,class=tiefighter",
        &["curl", "-sS", "--max-time", "10", "-X", "POST", "http://127.0.0.1:8080/v1/request-landing"],
    )?);
    println!("exit {code}: {text}");
    ensure!(code == 0 && text == "Ship landed", "the tiefighter should land");

    step("tiefighter: curl -X PUT http://127.0.0.1:8080/v1/exhaust-port  [L7 denial: 403 from the proxy]");
    let (code, text) = show(&node.l7ctl_run(
        "tiefighter",
        "org=empire,class=tiefighter",
        &[
            "curl",
            "-sS",
            "--max-time",
            "10",
            "-w",
            " (HTTP %{http_code})",
            "-X",
            "PUT",
            "http://127.0.0.1:8080/v1/exhaust-port",
        ],
    )?);
    println!("exit {code}: {text}");
    ensure!(text.contains("Access denied") && text.contains("403"), "the exhaust port must be denied");

    step("xwing (org=alliance): the same request  [L4 denial: EPERM at connect()]");
    let (code, text) = show(&node.l7ctl_run(
        "xwing",
        "org=alliance,class=xwing",
        &["curl", "-sS", "--max-time", "10", "-X", "POST", "http://127.0.0.1:8080/v1/request-landing"],
    )?);
    println!("exit {code}: {text}");
    ensure!(code == 7, "the xwing should be refused");

    step("observer (selected by no policy): curl http://127.0.0.1:9000/  [untouched]");
    let (code, text) = show(&node.l7ctl_run(
        "observer",
        "app=observer",
        &["curl", "-sS", "--max-time", "10", "http://127.0.0.1:9000/"],
    )?);
    println!("exit {code}: {text}");
    ensure!(code == 0, "the observer should be untouched");

    step("flows (l7proxy's /v1/flows): kernel verdicts and proxied connections, by workload");
    for f in node.flows()? {
        let name = |e: &serde_json::Value| {
            e["workload"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("{}:{}", e["ip"].as_str().unwrap_or(""), e["port"]))
        };
        println!(
            "{} {:7} {:7} {:>12} -> {:<16} {:16} {:14} {}",
            f["time"].as_str().unwrap_or(""),
            f["verdict"].as_str().unwrap_or(""),
            f["direction"].as_str().unwrap_or(""),
            name(&f["source"]),
            name(&f["destination"]),
            f["observer"].as_str().unwrap_or(""),
            f["policy_name"].as_str().unwrap_or(""),
            match &f["l7"]["http"] {
                serde_json::Value::Null => String::new(),
                h => format!(
                    "{} {} -> {}",
                    h["method"].as_str().unwrap_or(""),
                    h["url"].as_str().unwrap_or(""),
                    h["code"]
                ),
            },
        );
    }
    let counters = node.counters()?;
    println!("\nBPF counters:");
    for (counter, value) in counters.values.iter().filter(|(_, v)| *v > 0) {
        println!("{:>20} {value}", counter.name());
    }

    step("stop the node (SIGTERM to l7ctl up)");
    node.stop_node()?;
    for line in node.node_log().lines().filter(|l| l.contains("enforcement stopped")) {
        println!("{line}");
    }
    drop(node);
    println!("done: datapath, cgroups and namespace removed");
    Ok(())
}

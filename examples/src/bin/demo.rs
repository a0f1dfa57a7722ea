//! The l7mesh demo node: the eBPF redirector and l7proxy on a real kernel, with real workloads
//! (Python's http.server, curl) and a second host reached over a veth pair.
//!
//! Cilium's getting-started cast: `deathstar` serves on port 80 (8080 here), `tiefighter` may
//! reach it only through the proxy (an L7-marked port), `xwing` is denied at L4, and a host
//! outside the node reaches the deathstar through the proxy's ingress listener.
//!
//! Policies are written here with the redirector's typed operations; CiliumNetworkPolicy files,
//! the policy compiler and `l7ctl` drive the same operations in the next milestones.
#![forbid(unsafe_code)]

use anyhow::{ensure, Context, Result};
use integration::*;

const TIEFIGHTER: u32 = 1;
const XWING: u32 = 2;
const DEATHSTAR: u32 = 3;
const EMPIRE: u32 = 1001;
const ALLIANCE: u32 = 1002;
const DEATHSTAR_ID: u32 = 1003;
const POLICY_L7: u32 = 1;
const POLICY_L4: u32 = 2;

fn step(title: &str) {
    println!("\n==> {title}");
}

fn main() -> Result<()> {
    println!("l7mesh demo: eBPF redirector + l7proxy, real workloads, real traffic");
    let mut node = TestNode::new("demo")?;
    let outside = node.add_peer_host(99)?;
    println!(
        "node: netns {}, cgroups {}, pins {}; another host in netns {outside} at 10.231.99.2",
        node.netns,
        node.cgroup_root.display(),
        node.pin_dir.display()
    );

    step("start l7proxy: it loads and attaches the redirector and pins it");
    node.start_proxy(&[])?;
    println!("l7proxy ready (egress 15001, ingress 15006, admin 127.0.0.1:15000)");

    step("start the deathstar workload (a real HTTP server on 0.0.0.0:8080)");
    node.http_server(Some("deathstar"), "0.0.0.0", 8080, "Ship landed\n")?;
    let listeners = node.maps()?.listeners();
    println!("kernel learned the deathstar's listener at bind time: {listeners:?}");

    step("apply policy: tiefighter -> deathstar:8080 through the proxy; xwing denied; deathstar ingress through the proxy");
    let snapshot = PolicySnapshot {
        endpoints: vec![
            endpoint(node.cgroup_id("tiefighter")?, TIEFIGHTER, EMPIRE, false, false),
            endpoint(node.cgroup_id("xwing")?, XWING, ALLIANCE, false, false),
            endpoint(node.cgroup_id("deathstar")?, DEATHSTAR, DEATHSTAR_ID, false, true),
        ],
        ipcache: vec![],
        rules: vec![
            rule(
                TIEFIGHTER,
                Direction::Egress,
                Protocol::Tcp,
                DEATHSTAR_ID,
                (8080, 8080),
                Action::Redirect(ProtocolHint::Http),
                POLICY_L7,
            ),
            rule(XWING, Direction::Egress, Protocol::Tcp, DEATHSTAR_ID, (8080, 8080), Action::Deny, POLICY_L4),
            rule(
                DEATHSTAR,
                Direction::Ingress,
                Protocol::Tcp,
                identity::ANY,
                (8080, 8080),
                Action::Redirect(ProtocolHint::Http),
                POLICY_L7,
            ),
        ],
    };
    let generation = node.apply(&snapshot)?;
    println!("policy generation {generation} is live");

    step("tiefighter: curl http://127.0.0.1:8080/ (redirected to the proxy, forwarded to the deathstar)");
    let (code, body) = node.curl(Some("tiefighter"), "http://127.0.0.1:8080/", &[])?;
    println!("curl exit {code}: {}", body.trim());
    ensure!(code == 0 && body == "Ship landed\n", "tiefighter should land");

    step("xwing: the same request is refused in the kernel (EPERM at connect)");
    let probe = node.probe(Some("xwing"), &["tcp-connect", "127.0.0.1", "8080"])?;
    println!("connect(): {probe}");
    ensure!(probe == "EPERM", "xwing should get EPERM");

    step(
        "a host outside the node: curl http://10.231.99.1:8080/ (sk_lookup steers it to the proxy's ingress listener)",
    );
    let out = node.run_on_peer(&outside, &["curl", "-sS", "--max-time", "10", "http://10.231.99.1:8080/"])?;
    println!("curl: {}", String::from_utf8_lossy(&out.stdout).trim());
    ensure!(out.status.success(), "outside host should reach the deathstar: {}", String::from_utf8_lossy(&out.stderr));

    step("flows (GET 127.0.0.1:15000/v1/flows): kernel verdicts and proxied connections");
    for flow in node.flows()? {
        println!(
            "{} {:7} {:8} {:>15}:{:<5} -> {:>15}:{:<5} {}{}",
            flow["time"].as_str().unwrap_or(""),
            flow["verdict"].as_str().unwrap_or(""),
            flow["direction"].as_str().unwrap_or(""),
            flow["source"]["ip"].as_str().unwrap_or(""),
            flow["source"]["port"],
            flow["destination"]["ip"].as_str().unwrap_or(""),
            flow["destination"]["port"],
            flow["observer"].as_str().unwrap_or(""),
            flow["proxy"]["original_dst_via"]
                .as_str()
                .map(|v| format!(" (original destination via {v})"))
                .unwrap_or_default(),
        );
    }

    step("BPF counters (also at /metrics as l7mesh_bpf_*)");
    let counters = node.counters()?;
    for (counter, value) in &counters.values {
        if *value > 0 {
            println!("{:>20} {value}", counter.name());
        }
    }
    ensure!(
        counters.get(redirector::CounterKind::SkMsgRedirects) > 0,
        "the sk_msg short-circuit should carry the tiefighter's bytes"
    );

    step("clean up: stop the proxy, remove the datapath, cgroups and namespaces");
    node.stop_proxy().context("stopping l7proxy")?;
    drop(node);
    println!("done");
    Ok(())
}

//! The l7mesh demo node: `l7ctl up` in a network namespace of its own, real workloads started
//! with `l7ctl run` (an HTTP service, a gRPC service, a Kafka broker with a producer and a
//! consumer), an external HTTPS API on another host, the example policies applied with
//! `l7ctl apply`, then real traffic that is allowed and denied in each protocol's own terms,
//! a TLS origination, `l7ctl observe`, `l7ctl explain`, the service map, a simulation and the metrics.
//! Everything is removed at the end.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use integration::*;

const PY: &str = "/usr/bin/python3";
const PEERS_PY: &str = "/opt/l7mesh-peers/bin/python";

fn step(title: &str) {
    println!("\n==> {title}");
}

fn examples() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// What a client printed, on one line (its stderr when it printed nothing else, e.g. curl's
/// or the probe's errors; librdkafka's log lines are left out).
fn text(o: &std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&o.stdout);
    let shown = if stdout.trim().is_empty() { String::from_utf8_lossy(&o.stderr) } else { stdout };
    shown.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `l7ctl ARGS`, printed as a person would see it; must succeed.
fn l7ctl(node: &TestNode, args: &[&str]) -> Result<String> {
    println!("$ l7ctl {}", args.join(" "));
    let o = node.l7ctl(args)?;
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    print!("{out}");
    eprint!("{}", String::from_utf8_lossy(&o.stderr));
    ensure!(o.status.success(), "l7ctl {args:?} failed");
    Ok(out)
}

/// Runs CMD as workload NAME and prints what it got.
fn call(node: &TestNode, who: &str, labels: &str, what: &str, cmd: &[&str]) -> Result<String> {
    let o = node.l7ctl_run(who, labels, cmd)?;
    let got = text(&o);
    println!("{who:>14} | {what:<44} | {got}");
    Ok(got)
}

fn wait_for(what: &str, mut ready: impl FnMut() -> bool) -> Result<()> {
    for _ in 0..300 {
        if ready() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    anyhow::bail!("{what} did not start")
}

/// The external API's CA and certificate (api.external.example, 10.231.60.2): another
/// organisation's PKI, not the mesh's.
fn external_pki(dir: &Path) -> Result<()> {
    test_ca(dir, "external-ca")?;
    test_leaf(
        dir,
        "api",
        "api.external.example",
        "subjectAltName=DNS:api.external.example,IP:10.231.60.2\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
}

/// `l7mesh-demo --nodes 3`: three nodes on one etcd (each a network namespace with its own
/// `l7ctl up --kvstore`, on one bridge; etcd in a namespace of its own). The same workloads
/// on every node; one apply on node-0 is in force on all three, which the traffic on node-2
/// shows; every node lists every node's workloads; etcd stopped, the nodes keep enforcing and
/// say so, then catch up; a killed node's workloads expire from the others.
fn cluster_demo(nodes: usize) -> Result<()> {
    println!("l7mesh demo: {nodes} nodes, one policy set on a real etcd");
    ensure!((2..=5).contains(&nodes), "--nodes takes 2 to 5");
    let mut c = TestCluster::new("demo", nodes)?;
    step(&format!(
        "etcd on {CLUSTER_ETCD}; on every node: l7ctl up --kvstore etcd://{CLUSTER_ETCD} --node-name node-N"
    ));
    for i in 0..nodes {
        c.start_node(i, &[])?;
        let node = &mut c.nodes[i];
        let deathstar = node.copy_script("deathstar.py")?;
        node.spawn_l7ctl_run(
            "deathstar",
            "org=empire,class=deathstar",
            &[PY, "-u", &deathstar, "8080"],
            "deathstar.log",
        )?;
        wait_for("deathstar", || node.log("deathstar.log").contains("serving"))?;
        node.spawn_l7ctl_run("idle", "org=empire,class=shuttle", &["sleep", "3600"], "idle.log")?;
        println!("node-{i} ready ({}): deathstar on :8080, a shuttle", TestCluster::node_address(i));
    }

    step("the cluster's trust: one root (kept off the nodes), each node its own intermediate");
    let root = c.nodes[0].log_dir.join("operator-root");
    let r = root.display().to_string();
    let l7ctl_bin = workspace_bin("l7ctl")?;
    let operator = |args: &[&str]| -> Result<()> {
        println!("$ l7ctl {}", args.join(" "));
        let o = std::process::Command::new(&l7ctl_bin).args(args).output()?;
        print!("{}", String::from_utf8_lossy(&o.stdout));
        ensure!(o.status.success(), "l7ctl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        Ok(())
    };
    operator(&["ca", "init", "--dir", &r, "--trust-domain", "example.org"])?;
    for i in 0..nodes {
        let bundle = root.join(format!("node-{i}.pem")).display().to_string();
        operator(&["ca", "issue-node", &format!("node-{i}"), "--dir", &r, "--out", &bundle])?;
        let run_dir = c.nodes[i].run_dir().display().to_string();
        l7ctl(&c.nodes[i], &["ca", "install-node", &bundle, "--run-dir", &run_dir])?;
    }

    step("every node lists every node's workloads (node-1 asked)");
    let all = nodes * 2;
    wait_for("every workload listed", || {
        c.nodes[1]
            .l7ctl(&["get", "workloads", "-o", "json"])
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).lines().count() == all)
    })?;
    l7ctl(&c.nodes[1], &["get", "workloads"])?;

    step("apply Cilium's star-wars policy once, on node-0: stored in etcd, in force on every node");
    let policy = examples().join("policies/star-wars.yaml");
    l7ctl(&c.nodes[0], &["apply", "-f", policy.to_str().context("path")?])?;

    let last = nodes - 1;
    step(&format!("traffic on node-{last} follows it"));
    println!("{:>14} | {:<44} | result", "workload", "request");
    let node = &c.nodes[last];
    let empire = "org=empire,class=tiefighter";
    let curl = |who: &str, labels: &str, what: &str, method: &str, url: &str| {
        call(
            node,
            who,
            labels,
            what,
            &["curl", "-sS", "--max-time", "10", "-w", " (HTTP %{http_code})", "-X", method, url],
        )
    };
    let landing = curl(
        "tiefighter",
        empire,
        "HTTP POST /v1/request-landing",
        "POST",
        "http://127.0.0.1:8080/v1/request-landing",
    )?;
    ensure!(landing.contains("Ship landed"), "the tiefighter should land");
    let exhaust =
        curl("tiefighter", empire, "HTTP PUT /v1/exhaust-port", "PUT", "http://127.0.0.1:8080/v1/exhaust-port")?;
    ensure!(exhaust.contains("403"), "the exhaust port must be denied");
    let probe = node.probe_path().display().to_string();
    let xwing = call(
        node,
        "xwing",
        "org=alliance,class=xwing",
        "TCP connect deathstar:8080",
        &[PY, &probe, "tcp-connect", "127.0.0.1", "8080"],
    )?;
    ensure!(xwing.contains("EPERM"), "the xwing is refused in the kernel");

    step("across nodes: node-0's workloads call node-1's deathstar through the mTLS tunnel; node-1 judges them by the labels the tunnel proves");
    wait_for("both nodes to serve the tunnel", || {
        c.nodes[0]
            .l7ctl(&["get", "status", "-o", "json"])
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).matches("\"tunnel_port\":15008").count() == nodes)
    })?;
    let from = &c.nodes[0];
    let far = format!("http://{}:8080", TestCluster::node_address(1));
    let landing = call(
        from,
        "tiefighter",
        empire,
        "node-0 -> node-1 POST /v1/request-landing",
        &[
            "curl",
            "-sS",
            "--max-time",
            "10",
            "-w",
            " (HTTP %{http_code})",
            "-X",
            "POST",
            &format!("{far}/v1/request-landing"),
        ],
    )?;
    ensure!(landing.contains("Ship landed"), "the tiefighter should land on node-1");
    let exhaust = call(
        from,
        "tiefighter",
        empire,
        "node-0 -> node-1 PUT /v1/exhaust-port",
        &[
            "curl",
            "-sS",
            "--max-time",
            "10",
            "-w",
            " (HTTP %{http_code})",
            "-X",
            "PUT",
            &format!("{far}/v1/exhaust-port"),
        ],
    )?;
    ensure!(exhaust.contains("403"), "the exhaust port must be denied on node-1");
    let xwing = call(
        from,
        "xwing",
        "org=alliance,class=xwing",
        "node-0 -> node-1 POST /v1/request-landing",
        &[
            "curl",
            "-sS",
            "--max-time",
            "10",
            "-w",
            " (HTTP %{http_code})",
            "-X",
            "POST",
            &format!("{far}/v1/request-landing"),
        ],
    )?;
    ensure!(xwing.contains("000"), "the xwing is refused by node-1");

    step("etcd stopped: every node keeps enforcing its last set, and says so");
    c.stop_etcd()?;
    wait_for("node-0 to notice", || {
        c.nodes[0]
            .l7ctl(&["get", "status", "-o", "json"])
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("\"connected\":false"))
    })?;
    let o = c.nodes[0].l7ctl(&["status"])?;
    for line in String::from_utf8_lossy(&o.stdout).lines().filter(|l| l.starts_with("kvstore")) {
        println!("$ l7ctl status | grep kvstore\n{line}");
    }
    let node = &c.nodes[last];
    let exhaust = call(
        node,
        "tiefighter",
        empire,
        "HTTP PUT /v1/exhaust-port (etcd down)",
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
    )?;
    ensure!(exhaust.contains("403"), "still denied while etcd is down");
    c.start_etcd()?;
    wait_for("node-0 to reconnect", || {
        c.nodes[0]
            .l7ctl(&["get", "status", "-o", "json"])
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("\"connected\":true"))
    })?;
    println!("etcd back: every node reconnected by itself");

    step(&format!("node-{last} killed (kill -9 of its l7ctl up): its workloads expire from the others with its lease"));
    c.nodes[last].kill_node()?;
    let left = (nodes - 1) * 2;
    wait_for("the lease to expire", || {
        c.nodes[0]
            .l7ctl(&["get", "workloads", "-o", "json"])
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).lines().count() == left)
    })?;
    l7ctl(&c.nodes[0], &["get", "workloads"])?;
    println!("\ndone: the cluster is removed");
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--nodes") {
        let n = args.get(i + 1).and_then(|n| n.parse().ok()).context("--nodes N (2 to 5)")?;
        if n > 1 {
            return cluster_demo(n);
        }
    }
    println!("l7mesh demo: one node, CiliumNetworkPolicy, real workloads, real traffic");
    let mut node = TestNode::new("demo")?;
    let policies = examples().join("policies");
    let policy_dir = policies.to_str().context("path")?;

    step("validate the example policies (examples/policies/)");
    l7ctl(&node, &["validate", "-f", policy_dir])?;

    step("l7ctl up: TLS broker + policy-api + l7proxy with the eBPF redirector");
    let empty = node.log_dir.join("no-policy-yet");
    std::fs::create_dir_all(&empty)?;
    // An external API on another host (its own network namespace), reached through TLS.
    let external = node.add_peer_host(60)?;
    node.start_node(&empty, &[])?;
    println!("node ready");

    step("start the workloads with `l7ctl run` (each in its own cgroup, as nobody)");
    let deathstar = node.copy_script("deathstar.py")?;
    node.spawn_l7ctl_run("deathstar", "org=empire,class=deathstar", &[PY, "-u", &deathstar, "8080"], "deathstar.log")?;
    let greeter = node.copy_script("greeter.py")?;
    node.spawn_l7ctl_run("greeter", "app=greeter", &[PEERS_PY, "-u", &greeter, "serve", "50051"], "greeter.log")?;
    node.spawn_tansu_workload("kafka", "app=kafka")?;
    wait_for("deathstar", || node.log("deathstar.log").contains("serving"))?;
    wait_for("greeter", || node.log("greeter.log").contains("serving"))?;
    node.probe(None, &["wait-tcp", "127.0.0.1", "9092", "20"])?;
    for topic in ["empire-announce", "deathstar-plans"] {
        let o = node
            .run(None, &[TANSU, "topic", "create", "--broker", "tcp://127.0.0.1:9092", "--partitions", "1", topic])?;
        ensure!(o.status.success(), "creating topic {topic}: {}", text(&o));
    }
    // The external HTTPS API: OpenSSL's s_server serving files, with its own CA's certificate.
    let www = node.log_dir.join("external");
    std::fs::create_dir_all(www.join("public"))?;
    std::fs::create_dir_all(www.join("secret"))?;
    std::fs::write(www.join("public/status"), "external API: all systems nominal\n")?;
    std::fs::write(www.join("secret/plans"), "the plans\n")?;
    external_pki(&www)?;
    let serve =
        format!("cd {} && exec openssl s_server -quiet -WWW -accept 443 -cert api.pem -key api.key", www.display());
    node.spawn_on_peer(&external, &["sh", "-c", &serve], "external.log")?;
    wait_for("the external API", || {
        node.probe_from_peer(&external, &["wait-tcp", "10.231.60.2", "443", "1"]).is_ok_and(|s| !s.contains("nothing"))
    })?;
    println!("deathstar (HTTP :8080), greeter (gRPC :50051), kafka (Tansu :9092), api.external.example (HTTPS, 10.231.60.2:443)");

    step("hand the external API's CA to the broker (the workloads never hold it), then apply the policies");
    let ca = www.join("ca.pem");
    l7ctl(
        &node,
        &[
            "secret",
            "import",
            "external-ca",
            "--ca",
            ca.to_str().context("path")?,
            "--run-dir",
            node.run_dir().to_str().context("path")?,
        ],
    )?;
    l7ctl(&node, &["apply", "-f", policy_dir])?;
    l7ctl(&node, &["get", "policies"])?;

    step("traffic: allowed and denied, each in its protocol's own terms");
    println!("{:>14} | {:<44} | result", "workload", "request");
    let empire = "org=empire,class=tiefighter";
    let curl = |who: &str, labels: &str, what: &str, method: &str, url: &str| {
        call(
            &node,
            who,
            labels,
            what,
            &["curl", "-sS", "--max-time", "10", "-w", " (HTTP %{http_code})", "-X", method, url],
        )
    };
    let landing = curl(
        "tiefighter",
        empire,
        "HTTP POST /v1/request-landing",
        "POST",
        "http://127.0.0.1:8080/v1/request-landing",
    )?;
    ensure!(landing.contains("Ship landed"), "the tiefighter should land");
    let exhaust =
        curl("tiefighter", empire, "HTTP PUT /v1/exhaust-port", "PUT", "http://127.0.0.1:8080/v1/exhaust-port")?;
    ensure!(exhaust.contains("Access denied") && exhaust.contains("403"), "the exhaust port must be denied");
    let probe = node.probe_path().display().to_string();
    let xwing = call(
        &node,
        "xwing",
        "org=alliance,class=xwing",
        "TCP connect deathstar:8080",
        &[PY, &probe, "tcp-connect", "127.0.0.1", "8080"],
    )?;
    ensure!(xwing.contains("EPERM"), "the xwing is refused in the kernel");
    let hello = call(
        &node,
        "tiefighter",
        empire,
        "gRPC helloworld.Greeter/SayHello",
        &[PEERS_PY, &greeter, "call", "127.0.0.1:50051", "SayHello"],
    )?;
    ensure!(hello.starts_with("OK"), "SayHello is allowed");
    let bye = call(
        &node,
        "tiefighter",
        empire,
        "gRPC helloworld.Greeter/SayGoodbye",
        &[PEERS_PY, &greeter, "call", "127.0.0.1:50051", "SayGoodbye"],
    )?;
    ensure!(bye.contains("PERMISSION_DENIED"), "SayGoodbye is denied");
    let kclient = node.copy_script("kclient.py")?;
    let b = "127.0.0.1:9092";
    let produced = call(
        &node,
        "empire-hq",
        "app=empire-hq",
        "Kafka produce empire-announce",
        &[PEERS_PY, &kclient, "produce", b, "empire-announce", "the emperor arrives"],
    )?;
    ensure!(produced == "OK", "headquarters may announce");
    let plans = call(
        &node,
        "empire-hq",
        "app=empire-hq",
        "Kafka produce deathstar-plans",
        &[PEERS_PY, &kclient, "produce", b, "deathstar-plans", "the plans"],
    )?;
    ensure!(plans.contains("TOPIC_AUTHORIZATION_FAILED"), "deathstar-plans is not headquarters' to write");
    let consumed = call(
        &node,
        "empire-outpost",
        "app=empire-outpost",
        "Kafka consume empire-announce",
        &[PEERS_PY, &kclient, "consume", b, "empire-announce"],
    )?;
    ensure!(consumed == "the emperor arrives", "the outpost reads announcements");
    let forged = call(
        &node,
        "empire-outpost",
        "app=empire-outpost",
        "Kafka produce empire-announce",
        &[PEERS_PY, &kclient, "produce", b, "empire-announce", "forged"],
    )?;
    ensure!(forged.contains("TOPIC_AUTHORIZATION_FAILED"), "the outpost may not write");
    let scout = "org=empire,class=scout";
    let status =
        curl("scout", scout, "HTTP GET :443/public/status (TLS out)", "GET", "http://10.231.60.2:443/public/status")?;
    ensure!(status.contains("all systems nominal") && status.contains("200"), "TLS origination to the external API");
    let secret = curl("scout", scout, "HTTP GET :443/secret/plans", "GET", "http://10.231.60.2:443/secret/plans")?;
    ensure!(secret.contains("403"), "only /public on the external API");
    let direct = call(
        &node,
        "scout",
        scout,
        "plain TCP to 10.231.60.2:8443 (no rule)",
        &[PY, &probe, "tcp-connect", "10.231.60.2", "8443"],
    )?;
    ensure!(direct.contains("EPERM"), "the scout's other egress is denied");

    step("l7ctl get workloads");
    l7ctl(&node, &["get", "workloads"])?;

    step("l7ctl observe --protocol http (every L7 request, with its verdict and policy)");
    l7ctl(&node, &["observe", "--protocol", "http"])?;
    step("l7ctl observe --verdict denied (kernel and proxy denials, every protocol)");
    l7ctl(&node, &["observe", "--verdict", "denied"])?;
    step("l7ctl explain --protocol http (why: the deciding policy rule, and what did not match)");
    let explained = l7ctl(&node, &["explain", "--protocol", "http"])?;
    ensure!(
        explained.lines().any(|l| l.contains("PUT /v1/exhaust-port") && l.contains("no rule matched")),
        "the exhaust-port denial is not explained: {explained}"
    );

    step("l7ctl servicemap (Graphviz DOT; rendered to SVG beside it)");
    let dot = l7ctl(&node, &["servicemap"])?;
    let out_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/demo");
    std::fs::create_dir_all(&out_dir)?;
    std::fs::write(out_dir.join("servicemap.dot"), &dot)?;
    let svg = std::process::Command::new("dot")
        .args(["-Tsvg", "-o"])
        .arg(out_dir.join("servicemap.svg"))
        .arg(out_dir.join("servicemap.dot"))
        .status();
    match svg {
        Ok(s) if s.success() => println!("wrote {}", out_dir.join("servicemap.svg").canonicalize()?.display()),
        _ => println!("(Graphviz `dot` not found: `make setup` installs it)"),
    }

    step("l7ctl simulate -f examples/candidates/deathstar-lockdown.yaml (nothing is applied; exit 3: it changes a verdict)");
    let candidate = examples().join("candidates/deathstar-lockdown.yaml");
    let args = ["simulate", "-f", candidate.to_str().context("path")?];
    println!("$ l7ctl {}", args.join(" "));
    let o = node.l7ctl(&args)?;
    let sim = String::from_utf8_lossy(&o.stdout).into_owned();
    print!("{sim}");
    eprint!("{}", String::from_utf8_lossy(&o.stderr));
    ensure!(o.status.code() == Some(3), "simulate exits 3 when the candidate changes a verdict: {}", o.status);
    ensure!(sim.contains("1 newly denied"), "the lockdown would deny the landing");

    step("per-policy verdicts (l7proxy's /metrics)");
    for line in node.admin("/metrics")?.lines().filter(|l| l.starts_with("l7mesh_policy_")) {
        println!("{line}");
    }

    step("stop the node (SIGTERM to l7ctl up): the pinned datapath keeps enforcing");
    node.stop_node()?;
    for line in node.node_log().lines().filter(|l| l.contains("the datapath stays pinned")) {
        println!("{line}");
    }

    step("l7ctl down --uninstall: remove enforcement");
    let down = node.down(&["--uninstall"])?;
    ensure!(down.status.success(), "l7ctl down --uninstall failed: {}", String::from_utf8_lossy(&down.stderr));
    for line in String::from_utf8_lossy(&down.stdout).lines().filter(|l| !l.contains("removed /")) {
        println!("{line}");
    }
    drop(node);
    println!("done: datapath, cgroups and namespaces removed");
    Ok(())
}

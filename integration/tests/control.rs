//! The control plane against a running node: `l7ctl apply / get / delete / observe /
//! simulate / servicemap` through policy-api, live changes on open keep-alive and HTTP/2
//! connections, atomic rejection of invalid input, restarts of policy-api and l7proxy, audit
//! mode, simulation, flow filters and the service map. Real workloads, real nginx, real curl.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use integration::{stderr, stdout, HeldAt, HeldClient, LiveClient, TestNode};

const PY: &str = "/usr/bin/python3";

/// `l7ctl ARGS`, which must succeed; its stdout.
fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// A node started with an empty policy directory: everything comes through `l7ctl apply`.
fn node_without_policy(name: &str) -> TestNode {
    let mut node = TestNode::new(name).unwrap();
    let dir = node.log_dir.join("policies");
    std::fs::create_dir_all(&dir).unwrap();
    node.start_node(&dir, &[]).unwrap();
    node
}

/// The client workload's egress policy on nginx's ports: GET on the paths `paths` allows.
fn client_policy(name: &str, paths: &str, audit: bool) -> String {
    let annotations = if audit { "\n  annotations:\n    l7mesh.io/audit: \"true\"" } else { "" };
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: {name}{annotations}\nspec:\n  endpointSelector:\n    matchLabels:\n      app: client\n  egress:\n  - toEntities: [host]\n    toPorts:\n    - ports:\n      - port: \"8443\"\n        protocol: TCP\n      - port: \"8444\"\n        protocol: TCP\n      rules:\n        http:\n        - method: GET\n          path: \"{paths}\"\n"
    )
}

/// The client's egress on port 9443 terminated with secret `secret`, with `rules`.
fn tls_policy(name: &str, secret: &str, rules: &str) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: {name}\nspec:\n  endpointSelector:\n    matchLabels:\n      app: client\n  egress:\n  - toPorts:\n    - ports:\n      - port: \"9443\"\n        protocol: TCP\n      terminatingTLS:\n        secret:\n          name: {secret}\n      rules:\n        {rules}\n"
    )
}

fn apply(node: &TestNode, name: &str, yaml: &str) -> (String, Duration) {
    let file = write(node, name, yaml);
    let started = Instant::now();
    let o = node.l7ctl_ok(&["apply", "-f", file.to_str().unwrap()]);
    (o, started.elapsed())
}

fn write(node: &TestNode, name: &str, yaml: &str) -> PathBuf {
    let dir = node.log_dir.join("candidates");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(name);
    std::fs::write(&file, yaml).unwrap();
    file
}

#[test]
fn apply_update_and_delete_change_enforcement_on_open_keepalive_and_http2_connections() {
    let mut node = node_without_policy("live-apply");
    node.start_nginx_h1_h2().unwrap();
    let (o, _) = apply(&node, "v1.yaml", &client_policy("live", "/(public|private)/.*", false));
    assert!(o.contains("default/live created"), "{o}");
    let mut client = LiveClient::start(&mut node).unwrap();
    assert_eq!(client.get(&node, "/private/a"), "200 200 same");
    assert_eq!(client.get(&node, "/admin"), "403 403 same");

    // Update: /private is no longer allowed. The very next request on each open connection is
    // denied; the connections stay (no allowed connection is dropped).
    let (o, took) = apply(&node, "v2.yaml", &client_policy("live", "/public/.*", false));
    assert!(o.contains("default/live updated"), "{o}");
    let first = client.get(&node, "/private/a");
    assert_eq!(first, "403 403 same", "the first request after `l7ctl apply` returned");
    assert_eq!(client.get(&node, "/public/b"), "200 200 same");
    let status: serde_json::Value = serde_json::from_str(&node.l7ctl_ok(&["get", "policies", "-o", "json"])).unwrap();
    assert_eq!(status["revision"], 2);
    let yaml = node.l7ctl_ok(&["get", "policies", "-o", "yaml"]);
    assert!(yaml.contains("kind: CiliumNetworkPolicy") && yaml.contains("path: /public/.*"), "{yaml}");
    let table = node.l7ctl_ok(&["get", "policies"]);
    assert!(table.starts_with("NAMESPACE") && table.contains("live") && table.contains("enforce"), "{table}");
    let workloads = node.l7ctl_ok(&["get", "workloads"]);
    assert!(
        workloads.contains("client") && workloads.contains("app=client") && workloads.contains("egress"),
        "{workloads}"
    );
    let line = o.lines().find(|l| l.starts_with("policy version")).unwrap_or_default().to_string();
    println!(
        "propagation: `l7ctl apply` returned {:.1} ms after it started ({line}); the first request on the open \
         HTTP/1.1 and HTTP/2 connections after that was denied",
        took.as_secs_f64() * 1000.0
    );

    // Delete: the client is no longer restricted, and its ports are no longer marked for the
    // proxy, so both proxied connections are closed (before `delete` returns) to reconnect
    // directly; the client's next connection is allowed.
    let o = node.l7ctl_ok(&["delete", "policy", "live"]);
    assert!(o.contains("default/live deleted") && o.contains("2 connection(s) closed: 0 denied, 2 rerouted"), "{o}");
    let after = client.get(&node, "/private/a");
    assert!(after.starts_with("error:") && after.contains(" closed "), "{after}");
    client.quit();
    let o = node.l7ctl(&["delete", "policy", "live"]).unwrap();
    assert!(!o.status.success() && stderr(&o).contains("no policy `default/live`"), "{}", stderr(&o));
    assert!(node.l7ctl_ok(&["get", "policies"]).lines().count() == 1, "only the header is left");
    // The version history says what each write did, through the REST API with the node's token.
    let token = std::fs::read_to_string(node.run_dir().join("api-token")).unwrap();
    let auth = format!("Authorization: Bearer {}", token.trim());
    let history = stdout(&node.run(None, &["curl", "-sS", "-H", &auth, "http://127.0.0.1:9090/v1/history"]).unwrap());
    let history: Vec<serde_json::Value> = serde_json::from_str(&history).unwrap();
    let live: Vec<(String, u64)> = history
        .iter()
        .flat_map(|h| h["changes"].as_array().unwrap().clone())
        .filter(|c| c[0] == "default/live")
        .map(|c| (c[1].as_str().unwrap().to_string(), c[2].as_u64().unwrap()))
        .collect();
    assert_eq!(live, [("created".to_string(), 1), ("updated".to_string(), 2), ("deleted".to_string(), 2)]);
    // A dry run validates on the node and changes nothing.
    let file = write(&node, "dry.yaml", &client_policy("dry", "/x/.*", false));
    let o = node.l7ctl_ok(&["apply", "--dry-run", "-f", file.to_str().unwrap()]);
    assert!(o.contains("1 policies valid; nothing applied"), "{o}");
    assert!(node.l7ctl_ok(&["get", "policies", "-o", "json"]).trim().is_empty(), "the dry run stored nothing");
    assert!(node.l7ctl_ok(&["get", "policies", "-o", "json"]).trim().is_empty());

    // A version that denies these connections at L4: l7proxy closes both (they are proxied),
    // with a flow saying why; a new connection is refused in the kernel.
    apply(&node, "v3.yaml", &client_policy("live", "/public/.*", false));
    let at = HeldAt::Workload { name: "client2", labels: "app=client" };
    let mut held = HeldClient::start(&mut node, at, "held", &["h1=h1:127.0.0.1:8444", "h2=h2:127.0.0.1:8443"]).unwrap();
    assert_eq!(held.statuses("/public/b").unwrap(), "h1:200 same, h2:200 same");
    let l4_only = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: live\nspec:\n  endpointSelector:\n    matchLabels:\n      app: client\n  egress:\n  - toPorts:\n    - ports:\n      - port: \"9999\"\n";
    let (o, _) = apply(&node, "l4.yaml", l4_only);
    assert!(o.contains("2 connection(s) closed: 2 denied, 0 rerouted"), "{o}");
    assert_eq!(held.statuses("/public/b").unwrap(), "h1:closed same, h2:closed same");
    assert_eq!(held.statuses("/public/b").unwrap(), "h1:connect:PermissionError new, h2:connect:PermissionError new");
    let closed: Vec<serde_json::Value> = json_lines(&node.l7ctl_ok(&["observe", "-o", "json", "--verdict", "denied"]))
        .into_iter()
        .filter(|f| f["reason"].as_str().is_some_and(|r| r.starts_with("closed: policy version")))
        .collect();
    assert_eq!(closed.len(), 2, "{closed:#?}");
    assert!(closed.iter().all(|f| f["source"]["workload"] == "client2"), "{closed:#?}");
    held.quit();
}

#[test]
fn invalid_policies_change_nothing_and_restarts_lose_nothing() {
    let mut node = node_without_policy("control-restart");
    node.start_nginx_h1_h2().unwrap();
    apply(&node, "good.yaml", &client_policy("live", "/public/.*", false));
    let before = node.l7ctl_ok(&["get", "policies", "-o", "json"]);

    // Each is rejected as a whole with file, line and field; nothing changes.
    let bad = [
        ("regex.yaml", client_policy("live", "/public/(", false), "rules.http[0].path"),
        ("unknown.yaml", client_policy("live", "/x", false).replace("method: GET", "methd: GET"), "methd"),
        ("port.yaml", client_policy("live", "/x", false).replace("\"8444\"", "\"70000\""), "port"),
        ("yaml.yaml", "apiVersion: cilium.io/v2\nkind: [\n".to_string(), "yaml.yaml"),
        ("kafka-tls.yaml", tls_policy("kafka-tls", "web-tls", "kafka:\n        - role: produce"), "rules.kafka"),
    ];
    for (name, yaml, expect) in &bad {
        let file = write(&node, name, yaml);
        let o = node.l7ctl(&["apply", "-f", file.to_str().unwrap()]).unwrap();
        assert!(!o.status.success(), "{name} was accepted");
        let e = stderr(&o);
        assert!(e.contains(&format!("{}:", file.display())) && e.contains(expect), "{name}: {e}");
        assert!(e.contains("nothing was applied"), "{e}");
    }
    // Two policies that ask for different certificates on one port contradict each other:
    // refused whole, naming both.
    let two = format!(
        "{}---\n{}",
        tls_policy("tls-a", "cert-a", "http:\n        - method: GET"),
        tls_policy("tls-b", "cert-b", "http:\n        - method: GET")
    );
    let file = write(&node, "conflict.yaml", &two);
    let o = node.l7ctl(&["apply", "-f", file.to_str().unwrap()]).unwrap();
    let e = stderr(&o);
    assert!(!o.status.success(), "conflicting TLS settings were accepted");
    assert!(
        e.contains("conflicting TLS settings") && e.contains("default/tls-a") && e.contains("default/tls-b"),
        "{e}"
    );
    assert!(e.contains("nothing was applied"), "{e}");
    // The API is root's: without the node's token (0600 in the run dir) nothing under /v1.
    let code = |path: &str, extra: &[&str]| {
        let url = format!("http://127.0.0.1:9090{path}");
        let mut args = vec!["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}"];
        args.extend(extra);
        args.push(&url);
        stdout(&node.run(None, &args).unwrap())
    };
    assert_eq!(code("/v1/policies", &[]), "401");
    assert_eq!(code("/v1/policies", &["-X", "POST", "--data-binary", "x"]), "401");
    assert_eq!(code("/healthz", &[]), "200");
    assert_eq!(code("/openapi.json", &[]), "200");
    let token = node.run_dir().join("api-token");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(std::fs::metadata(&token).unwrap().permissions().mode() & 0o777, 0o600);
    let o = node.l7ctl_run("snoop", "app=snoop", &["cat", token.to_str().unwrap()]).unwrap();
    assert!(!o.status.success() && stdout(&o).is_empty(), "a workload read the API token");
    // Nor can a workload reach the node's control ports at all (the API, l7proxy's admin):
    // denied in the kernel whatever policy says, even with no policy selecting it.
    let probe = node.probe_path().display().to_string();
    for port in ["9090", "15000"] {
        let o = node.l7ctl_run("snoop", "app=snoop", &[PY, &probe, "tcp-connect", "127.0.0.1", port]).unwrap();
        assert_eq!(stdout(&o).trim(), "EPERM", "a workload reached 127.0.0.1:{port}");
    }
    let o = node.l7ctl_run("snoop", "app=snoop", &[PY, &probe, "tcp-connect", "127.0.0.1", "8444"]).unwrap();
    assert_eq!(stdout(&o).trim(), "ok", "other host ports stay as policy says");

    // Atomic: a directory with one good and one bad document applies neither.
    let dir = node.log_dir.join("mixed");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("a.yaml"), client_policy("other", "/other/.*", false)).unwrap();
    std::fs::write(dir.join("b.yaml"), client_policy("third", "/x(", false)).unwrap();
    let o = node.l7ctl(&["apply", "-f", dir.to_str().unwrap()]).unwrap();
    assert!(!o.status.success() && stderr(&o).contains("b.yaml:"), "{}", stderr(&o));
    assert_eq!(node.l7ctl_ok(&["get", "policies", "-o", "json"]), before, "nothing changed");

    let curl = |path: &str| {
        let url = format!("http://127.0.0.1:8444{path}");
        stdout(
            &node
                .l7ctl_run("client", "app=client", &["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", &url])
                .unwrap(),
        )
    };
    assert_eq!(curl("/public/a"), "200");
    assert_eq!(curl("/private/a"), "403");

    // policy-api dies: `l7ctl up` restarts it; the store still has everything.
    let pid = node.pid_of("policy-api").expect("policy-api runs");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let o = node.l7ctl(&["get", "policies", "-o", "json"]).unwrap();
        if o.status.success() && node.pid_of("policy-api").is_some_and(|p| p != pid) {
            assert_eq!(stdout(&o), before, "policy-api restart lost nothing");
            break;
        }
        assert!(Instant::now() < deadline, "policy-api did not come back: {}", node.node_log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(curl("/private/a"), "403", "enforcement held across the policy-api restart");

    // l7proxy dies: restarted, it loads the current policy from the stream before it judges.
    let pid = node.pid_of("l7proxy").expect("l7proxy runs");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(node.pid_of("l7proxy").is_some_and(|p| p != pid)
        && node.admin("/readyz").map(|r| r.starts_with("ready")).unwrap_or(false))
    {
        assert!(Instant::now() < deadline, "l7proxy did not come back: {}", node.node_log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(curl("/public/a"), "200");
    assert_eq!(curl("/private/a"), "403", "the restarted l7proxy enforces the current policy");
    // A later change reaches the new proxy.
    apply(&node, "good2.yaml", &client_policy("live", "/(public|private)/.*", false));
    assert_eq!(curl("/private/a"), "200");
}

/// Flows of the client towards nginx's HTTP/1.1 port with a path under `prefix`.
fn http_flows(node: &TestNode, prefix: &str) -> Vec<serde_json::Value> {
    json_lines(&node.l7ctl_ok(&["observe", "-o", "json", "--protocol", "http", "--from", "app=client"]))
        .into_iter()
        .filter(|f| f["l7"]["http"]["url"].as_str().is_some_and(|u| u.contains(prefix)))
        .collect()
}

#[test]
fn audit_mode_and_simulation_predict_exactly_the_verdict_changes() {
    let mut node = node_without_policy("audit-sim");
    node.start_nginx_h1_h2().unwrap();
    apply(&node, "open.yaml", &client_policy("web", "/.*", false));
    let traffic = |round: &str| {
        let urls: Vec<String> = ["/public/a", "/public/b", "/public/c", "/private/x", "/private/y"]
            .iter()
            .map(|p| format!("http://127.0.0.1:8444{p}?round={round}"))
            .collect();
        let mut args = vec!["curl", "-sS", "-w", "%{http_code} "];
        for u in &urls {
            args.extend(["-o", "/dev/null", u.as_str()]);
        }
        stdout(&node.l7ctl_run("client", "app=client", &args).unwrap())
    };
    assert_eq!(traffic("1"), "200 200 200 200 200 ");

    // Simulate the stricter candidate on what was recorded: exactly the two /private requests
    // would be denied, nothing else changes.
    let candidate = client_policy("web", "/public/.*", false);
    let file = write(&node, "candidate.yaml", &candidate);
    // (Only reporting: by default a candidate that changes verdicts exits 3, see day2.rs.)
    let report: serde_json::Value = serde_json::from_str(&node.l7ctl_ok(&[
        "simulate",
        "--no-fail-on-change",
        "-f",
        file.to_str().unwrap(),
        "--since",
        "10m",
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(report["newly_denied"], 2, "{report:#}");
    assert_eq!(report["newly_allowed"], 0, "{report:#}");
    let changes = report["changes"].as_array().unwrap();
    let details: Vec<&str> = changes.iter().map(|c| c["detail"].as_str().unwrap()).collect();
    assert_eq!(details, ["GET http://127.0.0.1:8444/private/x?round=1", "GET http://127.0.0.1:8444/private/y?round=1"]);
    assert!(changes.iter().all(|c| c["before"] == "ALLOWED" && c["after"] == "DENIED" && c["from"] == "client"));
    assert!(changes.iter().all(|c| c["policy"] == "default/web"), "{changes:#?}");
    let table = node.l7ctl_ok(&["simulate", "--no-fail-on-change", "-f", file.to_str().unwrap()]);
    assert!(table.contains("2 newly denied") && table.contains("ALLOWED -> DENIED"), "{table}");
    assert_eq!(traffic("2"), "200 200 200 200 200 ", "simulation applied nothing");

    // Audit mode: the candidate applied with the annotation lets everything through and
    // records exactly the predicted denials as AUDIT, in the proxy and in the kernel.
    apply(&node, "audit.yaml", &client_policy("web", "/public/.*", true));
    assert_eq!(traffic("3"), "200 200 200 200 200 ");
    let round3 = http_flows(&node, "round=3");
    let audited: Vec<&str> =
        round3.iter().filter(|f| f["verdict"] == "AUDIT").map(|f| f["l7"]["http"]["url"].as_str().unwrap()).collect();
    assert_eq!(audited, ["http://127.0.0.1:8444/private/x?round=3", "http://127.0.0.1:8444/private/y?round=3"]);
    assert_eq!(round3.iter().filter(|f| f["verdict"] == "ALLOWED").count(), 3);
    // In the kernel: the audited egress default-deny lets a connection to another port through,
    // reported as AUDIT.
    let probe = node.probe_path().display().to_string();
    let o = node.l7ctl_run("client", "app=client", &[PY, &probe, "tcp-connect", "127.0.0.1", "8443"]).unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let o = node.l7ctl_run("client", "app=client", &[PY, &probe, "tcp-connect", "127.0.0.1", "9"]).unwrap();
    assert!(!stdout(&o).contains("EPERM"), "audit must not deny: {}", stdout(&o));
    let kernel_audit =
        json_lines(&node.l7ctl_ok(&["observe", "-o", "json", "--verdict", "audit", "--protocol", "tcp"]));
    assert!(
        kernel_audit.iter().any(|f| f["destination"]["port"] == 9
            && f["observer"].as_str().unwrap().starts_with("kernel")
            && f["decided_by"]["policy"] == "default/web"
            && f["reason"]["kind"] == "default_deny"),
        "{kernel_audit:#?}\nall flows: {}",
        node.l7ctl_ok(&["observe", "-o", "json"])
    );

    // Enforced: the same traffic now gets exactly the predicted denials.
    apply(&node, "enforce.yaml", &candidate);
    assert_eq!(traffic("4"), "200 200 200 403 403 ");
    let round4 = http_flows(&node, "round=4");
    let denied: Vec<&str> =
        round4.iter().filter(|f| f["verdict"] == "DENIED").map(|f| f["l7"]["http"]["url"].as_str().unwrap()).collect();
    assert_eq!(denied, ["http://127.0.0.1:8444/private/x?round=4", "http://127.0.0.1:8444/private/y?round=4"]);
    let metrics = node.admin("/metrics").unwrap();
    assert!(
        metrics.contains(
            "l7mesh_policy_request_verdicts_total{policy=\"default/web\",verdict=\"audit\",protocol=\"http\"} 2"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "l7mesh_policy_request_verdicts_total{policy=\"default/web\",verdict=\"denied\",protocol=\"http\"} 2"
        ),
        "{metrics}"
    );
    // The kernel's audited connect to port 9: web's (audit-mode) default deny, which its flow names.
    assert!(
        metrics.contains(
            "l7mesh_policy_connection_verdicts_total{policy=\"default/web\",verdict=\"audit\",observer=\"kernel\"} 1"
        ),
        "{metrics}"
    );

    assert!(metrics.contains("# TYPE l7mesh_bpf_"), "BPF counters are exported");
}

const DEATHSTAR_POLICY: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: rule1\nspec:\n  endpointSelector:\n    matchLabels:\n      class: deathstar\n  ingress:\n  - fromEndpoints:\n    - matchLabels:\n        org: empire\n    toPorts:\n    - ports:\n      - port: \"8080\"\n        protocol: TCP\n      rules:\n        http:\n        - method: POST\n          path: /v1/request-landing\n";

#[test]
fn observe_filters_and_the_service_map_match_the_traffic_sent() {
    let mut node = node_without_policy("observe");
    apply(&node, "rule1.yaml", DEATHSTAR_POLICY);
    let deathstar = node.copy_script("deathstar.py").unwrap();
    node.spawn_l7ctl_run("deathstar", "org=empire,class=deathstar", &[PY, "-u", &deathstar, "8080"], "deathstar.log")
        .unwrap();
    // (Only the empire may connect, so readiness is read from its log, not probed.)
    let deadline = Instant::now() + Duration::from_secs(15);
    while !node.log("deathstar.log").contains("serving") {
        assert!(Instant::now() < deadline, "deathstar did not start: {}", node.log("deathstar.log"));
        std::thread::sleep(Duration::from_millis(50));
    }

    // Follow from before the traffic: it must see the requests as they happen.
    let mut follow = node.l7ctl_command(&["observe", "--follow", "-o", "json", "--protocol", "http"]).unwrap();
    let mut follower = follow.stdout(std::process::Stdio::piped()).spawn().unwrap();
    let follower_out = follower.stdout.take().unwrap();
    let followed = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(follower_out).lines().take(5).map(|l| l.unwrap()).collect::<Vec<_>>()
    });
    std::thread::sleep(Duration::from_millis(500));

    // One curl, five requests (`--next` starts a group with its own method and options).
    let landing = "http://127.0.0.1:8080/v1/request-landing";
    let exhaust = "http://127.0.0.1:8080/v1/exhaust-port";
    let mut args = vec!["curl"];
    for (i, (method, url)) in
        [("POST", landing), ("POST", landing), ("POST", landing), ("PUT", exhaust), ("PUT", exhaust)].iter().enumerate()
    {
        if i > 0 {
            args.push("--next");
        }
        args.extend(["-sS", "-o", "/dev/null", "-w", "%{http_code} ", "-X", method, url]);
    }
    let o = node.l7ctl_run("tiefighter", "org=empire,class=tiefighter", &args).unwrap();
    assert_eq!(stdout(&o), "200 200 200 403 403 ", "{}", stderr(&o));
    let probe = node.probe_path().display().to_string();
    let o =
        node.l7ctl_run("xwing", "org=alliance,class=xwing", &[PY, &probe, "tcp-connect", "127.0.0.1", "8080"]).unwrap();
    assert!(stdout(&o).contains("EPERM"), "the alliance is refused in the kernel: {}", stdout(&o));

    let followed = followed.join().unwrap();
    let _ = follower.kill();
    let _ = follower.wait();
    let verdicts: Vec<String> =
        followed.iter().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["verdict"].to_string()).collect();
    assert_eq!(verdicts, ["\"ALLOWED\"", "\"ALLOWED\"", "\"ALLOWED\"", "\"DENIED\"", "\"DENIED\""]);

    let observe = |args: &[&str]| {
        let mut all = vec!["observe", "-o", "json"];
        all.extend(args);
        json_lines(&node.l7ctl_ok(&all))
    };
    let denied_empire = observe(&["--verdict", "denied", "--from", "org=empire"]);
    assert_eq!(denied_empire.len(), 2, "{denied_empire:#?}");
    assert!(denied_empire
        .iter()
        .all(|f| f["l7"]["http"]["method"] == "PUT" && f["source"]["workload"] == "tiefighter"));
    assert_eq!(observe(&["--protocol", "http", "--from", "workload=tiefighter"]).len(), 5);
    assert_eq!(observe(&["--protocol", "http", "--to", "class=deathstar", "--verdict", "allowed"]).len(), 3);
    let alliance = observe(&["--from", "org=alliance"]);
    assert_eq!(alliance.len(), 1, "{alliance:#?}");
    assert_eq!(
        (alliance[0]["verdict"].as_str(), alliance[0]["observer"].as_str()),
        (Some("DENIED"), Some("kernel:connect"))
    );
    assert_eq!(observe(&["--protocol", "kafka"]).len(), 0);
    assert_eq!(observe(&["--since", "10m", "--from", "org=empire", "--protocol", "http"]).len(), 5);
    let o = node.l7ctl(&["observe", "--since", "soon"]).unwrap();
    assert!(!o.status.success() && stderr(&o).contains("since"), "{}", stderr(&o));
    // A window reaching before the representable past is a 400 with the reason, from l7ctl,
    // policy-api and l7proxy's own admin API alike (it once overflowed a date in the proxy);
    // and a filter with multi-byte text after a `%` is read, not a panic of the admin API.
    let o = node.l7ctl(&["observe", "--since", "99999999d"]).unwrap();
    assert!(!o.status.success() && stderr(&o).contains("since"), "{}", stderr(&o));
    let admin = |query: &str| {
        let url = format!("http://127.0.0.1:15000/v1/flows?{query}");
        let auth = node.api_authorization().unwrap();
        let o = node
            .run(None, &["curl", "-s", "--max-time", "5", "-H", &auth, "-o", "/dev/null", "-w", "%{http_code}", &url])
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert_eq!(admin("since=99999999d"), "400");
    assert_eq!(admin("since=18446744073709551615"), "400");
    assert_eq!(admin("observer=%25a%C7%96p"), "200");
    assert_eq!(admin("observer=%a%C7%96"), "200");
    assert!(node.admin("/readyz").is_ok(), "the admin API still answers");
    let table = node.l7ctl_ok(&["observe", "--verdict", "denied", "--from", "org=empire"]);
    assert!(table.starts_with("TIME") && table.contains("PUT http://127.0.0.1:8080/v1/exhaust-port -> 403"), "{table}");

    // The service map: one edge per pair, with the protocols, counts and denials sent.
    let map = json_lines(&node.l7ctl_ok(&["servicemap", "-o", "json"]));
    let edge = |from: &str| {
        map.iter()
            .find(|l| l["edge"]["from"] == from && l["edge"]["to"] == "deathstar")
            .map(|l| l["edge"].clone())
            .unwrap_or_else(|| panic!("no edge {from} -> deathstar in {map:#?}"))
    };
    let empire = edge("tiefighter");
    assert_eq!((empire["requests"].as_u64(), empire["denied"].as_u64()), (Some(5), Some(2)), "{empire}");
    assert!(empire["protocols"].as_array().unwrap().contains(&"http".into()));
    let alliance = edge("xwing");
    assert_eq!(
        (alliance["requests"].as_u64(), alliance["connections"].as_u64(), alliance["denied"].as_u64()),
        (Some(0), Some(1), Some(1))
    );
    let dot = node.l7ctl_ok(&["servicemap"]);
    assert!(dot.starts_with("digraph l7mesh") && dot.contains("\"tiefighter\" -> \"deathstar\""), "{dot}");
    assert!(dot.contains("5 req") && dot.contains("2 denied"), "{dot}");
    let mut graphviz = std::process::Command::new("dot")
        .arg("-Tsvg")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("Graphviz `dot` (make setup installs it)");
    {
        use std::io::Write;
        graphviz.stdin.take().unwrap().write_all(dot.as_bytes()).unwrap();
    }
    let svg = graphviz.wait_with_output().unwrap();
    assert!(svg.status.success() && String::from_utf8_lossy(&svg.stdout).contains("<svg"), "Graphviz renders the map");
}

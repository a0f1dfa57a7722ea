//! The real `hubble` CLI (built from Cilium's source by scripts/setup.sh) against a node: real
//! curl traffic (an allowed request, an L7 denial, a kernel denial) read back with `hubble
//! observe` (JSON, filters, --follow) and `hubble status` over the node's Hubble socket; and
//! the attacks: a user other than root cannot read flows (the socket's mode, and the server's
//! own check of the peer when the mode is opened up), and a filter l7mesh cannot judge is
//! refused by name; a field mask keeps only its fields.

use std::io::BufRead as _;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use integration::*;
use serde_json::Value;

const POLICIES: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
      rules:
        http:
        - {method: GET, path: /}
"#;

/// The hubble binary: setup.sh installs it; without it the test fails, saying so.
fn hubble_bin() -> String {
    for dir in std::env::var("PATH").unwrap_or_default().split(':').chain(["/usr/local/bin"]) {
        let p = std::path::Path::new(dir).join("hubble");
        if p.is_file() {
            return p.display().to_string();
        }
    }
    panic!("the hubble CLI is not installed: run scripts/setup.sh (make setup)");
}

fn server_arg(node: &TestNode) -> String {
    format!("unix://{}", node.run_dir().join("hubble.sock").display())
}

fn hubble(node: &TestNode, args: &[&str]) -> Output {
    let server = server_arg(node);
    let mut all = args.to_vec();
    all.extend(["--server", server.as_str(), "--timeout", "10s"]);
    Command::new(hubble_bin()).args(&all).stdin(Stdio::null()).output().expect("running hubble")
}

fn hubble_ok(node: &TestNode, args: &[&str]) -> String {
    let o = hubble(node, args);
    assert!(o.status.success(), "hubble {args:?}: {}\n{}\n{}", stdout(&o), stderr(&o), node.node_log());
    stdout(&o)
}

/// `hubble observe ... -o json`: one GetFlowsResponse per line; the flows in them.
fn observe_json(node: &TestNode, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["observe", "-o", "json"];
    all.extend(args);
    hubble_ok(node, &all)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .filter_map(|r| r.get("flow").cloned())
        .collect()
}

fn url(f: &Value) -> &str {
    f.pointer("/l7/http/url").and_then(Value::as_str).unwrap_or("")
}

fn curl(node: &TestNode, name: &str, labels: &str, url: &str) -> (i32, String) {
    let o = node
        .l7ctl_run(name, labels, &["curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}", url])
        .unwrap();
    (o.status.code().unwrap_or(-1), stdout(&o))
}

fn wait_for_flows(node: &TestNode, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let flows = observe_json(node, &["--all"]);
        if done(&flows) {
            return flows;
        }
        if Instant::now() > deadline {
            panic!("no flows for {what}: {flows:#?}\n{}", node.node_log());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn hubble_cli_reads_the_nodes_flows() {
    let _ = hubble_bin();
    let mut node = TestNode::new("hubble").unwrap();
    let policy = node.policy_file("policies.yaml", POLICIES).unwrap();
    node.start_node(&policy, &[]).unwrap();
    node.http_workload("server", "app=server", "127.0.0.1", 8080, "hello\n").unwrap();

    assert_eq!(curl(&node, "client", "app=client", "http://127.0.0.1:8080/"), (0, "200".into()));
    assert_eq!(curl(&node, "client", "app=client", "http://127.0.0.1:8080/admin"), (0, "403".into()));
    assert_eq!(curl(&node, "stranger", "app=stranger", "http://127.0.0.1:8080/").0, 7, "the kernel denies it");

    let is_kernel_denial = |f: &Value| {
        f.pointer("/source/pod_name") == Some(&"stranger".into())
            && f["verdict"] == "DROPPED"
            && f.pointer("/event_type/type") == Some(&5.into())
    };
    let flows = wait_for_flows(&node, "the three requests", |fs| {
        fs.iter().any(|f| url(f).ends_with(":8080/"))
            && fs.iter().any(|f| url(f).ends_with("/admin"))
            && fs.iter().any(is_kernel_denial)
    });

    // The allowed request: an L7 flow from client to server, with its answer.
    let ok = flows.iter().find(|f| url(f).ends_with(":8080/")).unwrap();
    assert_eq!(ok["verdict"], "FORWARDED", "{ok:#}");
    assert_eq!(ok["Type"], "L7");
    assert_eq!(ok["traffic_direction"], "INGRESS");
    assert_eq!(ok.pointer("/l7/type"), Some(&"RESPONSE".into()));
    assert_eq!(ok.pointer("/l7/http/method"), Some(&"GET".into()));
    assert_eq!(ok.pointer("/l7/http/code"), Some(&200.into()));
    assert_eq!(ok.pointer("/l7/http/protocol"), Some(&"HTTP/1.1".into()));
    assert_eq!(ok.pointer("/source/pod_name"), Some(&"client".into()));
    assert_eq!(ok.pointer("/source/namespace"), Some(&"default".into()));
    let labels = ok.pointer("/source/labels").and_then(Value::as_array).cloned().unwrap_or_default();
    assert!(labels.contains(&"k8s:app=client".into()), "{labels:?}");
    assert!(labels.contains(&"k8s:io.kubernetes.pod.namespace=default".into()), "{labels:?}");
    assert_eq!(ok.pointer("/destination/pod_name"), Some(&"server".into()));
    assert_eq!(ok.pointer("/l4/TCP/destination_port"), Some(&8080.into()));
    assert_eq!(ok.pointer("/IP/destination"), Some(&"127.0.0.1".into()));
    assert!(ok.pointer("/source/identity").and_then(Value::as_u64).unwrap_or(0) > 0, "{ok:#}");
    assert!(ok["node_name"].as_str().is_some_and(|n| !n.is_empty()), "{ok:#}");
    assert!(ok["time"].as_str().is_some_and(|t| t.starts_with("20")), "{ok:#}");

    // The L7 denial: DROPPED, 403, by the server's ingress policy.
    let admin = flows.iter().find(|f| url(f).ends_with("/admin")).unwrap();
    assert_eq!(admin["verdict"], "DROPPED", "{admin:#}");
    assert_eq!(admin.pointer("/l7/http/code"), Some(&403.into()));
    assert_eq!(admin["drop_reason_desc"], "POLICY_DENIED");
    assert_eq!(admin.pointer("/ingress_denied_by/0/name"), Some(&"web".into()), "{admin:#}");
    assert_eq!(admin.pointer("/ingress_denied_by/0/namespace"), Some(&"default".into()));
    assert_eq!(admin.pointer("/ingress_denied_by/0/kind"), Some(&"CiliumNetworkPolicy".into()));

    // The kernel's denial: a policy verdict, L3/L4, at the stranger's connect.
    let kernel = flows.iter().find(|f| is_kernel_denial(f)).unwrap();
    assert_eq!(kernel["Type"], "L3_L4", "{kernel:#}");
    assert_eq!(kernel["traffic_direction"], "INGRESS");
    assert_eq!(kernel.pointer("/l4/TCP/destination_port"), Some(&8080.into()));
    assert!(kernel.get("l7").is_none());

    // Hubble's filters, judged by the node.
    let dropped = observe_json(&node, &["--all", "--verdict", "DROPPED"]);
    assert!(!dropped.is_empty() && dropped.iter().all(|f| f["verdict"] == "DROPPED"), "{dropped:#?}");
    assert!(dropped.iter().any(|f| url(f).ends_with("/admin")) && dropped.iter().any(is_kernel_denial));
    let forwarded = observe_json(&node, &["--all", "--verdict", "FORWARDED", "--http-method", "get"]);
    assert!(forwarded.iter().any(|f| url(f).ends_with(":8080/")), "{forwarded:#?}");
    assert!(forwarded
        .iter()
        .all(|f| f["verdict"] == "FORWARDED" && f.pointer("/l7/http/method") == Some(&"GET".into())));
    let by_path = observe_json(&node, &["--all", "--http-path", "^/admin$"]);
    assert!(!by_path.is_empty() && by_path.iter().all(|f| url(f).ends_with("/admin")), "{by_path:#?}");
    let from_stranger = observe_json(&node, &["--all", "--from-pod", "stranger"]);
    assert!(!from_stranger.is_empty(), "--from-pod stranger (default/stranger)");
    assert!(from_stranger.iter().all(|f| f.pointer("/source/pod_name") == Some(&"stranger".into())));
    let not_stranger = observe_json(&node, &["--all", "--not", "--from-pod", "stranger"]);
    assert!(!not_stranger.is_empty());
    assert!(not_stranger.iter().all(|f| f.pointer("/source/pod_name") != Some(&"stranger".into())));
    let by_label = observe_json(&node, &["--all", "--from-label", "app=client", "--http-status", "4+"]);
    assert!(!by_label.is_empty(), "--from-label app=client --http-status 4+");
    assert!(by_label.iter().all(|f| f.pointer("/l7/http/code") == Some(&403.into())), "{by_label:#?}");
    let egress = observe_json(&node, &["--all", "--traffic-direction", "egress", "--from-pod", "client"]);
    assert!(egress.iter().all(|f| f["traffic_direction"] == "EGRESS"), "{egress:#?}");
    let verdicts = observe_json(&node, &["--all", "--type", "policy-verdict"]);
    assert!(verdicts.iter().any(is_kernel_denial), "{verdicts:#?}");
    assert!(verdicts.iter().all(|f| f.pointer("/event_type/type") == Some(&5.into()) && f.get("l7").is_none()));
    let l7 = observe_json(&node, &["--all", "--type", "l7"]);
    assert!(!l7.is_empty() && l7.iter().all(|f| f["Type"] == "L7"), "{l7:#?}");
    let by_reason = observe_json(&node, &["--all", "--drop-reason-desc", "POLICY_DENIED"]);
    assert!(by_reason.iter().any(|f| url(f).ends_with("/admin")), "{by_reason:#?}");
    assert!(by_reason.iter().all(|f| f["drop_reason_desc"] == "POLICY_DENIED"));
    let all_flows = observe_json(&node, &["--all"]).len();
    assert_eq!(observe_json(&node, &["--since", "10m"]).len(), all_flows, "--since 10m");
    let old_range = ["--since", "2001-01-01T00:00:00Z", "--until", "2001-01-02T00:00:00Z"];
    assert!(observe_json(&node, &old_range).is_empty(), "--since/--until in 2001");
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_ascii_lowercase();
    assert_eq!(observe_json(&node, &["--all", "--node-name", &host]).len(), all_flows, "--node-name {host}");
    assert!(observe_json(&node, &["--all", "--node-name", "some-other-node"]).is_empty());
    assert!(!observe_json(&node, &["--all", "--namespace", "default"]).is_empty(), "--namespace default");
    assert!(observe_json(&node, &["--all", "--namespace", "kube-system"]).is_empty());
    let namespaces = hubble_ok(&node, &["list", "namespaces"]);
    assert!(namespaces.contains("default"), "{namespaces}");
    assert_eq!(observe_json(&node, &["--last", "1"]).len(), 1, "--last 1");
    let first = observe_json(&node, &["--first", "2"]);
    assert_eq!(first.len(), 2, "--first 2");
    assert_eq!(first[0], observe_json(&node, &["--all"])[0], "--first starts at the oldest");

    // The compact form a person reads.
    let compact = hubble_ok(&node, &["observe", "--all", "--color", "never"]);
    let line = compact.lines().find(|l| l.contains("/admin")).unwrap_or_else(|| panic!("{compact}"));
    assert!(line.contains("default/client") && line.contains("default/server:8080"), "{line}");
    assert!(line.contains("http-response") && line.contains("DROPPED") && line.contains("403"), "{line}");

    // --follow: a flow made after it started arrives.
    let past_follow_flows = observe_json(&node, &["--all"]).iter().any(|f| url(f).contains("/follow-me"));
    let server = server_arg(&node);
    let mut follower = Command::new(hubble_bin())
        .args(["observe", "--follow", "-o", "json", "--http-path", "follow-me", "--server", &server])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = follower.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    // The follower says nothing when it is connected: requests are made until one arrives (a
    // loaded machine may take a while to start it), each after it was started.
    let mut got = None;
    for i in 0..20 {
        assert_eq!(curl(&node, "client", "app=client", &format!("http://127.0.0.1:8080/follow-me-{i}")).1, "403");
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(500 + 100 * i)) {
            got = Some(line);
            break;
        }
    }
    let _ = follower.kill();
    let got = got.unwrap_or_else(|| panic!("the follower saw no new flow\n{}", node.node_log()));
    let resp: Value = serde_json::from_str(&got).unwrap();
    assert!(url(&resp["flow"]).contains("/follow-me-"), "{resp:#}");
    assert!(!past_follow_flows, "no follow-me flow existed before the follower started");
    let _ = follower.wait();

    // hubble status: the health check and the server's counts.
    let status = hubble_ok(&node, &["status"]);
    assert!(status.contains("Healthcheck") && status.contains("Ok"), "{status}");
    assert!(status.contains("Current/Max Flows:") && status.contains("/4,096"), "{status}");
    assert!(status.contains("Flows/s:"), "{status}");

    // A filter l7mesh has no data for is refused, naming the field.
    for (flag, value, field) in [
        ("--fqdn", "example.com", "fqdn"),
        ("--http-header", "authorization:x", "http_header"),
        ("--to-service", "default/web", "destination_service"),
        ("--cel-expression", "true", "cel_expression"),
    ] {
        let o = hubble(&node, &["observe", "--all", flag, value]);
        assert!(!o.status.success(), "{flag} was not refused: {}", stdout(&o));
        let err = stderr(&o);
        assert!(
            err.contains("InvalidArgument") && err.contains(field) && err.contains("not supported"),
            "{flag}: {err}"
        );
    }
    // A field mask: only its fields come (and the CLI's default masks for its compact output).
    let masked = observe_json(&node, &["--all", "--experimental-field-mask", "time,verdict,l7.http.url"]);
    assert!(masked.iter().any(|f| url(f).ends_with("/admin")), "{masked:#?}");
    for f in &masked {
        let keys: Vec<&String> = f.as_object().unwrap().keys().collect();
        assert!(keys.iter().all(|k| ["time", "verdict", "l7"].contains(&k.as_str())), "{keys:?}");
    }
    let compact = hubble_ok(&node, &["observe", "--all", "--color", "never", "--experimental-use-default-field-masks"]);
    assert!(compact.lines().any(|l| l.contains("default/client") && l.contains("/admin")), "{compact}");
    // A bad value is refused too, not read as matching nothing.
    let o = hubble(&node, &["observe", "--all", "--http-path", "(unclosed"]);
    assert!(!o.status.success() && stderr(&o).contains("http_path"), "{}", stderr(&o));

    // Flows are root's: the socket is 0600, and a user who is not root cannot connect.
    let socket = node.run_dir().join("hubble.sock");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the Hubble socket's mode");
    let as_nobody = |args: &[&str]| {
        let mut all = vec!["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--", hubble_bin().leak()];
        all.extend(args);
        all.extend(["--server", server.as_str(), "--timeout", "5s"]);
        Command::new("setpriv").args(&all).stdin(Stdio::null()).output().unwrap()
    };
    let o = as_nobody(&["observe", "--all", "-o", "json"]);
    assert!(!o.status.success() && stdout(&o).is_empty(), "nobody read flows: {}", stdout(&o));
    assert!(stderr(&o).contains("permission denied"), "{}", stderr(&o));
    // Were the mode opened up, the server still drops a peer that is not root.
    std::fs::set_permissions(&socket, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let o = as_nobody(&["observe", "--all", "-o", "json"]);
    let s = as_nobody(&["status"]);
    std::fs::set_permissions(&socket, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    assert!(!o.status.success() && stdout(&o).is_empty(), "nobody read flows: {}", stdout(&o));
    assert!(!s.status.success(), "nobody got the status: {}", stdout(&s));
    assert!(node.node_log().contains("refused a Hubble client that is not root"), "{}", node.node_log());
    // Root still reads them after.
    assert!(!observe_json(&node, &["--last", "5"]).is_empty());

    // A clean stop removes the socket; `--no-hubble` serves none.
    node.stop_node().unwrap();
    assert!(!socket.exists(), "the Hubble socket outlived the node");
    node.start_node(&policy, &["--no-hubble"]).unwrap();
    assert!(!socket.exists(), "--no-hubble still made {}", socket.display());
    let o = hubble(&node, &["status"]);
    assert!(!o.status.success(), "{}", stdout(&o));
    node.stop_node().unwrap();
}

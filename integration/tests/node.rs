//! The node as a person runs it: `l7ctl up` with CiliumNetworkPolicy files, workloads started
//! with `l7ctl run`, real clients and servers, through the real kernel.

use std::path::PathBuf;
use std::process::Output;

use integration::*;

const PY: &str = "/usr/bin/python3";

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).trim().to_string()
}

/// `probe ARGS` as workload `name` with `labels`, through `l7ctl run`.
fn probe_as(node: &TestNode, name: &str, labels: &str, args: &[&str]) -> String {
    let probe = node.probe_path();
    let mut cmd = vec![PY, probe.to_str().unwrap()];
    cmd.extend_from_slice(args);
    let o = node.l7ctl_run(name, labels, &cmd).unwrap();
    assert!(o.status.success(), "{}: {}\n{}", out(&o), err(&o), node.node_log());
    out(&o)
}

fn curl_as(node: &TestNode, name: &str, labels: &str, url: &str) -> (i32, String) {
    let o = node.l7ctl_run(name, labels, &["curl", "-sS", "--max-time", "10", url]).unwrap();
    (o.status.code().unwrap_or(-1), out(&o) + &err(&o))
}

fn proxy_flows(node: &TestNode) -> Vec<serde_json::Value> {
    // Connection-level flows (requests through the HTTP stack add L7 flows of their own).
    node.flows().unwrap().into_iter().filter(|f| f["observer"] == "proxy" && f["l7"].is_null()).collect()
}

const CLIENT_EGRESS: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: client-egress
spec:
  endpointSelector:
    matchLabels:
      app: client
  egress:
  - toPorts:
    - ports:
      - port: "8080"
        protocol: TCP
      rules:
        http:
        - method: GET
  - toPorts:
    - ports:
      - port: "8081"
        protocol: TCP
      - port: "5353"
        protocol: UDP
"#;

#[test]
fn egress_policy_on_workloads_started_with_l7ctl_run() {
    let mut node = TestNode::new("egress-l7ctl").unwrap();
    let policy = node.policy_file("client.yaml", CLIENT_EGRESS).unwrap();
    node.start_node(&policy, &[]).unwrap();
    node.http_server(None, "127.0.0.1", 8080, "marked\n").unwrap();
    node.http_server(None, "127.0.0.1", 8081, "allowed\n").unwrap();
    node.http_server(None, "127.0.0.1", 8082, "unlisted\n").unwrap();

    assert_eq!(curl_as(&node, "client", "app=client", "http://127.0.0.1:8081/"), (0, "allowed".into()));
    assert_eq!(probe_as(&node, "client", "app=client", &["tcp-connect", "127.0.0.1", "8082"]), "EPERM");
    assert_eq!(probe_as(&node, "client", "app=client", &["udp-sendto", "127.0.0.1", "5354"]), "EPERM");
    assert_eq!(probe_as(&node, "client", "app=client", &["udp-connect", "127.0.0.1", "5354"]), "EPERM");
    assert_eq!(probe_as(&node, "client", "app=client", &["udp-sendto", "127.0.0.1", "5353"]), "ok");

    // The port with rules.http goes through the proxy, which knows the workload and labels.
    assert_eq!(curl_as(&node, "client", "app=client,tier=front", "http://127.0.0.1:8080/"), (0, "marked".into()));
    let flows = proxy_flows(&node);
    let f = flows.last().unwrap_or_else(|| panic!("no proxied flow:\n{}", node.node_log()));
    assert_eq!(f["source"]["workload"], "client");
    assert_eq!(f["source"]["namespace"], "default");
    assert_eq!(f["source"]["labels"], serde_json::json!({"app": "client", "tier": "front"}));
    assert_eq!(f["destination"]["port"], 8080);
    assert_eq!(f["policy_name"], "default/client-egress");

    // An unselected workload and a process outside l7mesh are untouched.
    assert_eq!(curl_as(&node, "other", "app=other", "http://127.0.0.1:8082/"), (0, "unlisted".into()));
    assert_eq!(node.curl(None, "http://127.0.0.1:8082/", &[]).unwrap(), (0, "unlisted\n".into()));
    assert_eq!(proxy_flows(&node).len(), 1);

    // Workloads run unprivileged, and `l7ctl run` exits with CMD's status.
    assert_eq!(out(&node.l7ctl_run("who", "app=x", &["id", "-un"]).unwrap()), "nobody");
    assert_eq!(node.l7ctl_run("fails", "app=x", &["sh", "-c", "exit 3"]).unwrap().status.code(), Some(3));

    // A stop leaves the datapath pinned (and enforcing: see stop.rs); `l7ctl down --uninstall`
    // removes it and says so.
    let status = node.stop_node().unwrap().unwrap();
    assert!(status.success(), "{}", node.node_log());
    assert!(node.node_log().contains("the datapath stays pinned"), "{}", node.node_log());
    assert!(node.pin_dir.join("links").exists(), "a stop keeps the datapath");
    let o = node.down(&["--uninstall"]).unwrap();
    assert!(
        o.status.success() && out(&o).contains("enforcement stopped"),
        "{}{}",
        out(&o),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!node.pin_dir.exists(), "down --uninstall removes every attachment");
    assert_eq!(node.probe(Some("client"), &["tcp-connect", "127.0.0.1", "8082"]).unwrap(), "ok");
}

#[test]
fn ingress_policy_for_local_clients_and_a_peer_host() {
    let mut node = TestNode::new("ingress-l7ctl").unwrap();
    let peer = node.add_peer_host(51).unwrap();
    let policy = node
        .policy_file(
            "server.yaml",
            r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: server-ingress
spec:
  endpointSelector:
    matchLabels:
      app: server
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: client
    toPorts:
    - ports:
      - port: "8080"
        protocol: TCP
      rules:
        http:
        - method: GET
  - fromCIDR:
    - 10.231.51.0/24
    toPorts:
    - ports:
      - port: "8080"
        protocol: TCP
"#,
        )
        .unwrap();
    node.start_node(&policy, &[]).unwrap();
    node.http_workload("server", "app=server", "0.0.0.0", 8080, "server here\n").unwrap();

    assert_eq!(curl_as(&node, "client", "app=client", "http://127.0.0.1:8080/"), (0, "server here".into()));
    let flows = proxy_flows(&node);
    let f = flows.last().unwrap_or_else(|| panic!("{}", node.node_log()));
    assert_eq!(
        (f["source"]["workload"].as_str(), f["destination"]["workload"].as_str()),
        (Some("client"), Some("server"))
    );
    // Another workload: refused at its own connect() by the server's ingress policy.
    assert_eq!(probe_as(&node, "stranger", "app=stranger", &["tcp-connect", "127.0.0.1", "8080"]), "EPERM");
    // A local process outside l7mesh is `host`, which the policy does not allow.
    assert_eq!(node.probe(None, &["tcp-connect", "127.0.0.1", "8080"]).unwrap(), "ECONNREFUSED");
    // A client on another host, allowed by CIDR.
    let o = node.run_on_peer(&peer, &["curl", "-sS", "--max-time", "10", "http://10.231.51.1:8080/"]).unwrap();
    assert_eq!(out(&o), "server here", "{}", err(&o));
}

#[test]
fn endpoints_cidr_sets_entities_port_ranges_and_deny_rules_decide_real_connections() {
    let mut node = TestNode::new("selectors").unwrap();
    let peer = node.add_peer_host(52).unwrap();
    node.run_on_peer(
        &peer,
        &["ip", "addr", "add", "10.231.52.3/24", "dev", &format!("l7v52b{}", std::process::id() % 10000)],
    )
    .unwrap();
    for port in ["9000", "9010"] {
        node.spawn_on_peer(&peer, &[PY, "-m", "http.server", port, "--bind", "0.0.0.0"], &format!("peer{port}.log"))
            .unwrap();
    }
    let policy = node
        .policy_file(
            "client.yaml",
            r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: client
spec:
  endpointSelector:
    matchLabels:
      app: client
  egress:
  - toEndpoints:
    - matchExpressions:
      - key: app
        operator: In
        values: [server, db]
  - toCIDRSet:
    - cidr: 10.231.52.0/24
      except:
      - 10.231.52.3/32
    toPorts:
    - ports:
      - port: "9000"
        endPort: 9010
        protocol: TCP
  - toEntities:
    - host
    toPorts:
    - ports:
      - port: "7000"
        protocol: TCP
  egressDeny:
  - toCIDR:
    - 10.231.52.0/24
    toPorts:
    - ports:
      - port: "9005"
        protocol: TCP
"#,
        )
        .unwrap();
    node.start_node(&policy, &[]).unwrap();
    node.http_workload("server", "app=server", "127.0.0.1", 8080, "s\n").unwrap();
    node.http_server(None, "127.0.0.1", 7000, "host\n").unwrap();
    node.http_server(None, "127.0.0.1", 7001, "host\n").unwrap();
    node.probe_from_peer(&peer, &["wait-tcp", "10.231.52.2", "9010", "10"]).unwrap();

    let c = |args: &[&str]| probe_as(&node, "client", "app=client", args);
    assert_eq!(c(&["tcp-connect", "127.0.0.1", "8080"]), "ok", "toEndpoints (matchExpressions In)");
    assert_eq!(c(&["tcp-connect", "10.231.52.2", "9000"]), "ok", "toCIDRSet, first port of the range");
    assert_eq!(c(&["tcp-connect", "10.231.52.2", "9010"]), "ok", "endPort is inclusive");
    assert_eq!(c(&["tcp-connect", "10.231.52.2", "9011"]), "EPERM", "past endPort");
    assert_eq!(c(&["tcp-connect", "10.231.52.2", "9005"]), "EPERM", "egressDeny wins inside the allowed range");
    assert_eq!(c(&["tcp-connect", "10.231.52.3", "9000"]), "EPERM", "the except prefix");
    assert_eq!(c(&["tcp-connect", "127.0.0.1", "7000"]), "ok", "toEntities: host");
    assert_eq!(c(&["tcp-connect", "127.0.0.1", "7001"]), "EPERM", "host, other port");
}

#[test]
fn editing_the_policy_file_applies_it_and_closes_only_newly_denied_connections() {
    let mut node = TestNode::new("edit").unwrap();
    let allow_both = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: client\nspec:\n  endpointSelector:\n    matchLabels:\n      app: client\n  egress:\n  - toPorts:\n    - ports:\n      - port: \"8081\"\n        protocol: TCP\n      - port: \"8082\"\n        protocol: TCP\n";
    let policy = node.policy_file("client.yaml", allow_both).unwrap();
    node.start_node(&policy, &[]).unwrap();
    node.http_server(None, "127.0.0.1", 8081, "a\n").unwrap();
    node.http_server(None, "127.0.0.1", 8082, "b\n").unwrap();
    let hold = |port: &str| {
        format!(
            "import socket,time\ns=socket.create_connection(('127.0.0.1',{port}))\nprint('connected',flush=True)\ntry:\n    d=s.recv(10)\n    print('closed: eof' if not d else 'data')\nexcept OSError as e:\n    print('closed:', e.strerror)\n"
        )
    };
    let (h1, h2) = (hold("8081"), hold("8082"));
    node.spawn_l7ctl_run("hold-a", "app=client", &[PY, "-c", &h1], "hold-a.log").unwrap();
    node.spawn_l7ctl_run("hold-b", "app=client", &[PY, "-c", &h2], "hold-b.log").unwrap();
    let wait_for = |log: &str, text: &str| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        while std::time::Instant::now() < deadline {
            if node.log(log).contains(text) {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        false
    };
    assert!(wait_for("hold-a.log", "connected") && wait_for("hold-b.log", "connected"));

    // Only 8082 now: the 8081 connection is closed, the 8082 one kept, new 8081 connects fail.
    let only_8082 = allow_both.replace("      - port: \"8081\"\n        protocol: TCP\n", "");
    std::fs::write(&policy, &only_8082).unwrap();
    assert!(wait_for("hold-a.log", "closed:"), "{}\n{}", node.log("hold-a.log"), node.node_log());
    assert!(node.log("hold-a.log").contains("Software caused connection abort"), "{}", node.log("hold-a.log"));
    assert!(!node.log("hold-b.log").contains("closed"), "an allowed connection was closed");
    assert_eq!(probe_as(&node, "client", "app=client", &["tcp-connect", "127.0.0.1", "8081"]), "EPERM");
    assert_eq!(probe_as(&node, "client", "app=client", &["tcp-connect", "127.0.0.1", "8082"]), "ok");

    // A broken edit is rejected with file, line and field; the last good policy stays.
    let broken = only_8082.replace("      - port: \"8082\"", "      - port: \"80820\"");
    let line = broken.lines().position(|l| l.contains("80820")).unwrap() + 1;
    std::fs::write(&policy, broken).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !node.node_log().contains("rejected") && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let log = node.node_log();
    let expected =
        format!("client.yaml:{line}: error: spec.egress[0].toPorts[0].ports[0].port: port 80820 is out of range");
    assert!(log.contains(&expected), "{expected}\n{log}");
    assert!(log.contains("the last good policy stays in force"), "{log}");
    assert_eq!(probe_as(&node, "client", "app=client", &["tcp-connect", "127.0.0.1", "8082"]), "ok");
    assert!(!node.log("hold-b.log").contains("closed"));
}

#[test]
fn l7ctl_run_refuses_clearly_without_a_node_and_for_a_taken_name() {
    let mut node = TestNode::new("run-errors").unwrap();
    let marker = node.log_dir.join("cmd-ran");
    let touch = ["touch", marker.to_str().unwrap()];
    let o = node.l7ctl_run("w", "app=w", &touch).unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(err(&o).contains("no l7mesh node is running") && err(&o).contains("l7ctl up"), "{}", err(&o));
    assert!(!marker.exists(), "CMD must not start");

    let policy = node.policy_file("none.yaml", "").unwrap();
    node.start_node(&policy, &[]).unwrap();
    node.spawn_l7ctl_run("dup", "app=a", &["sleep", "30"], "dup.log").unwrap();
    let o = node.l7ctl_run("dup", "app=b", &touch).unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(err(&o).contains("`dup` is taken by a running workload"), "{}", err(&o));
    assert!(!marker.exists(), "CMD must not start");
    let o = node.l7ctl_run("Bad_Name", "app=b", &touch).unwrap();
    assert!(err(&o).contains("not a valid workload name"), "{}", err(&o));
    let o = node.l7ctl_run("ok", "app", &touch).unwrap();
    assert!(err(&o).contains("label `app` is not key=value"), "{}", err(&o));
    assert!(!marker.exists());
}

#[test]
fn workloads_cannot_touch_the_datapath_the_state_or_each_other() {
    let mut node = TestNode::new("unpriv").unwrap();
    let policy = node.policy_file("none.yaml", "").unwrap();
    node.start_node(&policy, &[]).unwrap();
    node.spawn_l7ctl_run("victim", "app=v", &["sleep", "30"], "victim.log").unwrap();
    let victim_procs: PathBuf = node.cgroup_root.join("workloads/victim/cgroup.procs");
    let store = node.state_dir().join("l7mesh.redb");
    let before = std::fs::read_to_string(&victim_procs).unwrap();
    let attempts = [
        format!("echo $$ > {}", victim_procs.display()),
        format!("cat {} > /dev/null", store.display()),
        format!("ls {}", node.pin_dir.display()),
        "bpftool prog show".to_string(),
    ];
    for attempt in attempts {
        let o = node.l7ctl_run("attacker", "app=a", &["sh", "-c", &attempt]).unwrap();
        assert!(!o.status.success(), "`{attempt}` succeeded as a workload: {}", out(&o));
    }
    let victim = std::fs::read_to_string(&victim_procs).unwrap();
    assert_eq!(victim, before, "nothing joined the victim's cgroup");
}

#[test]
fn capabilities_are_given_only_when_asked_for() {
    let mut node = TestNode::new("caps").unwrap();
    let policy = node.policy_file("none.yaml", "").unwrap();
    node.start_node(&policy, &[]).unwrap();
    let bind80 = "import socket\ns=socket.socket()\ntry:\n    s.bind(('127.0.0.1', 80)); print('bound')\nexcept OSError as e:\n    print(e.strerror)\n";
    let o = node.l7ctl_run("plain", "app=w", &[PY, "-c", bind80]).unwrap();
    assert_eq!(out(&o), "Permission denied");
    let mut args = vec!["run".to_string(), "--run-dir".into(), node.run_dir().display().to_string()];
    args.extend(
        ["--name", "web", "--labels", "app=w", "--cap", "net_bind_service", "--", PY, "-c", bind80].map(String::from),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = node.l7ctl(&args).unwrap();
    assert_eq!(out(&o), "bound", "{}", err(&o));
}

#[test]
fn l7ctl_up_restarts_a_dead_l7proxy_and_the_policy_holds_meanwhile() {
    let mut node = TestNode::new("supervise").unwrap();
    let policy = node.policy_file("client.yaml", CLIENT_EGRESS).unwrap();
    node.start_node(&policy, &[]).unwrap();
    node.http_server(None, "127.0.0.1", 8080, "marked\n").unwrap();
    node.http_server(None, "127.0.0.1", 8082, "unlisted\n").unwrap();
    assert_eq!(curl_as(&node, "client", "app=client", "http://127.0.0.1:8080/"), (0, "marked".into()));
    let pattern = format!("l7proxy --pin-dir {}", node.pin_dir.display());
    let old = node.run_ok(None, &["pgrep", "-f", &pattern]).unwrap();
    node.run_ok(None, &["pkill", "-KILL", "-f", &pattern]).unwrap();
    // While no proxy runs, the kernel still enforces: unlisted ports stay denied.
    assert_eq!(probe_as(&node, "client", "app=client", &["tcp-connect", "127.0.0.1", "8082"]), "EPERM");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let now = node.run(None, &["pgrep", "-f", &pattern]).map(|o| out(&o)).unwrap_or_default();
        if !now.is_empty() && now != old && node.admin("/readyz").map(|r| r.starts_with("ready")).unwrap_or(false) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "l7proxy was not restarted:\n{}", node.node_log());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(node.node_log().contains("l7proxy exited; restarting it"));
    assert_eq!(curl_as(&node, "client", "app=client", "http://127.0.0.1:8080/"), (0, "marked".into()));
}

#[test]
fn l7ctl_ca_and_secret_import_talk_to_the_nodes_broker() {
    let mut node = TestNode::new("ca").unwrap();
    let policy = node.policy_file("none.yaml", "").unwrap();
    node.start_node(&policy, &[]).unwrap();
    let run_dir = node.run_dir().display().to_string();
    let ca = node.l7ctl(&["ca", "--run-dir", &run_dir]).unwrap();
    assert!(out(&ca).starts_with("-----BEGIN CERTIFICATE-----"), "{}", err(&ca));
    assert!(!out(&ca).contains("PRIVATE KEY"));
    std::fs::write(node.log_dir.join("tls.crt"), out(&ca)).unwrap();
    std::fs::write(node.log_dir.join("tls.key"), "not a real key").unwrap();
    let crt = node.log_dir.join("tls.crt").display().to_string();
    let key = node.log_dir.join("tls.key").display().to_string();
    let imported =
        node.l7ctl(&["secret", "import", "web", "--cert", &crt, "--key", &key, "--run-dir", &run_dir]).unwrap();
    assert_eq!(out(&imported), "secret default/web imported into the broker", "{}", err(&imported));
    // The broker's key material is the node's state: only root reads it.
    let key_file = node.state_dir().join("broker/secrets/default/web/tls.key");
    let o = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
        .arg(&key_file)
        .output()
        .unwrap();
    assert!(!o.status.success());
    // A workload can use neither broker socket.
    let client = node.log_dir.join("broker_client.py");
    std::fs::copy(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/broker_client.py"), &client).unwrap();
    let admin = format!("{run_dir}/broker-admin.sock");
    let o = node.l7ctl_run("w", "app=w", &[PY, client.to_str().unwrap(), &admin, r#"{"op":"ca"}"#]).unwrap();
    assert_eq!(out(&o), "PermissionError");
    let proxy = format!("{run_dir}/broker-proxy.sock");
    let o = node
        .l7ctl_run("w", "app=w", &[PY, client.to_str().unwrap(), &proxy, r#"{"op":"issue_server","names":["x"]}"#])
        .unwrap();
    // The run dir is hidden from workloads: the socket is not even reachable (the broker's own
    // refusals are checked in broker.rs and isolation.rs).
    assert_eq!(out(&o), "PermissionError", "{}", out(&o));
}

/// `l7ctl up --log-format json`: every line the node's processes log (l7ctl, tls-broker,
/// l7proxy, policy-api, on the one stderr) is one JSON object, also a warning of a rejected
/// policy file and the lines of a stop; the status lines `l7ctl up` prints on stdout are the
/// only others. No ANSI colour in a file.
#[test]
fn log_format_json_holds_for_every_process_and_every_line() {
    let mut node = TestNode::new("logjson").unwrap();
    let policy = node.policy_file("client.yaml", CLIENT_EGRESS).unwrap();
    node.start_node(&policy, &["--log-format", "json"]).unwrap();
    node.http_server(None, "127.0.0.1", 8080, "marked\n").unwrap();
    assert_eq!(curl_as(&node, "client", "app=client", "http://127.0.0.1:8080/"), (0, "marked".into()));
    // An invalid edit: policy-api warns (with the file:line:field diagnostic) and keeps the last good.
    std::fs::write(&policy, CLIENT_EGRESS.replace("protocol: TCP", "protocol: TCPX")).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !node.node_log().contains("last good policy stays in force") {
        assert!(std::time::Instant::now() < deadline, "the bad edit was not reported:\n{}", node.node_log());
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // l7ctl up's own lines: l7proxy killed, and restarted.
    let pattern = format!("l7proxy --pin-dir {}", node.pin_dir.display());
    node.run_ok(None, &["pkill", "-KILL", "-f", &pattern]).unwrap();
    while !node.node_log().contains("l7proxy exited; restarting it") {
        assert!(std::time::Instant::now() < deadline, "l7proxy was not restarted:\n{}", node.node_log());
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    node.stop_node().unwrap();
    let log = node.node_log();
    assert!(!log.contains('\u{1b}'), "ANSI colour in a log file:\n{log}");
    let mut targets = std::collections::BTreeSet::new();
    let mut warned_of_the_edit = false;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        if line.starts_with("l7mesh node ready") || line.starts_with("l7mesh: ") || line.starts_with("policy-api ready")
        {
            continue; // the status lines on stdout
        }
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}\n{log}"));
        assert!(v["timestamp"].is_string() && v["level"].is_string() && v["fields"]["message"].is_string(), "{line}");
        let target = v["target"].as_str().unwrap_or_default();
        targets.insert(target.split("::").next().unwrap_or_default().to_string());
        warned_of_the_edit |= v["level"] == "WARN" && v["fields"]["message"].as_str().unwrap().contains("TCPX");
    }
    assert!(warned_of_the_edit, "the rejected edit's diagnostic is a WARN line:\n{log}");
    for process in ["l7ctl", "tls_broker", "l7proxy", "policy_api"] {
        assert!(targets.contains(process), "no JSON line from {process} ({targets:?}):\n{log}");
    }
}

//! Stopping a node is not a hole: after SIGTERM of `l7ctl up` the pinned datapath keeps
//! enforcing the policy in force (L3/L4 denials in the kernel, marked connections refused,
//! allowed unmarked traffic flowing) and the next `l7ctl up` resumes it with the stored policy;
//! after a `kill -9` of `l7ctl up` none of its processes lingers; only `l7ctl down --uninstall`
//! removes enforcement, and it says what it removed. Another host (a peer network namespace)
//! finds a stopped node's marked ports refused (passed with `--fail-open`) and its L3/L4
//! denials standing. Real kernel, curl and Python servers.

use std::time::Duration;

use integration::{stderr, stdout, TestNode};

const PY: &str = "/usr/bin/python3";

/// The client's egress to the host: 8080 through the proxy (GET /index.html only), 8081 at L4.
const CLIENT_POLICY: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: client\nspec:\n  endpointSelector:\n    matchLabels:\n      app: client\n  egress:\n  - toEntities: [host]\n    toPorts:\n    - ports:\n      - port: \"8080\"\n        protocol: TCP\n      rules:\n        http:\n        - method: GET\n          path: /index.html\n  - toEntities: [host]\n    toPorts:\n    - ports:\n      - port: \"8081\"\n";

/// Added through the API (origin `api`, in the store only): the client may reach 8083.
const API_POLICY: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: extra\nspec:\n  endpointSelector:\n    matchLabels:\n      app: client\n  egress:\n  - toEntities: [host]\n    toPorts:\n    - ports:\n      - port: \"8083\"\n";

/// HTTP status of GET `path` on `port` from the client workload (000: no connection).
fn status(node: &TestNode, port: u16, path: &str) -> String {
    let url = format!("http://127.0.0.1:{port}{path}");
    let (_, body) =
        node.curl(Some("client"), &url, &["-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5"]).unwrap();
    body.chars().take(3).collect()
}

fn connect(node: &TestNode, port: u16) -> String {
    node.probe(Some("client"), &["tcp-connect", "127.0.0.1", &port.to_string()]).unwrap()
}

/// A node with the client policy from a file, the API policy from `l7ctl apply`, servers on
/// the host's 8080-8083 and a long-running `client` workload.
fn node(name: &str) -> TestNode {
    let mut node = TestNode::new(name).unwrap();
    let policy = node.policy_file("client.yaml", CLIENT_POLICY).unwrap();
    node.start_node(&policy, &[]).unwrap();
    for port in 8080..=8083 {
        node.http_server(None, "127.0.0.1", port, "hello\n").unwrap();
    }
    node.spawn_l7ctl_run("client", "app=client", &["sleep", "3600"], "client.log").unwrap();
    let file = node.log_dir.join("extra.yaml");
    std::fs::write(&file, API_POLICY).unwrap();
    node.l7ctl_ok(&["apply", "-f", file.to_str().unwrap()]);
    node
}

/// Everything the policy in force says, through the proxy too.
fn assert_enforced_with_proxy(node: &TestNode, when: &str) {
    assert_eq!(status(node, 8080, "/index.html"), "200", "{when}: allowed through the proxy");
    assert_eq!(status(node, 8080, "/"), "403", "{when}: denied by the proxy");
    assert_eq!(status(node, 8081, "/"), "200", "{when}: allowed at L4");
    assert_eq!(status(node, 8083, "/"), "200", "{when}: allowed by the API's policy");
    assert_eq!(connect(node, 8082), "EPERM", "{when}: denied in the kernel");
}

#[test]
fn a_stopped_node_keeps_enforcing_and_the_next_up_resumes_it() {
    let mut node = node("stop-resume");
    assert_enforced_with_proxy(&node, "running");
    let names: Vec<String> = node.node_processes().into_iter().map(|(n, _)| n).collect();
    for part in ["l7ctl", "l7proxy", "tls-broker", "policy-api"] {
        assert!(names.iter().any(|n| n == part), "{part} is not running: {names:?}");
    }

    let status_code = node.stop_node().unwrap().unwrap();
    assert!(status_code.success(), "{}", node.node_log());
    let log = node.node_log();
    assert!(log.contains("the datapath stays pinned") && log.contains("are refused until `l7ctl up`"), "{log}");
    assert!(!log.contains("enforcement stopped"), "{log}");
    assert_eq!(node.node_processes(), vec![], "a stop ends every process of the node");

    // Stopped: the kernel still enforces the policy that was in force.
    assert_eq!(connect(&node, 8082), "EPERM", "an L3/L4 denial holds with the node stopped");
    assert_eq!(connect(&node, 8080), "ECONNREFUSED", "a marked connection is refused, not passed unjudged");
    assert_eq!(status(&node, 8080, "/"), "000", "nothing reaches the marked port's server");
    assert_eq!(status(&node, 8081, "/"), "200", "allowed unmarked traffic flows");
    assert_eq!(status(&node, 8083, "/"), "200", "the API's policy is still in the kernel");
    // A process outside the workloads is untouched.
    assert_eq!(node.probe(None, &["tcp-connect", "127.0.0.1", "8082"]).unwrap(), "ok");

    // The next `l7ctl up` adopts the pinned datapath and the stored policy (the API's too).
    node.restart_node().unwrap();
    assert_enforced_with_proxy(&node, "resumed");
    let policies = node.l7ctl_ok(&["get", "policies", "-o", "json"]);
    assert!(policies.contains("\"origin\":\"api\"") && policies.contains("\"name\":\"extra\""), "{policies}");

    // `l7ctl down --uninstall` stops the node and removes enforcement, naming what it removed.
    let o = node.down(&["--uninstall"]).unwrap();
    let said = stdout(&o);
    assert!(o.status.success(), "{said}{}", stderr(&o));
    assert!(said.contains("stopped l7ctl-up"), "{said}");
    assert!(said.contains(&format!("removed {}", node.pin_dir.join("links").join("l7_connect4").display())), "{said}");
    assert!(said.contains(&format!("removed {}", node.pin_dir.join("maps").join("L7_POLICY").display())), "{said}");
    assert!(said.contains("enforcement stopped") && said.contains("kept the store"), "{said}");
    assert!(said.contains("still has processes: they run unpoliced now"), "the running client is named: {said}");
    assert!(!node.pin_dir.exists(), "down --uninstall removes every pin");
    assert_eq!(node.wait_until_no_node_process(Duration::from_secs(5)), vec![]);
    assert_eq!(connect(&node, 8082), "ok", "no enforcement after down --uninstall");
    assert_eq!(connect(&node, 8080), "ok");
}

#[test]
fn after_kill_9_of_up_no_process_lingers_and_up_works_again() {
    let mut node = node("stop-kill9");
    assert_enforced_with_proxy(&node, "running");
    let before = node.node_processes();
    assert_eq!(before.len(), 4, "{before:?}");

    node.kill_node().unwrap();
    // Its processes get SIGTERM from the kernel when it dies (PR_SET_PDEATHSIG) and end; l7proxy
    // drains for up to its --drain-timeout (5 s).
    let left = node.wait_until_no_node_process(Duration::from_secs(15));
    assert_eq!(left, vec![], "processes of the killed node linger");
    for (name, pid) in &before {
        // Gone, or a zombie waiting for whoever inherited it to reap it.
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let running = state.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z'));
        assert!(!running, "{name} (pid {pid}) is still running: {state}");
    }
    assert_eq!(connect(&node, 8082), "EPERM", "the datapath still enforces");
    assert_eq!(connect(&node, 8080), "ECONNREFUSED");

    // `l7ctl down` finds nothing left to stop and leaves the datapath (no --uninstall).
    let o = node.down(&[]).unwrap();
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o).contains("no node process was running") && stdout(&o).contains("stays pinned"),
        "{}",
        stdout(&o)
    );
    assert!(node.pin_dir.join("links").exists());

    node.restart_node().unwrap();
    assert_enforced_with_proxy(&node, "after kill -9 and up");
    // An `up` right after a `kill -9`, while the old processes are still ending (l7proxy
    // drains, holding its ports), stops them itself and starts.
    node.kill_node().unwrap();
    node.restart_node().unwrap();
    assert_enforced_with_proxy(&node, "after kill -9 and an immediate up");
    assert_eq!(node.node_processes().len(), 4, "{:?}", node.node_processes());
    // And a stale pid file naming a live process that is not the node's is left alone.
    let mut bystander = std::process::Command::new(PY).args(["-c", "import time; time.sleep(60)"]).spawn().unwrap();
    node.stop_node().unwrap();
    std::fs::write(node.run_dir().join("l7proxy.pid"), format!("{}\n", bystander.id())).unwrap();
    let o = node.down(&[]).unwrap();
    assert!(o.status.success() && !stdout(&o).contains("stopped l7proxy"), "{}", stdout(&o));
    assert!(bystander.try_wait().unwrap().is_none(), "down killed a process that was not the node's");
    bystander.kill().unwrap();
    bystander.wait().unwrap();
}

#[test]
fn with_fail_open_a_stopped_node_passes_marked_connections_unredirected() {
    let mut node = TestNode::new("stop-failopen").unwrap();
    let policy = node.policy_file("client.yaml", CLIENT_POLICY).unwrap();
    node.start_node(&policy, &["--fail-open"]).unwrap();
    for port in 8080..=8082 {
        node.http_server(None, "127.0.0.1", port, "hello\n").unwrap();
    }
    node.spawn_l7ctl_run("client", "app=client", &["sleep", "3600"], "client.log").unwrap();
    assert_eq!(status(&node, 8080, "/"), "403", "running: denied by the proxy");
    node.stop_node().unwrap();
    assert!(node.node_log().contains("pass unredirected (--fail-open)"), "{}", node.node_log());
    // What the operator chose: marked connections pass without the proxy; L3/L4 still holds.
    assert_eq!(status(&node, 8080, "/"), "200", "fail-open passes the marked connection unredirected");
    assert_eq!(connect(&node, 8082), "EPERM", "L3/L4 denials hold with fail-open too");
}

/// The server (app=server) takes connections from the peer host 10.231.66.0/24 (and its IPv6
/// fd00:231:66::/64): 8090 through the proxy (GET /index.html only), 8091 at L4; 8092 is
/// allowed to no one (a workload with an ingress rule is default-deny inbound).
const SERVER_POLICY: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: server\nspec:\n  endpointSelector:\n    matchLabels:\n      app: server\n  ingress:\n  - fromCIDR:\n    - 10.231.66.0/24\n    - fd00:231:66::/64\n    toPorts:\n    - ports:\n      - port: \"8090\"\n        protocol: TCP\n      rules:\n        http:\n        - method: GET\n          path: /index.html\n  - fromCIDR:\n    - 10.231.66.0/24\n    - fd00:231:66::/64\n    toPorts:\n    - ports:\n      - port: \"8091\"\n";

/// What a client on the peer host gets for GET `path` on the node's `addr`:`port`: the HTTP
/// status, or the connect error (`ECONNREFUSED`, ...) when there is no connection.
fn from_peer(node: &TestNode, peer: &str, addr: &str, port: u16, path: &str) -> String {
    let connect = node.probe_from_peer(peer, &["tcp-connect", addr, &port.to_string()]).unwrap();
    if connect != "ok" {
        return connect;
    }
    let host = if addr.contains(':') { format!("[{addr}]") } else { addr.to_string() };
    let url = format!("http://{host}:{port}{path}");
    let o = node.run_on_peer(peer, &["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", &url]);
    stdout(&o.unwrap())
}

/// Everything the peer host sees of the server, over IPv4 and IPv6: (marked port /index.html,
/// marked port /missing, L4 port, denied port).
fn peer_view(node: &TestNode, peer: &str) -> Vec<[String; 4]> {
    ["10.231.66.1", "fd00:231:66::1"]
        .iter()
        .map(|addr| {
            [
                from_peer(node, peer, addr, 8090, "/index.html"),
                from_peer(node, peer, addr, 8090, "/missing"),
                from_peer(node, peer, addr, 8091, "/index.html"),
                from_peer(node, peer, addr, 8092, "/index.html"),
            ]
        })
        .collect()
}

fn twice(view: [&str; 4]) -> Vec<[String; 4]> {
    vec![view.map(String::from), view.map(String::from)]
}

#[test]
fn a_stopped_node_refuses_another_hosts_marked_connections_and_still_denies_at_l4() {
    let mut node = TestNode::new("stop-peer").unwrap();
    let peer = node.add_peer_host(66).unwrap();
    let policy = node.policy_file("server.yaml", SERVER_POLICY).unwrap();
    node.start_node(&policy, &[]).unwrap();
    for (name, port) in [("server-a", 8090), ("server-b", 8091), ("server-c", 8092)] {
        node.http_workload(name, "app=server", "::", port, "hello\n").unwrap();
    }
    // Running: the marked port through the proxy (403 for what its rules deny), the L4 port
    // straight to the server, the denied port refused by sk_lookup.
    assert_eq!(peer_view(&node, &peer), twice(["200", "403", "200", "ECONNREFUSED"]), "running");

    // Stopped: nothing may reach the marked port's server unjudged; L4 decisions stand.
    node.stop_node().unwrap();
    assert_eq!(node.node_processes(), vec![]);
    assert_eq!(
        peer_view(&node, &peer),
        twice(["ECONNREFUSED", "ECONNREFUSED", "200", "ECONNREFUSED"]),
        "stopped (fail closed)"
    );

    // With --fail-open the operator chose otherwise: stopped, the marked port passes to the
    // server unjudged (its own 404 for /missing, not the proxy's 403); L4 denials still hold.
    let mut args = node.node_dir_args();
    args.insert(0, "up".into());
    args.extend(["--policy".into(), policy.display().to_string(), "--fail-open".into()]);
    node.restart_node_with(args).unwrap();
    assert_eq!(peer_view(&node, &peer), twice(["200", "403", "200", "ECONNREFUSED"]), "running with --fail-open");
    node.stop_node().unwrap();
    assert_eq!(peer_view(&node, &peer), twice(["200", "404", "200", "ECONNREFUSED"]), "stopped with --fail-open");
}

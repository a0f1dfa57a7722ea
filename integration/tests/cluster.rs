//! Many nodes, one policy set on a real etcd: three nodes (each its own netns, cgroup subtree,
//! pins and `l7ctl up --kvstore`), joined by a bridge to an etcd in a namespace of its own.
//! An apply on one node is in force on every node (the kernel and l7proxy: traffic shows it)
//! and the apply says so per node; workloads of every node are listed on every node; a stopped
//! etcd leaves every node enforcing its last set (and saying so), local workloads still start,
//! and the nodes catch up when it is back; a value in etcd that does not validate is refused
//! by name and changes nothing; a node that dies has its workloads expire from the others.

use std::time::{Duration, Instant};

use integration::{kafka_from, kafka_policy, stderr, stdout, TestCluster, TestNode, PEERS_PY, TANSU};

/// The client's egress to the host's port 8080: through the proxy, GET on `path` only.
fn client_policy(path: &str) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: client\nspec:\n  endpointSelector:\n    matchLabels:\n      app: client\n  egress:\n  - toEntities: [host]\n    toPorts:\n    - ports:\n      - port: \"8080\"\n        protocol: TCP\n      rules:\n        http:\n        - method: GET\n          path: \"{path}\"\n"
    )
}

fn write(node: &TestNode, name: &str, yaml: &str) -> String {
    let dir = node.log_dir.join("candidates");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(name);
    std::fs::write(&file, yaml).unwrap();
    file.display().to_string()
}

/// HTTP status of GET `path` on the host's 8080 from `workload` (000: no connection).
fn status(node: &TestNode, workload: &str, path: &str) -> String {
    let url = format!("http://127.0.0.1:8080{path}");
    let (_, body) =
        node.curl(Some(workload), &url, &["-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5"]).unwrap();
    body.chars().take(3).collect()
}

/// The value of policy-api's first `/metrics` line starting with `prefix`.
fn api_metric(node: &TestNode, prefix: &str) -> f64 {
    let text = node.run_ok(None, &["curl", "-sf", "--max-time", "5", "http://127.0.0.1:9090/metrics"]).unwrap();
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in policy-api's metrics:\n{text}"))
}

fn status_json(node: &TestNode) -> serde_json::Value {
    serde_json::from_str(&node.l7ctl_ok(&["get", "status", "-o", "json"])).expect("status is JSON")
}

/// Waits (up to `within`) until `check` holds for node `node`'s `/v1/status`; the last one.
fn wait_status(
    node: &TestNode,
    within: Duration,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let s = status_json(node);
        if check(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{what} within {within:?}: {s}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `l7ctl get workloads -o json` of `node`: (node, name) pairs.
fn workloads(node: &TestNode) -> Vec<(String, String)> {
    let out = node.l7ctl_ok(&["get", "workloads", "-o", "json"]);
    let mut v: Vec<(String, String)> = out
        .lines()
        .map(|l| {
            let w: serde_json::Value = serde_json::from_str(l).unwrap();
            (w["node"].as_str().unwrap_or("").to_string(), w["name"].as_str().unwrap().to_string())
        })
        .collect();
    v.sort();
    v
}

fn wait_workloads(node: &TestNode, want: &[(&str, &str)], within: Duration) {
    let want: Vec<(String, String)> = want.iter().map(|(n, w)| (n.to_string(), w.to_string())).collect();
    let deadline = Instant::now() + within;
    loop {
        let got = workloads(node);
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "workloads listed: {got:?}, expected {want:?} within {within:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Three nodes up, each with an HTTP server on its host's 8080 and `client` and `other`
/// workloads (labels app=client, app=other) running.
fn three_nodes(name: &str) -> TestCluster {
    let mut c = TestCluster::new(name, 3).unwrap();
    for i in 0..3 {
        c.start_node(i, &[]).unwrap();
        let node = &mut c.nodes[i];
        node.http_server(None, "127.0.0.1", 8080, &format!("node {i}\n")).unwrap();
        node.spawn_l7ctl_run("client", "app=client", &["sleep", "3600"], "client.log").unwrap();
        node.spawn_l7ctl_run("other", "app=other", &["sleep", "3600"], "other.log").unwrap();
    }
    c
}

#[test]
fn an_apply_on_one_node_is_in_force_on_every_node_and_says_so_per_node() {
    let c = three_nodes("cluster-apply");
    // Every node lists every node's workloads, naming the node.
    let all = [
        ("node-0", "client"),
        ("node-0", "other"),
        ("node-1", "client"),
        ("node-1", "other"),
        ("node-2", "client"),
        ("node-2", "other"),
    ];
    for node in &c.nodes {
        wait_workloads(node, &all, Duration::from_secs(10));
    }
    let table = c.nodes[1].l7ctl_ok(&["get", "workloads"]);
    assert!(table.lines().next().unwrap().contains("NODE"), "{table}");
    assert!(table.lines().any(|l| l.contains("client") && l.contains("node-2")), "{table}");

    // Nothing applied yet: every client reaches every path.
    for node in &c.nodes {
        assert_eq!(status(node, "client", "/"), "200");
    }

    // Applied on node 0: stored at one revision, in force on all three, and node 2's kernel
    // and l7proxy enforce it (its client is redirected, GET / is refused at L7).
    let file = write(&c.nodes[0], "v1.yaml", &client_policy("/index.html"));
    let o = c.nodes[0].l7ctl(&["apply", "-f", &file]).unwrap();
    let out = stdout(&o);
    eprintln!("apply said:\n{out}{}", stderr(&o));
    assert!(o.status.success(), "{out}{}", stderr(&o));
    assert!(out.contains("default/client created"), "{out}");
    assert!(out.contains("stored in the cluster at revision "), "{out}");
    for i in 0..3 {
        assert!(out.contains(&format!("node node-{i}: in force")), "{out}");
    }
    for (i, node) in c.nodes.iter().enumerate() {
        assert_eq!(status(node, "client", "/index.html"), "200", "node {i}: GET /index.html allowed");
        assert_eq!(status(node, "client", "/"), "403", "node {i}: GET / denied by the proxy");
        assert_eq!(status(node, "other", "/"), "200", "node {i}: app=other is not selected");
        let s = status_json(node);
        assert_eq!(s["kvstore"]["connected"], true, "{s}");
        assert_eq!(s["kvstore"]["nodes"].as_array().map(|n| n.len()), Some(3), "{s}");
        let p = node.l7ctl_ok(&["get", "policies"]);
        assert!(p.contains("client") && p.contains("cluster"), "node {i} lists the policy with origin cluster: {p}");
    }

    // An update from node 1, a delete from node 2: each in force everywhere.
    let file = write(&c.nodes[1], "v2.yaml", &client_policy("/"));
    let out = c.nodes[1].l7ctl_ok(&["apply", "-f", &file]);
    assert!(out.contains("default/client updated") && out.matches(": in force").count() == 3, "{out}");
    for node in &c.nodes {
        assert_eq!(status(node, "client", "/"), "200");
        assert_eq!(status(node, "client", "/index.html"), "403");
    }
    let out = c.nodes[2].l7ctl_ok(&["delete", "policy", "client"]);
    assert!(out.matches(": in force").count() == 3, "{out}");
    for node in &c.nodes {
        assert_eq!(status(node, "client", "/index.html"), "200");
    }
    // A delete of what is not there: refused by name, nothing changes.
    let o = c.nodes[0].l7ctl(&["delete", "policy", "client"]).unwrap();
    assert!(!o.status.success() && stderr(&o).contains("no policy `default/client`"), "{}", stderr(&o));

    // A document that does not validate never reaches etcd.
    let bad = write(&c.nodes[0], "bad.yaml", &client_policy("/").replace("toEntities", "toEntitees"));
    let o = c.nodes[0].l7ctl(&["apply", "-f", &bad]).unwrap();
    assert!(!o.status.success() && stderr(&o).contains("toEntitees"), "{}", stderr(&o));
    let keys = c.etcdctl_ok(&["get", "--prefix", "--keys-only", "/l7mesh/v1/policies/"]);
    assert!(keys.trim().is_empty(), "nothing stored: {keys}");
}

#[test]
fn a_stopped_etcd_leaves_every_node_enforcing_and_saying_so_and_they_catch_up_when_it_is_back() {
    let mut c = three_nodes("cluster-etcd");
    let file = write(&c.nodes[0], "v1.yaml", &client_policy("/index.html"));
    c.nodes[0].l7ctl_ok(&["apply", "-f", &file]);

    c.stop_etcd().unwrap();
    for (i, node) in c.nodes.iter().enumerate() {
        let s = wait_status(node, Duration::from_secs(15), "the node says etcd is unreachable", |s| {
            s["kvstore"]["connected"] == false
        });
        assert!(s["kvstore"]["error"].as_str().is_some_and(|e| !e.is_empty()), "{s}");
        // Still enforcing the set it had.
        assert_eq!(status(node, "client", "/"), "403", "node {i} keeps enforcing");
        assert_eq!(status(node, "client", "/index.html"), "200", "node {i} keeps allowing");
        assert_eq!(api_metric(node, "l7mesh_kvstore_connected "), 0.0);
        let o = node.l7ctl(&["status"]).unwrap();
        let text = stdout(&o);
        assert!(text.contains("kvstore") && text.contains("unreachable since"), "{text}");
        assert_eq!(o.status.code(), Some(2), "l7ctl status fails while the kvstore is away: {text}");
    }
    let ready = c.nodes[0].run_ok(None, &["curl", "-s", "http://127.0.0.1:9090/readyz"]).unwrap();
    assert!(ready.starts_with("ready: policy version") && ready.contains("unreachable since"), "{ready}");
    // A write is refused, clearly, and changes nothing.
    let file = write(&c.nodes[1], "v2.yaml", &client_policy("/"));
    let o = c.nodes[1].l7ctl(&["apply", "-f", &file]).unwrap();
    assert!(!o.status.success(), "{}", stdout(&o));
    assert!(stderr(&o).contains("the kvstore is unreachable"), "{}", stderr(&o));
    assert_eq!(status(&c.nodes[1], "client", "/"), "403");
    // A local workload still starts, and is enforced as the set says.
    c.nodes[2].spawn_l7ctl_run("late", "app=client", &["sleep", "3600"], "late.log").unwrap();
    assert_eq!(status(&c.nodes[2], "late", "/"), "403");

    // etcd back: every node reconnects by itself, the late workload is listed everywhere, and
    // writes go through again.
    c.start_etcd().unwrap();
    for node in &c.nodes {
        wait_status(node, Duration::from_secs(15), "the node reconnects", |s| s["kvstore"]["connected"] == true);
    }
    for node in &c.nodes {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !workloads(node).contains(&("node-2".into(), "late".into())) {
            assert!(Instant::now() < deadline, "late is listed: {:?}", workloads(node));
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let out = c.nodes[1].l7ctl_ok(&["apply", "-f", &file]);
    assert_eq!(out.matches(": in force").count(), 3, "{out}");
    for node in &c.nodes {
        assert_eq!(status(node, "client", "/"), "200");
        assert_eq!(api_metric(node, "l7mesh_kvstore_connected "), 1.0);
    }
}

#[test]
fn a_value_in_etcd_that_does_not_validate_is_refused_by_name_and_changes_nothing() {
    let c = three_nodes("cluster-bad");
    let file = write(&c.nodes[0], "v1.yaml", &client_policy("/index.html"));
    c.nodes[0].l7ctl_ok(&["apply", "-f", &file]);
    // Written past l7mesh (an operator's etcdctl, another release): an unknown field, then
    // a value that is not JSON at all.
    let doc: serde_json::Value =
        serde_json::from_str(&c.etcdctl_ok(&["get", "--print-value-only", "/l7mesh/v1/policies/default/client"]))
            .unwrap();
    let mut bad = doc.clone();
    bad["document"]["spec"]["egress"][0]["toEntitees"] = serde_json::json!(["world"]);
    c.etcdctl_ok(&["put", "/l7mesh/v1/policies/default/client", &bad.to_string()]);
    for (i, node) in c.nodes.iter().enumerate() {
        let s = wait_status(node, Duration::from_secs(10), "the node reports the refused revision", |s| {
            s["kvstore"]["nodes"].as_array().is_some_and(|n| {
                n.iter().any(|n| n["name"] == format!("node-{i}") && n["failed"]["error"].as_str().is_some())
            })
        });
        let me = s["kvstore"]["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == format!("node-{i}"))
            .unwrap()
            .clone();
        let e = me["failed"]["error"].as_str().unwrap();
        assert!(
            e.contains("policy `default/client` in the kvstore does not validate here") && e.contains("toEntitees"),
            "{e}"
        );
        assert_eq!(status(node, "client", "/"), "403", "node {i}: the last good set stays");
        assert_eq!(status(node, "client", "/index.html"), "200");
    }
    c.etcdctl_ok(&["put", "/l7mesh/v1/policies/default/other", "{not json"]);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(status(&c.nodes[1], "client", "/"), "403");
    // A write while a value does not read: refused by name, nothing is written.
    let file3 = write(&c.nodes[1], "v3.yaml", &client_policy("/").replace("name: client", "name: third"));
    let o = c.nodes[1].l7ctl(&["apply", "-f", &file3]).unwrap();
    assert!(!o.status.success() && stderr(&o).contains("policy `default/client` in the kvstore"), "{}", stderr(&o));
    assert!(c.etcdctl_ok(&["get", "/l7mesh/v1/policies/default/third"]).is_empty());
    // Repair through l7ctl: the unreadable key deleted (stored, but no node takes the set
    // while `client` does not read either: the command says so and fails), then the bad one
    // rewritten.
    let o = c.nodes[0].l7ctl(&["delete", "policy", "other"]).unwrap();
    assert!(!o.status.success(), "{}", stdout(&o));
    assert!(
        stdout(&o).contains("default/other deleted") && stdout(&o).contains("NOT in force: policy `default/client`"),
        "{}",
        stdout(&o)
    );
    assert!(
        stderr(&o).contains("no node takes the cluster's set until that policy is replaced or deleted too"),
        "{}",
        stderr(&o)
    );
    // Put right through l7ctl: every node takes it again.
    let file = write(&c.nodes[2], "v2.yaml", &client_policy("/"));
    let out = c.nodes[2].l7ctl_ok(&["apply", "-f", &file]);
    assert_eq!(out.matches(": in force").count(), 3, "{out}");
    for node in &c.nodes {
        assert_eq!(status(node, "client", "/"), "200");
        let s = status_json(node);
        assert!(s["kvstore"]["nodes"].as_array().unwrap().iter().all(|n| n["failed"].is_null()), "{s}");
    } // A value that is not UTF-8 refuses the set too (it does not drop out of it).
    let o = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "printf '\\377\\376' | nsenter --net=/var/run/netns/{} -- etcdctl --endpoints=http://{} put /l7mesh/v1/policies/default/raw",
            c.etcd_netns,
            integration::CLUSTER_ETCD
        ))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    wait_status(&c.nodes[0], Duration::from_secs(10), "node-0 names the raw value", |s| {
        s["kvstore"]["nodes"].as_array().is_some_and(|n| {
            n.iter().any(|n| {
                n["name"] == "node-0"
                    && n["failed"]["error"]
                        .as_str()
                        .is_some_and(|e| e.contains("`default/raw`") && e.contains("not UTF-8"))
            })
        })
    });
    assert_eq!(status(&c.nodes[0], "client", "/"), "200", "nothing dropped out of the set (GET / allowed)");
    assert_eq!(status(&c.nodes[0], "client", "/index.html"), "403");
    c.etcdctl_ok(&["del", "/l7mesh/v1/policies/default/raw"]);
}

#[test]
fn a_node_that_dies_has_its_workloads_expire_from_the_others() {
    let mut c = three_nodes("cluster-death");
    for node in &c.nodes {
        wait_workloads(
            node,
            &[
                ("node-0", "client"),
                ("node-0", "other"),
                ("node-1", "client"),
                ("node-1", "other"),
                ("node-2", "client"),
                ("node-2", "other"),
            ],
            Duration::from_secs(10),
        );
    }
    // SIGKILL of node 2's l7ctl up: its processes die with it, nothing deregisters, its lease
    // (3 s) is not renewed.
    let killed = Instant::now();
    c.nodes[2].kill_node().unwrap();
    let want = [("node-0", "client"), ("node-0", "other"), ("node-1", "client"), ("node-1", "other")];
    for node in &c.nodes[..2] {
        wait_workloads(node, &want, Duration::from_secs(15));
        let s = status_json(node);
        assert_eq!(s["kvstore"]["nodes"].as_array().map(|n| n.len()), Some(2), "node-2 is gone: {s}");
    }
    eprintln!("node-2's workloads expired {:?} after the kill", killed.elapsed());
    // An apply now waits for the two nodes that are there.
    let file = write(&c.nodes[0], "v1.yaml", &client_policy("/index.html"));
    let out = c.nodes[0].l7ctl_ok(&["apply", "-f", &file]);
    assert_eq!(out.matches(": in force").count(), 2, "{out}");
    assert!(!out.contains("node-2"), "{out}");
}

/// openssl's verdict on `cert` (PEM file) under `root` (PEM file), with `untrusted` as the
/// intermediates it may use.
fn openssl_verify(root: &std::path::Path, untrusted: Option<&std::path::Path>, cert: &std::path::Path) -> String {
    let mut c = std::process::Command::new("openssl");
    c.arg("verify").arg("-CAfile").arg(root);
    if let Some(u) = untrusted {
        c.arg("-untrusted").arg(u);
    }
    let o = c.arg(cert).output().unwrap();
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)).trim().to_string()
}

#[test]
fn a_node_holds_only_its_intermediate_which_rotates_and_a_bundle_that_does_not_hold_together_is_refused() {
    let mut node = TestNode::new("trust").unwrap();
    let policies = node.log_dir.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    node.start_node(&policies, &[]).unwrap();
    // The root, where the operator keeps it (not the node's directories).
    let root = node.log_dir.join("operator-root");
    let l7ctl = integration::workspace_bin("l7ctl").unwrap();
    let run = |args: &[&str]| {
        let o = std::process::Command::new(&l7ctl).args(args).output().unwrap();
        (o.status.success(), format!("{}{}", stdout(&o), stderr(&o)))
    };
    let r = root.display().to_string();
    let (ok, out) = run(&["ca", "init", "--dir", &r, "--trust-domain", "example.org"]);
    assert!(ok, "{out}");
    let (ok, out) = run(&["ca", "init", "--dir", &r]);
    assert!(!ok && out.contains("holds a cluster root already"), "{out}");
    let (ok, out) = run(&["ca", "issue-node", "node-0", "--dir", &r]);
    assert!(ok && out.contains("install-node"), "{out}");
    let bundle = root.join("nodes/node-0.pem");
    // Before any install, the node says what to do.
    let o = node.l7ctl(&["ca", "show-node", "--run-dir", &node.run_dir().display().to_string()]).unwrap();
    assert!(!o.status.success() && stderr(&o).contains("l7ctl ca install-node"), "{}", stderr(&o));
    let run_dir = node.run_dir().display().to_string();
    let out = node.l7ctl_ok(&["ca", "install-node", &bundle.display().to_string(), "--run-dir", &run_dir]);
    assert!(out.contains("node node-0's intermediate (trust domain example.org"), "{out}");
    let shown = node.l7ctl_ok(&["ca", "show-node", "--run-dir", &run_dir]);
    assert!(!shown.contains("PRIVATE KEY"), "show-node never prints a key");
    let shown_file = node.log_dir.join("shown.pem");
    std::fs::write(&shown_file, &shown).unwrap();
    let v = openssl_verify(&root.join("root.pem"), None, &shown_file);
    assert!(v.ends_with(": OK"), "the node's intermediate verifies under the root: {v}");
    // The node's state holds the intermediate's key, never the root's.
    let root_key = std::fs::read_to_string(root.join("root.key")).unwrap();
    let secret_line = root_key.lines().nth(1).unwrap().to_string();
    let found = std::process::Command::new("grep").args(["-rlF", &secret_line]).arg(node.state_dir()).output().unwrap();
    assert!(String::from_utf8_lossy(&found.stdout).trim().is_empty(), "the root key is nowhere in the node's state");
    // A rotation: a new intermediate for the same node, taken; the old one still verifies.
    let old = shown.clone();
    let (ok, out) = run(&["ca", "issue-node", "node-0", "--dir", &r]);
    assert!(ok, "{out}");
    node.l7ctl_ok(&["ca", "install-node", &bundle.display().to_string(), "--run-dir", &run_dir]);
    let rotated = node.l7ctl_ok(&["ca", "show-node", "--run-dir", &run_dir]);
    assert_ne!(rotated, old, "the intermediate changed");
    let v = openssl_verify(&root.join("root.pem"), None, &shown_file);
    assert!(v.ends_with(": OK"), "the old intermediate still verifies under the same root: {v}");
    // Refused, and nothing changes: another node's bundle, another root's, a truncated one.
    let (ok, _) = run(&["ca", "issue-node", "node-1", "--dir", &r]);
    assert!(ok);
    let o = node
        .l7ctl(&["ca", "install-node", &root.join("nodes/node-1.pem").display().to_string(), "--run-dir", &run_dir])
        .unwrap();
    assert!(!o.status.success() && stderr(&o).contains("a bundle for node node-1 is refused"), "{}", stderr(&o));
    let other = node.log_dir.join("other-root");
    let o2 = other.display().to_string();
    assert!(run(&["ca", "init", "--dir", &o2]).0 && run(&["ca", "issue-node", "node-0", "--dir", &o2]).0);
    let o = node
        .l7ctl(&["ca", "install-node", &other.join("nodes/node-0.pem").display().to_string(), "--run-dir", &run_dir])
        .unwrap();
    assert!(!o.status.success() && stderr(&o).contains("another cluster root"), "{}", stderr(&o));
    let text = std::fs::read_to_string(&bundle).unwrap();
    let cut = node.log_dir.join("cut.pem");
    std::fs::write(&cut, &text[..text.len() / 2]).unwrap();
    let o = node.l7ctl(&["ca", "install-node", &cut.display().to_string(), "--run-dir", &run_dir]).unwrap();
    assert!(!o.status.success() && stderr(&o).contains("the node bundle"), "{}", stderr(&o));
    assert_eq!(node.l7ctl_ok(&["ca", "show-node", "--run-dir", &run_dir]), rotated, "nothing changed");
}

#[test]
fn a_rollback_makes_the_cluster_set_that_version_again_and_removes_what_it_did_not_hold() {
    let c = three_nodes("cluster-rollback");
    c.nodes[0].l7ctl_ok(&["apply", "-f", &write(&c.nodes[0], "v1.yaml", &client_policy("/index.html"))]);
    let v1 = c.nodes[0].l7ctl_ok(&["get", "status", "-o", "json"]);
    let v1: serde_json::Value = serde_json::from_str(&v1).unwrap();
    let v1 = v1["in_force"]["store"].as_u64().unwrap();
    c.nodes[1].l7ctl_ok(&["apply", "-f", &write(&c.nodes[1], "v2.yaml", &client_policy("/"))]);
    // A key that does not read, written past l7mesh: the rollback removes it.
    c.etcdctl_ok(&["put", "/l7mesh/v1/policies/default/junk", "{not json"]);
    std::thread::sleep(Duration::from_millis(500));
    let o = c.nodes[0].l7ctl(&["rollback", &v1.to_string()]).unwrap();
    let out = stdout(&o);
    assert!(o.status.success(), "{out}{}", stderr(&o));
    assert!(out.contains("default/junk deleted") && out.contains("default/client updated"), "{out}");
    assert_eq!(out.matches(": in force").count(), 3, "{out}");
    for node in &c.nodes {
        assert_eq!(status(node, "client", "/"), "403");
        assert_eq!(status(node, "client", "/index.html"), "200");
    }
    assert!(c.etcdctl_ok(&["get", "/l7mesh/v1/policies/default/junk"]).is_empty());
}

#[test]
fn an_etcd_that_comes_back_empty_does_not_wipe_enforcement_and_names_cannot_be_taken_twice() {
    let mut c = TestCluster::new("cluster-wipe", 3).unwrap();
    for i in 0..2 {
        c.start_node(i, &[]).unwrap();
        c.nodes[i].http_server(None, "127.0.0.1", 8080, "x\n").unwrap();
        c.nodes[i].spawn_l7ctl_run("client", "app=client", &["sleep", "3600"], "client.log").unwrap();
    }
    c.nodes[0].l7ctl_ok(&["apply", "-f", &write(&c.nodes[0], "v1.yaml", &client_policy("/index.html"))]);
    // A third node under a name a live node holds: it never joins, and says why.
    c.start_node_named(2, "node-1", &[]).unwrap();
    let s = wait_status(&c.nodes[2], Duration::from_secs(10), "the duplicate says its name is taken", |s| {
        s["kvstore"]["error"].as_str().is_some_and(|e| e.contains("node name `node-1` is held by a live registration"))
    });
    assert_eq!(s["kvstore"]["connected"], false, "{s}");
    let listed = status_json(&c.nodes[0]);
    assert_eq!(listed["kvstore"]["nodes"].as_array().map(|n| n.len()), Some(2), "{listed}");
    c.nodes[2].stop_node().unwrap();
    // etcd wiped (a new data directory: a new cluster, empty): the nodes keep their set.
    c.wipe_etcd().unwrap();
    for (i, node) in c.nodes[..2].iter().enumerate() {
        wait_status(node, Duration::from_secs(15), "the node refuses the empty set of another cluster", |s| {
            s["kvstore"]["nodes"].as_array().is_some_and(|n| {
                n.iter().any(|n| {
                    n["name"] == format!("node-{i}")
                        && n["failed"]["error"].as_str().is_some_and(|e| e.contains("refusing to replace it"))
                })
            })
        });
        assert_eq!(status(node, "client", "/"), "403", "node {i} keeps enforcing");
    }
}

#[test]
fn a_node_that_joins_keeps_its_own_policies_until_the_cluster_holds_them() {
    let mut c = TestCluster::new("cluster-join", 2).unwrap();
    c.start_node(0, &[]).unwrap();
    // Node 1 first runs alone, with a policy of its own.
    let node = &mut c.nodes[1];
    let mut args = vec!["up".to_string()];
    args.extend(node.node_dir_args());
    node.restart_node_with(args).unwrap();
    node.http_server(None, "127.0.0.1", 8080, "x\n").unwrap();
    node.spawn_l7ctl_run("client", "app=client", &["sleep", "3600"], "client.log").unwrap();
    let own = write(node, "own.yaml", &client_policy("/index.html"));
    node.l7ctl_ok(&["apply", "-f", &own]);
    assert_eq!(status(node, "client", "/"), "403");
    node.stop_node().unwrap();
    // Joined: the cluster's (empty) set would replace it: refused, named, still enforced.
    c.start_node(1, &[]).unwrap();
    let s = wait_status(&c.nodes[1], Duration::from_secs(10), "node-1 refuses to drop its own policy", |s| {
        s["kvstore"]["nodes"].as_array().is_some_and(|n| {
            n.iter().any(|n| {
                n["name"] == "node-1" && n["failed"]["error"].as_str().is_some_and(|e| e.contains("`default/client`"))
            })
        })
    });
    eprintln!("{s}");
    assert_eq!(status(&c.nodes[1], "client", "/"), "403");
    // Applied to the cluster as it is: node 1 takes the set (the same policy, now the cluster's).
    let o = c.nodes[0].l7ctl(&["apply", "-f", &own]).unwrap();
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert_eq!(stdout(&o).matches(": in force").count(), 2, "{}", stdout(&o));
    assert_eq!(status(&c.nodes[1], "client", "/"), "403");
    let p = c.nodes[1].l7ctl_ok(&["get", "policies"]);
    assert!(p.contains("cluster"), "{p}");
}

#[test]
fn a_node_that_stops_leaves_at_once_and_a_write_too_large_for_etcd_is_refused_clearly() {
    let mut c = TestCluster::new("cluster-leave", 2).unwrap();
    c.start_node(0, &[]).unwrap();
    // A long lease: only the revoke at the stop can make it go quickly.
    c.start_node(1, &["--kvstore-lease-ttl", "120"]).unwrap();
    c.nodes[1].spawn_l7ctl_run("client", "app=client", &["sleep", "3600"], "client.log").unwrap();
    wait_workloads(&c.nodes[0], &[("node-1", "client")], Duration::from_secs(10));
    c.nodes[1].stop_node().unwrap();
    wait_workloads(&c.nodes[0], &[], Duration::from_secs(10));
    let s = status_json(&c.nodes[0]);
    assert_eq!(s["kvstore"]["nodes"].as_array().map(|n| n.len()), Some(1), "{s}");
    // 130 policies in one apply: more operations than etcd takes in one transaction.
    let mut many = String::new();
    for i in 0..130 {
        many.push_str(
            &client_policy("/")
                .replace("name: client", &format!("name: p{i}"))
                .replace("app: client", &format!("app: p{i}")),
        );
        many.push_str("---\n");
    }
    let o = c.nodes[0].l7ctl(&["apply", "-f", &write(&c.nodes[0], "many.yaml", &many)]).unwrap();
    assert!(!o.status.success(), "{}", stdout(&o));
    assert!(stderr(&o).contains("etcd takes at most 128 in one transaction"), "{}", stderr(&o));
    assert!(c.etcdctl_ok(&["get", "--prefix", "--keys-only", "/l7mesh/v1/policies/"]).trim().is_empty());
}

/// The web workload's ingress: from app=client only, GET /index.html on 8080 (HTTP, judged by
/// the proxy of the web's node), and port 8081 at L4.
const WEB_POLICY: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: web\nspec:\n  endpointSelector:\n    matchLabels:\n      app: web\n  ingress:\n  - fromEndpoints:\n    - matchLabels:\n        app: client\n    toPorts:\n    - ports:\n      - port: \"8080\"\n        protocol: TCP\n      rules:\n        http:\n        - method: GET\n          path: \"/index.html\"\n  - fromEndpoints:\n    - matchLabels:\n        app: client\n    toPorts:\n    - ports:\n      - port: \"8081\"\n        protocol: TCP\n";

/// Two nodes with the cluster's trust installed (one root, each node its intermediate), a
/// `web` workload on node 1 serving 8080 and 8081 on every address, `client` and `other`
/// workloads on node 0.
fn two_nodes_with_trust(name: &str) -> TestCluster {
    let mut c = TestCluster::new(name, 2).unwrap();
    for i in 0..2 {
        c.start_node(i, &[]).unwrap();
    }
    c.install_trust("example.org").unwrap();
    let web = &mut c.nodes[1];
    let www = web.log_dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "the web of node-1\n").unwrap();
    std::fs::write(www.join("secret.html"), "TOP-SECRET-PLANS\n").unwrap();
    let dir = www.display().to_string();
    for port in ["8080", "8081"] {
        web.spawn_l7ctl_run(
            &format!("web-{port}"),
            "app=web",
            &["/usr/bin/python3", "-m", "http.server", port, "--bind", "0.0.0.0", "--directory", &dir],
            &format!("web-{port}.log"),
        )
        .unwrap();
        web.probe(None, &["wait-tcp", "127.0.0.1", port, "15"]).unwrap();
    }
    c.nodes[0].spawn_l7ctl_run("client", "app=client", &["sleep", "3600"], "client.log").unwrap();
    c.nodes[0].spawn_l7ctl_run("other", "app=other", &["sleep", "3600"], "other.log").unwrap();
    // Both nodes serve the tunnel, and each knows the other does.
    for node in &c.nodes {
        wait_status(node, Duration::from_secs(20), "both nodes serve the tunnel", |s| {
            s["kvstore"]["nodes"]
                .as_array()
                .is_some_and(|n| n.len() == 2 && n.iter().all(|n| n["tunnel_port"] == 15008))
        });
    }
    c.nodes[0].probe(None, &["wait-tcp", "10.240.0.11", "15008", "15"]).unwrap();
    c
}

fn remote(node: &TestNode, workload: Option<&str>, port: u16, path: &str) -> String {
    let url = format!("http://10.240.0.11:{port}{path}");
    let (_, body) = node.curl(workload, &url, &["-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5"]).unwrap();
    body.chars().take(3).collect()
}

#[test]
fn a_policy_on_one_node_admits_another_nodes_workload_by_the_labels_the_tunnel_proves() {
    let mut c = two_nodes_with_trust("cluster-tunnel");
    let policy = write(&c.nodes[0], "web.yaml", WEB_POLICY);
    let out = c.nodes[0].l7ctl_ok(&["apply", "-f", &policy]);
    assert_eq!(out.matches(": in force").count(), 2, "{out}");
    let node0 = &c.nodes[0];
    // L7, judged on node 1 with node 0's client's labels.
    assert_eq!(remote(node0, Some("client"), 8080, "/index.html"), "200", "app=client, GET /index.html");
    assert_eq!(remote(node0, Some("client"), 8080, "/secret.html"), "403", "app=client, another path: node 1's proxy");
    // L4 on 8081.
    assert_eq!(remote(node0, Some("client"), 8081, "/secret.html"), "200", "app=client at L4 on 8081");
    // Other labels: refused on node 1 (the tunnel's answer), on either port.
    assert_eq!(remote(node0, Some("other"), 8080, "/index.html"), "000", "app=other is not admitted");
    assert_eq!(remote(node0, Some("other"), 8081, "/index.html"), "000", "app=other is not admitted at L4");
    // Node 0's own processes outside any workload go direct: node 1's kernel sees node 0's
    // address, not a workload, and web's ingress admits only app=client.
    assert_eq!(remote(node0, None, 8081, "/index.html"), "000", "a direct connection proves no labels");
    // A service of node 1 that is no workload (nothing selects it) stays reachable as it was
    // directly: the tunnel carries it.
    c.nodes[1].http_server(None, "0.0.0.0", 9099, "node 1's own service\n").unwrap();
    let node0 = &c.nodes[0];
    assert_eq!(remote(node0, Some("client"), 9099, "/index.html"), "200", "a node service through the tunnel");
    assert_eq!(remote(node0, Some("other"), 9099, "/index.html"), "200", "no policy selects it");
    // The flows on node 1 name the remote workload and its node.
    let flows = c.nodes[1].flows().unwrap();
    let tunnelled: Vec<&serde_json::Value> = flows
        .iter()
        .filter(|f| f.to_string().contains("through the tunnel from spiffe://example.org/ns/default/sa/client"))
        .collect();
    assert!(!tunnelled.is_empty(), "node 1 records the tunnelled connections: {flows:?}");
    let denied = flows.iter().any(|f| f.to_string().contains("DENIED") && f.to_string().contains("other"));
    assert!(denied, "node 1 records the refusal of node 0's app=other: {flows:?}");
    // Every node's flows from node 0 (node 1's asked through the tunnel), each naming its node.
    let all = c.nodes[0].l7ctl_ok(&["observe", "--cluster", "-o", "json"]);
    let nodes: std::collections::BTreeSet<String> = all
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["node"].as_str().map(str::to_string))
        .collect();
    assert_eq!(nodes.into_iter().collect::<Vec<_>>(), ["node-0", "node-1"], "{all}");
    assert!(
        all.contains("through the tunnel from spiffe://example.org/ns/default/sa/client"),
        "node 1's flows are in it: {all}"
    );
    let table = c.nodes[0].l7ctl_ok(&["observe", "--cluster", "--verdict", "denied"]);
    assert!(table.contains("proxy@node-1"), "{table}");
}

#[test]
fn the_tunnel_carries_no_plaintext_and_refuses_a_peer_without_a_valid_certificate() {
    let c = two_nodes_with_trust("cluster-mtls");
    c.nodes[0].l7ctl_ok(&["apply", "-f", &write(&c.nodes[0], "web.yaml", WEB_POLICY)]);
    // A capture on the bridge between the nodes while the client fetches a page on 8081.
    let pcap = c.nodes[0].log_dir.join("tunnel.pcap");
    let mut dump = std::process::Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", c.fabric))
        .args(["--", "tcpdump", "-i", "br0", "-U", "-w"])
        .arg(&pcap)
        .arg("tcp")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let (_, body) =
        c.nodes[0].curl(Some("client"), "http://10.240.0.11:8081/secret.html", &["--max-time", "5"]).unwrap();
    assert!(body.contains("TOP-SECRET-PLANS"), "the client got the page: {body}");
    std::thread::sleep(Duration::from_millis(500));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(dump.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let _ = dump.wait();
    let captured = std::fs::read(&pcap).unwrap();
    assert!(captured.len() > 1000, "the capture saw the tunnel's traffic ({} bytes)", captured.len());
    let hay = String::from_utf8_lossy(&captured);
    assert!(!hay.contains("TOP-SECRET-PLANS"), "the page crossed the bridge in plaintext");
    assert!(!hay.contains("GET /secret.html"), "the request crossed the bridge in plaintext");
    // Without a client certificate, and with one from another root: refused in the handshake.
    let refused_before = c.nodes[1].metric("l7mesh_tls_handshakes_total{mode=\"tunnel\",result=\"refused\"}");
    let other_root = c.nodes[0].log_dir.join("other-root");
    std::fs::create_dir_all(&other_root).unwrap();
    integration::test_ca(&other_root, "other").unwrap();
    integration::test_leaf(
        &other_root,
        "intruder",
        "intruder",
        "subjectAltName=URI:spiffe://example.org/ns/default/sa/client\nextendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    let d = other_root.display().to_string();
    for (extra, alert) in [
        (String::new(), "certificate required"),
        (format!(" -cert {d}/intruder.pem -key {d}/intruder.key"), "unknown ca"),
    ] {
        let cmd = format!("printf 'PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n' | timeout 5 openssl s_client -connect 10.240.0.11:15008 -alpn h2 -quiet{extra}");
        let o = c.nodes[0].run(None, &["sh", "-c", &cmd]).unwrap();
        let said = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(said.contains(alert), "s_client{extra}: node 1 answers with the alert `{alert}`: {said}");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let refused = c.nodes[1].metric("l7mesh_tls_handshakes_total{mode=\"tunnel\",result=\"refused\"}");
        if refused >= refused_before + 2.0 {
            break;
        }
        assert!(Instant::now() < deadline, "node 1 refused {refused} tunnel handshakes (before: {refused_before})");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_tunnelled_connection_a_new_version_no_longer_allows_is_closed() {
    let mut c = two_nodes_with_trust("cluster-rejudge");
    c.nodes[0].l7ctl_ok(&["apply", "-f", &write(&c.nodes[0], "web.yaml", WEB_POLICY)]);
    // A connection held open on 8081 (L4) through the tunnel.
    let hold = "import socket\ns = socket.create_connection(('10.240.0.11', 8081))\nprint('open', flush=True)\ns.settimeout(60)\ntry:\n    d = s.recv(1)\n    print('closed' if d == b'' else 'data', flush=True)\nexcept Exception as e:\n    print('closed', type(e).__name__, flush=True)\n";
    let script = c.nodes[0].log_dir.join("hold.py");
    std::fs::write(&script, hold).unwrap();
    let script = script.display().to_string();
    c.nodes[0].spawn_l7ctl_run("held", "app=client", &["/usr/bin/python3", "-u", &script], "held.log").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !c.nodes[0].log("held.log").contains("open") {
        assert!(Instant::now() < deadline, "the held connection did not open: {}", c.nodes[0].log("held.log"));
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(!c.nodes[0].log("held.log").contains("closed"), "closed before any change");
    // 8081 no longer admitted: the held connection is closed by node 1's proxy.
    let only_8080 = WEB_POLICY.split("  - fromEndpoints:").take(2).collect::<Vec<_>>().join("  - fromEndpoints:");
    let out = c.nodes[0].l7ctl_ok(&["apply", "-f", &write(&c.nodes[0], "web2.yaml", &only_8080)]);
    assert_eq!(out.matches(": in force").count(), 2, "{out}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !c.nodes[0].log("held.log").contains("closed") {
        assert!(Instant::now() < deadline, "the held connection stayed open: {}", c.nodes[0].log("held.log"));
        std::thread::sleep(Duration::from_millis(100));
    }
    let flows = c.nodes[1].flows().unwrap();
    assert!(
        flows.iter().any(|f| f.to_string().contains("no longer carries this tunnelled connection as it was")),
        "node 1 says why it closed it: {flows:?}"
    );
    assert_eq!(remote(&c.nodes[0], Some("client"), 8081, "/index.html"), "000", "a new connection on 8081 is refused");
}

#[test]
fn grpc_rules_on_one_node_judge_another_nodes_calls_by_labels() {
    let mut c = two_nodes_with_trust("cluster-grpc");
    let peers_py = "/opt/l7mesh-peers/bin/python";
    let greeter = c.nodes[1].copy_script("greeter.py").unwrap();
    c.nodes[1]
        .spawn_l7ctl_run("greeter", "app=greeter", &[peers_py, "-u", &greeter, "serve", "50051"], "greeter.log")
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !c.nodes[1].log("greeter.log").contains("serving") {
        assert!(Instant::now() < deadline, "the greeter did not start: {}", c.nodes[1].log("greeter.log"));
        std::thread::sleep(Duration::from_millis(100));
    }
    let policy = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: greeter\nspec:\n  endpointSelector:\n    matchLabels:\n      app: greeter\n  ingress:\n  - fromEndpoints:\n    - matchLabels:\n        app: client\n    toPorts:\n    - ports:\n      - port: \"50051\"\n        protocol: TCP\n      rules:\n        grpc:\n        - service: helloworld.Greeter\n          method: SayHello\n";
    let out = c.nodes[0].l7ctl_ok(&["apply", "-f", &write(&c.nodes[0], "greeter.yaml", policy)]);
    assert_eq!(out.matches(": in force").count(), 2, "{out}");
    let local = c.nodes[0].copy_script("greeter.py").unwrap();
    let call = |who: &str, method: &str| {
        let o = c.nodes[0].run(Some(who), &[peers_py, &local, "call", "10.240.0.11:50051", method]).unwrap();
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    assert!(call("client", "SayHello").starts_with("OK"), "app=client may SayHello: {}", call("client", "SayHello"));
    let bye = call("client", "SayGoodbye");
    assert!(bye.starts_with("ERROR PERMISSION_DENIED"), "SayGoodbye is denied by node 1's proxy: {bye}");
    let other = call("other", "SayHello");
    assert!(other.starts_with("ERROR UNAVAILABLE"), "app=other is refused through the tunnel: {other}");
}

#[test]
fn authentication_required_admits_the_workloads_the_tunnel_proves_and_no_address() {
    let c = two_nodes_with_trust("cluster-auth");
    // Every peer on 8081, but only those whose identity is proven.
    let policy = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: web\nspec:\n  endpointSelector:\n    matchLabels:\n      app: web\n  ingress:\n  - fromEntities: [all]\n    authentication:\n      mode: required\n    toPorts:\n    - ports:\n      - port: \"8081\"\n        protocol: TCP\n";
    let out = c.nodes[0].l7ctl_ok(&["apply", "-f", &write(&c.nodes[0], "auth.yaml", policy)]);
    assert_eq!(out.matches(": in force").count(), 2, "{out}");
    let node0 = &c.nodes[0];
    assert_eq!(remote(node0, Some("client"), 8081, "/index.html"), "200", "node 0's workload, proven by the tunnel");
    assert_eq!(remote(node0, Some("other"), 8081, "/index.html"), "200", "any workload the tunnel proves");
    assert_eq!(remote(node0, None, 8081, "/index.html"), "000", "node 0's address proves nothing");
    // The same without `required`: node 0's address is admitted too.
    let open = policy.replace("    authentication:\n      mode: required\n", "");
    c.nodes[1].l7ctl_ok(&["apply", "-f", &write(&c.nodes[1], "open.yaml", &open)]);
    assert_eq!(remote(node0, None, 8081, "/index.html"), "200", "fromEntities: [all] without authentication");
}

#[test]
fn kafka_rules_on_one_node_judge_another_nodes_clients_by_labels() {
    let mut c = two_nodes_with_trust("cluster-kafka");
    // Tansu on node 1, advertising node 1's address (the clients on node 0 come back to it).
    c.nodes[1]
        .spawn_l7ctl_run(
            "kafka",
            "app=kafka",
            &[
                TANSU,
                "broker",
                "--listener-url",
                "tcp://0.0.0.0:9092",
                "--advertised-listener-url",
                "tcp://10.240.0.11:9092",
                "--storage-engine",
                "memory://tansu/",
            ],
            "tansu.log",
        )
        .unwrap();
    c.nodes[1].probe(None, &["wait-tcp", "127.0.0.1", "9092", "20"]).unwrap();
    let policy = kafka_policy(
        "kafka",
        "kafka",
        &[
            kafka_from("client", 9092, &["role: produce, topic: orders", "role: consume, topic: orders"]),
            kafka_from("admin", 9092, &[]),
        ],
    );
    let out = c.nodes[0].l7ctl_ok(&["apply", "-f", &write(&c.nodes[0], "kafka.yaml", &policy)]);
    assert_eq!(out.matches(": in force").count(), 2, "{out}");
    for topic in ["orders", "payroll"] {
        let o = c.nodes[1]
            .l7ctl_run(
                "admin",
                "app=admin",
                &[TANSU, "topic", "create", "--broker", "tcp://127.0.0.1:9092", "--partitions", "1", topic],
            )
            .unwrap();
        assert!(o.status.success(), "creating {topic}: {}{}", stdout(&o), stderr(&o));
    }
    let client = c.nodes[0].copy_script("kclient.py").unwrap();
    let k = |who: &str, args: &[&str]| {
        let mut cmd = vec![PEERS_PY, client.as_str()];
        cmd.extend_from_slice(args);
        let o = c.nodes[0].run(Some(who), &cmd).unwrap();
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let b = "10.240.0.11:9092";
    // Judged on node 1 by its Kafka rules, with node 0's client's labels the tunnel proved.
    assert_eq!(k("client", &["produce", b, "orders", "one order"]), "OK", "{}", c.nodes[1].node_log());
    assert_eq!(k("client", &["produce", b, "payroll", "a raise"]), "ERROR TOPIC_AUTHORIZATION_FAILED");
    assert_eq!(k("client", &["consume", b, "orders"]), "one order");
    assert_eq!(k("client", &["consume", b, "payroll"]), "ERROR TOPIC_AUTHORIZATION_FAILED");
    // Other labels: refused by node 1 before any Kafka byte reaches the broker.
    let other = k("other", &["produce", b, "orders", "forged"]);
    assert!(other.starts_with("ERROR"), "app=other cannot produce through the tunnel: {other}");
    let flows = c.nodes[1].flows().unwrap();
    let kafka: Vec<&serde_json::Value> = flows.iter().filter(|f| f["l7"]["type"] == "kafka").collect();
    assert!(
        kafka.iter().any(|f| f["verdict"] == "DENIED"
            && f.to_string().contains("payroll")
            && f["source"].to_string().contains("client")),
        "node 1's Kafka flows name the denied topic and node 0's client: {kafka:?}"
    );
    assert!(
        !kafka.iter().any(|f| f["source"].to_string().contains("other")),
        "no Kafka request of app=other was judged (refused before): {kafka:?}"
    );
    assert!(
        flows.iter().any(|f| f["verdict"] == "DENIED" && f.to_string().contains("other")),
        "node 1 records the refusal of app=other: {flows:?}"
    );
}

/// `client` may reach app=web on 8081 only; `other` may reach anything but app=db.
const EGRESS_POLICY: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: client-egress\nspec:\n  endpointSelector:\n    matchLabels:\n      app: client\n  egress:\n  - toEndpoints:\n    - matchLabels:\n        app: web\n    toPorts:\n    - ports:\n      - port: \"8081\"\n        protocol: TCP\n---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: other-egress\nspec:\n  endpointSelector:\n    matchLabels:\n      app: other\n  enableDefaultDeny:\n    egress: false\n  egressDeny:\n  - toEndpoints:\n    - matchLabels:\n        app: db\n";

#[test]
fn egress_rules_on_one_node_name_another_nodes_workloads_by_labels() {
    let mut c = two_nodes_with_trust("cluster-egress");
    // A second server on node 1, at the same address as web (the node's): only the port
    // tells them apart, and only node 1 knows which of its workloads listens where.
    let db_root = c.nodes[1].log_dir.join("db");
    std::fs::create_dir_all(&db_root).unwrap();
    std::fs::write(db_root.join("index.html"), "the db of node-1\n").unwrap();
    let dir = db_root.display().to_string();
    c.nodes[1]
        .spawn_l7ctl_run(
            "db",
            "app=db",
            &["/usr/bin/python3", "-u", "-m", "http.server", "8082", "--bind", "0.0.0.0", "--directory", &dir],
            "db.log",
        )
        .unwrap();
    c.nodes[1].probe(None, &["wait-tcp", "127.0.0.1", "8082", "15"]).unwrap();
    c.nodes[1].http_server(None, "0.0.0.0", 9099, "node 1's own service\n").unwrap();
    let out = c.nodes[0].l7ctl_ok(&["apply", "-f", &write(&c.nodes[0], "egress.yaml", EGRESS_POLICY)]);
    assert_eq!(out.matches(": in force").count(), 2, "{out}");
    let node0 = &c.nodes[0];
    assert_eq!(remote(node0, Some("client"), 8081, "/index.html"), "200", "app=web on 8081: allowed");
    assert_eq!(remote(node0, Some("client"), 8080, "/index.html"), "000", "app=web on another port");
    assert_eq!(remote(node0, Some("client"), 8082, "/index.html"), "000", "app=db: not named");
    assert_eq!(remote(node0, Some("client"), 9099, "/index.html"), "000", "node 1 itself: not named");
    assert_eq!(remote(node0, Some("other"), 8080, "/index.html"), "200", "other: anything but app=db");
    assert_eq!(remote(node0, Some("other"), 9099, "/index.html"), "200", "other: node 1's own service");
    assert_eq!(remote(node0, Some("other"), 8082, "/index.html"), "000", "other: app=db is denied");
    // Refused on node 0 before anything reached node 1's db.
    assert!(
        !c.nodes[1].log("db.log").contains("GET"),
        "a refused connection reached the db: {}",
        c.nodes[1].log("db.log")
    );
    let flows = c.nodes[0].flows().unwrap();
    let refused = |who: &str, port: u16, by: &str| {
        flows.iter().any(|f| {
            let s = f.to_string();
            f["verdict"] == "DENIED"
                && s.contains(&format!("default/{who}'s egress"))
                && s.contains(&format!("on port {port}"))
                && s.contains(by)
        })
    };
    assert!(refused("client", 8082, "default/db on node node-1"), "node 0 names the db: {flows:?}");
    assert!(refused("client", 9099, "to node node-1 on port"), "node 0 names node 1: {flows:?}");
    assert!(refused("other", 8082, "policy default/other-egress"), "node 0 names the deny: {flows:?}");
    // The db serves (the refusals were the policy's): node 1's own process reaches it.
    let (_, body) = c.nodes[1].curl(None, "http://127.0.0.1:8082/index.html", &["--max-time", "5"]).unwrap();
    assert!(body.contains("the db of node-1"), "{body}");
    // An L7 egress rule toward another node's workload is not judged on the way into the
    // tunnel yet: refused (fail closed), never carried unjudged.
    let l7 = EGRESS_POLICY.replacen(
        "        protocol: TCP\n---",
        "        protocol: TCP\n      rules:\n        http:\n        - method: GET\n---",
        1,
    );
    assert_ne!(l7, EGRESS_POLICY);
    c.nodes[0].l7ctl_ok(&["apply", "-f", &write(&c.nodes[0], "egress-l7.yaml", &l7)]);
    assert_eq!(remote(&c.nodes[0], Some("client"), 8081, "/index.html"), "000", "L7 egress rules through the tunnel");
    let flows = c.nodes[0].flows().unwrap();
    assert!(
        flows
            .iter()
            .any(|f| f["verdict"] == "DENIED" && f.to_string().contains("not judged on the way into the tunnel")),
        "node 0 says why: {flows:?}"
    );
    // What was allowed went through the tunnel as its workload.
    let far = c.nodes[1].flows().unwrap();
    for who in ["client", "other"] {
        let from = format!("through the tunnel from spiffe://example.org/ns/default/sa/{who}");
        assert!(far.iter().any(|f| f.to_string().contains(&from)), "{who}: {far:?}");
    }
}

//! The flow history: flows a real curl made (allowed and denied) are still there for
//! `l7ctl observe --since` and `l7ctl simulate --since` after the whole node restarted (and
//! after a `kill -9` of l7proxy), each once; `--follow --since` streams the history, the ring,
//! then new flows; `--since` reaches past what l7proxy's ring holds; a history directory that is a
//! symbolic link or writable by others is refused with its reason. A real node (`l7ctl up`),
//! real curl and a Python server.

use std::io::{BufRead as _, BufReader};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use integration::{stderr, stdout, TestNode};
use l7mesh_api::flow::{Flow, L7Part};
use l7mesh_api::Verdict;

/// The client's egress to the host on 8080 through the proxy: GET on `path` (a regex) only.
fn client_policy(name: &str, path: &str) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: {name}\nspec:\n  endpointSelector:\n    matchLabels:\n      app: client\n  egress:\n  - toEntities: [host]\n    toPorts:\n    - ports:\n      - port: \"8080\"\n        protocol: TCP\n      rules:\n        http:\n        - method: GET\n          path: \"{path}\"\n"
    )
}

/// A node whose policy lets the client GET /a (with any query) and nothing else, an HTTP
/// server on the host's 8080 and a long-running `client` workload.
fn node(name: &str, extra: &[&str]) -> TestNode {
    let mut node = TestNode::new(name).unwrap();
    let dir = node.log_dir.join("policies");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("web.yaml"), client_policy("web", "/a.*")).unwrap();
    node.start_node(&dir, extra).unwrap();
    node.http_server(None, "127.0.0.1", 8080, "hello\n").unwrap();
    node.spawn_l7ctl_run("client", "app=client", &["sleep", "3600"], "client.log").unwrap();
    node
}

/// One `curl` from the client for all the paths; the HTTP codes.
fn get(node: &TestNode, paths: &[String]) -> Vec<String> {
    let mut cmd = vec!["curl", "-sS", "--max-time", "20", "-w", "%{http_code}\\n"];
    let urls: Vec<String> = paths.iter().map(|p| format!("http://127.0.0.1:8080{p}")).collect();
    for url in &urls {
        cmd.extend(["-o", "/dev/null", url.as_str()]);
    }
    let o = node.run(Some("client"), &cmd).unwrap();
    stdout(&o).lines().map(str::to_string).collect()
}

/// The flows `l7ctl observe ARGS -o json` prints.
fn observe(node: &TestNode, args: &[&str]) -> Vec<Flow> {
    let mut all = vec!["observe", "-o", "json"];
    all.extend_from_slice(args);
    node.l7ctl_ok(&all).lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
}

/// The request paths (with their query) of the HTTP flows among `flows`, in order.
fn paths(flows: &[Flow]) -> Vec<String> {
    flows
        .iter()
        .filter_map(|f| match &f.l7 {
            Some(L7Part::Http { http }) => http.url.split_once(":8080").map(|(_, p)| p.to_string()),
            _ => None,
        })
        .collect()
}

/// Waits until the history directory holds a line containing `needle` (the writer runs each
/// second).
fn wait_on_disk(node: &TestNode, dir: &Path, needle: &str) {
    for _ in 0..100 {
        let on_disk = std::fs::read_dir(dir)
            .map(|d| d.flatten().any(|e| std::fs::read_to_string(e.path()).is_ok_and(|t| t.contains(needle))))
            .unwrap_or(false);
        if on_disk {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{needle} not in {} after 10 s:\n{}", dir.display(), node.node_log());
}

#[test]
fn flows_survive_a_restart_of_the_node() {
    let mut node = node("history-restart", &[]);
    assert_eq!(get(&node, &["/a?before=1".into(), "/b?before=1".into()]), ["404", "403"]);
    let dir = node.state_dir().join("flows");
    wait_on_disk(&node, &dir, "/b?before=1");

    // Root's only: the directory 0700, every segment 0600.
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        assert_eq!(mode(&entry.path()), 0o600, "{}", entry.path().display());
    }

    // The whole node stops (l7proxy with it: its ring is gone) and starts again on the same
    // state directory.
    node.stop_node().unwrap();
    node.restart_node().unwrap();
    let pid_before = node.pid_of("l7proxy");
    assert!(pid_before.is_some());
    assert_eq!(get(&node, &["/a?after=1".into()]), ["404"]);

    // Without --since: the new ring, which never saw the flows from before.
    let ring = paths(&observe(&node, &[]));
    assert!(!ring.iter().any(|p| p.contains("before")), "{ring:?}");
    // With it: those from before the restart (from disk) and after (the ring), each once, in
    // order, the denial with its verdict.
    let flows = observe(&node, &["--since", "10m"]);
    let seen = paths(&flows);
    let wanted = ["/a?before=1", "/b?before=1", "/a?after=1"];
    assert_eq!(seen.iter().filter(|p| wanted.contains(&p.as_str())).cloned().collect::<Vec<_>>(), wanted, "{seen:?}");
    let denied = flows.iter().find(|f| paths(std::slice::from_ref(f)) == ["/b?before=1"]).unwrap();
    assert_eq!(denied.verdict, Verdict::Denied);
    assert_eq!(denied.policy_name.as_deref(), Some("default/web"));
    // The same filters apply to what comes from disk.
    let denials = paths(&observe(&node, &["--since", "10m", "--verdict", "denied"]));
    assert_eq!(denials, ["/b?before=1"]);
    // A window that ends before the restart's flows: none of them.
    assert!(paths(&observe(&node, &["--since", "0s"])).iter().all(|p| !p.contains("before")));

    // --follow with --since: the history's flows first, then new ones as they come.
    let mut follow = node.l7ctl_command(&["observe", "--follow", "--since", "10m", "-o", "json"]).unwrap();
    let mut child = follow.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let flow: Flow = serde_json::from_str(&line).unwrap();
            if let Some(p) = paths(&[flow]).pop() {
                if tx.send(p).is_err() {
                    return;
                }
            }
        }
    });
    let mut followed = Vec::new();
    let next = |followed: &mut Vec<String>| {
        let p = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_else(|_| panic!("followed only {followed:?}"));
        followed.push(p.clone());
        p
    };
    while next(&mut followed) != "/a?after=1" {}
    assert_eq!(followed, wanted, "history, then the ring");
    assert_eq!(get(&node, &["/a?live=1".into()]), ["404"]);
    while next(&mut followed) != "/a?live=1" {}
    let _ = child.kill();
    let _ = child.wait();

    // simulate: a candidate that allows /b instead of /a changes the two requests from before
    // the restart and the two after (exit 3); without --since it has only the ring's two.
    let candidate = node.log_dir.join("candidate.yaml");
    std::fs::write(&candidate, client_policy("web", "/b.*")).unwrap();
    let candidate = candidate.display().to_string();
    let o = node.l7ctl(&["simulate", "-f", &candidate, "--since", "10m", "-o", "json"]).unwrap();
    assert_eq!(o.status.code(), Some(3), "{}{}", stdout(&o), stderr(&o));
    let report: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!((report["newly_denied"].as_u64(), report["newly_allowed"].as_u64()), (Some(3), Some(1)), "{report}");
    let o = node.l7ctl(&["simulate", "-f", &candidate, "-o", "json"]).unwrap();
    let report: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!((report["newly_denied"].as_u64(), report["newly_allowed"].as_u64()), (Some(2), Some(0)), "{report}");

    // A second restart: still each once (the writer resumed numbering after the newest record
    // on disk, it did not write the old ones again).
    wait_on_disk(&node, &dir, "/a?live=1");
    node.stop_node().unwrap();
    node.restart_node().unwrap();
    let seen = paths(&observe(&node, &["--since", "10m"]));
    let wanted = ["/a?before=1", "/b?before=1", "/a?after=1", "/a?live=1"];
    assert_eq!(seen.iter().filter(|p| wanted.contains(&p.as_str())).cloned().collect::<Vec<_>>(), wanted, "{seen:?}");
    assert_eq!(node.metric("l7mesh_flow_history_lost_total"), 0.0);
}

#[test]
fn flows_survive_a_crash_of_l7proxy() {
    let node = node("history-crash", &[]);
    assert_eq!(get(&node, &["/a?crash=1".into(), "/b?crash=1".into()]), ["404", "403"]);
    let dir = node.state_dir().join("flows");
    wait_on_disk(&node, &dir, "/b?crash=1");
    // kill -9: no last pass, no clean stop; `l7ctl up` starts another l7proxy.
    let old = node.pid_of("l7proxy").expect("l7proxy runs");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(old), nix::sys::signal::Signal::SIGKILL).unwrap();
    let mut back = false;
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(200));
        if node.pid_of("l7proxy").is_some_and(|p| p != old)
            && node.l7ctl(&["observe", "-o", "json"]).is_ok_and(|o| o.status.success())
        {
            back = true;
            break;
        }
    }
    assert!(back, "l7proxy did not come back:\n{}", node.node_log());
    assert_eq!(get(&node, &["/a?crash=2".into()]), ["404"]);
    let seen: Vec<String> =
        paths(&observe(&node, &["--since", "10m"])).into_iter().filter(|p| p.contains("crash")).collect();
    assert_eq!(seen, ["/a?crash=1", "/b?crash=1", "/a?crash=2"]);
}

#[test]
fn since_reaches_past_the_ring() {
    let node = node("history-ring", &["--flow-capacity", "20"]);
    // 60 requests in batches the ring holds between two passes of the writer (the server
    // closes each connection: a request is a connection's record and the request's).
    let mut made = Vec::new();
    for batch in 0..12 {
        let paths: Vec<String> = (0..5).map(|i| format!("/a?n={}", batch * 5 + i)).collect();
        assert!(get(&node, &paths).iter().all(|c| c == "404"));
        made.extend(paths);
        std::thread::sleep(Duration::from_millis(1500));
    }
    wait_on_disk(&node, &node.state_dir().join("flows"), "/a?n=59");
    let in_ring = paths(&observe(&node, &[]));
    assert!(in_ring.len() < 20, "the ring holds 20 records: {in_ring:?}");
    assert!(in_ring.contains(&"/a?n=59".to_string()), "{in_ring:?}");
    // --since: every one, once, in order.
    let all: Vec<String> =
        paths(&observe(&node, &["--since", "10m"])).into_iter().filter(|p| p.contains("?n=")).collect();
    assert_eq!(all, made);
    assert_eq!(node.metric("l7mesh_flow_history_lost_total"), 0.0);
    assert!(node.metric("l7mesh_flow_history_written_total") >= 60.0);
    assert!(node.metric("l7mesh_flow_history_bytes") > 0.0);

    // A burst larger than the ring between two passes: what the ring dropped first is lost to
    // the history too, and counted (not silently a gap).
    let burst: Vec<String> = (0..100).map(|i| format!("/a?burst={i}")).collect();
    assert!(get(&node, &burst).iter().all(|c| c == "404"));
    wait_on_disk(&node, &node.state_dir().join("flows"), "/a?burst=99");
    assert!(node.metric("l7mesh_flow_history_lost_total") > 0.0);
    let kept: Vec<String> =
        paths(&observe(&node, &["--since", "10m"])).into_iter().filter(|p| p.contains("burst")).collect();
    assert!(kept.len() < 100 && kept.last().map(String::as_str) == Some("/a?burst=99"), "{kept:?}");
}

#[test]
fn an_unsafe_history_directory_is_refused() {
    let mut node = TestNode::new("history-unsafe").unwrap();
    let policies = node.log_dir.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("web.yaml"), client_policy("web", "/a.*")).unwrap();
    let real = node.log_dir.join("real-flows");
    std::fs::create_dir_all(&real).unwrap();
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o700)).unwrap();
    let link = node.log_dir.join("flows-link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let e = node.start_node(&policies, &["--flow-history-dir", link.to_str().unwrap()]).unwrap_err().to_string();
    assert!(e.contains("is a symbolic link"), "{e}");
    let _ = node.down(&[]);

    let open = node.log_dir.join("open-flows");
    std::fs::create_dir_all(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let e = node.start_node(&policies, &["--flow-history-dir", open.to_str().unwrap()]).unwrap_err().to_string();
    assert!(e.contains("writable by group or others") && e.contains("chmod 700"), "{e}");
    assert_eq!(std::fs::read_dir(&open).unwrap().count(), 0, "nothing written into it");
}

/// A history directory that turns unsafe while the node runs (here a parent someone else
/// owns, as a server chowning its temporary directory would make it) costs the history only:
/// l7proxy, restarted after a crash with the datapath still pinned, does not refuse to start
/// (that would take every L7 port down); it enforces the policy, says why the history is off,
/// and writes nothing there.
#[test]
fn a_directory_unsafe_at_a_restart_costs_the_history_not_enforcement() {
    let node = node("history-unsafe-restart", &[]);
    assert_eq!(get(&node, &["/a?before=1".into(), "/b?before=1".into()]), ["404", "403"]);
    let dir = node.state_dir().join("flows");
    wait_on_disk(&node, &dir, "/b?before=1");
    let state = node.state_dir();
    std::os::unix::fs::chown(&state, Some(65534), None).unwrap();
    let old = node.pid_of("l7proxy").expect("l7proxy runs");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(old), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_for_new_l7proxy(&node, old);
    assert_eq!(get(&node, &["/a?after=1".into(), "/b?after=1".into()]), ["404", "403"], "the policy is enforced");
    let log = node.node_log();
    assert!(log.contains("the flow history is off") && log.contains("owned by uid 65534"), "{log}");
    std::thread::sleep(Duration::from_millis(1500));
    let on_disk: String =
        std::fs::read_dir(&dir).unwrap().filter_map(|e| std::fs::read_to_string(e.unwrap().path()).ok()).collect();
    assert!(on_disk.contains("/b?before=1") && !on_disk.contains("after=1"), "nothing written after the restart");
    std::os::unix::fs::chown(&state, Some(0), None).unwrap();
}

/// Waits until l7proxy runs again with another pid than `old` and answers.
fn wait_for_new_l7proxy(node: &TestNode, old: i32) {
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(200));
        if node.pid_of("l7proxy").is_some_and(|p| p != old)
            && node.l7ctl(&["observe", "-o", "json"]).is_ok_and(|o| o.status.success())
        {
            return;
        }
    }
    panic!("l7proxy did not come back:\n{}", node.node_log());
}

/// `kill -9` of l7proxy three times while a client makes one request after another: whatever
/// the history keeps across the crashes it keeps once and in order (a crash may cut a write in
/// half; numbering resumes after the last whole line), and the restarts go on appending to
/// the newest segment instead of leaving a file each.
#[test]
fn kill_9_under_traffic_neither_repeats_nor_piles_up_segments() {
    let mut node = node("history-kill9", &[]);
    let script = "i=0; while [ $i -lt 600 ]; do curl -s -o /dev/null --max-time 2 \"http://127.0.0.1:8080/a?k=$i\"; sleep 0.02; i=$((i+1)); done; echo loop-done";
    node.spawn_l7ctl_run("loader", "app=client", &["sh", "-c", script], "loader.log").unwrap();
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(1500));
        let old = node.pid_of("l7proxy").expect("l7proxy runs");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(old), nix::sys::signal::Signal::SIGKILL).unwrap();
        wait_for_new_l7proxy(&node, old);
    }
    let log = node.log_dir.join("loader.log");
    for _ in 0..600 {
        if std::fs::read_to_string(&log).is_ok_and(|t| t.contains("loop-done")) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(std::fs::read_to_string(&log).unwrap().contains("loop-done"), "the client's loop did not end");
    assert_eq!(get(&node, &["/a?k=last".into()]), ["404"]);
    let dir = node.state_dir().join("flows");
    wait_on_disk(&node, &dir, "/a?k=last");
    let seen: Vec<String> =
        paths(&observe(&node, &["--since", "10m"])).into_iter().filter(|p| p.contains("?k=")).collect();
    let ks: Vec<u32> = seen.iter().filter_map(|p| p.rsplit('=').next()?.parse().ok()).collect();
    assert!(ks.windows(2).all(|w| w[0] < w[1]), "each once, in order: {ks:?}");
    assert!(ks.len() > 300, "most of the 600 requests are kept: {}", ks.len());
    assert_eq!(seen.last().map(String::as_str), Some("/a?k=last"));
    let files: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(files.len(), 1, "one segment for four runs: {files:?}");
}

//! A policy version is in force everywhere (store, l7proxy, kernel) or nowhere: a version that
//! overflows a kernel map and a version l7proxy does not load are refused with the step that
//! failed, the version before stays in force in every part (traffic shows it), the failed
//! generation leaves no entry in the maps, and the next valid apply works. A dry run makes
//! every check an apply makes. Real kernel, real curl, real Python HTTP servers.

use std::time::{Duration, Instant};

use integration::{stderr, stdout, TestNode};

/// Entries of the node's L7_POLICY map (small, so a policy with many ports overflows it).
const POLICY_MAP_ENTRIES: &str = "64";

fn write(node: &TestNode, name: &str, yaml: &str) -> String {
    let dir = node.log_dir.join("candidates");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(name);
    std::fs::write(&file, yaml).unwrap();
    file.display().to_string()
}

/// The client's egress to the host: port 8080 through the proxy with GET on `path`, port
/// 8081 allowed at L4 when `with_8081`, and every port of `extra` allowed at L4.
fn client_policy(path: &str, with_8081: bool, extra: &[u16]) -> String {
    let mut yaml = format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: client\nspec:\n  endpointSelector:\n    matchLabels:\n      app: client\n  egress:\n  - toEntities: [host]\n    toPorts:\n    - ports:\n      - port: \"8080\"\n        protocol: TCP\n      rules:\n        http:\n        - method: GET\n          path: \"{path}\"\n"
    );
    let mut l4: Vec<u16> = extra.to_vec();
    if with_8081 {
        l4.push(8081);
    }
    if !l4.is_empty() {
        yaml.push_str("  - toEntities: [host]\n    toPorts:\n");
        // Cilium's (and l7mesh's) limit: 40 ports per port rule.
        for chunk in l4.chunks(40) {
            yaml.push_str("    - ports:\n");
            for p in chunk {
                yaml.push_str(&format!("      - port: \"{p}\"\n"));
            }
        }
    }
    yaml
}

/// HTTP status of GET `path` on `port` from the client workload (000: no connection).
fn status(node: &TestNode, port: u16, path: &str) -> String {
    let url = format!("http://127.0.0.1:{port}{path}");
    let (_, body) =
        node.curl(Some("client"), &url, &["-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5"]).unwrap();
    body.chars().take(3).collect()
}

/// A log line without its terminal colours.
fn plain(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out.trim_end().to_string()
}

/// `/v1/status`'s versions in force: (store, kernel, proxy).
fn in_force(node: &TestNode) -> (u64, Option<u64>, Option<u64>) {
    let s: serde_json::Value =
        serde_json::from_str(&node.l7ctl_ok(&["get", "status", "-o", "json"])).expect("status is JSON");
    let f = &s["in_force"];
    (f["store"].as_u64().expect("store version"), f["kernel"].as_u64(), f["proxy"].as_u64())
}

/// A node whose L7_POLICY map holds `POLICY_MAP_ENTRIES`, HTTP servers on 8080 and 8081 of
/// the host, a long-running `client` workload and version 1 of the client policy in force.
fn node_with_small_maps(name: &str) -> TestNode {
    node_with_client(name, &[("L7PROXY_POLICY_MAP_ENTRIES", POLICY_MAP_ENTRIES)])
}

/// A node (`env` for `l7ctl up`) with HTTP servers on 8080 and 8081 of the host, a
/// long-running `client` workload and version 1 of the client policy in force.
fn node_with_client(name: &str, env: &[(&str, &str)]) -> TestNode {
    let mut node = TestNode::new(name).unwrap();
    node.node_env.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let dir = node.log_dir.join("policies");
    std::fs::create_dir_all(&dir).unwrap();
    node.start_node(&dir, &[]).unwrap();
    node.http_server(None, "127.0.0.1", 8080, "marked\n").unwrap();
    node.http_server(None, "127.0.0.1", 8081, "plain\n").unwrap();
    node.spawn_l7ctl_run("client", "app=client", &["sleep", "3600"], "client.log").unwrap();
    node.l7ctl_ok(&["apply", "-f", &write(&node, "v1.yaml", &client_policy("/index.html", true, &[]))]);
    node
}

/// What version 1 allows and denies, as the client sees it.
fn assert_version_1(node: &TestNode, when: &str) {
    assert_eq!(status(node, 8080, "/index.html"), "200", "{when}: GET /index.html through the proxy");
    assert_eq!(status(node, 8080, "/"), "403", "{when}: GET / is denied by the proxy under version 1");
    assert_eq!(status(node, 8081, "/"), "200", "{when}: port 8081 is allowed at L4 under version 1");
}

/// Policy-map entries of the generation in force, and of the one after it (a failed apply's).
fn map_entries(node: &TestNode) -> ((usize, usize, usize), (usize, usize, usize), usize) {
    let maps = node.maps().unwrap();
    let g = maps.generation().unwrap();
    let used = maps.entries_used();
    (maps.entry_counts(g), maps.entry_counts(g.wrapping_add(1)), used.endpoints + used.ipcache + used.policy)
}

#[test]
fn a_version_that_overflows_a_map_or_that_l7proxy_does_not_load_changes_nothing() {
    let node = node_with_small_maps("atomic-full");
    assert_version_1(&node, "version 1");
    let (v1, kernel, proxy) = in_force(&node);
    assert_eq!((kernel, proxy), (Some(v1), Some(v1)), "every part has version {v1}");
    let (current, _, total) = map_entries(&node);
    assert_eq!(current.0 + current.1 + current.2, total, "the maps hold only the generation in force");

    // Version 2 would allow GET / and close port 8081, but its 100 ports do not fit beside
    // version 1 in a 64-entry map: the kernel refuses a write half-way.
    let ports: Vec<u16> = (0..100).map(|i| 20000 + 2 * i).collect();
    let too_big = write(&node, "v2.yaml", &client_policy("/(index.html)?", false, &ports));
    let o = node.l7ctl(&["apply", "-f", &too_big]).unwrap();
    let e = stderr(&o);
    assert!(!o.status.success(), "an apply that overflows L7_POLICY succeeded: {}", stdout(&o));
    assert!(e.contains(&format!("policy version {} was not applied", v1 + 1)), "{e}");
    assert!(e.contains("the kernel step"), "the error names the step: {e}");
    assert!(e.contains("map L7_POLICY is too small: this version needs"), "the error names the map: {e}");
    assert!(e.contains(&format!("version {v1} is still in force")), "{e}");
    assert!(e.contains("507"), "{e}");
    // Nothing of the failed generation is left in any map, and every part is still at v1.
    let (after, next, total) = map_entries(&node);
    assert_eq!(next, (0, 0, 0), "entries of the failed generation stayed behind");
    assert_eq!(after, current, "the generation in force is untouched");
    assert_eq!(after.0 + after.1 + after.2, total);
    assert_eq!(in_force(&node), (v1, Some(v1), Some(v1)), "store, kernel and l7proxy stay at version {v1}");
    assert_version_1(&node, "after the refused version 2");
    let stored: serde_json::Value = serde_json::from_str(&node.l7ctl_ok(&["get", "policies", "-o", "json"])).unwrap();
    assert_eq!(stored["revision"], 1, "the store kept version 1's document: {stored}");
    let table = node.l7ctl(&["get", "policies"]).unwrap();
    assert!(stderr(&table).contains(&format!("store {v1}, kernel {v1}, l7proxy {v1}")), "{}", stderr(&table));

    // Through the REST API the refusal also says which step failed, as fields.
    let token = std::fs::read_to_string(node.run_dir().join("api-token")).unwrap();
    let auth = format!("Authorization: Bearer {}", token.trim());
    let upload = format!("@{too_big}");
    let o = node
        .run(
            None,
            &[
                "curl",
                "-sS",
                "-H",
                &auth,
                "-H",
                "Content-Type: application/yaml",
                "--data-binary",
                &upload,
                "http://127.0.0.1:9090/v1/policies",
            ],
        )
        .unwrap();
    let answer: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(&o)));
    assert_eq!(answer["failed_step"], "kernel", "{answer}");
    assert_eq!((answer["refused_version"].as_u64(), answer["in_force"].as_u64()), (Some(v1 + 1), Some(v1)), "{answer}");
    assert_eq!(in_force(&node), (v1, Some(v1), Some(v1)));

    // A dry run of the same version makes the same check, before anything is written.
    let o = node.l7ctl(&["apply", "--dry-run", "-f", &too_big]).unwrap();
    assert!(!o.status.success(), "the dry run accepted what the apply refuses: {}", stdout(&o));
    assert!(
        stderr(&o).contains("map L7_POLICY is too small") && stderr(&o).contains("nothing was applied"),
        "{}",
        stderr(&o)
    );

    // The next valid version goes in force everywhere.
    let v3 = write(&node, "v3.yaml", &client_policy("/(index.html)?", true, &[]));
    let o = node.l7ctl_ok(&["apply", "-f", &v3]);
    assert!(o.contains(&format!("policy version {} in force", v1 + 1)), "{o}");
    assert_eq!(status(&node, 8080, "/"), "200", "version 3 allows GET /");
    assert_eq!(in_force(&node), (v1 + 1, Some(v1 + 1), Some(v1 + 1)));
    let (current, next, total) = map_entries(&node);
    assert_eq!((next, current.0 + current.1 + current.2), ((0, 0, 0), total));

    // l7proxy stops answering (SIGSTOP: it holds its socket but loads nothing): a version is
    // refused at the proxy step, the kernel never flips, the store never commits.
    let v = v1 + 1;
    let pid = nix::unistd::Pid::from_raw(node.pid_of("l7proxy").expect("l7proxy runs"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let narrow = write(&node, "v4.yaml", &client_policy("/index.html", false, &[]));
    let o = node.l7ctl(&["apply", "-f", &narrow]).unwrap();
    let e = stderr(&o);
    let stopped_status = in_force(&node);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert!(!o.status.success(), "an apply l7proxy never loaded succeeded: {}", stdout(&o));
    assert!(e.contains(&format!("policy version {} was not applied", v + 1)), "{e}");
    assert!(e.contains("the l7proxy step") && e.contains("did not load policy version"), "{e}");
    assert!(e.contains(&format!("version {v} is still in force")) && e.contains("503"), "{e}");
    // The stopped proxy holds the refused version's line unread: the error does not claim it
    // has the version in force, it says what it will do (load the refused one, then that one).
    assert!(e.contains(&format!("it may load version {} before it", v + 1)), "{e}");
    assert_eq!(stopped_status, (v, Some(v), Some(v)), "while the proxy was stopped");
    // Resumed, the proxy finds the refused version and the one in force behind it, and loads
    // only the newer line: the refused version is never judged with.
    let loaded = |version: u64| {
        move |line: &String| line.contains("policy tables loaded") && line.ends_with(&format!("version={version}"))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines: Vec<String> = node.node_log().lines().map(plain).collect();
        let resumed = lines.iter().rposition(|l| l.contains("did not load policy version")).expect("the timeout");
        if lines[resumed..].iter().any(loaded(v)) {
            break;
        }
        assert!(Instant::now() < deadline, "l7proxy did not go back to version {v}:\n{}", node.node_log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let lines: Vec<String> = node.node_log().lines().map(plain).collect();
    assert!(!lines.iter().any(loaded(v + 1)), "l7proxy loaded the refused version:\n{}", node.node_log());
    assert_eq!(in_force(&node), (v, Some(v), Some(v)));
    assert_eq!(status(&node, 8080, "/"), "200", "version {v} (GET / allowed) is in force in l7proxy");
    assert_eq!(status(&node, 8081, "/"), "200", "version {v} (8081 allowed) is in force in the kernel");
    // And with the proxy back, the same version applies.
    node.l7ctl_ok(&["apply", "-f", &narrow]);
    assert_eq!(status(&node, 8080, "/"), "403");
    assert_eq!(status(&node, 8081, "/"), "000", "port 8081 is denied in the kernel now");
    assert_eq!(in_force(&node), (v + 1, Some(v + 1), Some(v + 1)));
}

/// The client's egress on port 9443 terminated with secret `secret`.
fn tls_policy(name: &str, secret: &str) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: {name}\nspec:\n  endpointSelector:\n    matchLabels:\n      app: client\n  egress:\n  - toPorts:\n    - ports:\n      - port: \"9443\"\n        protocol: TCP\n      terminatingTLS:\n        secret:\n          name: {secret}\n      rules:\n        http:\n        - method: GET\n"
    )
}

#[test]
fn a_dry_run_refuses_what_an_apply_refuses() {
    let mut node = TestNode::new("atomic-dry").unwrap();
    let dir = node.log_dir.join("policies");
    std::fs::create_dir_all(&dir).unwrap();
    node.start_node(&dir, &[]).unwrap();
    node.l7ctl_ok(&["apply", "-f", &write(&node, "a.yaml", &tls_policy("tls-a", "cert-a"))]);
    let history = node.l7ctl_ok(&["get", "status", "-o", "json"]);

    // tls-b alone is valid, but with tls-a in force it asks for another certificate on the
    // same port: the dry run says so, as the apply does.
    let b = write(&node, "b.yaml", &tls_policy("tls-b", "cert-b"));
    assert!(node.l7ctl(&["validate", "-f", &b]).unwrap().status.success(), "tls-b validates on its own");
    for args in [vec!["apply", "--dry-run", "-f", &b], vec!["apply", "-f", &b]] {
        let o = node.l7ctl(&args).unwrap();
        let e = stderr(&o);
        assert!(!o.status.success(), "{args:?} accepted a conflicting policy: {}", stdout(&o));
        assert!(
            e.contains("conflicting TLS settings") && e.contains("default/tls-a") && e.contains("default/tls-b"),
            "{e}"
        );
        assert!(e.contains("nothing was applied"), "{e}");
    }
    // A dry run that passes stores nothing.
    let c = write(&node, "c.yaml", &tls_policy("tls-a", "cert-a").replace("9443", "9444"));
    let o = node.l7ctl_ok(&["apply", "--dry-run", "-f", &c]);
    assert!(o.contains("default/tls-a would be updated") && o.contains("nothing applied (dry run"), "{o}");
    let policies: serde_json::Value = serde_json::from_str(&node.l7ctl_ok(&["get", "policies", "-o", "json"])).unwrap();
    assert_eq!(policies["revision"], 1, "{policies}");
    let now = node.l7ctl_ok(&["get", "status", "-o", "json"]);
    let version = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap()["in_force"]["store"].clone();
    assert_eq!(version(&now), version(&history), "neither the refused apply nor the dry runs made a version");
}

/// Clears the immutable flag of the store's file when dropped (also when the test panics, so
/// the node's directory can be removed).
struct Immutable(std::path::PathBuf);

impl Immutable {
    fn set(path: std::path::PathBuf) -> Self {
        // On tmpfs a file opened before `chattr +i` stays writable through that descriptor (as
        // policy-api's store is): the fault would not happen there.
        let fs = nix::sys::statfs::statfs(&path).expect("statfs of the store").filesystem_type();
        assert!(
            fs != nix::sys::statfs::TMPFS_MAGIC,
            "{} is on tmpfs, where chattr +i does not stop an open file's writes: run the tests with TMPDIR on a disk filesystem (ext4, xfs, btrfs)",
            path.display()
        );
        chattr("+i", &path);
        let fault = Immutable(path);
        // Opening the file for writing fails once the flag is set.
        let open = std::fs::OpenOptions::new().write(true).open(&fault.0);
        assert!(
            open.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::PermissionDenied),
            "chattr +i did not make {} immutable: {open:?}",
            fault.0.display()
        );
        fault
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        chattr("-i", &self.0);
    }
}

fn chattr(flag: &str, path: &std::path::Path) {
    let o = std::process::Command::new("chattr").arg(flag).arg(path).output().expect("chattr (e2fsprogs) runs");
    assert!(o.status.success(), "chattr {flag} {}: {}", path.display(), stderr(&o));
}

/// Waits (10 s at most) until the node reports `converged: true`, with every part at `v`;
/// `in_force` then.
fn wait_converged(node: &TestNode, v: u64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let f = in_force_json(node);
        if f["converged"] == true {
            let parts = (f["store"].as_u64(), f["kernel"].as_u64(), f["proxy"].as_u64());
            assert_eq!(parts, (Some(v), Some(v), Some(v)), "{f}");
            return f;
        }
        assert!(Instant::now() < deadline, "the node did not converge: {f}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `/v1/status`'s `in_force`, whole.
fn in_force_json(node: &TestNode) -> serde_json::Value {
    let s: serde_json::Value =
        serde_json::from_str(&node.l7ctl_ok(&["get", "status", "-o", "json"])).expect("status is JSON");
    s["in_force"].clone()
}

#[test]
fn a_store_that_refuses_a_commit_leaves_the_node_reporting_what_is_where_until_it_converges() {
    let node = node_with_client("atomic-store", &[]);
    assert_version_1(&node, "version 1");
    let (v, _, _) = in_force(&node);
    assert_eq!(in_force(&node), (v, Some(v), Some(v)));

    // The store's file made immutable (a real EPERM from ext4 on every write, and on opening
    // it again): version v+1 (GET / allowed, 8081 closed) reaches l7proxy and the kernel,
    // then the store refuses it.
    let store = node.state_dir().join("l7mesh.redb");
    let fault = Immutable::set(store.clone());
    let v2 = write(&node, "v2.yaml", &client_policy("/(index.html)?", false, &[]));
    let started = Instant::now();
    let o = node.l7ctl(&["apply", "-f", &v2]).unwrap();
    let e = stderr(&o);
    assert!(!o.status.success(), "an apply the store refused succeeded: {}", stdout(&o));
    assert!(started.elapsed() < Duration::from_secs(10), "the apply took {:?}", started.elapsed());
    assert!(
        e.contains(&format!("policy version {} was not applied: the store step (committing) failed", v + 1)),
        "{e}"
    );
    assert!(e.contains("Operation not permitted"), "the error names the store's failure: {e}");
    assert!(e.contains("undoing it failed (the store could not be read again: "), "{e}");
    assert!(
        e.contains(&format!(
            "the node has not converged: kernel: version {v}, l7proxy: version {v}, store: cannot be read"
        )),
        "the error says what is in force where: {e}"
    );
    assert!(e.contains(&format!("it last committed version {v}")) && e.contains(&format!("to version {v}")), "{e}");

    // Status says the same, and traffic follows the version it reports in force (v).
    let f = in_force_json(&node);
    assert_eq!(f["converged"], false, "{f}");
    assert_eq!((f["store"].as_u64(), f["kernel"].as_u64(), f["proxy"].as_u64()), (Some(v), Some(v), Some(v)), "{f}");
    assert!(f["store_error"].as_str().is_some_and(|s| s.contains("Operation not permitted")), "{f}");
    assert_eq!(f["divergence"]["failed_version"].as_u64(), Some(v + 1), "{f}");
    assert_eq!(f["divergence"]["target"].as_u64(), Some(v), "{f}");
    let table = node.l7ctl_ok(&["get", "status"]);
    eprintln!("the refused apply said:\n{e}\nl7ctl get status:\n{table}");
    assert!(table.contains("converged: false") && table.contains("cannot be read"), "{table}");
    assert_version_1(&node, "while the store refuses writes");
    // Another apply meanwhile is refused before it reaches any part.
    let o = node.l7ctl(&["apply", "-f", &v2]).unwrap();
    assert!(!o.status.success() && stderr(&o).contains("is not open"), "{}", stderr(&o));
    assert_version_1(&node, "after an apply refused while the store is closed");
    // The node keeps trying.
    std::thread::sleep(Duration::from_secs(1));
    let f = in_force_json(&node);
    assert!(f["divergence"]["attempts"].as_u64().unwrap_or(0) >= 2, "{f}");
    assert!(f["divergence"]["last_error"].as_str().is_some_and(|s| s.contains("Operation not permitted")), "{f}");

    // The fault removed, the node opens the store again and every part agrees on v.
    drop(fault);
    let f = wait_converged(&node, v);
    assert!(f["store_error"].is_null(), "{f}");
    assert!(node.l7ctl_ok(&["get", "status"]).contains("converged: true"));
    assert_version_1(&node, "converged");
    // And the refused version now applies everywhere.
    let o = node.l7ctl_ok(&["apply", "-f", &v2]);
    assert!(o.contains(&format!("policy version {} in force", v + 1)), "{o}");
    assert_eq!(in_force(&node), (v + 1, Some(v + 1), Some(v + 1)));
    assert_eq!(status(&node, 8080, "/"), "200", "version {} allows GET /", v + 1);
    assert_eq!(status(&node, 8081, "/"), "000", "version {} closes 8081", v + 1);

    // Two faults at once: l7proxy stopped (SIGSTOP: it holds its socket, loads nothing) and
    // the store immutable again. A workload start goes ahead in the kernel without the proxy
    // (by design), the store refuses it, the kernel goes back, and l7proxy cannot be told to:
    // the error and status say so, and the node converges once both faults are gone.
    let v = v + 1;
    let proxy = nix::unistd::Pid::from_raw(node.pid_of("l7proxy").expect("l7proxy runs"));
    nix::sys::signal::kill(proxy, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let fault = Immutable::set(store);
    let o = node.l7ctl_run("late", "app=late", &["true"]).unwrap();
    let e = stderr(&o);
    let f = in_force_json(&node);
    nix::sys::signal::kill(proxy, nix::sys::signal::Signal::SIGCONT).unwrap();
    eprintln!("the refused workload start said:\n{e}\nstatus: {f}");
    assert!(!o.status.success(), "a workload the store refused started: {}", stdout(&o));
    assert!(e.contains(&format!("policy version {} was not applied: the store step", v + 1)), "{e}");
    assert!(e.contains(&format!("l7proxy did not load version {v} again")), "{e}");
    assert_eq!(f["converged"], false, "{f}");
    assert_eq!(f["kernel"].as_u64(), Some(v), "the kernel went back: {f}");
    assert!(f["divergence"]["reason"].as_str().is_some_and(|r| r.contains("l7proxy did not load")), "{f}");
    drop(fault);
    wait_converged(&node, v);
    assert!(!node.l7ctl_ok(&["get", "workloads", "-o", "json"]).contains("\"late\""), "the refused workload is stored");
    assert_eq!(status(&node, 8080, "/"), "200", "version {v} in l7proxy");
    assert_eq!(status(&node, 8081, "/"), "000", "version {v} in the kernel");
}

//! Operating a node, day 1 and day 2, as a person types it: `l7ctl status` (exit 2 when a part
//! is down), `down` saying what it stops and what it keeps, `history` and `rollback` (traffic
//! follows the version put back; unknown versions refused), `get policy NAME -o yaml` round
//! trips through `apply -f -`, `delete -f FILE`, policies of `--policy` files protected from
//! API writes unless `--force`, `simulate` exiting 3 when a candidate changes a verdict, and
//! `l7ctl run` refusing a command its user cannot run before anything is registered. A real
//! node, real curl and Python servers.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::Duration;

use integration::{stderr, stdout, TestNode};

/// The client's egress to the host on 8080 through the proxy: GET on `path` (a regex) only.
fn client_policy(name: &str, path: &str) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: {name}\nspec:\n  endpointSelector:\n    matchLabels:\n      app: client\n  egress:\n  - toEntities: [host]\n    toPorts:\n    - ports:\n      - port: \"8080\"\n        protocol: TCP\n      rules:\n        http:\n        - method: GET\n          path: \"{path}\"\n"
    )
}

/// A policy for workloads labelled app=`app`: ingress from anyone on `port`.
fn ingress_policy(name: &str, app: &str, port: u16) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: {name}\nspec:\n  endpointSelector:\n    matchLabels:\n      app: {app}\n  ingress:\n  - toPorts:\n    - ports:\n      - port: \"{port}\"\n"
    )
}

fn write(node: &TestNode, name: &str, text: &str) -> String {
    let dir = node.log_dir.join("candidates");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(name);
    std::fs::write(&file, text).unwrap();
    file.display().to_string()
}

/// `l7ctl ARGS` with `input` on its stdin.
fn l7ctl_stdin(node: &TestNode, args: &[&str], input: &str) -> Output {
    let mut child = node
        .l7ctl_command(args)
        .unwrap()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

/// `l7ctl status ARGS` for this node's directories.
fn status(node: &TestNode, extra: &[&str]) -> Output {
    let mut args = vec!["status".to_string()];
    args.extend(node.node_dir_args());
    args.extend(extra.iter().map(|s| s.to_string()));
    node.l7ctl(&args.iter().map(String::as_str).collect::<Vec<_>>()).unwrap()
}

fn status_json(node: &TestNode) -> (Option<i32>, serde_json::Value) {
    let o = status(node, &["-o", "json"]);
    let v = serde_json::from_str(&stdout(&o)).unwrap_or_else(|e| panic!("{e}: {}{}", stdout(&o), stderr(&o)));
    (o.status.code(), v)
}

fn component<'a>(s: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    s["components"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("no {name}: {s}"))
}

/// HTTP status of GET `path` on the host's 8080 from the client workload.
fn code(node: &TestNode, path: &str) -> String {
    let url = format!("http://127.0.0.1:8080{path}");
    let (_, body) =
        node.curl(Some("client"), &url, &["-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5"]).unwrap();
    body.chars().take(3).collect()
}

fn store_version(node: &TestNode) -> u64 {
    status_json(node).1["in_force"]["store"].as_u64().unwrap()
}

/// A node with one policy file (`files.yaml`: ingress of app=db), an HTTP server on the host's
/// 8080 and a long-running `client` workload.
fn node(name: &str) -> (TestNode, PathBuf) {
    let mut node = TestNode::new(name).unwrap();
    let dir = node.log_dir.join("policies");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("files.yaml");
    std::fs::write(&file, ingress_policy("from-file", "db", 5432)).unwrap();
    node.start_node(&dir, &[]).unwrap();
    node.http_server(None, "127.0.0.1", 8080, "hello\n").unwrap();
    node.spawn_l7ctl_run("client", "app=client", &["sleep", "3600"], "client.log").unwrap();
    (node, file)
}

#[test]
fn status_says_each_part_and_exits_2_when_one_is_down() {
    let (mut node, _) = node("day2-status");
    let (code_, s) = status_json(&node);
    assert_eq!(code_, Some(0), "{s}");
    for (name, bin) in [("policy-api", "policy-api"), ("l7proxy", "l7proxy"), ("tls-broker", "tls-broker")] {
        let c = component(&s, name);
        assert_eq!(c["state"], "up", "{c}");
        assert_eq!(c["version"], env!("CARGO_PKG_VERSION"), "{c}");
        if bin != "tls-broker" {
            assert_eq!(c["pid"].as_i64(), node.pid_of(bin).map(i64::from), "{c}");
        }
        assert!(c["pid"].as_i64().is_some(), "{c}");
    }
    assert_eq!(component(&s, "l7ctl up")["state"], "up");
    let v = s["in_force"]["store"].as_u64().unwrap();
    assert_eq!(component(&s, "policy-api")["policy_version"].as_u64(), Some(v));
    assert_eq!(component(&s, "l7proxy")["policy_version"].as_u64(), Some(v), "l7proxy has the store's version");
    assert_eq!(s["in_force"]["kernel"].as_u64(), Some(v));
    let d = &s["datapath"];
    assert_eq!((d["pinned"].as_bool(), d["programs_attached"].as_u64()), (Some(true), d["programs_expected"].as_u64()));
    assert_eq!(d["fail_open"], false, "{d}");
    assert_eq!((s["policies"].as_u64(), s["workloads"].as_u64()), (Some(1), Some(1)), "{s}");
    assert_eq!(s["proxy_connections"].as_u64(), Some(0), "{s}");
    assert_eq!(s["errors"], serde_json::json!([]), "{s}");
    let table = status(&node, &[]);
    let t = stdout(&table);
    assert!(t.starts_with("COMPONENT") && t.contains("datapath: pinned at") && t.contains("fail-closed"), "{t}");
    assert!(t.contains("counts: 1 policies, 1 workloads") && t.contains("last errors: none"), "{t}");
    // A connection held open through l7proxy is counted.
    node.l7ctl_ok(&["apply", "-f", &write(&node, "web.yaml", &client_policy("web", "/a"))]);
    let hold = "import socket,time; s=socket.create_connection(('127.0.0.1',8080)); print('open', flush=True); time.sleep(120)";
    node.spawn_l7ctl_run("holder", "app=client", &["/usr/bin/python3", "-c", hold], "holder.log").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let held = loop {
        let n = status_json(&node).1["proxy_connections"].as_u64();
        if n >= Some(1) || std::time::Instant::now() > deadline {
            break n;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(held, Some(1), "the held connection: {}", node.log("holder.log"));
    // `get status` prints the same.
    let alias = node.l7ctl(&["get", "status", "-o", "json"]).unwrap();
    assert_eq!(alias.status.code(), Some(0), "{}", stderr(&alias));
    assert!(stdout(&alias).contains("\"components\""), "{}", stdout(&alias));

    // A refused apply is one of the last errors.
    let bad = write(
        &node,
        "bad.yaml",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\nspec: {bogus: 1}\n",
    );
    assert!(!node.l7ctl(&["apply", "-f", &bad]).unwrap().status.success());
    let (_, s) = status_json(&node);
    let errors = s["errors"].as_array().unwrap();
    assert!(errors.iter().any(|e| e.as_str().unwrap().contains("apply: 1 error(s)")), "{s}");

    // l7proxy stopped (SIGSTOP: alive, not answering): not ready, exit 2, the rest stays up.
    let proxy = nix::unistd::Pid::from_raw(node.pid_of("l7proxy").unwrap());
    nix::sys::signal::kill(proxy, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let o = status(&node, &["-o", "json"]);
    let alias = node.l7ctl(&["get", "status", "-o", "json"]).unwrap();
    nix::sys::signal::kill(proxy, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert_eq!(alias.status.code(), Some(0), "`get status` reports, as every get, and exits 0: {}", stderr(&alias));
    assert!(stdout(&alias).contains("\"not-ready\""), "{}", stdout(&alias));
    assert_eq!(o.status.code(), Some(2), "{}{}", stdout(&o), stderr(&o));
    let s: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(component(&s, "l7proxy")["state"], "not-ready", "{s}");
    assert_eq!(component(&s, "policy-api")["state"], "up", "{s}");
    assert!(stderr(&o).contains("not running as it should: l7proxy"), "{}", stderr(&o));
}

#[test]
fn down_says_what_it_stops_and_keeps_and_status_sees_the_datapath_enforcing() {
    let (mut node, _) = node("day2-down");
    let pids: Vec<(String, i32)> =
        ["policy-api", "l7proxy"].iter().map(|b| (b.to_string(), node.pid_of(b).unwrap())).collect();
    let o = node.down(&[]).unwrap();
    let said = stdout(&o);
    assert!(o.status.success(), "{said}{}", stderr(&o));
    assert!(said.contains("l7mesh: stopping l7ctl-up (pid "), "the plan comes first: {said}");
    for (name, pid) in &pids {
        assert!(said.contains(&format!("{name} (pid {pid})")), "{name} is named with its pid: {said}");
        assert!(said.contains(&format!("stopped {name} (pid {pid}")), "{said}");
    }
    assert!(said.contains("stopped tls-broker (pid ") && said.contains("stopped l7ctl-up (pid "), "{said}");
    assert!(said.contains(&format!("the datapath stays pinned at {}", node.pin_dir.display())), "{said}");
    assert!(said.contains("are refused until `l7ctl up` runs again"), "{said}");
    assert!(said.contains(&format!("kept the store in {}", node.state_dir().display())), "{said}");
    assert!(!said.contains("removed"), "a plain down removes nothing: {said}");
    assert!(node.pin_dir.join("links").join("l7_connect4").exists());
    assert_eq!(node.wait_until_no_node_process(Duration::from_secs(5)), vec![]);
    let _ = node.stop_node();

    // Stopped: status exits 2, every process down, the datapath still pinned and enforcing.
    let (code_, s) = status_json(&node);
    assert_eq!(code_, Some(2), "{s}");
    for name in ["l7ctl up", "policy-api", "l7proxy", "tls-broker"] {
        assert_eq!(component(&s, name)["state"], "down", "{s}");
    }
    assert_eq!(s["datapath"]["pinned"], true, "{s}");
    assert_eq!(s["datapath"]["programs_attached"], s["datapath"]["programs_expected"], "{s}");
    assert!(s["in_force"].is_null(), "no policy-api to ask: {s}");
    let t = stdout(&status(&node, &[]));
    assert!(t.contains("datapath: pinned at") && t.contains("fail-closed"), "{t}");

    // Nothing left to stop: it says so.
    let said = stdout(&node.down(&[]).unwrap());
    assert!(said.contains("no node process was running"), "{said}");
    // --uninstall removes each pin and says so; status then sees no datapath.
    let o = node.down(&["--uninstall"]).unwrap();
    let said = stdout(&o);
    assert!(said.contains(&format!("removed {}", node.pin_dir.join("links").join("l7_connect4").display())), "{said}");
    assert!(said.contains("enforcement stopped") && said.contains("kept the store"), "{said}");
    let (_, s) = status_json(&node);
    assert_eq!(
        (s["datapath"]["pinned"].as_bool(), s["datapath"]["programs_attached"].as_u64()),
        (Some(false), Some(0))
    );
}

#[test]
fn history_and_rollback_put_a_version_back_in_force_and_refuse_unknown_versions() {
    let (node, policy_file) = node("day2-rollback");
    let v1_file = write(&node, "v1.yaml", &client_policy("web", "/a"));
    node.l7ctl_ok(&["apply", "-f", &v1_file]);
    let v1 = store_version(&node);
    assert_eq!((code(&node, "/a"), code(&node, "/b")), ("404".into(), "403".into()), "v1: /a allowed, /b denied");
    node.l7ctl_ok(&["apply", "-f", &write(&node, "v2.yaml", &client_policy("web", "/b"))]);
    node.l7ctl_ok(&["apply", "-f", &write(&node, "other.yaml", &ingress_policy("other", "client", 9000))]);
    assert_eq!((code(&node, "/a"), code(&node, "/b")), ("403".into(), "404".into()), "v2: /b allowed, /a denied");

    let history = node.l7ctl_ok(&["history", "-o", "json"]);
    let entries: Vec<serde_json::Value> = history.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let first = &entries[0];
    assert_eq!(first["origin"], format!("file:{}", policy_file.parent().unwrap().display()), "{first}");
    assert_eq!(first["changes"][0][0], "default/from-file");
    let at_v1 = entries.iter().find(|e| e["version"].as_u64() == Some(v1)).expect("v1 is in the history");
    assert_eq!(at_v1["origin"], "api");
    assert!(at_v1["by"].as_str().unwrap().contains(&format!("(l7ctl apply -f {v1_file})")), "{at_v1}");
    let table = node.l7ctl_ok(&["history"]);
    assert!(
        table.starts_with("VERSION") && table.contains("created default/web") && table.contains("updated default/web"),
        "{table}"
    );

    // Back to v1: web as it was, `other` (created after v1) deleted, the file's policy untouched.
    let o = node.l7ctl_ok(&["rollback", &v1.to_string()]);
    assert!(o.contains("default/web updated") && o.contains("default/other deleted"), "{o}");
    assert!(o.contains("default/from-file left as its --policy file has it"), "{o}");
    assert!(o.contains(&format!("rolled back to the policies of version {v1}")), "{o}");
    assert_eq!((code(&node, "/a"), code(&node, "/b")), ("404".into(), "403".into()), "v1's policy is in force again");
    let now = store_version(&node);
    let last: serde_json::Value =
        serde_json::from_str(node.l7ctl_ok(&["history", "-o", "json"]).lines().last().unwrap()).unwrap();
    assert_eq!((last["version"].as_u64(), last["rollback_of"].as_u64()), (Some(now), Some(v1)), "{last}");
    let policies = node.l7ctl_ok(&["get", "policies", "-o", "json"]);
    assert!(!policies.contains("\"name\":\"other\"") && policies.contains("\"name\":\"from-file\""), "{policies}");
    // Rolling back to what is in force changes nothing and says so.
    let o = node.l7ctl_ok(&["rollback", &now.to_string()]);
    assert!(o.contains("already in force; nothing changed"), "{o}");

    // Unknown versions: refused clearly, nothing changes.
    let before = store_version(&node);
    for bad in ["99999", "0"] {
        let o = node.l7ctl(&["rollback", bad]).unwrap();
        assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
        assert!(stderr(&o).contains(&format!("version {bad} is not in the policy history")), "{}", stderr(&o));
        assert!(stderr(&o).contains("404 Not Found"), "{}", stderr(&o));
    }
    // A version workloads made (no policy change) is not one to roll back to either.
    node.l7ctl_ok(&["run", "--run-dir", node.run_dir().to_str().unwrap(), "--name", "blip", "--", "true"]);
    let workload_version = store_version(&node) - 1;
    let o = node.l7ctl(&["rollback", &workload_version.to_string()]).unwrap();
    assert!(stderr(&o).contains("is not in the policy history"), "{}", stderr(&o));
    assert!(store_version(&node) >= before, "refusals made no version");
    let after_refusals = node.l7ctl_ok(&["history", "-o", "json"]);
    assert_eq!(after_refusals.lines().count(), entries.len() + 1 /* the rollback */, "{after_refusals}");
    assert_eq!(code(&node, "/a"), "404", "the version in force stays");

    // A rollback that cannot be put in force (l7proxy stopped: it does not load the version)
    // changes nothing: the error says which version stays, the history and traffic agree.
    let v2 = entries.iter().find(|e| e["version"].as_u64() > Some(v1)).unwrap()["version"].as_u64().unwrap();
    let before = store_version(&node);
    let proxy = nix::unistd::Pid::from_raw(node.pid_of("l7proxy").unwrap());
    nix::sys::signal::kill(proxy, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let o = node.l7ctl(&["rollback", &v2.to_string()]).unwrap();
    nix::sys::signal::kill(proxy, nix::sys::signal::Signal::SIGCONT).unwrap();
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(e.contains(&format!("policy version {} was not applied", before + 1)), "{e}");
    assert!(e.contains(&format!("version {before} is still in force")) && e.contains("503"), "{e}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(store_version(&node), before, "nothing was committed");
    let last: serde_json::Value =
        serde_json::from_str(node.l7ctl_ok(&["history", "-o", "json"]).lines().last().unwrap()).unwrap();
    assert_eq!(last["rollback_of"].as_u64(), Some(v1), "the failed rollback is not in the history: {last}");
    assert_eq!((code(&node, "/a"), code(&node, "/b")), ("404".into(), "403".into()), "v1's policy stays in force");
    let (_, s) = status_json(&node);
    assert!(s["errors"].as_array().unwrap().iter().any(|e| e.as_str().unwrap().contains("rollback: ")), "{s}");
}

#[test]
fn get_policy_round_trips_and_file_managed_policies_refuse_api_writes_unless_forced() {
    let (node, policy_file) = node("day2-get");
    node.l7ctl_ok(&["apply", "-f", &write(&node, "web.yaml", &client_policy("web", "/a"))]);

    // One policy by name, as its stored document; back through `apply -f -` it is unchanged.
    let yaml = node.l7ctl_ok(&["get", "policy", "web", "-o", "yaml"]);
    assert!(yaml.starts_with("---") && yaml.contains("name: web") && yaml.contains("path: /a"), "{yaml}");
    let o = l7ctl_stdin(&node, &["apply", "-f", "-"], &yaml);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("default/web unchanged"), "{}", stdout(&o));
    // Edited and applied back from stdin: updated.
    let o = l7ctl_stdin(&node, &["apply", "-f", "-"], &yaml.replace("path: /a", "path: /c"));
    assert!(stdout(&o).contains("default/web updated"), "{}{}", stdout(&o), stderr(&o));
    // Every policy as one stream, which apply takes back too (here: a dry run).
    let all = node.l7ctl_ok(&["get", "Policies", "-o", "YAML"]);
    assert_eq!(all.matches("---").count(), 2, "{all}");
    let o = l7ctl_stdin(&node, &["apply", "--dry-run", "--force", "-f", "-"], &all);
    assert!(stdout(&o).contains("default/web would be unchanged"), "{}{}", stdout(&o), stderr(&o));
    // Singular and plural, any case; the table says whom each policy selects.
    let table = node.l7ctl_ok(&["get", "POLICY"]);
    let row = table.lines().find(|l| l.contains(" web ")).unwrap_or_else(|| panic!("{table}"));
    assert!(table.lines().next().unwrap().contains("SELECTS") && row.contains("client"), "{table}");
    let row = table.lines().find(|l| l.contains("from-file")).unwrap();
    assert!(row.contains(" - "), "from-file selects no running workload: {row}");
    let w = node.l7ctl_ok(&["get", "workload", "client", "-o", "json"]);
    assert!(w.contains("\"name\":\"client\""), "{w}");
    // Unknown names: clear errors.
    let o = node.l7ctl(&["get", "policy", "nosuch"]).unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no policy `default/nosuch`"), "{}", stderr(&o));
    let o = node.l7ctl(&["get", "workload", "nosuch"]).unwrap();
    assert!(stderr(&o).contains("no workload `nosuch`"), "{}", stderr(&o));
    // validate takes stdin too.
    let o = l7ctl_stdin(&node, &["validate", "-f", "-"], &yaml);
    assert!(o.status.success() && stdout(&o).contains("1 policies valid"), "{}", stdout(&o));
    let o = l7ctl_stdin(&node, &["validate", "-f", "-"], "kind: CiliumNetworkPolicy\nspec: [\n");
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(stdout(&o).contains("<stdin>"), "errors name stdin: {}", stdout(&o));

    // The policy of a --policy file: API writes are refused, naming the file; nothing changes.
    let version = store_version(&node);
    let file_doc = ingress_policy("from-file", "db", 6543);
    let refused = [
        l7ctl_stdin(&node, &["apply", "-f", "-"], &file_doc),
        l7ctl_stdin(&node, &["apply", "--dry-run", "-f", "-"], &file_doc),
        node.l7ctl(&["delete", "policy", "from-file"]).unwrap(),
        l7ctl_stdin(&node, &["delete", "-f", "-"], &file_doc),
    ];
    for o in &refused {
        let e = stderr(o);
        assert_eq!(o.status.code(), Some(1), "{}", stdout(o));
        assert!(e.contains(&format!("policy `default/from-file` comes from {}", policy_file.display())), "{e}");
        assert!(e.contains("--force") && e.contains("409 Conflict"), "{e}");
    }
    // (An apply naming it beside another policy is refused whole.)
    let two = format!("{}---\n{}", client_policy("web", "/z"), file_doc);
    assert!(!l7ctl_stdin(&node, &["apply", "-f", "-"], &two).status.success());
    assert_eq!(store_version(&node), version, "the refused writes made no version");
    let yaml_now = node.l7ctl_ok(&["get", "policy", "web", "-o", "yaml"]);
    assert!(yaml_now.contains("path: /c"), "web is as it was: {yaml_now}");
    // Forced: written through the API, recorded as such.
    let o = l7ctl_stdin(&node, &["apply", "--force", "-f", "-"], &file_doc);
    assert!(stdout(&o).contains("default/from-file updated"), "{}{}", stdout(&o), stderr(&o));
    let p: serde_json::Value =
        serde_json::from_str(&node.l7ctl_ok(&["get", "policy", "from-file", "-o", "json"])).unwrap();
    assert_eq!(p["origin"], "api", "{p}");
}

#[test]
fn delete_f_deletes_the_policies_a_file_names_all_or_none() {
    let (node, _) = node("day2-delete");
    let both = format!("{}---\n{}", client_policy("one", "/a"), ingress_policy("two", "client", 9000));
    let file = write(&node, "both.yaml", &both);
    node.l7ctl_ok(&["apply", "-f", &file]);
    // One of them missing: nothing deleted, the missing one named.
    node.l7ctl_ok(&["delete", "policy", "two"]);
    let version = store_version(&node);
    let o = node.l7ctl(&["delete", "-f", &file]).unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no policy `default/two`; nothing was deleted"), "{}", stderr(&o));
    assert_eq!(store_version(&node), version);
    assert!(node.l7ctl_ok(&["get", "policies"]).contains(" one "), "one is still there");
    // Both there: deleted in one version.
    node.l7ctl_ok(&["apply", "-f", &file]);
    let before = store_version(&node);
    let o = node.l7ctl_ok(&["delete", "-f", &file]);
    assert!(o.contains("default/one deleted") && o.contains("default/two deleted"), "{o}");
    assert!(o.contains(&format!("policy version {} in force", before + 1)), "one version for both: {o}");
    let last: serde_json::Value =
        serde_json::from_str(node.l7ctl_ok(&["history", "-o", "json"]).lines().last().unwrap()).unwrap();
    assert_eq!(last["changes"].as_array().unwrap().len(), 2, "{last}");
    // A file that does not validate deletes nothing.
    let o = node.l7ctl(&["delete", "-f", &write(&node, "bad.yaml", "kind: [")]).unwrap();
    assert!(!o.status.success());
}

#[test]
fn simulate_exits_3_when_a_candidate_changes_a_verdict() {
    let (node, _) = node("day2-simulate");
    node.l7ctl_ok(&["apply", "-f", &write(&node, "web.yaml", &client_policy("web", "/a"))]);
    assert_eq!((code(&node, "/a"), code(&node, "/b")), ("404".into(), "403".into()));

    // The policy in force as the candidate: nothing changes, exit 0.
    let same = client_policy("web", "/a");
    let o = l7ctl_stdin(&node, &["simulate", "-f", "-"], &same);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("0 newly denied, 0 newly allowed"), "{}", stdout(&o));
    // The proxy's connection records are not replayed, and the report says why.
    assert!(stdout(&o).contains("not replayable: the proxy's record of a connection it carried"), "{}", stdout(&o));

    // A candidate that denies /a and allows /b: exit 3, the changes listed.
    let changing = write(&node, "changing.yaml", &client_policy("web", "/b"));
    let o = node.l7ctl(&["simulate", "-f", &changing]).unwrap();
    assert_eq!(o.status.code(), Some(3), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("1 newly denied, 1 newly allowed"), "{}", stdout(&o));
    assert!(stdout(&o).contains("ALLOWED -> DENIED") && stdout(&o).contains("DENIED -> ALLOWED"), "{}", stdout(&o));
    assert!(stderr(&o).contains("changes 2 verdict(s): exit 3"), "{}", stderr(&o));
    let o = node.l7ctl(&["simulate", "-f", &changing, "-o", "json"]).unwrap();
    assert_eq!(o.status.code(), Some(3));
    let report: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(report["newly_denied"], 1, "{report}");
    let skipped: u64 = report["skipped_by"].as_array().unwrap().iter().map(|s| s["count"].as_u64().unwrap()).sum();
    assert_eq!(skipped, report["skipped"].as_u64().unwrap(), "every skipped flow has its reason: {report}");
    // Only reporting: exit 0.
    let o = node.l7ctl(&["simulate", "--no-fail-on-change", "-f", &changing]).unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("1 newly denied"), "{}", stdout(&o));
    // A candidate that does not validate is an error (1), not a verdict change (3).
    let o = l7ctl_stdin(&node, &["simulate", "-f", "-"], "kind: [");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
}

#[test]
fn run_refuses_a_command_its_user_cannot_run_before_registering_it() {
    use std::os::unix::fs::PermissionsExt as _;
    let (node, _) = node("day2-run");
    let marker = node.log_dir.join("ran");
    let script = format!("#!/bin/sh\ntouch {}\n", marker.display());
    // A root-only directory (as /root is): nobody cannot reach the script inside.
    let private = node.log_dir.join("private");
    std::fs::create_dir_all(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let hidden = private.join("job.sh");
    std::fs::write(&hidden, &script).unwrap();
    std::fs::set_permissions(&hidden, std::fs::Permissions::from_mode(0o755)).unwrap();
    // Readable but not executable.
    let plain = node.log_dir.join("plain.sh");
    std::fs::write(&plain, &script).unwrap();
    std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
    // Under /tmp but not shared: the workload's /tmp is private.
    let tmp = std::env::temp_dir().join(format!("l7mesh-day2-run-{}.sh", std::process::id()));
    std::fs::write(&tmp, &script).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();

    let cases: [(&str, &[&str]); 5] = [
        (
            hidden.to_str().unwrap(),
            &[
                "runs as nobody",
                &format!("{} is not readable to nobody", private.display()),
                "use an absolute path outside",
                "--user",
            ],
        ),
        (plain.to_str().unwrap(), &["runs as nobody, who may not execute it", "mode 644", "--user"]),
        ("/nonexistent/cmd", &["/nonexistent/cmd does not exist"]),
        ("no-such-command-l7", &["no such command in PATH"]),
        (tmp.to_str().unwrap(), &["private and empty", "--share"]),
    ];
    for (cmd, says) in cases {
        let o = node.l7ctl_run("job", "app=job", &[cmd]).unwrap();
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{cmd}: {}{e}", stdout(&o));
        for s in says {
            assert!(e.contains(s), "{cmd}: `{s}` not in: {e}");
        }
        assert!(!marker.exists(), "{cmd} must not start");
    }
    let _ = std::fs::remove_file(&tmp);
    // By name, found first in a PATH directory nobody cannot search (root's pyenv shims, say):
    // that is the one the workload would exec, and fail on.
    let bin = private.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy(&hidden, bin.join("l7job")).unwrap();
    let run_dir = node.run_dir().display().to_string();
    let share = node.log_dir.display().to_string();
    let o = node
        .l7ctl_command(&["run", "--run-dir", &run_dir, "--name", "job", "--share", &share, "--", "l7job"])
        .unwrap()
        .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
        .output()
        .unwrap();
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains(&format!("cannot run `l7job` ({}/l7job)", bin.display())), "{e}");
    assert!(e.contains(&format!("{} is not readable to nobody", private.display())), "{e}");
    assert!(!marker.exists());
    // Nothing was registered for any of them.
    assert!(!node.l7ctl_ok(&["get", "workloads"]).contains("job"), "no workload was registered");
    let history_versions = store_version(&node);
    // As root the private script runs (the hint's way out).
    let args = [
        "run",
        "--run-dir",
        &run_dir,
        "--name",
        "job",
        "--user",
        "root",
        "--share",
        &share,
        "--",
        hidden.to_str().unwrap(),
    ];
    let o = node.l7ctl(&args).unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(marker.exists(), "the script ran as root");
    assert!(store_version(&node) > history_versions, "that one was registered");
}

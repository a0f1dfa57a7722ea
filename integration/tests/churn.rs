//! Workload churn never cuts what the policy still allows. Every workload start and stop is a
//! new policy version (workloads are numbered afresh in each), so while other workloads come and
//! go in a loop, a steady Kafka client (Metadata every 5 ms on one connection, against a real
//! broker, Tansu) and steady HTTP/1.1 and HTTP/2 clients (a GET every 5 ms on one connection
//! each, to real nginx) must see every allowed request allowed, and no flow of theirs DENIED;
//! a client the policy denies is never let through.

use std::time::Duration;

use integration::*;

fn policy() -> String {
    let kafka = kafka_policy(
        "churn-kafka",
        "kafka",
        &[kafka_from("victim", 9092, &["role: produce, topic: steady"]), kafka_from("admin", 9092, &[])],
    );
    format!(
        "{kafka}---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: churn-web
spec:
  endpointSelector:
    matchLabels:
      app: web
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: webclient
    toPorts:
    - ports:
      - port: \"8080\"
        protocol: TCP
      - port: \"8081\"
        protocol: TCP
      rules:
        http:
        - method: GET
          path: \"/\"
"
    )
}

/// `requests=N denied=M other=K` as numbers.
fn counts(line: &str) -> (u64, u64, u64) {
    let field = |name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {line:?}"))
    };
    (field("requests="), field("denied="), field("other="))
}

#[test]
fn allowed_connections_stay_allowed_while_workloads_start_and_stop() {
    let mut node = kafka_node("churn", 66, &[], &policy(), Broker::Tansu).unwrap();
    node.tansu_topics(&["steady"]).unwrap();
    let script = node.copy_script("churn_clients.py").unwrap();
    // nginx as workload `web`: HTTP/1.1 on 8080, HTTP/2 (prior knowledge) on 8081.
    spawn_web(&mut node, "  server { listen 0.0.0.0:8081 http2; location / { return 200 \"ok\\n\"; } }\n");
    let secs = "25";
    node.spawn_l7ctl_run(
        "victim",
        "app=victim",
        &[PEERS_PY, &script, "kafka", "127.0.0.1:9092", "steady", secs],
        "kafka.log",
    )
    .unwrap();
    node.spawn_l7ctl_run(
        "webclient",
        "app=webclient",
        &[PEERS_PY, &script, "http", "127.0.0.1", "8080", secs],
        "web.log",
    )
    .unwrap();
    node.spawn_l7ctl_run(
        "webclient-h2",
        "app=webclient",
        &[PEERS_PY, &script, "h2", "127.0.0.1", "8081", secs],
        "h2.log",
    )
    .unwrap();
    // A client the policy denies, whose number a renumbering could hand to an allowed one.
    node.spawn_l7ctl_run("wy", "app=wy", &[PEERS_PY, &script, "http", "127.0.0.1", "8080", secs], "wy.log").unwrap();
    std::thread::sleep(Duration::from_secs(2));

    // Fresh workloads, named to sort between the broker and its client, and between the web
    // server and its clients: each start and stop renumbers the clients (and `wy` takes the
    // number `webclient` had).
    let started = std::time::Instant::now();
    let mut churned = 0;
    while started.elapsed() < Duration::from_secs(18) {
        let name = if churned % 2 == 0 { format!("spray{churned:03}") } else { format!("webb{churned:03}") };
        let o = node.l7ctl_run(&name, &format!("app={name}"), &["true"]).unwrap();
        assert!(o.status.success(), "{}{}", out(&o), String::from_utf8_lossy(&o.stderr));
        churned += 1;
    }

    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !["kafka.log", "web.log", "h2.log", "wy.log"].iter().all(|l| node.log(l).contains("requests="))
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    let kafka = node.log("kafka.log");
    let web = node.log("web.log");
    let flows = node.flows().unwrap();
    let denied: Vec<_> = flows
        .iter()
        .filter(|f| f["verdict"] == "DENIED")
        .filter(|f| {
            let source = f["source"].to_string();
            source.contains("\"victim\"") || source.contains("\"webclient")
        })
        .take(5)
        .collect();
    let (k_req, k_denied, k_other) = counts(kafka.lines().find(|l| l.starts_with("requests=")).unwrap_or(&kafka));
    let (w_req, w_denied, w_other) = counts(web.lines().find(|l| l.starts_with("requests=")).unwrap_or(&web));
    eprintln!("churned {churned} workloads; kafka: {kafka} web: {web}");
    assert!(churned >= 5, "only {churned} workloads started in 18 s");
    assert!(k_req >= 500 && w_req >= 500, "kafka: {kafka} web: {web}");
    assert_eq!((k_denied, k_other), (0, 0), "kafka: {kafka}; denied flows: {denied:#?}");
    assert!(kafka.contains(" empty=0"), "kafka: {kafka}");
    assert_eq!((w_denied, w_other), (0, 0), "web: {web}; denied flows: {denied:#?}");
    assert!(denied.is_empty(), "{denied:#?}");
    let h2 = node.log("h2.log");
    let h2 = h2.lines().find(|l| l.starts_with("requests=")).unwrap_or(&h2);
    let (h_req, h_denied, h_other) = counts(h2);
    assert!(h_req >= 500, "h2: {h2}");
    assert_eq!((h_denied, h_other), (0, 0), "h2: {h2}");
    // The denied client never got an answer the policy allows (a 403, or no connection at all).
    let wy = node.log("wy.log");
    let wy = wy.lines().find(|l| l.starts_with("requests=")).unwrap_or(&wy);
    assert!(wy.contains(" ok=0 "), "a denied client was let through: {wy}");
}

/// Workloads started together each have their policy in force (kernel and l7proxy) before
/// their command runs: the first request of every one is answered. (Registrations that
/// overlapped once blocked policy-api's async threads on the controller while another
/// registration waited for l7proxy's ack, so that ack could not be read for 2 s; the apply went
/// ahead without the proxy, and the workload's first connections were refused as unknown.)
#[test]
fn workloads_started_together_are_each_in_force_before_they_run() {
    let node = web_node("regrace", false);
    for round in 0..3 {
        let answers: Vec<String> = std::thread::scope(|s| {
            let node = &node;
            let clients: Vec<_> = (0..8)
                .map(|i| {
                    s.spawn(move || {
                        let o = node
                            .l7ctl_run(&format!("burst{round}-{i}"), "app=webclient", &["sh", "-c", REQUESTS])
                            .unwrap();
                        format!("{}{}", stdout(&o), String::from_utf8_lossy(&o.stderr))
                    })
                })
                .collect();
            clients.into_iter().map(|c| c.join().unwrap()).collect()
        });
        // The allowed GET answered, the POST only the server's ingress rules deny refused.
        let refused: Vec<&String> = answers.iter().filter(|a| a.as_str() != "ok\n 200 403").collect();
        assert!(refused.is_empty(), "round {round}: {refused:?}\n{}", node.node_log());
    }
    let log = node.node_log();
    assert!(!log.contains("did not load policy version"), "an apply went ahead without l7proxy: {log}");
    assert!(!log.contains("before l7proxy has its policy version"), "a workload started too early: {log}");
    // The promise itself: each burst workload is reported registered (and its command starts)
    // only after l7proxy said it loaded that version or a later one.
    let mut loaded = 0u64;
    let mut checked = 0;
    for line in log.lines().map(without_colours) {
        let version = || -> Option<u64> {
            let at = line.find(" version=")? + " version=".len();
            line[at..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
        };
        if line.contains("policy tables loaded") {
            loaded = loaded.max(version().expect("a loaded version"));
        } else if line.contains("workload registered workload=burst") {
            let v = version().expect("a registered version");
            assert!(loaded >= v, "registered at version {v} while l7proxy had {loaded}: {line}");
            checked += 1;
        }
    }
    assert_eq!(checked, 24, "{log}");
}

/// nginx as workload `web`, HTTP/1.1 on 8080 (plus `more` servers), and waits until it serves.
fn spawn_web(node: &mut TestNode, more: &str) {
    let d = node.shared_dir("nginx").unwrap();
    let servers = format!("  server {{ listen 0.0.0.0:8080; location / {{ return 200 \"ok\\n\"; }} }}\n{more}");
    std::fs::write(d.join("nginx.conf"), nginx_config(&d, &servers)).unwrap();
    let conf = d.join("nginx.conf").display().to_string();
    let err = d.join("nginx-start.log").display().to_string();
    node.spawn_l7ctl_run("web", "app=web", &["/usr/sbin/nginx", "-e", &err, "-c", &conf], "server.log").unwrap();
    let probe = node.probe_path();
    let o = node
        .l7ctl_run(
            "webwait",
            "app=webclient",
            &[PEERS_PY, probe.to_str().unwrap(), "wait-tcp", "127.0.0.1", "8080", "20"],
        )
        .unwrap();
    assert!(o.status.success(), "web server: {}", node.log("server.log"));
}

/// A node with the web policy alone and nginx as workload `web` on 8080, serving.
fn web_node(name: &str, log_through_reader: bool) -> TestNode {
    let mut node = TestNode::new(name).unwrap();
    node.log_through_reader = log_through_reader;
    let file = node.log_dir.join("web.yaml");
    let web = policy().split("---\n").nth(1).expect("the web policy").to_string();
    std::fs::write(&file, web).unwrap();
    node.start_node(&file, &[]).unwrap();
    spawn_web(&mut node, "");
    node
}

/// Nobody reads the node's logs (a terminal paused with Ctrl-S, a pager left open): its
/// processes must go on enforcing, registering workloads and applying policy; log lines are
/// dropped rather than written in the threads that serve connections and acknowledgements.
#[test]
fn a_node_whose_logs_nobody_reads_goes_on_serving() {
    let node = web_node("logstall", true);
    let reader = node.log_reader.as_ref().expect("a log reader").id() as i32;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(reader), nix::sys::signal::Signal::SIGSTOP).unwrap();
    // Each workload's start and stop logs about 1 KiB: 120 of them fill the 64 KiB pipe
    // twice over.
    for i in 0..120 {
        let mut child = node
            .l7ctl_run_command(&format!("quiet{i}"), "app=webclient", &["sh", "-c", REQUESTS])
            .unwrap()
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("workload {i} did not finish in 30 s with the node's logs unread");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let o = child.wait_with_output().unwrap();
        assert_eq!(stdout(&o), "ok\n 200 403", "workload {i}: {}", String::from_utf8_lossy(&o.stderr));
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(reader), nix::sys::signal::Signal::SIGCONT).unwrap();
}

/// `line` without its terminal colour codes (ESC [ ... m).
fn without_colours(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|&c| c == 'm');
        } else {
            out.push(c);
        }
    }
    out
}

/// Each burst client: a GET the policy allows, then a POST it does not.
const REQUESTS: &str = "curl -sS --max-time 10 -w ' %{http_code}' http://127.0.0.1:8080/; \
    curl -sS --max-time 10 -o /dev/null -w ' %{http_code}' -X POST http://127.0.0.1:8080/";

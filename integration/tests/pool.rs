//! The proxy's upstream HTTP pool under hostile upstreams (README, "Bounds"): a black-holed
//! destination stalls only its own requests, idle connections are closed after the idle
//! timeout, the number of destinations stays at its bound, and a dropped keep-alive connection
//! is retried once only when that is safe; and the bound on each workload's (and outside
//! host's) connections through the proxy. Real clients (curl, grpcio) and servers (nginx,
//! grpcio, Python sockets).

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use integration::*;

/// Waits up to 30 s (grpcio takes seconds to import on a loaded machine).
fn wait_log(node: &TestNode, log: &str, text: &str) {
    for _ in 0..600 {
        if node.log(log).contains(text) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{log} never said `{text}`: {}", node.log(log));
}

/// Every listed port is marked for L7 (HTTP rules allowing GET, POST and HEAD) for app=client.
fn policy(ports: &[u16]) -> String {
    let ports: String =
        ports.iter().map(|p| format!("      - port: \"{p}\"\n        protocol: TCP\n")).collect::<Vec<_>>().concat();
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: pool\nspec:\n  endpointSelector:\n    matchLabels:\n      app: client\n  egress:\n  - toPorts:\n    - ports:\n{ports}      rules:\n        http:\n        - method: GET\n        - method: POST\n        - method: HEAD\n"
    )
}

fn spawn_client(node: &TestNode, name: &str, cmd: &[&str]) -> Child {
    node.l7ctl_run_command(name, "app=client", cmd)
        .unwrap()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn a_black_holed_upstream_delays_only_its_own_requests() {
    let mut node = TestNode::new("blackhole").unwrap();
    // One event loop, as in the benchmarks: a lock held across a connect would stall it all.
    node.node_env.push(("L7PROXY_WORKER_THREADS".into(), "1".into()));
    node.node_env.push(("L7PROXY_UPSTREAM_CONNECT_TIMEOUT".into(), "15".into()));
    let policy = node.policy_file("pool.yaml", &policy(&[8090, 8443, 8444, 50051])).unwrap();
    node.start_node(&policy, &[]).unwrap();
    node.start_nginx_h1_h2().unwrap();
    let greeter = node.copy_script("greeter.py").unwrap();
    let grpc_timed = node.copy_script("grpc_timed.py").unwrap();
    node.spawn(None, &[PEERS_PY, "-u", &greeter, "serve", "50051"], "greeter.log").unwrap();
    wait_log(&node, "greeter.log", "serving");
    let blackhole = node.copy_script("blackhole.py").unwrap();
    node.spawn(None, &["python3", "-u", &blackhole, "127.0.0.1", "8090"], "blackhole.log").unwrap();
    wait_log(&node, "blackhole.log", "black-holed");

    // HTTP/2, HTTP/1.1 and gRPC requests to the black-holed destination, in flight at once.
    // (Each client says how long its own request took: `l7ctl run` itself waits while the
    // node registers a new workload, and grpcio's import takes seconds on a loaded machine.)
    let curl = ["curl", "-sS", "--max-time", "30", "-w", " %{http_code} %{time_total}"];
    let h2_hole = [&curl[..], &["--http2-prior-knowledge", "http://127.0.0.1:8090/h2"]].concat();
    let h1_hole = [&curl[..], &["http://127.0.0.1:8090/h1"]].concat();
    let holes = vec![
        ("h2 #1", spawn_client(&node, "hole1", &h2_hole)),
        ("h2 #2", spawn_client(&node, "hole2", &h2_hole)),
        ("h1", spawn_client(&node, "hole3", &h1_hole)),
        ("grpc", spawn_client(&node, "hole4", &[PEERS_PY, &grpc_timed, "127.0.0.1:8090"])),
    ];
    // The proxy's connects to it (its own sockets, by cgroup: the black hole's own fillers
    // come from 127.0.0.1 too) are in flight before the healthy requests start.
    let connecting = || node.proxy_sockets_to("syn-sent", 8090).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while connecting() < 2 {
        assert!(Instant::now() < deadline, "the proxy never connected to the black hole: {}", node.node_log());
        std::thread::sleep(Duration::from_millis(100));
    }

    // Meanwhile the healthy destinations answer at once, over the same proxy.
    let timed = |cmd: &[&str]| stdout(&node.l7ctl_run("client", "app=client", cmd).unwrap()).trim().to_string();
    let mut healthy = Vec::new();
    let mut in_flight = Vec::new();
    for i in 0..3 {
        let url = format!("http://127.0.0.1:8443/ok{i}");
        healthy.push(("h2", timed(&[&curl[..], &["--http2-prior-knowledge", &url]].concat())));
        healthy.push(("grpc", timed(&[PEERS_PY, &grpc_timed, "127.0.0.1:50051"])));
        in_flight.push(connecting());
    }
    healthy.push(("h1", timed(&[&curl[..], &["http://127.0.0.1:8444/"]].concat())));
    eprintln!("healthy requests: {healthy:?}; black-holed connects in flight after each round: {in_flight:?}");
    for (what, seen) in &healthy {
        let (body, secs) = seen.rsplit_once(' ').unwrap();
        let want = if *what == "grpc" { "OK hello tiefighter" } else { "ok\n 200" };
        assert_eq!(body, want, "{what}");
        let took: f64 = secs.parse().unwrap();
        assert!(took < 3.0, "{what} to a healthy upstream took {took} s: {healthy:?}");
    }
    assert!(in_flight[0] >= 1, "the black-holed connects were still in flight meanwhile: {in_flight:?}");
    // One connect per destination and workload (four workloads here; upstream connections are
    // never shared across workloads), none for the healthy requests' sake.
    assert!(in_flight.iter().all(|n| *n <= 4), "one connect per destination and workload: {in_flight:?}");

    // The black-holed ones get the documented answer after the connect timeout (15 s).
    let mut waited = Vec::new();
    for (what, child) in holes {
        let o = child.wait_with_output().unwrap();
        let seen = stdout(&o);
        let (body, secs) = seen.trim().rsplit_once(' ').unwrap();
        let want = if what == "grpc" { "ERROR UNAVAILABLE" } else { "upstream connect timeout\r\n 504" };
        assert_eq!(body, want, "{what}: {}", String::from_utf8_lossy(&o.stderr));
        let took: f64 = secs.parse().unwrap();
        assert!(took < 25.0, "{what} answered after {took} s");
        waited.push((what, took));
    }
    let first = waited.iter().filter(|(w, _)| *w != "h1").map(|(_, t)| *t).fold(0.0, f64::max);
    assert!(first >= 14.0 && waited[2].1 >= 14.0, "the connect timeout (15 s) elapsed: {waited:?}");
    let trips = node.metric(r#"l7mesh_limits_tripped_total{limit="upstream_connect_timeout"}"#);
    // One connect per workload (the four clients are four workloads).
    assert_eq!(trips, 4.0);
    assert!(node.node_log().contains("upstream connect timed out"), "logged");
}

/// Established connections from the proxy to 127.0.0.1 ports `lo..=hi` (as ss sees them).
fn upstream_connections(node: &TestNode, lo: u16, hi: u16) -> usize {
    let filter = format!("( dport >= :{lo} and dport <= :{hi} )");
    let o = node.run(None, &["ss", "-Htn", "state", "established", &filter]).unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    stdout(&o).lines().filter(|l| !l.trim().is_empty()).count()
}

#[test]
fn idle_upstream_connections_are_closed_and_destinations_stay_at_their_bound() {
    let mut node = TestNode::new("poolbound").unwrap();
    node.node_env.push(("L7PROXY_UPSTREAM_IDLE_TIMEOUT".into(), "3".into()));
    node.node_env.push(("L7PROXY_UPSTREAM_MAX_DESTINATIONS".into(), "4".into()));
    let ports: Vec<u16> = (8501..=8506).collect();
    let policy = node.policy_file("pool.yaml", &policy(&ports)).unwrap();
    node.start_node(&policy, &[]).unwrap();
    let d = node.log_dir.clone();
    let servers: String = ports
        .iter()
        .map(|p| format!("  server {{ listen 127.0.0.1:{p}; location / {{ return 200 \"{p}\\n\"; }} }}\n"))
        .collect();
    std::fs::write(d.join("nginx.conf"), nginx_config(&d, &servers)).unwrap();
    node.spawn(None, &["nginx", "-c", d.join("nginx.conf").to_str().unwrap()], "nginx.log").unwrap();
    node.probe(None, &["wait-tcp", "127.0.0.1", "8506", "10"]).unwrap();

    // Six destinations in one quick run (well inside the idle timeout).
    let urls: Vec<String> = ports.iter().map(|p| format!("http://127.0.0.1:{p}/")).collect();
    let mut cmd = vec!["curl", "-sS", "--max-time", "10"];
    cmd.extend(urls.iter().map(String::as_str));
    let o = node.l7ctl_run("client", "app=client", &cmd).unwrap();
    assert_eq!(stdout(&o), "8501\n8502\n8503\n8504\n8505\n8506\n", "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(node.metric("l7mesh_upstream_pool_destinations "), 4.0, "the pool stays at its bound");
    assert_eq!(node.metric(r#"l7mesh_limits_tripped_total{limit="upstream_pool_destinations"}"#), 2.0);
    assert_eq!(node.metric(r#"l7mesh_upstream_pool_connections{protocol="http1"}"#), 4.0);
    // The evicted destinations' connections are closed, not merely forgotten: 4 proxy-side
    // sockets (and 4 nginx-side ones).
    let mut open = upstream_connections(&node, 8501, 8506);
    for _ in 0..20 {
        if open == 4 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        open = upstream_connections(&node, 8501, 8506);
    }
    assert_eq!(open, 4, "proxy-side upstream sockets");
    assert!(node.node_log().contains("upstream pool full"), "the trip is logged");

    // After the idle timeout (3 s, swept every 0.75 s) nothing is left open.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(upstream_connections(&node, 8501, 8506), 0, "idle connections closed");
    assert_eq!(node.metric(r#"l7mesh_upstream_pool_connections{protocol="http1"}"#), 0.0);
    assert_eq!(node.metric("l7mesh_upstream_pool_destinations "), 0.0);
    // And the pool still serves (anew).
    let o = node.l7ctl_run("client", "app=client", &["curl", "-sS", "--max-time", "10", &urls[0]]).unwrap();
    assert_eq!(stdout(&o), "8501\n");
}

#[test]
fn a_dropped_keep_alive_connection_is_retried_only_for_bodiless_idempotent_requests() {
    let mut node = TestNode::new("staleretry").unwrap();
    let policy = node.policy_file("pool.yaml", &policy(&[8600])).unwrap();
    node.start_node(&policy, &[]).unwrap();
    let server = node.copy_script("stale_server.py").unwrap();
    node.spawn(None, &["python3", "-u", &server, "8600"], "stale.log").unwrap();
    wait_log(&node, "stale.log", "serving");
    let curl = |extra: &[&str], path: &str| {
        let url = format!("http://127.0.0.1:8600{path}");
        let cmd = [&["curl", "-sS", "--max-time", "10", "-w", " %{http_code}"][..], extra, &[url.as_str()]].concat();
        let o = node.l7ctl_run("client", "app=client", &cmd).unwrap();
        stdout(&o)
    };
    // A new upstream connection; it stays pooled (the server did not say close).
    assert_eq!(curl(&[], "/a"), "served GET /a\n 200");
    // Its reuse meets a server that drops it: the GET goes again on a new connection.
    assert_eq!(curl(&[], "/b"), "served GET /b\n 200");
    assert_eq!(node.metric("l7mesh_upstream_retries_total"), 1.0);
    // A POST on the (again) reused connection is not sent twice: the client gets the error.
    assert_eq!(curl(&["-d", "once"], "/c"), "upstream connect error\r\n 502");
    // A GET with a body is not sent twice either.
    assert_eq!(curl(&[], "/d"), "served GET /d\n 200");
    assert_eq!(curl(&["-X", "GET", "-d", "body"], "/e"), "upstream connect error\r\n 502");
    // HEAD without a body is replayed like GET (a new connection first, then a reuse).
    assert_eq!(curl(&["-I", "-o", "/dev/null"], "/f"), " 200");
    assert_eq!(curl(&["-I", "-o", "/dev/null"], "/g"), " 200");
    assert_eq!(node.metric("l7mesh_upstream_retries_total"), 2.0);
    let log = node.log("stale.log");
    let lines: Vec<&str> = log.lines().skip(1).collect();
    assert_eq!(
        lines,
        [
            "served GET /a",
            "dropped GET /b",
            "served GET /b",
            "dropped POST /c",
            "served GET /d",
            "dropped GET /e",
            "served HEAD /f",
            "dropped HEAD /g",
            "served HEAD /g"
        ],
        "what reached the server"
    );
}

#[test]
fn a_workload_flooding_the_pool_hits_its_own_cap_and_never_takes_another_workloads_connection() {
    let mut node = TestNode::new("poolfair").unwrap();
    node.node_env.push(("L7PROXY_UPSTREAM_MAX_CONNECTIONS_PER_WORKLOAD".into(), "8".into()));
    node.node_env.push(("L7PROXY_UPSTREAM_MAX_DESTINATIONS".into(), "16".into()));
    let flood_ports: Vec<u16> = (8701..=8724).collect();
    let ports = [&[8700, 8740][..], &flood_ports].concat();
    // Plain HTTP ports, and 8760, where the proxy originates TLS verified as the request's Host
    // (a name the client chooses).
    let yaml = format!(
        "{}  - toPorts:\n    - ports:\n      - port: \"8760\"\n        protocol: TCP\n      originatingTLS:\n        secret:\n          name: test-ca\n      rules:\n        http:\n        - method: GET\n",
        policy(&ports)
    );
    let policy = node.policy_file("pool.yaml", &yaml).unwrap();
    node.start_node(&policy, &[]).unwrap();
    let d = node.log_dir.clone();
    integration::test_ca(&d, "test-ca").unwrap();
    integration::test_leaf(
        &d,
        "pool",
        "*.pool.test",
        "subjectAltName=DNS:*.pool.test\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    let run_dir = node.run_dir().display().to_string();
    let ca = d.join("ca.pem").display().to_string();
    let import = node.l7ctl(&["secret", "import", "test-ca", "--ca", &ca, "--run-dir", &run_dir]).unwrap();
    assert!(import.status.success(), "{}", String::from_utf8_lossy(&import.stderr));
    // nginx: the victim's destination logs nginx's connection number per request; a slow one
    // (1 KiB/s, 3 KiB: each response takes about 2 s); 24 quick ones; one over TLS for *.pool.test.
    std::fs::create_dir_all(d.join("slow")).unwrap();
    std::fs::write(d.join("slow/index.html"), "x".repeat(3000)).unwrap();
    let listens: String = flood_ports.iter().map(|p| format!("listen 127.0.0.1:{p}; ")).collect();
    let servers = format!(
        "  log_format pool '$server_port $connection $status $host';\n\
         \x20 server {{ listen 127.0.0.1:8700; access_log {d}/victim-access.log pool; location / {{ return 200 \"victim\\n\"; }} }}\n\
         \x20 server {{ {listens}location / {{ return 200 \"flood\\n\"; }} }}\n\
         \x20 server {{ listen 127.0.0.1:8740; location / {{ root {d}/slow; limit_rate 1k; }} }}\n\
         \x20 server {{ listen 127.0.0.1:8760 ssl; ssl_certificate {d}/pool.pem; ssl_certificate_key {d}/pool.key; ssl_protocols TLSv1.2 TLSv1.3; access_log {d}/tls-access.log pool; location / {{ return 200 \"tls $host\\n\"; }} }}\n",
        d = d.display()
    );
    std::fs::write(d.join("nginx.conf"), nginx_config(&d, &servers)).unwrap();
    node.spawn(None, &["nginx", "-c", d.join("nginx.conf").to_str().unwrap()], "nginx.log").unwrap();
    for port in ["8700", "8724", "8740", "8760"] {
        node.probe(None, &["wait-tcp", "127.0.0.1", port, "10"]).unwrap();
    }

    // The victim: a request every 0.2 s (a new downstream connection each, one workload) until
    // told to stop.
    let stop = d.join("stop-victim");
    let victim = format!(
        "while [ ! -e {} ]; do curl -s -o /dev/null --max-time 10 -w '%{{http_code}}\\n' http://127.0.0.1:8700/; sleep 0.2; done; echo done",
        stop.display()
    );
    node.spawn_l7ctl_run("victim", "app=client", &["sh", "-c", &victim], "victim.log").unwrap();
    let victim_codes = |node: &TestNode| node.log("victim.log").lines().filter(|l| *l == "200").count();
    let deadline = Instant::now() + Duration::from_secs(30);
    while victim_codes(&node) < 5 {
        assert!(Instant::now() < deadline, "the victim never got going: {}", node.log("victim.log"));
        std::thread::sleep(Duration::from_millis(100));
    }

    // The hostile workload, one process after another in one workload: 30 concurrent slow
    // requests (more than its 8 connections), 24 destinations at once, then 40 Host values
    // (each a TLS server name, so a pool key of its own) at once.
    let flood = node.copy_script("pool_flood.py").unwrap();
    let slow: Vec<String> = (0..30).map(|_| "http://127.0.0.1:8740/".to_string()).collect();
    let quick: Vec<String> = flood_ports.iter().map(|p| format!("http://127.0.0.1:{p}/")).collect();
    let hosts: Vec<String> = (0..40).map(|i| format!("http://127.0.0.1:8760/@h{i}.pool.test")).collect();
    let script = [&slow, &quick, &hosts]
        .iter()
        .map(|targets| format!("python3 {flood} {}", targets.join(" ")))
        .collect::<Vec<_>>()
        .join("; ");
    let o = node.l7ctl_run("hostile", "app=client", &["sh", "-c", &script]).unwrap();
    let waves: Vec<serde_json::Value> = out(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}: {}", String::from_utf8_lossy(&o.stderr))))
        .collect();
    eprintln!("hostile waves: {waves:?}");
    assert_eq!(waves.len(), 3, "{}", String::from_utf8_lossy(&o.stderr));
    let status = |w: &serde_json::Value, code: &str| w["status"][code].as_u64().unwrap_or(0);
    // Slow: its 8 connections served 8; the others got 503 after waiting 1 s for one of its own.
    assert!((8..=12).contains(&status(&waves[0], "200")), "{}", waves[0]);
    assert_eq!(status(&waves[0], "200") + status(&waves[0], "503"), 30, "{}", waves[0]);
    assert!(waves[0]["bodies"].to_string().contains("upstream connection limit"), "{}", waves[0]);
    // Quick ones: served, within its 8 connections (it closes its own idle ones to go on).
    assert!(status(&waves[1], "200") >= 8, "{}", waves[1]);
    assert!(status(&waves[2], "200") >= 8, "{}", waves[2]);
    let trips = node.metric(r#"l7mesh_limits_tripped_total{limit="upstream_connections_per_workload"}"#);
    assert!(trips >= 18.0, "{trips}");
    assert!(node.node_log().contains("workload at its upstream connection cap"), "logged");
    // Its 65 destinations pushed the pool past its bound of 16: the evictions fell on itself.
    assert!(node.metric(r#"l7mesh_limits_tripped_total{limit="upstream_pool_destinations"}"#) > 0.0);
    assert!(node.metric("l7mesh_upstream_pool_destinations ") <= 16.0);

    // Meanwhile and after, the victim was served on its one pooled connection throughout.
    let before = victim_codes(&node);
    let deadline = Instant::now() + Duration::from_secs(20);
    while victim_codes(&node) < before + 5 {
        assert!(Instant::now() < deadline, "{}", node.log("victim.log"));
        std::thread::sleep(Duration::from_millis(100));
    }
    std::fs::write(&stop, "").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !node.log("victim.log").contains("done") {
        assert!(Instant::now() < deadline, "{}", node.log("victim.log"));
        std::thread::sleep(Duration::from_millis(100));
    }
    let codes = node.log("victim.log");
    assert!(codes.lines().all(|l| l == "200" || l == "done"), "every victim request succeeded: {codes}");
    let access = node.log("victim-access.log");
    let connections: std::collections::BTreeSet<&str> =
        access.lines().filter_map(|l| l.split_whitespace().nth(1)).collect();
    eprintln!("victim: {} requests on nginx connections {connections:?}", access.lines().count());
    assert!(access.lines().count() >= before + 5, "{access}");
    assert_eq!(connections.len(), 1, "one upstream connection, reused throughout: {access}");

    // Host values that differ only in case or a trailing dot are one name: one pool key, one
    // upstream connection.
    let url = "http://127.0.0.1:8760/";
    let headers: Vec<String> =
        ["Same.Pool.TEST", "same.pool.test.", "SAME.pool.test"].iter().map(|h| format!("Host: {h}")).collect();
    let mut cmd = vec!["curl"];
    for (i, header) in headers.iter().enumerate() {
        if i > 0 {
            cmd.push("--next");
        }
        cmd.extend(["-sS", "--max-time", "10", "-H", header.as_str(), url]);
    }
    let o = node.l7ctl_run("variants", "app=client", &cmd).unwrap();
    assert_eq!(out(&o).lines().count(), 3, "{}{}", out(&o), String::from_utf8_lossy(&o.stderr));
    let tls_log = node.log("tls-access.log");
    let same: Vec<&str> = tls_log.lines().filter(|l| l.to_ascii_lowercase().contains(" same.pool.test")).collect();
    let conns: std::collections::BTreeSet<&str> = same.iter().filter_map(|l| l.split_whitespace().nth(1)).collect();
    assert_eq!((same.len(), conns.len()), (3, 1), "{tls_log}");
}

/// The server's ingress on 8800: the client workloads and the peer host's subnet, GET only
/// (so both go through the proxy: the workloads' egress, the peer's ingress).
const SERVER_INGRESS: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: server\nspec:\n  endpointSelector:\n    matchLabels:\n      app: server\n  ingress:\n  - fromEndpoints:\n    - matchLabels:\n        app: client\n    toPorts:\n    - ports:\n      - port: \"8800\"\n        protocol: TCP\n      rules:\n        http:\n        - method: GET\n  - fromCIDR:\n    - 10.231.70.0/24\n    toPorts:\n    - ports:\n      - port: \"8800\"\n        protocol: TCP\n      rules:\n        http:\n        - method: GET\n";

/// `--max-connections-per-workload`: a workload holding its bound of keep-alive connections
/// has its next one closed as accepted (counted, logged, a DENIED flow naming it), while
/// another workload is served; a host outside the node is bounded per address, apart from the
/// workloads. Real clients: hand-written HTTP/1.1 keep-alive sockets, curl; real nginx.
#[test]
fn a_workload_over_its_connection_bound_is_refused_at_accept_and_no_other_is() {
    let mut node = TestNode::new("connbound").unwrap();
    node.node_env.push(("L7PROXY_MAX_CONNECTIONS_PER_WORKLOAD".into(), "4".into()));
    let peer = node.add_peer_host(70).unwrap();
    let policies = node.log_dir.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("client.yaml"), policy(&[8800])).unwrap();
    std::fs::write(policies.join("server.yaml"), SERVER_INGRESS).unwrap();
    node.start_node(&policies, &[]).unwrap();
    let d = node.shared_dir("nginx").unwrap();
    let servers = "  server { listen 0.0.0.0:8800; location / { return 200 \"$remote_addr $connection\\n\"; } }\n";
    std::fs::write(d.join("nginx.conf"), nginx_config(&d, servers)).unwrap();
    let conf = d.join("nginx.conf").display().to_string();
    node.spawn_l7ctl_run("server", "app=server", &["/usr/sbin/nginx", "-c", &conf], "nginx.log").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !d.join("nginx.pid").exists() {
        assert!(Instant::now() < deadline, "nginx did not start: {}", node.log("nginx.log"));
        std::thread::sleep(Duration::from_millis(20));
    }
    let trips = |node: &TestNode| node.metric(r#"l7mesh_limits_tripped_total{limit="connections_per_workload"}"#);
    let count = |r: &serde_json::Value, status: &str| {
        r.as_object().unwrap().values().filter(|c| c["status"].as_str() == Some(status)).count()
    };
    let specs = |host: &str| -> Vec<String> { (0..5).map(|i| format!("c{i}=h1:{host}:8800")).collect() };

    // The hostile workload opens 5 keep-alive connections: 4 are served, 1 is closed unanswered.
    let hostile_specs = specs("127.0.0.1");
    let hostile_specs: Vec<&str> = hostile_specs.iter().map(String::as_str).collect();
    let mut hostile = HeldClient::start(
        &mut node,
        HeldAt::Workload { name: "hostile", labels: "app=client" },
        "hostile",
        &hostile_specs,
    )
    .unwrap();
    let r = hostile.get("/").unwrap();
    assert_eq!((count(&r, "200"), count(&r, "closed")), (4, 1), "{r}");
    assert_eq!(trips(&node), 1.0);
    let flows = node.flows().unwrap();
    let refused: Vec<&str> = flows
        .iter()
        .filter(|f| f["verdict"] == "DENIED")
        .filter_map(|f| f["reason"].as_str())
        .filter(|r| r.contains("--max-connections-per-workload"))
        .collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(refused[0].contains("default/hostile holds 4 connections"), "{refused:?}");
    assert!(node.node_log().contains("--max-connections-per-workload"), "logged");

    // Another workload is served while the hostile one holds its 4.
    let victim = ["curl", "-sS", "--max-time", "10", "-w", " %{http_code}", "http://127.0.0.1:8800/"];
    let o = node.l7ctl_run("victim", "app=client", &victim).unwrap();
    assert!(out(&o).ends_with(" 200"), "{}{}", out(&o), String::from_utf8_lossy(&o.stderr));
    // The refused connection reconnects: still over the bound, refused again; the 4 still served.
    let r = hostile.get("/").unwrap();
    assert_eq!((count(&r, "200"), count(&r, "closed")), (4, 1), "{r}");
    assert_eq!(trips(&node), 2.0);

    // A host outside the node is bounded per address, not with the workloads (which hold 4).
    let peer_specs = specs("10.231.70.1");
    let peer_specs: Vec<&str> = peer_specs.iter().map(String::as_str).collect();
    let mut outside = HeldClient::start(&mut node, HeldAt::Peer(&peer), "outside", &peer_specs).unwrap();
    let r = outside.get("/").unwrap();
    assert_eq!((count(&r, "200"), count(&r, "closed")), (4, 1), "{r}");
    assert_eq!(trips(&node), 3.0);
    let flows = node.flows().unwrap();
    assert!(
        flows.iter().filter_map(|f| f["reason"].as_str()).any(|r| r.contains("remote 10.231.70.2 holds 4 connections")),
        "the peer's refusal names its address"
    );
    hostile.quit();
    outside.quit();
    let o = node.l7ctl_run("victim2", "app=client", &victim).unwrap();
    assert!(out(&o).ends_with(" 200"), "{}{}", out(&o), String::from_utf8_lossy(&o.stderr));
}

//! The proxy's upstream HTTP pool under hostile upstreams (README, "Bounds"): a black-holed
//! destination stalls only its own requests, idle connections are closed after the idle
//! timeout, the number of destinations stays at its bound, and a dropped keep-alive connection
//! is retried once only when that is safe. Real clients (curl, grpcio) and servers (nginx,
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
    // The proxy's connects to it (from its upstream source address, 127.0.0.6; the black hole's
    // own fillers come from 127.0.0.1) are in flight before the healthy requests start.
    let connecting = || {
        let filter = "( dport = :8090 and src 127.0.0.6 )";
        let o = node.run(None, &["ss", "-Htn", "state", "syn-sent", filter]).unwrap();
        stdout(&o).lines().filter(|l| !l.trim().is_empty()).count()
    };
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
    // One HTTP/2 connect for the two HTTP/2 and the gRPC requests, one for the HTTP/1.1 one.
    assert!(in_flight.iter().all(|n| *n <= 2), "one HTTP/2 connect per destination: {in_flight:?}");

    // The black-holed ones get the documented answer after the connect timeout (15 s).
    // (The HTTP/2 and gRPC ones share one connect, which the first of them started.)
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
    // The HTTP/2 and gRPC requests share one connect (often one; the HTTP/1.1 one has its own).
    assert!((2.0..=4.0).contains(&trips), "{trips}");
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

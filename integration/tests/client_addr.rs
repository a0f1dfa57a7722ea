//! The client's address reaching the backend behind an L7 port (README, "The client's address
//! upstream"): real nginx logs `$remote_addr` and `$http_x_forwarded_for` for HTTP/1.1 and
//! HTTP/2 clients on the node and on another host, a client's own X-Forwarded-For and
//! Forwarded never pass as its address, the proxy's upstream legs (now from the client's own
//! address) are neither steered back into the proxy nor judged by their own address, PROXY v2
//! reaches an opted-in opaque port; and the admin API's `/v1/*` is the token holder's.

use std::time::{Duration, Instant};

use integration::*;

const PY: &str = "/usr/bin/python3";

/// Every connection flow of the proxy (requests add L7 flows of their own).
fn proxy_connections(node: &TestNode) -> Vec<serde_json::Value> {
    node.flows().unwrap().into_iter().filter(|f| f["observer"] == "proxy" && f["l7"].is_null()).collect()
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool, log: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: {}", log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

const SERVER_POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: server
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
      - port: "8443"
        protocol: TCP
      - port: "8444"
        protocol: TCP
      rules:
        http:
        - method: GET
  - fromCIDR:
    - 10.231.71.0/24
    - fd00:231:71::/64
    toPorts:
    - ports:
      - port: "8443"
        protocol: TCP
      - port: "8444"
        protocol: TCP
      rules:
        http:
        - method: GET
"#;

/// nginx as workload `server` (as `nobody`): HTTP/2 prior knowledge on 8443, HTTP/1.1 on 8444
/// (IPv4 and IPv6), logging each request as `$remote_addr xff="..." fwd="..." PROTOCOL URI`.
fn start_nginx(node: &mut TestNode) -> std::path::PathBuf {
    let d = node.shared_dir("nginx").unwrap();
    let conf = format!(
        "daemon off; pid {d}/nginx.pid; error_log {d}/nginx-error.log; worker_processes 1;\nevents {{}}\n\
         http {{ log_format addr '$remote_addr xff=\"$http_x_forwarded_for\" fwd=\"$http_forwarded\" $server_protocol $request_uri';\n\
         access_log {d}/access.log addr; client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n\
         server {{ listen 0.0.0.0:8443 http2; location / {{ return 200 \"ok\\n\"; }} }}\n\
         server {{ listen 0.0.0.0:8444; listen [::]:8444; location / {{ return 200 \"ok\\n\"; }} }}\n}}\n",
        d = d.display()
    );
    std::fs::write(d.join("nginx.conf"), conf).unwrap();
    let conf = d.join("nginx.conf").display().to_string();
    let err = d.join("nginx-start.log").display().to_string();
    node.spawn_l7ctl_run("server", "app=server", &["/usr/sbin/nginx", "-e", &err, "-c", &conf], "nginx.log").unwrap();
    wait_for("nginx did not start", || d.join("nginx.pid").exists(), || node.log("nginx.log"));
    d
}

/// curl's `-H` arguments of a client claiming to be 1.2.3.4 every way it can.
const SPOOF: [&str; 8] = [
    "-H",
    "X-Forwarded-For: 1.2.3.4",
    "-H",
    "x-forwarded-for: 5.6.7.8, 9.9.9.9",
    "-H",
    "Forwarded: for=1.2.3.4;proto=https",
    "-H",
    "FORWARDED: for=\"[2001:db8::1]\"",
];

#[test]
fn nginx_logs_the_real_client_for_http1_and_http2_from_the_node_and_another_host() {
    let mut node = TestNode::new("clientaddr").unwrap();
    let peer = node.add_peer_host(71).unwrap();
    let policy = node.policy_file("server.yaml", SERVER_POLICY).unwrap();
    node.start_node(&policy, &[]).unwrap();
    let d = start_nginx(&mut node);
    let curl = |extra: &[&str], url: &str| {
        let mut args = vec!["curl", "-sS", "--max-time", "10", "-w", " %{http_code}"];
        args.extend(SPOOF);
        args.extend(extra);
        args.push(url);
        args.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let on_node = |extra: &[&str], url: &str| {
        let args = curl(extra, url);
        stdout(&node.l7ctl_run("client", "app=client", &args.iter().map(String::as_str).collect::<Vec<_>>()).unwrap())
    };
    let on_peer = |extra: &[&str], url: &str| {
        let args = curl(extra, url);
        stdout(&node.run_on_peer(&peer, &args.iter().map(String::as_str).collect::<Vec<_>>()).unwrap())
    };
    assert_eq!(on_node(&[], "http://127.0.0.1:8444/node-h1"), "ok\n 200", "{}", node.node_log());
    assert_eq!(on_node(&["--http2-prior-knowledge"], "http://127.0.0.1:8443/node-h2"), "ok\n 200");
    assert_eq!(on_peer(&[], "http://10.231.71.1:8444/peer-h1"), "ok\n 200", "{}", node.node_log());
    assert_eq!(on_peer(&["--http2-prior-knowledge"], "http://10.231.71.1:8443/peer-h2"), "ok\n 200");
    assert_eq!(on_peer(&[], "http://[fd00:231:71::1]:8444/peer-v6"), "ok\n 200");

    let access = std::fs::read_to_string(d.join("access.log")).unwrap();
    let lines: Vec<&str> = access.lines().collect();
    assert_eq!(
        lines,
        [
            // A workload on the node: its own address is the upstream leg's source, and the
            // fields name it alone (its claims to be 1.2.3.4 replaced).
            "127.0.0.1 xff=\"127.0.0.1\" fwd=\"for=127.0.0.1\" HTTP/1.1 /node-h1",
            "127.0.0.1 xff=\"127.0.0.1\" fwd=\"for=127.0.0.1\" HTTP/2.0 /node-h2",
            // Another host: the node's address is the source (the answer must come back to the
            // proxy), and the fields name the host.
            "10.231.71.1 xff=\"10.231.71.2\" fwd=\"for=10.231.71.2\" HTTP/1.1 /peer-h1",
            "10.231.71.1 xff=\"10.231.71.2\" fwd=\"for=10.231.71.2\" HTTP/2.0 /peer-h2",
            "fd00:231:71::1 xff=\"fd00:231:71::2\" fwd=\"for=\\x22[fd00:231:71::2]\\x22\" HTTP/1.1 /peer-v6",
        ],
        "{access}"
    );

    // No loop: every request was carried by exactly one proxied connection (two egress from
    // the workload, three ingress from the peer), and none of the proxy's upstream legs (from
    // 127.0.0.1, the client's address) came back into the proxy as an ingress connection.
    let conns = proxy_connections(&node);
    let by_direction = |d: &str| conns.iter().filter(|f| f["direction"] == d).count();
    assert_eq!((by_direction("EGRESS"), by_direction("INGRESS")), (2, 3), "{conns:#?}");
    assert!(
        conns.iter().filter(|f| f["direction"] == "INGRESS").all(|f| f["source"]["ip"] != "127.0.0.1"),
        "{conns:#?}"
    );
    let requests: Vec<serde_json::Value> = node.flows().unwrap().into_iter().filter(|f| !f["l7"].is_null()).collect();
    assert_eq!(requests.len(), 5, "{requests:#?}");
    for r in requests.iter().filter(|r| r["direction"] == "EGRESS") {
        let leg = r["proxy"]["upstream"].as_str().unwrap();
        assert!(leg.starts_with("127.0.0.1:"), "the leg keeps the workload's address: {r}");
        let port = leg.rsplit_once(':').unwrap().1.parse::<u64>().unwrap();
        assert!(
            !conns.iter().any(|c| c["source"]["port"] == port && c["source"]["ip"] == "127.0.0.1"),
            "the upstream leg {leg} reached the proxy again: {conns:#?}"
        );
    }
    let counters = node.counters().unwrap();
    assert_eq!(counters.get(redirector::CounterKind::IngressRedirected), 3, "{counters:?}");
    // The legs come from 127.0.0.1, which is `host`; the server's ingress allows no `host`:
    // a node process straight to it is refused in the kernel, while the legs above were not
    // judged by their own address but as the connections they carry.
    let direct = node.curl(None, "http://127.0.0.1:8444/host", &[]).unwrap();
    assert_eq!(direct.0, 7, "a host process reached the server: {direct:?}");
    assert!(!std::fs::read_to_string(d.join("access.log")).unwrap().contains("/host"));
    // policy-api reads the flows from l7proxy's admin API with the node's token.
    let observed = node.l7ctl_ok(&["observe", "-o", "json", "--protocol", "http"]);
    assert_eq!(observed.lines().count(), 5, "{observed}");
}

/// The client's egress to the PROXY v2 server on 9000 (opted in) and 9001 (not): HTTP rules,
/// and an L4 allow that lets other bytes pass opaquely.
const PP_POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: pp
spec:
  endpointSelector:
    matchLabels:
      app: pp
  ingress:
  - fromCIDR:
    - 10.231.72.0/24
    toPorts:
    - ports:
      - port: "9000"
        protocol: TCP
      - port: "9001"
        protocol: TCP
  - fromCIDR:
    - 10.231.72.0/24
    toPorts:
    - ports:
      - port: "9000"
        protocol: TCP
      - port: "9001"
        protocol: TCP
      rules:
        http:
        - method: GET
"#;

#[test]
fn proxy_protocol_v2_only_on_the_opted_in_opaque_port() {
    let mut node = TestNode::new("proxyv2").unwrap();
    let peer = node.add_peer_host(72).unwrap();
    node.node_env.push(("L7PROXY_PROXY_PROTOCOL_PORTS".into(), "9000".into()));
    let policy = node.policy_file("pp.yaml", PP_POLICY).unwrap();
    node.start_node(&policy, &[]).unwrap();
    let script = node.copy_script("proxy_v2_server.py").unwrap();
    for port in ["9000", "9001"] {
        let log = format!("pp-{port}.log");
        node.spawn_l7ctl_run(&format!("pp{port}"), "app=pp", &[PY, "-u", &script, "0.0.0.0", port], &log).unwrap();
        wait_for("the server did not start", || node.log(&log).contains("serving"), || node.log(&log));
    }
    let send_line = |port: &str| {
        let code = format!(
            "import socket; s = socket.create_connection(('10.231.72.1', {port}), timeout=10); \
             s.sendall(b'hello from the peer, not HTTP\\n'); print(s.recv(4096).decode().strip())"
        );
        stdout(&node.run_on_peer(&peer, &[PY, "-c", &code]).unwrap()).trim().to_string()
    };
    // Opted in: the header names the peer and the original destination, then its bytes.
    let got = send_line("9000");
    let (head, data) = got.split_once(" data=").unwrap_or_else(|| panic!("{got}\n{}", node.node_log()));
    let src = head.strip_prefix("proxy src=10.231.72.2:").unwrap_or_else(|| panic!("{got}"));
    let (sport, dst) = src.split_once(' ').unwrap();
    assert!(sport.parse::<u16>().is_ok() && dst == "dst=10.231.72.1:9000", "{got}");
    assert_eq!(data, "hello from the peer, not HTTP");
    // Not opted in: the bytes alone, from the node's address.
    let got = send_line("9001");
    assert!(
        got.starts_with("plain peer=10.231.72.1:") && got.ends_with(" data=hello from the peer, not HTTP"),
        "{got}"
    );
    // HTTP on the opted-in port goes through the HTTP stack: no header there.
    // (The server's answer is no HTTP: curl's result does not matter, the server's log does.)
    node.run_on_peer(&peer, &["curl", "-sS", "--max-time", "5", "http://10.231.72.1:9000/x"]).unwrap();
    let log = node.log("pp-9000.log");
    assert!(log.lines().any(|l| l.starts_with("plain ") && l.ends_with("data=GET /x HTTP/1.1")), "{log}");
    assert_eq!(log.lines().filter(|l| l.starts_with("proxy ")).count(), 1, "{log}");
    assert!(!log.contains("bad"), "{log}");
}

/// curl's status code for `path` on the admin API, as `nobody` outside every workload.
fn admin_status_as_nobody(node: &TestNode, path: &str, extra: &[&str]) -> String {
    let url = format!("http://127.0.0.1:15000{path}");
    let mut args = vec!["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"];
    args.extend(["curl", "-s", "--max-time", "3", "-o", "/dev/null", "-w", "%{http_code}"]);
    args.extend(extra);
    args.push(&url);
    stdout(&node.run(None, &args).unwrap())
}

#[test]
fn the_admin_apis_flows_and_counters_need_the_token_health_and_metrics_stay_open() {
    let mut node = TestNode::new("admintoken").unwrap();
    node.start_proxy(&[]).unwrap();
    let token_file = node.api_token_file();
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777, 0o600, "l7proxy made it");
    let token = std::fs::read_to_string(&token_file).unwrap();
    // An unprivileged local user cannot read the token...
    let o = node
        .run(
            None,
            &["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", "cat", token_file.to_str().unwrap()],
        )
        .unwrap();
    assert!(!o.status.success() && stdout(&o).is_empty(), "nobody read the token");
    // ...nor get flows or counters without it, however it asks.
    let wrong = format!("Authorization: Bearer {}x", token.trim());
    let short = format!("Authorization: Bearer {}", &token.trim()[..63]);
    let lower = format!("Authorization: bearer {}", token.trim());
    let basic = format!("Authorization: Basic {}", token.trim());
    for path in ["/v1/flows", "/v1/flows?follow=true", "/v1/counters", "/v1/flows?verdict=denied", "/v1/"] {
        for extra in [
            &[][..],
            &["-H", "Authorization: Bearer "],
            &["-H", &wrong],
            &["-H", &short],
            &["-H", &lower],
            &["-H", &basic],
        ] {
            assert_eq!(admin_status_as_nobody(&node, path, extra), "401", "{path} {extra:?}");
        }
    }
    // Other spellings of the path are not a way around it.
    for path in ["/v1/flows/", "/v1//flows", "/v1/counters?x=1", "/v1/%66lows"] {
        assert_eq!(admin_status_as_nobody(&node, path, &[]), "401", "{path}");
    }
    for path in ["//v1/flows", "/V1/flows", "/./v1/flows", "/x/../v1/flows"] {
        assert_ne!(admin_status_as_nobody(&node, path, &["--path-as-is"]), "200", "{path}");
    }
    // What Prometheus and health checks need stays open to every local user.
    for path in ["/metrics", "/healthz", "/readyz"] {
        assert_eq!(admin_status_as_nobody(&node, path, &[]), "200", "{path}");
    }
    // With the token: served (the user who holds it, whoever it is).
    let auth = format!("Authorization: Bearer {}", token.trim());
    assert_eq!(admin_status_as_nobody(&node, "/v1/flows", &["-H", &auth]), "200");
    assert_eq!(admin_status_as_nobody(&node, "/v1/counters", &["-H", &auth]), "200");
    assert!(node.admin("/v1/counters").unwrap().contains("redirected"), "the harness sends the token");
    // A token replaced on disk (policy-api making one anew) is the one in force at once.
    std::fs::remove_file(&token_file).unwrap();
    l7mesh_api::token::load_or_create(&token_file).unwrap();
    assert_eq!(admin_status_as_nobody(&node, "/v1/flows", &["-H", &auth]), "401", "the old token");
    assert!(node.admin("/v1/flows").is_ok(), "the new one");
    // No token file at all: refused (fail closed), health still open.
    std::fs::remove_file(&token_file).unwrap();
    assert_eq!(admin_status_as_nobody(&node, "/v1/flows", &["-H", &auth]), "503");
    assert_eq!(admin_status_as_nobody(&node, "/healthz", &[]), "200");
}

#[test]
fn a_node_process_bound_to_the_proxys_old_source_is_judged_like_any_other() {
    // sk_lookup once passed every connection from 127.0.0.6 unjudged (the proxy's upstream
    // source); any local user may bind it. The legs are known by their 4-tuple now.
    let mut node = TestNode::new("oldsource").unwrap();
    node.start_proxy(&[]).unwrap();
    node.http_server(Some("server"), "127.0.0.1", 8080, "unjudged\n").unwrap();
    let server = node.cgroup_id("server").unwrap();
    // The server's ingress is enforced and allows no one: `host` is refused by sk_lookup.
    node.apply(&PolicySnapshot {
        endpoints: vec![endpoint(server, 2, 1002, false, true)],
        ipcache: vec![],
        rules: vec![],
    })
    .unwrap();
    let connect_from = |src: &str| {
        let code = format!(
            "import socket\ns = socket.socket()\ns.bind(('{src}', 0))\ns.settimeout(3)\ntry:\n    s.connect(('127.0.0.1', 8080))\n    s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\n    print(repr(s.recv(12)))\nexcept OSError as e:\n    print(type(e).__name__)"
        );
        let nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", PY, "-c", &code];
        stdout(&node.run(None, &nobody).unwrap()).trim().to_string()
    };
    for src in ["127.0.0.1", "127.0.0.6", "127.0.0.7"] {
        assert_eq!(connect_from(src), "ConnectionRefusedError", "an unprivileged node process from {src}");
    }
    assert!(!node.log("http-8080-127_0_0_1.log").contains("GET"), "{}", node.log("http-8080-127_0_0_1.log"));
}

const HOST_ALLOWED: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: server
spec:
  endpointSelector:
    matchLabels:
      app: server
  ingress:
  - fromEntities:
    - host
    toPorts:
    - ports:
      - port: "8080"
        protocol: TCP
"#;

const HOST_DENIED: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: server
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
"#;

#[test]
fn a_connection_from_the_proxys_old_source_does_not_outlive_a_policy_that_denies_it() {
    let mut node = TestNode::new("oldsource-held").unwrap();
    let policy = node.policy_file("server.yaml", HOST_ALLOWED).unwrap();
    node.start_node(&policy, &[]).unwrap();
    node.http_workload("server", "app=server", "127.0.0.1", 8080, "hello\n").unwrap();
    // A node process (as nobody) holds a connection from 127.0.0.6, allowed as `host`'s.
    let code = "import socket, time\ns = socket.socket()\ns.bind(('127.0.0.6', 0))\ns.connect(('127.0.0.1', 8080))\nprint('connected', flush=True)\ntime.sleep(60)";
    let nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", PY, "-c", code];
    node.spawn(None, &nobody, "held.log").unwrap();
    wait_for(
        "the held connection never opened",
        || node.log("held.log").contains("connected"),
        || node.log("held.log"),
    );
    let held = || {
        let o =
            node.run(None, &["ss", "-tnH", "state", "established", "src", "127.0.0.6", "dport", "=", ":8080"]).unwrap();
        !stdout(&o).trim().is_empty()
    };
    assert!(held());
    // Now `host` is denied: re-judging closes the server's end of it, like any other.
    let file = node.policy_file("deny.yaml", HOST_DENIED).unwrap();
    // (server.yaml is the node's --policy file: an API write to its policy needs --force.)
    let o = node.l7ctl_ok(&["apply", "--force", "-f", file.to_str().unwrap()]);
    assert!(o.contains("1 connection(s) closed: 1 denied"), "{o}");
    assert!(
        !held() || {
            // The client end learns of the close when it next sends; the server's end is gone.
            let o = node
                .run(None, &["ss", "-tnH", "state", "established", "sport", "=", ":8080", "dst", "127.0.0.6"])
                .unwrap();
            stdout(&o).trim().is_empty()
        }
    );
    let server_end =
        node.run(None, &["ss", "-tnH", "state", "established", "sport", "=", ":8080", "dst", "127.0.0.6"]).unwrap();
    assert!(stdout(&server_end).trim().is_empty(), "the server's end is still open: {}", stdout(&server_end));
}

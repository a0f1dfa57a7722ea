//! Review of "the proxy judges exactly what the upstream will act on": attacks that still get
//! a request judged one way and served another. Each test states what the upstream must not
//! see; the upstream's own access log (nginx) is the proof.

use std::process::Output;

use integration::*;

const PEERS_PY: &str = "/opt/l7mesh-peers/bin/python";

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim_end().to_string()
}

/// Port 8080: GET /public/.* and OPTIONS; port 8081: only the name allowed.example; port
/// 8443: any path on allowed.example.
const POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: web
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
          path: /public/.*
        - method: OPTIONS
    - ports:
      - port: "8081"
        protocol: TCP
      rules:
        http:
        - host: allowed\.example
    - ports:
      - port: "8443"
        protocol: TCP
      rules:
        http:
        - path: /.*
          host: allowed\.example
"#;

/// As in http_canonical.rs: 8081 has a default virtual host and one per name.
fn start_nginx(node: &mut TestNode) {
    let d = node.log_dir.clone();
    let servers = format!(
        "  log_format full '$server_name \"$request\" $status';\n\
         server {{ listen 127.0.0.1:8080; access_log {d}/access-8080.log full;\n\
           location /admin/ {{ return 200 \"ADMIN $request_uri\\n\"; }}\n\
           location / {{ return 200 \"nginx $request_uri\\n\"; }} }}\n\
         server {{ listen 127.0.0.1:8081 default_server; server_name default.example; access_log {d}/access-8081.log full; location / {{ return 200 \"DEFAULT\\n\"; }} }}\n\
         server {{ listen 127.0.0.1:8081; server_name allowed.example; access_log {d}/access-8081.log full; location / {{ return 200 \"ALLOWED $host\\n\"; }} }}\n\
         server {{ listen 127.0.0.1:8081; server_name other.example; access_log {d}/access-8081.log full; location / {{ return 200 \"OTHER\\n\"; }} }}\n",
        d = d.display()
    );
    std::fs::write(d.join("nginx.conf"), nginx_config(&d, &servers)).unwrap();
    node.spawn(None, &["nginx", "-c", d.join("nginx.conf").to_str().unwrap()], "nginx.log").unwrap();
    for port in ["8080", "8081"] {
        node.probe(None, &["wait-tcp", "127.0.0.1", port, "10"]).unwrap();
    }
}

fn access(node: &TestNode, port: u16) -> String {
    std::fs::read_to_string(node.log_dir.join(format!("access-{port}.log"))).unwrap_or_default()
}

fn raw(node: &TestNode, script: &str, port: u16, request: &str) -> String {
    let port = port.to_string();
    out(&node.l7ctl_run("client", "app=client", &[PEERS_PY, script, "127.0.0.1", &port, request]).unwrap())
}

/// HTTP/1.0 may omit Host, but an absolute-form target names one: the proxy judges the
/// target's name, turns the target into origin-form and forwards no Host at all, so nginx
/// serves its default virtual host, which the policy (host: allowed\.example) never allowed.
#[test]
fn http10_absolute_form_without_host_is_served_by_the_name_it_was_judged_by() {
    let mut node = TestNode::new("review-h10").unwrap();
    let policy = node.policy_file("web.yaml", POLICY).unwrap();
    node.start_node(&policy, &[]).unwrap();
    start_nginx(&mut node);
    let script = node.copy_script("raw_http.py").unwrap();

    let r = raw(&node, &script, 8081, "GET http://allowed.example/h10 HTTP/1.0\\r\\n\\r\\n");
    let log = access(&node, 8081);
    assert!(
        !r.contains("DEFAULT") && !log.contains("default.example"),
        "judged as allowed.example, served by nginx's default virtual host: {r}\nnginx: {log}"
    );
    // The same request with its Host is served by allowed.example (this holds).
    let r =
        raw(&node, &script, 8081, "GET http://allowed.example/h10b HTTP/1.0\\r\\nHost: allowed.example\\r\\n\\r\\n");
    assert!(r.contains("ALLOWED"), "{r}");
}

/// `Connection: host` lists Host as hop-by-hop: the proxy judges Host, then strips every field
/// `Connection` names, Host included, and the HTTP/1.0 request reaches nginx without one: its
/// default virtual host serves it. (HTTP/1.1 gets nginx's 400; upstreams that accept HTTP/1.1
/// without Host serve it too.)
#[test]
fn a_host_named_in_connection_is_not_stripped_after_being_judged() {
    let mut node = TestNode::new("review-conn").unwrap();
    let policy = node.policy_file("web.yaml", POLICY).unwrap();
    node.start_node(&policy, &[]).unwrap();
    start_nginx(&mut node);
    let script = node.copy_script("raw_http.py").unwrap();
    // `Connection: host` lists Host as hop-by-hop: the proxy judges Host, then strips it,
    // and the HTTP/1.0 request reaches nginx without one (HTTP/1.1 gets nginx's 400).
    let r = raw(
        &node,
        &script,
        8081,
        "GET /conn-host HTTP/1.0\\r\\nHost: allowed.example\\r\\nConnection: host\\r\\n\\r\\n",
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    let log = access(&node, 8081);
    assert!(
        !r.contains("DEFAULT") && !log.contains("default.example"),
        "judged as allowed.example, its Host stripped as hop-by-hop: {r}\nnginx: {log}"
    );
}

/// The rules judge an absolute-form target's authority, but the upstream gets the Host field
/// as sent. `Host: allowed.example:80` alone on port 8081 is judged `allowed.example:80`
/// (denied); behind an agreeing absolute-form target it is judged `allowed.example`.
#[test]
fn the_host_judged_is_the_host_forwarded() {
    let mut node = TestNode::new("review-host").unwrap();
    let policy = node.policy_file("web.yaml", POLICY).unwrap();
    node.start_node(&policy, &[]).unwrap();
    start_nginx(&mut node);
    let script = node.copy_script("raw_http.py").unwrap();
    let req = |target: &str, host: &str| {
        raw(
            &node,
            &script,
            8081,
            &format!("GET {target} HTTP/1.1\\r\\nHost: {host}\\r\\nConnection: close\\r\\n\\r\\n"),
        )
    };
    let alone = req("/p80", "allowed.example:80");
    assert!(alone.starts_with("HTTP/1.1 403"), "Host alone: {alone}");
    for (target, host) in
        [("http://allowed.example/p80", "allowed.example:80"), ("https://allowed.example/p443", "allowed.example:443")]
    {
        let r = req(target, host);
        assert!(
            r.starts_with("HTTP/1.1 403") || r.starts_with("HTTP/1.1 400"),
            "{target} + Host {host}: judged `allowed.example`, Host `{host}` forwarded: {r}\nnginx: {}",
            access(&node, 8081)
        );
    }
}

/// The framing scanner ahead of hyper refuses Content-Length with Transfer-Encoding (the
/// CRLF spelling gets its 400), but it loses track where hyper does not: hyper accepts bare-LF
/// line endings, the scanner only looks for CRLF CRLF, so it never judges such a head; and
/// after any request carrying `Upgrade` (which the proxy never performs) it stops judging the
/// connection for good. (hyper re-frames what it forwards, so nginx is not desynchronized; the
/// refusal the module promises is simply not made.)
#[test]
fn framing_refusals_do_not_depend_on_line_endings_or_an_earlier_upgrade_header() {
    let mut node = TestNode::new("review-lf").unwrap();
    let policy = node.policy_file("web.yaml", POLICY).unwrap();
    node.start_node(&policy, &[]).unwrap();
    start_nginx(&mut node);
    let script = node.copy_script("raw_http.py").unwrap();
    let crlf = raw(
        &node,
        &script,
        8080,
        "GET /public/crlf HTTP/1.1\\r\\nHost: 127.0.0.1:8080\\r\\nContent-Length: 5\\r\\nTransfer-Encoding: chunked\\r\\nConnection: close\\r\\n\\r\\n0\\r\\n\\r\\n",
    );
    assert!(crlf.starts_with("HTTP/1.1 400"), "CRLF: {crlf}");
    let mut problems = Vec::new();
    let lf = raw(
        &node,
        &script,
        8080,
        "GET /public/lf HTTP/1.1\\nHost: 127.0.0.1:8080\\nContent-Length: 5\\nTransfer-Encoding: chunked\\nConnection: close\\n\\n0\\n\\n",
    );
    if !lf.starts_with("HTTP/1.1 400") {
        problems.push(format!("bare LF: {lf}"));
    }
    raw(
        &node,
        &script,
        8080,
        "GET /public/up HTTP/1.1\\r\\nHost: 127.0.0.1:8080\\r\\nUpgrade: foo\\r\\n\\r\\nGET /public/after-upgrade HTTP/1.1\\r\\nHost: 127.0.0.1:8080\\r\\nContent-Length: 5\\r\\nTransfer-Encoding: chunked\\r\\nConnection: close\\r\\n\\r\\n0\\r\\n\\r\\n",
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    let log = access(&node, 8080);
    if log.contains("/public/after-upgrade") {
        problems.push("CL + TE after a request with Upgrade reached nginx".to_string());
    }
    assert!(problems.is_empty(), "{problems:#?}\nnginx: {log}");
}

/// The simulation replays flows from their recorded URL: the `OPTIONS *` and the path-less
/// absolute-form (`http://name?q`) flows come back with a host the proxy never judged
/// (`allowed.example*`, `allowed.example?q`), so simulating the policy in force predicts
/// changes that would not happen.
#[test]
fn simulating_the_policy_in_force_changes_nothing() {
    let mut node = TestNode::new("review-sim").unwrap();
    let policy = node.policy_file("web.yaml", POLICY).unwrap();
    node.start_node(&policy, &[]).unwrap();
    start_nginx(&mut node);
    let script = node.copy_script("raw_http.py").unwrap();
    let r =
        raw(&node, &script, 8081, "OPTIONS * HTTP/1.1\\r\\nHost: allowed.example\\r\\nConnection: close\\r\\n\\r\\n");
    assert!(!r.starts_with("HTTP/1.1 403"), "{r}");
    let r = raw(
        &node,
        &script,
        8081,
        "GET http://allowed.example?q=1 HTTP/1.1\\r\\nHost: allowed.example\\r\\nConnection: close\\r\\n\\r\\n",
    );
    assert!(r.contains("ALLOWED"), "{r}");
    let r =
        raw(&node, &script, 8081, "GET /plain HTTP/1.1\\r\\nHost: allowed.example\\r\\nConnection: close\\r\\n\\r\\n");
    assert!(r.contains("ALLOWED"), "{r}");
    std::thread::sleep(std::time::Duration::from_millis(500));
    let o = node.l7ctl(&["simulate", "-f", policy.to_str().unwrap(), "--since", "10m", "-o", "json"]).unwrap();
    let report: serde_json::Value = serde_json::from_str(&out(&o))
        .unwrap_or_else(|e| panic!("{e}: {}{}", out(&o), String::from_utf8_lossy(&o.stderr)));
    assert!(
        report["newly_denied"] == 0 && report["newly_allowed"] == 0,
        "the policy in force, replayed, must predict no change: {report:#}\nflows: {:#?}",
        node.flows().unwrap().iter().map(|f| f["l7"].clone()).collect::<Vec<_>>()
    );
}

/// HTTP/2: what the rules judged against what the recording upstream received.
#[test]
fn http2_judged_and_received_agree() {
    let mut node = TestNode::new("review-h2").unwrap();
    let policy = node.policy_file("web.yaml", POLICY).unwrap();
    node.start_node(&policy, &[]).unwrap();
    let recorder = node.copy_script("h2_recorder.py").unwrap();
    let upstream_log = node.shared_dir("h2rec").unwrap().join("requests.jsonl");
    let upstream_log_s = upstream_log.display().to_string();
    node.spawn(None, &[PEERS_PY, "-u", &recorder, "8443", &upstream_log_s], "h2rec.log").unwrap();
    node.probe(None, &["wait-tcp", "127.0.0.1", "8443", "10"]).unwrap();
    // The same recorder on 8081, whose rule has no path.
    let host_only_log = node.shared_dir("h2rec8081").unwrap().join("requests.jsonl");
    let host_only_log_s = host_only_log.display().to_string();
    node.spawn(None, &[PEERS_PY, "-u", &recorder, "8081", &host_only_log_s], "h2rec8081.log").unwrap();
    node.probe(None, &["wait-tcp", "127.0.0.1", "8081", "10"]).unwrap();
    let client = node.copy_script("h2_request.py").unwrap();
    let send_to = |port: &str, headers: serde_json::Value| {
        let h = headers.to_string();
        out(&node
            .l7ctl_run("client", "app=client", &[PEERS_PY, client.as_str(), "127.0.0.1", port, h.as_str()])
            .unwrap())
    };
    let send = |headers: serde_json::Value| send_to("8443", headers);
    let received = || {
        std::thread::sleep(std::time::Duration::from_millis(300));
        std::fs::read_to_string(&host_only_log).unwrap_or_default()
    };
    let _ = &upstream_log;

    // A gRPC call on a port with HTTP rules (path and host): allowed by the proxy, recorded as
    // a gRPC flow, replayed by the simulation with an empty host: "newly denied".
    let r = send(serde_json::json!([
        [":method", "POST"],
        [":path", "/pkg.Svc/Method"],
        [":scheme", "http"],
        [":authority", "allowed.example"],
        ["content-type", "application/grpc"]
    ]));
    assert!(r.starts_with("RESPONSE 200"), "{r}");
    std::thread::sleep(std::time::Duration::from_millis(500));
    let o = node.l7ctl(&["simulate", "-f", policy.to_str().unwrap(), "--since", "10m", "-o", "json"]).unwrap();
    let report: serde_json::Value = serde_json::from_str(&out(&o)).unwrap();
    let mut problems = Vec::new();
    if report["newly_denied"] != 0 {
        problems.push(format!("the gRPC flow replayed without its host: {report:#}"));
    }

    // `:path` must be origin-form (or `*`): `?q` is judged as the path `?q` and reaches the
    // upstream as `:path: ?q`.
    let r = send_to(
        "8081",
        serde_json::json!([
            [":method", "GET"],
            [":path", "?q"],
            [":scheme", "http"],
            [":authority", "allowed.example"]
        ]),
    );
    let seen = received();
    if !(r.starts_with("RESET") || r.starts_with("GOAWAY") || !seen.contains(r#"":path", "?q""#)) {
        problems.push(format!("`:path: ?q` forwarded as is ({r}): {seen}"));
    }
    // `:authority` and `host` "agree" up to the default port: the rules judge `:authority`
    // (`allowed.example`), the upstream also gets `host: allowed.example:80`, which judged on
    // its own is `allowed.example:80` (denied on port 8081).
    let r = send_to(
        "8081",
        serde_json::json!([
            [":method", "GET"],
            [":path", "/h2port"],
            [":scheme", "http"],
            [":authority", "allowed.example"],
            ["host", "allowed.example:80"]
        ]),
    );
    if r.starts_with("RESPONSE 200") {
        problems.push(format!("judged `allowed.example`, forwarded host `allowed.example:80`: {}", received()));
    }
    // HTTP/2 without `:authority`, its authority in `host` (RFC 9113 §8.3.1 allows it): judged
    // and allowed, then h2's client refuses a request without scheme and authority: 502.
    let r = send_to(
        "8081",
        serde_json::json!([[":method", "GET"], [":path", "/noauth"], [":scheme", "http"], ["host", "allowed.example"]]),
    );
    if !r.starts_with("RESPONSE 200") {
        problems.push(format!("allowed HTTP/2 request with host and no :authority: {r}"));
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

/// TLS terminated by the proxy: `serverNames` judges the ClientHello's SNI, the HTTP rules the
/// decrypted requests, and nothing ties the two together. A client names the allowed server
/// in its SNI and another virtual host in Host (domain fronting); the upstream serves the Host.
#[test]
fn a_terminated_connection_serves_only_the_name_its_sni_was_allowed_for() {
    let mut node = TestNode::new("review-sni").unwrap();
    let policy = node
        .policy_file(
            "sni.yaml",
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: sni\nspec:\n  endpointSelector:\n    matchLabels:\n      app: client\n  egress:\n  - toPorts:\n    - ports:\n      - port: \"8447\"\n        protocol: TCP\n      terminatingTLS: {}\n      serverNames:\n      - allowed.example\n      rules:\n        http:\n        - method: GET\n",
        )
        .unwrap();
    node.start_node(&policy, &[]).unwrap();
    let d = node.log_dir.clone();
    let servers = format!(
        "  log_format full '$server_name \"$request\" $status';\n\
         server {{ listen 127.0.0.1:8447 default_server; server_name default.example; access_log {d}/access-8447.log full; location / {{ return 200 \"DEFAULT\\n\"; }} }}\n\
         server {{ listen 127.0.0.1:8447; server_name allowed.example; access_log {d}/access-8447.log full; location / {{ return 200 \"ALLOWED\\n\"; }} }}\n\
         server {{ listen 127.0.0.1:8447; server_name other.example; access_log {d}/access-8447.log full; location / {{ return 200 \"OTHER\\n\"; }} }}\n",
        d = d.display()
    );
    std::fs::write(d.join("nginx.conf"), nginx_config(&d, &servers)).unwrap();
    node.spawn(None, &["nginx", "-c", d.join("nginx.conf").to_str().unwrap()], "nginx.log").unwrap();
    node.probe(None, &["wait-tcp", "127.0.0.1", "8447", "10"]).unwrap();
    let curl = |host: Option<&str>| {
        let mut cmd = vec!["curl", "-sSk", "--max-time", "10", "--resolve", "allowed.example:8447:127.0.0.1"];
        let h;
        if let Some(host) = host {
            h = format!("Host: {host}");
            cmd.extend(["-H", h.as_str()]);
        }
        cmd.push("https://allowed.example:8447/");
        let o = node.l7ctl_run("client", "app=client", &cmd).unwrap();
        format!("{}{}", out(&o), String::from_utf8_lossy(&o.stderr))
    };
    assert_eq!(curl(None), "ALLOWED");
    let fronted = curl(Some("other.example"));
    assert!(
        !fronted.contains("OTHER"),
        "SNI allowed.example, Host other.example: served {fronted:?}\nnginx: {}",
        std::fs::read_to_string(d.join("access-8447.log")).unwrap_or_default()
    );
}

//! Connections that predate a policy change obey it: an established connection the new version
//! marks for the proxy (or whose TLS handling or route it changes) is closed before `l7ctl
//! apply` returns and counted in its report, so the client's next connection is judged; a
//! connection whose handling did not change is never touched (a long download in flight
//! completes, a description-only edit or an unrelated workload's start closes nothing).
//! Real clients (Python h2 and hand-written HTTP/1.1 on sockets, curl) hold their connections
//! idle across each apply and then send, as a hostile client would; real nginx serves them.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use integration::{HeldAt, HeldClient, TestNode};

/// Size of the file the long downloads fetch, and nginx's rate for it (about 12 s).
const BIG: usize = 3 << 20;
const RATE: &str = "256k";

fn node_without_policy(name: &str) -> TestNode {
    let mut node = TestNode::new(name).unwrap();
    let dir = node.log_dir.join("policies");
    std::fs::create_dir_all(&dir).unwrap();
    node.start_node(&dir, &[]).unwrap();
    node
}

fn apply(node: &TestNode, name: &str, yaml: &str) -> String {
    let file = node.log_dir.join(name);
    std::fs::write(&file, yaml).unwrap();
    node.l7ctl_ok(&["apply", "-f", file.to_str().unwrap()])
}

/// nginx answering `$remote_addr $connection xff=$http_x_forwarded_for` (who connected, on
/// which of its connections, and who the proxy says the client is: empty when direct) on every path but `/big`, a 3 MiB file sent at 256 KiB/s. `servers` are
/// (listen address, extra listen flags, extra server lines). As workload `workload` (as
/// `nobody`, from a directory it may write) or outside the workloads.
fn start_nginx(node: &mut TestNode, workload: Option<(&str, &str)>, servers: &[(&str, &str, &str)]) -> PathBuf {
    let d = node.shared_dir("nginx").unwrap();
    let www = d.join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("big"), vec![b'x'; BIG]).unwrap();
    let mut text = String::new();
    for (listen, flags, extra) in servers {
        text.push_str(&format!(
            "  server {{ listen {listen} {flags}; {extra}\n    location /big {{ root {www}; limit_rate {RATE}; }}\n    location / {{ return 200 \"$remote_addr $connection xff=$http_x_forwarded_for\\n\"; }} }}\n",
            www = www.display()
        ));
    }
    std::fs::write(d.join("nginx.conf"), integration::nginx_config(&d, &text)).unwrap();
    let conf = d.join("nginx.conf").display().to_string();
    let err = d.join("nginx-start.log").display().to_string();
    let cmd = ["/usr/sbin/nginx", "-e", &err, "-c", &conf];
    match workload {
        Some((name, labels)) => node.spawn_l7ctl_run(name, labels, &cmd, "nginx.log").unwrap(),
        None => node.spawn(None, &cmd, "nginx.log").unwrap(),
    }
    // The pid file is written once every listener is bound.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !d.join("nginx.pid").exists() {
        assert!(Instant::now() < deadline, "nginx did not start: {}", node.log("nginx.log"));
        std::thread::sleep(Duration::from_millis(20));
    }
    d
}

/// A curl download of `url` as workload `name` (labels `labels`), in the background; its
/// `%{http_code} %{size_download}` lands in `log`.
fn download(node: &mut TestNode, name: &str, labels: &str, url: &str, log: &str) {
    let cmd = ["curl", "-sS", "--max-time", "60", "-o", "/dev/null", "-w", "%{http_code} %{size_download}", url];
    node.spawn_l7ctl_run(name, labels, &cmd, log).unwrap();
}

fn wait_download(node: &TestNode, log: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = node.log(log);
        if !text.trim().is_empty() && (text.contains(' ') || Instant::now() > deadline) {
            return text.trim().to_string();
        }
        assert!(Instant::now() < deadline, "{log}: no result");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// True while an established TCP connection in the node's namespace has port `port` at either
/// end (`run` runs a command there).
fn established(run: &dyn Fn(&[&str]) -> String, port: u16) -> bool {
    let filter = format!("( sport = :{port} or dport = :{port} )");
    let mut args = vec!["ss", "-tnH", "state", "established"];
    args.extend(filter.split(' '));
    !run(&args).trim().is_empty()
}

/// "NAME:STATUS CONN, ..." in name order.
fn held_line(v: &serde_json::Value) -> String {
    let map = v.as_object().expect("held client answer");
    let mut names: Vec<&String> = map.keys().collect();
    names.sort();
    names.iter().map(|n| format!("{n}:{}", status(v, n))).collect::<Vec<_>>().join(", ")
}

fn body(v: &serde_json::Value, conn: &str) -> String {
    v[conn]["body"].as_str().unwrap_or_default().to_string()
}

fn status(v: &serde_json::Value, conn: &str) -> String {
    format!("{} {}", v[conn]["status"].as_str().unwrap_or("?"), v[conn]["conn"].as_str().unwrap_or("?"))
}

/// The client workloads' egress policy: `ports_l7` with GET /public/.* only, `ports_l4`
/// allowed at L4, both towards the node itself.
fn egress(description: &str, ports_l7: &[&str], ports_l4: &[&str]) -> String {
    let ports =
        |ps: &[&str]| ps.iter().map(|p| format!("      - port: \"{p}\"\n        protocol: TCP\n")).collect::<String>();
    let mut rules = String::new();
    if !ports_l7.is_empty() {
        rules.push_str(&format!(
            "  - toEntities: [host]\n    toPorts:\n    - ports:\n{}      rules:\n        http:\n        - method: GET\n          path: \"/public/.*\"\n",
            ports(ports_l7)
        ));
    }
    if !ports_l4.is_empty() {
        rules.push_str(&format!("  - toEntities: [host]\n    toPorts:\n    - ports:\n{}", ports(ports_l4)));
    }
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: client\nspec:\n  description: \"{description}\"\n  endpointSelector:\n    matchLabels:\n      app: client\n  egress:\n{rules}"
    )
}

#[test]
fn egress_connections_opened_before_a_policy_are_closed_and_judged_again() {
    let mut node = node_without_policy("oldconn-egress");
    start_nginx(
        &mut node,
        None,
        &[
            ("127.0.0.1:8443", "http2", ""),
            ("127.0.0.1:8444", "", ""),
            ("[::1]:8444", "", ""),
            ("127.0.0.1:8445", "", ""),
        ],
    );
    // Long downloads in flight across every apply below, on connections whose handling never
    // changes: another port of a workload with the client's labels, and the L7 port from a
    // workload no policy selects.
    download(&mut node, "client-dl", "app=client", "http://127.0.0.1:8445/big", "dl-port.log");
    download(&mut node, "other", "app=other", "http://127.0.0.1:8444/big", "dl-other.log");
    // HTTP/1.1 keep-alive (over IPv4 and IPv6) and HTTP/2, opened with no policy: not through
    // the proxy.
    let at = HeldAt::Workload { name: "client", labels: "app=client" };
    let specs = ["h1=h1:127.0.0.1:8444", "h1v6=h1:[::1]:8444", "h2=h2:127.0.0.1:8443"];
    let mut held = HeldClient::start(&mut node, at, "held", &specs).unwrap();
    let direct_from = |c: &str| if c == "h1v6" { "::1 " } else { "127.0.0.1 " };
    // Through the proxy the upstream leg keeps the client's own address; the proxy's
    // X-Forwarded-For tells the two apart.
    let direct =
        |r: &serde_json::Value, c: &str| body(r, c).starts_with(direct_from(c)) && body(r, c).ends_with(" xff=");
    let proxied = |r: &serde_json::Value, c: &str| {
        body(r, c).starts_with(direct_from(c)) && body(r, c).ends_with(&format!(" xff={}", direct_from(c).trim()))
    };
    let in_ns = |args: &[&str]| String::from_utf8_lossy(&node.run(None, args).unwrap().stdout).into_owned();
    let r = held.get("/secret/a").unwrap();
    for c in ["h1", "h1v6", "h2"] {
        assert_eq!(status(&r, c), "200 same", "{r}");
        assert!(direct(&r, c), "direct, not through the proxy: {r}");
    }

    // No policy -> rules.http on both ports: both connections are closed before apply returns,
    // counted in its report; idle until now, the client finds them closed when it sends, and
    // its next connections are judged (the denied path gets 403, through the proxy).
    let o = apply(&node, "v1.yaml", &egress("v1", &["8443", "8444"], &["8445"]));
    let returned = Instant::now();
    assert!(o.contains("3 connection(s) closed: 0 denied, 3 rerouted"), "{o}");
    for (name, port) in &held.ports {
        assert!(!established(&in_ns, *port), "{name} (port {port}) still open after apply returned");
    }
    assert_eq!(held.statuses("/secret/a").unwrap(), "h1:closed same, h1v6:closed same, h2:closed same");
    assert_eq!(held.statuses("/secret/a").unwrap(), "h1:403 new, h1v6:403 new, h2:403 new");
    println!(
        "apply -> first enforced request on a pre-existing unredirected connection: {:.1} ms (closed, reconnected, 403)",
        returned.elapsed().as_secs_f64() * 1000.0
    );
    let r = held.get("/public/a").unwrap();
    for c in ["h1", "h1v6", "h2"] {
        assert_eq!(status(&r, c), "200 new", "{r}");
        assert!(proxied(&r, c), "through the proxy (the client's address, and its X-Forwarded-For): {r}");
    }
    let ports = |r: &serde_json::Value| ["h1", "h1v6", "h2"].map(|c| r[c]["port"].clone());
    let proxied_ports = ports(&r);

    // What changes nothing closes nothing: a description-only edit, an unrelated workload.
    let o = apply(&node, "v1b.yaml", &egress("v1, described again", &["8443", "8444"], &["8445"]));
    assert!(o.contains("default/client updated") && o.contains(" 0 connection(s) closed"), "{o}");
    let o = node.l7ctl_run("bystander", "app=bystander", &["true"]).unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(held.statuses("/public/b").unwrap(), "h1:200 new, h1v6:200 new, h2:200 new");
    let r = held.get("/public/b").unwrap();
    assert_eq!(ports(&r), proxied_ports, "the same connections: {r}");

    // L7 -> L4 only: the proxy closes the connections it carries, which reconnect directly.
    let o = apply(&node, "v2.yaml", &egress("v2", &[], &["8443", "8444", "8445"]));
    assert!(o.contains("3 connection(s) closed: 0 denied, 3 rerouted"), "{o}");
    assert_eq!(held.statuses("/secret/a").unwrap(), "h1:closed new, h1v6:closed new, h2:closed new");
    let r = held.get("/secret/a").unwrap();
    for c in ["h1", "h1v6", "h2"] {
        assert_eq!(status(&r, c), "200 new", "{r}");
        assert!(direct(&r, c), "direct again: {r}");
    }
    let h2_port = r["h2"]["port"].clone();

    // L4 -> denied on one port: only that connection is closed; the other is untouched.
    let o = apply(&node, "v3.yaml", &egress("v3", &[], &["8443", "8445"]));
    assert!(o.contains("2 connection(s) closed: 2 denied, 0 rerouted"), "{o}");
    let r = held.get("/secret/a").unwrap();
    assert_eq!(held_line(&r), "h1:closed new, h1v6:closed new, h2:200 new", "{r}");
    assert_eq!(r["h2"]["port"], h2_port, "{r}");
    let r = held.get("/secret/a").unwrap();
    assert_eq!(
        (r["h1"]["status"].as_str(), r["h1v6"]["status"].as_str()),
        (Some("connect:PermissionError"), Some("connect:PermissionError")),
        "{r}"
    );
    held.quit();

    // The downloads were still in flight through all of it, and complete whole.
    assert!(node.log("dl-port.log").is_empty() && node.log("dl-other.log").is_empty(), "downloads ended early");
    assert_eq!(wait_download(&node, "dl-port.log"), format!("200 {BIG}"));
    assert_eq!(wait_download(&node, "dl-other.log"), format!("200 {BIG}"));
}

/// The server's ingress: the peer host's subnet on 8080/8081 (with `peer_rules` if any), the
/// client workload on 8080 with GET (so its connections go through the proxy).
fn ingress(description: &str, peer_rules: bool) -> String {
    let rules = if peer_rules {
        "      rules:\n        http:\n        - method: GET\n          path: \"/public/.*\"\n"
    } else {
        ""
    };
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: server\nspec:\n  description: \"{description}\"\n  endpointSelector:\n    matchLabels:\n      app: server\n  ingress:\n  - fromCIDR:\n    - 10.231.62.0/24\n    toPorts:\n    - ports:\n      - port: \"8080\"\n        protocol: TCP\n      - port: \"8081\"\n        protocol: TCP\n{rules}  - fromEndpoints:\n    - matchLabels:\n        app: client\n    toPorts:\n    - ports:\n      - port: \"8080\"\n        protocol: TCP\n      rules:\n        http:\n        - method: GET\n"
    )
}

#[test]
fn ingress_connections_from_another_host_and_the_proxys_own_upstream_legs() {
    let mut node = node_without_policy("oldconn-ingress");
    let peer = node.add_peer_host(62).unwrap();
    apply(&node, "v0.yaml", &ingress("v0", false));
    start_nginx(&mut node, Some(("server", "app=server")), &[("0.0.0.0:8080", "", ""), ("0.0.0.0:8081", "http2", "")]);
    // A slow allowed response through the proxy (client -> l7proxy -> server): the server's end
    // of it comes from the client's address through the proxy's own leg (127.0.0.1, `host`),
    // which the server's ingress does not allow; it is judged as the connection it carries, so
    // nothing below cuts it.
    download(&mut node, "client", "app=client", "http://127.0.0.1:8080/big", "dl.log");
    // Keep-alive HTTP/1.1 and HTTP/2 from another host, passed directly by sk_lookup (L4 allow).
    let mut held = HeldClient::start(
        &mut node,
        HeldAt::Peer(&peer),
        "held",
        &["h1=h1:10.231.62.1:8080", "h2=h2:10.231.62.1:8081"],
    )
    .unwrap();
    let in_ns = |args: &[&str]| String::from_utf8_lossy(&node.run(None, args).unwrap().stdout).into_owned();
    let r = held.get("/secret/a").unwrap();
    for c in ["h1", "h2"] {
        assert_eq!(status(&r, c), "200 same", "{r}");
        assert!(body(&r, c).starts_with("10.231.62.2 "), "direct from the peer: {r}");
    }
    // The download's upstream leg: the proxy's own socket to the server.
    let upstream_leg = || node.proxy_sockets_to("established", 8080).unwrap() > 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !upstream_leg() {
        assert!(Instant::now() < deadline, "the download never went through the proxy: {}", node.log("dl.log"));
        std::thread::sleep(Duration::from_millis(20));
    }

    // A description-only edit and an unrelated workload's start close nothing.
    let o = apply(&node, "v0b.yaml", &ingress("v0, described again", false));
    assert!(o.contains(" 0 connection(s) closed"), "{o}");
    let o = node.l7ctl_run("bystander", "app=bystander", &["true"]).unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(held.statuses("/secret/a").unwrap(), "h1:200 same, h2:200 same");

    // L4 -> rules.http for the peer: the server's ends are closed in the kernel before apply
    // returns; the peer finds its connections reset and its next ones are steered to the proxy.
    let o = apply(&node, "v1.yaml", &ingress("v1", true));
    assert!(o.contains("2 connection(s) closed: 0 denied, 2 rerouted"), "{o}");
    for c in ["h1", "h2"] {
        let port = held.ports[c];
        assert!(!established(&in_ns, port), "the server's end of {c} (peer port {port}) is still open");
    }
    assert_eq!(held.statuses("/secret/a").unwrap(), "h1:closed same, h2:closed same");
    assert_eq!(held.statuses("/secret/a").unwrap(), "h1:403 new, h2:403 new");
    let r = held.get("/public/a").unwrap();
    for c in ["h1", "h2"] {
        assert_eq!(status(&r, c), "200 new", "{r}");
        assert!(!body(&r, c).starts_with("10.231.62.2 "), "through the proxy: {r}");
        assert!(body(&r, c).ends_with(" xff=10.231.62.2"), "the proxy names the peer: {r}");
    }

    // rules.http -> L4 again: the proxy closes the steered connections; they reconnect directly.
    let o = apply(&node, "v2.yaml", &ingress("v2", false));
    assert!(o.contains("2 connection(s) closed: 0 denied, 2 rerouted"), "{o}");
    assert_eq!(held.statuses("/secret/a").unwrap(), "h1:closed new, h2:closed new");
    let r = held.get("/secret/a").unwrap();
    for c in ["h1", "h2"] {
        assert_eq!(status(&r, c), "200 new", "{r}");
        assert!(body(&r, c).starts_with("10.231.62.2 "), "direct again: {r}");
    }
    held.quit();
    let flows = node.flows().unwrap();
    let rerouted = flows
        .iter()
        .filter(|f| f["reason"].as_str().is_some_and(|r| r.contains("carries this connection differently")))
        .count();
    assert_eq!(rerouted, 2, "l7proxy records each connection it closed for the new route");

    // The download through the proxy was never cut.
    assert!(node.log("dl.log").is_empty(), "the download ended early");
    assert_eq!(wait_download(&node, "dl.log"), format!("200 {BIG}"));
}

/// The client's egress on 9443 (nginx over TLS as secure.example.com): `interception` =
/// terminated (mesh CA) and originated (verified with secret `test-ca`) with GET `path`
/// rules; else the SNI judged and the TLS forwarded untouched.
fn tls_egress(interception: bool, path: &str) -> String {
    let port = if interception {
        format!(
            "      terminatingTLS: {{}}\n      originatingTLS:\n        secret:\n          name: test-ca\n      rules:\n        http:\n        - method: GET\n          path: \"{path}\"\n"
        )
    } else {
        "      serverNames:\n      - secure.example.com\n".to_string()
    };
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: tls\nspec:\n  endpointSelector:\n    matchLabels:\n      app: client\n  egress:\n  - toEntities: [host]\n    toPorts:\n    - ports:\n      - port: \"9443\"\n        protocol: TCP\n{port}"
    )
}

#[test]
fn proxied_tls_connections_whose_tls_handling_changes_are_closed() {
    let mut node = node_without_policy("oldconn-tls");
    let pki = node.shared_dir("pki").unwrap();
    integration::test_ca(&pki, "test-ca").unwrap();
    integration::test_leaf(
        &pki,
        "srv",
        "secure.example.com",
        "subjectAltName=DNS:secure.example.com,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    let file = |n: &str| pki.join(n).display().to_string();
    let tls = format!(
        "ssl_certificate {}; ssl_certificate_key {}; ssl_protocols TLSv1.2 TLSv1.3;",
        file("srv.pem"),
        file("srv.key")
    );
    start_nginx(&mut node, None, &[("127.0.0.1:9443", "ssl", &tls)]);
    let run_dir = node.run_dir().display().to_string();
    node.l7ctl_ok(&["secret", "import", "test-ca", "--ca", &file("ca.pem"), "--run-dir", &run_dir]);
    // The client trusts both the server's CA and the mesh CA (for interception).
    let mesh_ca = node.l7ctl_ok(&["ca", "--run-dir", &run_dir]);
    let bundle = pki.join("bundle.pem");
    std::fs::write(&bundle, std::fs::read_to_string(pki.join("ca.pem")).unwrap() + &mesh_ca).unwrap();
    let spec = format!("tls=h1tls:127.0.0.1:9443:secure.example.com:{}", bundle.display());

    // SNI judged, TLS end to end: the client sees the server's own certificate.
    apply(&node, "sni.yaml", &tls_egress(false, ""));
    let at = HeldAt::Workload { name: "client", labels: "app=client" };
    let mut held = HeldClient::start(&mut node, at, "held", &[&spec]).unwrap();
    let r = held.get("/secret/a").unwrap();
    assert_eq!((status(&r, "tls"), r["tls"]["issuer"].as_str()), ("200 same".into(), Some("test-ca")), "{r}");

    // -> interception with HTTP rules: that connection is opaque to the proxy, which would
    // forward it past the new rules; it is closed, and the next one is terminated and judged.
    let o = apply(&node, "intercept.yaml", &tls_egress(true, "/public/.*"));
    assert!(o.contains("1 connection(s) closed: 0 denied, 1 rerouted"), "{o}");
    assert_eq!(held.statuses("/secret/a").unwrap(), "tls:closed same");
    let r = held.get("/secret/a").unwrap();
    assert_eq!(status(&r, "tls"), "403 new", "{r}");
    assert_ne!(r["tls"]["issuer"].as_str(), Some("test-ca"), "terminated by the proxy with a mesh certificate: {r}");
    assert_eq!(held.statuses("/public/a").unwrap(), "tls:200 new");

    // New request rules only: the proxy judges each request with them; nothing is closed.
    let o = apply(&node, "intercept2.yaml", &tls_egress(true, "/(public|secret)/.*"));
    assert!(o.contains(" 0 connection(s) closed"), "{o}");
    let r = held.get("/secret/a").unwrap();
    assert_eq!(status(&r, "tls"), "200 new", "{r}");

    // -> back to SNI only: the terminated connection is closed; the next one is end to end.
    let o = apply(&node, "sni2.yaml", &tls_egress(false, ""));
    assert!(o.contains("1 connection(s) closed: 0 denied, 1 rerouted"), "{o}");
    assert_eq!(held.statuses("/secret/a").unwrap(), "tls:closed new");
    let r = held.get("/secret/a").unwrap();
    assert_eq!((status(&r, "tls"), r["tls"]["issuer"].as_str()), ("200 new".into(), Some("test-ca")), "{r}");
    held.quit();
}

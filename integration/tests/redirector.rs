//! The eBPF redirector on a real kernel, driven through the loader's typed map operations.
//! Each test is its own node (netns + cgroup subtree + pin dir + l7proxy).

use integration::*;

const CLIENT_ID: u32 = 1;
const CLIENT_IDENTITY: u32 = 1001;
const SERVER_ID: u32 = 2;
const SERVER_IDENTITY: u32 = 1002;
const POLICY_L7: u32 = 41;
const POLICY_DENY: u32 = 42;

/// `client` may reach port 8080 only through the proxy (an L7-marked port).
fn redirect_8080(node: &TestNode) -> anyhow::Result<PolicySnapshot> {
    Ok(PolicySnapshot {
        endpoints: vec![endpoint(node.cgroup_id("client")?, CLIENT_ID, CLIENT_IDENTITY, false, false)],
        ipcache: vec![],
        rules: vec![rule(
            CLIENT_ID,
            Direction::Egress,
            Protocol::Tcp,
            identity::ANY,
            (8080, 8080),
            Action::Redirect(ProtocolHint::Http),
            POLICY_L7,
        )],
    })
}

/// Flows of requests through the HTTP stack.
fn request_flows(node: &TestNode) -> Vec<serde_json::Value> {
    node.flows().unwrap().into_iter().filter(|f| !f["l7"].is_null()).collect()
}

fn proxy_flows(node: &TestNode) -> Vec<serde_json::Value> {
    // Connection-level flows (requests through the HTTP stack add L7 flows of their own).
    node.flows().unwrap().into_iter().filter(|f| f["observer"] == "proxy" && f["l7"].is_null()).collect()
}

#[test]
fn marked_connection_lands_at_the_proxy_and_reaches_the_server() {
    let mut node = TestNode::new("redirect").unwrap();
    node.start_proxy(&[]).unwrap();
    node.http_server(None, "127.0.0.1", 8080, "hello from the real server\n").unwrap();
    let generation = node.apply(&redirect_8080(&node).unwrap()).unwrap();
    assert!(generation >= 1);

    let (code, body) = node.curl(Some("client"), "http://127.0.0.1:8080/", &[]).unwrap();
    assert_eq!(code, 0, "curl failed: {body}\nproxy log:\n{}", node.proxy_log());
    assert_eq!(body, "hello from the real server\n");

    let flows = proxy_flows(&node);
    assert_eq!(flows.len(), 1, "one proxied connection: {flows:#?}");
    let f = &flows[0];
    assert_eq!(f["direction"], "EGRESS");
    assert_eq!(f["destination"]["ip"], "127.0.0.1");
    assert_eq!(f["destination"]["port"], 8080);
    assert_eq!(f["proxy"]["original_dst_via"], "getsockopt");
    assert_eq!(f["source"]["cgroup_id"], node.cgroup_id("client").unwrap());
    assert_eq!(f["policy"], POLICY_L7);
    // The upstream leg (from the HTTP stack's pool: the request's flow names it) left from the
    // client's own address, which the server saw, and not from the proxy's dedicated source.
    let request = request_flows(&node).pop().expect("the request's flow");
    assert!(request["proxy"]["upstream"].as_str().unwrap().starts_with("127.0.0.1:"), "{request}");
    let log = node.log("http-8080-127_0_0_1.log");
    assert!(log.contains("127.0.0.1 - - ") && !log.contains("127.0.0.6"), "server log: {log}");
    // The leg was the proxy's own: it never came back to the proxy (one proxied connection).
    assert_eq!(proxy_flows(&node).len(), 1);

    let counters = node.counters().unwrap();
    assert_eq!(counters.get(redirector::CounterKind::Redirected), 1);
    assert!(counters.get(redirector::CounterKind::SkMsgRedirects) > 0, "sk_msg short-circuit not taken: {counters:?}");
}

#[test]
fn unmarked_traffic_and_clients_outside_workloads_are_not_redirected() {
    let mut node = TestNode::new("unmarked").unwrap();
    node.start_proxy(&[]).unwrap();
    node.http_server(None, "127.0.0.1", 8080, "eighty-eighty\n").unwrap();
    node.http_server(None, "127.0.0.1", 8081, "eighty-eighty-one\n").unwrap();
    node.apply(&redirect_8080(&node).unwrap()).unwrap();

    // The same client outside any workload cgroup: straight to the server.
    let (code, body) = node.curl(None, "http://127.0.0.1:8080/", &[]).unwrap();
    assert_eq!((code, body.as_str()), (0, "eighty-eighty\n"));
    // The workload to a destination policy does not mark: straight to the server.
    let (code, body) = node.curl(Some("client"), "http://127.0.0.1:8081/", &[]).unwrap();
    assert_eq!((code, body.as_str()), (0, "eighty-eighty-one\n"));

    assert!(proxy_flows(&node).is_empty(), "nothing reached the proxy: {:#?}", proxy_flows(&node));
    let counters = node.counters().unwrap();
    assert_eq!(counters.get(redirector::CounterKind::Redirected), 0);
    assert!(counters.get(redirector::CounterKind::Passed) >= 1, "{counters:?}");
    // Neither server saw the proxy's source.
    assert!(!node.log("http-8080-127_0_0_1.log").contains("127.0.0.6"));
}

#[test]
fn l4_deny_is_eperm_for_tcp_connect_udp_connect_and_sendto() {
    let mut node = TestNode::new("deny").unwrap();
    node.start_proxy(&[]).unwrap();
    node.http_server(None, "127.0.0.1", 9090, "must not be reached\n").unwrap();
    let client = node.cgroup_id("client").unwrap();
    node.apply(&PolicySnapshot {
        endpoints: vec![endpoint(client, CLIENT_ID, CLIENT_IDENTITY, false, false)],
        ipcache: vec![],
        rules: vec![
            rule(CLIENT_ID, Direction::Egress, Protocol::Tcp, identity::ANY, (9090, 9099), Action::Deny, POLICY_DENY),
            rule(CLIENT_ID, Direction::Egress, Protocol::Udp, identity::ANY, (5353, 5353), Action::Deny, POLICY_DENY),
        ],
    })
    .unwrap();

    assert_eq!(node.probe(Some("client"), &["tcp-connect", "127.0.0.1", "9090"]).unwrap(), "EPERM");
    assert_eq!(node.probe(Some("client"), &["tcp-connect", "::ffff:127.0.0.1", "9095"]).unwrap(), "EPERM");
    assert_eq!(node.probe(Some("client"), &["udp-connect", "127.0.0.1", "5353"]).unwrap(), "EPERM");
    assert_eq!(node.probe(Some("client"), &["udp-sendto", "127.0.0.1", "5353"]).unwrap(), "EPERM");
    // Outside the denied ranges, and outside the workload, nothing is denied.
    assert_eq!(node.probe(Some("client"), &["udp-sendto", "127.0.0.1", "5354"]).unwrap(), "ok");
    assert_eq!(node.probe(None, &["tcp-connect", "127.0.0.1", "9090"]).unwrap(), "ok");
    let (code, _) = node.curl(Some("client"), "http://127.0.0.1:9090/", &[]).unwrap();
    assert_eq!(code, 7, "curl cannot connect");

    assert!(node.counters().unwrap().get(redirector::CounterKind::Denied) >= 5);
    // The kernel's verdicts reached userspace through the ring buffer.
    let denied: Vec<_> = node
        .flows()
        .unwrap()
        .into_iter()
        .filter(|f| f["verdict"] == "DENIED" && f["observer"].as_str().unwrap().starts_with("kernel:"))
        .collect();
    assert!(denied.len() >= 5, "{denied:#?}");
    assert!(denied.iter().all(|f| f["policy"] == POLICY_DENY && f["source"]["cgroup_id"] == client));
    assert!(denied.iter().any(|f| f["l4"]["protocol"] == "UDP" && f["observer"] == "kernel:sendmsg"));
}

#[test]
fn ipv6_and_ipv4_mapped_connections_are_redirected() {
    let mut node = TestNode::new("ipv6").unwrap();
    node.start_proxy(&[]).unwrap();
    node.http_server(None, "::1", 8080, "over ipv6\n").unwrap();
    node.http_server(None, "127.0.0.1", 8080, "over ipv4\n").unwrap();
    node.apply(&redirect_8080(&node).unwrap()).unwrap();

    let (code, body) = node.curl(Some("client"), "http://[::1]:8080/", &[]).unwrap();
    assert_eq!((code, body.as_str()), (0, "over ipv6\n"), "{}", node.proxy_log());
    // An AF_INET6 socket to ::ffff:127.0.0.1 runs connect6 only; the app still sees its peer.
    let peer = node.probe(Some("client"), &["getpeername", "::ffff:127.0.0.1", "8080"]).unwrap();
    assert_eq!(peer, "::ffff:127.0.0.1 8080");
    let peer = node.probe(Some("client"), &["getpeername", "127.0.0.1", "8080"]).unwrap();
    assert_eq!(peer, "127.0.0.1 8080", "getpeername4 shows the original destination");
    let peer = node.probe(Some("client"), &["getpeername", "::1", "8080"]).unwrap();
    assert_eq!(peer, "::1 8080", "getpeername6 shows the original destination");

    let flows = proxy_flows(&node);
    assert!(flows.iter().any(|f| f["destination"]["ip"] == "::1"), "{flows:#?}");
    assert!(flows.iter().filter(|f| f["destination"]["ip"] == "127.0.0.1").count() >= 2, "{flows:#?}");
    let v6 = flows.iter().find(|f| f["destination"]["ip"] == "::1").unwrap();
    assert_eq!(v6["proxy"]["original_dst_via"], "getsockopt");
    let v6_request =
        request_flows(&node).into_iter().find(|f| f["destination"]["ip"] == "::1").expect("the ::1 request");
    // The IPv6 leg keeps the client's ::1, not the proxy's fd00:6c37::6.
    assert!(v6_request["proxy"]["upstream"].as_str().unwrap().starts_with("[::1]:"), "{v6_request}");
    assert!(
        !node.log("http-8080-__1.log").contains(&redirector::UPSTREAM_SRC6.to_string()),
        "{}",
        node.log("http-8080-__1.log")
    );
    assert_eq!(node.counters().unwrap().get(redirector::CounterKind::Redirected), 4);
}

#[test]
fn ingress_from_a_peer_host_is_steered_to_the_proxy_or_refused() {
    let mut node = TestNode::new("ingress").unwrap();
    let peer = node.add_peer_host(41).unwrap();
    node.start_proxy(&[]).unwrap();
    // The server is a workload: its bind is learned in the kernel (post_bind4).
    node.http_server(Some("server"), "0.0.0.0", 8080, "served behind the proxy\n").unwrap();
    node.http_server(Some("server"), "0.0.0.0", 8081, "never\n").unwrap();
    let server = node.cgroup_id("server").unwrap();
    assert!(
        node.maps().unwrap().listeners().iter().any(|l| l.cgroup_id == server && l.addr.port() == 8080),
        "post_bind learned the listener"
    );
    node.apply(&PolicySnapshot {
        endpoints: vec![endpoint(server, SERVER_ID, SERVER_IDENTITY, false, true)],
        ipcache: vec![],
        rules: vec![rule(
            SERVER_ID,
            Direction::Ingress,
            Protocol::Tcp,
            identity::ANY,
            (8080, 8080),
            Action::Redirect(ProtocolHint::Http),
            POLICY_L7,
        )],
    })
    .unwrap();

    let out = node.run_on_peer(&peer, &["curl", "-sS", "--max-time", "10", "http://10.231.41.1:8080/"]).unwrap();
    assert!(
        out.status.success(),
        "{}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        node.proxy_log()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "served behind the proxy\n");
    let flows = proxy_flows(&node);
    let f = flows.iter().find(|f| f["direction"] == "INGRESS").unwrap_or_else(|| panic!("{flows:#?}"));
    assert_eq!(f["source"]["ip"], "10.231.41.2");
    assert_eq!(f["destination"]["ip"], "10.231.41.1");
    assert_eq!(f["destination"]["port"], 8080);
    assert_eq!(f["proxy"]["original_dst_via"], "getsockname");
    // Ingress-enforced, and nothing allows 8081: refused, never reaching the server.
    assert_eq!(node.probe_from_peer(&peer, &["tcp-connect", "10.231.41.1", "8081"]).unwrap(), "ECONNREFUSED");
    assert!(!node.log("http-8081-0_0_0_0.log").contains("GET"));
    let counters = node.counters().unwrap();
    assert_eq!(counters.get(redirector::CounterKind::IngressRedirected), 1, "{counters:?}");
    assert!(counters.get(redirector::CounterKind::Denied) >= 1);
    // A local client outside the workloads is `host`: the same ingress policy applies.
    let (code, body) = node.curl(None, "http://127.0.0.1:8080/", &[]).unwrap();
    assert_eq!((code, body.as_str()), (0, "served behind the proxy\n"));
    assert_eq!(node.counters().unwrap().get(redirector::CounterKind::IngressRedirected), 2);
}

#[test]
fn one_proxy_hop_enforces_egress_and_ingress_without_looping() {
    let mut node = TestNode::new("noloop").unwrap();
    node.start_proxy(&[]).unwrap();
    node.http_server(Some("server"), "127.0.0.1", 8080, "one hop\n").unwrap();
    let (client, server) = (node.cgroup_id("client").unwrap(), node.cgroup_id("server").unwrap());
    node.apply(&PolicySnapshot {
        endpoints: vec![
            endpoint(client, CLIENT_ID, CLIENT_IDENTITY, true, false),
            endpoint(server, SERVER_ID, SERVER_IDENTITY, false, true),
        ],
        ipcache: vec![],
        rules: vec![
            rule(
                CLIENT_ID,
                Direction::Egress,
                Protocol::Tcp,
                SERVER_IDENTITY,
                (8080, 8080),
                Action::Redirect(ProtocolHint::Http),
                POLICY_L7,
            ),
            rule(
                SERVER_ID,
                Direction::Ingress,
                Protocol::Tcp,
                CLIENT_IDENTITY,
                (8080, 8080),
                Action::Redirect(ProtocolHint::Http),
                POLICY_L7 + 1,
            ),
        ],
    })
    .unwrap();
    for _ in 0..3 {
        let (code, body) = node.curl(Some("client"), "http://127.0.0.1:8080/", &[]).unwrap();
        assert_eq!((code, body.as_str()), (0, "one hop\n"), "{}", node.proxy_log());
    }
    let flows = proxy_flows(&node);
    // Exactly one proxied leg per request: the egress redirect; the proxy's upstream leg (from
    // the client's own 127.0.0.1) is neither redirected (SO_MARK) nor steered or judged by
    // sk_lookup (sock_ops recorded the marked leg in L7_LOCAL_DECIDED).
    assert_eq!(flows.len(), 3, "{flows:#?}");
    assert!(flows.iter().all(|f| f["direction"] == "EGRESS"));
    let counters = node.counters().unwrap();
    assert_eq!(counters.get(redirector::CounterKind::Redirected), 3);
    assert_eq!(counters.get(redirector::CounterKind::IngressRedirected), 0);
    assert!(
        counters.get(redirector::CounterKind::SkMsgRedirects) >= 6,
        "both directions short-circuited: {counters:?}"
    );
    assert_eq!(counters.get(redirector::CounterKind::SkMsgMisses), 0, "{counters:?}");
    // Another workload the server's ingress does not name is denied in the kernel.
    assert_eq!(node.probe(Some("stranger"), &["tcp-connect", "127.0.0.1", "8080"]).unwrap(), "EPERM");
}

#[test]
fn restart_of_the_loading_process_fails_closed_then_recovers() {
    let mut node = TestNode::new("restart").unwrap();
    node.start_proxy(&[]).unwrap();
    node.http_server(None, "127.0.0.1", 8080, "still here\n").unwrap();
    node.http_server(None, "127.0.0.1", 8081, "unmarked\n").unwrap();
    node.apply(&redirect_8080(&node).unwrap()).unwrap();
    assert_eq!(node.curl(Some("client"), "http://127.0.0.1:8080/", &[]).unwrap().0, 0);

    node.kill_proxy().unwrap();
    assert!(redirector::is_installed(&node.pin_dir), "the datapath stays pinned");
    // Marked: refused (fail closed). Unmarked: untouched.
    assert_eq!(node.probe(Some("client"), &["tcp-connect", "127.0.0.1", "8080"]).unwrap(), "ECONNREFUSED");
    assert_eq!(node.curl(Some("client"), "http://127.0.0.1:8081/", &[]).unwrap(), (0, "unmarked\n".to_string()));
    assert!(node.counters().unwrap().get(redirector::CounterKind::ProxyAbsent) >= 1);

    // A new loader reuses the pinned maps: the policy applied before the restart still holds.
    let before = node.maps().unwrap().generation().unwrap();
    node.restart_proxy().unwrap();
    assert_eq!(node.maps().unwrap().generation().unwrap(), before, "the restarted loader kept the policy");
    let (code, body) = node.curl(Some("client"), "http://127.0.0.1:8080/", &[]).unwrap();
    assert_eq!((code, body.as_str()), (0, "still here\n"), "{}", node.proxy_log());
    assert_eq!(proxy_flows(&node).len(), 1, "the restarted proxy took it");
}

#[test]
fn fail_open_passes_marked_connections_when_no_proxy_listens() {
    let mut node = TestNode::new("failopen").unwrap();
    let peer = node.add_peer_host(42).unwrap();
    node.start_proxy(&["--fail-open"]).unwrap();
    node.http_server(None, "127.0.0.1", 8080, "direct\n").unwrap();
    node.http_server(Some("server"), "0.0.0.0", 8090, "ingress direct\n").unwrap();
    let mut snapshot = redirect_8080(&node).unwrap();
    let server = node.cgroup_id("server").unwrap();
    snapshot.endpoints.push(endpoint(server, SERVER_ID, SERVER_IDENTITY, false, true));
    snapshot.rules.push(rule(
        SERVER_ID,
        Direction::Ingress,
        Protocol::Tcp,
        identity::ANY,
        (8090, 8090),
        Action::Redirect(ProtocolHint::Http),
        POLICY_L7,
    ));
    node.apply(&snapshot).unwrap();

    node.kill_proxy().unwrap();
    let (code, body) = node.curl(Some("client"), "http://127.0.0.1:8080/", &[]).unwrap();
    assert_eq!((code, body.as_str()), (0, "direct\n"));
    let out = node.run_on_peer(&peer, &["curl", "-sS", "--max-time", "10", "http://10.231.42.1:8090/"]).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ingress direct\n", "{}", String::from_utf8_lossy(&out.stderr));
    let counters = node.counters().unwrap();
    assert_eq!(counters.get(redirector::CounterKind::FailOpenPassed), 2, "{counters:?}");
    assert_eq!(counters.get(redirector::CounterKind::Redirected), 0);
    // Fail open is about a missing proxy, not about policy: L4 denials still hold.
    node.restart_proxy().unwrap();
    assert_eq!(node.curl(Some("client"), "http://127.0.0.1:8080/", &[]).unwrap().1, "direct\n");
    assert_eq!(proxy_flows(&node).len(), 1, "with the proxy back, marked traffic goes through it again");
}

#[test]
fn a_policy_generation_replaces_the_last_in_one_step() {
    let mut node = TestNode::new("generation").unwrap();
    node.start_proxy(&[]).unwrap();
    node.http_server(None, "127.0.0.1", 8080, "ok\n").unwrap();
    let client = node.cgroup_id("client").unwrap();
    let deny = PolicySnapshot {
        endpoints: vec![endpoint(client, CLIENT_ID, CLIENT_IDENTITY, true, false)],
        ipcache: vec![("127.0.0.0/8".parse().unwrap(), identity::HOST)],
        rules: vec![],
    };
    let g1 = node.apply(&deny).unwrap();
    assert_eq!(
        node.probe(Some("client"), &["tcp-connect", "127.0.0.1", "8080"]).unwrap(),
        "EPERM",
        "default deny once enforced"
    );
    let g2 = node.apply(&redirect_8080(&node).unwrap()).unwrap();
    assert_eq!(g2, g1 + 1);
    assert_eq!(node.curl(Some("client"), "http://127.0.0.1:8080/", &[]).unwrap().0, 0);
    let maps = node.maps().unwrap();
    assert_eq!(maps.entry_counts(g1), (0, 0, 0), "the old generation's entries are gone");
    let (eps, _, rules) = maps.entry_counts(g2);
    assert_eq!((eps, rules), (1, 1));
}

#[test]
fn listeners_that_existed_before_the_proxy_are_seeded() {
    let mut node = TestNode::new("seed").unwrap();
    // No programs attached yet: post_bind cannot see this bind.
    node.http_server(Some("server"), "127.0.0.1", 8088, "early\n").unwrap();
    node.start_proxy(&[]).unwrap();
    let server = node.cgroup_id("server").unwrap();
    let listeners = node.maps().unwrap().listeners();
    assert!(
        listeners.iter().any(|l| l.cgroup_id == server && l.addr == "127.0.0.1:8088".parse().unwrap()),
        "{listeners:?}"
    );
}

#[test]
fn clean_stop_with_uninstall_removes_every_attachment() {
    let mut node = TestNode::new("uninstall").unwrap();
    node.start_proxy(&["--uninstall-on-exit"]).unwrap();
    node.http_server(None, "127.0.0.1", 8080, "after\n").unwrap();
    node.apply(&redirect_8080(&node).unwrap()).unwrap();
    let status = node.stop_proxy().unwrap();
    assert!(status.success());
    assert!(!node.pin_dir.exists(), "pins removed");
    assert!(node.proxy_log().contains("enforcement stopped"));
    // Nothing intercepts any more.
    assert_eq!(node.curl(Some("client"), "http://127.0.0.1:8080/", &[]).unwrap(), (0, "after\n".to_string()));
}

#[test]
fn without_the_short_circuit_bytes_take_the_loopback_path() {
    let mut node = TestNode::new("nosk").unwrap();
    node.start_proxy(&["--no-sk-msg"]).unwrap();
    node.http_server(None, "127.0.0.1", 8080, "the long way\n").unwrap();
    node.apply(&redirect_8080(&node).unwrap()).unwrap();
    assert_eq!(node.curl(Some("client"), "http://127.0.0.1:8080/", &[]).unwrap(), (0, "the long way\n".to_string()));
    let counters = node.counters().unwrap();
    assert_eq!(counters.get(redirector::CounterKind::Redirected), 1);
    assert_eq!(counters.get(redirector::CounterKind::SockhashInserts), 0, "{counters:?}");
    assert_eq!(counters.get(redirector::CounterKind::SkMsgRedirects), 0, "{counters:?}");
}

#[test]
fn a_listener_is_forgotten_when_its_socket_closes() {
    let mut node = TestNode::new("release").unwrap();
    node.start_proxy(&[]).unwrap();
    // The probe's copy in the node's directory: the workload's view hides the source tree
    // when it lies under /tmp.
    let probe = node.probe_path();
    node.spawn(Some("server"), &["python3", probe.to_str().unwrap(), "listen", "127.0.0.1", "8097", "1"], "listen.log")
        .unwrap();
    let server = node.cgroup_id("server").unwrap();
    let has = |node: &TestNode| {
        node.maps().unwrap().listeners().iter().any(|l| l.cgroup_id == server && l.addr.port() == 8097)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !has(&node) {
        assert!(
            std::time::Instant::now() < deadline,
            "post_bind never recorded the listener: {}",
            node.log("listen.log")
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while has(&node) {
        assert!(std::time::Instant::now() < deadline, "sock_release never removed the listener");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn l7proxy_refuses_to_start_without_root_and_says_why() {
    require_root();
    let bin = workspace_bin("l7proxy").unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"])
        .arg(bin)
        .arg("--pin-dir")
        .arg("/sys/fs/bpf/l7mesh-test-never")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("must run as root") && stderr.contains("CAP_BPF"), "{stderr}");
}

#[test]
fn ipv6_ingress_from_a_peer_host_reaches_a_dual_stack_workload_through_the_proxy() {
    let mut node = TestNode::new("ingress6").unwrap();
    let peer = node.add_peer_host(43).unwrap();
    node.start_proxy(&[]).unwrap();
    node.http_server(Some("server"), "::", 8080, "dual stack\n").unwrap();
    node.http_server(Some("server"), "::", 8081, "not allowed\n").unwrap();
    let server = node.cgroup_id("server").unwrap();
    node.apply(&PolicySnapshot {
        endpoints: vec![endpoint(server, SERVER_ID, SERVER_IDENTITY, false, true)],
        ipcache: vec![],
        rules: vec![rule(
            SERVER_ID,
            Direction::Ingress,
            Protocol::Tcp,
            identity::ANY,
            (8080, 8080),
            Action::Redirect(ProtocolHint::Http),
            POLICY_L7,
        )],
    })
    .unwrap();
    for url in ["http://[fd00:231:43::1]:8080/", "http://10.231.43.1:8080/"] {
        let out = node.run_on_peer(&peer, &["curl", "-sS", "--max-time", "10", url]).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "dual stack\n",
            "{url}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            node.proxy_log()
        );
    }
    let flows = proxy_flows(&node);
    assert!(flows.iter().any(|f| f["direction"] == "INGRESS" && f["source"]["ip"] == "fd00:231:43::2"), "{flows:#?}");
    assert_eq!(node.counters().unwrap().get(redirector::CounterKind::IngressRedirected), 2);
    // A listening workload port that ingress policy does not allow: refused by sk_lookup.
    assert_eq!(node.probe_from_peer(&peer, &["tcp-connect", "fd00:231:43::1", "8081"]).unwrap(), "ECONNREFUSED");
    assert!(node.counters().unwrap().get(redirector::CounterKind::Denied) >= 1);
}

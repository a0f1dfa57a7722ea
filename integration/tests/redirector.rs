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
        rules: vec![rule(CLIENT_ID, Direction::Egress, Protocol::Tcp, identity::ANY, (8080, 8080), Action::Redirect(ProtocolHint::Http), POLICY_L7)],
    })
}

fn proxy_flows(node: &TestNode) -> Vec<serde_json::Value> {
    node.flows().unwrap().into_iter().filter(|f| f["observer"] == "proxy").collect()
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
    // The upstream leg left from the proxy's dedicated source, and the server saw that.
    assert!(f["proxy"]["upstream"].as_str().unwrap().starts_with("127.0.0.6:"), "{f}");
    assert!(node.log("http-8080-127_0_0_1.log").contains("127.0.0.6"), "server log: {}", node.log("http-8080-127_0_0_1.log"));

    let counters = node.counters().unwrap();
    assert_eq!(counters.get(redirector::CounterKind::Redirected), 1);
    assert!(counters.get(redirector::CounterKind::SkMsgRedirects) > 0, "sk_msg short-circuit not taken: {counters:?}");
}

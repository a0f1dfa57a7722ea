//! "Why was this denied?": real curl through a real node, and the flows it records name the
//! deciding side (direction), policy rule (decided_by) and reason, for an ingress-enforced
//! server and an egress-enforced client, in the proxy and in the kernel; `l7ctl explain` says
//! it in words, and `l7ctl observe | head` ends quietly.

use std::process::Stdio;

use integration::*;
use l7mesh_api::flow::{Flow, PolicyReason, Reason};
use l7mesh_api::{Direction, Verdict};

/// The server's ingress allows GET / and /admin from the client; the client's egress allows
/// GET / and /other to the server: /admin is the client's egress to deny, /other the server's
/// ingress. An intruder is denied by an ingressDeny rule, a stranger by the server's default
/// deny, and the client's connect to another port by its own egress default deny.
const POLICIES: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: intruder}}]
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
      rules:
        http:
        - {method: GET, path: /}
        - {method: GET, path: /admin}
  - fromEndpoints: [{matchLabels: {app: intruder}}]
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client-out}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {app: server}}]
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
      rules:
        http:
        - {method: GET, path: /}
        - {method: GET, path: /other}
  - toEndpoints: [{matchLabels: {app: server}}]
    toPorts:
    - ports: [{port: "8081", protocol: TCP}]
"#;

fn curl(node: &TestNode, name: &str, labels: &str, url: &str) -> (i32, String) {
    let o = node
        .l7ctl_run(name, labels, &["curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}", url])
        .unwrap();
    (o.status.code().unwrap_or(-1), stdout(&o))
}

fn flows(node: &TestNode) -> Vec<Flow> {
    node.flows()
        .unwrap()
        .into_iter()
        .map(|v| serde_json::from_value(v).expect("every flow line reads as a Flow"))
        .collect()
}

fn http_path(f: &Flow) -> Option<&str> {
    match &f.l7 {
        Some(l7mesh_api::flow::L7Part::Http { http }) => http.url.split_once("8080").map(|(_, p)| p),
        _ => None,
    }
}

fn wait_for(node: &TestNode, what: &str, pick: impl Fn(&Flow) -> bool) -> Flow {
    for _ in 0..100 {
        if let Some(f) = flows(node).into_iter().find(&pick) {
            return f;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("no flow for {what}: {:#?}\n{}", node.flows().unwrap(), node.node_log());
}

#[test]
fn denials_name_their_side_rule_and_reason() {
    let mut node = TestNode::new("explain").unwrap();
    let policy = node.policy_file("policies.yaml", POLICIES).unwrap();
    node.start_node(&policy, &[]).unwrap();
    node.http_workload("server", "app=server", "127.0.0.1", 8080, "hello\n").unwrap();
    node.http_workload("other", "app=other", "127.0.0.1", 9091, "other\n").unwrap();
    node.http_workload("server2", "app=server", "127.0.0.1", 8081, "two\n").unwrap();
    let client = "app=client";

    assert_eq!(curl(&node, "client", client, "http://127.0.0.1:8080/"), (0, "200".into()));
    assert_eq!(curl(&node, "client", client, "http://127.0.0.1:8080/admin"), (0, "403".into()));
    assert_eq!(curl(&node, "client", client, "http://127.0.0.1:8080/other"), (0, "403".into()));
    assert_eq!(curl(&node, "client", client, "http://127.0.0.1:9091/").0, 7, "the client's egress default deny");
    assert_eq!(curl(&node, "stranger", "app=stranger", "http://127.0.0.1:8080/").0, 7, "server's default deny");
    assert_eq!(curl(&node, "client", client, "http://127.0.0.1:8081/").0, 7, "egress allows, ingress denies");
    assert_eq!(curl(&node, "intruder", "app=intruder", "http://127.0.0.1:8080/").0, 7, "ingressDeny wins");

    // Allowed by both sides on one proxy hop: the server's ingress judged last.
    let ok = wait_for(&node, "GET /", |f| http_path(f) == Some("/"));
    assert_eq!((ok.verdict, ok.direction), (Verdict::Allowed, Direction::Ingress));
    assert!(ok.decided_by.is_none() && ok.reason.is_none());

    // The client's egress rules deny /admin: EGRESS, its rule list, the path it missed.
    let admin = wait_for(&node, "GET /admin", |f| http_path(f) == Some("/admin"));
    assert_eq!((admin.verdict, admin.direction), (Verdict::Denied, Direction::Egress));
    let by = admin.decided_by.as_ref().unwrap();
    assert_eq!((by.policy.as_str(), by.rule.as_str()), ("default/client-out", "egress[0].toPorts[0].rules.http"));
    assert_eq!(
        admin.reason.as_ref().unwrap().to_string(),
        "no rule matched path /admin (rules allow GET /; GET /other)"
    );

    // The server's ingress rules deny /other (the client's egress allowed it): INGRESS.
    let other = wait_for(&node, "GET /other", |f| http_path(f) == Some("/other"));
    assert_eq!((other.verdict, other.direction), (Verdict::Denied, Direction::Ingress));
    let by = other.decided_by.as_ref().unwrap();
    assert_eq!((by.policy.as_str(), by.rule.as_str()), ("default/web", "ingress[0].toPorts[0].rules.http"));
    assert_eq!(
        other.reason.as_ref().unwrap().to_string(),
        "no rule matched path /other (rules allow GET /; GET /admin)"
    );

    // Kernel verdicts: the rule id the kernel reported, read back.
    let kernel = |who: &'static str, port: u16| {
        wait_for(&node, who, move |f| {
            f.observer.starts_with("kernel")
                && f.verdict == Verdict::Denied
                && f.source.workload.as_deref() == Some(who)
                && f.destination.port == port
        })
    };
    let stranger = kernel("stranger", 8080);
    assert_eq!(stranger.direction, Direction::Ingress, "the server's ingress decided, at the stranger's connect");
    assert_eq!(stranger.decided_by.as_ref().map(|d| (d.policy.as_str(), d.rule.as_str())), Some(("default/web", "")));
    assert_eq!(
        stranger.reason,
        Some(Reason::Policy(PolicyReason::DefaultDeny {
            workload: "server".into(),
            direction: Direction::Ingress,
            enforced_by: vec!["default/web".into()],
            peer: "stranger".into(),
        }))
    );
    assert_eq!(stranger.policy_name.as_deref(), Some("default/web"));
    // The client's egress allows 8081 (the kernel reports that rule's id), server2's ingress
    // has no rule for it: the server's side decided, and the flow says so.
    let behind_allow = kernel("client", 8081);
    assert_eq!(behind_allow.direction, Direction::Ingress);
    assert_eq!(behind_allow.policy_name.as_deref(), Some("default/web"), "not the egress allow's policy");
    assert_eq!(
        behind_allow.reason.as_ref().unwrap().to_string(),
        "default deny: server2 is ingress-enforced by default/web, no rule allows client"
    );
    let intruder = kernel("intruder", 8080);
    assert_eq!(intruder.direction, Direction::Ingress);
    assert_eq!(intruder.decided_by.as_ref().map(|d| d.rule.as_str()), Some("ingressDeny[0]"));
    assert_eq!(intruder.reason, Some(Reason::Policy(PolicyReason::DenyRule { peer: "intruder".into() })));
    let egress = kernel("client", 9091);
    assert_eq!(egress.direction, Direction::Egress, "the client's own egress default deny");
    assert_eq!(
        egress.reason.as_ref().unwrap().to_string(),
        "default deny: client is egress-enforced by default/client-out, no rule allows other"
    );

    // In words, through policy-api.
    let explained = node.l7ctl_ok(&["explain"]);
    let line = explained.lines().find(|l| l.contains(":8080 GET /other ")).unwrap_or_else(|| panic!("{explained}"));
    assert_eq!(
        line,
        "DENIED  client -> server:8080 GET /other  by policy default/web ingress[0].toPorts[0].rules.http \
         (ingress, proxy): no rule matched path /other (rules allow GET /; GET /admin)"
    );
    assert!(
        explained
            .contains("stranger -> server:8080 tcp connect  by policy default/web (ingress, kernel): default deny"),
        "{explained}"
    );
    assert!(explained.lines().all(|l| l.starts_with("DENIED") || l.starts_with("AUDIT")), "{explained}");

    // A reader that stops early: l7ctl ends quietly, with success. (More flows than a pipe
    // holds, so l7ctl is still writing when the reader goes.)
    let urls: Vec<String> = (0..250).map(|i| format!("http://127.0.0.1:8080/?n={i}")).collect();
    let mut cmd = vec!["curl", "-sS", "--max-time", "30"];
    cmd.extend(urls.iter().map(String::as_str));
    assert!(node.l7ctl_run("client", client, &cmd).unwrap().status.success());
    let json = node.l7ctl(&["observe", "-o", "json"]).unwrap();
    assert!(json.stdout.len() > 128 * 1024, "{} bytes only", json.stdout.len());
    let mut cmd = node.l7ctl_command(&["observe", "-o", "json"]).unwrap();
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 16];
    std::io::Read::read_exact(&mut stdout, &mut first).unwrap();
    drop(stdout);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}: {err}", out.status);
    assert!(!err.contains("panicked") && !err.contains("Broken pipe"), "{err}");
}

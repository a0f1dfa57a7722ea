//! The kernel and its userspace model agree: one policy snapshot covering allow, deny, default
//! deny, audit, port ranges, CIDR identities, UDP and egress+ingress combinations is put in the
//! real redirector, real connections are made, and what the kernel did (refused, redirected to
//! the proxy, or let through) is compared with `redirector_policy`'s fold (`PolicySnapshot::judge`,
//! which re-judging and simulation use).

use std::net::{IpAddr, SocketAddr};

use integration::*;
use redirector::policy::{Connection, Decision};
use redirector::CounterKind;

const CLIENT: (u32, u32) = (1, 1001);
const SERVER: (u32, u32) = (2, 1002);
const STRANGER: (u32, u32) = (3, 1003);
/// CIDR identities: 127.0.0.16/28, and 127.0.0.20/32 inside it.
const CIDR_WIDE: u32 = 5000;
const CIDR_NARROW: u32 = 5001;
/// Ports the server workload listens on (its ingress is enforced).
const SERVER_PORTS: [u16; 6] = [7200, 7201, 7202, 7203, 7204, 7205];

fn snapshot(node: &TestNode) -> anyhow::Result<PolicySnapshot> {
    use Action::*;
    use Direction::*;
    use Protocol::*;
    let (c, s, x) = (CLIENT.0, SERVER.0, STRANGER.0);
    let any = identity::ANY;
    let mut audited = rule(c, Egress, Tcp, any, (7140, 7140), Deny, 14);
    audited.verdict.audit = true;
    Ok(PolicySnapshot {
        endpoints: vec![
            endpoint(node.cgroup_id("client")?, c, CLIENT.1, true, false),
            endpoint(node.cgroup_id("server")?, s, SERVER.1, false, true),
            endpoint(node.cgroup_id("stranger")?, x, STRANGER.1, false, false),
        ],
        ipcache: vec![("127.0.0.16/28".parse()?, CIDR_WIDE), ("127.0.0.20/32".parse()?, CIDR_NARROW)],
        rules: vec![
            // The client's egress (default deny).
            rule(c, Egress, Tcp, any, (7100, 7100), Allow, 10),
            rule(c, Egress, Tcp, any, (7101, 7110), Allow, 11),
            rule(c, Egress, Tcp, any, (7105, 7105), Deny, 12),
            rule(c, Egress, Tcp, any, (7130, 7133), Redirect(ProtocolHint::Http), 13),
            rule(c, Egress, Tcp, any, (7131, 7132), Allow, 15),
            rule(c, Egress, Tcp, any, (7132, 7133), Deny, 16),
            audited,
            rule(c, Egress, Tcp, any, (7140, 7141), Allow, 17),
            rule(c, Egress, Tcp, CIDR_WIDE, (7150, 7150), Allow, 20),
            rule(c, Egress, Tcp, CIDR_NARROW, (7150, 7150), Deny, 21),
            rule(c, Egress, Tcp, any, (7170, 7170), Allow, 22),
            rule(c, Egress, Tcp, CIDR_WIDE, (7170, 7170), Deny, 23),
            rule(c, Egress, Tcp, SERVER.1, (7200, 7205), Allow, 30),
            rule(c, Egress, Tcp, SERVER.1, (7201, 7201), Redirect(ProtocolHint::Http), 31),
            rule(c, Egress, Tcp, any, (7204, 7204), Deny, 32),
            rule(c, Egress, Udp, any, (7300, 7300), Deny, 40),
            rule(c, Egress, Udp, any, (7302, 7310), Allow, 41),
            // The server's ingress (default deny).
            rule(s, Ingress, Tcp, CLIENT.1, (7200, 7200), Allow, 50),
            rule(s, Ingress, Tcp, any, (7201, 7201), Allow, 51),
            rule(s, Ingress, Tcp, STRANGER.1, (7201, 7201), Deny, 52),
            rule(s, Ingress, Tcp, any, (7202, 7202), Redirect(ProtocolHint::Http), 53),
            rule(s, Ingress, Tcp, any, (7204, 7204), Allow, 54),
            rule(s, Ingress, Tcp, CLIENT.1, (7204, 7205), Allow, 55),
            // The stranger's egress is not enforced: only a deny counts.
            rule(x, Egress, Tcp, any, (7110, 7110), Deny, 60),
            rule(x, Egress, Tcp, SERVER.1, (7202, 7202), Deny, 61),
        ],
    })
}

/// What the model says of `from` (a workload, or a node process outside the workloads, whose
/// connection sk_lookup judges by its address: `host`) connecting to `dst`.
fn model(snap: &PolicySnapshot, node: &TestNode, from: Option<&str>, protocol: Protocol, dst: SocketAddr) -> Decision {
    let endpoint_of = |name: &str| {
        let cgroup = node.cgroup_id(name).unwrap();
        snap.endpoints.iter().find(|e| e.cgroup_id == cgroup).unwrap()
    };
    let src = from.map(endpoint_of);
    let mut dst_identity = snap.identity_of(dst.ip());
    let mut dst_endpoint = None;
    // The kernel's local-listener step: a `host` destination a workload listens on is that workload.
    if dst_identity == identity::HOST && protocol == Protocol::Tcp && SERVER_PORTS.contains(&dst.port()) {
        let server = endpoint_of("server");
        dst_identity = server.identity;
        dst_endpoint = Some(server);
    }
    let src_identity = src.map(|e| e.identity).unwrap_or(identity::HOST);
    let conn = Connection { src, dst: dst_endpoint, protocol, src_identity, dst_identity, port: dst.port() };
    snap.judge(&conn).decision()
}

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Refused,
    Redirected,
    /// Let through, and counted as an audited deny.
    Audited,
    Passed,
}

fn expected(d: Decision) -> Outcome {
    match d {
        Decision::Deny { .. } => Outcome::Refused,
        Decision::Redirect(_) => Outcome::Redirected,
        Decision::Audit => Outcome::Audited,
        Decision::Allow => Outcome::Passed,
    }
}

/// What the kernel did with one real connection (or datagram): refused at connect (EPERM) or
/// dropped by sk_lookup (counted as denied; the client sees a reset), redirected to the proxy
/// (counted), let through as an audited deny (counted), or let through (connected, or refused
/// by no listener).
fn observed(node: &TestNode, from: Option<&str>, protocol: Protocol, dst: SocketAddr) -> Outcome {
    let counts = |node: &TestNode| {
        let c = node.counters().unwrap();
        (
            c.get(CounterKind::Denied),
            c.get(CounterKind::Redirected) + c.get(CounterKind::IngressRedirected),
            c.get(CounterKind::Audited),
        )
    };
    let (denied_before, redirected_before, audited_before) = counts(node);
    let cmd = if protocol == Protocol::Tcp { "tcp-connect" } else { "udp-sendto" };
    let answer = node.probe(from, &[cmd, &dst.ip().to_string(), &dst.port().to_string()]).unwrap();
    let (denied, redirected, audited) = counts(node);
    let (denied, redirected, audited) =
        (denied > denied_before, redirected > redirected_before, audited > audited_before);
    assert!(
        matches!(answer.as_str(), "ok" | "EPERM" | "ECONNREFUSED"),
        "{from:?} -> {dst} ({protocol:?}): unexpected probe answer {answer}"
    );
    assert!(!(denied && redirected), "{from:?} -> {dst}: denied and redirected");
    if answer == "EPERM" || denied {
        Outcome::Refused
    } else if redirected {
        Outcome::Redirected
    } else if audited {
        Outcome::Audited
    } else {
        Outcome::Passed
    }
}

#[test]
fn the_kernel_decides_every_connection_as_the_userspace_fold_does() {
    let mut node = TestNode::new("kmodel").unwrap();
    node.start_proxy(&[]).unwrap();
    let probe = node.probe_path();
    for port in SERVER_PORTS {
        let port = port.to_string();
        node.spawn(
            Some("server"),
            &["python3", probe.to_str().unwrap(), "listen", "127.0.0.1", &port, "300"],
            &format!("listen-{port}.log"),
        )
        .unwrap();
    }
    let server = node.cgroup_id("server").unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let listeners = node.maps().unwrap().listeners();
        let learned =
            SERVER_PORTS.iter().all(|p| listeners.iter().any(|l| l.cgroup_id == server && l.addr.port() == *p));
        if learned {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "post_bind never recorded the listeners: {listeners:?}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let snap = snapshot(&node).unwrap();
    node.apply(&snap).unwrap();

    let lo: IpAddr = "127.0.0.1".parse().unwrap();
    let at = |ip: &str, port: u16| SocketAddr::new(ip.parse().unwrap(), port);
    let tcp = Protocol::Tcp;
    let cases: Vec<(Option<&str>, Protocol, SocketAddr)> = vec![
        // Egress: allow, a range with a deny inside, default deny.
        (Some("client"), tcp, SocketAddr::new(lo, 7100)),
        (Some("client"), tcp, SocketAddr::new(lo, 7101)),
        (Some("client"), tcp, SocketAddr::new(lo, 7104)),
        (Some("client"), tcp, SocketAddr::new(lo, 7105)),
        (Some("client"), tcp, SocketAddr::new(lo, 7110)),
        (Some("client"), tcp, SocketAddr::new(lo, 7111)),
        (Some("client"), tcp, SocketAddr::new(lo, 7160)),
        // Redirect; redirect over allow; deny over redirect and allow; audited deny.
        (Some("client"), tcp, SocketAddr::new(lo, 7130)),
        (Some("client"), tcp, SocketAddr::new(lo, 7131)),
        (Some("client"), tcp, SocketAddr::new(lo, 7132)),
        (Some("client"), tcp, SocketAddr::new(lo, 7133)),
        (Some("client"), tcp, SocketAddr::new(lo, 7140)),
        (Some("client"), tcp, SocketAddr::new(lo, 7141)),
        // CIDR identities: the longest prefix decides; outside them, loopback is `host`.
        (Some("client"), tcp, at("127.0.0.17", 7150)),
        (Some("client"), tcp, at("127.0.0.20", 7150)),
        (Some("client"), tcp, at("127.0.0.30", 7150)),
        (Some("client"), tcp, at("127.0.0.40", 7150)),
        (Some("client"), tcp, at("127.0.0.17", 7170)),
        (Some("client"), tcp, at("127.0.0.20", 7170)),
        (Some("client"), tcp, SocketAddr::new(lo, 7170)),
        // UDP.
        (Some("client"), Protocol::Udp, SocketAddr::new(lo, 7300)),
        (Some("client"), Protocol::Udp, SocketAddr::new(lo, 7301)),
        (Some("client"), Protocol::Udp, SocketAddr::new(lo, 7305)),
        // Egress and ingress together: the client to the server's listeners.
        (Some("client"), tcp, SocketAddr::new(lo, 7200)),
        (Some("client"), tcp, SocketAddr::new(lo, 7201)),
        (Some("client"), tcp, SocketAddr::new(lo, 7202)),
        (Some("client"), tcp, SocketAddr::new(lo, 7203)),
        (Some("client"), tcp, SocketAddr::new(lo, 7204)),
        (Some("client"), tcp, SocketAddr::new(lo, 7205)),
        // A workload whose egress is not enforced (its deny beats the server's redirect), and a
        // node process (`host`): ingress alone.
        (Some("stranger"), tcp, SocketAddr::new(lo, 7200)),
        (Some("stranger"), tcp, SocketAddr::new(lo, 7201)),
        (Some("stranger"), tcp, SocketAddr::new(lo, 7202)),
        (Some("stranger"), tcp, SocketAddr::new(lo, 7203)),
        (Some("stranger"), tcp, SocketAddr::new(lo, 7205)),
        (Some("stranger"), tcp, SocketAddr::new(lo, 7110)),
        (Some("stranger"), tcp, SocketAddr::new(lo, 7111)),
        (None, tcp, SocketAddr::new(lo, 7200)),
        (None, tcp, SocketAddr::new(lo, 7201)),
        (None, tcp, SocketAddr::new(lo, 7202)),
    ];
    let mut disagreements = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for (from, protocol, dst) in &cases {
        let decision = model(&snap, &node, *from, *protocol, *dst);
        let want = expected(decision);
        let got = observed(&node, *from, *protocol, *dst);
        seen.insert(format!("{want:?}"));
        if got != want {
            disagreements.push(format!("{from:?} -> {dst} ({protocol:?}): kernel {got:?}, fold {decision:?}"));
        }
    }
    assert!(disagreements.is_empty(), "the kernel and the fold disagree:\n{}", disagreements.join("\n"));
    // The cases exercise every outcome (a snapshot that refused everything would agree too).
    assert_eq!(seen.len(), 4, "{seen:?}");
}

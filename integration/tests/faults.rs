//! Faults under load: l7proxy, tls-broker, policy-api and last `l7ctl up` itself are each
//! killed with SIGKILL, in turn,
//! while traffic flows through one node: HTTP/1.1 through the proxy (nginx), HTTP over TLS the
//! proxy terminates (a certificate minted by the broker for the SNI), Kafka produce with
//! acks=all and a tailing consumer (Apache Kafka, confluent-kafka), and beside them one
//! long-lived L4-only connection the kernel allows without redirecting (an echo server).
//! For each kill: what the clients saw (README "Failure behaviour" documents it), that a denied
//! request was never served, that the L4 connection never noticed, that `l7ctl up` restarted
//! the process (or, killed itself, left no process behind while the datapath enforced alone,
//! and the next `up` resumed) and the node serves with the policy in force, and, at the end, that every
//! acknowledged Kafka produce is read back by a fresh consumer. One node, one JVM broker.

use std::collections::BTreeMap;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use integration::*;

/// The client (app=client): GET /public/.* on nginx's HTTP/1.1 port 8444 and on 8462 (TLS
/// terminated by the proxy, a certificate minted for the SNI); 7000 (the echo server) at L4
/// only. The broker (app=kafka): produce and consume of `acked` for app=producer, everything
/// for app=admin (sets up), its own controller listener at L4.
const CLIENT_POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: client
spec:
  endpointSelector:
    matchLabels:
      app: client
  egress:
  - toEntities: [host]
    toPorts:
    - ports:
      - port: "8444"
        protocol: TCP
      rules:
        http:
        - method: GET
          path: "/public/.*"
  - toEntities: [host]
    toPorts:
    - ports:
      - port: "8462"
        protocol: TCP
      terminatingTLS: {}
      rules:
        http:
        - method: GET
          path: "/public/.*"
  - toEntities: [host]
    toPorts:
    - ports:
      - port: "7000"
        protocol: TCP
"#;

fn policy() -> String {
    let kafka = kafka_policy(
        "kafka",
        "kafka",
        &[
            kafka_from("producer", 9092, &["role: produce, topic: acked", "role: consume, topic: acked"]),
            kafka_from("admin", 9092, &[]),
            KAFKA_CONTROLLER_INGRESS.to_string(),
        ],
    );
    format!("{CLIENT_POLICY}---\n{kafka}")
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// One run of equal outcomes of one stream: [first time, last time, kind, outcome, count].
#[derive(Debug, Clone)]
struct Run(f64, f64, String, String, u64);

fn runs_of(v: &serde_json::Value) -> Vec<Run> {
    let runs = v.as_array().unwrap_or_else(|| panic!("no runs: {v}"));
    runs.iter()
        .map(|r| {
            let s = |i: usize| r[i].as_str().unwrap_or_default().to_string();
            Run(r[0].as_f64().unwrap(), r[1].as_f64().unwrap(), s(2), s(3), r[4].as_u64().unwrap())
        })
        .collect()
}

/// What one stream saw from `from` to `to`: outcome -> count, for path kind `kind`.
fn seen(runs: &[Run], kind: &str, from: f64, to: f64) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for r in runs.iter().filter(|r| r.2 == kind && r.1 >= from && r.0 < to) {
        *m.entry(r.3.clone()).or_insert(0) += r.4;
    }
    m
}

/// When `kind` last failed in [from, to) and when it was next answered `ok` (None: it never
/// failed there).
fn outage(runs: &[Run], kind: &str, ok: &str, from: f64, to: f64) -> Option<(f64, f64, f64)> {
    let rs: Vec<&Run> = runs.iter().filter(|r| r.2 == kind && r.1 >= from && r.0 < to).collect();
    let first_fail = rs.iter().find(|r| r.3 != ok)?.0;
    let last_fail = rs.iter().rev().find(|r| r.3 != ok)?.1;
    let back = rs.iter().find(|r| r.3 == ok && r.0 > last_fail).map(|r| r.0).unwrap_or(f64::NAN);
    Some((first_fail, last_fail, back))
}

struct Producer(Child);

impl Drop for Producer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn killing_each_process_and_l7ctl_up_under_load_loses_no_ack_and_recovers_with_the_policy() {
    let mut node = kafka_node("faults", 57, &[], &policy(), Broker::Apache).unwrap();
    let d = node.log_dir.clone();
    let conf = d.join("nginx.conf");
    std::fs::write(
        &conf,
        nginx_config(
            &d,
            "  server { listen 127.0.0.1:8444; location / { return 200 \"plain\\n\"; } }\n  server { listen 127.0.0.1:8462; location / { return 200 \"behind tls\\n\"; } }\n",
        ),
    )
    .unwrap();
    node.spawn(None, &["nginx", "-c", conf.to_str().unwrap()], "nginx.log").unwrap();
    let load = node.copy_script("fault_load.py").unwrap();
    node.spawn(None, &["/usr/bin/python3", "-u", &load, "echo-server", "7000"], "echo.log").unwrap();
    for port in ["8444", "8462", "7000"] {
        node.probe(None, &["wait-tcp", "127.0.0.1", port, "15"]).unwrap();
    }
    let created = node.kadmin("admin", "app=admin", &["create:acked"]).unwrap();
    assert_eq!(created, ["create acked=OK"]);
    let ca = node.l7ctl(&["ca", "--run-dir", &node.run_dir().display().to_string()]).unwrap();
    assert!(out(&ca).starts_with("-----BEGIN CERTIFICATE-----"), "{}", String::from_utf8_lossy(&ca.stderr));
    let ca_file = d.join("mesh-ca.pem");
    std::fs::write(&ca_file, out(&ca)).unwrap();

    check(&node, &ca_file, "before the faults");

    // The traffic: HTTP/1.1, TLS, the L4 connection (one workload), and Kafka (another).
    let traffic = node.shared_dir("traffic").unwrap();
    let specs = [
        "h1=h1:127.0.0.1:8444:/public/a:/private/a".to_string(),
        format!("tls=tls:127.0.0.1:8462:/public/a:/private/a:web.mesh.local:{}", ca_file.display()),
        "l4=l4:127.0.0.1:7000".to_string(),
    ];
    let mut cmd = vec!["/usr/bin/python3", "-u", &load, traffic.to_str().unwrap()];
    cmd.extend(specs.iter().map(String::as_str));
    node.spawn_l7ctl_run("client", "app=client", &cmd, "traffic.log").unwrap();
    let deadline = Instant::now() + Duration::from_secs(40);
    while !traffic.join("ready").exists() {
        assert!(Instant::now() < deadline, "traffic not flowing: {}", node.log("traffic.log"));
        std::thread::sleep(Duration::from_millis(50));
    }
    let ready = std::fs::read_to_string(traffic.join("ready")).unwrap();
    assert_eq!(ready, r#"{"h1": true, "tls": true, "l4": true}"#, "{}", node.log("traffic.log"));
    let acked = copy_acked_script(&node);
    let stop_kafka = traffic.join("stop-kafka");
    let t_producer = now();
    let producer = node
        .l7ctl_run_command(
            "producer",
            "app=producer",
            &[PEERS_PY, &acked, "127.0.0.1:9092", "acked", "100", "600", stop_kafka.to_str().unwrap()],
        )
        .unwrap()
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(d.join("producer.err")).unwrap())
        .spawn()
        .unwrap();
    let mut producer = Producer(producer);
    std::thread::sleep(Duration::from_secs(3));

    // Kill each in turn; `l7ctl up` restarts it.
    let mut kills: Vec<(&str, f64, Duration)> = Vec::new();
    let mut while_stopped = Vec::new();
    for name in ["l7proxy", "tls-broker", "policy-api", "l7ctl up"] {
        std::thread::sleep(Duration::from_secs(3));
        let (t_kill, started) = (now(), Instant::now());
        if name == "l7ctl up" {
            // Last, `l7ctl up` itself: its three processes end with it (the kernel sends them
            // SIGTERM), the pinned datapath keeps enforcing alone, and the next `up` resumes.
            node.kill_node().unwrap();
            let left = node.wait_until_no_node_process(Duration::from_secs(15));
            assert_eq!(left, vec![], "processes of the killed `l7ctl up` linger");
            let connect = |port: &str| node.probe(Some("client"), &["tcp-connect", "127.0.0.1", port]).unwrap();
            while_stopped = vec![connect("8444"), connect("8463")];
            node.restart_node().unwrap();
        } else {
            let pid = pid_of(&node, name).unwrap_or_else(|| panic!("{name} is not running"));
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
            // Restarted by `l7ctl up`: a new pid.
            let deadline = Instant::now() + Duration::from_secs(30);
            while pid_of(&node, name).is_none_or(|p| p == pid) {
                assert!(Instant::now() < deadline, "{name} was not restarted within 30 s: {}", node.node_log());
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // And ready.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = match name {
                "l7proxy" | "l7ctl up" => node.admin("/readyz").is_ok_and(|r| r.starts_with("ready")),
                "policy-api" => node.l7ctl(&["get", "policies"]).is_ok_and(|o| o.status.success()),
                _ => node.run_dir().join("broker-proxy.sock").exists(),
            };
            if ready {
                break;
            }
            assert!(Instant::now() < deadline, "{name} not ready again within 30 s: {}", node.node_log());
            std::thread::sleep(Duration::from_millis(20));
        }
        let restarted = started.elapsed();
        eprintln!("{name}: killed, back and ready after {:.0} ms", restarted.as_secs_f64() * 1e3);
        kills.push((name, t_kill, restarted));
        std::thread::sleep(Duration::from_secs(3));
        check(&node, &ca_file, &format!("after {name} was killed and back"));
    }
    std::thread::sleep(Duration::from_secs(2));
    let t_end = now();

    // Stop the traffic and read what it saw.
    std::fs::write(traffic.join("stop"), "").unwrap();
    std::fs::write(&stop_kafka, "").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !traffic.join("result.json").exists() {
        assert!(Instant::now() < deadline, "no traffic result: {}", node.log("traffic.log"));
        std::thread::sleep(Duration::from_millis(50));
    }
    let result: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(traffic.join("result.json")).unwrap()).unwrap();
    let runs = |name: &str| runs_of(&result[name]["runs"]);
    let mut kafka_out = String::new();
    use std::io::Read as _;
    producer.0.stdout.take().unwrap().read_to_string(&mut kafka_out).unwrap();
    let status = producer.0.wait().unwrap();
    let kafka: serde_json::Value = serde_json::from_str(kafka_out.trim().lines().last().unwrap_or("{}"))
        .unwrap_or_else(|e| panic!("{e}: {kafka_out} {}", node.log("producer.err")));

    // The report (docs/FAULTS.md is written from it).
    let mut report = String::new();
    for (i, (name, t_kill, restarted)) in kills.iter().enumerate() {
        let to = kills.get(i + 1).map(|k| k.1).unwrap_or(t_end);
        let _ = std::fmt::Write::write_fmt(
            &mut report,
            format_args!(
                "{name}: killed {:.1} s after the producer started; restarted and ready after {:.0} ms\n",
                t_kill - t_producer,
                restarted.as_secs_f64() * 1e3
            ),
        );
        for stream in ["h1", "tls"] {
            let r = runs(stream);
            for kind in ["allowed", "denied"] {
                let ok = if kind == "allowed" { "200" } else { "403" };
                let gap = outage(&r, kind, ok, *t_kill - 0.5, to)
                    .map(|(f, l, b)| {
                        format!(
                            "; failures from {:+.0} ms to {:+.0} ms, {ok} again at {:+.0} ms",
                            (f - t_kill) * 1e3,
                            (l - t_kill) * 1e3,
                            (b - t_kill) * 1e3
                        )
                    })
                    .unwrap_or_default();
                let _ = std::fmt::Write::write_fmt(
                    &mut report,
                    format_args!("  {stream} {kind}: {:?}{gap}\n", seen(&r, kind, *t_kill - 0.5, to)),
                );
            }
        }
    }
    let _ = std::fmt::Write::write_fmt(
        &mut report,
        format_args!("l4: {:?} {}\nkafka ({status}): {kafka}\n", runs("l4"), result["l4"]),
    );
    eprintln!("fault report:\n{report}");

    // Denied is never served, by any path, at any time (fail closed while l7proxy is down).
    for stream in ["h1", "tls"] {
        let denied = seen(&runs(stream), "denied", 0.0, f64::MAX);
        assert!(!denied.contains_key("200"), "{stream}: a denied request was served: {denied:?}\n{report}");
    }
    for (i, (name, t_kill, _)) in kills.iter().enumerate() {
        let to = kills.get(i + 1).map(|k| k.1).unwrap_or(t_end);
        for stream in ["h1", "tls"] {
            let r = runs(stream);
            let allowed = seen(&r, "allowed", *t_kill, to);
            let failures: Vec<&String> = allowed.keys().filter(|k| *k != "200").collect();
            match *name {
                // The proxy's connections die with it (reset); new ones are refused by the
                // absent listener until the restarted proxy listens (fail closed). So too
                // when `l7ctl up` dies and takes l7proxy with it.
                "l7proxy" | "l7ctl up" => {
                    assert!(!failures.is_empty(), "{stream}: the l7proxy kill went unseen: {allowed:?}\n{report}");
                    assert!(
                        failures.iter().all(|f| ["refused", "reset"].contains(&f.as_str())),
                        "{stream} while l7proxy was down: {allowed:?}\n{report}"
                    );
                    let (_, _, back) = outage(&r, "allowed", "200", *t_kill, to).unwrap();
                    assert!(back.is_finite(), "{stream}: never served again after the l7proxy kill\n{report}");
                }
                // Certificates are cached in the proxy; the policy is in force in the proxy
                // and the kernel: neither a broker nor a policy-api outage is seen by traffic.
                _ => assert!(failures.is_empty(), "{stream} while {name} was down: {allowed:?}\n{report}"),
            }
        }
    }
    // The L4-only connection: never redirected (the echo server saw the client's own address and
    // port), one connection the whole time, every ping answered.
    let l4 = runs("l4");
    assert!(l4.len() == 1 && l4[0].3 == "ok", "the L4 connection failed: {l4:?}");
    assert!(l4[0].0 < kills[0].1 && l4[0].1 > kills[3].1, "the L4 connection did not span the kills: {l4:?}");
    // With no node process at all, the kernel alone: the marked port refused, a port the
    // client's policy does not name denied.
    assert_eq!(while_stopped, ["ECONNREFUSED", "EPERM"], "the datapath while `l7ctl up` was dead");
    let peer = &result["l4"]["peer"];
    assert_eq!(peer[0], "127.0.0.1", "{}", result["l4"]);
    assert_eq!(peer[1], result["l4"]["local_port"].to_string(), "the L4 connection went through a proxy");
    // Every acknowledged produce is readable afterwards; none failed for good.
    assert!(status.success(), "{kafka_out} {}", node.log("producer.err"));
    assert!(kafka["acked"].as_u64().unwrap() > 1000, "{kafka}");
    assert_eq!(kafka["missing"], 0, "acknowledged Kafka messages were lost: {kafka}");
    assert_eq!(kafka["failed"], 0, "Kafka produces failed: {kafka}");
    assert_eq!(kafka["acked"], kafka["sent"], "{kafka}");
    assert_eq!(kafka["read_back"], kafka["acked"], "{kafka}");

    // The restarted policy-api and l7proxy take a change: /private is allowed now.
    let wider = node.policy_file("wider.yaml", &policy().replace("/public/.*", "/(public|private)/.*")).unwrap();
    // (faults.yaml is the node's --policy file: an API write to its policies needs --force.)
    let o = node.l7ctl(&["apply", "--force", "-f", wider.to_str().unwrap()]).unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = node
        .l7ctl_run(
            "check",
            "app=client",
            &["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "http://127.0.0.1:8444/private/a"],
        )
        .unwrap();
    assert_eq!(out(&o), "200", "a change after the restarts is in force");
}

/// Fresh clients: allowed served, denied denied, on both HTTP ports (the policy in force).
fn check(node: &TestNode, ca_file: &std::path::Path, when: &str) {
    let get = |url: &str, extra: &[&str]| {
        let mut cmd = vec!["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10"];
        cmd.extend_from_slice(extra);
        cmd.push(url);
        out(&node.l7ctl_run("check", "app=client", &cmd).unwrap())
    };
    let ca = ca_file.to_str().unwrap();
    let tls = ["--cacert", ca, "--resolve", "web.mesh.local:8462:127.0.0.1"];
    let got = [
        get("http://127.0.0.1:8444/public/a", &[]),
        get("http://127.0.0.1:8444/private/a", &[]),
        get("https://web.mesh.local:8462/public/a", &tls),
        get("https://web.mesh.local:8462/private/a", &tls),
    ];
    assert_eq!(got, ["200", "403", "200", "403"], "{when}: the policy in force\n{}", node.node_log());
}

/// The pid of this node's `bin` (the broker is found by its run dir: its state dir is the
/// node's plus `/broker`).
fn pid_of(node: &TestNode, bin: &str) -> Option<i32> {
    if bin != "tls-broker" {
        return node.pid_of(bin);
    }
    let run_dir = node.run_dir().display().to_string();
    std::fs::read_dir("/proc").ok()?.filter_map(|e| e.ok()).find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let exe = std::path::Path::new(std::str::from_utf8(args.first()?).ok()?).file_name()?.to_str()?.to_string();
        (exe == bin && args.contains(&run_dir.as_bytes())).then_some(pid)
    })
}

/// kafka_acked.py where workloads (as `nobody`) can read it.
fn copy_acked_script(node: &TestNode) -> String {
    node.copy_script("kafka_acked.py").unwrap()
}

//! The Kafka stack's bounds, provoked for real: a hostile "broker" (a Python server on a Kafka
//! port) that answers with a 0x7fffffff length and then pours bytes, drips a large frame, or
//! floods answers nobody asked for; clients that pipeline without reading; a client naming
//! thousands of random topics. Meanwhile a well-behaved librdkafka producer keeps producing to
//! a real broker (Tansu) through the same l7proxy, and the proxy's RSS stays small.

use std::time::{Duration, Instant};

use integration::*;

/// `steady` produces to `steady`, `spray` to `orders`, `admin` at L4; `victim` may only ask
/// the hostile "broker" (app=evil, 9093) for ApiVersions.
fn policy() -> String {
    let brokers = kafka_policy(
        "kafka-bounds",
        "kafka",
        &[
            kafka_from("steady", 9092, &["role: produce, topic: steady"]),
            kafka_from("spray", 9092, &["role: produce, topic: orders"]),
            kafka_from("admin", 9092, &[]),
        ],
    );
    let hostile = kafka_policy("hostile-broker", "evil", &[kafka_from("victim", 9093, &["apiKey: apiversions"])]);
    format!(
        "{brokers}---
{hostile}"
    )
}

/// VmRSS of `pid` in KiB.
fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// `l7mesh_limits_tripped_total{limit="LIMIT"}`, 0 when absent.
fn tripped(node: &TestNode, limit: &str) -> u64 {
    let metrics = node.admin("/metrics").unwrap();
    let prefix = format!("l7mesh_limits_tripped_total{{limit=\"{limit}\"}} ");
    metrics.lines().find_map(|l| l.strip_prefix(&prefix)).map(|v| v.trim().parse().unwrap()).unwrap_or(0)
}

fn start(name: &str, subnet: u8, env: &[(&str, &str)]) -> (TestNode, String) {
    let node = kafka_node(name, subnet, env, &policy(), Broker::Tansu).unwrap();
    let script = node.copy_script("kafka_hostile.py").unwrap();
    (node, script)
}

#[test]
fn a_hostile_broker_or_client_costs_only_its_own_connection() {
    // A small pending-bytes bound, so that a client's pile of denied requests reaches it.
    let (mut node, script) = start("kbounds", 63, &[("L7PROXY_MAX_KAFKA_PENDING_BYTES", "4096")]);
    node.tansu_topics(&["steady", "orders"]).unwrap();
    node.spawn_l7ctl_run("evil", "app=evil", &[PEERS_PY, &script, "broker", "9093"], "evil.log").unwrap();
    let probe = node.probe_path();
    let o = node
        .l7ctl_run("victim", "app=victim", &[PEERS_PY, probe.to_str().unwrap(), "wait-tcp", "127.0.0.1", "9093", "20"])
        .unwrap();
    assert!(o.status.success(), "hostile broker: {}", node.log("evil.log"));
    // The well-behaved connection, held through everything below.
    node.spawn_l7ctl_run(
        "steady",
        "app=steady",
        &[PEERS_PY, &script, "steady", "127.0.0.1:9092", "steady", "40"],
        "steady.log",
    )
    .unwrap();
    let victim = |args: &[&str]| {
        let mut cmd = vec![PEERS_PY, script.as_str()];
        cmd.extend_from_slice(args);
        let o = node.l7ctl_run("victim", "app=victim", &cmd).unwrap();
        format!("{}{}", out(&o), String::from_utf8_lossy(&o.stderr).trim())
    };
    let evil = "127.0.0.1:9093";
    assert_eq!(victim(&["ask", evil, "polite", "20", "1"]), "ANSWERED OPEN", "the hostile broker's port is proxied");
    let proxy = node.pid_of("l7proxy").expect("l7proxy runs");
    std::thread::sleep(Duration::from_secs(3));
    let baseline = rss_kib(proxy);

    // A 0x7fffffff length, then 512 MiB as fast as the broker can: closed at the length.
    let before = tripped(&node, "kafka_response_frame");
    let mut huge =
        node.l7ctl_run_command("victim", "app=victim", &[PEERS_PY, &script, "ask", evil, "huge", "20", "0"]).unwrap();
    huge.stdout(std::process::Stdio::piped());
    let huge = huge.spawn().unwrap();
    // Sampled while the broker pours and holds on (a proxy that buffered it would hold it now).
    std::thread::sleep(Duration::from_secs(4));
    let rss = rss_kib(proxy);
    assert!(rss < baseline + 32 * 1024, "RSS {rss} KiB after the 0x7fffffff answer (baseline {baseline} KiB)");
    assert_eq!(out(&huge.wait_with_output().unwrap()), "CLOSED");
    assert_eq!(tripped(&node, "kafka_response_frame"), before + 1);
    let flows = node.flows().unwrap();
    assert!(
        flows.iter().any(|f| f["verdict"] == "DENIED"
            && f["reason"].as_str().is_some_and(|r| r.contains("--max-kafka-response-frame"))),
        "a flow says why: {} flows, the last: {:#?}",
        flows.len(),
        flows.iter().rev().take(3).collect::<Vec<_>>()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !node.node_log().contains("kafka bound reached; closing this connection") {
        assert!(Instant::now() < deadline, "logged: {}", node.node_log());
        std::thread::sleep(Duration::from_millis(100));
    }

    // A claimed 60 MiB (within the bound) dripped 400 KiB/s: the proxy holds what came, not
    // what was claimed, and several such connections at once hold little.
    let drips: Vec<_> = (0..4)
        .map(|i| {
            let mut c = node
                .l7ctl_run_command(
                    &format!("victim-{i}"),
                    "app=victim",
                    &[PEERS_PY, &script, "ask", evil, "drip", "6", "0"],
                )
                .unwrap();
            c.stdout(std::process::Stdio::piped());
            c.spawn().unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_secs(5));
    let rss = rss_kib(proxy);
    assert!(rss < baseline + 48 * 1024, "RSS {rss} KiB during four dripped 60 MiB frames (baseline {baseline} KiB)");
    for d in drips {
        assert_eq!(out(&d.wait_with_output().unwrap()), "OPEN", "still within the bound: the client waits");
    }

    // Answers nobody asked for: the connection is closed as soon as they arrive.
    assert_eq!(victim(&["ask", evil, "flood", "20", "20"]), "ANSWERED CLOSED");
    assert!(
        node.flows().unwrap().iter().any(|f| f["reason"].as_str().is_some_and(|r| r.contains("answer no request"))),
        "a flow says why"
    );

    // A client pipelining requests the broker never answers: the proxy stops reading at 1000
    // in flight, so the client's writes stall once the socket buffers are full.
    let before = tripped(&node, "kafka_in_flight");
    let sent = victim(&["pipeline", evil, "allowed", "3000000", "8"]);
    let n: u64 = sent.strip_prefix("sent=").and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{sent}"));
    assert!(n < 3_000_000, "the proxy kept reading: {sent}");
    assert!(tripped(&node, "kafka_in_flight") > before, "counted");
    // Denied requests answered by the proxy pile up behind one the broker never answers: the
    // pending bytes bound stops the reading.
    let before = tripped(&node, "kafka_pending_bytes");
    let sent = victim(&["pipeline", evil, "denied", "3000000", "8"]);
    let n: u64 = sent.strip_prefix("sent=").and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{sent}"));
    assert!(n < 3_000_000, "the proxy kept reading: {sent}");
    assert!(tripped(&node, "kafka_pending_bytes") > before, "counted");
    let rss = rss_kib(proxy);
    assert!(rss < baseline + 48 * 1024, "RSS {rss} KiB after the pipelines (baseline {baseline} KiB)");

    // The hostile broker still serves a polite request (its connections were closed one by one).
    assert_eq!(victim(&["ask", evil, "polite", "20", "1"]), "ANSWERED OPEN");
    // The steady producer never missed a delivery.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !node.log("steady.log").contains("sent=") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let steady = node.log("steady.log");
    let line = steady.lines().find(|l| l.starts_with("sent=")).unwrap_or_else(|| panic!("steady: {steady}"));
    let field = |name: &str| -> u64 {
        line.split_whitespace().find_map(|f| f.strip_prefix(name)).and_then(|v| v.parse().ok()).unwrap()
    };
    assert!(field("sent=") >= 200, "{line}");
    assert_eq!(field("sent="), field("ok="), "{line}");
    assert!(field("max_ms=") < 2000, "{line}");
}

/// Thousands of client-chosen topic names (Produce and Metadata auto-creation, every one
/// denied) add one `(other)` series to l7mesh_kafka_requests_total, not one per name.
#[test]
fn client_chosen_topic_names_do_not_become_metric_series() {
    let (node, script) = start("kcard", 64, &[]);
    let o = node.l7ctl_run("spray", "app=spray", &[PEERS_PY, &script, "spray", "127.0.0.1:9092", "5000"]).unwrap();
    assert_eq!(out(&o), "requests=101 topics=5000", "{}", String::from_utf8_lossy(&o.stderr));
    let metrics = node.admin("/metrics").unwrap();
    let series: Vec<&str> = metrics.lines().filter(|l| l.starts_with("l7mesh_kafka_requests_total{")).collect();
    assert!(series.len() <= 8, "{series:#?}");
    let other = series
        .iter()
        .find(|l| l.contains("topic=\"(other)\"") && l.contains("api_key=\"Produce\"") && l.contains("DENIED"))
        .unwrap_or_else(|| panic!("{series:#?}"));
    let count: f64 = other.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(count >= 2500.0, "{other}");
    assert!(
        series.iter().any(|l| l.contains("topic=\"orders\"") && l.contains("api_key=\"CreateTopics\"")),
        "a topic the policy names keeps its label: {series:#?}"
    );
    // The flows still name every topic (they are bounded by the ring, not by labels).
    let flows = node.flows().unwrap();
    let named: std::collections::HashSet<&str> =
        flows.iter().filter_map(|f| f["l7"]["kafka"]["topic"].as_str()).collect();
    assert!(named.len() > 1000, "{}", named.len());
}

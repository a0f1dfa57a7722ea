//! TLS termination: full handshakes per second (`openssl s_time -new`) and requests per second
//! on keep-alive TLS connections (`wrk` over https), through l7proxy (`terminatingTLS` with an
//! imported secret, one HTTP rule), HAProxy (OpenSSL) and Envoy (BoringSSL) with the same
//! certificate and the same rule, in front of the same nginx; variants alternate round by round.
//!
//! CPU budget: each proxy is pinned to core 1; the clients and nginx to core 0.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use integration::TestNode;

use crate::http::{
    apply_policy, envoy_http_routes, parse_wrk, pin_l7proxy, restart_peers, rule_paths, start_nginx, Sample, BASE_RULES,
};
use crate::{median, write_result, write_section, Args};

/// The l7mesh policy: TLS terminated on 9210 and `n` HTTP rules (the HTTP benchmark's set).
fn policy(n: usize) -> String {
    let mut y = String::from("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: bench-tls\nspec:\n  endpointSelector:\n    matchLabels:\n      app: bench-client\n  egress:\n  - toPorts:\n    - ports:\n      - port: \"9210\"\n        protocol: TCP\n      terminatingTLS:\n        secret:\n          name: bench-tls\n      rules:\n        http:\n");
    for p in rule_paths(n) {
        let _ = writeln!(y, "        - method: GET\n          path: \"{p}\"");
    }
    y
}

fn haproxy_config(dir: &Path, n: usize) -> String {
    let mut c = format!(
        "global\n  nbthread 1\n  maxconn 4096\n  pidfile {d}/haproxy-tls-{n}.pid\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n  option http-keep-alive\nfrontend fe\n  bind 127.0.0.1:9310 ssl crt {d}/bench.pem alpn http/1.1\n  acl get method GET\n",
        d = dir.display()
    );
    for p in rule_paths(n) {
        let _ = writeln!(c, "  acl allowed path_reg ^{p}$");
    }
    c.push_str("  http-request deny deny_status 403 unless get allowed\n  default_backend be\nbackend be\n  http-reuse always\n  server s1 127.0.0.1:9210\n");
    c
}

fn envoy_config(cert: &str, key: &str, n: usize) -> String {
    let routes = envoy_http_routes("upstream", n);
    format!(
        r#"static_resources:
  listeners:
  - name: bench_tls
    address: {{socket_address: {{address: 127.0.0.1, port_value: 9410}}}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          common_tls_context:
            alpn_protocols: ["http/1.1"]
            tls_certificates: [{{certificate_chain: {{filename: "{cert}"}}, private_key: {{filename: "{key}"}}}}]
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench_tls
          codec_type: HTTP1
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
  clusters:
  - name: upstream
    connect_timeout: 1s
    type: STATIC
    load_assignment:
      cluster_name: upstream
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 9210}}}}}}}}]}}]
"#
    )
}

/// Runs `openssl s_time` timed by a Python wrapper: s_time's own "real seconds" are whole
/// seconds, too coarse for a rate; the wrapper's monotonic clock is not.
const TIMED: &str = "import subprocess, sys, time\nt = time.monotonic()\nr = subprocess.run(sys.argv[1:], capture_output=True, text=True)\nprint(r.stdout + r.stderr)\nprint('elapsed', time.monotonic() - t)";

/// Full handshakes per second: the count from `N connections in T real seconds` over the
/// wrapper's elapsed time.
fn parse_s_time(text: &str) -> Result<f64> {
    let count = text.lines().find_map(|l| {
        l.split_once(" connections in ")
            .filter(|(_, rest)| rest.contains("real seconds"))
            .and_then(|(n, _)| n.trim().parse::<f64>().ok())
    });
    let elapsed = text.lines().find_map(|l| l.strip_prefix("elapsed ").and_then(|v| v.trim().parse::<f64>().ok()));
    match (count, elapsed) {
        (Some(n), Some(secs)) if secs > 0.0 => Ok(n / secs),
        _ => bail!("no connection count or elapsed time in the openssl s_time run:\n{text}"),
    }
}

pub fn run(args: &Args) -> Result<()> {
    let mut node = TestNode::new("bench-tls")?;
    node.add_peer_host(61)?;
    let dir = node.log_dir.clone();
    let policy_file = node.policy_file("bench-tls.yaml", &policy(BASE_RULES))?;
    node.node_env.push(("L7PROXY_WORKER_THREADS".into(), "1".into()));
    node.start_node(&policy_file, &[])?;
    // One certificate for all three (ECDSA P-256, like the broker's).
    let (cert, key) = (dir.join("bench.crt"), dir.join("bench.key"));
    let openssl = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1"])
        .args(["-subj", "/CN=bench.tls", "-addext", "subjectAltName=DNS:bench.tls,IP:127.0.0.1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()?;
    if !openssl.status.success() {
        bail!("openssl req: {}", String::from_utf8_lossy(&openssl.stderr));
    }
    let (cert_s, key_s) = (cert.to_str().context("path")?, key.to_str().context("path")?);
    std::fs::write(dir.join("bench.pem"), std::fs::read_to_string(&cert)? + &std::fs::read_to_string(&key)?)?;
    let run_dir = node.run_dir().display().to_string();
    let import =
        node.l7ctl(&["secret", "import", "bench-tls", "--cert", cert_s, "--key", key_s, "--run-dir", &run_dir])?;
    if !import.status.success() {
        bail!("l7ctl secret import: {}", String::from_utf8_lossy(&import.stderr));
    }
    start_nginx(&mut node, "  server { listen 127.0.0.1:9210 reuseport; location / { return 200 \"ok\\n\"; } }\n")?;
    pin_l7proxy(&node)?;
    let variants: [(&str, Option<&str>, &str); 3] =
        [("l7proxy", Some("bench"), "9210"), ("haproxy", None, "9310"), ("envoy", None, "9410")];
    let secs = args.http_seconds.to_string();
    let mut handshakes: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let mut keepalive: Vec<(usize, Vec<Vec<Sample>>)> = Vec::new();
    for &n in &args.rule_counts {
        configure(&mut node, n, cert_s, key_s)?;
        // Sanity: each terminates with the same certificate and denies a path outside the rules.
        for (name, w, port) in variants {
            let url = format!("https://bench.tls:{port}/admin");
            let resolve = format!("bench.tls:{port}:127.0.0.1");
            let curl = [
                "curl",
                "-s",
                "--cacert",
                cert_s,
                "--resolve",
                &resolve,
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &url,
            ];
            let code = output(&node, w, &curl)?;
            if code != "403" {
                bail!("{name} over TLS with {n} rules did not deny /admin (got {code})");
            }
        }
        // A full handshake does not depend on the rules: measured once, with the base set.
        let with_handshakes = n == BASE_RULES;
        let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); variants.len()];
        for round in 0..args.rounds {
            for (i, (name, w, port)) in variants.iter().enumerate() {
                if with_handshakes {
                    let connect = format!("127.0.0.1:{port}");
                    let s_time = ["openssl", "s_time", "-connect", &connect, "-new", "-time", &secs];
                    let text = output(
                        &node,
                        *w,
                        &[&["taskset", "-c", "0", "/usr/bin/python3", "-c", TIMED][..], &s_time[..]].concat(),
                    )?;
                    let hs = parse_s_time(&text).with_context(|| name.to_string())?;
                    eprintln!("round {round} tls {name:8} handshakes/s {hs:.0}");
                    handshakes[i].push(hs);
                }
                let url = format!("https://127.0.0.1:{port}/bench/x");
                let s = parse_wrk(&output(
                    &node,
                    *w,
                    &["taskset", "-c", "0", "wrk", "-t", "1", "-c", "32", "-d", &secs, "--latency", &url],
                )?)?;
                if s.non_2xx > 0 {
                    bail!("{name}: {} non-2xx responses", s.non_2xx);
                }
                eprintln!("round {round} tls {n} rules {name:8} {s:?}");
                samples[i].push(s);
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        keepalive.push((n, samples));
    }
    drop(node);
    let mut md = format!(
        "Command: `make bench` (= `cargo run --release -p l7mesh-bench -- --scenario tls --rounds {r} --http-seconds {secs}`). \
         One ECDSA P-256 certificate for all three; the HTTP benchmark's rule sets (n GET + path regex rules, anything else 403, checked first at each size); upstream nginx (plaintext). \
         Full handshakes: `openssl s_time -new -time {secs}` (one client, a new session each time, TLS 1.3), counted over the wall time of the run, with {BASE_RULES} rules. Keep-alive: `wrk -t1 -c32 -d{secs}s` over https. \
         l7proxy: `terminatingTLS` with the certificate imported into the broker (rustls, ring), one worker; HAProxy 2.6 (OpenSSL, `nbthread 1`); \
         Envoy 1.40 (BoringSSL, `--concurrency 1`); each proxy pinned to core 1, the clients and nginx to core 0. {r} rounds alternating the variants, medians. \
         The handshake column is bounded by the single openssl client (all three land near the same rate): it shows that no proxy \
         falls behind one client doing full handshakes, not each proxy's ceiling.\n\n",
        r = args.rounds,
    );
    let hs: Vec<f64> = handshakes.iter().map(|v| if v.is_empty() { 0.0 } else { median(v.clone()) }).collect();
    if hs[0] > 0.0 {
        md.push_str("**Full handshakes**:\n\n| variant | full handshakes/s | l7proxy vs it |\n|---|---|---|\n");
        for (i, (name, _, _)) in variants.iter().enumerate() {
            let _ = writeln!(md, "| {name} | {:.0} | {:.2}x |", hs[i], hs[0] / hs[i]);
        }
    }
    let rps = |samples: &[Vec<Sample>], i: usize| median(samples[i].iter().map(|s| s.rps).collect());
    for (n, samples) in &keepalive {
        let _ = writeln!(md, "\n**Keep-alive requests over TLS, {n} rules**:\n\n| variant | req/s | p99 (ms) | l7proxy vs it |\n|---|---|---|---|");
        for (i, (name, _, _)) in variants.iter().enumerate() {
            let p99 = median(samples[i].iter().map(|s| s.p99_ms).collect());
            let _ = writeln!(
                md,
                "| {name} | {:.0} | {p99:.2} | {:.2}x |",
                rps(samples, i),
                rps(samples, 0) / rps(samples, i)
            );
        }
    }
    if keepalive.len() > 1 {
        let ((n0, first), (n1, last)) = (&keepalive[0], &keepalive[keepalive.len() - 1]);
        let change: Vec<String> = variants
            .iter()
            .enumerate()
            .map(|(i, v)| format!("{} {:+.1}%", v.0, (rps(last, i) / rps(first, i) - 1.0) * 100.0))
            .collect();
        let _ = writeln!(md, "\nFrom {n0} to {n1} rules, keep-alive req/s changes by: {}.", change.join(", "));
    }
    println!("{md}");
    write_section(&args.out, "tls", &md)?;
    let json = serde_json::json!({
        "variants": variants.iter().map(|v| v.0).collect::<Vec<_>>(),
        "handshakes_per_second": handshakes,
        "keepalive_by_rules": keepalive.iter().map(|(n, s)| serde_json::json!({ "rules": n, "rounds": s })).collect::<Vec<_>>(),
    });
    write_result(args, "tls.json", &serde_json::to_string_pretty(&json)?)?;
    Ok(())
}

/// CMD's output, as the bench client workload (`workload`) or as root.
fn output(node: &TestNode, workload: Option<&str>, cmd: &[&str]) -> Result<String> {
    Ok(match workload {
        Some(w) => {
            let o = node.l7ctl_run(w, "app=bench-client", cmd)?;
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
        }
        None => node.run_ok(None, cmd)?,
    })
}

/// Applies the `n`-rule policy to l7mesh and (re)starts HAProxy and Envoy with the same set.
fn configure(node: &mut TestNode, n: usize, cert: &str, key: &str) -> Result<()> {
    apply_policy(node, &format!("bench-tls-{n}.yaml"), &policy(n))?;
    let haproxy = haproxy_config(&node.log_dir, n);
    restart_peers(node, "tls-", n, &haproxy, &envoy_config(cert, key, n), &["9210", "9310", "9410"])
}

//! Many nodes on one etcd (`--scenario cluster`):
//!
//! - Propagation: three nodes (`TestCluster`: each a netns with its own `l7ctl up --kvstore`,
//!   a real etcd on the bridge); node 0 applies a policy that flips between two versions,
//!   `--rounds x 10` times; measured: `l7ctl apply` to its exit (which waits for every node to
//!   say it has the revision in force), and each node's own "in force after" as the apply
//!   reports it; after each apply, node 2's client checks with one request that the version
//!   it reports is the one it enforces.
//! - Fan-out (on paper, for cluster scale): 1,000 lightweight watchers (etcd-client watch
//!   streams over 10 connections, in this process) on the policy prefix of one etcd, and one
//!   writer putting a policy-sized value 50 times; measured: from the write sent to each
//!   watcher's event (p50, p99, max over 50,000), and etcd's CPU time and RSS meanwhile.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use integration::{TestCluster, TestNode};
use serde::Serialize;

use crate::{write_result, write_section, Args};

fn policy(path: &str) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: client\nspec:\n  endpointSelector:\n    matchLabels:\n      app: client\n  egress:\n  - toEntities: [host]\n    toPorts:\n    - ports:\n      - port: \"8080\"\n        protocol: TCP\n      rules:\n        http:\n        - method: GET\n          path: \"{path}\"\n"
    )
}

/// The `q`-quantile (nearest rank) of `v`.
fn quantile(mut v: Vec<f64>, q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1]
}

#[derive(Serialize)]
struct Propagation {
    nodes: usize,
    applies: usize,
    /// `l7ctl apply` on node 0 to its exit: validated, checked, written to etcd, and every
    /// node's word that it has the revision in force (ms).
    apply_ms_p50: f64,
    apply_ms_p99: f64,
    /// The slowest node's "in force after" per apply, from the write (ms).
    last_node_ms_p50: f64,
    last_node_ms_p99: f64,
    /// Every node's "in force after" (ms).
    any_node_ms_p50: f64,
    any_node_ms_p99: f64,
    /// Applies after which node 2's first request obeyed the version just applied.
    node2_obeyed: usize,
}

#[derive(Serialize)]
struct FanOut {
    watchers: usize,
    connections: usize,
    writes: usize,
    /// From the write sent to each watcher's event (ms), over watchers x writes.
    event_ms_p50: f64,
    event_ms_p99: f64,
    event_ms_max: f64,
    events_received: usize,
    /// etcd's CPU seconds during the writes (user + system), and its RSS after (MiB).
    etcd_cpu_s: f64,
    etcd_rss_mib: f64,
}

fn status(node: &TestNode, path: &str) -> Result<String> {
    let url = format!("http://127.0.0.1:8080{path}");
    let (_, body) = node.curl(Some("client"), &url, &["-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5"])?;
    Ok(body.chars().take(3).collect())
}

fn propagation(args: &Args) -> Result<Propagation> {
    let mut c = TestCluster::new("bench-cluster", 3)?;
    for i in 0..3 {
        c.start_node(i, &["--kvstore-lease-ttl", "10"])?;
        c.nodes[i].http_server(None, "127.0.0.1", 8080, "x\n")?;
        c.nodes[i].spawn_l7ctl_run("client", "app=client", &["sleep", "3600"], "client.log")?;
    }
    let dir = c.nodes[0].log_dir.join("candidates");
    std::fs::create_dir_all(&dir)?;
    let files = [("index.yaml", policy("/index.html")), ("root.yaml", policy("/"))];
    for (name, text) in &files {
        std::fs::write(dir.join(name), text)?;
    }
    let (mut apply_ms, mut last, mut any) = (Vec::new(), Vec::new(), Vec::new());
    let mut obeyed = 0;
    let applies = args.rounds * 10;
    for i in 0..applies {
        let (name, _) = &files[i % 2];
        let file = dir.join(name);
        let started = Instant::now();
        let o = c.nodes[0].l7ctl(&["apply", "-f", file.to_str().unwrap_or_default()])?;
        apply_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        ensure!(o.status.success(), "apply {i}: {out}{}", String::from_utf8_lossy(&o.stderr));
        let afters: Vec<f64> = out
            .lines()
            .filter_map(|l| l.split(": in force after ").nth(1))
            .filter_map(|r| r.trim_end_matches(" ms").parse().ok())
            .collect();
        ensure!(afters.len() == 3, "apply {i}: not every node said: {out}");
        last.push(afters.iter().copied().fold(0.0, f64::max));
        any.extend(afters);
        // Node 2 enforces what it reported: GET / is allowed only by root.yaml.
        let want = if i % 2 == 1 { "200" } else { "403" };
        if status(&c.nodes[2], "/")? == want {
            obeyed += 1;
        }
    }
    Ok(Propagation {
        nodes: 3,
        applies,
        apply_ms_p50: quantile(apply_ms.clone(), 0.5),
        apply_ms_p99: quantile(apply_ms, 0.99),
        last_node_ms_p50: quantile(last.clone(), 0.5),
        last_node_ms_p99: quantile(last, 0.99),
        any_node_ms_p50: quantile(any.clone(), 0.5),
        any_node_ms_p99: quantile(any, 0.99),
        node2_obeyed: obeyed,
    })
}

/// etcd's (utime + stime) seconds and RSS MiB, from /proc.
fn etcd_usage(pid: i32) -> Result<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat.rsplit_once(')').context("stat")?.1.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    Ok((ticks / 100.0, rss_kib / 1024.0))
}

fn fan_out(c: &TestCluster, watchers: usize, connections: usize, writes: usize) -> Result<FanOut> {
    let pid = c.etcd_pid().context("etcd's pid")?;
    // The watchers and the writer run in the etcd's namespace (loopback traffic only there).
    let netns = std::fs::File::open(format!("/var/run/netns/{}", c.etcd_netns))?;
    nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET).context("setns into etcd's namespace")?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let endpoint = format!("http://{}", integration::CLUSTER_ETCD);
        let prefix = "/l7mesh-bench/v1/policies/";
        let received = Arc::new(std::sync::Mutex::new(Vec::<(usize, Instant)>::new()));
        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(watchers);
        for conn in 0..connections {
            let client = etcd_client::Client::connect([endpoint.as_str()], None).await?;
            for _ in 0..watchers / connections {
                let mut client = client.clone();
                let received = received.clone();
                let ready = ready_tx.clone();
                tokio::spawn(async move {
                    let opts = etcd_client::WatchOptions::new().with_prefix();
                    let Ok(mut stream) = client.watch(prefix, Some(opts)).await else { return };
                    let _ = ready.send(()).await;
                    while let Ok(Some(resp)) = stream.message().await {
                        let now = Instant::now();
                        for ev in resp.events() {
                            let seq = ev
                                .kv()
                                .and_then(|kv| kv.value_str().ok())
                                .and_then(|v| v.split(':').next()?.parse().ok());
                            if let Some(seq) = seq {
                                received.lock().unwrap_or_else(|e| e.into_inner()).push((seq, now));
                            }
                        }
                    }
                });
            }
            let _ = conn;
        }
        for _ in 0..(watchers / connections) * connections {
            ready_rx.recv().await.context("a watcher did not start")?;
        }
        let mut writer = etcd_client::Client::connect([endpoint.as_str()], None).await?;
        // A policy-sized value (about 1 KiB of JSON, as one ClusterPolicy).
        let padding = "x".repeat(1000);
        let (cpu0, _) = etcd_usage(pid)?;
        let mut sent = Vec::new();
        for seq in 0..writes {
            sent.push(Instant::now());
            writer.put(format!("{prefix}default/p{}", seq % 10), format!("{seq}:{padding}"), None).await?;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (cpu1, rss) = etcd_usage(pid)?;
        let got = received.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let latencies: Vec<f64> = got
            .iter()
            .filter(|(seq, _)| *seq < writes)
            .map(|(seq, at)| at.saturating_duration_since(sent[*seq]).as_secs_f64() * 1000.0)
            .collect();
        let n = latencies.len();
        Ok::<_, anyhow::Error>(FanOut {
            watchers: (watchers / connections) * connections,
            connections,
            writes,
            event_ms_p50: quantile(latencies.clone(), 0.5),
            event_ms_p99: quantile(latencies.clone(), 0.99),
            event_ms_max: quantile(latencies, 1.0),
            events_received: n,
            etcd_cpu_s: cpu1 - cpu0,
            etcd_rss_mib: rss,
        })
    })
}

pub fn run(args: &Args) -> Result<()> {
    let p = propagation(args)?;
    // The fan-out on an etcd of its own (the cluster's nodes gone: nothing else loads it).
    let c = TestCluster::new("bench-fanout", 0)?;
    let f = fan_out(&c, 1000, 10, 50)?;
    write_result(
        args,
        "cluster.json",
        &serde_json::to_string_pretty(&serde_json::json!({"propagation": &p, "fan_out": &f}))?,
    )?;
    let body = format!(
        "Command: `cargo run --release -p l7mesh-bench -- --scenario cluster --rounds {rounds}` (bench/src/cluster.rs). \
         Three nodes (network namespaces on one bridge, each its own `l7ctl up --kvstore`), one etcd 3.4 (Debian's) in a \
         namespace of its own; node 0 applies a policy that flips between two versions, {applies} times.\n\n\
         | measure | p50 | p99 |\n|---|---|---|\n\
         | `l7ctl apply` to its exit (waits for all three nodes' word) | {:.1} ms | {:.1} ms |\n\
         | slowest node in force, from the write | {:.1} ms | {:.1} ms |\n\
         | any node in force, from the write | {:.1} ms | {:.1} ms |\n\n\
         Node 2's first request after each apply obeyed the version applied: {} of {applies}.\n\n\
         Fan-out on paper: {} watchers (etcd-client watch streams over {} connections, one process) on one etcd, {} writes of \
         a 1 KiB value 100 ms apart: {} events; write sent to event received p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; \
         etcd used {:.2} s of CPU over the {:.1} s of writes and held {:.0} MiB RSS.\n",
        p.apply_ms_p50,
        p.apply_ms_p99,
        p.last_node_ms_p50,
        p.last_node_ms_p99,
        p.any_node_ms_p50,
        p.any_node_ms_p99,
        p.node2_obeyed,
        f.watchers,
        f.connections,
        f.writes,
        f.events_received,
        f.event_ms_p50,
        f.event_ms_p99,
        f.event_ms_max,
        f.etcd_cpu_s,
        f.writes as f64 * 0.1,
        f.etcd_rss_mib,
        rounds = args.rounds,
        applies = p.applies,
    );
    write_section(&args.out, "cluster", &body)?;
    println!("{body}");
    Ok(())
}

/// The cross-node tunnel (`--scenario tunnel`): two nodes with the cluster's trust, nginx as
/// workload `web` on node 1; HTTP/1.1 keep-alive load (wrk, 16 connections) from node 0 to it:
/// - `direct`: wrk as a process of node 0 outside any workload: not redirected, plaintext
///   across the bridge (the floor);
/// - `tunnel-l4`: wrk as workload `client` on node 0, no policy on `web`: node 0's proxy
///   carries it through the mTLS tunnel, node 1's proxy judges it at L4 and forwards it;
/// - `tunnel-l7`: the same with an HTTP rule on `web`'s ingress for app=client: node 1's proxy
///   runs the HTTP stack on the tunnelled stream;
/// - `envoy-mtls`: two Envoys (the Istio sidecar shape): one on node 0 (plaintext HTTP in,
///   mTLS out with a client certificate) and one on node 1 (mTLS in, client certificate
///   required, HTTP to nginx), wrk as a node-0 process to the first.
#[derive(Serialize, Clone, Default)]
struct TunnelSample {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

const WEB_L7: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: web\nspec:\n  endpointSelector:\n    matchLabels:\n      app: web\n  ingress:\n  - fromEndpoints:\n    - matchLabels:\n        app: client\n    toPorts:\n    - ports:\n      - port: \"8081\"\n        protocol: TCP\n      rules:\n        http:\n        - method: GET\n          path: \"/\"\n";

fn envoy_pair(dir: &std::path::Path) -> Result<(String, String)> {
    let d = dir.display();
    let client = format!(
        r#"static_resources:
  listeners:
  - name: out
    address: {{socket_address: {{address: 127.0.0.1, port_value: 9500}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: out
          route_config: {{virtual_hosts: [{{name: all, domains: ["*"], routes: [{{match: {{prefix: "/"}}, route: {{cluster: peer}}}}]}}]}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: peer
    type: STATIC
    load_assignment: {{cluster_name: peer, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 10.240.0.11, port_value: 9501}}}}}}}}]}}]}}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        common_tls_context:
          tls_certificates: [{{certificate_chain: {{filename: {d}/client.pem}}, private_key: {{filename: {d}/client.key}}}}]
          validation_context: {{trusted_ca: {{filename: {d}/ca.pem}}}}
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 9901}}}}}}
"#
    );
    let server = format!(
        r#"static_resources:
  listeners:
  - name: in
    address: {{socket_address: {{address: 0.0.0.0, port_value: 9501}}}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            tls_certificates: [{{certificate_chain: {{filename: {d}/server.pem}}, private_key: {{filename: {d}/server.key}}}}]
            validation_context: {{trusted_ca: {{filename: {d}/ca.pem}}}}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: in
          route_config: {{virtual_hosts: [{{name: all, domains: ["*"], routes: [{{match: {{prefix: "/"}}, route: {{cluster: web}}}}]}}]}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: web
    type: STATIC
    load_assignment: {{cluster_name: web, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 8081}}}}}}}}]}}]}}
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 9902}}}}}}
"#
    );
    integration::test_ca(dir, "bench-ca")?;
    integration::test_leaf(
        dir,
        "server",
        "10.240.0.11",
        "subjectAltName=IP:10.240.0.11\nextendedKeyUsage=serverAuth\n",
    )?;
    integration::test_leaf(
        dir,
        "client",
        "client",
        "subjectAltName=URI:spiffe://example.org/ns/default/sa/client\nextendedKeyUsage=clientAuth\n",
    )?;
    Ok((client, server))
}

fn wrk(node: &TestNode, workload: Option<&str>, url: &str, seconds: u64) -> Result<TunnelSample> {
    let d = format!("{seconds}s");
    let out = node.run_ok(workload, &["wrk", "-t1", "-c16", "-d", &d, "--latency", url])?;
    let s = crate::http::parse_wrk(&out)?;
    ensure!(s.non_2xx == 0, "{url}: {} non-2xx answers", s.non_2xx);
    Ok(TunnelSample { rps: s.rps, p50_ms: s.p50_ms, p99_ms: s.p99_ms })
}

pub fn run_tunnel(args: &Args) -> Result<()> {
    let mut c = TestCluster::new("bench-tunnel", 2)?;
    for i in 0..2 {
        c.start_node(i, &["--kvstore-lease-ttl", "10"])?;
    }
    c.install_trust("example.org")?;
    let web = &mut c.nodes[1];
    let d = web.shared_dir("nginx")?;
    let servers = "  server { listen 0.0.0.0:8081; location / { return 200 \"ok\\n\"; } }\n";
    std::fs::write(d.join("nginx.conf"), integration::nginx_config(&d, servers))?;
    let conf = d.join("nginx.conf").display().to_string();
    let err = d.join("nginx-start.log").display().to_string();
    web.spawn_l7ctl_run("web", "app=web", &["/usr/sbin/nginx", "-e", &err, "-c", &conf], "web.log")?;
    web.probe(None, &["wait-tcp", "127.0.0.1", "8081", "15"])?;
    c.nodes[0].spawn_l7ctl_run("client", "app=client", &["sleep", "3600"], "client.log")?;
    // Both nodes serve the tunnel and know it of each other.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = c.nodes[0].l7ctl_ok(&["get", "status", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_str(&s)?;
        if v["kvstore"]["nodes"].as_array().is_some_and(|n| n.len() == 2 && n.iter().all(|n| n["tunnel_port"] == 15008))
        {
            break;
        }
        ensure!(Instant::now() < deadline, "the nodes did not both serve the tunnel: {s}");
        std::thread::sleep(Duration::from_millis(200));
    }
    c.nodes[0].probe(None, &["wait-tcp", "10.240.0.11", "15008", "15"])?;
    // The two Envoys.
    let pki = c.nodes[0].shared_dir("envoy")?;
    let (client_cfg, server_cfg) = envoy_pair(&pki)?;
    std::fs::write(pki.join("client.yaml"), client_cfg)?;
    std::fs::write(pki.join("server.yaml"), server_cfg)?;
    let envoy = crate::http::ENVOY;
    let (cy, sy) = (pki.join("client.yaml").display().to_string(), pki.join("server.yaml").display().to_string());
    c.nodes[1].spawn(None, &[envoy, "-c", &sy, "--concurrency", "1", "--base-id", "7"], "envoy-server.log")?;
    c.nodes[0].spawn(None, &[envoy, "-c", &cy, "--concurrency", "1", "--base-id", "8"], "envoy-client.log")?;
    c.nodes[0].probe(None, &["wait-tcp", "127.0.0.1", "9500", "30"])?;
    c.nodes[0].probe(None, &["wait-tcp", "10.240.0.11", "9501", "30"])?;
    let url = "http://10.240.0.11:8081/";
    // (The policy of tunnel-l7 is in force only for it: it admits app=client alone, so the
    // node-0 processes of direct and envoy-mtls run without it.)
    let variants = ["direct", "envoy-mtls", "tunnel-l4", "tunnel-l7"];
    let mut samples: Vec<Vec<TunnelSample>> = vec![Vec::new(); variants.len()];
    let policy = c.nodes[0].log_dir.join("web-l7.yaml");
    std::fs::write(&policy, WEB_L7)?;
    let policy = policy.display().to_string();
    let seconds = args.http_seconds;
    for _ in 0..args.rounds {
        for (i, v) in variants.iter().enumerate() {
            if i == 0 {
                let _ = c.nodes[0].l7ctl(&["delete", "policy", "web"]);
            }
            let s = match *v {
                "direct" => wrk(&c.nodes[0], None, url, seconds)?,
                "envoy-mtls" => wrk(&c.nodes[0], None, "http://127.0.0.1:9500/", seconds)?,
                "tunnel-l4" => wrk(&c.nodes[0], Some("client"), url, seconds)?,
                _ => {
                    c.nodes[0].l7ctl_ok(&["apply", "-f", &policy]);
                    wrk(&c.nodes[0], Some("client"), url, seconds)?
                }
            };
            samples[i].push(s);
        }
    }
    let med = |v: &[TunnelSample], f: fn(&TunnelSample) -> f64| crate::median(v.iter().map(f).collect());
    let rows: Vec<(String, TunnelSample)> = variants
        .iter()
        .zip(&samples)
        .map(|(name, s)| {
            (
                name.to_string(),
                TunnelSample { rps: med(s, |x| x.rps), p50_ms: med(s, |x| x.p50_ms), p99_ms: med(s, |x| x.p99_ms) },
            )
        })
        .collect();
    write_result(args, "tunnel.json", &serde_json::to_string_pretty(&rows)?)?;
    let direct = rows[0].1.clone();
    let envoy_rps = rows[1].1.rps;
    let mut body = format!(
        "Command: `cargo run --release -p l7mesh-bench -- --scenario tunnel --rounds {} --http-seconds {seconds}` (bench/src/cluster.rs). \
         Two nodes (network namespaces on one bridge), nginx as workload `web` on node 1, wrk (HTTP/1.1 keep-alive, 16 connections) from node 0; \
         medians of {} rounds, variants alternating; everything shares the machine's two cores.\n\n\
         | path | req/s | vs direct | vs two Envoys | p50 | p99 | p50 added to direct |\n|---|---|---|---|---|---|---|\n",
        args.rounds, args.rounds
    );
    for (name, s) in &rows {
        body.push_str(&format!(
            "| {name} | {:.0} | {:.2}x | {:.2}x | {:.2} ms | {:.2} ms | {:+.2} ms |\n",
            s.rps,
            s.rps / direct.rps,
            s.rps / envoy_rps,
            s.p50_ms,
            s.p99_ms,
            s.p50_ms - direct.p50_ms
        ));
    }
    body.push_str(
        "\n`direct`: a node-0 process outside any workload, plaintext. `tunnel-l4`: workload `client`, no policy on `web`: node 0's proxy, mTLS \
         tunnel (one TLS+HTTP/2 connection per wrk connection), node 1's proxy at L4. `tunnel-l7`: the same with an HTTP rule on `web` for \
         app=client (node 1's proxy runs the HTTP stack on the tunnelled stream). `envoy-mtls`: two Envoys 1.40 (`--concurrency 1`), HTTP \
         in, mTLS between them, HTTP to nginx (Istio's sidecar shape).\n",
    );
    write_section(&args.out, "tunnel", &body)?;
    println!("{body}");
    Ok(())
}

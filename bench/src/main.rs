//! Benchmark of the redirector hop: a TCP ping-pong over loopback, measured three ways in one
//! run, alternating between them round by round:
//!
//! - `direct`: client -> server, nothing in between (the floor);
//! - `redirected`: the client is a workload whose connection the redirector sends to l7proxy,
//!   which forwards it; the app <-> proxy hop is ordinary loopback TCP (`--no-sk-msg` mode);
//! - `short-circuit`: the same, with sock_ops + sk_msg handing bytes socket to socket.
//!
//! Results (medians over rounds) go to docs/BENCHMARKS.md between markers, and to
//! bench/results/redirector-hop.json.
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use integration::*;
use serde::{Deserialize, Serialize};

#[derive(Parser)]
#[command(about = "l7mesh redirector-hop benchmark (needs root)")]
pub(crate) struct Args {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Markdown file whose redirector-hop section is rewritten with the results.
    #[arg(long, default_value = "docs/BENCHMARKS.md")]
    pub(crate) out: PathBuf,
    /// Directory for the JSON results and profiles.
    #[arg(long, default_value = "bench/results")]
    pub(crate) results: PathBuf,
    /// Alternating rounds per variant (medians are taken over rounds).
    #[arg(long, default_value_t = 5)]
    pub(crate) rounds: usize,
    /// Ping-pong exchanges per round for the latency measurement.
    #[arg(long, default_value_t = 20_000)]
    exchanges: usize,
    /// Bytes moved per round for the throughput measurement.
    #[arg(long, default_value_t = 256 << 20)]
    bulk_bytes: usize,
    /// Which benchmarks (comma-separated): hop (the redirector hop), http (l7proxy vs Envoy vs
    /// HAProxy), tls (TLS termination, the same three), kafka, propagation (l7ctl apply to
    /// enforcement), cluster (three nodes on etcd: apply to in force on every node; etcd
    /// fan-out to 1,000 watchers), tunnel (between two nodes: direct, l7mesh's mTLS tunnel,
    /// two Envoys with mTLS), all; and soak (held connections plus sustained load for --soak-minutes;
    /// not part of all).
    #[arg(long, value_delimiter = ',', default_value = "all",
          value_parser = ["all", "hop", "http", "tls", "kafka", "propagation", "cluster", "tunnel", "soak"])]
    scenario: Vec<String>,
    /// Soak: minutes of load (l7proxy is sampled once a --soak-sample-seconds).
    #[arg(long, default_value_t = 30)]
    pub(crate) soak_minutes: u64,
    /// Soak: seconds between samples of l7proxy's RSS, descriptors, tasks and threads.
    #[arg(long, default_value_t = 60)]
    pub(crate) soak_sample_seconds: u64,
    /// Soak: HTTP/2 connections held open through l7proxy the whole time.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) soak_connections: usize,
    /// Soak: each held connection sends one request this often (seconds), to prove it works.
    #[arg(long, default_value_t = 60)]
    pub(crate) soak_ping_seconds: u64,
    /// Soak: bytes of the `authorization` token each held connection's request carries (never
    /// indexed by HPACK, as credentials are): real clients' requests carry cookies and tokens,
    /// and it is what moves each connection's read buffer on (0: a bare GET, ~35 bytes).
    #[arg(long, default_value_t = 256)]
    pub(crate) soak_token_bytes: usize,
    /// Soak: HTTP/1.1 and HTTP/2 requests/s each (open loop), and Kafka produces/s (acks=all).
    #[arg(long, default_value_t = 500.0)]
    pub(crate) soak_rate: f64,
    /// Soak: the Kafka broker behind the proxy: apache (Apache Kafka, the reference broker, whose
    /// log the read-back reads) or tansu (in memory; a 30-minute run read back only 70 of 902,500).
    #[arg(long, value_enum, default_value_t = SoakBroker::Apache)]
    pub(crate) soak_broker: SoakBroker,
    /// Seconds of load per variant and round in the HTTP benchmark.
    #[arg(long, default_value_t = 5)]
    pub(crate) http_seconds: u64,
    /// Rule-set sizes for HTTP/1.1 keep-alive, HTTP/2, gRPC, TLS keep-alive and Kafka (the other
    /// scenarios use 100).
    #[arg(long, value_delimiter = ',', default_value = "10,100,10000")]
    pub(crate) rule_counts: Vec<usize>,
    /// Which HTTP scenarios: idle, close, open, profile, keepalive, h2, grpc (default: all).
    #[arg(long, value_delimiter = ',', default_value = "all",
          value_parser = ["all", "idle", "close", "open", "profile", "keepalive", "h2", "grpc"])]
    pub(crate) http_parts: Vec<String>,
    /// Idle connections held through each proxy for the memory-per-connection scenario. (This
    /// machine's descriptor limit is 20,000 per process, hard; HAProxy needs two per connection,
    /// so it can hold fewer than 10,000.)
    #[arg(long, default_value_t = 9_000)]
    pub(crate) idle_connections: usize,
}

/// The Kafka broker the soak runs behind l7proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum SoakBroker {
    Apache,
    Tansu,
}

#[derive(Subcommand)]
enum Cmd {
    /// Echo server (runs inside the test node).
    Server { addr: String },
    /// Ping-pong client (runs inside the test node); prints one JSON line.
    Client { addr: String, exchanges: usize, bulk_bytes: usize },
    /// HTTP/2 (prior knowledge) responder for the HTTP/2 and gRPC scenarios.
    H2Responder { addr: String },
    /// Open-loop HTTP/1.1 (--h2: HTTP/2) client: RATE requests/s for SECONDS over CONNECTIONS;
    /// one JSON line.
    OpenLoop {
        url: String,
        rate: f64,
        seconds: f64,
        connections: usize,
        #[arg(long)]
        h2: bool,
    },
    /// Holds COUNT HTTP (--h2: HTTP/2) connections to URL's host for SECONDS, each sending GET URL
    /// every EVERY seconds (prints `ready N` once open, one JSON line at the end).
    HoldHttp {
        url: String,
        count: usize,
        seconds: u64,
        every: u64,
        #[arg(long)]
        h2: bool,
        /// Each request carries an `authorization` token of this many bytes (never indexed).
        #[arg(long, default_value_t = 0)]
        token_bytes: usize,
    },
    /// Holds COUNT idle connections to ADDR for SECONDS (prints `ready N` once open).
    Hold { addr: String, count: usize, seconds: u64 },
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Sample {
    rtt_p50_us: f64,
    rtt_p99_us: f64,
    exchanges_per_s: f64,
    bulk_mib_per_s: f64,
}

const MSG: usize = 64;
const CHUNK: usize = 64 << 10;

fn serve(addr: &str) -> Result<()> {
    let listener = TcpListener::bind(addr)?;
    for stream in listener.incoming() {
        let mut stream = stream?;
        std::thread::spawn(move || {
            let _ = stream.set_nodelay(true);
            let mut buf = vec![0u8; CHUNK];
            loop {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if stream.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
    Ok(())
}

fn client(addr: &str, exchanges: usize, bulk_bytes: usize) -> Result<Sample> {
    let mut stream = TcpStream::connect(addr).with_context(|| format!("connecting {addr}"))?;
    stream.set_nodelay(true)?;
    let msg = [7u8; MSG];
    let mut back = [0u8; MSG];
    let mut rtts = Vec::with_capacity(exchanges);
    for _ in 0..100 {
        stream.write_all(&msg)?;
        stream.read_exact(&mut back)?;
    }
    let started = Instant::now();
    for _ in 0..exchanges {
        let t = Instant::now();
        stream.write_all(&msg)?;
        stream.read_exact(&mut back)?;
        rtts.push(t.elapsed());
    }
    let elapsed = started.elapsed();
    rtts.sort_unstable();
    let pct = |p: f64| rtts[((rtts.len() as f64 - 1.0) * p) as usize].as_secs_f64() * 1e6;

    // Bulk: one writer thread, this thread reads the echo back.
    let mut writer = stream.try_clone()?;
    let chunks = bulk_bytes / CHUNK;
    let t = Instant::now();
    let w = std::thread::spawn(move || -> std::io::Result<()> {
        let chunk = vec![1u8; CHUNK];
        for _ in 0..chunks {
            writer.write_all(&chunk)?;
        }
        Ok(())
    });
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0;
    while got < chunks * CHUNK {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            bail!("server closed early");
        }
        got += n;
    }
    w.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
    let bulk = t.elapsed();
    Ok(Sample {
        rtt_p50_us: pct(0.50),
        rtt_p99_us: pct(0.99),
        exchanges_per_s: exchanges as f64 / elapsed.as_secs_f64(),
        bulk_mib_per_s: (got as f64 / (1 << 20) as f64) / bulk.as_secs_f64(),
    })
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let args = Args::parse();
    match &args.cmd {
        Some(Cmd::Server { addr }) => return serve(addr),
        Some(Cmd::Client { addr, exchanges, bulk_bytes }) => {
            println!("{}", serde_json::to_string(&client(addr, *exchanges, *bulk_bytes)?)?);
            return Ok(());
        }
        Some(Cmd::H2Responder { addr }) => return tools::h2_responder(addr),
        Some(Cmd::OpenLoop { url, rate, seconds, connections, h2 }) => {
            println!("{}", serde_json::to_string(&tools::open_loop(url, *rate, *seconds, *connections, *h2)?)?);
            return Ok(());
        }
        Some(Cmd::HoldHttp { url, count, seconds, every, h2, token_bytes }) => {
            return tools::hold_http(url, *count, *seconds, *every, *h2, *token_bytes)
        }
        Some(Cmd::Hold { addr, count, seconds }) => return tools::hold(addr, *count, *seconds),
        None => {}
    }
    let want = |name: &str| args.scenario.iter().any(|s| s == "all" || s == name);
    let soak = args.scenario.iter().any(|s| s == "soak");
    // The idle-connection scenario holds thousands of sockets in the client and in each proxy.
    tools::raise_fd_limit(200_000);
    if want("http") {
        http::run(&args)?;
    }
    if want("tls") {
        tls::run(&args)?;
    }
    if want("kafka") {
        kafka::run(&args)?;
    }
    if want("hop") {
        hop(&args)?;
    }
    if want("propagation") {
        propagation::run(&args)?;
    }
    if want("cluster") {
        cluster::run(&args)?;
    }
    if want("tunnel") {
        cluster::run_tunnel(&args)?;
    }
    if soak {
        soak::run(&args)?;
    }
    Ok(())
}

fn hop(args: &Args) -> Result<()> {
    let me = std::env::current_exe()?;
    let me = me.to_str().context("exe path")?;
    let mut node = TestNode::new("bench")?;
    node.start_proxy(&[])?;
    node.spawn(None, &[me, "server", "127.0.0.1:7000"], "server.log")?;
    node.probe(None, &["wait-tcp", "127.0.0.1", "7000", "10"])?;
    let client_cg = node.cgroup_id("client")?;
    node.apply(&PolicySnapshot {
        endpoints: vec![endpoint(client_cg, 1, 1001, false, false)],
        ipcache: vec![],
        rules: vec![rule(
            1,
            Direction::Egress,
            Protocol::Tcp,
            identity::ANY,
            (7000, 7000),
            Action::Redirect(ProtocolHint::None),
            1,
        )],
    })?;

    let variants = ["direct", "redirected", "short-circuit"];
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); variants.len()];
    let (ex, bulk) = (args.exchanges.to_string(), args.bulk_bytes.to_string());
    for round in 0..args.rounds {
        for (i, variant) in variants.iter().enumerate() {
            let workload = match *variant {
                "direct" => None,
                _ => Some("client"),
            };
            node.maps()?.set_short_circuit(*variant == "short-circuit")?;
            let out = node.run_ok(workload, &[me, "client", "127.0.0.1:7000", &ex, &bulk])?;
            let sample: Sample = serde_json::from_str(&out).with_context(|| format!("client said {out}"))?;
            eprintln!("round {round} {variant:14} {sample:?}");
            samples[i].push(sample);
        }
    }
    let counters = node.counters()?;
    if counters.get(redirector::CounterKind::SkMsgRedirects) == 0 {
        bail!("the short-circuit variant never took the sk_msg path: {counters:?}");
    }
    let med: Vec<Sample> = samples
        .iter()
        .map(|s| Sample {
            rtt_p50_us: median(s.iter().map(|x| x.rtt_p50_us).collect()),
            rtt_p99_us: median(s.iter().map(|x| x.rtt_p99_us).collect()),
            exchanges_per_s: median(s.iter().map(|x| x.exchanges_per_s).collect()),
            bulk_mib_per_s: median(s.iter().map(|x| x.bulk_mib_per_s).collect()),
        })
        .collect();
    drop(node);

    let (direct, redirected, short) = (&med[0], &med[1], &med[2]);
    let hop = |s: &Sample| s.rtt_p50_us - direct.rtt_p50_us;
    let mut md = String::new();
    md.push_str(&format!(
        "Command: `make bench` (= `cargo run --release -p l7mesh-bench -- --rounds {} --exchanges {} --bulk-bytes {}`), \
         {} rounds alternating the variants, medians over rounds. Ping-pong of {MSG}-byte messages on one connection; \
         bulk: {} MiB echoed in {} KiB writes.\n\n",
        args.rounds,
        args.exchanges,
        args.bulk_bytes,
        args.rounds,
        args.bulk_bytes >> 20,
        CHUNK >> 10
    ));
    md.push_str("| variant | RTT p50 (µs) | RTT p99 (µs) | exchanges/s | vs direct | bulk MiB/s | vs direct |\n|---|---|---|---|---|---|---|\n");
    for (name, s) in variants.iter().zip(&med) {
        md.push_str(&format!(
            "| {name} | {:.1} | {:.1} | {:.0} | {:.2}x | {:.0} | {:.2}x |\n",
            s.rtt_p50_us,
            s.rtt_p99_us,
            s.exchanges_per_s,
            s.exchanges_per_s / direct.exchanges_per_s,
            s.bulk_mib_per_s,
            s.bulk_mib_per_s / direct.bulk_mib_per_s
        ));
    }
    md.push_str(&format!(
        "\nAdded round-trip latency of the proxy hop (p50 minus direct): redirected {:.1} µs, short-circuit {:.1} µs; \
         ratio short-circuit / redirected = **{:.2}** (the benchmark issue's target is <= 0.8).\n",
        hop(redirected),
        hop(short),
        hop(short) / hop(redirected)
    ));
    println!("{md}");
    write_section(&args.out, "redirector-hop", &md)?;
    let json = serde_json::json!({ "variants": variants, "medians": med, "rounds": samples });
    write_result(args, "redirector-hop.json", &serde_json::to_string_pretty(&json)?)?;
    Ok(())
}

mod cluster;
mod http;
mod kafka;
mod propagation;
mod soak;
mod tls;
mod tools;

/// Writes `name` into the results directory (`--results`).
pub(crate) fn write_result(args: &Args, name: &str, contents: &str) -> Result<()> {
    std::fs::create_dir_all(&args.results)?;
    std::fs::write(args.results.join(name), contents).with_context(|| format!("writing {name}"))
}

/// Replaces the text between `<!-- NAME:begin -->` and `<!-- NAME:end -->` in `path`.
pub(crate) fn write_section(path: &PathBuf, name: &str, body: &str) -> Result<()> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let (begin, end) = (format!("<!-- {name}:begin -->"), format!("<!-- {name}:end -->"));
    let new = match (text.find(&begin), text.find(&end)) {
        (Some(b), Some(e)) if b < e => format!("{}{begin}\n{body}{}", &text[..b], &text[e..]),
        _ => format!("{text}\n{begin}\n{body}{end}\n"),
    };
    std::fs::write(path, new)?;
    Ok(())
}

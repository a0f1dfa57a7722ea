//! l7proxy: the per-node proxy. It loads and owns the eBPF redirector, listens where the
//! redirector sends marked connections (egress 15001, ingress 15006), and serves the admin API.
#![forbid(unsafe_code)]

use l7proxy::{
    admin, client_addr, datapath, events, flow_history, flows, http, hubble, kafka, metrics, policy_stream, pool,
    proxy, registry, tls,
};

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use l7mesh_api::layout;
use redirector::{NodeConfig, ProxyAddrs, Redirector};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{error, info, warn};

/// The l7mesh node proxy. Attaches the eBPF redirector to the node's workload cgroups and
/// network namespace, then proxies every connection the redirector hands it to the connection's
/// original destination. Needs root (BPF, cgroups).
#[derive(Debug, Parser)]
#[command(name = "l7proxy", version)]
struct Args {
    #[command(flatten)]
    log: l7mesh_log::LogArgs,
    /// bpffs directory for the datapath's maps and links; they stay pinned (and enforcing)
    /// when this process stops, unless --uninstall-on-exit.
    #[arg(long, env = "L7MESH_PIN_DIR", default_value = layout::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// The node's cgroup (cgroup v2). Workloads live in <root>/workloads/<name>; the proxy moves
    /// itself into <root>/proxy.
    #[arg(long, env = "L7MESH_CGROUP_ROOT", default_value = layout::DEFAULT_CGROUP_ROOT)]
    cgroup_root: PathBuf,
    /// Network namespace whose inbound connections sk_lookup polices.
    #[arg(long, default_value = "/proc/self/ns/net")]
    netns: PathBuf,
    /// Port of the egress listener on 127.0.0.1 and [::1].
    #[arg(long, default_value_t = 15001)]
    egress_port: u16,
    /// Port of the ingress listener on 127.0.0.1 and [::1].
    #[arg(long, default_value_t = 15006)]
    ingress_port: u16,
    /// Admin API address (/healthz, /readyz, /metrics; /v1/flows and /v1/counters with the
    /// API token).
    #[arg(long, default_value = layout::DEFAULT_PROXY_ADMIN)]
    admin: SocketAddr,
    /// The node's API token (created, mode 0600, if missing; policy-api reads the same file):
    /// the admin API's /v1/* wants it as `Authorization: Bearer` (`l7ctl up` passes
    /// `<run dir>/api-token`) [default: /run/l7mesh/api-token].
    #[arg(long, env = "L7MESH_API_TOKEN_FILE")]
    api_token_file: Option<PathBuf>,
    /// When no proxy listener exists, let marked connections through unredirected instead of
    /// refusing them (checked in the kernel at each connect).
    #[arg(long)]
    fail_open: bool,
    /// Do not short-circuit the app <-> proxy loopback hop with sk_msg (every byte then takes
    /// the TCP loopback path; for measurements and as an escape hatch).
    #[arg(long, env = "L7PROXY_NO_SK_MSG")]
    no_sk_msg: bool,
    /// Remove every attachment and pinned map on a clean stop (enforcement stops).
    #[arg(long)]
    uninstall_on_exit: bool,
    /// How long open connections may continue after SIGTERM/SIGINT before they are closed.
    #[arg(long, default_value = "5", value_parser = parse_secs)]
    drain_timeout: Duration,
    /// policy-api's proxy socket: the compiled policy (L7 rules, workload and policy names)
    /// streams from there, each version swapped in whole (`l7ctl up` passes
    /// `<run dir>/policy-proxy.sock`); /readyz waits for the first version. Without it there
    /// are no L7 tables and only the kernel maps decide (the redirector tests run it so).
    #[arg(long, env = "L7PROXY_POLICY_SOCKET")]
    policy_socket: Option<PathBuf>,
    /// The TLS broker's proxy socket: certificates for `terminatingTLS` come from there only.
    #[arg(long, env = "L7MESH_BROKER_SOCKET", default_value = layout::DEFAULT_BROKER_PROXY_SOCKET)]
    broker_socket: PathBuf,
    /// Seconds after which a certificate from the broker is fetched anew at the latest; it is
    /// fetched sooner, after half its remaining life, when its notAfter says so. Live
    /// connections keep the one they started with.
    #[arg(long, env = "L7PROXY_CERT_REFRESH", default_value = "43200", value_parser = parse_secs)]
    cert_refresh: Duration,
    /// Server certificates cached for termination (minted per client-chosen SNI, or imported
    /// secrets); past it the least recently used is dropped (and fetched again if asked for).
    #[arg(long, env = "L7PROXY_CERT_CACHE_SIZE", default_value_t = 1024)]
    cert_cache_size: usize,
    /// Seconds a failed broker request for a name is remembered: meanwhile that name is not
    /// asked for again and a handshake that must wait for it fails at once
    /// (limit="tls_broker_backoff"); a cached certificate still valid is served regardless.
    #[arg(long, env = "L7PROXY_CERT_BROKER_BACKOFF", default_value = "5", value_parser = parse_secs)]
    cert_broker_backoff: Duration,
    /// Seconds to connect to an upstream (TCP, TLS, HTTP/2 handshake); longer gets 504 (gRPC:
    /// UNAVAILABLE), for that request only.
    #[arg(long, env = "L7PROXY_UPSTREAM_CONNECT_TIMEOUT", default_value = "10", value_parser = parse_secs)]
    upstream_connect_timeout: Duration,
    /// Seconds a pooled upstream HTTP connection may stay idle before it is closed.
    #[arg(long, env = "L7PROXY_UPSTREAM_IDLE_TIMEOUT", default_value = "90", value_parser = parse_secs)]
    upstream_idle_timeout: Duration,
    /// Upstream destinations the HTTP connection pool holds; past it the least recently used
    /// destination's pooled connections are closed.
    #[arg(long, env = "L7PROXY_UPSTREAM_MAX_DESTINATIONS", default_value_t = 1024)]
    upstream_max_destinations: usize,
    /// Upstream HTTP connections one source workload may hold open (pooled, busy or
    /// connecting); connections are never shared across workloads. At the cap its new
    /// connection closes one of its own idle ones and waits up to 1 s for one of its own to
    /// end, else that request gets 503 (gRPC UNAVAILABLE; limit="upstream_connections_per_workload").
    /// The default is Envoy's default circuit-breaker max_connections per cluster.
    #[arg(long, env = "L7PROXY_UPSTREAM_MAX_CONNECTIONS_PER_WORKLOAD", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    upstream_max_connections_per_workload: u32,
    /// Proxied connections (every stack: HTTP, gRPC, Kafka, TLS, SNI-forward, opaque) one
    /// source workload may hold open at once; an ingress peer from outside the node, or an
    /// egress source the kernel does not name, counts per remote address (IPv6: per /64). Over
    /// it the new connection is closed as accepted, before any upstream connect (a DENIED flow,
    /// limit="connections_per_workload"); other workloads are untouched. The default holds the
    /// soak benchmark's 10,000 HTTP/2 connections from one workload with room to spare; each
    /// connection may take two descriptors, so l7proxy warns at start when twice the bound
    /// reaches its RLIMIT_NOFILE.
    #[arg(long, env = "L7PROXY_MAX_CONNECTIONS_PER_WORKLOAD", default_value_t = 16384,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_connections_per_workload: u32,
    /// Largest HTTP request head in bytes (HTTP/1 buffer, HTTP/2 header list); larger gets 431.
    /// HTTP/1 heads are held to at most 256 KiB whatever this says (the framing scanner's bound).
    #[arg(long, env = "L7PROXY_MAX_HEADER_BYTES", default_value_t = 65536)]
    max_header_bytes: usize,
    /// Most header fields in an HTTP/1 request; more gets 431.
    #[arg(long, env = "L7PROXY_MAX_HEADERS", default_value_t = 100)]
    max_headers: usize,
    /// Seconds to receive a whole request head, and to wait idle between keep-alive requests.
    #[arg(long, env = "L7PROXY_HEADER_TIMEOUT", default_value = "10", value_parser = parse_secs)]
    header_timeout: Duration,
    /// Seconds for the upstream to answer with a response head; longer gets 504.
    #[arg(long, env = "L7PROXY_REQUEST_TIMEOUT", default_value = "60", value_parser = parse_secs)]
    request_timeout: Duration,
    /// Concurrent HTTP/2 streams per downstream connection.
    #[arg(long, env = "L7PROXY_MAX_CONCURRENT_STREAMS", default_value_t = 256)]
    max_concurrent_streams: u32,
    /// Largest Kafka request frame in bytes; a larger one closes the connection (logged,
    /// counted in l7mesh_limits_tripped_total{limit="kafka_request_frame"}).
    #[arg(long, env = "L7PROXY_MAX_KAFKA_FRAME", default_value_t = 16 << 20)]
    max_kafka_frame: usize,
    /// Largest Kafka response frame in bytes a broker may send; a larger one closes that
    /// connection (logged, limit="kafka_response_frame"). Above the 50 MiB clients fetch at
    /// most by default (Java's fetch.max.bytes).
    #[arg(long, env = "L7PROXY_MAX_KAFKA_RESPONSE_FRAME", default_value_t = 64 << 20)]
    max_kafka_response_frame: usize,
    /// Kafka requests awaiting their answer on one connection; at the bound the proxy reads no
    /// further request from that client until one is answered (limit="kafka_in_flight").
    #[arg(long, env = "L7PROXY_MAX_KAFKA_IN_FLIGHT", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_kafka_in_flight: u32,
    /// Bytes one Kafka connection may hold for answers not yet sent (local answers, requests
    /// kept to merge denied topics into the broker's answer); at the bound the proxy reads no
    /// further request until they drain (limit="kafka_pending_bytes").
    #[arg(long, env = "L7PROXY_MAX_KAFKA_PENDING_BYTES", default_value_t = 32 << 20,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_kafka_pending_bytes: u32,
    /// Items (array elements: topics, partitions, groups, ... and unknown tagged fields) one
    /// Kafka request or merged response may decode into, charged as each count is read; a
    /// request over it closes the connection (logged, limit="kafka_items"). Empty entries cost
    /// a few wire bytes but a hundred-plus bytes decoded: this, not the frame size, bounds the
    /// memory and work one request takes. Far above a real client's largest request.
    #[arg(long, env = "L7PROXY_MAX_KAFKA_ITEMS", default_value_t = 100_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_kafka_items: u32,
    /// Seconds for the rest of a Kafka request frame to arrive once its first byte has; a
    /// stall closes the connection (limit="kafka_frame_timeout"). Idle between frames is not
    /// limited (consumers idle for long).
    #[arg(long, env = "L7PROXY_KAFKA_FRAME_TIMEOUT", default_value = "30", value_parser = parse_secs)]
    kafka_frame_timeout: Duration,
    /// Bytes of Kafka request frames over 64 KiB being read, across all connections; at the
    /// bound a further such frame waits (its --kafka-frame-timeout running) for others to be
    /// judged (limit="kafka_frame_bytes"). Smaller frames never wait.
    #[arg(long, env = "L7PROXY_MAX_KAFKA_FRAME_BYTES", default_value_t = 256 << 20,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_kafka_frame_bytes: u32,
    /// Seconds a broker may stay silent while a request of the connection awaits its answer;
    /// then the connection is closed (limit="kafka_response_timeout"). Above Kafka's default
    /// request.timeout.ms (30 s) plus a long fetch wait.
    #[arg(long, env = "L7PROXY_KAFKA_RESPONSE_TIMEOUT", default_value = "120", value_parser = parse_secs)]
    kafka_response_timeout: Duration,
    /// Tokio worker threads (default: one per CPU this process may run on); 1 runs tokio's
    /// current-thread scheduler, a single event loop.
    #[arg(long, env = "L7PROXY_WORKER_THREADS")]
    worker_threads: Option<usize>,
    /// Serve Hubble's Observer API (the `hubble` CLI: `hubble observe --server unix://PATH`) on
    /// this unix socket, mode 0600 and root's only (`l7ctl up` passes `<run dir>/hubble.sock`);
    /// without it, no Hubble API.
    #[arg(long, env = "L7PROXY_HUBBLE_SOCKET")]
    hubble_socket: Option<PathBuf>,
    /// The port of the tunnel between nodes (mutual TLS, HTTP/2 CONNECT), served on every
    /// address once the node is in a cluster and its broker holds the node's intermediate; 0:
    /// never.
    #[arg(long, env = "L7PROXY_TUNNEL_PORT", default_value_t = l7mesh_api::layout::TUNNEL_PORT)]
    tunnel_port: u16,
    /// Flow records kept in memory for /v1/flows (oldest dropped first). The default is
    /// Hubble's event buffer size; each record takes about 0.6 KiB.
    #[arg(long, env = "L7PROXY_FLOW_CAPACITY", default_value_t = 4096)]
    flow_capacity: usize,
    /// Keep flows on disk in DIR as well (root's, 0700; files 0600): `/v1/flows?since=` then
    /// reaches back past the ring and across restarts. Without it, flows are in memory only.
    #[arg(long, env = "L7PROXY_FLOW_HISTORY_DIR", value_name = "DIR")]
    flow_history_dir: Option<std::path::PathBuf>,
    /// Bytes of flow history kept (the oldest segments are deleted beyond it): a number with
    /// an optional K, M, G suffix (KiB, MiB, GiB).
    #[arg(long, env = "L7PROXY_FLOW_HISTORY_MAX_BYTES", default_value = "256M", value_parser = parse_bytes)]
    flow_history_max_bytes: u64,
    /// Age after which flow history is deleted (30m, 12h, 7d).
    #[arg(long, env = "L7PROXY_FLOW_HISTORY_MAX_AGE", default_value = "7d", value_parser = parse_age)]
    flow_history_max_age: Duration,
    /// Capacity of the kernel's policy-rule map (L7_POLICY) when the datapath is created
    /// [default: 262144]; a pinned map keeps its size until `l7ctl down --uninstall`. An apply
    /// needs room for the version in force and the new one; one that does not fit is refused.
    #[arg(long, env = "L7PROXY_POLICY_MAP_ENTRIES")]
    policy_map_entries: Option<u32>,
    /// Capacity of the kernel's ipcache map (L7_IPCACHE), as --policy-map-entries [default: 65536].
    #[arg(long, env = "L7PROXY_IPCACHE_MAP_ENTRIES")]
    ipcache_map_entries: Option<u32>,
    /// Capacity of the kernel's endpoint map (L7_ENDPOINTS), as --policy-map-entries [default: 16384].
    #[arg(long, env = "L7PROXY_ENDPOINT_MAP_ENTRIES")]
    endpoint_map_entries: Option<u32>,
    /// Context labels on the connection and request families (comma-separated): workload,
    /// namespace, label:KEY (each also as source_... or destination_... for one side), method,
    /// status_class, grpc_status. Values are what the node knows: a peer it does not know is
    /// `world`, an unregistered local socket `unknown`, a non-standard method `other`.
    /// Default: none (the families' fixed labels only).
    #[arg(long, env = "L7PROXY_METRICS_CONTEXT", default_value = "")]
    metrics_context: metrics::MetricsContext,
    /// Label sets with context labels one family may hold; past it a new one is counted with
    /// every context label `other` (limit="metrics_series").
    #[arg(long, env = "L7PROXY_METRICS_MAX_SERIES", default_value_t = metrics::DEFAULT_MAX_SERIES as u32,
          value_parser = clap::value_parser!(u32).range(1..))]
    metrics_max_series: u32,
    /// What becomes of the X-Forwarded-For and Forwarded fields a client sends: `replace`
    /// (removed; the proxy's name the client alone, so a workload cannot claim another
    /// address) or `append` (kept, the client's address added last). Every HTTP request
    /// upstream carries both, naming the client.
    #[arg(long, env = "L7PROXY_FORWARDED_HEADERS", value_enum, default_value_t = client_addr::ForwardedMode::Replace)]
    forwarded_headers: client_addr::ForwardedMode,
    /// Original destination ports (comma-separated) whose opaque TCP connections (no HTTP or
    /// Kafka stack: L4-allowed bytes on an L7 port, serverNames passthrough) start with a PROXY
    /// protocol v2 header naming the client and the original destination. Only for backends
    /// that expect it (nginx `listen ... proxy_protocol`, HAProxy `accept-proxy`): any other
    /// reads the header as data.
    #[arg(long, env = "L7PROXY_PROXY_PROTOCOL_PORTS", value_delimiter = ',')]
    proxy_protocol_ports: Vec<u16>,
}

/// Whether an earlier l7proxy left the datapath pinned (and enforcing) in `pin_dir`.
fn datapath_pinned(pin_dir: &std::path::Path) -> bool {
    std::fs::read_dir(pin_dir).is_ok_and(|mut entries| entries.next().is_some())
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    s.trim_end_matches('s').parse::<f64>().map(Duration::from_secs_f64).map_err(|e| format!("{s}: {e}"))
}

/// `4096`, `64K`, `256M`, `2G` (binary multiples; `KiB`, `MiB`, `GiB` too).
fn parse_bytes(s: &str) -> Result<u64, String> {
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(digits);
    let n: u64 = n.parse().map_err(|_| format!("`{s}`: expected a number of bytes such as 256M"))?;
    let shift = match unit.trim_end_matches("iB").trim_end_matches('B') {
        "" => 0,
        "K" | "k" => 10,
        "M" => 20,
        "G" => 30,
        _ => return Err(format!("`{s}`: expected a number of bytes with an optional K, M or G")),
    };
    let bytes = n.checked_mul(1 << shift).ok_or_else(|| format!("`{s}`: too large"))?;
    // Below it, one segment (4 KiB at least) and the line being written could pass the bound.
    if bytes < MIN_FLOW_HISTORY_BYTES {
        return Err(format!("`{s}`: the flow history needs at least 64K (use --no-flow-history to keep none)"));
    }
    Ok(bytes)
}

const MIN_FLOW_HISTORY_BYTES: u64 = 64 << 10;

fn parse_age(s: &str) -> Result<Duration, String> {
    let age = flows::parse_duration(s).ok_or_else(|| format!("`{s}`: expected a duration such as 12h or 7d"))?;
    // Below it, each flow would be a segment of its own, made and deleted at once.
    if age < Duration::from_secs(60) {
        return Err(format!("`{s}`: the flow history keeps flows 1m at least (use --no-flow-history to keep none)"));
    }
    Ok(age)
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    die_with_parent()?;
    // (A background writer: a stalled stderr drops log lines, it never stalls a connection.)
    let _flush_logs_at_exit = l7mesh_log::init_background(args.log);
    if !nix::unistd::geteuid().is_root() {
        bail!("l7proxy must run as root: it loads eBPF programs (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN) and manages cgroups");
    }
    // Before anything is loaded: on a first start a history directory that is not safely ours
    // stops the start here, with its reason, while nothing enforces yet. On a restart (the
    // datapath is pinned and enforcing) it only costs the history: refusing to start would
    // take every L7 port down with it (a disk that fails likewise: `History::open_or_off`).
    if let Some(dir) = &args.flow_history_dir.clone() {
        match flow_history::prepare_dir(dir) {
            Err(e) if e.is_unsafe() && !datapath_pinned(&args.pin_dir) => return Err(e.into()),
            Err(e) if e.is_unsafe() => {
                error!(error = %e, "the flow history is off until the directory is fixed and l7proxy restarts; enforcement goes on");
                args.flow_history_dir = None;
            }
            _ => {}
        }
    }
    let nofile = raise_nofile_limit();
    // Two descriptors a connection (downstream and its own upstream leg): a bound above half the
    // limit lets one workload take every descriptor, which the bound is there to prevent.
    if let Some(limit) = nofile {
        let bound = u64::from(args.max_connections_per_workload);
        if bound.saturating_mul(2) >= limit {
            warn!(limit, bound, "--max-connections-per-workload allows one workload every open-file descriptor (RLIMIT_NOFILE); lower it or raise the limit");
        }
    }
    // One worker: tokio's current-thread scheduler (an event loop like HAProxy's `nbthread 1`
    // or Envoy's `--concurrency 1`), without the work-stealing machinery it would not use.
    let mut runtime = match args.worker_threads {
        Some(n) if n <= 1 => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    runtime.enable_all().build()?.block_on(run(args))
}

/// The open-file limit l7proxy asks for (soft and hard): as many descriptors as Docker and
/// containerd give a container by default, so that the per-workload connection bound (16,384,
/// two descriptors each) keeps one workload well below the node's ceiling.
const NOFILE_WANTED: u64 = 1 << 20;

/// Every proxied connection holds a descriptor downstream and one upstream (HTTP/1.1, opaque,
/// Kafka). The soft RLIMIT_NOFILE (often 1024) and, with CAP_SYS_RESOURCE, the hard one go up to
/// [`NOFILE_WANTED`] (at most the kernel's `fs.nr_open`); without it the soft limit goes up to
/// the hard one, which is then the ceiling on the connections the node carries. Returns the
/// soft limit in force.
fn raise_nofile_limit() -> Option<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => {
            warn!(error = %e, "could not read the open-file limit");
            return None;
        }
    };
    let kernel_ceiling =
        std::fs::read_to_string("/proc/sys/fs/nr_open").ok().and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or(hard);
    let wanted = NOFILE_WANTED.min(kernel_ceiling).max(hard);
    if wanted > hard && setrlimit(Resource::RLIMIT_NOFILE, wanted, wanted).is_ok() {
        info!(from = soft, to = wanted, "raised the open-file limit (soft and hard)");
        return Some(wanted);
    }
    if soft < hard {
        return match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => {
                info!(from = soft, to = hard, "raised the open-file limit");
                Some(hard)
            }
            Err(e) => {
                warn!(soft, hard, error = %e, "could not raise the open-file limit");
                Some(soft)
            }
        };
    }
    info!(limit = soft, "open-file limit");
    Some(soft)
}

async fn run(args: Args) -> Result<()> {
    let workloads = layout::workloads_cgroup(&args.cgroup_root);
    let proxy_cgroup = layout::proxy_cgroup(&args.cgroup_root);
    for dir in [&args.cgroup_root, &workloads, &proxy_cgroup] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
    }
    // The proxy's own sockets live in its cgroup: getsockopt(SO_ORIGINAL_DST) is attached there.
    std::fs::write(proxy_cgroup.join("cgroup.procs"), std::process::id().to_string())
        .with_context(|| format!("moving l7proxy into {}", proxy_cgroup.display()))?;

    let proxy = ProxyAddrs { egress_port: args.egress_port, ingress_port: args.ingress_port, ..ProxyAddrs::default() };
    ensure_upstream_source6(proxy.upstream_src6);

    let node = NodeConfig {
        pin_dir: args.pin_dir.clone(),
        workload_cgroup: workloads.clone(),
        node_cgroup: args.cgroup_root.clone(),
        proxy_cgroup,
        netns: args.netns.clone(),
        proxy,
        fail_open: args.fail_open,
        short_circuit: !args.no_sk_msg,
        map_sizes: redirector::MapSizes {
            endpoints: args.endpoint_map_entries,
            ipcache: args.ipcache_map_entries,
            policy: args.policy_map_entries,
        },
    };
    let mut redirector = Redirector::install(&node).context("attaching the eBPF redirector")?;
    let seeded = redirector.maps.seed_listeners(&workloads).context("seeding listeners")?;
    info!(listeners = seeded.listeners.len(), skipped_pids = seeded.skipped_pids, "seeded workload listeners");

    let egress4 = bind(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), args.egress_port))?;
    let ingress4 = bind(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), args.ingress_port))?;
    let egress6 = bind_optional_v6(args.egress_port);
    let ingress6 = bind_optional_v6(args.ingress_port);
    redirector.maps.register_ingress_listener(false, &ingress4).context("registering the ingress listener")?;
    if let Some(l) = &ingress6 {
        redirector.maps.register_ingress_listener(true, l).context("registering the IPv6 ingress listener")?;
    }
    let netns_cookie = redirector::current_netns_cookie().context("reading this netns's cookie")?;
    let ring = redirector.maps.events().context("opening the L4 event ring buffer")?;
    let maps: Arc<dyn datapath::Datapath> = Arc::new(redirector.maps);

    let metrics_config =
        metrics::MetricsConfig { context: args.metrics_context.clone(), max_series: args.metrics_max_series as usize };
    let metrics = Arc::new(metrics::Metrics::configured(Some(maps.clone()), metrics_config));
    // A history directory that is not safely ours is refused here, with its reason; a disk
    // that fails turns the history off; once open, the history fails open (errors are
    // counted, the ring keeps serving).
    let history = match &args.flow_history_dir {
        Some(dir) => flow_history::History::open_or_off(
            flow_history::HistoryConfig {
                dir: dir.clone(),
                max_bytes: args.flow_history_max_bytes,
                max_age: args.flow_history_max_age,
                interval: Duration::from_secs(1),
            },
            metrics.flow_history.clone(),
        )
        .or_else(|e| {
            // The datapath is attached by now: the history goes, enforcement stays.
            error!(error = %e, "the flow history is off until the directory is fixed and l7proxy restarts; enforcement goes on");
            anyhow::Ok(None)
        })?,
        None => None,
    };
    let flows = Arc::new(
        flows::FlowLog::new(args.flow_capacity)
            .starting_at(history.as_ref().map_or(1, |(_, next)| *next))
            .with_policy_verdicts(flows::PolicyVerdicts {
                connections: metrics.policy_connection_verdicts.clone(),
                requests: metrics.policy_request_verdicts.clone(),
            }),
    );
    let history = history.map(|(h, _)| h);
    let history_writer = match &history {
        Some(h) => Some(
            flow_history::HistoryWriter::start(h.clone(), flows.clone()).context("starting the flow history writer")?,
        ),
        None => None,
    };
    let registry = Arc::new(registry::Registry::new(maps.clone(), args.policy_socket.is_some()));
    let policy_version = args.policy_socket.as_ref().map(|_| Arc::new(std::sync::atomic::AtomicU64::new(0)));
    let live = Arc::new(proxy::LiveConnections::default());
    let shared = Arc::new(proxy::Shared {
        live: live.clone(),
        datapath: maps.clone(),
        registry: registry.clone(),
        netns_cookie,
        proxy,
        flows: flows.clone(),
        metrics: metrics.clone(),
        limits: http::HttpLimits {
            max_header_bytes: args.max_header_bytes,
            max_headers: args.max_headers,
            header_timeout: args.header_timeout,
            request_timeout: args.request_timeout,
            max_concurrent_streams: args.max_concurrent_streams,
            kafka: kafka::KafkaLimits {
                max_request_frame: args.max_kafka_frame,
                max_response_frame: args.max_kafka_response_frame,
                max_in_flight: args.max_kafka_in_flight as usize,
                max_pending_bytes: args.max_kafka_pending_bytes as usize,
                max_items: args.max_kafka_items as usize,
                frame_timeout: args.kafka_frame_timeout,
                max_frame_bytes: args.max_kafka_frame_bytes as usize,
                response_timeout: args.kafka_response_timeout,
            },
        },
        pool: pool::UpstreamPool::new(
            pool::PoolConfig {
                connect_timeout: args.upstream_connect_timeout,
                idle_timeout: args.upstream_idle_timeout,
                max_destinations: args.upstream_max_destinations,
                max_connections_per_workload: args.upstream_max_connections_per_workload as usize,
            },
            metrics.clone(),
        ),
        certs: tls::CertSource::new(
            args.broker_socket.clone(),
            args.cert_refresh,
            args.cert_cache_size,
            args.cert_broker_backoff,
            metrics.clone(),
        ),
        connections: l7proxy::limits::ConnectionCounts::new(args.max_connections_per_workload as usize),
        client_address: client_addr::ClientAddressConfig {
            forwarded: args.forwarded_headers,
            proxy_protocol_ports: args.proxy_protocol_ports.iter().copied().collect(),
        },
        tunnel: Default::default(),
    });
    let api_token_file =
        args.api_token_file.clone().unwrap_or_else(|| layout::api_token(std::path::Path::new(layout::DEFAULT_RUN_DIR)));
    if let Some(dir) = api_token_file.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Err(e) = l7mesh_api::token::load_or_create(&api_token_file) {
        // Fail closed: /v1/* is refused until the file holds a token.
        warn!(file = %api_token_file.display(), error = %e, "could not create the API token; the admin API's /v1/* is refused");
    }
    let admin_state = Arc::new(admin::Admin {
        api_token_file,
        ready: false.into(),
        flows: flows.clone(),
        metrics: metrics.clone(),
        maps: maps.clone(),
        policy_version: policy_version.clone(),
        history,
        shared: Some(shared.clone()),
    });
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    tokio::spawn(l7proxy::tunnel::start_when_ready(shared.clone(), args.tunnel_port));
    if let (Some(socket), Some(loaded)) = (args.policy_socket.clone(), policy_version) {
        tokio::spawn(policy_stream::follow(socket, registry.clone(), live, loaded, shutdown_rx.clone()));
    }

    let admin_listener =
        TcpListener::bind(args.admin).await.with_context(|| format!("binding admin {}", args.admin))?;
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(admin::serve(admin_listener, admin_state.clone(), shutdown_rx.clone()));
    tasks.spawn(events::pump(ring, registry.clone(), flows.clone(), metrics.clone(), shutdown_rx.clone()));
    if let Some(path) = &args.hubble_socket {
        let listener = l7mesh_hubble::server::bind(path)?;
        let source = Arc::new(hubble::RingSource { flows: flows.clone(), node_name: hubble::node_name() });
        let observer = l7mesh_hubble::server::Observer::new(
            source,
            hubble::node_name(),
            format!("l7proxy {}", env!("CARGO_PKG_VERSION")),
            shutdown_rx.clone(),
        );
        let (mut stop, mut stop_late) = (shutdown_rx.clone(), shutdown_rx.clone());
        let shown = path.display().to_string();
        let drain = args.drain_timeout;
        tasks.spawn(async move {
            let stopped = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            // A client that keeps its connection open past the drain time does not hold the stop.
            let late = async move {
                let _ = stop_late.wait_for(|s| *s).await;
                tokio::time::sleep(drain).await;
            };
            tokio::select! {
                served = l7mesh_hubble::server::serve(listener, observer, stopped) => if let Err(e) = served {
                    warn!(socket = %shown, error = %e, "the Hubble API stopped");
                },
                _ = late => warn!(socket = %shown, "Hubble clients still connected at the end of the drain; closed"),
            }
        });
        info!(socket = %path.display(), "Hubble API on unix socket (root only)");
    }
    let listeners = [
        (Some(egress4), proxy::Direction::Egress),
        (Some(ingress4), proxy::Direction::Ingress),
        (egress6, proxy::Direction::Egress),
        (ingress6, proxy::Direction::Ingress),
    ];
    for (listener, direction) in listeners {
        if let Some(listener) = listener {
            let listener = TcpListener::from_std(listener)?;
            tasks.spawn(proxy::serve(listener, direction, shared.clone(), shutdown_rx.clone(), args.drain_timeout));
        }
    }
    admin_state.ready.store(true, Ordering::Release);
    info!(egress = args.egress_port, ingress = args.ingress_port, admin = %args.admin, fail_open = args.fail_open, "l7proxy ready");

    wait_for_signal().await?;
    admin_state.ready.store(false, Ordering::Release);
    info!("stopping: draining connections");
    let _ = shutdown_tx.send(true);
    while tasks.join_next().await.is_some() {}
    if let Some(path) = &args.hubble_socket {
        // No client finds a socket nobody serves; the next start binds it anew either way.
        let _ = std::fs::remove_file(path);
    }
    drop(shared);
    drop(admin_state);
    // The flows of the drain too.
    if let Some(writer) = history_writer {
        writer.stop();
    }
    if args.uninstall_on_exit {
        let removed = redirector::uninstall(&args.pin_dir).context("removing the datapath")?;
        info!(removed, "datapath removed from {}; enforcement stopped", args.pin_dir.display());
    } else {
        info!(
            "stopped; the datapath stays pinned at {} (marked connections {} until a proxy returns)",
            args.pin_dir.display(),
            if args.fail_open { "pass unredirected" } else { "are refused" }
        );
    }
    Ok(())
}

async fn wait_for_signal() -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    Ok(())
}

fn bind(addr: SocketAddr) -> Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into()).with_context(|| format!("binding {addr}"))?;
    socket.listen(4096)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

fn bind_optional_v6(port: u16) -> Option<std::net::TcpListener> {
    match bind(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port)) {
        Ok(l) => Some(l),
        Err(e) => {
            warn!(port, error = %e, "no IPv6 listener (IPv6 disabled?); IPv6 marked connections will be refused");
            None
        }
    }
}

/// IPv6 has a single loopback address, so the proxy's upstream source is an extra address on
/// `lo`. Added with iproute2 (present wherever l7mesh runs) rather than a netlink crate: one
/// idempotent call at start.
fn ensure_upstream_source6(addr: Ipv6Addr) {
    let present = std::process::Command::new("ip")
        .args(["-6", "addr", "show", "dev", "lo"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(&addr.to_string()))
        .unwrap_or(false);
    if present {
        return;
    }
    let status = std::process::Command::new("ip")
        .args(["-6", "addr", "add", &format!("{addr}/128"), "dev", "lo", "nodad"])
        .status();
    if !matches!(status, Ok(s) if s.success()) {
        warn!(%addr, "could not add the proxy's IPv6 upstream source to lo; IPv6 upstream legs rely on SO_MARK alone");
    }
}

/// `l7ctl up` names itself in `L7MESH_PARENT_PID`: this process then ends with it (SIGTERM
/// when it dies, even by SIGKILL), so no part of a killed node lingers unsupervised. Set
/// before any thread starts (the kernel keeps it per thread).
fn die_with_parent() -> Result<()> {
    let Ok(parent) = std::env::var("L7MESH_PARENT_PID") else { return Ok(()) };
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM).context("PR_SET_PDEATHSIG")?;
    // The parent may have died before the call: then it was never armed.
    if parent.parse::<i32>().ok() != Some(nix::unistd::getppid().as_raw()) {
        bail!("l7ctl up (pid {parent}) is gone; not starting");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `l7ctl up` lets through (its own check) l7proxy reads, and the same refusals.
    #[test]
    fn flow_history_sizes_and_ages() {
        for (s, bytes) in [("65536", 65536), ("64K", 64 << 10), ("64k", 64 << 10), ("256M", 256 << 20), ("2G", 2 << 30)]
        {
            assert_eq!(parse_bytes(s), Ok(bytes), "{s}");
        }
        assert_eq!(parse_bytes("256MiB"), Ok(256 << 20));
        assert_eq!(parse_bytes("1GB"), Ok(1 << 30));
        for bad in ["", "M", "12T", "1.5G", "-1", "99999999999999999G", "256 M"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
        // A bound smaller than a segment (or than one flow line) could not be kept.
        for small in ["0", "100", "4096", "65535", "63K"] {
            let e = parse_bytes(small).unwrap_err();
            assert!(e.contains("at least 64K"), "{small}: {e}");
        }
        assert_eq!(parse_age("7d"), Ok(Duration::from_secs(7 * 86400)));
        assert!(parse_age("7 days").is_err());
        for short in ["0", "0s", "59s", "59"] {
            assert!(parse_age(short).unwrap_err().contains("1m at least"), "{short}");
        }
        assert_eq!(parse_age("1m"), Ok(Duration::from_secs(60)));
        let args = Args::try_parse_from(["l7proxy"]).unwrap();
        assert_eq!(
            (args.flow_history_max_bytes, args.flow_history_max_age),
            (256 << 20, Duration::from_secs(7 * 86400))
        );
        assert!(args.flow_history_dir.is_none(), "l7proxy alone keeps flows in memory only");
    }
}

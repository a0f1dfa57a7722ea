//! policy-api: the node's policy store and controller (REST API on 127.0.0.1:9090, the
//! control socket for `l7ctl run`, the policy stream to l7proxy). `l7ctl up` runs it.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use l7mesh_api::layout::{
    NodePaths, DEFAULT_API, DEFAULT_CGROUP_ROOT, DEFAULT_PIN_DIR, DEFAULT_PROXY_ADMIN, DEFAULT_RUN_DIR,
    DEFAULT_STATE_DIR,
};
use policy_api::node::Controller;
use policy_api::proxy_channel::ProxyHub;
use policy_api::server::{router, NodeServer, POLL_FILES};
use tokio::net::UnixListener;
use tracing::{info, warn};

#[derive(Parser)]
#[command(name = "policy-api", version, about = "The l7mesh node's policy store, controller and REST API")]
struct Args {
    #[command(flatten)]
    log: l7mesh_log::LogArgs,
    /// State directory (the store); created 0700.
    #[arg(long, env = "L7MESH_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Directory of the node's sockets (control socket, policy stream).
    #[arg(long, env = "L7MESH_RUN_DIR", default_value = DEFAULT_RUN_DIR)]
    run_dir: PathBuf,
    /// The node's cgroup (workloads go in <root>/workloads/<name>).
    #[arg(long, env = "L7MESH_CGROUP_ROOT", default_value = DEFAULT_CGROUP_ROOT)]
    cgroup_root: PathBuf,
    /// bpffs directory of the datapath (l7proxy attaches it; policy-api writes its maps).
    #[arg(long, env = "L7MESH_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Policy file or directory, applied at start and re-applied whenever it changes. A change
    /// that does not validate is reported and ignored: the last good policy stays in force.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Address of the REST API.
    #[arg(long, env = "L7MESH_API", default_value = DEFAULT_API)]
    listen: SocketAddr,
    /// l7proxy's admin address (flows are read there).
    #[arg(long, default_value = DEFAULT_PROXY_ADMIN)]
    proxy_admin: SocketAddr,
    #[command(flatten)]
    cluster: ClusterArgs,
}

/// Joining a cluster: the policy set, the nodes and their workloads in etcd.
#[derive(clap::Args)]
struct ClusterArgs {
    /// The cluster's etcd: `etcd://HOST:PORT[,HOST:PORT..]` (`etcd+tls://` with TLS). Without
    /// it the node keeps its policy to itself (its own store).
    #[arg(long)]
    kvstore: Option<String>,
    /// The CA certificate (PEM) that signed etcd's server certificate: TLS to etcd.
    #[arg(long, requires = "kvstore")]
    kvstore_ca: Option<PathBuf>,
    /// The node's client certificate (PEM) for etcd, with --kvstore-key.
    #[arg(long, requires_all = ["kvstore_ca", "kvstore_key"])]
    kvstore_cert: Option<PathBuf>,
    #[arg(long, requires = "kvstore_cert")]
    kvstore_key: Option<PathBuf>,
    /// The key prefix of the cluster in etcd.
    #[arg(long, default_value = l7mesh_api::cluster::DEFAULT_PREFIX)]
    kvstore_prefix: String,
    /// Seconds of the node's lease: how long its workloads stay listed after it dies.
    #[arg(long, default_value_t = 10)]
    kvstore_lease_ttl: i64,
    /// This node's name in the cluster (default: the hostname).
    #[arg(long)]
    node_name: Option<String>,
    /// Take the cluster's policy set even where it replaces policies this node had before it
    /// joined, or a set that came from another etcd cluster or prefix (refused otherwise).
    #[arg(long, requires = "kvstore")]
    kvstore_adopt: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    die_with_parent()?;
    // (A background writer: a stalled stderr drops log lines, it never stalls the async threads
    // that read l7proxy's acknowledgements.)
    let _flush_logs_at_exit = l7mesh_log::init_background(args.log);
    if !nix::unistd::geteuid().is_root() {
        bail!("policy-api needs root (it manages cgroups and writes the eBPF maps)");
    }
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?.block_on(run(args))
}

fn bind_private(path: &std::path::Path) -> Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt as _;
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

async fn run(args: Args) -> Result<()> {
    let paths = NodePaths::new(args.state_dir, args.run_dir, args.cgroup_root, args.pin_dir);
    std::fs::create_dir_all(&paths.run_dir).with_context(|| format!("creating {}", paths.run_dir.display()))?;
    let cluster = match &args.cluster.kvstore {
        None => None,
        Some(kvstore) => {
            if args.policy.is_some() {
                bail!("--policy and --kvstore: in a cluster the policy set is the cluster's; apply the files with `l7ctl apply -f` on any node");
            }
            let node = match args.cluster.node_name.clone().or_else(policy_api::cluster::default_node_name) {
                Some(n) => n,
                None => bail!("the hostname is not a valid node name: give --node-name"),
            };
            let tls = args.cluster.kvstore_ca.clone().map(|ca| policy_api::cluster::ClusterTls {
                ca,
                cert: args.cluster.kvstore_cert.clone(),
                key: args.cluster.kvstore_key.clone(),
            });
            std::fs::create_dir_all(&paths.state_dir)
                .with_context(|| format!("creating {}", paths.state_dir.display()))?;
            let mut config = policy_api::cluster::ClusterConfig::with_state(
                kvstore,
                tls,
                node,
                args.cluster.kvstore_prefix.clone(),
                args.cluster.kvstore_lease_ttl,
                paths.state_dir.join("cluster.json"),
                args.cluster.kvstore_adopt,
            )?;
            config.run_dir = Some(paths.run_dir.clone());
            Some(policy_api::cluster::Cluster::new(config))
        }
    };
    let hub = ProxyHub::new();
    let controller = Controller::open(paths.clone(), args.policy.clone())?
        .with_proxy_hub(hub.clone())
        .with_reserved_ports(vec![args.listen.port(), args.proxy_admin.port()]);
    let api = tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    let token = policy_api::server::load_or_create_token(&paths.api_token())
        .with_context(|| format!("the API token at {}", paths.api_token().display()))?;
    let server = NodeServer::new(controller, hub.clone(), args.proxy_admin, token.clone(), cluster.clone());
    tokio::spawn(hub.serve(bind_private(&paths.proxy_socket())?));

    // The datapath is l7proxy's; wait for its maps before the first apply.
    let mut waited = false;
    while !(redirector::is_installed(&paths.pin_dir) && redirector::Maps::open(&paths.pin_dir).is_ok()) {
        if !waited {
            info!(pin_dir = %paths.pin_dir.display(), "waiting for l7proxy to attach the datapath");
            waited = true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Workloads whose commands ended while no policy-api ran go now; the rest stay registered.
    server.sweep().await;
    // What the store holds first (after a stop, the version that was in force), then the
    // policy files, as one more version that goes in force everywhere or nowhere.
    server.reconcile().await?;
    server.reload_policy_files().await;
    if let Some(cluster) = cluster.clone() {
        // The node serves what its store holds meanwhile; the cluster's set follows once
        // etcd answers.
        tokio::spawn(cluster.run(server.clone()));
    }
    tokio::spawn(server.clone().serve_control(bind_private(&paths.socket())?));
    let app = router(server.clone(), token);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(api, app).await {
            warn!(error = %e, "REST API stopped");
        }
    });
    let s = server.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(POLL_FILES).await;
            s.converge().await;
            s.refresh_in_force().await;
            s.reload_policy_files().await;
            s.sweep().await;
        }
    });
    println!("policy-api ready: REST API on http://{}, control socket {}", args.listen, paths.socket().display());

    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    if let Some(cluster) = &cluster {
        cluster.leave().await;
    }
    let _ = std::fs::remove_file(paths.socket());
    let _ = std::fs::remove_file(paths.proxy_socket());
    info!("policy-api stopped; the policy in force stays until the node stops");
    Ok(())
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

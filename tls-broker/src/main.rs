//! tls-broker daemon.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Parser;
use l7mesh_api::layout;
use tls_broker::server::{bind, serve, ProxyIdentity, Role};
use tls_broker::Ca;

/// The l7mesh TLS broker: holds the mesh CA and imported secrets, and hands certificates and keys
/// only to the proxy. Needs root.
#[derive(Parser)]
#[command(name = "tls-broker", version)]
struct Args {
    #[command(flatten)]
    log: l7mesh_log::LogArgs,
    /// State directory (created 0700; keys 0600).
    #[arg(long, default_value = layout::DEFAULT_BROKER_STATE_DIR)]
    state_dir: PathBuf,
    /// Directory of the sockets (`broker-admin.sock`, root only; `broker-proxy.sock`).
    #[arg(long, default_value = layout::DEFAULT_RUN_DIR)]
    run_dir: PathBuf,
    /// The proxy's uid: the only uid the proxy socket serves.
    #[arg(long, default_value_t = 0)]
    proxy_uid: u32,
    /// The proxy's cgroup, relative to the cgroup2 mount (e.g. /l7mesh/proxy): callers of the
    /// proxy socket must be in it.
    #[arg(long)]
    proxy_cgroup: String,
    /// The l7proxy executable: callers of the proxy socket must be running it (a restarted
    /// l7proxy is served again; one whose file was replaced is refused until restarted).
    #[arg(long)]
    proxy_exe: PathBuf,
    /// Lifetime of issued leaf certificates, in seconds (at least 10). The proxy fetches a leaf
    /// anew after half its remaining life and never serves one past its notAfter.
    #[arg(long, env = "L7MESH_LEAF_LIFETIME", default_value_t = tls_broker::ca::LEAF_LIFETIME.as_secs())]
    leaf_lifetime: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    die_with_parent()?;
    // (A background writer: a stalled stderr drops log lines, it never stalls the broker.)
    let _flush_logs_at_exit = l7mesh_log::init_background(args.log);
    if !nix::unistd::geteuid().is_root() {
        bail!("tls-broker must run as root (it guards the mesh CA key)");
    }
    tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?.block_on(async move {
        let ca = Arc::new(
            Ca::open(&args.state_dir)
                .context("opening the CA")?
                .with_leaf_lifetime(std::time::Duration::from_secs(args.leaf_lifetime.max(10))),
        );
        std::fs::create_dir_all(&args.run_dir)?;
        let admin = bind(&layout::broker_admin_socket(&args.run_dir), 0o600)?;
        // The proxy socket's file is 0666: who may use it is decided by peer credentials.
        let proxy = bind(&layout::broker_proxy_socket(&args.run_dir), 0o666)?;
        let exe = std::fs::canonicalize(&args.proxy_exe)
            .with_context(|| format!("--proxy-exe {}", args.proxy_exe.display()))?;
        let identity = ProxyIdentity { uid: args.proxy_uid, cgroup: args.proxy_cgroup.clone(), exe };
        tokio::spawn(serve(admin, Role::Admin, ca.clone(), None));
        tokio::spawn(serve(proxy, Role::Proxy, ca, Some(identity)));
        tracing::info!("tls-broker ready: sockets in {}", args.run_dir.display());
        tokio::signal::ctrl_c().await?;
        Ok(())
    })
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

//! l7ctl: the command users type (DESIGN.md).
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use policy_api::control::{Reply, Request};
use policy_api::node::{
    Controller, NodePaths, ReconcileReport, DEFAULT_CGROUP_ROOT, DEFAULT_RUN_DIR, DEFAULT_STATE_DIR,
};
use policy_api::validate::{load_path, Severity};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{error, info, warn};

#[derive(Parser)]
#[command(name = "l7ctl", version, about = "Run and operate an l7mesh node", long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the whole node in the foreground (l7proxy with the eBPF redirector, and the policy
    /// controller) until SIGINT/SIGTERM. Ready when 127.0.0.1:15000/readyz answers 200. A clean
    /// stop removes every attachment: enforcement stops.
    Up(UpArgs),
    /// Run CMD as a workload: its own cgroup, registered with its labels before CMD starts,
    /// deregistered when it exits. Runs as an unprivileged user with no capabilities unless
    /// --user/--cap say otherwise. Exits with CMD's status.
    Run(RunArgs),
    /// Check policy files without applying them: every error names file, line and field.
    /// Exit 1 on any error, 0 otherwise (warnings included).
    Validate {
        /// A policy file or a directory of *.yaml, *.yml, *.json files.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Print the mesh CA certificate (PEM) that workloads may trust. Never a key.
    Ca {
        /// Directory of the node's sockets.
        #[arg(long, env = "L7MESH_RUN_DIR", default_value = DEFAULT_RUN_DIR)]
        run_dir: PathBuf,
    },
    /// TLS secrets held by the broker (never by a workload).
    Secret {
        #[command(subcommand)]
        cmd: SecretCmd,
    },
}

#[derive(Subcommand)]
enum SecretCmd {
    /// Import a secret: a certificate and its key, and/or a CA (a CA alone is a trust anchor).
    Import {
        /// Secret name, as policies name it (`terminatingTLS.secret.name`).
        name: String,
        #[arg(long, default_value = "default")]
        namespace: String,
        /// PEM certificate (chain) file.
        #[arg(long, requires = "key")]
        cert: Option<PathBuf>,
        /// PEM private key file.
        #[arg(long, requires = "cert")]
        key: Option<PathBuf>,
        /// PEM CA bundle file.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Directory of the node's sockets.
        #[arg(long, env = "L7MESH_RUN_DIR", default_value = DEFAULT_RUN_DIR)]
        run_dir: PathBuf,
    },
}

#[derive(clap::Args)]
struct NodeDirs {
    /// State directory (store, proxy tables); created 0700.
    #[arg(long, env = "L7MESH_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Directory of the node's control socket.
    #[arg(long, env = "L7MESH_RUN_DIR", default_value = DEFAULT_RUN_DIR)]
    run_dir: PathBuf,
}

#[derive(clap::Args)]
struct UpArgs {
    #[command(flatten)]
    dirs: NodeDirs,
    /// Policy file or directory, applied at start and re-applied whenever it changes. A change
    /// that does not validate is reported and ignored: the last good policy stays in force.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// When l7proxy is not listening, let marked connections through unredirected instead of
    /// refusing them.
    #[arg(long)]
    fail_open: bool,
    /// The node's cgroup (workloads go in <root>/workloads/<name>).
    #[arg(long, env = "L7MESH_CGROUP_ROOT", default_value = DEFAULT_CGROUP_ROOT)]
    cgroup_root: PathBuf,
    /// bpffs directory of the datapath.
    #[arg(long, env = "L7MESH_PIN_DIR", default_value = "/sys/fs/bpf/l7mesh")]
    pin_dir: PathBuf,
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    dirs: NodeDirs,
    /// Workload name (unique among running workloads; a DNS label).
    #[arg(long)]
    name: String,
    /// Labels, k=v[,k=v] (`k8s:` prefixes allowed); `io.kubernetes.pod.namespace=NS` sets the
    /// namespace (default: default).
    #[arg(long, default_value = "")]
    labels: String,
    /// User to run CMD as.
    #[arg(long, default_value = "nobody")]
    user: String,
    /// Capability to keep (e.g. net_bind_service for ports below 1024); repeatable.
    #[arg(long = "cap")]
    caps: Vec<String>,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, required = true, num_args = 1..)]
    cmd: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .without_time()
        .init();
    let result = match cli.cmd {
        Cmd::Validate { file } => validate(&file),
        Cmd::Ca { run_dir } => broker_admin(&run_dir, &tls_broker::Request::Ca).map(|reply| {
            print!("{}", reply.ca.unwrap_or_default());
            ExitCode::SUCCESS
        }),
        Cmd::Secret { cmd: SecretCmd::Import { name, namespace, cert, key, ca, run_dir } } => (|| {
            let read = |p: &Option<PathBuf>| -> Result<Option<String>> {
                p.as_ref()
                    .map(|p| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display())))
                    .transpose()
            };
            let request = tls_broker::Request::Import {
                namespace: namespace.clone(),
                name: name.clone(),
                cert: read(&cert)?,
                key: read(&key)?,
                ca: read(&ca)?,
            };
            if cert.is_none() && ca.is_none() {
                bail!("give --cert and --key, or --ca, or both");
            }
            broker_admin(&run_dir, &request)?;
            println!("secret {namespace}/{name} imported into the broker");
            Ok(ExitCode::SUCCESS)
        })(),
        Cmd::Up(args) => runtime().and_then(|rt| rt.block_on(up(args))),
        Cmd::Run(args) => runtime().and_then(|rt| rt.block_on(run(args))),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("l7ctl: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// One request on the broker's root-only admin socket.
fn broker_admin(run_dir: &Path, request: &tls_broker::Request) -> Result<tls_broker::Reply> {
    use std::io::{BufRead, Write};
    let path = run_dir.join("broker-admin.sock");
    let mut stream = std::os::unix::net::UnixStream::connect(&path).map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the TLS broker at {} ({e}); is `l7ctl up` running, and are you root?",
            path.display()
        )
    })?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut reply = String::new();
    std::io::BufReader::new(stream).read_line(&mut reply)?;
    let reply: tls_broker::Reply = serde_json::from_str(&reply).context("the broker's reply")?;
    if !reply.ok {
        bail!("the broker refused: {}", reply.error.unwrap_or_default());
    }
    Ok(reply)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

fn require_root(what: &str) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("{what} needs root (it manages cgroups and the eBPF datapath)");
    }
    Ok(())
}

fn validate(file: &Path) -> Result<ExitCode> {
    let (policies, diags) = load_path(file);
    for d in &diags {
        println!("{d}");
    }
    let errors = diags.iter().filter(|d| d.severity == Severity::Error).count();
    if errors > 0 {
        println!("{errors} error(s); nothing would be applied");
        return Ok(ExitCode::from(1));
    }
    println!("{} policies valid", policies.len());
    Ok(ExitCode::SUCCESS)
}

fn print_diagnostics(diags: &[policy_api::validate::Diagnostic]) {
    for d in diags {
        eprintln!("l7ctl: {d}");
    }
}

fn report(r: &ReconcileReport) {
    // Warnings are said when they change, not at every reconcile.
    static LAST: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    if *last != r.warnings {
        for w in r.warnings.iter().filter(|w| !last.contains(w)) {
            eprintln!("l7ctl: warning: {w}");
        }
        *last = r.warnings.clone();
    }
    info!(
        version = r.version,
        generation = r.generation,
        policies = r.policies,
        workloads = r.workloads,
        kernel_rules = r.kernel_rules,
        closed_connections = r.closed_connections,
        "policy applied"
    );
}

async fn up(args: UpArgs) -> Result<ExitCode> {
    require_root("l7ctl up")?;
    let paths = NodePaths::new(args.dirs.state_dir, args.dirs.run_dir, args.cgroup_root, args.pin_dir);
    std::fs::create_dir_all(&paths.run_dir).with_context(|| format!("creating {}", paths.run_dir.display()))?;
    let socket = paths.socket();
    if UnixStream::connect(&socket).await.is_ok() {
        bail!("a node is already running (its socket {} answers)", socket.display());
    }
    let _ = std::fs::remove_file(&socket);
    let mut controller = Controller::open(paths.clone(), args.policy.clone())?;
    for name in controller.forget_stale_workloads()? {
        warn!(workload = %name, "forgot a workload left registered by an earlier node");
    }
    if let Some(diags) = controller.reload_policy_files()? {
        print_diagnostics(&diags);
        if diags.iter().any(|d| d.severity == Severity::Error) {
            eprintln!("l7ctl: the policy files have errors; starting with the policies already in the store");
        }
    }

    let proxy_bin = sibling_binary("l7proxy")?;
    let mut proxy_args: Vec<String> = vec![
        "--pin-dir".into(),
        paths.pin_dir.display().to_string(),
        "--cgroup-root".into(),
        paths.cgroup_root.display().to_string(),
        "--state-dir".into(),
        paths.state_dir.display().to_string(),
        "--broker-socket".into(),
        paths.run_dir.join("broker-proxy.sock").display().to_string(),
        "--uninstall-on-exit".into(),
    ];
    if args.fail_open {
        proxy_args.push("--fail-open".into());
    }
    // The TLS broker: the only holder of keys; its proxy socket serves the proxy's cgroup only.
    let broker_bin = sibling_binary("tls-broker")?;
    let cgroup2 = policy_api::node::cgroup2_mount();
    let proxy_cgroup =
        format!("/{}", paths.cgroup_root.join("proxy").strip_prefix(&cgroup2).unwrap_or(Path::new("proxy")).display());
    let _broker = tokio::process::Command::new(&broker_bin)
        .args(["--state-dir", &paths.state_dir.join("broker").display().to_string()])
        .args(["--run-dir", &paths.run_dir.display().to_string()])
        .args(["--proxy-cgroup", &proxy_cgroup])
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", broker_bin.display()))?;
    let mut proxy = spawn_proxy(&proxy_bin, &proxy_args)?;
    wait_for_datapath(&paths.pin_dir, &mut proxy).await?;
    report(&controller.reconcile()?);
    wait_ready(&mut proxy).await?;
    println!("l7mesh node ready: l7proxy admin on 127.0.0.1:15000, control socket {}", socket.display());

    let listener = UnixListener::bind(&socket).with_context(|| format!("binding {}", socket.display()))?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
    }
    let controller = Arc::new(Mutex::new(controller));
    let ctl = controller.clone();
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(serve_client(stream, ctl.clone()));
                }
                Err(e) => warn!(error = %e, "control socket accept"),
            }
        }
    });
    let ctl = controller.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let ctl = ctl.clone();
            let _ = tokio::task::spawn_blocking(move || {
                let mut c = ctl.lock().unwrap_or_else(|e| e.into_inner());
                match c.reload_policy_files() {
                    Ok(None) => {}
                    Ok(Some(diags)) => {
                        print_diagnostics(&diags);
                        if diags.iter().any(|d| d.severity == Severity::Error) {
                            eprintln!("l7ctl: policy change rejected; the last good policy stays in force");
                        } else {
                            match c.reconcile() {
                                Ok(r) => report(&r),
                                Err(e) => error!(error = %e, "applying the changed policy"),
                            }
                        }
                    }
                    Err(e) => error!(error = %e, "reading the policy files"),
                }
            })
            .await;
        }
    });

    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            status = proxy.wait() => {
                error!(status = ?status, "l7proxy exited; restarting it (the datapath stays pinned meanwhile)");
                tokio::time::sleep(Duration::from_secs(1)).await;
                proxy = spawn_proxy(&proxy_bin, &proxy_args)?;
                wait_for_datapath(&paths.pin_dir, &mut proxy).await?;
                let ctl = controller.clone();
                let r = tokio::task::spawn_blocking(move || ctl.lock().unwrap_or_else(|e| e.into_inner()).reconcile()).await?;
                match r {
                    Ok(r) => report(&r),
                    Err(e) => error!(error = %e, "re-applying policy after the l7proxy restart"),
                }
            }
        }
    }
    println!("l7mesh: stopping");
    if let Some(pid) = proxy.id() {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
    }
    let _ = tokio::time::timeout(Duration::from_secs(15), proxy.wait()).await;
    let _ = std::fs::remove_file(&socket);
    if redirector::is_installed(&paths.pin_dir) {
        redirector::uninstall(&paths.pin_dir)?;
    }
    // The node's own cgroups go too when nothing runs in them any more.
    for dir in [paths.cgroup_root.join("proxy"), paths.workloads(), paths.cgroup_root.clone()] {
        let _ = std::fs::remove_dir(dir);
    }
    println!("l7mesh: datapath removed from {}; enforcement stopped", paths.pin_dir.display());
    Ok(ExitCode::SUCCESS)
}

fn sibling_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe.parent().context("l7ctl has no directory")?.join(name);
    if !bin.is_file() {
        bail!("{} not found next to l7ctl (build the workspace: cargo build --bins)", bin.display());
    }
    Ok(bin)
}

fn spawn_proxy(bin: &Path, args: &[String]) -> Result<tokio::process::Child> {
    tokio::process::Command::new(bin)
        .args(args)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))
}

async fn wait_for_datapath(pin_dir: &Path, proxy: &mut tokio::process::Child) -> Result<()> {
    for _ in 0..300 {
        if let Some(status) = proxy.try_wait()? {
            bail!("l7proxy exited with {status} before attaching the datapath");
        }
        if redirector::is_installed(pin_dir) && redirector::Maps::open(pin_dir).is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("l7proxy did not attach the datapath within 15 s")
}

/// GET /readyz on the admin port until it answers 200 (a one-line HTTP/1.0 request; not worth
/// an HTTP client dependency).
async fn wait_ready(proxy: &mut tokio::process::Child) -> Result<()> {
    for _ in 0..300 {
        if let Some(status) = proxy.try_wait()? {
            bail!("l7proxy exited with {status} before it was ready");
        }
        if let Ok(mut s) = tokio::net::TcpStream::connect("127.0.0.1:15000").await {
            let _ = s.write_all(b"GET /readyz HTTP/1.0\r\n\r\n").await;
            let mut line = String::new();
            let _ = BufReader::new(s).read_line(&mut line).await;
            if line.contains(" 200 ") {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("l7proxy not ready within 15 s")
}

async fn send(stream: &mut tokio::io::WriteHalf<UnixStream>, reply: &Reply) {
    let mut line = serde_json::to_string(reply).unwrap_or_default();
    line.push('\n');
    let _ = stream.write_all(line.as_bytes()).await;
}

/// One control connection. A `run` registers a workload that stays registered until the
/// client says `done` or goes away.
async fn serve_client(stream: UnixStream, ctl: Arc<Mutex<Controller>>) {
    let (read, mut write) = tokio::io::split(stream);
    let mut lines = BufReader::new(read).lines();
    let mut registered: Option<String> = None;
    while let Ok(Some(line)) = lines.next_line().await {
        let request: Request = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => {
                send(&mut write, &Reply::error(format!("bad request: {e}"))).await;
                break;
            }
        };
        match request {
            Request::Status => send(&mut write, &Reply::ok()).await,
            Request::Run { name, labels } => {
                if registered.is_some() {
                    send(&mut write, &Reply::error("this connection already runs a workload")).await;
                    continue;
                }
                let c = ctl.clone();
                let n = name.clone();
                let result = tokio::task::spawn_blocking(move || {
                    let mut c = c.lock().unwrap_or_else(|e| e.into_inner());
                    let cgroup = c.register(&n, &labels)?;
                    let r = c.reconcile()?;
                    Ok::<_, policy_api::node::NodeError>((cgroup, r))
                })
                .await;
                match result {
                    Ok(Ok((cgroup, r))) => {
                        report(&r);
                        info!(workload = %name, cgroup = %cgroup.display(), "workload registered");
                        registered = Some(name);
                        let reply = Reply {
                            cgroup: Some(cgroup.display().to_string()),
                            version: Some(r.version),
                            ..Reply::ok()
                        };
                        send(&mut write, &reply).await;
                    }
                    Ok(Err(e)) => send(&mut write, &Reply::error(e.to_string())).await,
                    Err(e) => send(&mut write, &Reply::error(e.to_string())).await,
                }
            }
            Request::Done => {
                if let Some(name) = registered.take() {
                    deregister(&ctl, &name).await;
                }
                send(&mut write, &Reply::ok()).await;
            }
        }
    }
    if let Some(name) = registered {
        deregister(&ctl, &name).await;
    }
}

async fn deregister(ctl: &Arc<Mutex<Controller>>, name: &str) {
    let c = ctl.clone();
    let n = name.to_string();
    let result = tokio::task::spawn_blocking(move || {
        let mut c = c.lock().unwrap_or_else(|e| e.into_inner());
        c.deregister(&n)?;
        c.reconcile()
    })
    .await;
    match result {
        Ok(Ok(r)) => {
            report(&r);
            info!(workload = %name, "workload deregistered");
        }
        Ok(Err(e)) => error!(workload = %name, error = %e, "deregistering"),
        Err(e) => error!(workload = %name, error = %e, "deregistering"),
    }
}

async fn run(args: RunArgs) -> Result<ExitCode> {
    require_root("l7ctl run")?;
    // Everything that can fail is checked before CMD starts.
    policy_api::labels::Labels::parse(&args.labels).context("--labels")?;
    let user = nix::unistd::User::from_name(&args.user)?.with_context(|| format!("no such user `{}`", args.user))?;
    for cap in &args.caps {
        if !cap.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            bail!("`{cap}` is not a capability name (e.g. net_bind_service)");
        }
    }
    let socket = args.dirs.run_dir.join("node.sock");
    let stream = UnixStream::connect(&socket).await.map_err(|e| {
        anyhow::anyhow!("no l7mesh node is running ({}: {e}); start one with `l7ctl up`", socket.display())
    })?;
    let (read, mut write) = tokio::io::split(stream);
    let mut lines = BufReader::new(read).lines();
    let request = serde_json::to_string(&Request::Run { name: args.name.clone(), labels: args.labels.clone() })? + "\n";
    write.write_all(request.as_bytes()).await?;
    let reply: Reply = match lines.next_line().await? {
        Some(line) => serde_json::from_str(&line)?,
        None => bail!("the node closed the control connection"),
    };
    if !reply.ok {
        bail!("cannot run workload `{}`: {}", args.name, reply.error.unwrap_or_default());
    }
    let cgroup = reply.cgroup.context("the node sent no cgroup")?;

    // The child joins the workload's cgroup and drops privileges before CMD runs: a shell
    // writes its own pid into cgroup.procs, then execs setpriv (util-linux), then CMD. (No
    // pre_exec hook: this crate forbids unsafe code.)
    let mut setpriv: Vec<String> = vec![
        format!("--reuid={}", user.uid),
        format!("--regid={}", user.gid),
        "--init-groups".into(),
        "--no-new-privs".into(),
    ];
    if args.caps.is_empty() {
        setpriv.push("--inh-caps=-all".into());
        setpriv.push("--bounding-set=-all".into());
    } else {
        let caps: Vec<String> = args.caps.iter().map(|c| format!("+{}", c.to_lowercase())).collect();
        setpriv.push(format!("--inh-caps=-all,{}", caps.join(",")));
        setpriv.push(format!("--ambient-caps=-all,{}", caps.join(",")));
        setpriv.push(format!("--bounding-set=-all,{}", caps.join(",")));
    }
    if user.uid.is_root() && args.caps.is_empty() {
        // root without capabilities is still root in the filesystem's eyes; say what was asked.
        warn!("running CMD as root (with no capabilities)");
    }
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg("echo $$ > \"$0/cgroup.procs\" && exec setpriv \"$@\"")
        .arg(&cgroup)
        .args(&setpriv)
        .arg("--")
        .args(&args.cmd)
        .spawn()
        .context("starting the workload")?;
    let pid = child.id().map(|p| nix::unistd::Pid::from_raw(p as i32));

    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let status = loop {
        tokio::select! {
            s = child.wait() => break s?,
            _ = term.recv() => if let Some(p) = pid { let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGTERM); },
            _ = int.recv() => if let Some(p) = pid { let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGINT); },
        }
    };
    let done = serde_json::to_string(&Request::Done)? + "\n";
    if write.write_all(done.as_bytes()).await.is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await;
    }
    use std::os::unix::process::ExitStatusExt as _;
    let code = match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(sig)) => 128 + sig,
        _ => 1,
    };
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}

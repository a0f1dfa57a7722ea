//! l7ctl: the command users type (README, "The two commands" and "Running a node by hand").
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use http::Method;
use l7mesh_api::rest::{
    ApiFailure, Applied, ErrorReply, PolicyView, ServiceMap, SimulationReport, Status, Upload, UploadFile, WorkloadView,
};
use policy_api::client;
use policy_api::control::{Reply, Request};
use policy_api::node::{NodePaths, DEFAULT_CGROUP_ROOT, DEFAULT_RUN_DIR, DEFAULT_STATE_DIR};
use policy_api::validate::{load_path, Severity};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tracing::{error, warn};

#[derive(Parser)]
#[command(
    name = "l7ctl",
    version,
    about = "Run and operate an l7mesh node",
    long_about = "Run and operate an l7mesh node.\n\n\
        Start a node with `l7ctl up --policy DIR`, run workloads with `l7ctl run`, change policy \
        with `l7ctl apply -f FILE` (atomic: all or none; returns once in force), watch traffic \
        with `l7ctl observe --follow`, and try a policy on recorded traffic with \
        `l7ctl simulate -f FILE` before applying it."
)]
struct Cli {
    /// policy-api's address (the commands that talk to a running node use it).
    #[arg(long, global = true, env = "L7MESH_API", default_value = "127.0.0.1:9090")]
    api: SocketAddr,
    /// The API token policy-api writes (root only) [default: $L7MESH_RUN_DIR/api-token, else
    /// /run/l7mesh/api-token].
    #[arg(long, global = true, env = "L7MESH_API_TOKEN_FILE")]
    api_token_file: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

/// How to print results.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    /// Aligned columns (the default).
    Table,
    /// The documents as YAML (`get` only).
    Yaml,
    /// JSON Lines: one object per line.
    Json,
    /// Graphviz DOT (`servicemap` only).
    Dot,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum GetWhat {
    Policies,
    Workloads,
    /// The policy version in force on each part: store, kernel, l7proxy.
    Status,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DeleteWhat {
    Policy,
}

#[derive(clap::Args)]
struct ObserveArgs {
    /// Keep streaming new flows as they happen (after those already recorded).
    #[arg(long)]
    follow: bool,
    /// Only flows with this verdict (forwarded: a proxied connection's end, closed or reset
    /// by a peer).
    #[arg(long, value_parser = ["allowed", "denied", "audit", "forwarded"])]
    verdict: Option<String>,
    /// Only flows from sources matching k=v[,k=v] (labels, or workload=/namespace=/ip=).
    #[arg(long)]
    from: Option<String>,
    /// Only flows to destinations matching k=v[,k=v] (labels, or workload=/namespace=/ip=).
    #[arg(long)]
    to: Option<String>,
    /// Only this protocol (tcp/udp: connections judged at L4).
    #[arg(long, value_parser = ["http", "grpc", "kafka", "tcp", "udp"])]
    protocol: Option<String>,
    /// Only flows from the last DURATION (30s, 5m, 2h, 1d).
    #[arg(long)]
    since: Option<String>,
    /// table or json (JSON Lines).
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    output: Output,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the whole node in the foreground until SIGINT/SIGTERM: the TLS broker, policy-api
    /// (store, controller, REST API on 127.0.0.1:9090) and l7proxy with the eBPF redirector,
    /// each restarted if it dies. Says "l7mesh node ready" once l7proxy's /readyz and
    /// policy-api answer. A stop (SIGTERM, Ctrl-C) ends the three processes and leaves the
    /// pinned datapath enforcing the policy in force (L3/L4 in the kernel; connections marked
    /// for L7 refused, or passed unredirected with --fail-open, until a proxy listens again);
    /// the next `l7ctl up` resumes it. The three processes end with `l7ctl up`, even if it is
    /// killed. `l7ctl down --uninstall` removes enforcement.
    Up(UpArgs),
    /// Stop a node: `l7ctl up` and the processes it started (found by the pid files in the run
    /// dir, also after a `kill -9` of `l7ctl up`). The datapath stays pinned and enforcing
    /// unless --uninstall, which removes every pinned program and map (enforcement stops;
    /// workloads still running are no longer policed) and the node's empty cgroups, and says
    /// what it removed. The store (policies, history) stays in the state dir.
    Down(DownArgs),
    /// Run CMD as a workload: its own cgroup, registered with its labels before CMD starts,
    /// deregistered when it exits. Runs as an unprivileged user with no capabilities unless
    /// --user/--cap say otherwise, and, whatever the user, where it cannot leave its cgroup:
    /// its own cgroup, mount and PID namespaces, the filesystem read-only but /tmp and
    /// /var/tmp, the node's state, sockets and pins hidden, no new user namespaces. Processes
    /// CMD leaves behind end with it. Exits with CMD's status.
    Run(RunArgs),
    /// Create or update policies on the running node: multi-document YAML or JSON, a file, a
    /// directory of *.yaml/*.yml/*.json, or - for stdin. Atomic: if anything does not validate,
    /// every error is printed (file, line, field) and nothing changes. Returns once the new
    /// version is in force in l7proxy and the kernel.
    Apply {
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// Validate on the node only; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// List policies (namespace, name, mode, revision, origin) or workloads (labels, identity,
    /// enforced directions), or the node's status: the policy version in force on each part
    /// (store, kernel, l7proxy). `get policies` also says the versions in force (on stderr).
    Get {
        what: GetWhat,
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Output,
    },
    /// Delete a policy by name (`NAME` in --namespace, `NS/NAME`, or a clusterwide policy's
    /// name). Returns once the change is in force.
    Delete {
        what: DeleteWhat,
        name: String,
        #[arg(short = 'n', long)]
        namespace: Option<String>,
    },
    /// Show recorded flows (L7 requests and kernel L4 verdicts), oldest first; --follow
    /// streams new ones.
    Observe(ObserveArgs),
    /// Replay recorded flows against a candidate policy set (the stored policies with the
    /// candidate's documents applied over them) and print what would change: newly denied,
    /// newly allowed, with counts and examples. Nothing is applied.
    Simulate {
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// Only flows from the last DURATION (30s, 5m, 2h, 1d).
        #[arg(long)]
        since: Option<String>,
        /// table or json.
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Output,
    },
    /// Who talks to whom, from flows: workloads and the protocols, request counts and denials
    /// between them. `-o dot | dot -Tsvg > map.svg` draws it.
    Servicemap {
        #[arg(short = 'o', long = "output", value_enum, default_value = "dot")]
        output: Output,
        /// Only flows from the last DURATION.
        #[arg(long)]
        since: Option<String>,
    },
    /// Check policy files locally without applying them: every error names file, line and
    /// field. Exit 1 on any error, 0 otherwise (warnings included).
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
    /// `l7ctl run`'s own step (not for users): join the workload's cgroup, unshare the cgroup,
    /// mount and PID namespaces, start `__init` in them and pass signals on.
    #[command(name = "__sandbox", hide = true)]
    Sandbox(SandboxArgs),
    /// `l7ctl run`'s own step (not for users): pid 1 of the workload's PID namespace; builds
    /// its view of the filesystem, runs CMD, reaps, exits with CMD's status.
    #[command(name = "__init", hide = true)]
    Init(SandboxArgs),
}

#[derive(clap::Args)]
struct SandboxArgs {
    /// The workload's cgroup directory.
    #[arg(long)]
    cgroup: PathBuf,
    /// A node path to cover with an empty read-only mount; repeatable.
    #[arg(long = "hide")]
    hide: Vec<PathBuf>,
    /// A host directory the workload sees and may write; repeatable.
    #[arg(long = "share")]
    share: Vec<PathBuf>,
    /// The command (setpriv ... -- CMD).
    #[arg(trailing_var_arg = true, required = true, num_args = 1..)]
    cmd: Vec<String>,
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

/// Where a node keeps everything: what `up` and `down` both name.
#[derive(clap::Args)]
struct NodeLayout {
    #[command(flatten)]
    dirs: NodeDirs,
    /// The node's cgroup (workloads go in <root>/workloads/<name>).
    #[arg(long, env = "L7MESH_CGROUP_ROOT", default_value = DEFAULT_CGROUP_ROOT)]
    cgroup_root: PathBuf,
    /// bpffs directory of the datapath.
    #[arg(long, env = "L7MESH_PIN_DIR", default_value = "/sys/fs/bpf/l7mesh")]
    pin_dir: PathBuf,
}

impl NodeLayout {
    fn paths(&self) -> NodePaths {
        NodePaths::new(
            self.dirs.state_dir.clone(),
            self.dirs.run_dir.clone(),
            self.cgroup_root.clone(),
            self.pin_dir.clone(),
        )
    }
}

/// `--state-dir S --run-dir R --cgroup-root C --pin-dir P`: the layout as the node's processes
/// (policy-api) take it.
fn node_dir_args(paths: &NodePaths) -> Vec<String> {
    let dir = |p: &Path| p.display().to_string();
    vec![
        "--state-dir".into(),
        dir(&paths.state_dir),
        "--run-dir".into(),
        dir(&paths.run_dir),
        "--cgroup-root".into(),
        dir(&paths.cgroup_root),
        "--pin-dir".into(),
        dir(&paths.pin_dir),
    ]
}

#[derive(clap::Args)]
struct UpArgs {
    #[command(flatten)]
    layout: NodeLayout,
    /// Policy file or directory, applied at start and re-applied whenever it changes. A change
    /// that does not validate is reported and ignored: the last good policy stays in force.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// When l7proxy is not listening, let marked connections through unredirected instead of
    /// refusing them.
    #[arg(long)]
    fail_open: bool,
    /// Where policy-api serves its REST API.
    #[arg(long = "listen-api", env = "L7MESH_API", default_value = "127.0.0.1:9090")]
    api: SocketAddr,
}

#[derive(clap::Args)]
struct DownArgs {
    #[command(flatten)]
    layout: NodeLayout,
    /// Also remove the datapath (every pinned program and map): enforcement stops.
    #[arg(long)]
    uninstall: bool,
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
    /// A host directory CMD may see and write (its /tmp and /var/tmp are private, and every
    /// other directory is read-only); repeatable. A root workload owns every root-owned file
    /// there.
    #[arg(long = "share", value_name = "DIR")]
    share: Vec<PathBuf>,
    /// Capability to keep (e.g. net_bind_service for ports below 1024); repeatable. Those that
    /// would lift the isolation are refused (sys_admin, net_admin, net_raw, sys_ptrace, bpf,
    /// mknod, dac_read_search, sys_module, sys_rawio, ...: the error says why).
    #[arg(long = "cap")]
    caps: Vec<String>,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, required = true, num_args = 1..)]
    cmd: Vec<String>,
}

/// policy-api as the API commands reach it.
struct Api {
    addr: SocketAddr,
    token_file: PathBuf,
    /// The token, or why it could not be read.
    token: std::result::Result<String, String>,
}

impl Api {
    fn new(addr: SocketAddr, token_file: Option<PathBuf>) -> Self {
        let token_file = token_file.unwrap_or_else(|| {
            PathBuf::from(std::env::var("L7MESH_RUN_DIR").unwrap_or_else(|_| DEFAULT_RUN_DIR.into())).join("api-token")
        });
        let token = std::fs::read_to_string(&token_file).map(|t| t.trim().to_string()).map_err(|e| e.to_string());
        Api { addr, token_file, token }
    }

    fn headers<'a>(&'a self, content_type: Option<&'a str>) -> client::Headers<'a> {
        client::Headers { content_type, token: self.token.as_deref().ok() }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // These two must unshare and mount before the process has any thread.
    let cli = match cli.cmd {
        Cmd::Sandbox(args) => return exit_with(sandbox(args)),
        Cmd::Init(args) => return exit_with(init(args)),
        _ => cli,
    };
    let api = Api::new(cli.api, cli.api_token_file.clone());
    let api = &api;
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .without_time()
        .init();
    let result = match cli.cmd {
        Cmd::Validate { file } => validate(&file),
        Cmd::Ca { run_dir } => broker_admin(&run_dir, &l7mesh_api::broker::Request::Ca).map(|reply| {
            print!("{}", reply.ca.unwrap_or_default());
            ExitCode::SUCCESS
        }),
        Cmd::Secret { cmd: SecretCmd::Import { name, namespace, cert, key, ca, run_dir } } => (|| {
            let read = |p: &Option<PathBuf>| -> Result<Option<String>> {
                p.as_ref()
                    .map(|p| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display())))
                    .transpose()
            };
            let request = l7mesh_api::broker::Request::Import {
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
        Cmd::Down(args) => down(args),
        Cmd::Apply { file, dry_run } => runtime().and_then(|rt| rt.block_on(apply(api, &file, dry_run))),
        Cmd::Get { what, output } => runtime().and_then(|rt| rt.block_on(get(api, what, output))),
        Cmd::Delete { what: DeleteWhat::Policy, name, namespace } => {
            runtime().and_then(|rt| rt.block_on(delete(api, &name, namespace.as_deref())))
        }
        Cmd::Observe(args) => runtime().and_then(|rt| rt.block_on(observe(api, args))),
        Cmd::Simulate { file, since, output } => {
            runtime().and_then(|rt| rt.block_on(simulate(api, &file, since, output)))
        }
        Cmd::Servicemap { output, since } => runtime().and_then(|rt| rt.block_on(servicemap(api, since, output))),
        Cmd::Run(args) => runtime().and_then(|rt| rt.block_on(run(args))),
        Cmd::Sandbox(_) | Cmd::Init(_) => unreachable!("handled above"),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("l7ctl: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// How long `l7ctl ca` and `l7ctl secret import` wait for the broker's answer.
const BROKER_ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

/// One request on the broker's root-only admin socket; a broker that does not answer within
/// [`BROKER_ADMIN_TIMEOUT`] (stopped, stuck) is an error that says so.
fn broker_admin(run_dir: &Path, request: &l7mesh_api::broker::Request) -> Result<l7mesh_api::broker::Reply> {
    use std::io::{BufRead, Write};
    let path = run_dir.join("broker-admin.sock");
    let mut stream = std::os::unix::net::UnixStream::connect(&path).map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the TLS broker at {} ({e}); is `l7ctl up` running, and are you root?",
            path.display()
        )
    })?;
    stream.set_read_timeout(Some(BROKER_ADMIN_TIMEOUT))?;
    stream.set_write_timeout(Some(BROKER_ADMIN_TIMEOUT))?;
    let timed_out = |e: std::io::Error| {
        if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) {
            let after = match request {
                l7mesh_api::broker::Request::Import { .. } => {
                    "; the import may still take effect when it resumes (importing again is safe)"
                }
                _ => "",
            };
            anyhow::anyhow!(
                "the TLS broker at {} did not answer within {} s (stopped or stuck?){after}",
                path.display(),
                BROKER_ADMIN_TIMEOUT.as_secs()
            )
        } else {
            anyhow::anyhow!("talking to the TLS broker at {}: {e}", path.display())
        }
    };
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(timed_out)?;
    let mut reply = String::new();
    std::io::BufReader::new(stream).read_line(&mut reply).map_err(timed_out)?;
    let reply: l7mesh_api::broker::Reply = serde_json::from_str(&reply).context("the broker's reply")?;
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

/// One process `l7ctl up` runs and restarts when it dies. Its pid is in `<run dir>/<name>.pid`
/// (for `l7ctl down`), and it ends when `l7ctl up` does (`L7MESH_PARENT_PID`: it arms
/// PR_SET_PDEATHSIG itself, as this crate has no unsafe `pre_exec`).
struct Supervised {
    name: &'static str,
    bin: PathBuf,
    args: Vec<String>,
    child: tokio::process::Child,
    run_dir: PathBuf,
}

impl Supervised {
    fn start(name: &'static str, args: Vec<String>, run_dir: &Path) -> Result<Self> {
        let bin = sibling_binary(name)?;
        let child = spawn(&bin, &args)?;
        let s = Supervised { name, bin, args, child, run_dir: run_dir.to_path_buf() };
        s.write_pid();
        Ok(s)
    }
    fn restart(&mut self) -> Result<()> {
        self.child = spawn(&self.bin, &self.args)?;
        self.write_pid();
        Ok(())
    }
    fn write_pid(&self) {
        if let Some(pid) = self.child.id() {
            let _ = std::fs::write(pid_file(&self.run_dir, self.name), format!("{pid}\n"));
        }
    }
    async fn stop(&mut self, grace: Duration) {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
        }
        if tokio::time::timeout(grace, self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
    }
}

fn spawn(bin: &Path, args: &[String]) -> Result<tokio::process::Child> {
    // (Spawned from the thread that runs `up`, the runtime's main thread: the parent-death
    // signal follows the thread that forked.)
    tokio::process::Command::new(bin)
        .args(args)
        .env(PARENT_PID_ENV, std::process::id().to_string())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))
}

async fn up(args: UpArgs) -> Result<ExitCode> {
    require_root("l7ctl up")?;
    let paths = args.layout.paths();
    std::fs::create_dir_all(&paths.run_dir).with_context(|| format!("creating {}", paths.run_dir.display()))?;
    let socket = paths.socket();
    if UnixStream::connect(&socket).await.is_ok() {
        bail!("a node is already running (its socket {} answers)", socket.display());
    }
    // Processes of an earlier node that are still ending (after a kill -9 of its `l7ctl up`,
    // they get SIGTERM and drain) would hold the ports: wait for them, then stop them.
    for (name, pid) in node_processes(&paths.run_dir, &paths.pin_dir) {
        if name == UP_NAME && pid != nix::unistd::getpid() {
            bail!("a node is already running (l7ctl up, pid {pid})");
        }
        if name != UP_NAME {
            warn!(pid = pid.as_raw(), "{name} of an earlier node is still running; stopping it");
            stop_pid(pid, Duration::from_secs(10));
        }
    }
    let _ = std::fs::write(pid_file(&paths.run_dir, UP_NAME), format!("{}\n", std::process::id()));
    let dir = |p: &Path| p.display().to_string();
    let cgroup2 = policy_api::node::cgroup2_mount();
    let proxy_cgroup =
        format!("/{}", paths.cgroup_root.join("proxy").strip_prefix(&cgroup2).unwrap_or(Path::new("proxy")).display());
    // The TLS broker: the only holder of keys; its proxy socket serves the proxy's cgroup only.
    let broker = Supervised::start(
        "tls-broker",
        vec![
            "--state-dir".into(),
            dir(&paths.state_dir.join("broker")),
            "--run-dir".into(),
            dir(&paths.run_dir),
            "--proxy-cgroup".into(),
            proxy_cgroup,
            "--proxy-exe".into(),
            dir(&sibling_binary("l7proxy")?),
        ],
        &paths.run_dir,
    )?;
    let mut proxy_args: Vec<String> = vec![
        "--pin-dir".into(),
        dir(&paths.pin_dir),
        "--cgroup-root".into(),
        dir(&paths.cgroup_root),
        "--policy-socket".into(),
        dir(&paths.proxy_socket()),
        "--broker-socket".into(),
        dir(&paths.run_dir.join("broker-proxy.sock")),
    ];
    if args.fail_open {
        proxy_args.push("--fail-open".into());
    }
    let proxy = Supervised::start("l7proxy", proxy_args, &paths.run_dir)?;
    let mut api_args = node_dir_args(&paths);
    api_args.extend(["--listen".into(), args.api.to_string()]);
    if let Some(p) = &args.policy {
        api_args.push("--policy".into());
        api_args.push(dir(p));
    }
    let api = Supervised::start("policy-api", api_args, &paths.run_dir)?;
    let mut procs = vec![broker, proxy, api];

    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut ready = false;
    let started = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        let mut failed_start = None;
        for p in &mut procs {
            if let Some(status) = p.child.try_wait()? {
                if !ready {
                    failed_start = Some(format!("{} exited with {status} while the node was starting", p.name));
                    break;
                }
                error!(status = %status, "{} exited; restarting it (the datapath and the policy in force stay meanwhile)", p.name);
                tokio::time::sleep(Duration::from_millis(500)).await;
                p.restart()?;
            }
        }
        if let Some(why) = failed_start {
            for q in &mut procs {
                q.stop(Duration::from_secs(5)).await;
            }
            remove_pid_files(&paths.run_dir);
            // A datapath pinned before keeps enforcing what it had; `down --uninstall` removes it.
            bail!(why);
        }
        if !ready {
            if http_status(SocketAddr::from(([127, 0, 0, 1], 15000)), "/readyz").await == Some(200)
                && http_status(args.api, "/healthz").await == Some(200)
            {
                ready = true;
                println!(
                    "l7mesh node ready: policy-api on http://{}, l7proxy admin on 127.0.0.1:15000, control socket {}",
                    args.api,
                    socket.display()
                );
            } else if started.elapsed() > Duration::from_secs(60) {
                for q in &mut procs {
                    let _ = q.child.start_kill();
                }
                bail!("the node was not ready within 60 s");
            }
        }
    }
    println!("l7mesh: stopping");
    // policy-api first (no more changes), then l7proxy, the broker last.
    for p in procs.iter_mut().rev() {
        p.stop(Duration::from_secs(15)).await;
    }
    let _ = std::fs::remove_file(&socket);
    remove_pid_files(&paths.run_dir);
    println!(
        "l7mesh: stopped; the datapath stays pinned at {} and enforces the policy in force (L3/L4 in the kernel; \
         connections marked for L7 {} until `l7ctl up` runs again); `l7ctl down --uninstall` removes it",
        paths.pin_dir.display(),
        if fail_open(&paths.pin_dir) { "pass unredirected (--fail-open)" } else { "are refused" },
    );
    Ok(ExitCode::SUCCESS)
}

/// Whether the pinned datapath lets marked connections through while no proxy listens.
fn fail_open(pin_dir: &Path) -> bool {
    redirector::Maps::open(pin_dir).and_then(|m| m.fail_open()).unwrap_or(false)
}

/// `l7ctl up`'s own pid file name.
const UP_NAME: &str = "l7ctl-up";
/// What `l7ctl up` tells its processes (they end when it does).
const PARENT_PID_ENV: &str = "L7MESH_PARENT_PID";
/// The processes of a node, in the order `down` stops them.
const NODE_PROCESSES: [&str; 4] = [UP_NAME, "policy-api", "l7proxy", "tls-broker"];

fn pid_file(run_dir: &Path, name: &str) -> PathBuf {
    run_dir.join(format!("{name}.pid"))
}

fn remove_pid_files(run_dir: &Path) {
    for name in NODE_PROCESSES {
        let _ = std::fs::remove_file(pid_file(run_dir, name));
    }
}

/// The node's processes still alive, by their pid files: a pid counts only if it still runs
/// the binary of that name with this node's run dir or pin dir on its command line (a pid
/// reused by another process is not ours).
fn node_processes(run_dir: &Path, pin_dir: &Path) -> Vec<(&'static str, nix::unistd::Pid)> {
    let mut out = Vec::new();
    for name in NODE_PROCESSES {
        let Ok(text) = std::fs::read_to_string(pid_file(run_dir, name)) else { continue };
        let Ok(pid) = text.trim().parse::<i32>() else { continue };
        let exe = if name == UP_NAME { "l7ctl" } else { name };
        let ours = std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
            let args: Vec<String> =
                cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
            let runs = args.first().and_then(|a| Path::new(a).file_name()).is_some_and(|f| f == exe);
            let names_node = name == UP_NAME
                || args.iter().any(|a| {
                    Path::new(a) == run_dir || Path::new(a) == pin_dir || a.starts_with(&*run_dir.to_string_lossy())
                });
            runs && names_node
        });
        if ours {
            out.push((name, nix::unistd::Pid::from_raw(pid)));
        }
    }
    out
}

/// SIGTERM, then SIGKILL after `grace`; returns once the process is gone.
fn stop_pid(pid: nix::unistd::Pid, grace: Duration) -> bool {
    use nix::sys::signal::{kill, Signal};
    let alive = || Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid);
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = std::time::Instant::now() + grace;
    while alive() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if alive() {
        let _ = kill(pid, Signal::SIGKILL);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while alive() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        return !alive();
    }
    true
}

fn is_zombie(pid: nix::unistd::Pid) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('Z')))
        .unwrap_or(true)
}

/// `l7ctl down`: stops `l7ctl up` (which stops its processes), then any process of the node
/// left running (its `l7ctl up` was killed); with `--uninstall`, removes the datapath and the
/// node's empty cgroups, naming each.
fn down(args: DownArgs) -> Result<ExitCode> {
    require_root("l7ctl down")?;
    let NodePaths { state_dir, run_dir, cgroup_root, pin_dir } = &args.layout.paths();
    let mut stopped = 0;
    for (name, pid) in node_processes(run_dir, pin_dir) {
        // `l7ctl up` drains its processes itself (up to 15 s each); a process whose `up` is
        // gone gets SIGTERM directly.
        let grace = if name == UP_NAME { Duration::from_secs(50) } else { Duration::from_secs(20) };
        if stop_pid(pid, grace) {
            println!("l7mesh: stopped {name} (pid {pid})");
            stopped += 1;
        } else {
            println!("l7mesh: {name} (pid {pid}) did not stop");
        }
    }
    remove_pid_files(run_dir);
    let _ = std::fs::remove_file(run_dir.join("node.sock"));
    if stopped == 0 {
        println!("l7mesh: no node process was running");
    }
    if !args.uninstall {
        if redirector::is_installed(pin_dir) {
            println!(
                "l7mesh: the datapath stays pinned at {} and keeps enforcing the policy in force; \
                 `l7ctl down --uninstall` removes it",
                pin_dir.display()
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let removed = redirector::uninstall_paths(pin_dir)?;
    for path in &removed {
        println!("l7mesh: removed {}", path.display());
    }
    let mut cgroups = vec![cgroup_root.join("proxy"), cgroup_root.join("workloads"), cgroup_root.clone()];
    // Workload cgroups whose commands ended; those still running keep theirs.
    if let Ok(entries) = std::fs::read_dir(cgroup_root.join("workloads")) {
        cgroups.splice(0..0, entries.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_dir()));
    }
    let mut running = Vec::new();
    for d in cgroups {
        if !d.exists() {
            continue;
        }
        match std::fs::remove_dir(&d) {
            Ok(()) => println!("l7mesh: removed cgroup {}", d.display()),
            Err(_) if d.parent() == Some(&cgroup_root.join("workloads")) => running.push(d),
            Err(_) => {}
        }
    }
    if removed.is_empty() {
        println!("l7mesh: no datapath was pinned at {}", pin_dir.display());
    } else {
        println!("l7mesh: datapath removed from {} ({} pins); enforcement stopped", pin_dir.display(), removed.len());
    }
    for d in running {
        println!("l7mesh: workload cgroup {} still has processes: they run unpoliced now", d.display());
    }
    println!("l7mesh: kept the store in {} (policies and history)", state_dir.display());
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

/// The status code of `GET path`, or None if nothing answers.
async fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    client::call(addr, Method::GET, path, Default::default(), Bytes::new()).await.ok().map(|(s, _)| s.as_u16())
}

// ---- API commands -------------------------------------------------------------------------

fn api_unreachable(api: &Api, e: client::ClientError) -> anyhow::Error {
    anyhow::anyhow!(
        "{e}\nis the node running (`l7ctl up`)? policy-api is expected on {} (--api / L7MESH_API)",
        api.addr
    )
}

/// Calls policy-api; a non-2xx answer becomes an error carrying its message and diagnostics.
async fn api_call(api: &Api, method: Method, path: &str, ct: Option<&str>, body: Bytes) -> Result<Bytes> {
    let (status, body) =
        client::call(api.addr, method, path, api.headers(ct), body).await.map_err(|e| api_unreachable(api, e))?;
    if status.is_success() {
        return Ok(body);
    }
    if status == http::StatusCode::UNAUTHORIZED {
        if let Err(e) = &api.token {
            bail!("cannot read the node's API token at {} ({e}); the policy API is root's", api.token_file.display());
        }
    }
    let reply = ErrorReply::from_body(&body);
    for d in &reply.diagnostics {
        eprintln!("{d}");
    }
    let message = if reply.error.is_empty() { "request failed".to_string() } else { reply.error };
    let reason = status.canonical_reason().unwrap_or_default().to_string();
    Err(ApiFailure { status: status.as_u16(), reason, message }.into())
}

/// The files of `-f` as an upload: a file, a directory's policy files, or `-` (stdin).
fn upload(file: &Path) -> Result<Bytes> {
    let files: Vec<(String, String)> = if file == Path::new("-") {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)?;
        vec![("<stdin>".into(), text)]
    } else {
        let paths = policy_api::validate::policy_files(file).with_context(|| format!("reading {}", file.display()))?;
        if paths.is_empty() {
            bail!("{}: no *.yaml, *.yml or *.json files", file.display());
        }
        paths
            .iter()
            .map(|p| {
                Ok((
                    p.display().to_string(),
                    std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
                ))
            })
            .collect::<Result<_>>()?
    };
    let files = files.into_iter().map(|(name, text)| UploadFile { name, text }).collect();
    Ok(Bytes::from(serde_json::to_vec(&Upload { files })?))
}

async fn apply(api: &Api, file: &Path, dry_run: bool) -> Result<ExitCode> {
    let path = if dry_run { "/v1/policies?dryRun=true" } else { "/v1/policies" };
    let body = api_call(api, Method::POST, path, Some(Upload::CONTENT_TYPE), upload(file)?).await?;
    let applied: Applied = serde_json::from_slice(&body)?;
    for w in &applied.warnings {
        eprintln!("warning: {w}");
    }
    if dry_run {
        for (key, change) in &applied.changes {
            println!("{key} would be {change}");
        }
        println!(
            "{} policies valid; nothing applied (dry run: every check of an apply passed: conflicts, compile, \
             kernel map capacity)",
            applied.changes.len()
        );
        return Ok(ExitCode::SUCCESS);
    }
    for (key, change) in &applied.changes {
        println!("{key} {change}");
    }
    println!("{}", in_force(&applied));
    Ok(ExitCode::SUCCESS)
}

/// "policy version N in force (...)": what an apply or delete did, from its report.
fn in_force(applied: &Applied) -> String {
    let r = &applied.report;
    let ms = |us: u64| us as f64 / 1000.0;
    let (closed, rerouted) = (r.closed_connections, r.closed_rerouted);
    format!(
        "policy version {} in force (l7proxy tables {:.1} ms, kernel {:.1} ms, {closed} connection(s) closed: {} denied, \
         {rerouted} rerouted)",
        applied.version,
        ms(r.proxy_us),
        ms(r.kernel_us),
        closed - rerouted.min(closed),
    )
}

fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        println!("{}", out.trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

fn print_json_lines(items: &[serde_json::Value]) {
    for i in items {
        println!("{i}");
    }
}

/// JSON -> YAML text (yaml-rust2's emitter; policies print as users write them).
fn to_yaml(v: &serde_json::Value) -> String {
    fn convert(v: &serde_json::Value) -> yaml_rust2::Yaml {
        use yaml_rust2::Yaml;
        match v {
            serde_json::Value::Null => Yaml::Null,
            serde_json::Value::Bool(b) => Yaml::Boolean(*b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Yaml::Integer(i),
                None => Yaml::Real(n.to_string()),
            },
            serde_json::Value::String(s) => Yaml::String(s.clone()),
            serde_json::Value::Array(a) => Yaml::Array(a.iter().map(convert).collect()),
            serde_json::Value::Object(o) => {
                Yaml::Hash(o.iter().map(|(k, v)| (Yaml::String(k.clone()), convert(v))).collect())
            }
        }
    }
    let mut out = String::new();
    let mut emitter = yaml_rust2::YamlEmitter::new(&mut out);
    let _ = emitter.dump(&convert(v));
    out
}

/// "store N, kernel N, l7proxy N" from `/v1/status`.
fn versions_in_force(status: &Status) -> String {
    let f = &status.in_force;
    format!("store {}, kernel {}, l7proxy {}", f.store, or_dash(f.kernel), or_dash(f.proxy))
}

/// A value for a table cell, `-` when there is none.
fn or_dash<T: std::fmt::Display>(x: Option<T>) -> String {
    x.map_or("-".to_string(), |x| x.to_string())
}

/// A view as `-o json` prints it: one line, keys sorted (as serde_json's maps are).
fn json_line<T: serde::Serialize>(view: &T) -> Result<serde_json::Value> {
    Ok(serde_json::to_value(view)?)
}

async fn get(api: &Api, what: GetWhat, output: Output) -> Result<ExitCode> {
    let path = match what {
        GetWhat::Policies => "/v1/policies",
        GetWhat::Workloads => "/v1/workloads",
        GetWhat::Status => "/v1/status",
    };
    if let GetWhat::Status = what {
        let status: Status = serde_json::from_slice(&api_call(api, Method::GET, path, None, Bytes::new()).await?)?;
        match output {
            Output::Json => println!("{}", json_line(&status)?),
            Output::Yaml => println!("{}", to_yaml(&json_line(&status)?)),
            Output::Table => {
                let f = &status.in_force;
                let store_detail = match &f.store_error {
                    Some(why) => format!("last committed; cannot be read: {why}"),
                    None => "committed".into(),
                };
                let rows = vec![
                    vec!["store".into(), f.store.to_string(), store_detail],
                    vec!["kernel".into(), or_dash(f.kernel), format!("generation {}", f.kernel_generation)],
                    vec!["l7proxy".into(), or_dash(f.proxy), format!("{} connected", f.proxy_connected)],
                ];
                print_table(&["PART", "VERSION", "DETAIL"], &rows);
                if !f.converged {
                    let d = f.divergence.as_ref();
                    println!(
                        "converged: false (version {} was refused by the store; {}); bringing every part to version {}{}",
                        or_dash(d.map(|d| d.failed_version)),
                        d.map_or("-", |d| d.reason.as_str()),
                        or_dash(d.map(|d| d.target)),
                        d.and_then(|d| d.last_error.as_ref()).map(|e| format!(", last attempt: {e}")).unwrap_or_default()
                    );
                } else {
                    println!("converged: true");
                }
            }
            Output::Dot => bail!("-o dot is for `l7ctl servicemap`"),
        }
        return Ok(ExitCode::SUCCESS);
    }
    let body = api_call(api, Method::GET, path, None, Bytes::new()).await?;
    match (what, output) {
        (GetWhat::Policies, Output::Json) => {
            for p in serde_json::from_slice::<Vec<PolicyView>>(&body)? {
                println!("{}", json_line(&p)?);
            }
        }
        (GetWhat::Workloads, Output::Json) => {
            for w in serde_json::from_slice::<Vec<WorkloadView>>(&body)? {
                println!("{}", json_line(&w)?);
            }
        }
        (GetWhat::Policies, Output::Yaml) => {
            for p in serde_json::from_slice::<Vec<PolicyView>>(&body)? {
                println!("{}", to_yaml(&p.document));
            }
        }
        (GetWhat::Workloads, Output::Yaml) => {
            for w in serde_json::from_slice::<Vec<WorkloadView>>(&body)? {
                println!("{}", to_yaml(&json_line(&w)?));
            }
        }
        (GetWhat::Policies, Output::Table) => {
            let rows: Vec<Vec<String>> = serde_json::from_slice::<Vec<PolicyView>>(&body)?
                .into_iter()
                .map(|p| {
                    vec![
                        or_dash(p.namespace),
                        p.name,
                        p.kind,
                        if p.audit { "audit".into() } else { "enforce".into() },
                        p.revision.to_string(),
                        p.origin,
                        p.updated,
                    ]
                })
                .collect();
            print_table(&["NAMESPACE", "NAME", "KIND", "MODE", "REVISION", "ORIGIN", "UPDATED"], &rows);
            if let Ok(status) = api_call(api, Method::GET, "/v1/status", None, Bytes::new()).await {
                if let Ok(status) = serde_json::from_slice::<Status>(&status) {
                    eprintln!("policy version in force: {}", versions_in_force(&status));
                }
            }
        }
        (GetWhat::Workloads, Output::Table) => {
            let rows: Vec<Vec<String>> = serde_json::from_slice::<Vec<WorkloadView>>(&body)?
                .into_iter()
                .map(|w| {
                    let enforced = match (w.ingress_enforced, w.egress_enforced) {
                        (true, true) => "ingress,egress",
                        (true, false) => "ingress",
                        (false, true) => "egress",
                        _ => "-",
                    };
                    vec![w.namespace, w.name, w.labels, or_dash(w.identity), enforced.into()]
                })
                .collect();
            print_table(&["NAMESPACE", "NAME", "LABELS", "IDENTITY", "ENFORCED"], &rows);
        }
        (_, Output::Dot) => bail!("-o dot is for `l7ctl servicemap`"),
        (GetWhat::Status, _) => unreachable!("answered above"),
    }
    Ok(ExitCode::SUCCESS)
}

async fn delete(api: &Api, name: &str, namespace: Option<&str>) -> Result<ExitCode> {
    let key = match (name.contains('/'), namespace) {
        (true, _) => name.to_string(),
        (false, Some(ns)) => format!("{ns}/{name}"),
        (false, None) => format!("default/{name}"),
    };
    let path = format!("/v1/policies/{key}");
    let result = api_call(api, Method::DELETE, &path, None, Bytes::new()).await;
    // No namespace given and none there: a clusterwide policy by that name.
    let result = match result {
        Err(e)
            if namespace.is_none()
                && !name.contains('/')
                && e.downcast_ref::<ApiFailure>().is_some_and(ApiFailure::is_not_found) =>
        {
            api_call(api, Method::DELETE, &format!("/v1/policies/{name}"), None, Bytes::new()).await.map_err(|_| e)
        }
        other => other,
    };
    let applied: Applied = serde_json::from_slice(&result?)?;
    let deleted = applied.changes.first().map_or(key.as_str(), |(k, _)| k.as_str());
    println!("{deleted} deleted; {}", in_force(&applied));
    Ok(ExitCode::SUCCESS)
}

fn flow_row(f: &serde_json::Value) -> Vec<String> {
    let endpoint = |e: &serde_json::Value| match e["workload"].as_str() {
        Some(w) => w.to_string(),
        None if e["ip"].as_str().unwrap_or("").is_empty() => "?".into(),
        None => format!("{}:{}", e["ip"].as_str().unwrap_or(""), e["port"]),
    };
    let l7 = &f["l7"];
    let (protocol, detail) = match l7["type"].as_str() {
        Some("http") => (
            "http".to_string(),
            format!(
                "{} {} -> {}",
                l7["http"]["method"].as_str().unwrap_or(""),
                l7["http"]["url"].as_str().unwrap_or(""),
                l7["http"]["code"]
            ),
        ),
        Some("grpc") => (
            "grpc".to_string(),
            format!(
                "{}/{} status={}",
                l7["grpc"]["service"].as_str().unwrap_or(""),
                l7["grpc"]["method"].as_str().unwrap_or(""),
                l7["grpc"]["status"].as_str().unwrap_or("-")
            ),
        ),
        Some("kafka") => (
            "kafka".to_string(),
            format!(
                "{} v{} topic={} client={} error={}",
                l7["kafka"]["api_key"].as_str().unwrap_or(""),
                l7["kafka"]["api_version"],
                l7["kafka"]["topic"].as_str().unwrap_or("-"),
                l7["kafka"]["client_id"].as_str().unwrap_or(""),
                l7["kafka"]["error_code"]
            ),
        ),
        _ => (
            f["l4"]["protocol"].as_str().unwrap_or("").to_ascii_lowercase(),
            format!(
                "port {}{}",
                f["destination"]["port"],
                f["reason"].as_str().map(|r| format!(" ({r})")).unwrap_or_default()
            ),
        ),
    };
    vec![
        f["time"].as_str().unwrap_or("").to_string(),
        f["verdict"].as_str().unwrap_or("").to_string(),
        f["direction"].as_str().unwrap_or("").to_string(),
        endpoint(&f["source"]),
        endpoint(&f["destination"]),
        protocol,
        detail,
        f["policy_name"].as_str().unwrap_or("-").to_string(),
    ]
}

const FLOW_HEADERS: [&str; 8] = ["TIME", "VERDICT", "DIRECTION", "FROM", "TO", "PROTOCOL", "DETAIL", "POLICY"];

async fn observe(api: &Api, args: ObserveArgs) -> Result<ExitCode> {
    let mut query = Vec::new();
    let mut add = |k: &str, v: &Option<String>| {
        if let Some(v) = v {
            query.push(format!("{k}={}", client::encode_query_value(v)));
        }
    };
    add("verdict", &args.verdict);
    add("from", &args.from);
    add("to", &args.to);
    add("protocol", &args.protocol);
    add("since", &args.since);
    if args.follow {
        query.push("follow=true".into());
    }
    let path = format!("/v1/flows?{}", query.join("&"));
    if !args.follow {
        let body = api_call(api, Method::GET, &path, None, Bytes::new()).await?;
        let flows: Vec<serde_json::Value> =
            String::from_utf8_lossy(&body).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        match args.output {
            Output::Json => print_json_lines(&flows),
            Output::Table => print_table(&FLOW_HEADERS, &flows.iter().map(flow_row).collect::<Vec<_>>()),
            other => bail!("-o {other:?} is not a flow format (table or json)"),
        }
        return Ok(ExitCode::SUCCESS);
    }
    let (status, mut body) = client::send(api.addr, Method::GET, &path, api.headers(None), Bytes::new())
        .await
        .map_err(|e| api_unreachable(api, e))?;
    if !status.is_success() {
        let text = http_body_util::BodyExt::collect(body).await.map(|b| b.to_bytes()).unwrap_or_default();
        bail!("{} ({status})", String::from_utf8_lossy(&text).trim());
    }
    if args.output == Output::Table {
        println!("{}", FLOW_HEADERS.join("  "));
    }
    let mut pending = Vec::new();
    while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
        let Ok(data) = frame?.into_data() else { continue };
        pending.extend_from_slice(&data);
        while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=pos).collect();
            let Ok(flow) = serde_json::from_slice::<serde_json::Value>(&line) else { continue };
            match args.output {
                Output::Json => println!("{flow}"),
                _ => println!("{}", flow_row(&flow).join("  ")),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn simulate(api: &Api, file: &Path, since: Option<String>, output: Output) -> Result<ExitCode> {
    let mut path = "/v1/simulate".to_string();
    if let Some(s) = &since {
        path.push_str(&format!("?since={}", client::encode_query_value(s)));
    }
    let body = api_call(api, Method::POST, &path, Some(Upload::CONTENT_TYPE), upload(file)?).await?;
    let report: SimulationReport = serde_json::from_slice(&body)?;
    if output == Output::Json {
        println!("{}", json_line(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "replayed {} of {} recorded flows{} against the candidate: {} unchanged, {} newly denied, {} newly allowed, {} newly audit ({} not replayable)",
        report.replayed,
        report.flows,
        since.map(|s| format!(" (last {s})")).unwrap_or_default(),
        report.unchanged,
        report.newly_denied,
        report.newly_allowed,
        report.newly_audit,
        report.skipped,
    );
    let rows: Vec<Vec<String>> = report
        .changes
        .into_iter()
        .map(|c| {
            vec![
                c.count.to_string(),
                format!("{} -> {}", c.before, c.after),
                c.from,
                c.to,
                c.protocol,
                c.detail,
                or_dash(c.policy),
            ]
        })
        .collect();
    if !rows.is_empty() {
        println!();
        print_table(&["COUNT", "CHANGE", "FROM", "TO", "PROTOCOL", "EXAMPLE", "POLICY"], &rows);
    }
    for note in &report.notes {
        println!("note: {note}");
    }
    Ok(ExitCode::SUCCESS)
}

async fn servicemap(api: &Api, since: Option<String>, output: Output) -> Result<ExitCode> {
    let format = match output {
        Output::Dot => "dot",
        Output::Json => "json",
        other => bail!("-o {other:?}: the service map prints as dot or json"),
    };
    let mut path = format!("/v1/servicemap?format={format}");
    if let Some(s) = &since {
        path.push_str(&format!("&since={}", client::encode_query_value(s)));
    }
    let body = api_call(api, Method::GET, &path, None, Bytes::new()).await?;
    if output == Output::Json {
        let map: ServiceMap = serde_json::from_slice(&body)?;
        let mut lines: Vec<serde_json::Value> = Vec::new();
        for n in &map.nodes {
            lines.push(serde_json::json!({ "node": n }));
        }
        for e in &map.edges {
            lines.push(serde_json::json!({ "edge": e }));
        }
        print_json_lines(&lines);
    } else {
        print!("{}", String::from_utf8_lossy(&body));
    }
    Ok(ExitCode::SUCCESS)
}

async fn run(args: RunArgs) -> Result<ExitCode> {
    require_root("l7ctl run")?;
    // Everything that can fail is checked before CMD starts.
    policy_api::labels::Labels::parse(&args.labels).context("--labels")?;
    let user = nix::unistd::User::from_name(&args.user)?.with_context(|| format!("no such user `{}`", args.user))?;
    for cap in &args.caps {
        policy_api::sandbox::check_cap(cap)?;
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

    // The child joins the workload's cgroup and its own namespaces (`l7ctl __sandbox`, see
    // policy_api::sandbox), then drops to the user with setpriv (util-linux) and runs CMD. (No
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
    let shares: Vec<PathBuf> = args
        .share
        .iter()
        .map(|s| std::fs::canonicalize(s).with_context(|| format!("--share {}", s.display())))
        .collect::<Result<_>>()?;
    let mut hide: Vec<String> = reply.hide.clone();
    hide.push(args.dirs.state_dir.display().to_string());
    hide.push(args.dirs.run_dir.display().to_string());
    // A shared directory is writable inside: never one of the kernel's filesystems (a share of
    // cgroupfs would make cgroup.procs writable again), `/`, nor one inside the node's own
    // directories (those inside a share stay hidden: they are covered after it is bound).
    for s in &shares {
        let kernel = ["/sys", "/proc", "/dev"].iter().any(|k| s.starts_with(k));
        let node =
            hide.iter().map(PathBuf::from).filter_map(|h| std::fs::canonicalize(h).ok()).any(|h| s.starts_with(&h));
        if kernel || node || s == Path::new("/") {
            bail!("--share {}: not shareable (the kernel's filesystems and the node's own directories stay read-only or hidden)", s.display());
        }
    }
    let mut child = tokio::process::Command::new(std::env::current_exe().context("finding l7ctl")?)
        .arg("__sandbox")
        .arg("--cgroup")
        .arg(&cgroup)
        .args(hide.iter().flat_map(|h| ["--hide", h.as_str()]))
        .args(shares.iter().flat_map(|s| [std::ffi::OsStr::new("--share"), s.as_os_str()]))
        .arg("--")
        // A session of its own: on the caller's terminal, TIOCSTI would type commands into the
        // shell that ran `l7ctl run` (the kernel allows it for the terminal's own session).
        .args(["setsid", "-w", "setpriv"])
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
    Ok(ExitCode::from(status_code(status)))
}

fn exit_with(result: Result<ExitCode>) -> ExitCode {
    result.unwrap_or_else(|e| {
        eprintln!("l7ctl: {e:#}");
        ExitCode::from(1)
    })
}

/// A wait status as a shell reports it: the exit code, or 128 + the signal.
fn status_code(status: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt as _;
    let code = match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(sig)) => 128 + sig,
        _ => 1,
    };
    code.clamp(0, 255) as u8
}

/// The signals a workload's parents pass on to it, listened for before the child exists (a
/// signal with no handler is dropped on the way to a PID namespace's init).
struct Forwarder([(nix::sys::signal::Signal, tokio::signal::unix::Signal); 3]);

impl Forwarder {
    /// Inside a runtime.
    fn new() -> Result<Self> {
        use nix::sys::signal::Signal::{SIGHUP, SIGINT, SIGTERM};
        let listen = |s: nix::sys::signal::Signal| -> Result<_> {
            Ok((s, tokio::signal::unix::signal(tokio::signal::unix::SignalKind::from_raw(s as i32))?))
        };
        Ok(Forwarder([listen(SIGTERM)?, listen(SIGINT)?, listen(SIGHUP)?]))
    }

    /// Waits on `exited` while passing the signals on to `pid`.
    async fn until(self, pid: Option<nix::unistd::Pid>, exited: impl std::future::Future<Output = u8>) -> u8 {
        let [(s0, mut a), (s1, mut b), (s2, mut c)] = self.0;
        tokio::pin!(exited);
        loop {
            let sig = tokio::select! {
                code = &mut exited => return code,
                _ = a.recv() => s0,
                _ = b.recv() => s1,
                _ = c.recv() => s2,
            };
            if let Some(pid) = pid {
                let _ = nix::sys::signal::kill(pid, sig);
            }
        }
    }
}

/// `l7ctl __sandbox`: see policy_api::sandbox. Exits with `__init`'s status (CMD's). Once the
/// PID namespace is unshared this process may not start threads, so it waits in a
/// current-thread runtime.
fn sandbox(args: SandboxArgs) -> Result<ExitCode> {
    // A workload never outlives the `l7ctl run` that registered it (unregistered, its cgroup
    // would be judged as the host's).
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
    policy_api::sandbox::enter(&args.cgroup)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let code = rt.block_on(async move {
        let forwarder = Forwarder::new()?;
        // The first child after unsharing the PID namespace is its pid 1.
        let mut child = tokio::process::Command::new(std::env::current_exe().context("finding l7ctl")?)
            .arg("__init")
            .arg("--cgroup")
            .arg(&args.cgroup)
            .args(args.hide.iter().flat_map(|h| [std::ffi::OsStr::new("--hide"), h.as_os_str()]))
            .args(args.share.iter().flat_map(|h| [std::ffi::OsStr::new("--share"), h.as_os_str()]))
            .arg("--")
            .args(&args.cmd)
            .spawn()
            .context("starting the workload's init")?;
        let pid = child.id().map(|p| nix::unistd::Pid::from_raw(p as i32));
        anyhow::Ok(forwarder.until(pid, async move { child.wait().await.map(status_code).unwrap_or(1) }).await)
    })?;
    Ok(ExitCode::from(code))
}

/// `l7ctl __init`: pid 1 of the workload's PID namespace.
fn init(args: SandboxArgs) -> Result<ExitCode> {
    use nix::sys::wait::{waitpid, WaitStatus};
    // With it goes the whole PID namespace.
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
    policy_api::sandbox::build_view(&args.hide, &args.share)?;
    let working_dir = policy_api::sandbox::enter_working_dir();
    policy_api::sandbox::scope_ipc()?;
    policy_api::sandbox::deny_user_namespaces()?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let code = rt.block_on(async move {
        let forwarder = Forwarder::new()?;
        let child = std::process::Command::new(&args.cmd[0])
            .args(&args.cmd[1..])
            .current_dir(&working_dir)
            .env("PWD", &working_dir)
            .spawn()
            .with_context(|| format!("starting {}", args.cmd[0]))?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let (tx, rx) = tokio::sync::oneshot::channel();
        // As pid 1 it also reaps every orphan of the namespace; CMD's own status ends the wait.
        std::thread::spawn(move || {
            let code = loop {
                match waitpid(None, None) {
                    Ok(WaitStatus::Exited(p, c)) if p == pid => break c.clamp(0, 255) as u8,
                    Ok(WaitStatus::Signaled(p, sig, _)) if p == pid => break (128 + sig as i32).clamp(0, 255) as u8,
                    Ok(_) | Err(nix::Error::EINTR) => continue,
                    Err(_) => break 1,
                }
            };
            let _ = tx.send(code);
        });
        anyhow::Ok(forwarder.until(Some(pid), async move { rx.await.unwrap_or(1) }).await)
    })?;
    Ok(ExitCode::from(code))
}

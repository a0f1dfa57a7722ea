//! The commands and their flags (clap): what `l7ctl --help` shows.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand, ValueEnum};
use l7mesh_api::layout::{
    NodePaths, DEFAULT_API, DEFAULT_CGROUP_ROOT, DEFAULT_PIN_DIR, DEFAULT_RUN_DIR, DEFAULT_STATE_DIR,
};

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
pub(crate) struct Cli {
    /// policy-api's address (the commands that talk to a running node use it).
    #[arg(long, global = true, env = "L7MESH_API", default_value = DEFAULT_API)]
    pub(crate) api: SocketAddr,
    /// The API token policy-api writes (root only) [default: $L7MESH_RUN_DIR/api-token, else
    /// /run/l7mesh/api-token].
    #[arg(long, global = true, env = "L7MESH_API_TOKEN_FILE")]
    pub(crate) api_token_file: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) log: l7mesh_log::LogArgs,
    #[command(subcommand)]
    pub(crate) cmd: Cmd,
}

/// How to print results.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Output {
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
pub(crate) enum GetWhat {
    Policies,
    Workloads,
    /// The policy version in force on each part: store, kernel, l7proxy.
    Status,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum DeleteWhat {
    Policy,
}

#[derive(clap::Args)]
pub(crate) struct ObserveArgs {
    /// Keep streaming new flows as they happen (after those already recorded).
    #[arg(long)]
    pub(crate) follow: bool,
    /// Only flows with this verdict (forwarded: a proxied connection's end, closed or reset
    /// by a peer; error: a connection that failed, e.g. its upstream could not be reached,
    /// which neither policy nor a bound refused).
    #[arg(long, value_parser = ["allowed", "denied", "audit", "forwarded", "error"])]
    pub(crate) verdict: Option<String>,
    /// Only flows from sources matching k=v[,k=v] (labels, or workload=/namespace=/ip=).
    #[arg(long)]
    pub(crate) from: Option<String>,
    /// Only flows to destinations matching k=v[,k=v] (labels, or workload=/namespace=/ip=).
    #[arg(long)]
    pub(crate) to: Option<String>,
    /// Only this protocol (tcp/udp: connections judged at L4).
    #[arg(long, value_parser = ["http", "grpc", "kafka", "tcp", "udp"])]
    pub(crate) protocol: Option<String>,
    /// Only flows from the last DURATION (30s, 5m, 2h, 1d).
    #[arg(long)]
    pub(crate) since: Option<String>,
    /// table or json (JSON Lines).
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    pub(crate) output: Output,
    /// Print each DENIED and AUDIT flow as one sentence: who asked what, which policy rule
    /// decided, and why (as `l7ctl explain`).
    #[arg(long)]
    pub(crate) explain: bool,
}

#[derive(Subcommand)]
pub(crate) enum Cmd {
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
    /// Why flows were denied: each DENIED and AUDIT flow (with the filters of `observe`) as
    /// one sentence naming the policy and rule that decided and what did not match, e.g.
    /// `DENIED  client -> server:8080 GET /admin  by policy default/web
    /// ingress[0].toPorts[0].rules.http: no rule matched path /admin (rule allows GET /)`.
    Explain(ObserveArgs),
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
pub(crate) struct SandboxArgs {
    /// The workload's cgroup directory.
    #[arg(long)]
    pub(crate) cgroup: PathBuf,
    /// A node path to cover with an empty read-only mount; repeatable.
    #[arg(long = "hide")]
    pub(crate) hide: Vec<PathBuf>,
    /// A host directory the workload sees and may write; repeatable.
    #[arg(long = "share")]
    pub(crate) share: Vec<PathBuf>,
    /// The command (setpriv ... -- CMD).
    #[arg(trailing_var_arg = true, required = true, num_args = 1..)]
    pub(crate) cmd: Vec<String>,
}

#[derive(Subcommand)]
pub(crate) enum SecretCmd {
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
pub(crate) struct NodeDirs {
    /// State directory (store, proxy tables); created 0700.
    #[arg(long, env = "L7MESH_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub(crate) state_dir: PathBuf,
    /// Directory of the node's control socket.
    #[arg(long, env = "L7MESH_RUN_DIR", default_value = DEFAULT_RUN_DIR)]
    pub(crate) run_dir: PathBuf,
}

/// Where a node keeps everything: what `up` and `down` both name.
#[derive(clap::Args)]
pub(crate) struct NodeLayout {
    #[command(flatten)]
    pub(crate) dirs: NodeDirs,
    /// The node's cgroup (workloads go in <root>/workloads/<name>).
    #[arg(long, env = "L7MESH_CGROUP_ROOT", default_value = DEFAULT_CGROUP_ROOT)]
    pub(crate) cgroup_root: PathBuf,
    /// bpffs directory of the datapath.
    #[arg(long, env = "L7MESH_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
    pub(crate) pin_dir: PathBuf,
}

impl NodeLayout {
    pub(crate) fn paths(&self) -> NodePaths {
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
pub(crate) fn node_dir_args(paths: &NodePaths) -> Vec<String> {
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
pub(crate) struct UpArgs {
    /// A YAML file of these flags (`policy: DIR`, `fail-open: true`, `listen-api: ADDR`,
    /// `log-format: json`, ...; the keys are the long flags). A flag on the command line, or
    /// its environment variable, wins over the file.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) layout: NodeLayout,
    /// Policy file or directory, applied at start and re-applied whenever it changes. A change
    /// that does not validate is reported and ignored: the last good policy stays in force.
    #[arg(long)]
    pub(crate) policy: Option<PathBuf>,
    /// When l7proxy is not listening, let marked connections through unredirected instead of
    /// refusing them.
    #[arg(long)]
    pub(crate) fail_open: bool,
    /// Context labels on l7proxy's connection and request metrics, passed to its
    /// --metrics-context (e.g. `workload,namespace,method,status_class`).
    #[arg(long)]
    pub(crate) metrics_context: Option<String>,
    /// Where policy-api serves its REST API.
    #[arg(long = "listen-api", env = "L7MESH_API", default_value = DEFAULT_API)]
    pub(crate) api: SocketAddr,
}

#[derive(clap::Args)]
pub(crate) struct DownArgs {
    #[command(flatten)]
    pub(crate) layout: NodeLayout,
    /// Also remove the datapath (every pinned program and map): enforcement stops.
    #[arg(long)]
    pub(crate) uninstall: bool,
}

#[derive(clap::Args)]
pub(crate) struct RunArgs {
    #[command(flatten)]
    pub(crate) dirs: NodeDirs,
    /// Workload name (unique among running workloads; a DNS label).
    #[arg(long)]
    pub(crate) name: String,
    /// Labels, k=v[,k=v] (`k8s:` prefixes allowed); `io.kubernetes.pod.namespace=NS` sets the
    /// namespace (default: default).
    #[arg(long, default_value = "")]
    pub(crate) labels: String,
    /// User to run CMD as.
    #[arg(long, default_value = "nobody")]
    pub(crate) user: String,
    /// A host directory CMD may see and write (its /tmp and /var/tmp are private, and every
    /// other directory is read-only); repeatable. A root workload owns every root-owned file
    /// there.
    #[arg(long = "share", value_name = "DIR")]
    pub(crate) share: Vec<PathBuf>,
    /// Capability to keep (e.g. net_bind_service for ports below 1024); repeatable. Those that
    /// would lift the isolation are refused (sys_admin, net_admin, net_raw, sys_ptrace, bpf,
    /// mknod, dac_read_search, sys_module, sys_rawio, ...: the error says why).
    #[arg(long = "cap")]
    pub(crate) caps: Vec<String>,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, required = true, num_args = 1..)]
    pub(crate) cmd: Vec<String>,
}

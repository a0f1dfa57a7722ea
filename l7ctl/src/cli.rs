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

/// What `get` lists: singular or plural, any case (`policy`, `Policies`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum GetWhat {
    #[value(alias = "policy")]
    Policies,
    #[value(alias = "workload")]
    Workloads,
    /// The node's status, as `l7ctl status` prints it.
    Status,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum DeleteWhat {
    #[value(alias = "policies")]
    Policy,
}

/// `l7ctl completion SHELL`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

/// One of `values`, in any case, as its lower-case self (what the API's filters take).
fn lower_case(values: &'static [&'static str]) -> impl clap::builder::TypedValueParser<Value = String> {
    use clap::builder::TypedValueParser as _;
    clap::builder::PossibleValuesParser::new(values).map(|v| v.to_ascii_lowercase())
}

#[derive(clap::Args)]
pub(crate) struct ObserveArgs {
    /// Keep streaming new flows as they happen (after those already recorded).
    #[arg(long)]
    pub(crate) follow: bool,
    /// Only flows with this verdict (forwarded: a proxied connection's end, closed or reset
    /// by a peer; error: a connection that failed, e.g. its upstream could not be reached,
    /// which neither policy nor a bound refused).
    #[arg(long, ignore_case = true, value_parser = lower_case(&["allowed", "denied", "audit", "forwarded", "error"]))]
    pub(crate) verdict: Option<String>,
    /// Only flows from sources matching k=v[,k=v] (labels, or workload=/namespace=/ip=).
    #[arg(long)]
    pub(crate) from: Option<String>,
    /// Only flows to destinations matching k=v[,k=v] (labels, or workload=/namespace=/ip=).
    #[arg(long)]
    pub(crate) to: Option<String>,
    /// Only this protocol (tcp/udp: connections judged at L4).
    #[arg(long, ignore_case = true, value_parser = lower_case(&["http", "grpc", "kafka", "tcp", "udp"]))]
    pub(crate) protocol: Option<String>,
    /// Only flows from the last DURATION (30s, 5m, 2h, 1d).
    #[arg(long)]
    pub(crate) since: Option<String>,
    /// table or json (JSON Lines).
    #[arg(short = 'o', long = "output", value_enum, ignore_case = true, default_value = "table")]
    pub(crate) output: Output,
    /// Print each DENIED and AUDIT flow as one sentence: who asked what, which policy rule
    /// decided, and why (as `l7ctl explain`).
    #[arg(long)]
    pub(crate) explain: bool,
    /// Every node's flows (in a cluster): this node's and each other node's, asked through the
    /// tunnel, each naming its node (OBSERVER `proxy@node-1`; `node` in JSON); not with
    /// --follow yet.
    #[arg(long, conflicts_with = "follow")]
    pub(crate) cluster: bool,
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
    #[command(after_help = "EXAMPLES:\n  \
        sudo l7ctl up --policy /etc/l7mesh/policies/\n  \
        sudo l7ctl up --policy policies/ --fail-open")]
    Up(Box<UpArgs>),
    /// Stop a node: `l7ctl up` and the processes it started (found by the pid files in the run
    /// dir, also after a `kill -9` of `l7ctl up`). The datapath stays pinned and enforcing
    /// unless --uninstall, which removes every pinned program and map (enforcement stops;
    /// workloads still running are no longer policed) and the node's empty cgroups, and says
    /// what it removed. The store (policies, history) stays in the state dir.
    #[command(after_help = "EXAMPLES:\n  \
        sudo l7ctl down                  # stop; the pinned datapath keeps enforcing the policy in force\n  \
        sudo l7ctl down --uninstall      # stop and remove the datapath: enforcement stops")]
    Down(DownArgs),
    /// The node at a glance: each process (up or down, pid, version), the policy version in
    /// force in each part (store, kernel, l7proxy), the datapath (pinned, programs attached,
    /// fail-open or fail-closed), counts (policies, workloads, connections through the proxy)
    /// and the last errors. Exit 0 when every process is up, 2 when one is down.
    #[command(after_help = "EXAMPLES:\n  \
        sudo l7ctl status\n  \
        sudo l7ctl status -o json | jq .components\n  \
        sudo l7ctl status >/dev/null || echo \"a part of the node is down\"")]
    Status(StatusArgs),
    /// The policy versions (the last 100 that changed policies): version, time, what changed
    /// (policies created, updated, deleted), where from (`api`, or `file:PATH` for
    /// `l7ctl up --policy`) and by whom.
    #[command(after_help = "EXAMPLES:\n  \
        sudo l7ctl history\n  \
        sudo l7ctl history -o json | tail -1")]
    History {
        /// table or json (JSON Lines: one version a line).
        #[arg(short = 'o', long = "output", value_enum, ignore_case = true, default_value = "table")]
        output: Output,
    },
    /// Put back the policies of VERSION (one listed by `l7ctl history`) as a new version: the
    /// policies written through the API become exactly those VERSION had. Policies that
    /// `--policy` files manage stay as the files have them. All or nothing: on any failure
    /// the version in force stays.
    #[command(after_help = "EXAMPLES:\n  \
        sudo l7ctl history               # find the version to go back to\n  \
        sudo l7ctl rollback 12")]
    Rollback { version: u64 },
    /// Run CMD as a workload: its own cgroup, registered with its labels before CMD starts,
    /// deregistered when it exits. Runs as an unprivileged user with no capabilities unless
    /// --user/--cap say otherwise, and, whatever the user, where it cannot leave its cgroup:
    /// its own cgroup, mount and PID namespaces, the filesystem read-only but /tmp and
    /// /var/tmp, the node's state, sockets and pins hidden, no new user namespaces. Processes
    /// CMD leaves behind end with it. Exits with CMD's status.
    #[command(after_help = "EXAMPLES:\n  \
        sudo l7ctl run --name web --labels app=web -- python3 -m http.server 8080\n  \
        sudo l7ctl run --name client --labels app=client,io.kubernetes.pod.namespace=prod -- curl -s http://127.0.0.1:8080/\n  \
        sudo l7ctl run --name www --labels app=www --cap net_bind_service -- /usr/sbin/nginx -g 'daemon off;'")]
    Run(RunArgs),
    /// Create or update policies on the running node: multi-document YAML or JSON, a file, a
    /// directory of *.yaml/*.yml/*.json, or - for stdin. Atomic: if anything does not validate,
    /// every error is printed (file, line, field) and nothing changes. Returns once the new
    /// version is in force in l7proxy and the kernel.
    #[command(after_help = "EXAMPLES:\n  \
        sudo l7ctl apply -f policy.yaml\n  \
        sudo l7ctl apply -f examples/policies/          # every *.yaml, *.yml, *.json in it\n  \
        sudo l7ctl apply --dry-run -f policy.yaml       # every check, nothing applied\n  \
        sudo l7ctl get policy web -o yaml | sed s/GET/POST/ | sudo l7ctl apply -f -")]
    Apply {
        /// A policy file, a directory of them, or - for stdin.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// Validate on the node only; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Write policies that `l7ctl up --policy` files manage anyway (until the files change
        /// next, when theirs is put back).
        #[arg(long)]
        force: bool,
    },
    /// List policies (namespace, name, mode, revision, origin, the workloads each selects) or
    /// workloads (labels, identity, enforced directions), or show one policy by name
    /// (`-o yaml` prints the stored document, which `apply -f` takes back). Nouns may be
    /// singular or plural. `get policies` also says the versions in force (on stderr).
    /// `get status` prints what `l7ctl status` does (and exits 0 once it could tell).
    #[command(after_help = "EXAMPLES:\n  \
        l7ctl get policies\n  \
        l7ctl get policy web -o yaml > web.yaml         # edit, then: l7ctl apply -f web.yaml\n  \
        l7ctl get policy prod/web -o json\n  \
        l7ctl get workloads -o json")]
    Get {
        #[arg(value_enum, ignore_case = true)]
        what: GetWhat,
        /// One policy or workload: `NAME` (in --namespace, else default, else a clusterwide
        /// policy) or `NS/NAME`.
        name: Option<String>,
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[arg(short = 'o', long = "output", value_enum, ignore_case = true, default_value = "table")]
        output: Output,
    },
    /// Delete policies: one by name (`NAME` in --namespace, `NS/NAME`, or a clusterwide
    /// policy's name), or those a file names (`-f FILE|DIR|-`: every policy its documents
    /// name; all or none). Returns once the change is in force.
    #[command(after_help = "EXAMPLES:\n  \
        sudo l7ctl delete policy web\n  \
        sudo l7ctl delete policy web -n prod           # or: delete policy prod/web\n  \
        sudo l7ctl delete -f policy.yaml               # the policies policy.yaml defines")]
    Delete {
        #[arg(
            value_enum,
            ignore_case = true,
            required_unless_present = "file",
            requires = "name",
            conflicts_with = "file"
        )]
        what: Option<DeleteWhat>,
        #[arg(conflicts_with = "file")]
        name: Option<String>,
        #[arg(short = 'n', long, conflicts_with = "file")]
        namespace: Option<String>,
        /// Delete the policies this file (a directory of them, or - for stdin) defines.
        #[arg(short = 'f', long = "filename")]
        file: Option<PathBuf>,
        /// Delete policies that `l7ctl up --policy` files manage anyway (they come back when
        /// the files change next).
        #[arg(long)]
        force: bool,
    },
    /// Show recorded flows (L7 requests and kernel L4 verdicts), oldest first; --follow
    /// streams new ones.
    #[command(after_help = "EXAMPLES:\n  \
        sudo l7ctl observe --follow --verdict denied        # denials as they happen\n  \
        sudo l7ctl observe --from app=client --to app=server --protocol http --since 10m\n  \
        sudo l7ctl observe -o json | jq .reason              # JSON Lines, one flow a line")]
    Observe(ObserveArgs),
    /// Why flows were denied: each DENIED and AUDIT flow (with the filters of `observe`) as
    /// one sentence naming the policy and rule that decided and what did not match, e.g.
    /// `DENIED  client -> server:8080 GET /admin  by policy default/web
    /// ingress[0].toPorts[0].rules.http: no rule matched path /admin (rule allows GET /)`.
    #[command(after_help = "EXAMPLES:\n  \
        sudo l7ctl explain --since 5m                        # why the last 5 minutes' denials\n  \
        sudo l7ctl explain --follow --to app=server         # as they happen, towards one workload")]
    Explain(ObserveArgs),
    /// Replay recorded flows against a candidate policy set (the stored policies with the
    /// candidate's documents applied over them) and print what would change: newly denied,
    /// newly allowed, with counts and examples. Nothing is applied.
    /// Exit 3 when the candidate changes a verdict (unless --no-fail-on-change), so CI can
    /// gate a policy change on recorded traffic; flows that cannot be replayed are counted by
    /// why.
    #[command(after_help = "EXAMPLES:\n  \
        l7ctl simulate -f candidate.yaml --since 1h\n  \
        l7ctl simulate -f candidate.yaml || echo \"the candidate changes verdicts (exit 3)\"\n  \
        l7ctl simulate --no-fail-on-change -f candidate.yaml -o json")]
    Simulate {
        /// The candidate: a policy file, a directory of them, or - for stdin.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// Only flows from the last DURATION (30s, 5m, 2h, 1d).
        #[arg(long)]
        since: Option<String>,
        /// table or json.
        #[arg(short = 'o', long = "output", value_enum, ignore_case = true, default_value = "table")]
        output: Output,
        /// Exit 3 when the candidate changes any verdict (the default).
        #[arg(long, overrides_with = "no_fail_on_change")]
        fail_on_change: bool,
        /// Report the changes and exit 0.
        #[arg(long, overrides_with = "fail_on_change")]
        no_fail_on_change: bool,
    },
    /// Who talks to whom, from flows: workloads and the protocols, request counts and denials
    /// between them. `-o dot | dot -Tsvg > map.svg` draws it.
    #[command(after_help = "EXAMPLES:\n  \
        l7ctl servicemap | dot -Tsvg > map.svg\n  \
        l7ctl servicemap -o json --since 10m")]
    Servicemap {
        #[arg(short = 'o', long = "output", value_enum, ignore_case = true, default_value = "dot")]
        output: Output,
        /// Only flows from the last DURATION.
        #[arg(long)]
        since: Option<String>,
    },
    /// Check policy files locally without applying them: every error names file, line and
    /// field. Exit 1 on any error, 0 otherwise (warnings included).
    #[command(after_help = "EXAMPLES:\n  \
        l7ctl validate -f policy.yaml\n  \
        l7ctl validate -f examples/policies/\n  \
        kubectl get cnp -A -o yaml | l7ctl validate -f -")]
    Validate {
        /// A policy file, a directory of *.yaml, *.yml, *.json files, or - for stdin.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Print a shell completion script (bash, zsh or fish) on stdout.
    #[command(after_help = "EXAMPLES:\n  \
        source <(l7ctl completion bash)\n  \
        l7ctl completion bash | sudo tee /etc/bash_completion.d/l7ctl\n  \
        l7ctl completion zsh > \"${fpath[1]}/_l7ctl\"\n  \
        l7ctl completion fish > ~/.config/fish/completions/l7ctl.fish")]
    Completion {
        #[arg(value_enum, ignore_case = true)]
        shell: CompletionShell,
    },
    /// Write man pages (l7ctl.1 and one per command, l7ctl-apply.1 ...) into DIR.
    #[command(after_help = "EXAMPLES:\n  \
        l7ctl man --dir target/man && man -l target/man/l7ctl-apply.1\n  \
        sudo l7ctl man --dir /usr/local/share/man/man1")]
    Man {
        #[arg(long, default_value = "man")]
        dir: PathBuf,
    },
    /// Print the mesh CA certificate (PEM) that workloads may trust (never a key); with a
    /// subcommand, the cluster's trust: its root, node intermediates.
    #[command(
        args_conflicts_with_subcommands = true,
        after_help = "EXAMPLES:\n  \
        sudo l7ctl ca > mesh-ca.pem\n  \
        l7ctl ca init --dir ~/l7mesh-root --trust-domain example.org   # where the root is kept, not on a node\n  \
        l7ctl ca issue-node node-a --dir ~/l7mesh-root --out node-a.pem\n  \
        sudo l7ctl ca install-node node-a.pem                           # on node-a; then delete the file\n  \
        sudo l7ctl ca show-node"
    )]
    Ca {
        #[command(subcommand)]
        cmd: Option<CaCmd>,
        /// Directory of the node's sockets.
        #[arg(long, env = "L7MESH_RUN_DIR", default_value = DEFAULT_RUN_DIR)]
        run_dir: PathBuf,
    },
    /// TLS secrets held by the broker (never by a workload).
    #[command(after_help = "EXAMPLES:\n  \
        sudo l7ctl secret import web-tls --cert web.crt --key web.key\n  \
        sudo l7ctl secret import upstream-ca --ca ca.pem")]
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
pub(crate) enum CaCmd {
    /// Make the cluster root (one per trust domain) in DIR: `root.key` (0600) and `root.pem`.
    /// Run it where the root is kept (an operator's machine), not on a node: nodes only ever
    /// hold their own intermediate.
    Init {
        /// Where the root is kept (created 0700; refused if it holds a root already).
        #[arg(long)]
        dir: PathBuf,
        /// The trust domain workload identities are named in
        /// (`spiffe://<trust domain>/ns/<namespace>/sa/<workload>`).
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Days the root is valid.
        #[arg(long, default_value_t = 3650)]
        days: u64,
    },
    /// Issue node NAME's intermediate from the root in DIR: one PEM file (the node's
    /// certificate, the root's, the node's key) for `l7ctl ca install-node` on that node.
    /// Issuing again for the same node is a rotation.
    IssueNode {
        /// The node's name (`l7ctl up --node-name`).
        name: String,
        /// Where the root is kept.
        #[arg(long)]
        dir: PathBuf,
        /// Where to write the bundle (0600) [default: DIR/nodes/NAME.pem].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Days the intermediate is valid.
        #[arg(long, default_value_t = 365)]
        days: u64,
    },
    /// Hand this node's intermediate (a bundle from `l7ctl ca issue-node`) to its broker, the
    /// only process that keeps it; installing a newer one for the same node rotates it
    /// (certificates issued before still verify until they expire: no connection drops).
    InstallNode {
        /// The bundle file.
        file: PathBuf,
        /// Directory of the node's sockets.
        #[arg(long, env = "L7MESH_RUN_DIR", default_value = DEFAULT_RUN_DIR)]
        run_dir: PathBuf,
    },
    /// Print the cluster's trust as this node holds it: the node's intermediate and the root
    /// (PEM; never a key).
    ShowNode {
        /// Directory of the node's sockets.
        #[arg(long, env = "L7MESH_RUN_DIR", default_value = DEFAULT_RUN_DIR)]
        run_dir: PathBuf,
    },
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
    /// Flow records l7proxy keeps in memory (its --flow-capacity) [default: 4096].
    #[arg(long, value_name = "N")]
    pub(crate) flow_capacity: Option<usize>,
    /// Where l7proxy keeps flows on disk, so that `--since` reaches past its ring and across
    /// restarts (root's, 0700) [default: <state-dir>/flows].
    #[arg(long, value_name = "DIR", conflicts_with = "no_flow_history")]
    pub(crate) flow_history_dir: Option<PathBuf>,
    /// Bytes of flow history kept, oldest deleted first (256M, 2G) [default: 256M].
    #[arg(long, value_name = "BYTES", value_parser = byte_size)]
    pub(crate) flow_history_max_bytes: Option<String>,
    /// Age after which flow history is deleted (12h, 7d) [default: 7d].
    #[arg(long, value_name = "DURATION", value_parser = age)]
    pub(crate) flow_history_max_age: Option<String>,
    /// Keep flows in memory only (l7proxy's ring; `--since` reaches no further back).
    #[arg(long)]
    pub(crate) no_flow_history: bool,
    /// The unix socket (mode 0600, root's only) where l7proxy serves Hubble's Observer API, for
    /// `sudo hubble observe --server unix://PATH` [default: <run dir>/hubble.sock].
    #[arg(long, value_name = "PATH", conflicts_with = "no_hubble")]
    pub(crate) hubble_socket: Option<PathBuf>,
    /// Serve no Hubble API.
    #[arg(long)]
    pub(crate) no_hubble: bool,
    /// Join a cluster: its etcd, `etcd://HOST:PORT[,HOST:PORT..]` (`etcd+tls://` with
    /// --kvstore-ca). The policy set, the nodes and their workloads are then the cluster's:
    /// `l7ctl apply` on any node puts a policy in force on every node.
    #[arg(long, value_name = "URL", conflicts_with = "policy")]
    pub(crate) kvstore: Option<String>,
    /// CA certificate (PEM) that signed etcd's server certificate (TLS to etcd).
    #[arg(long, value_name = "FILE", requires = "kvstore")]
    pub(crate) kvstore_ca: Option<PathBuf>,
    /// This node's client certificate (PEM) for etcd, with --kvstore-key.
    #[arg(long, value_name = "FILE", requires_all = ["kvstore_ca", "kvstore_key"])]
    pub(crate) kvstore_cert: Option<PathBuf>,
    /// The key of --kvstore-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "kvstore_cert")]
    pub(crate) kvstore_key: Option<PathBuf>,
    /// Seconds of this node's lease in etcd: how long its workloads stay listed on the other
    /// nodes after it dies [default: 10].
    #[arg(long, value_name = "SECONDS", requires = "kvstore", value_parser = clap::value_parser!(u32).range(2..=3600))]
    pub(crate) kvstore_lease_ttl: Option<u32>,
    /// The key prefix of the cluster in etcd [default: /l7mesh/v1].
    #[arg(long, value_name = "PREFIX", requires = "kvstore")]
    pub(crate) kvstore_prefix: Option<String>,
    /// Take the cluster's policy set even where it replaces policies this node had before it
    /// joined, or a set that came from another etcd cluster or prefix (refused otherwise: a
    /// wiped or wrong etcd must not wipe enforcement).
    #[arg(long, requires = "kvstore")]
    pub(crate) kvstore_adopt: bool,
    /// This node's name in the cluster [default: the hostname].
    #[arg(long, value_name = "NAME", requires = "kvstore")]
    pub(crate) node_name: Option<String>,
}

/// A size as l7proxy's --flow-history-max-bytes reads it (`4096`, `64K`, `256M`, `2GiB`),
/// checked here so that `l7ctl up` refuses it before starting anything.
fn byte_size(s: &str) -> Result<String, String> {
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let shift = match s[digits..].trim_end_matches("iB").trim_end_matches('B') {
        "" => Some(0),
        "K" | "k" => Some(10),
        "M" => Some(20),
        "G" => Some(30),
        _ => None,
    };
    match (s[..digits].parse::<u64>(), shift) {
        (Ok(n), Some(shift)) => match n.checked_mul(1 << shift) {
            Some(bytes) if bytes >= 64 << 10 => Ok(s.to_string()),
            Some(_) => Err(format!("`{s}`: the flow history needs at least 64K (--no-flow-history keeps none)")),
            None => Err(format!("`{s}`: expected a number of bytes with an optional K, M or G (256M)")),
        },
        _ => Err(format!("`{s}`: expected a number of bytes with an optional K, M or G (256M)")),
    }
}

/// A duration as l7proxy's --flow-history-max-age reads it (`30m`, `12h`, `7d`).
fn age(s: &str) -> Result<String, String> {
    let digits = s.trim_end_matches(['s', 'm', 'h', 'd']);
    if !digits.is_empty()
        && digits.len() <= 9
        && digits.bytes().all(|b| b.is_ascii_digit())
        && s.len() - digits.len() <= 1
    {
        let n: u64 = digits.parse().unwrap_or(0);
        let secs = n * match &s[digits.len()..] {
            "m" => 60,
            "h" => 3600,
            "d" => 86400,
            _ => 1,
        };
        if secs < 60 {
            return Err(format!("`{s}`: the flow history keeps flows 1m at least (--no-flow-history keeps none)"));
        }
        Ok(s.to_string())
    } else {
        Err(format!("`{s}`: expected a duration such as 12h or 7d"))
    }
}

/// `l7ctl status` with no flags (the layout from the environment or the defaults): what
/// `get status` shows.
#[derive(Parser)]
pub(crate) struct StatusDefaults {
    #[command(flatten)]
    pub(crate) args: StatusArgs,
}

#[derive(clap::Args)]
pub(crate) struct StatusArgs {
    #[command(flatten)]
    pub(crate) layout: NodeLayout,
    /// table or json.
    #[arg(short = 'o', long = "output", value_enum, ignore_case = true, default_value = "table")]
    pub(crate) output: Output,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("l7ctl").chain(args.iter().copied()))
    }

    #[test]
    fn nouns_are_singular_or_plural_in_any_case() {
        for (word, want) in [
            ("policies", GetWhat::Policies),
            ("policy", GetWhat::Policies),
            ("Policy", GetWhat::Policies),
            ("POLICIES", GetWhat::Policies),
            ("workload", GetWhat::Workloads),
            ("Workloads", GetWhat::Workloads),
            ("status", GetWhat::Status),
        ] {
            match parse(&["get", word]).unwrap_or_else(|e| panic!("get {word}: {e}")).cmd {
                Cmd::Get { what, name: None, .. } => assert_eq!(what, want, "get {word}"),
                _ => panic!("get {word} is not `get`"),
            }
        }
        // A near miss is refused, not read as something else.
        assert!(parse(&["get", "polic"]).is_err());
        assert!(parse(&["get", "pods"]).is_err());
        match parse(&["get", "policy", "web", "-n", "prod"]).unwrap().cmd {
            Cmd::Get { name, namespace, .. } => {
                assert_eq!((name.as_deref(), namespace.as_deref()), (Some("web"), Some("prod")))
            }
            _ => panic!(),
        }
    }

    #[test]
    fn output_formats_are_case_insensitive() {
        for (flag, want) in [("YAML", Output::Yaml), ("Json", Output::Json), ("table", Output::Table)] {
            match parse(&["get", "policies", "-o", flag]).unwrap().cmd {
                Cmd::Get { output, .. } => assert_eq!(output, want, "-o {flag}"),
                _ => panic!(),
            }
        }
        match parse(&["history", "-o", "JSON"]).unwrap().cmd {
            Cmd::History { output } => assert_eq!(output, Output::Json),
            _ => panic!(),
        }
        match parse(&["status", "-o", "Json"]).unwrap().cmd {
            Cmd::Status(args) => assert_eq!(args.output, Output::Json),
            _ => panic!(),
        }
        assert!(parse(&["get", "policies", "-o", "xml"]).is_err());
        match parse(&["completion", "BASH"]).unwrap().cmd {
            Cmd::Completion { shell } => assert_eq!(shell, CompletionShell::Bash),
            _ => panic!(),
        }
    }

    #[test]
    fn delete_takes_a_name_or_a_file_not_both() {
        match parse(&["delete", "policy", "web"]).unwrap().cmd {
            Cmd::Delete { what: Some(DeleteWhat::Policy), name: Some(n), file: None, force: false, .. } => {
                assert_eq!(n, "web")
            }
            _ => panic!(),
        }
        match parse(&["delete", "Policies", "web", "--force"]).unwrap().cmd {
            Cmd::Delete { what: Some(DeleteWhat::Policy), force: true, .. } => {}
            _ => panic!(),
        }
        match parse(&["delete", "-f", "-"]).unwrap().cmd {
            Cmd::Delete { what: None, name: None, file: Some(f), .. } => assert_eq!(f, PathBuf::from("-")),
            _ => panic!(),
        }
        assert!(parse(&["delete"]).is_err(), "nothing to delete");
        assert!(parse(&["delete", "policy"]).is_err(), "no name");
        assert!(parse(&["delete", "policy", "web", "-f", "x.yaml"]).is_err(), "a name and a file");
    }

    #[test]
    fn simulate_fails_on_change_unless_told_not_to() {
        let fail = |args: &[&str]| match parse(args).unwrap().cmd {
            Cmd::Simulate { no_fail_on_change, .. } => !no_fail_on_change,
            _ => panic!(),
        };
        assert!(fail(&["simulate", "-f", "c.yaml"]), "on by default");
        assert!(!fail(&["simulate", "-f", "c.yaml", "--no-fail-on-change"]));
        assert!(fail(&["simulate", "-f", "c.yaml", "--no-fail-on-change", "--fail-on-change"]), "the last one wins");
        assert!(!fail(&["simulate", "-f", "c.yaml", "--fail-on-change", "--no-fail-on-change"]));
    }

    #[test]
    fn rollback_takes_a_version_number() {
        match parse(&["rollback", "12"]).unwrap().cmd {
            Cmd::Rollback { version } => assert_eq!(version, 12),
            _ => panic!(),
        }
        assert!(parse(&["rollback", "latest"]).is_err());
        assert!(parse(&["rollback", "-1"]).is_err());
    }

    #[test]
    fn observe_filters_take_any_case_and_send_lower_case() {
        for cmd in ["observe", "explain"] {
            match parse(&[cmd, "--verdict", "DENIED", "--protocol", "Http", "-o", "JSON"]).unwrap().cmd {
                Cmd::Observe(a) | Cmd::Explain(a) => {
                    assert_eq!((a.verdict.as_deref(), a.protocol.as_deref()), (Some("denied"), Some("http")));
                    assert_eq!(a.output, Output::Json);
                }
                _ => panic!("{cmd}"),
            }
        }
        assert!(parse(&["observe", "--verdict", "maybe"]).is_err());
    }

    #[test]
    fn every_visible_command_has_examples() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        for sub in Cli::command().get_subcommands().filter(|s| !s.is_hide_set()) {
            let help = sub.get_after_help().map(|h| h.to_string()).unwrap_or_default();
            assert!(help.starts_with("EXAMPLES:"), "`l7ctl {} --help` has no EXAMPLES", sub.get_name());
            assert!(help.contains(&format!("l7ctl {}", sub.get_name())), "{}: {help}", sub.get_name());
        }
    }
}

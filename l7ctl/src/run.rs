//! `l7ctl run`: register a workload on the node's control socket, then run its command in the
//! sandbox (`__sandbox`, `__init`; see [`sandbox`]).

pub mod sandbox;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use l7mesh_api::control::{Reply, Request};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tracing::warn;

use crate::cli::{RunArgs, SandboxArgs};
use crate::require_root;

pub(crate) async fn run(args: RunArgs) -> Result<ExitCode> {
    require_root("l7ctl run")?;
    // Everything that can fail is checked before CMD starts.
    l7policy::labels::Labels::parse(&args.labels).context("--labels")?;
    let user = nix::unistd::User::from_name(&args.user)?.with_context(|| format!("no such user `{}`", args.user))?;
    for cap in &args.caps {
        sandbox::check_cap(cap)?;
    }
    let shares: Vec<PathBuf> = args
        .share
        .iter()
        .map(|s| std::fs::canonicalize(s).with_context(|| format!("--share {}", s.display())))
        .collect::<Result<_>>()?;
    check_command(&args.cmd[0], &user, &shares)?;
    let socket = l7mesh_api::layout::control_socket(&args.dirs.run_dir);
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
    // sandbox), then drops to the user with setpriv (util-linux) and runs CMD. (No
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

/// Whether `user` can do what `test FLAG path` checks, judged by the kernel itself: `test`
/// run as that user (setpriv, as the workload's command is), so modes, groups and ACLs all count.
fn user_can(user: &nix::unistd::User, flag: &str, path: &Path) -> bool {
    std::process::Command::new("setpriv")
        .args([format!("--reuid={}", user.uid), format!("--regid={}", user.gid), "--init-groups".into()])
        .args(["--", "test", flag])
        .arg(path)
        .stdin(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Where CMD is, as the workload's exec finds it: a path (relative to the working directory)
/// when it has a `/`, else the first file of that name in PATH, as root sees them (setpriv's
/// exec, as `user`, stops at that one even when `user` cannot reach it: a PATH of root's such
/// as /root/.pyenv/shims ahead of /usr/bin fails the workload).
fn resolve_command(cmd: &str) -> Result<PathBuf> {
    if cmd.contains('/') {
        return Ok(std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")).join(cmd));
    }
    let path =
        std::env::var("PATH").unwrap_or_else(|_| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    let found: Vec<PathBuf> =
        path.split(':').filter(|d| !d.is_empty()).map(|d| Path::new(d).join(cmd)).filter(|p| p.is_file()).collect();
    match found.first() {
        Some(p) => Ok(p.clone()),
        None => bail!("cannot run `{cmd}`: no such command in PATH ({path}); give its absolute path"),
    }
}

/// Fails, before anything is registered, when the workload could not start CMD: it does not
/// exist, the workload's view hides it (its /tmp and /var/tmp are private), or `user` may not
/// reach or execute it; the error says which directory or file stops it and what to do.
fn check_command(cmd: &str, user: &nix::unistd::User, shares: &[PathBuf]) -> Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let path = resolve_command(cmd)?;
    let name = &user.name;
    let shared = |p: &Path| shares.iter().any(|s| p.starts_with(s));
    // Judged where root sees it (the directories user cannot search included).
    let real = std::fs::canonicalize(&path);
    let real = match real {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("cannot run `{cmd}`: {} does not exist", path.display())
        }
        Err(e) => bail!("cannot run `{cmd}`: {}: {e}", path.display()),
    };
    for private in ["/tmp", "/var/tmp"] {
        if (path.starts_with(private) || real.starts_with(private)) && !shared(&real) {
            bail!(
                "cannot run `{cmd}`: {} is under {private}, which the workload sees private and empty; \
                 --share the directory that holds it, or use a path outside {private}",
                path.display()
            );
        }
    }
    if user_can(user, "-x", &path) && real.is_file() {
        return Ok(());
    }
    // Which directory on the way stops it: the first that `user` may not search.
    for dir in path.ancestors().skip(1).collect::<Vec<_>>().into_iter().rev() {
        if !user_can(user, "-x", dir) {
            let mode = std::fs::metadata(dir).map(|m| format!("mode {:o}, owner uid {}", m.mode() & 0o7777, m.uid()));
            bail!(
                "cannot run `{cmd}` ({}): it runs as {name}, and {} is not readable to {name} ({}); use an \
                 absolute path outside {}, or --user",
                path.display(),
                dir.display(),
                mode.unwrap_or_default(),
                dir.display()
            );
        }
    }
    if !real.is_file() {
        bail!("cannot run `{cmd}`: {} is not a file", path.display());
    }
    let mode = std::fs::metadata(&real).map(|m| format!("mode {:o}, owner uid {}", m.mode() & 0o7777, m.uid()));
    bail!(
        "cannot run `{cmd}` ({}): it runs as {name}, who may not execute it ({}); make it executable for {name} \
         (chmod a+x), or --user",
        path.display(),
        mode.unwrap_or_default()
    )
}

/// A wait status as a shell reports it: the exit code, or 128 + the signal.
pub(crate) fn status_code(status: std::process::ExitStatus) -> u8 {
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
pub(crate) struct Forwarder([(nix::sys::signal::Signal, tokio::signal::unix::Signal); 3]);

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

/// `l7ctl __sandbox`: see `sandbox`. Exits with `__init`'s status (CMD's). Once the
/// PID namespace is unshared this process may not start threads, so it waits in a
/// current-thread runtime.
pub(crate) fn sandbox(args: SandboxArgs) -> Result<ExitCode> {
    // A workload never outlives the `l7ctl run` that registered it (unregistered, its cgroup
    // would be judged as the host's).
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
    sandbox::enter(&args.cgroup)?;
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
pub(crate) fn init(args: SandboxArgs) -> Result<ExitCode> {
    use nix::sys::wait::{waitpid, WaitStatus};
    // With it goes the whole PID namespace.
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
    sandbox::build_view(&args.hide, &args.share)?;
    let working_dir = sandbox::enter_working_dir();
    sandbox::scope_ipc()?;
    sandbox::deny_user_namespaces()?;
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

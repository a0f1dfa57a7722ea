//! Where a workload runs, so that it cannot leave its cgroup or reach the node, whatever its uid.
//!
//! `l7ctl run` starts `l7ctl __sandbox`, which (still root, before CMD exists):
//! 1. writes its own pid into the workload's `cgroup.procs`;
//! 2. unshares a cgroup namespace (rooted at the workload's cgroup: what the workload sees of
//!    cgroups starts there; the kernel bounds migrations by it only where cgroup2 is mounted
//!    with `nsdelegate`, so the barriers that hold everywhere are the read-only cgroupfs and
//!    seccomp's refusal of `clone3`, whose CLONE_INTO_CGROUP takes a directory fd and checks
//!    only file modes), a mount namespace (private propagation) and a PID namespace;
//! 3. starts `l7ctl __init`, pid 1 of that PID namespace, which builds the workload's view of the
//!    filesystem ([`build_view`]), scopes it with Landlock ([`scope_ipc`]), forbids new user
//!    namespaces ([`deny_user_namespaces`]), then runs `setsid setpriv ... CMD` (a session of its
//!    own, the uid, no capabilities, no_new_privs), forwards signals to it, reaps orphans and
//!    exits with its status.
//!
//! A root workload without capabilities owns every root-owned file by plain permissions, so the
//! view is read-only except private /tmp and /var/tmp (and the directories shared on purpose);
//! the node's own directories (state, sockets, pins, policy files) and the host's /run (its
//! daemons' sockets) are covered by empty read-only mounts; it can signal only the processes of
//! its own PID namespace and reach no abstract Unix socket made outside it; it cannot mount,
//! unmount, ptrace a process with more capabilities, or set SO_MARK (each needs a capability),
//! and it cannot create a user namespace in which it would have them.
#![forbid(unsafe_code)]

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use l7mesh_api::layout;
use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use nix::sys::statvfs::{statvfs, FsFlags};

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("{what}: {source}")]
    Sys {
        what: String,
        #[source]
        source: nix::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("seccomp filter: {0}")]
    Seccomp(String),
    #[error("landlock: {0}")]
    Landlock(String),
    #[error("--cap {cap} is refused: {why}")]
    CapRefused { cap: String, why: &'static str },
    #[error("`{0}` is not a capability name (e.g. net_bind_service)")]
    NotACap(String),
}

fn sys(what: impl Into<String>) -> impl FnOnce(nix::Error) -> SandboxError {
    let what = what.into();
    move |source| SandboxError::Sys { what, source }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SandboxError {
    let what = what.into();
    move |source| SandboxError::Io { what, source }
}

/// Capabilities `--cap` refuses, with what each would let a workload do.
const REFUSED_CAPS: &[(&str, &str)] = &[
    ("sys_admin", "it can unmount the workload's view, mount cgroupfs and /proc again and leave its cgroup"),
    ("net_admin", "it can set SO_MARK (the proxy's mark passes the datapath unjudged) and change the node's network"),
    ("sys_ptrace", "it can trace processes outside its own, such as l7proxy or the broker"),
    ("sys_module", "it can load kernel code"),
    ("sys_rawio", "it can read and write memory and devices directly"),
    ("bpf", "it can load BPF programs and open the datapath's maps"),
    ("perfmon", "with bpf, it can read kernel memory"),
    ("sys_chroot", "with a private root, it can step outside its view"),
    ("mknod", "it can create device nodes (a disk holds the broker's keys)"),
    ("dac_read_search", "open_by_handle_at reaches files its view hides"),
    ("setpcap", "it can change capability sets"),
    ("sys_boot", "it can reboot the node"),
    ("sys_time", "it can set the clock certificates are judged by"),
    ("syslog", "it can read the kernel log and addresses"),
    ("mac_admin", "it can change the LSM policy"),
    ("mac_override", "it can override the LSM policy"),
    ("audit_control", "it can change the audit rules"),
    ("linux_immutable", "it can change immutable files"),
    ("checkpoint_restore", "it can choose pids and checkpoint other processes"),
    ("net_raw", "raw sockets are outside policy (packets the connect and sendmsg hooks never see)"),
    ("all", "every capability, including sys_admin"),
];

/// Checks one `--cap` value: a capability name, and not one that lifts the sandbox.
pub fn check_cap(cap: &str) -> Result<(), SandboxError> {
    let name = cap.to_ascii_lowercase();
    let name = name.strip_prefix("cap_").unwrap_or(&name);
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(SandboxError::NotACap(cap.to_string()));
    }
    match REFUSED_CAPS.iter().find(|(c, _)| *c == name) {
        Some((c, why)) => Err(SandboxError::CapRefused { cap: (*c).to_string(), why }),
        None => Ok(()),
    }
}

/// Step 1 and 2, in the calling process: join the cgroup, then unshare. Must run before the
/// process has threads (a mount namespace cannot be unshared by one of several threads).
pub fn enter(cgroup: &Path) -> Result<(), SandboxError> {
    let procs = cgroup.join("cgroup.procs");
    fs::write(&procs, std::process::id().to_string()).map_err(io(format!("joining {}", procs.display())))?;
    unshare(CloneFlags::CLONE_NEWCGROUP | CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWPID)
        .map_err(sys("unsharing the cgroup, mount and PID namespaces"))?;
    // Nothing mounted here may reach the node's namespace, nor the other way round.
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
        .map_err(sys("making the workload's mounts private"))?;
    Ok(())
}

/// Scratch directories the workload gets a private, empty copy of (a shared one would expose
/// root's files and sockets there, e.g. a root tmux server's, to a root workload).
pub const PRIVATE_SCRATCH: &[&str] = &["/tmp", "/var/tmp"];

/// Every path the node keeps for itself by default, hidden even when not named.
pub const NODE_DEFAULTS: &[&str] = &[layout::DEFAULT_STATE_DIR, layout::DEFAULT_RUN_DIR, "/sys/fs/bpf"];

/// Runtime state of the host's daemons: their Unix sockets (D-Bus, systemd, containerd, ...)
/// accept a root peer, and connect() needs no write access to a read-only mount, so /run is
/// covered whole; only the resolver's files (/etc/resolv.conf may point there) come back,
/// read-only.
const HOST_RUNTIME: &str = "/run";
const RUNTIME_KEPT: &[&str] = &["/run/systemd/resolve"];

/// One line of /proc/self/mountinfo: the mount point and the filesystem type.
#[derive(Debug, PartialEq, Eq)]
pub struct MountEntry {
    pub point: PathBuf,
    pub fstype: String,
}

/// Parses /proc/self/mountinfo (`id parent major:minor root point options [tags] - type ...`);
/// octal escapes (`\040` for a space) are decoded.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    fn unescape(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
                out.push(v);
                i += 4;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let point = fields.get(4)?;
            let sep = fields.iter().position(|f| *f == "-")?;
            let fstype = fields.get(sep + 1)?;
            Some(MountEntry { point: PathBuf::from(unescape(point)), fstype: fstype.to_string() })
        })
        .collect()
}

fn bind_ro(path: &Path, extra: MsFlags) -> Result<(), SandboxError> {
    mount(Some(path), path, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>)
        .map_err(sys(format!("binding {}", path.display())))?;
    remount_ro(path, extra)
}

/// Read-only, keeping the mount's other flags (nosuid, nodev, noexec, atime).
fn remount_ro(path: &Path, extra: MsFlags) -> Result<(), SandboxError> {
    let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | extra;
    if let Ok(st) = statvfs(path) {
        let f = st.flags();
        for (s, m) in [
            (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
            (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
            (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
            (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
            (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
            (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
        ] {
            if f.contains(s) {
                flags |= m;
            }
        }
    }
    mount(None::<&str>, path, None::<&str>, flags, None::<&str>)
        .map_err(sys(format!("remounting {} read-only", path.display())))
}

/// Covers `path` with an empty read-only mount (a tmpfs for a directory, /dev/null for a file).
fn hide(path: &Path) -> Result<(), SandboxError> {
    let Ok(meta) = fs::metadata(path) else { return Ok(()) };
    let ro = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    if meta.is_dir() {
        mount(Some("l7mesh-hidden"), path, Some("tmpfs"), ro, Some("size=4k,mode=0"))
            .map_err(sys(format!("hiding {}", path.display())))
    } else {
        mount(Some("/dev/null"), path, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .map_err(sys(format!("hiding {}", path.display())))?;
        remount_ro(path, ro)
    }
}

/// Fresh tmpfs copies of [`PRIVATE_SCRATCH`], holding the `shared` directories under them. Each
/// is assembled under the workload's /dev (while the host's directories are still visible to
/// bind from), then moved into place.
fn private_scratch(shared: &[PathBuf]) -> Result<(), SandboxError> {
    for (i, scratch) in PRIVATE_SCRATCH.iter().map(Path::new).enumerate() {
        if !scratch.is_dir() {
            continue;
        }
        let stage = PathBuf::from(format!("/dev/.l7mesh-scratch-{i}"));
        fs::create_dir(&stage).map_err(io(format!("creating {}", stage.display())))?;
        mount(Some("l7mesh-scratch"), &stage, Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=1777"))
            .map_err(sys(format!("mounting a private {}", scratch.display())))?;
        for s in shared {
            let Ok(rel) = s.strip_prefix(scratch) else { continue };
            let inside = stage.join(rel);
            fs::create_dir_all(&inside).map_err(io(format!("creating {}", inside.display())))?;
            mount(Some(s.as_path()), &inside, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>)
                .map_err(sys(format!("sharing {}", s.display())))?;
        }
        mount(Some(&stage), scratch, None::<&str>, MsFlags::MS_MOVE, None::<&str>)
            .map_err(sys(format!("moving the private {} into place", scratch.display())))?;
        let _ = fs::remove_dir(&stage);
    }
    Ok(())
}

/// Covers [`HOST_RUNTIME`], bringing back [`RUNTIME_KEPT`] read-only.
fn hide_host_runtime() -> Result<(), SandboxError> {
    let run = Path::new(HOST_RUNTIME);
    if !run.is_dir() {
        return Ok(());
    }
    let kept: Vec<&Path> = RUNTIME_KEPT.iter().map(Path::new).filter(|k| k.is_dir()).collect();
    let stage = Path::new("/dev/.l7mesh-run");
    fs::create_dir(stage).map_err(io("creating the workload's /run"))?;
    mount(Some("l7mesh-run"), stage, Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=755,size=64k"))
        .map_err(sys("mounting the workload's /run"))?;
    for k in &kept {
        let rel = k.strip_prefix(run).unwrap_or(k);
        let inside = stage.join(rel);
        fs::create_dir_all(&inside).map_err(io(format!("creating {}", inside.display())))?;
        mount(Some(*k), &inside, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .map_err(sys(format!("binding {}", k.display())))?;
    }
    mount(Some(stage), run, None::<&str>, MsFlags::MS_MOVE, None::<&str>).map_err(sys("moving /run into place"))?;
    let _ = fs::remove_dir(stage);
    Ok(())
}

/// A /dev of the workload's own: the harmless character devices, a private pty instance and
/// /dev/shm; no disks (a root workload could read the broker's keys off one).
fn private_dev() -> Result<(), SandboxError> {
    let dev = Path::new("/dev");
    mount(Some("l7mesh-dev"), dev, Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, Some("mode=755,size=64k"))
        .map_err(sys("mounting the workload's /dev"))?;
    for (name, major, minor) in
        [("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9), ("tty", 5, 0)]
    {
        let p = dev.join(name);
        mknod(&p, SFlag::S_IFCHR, Mode::from_bits_truncate(0o666), makedev(major, minor))
            .map_err(sys(format!("creating {}", p.display())))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o666)).map_err(io(format!("chmod {}", p.display())))?;
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        std::os::unix::fs::symlink(target, dev.join(link)).map_err(io(format!("linking /dev/{link}")))?;
    }
    for d in ["pts", "shm"] {
        fs::create_dir(dev.join(d)).map_err(io(format!("creating /dev/{d}")))?;
    }
    mount(
        Some("devpts"),
        "/dev/pts",
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )
    .map_err(sys("mounting /dev/pts"))?;
    mount(
        Some("l7mesh-shm"),
        "/dev/shm",
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=1777"),
    )
    .map_err(sys("mounting /dev/shm"))?;
    Ok(())
}

/// Step 3's view, built by pid 1 of the new PID namespace (its /proc must be mounted from
/// inside): a /proc of its own with the kernel's knobs read-only, a private /dev, the node's
/// directories (`hidden`, plus [`NODE_DEFAULTS`] and every bpffs mount) covered, and every
/// other mount, cgroupfs included, read-only; private [`PRIVATE_SCRATCH`] directories, into which
/// (or anywhere) `shared` host directories are bound writable.
pub fn build_view(hidden: &[PathBuf], shared: &[PathBuf]) -> Result<(), SandboxError> {
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(Some("proc"), "/proc", Some("proc"), nosuid_nodev_noexec, None::<&str>)
        .map_err(sys("mounting the workload's /proc"))?;
    // uid 0 may write sysctls by file mode alone (kernel.core_pattern would run a command
    // as the node's root).
    for p in ["/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus", "/proc/fs"] {
        if Path::new(p).exists() {
            bind_ro(Path::new(p), nosuid_nodev_noexec)?;
        }
    }
    private_dev()?;
    private_scratch(shared)?;
    for s in shared.iter().filter(|s| !PRIVATE_SCRATCH.iter().any(|t| s.starts_with(t))) {
        // Elsewhere, a shared directory is made a mount of its own so that it stays writable.
        mount(Some(s.as_path()), s.as_path(), None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>)
            .map_err(sys(format!("sharing {}", s.display())))?;
    }
    hide_host_runtime()?;
    let mountinfo =
        || fs::read_to_string("/proc/self/mountinfo").map(|t| parse_mountinfo(&t)).map_err(io("reading mountinfo"));
    let mut to_hide: Vec<PathBuf> = hidden.to_vec();
    to_hide.extend(NODE_DEFAULTS.iter().map(PathBuf::from));
    to_hide.extend(mountinfo()?.into_iter().filter(|m| m.fstype == "bpf").map(|m| m.point));
    to_hide.sort();
    to_hide.dedup();
    for p in &to_hide {
        hide(p)?;
    }
    let keep: Vec<&Path> = PRIVATE_SCRATCH
        .iter()
        .chain(&["/proc", "/dev/pts", "/dev/shm"])
        .map(Path::new)
        .chain(shared.iter().map(PathBuf::as_path))
        .collect();
    let mut points: Vec<PathBuf> = mountinfo()?.into_iter().map(|m| m.point).collect();
    points.sort();
    points.dedup();
    for p in points {
        if keep.contains(&p.as_path()) || to_hide.contains(&p) {
            continue;
        }
        match remount_ro(&p, MsFlags::empty()) {
            // A mount point under a hidden directory no longer resolves: nothing to do.
            Err(SandboxError::Sys { source: nix::Error::ENOENT, .. }) => {}
            other => other?,
        }
    }
    Ok(())
}

/// Moves the process into its working directory as the new view shows it, or to `/` when the
/// view hides it; returns where it is. The old working directory would otherwise keep pointing
/// below the mounts that now cover it, and `..` from there would walk the host's tree (a
/// workload started from a directory under /tmp or the node's state dir would see them).
pub fn enter_working_dir() -> PathBuf {
    let wanted = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    match std::env::set_current_dir(&wanted) {
        Ok(()) => wanted,
        Err(_) => {
            // `/` always exists; if even it cannot be entered, exec fails clearly later.
            let _ = std::env::set_current_dir("/");
            PathBuf::from("/")
        }
    }
}

/// The x32 ABI numbers (bit 30 set) of the calls the filter refuses.
#[cfg(target_arch = "x86_64")]
const X32_ALIASES: &[i64] = &[
    0x4000_0000 | libc::SYS_unshare,
    0x4000_0000 | libc::SYS_clone,
    0x4000_0000 | libc::SYS_clone3,
    0x4000_0000 | libc::SYS_keyctl,
    0x4000_0000 | libc::SYS_add_key,
    0x4000_0000 | libc::SYS_request_key,
];
#[cfg(not(target_arch = "x86_64"))]
const X32_ALIASES: &[i64] = &[];

/// Refuses new user namespaces and the kernel keyrings to the calling process and everything it
/// starts (seccomp):
/// inside one, a root workload would hold every capability again over namespaces it makes
/// (mount a cgroup2 of its own subtree, make sub-cgroups the datapath does not know). `clone3`
/// answers ENOSYS (its flags are behind a pointer a filter cannot read), so libc falls back
/// to `clone`, whose flags are judged.
pub fn deny_user_namespaces() -> Result<(), SandboxError> {
    use seccompiler::{
        apply_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
        SeccompRule, TargetArch,
    };
    let arch: TargetArch = std::env::consts::ARCH.try_into().map_err(|e| SandboxError::Seccomp(format!("{e:?}")))?;
    let newuser = libc::CLONE_NEWUSER as u64;
    let flag_rule = || -> Result<Vec<SeccompRule>, SandboxError> {
        let cond = SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(newuser), newuser)
            .map_err(|e| SandboxError::Seccomp(e.to_string()))?;
        Ok(vec![SeccompRule::new(vec![cond]).map_err(|e| SandboxError::Seccomp(e.to_string()))?])
    };
    let deny = SeccompFilter::new(
        [
            (libc::SYS_unshare, flag_rule()?),
            (libc::SYS_clone, flag_rule()?),
            // The kernel's keyrings are per uid, not per namespace: root's user keyring is the
            // node's root's.
            (libc::SYS_keyctl, vec![]),
            (libc::SYS_add_key, vec![]),
            (libc::SYS_request_key, vec![]),
        ]
        .into_iter()
        // The x32 ABI numbers of the same calls (bit 30 set; the filter's architecture check
        // cannot tell x32 from x86-64): refused outright, for kernels built with x32.
        .chain(X32_ALIASES.iter().map(|nr| (*nr, vec![])))
        .collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|e| SandboxError::Seccomp(e.to_string()))?;
    let clone3 = SeccompFilter::new(
        [(libc::SYS_clone3, vec![])].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(|e| SandboxError::Seccomp(e.to_string()))?;
    for filter in [deny, clone3] {
        let program: BpfProgram =
            filter.try_into().map_err(|e: seccompiler::BackendError| SandboxError::Seccomp(e.to_string()))?;
        apply_filter(&program).map_err(|e| SandboxError::Seccomp(e.to_string()))?;
    }
    Ok(())
}

/// Scopes the calling process and everything it starts with Landlock (Linux 6.12+): no connect
/// to an abstract Unix socket made outside the workload (abstract sockets live in the network
/// namespace, which the workload shares with the node's daemons, and have no file to hide) and
/// no signal to a process outside it. On an older kernel this is skipped with a warning (the
/// PID namespace still keeps signals in).
pub fn scope_ipc() -> Result<(), SandboxError> {
    use landlock::{CompatLevel, Compatible, RulesetAttr, RulesetStatus, Scope};
    let status = landlock::Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .scope(Scope::AbstractUnixSocket | Scope::Signal)
        .and_then(|r| r.create())
        .and_then(|r| r.restrict_self())
        .map_err(|e| SandboxError::Landlock(e.to_string()))?;
    if status.ruleset != RulesetStatus::FullyEnforced {
        tracing::warn!(
            status = ?status.ruleset,
            "Landlock scopes (Linux 6.12+) are not enforced here: abstract Unix sockets of the node stay reachable"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_points_and_types() {
        let text = "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n\
                    42 23 0:39 / /sys/fs/bpf rw,relatime shared:5 - bpf bpf rw\n\
                    50 27 0:40 / /tmp/a\\040b rw - tmpfs tmpfs rw\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0], MountEntry { point: "/sys/fs/cgroup/unified".into(), fstype: "cgroup2".into() });
        assert_eq!(m[1].fstype, "bpf");
        assert_eq!(m[2].point, PathBuf::from("/tmp/a b"));
    }

    #[test]
    fn caps_that_lift_the_sandbox_are_refused() {
        for cap in ["sys_admin", "CAP_SYS_ADMIN", "net_admin", "sys_ptrace", "bpf", "mknod", "all"] {
            assert!(matches!(check_cap(cap), Err(SandboxError::CapRefused { .. })), "{cap}");
        }
        for cap in ["net_bind_service", "NET_BIND_SERVICE", "chown", "kill"] {
            assert!(check_cap(cap).is_ok(), "{cap}");
        }
        assert!(matches!(check_cap("net-bind"), Err(SandboxError::NotACap(_))));
        assert!(matches!(check_cap(""), Err(SandboxError::NotACap(_))));
    }
}

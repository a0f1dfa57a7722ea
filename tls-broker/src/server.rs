//! The broker's two sockets and who may use them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{info, warn};

use crate::{Ca, Reply, Request};

/// Who the proxy is: the only caller the proxy socket serves. All three are needed: a workload
/// may run as uid 0 and may execute the l7proxy binary, but it cannot enter the proxy's cgroup
/// (its cgroup namespace is rooted at its own, and cgroupfs is read-only to it), and no process
/// but the one `l7ctl up` starts runs there.
#[derive(Clone, Debug)]
pub struct ProxyIdentity {
    pub uid: u32,
    /// The proxy's cgroup (v2 path relative to the cgroup2 mount, e.g. `/l7mesh/proxy`); the
    /// caller's process must be in it.
    pub cgroup: String,
    /// The l7proxy executable (canonical path); the caller's /proc/<pid>/exe must be it.
    pub exe: PathBuf,
}

/// What the broker learnt about a proxy-socket caller.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerFacts {
    pub uid: u32,
    pub pid: Option<i32>,
    /// `/proc/<pid>/cgroup`'s v2 line.
    pub cgroup: Option<String>,
    /// `/proc/<pid>/exe` (ends with ` (deleted)` when the file was replaced).
    pub exe: Option<PathBuf>,
    /// The process's start time (clock ticks since boot), read before and after the others: a
    /// pid that died and was reused between the reads shows two values.
    pub started: Option<(u64, u64)>,
    /// Clock ticks since boot when the connection was accepted: the caller connected before, so
    /// a process that started later is another one that reuses its pid.
    pub accepted: u64,
}

/// Why a proxy-socket caller is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("cannot read peer credentials: {0}")]
    NoCredentials(String),
    #[error("uid {uid} is not the proxy's ({want})")]
    Uid { uid: u32, want: u32 },
    #[error("no peer pid")]
    NoPid,
    #[error("cannot read the cgroup of process {0}")]
    UnknownCgroup(i32),
    #[error("process {pid} is in cgroup {cgroup}, not the proxy's ({want})")]
    Cgroup { pid: i32, cgroup: String, want: String },
    #[error("cannot read the executable of process {0}")]
    UnknownExe(i32),
    #[error("process {pid} runs {exe}, not the proxy's executable ({want})")]
    Exe { pid: i32, exe: String, want: String },
    #[error("process {0} is not the process that connected (its pid was reused)")]
    PidReused(i32),
}

/// The proxy-identity decision, on facts already read (unit-tested without processes).
pub fn judge(facts: &PeerFacts, proxy: &ProxyIdentity) -> Result<(), Refusal> {
    if facts.uid != proxy.uid {
        return Err(Refusal::Uid { uid: facts.uid, want: proxy.uid });
    }
    let pid = facts.pid.ok_or(Refusal::NoPid)?;
    match &facts.started {
        Some((before, after)) if before == after && *before <= facts.accepted => {}
        _ => return Err(Refusal::PidReused(pid)),
    }
    match &facts.cgroup {
        None => return Err(Refusal::UnknownCgroup(pid)),
        Some(cg) if *cg != proxy.cgroup => {
            return Err(Refusal::Cgroup { pid, cgroup: cg.clone(), want: proxy.cgroup.clone() })
        }
        Some(_) => {}
    }
    match &facts.exe {
        None => Err(Refusal::UnknownExe(pid)),
        Some(exe) if *exe != proxy.exe => {
            Err(Refusal::Exe { pid, exe: exe.display().to_string(), want: proxy.exe.display().to_string() })
        }
        Some(_) => Ok(()),
    }
}

/// Which socket a connection came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Admin,
    Proxy,
}

/// The caller's cgroup v2 path, from /proc/<pid>/cgroup (`0::/path`).
pub fn cgroup_of(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_string))
}

/// A process's start time in clock ticks since boot (/proc/<pid>/stat, field 22).
pub fn start_time_of(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count after the last ')'.
    stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()
}

/// Clock ticks since boot, now (the unit of [`start_time_of`]).
pub fn boot_ticks_now() -> u64 {
    let up = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
    let secs: f64 = up.split_whitespace().next().and_then(|s| s.parse().ok()).unwrap_or(0.0);
    // Linux reports /proc/<pid>/stat times in USER_HZ, which is 100 on every architecture.
    (secs * 100.0) as u64 + 1
}

/// Checks the peer of a proxy-socket connection accepted at `accepted` ([`boot_ticks_now`]).
pub fn check_proxy_peer(stream: &UnixStream, proxy: &ProxyIdentity, accepted: u64) -> Result<(), Refusal> {
    let cred = stream.peer_cred().map_err(|e| Refusal::NoCredentials(e.to_string()))?;
    let mut facts = PeerFacts { uid: cred.uid(), pid: cred.pid(), accepted, ..PeerFacts::default() };
    if let Some(pid) = facts.pid {
        let before = start_time_of(pid);
        facts.cgroup = cgroup_of(pid);
        facts.exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
        let after = start_time_of(pid);
        facts.started = before.zip(after);
    }
    judge(&facts, proxy)
}

pub fn handle(ca: &Ca, role: Role, request: Request) -> Reply {
    match (role, request) {
        (Role::Admin, Request::Ca) | (Role::Proxy, Request::Ca) => {
            Reply { ok: true, ca: Some(ca.cert_pem().to_string()), ..Reply::default() }
        }
        (Role::Admin, Request::Import { namespace, name, cert, key, ca: trust }) => {
            match ca.import(&namespace, &name, cert.as_deref(), key.as_deref(), trust.as_deref()) {
                Ok(()) => {
                    info!(%namespace, %name, "secret imported");
                    Reply { ok: true, ..Reply::default() }
                }
                Err(e) => Reply::error(e.to_string()),
            }
        }
        (Role::Proxy, Request::IssueServer { names }) => match ca.issue_server(&names) {
            Ok(i) => {
                // One line per mint: how often the proxy asks is visible (and countable).
                info!(?names, "minted a server certificate");
                Reply { ok: true, cert: Some(i.cert_pem), key: Some(i.key_pem), ca: Some(i.ca_pem), error: None }
            }
            Err(e) => Reply::error(e.to_string()),
        },
        (Role::Proxy, Request::IssueClient { identity }) => match ca.issue_client(&identity) {
            Ok(i) => Reply { ok: true, cert: Some(i.cert_pem), key: Some(i.key_pem), ca: Some(i.ca_pem), error: None },
            Err(e) => Reply::error(e.to_string()),
        },
        (Role::Proxy, Request::Secret { namespace, name }) => match ca.secret(&namespace, &name) {
            Ok(secret) => Reply { ok: true, cert: secret.cert, key: secret.key, ca: secret.ca, error: None },
            Err(e) => Reply::error(e.to_string()),
        },
        (Role::Admin, Request::InstallNodeIssuer { bundle }) => match ca.install_node_issuer(&bundle) {
            Ok(i) => {
                info!(node = %i.node, trust_domain = %i.trust_domain, not_after = i.not_after, "node intermediate installed");
                Reply { ok: true, cert: Some(i.cert_pem.clone()), ca: Some(i.root_pem.clone()), ..Reply::default() }
            }
            Err(e) => Reply::error(e.to_string()),
        },
        (Role::Admin | Role::Proxy, Request::ClusterTrust) => match ca.node_issuer() {
            Some(i) => {
                Reply { ok: true, cert: Some(i.cert_pem.clone()), ca: Some(i.root_pem.clone()), ..Reply::default() }
            }
            None => Reply::error(crate::CaError::NoNodeIssuer.to_string()),
        },
        (Role::Proxy, Request::IssueWorkload { namespace, name }) => match ca.issue_workload(&namespace, &name) {
            Ok(w) => {
                info!(id = %w.spiffe_id, "minted a workload certificate");
                Reply { ok: true, cert: Some(w.chain_pem), key: Some(w.key_pem), ca: Some(w.root_pem), error: None }
            }
            Err(e) => Reply::error(e.to_string()),
        },
        (Role::Admin, other) => {
            Reply::error(format!("`{}` is not served on the admin socket (it never returns keys)", other.op()))
        }
        (Role::Proxy, other) => Reply::error(format!("`{}` is not served on the proxy socket", other.op())),
    }
}

/// Binds a socket with `mode`, replacing a stale file.
pub fn bind(path: &Path, mode: u32) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt as _;
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

pub async fn serve(listener: UnixListener, role: Role, ca: Arc<Ca>, proxy: Option<ProxyIdentity>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let accepted = boot_ticks_now();
        let ca = ca.clone();
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let refusal = match (role, &proxy) {
                (Role::Proxy, Some(p)) => check_proxy_peer(write.as_ref(), p, accepted).err().map(|r| r.to_string()),
                (Role::Admin, _) => write
                    .as_ref()
                    .peer_cred()
                    .ok()
                    .filter(|c| c.uid() != 0)
                    .map(|c| format!("uid {} is not root", c.uid())),
                (Role::Proxy, None) => Some("no proxy identity configured".into()),
            };
            if let Some(why) = refusal {
                warn!(?role, %why, "refused a broker client");
                let mut line = serde_json::to_string(&Reply::error(format!("refused: {why}"))).unwrap_or_default();
                line.push('\n');
                let _ = write.write_all(line.as_bytes()).await;
                return;
            }
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let reply = match serde_json::from_str::<Request>(&line) {
                    // Minting generates a key and signs: CPU work kept off the runtime's
                    // thread, so a slow mint never delays the broker's other clients.
                    Ok(req) => {
                        let ca = ca.clone();
                        tokio::task::spawn_blocking(move || handle(&ca, role, req))
                            .await
                            .unwrap_or_else(|e| Reply::error(format!("internal error: {e}")))
                    }
                    Err(e) => Reply::error(format!("bad request: {e}")),
                };
                let mut out = serde_json::to_string(&reply).unwrap_or_default();
                out.push('\n');
                if write.write_all(out.as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy() -> ProxyIdentity {
        ProxyIdentity { uid: 0, cgroup: "/l7mesh/proxy".into(), exe: "/usr/local/bin/l7proxy".into() }
    }

    fn the_proxy() -> PeerFacts {
        PeerFacts {
            uid: 0,
            pid: Some(42),
            cgroup: Some("/l7mesh/proxy".into()),
            exe: Some("/usr/local/bin/l7proxy".into()),
            started: Some((1000, 1000)),
            accepted: 2000,
        }
    }

    #[test]
    fn the_proxy_is_served() {
        assert_eq!(judge(&the_proxy(), &proxy()), Ok(()));
    }

    #[test]
    fn a_root_workload_is_refused_however_it_looks() {
        // uid 0 but in its workload's cgroup (all a root workload can be).
        let f = PeerFacts { cgroup: Some("/l7mesh/workloads/w".into()), ..the_proxy() };
        assert!(matches!(judge(&f, &proxy()), Err(Refusal::Cgroup { .. })));
        // Running the l7proxy binary changes nothing.
        let f = PeerFacts { cgroup: Some("/".into()), ..the_proxy() };
        assert!(matches!(judge(&f, &proxy()), Err(Refusal::Cgroup { .. })));
        // In the proxy's cgroup, another program (or a replaced binary) is refused.
        let f = PeerFacts { exe: Some("/usr/bin/python3.11".into()), ..the_proxy() };
        assert!(matches!(judge(&f, &proxy()), Err(Refusal::Exe { .. })));
        let f = PeerFacts { exe: Some("/usr/local/bin/l7proxy (deleted)".into()), ..the_proxy() };
        assert!(matches!(judge(&f, &proxy()), Err(Refusal::Exe { .. })));
        let f = PeerFacts { uid: 65534, ..the_proxy() };
        assert_eq!(judge(&f, &proxy()), Err(Refusal::Uid { uid: 65534, want: 0 }));
    }

    #[test]
    fn unreadable_or_reused_pids_are_refused() {
        let f = PeerFacts { pid: None, ..the_proxy() };
        assert_eq!(judge(&f, &proxy()), Err(Refusal::NoPid));
        let f = PeerFacts { cgroup: None, ..the_proxy() };
        assert_eq!(judge(&f, &proxy()), Err(Refusal::UnknownCgroup(42)));
        let f = PeerFacts { exe: None, ..the_proxy() };
        assert_eq!(judge(&f, &proxy()), Err(Refusal::UnknownExe(42)));
        // The pid died and was reused between the reads, or after the connection came in.
        let f = PeerFacts { started: Some((1000, 1500)), ..the_proxy() };
        assert_eq!(judge(&f, &proxy()), Err(Refusal::PidReused(42)));
        let f = PeerFacts { started: Some((2500, 2500)), ..the_proxy() };
        assert_eq!(judge(&f, &proxy()), Err(Refusal::PidReused(42)));
        let f = PeerFacts { started: None, ..the_proxy() };
        assert_eq!(judge(&f, &proxy()), Err(Refusal::PidReused(42)));
    }

    #[test]
    fn the_node_intermediate_is_installed_by_root_and_issues_for_the_proxy_only() {
        let base = std::env::temp_dir().join(format!("l7mesh-broker-trust-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let root_dir = base.join("root");
        crate::trust::init_root(&root_dir, "cluster.local", std::time::Duration::from_secs(86400)).unwrap();
        let bundle = crate::trust::issue_node(&root_dir, "node-a", std::time::Duration::from_secs(86400)).unwrap();
        let ca = Ca::open(&base.join("broker")).unwrap();
        // Nothing installed: the proxy is told what to do.
        let r = handle(&ca, Role::Proxy, Request::IssueWorkload { namespace: "default".into(), name: "w".into() });
        assert!(r.error.as_deref().is_some_and(|e| e.contains("l7ctl ca install-node")), "{r:?}");
        // The proxy cannot install one, and the refusal does not echo the bundle's key.
        let r = handle(&ca, Role::Proxy, Request::InstallNodeIssuer { bundle: bundle.clone() });
        assert!(!r.ok && !r.error.as_deref().unwrap_or("").contains("PRIVATE KEY"), "{r:?}");
        let r = handle(&ca, Role::Admin, Request::InstallNodeIssuer { bundle: bundle.clone() });
        assert!(r.ok && r.key.is_none(), "{r:?}");
        let r = handle(&ca, Role::Proxy, Request::IssueWorkload { namespace: "default".into(), name: "w".into() });
        assert!(r.ok && r.cert.as_deref().is_some_and(|c| c.matches("BEGIN CERTIFICATE").count() == 2), "{r:?}");
        // Root's admin never gets a workload's key.
        let r = handle(&ca, Role::Admin, Request::IssueWorkload { namespace: "default".into(), name: "w".into() });
        assert!(!r.ok && r.key.is_none());
        // The broker keeps the intermediate only: no root key in its state.
        let kept = std::fs::read_to_string(base.join("broker/cluster/node.pem")).unwrap();
        assert_eq!(kept.matches("PRIVATE KEY-----").count(), 2, "one key (BEGIN and END lines)");
        let root_key = std::fs::read_to_string(root_dir.join("root.key")).unwrap();
        assert!(!kept.contains(root_key.lines().nth(1).unwrap()));
        // Kept across restarts; another node's bundle, or another root's, is refused.
        let again = Ca::open(&base.join("broker")).unwrap();
        assert_eq!(again.node_issuer().unwrap().node, "node-a");
        let other_node = crate::trust::issue_node(&root_dir, "node-b", std::time::Duration::from_secs(86400)).unwrap();
        let r = handle(&again, Role::Admin, Request::InstallNodeIssuer { bundle: other_node });
        assert!(r.error.as_deref().is_some_and(|e| e.contains("a bundle for node node-b is refused")), "{r:?}");
        let other_root = base.join("root2");
        crate::trust::init_root(&other_root, "cluster.local", std::time::Duration::from_secs(86400)).unwrap();
        let foreign = crate::trust::issue_node(&other_root, "node-a", std::time::Duration::from_secs(86400)).unwrap();
        let r = handle(&again, Role::Admin, Request::InstallNodeIssuer { bundle: foreign });
        assert!(r.error.as_deref().is_some_and(|e| e.contains("another cluster root")), "{r:?}");
        // A rotation (a new intermediate for the same node and root) is taken.
        let rotated = crate::trust::issue_node(&root_dir, "node-a", std::time::Duration::from_secs(86400)).unwrap();
        let r = handle(&again, Role::Admin, Request::InstallNodeIssuer { bundle: rotated });
        assert!(r.ok, "{r:?}");
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn start_time_is_read_past_a_command_with_parentheses() {
        let me = std::process::id() as i32;
        let t = start_time_of(me).expect("own start time");
        assert!(t <= boot_ticks_now());
    }
}

//! The broker's two sockets and who may use them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{info, warn};

use crate::{Ca, Reply, Request};

/// Who the proxy is: the only caller the proxy socket serves.
#[derive(Clone, Debug)]
pub struct ProxyIdentity {
    pub uid: u32,
    /// The proxy's cgroup (v2 path relative to the cgroup2 mount, e.g. `/l7mesh/proxy`); the
    /// caller's process must be in it.
    pub cgroup: String,
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

/// Checks the peer of a proxy-socket connection; `Err` says why it is refused.
pub fn check_proxy_peer(stream: &UnixStream, proxy: &ProxyIdentity) -> Result<(), String> {
    let cred = stream.peer_cred().map_err(|e| format!("cannot read peer credentials: {e}"))?;
    if cred.uid() != proxy.uid {
        return Err(format!("uid {} is not the proxy's ({})", cred.uid(), proxy.uid));
    }
    let pid = cred.pid().ok_or("no peer pid")?;
    match cgroup_of(pid) {
        Some(cg) if cg == proxy.cgroup => Ok(()),
        Some(cg) => Err(format!("process {pid} is in cgroup {cg}, not the proxy's ({})", proxy.cgroup)),
        None => Err(format!("cannot read the cgroup of process {pid}")),
    }
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
            Ok(i) => Reply { ok: true, cert: Some(i.cert_pem), key: Some(i.key_pem), ca: Some(i.ca_pem), error: None },
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
        (Role::Admin, other) => {
            Reply::error(format!("{other:?} is not served on the admin socket (it never returns keys)"))
        }
        (Role::Proxy, other) => Reply::error(format!("{other:?} is not served on the proxy socket")),
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
        let ca = ca.clone();
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let refusal = match (role, &proxy) {
                (Role::Proxy, Some(p)) => check_proxy_peer(write.as_ref(), p).err(),
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
                    Ok(req) => handle(&ca, role, req),
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

/// Default paths (DESIGN.md).
pub fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/l7mesh/broker")
}

//! Where a node's processes find each other: its directories, the files and sockets in them,
//! and the ports that are fixed. Every binary builds its paths from here, so `l7ctl up`, the
//! processes it starts and `l7ctl run`'s sandbox cannot disagree (the defaults are README's
//! "Running a node by hand"; each flag and variable that overrides one stays the binary's).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

/// State: the store, the broker's keys, the proxy's tables.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/l7mesh";
/// The node's sockets, its pid files and the API token.
pub const DEFAULT_RUN_DIR: &str = "/run/l7mesh";
pub const DEFAULT_CGROUP_ROOT: &str = "/sys/fs/cgroup/unified/l7mesh";
/// The datapath's pinned programs and maps.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/l7mesh";
/// The broker's state: `<state dir>/broker` (a literal for clap's defaults; a test holds it to
/// [`NodePaths::broker_state_dir`]).
pub const DEFAULT_BROKER_STATE_DIR: &str = "/var/lib/l7mesh/broker";
/// The broker's proxy socket in the default run dir (as [`DEFAULT_BROKER_STATE_DIR`]).
pub const DEFAULT_BROKER_PROXY_SOCKET: &str = "/run/l7mesh/broker-proxy.sock";

/// File names in the run dir.
pub const CONTROL_SOCKET: &str = "node.sock";
pub const POLICY_STREAM_SOCKET: &str = "policy-proxy.sock";
pub const BROKER_ADMIN_SOCKET: &str = "broker-admin.sock";
pub const BROKER_PROXY_SOCKET: &str = "broker-proxy.sock";
pub const API_TOKEN_FILE: &str = "api-token";
/// l7proxy's Hubble Observer API (root's only).
pub const HUBBLE_SOCKET: &str = "hubble.sock";

/// policy-api's REST API, by default (`--listen`, `--api`, `L7MESH_API`).
pub const DEFAULT_API: &str = "127.0.0.1:9090";
/// l7proxy's admin API: `l7ctl up` starts l7proxy without `--admin`, so the node's is here.
pub const DEFAULT_PROXY_ADMIN: &str = "127.0.0.1:15000";
pub const PROXY_ADMIN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15000);
/// The port of the tunnel between nodes (mutual TLS, HTTP/2 CONNECT: Istio ambient's HBONE
/// port), on every address of a node whose broker holds its intermediate.
pub const TUNNEL_PORT: u16 = 15008;

/// Where a node keeps its state (by default the paths in the README's "Running a node by hand").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodePaths {
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub cgroup_root: PathBuf,
    pub pin_dir: PathBuf,
}

impl Default for NodePaths {
    fn default() -> Self {
        NodePaths::new(
            DEFAULT_STATE_DIR.into(),
            DEFAULT_RUN_DIR.into(),
            DEFAULT_CGROUP_ROOT.into(),
            DEFAULT_PIN_DIR.into(),
        )
    }
}

impl NodePaths {
    pub fn new(state_dir: PathBuf, run_dir: PathBuf, cgroup_root: PathBuf, pin_dir: PathBuf) -> Self {
        NodePaths { state_dir, run_dir, cgroup_root, pin_dir }
    }
    /// The control socket `l7ctl run` registers workloads on.
    pub fn socket(&self) -> PathBuf {
        control_socket(&self.run_dir)
    }
    pub fn workloads(&self) -> PathBuf {
        workloads_cgroup(&self.cgroup_root)
    }
    /// The cgroup l7proxy moves itself into.
    pub fn proxy_cgroup(&self) -> PathBuf {
        proxy_cgroup(&self.cgroup_root)
    }
    pub fn store(&self) -> PathBuf {
        self.state_dir.join("l7mesh.redb")
    }
    /// The REST API's bearer token (0600, root's): the API changes enforcement, so only root
    /// may call it; workloads on the node cannot.
    pub fn api_token(&self) -> PathBuf {
        api_token(&self.run_dir)
    }

    /// policy-api's stream of compiled versions to l7proxy.
    pub fn proxy_socket(&self) -> PathBuf {
        self.run_dir.join(POLICY_STREAM_SOCKET)
    }

    /// l7proxy's flow history (`l7ctl up --flow-history-dir`'s default).
    pub fn flow_history_dir(&self) -> PathBuf {
        self.state_dir.join("flows")
    }
    /// Hubble's Observer API, served by l7proxy (`hubble observe --server unix://PATH`).
    pub fn hubble_socket(&self) -> PathBuf {
        self.run_dir.join(HUBBLE_SOCKET)
    }

    pub fn broker_state_dir(&self) -> PathBuf {
        self.state_dir.join("broker")
    }
    pub fn broker_admin_socket(&self) -> PathBuf {
        broker_admin_socket(&self.run_dir)
    }
    pub fn broker_proxy_socket(&self) -> PathBuf {
        broker_proxy_socket(&self.run_dir)
    }
    /// `<run dir>/<name>.pid`: a node process's pid, for `l7ctl down`.
    pub fn pid_file(&self, name: &str) -> PathBuf {
        pid_file(&self.run_dir, name)
    }
}

/// For the processes that take one directory, not the whole layout (l7proxy the cgroup root;
/// `l7ctl run`, `ca`, `secret` and the broker the run dir).
pub fn workloads_cgroup(cgroup_root: &Path) -> PathBuf {
    cgroup_root.join("workloads")
}
/// The cgroup l7proxy moves itself into.
pub fn proxy_cgroup(cgroup_root: &Path) -> PathBuf {
    cgroup_root.join("proxy")
}
pub fn control_socket(run_dir: &Path) -> PathBuf {
    run_dir.join(CONTROL_SOCKET)
}
pub fn api_token(run_dir: &Path) -> PathBuf {
    run_dir.join(API_TOKEN_FILE)
}
pub fn broker_admin_socket(run_dir: &Path) -> PathBuf {
    run_dir.join(BROKER_ADMIN_SOCKET)
}
pub fn broker_proxy_socket(run_dir: &Path) -> PathBuf {
    run_dir.join(BROKER_PROXY_SOCKET)
}
pub fn pid_file(run_dir: &Path, name: &str) -> PathBuf {
    run_dir.join(format!("{name}.pid"))
}

/// Where cgroup v2 is mounted (`ss --cgroup` prints paths relative to it, and the broker names
/// the proxy's cgroup so).
pub fn cgroup2_mount() -> PathBuf {
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|c| c.get(2) == Some(&"cgroup2"))
        .and_then(|c| c.get(1).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_literal_defaults_are_the_defaults_joined() {
        let paths = NodePaths::default();
        assert_eq!(paths.broker_state_dir(), Path::new(DEFAULT_BROKER_STATE_DIR));
        assert_eq!(paths.broker_proxy_socket(), Path::new(DEFAULT_BROKER_PROXY_SOCKET));
        assert_eq!(DEFAULT_PROXY_ADMIN.parse::<SocketAddr>().unwrap(), PROXY_ADMIN);
        assert!(DEFAULT_API.parse::<SocketAddr>().is_ok());
    }

    #[test]
    fn files_in_the_run_dir() {
        let paths = NodePaths::default();
        assert_eq!(paths.socket(), Path::new("/run/l7mesh/node.sock"));
        assert_eq!(paths.proxy_socket(), Path::new("/run/l7mesh/policy-proxy.sock"));
        assert_eq!(paths.api_token(), Path::new("/run/l7mesh/api-token"));
        assert_eq!(paths.broker_admin_socket(), Path::new("/run/l7mesh/broker-admin.sock"));
        assert_eq!(paths.pid_file("l7proxy"), Path::new("/run/l7mesh/l7proxy.pid"));
        assert_eq!(paths.store(), Path::new("/var/lib/l7mesh/l7mesh.redb"));
        assert_eq!(paths.workloads(), Path::new("/sys/fs/cgroup/unified/l7mesh/workloads"));
    }
}

//! The l7mesh redirector: loads the kernel programs, attaches them to a node's cgroups and
//! network namespace, pins everything under one directory so the datapath outlives the loading
//! process, and gives typed access to the maps.
//!
//! ```text
//! <pin dir>/maps/L7_*          every map (reused on the next install: state survives restarts)
//! <pin dir>/links/l7_*         one pinned link per attachment
//! ```
//! [`Redirector::install`] loads and attaches; [`Maps::open`] opens the pinned maps from any
//! process (the proxy, the CLI, tests); [`uninstall`] removes all of it.

mod addr;
mod events;
mod seed;
mod sys;

use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, RingBuf, SockMap};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{
    CgroupAttachMode, CgroupSock, CgroupSockAddr, CgroupSockopt, ProgramError, SkLookup, SkMsg, SockOps,
};
use aya::{Ebpf, EbpfLoader};
use redirector_common::{
    map_names, program_names as prog, ConnectDecision, Counter, EndpointInfo, EndpointKey, IpcacheKey, IpcacheValue,
    ListenerKey, ListenerValue, PeerKey, PolicyKey, PolicyValue, CONFIG_FAIL_OPEN, CONFIG_NO_SHORT_CIRCUIT,
    DECISION_AUDIT, DECISION_INGRESS_CHECKED, DECISION_REDIRECTED, ENDPOINT_EGRESS_AUDIT, ENDPOINT_EGRESS_ENFORCED,
    ENDPOINT_INGRESS_AUDIT, ENDPOINT_INGRESS_ENFORCED, IPCACHE_KEY_FIXED_BITS, POLICY_KEY_FIXED_BITS,
};
use thiserror::Error;
use tracing::{debug, info};

pub use addr::{from_words, to_words};
pub use events::{AsyncEvents, VerdictEvent};
pub use redirector_common::{identity, Config as RawConfig};
/// The kernel's policy model has its own crate (no aya), so the compiler shares it.
pub use redirector_policy as policy;
pub use redirector_policy::{
    Action, Direction, EndpointEntry, PolicyRule, PolicySnapshot, Protocol, ProtocolHint, Verdict,
};
pub use seed::SeedReport;
pub use sys::{current_netns_cookie, netns_cookie_of, socket_netns_cookie};

/// The kernel object, built from `redirector-ebpf` by `make bpf` and committed, so hosts without
/// the BPF toolchain still build and test everything.
static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!("../bpf/redirector.bpf.o");

#[derive(Debug, Error)]
pub enum Error {
    #[error(
        "loading the eBPF object failed: {0}{hint}",
        hint = if is_permission(.0) { " (BPF needs root, or CAP_BPF + CAP_NET_ADMIN + CAP_SYS_ADMIN)" } else { "" }
    )]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program { name: &'static str, source: ProgramError },
    #[error("link of {name}: {source}")]
    Link { name: &'static str, source: aya::programs::links::LinkError },
    #[error("program {0} is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: MapError },
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: io::Error },
    #[error("pinning {path}: {source}")]
    Pin { path: PathBuf, source: aya::pin::PinError },
    #[error("{0} is not on a bpffs: mount it with `mount -t bpf bpf /sys/fs/bpf`")]
    NotBpffs(PathBuf),
}

fn is_permission(e: &aya::EbpfError) -> bool {
    let text = e.to_string();
    text.contains("Operation not permitted") || text.contains("os error 1)")
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io { what, path: path.to_path_buf(), source }
}

/// Where a node's programs attach and what they are told about the proxy.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// bpffs directory for this node's maps and links.
    pub pin_dir: PathBuf,
    /// Root of the workload cgroups: connect/sendmsg/getpeername/bind/release hooks.
    pub workload_cgroup: PathBuf,
    /// A cgroup above both the workloads and the proxy: sock_ops (the sockhash needs both ends).
    pub node_cgroup: PathBuf,
    /// The proxy's cgroup: getsockopt(SO_ORIGINAL_DST).
    pub proxy_cgroup: PathBuf,
    /// Network namespace for sk_lookup (`/proc/self/ns/net` for the caller's own).
    pub netns: PathBuf,
    pub proxy: ProxyAddrs,
    pub fail_open: bool,
    /// Keep the sk_msg short-circuit of the app <-> proxy hop (on by default).
    pub short_circuit: bool,
    /// Capacities of the policy maps when they are created (pinned maps keep theirs).
    pub map_sizes: MapSizes,
}

/// Capacities of the policy maps (entries); `None` keeps the object's default
/// ([`DEFAULT_MAP_SIZES`]). Only a map being created takes a size: a pinned map keeps its own
/// until [`uninstall`]. During an apply a map holds the generation in force and the new one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapSizes {
    pub endpoints: Option<u32>,
    pub ipcache: Option<u32>,
    pub policy: Option<u32>,
}

/// The object's capacities: endpoints, ipcache, policy.
pub const DEFAULT_MAP_SIZES: (u32, u32, u32) = (16384, 65536, 262144);

/// The proxy's addresses as the kernel programs see them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyAddrs {
    pub addr4: Ipv4Addr,
    pub addr6: Ipv6Addr,
    pub egress_port: u16,
    pub ingress_port: u16,
    /// Sources of the proxy's upstream sockets towards loopback when it has no mark (the
    /// in-process tests); sk_lookup judges them as any other source. (Still in the kernel's
    /// config, whose layout they keep.)
    pub upstream_src4: Ipv4Addr,
    pub upstream_src6: Ipv6Addr,
    /// SO_MARK of the proxy's upstream sockets; connect hooks never redirect them.
    pub mark: u32,
}

impl Default for ProxyAddrs {
    fn default() -> Self {
        ProxyAddrs {
            addr4: Ipv4Addr::LOCALHOST,
            addr6: Ipv6Addr::LOCALHOST,
            egress_port: 15001,
            ingress_port: 15006,
            upstream_src4: Ipv4Addr::new(127, 0, 0, 6),
            upstream_src6: UPSTREAM_SRC6,
            mark: 0x6c37,
        }
    }
}

/// The dedicated IPv6 source of the proxy's upstream sockets (IPv6 has one loopback address,
/// so the node adds this one to `lo`).
pub const UPSTREAM_SRC6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x6c37, 0, 0, 0, 0, 0, 6);

impl ProxyAddrs {
    fn to_raw(self, fail_open: bool, short_circuit: bool, netns_cookie: u64) -> RawConfig {
        RawConfig {
            proxy_addr4: to_words(IpAddr::V4(self.addr4)),
            proxy_addr6: to_words(IpAddr::V6(self.addr6)),
            upstream_src4: to_words(IpAddr::V4(self.upstream_src4)),
            upstream_src6: to_words(IpAddr::V6(self.upstream_src6)),
            egress_port: self.egress_port,
            ingress_port: self.ingress_port,
            proxy_mark: self.mark,
            flags: if fail_open { CONFIG_FAIL_OPEN } else { 0 }
                | if short_circuit { 0 } else { CONFIG_NO_SHORT_CIRCUIT },
            _pad: 0,
            netns_cookie,
        }
    }
}

/// The attached datapath. Dropping it leaves everything attached (the links are pinned);
/// [`uninstall`] removes it.
pub struct Redirector {
    pub maps: Maps,
    pin_dir: PathBuf,
}

impl Redirector {
    /// Loads the programs, reusing pinned maps when present, attaches every program, pins each
    /// link (replacing what an earlier install pinned) and writes the node config.
    pub fn install(node: &NodeConfig) -> Result<Self> {
        let maps_dir = node.pin_dir.join("maps");
        let links_dir = node.pin_dir.join("links");
        ensure_bpffs(&node.pin_dir)?;
        fs::create_dir_all(&maps_dir).map_err(io_err("creating", &maps_dir))?;
        {
            // Only root reaches the datapath's pins.
            use std::os::unix::fs::PermissionsExt as _;
            fs::set_permissions(&node.pin_dir, fs::Permissions::from_mode(0o700))
                .map_err(io_err("chmod 0700", &node.pin_dir))?;
        }
        fs::create_dir_all(&links_dir).map_err(io_err("creating", &links_dir))?;

        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(&maps_dir);
        let sizes = node.map_sizes;
        for (name, size) in [
            (map_names::ENDPOINTS, sizes.endpoints),
            (map_names::IPCACHE, sizes.ipcache),
            (map_names::POLICY, sizes.policy),
        ] {
            if let Some(size) = size {
                loader.map_max_entries(name, size);
            }
        }
        let mut ebpf = loader.load(BPF_OBJECT)?;
        let workloads = open_dir(&node.workload_cgroup)?;
        let node_cg = open_dir(&node.node_cgroup)?;
        let proxy_cg = open_dir(&node.proxy_cgroup)?;
        let netns = fs::File::open(&node.netns).map_err(io_err("opening netns", &node.netns))?;

        // Load, attach to a cgroup, and pin the link of each cgroup program of type $ty.
        macro_rules! attach_cgroup {
            ($ty:ty, $cgroup:expr, [$($name:expr),+]) => {
                for name in [$($name),+] {
                    let program: &mut $ty = program_mut(&mut ebpf, name)?;
                    program.load().map_err(|source| Error::Program { name, source })?;
                    let id = program.attach($cgroup, CgroupAttachMode::Single).map_err(|source| Error::Program { name, source })?;
                    let link = program.take_link(id).map_err(|source| Error::Program { name, source })?;
                    let link = FdLink::try_from(link).map_err(|source| Error::Link { name, source })?;
                    pin_replacing(link, &links_dir, name)?;
                }
            };
        }
        attach_cgroup!(
            CgroupSockAddr,
            &workloads,
            [prog::CONNECT4, prog::CONNECT6, prog::SENDMSG4, prog::SENDMSG6, prog::GETPEERNAME4, prog::GETPEERNAME6]
        );
        attach_cgroup!(CgroupSock, &workloads, [prog::POST_BIND4, prog::POST_BIND6, prog::SOCK_RELEASE]);
        attach_cgroup!(SockOps, &node_cg, [prog::SOCK_OPS]);
        {
            let name = prog::GETSOCKOPT;
            let program: &mut CgroupSockopt = program_mut(&mut ebpf, name)?;
            program.load().map_err(|source| Error::Program { name, source })?;
            let prog_fd = program.fd().map_err(|source| Error::Program { name, source })?;
            let link = sys::link_create(prog_fd.as_fd(), proxy_cg.as_fd(), sys::BPF_CGROUP_GETSOCKOPT)
                .map_err(io_err("attaching getsockopt to", &node.proxy_cgroup))?;
            let tmp = links_dir.join(format!("{name}_new"));
            let _ = fs::remove_file(&tmp);
            sys::obj_pin(link.as_fd(), &tmp).map_err(io_err("pinning", &tmp))?;
            let dst = links_dir.join(name);
            fs::rename(&tmp, &dst).map_err(io_err("replacing pin", &dst))?;
        }
        {
            let name = prog::SK_LOOKUP;
            let program: &mut SkLookup = program_mut(&mut ebpf, name)?;
            program.load().map_err(|source| Error::Program { name, source })?;
            let id = program.attach(&netns).map_err(|source| Error::Program { name, source })?;
            let link: FdLink = program.take_link(id).map_err(|source| Error::Program { name, source })?.into();
            pin_replacing(link, &links_dir, name)?;
        }
        {
            let name = prog::SK_MSG;
            let sockets: aya::maps::SockHash<MapData, redirector_common::FlowKey> = ebpf
                .take_map(map_names::SOCKETS)
                .ok_or(Error::MissingProgram(map_names::SOCKETS))?
                .try_into()
                .map_err(|source| Error::Map { name: map_names::SOCKETS, source })?;
            let program: &mut SkMsg = program_mut(&mut ebpf, name)?;
            program.load().map_err(|source| Error::Program { name, source })?;
            let id = program.attach(sockets.fd()).map_err(|source| Error::Program { name, source })?;
            // The verdict attachment belongs to the (pinned) sockhash and lives as long as it
            // does; dropping aya's handle would detach it, so it is deliberately leaked.
            let link = program.take_link(id).map_err(|source| Error::Program { name, source })?;
            std::mem::forget(link);
        }
        drop(ebpf);

        let mut maps = Maps::open(&node.pin_dir)?;
        let netns_cookie =
            sys::netns_cookie_of(&node.netns).map_err(io_err("reading the cookie of netns", &node.netns))?;
        maps.set_config(node.proxy, node.fail_open, node.short_circuit, netns_cookie)?;
        info!(pin_dir = %node.pin_dir.display(), "redirector attached");
        Ok(Redirector { maps, pin_dir: node.pin_dir.clone() })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or(Error::MissingProgram(name))?;
    program.try_into().map_err(|source| Error::Program { name, source })
}

fn open_dir(path: &Path) -> Result<fs::File> {
    fs::File::open(path).map_err(io_err("opening cgroup", path))
}

/// Pins `link` as `links/<name>`, replacing an earlier pin: the old link detaches once its pin
/// is gone (both are attached for a moment; each program sees the other's rewrite and passes).
fn pin_replacing(link: FdLink, links_dir: &Path, name: &str) -> Result<()> {
    let tmp = links_dir.join(format!("{name}_new"));
    let _ = fs::remove_file(&tmp);
    let pinned: PinnedLink = link.pin(&tmp).map_err(|source| Error::Pin { path: tmp.clone(), source })?;
    let dst = links_dir.join(name);
    fs::rename(&tmp, &dst).map_err(io_err("replacing pin", &dst))?;
    drop(pinned);
    debug!(link = name, "pinned");
    Ok(())
}

fn ensure_bpffs(pin_dir: &Path) -> Result<()> {
    // BPF_FS_MAGIC
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let mut probe = pin_dir.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    let c = std::ffi::CString::new(probe.as_os_str().as_encoded_bytes()).map_err(|e| Error::Io {
        what: "pin path",
        path: pin_dir.to_path_buf(),
        source: io::Error::new(io::ErrorKind::InvalidInput, e),
    })?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid C string and st valid storage for statfs.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(Error::Io { what: "statfs", path: probe, source: io::Error::last_os_error() });
    }
    if st.f_type as i64 != BPF_FS_MAGIC {
        return Err(Error::NotBpffs(probe));
    }
    Ok(())
}

/// Removes a node's datapath: every pinned link (detaching its program) and every pinned map.
/// Returns how many pins were removed. Missing directories are not an error.
pub fn uninstall(pin_dir: &Path) -> Result<usize> {
    uninstall_paths(pin_dir).map(|removed| removed.len())
}

/// [`uninstall`], returning every pin it removed (links first: programs detach before their
/// maps go).
pub fn uninstall_paths(pin_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for sub in ["links", "maps"] {
        let dir = pin_dir.join(sub);
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::Io { what: "reading", path: dir, source: e }),
        };
        for entry in entries {
            let path = entry.map_err(io_err("reading", &dir))?.path();
            fs::remove_file(&path).map_err(io_err("unpinning", &path))?;
            removed.push(path);
        }
        fs::remove_dir(&dir).map_err(io_err("removing", &dir))?;
    }
    match fs::remove_dir(pin_dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::Io { what: "removing", path: pin_dir.to_path_buf(), source: e }),
    }
    info!(pin_dir = %pin_dir.display(), removed = removed.len(), "redirector removed");
    Ok(removed)
}

/// True when a datapath is pinned at `pin_dir`.
pub fn is_installed(pin_dir: &Path) -> bool {
    pin_dir.join("links").join(prog::CONNECT4).exists()
}

/// The programs an installed datapath keeps attached through a pinned link under
/// `<pin dir>/links` (sk_msg is attached to its sockhash, pinned with the maps).
pub const PINNED_LINKS: [&str; 12] = [
    prog::CONNECT4,
    prog::CONNECT6,
    prog::SENDMSG4,
    prog::SENDMSG6,
    prog::GETPEERNAME4,
    prog::GETPEERNAME6,
    prog::POST_BIND4,
    prog::POST_BIND6,
    prog::SOCK_RELEASE,
    prog::SOCK_OPS,
    prog::GETSOCKOPT,
    prog::SK_LOOKUP,
];

/// Each of [`PINNED_LINKS`] with whether its link is pinned (the program attached) now.
pub fn pinned_links(pin_dir: &Path) -> Vec<(&'static str, bool)> {
    PINNED_LINKS.iter().map(|name| (*name, pin_dir.join("links").join(name).exists())).collect()
}

/// What a connect hook recorded for a redirected connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OriginalDestination {
    pub addr: SocketAddr,
    /// The source workload's cgroup id.
    pub cgroup_id: u64,
    pub egress_policy_id: u32,
    pub ingress_policy_id: u32,
    pub hint: ProtocolHint,
    pub audit: bool,
    /// The destination is a local workload's listener (its ingress policy was applied too).
    pub local_destination: bool,
}

impl OriginalDestination {
    fn from_raw(d: &ConnectDecision) -> Self {
        OriginalDestination {
            addr: SocketAddr::new(from_words(d.original_addr), d.original_port),
            cgroup_id: d.cgroup_id,
            egress_policy_id: d.egress_policy_id,
            ingress_policy_id: d.ingress_policy_id,
            hint: ProtocolHint::from_raw(d.proto_hint),
            audit: d.flags & DECISION_AUDIT != 0,
            local_destination: d.flags & DECISION_INGRESS_CHECKED != 0,
        }
    }
}

/// A workload's bound address as the kernel learned it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listener {
    pub netns_cookie: u64,
    pub addr: SocketAddr,
    pub protocol: Protocol,
    pub cgroup_id: u64,
}

/// Entries per policy map.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapUsage {
    pub endpoints: usize,
    pub ipcache: usize,
    pub policy: usize,
}

/// Sums of the per-CPU counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub values: Vec<(Counter, u64)>,
}

impl Counters {
    pub fn get(&self, counter: Counter) -> u64 {
        self.values.iter().find(|(c, _)| *c == counter).map(|(_, v)| *v).unwrap_or(0)
    }
}

pub use redirector_common::Counter as CounterKind;

/// Typed handles on a node's pinned maps.
pub struct Maps {
    config: Array<MapData, RawConfig>,
    generation: Array<MapData, u32>,
    endpoints: HashMap<MapData, EndpointKey, EndpointInfo>,
    ipcache: LpmTrie<MapData, IpcacheKey, IpcacheValue>,
    policy: LpmTrie<MapData, PolicyKey, PolicyValue>,
    listeners: HashMap<MapData, ListenerKey, ListenerValue>,
    original_dst: HashMap<MapData, PeerKey, ConnectDecision>,
    proxy_listeners: SockMap<MapData>,
    counters: PerCpuArray<MapData, u64>,
    pin_dir: PathBuf,
}

impl std::fmt::Debug for Maps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Maps").field("pin_dir", &self.pin_dir).finish_non_exhaustive()
    }
}

fn open_map(maps_dir: &Path, name: &'static str) -> Result<Map> {
    let path = maps_dir.join(name);
    let data = MapData::from_pin(&path).map_err(|source| Error::Map { name, source })?;
    Map::from_map_data(data).map_err(|source| Error::Map { name, source })
}

macro_rules! typed {
    ($dir:expr, $name:expr) => {{
        let name: &'static str = $name;
        open_map($dir, name)?.try_into().map_err(|source| Error::Map { name, source })?
    }};
}

impl Maps {
    /// Opens the maps a node pinned at `pin_dir`.
    pub fn open(pin_dir: &Path) -> Result<Self> {
        let dir = pin_dir.join("maps");
        Ok(Maps {
            config: typed!(&dir, map_names::CONFIG),
            generation: typed!(&dir, map_names::GENERATION),
            endpoints: typed!(&dir, map_names::ENDPOINTS),
            ipcache: typed!(&dir, map_names::IPCACHE),
            policy: typed!(&dir, map_names::POLICY),
            listeners: typed!(&dir, map_names::LISTENERS),
            original_dst: typed!(&dir, map_names::ORIGINAL_DST),
            proxy_listeners: typed!(&dir, map_names::PROXY_LISTENERS),
            counters: typed!(&dir, map_names::COUNTERS),
            pin_dir: pin_dir.to_path_buf(),
        })
    }

    /// The L4 verdict ring buffer (one reader at a time: each event is delivered once).
    pub fn events(&self) -> Result<RingBuf<MapData>> {
        Ok(typed!(&self.pin_dir.join("maps"), map_names::EVENTS))
    }

    pub fn config(&self) -> Result<RawConfig> {
        self.config.get(&0, 0).map_err(|source| Error::Map { name: map_names::CONFIG, source })
    }

    /// Writes the node config; `netns_cookie` is that of the namespace sk_lookup polices.
    pub fn set_config(
        &mut self,
        proxy: ProxyAddrs,
        fail_open: bool,
        short_circuit: bool,
        netns_cookie: u64,
    ) -> Result<()> {
        self.config
            .set(0, proxy.to_raw(fail_open, short_circuit, netns_cookie), 0)
            .map_err(|source| Error::Map { name: map_names::CONFIG, source })
    }

    /// Whether marked connections pass unredirected while no proxy listens (`--fail-open`).
    pub fn fail_open(&self) -> Result<bool> {
        Ok(self.config()?.flags & CONFIG_FAIL_OPEN != 0)
    }

    /// Turns the sk_msg short-circuit on or off for connections made from now on.
    pub fn set_short_circuit(&mut self, on: bool) -> Result<()> {
        let mut config = self.config()?;
        if on {
            config.flags &= !CONFIG_NO_SHORT_CIRCUIT;
        } else {
            config.flags |= CONFIG_NO_SHORT_CIRCUIT;
        }
        self.config.set(0, config, 0).map_err(|source| Error::Map { name: map_names::CONFIG, source })
    }

    /// The generation programs read now.
    pub fn generation(&self) -> Result<u32> {
        self.generation.get(&0, 0).map_err(|source| Error::Map { name: map_names::GENERATION, source })
    }

    /// Writes `snapshot` as a new generation, makes it current in one map write, then deletes
    /// every entry of older generations. Returns the new generation.
    ///
    /// The new generation's entries are purged before they are written (a failed apply may have
    /// left some, and the next apply picks the same number) and again when a write fails (a
    /// full map, say): then the generation in force is untouched and nothing of the failed one
    /// stays behind.
    pub fn apply(&mut self, snapshot: &PolicySnapshot) -> Result<u32> {
        let old = self.generation()?;
        let generation = old.wrapping_add(1).max(1);
        self.purge(|g| g == generation);
        if let Err(e) = self.write_generation(generation, snapshot) {
            self.purge(|g| g == generation);
            return Err(e);
        }
        let err = |name: &'static str| move |source| Error::Map { name, source };
        // The one step that switches every program to the new generation.
        self.generation.set(0, generation, 0).map_err(err(map_names::GENERATION))?;
        self.purge(|g| g != generation);
        debug!(generation, old, "policy generation applied");
        Ok(generation)
    }

    /// Deletes every policy-map entry whose generation `doomed` picks.
    fn purge(&mut self, doomed: impl Fn(u32) -> bool) {
        let stale: Vec<EndpointKey> =
            self.endpoints.keys().filter_map(|k| k.ok()).filter(|k| doomed(k.generation)).collect();
        for key in stale {
            let _ = self.endpoints.remove(&key);
        }
        let stale: Vec<LpmKey<IpcacheKey>> =
            self.ipcache.keys().filter_map(|k| k.ok()).filter(|k| doomed(k.data().generation)).collect();
        for key in stale {
            let _ = self.ipcache.remove(&key);
        }
        let stale: Vec<LpmKey<PolicyKey>> =
            self.policy.keys().filter_map(|k| k.ok()).filter(|k| doomed(k.data().generation)).collect();
        for key in stale {
            let _ = self.policy.remove(&key);
        }
    }

    /// Writes `snapshot`'s entries under `generation` (not yet current).
    fn write_generation(&mut self, generation: u32, snapshot: &PolicySnapshot) -> Result<()> {
        let err = |name: &'static str| move |source| Error::Map { name, source };

        for ep in &snapshot.endpoints {
            let key = EndpointKey { generation, _pad: 0, cgroup_id: ep.cgroup_id };
            let mut flags = 0;
            if ep.egress_enforced {
                flags |= ENDPOINT_EGRESS_ENFORCED;
            }
            if ep.ingress_enforced {
                flags |= ENDPOINT_INGRESS_ENFORCED;
            }
            if ep.egress_audit {
                flags |= ENDPOINT_EGRESS_AUDIT;
            }
            if ep.ingress_audit {
                flags |= ENDPOINT_INGRESS_AUDIT;
            }
            let value = EndpointInfo { endpoint_id: ep.endpoint_id, identity: ep.identity, flags, _pad: 0 };
            self.endpoints.insert(key, value, 0).map_err(err(map_names::ENDPOINTS))?;
        }
        for (net, identity) in &snapshot.ipcache {
            let net = net.trunc();
            let key = LpmKey::new(
                IPCACHE_KEY_FIXED_BITS + addr::mapped_prefix_len(&net),
                IpcacheKey { generation, addr: to_words(net.network()) },
            );
            self.ipcache.insert(&key, IpcacheValue { identity: *identity }, 0).map_err(err(map_names::IPCACHE))?;
        }
        for entry in policy::expand_rules(&snapshot.rules) {
            let key = LpmKey::new(
                POLICY_KEY_FIXED_BITS + u32::from(entry.bits),
                PolicyKey {
                    generation,
                    endpoint_id: entry.endpoint_id,
                    peer_identity: entry.peer_identity,
                    direction: entry.direction,
                    protocol: entry.protocol,
                    port: entry.port.to_be_bytes(),
                },
            );
            self.policy.insert(&key, entry.value, 0).map_err(err(map_names::POLICY))?;
        }
        Ok(())
    }

    /// What `snapshot` takes in each policy map, as [`Maps::apply`] would write it.
    pub fn entries_needed(snapshot: &PolicySnapshot) -> MapUsage {
        MapUsage {
            endpoints: snapshot.endpoints.len(),
            ipcache: snapshot.ipcache.iter().map(|(n, _)| n.trunc()).collect::<std::collections::BTreeSet<_>>().len(),
            policy: policy::expand_rules(&snapshot.rules).len(),
        }
    }

    /// Entries of every generation now in each policy map.
    pub fn entries_used(&self) -> MapUsage {
        MapUsage {
            endpoints: self.endpoints.keys().filter(|k| k.is_ok()).count(),
            ipcache: self.ipcache.keys().filter(|k| k.is_ok()).count(),
            policy: self.policy.keys().filter(|k| k.is_ok()).count(),
        }
    }

    /// The policy maps' capacities, as the kernel created them.
    pub fn capacities(&self) -> Result<MapUsage> {
        let dir = self.pin_dir.join("maps");
        let cap = |name: &'static str| -> Result<usize> {
            let data = MapData::from_pin(dir.join(name)).map_err(|source| Error::Map { name, source })?;
            Ok(data.info().map_err(|source| Error::Map { name, source })?.max_entries() as usize)
        };
        Ok(MapUsage {
            endpoints: cap(map_names::ENDPOINTS)?,
            ipcache: cap(map_names::IPCACHE)?,
            policy: cap(map_names::POLICY)?,
        })
    }

    /// Why `snapshot` would not fit beside the generation in force (both are in the maps until
    /// the flip), if it would not: the first map that overflows, with the numbers.
    pub fn check_fits(&self, snapshot: &PolicySnapshot) -> Result<Option<String>> {
        let need = Self::entries_needed(snapshot);
        let current = self.generation()?;
        let (eps, ipc, pol) = self.entry_counts(current);
        let cap = self.capacities()?;
        for (name, need, in_force, cap) in [
            (map_names::ENDPOINTS, need.endpoints, eps, cap.endpoints),
            (map_names::IPCACHE, need.ipcache, ipc, cap.ipcache),
            (map_names::POLICY, need.policy, pol, cap.policy),
        ] {
            if need + in_force > cap {
                return Ok(Some(format!(
                    "map {name} is too small: this version needs {need} entries beside the {in_force} of the \
                     version in force, and it holds {cap}"
                )));
            }
        }
        Ok(None)
    }

    /// Number of entries of each policy map that belong to `generation` (for checks and status).
    pub fn entry_counts(&self, generation: u32) -> (usize, usize, usize) {
        let eps = self.endpoints.keys().filter_map(|k| k.ok()).filter(|k| k.generation == generation).count();
        let ipc = self.ipcache.keys().filter_map(|k| k.ok()).filter(|k| k.data().generation == generation).count();
        let pol = self.policy.keys().filter_map(|k| k.ok()).filter(|k| k.data().generation == generation).count();
        (eps, ipc, pol)
    }

    /// The original destination of a redirected connection, by the client address the proxy
    /// sees as its peer, in the namespace whose cookie is given.
    pub fn original_destination(&self, netns_cookie: u64, peer: SocketAddr) -> Option<OriginalDestination> {
        let key = PeerKey {
            netns_cookie,
            addr: to_words(peer.ip()),
            port: peer.port(),
            protocol: redirector_common::IPPROTO_TCP,
            _pad: [0; 5],
        };
        let decision = self.original_dst.get(&key, 0).ok()?;
        (decision.flags & DECISION_REDIRECTED != 0).then(|| OriginalDestination::from_raw(&decision))
    }

    /// Registers the proxy's ingress listeners for sk_lookup (slot 0 IPv4, slot 1 IPv6). The
    /// kernel drops them from the map when the sockets close, so a dead proxy is noticed in-kernel.
    pub fn register_ingress_listener(&mut self, v6: bool, socket: &impl AsRawFd) -> Result<()> {
        self.proxy_listeners
            .set(u32::from(v6), socket, 0)
            .map_err(|source| Error::Map { name: map_names::PROXY_LISTENERS, source })
    }

    /// Bound addresses the kernel attributes to workloads.
    pub fn listeners(&self) -> Vec<Listener> {
        self.listeners
            .iter()
            .filter_map(|r| r.ok())
            .filter_map(|(k, v)| {
                Some(Listener {
                    netns_cookie: k.netns_cookie,
                    addr: SocketAddr::new(from_words(k.addr), k.port),
                    protocol: Protocol::from_raw(k.protocol)?,
                    cgroup_id: v.cgroup_id,
                })
            })
            .collect()
    }

    /// Records a bound address found outside the kernel hooks (seeding at start).
    pub fn insert_listener(&mut self, listener: &Listener) -> Result<()> {
        let key = ListenerKey {
            netns_cookie: listener.netns_cookie,
            addr: if addr::is_unspecified(listener.addr.ip()) { [0; 4] } else { to_words(listener.addr.ip()) },
            port: listener.addr.port(),
            protocol: listener.protocol.as_raw(),
            _pad: [0; 5],
        };
        // socket_cookie 0: no live socket's release matches it, so only a rebind replaces it.
        let value = ListenerValue { cgroup_id: listener.cgroup_id, socket_cookie: 0 };
        self.listeners.insert(key, value, 0).map_err(|source| Error::Map { name: map_names::LISTENERS, source })
    }

    /// Learns the bound sockets of processes that were already running in the workload tree
    /// before the programs were attached.
    pub fn seed_listeners(&mut self, workload_cgroup: &Path) -> Result<SeedReport> {
        let found = seed::scan(workload_cgroup)?;
        for listener in &found.listeners {
            self.insert_listener(listener)?;
        }
        Ok(found)
    }

    /// Sums of the per-CPU counters.
    pub fn counters(&self) -> Result<Counters> {
        let mut values = Vec::with_capacity(Counter::ALL.len());
        for counter in Counter::ALL {
            let per_cpu = self
                .counters
                .get(&(counter as u32), 0)
                .map_err(|source| Error::Map { name: map_names::COUNTERS, source })?;
            values.push((counter, per_cpu.iter().sum()));
        }
        Ok(Counters { values })
    }
}

/// The cgroup v2 id of a cgroup directory (its kernfs inode number), as
/// `bpf_get_current_cgroup_id()` reports it.
pub fn cgroup_id(path: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    Ok(fs::metadata(path).map_err(io_err("reading cgroup", path))?.ino())
}

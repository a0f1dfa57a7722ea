//! The proxy's data path: one accept loop per listener, one task per connection with its own
//! tracing span, drain on shutdown; then the stack for the connection's protocol (policy hint
//! first, then sniffing): HTTP, Kafka, or opaque forwarding where policy allows it at L4.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redirector::OriginalDestination;
use thiserror::Error;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, info, warn, Instrument};

pub use crate::context::{CloseOrder, Direction, LiveConnections, Shared};
use crate::flows::{Endpoint, FlowRecord, ProxyInfo, Reason};
use crate::http::HttpConnection;
use crate::limits::{ConnectionOwner, ConnectionSlot, OverConnectionBound};
use crate::metrics::Limit;
use crate::metrics::{DirectionLabels, FailureLabels};
use crate::plan::{ConnInfo, PortPlan, Refusal, Stack};
pub use crate::upstream::connect_upstream;
use crate::upstream::UpstreamError;
use l7mesh_api::Verdict;

#[derive(Debug, Error)]
pub enum ConnectionError {
    #[error("no original destination for peer {0}: not a redirected connection")]
    NoOriginalDestination(SocketAddr),
    #[error("the original destination {0} is the proxy itself")]
    Loop(SocketAddr),
    #[error("{0}")]
    NoPolicy(String),
    #[error("closed: policy version {0} denies this connection")]
    ClosedByPolicy(u64),
    #[error("closed: policy version {0} carries this connection differently; the client reconnects")]
    ReroutedByPolicy(u64),
    #[error("upstream {addr}: {source}")]
    Upstream { addr: SocketAddr, source: io::Error },
    #[error("upstream {0}: connect timed out")]
    UpstreamTimeout(SocketAddr),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("HTTP: {0}")]
    Http(String),
    #[error("Kafka: {0}")]
    Kafka(String),
    #[error("{0}: not HTTP on a port whose policy has HTTP rules and no L4 allow for this peer")]
    NotHttp(SocketAddr),
    #[error("{0}: {TLS_UNSUPPORTED}")]
    TlsUnsupported(SocketAddr),
    #[error("{0}: {KAFKA_INSIDE_TLS}")]
    KafkaInsideTls(SocketAddr),
    #[error("{addr}: {reason}")]
    ServerName { addr: SocketAddr, reason: String },
    #[error("{addr}: {reason}")]
    Tls { addr: SocketAddr, reason: String },
    #[error("{0}")]
    OverConnectionBound(OverConnectionBound),
    #[error("tunnel: {0}")]
    Tunnel(String),
}

/// Why a connection to a port with TLS settings in its policy is closed.
pub const TLS_UNSUPPORTED: &str =
    "the policy has L7 rules next to serverNames on this port but neither terminatingTLS \
     nor originatingTLS, so the proxy cannot read the traffic they judge; closed rather than passed unchecked";

/// Why a connection to a port with Kafka rules and TLS settings is closed.
pub const KAFKA_INSIDE_TLS: &str =
    "the policy has Kafka rules on this port next to terminatingTLS or originatingTLS, and the proxy \
     does not judge Kafka inside TLS; closed rather than passed unchecked";

impl From<UpstreamError> for ConnectionError {
    fn from(e: UpstreamError) -> Self {
        match e {
            UpstreamError::Connect { addr, source } => ConnectionError::Upstream { addr, source },
            UpstreamError::Timeout(addr) => ConnectionError::UpstreamTimeout(addr),
        }
    }
}

/// Every `reason` of `l7mesh_proxy_connection_failures_total`, exported at 0 from the start
/// (a dashboard's rate then reads 0, not "no data").
pub const FAILURE_REASONS: [&str; 17] = [
    "no_original_destination",
    "loop",
    "no_policy",
    "closed_by_policy",
    "rerouted_by_policy",
    "upstream_connect",
    "upstream_timeout",
    "io",
    "http",
    "kafka",
    "not_http",
    "tls_unsupported",
    "kafka_inside_tls",
    "server_name",
    "tls",
    "connections_per_workload",
    "tunnel",
];

impl ConnectionError {
    fn reason(&self) -> &'static str {
        match self {
            ConnectionError::NoOriginalDestination(_) => "no_original_destination",
            ConnectionError::Loop(_) => "loop",
            ConnectionError::NoPolicy(_) => "no_policy",
            ConnectionError::ClosedByPolicy(_) => "closed_by_policy",
            ConnectionError::ReroutedByPolicy(_) => "rerouted_by_policy",
            ConnectionError::Upstream { .. } => "upstream_connect",
            ConnectionError::UpstreamTimeout(_) => "upstream_timeout",
            ConnectionError::Io(_) => "io",
            ConnectionError::Http(_) => "http",
            ConnectionError::Kafka(_) => "kafka",
            ConnectionError::NotHttp(_) => "not_http",
            ConnectionError::TlsUnsupported(_) => "tls_unsupported",
            ConnectionError::KafkaInsideTls(_) => "kafka_inside_tls",
            ConnectionError::ServerName { .. } => "server_name",
            ConnectionError::Tls { .. } => "tls",
            ConnectionError::OverConnectionBound(_) => "connections_per_workload",
            ConnectionError::Tunnel(_) => "tunnel",
        }
    }
}

/// Accepts on `listener` until `shutdown` flips, then waits (up to `drain`) for the
/// connections it started to finish.
pub async fn serve(
    listener: TcpListener,
    direction: Direction,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let local = listener.local_addr().ok();
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let span = tracing::info_span!("conn", dir = crate::metrics::direction_label(direction), %peer);
                    let shared = shared.clone();
                    tasks.spawn(handle(stream, peer, direction, shared).instrument(span));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    let open = tasks.len();
    if open > 0 {
        info!(?local, open, "draining connections");
        let deadline = tokio::time::sleep(drain);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                next = tasks.join_next() => if next.is_none() { break },
                _ = &mut deadline => {
                    warn!(?local, left = tasks.len(), "drain deadline reached; closing the rest");
                    tasks.abort_all();
                    break;
                }
            }
        }
    }
}

/// One proxied connection, counted open for exactly as long as its task holds it, whatever
/// ends it (the stack returning, an error, a close order, or the drain deadline aborting the
/// task): the active gauge, the live entry, the `ended` signal a close order waits for and the
/// owner's slot under `--max-connections-per-workload` are released once, on drop.
struct ConnGuard {
    shared: Arc<Shared>,
    peer: SocketAddr,
    active: prometheus_client::metrics::gauge::Gauge,
    ended: watch::Sender<bool>,
    _slot: ConnectionSlot,
}

impl ConnGuard {
    /// Counts the connection against its owner first: over the bound it is not opened at all
    /// (and the caller refuses it before reading a byte or connecting upstream).
    fn open(
        shared: &Arc<Shared>,
        peer: SocketAddr,
        direction: Direction,
        owner: ConnectionOwner,
        context: crate::metrics::ContextLabels,
    ) -> Result<(ConnGuard, watch::Receiver<Option<CloseOrder>>), OverConnectionBound> {
        let labels = DirectionLabels { direction: crate::metrics::direction_label(direction) };
        shared.metrics.redirected_connections.with(labels.clone(), context, |c| c.inc());
        let slot = shared.connections.try_acquire(owner)?;
        let active = shared.metrics.active_connections.get_or_create(&labels).clone();
        active.inc();
        let (order, ended) = shared.live.register(peer);
        Ok((ConnGuard { shared: shared.clone(), peer, active, ended, _slot: slot }, order))
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let _ = self.ended.send(true);
        self.shared.live.remove(self.peer);
        self.active.dec();
    }
}

async fn handle(downstream: TcpStream, peer: SocketAddr, direction: Direction, shared: Arc<Shared>) {
    // The kernel's redirect entry names an egress connection's source workload; an ingress
    // connection comes from outside the node (sk_lookup skips the proxy's own upstream legs).
    let identity = match direction {
        Direction::Egress => shared.datapath.original_destination(shared.netns_cookie, peer),
        Direction::Ingress => None,
    };
    let owner = ConnectionOwner::of(identity.map(|i| i.cgroup_id), peer.ip());
    let context = connection_context(&downstream, direction, identity, &shared);
    let (guard, mut order) = match ConnGuard::open(&shared, peer, direction, owner, context) {
        Ok(opened) => opened,
        Err(over) => return refuse_over_bound(&downstream, peer, direction, identity, over, &shared),
    };
    let result = tokio::select! {
        result = forward(downstream, peer, direction, identity, &shared) => result,
        // A new policy version denies or reroutes this connection: both sides close as the
        // future drops.
        o = order.wait_for(|o| o.is_some()) => {
            let version = shared.registry.tables().version;
            match o.ok().and_then(|o| *o) {
                Some(CloseOrder::Rerouted) => Err(ConnectionError::ReroutedByPolicy(version)),
                _ => Err(ConnectionError::ClosedByPolicy(version)),
            }
        }
    };
    drop(guard);
    if let Err(e) = result {
        shared
            .metrics
            .connection_failures
            .get_or_create(&FailureLabels { direction: crate::metrics::direction_label(direction), reason: e.reason() })
            .inc();
        if let ConnectionError::ClosedByPolicy(_) | ConnectionError::ReroutedByPolicy(_) = e {
            policy_closed_flow(&shared, peer, direction, &e);
            info!("{e}");
        } else {
            warn!(error = %e, "connection failed");
        }
    }
}

/// The `--metrics-context` labels of an accepted connection (none unless configured): the
/// source workload the kernel names (egress), the workload listening where it goes.
fn connection_context(
    downstream: &TcpStream,
    direction: Direction,
    identity: Option<OriginalDestination>,
    shared: &Shared,
) -> crate::metrics::ContextLabels {
    let context = &shared.metrics.context;
    if context.is_empty() {
        return Vec::new();
    }
    let source = identity.and_then(|i| shared.registry.workload(i.cgroup_id));
    let destination = match (identity, downstream.local_addr()) {
        (Some(i), _) => shared.registry.listener(i.addr),
        (None, Ok(local)) if direction == Direction::Ingress => shared.registry.listener(local),
        _ => None,
    };
    context.connection(crate::metrics::Parties {
        direction,
        source: source.as_deref(),
        destination: destination.as_deref(),
    })
}

/// A connection whose owner is at `--max-connections-per-workload`: closed as accepted, before
/// any byte is read or any upstream connected; counted, logged (once a second at most, with
/// the number left unlogged) and written as a DENIED flow naming the owner and the bound.
fn refuse_over_bound(
    downstream: &TcpStream,
    peer: SocketAddr,
    direction: Direction,
    identity: Option<OriginalDestination>,
    over: OverConnectionBound,
    shared: &Shared,
) {
    shared.metrics.limit_tripped(Limit::ConnectionsPerWorkload);
    let e = ConnectionError::OverConnectionBound(over);
    shared
        .metrics
        .connection_failures
        .get_or_create(&FailureLabels { direction: crate::metrics::direction_label(direction), reason: e.reason() })
        .inc();
    let source = identity.and_then(|i| shared.registry.workload(i.cgroup_id));
    let who = match (&source, over.owner) {
        (Some(w), _) => format!("the source workload {}/{}", w.namespace, w.name),
        (None, ConnectionOwner::Workload(cgroup)) => format!("the source workload (cgroup {cgroup})"),
        (None, ConnectionOwner::Remote(_)) => format!("the {}", over.owner),
    };
    let reason = format!(
        "{who} holds {} connections through the proxy, the bound (--max-connections-per-workload); refused",
        over.max
    );
    let destination = match (identity, downstream.local_addr()) {
        (Some(i), _) => Endpoint::new(i.addr, None).named(shared.registry.listener(i.addr)),
        (None, Ok(local)) => Endpoint::new(local, None).named(shared.registry.listener(local)),
        (None, Err(_)) => Endpoint::new(peer, None),
    };
    shared.flows.push(FlowRecord {
        reason: Some(reason.clone().into()),
        ..FlowRecord::proxied(
            Verdict::Denied,
            direction,
            Endpoint::new(peer, identity.map(|i| i.cgroup_id)).named(source),
            destination,
            None,
        )
    });
    if let Some(unlogged) = shared.connections.log_refusal(Instant::now()) {
        warn!(owner = %over.owner, max = over.max, unlogged, "{reason}");
    }
}

/// The flow of a connection closed because a new policy version denies it (DENIED) or
/// carries it differently (ALLOWED: the client reconnects and is judged anew).
fn policy_closed_flow(shared: &Shared, peer: SocketAddr, direction: Direction, e: &ConnectionError) {
    let identity = shared.datapath.original_destination(shared.netns_cookie, peer);
    let destination = identity.map(|i| i.addr);
    let verdict = match e {
        ConnectionError::ReroutedByPolicy(_) => Verdict::Allowed,
        _ => Verdict::Denied,
    };
    shared.flows.push(FlowRecord {
        reason: Some(e.to_string().into()),
        ..FlowRecord::proxied(
            verdict,
            direction,
            Endpoint::new(peer, identity.map(|i| i.cgroup_id))
                .named(identity.and_then(|i| shared.registry.workload(i.cgroup_id))),
            match destination {
                Some(d) => Endpoint::new(d, None).named(shared.registry.listener(d)),
                None => Endpoint::new(peer, None),
            },
            None,
        )
    });
}

/// The original destination of an accepted connection, and how it was learned.
struct Target {
    addr: SocketAddr,
    via: &'static str,
    identity: Option<OriginalDestination>,
}

fn egress_target(
    stream: &TcpStream,
    peer: SocketAddr,
    identity: Option<OriginalDestination>,
) -> Result<Target, ConnectionError> {
    match (original_dst_sockopt(stream), identity) {
        (Some(addr), identity) => {
            if let Some(id) = identity {
                if id.addr != addr {
                    warn!(sockopt = %addr, map = %id.addr, "SO_ORIGINAL_DST and the map disagree; using SO_ORIGINAL_DST");
                }
            }
            Ok(Target { addr, via: "getsockopt", identity })
        }
        (None, Some(id)) => Ok(Target { addr: id.addr, via: "map", identity: Some(id) }),
        (None, None) => Err(ConnectionError::NoOriginalDestination(peer)),
    }
}

/// `getsockopt(SO_ORIGINAL_DST)`, answered by the redirector's cgroup/getsockopt program.
fn original_dst_sockopt(stream: &TcpStream) -> Option<SocketAddr> {
    use nix::sys::socket::{getsockopt, sockopt};
    let fd = stream.as_fd();
    match stream.local_addr().ok()? {
        SocketAddr::V4(_) => {
            let sin = getsockopt(&fd, sockopt::OriginalDst).ok()?;
            let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::new(IpAddr::V4(ip), u16::from_be(sin.sin_port)))
        }
        SocketAddr::V6(_) => {
            let sin6 = getsockopt(&fd, sockopt::Ip6tOriginalDst).ok()?;
            let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            let ip = ip.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(ip));
            Some(SocketAddr::new(ip, u16::from_be(sin6.sin6_port)))
        }
    }
}

async fn forward(
    mut downstream: TcpStream,
    peer: SocketAddr,
    direction: Direction,
    identity: Option<OriginalDestination>,
    shared: &Arc<Shared>,
) -> Result<(), ConnectionError> {
    let started = Instant::now();
    let target = match direction {
        Direction::Egress => egress_target(&downstream, peer, identity)?,
        // sk_lookup keeps the packet's own destination: getsockname() is the original.
        Direction::Ingress => Target { addr: downstream.local_addr()?, via: "getsockname", identity: None },
    };
    let proxy_ports = [shared.proxy.egress_port, shared.proxy.ingress_port];
    if proxy_ports.contains(&target.addr.port())
        && (target.addr.ip() == IpAddr::V4(shared.proxy.addr4) || target.addr.ip() == IpAddr::V6(shared.proxy.addr6))
    {
        return Err(ConnectionError::Loop(target.addr));
    }
    let _ = downstream.set_nodelay(true);
    // The client's own address as the upstream leg's source where the node can route the
    // answer back (client_addr.rs).
    let source = crate::client_addr::upstream_source(direction, peer.ip(), target.addr, &shared.proxy);
    let policy_id = target
        .identity
        .map(|i| if i.egress_policy_id != 0 { i.egress_policy_id } else { i.ingress_policy_id })
        .filter(|p| *p != 0);
    let record = |verdict: Verdict, upstream: Option<SocketAddr>, reason: Option<String>| FlowRecord {
        policy: policy_id,
        policy_name: policy_id.and_then(|id| shared.registry.policy_name(id)),
        latency_ns: Some(started.elapsed().as_nanos() as u64),
        reason: reason.map(Reason::Text),
        ..FlowRecord::proxied(
            verdict,
            direction,
            Endpoint::new(peer, target.identity.map(|i| i.cgroup_id))
                .named(target.identity.and_then(|i| shared.registry.workload(i.cgroup_id))),
            Endpoint::new(target.addr, None).named(shared.registry.listener(target.addr)),
            Some(ProxyInfo { original_dst_via: target.via, upstream }),
        )
    };

    // The connection's own upstream leg (Kafka, SNI-forward, opaque), its flow recorded either way.
    let connect_recorded = || async {
        match connect_upstream(target.addr, &shared.proxy, source, shared.pool.connect_timeout()).await {
            Ok(upstream) => {
                let upstream_local = upstream.local_addr().ok();
                shared.flows.push(record(Verdict::Allowed, upstream_local, None));
                Ok((upstream, upstream_local))
            }
            Err(e) => {
                // Neither policy nor a bound refused it: the upstream could not be reached.
                shared.flows.push(record(Verdict::Error, None, Some(e.to_string())));
                Err(ConnectionError::from(e))
            }
        }
    };

    // Which stack: the policy's protocol hint first, else whether the rule tables hold HTTP or
    // gRPC rules for this port (ingress connections from sk_lookup carry no hint).
    let tables = shared.registry.tables();
    if shared.registry.awaiting_policy() {
        // Fail closed: without the policy's tables nothing here could be judged.
        let reason = "l7proxy has no policy from policy-api yet".to_string();
        shared.flows.push(record(Verdict::Denied, None, Some(reason.clone())));
        return Err(ConnectionError::NoPolicy(reason));
    }
    // The destination workload, whose ingress rules apply too: the kernel says whether an
    // egress connection's destination is one; an ingress connection's always is.
    let local_destination = match (direction, target.identity) {
        (Direction::Ingress, _) => true,
        (Direction::Egress, Some(i)) => i.local_destination,
        (Direction::Egress, None) => tables.identity_of(target.addr.ip()) == crate::tables::HOST,
    };
    let dst = if local_destination { shared.registry.local_listener(target.addr).await } else { None };
    // One version judges the connection: the wait above may have seen a newer one, and endpoint
    // ids and identities are numbered afresh in each.
    let tables = shared.registry.tables();
    // To another node's address, where that node serves the tunnel: through it, as the
    // workload, once the workload's egress rules allow the workload listening there (the far
    // node judges its ingress by the identity the tunnel proves). Where the node itself
    // listens and the workload's rules want a stack here, it is judged below and goes direct,
    // as on one node.
    if let (Direction::Egress, Some(i)) = (direction, target.identity) {
        if let Some((node, port, node_identity)) = tables.tunnel_to(target.addr.ip()) {
            let Some(src) = tables.workload(i.cgroup_id) else {
                let reason =
                    format!("the source workload is not in the policy version l7proxy has loaded ({})", tables.version);
                shared.flows.push(record(Verdict::Denied, None, Some(reason.clone())));
                return Err(ConnectionError::NoPolicy(reason));
            };
            let to = crate::tunnel::NodeRef { name: node.to_string(), port, identity: node_identity };
            match crate::tunnel::judge_egress(peer, target.addr, &src, &to, &tables, shared).await {
                crate::tunnel::Egress::Tunnel(opened) => {
                    return crate::tunnel::carry(downstream, peer, target.addr, src, opened, shared)
                        .await
                        .map_err(ConnectionError::Tunnel)
                }
                crate::tunnel::Egress::Refused(reason) => return Err(ConnectionError::Tunnel(reason)),
                crate::tunnel::Egress::Direct => {}
            }
        }
    }
    let conn = ConnInfo {
        direction,
        peer,
        original: target.addr,
        hint: target.identity.map(|i| i.hint).unwrap_or_default(),
        redirected: target.identity.is_some(),
        src: target.identity.and_then(|i| tables.workload(i.cgroup_id)),
        dst: dst.and_then(|w| tables.workload(w.cgroup_id)),
        local_destination: target.identity.is_some_and(|i| i.local_destination),
        requires_policy: shared.registry.requires_policy(),
    };
    let plan = PortPlan::new(&conn, &tables);
    let ConnInfo { src, dst, .. } = conn;
    match plan.refusal {
        None => {}
        Some(Refusal::UnknownWorkload { version }) => {
            // Which party the version lacks: an egress connection's source, or its destination
            // (a local server registered after these tables); an ingress connection's server.
            let party = match direction {
                Direction::Egress if src.is_none() => "source",
                _ => "destination",
            };
            let reason = format!("the {party} workload is not in the policy version l7proxy has loaded ({version})");
            shared.flows.push(record(Verdict::Denied, None, Some(reason.clone())));
            return Err(ConnectionError::NoPolicy(reason));
        }
        Some(Refusal::NoParties(reason)) => return Err(ConnectionError::NoPolicy(reason)),
        Some(Refusal::TlsUnsupported) => {
            shared.flows.push(record(Verdict::Denied, None, Some(TLS_UNSUPPORTED.into())));
            return Err(ConnectionError::TlsUnsupported(target.addr));
        }
        Some(Refusal::KafkaInsideTls) => {
            shared.flows.push(record(Verdict::Denied, None, Some(KAFKA_INSIDE_TLS.into())));
            return Err(ConnectionError::KafkaInsideTls(target.addr));
        }
    }
    let parties = &plan.parties;
    if plan.tls() {
        let originate = match &plan.originate {
            None => None,
            Some(secret) => match shared.certs.client_config(secret.as_ref()).await {
                Ok(config) => Some(crate::tls::Originate {
                    config,
                    server_name: plan.server_name.clone(),
                    settings: secret.as_ref().map(|s| format!("{}/{}", s.namespace, s.name)).unwrap_or_default(),
                }),
                Err(e) => {
                    let reason = format!("TLS origination: {e}");
                    shared.flows.push(record(Verdict::Denied, None, Some(reason.clone())));
                    return Err(ConnectionError::Tls { addr: target.addr, reason });
                }
            },
        };
        let use_http = matches!(plan.stack, Stack::Http | Stack::Grpc);
        let mut server_name = None;
        let downstream: Box<dyn crate::pool::Io> = match plan.terminate.clone() {
            Some(secret) => {
                let alpn = match plan.stack {
                    Stack::Grpc => crate::tls::Alpn::Grpc,
                    Stack::Http => crate::tls::Alpn::Http,
                    _ => crate::tls::Alpn::Opaque,
                };
                match terminate(downstream, secret, alpn, &tables, &target, parties, shared).await {
                    Ok(tls) => {
                        server_name = tls.get_ref().1.server_name().map(str::to_owned);
                        Box::new(tls)
                    }
                    Err(reason) => {
                        shared.flows.push(record(Verdict::Denied, None, Some(reason.clone())));
                        return Err(ConnectionError::Tls { addr: target.addr, reason });
                    }
                }
            }
            None => Box::new(downstream),
        };
        if use_http {
            shared.flows.push(record(Verdict::Allowed, None, None));
            debug!(original = %target.addr, via = target.via, "TLS; HTTP stack");
            let mut conn = HttpConnection::new(shared.clone(), direction, peer, target.addr, target.via, src, dst);
            conn.originate = originate;
            if plan.terminate.is_some() {
                conn.scheme = "https";
                conn.server_name = server_name;
            }
            return crate::http::serve(downstream, Arc::new(conn)).await.map_err(ConnectionError::Http);
        }
        let upstream_tls = originate.map(|o| crate::pool::UpstreamTls {
            config: o.config,
            server_name: o.server_name.unwrap_or_else(|| target.addr.ip().to_string()),
            settings: o.settings,
            metrics: shared.metrics.clone(),
        });
        let (mut upstream, upstream_local) = match crate::pool::connect(
            target.addr,
            &shared.proxy,
            source,
            upstream_tls.as_ref(),
            None,
            shared.pool.connect_timeout(),
        )
        .await
        {
            Ok(s) => s,
            Err(reason) => {
                shared.flows.push(record(Verdict::Denied, None, Some(reason.clone())));
                return Err(ConnectionError::Tls { addr: target.addr, reason });
            }
        };
        shared.flows.push(record(Verdict::Allowed, upstream_local, None));
        let mut downstream = downstream;
        tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await?;
        return Ok(());
    }
    // serverNames: the ClientHello's SNI is judged, then the connection is forwarded untouched.
    if plan.judge_sni {
        let port = target.addr.port();
        let refusal = match crate::sni::peek_server_name(&downstream, SNIFF_TIMEOUT).await {
            Ok(sni) if tables.decide_sni(parties, port, sni.as_deref()).allows() => {
                debug!(sni = sni.as_deref().unwrap_or(""), "server name allowed");
                None
            }
            Ok(sni) => Some(sni_refusal(sni.as_deref())),
            Err(e) => Some(e.to_string()),
        };
        shared.metrics.tls("server_names", if refusal.is_none() { "ok" } else { "denied" });
        if let Some(reason) = refusal {
            shared.flows.push(record(Verdict::Denied, None, Some(reason.clone())));
            return Err(ConnectionError::ServerName { addr: target.addr, reason });
        }
    }
    match plan.stack {
        Stack::Kafka => {
            let (upstream, upstream_local) = connect_recorded().await?;
            debug!(original = %target.addr, via = target.via, "Kafka stack");
            let conn = Arc::new(crate::kafka::KafkaConnection {
                shared: shared.clone(),
                direction,
                peer,
                target: target.addr,
                via: target.via,
                src,
                dst,
                upstream_local,
            });
            return crate::kafka::serve(downstream, upstream, conn)
                .await
                .map_err(|e| ConnectionError::Kafka(e.to_string()));
        }
        // Sniff: what is not HTTP on a port with HTTP rules passes opaquely only where the policy
        // allows it at L4 (an L3/L4 allow of this peer on this port), and is closed otherwise.
        Stack::Http | Stack::Grpc => {
            if looks_like_http(&downstream).await {
                // Upstream connections come from the pool, per request; each request's flow
                // names the one it used.
                shared.flows.push(record(Verdict::Allowed, None, None));
                debug!(original = %target.addr, via = target.via, "HTTP stack");
                let conn =
                    Arc::new(HttpConnection::new(shared.clone(), direction, peer, target.addr, target.via, src, dst));
                return crate::http::serve(downstream, conn).await.map_err(ConnectionError::Http);
            }
            if !plan.opaque_fallback {
                shared.flows.push(record(Verdict::Denied, None, Some("not HTTP on a port with HTTP rules".into())));
                return Err(ConnectionError::NotHttp(target.addr));
            }
        }
        Stack::SniForward | Stack::Opaque => {}
    }

    let (mut upstream, _) = connect_recorded().await?;
    if shared.client_address.proxy_protocol_ports.contains(&target.addr.port()) {
        // Opted in for this port (--proxy-protocol-ports): the backend reads who the client
        // was, and where it connected, before the client's first byte.
        use tokio::io::AsyncWriteExt as _;
        upstream.write_all(&crate::client_addr::proxy_v2_header(peer, target.addr)).await?;
    }
    debug!(original = %target.addr, via = target.via, "forwarding");
    let (up, down) = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await?;
    debug!(bytes_up = up, bytes_down = down, "closed");
    Ok(())
}

/// Why a ClientHello's server name (or its lack) is refused by serverNames.
fn sni_refusal(sni: Option<&str>) -> String {
    match sni {
        Some(sni) => format!("TLS server name `{sni}` is not in the policy's serverNames"),
        None => "the TLS ClientHello names no server (no SNI); serverNames need one".to_string(),
    }
}

/// Terminates TLS on `downstream`: reads the ClientHello, judges its SNI against the parties'
/// serverNames, gets the certificate (the secret's, else one minted for the SNI or, without
/// one, the destination IP) and completes the handshake. Err is the flow's reason.
async fn terminate(
    downstream: TcpStream,
    secret: Option<crate::tables::SecretName>,
    alpn: crate::tls::Alpn,
    tables: &crate::tables::Tables,
    target: &Target,
    parties: &[crate::tables::Party],
    shared: &Shared,
) -> Result<tokio_rustls::server::TlsStream<TcpStream>, String> {
    let acceptor = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), downstream);
    let start = match tokio::time::timeout(SNIFF_TIMEOUT, acceptor).await {
        Ok(Ok(start)) => start,
        Ok(Err(e)) => {
            shared.metrics.tls("terminate", "failed");
            return Err(format!("TLS ClientHello refused: {e}"));
        }
        Err(_) => return Err(format!("no complete TLS ClientHello within {SNIFF_TIMEOUT:?}")),
    };
    let sni = start.client_hello().server_name().map(str::to_owned);
    if !tables.decide_sni(parties, target.addr.port(), sni.as_deref()).allows() {
        shared.metrics.tls("terminate", "denied");
        return Err(sni_refusal(sni.as_deref()));
    }
    let key = match secret {
        Some(secret) => crate::tls::CertKey::Secret(secret),
        None => crate::tls::CertKey::Minted(sni.unwrap_or_else(|| target.addr.ip().to_string())),
    };
    let config = shared.certs.server_config(&key).await.map_err(|e| {
        shared.metrics.tls("terminate", "failed");
        format!("{key}: {e}")
    })?;
    let handshake = tokio::time::timeout(SNIFF_TIMEOUT, start.into_stream(crate::tls::with_alpn(&config, alpn)));
    let done = handshake.await;
    shared.metrics.tls("terminate", if matches!(done, Ok(Ok(_))) { "ok" } else { "failed" });
    match done {
        Ok(Ok(tls)) => Ok(tls),
        Ok(Err(e)) => Err(format!("TLS handshake: {e}")),
        Err(_) => Err(format!("TLS handshake not done within {SNIFF_TIMEOUT:?}")),
    }
}

/// How long a client has to say its first bytes on a port with HTTP rules.
pub const SNIFF_TIMEOUT: Duration = Duration::from_secs(5);

/// Peeks at the first bytes: an HTTP/1 request line (a method token and a space) or the HTTP/2
/// connection preface.
async fn looks_like_http(stream: &TcpStream) -> bool {
    let mut buf = [0u8; 24];
    let n = match tokio::time::timeout(SNIFF_TIMEOUT, stream.peek(&mut buf)).await {
        Ok(Ok(n)) => n,
        _ => return false,
    };
    is_http_start(&buf[..n], n == buf.len())
}

/// Whether the first bytes a client sent start HTTP/1 or HTTP/2 (`full`: as many as were
/// asked for). Leading empty lines are skipped, as HTTP/1 servers do (RFC 9112, 2.2): a request
/// behind a CRLF is still a request, not opaque bytes that pass unjudged. A method is upper
/// case letters and `-` (the registered methods' spelling).
fn is_http_start(head: &[u8], full: bool) -> bool {
    if head.starts_with(b"PRI * HTTP/2.0") || (!head.is_empty() && b"PRI * HTTP/2.0".starts_with(head)) {
        return true;
    }
    let start = head.iter().position(|b| *b != b'\r' && *b != b'\n');
    let Some(start) = start else {
        // Only empty lines so far: the HTTP stack reads on (and answers 400 to what follows
        // if it is no request).
        return !head.is_empty();
    };
    let head = &head[start..];
    let method_char = |b: &u8| b.is_ascii_uppercase() || *b == b'-';
    match head.iter().position(|b| *b == b' ') {
        Some(i) => i > 0 && head[..i].iter().all(method_char),
        // A method token still arriving (very short first segment).
        None => !full && head.iter().all(method_char),
    }
}

#[cfg(test)]
mod sniff_tests {
    use super::is_http_start;

    #[test]
    fn requests_are_http_whatever_precedes_or_spells_them() {
        for head in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"\r\nGET / HTTP/1.1",
            b"\r\n\r\nPOST /x",
            b"\nDELETE /",
            b"M-SEARCH * HTTP/1.1",
        ] {
            assert!(is_http_start(head, true), "{:?}", String::from_utf8_lossy(head));
        }
        assert!(is_http_start(b"PRI * HTTP/2.0\r\n\r\nSM", true));
        assert!(is_http_start(b"GE", false), "a method still arriving");
        assert!(is_http_start(b"\r\n", false), "empty lines so far: the HTTP stack decides");
    }

    #[test]
    fn other_protocols_are_not() {
        for head in [
            &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..],
            b"\x00\x00\x00\x2a\x00\x03",
            b"SSH-2.0-OpenSSH_9.2\r\n",
            b"hello from the peer",
        ] {
            assert!(!is_http_start(head, true), "{:?}", String::from_utf8_lossy(head));
        }
        assert!(!is_http_start(b"", false));
    }
}

#[cfg(test)]
mod failure_reason_tests {
    use super::*;

    /// Every error's reason is one of the reasons exported from the start.
    #[test]
    fn every_reason_is_listed() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let all = [
            ConnectionError::NoOriginalDestination(a),
            ConnectionError::Loop(a),
            ConnectionError::NoPolicy(String::new()),
            ConnectionError::ClosedByPolicy(1),
            ConnectionError::ReroutedByPolicy(1),
            ConnectionError::Upstream { addr: a, source: io::Error::other("x") },
            ConnectionError::UpstreamTimeout(a),
            ConnectionError::Io(io::Error::other("x")),
            ConnectionError::Http(String::new()),
            ConnectionError::Kafka(String::new()),
            ConnectionError::NotHttp(a),
            ConnectionError::TlsUnsupported(a),
            ConnectionError::KafkaInsideTls(a),
            ConnectionError::ServerName { addr: a, reason: String::new() },
            ConnectionError::Tls { addr: a, reason: String::new() },
            ConnectionError::OverConnectionBound(OverConnectionBound { owner: ConnectionOwner::Workload(1), max: 1 }),
            ConnectionError::Tunnel(String::new()),
        ];
        let reasons: Vec<&str> = all.iter().map(|e| e.reason()).collect();
        assert_eq!(reasons, FAILURE_REASONS);
    }
}

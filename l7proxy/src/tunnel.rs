//! The tunnel between node proxies (as Istio ambient's HBONE): mutual TLS on
//! `l7mesh_api::layout::TUNNEL_PORT`, HTTP/2, one `CONNECT <original destination>` stream per
//! tunnelled connection.
//!
//! - Out (`carry`): a connection a local workload made to another node's address, which the
//!   kernel redirected here, goes to that node's tunnel port presenting the *workload's*
//!   certificate (`spiffe://<td>/ns/<namespace>/sa/<workload>`, issued by this node's broker
//!   from this node's intermediate), and accepts only a server whose chain names the node it
//!   dialled (its intermediate's `spiffe://<td>/node/<name>`) and the node proxy's identity.
//! - In (`serve`): the peer's chain must verify to the cluster's root; its identity is the
//!   workload of the leaf *on the node of the intermediate* (a node can only speak for its own
//!   workloads), looked up in this version's tables (its labels came from the kvstore: a
//!   workload that is not registered there has no identity here and is refused). The stream's
//!   destination must be one of this node's workloads; its ingress rules judge it at L4 (the
//!   kernel's fold, for the identity the tunnel proved), and at L7 through the HTTP stack.
//!
//! Refusals are answered on the CONNECT stream (403 with `l7mesh-denied: <why>`, 503 when
//! nothing listens) and recorded as flows on both nodes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt as _, Empty, Full};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use l7mesh_api::broker::Request;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use crate::context::{Direction, Shared};
use crate::flows::{Endpoint, FlowRecord, ProxyInfo, Reason};
use crate::registry::WorkloadInfo;
use l7mesh_api::Verdict;

/// The header a refusal names its reason in.
pub const DENIED_HEADER: &str = "l7mesh-denied";
/// How long a tunnel's TLS handshake and CONNECT may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Source workloads whose tunnel identity is kept at once.
const MAX_CLIENT_IDENTITIES: usize = 4096;
/// Tunnel connections (from other nodes' proxies) served at once.
const MAX_TUNNEL_CONNECTIONS: usize = 4096;
/// Of which from one address (one node: its proxy opens one per tunnelled connection).
const MAX_TUNNEL_CONNECTIONS_PER_ADDRESS: usize = 1024;
/// A TLS handshake that takes longer is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a fetched identity is used before it is fetched again (well inside a leaf's life).
const IDENTITY_REFRESH: Duration = Duration::from_secs(600);

pub use l7mesh_identity::node_server_name;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

// (rustls-pki-types reads PEM itself: no pemfile crate.)
fn pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject as _;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificates: {e}"))
}

fn pem_key(pem: &str) -> Result<PrivateKeyDer<'static>, String> {
    use rustls::pki_types::pem::PemObject as _;
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| format!("key: {e}"))
}

/// A TLS config of the tunnel with the trust it checks peers against.
pub struct Trusted<T> {
    pub config: T,
    pub trust_domain: String,
    /// The cluster root (DER): a peer's chain is proven again along the path it names.
    pub root: Vec<u8>,
}

fn roots(root_pem: &str) -> Result<(rustls::RootCertStore, String, Vec<u8>), String> {
    let certs = pem_certs(root_pem)?;
    let [root] = certs.as_slice() else {
        return Err(format!("the broker gave {} cluster roots, not one", certs.len()));
    };
    let mut store = rustls::RootCertStore::empty();
    store.add(root.clone()).map_err(|e| format!("the cluster root: {e}"))?;
    let td =
        l7mesh_identity::trust_domain_of(root).map_err(|_| "the cluster root names no trust domain".to_string())?;
    Ok((store, td, root.to_vec()))
}

/// An identity fetched from the broker, with when it was fetched.
struct Fetched<T> {
    value: Arc<T>,
    at: Instant,
}

/// A source workload's client config, by (namespace, name).
type ClientConfigs = std::collections::HashMap<(String, String), Fetched<Trusted<rustls::ClientConfig>>>;

/// The node's tunnel identities: the node proxy's server config, and one client config per
/// source workload, fetched from the broker and kept for [`IDENTITY_REFRESH`].
#[derive(Default)]
pub struct Identities {
    server: tokio::sync::Mutex<Option<Fetched<Trusted<rustls::ServerConfig>>>>,
    clients: tokio::sync::Mutex<ClientConfigs>,
}

impl Identities {
    /// The node proxy's TLS server config (client certificates required, verified to the
    /// cluster's root) and the trust domain.
    pub async fn server(&self, shared: &Shared) -> Result<Arc<Trusted<rustls::ServerConfig>>, String> {
        let mut slot = self.server.lock().await;
        if let Some(f) = slot.as_ref().filter(|f| f.at.elapsed() < IDENTITY_REFRESH) {
            return Ok(f.value.clone());
        }
        match Self::fetch_server(shared).await {
            Ok(value) => {
                *slot = Some(Fetched { value: value.clone(), at: Instant::now() });
                Ok(value)
            }
            // A broker that is away: the one held keeps serving (its leaf lives far longer).
            Err(e) => match slot.as_ref() {
                Some(f) => {
                    warn!(error = %e, "the tunnel's server identity could not be refreshed; the one held serves on");
                    Ok(f.value.clone())
                }
                None => Err(e),
            },
        }
    }

    async fn fetch_server(shared: &Shared) -> Result<Arc<Trusted<rustls::ServerConfig>>, String> {
        let reply = shared
            .certs
            .ask_broker(Request::IssueWorkload {
                namespace: l7mesh_identity::PROXY_NAMESPACE.into(),
                name: l7mesh_identity::PROXY_NAME.into(),
            })
            .await
            .map_err(|e| e.to_string())?;
        let (chain, key, root) =
            (reply.cert.unwrap_or_default(), reply.key.unwrap_or_default(), reply.ca.unwrap_or_default());
        let (store, td, root) = roots(&root)?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider())
            .build()
            .map_err(|e| format!("client verifier: {e}"))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(verifier)
            .with_single_cert(pem_certs(&chain)?, pem_key(&key)?)
            .map_err(|e| format!("the node proxy's certificate: {e}"))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(Trusted { config, trust_domain: td, root }))
    }

    /// The TLS client config presenting workload `namespace/name`'s identity, and the trust
    /// domain.
    pub async fn client(
        &self,
        shared: &Shared,
        namespace: &str,
        name: &str,
    ) -> Result<Arc<Trusted<rustls::ClientConfig>>, String> {
        let key = (namespace.to_string(), name.to_string());
        let mut clients = self.clients.lock().await;
        if let Some(f) = clients.get(&key).filter(|f| f.at.elapsed() < IDENTITY_REFRESH) {
            return Ok(f.value.clone());
        }
        let fetched = async {
            let reply = shared
                .certs
                .ask_broker(Request::IssueWorkload { namespace: namespace.into(), name: name.into() })
                .await
                .map_err(|e| e.to_string())?;
            let (chain, pkey, root) =
                (reply.cert.unwrap_or_default(), reply.key.unwrap_or_default(), reply.ca.unwrap_or_default());
            let (store, td, root) = roots(&root)?;
            let mut config = rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(store)
                .with_client_auth_cert(pem_certs(&chain)?, pem_key(&pkey)?)
                .map_err(|e| format!("workload {namespace}/{name}'s certificate: {e}"))?;
            config.alpn_protocols = vec![b"h2".to_vec()];
            Ok::<_, String>(Arc::new(Trusted { config, trust_domain: td, root }))
        };
        let value = match fetched.await {
            Ok(v) => v,
            // A broker that is away: the identity held serves on (its leaf lives far longer).
            Err(e) => match clients.get(&key) {
                Some(f) => {
                    warn!(error = %e, workload = %format!("{namespace}/{name}"), "a tunnel identity could not be refreshed; the one held serves on");
                    return Ok(f.value.clone());
                }
                None => return Err(e),
            },
        };
        if clients.len() >= MAX_CLIENT_IDENTITIES {
            // The one fetched longest ago goes (one workload's churn never empties the rest).
            if let Some(oldest) = clients.iter().min_by_key(|(_, f)| f.at).map(|(k, _)| k.clone()) {
                clients.remove(&oldest);
            }
        }
        clients.insert(key, Fetched { value: value.clone(), at: Instant::now() });
        Ok(value)
    }
}

/// Another node, as this version knows it: where its tunnel is and its addresses' identity.
pub struct NodeRef {
    pub name: String,
    pub port: u16,
    pub identity: u32,
}

/// What a local workload's connection to another node's address becomes.
pub enum Egress {
    /// Through that node's tunnel (its HTTP/2 connection open, as the workload).
    Tunnel(Opened),
    /// The node itself listens there (no workload) and the workload's rules want one of this
    /// proxy's stacks: judged here and carried direct, as on one node.
    Direct,
    /// Refused; the flow is recorded.
    Refused(String),
}

/// A tunnel opened for one connection.
pub struct Opened {
    sender: hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    node: String,
    /// The far node's workload listening where the connection goes (none: the node's own).
    dst: Option<Arc<WorkloadInfo>>,
}

/// A local workload's connection to another node, as its flows name it.
struct EgressLeg<'a> {
    peer: SocketAddr,
    target: SocketAddr,
    src: &'a Arc<WorkloadInfo>,
    started: Instant,
}

impl EgressLeg<'_> {
    fn record(
        &self,
        verdict: Verdict,
        dst: Option<Arc<WorkloadInfo>>,
        policy: Option<(u32, Option<Arc<str>>)>,
        reason: String,
    ) -> FlowRecord {
        FlowRecord {
            latency_ns: Some(self.started.elapsed().as_nanos() as u64),
            reason: Some(Reason::Text(reason)),
            policy: policy.as_ref().map(|p| p.0),
            policy_name: policy.and_then(|p| p.1),
            ..FlowRecord::proxied(
                verdict,
                Direction::Egress,
                Endpoint::new(self.peer, Some(self.src.cgroup_id)).named(Some(self.src.clone())),
                Endpoint::new(self.target, None).named(dst),
                Some(ProxyInfo { original_dst_via: "tunnel", upstream: None }),
            )
        }
    }
}

/// Judges `src`'s egress to `target` on node `node`: opens the node's tunnel as the workload,
/// asks which of its workloads listens there when `src`'s egress rules could tell its workloads
/// apart (the address is the node's, shared by all of them), and folds those rules for that
/// workload (else the node) as the kernel would have for a workload's own address.
pub async fn judge_egress(
    peer: SocketAddr,
    target: SocketAddr,
    src: &Arc<WorkloadInfo>,
    node: &NodeRef,
    tables: &crate::tables::Tables,
    shared: &Arc<Shared>,
) -> Egress {
    let leg = EgressLeg { peer, target, src, started: Instant::now() };
    let setup = async {
        let trusted = shared
            .tunnel
            .client(shared, &src.namespace, &src.name)
            .await
            .map_err(|e| format!("the tunnel identity of {}/{}: {e}", src.namespace, src.name))?;
        let mut sender = dial(shared, &trusted, &node.name, target.ip(), node.port)
            .await
            .map_err(|e| format!("node {}'s tunnel: {e}", node.name))?;
        if !tables.tunnel_egress_judged(src.endpoint_id) {
            return Ok((sender, None, l7rules::L4Decision::Allow));
        }
        let listener = ask_listener(&mut sender, &node.name, target).await?;
        let dst = match listener.workload {
            None => None,
            Some((namespace, name)) => match tables.remote_workload(&node.name, &name) {
                Some(w) if w.namespace == namespace => Some(w),
                _ => {
                    return Err(format!(
                        "node {} says {namespace}/{name} listens on {target}, a workload policy version {} does not list there",
                        node.name, tables.version
                    ))
                }
            },
        };
        let decision = tables.tunnel_egress(src.endpoint_id, node.identity, dst.as_deref(), target.port());
        Ok::<_, String>((sender, dst, decision))
    };
    let refused = |reason: String, dst: Option<Arc<WorkloadInfo>>, policy: Option<(u32, Option<Arc<str>>)>| {
        shared.flows.push(leg.record(Verdict::Denied, dst, policy, reason.clone()));
        Egress::Refused(reason)
    };
    let (sender, dst, decision) = match tokio::time::timeout(SETUP_TIMEOUT, setup).await {
        Ok(Ok(opened)) => opened,
        Ok(Err(e)) => return refused(e, None, None),
        Err(_) => {
            return refused(format!("node {}'s tunnel did not open within {SETUP_TIMEOUT:?}", node.name), None, None)
        }
    };
    let to = match &dst {
        Some(d) => format!("{}/{} on node {}", d.namespace, d.name, node.name),
        None => format!("node {}", node.name),
    };
    match decision {
        l7rules::L4Decision::Deny { policy_id } => {
            let name = shared.registry.policy_name(policy_id);
            let by = name.as_ref().map(|p| format!("policy {p}")).unwrap_or_else(|| "default deny".into());
            let policy = (policy_id != 0).then_some((policy_id, name));
            refused(format!("{}/{}'s egress to {to} on port {} ({by})", src.namespace, src.name, target.port()), dst, policy)
        }
        l7rules::L4Decision::Allow | l7rules::L4Decision::Audit => {
            Egress::Tunnel(Opened { sender, node: node.name.clone(), dst })
        }
        l7rules::L4Decision::Redirect(_) if dst.is_none() => Egress::Direct,
        l7rules::L4Decision::Redirect(_) => refused(
            format!(
                "{}/{}'s egress rules to {to} on port {} are L7 rules, which are not judged on the way into the tunnel yet (fail closed)",
                src.namespace,
                src.name,
                target.port()
            ),
            dst,
            None,
        ),
    }
}

/// Which workload listens at `target` on node `node` (asked on the tunnel's connection before
/// the CONNECT: nothing reaches the listener unless the answer's rules allow it).
async fn ask_listener(
    sender: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    node: &str,
    target: SocketAddr,
) -> Result<l7mesh_api::cluster::TunnelListener, String> {
    let uri = format!("https://{}{LISTENER_PATH}?addr={target}", node_server_name(node));
    let req = hyper::Request::get(uri).body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| format!("node {node}'s tunnel: {e}"))?;
    let status = resp.status();
    let why = resp.headers().get(DENIED_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string);
    let body = http_body_util::Limited::new(resp.into_body(), MAX_LISTENER_BYTES)
        .collect()
        .await
        .map_err(|e| format!("node {node}'s answer of who listens on {target}: {e}"))?
        .to_bytes();
    if status != hyper::StatusCode::OK {
        return Err(format!("node {node}: {}", why.unwrap_or_else(|| format!("answered {status}"))));
    }
    serde_json::from_slice(&body).map_err(|e| format!("node {node}'s answer of who listens on {target}: {e}"))
}

/// Carries `downstream` (a local workload's connection to `target`) through the tunnel
/// `opened`. The flow says what the far node answered.
pub async fn carry(
    mut downstream: TcpStream,
    peer: SocketAddr,
    target: SocketAddr,
    src: Arc<WorkloadInfo>,
    opened: Opened,
    shared: &Arc<Shared>,
) -> Result<(), String> {
    let leg = EgressLeg { peer, target, src: &src, started: Instant::now() };
    let Opened { mut sender, node, dst } = opened;
    let record = |verdict: Verdict, reason: String| leg.record(verdict, dst.clone(), None, reason);
    let setup = async {
        let req = hyper::Request::builder()
            .method(hyper::Method::CONNECT)
            .uri(target.to_string())
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| format!("node {node}'s tunnel: CONNECT: {e}"))?;
        if resp.status() != hyper::StatusCode::OK {
            let why = resp
                .headers()
                .get(DENIED_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
                .unwrap_or_else(|| format!("answered {}", resp.status()));
            return Err(format!("node {node}: {why}"));
        }
        hyper::upgrade::on(resp).await.map_err(|e| format!("node {node}'s tunnel: {e}"))
    };
    let upgraded = match tokio::time::timeout(SETUP_TIMEOUT, setup).await {
        Ok(Ok(u)) => u,
        Ok(Err(e)) => {
            shared.flows.push(record(Verdict::Denied, e.clone()));
            return Err(e);
        }
        Err(_) => {
            let e = format!("node {node}'s tunnel did not open within {SETUP_TIMEOUT:?}");
            shared.flows.push(record(Verdict::Denied, e.clone()));
            return Err(e);
        }
    };
    shared.flows.push(record(Verdict::Allowed, format!("through node {node}'s tunnel")));
    let mut upgraded = TokioIo::new(upgraded);
    let _ = tokio::io::copy_bidirectional(&mut downstream, &mut upgraded).await;
    Ok(())
}

/// Serves the tunnel on `listener` until the process ends.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    info!(addr = ?listener.local_addr().ok(), "tunnel between nodes listening (mutual TLS, HTTP/2 CONNECT)");
    // Tunnel connections at once (each carries many streams): past the bound, a new one waits
    // in the kernel's backlog rather than take descriptors from the node's workloads.
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_TUNNEL_CONNECTIONS));
    let per_peer: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>> = Arc::default();
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let (tcp, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors, say: not a busy loop.
                warn!(error = %e, "tunnel accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // One address holds a bounded share (a host that opens connections and never
        // handshakes must not take the tunnel from every other node).
        {
            let mut held = per_peer.lock().unwrap_or_else(|e| e.into_inner());
            let n = held.entry(peer.ip()).or_insert(0);
            if *n >= MAX_TUNNEL_CONNECTIONS_PER_ADDRESS {
                debug!(%peer, "tunnel: too many connections from this address");
                continue;
            }
            *n += 1;
        }
        let shared = shared.clone();
        let per_peer = per_peer.clone();
        tokio::spawn(async move {
            let _slot = slot;
            struct Release(Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>, std::net::IpAddr);
            impl Drop for Release {
                fn drop(&mut self) {
                    let mut held = self.0.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(n) = held.get_mut(&self.1) {
                        *n -= 1;
                        if *n == 0 {
                            held.remove(&self.1);
                        }
                    }
                }
            }
            let _release = Release(per_peer, peer.ip());
            if let Err(e) = accept(tcp, peer, &shared).await {
                debug!(%peer, error = %e, "tunnel connection refused");
            }
        });
    }
}

async fn accept(tcp: TcpStream, peer: SocketAddr, shared: &Arc<Shared>) -> Result<(), String> {
    let trusted = shared.tunnel.server(shared).await?;
    let handshake = tokio_rustls::TlsAcceptor::from(Arc::new(trusted.config.clone())).accept(tcp);
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            shared.metrics.tls("tunnel", "refused");
            return Err(format!("TLS: {e}"));
        }
        Err(_) => return Err("TLS handshake timed out".into()),
    };
    shared.metrics.tls("tunnel", "ok");
    let chain: Vec<&[u8]> =
        tls.get_ref().1.peer_certificates().unwrap_or_default().iter().map(|c| c.as_ref()).collect();
    let id = l7mesh_identity::peer_identity(&chain, &trusted.root, &trusted.trust_domain);
    let shared2 = shared.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let (shared, id) = (shared2.clone(), id.clone());
        async move { Ok::<_, std::convert::Infallible>(stream(req, peer, id, shared).await) }
    });
    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .max_concurrent_streams(shared.limits.max_concurrent_streams)
        // A peer that stops answering is dropped (its streams with it).
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10))
        .serve_connection(TokioIo::new(tls), service)
        .await
        .map_err(|e| format!("HTTP/2: {e}"))
}

fn refuse(status: hyper::StatusCode, why: &str) -> hyper::Response<Full<Bytes>> {
    let mut r = hyper::Response::new(Full::new(Bytes::new()));
    *r.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(why) {
        r.headers_mut().insert(DENIED_HEADER, v);
    }
    r
}

/// One CONNECT stream: judged, then carried (opaque) or handed to the HTTP stack.
async fn stream(
    mut req: hyper::Request<hyper::body::Incoming>,
    peer: SocketAddr,
    id: Result<l7mesh_identity::PeerIdentity, String>,
    shared: Arc<Shared>,
) -> hyper::Response<Full<Bytes>> {
    let started = Instant::now();
    if req.method() == hyper::Method::GET && req.uri().path() == FLOWS_PATH {
        return flows_for_a_node(&req, &id, &shared);
    }
    let target: Option<SocketAddr> = req.uri().authority().and_then(|a| a.as_str().parse().ok());
    let tables = shared.registry.tables();
    let known = id
        .as_ref()
        .ok()
        .and_then(|id| tables.remote_workload(&id.node, &id.name).filter(|w| w.namespace == id.namespace));
    if req.method() == hyper::Method::GET && req.uri().path() == LISTENER_PATH {
        return listener_for_a_node(&req, &id, known.is_some(), &tables, &shared).await;
    }
    let record = |verdict: Verdict, dst: Option<Arc<WorkloadInfo>>, reason: String| FlowRecord {
        latency_ns: Some(started.elapsed().as_nanos() as u64),
        reason: Some(Reason::Text(reason)),
        ..FlowRecord::proxied(
            verdict,
            Direction::Ingress,
            Endpoint::new(peer, known.as_ref().map(|w| w.cgroup_id)).named(known.clone()),
            match target {
                Some(t) => Endpoint::new(t, None).named(dst),
                None => Endpoint::new(peer, None),
            },
            Some(ProxyInfo { original_dst_via: "tunnel", upstream: None }),
        )
    };
    let deny = |status, why: String, dst: Option<Arc<WorkloadInfo>>| {
        shared.flows.push(record(Verdict::Denied, dst, why.clone()));
        refuse(status, &why)
    };
    if req.method() != hyper::Method::CONNECT {
        return deny(hyper::StatusCode::METHOD_NOT_ALLOWED, "the tunnel carries CONNECT only".into(), None);
    }
    let Some(target) = target else {
        return deny(hyper::StatusCode::BAD_REQUEST, "CONNECT names no IP:port".into(), None);
    };
    let id = match id {
        Ok(id) => id,
        Err(e) => return deny(hyper::StatusCode::FORBIDDEN, format!("the peer's identity: {e}"), None),
    };
    let Some(src) = known.clone() else {
        return deny(
            hyper::StatusCode::FORBIDDEN,
            format!("{id} is not a workload the cluster lists (in this node's policy version {})", tables.version),
            None,
        );
    };
    let Some(target) = this_nodes(target, &tables) else {
        return deny(hyper::StatusCode::FORBIDDEN, format!("{target} is not an address of this node"), None);
    };
    let port = target.port();
    let dst = shared.registry.local_listener(target).await.and_then(|w| tables.workload(w.cgroup_id));
    // What the connection would have met arriving directly from the peer's node: a workload's
    // ingress rules (judged below for the workload the tunnel proved), or, where no workload
    // listens, the node's own service, which no policy selects (carried as it would have been).
    let decision = match &dst {
        Some(dst) => tables.tunnel_ingress(dst.endpoint_id, &src, port),
        None => l7rules::L4Decision::Allow,
    };
    let l7 = match decision {
        l7rules::L4Decision::Deny { policy_id } => {
            let by = shared
                .registry
                .policy_name(policy_id)
                .map(|p| format!("policy {p}"))
                .unwrap_or_else(|| "default deny".into());
            let d = dst.clone().expect("a deny is a workload's");
            return deny(
                hyper::StatusCode::FORBIDDEN,
                format!("{}/{}'s ingress on port {port} ({by})", d.namespace, d.name),
                dst,
            );
        }
        l7rules::L4Decision::Allow | l7rules::L4Decision::Audit => false,
        l7rules::L4Decision::Redirect(_) => true,
    };
    let mut stack = None;
    if let (true, Some(dst)) = (l7, &dst) {
        // What the stacks can carry here: HTTP, gRPC and Kafka rules; not TLS rules yet (the
        // tunnel's own TLS ends here, the workload's would have to be terminated again).
        let conn = crate::plan::ConnInfo {
            direction: Direction::Ingress,
            peer,
            original: target,
            hint: Default::default(),
            redirected: false,
            src: Some(src.clone()),
            dst: Some(dst.clone()),
            local_destination: true,
            requires_policy: true,
        };
        let plan = crate::plan::PortPlan::new(&conn, &tables);
        let unsupported = match (&plan.refusal, plan.stack) {
            (Some(r), _) => Some(format!("{r:?}")),
            (None, _) if plan.tls() || plan.judge_sni => {
                Some("TLS rules through the tunnel are not supported yet (fail closed)".into())
            }
            (None, s @ (crate::plan::Stack::Http | crate::plan::Stack::Grpc | crate::plan::Stack::Kafka)) => {
                stack = Some(s);
                None
            }
            (None, s) => Some(format!("{s:?} rules through the tunnel are not supported yet (fail closed)")),
        };
        if let Some(why) = unsupported {
            return deny(hyper::StatusCode::FORBIDDEN, why, Some(dst.clone()));
        }
    }
    // The source workload's share of this node's connections, as for its local connections.
    let owner = crate::limits::ConnectionOwner::of(Some(src.cgroup_id), peer.ip());
    let slot = match shared.connections.try_acquire(owner) {
        Ok(slot) => slot,
        Err(over) => return deny(hyper::StatusCode::SERVICE_UNAVAILABLE, over.to_string(), dst),
    };
    shared.flows.push(record(Verdict::Allowed, dst.clone(), format!("through the tunnel from {id}")));
    let shared = shared.clone();
    tokio::spawn(async move {
        let _slot = slot;
        let upgraded = match hyper::upgrade::on(&mut req).await {
            Ok(u) => TokioIo::new(u),
            Err(e) => {
                warn!(error = %e, "tunnel stream upgrade failed");
                return;
            }
        };
        // Judged again at every new version (the kernel's re-judging never sees this
        // connection: its source is the tunnel): closed once the version denies it, or, for a
        // connection carried at L4, once it asks for L7 rules (it is carried differently).
        let mut swaps = shared.registry.swaps();
        let revoked = async {
            let Some(dst) = dst.clone() else { return std::future::pending::<u64>().await };
            loop {
                if swaps.changed().await.is_err() {
                    return std::future::pending::<u64>().await;
                }
                let tables = shared.registry.tables();
                let verdict = match (tables.remote_workload(&id.node, &id.name), tables.workload(dst.cgroup_id)) {
                    (Some(s), Some(d)) if s.namespace == id.namespace => tables.tunnel_ingress(d.endpoint_id, &s, port),
                    _ => l7rules::L4Decision::Deny { policy_id: 0 },
                };
                let still = match verdict {
                    l7rules::L4Decision::Deny { .. } => false,
                    l7rules::L4Decision::Redirect(_) => l7,
                    l7rules::L4Decision::Allow | l7rules::L4Decision::Audit => true,
                };
                if !still {
                    return tables.version;
                }
            }
        };
        let carried = async {
            match (stack, &dst) {
                (Some(crate::plan::Stack::Kafka), Some(d)) => {
                    let source =
                        crate::client_addr::upstream_source(Direction::Ingress, peer.ip(), target, &shared.proxy);
                    let up =
                        crate::upstream::connect_upstream(target, &shared.proxy, source, shared.pool.connect_timeout())
                            .await;
                    match up {
                        Ok(up) => {
                            let conn = Arc::new(crate::kafka::KafkaConnection {
                                shared: shared.clone(),
                                direction: Direction::Ingress,
                                peer,
                                target,
                                via: "tunnel",
                                src: Some(src.clone()),
                                dst: Some(d.clone()),
                                upstream_local: up.local_addr().ok(),
                            });
                            if let Err(e) = crate::kafka::serve_stream(upgraded, up, conn).await {
                                debug!(error = %e, "tunnelled Kafka connection ended");
                            }
                        }
                        Err(e) => warn!(error = %e, "tunnelled Kafka connection: upstream"),
                    }
                }
                (Some(_), Some(d)) => {
                    let conn = crate::http::HttpConnection::new(
                        shared.clone(),
                        Direction::Ingress,
                        peer,
                        target,
                        "tunnel",
                        Some(src.clone()),
                        Some(d.clone()),
                    );
                    if let Err(e) = crate::http::serve(upgraded, Arc::new(conn)).await {
                        debug!(error = %e, "tunnelled HTTP connection ended");
                    }
                }
                _ => {
                    let source =
                        crate::client_addr::upstream_source(Direction::Ingress, peer.ip(), target, &shared.proxy);
                    match crate::upstream::connect_upstream(
                        target,
                        &shared.proxy,
                        source,
                        shared.pool.connect_timeout(),
                    )
                    .await
                    {
                        Ok(mut up) => {
                            let mut upgraded = upgraded;
                            let _ = tokio::io::copy_bidirectional(&mut upgraded, &mut up).await;
                        }
                        Err(e) => warn!(error = %e, "tunnelled connection: upstream"),
                    }
                }
            }
        };
        tokio::select! {
            _ = carried => {}
            version = revoked => {
                let why = format!("closed: policy version {version} no longer carries this tunnelled connection as it was");
                info!(%peer, %target, "{why}");
                shared.flows.push(FlowRecord {
                    reason: Some(Reason::Text(why)),
                    ..FlowRecord::proxied(
                        Verdict::Denied,
                        Direction::Ingress,
                        Endpoint::new(peer, Some(src.cgroup_id)).named(Some(src.clone())),
                        Endpoint::new(target, None).named(dst.clone()),
                        Some(ProxyInfo { original_dst_via: "tunnel", upstream: None }),
                    )
                });
            }
        }
    });
    hyper::Response::new(Full::new(Bytes::new()))
}

/// `target` as one of this node's own addresses another host reaches (IPv4-mapped made
/// IPv4), or none: never loopback, which serves this node's own daemons and nothing from
/// outside, nor an address of another host.
fn this_nodes(target: SocketAddr, tables: &crate::tables::Tables) -> Option<SocketAddr> {
    let ip = match target.ip() {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4).unwrap_or(std::net::IpAddr::V6(v6)),
        v4 => v4,
    };
    let ours = tables.identity_of(ip) == crate::tables::HOST;
    (ours && !ip.is_loopback() && !ip.is_unspecified() && !ip.is_multicast())
        .then_some(SocketAddr::new(ip, target.port()))
}

/// Where another node's proxy asks, as one of its workloads, which workload listens at one of
/// this node's addresses (`?addr=IP:PORT`), to judge that workload's egress rules first.
pub const LISTENER_PATH: &str = "/l7mesh/v1/listener";
/// The largest answer to [`LISTENER_PATH`] read.
const MAX_LISTENER_BYTES: usize = 4096;

/// Another node's workload (as the tunnel proved it, and one the cluster lists) asks which of
/// this node's workloads listens at an address of this node.
async fn listener_for_a_node(
    req: &hyper::Request<hyper::body::Incoming>,
    id: &Result<l7mesh_identity::PeerIdentity, String>,
    known: bool,
    tables: &crate::tables::Tables,
    shared: &Shared,
) -> hyper::Response<Full<Bytes>> {
    match id {
        Ok(_) if known => {}
        Ok(id) => {
            return refuse(
                hyper::StatusCode::FORBIDDEN,
                &format!("{id} is not a workload the cluster lists (in this node's policy version {})", tables.version),
            )
        }
        Err(e) => return refuse(hyper::StatusCode::FORBIDDEN, &format!("the peer's identity: {e}")),
    }
    let addr = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("addr="))
        .and_then(|a| a.parse::<SocketAddr>().ok());
    let Some(addr) = addr else {
        return refuse(hyper::StatusCode::BAD_REQUEST, "the query names no addr=IP:PORT");
    };
    let Some(addr) = this_nodes(addr, tables) else {
        return refuse(hyper::StatusCode::FORBIDDEN, &format!("{addr} is not an address of this node"));
    };
    let workload = shared.registry.local_listener(addr).await.map(|w| (w.namespace.clone(), w.name.clone()));
    let answer = l7mesh_api::cluster::TunnelListener { workload };
    hyper::Response::new(Full::new(Bytes::from(serde_json::to_vec(&answer).unwrap_or_default())))
}

/// Opens an HTTP/2 connection to node `node`'s tunnel at `ip:port` with `trusted`'s identity:
/// TLS verified to the cluster's root for the node's DNS name, then, along the path the chain
/// names, that its intermediate is that node's and its leaf the node proxy's (not a workload's
/// of that node).
async fn dial(
    shared: &Shared,
    trusted: &Trusted<rustls::ClientConfig>,
    node: &str,
    ip: std::net::IpAddr,
    port: u16,
) -> Result<hyper::client::conn::http2::SendRequest<Empty<Bytes>>, String> {
    let tcp = crate::upstream::connect_upstream(
        SocketAddr::new(ip, port),
        &shared.proxy,
        crate::upstream::UpstreamSource::Kernel,
        shared.pool.connect_timeout(),
    )
    .await
    .map_err(|e| e.to_string())?;
    let name = ServerName::try_from(node_server_name(node)).map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(trusted.config.clone()))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let chain: Vec<&[u8]> =
        tls.get_ref().1.peer_certificates().unwrap_or_default().iter().map(|c| c.as_ref()).collect();
    let id = l7mesh_identity::peer_identity(&chain, &trusted.root, &trusted.trust_domain)?;
    if id.node != node || id.namespace != l7mesh_identity::PROXY_NAMESPACE || id.name != l7mesh_identity::PROXY_NAME {
        return Err(format!("presented {id}, not node {node}'s proxy"));
    }
    let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
        .await
        .map_err(|e| format!("HTTP/2: {e}"))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!(error = %e, "tunnel connection ended");
        }
    });
    Ok(sender)
}

/// Where a node proxy asks another for its flows (`cluster=true`), on the tunnel's port.
pub const FLOWS_PATH: &str = "/l7mesh/v1/flows";
/// The largest answer of one node's flows read for a cluster-wide answer.
const MAX_FLOWS_BYTES: usize = 64 << 20;

/// Another node's proxy (only a node proxy's identity: no workload reads flows) asks for this
/// node's flows that match its query (the ring; not `follow`).
fn flows_for_a_node(
    req: &hyper::Request<hyper::body::Incoming>,
    id: &Result<l7mesh_identity::PeerIdentity, String>,
    shared: &Shared,
) -> hyper::Response<Full<Bytes>> {
    match id {
        Ok(id) if id.namespace == l7mesh_identity::PROXY_NAMESPACE && id.name == l7mesh_identity::PROXY_NAME => {}
        Ok(id) => {
            return refuse(hyper::StatusCode::FORBIDDEN, &format!("{id} is no node proxy: flows are for node proxies"))
        }
        Err(e) => return refuse(hyper::StatusCode::FORBIDDEN, &format!("the peer's identity: {e}")),
    }
    let filter = match crate::flows::FlowFilter::parse(req.uri().query().unwrap_or("")) {
        Ok(f) if f.follow || f.cluster => {
            return refuse(hyper::StatusCode::BAD_REQUEST, "one node's flows: no follow, no cluster");
        }
        Ok(f) => f,
        Err(e) => return refuse(hyper::StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let mut body = String::new();
    for r in shared.flows.snapshot(&filter) {
        body.push_str(&serde_json::to_string(&r).unwrap_or_default());
        body.push('\n');
    }
    hyper::Response::new(Full::new(Bytes::from(body)))
}

/// Node `node`'s flows matching `query` (as this node's proxy asks them, with its own
/// identity), one JSON object per line.
pub async fn fetch_flows(
    shared: &Shared,
    node: &str,
    ip: std::net::IpAddr,
    port: u16,
    query: &str,
) -> Result<Vec<String>, String> {
    let fetch = async {
        let trusted =
            shared.tunnel.client(shared, l7mesh_identity::PROXY_NAMESPACE, l7mesh_identity::PROXY_NAME).await?;
        let mut sender = dial(shared, &trusted, node, ip, port).await?;
        let uri = format!("https://{}{FLOWS_PATH}?{query}", node_server_name(node));
        let req = hyper::Request::get(uri).body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let why = resp.headers().get(DENIED_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string);
        let body = http_body_util::Limited::new(resp.into_body(), MAX_FLOWS_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading its flows: {e}"))?
            .to_bytes();
        if status != hyper::StatusCode::OK {
            return Err(why.unwrap_or_else(|| format!("answered {status}")));
        }
        Ok(String::from_utf8_lossy(&body).lines().map(str::to_string).collect())
    };
    match tokio::time::timeout(SETUP_TIMEOUT, fetch).await {
        Ok(r) => r.map_err(|e| format!("node {node}: {e}")),
        Err(_) => Err(format!("node {node}: no answer within {SETUP_TIMEOUT:?}")),
    }
}

/// Starts the tunnel listener once this node is in a cluster and its broker holds the node's
/// intermediate (checked every 2 s until then).
pub async fn start_when_ready(shared: Arc<Shared>, port: u16) {
    if port == 0 {
        return;
    }
    let mut said = false;
    loop {
        if shared.registry.tables().in_cluster() {
            match shared.tunnel.server(&shared).await {
                Ok(_) => match TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))).await {
                    Ok(listener) => {
                        serve(listener, shared).await;
                        return;
                    }
                    Err(e) => warn!(port, error = %e, "the tunnel port cannot be bound"),
                },
                Err(e) if !said => {
                    info!(error = %e, "no tunnel between nodes yet (the broker holds no node intermediate: `l7ctl ca install-node`)");
                    said = true;
                }
                Err(_) => {}
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_node_server_name_is_a_dns_name_of_its_own() {
        assert_eq!(super::node_server_name("node-a"), "node-a.nodes.l7mesh");
        assert!(rustls::pki_types::ServerName::try_from(super::node_server_name("node-a")).is_ok());
    }
}

//! The Observer service over a node's flow ring, on a root-only unix socket.
//!
//! Bounded like the ring it reads: at most [`MAX_STREAMS`] GetFlows calls at once (more get
//! RESOURCE_EXHAUSTED); a follower that reads slower than flows come falls behind the ring's
//! live channel and is told how many it missed (a `LostEvent`, as Hubble sends), instead of
//! anything buffering for it.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::UnixListener;
use tokio::sync::{broadcast, mpsc, watch, Semaphore};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tokio_stream::StreamExt as _;
use tonic::{Request, Response, Status};
use tracing::warn;

use crate::filter::Filters;
use crate::proto::{self, get_flows_response::ResponseTypes, GetFlowsRequest, GetFlowsResponse};

#[allow(clippy::all)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/observer.Observer.rs"));
}

pub use generated::observer_server::ObserverServer;

/// GetFlows calls served at once.
pub const MAX_STREAMS: usize = 16;
/// Responses queued for one call before its producer waits for the client to read.
const STREAM_QUEUE: usize = 64;
/// The name `hubble status` asks the gRPC health service about.
pub const HEALTH_SERVICE_NAME: &str = "hubble.server.Observer";

/// What the server reads flows from: a ring and its live channel (l7proxy's flow log).
pub trait FlowSource: Send + Sync + 'static {
    type Record: Clone + Send + Sync + 'static;
    /// The record as Hubble's flow.
    fn to_hubble(&self, record: &Self::Record) -> proto::Flow;
    /// Every record in the ring, oldest first.
    fn snapshot(&self) -> Vec<Self::Record>;
    /// The ring now and every record pushed from that moment on, none lost or repeated between.
    fn follow(&self) -> (Vec<Self::Record>, broadcast::Receiver<Self::Record>);
    fn counts(&self) -> Counts;
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Records in the ring now.
    pub num_flows: u64,
    /// The ring's capacity.
    pub max_flows: u64,
    /// Records pushed since the start.
    pub seen_flows: u64,
}

pub struct Observer<S> {
    source: Arc<S>,
    node_name: String,
    version: String,
    started: Instant,
    streams: Arc<Semaphore>,
    /// Turns true when the server stops: every follower's stream then ends, so that the
    /// connections can close.
    stop: watch::Receiver<bool>,
}

impl<S: FlowSource> Observer<S> {
    pub fn new(source: Arc<S>, node_name: String, version: String, stop: watch::Receiver<bool>) -> Self {
        Observer {
            source,
            node_name,
            version,
            started: Instant::now(),
            streams: Arc::new(Semaphore::new(MAX_STREAMS)),
            stop,
        }
    }
}

fn time_of(f: &proto::Flow) -> Option<(i64, i32)> {
    f.time.as_ref().map(|t| (t.seconds, t.nanos))
}

fn stamp(t: &Option<prost_types::Timestamp>) -> Option<(i64, i32)> {
    t.as_ref().map(|t| (t.seconds, t.nanos))
}

fn flow_response(flow: proto::Flow) -> GetFlowsResponse {
    GetFlowsResponse { node_name: flow.node_name.clone(), time: flow.time, response_types: Some(ResponseTypes::Flow(flow)) }
}

fn lost_response(node_name: &str, lost: u64) -> GetFlowsResponse {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    GetFlowsResponse {
        node_name: node_name.to_string(),
        time: Some(prost_types::Timestamp { seconds: now.as_secs() as i64, nanos: now.subsec_nanos() as i32 }),
        response_types: Some(ResponseTypes::LostEvents(proto::LostEvent {
            source: proto::LostEventSource::HubbleRingBuffer as i32,
            num_events_lost: lost,
        })),
    }
}

/// What a request asks of the ring: refused whole when any part of it cannot be honoured.
pub struct Plan {
    filters: Filters,
    since: Option<(i64, i32)>,
    until: Option<(i64, i32)>,
    number: u64,
    first: bool,
    pub follow: bool,
}

impl Plan {
    pub fn new(req: &proto::Checked<GetFlowsRequest>) -> Result<Plan, Status> {
        if let Some(n) = req.unknown_fields.first() {
            return Err(Status::invalid_argument(format!(
                "GetFlowsRequest field number {n} is unknown to l7mesh (a newer Hubble?); leave it out"
            )));
        }
        let r = &req.message;
        if r.first && r.follow {
            return Err(Status::invalid_argument("first cannot be specified with follow"));
        }
        let masked = r.field_mask.as_ref().is_some_and(|m| !m.paths.is_empty())
            || r.experimental.as_ref().and_then(|e| e.field_mask.as_ref()).is_some_and(|m| !m.paths.is_empty());
        if masked {
            return Err(Status::invalid_argument("field_mask is not supported by l7mesh; leave it out"));
        }
        if r.extensions.is_some() {
            return Err(Status::invalid_argument("extensions are not supported by l7mesh; leave them out"));
        }
        let filters =
            Filters::compile(&r.whitelist, &r.blacklist).map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Plan { filters, since: stamp(&r.since), until: stamp(&r.until), number: r.number, first: r.first, follow: r.follow })
    }

    fn in_range(&self, f: &proto::Flow) -> bool {
        let t = time_of(f);
        self.since.is_none_or(|s| t.is_some_and(|t| t >= s)) && self.until.is_none_or(|u| t.is_some_and(|t| t <= u))
    }

    fn wanted(&self, f: &proto::Flow) -> bool {
        self.in_range(f) && self.filters.matches(f)
    }

    /// The flows of the ring the request gets, in order: the first N, the last N, or all in
    /// the time range (a follower without a number or a start gets none of the past).
    pub fn past(&self, flows: Vec<proto::Flow>) -> Vec<proto::Flow> {
        let mut matching: Vec<proto::Flow> = flows.into_iter().filter(|f| self.wanted(f)).collect();
        let n = usize::try_from(self.number).unwrap_or(usize::MAX);
        if self.first || (self.since.is_some() && !self.follow) {
            if n > 0 {
                matching.truncate(n);
            }
        } else if self.since.is_none() {
            if self.follow && n == 0 {
                matching.clear();
            } else if n > 0 && matching.len() > n {
                matching.drain(..matching.len() - n);
            }
        }
        matching
    }
}

type FlowStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<GetFlowsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl<S: FlowSource> generated::observer_server::Observer for Observer<S> {
    type GetFlowsStream = FlowStream;

    async fn get_flows(
        &self,
        request: Request<proto::Checked<GetFlowsRequest>>,
    ) -> Result<Response<Self::GetFlowsStream>, Status> {
        let plan = Plan::new(request.get_ref())?;
        let permit = self.streams.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!("l7mesh serves at most {MAX_STREAMS} GetFlows calls at once"))
        })?;
        let source = self.source.clone();
        let node_name = self.node_name.clone();
        let mut stop = self.stop.clone();
        let (tx, rx) = mpsc::channel::<Result<GetFlowsResponse, Status>>(STREAM_QUEUE);
        let (past, live) = if plan.follow {
            let (past, live) = source.follow();
            (past, Some(live))
        } else {
            (source.snapshot(), None)
        };
        tokio::spawn(async move {
            let _permit = permit;
            let past = plan.past(past.iter().map(|r| source.to_hubble(r)).collect());
            for f in past {
                if tx.send(Ok(flow_response(f))).await.is_err() {
                    return;
                }
            }
            let Some(mut live) = live else { return };
            loop {
                let next = tokio::select! {
                    next = live.recv() => next,
                    _ = tx.closed() => return,
                    _ = stop.wait_for(|s| *s) => return,
                };
                let response = match next {
                    Ok(r) => {
                        let f = source.to_hubble(&r);
                        if !plan.wanted(&f) {
                            continue;
                        }
                        flow_response(f)
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        warn!(missed = n, "a Hubble follower fell behind; it is sent a LostEvent");
                        lost_response(&node_name, n)
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if tx.send(Ok(response)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn server_status(
        &self,
        _request: Request<proto::Empty>,
    ) -> Result<Response<proto::ServerStatusResponse>, Status> {
        let c = self.source.counts();
        Ok(Response::new(proto::ServerStatusResponse {
            num_flows: c.num_flows,
            max_flows: c.max_flows,
            seen_flows: c.seen_flows,
            uptime_ns: u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX),
            version: self.version.clone(),
            flows_rate: 0.0,
        }))
    }

    async fn get_namespaces(
        &self,
        _request: Request<proto::Empty>,
    ) -> Result<Response<proto::GetNamespacesResponse>, Status> {
        let mut seen = std::collections::BTreeSet::new();
        for r in self.source.snapshot() {
            let f = self.source.to_hubble(&r);
            for e in [&f.source, &f.destination].into_iter().flatten() {
                if !e.namespace.is_empty() {
                    seen.insert(e.namespace.clone());
                }
            }
        }
        let namespaces =
            seen.into_iter().map(|namespace| proto::Namespace { cluster: String::new(), namespace }).collect();
        Ok(Response::new(proto::GetNamespacesResponse { namespaces }))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("binding the Hubble socket {path}: {source}")]
    Bind { path: String, source: std::io::Error },
    #[error("making the Hubble socket {path} root's only: {source}")]
    Mode { path: String, source: std::io::Error },
    #[error("serving Hubble's API: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Binds `path` (a stale socket file there is replaced), mode 0600: only root can connect, and a
/// peer that is not root (were the mode ever wider) is dropped at accept.
pub fn bind(path: &Path) -> Result<UnixListener, ServeError> {
    use std::os::unix::fs::PermissionsExt as _;
    let shown = || path.display().to_string();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| ServeError::Bind { path: shown(), source })?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
            std::fs::remove_file(path).map_err(|source| ServeError::Bind { path: shown(), source })?
        }
        Ok(_) => {
            return Err(ServeError::Bind {
                path: shown(),
                source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "exists and is not a socket"),
            })
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(|source| ServeError::Bind { path: shown(), source })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|source| ServeError::Mode { path: shown(), source })?;
    Ok(listener)
}

/// Serves Hubble's Observer and gRPC health services on `listener` until `shutdown` resolves.
pub async fn serve<S: FlowSource>(
    listener: UnixListener,
    observer: Observer<S>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status(HEALTH_SERVICE_NAME, tonic_health::ServingStatus::Serving).await;
    health.set_service_status("", tonic_health::ServingStatus::Serving).await;
    let incoming = UnixListenerStream::new(listener).filter(|conn| match conn {
        Ok(stream) => match stream.peer_cred() {
            Ok(cred) if cred.uid() == 0 => true,
            Ok(cred) => {
                warn!(uid = cred.uid(), pid = ?cred.pid(), "refused a Hubble client that is not root");
                false
            }
            Err(e) => {
                warn!(error = %e, "refused a Hubble client whose credentials could not be read");
                false
            }
        },
        Err(_) => true,
    });
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(ObserverServer::new(observer))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

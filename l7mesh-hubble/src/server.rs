//! The Observer service over a node's flow ring, on a root-only unix socket.
//!
//! Bounded like the ring it reads: at most [`MAX_STREAMS`] GetFlows calls at once (more get
//! RESOURCE_EXHAUSTED); a follower that reads slower than flows come falls behind the ring's
//! live channel and is told how many it missed (a `LostEvent`, as Hubble sends), instead of
//! anything buffering for it.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
#[cfg(test)]
use std::time::Duration;
use std::time::Instant;

use tokio::net::UnixListener;
use tokio::sync::{broadcast, mpsc, watch, Semaphore};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tokio_stream::StreamExt as _;
use tonic::{Request, Response, Status};
use tracing::warn;

use crate::filter::Filters;
use crate::mask::FieldMask;
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
    GetFlowsResponse {
        node_name: flow.node_name.clone(),
        time: flow.time,
        response_types: Some(ResponseTypes::Flow(flow)),
    }
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
    /// Applied after the filters judged the whole flow.
    mask: Option<FieldMask>,
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
        // The newer field first, as Hubble's server reads them.
        let paths = match r.field_mask.as_ref().filter(|m| !m.paths.is_empty()) {
            Some(m) => Some(&m.paths),
            None => r.experimental.as_ref().and_then(|e| e.field_mask.as_ref()).map(|m| &m.paths),
        };
        let mask = match paths.filter(|p| !p.is_empty()) {
            Some(p) => Some(FieldMask::new(p).map_err(|e| Status::invalid_argument(e.to_string()))?),
            None => None,
        };
        if r.extensions.is_some() {
            return Err(Status::invalid_argument("extensions are not supported by l7mesh; leave them out"));
        }
        let filters =
            Filters::compile(&r.whitelist, &r.blacklist).map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Plan {
            filters,
            mask,
            since: stamp(&r.since),
            until: stamp(&r.until),
            number: r.number,
            first: r.first,
            follow: r.follow,
        })
    }

    fn in_range(&self, f: &proto::Flow) -> bool {
        let t = time_of(f);
        self.since.is_none_or(|s| t.is_some_and(|t| t >= s)) && self.until.is_none_or(|u| t.is_some_and(|t| t <= u))
    }

    /// `f` as sent: only the mask's fields, when there is one.
    fn response(&self, f: proto::Flow) -> GetFlowsResponse {
        flow_response(match &self.mask {
            Some(m) => m.apply(&f),
            None => f,
        })
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
                if tx.send(Ok(plan.response(f))).await.is_err() {
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
                        plan.response(f)
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

#[cfg(test)]
mod tests {
    use super::*;
    use generated::observer_server::Observer as _;
    use std::sync::Mutex;

    /// A ring of numbered records; record n is a flow at second n whose summary is n.
    struct Numbers {
        ring: Mutex<Vec<u32>>,
        live: broadcast::Sender<u32>,
    }

    impl Numbers {
        fn new(ring: impl IntoIterator<Item = u32>, live_capacity: usize) -> Arc<Self> {
            Arc::new(Numbers {
                ring: Mutex::new(ring.into_iter().collect()),
                live: broadcast::channel(live_capacity).0,
            })
        }
        fn push(&self, n: u32) {
            let mut ring = self.ring.lock().unwrap();
            let _ = self.live.send(n);
            ring.push(n);
        }
    }

    impl FlowSource for Numbers {
        type Record = u32;
        fn to_hubble(&self, n: &u32) -> proto::Flow {
            proto::Flow {
                time: Some(prost_types::Timestamp { seconds: i64::from(*n), nanos: 0 }),
                verdict: if n.is_multiple_of(2) { 1 } else { 2 },
                summary: n.to_string(),
                ..Default::default()
            }
        }
        fn snapshot(&self) -> Vec<u32> {
            self.ring.lock().unwrap().clone()
        }
        fn follow(&self) -> (Vec<u32>, broadcast::Receiver<u32>) {
            let ring = self.ring.lock().unwrap();
            (ring.clone(), self.live.subscribe())
        }
        fn counts(&self) -> Counts {
            Counts { num_flows: self.ring.lock().unwrap().len() as u64, max_flows: 100, seen_flows: 7 }
        }
    }

    fn request(r: GetFlowsRequest) -> Request<proto::Checked<GetFlowsRequest>> {
        Request::new(proto::Checked { message: r, unknown_fields: vec![] })
    }

    fn numbers(flows: &[GetFlowsResponse]) -> Vec<String> {
        flows
            .iter()
            .map(|r| match &r.response_types {
                Some(ResponseTypes::Flow(f)) => f.summary.clone(),
                Some(ResponseTypes::LostEvents(l)) => format!("lost {}", l.num_events_lost),
                None => "none".into(),
            })
            .collect()
    }

    async fn all(observer: &Observer<Numbers>, r: GetFlowsRequest) -> Result<Vec<String>, Status> {
        let stream = observer.get_flows(request(r)).await?.into_inner();
        let got: Vec<GetFlowsResponse> = stream.map(|r| r.unwrap()).collect().await;
        Ok(numbers(&got))
    }

    fn ts(s: i64) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp { seconds: s, nanos: 0 })
    }

    #[tokio::test]
    async fn number_first_last_since_until_and_filters() {
        let (_stop_tx, stop) = watch::channel(false);
        let observer = Observer::new(Numbers::new(1..=10, 16), "n".into(), "v".into(), stop);
        let s = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>();
        assert_eq!(all(&observer, GetFlowsRequest { number: 3, ..Default::default() }).await.unwrap(), s(&[8, 9, 10]));
        let first = GetFlowsRequest { number: 3, first: true, ..Default::default() };
        assert_eq!(all(&observer, first).await.unwrap(), s(&[1, 2, 3]));
        assert_eq!(all(&observer, GetFlowsRequest::default()).await.unwrap().len(), 10, "no number: all");
        let range = GetFlowsRequest { since: ts(4), until: ts(6), ..Default::default() };
        assert_eq!(all(&observer, range).await.unwrap(), s(&[4, 5, 6]));
        let since_n = GetFlowsRequest { since: ts(4), number: 2, ..Default::default() };
        assert_eq!(all(&observer, since_n).await.unwrap(), s(&[4, 5]), "since: the first N from there");
        let dropped = proto::Checked {
            message: proto::FlowFilter { verdict: vec![proto::Verdict::Dropped as i32], ..Default::default() },
            unknown_fields: vec![],
        };
        let last_dropped = GetFlowsRequest { number: 2, whitelist: vec![dropped.clone()], ..Default::default() };
        assert_eq!(all(&observer, last_dropped).await.unwrap(), s(&[7, 9]), "the last N that match");
        let not_dropped = GetFlowsRequest { number: 2, blacklist: vec![dropped], ..Default::default() };
        assert_eq!(all(&observer, not_dropped).await.unwrap(), s(&[8, 10]));

        let refused = |r: GetFlowsRequest| async { observer.get_flows(request(r)).await.err().unwrap() };
        let e = refused(GetFlowsRequest { first: true, follow: true, ..Default::default() }).await;
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let mask = |p: &str| Some(prost_types::FieldMask { paths: vec![p.into()] });
        let e = refused(GetFlowsRequest { field_mask: mask("colour"), ..Default::default() }).await;
        assert!(e.message().contains("field_mask path `colour`"), "{e:?}");
        // A mask keeps only its fields (the older experimental place too), after filtering.
        let masked = GetFlowsRequest { number: 1, field_mask: mask("time"), ..Default::default() };
        let got: Vec<GetFlowsResponse> =
            observer.get_flows(request(masked)).await.unwrap().into_inner().map(|r| r.unwrap()).collect().await;
        let Some(ResponseTypes::Flow(f)) = &got[0].response_types else { panic!("{got:?}") };
        assert_eq!((f.time, f.summary.as_str(), f.verdict), (ts(10), "", 0));
        let old_place = GetFlowsRequest {
            number: 1,
            experimental: Some(proto::GetFlowsRequestExperimental { field_mask: mask("Summary") }),
            ..Default::default()
        };
        assert_eq!(all(&observer, old_place).await.unwrap(), ["10"]);
        let e = observer
            .get_flows(Request::new(proto::Checked { message: GetFlowsRequest::default(), unknown_fields: vec![11] }))
            .await
            .err()
            .unwrap();
        assert!(e.code() == tonic::Code::InvalidArgument && e.message().contains("11"), "{e:?}");

        let status = observer.server_status(Request::new(proto::Empty {})).await.unwrap().into_inner();
        assert_eq!((status.num_flows, status.max_flows, status.seen_flows, status.version.as_str()), (10, 100, 7, "v"));
    }

    /// A follower that does not read: the live channel overflows and it is told how many it
    /// missed, while nothing queues for it beyond the bounds; then it sees new flows again.
    #[tokio::test]
    async fn a_slow_follower_is_told_what_it_missed() {
        let (_stop_tx, stop) = watch::channel(false);
        let source = Numbers::new([], 8);
        let observer = Observer::new(source.clone(), "n".into(), "v".into(), stop);
        let mut stream = observer
            .get_flows(request(GetFlowsRequest { follow: true, ..Default::default() }))
            .await
            .unwrap()
            .into_inner();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let total = 500u32;
        for n in 0..total {
            source.push(n);
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut got = Vec::new();
        while let Ok(Some(r)) = tokio::time::timeout(Duration::from_millis(200), stream.next()).await {
            got.push(r.unwrap());
        }
        let seen = numbers(&got);
        let lost: u64 = seen.iter().filter_map(|s| s.strip_prefix("lost ")).map(|n| n.parse::<u64>().unwrap()).sum();
        let flows = seen.iter().filter(|s| !s.starts_with("lost")).count() as u64;
        assert!(lost > 0, "{seen:?}");
        assert_eq!(flows + lost, u64::from(total), "every record is either sent or counted as lost");
        assert!(flows <= (STREAM_QUEUE + 8 + 2) as u64, "{flows} flows were queued for a client that did not read");
        // Caught up: the next one arrives as a flow.
        source.push(9999);
        let next = tokio::time::timeout(Duration::from_secs(2), stream.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(numbers(&[next]), ["9999"]);
    }

    #[tokio::test]
    async fn bind_makes_a_root_only_socket_and_replaces_only_a_stale_socket() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("l7mesh-hubble-bind-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("run/hubble.sock");
        let first = bind(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        drop(first);
        // A socket left by a process that died is replaced.
        let _second = bind(&path).unwrap();
        // Anything else at the path is not removed.
        let file = dir.join("not-a-socket");
        std::fs::write(&file, "keep").unwrap();
        assert!(matches!(bind(&file), Err(ServeError::Bind { .. })));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn streams_are_capped_and_end_at_stop() {
        let (stop_tx, stop) = watch::channel(false);
        let observer = Observer::new(Numbers::new([1], 8), "n".into(), "v".into(), stop);
        let mut open = Vec::new();
        for _ in 0..MAX_STREAMS {
            let follow = GetFlowsRequest { follow: true, ..Default::default() };
            open.push(observer.get_flows(request(follow)).await.unwrap().into_inner());
        }
        let e = observer.get_flows(request(GetFlowsRequest::default())).await.err().unwrap();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        // A closed stream gives its place back.
        drop(open.pop());
        tokio::time::sleep(Duration::from_millis(50)).await;
        open.push(observer.get_flows(request(GetFlowsRequest::default())).await.unwrap().into_inner());
        // At stop every follower's stream ends.
        stop_tx.send(true).unwrap();
        for mut s in open {
            let ended = tokio::time::timeout(Duration::from_secs(2), async { while s.next().await.is_some() {} }).await;
            assert!(ended.is_ok(), "a stream outlived the stop");
        }
    }
}

//! The policy-api process: the store and the node controller behind a REST API (axum, on
//! 127.0.0.1:9090), the control socket `l7ctl run` registers workloads on, and the policy
//! stream to l7proxy. Every change (an API write, a policy file edit, a workload starting or
//! stopping) ends in one serialized reconcile.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{error, info, warn};

use l7mesh_api::rest::{
    Applied, ErrorSource, HistoryEntry, PolicyView, RecentError, Rollback, RolledBack, Status, Upload, WorkloadView,
    ACTOR_HEADER, RECENT_ERRORS,
};

use crate::control::{Reply, Request};
use crate::node::{Controller, NodeError, ReconcileReport};
use crate::proxy_channel::ProxyHub;
use crate::store::{Actor, StoreError};
use l7policy::model::PolicyDocument;
use l7policy::validate::{load_text, Diagnostic, LoadedPolicy, Severity};

/// The OpenAPI document served at `/openapi.json`.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// How long a registration waits, beyond the apply's own wait, for a connected l7proxy to load
/// the version that knows the new workload.
const REGISTRATION_PROXY_WAIT: Duration = Duration::from_secs(10);

/// Largest policy upload accepted.
const MAX_POLICY_BODY: usize = 4 << 20;

pub struct NodeServer {
    controller: Arc<Mutex<Controller>>,
    pub hub: Arc<ProxyHub>,
    /// Where l7proxy's admin API answers (flows live in its ring and its flow history).
    pub proxy_admin: SocketAddr,
    /// The node's API token, which l7proxy's admin `/v1/*` wants too.
    api_token: String,
    /// Workloads whose `l7ctl run` is connected to this process.
    owned: Mutex<HashSet<String>>,
    last: Mutex<Option<ReconcileReport>>,
    /// The last failures, for `/v1/status` (at most [`RECENT_ERRORS`]).
    errors: Mutex<std::collections::VecDeque<RecentError>>,
    /// The node's own paths, hidden from every workload (fixed when the node opens: read here
    /// so that no async thread ever waits for the controller, which a registration holds
    /// while it waits for l7proxy's ack, an ack only an async thread can read).
    private_paths: Vec<String>,
    /// `/metrics`.
    pub metrics: Arc<crate::metrics::ApiMetrics>,
    /// The cluster this node joined (`--kvstore`), if any: then policy writes go to the
    /// cluster's store and come back through its watch.
    cluster: Option<Arc<crate::cluster::Cluster>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error("the controller task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

impl NodeServer {
    pub fn new(
        controller: Controller,
        hub: Arc<ProxyHub>,
        proxy_admin: SocketAddr,
        api_token: String,
        cluster: Option<Arc<crate::cluster::Cluster>>,
    ) -> Arc<Self> {
        let metrics = match cluster {
            Some(_) => crate::metrics::ApiMetrics::new().with_kvstore(),
            None => crate::metrics::ApiMetrics::new(),
        };
        let private_paths = controller.private_paths().iter().map(|p| p.display().to_string()).collect();
        Arc::new(NodeServer {
            private_paths,
            controller: Arc::new(Mutex::new(controller)),
            hub,
            proxy_admin,
            api_token,
            owned: Mutex::new(HashSet::new()),
            last: Mutex::new(None),
            metrics: Arc::new(metrics),
            errors: Mutex::new(std::collections::VecDeque::new()),
            cluster,
        })
    }

    pub fn cluster(&self) -> Option<&Arc<crate::cluster::Cluster>> {
        self.cluster.as_ref()
    }

    fn workloads_changed(&self) {
        if let Some(c) = self.cluster() {
            c.local_workloads_changed();
        }
    }

    /// This node's registered workloads, as the cluster lists them (`Err` while the store
    /// cannot say).
    pub async fn local_workloads(&self) -> Result<Vec<crate::cluster::LocalWorkload>, ServerError> {
        self.with(|c| {
            Ok(c.store()
                .workloads()?
                .into_iter()
                .map(|w| crate::cluster::LocalWorkload { name: w.name, labels: w.labels.display() })
                .collect())
        })
        .await
    }

    /// Other nodes' workloads or the nodes changed: compiled into the version in force.
    pub async fn cluster_view(&self, view: l7policy::compile::ClusterView) {
        match self.with(move |c| c.set_cluster_view(view)).await {
            Ok(Some(r)) => {
                self.said(&r);
                self.refresh_in_force().await;
            }
            Ok(None) => {}
            Err(e) => {
                warn!(error = %e, "the cluster's workloads could not be put in force here; the version before stays")
            }
        }
    }

    /// Puts the cluster's set at `revision` in force here (`keep_own`: unless it would replace
    /// policies the node had before it joined). `Err((why, when to retry))`.
    pub async fn sync_cluster(
        &self,
        policies: Vec<LoadedPolicy>,
        revision: i64,
        keep_own: bool,
    ) -> Result<u64, (String, crate::cluster::Retry)> {
        use crate::cluster::Retry;
        use crate::metrics::Origin;
        let actor = Actor { by: Some(format!("cluster revision {revision}")), rollback_of: None };
        let started = std::time::Instant::now();
        let result = self.with(move |c| Ok((c.sync_cluster(&policies, &actor, keep_own)?, c.in_force()?.store))).await;
        match result {
            Ok((Some(report), _)) => {
                self.said(&report);
                let origin = crate::metrics::OriginLabels { origin: Origin::Cluster };
                self.metrics.apply_duration.get_or_create(&origin).observe(started.elapsed().as_secs_f64());
                self.refresh_in_force().await;
                Ok(report.version)
            }
            Ok((None, version)) => Ok(version),
            Err(e) => {
                let retry = match &e {
                    // It contradicts itself with this node's workloads: when they change.
                    ServerError::Node(NodeError::Conflicts(_)) => Retry::OnLocalChange,
                    ServerError::Node(
                        NodeError::TooBig(_) | NodeError::Apply { too_big: true, .. } | NodeError::OwnPolicies(_),
                    ) => Retry::No,
                    _ => Retry::Later,
                };
                self.metrics.rejected(Origin::Cluster, crate::metrics::RejectReason::of(&e));
                self.failed(ErrorSource::Cluster, format!("cluster revision {revision}: {e}"));
                Err((e.to_string(), retry))
            }
        }
    }

    /// Runs `f` on the controller, off the async threads (the store and the maps block). The
    /// only way to the controller: an async thread that locked it directly could wait behind an
    /// apply that is itself waiting for l7proxy's ack on the async threads.
    pub async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Controller) -> Result<T, NodeError> + Send + 'static,
    ) -> Result<T, ServerError> {
        let c = self.controller.clone();
        Ok(tokio::task::spawn_blocking(move || f(&mut c.lock().unwrap_or_else(|e| e.into_inner()))).await??)
    }

    /// Runs `f`, a change that puts a version in force and reports it, and logs the report.
    pub async fn changed<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Controller) -> Result<(T, ReconcileReport), NodeError> + Send + 'static,
    ) -> Result<(T, ReconcileReport), ServerError> {
        let out = self.with(f).await?;
        self.said(&out.1);
        self.refresh_in_force().await;
        Ok(out)
    }

    /// Sets `l7mesh_policy_version_in_force` from what each part has in force now.
    pub async fn refresh_in_force(&self) {
        if let Ok(in_force) = self.with(|c| c.in_force()).await {
            self.metrics.in_force(&in_force);
        }
    }

    /// A policy change from `origin`, timed, and counted as refused when it put nothing in force.
    async fn timed_change<T: Send + 'static>(
        &self,
        origin: crate::metrics::Origin,
        f: impl FnOnce(&mut Controller) -> Result<(T, ReconcileReport), NodeError> + Send + 'static,
    ) -> Result<(T, ReconcileReport), ServerError> {
        let started = std::time::Instant::now();
        let out = self.changed(f).await;
        match &out {
            Ok(_) => self
                .metrics
                .apply_duration
                .get_or_create(&crate::metrics::OriginLabels { origin })
                .observe(started.elapsed().as_secs_f64()),
            Err(e) => self.metrics.rejected(origin, crate::metrics::RejectReason::of(e)),
        }
        out
    }

    /// Brings the node's parts back to one version after a failed apply left them apart
    /// (each call one attempt; the caller repeats it).
    pub async fn converge(&self) {
        match self.with(|c| c.converge()).await {
            Ok(Some(r)) => self.said(&r),
            Ok(None) => {}
            // (The controller logs the failed attempts, not each one.)
            Err(_) => {}
        }
    }

    pub async fn reconcile(&self) -> Result<ReconcileReport, ServerError> {
        self.changed(|c| c.reconcile().map(|r| ((), r))).await.map(|(_, r)| r)
    }

    /// Remembers a failure for `/v1/status`.
    pub fn failed(&self, during: ErrorSource, error: impl Into<String>) {
        let time =
            time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
        let mut errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        errors.push_back(RecentError { time, during, error: error.into() });
        while errors.len() > RECENT_ERRORS {
            errors.pop_front();
        }
    }

    /// Logs a reconcile; warnings only when they changed.
    fn said(&self, r: &ReconcileReport) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let before = last.as_ref().map(|l| l.warnings.clone()).unwrap_or_default();
        for w in r.warnings.iter().filter(|w| !before.contains(w)) {
            warn!("{w}");
        }
        info!(
            version = r.version,
            generation = r.generation,
            policies = r.policies,
            workloads = r.workloads,
            kernel_rules = r.kernel_rules,
            closed_connections = r.closed_connections,
            closed_rerouted = r.closed_rerouted,
            proxy_us = r.proxy_us,
            kernel_us = r.kernel_us,
            "policy applied"
        );
        *last = Some(r.clone());
    }

    /// Re-reads `--policy` files if they changed; a change that does not validate is reported
    /// and the last good policy stays.
    pub async fn reload_policy_files(&self) {
        use crate::metrics::{Origin, OriginLabels, RejectReason};
        let started = std::time::Instant::now();
        let result = self.with(|c| c.reload_policy_files()).await;
        match result {
            Ok(None) => {}
            Ok(Some((diags, report))) => {
                for d in &diags {
                    tracing::warn!("{d}");
                }
                match report {
                    Some(r) => {
                        self.said(&r);
                        let origin = OriginLabels { origin: Origin::File };
                        self.metrics.apply_duration.get_or_create(&origin).observe(started.elapsed().as_secs_f64());
                        self.refresh_in_force().await;
                    }
                    None => {
                        self.metrics.rejected(Origin::File, RejectReason::Invalid);
                        tracing::warn!("policy change rejected; the last good policy stays in force");
                        let errors: Vec<String> =
                            diags.iter().filter(|d| d.severity == Severity::Error).map(|d| d.to_string()).collect();
                        self.failed(ErrorSource::PolicyFiles, errors.join("; "));
                    }
                }
            }
            Err(e) => {
                self.metrics.rejected(Origin::File, RejectReason::of(&e));
                tracing::error!("policy files not applied: {e}");
                self.failed(ErrorSource::PolicyFiles, e.to_string());
            }
        }
    }

    /// Deregisters workloads no `l7ctl run` holds any more whose cgroup is empty (their run
    /// ended while policy-api was away).
    pub async fn sweep(&self) {
        let owned: HashSet<String> = self.owned.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let result = self
            .with(move |c| {
                // (A closed store is `converge`'s to report and reopen, not an error each sweep.)
                if !c.store().is_open() {
                    return Ok((Vec::new(), None));
                }
                let stale: Vec<String> = c
                    .store()
                    .workloads()?
                    .into_iter()
                    .map(|w| w.name)
                    .filter(|n| !owned.contains(n) && c.workload_is_empty(n))
                    .collect();
                let mut report = None;
                for n in &stale {
                    report = Some(c.deregister(n)?);
                }
                Ok((stale, report))
            })
            .await;
        match result {
            Ok((stale, report)) => {
                if !stale.is_empty() {
                    self.workloads_changed();
                }
                for n in stale {
                    info!(workload = %n, "deregistered a workload whose command has ended");
                }
                if let Some(r) = report {
                    self.said(&r);
                }
            }
            Err(e) => error!(error = %e, "sweeping workloads"),
        }
    }

    /// Serves `l7ctl run` on the control socket until the process ends.
    pub async fn serve_control(self: Arc<Self>, listener: UnixListener) {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(self.clone().control_client(stream));
                }
                Err(e) => warn!(error = %e, "control socket accept"),
            }
        }
    }

    /// One control connection. A `run` registers a workload that stays registered until the
    /// client says `done` or goes away.
    async fn control_client(self: Arc<Self>, stream: UnixStream) {
        let (read, mut write) = tokio::io::split(stream);
        let mut lines = BufReader::new(read).lines();
        let mut registered: Option<String> = None;
        while let Ok(Some(line)) = lines.next_line().await {
            let request: Request = match serde_json::from_str(&line) {
                Ok(r) => r,
                Err(e) => {
                    send(&mut write, &Reply::error(format!("bad request: {e}"))).await;
                    break;
                }
            };
            match request {
                Request::Status => send(&mut write, &Reply::ok()).await,
                Request::Run { name, labels } => {
                    if registered.is_some() {
                        send(&mut write, &Reply::error("this connection already runs a workload")).await;
                        continue;
                    }
                    let n = name.clone();
                    self.owned.lock().unwrap_or_else(|e| e.into_inner()).insert(name.clone());
                    match self.changed(move |c| c.register(&n, &labels)).await {
                        Ok((cgroup, r)) => {
                            // The apply waits for l7proxy only so long (it goes ahead without a
                            // proxy that is away); the command must not start before the proxy
                            // knows the workload, or its first connections are refused as
                            // unknown. A proxy that is away is waited for no longer: the
                            // workload's marked connections fail closed until it is back.
                            if !self.hub.wait_loaded(r.version, REGISTRATION_PROXY_WAIT).await {
                                warn!(workload = %name, version = r.version, "starting the workload before l7proxy has its policy version: its connections through the proxy are refused until it does");
                            }
                            info!(workload = %name, cgroup = %cgroup.display(), version = r.version, "workload registered");
                            self.workloads_changed();
                            registered = Some(name);
                            let hide = self.private_paths.clone();
                            let reply = Reply {
                                cgroup: Some(cgroup.display().to_string()),
                                version: Some(r.version),
                                hide,
                                ..Reply::ok()
                            };
                            send(&mut write, &reply).await;
                        }
                        Err(e) => {
                            self.owned.lock().unwrap_or_else(|e| e.into_inner()).remove(&name);
                            send(&mut write, &Reply::error(e.to_string())).await
                        }
                    }
                }
                Request::Done => {
                    if let Some(name) = registered.take() {
                        self.deregister(&name).await;
                    }
                    send(&mut write, &Reply::ok()).await;
                }
            }
        }
        if let Some(name) = registered {
            self.deregister(&name).await;
        }
    }

    async fn deregister(&self, name: &str) {
        let n = name.to_string();
        match self.changed(move |c| c.deregister(&n).map(|r| ((), r))).await {
            Ok(_) => {
                info!(workload = %name, "workload deregistered");
                self.workloads_changed();
            }
            Err(e) => error!(workload = %name, error = %e, "deregistering"),
        }
        self.owned.lock().unwrap_or_else(|e| e.into_inner()).remove(name);
    }

    /// What a call to l7proxy's admin `/v1/*` sends: the node's token.
    fn proxy_headers(&self) -> l7mesh_client::Headers<'_> {
        l7mesh_client::Headers { token: Some(&self.api_token), ..Default::default() }
    }

    /// Every flow l7proxy holds that matches `query` (its filters), up to [`MAX_WINDOW_BYTES`]
    /// of them: with `since`, the answer comes from the flow history too and may be as large
    /// as it, so a larger window is refused (507) rather than held.
    pub async fn flows(&self, query: &str) -> Result<Vec<crate::flows::Flow>, ApiError> {
        let path = format!("/v1/flows?{query}");
        let got = l7mesh_client::call_bounded(
            self.proxy_admin,
            Method::GET,
            &path,
            self.proxy_headers(),
            Bytes::new(),
            MAX_WINDOW_BYTES,
        )
        .await;
        let (status, body) = match got {
            Ok(got) => got,
            Err(l7mesh_client::ClientError::TooLarge { .. }) => {
                return Err(ApiError::new(
                    StatusCode::INSUFFICIENT_STORAGE,
                    format!(
                        "the window holds more than {} MiB of flows, more than policy-api reads at once: give a shorter --since",
                        MAX_WINDOW_BYTES >> 20
                    ),
                ))
            }
            Err(e) => return Err(ApiError::unavailable(format!("l7proxy (flows): {e}"))),
        };
        if !status.is_success() {
            return Err(ApiError::new(status, String::from_utf8_lossy(&body).trim().to_string()));
        }
        Ok(crate::flows::parse_lines(&String::from_utf8_lossy(&body)))
    }
}

async fn send(stream: &mut tokio::io::WriteHalf<UnixStream>, reply: &Reply) {
    let mut line = serde_json::to_string(reply).unwrap_or_default();
    line.push('\n');
    let _ = stream.write_all(line.as_bytes()).await;
}

/// An API error: a status, a message, and (for policies that do not validate) every
/// diagnostic.
#[derive(Debug, Serialize)]
pub struct ApiError {
    #[serde(skip)]
    status: StatusCode,
    pub error: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub diagnostics: Vec<Diagnostic>,
    /// For a version that could not be put in force: the step that failed, the version
    /// refused and the one still in force.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_step: Option<crate::node::ApplyStep>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused_version: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_force: Option<u64>,
    /// False when the failure left the node's parts apart (see `/v1/status`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub converged: Option<bool>,
}

impl ApiError {
    fn new(status: StatusCode, error: impl Into<String>) -> Self {
        ApiError {
            status,
            error: error.into(),
            diagnostics: Vec::new(),
            failed_step: None,
            refused_version: None,
            in_force: None,
            converged: None,
        }
    }
    fn bad_request(error: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, error)
    }
    fn unavailable(error: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, error)
    }
}

impl From<ServerError> for ApiError {
    fn from(e: ServerError) -> Self {
        use crate::node::ApplyStep;
        let status = match &e {
            // The request contradicts itself or what is stored: the caller's to fix.
            ServerError::Node(NodeError::Conflicts(_) | NodeError::BadName(_) | NodeError::Labels(_)) => {
                StatusCode::BAD_REQUEST
            }
            // The version does not fit the kernel's maps (their sizes are l7proxy's flags).
            ServerError::Node(NodeError::TooBig(_) | NodeError::Apply { too_big: true, .. }) => {
                StatusCode::INSUFFICIENT_STORAGE
            }
            // An API write to what `--policy` files manage: the caller's to decide (--force).
            ServerError::Node(NodeError::FileManaged(_)) => StatusCode::CONFLICT,
            ServerError::Node(NodeError::NotFound(_) | NodeError::Store(StoreError::NotInHistory { .. })) => {
                StatusCode::NOT_FOUND
            }
            ServerError::Node(NodeError::Store(StoreError::NoPolicySet(_))) => StatusCode::CONFLICT,
            // No l7proxy loaded it in time (restarting, stopped): worth retrying.
            ServerError::Node(NodeError::Apply { step: ApplyStep::Proxy, .. }) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let mut out = ApiError::new(status, e.to_string());
        if let ServerError::Node(NodeError::Apply { step, version, in_force, .. }) = &e {
            out.failed_step = Some(*step);
            out.refused_version = Some(*version);
            out.in_force = Some(*in_force);
        }
        if let ServerError::Node(NodeError::Diverged { version, .. }) = &e {
            out.failed_step = Some(ApplyStep::Store);
            out.refused_version = Some(*version);
            out.converged = Some(false);
        }
        out
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(&self)).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;
type Shared = State<Arc<NodeServer>>;

/// Reads the API token at `path`, creating it (32 random bytes, hex, mode 0600) if missing
/// (l7proxy, which wants the same token on its admin `/v1/*`, may have made it first).
pub fn load_or_create_token(path: &std::path::Path) -> std::io::Result<String> {
    l7mesh_api::token::load_or_create(path)
}

/// `/v1/*` needs `Authorization: Bearer <token>`; `/healthz`, `/metrics` and `/openapi.json`
/// do not (the port is closed to workloads in the kernel).
async fn require_token(
    State(token): State<Arc<String>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if !req.uri().path().starts_with("/v1/") {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| l7mesh_api::token::from_authorization(v.as_bytes()))
        .unwrap_or_default();
    if l7mesh_api::token::same(given, token.as_bytes()) {
        return next.run(req).await;
    }
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "the policy API needs the node's token (Authorization: Bearer, from <run dir>/api-token, readable by root only)",
    )
    .into_response()
}

/// The REST API (see openapi.json); `/v1/*` behind the node's token.
/// `/metrics`: OpenMetrics for Prometheus (it asks for it), the classic text format otherwise.
async fn metrics(State(s): Shared, headers: HeaderMap) -> Response {
    let text = s.metrics.encode();
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    if l7mesh_api::metrics::wants_openmetrics(accept) {
        ([(header::CONTENT_TYPE, l7mesh_api::metrics::OPENMETRICS)], text).into_response()
    } else {
        ([(header::CONTENT_TYPE, l7mesh_api::metrics::CLASSIC_TEXT)], l7mesh_api::metrics::to_classic_text(&text))
            .into_response()
    }
}

/// Counts every REST request by its route template (never the path as sent), method and code.
async fn count_requests(State(s): Shared, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let method = crate::metrics::method_label(req.method());
    let response = next.run(req).await;
    let labels = crate::metrics::RestLabels { route, method, code: response.status().as_u16() };
    s.metrics.rest_requests.get_or_create(&labels).inc();
    response
}

pub fn router(server: Arc<NodeServer>, token: String) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }))
        .route("/v1/status", get(status))
        .route("/v1/policies", get(list_policies).post(apply_policies).delete(delete_policies))
        .route("/v1/policies/{*key}", get(get_policy).delete(delete_policy))
        .route("/v1/history", get(history))
        .route("/v1/rollback", axum::routing::post(rollback))
        .route("/v1/workloads", get(list_workloads))
        .route("/v1/flows", get(flows))
        .route("/v1/simulate", axum::routing::post(simulate))
        .route("/v1/servicemap", get(servicemap))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_POLICY_BODY))
        .layer(axum::middleware::from_fn_with_state(Arc::new(token), require_token))
        .layer(axum::middleware::from_fn_with_state(server.clone(), count_requests))
        .with_state(server)
}

async fn status(State(s): Shared) -> ApiResult<Json<Status>> {
    let (in_force, policies, workloads) = s
        .with(|c| {
            Ok((c.in_force()?, c.store().policies().ok().map(|p| p.len()), c.store().workloads().ok().map(|w| w.len())))
        })
        .await?;
    let last_apply = s.last.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Ok(Json(Status {
        version: in_force.store,
        policies,
        workloads,
        proxy_connected: in_force.proxy_connected,
        proxy_version: in_force.proxy,
        in_force,
        last_apply,
        api_version: env!("CARGO_PKG_VERSION").to_string(),
        recent_errors: s.errors.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect(),
        kvstore: s.cluster().map(|c| c.status()),
    }))
}

/// policy-api's readiness, in words: 200 while the node enforces a policy version (a node
/// whose kvstore is unreachable still does, and says so), 503 before it has one in force.
async fn readyz(State(s): Shared) -> Response {
    let in_force = s.with(|c| c.in_force()).await;
    let (code, mut text) = match in_force {
        Ok(f) if f.kernel.is_some() => (StatusCode::OK, format!("ready: policy version {} in force", f.store)),
        Ok(_) => (StatusCode::SERVICE_UNAVAILABLE, "not ready: no policy version in force yet".to_string()),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}")),
    };
    if let Some(c) = s.cluster() {
        let k = c.status();
        if k.connected {
            text.push_str(&format!("; kvstore {} connected, cluster revision {} in force", k.endpoints, k.revision));
        } else {
            text.push_str(&format!(
                "; kvstore {} unreachable since {} ({}): enforcing the last policy set it had (cluster revision {})",
                k.endpoints,
                k.since,
                k.error.as_deref().unwrap_or("not connected yet"),
                k.revision
            ));
        }
    }
    text.push('\n');
    (code, [(header::CONTENT_TYPE, "text/plain")], text).into_response()
}

impl From<crate::store::StoredPolicy> for PolicyView<PolicyDocument> {
    fn from(p: crate::store::StoredPolicy) -> Self {
        let doc = p.policy.doc;
        PolicyView {
            key: doc.key(),
            kind: doc.kind.clone(),
            namespace: doc.namespace().map(str::to_string),
            name: doc.metadata.name.clone(),
            origin: p.origin,
            revision: p.revision,
            updated: p.updated,
            audit: doc.audit(),
            document: doc,
            selects: Vec::new(),
        }
    }
}

/// The views of `policies`, each with the registered workloads it selects.
fn policy_views(
    policies: Vec<crate::store::StoredPolicy>,
    workloads: &[l7policy::compile::Workload],
) -> Vec<PolicyView<PolicyDocument>> {
    policies
        .into_iter()
        .map(|p| {
            let ns = p.policy.doc.namespace().map(str::to_string);
            let matchers: Vec<l7policy::labels::Matcher> = p
                .policy
                .doc
                .rules()
                .into_iter()
                .filter_map(|(_, rule)| rule.endpoint_selector.as_ref())
                .map(|sel| l7policy::labels::Matcher::new(sel, ns.as_deref()))
                .collect();
            let mut selects: Vec<String> = workloads
                .iter()
                .filter(|w| matchers.iter().any(|m| m.matches(&w.labels)))
                .map(|w| w.name.clone())
                .collect();
            selects.sort();
            PolicyView { selects, ..PolicyView::from(p) }
        })
        .collect()
}

async fn list_policies(State(s): Shared) -> ApiResult<Json<Vec<PolicyView<PolicyDocument>>>> {
    let (mut all, workloads) = s.with(|c| Ok((c.store().policies()?, c.store().workloads()?))).await?;
    all.sort_by_key(|p| p.policy.doc.key());
    Ok(Json(policy_views(all, &workloads)))
}

async fn get_policy(State(s): Shared, Path(key): Path<String>) -> ApiResult<Json<PolicyView<PolicyDocument>>> {
    let (all, workloads) = s.with(|c| Ok((c.store().policies()?, c.store().workloads()?))).await?;
    let one: Vec<_> = all.into_iter().filter(|p| p.policy.doc.key() == key).collect();
    policy_views(one, &workloads)
        .pop()
        .map(Json)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no policy `{key}`")))
}

/// `?force=true`: write policies that `--policy` files manage anyway.
#[derive(Deserialize, Default)]
struct ForceQuery {
    #[serde(default)]
    force: bool,
}

/// Who the client says is behind a write (l7ctl: the user and the command), for the history.
fn actor(headers: &HeaderMap) -> Actor {
    let by = headers
        .get(ACTOR_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.chars().filter(|c| !c.is_control()).take(200).collect::<String>())
        .filter(|v| !v.is_empty());
    Actor { by, rollback_of: None }
}

/// Deletes `keys` (all or none) and answers what it did; a failure is remembered for status.
async fn delete_keys(s: &NodeServer, keys: Vec<String>, actor: Actor, force: bool) -> ApiResult<Json<Applied>> {
    if let Some(cluster) = s.cluster() {
        let change = crate::cluster::SetChange::Delete(keys);
        return cluster_write(s, cluster, change, Vec::new(), actor, ErrorSource::Delete).await;
    }
    let k = keys.clone();
    let started = std::time::Instant::now();
    let result = s.with(move |c| c.delete(&k, &actor, force)).await;
    let report = result.inspect_err(|e| {
        s.failed(ErrorSource::Delete, e.to_string());
        s.metrics.rejected(crate::metrics::Origin::Api, crate::metrics::RejectReason::of(e));
    })?;
    s.said(&report);
    let origin = crate::metrics::OriginLabels { origin: crate::metrics::Origin::Api };
    s.metrics.apply_duration.get_or_create(&origin).observe(started.elapsed().as_secs_f64());
    s.refresh_in_force().await;
    Ok(Json(Applied {
        version: report.version,
        changes: keys.into_iter().map(|k| (k, l7mesh_api::rest::Change::Deleted)).collect(),
        warnings: report.warnings.clone(),
        report,
        cluster: None,
    }))
}

/// A policy write in a cluster: made over the cluster's set as it is now (read from etcd),
/// every check of a local apply made on the set that results (on this node), then written in
/// one transaction that fails if the set changed meanwhile (read again, checked again: at most
/// 5 times). Every node then puts it in force through its watch (this one too); the answer
/// says what each node said.
async fn cluster_write(
    s: &NodeServer,
    cluster: &Arc<crate::cluster::Cluster>,
    change: crate::cluster::SetChange,
    mut warnings: Vec<String>,
    actor: Actor,
    during: ErrorSource,
) -> ApiResult<Json<Applied>> {
    use crate::cluster::ClusterError;
    let started = std::time::Instant::now();
    let refuse = |e: ApiError| {
        s.failed(during, e.error.clone());
        e
    };
    let from_cluster = |e: ClusterError| {
        let status = match e {
            ClusterError::NotFound(_) => StatusCode::NOT_FOUND,
            ClusterError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ClusterError::Unreachable(_) | ClusterError::Etcd { .. } | ClusterError::Contended(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    };
    let mut attempts = 0;
    let (revision, changes) = loop {
        attempts += 1;
        if attempts > 5 {
            return Err(refuse(from_cluster(ClusterError::Contended(5))));
        }
        let snapshot = cluster.snapshot().await.map_err(from_cluster).map_err(refuse)?;
        let (set, changes, unread) = cluster.result_of(&snapshot, &change).map_err(|e| {
            let status = if e.starts_with("no policy") { StatusCode::NOT_FOUND } else { StatusCode::CONFLICT };
            refuse(ApiError::new(
                status,
                if status == StatusCode::NOT_FOUND {
                    e
                } else {
                    format!("{e}: the cluster's set cannot take a write until that policy is replaced or deleted; nothing was written")
                },
            ))
        })?;
        let checked = s.with(move |c| c.dry_run_set(&set)).await.map_err(ApiError::from).map_err(refuse)?;
        match cluster.commit(&snapshot, &change, actor.by.clone()).await.map_err(from_cluster).map_err(refuse)? {
            Some(revision) => {
                warnings.extend(checked);
                warnings.extend(unread);
                break (revision, changes);
            }
            // Another write landed between the read and this one: again, on the new set.
            None => continue,
        }
    };
    let nodes = cluster.wait_in_force(revision, crate::cluster::NODES_WAIT).await;
    let origin = crate::metrics::OriginLabels { origin: crate::metrics::Origin::Api };
    s.metrics.apply_duration.get_or_create(&origin).observe(started.elapsed().as_secs_f64());
    let report = s.last.lock().unwrap_or_else(|e| e.into_inner()).clone().unwrap_or_default();
    warnings.sort();
    warnings.dedup();
    Ok(Json(Applied {
        version: report.version,
        changes,
        warnings,
        report,
        cluster: Some(l7mesh_api::rest::ClusterApplied { revision, nodes }),
    }))
}

async fn delete_policy(
    State(s): Shared,
    Path(key): Path<String>,
    Query(q): Query<ForceQuery>,
    headers: HeaderMap,
) -> ApiResult<Json<Applied>> {
    delete_keys(&s, vec![key], actor(&headers), q.force).await
}

/// `DELETE /v1/policies` with an upload: deletes the policies its documents name (all or
/// none), as `l7ctl delete -f FILE` does.
async fn delete_policies(
    State(s): Shared,
    Query(query): Query<UploadQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<Applied>> {
    if query.dry_run {
        // Not a delete to try out: refused, so that a dry run never deletes.
        return Err(ApiError::bad_request("a delete has no dry run (dryRun=true); nothing was deleted"));
    }
    let (policies, _) = load_upload(&headers, &query, &body)?;
    let keys = policies.iter().map(|p| p.doc.key()).collect();
    delete_keys(&s, keys, actor(&headers), query.force).await
}

async fn rollback(State(s): Shared, headers: HeaderMap, Json(req): Json<Rollback>) -> ApiResult<Json<RolledBack>> {
    if let Some(cluster) = s.cluster() {
        // The set this node's history holds for that version becomes the cluster's set again
        // (versions are this node's numbering: `l7ctl history` on the node it runs on).
        let version = req.version;
        let target = s.with(move |c| Ok(c.store().policy_set(version)?)).await?;
        let mut actor = actor(&headers);
        actor.by = Some(format!(
            "{} (rollback to version {version} of node {})",
            actor.by.unwrap_or_default(),
            cluster.config.node
        ));
        let change = crate::cluster::SetChange::Replace(target.into_iter().map(|p| p.policy).collect());
        let applied = cluster_write(&s, cluster, change, Vec::new(), actor, ErrorSource::Rollback).await?;
        return Ok(Json(RolledBack { applied: applied.0, rollback_of: version, file_managed: Vec::new() }));
    }
    let by = actor(&headers).by;
    let result = s.changed(move |c| c.rollback(req.version, by).map(|(ch, kept, r)| ((ch, kept), r))).await;
    let ((changes, file_managed), report) = result.inspect_err(|e| s.failed(ErrorSource::Rollback, e.to_string()))?;
    Ok(Json(RolledBack {
        applied: Applied { version: report.version, changes, warnings: report.warnings.clone(), report, cluster: None },
        rollback_of: req.version,
        file_managed,
    }))
}

/// A policy upload: an [`Upload`] (what `l7ctl apply` sends, so errors name the user's
/// files), or the YAML/JSON text itself (`?file=NAME` names it).
#[derive(Deserialize, Default)]
struct UploadQuery {
    file: Option<String>,
    #[serde(default, rename = "dryRun")]
    dry_run: bool,
    /// Write policies that `--policy` files manage anyway.
    #[serde(default)]
    force: bool,
}

/// Validates an upload as a whole: the policies, or every diagnostic (400) if any is an error.
fn load_upload(
    headers: &HeaderMap,
    query: &UploadQuery,
    body: &Bytes,
) -> ApiResult<(Vec<LoadedPolicy>, Vec<Diagnostic>)> {
    let text = std::str::from_utf8(body).map_err(|e| ApiError::bad_request(format!("the body is not UTF-8: {e}")))?;
    let is_upload = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with(Upload::CONTENT_TYPE));
    let files = if is_upload {
        serde_json::from_str::<Upload>(text)
            .map_err(|e| ApiError::bad_request(format!("upload: {e}")))?
            .files
            .into_iter()
            .map(|f| (f.name, f.text))
            .collect()
    } else {
        vec![(query.file.clone().unwrap_or_else(|| "<request body>".into()), text.to_string())]
    };
    let mut policies = Vec::new();
    let mut diags = Vec::new();
    for (name, text) in &files {
        let (p, d) = load_text(name, text);
        policies.extend(p);
        diags.extend(d);
    }
    if diags.iter().any(|d| d.severity == Severity::Error) {
        let errors = diags.iter().filter(|d| d.severity == Severity::Error).count();
        return Err(ApiError {
            diagnostics: diags,
            ..ApiError::bad_request(format!(
                "{errors} error(s); nothing was applied, the last good policy stays in force"
            ))
        });
    }
    if policies.is_empty() {
        return Err(ApiError::bad_request("no policy documents in the request; nothing was applied"));
    }
    let mut keys = HashSet::new();
    for p in &policies {
        if !keys.insert(p.doc.key()) {
            return Err(ApiError::bad_request(format!(
                "{}:{}: policy `{}` appears twice in one apply; nothing was applied",
                p.file,
                p.line,
                p.doc.key()
            )));
        }
    }
    Ok((policies, diags))
}

async fn apply_policies(
    State(s): Shared,
    Query(query): Query<UploadQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<Applied>> {
    let loaded = load_upload(&headers, &query, &body);
    if let (Err(e), false) = (&loaded, query.dry_run) {
        s.failed(ErrorSource::Apply, e.error.clone());
        let reason = if e.status == StatusCode::PAYLOAD_TOO_LARGE {
            crate::metrics::RejectReason::TooBig
        } else {
            crate::metrics::RejectReason::Invalid
        };
        s.metrics.rejected(crate::metrics::Origin::Api, reason);
    }
    let (policies, diags) = loaded?;
    let mut warnings: Vec<String> = diags.iter().map(|d| d.to_string()).collect();
    let force = query.force;
    if query.dry_run {
        // Every check of a real apply, then nothing is stored or applied.
        if let Some(cluster) = s.cluster() {
            // On the cluster's set as it is now.
            let snapshot = cluster.snapshot().await.map_err(|e| ApiError::unavailable(e.to_string()))?;
            let (set, changes, unread) = cluster
                .result_of(&snapshot, &crate::cluster::SetChange::Apply(policies))
                .map_err(|e| ApiError::new(StatusCode::CONFLICT, e))?;
            warnings.extend(unread);
            warnings.extend(s.with(move |c| c.dry_run_set(&set)).await?);
            return Ok(Json(Applied {
                version: 0,
                changes,
                warnings,
                report: ReconcileReport::default(),
                cluster: None,
            }));
        }
        let (changes, compiled_warnings) = s.with(move |c| c.dry_run("api", &policies, force)).await?;
        warnings.extend(compiled_warnings);
        return Ok(Json(Applied { version: 0, changes, warnings, report: ReconcileReport::default(), cluster: None }));
    }
    let actor = actor(&headers);
    if let Some(cluster) = s.cluster() {
        let change = crate::cluster::SetChange::Apply(policies);
        return cluster_write(&s, cluster, change, warnings, actor, ErrorSource::Apply).await;
    }
    let result = s.timed_change(crate::metrics::Origin::Api, move |c| c.apply("api", &policies, &actor, force)).await;
    let (changes, report) = result.inspect_err(|e| s.failed(ErrorSource::Apply, e.to_string()))?;
    warnings.extend(report.warnings.iter().cloned());
    Ok(Json(Applied { version: report.version, changes, warnings, report, cluster: None }))
}

async fn history(State(s): Shared) -> ApiResult<Json<Vec<HistoryEntry>>> {
    Ok(Json(s.with(|c| Ok(c.store().history()?)).await?))
}

async fn list_workloads(State(s): Shared) -> ApiResult<Json<Vec<WorkloadView>>> {
    let node = s.cluster().map(|c| c.config.node.clone()).unwrap_or_default();
    let views = s
        .with(move |c| {
            let workloads = c.store().workloads()?;
            Ok(workloads
                .into_iter()
                .map(|w| {
                    let ep = c.compiled.as_ref().and_then(|comp| comp.endpoint_by_cgroup(w.cgroup_id).cloned());
                    WorkloadView {
                        node: node.clone(),
                        namespace: w.labels.namespace().to_string(),
                        labels: w.labels.display(),
                        endpoint_id: ep.as_ref().map(|e| e.endpoint_id),
                        identity: ep.as_ref().map(|e| e.identity),
                        ingress_enforced: ep.as_ref().is_some_and(|e| e.ingress_enforced),
                        egress_enforced: ep.as_ref().is_some_and(|e| e.egress_enforced),
                        name: w.name,
                        cgroup_id: w.cgroup_id,
                    }
                })
                .collect::<Vec<_>>())
        })
        .await?;
    let mut views = views;
    if let Some(c) = s.cluster() {
        for w in c.remote_workloads() {
            let labels = l7policy::labels::Labels::parse(&w.labels).ok();
            views.push(WorkloadView {
                namespace: labels.as_ref().map(|l| l.namespace().to_string()).unwrap_or_default(),
                labels: labels.map(|l| l.display()).unwrap_or(w.labels),
                name: w.name,
                node: w.node,
                cgroup_id: 0,
                endpoint_id: None,
                identity: None,
                ingress_enforced: false,
                egress_enforced: false,
            });
        }
    }
    views.sort_by(|a, b| (&a.node, &a.name).cmp(&(&b.node, &b.name)));
    Ok(Json(views))
}

/// Flows from l7proxy (its ring; with `since`, its flow history too), filtered there;
/// `follow=true` streams.
async fn flows(State(s): Shared, RawQuery(query): RawQuery) -> ApiResult<Response> {
    let path = format!("/v1/flows?{}", query.unwrap_or_default());
    let (status, body) = l7mesh_client::send(s.proxy_admin, Method::GET, &path, s.proxy_headers(), Bytes::new())
        .await
        .map_err(|e| ApiError::unavailable(format!("l7proxy (flows): {e}")))?;
    Ok(Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, if status.is_success() { "application/x-ndjson" } else { "text/plain" })
        .body(Body::new(body))
        .unwrap_or_default())
}

#[derive(Deserialize, Default)]
struct WindowQuery {
    since: Option<String>,
    format: Option<String>,
    file: Option<String>,
}

fn since_query(since: &Option<String>) -> ApiResult<String> {
    match since {
        None => Ok(String::new()),
        Some(s) if crate::flows_window_ok(s) => Ok(format!("since={s}")),
        Some(s) => Err(ApiError::bad_request(format!("since: expected a duration such as 30s, 5m, 2h, got `{s}`"))),
    }
}

async fn simulate(
    State(s): Shared,
    Query(q): Query<WindowQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<crate::simulate::SimulationReport>> {
    let upload = UploadQuery { file: q.file.clone(), dry_run: true, force: false };
    let (candidate, _) = load_upload(&headers, &upload, &body)?;
    let flows = s.flows(&since_query(&q.since)?).await?;
    let flow_endpoints: Vec<crate::flows::FlowEndpoint> =
        flows.iter().flat_map(|f| [f.source.clone(), f.destination.clone()]).collect();
    let compiled = s
        .with(move |c| {
            // The candidate set: what is stored, with the candidate's documents applied over it.
            let mut policies: Vec<LoadedPolicy> = c.store().policies()?.into_iter().map(|p| p.policy).collect();
            for p in candidate {
                policies.retain(|q| q.doc.key() != p.doc.key());
                policies.push(p);
            }
            let mut workloads = c.store().workloads()?;
            workloads.extend(crate::simulate::departed_workloads(&flow_endpoints, &workloads));
            Ok(l7policy::compile::compile(&policies, &workloads, &crate::node::host_prefixes(), 0))
        })
        .await?;
    if !compiled.conflicts.is_empty() {
        return Err(ApiError::bad_request(format!(
            "the candidate set cannot apply: {}",
            compiled.conflicts.join("; ")
        )));
    }
    Ok(Json(crate::simulate::simulate(&compiled, &flows)))
}

async fn servicemap(State(s): Shared, Query(q): Query<WindowQuery>) -> ApiResult<Response> {
    let flows = s.flows(&since_query(&q.since)?).await?;
    let map = crate::servicemap::build(&flows);
    Ok(match q.format.as_deref().unwrap_or("json") {
        "dot" => ([(header::CONTENT_TYPE, "text/vnd.graphviz")], crate::servicemap::to_dot(&map)).into_response(),
        "json" => Json(map).into_response(),
        other => return Err(ApiError::bad_request(format!("format: expected dot or json, got `{other}`"))),
    })
}

/// The most flow lines `simulate` and `servicemap` read for one window (about 100,000 flows;
/// l7proxy's ring alone is a few MiB).
pub const MAX_WINDOW_BYTES: usize = 64 << 20;

/// How often `--policy` files are checked for changes and stale workloads swept.
pub const POLL_FILES: Duration = Duration::from_millis(300);

#[cfg(test)]
mod tests {
    use super::*;

    /// What a client says about itself is recorded, but never a control character (a forged
    /// line in `l7ctl history`), never more than 200 characters, and nothing when it is empty.
    #[test]
    fn the_actor_header_is_recorded_printable_and_bounded() {
        let with = |v: &[u8]| {
            let mut h = HeaderMap::new();
            h.insert(ACTOR_HEADER, axum::http::HeaderValue::from_bytes(v).unwrap());
            actor(&h).by
        };
        assert_eq!(with(b"alice (l7ctl apply -f a.yaml)").as_deref(), Some("alice (l7ctl apply -f a.yaml)"));
        assert_eq!(with(b"a\tb\tc").as_deref(), Some("abc"), "tabs are dropped");
        assert_eq!(with(&[b'x'; 500]).map(|b| b.len()), Some(200));
        assert_eq!(with(b"\t"), None);
        assert_eq!(actor(&HeaderMap::new()), Actor::default());
    }
}

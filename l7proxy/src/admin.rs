//! The admin listener (127.0.0.1:15000): `/healthz`, `/readyz`, `/metrics`, `/v1/flows`,
//! `/v1/counters`.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use redirector::Maps;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::warn;

use crate::flows::{FlowFilter, FlowLog};
use crate::metrics::Metrics;

pub struct Admin {
    pub ready: AtomicBool,
    pub flows: Arc<FlowLog>,
    pub metrics: Arc<Metrics>,
    pub maps: Arc<Maps>,
}

pub async fn serve(listener: TcpListener, admin: Arc<Admin>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => { warn!(error = %e, "admin accept failed"); continue; }
            },
            _ = shutdown.changed() => return,
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(route(&admin, req)) }
            });
            if let Err(e) =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await
            {
                warn!(error = %e, "admin connection");
            }
        });
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>, content_type: &'static str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()))
        .unwrap_or_default()
}

fn route(admin: &Admin, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n", "text/plain");
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n", "text/plain"),
        // Ready: datapath attached, listeners up, and a policy generation loaded.
        "/readyz" => match (admin.ready.load(Ordering::Acquire), admin.maps.generation()) {
            (true, Ok(generation)) if generation > 0 => {
                text(StatusCode::OK, format!("ready: policy generation {generation}\n"), "text/plain")
            }
            (true, Ok(_)) => text(StatusCode::SERVICE_UNAVAILABLE, "not ready: no policy loaded yet\n", "text/plain"),
            (true, Err(e)) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n"), "text/plain"),
            (false, _) => {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready: datapath or listeners not up\n", "text/plain")
            }
        },
        "/metrics" => {
            text(StatusCode::OK, admin.metrics.encode(), "application/openmetrics-text; version=1.0.0; charset=utf-8")
        }
        "/v1/counters" => match admin.maps.counters() {
            Ok(c) => {
                let obj: serde_json::Map<String, serde_json::Value> =
                    c.values.iter().map(|(k, v)| (k.name().to_string(), (*v).into())).collect();
                text(StatusCode::OK, serde_json::Value::Object(obj).to_string() + "\n", "application/json")
            }
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("reading BPF counters: {e}\n"), "text/plain"),
        },
        "/v1/flows" => {
            let filter = parse_filter(req.uri().query().unwrap_or(""));
            // JSON Lines: one flow per line, oldest first.
            let mut body = String::new();
            for r in admin.flows.snapshot(&filter) {
                body.push_str(&serde_json::to_string(&r).unwrap_or_default());
                body.push('\n');
            }
            text(StatusCode::OK, body, "application/x-ndjson")
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n", "text/plain"),
    }
}

fn parse_filter(query: &str) -> FlowFilter {
    let mut f = FlowFilter::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "verdict" => f.verdict = Some(v.to_string()),
            "direction" => f.direction = Some(v.to_string()),
            "observer" => f.observer_prefix = Some(v.to_string()),
            _ => {}
        }
    }
    f
}

//! A small HTTP/1.1 client for the node's loopback APIs (policy-api on 127.0.0.1:9090, l7proxy's
//! admin on 127.0.0.1:15000): one connection per request, hyper's client connection, no pool
//! (these are a handful of control calls, not traffic).
#![forbid(unsafe_code)]

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot reach {addr}: {source}")]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error("{addr}: {source}")]
    Http { addr: SocketAddr, source: hyper::Error },
    #[error("bad request: {0}")]
    Request(#[from] http::Error),
}

/// One request's optional headers.
#[derive(Clone, Copy, Default)]
pub struct Headers<'a> {
    pub content_type: Option<&'a str>,
    /// Sent as `Authorization: Bearer`.
    pub token: Option<&'a str>,
    /// Who is behind the request, for policy-api's history (`l7mesh-actor`).
    pub actor: Option<&'a str>,
}

/// Sends one request and returns the status and the (streaming) body.
pub async fn send(
    addr: SocketAddr,
    method: Method,
    path_and_query: &str,
    headers: Headers<'_>,
    body: Bytes,
) -> Result<(StatusCode, Incoming), ClientError> {
    let stream = tokio::net::TcpStream::connect(addr).await.map_err(|source| ClientError::Connect { addr, source })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|source| ClientError::Http { addr, source })?;
    tokio::spawn(conn);
    let mut req = Request::builder().method(method).uri(path_and_query).header("host", addr.to_string());
    if let Some(ct) = headers.content_type {
        req = req.header("content-type", ct);
    }
    if let Some(token) = headers.token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    if let Some(actor) = headers.actor {
        req = req.header(l7mesh_api::rest::ACTOR_HEADER, actor);
    }
    let response =
        sender.send_request(req.body(Full::new(body))?).await.map_err(|source| ClientError::Http { addr, source })?;
    Ok((response.status(), response.into_body()))
}

/// Sends one request and reads the whole body.
pub async fn call(
    addr: SocketAddr,
    method: Method,
    path_and_query: &str,
    headers: Headers<'_>,
    body: Bytes,
) -> Result<(StatusCode, Bytes), ClientError> {
    let (status, incoming) = send(addr, method, path_and_query, headers, body).await?;
    let body = incoming.collect().await.map_err(|source| ClientError::Http { addr, source })?.to_bytes();
    Ok((status, body))
}

/// `%`-encodes a query value.
pub fn encode_query_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

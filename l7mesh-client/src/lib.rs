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
    #[error("{addr}: the answer is larger than {max} bytes")]
    TooLarge { addr: SocketAddr, max: usize },
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

/// [`call`], reading at most `max` bytes of the body (an answer that may be as large as a disk,
/// such as a window of flow history): larger is [`ClientError::TooLarge`], and no more than
/// `max` bytes (and one frame) are ever held.
pub async fn call_bounded(
    addr: SocketAddr,
    method: Method,
    path_and_query: &str,
    headers: Headers<'_>,
    body: Bytes,
    max: usize,
) -> Result<(StatusCode, Bytes), ClientError> {
    let (status, incoming) = send(addr, method, path_and_query, headers, body).await?;
    match read_bounded(incoming, max).await {
        Ok(Some(body)) => Ok((status, body)),
        Ok(None) => Err(ClientError::TooLarge { addr, max }),
        Err(source) => Err(ClientError::Http { addr, source }),
    }
}

/// The body, or `None` once it passes `max` bytes (stopping there).
async fn read_bounded<B>(mut body: B, max: usize) -> Result<Option<Bytes>, B::Error>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
{
    let mut out = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            if out.len() + data.len() > max {
                return Ok(None);
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(Some(out.freeze()))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// An answer larger than the bound is refused, not held; one at the bound is read whole.
    #[test]
    fn a_bounded_read_stops_past_its_bound() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let body = |n: usize| Full::new(Bytes::from(vec![b'x'; n]));
        assert_eq!(rt.block_on(read_bounded(body(1000), 1000)).unwrap().map(|b| b.len()), Some(1000));
        assert_eq!(rt.block_on(read_bounded(body(1001), 1000)).unwrap(), None);
        assert_eq!(rt.block_on(read_bounded(body(0), 0)).unwrap().map(|b| b.len()), Some(0));
    }
}

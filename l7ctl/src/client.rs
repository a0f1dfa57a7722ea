//! The node's APIs as l7ctl calls them: policy-api's REST API (with its token) and the TLS
//! broker's admin socket.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http::Method;
use l7mesh_api::layout::{self, DEFAULT_RUN_DIR};
use l7mesh_api::rest::{ApiFailure, ErrorReply};
use l7mesh_client as client;

/// policy-api as the API commands reach it.
pub(crate) struct Api {
    pub(crate) addr: SocketAddr,
    pub(crate) token_file: PathBuf,
    /// The token, or why it could not be read.
    pub(crate) token: std::result::Result<String, String>,
    /// Who is behind a write, for the node's history: `USER (l7ctl ARGS)`.
    pub(crate) actor: String,
}

/// `USER (l7ctl ARGS)`: the user (the one who ran sudo, if it was sudo) and the command, as the
/// history records who made a version; printable characters only, at most 200.
pub(crate) fn actor() -> String {
    let user = std::env::var("SUDO_USER")
        .ok()
        .filter(|u| !u.is_empty())
        .or_else(|| nix::unistd::User::from_uid(nix::unistd::getuid()).ok().flatten().map(|u| u.name))
        .unwrap_or_else(|| format!("uid {}", nix::unistd::getuid()));
    let args: Vec<String> = std::env::args().skip(1).collect();
    let text = format!("{user} (l7ctl {})", args.join(" "));
    text.chars().filter(|c| !c.is_control()).take(200).collect()
}

impl Api {
    pub(crate) fn new(addr: SocketAddr, token_file: Option<PathBuf>) -> Self {
        let token_file = token_file.unwrap_or_else(|| {
            layout::api_token(Path::new(&std::env::var("L7MESH_RUN_DIR").unwrap_or_else(|_| DEFAULT_RUN_DIR.into())))
        });
        let token = std::fs::read_to_string(&token_file).map(|t| t.trim().to_string()).map_err(|e| e.to_string());
        Api { addr, token_file, token, actor: actor() }
    }

    pub(crate) fn headers<'a>(&'a self, content_type: Option<&'a str>) -> client::Headers<'a> {
        client::Headers { content_type, token: self.token.as_deref().ok(), actor: Some(&self.actor) }
    }
}

/// How long `l7ctl ca` and `l7ctl secret import` wait for the broker's answer.
pub(crate) const BROKER_ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

/// One request on the broker's root-only admin socket; a broker that does not answer within
/// [`BROKER_ADMIN_TIMEOUT`] (stopped, stuck) is an error that says so.
pub(crate) fn broker_admin(run_dir: &Path, request: &l7mesh_api::broker::Request) -> Result<l7mesh_api::broker::Reply> {
    use std::io::{BufRead, Write};
    let path = layout::broker_admin_socket(run_dir);
    let mut stream = std::os::unix::net::UnixStream::connect(&path).map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the TLS broker at {} ({e}); is `l7ctl up` running, and are you root?",
            path.display()
        )
    })?;
    stream.set_read_timeout(Some(BROKER_ADMIN_TIMEOUT))?;
    stream.set_write_timeout(Some(BROKER_ADMIN_TIMEOUT))?;
    let timed_out = |e: std::io::Error| {
        if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) {
            let after = match request {
                l7mesh_api::broker::Request::Import { .. } => {
                    "; the import may still take effect when it resumes (importing again is safe)"
                }
                _ => "",
            };
            anyhow::anyhow!(
                "the TLS broker at {} did not answer within {} s (stopped or stuck?){after}",
                path.display(),
                BROKER_ADMIN_TIMEOUT.as_secs()
            )
        } else {
            anyhow::anyhow!("talking to the TLS broker at {}: {e}", path.display())
        }
    };
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(timed_out)?;
    let mut reply = String::new();
    std::io::BufReader::new(stream).read_line(&mut reply).map_err(timed_out)?;
    let reply: l7mesh_api::broker::Reply = serde_json::from_str(&reply).context("the broker's reply")?;
    if !reply.ok {
        bail!("the broker refused: {}", reply.error.unwrap_or_default());
    }
    Ok(reply)
}

/// The status code of `GET path`, or None if nothing answers.
pub(crate) async fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    client::call(addr, Method::GET, path, Default::default(), Bytes::new()).await.ok().map(|(s, _)| s.as_u16())
}

pub(crate) fn api_unreachable(api: &Api, e: client::ClientError) -> anyhow::Error {
    anyhow::anyhow!(
        "{e}\nis the node running (`l7ctl up`)? policy-api is expected on {} (--api / L7MESH_API)",
        api.addr
    )
}

/// Calls policy-api; a non-2xx answer becomes an error carrying its message and diagnostics.
pub(crate) async fn api_call(api: &Api, method: Method, path: &str, ct: Option<&str>, body: Bytes) -> Result<Bytes> {
    let (status, body) =
        client::call(api.addr, method, path, api.headers(ct), body).await.map_err(|e| api_unreachable(api, e))?;
    if status.is_success() {
        return Ok(body);
    }
    if status == http::StatusCode::UNAUTHORIZED {
        if let Err(e) = &api.token {
            bail!("cannot read the node's API token at {} ({e}); the policy API is root's", api.token_file.display());
        }
    }
    let reply = ErrorReply::from_body(&body);
    for d in &reply.diagnostics {
        eprintln!("{d}");
    }
    let message = if reply.error.is_empty() { "request failed".to_string() } else { reply.error };
    let reason = status.canonical_reason().unwrap_or_default().to_string();
    Err(ApiFailure { status: status.as_u16(), reason, message }.into())
}

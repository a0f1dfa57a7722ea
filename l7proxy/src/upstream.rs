//! The upstream leg's socket: marked, bound to the source [`UpstreamSource`] names (the
//! client's own address, or the proxy's towards loopback), connected within a deadline.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use redirector::ProxyAddrs;
use thiserror::Error;
use tokio::net::{TcpSocket, TcpStream};

pub use crate::client_addr::UpstreamSource;

/// Why the upstream leg could not be opened.
#[derive(Debug, Error)]
pub enum UpstreamError {
    #[error("upstream {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("upstream {0}: connect timed out")]
    Timeout(SocketAddr),
}

/// Opens the upstream leg: marked with the proxy's SO_MARK (connect hooks never redirect it,
/// and sock_ops records it so that sk_lookup never judges or steers it again) and bound to
/// `source`'s address, if it names one.
pub async fn connect_upstream(
    addr: SocketAddr,
    proxy: &ProxyAddrs,
    source: UpstreamSource,
    timeout: Duration,
) -> Result<TcpStream, UpstreamError> {
    let upstream_err = |source| UpstreamError::Connect { addr, source };
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(upstream_err)?;
    // Mark 0 is no mark: setting it would need CAP_NET_ADMIN for nothing (the in-process tests
    // run the proxy unprivileged with mark 0).
    if proxy.mark != 0 {
        socket2::SockRef::from(&socket).set_mark(proxy.mark).map_err(upstream_err)?;
    }
    socket.set_nodelay(true).map_err(upstream_err)?;
    if let Some(src) = source.bind() {
        // Port chosen at connect, not at bind: bound sockets would each hold one of the
        // node's ephemeral ports exclusively (TIME_WAIT ones too), so one busy client could
        // use them all up for every workload's loopback upstreams.
        let no_port = nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::IpBindAddressNoPort, &true);
        if let (Err(e), true) = (no_port, addr.is_ipv4()) {
            return Err(upstream_err(std::io::Error::from(e)));
        }
        // An IPv4 source on an IPv6 socket (a v4-mapped destination) is bound as mapped.
        let src = match (src, addr) {
            (std::net::IpAddr::V4(v4), SocketAddr::V6(_)) => v4.to_ipv6_mapped().into(),
            (src, _) => src,
        };
        socket.bind(SocketAddr::new(src, 0)).map_err(upstream_err)?;
    }
    match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(upstream_err(e)),
        Err(_) => Err(UpstreamError::Timeout(addr)),
    }
}

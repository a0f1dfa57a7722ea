//! The upstream leg's socket: marked, bound to the proxy's source towards loopback, connected
//! within a deadline.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use redirector::ProxyAddrs;
use thiserror::Error;
use tokio::net::{TcpSocket, TcpStream};

/// Why the upstream leg could not be opened.
#[derive(Debug, Error)]
pub enum UpstreamError {
    #[error("upstream {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("upstream {0}: connect timed out")]
    Timeout(SocketAddr),
}

/// Opens the upstream leg: marked with the proxy's SO_MARK (connect hooks never redirect it)
/// and, towards loopback, bound to the proxy's dedicated source (sk_lookup never steers it).
pub async fn connect_upstream(
    addr: SocketAddr,
    proxy: &ProxyAddrs,
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
    if addr.ip().is_loopback() {
        let src: IpAddr = match addr {
            SocketAddr::V4(_) => proxy.upstream_src4.into(),
            SocketAddr::V6(_) => proxy.upstream_src6.into(),
        };
        // Port chosen at connect, not at bind: bound sockets would each hold one of the
        // node's ephemeral ports exclusively (TIME_WAIT ones too), so one busy client could
        // use them all up for every workload's loopback upstreams.
        let no_port = nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::IpBindAddressNoPort, &true);
        if let (Err(e), true) = (no_port, addr.is_ipv4()) {
            return Err(upstream_err(std::io::Error::from(e)));
        }
        socket.bind(SocketAddr::new(src, 0)).map_err(upstream_err)?;
    }
    match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(upstream_err(e)),
        Err(_) => Err(UpstreamError::Timeout(addr)),
    }
}

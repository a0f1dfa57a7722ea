//! The server name a TLS client asks for, read from its ClientHello without consuming it, so a
//! `serverNames` port can be judged and then forwarded byte for byte. rustls parses the hello:
//! the same parser the TLS modes will use, rather than a hand-written one.

use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpStream;

/// A ClientHello larger than this is refused (RFC 8446 allows up to 2^24, real ones are a few KiB
/// even with post-quantum key shares).
pub const MAX_CLIENT_HELLO: usize = 16 * 1024 + 5;

#[derive(Debug, Error)]
pub enum SniError {
    #[error("no complete TLS ClientHello within {0:?}")]
    Timeout(Duration),
    #[error("the client closed before a complete TLS ClientHello")]
    Closed,
    #[error("not a TLS ClientHello: {0}")]
    NotTls(String),
    #[error("TLS ClientHello larger than {MAX_CLIENT_HELLO} bytes")]
    TooLarge,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Peeks until a whole ClientHello is buffered and returns its SNI (None when it has none).
pub async fn peek_server_name(stream: &TcpStream, within: Duration) -> Result<Option<String>, SniError> {
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = vec![0u8; MAX_CLIENT_HELLO];
    let mut seen = 0;
    let mut pause = Duration::from_millis(2);
    loop {
        let n =
            tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await.map_err(|_| SniError::Timeout(within))??;
        if n == 0 {
            return Err(SniError::Closed);
        }
        if n > seen {
            seen = n;
            if let Some(name) = parse(&buf[..n])? {
                return Ok(name);
            }
            if n == buf.len() {
                return Err(SniError::TooLarge);
            }
        }
        // peek() returns at once while any byte is queued; wait for the rest of the hello,
        // backing off (2 ms doubling to 50 ms) so a client that sends part of a hello and goes
        // silent costs a few wakeups, not one every 2 ms until the deadline.
        if tokio::time::Instant::now() >= deadline {
            return Err(SniError::Timeout(within));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Some(sni) once `bytes` hold a complete ClientHello; None while more bytes are needed.
pub fn parse(mut bytes: &[u8]) -> Result<Option<Option<String>>, SniError> {
    let mut acceptor = rustls::server::Acceptor::default();
    while !bytes.is_empty() {
        if acceptor.read_tls(&mut bytes)? == 0 {
            break;
        }
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => Ok(Some(accepted.client_hello().server_name().map(str::to_owned))),
        Ok(None) => Ok(None),
        Err((e, _alert)) => Err(SniError::NotTls(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_and_garbage_input() {
        // A TLS handshake record header alone: more bytes needed.
        assert!(matches!(parse(&[0x16, 0x03, 0x01, 0x00, 0x40]), Ok(None)));
        assert!(matches!(parse(b"GET / HTTP/1.1\r\n\r\n"), Err(SniError::NotTls(_))));
    }
}

//! A strict look at HTTP/1 message framing as the bytes arrive, before hyper parses them.
//!
//! hyper resolves some ambiguous framings itself (with both Content-Length and
//! Transfer-Encoding it drops Content-Length and reads chunked, as RFC 9112 permits), so by the
//! time a request reaches the service the ambiguity is gone from its headers. A proxy in front
//! of lenient upstreams must refuse such requests instead (RFC 9112 §6.1: "ought to be handled
//! as an error"). This scanner follows the request stream (heads, then bodies by their
//! framing), records one verdict per request head in order, and the service pops them as hyper
//! hands it the requests (HTTP/1 requests on one connection are served in order).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bound on one request head (or trailer section) the scanner keeps while waiting for its end.
/// hyper's own limit is never larger (`http.rs` clamps `--max-header-bytes` to it), so past this
/// hyper refuses the message and the scanner may stop judging.
pub const MAX_HEAD: usize = 256 * 1024;

/// Bound on one chunk-size line, extensions included: hyper refuses a body whose chunk
/// extensions add up to 16 KiB, so a longer line is one hyper refuses too.
const MAX_CHUNK_LINE: usize = 16 * 1024 + 64;

#[derive(Debug)]
enum State {
    Head(Vec<u8>),
    Body(u64),
    ChunkSize(Vec<u8>),
    ChunkData(u64),
    ChunkDataEnd(u8),
    Trailers(Vec<u8>),
    /// Lost track (a malformed message hyper will refuse, or a protocol switch): stop judging.
    Done,
}

/// Verdicts for request heads in arrival order: `Some(problem)` for a framing to refuse.
pub type Verdicts = Arc<Mutex<VecDeque<Option<&'static str>>>>;

pub struct Scanner {
    state: State,
    verdicts: Verdicts,
}

impl Scanner {
    pub fn new(verdicts: Verdicts) -> Self {
        Scanner { state: State::Head(Vec::new()), verdicts }
    }

    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match &mut self.state {
                State::Done => return,
                State::Head(buf) => {
                    // Leading CRLFs between pipelined requests are allowed (RFC 9112 §2.2).
                    if buf.is_empty() {
                        while let [b'\r' | b'\n', rest @ ..] = data {
                            data = rest;
                        }
                        if data.is_empty() {
                            return;
                        }
                    }
                    let start = buf.len().saturating_sub(2);
                    buf.extend_from_slice(data);
                    // The verdict must not depend on how the bytes were cut into reads: a head
                    // longer than the bound is given up on whether it arrived at once or dripped.
                    match head_end(buf, start) {
                        Some(end) if end <= MAX_HEAD => {
                            let rest = buf.split_off(end);
                            let head = std::mem::take(buf);
                            self.head_done(&head);
                            self.feed_owned(rest);
                            return;
                        }
                        Some(_) => self.state = State::Done,
                        None if buf.len() > MAX_HEAD => self.state = State::Done,
                        None => return,
                    }
                }
                State::Body(left) => {
                    let n = (*left).min(data.len() as u64) as usize;
                    *left -= n as u64;
                    data = &data[n..];
                    if *left == 0 {
                        self.state = State::Head(Vec::new());
                    }
                }
                State::ChunkSize(line) => match data.iter().position(|b| *b == b'\n') {
                    Some(i) if line.len() + i > MAX_CHUNK_LINE => self.state = State::Done,
                    Some(i) => {
                        line.extend_from_slice(&data[..i]);
                        data = &data[i + 1..];
                        let text = String::from_utf8_lossy(line).trim_end_matches('\r').to_string();
                        let size = text.split(';').next().unwrap_or("").trim();
                        match u64::from_str_radix(size, 16) {
                            Ok(0) => self.state = State::Trailers(Vec::new()),
                            Ok(n) => self.state = State::ChunkData(n),
                            Err(_) => self.state = State::Done,
                        }
                    }
                    None => {
                        line.extend_from_slice(data);
                        if line.len() > MAX_CHUNK_LINE {
                            self.state = State::Done;
                        }
                        return;
                    }
                },
                State::ChunkData(left) => {
                    let n = (*left).min(data.len() as u64) as usize;
                    *left -= n as u64;
                    data = &data[n..];
                    if *left == 0 {
                        self.state = State::ChunkDataEnd(0);
                    }
                }
                State::ChunkDataEnd(seen) => {
                    // The CRLF after chunk data.
                    let (b, rest) = (data[0], &data[1..]);
                    data = rest;
                    match (*seen, b) {
                        (0, b'\r') => *seen = 1,
                        (0, b'\n') | (1, b'\n') => self.state = State::ChunkSize(Vec::new()),
                        _ => self.state = State::Done,
                    }
                }
                State::Trailers(buf) => {
                    buf.extend_from_slice(data);
                    // Trailers end with an empty line; with none, the last chunk's CRLF is all.
                    let end = if buf.starts_with(b"\r\n") {
                        Some(2)
                    } else if buf.starts_with(b"\n") {
                        Some(1)
                    } else {
                        head_end(buf, 0)
                    };
                    match end {
                        Some(end) if end <= MAX_HEAD => {
                            let rest = buf.split_off(end);
                            self.state = State::Head(Vec::new());
                            self.feed_owned(rest);
                            return;
                        }
                        Some(_) => self.state = State::Done,
                        None if buf.len() > MAX_HEAD => self.state = State::Done,
                        None => return,
                    }
                }
            }
        }
    }

    fn feed_owned(&mut self, rest: Vec<u8>) {
        if !rest.is_empty() {
            self.feed(&rest);
        }
    }

    fn head_done(&mut self, head: &[u8]) {
        let text = String::from_utf8_lossy(head);
        let mut lines = text.split('\n').map(|l| l.trim_end_matches('\r'));
        let request_line = lines.next().unwrap_or("");
        if request_line.starts_with("PRI * HTTP/2.0") {
            // HTTP/2 with prior knowledge: frames, not heads, from here on.
            self.state = State::Done;
            return;
        }
        let http10 = request_line.ends_with("HTTP/1.0");
        let mut cl: Vec<&str> = Vec::new();
        let mut te: Vec<&str> = Vec::new();
        for line in lines.filter(|l| !l.is_empty()) {
            let Some((name, value)) = line.split_once(':') else { continue };
            // hyper refuses names with whitespace; the scanner needs only exact names.
            match name.to_ascii_lowercase().as_str() {
                "content-length" => cl.push(value.trim()),
                "transfer-encoding" => te.push(value.trim()),
                _ => {}
            }
        }
        let problem = if cl.len() > 1 {
            Some("duplicate Content-Length")
        } else if !te.is_empty() && !cl.is_empty() {
            Some("both Content-Length and Transfer-Encoding")
        } else if te.len() > 1 {
            Some("repeated Transfer-Encoding")
        } else if !te.is_empty() && http10 {
            Some("Transfer-Encoding in an HTTP/1.0 request")
        } else if te.first().is_some_and(|t| !t.eq_ignore_ascii_case("chunked")) {
            Some("unsupported transfer coding (only chunked)")
        } else if cl.first().is_some_and(|c| c.is_empty() || !c.bytes().all(|b| b.is_ascii_digit())) {
            Some("invalid Content-Length")
        } else {
            None
        };
        if let Ok(mut v) = self.verdicts.lock() {
            v.push_back(problem);
        }
        // An Upgrade header changes nothing: the proxy strips it and never switches protocols,
        // so the next bytes are still HTTP/1 and are still judged.
        self.state = if problem.is_some() {
            // After a refusal the connection closes.
            State::Done
        } else if !te.is_empty() {
            State::ChunkSize(Vec::new())
        } else if let Some(n) = cl.first().and_then(|c| c.parse::<u64>().ok()).filter(|n| *n > 0) {
            State::Body(n)
        } else {
            State::Head(Vec::new())
        };
    }
}

/// The end of a head (just past its empty line), searching from `from`: lines end in CRLF or,
/// as hyper also accepts, a bare LF, so `\n\n` and `\n\r\n` both end a head.
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while let Some(p) = buf[i..].iter().position(|b| *b == b'\n') {
        let nl = i + p;
        match &buf[nl + 1..] {
            [b'\n', ..] => return Some(nl + 2),
            [b'\r', b'\n', ..] => return Some(nl + 3),
            _ => i = nl + 1,
        }
    }
    None
}

/// The downstream stream with a [`Scanner`] on its read side.
pub struct ScanningStream<T> {
    inner: T,
    scanner: Option<Scanner>,
}

impl<T> ScanningStream<T> {
    /// `scanner: None` for connections that are not HTTP/1 (HTTP/2 frames its own messages).
    pub fn new(inner: T, scanner: Option<Scanner>) -> Self {
        ScanningStream { inner, scanner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ScanningStream<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(scanner)) = (&poll, this.scanner.as_mut()) {
            scanner.feed(&buf.filled()[before..]);
        }
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ScanningStream<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdicts(chunks: &[&[u8]]) -> Vec<Option<&'static str>> {
        let v: Verdicts = Default::default();
        let mut s = Scanner::new(v.clone());
        for c in chunks {
            s.feed(c);
        }
        let out = v.lock().unwrap().iter().copied().collect();
        out
    }

    /// A client chooses its TCP segments: a long chunk extension or a long head gives the same
    /// verdicts at once and dripped, so a smuggling shape after it is judged either way (a
    /// dripped 2 KiB extension once made the scanner give up while hyper read on).
    #[test]
    fn long_lines_give_the_same_verdicts_however_they_arrive() {
        let smuggle =
            b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        for ext in [2000, MAX_CHUNK_LINE - 8, MAX_CHUNK_LINE + 8] {
            let mut stream = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;".to_vec();
            stream.extend(std::iter::repeat_n(b'e', ext));
            stream.extend_from_slice(b"\r\nhello\r\n0\r\n\r\n");
            stream.extend_from_slice(smuggle);
            let whole = verdicts(&[&stream]);
            for step in [1, 7, 1000] {
                let parts: Vec<&[u8]> = stream.chunks(step).collect();
                assert_eq!(verdicts(&parts), whole, "extension of {ext}, {step}-byte reads");
            }
            if ext < MAX_CHUNK_LINE {
                assert_eq!(whole, [None, Some("both Content-Length and Transfer-Encoding")]);
            }
        }
        let mut big = b"GET / HTTP/1.1\r\nHost: a\r\nX: ".to_vec();
        big.extend(std::iter::repeat_n(b'v', MAX_HEAD));
        big.extend_from_slice(b"\r\n\r\n");
        big.extend_from_slice(smuggle);
        let parts: Vec<&[u8]> = big.chunks(4096).collect();
        assert_eq!(verdicts(&[&big]), verdicts(&parts));
    }

    #[test]
    fn follows_bodies_across_pipelined_requests() {
        let stream = b"POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloPOST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /c HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(verdicts(&[stream]), vec![None, None, None]);
        // Byte by byte gives the same answer.
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(verdicts(&bytes), vec![None, None, None]);
    }

    #[test]
    fn ambiguous_framings_are_flagged() {
        assert_eq!(
            verdicts(&[b"POST / HTTP/1.1\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n"]),
            vec![Some("both Content-Length and Transfer-Encoding")]
        );
        assert_eq!(
            verdicts(&[b"POST / HTTP/1.1\r\nContent-Length: 5\r\ncontent-length: 5\r\n\r\n"]),
            vec![Some("duplicate Content-Length")]
        );
        assert_eq!(
            verdicts(&[b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"]),
            vec![Some("unsupported transfer coding (only chunked)")]
        );
        assert_eq!(
            verdicts(&[b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"]),
            vec![Some("Transfer-Encoding in an HTTP/1.0 request")]
        );
    }

    #[test]
    fn bare_lf_heads_and_requests_after_an_upgrade_header_are_judged() {
        assert_eq!(
            verdicts(&[b"GET / HTTP/1.1\nHost: x\nContent-Length: 5\nTransfer-Encoding: chunked\n\n"]),
            vec![Some("both Content-Length and Transfer-Encoding")]
        );
        let mixed = b"GET / HTTP/1.1\r\nHost: x\n\r\nGET /b HTTP/1.1\nHost: x\r\n\n";
        assert_eq!(verdicts(&[mixed]), vec![None, None]);
        let bytes: Vec<&[u8]> = mixed.chunks(1).collect();
        assert_eq!(verdicts(&bytes), vec![None, None], "byte by byte");
        let after_upgrade = b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n";
        assert_eq!(verdicts(&[after_upgrade]), vec![None, Some("duplicate Content-Length")]);
    }

    #[test]
    fn a_request_hidden_in_a_body_is_not_a_head() {
        let body = b"GET /hidden HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut stream = format!("POST /a HTTP/1.1\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
        stream.extend_from_slice(body);
        assert_eq!(verdicts(&[&stream]), vec![None], "the body is skipped by length");
    }
}

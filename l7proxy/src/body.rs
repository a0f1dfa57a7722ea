//! The downstream request body as it goes upstream (shared by the HTTP stack and the pool).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};

use crate::canonical::{self, Malformed};

/// A malformed HTTP/2 trailer section (RFC 9113 §8.2.1), found as the body goes upstream.
#[derive(Debug, thiserror::Error)]
#[error("malformed HTTP/2 trailers: {0}")]
pub struct MalformedTrailers(Malformed);

/// A downstream request body on its way upstream. HTTP/2 trailers are checked as they arrive:
/// a malformed one fails the body, so the upstream never receives the request complete (its
/// stream is reset), and the downstream stream is reset too. (h2 itself drops pseudo-header
/// fields from trailers, so none reaches the upstream.)
pub struct RequestBody {
    /// None: a request sent again without a body (pool::Replay).
    inner: Option<Incoming>,
    /// HTTP/2 only: set when the trailers turned out malformed (the upstream's answer, if
    /// any, then says only that its stream was reset, not why).
    malformed: Option<Arc<AtomicBool>>,
}

impl hyper::body::Body for RequestBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else { return Poll::Ready(None) };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(flag), Some(trailers)) = (&this.malformed, frame.trailers_ref()) {
                    if let Err(e) = canonical::check_h2_fields(trailers) {
                        flag.store(true, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(Box::new(MalformedTrailers(e)))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(hyper::body::Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map_or_else(|| SizeHint::with_exact(0), hyper::body::Body::size_hint)
    }
}

impl RequestBody {
    /// A downstream body; `malformed` (HTTP/2 only) is set if its trailers turn out malformed.
    pub(crate) fn new(inner: Incoming, malformed: Option<Arc<AtomicBool>>) -> Self {
        RequestBody { inner: Some(inner), malformed }
    }

    /// No body at all.
    pub fn empty() -> Self {
        RequestBody { inner: None, malformed: None }
    }
}

//! Whether a client's request stream ended, or broke off. tonic takes a client's
//! RST_STREAM(CANCEL), which a gRPC client sends when it cancels a call or its deadline
//! passes, for the request stream's end (`Streaming` in tonic's `codec/decode.rs`): a
//! handler that must be all or nothing (ImportCapacity) would apply a cancelled upload's
//! first rows as if they were the whole file. `shed` wraps every streamed request's body
//! in `watched`, which notes any error of the body (a reset, whatever its reason) where
//! the handler finds it, in the request's extensions.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::codegen::{http, Bytes};
use tonic::Status;

/// Shared by a request's body and its handler: set once the body broke off.
#[derive(Clone, Debug, Default)]
pub struct StreamEnd {
    broken: Arc<AtomicBool>,
}

impl StreamEnd {
    /// Whether the stream broke off rather than ended (a handler asks once the stream
    /// has ended for tonic).
    pub fn broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// Of a request wrapped by `watched`; `None` for one that was not (a request built
    /// in a test, say): such a stream's end is taken as it comes.
    pub fn of<T>(request: &tonic::Request<T>) -> Option<Self> {
        request.extensions().get::<Self>().cloned()
    }
}

/// `request` with its body watched, and the `StreamEnd` its handler asks in its extensions.
pub fn watched(request: http::Request<tonic::body::Body>) -> http::Request<tonic::body::Body> {
    let end = StreamEnd::default();
    let (mut parts, inner) = request.into_parts();
    parts.extensions.insert(end.clone());
    let body = tonic::body::Body::new(Watched { inner, end });
    http::Request::from_parts(parts, body)
}

struct Watched {
    inner: tonic::body::Body,
    end: StreamEnd,
}

impl http_body::Body for Watched {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Err(_))) = &polled {
            self.end.broken.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

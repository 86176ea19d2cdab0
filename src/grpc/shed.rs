//! Load shedding: at most `in_flight_requests_max` requests are served at once over
//! every connection; the next one is answered at once with UNAVAILABLE / OVERLOADED and a
//! RetryInfo, instead of queueing until everything is slow.
//!
//! A one-reply call counts until its reply is ready (a client that never reads it holds
//! nothing). A streaming reply ([`STREAMING_REPLIES`]) counts until the stream ends, so
//! it is admitted by its own bound too: exports by `exports_max`, reflection and health
//! watches by their own small pools ([`Shed::streams_only`] leaves health checks free).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::codegen::{http, BoxFuture, Service};
use tonic::server::NamedService;
use tonic::Status;

use crate::service::ServiceError;

/// The methods whose reply is a stream the client may keep open.
pub const STREAMING_REPLIES: &[&str] = &[
    "/prenota.v1.CapacityService/ExportBookings",
    "/prenota.v1.CapacityService/ExportAuditLog",
    "/prenota.v1.CapacityService/ExportBackup",
    "/prenota.v1.CapacityService/ExportRegistrations",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/grpc.health.v1.Health/Watch",
];

fn streams(path: &str) -> bool {
    STREAMING_REPLIES.contains(&path)
}

#[derive(Clone)]
pub struct Shed<S> {
    inner: S,
    permits: Arc<Semaphore>,
    /// One-reply calls take a permit too (false: only streams do).
    unary: bool,
}

impl<S> Shed<S> {
    /// Every call takes one of `permits` (shared by every service it wraps).
    pub fn new(inner: S, permits: Arc<Semaphore>) -> Self {
        Self {
            inner,
            permits,
            unary: true,
        }
    }

    /// Only streaming replies take one of `permits`; one-reply calls pass.
    pub fn streams_only(inner: S, permits: Arc<Semaphore>) -> Self {
        Self {
            inner,
            permits,
            unary: false,
        }
    }
}

impl<S, B> Service<http::Request<B>> for Shed<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let streaming = streams(request.uri().path());
        if !streaming && !self.unary {
            return Box::pin(self.inner.call(request));
        }
        match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(permit) => {
                let response = self.inner.call(request);
                Box::pin(async move {
                    let response = response.await?;
                    Ok(match streaming {
                        true => {
                            response.map(|inner| tonic::body::Body::new(Counted { inner, permit }))
                        }
                        false => response, // the reply is ready: the permit goes here
                    })
                })
            }
            Err(_) => {
                metrics::counter!(crate::telemetry::SHED).increment(1);
                let refused = Status::from(ServiceError::Shed).into_http();
                Box::pin(async move { Ok(refused) })
            }
        }
    }
}

/// A response body that holds its request's place until it is dropped.
struct Counted {
    inner: tonic::body::Body,
    permit: OwnedSemaphorePermit,
}

impl http_body::Body for Counted {
    type Data = <tonic::body::Body as http_body::Body>::Data;
    type Error = <tonic::body::Body as http_body::Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let _counted = &self.permit;
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<S: NamedService> NamedService for Shed<S> {
    const NAME: &'static str = S::NAME;
}

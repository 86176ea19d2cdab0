//! Load shedding: at most `in_flight_requests_max` requests are served at once over
//! every connection; the next one is answered at once with UNAVAILABLE / OVERLOADED and a
//! RetryInfo, instead of queueing until everything is slow. Wraps prenota's two services
//! and reflection, so health checks are always answered. A request counts until its
//! response has been sent to the end: a stream holds its place for its whole life.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::codegen::{http, BoxFuture, Service};
use tonic::server::NamedService;
use tonic::Status;

use crate::service::ServiceError;

#[derive(Clone)]
pub struct Shed<S> {
    inner: S,
    permits: Arc<Semaphore>,
}

impl<S> Shed<S> {
    /// `permits` is shared by every service it wraps: the limit is global.
    pub fn new(inner: S, permits: Arc<Semaphore>) -> Self {
        Self { inner, permits }
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
        match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(permit) => {
                let response = self.inner.call(request);
                Box::pin(async move {
                    let response = response.await?;
                    Ok(response.map(|inner| tonic::body::Body::new(Counted { inner, permit })))
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

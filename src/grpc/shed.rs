//! Load shedding: at most `in_flight_requests_max` requests are served at once over
//! every connection; the next one is answered at once with UNAVAILABLE / OVERLOADED and a
//! RetryInfo, instead of queueing until everything is slow. Wraps prenota's two services
//! only, so health checks are always answered.

use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::Semaphore;
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
                    let response = response.await;
                    drop(permit);
                    response
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

impl<S: NamedService> NamedService for Shed<S> {
    const NAME: &'static str = S::NAME;
}

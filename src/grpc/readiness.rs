//! Start-up: the server answers from the moment it listens, while recovery rebuilds
//! memory from the store. Until the engine is ready, health says NOT_SERVING and
//! prenota's services answer at once with UNAVAILABLE / RECOVERING and a RetryInfo,
//! instead of leaving clients on a silent port. A standby (PostgreSQL, another node
//! holds the lease) answers UNAVAILABLE / NOT_ACTIVE until it takes over; the active
//! node answers it instead of a one-reply answer (or a stream's start) it computed once
//! its lease is no longer fresh (`store::lease_freshness`): resumed after a pause, it
//! would otherwise answer the calls queued meanwhile from memory a new active node has
//! moved past. A stream already open goes on until the node stands down.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use tonic::codegen::{http, BoxFuture, Service};
use tonic::server::NamedService;
use tonic::Status;

use crate::service::ServiceError;
use crate::store::postgres::Standby;
use crate::store::StoreError;

/// A service that exists only once recovery has finished.
pub struct Ready<S> {
    inner: Arc<OnceLock<S>>,
    /// PostgreSQL: whether another node holds the lease.
    standby: Arc<Standby>,
}

impl<S> Clone for Ready<S> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
            standby: Arc::clone(&self.standby),
        }
    }
}

impl<S> Ready<S> {
    /// A gate with no service behind it yet, and the handle that provides it. Until
    /// then it answers NOT_ACTIVE while this node stands by, RECOVERING otherwise.
    pub fn pending(standby: &Arc<Standby>) -> (Self, Arc<OnceLock<S>>) {
        let inner = Arc::new(OnceLock::new());
        (
            Self {
                inner: Arc::clone(&inner),
                standby: Arc::clone(standby),
            },
            inner,
        )
    }
}

impl<S, B> Service<http::Request<B>> for Ready<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>> + Clone,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // tonic's generated services are always ready; the clone below is too.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        match self.inner.get() {
            Some(service) => {
                let reply = service.clone().call(request);
                let standby = Arc::clone(&self.standby);
                Box::pin(async move {
                    let reply = reply.await?;
                    match standby.lease.fresh() {
                        true => Ok(reply),
                        false => Ok(
                            Status::from(ServiceError::Store(StoreError::NotActive)).into_http()
                        ),
                    }
                })
            }
            None => {
                let refusal = match self.standby.waiting.load(Ordering::Acquire) {
                    true => ServiceError::Store(StoreError::NotActive),
                    false => ServiceError::Recovering,
                };
                let refused = Status::from(refusal).into_http();
                Box::pin(async move { Ok(refused) })
            }
        }
    }
}

impl<S: NamedService> NamedService for Ready<S> {
    const NAME: &'static str = S::NAME;
}

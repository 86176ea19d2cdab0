//! The service layer's error type: a domain refusal, a store failure, or a state of
//! the engine itself.

use thiserror::Error;

use crate::domain::error::DomainError;
use crate::store::StoreError;

#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum ServiceError {
    #[error(transparent)]
    Domain(#[from] DomainError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the stored state breaks an invariant: {0}")]
    Recovery(String),
    #[error("the request was abandoned before it finished")]
    Abandoned,
    #[error("too many attempts: retry in {} ms", .retry_after.as_millis())]
    RateLimited { retry_after: std::time::Duration },
    #[error("the server is at its limit of requests in flight")]
    Shed,
    #[error("the server is starting: it is rebuilding its state from the store")]
    Recovering,
}

//! The store's error type.
//!
//! Imports nothing of the crate.

use thiserror::Error;

#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum StoreError {
    #[error("storage failed earlier; writes are refused until the server restarts")]
    Failed,
    #[error("storage I/O error: {0}")]
    Io(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("the write queue is full")]
    Overloaded,
    #[error("the store is shutting down")]
    Closed,
}

//! The store's error type.
//!
//! Imports nothing of the crate.

use thiserror::Error;

#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum StoreError {
    #[error(
        "the server's storage failed earlier: it refuses changes, and reads of bookings, \
         until it is restarted (nothing of this request was applied)"
    )]
    Failed,
    #[error("storage I/O error: {0}")]
    Io(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// A file the configuration names cannot be used (the citizen hash key: its mode,
    /// its size, or not the store's key); the store itself is sound.
    #[error("{0}")]
    Misconfigured(String),
    #[error("the write queue is full")]
    Overloaded,
    #[error("the store is shutting down")]
    Closed,
    /// PostgreSQL backend: this node does not hold the lease (another node is active, or
    /// none is yet: a standby takes it over within moments).
    #[error("this node is not the active one: it does not hold the lease (another node does, or none does yet)")]
    NotActive,
    #[error("another backup is running")]
    BackupRunning,
    /// The store changed too much while a backup scanned it; serving is untouched.
    #[error("{0}")]
    BackupFellBehind(String),
}

impl StoreError {
    /// Whether a commit that answered this was certainly not written: the queue was
    /// full, or the store had failed before (the committer refuses without writing).
    /// Its caller may then undo its in-memory changes. Any other error may follow a
    /// write that reached the disk.
    pub fn never_written(&self) -> bool {
        matches!(self, StoreError::Overloaded | StoreError::Failed)
    }
}

//! The group committer: one thread that turns many client writes into one atomic
//! `apply_batch`, one `flush()` and one `fdatasync` of the database file.
//!
//! sled 0.34's `flush()` ends in `sync_file_range`, which is not a power-loss barrier,
//! so the committer follows it with `File::sync_data` (fdatasync) on sled's `db` file.
//! A writer's future only resolves after that, and the commit runs on this thread, so a
//! cancelled RPC cannot tear a commit in half. The first flush or fsync error marks the
//! store failed: every later write is refused, nothing is retried silently.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot, watch};

use crate::store::StoreError;

/// Writes of one caller, committed together with other callers' writes.
pub struct CommitRequest {
    pub writes: Vec<(Vec<u8>, Vec<u8>)>,
    pub done: oneshot::Sender<Result<(), StoreError>>,
}

/// What the committer does to make a batch durable; sled in production.
pub struct Durability {
    pub db: sled::Db,
    /// sled's log file, synced after every flush.
    pub db_file: File,
}

impl Durability {
    fn commit(&self, batch: sled::Batch) -> Result<(), StoreError> {
        self.db
            .apply_batch(batch)
            .map_err(|e| StoreError::Io(format!("apply_batch: {e}")))?;
        self.db
            .flush()
            .map_err(|e| StoreError::Io(format!("flush: {e}")))?;
        self.db_file
            .sync_data()
            .map_err(|e| StoreError::Io(format!("fdatasync: {e}")))
    }
}

/// Shared between the committer thread and writers.
pub struct CommitterState {
    /// Set on the first storage error; never cleared while the process lives.
    pub failed: AtomicBool,
    /// `true` while the store accepts writes; the server mirrors it into health.
    pub healthy: watch::Sender<bool>,
}

pub fn spawn(
    durability: Durability,
    mut requests: mpsc::Receiver<CommitRequest>,
    state: Arc<CommitterState>,
    batch_writes_max: usize,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("prenota-committer".into())
        .spawn(move || {
            let mut pending: Vec<CommitRequest> = Vec::new();
            while let Some(first) = requests.blocking_recv() {
                let mut writes = first.writes.len();
                pending.push(first);
                // Everything that queued up during the previous fsync joins this batch.
                while writes < batch_writes_max {
                    match requests.try_recv() {
                        Ok(next) => {
                            writes += next.writes.len();
                            pending.push(next);
                        }
                        Err(_) => break,
                    }
                }
                let result = if state.failed.load(Ordering::Acquire) {
                    Err(StoreError::Failed)
                } else {
                    let mut batch = sled::Batch::default();
                    for request in &pending {
                        for (key, value) in &request.writes {
                            batch.insert(key.as_slice(), value.as_slice());
                        }
                    }
                    let started = Instant::now();
                    let result = durability.commit(batch);
                    tracing::trace!(
                        requests = pending.len(),
                        writes,
                        commit_us = started.elapsed().as_micros() as u64,
                        "group commit"
                    );
                    result
                };
                if let Err(error) = &result {
                    if !state.failed.swap(true, Ordering::AcqRel) {
                        tracing::error!(%error, "storage failed: refusing all writes until restart");
                        state.healthy.send_replace(false);
                    }
                }
                for request in pending.drain(..) {
                    // A writer that went away still had its write committed; nothing to tell.
                    let _ = request.done.send(result.clone());
                }
            }
            tracing::debug!("committer drained and stopped");
        })
}

//! The group committer: one thread that turns many client writes into one atomic
//! `apply_batch`, one `flush()` and one `fdatasync` of the database file.
//!
//! sled 0.34's `flush()` ends in `sync_file_range`, which is not a power-loss barrier,
//! so the committer follows it with `File::sync_data` (fdatasync) on sled's `db` file,
//! and with a sync of any blob file sled wrote meanwhile (`BlobFiles`).
//! A writer's future only resolves after that, and the commit runs on this thread, so a
//! cancelled RPC cannot tear a commit in half. The first flush or fsync error marks the
//! store failed: every later write is refused, nothing is retried silently.
//!
//! Events (the outbox `WatchEvents` reads) get their sequence here, in commit order, so
//! the log has no gaps and its order is the order changes became durable; the last
//! durable sequence is published after each sync, and readers never read past it. A
//! batch's events are stored as runs (one record per few kilobytes of events): sled
//! copies a leaf on every insert, and an insert per event made each booking two.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot, watch};

use crate::store::error::StoreError;
use crate::store::records::{self, event_runs, Change};
use crate::telemetry;

/// Writes of one caller, committed together with other callers' writes.
pub struct CommitRequest {
    pub writes: Vec<Change>,
    /// Event values, in order; each gets the next sequence (stored in runs).
    pub events: Vec<Vec<u8>>,
    pub done: oneshot::Sender<Result<(), StoreError>>,
}

/// What the committer does to make one batch durable. sled in production; tests
/// inject failures and stalls here to show that no write is acknowledged early.
pub trait Durability: Send + 'static {
    /// Makes `changes` durable, all or none, or says why not.
    fn commit(&mut self, changes: &[Change]) -> Result<(), StoreError>;
}

/// Orders the committer's `apply_batch` with reads of several records that must each
/// see whole commits. sled applies a batch atomically, but its range scans are no
/// snapshot: an iterator copies one leaf (≤ ~16 records) at a time, so a scan spanning
/// leaves can see one half of a commit and not the other (a citizen's booking moved:
/// both confirmed, or neither). The gate is held only while a batch is applied in
/// memory, never across flush or fdatasync; a reader holds it for one bounded scan.
#[derive(Clone, Default)]
pub struct ApplyGate(Arc<std::sync::RwLock<()>>);

impl ApplyGate {
    /// Applies `batch` to `db` while no gated read runs.
    pub fn apply(&self, db: &sled::Db, batch: sled::Batch) -> sled::Result<()> {
        // Nothing is guarded but the order: a poisoned gate is as good as a clean one.
        let _applying = self.0.write().unwrap_or_else(|e| e.into_inner());
        db.apply_batch(batch)
    }

    /// Runs `read` with no batch applied meanwhile: it sees each commit whole or not.
    pub fn read<T>(&self, read: impl FnOnce() -> T) -> T {
        let _reading = self.0.read().unwrap_or_else(|e| e.into_inner());
        read()
    }
}

/// `changes` as one sled batch (applied atomically).
pub fn sled_batch(changes: &[Change]) -> sled::Batch {
    let mut batch = sled::Batch::default();
    for (key, value) in changes {
        match value {
            Some(value) => batch.insert(key.as_slice(), value.as_slice()),
            None => batch.remove(key.as_slice()),
        }
    }
    batch
}

pub struct SledDurability {
    pub db: sled::Db,
    pub gate: ApplyGate,
    /// sled's log file, synced after every flush.
    pub db_file: File,
    /// sled's blob files, the new ones synced after every flush.
    pub blobs: BlobFiles,
    /// The group commits made so far, each written with its batch
    /// (`records::COMMITS_KEY`); the last durable one is published here for
    /// `store::watermark`.
    pub commits: Arc<AtomicU64>,
}

/// sled 0.34 writes a log message larger than a quarter of a segment (a node over 128
/// KiB: a leaf of up to ~20 large records) to a file of its own under `blobs/`, with no
/// fsync, and the log then points at it: the `db` file's fdatasync does not cover it,
/// and a power cut could keep the pointer and lose (or tear) the file. So each commit
/// syncs the blob files it has not synced yet, and their directory, before it is
/// acknowledged. With no blob file this is one read of an empty directory.
pub struct BlobFiles {
    dir: PathBuf,
    /// Each file synced, at the length it had then: sled's own threads (its flusher's
    /// segment cleaning) write blobs too, so a file listed while being written is
    /// synced again once its length has changed.
    synced: HashMap<OsString, u64>,
}

impl BlobFiles {
    /// The blob files of `sled_dir`, every one synced now (a previous run's included).
    pub fn sync_all(sled_dir: &std::path::Path) -> std::io::Result<Self> {
        let mut blobs = Self {
            dir: sled_dir.join("blobs"),
            synced: HashMap::new(),
        };
        blobs.sync_new()?;
        Ok(blobs)
    }

    /// Syncs the blob files written (or grown) since the last call, then the directory
    /// (their names); returns how many. Forgets the files sled has removed since.
    pub fn sync_new(&mut self) -> std::io::Result<usize> {
        let mut present = HashMap::with_capacity(self.synced.len());
        let mut new = 0;
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            // The length before the sync: a file still growing is synced again later.
            // A file removed meanwhile is a blob sled's log no longer needs.
            let length = match entry.metadata() {
                Ok(metadata) => metadata.len(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if self.synced.get(&name) != Some(&length) {
                match File::open(entry.path()) {
                    Ok(file) => file.sync_data()?,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
                new += 1;
            }
            present.insert(name, length);
        }
        if new > 0 {
            File::open(&self.dir)?.sync_all()?;
        }
        self.synced = present;
        Ok(new)
    }
}

impl Durability for SledDurability {
    fn commit(&mut self, changes: &[Change]) -> Result<(), StoreError> {
        let started = Instant::now();
        let commit = self.commits.load(Ordering::Acquire) + 1;
        let mut batch = sled_batch(changes);
        batch.insert(records::COMMITS_KEY, &records::encode_commits(commit));
        self.gate
            .apply(&self.db, batch)
            .map_err(|e| StoreError::Io(format!("apply_batch: {e}")))?;
        let applied = Instant::now();
        self.db
            .flush()
            .map_err(|e| StoreError::Io(format!("flush: {e}")))?;
        let flushed = Instant::now();
        // Blob files first: once the log's fdatasync is done, what it points at is too.
        self.blobs
            .sync_new()
            .map_err(|e| StoreError::Io(format!("syncing sled's blob files: {e}")))?;
        self.db_file
            .sync_data()
            .map_err(|e| StoreError::Io(format!("fdatasync: {e}")))?;
        self.commits.store(commit, Ordering::Release);
        metrics::histogram!(telemetry::COMMIT_APPLY_SECONDS)
            .record((applied - started).as_secs_f64());
        metrics::histogram!(telemetry::COMMIT_FLUSH_SECONDS)
            .record((flushed - applied).as_secs_f64());
        metrics::histogram!(telemetry::COMMIT_FSYNC_SECONDS)
            .record(flushed.elapsed().as_secs_f64());
        Ok(())
    }
}

/// Weaker commits, for benchmarks only: they show what the durability barrier costs.
/// Never reachable from the configuration or the command line.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnsyncedForBenchmarks {
    /// apply_batch + flush (sync_file_range), no fdatasync: not a power-loss barrier.
    FlushWithoutFsync,
    /// apply_batch only: in sled's memory, lost on a crash.
    ApplyOnly,
}

pub(crate) struct SledUnsynced {
    pub db: sled::Db,
    pub gate: ApplyGate,
    pub mode: UnsyncedForBenchmarks,
}

impl Durability for SledUnsynced {
    fn commit(&mut self, changes: &[Change]) -> Result<(), StoreError> {
        self.gate
            .apply(&self.db, sled_batch(changes))
            .map_err(|e| StoreError::Io(format!("apply_batch: {e}")))?;
        if self.mode == UnsyncedForBenchmarks::FlushWithoutFsync {
            self.db
                .flush()
                .map_err(|e| StoreError::Io(format!("flush: {e}")))?;
        }
        Ok(())
    }
}

/// Shared between the committer thread and writers.
pub struct CommitterState {
    /// Set on the first storage error; never cleared while the process lives.
    pub failed: AtomicBool,
    /// Set (before `failed`) when the first error was losing the lease.
    pub lost_lease: AtomicBool,
    /// `true` while the store accepts writes; the server mirrors it into health.
    pub healthy: watch::Sender<bool>,
    /// While an online backup runs: a copy of every batch committed since it started.
    /// Held by the committer across each commit, so a batch is either wholly applied
    /// before the backup installs its tee, or copied to it.
    pub tee: Mutex<Option<Tee>>,
    /// The sequence of the last durable event (0: none yet).
    pub events: watch::Sender<u64>,
    /// Batches numbered from 1: the last one handed to the store (set before it is
    /// applied, so a reader that met its records sees it here), and the last one
    /// durable. `Store::settled` waits for the second to reach the first.
    pub begun: AtomicU64,
    pub durable: watch::Sender<u64>,
}

/// What a reader waits on so that it never shows a write a crash could still undo: the
/// committer applies a batch before its fdatasync, and sled serves reads from it
/// meanwhile. Read first, then wait `until(begun())`.
#[derive(Clone)]
pub struct Settling(Arc<CommitterState>);

impl Settling {
    pub fn of(state: &Arc<CommitterState>) -> Self {
        Self(Arc::clone(state))
    }

    /// The last batch handed to the store: every record a read met is in it or before.
    pub fn begun(&self) -> u64 {
        self.0.begun.load(Ordering::SeqCst)
    }

    /// Waits until `batch` is durable; the store's refusal if it failed first, or had
    /// failed already: a failed store answers no read (memory may hold a batch the disk
    /// refused; on PostgreSQL, a node that lost the lease may be behind the new one).
    pub async fn until(&self, batch: u64) -> Result<(), StoreError> {
        if self.0.failed.load(Ordering::Acquire) {
            return Err(self.0.refusal());
        }
        if *self.0.durable.borrow() >= batch {
            return Ok(());
        }
        let mut durable = self.0.durable.subscribe();
        let failed = &self.0.failed;
        let reached = durable
            .wait_for(|done| *done >= batch || failed.load(Ordering::Acquire))
            .await
            .map(|done| *done >= batch);
        match reached {
            Ok(true) => Ok(()),
            Ok(false) => Err(self.0.refusal()),
            // The sender lives in the state this holds: not reached.
            Err(_) => Err(StoreError::Closed),
        }
    }
}

/// Where the committer copies committed batches during an online backup.
pub struct Tee {
    pub batches: std::sync::mpsc::SyncSender<Vec<Change>>,
    /// Bytes copied so far, and the most the backup may buffer.
    pub bytes: usize,
    pub bytes_max: usize,
    /// Set (and the tee dropped) when the backup fell too far behind: it must fail.
    pub overflowed: Arc<AtomicBool>,
}

impl CommitterState {
    /// `last_event`: the sequence of the last event already in the store.
    pub fn new(last_event: u64) -> Self {
        let (healthy, _) = watch::channel(true);
        let (events, _) = watch::channel(last_event);
        let (durable, _) = watch::channel(0);
        Self {
            failed: AtomicBool::new(false),
            lost_lease: AtomicBool::new(false),
            healthy,
            tee: Mutex::new(None),
            events,
            begun: AtomicU64::new(0),
            durable,
        }
    }

    /// Why writes are refused, once the store failed.
    pub fn refusal(&self) -> StoreError {
        match self.lost_lease.load(Ordering::Acquire) {
            true => StoreError::NotActive,
            false => StoreError::Failed,
        }
    }

    pub fn tee(&self) -> MutexGuard<'_, Option<Tee>> {
        // Each critical section is one commit plus one send: a poisoned lock is sound.
        self.tee.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub fn spawn(
    mut durability: impl Durability,
    mut requests: mpsc::Receiver<CommitRequest>,
    state: Arc<CommitterState>,
    batch_writes_max: usize,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("prenota-committer".into())
        .spawn(move || {
            let mut pending: Vec<CommitRequest> = Vec::new();
            // Declared after `pending`, so dropped before it: the store has failed
            // before the writers of an unwinding batch learn it was lost.
            let _fails_if_unwinding = FailIfUnwinding(Arc::clone(&state));
            let mut last_event = *state.events.borrow();
            while let Some(first) = requests.blocking_recv() {
                let mut writes = first.writes.len() + first.events.len();
                pending.push(first);
                // Everything that queued up during the previous fsync joins this batch.
                while writes < batch_writes_max {
                    match requests.try_recv() {
                        Ok(next) => {
                            writes += next.writes.len() + next.events.len();
                            pending.push(next);
                        }
                        Err(_) => break,
                    }
                }
                let result = if state.failed.load(Ordering::Acquire) {
                    Err(state.refusal())
                } else {
                    sequenced(&mut pending, &mut last_event).and_then(|changes| {
                        commit_batch(&mut durability, &state, changes, pending.len())
                    })
                };
                match &result {
                    // Readers may now see these events: they are durable.
                    Ok(()) => {
                        state.events.send_replace(last_event);
                    }
                    Err(error) => fail_stop(&state, error),
                }
                for request in pending.drain(..) {
                    // A writer that went away still had its write committed; nothing to tell.
                    let _ = request.done.send(result.clone());
                }
            }
            tracing::debug!("committer drained and stopped");
        })
}

/// Every pending request's writes, in order, then their events, numbered in request
/// order from the sequence after `last_event` (which ends as the last one given) and
/// written as runs (`records::event_runs`: a record per run, not per event). The writes
/// are moved out, not copied: only each request's `done` is still needed.
fn sequenced(
    pending: &mut [CommitRequest],
    last_event: &mut u64,
) -> Result<Vec<Change>, StoreError> {
    let mut changes = Vec::with_capacity(pending.iter().map(|r| r.writes.len() + 1).sum());
    let mut events = Vec::new();
    for request in pending {
        changes.append(&mut request.writes);
        events.append(&mut request.events);
    }
    let first = *last_event + 1;
    *last_event += events.len() as u64;
    changes.extend(event_runs(first, events)?);
    Ok(changes)
}

/// One group commit of `changes` (from `requests` callers), copied to a backup's tee if
/// one is installed (under the tee's lock, so a backup sees each batch whole).
fn commit_batch(
    durability: &mut impl Durability,
    state: &CommitterState,
    changes: Vec<Change>,
    requests: usize,
) -> Result<(), StoreError> {
    let writes = changes.len();
    let started = Instant::now();
    let mut tee = state.tee();
    let batch = state.begun.fetch_add(1, Ordering::SeqCst) + 1;
    let result = durability.commit(&changes);
    if result.is_ok() {
        state.durable.send_replace(batch);
    }
    if let (Ok(()), Some(copy)) = (&result, tee.as_mut()) {
        let writes = changes;
        let size: usize = writes
            .iter()
            .map(|(key, value)| key.len() + value.as_ref().map_or(0, Vec::len))
            .sum();
        copy.bytes += size;
        if copy.bytes > copy.bytes_max || copy.batches.try_send(writes).is_err() {
            copy.overflowed.store(true, Ordering::Release);
            *tee = None;
        }
    }
    drop(tee);
    metrics::histogram!(telemetry::COMMIT_BATCH_WRITES).record(writes as f64);
    metrics::histogram!(telemetry::COMMIT_BATCH_REQUESTS).record(requests as f64);
    tracing::trace!(
        requests,
        writes,
        commit_us = started.elapsed().as_micros() as u64,
        "group commit"
    );
    result
}

/// Fails the store if the committer thread unwinds (a panic in sled or here). The
/// writers of the batch then in hand, and later ones, would otherwise learn only that
/// the channel closed, which is not `Overloaded`: they keep their in-memory effects
/// (places taken: never overbook) while health said SERVING and every new write took a
/// place for nothing. Failed, the store refuses writes and says so until a restart.
struct FailIfUnwinding(Arc<CommitterState>);

impl Drop for FailIfUnwinding {
    fn drop(&mut self) {
        if std::thread::panicking() {
            fail_stop(
                &self.0,
                &StoreError::Io("the committer thread panicked".into()),
            );
        }
    }
}

/// The first storage error fails the store for good: every later write is refused.
pub(crate) fn fail_stop(state: &CommitterState, error: &StoreError) {
    metrics::counter!(telemetry::COMMIT_FAILURES).increment(1);
    // The first failure names the refusal.
    if *error == StoreError::NotActive && !state.failed.load(Ordering::Acquire) {
        state.lost_lease.store(true, Ordering::Release);
    }
    if !state.failed.swap(true, Ordering::AcqRel) {
        tracing::error!(%error, "storage failed: refusing all writes until restart");
        state.healthy.send_replace(false);
    }
    // Readers waiting for a batch that will never be durable learn it now.
    state.durable.send_modify(|_| {});
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc as std_mpsc;
    use std::time::Duration;

    /// Fails every commit, like a disk that returns EIO on fdatasync.
    struct FailingDisk;

    impl Durability for FailingDisk {
        fn commit(&mut self, _changes: &[Change]) -> Result<(), StoreError> {
            Err(StoreError::Io("fdatasync: injected EIO".into()))
        }
    }

    /// A bug: panics in the middle of a commit.
    struct PanickingDisk;

    impl Durability for PanickingDisk {
        fn commit(&mut self, _changes: &[Change]) -> Result<(), StoreError> {
            panic!("injected: a bug in the store");
        }
    }

    /// Blocks each commit until the test lets it through.
    struct StalledDisk {
        entered: std_mpsc::Sender<()>,
        release: std_mpsc::Receiver<()>,
    }

    impl Durability for StalledDisk {
        fn commit(&mut self, _changes: &[Change]) -> Result<(), StoreError> {
            let _ = self.entered.send(());
            self.release
                .recv()
                .map_err(|_| StoreError::Io("released".into()))
        }
    }

    fn start(
        durability: impl Durability,
    ) -> (
        mpsc::Sender<CommitRequest>,
        Arc<CommitterState>,
        JoinHandle<()>,
    ) {
        let state = Arc::new(CommitterState::new(0));
        let (sender, receiver) = mpsc::channel(16);
        let thread = spawn(durability, receiver, Arc::clone(&state), 8).unwrap();
        (sender, state, thread)
    }

    fn write(sender: &mpsc::Sender<CommitRequest>) -> oneshot::Receiver<Result<(), StoreError>> {
        let (done, outcome) = oneshot::channel();
        sender
            .try_send(CommitRequest {
                writes: vec![(b"k".to_vec(), Some(b"v".to_vec()))],
                events: Vec::new(),
                done,
            })
            .unwrap();
        outcome
    }

    /// A blob file is synced once, and again only when it has grown since (one sled's
    /// own threads were still writing when it was listed).
    #[test]
    fn blob_files_are_synced_when_new_or_grown() {
        use std::io::Write as _;
        let dir = tempfile::tempdir().unwrap();
        let blobs_dir = dir.path().join("blobs");
        std::fs::create_dir(&blobs_dir).unwrap();
        let mut first = File::create(blobs_dir.join("100")).unwrap();
        first.write_all(b"part").unwrap();
        let mut blobs = BlobFiles::sync_all(dir.path()).unwrap();
        assert_eq!(blobs.sync_new().unwrap(), 0, "synced when opened");
        first.write_all(b" and the rest").unwrap();
        assert_eq!(blobs.sync_new().unwrap(), 1, "grown since it was synced");
        assert_eq!(blobs.sync_new().unwrap(), 0);
        std::fs::write(blobs_dir.join("200"), b"new").unwrap();
        assert_eq!(blobs.sync_new().unwrap(), 1, "a new file");
        std::fs::remove_file(blobs_dir.join("100")).unwrap();
        assert_eq!(blobs.sync_new().unwrap(), 0);
        assert_eq!(blobs.synced.len(), 1, "a removed file is forgotten");
    }

    #[test]
    fn no_write_is_acknowledged_before_the_disk_says_durable() {
        let (entered_tx, entered) = std_mpsc::channel();
        let (release, release_rx) = std_mpsc::channel();
        let (sender, _state, thread) = start(StalledDisk {
            entered: entered_tx,
            release: release_rx,
        });
        let mut outcome = write(&sender);
        entered.recv_timeout(Duration::from_secs(5)).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            matches!(outcome.try_recv(), Err(oneshot::error::TryRecvError::Empty)),
            "acknowledged while the sync was still running"
        );
        release.send(()).unwrap();
        assert_eq!(outcome.blocking_recv().unwrap(), Ok(()));
        drop(sender);
        thread.join().unwrap();
    }

    #[test]
    fn a_failed_sync_fails_its_batch_refuses_later_writes_and_turns_unhealthy() {
        let (sender, state, thread) = start(FailingDisk);
        let mut health = state.healthy.subscribe();
        let first = write(&sender).blocking_recv().unwrap();
        assert!(matches!(first, Err(StoreError::Io(_))), "{first:?}");
        assert!(state.failed.load(Ordering::Acquire));
        assert!(health.has_changed().unwrap());
        assert!(!*health.borrow_and_update());
        // Later writes are refused without touching the disk again: no silent retry.
        assert_eq!(
            write(&sender).blocking_recv().unwrap(),
            Err(StoreError::Failed)
        );
        drop(sender);
        thread.join().unwrap();
    }

    #[test]
    fn a_committer_that_panics_fails_the_store_before_its_writers_hear() {
        let (sender, state, thread) = start(PanickingDisk);
        let mut health = state.healthy.subscribe();
        let outcome = write(&sender).blocking_recv();
        assert!(outcome.is_err(), "the batch's writer hears it was dropped");
        assert!(
            state.failed.load(Ordering::Acquire),
            "failed before the writer heard"
        );
        assert!(!*health.borrow_and_update(), "unhealthy");
        assert_eq!(state.refusal(), StoreError::Failed);
        assert!(thread.join().is_err(), "the thread panicked");
    }

    /// A node that lost its lease (or whose disk failed) with nothing in flight answered
    /// reads as if it were still the store: every batch it knew was durable.
    #[test]
    fn a_failed_store_settles_no_read_even_with_nothing_in_flight() {
        let state = Arc::new(CommitterState::new(0));
        let settling = Settling::of(&state);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert_eq!(runtime.block_on(settling.until(settling.begun())), Ok(()));
        state.lost_lease.store(true, Ordering::Release);
        state.failed.store(true, Ordering::Release);
        let refused = runtime.block_on(settling.until(settling.begun()));
        assert_eq!(refused, Err(StoreError::NotActive));
    }
}

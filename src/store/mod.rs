//! Durable state: sled records and keys, the group committer, and the scans that
//! recovery rebuilds memory from.
//!
//! Must not import tonic. Knows records, not rules: invariants are checked by the
//! service layer when it rebuilds the domain from these scans.
//!
//! `DATA_DIR/lock` is taken before any of sled's files is read (on PostgreSQL, before
//! standing by for the lease); another process waits `data_dir_lock_wait_ms`, then refuses.
//! Power loss: `Store::open` syncs sled's `conf` and both directories, and if sled refuses
//! the store, removes a torn `conf` or unfinished snapshot and opens it again.

pub mod backup;
pub mod backup_key;
pub mod booking_index;
pub mod committer;
pub mod error;
pub mod files;
pub mod key_file;
pub mod lease_freshness;
pub mod postgres;
pub mod postgres_tls;
pub mod read_only;
pub mod records;
pub mod size_hint;
pub mod watermark;

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use crate::config::Limits;
use crate::domain::booking::{Booking, Reference};
use crate::domain::event::SequencedEvent;
use crate::domain::hold::{Hold, HoldId};
use crate::domain::ids::{BookingId, CitizenTag, RequestKey, SlotKey};
pub use committer::UnsyncedForBenchmarks;
use committer::{
    ApplyGate, BlobFiles, CommitRequest, CommitterState, SledDurability, SledUnsynced,
};
pub use error::StoreError;
use records::{booking_key, hold_key, Encoded, Record, SiteRecord, SlotRecord, Write};

/// What `Store::commit_when` does when the write queue is full.
#[derive(Clone, Copy)]
enum WhenFull {
    /// Refuse at once (`Overloaded`): shedding, the rule for every request.
    Refuse,
    /// Wait for room, in turn (tokio's queue serves waiting senders in order).
    Wait,
}

pub struct Store {
    db: sled::Db,
    /// Held by the committer while it applies a batch; see `Store::between_commits`.
    gate: ApplyGate,
    state: Arc<CommitterState>,
    /// `None` once shut down; dropping it lets the committer drain and stop.
    requests: Option<mpsc::Sender<CommitRequest>>,
    committer: Option<JoinHandle<()>>,
    /// Bookings by reference and by slot, in memory (see `booking_index`).
    index: booking_index::BookingIndex,
    /// With PostgreSQL: the lease keeper (dropping the sender stops it).
    lease_keeper: Option<(std::sync::mpsc::Sender<()>, JoinHandle<()>)>,
    /// On sled, durable: the commit count kept beside the store (`watermark`).
    watermark: Option<watermark::Keeper>,
    /// On sled, durable: fails the store once its filesystem turns read-only.
    read_only_watch: Option<read_only::Watch>,
    /// `DATA_DIR/lock`, locked while this store is open (released last, on drop).
    data_dir_lock: DataDirLock,
    /// Whether holds may still be under their old keys (`OLD_HOLD_PREFIX`): found at
    /// open, cleared once retention deleted the last. While set, a hold written is
    /// written where it already is.
    old_holds: AtomicBool,
}

/// The lock on `DATA_DIR/lock` (see `DataDirLock::take`), held while it lives.
pub struct DataDirLock {
    _file: File,
    dir: PathBuf,
}

/// A record a scan read, its error said as the store says I/O errors.
fn scanned(
    item: sled::Result<(sled::IVec, sled::IVec)>,
) -> Result<(sled::IVec, sled::IVec), StoreError> {
    item.map_err(|e| StoreError::Io(format!("scanning: {e}")))
}

impl Store {
    /// Opens (or creates) the store under `data_dir` and starts the committer.
    pub fn open(data_dir: &Path, limits: &Limits) -> Result<Self, StoreError> {
        Self::open_with(data_dir, limits, None)
    }

    /// Benchmarks only: a store whose commits skip fdatasync (or flush too), to measure
    /// what durability costs. Acknowledgements from it promise nothing.
    #[doc(hidden)]
    pub fn open_unsynced_for_benchmarks(
        data_dir: &Path,
        limits: &Limits,
        mode: UnsyncedForBenchmarks,
    ) -> Result<Self, StoreError> {
        Self::open_with(data_dir, limits, Some(mode))
    }

    fn open_with(
        data_dir: &Path,
        limits: &Limits,
        unsynced: Option<UnsyncedForBenchmarks>,
    ) -> Result<Self, StoreError> {
        let data_dir_lock = DataDirLock::take(data_dir, limits)?;
        let sled_dir = data_dir.join("sled");
        let db = open_sled_mending(&sled_dir, limits)?;
        let stored_format = refuse_a_newer_format(&db)?;
        booking_index::remove_stored_index(&db)?;
        let (db_file, blobs) = private_synced_files(data_dir, &sled_dir)?;
        let old_holds = has_old_holds(&db)?;
        let state = Arc::new(CommitterState::new(last_event_sequence(&db)?));
        let (sender, receiver) = mpsc::channel(limits.commit_queue_depth);
        let batch_writes_max = limits.commit_batch_writes_max;
        let gate = ApplyGate::default();
        let (watermark, committer, read_only_watch) = match unsynced {
            None => {
                let kept = watermark::Keeper::start(data_dir, &db)?;
                let watch = read_only::Watch::start(
                    &sled_dir,
                    Arc::clone(&state),
                    read_only::mounted_read_only,
                    read_only::INTERVAL,
                )?;
                let durability = SledDurability {
                    db: db.clone(),
                    gate: gate.clone(),
                    db_file,
                    blobs,
                    commits: kept.commits(),
                };
                let spawned =
                    committer::spawn(durability, receiver, Arc::clone(&state), batch_writes_max);
                (Some(kept), spawned, Some(watch))
            }
            // A crash may lose unsynced commits: no count is kept beside the store.
            Some(mode) => {
                let durability = SledUnsynced {
                    db: db.clone(),
                    gate: gate.clone(),
                    mode,
                };
                let spawned =
                    committer::spawn(durability, receiver, Arc::clone(&state), batch_writes_max);
                (None, spawned, None)
            }
        };
        let committer =
            committer.map_err(|e| StoreError::Io(format!("starting the committer thread: {e}")))?;
        let store = Self {
            db,
            gate,
            state,
            requests: Some(sender),
            committer: Some(committer),
            index: booking_index::BookingIndex::default(),
            lease_keeper: None,
            watermark,
            read_only_watch,
            data_dir_lock,
            old_holds: AtomicBool::new(old_holds),
        };
        store.record_format(stored_format)?;
        Ok(store)
    }

    /// Records this build's layout, if the store has another (an older one's) or none.
    fn record_format(&self, stored: Option<u32>) -> Result<(), StoreError> {
        if stored == Some(records::STORE_FORMAT) {
            return Ok(());
        }
        let format = records::encode_store_format(records::STORE_FORMAT);
        self.write_at_open(records::STORE_FORMAT_KEY, &format, "the store format")
    }

    /// Opens the PostgreSQL backend for the node holding `lease`: copies every record
    /// into a local read copy under the locked data dir, then commits to PostgreSQL (fenced by the
    /// lease's epoch) and keeps the lease renewed. See `postgres`.
    pub fn open_postgres(
        data_dir_lock: DataDirLock,
        limits: &Limits,
        lease: postgres::Lease,
    ) -> Result<Self, StoreError> {
        let thread_error = |e| StoreError::Io(format!("starting a store thread: {e}"));
        // Renewed from the start: a standby must not end this node's sessions while it
        // connects and loads (a large store may take longer than the lease).
        let state = Arc::new(CommitterState::new(0));
        let (stop, stopped) = std::sync::mpsc::channel();
        let (url, node, epoch) = (lease.settings.url.clone(), lease.node.clone(), lease.epoch);
        let keeper = lease
            .keep(Arc::clone(&state), stopped)
            .map_err(thread_error)?;
        let lease_keeper = Some((stop, keeper));
        let local = postgres::open_local_copy(
            &data_dir_lock.dir.join(POSTGRES_LOCAL_COPY_DIR),
            limits.store_cache_bytes,
        )?;
        let mut client = postgres::connect(&url, &node)?;
        let started = Instant::now();
        let loaded = postgres::load(&mut client, &local)?;
        tracing::info!(
            records = loaded,
            seconds = started.elapsed().as_secs_f64(),
            "copied the records from PostgreSQL"
        );
        if state.failed.load(Ordering::Acquire) {
            return Err(state.refusal());
        }
        state.events.send_replace(last_event_sequence(&local)?);
        let old_holds = has_old_holds(&local)?;
        let gate = ApplyGate::default();
        let durability =
            postgres::PostgresDurability::new(client, epoch, (local.clone(), gate.clone()))?;
        let (sender, receiver) = mpsc::channel(limits.commit_queue_depth);
        let committer = committer::spawn(
            durability,
            receiver,
            Arc::clone(&state),
            limits.commit_batch_writes_max,
        )
        .map_err(thread_error)?;
        Ok(Self {
            db: local,
            gate,
            state,
            requests: Some(sender),
            committer: Some(committer),
            index: booking_index::BookingIndex::default(),
            lease_keeper,
            watermark: None,
            read_only_watch: None,
            data_dir_lock,
            old_holds: AtomicBool::new(old_holds),
        })
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir_lock.dir
    }

    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.db
            .size_on_disk()
            .map_err(|e| StoreError::Io(format!("measuring the store: {e}")))
    }

    /// Waits until every write a read made before this call could have met is durable
    /// (the committer applies a batch before its fdatasync): a read answered after it
    /// never shows a write a crash could still undo. At once when nothing is in flight.
    pub async fn settled(&self) -> Result<(), StoreError> {
        let settling = self.settling();
        settling.until(settling.begun()).await
    }

    /// `settled` in parts, for a scan that hands its records to another task.
    pub fn settling(&self) -> committer::Settling {
        committer::Settling::of(&self.state)
    }

    /// `true` while writes are accepted; flips to `false` for good on a storage error.
    pub fn health(&self) -> watch::Receiver<bool> {
        self.state.healthy.subscribe()
    }

    /// Makes `writes` durable, atomically, together with whatever else is queued.
    /// Resolves only after the flush and fdatasync that cover them. The bookings written
    /// enter the in-memory index once the write is queued (so a caller that stops
    /// waiting cannot leave one out; a reader may meet an entry whose booking is not
    /// applied yet, and skips it).
    pub async fn commit(&self, writes: &[Write]) -> Result<(), StoreError> {
        self.commit_when(writes, WhenFull::Refuse).await
    }

    /// `commit`, but a full write queue is waited out, in turn, instead of refused: for
    /// the chunks after the first of a chunked authority write, whose prefix is durable
    /// already (refusing them left memory and disk apart until a re-run).
    pub async fn commit_waiting_for_room(&self, writes: &[Write]) -> Result<(), StoreError> {
        self.commit_when(writes, WhenFull::Wait).await
    }

    /// The writes' records (a hold's key where its record is stored) and events.
    fn encode(&self, writes: &[Write]) -> Result<(Vec<records::Change>, Vec<Vec<u8>>), StoreError> {
        let (mut changes, mut events) = (Vec::with_capacity(writes.len()), Vec::new());
        for write in writes {
            match (write.encode()?, write) {
                (Encoded::Change((key, value)), Write::Hold(hold)) => {
                    changes.push((self.where_hold_is(hold, key)?, value))
                }
                (Encoded::Change(change), _) => changes.push(change),
                (Encoded::Event(value), _) => events.push(value),
            }
        }
        for (key, value) in &changes {
            let bytes = key.len() + value.as_ref().map_or(0, Vec::len);
            if bytes > records::RECORD_BYTES_MAX {
                // A command that can make one checks `records::stored_bytes` first.
                debug_assert!(false, "a record of {bytes} bytes was not checked");
                static TOLD: std::sync::Once = std::sync::Once::new();
                TOLD.call_once(|| tracing::warn!(bytes, "a record larger than RECORD_BYTES_MAX"));
            }
        }
        Ok((changes, events))
    }

    /// Why every write is refused now, once the store failed (until a restart).
    pub fn refusing(&self) -> Option<StoreError> {
        (self.state.failed.load(Ordering::Acquire)).then(|| self.state.refusal())
    }

    async fn commit_when(&self, writes: &[Write], when_full: WhenFull) -> Result<(), StoreError> {
        if let Some(refusal) = self.refusing() {
            return Err(refusal);
        }
        // An error here comes after the caller's in-memory changes and is not `Overloaded`,
        // so they are kept (never overbook): the store fails, as after a failed commit,
        // and a restart rebuilds memory from the disk.
        let (changes, events) = self.encode(writes).inspect_err(|error| {
            committer::fail_stop(&self.state, error);
        })?;
        let (done, outcome) = oneshot::channel();
        let sender = self.requests.as_ref().ok_or(StoreError::Closed)?;
        let request = CommitRequest {
            writes: changes,
            events,
            done,
        };
        match when_full {
            WhenFull::Refuse => sender.try_send(request).map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => StoreError::Overloaded,
                mpsc::error::TrySendError::Closed(_) => StoreError::Closed,
            })?,
            WhenFull::Wait => sender.send(request).await.map_err(|_| StoreError::Closed)?,
        }
        for write in writes {
            if let Write::Booking(booking) = write {
                // Kept even if this write fails (maybe written, maybe not; the store then
                // refuses every write): an entry whose booking is missing is skipped,
                // and the next start rebuilds the index from what is stored.
                // A booking sharing another's reference is not entered: the engine
                // mints references unique, so only a forged write has one (tests write
                // damaged stores so), and recovery refuses the store it makes.
                if let Err(other) = self.index.insert(booking) {
                    tracing::error!(
                        booking_id = %booking.booking_id,
                        other = %records::booking_id_of_key(&other),
                        "a booking written with another booking's reference"
                    );
                }
            }
        }
        outcome.await.map_err(|_| StoreError::Closed)?
    }

    /// The in-memory booking index (recovery fills it, each commit enters its bookings,
    /// retention removes them).
    pub fn booking_index(&self) -> &booking_index::BookingIndex {
        &self.index
    }

    /// The sequence of the last durable event, updated after every commit that wrote
    /// events (0: none yet).
    pub fn last_event(&self) -> watch::Receiver<u64> {
        self.state.events.subscribe()
    }

    /// The sequence of the oldest event kept (`None`: the log is empty).
    pub fn oldest_event(&self) -> Result<Option<u64>, StoreError> {
        match self.db.scan_prefix([records::EVENT_PREFIX]).keys().next() {
            None => Ok(None),
            Some(Ok(key)) => records::sequence_of_event_key(&key)
                .map(Some)
                .ok_or_else(|| StoreError::Corrupt("an event key of the wrong length".into())),
            Some(Err(e)) => Err(StoreError::Io(format!("scanning events: {e}"))),
        }
    }

    /// Up to `limit` events after sequence `after`, up to `through` (inclusive: the last
    /// durable one; later ones may be applied but not yet synced), in order.
    pub fn events(
        &self,
        after: u64,
        through: u64,
        limit: usize,
    ) -> Result<Vec<SequencedEvent>, StoreError> {
        let mut events = Vec::new();
        if after >= through || limit == 0 {
            return Ok(events);
        }
        let wanted = after + 1..=through;
        let from = self.event_record_holding(after + 1)?;
        for item in self.db.range(from..=records::event_key(through).to_vec()) {
            let (key, value) = scanned(item)?;
            let run = records::decode_event_record(&key, &value)?;
            events.extend(run.into_iter().filter(|e| wanted.contains(&e.sequence)));
            if events.len() >= limit {
                events.truncate(limit);
                return Ok(events);
            }
        }
        Ok(events)
    }

    /// The key of the event record that holds `sequence` (a run starting at or before
    /// it), or the sequence's own key when none starts before it.
    fn event_record_holding(&self, sequence: u64) -> Result<Vec<u8>, StoreError> {
        let at_or_before = records::event_key(0)..=records::event_key(sequence);
        match self.db.range(at_or_before).keys().next_back() {
            Some(Ok(key)) => Ok(key.to_vec()),
            Some(Err(e)) => Err(StoreError::Io(format!("scanning events: {e}"))),
            None => Ok(records::event_key(sequence).to_vec()),
        }
    }

    /// The keys of the oldest event records, in order, while every event of the record
    /// is `old` and before `last` (the record holding `last` is never among them), at
    /// most `limit` keys, and how many events they hold: what retention may delete.
    pub fn old_event_records(
        &self,
        last: u64,
        old: impl Fn(&SequencedEvent) -> bool,
        limit: usize,
    ) -> Result<(Vec<Vec<u8>>, u64), StoreError> {
        let (mut keys, mut events) = (Vec::new(), 0);
        for item in self.db.scan_prefix([records::EVENT_PREFIX]).take(limit) {
            let (key, value) = scanned(item)?;
            let run = records::decode_event_record(&key, &value)?;
            if !run.iter().all(|event| event.sequence < last && old(event)) {
                break;
            }
            keys.push(key.to_vec());
            events += run.len() as u64;
        }
        Ok((keys, events))
    }

    /// The booking with this id among the bookings of citizens with this tag.
    pub fn booking(
        &self,
        tag: CitizenTag,
        booking_id: BookingId,
    ) -> Result<Option<Booking>, StoreError> {
        let key = booking_key(tag, booking_id);
        match self.db.get(key) {
            Ok(Some(value)) => Booking::decode_value(&key, &value).map(Some),
            Ok(None) => Ok(None),
            Err(e) => Err(StoreError::Io(format!("reading a booking: {e}"))),
        }
    }

    /// The booking with this reference.
    pub fn booking_by_reference(
        &self,
        reference: Reference,
    ) -> Result<Option<Booking>, StoreError> {
        match self.index.by_reference(reference) {
            Some(key) => self.booking_at(&key),
            None => Ok(None),
        }
    }

    /// Up to `limit` bookings of `slot` in reference order, after `after`. An entry
    /// whose booking is not applied yet (see `commit`) is skipped, and the page filled
    /// from the entries after it.
    pub fn slot_roster(
        &self,
        slot: &SlotKey,
        mut after: Option<Reference>,
        limit: usize,
    ) -> Result<Vec<Booking>, StoreError> {
        let mut bookings = Vec::with_capacity(limit.min(1024));
        while bookings.len() < limit {
            let wanted = limit - bookings.len();
            let entries = self.index.roster(slot, after, wanted);
            for (_, key) in &entries {
                bookings.extend(self.booking_at(key)?);
            }
            match entries.last() {
                Some((last, _)) if entries.len() == wanted => after = Some(*last),
                _ => break, // the roster's end
            }
        }
        Ok(bookings)
    }

    /// Each of the site's slots with bookings (with a reference), and how many of those
    /// were checked in and marked no-shows: from memory.
    pub fn site_attendance(
        &self,
        site_id: &crate::domain::ids::SiteId,
    ) -> Vec<(SlotKey, (u32, u32))> {
        self.index.site_attendance(site_id)
    }

    /// Every booking of these slots, read from their rosters; `None` while a booking
    /// without a reference (stored before references existed) may be left, since no
    /// roster has those: then only a scan of every booking finds them all.
    pub fn bookings_of_slots<'a, S: std::borrow::Borrow<SlotKey> + 'a>(
        &'a self,
        slots: impl IntoIterator<Item = S> + 'a,
    ) -> Option<impl Iterator<Item = Result<Booking, StoreError>> + 'a> {
        if !self.index.rosters_hold_every_booking() {
            return None;
        }
        Some(self.rostered(slots))
    }

    /// The bookings in these slots' rosters, slot by slot (an entry whose booking is
    /// not applied yet is skipped).
    fn rostered<'a, S: std::borrow::Borrow<SlotKey>>(
        &'a self,
        slots: impl IntoIterator<Item = S> + 'a,
    ) -> impl Iterator<Item = Result<Booking, StoreError>> + 'a {
        slots
            .into_iter()
            .flat_map(move |slot| self.index.roster(slot.borrow(), None, usize::MAX))
            .filter_map(move |(_, key)| self.booking_at(&key).transpose())
    }

    fn booking_at(&self, key: &[u8; 25]) -> Result<Option<Booking>, StoreError> {
        match self.db.get(key) {
            Ok(Some(value)) => Booking::decode_value(key, &value).map(Some),
            Ok(None) => Ok(None),
            Err(e) => Err(StoreError::Io(format!("reading a booking: {e}"))),
        }
    }

    /// The hold with this id, made in `second` (`BookingIds::hold_second_of` the id),
    /// or written before hold keys had the second.
    pub fn hold(&self, second: u32, hold_id: HoldId) -> Result<Option<Hold>, StoreError> {
        let key = hold_key(second, hold_id);
        let read = |key: &[u8]| match self.db.get(key) {
            Ok(Some(value)) => Hold::decode_value(key, &value).map(Some),
            Ok(None) => Ok(None),
            Err(e) => Err(StoreError::Io(format!("reading a hold: {e}"))),
        };
        match read(&key)? {
            None if self.old_holds.load(Ordering::Acquire) => read(&records::old_hold_key(hold_id)),
            found => Ok(found),
        }
    }

    /// Whether a hold made in `second` or a booking already has this id (the booking
    /// a hold became keeps its id), under any key.
    pub fn id_taken(
        &self,
        (second, tag): (u32, CitizenTag),
        id: BookingId,
    ) -> Result<bool, StoreError> {
        Ok(self.contains(&hold_key(second, id))?
            || self.contains(&booking_key(tag, id))?
            || (self.old_holds.load(Ordering::Acquire)
                && self.contains(&records::old_hold_key(id))?))
    }

    fn contains(&self, key: &[u8]) -> Result<bool, StoreError> {
        (self.db.contains_key(key)).map_err(|e| StoreError::Io(format!("looking up a key: {e}")))
    }

    /// The key to write `hold` under: `key` (its `hold_key`), or its old key if it is
    /// there. An old hold stays where it is, because the second its id seals is not the
    /// second it was made in (its id was random): moved, its id would not find it.
    fn where_hold_is(&self, hold: &Hold, key: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        if !self.old_holds.load(Ordering::Acquire) {
            return Ok(key);
        }
        let old = records::old_hold_key(hold.hold_id);
        Ok(match self.contains(&old)? {
            true => old.to_vec(),
            false => key,
        })
    }

    /// Stops looking for holds under their old keys once none is left (retention
    /// deletes them; nothing writes a new one).
    pub fn recheck_old_holds(&self) -> Result<(), StoreError> {
        if self.old_holds.load(Ordering::Acquire) && !has_old_holds(&self.db)? {
            self.old_holds.store(false, Ordering::Release);
        }
        Ok(())
    }

    /// Whether the store holds no record but its format (a new data dir).
    pub fn is_empty(&self) -> bool {
        let mut keys = self.db.iter().keys();
        match keys.next() {
            None => true,
            Some(Ok(key)) if key == records::STORE_FORMAT_KEY => keys.next().is_none(),
            Some(_) => false,
        }
    }

    /// The check value of the key this store was written with (`None`: a new store, or
    /// one written before check values existed).
    pub fn key_check(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.read_at_open(records::KEY_CHECK_KEY, "the key check")
    }

    /// The citizen id scheme the store was written under (`None`: not recorded yet).
    pub fn id_scheme(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.read_at_open(records::ID_SCHEME_KEY, "the id scheme")
    }

    /// Stores the id scheme durably. At open only, before anything else writes.
    pub fn put_id_scheme(&self, name: &str) -> Result<(), StoreError> {
        self.write_at_open(records::ID_SCHEME_KEY, name.as_bytes(), "the id scheme")
    }

    /// Stores the key check value durably. At open only, before anything else writes.
    pub fn put_key_check(&self, check: &[u8]) -> Result<(), StoreError> {
        self.write_at_open(records::KEY_CHECK_KEY, check, "the key check")
    }

    /// The id of this store's event log (`None`: not made yet).
    pub fn event_log_id(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.read_at_open(records::EVENT_LOG_KEY, "the event log id")
    }

    /// Stores a new event log id durably. At open or in a restore only, before anything
    /// else writes.
    pub fn put_event_log_id(&self, id: &[u8]) -> Result<(), StoreError> {
        self.write_at_open(records::EVENT_LOG_KEY, id, "the event log id")
    }

    /// One raw record the store keeps about itself (`K…`), as `write_at_open` wrote it.
    fn read_at_open(&self, key: &[u8], what: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self.db.get(key) {
            Ok(value) => Ok(value.map(|value| value.to_vec())),
            Err(e) => Err(StoreError::Io(format!("reading {what}: {e}"))),
        }
    }

    /// One record written durably while the store opens (not from an async task): on
    /// sled straight to the tree, synced; on PostgreSQL through the (fenced) committer.
    fn write_at_open(&self, key: &[u8], value: &[u8], what: &str) -> Result<(), StoreError> {
        if self.lease_keeper.is_none() {
            self.db
                .insert(key, value)
                .map_err(|e| StoreError::Io(format!("writing {what}: {e}")))?;
            return self.sync_direct_writes();
        }
        let (done, outcome) = oneshot::channel();
        let sender = self.requests.as_ref().ok_or(StoreError::Closed)?;
        sender
            .blocking_send(CommitRequest {
                writes: vec![(key.to_vec(), Some(value.to_vec()))],
                events: Vec::new(),
                done,
            })
            .map_err(|_| StoreError::Closed)?;
        outcome.blocking_recv().map_err(|_| StoreError::Closed)?
    }

    /// Flush + fdatasync of writes made straight to sled, not through the committer:
    /// the key check at open, a restore's records. Only while nothing else writes.
    pub(crate) fn sync_direct_writes(&self) -> Result<(), StoreError> {
        self.db
            .flush()
            .map_err(|e| StoreError::Io(format!("flush: {e}")))?;
        // Blob files first, as the committer does: the log then points at synced ones.
        let sled_dir = self.data_dir().join("sled");
        BlobFiles::sync_all(&sled_dir)
            .map_err(|e| StoreError::Io(format!("syncing sled's blob files: {e}")))?;
        std::fs::File::open(sled_dir.join("db"))
            .and_then(|file| file.sync_all())
            .map_err(|e| StoreError::Io(format!("fdatasync: {e}")))
    }

    pub fn apply_journal(&self) -> Result<Option<records::ApplyJournal>, StoreError> {
        let key = records::apply_journal_key();
        match self.db.get(key) {
            Ok(Some(value)) => records::ApplyJournal::decode_value(key, &value).map(Some),
            Ok(None) => Ok(None),
            Err(e) => Err(StoreError::Io(format!("reading the apply journal: {e}"))),
        }
    }

    pub fn authority_request(
        &self,
        key: RequestKey,
    ) -> Result<Option<records::AuthorityRequest>, StoreError> {
        let key = records::authority_request_key(key);
        match self.db.get(key) {
            Ok(Some(value)) => records::AuthorityRequest::decode_value(&key, &value).map(Some),
            Ok(None) => Ok(None),
            Err(e) => Err(StoreError::Io(format!("reading a request: {e}"))),
        }
    }

    /// The audit log, oldest first.
    pub fn audit_entries(&self) -> impl Iterator<Item = Result<records::AuditEntry, StoreError>> {
        self.scan(records::AUDIT_PREFIX)
    }

    /// When the newest audit entry was stamped, read from its key (`None`: the log is
    /// empty): a damaged entry is `prenota audit`'s concern, not the start's.
    pub fn last_audit_unix_ms(&self) -> Result<Option<i64>, StoreError> {
        match self
            .db
            .scan_prefix([records::AUDIT_PREFIX])
            .keys()
            .next_back()
        {
            None => Ok(None),
            Some(Ok(key)) => Ok(records::audit_key_time(&key)),
            Some(Err(e)) => Err(StoreError::Io(format!("reading the last audit entry: {e}"))),
        }
    }

    /// Retention's time as a start, a pass or a clean stop last stored it (`None`: none
    /// stored one yet).
    pub fn retention_time_ms(&self) -> Result<Option<i64>, StoreError> {
        self.read_at_open(records::RETENTION_TIME_KEY, "the retention time")?
            .map(|value| records::decode_retention_time(&value))
            .transpose()
    }

    /// Stores retention's time durably. At open only, before anything else writes
    /// (retention passes and a clean stop store theirs as a `Write::RetentionTime`).
    pub fn put_retention_time(&self, at_unix_ms: i64) -> Result<(), StoreError> {
        let value = records::encode_retention_time(at_unix_ms);
        self.write_at_open(records::RETENTION_TIME_KEY, &value, "the retention time")
    }

    /// The newest time this store's records say something was written (`None`: none
    /// says): the latest of the last audit entry, the last event and the last hold made
    /// (each kept in time or sequence order, so three reads). Retention counts from it
    /// after a start on a clock that is later (`domain::retention::retention_start`).
    pub fn newest_write_unix_ms(&self) -> Result<Option<i64>, StoreError> {
        let io =
            |what: &str, e: sled::Error| StoreError::Io(format!("reading the last {what}: {e}"));
        let last = |prefix: u8, what: &str| {
            let last = self.db.scan_prefix([prefix]).next_back().transpose();
            last.map_err(|e| io(what, e))
        };
        let event = match last(records::EVENT_PREFIX, "event")? {
            None => None,
            Some((key, value)) => records::decode_event_record(&key, &value)?
                .last()
                .map(|sequenced| sequenced.event.at_unix_ms),
        };
        let hold = last(records::HOLD_PREFIX, "hold")?
            .and_then(|(key, _)| records::second_of_hold_key(&key))
            .map(|second| i64::from(second) * 1_000);
        Ok([self.last_audit_unix_ms()?, event, hold]
            .into_iter()
            .flatten()
            .max())
    }

    /// Every hold, all states: those under their old keys, then the others in the
    /// order they were made.
    pub fn holds(&self) -> impl Iterator<Item = Result<Hold, StoreError>> {
        self.scan(records::OLD_HOLD_PREFIX)
            .chain(self.scan(records::HOLD_PREFIX))
    }

    /// Runs `read` (several reads of this store) with no commit applied meanwhile, so
    /// that it sees every commit whole or not at all: a scan alone may not (see
    /// `ApplyGate`). Keep `read` short and bounded: commits wait for it.
    pub fn between_commits<T>(&self, read: impl FnOnce() -> T) -> T {
        self.gate.read(read)
    }

    /// Up to `limit` bookings (all states) of the citizens with this tag, in id order,
    /// after `after`. The caller keeps those of its own citizen.
    pub fn bookings_of_tag(
        &self,
        tag: CitizenTag,
        after: Option<BookingId>,
        limit: usize,
    ) -> Result<Vec<Booking>, StoreError> {
        let prefix = records::citizen_bookings_prefix(tag);
        let start = match after {
            Some(after) => records::key_after(&booking_key(tag, after)),
            None => prefix.to_vec(),
        };
        let mut bookings = Vec::new();
        for item in self.db.range(start..) {
            let (key, value) = scanned(item)?;
            if !key.starts_with(&prefix) || bookings.len() == limit {
                break;
            }
            bookings.push(Booking::decode_value(&key, &value)?);
        }
        Ok(bookings)
    }

    /// Up to `limit` records of the kind `prefix`, in key order from `from` (inclusive),
    /// with their keys: one bounded step of a background scan (retention).
    pub fn records_from<T: Record>(
        &self,
        prefix: u8,
        from: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, T)>, StoreError> {
        let mut records = Vec::new();
        for item in self.db.range(from..).take(limit) {
            let (key, value) = scanned(item)?;
            if key.first() != Some(&prefix) {
                break;
            }
            records.push((key.to_vec(), T::decode_value(&key, &value)?));
        }
        Ok(records)
    }

    /// Up to `limit` keys of the kind `prefix` that sort before `bound`, in key order.
    pub fn keys_before(
        &self,
        prefix: u8,
        bound: &[u8],
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        self.db
            .range([prefix].as_slice()..bound)
            .keys()
            .take(limit)
            .map(|key| {
                key.map(|key| key.to_vec())
                    .map_err(|e| StoreError::Io(format!("scanning: {e}")))
            })
            .collect()
    }

    /// Every record of one kind, undecoded (key, value), in key order.
    fn scan_raw(
        &self,
        prefix: u8,
    ) -> impl Iterator<Item = Result<(sled::IVec, sled::IVec), StoreError>> + use<> {
        self.db.scan_prefix([prefix]).map(scanned)
    }

    fn scan<T: Record>(&self, prefix: u8) -> impl Iterator<Item = Result<T, StoreError>> + use<T> {
        self.scan_raw(prefix)
            .map(|item| item.and_then(|(key, value)| T::decode_value(&key, &value)))
    }

    pub fn sites(&self) -> impl Iterator<Item = Result<SiteRecord, StoreError>> {
        self.scan(records::SITE_PREFIX)
    }

    pub fn slots(&self) -> impl Iterator<Item = Result<SlotRecord, StoreError>> {
        self.scan(records::SLOT_PREFIX)
    }

    /// Every announced release, in id order.
    pub fn releases(
        &self,
    ) -> impl Iterator<Item = Result<crate::domain::release::Release, StoreError>> {
        self.scan(records::RELEASE_PREFIX)
    }

    /// Every queue ticket, grouped by release.
    pub fn tickets(
        &self,
    ) -> impl Iterator<Item = Result<crate::domain::release::Ticket, StoreError>> {
        self.scan(records::TICKET_PREFIX)
    }

    /// Every campaign.
    pub fn campaigns(
        &self,
    ) -> impl Iterator<Item = Result<crate::domain::campaign::Campaign, StoreError>> {
        self.scan(records::CAMPAIGN_PREFIX)
    }

    /// Every campaign registration, grouped by campaign.
    pub fn registrations(
        &self,
    ) -> impl Iterator<Item = Result<crate::domain::campaign::Registration, StoreError>> {
        self.scan(records::REGISTRATION_PREFIX)
    }

    /// The registrations of one campaign, in citizen-key order.
    pub fn registrations_of(
        &self,
        campaign_id: &crate::domain::ids::CampaignId,
    ) -> impl Iterator<Item = Result<crate::domain::campaign::Registration, StoreError>> + use<>
    {
        let mut prefix = vec![records::REGISTRATION_PREFIX];
        prefix.extend_from_slice(campaign_id.as_str().as_bytes());
        prefix.push(0);
        self.db.scan_prefix(prefix).map(|item| {
            let (key, value) = scanned(item)?;
            crate::domain::campaign::Registration::decode_value(&key, &value)
        })
    }

    /// Every dose series.
    pub fn series(
        &self,
    ) -> impl Iterator<Item = Result<crate::domain::series::Series, StoreError>> {
        self.scan(records::SERIES_PREFIX)
    }

    /// Every record, in key order (what `prenota migrate` copies).
    pub fn every_record(&self) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), StoreError>> {
        self.db.iter().map(|record| {
            record
                .map(|(key, value)| (key.to_vec(), value.to_vec()))
                .map_err(|e| StoreError::Io(format!("reading the store: {e}")))
        })
    }

    /// Every booking, all states, in key order (citizen tag, then booking id).
    pub fn bookings(&self) -> impl Iterator<Item = Result<Booking, StoreError>> {
        self.scan(records::BOOKING_PREFIX)
    }

    /// The booking records (key, value), undecoded, of part `part` of `parts` (split by
    /// the first byte of the citizen tag that begins each key): recovery reads the
    /// parts on threads of their own and decodes on others.
    pub fn booking_records(
        &self,
        (part, parts): (usize, usize),
    ) -> impl Iterator<Item = Result<(sled::IVec, sled::IVec), StoreError>> + use<> {
        assert!(part < parts && parts <= 256, "part {part} of {parts}");
        let bound = |part: usize| match part * 256 / parts {
            0 => vec![records::BOOKING_PREFIX],
            256 => vec![records::BOOKING_PREFIX + 1],
            first => vec![records::BOOKING_PREFIX, first as u8],
        };
        self.db.range(bound(part)..bound(part + 1)).map(scanned)
    }

    /// Stops accepting writes, lets the committer finish what is queued (each batch
    /// flushed and synced as usual) and waits for it. An error if the store had failed
    /// (every write refused since; what is on disk is what the next start recovers).
    pub fn shutdown(&mut self) -> Result<(), StoreError> {
        self.read_only_watch = None;
        self.requests = None;
        if let Some(thread) = self.committer.take() {
            if thread.join().is_err() {
                tracing::error!("the committer thread panicked");
            }
        }
        if let Some(kept) = self.watermark.as_mut() {
            kept.finish();
        }
        // After the last commit: a standby may take over once the lease is let go.
        if let Some((stop, keeper)) = self.lease_keeper.take() {
            // Every answer was given (the engine is released): the next node need not
            // wait out this one's last renewal.
            let _ = stop.send(());
            if keeper.join().is_err() {
                tracing::error!("the lease thread panicked");
            }
        }
        match self.state.failed.load(Ordering::Acquire) {
            true => Err(self.state.refusal()),
            false => Ok(()),
        }
    }
}

/// sled's files made private and synced before the committer starts; its `db` file
/// (each commit's fdatasync) and blob files.
fn private_synced_files(data_dir: &Path, sled_dir: &Path) -> Result<(File, BlobFiles), StoreError> {
    make_private(data_dir, sled_dir)
        .map_err(|e| StoreError::Io(format!("restricting {}: {e}", data_dir.display())))?;
    let db_file = open_db_file(sled_dir)?;
    sync_sled_files(data_dir, sled_dir)?;
    let blobs = BlobFiles::sync_all(sled_dir)
        .map_err(|e| StoreError::Io(format!("syncing sled's blob files: {e}")))?;
    Ok((db_file, blobs))
}

/// The data dir 0700, and sled's directories 0700 and files 0600: the store holds
/// hashed citizen ids. The key file is left alone: one others could read is refused at
/// load. (`prenota` also sets its umask to 077, so files sled creates later get the
/// same modes.)
fn make_private(data_dir: &Path, sled_dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = |path: &Path, mode| std::fs::set_permissions(path, PermissionsExt::from_mode(mode));
    mode(data_dir, 0o700)?;
    mode(sled_dir, 0o700)?;
    for entry in walk(sled_dir)? {
        mode(&entry, if entry.is_dir() { 0o700 } else { 0o600 })?;
    }
    Ok(())
}

/// Every file and directory under `dir`.
fn walk(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            found.extend(walk(&path)?);
        }
        found.push(path);
    }
    Ok(found)
}

/// With PostgreSQL: where a node keeps its local read copy, under the data dir.
pub const POSTGRES_LOCAL_COPY_DIR: &str = "postgres-copy";

/// Refuses a data dir that exists and is not a directory (a file named by mistake)
/// before anything opens it: opening it would fail with a message that says less.
pub fn refuse_a_file(data_dir: &Path) -> Result<(), String> {
    match data_dir.exists() && !data_dir.is_dir() {
        true => Err(format!("data dir {}: not a directory", data_dir.display())),
        false => Ok(()),
    }
}

/// Whether any hold is still under its old key (`OLD_HOLD_PREFIX`).
fn has_old_holds(db: &sled::Db) -> Result<bool, StoreError> {
    match db.scan_prefix([records::OLD_HOLD_PREFIX]).keys().next() {
        None => Ok(false),
        Some(Ok(_)) => Ok(true),
        Some(Err(e)) => Err(StoreError::Io(format!("looking for old holds: {e}"))),
    }
}

/// The sequence of the last event in the store (0: none): the last of the last record's
/// run. Retention keeps the record holding the last one, so sequences never restart.
fn last_event_sequence(db: &sled::Db) -> Result<u64, StoreError> {
    match db.scan_prefix([records::EVENT_PREFIX]).next_back() {
        None => Ok(0),
        Some(Ok((key, value))) => records::decode_event_record(&key, &value)?
            .last()
            .map(|event| event.sequence)
            .ok_or_else(|| StoreError::Corrupt("an event record without events".into())),
        Some(Err(e)) => Err(StoreError::Io(format!("reading the last event: {e}"))),
    }
}

/// Removes what a kill or power cut can leave torn in sled's directory and sled then
/// refuses (both are written again by sled): its `conf` (the store's segment size and
/// format, then a CRC-32; written when sled creates a store, never synced by sled; its
/// content follows from the configuration prenota opens sled with, never changed), and
/// a snapshot being written (`snap.<lsn>.generating`: sled writes one at every start,
/// syncs it and renames it, but reads any `snap.*` file, the last by name first; one
/// torn was never a snapshot, and the one before it or the log holds everything).
/// Whether it removed anything.
fn mend_torn_sled_files(sled_dir: &Path) -> Result<bool, StoreError> {
    let io = |e: std::io::Error| StoreError::Io(format!("mending {}: {e}", sled_dir.display()));
    if !sled_dir.try_exists().map_err(io)? {
        return Ok(false);
    }
    let mut torn = Vec::new();
    let conf = sled_dir.join("conf");
    // Eight bytes or fewer, sled takes it as missing.
    if std::fs::read(&conf).is_ok_and(|bytes| bytes.len() > 8 && !checksum_holds(&bytes, 4)) {
        torn.push(conf);
    }
    for entry in std::fs::read_dir(sled_dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let generating = name.is_some_and(|n| n.starts_with("snap.") && n.ends_with(".generating"));
        // A snapshot ends with its length (8 bytes) and a CRC-32 of what precedes both.
        if generating && !std::fs::read(&path).is_ok_and(|bytes| checksum_holds(&bytes, 12)) {
            torn.push(path);
        }
    }
    for path in &torn {
        tracing::warn!(path = %path.display(), "removing a torn sled file (left by a kill, a power cut or a full disk while it was written)");
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
            _ => {}
        }
    }
    if !torn.is_empty() {
        files::sync_dir(sled_dir).map_err(io)?;
    }
    Ok(!torn.is_empty())
}

/// Whether `bytes` end with a little-endian CRC-32 of all but their last `trailer`
/// bytes (the CRC being the last 4 of those).
fn checksum_holds(bytes: &[u8], trailer: usize) -> bool {
    if bytes.len() <= trailer {
        return false;
    }
    let (body, tail) = bytes.split_at(bytes.len() - trailer);
    let stored = u32::from_le_bytes(tail[tail.len() - 4..].try_into().expect("4 bytes"));
    crc32fast::hash(body) == stored
}

impl DataDirLock {
    /// Locks `DATA_DIR/lock` (the dir and file made if missing) for this process,
    /// waiting up to `data_dir_lock_wait_ms` for another process to release it. Taken
    /// before any of sled's files is read (and, on PostgreSQL, before the lease is
    /// waited for), so two processes starting at once on a new data dir cannot meet
    /// inside sled's start (sled reads its `conf` before taking its own lock, and the
    /// mending would take a half-written one for torn). The OS releases it when the
    /// process ends, however it ends.
    pub fn take(data_dir: &Path, limits: &Limits) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| StoreError::Io(format!("creating {}: {e}", data_dir.display())))?;
        let path = data_dir.join(DATA_DIR_LOCK_FILE);
        let io = |e: std::io::Error| StoreError::Io(format!("locking {}: {e}", path.display()));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io)?;
        let deadline = Instant::now() + Duration::from_millis(limits.data_dir_lock_wait_ms);
        let mut waited = false;
        loop {
            match file.try_lock() {
                Ok(()) => {
                    let dir = data_dir.to_path_buf();
                    return Ok(Self { _file: file, dir });
                }
                Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    if !waited {
                        tracing::warn!(dir = %data_dir.display(), "waiting for the data dir lock");
                        waited = true;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(StoreError::Io(format!(
                        "{} is in use by another prenota process (its lock is held)",
                        data_dir.display()
                    )))
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
            }
        }
    }
}

/// The data dir's lock file (see `DataDirLock`); empty, never removed.
const DATA_DIR_LOCK_FILE: &str = "lock";

/// Opens sled's store in `sled_dir`; if sled finds a file torn (it reads `conf` before
/// its lock, and snapshots only once it holds it), mends it and opens again, once.
/// Only a store it cannot open after that is called damaged (a torn snapshot is what a
/// start or a kill on a full disk leaves: mended, nothing is lost).
fn open_sled_mending(sled_dir: &Path, limits: &Limits) -> Result<sled::Db, StoreError> {
    let opened = match open_sled(sled_dir, limits) {
        Err(refused @ StoreError::Corrupt(_)) => match mend_torn_sled_files(sled_dir) {
            Ok(true) => {
                tracing::warn!(%refused, "sled found a torn file (left by a crash or a full disk); mended, opening again");
                open_sled(sled_dir, limits)
            }
            Ok(false) => Err(refused),
            Err(mending) => {
                tracing::error!(%mending, "could not mend sled's files");
                Err(refused)
            }
        },
        opened => opened,
    };
    opened.map_err(|error| match error {
        StoreError::Corrupt(what) => StoreError::Corrupt(format!(
            "{what} (the store's files are damaged: restore the latest backup, `prenota \
             restore`)"
        )),
        other => other,
    })
}

/// The store's recorded layout (`None`: a new store, or one from before the record),
/// refused if a newer prenota wrote it: this build would misread or miss its records.
fn refuse_a_newer_format(db: &sled::Db) -> Result<Option<u32>, StoreError> {
    let stored = db
        .get(records::STORE_FORMAT_KEY)
        .map_err(|e| StoreError::Io(format!("reading the store format: {e}")))?;
    let Some(stored) = stored else {
        return Ok(None);
    };
    let format = records::decode_store_format(&stored)?;
    if format > records::STORE_FORMAT {
        return Err(StoreError::Misconfigured(format!(
            "the store was written by a newer prenota (store format {format}; this build \
             knows {}): run that build or a newer one, or restore with this build the backup \
             taken before the upgrade",
            records::STORE_FORMAT
        )));
    }
    Ok(Some(format))
}

/// sled's log file, synced: a previous run killed between a commit's flush and its
/// fdatasync left that commit in the page cache, and sled reads it, so it must be
/// durable before anything relies on it (the commit count kept beside the store, a
/// retry answered from it).
fn open_db_file(sled_dir: &Path) -> Result<File, StoreError> {
    let db_file = OpenOptions::new()
        .read(true)
        .open(sled_dir.join("db"))
        .map_err(|e| StoreError::Io(format!("opening sled's db file: {e}")))?;
    db_file
        .sync_data()
        .map_err(|e| StoreError::Io(format!("syncing sled's db file: {e}")))?;
    Ok(db_file)
}

/// The files sled just created must survive a power loss too: sled never syncs its
/// `conf` (written when it creates a store, or rewrites a missing one) nor a directory.
fn sync_sled_files(data_dir: &Path, sled_dir: &Path) -> Result<(), StoreError> {
    let conf = sled_dir.join("conf");
    File::open(&conf)
        .and_then(|file| file.sync_all())
        .map_err(|e| StoreError::Io(format!("syncing {}: {e}", conf.display())))?;
    for dir in [sled_dir, data_dir] {
        files::sync_dir(dir)
            .map_err(|e| StoreError::Io(format!("syncing {}: {e}", dir.display())))?;
    }
    Ok(())
}

/// Opens sled, waiting up to `data_dir_lock_wait_ms` for its file lock to be released:
/// by another process, or by this one's previous `Db` (a job on sled's I/O thread pool
/// can hold the file a moment after the `Db` is dropped). A store sled finds torn is
/// `StoreError::Corrupt`.
fn open_sled(sled_dir: &Path, limits: &Limits) -> Result<sled::Db, StoreError> {
    let deadline = Instant::now() + Duration::from_millis(limits.data_dir_lock_wait_ms);
    let mut waited = false;
    loop {
        let opened = sled::Config::new()
            .path(sled_dir)
            // The committer flushes and fdatasyncs every batch it acknowledges. sled's
            // background flusher runs anyway: it is what cleans log segments (its
            // `attempt_gc`), so space freed by deletions is reused.
            .flush_every_ms(Some(limits.store_gc_interval_ms))
            .cache_capacity(limits.store_cache_bytes)
            .open();
        match opened {
            Ok(db) => return Ok(db),
            // sled reports its file lock as a custom io error wrapping EWOULDBLOCK.
            Err(sled::Error::Io(io))
                if io.kind() == std::io::ErrorKind::WouldBlock
                    || io.to_string().contains("could not acquire lock") =>
            {
                if Instant::now() >= deadline {
                    return Err(StoreError::Io(format!(
                        "{} is in use by another prenota process (its lock is held)",
                        sled_dir.display()
                    )));
                }
                if !waited {
                    tracing::warn!(dir = %sled_dir.display(), "waiting for the data dir lock");
                    waited = true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(corrupt @ sled::Error::Corruption { .. }) => {
                let at = sled_dir.display();
                return Err(StoreError::Corrupt(format!("opening {at}: {corrupt}")));
            }
            Err(other) => {
                return Err(StoreError::Io(format!(
                    "opening {}: {other}",
                    sled_dir.display()
                )))
            }
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // A failed store was said so when it failed, and by whoever shut it down.
        let _ = self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn audit(at_unix_ms: i64) -> Vec<Write> {
        vec![Write::Audit(records::AuditEntry {
            at_unix_ms,
            actor: "test".into(),
            action: "Test".into(),
            detail: String::new(),
        })]
    }

    /// With the committer held (here by the backup tee's lock, which it takes for each
    /// batch) and the queue full, `commit` is refused at once and
    /// `commit_waiting_for_room` waits its turn, then is committed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_refuses_a_commit_and_is_waited_out_by_one_waiting_for_room() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            commit_queue_depth: 1,
            commit_batch_writes_max: 1,
            ..Limits::default()
        };
        let store = Arc::new(Store::open(dir.path(), &limits).unwrap());
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (locked, is_locked) = std::sync::mpsc::channel();
        let holder = {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                let _held = store.state.tee();
                locked.send(()).unwrap();
                released.recv().unwrap();
            })
        };
        is_locked.recv().unwrap();
        let spawn_commit = |at, wait: bool| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                match wait {
                    false => store.commit(&audit(at)).await,
                    true => store.commit_waiting_for_room(&audit(at)).await,
                }
            })
        };
        let first = spawn_commit(1, false); // taken by the committer, which then waits
        tokio::time::sleep(Duration::from_millis(100)).await;
        let queued = spawn_commit(2, false); // fills the queue
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(store.commit(&audit(3)).await, Err(StoreError::Overloaded));
        let waiting = spawn_commit(4, true);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "it did not wait for room");
        release.send(()).unwrap();
        holder.join().unwrap();
        for commit in [first, queued, waiting] {
            assert_eq!(commit.await.unwrap(), Ok(()));
        }
    }
    use crate::domain::event::{Event, EventKind};
    use crate::domain::hold::{hold_second, HoldState};
    use crate::domain::ids::{ServiceId, SiteId, SlotKey};

    /// A second process on a brand-new data dir waits for the first's lock and then
    /// refuses, before it has read or made any of sled's files: two starts at once can
    /// no longer meet inside sled's start (where a half-written `conf` looks torn).
    #[test]
    fn the_data_dir_lock_is_taken_before_sleds_files_are_touched() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            data_dir_lock_wait_ms: 100,
            ..Limits::default()
        };
        // Another open file description: flock locks conflict as across processes.
        let other = File::create(dir.path().join(DATA_DIR_LOCK_FILE)).unwrap();
        other.lock().unwrap();
        let refused = Store::open(dir.path(), &limits)
            .err()
            .expect("the lock is held");
        assert!(refused
            .to_string()
            .contains("in use by another prenota process"));
        assert!(
            !dir.path().join("sled").exists(),
            "sled was opened under a held lock"
        );
        other.unlock().unwrap();
        let store = Store::open(dir.path(), &limits).unwrap();
        let third = Store::open(dir.path(), &limits)
            .err()
            .expect("held by the store");
        assert!(third.to_string().contains("in use"));
        drop(store);
        // sled's own I/O threads may hold its lock a moment longer: the default wait.
        Store::open(dir.path(), &Limits::default()).unwrap();
    }

    /// Recovery reads the bookings in parts split by the first byte of the citizen tag
    /// that begins their keys: in any number of parts, every booking is in exactly
    /// one, at the edges of the tag space too, and the records beside them (audit `A`,
    /// campaigns `C`) in none.
    #[test]
    fn booking_parts_hold_every_booking_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &Limits::default()).unwrap();
        let firsts = [0x00u8, 0x01, 0x7f, 0x80, 0x81, 0xaa, 0xfe, 0xff];
        let mut bookings: Vec<Vec<u8>> = firsts
            .iter()
            .map(|&first| {
                let mut key = vec![records::BOOKING_PREFIX, first];
                key.extend([first; 23]);
                key
            })
            .collect();
        bookings.push(vec![records::BOOKING_PREFIX]); // the shortest key the prefix has
        bookings.sort();
        for key in &bookings {
            store.db.insert(key.as_slice(), b"booking").unwrap();
        }
        store.db.insert([b'A', 0xff, 0xff], b"audit").unwrap();
        store.db.insert([b'C', 0x00], b"campaign").unwrap();
        for parts in [1, 2, 3, 7, 256] {
            let mut read: Vec<Vec<u8>> = (0..parts)
                .flat_map(|part| store.booking_records((part, parts)))
                .map(|record| record.unwrap().0.to_vec())
                .collect();
            read.sort();
            assert_eq!(read, bookings, "in {parts} parts");
        }
    }

    /// A live hold made at `created_at_unix_ms`, for a minute.
    fn hold(hold_id: u128, created_at_unix_ms: i64) -> Hold {
        let expires_at_unix_ms = created_at_unix_ms + 60_000;
        Hold {
            created_at_unix_ms,
            ..crate::domain::hold::test_hold(hold_id, 3, expires_at_unix_ms)
        }
    }

    /// A hold written before hold ids sealed their second is read where it is (its id
    /// opens to a random second, so a lookup falls back to its old key), and written
    /// again there: never two records of one hold. Once retention deleted the last one,
    /// the store stops looking there.
    #[test]
    fn a_hold_under_its_old_key_stays_there_and_is_found_from_its_id() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let live = hold(7, 1_780_000_000_500);
        let old_key = records::old_hold_key(live.hold_id);
        let random_second = 0x6b3a_1234; // what the old id opens to
        {
            let store = Store::open(dir.path(), &Limits::default()).unwrap();
            assert!(!store.old_holds.load(Ordering::Relaxed));
            let value = live.encode_value().unwrap();
            store.db.insert(old_key, value).unwrap();
            store.sync_direct_writes().unwrap();
        }
        let store = Store::open(dir.path(), &Limits::default()).unwrap();
        assert!(store.old_holds.load(Ordering::Relaxed), "seen at open");
        let found = store.hold(random_second, live.hold_id).unwrap();
        assert_eq!(found.as_ref(), Some(&live));
        let holds = |store: &Store| store.holds().collect::<Result<Vec<_>, _>>().unwrap();
        assert_eq!(holds(&store), vec![live.clone()]);

        let expired = Hold {
            state: HoldState::Expired {
                at_unix_ms: live.expires_at_unix_ms,
            },
            ..live.clone()
        };
        runtime
            .block_on(store.commit(&[Write::Hold(expired.clone())]))
            .unwrap();
        assert_eq!(holds(&store), vec![expired.clone()], "written in place");
        let found = store.hold(random_second, live.hold_id).unwrap();
        assert_eq!(found.as_ref(), Some(&expired));
        store.recheck_old_holds().unwrap();
        assert!(store.old_holds.load(Ordering::Relaxed), "still one there");

        runtime
            .block_on(store.commit(&[Write::Delete(old_key.to_vec())]))
            .unwrap();
        store.recheck_old_holds().unwrap();
        assert!(!store.old_holds.load(Ordering::Relaxed));
        assert_eq!(store.hold(random_second, live.hold_id).unwrap(), None);
        // A new hold goes under its new key, found by the second its id seals.
        let second = hold_second(live.created_at_unix_ms);
        runtime
            .block_on(store.commit(&[Write::Hold(live.clone())]))
            .unwrap();
        assert_eq!(store.hold(second, live.hold_id).unwrap(), Some(live));
        assert!(store.db.get(old_key).unwrap().is_none());
    }

    /// An event of about 130 bytes: some 30 make a run.
    fn event(at_unix_ms: i64) -> Event {
        Event {
            kind: EventKind::SlotClosed,
            at_unix_ms,
            slot: SlotKey {
                site_id: SiteId::parse("s", "site", 64).unwrap(),
                service_id: ServiceId::parse("s", "vax", 64).unwrap(),
                start_unix_s: 1_800_000_000,
            },
            booking: None,
            hold_id: None,
            previous_booking_id: None,
            reason: "closed for a flood in the basement ".repeat(3),
            capacity: None,
        }
    }

    fn sequences(events: &[SequencedEvent]) -> Vec<u64> {
        events.iter().map(|e| e.sequence).collect()
    }

    /// (first, last) sequence of every event record, in key order.
    fn records_of(store: &Store) -> Vec<(u64, u64)> {
        let scan = store.db.scan_prefix([records::EVENT_PREFIX]);
        scan.map(|item| {
            let (key, value) = item.unwrap();
            let run = records::decode_event_record(&key, &value).unwrap();
            (run[0].sequence, run.last().unwrap().sequence)
        })
        .collect()
    }

    /// Events 1–2 stored one per record (as before runs), 3–202 in runs of three
    /// commits (1, 99 and 100 events, the last two split into several runs): every
    /// window of the log reads the same events in order, the last sequence survives a
    /// reopen, and retention's keys are whole records, never one holding an event at or
    /// after the durable last, never one with an event it must keep.
    #[test]
    fn the_event_log_reads_the_same_across_single_records_and_runs() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        {
            let db = sled::open(dir.path().join("sled")).unwrap();
            for sequence in 1..=2 {
                let value = records::encode_event_format_1(&event(sequence as i64)).unwrap();
                db.insert(records::event_key(sequence), value).unwrap();
            }
            db.flush().unwrap();
        }
        let store = Store::open(dir.path(), &Limits::default()).unwrap();
        assert_eq!(*store.last_event().borrow(), 2);
        for commit in [1usize, 99, 100] {
            let writes: Vec<Write> = (0..commit).map(|_| Write::Event(event(50))).collect();
            runtime.block_on(store.commit(&writes)).unwrap();
        }
        assert_eq!(*store.last_event().borrow(), 202);
        let records = records_of(&store);
        let contiguous = records.windows(2).all(|pair| pair[1].0 == pair[0].1 + 1);
        assert!(contiguous && records[0].0 == 1, "{records:?}");
        // Runs never cross a commit (ends 2, 3, 102, 202) and both big commits split.
        let ends: Vec<u64> = records.iter().map(|r| r.1).collect();
        assert!(
            [1, 2, 3, 102, 202].iter().all(|end| ends.contains(end)),
            "{records:?}"
        );
        let runs_of = |from: u64, to: u64| records.iter().filter(move |r| r.0 >= from && r.1 <= to);
        assert!(runs_of(4, 102).count() >= 3 && runs_of(103, 202).count() >= 3);

        let all: Vec<u64> = (1..=202).collect();
        assert_eq!(sequences(&store.events(0, 202, 1_000).unwrap()), all);
        let windows = [
            (0, 5, 3),
            (1, 3, 10),
            (2, 60, 7),
            (40, 70, 1_000),
            (57, 202, 90),
        ];
        for (after, through, limit) in windows {
            let expected: Vec<u64> = (after + 1..=through).take(limit).collect();
            let read = sequences(&store.events(after, through, limit).unwrap());
            assert_eq!(
                read, expected,
                "after {after}, through {through}, limit {limit}"
            );
        }
        assert!(store.events(202, 202, 10).unwrap().is_empty());
        assert!(store.events(0, 10, 0).unwrap().is_empty());

        // Every cut at, just before and just after each record's end, with the durable
        // last at the end of the log or inside it: whole records only, all before it.
        let cuts = ends.iter().flat_map(|&end| [end - 1, end, end + 1]);
        for (cut, last) in cuts.flat_map(|cut| [(cut, 202), (cut, 100)]) {
            let old = |e: &SequencedEvent| e.sequence <= cut;
            let (keys, events) = store.old_event_records(last, old, 1_000).unwrap();
            let whole: Vec<&(u64, u64)> = (records.iter())
                .take_while(|r| r.1 <= cut && r.1 < last)
                .collect();
            let expected: Vec<Vec<u8>> = (whole.iter())
                .map(|r| records::event_key(r.0).to_vec())
                .collect();
            assert_eq!(keys, expected, "cut {cut}, last {last}");
            assert_eq!(
                events,
                whole.last().map_or(0, |r| r.1),
                "cut {cut}, last {last}"
            );
        }
        let old = |_: &SequencedEvent| true;
        assert_eq!(store.old_event_records(202, old, 1).unwrap().1, 1);

        // Deleting the first records moves the oldest event to the next record's first.
        let (keys, _) = store
            .old_event_records(202, |e| e.sequence <= 3, 1_000)
            .unwrap();
        let deletes: Vec<Write> = keys.into_iter().map(Write::Delete).collect();
        runtime.block_on(store.commit(&deletes)).unwrap();
        assert_eq!(store.oldest_event().unwrap(), Some(4));
        assert_eq!(sequences(&store.events(0, 6, 10).unwrap()), [4, 5, 6]);
        drop(store);
        let store = Store::open(dir.path(), &Limits::default()).unwrap();
        assert_eq!(*store.last_event().borrow(), 202);
        assert_eq!(store.oldest_event().unwrap(), Some(4));
    }
}

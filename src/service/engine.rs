//! The engine: the state every command works on (catalog, citizen index, live holds,
//! request registry, store, clock) and the steps commands share. The commands themselves
//! are in the feature modules (see `service`); opening (recovery) is in `recovery`.
//!
//! Must not import tonic. Reads the clock here and passes `now` into the domain.
//!
//! Every command follows one rule: places are taken in memory *before* the write and
//! returned only *after* the durable write that frees them, so memory never shows
//! more free places than the disk would after a crash. A write refused as
//! `Overloaded` (never queued) or `Failed` (the store had failed: never tried) is
//! undone in memory; after any other storage error the store is failed and a restart
//! rebuilds from the disk.

use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use tokio::sync::watch;

use crate::config::Limits;
use crate::domain::booking::{Booking, RequestRecord};
use crate::domain::catalog::{Catalog, SearchPage, SearchQuery, Site, Slot};
use crate::domain::citizen_id::CitizenIds;
use crate::domain::citizens::CitizenIndex;
use crate::domain::error::{DomainError, Missing};
use crate::domain::hold::LiveHolds;
use crate::domain::ids::{
    BookingId, ChannelId, CitizenKey, RegionId, RequestFingerprint, RequestKey, SiteId, SlotKey,
};
use crate::service::citizen_hasher::{BookingIds, CitizenHasher};
use crate::service::clock::Clock;
use crate::service::error::{Limiter, ServiceError};
use crate::service::exports::{ExportKind, ExportPermit, Exports, FedStream, Feed, OnIdle};
use crate::service::rate_limits;
use crate::service::requests::{self, Begin, RequestRegistry};
use crate::store::backup_key::BackupKey;
use crate::store::records::{self, Write};
use crate::store::size_hint::IndexSizes;
use crate::store::{Store, StoreError};

/// A booking with the site it belongs to (for its time zone).
#[derive(Clone, Debug)]
pub struct BookingView {
    pub booking: Booking,
    pub site: Arc<Site>,
}

#[derive(Clone, Debug)]
pub enum ExportScope {
    All,
    Site(SiteId),
    Region(RegionId),
}

pub struct Engine {
    pub(super) limits: Limits,
    pub(super) store: Store,
    /// Read on every request; written only by authority writes.
    pub(super) catalog: RwLock<Catalog>,
    pub(super) citizens: CitizenIndex,
    pub(super) requests: RequestRegistry,
    /// Live holds. One mutex: each critical section is one map operation.
    pub(super) holds: Mutex<LiveHolds>,
    pub(super) hasher: CitizenHasher,
    pub(super) ids: BookingIds,
    /// Booking references being written, and check-in codes tried wrong.
    pub(super) references: crate::service::references::References,
    /// The key of `hasher` and `ids`, for backups.
    pub(super) citizen_hash_key: [u8; 32],
    /// Authenticates backups and seals the citizen hash key in them; none: no backups.
    pub(super) backup_key: Option<Arc<BackupKey>>,
    /// Booking attempts per citizen.
    pub(super) attempts: rate_limits::CitizenLimiter,
    /// Reads of a citizen's bookings (GetBooking, ListCitizenBookings) per citizen.
    pub(super) reads: rate_limits::CitizenLimiter,
    /// Exports streaming now, in total and per token.
    pub(super) exports: Exports,
    /// `WatchEvents` streams open now, in total and per token.
    pub(super) event_streams: Exports,
    /// `WatchAvailability` streams, filed for the fan-out.
    pub(super) watchers: crate::service::state::watchers::Watchers,
    /// Turns true when the server shuts down: watch streams end.
    pub(super) closing: watch::Sender<bool>,
    /// The id of the store's event log (hex), new after a restore.
    pub(super) event_log_id: String,
    /// How citizen ids are read (the scheme and the length bound).
    pub(super) citizen_ids: CitizenIds,
    /// Serialises authority writes (sites, schedules, imports, capacities, closures)
    /// so their plan and apply steps see no other authority write in between. Never
    /// taken by bookings.
    pub(super) authority_writes: tokio::sync::Mutex<()>,
    /// Announced openings and their waiting rooms.
    pub(super) releases: crate::service::state::releases::Releases,
    /// Campaigns, their registrations and offers.
    pub(super) campaigns: crate::service::state::campaigns::Campaigns,
    /// Dose series (`UpsertSeries`).
    pub(super) series: crate::service::state::series::SeriesBook,
    /// Every `now` of the engine comes from here (tests pass a manual clock).
    pub(super) clock: Clock,
    /// When this engine opened (retention dates format-1 authority requests from it).
    pub(super) opened_at_unix_ms: i64,
    /// The last audit entry's time, so the log's key order is the order of the changes.
    pub(super) last_audit_unix_ms: std::sync::atomic::AtomicI64,
    /// Retention's time when last read, and the clock's elapsed ms then
    /// (`domain::retention::retention_time`).
    pub(super) retention_time: Mutex<(i64, i64)>,
}

/// Whose booking attempt a request is, counted against the citizen's per-minute quota
/// (`rate_citizen_attempts_per_min`) when the request runs (`once_per_request`).
#[derive(Clone, Copy)]
pub(super) enum Attempt<'a> {
    /// None: the request spends no attempt (a cancel).
    No,
    /// The citizen's.
    Of(&'a CitizenKey),
    /// The citizen's, on this slot: counted only if the slot exists.
    On(&'a CitizenKey, &'a SlotKey),
}

/// The result of a write whose in-memory effects are undone only if it was certainly
/// never written ([`StoreError::never_written`]: the queue was full, or the store had
/// failed before). After any other error the write may be on disk: memory keeps its
/// effects (places stay taken: never overbook), and the store is failed until a
/// restart rebuilds from the disk.
pub(super) fn undo_if_never_written(
    written: Result<(), StoreError>,
    undo: impl FnOnce(),
) -> Result<(), ServiceError> {
    if written.as_ref().is_err_and(StoreError::never_written) {
        undo();
    }
    Ok(written?)
}

impl Engine {
    /// Refuses a record too large to store (`records::RECORD_BYTES_MAX`): `field` is what
    /// makes it so, `advice` how to make it smaller.
    pub(super) fn check_storable(
        &self,
        write: &Write,
        field: &str,
        advice: &str,
    ) -> Result<(), ServiceError> {
        let (bytes, max) = (records::stored_bytes(write)?, records::RECORD_BYTES_MAX);
        if bytes > max {
            let why = format!("would be stored as {bytes} bytes, more than {max}: {advice}");
            return Err(DomainError::invalid(field, why).into());
        }
        Ok(())
    }

    /// Counts one booking attempt of this citizen against its per-minute quota.
    pub(super) fn count_attempt(&self, citizen: &CitizenKey) -> Result<(), ServiceError> {
        self.attempts
            .check(citizen)
            .map_err(|wait| ServiceError::rate_limited(Limiter::Citizen, wait))
    }

    /// Counts `attempt`; one on a slot only if the slot exists: a made-up slot id cannot
    /// burn a citizen's quota. (An unknown slot is refused later, in the usual order.)
    fn count(&self, attempt: Attempt<'_>) -> Result<(), ServiceError> {
        match attempt {
            Attempt::No => Ok(()),
            Attempt::Of(citizen) => self.count_attempt(citizen),
            Attempt::On(citizen, slot) => match self.slot(slot) {
                Ok(_) => self.count_attempt(citizen),
                Err(_) => Ok(()),
            },
        }
    }

    /// Counts one read of this citizen's bookings against its per-minute quota.
    pub(super) fn count_read(&self, citizen: &CitizenKey) -> Result<(), ServiceError> {
        self.reads
            .check(citizen)
            .map_err(|wait| ServiceError::rate_limited(Limiter::CitizenReads, wait))
    }

    /// Forgets citizens whose quotas have refilled; returns how many are still tracked.
    pub fn retain_rate_limits(&self) -> usize {
        self.attempts.retain() + self.reads.retain()
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// How citizen ids are read: the handlers canonicalise them before the engine
    /// hashes them.
    pub fn citizen_ids(&self) -> &CitizenIds {
        &self.citizen_ids
    }

    /// The engine's clock (the sweeper and the handlers read `now` from it too).
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Every stored record as it is (key, value), for `prenota migrate`: read from the
    /// store this engine checked at start-up and still holds (and locks).
    pub fn stored_records(
        &self,
    ) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), crate::store::StoreError>> + '_ {
        self.store.every_record()
    }

    pub(super) fn now_unix_ms(&self) -> i64 {
        self.clock.now_unix_ms()
    }

    pub(super) fn now_unix_s(&self) -> i64 {
        self.now_unix_ms().div_euclid(1_000)
    }

    /// The store's size on disk, in bytes.
    pub fn store_disk_bytes(&self) -> Result<u64, ServiceError> {
        Ok(self.store.size_on_disk()?)
    }

    /// `true` while the store accepts writes.
    pub fn store_health(&self) -> watch::Receiver<bool> {
        self.store.health()
    }

    pub(super) fn catalog(&self) -> RwLockReadGuard<'_, Catalog> {
        // Catalog writes are single map inserts: a poisoned lock still guards sound data.
        self.catalog.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn catalog_mut(&self) -> RwLockWriteGuard<'_, Catalog> {
        self.catalog.write().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn live_holds(&self) -> MutexGuard<'_, LiveHolds> {
        // Every critical section is one map operation: a poisoned lock guards sound data.
        self.holds.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn site(&self, site_id: &SiteId) -> Option<Arc<Site>> {
        self.catalog().site(site_id).cloned()
    }

    pub(super) fn slot(&self, key: &SlotKey) -> Result<Arc<Slot>, DomainError> {
        self.catalog()
            .slot(key)
            .map(|(_, slot)| Arc::clone(slot))
            .ok_or(DomainError::NotFound(Missing::Slot))
    }

    /// A slot and the region of its site (a release covers slots by region or site).
    pub(super) fn slot_in_region(
        &self,
        key: &SlotKey,
    ) -> Result<(RegionId, Arc<Slot>), DomainError> {
        let catalog = self.catalog();
        let (site, slot) = catalog
            .slot(key)
            .ok_or(DomainError::NotFound(Missing::Slot))?;
        Ok((site.region_id.clone(), Arc::clone(slot)))
    }

    /// Returns one place of a slot after the durable write that freed it. The matcher
    /// is told after the counter has it: a step that sees the news finds the place.
    pub(super) fn return_place(&self, key: &SlotKey, channel: &ChannelId) {
        self.return_place_to_counter(key, channel);
        self.campaigns.place_returned();
    }

    /// Frees what a booking or hold `id` of `channel` held, after the durable write that
    /// ended it: its citizen entry, then its place.
    pub(super) fn free_entry_and_place(
        &self,
        (citizen, channel): (CitizenKey, &ChannelId),
        slot: &SlotKey,
        id: BookingId,
    ) {
        self.citizens.release(citizen, &slot.service_id, id);
        self.return_place(slot, channel);
    }

    pub fn search(&self, query: &SearchQuery) -> Result<SearchPage, ServiceError> {
        Ok(self.catalog().search(query)?)
    }

    pub(super) fn view(&self, booking: Booking) -> Result<BookingView, ServiceError> {
        let site = self.site(&booking.slot.site_id).ok_or_else(|| {
            ServiceError::Store(StoreError::Corrupt(format!(
                "booking {} refers to unknown site {}",
                booking.booking_id, booking.slot.site_id
            )))
        })?;
        Ok(BookingView { booking, site })
    }

    /// A reference and check-in code for a new booking: settle it with the outcome of
    /// the booking's write (a refused booking gives its reference back).
    pub(super) fn mint_codes(
        &self,
    ) -> Result<crate::service::references::Minted<'_>, ServiceError> {
        let stored = self.store.booking_index();
        self.references
            .mint(|reference| stored.by_reference(reference).is_some())
    }

    pub(super) fn stored_booking(&self, booking_id: BookingId) -> Result<Booking, ServiceError> {
        Ok(self
            .store
            .booking(self.ids.tag_of(booking_id), booking_id)?
            .ok_or(DomainError::NotFound(Missing::Booking))?)
    }

    /// Until when a request may wait for another request's write to land and still
    /// answer for itself: half of `request_timeout_ms` (the server's own timeout would
    /// answer first). Such waits look again every `LANDING_POLL`.
    pub(super) fn landing_deadline(&self) -> tokio::time::Instant {
        let wait = std::time::Duration::from_millis(self.limits.request_timeout_ms / 2);
        tokio::time::Instant::now() + wait
    }

    /// The citizen's own booking; another citizen's is `NOT_FOUND` (ids are not
    /// confirmed to strangers). Counted against the citizen's read quota. Answered once
    /// what it read is durable (`Store::settled`), like every read a client sees.
    pub async fn citizen_booking(
        &self,
        booking_id: BookingId,
        citizen_id: &str,
    ) -> Result<BookingView, ServiceError> {
        let view = self.own_booking(citizen_id, |store, citizen| {
            store.booking(citizen.tag(), booking_id)
        })?;
        self.store.settled().await?;
        Ok(view)
    }

    /// The booking `find` reads for the citizen (whose key it is given) if it is the
    /// citizen's own; none, or another citizen's, is `NOT_FOUND`, alike. Counted against
    /// the citizen's read quota first.
    pub(crate) fn own_booking(
        &self,
        citizen_id: &str,
        find: impl FnOnce(&Store, CitizenKey) -> Result<Option<Booking>, StoreError>,
    ) -> Result<BookingView, ServiceError> {
        let citizen = self.hasher.hash(citizen_id);
        self.count_read(&citizen)?;
        let booking = find(&self.store, citizen)?
            .filter(|booking| booking.citizen == citizen)
            .ok_or(DomainError::NotFound(Missing::Booking))?;
        self.view(booking)
    }

    /// `answer`, made from what was just read, once that is durable (`Store::settled`),
    /// like every read a client sees: a retry must not show a later change (a cancel)
    /// before its write could still be lost to a crash, nor anything after the store
    /// failed.
    pub(super) async fn once_settled<T>(
        &self,
        answer: Result<T, ServiceError>,
    ) -> Result<T, ServiceError> {
        self.store.settled().await?;
        answer
    }

    /// Runs `work` once per `request_id`: a retry gets the first outcome back (through
    /// `fetch`, answered once durable), a copy in flight waits for the first one's outcome, a different request
    /// is refused. The registry keeps only the outcome's id; the fingerprint names the
    /// command, so an id is always fetched as the kind of thing it was created as.
    /// `attempt` is counted only when `work` runs: a retry is no new attempt, and the
    /// first outcome answered again is noted as a replay (`requests::noting_replays`).
    pub(super) async fn once_per_request<T, Work>(
        &self,
        (request, fingerprint): (RequestKey, RequestFingerprint),
        attempt: Attempt<'_>,
        work: impl FnOnce(RequestRecord) -> Work,
        id_of: impl Fn(&T) -> BookingId,
        fetch: impl Fn(BookingId) -> Result<T, ServiceError>,
    ) -> Result<T, ServiceError>
    where
        Work: std::future::Future<Output = Result<T, ServiceError>>,
    {
        let guard = match self
            .requests
            .begin(request, fingerprint, self.now_unix_ms())?
        {
            Begin::Done(id) => return requests::replayed(self.once_settled(fetch(id)).await),
            Begin::Wait(outcome) => {
                let id = match requests::wait(outcome).await {
                    Ok(id) => id,
                    // The first copy went away: nothing to answer again.
                    Err(ServiceError::Abandoned) => return Err(ServiceError::Abandoned),
                    Err(refused) => {
                        requests::note_replay(); // the first copy's refusal, heard again
                        return Err(refused);
                    }
                };
                return requests::replayed(self.once_settled(fetch(id)).await);
            }
            Begin::Fresh(guard) => guard,
        };
        if let Err(refused) = self.count(attempt) {
            // Copies waiting for this request hear why (an error is not remembered).
            let _ = guard.finish(Err(refused.clone()));
            return Err(refused);
        }
        let outcome = work(RequestRecord {
            key: request,
            fingerprint,
        })
        .await;
        guard.finish(outcome.as_ref().map(&id_of).map_err(Clone::clone))?;
        outcome
    }

    /// A place for one more export by `token` (see `exports`); keep it as long as the
    /// export's stream.
    pub fn admit_export(
        &self,
        token: &str,
        kind: ExportKind,
    ) -> Result<ExportPermit, ServiceError> {
        self.exports.admit(token, kind)
    }

    /// A feed for an export's stream (`depth` items buffered, the idle
    /// timeout of the limits).
    pub fn export_feed<T: Send + 'static>(
        &self,
        depth: usize,
        on_idle: Option<OnIdle>,
    ) -> (Feed<T>, FedStream<T>) {
        let idle = std::time::Duration::from_millis(self.limits.export_idle_timeout_ms);
        Feed::channel(depth, idle, on_idle, self.store.settling())
    }

    /// Streams every stored booking in scope; the scan runs on a blocking thread and
    /// waits for the reader (bounded channel, idle timeout), so a slow client holds no
    /// memory and a stalled one no thread.
    pub fn export_bookings(
        self: &Arc<Self>,
        scope: ExportScope,
        on_idle: Option<OnIdle>,
    ) -> FedStream<BookingView> {
        let (sender, receiver) = self.export_feed(self.limits.export_channel_depth, on_idle);
        let engine = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            for item in engine.store.bookings() {
                let item = item
                    .map_err(ServiceError::from)
                    .and_then(|booking| engine.view(booking));
                let wanted = match (&item, &scope) {
                    (Err(_), _) | (Ok(_), ExportScope::All) => true,
                    (Ok(view), ExportScope::Site(site_id)) => view.site.site_id == *site_id,
                    (Ok(view), ExportScope::Region(region_id)) => view.site.region_id == *region_id,
                };
                if wanted && sender.send(item).is_err() {
                    return; // the client went away or stopped reading
                }
            }
        });
        receiver
    }

    /// Streams the audit log, oldest first (like `export_bookings`).
    pub fn audit_log(
        self: &Arc<Self>,
        on_idle: Option<OnIdle>,
    ) -> FedStream<crate::store::records::AuditEntry> {
        let (sender, receiver) = self.export_feed(self.limits.export_channel_depth, on_idle);
        let engine = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            for entry in engine.store.audit_entries() {
                if sender.send(entry.map_err(ServiceError::from)).is_err() {
                    return;
                }
            }
        });
        receiver
    }

    /// Ends every watch stream (shutdown: they never end by themselves).
    pub fn end_streams(&self) {
        self.closing.send_replace(true);
    }

    /// Lets queued writes finish durably, then stops the committer.
    pub fn shutdown(&mut self) -> Result<(), StoreError> {
        self.keep_size_hint();
        self.store.shutdown()
    }

    /// Writes the sizes of the indexes recovery rebuilds, for the next recovery to size
    /// its tables by (`store::size_hint`), and returns them. Only a hint: a failure is
    /// logged, nothing else.
    pub fn keep_size_hint(&self) -> IndexSizes {
        let sizes = IndexSizes {
            bookings: self.store.booking_index().references() as u64,
            citizens: self.citizens.entries() as u64,
            requests: self.requests.remembered() as u64,
        };
        if let Err(e) = sizes.write(self.store.data_dir()) {
            tracing::warn!(error = %e, "could not keep the recovery size hint");
        }
        sizes
    }
}

/// How often a wait bounded by `Engine::landing_deadline` looks again.
pub(super) const LANDING_POLL: std::time::Duration = std::time::Duration::from_millis(1);

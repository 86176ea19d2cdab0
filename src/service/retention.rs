//! Retention: forgets finished requests after `request_records_retained_hours` and
//! deletes what belongs to slots ended more than `records_retained_days` ago, in bounded
//! background batches (PRODUCT.md A). The rules are `domain::retention`; this file reads
//! the candidates (holds made before the later cut-off, the bookings in the rosters of
//! slots started before the records' cut-off, the catalog's ended slots, old audit
//! entries, authority requests and events) in steps of `retention_batch_records`
//! records, each step's deletions one group commit, and keeps memory in step with the
//! disk.
//!
//! Order keeps every crash point recoverable: bookings and holds of a slot go before the
//! slot itself (recovery refuses a booking of an unknown slot), and a confirmed
//! booking's citizen entry is claimed before its record is deleted and released after,
//! like a cancel, so no cancel can write it back in between. An ended release's tickets go
//! before the release (`service::releases`). An ended campaign's record goes first, and
//! memory forgets it at once (`service::campaigns`): its registrations are then of no
//! campaign, which recovery leaves unchecked and this pass then deletes (the next, if
//! this one is cut short), so a pass cut short or a write to one meanwhile leaves a
//! store that starts.

use std::collections::HashSet;

use crate::domain::booking::Booking;
use crate::domain::event::SequencedEvent;
use crate::domain::hold::Hold;
use crate::domain::ids::{BookingId, SlotKey};
use crate::domain::retention::{self, Cutoffs};
use crate::service::engine::Engine;
use crate::service::error::ServiceError;
use crate::store::records::{self, AuthorityRequest, Record, Write};
use crate::telemetry;

/// What one retention pass forgot or deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retained {
    /// Finished requests forgotten in memory (their records go with holds and bookings,
    /// or are the authority requests below).
    pub request_records: u64,
    pub holds: u64,
    pub bookings: u64,
    pub slots: u64,
    pub audit_entries: u64,
    pub authority_requests: u64,
    pub events: u64,
    /// Releases whose slots all ended before the window, and their queue tickets.
    pub releases: u64,
    pub tickets: u64,
    /// Campaigns that ended before the window, and their registrations.
    pub campaigns: u64,
    pub registrations: u64,
    /// Hold records the pass read (kept ones too): not a deletion. Holds made after
    /// `Cutoffs::keeps_holds_from_second` are not read.
    pub holds_read: u64,
    /// Booking records the pass read (kept ones too): not a deletion. Only bookings
    /// of slots started before the records' cut-off are read (while every stored
    /// booking has a reference).
    pub bookings_read: u64,
}

impl Retained {
    /// Nothing was forgotten or deleted.
    pub fn is_empty(&self) -> bool {
        Retained {
            holds_read: 0,
            bookings_read: 0,
            ..*self
        } == Retained::default()
    }

    /// Each count with its `kind` label (`telemetry::RETENTION_KINDS`, in that order).
    fn count(&self) -> [(&'static str, u64); 11] {
        let counts = [
            self.request_records,
            self.holds,
            self.bookings,
            self.slots,
            self.audit_entries,
            self.authority_requests,
            self.events,
            self.releases,
            self.tickets,
            self.campaigns,
            self.registrations,
        ];
        std::array::from_fn(|i| (telemetry::RETENTION_KINDS[i], counts[i]))
    }
}

/// Records of one kind with their keys, one step of a scan.
type KeyedRecords<T> = Vec<(Vec<u8>, T)>;

impl Engine {
    /// The retention windows as of retention's time now.
    pub(super) fn retention_cutoffs(&self) -> Cutoffs {
        self.cutoffs_at(self.retention_now_unix_ms())
    }

    /// The retention windows as of retention's time `time`.
    fn cutoffs_at(&self, time: i64) -> Cutoffs {
        let limits = &self.limits;
        Cutoffs::at(
            time,
            (
                limits.request_records_retained_hours,
                limits.records_retained_days,
                limits.events_retained_hours,
            ),
        )
    }

    /// Retention's time now: the clock's, gaining on the time that passed at most
    /// `RETENTION_TIME_PACE` times over (`domain::retention::retention_time`), from where
    /// it started at open (the stored retention time, else the store's newest write, if
    /// the clock was later).
    pub(super) fn retention_now_unix_ms(&self) -> i64 {
        let mut last = self
            .retention_time
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Read under the lock: an older reading must not move the last one back.
        let (now, elapsed) = (self.now_unix_ms(), self.clock.elapsed_ms());
        let time = retention::retention_time(last.0, elapsed - last.1, now);
        *last = (time, elapsed);
        metrics::gauge!(telemetry::RETENTION_BEHIND_CLOCK_SECONDS)
            .set(now.saturating_sub(time) as f64 / 1_000.0);
        time
    }

    /// Stores retention's time as of now (a clean stop), so the next start continues
    /// from here rather than from the last pass, up to `retention_interval_ms` earlier.
    /// Only a head start: a store that fails is logged at debug, nothing else.
    pub async fn keep_retention_time(&self) {
        let time = self.retention_now_unix_ms();
        if let Err(error) = self.store.commit(&[Write::RetentionTime(time)]).await {
            tracing::debug!(%error, "retention's time was not stored at the stop");
        }
    }

    /// One retention pass over memory and the store, in bounded steps. The server
    /// runs one every `retention_interval_ms`; tests call it directly.
    pub async fn retain(&self) -> Result<Retained, ServiceError> {
        let time = self.retention_now_unix_ms();
        let cutoffs = self.cutoffs_at(time);
        let mut retained = Retained {
            request_records: self.requests.prune(cutoffs.requests_before_unix_ms) as u64,
            ..Retained::default()
        };
        // Ended slots that still have a record this pass could not delete: kept.
        let mut pinned = HashSet::new();
        (retained.holds, retained.holds_read) = self.delete_holds(&cutoffs, &mut pinned).await?;
        (retained.bookings, retained.bookings_read) =
            self.delete_bookings(&cutoffs, &mut pinned).await?;
        retained.slots = self.delete_slots(&cutoffs, &pinned).await?;
        retained.audit_entries = self.delete_audit_entries(&cutoffs).await?;
        retained.authority_requests = self.delete_authority_requests(&cutoffs).await?;
        retained.events = self.delete_events(&cutoffs).await?;
        (retained.releases, retained.tickets) = self.delete_releases(&cutoffs).await?;
        (retained.campaigns, retained.registrations) = self.delete_campaigns(&cutoffs).await?;
        // Where the next start's retention time begins (a clock still wrong then must
        // not move it to the stamps of writes made meanwhile).
        self.store.commit(&[Write::RetentionTime(time)]).await?;
        for (kind, count) in retained.count() {
            metrics::counter!(telemetry::RETENTION_DELETED, "kind" => kind).increment(count);
        }
        self.keep_size_hint();
        Ok(retained)
    }

    /// The end of slot `key`, if the catalog has it (read as each record is judged, so a
    /// slot published during the pass counts too; no copy of the catalog is made).
    fn slot_end(&self, key: &SlotKey) -> Option<i64> {
        self.slot(key).ok().map(|slot| slot.end_unix_s())
    }

    /// Up to one batch of records of kind `prefix` from `*cursor`, moving the cursor past
    /// them; `None` once the kind is scanned to its end.
    fn next_batch<T: Record>(
        &self,
        prefix: u8,
        cursor: &mut Vec<u8>,
    ) -> Result<Option<KeyedRecords<T>>, ServiceError> {
        let batch: KeyedRecords<T> =
            self.store
                .records_from(prefix, cursor, self.limits.retention_batch_records)?;
        match batch.last() {
            None => Ok(None),
            Some((last, _)) => {
                *cursor = records::key_after(last);
                Ok(Some(batch))
            }
        }
    }

    /// Commits one batch of deletions (if any) and lets other tasks run.
    async fn delete_keys(&self, keys: Vec<Vec<u8>>) -> Result<u64, ServiceError> {
        let count = keys.len() as u64;
        if count > 0 {
            let writes: Vec<Write> = keys.into_iter().map(Write::Delete).collect();
            self.store.commit(&writes).await?;
        }
        tokio::task::yield_now().await;
        Ok(count)
    }

    async fn delete_holds(
        &self,
        cutoffs: &Cutoffs,
        pinned: &mut HashSet<SlotKey>,
    ) -> Result<(u64, u64), ServiceError> {
        // Old keys are in id order, new ones in the order the holds were made: past
        // `kept_from`, every hold is kept, so the scan ends there.
        let kept_from = records::hold_key(cutoffs.keeps_holds_from_second(), BookingId(0));
        let (mut deleted, mut read) = (0, 0);
        for prefix in [records::OLD_HOLD_PREFIX, records::HOLD_PREFIX] {
            let mut cursor = vec![prefix];
            while let Some(mut batch) = self.next_batch::<Hold>(prefix, &mut cursor)? {
                let kept_on = batch.partition_point(|(key, _)| key[..] < kept_from[..]);
                let rest_kept = kept_on < batch.len();
                batch.truncate(kept_on);
                read += batch.len() as u64;
                let mut doomed = Vec::new();
                for (key, hold) in batch {
                    match cutoffs.keeps_hold(&hold, self.slot_end(&hold.slot)) {
                        true => drop(pinned.insert(hold.slot)),
                        false => doomed.push((key, (hold.request.key, hold.hold_id))),
                    }
                }
                let (keys, requests): (Vec<_>, Vec<_>) = doomed.into_iter().unzip();
                deleted += self.delete_keys(keys).await?;
                for (request, hold_id) in requests {
                    self.requests.forget(&request, hold_id);
                }
                if rest_kept {
                    break;
                }
            }
        }
        self.store.recheck_old_holds()?;
        Ok((deleted, read))
    }

    /// Deletes the bookings of slots ended beyond the window; returns how many it
    /// deleted and how many it read. Only slots that started before the cut-off can
    /// have ended before it, so their rosters are read, not every booking; while a
    /// booking no roster has may be stored (from before references), every booking.
    async fn delete_bookings(
        &self,
        cutoffs: &Cutoffs,
        pinned: &mut HashSet<SlotKey>,
    ) -> Result<(u64, u64), ServiceError> {
        let started_before = cutoffs.keeps_slots_started_from();
        let slots = self
            .store
            .booking_index()
            .slots_started_before(started_before);
        let Some(mut rostered) = self.store.bookings_of_slots(slots) else {
            return self.delete_scanned_bookings(cutoffs, pinned).await;
        };
        let (mut deleted, mut read) = (0, 0);
        loop {
            let batch = rostered
                .by_ref()
                .take(self.limits.retention_batch_records)
                .map(|booking| {
                    let booking = booking?;
                    let key = records::booking_key(booking.citizen.tag(), booking.booking_id);
                    Ok((key.to_vec(), booking))
                })
                .collect::<Result<KeyedRecords<Booking>, ServiceError>>()?;
            if batch.is_empty() {
                return Ok((deleted, read));
            }
            read += batch.len() as u64;
            deleted += self.delete_booking_batch(cutoffs, pinned, batch).await?;
        }
    }

    /// [`Engine::delete_bookings`] by a scan of every booking record.
    async fn delete_scanned_bookings(
        &self,
        cutoffs: &Cutoffs,
        pinned: &mut HashSet<SlotKey>,
    ) -> Result<(u64, u64), ServiceError> {
        let (mut cursor, mut deleted, mut read) = (vec![records::BOOKING_PREFIX], 0, 0);
        while let Some(batch) = self.next_batch::<Booking>(records::BOOKING_PREFIX, &mut cursor)? {
            read += batch.len() as u64;
            deleted += self.delete_booking_batch(cutoffs, pinned, batch).await?;
        }
        Ok((deleted, read))
    }

    /// Deletes those of `batch`'s bookings whose slot ended beyond the window, in one
    /// commit; returns how many.
    async fn delete_booking_batch(
        &self,
        cutoffs: &Cutoffs,
        pinned: &mut HashSet<SlotKey>,
        batch: KeyedRecords<Booking>,
    ) -> Result<u64, ServiceError> {
        let mut doomed = Vec::new();
        for (key, booking) in batch {
            if cutoffs.keeps_booking(&booking, self.slot_end(&booking.slot)) {
                pinned.insert(booking.slot); // its slot too, if only for its requests
                continue;
            }
            // A confirmed booking's entry is claimed like a cancel's, so no cancel
            // can write the record back; one being cancelled waits for next pass.
            let (citizen, service) = (booking.citizen, &booking.slot.service_id);
            if booking.is_confirmed() && !self.citizens.claim(citizen, service, booking.booking_id)
            {
                pinned.insert(booking.slot);
                continue;
            }
            doomed.push((key, booking));
        }
        let keys = doomed.iter().map(|(key, _)| key.clone()).collect();
        let written = self.delete_keys(keys).await;
        for (_, booking) in &doomed {
            self.forget_booking(booking, written.is_ok());
        }
        written?;
        Ok(doomed.len() as u64)
    }

    /// After the write that deleted `booking` (`deleted`), or failed to: a confirmed
    /// one's citizen entry and place are freed (or its claim given back), so memory
    /// keeps matching the disk; its requests are forgotten.
    fn forget_booking(&self, booking: &Booking, deleted: bool) {
        let (citizen, id) = (booking.citizen, booking.booking_id);
        if booking.is_confirmed() {
            match deleted {
                true => {
                    // A place of a slot long ended: nothing for the campaigns' matcher.
                    self.citizens.release(citizen, &booking.slot.service_id, id);
                    self.return_place_to_counter(&booking.slot, &booking.channel);
                }
                false => self.citizens.unclaim(citizen, id),
            }
        } else if booking.holds_place() && deleted {
            // Attended or no-show: its place, no entry.
            self.return_place_to_counter(&booking.slot, &booking.channel);
        }
        if deleted {
            for (request, _) in retention::booking_requests(booking) {
                self.requests.forget(&request.key, id);
            }
            // Out of the index: its reference may be drawn again.
            self.store.booking_index().remove(booking);
        }
    }

    /// Deletes the records of slots ended beyond the window whose bookings and holds are
    /// all gone (not `pinned`, nothing left in their roster), then drops them from the
    /// catalog. Under the authority lock, so no capacity change or closure writes a slot
    /// back in between.
    async fn delete_slots(
        &self,
        cutoffs: &Cutoffs,
        pinned: &HashSet<SlotKey>,
    ) -> Result<u64, ServiceError> {
        let ended: Vec<SlotKey> = self
            .catalog()
            .slots()
            .filter(|slot| !cutoffs.keeps_slot(slot.end_unix_s()))
            .map(|slot| slot.key())
            // A booking left behind would make the store refuse to start.
            .filter(|key| !pinned.contains(key) && !self.store.booking_index().has_roster(key))
            .collect();
        let mut deleted = 0;
        for chunk in ended.chunks(self.limits.retention_batch_records) {
            let _authority = self.authority_writes.lock().await;
            // Still ended beyond the window (a publication may have moved its end).
            let still_ended: Vec<&SlotKey> = chunk
                .iter()
                .filter(|key| {
                    self.slot_end(key)
                        .is_some_and(|end| !cutoffs.keeps_slot(end))
                })
                .collect();
            let keys = still_ended
                .iter()
                .map(|key| records::slot_key(key))
                .collect();
            deleted += self.delete_keys(keys).await?;
            let mut catalog = self.catalog_mut();
            for key in still_ended {
                catalog.remove_slot(key);
            }
        }
        Ok(deleted)
    }

    async fn delete_audit_entries(&self, cutoffs: &Cutoffs) -> Result<u64, ServiceError> {
        let ended_before_ms = cutoffs.slots_ended_before_unix_s.saturating_mul(1_000);
        let bound = records::audit_key_from(ended_before_ms);
        let mut deleted = 0;
        loop {
            let keys = self.store.keys_before(
                records::AUDIT_PREFIX,
                &bound,
                self.limits.retention_batch_records,
            )?;
            if keys.is_empty() {
                return Ok(deleted);
            }
            deleted += self.delete_keys(keys).await?;
        }
    }

    async fn delete_authority_requests(&self, cutoffs: &Cutoffs) -> Result<u64, ServiceError> {
        let prefix = records::AUTHORITY_REQUEST_PREFIX;
        let (mut cursor, mut deleted) = (vec![prefix], 0);
        loop {
            // Read and delete under the authority lock: no retry reuses a key between.
            let _authority = self.authority_writes.lock().await;
            let Some(batch) = self.next_batch::<AuthorityRequest>(prefix, &mut cursor)? else {
                return Ok(deleted);
            };
            let mut writes = Vec::new();
            for (key, request) in batch {
                let at_unix_ms = self.answered_at(&request);
                if !cutoffs.keeps_request(at_unix_ms) {
                    writes.push(Write::Delete(key));
                    deleted += 1;
                } else if request.at_unix_ms == 0 {
                    // Kept with the time it counts from, so a later start does not
                    // move it on again (it would never go on a node restarted often).
                    let dated = AuthorityRequest {
                        at_unix_ms,
                        ..request
                    };
                    writes.push(Write::AuthorityRequest(dated));
                }
            }
            if !writes.is_empty() {
                self.store.commit(&writes).await?;
            }
            tokio::task::yield_now().await; // as `delete_keys` does between batches
        }
    }

    /// Deletes the oldest event records while every event in them is older than the
    /// window, never the one holding the last event (it carries the sequence on across
    /// restarts): the log stays one contiguous run of sequences, so `oldest_event` tells
    /// a resuming reader what it missed. A run straddling the window's start stays whole.
    async fn delete_events(&self, cutoffs: &Cutoffs) -> Result<u64, ServiceError> {
        let batch = self.limits.retention_batch_records;
        let old = |event: &SequencedEvent| !cutoffs.keeps_event(event.event.at_unix_ms);
        let mut deleted = 0;
        loop {
            let last = *self.store.last_event().borrow();
            let (keys, events) = self.store.old_event_records(last, old, batch)?;
            if keys.is_empty() {
                return Ok(deleted);
            }
            self.delete_keys(keys).await?;
            deleted += events;
        }
    }

    /// When an authority request was answered; one stored before requests had a time
    /// (format 1) counts as answered when this engine opened, so it lives a full window.
    fn answered_at(&self, request: &AuthorityRequest) -> i64 {
        match request.at_unix_ms {
            0 => self.opened_at_unix_ms,
            at => at,
        }
    }

    /// Finished requests remembered right now (for tests and the soak).
    pub fn request_record_count(&self) -> usize {
        self.requests.remembered()
    }
}

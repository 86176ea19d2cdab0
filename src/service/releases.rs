//! Fair release: authorities announce openings (`CreateRelease`), citizens join a queued
//! release's waiting room (`JoinQueue`) and read their ticket (`GetQueueTicket`), and
//! the admission step (run by the server every `release_step_interval_ms`) draws, admits in rank
//! order within the free places, and declares a queued release sold out. The rules are
//! in `domain::release`; the releases in memory are `service::state::releases`; this
//! file changes them and writes them.
//! The gate travels in the plan's slot view (`SlotView::gate`); a ticket's first use is
//! written with the booking or hold it admitted. Recovery redoes the draws from their
//! stored seeds and checks that admitted tickets are a prefix of the rank order.
//!
//! Must not import tonic.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::domain::catalog::{Admission, Catalog, DayTotals, Site, Slot};
use crate::domain::error::{DomainError, Missing};
use crate::domain::ids::{ChannelId, CitizenKey, RegionId, ReleaseId, RequestKey, SlotKey};
use crate::domain::release::{own_unused, Join, Release, ReleaseScope, TicketView};
use crate::domain::text::utc_text;
use crate::service::actor::Actor;
use crate::service::engine::Engine;
use crate::service::error::ServiceError;
use crate::service::execute::refused;
use crate::service::state::releases::ReleaseState;
pub use crate::service::state::releases::{ReleaseEntry, Releases};
use crate::store::records::Write;
use crate::store::StoreError;

/// A release as `GetRelease` shows it.
#[derive(Clone, Debug)]
pub struct ReleaseStatus {
    pub release: Release,
    pub phase: crate::domain::release::Phase,
    pub places_remaining: u64,
    pub tickets: u64,
    pub tickets_waiting: u64,
    pub tickets_admitted: u64,
    pub tickets_admitted_unused: u64,
}

pub struct JoinCommand {
    pub release_id: ReleaseId,
    pub citizen_id: String,
    pub request: RequestKey,
}

/// The places of a release's slots that have not started.
#[derive(Clone, Copy, Debug, Default)]
struct Places {
    free: u64,
    /// Admissions whose write is in flight (a failed one gives its place back).
    pending: u64,
}

/// The release's slots that have not started by `now`.
fn future_slots(catalog: &Catalog, release: &Release, now: i64) -> Vec<Arc<Slot>> {
    release_slots(catalog, release, (now.div_euclid(1_000) + 1, i64::MAX))
}

/// The release's slots starting in `[from_s, to_s)` (seconds).
fn release_slots(
    catalog: &Catalog,
    release: &Release,
    (from_s, to_s): (i64, i64),
) -> Vec<Arc<Slot>> {
    let (from, to) = (release.from_unix_s.max(from_s), release.to_unix_s.min(to_s));
    if from >= to {
        return Vec::new();
    }
    let sites = match &release.scope {
        ReleaseScope::Region(region) => catalog
            .sites_in(Some(region))
            .iter()
            .map(|site| site.site_id.clone())
            .collect(),
        ReleaseScope::Sites(sites) => sites.clone(),
    };
    let mut slots = Vec::new();
    for site in &sites {
        let found = catalog.slots_in_range(site, Some(&release.service_id), from, to);
        slots.extend(found.unwrap_or_default());
    }
    slots
}

impl Engine {
    /// The release's slots a ticket admits to now: not started, and not a campaign's
    /// slot outside its last-minute window (those are reached through offers only, so
    /// a queue counting them would admit citizens to places they cannot book).
    fn admitting_slots(&self, release: &Release, now: i64) -> Vec<Arc<Slot>> {
        let catalog = self.catalog();
        let mut slots = future_slots(&catalog, release, now);
        if !self.campaigns.is_empty() {
            // One campaign per service and region: looked up once per site.
            let mut campaigns = HashMap::new();
            slots.retain(|slot| {
                let key = slot.key();
                let campaign = campaigns.entry(key.site_id.clone()).or_insert_with(|| {
                    let site = catalog.site(&key.site_id)?;
                    self.campaigns.covering(&site.region_id, &key, now)
                });
                !campaign
                    .as_ref()
                    .is_some_and(|c| c.requires_offer(key.start_unix_s, now))
            });
        }
        slots
    }

    /// The places of `slots` of `entry`'s release: free counts only the common places
    /// (a queue admits no one to places reserved for a channel).
    fn places_of(&self, entry: &ReleaseEntry, slots: &[Arc<Slot>], now: i64) -> Places {
        let reserves = &entry.definition.reserves;
        let mut places = Places::default();
        for slot in slots {
            let counter = slot.counter.snapshot();
            let held_back = match reserves.is_empty() {
                true => 0,
                false => self.held_back_now(entry, slot, None, now),
            };
            places.free += u64::from(counter.remaining().saturating_sub(held_back));
            places.pending += u64::from(counter.pending);
        }
        places
    }

    /// The release_at of the slot's release, if it is in one (searches show it).
    pub fn release_at(&self, site: &Site, key: &SlotKey) -> Option<i64> {
        self.releases.release_at(&site.region_id, key)
    }

    /// Whether a campaign may offer a place of the slot now: in no release, or in one
    /// released by now, and never a queued release's place inside the campaign's
    /// `last_minute` window (its `places_remaining` counts those for the tickets it
    /// admits: an offer taking one left an admitted citizen nothing).
    pub fn offerable(&self, site: &Site, key: &SlotKey, last_minute: bool, now: i64) -> bool {
        match self.releases.covering(&site.region_id, key) {
            None => true,
            Some(entry) => {
                let release = &entry.definition;
                now >= release.release_at_unix_ms && !(last_minute && release.queue.is_some())
            }
        }
    }

    /// What a caller of `channel` is shown of a slot beyond the slot itself: its
    /// release's `release_at` and the free places it may take (`None`: all of them).
    pub fn slot_shown(
        &self,
        site: &Site,
        slot: &Slot,
        channel: Option<&ChannelId>,
    ) -> (Option<i64>, u32) {
        if self.releases.is_empty() {
            // No release: no release_at, and no reserve holds a place back.
            return (None, slot.counter.snapshot().remaining());
        }
        (
            self.release_at(site, &slot.key()),
            self.remaining_for(site, slot, channel),
        )
    }

    /// The slot's free places `channel` may take now (`None`: every free place, as an
    /// authority counts them): other channels' unused reserves are not its.
    pub fn remaining_for(&self, site: &Site, slot: &Slot, channel: Option<&ChannelId>) -> u32 {
        let remaining = slot.counter.snapshot().remaining();
        match channel {
            Some(channel) => {
                remaining.saturating_sub(self.held_back_from(site, slot, Some(channel)))
            }
            None => remaining,
        }
    }

    /// The free places of `slot` held back from `channel` (`None`: from everyone
    /// else, i.e. every reserve's unused places) by its release's reserves now.
    fn held_back_from(&self, site: &Site, slot: &Slot, channel: Option<&ChannelId>) -> u32 {
        if self.releases.is_empty() {
            return 0;
        }
        let Some(entry) = self.reserving(&site.region_id, &slot.key()) else {
            return 0;
        };
        self.held_back_now(&entry, slot, channel, self.now_unix_ms())
    }

    /// The free places of `slot` that `entry`'s reserves hold back from `channel` at
    /// `now` (`None`: every reserve's unused places), from the channels' current use.
    fn held_back_now(
        &self,
        entry: &ReleaseEntry,
        slot: &Slot,
        channel: Option<&ChannelId>,
        now: i64,
    ) -> u32 {
        let key = slot.key();
        let used = self
            .releases
            .channel_use()
            .used(&key, &entry.definition.reserves);
        let capacity = slot.counter.snapshot().capacity;
        entry.held_back((&key, capacity), &used, channel, now)
    }

    /// The release with channel reserves covering slot `key` of a site in `region`
    /// (none at once while there is no release).
    fn reserving(&self, region: &RegionId, key: &SlotKey) -> Option<Arc<ReleaseEntry>> {
        if self.releases.is_empty() {
            return None;
        }
        self.releases
            .covering(region, key)
            .filter(|entry| entry.has_reserves())
    }

    /// Takes one place of slot `key` for a booking or hold made through `channel`: one
    /// CAS, under its release's reserve rule if it has reserves (the rule's share is
    /// computed from the capacity the CAS sees), and counted as `channel`'s. With
    /// `own_reserve_only` (a queued release's gate passed without a ticket) only one of
    /// the channel's own reserve's unused places, else `NotAdmitted`.
    pub(super) fn take_place(
        &self,
        key: &SlotKey,
        channel: &ChannelId,
        own_reserve_only: bool,
    ) -> Result<Admission, DomainError> {
        let (region, slot) = self.slot_in_region(key)?;
        let Some(entry) = self.reserving(&region, key) else {
            if own_reserve_only {
                return Err(DomainError::NotAdmitted);
            }
            let admission = slot.try_take().map_err(|refusal| refused(refusal, key))?;
            self.releases.channel_took(key, channel);
            return Ok(admission);
        };
        // One take or return at a time in the release's slots: the use read here stays
        // true until the CAS and the count after it.
        let _one_take = entry.one_take();
        let used = self
            .releases
            .channel_use()
            .used(key, &entry.definition.reserves);
        let now = self.now_unix_ms();
        let release = &entry.definition;
        let own_left = |capacity: u32| {
            release
                .reserved_places(capacity, key.start_unix_s, now)
                .map_or(0, |reserved| own_unused(release, &reserved, &used, channel))
        };
        let reserve_gone = |capacity| own_reserve_only && own_left(capacity) == 0;
        if reserve_gone(slot.counter.snapshot().capacity) {
            return Err(DomainError::NotAdmitted);
        }
        let admission = slot
            .try_take_leaving(|capacity| match reserve_gone(capacity) {
                // The capacity fell since the check: its reserve has nothing left.
                true => capacity,
                false => entry.held_back((key, capacity), &used, Some(channel), now),
            })
            .map_err(|refusal| refused(refusal, key))?;
        self.releases.channel_took(key, channel);
        Ok(admission)
    }

    /// Returns a place of a booking or hold of `channel` to slot `key`'s counter (the
    /// channel holds one fewer), under its release's take lock if it has reserves: a
    /// take must see the channel's use and the counter both before the return or both
    /// after (a use read before and a place freed after would let another channel into
    /// this one's reserve).
    pub(super) fn return_place_to_counter(&self, key: &SlotKey, channel: &ChannelId) {
        let Ok((region, slot)) = self.slot_in_region(key) else {
            self.releases.channel_returned(key, channel);
            return;
        };
        let entry = self.reserving(&region, key);
        let one_take = entry.as_ref().map(|entry| entry.one_take());
        self.releases.channel_returned(key, channel);
        if slot.counter.release().is_err() {
            tracing::error!(slot = %key, "found no taken place to return");
        }
        drop(one_take);
    }

    /// Every slot of `site` with free places held back for channel reserves now, and
    /// how many (site statistics).
    pub(super) fn reserved_by_slot(&self, site: &Site, catalog: &Catalog) -> HashMap<SlotKey, u32> {
        let mut reserved = HashMap::new();
        if self.releases.is_empty() {
            return reserved;
        }
        let now = self.now_unix_ms();
        for entry in self.releases.all().into_iter().filter(|e| e.has_reserves()) {
            let release = &entry.definition;
            let slots = catalog
                .slots_in_range(
                    &site.site_id,
                    Some(&release.service_id),
                    release.from_unix_s,
                    release.to_unix_s,
                )
                .unwrap_or_default();
            for slot in slots
                .iter()
                .filter(|s| release.covers(&site.region_id, &s.key()))
            {
                let held = self.held_back_now(&entry, slot, None, now);
                if held > 0 {
                    reserved.insert(slot.key(), held.min(slot.counter.snapshot().remaining()));
                }
            }
        }
        reserved
    }

    /// Free places held back now for channel reserves among the slots one open data row
    /// adds up (one service's local day at `site`; none at once without releases).
    pub(super) fn reserved_on_day(&self, catalog: &Catalog, site: &Site, day: &DayTotals) -> u64 {
        if self.releases.is_empty() {
            return 0;
        }
        let now = self.now_unix_ms();
        let (from, to) = (day.from_unix_s, day.to_unix_s);
        let slots = catalog
            .slots_in_range(&site.site_id, Some(&day.service_id), from, to)
            .unwrap_or_default();
        let held_back = |slot: &Arc<Slot>| {
            let entry = self.reserving(&site.region_id, &slot.key())?;
            let held = self.held_back_now(&entry, slot, None, now);
            Some(u64::from(held.min(slot.counter.snapshot().remaining())))
        };
        slots.iter().filter_map(held_back).sum()
    }

    /// Whether the release of slot `key` reserves places for `channel`.
    pub(super) fn reserves_for(&self, key: &SlotKey, channel: &ChannelId) -> bool {
        let Some(site) = self.site(&key.site_id) else {
            return false;
        };
        self.reserving(&site.region_id, key)
            .is_some_and(|entry| entry.definition.reserve_of(channel).is_some())
    }

    /// Whether both slots are in one release.
    pub(super) fn in_same_release(&self, a: &SlotKey, b: &SlotKey) -> bool {
        if self.releases.is_empty() {
            return false;
        }
        let release_of = |key: &SlotKey| {
            let region = self.site(&key.site_id)?.region_id.clone();
            self.releases.covering(&region, key)
        };
        match (release_of(a), release_of(b)) {
            (Some(a), Some(b)) => Arc::ptr_eq(&a, &b),
            _ => false,
        }
    }

    /// Announces a release. Creating it again with the same definition returns it; the
    /// same id with another definition is `RELEASE_EXISTS`.
    pub async fn create_release(
        &self,
        mut release: Release,
        actor: &Actor,
    ) -> Result<Release, ServiceError> {
        let _authority = self.authority_writes.lock().await;
        self.check_release_scope(&release.scope, actor)?;
        if let Some(existing) = self.releases.get(&release.release_id) {
            let existing = existing.current();
            return match existing.same_definition(&release) {
                true => Ok(existing),
                false => Err(DomainError::ReleaseExists(release.release_id).into()),
            };
        }
        let now = self.now_unix_ms();
        check_release_times(&release, now)?;
        self.check_no_overlap(&release)?;
        self.forget_orphaned(&release.release_id).await?;
        if self.releases.len() >= self.limits.releases_max {
            return Err(DomainError::ReleasesExhausted.into());
        }
        release.created_at_unix_ms = now;
        if let Some(queue) = release.queue.as_mut() {
            queue.seed = rand::random();
        }
        // As it will be stored once sold out (its largest form).
        let sold_out = Release {
            sold_out_at_unix_ms: Some(i64::MAX),
            ..release.clone()
        };
        let advice = "name fewer sites (or the region)";
        self.check_storable(&Write::Release(sold_out), "release.site_ids", advice)?;
        let audit = self.audit(&actor.name, "CreateRelease", release_detail(&release));
        self.store
            .commit(&[Write::Release(release.clone()), audit])
            .await?;
        self.releases
            .insert(Arc::new(ReleaseEntry::new(release.clone(), now)));
        // Its slots now show its release_at: watchers are sent them again.
        let shown = future_slots(&self.catalog(), &release, now);
        for slot in shown {
            slot.counter.mark_shown_changed();
        }
        Ok(release)
    }

    /// No slot may be in two releases.
    fn check_no_overlap(&self, release: &Release) -> Result<(), DomainError> {
        let catalog = self.catalog();
        let region_of = |site: &_| catalog.site(site).map(|site| site.region_id.clone());
        match self
            .releases
            .all()
            .into_iter()
            .find(|other| other.definition.overlaps(release, region_of))
        {
            Some(other) => Err(DomainError::ReleaseOverlaps(
                other.definition.release_id.clone(),
            )),
            None => Ok(()),
        }
    }

    /// The sites exist and are the actor's; a region is the actor's.
    fn check_release_scope(&self, scope: &ReleaseScope, actor: &Actor) -> Result<(), ServiceError> {
        match scope {
            ReleaseScope::Region(region) => actor.check_region(region),
            ReleaseScope::Sites(sites) => sites
                .iter()
                .try_for_each(|site| actor.check_site(self.site(site).as_ref()).map(|_| ())),
        }
    }

    /// A release and its queue's counts, for an authority of its regions.
    pub fn release_status(
        &self,
        release_id: &ReleaseId,
        actor: &Actor,
    ) -> Result<ReleaseStatus, ServiceError> {
        let entry = self
            .releases
            .get(release_id)
            .ok_or(DomainError::NotFound(Missing::Release))?;
        self.check_release_scope(&entry.definition.scope, actor)?;
        let now = self.now_unix_ms();
        let counts = {
            let mut state = entry.lock();
            state.queue.expire(now - self.admission_grace_ms());
            let queue = &state.queue;
            (
                queue.len() as u64,
                queue.waiting() as u64,
                queue.admitted_count() as u64,
                queue.unused() as u64,
            )
        };
        let release = entry.current();
        let slots = self.admitting_slots(&release, now);
        let places = self.places_of(&entry, &slots, now);
        Ok(ReleaseStatus {
            phase: release.phase(now),
            release,
            places_remaining: places.free,
            tickets: counts.0,
            tickets_waiting: counts.1,
            tickets_admitted: counts.2,
            tickets_admitted_unused: counts.3,
        })
    }

    /// How long after `admitted_until` an admission still counts as unused: a booking
    /// that passed the gate just before it takes its place within a request's time.
    fn admission_grace_ms(&self) -> i64 {
        self.limits.request_timeout_ms as i64
    }

    /// The queued release `id`, open to joins now.
    fn joinable(&self, id: &ReleaseId) -> Result<Arc<ReleaseEntry>, ServiceError> {
        let entry = self
            .releases
            .get(id)
            .ok_or(DomainError::NotFound(Missing::Release))?;
        let rules = entry
            .definition
            .queue
            .as_ref()
            .ok_or(DomainError::ReleaseNotQueued)?;
        let now = self.now_unix_ms();
        if now < rules.opens_at_unix_ms {
            return Err(DomainError::QueueNotOpen {
                retry_after_ms: rules.opens_at_unix_ms - now,
            }
            .into());
        }
        if entry.definition.has_ended(now) {
            return Err(DomainError::ReleaseEnded.into());
        }
        Ok(entry)
    }

    /// One more ticket in the live queues, if `queue_tickets_max` allows it; `state`'s
    /// lock is held (see `Releases::tickets`).
    fn count_ticket(&self, state: &ReleaseState) -> Result<(), ServiceError> {
        if state.ended {
            return Ok(());
        }
        let counted = self.releases.tickets.fetch_add(1, Ordering::AcqRel);
        if counted >= self.limits.queue_tickets_max {
            self.releases.tickets.fetch_sub(1, Ordering::AcqRel);
            return Err(DomainError::QueueFull.into());
        }
        Ok(())
    }

    /// `count` tickets of the release whose lock `state` is leave the live count.
    fn uncount_tickets(&self, state: &ReleaseState, count: usize) {
        if state.ended {
            return;
        }
        let tickets = &self.releases.tickets;
        let less = |n: usize| n.checked_sub(count);
        if tickets
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, less)
            .is_err()
        {
            // A bug: never wrap to refusing every join; the live queues bound it again.
            tracing::error!(count, "ticket count below zero; set to zero");
            debug_assert!(false, "ticket count below zero");
            tickets.store(0, Ordering::Release);
        }
    }

    /// Releases whose `to` passed leave the live ticket count, once: a rush's tickets
    /// must not refuse the next release's joins until retention deletes them.
    fn end_ended(&self, entries: &[Arc<ReleaseEntry>], now: i64) {
        for entry in entries {
            if !entry.definition.has_ended(now) {
                continue;
            }
            let mut state = entry.lock();
            let tickets = state.queue.len();
            self.uncount_tickets(&state, tickets);
            state.ended = true;
        }
    }

    /// The citizen joins a queued release; joining again returns its ticket.
    pub async fn join_queue(
        &self,
        command: JoinCommand,
    ) -> Result<(ReleaseId, TicketView), ServiceError> {
        let citizen = self.hasher.hash(&command.citizen_id);
        let entry = self.joinable(&command.release_id)?;
        self.count_attempt(&citizen)?;
        let now = self.now_unix_ms();
        let release = entry.current();
        let id = release.release_id.clone();
        let ticket = {
            let mut state = entry.lock();
            let ticket = match state.queue.join(&release, citizen, now) {
                Join::New(ticket) => ticket,
                // A citizen with a ticket gets it back, however full the queues are.
                Join::Existing(view) => return Ok((id, view)),
                Join::InFlight => {
                    return Err(ServiceError::Busy(
                        "this citizen's ticket is being written; retry",
                    ))
                }
            };
            if let Err(full) = self.count_ticket(&state) {
                state.queue.abandon(citizen);
                return Err(full);
            }
            ticket
        };
        // Joining is idempotent by (release, citizen): the request id needs no record.
        let _ = command.request;
        if let Err(error) = self.store.commit(&[Write::Ticket(ticket)]).await {
            // Never queued, or the store failed (a restart rebuilds from the disk).
            let mut state = entry.lock();
            state.queue.abandon(citizen);
            self.uncount_tickets(&state, 1);
            return Err(error.into());
        }
        let mut state = entry.lock();
        state.queue.joined(citizen);
        let release = Release {
            sold_out_at_unix_ms: state.sold_out_at_unix_ms,
            ..release
        };
        let view = state.queue.view(&release, &citizen, now);
        Ok((id, view.ok_or(DomainError::NotFound(Missing::Ticket))?))
    }

    /// The citizen's ticket of a release. Counted against the citizen's read quota.
    pub fn queue_ticket(
        &self,
        release_id: &ReleaseId,
        citizen_id: &str,
    ) -> Result<TicketView, ServiceError> {
        let citizen = self.hasher.hash(citizen_id);
        let entry = self
            .releases
            .get(release_id)
            .ok_or(DomainError::NotFound(Missing::Release))?;
        self.count_read(&citizen)?;
        let release = entry.current();
        let now = self.now_unix_ms();
        let view = entry.lock().queue.view(&release, &citizen, now);
        Ok(view.ok_or(DomainError::NotFound(Missing::Ticket))?)
    }

    /// One admission step at `now` for every queued release between its opening and
    /// its end: the draw (once), admissions in rank order within the free places and
    /// the release's pace, and sold out when no place is left. A release whose step
    /// fails is logged and the others go on. Returns how many tickets were admitted.
    pub async fn advance_releases(&self, now: i64) -> Result<usize, ServiceError> {
        let _one_step = self.releases.step.lock().await;
        let entries = self.releases.all();
        self.show_released_reserves(&entries, now);
        self.end_ended(&entries, now);
        let mut admitted = 0;
        for entry in entries {
            let release = &entry.definition;
            let running = (release.release_at_unix_ms..release.to_unix_ms()).contains(&now);
            if release.queue.is_none() || !running {
                continue;
            }
            match self.advance_release(&entry, now).await {
                Ok(count) => admitted += count,
                Err(ServiceError::Store(StoreError::Failed)) => {
                    return Err(StoreError::Failed.into())
                }
                Err(error) => {
                    tracing::warn!(release = %release.release_id, %error, "admission step failed")
                }
            }
        }
        Ok(admitted)
    }

    /// Sends watchers again the slots whose reserves joined the common places since the
    /// last step: what the other channels may take grew, though no counter moved.
    fn show_released_reserves(&self, entries: &[Arc<ReleaseEntry>], now: i64) {
        for entry in entries.iter().filter(|e| e.has_reserves()) {
            let last = entry.reserves_shown_until_ms.swap(now, Ordering::SeqCst);
            let before_start_ms =
                i64::from(entry.definition.reserve_released_hours_before_start) * 3_600_000;
            // A slot's reserves go at start - before_start: here those gone in (last, now].
            let starts = |at: i64| (at + before_start_ms).div_euclid(1_000) + 1;
            let (from, to) = (starts(last), starts(now));
            if from >= to || from >= entry.definition.to_unix_s {
                continue; // none released since the last step (most steps), or ended
            }
            let catalog = self.catalog();
            for slot in release_slots(&catalog, &entry.definition, (from, to)) {
                slot.counter.mark_shown_changed();
            }
        }
    }

    async fn advance_release(&self, entry: &ReleaseEntry, now: i64) -> Result<usize, ServiceError> {
        let release = entry.current();
        let Some(rules) = &release.queue else {
            return Ok(0);
        };
        // Unused admissions first, then free places: a booking takes its place before
        // its ticket counts as used, so this order never overcounts the room left.
        let (unused, waiting) = {
            let mut state = entry.lock();
            if !state.queue.drawn() && !state.queue.draw(&rules.seed) {
                return Ok(0);
            }
            state.queue.expire(now - self.admission_grace_ms());
            (state.queue.unused(), state.queue.waiting())
        };
        let slots = self.admitting_slots(&release, now);
        let places = self.places_of(entry, &slots, now);
        if places.free == 0 {
            if release.sold_out_at_unix_ms.is_none() && self.all_gone(entry, &release, now) {
                self.set_sold_out(entry, release, Some(now)).await?;
            }
            return Ok(0);
        }
        if release.sold_out_at_unix_ms.is_some() {
            // Places came back (a cancel, a slot reopened): no longer sold out, whether
            // the next tickets in rank order or an admitted one's holder take them.
            self.set_sold_out(entry, release.clone(), None).await?;
        }
        if waiting == 0 || places.free <= unused as u64 {
            return Ok(0);
        }
        let step_max = self.limits.queue_admissions_per_step_max;
        let tickets = {
            let state = entry.lock();
            let count = state
                .queue
                .admissible(&release, places.free, unused, now, step_max);
            state.queue.next_admissions(&release, count, now)
        };
        if tickets.is_empty() {
            return Ok(0);
        }
        let writes: Vec<Write> = tickets.iter().cloned().map(Write::Ticket).collect();
        match self.store.commit(&writes).await {
            Ok(()) => {}
            // The write queue is full: the next step tries again.
            Err(StoreError::Overloaded) => return Ok(0),
            Err(error) => return Err(error.into()),
        }
        entry.lock().queue.admit(&tickets);
        Ok(tickets.len())
    }

    /// Whether no place of the release's slots is left, nor coming back: a campaign's
    /// slot free outside its last-minute window admits no ticket yet, but will.
    fn all_gone(&self, entry: &ReleaseEntry, release: &Release, now: i64) -> bool {
        let slots = future_slots(&self.catalog(), release, now);
        let places = self.places_of(entry, &slots, now);
        places.free == 0 && self.nothing_coming_back(&slots, places)
    }

    /// No place of these slots can come back by itself: none is held (a hold may
    /// expire) and no admission is being written (a failed write gives its place back).
    fn nothing_coming_back(&self, slots: &[Arc<Slot>], places: Places) -> bool {
        if places.pending > 0 {
            return false;
        }
        let keys: Vec<SlotKey> = slots.iter().map(|s| s.key()).collect();
        self.live_holds().count_of(&keys) == 0
    }

    /// The release is sold out since `at` (`None`: places came back), durably.
    async fn set_sold_out(
        &self,
        entry: &ReleaseEntry,
        release: Release,
        at: Option<i64>,
    ) -> Result<(), ServiceError> {
        let changed = Release {
            sold_out_at_unix_ms: at,
            ..release
        };
        match self.store.commit(&[Write::Release(changed)]).await {
            Ok(()) => {}
            Err(StoreError::Overloaded) => return Ok(()),
            Err(error) => return Err(error.into()),
        }
        entry.lock().sold_out_at_unix_ms = at;
        let release = &entry.definition.release_id;
        match at {
            Some(_) => tracing::info!(%release, "release sold out"),
            None => tracing::info!(%release, "places of a sold-out release came back"),
        }
        Ok(())
    }

    /// Retention: releases whose every slot ended before the window (their `to` more
    /// than a day before the cutoff) leave the store and memory, their tickets first, in
    /// batches. The release stands until its tickets are gone, so its id cannot be taken
    /// again meanwhile (nor, under the authority lock, while its record goes). Returns
    /// (releases, tickets) deleted.
    pub(super) async fn delete_releases(
        &self,
        cutoffs: &crate::domain::retention::Cutoffs,
    ) -> Result<(u64, u64), ServiceError> {
        let ended_before_s = cutoffs.slots_ended_before_unix_s;
        let mut tickets = self.delete_orphaned_tickets().await?;
        let mut releases = 0;
        for entry in self.releases.all() {
            let to = entry.definition.to_unix_s;
            if ended_before_s == i64::MIN || to.saturating_add(86_400) >= ended_before_s {
                continue;
            }
            let id = entry.definition.release_id.clone();
            tickets += self.delete_tickets_of(&id).await?;
            let _authority = self.authority_writes.lock().await;
            let key = crate::store::records::release_key(&id);
            self.store.commit(&[Write::Delete(key)]).await?;
            if let Some(entry) = self.releases.remove(&id) {
                let mut state = entry.lock();
                self.uncount_tickets(&state, state.queue.len());
                state.ended = true;
            }
            releases += 1;
        }
        Ok((releases, tickets))
    }

    /// Tickets whose release is gone (a store whose retention, before this version,
    /// deleted a release first and stopped before its tickets): deleted under the
    /// authority lock, so a release created meanwhile under the same id keeps its own.
    async fn delete_orphaned_tickets(&self) -> Result<u64, ServiceError> {
        let _authority = self.authority_writes.lock().await;
        let mut deleted = 0;
        loop {
            let next = self.orphaned().first().cloned();
            let Some(id) = next else {
                return Ok(deleted);
            };
            deleted += self.forget_orphaned(&id).await?;
        }
    }

    /// Deletes the tickets left by an earlier release `id`, if any, then forgets it as
    /// orphaned (only once they are all gone: a failed commit leaves it for next time).
    /// The caller holds the authority lock.
    async fn forget_orphaned(&self, id: &ReleaseId) -> Result<u64, ServiceError> {
        if !self.orphaned().contains(id) {
            return Ok(0);
        }
        let deleted = self.delete_tickets_of(id).await?;
        self.orphaned().retain(|orphaned| orphaned != id);
        Ok(deleted)
    }

    fn orphaned(&self) -> std::sync::MutexGuard<'_, Vec<ReleaseId>> {
        self.releases
            .orphaned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Deletes every ticket of release `id`, `retention_batch_records` per commit.
    async fn delete_tickets_of(&self, id: &ReleaseId) -> Result<u64, ServiceError> {
        use crate::store::records::{ticket_key, TICKET_PREFIX};
        let from = ticket_key(id, &CitizenKey([0; 16]));
        let mut deleted = 0;
        loop {
            let batch: Vec<(Vec<u8>, crate::domain::release::Ticket)> = self.store.records_from(
                TICKET_PREFIX,
                &from,
                self.limits.retention_batch_records,
            )?;
            let keys: Vec<Write> = batch
                .into_iter()
                .take_while(|(_, ticket)| ticket.release_id == *id)
                .map(|(key, _)| Write::Delete(key))
                .collect();
            if keys.is_empty() {
                return Ok(deleted);
            }
            deleted += keys.len() as u64;
            self.store.commit(&keys).await?;
            tokio::task::yield_now().await;
        }
    }

    /// Recovery: every release and its tickets, the draws redone from their seeds.
    pub(super) fn restore_releases(&self) -> Result<(), ServiceError> {
        let mut entries: BTreeMap<ReleaseId, ReleaseEntry> = BTreeMap::new();
        let now = self.now_unix_ms();
        for release in self.store.releases() {
            let release = release?;
            entries.insert(release.release_id.clone(), ReleaseEntry::new(release, now));
        }
        let mut orphaned = std::collections::BTreeSet::new();
        for ticket in self.store.tickets() {
            let ticket = ticket?;
            // Left by an older version's retention (release first): deleted next pass,
            // or before a release of the same id is created.
            let Some(entry) = entries.get(&ticket.release_id) else {
                orphaned.insert(ticket.release_id);
                continue;
            };
            let mut state = entry.lock();
            state.queue.restore(&ticket);
            if !state.ended {
                self.releases.tickets.fetch_add(1, Ordering::AcqRel);
            }
        }
        self.orphaned().extend(orphaned);
        let now = self.now_unix_ms();
        for (id, entry) in entries {
            {
                let mut state = entry.lock();
                state.queue.rebuild(&entry.definition, now);
                state.queue.check().map_err(|why| {
                    ServiceError::Recovery(format!("the queue of release {id}: {why}"))
                })?;
            }
            self.releases.insert(Arc::new(entry));
        }
        Ok(())
    }
}

/// `release_at` in the future, after the queue opens and before the slots end.
fn check_release_times(release: &Release, now: i64) -> Result<(), DomainError> {
    if release.release_at_unix_ms <= now {
        return Err(DomainError::invalid(
            "release.release_at",
            "must be in the future",
        ));
    }
    if release.release_at_unix_ms >= release.to_unix_ms() {
        return Err(DomainError::invalid(
            "release.release_at",
            "must be before `to`: no slot of the release could be booked",
        ));
    }
    Ok(())
}

fn release_detail(release: &Release) -> String {
    let scope = match &release.scope {
        ReleaseScope::Region(region) => format!("region {region}"),
        ReleaseScope::Sites(sites) => format!("{} sites", sites.len()),
    };
    format!(
        "release {} of {} at {}: slots from {} to {}, release_at {}, {}",
        release.release_id,
        release.service_id,
        scope,
        utc_text(release.from_unix_s),
        utc_text(release.to_unix_s),
        utc_text(release.release_at_unix_ms.div_euclid(1_000)),
        match &release.queue {
            Some(q) => format!(
                "queue opens at {}, {} admissions/min, admission {} s",
                utc_text(q.opens_at_unix_ms.div_euclid(1_000)),
                q.admissions_per_minute,
                q.admission_ttl_seconds
            ),
            None => "no queue".to_string(),
        }
    )
}

//! The releases in memory: each one's definition, queue and take lock, and the
//! index by slot (`service::releases` has the commands and the admission step).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use crate::domain::ids::{ChannelId, CitizenKey, RegionId, ReleaseId, ServiceId, SlotKey};
use crate::domain::release::{held_back, ChannelUse, Gate, Queue, Release};

/// One release in memory: its definition (fixed once created) and what changes.
#[derive(Debug)]
pub struct ReleaseEntry {
    pub(in crate::service) definition: Release,
    pub(in crate::service) state: Mutex<ReleaseState>,
    /// With reserves: places of its slots are taken (and returned) one at a time under
    /// this lock, so the rule (leave the other channels' unused reserves free), read
    /// from the engine's `ChannelUse`, and the counter's CAS are one step.
    pub(in crate::service) takes: Mutex<()>,
    /// With reserves: when the release step last sent watchers the slots whose reserves
    /// had joined the common places (from its creation, or the recovery: no watch
    /// outlives a restart).
    pub(in crate::service) reserves_shown_until_ms: AtomicI64,
}

#[derive(Debug, Default)]
pub(in crate::service) struct ReleaseState {
    pub(in crate::service) sold_out_at_unix_ms: Option<i64>,
    pub(in crate::service) queue: Queue,
    /// Its `to` passed: its tickets no longer count against `queue_tickets_max` (they
    /// stay, for the citizens to read, until retention deletes them).
    pub(in crate::service) ended: bool,
}

impl ReleaseEntry {
    /// `now_unix_ms`: its creation, or the recovery that reads it back.
    pub(in crate::service) fn new(release: Release, now_unix_ms: i64) -> Self {
        let state = ReleaseState {
            sold_out_at_unix_ms: release.sold_out_at_unix_ms,
            queue: Queue::default(),
            // Created before its `to` (checked); read back at recovery maybe after it.
            ended: release.has_ended(now_unix_ms),
        };
        Self {
            reserves_shown_until_ms: AtomicI64::new(now_unix_ms),
            definition: release,
            state: Mutex::new(state),
            takes: Mutex::new(()),
        }
    }

    pub(in crate::service) fn has_reserves(&self) -> bool {
        !self.definition.reserves.is_empty()
    }

    /// The lock one take or return of a place in its slots holds (see `takes`).
    pub(in crate::service) fn one_take(&self) -> MutexGuard<'_, ()> {
        // Guards no data: a panic elsewhere leaves nothing half-done.
        self.takes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The free places of `slot` out of `channel`'s reach now, given each reserve's
    /// `used` places and the slot's `capacity` (`None` channel: every reserve's unused
    /// places).
    pub(in crate::service) fn held_back(
        &self,
        (slot, capacity): (&SlotKey, u32),
        used: &[u32],
        channel: Option<&ChannelId>,
        now: i64,
    ) -> u32 {
        let release = &self.definition;
        let Some(reserved) = release.reserved_places(capacity, slot.start_unix_s, now) else {
            return 0;
        };
        match channel {
            Some(channel) => held_back(release, &reserved, used, channel),
            None => reserved
                .iter()
                .zip(used)
                .map(|(reserved, used)| reserved.saturating_sub(*used))
                .sum(),
        }
    }

    pub(in crate::service) fn lock(&self) -> MutexGuard<'_, ReleaseState> {
        // Each critical section leaves the queue consistent: a poisoned lock is sound.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The release as it stands (sold out or not).
    pub fn current(&self) -> Release {
        Release {
            sold_out_at_unix_ms: self.lock().sold_out_at_unix_ms,
            ..self.definition.clone()
        }
    }

    /// What a booking or hold by `citizen` through `channel` on its slots must pass.
    pub(in crate::service) fn gate(
        &self,
        (citizen, channel): (&CitizenKey, &ChannelId),
        now_unix_ms: i64,
    ) -> Gate {
        let release = &self.definition;
        let release_at_unix_ms = release.release_at_unix_ms;
        if now_unix_ms < release_at_unix_ms {
            return Gate::NotYet { release_at_unix_ms };
        }
        if release.queue.is_none() {
            return Gate::Open;
        }
        Gate::Queue {
            ticket: self.lock().queue.ticket(&release.release_id, citizen),
            release_at_unix_ms,
            channel_reserve: release.reserve_of(channel).is_some(),
        }
    }
}

/// Every release, by id and by service (a booking looks up its slot's service only).
#[derive(Debug, Default)]
pub struct Releases {
    pub(in crate::service) inner: RwLock<ReleaseIndex>,
    /// How many releases `inner` has, changed under its write lock: `is_empty` is read
    /// for every slot a search shows, and a load takes no lock.
    count: std::sync::atomic::AtomicUsize,
    /// One admission step at a time (the server's timer, a test's call): a step reads
    /// the queue, writes, then admits what it read.
    pub(in crate::service) step: tokio::sync::Mutex<()>,
    /// Tickets of the queues of releases not ended (bounded by `queue_tickets_max`),
    /// changed under the release's lock: a ticket counts while it is in the queue of a
    /// release whose `ended` is unset.
    pub(in crate::service) tickets: std::sync::atomic::AtomicUsize,
    /// The places each channel but the default holds, per slot (channel reserves).
    pub(in crate::service) channel_use: Mutex<ChannelUse>,
    /// Releases whose tickets retention still has to delete: deleted ones, and those
    /// recovery found tickets of without their release (a crash mid-retention).
    pub(in crate::service) orphaned: Mutex<Vec<ReleaseId>>,
}

#[derive(Debug, Default)]
pub(in crate::service) struct ReleaseIndex {
    pub(in crate::service) by_id: BTreeMap<ReleaseId, Arc<ReleaseEntry>>,
    pub(in crate::service) by_service: HashMap<ServiceId, Vec<Arc<ReleaseEntry>>>,
}

impl Releases {
    pub(in crate::service) fn read(&self) -> std::sync::RwLockReadGuard<'_, ReleaseIndex> {
        // Writes are single inserts: a poisoned lock still guards sound data.
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn insert(&self, entry: Arc<ReleaseEntry>) {
        let mut index = self.inner.write().unwrap_or_else(|p| p.into_inner());
        let service = entry.definition.service_id.clone();
        index
            .by_id
            .insert(entry.definition.release_id.clone(), Arc::clone(&entry));
        index.by_service.entry(service).or_default().push(entry);
        self.count.store(index.by_id.len(), Ordering::Release);
    }

    /// Forgets a release (retention); returns it.
    pub(in crate::service) fn remove(&self, id: &ReleaseId) -> Option<Arc<ReleaseEntry>> {
        let mut index = self.inner.write().unwrap_or_else(|p| p.into_inner());
        let entry = index.by_id.remove(id)?;
        if let Some(entries) = index.by_service.get_mut(&entry.definition.service_id) {
            entries.retain(|other| !Arc::ptr_eq(other, &entry));
        }
        self.count.store(index.by_id.len(), Ordering::Release);
        Some(entry)
    }

    pub fn get(&self, id: &ReleaseId) -> Option<Arc<ReleaseEntry>> {
        self.read().by_id.get(id).cloned()
    }

    pub fn len(&self) -> usize {
        self.read().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.count.load(Ordering::Acquire) == 0
    }

    pub fn all(&self) -> Vec<Arc<ReleaseEntry>> {
        self.read().by_id.values().cloned().collect()
    }

    /// The release covering the slot `key` of a site in `region` (at most one: they
    /// never overlap).
    pub fn covering(&self, region: &RegionId, key: &SlotKey) -> Option<Arc<ReleaseEntry>> {
        let index = self.read();
        let candidates = index.by_service.get(&key.service_id)?;
        candidates
            .iter()
            .find(|entry| entry.definition.covers(region, key))
            .cloned()
    }

    /// What a booking or hold by `asking` (citizen, channel) on the slot must pass now.
    pub fn gate(
        &self,
        (region, key): (&RegionId, &SlotKey),
        asking: (&CitizenKey, &ChannelId),
        now: i64,
    ) -> Gate {
        match self.covering(region, key) {
            Some(entry) => entry.gate(asking, now),
            None => Gate::Open,
        }
    }

    /// The release_at of the slot's release, if it has one (for searches).
    pub fn release_at(&self, region: &RegionId, key: &SlotKey) -> Option<i64> {
        self.covering(region, key)
            .map(|entry| entry.definition.release_at_unix_ms)
    }

    pub(in crate::service) fn channel_use(&self) -> MutexGuard<'_, ChannelUse> {
        // Each critical section is one count: a poisoned lock guards sound data.
        self.channel_use.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place of slot `key` was taken for `channel` (the default channel is not
    /// counted, and takes no lock: every web booking passes here).
    pub(in crate::service) fn channel_took(&self, key: &SlotKey, channel: &ChannelId) {
        if !channel.is_default() {
            self.channel_use().add(key, channel);
        }
    }

    /// A place of slot `key` taken for `channel` is returning.
    pub(in crate::service) fn channel_returned(&self, key: &SlotKey, channel: &ChannelId) {
        if !channel.is_default() {
            self.channel_use().remove(key, channel);
        }
    }

    /// Claims the citizen's ticket of `release_id` for one write (see `Queue::claim`).
    pub fn claim_ticket(&self, release_id: &ReleaseId, citizen: &CitizenKey) -> bool {
        self.get(release_id)
            .is_some_and(|entry| entry.lock().queue.claim(citizen))
    }

    /// Gives back a claim whose write never reached the store.
    pub fn unclaim_ticket(&self, release_id: &ReleaseId, citizen: &CitizenKey) {
        if let Some(entry) = self.get(release_id) {
            entry.lock().queue.unclaim(citizen);
        }
    }

    /// The citizen's ticket of `release_id` was used, durably.
    pub fn mark_used(&self, release_id: &ReleaseId, citizen: &CitizenKey) {
        if let Some(entry) = self.get(release_id) {
            entry.lock().queue.mark_used(citizen);
        }
    }
}

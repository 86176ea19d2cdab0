//! The campaigns and their registrations in memory, and which offers and bookings are
//! theirs (`service::campaigns` has the commands and the matcher).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use crate::domain::campaign::{
    self, Campaign, OfferEnd, Registration, RegistrationState, Registrations,
};
use crate::domain::error::{DomainError, Missing};
use crate::domain::hold::HoldId;
use crate::domain::ids::{BookingId, CampaignId, CitizenKey, RegionId, ServiceId, SlotKey};
use crate::domain::retention::Cutoffs;

/// The matcher looks at a campaign at least this often, even when nothing changed that
/// it was told of (a release's slots opening at release_at).
pub(in crate::service) const MATCH_AT_LEAST_EVERY_MS: i64 = 10_000;

/// One campaign in memory.
#[derive(Debug)]
pub struct CampaignEntry {
    /// Fixed once created.
    pub(in crate::service) campaign_id: CampaignId,
    pub(in crate::service) service_id: ServiceId,
    pub(in crate::service) region_id: RegionId,
    /// Read by every booking of the service (its last-minute window).
    pub(in crate::service) last_minute_hours: AtomicU32,
    /// When it ends (unix ms; `i64::MAX`: not set), read by every booking too.
    pub(in crate::service) ends_at_unix_ms: AtomicI64,
    pub(in crate::service) state: Mutex<CampaignState>,
    /// Something changed that the matcher should look at (a registration waits).
    pub(in crate::service) dirty: AtomicBool,
    /// When the matcher last looked, and the places-returned count it saw then.
    pub(in crate::service) matched: Mutex<(i64, u64)>,
}

#[derive(Debug)]
pub(in crate::service) struct CampaignState {
    pub(in crate::service) campaign: Campaign,
    pub(in crate::service) registrations: Registrations,
}

impl CampaignEntry {
    pub(in crate::service) fn new(campaign: Campaign) -> Self {
        Self {
            campaign_id: campaign.campaign_id.clone(),
            service_id: campaign.service_id.clone(),
            region_id: campaign.region_id.clone(),
            last_minute_hours: AtomicU32::new(campaign.last_minute_hours),
            ends_at_unix_ms: AtomicI64::new(campaign.ends_at_unix_ms.unwrap_or(i64::MAX)),
            state: Mutex::new(CampaignState {
                campaign,
                registrations: Registrations::default(),
            }),
            dirty: AtomicBool::new(true),
            matched: Mutex::new((i64::MIN, 0)),
        }
    }

    pub(in crate::service) fn lock(&self) -> MutexGuard<'_, CampaignState> {
        // Each critical section leaves the registrations consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn campaign(&self) -> Campaign {
        self.lock().campaign.clone()
    }

    /// A declined or expired offer's end: counted, with the next place in the line.
    pub(in crate::service) fn counted_end(&self) -> OfferEnd {
        let mut state = self.lock();
        OfferEnd::Counted {
            declined_max: state.campaign.offers_declined_max,
            arrival: state.registrations.take_arrival(),
        }
    }

    pub(in crate::service) fn registration(
        &self,
        citizen: &CitizenKey,
    ) -> Result<Registration, DomainError> {
        self.lock()
            .registrations
            .get(citizen)
            .cloned()
            .ok_or(DomainError::NotFound(Missing::Registration))
    }

    /// Whether a booking or hold of a slot starting at `start_unix_s` needs an offer.
    pub(in crate::service) fn requires_offer(&self, start_unix_s: i64, now_unix_ms: i64) -> bool {
        let hours = self.last_minute_hours.load(Ordering::Relaxed);
        !self.has_ended(now_unix_ms) && !campaign::is_last_minute(hours, start_unix_s, now_unix_ms)
    }

    /// Whether it has ended at `now_unix_ms` (`Campaign::has_ended`, without the lock).
    pub(in crate::service) fn has_ended(&self, now_unix_ms: i64) -> bool {
        now_unix_ms >= self.ends_at_unix_ms.load(Ordering::Acquire)
    }

    /// Whether a registration answered a request retention must still answer
    /// (`Cutoffs::keeps_answer_to`: a retry must find it).
    pub(in crate::service) fn answers_kept(&self, cutoffs: &Cutoffs) -> bool {
        let state = self.lock();
        let mut times = state.registrations.all().flat_map(|r| &r.requests);
        times.any(|(_, at_unix_ms)| cutoffs.keeps_answer_to(*at_unix_ms))
    }

    /// Whether the matcher should look now (and, if so, notes that it does).
    pub(in crate::service) fn due(&self, now: i64, returned: u64) -> bool {
        let mut matched = self.matched.lock().unwrap_or_else(|p| p.into_inner());
        let (last_at, last_returned) = *matched;
        let wave_opened = self
            .lock()
            .campaign
            .waves
            .iter()
            .any(|wave| last_at < wave.opens_at_unix_ms && wave.opens_at_unix_ms <= now);
        let due = self.dirty.swap(false, Ordering::AcqRel)
            || returned != last_returned
            || wave_opened
            || now.saturating_sub(last_at) >= MATCH_AT_LEAST_EVERY_MS;
        if due {
            *matched = (now, returned);
        }
        due
    }
}

/// Every campaign, by id and by service, and which offers and bookings are theirs.
#[derive(Debug, Default)]
pub struct Campaigns {
    pub(in crate::service) inner: RwLock<CampaignIndex>,
    /// One matching step at a time.
    pub(in crate::service) step: tokio::sync::Mutex<()>,
    /// Registrations of every campaign (bounded by `registrations_max`).
    pub(in crate::service) registrations: AtomicUsize,
    /// Counts every place returned anywhere: the matcher looks again when it moved.
    pub(in crate::service) places_returned: AtomicU64,
    /// When (nanoseconds after `EPOCH`, +1) the first place came back since the matcher
    /// last made offers; 0: none since.
    pub(in crate::service) returned_since: AtomicU64,
    /// Registrations by what they hold: an offer's hold, a booking.
    pub(in crate::service) holders: Mutex<Holders>,
    /// Campaigns whose record retention deleted, or recovery found registrations of
    /// but no record (a pass cut short, a write as it went): retention deletes their
    /// registrations.
    pub(in crate::service) orphaned: Mutex<Vec<CampaignId>>,
}

#[derive(Debug, Default)]
pub(in crate::service) struct CampaignIndex {
    pub(in crate::service) by_id: BTreeMap<CampaignId, Arc<CampaignEntry>>,
    pub(in crate::service) by_service: HashMap<ServiceId, Vec<Arc<CampaignEntry>>>,
}

#[derive(Debug, Default)]
pub(in crate::service) struct Holders {
    pub(in crate::service) offers: HashMap<HoldId, (Arc<CampaignEntry>, CitizenKey)>,
    pub(in crate::service) bookings: HashMap<BookingId, (Arc<CampaignEntry>, CitizenKey)>,
}

impl Campaigns {
    pub(in crate::service) fn read(&self) -> std::sync::RwLockReadGuard<'_, CampaignIndex> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(in crate::service) fn insert(&self, entry: Arc<CampaignEntry>) {
        let mut index = self.inner.write().unwrap_or_else(|p| p.into_inner());
        index
            .by_id
            .insert(entry.campaign_id.clone(), Arc::clone(&entry));
        index
            .by_service
            .entry(entry.service_id.clone())
            .or_default()
            .push(entry);
    }

    pub fn get(&self, id: &CampaignId) -> Option<Arc<CampaignEntry>> {
        self.read().by_id.get(id).cloned()
    }

    pub fn len(&self) -> usize {
        self.read().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(in crate::service) fn all(&self) -> Vec<Arc<CampaignEntry>> {
        self.read().by_id.values().cloned().collect()
    }

    /// The campaign covering the slot `key` of a site in `region` at `now`, if any: one
    /// not ended (one that ended may still be kept beside its successor).
    pub(in crate::service) fn covering(
        &self,
        region: &RegionId,
        key: &SlotKey,
        now: i64,
    ) -> Option<Arc<CampaignEntry>> {
        let index = self.read();
        index
            .by_service
            .get(&key.service_id)?
            .iter()
            .find(|entry| entry.region_id == *region && !entry.has_ended(now))
            .cloned()
    }

    /// Whether a booking or hold of the slot at `now` needs a campaign's offer.
    pub fn requires_offer(&self, region: &RegionId, key: &SlotKey, now: i64) -> bool {
        self.covering(region, key, now)
            .is_some_and(|entry| entry.requires_offer(key.start_unix_s, now))
    }

    /// Whether any registration of `entry` holds an offer (a live hold).
    pub(in crate::service) fn has_offers(&self, entry: &Arc<CampaignEntry>) -> bool {
        let holders = self.holders();
        (holders.offers.values()).any(|(holder, _)| Arc::ptr_eq(holder, entry))
    }

    /// Notes that campaign `id` has no record (retention deleted it) but may still have
    /// registrations stored: retention deletes them. Whether it was not noted yet.
    pub(in crate::service) fn orphan(&self, id: &CampaignId) -> bool {
        let mut orphaned = self.orphaned.lock().unwrap_or_else(|p| p.into_inner());
        let new = !orphaned.contains(id);
        if new {
            orphaned.push(id.clone());
        }
        new
    }

    /// One campaign `orphan` noted, forgotten here (retention then deletes its
    /// registrations, or notes it again).
    pub(in crate::service) fn next_orphaned(&self) -> Option<CampaignId> {
        let mut orphaned = self.orphaned.lock().unwrap_or_else(|p| p.into_inner());
        orphaned.pop()
    }

    /// Forgets the campaign `id` (retention deleted it): no gate, no matching, and its
    /// offers and bookings belong to no registration. Returns how many registrations it
    /// had (no longer counted against `registrations_max`).
    pub(in crate::service) fn remove(&self, id: &CampaignId) -> usize {
        let mut index = self.inner.write().unwrap_or_else(|p| p.into_inner());
        let Some(entry) = index.by_id.remove(id) else {
            return 0;
        };
        if let Some(entries) = index.by_service.get_mut(&entry.service_id) {
            entries.retain(|other| !Arc::ptr_eq(other, &entry));
        }
        drop(index);
        let mut holders = self.holders();
        holders
            .offers
            .retain(|_, (holder, _)| !Arc::ptr_eq(holder, &entry));
        holders
            .bookings
            .retain(|_, (holder, _)| !Arc::ptr_eq(holder, &entry));
        drop(holders);
        let count = entry.lock().registrations.len();
        let less = |counted: usize| Some(counted.saturating_sub(count));
        let _ = (self.registrations).fetch_update(Ordering::AcqRel, Ordering::Acquire, less);
        count
    }

    /// A place came back somewhere, or capacity changed: the matcher looks again. Call
    /// it after the change is in memory (Release: a step that reads the new count with
    /// Acquire sees the change).
    pub fn place_returned(&self) {
        self.places_returned.fetch_add(1, Ordering::Release);
        let now = monotonic_ns();
        let _ = self
            .returned_since
            .compare_exchange(0, now, Ordering::AcqRel, Ordering::Relaxed);
    }

    /// The matcher made offers: how long the first place returned since waited.
    pub(in crate::service) fn offers_made(&self, count: usize) {
        metrics::counter!(crate::telemetry::CAMPAIGN_OFFERS).increment(count as u64);
        let since = self.returned_since.swap(0, Ordering::AcqRel);
        if since != 0 {
            let waited_s = monotonic_ns().saturating_sub(since) as f64 / 1e9;
            metrics::histogram!(crate::telemetry::CAMPAIGN_REFILL_SECONDS).record(waited_s);
        }
    }

    pub(in crate::service) fn holders(&self) -> MutexGuard<'_, Holders> {
        self.holders.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The registration whose offer is the hold `id`.
    pub fn offer_of(&self, id: HoldId) -> Option<Registration> {
        let (entry, citizen) = self.holders().offers.get(&id).cloned()?;
        let registration = entry.lock().registrations.get(&citizen).cloned();
        registration
    }

    /// The registration whose offer is the hold `id`, about to end: counted (with its
    /// campaign's `offers_declined_max` and its next place at the end of the line), or
    /// not when its slot closed.
    pub fn ending_offer(&self, id: HoldId, slot_closed: bool) -> Option<(Registration, OfferEnd)> {
        let (entry, citizen) = self.holders().offers.get(&id).cloned()?;
        let registration = entry.lock().registrations.get(&citizen)?.clone();
        let end = match slot_closed {
            true => OfferEnd::SlotClosed,
            false => entry.counted_end(),
        };
        Some((registration, end))
    }

    /// The registration booked with booking `id`, or about to be: an offer being
    /// accepted (its booking is in the store before the registration settles, and the
    /// accept keeps the entry claimed until it has).
    pub fn booked_with(&self, id: BookingId) -> Option<Registration> {
        let found = self.holders().bookings.get(&id).cloned();
        let Some((entry, citizen)) = found else {
            return self.offer_of(id).map(|offered| offered.booked(id));
        };
        let registration = entry.lock().registrations.get(&citizen).cloned();
        registration
    }

    /// The write of `registration` is durable: memory takes it.
    pub fn settle(&self, registration: Registration) {
        let Some(entry) = self.get(&registration.campaign_id) else {
            // Written as retention deleted its campaign (after it looked for the
            // campaign's registrations, maybe): the next pass deletes it.
            tracing::debug!(campaign = %registration.campaign_id, "a registration of no campaign");
            self.orphan(&registration.campaign_id);
            return;
        };
        let citizen = registration.citizen;
        let mut state = entry.lock();
        let previous = state.registrations.get(&citizen).map(|r| r.state.clone());
        {
            let mut holders = self.holders();
            match previous {
                Some(RegistrationState::Offered(offer)) => {
                    holders.offers.remove(&offer.hold_id);
                }
                Some(RegistrationState::Booked { booking_id }) => {
                    holders.bookings.remove(&booking_id);
                }
                _ => {}
            }
            match &registration.state {
                RegistrationState::Offered(offer) => {
                    holders
                        .offers
                        .insert(offer.hold_id, (Arc::clone(&entry), citizen));
                }
                RegistrationState::Booked { booking_id } => {
                    holders
                        .bookings
                        .insert(*booking_id, (Arc::clone(&entry), citizen));
                }
                _ => {}
            }
        }
        if registration.state == RegistrationState::Active {
            entry.dirty.store(true, Ordering::Release);
        }
        let CampaignState {
            campaign,
            registrations,
        } = &mut *state;
        registrations.settle(campaign, registration);
    }

    pub(in crate::service) fn abandon(&self, entry: &CampaignEntry, citizen: &CitizenKey) {
        let mut state = entry.lock();
        let CampaignState {
            campaign,
            registrations,
        } = &mut *state;
        registrations.abandon(campaign, citizen);
    }
}

/// Nanoseconds since the first call (never 0), for the refill histogram.
pub(in crate::service) fn monotonic_ns() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let epoch = EPOCH.get_or_init(std::time::Instant::now);
    epoch.elapsed().as_nanos() as u64 + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::campaign::Preferences;

    #[test]
    fn a_registration_written_after_its_campaign_was_forgotten_is_left_to_retention() {
        let campaigns = Campaigns::default();
        let id = CampaignId::parse("f", "gone", 64).unwrap();
        assert_eq!(campaigns.next_orphaned(), None);
        campaigns.settle(Registration {
            registration_id: BookingId(1),
            campaign_id: id.clone(),
            citizen: CitizenKey([1; 16]),
            birth_year: None,
            groups: Vec::new(),
            preferences: Preferences::default(),
            registered_at_unix_ms: 0,
            arrival: 0,
            declines: 0,
            state: RegistrationState::Withdrawn { at_unix_ms: 1 },
            requests: Vec::new(),
        });
        assert_eq!(campaigns.next_orphaned(), Some(id));
        assert_eq!(campaigns.next_orphaned(), None);
    }
}

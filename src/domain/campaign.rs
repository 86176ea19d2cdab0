//! Campaigns (the model of the systems that held up: NHS, Poste): citizens pre-register;
//! waves decide who is eligible when; the matcher offers each waiting registration, in
//! rank order, the earliest free slot that fits its preferences, as a hold; the citizen
//! accepts (a booking) or declines (back to the end of its wave, exhausted after
//! `offers_declined_max`). Offers are holds, so there are never more offers than places,
//! and every place that frees up is offered again: that is the waitlist.
//!
//! Pure and synchronous: the engine keeps one [`Registrations`] per campaign behind a
//! mutex, passes `now` in and writes the [`Registration`]s this module hands it.

use std::collections::{BTreeSet, HashMap};

use chrono::{Datelike, NaiveDate, NaiveDateTime, NaiveTime};

use crate::domain::booking::RequestRecord;
use crate::domain::ids::{
    BookingId, CampaignId, CitizenKey, RegionId, ServiceId, SiteId, SlotKey, WaveId,
};
use crate::domain::release::draw_key;

/// Who becomes eligible when. A wave with priority groups admits only registrations
/// with one of them, ranked in the order they are listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wave {
    pub wave_id: WaveId,
    pub opens_at_unix_ms: i64,
    pub birth_year_min: Option<i32>,
    pub birth_year_max: Option<i32>,
    pub priority_groups: Vec<String>,
}

impl Wave {
    /// The rank of a registration's best group in this wave (0 when the wave lists
    /// none), or `None` when the registration is not eligible for it.
    fn admits(&self, birth_year: Option<i32>, groups: &[String]) -> Option<u16> {
        let year_ok = |bound: Option<i32>, ok: fn(i32, i32) -> bool| match bound {
            None => true,
            Some(bound) => birth_year.is_some_and(|year| ok(year, bound)),
        };
        if !year_ok(self.birth_year_min, |y, b| y >= b)
            || !year_ok(self.birth_year_max, |y, b| y <= b)
        {
            return None;
        }
        if self.priority_groups.is_empty() {
            return Some(0);
        }
        let rank = self
            .priority_groups
            .iter()
            .position(|group| groups.contains(group))?;
        Some(u16::try_from(rank).unwrap_or(u16::MAX))
    }

    pub fn is_open(&self, now_unix_ms: i64) -> bool {
        now_unix_ms >= self.opens_at_unix_ms
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Campaign {
    pub campaign_id: CampaignId,
    pub service_id: ServiceId,
    pub region_id: RegionId,
    /// How long an offer (a hold) waits for an answer (never past its slot's start).
    pub offer_ttl_seconds: u32,
    /// Declined or expired offers after which a registration is exhausted.
    pub offers_declined_max: u32,
    /// Slots starting within this many hours may be booked directly by anyone.
    pub last_minute_hours: u32,
    /// In order: a registration belongs to the first wave that admits it.
    pub waves: Vec<Wave>,
    /// Seeds the draw among early registrants; never shown to anyone.
    pub seed: [u8; 32],
    pub created_at_unix_ms: i64,
    /// When it ends (`None`: not yet set): from then on no offer is made, no citizen
    /// pre-registers, and its slots are booked directly; offers made before stand until
    /// they expire. Its registrations are deleted `records_retained_days` later.
    pub ends_at_unix_ms: Option<i64>,
}

/// Whether a slot starting at `start_unix_s` is within `last_minute_hours` of `now`:
/// anyone may then book it directly, without an offer (the campaigns' booking gate).
pub fn is_last_minute(last_minute_hours: u32, start_unix_s: i64, now_unix_ms: i64) -> bool {
    let window_ms = i64::from(last_minute_hours) * 3_600_000;
    start_unix_s.saturating_mul(1_000) - now_unix_ms < window_ms
}

impl Campaign {
    /// Whether it has ended at `now_unix_ms`.
    pub fn has_ended(&self, now_unix_ms: i64) -> bool {
        self.ends_at_unix_ms
            .is_some_and(|ends_at| now_unix_ms >= ends_at)
    }

    /// Whether the slot `key` of a site in `region` is one of this campaign's.
    pub fn covers(&self, region: &RegionId, key: &SlotKey) -> bool {
        key.service_id == self.service_id && *region == self.region_id
    }

    /// Whether anyone may book a slot starting at `start_unix_s` directly at `now`.
    pub fn is_last_minute(&self, start_unix_s: i64, now_unix_ms: i64) -> bool {
        is_last_minute(self.last_minute_hours, start_unix_s, now_unix_ms)
    }

    /// The first wave that admits a citizen born in `birth_year` with `groups`: its
    /// index and the citizen's group rank in it.
    pub fn wave_of(&self, birth_year: Option<i32>, groups: &[String]) -> Option<(usize, u16)> {
        self.waves
            .iter()
            .enumerate()
            .find_map(|(index, wave)| wave.admits(birth_year, groups).map(|rank| (index, rank)))
    }

    /// When an offer made at `now` of a slot starting at `start_unix_s` expires.
    pub fn offer_expiry(&self, start_unix_s: i64, now_unix_ms: i64) -> i64 {
        let ttl_ms = i64::from(self.offer_ttl_seconds) * 1_000;
        (now_unix_ms + ttl_ms).min(start_unix_s.saturating_mul(1_000))
    }
}

/// When and where a citizen can go. Empty lists and absent bounds accept anything.
/// Days and hours are the site's local ones; both bounds are inclusive.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Preferences {
    /// Sorted, no duplicates.
    pub site_ids: Vec<SiteId>,
    pub first_day: Option<NaiveDate>,
    pub last_day: Option<NaiveDate>,
    /// ISO weekdays 1 (Monday) ..= 7, sorted, no duplicates.
    pub weekdays: Vec<u8>,
    /// The earliest and latest local start time.
    pub earliest: Option<NaiveTime>,
    pub latest: Option<NaiveTime>,
}

impl Preferences {
    /// Whether a slot at `site` starting at local time `local` fits.
    pub fn fits(&self, site: &SiteId, local: NaiveDateTime) -> bool {
        let day = local.date();
        let weekday = day.weekday().number_from_monday() as u8;
        (self.site_ids.is_empty() || self.site_ids.binary_search(site).is_ok())
            && self.first_day.is_none_or(|first| day >= first)
            && self.last_day.is_none_or(|last| day <= last)
            && (self.weekdays.is_empty() || self.weekdays.contains(&weekday))
            && self
                .earliest
                .is_none_or(|earliest| local.time() >= earliest)
            && self.latest.is_none_or(|latest| local.time() <= latest)
    }
}

/// A place offered to a registration: a hold of `hold_id` on `slot`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offer {
    pub hold_id: BookingId,
    pub slot: SlotKey,
    pub offered_at_unix_ms: i64,
    pub expires_at_unix_ms: i64,
}

/// A registration's state as stored. Whether an active registration is REGISTERED or
/// WAITING depends on its wave and the time: see [`Registration::shown`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegistrationState {
    Active,
    Offered(Offer),
    Booked { booking_id: BookingId },
    Exhausted,
    Withdrawn { at_unix_ms: i64 },
}

/// A registration of `standing` in `wave` as shown at `now`: an active one waits once
/// its wave is open.
fn shown_at(standing: Shown, wave: Option<usize>, campaign: &Campaign, now_unix_ms: i64) -> Shown {
    match (standing, wave) {
        (Shown::Registered, Some(index)) if campaign.waves[index].is_open(now_unix_ms) => {
            Shown::Waiting
        }
        _ => standing,
    }
}

/// A registration's state as a citizen and the statistics see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Shown {
    /// Registered; its wave has not opened (or no wave admits it yet).
    Registered,
    /// Its wave is open: waiting for a place that fits.
    Waiting,
    Offered,
    Booked,
    Exhausted,
    Withdrawn,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    pub registration_id: BookingId,
    pub campaign_id: CampaignId,
    pub citizen: CitizenKey,
    pub birth_year: Option<i32>,
    pub groups: Vec<String>,
    pub preferences: Preferences,
    pub registered_at_unix_ms: i64,
    /// Its place at the end of the line: the order of its registration within the
    /// campaign (from 0), or of its last return to the line after an offer ended.
    pub arrival: u64,
    /// Offers declined, left to expire or withdrawn from.
    pub declines: u32,
    pub state: RegistrationState,
    /// The DeclineOffer and WithdrawRegistration requests that changed it, and when
    /// (unix ms): stored with it, so a retry after a restart is answered, not done
    /// again. Kept through registering anew; dropped once out of the request window.
    pub requests: Vec<(RequestRecord, i64)>,
}

impl Registration {
    /// Its state as shown at `now`, and the index of its wave (if one admits it).
    pub fn shown(&self, campaign: &Campaign, now_unix_ms: i64) -> (Shown, Option<usize>) {
        let (standing, wave) = self.standing(campaign);
        (shown_at(standing, wave, campaign, now_unix_ms), wave)
    }

    /// What its shown state follows from: the state shown before its wave opens (an
    /// active one is REGISTERED) and the index of its wave.
    fn standing(&self, campaign: &Campaign) -> (Shown, Option<usize>) {
        let wave = campaign
            .wave_of(self.birth_year, &self.groups)
            .map(|(index, _)| index);
        let standing = match &self.state {
            RegistrationState::Active => Shown::Registered,
            RegistrationState::Offered(_) => Shown::Offered,
            RegistrationState::Booked { .. } => Shown::Booked,
            RegistrationState::Exhausted => Shown::Exhausted,
            RegistrationState::Withdrawn { .. } => Shown::Withdrawn,
        };
        (standing, wave)
    }

    pub fn offer(&self) -> Option<&Offer> {
        match &self.state {
            RegistrationState::Offered(offer) => Some(offer),
            _ => None,
        }
    }

    /// It, about to be written for `request` made at `now`: the request joins its
    /// answered ones; those `keeps` no longer keeps (out of the window) are dropped,
    /// and the oldest beyond `kept_max`.
    pub fn answering(
        &self,
        request: RequestRecord,
        now_unix_ms: i64,
        (keeps, kept_max): (impl Fn(i64) -> bool, usize),
    ) -> Self {
        assert!(kept_max >= 1, "the request being answered is kept");
        let mut requests: Vec<(RequestRecord, i64)> = self
            .requests
            .iter()
            .filter(|(_, at)| keeps(*at))
            .cloned()
            .collect();
        requests.push((request, now_unix_ms));
        let excess = requests.len().saturating_sub(kept_max);
        requests.drain(..excess);
        Self {
            requests,
            ..self.clone()
        }
    }

    fn with_state(&self, state: RegistrationState) -> Self {
        Self {
            state,
            ..self.clone()
        }
    }

    /// An active registration gets an offer.
    pub fn offered(&self, offer: Offer) -> Self {
        debug_assert_eq!(self.state, RegistrationState::Active);
        self.with_state(RegistrationState::Offered(offer))
    }

    /// Its offer was declined or expired: back to the end of the line (`arrival`: the
    /// next arrival number), or exhausted once it has declined `declined_max` offers.
    pub fn offer_ended(&self, declined_max: u32, arrival: u64) -> Self {
        debug_assert!(self.offer().is_some());
        let declines = self.declines.saturating_add(1);
        let state = match declines >= declined_max {
            true => RegistrationState::Exhausted,
            false => RegistrationState::Active,
        };
        Self {
            declines,
            arrival,
            ..self.with_state(state)
        }
    }

    /// Its offer was accepted: the booking has the offer's hold id.
    pub fn booked(&self, booking_id: BookingId) -> Self {
        self.with_state(RegistrationState::Booked { booking_id })
    }

    /// Its offer ended unaccepted, as `end` says.
    pub fn after_offer(&self, end: OfferEnd) -> Self {
        match end {
            OfferEnd::Counted {
                declined_max,
                arrival,
            } => self.offer_ended(declined_max, arrival),
            // Withdrawing from an offer counts as declining it (registering anew keeps it).
            OfferEnd::Withdrawn { at_unix_ms } => Self {
                declines: self.declines.saturating_add(1),
                ..self.withdrawn(at_unix_ms)
            },
            OfferEnd::SlotClosed => self.requeued(),
        }
    }

    pub fn withdrawn(&self, now_unix_ms: i64) -> Self {
        self.with_state(RegistrationState::Withdrawn {
            at_unix_ms: now_unix_ms,
        })
    }

    /// Its offer or booking was taken by a closure: it waits again, with its rank (no
    /// decline counted: the closure was not the citizen's doing).
    pub fn requeued(&self) -> Self {
        self.with_state(RegistrationState::Active)
    }
}

/// How an offer that ends unaccepted counts for its registration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OfferEnd {
    /// Declined or expired: counted; back to the end of the line at `arrival`, or
    /// exhausted after `declined_max`.
    Counted { declined_max: u32, arrival: u64 },
    /// Its citizen withdrew (counted like a decline).
    Withdrawn { at_unix_ms: i64 },
    /// Its slot closed: not the citizen's doing; it waits again with its rank.
    SlotClosed,
}

/// The order in which waiting registrations are offered places: wave, then priority
/// group, then the seeded draw among those registered before the wave opened, then the
/// line in arrival order: later registrants, and those whose offer ended (back at the
/// end of the line as it stood then, ahead of anyone who registers later).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rank {
    pub wave: u16,
    pub group: u16,
    pub late: bool,
    pub order: u64,
}

/// The rank of an active registration, or `None` when no wave admits it.
pub fn rank(campaign: &Campaign, registration: &Registration) -> Option<Rank> {
    let (wave, group) = campaign.wave_of(registration.birth_year, &registration.groups)?;
    let late = registration.declines > 0
        || registration.registered_at_unix_ms >= campaign.waves[wave].opens_at_unix_ms;
    let order = match late {
        true => registration.arrival,
        false => {
            let key = draw_key(&campaign.seed, &registration.citizen);
            u64::from_be_bytes(key[..8].try_into().expect("8 bytes"))
        }
    };
    Some(Rank {
        wave: u16::try_from(wave).unwrap_or(u16::MAX),
        group,
        late,
        order,
    })
}

/// What pre-registering found.
#[derive(Debug, PartialEq, Eq)]
pub enum Begin {
    /// New, with its arrival number: write it, then `settle` or `abandon`. Replacing a
    /// withdrawn one (`replaces`), it keeps that one's declines (withdrawing resets
    /// nothing) and answered requests.
    New {
        arrival: u64,
        replaces: Option<Box<Registration>>,
    },
    /// The citizen's registration (withdrawing it allows registering anew).
    Existing(Box<Registration>),
    /// Being written by another request right now.
    Busy,
}

/// One registration in memory; `busy` while a write that changes it is in flight.
#[derive(Debug)]
struct Entry {
    registration: Option<Registration>,
    busy: bool,
}

/// A campaign's registrations: by citizen, the waiting ones in rank order, and how many
/// there are of each standing in each wave.
#[derive(Debug, Default)]
pub struct Registrations {
    by_citizen: HashMap<CitizenKey, Entry>,
    /// Active, not busy, admitted by a wave.
    waiting: BTreeSet<(Rank, CitizenKey)>,
    next_arrival: u64,
    /// Registrations by `Registration::standing` (no zero entries): the statistics read
    /// these few counts, not every registration.
    tally: HashMap<(Shown, Option<usize>), u64>,
}

impl Registrations {
    pub fn len(&self) -> usize {
        self.by_citizen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_citizen.is_empty()
    }

    pub fn get(&self, citizen: &CitizenKey) -> Option<&Registration> {
        self.by_citizen.get(citizen)?.registration.as_ref()
    }

    /// The next arrival number (a new registration takes it).
    pub fn next_arrival(&self) -> u64 {
        self.next_arrival
    }

    /// Starts a new registration of `citizen`, unless it has one that is not withdrawn.
    pub fn begin(&mut self, citizen: CitizenKey) -> Begin {
        match self.by_citizen.get_mut(&citizen) {
            Some(entry) if entry.busy => return Begin::Busy,
            Some(Entry {
                registration: Some(existing),
                ..
            }) if !matches!(existing.state, RegistrationState::Withdrawn { .. }) => {
                return Begin::Existing(Box::new(existing.clone()));
            }
            Some(entry) => entry.busy = true,
            None => {
                let entry = Entry {
                    registration: None,
                    busy: true,
                };
                self.by_citizen.insert(citizen, entry);
            }
        }
        let replaces = self.get(&citizen).cloned().map(Box::new);
        Begin::New {
            arrival: self.take_arrival(),
            replaces,
        }
    }

    /// The next place at the end of the line.
    pub fn take_arrival(&mut self) -> u64 {
        let arrival = self.next_arrival;
        self.next_arrival += 1;
        arrival
    }

    /// Takes an active registration out of the waiting order for a write that changes
    /// it (an offer, a withdrawal); `None` if it is busy or not active.
    pub fn claim(&mut self, campaign: &Campaign, citizen: &CitizenKey) -> Option<Registration> {
        let entry = self.by_citizen.get_mut(citizen)?;
        let registration = entry.registration.as_ref()?;
        if entry.busy || registration.state != RegistrationState::Active {
            return None;
        }
        entry.busy = true;
        if let Some(rank) = rank(campaign, registration) {
            self.waiting.remove(&(rank, *citizen));
        }
        Some(registration.clone())
    }

    /// The write of `registration` is durable: memory takes it.
    pub fn settle(&mut self, campaign: &Campaign, registration: Registration) {
        let citizen = registration.citizen;
        let entry = self.by_citizen.entry(citizen).or_insert(Entry {
            registration: None,
            busy: false,
        });
        if let Some(old) = entry.registration.take() {
            if let Some(rank) = rank(campaign, &old) {
                self.waiting.remove(&(rank, citizen));
            }
            untally(&mut self.tally, old.standing(campaign));
        }
        *self
            .tally
            .entry(registration.standing(campaign))
            .or_insert(0) += 1;
        self.next_arrival = self.next_arrival.max(registration.arrival + 1);
        if registration.state == RegistrationState::Active {
            if let Some(rank) = rank(campaign, &registration) {
                self.waiting.insert((rank, citizen));
            }
        }
        entry.registration = Some(registration);
        entry.busy = false;
    }

    /// The write never happened: the registration is as before.
    pub fn abandon(&mut self, campaign: &Campaign, citizen: &CitizenKey) {
        let Some(entry) = self.by_citizen.get_mut(citizen) else {
            return;
        };
        entry.busy = false;
        match &entry.registration {
            None => {
                self.by_citizen.remove(citizen);
            }
            Some(registration) if registration.state == RegistrationState::Active => {
                if let Some(rank) = rank(campaign, registration) {
                    self.waiting.insert((rank, *citizen));
                }
            }
            Some(_) => {}
        }
    }

    /// The waiting order and the tally again, after the waves changed.
    pub fn reindex(&mut self, campaign: &Campaign) {
        self.tally = tally_of(self.all(), campaign);
        self.waiting = self
            .by_citizen
            .iter()
            .filter(|(_, entry)| !entry.busy)
            .filter_map(|(citizen, entry)| {
                let registration = entry.registration.as_ref()?;
                (registration.state == RegistrationState::Active)
                    .then(|| rank(campaign, registration))
                    .flatten()
                    .map(|rank| (rank, *citizen))
            })
            .collect();
    }

    /// Waiting registrations of open waves, in rank order (a wave not open yet costs
    /// nothing: each open wave is one range of the order).
    pub fn waiting<'a>(
        &'a self,
        campaign: &'a Campaign,
        now_unix_ms: i64,
    ) -> impl Iterator<Item = &'a Registration> + 'a {
        let start = |wave: u16| {
            let rank = Rank {
                wave,
                group: 0,
                late: false,
                order: 0,
            };
            (rank, CitizenKey([0; 16]))
        };
        campaign
            .waves
            .iter()
            .enumerate()
            .filter(move |(_, wave)| wave.is_open(now_unix_ms))
            .flat_map(move |(index, _)| {
                let wave = u16::try_from(index).unwrap_or(u16::MAX - 1);
                self.waiting.range(start(wave)..start(wave + 1))
            })
            .filter_map(|(_, citizen)| self.get(citizen))
    }

    /// Every registration (for statistics and checks).
    pub fn all(&self) -> impl Iterator<Item = &Registration> {
        self.by_citizen
            .values()
            .filter_map(|entry| entry.registration.as_ref())
    }

    /// Counts per shown state, in total and per wave (index; registrations no wave
    /// admits are in the totals only). From the tally: as many steps as standings ×
    /// waves, whatever the number of registrations.
    pub fn counts(&self, campaign: &Campaign, now_unix_ms: i64) -> Counts {
        let tallied = self
            .tally
            .iter()
            .map(|(&(standing, wave), &count)| (standing, wave, count));
        debug_assert_eq!(
            self.tally,
            tally_of(self.all(), campaign),
            "the tally is every registration's standing, counted"
        );
        Counts::of(tallied, campaign, now_unix_ms)
    }
}

/// `tally` less one registration of `standing` (asserted there).
fn untally(tally: &mut HashMap<(Shown, Option<usize>), u64>, standing: (Shown, Option<usize>)) {
    let count = tally
        .get_mut(&standing)
        .expect("a settled registration is in the tally");
    *count -= 1;
    if *count == 0 {
        tally.remove(&standing);
    }
}

/// Registrations counted by standing.
fn tally_of<'a>(
    registrations: impl Iterator<Item = &'a Registration>,
    campaign: &Campaign,
) -> HashMap<(Shown, Option<usize>), u64> {
    let mut tally = HashMap::new();
    for registration in registrations {
        *tally.entry(registration.standing(campaign)).or_insert(0) += 1;
    }
    tally
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub total: HashMap<Shown, u64>,
    pub by_wave: Vec<HashMap<Shown, u64>>,
}

impl Counts {
    /// `count` registrations of each (standing, wave) as shown at `now`.
    fn of(
        tallied: impl Iterator<Item = (Shown, Option<usize>, u64)>,
        campaign: &Campaign,
        now_unix_ms: i64,
    ) -> Self {
        let mut counts = Counts {
            total: HashMap::new(),
            by_wave: vec![HashMap::new(); campaign.waves.len()],
        };
        for (standing, wave, count) in tallied {
            let shown = shown_at(standing, wave, campaign, now_unix_ms);
            *counts.total.entry(shown).or_insert(0) += count;
            if let Some(wave) = wave {
                *counts.by_wave[wave].entry(shown).or_insert(0) += count;
            }
        }
        counts
    }
}

/// A slot with free places, as the matcher sees it.
#[derive(Clone, Debug)]
pub struct FreeSlot {
    pub key: SlotKey,
    /// Its local start at its site.
    pub local: NaiveDateTime,
    pub free: u32,
}

/// The earliest slot of `free` (sorted by start) from index `from` with a free place
/// that fits.
pub fn choose(preferences: &Preferences, free: &[FreeSlot], from: usize) -> Option<usize> {
    let later = free.get(from..)?;
    later
        .iter()
        .position(|slot| slot.free > 0 && preferences.fits(&slot.key.site_id, slot.local))
        .map(|offset| from + offset)
}

/// The matcher's pick at `now`: waiting registrations in rank order, each offered the
/// earliest fitting slot of `free` (whose places it counts down), at most `max` offers.
/// Returns (registration, index into `free`).
///
/// Registrations with the same preferences go on from where the last of them stopped:
/// the slots before it did not fit them or had no place left, and within a pick places
/// are only taken, never returned. So a crowd waiting for a full site costs one walk of
/// `free`, not one each (BENCHMARKS.md, "A matching step's pick").
pub fn pick<'a>(
    waiting: impl Iterator<Item = &'a Registration>,
    free: &mut [FreeSlot],
    max: usize,
) -> Vec<(&'a Registration, usize)> {
    let mut left: u64 = free.iter().map(|slot| u64::from(slot.free)).sum();
    let mut picked = Vec::new();
    let mut resume: foldhash::HashMap<&Preferences, usize> = Default::default();
    for registration in waiting {
        if picked.len() >= max || left == 0 {
            break;
        }
        let from = resume.entry(&registration.preferences).or_insert(0);
        match choose(&registration.preferences, free, *from) {
            Some(index) => {
                free[index].free -= 1;
                left -= 1;
                picked.push((registration, index));
                *from = index;
            }
            None => *from = free.len(),
        }
    }
    picked
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR_MS: i64 = 3_600_000;

    fn id<T>(
        parse: fn(&str, &str, usize) -> Result<T, crate::domain::field_violation::FieldViolation>,
        text: &str,
    ) -> T {
        parse("f", text, 64).unwrap()
    }

    fn wave(name: &str, opens: i64, years: (Option<i32>, Option<i32>), groups: &[&str]) -> Wave {
        Wave {
            wave_id: id(WaveId::parse, name),
            opens_at_unix_ms: opens,
            birth_year_min: years.0,
            birth_year_max: years.1,
            priority_groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    fn campaign(waves: Vec<Wave>) -> Campaign {
        Campaign {
            campaign_id: id(CampaignId::parse, "c"),
            service_id: id(ServiceId::parse, "vax"),
            region_id: id(RegionId::parse, "lazio"),
            offer_ttl_seconds: 3_600,
            offers_declined_max: 2,
            last_minute_hours: 24,
            waves,
            seed: [7; 32],
            created_at_unix_ms: 0,
            ends_at_unix_ms: None,
        }
    }

    fn registration(n: u8, year: Option<i32>, groups: &[&str], at: i64) -> Registration {
        Registration {
            registration_id: BookingId(u128::from(n)),
            campaign_id: id(CampaignId::parse, "c"),
            citizen: CitizenKey([n; 16]),
            birth_year: year,
            groups: groups.iter().map(|g| g.to_string()).collect(),
            preferences: Preferences::default(),
            registered_at_unix_ms: at,
            arrival: u64::from(n),
            declines: 0,
            state: RegistrationState::Active,
            requests: Vec::new(),
        }
    }

    fn free(site: &str, day: u32, hour: u32, places: u32) -> FreeSlot {
        let local = NaiveDate::from_ymd_opt(2027, 3, day)
            .unwrap()
            .and_hms_opt(hour, 0, 0)
            .unwrap();
        FreeSlot {
            key: SlotKey {
                site_id: id(SiteId::parse, site),
                service_id: id(ServiceId::parse, "vax"),
                start_unix_s: local.and_utc().timestamp(),
            },
            local,
            free: places,
        }
    }

    #[test]
    fn a_registration_belongs_to_the_first_wave_that_admits_it() {
        let c = campaign(vec![
            wave("over80", 10, (None, Some(1946)), &[]),
            wave("care", 20, (None, None), &["health-worker", "carer"]),
            wave("all", 30, (None, None), &[]),
        ]);
        let cases = [
            (Some(1940), vec![], Some((0, 0))),
            (Some(1990), vec!["carer".to_string()], Some((1, 1))),
            (
                Some(1990),
                vec!["carer".into(), "health-worker".into()],
                Some((1, 0)),
            ),
            (Some(1990), vec![], Some((2, 0))),
            (None, vec![], Some((2, 0))),
        ];
        for (year, groups, want) in cases {
            assert_eq!(c.wave_of(year, &groups), want, "{year:?} {groups:?}");
        }
        // A birth-year bound needs a birth year.
        let only = campaign(vec![wave("over80", 10, (None, Some(1946)), &[])]);
        assert_eq!(only.wave_of(None, &[]), None);
    }

    #[test]
    fn ranks_go_by_wave_group_draw_then_the_line() {
        let c = campaign(vec![
            wave("first", 1_000, (None, None), &["a", "b"]),
            wave("all", 2_000, (None, None), &[]),
        ]);
        let early_b = registration(1, None, &["b"], 500);
        let early_a = registration(2, None, &["a"], 600);
        let late_a = registration(3, None, &["a"], 1_500);
        let all = registration(4, None, &[], 100);
        let mut declined_a = registration(5, None, &["a"], 100);
        declined_a.declines = 1;
        let mut order = [&early_b, &early_a, &late_a, &all, &declined_a];
        order.sort_by_key(|r| rank(&c, r).unwrap());
        let ids: Vec<u8> = order.iter().map(|r| r.citizen.0[0]).collect();
        // Group a: the drawn one, then the line (a later registrant, then one whose
        // offer ended after it registered); group b; the next wave.
        assert_eq!(ids, [2, 3, 5, 1, 4]);
    }

    #[test]
    fn the_draw_among_early_registrants_is_seeded() {
        let c = campaign(vec![wave("w", 1_000, (None, None), &[])]);
        let early: Vec<Registration> = (0..50).map(|n| registration(n, None, &[], 0)).collect();
        let order = |c: &Campaign| {
            let mut sorted: Vec<&Registration> = early.iter().collect();
            sorted.sort_by_key(|r| rank(c, r).unwrap());
            sorted.iter().map(|r| r.arrival).collect::<Vec<_>>()
        };
        assert_eq!(order(&c), order(&c));
        assert_ne!(order(&c), (0..50).collect::<Vec<_>>(), "not arrival order");
        let reseeded = Campaign {
            seed: [8; 32],
            ..c.clone()
        };
        assert_ne!(order(&c), order(&reseeded));
    }

    #[test]
    fn preferences_filter_sites_days_weekdays_and_hours() {
        let prefs = Preferences {
            site_ids: vec![id(SiteId::parse, "roma")],
            first_day: NaiveDate::from_ymd_opt(2027, 3, 2),
            last_day: NaiveDate::from_ymd_opt(2027, 3, 20),
            weekdays: vec![2, 3],
            earliest: NaiveTime::from_hms_opt(9, 0, 0),
            latest: NaiveTime::from_hms_opt(12, 0, 0),
        };
        // 2027-03-02 is a Tuesday, 03-03 a Wednesday, 03-04 a Thursday.
        let cases = [
            (free("roma", 2, 9, 1), true),
            (free("roma", 3, 12, 1), true),
            (free("milano", 2, 9, 1), false),
            (free("roma", 4, 10, 1), false),
            (free("roma", 2, 8, 1), false),
            (free("roma", 2, 13, 1), false),
            (free("roma", 23, 10, 1), false),
        ];
        for (slot, want) in cases {
            assert_eq!(
                prefs.fits(&slot.key.site_id, slot.local),
                want,
                "{:?}",
                slot.local
            );
        }
        assert!(Preferences::default().fits(&id(SiteId::parse, "x"), free("x", 1, 1, 1).local));
    }

    #[test]
    fn the_matcher_gives_each_the_earliest_fitting_place_in_rank_order() {
        let mut roma_only = registration(1, None, &[], 0);
        roma_only.preferences.site_ids = vec![id(SiteId::parse, "roma")];
        let anyone = registration(2, None, &[], 0);
        let third = registration(3, None, &[], 0);
        let mut free_slots = vec![free("milano", 2, 9, 1), free("roma", 2, 10, 1)];
        let waiting = [&roma_only, &anyone, &third];
        let picked = pick(waiting.into_iter(), &mut free_slots, 10);
        let got: Vec<(u8, usize)> = picked.iter().map(|(r, i)| (r.citizen.0[0], *i)).collect();
        assert_eq!(got, [(1, 1), (2, 0)], "two places, two offers, rank order");
        assert!(free_slots.iter().all(|s| s.free == 0));
        let mut more = vec![free("milano", 2, 9, 5)];
        assert_eq!(
            pick(waiting.into_iter(), &mut more, 1).len(),
            1,
            "at most max"
        );
    }

    /// Registrations sharing preferences resume where the last one stopped: the same
    /// offers as giving each the earliest fitting place from the start of `free`.
    #[test]
    fn resuming_by_preferences_picks_what_a_walk_from_the_start_would() {
        let site = |name: &str| id(SiteId::parse, name);
        let preferences = [
            Preferences::default(),
            Preferences {
                site_ids: vec![site("roma")],
                ..Preferences::default()
            },
            Preferences {
                site_ids: vec![site("milano"), site("roma")],
                weekdays: vec![2, 4],
                ..Preferences::default()
            },
            Preferences {
                site_ids: vec![site("torino")],
                ..Preferences::default()
            },
            Preferences {
                earliest: NaiveTime::from_hms_opt(11, 0, 0),
                ..Preferences::default()
            },
        ];
        let mut seed = 7u64;
        let mut next = |bound: u64| {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (seed >> 33) % bound
        };
        for round in 0..200 {
            let sites = ["milano", "roma", "napoli"];
            let mut free_slots: Vec<FreeSlot> = (0..1 + next(30))
                .map(|_| {
                    let (day, hour) = (1 + next(10) as u32, 8 + next(8) as u32);
                    free(sites[next(3) as usize], day, hour, next(3) as u32)
                })
                .collect();
            free_slots.sort_by_key(|slot| slot.key.start_unix_s);
            let waiting: Vec<Registration> = (0..next(60) as u8)
                .map(|n| {
                    let mut r = registration(n, None, &[], 0);
                    r.preferences = preferences[next(5) as usize].clone();
                    r
                })
                .collect();
            let max = 1 + next(40) as usize;
            let mut walked = free_slots.clone();
            let mut want = Vec::new();
            for r in &waiting {
                let left: u32 = walked.iter().map(|slot| slot.free).sum();
                if want.len() >= max || left == 0 {
                    break;
                }
                if let Some(index) = choose(&r.preferences, &walked, 0) {
                    walked[index].free -= 1;
                    want.push((r.citizen, index));
                }
            }
            let got: Vec<_> = pick(waiting.iter(), &mut free_slots, max)
                .into_iter()
                .map(|(r, index)| (r.citizen, index))
                .collect();
            assert_eq!(got, want, "round {round}");
        }
    }

    /// A registration keeps the requests it answered within the window, at most
    /// `kept_max` of them, the newest.
    #[test]
    fn a_registration_keeps_its_newest_answered_requests() {
        use crate::domain::ids::{RequestFingerprint, RequestKey};
        let request = |n: u8| RequestRecord {
            key: RequestKey([n; 16]),
            fingerprint: RequestFingerprint([n; 16]),
        };
        let mut answered = registration(1, None, &[], 0);
        for n in 0..5u8 {
            answered = answered.answering(request(n), i64::from(n) * 1_000, (|_| true, 3));
        }
        let kept: Vec<(RequestRecord, i64)> = (2..5u8)
            .map(|n| (request(n), i64::from(n) * 1_000))
            .collect();
        assert_eq!(answered.requests, kept);
        // Out of the window (before 4,000): dropped when it is next written.
        let later = answered.answering(request(9), 9_000, (|at| at >= 4_000, 3));
        assert_eq!(later.requests, [(request(4), 4_000), (request(9), 9_000)]);
    }

    #[test]
    fn declines_send_a_registration_back_until_exhausted() {
        let offer = Offer {
            hold_id: BookingId(9),
            slot: free("roma", 2, 9, 1).key,
            offered_at_unix_ms: 0,
            expires_at_unix_ms: 1,
        };
        let r = registration(1, None, &[], 0).offered(offer.clone());
        let once = r.offer_ended(2, 77);
        assert_eq!(
            (once.state.clone(), once.declines, once.arrival),
            (RegistrationState::Active, 1, 77)
        );
        let twice = once.offered(offer).offer_ended(2, 78);
        assert_eq!(twice.state, RegistrationState::Exhausted);
    }

    #[test]
    fn registrations_wait_only_in_open_waves_and_one_write_at_a_time() {
        let c = campaign(vec![
            wave("old", 0, (None, Some(1950)), &[]),
            wave("young", 10 * HOUR_MS, (None, None), &[]),
        ]);
        let mut book = Registrations::default();
        for (n, year) in [(1u8, 1940), (2, 1990), (3, 1945)] {
            assert!(matches!(book.begin(CitizenKey([n; 16])), Begin::New { .. }));
            book.settle(&c, registration(n, Some(year), &[], 0));
        }
        assert_eq!(
            book.begin(CitizenKey([1; 16])),
            Begin::Existing(Box::new(book.get(&CitizenKey([1; 16])).unwrap().clone()))
        );
        let open_now: Vec<u8> = book.waiting(&c, HOUR_MS).map(|r| r.citizen.0[0]).collect();
        assert_eq!(open_now.len(), 2);
        assert!(!open_now.contains(&2), "the young wave has not opened");
        assert_eq!(book.waiting(&c, 10 * HOUR_MS).count(), 3);
        let claimed = book.claim(&c, &CitizenKey([1; 16])).unwrap();
        assert!(book.claim(&c, &CitizenKey([1; 16])).is_none(), "busy");
        assert_eq!(book.begin(CitizenKey([1; 16])), Begin::Busy);
        book.abandon(&c, &claimed.citizen);
        assert_eq!(book.waiting(&c, HOUR_MS).count(), 2);
        let counts = book.counts(&c, HOUR_MS);
        assert_eq!(counts.total[&Shown::Waiting], 2);
        assert_eq!(counts.total[&Shown::Registered], 1);
        assert_eq!(counts.by_wave[1][&Shown::Registered], 1);
        // A withdrawn registration may register anew.
        book.settle(&c, claimed.withdrawn(5));
        assert!(matches!(book.begin(CitizenKey([1; 16])), Begin::New { .. }));
    }

    #[test]
    fn the_statistics_follow_every_change_and_a_change_of_waves() {
        let mut c = campaign(vec![
            wave("old", 0, (None, Some(1950)), &[]),
            wave("young", 10 * HOUR_MS, (None, None), &[]),
        ]);
        let mut book = Registrations::default();
        let every = |book: &Registrations, c: &Campaign, now: i64| {
            let mut shown: HashMap<Shown, u64> = HashMap::new();
            for registration in book.all() {
                *shown.entry(registration.shown(c, now).0).or_insert(0) += 1;
            }
            assert_eq!(book.counts(c, now).total, shown, "at {now}");
            shown
        };
        for (n, year) in [(1u8, 1940), (2, 1990), (3, 1945), (4, 2000)] {
            book.begin(CitizenKey([n; 16]));
            book.settle(&c, registration(n, Some(year), &[], 0));
        }
        assert_eq!(every(&book, &c, HOUR_MS)[&Shown::Waiting], 2);
        assert_eq!(every(&book, &c, 10 * HOUR_MS)[&Shown::Waiting], 4);
        let one = book.claim(&c, &CitizenKey([1; 16])).unwrap();
        assert_eq!(
            every(&book, &c, HOUR_MS)[&Shown::Waiting],
            2,
            "claimed, not changed"
        );
        book.settle(&c, one.booked(BookingId(9)));
        let two = book.claim(&c, &CitizenKey([2; 16])).unwrap();
        book.settle(&c, two.withdrawn(5));
        let counts = every(&book, &c, 10 * HOUR_MS);
        assert_eq!(counts[&Shown::Booked], 1);
        assert_eq!(counts[&Shown::Withdrawn], 1);
        assert_eq!(counts[&Shown::Waiting], 2);
        // Registering anew replaces the withdrawn one.
        book.begin(CitizenKey([2; 16]));
        book.settle(&c, registration(2, Some(1990), &[], 6));
        assert!(!every(&book, &c, 10 * HOUR_MS).contains_key(&Shown::Withdrawn));
        // New waves: the born-after-1980 wave is now the only one, not open yet.
        c.waves = vec![wave("late", 20 * HOUR_MS, (Some(1980), None), &[])];
        book.reindex(&c);
        let counts = book.counts(&c, 10 * HOUR_MS);
        assert_eq!(counts.by_wave[0][&Shown::Registered], 2);
        assert_eq!(
            counts.total[&Shown::Registered],
            3,
            "1945 is in no wave now"
        );
        assert_eq!(every(&book, &c, 20 * HOUR_MS)[&Shown::Waiting], 2);
    }

    #[test]
    fn last_minute_slots_and_offer_expiry() {
        let c = campaign(vec![]);
        let now = 1_000 * HOUR_MS;
        let start_s = |hours: i64| (now + hours * HOUR_MS) / 1_000;
        assert!(c.is_last_minute(start_s(23), now));
        assert!(!c.is_last_minute(start_s(24), now));
        assert_eq!(c.offer_expiry(start_s(48), now), now + HOUR_MS);
        assert_eq!(
            c.offer_expiry(start_s(0), now),
            now,
            "never past the slot's start"
        );
    }
}

//! Sites and their slots, in memory: lookup, search, statistics, schedule diffs.
//!
//! The catalog is plain data; the service layer guards it with a read-write lock
//! that only schedule publication writes. Admission itself happens on the slot's
//! `SlotCounter`, outside any lock, through the `Arc<Slot>` a lookup returns.
//!
//! Memory: a slot is 32 bytes behind its `Arc` (start, end, counter word, its day) and
//! one pointer in its service's start-ordered deque; its key's ids live in its day,
//! shared by the day's slots.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use chrono::{NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;

use crate::domain::error::DomainError;
use crate::domain::ids::{RegionId, ServiceId, SiteId, SlotKey};
use crate::domain::schedule::PlannedSlot;
use crate::domain::slot_counter::{CounterSnapshot, Group, Refused, SlotCounter};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Site {
    pub site_id: SiteId,
    pub name: String,
    pub region_id: RegionId,
    pub time_zone: Tz,
}

#[derive(Debug)]
pub struct Slot {
    /// Start instant, seconds since the Unix epoch (UTC).
    start_unix_s: i64,
    /// End instant (seconds since the epoch); changes only when a schedule is
    /// republished with another slot length.
    end_unix_s: AtomicI64,
    /// The counter, in the group of the local day the slot starts on (which also
    /// holds the slot's site and service ids).
    pub counter: SlotCounter<Arc<Day>>,
}

const _: () = assert!(
    std::mem::size_of::<Slot>() == 32,
    "a slot's share of the catalog"
);

/// A slot to add to the catalog (see [`Catalog::insert_slot`]).
#[derive(Clone, Debug)]
pub struct NewSlot {
    pub key: SlotKey,
    pub end_unix_s: i64,
    pub capacity: u32,
    pub closed: bool,
}

/// One service's slots on one local day of a site: their free places (the sum their
/// counters keep, see `SlotCounter::in_group`) for searches, and whether one of them
/// changed since watchers last looked (see [`ChangeBoard`]).
#[derive(Debug)]
pub struct Day {
    site_id: SiteId,
    service_id: ServiceId,
    start_unix_s: i64,
    next_day_start_unix_s: i64,
    free: AtomicI64,
    /// On the board already (cleared when the board is read).
    posted: AtomicBool,
    board: Arc<ChangeBoard>,
    me: Weak<Day>,
}

impl Day {
    fn new(
        key: (&SiteId, &ServiceId),
        date: NaiveDate,
        zone: Tz,
        board: &Arc<ChangeBoard>,
    ) -> Arc<Self> {
        let next = date.succ_opt().unwrap_or(date);
        Arc::new_cyclic(|me| Self {
            site_id: key.0.clone(),
            service_id: key.1.clone(),
            start_unix_s: day_start_unix_s(date, zone),
            next_day_start_unix_s: day_start_unix_s(next, zone),
            free: AtomicI64::new(0),
            posted: AtomicBool::new(false),
            board: Arc::clone(board),
            me: me.clone(),
        })
    }

    fn sold_out(&self) -> bool {
        self.free.load(Ordering::Acquire) <= 0
    }
}

impl Group for Day {
    fn add_free(&self, change: i64) {
        self.free.fetch_add(change, Ordering::AcqRel);
    }

    /// While someone watches: flags the member, then posts the day on the board once
    /// (the flag first: the fan-out clears `posted` before it reads the flags).
    fn member_changed(&self, flag: &dyn Fn()) {
        if !self.board.watching.load(Ordering::SeqCst) {
            return;
        }
        flag();
        if !self.posted.swap(true, Ordering::SeqCst) {
            if let Some(me) = self.me.upgrade() {
                self.board.post(me);
            }
        }
    }
}

/// The days with a slot changed since the last look, while anyone watches availability:
/// each day is posted once by its first change (see `Day::member_changed`), so the
/// watchers' fan-out reads only the slots of those days, never the whole catalog.
#[derive(Debug, Default)]
pub struct ChangeBoard {
    watching: AtomicBool,
    days: Mutex<Vec<Arc<Day>>>,
}

impl ChangeBoard {
    /// Whether changes are posted (off while nobody watches: no cost). The caller
    /// serialises calls (the watchers' registry does, under its lock).
    pub fn set_watching(&self, watching: bool) {
        self.watching.store(watching, Ordering::SeqCst);
        if !watching {
            for day in self.take() {
                day.posted.store(false, Ordering::SeqCst);
            }
        }
    }

    fn post(&self, day: Arc<Day>) {
        // Each critical section is one push or one swap: a poisoned lock is sound.
        self.days
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(day);
    }

    fn take(&self) -> Vec<Arc<Day>> {
        std::mem::take(&mut *self.days.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Where a walk for free places goes on when `slot`'s day has none: the next day's
/// first instant (past `slot` in any case); `None` while the day has places.
fn after_sold_out_day(slot: &Slot) -> Option<i64> {
    let day = slot.day();
    day.sold_out()
        .then(|| day.next_day_start_unix_s.max(slot.start_unix_s + 1))
}

/// The first instant of local day `date` in `zone`. Midnight may not exist (a DST jump
/// at 00:00): the earliest instant of the day.
fn day_start_unix_s(date: NaiveDate, zone: Tz) -> i64 {
    (0..24)
        .filter_map(|hour| date.and_hms_opt(hour, 0, 0))
        .find_map(|local| zone.from_local_datetime(&local).earliest())
        .map_or(i64::MAX, |start| start.timestamp())
}

impl Slot {
    /// Its key: the site and service of its day, and its start.
    pub fn key(&self) -> SlotKey {
        let day = self.day();
        SlotKey {
            site_id: day.site_id.clone(),
            service_id: day.service_id.clone(),
            start_unix_s: self.start_unix_s,
        }
    }

    pub fn start_unix_s(&self) -> i64 {
        self.start_unix_s
    }

    fn day(&self) -> &Day {
        self.counter.group()
    }

    pub fn end_unix_s(&self) -> i64 {
        self.end_unix_s.load(Ordering::Acquire)
    }

    pub fn set_end_unix_s(&self, end_unix_s: i64) {
        self.end_unix_s.store(end_unix_s, Ordering::Release);
    }
}

/// An admission into a slot whose write is in flight (a booking, a hold, a confirmed
/// hold): the counter counts it as pending until this is dropped, whatever the write's
/// outcome. A closure waits for pending admissions before reading the store.
#[must_use = "dropping it settles the admission at once"]
pub struct Admission {
    slot: Arc<Slot>,
}

impl Admission {
    pub fn slot(&self) -> &Arc<Slot> {
        &self.slot
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.slot.counter.settle();
    }
}

impl Slot {
    /// Takes one place (see `SlotCounter::try_take`).
    pub fn try_take(self: &Arc<Self>) -> Result<Admission, Refused> {
        self.try_take_leaving(|_| 0)
    }

    /// Takes one place, leaving some free (see `SlotCounter::try_take_leaving`).
    pub fn try_take_leaving(
        self: &Arc<Self>,
        held_back: impl Fn(u32) -> u32,
    ) -> Result<Admission, Refused> {
        self.counter.try_take_leaving(held_back)?;
        Ok(Admission {
            slot: Arc::clone(self),
        })
    }

    /// Announces a write that takes no new place (see `SlotCounter::enter`).
    pub fn enter(self: &Arc<Self>) -> Result<Admission, Refused> {
        self.counter.enter()?;
        Ok(Admission {
            slot: Arc::clone(self),
        })
    }
}

/// One service's slots at one site, in start order. Most changes are at the ends (a
/// schedule published further ahead, retention dropping the oldest), which a deque
/// makes cheap.
#[derive(Default)]
struct Starts(VecDeque<Arc<Slot>>);

/// Whether an existing slot is one of the schedule's own (planned `ends` by start): at a
/// planned start with the planned end, or one the publish shortens under which every
/// planned start exists already (an older build's slot cut by a spring-forward gap,
/// overlapping the next). A shorter length that creates slots under an existing one is
/// refused, as ever.
fn planned_as(slot: &Slot, ends: &BTreeMap<i64, i64>, existing: Option<&Starts>) -> bool {
    let (start, end) = (slot.start_unix_s, slot.end_unix_s());
    let exists = |under: &i64| existing.is_some_and(|starts| starts.get(*under).is_some());
    ends.get(&start).is_some_and(|&planned_end| {
        planned_end == end
            || (planned_end < end && ends.range(start + 1..end).all(|(under, _)| exists(under)))
    })
}

impl Starts {
    /// Where `start_unix_s` is (`Ok`) or would go (`Err`). Every probe reads a slot
    /// behind its pointer, so a plain binary search of a long schedule costs a cache
    /// miss per step; schedules are mostly evenly spaced, so the position is first
    /// guessed from the first and last starts and searched among the slots around the
    /// guess (usually next to each other in memory too), the whole deque only if the
    /// guess was off by more than that.
    fn find(&self, start_unix_s: i64) -> Result<usize, usize> {
        /// How far either side of the guess the near search reaches.
        const NEAR: usize = 48;
        let (Some(first), Some(last)) = (self.0.front(), self.0.back()) else {
            return Err(0);
        };
        let (first, last, end) = (first.start_unix_s, last.start_unix_s, self.0.len());
        if start_unix_s <= first || start_unix_s >= last {
            return match start_unix_s {
                s if s < first => Err(0),
                s if s == first => Ok(0),
                s if s == last => Ok(end - 1),
                _ => Err(end),
            };
        }
        // Here first < start < last: two slots at least, a span above zero.
        let offset = (start_unix_s - first) as u128 * (end - 1) as u128;
        let guess = (offset / (last - first) as u128) as usize;
        let (low, high) = (guess.saturating_sub(NEAR), (guess + NEAR).min(end - 1));
        let at = |index: usize| self.0[index].start_unix_s;
        if at(low) <= start_unix_s && start_unix_s <= at(high) {
            return self.find_between(start_unix_s, low, high);
        }
        self.find_between(start_unix_s, 0, end - 1)
    }

    /// `find` among the slots `low..=high`, given that `start_unix_s` is within their
    /// starts.
    fn find_between(&self, start_unix_s: i64, mut low: usize, high: usize) -> Result<usize, usize> {
        let mut end = high + 1;
        while low < end {
            let middle = low + (end - low) / 2;
            if self.0[middle].start_unix_s < start_unix_s {
                low = middle + 1;
            } else {
                end = middle;
            }
        }
        match self.0.get(low) {
            Some(slot) if slot.start_unix_s == start_unix_s => Ok(low),
            _ => Err(low),
        }
    }

    fn get(&self, start_unix_s: i64) -> Option<&Arc<Slot>> {
        self.find(start_unix_s).ok().map(|at| &self.0[at])
    }

    /// The first open slot at another start than `start` whose time overlaps
    /// `start..end`, of those `ours` does not claim (the slots of the schedule being
    /// published: a daylight-saving jump can make its own slots overlap). Open slots do
    /// not overlap one another (publishing refuses it), so of the earlier ones only the
    /// nearest open one can reach `start`.
    fn overlapping(
        &self,
        (start, end): (i64, i64),
        ours: impl Fn(&Slot) -> bool,
    ) -> Option<&Arc<Slot>> {
        const LONGEST_SLOT_S: i64 = 86_400; // slot_minutes_max is at most a day
        let at = self.find(start).unwrap_or_else(|at| at);
        let other = |slot: &&Arc<Slot>| {
            slot.start_unix_s != start && !slot.counter.snapshot().closed && !ours(slot)
        };
        let mut later = self
            .0
            .range(at..)
            .take_while(|slot| slot.start_unix_s < end);
        let earlier = || {
            let reach = start.saturating_sub(LONGEST_SLOT_S);
            let mut before = self.0.range(..at).rev();
            let nearest = before.find(|slot| slot.start_unix_s < reach || other(slot))?;
            (nearest.start_unix_s >= reach && nearest.end_unix_s() > start).then_some(nearest)
        };
        later.find(other).or_else(earlier)
    }

    /// The slots starting in `[from, to)`.
    fn range(&self, from: i64, to: i64) -> impl Iterator<Item = &Arc<Slot>> {
        let position = |start| self.find(start).unwrap_or_else(|at| at);
        let first = position(from);
        let end = position(to).max(first);
        self.0.range(first..end)
    }

    /// Adds a slot whose start is not there yet.
    fn insert(&mut self, slot: Arc<Slot>) {
        match self.0.back() {
            Some(last) if last.start_unix_s >= slot.start_unix_s => {
                let at = self.find(slot.start_unix_s);
                assert!(at.is_err(), "one slot per start");
                self.0.insert(at.unwrap_or_else(|at| at), slot);
            }
            _ => self.0.push_back(slot),
        }
    }

    /// Adds slots in start order whose starts are not there yet: appended when they
    /// all come after the last, else merged in one pass.
    fn merge(&mut self, slots: Vec<Arc<Slot>>) {
        let after_the_last = |last: &Arc<Slot>| last.start_unix_s < slots[0].start_unix_s;
        if slots.is_empty() || self.0.back().is_none_or(after_the_last) {
            self.0.extend(slots);
            return;
        }
        let old = std::mem::take(&mut self.0);
        let mut merged = VecDeque::with_capacity(old.len() + slots.len());
        let (mut old, mut new) = (old.into_iter().peekable(), slots.into_iter().peekable());
        while let (Some(a), Some(b)) = (old.peek(), new.peek()) {
            assert_ne!(a.start_unix_s, b.start_unix_s, "one slot per start");
            let next = if a.start_unix_s < b.start_unix_s {
                old.next()
            } else {
                new.next()
            };
            merged.extend(next);
        }
        merged.extend(old.chain(new));
        self.0 = merged;
    }

    fn remove(&mut self, start_unix_s: i64) -> Option<Arc<Slot>> {
        self.find(start_unix_s)
            .ok()
            .and_then(|at| self.0.remove(at))
    }
}

struct SiteEntry {
    site: Arc<Site>,
    /// Per service, its slots in start order.
    slots: BTreeMap<ServiceId, Starts>,
    /// The days its slots start on, per service (local dates in the site's zone), and
    /// how many slots each has (a day without slots is dropped).
    days: BTreeMap<(ServiceId, NaiveDate), (Arc<Day>, usize)>,
}

impl SiteEntry {
    fn slots(&self) -> impl Iterator<Item = &Arc<Slot>> {
        self.slots.values().flat_map(|starts| starts.0.iter())
    }

    fn slot_count(&self) -> usize {
        self.slots.values().map(|starts| starts.0.len()).sum()
    }

    /// One service's slots starting in `[from, to)`.
    fn range(
        &self,
        service_id: &ServiceId,
        from: i64,
        to: i64,
    ) -> impl Iterator<Item = &Arc<Slot>> {
        self.slots
            .get(service_id)
            .into_iter()
            .flat_map(move |starts| starts.range(from, to))
    }

    /// The local date `start` falls on, in the site's zone.
    fn date_of(&self, start_unix_s: i64) -> NaiveDate {
        self.site
            .time_zone
            .timestamp_opt(start_unix_s, 0)
            .single()
            .map_or(NaiveDate::MIN, |start| start.date_naive())
    }
}

/// Where a search looks.
#[derive(Clone, Debug)]
pub enum SearchScope {
    Site(SiteId),
    Region(RegionId),
}

#[derive(Clone, Debug)]
pub struct SearchQuery {
    pub scope: SearchScope,
    pub service_id: ServiceId,
    pub from_unix_s: i64,
    pub to_unix_s: i64,
    pub only_available: bool,
    /// Resume strictly after this slot (the previous page's last one).
    pub after: Option<SlotKey>,
    pub page_size: usize,
    /// Most slots one search visits; past it the page ends early, with the place to
    /// go on from.
    pub scan_max: usize,
}

pub struct SearchPage {
    pub slots: Vec<(Arc<Site>, Arc<Slot>)>,
    /// Set when more slots match after the last one returned.
    pub next_after: Option<SlotKey>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub slots: u32,
    /// Closed slots; their capacity is not counted.
    pub slots_closed: u32,
    /// Capacity of the open slots.
    pub capacity: u64,
    /// Confirmed bookings.
    pub booked: u64,
    /// Live holds.
    pub held: u64,
    /// Free places held back now for channel reserves (site statistics and open data).
    pub reserved: u64,
    /// Bookings the desk checked in, and marked no-shows (site statistics only; they
    /// are among `booked`: they keep their places).
    pub attended: u64,
    pub no_shows: u64,
}

impl Totals {
    /// Counts one slot whose counter reads `counter`, `held` of its places being live
    /// holds (the rest of what is taken is confirmed bookings).
    fn add_slot(&mut self, counter: &CounterSnapshot, held: u32) {
        self.slots += 1;
        if counter.closed {
            self.slots_closed += 1;
        } else {
            self.capacity += u64::from(counter.capacity);
        }
        self.booked += u64::from(counter.taken.saturating_sub(held));
        self.held += u64::from(held);
    }
}

/// One service's slots on one local day of a site, added up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DayTotals {
    pub service_id: ServiceId,
    pub day: NaiveDate,
    pub totals: Totals,
    /// Free places: capacity - booked - held of the open slots.
    pub remaining: u64,
    /// The slots added up start in `[from_unix_s, to_unix_s)` (the local day).
    pub from_unix_s: i64,
    pub to_unix_s: i64,
}

/// Which of a site's days [`Catalog::day_totals`] adds up.
pub struct DaysWanted<'a> {
    pub service_id: Option<&'a ServiceId>,
    /// Local days, inclusive.
    pub first: NaiveDate,
    pub last: NaiveDate,
    /// Resume strictly after this (service, day).
    pub after: Option<(&'a ServiceId, NaiveDate)>,
    /// Most rows.
    pub limit: usize,
    /// Most (service, day) entries looked at, rows or not.
    pub budget: usize,
}

/// What [`Catalog::day_totals`] found, and how far it looked.
pub struct DayPage {
    pub rows: Vec<DayTotals>,
    /// Entries looked at.
    pub looked: usize,
    /// The last (service, day) looked at.
    pub last: Option<(ServiceId, NaiveDate)>,
    /// The budget ran out before the site's last entry.
    pub stopped: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SiteStats {
    pub totals: Totals,
    /// Per local day of the slot's start, in day order.
    pub by_day: Vec<(NaiveDate, Totals)>,
}

/// What publishing a schedule changes; computed before anything is applied.
pub struct PublishPlan {
    pub created: Vec<NewSlot>,
    /// Existing slots with their new end and capacity.
    pub updated: Vec<(Arc<Slot>, i64, u32)>,
    pub total_capacity: u64,
    /// Planned slots that had started by `now`: neither created nor changed.
    pub past: u32,
}

#[derive(Default)]
pub struct Catalog {
    sites: BTreeMap<SiteId, SiteEntry>,
    regions: BTreeMap<RegionId, BTreeSet<SiteId>>,
    /// Shared with every day: where they post their changes for watchers.
    board: Arc<ChangeBoard>,
}

/// The key just before `slot`'s in its site and service: a search resumed "after" it
/// starts at `slot` itself.
fn previous_key(slot: &Slot) -> SlotKey {
    SlotKey {
        start_unix_s: slot.start_unix_s - 1,
        ..slot.key()
    }
}

impl Catalog {
    pub fn site(&self, site_id: &SiteId) -> Option<&Arc<Site>> {
        self.sites.get(site_id).map(|entry| &entry.site)
    }

    pub fn slot(&self, key: &SlotKey) -> Option<(&Arc<Site>, &Arc<Slot>)> {
        let entry = self.sites.get(&key.site_id)?;
        let slot = entry.slots.get(&key.service_id)?.get(key.start_unix_s)?;
        Some((&entry.site, slot))
    }

    /// Refuses changes that would silently move existing slots in local time.
    pub fn check_site_upsert(&self, site: &Site) -> Result<(), DomainError> {
        match self.sites.get(&site.site_id) {
            Some(entry) if entry.site.time_zone != site.time_zone && entry.slot_count() > 0 => {
                Err(DomainError::invalid(
                    "site.time_zone",
                    "cannot change the time zone of a site that already has slots",
                ))
            }
            _ => Ok(()),
        }
    }

    pub fn upsert_site(&mut self, site: Site) {
        let site_id = site.site_id.clone();
        if let Some(old) = self.sites.get(&site_id) {
            if old.site.region_id != site.region_id {
                if let Some(members) = self.regions.get_mut(&old.site.region_id) {
                    members.remove(&site_id);
                }
            }
        }
        self.regions
            .entry(site.region_id.clone())
            .or_default()
            .insert(site_id.clone());
        let site = Arc::new(site);
        match self.sites.get_mut(&site_id) {
            Some(entry) => entry.site = site,
            None => {
                self.sites.insert(
                    site_id,
                    SiteEntry {
                        site,
                        slots: BTreeMap::new(),
                        days: BTreeMap::new(),
                    },
                );
            }
        }
    }

    /// Adds a slot; its site must exist (the store only holds slots of stored sites),
    /// its start must be new for its service there. The slot joins its local day's
    /// free places.
    pub fn insert_slot(&mut self, new: NewSlot) -> Result<(), DomainError> {
        self.check_new_slots(std::slice::from_ref(&new))?;
        let (site_id, slot) = (new.key.site_id.clone(), self.make_slot(&new));
        let entry = self.sites.get_mut(&site_id).expect("checked above");
        let service_id = slot.day().service_id.clone();
        entry.slots.entry(service_id).or_default().insert(slot);
        Ok(())
    }

    /// Adds slots at once (a publication), as `insert_slot` each: all are checked
    /// first, so either all go in or none, and each service's slots are merged with
    /// its existing ones in one pass, wherever the new starts fall between them.
    pub fn insert_slots(&mut self, new: Vec<NewSlot>) -> Result<(), DomainError> {
        self.check_new_slots(&new)?;
        let mut by_service: BTreeMap<(SiteId, ServiceId), Vec<Arc<Slot>>> = BTreeMap::new();
        for slot in &new {
            let key = (slot.key.site_id.clone(), slot.key.service_id.clone());
            let made = self.make_slot(slot);
            by_service.entry(key).or_default().push(made);
        }
        for ((site_id, service_id), mut slots) in by_service {
            slots.sort_by_key(|slot| slot.start_unix_s);
            let entry = self.sites.get_mut(&site_id).expect("checked above");
            entry.slots.entry(service_id).or_default().merge(slots);
        }
        Ok(())
    }

    /// Every slot's site exists, and no start is in the catalog already or twice.
    fn check_new_slots(&self, new: &[NewSlot]) -> Result<(), DomainError> {
        let mut seen = std::collections::HashSet::new();
        for slot in new {
            let key = &slot.key;
            let entry = self
                .sites
                .get(&key.site_id)
                .ok_or(DomainError::NotFound(crate::domain::error::Missing::Site))?;
            let taken = |starts: &Starts| starts.get(key.start_unix_s).is_some();
            if entry.slots.get(&key.service_id).is_some_and(taken) || !seen.insert(key) {
                return Err(DomainError::invalid("slot", "is in the catalog already"));
            }
        }
        Ok(())
    }

    /// A slot in its local day (created if new), counted there; its site exists.
    fn make_slot(&mut self, new: &NewSlot) -> Arc<Slot> {
        let entry = self
            .sites
            .get_mut(&new.key.site_id)
            .expect("a checked site");
        let (zone, date) = (entry.site.time_zone, entry.date_of(new.key.start_unix_s));
        // The site's own id, and the service's as the site has it already: one copy of
        // each for all the site's slots of that service.
        let service_id = match entry.slots.get_key_value(&new.key.service_id) {
            Some((known, _)) => known.clone(),
            None => new.key.service_id.clone(),
        };
        let (day, slots) = entry
            .days
            .entry((service_id.clone(), date))
            .or_insert_with(|| {
                let key = (&entry.site.site_id, &service_id);
                (Day::new(key, date, zone, &self.board), 0)
            });
        *slots += 1;
        Arc::new(Slot {
            start_unix_s: new.key.start_unix_s,
            end_unix_s: AtomicI64::new(new.end_unix_s),
            counter: SlotCounter::in_group(new.capacity, new.closed, Arc::clone(day)),
        })
    }

    /// The first open slot of `key`'s site and service at another start whose time
    /// overlaps `key`'s slot ending at `end_unix_s` (reopening it would offer those
    /// desks twice).
    pub fn open_overlapping(&self, key: &SlotKey, end_unix_s: i64) -> Option<SlotKey> {
        let starts = self.sites.get(&key.site_id)?.slots.get(&key.service_id)?;
        let other = starts.overlapping((key.start_unix_s, end_unix_s), |_| false)?;
        Some(SlotKey {
            start_unix_s: other.start_unix_s,
            ..key.clone()
        })
    }

    /// Drops a slot (retention, once its records are deleted); false if it was not there.
    pub fn remove_slot(&mut self, key: &SlotKey) -> bool {
        let Some(entry) = self.sites.get_mut(&key.site_id) else {
            return false;
        };
        let Some(starts) = entry.slots.get_mut(&key.service_id) else {
            return false;
        };
        let Some(slot) = starts.remove(key.start_unix_s) else {
            return false;
        };
        if starts.0.is_empty() {
            entry.slots.remove(&key.service_id);
        }
        slot.counter.leave();
        let day_key = (key.service_id.clone(), entry.date_of(key.start_unix_s));
        if let Some((_, slots)) = entry.days.get_mut(&day_key) {
            *slots -= 1;
            if *slots == 0 {
                entry.days.remove(&day_key);
            }
        }
        true
    }

    /// Compares planned slots with the slots that already exist (none, for a site
    /// not created yet). Closed slots stay closed and are left out. A planned slot whose
    /// time overlaps an open slot at another start (a schedule republished with another
    /// slot length) is refused: the two would offer one hour's desks twice. Planned slots
    /// that start at or before `now_unix_s` are only counted (`past`): a slot nobody can
    /// book is not created, and one a retention deleted is not created again by a
    /// cumulative file re-imported.
    pub fn plan_publish(
        &self,
        (site_id, service_id): (&SiteId, &ServiceId),
        planned: &[PlannedSlot],
        now_unix_s: i64,
    ) -> Result<PublishPlan, DomainError> {
        let existing = self
            .sites
            .get(site_id)
            .and_then(|entry| entry.slots.get(service_id));
        let mut plan = PublishPlan {
            created: Vec::new(),
            updated: Vec::new(),
            total_capacity: 0,
            past: 0,
        };
        let ends: BTreeMap<i64, i64> = planned
            .iter()
            .map(|slot| (slot.start_unix_s, slot.end_unix_s))
            .collect();
        let ours = |slot: &Slot| planned_as(slot, &ends, existing);
        for slot in planned {
            plan.total_capacity += u64::from(slot.capacity);
            if slot.start_unix_s <= now_unix_s {
                plan.past += 1;
                continue;
            }
            let time = (slot.start_unix_s, slot.end_unix_s);
            if let Some(other) = existing.and_then(|starts| starts.overlapping(time, ours)) {
                return Err(overlap(site_id, service_id, (time, other)));
            }
            match existing.and_then(|starts| starts.get(slot.start_unix_s)) {
                // A closed slot stays closed (only SetSlotCapacity reopens it), at the
                // schedule's length, so that it may be reopened beside the new slots.
                Some(existing) if existing.counter.snapshot().closed => {
                    if existing.end_unix_s() != slot.end_unix_s {
                        let capacity = existing.counter.snapshot().capacity;
                        plan.updated
                            .push((Arc::clone(existing), slot.end_unix_s, capacity));
                    }
                }
                Some(existing) => {
                    if existing.end_unix_s() != slot.end_unix_s
                        || existing.counter.snapshot().capacity != slot.capacity
                    {
                        plan.updated
                            .push((Arc::clone(existing), slot.end_unix_s, slot.capacity));
                    }
                }
                None => plan.created.push(NewSlot {
                    key: SlotKey {
                        site_id: site_id.clone(),
                        service_id: service_id.clone(),
                        start_unix_s: slot.start_unix_s,
                    },
                    end_unix_s: slot.end_unix_s,
                    capacity: slot.capacity,
                    closed: false,
                }),
            }
        }
        Ok(plan)
    }

    /// The sites a search covers, in id order; unknown site or region → not found.
    fn scope_sites(&self, scope: &SearchScope) -> Result<Vec<&SiteEntry>, DomainError> {
        use crate::domain::error::Missing;
        match scope {
            SearchScope::Site(site_id) => self
                .sites
                .get(site_id)
                .map(|entry| vec![entry])
                .ok_or(DomainError::NotFound(Missing::Site)),
            SearchScope::Region(region_id) => Ok(self
                .regions
                .get(region_id)
                .map(|members| members.iter().filter_map(|id| self.sites.get(id)).collect())
                .unwrap_or_default()),
        }
    }

    pub fn search(&self, query: &SearchQuery) -> Result<SearchPage, DomainError> {
        let mut page = SearchPage {
            slots: Vec::with_capacity(query.page_size.min(1_024)),
            next_after: None,
        };
        let mut scanned = 0;
        let sites = self.scope_sites(&query.scope)?;
        if let Some(after) = &query.after {
            check_page_token(after, query, &sites)?;
        }
        for entry in sites {
            let Some(starts) = entry.slots.get(&query.service_id) else {
                continue;
            };
            let mut from = query.from_unix_s;
            if let Some(after) = &query.after {
                if entry.site.site_id < after.site_id {
                    continue;
                }
                if entry.site.site_id == after.site_id
                    && after.service_id == query.service_id
                    && after.start_unix_s >= query.from_unix_s
                {
                    from = after.start_unix_s.saturating_add(1);
                }
            }
            // Each pass walks slots until the page is full, or until a sold-out day,
            // which the next pass starts after. A resume point at or past `to` (a page
            // token) leaves nothing to walk.
            while from < query.to_unix_s {
                let mut sold_out_until = None;
                for slot in starts.range(from, query.to_unix_s) {
                    if page.slots.len() == query.page_size {
                        page.next_after = page.slots.last().map(|(_, last)| last.key());
                        return Ok(page);
                    }
                    scanned += 1;
                    if scanned > query.scan_max {
                        // Bounded work per search: the client goes on from here.
                        page.next_after = Some(previous_key(slot));
                        return Ok(page);
                    }
                    if query.only_available {
                        if let Some(next) = after_sold_out_day(slot) {
                            sold_out_until = Some(next);
                            break;
                        }
                        if slot.counter.snapshot().remaining() == 0 {
                            continue;
                        }
                    }
                    page.slots.push((Arc::clone(&entry.site), Arc::clone(slot)));
                }
                match sold_out_until {
                    Some(next) => from = next,
                    None => break,
                }
            }
        }
        Ok(page)
    }

    /// Every day's free places equal the sum of its slots' (true when nothing is in
    /// flight: at start-up, after recovery).
    pub fn check_free_places(&self) -> Result<(), String> {
        for entry in self.sites.values() {
            let mut sums: HashMap<*const Day, i64> = HashMap::new();
            for slot in entry.slots() {
                *sums.entry(std::ptr::from_ref(slot.day())).or_default() +=
                    i64::from(slot.counter.snapshot().remaining());
            }
            for ((service, date), (day, _)) in &entry.days {
                let expected = sums.get(&Arc::as_ptr(day)).copied().unwrap_or(0);
                let kept = day.free.load(Ordering::Acquire);
                if kept != expected {
                    return Err(format!(
                        "site {} service {service} on {date}: {kept} free places counted, \
                         {expected} in its slots",
                        entry.site.site_id
                    ));
                }
            }
        }
        Ok(())
    }

    /// Slots of one site.
    pub fn site_slots(&self, site_id: &SiteId) -> usize {
        self.sites.get(site_id).map_or(0, SiteEntry::slot_count)
    }

    /// Slots of the sites of `region`.
    pub fn region_slots(&self, region: &RegionId) -> usize {
        self.regions.get(region).map_or(0, |members| {
            members.iter().map(|site_id| self.site_slots(site_id)).sum()
        })
    }

    /// Number of sites.
    pub fn site_count(&self) -> usize {
        self.sites.len()
    }

    /// Totals of the first `limit` sites in id order (for gauges); `held` gives the live
    /// holds per site.
    pub fn site_totals(
        &self,
        held: &HashMap<SiteId, u64>,
        limit: usize,
    ) -> Vec<(Arc<Site>, Totals)> {
        self.sites
            .values()
            .take(limit)
            .map(|entry| {
                let mut totals = Totals::default();
                for slot in entry.slots() {
                    // Holds are known per site here: counted as taken, then moved over.
                    totals.add_slot(&slot.counter.snapshot(), 0);
                }
                totals.held = held.get(&entry.site.site_id).copied().unwrap_or(0);
                totals.booked = totals.booked.saturating_sub(totals.held);
                (Arc::clone(&entry.site), totals)
            })
            .collect()
    }

    /// Statistics of one site; `held` gives the live holds per slot.
    /// A site's totals and per-day totals; `held` and `reserved` (free places held back
    /// for channel reserves) by slot.
    pub fn site_stats(
        &self,
        site_id: &SiteId,
        held: &HashMap<SlotKey, u32>,
        reserved: &HashMap<SlotKey, u32>,
    ) -> Result<SiteStats, DomainError> {
        let entry = self
            .sites
            .get(site_id)
            .ok_or(DomainError::NotFound(crate::domain::error::Missing::Site))?;
        let zone = entry.site.time_zone;
        let mut totals = Totals::default();
        let mut by_day: BTreeMap<NaiveDate, Totals> = BTreeMap::new();
        for slot in entry.slots() {
            let (counter, key) = (slot.counter.snapshot(), slot.key());
            let held = held.get(&key).copied().unwrap_or(0);
            let reserved = u64::from(reserved.get(&key).copied().unwrap_or(0));
            let day = Utc
                .timestamp_opt(slot.start_unix_s, 0)
                .single()
                .map(|start| start.with_timezone(&zone).date_naive())
                .unwrap_or_default();
            for target in [&mut totals, by_day.entry(day).or_default()] {
                target.add_slot(&counter, held);
                target.reserved += reserved;
            }
        }
        Ok(SiteStats {
            totals,
            by_day: by_day.into_iter().collect(),
        })
    }

    /// The board the catalog's days post their changes on.
    pub fn board(&self) -> Arc<ChangeBoard> {
        Arc::clone(&self.board)
    }

    /// The slots whose capacity, taken places or closed flag changed since the last
    /// call (while watching), or were marked changed (`mark_shown_changed`), with their
    /// sites: only the posted days are read.
    pub fn changed_slots(&self) -> Vec<(Arc<Site>, Arc<Slot>)> {
        let mut changed = Vec::new();
        for day in self.board.take() {
            // Cleared first: a change from here on posts the day again.
            day.posted.store(false, Ordering::SeqCst);
            let Some(entry) = self.sites.get(&day.site_id) else {
                continue;
            };
            let (start, end) = (day.start_unix_s, day.next_day_start_unix_s);
            for slot in entry.range(&day.service_id, start, end) {
                if slot.counter.take_changed() {
                    changed.push((Arc::clone(&entry.site), Arc::clone(slot)));
                }
            }
        }
        changed
    }

    /// The sites of `region` (every site if `None`), in id order.
    pub fn sites_in(&self, region: Option<&RegionId>) -> Vec<Arc<Site>> {
        match region {
            None => self.sites.values().map(|e| Arc::clone(&e.site)).collect(),
            Some(region) => self
                .regions
                .get(region)
                .into_iter()
                .flatten()
                .filter_map(|site_id| self.site(site_id).cloned())
                .collect(),
        }
    }

    /// Per service and local day (in that order) the totals of a site's slots, as
    /// `wanted` says; `held` gives the live holds per slot. Adds up the same counters
    /// as `site_stats`, so the two always agree.
    pub fn day_totals(
        &self,
        site_id: &SiteId,
        wanted: &DaysWanted<'_>,
        held: &HashMap<SlotKey, u32>,
    ) -> DayPage {
        let mut page = DayPage {
            rows: Vec::new(),
            looked: 0,
            last: None,
            stopped: false,
        };
        let Some(entry) = self.sites.get(site_id) else {
            return page;
        };
        let from = match wanted.after {
            Some((service, day)) => Bound::Excluded((service.clone(), day)),
            None => Bound::Unbounded,
        };
        for ((service, day), (of_day, _)) in entry.days.range((from, Bound::Unbounded)) {
            if page.rows.len() == wanted.limit {
                break;
            }
            if page.looked == wanted.budget {
                page.stopped = true;
                break;
            }
            page.looked += 1;
            page.last = Some((service.clone(), *day));
            let wanted_service = wanted.service_id.is_none_or(|wanted| wanted == service);
            if wanted_service && (wanted.first..=wanted.last).contains(day) {
                page.rows
                    .push(self.totals_of_day(entry, (service, *day), of_day, held));
            }
        }
        page
    }

    fn totals_of_day(
        &self,
        entry: &SiteEntry,
        (service, day): (&ServiceId, NaiveDate),
        of_day: &Day,
        held: &HashMap<SlotKey, u32>,
    ) -> DayTotals {
        let (start, end) = (of_day.start_unix_s, of_day.next_day_start_unix_s);
        let (mut totals, mut remaining) = (Totals::default(), 0);
        for slot in entry.range(service, start, end) {
            let counter = slot.counter.snapshot();
            totals.add_slot(&counter, held.get(&slot.key()).copied().unwrap_or(0));
            remaining += u64::from(counter.remaining());
        }
        DayTotals {
            service_id: service.clone(),
            day,
            totals,
            remaining,
            from_unix_s: start,
            to_unix_s: end,
        }
    }

    /// The slots of one site (and one service, if given) starting in `[from, to)`.
    pub fn slots_in_range(
        &self,
        site_id: &SiteId,
        service_id: Option<&ServiceId>,
        from_unix_s: i64,
        to_unix_s: i64,
    ) -> Result<Vec<Arc<Slot>>, DomainError> {
        let entry = self
            .sites
            .get(site_id)
            .ok_or(DomainError::NotFound(crate::domain::error::Missing::Site))?;
        if from_unix_s >= to_unix_s {
            return Ok(Vec::new());
        }
        // One service: one range of its keys, however many slots the site has.
        Ok(match service_id {
            Some(service) => entry
                .range(service, from_unix_s, to_unix_s)
                .cloned()
                .collect(),
            None => entry
                .slots
                .values()
                .flat_map(|starts| starts.range(from_unix_s, to_unix_s))
                .cloned()
                .collect(),
        })
    }

    /// The slots of one site and service starting at or after `from_unix_s` with a place
    /// free, in start order: a sold-out day is passed over whole (its free places are
    /// kept per day), so the work follows the days and the free slots, not every slot.
    pub fn slots_with_places(
        &self,
        site_id: &SiteId,
        service_id: &ServiceId,
        from_unix_s: i64,
    ) -> Vec<Arc<Slot>> {
        let Some(starts) = self
            .sites
            .get(site_id)
            .and_then(|e| e.slots.get(service_id))
        else {
            return Vec::new();
        };
        let mut found = Vec::new();
        let mut from = from_unix_s;
        'days: loop {
            for slot in starts.range(from, i64::MAX) {
                if let Some(next) = after_sold_out_day(slot) {
                    from = next;
                    continue 'days;
                }
                if slot.counter.snapshot().remaining() > 0 {
                    found.push(Arc::clone(slot));
                }
            }
            return found;
        }
    }

    /// Every slot, for the recovery invariant check.
    pub fn slots(&self) -> impl Iterator<Item = &Arc<Slot>> {
        self.sites.values().flat_map(SiteEntry::slots)
    }
}

/// Why a planned slot (its `start..end`) cannot be published next to `other`, an open
/// slot it overlaps.
fn overlap(
    site_id: &SiteId,
    service_id: &ServiceId,
    ((start, end), other): ((i64, i64), &Slot),
) -> DomainError {
    let id = |start: i64| format!("{site_id}/{service_id}/{start}");
    let minutes = |start: i64, end: i64| (end - start) / 60;
    DomainError::invalid(
        "slot_minutes",
        format!(
            "the slot {} ({} min) would overlap the open slot {} ({} min): to change a \
             schedule's slot length, close its old slots first (CloseSlots)",
            id(start),
            minutes(start, end),
            id(other.start_unix_s),
            minutes(other.start_unix_s, other.end_unix_s()),
        ),
    )
}

/// A search's page token (a slot key it handed out) names a slot of its own service and
/// one of its sites: another search's token, or a made-up one, would silently give a
/// wrong page (the first again, or an empty "last" one).
fn check_page_token(
    after: &SlotKey,
    query: &SearchQuery,
    sites: &[&SiteEntry],
) -> Result<(), DomainError> {
    let in_scope = sites
        .iter()
        .any(|entry| entry.site.site_id == after.site_id);
    match after.service_id == query.service_id && in_scope {
        true => Ok(()),
        false => Err(DomainError::invalid(
            "page_token",
            "is not a next_page_token of this search (its scope and service)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id<T>(
        parse: fn(&str, &str, usize) -> Result<T, crate::domain::error::FieldViolation>,
        v: &str,
    ) -> T {
        parse("id", v, 64).unwrap()
    }

    fn catalog_with_slots(sites: &[&str], starts: &[i64]) -> Catalog {
        let mut catalog = Catalog::default();
        for site in sites {
            catalog.upsert_site(Site {
                site_id: id(SiteId::parse, site),
                name: site.to_string(),
                region_id: id(RegionId::parse, "north"),
                time_zone: chrono_tz::Europe::Rome,
            });
            for start in starts {
                let key = SlotKey {
                    site_id: id(SiteId::parse, site),
                    service_id: id(ServiceId::parse, "vax"),
                    start_unix_s: *start,
                };
                catalog
                    .insert_slot(NewSlot {
                        key,
                        end_unix_s: start + 600,
                        capacity: 1,
                        closed: false,
                    })
                    .unwrap();
            }
        }
        catalog
    }

    fn query(scope: SearchScope, after: Option<SlotKey>, page_size: usize) -> SearchQuery {
        SearchQuery {
            scope,
            service_id: id(ServiceId::parse, "vax"),
            from_unix_s: 0,
            to_unix_s: 1_000_000,
            only_available: false,
            after,
            page_size,
            scan_max: 10_000,
        }
    }

    #[test]
    fn a_start_is_found_where_a_binary_search_finds_it_however_the_slots_are_spaced() {
        // Even spacing, days with gaps, and a random walk (a simple LCG, seeded).
        let mut state = 7u64;
        let mut random = |bound: i64| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            (state >> 33) as i64 % bound
        };
        let even: Vec<i64> = (0..500).map(|i| 1_000 + 600 * i).collect();
        let days: Vec<i64> = (0..700)
            .map(|i| (i / 60) * 86_400 + (i % 60) * 600)
            .collect();
        let mut walk = vec![0i64];
        for _ in 0..900 {
            let jump = random(10) == 0;
            let step = 1 + random(if jump { 100_000 } else { 300 });
            walk.push(walk.last().unwrap() + step);
        }
        for starts in [even, days, walk, vec![5], vec![5, 9]] {
            let catalog = catalog_with_slots(&["a"], &starts);
            let entry = catalog.sites.values().next().unwrap();
            let deque = entry.slots.values().next().unwrap();
            let (low, high) = (starts[0] - 700, starts[starts.len() - 1] + 700);
            let probes = starts.iter().flat_map(|s| [s - 1, *s, s + 1]);
            for probe in probes
                .chain([low, high])
                .chain((0..300).map(|_| low + random(high - low)))
            {
                assert_eq!(
                    deque.find(probe),
                    starts.binary_search(&probe),
                    "{probe} among {} starts",
                    starts.len()
                );
            }
        }
    }

    #[test]
    fn region_search_pages_through_every_slot_once() {
        let catalog = catalog_with_slots(&["b", "a", "c"], &[100, 200, 300]);
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = catalog
                .search(&query(
                    SearchScope::Region(id(RegionId::parse, "north")),
                    after,
                    2,
                ))
                .unwrap();
            seen.extend(page.slots.iter().map(|(_, s)| s.key().to_string()));
            match page.next_after {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        assert_eq!(seen.len(), 9);
        let mut sorted = seen.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 9);
        assert_eq!(seen[0], "a/vax/100");
        assert_eq!(seen[8], "c/vax/300");
    }

    #[test]
    fn only_available_skips_full_slots() {
        let catalog = catalog_with_slots(&["a"], &[100, 200]);
        let key = SlotKey {
            site_id: id(SiteId::parse, "a"),
            service_id: id(ServiceId::parse, "vax"),
            start_unix_s: 100,
        };
        drop(catalog.slot(&key).unwrap().1.try_take().unwrap());
        let mut q = query(SearchScope::Site(id(SiteId::parse, "a")), None, 10);
        q.only_available = true;
        let page = catalog.search(&q).unwrap();
        assert_eq!(page.slots.len(), 1);
        assert_eq!(page.slots[0].1.key().start_unix_s, 200);
    }

    const DAY: i64 = 86_400;

    /// Slots of site "a" at 09:00, 10:00 and 11:00 UTC on `days` consecutive days from
    /// 2030-01-01 (one place each), and a query for the available ones.
    fn three_a_day(days: i64) -> (Catalog, Vec<i64>, SearchQuery) {
        let first = 1_893_488_400; // 2030-01-01T09:00:00Z
        let starts: Vec<i64> = (0..days)
            .flat_map(|day| (0..3).map(move |hour| first + day * DAY + hour * 3_600))
            .collect();
        let catalog = catalog_with_slots(&["a"], &starts);
        let mut q = query(SearchScope::Site(id(SiteId::parse, "a")), None, 10);
        (q.from_unix_s, q.to_unix_s) = (first, first + days * DAY);
        q.only_available = true;
        (catalog, starts, q)
    }

    fn take(catalog: &Catalog, start: i64) -> Arc<Slot> {
        let key = SlotKey {
            site_id: id(SiteId::parse, "a"),
            service_id: id(ServiceId::parse, "vax"),
            start_unix_s: start,
        };
        let slot = Arc::clone(catalog.slot(&key).unwrap().1);
        drop(slot.try_take().unwrap());
        slot
    }

    #[test]
    fn a_search_for_free_places_skips_sold_out_days_and_finds_the_rest() {
        let (catalog, starts, q) = three_a_day(3);
        for start in &starts[..5] {
            take(&catalog, *start); // day 1 sold out, day 2 has its last slot free
        }
        let day_one = catalog.slot(&take_key(starts[0])).unwrap().1.day();
        assert!(day_one.sold_out());
        let found: Vec<i64> = catalog
            .search(&q)
            .unwrap()
            .slots
            .iter()
            .map(|(_, s)| s.key().start_unix_s)
            .collect();
        assert_eq!(found, starts[5..].to_vec());
        // A place comes back: the day is searched again.
        catalog
            .slot(&take_key(starts[1]))
            .unwrap()
            .1
            .counter
            .release()
            .unwrap();
        assert!(!day_one.sold_out());
        let found = catalog.search(&q).unwrap().slots;
        assert_eq!(found[0].1.key().start_unix_s, starts[1]);
    }

    #[test]
    fn the_slots_with_places_pass_over_sold_out_days_and_full_slots() {
        let (catalog, starts, _) = three_a_day(4);
        let (site, vax) = (id(SiteId::parse, "a"), id(ServiceId::parse, "vax"));
        // Day 1 sold out; day 2's middle slot full; day 4 sold out.
        for at in [0, 1, 2, 4, 9, 10, 11] {
            take(&catalog, starts[at]);
        }
        let found = |from: i64| -> Vec<i64> {
            let slots = catalog.slots_with_places(&site, &vax, from);
            slots.iter().map(|slot| slot.start_unix_s).collect()
        };
        let free = [3, 5, 6, 7, 8].map(|at| starts[at]);
        assert_eq!(found(starts[0]), free);
        assert_eq!(found(starts[4]), free[1..], "from within a day");
        assert_eq!(found(starts[9]), [0i64; 0]);
        let other = id(ServiceId::parse, "other");
        assert!(catalog.slots_with_places(&site, &other, 0).is_empty());
    }

    fn take_key(start: i64) -> SlotKey {
        SlotKey {
            site_id: id(SiteId::parse, "a"),
            service_id: id(ServiceId::parse, "vax"),
            start_unix_s: start,
        }
    }

    #[test]
    fn a_days_free_places_are_the_sum_of_its_slots_after_any_changes() {
        let (catalog, starts, _) = three_a_day(2);
        let slots: Vec<Arc<Slot>> = starts
            .iter()
            .map(|s| Arc::clone(catalog.slot(&take_key(*s)).unwrap().1))
            .collect();
        let mut rng = 7u64;
        for _ in 0..2_000 {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let slot = &slots[(rng >> 33) as usize % slots.len()];
            match (rng >> 20) % 5 {
                0 => drop(slot.try_take()),
                1 => drop(slot.counter.release()),
                2 => drop(slot.counter.set_capacity(((rng >> 40) % 4) as u32)),
                3 => drop(slot.counter.close()),
                _ => slot.counter.reopen(),
            }
        }
        for day_slots in slots.chunks(3) {
            let sum: i64 = day_slots
                .iter()
                .map(|s| i64::from(s.counter.snapshot().remaining()))
                .sum();
            assert_eq!(day_slots[0].day().free.load(Ordering::Acquire), sum);
        }
    }

    /// A sold-out day that reaches past `to`, or a page token at `to`, ends the search
    /// (a range whose start is past its end would panic).
    #[test]
    fn a_search_ending_inside_a_sold_out_day_or_resumed_past_its_end_is_empty() {
        let (catalog, starts, mut q) = three_a_day(2);
        for start in &starts[3..] {
            take(&catalog, *start);
        }
        q.from_unix_s = starts[3];
        q.to_unix_s = starts[4] + 1; // inside day 2, which is sold out
        assert!(catalog.search(&q).unwrap().slots.is_empty());
        q.after = Some(take_key(q.to_unix_s + 5));
        assert!(catalog.search(&q).unwrap().slots.is_empty());
        q.after = Some(take_key(q.to_unix_s));
        q.only_available = false;
        assert!(catalog.search(&q).unwrap().slots.is_empty());
    }

    #[test]
    fn removed_slots_leave_their_day_and_an_empty_day_goes() {
        let (mut catalog, starts, _) = three_a_day(2);
        take(&catalog, starts[0]);
        assert!(catalog.remove_slot(&take_key(starts[1])));
        catalog.check_free_places().unwrap();
        for start in [starts[0], starts[2]] {
            assert!(catalog.remove_slot(&take_key(start)));
        }
        catalog.check_free_places().unwrap();
        assert_eq!(catalog.sites.values().next().unwrap().days.len(), 1);
    }

    /// Slots published and booked while nobody watched are no news to a watcher that
    /// came later (it read them in its first snapshot): a day's first change once
    /// watched reports that slot alone, not every slot of the day.
    #[test]
    fn once_watched_a_days_first_change_reports_that_slot_alone() {
        let (catalog, starts, _) = three_a_day(1);
        let first = take(&catalog, starts[0]);
        let starts_of = |changed: Vec<(Arc<Site>, Arc<Slot>)>| -> Vec<i64> {
            changed.iter().map(|(_, slot)| slot.start_unix_s).collect()
        };
        catalog.board().set_watching(true);
        assert!(catalog.changed_slots().is_empty());
        take(&catalog, starts[1]);
        assert_eq!(starts_of(catalog.changed_slots()), [starts[1]]);
        catalog.board().set_watching(false);
        first.counter.release().unwrap();
        catalog.board().set_watching(true);
        take(&catalog, starts[2]);
        assert_eq!(
            starts_of(catalog.changed_slots()),
            [starts[2]],
            "not the one changed while unwatched"
        );
    }

    #[test]
    fn a_page_token_of_another_site_or_service_is_refused() {
        let (catalog, starts, mut q) = three_a_day(1);
        q.after = Some(take_key(starts[0]));
        assert_eq!(catalog.search(&q).unwrap().slots.len(), 2, "its own");
        let others = [
            SlotKey {
                service_id: id(ServiceId::parse, "flu"),
                ..take_key(starts[0])
            },
            SlotKey {
                site_id: id(SiteId::parse, "zzz"),
                ..take_key(starts[0])
            },
        ];
        for other in others {
            q.after = Some(other);
            match catalog.search(&q) {
                Err(DomainError::Invalid(violations)) => {
                    assert_eq!(violations[0].field, "page_token");
                }
                Err(other) => panic!("{other:?}"),
                Ok(page) => panic!("accepted: {} slots", page.slots.len()),
            }
        }
    }

    #[test]
    fn a_search_visits_at_most_scan_max_slots_and_says_where_to_go_on() {
        let (catalog, starts, mut q) = three_a_day(1);
        take(&catalog, starts[0]);
        take(&catalog, starts[1]);
        q.scan_max = 1;
        let first = catalog.search(&q).unwrap();
        assert!(first.slots.is_empty());
        q.after = first.next_after;
        let second = catalog.search(&q).unwrap();
        assert!(second.slots.is_empty(), "the second full slot");
        q.after = second.next_after;
        let third = catalog.search(&q).unwrap();
        assert_eq!(third.slots[0].1.key().start_unix_s, starts[2]);
    }

    #[test]
    fn a_sites_slots_share_one_copy_of_its_ids_across_days() {
        // Each slot's key is parsed on its own, as recovery reads records.
        let catalog = catalog_with_slots(&["a"], &[0, 600, 3 * 86_400, 9 * 86_400]);
        let site = id(SiteId::parse, "a");
        let slots = catalog.slots_in_range(&site, None, 0, 10 * 86_400).unwrap();
        let keys: Vec<SlotKey> = slots.iter().map(|slot| slot.key()).collect();
        for key in &keys[1..] {
            assert_eq!(
                key.service_id.as_str().as_ptr(),
                keys[0].service_id.as_str().as_ptr()
            );
            assert_eq!(
                key.site_id.as_str().as_ptr(),
                keys[0].site_id.as_str().as_ptr()
            );
        }
    }

    #[test]
    fn slots_published_between_others_are_merged_in_order_or_refused_whole() {
        let mut catalog = catalog_with_slots(&["a"], &[100, 300, 500]);
        let new = |site: &str, start: i64| NewSlot {
            key: SlotKey {
                site_id: id(SiteId::parse, site),
                service_id: id(ServiceId::parse, "vax"),
                start_unix_s: start,
            },
            end_unix_s: start + 50,
            capacity: 2,
            closed: false,
        };
        let starts = |catalog: &Catalog| -> Vec<i64> {
            let slots = catalog.slots_in_range(&id(SiteId::parse, "a"), None, 0, 1_000);
            slots
                .unwrap()
                .iter()
                .map(|slot| slot.start_unix_s())
                .collect()
        };
        for refused in [
            vec![new("a", 50), new("a", 300)],
            vec![new("a", 50), new("a", 50)],
            vec![new("a", 50), new("nowhere", 60)],
        ] {
            assert!(catalog.insert_slots(refused).is_err());
            assert_eq!(starts(&catalog), [100, 300, 500], "nothing half-applied");
        }
        let batch = [700, 200, 50, 600, 400].map(|start| new("a", start));
        catalog.insert_slots(batch.to_vec()).unwrap();
        assert_eq!(starts(&catalog), [50, 100, 200, 300, 400, 500, 600, 700]);
        for start in [50, 200, 700] {
            let slot = catalog.slot(&new("a", start).key).unwrap().1;
            assert_eq!(slot.counter.snapshot().capacity, 2);
        }
        catalog.check_free_places().unwrap();
    }

    /// Slots of 10 minutes republished as 15: the new ones would overlap the open old
    /// ones (one hour's desks offered twice), so they are refused; once the old ones are
    /// closed, published.
    #[test]
    fn republishing_with_another_slot_length_is_refused_while_the_old_slots_are_open() {
        let catalog = catalog_with_slots(&["a"], &[0, 600, 1_200]);
        let planned = [0, 900].map(|start| PlannedSlot {
            start_unix_s: start,
            end_unix_s: start + 900,
            capacity: 1,
        });
        let (site, service) = (id(SiteId::parse, "a"), id(ServiceId::parse, "vax"));
        match catalog.plan_publish((&site, &service), &planned, i64::MIN) {
            Err(DomainError::Invalid(violations)) => {
                assert_eq!(violations[0].field, "slot_minutes");
                assert!(
                    violations[0].description.contains("a/vax/600"),
                    "{violations:?}"
                );
            }
            Err(other) => panic!("{other:?}"),
            Ok(_) => panic!("overlapping slots planned"),
        }
        for start in [600, 1_200] {
            let (_, slot) = catalog.slot(&take_key(start)).unwrap();
            slot.counter.close();
        }
        let plan = catalog
            .plan_publish((&site, &service), &planned, i64::MIN)
            .unwrap();
        assert_eq!(plan.created.len(), 1, "900");
        assert_eq!(plan.updated.len(), 1, "0 ends later");
    }

    /// A daylight-saving jump can make a schedule's own slots overlap (90 minutes
    /// across a spring-forward hour): published once, the same schedule republishes.
    #[test]
    fn a_schedule_whose_own_slots_overlap_republishes() {
        let catalog = catalog_with_slots(&["a"], &[0, 300]);
        let planned = [0, 300].map(|start| PlannedSlot {
            start_unix_s: start,
            end_unix_s: start + 600,
            capacity: 1,
        });
        let (site, service) = (id(SiteId::parse, "a"), id(ServiceId::parse, "vax"));
        let plan = catalog
            .plan_publish((&site, &service), &planned, i64::MIN)
            .unwrap();
        assert_eq!((plan.created.len(), plan.updated.len()), (0, 0));
    }

    /// An older build's slots cut by a spring-forward gap overlap; the schedule now ends
    /// the first where the second begins, and republishing shortens it.
    #[test]
    fn a_gap_cut_slot_of_an_older_build_is_shortened_by_a_republish() {
        let catalog = catalog_with_slots(&["a"], &[0, 300]);
        let planned = [(0, 300), (300, 900)].map(|(start, end)| PlannedSlot {
            start_unix_s: start,
            end_unix_s: end,
            capacity: 1,
        });
        let (site, service) = (id(SiteId::parse, "a"), id(ServiceId::parse, "vax"));
        let plan = catalog
            .plan_publish((&site, &service), &planned, i64::MIN)
            .unwrap();
        let updated: Vec<(i64, i64)> = (plan.updated.iter())
            .map(|(slot, end, _)| (slot.start_unix_s(), *end))
            .collect();
        assert_eq!(updated, [(0, 300)]);
    }

    /// Shorter slots whose starts line up with the old ones create slots under them:
    /// refused (the old 10-minute slots' bookings would share their desks with the new
    /// 5-minute slots).
    #[test]
    fn a_shorter_length_that_creates_slots_under_open_ones_is_refused() {
        let catalog = catalog_with_slots(&["a"], &[0, 600]);
        let planned = [0, 300, 600, 900].map(|start| PlannedSlot {
            start_unix_s: start,
            end_unix_s: start + 300,
            capacity: 1,
        });
        let (site, service) = (id(SiteId::parse, "a"), id(ServiceId::parse, "vax"));
        assert!(catalog
            .plan_publish((&site, &service), &planned, i64::MIN)
            .is_err());
    }

    #[test]
    fn republishing_creates_only_the_missing_slots_and_keeps_the_others() {
        let catalog = catalog_with_slots(&["a"], &[100, 700]);
        let planned = [100, 700, 1_300].map(|start| PlannedSlot {
            start_unix_s: start,
            end_unix_s: start + 600,
            capacity: 1,
        });
        let (site, service) = (id(SiteId::parse, "a"), id(ServiceId::parse, "vax"));
        let plan = (catalog.plan_publish((&site, &service), &planned, i64::MIN)).unwrap();
        assert_eq!(plan.created.len(), 1);
        assert_eq!(plan.updated.len(), 0);
        assert_eq!(plan.total_capacity, 3);
    }

    /// Slots that have started are neither created nor changed, nor compared with the
    /// slots already there (a past slot of another length is no overlap): only counted.
    #[test]
    fn slots_that_have_started_are_counted_and_left_out() {
        let catalog = catalog_with_slots(&["a"], &[100, 700]);
        let planned = [(0, 900), (700, 1_300), (1_300, 1_900), (1_900, 2_500)];
        let planned = planned.map(|(start, end)| PlannedSlot {
            start_unix_s: start,
            end_unix_s: end,
            capacity: 5,
        });
        let (site, service) = (id(SiteId::parse, "a"), id(ServiceId::parse, "vax"));
        let plan = (catalog.plan_publish((&site, &service), &planned, 700)).unwrap();
        assert_eq!(plan.past, 2);
        let created: Vec<i64> = plan.created.iter().map(|s| s.key.start_unix_s).collect();
        assert_eq!(created, [1_300, 1_900]);
        assert!(plan.updated.is_empty(), "700 (started) keeps its capacity");
        assert_eq!(plan.total_capacity, 20, "every slot the schedule describes");
        let refused = catalog.plan_publish((&site, &service), &planned, -1).err();
        assert!(
            matches!(refused, Some(DomainError::Invalid(_))),
            "0..900 overlaps"
        );
    }
}

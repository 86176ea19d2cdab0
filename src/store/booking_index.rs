//! The bookings' reference and roster indexes, in memory: which booking has a reference
//! (`GetBookingByReference`, the desk), and each slot's bookings in reference order
//! (`ListSlotBookings`, a site's attendance, the bookings a closure cancels). Derived
//! from the booking records: rebuilt by recovery, entered by `Store::commit` with each
//! write of a booking (a reference and a slot never change once a booking has them),
//! and left by retention with the booking once its deletion is durable. It is also
//! where new references are checked unique against stored ones
//! (`service::references`): a booking is entered before its reference stops counting
//! as being written.
//!
//! Until issue #19 these were two sled keys per booking (`N`, `W`): they doubled the
//! inserts of every booking and tripled the records recovery reads. A store that still
//! has them loses them when it is opened ([`remove_stored_index`]).

use std::collections::hash_map::Entry;

use foldhash::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};

use crate::domain::booking::{Booking, BookingState, Reference};
use crate::domain::ids::{SiteId, SlotKey};
use crate::store::error::StoreError;
use crate::store::records::{self, booking_key};

/// A booking's key in the store (`B` + citizen tag + booking id).
pub type BookingKey = [u8; 25];

/// Keys deleted per sled batch when removing a stored index.
const REMOVE_CHUNK_KEYS: usize = 10_000;

#[derive(Default)]
pub struct BookingIndex {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    by_reference: HashMap<Reference, BookingKey>,
    /// Per site, per slot, the references of its bookings (any state). Hash maps: a
    /// sorted map's string comparisons were half of a recovery's time.
    rosters: HashMap<SiteId, HashMap<SlotKey, Roster>>,
    /// Stored bookings that no roster has: those without a reference (stored before
    /// references existed) and, in a damaged store only, one that shares another's
    /// reference. A set, not a count, so entering a booking's later state or removing
    /// it twice (two retention passes) leaves it exact.
    outside_rosters: HashSet<BookingKey>,
}

/// One slot's references, sorted: a binary search of a contiguous array (a `BTreeSet`
/// here was 7% of a 5M recovery, in its node walks). A slot's bookings, cancelled ones
/// included until retention, are about its capacity (`capacity_per_slot_max`, 10,000
/// by default), so a booking's insert moves a few pages at most; recovery appends (its
/// threads in no order) and sorts each roster once at the end.
#[derive(Default)]
struct Roster(Vec<Marked>);

/// A reference (40 bits) shifted left by two, and in the low two bits its booking's
/// [`Attendance`]: sorted as the references are, and a site's attendance is counted
/// from memory (it was one store read per booking of the site).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Marked(u64);

/// What the desk marked of a booking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attendance {
    None = 0,
    Attended = 1,
    NoShow = 2,
}

impl Attendance {
    fn of(booking: &Booking) -> Self {
        match booking.state {
            BookingState::Attended { .. } => Attendance::Attended,
            BookingState::NoShow { .. } => Attendance::NoShow,
            BookingState::Confirmed | BookingState::Cancelled { .. } => Attendance::None,
        }
    }
}

impl Marked {
    fn new(reference: Reference, attendance: Attendance) -> Self {
        Self((reference.bits() << 2) | attendance as u64)
    }

    fn reference(self) -> Reference {
        Reference::from_bits(self.0 >> 2)
    }

    fn attendance(self) -> Attendance {
        match self.0 & 3 {
            1 => Attendance::Attended,
            2 => Attendance::NoShow,
            _ => Attendance::None,
        }
    }
}

impl Roster {
    fn find(&self, reference: Reference) -> Result<usize, usize> {
        self.0
            .binary_search_by_key(&reference, |marked| marked.reference())
    }

    /// Enters `marked`, or marks the reference already there as it says (a later state).
    fn insert(&mut self, marked: Marked) {
        match self.find(marked.reference()) {
            Ok(at) => self.0[at] = marked,
            Err(at) => self.0.insert(at, marked),
        }
    }

    fn remove(&mut self, reference: Reference) {
        if let Ok(at) = self.find(reference) {
            self.0.remove(at);
        }
    }

    /// The references after `after` (all of them for `None`), in order.
    fn after(&self, after: Option<Reference>) -> impl Iterator<Item = Reference> + '_ {
        let from = after.map_or(0, |after| match self.find(after) {
            Ok(at) => at + 1,
            Err(at) => at,
        });
        self.0[from..].iter().map(|marked| marked.reference())
    }

    /// How many of its bookings were checked in, and marked no-shows.
    fn attendance(&self) -> (u32, u32) {
        let count = |wanted| self.0.iter().filter(|m| m.attendance() == wanted).count();
        let (attended, no_shows) = (count(Attendance::Attended), count(Attendance::NoShow));
        (attended as u32, no_shows as u32)
    }
}

impl BookingIndex {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Each operation leaves both maps consistent before it can panic: a poisoned
        // index is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Enters `booking` (nothing for one stored before references existed); `Err` with
    /// the other booking's key, entering nothing, if another booking has its reference.
    /// The engine mints each reference against every one in use, so only a damaged or
    /// forged store can have two (recovery refuses it).
    pub fn insert(&self, booking: &Booking) -> Result<(), BookingKey> {
        self.enter(booking, Roster::insert)
    }

    /// Room for `bookings` references, made at once (recovery); `false` if the memory
    /// could not be had.
    pub fn reserve(&self, bookings: usize) -> bool {
        self.lock().by_reference.try_reserve(bookings).is_ok()
    }

    /// Bookings with a reference.
    pub fn references(&self) -> usize {
        self.lock().by_reference.len()
    }

    /// [`BookingIndex::insert`] for recovery: its roster entry is appended, unordered,
    /// until [`BookingIndex::sort_rosters`] (sorted inserts in key order would move
    /// half of a big slot's roster per booking), of a chunk of bookings under one lock
    /// (recovery's rebuild threads would otherwise take turns on it per booking). On a
    /// shared reference, `Err` with the booking's place in `bookings` and the other's
    /// key; the bookings before it are entered.
    pub fn insert_all_unordered<'b>(
        &self,
        bookings: impl IntoIterator<Item = &'b Booking>,
    ) -> Result<(), (usize, BookingKey)> {
        let mut inner = self.lock();
        for (at, booking) in bookings.into_iter().enumerate() {
            Self::enter_locked(&mut inner, booking, |roster, marked| roster.0.push(marked))
                .map_err(|other| (at, other))?;
        }
        Ok(())
    }

    /// Puts every roster in reference order, after recovery's unordered inserts.
    pub fn sort_rosters(&self) {
        let mut inner = self.lock();
        for roster in inner
            .rosters
            .values_mut()
            .flat_map(|site| site.values_mut())
        {
            roster.0.sort_unstable();
        }
    }

    fn enter(&self, booking: &Booking, add: fn(&mut Roster, Marked)) -> Result<(), BookingKey> {
        Self::enter_locked(&mut self.lock(), booking, add)
    }

    fn enter_locked(
        inner: &mut Inner,
        booking: &Booking,
        add: fn(&mut Roster, Marked),
    ) -> Result<(), BookingKey> {
        let key = booking_key(booking.citizen.tag(), booking.booking_id);
        let Some(codes) = booking.codes else {
            inner.outside_rosters.insert(key);
            return Ok(());
        };
        let marked = Marked::new(codes.reference, Attendance::of(booking));
        match inner.by_reference.entry(codes.reference) {
            Entry::Occupied(entered) if *entered.get() == key => {
                // A later state: its attendance, where the roster has it.
                let site = inner.rosters.get_mut(&booking.slot.site_id);
                if let Some(roster) = site.and_then(|site| site.get_mut(&booking.slot)) {
                    roster.insert(marked);
                }
                return Ok(());
            }
            Entry::Occupied(entered) => {
                let other = *entered.get();
                inner.outside_rosters.insert(key);
                return Err(other);
            }
            Entry::Vacant(vacant) => vacant.insert(key),
        };
        // Ids are shared (`Arc<str>`): the clones copy no text.
        let site = inner
            .rosters
            .entry(booking.slot.site_id.clone())
            .or_default();
        add(site.entry(booking.slot.clone()).or_default(), marked);
        Ok(())
    }

    /// Removes `booking`'s entries (after the write that deleted it).
    pub fn remove(&self, booking: &Booking) {
        let key = booking_key(booking.citizen.tag(), booking.booking_id);
        let mut inner = self.lock();
        inner.outside_rosters.remove(&key);
        let Some(codes) = booking.codes else {
            return;
        };
        if inner.by_reference.get(&codes.reference) != Some(&key) {
            return; // not this booking's entry
        }
        inner.by_reference.remove(&codes.reference);
        let Some(site) = inner.rosters.get_mut(&booking.slot.site_id) else {
            return;
        };
        if let Some(roster) = site.get_mut(&booking.slot) {
            roster.remove(codes.reference);
            if roster.0.is_empty() {
                site.remove(&booking.slot);
            }
        }
        if site.is_empty() {
            inner.rosters.remove(&booking.slot.site_id);
        }
    }

    /// Whether the rosters hold every stored booking (none without a reference is
    /// left).
    pub fn rosters_hold_every_booking(&self) -> bool {
        self.lock().outside_rosters.is_empty()
    }

    pub fn by_reference(&self, reference: Reference) -> Option<BookingKey> {
        self.lock().by_reference.get(&reference).copied()
    }

    /// Up to `limit` entries of `slot`'s roster, in reference order, after `after`.
    pub fn roster(
        &self,
        slot: &SlotKey,
        after: Option<Reference>,
        limit: usize,
    ) -> Vec<(Reference, BookingKey)> {
        let inner = self.lock();
        let Some(roster) = inner.rosters.get(&slot.site_id).and_then(|s| s.get(slot)) else {
            return Vec::new();
        };
        roster
            .after(after)
            .take(limit)
            .filter_map(|reference| Some((reference, *inner.by_reference.get(&reference)?)))
            .collect()
    }

    /// Each of the site's slots with bookings, and how many of those were checked in
    /// and marked no-shows (from memory: no store read).
    pub fn site_attendance(&self, site_id: &SiteId) -> Vec<(SlotKey, (u32, u32))> {
        let inner = self.lock();
        let Some(site) = inner.rosters.get(site_id) else {
            return Vec::new();
        };
        site.iter()
            .map(|(slot, roster)| (slot.clone(), roster.attendance()))
            .collect()
    }

    /// The slots with bookings entered that started before `before_unix_s`, site by site,
    /// each site's in order. The lock is held per site, so a pass over many sites never
    /// holds bookings up long.
    pub fn slots_started_before(&self, before_unix_s: i64) -> Vec<SlotKey> {
        let sites: Vec<SiteId> = self.lock().rosters.keys().cloned().collect();
        sites
            .iter()
            .flat_map(|site_id| self.site_slots(site_id))
            .filter(|slot| slot.start_unix_s < before_unix_s)
            .collect()
    }

    /// Whether `slot` has a booking entered.
    pub fn has_roster(&self, slot: &SlotKey) -> bool {
        let inner = self.lock();
        inner
            .rosters
            .get(&slot.site_id)
            .is_some_and(|site| site.contains_key(slot))
    }

    /// The site's slots that have bookings entered, in order. Read each one's roster
    /// next: the lock is held per call, so a site's stats never hold bookings up long.
    pub fn site_slots(&self, site_id: &SiteId) -> Vec<SlotKey> {
        let mut slots: Vec<SlotKey> = {
            let inner = self.lock();
            let site = inner.rosters.get(site_id);
            site.map(|site| site.keys().cloned().collect())
                .unwrap_or_default()
        };
        slots.sort_unstable();
        slots
    }
}

/// Deletes the `N` and `W` index keys a store written before issue #19 holds (their
/// content is rebuilt from the bookings). Idempotent: a crash midway leaves keys that
/// the next start removes. Returns how many were removed.
pub fn remove_stored_index(db: &sled::Db) -> Result<u64, StoreError> {
    let mut removed = 0u64;
    for prefix in [records::REFERENCE_PREFIX, records::ROSTER_PREFIX] {
        loop {
            let keys: Vec<sled::IVec> = db
                .scan_prefix([prefix])
                .keys()
                .take(REMOVE_CHUNK_KEYS)
                .collect::<Result<_, _>>()
                .map_err(|e| StoreError::Io(format!("scanning the old index: {e}")))?;
            if keys.is_empty() {
                break;
            }
            let mut batch = sled::Batch::default();
            for key in &keys {
                batch.remove(key.clone());
            }
            db.apply_batch(batch)
                .map_err(|e| StoreError::Io(format!("removing the old index: {e}")))?;
            removed += keys.len() as u64;
        }
    }
    if removed > 0 {
        db.flush()
            .map_err(|e| StoreError::Io(format!("removing the old index: {e}")))?;
        tracing::info!(
            removed,
            "removed the stored booking index (now kept in memory)"
        );
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::booking::{BookingCodes, BookingState, RequestRecord};
    use crate::domain::ids::{
        BookingId, ChannelId, CitizenKey, RequestFingerprint, RequestKey, ServiceId,
    };

    fn slot(site: &str, start: i64) -> SlotKey {
        SlotKey {
            site_id: SiteId::parse("s", site, 64).unwrap(),
            service_id: ServiceId::parse("s", "vax", 64).unwrap(),
            start_unix_s: start,
        }
    }

    fn booking(id: u128, slot: SlotKey, reference: Option<u64>) -> Booking {
        Booking {
            booking_id: BookingId(id),
            end_unix_s: slot.start_unix_s + 600,
            slot,
            citizen: CitizenKey([id as u8; 16]),
            created_at_unix_ms: 0,
            request: RequestRecord {
                key: RequestKey([id as u8; 16]),
                fingerprint: RequestFingerprint([0; 16]),
            },
            state: BookingState::Confirmed,
            channel: ChannelId::web(),
            codes: reference.map(|bits| BookingCodes {
                reference: Reference::from_bits(bits),
                check_in_code: 1,
            }),
            series: None,
        }
    }

    fn key_of(booking: &Booking) -> BookingKey {
        booking_key(booking.citizen.tag(), booking.booking_id)
    }

    fn entered(index: &BookingIndex) -> usize {
        index.lock().by_reference.len()
    }

    fn keys(entries: Vec<(Reference, BookingKey)>) -> Vec<BookingKey> {
        entries.into_iter().map(|(_, key)| key).collect()
    }

    #[test]
    fn rosters_page_in_reference_order_and_forget_removed_bookings() {
        let index = BookingIndex::default();
        let (a, b) = (slot("a", 0), slot("b", 0));
        let in_a: Vec<Booking> = [30, 10, 20]
            .iter()
            .map(|&r| booking(r as u128, a.clone(), Some(r)))
            .collect();
        let in_b = booking(99, b.clone(), Some(99));
        let unreferenced = booking(7, a.clone(), None);
        for entered in in_a.iter().chain([&in_b, &unreferenced]) {
            index.insert(entered).unwrap();
            index.insert(entered).unwrap(); // a later state of the same booking: no change
        }
        assert_eq!(entered(&index), 4);
        let impostor = booking(98, b.clone(), Some(99)); // another booking, same reference
        assert_eq!(
            index.insert(&impostor),
            Err(key_of(&in_b)),
            "and nothing entered"
        );
        assert_eq!(index.roster(&b, None, 10).len(), 1);
        let order: Vec<BookingKey> = [10u128, 20, 30]
            .iter()
            .map(|&id| key_of(in_a.iter().find(|x| x.booking_id.0 == id).unwrap()))
            .collect();
        assert_eq!(keys(index.roster(&a, None, 10)), order);
        assert_eq!(keys(index.roster(&a, None, 2)), order[..2]);
        let after = Some(Reference::from_bits(10));
        assert_eq!(keys(index.roster(&a, after, 10)), order[1..]);
        let after_a_gone_one = Some(Reference::from_bits(15));
        assert_eq!(keys(index.roster(&a, after_a_gone_one, 10)), order[1..]);
        let after_the_last = Some(Reference::from_bits(31));
        assert!(index.roster(&a, after_the_last, 10).is_empty());
        assert_eq!(index.site_slots(&b.site_id), std::slice::from_ref(&b));
        assert_eq!(
            index.by_reference(Reference::from_bits(99)),
            Some(key_of(&in_b))
        );

        index.remove(&impostor);
        assert_eq!(
            index.by_reference(Reference::from_bits(99)),
            Some(key_of(&in_b))
        );
        index.remove(&in_b);
        index.remove(&in_a[1]); // reference 10
        assert_eq!(index.by_reference(Reference::from_bits(99)), None);
        assert!(index.site_slots(&b.site_id).is_empty());
        assert_eq!(keys(index.roster(&a, None, 10)), order[1..]);
        assert_eq!(entered(&index), 2);
        // The booking without a reference (written twice) is in no roster, until it
        // is gone; removing it twice is harmless.
        assert!(!index.rosters_hold_every_booking());
        index.remove(&unreferenced);
        assert!(index.rosters_hold_every_booking());
        index.remove(&unreferenced);
        assert!(index.rosters_hold_every_booking());
    }

    /// A site's attendance is counted from the rosters' marks, which follow each later
    /// state of a booking (a no-show checked in late is attended), in reference order.
    #[test]
    fn rosters_count_attendance_from_each_bookings_latest_state() {
        let index = BookingIndex::default();
        let a = slot("marks", 1_000);
        let mut bookings: Vec<Booking> = (1..=4)
            .map(|id| booking(id, a.clone(), Some(100 - id as u64)))
            .collect();
        for booking in &bookings {
            index.insert(booking).unwrap();
        }
        let site = a.site_id.clone();
        assert_eq!(index.site_attendance(&site), [(a.clone(), (0, 0))]);
        bookings[0].state = BookingState::Attended { at_unix_ms: 1 };
        bookings[1].state = BookingState::NoShow { at_unix_ms: 1 };
        bookings[2].state = BookingState::NoShow { at_unix_ms: 1 };
        for booking in &bookings[..3] {
            index.insert(booking).unwrap();
        }
        assert_eq!(index.site_attendance(&site), [(a.clone(), (1, 2))]);
        bookings[2].state = BookingState::Attended { at_unix_ms: 2 };
        index.insert(&bookings[2]).unwrap();
        assert_eq!(index.site_attendance(&site), [(a.clone(), (2, 1))]);
        index.remove(&bookings[0]);
        assert_eq!(index.site_attendance(&site), [(a.clone(), (1, 1))]);
        let references: Vec<u64> = (index.roster(&a, None, 10).iter())
            .map(|(reference, _)| reference.bits())
            .collect();
        assert_eq!(references, [96, 97, 98], "still in reference order");
    }

    #[test]
    fn recovery_enters_rosters_unordered_then_sorts_them() {
        let index = BookingIndex::default();
        let a = slot("a", 0);
        let bookings: Vec<Booking> = [50u64, 20, 40, 10, 30]
            .iter()
            .map(|&r| booking(r as u128, a.clone(), Some(r)))
            .collect();
        index.insert_all_unordered(&bookings).unwrap();
        let twin = booking(99, a.clone(), Some(40));
        let chunk = [booking(98, a.clone(), Some(60)), twin.clone()];
        let other = booking_key(CitizenKey([40; 16]).tag(), BookingId(40));
        assert_eq!(
            index.insert_all_unordered(&chunk),
            Err((1, other)),
            "a shared reference, named with its place in the chunk"
        );
        index.remove(&chunk[0]);
        assert!(
            !index.rosters_hold_every_booking(),
            "the twin is in no roster"
        );
        index.remove(&twin);
        assert!(index.rosters_hold_every_booking());
        index.sort_rosters();
        let ids: Vec<BookingKey> = [10u128, 20, 30, 40, 50]
            .iter()
            .map(|&id| booking_key(CitizenKey([id as u8; 16]).tag(), BookingId(id)))
            .collect();
        assert_eq!(keys(index.roster(&a, None, 10)), ids);
    }
}

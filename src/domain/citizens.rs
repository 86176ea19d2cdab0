//! Which bookings each citizen holds per service: the citizen-limit invariant.
//!
//! Sharded maps with short critical sections: two requests of the same citizen meet
//! on the same shard, so "at most N active bookings" holds even when one citizen
//! books from two connections at once. Different citizens rarely share a shard.
//!
//! An entry leaves only after the durable write that ends it: a cancel first *claims*
//! the entry (so one of cancel, reschedule and closure wins it), the entry keeps
//! counting against the limit while the write is in flight, and `release` removes it
//! once durable. So the disk never holds more active bookings for a citizen than the
//! limit, even after a crash at any instant.
//!
//! A booking is active until its slot ends: each entry carries that end, and only
//! entries whose end is still ahead count (an appointment that is over, checked in or
//! not, no longer stops its citizen from booking the service again). Ended entries stay
//! until the write that ends them (a no-show, retention), so every claim finds them.

use foldhash::{HashMap, HashSet};
use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use crate::domain::ids::{BookingId, CitizenKey, ServiceId};
use crate::domain::shards::{Shards, SHARD_COUNT};

#[derive(Default)]
struct Shard {
    active: HashMap<(CitizenKey, ServiceId), Active>,
    /// Entries whose ending write is in flight (few at any time).
    claimed: HashSet<BookingId>,
    /// Entries kept until their slot ends (`keep_until`): no write may claim or move
    /// them (a write planned from a read before the check-in would, then undo itself,
    /// and put back an entry nothing releases any more).
    kept: HashSet<BookingId>,
}

/// One booking (or hold) of a citizen for a service, and when its slot ends: it counts
/// against the limit until then. The id is kept as two words so that an entry is 24
/// bytes (a `u128` would align it to 16, and every citizen's entry would grow by 16).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    id: [u64; 2],
    until_unix_s: i64,
}

impl Entry {
    pub fn new(id: BookingId, until_unix_s: i64) -> Self {
        let id = [(id.0 >> 64) as u64, id.0 as u64];
        Self { id, until_unix_s }
    }

    pub fn id(&self) -> BookingId {
        BookingId((u128::from(self.id[0]) << 64) | u128::from(self.id[1]))
    }
}

/// A citizen's bookings for one service: almost always exactly one, kept inline so
/// millions of citizens cost no extra allocation each.
#[derive(Debug)]
enum Active {
    One(Entry),
    Many(Vec<Entry>),
}

impl Active {
    fn entries(&self) -> &[Entry] {
        match self {
            Active::One(entry) => std::slice::from_ref(entry),
            Active::Many(entries) => entries,
        }
    }

    /// The entries that count at `now_unix_s` (their slot has not ended).
    fn counting(&self, now_unix_s: i64) -> impl Iterator<Item = &Entry> {
        self.entries()
            .iter()
            .filter(move |entry| entry.until_unix_s > now_unix_s)
    }

    fn contains(&self, booking_id: BookingId) -> bool {
        self.entries().iter().any(|entry| entry.id() == booking_id)
    }

    fn push(&mut self, entry: Entry) {
        match self {
            Active::One(first) => *self = Active::Many(vec![*first, entry]),
            Active::Many(entries) => entries.push(entry),
        }
    }

    /// Puts `to` in the place of entry `from`; the entry it replaced, if it was there.
    fn swap(&mut self, from: BookingId, to: Entry) -> Option<Entry> {
        let place = match self {
            Active::One(entry) => (entry.id() == from).then_some(entry),
            Active::Many(entries) => entries.iter_mut().find(|entry| entry.id() == from),
        }?;
        Some(std::mem::replace(place, to))
    }

    /// Removes `booking_id`; `None` when it was not there, `Some(empty)` when nothing is left.
    fn remove(&mut self, booking_id: BookingId) -> Option<bool> {
        match self {
            Active::One(entry) => (entry.id() == booking_id).then_some(true),
            Active::Many(entries) => {
                let position = entries.iter().position(|entry| entry.id() == booking_id)?;
                entries.swap_remove(position);
                match entries.as_slice() {
                    [] => Some(true),
                    [only] => {
                        *self = Active::One(*only);
                        Some(false)
                    }
                    _ => Some(false),
                }
            }
        }
    }
}

#[derive(Default)]
pub struct CitizenIndex {
    shards: Shards<Shard>,
    /// Entries of bookings checked in before their slot ended, by (slot end, id): they
    /// keep counting until then (`keep_until`, `release_ended`). Few at any time.
    counted_until: Mutex<BTreeMap<(i64, BookingId), (CitizenKey, ServiceId)>>,
}

impl CitizenIndex {
    /// Room for `entries` (citizen, service) entries in all, made at once (recovery);
    /// `false` if the memory could not be had (nothing reserved then in the shards left).
    pub fn reserve_entries(&self, entries: usize) -> bool {
        self.shards
            .each()
            .all(|mut shard| shard.active.try_reserve(entries / SHARD_COUNT + 1).is_ok())
    }

    /// (citizen, service) entries with an active booking.
    pub fn entries(&self) -> usize {
        self.shards.each().map(|shard| shard.active.len()).sum()
    }

    fn shard(&self, citizen: &CitizenKey) -> MutexGuard<'_, Shard> {
        self.shards.of(citizen.0[0])
    }

    /// How many entries (bookings and holds) of the citizen for the service count at
    /// `now_unix_s` (their slot has not ended).
    pub fn active_count(&self, citizen: CitizenKey, service: &ServiceId, now_unix_s: i64) -> usize {
        self.shard(&citizen)
            .active
            .get(&(citizen, service.clone()))
            .map_or(0, |active| active.counting(now_unix_s).count())
    }

    /// Whether `booking_id` (a booking or hold) is one of the citizen's active entries.
    pub fn is_active(
        &self,
        citizen: CitizenKey,
        service: &ServiceId,
        booking_id: BookingId,
    ) -> bool {
        self.shard(&citizen)
            .active
            .get(&(citizen, service.clone()))
            .is_some_and(|active| active.contains(booking_id))
    }

    /// Records `entry` unless `max` of the citizen's entries for the service count at
    /// `now_unix_s` (their slot has not ended); then returns the first of those.
    pub fn reserve(
        &self,
        citizen: CitizenKey,
        service: &ServiceId,
        entry: Entry,
        (max, now_unix_s): (u32, i64),
    ) -> Result<(), BookingId> {
        let mut shard = self.shard(&citizen);
        match shard.active.get_mut(&(citizen, service.clone())) {
            None if max >= 1 => {
                shard
                    .active
                    .insert((citizen, service.clone()), Active::One(entry));
                Ok(())
            }
            Some(active) if active.counting(now_unix_s).count() < max as usize => {
                active.push(entry);
                Ok(())
            }
            Some(active) => Err(active
                .counting(now_unix_s)
                .next()
                .map_or(entry.id(), Entry::id)),
            None => Err(entry.id()),
        }
    }

    /// Claims an active, unclaimed entry for the write that will end it; true only for
    /// the one caller that claimed it. The entry still counts against the limit.
    pub fn claim(&self, citizen: CitizenKey, service: &ServiceId, booking_id: BookingId) -> bool {
        let mut shard = self.shard(&citizen);
        let active = shard
            .active
            .get(&(citizen, service.clone()))
            .is_some_and(|active| active.contains(booking_id));
        active && !shard.kept.contains(&booking_id) && shard.claimed.insert(booking_id)
    }

    /// Whether a write that ends or changes `booking_id` has claimed it and not settled.
    pub fn is_claimed(&self, citizen: CitizenKey, booking_id: BookingId) -> bool {
        self.shard(&citizen).claimed.contains(&booking_id)
    }

    /// Gives a claim back: the write that would have ended the entry never happened.
    pub fn unclaim(&self, citizen: CitizenKey, booking_id: BookingId) {
        self.shard(&citizen).claimed.remove(&booking_id);
    }

    /// Removes `booking_id` (and its claim); true only for the one caller that removed it.
    pub fn release(&self, citizen: CitizenKey, service: &ServiceId, booking_id: BookingId) -> bool {
        let mut shard = self.shard(&citizen);
        shard.claimed.remove(&booking_id);
        shard.kept.remove(&booking_id);
        let key = (citizen, service.clone());
        let Some(active) = shard.active.get_mut(&key) else {
            return false;
        };
        match active.remove(booking_id) {
            None => false,
            Some(now_empty) => {
                if now_empty {
                    shard.active.remove(&key);
                }
                true
            }
        }
    }

    /// Swaps `old` for `new` in one step, so the citizen is never seen with zero or two
    /// bookings (a reschedule), and claims `old` until the move's write settled
    /// (`unclaim`; `unreplace` if it never happened): a cancel or check-in of `old`
    /// meanwhile waits for the move instead of deciding on a read it is about to change.
    /// False when `old` was not active or was claimed: someone else won it.
    pub fn replace(
        &self,
        citizen: CitizenKey,
        service: &ServiceId,
        old: BookingId,
        new: Entry,
    ) -> bool {
        let mut shard = self.shard(&citizen);
        if shard.claimed.contains(&old) || shard.kept.contains(&old) {
            return false;
        }
        let swapped = shard
            .active
            .get_mut(&(citizen, service.clone()))
            .is_some_and(|active| active.swap(old, new).is_some());
        if swapped {
            shard.claimed.insert(old);
        }
        swapped
    }

    /// Undoes `replace(old, new)` whose write never happened: `old` active again in
    /// `new`'s place, and unclaimed.
    pub fn unreplace(&self, citizen: CitizenKey, service: &ServiceId, old: Entry, new: BookingId) {
        let mut shard = self.shard(&citizen);
        shard.claimed.remove(&old.id());
        if let Some(active) = shard.active.get_mut(&(citizen, service.clone())) {
            active.swap(new, old);
        }
    }

    /// The entry of `booking_id` (a booking checked in before its slot ended at
    /// `end_unix_s`) stays counting against the citizen's limit until then, and its
    /// claim ends: checked in a day early, a citizen could otherwise book again at once,
    /// and again after each early check-in (an outside test).
    pub fn keep_until(
        &self,
        citizen: CitizenKey,
        service: &ServiceId,
        booking_id: BookingId,
        end_unix_s: i64,
    ) {
        {
            let mut shard = self.shard(&citizen);
            shard.claimed.remove(&booking_id);
            shard.kept.insert(booking_id);
        }
        let mut until = self.counted_until.lock().unwrap_or_else(|p| p.into_inner());
        until.insert((end_unix_s, booking_id), (citizen, service.clone()));
    }

    /// Releases the entries kept until a slot end at or before `now_unix_s`; how many.
    pub fn release_ended(&self, now_unix_s: i64) -> usize {
        let ended = {
            let mut until = self.counted_until.lock().unwrap_or_else(|p| p.into_inner());
            match until.keys().next() {
                Some((end, _)) if *end <= now_unix_s => {
                    let later = until.split_off(&(now_unix_s.saturating_add(1), BookingId(0)));
                    std::mem::replace(&mut *until, later)
                }
                _ => return 0,
            }
        };
        for ((_, booking_id), (citizen, service)) in &ended {
            self.release(*citizen, service, *booking_id);
        }
        ended.len()
    }

    /// Recovery only: records an entry without the limit check and returns how many of
    /// the citizen's count at `now_unix_s` (recovery checks the count itself).
    pub fn insert(
        &self,
        citizen: CitizenKey,
        service: &ServiceId,
        entry: Entry,
        now_unix_s: i64,
    ) -> usize {
        let mut shard = self.shard(&citizen);
        let active = (shard.active.entry((citizen, service.clone())))
            .and_modify(|active| active.push(entry))
            .or_insert(Active::One(entry));
        active.counting(now_unix_s).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service() -> ServiceId {
        ServiceId::parse("s", "covid19-dose1", 64).unwrap()
    }

    const NOW: i64 = 0;

    /// An entry whose slot ends long after `NOW`.
    fn e(id: u128) -> Entry {
        Entry::new(BookingId(id), i64::MAX)
    }

    #[test]
    fn limit_holds_and_release_frees_it() {
        let index = CitizenIndex::default();
        let citizen = CitizenKey([7; 16]);
        assert_eq!(index.reserve(citizen, &service(), e(1), (1, NOW)), Ok(()));
        assert_eq!(
            index.reserve(citizen, &service(), e(2), (1, NOW)),
            Err(BookingId(1))
        );
        assert!(index.release(citizen, &service(), BookingId(1)));
        assert!(!index.release(citizen, &service(), BookingId(1)));
        assert_eq!(index.reserve(citizen, &service(), e(2), (1, NOW)), Ok(()));
    }

    #[test]
    fn an_entry_kept_until_its_slot_ends_counts_until_then() {
        let index = CitizenIndex::default();
        let (citizen, other) = (CitizenKey([3; 16]), CitizenKey([4; 16]));
        assert_eq!(index.reserve(citizen, &service(), e(1), (1, NOW)), Ok(()));
        assert_eq!(index.reserve(other, &service(), e(2), (1, NOW)), Ok(()));
        assert!(index.claim(citizen, &service(), BookingId(1)));
        index.keep_until(citizen, &service(), BookingId(1), 1_000);
        index.keep_until(other, &service(), BookingId(2), 2_000);
        assert!(!index.is_claimed(citizen, BookingId(1)), "the claim ends");
        assert!(
            !index.claim(citizen, &service(), BookingId(1)),
            "kept: not claimable"
        );
        assert!(!index.replace(citizen, &service(), BookingId(1), e(9)));
        assert_eq!(index.release_ended(999), 0);
        assert_eq!(
            index.reserve(citizen, &service(), e(3), (1, NOW)),
            Err(BookingId(1)),
            "still counted before its slot ends"
        );
        assert_eq!(index.release_ended(1_000), 1);
        assert_eq!(index.release_ended(1_000), 0, "released once");
        assert_eq!(index.reserve(citizen, &service(), e(3), (1, NOW)), Ok(()));
        assert_eq!(index.active_count(other, &service(), NOW), 1);
        assert_eq!(index.release_ended(5_000), 1);
        assert_eq!(index.active_count(other, &service(), NOW), 0);
    }

    #[test]
    fn higher_limits_hold_several_and_release_each_once() {
        let index = CitizenIndex::default();
        let citizen = CitizenKey([9; 16]);
        for id in 1..=3 {
            assert_eq!(index.reserve(citizen, &service(), e(id), (3, NOW)), Ok(()));
        }
        assert_eq!(
            index.reserve(citizen, &service(), e(4), (3, NOW)),
            Err(BookingId(1))
        );
        assert!(index.release(citizen, &service(), BookingId(2)));
        assert!(!index.release(citizen, &service(), BookingId(2)));
        assert_eq!(index.reserve(citizen, &service(), e(4), (3, NOW)), Ok(()));
        for id in [1, 3, 4] {
            assert!(index.release(citizen, &service(), BookingId(id)));
        }
        assert_eq!(
            index.insert(citizen, &service(), e(5), NOW),
            1,
            "nothing left behind"
        );
    }

    #[test]
    fn a_claim_keeps_counting_and_has_one_winner() {
        let index = CitizenIndex::default();
        let citizen = CitizenKey([5; 16]);
        index.reserve(citizen, &service(), e(1), (1, NOW)).unwrap();
        assert!(index.claim(citizen, &service(), BookingId(1)));
        assert!(!index.claim(citizen, &service(), BookingId(1)));
        assert!(!index.replace(citizen, &service(), BookingId(1), e(9)));
        assert_eq!(
            index.reserve(citizen, &service(), e(2), (1, NOW)),
            Err(BookingId(1)),
            "a claimed entry still counts"
        );
        index.unclaim(citizen, BookingId(1));
        assert!(index.claim(citizen, &service(), BookingId(1)));
        assert!(index.release(citizen, &service(), BookingId(1)));
        assert!(!index.claim(citizen, &service(), BookingId(1)));
        assert_eq!(index.reserve(citizen, &service(), e(2), (1, NOW)), Ok(()));
    }

    #[test]
    fn replace_swaps_in_one_step_and_only_once() {
        let index = CitizenIndex::default();
        let citizen = CitizenKey([3; 16]);
        index.reserve(citizen, &service(), e(1), (1, NOW)).unwrap();
        assert!(index.replace(citizen, &service(), BookingId(1), e(2)));
        assert!(!index.replace(citizen, &service(), BookingId(1), e(3)));
        assert!(
            index.is_claimed(citizen, BookingId(1)),
            "the old booking stays claimed while the move is written"
        );
        assert_eq!(
            index.reserve(citizen, &service(), e(4), (1, NOW)),
            Err(BookingId(2))
        );
        index.unclaim(citizen, BookingId(1));
        assert!(index.release(citizen, &service(), BookingId(2)));
    }

    #[test]
    fn unreplace_puts_the_old_booking_back_unclaimed() {
        let index = CitizenIndex::default();
        let citizen = CitizenKey([4; 16]);
        index.reserve(citizen, &service(), e(1), (1, NOW)).unwrap();
        assert!(index.replace(citizen, &service(), BookingId(1), e(2)));
        index.unreplace(citizen, &service(), e(1), BookingId(2));
        assert!(!index.is_claimed(citizen, BookingId(1)));
        assert!(index.is_active(citizen, &service(), BookingId(1)));
        assert!(!index.is_active(citizen, &service(), BookingId(2)));
    }

    #[test]
    fn other_services_and_citizens_are_independent() {
        let index = CitizenIndex::default();
        let other = ServiceId::parse("s", "identity-card", 64).unwrap();
        assert!(index
            .reserve(CitizenKey([1; 16]), &service(), e(1), (1, NOW))
            .is_ok());
        assert!(index
            .reserve(CitizenKey([1; 16]), &other, e(2), (1, NOW))
            .is_ok());
        assert!(index
            .reserve(CitizenKey([2; 16]), &service(), e(3), (1, NOW))
            .is_ok());
    }

    /// An appointment that is over (its slot ended, checked in or not) no longer counts:
    /// the citizen may book the service again, and the ended entry stays (a no-show or
    /// retention ends it) without counting.
    #[test]
    fn an_entry_whose_slot_ended_no_longer_counts() {
        let index = CitizenIndex::default();
        let citizen = CitizenKey([6; 16]);
        let ending = |id, until_unix_s| Entry::new(BookingId(id), until_unix_s);
        assert_eq!(
            index.reserve(citizen, &service(), ending(1, 1_000), (1, 500)),
            Ok(())
        );
        assert_eq!(
            index.reserve(citizen, &service(), ending(2, 2_000), (1, 999)),
            Err(BookingId(1))
        );
        assert_eq!(
            index.reserve(citizen, &service(), ending(2, 2_000), (1, 1_000)),
            Ok(())
        );
        assert_eq!(index.active_count(citizen, &service(), 1_000), 1);
        assert!(
            index.is_active(citizen, &service(), BookingId(1)),
            "still there"
        );
        assert_eq!(
            index.reserve(citizen, &service(), ending(3, 3_000), (1, 1_500)),
            Err(BookingId(2)),
            "the first that counts is named"
        );
        assert_eq!(index.insert(citizen, &service(), ending(4, 900), 1_000), 1);
        assert!(
            index.claim(citizen, &service(), BookingId(1)),
            "an ended entry may be claimed"
        );
        let far = Entry::new(BookingId(u128::MAX - 5), -7);
        assert_eq!((far.id(), far.until_unix_s), (BookingId(u128::MAX - 5), -7));
        assert!(std::mem::size_of::<Active>() <= 32, "as with one u128 id");
    }
}

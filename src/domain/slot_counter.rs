//! A slot's capacity, taken places, writes in flight and flags in one atomic word:
//! admission is a compare-and-swap, never a lock.
//!
//! Packing everything into one `AtomicU64` means a capacity change, a closure and an
//! admission can never interleave into an overbooking: each CAS sees all fields at once.
//!
//! Layout, low to high: taken (21 bits), pending (19 bits), capacity (21 bits), then
//! three flags: left its group, changed, closed.
//! `pending` counts admissions whose write is not yet settled (committed or refused):
//! a closure first closes the slot, then waits for `pending` to reach 0, and only then
//! reads the store, so no booking can land in a closed slot behind its back.
//!
//! A counter belongs to a group (in the catalog, one service's slots on one local day of
//! a site): every change adds its difference in `remaining()` to the group's sum, so a
//! search reads a day's free places in one load and skips sold-out days without visiting
//! their slots. The sum trails the members by the changes in flight, never for longer.
//!
//! Every change a client could see (capacity, taken, closed) tells its group, and,
//! while someone watches the group, sets the word's `changed` flag first: that is the
//! one change notification `WatchAvailability` is built on (no poll of the catalog).
//! Changes while nobody watches set no flag, so a day's first change once watched is
//! not taken for news of every slot changed since it was published.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

const FIELD_BITS: u32 = 21;
const FIELD_MASK: u64 = (1 << FIELD_BITS) - 1;
/// Largest capacity, and largest number of places taken.
pub const COUNTER_FIELD_MAX: u32 = FIELD_MASK as u32;
const PENDING_BITS: u32 = 19;
const PENDING_MASK: u64 = (1 << PENDING_BITS) - 1;
/// Most admissions in flight on one slot at once (far beyond any in-flight limit).
pub const PENDING_MAX: u32 = PENDING_MASK as u32;
const PENDING_SHIFT: u32 = FIELD_BITS;
const CAPACITY_SHIFT: u32 = FIELD_BITS + PENDING_BITS;
/// Set once the counter left its group: its changes no longer count there.
const LEFT_BIT: u64 = 1 << 61;
/// Set by every visible change while watched; cleared by whoever reports it
/// (`take_changed`).
const CHANGED_BIT: u64 = 1 << 62;
const CLOSED_BIT: u64 = 1 << 63;
const _: () = assert!(
    CAPACITY_SHIFT + FIELD_BITS == 61,
    "the fields end where the flags begin"
);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CounterSnapshot {
    pub capacity: u32,
    /// Bookings plus live holds.
    pub taken: u32,
    /// Admissions whose write has not settled yet.
    pub pending: u32,
    /// Closed by an authority: admits nothing until a capacity is set again.
    pub closed: bool,
}

impl CounterSnapshot {
    pub fn remaining(self) -> u32 {
        if self.closed {
            0
        } else {
            self.capacity.saturating_sub(self.taken)
        }
    }
}

/// What a counter tells the group it belongs to (one service's slots on one local day
/// of a site, in the catalog).
pub trait Group: Send + Sync + std::fmt::Debug {
    /// The group's free places changed by `change`.
    fn add_free(&self, change: i64);
    /// A member's capacity, taken places or closed flag changed: if that is news to
    /// someone (a watcher), `flag` marks the member changed before the group is told.
    fn member_changed(&self, flag: &dyn Fn());
}

/// A bare sum of free places (tests): every change is news.
impl Group for AtomicI64 {
    fn add_free(&self, change: i64) {
        self.fetch_add(change, Ordering::AcqRel);
    }

    fn member_changed(&self, flag: &dyn Fn()) {
        flag();
    }
}

impl<T: Group + ?Sized> Group for Arc<T> {
    fn add_free(&self, change: i64) {
        (**self).add_free(change);
    }

    fn member_changed(&self, flag: &dyn Fn()) {
        (**self).member_changed(flag);
    }
}

/// No group: a counter on its own (tests, benches); nobody watches it, so no change is
/// news (as in an unwatched catalog day).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoGroup;

impl Group for NoGroup {
    fn add_free(&self, _: i64) {}

    fn member_changed(&self, _: &dyn Fn()) {}
}

/// One slot's counter word and the group its changes count in. With an `Arc` group it
/// is 16 bytes: the catalog keeps one per slot.
#[derive(Debug)]
pub struct SlotCounter<G: Group = NoGroup> {
    word: AtomicU64,
    group: G,
}

/// Why a place could not be taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    Full,
    Closed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BelowTaken {
    pub taken: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NothingTaken;

/// Too many places or writes at once for the counter's fields (a bug or a corrupt store).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overflow;

/// The fields of a snapshot; the flags `left` and `changed` are the caller's to add.
fn pack(s: CounterSnapshot) -> u64 {
    debug_assert!(s.capacity <= COUNTER_FIELD_MAX && s.taken <= COUNTER_FIELD_MAX);
    debug_assert!(s.pending <= PENDING_MAX);
    (if s.closed { CLOSED_BIT } else { 0 })
        | (u64::from(s.capacity) & FIELD_MASK) << CAPACITY_SHIFT
        | (u64::from(s.pending) & PENDING_MASK) << PENDING_SHIFT
        | (u64::from(s.taken) & FIELD_MASK)
}

fn unpack(word: u64) -> CounterSnapshot {
    CounterSnapshot {
        capacity: ((word >> CAPACITY_SHIFT) & FIELD_MASK) as u32,
        pending: ((word >> PENDING_SHIFT) & PENDING_MASK) as u32,
        taken: (word & FIELD_MASK) as u32,
        closed: word & CLOSED_BIT != 0,
    }
}

impl SlotCounter<NoGroup> {
    /// A counter in no group.
    pub fn new(capacity: u32, closed: bool) -> Self {
        Self::in_group(capacity, closed, NoGroup)
    }
}

impl<G: Group> SlotCounter<G> {
    /// A counter that belongs to `group` from the start: its free places are added to
    /// the group's sum, and every later change until it leaves. A new counter starts
    /// changed if someone watches its group: it is news to a watcher.
    pub fn in_group(capacity: u32, closed: bool, group: G) -> Self {
        let snapshot = CounterSnapshot {
            capacity: capacity.min(COUNTER_FIELD_MAX),
            taken: 0,
            pending: 0,
            closed,
        };
        group.add_free(i64::from(snapshot.remaining()));
        let news = std::cell::Cell::new(false);
        group.member_changed(&|| news.set(true));
        let flag = if news.get() { CHANGED_BIT } else { 0 };
        Self {
            word: AtomicU64::new(pack(snapshot) | flag),
            group,
        }
    }

    pub fn group(&self) -> &G {
        &self.group
    }

    /// Whether a visible change happened since the last call (and clears the flag).
    /// Read first: clearing writes the word, which would make an admission's CAS retry.
    pub fn take_changed(&self) -> bool {
        self.word.load(Ordering::SeqCst) & CHANGED_BIT != 0
            && self.word.fetch_and(!CHANGED_BIT, Ordering::SeqCst) & CHANGED_BIT != 0
    }

    /// Marks the slot changed for watchers though its counter did not move: what callers
    /// are shown of it changed around it (a release now covers it).
    pub fn mark_shown_changed(&self) {
        if self.word.load(Ordering::SeqCst) & LEFT_BIT == 0 {
            self.group.member_changed(&|| self.flag_changed());
        }
    }

    /// Sets the `changed` flag (after the change it flags: a watcher registering in
    /// between reads the changed value in its first snapshot). Read first: a flag still
    /// set is not written again (a write would make concurrent admissions' CAS retry);
    /// the fan-out reads a slot's values after clearing its flag, so it sends this
    /// change with the earlier one.
    fn flag_changed(&self) {
        if self.word.load(Ordering::SeqCst) & CHANGED_BIT == 0 {
            self.word.fetch_or(CHANGED_BIT, Ordering::SeqCst);
        }
    }

    /// Leaves the sum of its group (a slot removed from the catalog, long after it
    /// ended): subtracts its free places, and later changes no longer count there. The
    /// flag is in the word, so a change racing the removal counts on exactly one side.
    pub fn leave(&self) {
        let before = self.word.fetch_or(LEFT_BIT, Ordering::SeqCst);
        if before & LEFT_BIT == 0 {
            self.group.add_free(-i64::from(unpack(before).remaining()));
        }
    }

    pub fn snapshot(&self) -> CounterSnapshot {
        unpack(self.word.load(Ordering::SeqCst))
    }

    /// The one CAS loop: applies `change` to the current value until no other thread
    /// changed it in between. Returns the value it stored.
    fn update<E>(
        &self,
        change: impl Fn(CounterSnapshot) -> Result<CounterSnapshot, E>,
    ) -> Result<CounterSnapshot, E> {
        let mut current = self.word.load(Ordering::SeqCst);
        loop {
            let (before, next) = (unpack(current), change(unpack(current))?);
            let visible = (before.capacity, before.taken, before.closed)
                != (next.capacity, next.taken, next.closed);
            let flags = current & (LEFT_BIT | CHANGED_BIT);
            match self.word.compare_exchange_weak(
                current,
                pack(next) | flags,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => {
                    if visible && current & LEFT_BIT == 0 {
                        self.count_in_group(before, next);
                    }
                    return Ok(next);
                }
                Err(observed) => current = observed,
            }
        }
    }

    fn count_in_group(&self, before: CounterSnapshot, after: CounterSnapshot) {
        let change = i64::from(after.remaining()) - i64::from(before.remaining());
        if change != 0 {
            self.group.add_free(change);
        }
        self.group.member_changed(&|| self.flag_changed());
    }
    /// Takes one place if the slot is open and has one free, counting the admission as
    /// pending until `settle`. The place stays taken after that; `release` returns it.
    /// (`catalog::Admission` pairs the two.)
    pub fn try_take(&self) -> Result<CounterSnapshot, Refused> {
        self.try_take_leaving(|_| 0)
    }

    /// `try_take`, leaving `held_back(capacity)` free places untaken (channel reserves
    /// the taker may not use, as a share of the capacity the CAS sees): refused as full
    /// unless taken + 1 + held_back ≤ capacity.
    pub fn try_take_leaving(
        &self,
        held_back: impl Fn(u32) -> u32,
    ) -> Result<CounterSnapshot, Refused> {
        self.update(|now| {
            if now.closed {
                return Err(Refused::Closed);
            }
            let room = now.capacity.saturating_sub(held_back(now.capacity));
            if now.taken >= room || now.pending >= PENDING_MAX {
                return Err(Refused::Full);
            }
            Ok(CounterSnapshot {
                taken: now.taken + 1,
                pending: now.pending + 1,
                ..now
            })
        })
    }

    /// Announces a write into this slot that takes no new place (a hold being
    /// confirmed), pending until `settle`: refused once the slot is closed.
    pub fn enter(&self) -> Result<CounterSnapshot, Refused> {
        self.update(|now| {
            if now.closed {
                return Err(Refused::Closed);
            }
            if now.pending >= PENDING_MAX {
                return Err(Refused::Full);
            }
            Ok(CounterSnapshot {
                pending: now.pending + 1,
                ..now
            })
        })
    }

    /// An admission's write is done (whatever its outcome).
    pub fn settle(&self) {
        let _ = self.update(|now| {
            Ok::<_, ()>(CounterSnapshot {
                pending: now.pending.saturating_sub(1),
                ..now
            })
        });
    }

    /// Returns one place; returns the counter after. Returning more than was taken is a
    /// bug: it would let the slot overbook later, so it is refused instead of wrapping.
    pub fn release(&self) -> Result<CounterSnapshot, NothingTaken> {
        self.update(|now| match now.taken.checked_sub(1) {
            Some(taken) => Ok(CounterSnapshot { taken, ..now }),
            None => Err(NothingTaken),
        })
    }

    /// Sets the capacity and opens the slot, refusing to go below what is taken.
    pub fn set_capacity(&self, capacity: u32) -> Result<CounterSnapshot, BelowTaken> {
        self.update(|now| {
            if capacity < now.taken || capacity > COUNTER_FIELD_MAX {
                return Err(BelowTaken { taken: now.taken });
            }
            Ok(CounterSnapshot {
                capacity,
                closed: false,
                ..now
            })
        })
    }

    /// Closes the slot: from now on nothing is admitted. Returns the counter before.
    pub fn close(&self) -> CounterSnapshot {
        let before = self.snapshot();
        let _ = self.update(|now| {
            Ok::<_, ()>(CounterSnapshot {
                closed: true,
                ..now
            })
        });
        before
    }

    /// Undoes `close` for a closure that never reached the store.
    pub fn reopen(&self) {
        let _ = self.update(|now| {
            Ok::<_, ()>(CounterSnapshot {
                closed: false,
                ..now
            })
        });
    }

    /// Recovery only: counts a stored booking or hold without the capacity check, so
    /// that a store that is already over capacity is detected rather than hidden.
    pub fn take_unchecked(&self) -> Result<CounterSnapshot, Overflow> {
        self.update(|now| {
            if now.taken >= COUNTER_FIELD_MAX {
                return Err(Overflow);
            }
            Ok(CounterSnapshot {
                taken: now.taken + 1,
                ..now
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes a place and settles the admission at once.
    fn take<G: Group>(counter: &SlotCounter<G>) -> Result<CounterSnapshot, Refused> {
        let taken = counter.try_take()?;
        counter.settle();
        Ok(taken)
    }

    #[test]
    fn takes_up_to_capacity_then_refuses() {
        let counter = SlotCounter::new(2, false);
        assert_eq!(take(&counter).map(|s| s.taken), Ok(1));
        assert_eq!(take(&counter).map(|s| s.taken), Ok(2));
        assert_eq!(take(&counter), Err(Refused::Full));
        assert_eq!(counter.release().map(|s| s.taken), Ok(1));
        assert_eq!(take(&counter).map(|s| s.remaining()), Ok(0));
        assert_eq!(counter.snapshot().pending, 0);
    }

    #[test]
    fn pending_counts_unsettled_admissions() {
        let counter = SlotCounter::new(5, false);
        counter.try_take().unwrap();
        counter.enter().unwrap();
        assert_eq!(counter.snapshot().pending, 2);
        counter.settle();
        counter.settle();
        let after = counter.snapshot();
        assert_eq!((after.pending, after.taken), (0, 1));
    }

    #[test]
    fn a_closed_slot_admits_nothing_until_a_capacity_is_set() {
        let counter = SlotCounter::new(3, false);
        take(&counter).unwrap();
        let before = counter.close();
        assert!(!before.closed);
        assert_eq!(take(&counter), Err(Refused::Closed));
        assert_eq!(counter.enter(), Err(Refused::Closed));
        assert_eq!(counter.snapshot().remaining(), 0);
        assert_eq!(counter.release().map(|s| s.taken), Ok(0));
        assert!(counter.set_capacity(1).is_ok());
        assert!(take(&counter).is_ok());
    }

    #[test]
    fn release_never_goes_below_zero() {
        let counter = SlotCounter::new(1, false);
        assert_eq!(counter.release(), Err(NothingTaken));
        assert_eq!(counter.snapshot().taken, 0);
    }

    #[test]
    fn capacity_never_drops_below_taken() {
        let counter = SlotCounter::new(3, false);
        take(&counter).unwrap();
        take(&counter).unwrap();
        assert_eq!(counter.set_capacity(1), Err(BelowTaken { taken: 2 }));
        assert!(counter.set_capacity(2).is_ok());
        assert_eq!(take(&counter), Err(Refused::Full));
        assert!(counter.set_capacity(COUNTER_FIELD_MAX).is_ok());
        assert!(counter.set_capacity(COUNTER_FIELD_MAX + 1).is_err());
        assert_eq!(counter.snapshot().taken, 2);
    }

    #[test]
    fn fields_do_not_bleed_into_each_other() {
        let counter = SlotCounter::new(COUNTER_FIELD_MAX, true);
        let s = counter.snapshot();
        assert_eq!(
            (s.capacity, s.taken, s.pending, s.closed),
            (COUNTER_FIELD_MAX, 0, 0, true)
        );
        counter.reopen();
        for _ in 0..3 {
            counter.take_unchecked().unwrap();
        }
        let s = counter.snapshot();
        assert_eq!(
            (s.capacity, s.taken, s.pending, s.closed),
            (COUNTER_FIELD_MAX, 3, 0, false)
        );
    }

    #[test]
    fn pending_fills_its_field_without_touching_the_others() {
        // In a group to which every change is news.
        let counter = SlotCounter::in_group(COUNTER_FIELD_MAX, false, AtomicI64::new(0));
        take(&counter).unwrap();
        assert!(counter.take_changed());
        for _ in 0..PENDING_MAX {
            counter.enter().unwrap();
        }
        assert_eq!(counter.enter(), Err(Refused::Full));
        assert_eq!(counter.try_take(), Err(Refused::Full));
        let s = counter.snapshot();
        assert_eq!(
            (s.capacity, s.taken, s.pending, s.closed),
            (COUNTER_FIELD_MAX, 1, PENDING_MAX, false)
        );
        assert!(
            !counter.take_changed(),
            "pending alone is not a visible change"
        );
        counter.close();
        assert!(counter.take_changed());
        assert_eq!(counter.snapshot().pending, PENDING_MAX);
    }

    #[test]
    fn a_group_counts_the_changes_until_the_counter_leaves() {
        let group = Arc::new(AtomicI64::new(0));
        let counter = SlotCounter::in_group(3, false, Arc::clone(&group));
        let free = || group.load(Ordering::SeqCst);
        assert_eq!(free(), 3);
        assert!(counter.take_changed(), "a new counter is news");
        assert!(!counter.take_changed());
        take(&counter).unwrap();
        assert_eq!(free(), 2);
        assert!(counter.take_changed());
        counter.close();
        assert_eq!(free(), 0);
        counter.reopen();
        assert_eq!(free(), 2);
        assert!(counter.take_changed());
        counter.leave();
        assert_eq!(free(), 0);
        counter.release().unwrap();
        counter.leave();
        assert_eq!(free(), 0, "changes after leaving count nowhere");
        assert!(!counter.take_changed(), "and are news to nobody");
        assert_eq!(counter.snapshot().taken, 0);
    }

    #[test]
    fn racing_threads_never_overbook() {
        let counter = Arc::new(SlotCounter::new(1_000, false));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let counter = Arc::clone(&counter);
                std::thread::spawn(move || (0..10_000).filter(|_| take(&counter).is_ok()).count())
            })
            .collect();
        let admitted: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(admitted, 1_000);
        let s = counter.snapshot();
        assert_eq!((s.taken, s.pending), (1_000, 0));
    }
}

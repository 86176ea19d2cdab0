//! A slot's capacity, taken places, writes in flight and closed flag in one atomic
//! word: admission is a compare-and-swap, never a lock.
//!
//! Packing everything into one `AtomicU64` means a capacity change, a closure and an
//! admission can never interleave into an overbooking: each CAS sees all fields at once.
//!
//! Layout, low to high: taken (21 bits), pending (21 bits), capacity (21 bits), closed (1 bit).
//! `pending` counts admissions whose write is not yet settled (committed or refused):
//! a closure first closes the slot, then waits for `pending` to reach 0, and only then
//! reads the store, so no booking can land in a closed slot behind its back.
//!
//! A counter may belong to a group (one service's slots on one local day of a site):
//! every change adds its difference in `remaining()` to the group's sum, so a search
//! reads a day's free places in one load and skips sold-out days without visiting their
//! slots. The sum trails the members by the changes in flight, never for longer.
//!
//! Every change a client could see (capacity, taken, closed) also sets the counter's
//! `changed` flag and tells its group: that is the one change notification
//! `WatchAvailability` is built on (no poll of the catalog).

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

const FIELD_BITS: u32 = 21;
const FIELD_MASK: u64 = (1 << FIELD_BITS) - 1;
/// Largest value of each field: capacity, taken and pending.
pub const COUNTER_FIELD_MAX: u32 = FIELD_MASK as u32;
const CLOSED_BIT: u64 = 1 << 63;

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

/// What a counter tells the group it joined (one service's slots on one local day of
/// a site, in the catalog).
pub trait Group: Send + Sync + std::fmt::Debug {
    /// The group's free places changed by `change`.
    fn add_free(&self, change: i64);
    /// A member's capacity, taken places or closed flag changed.
    fn member_changed(&self);
}

/// A bare sum of free places (tests, and groups nobody watches).
impl Group for AtomicI64 {
    fn add_free(&self, change: i64) {
        self.fetch_add(change, Ordering::AcqRel);
    }

    fn member_changed(&self) {}
}

#[derive(Debug)]
pub struct SlotCounter {
    word: AtomicU64,
    /// The counter's group, once it joined one.
    group: OnceLock<Arc<dyn Group>>,
    /// Set when it left its group: its changes no longer count there.
    left: AtomicBool,
    /// Set by every visible change; cleared by whoever reports it (`take_changed`). A
    /// new counter starts changed: it is news to a watcher.
    changed: AtomicBool,
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

fn pack(s: CounterSnapshot) -> u64 {
    debug_assert!(s.capacity <= COUNTER_FIELD_MAX && s.taken <= COUNTER_FIELD_MAX);
    (if s.closed { CLOSED_BIT } else { 0 })
        | (u64::from(s.capacity) & FIELD_MASK) << (2 * FIELD_BITS)
        | (u64::from(s.pending) & FIELD_MASK) << FIELD_BITS
        | (u64::from(s.taken) & FIELD_MASK)
}

fn unpack(word: u64) -> CounterSnapshot {
    CounterSnapshot {
        capacity: ((word >> (2 * FIELD_BITS)) & FIELD_MASK) as u32,
        pending: ((word >> FIELD_BITS) & FIELD_MASK) as u32,
        taken: (word & FIELD_MASK) as u32,
        closed: word & CLOSED_BIT != 0,
    }
}

impl SlotCounter {
    pub fn new(capacity: u32, closed: bool) -> Self {
        Self {
            word: AtomicU64::new(pack(CounterSnapshot {
                capacity: capacity.min(COUNTER_FIELD_MAX),
                taken: 0,
                pending: 0,
                closed,
            })),
            group: OnceLock::new(),
            left: AtomicBool::new(false),
            changed: AtomicBool::new(true),
        }
    }

    /// Whether a visible change happened since the last call (and clears the flag).
    pub fn take_changed(&self) -> bool {
        self.changed.swap(false, Ordering::SeqCst)
    }

    /// Joins a group: adds its free places to the group's sum, and every later change.
    /// Once only, before the counter is shared (the catalog does it on insert).
    pub fn join(&self, group: Arc<dyn Group>) {
        group.add_free(i64::from(self.snapshot().remaining()));
        group.member_changed();
        assert!(self.group.set(group).is_ok(), "a counter joins one group");
    }

    /// Leaves the sum of its group (a slot removed from the catalog, long after it
    /// ended): subtracts its free places, and later changes no longer count there. A
    /// change racing the removal itself could leave the sum off by one; retention only
    /// removes slots nothing books any more.
    pub fn leave(&self) {
        if self.left.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(group) = self.group.get() {
            group.add_free(-i64::from(self.snapshot().remaining()));
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
            let next = change(unpack(current))?;
            match self.word.compare_exchange_weak(
                current,
                pack(next),
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => {
                    self.count_in_group(unpack(current), next);
                    return Ok(next);
                }
                Err(observed) => current = observed,
            }
        }
    }

    fn count_in_group(&self, before: CounterSnapshot, after: CounterSnapshot) {
        let visible = (before.capacity, before.taken, before.closed)
            != (after.capacity, after.taken, after.closed);
        if !visible {
            return; // only `pending` moved
        }
        self.changed.store(true, Ordering::SeqCst);
        let Some(group) = self
            .group
            .get()
            .filter(|_| !self.left.load(Ordering::Acquire))
        else {
            return;
        };
        let change = i64::from(after.remaining()) - i64::from(before.remaining());
        if change != 0 {
            group.add_free(change);
        }
        group.member_changed();
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
            if now.taken >= room || now.pending >= COUNTER_FIELD_MAX {
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
            if now.pending >= COUNTER_FIELD_MAX {
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
    use std::sync::Arc;

    /// Takes a place and settles the admission at once.
    fn take(counter: &SlotCounter) -> Result<CounterSnapshot, Refused> {
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

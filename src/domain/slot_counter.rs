//! A slot's capacity and taken places in one atomic word: admission is a
//! compare-and-swap, never a lock.
//!
//! Packing both halves into one `AtomicU64` means a capacity change and an admission
//! can never interleave into an overbooking: each CAS sees both numbers at once.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CounterSnapshot {
    pub capacity: u32,
    /// Bookings plus live holds.
    pub taken: u32,
}

impl CounterSnapshot {
    pub fn remaining(self) -> u32 {
        self.capacity.saturating_sub(self.taken)
    }
}

#[derive(Debug)]
pub struct SlotCounter {
    /// High 32 bits: capacity. Low 32 bits: taken.
    word: AtomicU64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotFull;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BelowTaken {
    pub taken: u32,
}

fn pack(capacity: u32, taken: u32) -> u64 {
    (u64::from(capacity) << 32) | u64::from(taken)
}

fn unpack(word: u64) -> CounterSnapshot {
    CounterSnapshot {
        capacity: (word >> 32) as u32,
        taken: word as u32,
    }
}

impl SlotCounter {
    pub fn new(capacity: u32) -> Self {
        Self {
            word: AtomicU64::new(pack(capacity, 0)),
        }
    }

    pub fn snapshot(&self) -> CounterSnapshot {
        unpack(self.word.load(Ordering::Acquire))
    }

    /// The one CAS loop: applies `change` to the current value until no other thread
    /// changed it in between. Returns the value it stored.
    fn update<E>(
        &self,
        change: impl Fn(CounterSnapshot) -> Result<CounterSnapshot, E>,
    ) -> Result<CounterSnapshot, E> {
        let mut current = self.word.load(Ordering::Acquire);
        loop {
            let next = change(unpack(current))?;
            match self.word.compare_exchange_weak(
                current,
                pack(next.capacity, next.taken),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(next),
                Err(observed) => current = observed,
            }
        }
    }

    /// Takes one place if one is free; returns the counter after.
    pub fn try_take(&self) -> Result<CounterSnapshot, SlotFull> {
        self.update(|now| {
            if now.taken >= now.capacity {
                return Err(SlotFull);
            }
            Ok(CounterSnapshot {
                taken: now.taken + 1,
                ..now
            })
        })
    }

    /// Returns one place; returns the counter after. Returning more than was taken is a
    /// bug: it would let the slot overbook later, so it is refused instead of wrapping.
    pub fn release(&self) -> Result<CounterSnapshot, NothingTaken> {
        self.update(|now| match now.taken.checked_sub(1) {
            Some(taken) => Ok(CounterSnapshot { taken, ..now }),
            None => Err(NothingTaken),
        })
    }

    /// Sets the capacity, refusing to go below what is taken; returns the counter after.
    pub fn set_capacity(&self, capacity: u32) -> Result<CounterSnapshot, BelowTaken> {
        self.update(|now| {
            if capacity < now.taken {
                return Err(BelowTaken { taken: now.taken });
            }
            Ok(CounterSnapshot { capacity, ..now })
        })
    }

    /// Recovery only: counts a stored booking without the capacity check, so that a
    /// store that is already over capacity is detected rather than hidden.
    pub fn take_unchecked(&self) -> CounterSnapshot {
        unpack(self.word.fetch_add(1, Ordering::AcqRel) + 1)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NothingTaken;

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn takes_up_to_capacity_then_refuses() {
        let counter = SlotCounter::new(2);
        assert_eq!(counter.try_take().map(|s| s.taken), Ok(1));
        assert_eq!(counter.try_take().map(|s| s.taken), Ok(2));
        assert_eq!(counter.try_take(), Err(SlotFull));
        assert_eq!(counter.release().map(|s| s.taken), Ok(1));
        assert_eq!(counter.try_take().map(|s| s.remaining()), Ok(0));
    }

    #[test]
    fn release_never_goes_below_zero() {
        let counter = SlotCounter::new(1);
        assert_eq!(counter.release(), Err(NothingTaken));
        assert_eq!(counter.snapshot().taken, 0);
    }

    #[test]
    fn capacity_never_drops_below_taken() {
        let counter = SlotCounter::new(3);
        counter.try_take().unwrap();
        counter.try_take().unwrap();
        assert_eq!(counter.set_capacity(1), Err(BelowTaken { taken: 2 }));
        assert!(counter.set_capacity(2).is_ok());
        assert_eq!(counter.try_take(), Err(SlotFull));
        assert!(counter.set_capacity(u32::MAX - 1).is_ok());
        assert_eq!(counter.snapshot().taken, 2);
    }

    #[test]
    fn racing_threads_never_overbook() {
        let counter = Arc::new(SlotCounter::new(1_000));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let counter = Arc::clone(&counter);
                std::thread::spawn(move || {
                    (0..10_000).filter(|_| counter.try_take().is_ok()).count()
                })
            })
            .collect();
        let admitted: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(admitted, 1_000);
        assert_eq!(counter.snapshot().taken, 1_000);
    }
}

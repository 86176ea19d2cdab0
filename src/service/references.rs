//! Booking references and check-in codes: minted at random, a reference checked unique
//! against every reference in use.
//!
//! References in use are those of stored bookings (the store's in-memory index by
//! reference, `store::booking_index`: rebuilt by recovery, which refuses a store where
//! two bookings share one; left when retention deletes their booking) and those of
//! bookings being written, kept here until their write is settled. A draw is kept only
//! if it is in neither and enters the second, checked under one lock, so two bookings
//! never share one, even when two requests draw the same bits at once; a written
//! booking is in the index before its reference leaves the set here. Collisions are
//! counted and drawn again, never assumed away (40 bits: one draw in ~27,000 collides at
//! 40M bookings). Asking sled instead (`contains_key`) halved the engine's booking rate;
//! a set here of every stored reference as well as the index cost 16 bytes per booking
//! and a tenth of a recovery.

use foldhash::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use crate::domain::booking::{BookingCodes, Reference};
use crate::service::error::ServiceError;

/// How often, at most, references quiet for `CodeLimits::forget_after` are forgotten
/// (bounds the memory wrong codes take; the pass is linear in them).
const WRONG_CODES_PRUNE_EVERY_MS: i64 = 60_000;

/// A reference's lock doubles at most this many times (2^20 locks: years).
const LOCK_DOUBLINGS_MAX: u32 = 20;

/// Draws before giving up (the request may be retried): reaching it means the space is
/// nearly full, or the random source is broken.
const MINT_TRIES: usize = 64;

#[derive(Default)]
pub struct References {
    /// References of bookings being written, and of those whose write may or may not
    /// have happened (a failed commit: the next start finds them, if stored).
    in_flight: Mutex<HashSet<Reference>>,
    /// Wrong check-in codes per reference, and when its lock (if any) ends.
    wrong_codes: Mutex<WrongCodeBook>,
}

#[derive(Debug, Default)]
struct WrongCodeBook {
    by_reference: HashMap<Reference, WrongCodes>,
    pruned_at_ms: i64,
}

#[derive(Clone, Copy, Debug, Default)]
struct WrongCodes {
    count: u32,
    /// Locks so far: each lasts twice as long as the one before.
    locks: u32,
    locked_until_ms: i64,
    last_try_ms: i64,
}

/// The check-in limits `References::try_code` applies.
#[derive(Clone, Copy, Debug)]
pub struct CodeLimits {
    /// Wrong codes in a row that lock a reference.
    pub tries_max: u32,
    /// The first lock; each further one lasts twice the one before.
    pub lock: Duration,
    /// A reference with no try for this long is forgotten (its window is long over).
    pub forget_after: Duration,
}

/// A reference taken for a booking being written. Dropped without [`Minted::settle`]
/// (the booking was refused before its write, or its request was cancelled), it is
/// given back: a write that was sent is already in the store's index, entered in the
/// same step as the send.
pub struct Minted<'a> {
    references: &'a References,
    pub codes: BookingCodes,
    /// Whether it stays in the set of references being written.
    kept: bool,
}

impl Minted<'_> {
    /// After the booking's write: done (the store's index has the booking since the
    /// write was sent), refused or never queued (nothing written), it leaves the set of
    /// references being written; after any other error (maybe written) it stays there:
    /// a reference kept for nothing costs a few bytes, one shared would be a bug.
    pub fn settle<T>(mut self, outcome: &Result<T, ServiceError>) {
        self.kept = match outcome {
            // Refused by the domain, or before its write (another write overtook the
            // plan's read; a wait that ran out).
            Ok(_)
            | Err(
                ServiceError::Domain(_)
                | ServiceError::Overtaken { .. }
                | ServiceError::NeighbourClosing(_)
                | ServiceError::Busy(_),
            ) => false,
            Err(ServiceError::Store(error)) => !error.never_written(),
            Err(_) => true,
        };
    }
}

impl Drop for Minted<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.references
                .lock_in_flight()
                .remove(&self.codes.reference);
        }
    }
}

impl References {
    fn lock_in_flight(&self) -> std::sync::MutexGuard<'_, HashSet<Reference>> {
        // One set operation per critical section: a poisoned set is still consistent.
        self.in_flight
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// New codes for a booking: a random reference no other booking has (`stored`: is
    /// a stored booking's), and a random check-in code.
    pub fn mint(&self, stored: impl Fn(Reference) -> bool) -> Result<Minted<'_>, ServiceError> {
        self.mint_with(rand::random::<u64>, stored)
    }

    /// [`References::mint`] with its random source given (tests force collisions).
    pub fn mint_with(
        &self,
        mut draw: impl FnMut() -> u64,
        stored: impl Fn(Reference) -> bool,
    ) -> Result<Minted<'_>, ServiceError> {
        for _ in 0..MINT_TRIES {
            let reference = Reference::from_bits(draw());
            // Checked and entered under the lock: a write's reference leaves this set
            // (under it) only once its booking is in `stored`, so no draw finds it in
            // neither.
            let mut in_flight = self.lock_in_flight();
            if stored(reference) || !in_flight.insert(reference) {
                drop(in_flight);
                metrics::counter!(crate::telemetry::REFERENCE_COLLISIONS).increment(1);
                continue;
            }
            drop(in_flight);
            return Ok(Minted {
                references: self,
                codes: BookingCodes {
                    reference,
                    check_in_code: check_in_code(draw()),
                },
                kept: false,
            });
        }
        Err(ServiceError::Busy(
            "no free booking reference was found: retry the request",
        ))
    }

    /// References of bookings being written (or maybe written).
    pub fn in_flight(&self) -> usize {
        self.lock_in_flight().len()
    }

    /// Counts one check-in try of `reference` (`wrong`: its code was wrong), under one
    /// lock so parallel tries cannot pass the limit: `Err(Some(retry after))` while the
    /// reference is locked (whatever the code), `Err(None)` for a wrong code (the
    /// `tries_max`-th in a row locks it for `lock`, doubled for every lock before), `Ok`
    /// for the right one (its wrong tries are forgotten). The doubling bounds a guesser
    /// over a whole check-in window to a few dozen tries of 10,000 codes.
    pub fn try_code(
        &self,
        reference: Reference,
        wrong: bool,
        now_ms: i64,
        limits: CodeLimits,
    ) -> Result<(), Option<Duration>> {
        let mut book = self.lock_wrong_codes();
        if let Some(locked) = book.by_reference.get(&reference).map(|w| w.locked_until_ms) {
            if locked > now_ms {
                return Err(Some(Duration::from_millis(
                    (locked - now_ms).unsigned_abs(),
                )));
            }
        }
        if !wrong {
            book.by_reference.remove(&reference);
            return Ok(());
        }
        if now_ms.saturating_sub(book.pruned_at_ms) >= WRONG_CODES_PRUNE_EVERY_MS {
            let forget_ms = i64::try_from(limits.forget_after.as_millis()).unwrap_or(i64::MAX);
            book.by_reference.retain(|_, w| {
                w.locked_until_ms > now_ms || now_ms.saturating_sub(w.last_try_ms) < forget_ms
            });
            book.pruned_at_ms = now_ms;
        }
        let entry = book.by_reference.entry(reference).or_default();
        entry.count += 1;
        entry.last_try_ms = now_ms;
        if entry.count >= limits.tries_max {
            entry.count = 0;
            let lock_ms = i64::try_from(limits.lock.as_millis()).unwrap_or(i64::MAX);
            let lock_ms = lock_ms.saturating_mul(1 << entry.locks.min(LOCK_DOUBLINGS_MAX));
            entry.locks = entry.locks.saturating_add(1);
            entry.locked_until_ms = now_ms.saturating_add(lock_ms);
        }
        Err(None)
    }

    fn lock_wrong_codes(&self) -> std::sync::MutexGuard<'_, WrongCodeBook> {
        self.wrong_codes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A 4-digit code from random bits (the bias of 2^64 mod 10,000 is negligible).
fn check_in_code(bits: u64) -> u16 {
    (bits % (u64::from(BookingCodes::CHECK_IN_CODE_MAX) + 1)) as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::error::StoreError;

    fn refused() -> Result<(), ServiceError> {
        Err(ServiceError::Domain(
            crate::domain::error::DomainError::SlotFull(crate::domain::ids::SlotKey {
                site_id: crate::domain::ids::SiteId::parse("s", "s", 8).unwrap(),
                service_id: crate::domain::ids::ServiceId::parse("s", "s", 8).unwrap(),
                start_unix_s: 0,
            }),
        ))
    }

    #[test]
    fn a_million_references_are_distinct_and_collisions_are_redrawn() {
        let references = References::default();
        // Each minted reference is "written": stored before its write settles.
        let stored = std::cell::RefCell::new(std::collections::HashSet::new());
        for _ in 0..1_000_000 {
            let minted = references
                .mint(|r| stored.borrow().contains(&r))
                .expect("a free reference");
            assert!(minted.codes.check_in_code <= BookingCodes::CHECK_IN_CODE_MAX);
            assert!(
                stored.borrow_mut().insert(minted.codes.reference),
                "a reference was given twice"
            );
            minted.settle(&Ok::<(), ServiceError>(()));
        }
        assert_eq!(references.in_flight(), 0, "written ones are the store's");
    }

    #[test]
    fn a_drawn_reference_in_use_is_drawn_again_and_a_refused_one_given_back() {
        let references = References::default();
        // 9 is a stored booking's; a reference that is free draws its code next.
        let stored = |r: Reference| r.bits() == 9;
        let mut draws = [7, 1].into_iter();
        let first = references
            .mint_with(|| draws.next().unwrap(), stored)
            .unwrap();
        assert_eq!(first.codes.reference.bits(), 7);
        // 7 is being written, 9 is stored: 11 is next.
        let mut draws = [7, 9, 11, 5].into_iter();
        let second = references
            .mint_with(|| draws.next().unwrap(), stored)
            .unwrap();
        assert_eq!(
            (second.codes.reference.bits(), second.codes.check_in_code),
            (11, 5)
        );
        // 11's write failed after it was sent (maybe written): it stays taken, even
        // though the store's index does not have it.
        second.settle(&Err::<(), _>(ServiceError::Store(StoreError::Io(
            "disk".into(),
        ))));
        // The first booking was refused (nothing written): 7 is free again.
        first.settle(&refused());
        let mut draws = [11, 9, 7, 2].into_iter();
        let third = references
            .mint_with(|| draws.next().unwrap(), stored)
            .unwrap();
        assert_eq!(third.codes.reference.bits(), 7);
        // Never queued (the store's queue was full): given back.
        third.settle(&Err::<(), _>(ServiceError::Store(StoreError::Overloaded)));
        let mut draws = [7, 3].into_iter();
        let fourth = references
            .mint_with(|| draws.next().unwrap(), stored)
            .unwrap();
        assert_eq!(fourth.codes.reference.bits(), 7);
        // Dropped unsettled (the request failed before its write): given back.
        drop(fourth);
        assert_eq!(references.in_flight(), 1, "only 11 is left");
    }

    #[test]
    fn a_full_space_is_an_error_not_a_duplicate() {
        let references = References::default();
        let stored = |r: Reference| r.bits() == 3;
        assert!(matches!(
            references.mint_with(|| 3, stored),
            Err(ServiceError::Busy(_))
        ));
    }

    #[test]
    fn wrong_codes_lock_a_reference_for_a_while() {
        let references = References::default();
        let reference = Reference::from_bits(42);
        let limits = CodeLimits {
            tries_max: 5,
            lock: Duration::from_secs(900),
            forget_after: Duration::from_secs(144 * 3_600),
        };
        for _ in 0..4 {
            assert_eq!(
                references.try_code(reference, true, 1_000, limits),
                Err(None)
            );
        }
        assert_eq!(
            references.try_code(reference, true, 1_000, limits),
            Err(None)
        );
        // Locked: even the right code is refused, with the time left.
        assert_eq!(
            references.try_code(reference, false, 2_000, limits),
            Err(Some(Duration::from_millis(899_000)))
        );
        assert_eq!(
            references.try_code(reference, false, 901_000, limits),
            Ok(())
        );
        let other = Reference::from_bits(43);
        assert_eq!(references.try_code(other, false, 2_000, limits), Ok(()));
    }

    /// Pruning forgets only references quiet for `forget_after`: a lock that just ended
    /// keeps its count (the next lock is doubled), a long-quiet one starts again.
    #[test]
    fn pruning_forgets_only_quiet_references() {
        let references = References::default();
        let limits = CodeLimits {
            tries_max: 1,
            lock: Duration::from_secs(900),
            forget_after: Duration::from_secs(3_600),
        };
        let (guessed, other) = (Reference::from_bits(1), Reference::from_bits(2));
        let lock_after_a_wrong_code = |at_ms: i64| {
            assert_eq!(references.try_code(guessed, true, at_ms, limits), Err(None));
            match references.try_code(guessed, true, at_ms, limits) {
                Err(Some(lock)) => lock,
                other => panic!("not locked: {other:?}"),
            }
        };
        assert_eq!(lock_after_a_wrong_code(0), Duration::from_secs(900));
        // 901 s later (the lock over), another reference's try prunes: the count stays.
        assert_eq!(references.try_code(other, true, 901_000, limits), Err(None));
        assert_eq!(lock_after_a_wrong_code(901_000), Duration::from_secs(1_800));
        // Quiet for longer than forget_after after its lock ended: forgotten.
        let later = 901_000 + 1_800_000 + 3_600_000 + 1;
        assert_eq!(references.try_code(other, true, later, limits), Err(None));
        assert_eq!(lock_after_a_wrong_code(later), Duration::from_secs(900));
    }

    /// A guesser trying wrong codes as fast as the locks allow through a whole check-in
    /// window (24 h before to 24 h after a slot, 49 h) gets only a few dozen tries of the
    /// 10,000 codes: under 1% of them.
    #[test]
    fn doubling_locks_bound_the_tries_of_a_whole_window() {
        let references = References::default();
        let reference = Reference::from_bits(7);
        let limits = CodeLimits {
            tries_max: 5,
            lock: Duration::from_secs(900),
            forget_after: Duration::from_secs(144 * 3_600),
        };
        let window_ms = 49 * 3_600_000;
        let (mut now, mut tries, mut locks) = (0i64, 0u32, Vec::new());
        while now < window_ms {
            match references.try_code(reference, true, now, limits) {
                Err(None) => tries += 1,
                Err(Some(retry_after)) => {
                    locks.push(retry_after);
                    now += i64::try_from(retry_after.as_millis()).unwrap();
                }
                Ok(()) => unreachable!("every code tried is wrong"),
            }
        }
        assert_eq!(locks[0], Duration::from_secs(900));
        assert_eq!(locks[1], Duration::from_secs(1_800));
        assert_eq!(locks[2], Duration::from_secs(3_600));
        assert!(tries < 100, "{tries} tries in one window");
    }
}

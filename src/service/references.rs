//! Booking references and check-in codes: minted at random, a reference checked unique
//! against the store and against those of bookings being written right now.
//!
//! A reference is reserved in memory *before* the store is asked: a booking whose write
//! is in flight is found reserved, one already written is found in the store (its write
//! lands before its reservation ends). So two bookings never share one, even when two
//! requests draw the same bits at once. Collisions are counted and redrawn, never
//! assumed away (40 bits: one draw in ~27,000 collides at 40M stored bookings).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use crate::domain::booking::{BookingCodes, Reference};
use crate::service::error::ServiceError;
use crate::store::StoreError;

/// References with wrong tries remembered before the unlocked ones are forgotten
/// (bounds the memory a desk's typos take; a forgotten count starts again).
const WRONG_CODES_PRUNE_AT: usize = 100_000;

/// Draws before giving up (the request may be retried): reaching it means the space is
/// nearly full, or the random source is broken.
const MINT_TRIES: usize = 64;

#[derive(Default)]
pub struct References {
    in_flight: Mutex<HashSet<Reference>>,
    /// Wrong check-in codes per reference, and when its lock (if any) ends.
    wrong_codes: Mutex<HashMap<Reference, WrongCodes>>,
}

#[derive(Clone, Copy, Debug, Default)]
struct WrongCodes {
    count: u32,
    locked_until_ms: i64,
}

/// A reference reserved for a booking being written: it is released when this is
/// dropped, after the write (which then holds it in the store, or never happened).
pub struct Minted<'a> {
    references: &'a References,
    pub codes: BookingCodes,
}

impl Drop for Minted<'_> {
    fn drop(&mut self) {
        self.references
            .lock_in_flight()
            .remove(&self.codes.reference);
    }
}

impl References {
    fn lock_in_flight(&self) -> std::sync::MutexGuard<'_, HashSet<Reference>> {
        // One set operation per critical section: a poisoned set is still consistent.
        self.in_flight
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// New codes for a booking: a random reference that no stored booking (`taken`)
    /// and no booking in flight has, and a random check-in code.
    pub fn mint(
        &self,
        taken: impl Fn(Reference) -> Result<bool, StoreError>,
    ) -> Result<Minted<'_>, ServiceError> {
        self.mint_with(rand::random::<u64>, taken)
    }

    /// [`References::mint`] with its random source given (tests force collisions).
    pub fn mint_with(
        &self,
        mut draw: impl FnMut() -> u64,
        taken: impl Fn(Reference) -> Result<bool, StoreError>,
    ) -> Result<Minted<'_>, ServiceError> {
        for _ in 0..MINT_TRIES {
            let reference = Reference::from_bits(draw());
            if !self.lock_in_flight().insert(reference) {
                metrics::counter!("prenota_reference_collisions_total").increment(1);
                continue;
            }
            // Reserved from here: dropping `minted` releases it.
            let minted = Minted {
                references: self,
                codes: BookingCodes {
                    reference,
                    check_in_code: check_in_code(draw()),
                },
            };
            if taken(reference)? {
                metrics::counter!("prenota_reference_collisions_total").increment(1);
                continue;
            }
            return Ok(minted);
        }
        Err(ServiceError::Busy(
            "no free booking reference was found: retry the request",
        ))
    }

    /// Counts one check-in try of `reference` (`wrong`: its code was wrong), under one
    /// lock so parallel tries cannot pass the limit: `Err(Some(retry after))` while the
    /// reference is locked (whatever the code), `Err(None)` for a wrong code (the
    /// `tries_max`-th in a row locks it for `lock`), `Ok` for the right one (its wrong
    /// tries are forgotten).
    pub fn try_code(
        &self,
        reference: Reference,
        wrong: bool,
        now_ms: i64,
        (tries_max, lock): (u32, Duration),
    ) -> Result<(), Option<Duration>> {
        let mut wrong_codes = self.lock_wrong_codes();
        if let Some(locked) = wrong_codes.get(&reference).map(|w| w.locked_until_ms) {
            if locked > now_ms {
                return Err(Some(Duration::from_millis(
                    (locked - now_ms).unsigned_abs(),
                )));
            }
        }
        if !wrong {
            wrong_codes.remove(&reference);
            return Ok(());
        }
        if wrong_codes.len() >= WRONG_CODES_PRUNE_AT {
            wrong_codes.retain(|_, w| w.locked_until_ms > now_ms);
        }
        let entry = wrong_codes.entry(reference).or_default();
        entry.count += 1;
        if entry.count >= tries_max {
            entry.count = 0;
            let lock_ms = i64::try_from(lock.as_millis()).unwrap_or(i64::MAX);
            entry.locked_until_ms = now_ms.saturating_add(lock_ms);
        }
        Err(None)
    }

    fn lock_wrong_codes(&self) -> std::sync::MutexGuard<'_, HashMap<Reference, WrongCodes>> {
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

    fn never_taken(_: Reference) -> Result<bool, StoreError> {
        Ok(false)
    }

    #[test]
    fn a_million_references_are_distinct_and_collisions_are_redrawn() {
        let references = References::default();
        let mut stored = HashSet::new();
        for _ in 0..1_000_000 {
            let minted = references
                .mint(|r| Ok(stored.contains(&r)))
                .expect("a free reference");
            assert!(minted.codes.check_in_code <= BookingCodes::CHECK_IN_CODE_MAX);
            let reference = minted.codes.reference;
            drop(minted);
            assert!(stored.insert(reference), "a reference was given twice");
        }
        assert_eq!(stored.len(), 1_000_000);
    }

    #[test]
    fn a_drawn_reference_already_stored_or_in_flight_is_drawn_again() {
        let references = References::default();
        // A reference that passes the in-flight check draws its code next.
        let mut draws = [7, 1].into_iter();
        let first = references
            .mint_with(|| draws.next().unwrap(), never_taken)
            .unwrap();
        assert_eq!(first.codes.reference.bits(), 7);
        // 7 is in flight (the first booking's write), then 9 is stored: 11 is next.
        let stored_nine = |r: Reference| Ok(r.bits() == 9);
        let mut draws = [7, 9, 3, 11, 5].into_iter();
        let second = references
            .mint_with(|| draws.next().unwrap(), stored_nine)
            .unwrap();
        assert_eq!(second.codes.reference.bits(), 11);
        assert_eq!(second.codes.check_in_code, 5);
        drop(first);
        let mut again = [7, 0].into_iter();
        let third = references
            .mint_with(|| again.next().unwrap(), never_taken)
            .unwrap();
        assert_eq!(third.codes.reference.bits(), 7, "released once written");
    }

    #[test]
    fn a_full_space_is_an_error_not_a_duplicate() {
        let references = References::default();
        let always_taken = |_: Reference| Ok(true);
        assert!(matches!(
            references.mint(always_taken),
            Err(ServiceError::Busy(_))
        ));
    }

    #[test]
    fn wrong_codes_lock_a_reference_for_a_while() {
        let references = References::default();
        let reference = Reference::from_bits(42);
        let limits = (5, Duration::from_secs(900));
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
}

//! The engine's one source of the time: the system clock in production, a manual clock
//! that tests move by hand (hold expiry without sleeping).
//!
//! The system clock is read through [`Steady`]: it runs at the monotonic clock's rate
//! from the system time it started at, and takes a step of the system clock (an NTP
//! correction, someone setting the date) only once the step has lasted [`STEP_ADOPTED_AFTER`].
//! A clock that jumped days ahead for seconds (an outside test, 2026-12-05) made
//! retention delete the bookings of slots still to come and forget request records (a
//! retry then booked twice), and one stepped back lengthened every hold by the step.
//!
//! Must not import tonic or sled. The domain never reads a clock: the engine reads this
//! one and passes `now` in.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How far the system clock may be from [`Steady`] before it counts as a step.
pub const STEP_TOLERANCE_MS: i64 = 2_000;

/// How long a step must last before [`Steady`] takes it.
pub const STEP_ADOPTED_AFTER: Duration = Duration::from_secs(600);

/// Cheap to clone: clones share one time source, so a test that advances its clock
/// moves the engine's (and the sweeper's) too.
#[derive(Clone, Debug, Default)]
pub struct Clock {
    manual: Option<Arc<AtomicI64>>,
    steady: Option<Arc<Steady>>,
}

impl Clock {
    /// The system clock, steadied ([`Steady`]).
    pub fn system() -> Self {
        Self {
            manual: None,
            steady: Some(Arc::new(Steady::new(system_now_unix_ms()))),
        }
    }

    /// A clock that stands still at `now_unix_ms` until [`Clock::advance`] moves it.
    pub fn manual(now_unix_ms: i64) -> Self {
        Self {
            manual: Some(Arc::new(AtomicI64::new(now_unix_ms))),
            steady: None,
        }
    }

    /// A manual clock starting at the system time.
    pub fn manual_from_now() -> Self {
        Self::manual(system_now_unix_ms())
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_unix_ms(&self) -> i64 {
        match (&self.manual, &self.steady) {
            (Some(now), _) => now.load(Ordering::Acquire),
            (None, Some(steady)) => steady.now_unix_ms(system_now_unix_ms()),
            (None, None) => system_now_unix_ms(),
        }
    }

    /// Moves a manual clock forward. The system clock cannot be moved: asking is a bug.
    pub fn advance(&self, by: Duration) {
        let Some(now) = &self.manual else {
            panic!("only a manual clock can be advanced");
        };
        let by_ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        now.fetch_add(by_ms, Ordering::AcqRel);
    }
}

/// The system time at the monotonic clock's rate, steps taken late (module doc).
#[derive(Debug)]
pub struct Steady {
    started: Instant,
    /// Unix ms at `started`: the time is `offset + ms since started`.
    offset_ms: AtomicI64,
    /// Ms since `started` when the system clock was first seen stepped away (-1: it
    /// agrees).
    stepped_at_ms: AtomicI64,
}

impl Steady {
    pub fn new(now_unix_ms: i64) -> Self {
        Self {
            started: Instant::now(),
            offset_ms: AtomicI64::new(now_unix_ms),
            stepped_at_ms: AtomicI64::new(-1),
        }
    }

    /// The time, given what the system clock says (`system_unix_ms`).
    pub fn now_unix_ms(&self, system_unix_ms: i64) -> i64 {
        let elapsed = i64::try_from(self.started.elapsed().as_millis()).unwrap_or(i64::MAX);
        self.at(elapsed, system_unix_ms)
    }

    /// [`Steady::now_unix_ms`] `elapsed_ms` after it started (tests pass both times).
    pub fn at(&self, elapsed_ms: i64, system_unix_ms: i64) -> i64 {
        let steady = self.offset_ms.load(Ordering::Acquire) + elapsed_ms;
        let step = system_unix_ms - steady;
        if step.abs() <= STEP_TOLERANCE_MS {
            self.stepped_at_ms.store(-1, Ordering::Release);
            return steady;
        }
        let adopt_after = STEP_ADOPTED_AFTER.as_millis() as i64;
        match self.stepped_at_ms.load(Ordering::Acquire) {
            -1 => {
                if self
                    .stepped_at_ms
                    .compare_exchange(-1, elapsed_ms, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    tracing::warn!(step_ms = step, "the system clock stepped: prenota keeps its own time unless the step lasts 10 minutes");
                }
                steady
            }
            since if elapsed_ms - since >= adopt_after => {
                self.offset_ms
                    .store(system_unix_ms - elapsed_ms, Ordering::Release);
                self.stepped_at_ms.store(-1, Ordering::Release);
                tracing::warn!(
                    step_ms = step,
                    "the system clock's step lasted: prenota takes it"
                );
                system_unix_ms
            }
            _ => steady,
        }
    }
}

fn system_now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_advanced_and_clones_share_it() {
        let clock = Clock::manual(1_000);
        let shared = clock.clone();
        assert_eq!(clock.now_unix_ms(), 1_000);
        shared.advance(Duration::from_secs(2));
        assert_eq!(clock.now_unix_ms(), 3_000);
    }

    #[test]
    fn a_step_of_the_system_clock_is_taken_only_once_it_lasted() {
        let start = 1_800_000_000_000;
        let steady = Steady::new(start);
        assert_eq!(
            steady.at(1_000, start + 1_500),
            start + 1_000,
            "within tolerance"
        );
        // Five days ahead for 8 s, then back: nothing moves but the monotonic time.
        let ahead = 5 * 86_400_000;
        for s in 2..10 {
            assert_eq!(
                steady.at(s * 1_000, start + s * 1_000 + ahead),
                start + s * 1_000
            );
        }
        assert_eq!(steady.at(11_000, start + 11_000), start + 11_000);
        // An hour back, for good: kept out for ten minutes, then taken.
        let back = 3_600_000;
        let adopt = STEP_ADOPTED_AFTER.as_millis() as i64;
        assert_eq!(steady.at(20_000, start + 20_000 - back), start + 20_000);
        let late = 20_000 + adopt - 1;
        assert_eq!(steady.at(late, start + late - back), start + late);
        let taken = 20_000 + adopt;
        assert_eq!(steady.at(taken, start + taken - back), start + taken - back);
        assert_eq!(
            steady.at(taken + 5, start + taken + 5 - back),
            start + taken + 5 - back
        );
    }

    #[test]
    fn the_system_clock_reads_the_system_time() {
        let before = system_now_unix_ms();
        let read = Clock::system().now_unix_ms();
        assert!(read >= before && read - before < 60_000);
    }
}

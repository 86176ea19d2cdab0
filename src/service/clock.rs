//! The engine's one source of the time: the system clock in production, a manual clock
//! that tests move by hand (hold expiry without sleeping).
//!
//! The system clock is read through [`Steady`]: it follows the system clock while the
//! two agree within [`STEP_TOLERANCE_MS`] (small corrections taken at once), runs at the
//! boot clock's rate from its own time when they do not, and takes a step of the system
//! clock (an NTP correction, someone setting the date) only once that same step has
//! lasted [`STEP_ADOPTED_AFTER`] ([`SMALL_STEP_ADOPTED_AFTER`] for one up to
//! [`SMALL_STEP_AHEAD_MS`] ahead: a resumed VM catching up).
//! A clock that jumped days ahead for seconds (an outside test, 2026-12-05) made
//! retention delete the bookings of slots still to come and forget request records (a
//! retry then booked twice), and one stepped back lengthened every hold by the step.
//!
//! Must not import tonic or sled. The domain never reads a clock: the engine reads this
//! one and passes `now` in.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

/// The system time at the rate of the clock that counts since boot (suspend included),
/// steps taken late (module doc). Reads in agreement (the usual case) only load.
#[derive(Debug)]
pub struct Steady {
    /// Ms since boot when it started.
    started_ms: i64,
    /// Unix ms when it started, corrected by every step taken: the time is
    /// `offset + ms since started`.
    offset_ms: AtomicI64,
    /// Whether `pending` holds a step (read without its lock).
    stepped: AtomicBool,
    pending: Mutex<Option<Step>>,
}

/// A step of the system clock seen and not taken yet.
#[derive(Clone, Copy, Debug)]
struct Step {
    since_ms: i64,
    size_ms: i64,
}

/// Steps up to this far ahead (a VM resumed, a suspend the boot clock missed) are taken
/// after [`SMALL_STEP_ADOPTED_AFTER`].
pub const SMALL_STEP_AHEAD_MS: i64 = 300_000;
pub const SMALL_STEP_ADOPTED_AFTER: Duration = Duration::from_secs(10);

impl Steady {
    pub fn new(now_unix_ms: i64) -> Self {
        Self {
            started_ms: boot_ms(),
            offset_ms: AtomicI64::new(now_unix_ms),
            stepped: AtomicBool::new(false),
            pending: Mutex::new(None),
        }
    }

    /// The time, given what the system clock says (`system_unix_ms`).
    pub fn now_unix_ms(&self, system_unix_ms: i64) -> i64 {
        self.at(boot_ms() - self.started_ms, system_unix_ms)
    }

    /// [`Steady::now_unix_ms`] `elapsed_ms` after it started (tests pass both times).
    /// Within [`STEP_TOLERANCE_MS`] the system clock is followed at once.
    pub fn at(&self, elapsed_ms: i64, system_unix_ms: i64) -> i64 {
        let step = system_unix_ms - (self.offset_ms.load(Ordering::Acquire) + elapsed_ms);
        if step.abs() > STEP_TOLERANCE_MS {
            return self.stepped(elapsed_ms, system_unix_ms, step);
        }
        if step.abs() > 100 {
            self.offset_ms
                .store(system_unix_ms - elapsed_ms, Ordering::Release);
        }
        if self.stepped.load(Ordering::Acquire) {
            *self.lock_pending() = None;
            self.stepped.store(false, Ordering::Release);
        }
        system_unix_ms
    }

    /// The system clock is `step` ms away: keeps its own time until that same step has
    /// lasted long enough, then takes it.
    fn stepped(&self, elapsed_ms: i64, system_unix_ms: i64, step: i64) -> i64 {
        let mut pending = self.lock_pending();
        let steady = system_unix_ms - step;
        match *pending {
            Some(seen) if (step - seen.size_ms).abs() <= STEP_TOLERANCE_MS => {
                let wait = match step > 0 && step <= SMALL_STEP_AHEAD_MS {
                    true => SMALL_STEP_ADOPTED_AFTER,
                    false => STEP_ADOPTED_AFTER,
                };
                if elapsed_ms - seen.since_ms < wait.as_millis() as i64 {
                    return steady;
                }
                self.offset_ms
                    .store(system_unix_ms - elapsed_ms, Ordering::Release);
                *pending = None;
                self.stepped.store(false, Ordering::Release);
                tracing::warn!(
                    step_ms = step,
                    "the system clock's step lasted: prenota takes it"
                );
                system_unix_ms
            }
            earlier => {
                if earlier.is_none() {
                    tracing::warn!(
                        step_ms = step,
                        "the system clock stepped: prenota keeps its own time until the step lasts"
                    );
                }
                *pending = Some(Step {
                    since_ms: elapsed_ms,
                    size_ms: step,
                });
                self.stepped.store(true, Ordering::Release);
                steady
            }
        }
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, Option<Step>> {
        // One assignment per critical section: a poisoned lock is still consistent.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Ms since boot, suspend included (`CLOCK_BOOTTIME`; a paused VM's guest may still
/// miss the pause: then the system clock's correction is a step, taken as above).
fn boot_ms() -> i64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    now.tv_sec.saturating_mul(1_000) + now.tv_nsec / 1_000_000
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
        assert_eq!(steady.at(1_000, start + 1_000), start + 1_000);
        // Five days ahead for 8 s, then back: nothing moves but the boot clock's time.
        let ahead = 5 * 86_400_000;
        for s in 2..10 {
            let at = s * 1_000;
            assert_eq!(steady.at(at, start + at + ahead), start + at);
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
        let after = taken + 5;
        assert_eq!(steady.at(after, start + after - back), start + after - back);
    }

    #[test]
    fn small_corrections_are_followed_and_a_growing_step_restarts_the_wait() {
        let start = 1_800_000_000_000;
        let steady = Steady::new(start);
        // 1.5 s ahead: followed at once, and kept.
        assert_eq!(steady.at(1_000, start + 2_500), start + 2_500);
        assert_eq!(steady.at(2_000, start + 3_500), start + 3_500);
        // +1 h, then +5 days, then +500 days, each seen for less than 10 minutes.
        let adopt = STEP_ADOPTED_AFTER.as_millis() as i64;
        let (hour, day) = (3_600_000, 86_400_000);
        let own = |at: i64| start + 1_500 + at;
        assert_eq!(steady.at(10_000, own(10_000) + hour), own(10_000));
        let half = 10_000 + adopt / 2;
        assert_eq!(steady.at(half, own(half) + 5 * day), own(half));
        let late = 10_000 + adopt + 1;
        assert_eq!(
            steady.at(late, own(late) + 500 * day),
            own(late),
            "taken too soon"
        );
        // A minute ahead (a resumed VM): taken after 10 s.
        let minute = 60_000;
        assert_eq!(steady.at(late + 1, own(late + 1) + minute), own(late + 1));
        let small = late + 1 + SMALL_STEP_ADOPTED_AFTER.as_millis() as i64;
        assert_eq!(steady.at(small, own(small) + minute), own(small) + minute);
    }

    #[test]
    fn the_system_clock_reads_the_system_time() {
        let before = system_now_unix_ms();
        let read = Clock::system().now_unix_ms();
        assert!(read >= before && read - before < 60_000);
    }
}

//! The engine's one source of the time: the system clock in production, a manual clock
//! that tests move by hand (hold expiry without sleeping).
//!
//! The system clock is read through [`Steady`]: its own time, counted on the boot clock
//! from the system time it started at, slewed toward the system clock (1%) while the
//! two agree within [`STEP_TOLERANCE_MS`]. A step of the system clock beyond that (an
//! NTP correction, someone setting the date) is taken only once that same step has
//! lasted [`SMALL_STEP_ADOPTED_AFTER`] (a step of at most [`SMALL_STEP_MS`] either way:
//! a resumed VM catching up) or [`STEP_ADOPTED_AFTER`] (a larger one).
//! A clock that jumped days ahead for seconds (an outside test, 2026-12-05) made
//! retention delete the bookings of slots still to come and forget request records (a
//! retry then booked twice), and one stepped back lengthened every hold by the step.
//!
//! Must not import tonic or sled. The domain never reads a clock: the engine reads this
//! one and passes `now` in.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How far the system clock may be from [`Steady`] before it counts as a step.
pub const STEP_TOLERANCE_MS: i64 = 2_000;

/// How long a step must last before [`Steady`] takes it.
pub const STEP_ADOPTED_AFTER: Duration = Duration::from_secs(600);

/// Steps up to this far either way (a VM resumed, a suspend the boot clock missed) are
/// taken after [`SMALL_STEP_ADOPTED_AFTER`]: long enough for a bad answer of a time
/// source to be corrected first.
pub const SMALL_STEP_MS: i64 = 300_000;
pub const SMALL_STEP_ADOPTED_AFTER: Duration = Duration::from_secs(60);

/// Within the tolerance, its time moves toward the system clock's by 1 ms per this
/// many ms elapsed.
pub const SLEW_EVERY_MS: i64 = 100;

/// Cheap to clone: clones share one time source, so a test that advances its clock
/// moves the engine's (and the sweeper's) too.
#[derive(Clone, Debug, Default)]
pub struct Clock {
    manual: Option<Arc<Manual>>,
    steady: Option<Arc<Steady>>,
}

/// A manual clock's time, and the time that passed by it (what the boot clock counts
/// for the system clock): [`Clock::advance`] moves both, [`Clock::set_wrong_by`] only
/// the first.
#[derive(Debug)]
struct Manual {
    now_unix_ms: AtomicI64,
    elapsed_ms: AtomicI64,
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
            manual: Some(Arc::new(Manual {
                now_unix_ms: AtomicI64::new(now_unix_ms),
                elapsed_ms: AtomicI64::new(0),
            })),
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
            (Some(manual), _) => manual.now_unix_ms.load(Ordering::Acquire),
            (None, Some(steady)) => steady.now_unix_ms(system_now_unix_ms()),
            (None, None) => system_now_unix_ms(),
        }
    }

    /// Milliseconds that passed, from an arbitrary origin, whatever the time says: the
    /// boot clock (a manual clock's: what [`Clock::advance`] moved). Only differences
    /// mean anything.
    pub fn elapsed_ms(&self) -> i64 {
        match &self.manual {
            Some(manual) => manual.elapsed_ms.load(Ordering::Acquire),
            None => boot_ms(),
        }
    }

    /// Moves a manual clock forward. The system clock cannot be moved: asking is a bug.
    pub fn advance(&self, by: Duration) {
        let Some(manual) = &self.manual else {
            panic!("only a manual clock can be advanced");
        };
        let by_ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        manual.now_unix_ms.fetch_add(by_ms, Ordering::AcqRel);
        manual.elapsed_ms.fetch_add(by_ms, Ordering::AcqRel);
    }

    /// Moves a manual clock's time by `by_ms` (either way) with no time passing: a
    /// clock set wrong, as a test plays it.
    pub fn set_wrong_by(&self, by_ms: i64) {
        let Some(manual) = &self.manual else {
            panic!("only a manual clock can be set wrong");
        };
        manual.now_unix_ms.fetch_add(by_ms, Ordering::AcqRel);
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
    /// Ms since started when it last slewed toward the system clock.
    slewed_at_ms: AtomicI64,
    /// The latest time it read, packed with the generation of the offset it was read
    /// with ([`Latest`]): a slew back is not read as time going back, a step taken is.
    latest: AtomicU64,
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

impl Steady {
    pub fn new(now_unix_ms: i64) -> Self {
        Self {
            started_ms: boot_ms(),
            offset_ms: AtomicI64::new(now_unix_ms),
            slewed_at_ms: AtomicI64::new(0),
            latest: AtomicU64::new(Latest::new(0, now_unix_ms).0),
            stepped: AtomicBool::new(false),
            pending: Mutex::new(None),
        }
    }

    /// The time, given what the system clock says (`system_unix_ms`).
    pub fn now_unix_ms(&self, system_unix_ms: i64) -> i64 {
        self.at(boot_ms() - self.started_ms, system_unix_ms)
    }

    /// [`Steady::now_unix_ms`] `elapsed_ms` after it started (tests pass both times).
    /// Within [`STEP_TOLERANCE_MS`] it slews toward the system clock ([`Steady::slew`]);
    /// a slew back never reads earlier than a read before it ([`Steady::never_back`]).
    pub fn at(&self, elapsed_ms: i64, system_unix_ms: i64) -> i64 {
        let generation = self.latest().generation();
        self.never_back(generation, self.unheld_at(elapsed_ms, system_unix_ms))
    }

    /// The latest of `now_unix_ms` and every read before it. A slew moves the offset by
    /// up to 10 ms at once, so without this a read could precede one made just before it
    /// (on another thread, or the same): a registration stamped after the campaign's end
    /// it followed (a CI failure, 2026-12-06). Time goes back only when a step back is
    /// taken ([`Steady::stepped`] starts a new generation): a read computed with the
    /// offset before it (`generation` older) answers the new generation's latest and is
    /// not kept, however late it comes (a reader paused between its boot-clock read and
    /// here: a stalled VM, SIGSTOP).
    fn never_back(&self, generation: u16, now_unix_ms: i64) -> i64 {
        let mut latest = self.latest();
        loop {
            if latest.generation() != generation || now_unix_ms <= latest.ms() {
                return latest.ms();
            }
            let read = Latest::new(generation, now_unix_ms);
            match self.latest.compare_exchange_weak(
                latest.0,
                read.0,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return read.ms(),
                Err(moved) => latest = Latest(moved),
            }
        }
    }

    fn latest(&self) -> Latest {
        Latest(self.latest.load(Ordering::Acquire))
    }

    /// [`Steady::at`] before [`Steady::never_back`].
    fn unheld_at(&self, elapsed_ms: i64, system_unix_ms: i64) -> i64 {
        let step = system_unix_ms - (self.offset_ms.load(Ordering::Acquire) + elapsed_ms);
        if step.abs() > STEP_TOLERANCE_MS {
            return self.stepped(elapsed_ms, system_unix_ms, step);
        }
        let steady = system_unix_ms - step;
        self.slew(elapsed_ms, step);
        if self.stepped.load(Ordering::Acquire) {
            *self.lock_pending() = None;
            self.stepped.store(false, Ordering::Release);
        }
        steady
    }

    /// Moves its time toward the system clock's by at most 1 ms per [`SLEW_EVERY_MS`]
    /// elapsed (1%): small corrections are followed, and a clock moved in small steps
    /// soon lies beyond the tolerance, where it counts as a step.
    fn slew(&self, elapsed_ms: i64, step: i64) {
        let last = self.slewed_at_ms.load(Ordering::Acquire);
        let since = elapsed_ms - last;
        if step == 0 || since < SLEW_EVERY_MS {
            return;
        }
        let claimed = self.slewed_at_ms.compare_exchange(
            last,
            elapsed_ms,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        if claimed.is_ok() {
            // Unread for long, it does not catch up at once: at most 10 ms per read.
            let most = since.min(1_000) / SLEW_EVERY_MS;
            self.offset_ms
                .fetch_add(step.clamp(-most, most), Ordering::AcqRel);
        }
    }

    /// The system clock is `step` ms away: keeps its own time until that same step has
    /// lasted long enough, then takes it.
    fn stepped(&self, elapsed_ms: i64, system_unix_ms: i64, step: i64) -> i64 {
        let mut pending = self.lock_pending();
        let steady = system_unix_ms - step;
        match *pending {
            Some(seen) if (step - seen.size_ms).abs() <= STEP_TOLERANCE_MS => {
                let wait = match step.abs() <= SMALL_STEP_MS {
                    true => SMALL_STEP_ADOPTED_AFTER,
                    false => STEP_ADOPTED_AFTER,
                };
                if elapsed_ms - seen.since_ms < wait.as_millis() as i64 {
                    return steady;
                }
                self.offset_ms
                    .store(system_unix_ms - elapsed_ms, Ordering::Release);
                // After the offset: a reader of the new generation reads the new offset.
                // A reader between the two stores reads the new offset in the old
                // generation, perhaps past `system_unix_ms` (read before the lock): a
                // step forward keeps what it handed out.
                let adopt = |current: u64| {
                    let current = Latest(current);
                    let ms = match step > 0 {
                        true => current.ms().max(system_unix_ms),
                        false => system_unix_ms,
                    };
                    Some(Latest::new(current.generation().wrapping_add(1), ms).0)
                };
                let adopted = self
                    .latest
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, adopt);
                debug_assert!(adopted.is_ok(), "the update always answers a value");
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

/// A time in ms (48 bits: until the year 10889) and the generation of the offset it was
/// read with (16 bits), in one word so that one compare-and-swap moves both. A read
/// would have to last 65,536 steps taken for its generation to come round again.
#[derive(Clone, Copy, Debug)]
struct Latest(u64);

impl Latest {
    const MS_BITS: u32 = 48;
    const MS_MAX: i64 = (1 << Self::MS_BITS) - 1;

    fn new(generation: u16, ms: i64) -> Self {
        // A system clock before 1970 reads 0 (`system_now_unix_ms`).
        let ms = ms.clamp(0, Self::MS_MAX) as u64;
        Self(u64::from(generation) << Self::MS_BITS | ms)
    }

    fn generation(self) -> u16 {
        (self.0 >> Self::MS_BITS) as u16
    }

    fn ms(self) -> i64 {
        (self.0 & Self::MS_MAX as u64) as i64
    }
}

/// Ms since boot, suspend included (`CLOCK_BOOTTIME`; a paused VM's guest may still
/// miss the pause: then the system clock's correction is a step, taken as above).
pub fn boot_ms() -> i64 {
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
        assert_eq!(clock.elapsed_ms(), 2_000);
        shared.set_wrong_by(-5_000);
        assert_eq!((clock.now_unix_ms(), clock.elapsed_ms()), (-2_000, 2_000));
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
    fn small_corrections_are_slewed_and_a_growing_step_restarts_the_wait() {
        let start = 1_800_000_000_000;
        let steady = Steady::new(start);
        // 1.5 s ahead: its own time, slewed 1 ms per 100 ms toward the system's.
        assert_eq!(steady.at(1_000, start + 2_500), start + 1_000);
        for s in 2..=150 {
            let at = s * 1_000;
            assert_eq!(steady.at(at, start + at + 1_500), start + at + (s - 1) * 10);
        }
        let own = |at: i64| start + 1_500 + at;
        assert_eq!(steady.at(200_100, own(200_100)), own(200_100), "caught up");
        // +1 h, then +5 days, then +500 days, each seen for less than 10 minutes.
        let adopt = STEP_ADOPTED_AFTER.as_millis() as i64;
        let (hour, day) = (3_600_000, 86_400_000);
        let t = 300_000;
        assert_eq!(steady.at(t, own(t) + hour), own(t));
        let half = t + adopt / 2;
        assert_eq!(steady.at(half, own(half) + 5 * day), own(half));
        let late = t + adopt + 1;
        assert_eq!(
            steady.at(late, own(late) + 500 * day),
            own(late),
            "taken too soon"
        );
        // A minute either way (a resumed VM; a bad answer corrected): taken after 60 s.
        let wait = SMALL_STEP_ADOPTED_AFTER.as_millis() as i64;
        let mut seen = late + 1;
        for minute in [60_000, -60_000] {
            assert_eq!(steady.at(seen, own(seen) + minute), own(seen));
            let glitch = seen + wait / 2;
            assert_eq!(
                steady.at(glitch, own(glitch) + minute),
                own(glitch),
                "a glitch"
            );
            let small = seen + wait;
            assert_eq!(steady.at(small, own(small) + minute), own(small) + minute);
            // Back where it was: that is a step again, waited out the same way.
            assert_eq!(
                steady.at(small + 1, own(small + 1)),
                own(small + 1) + minute
            );
            let back = small + 1 + wait;
            assert_eq!(steady.at(back, own(back)), own(back));
            seen = back + 1;
        }
        // Moved back 1.5 s at a time: slewed 10 ms, then the second move is a step.
        let creep = seen;
        assert_eq!(steady.at(creep, own(creep) - 1_500), own(creep));
        let next = creep + 100;
        assert_eq!(steady.at(next, own(next) - 3_000), own(next) - 10);
    }

    #[test]
    fn a_slew_back_never_reads_earlier_than_a_read_before_it() {
        let start = 1_800_000_000_000;
        let steady = Steady::new(start);
        // The system clock 1.5 s behind: this read slews the offset back 10 ms.
        assert_eq!(steady.at(1_000, start + 1_000 - 1_500), start + 1_000);
        for at in [1_001, 1_005, 1_009, 1_010] {
            assert_eq!(
                steady.at(at, start + at - 1_500),
                start + 1_000,
                "read back"
            );
        }
        assert_eq!(steady.at(1_011, start + 1_011 - 1_500), start + 1_001);
    }

    #[test]
    fn a_late_read_never_moves_time_back_and_a_taken_step_back_does() {
        let start = 1_800_000_000_000;
        let steady = Steady::new(start);
        assert_eq!(steady.at(10_000, start + 10_000), start + 10_000);
        // A reader that read the boot clock 5 s ago and was paused since.
        assert_eq!(
            steady.at(5_000, start + 10_000),
            start + 10_000,
            "read back"
        );
        assert_eq!(steady.at(10_001, start + 10_001), start + 10_001);
        // An hour back, taken after ten minutes: later reads follow it.
        let back = 3_600_000;
        let adopt = STEP_ADOPTED_AFTER.as_millis() as i64;
        let seen = 20_000;
        assert_eq!(steady.at(seen, start + seen - back), start + seen);
        let before = steady.latest().generation();
        let taken = seen + adopt;
        assert_eq!(steady.at(taken, start + taken - back), start + taken - back);
        // A read computed with the offset before the step, kept after it: answered the
        // new time and not kept, so the next read does not stand still for an hour.
        assert_eq!(
            steady.never_back(before, start + taken),
            start + taken - back
        );
        let next = taken + 3;
        assert_eq!(steady.at(next, start + next - back), start + next - back);
        // An hour ahead, taken while another reader, between the offset's store and the
        // generation's, handed out 5 ms past the step: the step does not undo that.
        let own = |at: i64| start + at - back;
        let seen = next + 1;
        assert_eq!(steady.at(seen, own(seen) + back), own(seen));
        let taken = seen + adopt;
        let generation = steady.latest().generation();
        let handed = Latest::new(generation, own(taken) + back + 5);
        steady.latest.store(handed.0, Ordering::Release);
        assert_eq!(steady.at(taken, own(taken) + back), own(taken) + back + 5);
        assert_eq!(steady.latest().generation(), generation.wrapping_add(1));
    }

    #[test]
    fn the_system_clock_reads_the_system_time() {
        let before = system_now_unix_ms();
        let read = Clock::system().now_unix_ms();
        assert!(read >= before && read - before < 60_000);
    }
}

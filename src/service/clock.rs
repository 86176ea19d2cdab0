//! The engine's one source of the time: the system clock in production, a manual clock
//! that tests move by hand (hold expiry without sleeping).
//!
//! Must not import tonic or sled. The domain never reads a clock: the engine reads this
//! one and passes `now` in.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Cheap to clone: clones share one time source, so a test that advances its clock
/// moves the engine's (and the sweeper's) too.
#[derive(Clone, Debug, Default)]
pub struct Clock {
    manual: Option<Arc<AtomicI64>>,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Self { manual: None }
    }

    /// A clock that stands still at `now_unix_ms` until [`Clock::advance`] moves it.
    pub fn manual(now_unix_ms: i64) -> Self {
        Self {
            manual: Some(Arc::new(AtomicI64::new(now_unix_ms))),
        }
    }

    /// A manual clock starting at the system time.
    pub fn manual_from_now() -> Self {
        Self::manual(system_now_unix_ms())
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_unix_ms(&self) -> i64 {
        match &self.manual {
            Some(now) => now.load(Ordering::Acquire),
            None => system_now_unix_ms(),
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
    fn the_system_clock_reads_the_system_time() {
        let before = system_now_unix_ms();
        let read = Clock::system().now_unix_ms();
        assert!(read >= before && read - before < 60_000);
    }
}

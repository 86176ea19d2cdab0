//! How fresh this node's hold on the PostgreSQL lease is, for answers given from
//! memory. A standby takes over a holder that still lives once its last renewal is a
//! whole `lease_ttl` old (or at once when its session is gone); the holder answers
//! nothing (`Ready` turns each one-reply answer and each stream's start into
//! NOT_ACTIVE) once a renewal failed or the last one that got through, timed from just
//! before it was sent, is three quarters of that old. The watchdog fails the store at
//! the same point, but a node resumed after a pause (SIGSTOP) may answer the calls
//! queued meanwhile before the watchdog's thread runs: without this check it told
//! citizens SLOT_FULL or CITIZEN_ALREADY_BOOKED from memory the new active node had
//! moved past. A hypervisor pause stops the monotonic clock too, so is not seen here.
//!
//! The other side of the same rule: a node that takes the lease over from a holder that
//! may still live (its PostgreSQL session ended, the holder did not) answers nothing
//! until that holder's own limit has surely passed (`previous_until_ms`): until then the
//! two could answer at once, one from memory the other has moved past.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct LeaseFreshness {
    base: Instant,
    /// When the last renewal that got through (or the take) was sent, in ms from `base`.
    sent_ms: AtomicU64,
    /// How old that may be; 0 while no lease is held (sled; a standby's gates answer
    /// NOT_ACTIVE on their own).
    limit_ms: AtomicU64,
    /// Set for good once a renewal failed, the watchdog fired or the store failed.
    lost: AtomicBool,
    /// Until when, in ms from `base`, the previous holder may still answer from memory.
    previous_until_ms: AtomicU64,
}

impl Default for LeaseFreshness {
    fn default() -> Self {
        Self {
            base: Instant::now(),
            sent_ms: AtomicU64::new(0),
            limit_ms: AtomicU64::new(0),
            lost: AtomicBool::new(false),
            previous_until_ms: AtomicU64::new(0),
        }
    }
}

impl LeaseFreshness {
    /// Now, as `held` and `renewed` take it: read it before sending the statement.
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The lease was taken by a statement sent at `sent_ms`; it lasts `lease_ttl`. The
    /// previous holder may answer from memory for `previous_left` more from now.
    pub fn held(&self, sent_ms: u64, lease_ttl: Duration, previous_left: Duration) {
        let limit_ms = u64::try_from(Self::limit(lease_ttl).as_millis()).unwrap_or(u64::MAX);
        let previous_left_ms = u64::try_from(previous_left.as_millis()).unwrap_or(u64::MAX);
        self.previous_until_ms.store(
            self.now_ms().saturating_add(previous_left_ms),
            Ordering::Release,
        );
        self.sent_ms.store(sent_ms, Ordering::Release);
        self.limit_ms.store(limit_ms.max(1), Ordering::Release);
    }

    /// How long after a renewal was sent its holder may answer from memory.
    pub fn limit(lease_ttl: Duration) -> Duration {
        lease_ttl * 3 / 4
    }

    /// How long until the previous holder surely stopped answering from memory (zero
    /// once it has, or if there was none that could).
    pub fn previous_left(&self) -> Duration {
        let until_ms = self.previous_until_ms.load(Ordering::Acquire);
        Duration::from_millis(until_ms.saturating_sub(self.now_ms()))
    }

    /// A renewal sent at `sent_ms` got through.
    pub fn renewed(&self, sent_ms: u64) {
        self.sent_ms.fetch_max(sent_ms, Ordering::AcqRel);
    }

    /// When the last renewal that got through (or the take) was sent.
    pub fn sent_ms(&self) -> u64 {
        self.sent_ms.load(Ordering::Acquire)
    }

    /// The lease is gone (a renewal failed, the watchdog fired, the store failed): no
    /// answer from memory from now on.
    pub fn lost(&self) {
        self.lost.store(true, Ordering::Release);
    }

    /// How long since the last renewal that got through was sent, past its limit;
    /// `None` while fresh (or while no lease is held).
    pub fn overdue_ms(&self) -> Option<u64> {
        if self.lost.load(Ordering::Acquire) {
            return Some(u64::MAX);
        }
        let limit_ms = self.limit_ms.load(Ordering::Acquire);
        // Read the renewal first: the clock read after it is never earlier.
        let sent_ms = self.sent_ms.load(Ordering::Acquire);
        let silent_ms = self.now_ms().saturating_sub(sent_ms);
        (limit_ms > 0 && silent_ms > limit_ms).then_some(silent_ms)
    }

    /// Whether this node may answer from memory: no lease is held (sled), or it is fresh
    /// and the previous holder's own limit has passed.
    pub fn fresh(&self) -> bool {
        self.overdue_ms().is_none() && self.previous_left().is_zero()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_until_three_quarters_of_the_lease_after_the_last_renewal_was_sent() {
        let freshness = LeaseFreshness::default();
        assert!(freshness.fresh(), "no lease held (sled): always answers");
        let sent = freshness.now_ms();
        freshness.held(sent, Duration::from_millis(80), Duration::ZERO);
        assert!(freshness.fresh());
        std::thread::sleep(Duration::from_millis(70));
        assert!(
            !freshness.fresh(),
            "60 ms (3/4 of 80) after the take was sent"
        );
        assert!(freshness.overdue_ms().unwrap() >= 60);
        freshness.renewed(freshness.now_ms());
        assert!(freshness.fresh());
        freshness.renewed(sent);
        assert!(freshness.fresh(), "an older renewal never moves it back");
        freshness.lost();
        assert!(!freshness.fresh(), "lost for good");
        freshness.renewed(freshness.now_ms());
        assert!(!freshness.fresh());
    }

    #[test]
    fn a_node_taking_over_answers_nothing_until_the_previous_holders_limit_passed() {
        let freshness = LeaseFreshness::default();
        let sent = freshness.now_ms();
        freshness.held(sent, Duration::from_secs(60), Duration::from_millis(50));
        assert!(!freshness.fresh(), "the previous holder may still answer");
        assert!(freshness.previous_left() > Duration::from_millis(30));
        assert!(freshness.overdue_ms().is_none(), "its own lease is fresh");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(freshness.previous_left(), Duration::ZERO);
        assert!(freshness.fresh());
    }
}

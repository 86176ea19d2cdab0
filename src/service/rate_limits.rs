//! Per-citizen booking attempts (governor, keyed by the citizen's HMAC), bounded in
//! memory: `retain` (run on a timer by the server) forgets every citizen whose quota
//! has fully refilled, so a flood of made-up citizen ids costs memory only until the
//! next tick. And the slots each token's new watches are sent first (`TokenSlots`,
//! keyed by the token's name: a set fixed by the config).

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::domain::ids::CitizenKey;

pub struct CitizenLimiter {
    limiter: Option<DefaultKeyedRateLimiter<CitizenKey>>,
    clock: DefaultClock,
}

impl CitizenLimiter {
    /// `per_minute` attempts, all of them usable in a burst; 0: no limit.
    pub fn new(per_minute: u32) -> Self {
        Self {
            limiter: NonZeroU32::new(per_minute)
                .map(|n| RateLimiter::keyed(Quota::per_minute(n).allow_burst(n))),
            clock: DefaultClock::default(),
        }
    }

    /// `Err(wait)` when the citizen must wait that long before the next attempt.
    pub fn check(&self, citizen: &CitizenKey) -> Result<(), Duration> {
        match &self.limiter {
            None => Ok(()),
            Some(limiter) => limiter
                .check_key(citizen)
                .map_err(|not_until| not_until.wait_time_from(self.clock.now())),
        }
    }

    /// Forgets citizens back at a full quota; returns how many are still tracked.
    pub fn retain(&self) -> usize {
        match &self.limiter {
            None => 0,
            Some(limiter) => {
                limiter.retain_recent();
                limiter.shrink_to_fit();
                limiter.len()
            }
        }
    }

    pub fn tracked(&self) -> usize {
        self.limiter.as_ref().map_or(0, |limiter| limiter.len())
    }
}

/// What the snapshots of one token's new watches may hold: `per_s` slots a second,
/// all of them in a burst.
pub struct TokenSlots {
    limiter: Option<DefaultKeyedRateLimiter<String>>,
    clock: DefaultClock,
}

impl TokenSlots {
    /// 0: no limit.
    pub fn new(per_s: u32) -> Self {
        Self {
            limiter: NonZeroU32::new(per_s)
                .map(|n| RateLimiter::keyed(Quota::per_second(n).allow_burst(n))),
            clock: DefaultClock::default(),
        }
    }

    /// `Err(wait)` when `token` must wait that long before a snapshot of `slots`
    /// (nothing taken then). An empty snapshot counts as one slot.
    pub fn take(&self, token: &str, slots: usize) -> Result<(), Duration> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        let slots =
            NonZeroU32::new(u32::try_from(slots).unwrap_or(u32::MAX).max(1)).expect("at least 1");
        match limiter.check_key_n(&token.to_string(), slots) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(not_until.wait_time_from(self.clock.now())),
            // More than a whole second's worth: the config check keeps the quota at
            // `watch_slots_max` or more, and a wider watch is refused before.
            Err(_) => Err(Duration::from_secs(1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_beyond_the_quota_waits_and_other_citizens_do_not() {
        let limiter = CitizenLimiter::new(3);
        let citizen = CitizenKey([1; 16]);
        for _ in 0..3 {
            assert_eq!(limiter.check(&citizen), Ok(()));
        }
        let wait = limiter.check(&citizen).unwrap_err();
        assert!(
            wait > Duration::from_secs(15) && wait <= Duration::from_secs(20),
            "{wait:?}"
        );
        assert_eq!(limiter.check(&CitizenKey([2; 16])), Ok(()));
        assert_eq!(CitizenLimiter::new(0).check(&citizen), Ok(()));
    }

    #[test]
    fn a_token_past_its_snapshot_slots_waits_and_other_tokens_do_not() {
        let slots = TokenSlots::new(100);
        assert_eq!(slots.take("frontend-a", 60), Ok(()));
        assert_eq!(slots.take("frontend-a", 0), Ok(()));
        let wait = slots.take("frontend-a", 60).unwrap_err();
        assert!(wait > Duration::from_millis(100) && wait <= Duration::from_millis(210));
        assert_eq!(
            slots.take("frontend-a", 39),
            Ok(()),
            "nothing taken when refused"
        );
        assert_eq!(slots.take("frontend-b", 100), Ok(()));
        assert!(slots.take("frontend-b", 101).is_err());
        assert_eq!(TokenSlots::new(0).take("frontend-a", 1_000_000), Ok(()));
    }

    #[test]
    fn a_million_made_up_citizens_are_forgotten_at_the_retention_tick() {
        // 60,000 a minute: each citizen's single attempt refills within 1 ms.
        let limiter = CitizenLimiter::new(60_000);
        for n in 0..1_000_000u64 {
            let mut key = [0u8; 16];
            key[..8].copy_from_slice(&n.to_le_bytes());
            key[8..].copy_from_slice(&rand::random::<[u8; 8]>());
            assert!(limiter.check(&CitizenKey(key)).is_ok());
        }
        assert_eq!(limiter.tracked(), 1_000_000);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(limiter.retain(), 0, "every refilled citizen is forgotten");
        // One citizen still waiting for its quota is kept.
        let busy = CitizenLimiter::new(1);
        busy.check(&CitizenKey([9; 16])).unwrap();
        assert_eq!(busy.retain(), 1);
    }
}

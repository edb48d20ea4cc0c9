//! Per-user rate limits: `governor`'s keyed GCRA limiter, in memory on each
//! logic node (so a user spread over n nodes gets up to n times the rate —
//! a cap on abuse, not an exact quota).

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter as Gcra};

type Keyed<C> =
    Gcra<String, DefaultKeyedStateStore<String>, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// Keys kept before idle ones (those back at a full burst) are dropped.
const CLEANUP_AT: usize = 10_000;
/// Checks between two looks at the key count, so the clean-up scan is paid
/// at most once per this many checks, not on every new key.
const CLEANUP_EVERY: u32 = 1024;

/// Rate limits keyed by user (or by sign-in name before an account exists).
pub struct RateLimiter<C: Clock = DefaultClock> {
    /// `None`: a rate of 0 turns the limit off.
    gcra: Option<Keyed<C>>,
    checks: AtomicU32,
}

impl RateLimiter {
    /// `rate_per_sec` tokens added per second up to `burst`; 0 disables.
    pub fn new(rate_per_sec: f64, burst: u32) -> Self {
        Self::with_clock(rate_per_sec, burst, DefaultClock::default())
    }
}

impl<C: Clock> RateLimiter<C> {
    pub fn with_clock(rate_per_sec: f64, burst: u32, clock: C) -> Self {
        let quota = (rate_per_sec > 0.0)
            .then(|| Quota::with_period(Duration::from_secs_f64(1.0 / rate_per_sec)))
            .flatten()
            .map(|q| q.allow_burst(NonZeroU32::new(burst.max(1)).unwrap_or(NonZeroU32::MIN)));
        RateLimiter {
            gcra: quota.map(|q| Gcra::dashmap_with_clock(q, clock)),
            checks: AtomicU32::new(0),
        }
    }

    /// Takes one token for `key`; `false` (and counted) when it has none.
    pub fn check(&self, key: &str) -> bool {
        let Some(gcra) = &self.gcra else {
            return true;
        };
        if self
            .checks
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(CLEANUP_EVERY)
            && gcra.len() >= CLEANUP_AT
        {
            gcra.retain_recent();
        }
        // The map owns its keys: a new key costs one String, a known one
        // none beyond this look-up key.
        if gcra.check_key(&key.to_owned()).is_ok() {
            true
        } else {
            crate::metrics::LOGIC.rate_limited.inc();
            false
        }
    }

    /// Keys currently held (tests; the clean-up keeps this bounded).
    pub fn keys(&self) -> usize {
        self.gcra.as_ref().map_or(0, |g| g.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    #[test]
    fn burst_then_refill_per_key() {
        let clock = FakeRelativeClock::default();
        let l = RateLimiter::with_clock(2.0, 3, clock.clone());
        assert!((0..3).all(|_| l.check("a")));
        assert!(!l.check("a"), "burst used up");
        assert!(l.check("b"), "other users have their own bucket");
        clock.advance(Duration::from_millis(500));
        assert!(l.check("a"), "one token back after 0.5 s at 2/s");
        assert!(!l.check("a"));
        clock.advance(Duration::from_secs(60));
        assert!((0..3).all(|_| l.check("a")), "refills only up to the burst");
        assert!(!l.check("a"));
    }

    #[test]
    fn zero_rate_is_unlimited() {
        let l = RateLimiter::new(0.0, 1);
        assert!((0..1000).all(|_| l.check("a")));
    }

    #[test]
    fn idle_keys_are_dropped_once_there_are_many() {
        let clock = FakeRelativeClock::default();
        let l = RateLimiter::with_clock(10.0, 1, clock.clone());
        for i in 0..CLEANUP_AT {
            assert!(l.check(&i.to_string()));
        }
        assert_eq!(l.keys(), CLEANUP_AT);
        clock.advance(Duration::from_secs(1));
        // The next look at the count comes within CLEANUP_EVERY checks.
        for _ in 0..CLEANUP_EVERY {
            l.check("active");
            clock.advance(Duration::from_millis(100));
        }
        assert!(l.keys() < 10, "idle keys kept: {}", l.keys());
    }
}

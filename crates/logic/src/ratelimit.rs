//! Per-user rate limits: a small token bucket per key, in memory on each
//! logic node (so a user spread over n nodes gets up to n times the rate —
//! a cap on abuse, not an exact quota).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// Entries beyond this trigger a clean-up of full (idle) buckets.
const CLEANUP_AT: usize = 10_000;

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets keyed by user.
pub struct RateLimiter {
    /// Tokens added per second; 0 disables the limit.
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    pub fn new(rate_per_sec: f64, burst: u32) -> Self {
        RateLimiter {
            rate: rate_per_sec,
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `key`; `false` when its bucket is empty.
    pub fn check(&self, key: &str) -> bool {
        self.check_at(key, Instant::now())
    }

    pub fn check_at(&self, key: &str, now: Instant) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= CLEANUP_AT && !map.contains_key(key) {
            let (rate, burst) = (self.rate, self.burst);
            map.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst
            });
        }
        let b = map.entry(key.to_string()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.rate).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            crate::metrics::LOGIC.rate_limited.inc();
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_refill_per_key() {
        let l = RateLimiter::new(2.0, 3);
        let t0 = Instant::now();
        assert!((0..3).all(|_| l.check_at("a", t0)));
        assert!(!l.check_at("a", t0), "burst used up");
        assert!(l.check_at("b", t0), "other users have their own bucket");
        let t1 = t0 + Duration::from_millis(500);
        assert!(l.check_at("a", t1), "one token back after 0.5 s at 2/s");
        assert!(!l.check_at("a", t1));
        let t2 = t1 + Duration::from_secs(60);
        assert!(
            (0..3).all(|_| l.check_at("a", t2)),
            "refills only up to the burst"
        );
        assert!(!l.check_at("a", t2));
    }

    #[test]
    fn zero_rate_is_unlimited() {
        let l = RateLimiter::new(0.0, 1);
        assert!((0..1000).all(|_| l.check("a")));
    }
}

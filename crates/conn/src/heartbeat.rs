//! Heartbeat bookkeeping: how long a client may stay silent, and when a
//! client heartbeat should also renew the session's presence at logic.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
pub struct Heartbeat {
    period: Duration,
    misses: u32,
    last_renew: Instant,
}

impl Heartbeat {
    pub fn new(period: Duration, misses: u32) -> Self {
        Heartbeat {
            period,
            misses,
            last_renew: Instant::now(),
        }
    }

    /// Silence longer than this closes the session.
    pub fn idle_limit(&self) -> Duration {
        self.period * self.misses
    }

    /// True at most once per period: presence is renewed at logic no more
    /// often than the client is expected to beat, however often it does.
    pub fn should_renew(&mut self, now: Instant) -> bool {
        if now.duration_since(self.last_renew) >= self.period {
            self.last_renew = now;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_and_renew_rate() {
        let t0 = Instant::now();
        let mut h = Heartbeat::new(Duration::from_secs(10), 3);
        assert_eq!(h.idle_limit(), Duration::from_secs(30));
        assert!(!h.should_renew(t0 + Duration::from_secs(1)));
        assert!(h.should_renew(t0 + Duration::from_secs(11)));
        assert!(!h.should_renew(t0 + Duration::from_secs(12)));
        assert!(h.should_renew(t0 + Duration::from_secs(22)));
    }
}

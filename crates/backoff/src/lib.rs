//! The one retry policy of the workspace: exponential delay with jitter,
//! capped, reset after a success. NSQ reconnects, etcd re-registration and
//! re-listing, and job's IMPORTANT push retries all wait with it. A crate
//! of its own so that the NSQ client, discovery and job share it without
//! depending on each other.

use std::time::Duration;

use rand::Rng;

/// Exponential retry delay with jitter, so a fleet of nodes does not hammer
/// a server that just came back all at the same instant.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Starts at `initial` and doubles up to `max` (`max` below `initial`
    /// is taken as `initial`: a fixed delay).
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max: max.max(initial),
            next: initial,
        }
    }

    /// A delay in `[d/2, d]`, then doubles `d` up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d.mul_f64(rand::rng().random_range(0.5..=1.0))
    }

    /// After a success: the next failure starts over at `initial`.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        let d: Vec<_> = (0..5).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(50) && d[0] <= Duration::from_millis(100));
        assert!(d[1] >= Duration::from_millis(100) && d[1] <= Duration::from_millis(200));
        assert!(d[4] >= Duration::from_millis(200) && d[4] <= Duration::from_millis(400));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn a_cap_below_the_start_is_a_fixed_delay() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(10));
        assert!((0..4).all(|_| b.next_delay() <= Duration::from_millis(100)));
    }
}

//! Rate-limited logging: a failing node or a flood of poison messages would
//! otherwise write one line per batch. At most one line per period gets
//! through, carrying how many were suppressed since the previous one (the
//! counters in `metrics` stay exact).

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
pub struct LogThrottle {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogThrottle {
    pub fn new(every: Duration) -> Self {
        LogThrottle {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(suppressed)` when a line may be logged now, else counts one
    /// suppressed line and returns `None`.
    pub fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(t) if now.duration_since(t) < self.every => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

impl Default for LogThrottle {
    fn default() -> Self {
        LogThrottle::new(Duration::from_secs(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_period_with_suppressed_count() {
        let mut t = LogThrottle::new(Duration::from_millis(100));
        assert_eq!(t.allow(), Some(0));
        assert_eq!(t.allow(), None);
        assert_eq!(t.allow(), None);
        t.last = Some(Instant::now() - Duration::from_millis(200));
        assert_eq!(t.allow(), Some(2));
    }
}

//! Publish-to-deliver latency: an HDR histogram in microseconds (1 µs to
//! 1 h, 3 significant digits), mergeable across sessions and worker
//! processes, and shipped between processes as `(value, count)` buckets.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest latency kept apart; anything slower is recorded as this.
pub const MAX_US: u64 = 3_600_000_000;

/// A latency histogram.
#[derive(Debug, Clone)]
pub struct Latency {
    hist: Histogram<u64>,
}

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

/// The figures a report shows, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub min_us: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl Latency {
    pub fn new() -> Self {
        Latency {
            hist: Histogram::new_with_bounds(1, MAX_US, 3)
                .expect("static histogram bounds are valid"),
        }
    }

    /// Records one delivery: sent at `sent_ns`, received at `recv_ns` (both
    /// ns since the epoch). A receive time before the send time (clock
    /// steps) counts as zero.
    pub fn record(&mut self, sent_ns: u64, recv_ns: u64) {
        self.record_us(recv_ns.saturating_sub(sent_ns) / 1_000);
    }

    pub fn record_us(&mut self, us: u64) {
        self.hist.saturating_record(us.min(MAX_US));
    }

    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hist.is_empty()
    }

    pub fn reset(&mut self) {
        self.hist.reset();
    }

    /// Adds another histogram's samples to this one.
    pub fn merge(&mut self, other: &Latency) {
        // Same bounds on both sides: `add` cannot fail.
        let _ = self.hist.add(&other.hist);
    }

    /// Value at `q` (0..=1), in µs.
    pub fn quantile_us(&self, q: f64) -> u64 {
        self.hist.value_at_quantile(q)
    }

    pub fn summary(&self) -> LatencySummary {
        if self.hist.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: self.hist.len(),
            min_us: self.hist.min(),
            mean_us: self.hist.mean(),
            p50_us: self.hist.value_at_quantile(0.50),
            p90_us: self.hist.value_at_quantile(0.90),
            p99_us: self.hist.value_at_quantile(0.99),
            p999_us: self.hist.value_at_quantile(0.999),
            max_us: self.hist.max(),
        }
    }

    /// The recorded buckets as `(value_us, count)`, for shipping to the parent.
    pub fn to_buckets(&self) -> Vec<(u64, u64)> {
        self.hist
            .iter_recorded()
            .map(|v| (v.value_iterated_to(), v.count_at_value()))
            .collect()
    }

    /// Rebuilds a histogram from [`Latency::to_buckets`].
    pub fn from_buckets(buckets: &[(u64, u64)]) -> Self {
        let mut l = Latency::new();
        for &(v, n) in buckets {
            let _ = l.hist.record_n(v.min(MAX_US), n);
        }
        l
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_ns_pairs_as_microseconds() {
        let mut l = Latency::new();
        for i in 1..=1000u64 {
            // i ms after a send at t = 5 s.
            l.record(5_000_000_000, 5_000_000_000 + i * 1_000_000);
        }
        let s = l.summary();
        assert_eq!(s.count, 1000);
        let close = |got: u64, want: u64| got.abs_diff(want) * 1000 <= want; // 0.1 %
        assert!(close(s.p50_us, 500_000), "{s:?}");
        assert!(close(s.p99_us, 990_000), "{s:?}");
        assert!(close(s.p999_us, 999_000), "{s:?}");
        assert!(close(s.max_us, 1_000_000), "{s:?}");
        assert!(close(s.min_us, 1_000), "{s:?}");
        assert!((s.mean_us - 500_500.0).abs() < 1_000.0, "{s:?}");
    }

    #[test]
    fn clock_going_back_and_huge_values_are_clamped() {
        let mut l = Latency::new();
        l.record(10_000, 5_000); // received "before" sent
        l.record(0, u64::MAX);
        let s = l.summary();
        assert_eq!(s.count, 2);
        assert_eq!(s.min_us, 0);
        assert!(s.max_us >= MAX_US);
    }

    #[test]
    fn merge_and_buckets_preserve_percentiles() {
        let mut a = Latency::new();
        let mut b = Latency::new();
        for v in 1..=500u64 {
            a.record_us(v * 10);
            b.record_us(v * 10 + 5_000);
        }
        let mut whole = a.clone();
        whole.merge(&b);
        assert_eq!(whole.count(), 1000);
        let shipped = Latency::from_buckets(&a.to_buckets());
        let mut rebuilt = shipped;
        rebuilt.merge(&Latency::from_buckets(&b.to_buckets()));
        assert_eq!(rebuilt.summary().count, whole.summary().count);
        for q in [0.5, 0.9, 0.99, 0.999, 1.0] {
            assert_eq!(rebuilt.quantile_us(q), whole.quantile_us(q), "q {q}");
        }
        assert!(Latency::new().summary() == LatencySummary::default());
    }

    #[test]
    fn reset_empties() {
        let mut l = Latency::new();
        l.record_us(7);
        assert!(!l.is_empty());
        l.reset();
        assert!(l.is_empty());
    }
}

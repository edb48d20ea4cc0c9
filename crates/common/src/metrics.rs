//! Prometheus metrics: one process-wide registry for what the shared
//! libraries count (NSQ client and queue publishing in `chatroom-queue`,
//! discovery in `chatroom-discovery`, logic), each registered by its crate
//! when the service starts using it, plus
//! per-instance registries that a service adds when it is started (conn and
//! job keep their counters per node, as plain atomics, and export them through
//! a [`Collector`] read at scrape time).
//!
//! Nothing here costs a lock or an allocation when counting: counters and
//! gauges are `prometheus-client` atomics, labelled series are created once
//! and kept as handles, and [`Histogram`] is a fixed array of atomic buckets
//! (the crate's own histogram takes a lock per observation). The registry's
//! mutex is taken only to register (start-up) and to encode (a scrape).
//!
//! The text is OpenMetrics (`application/openmetrics-text`), which Prometheus
//! scrapes as it is.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

pub use prometheus_client::collector::Collector;
pub use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
pub use prometheus_client::metrics::MetricType;
pub use prometheus_client::metrics::counter::{ConstCounter, Counter};
pub use prometheus_client::metrics::family::Family;
pub use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
pub use prometheus_client::registry::Registry;

use prometheus_client::encoding::NoLabelSet;
use prometheus_client::metrics::TypedMetric;

/// Content type of [`render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Labels of a labelled family: a few `&'static str` pairs.
pub type Labels = Vec<(&'static str, &'static str)>;

/// Labels whose value is only known at run time (node ids, routes).
pub type DynLabels = Vec<(&'static str, String)>;

static GLOBAL: LazyLock<Mutex<Registry>> =
    LazyLock::new(|| Mutex::new(Registry::with_prefix("chatroom")));

/// Registers into the process-wide registry (start-up only).
pub fn with_global<R>(f: impl FnOnce(&mut Registry) -> R) -> R {
    let mut g = GLOBAL.lock().unwrap_or_else(|p| p.into_inner());
    f(&mut g)
}

/// The process-wide families, then each of `instance`'s, as OpenMetrics
/// text (one `# EOF` at the end).
pub fn render(instance: &[&Registry]) -> String {
    let mut out = String::with_capacity(8192);
    {
        let g = GLOBAL.lock().unwrap_or_else(|p| p.into_inner());
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, &g);
    }
    for r in instance {
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, r);
    }
    let _ = prometheus_client::encoding::text::encode_eof(&mut out);
    out
}

/// Finds the value of one sample in rendered text: `name` plus every
/// `label="value"` given (any order, other labels ignored). Tests and the
/// cluster script read scrapes with it.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        if line.starts_with('#') {
            return None;
        }
        let (series, value) = line.rsplit_once(' ')?;
        let (n, rest) = match series.find('{') {
            Some(i) => (&series[..i], &series[i..]),
            None => (series, ""),
        };
        if n != name {
            return None;
        }
        let all = labels
            .iter()
            .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
        if !all {
            return None;
        }
        value.parse().ok()
    })
}

/// Sum of every sample of `name` (all label values).
pub fn sample_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let n = series.split('{').next()?;
            (n == name).then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// Bucket bounds for latencies, in microseconds (exported in seconds).
pub const LATENCY_US: &[u64] = &[
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// Bucket bounds for counts (messages per batch, queue depths).
pub const COUNT: &[u64] = &[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384];

/// A lock-free histogram: fixed bounds, one atomic per bucket, an atomic
/// sum. Observations are integers (microseconds, items); `divisor` turns
/// them into the exported unit. Clones share the same buckets.
#[derive(Clone, Debug)]
pub struct Histogram(Arc<HistInner>);

#[derive(Debug)]
struct HistInner {
    bounds: &'static [u64],
    /// Non-cumulative; one more than `bounds` (the +Inf bucket).
    counts: Box<[AtomicU64]>,
    sum: AtomicU64,
    /// Observed units per exported unit (1e6: microseconds to seconds).
    divisor: f64,
}

impl Histogram {
    pub fn new(bounds: &'static [u64], divisor: f64) -> Self {
        Histogram(Arc::new(HistInner {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
            divisor,
        }))
    }

    /// Latencies: observe with [`Histogram::observe_duration`], exported in seconds.
    pub fn latency() -> Self {
        Self::new(LATENCY_US, 1e6)
    }

    /// Counts (items per batch, depth), exported as they are.
    pub fn counts() -> Self {
        Self::new(COUNT, 1.0)
    }

    pub fn observe(&self, v: u64) {
        let h = &*self.0;
        let i = h.bounds.partition_point(|b| *b < v);
        h.counts[i].fetch_add(1, Ordering::Relaxed);
        h.sum.fetch_add(v, Ordering::Relaxed);
    }

    pub fn observe_duration(&self, d: Duration) {
        self.observe(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.0
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
}

impl TypedMetric for Histogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        // The encoder takes per-bucket counts and accumulates them itself.
        let h = &*self.0;
        let mut total = 0u64;
        let mut buckets = Vec::with_capacity(h.counts.len());
        for (i, c) in h.counts.iter().enumerate() {
            let n = c.load(Ordering::Relaxed);
            total += n;
            let bound = h.bounds.get(i).map_or(f64::MAX, |b| *b as f64 / h.divisor);
            buckets.push((bound, n));
        }
        let sum = h.sum.load(Ordering::Relaxed) as f64 / h.divisor;
        encoder.encode_histogram::<NoLabelSet>(sum, total, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// A family of [`Histogram`]s created on demand (one per label set).
pub type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

pub fn latency_family<L>() -> HistogramFamily<L>
where
    L: Clone + std::hash::Hash + Eq + prometheus_client::encoding::EncodeLabelSet,
{
    Family::new_with_constructor(Histogram::latency as fn() -> Histogram)
}

/// Encodes one counter or gauge of a collector from a plain value.
pub fn encode_counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(v);
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}

pub fn encode_gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: i64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(v);
    g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
}

/// A counter family of a collector, one sample per `(label value, count)`.
pub fn encode_counter_family(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &'static str,
    values: &[(&'static str, u64)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (value, n) in values {
        let labels = [(label, *value)];
        ConstCounter::new(*n).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A gauge family of a collector, one sample per `(label value, value)`.
pub fn encode_gauge_family(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &'static str,
    values: &[(&'static str, i64)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (value, n) in values {
        let labels = [(label, *value)];
        ConstGauge::new(*n).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A histogram of a collector.
pub fn encode_histogram(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    h: &Histogram,
) -> Result<(), std::fmt::Error> {
    h.encode(enc.encode_descriptor(name, help, None, MetricType::Histogram)?)
}

/// The family names a rendered text declares (tests, `--check-config`).
pub fn family_names(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_once(' ').map(|(n, _)| n.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_scaled() {
        let h = Histogram::latency();
        h.observe_duration(Duration::from_micros(80));
        h.observe_duration(Duration::from_millis(3));
        h.observe_duration(Duration::from_secs(60));
        let mut r = Registry::default();
        r.register("lat_seconds", "x", h.clone());
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &r).unwrap();
        assert_eq!(sample(&s, "lat_seconds_count", &[]), Some(3.0), "{s}");
        assert_eq!(
            sample(&s, "lat_seconds_bucket", &[("le", "0.0001")]),
            Some(1.0),
            "{s}"
        );
        assert_eq!(
            sample(&s, "lat_seconds_bucket", &[("le", "0.005")]),
            Some(2.0),
            "{s}"
        );
        assert_eq!(
            sample(&s, "lat_seconds_bucket", &[("le", "+Inf")]),
            Some(3.0),
            "{s}"
        );
        let sum = sample(&s, "lat_seconds_sum", &[]).unwrap();
        assert!((sum - 60.00308).abs() < 1e-6, "{sum}");
        assert_eq!(h.count(), 3);
    }

    #[test]
    fn render_lists_global_families_once_with_one_eof() {
        static C: LazyLock<Counter> = LazyLock::new(|| {
            let c = Counter::default();
            with_global(|r| r.register("render_test", "x", c.clone()));
            c
        });
        C.inc();
        let s = render(&[]);
        assert!(s.contains("# TYPE chatroom_render_test counter"), "{s}");
        assert!(sample(&s, "chatroom_render_test_total", &[]).unwrap() >= 1.0);
        assert_eq!(s.matches("# EOF").count(), 1);
        assert!(s.ends_with("# EOF\n"));
    }
}

//! The queue's Prometheus families in the process-wide registry: the NSQ
//! client's (`chatroom_nsq_*`) and publishing (`chatroom_queue_*`).

use std::sync::LazyLock;

use chatroom_common::metrics::{Counter, Histogram, with_global};
/// The NSQ client's families, registered by [`init`].
pub use chatroom_nsq::metrics::{NSQ, NsqMetrics};

/// Registers the queue's families now, so that a scrape lists them before
/// the first message (publishers and subscribers call it when they start).
pub fn init() {
    static NSQ_REGISTERED: std::sync::Once = std::sync::Once::new();
    NSQ_REGISTERED.call_once(|| with_global(|r| NSQ.register(r.sub_registry_with_prefix("nsq"))));
    LazyLock::force(&QUEUE);
}

/// Publishing to the queue (logic).
#[derive(Debug)]
pub struct QueueMetrics {
    pub published: Counter,
    pub publish_errors: Counter,
    pub publish_latency: Histogram,
}

pub static QUEUE: LazyLock<QueueMetrics> = LazyLock::new(|| {
    let m = QueueMetrics {
        published: Counter::default(),
        publish_errors: Counter::default(),
        publish_latency: Histogram::latency(),
    };
    with_global(|r| {
        let r = r.sub_registry_with_prefix("queue");
        r.register("published", "Messages published", m.published.clone());
        r.register(
            "publish_errors",
            "Publishes that failed",
            m.publish_errors.clone(),
        );
        r.register(
            "publish_latency_seconds",
            "Time to publish one message (until nsqd answers OK)",
            m.publish_latency.clone(),
        );
    });
    m
});

#[cfg(test)]
mod tests {
    use chatroom_common::metrics::{render, sample};

    use super::*;

    #[test]
    fn render_lists_the_nsq_families_once_registered() {
        init();
        NSQ.producer_reconnects.inc();
        let s = render(&[]);
        assert!(s.contains("# TYPE chatroom_nsq_reconnects counter"), "{s}");
        assert!(
            sample(&s, "chatroom_nsq_reconnects_total", &[("role", "producer")]).unwrap() >= 1.0
        );
        assert!(s.contains("# TYPE chatroom_queue_published counter"), "{s}");
        assert_eq!(s.matches("# EOF").count(), 1);
    }
}

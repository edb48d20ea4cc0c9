//! The NSQ client's metrics: lock-free `prometheus-client` handles, made
//! once per process and counted on every connection, message and poll. The
//! application exposes them by calling [`NsqMetrics::register`] with its
//! registry (the client itself serves nothing).

use std::sync::LazyLock;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of a labelled family: a few `&'static str` pairs.
pub type Labels = Vec<(&'static str, &'static str)>;

/// The NSQ client's families (all connections of the process).
#[derive(Debug)]
pub struct NsqMetrics {
    /// Live nsqd connections, by role (`producer`, `consumer`).
    pub connections: Family<Labels, Gauge>,
    /// Connection attempts after a lost or failed connection, by role.
    pub reconnects: Family<Labels, Counter>,
    /// RDY last sent, summed over consumer connections.
    pub rdy: Gauge,
    /// Messages received and not yet FINed/REQed, over consumer connections.
    pub in_flight: Gauge,
    /// Messages received from nsqd.
    pub received: Counter,
    /// 1 when the last nsqlookupd poll got an answer.
    pub lookupd_up: Gauge,
    /// nsqd nodes the last nsqlookupd poll listed for the topic.
    pub lookupd_nsqds: Gauge,
    /// nsqlookupd polls that no nsqlookupd answered.
    pub lookupd_errors: Counter,
    pub producer_connections: Gauge,
    pub consumer_connections: Gauge,
    pub producer_reconnects: Counter,
    pub consumer_reconnects: Counter,
}

/// The process's NSQ families (all its producers and consumers).
pub static NSQ: LazyLock<NsqMetrics> = LazyLock::new(|| {
    let connections = Family::<Labels, Gauge>::default();
    let reconnects = Family::<Labels, Counter>::default();
    NsqMetrics {
        producer_connections: connections.get_or_create_owned(&vec![("role", "producer")]),
        consumer_connections: connections.get_or_create_owned(&vec![("role", "consumer")]),
        producer_reconnects: reconnects.get_or_create_owned(&vec![("role", "producer")]),
        consumer_reconnects: reconnects.get_or_create_owned(&vec![("role", "consumer")]),
        connections,
        reconnects,
        rdy: Gauge::default(),
        in_flight: Gauge::default(),
        received: Counter::default(),
        lookupd_up: Gauge::default(),
        lookupd_nsqds: Gauge::default(),
        lookupd_errors: Counter::default(),
    }
});

impl NsqMetrics {
    /// Adds every family to `r` (under the caller's prefix, e.g. `nsq`).
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "connections",
            "Live nsqd connections by role",
            self.connections.clone(),
        );
        r.register(
            "reconnects",
            "nsqd connection attempts after a lost or failed connection, by role",
            self.reconnects.clone(),
        );
        r.register(
            "rdy",
            "RDY last sent, summed over consumer connections",
            self.rdy.clone(),
        );
        r.register(
            "in_flight",
            "Messages received from nsqd and not yet FINed or REQed",
            self.in_flight.clone(),
        );
        r.register(
            "messages_received",
            "Messages received from nsqd",
            self.received.clone(),
        );
        r.register(
            "lookupd_up",
            "1 when the last nsqlookupd poll was answered",
            self.lookupd_up.clone(),
        );
        r.register(
            "lookupd_nsqds",
            "nsqd nodes nsqlookupd listed for the topic at the last poll",
            self.lookupd_nsqds.clone(),
        );
        r.register(
            "lookupd_errors",
            "nsqlookupd polls that no nsqlookupd answered",
            self.lookupd_errors.clone(),
        );
    }
}

//! Service discovery's Prometheus families (`chatroom_discovery_*`) in the
//! process-wide registry.

use std::sync::LazyLock;

use chatroom_common::metrics::{Counter, Family, Gauge, Labels, with_global};

/// Registers discovery's families now, so that a scrape lists them before
/// the first change ([`crate::Discovery::connect`] calls it).
pub fn init() {
    LazyLock::force(&DISCOVERY);
}

/// Service discovery's families.
#[derive(Debug)]
pub struct DiscoveryMetrics {
    /// Nodes known by service watched (`conn`, `logic`).
    pub nodes: Family<Labels, Gauge>,
    pub conn_nodes: Gauge,
    pub logic_nodes: Gauge,
    /// Lease keep-alives that failed (etcd).
    pub lease_renewals_failed: Counter,
    /// Lease keep-alives answered.
    pub lease_renewals: Counter,
    /// Registrations of this process currently held.
    pub registered: Gauge,
}

pub static DISCOVERY: LazyLock<DiscoveryMetrics> = LazyLock::new(|| {
    let nodes = Family::<Labels, Gauge>::default();
    let m = DiscoveryMetrics {
        conn_nodes: nodes.get_or_create_owned(&vec![("service", "conn")]),
        logic_nodes: nodes.get_or_create_owned(&vec![("service", "logic")]),
        nodes,
        lease_renewals_failed: Counter::default(),
        lease_renewals: Counter::default(),
        registered: Gauge::default(),
    };
    with_global(|r| {
        let r = r.sub_registry_with_prefix("discovery");
        r.register("nodes", "Nodes known, by service watched", m.nodes.clone());
        r.register(
            "lease_renewals_failed",
            "etcd lease keep-alives that failed",
            m.lease_renewals_failed.clone(),
        );
        r.register(
            "lease_renewals",
            "etcd lease keep-alives answered",
            m.lease_renewals.clone(),
        );
        r.register(
            "registrations",
            "Registrations this process holds",
            m.registered.clone(),
        );
    });
    m
});

impl DiscoveryMetrics {
    pub fn nodes_of(&self, service: &str) -> &Gauge {
        if service == "conn" {
            &self.conn_nodes
        } else {
            &self.logic_nodes
        }
    }
}

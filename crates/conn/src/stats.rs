//! Counters of this conn node, logged periodically and readable by tests.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::room::PushStats;

#[derive(Debug, Default)]
pub struct Stats {
    pub sessions: AtomicU64,
    pub accepted: AtomicU64,
    pub refused: AtomicU64,
    pub pushes: AtomicU64,
    pub delivered: AtomicU64,
    pub dropped: AtomicU64,
    pub slow_disconnects: AtomicU64,
    pub bad_frames: AtomicU64,
}

impl Stats {
    pub fn record_push(&self, st: PushStats) {
        self.pushes.fetch_add(1, Ordering::Relaxed);
        self.delivered
            .fetch_add(st.delivered as u64, Ordering::Relaxed);
        self.dropped.fetch_add(st.dropped as u64, Ordering::Relaxed);
        self.slow_disconnects
            .fetch_add(st.disconnected as u64, Ordering::Relaxed);
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

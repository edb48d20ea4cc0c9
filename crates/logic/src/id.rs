//! Time-ordered unique message ids.
//!
//! Layout of the 63 used bits, most significant first:
//! `| 41 bits ms since 2024-01-01 | 10 bits node | 12 bits sequence |`.
//! Ids from one node strictly increase; ids from different nodes sort by the
//! millisecond they were made in (good enough for "newest last" in clients and
//! for job to tell messages apart). 41 bits of milliseconds last until 2093.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// 2024-01-01T00:00:00Z in Unix milliseconds.
const EPOCH_MS: u64 = 1_704_067_200_000;
const SEQ_BITS: u32 = 12;
const NODE_BITS: u32 = 10;
const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;
/// Largest node number that fits the node bits.
pub const MAX_NODE: u16 = (1 << NODE_BITS) - 1;

/// Makes ids for one logic node. Lock-free: one compare-and-swap per id.
#[derive(Debug)]
pub struct IdGen {
    node: u64,
    /// `ms << SEQ_BITS | seq` of the last id handed out. Taking
    /// `max(now << SEQ_BITS, last + 1)` means a sequence overflow borrows the
    /// next millisecond and a clock that steps back never repeats an id.
    last: AtomicU64,
}

impl IdGen {
    /// A generator for node number `node` (only its low 10 bits are used).
    pub fn new(node: u16) -> Self {
        IdGen {
            node: u64::from(node & MAX_NODE),
            last: AtomicU64::new(0),
        }
    }

    /// A node number derived from the node id, for when none is configured.
    /// Two nodes may collide (1 in 1024); configure `id_node` to rule it out.
    pub fn node_from_id(id: &str) -> u16 {
        // FNV-1a: stable across builds and platforms, unlike `DefaultHasher`.
        let mut h: u32 = 0x811c_9dc5;
        for b in id.bytes() {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
        (h ^ (h >> 16)) as u16 & MAX_NODE
    }

    /// The next id.
    pub fn next_id(&self) -> u64 {
        let now = now_ms().saturating_sub(EPOCH_MS) << SEQ_BITS;
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let next = now.max(last + 1);
            match self
                .last
                .compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return self.compose(next),
                Err(actual) => last = actual,
            }
        }
    }

    fn compose(&self, state: u64) -> u64 {
        let ms = state >> SEQ_BITS;
        let seq = state & SEQ_MASK;
        (ms << (NODE_BITS + SEQ_BITS)) | (self.node << SEQ_BITS) | seq
    }
}

/// The Unix time in milliseconds of an id.
pub fn timestamp_ms(id: u64) -> u64 {
    (id >> (NODE_BITS + SEQ_BITS)) + EPOCH_MS
}

/// The node number of an id.
pub fn node_of(id: u64) -> u16 {
    ((id >> SEQ_BITS) & u64::from(MAX_NODE)) as u16
}

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::Arc;

    #[test]
    fn ids_increase_and_carry_time_and_node() {
        let g = IdGen::new(5);
        let before = now_ms();
        let mut prev = 0;
        // More than one millisecond's worth of sequence numbers, so the
        // overflow path is exercised.
        for _ in 0..10_000 {
            let id = g.next_id();
            assert!(id > prev, "ids must strictly increase: {id} after {prev}");
            assert_eq!(node_of(id), 5);
            prev = id;
        }
        let ts = timestamp_ms(prev);
        // 10 000 ids can borrow at most 3 ms from the future.
        assert!(
            ts >= before && ts <= now_ms() + 3,
            "ts {ts} not near {before}"
        );
    }

    #[test]
    fn unique_across_threads() {
        let g = Arc::new(IdGen::new(MAX_NODE));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let g = g.clone();
                std::thread::spawn(move || {
                    let mut v = Vec::with_capacity(20_000);
                    let mut prev = 0;
                    for _ in 0..20_000 {
                        let id = g.next_id();
                        // Each thread sees its own ids in increasing order too.
                        assert!(id > prev);
                        prev = id;
                        v.push(id);
                    }
                    v
                })
            })
            .collect();
        let mut all = HashSet::new();
        for t in threads {
            for id in t.join().expect("id thread panicked") {
                assert!(all.insert(id), "duplicate id {id}");
            }
        }
        assert_eq!(all.len(), 80_000);
    }

    #[test]
    fn different_nodes_never_collide() {
        let a = IdGen::new(1);
        let b = IdGen::new(2);
        let ids: HashSet<u64> = (0..1000).flat_map(|_| [a.next_id(), b.next_id()]).collect();
        assert_eq!(ids.len(), 2000);
    }

    #[test]
    fn node_from_id_is_stable_and_in_range() {
        assert_eq!(
            IdGen::node_from_id("logic-a"),
            IdGen::node_from_id("logic-a")
        );
        assert!(IdGen::node_from_id("whatever") <= MAX_NODE);
        assert_ne!(
            IdGen::node_from_id("logic-1"),
            IdGen::node_from_id("logic-2")
        );
    }
}

//! Time-ordered unique message ids.
//!
//! Room messages (`RoomMsg.id`) use 63 bits, most significant first:
//! `| 41 bits ms since 2024-01-01 | 10 bits node | 12 bits sequence |`.
//! IM messages (`ChatMsg.id`) travel in JSON, so they must stay exact in
//! JavaScript (at most 2^53 - 1) and use 53 bits:
//! `| 41 bits ms since 2024-01-01 | 6 bits node | 6 bits sequence |`
//! (the low 6 bits of the node number; 64 ids per millisecond per node).
//! Ids from one node strictly increase; ids from different nodes sort by the
//! millisecond they were made in. 41 bits of milliseconds last until 2093.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// 2024-01-01T00:00:00Z in Unix milliseconds.
const EPOCH_MS: u64 = 1_704_067_200_000;
const SEQ_BITS: u32 = 12;
const NODE_BITS: u32 = 10;
/// Largest node number that fits the node bits.
pub const MAX_NODE: u16 = (1 << NODE_BITS) - 1;
/// Bits of an IM message id (`2^53 - 1` is JavaScript's largest exact integer).
pub const CHAT_ID_BITS: u32 = 53;
const CHAT_NODE_BITS: u32 = 6;
const CHAT_SEQ_BITS: u32 = 6;

/// Where node and sequence sit in an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    node_bits: u32,
    seq_bits: u32,
}

const ROOM: Layout = Layout {
    node_bits: NODE_BITS,
    seq_bits: SEQ_BITS,
};
const CHAT: Layout = Layout {
    node_bits: CHAT_NODE_BITS,
    seq_bits: CHAT_SEQ_BITS,
};

/// Makes ids for one logic node. Lock-free: one compare-and-swap per id.
#[derive(Debug)]
pub struct IdGen {
    layout: Layout,
    node: u64,
    /// `ms << seq_bits | seq` of the last id handed out. Taking
    /// `max(now << seq_bits, last + 1)` means a sequence overflow borrows the
    /// next millisecond and a clock that steps back never repeats an id.
    last: AtomicU64,
}

impl IdGen {
    /// A room-message generator for node number `node` (only its low 10
    /// bits are used).
    pub fn new(node: u16) -> Self {
        Self::with_layout(ROOM, node)
    }

    /// An IM-message generator (53-bit ids) for node number `node` (only its
    /// low 6 bits are used).
    pub fn chat(node: u16) -> Self {
        Self::with_layout(CHAT, node)
    }

    fn with_layout(layout: Layout, node: u16) -> Self {
        IdGen {
            layout,
            node: u64::from(node) & ((1 << layout.node_bits) - 1),
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
        let now = now_ms().saturating_sub(EPOCH_MS) << self.layout.seq_bits;
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
        let Layout {
            node_bits,
            seq_bits,
        } = self.layout;
        let ms = state >> seq_bits;
        let seq = state & ((1 << seq_bits) - 1);
        (ms << (node_bits + seq_bits)) | (self.node << seq_bits) | seq
    }
}

/// The Unix time in milliseconds of a room-message id.
pub fn timestamp_ms(id: u64) -> u64 {
    (id >> (NODE_BITS + SEQ_BITS)) + EPOCH_MS
}

/// The node number of a room-message id.
pub fn node_of(id: u64) -> u16 {
    ((id >> SEQ_BITS) & u64::from(MAX_NODE)) as u16
}

/// The Unix time in milliseconds of an IM-message id.
pub fn chat_timestamp_ms(id: u64) -> u64 {
    (id >> (CHAT_NODE_BITS + CHAT_SEQ_BITS)) + EPOCH_MS
}

/// The node number (low 6 bits) of an IM-message id.
pub fn chat_node_of(id: u64) -> u16 {
    ((id >> CHAT_SEQ_BITS) & ((1 << CHAT_NODE_BITS) - 1)) as u16
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

    #[test]
    fn chat_ids_fit_javascript_and_increase() {
        let g = IdGen::chat(1000); // low 6 bits: 40
        let before = now_ms();
        let mut prev = 0;
        for _ in 0..5_000 {
            let id = g.next_id();
            assert!(id > prev);
            assert!(id < 1 << CHAT_ID_BITS, "{id} is not exact in JavaScript");
            assert_eq!(chat_node_of(id), 1000 & 63);
            prev = id;
        }
        let ts = chat_timestamp_ms(prev);
        // 5 000 ids at 64 per ms borrow at most ~80 ms from the future.
        assert!(
            ts >= before && ts <= now_ms() + 100,
            "ts {ts} not near {before}"
        );
        // The last millisecond that fits is still decades away.
        let max_ms = ((1u64 << CHAT_ID_BITS) - 1) >> (CHAT_NODE_BITS + CHAT_SEQ_BITS);
        assert!(
            max_ms + EPOCH_MS > 3_900_000_000_000,
            "chat ids run out before 2093"
        );
    }

    #[test]
    fn chat_ids_of_different_nodes_never_collide() {
        let a = IdGen::chat(1);
        let b = IdGen::chat(2);
        let ids: HashSet<u64> = (0..1000).flat_map(|_| [a.next_id(), b.next_id()]).collect();
        assert_eq!(ids.len(), 2000);
    }
}

//! Per-room merging: messages of one room are collected into one
//! `|len|data|len|data|` buffer (the seed's merged sending) and flushed as a
//! batch. The rule adapts to load:
//!
//! - a room that has not flushed for `window` is **quiet**: its next
//!   message is flushed at once, alone (light load pays no batching delay);
//! - after a flush the room is **busy** for one window: messages gather and
//!   go out together when the window ends, so a room costs at most one batch
//!   per window however fast its messages come (plus the limits below);
//! - whatever the state, a batch is flushed when it has `max_messages`, when
//!   the next message would push it past `max_bytes`, and at once when an
//!   IMPORTANT message arrives (with the NORMAL ones before it, in order).
//!
//! A batch is IMPORTANT if any message in it is. Each message carries the
//! room stream offset logic gave it; a batch holds one epoch only (a new
//! epoch flushes what is pending first).
//!
//! One task owns a `Batcher` (no lock). It is generic over the token carried
//! with each message (the queue `Delivery` in production) and takes `now` as
//! an argument, so its timing is tested without a clock.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::Duration;

use bytes::Bytes;
use chatroom_common::batch::{BatchBuilder, HEAD_LEN};
use chatroom_common::proto::protocol::MsgLevel;
use tokio::time::Instant;

use crate::config::BatchConfig;

/// Why a batch was flushed (for logs and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushReason {
    Count,
    Bytes,
    Window,
    Important,
    /// The room was quiet: its first message goes at once.
    Quiet,
    /// The next message belongs to another epoch of the room's stream.
    Epoch,
    Drain,
}

/// One room's merged messages, encoded once.
#[derive(Debug)]
pub struct Flushed<T> {
    pub room_id: String,
    pub level: MsgLevel,
    /// `|len1|data1|len2|data2|...`
    pub data: Bytes,
    /// One per message, in order.
    pub tokens: Vec<T>,
    /// The room stream offset of each message, in order (0: unsequenced).
    pub offsets: Vec<u64>,
    pub epoch: u64,
    pub reason: FlushReason,
}

/// Where a message sits in its room's stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Seq {
    pub offset: u64,
    pub epoch: u64,
}

struct Room<T> {
    builder: BatchBuilder,
    tokens: Vec<T>,
    offsets: Vec<u64>,
    epoch: u64,
    important: bool,
    /// When the current window ends: pending messages flush then; with
    /// nothing pending the room is quiet again from then on.
    deadline: Instant,
}

pub struct Batcher<T> {
    max_messages: usize,
    max_bytes: usize,
    window: Duration,
    /// Rooms with pending messages, or busy (flushed within the window).
    rooms: HashMap<String, Room<T>>,
    /// Window ends, earliest first. Entries are not removed when a room
    /// flushes early; a popped entry counts only if its room is still
    /// there and due, so stale ones just expire.
    deadlines: BinaryHeap<Reverse<(Instant, String)>>,
}

impl<T> Batcher<T> {
    pub fn new(cfg: &BatchConfig) -> Self {
        Batcher {
            max_messages: cfg.max_messages.max(1),
            max_bytes: cfg.max_bytes,
            window: cfg.window,
            rooms: HashMap::new(),
            deadlines: BinaryHeap::new(),
        }
    }

    /// Adds one message; any batch this completes is appended to `out`
    /// (up to two: the pending ones that this message would overflow or
    /// that belong to another epoch, then this message's own if it is
    /// IMPORTANT, alone exceeds a limit or finds the room quiet).
    #[allow(clippy::too_many_arguments)]
    pub fn push(
        &mut self,
        now: Instant,
        room_id: &str,
        level: MsgLevel,
        data: &[u8],
        seq: Seq,
        token: T,
        out: &mut Vec<Flushed<T>>,
    ) {
        let size = HEAD_LEN + data.len();
        if let Some(room) = self.rooms.get(room_id)
            && !room.tokens.is_empty()
        {
            // Keep batches within max_bytes and within one epoch: what is
            // pending goes first.
            if room.builder.bytes_len() + size > self.max_bytes {
                out.push(self.flush(room_id, now, FlushReason::Bytes));
            } else if room.epoch != seq.epoch {
                out.push(self.flush(room_id, now, FlushReason::Epoch));
            }
        }
        // A room whose window ended with nothing pending is quiet again.
        if self
            .rooms
            .get(room_id)
            .is_some_and(|r| r.tokens.is_empty() && r.deadline <= now)
        {
            self.rooms.remove(room_id);
        }
        let quiet = !self.rooms.contains_key(room_id);
        let room = self
            .rooms
            .entry(room_id.to_owned())
            .or_insert_with(|| Room {
                builder: BatchBuilder::default(),
                tokens: Vec::new(),
                offsets: Vec::new(),
                epoch: seq.epoch,
                important: false,
                deadline: now,
            });
        if room.tokens.is_empty() {
            room.epoch = seq.epoch;
        }
        room.builder.push(data);
        room.tokens.push(token);
        room.offsets.push(seq.offset);
        room.important |= level == MsgLevel::Important;
        let reason = if level == MsgLevel::Important {
            Some(FlushReason::Important)
        } else if quiet {
            Some(FlushReason::Quiet)
        } else if room.builder.len() >= self.max_messages {
            Some(FlushReason::Count)
        } else if room.builder.bytes_len() >= self.max_bytes {
            Some(FlushReason::Bytes)
        } else {
            None
        };
        if let Some(reason) = reason {
            out.push(self.flush(room_id, now, reason));
        }
    }

    /// When the earliest window may end (possibly a stale entry, which only
    /// costs a wake-up), `None` when nothing is pending or busy.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.peek().map(|Reverse((t, _))| *t)
    }

    /// Flushes every room whose window has ended by `now`; rooms whose
    /// window ended with nothing pending become quiet.
    pub fn flush_expired(&mut self, now: Instant, out: &mut Vec<Flushed<T>>) {
        while let Some(Reverse((t, _))) = self.deadlines.peek() {
            if *t > now {
                break;
            }
            let Some(Reverse((_, room_id))) = self.deadlines.pop() else {
                break;
            };
            let Some(room) = self.rooms.get(&room_id) else {
                continue;
            };
            if room.deadline > now {
                continue;
            }
            if room.tokens.is_empty() {
                self.rooms.remove(&room_id);
            } else {
                out.push(self.flush(&room_id, now, FlushReason::Window));
            }
        }
    }

    /// Flushes every pending room now (shutdown).
    pub fn flush_all(&mut self, out: &mut Vec<Flushed<T>>) {
        let rooms: Vec<String> = self
            .rooms
            .iter()
            .filter(|(_, r)| !r.tokens.is_empty())
            .map(|(k, _)| k.clone())
            .collect();
        let now = Instant::now();
        for room_id in rooms {
            out.push(self.flush(&room_id, now, FlushReason::Drain));
        }
        self.rooms.clear();
        self.deadlines.clear();
    }

    /// Rooms with pending messages.
    pub fn pending_rooms(&self) -> usize {
        self.rooms.values().filter(|r| !r.tokens.is_empty()).count()
    }

    /// Takes the room's pending messages as a batch and starts its busy
    /// window: what arrives until `now + window` waits for the window end.
    fn flush(&mut self, room_id: &str, now: Instant, reason: FlushReason) -> Flushed<T> {
        let window = self.window;
        let room = self.rooms.get_mut(room_id).expect("flushing a known room");
        let deadline = now + window;
        if room.deadline != deadline {
            room.deadline = deadline;
            self.deadlines.push(Reverse((deadline, room_id.to_owned())));
        }
        let important = std::mem::take(&mut room.important);
        Flushed {
            room_id: room_id.to_owned(),
            level: if important {
                MsgLevel::Important
            } else {
                MsgLevel::Normal
            },
            data: room.builder.take(),
            tokens: std::mem::take(&mut room.tokens),
            offsets: std::mem::take(&mut room.offsets),
            epoch: room.epoch,
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use chatroom_common::batch::decode;

    use super::*;

    const N: MsgLevel = MsgLevel::Normal;
    const I: MsgLevel = MsgLevel::Important;

    fn batcher(max_messages: usize, window_ms: u64, max_bytes: usize) -> Batcher<u32> {
        Batcher::new(&BatchConfig {
            max_messages,
            window: Duration::from_millis(window_ms),
            max_bytes,
        })
    }

    fn msgs(f: &Flushed<u32>) -> Vec<Vec<u8>> {
        decode(&f.data).map(|m| m.unwrap().to_vec()).collect()
    }

    fn push_seq(
        b: &mut Batcher<u32>,
        now: Instant,
        room: &str,
        lv: MsgLevel,
        data: &str,
        t: u32,
        seq: Seq,
    ) -> Vec<Flushed<u32>> {
        let mut out = Vec::new();
        b.push(now, room, lv, data.as_bytes(), seq, t, &mut out);
        out
    }

    fn push(
        b: &mut Batcher<u32>,
        now: Instant,
        room: &str,
        lv: MsgLevel,
        data: &str,
        t: u32,
    ) -> Vec<Flushed<u32>> {
        let seq = Seq {
            offset: u64::from(t),
            epoch: 1,
        };
        push_seq(b, now, room, lv, data, t, seq)
    }

    /// Makes `room` busy: one message, flushed at once because it was quiet.
    fn busy(b: &mut Batcher<u32>, now: Instant, room: &str) {
        let out = push(b, now, room, N, "first", 0);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].reason, FlushReason::Quiet);
    }

    #[test]
    fn a_quiet_room_flushes_at_once_a_busy_one_once_per_window() {
        let mut b = batcher(100, 10, 1 << 20);
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        busy(&mut b, t0, "r");
        // Within the window: gathered.
        assert!(push(&mut b, t0 + ms(2), "r", N, "a", 1).is_empty());
        assert!(push(&mut b, t0 + ms(6), "r", N, "b", 2).is_empty());
        assert_eq!(b.next_deadline(), Some(t0 + ms(10)));
        let mut out = Vec::new();
        b.flush_expired(t0 + ms(9), &mut out);
        assert!(out.is_empty(), "window not over yet");
        b.flush_expired(t0 + ms(10), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].reason, FlushReason::Window);
        assert_eq!(msgs(&out[0]), vec![b"a".to_vec(), b"b".to_vec()]);
        assert_eq!((out[0].offsets.clone(), out[0].epoch), (vec![1, 2], 1));
        // That flush started another busy window.
        assert!(push(&mut b, t0 + ms(15), "r", N, "c", 3).is_empty());
        out.clear();
        b.flush_expired(t0 + ms(20), &mut out);
        assert_eq!(msgs(&out[0]), vec![b"c".to_vec()]);
        // A window that ends with nothing pending makes the room quiet.
        out.clear();
        b.flush_expired(t0 + ms(30), &mut out);
        assert!(out.is_empty());
        assert_eq!(b.next_deadline(), None);
        let out = push(&mut b, t0 + ms(31), "r", N, "d", 4);
        assert_eq!((out.len(), out[0].reason), (1, FlushReason::Quiet));
        // Quiet also when the window end was not processed yet.
        let out = push(&mut b, t0 + ms(50), "r", N, "e", 5);
        assert_eq!((out.len(), out[0].reason), (1, FlushReason::Quiet));
    }

    #[test]
    fn flushes_on_count_with_content_in_order() {
        let mut b = batcher(3, 1000, 1 << 20);
        let t0 = Instant::now();
        busy(&mut b, t0, "r");
        assert!(push(&mut b, t0, "r", N, "one", 1).is_empty());
        assert!(push(&mut b, t0, "r", N, "two", 2).is_empty());
        let out = push(&mut b, t0, "r", N, "three", 3);
        assert_eq!(out.len(), 1);
        let f = &out[0];
        assert_eq!(
            (f.room_id.as_str(), f.level, f.reason),
            ("r", N, FlushReason::Count)
        );
        assert_eq!(
            msgs(f),
            vec![b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]
        );
        assert_eq!(f.tokens, vec![1, 2, 3]);
        assert_eq!(f.offsets, vec![1, 2, 3]);
        assert_eq!(b.pending_rooms(), 0);
    }

    #[test]
    fn flushes_before_exceeding_max_bytes() {
        // Each 6-byte message costs 10 bytes encoded.
        let mut b = batcher(100, 1000, 25);
        let t0 = Instant::now();
        busy(&mut b, t0, "r");
        assert!(push(&mut b, t0, "r", N, "aaaaaa", 1).is_empty());
        assert!(push(&mut b, t0, "r", N, "bbbbbb", 2).is_empty());
        // A third would make 30 > 25: the first two go out alone.
        let out = push(&mut b, t0, "r", N, "cccccc", 3);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].reason, FlushReason::Bytes);
        assert!(out[0].data.len() <= 25);
        assert_eq!(msgs(&out[0]), vec![b"aaaaaa".to_vec(), b"bbbbbb".to_vec()]);
        assert_eq!(b.pending_rooms(), 1);
        // One message bigger than the limit is sent alone, at once.
        let big = "x".repeat(40);
        let out = push(&mut b, t0, "r", N, &big, 4);
        assert_eq!(out.len(), 2);
        assert_eq!(msgs(&out[0]), vec![b"cccccc".to_vec()]);
        assert_eq!(msgs(&out[1]), vec![big.as_bytes().to_vec()]);
        assert_eq!(out[1].reason, FlushReason::Bytes);
        assert_eq!(b.pending_rooms(), 0);
    }

    #[test]
    fn important_flushes_at_once_with_the_normal_ones_before_it() {
        let mut b = batcher(100, 1000, 1 << 20);
        let t0 = Instant::now();
        busy(&mut b, t0, "r");
        push(&mut b, t0, "r", N, "n1", 1);
        push(&mut b, t0, "r", N, "n2", 2);
        let out = push(&mut b, t0, "r", I, "i3", 3);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].level, out[0].reason), (I, FlushReason::Important));
        assert_eq!(
            msgs(&out[0]),
            vec![b"n1".to_vec(), b"n2".to_vec(), b"i3".to_vec()]
        );
        assert_eq!(out[0].tokens, vec![1, 2, 3]);
        // A NORMAL message after it starts a NORMAL batch.
        push(&mut b, t0, "r", N, "n4", 4);
        let mut out = Vec::new();
        b.flush_all(&mut out);
        assert_eq!((out[0].level, out[0].reason), (N, FlushReason::Drain));
    }

    #[test]
    fn a_batch_split_by_bytes_keeps_its_own_level() {
        // The NORMAL messages flushed to make room stay a NORMAL batch; the
        // IMPORTANT one that did not fit goes out alone as IMPORTANT.
        let mut b = batcher(100, 1000, 15);
        let t0 = Instant::now();
        busy(&mut b, t0, "r");
        push(&mut b, t0, "r", N, "n1", 1);
        push(&mut b, t0, "r", N, "n2", 2);
        let out = push(&mut b, t0, "r", I, "i3", 3);
        assert_eq!(out.len(), 2);
        assert_eq!((out[0].level, out[0].tokens.clone()), (N, vec![1, 2]));
        assert_eq!((out[1].level, out[1].tokens.clone()), (I, vec![3]));
    }

    #[test]
    fn a_new_epoch_flushes_what_is_pending_first() {
        let mut b = batcher(100, 1000, 1 << 20);
        let t0 = Instant::now();
        busy(&mut b, t0, "r");
        let s = |offset, epoch| Seq { offset, epoch };
        assert!(push_seq(&mut b, t0, "r", N, "a", 1, s(7, 1)).is_empty());
        let out = push_seq(&mut b, t0, "r", N, "b", 2, s(1, 2));
        assert_eq!(out.len(), 1);
        assert_eq!(
            (out[0].reason, out[0].epoch, out[0].offsets.clone()),
            (FlushReason::Epoch, 1, vec![7])
        );
        let mut out = Vec::new();
        b.flush_all(&mut out);
        assert_eq!((out[0].epoch, out[0].offsets.clone()), (2, vec![1]));
    }

    #[test]
    fn rooms_are_independent() {
        let mut b = batcher(2, 10, 1 << 20);
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        busy(&mut b, t0, "a");
        busy(&mut b, t0, "b");
        assert!(push(&mut b, t0, "a", N, "a1", 1).is_empty());
        assert!(push(&mut b, t0 + ms(5), "b", N, "b1", 2).is_empty());
        // IMPORTANT in b does not flush a.
        let out = push(&mut b, t0 + ms(6), "b", I, "b2", 3);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].room_id, "b");
        assert_eq!(msgs(&out[0]), vec![b"b1".to_vec(), b"b2".to_vec()]);
        assert_eq!(b.pending_rooms(), 1);
        // A quiet room c is not held back by a's window.
        let out = push(&mut b, t0 + ms(7), "c", N, "c1", 4);
        assert_eq!((out.len(), out[0].reason), (1, FlushReason::Quiet));
        let mut out = Vec::new();
        b.flush_expired(t0 + ms(10), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].room_id.as_str(), out[0].level), ("a", N));
        assert_eq!(msgs(&out[0]), vec![b"a1".to_vec()]);
    }

    #[test]
    fn flush_all_empties_every_room() {
        let mut b = batcher(100, 10_000, 1 << 20);
        let t0 = Instant::now();
        for room in ["a", "b", "c"] {
            busy(&mut b, t0, room);
        }
        for (i, room) in ["a", "b", "a", "c"].into_iter().enumerate() {
            push(&mut b, t0, room, N, room, i as u32);
        }
        let mut out = Vec::new();
        b.flush_all(&mut out);
        out.sort_by(|x, y| x.room_id.cmp(&y.room_id));
        let rooms: Vec<_> = out
            .iter()
            .map(|f| (f.room_id.as_str(), f.tokens.clone()))
            .collect();
        assert_eq!(
            rooms,
            vec![("a", vec![0, 2]), ("b", vec![1]), ("c", vec![3])]
        );
        assert!(out.iter().all(|f| f.reason == FlushReason::Drain));
        assert_eq!((b.pending_rooms(), b.next_deadline()), (0, None));
    }
}

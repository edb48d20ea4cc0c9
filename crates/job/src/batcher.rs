//! Per-room merging: messages of one room are collected into one
//! `|len|data|len|data|` buffer (the seed's merged sending) and flushed as a
//! batch when the room has `max_messages`, when the next message would push
//! it past `max_bytes`, `window_ms` after its first pending message, or at
//! once when an IMPORTANT message arrives (with the NORMAL ones before it, in
//! order). A batch is IMPORTANT if any message in it is.
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
    pub reason: FlushReason,
}

struct Room<T> {
    builder: BatchBuilder,
    tokens: Vec<T>,
    important: bool,
    /// When the window of the first pending message ends.
    deadline: Instant,
}

pub struct Batcher<T> {
    max_messages: usize,
    max_bytes: usize,
    window: Duration,
    rooms: HashMap<String, Room<T>>,
    /// Window ends, earliest first. Entries are not removed when a room
    /// flushes early; a popped entry counts only if its room is still
    /// pending and due, so stale ones just expire.
    deadlines: BinaryHeap<Reverse<(Instant, String)>>,
}

impl<T> Batcher<T> {
    pub fn new(cfg: &BatchConfig) -> Self {
        Batcher {
            max_messages: cfg.max_messages.max(1),
            max_bytes: cfg.max_bytes,
            window: cfg.window(),
            rooms: HashMap::new(),
            deadlines: BinaryHeap::new(),
        }
    }

    /// Adds one message; any batch this completes is appended to `out`
    /// (up to two: the pending ones that this message would overflow, then
    /// this message's own if it is IMPORTANT or alone exceeds a limit).
    pub fn push(
        &mut self,
        now: Instant,
        room_id: &str,
        level: MsgLevel,
        data: &[u8],
        token: T,
        out: &mut Vec<Flushed<T>>,
    ) {
        let size = HEAD_LEN + data.len();
        if let Some(room) = self.rooms.get(room_id)
            && room.builder.bytes_len() + size > self.max_bytes
        {
            // Keep batches within max_bytes: what is pending goes first.
            out.push(self.flush(room_id, FlushReason::Bytes));
        }
        if !self.rooms.contains_key(room_id) {
            let deadline = now + self.window;
            self.deadlines.push(Reverse((deadline, room_id.to_owned())));
            self.rooms.insert(
                room_id.to_owned(),
                Room {
                    builder: BatchBuilder::default(),
                    tokens: Vec::new(),
                    important: false,
                    deadline,
                },
            );
        }
        let room = self.rooms.get_mut(room_id).expect("room was just ensured");
        room.builder.push(data);
        room.tokens.push(token);
        room.important |= level == MsgLevel::Important;
        let reason = if level == MsgLevel::Important {
            Some(FlushReason::Important)
        } else if room.builder.len() >= self.max_messages {
            Some(FlushReason::Count)
        } else if room.builder.bytes_len() >= self.max_bytes {
            Some(FlushReason::Bytes)
        } else {
            None
        };
        if let Some(reason) = reason {
            out.push(self.flush(room_id, reason));
        }
    }

    /// When the earliest window may end (possibly a stale entry, which only
    /// costs a wake-up), `None` when nothing is pending.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.peek().map(|Reverse((t, _))| *t)
    }

    /// Flushes every room whose window has ended by `now`.
    pub fn flush_expired(&mut self, now: Instant, out: &mut Vec<Flushed<T>>) {
        while let Some(Reverse((t, _))) = self.deadlines.peek() {
            if *t > now {
                break;
            }
            let Some(Reverse((_, room_id))) = self.deadlines.pop() else {
                break;
            };
            if self.rooms.get(&room_id).is_some_and(|r| r.deadline <= now) {
                out.push(self.flush(&room_id, FlushReason::Window));
            }
        }
    }

    /// Flushes every pending room now (shutdown).
    pub fn flush_all(&mut self, out: &mut Vec<Flushed<T>>) {
        let rooms: Vec<String> = self.rooms.keys().cloned().collect();
        for room_id in rooms {
            out.push(self.flush(&room_id, FlushReason::Drain));
        }
        self.deadlines.clear();
    }

    /// Rooms with pending messages.
    pub fn pending_rooms(&self) -> usize {
        self.rooms.len()
    }

    fn flush(&mut self, room_id: &str, reason: FlushReason) -> Flushed<T> {
        // Removed rather than reset: with many short-lived rooms the map
        // stays as small as the set of rooms active within one window.
        let mut room = self.rooms.remove(room_id).expect("flushing a pending room");
        Flushed {
            room_id: room_id.to_owned(),
            level: if room.important {
                MsgLevel::Important
            } else {
                MsgLevel::Normal
            },
            data: room.builder.take(),
            tokens: room.tokens,
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
            window_ms,
            max_bytes,
        })
    }

    fn msgs(f: &Flushed<u32>) -> Vec<Vec<u8>> {
        decode(&f.data).map(|m| m.unwrap().to_vec()).collect()
    }

    fn push(
        b: &mut Batcher<u32>,
        now: Instant,
        room: &str,
        lv: MsgLevel,
        data: &str,
        t: u32,
    ) -> Vec<Flushed<u32>> {
        let mut out = Vec::new();
        b.push(now, room, lv, data.as_bytes(), t, &mut out);
        out
    }

    #[test]
    fn flushes_on_count_with_content_in_order() {
        let mut b = batcher(3, 1000, 1 << 20);
        let t0 = Instant::now();
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
        assert_eq!(b.pending_rooms(), 0);
        // The stale window entry flushes nothing.
        let mut out = Vec::new();
        b.flush_expired(t0 + Duration::from_secs(2), &mut out);
        assert!(out.is_empty());
        assert_eq!(b.next_deadline(), None);
    }

    #[test]
    fn flushes_before_exceeding_max_bytes() {
        // Each 6-byte message costs 10 bytes encoded.
        let mut b = batcher(100, 1000, 25);
        let t0 = Instant::now();
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
    fn flushes_when_the_window_of_the_first_message_ends() {
        let mut b = batcher(100, 10, 1 << 20);
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        push(&mut b, t0, "r", N, "a", 1);
        push(&mut b, t0 + ms(6), "r", N, "b", 2);
        assert_eq!(b.next_deadline(), Some(t0 + ms(10)));
        let mut out = Vec::new();
        b.flush_expired(t0 + ms(9), &mut out);
        assert!(out.is_empty(), "window not over yet");
        b.flush_expired(t0 + ms(10), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].reason, FlushReason::Window);
        assert_eq!(msgs(&out[0]), vec![b"a".to_vec(), b"b".to_vec()]);
        // The next message opens a new window from its own arrival.
        push(&mut b, t0 + ms(15), "r", N, "c", 3);
        assert_eq!(b.next_deadline(), Some(t0 + ms(25)));
    }

    #[test]
    fn important_flushes_at_once_with_the_normal_ones_before_it() {
        let mut b = batcher(100, 1000, 1 << 20);
        let t0 = Instant::now();
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
        push(&mut b, t0, "r", N, "n1", 1);
        push(&mut b, t0, "r", N, "n2", 2);
        let out = push(&mut b, t0, "r", I, "i3", 3);
        assert_eq!(out.len(), 2);
        assert_eq!((out[0].level, out[0].tokens.clone()), (N, vec![1, 2]));
        assert_eq!((out[1].level, out[1].tokens.clone()), (I, vec![3]));
    }

    #[test]
    fn rooms_are_independent() {
        let mut b = batcher(2, 10, 1 << 20);
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        assert!(push(&mut b, t0, "a", N, "a1", 1).is_empty());
        assert!(push(&mut b, t0 + ms(5), "b", N, "b1", 2).is_empty());
        // IMPORTANT in b does not flush a.
        let out = push(&mut b, t0 + ms(6), "b", I, "b2", 3);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].room_id, "b");
        assert_eq!(msgs(&out[0]), vec![b"b1".to_vec(), b"b2".to_vec()]);
        assert_eq!(b.pending_rooms(), 1);
        // a's window is its own.
        push(&mut b, t0 + ms(7), "c", N, "c1", 4);
        let mut out = Vec::new();
        b.flush_expired(t0 + ms(10), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].room_id.as_str(), out[0].level), ("a", N));
        assert_eq!(msgs(&out[0]), vec![b"a1".to_vec()]);
        b.flush_expired(t0 + ms(17), &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].room_id, "c");
    }

    #[test]
    fn flush_all_empties_every_room() {
        let mut b = batcher(100, 10_000, 1 << 20);
        let t0 = Instant::now();
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

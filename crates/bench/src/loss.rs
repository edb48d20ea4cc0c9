//! Loss and duplicate detection, designed to cost a few bytes per
//! (session, publisher) and a few instructions per delivery.
//!
//! Each receiving session keeps, for every publisher of its room, the
//! highest sequence number seen and a 128-bit window of the ones below it
//! ([`SeqWindow`]): a sequence already in the window is a duplicate; a new
//! one counts once as distinct. At the end the distinct counts are summed
//! per publisher over the sessions that stayed connected, and compared with
//! what was expected: every message a publisher got accepted, times the
//! connected sessions of its room ([`account`]). Sequences more than 128
//! behind the highest are counted as `stale` (delivered far out of order;
//! neither new nor duplicate can be told).

use serde::{Deserialize, Serialize};

use crate::payload::Ids;
use crate::rooms::RoomMap;

/// Bits of history below the highest sequence.
pub const WINDOW: u64 = 128;

/// What one delivery was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    New,
    Duplicate,
    /// Too far behind the highest sequence to tell.
    Stale,
    /// Not from a publisher of this session's room.
    Foreign,
}

/// One publisher's sequences as one session saw them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SeqWindow {
    /// Highest sequence seen + 1; 0 before the first.
    top: u64,
    /// Bit k: sequence `top - 1 - k` was seen.
    bits: u128,
    distinct: u64,
}

impl SeqWindow {
    pub fn observe(&mut self, seq: u32) -> Seen {
        let s = u64::from(seq) + 1;
        if s > self.top {
            let shift = s - self.top;
            self.bits = if shift >= WINDOW {
                0
            } else {
                self.bits << shift
            };
            self.bits |= 1;
            self.top = s;
            self.distinct += 1;
            return Seen::New;
        }
        let k = self.top - s;
        if k >= WINDOW {
            return Seen::Stale;
        }
        let bit = 1u128 << k;
        if self.bits & bit != 0 {
            Seen::Duplicate
        } else {
            self.bits |= bit;
            self.distinct += 1;
            Seen::New
        }
    }

    /// Distinct sequences seen.
    pub fn distinct(&self) -> u64 {
        self.distinct
    }
}

/// All publishers of a session's room, as that session saw them.
#[derive(Debug, Clone)]
pub struct SessionTracker {
    room: u32,
    windows: Vec<SeqWindow>,
}

impl SessionTracker {
    pub fn new(room: u32, map: &RoomMap) -> Self {
        SessionTracker {
            room,
            windows: vec![SeqWindow::default(); map.publishers_in(room).len()],
        }
    }

    pub fn room(&self) -> u32 {
        self.room
    }

    pub fn observe(&mut self, stamp: Ids, map: &RoomMap) -> Seen {
        match map.publisher_local(stamp.publisher) {
            Some((room, local)) if room == self.room => {
                match self.windows.get_mut(local as usize) {
                    Some(w) => w.observe(stamp.seq),
                    None => Seen::Foreign,
                }
            }
            _ => Seen::Foreign,
        }
    }

    /// Adds this session's distinct counts to `per_publisher` (indexed by
    /// global publisher id).
    pub fn add_distinct(&self, map: &RoomMap, per_publisher: &mut [u64]) {
        for (w, &p) in self.windows.iter().zip(map.publishers_in(self.room)) {
            if let Some(slot) = per_publisher.get_mut(p as usize) {
                *slot += w.distinct();
            }
        }
    }
}

/// Expected against received, summed over publishers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LossSummary {
    /// Accepted messages × connected sessions of their room.
    pub expected: u64,
    /// Distinct deliveries to sessions connected to the end.
    pub received: u64,
    /// Expected but never received.
    pub lost: u64,
    /// Received beyond expectation (a publish reported failed that went
    /// through anyway, say).
    pub unexpected: u64,
}

/// Compares, per publisher, `accepted[p] × alive_per_room[room(p)]` with
/// `received[p]`.
pub fn account(
    map: &RoomMap,
    accepted: &[u64],
    alive_per_room: &[u64],
    received: &[u64],
) -> LossSummary {
    let mut s = LossSummary::default();
    for p in 0..map.publishers() {
        let room = map.publisher_room(p) as usize;
        let members = alive_per_room.get(room).copied().unwrap_or(0);
        let exp = accepted.get(p as usize).copied().unwrap_or(0) * members;
        let got = received.get(p as usize).copied().unwrap_or(0);
        s.expected += exp;
        s.received += got;
        s.lost += exp.saturating_sub(got);
        s.unexpected += got.saturating_sub(exp);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rooms::RoomDist;

    #[test]
    fn in_order_stream_is_all_new() {
        let mut w = SeqWindow::default();
        for s in 0..1000 {
            assert_eq!(w.observe(s), Seen::New);
        }
        assert_eq!(w.distinct(), 1000);
    }

    #[test]
    fn duplicates_in_window_are_caught() {
        let mut w = SeqWindow::default();
        assert_eq!(w.observe(0), Seen::New);
        assert_eq!(w.observe(0), Seen::Duplicate);
        assert_eq!(w.observe(5), Seen::New);
        assert_eq!(w.observe(3), Seen::New); // late, not a duplicate
        assert_eq!(w.observe(3), Seen::Duplicate);
        assert_eq!(w.observe(5), Seen::Duplicate);
        assert_eq!(w.observe(200), Seen::New);
        assert_eq!(w.observe(200 - 127), Seen::New); // edge of the window
        assert_eq!(w.observe(200 - 127), Seen::Duplicate);
        assert_eq!(w.observe(200 - 128), Seen::Stale);
        assert_eq!(w.observe(5), Seen::Stale);
        assert_eq!(w.distinct(), 5);
    }

    #[test]
    fn big_jump_clears_window() {
        let mut w = SeqWindow::default();
        w.observe(1);
        w.observe(u32::MAX);
        assert_eq!(w.observe(u32::MAX), Seen::Duplicate);
        assert_eq!(w.observe(u32::MAX - 1), Seen::New);
        assert_eq!(w.distinct(), 3);
    }

    #[test]
    fn tracker_separates_publishers_and_rooms() {
        // Two rooms; publishers 0, 2 in room 0; 1 in room 1.
        let map = RoomMap::new(4, 2, 3, RoomDist::Uniform).unwrap();
        let mut t = SessionTracker::new(0, &map);
        let st = |publisher, seq| Ids { publisher, seq };
        assert_eq!(t.observe(st(0, 0), &map), Seen::New);
        assert_eq!(t.observe(st(2, 0), &map), Seen::New);
        assert_eq!(t.observe(st(0, 0), &map), Seen::Duplicate);
        assert_eq!(t.observe(st(1, 0), &map), Seen::Foreign);
        assert_eq!(t.observe(st(99, 0), &map), Seen::Foreign);
        assert_eq!(t.observe(st(0, 1), &map), Seen::New);
        let mut per = vec![0; 3];
        t.add_distinct(&map, &mut per);
        assert_eq!(per, vec![2, 0, 1]);
    }

    #[test]
    fn accounting_finds_loss_and_surplus() {
        // Room 0 has sessions 0 and 2, room 1 has 1 and 3; publisher p in room p % 2.
        let map = RoomMap::new(4, 2, 3, RoomDist::Uniform).unwrap();
        let alive = [2, 1]; // one session of room 1 dropped out
        let accepted = [10, 7, 4];
        // p0: 20 expected, 20 got; p1: 7 expected, 5 got; p2: 8 expected, 9 got.
        let received = [20, 5, 9];
        let s = account(&map, &accepted, &alive, &received);
        assert_eq!(
            s,
            LossSummary {
                expected: 35,
                received: 34,
                lost: 2,
                unexpected: 1
            }
        );
        let none = account(&map, &[0, 0, 0], &alive, &[0, 0, 0]);
        assert_eq!(none, LossSummary::default());
    }

    #[test]
    fn end_to_end_per_session_accounting() {
        // 3 sessions in one room, 2 publishers x 50 messages; session 1 misses
        // p1 seq 7 and gets p0 seq 3 twice.
        let map = RoomMap::new(3, 1, 2, RoomDist::Single).unwrap();
        let mut per = vec![0u64; 2];
        let mut dups = 0;
        for s in 0..3 {
            let mut t = SessionTracker::new(0, &map);
            for seq in 0..50 {
                for p in 0..2 {
                    if s == 1 && p == 1 && seq == 7 {
                        continue;
                    }
                    let stamp = Ids { publisher: p, seq };
                    t.observe(stamp, &map);
                    if s == 1 && p == 0 && seq == 3 && t.observe(stamp, &map) == Seen::Duplicate {
                        dups += 1;
                    }
                }
            }
            t.add_distinct(&map, &mut per);
        }
        let s = account(&map, &[50, 50], &[3], &per);
        assert_eq!(
            (s.expected, s.received, s.lost, s.unexpected, dups),
            (300, 299, 1, 0, 1)
        );
    }
}

//! Sessions sharded into buckets by session id, so that joins, leaves and
//! pushes on different buckets never contend for one lock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use chatroom_common::proto::protocol::MsgLevel;

use crate::room::{PushStats, Room, SessionTx};

#[derive(Debug, Default)]
struct Bucket {
    rooms: Mutex<HashMap<String, Room>>,
}

impl Bucket {
    fn rooms(&self) -> MutexGuard<'_, HashMap<String, Room>> {
        // A panic while holding the lock cannot leave a room half-updated in
        // a way that matters more than losing every push: keep serving.
        self.rooms.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Every session of this node, by room.
#[derive(Debug)]
pub struct Buckets {
    buckets: Box<[Bucket]>,
}

impl Buckets {
    pub fn new(n: usize) -> Self {
        Buckets {
            buckets: (0..n.max(1)).map(|_| Bucket::default()).collect(),
        }
    }

    fn bucket(&self, session: u64) -> &Bucket {
        &self.buckets[(session % self.buckets.len() as u64) as usize]
    }

    pub fn join(&self, room: &str, s: Arc<SessionTx>) {
        let b = self.bucket(s.id);
        b.rooms().entry(room.to_string()).or_default().insert(s);
    }

    pub fn leave(&self, room: &str, session: u64) {
        let mut rooms = self.bucket(session).rooms();
        if let Some(r) = rooms.get_mut(room) {
            r.remove(session);
            if r.is_empty() {
                rooms.remove(room);
            }
        }
    }

    /// Queues one shared frame on every session of `room`.
    pub fn push_room(&self, room: &str, frame: &Bytes, level: MsgLevel) -> PushStats {
        let mut st = PushStats::default();
        for b in self.buckets.iter() {
            if let Some(r) = b.rooms().get(room) {
                st += r.push(frame, level);
            }
        }
        st
    }

    /// Sessions in `room` on this node.
    pub fn count(&self, room: &str) -> u32 {
        self.buckets
            .iter()
            .map(|b| b.rooms().get(room).map_or(0, Room::len) as u32)
            .sum()
    }

    /// Sessions per room on this node.
    pub fn counts(&self) -> HashMap<String, u32> {
        let mut out: HashMap<String, u32> = HashMap::new();
        for b in self.buckets.iter() {
            for (room, r) in b.rooms().iter() {
                *out.entry(room.clone()).or_default() += r.len() as u32;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::room::Outbound;
    use tokio::sync::mpsc;
    use tokio_util::sync::CancellationToken;

    fn session(id: u64, cap: usize) -> (Arc<SessionTx>, mpsc::Receiver<Outbound>) {
        let (tx, rx) = mpsc::channel(cap);
        let s = Arc::new(SessionTx {
            id,
            tx,
            kill: CancellationToken::new(),
        });
        (s, rx)
    }

    #[test]
    fn push_reaches_room_members_across_buckets_only() {
        let b = Buckets::new(4);
        let mut rxs = vec![];
        for id in 0..8 {
            let (s, rx) = session(id, 4);
            b.join(if id < 6 { "a" } else { "b" }, s);
            rxs.push(rx);
        }
        assert_eq!(b.count("a"), 6);
        let frame = Bytes::from_static(b"x");
        let st = b.push_room("a", &frame, MsgLevel::Normal);
        assert_eq!(st.delivered, 6);
        for (id, rx) in rxs.iter_mut().enumerate() {
            let got = matches!(rx.try_recv(), Ok(Outbound::Frame(f)) if f == frame);
            assert_eq!(got, id < 6, "session {id}");
        }
        b.leave("a", 0);
        assert_eq!(b.counts().get("a"), Some(&5));
        for id in 1..6 {
            b.leave("a", id);
        }
        assert!(!b.counts().contains_key("a"));
    }

    #[test]
    fn full_queue_drops_normal_and_disconnects_on_important() {
        let b = Buckets::new(2);
        let (slow, _rx_slow) = session(1, 1);
        let (fast, mut rx_fast) = session(2, 8);
        b.join("r", slow.clone());
        b.join("r", fast.clone());
        let f = Bytes::from_static(b"m");
        assert_eq!(b.push_room("r", &f, MsgLevel::Normal).delivered, 2);
        let st = b.push_room("r", &f, MsgLevel::Normal);
        assert_eq!((st.delivered, st.dropped), (1, 1));
        assert!(!slow.kill.is_cancelled());
        let st = b.push_room("r", &f, MsgLevel::Important);
        assert_eq!((st.delivered, st.disconnected), (1, 1));
        assert!(slow.kill.is_cancelled());
        // The fast session got everything.
        let mut n = 0;
        while rx_fast.try_recv().is_ok() {
            n += 1;
        }
        assert_eq!(n, 3);
    }
}

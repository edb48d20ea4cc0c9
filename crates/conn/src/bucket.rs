//! Sessions sharded into buckets by session id, so that joins, leaves and
//! pushes on different buckets never contend for one lock; and an index of
//! sessions by user, sharded by user id, for messages addressed to users.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use chatroom_common::proto::protocol::MsgLevel;

use crate::room::{PushStats, Pushed, Room, SessionTx};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave a map half-updated in a
    // way that matters more than losing every push: keep serving.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, Default)]
struct Bucket {
    rooms: Mutex<HashMap<String, Room>>,
    sessions: Mutex<HashMap<u64, Arc<SessionTx>>>,
}

impl Bucket {
    fn rooms(&self) -> MutexGuard<'_, HashMap<String, Room>> {
        lock(&self.rooms)
    }
}

type UserShard = Mutex<HashMap<String, Vec<Arc<SessionTx>>>>;

/// Every session of this node, by room and by user.
#[derive(Debug)]
pub struct Buckets {
    buckets: Box<[Bucket]>,
    users: Box<[UserShard]>,
    hasher: RandomState,
}

impl Buckets {
    pub fn new(n: usize) -> Self {
        let n = n.max(1);
        Buckets {
            buckets: (0..n).map(|_| Bucket::default()).collect(),
            users: (0..n).map(|_| UserShard::default()).collect(),
            hasher: RandomState::new(),
        }
    }

    fn user_shard(&self, uid: &str) -> &UserShard {
        &self.users[(self.hasher.hash_one(uid) % self.users.len() as u64) as usize]
    }

    /// Adds a signed-in session to the node (and its user's index).
    pub fn register(&self, s: Arc<SessionTx>) {
        lock(&self.bucket(s.id).sessions).insert(s.id, s.clone());
        if !s.uid.is_empty() {
            lock(self.user_shard(&s.uid))
                .entry(s.uid.clone())
                .or_default()
                .push(s);
        }
    }

    /// Removes a session from the node, its user's index and all its rooms.
    pub fn unregister(&self, s: &SessionTx) {
        for room in s.rooms().iter() {
            self.leave(room, s.id);
        }
        lock(&self.bucket(s.id).sessions).remove(&s.id);
        let mut users = lock(self.user_shard(&s.uid));
        if let Some(v) = users.get_mut(&s.uid) {
            v.retain(|x| x.id != s.id);
            if v.is_empty() {
                users.remove(&s.uid);
            }
        }
    }

    /// The sessions of `uid` on this node.
    pub fn sessions_of(&self, uid: &str) -> Vec<Arc<SessionTx>> {
        lock(self.user_shard(uid))
            .get(uid)
            .cloned()
            .unwrap_or_default()
    }

    /// Puts `s` in `room` (and records the room on the session).
    pub fn join_session(&self, room: &str, s: &Arc<SessionTx>) -> bool {
        {
            let mut rooms = s.rooms();
            if rooms.iter().any(|r| r == room) {
                return false;
            }
            rooms.push(room.to_string());
        }
        self.join(room, s.clone());
        true
    }

    /// Queues one shared push on the sessions of `uids`.
    pub fn push_users(&self, uids: &[String], out: &Pushed, level: MsgLevel) -> PushStats {
        let mut st = PushStats::default();
        let now = Instant::now();
        for uid in uids {
            for s in self.sessions_of(uid) {
                st += s.push(out.outbound(), level, now);
            }
        }
        st
    }

    /// Queues one shared push on every session of the node.
    pub fn push_all(&self, out: &Pushed, level: MsgLevel) -> PushStats {
        let mut st = PushStats::default();
        let now = Instant::now();
        for b in self.buckets.iter() {
            for s in lock(&b.sessions).values() {
                st += s.push(out.outbound(), level, now);
            }
        }
        st
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

    /// Queues one shared push on every session of `room`.
    pub fn push_room(&self, room: &str, out: &Pushed, level: MsgLevel) -> PushStats {
        let mut st = PushStats::default();
        let now = Instant::now();
        for b in self.buckets.iter() {
            if let Some(r) = b.rooms().get(room) {
                st += r.push(out, level, now);
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
    use crate::outbox::{Limits, Outbox};
    use crate::room::Outbound;
    use bytes::Bytes;
    use tokio_util::sync::CancellationToken;

    /// A session with room for `frames` one-byte frames.
    fn session(id: u64, frames: usize) -> (Arc<SessionTx>, Arc<Outbox>) {
        let tx = Arc::new(Outbox::new(Limits::new(
            frames * 17,
            std::time::Duration::from_secs(5),
        )));
        let s = Arc::new(SessionTx::new(
            id,
            tx.clone(),
            CancellationToken::new(),
            format!("u{}", id % 3),
        ));
        (s, tx)
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
        let st = b.push_room("a", &Pushed::Frame(frame.clone()), MsgLevel::Normal);
        assert_eq!(st.delivered, 6);
        for (id, rx) in rxs.iter_mut().enumerate() {
            let got = matches!(rx.try_take(), Some(Outbound::Frame(f)) if f == frame);
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
        let (fast, rx_fast) = session(2, 8);
        b.join("r", slow.clone());
        b.join("r", fast.clone());
        let f = Pushed::Frame(Bytes::from_static(b"m"));
        assert_eq!(b.push_room("r", &f, MsgLevel::Normal).delivered, 2);
        let st = b.push_room("r", &f, MsgLevel::Normal);
        assert_eq!((st.delivered, st.dropped), (1, 1));
        assert!(!slow.kill.is_cancelled());
        let st = b.push_room("r", &f, MsgLevel::Important);
        assert_eq!((st.delivered, st.disconnected), (1, 1));
        assert!(slow.kill.is_cancelled());
        // The fast session got everything.
        let mut n = 0;
        while rx_fast.try_take().is_some() {
            n += 1;
        }
        assert_eq!(n, 3);
    }
}

#[cfg(test)]
mod user_tests {
    use super::*;
    use crate::outbox::Outbox;
    use crate::room::Outbound;
    use bytes::Bytes;
    use tokio_util::sync::CancellationToken;

    #[test]
    fn users_all_and_live_join() {
        let b = Buckets::new(4);
        let mut rxs = vec![];
        let mut ss = vec![];
        for id in 0..6u64 {
            let rx = Arc::new(Outbox::new(crate::outbox::Limits::new(
                4096,
                std::time::Duration::from_secs(5),
            )));
            let s = Arc::new(SessionTx::new(
                id,
                rx.clone(),
                CancellationToken::new(),
                format!("u{}", id % 3),
            ));
            b.register(s.clone());
            rxs.push(rx);
            ss.push(s);
        }
        let f = Pushed::Frame(Bytes::from_static(b"x"));
        // u1 has sessions 1 and 4.
        assert_eq!(
            b.push_users(&["u1".into(), "nobody".into()], &f, MsgLevel::Important)
                .delivered,
            2
        );
        assert!(
            rxs[1].try_take().is_some()
                && rxs[4].try_take().is_some()
                && rxs[0].try_take().is_none()
        );
        assert_eq!(b.push_all(&f, MsgLevel::Important).delivered, 6);
        // Joining a user's sessions to a room makes room pushes reach them.
        for s in b.sessions_of("u2") {
            assert!(b.join_session("c:9", &s));
            assert!(!b.join_session("c:9", &s), "joining twice is a no-op");
        }
        assert_eq!(b.count("c:9"), 2);
        // Unregister leaves every room and the user index.
        b.unregister(&ss[2]);
        assert_eq!(b.count("c:9"), 1);
        assert_eq!(b.sessions_of("u2").len(), 1);
        assert!(matches!(rxs[0].try_take(), Some(Outbound::Frame(_))));
    }
}

//! A room's members within one bucket, and the outbound handle of a session
//! that pushes go through.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use bytes::Bytes;
use chatroom_common::proto::protocol::MsgLevel;
use tokio_util::sync::CancellationToken;

use crate::chat::ChatFrame;
use crate::outbox::{Outbox, PushError};
use crate::stream::RoomStream;

/// What a session's writer task sends.
#[derive(Debug)]
pub enum Outbound {
    /// An encoded `Reply` (binary frame), shared by every session it goes to.
    Frame(Bytes),
    /// A JSON text frame (UTF-8).
    Text(Bytes),
    /// Answer to a client ping.
    Pong(Bytes),
    /// A server ping.
    Ping,
    /// IM messages, each encoded once per encoding; the writer sends the
    /// one its session speaks.
    Chat(Arc<[ChatFrame]>),
    /// Send a close frame with this code and reason, then stop.
    Close(u16, &'static str),
    /// From now on also send the room stream's messages from this cursor
    /// (queued after the sign-in answer and what recovery sent).
    Subscribe(Cursor),
}

/// A session's place in its room's stream: the next offset it needs.
#[derive(Debug, Clone)]
pub struct Cursor {
    pub stream: Arc<RoomStream>,
    pub epoch: u64,
    pub next: u64,
}

/// The push side of a session: its bounded queue and a switch to end it.
#[derive(Debug)]
pub struct SessionTx {
    pub id: u64,
    pub tx: Arc<Outbox>,
    /// Cancelled to disconnect the session (slow consumer, shutdown).
    pub kill: CancellationToken,
    /// Signed-in user ("" until signed in).
    pub uid: String,
    /// Rooms the session is in (its sign-in room, communities, joins).
    pub rooms: Mutex<Vec<String>>,
}

impl SessionTx {
    pub fn new(id: u64, tx: Arc<Outbox>, kill: CancellationToken, uid: String) -> Self {
        SessionTx {
            id,
            tx,
            kill,
            uid,
            rooms: Mutex::new(Vec::new()),
        }
    }

    pub fn rooms(&self) -> MutexGuard<'_, Vec<String>> {
        self.rooms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a pushed frame without waiting: a session too slow for it
    /// (too many bytes waiting, or waiting too long: see [`crate::outbox`])
    /// loses a NORMAL frame and is disconnected for an IMPORTANT one (it
    /// cannot be trusted with messages that must arrive).
    pub fn push(&self, out: Outbound, level: MsgLevel, now: Instant) -> PushStats {
        let mut st = PushStats::default();
        match self.tx.try_push(out, now) {
            Ok(()) => st.delivered += 1,
            Err(PushError::Full | PushError::Stale) => match level {
                MsgLevel::Normal => st.dropped += 1,
                MsgLevel::Important => {
                    st.disconnected += 1;
                    self.kill.cancel();
                }
            },
            // The session is ending; it leaves its rooms by itself.
            Err(PushError::Closed) => {}
        }
        st
    }
}

/// Counts from one push, summed over buckets.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PushStats {
    pub delivered: u32,
    /// NORMAL frames dropped because the session was too slow for them.
    pub dropped: u32,
    /// Sessions disconnected because they were too slow for an IMPORTANT
    /// frame.
    pub disconnected: u32,
}

impl std::ops::AddAssign for PushStats {
    fn add_assign(&mut self, o: Self) {
        self.delivered += o.delivered;
        self.dropped += o.dropped;
        self.disconnected += o.disconnected;
    }
}

/// Members of one room in one bucket.
#[derive(Debug, Default)]
pub struct Room {
    members: HashMap<u64, Arc<SessionTx>>,
}

impl Room {
    pub fn insert(&mut self, s: Arc<SessionTx>) {
        self.members.insert(s.id, s);
    }

    pub fn remove(&mut self, id: u64) {
        self.members.remove(&id);
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Queues `out` on every member without ever waiting (see
    /// [`SessionTx::push`]).
    pub fn push(&self, out: &Pushed, level: MsgLevel, now: Instant) -> PushStats {
        let mut st = PushStats::default();
        for s in self.members.values() {
            st += s.push(out.outbound(), level, now);
        }
        st
    }
}

/// A push shared by many sessions; cloning it clones reference counts only.
#[derive(Debug, Clone)]
pub enum Pushed {
    Frame(Bytes),
    Chat(Arc<[ChatFrame]>),
}

impl Pushed {
    pub fn outbound(&self) -> Outbound {
        match self {
            Pushed::Frame(b) => Outbound::Frame(b.clone()),
            Pushed::Chat(c) => Outbound::Chat(c.clone()),
        }
    }
}

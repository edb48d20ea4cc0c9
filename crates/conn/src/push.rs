//! The gRPC service job calls: merged room batches, IM messages to users or
//! to everyone, and live room joins. A room batch is appended to the room's
//! stream once (its sessions' writers take it from there); IM pushes are
//! encoded once and every session gets a clone of the same bytes.

use std::sync::Arc;

use bytes::Bytes;
use chatroom_common::proto::conn::conn_server::Conn;
use chatroom_common::proto::conn::{
    JoinRoomReply, JoinRoomReq, PushAllReq, PushKind, PushRoomReply, PushRoomReq, PushRoomsReply,
    PushRoomsReq, PushUsersReply, PushUsersReq,
};
use chatroom_common::proto::logic::UndeliveredReq;
use chatroom_common::proto::protocol::{ChatCmd, ChatMsg, MsgLevel};
use prost::Message as _;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use crate::bucket::Buckets;
use crate::chat::ChatFrame;
use crate::logic_pool::LogicPool;
use crate::room::{PushStats, Pushed};
use crate::stats::Stats;
use crate::stream::{Entry, Streams, frames_of};

pub struct PushService {
    pub buckets: Arc<Buckets>,
    pub streams: Arc<Streams>,
    pub stats: Arc<Stats>,
    /// This node's id, for reports to logic.
    pub server: String,
    pub logic: Arc<LogicPool>,
    pub tracker: TaskTracker,
    /// The epoch of streams this node numbers itself (pushes without offsets).
    pub local_epoch: u64,
}

fn chat_frames(items: impl Iterator<Item = ChatMsg>) -> Pushed {
    let frames: Vec<ChatFrame> = items.map(|m| ChatFrame::new(&m)).collect();
    Pushed::Chat(frames.into())
}

/// A room batch checked and turned into what it pushes.
struct RoomPush {
    room_id: String,
    level: MsgLevel,
    what: What,
}

enum What {
    /// Opaque room messages for the room's stream.
    Stream { epoch: u64, entries: Vec<Entry> },
    /// IM messages for the room's sessions.
    Chat(Pushed),
}

impl RoomPush {
    fn check(req: PushRoomReq) -> Result<RoomPush, Status> {
        if req.room_id.is_empty() {
            return Err(Status::invalid_argument("room_id is empty"));
        }
        let level = MsgLevel::try_from(req.level).unwrap_or(MsgLevel::Normal);
        let what = if req.kind == PushKind::Chat as i32 {
            let mut msgs = Vec::new();
            for item in chatroom_common::batch::decode(&req.batch) {
                let item = item.map_err(|e| Status::invalid_argument(format!("bad batch: {e}")))?;
                match ChatMsg::decode(item) {
                    Ok(m) => msgs.push(m),
                    Err(e) => {
                        warn!(room = %req.room_id, error = %e, "undecodable chat message in batch skipped")
                    }
                }
            }
            What::Chat(chat_frames(msgs.into_iter()))
        } else {
            let mut entries = Vec::new();
            for item in chatroom_common::batch::decode(&req.batch) {
                let item = item.map_err(|e| Status::invalid_argument(format!("bad batch: {e}")))?;
                // A copy per message: the stream keeps messages longer than
                // the request, and a slice would keep the whole request.
                entries.push(Entry {
                    offset: 0,
                    level,
                    data: Bytes::copy_from_slice(item),
                });
            }
            if !req.offsets.is_empty() {
                if req.offsets.len() != entries.len() {
                    return Err(Status::invalid_argument(format!(
                        "{} offsets for {} messages",
                        req.offsets.len(),
                        entries.len()
                    )));
                }
                if req.epoch == 0 {
                    return Err(Status::invalid_argument("offsets without an epoch"));
                }
                for (e, &o) in entries.iter_mut().zip(&req.offsets) {
                    e.offset = o;
                }
            }
            What::Stream {
                epoch: req.epoch,
                entries,
            }
        };
        Ok(RoomPush {
            room_id: req.room_id,
            level,
            what,
        })
    }
}

impl PushService {
    fn push_checked(&self, room: RoomPush) -> PushRoomReply {
        let st = match room.what {
            What::Chat(pushed) => self.buckets.push_room(&room.room_id, &pushed, room.level),
            What::Stream { epoch, entries } => {
                self.push_stream(&room.room_id, room.level, epoch, entries)
            }
        };
        let r = self.done(st);
        debug!(room = %room.room_id, delivered = r.delivered, dropped = r.dropped, "pushed");
        PushRoomReply {
            delivered: r.delivered,
            dropped: r.dropped,
        }
    }

    /// Appends to the room's stream, if this node has one (sessions in the
    /// room, or a recent one); the writers do the rest.
    fn push_stream(
        &self,
        room: &str,
        level: MsgLevel,
        epoch: u64,
        entries: Vec<Entry>,
    ) -> PushStats {
        let Some(stream) = self.streams.get(room) else {
            return PushStats::default();
        };
        // Without offsets (an older job) the stream numbers the messages in
        // its own epoch, kept from the first such push.
        let epoch = if epoch == 0 {
            match stream.position().0 {
                0 => self.local_epoch,
                e => e,
            }
        } else {
            epoch
        };
        let mut stale = Vec::new();
        let a = stream.push(
            &self.streams.cfg,
            epoch,
            entries,
            Instant::now(),
            &mut stale,
        );
        self.streams.stats.record(&a);
        if a.duplicates > 0 || a.stale > 0 || a.late > 0 {
            debug!(%room, duplicates = a.duplicates, stale = a.stale, late = a.late, "room stream push");
        }
        if !stale.is_empty() {
            // Accepted under an epoch this node has moved past, or late for
            // a gap given up on (a redelivery after a job died): still
            // delivered, as their own frames with their own positions.
            for f in frames_of(&self.streams.cfg, room, epoch, &stale) {
                self.buckets.push_room(room, &Pushed::Frame(f), level);
            }
        }
        PushStats {
            delivered: stream.members() as u32,
            ..PushStats::default()
        }
    }

    fn report_undelivered(&self, uid: String, ids: Vec<i64>) {
        let req = UndeliveredReq {
            server: self.server.clone(),
            uid,
            ids,
        };
        let logic = self.logic.clone();
        self.tracker.spawn(async move {
            let uid = req.uid.clone();
            match logic.undelivered(req).await {
                Ok(r) => debug!(%uid, stored = r.stored, "undelivered messages reported"),
                Err(e) => {
                    warn!(%uid, error = %e.message(), "reporting undelivered messages failed")
                }
            }
        });
    }

    fn done(&self, st: PushStats) -> PushUsersReply {
        self.stats.record_push(st);
        if st.disconnected > 0 {
            info!(node = %self.server, sessions = st.disconnected,
                "sessions cut as too slow for an IMPORTANT push");
        }
        PushUsersReply {
            delivered: st.delivered,
            dropped: st.dropped + st.disconnected,
        }
    }
}

#[tonic::async_trait]
impl Conn for PushService {
    async fn push_room(
        &self,
        req: Request<PushRoomReq>,
    ) -> Result<Response<PushRoomReply>, Status> {
        let room = RoomPush::check(req.into_inner())?;
        Ok(Response::new(self.push_checked(room)))
    }

    async fn push_rooms(
        &self,
        req: Request<PushRoomsReq>,
    ) -> Result<Response<PushRoomsReply>, Status> {
        // All checked first: a refused bundle has pushed nothing, so job may
        // retry its items one by one without anyone getting a duplicate.
        let rooms = req
            .into_inner()
            .rooms
            .into_iter()
            .map(RoomPush::check)
            .collect::<Result<Vec<_>, _>>()?;
        let rooms = rooms.into_iter().map(|r| self.push_checked(r)).collect();
        Ok(Response::new(PushRoomsReply { rooms }))
    }

    async fn push_users(
        &self,
        req: Request<PushUsersReq>,
    ) -> Result<Response<PushUsersReply>, Status> {
        let req = req.into_inner();
        let msg = req
            .msg
            .ok_or_else(|| Status::invalid_argument("msg is missing"))?;
        let (id, recipient) = (msg.id, msg.dstid.to_string());
        let one_to_one = msg.cmd == ChatCmd::Single as i32;
        let pushed = chat_frames(std::iter::once(msg));
        let st = self
            .buckets
            .push_users(&req.uids, &pushed, MsgLevel::Important);
        // logic routed this here because the recipient was on this node; if
        // it has left since, say so, or the message would only be in history.
        if one_to_one
            && id != 0
            && req.uids.contains(&recipient)
            && self.buckets.sessions_of(&recipient).is_empty()
        {
            self.report_undelivered(recipient, vec![id]);
        }
        Ok(Response::new(self.done(st)))
    }

    async fn push_all(&self, req: Request<PushAllReq>) -> Result<Response<PushUsersReply>, Status> {
        let msg = req
            .into_inner()
            .msg
            .ok_or_else(|| Status::invalid_argument("msg is missing"))?;
        let pushed = chat_frames(std::iter::once(msg));
        let st = self.buckets.push_all(&pushed, MsgLevel::Important);
        info!(delivered = st.delivered, "broadcast pushed");
        Ok(Response::new(self.done(st)))
    }

    async fn join_room(
        &self,
        req: Request<JoinRoomReq>,
    ) -> Result<Response<JoinRoomReply>, Status> {
        let req = req.into_inner();
        if req.uid.is_empty() || req.room.is_empty() {
            return Err(Status::invalid_argument("uid and room are required"));
        }
        let mut n = 0;
        for s in self.buckets.sessions_of(&req.uid) {
            self.buckets.join_session(&req.room, &s);
            n += 1;
        }
        debug!(uid = %req.uid, room = %req.room, sessions = n, "live sessions joined room");
        Ok(Response::new(JoinRoomReply { sessions: n }))
    }
}

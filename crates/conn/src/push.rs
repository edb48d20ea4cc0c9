//! The gRPC service job calls: one merged batch in, one encoded frame queued
//! on every session of the room.

use std::sync::Arc;

use chatroom_common::proto::conn::conn_server::Conn;
use chatroom_common::proto::conn::{PushRoomReply, PushRoomReq};
use chatroom_common::proto::protocol::MsgLevel;
use tonic::{Request, Response, Status};
use tracing::debug;

use crate::bucket::Buckets;
use crate::frame;
use crate::stats::Stats;

pub struct PushService {
    pub buckets: Arc<Buckets>,
    pub stats: Arc<Stats>,
}

#[tonic::async_trait]
impl Conn for PushService {
    async fn push_room(
        &self,
        req: Request<PushRoomReq>,
    ) -> Result<Response<PushRoomReply>, Status> {
        let req = req.into_inner();
        if req.room_id.is_empty() {
            return Err(Status::invalid_argument("room_id is empty"));
        }
        let level = MsgLevel::try_from(req.level).unwrap_or(MsgLevel::Normal);
        // Encoded once; every session gets a clone of the same bytes.
        let frame = frame::room_batch(&req.room_id, level, req.batch);
        let st = self.buckets.push_room(&req.room_id, &frame, level);
        self.stats.record_push(st);
        debug!(room = %req.room_id, delivered = st.delivered, dropped = st.dropped, "pushed");
        Ok(Response::new(PushRoomReply {
            delivered: st.delivered,
            dropped: st.dropped + st.disconnected,
        }))
    }
}

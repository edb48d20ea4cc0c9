//! The Logic gRPC service conn nodes call: sign-in (token check + presence),
//! sign-out, heartbeat, room messages from clients, and online counts.
//!
//! A problem with what the *client* sent is an answer (`code` + `msg`) that
//! conn hands to the client; a problem with what *conn* sent (no server id,
//! no uid) is `INVALID_ARGUMENT`; a failing presence store is `UNAVAILABLE`.

use std::sync::Arc;

use chatroom_common::proto::logic::logic_server::Logic;
use chatroom_common::proto::logic::{
    AckPendingReply, AckPendingReq, ChatReply, ChatReq, HeartbeatReply, HeartbeatReq, PendingReply,
    PendingReq, ReceiveManyReply, ReceiveManyReq, ReceiveReply, ReceiveReq, ReportOnlineReply,
    ReportOnlineReq, RoomHistoryReply, RoomHistoryReq, SignInReply, SignInReq, SignOutReply,
    SignOutReq, UndeliveredReply, UndeliveredReq,
};
use chatroom_common::rooms;
use chatroom_common::token::valid_uid;
use tonic::{Request, Response, Status};
use tracing::{Span, debug, info, warn};

use crate::app::{App, im_uid};
use crate::error::ApiError;
use crate::im::chat;
use crate::presence::{RoomCounts, Session};
use chatroom_common::proto::protocol::ErrCode;

/// Most messages in one `ReceiveMany` call; conn sends at most 256.
const MAX_RECEIVE_MANY: usize = 4096;

/// Serves `chatroom.logic.Logic`.
#[derive(Clone)]
pub struct LogicService {
    app: Arc<App>,
}

impl LogicService {
    pub fn new(app: Arc<App>) -> Self {
        LogicService { app }
    }
}

/// Server ids become Redis keys and the `<server>|<room>` session value.
fn check_server(server: &str) -> Result<(), Status> {
    let ok = !server.is_empty()
        && server.len() <= 128
        && server.chars().all(|c| c.is_ascii_graphic() && c != '|')
        && server != "servers";
    if ok {
        Ok(())
    } else {
        warn!("bad server id from conn");
        Err(Status::invalid_argument(
            "server must be 1-128 printable characters without '|'",
        ))
    }
}

fn check_uid(uid: &str) -> Result<(), Status> {
    if valid_uid(uid) {
        Ok(())
    } else {
        warn!("bad uid from conn");
        Err(Status::invalid_argument(
            "uid must be 1-64 printable characters",
        ))
    }
}

fn check_key(key: &str) -> Result<(), Status> {
    if !key.is_empty() && key.len() <= 256 {
        Ok(())
    } else {
        warn!("bad session key from conn");
        Err(Status::invalid_argument("key must be 1-256 bytes"))
    }
}

/// A refused client message, as its reply.
fn refused(e: ApiError) -> ReceiveReply {
    e.log();
    ReceiveReply {
        code: e.client_code(),
        msg: e.to_string(),
        id: 0,
    }
}

/// A store failure: logged with its cause, the caller only learns "unavailable".
fn unavailable(e: impl Into<ApiError>) -> Status {
    let e = e.into();
    e.log();
    Status::unavailable(e.to_string())
}

#[tonic::async_trait]
impl Logic for LogicService {
    async fn sign_in(&self, req: Request<SignInReq>) -> Result<Response<SignInReply>, Status> {
        self.do_sign_in(req.into_inner()).await.map(Response::new)
    }

    async fn sign_out(&self, req: Request<SignOutReq>) -> Result<Response<SignOutReply>, Status> {
        self.do_sign_out(req.into_inner()).await.map(Response::new)
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatReq>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        self.do_heartbeat(req.into_inner()).await.map(Response::new)
    }

    async fn receive(&self, req: Request<ReceiveReq>) -> Result<Response<ReceiveReply>, Status> {
        self.do_receive(req.into_inner()).await.map(Response::new)
    }

    async fn receive_many(
        &self,
        req: Request<ReceiveManyReq>,
    ) -> Result<Response<ReceiveManyReply>, Status> {
        self.do_receive_many(req.into_inner())
            .await
            .map(Response::new)
    }

    async fn report_online(
        &self,
        req: Request<ReportOnlineReq>,
    ) -> Result<Response<ReportOnlineReply>, Status> {
        self.do_report_online(req.into_inner())
            .await
            .map(Response::new)
    }

    async fn chat(&self, req: Request<ChatReq>) -> Result<Response<ChatReply>, Status> {
        self.do_chat(req.into_inner()).await.map(Response::new)
    }

    async fn pending(&self, req: Request<PendingReq>) -> Result<Response<PendingReply>, Status> {
        self.do_pending(req.into_inner()).await.map(Response::new)
    }

    async fn ack_pending(
        &self,
        req: Request<AckPendingReq>,
    ) -> Result<Response<AckPendingReply>, Status> {
        self.do_ack_pending(req.into_inner())
            .await
            .map(Response::new)
    }

    async fn undelivered(
        &self,
        req: Request<UndeliveredReq>,
    ) -> Result<Response<UndeliveredReply>, Status> {
        self.do_undelivered(req.into_inner())
            .await
            .map(Response::new)
    }

    async fn room_history(
        &self,
        req: Request<RoomHistoryReq>,
    ) -> Result<Response<RoomHistoryReply>, Status> {
        self.do_room_history(req.into_inner())
            .await
            .map(Response::new)
    }
}

// The work is in inherent methods so `#[instrument]` gives each call a span;
// fields are recorded only once validated, so a client cannot stuff the log.
impl LogicService {
    #[tracing::instrument(name = "grpc.sign_in", skip_all, fields(server, uid, room))]
    async fn do_sign_in(&self, req: SignInReq) -> Result<SignInReply, Status> {
        check_server(&req.server)?;
        Span::current().record("server", req.server.as_str());
        let checked = self.app.auth.verify(&req.token).and_then(|uid| {
            // The /chat page names its user too: it must be the token's.
            if !req.uid.is_empty() && req.uid != uid {
                return Err(ApiError::SignInUidMismatch);
            }
            // IM sessions (/chat) have no room of their own.
            if !req.room_id.is_empty() {
                self.app.rooms.check_room(&req.room_id)?;
                if rooms::is_community(&req.room_id) {
                    return Err(ApiError::ReservedRoom);
                }
            }
            Ok(uid)
        });
        let uid = match checked {
            Ok(uid) => uid,
            Err(e) => {
                e.log();
                return Ok(SignInReply {
                    code: e.client_code(),
                    msg: e.to_string(),
                    ..SignInReply::default()
                });
            }
        };
        let span = Span::current();
        span.record("uid", uid.as_str());
        span.record("room", req.room_id.as_str());
        // An IM account's communities are rooms its sessions join too.
        let rooms = match im_uid(&uid) {
            Ok(id) => self
                .app
                .im
                .store()
                .communities_of(id)
                .await
                .map_err(unavailable)?
                .into_iter()
                .map(|c| rooms::community(c.id))
                .collect(),
            Err(_) => Vec::new(),
        };
        // Random rather than a counter: unique across logic nodes without
        // coordination (a clash needs ~2^32 sessions on one conn node).
        let key = format!("{}-{:016x}", req.server, rand::random::<u64>());
        let session = Session {
            uid,
            key,
            server: req.server,
            room: req.room_id,
        };
        self.app
            .rooms
            .presence()
            .sign_in(&session)
            .await
            .map_err(unavailable)?;
        debug!(key = %session.key, "signed in");
        Ok(SignInReply {
            code: ErrCode::Ok as i32,
            msg: "ok".into(),
            uid: session.uid,
            key: session.key,
            heartbeat_secs: self.app.rooms.heartbeat_secs(),
            rooms,
        })
    }

    #[tracing::instrument(name = "grpc.sign_out", skip_all, fields(server, uid))]
    async fn do_sign_out(&self, req: SignOutReq) -> Result<SignOutReply, Status> {
        check_server(&req.server)?;
        check_uid(&req.uid)?;
        check_key(&req.key)?;
        Span::current()
            .record("server", req.server.as_str())
            .record("uid", req.uid.as_str());
        self.app
            .rooms
            .presence()
            .sign_out(&req.uid, &req.key)
            .await
            .map_err(unavailable)?;
        debug!(key = %req.key, "signed out");
        Ok(SignOutReply {})
    }

    #[tracing::instrument(name = "grpc.heartbeat", skip_all, fields(server, uid))]
    async fn do_heartbeat(&self, req: HeartbeatReq) -> Result<HeartbeatReply, Status> {
        check_server(&req.server)?;
        check_uid(&req.uid)?;
        check_key(&req.key)?;
        Span::current()
            .record("server", req.server.as_str())
            .record("uid", req.uid.as_str());
        let known = self
            .app
            .rooms
            .presence()
            .heartbeat(&req.uid, &req.key)
            .await
            .map_err(unavailable)?;
        if !known {
            // The presence store lost it (Redis restarted, a long pause):
            // the session is alive on the node that beats for it, so record
            // it again — otherwise its user counts as offline, and its IM
            // messages wait for the next sign-in, until then. Only the
            // server is used for routing; the room is not known here.
            info!(key = %req.key, "heartbeat for an unknown session; recording it again");
            let s = crate::presence::Session {
                uid: req.uid.clone(),
                key: req.key.clone(),
                server: req.server.clone(),
                room: String::new(),
            };
            self.app
                .rooms
                .presence()
                .sign_in(&s)
                .await
                .map_err(unavailable)?;
        }
        Ok(HeartbeatReply {})
    }

    /// Each message is judged on its own; the accepted ones are numbered
    /// and published in the order given (conn sends one session's messages
    /// in order, several in one call), one room's in one publish. What conn
    /// got wrong refuses the whole call.
    #[tracing::instrument(name = "grpc.receive_many", skip_all, fields(messages = req.msgs.len()))]
    async fn do_receive_many(&self, req: ReceiveManyReq) -> Result<ReceiveManyReply, Status> {
        if req.msgs.len() > MAX_RECEIVE_MANY {
            warn!(messages = req.msgs.len(), "ReceiveMany call too large");
            return Err(Status::invalid_argument(format!(
                "at most {MAX_RECEIVE_MANY} messages per call"
            )));
        }
        for m in &req.msgs {
            check_server(&m.server)?;
            check_uid(&m.uid)?;
        }
        Ok(ReceiveManyReply {
            replies: self.receive_all(req.msgs).await,
        })
    }

    #[tracing::instrument(name = "grpc.receive", skip_all, fields(server, uid, room))]
    async fn do_receive(&self, req: ReceiveReq) -> Result<ReceiveReply, Status> {
        check_server(&req.server)?;
        check_uid(&req.uid)?;
        Span::current()
            .record("server", req.server.as_str())
            .record("uid", req.uid.as_str());
        if let Some(m) = &req.msg
            && self.app.rooms.check_room(&m.room_id).is_ok()
        {
            Span::current().record("room", m.room_id.as_str());
        }
        Ok(self
            .receive_all(vec![req])
            .await
            .pop()
            .expect("one reply per message"))
    }

    /// One reply per message, same order.
    async fn receive_all(&self, msgs: Vec<ReceiveReq>) -> Vec<ReceiveReply> {
        let mut replies: Vec<Option<ReceiveReply>> = Vec::with_capacity(msgs.len());
        let mut accepted = Vec::new();
        let mut slots = Vec::new();
        for req in msgs {
            let checked = match req.msg {
                None => Err(ApiError::MissingMessage),
                Some(m) => self
                    .app
                    .rooms
                    .check_room_msg(&req.uid, &m.room_id, m.msg_lv, m.data),
            };
            match checked {
                Ok(msg) => {
                    slots.push(replies.len());
                    replies.push(None);
                    accepted.push(msg);
                }
                Err(e) => replies.push(Some(refused(e))),
            }
        }
        let published = self.app.rooms.publish_room_msgs(accepted).await;
        for (slot, r) in slots.into_iter().zip(published) {
            replies[slot] = Some(match r {
                Ok(id) => ReceiveReply {
                    code: ErrCode::Ok as i32,
                    msg: "ok".into(),
                    id,
                },
                Err(e) => refused(e),
            });
        }
        replies
            .into_iter()
            .map(|r| r.expect("every message answered"))
            .collect()
    }

    #[tracing::instrument(name = "grpc.room_history", skip_all, fields(room = %req.room_id, after = req.after_offset))]
    async fn do_room_history(&self, req: RoomHistoryReq) -> Result<RoomHistoryReply, Status> {
        self.app.rooms.check_room(&req.room_id).map_err(|e| {
            e.log();
            Status::invalid_argument(e.to_string())
        })?;
        self.app
            .rooms
            .streams()
            .history(
                &req.room_id,
                req.epoch,
                req.after_offset,
                req.until_offset,
                req.limit,
            )
            .await
            .map_err(unavailable)
    }

    #[tracing::instrument(name = "grpc.chat", skip_all, fields(server, uid, cmd, dst))]
    async fn do_chat(&self, req: ChatReq) -> Result<ChatReply, Status> {
        check_server(&req.server)?;
        check_uid(&req.uid)?;
        let span = Span::current();
        span.record("server", req.server.as_str());
        span.record("uid", req.uid.as_str());
        let result = match req.msg {
            None => Err(ApiError::MissingMessage),
            Some(m) => {
                span.record("cmd", m.cmd);
                span.record("dst", m.dstid);
                chat::send(&self.app, &req.uid, m).await
            }
        };
        Ok(match result {
            Ok(ack) => ChatReply {
                code: ErrCode::Ok as i32,
                msg: "ok".into(),
                ack: Some(ack),
            },
            Err(e) => {
                e.log();
                ChatReply {
                    code: e.client_code(),
                    msg: e.to_string(),
                    ack: None,
                }
            }
        })
    }

    #[tracing::instrument(name = "grpc.pending", skip_all, fields(uid))]
    async fn do_pending(&self, req: PendingReq) -> Result<PendingReply, Status> {
        check_uid(&req.uid)?;
        Span::current().record("uid", req.uid.as_str());
        let (msgs, more) = chat::pending(&self.app, &req.uid, req.limit)
            .await
            .map_err(unavailable)?;
        debug!(n = msgs.len(), more, "pending messages handed out");
        Ok(PendingReply { msgs, more })
    }

    #[tracing::instrument(name = "grpc.ack_pending", skip_all, fields(uid))]
    async fn do_ack_pending(&self, req: AckPendingReq) -> Result<AckPendingReply, Status> {
        check_uid(&req.uid)?;
        Span::current().record("uid", req.uid.as_str());
        let n = chat::ack_pending(&self.app, &req.uid, req.upto_id)
            .await
            .map_err(unavailable)?;
        debug!(n, upto = req.upto_id, "pending messages acknowledged");
        Ok(AckPendingReply {})
    }

    #[tracing::instrument(name = "grpc.undelivered", skip_all, fields(server, uid))]
    async fn do_undelivered(&self, req: UndeliveredReq) -> Result<UndeliveredReply, Status> {
        check_server(&req.server)?;
        check_uid(&req.uid)?;
        Span::current().record("server", req.server.as_str());
        Span::current().record("uid", req.uid.as_str());
        let stored = chat::undelivered(&self.app, &req.server, &req.uid, &req.ids)
            .await
            .map_err(unavailable)?;
        if stored > 0 {
            info!(stored, "messages for a user who left stored for later");
        }
        Ok(UndeliveredReply {
            stored: stored as u32,
        })
    }

    #[tracing::instrument(name = "grpc.report_online", skip_all, fields(server))]
    async fn do_report_online(&self, req: ReportOnlineReq) -> Result<ReportOnlineReply, Status> {
        check_server(&req.server)?;
        Span::current().record("server", req.server.as_str());
        let total = req.rooms.len();
        // Rooms only come from sessions logic accepted, so a bad one means a
        // confused conn node: skip it rather than refuse the whole report.
        let rooms: RoomCounts = req
            .rooms
            .into_iter()
            .filter(|(room, _)| self.app.rooms.check_room(room).is_ok())
            .collect();
        if rooms.len() != total {
            warn!(skipped = total - rooms.len(), "report had invalid room ids");
        }
        let totals = self
            .app
            .rooms
            .presence()
            .report_online(&req.server, &rooms)
            .await
            .map_err(unavailable)?;
        debug!(rooms = rooms.len(), "online counts reported");
        Ok(ReportOnlineReply { rooms: totals })
    }
}

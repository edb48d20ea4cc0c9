//! A signed-in session's reader: frames from the client, dispatched by
//! kind — heartbeats, room messages (pipelined to logic), MEMBERS, IM
//! messages — and every bad frame answered with an error.

use std::sync::Arc;

use bytes::Bytes;
use chatroom_common::proto::logic::{HeartbeatReq, ReceiveReq, SignOutReq};
use chatroom_common::proto::protocol::{BroadcastRoomReq, ChatMsg, PackageType, Req};
use prost::Message as _;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use super::edge::Edge;
use super::{Identity, Tag, im, session_span};
use crate::Ctx;
use crate::chat::{self, Encoding};
use crate::frame;
use crate::heartbeat::Heartbeat;
use crate::room::Outbound;
use crate::stats::BadFrame;
use crate::ws::{self, Frame, WsError};
use chatroom_common::proto::protocol::{ChatCmd, ErrCode};

/// The reader's own state.
pub(super) struct Reading {
    hb: Heartbeat,
    session: u64,
    /// Slots for messages on their way to logic (`ws.max_in_flight`).
    in_flight: Option<Arc<Semaphore>>,
}

/// Serves a signed-in session's frames until it ends. (An async block, not
/// an `async fn`, so that the idle session's future holds its arguments
/// once; see `session::serve`.)
#[allow(clippy::manual_async_fn)] // see the doc: an async fn keeps its arguments twice
pub(super) fn read_loop<'a>(
    stream: &'a mut ws::Reader,
    edge: &'a Edge,
    ctx: &'a Ctx,
    who: &'a Identity,
    kill: &'a CancellationToken,
    tag: &'a Tag,
) -> impl Future<Output = ()> + Send + 'a {
    async move {
        let mut st = Reading {
            hb: Heartbeat::new(ctx.cfg.ws.heartbeat, ctx.cfg.ws.heartbeat_misses),
            session: tag.id,
            in_flight: None,
        };
        loop {
            let got = tokio::select! {
                _ = kill.cancelled() => return,
                r = tokio::time::timeout(st.hb.idle_limit(), next_data(stream, edge)) => r,
            };
            // The span and each handler live in one box, so the idle state of
            // this loop holds neither.
            let span = || session_span(*tag, Some(who));
            let incoming = match got {
                Err(_) => {
                    span().in_scope(
                        || info!(limit = ?st.hb.idle_limit(), "client silent too long; closing"),
                    );
                    let _ = edge.out(Outbound::Close(1000, "heartbeat timeout")).await;
                    return;
                }
                Ok(i) => i,
            };
            let ok = match (edge.enc, incoming) {
                (Encoding::Protobuf, Incoming::Binary(data)) => {
                    Box::pin(on_binary(edge, ctx, who, &mut st, data).instrument(span())).await
                }
                (Encoding::Json, Incoming::Text(text)) => {
                    Box::pin(on_json(edge, ctx, who, &mut st.hb, text).instrument(span())).await
                }
                (_, other) => {
                    Box::pin(reject_incoming(edge, ctx, other, false).instrument(span())).await
                }
            };
            if !ok {
                return;
            }
        }
    }
}

/// One protobuf `Req`; false when the session must end.
async fn on_binary(edge: &Edge, ctx: &Ctx, who: &Identity, st: &mut Reading, data: Bytes) -> bool {
    let req = match Req::decode(data) {
        Ok(r) => r,
        Err(e) => {
            ctx.stats.bad_frame(BadFrame::Malformed);
            warn!(error = %e, "malformed frame");
            return edge
                .err(ErrCode::BadRequest, format!("malformed Req frame: {e}"), 0)
                .await
                .is_ok();
        }
    };
    let answer = match PackageType::try_from(req.r#type) {
        Ok(PackageType::Heartbeat) => {
            beat(ctx, who, &mut st.hb);
            Some(frame::reply(
                PackageType::Heartbeat,
                Bytes::from_static(b"pong"),
            ))
        }
        Ok(PackageType::Message) => on_message(edge, ctx, who, st, req.data).await,
        Ok(PackageType::Members) => Some(match &who.room {
            Some(room) => {
                let n = ctx.online.total(room, ctx.buckets.count(room));
                frame::reply(PackageType::Members, n.to_string())
            }
            None => frame::err(ErrCode::BadRequest, "this session has no room"),
        }),
        Ok(PackageType::Chat) => {
            return match ChatMsg::decode(req.data) {
                Ok(m) => im::send_chat(edge, ctx, who, m).await,
                Err(e) => {
                    ctx.stats.bad_frame(BadFrame::Malformed);
                    warn!(error = %e, "malformed ChatMsg");
                    edge.err(ErrCode::BadRequest, format!("malformed ChatMsg: {e}"), 0)
                        .await
                        .is_ok()
                }
            };
        }
        Ok(PackageType::SignIn) => {
            ctx.stats.bad_frame(BadFrame::SecondSignIn);
            warn!("second sign-in on a signed-in session");
            Some(frame::err(ErrCode::Conflict, "already signed in"))
        }
        Ok(PackageType::Unknown | PackageType::ChatAck) | Err(_) => {
            ctx.stats.bad_frame(BadFrame::UnknownType);
            warn!(kind = req.r#type, "unknown package type");
            Some(frame::err(
                ErrCode::NotFound,
                format!("unknown package type {}", frame::type_name(req.r#type)),
            ))
        }
    };
    match answer {
        Some(a) => edge.binary(a).await.is_ok(),
        None => true,
    }
}

/// One JSON text frame in the IM seed's format; false when the session must end.
async fn on_json(edge: &Edge, ctx: &Ctx, who: &Identity, hb: &mut Heartbeat, text: Bytes) -> bool {
    // The codec checked UTF-8 already.
    let m = match chat::parse_json(std::str::from_utf8(&text).unwrap_or_default()) {
        Ok(m) => m,
        Err(e) => {
            ctx.stats.bad_frame(BadFrame::Malformed);
            warn!(error = %e, "malformed JSON message");
            return edge.err(ErrCode::BadRequest, e, 0).await.is_ok();
        }
    };
    match ChatCmd::try_from(m.cmd) {
        Ok(ChatCmd::Heartbeat) => {
            beat(ctx, who, hb);
            edge.out(Outbound::Text(chat::pong_json())).await.is_ok()
        }
        Ok(ChatCmd::Single | ChatCmd::Community) => im::send_chat(edge, ctx, who, m.into()).await,
        _ => {
            let other = m.cmd;
            ctx.stats.bad_frame(BadFrame::UnknownType);
            warn!(cmd = other, "unknown cmd");
            edge.err(ErrCode::NotFound, format!("unknown cmd {other}"), m.id)
                .await
                .is_ok()
        }
    }
}

fn beat(ctx: &Ctx, who: &Identity, hb: &mut Heartbeat) {
    if hb.should_renew(tokio::time::Instant::now()) {
        renew(ctx, who);
    }
}

/// A room message from the client: checked here, then handed to logic
/// without waiting for its answer (see `receive`). Only failures are
/// answered (the seed's clients read `Reply{type 0}` as an error).
async fn on_message(
    edge: &Edge,
    ctx: &Ctx,
    who: &Identity,
    st: &mut Reading,
    data: Bytes,
) -> Option<Bytes> {
    let mut msg = match BroadcastRoomReq::decode(data) {
        Ok(m) => m,
        Err(e) => {
            ctx.stats.bad_frame(BadFrame::Malformed);
            warn!(error = %e, "malformed BroadcastRoomReq");
            return Some(frame::err(
                ErrCode::BadRequest,
                format!("malformed BroadcastRoomReq: {e}"),
            ));
        }
    };
    let Some(room) = &who.room else {
        return Some(frame::err(ErrCode::BadRequest, "this session has no room"));
    };
    if msg.room_id.is_empty() {
        msg.room_id = room.clone();
    } else if &msg.room_id != room {
        ctx.stats.bad_frame(BadFrame::NotInRoom);
        warn!(target_room = %msg.room_id, "message to a room the session is not in");
        return Some(frame::err(
            ErrCode::Forbidden,
            format!("not in room {}", msg.room_id),
        ));
    }
    let req = ReceiveReq {
        server: ctx.server.clone(),
        uid: who.uid.clone(),
        msg: Some(msg),
    };
    // Made on the first message: a session that only listens holds none.
    let in_flight = st
        .in_flight
        .get_or_insert_with(|| Arc::new(Semaphore::new(ctx.cfg.ws.max_in_flight)))
        .clone();
    // At the bound this waits: the socket is not read meanwhile, so TCP
    // pushes back on the client instead of anything being dropped.
    let Ok(slot) = in_flight.acquire_owned().await else {
        return None;
    };
    match ctx
        .receiver
        .submit(st.session, req, edge.tx.clone(), slot)
        .await
    {
        Ok(()) => None,
        Err(()) => Some(frame::err(
            ErrCode::Unavailable,
            "this node is shutting down, try again",
        )),
    }
}

/// What the reader got from the socket.
pub(super) enum Incoming {
    Binary(Bytes),
    /// Valid UTF-8.
    Text(Bytes),
    TooLarge,
    /// A protocol violation: close with this code.
    Violation(u16),
    Closed,
}

pub(super) async fn next_data(stream: &mut ws::Reader, edge: &Edge) -> Incoming {
    loop {
        match stream.next().await {
            Ok(Some(Frame::Binary(b))) => return Incoming::Binary(b),
            Ok(Some(Frame::Text(t))) => return Incoming::Text(t),
            Ok(Some(Frame::Ping(p))) => {
                // Best effort: a client whose queue is full gets no pong.
                let _ = edge
                    .tx
                    .try_push(Outbound::Pong(p), std::time::Instant::now());
            }
            // Pongs only prove liveness, which any frame does.
            Ok(Some(Frame::Pong)) => {}
            Ok(Some(Frame::Close(_)) | None) => return Incoming::Closed,
            Err(WsError::TooLarge(_)) => return Incoming::TooLarge,
            Err(e) => {
                debug!(error = %e, "websocket read failed");
                return match e.close_code() {
                    Some(code) => Incoming::Violation(code),
                    None => Incoming::Closed,
                };
            }
        }
    }
}

/// Answers a frame of the wrong kind, or a size violation; true if the
/// session may go on.
pub(super) async fn reject_incoming(
    edge: &Edge,
    ctx: &Ctx,
    what: Incoming,
    before_sign_in: bool,
) -> bool {
    let wrong = match (edge.enc, &what) {
        (_, Incoming::Closed) => return false,
        (_, Incoming::Violation(code)) => {
            ctx.stats.bad_frame(BadFrame::Protocol);
            warn!(code, "websocket protocol violation; closing");
            let _ = edge.out(Outbound::Close(*code, "protocol violation")).await;
            return false;
        }
        (_, Incoming::TooLarge) => {
            ctx.stats.bad_frame(BadFrame::TooLarge);
            warn!(
                max = ctx.cfg.ws.max_frame_bytes,
                "frame over the size limit; closing"
            );
            let msg = format!("frame larger than {} bytes", ctx.cfg.ws.max_frame_bytes);
            let _ = edge.err(ErrCode::TooLarge, msg, 0).await;
            let _ = edge.out(Outbound::Close(1009, "frame too large")).await;
            return false;
        }
        (Encoding::Protobuf, Incoming::Text(_)) => {
            "text frames are not supported here: send binary protobuf Req frames"
        }
        (Encoding::Json, Incoming::Binary(_)) => {
            "binary frames are not supported here: send JSON text frames"
        }
        _ => "unexpected frame",
    };
    ctx.stats.bad_frame(if before_sign_in {
        BadFrame::NotSignedIn
    } else {
        BadFrame::Text
    });
    warn!(before_sign_in, "{wrong}");
    let _ = edge.err(ErrCode::BadRequest, wrong, 0).await;
    if before_sign_in {
        let _ = edge.out(Outbound::Close(1003, "unsupported data")).await;
        return false;
    }
    true
}

fn renew(ctx: &Ctx, who: &Identity) {
    let req = HeartbeatReq {
        server: ctx.server.clone(),
        uid: who.uid.clone(),
        key: who.key.clone(),
    };
    let pool = ctx.logic.clone();
    ctx.tracker.spawn(
        async move {
            if let Err(e) = pool.heartbeat(req).await {
                debug!(error = %e.message(), "presence renewal failed");
            }
        }
        .in_current_span(),
    );
}

pub(super) fn sign_out(ctx: &Ctx, who: Identity, tag: Tag) {
    let span = session_span(tag, Some(&who));
    let req = SignOutReq {
        server: ctx.server.clone(),
        uid: who.uid,
        key: who.key,
    };
    let pool = ctx.logic.clone();
    ctx.tracker.spawn(
        async move {
            if let Err(e) = pool.sign_out(req).await {
                debug!(error = %e.message(), "sign-out call failed");
            }
        }
        .instrument(span),
    );
}

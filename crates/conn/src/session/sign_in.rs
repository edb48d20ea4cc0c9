//! Signing a session in: `/room` reads a `SIGN_IN` frame, `/chat` takes the
//! credentials from its query; logic rules on the token either way.

use chatroom_common::proto::logic::SignInReq;
use chatroom_common::proto::protocol::{PackageType, Req, SignIn};
use prost::Message as _;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::edge::Edge;
use super::read::{Incoming, next_data, reject_incoming};
use super::{Identity, Resume};
use crate::Ctx;
use crate::chat;
use crate::frame;
use crate::room::Outbound;
use crate::stats::{BadFrame, SignInRefusal};
use crate::ws;
use chatroom_common::proto::protocol::ErrCode;

/// `/room`: the first frame must be SIGN_IN; logic rules on it. The answer
/// is sent once the session has joined its room's stream (`recover`).
pub(super) async fn sign_in_room(
    stream: &mut ws::Reader,
    edge: &Edge,
    ctx: &Ctx,
    kill: &CancellationToken,
) -> Option<(Identity, Vec<String>, Resume)> {
    let limit = ctx.cfg.ws.sign_in_timeout;
    let first = tokio::select! {
        _ = kill.cancelled() => return None,
        r = tokio::time::timeout(limit, next_data(stream, edge)) => r,
    };
    let data = match first {
        Err(_) => {
            ctx.stats.sign_in_refused(SignInRefusal::Timeout);
            info!("no sign-in within the deadline; closing");
            edge.refuse(ErrCode::LoginNeeded, "login needed: sign in first")
                .await;
            return None;
        }
        Ok(Incoming::Binary(d)) => d,
        Ok(other) => {
            ctx.stats.sign_in_refused(SignInRefusal::BadFrame);
            reject_incoming(edge, ctx, other, true).await;
            return None;
        }
    };
    let req = match Req::decode(data) {
        Ok(r) => r,
        Err(e) => {
            ctx.stats.bad_frame(BadFrame::Malformed);
            ctx.stats.sign_in_refused(SignInRefusal::BadFrame);
            warn!(error = %e, "malformed frame before sign-in");
            edge.refuse(ErrCode::BadRequest, format!("malformed Req frame: {e}"))
                .await;
            return None;
        }
    };
    if req.r#type != PackageType::SignIn as i32 {
        ctx.stats.bad_frame(BadFrame::NotSignedIn);
        ctx.stats.sign_in_refused(SignInRefusal::BadFrame);
        warn!(kind = %frame::type_name(req.r#type), "frame before sign-in");
        let msg = format!(
            "login needed: sign in before {}",
            frame::type_name(req.r#type)
        );
        edge.refuse(ErrCode::LoginNeeded, msg).await;
        return None;
    }
    let sign = match SignIn::decode(req.data) {
        Ok(s) => s,
        Err(e) => {
            ctx.stats.bad_frame(BadFrame::Malformed);
            ctx.stats.sign_in_refused(SignInRefusal::BadFrame);
            warn!(error = %e, "malformed SignIn");
            edge.refuse(ErrCode::BadRequest, format!("malformed SignIn: {e}"))
                .await;
            return None;
        }
    };
    if sign.room_id.is_empty() {
        ctx.stats.sign_in_refused(SignInRefusal::BadFrame);
        warn!("sign-in with an empty room id");
        edge.refuse(ErrCode::BadRequest, "room id is empty").await;
        return None;
    }
    let resume = Resume {
        epoch: sign.epoch,
        since: sign.since_offset,
    };
    let req = SignInReq {
        server: ctx.server.clone(),
        token: sign.token,
        room_id: sign.room_id.clone(),
        uid: String::new(),
    };
    let (who, rooms) = ask_logic(ctx, edge, req, Some(sign.room_id)).await?;
    Some((who, rooms, resume))
}

/// `/chat?id=&token=`: the query carries the credentials.
pub(super) async fn sign_in_chat(
    id: String,
    token: String,
    edge: &Edge,
    ctx: &Ctx,
) -> Option<(Identity, Vec<String>, Resume)> {
    if token.is_empty() {
        ctx.stats.sign_in_refused(SignInRefusal::Token);
        warn!("chat connection without a token");
        edge.refuse(ErrCode::LoginNeeded, "login needed: token is missing")
            .await;
        return None;
    }
    let req = SignInReq {
        server: ctx.server.clone(),
        token,
        room_id: String::new(),
        uid: id,
    };
    let (who, rooms) = ask_logic(ctx, edge, req, None).await?;
    edge.out(Outbound::Text(chat::welcome_json(&who.uid)))
        .await
        .ok()?;
    Some((who, rooms, Resume::default()))
}

async fn ask_logic(
    ctx: &Ctx,
    edge: &Edge,
    req: SignInReq,
    room: Option<String>,
) -> Option<(Identity, Vec<String>)> {
    let reply = match ctx.logic.sign_in(req).await {
        Ok(r) => r,
        Err(e) => {
            ctx.stats.sign_in_refused(SignInRefusal::LogicUnavailable);
            warn!(error = %e.message(), "logic sign-in call failed");
            edge.refuse(
                ErrCode::Unavailable,
                "sign-in service unavailable, try again",
            )
            .await;
            return None;
        }
    };
    if reply.code != ErrCode::Ok as i32 {
        ctx.stats
            .sign_in_refused(if reply.code == ErrCode::LoginNeeded as i32 {
                SignInRefusal::Token
            } else {
                SignInRefusal::Other
            });
        info!(code = reply.code, msg = %reply.msg, "sign-in refused");
        edge.refuse(reply.code, reply.msg).await;
        return None;
    }
    Some((
        Identity {
            uid: reply.uid,
            key: reply.key,
            room,
        },
        reply.rooms,
    ))
}

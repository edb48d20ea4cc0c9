//! A session's IM side: messages it sends (`cmd` 10/11 or `CHAT`), each
//! answered with an ack naming it, and what was stored for the user while
//! offline, delivered at sign-in.

use chatroom_common::proto::logic::{AckPendingReq, ChatReq, PendingReq};
use chatroom_common::proto::protocol::ChatMsg;
use tracing::{info, warn};

use super::Identity;
use super::edge::Edge;
use crate::Ctx;
use crate::chat::{self, ChatFrame, Encoding};
use crate::room::Outbound;
use chatroom_common::proto::protocol::{ChatCmd, ErrCode};

/// Pending messages fetched per call when a user comes online.
const PENDING_PAGE: u32 = 200;

/// An IM message from this session: logic checks, stores and routes it;
/// the session gets an ack naming it, or an error naming the client's id.
pub(super) async fn send_chat(edge: &Edge, ctx: &Ctx, who: &Identity, msg: ChatMsg) -> bool {
    let client_id = msg.id;
    if msg.cmd == ChatCmd::Heartbeat as i32 && edge.enc == Encoding::Protobuf {
        return edge
            .err(ErrCode::BadRequest, "use HEARTBEAT frames", client_id)
            .await
            .is_ok();
    }
    let req = ChatReq {
        server: ctx.server.clone(),
        uid: who.uid.clone(),
        msg: Some(msg),
    };
    match ctx.logic.chat(req).await {
        Ok(r) if r.code == ErrCode::Ok as i32 => {
            let Some(ack) = r.ack else {
                warn!("logic accepted a chat message without an ack");
                return true;
            };
            let out = match edge.enc {
                Encoding::Protobuf => Outbound::Frame(chat::ack_proto(&ack)),
                Encoding::Json => Outbound::Text(chat::ack_json(&ack)),
            };
            edge.out(out).await.is_ok()
        }
        Ok(r) => {
            info!(code = r.code, msg = %r.msg, "chat message refused");
            edge.err(r.code, r.msg, client_id).await.is_ok()
        }
        Err(e) => {
            warn!(error = %e.message(), "logic chat call failed");
            edge.err(
                ErrCode::Unavailable,
                "message service unavailable, try again",
                client_id,
            )
            .await
            .is_ok()
        }
    }
}

/// Hands what was stored for the user while offline to this session,
/// oldest first, then tells logic it may forget it.
pub(super) async fn deliver_pending(ctx: &Ctx, who: &Identity, edge: &Edge) -> Result<(), ()> {
    if who.uid.parse::<i64>().is_err() {
        return Ok(()); // not an IM user: nothing is ever stored for it
    }
    loop {
        let req = PendingReq {
            uid: who.uid.clone(),
            limit: PENDING_PAGE,
        };
        let page = match ctx.logic.pending(req).await {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e.message(), "fetching offline messages failed; they stay stored");
                return Ok(());
            }
        };
        let Some(upto) = page.msgs.last().map(|m| m.id) else {
            return Ok(());
        };
        let n = page.msgs.len();
        let frames: Vec<ChatFrame> = page.msgs.iter().map(ChatFrame::new).collect();
        edge.out(Outbound::Chat(frames.into())).await?;
        info!(messages = n, "offline messages delivered");
        let ack = AckPendingReq {
            uid: who.uid.clone(),
            upto_id: upto,
        };
        if let Err(e) = ctx.logic.ack_pending(ack).await {
            warn!(error = %e.message(), "acknowledging offline messages failed; they may come again");
            return Ok(());
        }
        if !page.more {
            return Ok(());
        }
    }
}

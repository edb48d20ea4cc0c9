//! One WebSocket connection: the handshake, sign-in, then a reader task
//! (this one) and a writer task over a bounded queue; when either ends, the
//! other is stopped. One concept per file: `handshake`, `sign_in`,
//! `recover` (joining the room stream, recovery after a reconnect), `read`
//! (dispatching the client's frames), `im` (IM messages and offline
//! delivery), `writer`, and `edge` (answers in the session's encoding).
//!
//! Two endpoints share this one session model (a user and a set of rooms):
//! `/room` speaks binary protobuf frames (the seed's protocol plus the IM
//! `CHAT` extension), `/chat?id=&token=` speaks the IM seed's JSON text
//! frames. The encodings only differ at the edge (`Edge`).

mod edge;
mod handshake;
mod im;
mod read;
mod recover;
mod sign_in;
mod writer;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span, debug, info, info_span};

use crate::Ctx;
use crate::chat::Encoding;
use crate::outbox::{Limits, Outbox};
use crate::room::SessionTx;
use edge::Edge;
use handshake::{Endpoint, handshake};

/// A signed-in session's identity.
struct Identity {
    uid: String,
    key: String,
    /// The sign-in room (`/room`), the only one MESSAGE may address.
    room: Option<String>,
}

/// Where a reconnecting `/room` client left its room's stream (`SignIn`'s
/// `epoch` and `since_offset`); epoch 0 asks for no recovery.
#[derive(Debug, Clone, Copy, Default)]
struct Resume {
    epoch: u64,
    since: u64,
}

/// Who a session is, for its span.
#[derive(Debug, Clone, Copy)]
struct Tag {
    peer: SocketAddr,
    id: u64,
}

/// The session's span (`peer`, `id`, and once signed in `uid` and `room`).
/// It is made whenever the session has something to do or to log and
/// dropped after, not held for the session's life: a span held open keeps
/// its fields in the subscriber's registry, ~0.4 KiB per idle session at
/// `info` (measured: 5.58 against 5.15 KiB per session), a tenth of all a
/// session costs. Logs read the same either way.
fn session_span(tag: Tag, who: Option<&Identity>) -> Span {
    match who {
        Some(w) => info_span!("session", peer = %tag.peer, id = tag.id, uid = %w.uid,
            room = w.room.as_deref().unwrap_or("")),
        None => info_span!("session", peer = %tag.peer, id = tag.id),
    }
}

/// Serves one accepted TCP connection until it ends or `shutdown` fires;
/// `slot` (one of `ws.max_connections`) is given back at the end.
#[allow(clippy::manual_async_fn)] // an async fn would keep its arguments twice (below)
pub fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    ctx: Arc<Ctx>,
    id: u64,
    shutdown: CancellationToken,
    slot: OwnedSemaphorePermit,
) -> impl Future<Output = ()> + Send {
    // Not `async fn` (nor is `run_session`): the arguments of an async fn
    // are kept twice in its future — as arguments and as the body's locals —
    // and this future is most of what an idle session costs. An async
    // block uses what it captured in place.
    async move {
        let tag = Tag { peer, id };
        // Futures used once or rarely are boxed: an idle session's task then
        // only holds the state of its read loop, not of the largest call.
        let shaken = Box::pin(handshake(stream, &ctx).instrument(session_span(tag, None))).await;
        let (reader, writer, endpoint) = match shaken {
            Ok(x) => x,
            Err(e) => {
                session_span(tag, None)
                    .in_scope(|| debug!(error = %e, "websocket handshake failed"));
                return;
            }
        };
        ctx.stats.sessions.fetch_add(1, Ordering::Relaxed);
        run_session(reader, writer, endpoint, ctx.clone(), tag, shutdown).await;
        ctx.stats.sessions.fetch_sub(1, Ordering::Relaxed);
        drop(slot);
    }
}

#[allow(clippy::manual_async_fn)] // not async fn: see `serve`
fn run_session(
    mut stream: crate::ws::Reader,
    sink: crate::ws::Writer,
    endpoint: Endpoint,
    ctx: Arc<Ctx>,
    tag: Tag,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> + Send {
    async move {
        let id = tag.id;
        let tx = Arc::new(Outbox::with_depth(
            Limits::new(ctx.cfg.ws.send_queue_bytes, ctx.cfg.ws.slow_after),
            ctx.stats.outbox_depth.clone(),
        ));
        let kill = shutdown.child_token();
        let enc = match endpoint {
            Endpoint::Room => Encoding::Protobuf,
            Endpoint::Chat { .. } => Encoding::Json,
        };
        // Not instrumented: the writer wakes for every push, and entering a
        // span on each poll showed in profiles; its rare logs make one.
        let writer = tokio::spawn(writer::write_loop(writer::Writer {
            sink,
            outbox: tx.clone(),
            enc,
            kill: kill.clone(),
            shutdown: shutdown.clone(),
            ping: ctx.cfg.ws.ping,
            tag,
            ctx: ctx.clone(),
        }));
        let edge = Edge { tx, enc };

        let signed = match endpoint {
            Endpoint::Room => {
                let span = session_span(tag, None);
                Box::pin(sign_in::sign_in_room(&mut stream, &edge, &ctx, &kill).instrument(span))
                    .await
            }
            Endpoint::Chat { id, token } => {
                let span = session_span(tag, None);
                Box::pin(sign_in::sign_in_chat(id, token, &edge, &ctx).instrument(span)).await
            }
        };
        if let Some((who, extra_rooms, resume)) = signed {
            ctx.stats.session_signed_in(edge.enc);
            let me = Arc::new(SessionTx::new(
                id,
                edge.tx.clone(),
                kill.clone(),
                who.uid.clone(),
            ));
            ctx.buckets.register(me.clone());
            for room in who.room.iter().chain(extra_rooms.iter()) {
                ctx.buckets.join_session(room, &me);
            }
            let span = session_span(tag, Some(&who));
            // The sign-in room's stream: the answer, recovery, then live.
            let (joined, ready) = match &who.room {
                Some(room) => {
                    let (s, sent) =
                        Box::pin(recover::join(&ctx, &edge, room, resume).instrument(span.clone()))
                            .await;
                    (Some(s), sent)
                }
                None => (None, Ok(())),
            };
            span.in_scope(|| info!(rooms = me.rooms().len(), "signed in"));
            let pending = match ready {
                Ok(()) => Box::pin(im::deliver_pending(&ctx, &who, &edge).instrument(span)).await,
                Err(()) => Err(()),
            };
            if pending.is_ok() {
                read::read_loop(&mut stream, &edge, &ctx, &who, &kill, &tag).await;
            }
            if let Some(s) = joined {
                ctx.streams.unsubscribe(&s);
            }
            ctx.buckets.unregister(&me);
            ctx.stats.session_signed_out(edge.enc);
            read::sign_out(&ctx, who, tag);
        }
        // Closed, the outbox lets the writer send what is queued (an Err and a
        // close frame, say) and stop; give it a moment, then force it.
        edge.tx.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
        kill.cancel();
    }
}

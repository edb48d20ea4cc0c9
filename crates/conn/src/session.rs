//! One WebSocket connection: the handshake, sign-in, then a reader task
//! (this one) and a writer task over a bounded queue. When either ends, the
//! other is stopped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use chatroom_common::proto::logic::{HeartbeatReq, ReceiveReq, SignInReq, SignOutReq};
use chatroom_common::proto::protocol::{BroadcastRoomReq, PackageType, Req, SignIn};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::Ctx;
use crate::frame::{self, code};
use crate::heartbeat::Heartbeat;
use crate::room::{Outbound, SessionTx};

type Ws = WebSocketStream<TcpStream>;

/// A signed-in session's identity.
struct Identity {
    uid: String,
    key: String,
    room: String,
}

/// Serves one accepted TCP connection until it ends or `shutdown` fires.
pub async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    ctx: Arc<Ctx>,
    id: u64,
    shutdown: CancellationToken,
) {
    let span =
        info_span!("session", %peer, id, uid = tracing::field::Empty, room = tracing::field::Empty);
    async move {
        let ws = match handshake(stream, &ctx).await {
            Ok(ws) => ws,
            Err(e) => {
                debug!(error = %e, "websocket handshake failed");
                return;
            }
        };
        ctx.stats.sessions.fetch_add(1, Ordering::Relaxed);
        run_session(ws, ctx.clone(), id, shutdown).await;
        ctx.stats.sessions.fetch_sub(1, Ordering::Relaxed);
    }
    .instrument(span)
    .await
}

async fn handshake(stream: TcpStream, ctx: &Ctx) -> Result<Ws, WsError> {
    let _ = stream.set_nodelay(true);
    let w = &ctx.cfg.ws;
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(w.read_buffer_bytes)
        .write_buffer_size(w.write_buffer_bytes)
        .max_write_buffer_size(w.max_write_buffer_bytes)
        .max_message_size(Some(w.max_frame_bytes))
        .max_frame_size(Some(w.max_frame_bytes));
    // The callback's signature is tungstenite's; its large Err is not ours to shrink.
    #[allow(clippy::result_large_err)]
    let check_path = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        if req.uri().path() == "/room" {
            Ok(resp)
        } else {
            let mut r =
                ErrorResponse::new(Some("not found: the WebSocket endpoint is /room".into()));
            *r.status_mut() = StatusCode::NOT_FOUND;
            Err(r)
        }
    };
    let timeout = Duration::from_millis(ctx.cfg.ws.sign_in_timeout_ms);
    match tokio::time::timeout(
        timeout,
        tokio_tungstenite::accept_hdr_async_with_config(stream, check_path, Some(config)),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => Err(WsError::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "handshake timed out",
        ))),
    }
}

async fn run_session(ws: Ws, ctx: Arc<Ctx>, id: u64, shutdown: CancellationToken) {
    let (sink, mut stream) = ws.split();
    let (tx, rx) = mpsc::channel(ctx.cfg.ws.send_queue);
    let kill = shutdown.child_token();
    let ping = Duration::from_secs(ctx.cfg.ws.ping_secs);
    let writer =
        tokio::spawn(write_loop(sink, rx, kill.clone(), shutdown.clone(), ping).in_current_span());

    let me = Arc::new(SessionTx {
        id,
        tx: tx.clone(),
        kill: kill.clone(),
    });
    if let Some(who) = sign_in(&mut stream, &tx, &ctx, &kill).await {
        let span = tracing::Span::current();
        span.record("uid", who.uid.as_str());
        span.record("room", who.room.as_str());
        ctx.buckets.join(&who.room, me.clone());
        info!("signed in");
        read_loop(&mut stream, &tx, &ctx, &who, &kill).await;
        ctx.buckets.leave(&who.room, id);
        sign_out(&ctx, who);
    }
    // With every sender gone the writer sends what is queued (an Err and a
    // close frame, say) and stops; give it a moment, then force it.
    drop(tx);
    drop(me);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    kill.cancel();
}

/// Reads the first frame, which must be SIGN_IN, and asks logic about it.
async fn sign_in(
    stream: &mut SplitStream<Ws>,
    tx: &mpsc::Sender<Outbound>,
    ctx: &Ctx,
    kill: &CancellationToken,
) -> Option<Identity> {
    let limit = Duration::from_millis(ctx.cfg.ws.sign_in_timeout_ms);
    let first = tokio::select! {
        _ = kill.cancelled() => return None,
        r = tokio::time::timeout(limit, next_data(stream)) => r,
    };
    let data = match first {
        Err(_) => {
            info!("no sign-in within the deadline; closing");
            refuse(tx, code::LOGIN_NEEDED, "login needed: sign in first").await;
            return None;
        }
        Ok(Incoming::Data(d)) => d,
        Ok(other) => {
            reject_incoming(tx, ctx, other, "before sign-in").await;
            return None;
        }
    };
    let req = match Req::decode(data) {
        Ok(r) => r,
        Err(e) => {
            ctx.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
            warn!(error = %e, "malformed frame before sign-in");
            refuse(tx, code::BAD_REQUEST, format!("malformed Req frame: {e}")).await;
            return None;
        }
    };
    if req.r#type != PackageType::SignIn as i32 {
        warn!(kind = %frame::type_name(req.r#type), "frame before sign-in");
        let msg = format!(
            "login needed: sign in before {}",
            frame::type_name(req.r#type)
        );
        refuse(tx, code::LOGIN_NEEDED, msg).await;
        return None;
    }
    let sign = match SignIn::decode(req.data) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "malformed SignIn");
            refuse(tx, code::BAD_REQUEST, format!("malformed SignIn: {e}")).await;
            return None;
        }
    };
    if sign.room_id.is_empty() {
        warn!("sign-in with an empty room id");
        refuse(tx, code::BAD_REQUEST, "room id is empty").await;
        return None;
    }
    let req = SignInReq {
        server: ctx.server.clone(),
        token: sign.token,
        room_id: sign.room_id.clone(),
    };
    let reply = match ctx.logic.sign_in(req).await {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e.message(), "logic sign-in call failed");
            refuse(
                tx,
                code::UNAVAILABLE,
                "sign-in service unavailable, try again",
            )
            .await;
            return None;
        }
    };
    if reply.code != code::OK {
        info!(code = reply.code, msg = %reply.msg, "sign-in refused");
        refuse(tx, reply.code, reply.msg).await;
        return None;
    }
    if send(tx, frame::err(code::OK, "ok")).await.is_err() {
        return None;
    }
    Some(Identity {
        uid: reply.uid,
        key: reply.key,
        room: sign.room_id,
    })
}

/// Serves a signed-in session's frames until it ends.
async fn read_loop(
    stream: &mut SplitStream<Ws>,
    tx: &mpsc::Sender<Outbound>,
    ctx: &Ctx,
    who: &Identity,
    kill: &CancellationToken,
) {
    let mut hb = Heartbeat::new(
        Duration::from_secs(ctx.cfg.ws.heartbeat_secs),
        ctx.cfg.ws.heartbeat_misses,
    );
    loop {
        let got = tokio::select! {
            _ = kill.cancelled() => return,
            r = tokio::time::timeout(hb.idle_limit(), next_data(stream)) => r,
        };
        let data = match got {
            Err(_) => {
                info!(limit = ?hb.idle_limit(), "client silent too long; closing");
                let _ = tx.send(Outbound::Close(1000, "heartbeat timeout")).await;
                return;
            }
            Ok(Incoming::Data(d)) => d,
            Ok(other) => {
                if reject_incoming(tx, ctx, other, "").await {
                    continue;
                }
                return;
            }
        };
        let req = match Req::decode(data) {
            Ok(r) => r,
            Err(e) => {
                ctx.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
                warn!(error = %e, "malformed frame");
                if send(
                    tx,
                    frame::err(code::BAD_REQUEST, format!("malformed Req frame: {e}")),
                )
                .await
                .is_err()
                {
                    return;
                }
                continue;
            }
        };
        let answer = match PackageType::try_from(req.r#type) {
            Ok(PackageType::Heartbeat) => {
                if hb.should_renew(tokio::time::Instant::now()) {
                    renew(ctx, who);
                }
                Some(frame::reply(
                    PackageType::Heartbeat,
                    Bytes::from_static(b"pong"),
                ))
            }
            Ok(PackageType::Message) => on_message(ctx, who, req.data).await,
            Ok(PackageType::Members) => {
                let n = ctx.online.total(&who.room, ctx.buckets.count(&who.room));
                Some(frame::reply(PackageType::Members, n.to_string()))
            }
            Ok(PackageType::SignIn) => {
                warn!("second sign-in on a signed-in session");
                Some(frame::err(code::CONFLICT, "already signed in"))
            }
            Ok(PackageType::Unknown) | Err(_) => {
                ctx.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
                warn!(kind = req.r#type, "unknown package type");
                Some(frame::err(
                    code::UNKNOWN_TYPE,
                    format!("unknown package type {}", frame::type_name(req.r#type)),
                ))
            }
        };
        if let Some(a) = answer
            && send(tx, a).await.is_err()
        {
            return;
        }
    }
}

/// A room message from the client: checked here, ruled on by logic. Only
/// failures are answered (the seed's clients read `Reply{type 0}` as an error).
async fn on_message(ctx: &Ctx, who: &Identity, data: Bytes) -> Option<Bytes> {
    let mut msg = match BroadcastRoomReq::decode(data) {
        Ok(m) => m,
        Err(e) => {
            ctx.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
            warn!(error = %e, "malformed BroadcastRoomReq");
            return Some(frame::err(
                code::BAD_REQUEST,
                format!("malformed BroadcastRoomReq: {e}"),
            ));
        }
    };
    if msg.room_id.is_empty() {
        msg.room_id = who.room.clone();
    } else if msg.room_id != who.room {
        warn!(target_room = %msg.room_id, "message to a room the session is not in");
        return Some(frame::err(
            code::FORBIDDEN,
            format!("not in room {}", msg.room_id),
        ));
    }
    let req = ReceiveReq {
        server: ctx.server.clone(),
        uid: who.uid.clone(),
        msg: Some(msg),
    };
    match ctx.logic.receive(req).await {
        Ok(r) if r.code == code::OK => None,
        Ok(r) => {
            info!(code = r.code, msg = %r.msg, "message refused by logic");
            Some(frame::err(r.code, r.msg))
        }
        Err(e) => {
            warn!(error = %e.message(), "logic receive call failed");
            Some(frame::err(
                code::UNAVAILABLE,
                "message service unavailable, try again",
            ))
        }
    }
}

/// What the reader got from the socket.
enum Incoming {
    Data(Bytes),
    Text,
    TooLarge,
    Closed,
}

async fn next_data(stream: &mut SplitStream<Ws>) -> Incoming {
    loop {
        match stream.next().await {
            Some(Ok(Message::Binary(b))) => return Incoming::Data(b),
            Some(Ok(Message::Text(_))) => return Incoming::Text,
            // tungstenite answers pings itself; pongs only prove liveness.
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
            Some(Ok(Message::Close(_))) | None => return Incoming::Closed,
            Some(Err(WsError::Capacity(e))) => {
                debug!(error = %e, "frame too large");
                return Incoming::TooLarge;
            }
            Some(Err(e)) => {
                debug!(error = %e, "websocket read failed");
                return Incoming::Closed;
            }
        }
    }
}

/// Answers a non-data event; true if the session may go on.
async fn reject_incoming(
    tx: &mpsc::Sender<Outbound>,
    ctx: &Ctx,
    what: Incoming,
    when: &str,
) -> bool {
    match what {
        Incoming::Data(_) | Incoming::Closed => false,
        Incoming::Text => {
            ctx.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
            warn!("text frame {when}");
            let e = frame::err(
                code::BAD_REQUEST,
                "text frames are not supported: send binary protobuf Req frames",
            );
            if when.is_empty() {
                send(tx, e).await.is_ok()
            } else {
                let _ = send(tx, e).await;
                let _ = tx.send(Outbound::Close(1003, "unsupported data")).await;
                false
            }
        }
        Incoming::TooLarge => {
            ctx.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
            warn!(
                max = ctx.cfg.ws.max_frame_bytes,
                "frame over the size limit; closing"
            );
            let msg = format!("frame larger than {} bytes", ctx.cfg.ws.max_frame_bytes);
            let _ = send(tx, frame::err(code::TOO_LARGE, msg)).await;
            let _ = tx.send(Outbound::Close(1009, "frame too large")).await;
            false
        }
    }
}

async fn send(tx: &mpsc::Sender<Outbound>, frame: Bytes) -> Result<(), ()> {
    tx.send(Outbound::Frame(frame)).await.map_err(|_| ())
}

/// Answers with an `Err` and closes (policy violation).
async fn refuse(tx: &mpsc::Sender<Outbound>, code: i32, msg: impl Into<String>) {
    let _ = send(tx, frame::err(code, msg)).await;
    let _ = tx.send(Outbound::Close(1008, "sign-in failed")).await;
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

fn sign_out(ctx: &Ctx, who: Identity) {
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
        .in_current_span(),
    );
}

/// Sends queued frames (several per flush when they pile up) and pings.
async fn write_loop(
    mut sink: SplitSink<Ws, Message>,
    mut rx: mpsc::Receiver<Outbound>,
    kill: CancellationToken,
    shutdown: CancellationToken,
    ping: Duration,
) {
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping, ping);
    let close = |code: u16, reason: &'static str| {
        Message::Close(Some(CloseFrame {
            code: CloseCode::from(code),
            reason: reason.into(),
        }))
    };
    loop {
        let out = tokio::select! {
            biased;
            _ = kill.cancelled() => {
                let msg = if shutdown.is_cancelled() {
                    close(1001, "server going away")
                } else {
                    close(1008, "too slow: messages could not be delivered")
                };
                let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(msg)).await;
                break;
            }
            m = rx.recv() => m,
            _ = ping.tick() => {
                if sink.send(Message::Ping(Bytes::new())).await.is_err() {
                    break;
                }
                continue;
            }
        };
        match out {
            Some(Outbound::Frame(b)) => {
                if sink.feed(Message::Binary(b)).await.is_err() {
                    break;
                }
                let mut closing = None;
                while let Ok(more) = rx.try_recv() {
                    match more {
                        Outbound::Frame(b) => {
                            if sink.feed(Message::Binary(b)).await.is_err() {
                                break;
                            }
                        }
                        Outbound::Close(c, r) => {
                            closing = Some((c, r));
                            break;
                        }
                    }
                }
                if sink.flush().await.is_err() {
                    break;
                }
                if let Some((c, r)) = closing {
                    let _ = sink.send(close(c, r)).await;
                    break;
                }
            }
            Some(Outbound::Close(c, r)) => {
                let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(close(c, r))).await;
                break;
            }
            None => break,
        }
    }
    // Whatever ended the writer ends the reader too.
    kill.cancel();
    let _ = sink.close().await;
}

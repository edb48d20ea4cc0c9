//! One WebSocket connection: the handshake, sign-in, then a reader task
//! (this one) and a writer task over a bounded queue. When either ends, the
//! other is stopped.
//!
//! Two endpoints share this one session model (a user and a set of rooms):
//! `/room` speaks binary protobuf frames (the seed's protocol plus the IM
//! `CHAT` extension), `/chat?id=&token=` speaks the IM seed's JSON text
//! frames. The encodings only differ at the edge (`Edge`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use chatroom_common::proto::logic::{
    AckPendingReq, ChatReq, HeartbeatReq, PendingReq, ReceiveReq, SignInReq, SignOutReq,
};
use chatroom_common::proto::protocol::{BroadcastRoomReq, ChatMsg, PackageType, Req, SignIn};
use prost::Message as _;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span, debug, info, info_span, warn};

use crate::Ctx;
use crate::chat::{self, ChatFrame, Encoding};
use crate::frame::{self, code};
use crate::heartbeat::Heartbeat;
use crate::outbox::Outbox;
use crate::room::{Outbound, SessionTx};
use crate::ws::{self, Frame, OpCode, WsError};

/// A write that makes no progress for this long ends the session.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames gathered into one vectored write at most.
const WRITE_BATCH: usize = 64;

/// Pending messages fetched per call when a user comes online.
const PENDING_PAGE: u32 = 200;

/// Which endpoint the client opened.
enum Endpoint {
    Room,
    Chat { id: String, token: String },
}

/// A signed-in session's identity.
struct Identity {
    uid: String,
    key: String,
    /// The sign-in room (`/room`), the only one MESSAGE may address.
    room: Option<String>,
}

/// The session's side of the writer queue, speaking its encoding.
struct Edge {
    tx: Arc<Outbox>,
    enc: Encoding,
}

impl Edge {
    async fn out(&self, o: Outbound) -> Result<(), ()> {
        // Answers never wait; a client that floods requests without
        // reading the answers is cut off (see `Outbox::reply`).
        self.tx.reply(o).map_err(|_| ())
    }

    async fn binary(&self, b: Bytes) -> Result<(), ()> {
        self.out(Outbound::Frame(b)).await
    }

    /// An error answer: `Reply{UNKNOWN, Err}` or `{"cmd":21,...}`.
    async fn err(&self, code: i32, msg: impl Into<String>, ref_id: i64) -> Result<(), ()> {
        let msg = msg.into();
        match self.enc {
            Encoding::Protobuf => self.binary(frame::err_ref(code, msg, ref_id)).await,
            Encoding::Json => {
                self.out(Outbound::Text(chat::error_json(code, &msg, ref_id)))
                    .await
            }
        }
    }

    /// Answers with an error and closes (policy violation).
    async fn refuse(&self, code: i32, msg: impl Into<String>) {
        let _ = self.err(code, msg, 0).await;
        let _ = self.out(Outbound::Close(1008, "sign-in failed")).await;
    }
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

/// Serves one accepted TCP connection until it ends or `shutdown` fires.
pub async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    ctx: Arc<Ctx>,
    id: u64,
    shutdown: CancellationToken,
) {
    let tag = Tag { peer, id };
    // Futures used once or rarely are boxed: an idle session's task then
    // only holds the state of its read loop, not of the largest call.
    let shaken = Box::pin(handshake(stream, &ctx).instrument(session_span(tag, None))).await;
    let (reader, writer, endpoint) = match shaken {
        Ok(x) => x,
        Err(e) => {
            session_span(tag, None).in_scope(|| debug!(error = %e, "websocket handshake failed"));
            return;
        }
    };
    ctx.stats.sessions.fetch_add(1, Ordering::Relaxed);
    run_session(reader, writer, endpoint, ctx.clone(), tag, shutdown).await;
    ctx.stats.sessions.fetch_sub(1, Ordering::Relaxed);
}

fn query_param(query: &str, name: &str) -> String {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| percent_decode(v))
        .unwrap_or_default()
}

/// Decodes `%XX` and `+` in a query value; bad escapes are kept as they are.
fn percent_decode(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
                {
                    Ok(x) => {
                        out.push(x);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handshake(
    mut stream: TcpStream,
    ctx: &Ctx,
) -> Result<(ws::Reader, ws::Writer, Endpoint), WsError> {
    let _ = stream.set_nodelay(true);
    let timeout = Duration::from_millis(ctx.cfg.ws.sign_in_timeout_ms);
    let (up, leftover) =
        match tokio::time::timeout(timeout, ws::accept(&mut stream, &["/room", "/chat"])).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(WsError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "handshake timed out",
                )));
            }
        };
    let endpoint = if up.path == "/chat" {
        Endpoint::Chat {
            id: query_param(&up.query, "id"),
            token: query_param(&up.query, "token"),
        }
    } else {
        Endpoint::Room
    };
    let w = &ctx.cfg.ws;
    let (reader, writer) = ws::split(stream, leftover, w.max_frame_bytes, w.read_buffer_bytes);
    Ok((reader, writer, endpoint))
}

async fn run_session(
    mut stream: ws::Reader,
    sink: ws::Writer,
    endpoint: Endpoint,
    ctx: Arc<Ctx>,
    tag: Tag,
    shutdown: CancellationToken,
) {
    let id = tag.id;
    let tx = Arc::new(Outbox::new(ctx.cfg.ws.send_queue));
    let kill = shutdown.child_token();
    let ping = Duration::from_secs(ctx.cfg.ws.ping_secs);
    let enc = match endpoint {
        Endpoint::Room => Encoding::Protobuf,
        Endpoint::Chat { .. } => Encoding::Json,
    };
    let writer = tokio::spawn(
        // Not instrumented: the writer wakes for every push, and entering a
        // span on each poll showed in profiles; its rare logs make one.
        write_loop(
            sink,
            tx.clone(),
            enc,
            kill.clone(),
            shutdown.clone(),
            ping,
            tag,
        ),
    );
    let edge = Edge { tx, enc };

    let signed = match endpoint {
        Endpoint::Room => {
            let span = session_span(tag, None);
            Box::pin(sign_in_room(&mut stream, &edge, &ctx, &kill).instrument(span)).await
        }
        Endpoint::Chat { id, token } => {
            let span = session_span(tag, None);
            Box::pin(sign_in_chat(id, token, &edge, &ctx).instrument(span)).await
        }
    };
    if let Some((who, extra_rooms)) = signed {
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
        span.in_scope(|| info!(rooms = me.rooms().len(), "signed in"));
        let pending = Box::pin(deliver_pending(&ctx, &who, &edge).instrument(span)).await;
        if pending.is_ok() {
            read_loop(&mut stream, &edge, &ctx, &who, &kill, &tag).await;
        }
        ctx.buckets.unregister(&me);
        sign_out(&ctx, who, tag);
    }
    // Closed, the outbox lets the writer send what is queued (an Err and a
    // close frame, say) and stop; give it a moment, then force it.
    edge.tx.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    kill.cancel();
}

/// `/room`: the first frame must be SIGN_IN; logic rules on it.
async fn sign_in_room(
    stream: &mut ws::Reader,
    edge: &Edge,
    ctx: &Ctx,
    kill: &CancellationToken,
) -> Option<(Identity, Vec<String>)> {
    let limit = Duration::from_millis(ctx.cfg.ws.sign_in_timeout_ms);
    let first = tokio::select! {
        _ = kill.cancelled() => return None,
        r = tokio::time::timeout(limit, next_data(stream, edge)) => r,
    };
    let data = match first {
        Err(_) => {
            info!("no sign-in within the deadline; closing");
            edge.refuse(code::LOGIN_NEEDED, "login needed: sign in first")
                .await;
            return None;
        }
        Ok(Incoming::Binary(d)) => d,
        Ok(other) => {
            reject_incoming(edge, ctx, other, true).await;
            return None;
        }
    };
    let req = match Req::decode(data) {
        Ok(r) => r,
        Err(e) => {
            ctx.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
            warn!(error = %e, "malformed frame before sign-in");
            edge.refuse(code::BAD_REQUEST, format!("malformed Req frame: {e}"))
                .await;
            return None;
        }
    };
    if req.r#type != PackageType::SignIn as i32 {
        warn!(kind = %frame::type_name(req.r#type), "frame before sign-in");
        let msg = format!(
            "login needed: sign in before {}",
            frame::type_name(req.r#type)
        );
        edge.refuse(code::LOGIN_NEEDED, msg).await;
        return None;
    }
    let sign = match SignIn::decode(req.data) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "malformed SignIn");
            edge.refuse(code::BAD_REQUEST, format!("malformed SignIn: {e}"))
                .await;
            return None;
        }
    };
    if sign.room_id.is_empty() {
        warn!("sign-in with an empty room id");
        edge.refuse(code::BAD_REQUEST, "room id is empty").await;
        return None;
    }
    let req = SignInReq {
        server: ctx.server.clone(),
        token: sign.token,
        room_id: sign.room_id.clone(),
        uid: String::new(),
    };
    let (who, rooms) = ask_logic(ctx, edge, req, Some(sign.room_id)).await?;
    edge.binary(frame::err(code::OK, "ok")).await.ok()?;
    Some((who, rooms))
}

/// `/chat?id=&token=`: the query carries the credentials.
async fn sign_in_chat(
    id: String,
    token: String,
    edge: &Edge,
    ctx: &Ctx,
) -> Option<(Identity, Vec<String>)> {
    if token.is_empty() {
        warn!("chat connection without a token");
        edge.refuse(code::LOGIN_NEEDED, "login needed: token is missing")
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
    Some((who, rooms))
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
            warn!(error = %e.message(), "logic sign-in call failed");
            edge.refuse(code::UNAVAILABLE, "sign-in service unavailable, try again")
                .await;
            return None;
        }
    };
    if reply.code != code::OK {
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

/// Hands what was stored for the user while offline to this session,
/// oldest first, then tells logic it may forget it.
async fn deliver_pending(ctx: &Ctx, who: &Identity, edge: &Edge) -> Result<(), ()> {
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

/// Serves a signed-in session's frames until it ends.
async fn read_loop(
    stream: &mut ws::Reader,
    edge: &Edge,
    ctx: &Ctx,
    who: &Identity,
    kill: &CancellationToken,
    tag: &Tag,
) {
    let mut hb = Heartbeat::new(
        Duration::from_secs(ctx.cfg.ws.heartbeat_secs),
        ctx.cfg.ws.heartbeat_misses,
    );
    loop {
        let got = tokio::select! {
            _ = kill.cancelled() => return,
            r = tokio::time::timeout(hb.idle_limit(), next_data(stream, edge)) => r,
        };
        // The span and each handler live in one box, so the idle state of
        // this loop holds neither.
        let span = || session_span(*tag, Some(who));
        let incoming = match got {
            Err(_) => {
                span().in_scope(
                    || info!(limit = ?hb.idle_limit(), "client silent too long; closing"),
                );
                let _ = edge.out(Outbound::Close(1000, "heartbeat timeout")).await;
                return;
            }
            Ok(i) => i,
        };
        let ok = match (edge.enc, incoming) {
            (Encoding::Protobuf, Incoming::Binary(data)) => {
                Box::pin(on_binary(edge, ctx, who, &mut hb, data).instrument(span())).await
            }
            (Encoding::Json, Incoming::Text(text)) => {
                Box::pin(on_json(edge, ctx, who, &mut hb, text).instrument(span())).await
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

/// One protobuf `Req`; false when the session must end.
async fn on_binary(
    edge: &Edge,
    ctx: &Ctx,
    who: &Identity,
    hb: &mut Heartbeat,
    data: Bytes,
) -> bool {
    let req = match Req::decode(data) {
        Ok(r) => r,
        Err(e) => {
            ctx.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
            warn!(error = %e, "malformed frame");
            return edge
                .err(code::BAD_REQUEST, format!("malformed Req frame: {e}"), 0)
                .await
                .is_ok();
        }
    };
    let answer = match PackageType::try_from(req.r#type) {
        Ok(PackageType::Heartbeat) => {
            beat(ctx, who, hb);
            Some(frame::reply(
                PackageType::Heartbeat,
                Bytes::from_static(b"pong"),
            ))
        }
        Ok(PackageType::Message) => on_message(ctx, who, req.data).await,
        Ok(PackageType::Members) => Some(match &who.room {
            Some(room) => {
                let n = ctx.online.total(room, ctx.buckets.count(room));
                frame::reply(PackageType::Members, n.to_string())
            }
            None => frame::err(code::BAD_REQUEST, "this session has no room"),
        }),
        Ok(PackageType::Chat) => {
            return match ChatMsg::decode(req.data) {
                Ok(m) => send_chat(edge, ctx, who, m).await,
                Err(e) => {
                    ctx.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
                    warn!(error = %e, "malformed ChatMsg");
                    edge.err(code::BAD_REQUEST, format!("malformed ChatMsg: {e}"), 0)
                        .await
                        .is_ok()
                }
            };
        }
        Ok(PackageType::SignIn) => {
            warn!("second sign-in on a signed-in session");
            Some(frame::err(code::CONFLICT, "already signed in"))
        }
        Ok(PackageType::Unknown | PackageType::ChatAck) | Err(_) => {
            ctx.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
            warn!(kind = req.r#type, "unknown package type");
            Some(frame::err(
                code::UNKNOWN_TYPE,
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
            ctx.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
            warn!(error = %e, "malformed JSON message");
            return edge.err(code::BAD_REQUEST, e, 0).await.is_ok();
        }
    };
    match m.cmd {
        chat::cmd::HEARTBEAT => {
            beat(ctx, who, hb);
            edge.out(Outbound::Text(chat::pong_json())).await.is_ok()
        }
        chat::cmd::SINGLE | chat::cmd::COMMUNITY => send_chat(edge, ctx, who, m.into()).await,
        other => {
            ctx.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
            warn!(cmd = other, "unknown cmd");
            edge.err(code::UNKNOWN_TYPE, format!("unknown cmd {other}"), m.id)
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

/// An IM message from this session: logic checks, stores and routes it;
/// the session gets an ack naming it, or an error naming the client's id.
async fn send_chat(edge: &Edge, ctx: &Ctx, who: &Identity, msg: ChatMsg) -> bool {
    let client_id = msg.id;
    if msg.cmd == chat::cmd::HEARTBEAT && edge.enc == Encoding::Protobuf {
        return edge
            .err(code::BAD_REQUEST, "use HEARTBEAT frames", client_id)
            .await
            .is_ok();
    }
    let req = ChatReq {
        server: ctx.server.clone(),
        uid: who.uid.clone(),
        msg: Some(msg),
    };
    match ctx.logic.chat(req).await {
        Ok(r) if r.code == code::OK => {
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
                code::UNAVAILABLE,
                "message service unavailable, try again",
                client_id,
            )
            .await
            .is_ok()
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
    let Some(room) = &who.room else {
        return Some(frame::err(code::BAD_REQUEST, "this session has no room"));
    };
    if msg.room_id.is_empty() {
        msg.room_id = room.clone();
    } else if &msg.room_id != room {
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
    match ctx.receiver.receive(req).await {
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
    Binary(Bytes),
    /// Valid UTF-8.
    Text(Bytes),
    TooLarge,
    /// A protocol violation: close with this code.
    Violation(u16),
    Closed,
}

async fn next_data(stream: &mut ws::Reader, edge: &Edge) -> Incoming {
    loop {
        match stream.next().await {
            Ok(Some(Frame::Binary(b))) => return Incoming::Binary(b),
            Ok(Some(Frame::Text(t))) => return Incoming::Text(t),
            Ok(Some(Frame::Ping(p))) => {
                // Best effort: a client whose queue is full gets no pong.
                let _ = edge.tx.try_push(Outbound::Pong(p));
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
async fn reject_incoming(edge: &Edge, ctx: &Ctx, what: Incoming, before_sign_in: bool) -> bool {
    let wrong = match (edge.enc, &what) {
        (_, Incoming::Closed) => return false,
        (_, Incoming::Violation(code)) => {
            ctx.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
            warn!(code, "websocket protocol violation; closing");
            let _ = edge.out(Outbound::Close(*code, "protocol violation")).await;
            return false;
        }
        (_, Incoming::TooLarge) => {
            ctx.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
            warn!(
                max = ctx.cfg.ws.max_frame_bytes,
                "frame over the size limit; closing"
            );
            let msg = format!("frame larger than {} bytes", ctx.cfg.ws.max_frame_bytes);
            let _ = edge.err(code::TOO_LARGE, msg, 0).await;
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
    ctx.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
    warn!(before_sign_in, "{wrong}");
    let _ = edge.err(code::BAD_REQUEST, wrong, 0).await;
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

fn sign_out(ctx: &Ctx, who: Identity, tag: Tag) {
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

/// Sends queued frames (all that piled up, in one vectored write) and pings.
async fn write_loop(
    mut sink: ws::Writer,
    outbox: Arc<Outbox>,
    enc: Encoding,
    kill: CancellationToken,
    shutdown: CancellationToken,
    ping: Duration,
    tag: Tag,
) {
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping, ping);
    let mut taken: Vec<Outbound> = Vec::new();
    let mut frames: Vec<(OpCode, Bytes)> = Vec::new();
    let closing = loop {
        let more = tokio::select! {
            biased;
            _ = kill.cancelled() => break if shutdown.is_cancelled() {
                (1001, "server going away")
            } else {
                (1008, "too slow: messages could not be delivered")
            },
            more = outbox.take(&mut taken, WRITE_BATCH) => more,
            _ = ping.tick() => {
                taken.push(Outbound::Ping);
                true
            }
        };
        if !more {
            break (1000, "");
        }
        let mut close = None;
        for o in taken.drain(..) {
            match o {
                Outbound::Frame(b) => frames.push((OpCode::Binary, b)),
                Outbound::Text(t) => frames.push((OpCode::Text, t)),
                Outbound::Pong(p) => frames.push((OpCode::Pong, p)),
                Outbound::Ping => frames.push((OpCode::Ping, Bytes::new())),
                Outbound::Chat(items) => frames.extend(items.iter().map(|f| match enc {
                    Encoding::Protobuf => (OpCode::Binary, f.proto.clone()),
                    Encoding::Json => (OpCode::Text, f.json.clone()),
                })),
                Outbound::Close(c, r) => {
                    close = Some((c, r));
                    break;
                }
            }
        }
        taken.clear();
        if !frames.is_empty() {
            // Boxed: the write's state exists only while a write is under way.
            let write = Box::pin(tokio::time::timeout(WRITE_TIMEOUT, sink.send(&frames)));
            let wrote = tokio::select! {
                biased;
                _ = kill.cancelled() => None,
                r = write => Some(r),
            };
            frames.clear();
            if frames.capacity() > WRITE_BATCH {
                frames = Vec::new();
            }
            match wrote {
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(e))) => {
                    session_span(tag, None)
                        .in_scope(|| debug!(error = %e, "websocket write failed"));
                    break (0, "");
                }
                Some(Err(_)) => {
                    session_span(tag, None)
                        .in_scope(|| info!("client not reading for {WRITE_TIMEOUT:?}; closing"));
                    break (0, "");
                }
                // Killed mid-write: the close frame would queue behind it.
                None => break (0, ""),
            }
        }
        if let Some(c) = close {
            break c;
        }
    };
    outbox.close();
    if closing.0 != 0 {
        let _ =
            tokio::time::timeout(Duration::from_secs(1), sink.close(closing.0, closing.1)).await;
    }
    // Whatever ended the writer ends the reader too.
    kill.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_params_are_decoded() {
        let q = "id=12&token=a%2Eb+c&x";
        assert_eq!(query_param(q, "id"), "12");
        assert_eq!(query_param(q, "token"), "a.b c");
        assert_eq!(query_param(q, "missing"), "");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("%41%"), "A%");
    }
}

//! A session's writer task: sends what its outbox holds (answers, IM
//! messages, pings) and what its room's stream has after its cursor — all
//! that is ready, in one vectored write.
//!
//! The stream part is where merging adapts to load: the writer takes
//! everything the session lacks as merged frames shared with every other
//! session at the same cursor, so the busier the node (the longer a write
//! takes to come round again), the more messages each write carries.

use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Tag, recover, session_span};
use crate::Ctx;
use crate::chat::Encoding;
use crate::frame;
use crate::outbox::Outbox;
use crate::room::{Cursor, Outbound};
use crate::stats::DropReason;
use crate::stream::Take;
use crate::ws::{self, OpCode};

/// A write that makes no progress for this long ends the session.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames gathered into one vectored write at most.
const WRITE_BATCH: usize = 64;

pub(super) struct Writer {
    pub sink: ws::Writer,
    pub outbox: Arc<Outbox>,
    pub enc: Encoding,
    pub kill: CancellationToken,
    pub shutdown: CancellationToken,
    pub ping: Duration,
    pub tag: Tag,
    pub ctx: Arc<Ctx>,
}

/// Sends queued frames and stream messages until the session ends.
///
/// Not an `async fn`: its argument would be kept twice in the task (once
/// as the argument, once moved into the body), and an idle session's task
/// is the largest thing it owns. The body uses `w`'s fields in place.
#[allow(clippy::manual_async_fn)] // see the doc: an async fn keeps its arguments twice
pub(super) fn write_loop(mut w: Writer) -> impl std::future::Future<Output = ()> + Send {
    async move {
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + w.ping, w.ping);
        let mut taken: Vec<Outbound> = Vec::new();
        let mut frames: Vec<(OpCode, Bytes)> = Vec::new();
        let mut cursor: Option<Cursor> = None;
        let closing = loop {
            // Registered before looking, so a push after the look still wakes us.
            let stream = cursor.as_ref().map(|c| c.stream.clone());
            let notified = stream.as_deref().map(|s| s.wake.notified());
            let mut notified = pin!(notified);
            if let Some(n) = notified.as_mut().as_pin_mut() {
                n.enable();
            }
            let mut close = None;
            let mut subscribed = false;
            // Messages beyond one per frame (merged stream frames).
            let mut merged = 0u64;
            let mut open = w.outbox.take_ready(&mut taken, WRITE_BATCH);
            for o in taken.drain(..) {
                match o {
                    Outbound::Frame(b) => frames.push((OpCode::Binary, b)),
                    Outbound::Text(t) => frames.push((OpCode::Text, t)),
                    Outbound::Pong(p) => frames.push((OpCode::Pong, p)),
                    Outbound::Ping => frames.push((OpCode::Ping, Bytes::new())),
                    Outbound::Chat(items) => frames.extend(items.iter().map(|f| match w.enc {
                        Encoding::Protobuf => (OpCode::Binary, f.proto.clone()),
                        Encoding::Json => (OpCode::Text, f.json.clone()),
                    })),
                    Outbound::Subscribe(c) => {
                        cursor = Some(c);
                        subscribed = true;
                    }
                    Outbound::Close(c, r) => {
                        close = Some((c, r));
                        open = false;
                        break;
                    }
                }
            }
            taken.clear();
            if close.is_none()
                && let Some(c) = cursor.as_mut()
                && let Some((from, next)) = from_stream(&w.ctx, c, &mut frames, &mut merged)
            {
                // Rare: boxed so the writer's idle state does not hold it.
                Box::pin(recover_gap(&w.ctx, c, from, next, &mut frames)).await;
            }
            if frames.is_empty() {
                if let Some(c) = close {
                    break c;
                }
                if !open {
                    break (1000, "");
                }
                if subscribed {
                    // Wait on the new stream's wake-ups, not the old ones.
                    continue;
                }
                tokio::select! {
                    biased;
                    _ = w.kill.cancelled() => break if w.shutdown.is_cancelled() {
                        (1001, "server going away")
                    } else {
                        (1008, "too slow: messages could not be delivered")
                    },
                    _ = w.outbox.readable() => {}
                    _ = async {
                        match notified.as_mut().as_pin_mut() {
                            Some(n) => n.await,
                            None => std::future::pending().await,
                        }
                    } => {}
                    _ = ping.tick() => frames.push((OpCode::Ping, Bytes::new())),
                }
                if frames.is_empty() {
                    continue;
                }
            }
            let sent = (
                frames.len() as u64,
                frames.iter().map(|(_, b)| b.len() as u64).sum::<u64>(),
            );
            // Boxed: the write's state exists only while a write is under way.
            let write = Box::pin(tokio::time::timeout(WRITE_TIMEOUT, w.sink.send(&frames)));
            let wrote = tokio::select! {
                biased;
                _ = w.kill.cancelled() => None,
                r = write => Some(r),
            };
            frames.clear();
            if frames.capacity() > WRITE_BATCH {
                frames = Vec::new();
            }
            match wrote {
                Some(Ok(Ok(()))) => w.ctx.stats.record_write(sent.0, sent.0 + merged, sent.1),
                Some(Ok(Err(e))) => {
                    session_span(w.tag, None)
                        .in_scope(|| debug!(error = %e, "websocket write failed"));
                    break (0, "");
                }
                Some(Err(_)) => {
                    session_span(w.tag, None)
                        .in_scope(|| info!("client not reading for {WRITE_TIMEOUT:?}; closing"));
                    break (0, "");
                }
                // Killed mid-write: the close frame would queue behind it.
                None => break (0, ""),
            }
            if let Some(c) = close {
                break c;
            }
        };
        w.outbox.close();
        if closing.0 != 0 {
            // Boxed: the close is the largest state of this task and happens once.
            let close =
                tokio::time::timeout(Duration::from_secs(1), w.sink.close(closing.0, closing.1));
            let _ = Box::pin(close).await;
        }
        // Whatever ended the writer ends the reader too.
        w.kill.cancel();
    }
}

/// Appends the merged frames the session lacks (up to a write's worth) and
/// moves its cursor past them. A session behind the stream's reach loses
/// the oldest NORMAL messages (counted); if an IMPORTANT one was among them
/// the range `from..next` is returned, for [`recover_gap`]. Adds the
/// messages taken to `messages`.
fn from_stream(
    ctx: &Ctx,
    c: &mut Cursor,
    frames: &mut Vec<(OpCode, Bytes)>,
    messages: &mut u64,
) -> Option<(u64, u64)> {
    let cfg = &ctx.streams.cfg;
    let stats = &ctx.streams.stats;
    let (mut nframes, mut nmessages) = (0u64, 0u64);
    let mut gap = None;
    while frames.len() < WRITE_BATCH {
        match c.stream.take(cfg, c.epoch, c.next) {
            Take::Nothing => break,
            Take::Frame {
                frame,
                next,
                messages,
                more,
            } => {
                frames.push((OpCode::Binary, frame));
                c.next = next;
                nframes += 1;
                nmessages += u64::from(messages);
                if !more {
                    // Caught up: no second look (and lock) this wake.
                    break;
                }
            }
            Take::Epoch { epoch, next } => {
                c.epoch = epoch;
                c.next = next;
            }
            Take::Lost {
                from,
                next,
                important: false,
            } => {
                stats.lost_normal.fetch_add(next - from, Ordering::Relaxed);
                ctx.stats.record_drop(DropReason::Lagged, next - from);
                c.next = next;
            }
            Take::Lost {
                from,
                next,
                important: true,
            } => {
                gap = Some((from, next));
                break;
            }
        }
    }
    // Stream frames are counted by their messages, the rest one each (by
    // the writer, once per write).
    *messages += nmessages - nframes;
    gap
}

/// The session lost `from..next` including an IMPORTANT message: the range
/// comes from logic's history, or the session is told (`410`).
async fn recover_gap(
    ctx: &Ctx,
    c: &mut Cursor,
    from: u64,
    next: u64,
    frames: &mut Vec<(OpCode, Bytes)>,
) {
    let stats = &ctx.streams.stats;
    match recover::gap(ctx, &c.stream.room, c.epoch, from, next).await {
        Some(got) => {
            stats.gaps_recovered.fetch_add(1, Ordering::Relaxed);
            frames.extend(got.into_iter().map(|f| (OpCode::Binary, f)));
        }
        None => {
            stats.gaps_unrecovered.fetch_add(1, Ordering::Relaxed);
            warn!(room = %c.stream.room, from, to = next - 1,
                "session fell behind past IMPORTANT messages that could not be recovered");
            let msg = format!(
                "messages {from}..={} could not be delivered: reload the room",
                next - 1
            );
            frames.push((OpCode::Binary, frame::gone(c.epoch, next - 1, msg)));
        }
    }
    c.next = next;
}

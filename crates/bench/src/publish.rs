//! Publishers: each one a WebSocket session signed in to its room (chatroom
//! `MESSAGE`), an HTTP client (`POST /msg`) or a NATS connection (`PUB`),
//! sending stamped payloads at its share of the target rate. Pacing follows
//! a fixed schedule (message `k` of publisher `j` is due at
//! `start + (j / P + k) / rate_each`), so traffic is smooth rather than
//! bursty; a publisher that falls more than 50 ms behind skips the messages
//! it could not send in time (counted) instead of bursting to catch up.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::auth::{TokenMaker, publisher_uid};
use crate::config::{Level, PublishVia, RunConfig, Target};
use crate::error::BenchError;
use crate::http::Api;
use crate::nats::{self, Op, Parser};
use crate::net::{self, Endpoint, Ws};
use crate::payload::{self, Stamp};
use crate::rooms::{RoomMap, room_name};
use crate::session::{self, Inbound};

/// At most this much of the schedule is sent at once when late.
const MAX_CATCH_UP: Duration = Duration::from_millis(50);

/// Counters shared by the publishers and the coordinator.
#[derive(Debug)]
pub struct PubStats {
    /// Messages sent (HTTP: requests made), per publisher.
    pub sent: Vec<AtomicU64>,
    /// Of those, refused by the server (error replies, failed requests).
    pub errors: Vec<AtomicU64>,
    /// Scheduled messages skipped because the publisher fell behind.
    pub skipped: AtomicU64,
}

impl PubStats {
    pub fn new(publishers: u32) -> Self {
        PubStats {
            sent: (0..publishers).map(|_| AtomicU64::new(0)).collect(),
            errors: (0..publishers).map(|_| AtomicU64::new(0)).collect(),
            skipped: AtomicU64::new(0),
        }
    }

    pub fn total_sent(&self) -> u64 {
        self.sent.iter().map(|a| a.load(Ordering::Relaxed)).sum()
    }

    pub fn total_errors(&self) -> u64 {
        self.errors.iter().map(|a| a.load(Ordering::Relaxed)).sum()
    }

    /// Messages the server took, per publisher: sent less refused.
    pub fn accepted(&self) -> Vec<u64> {
        self.sent
            .iter()
            .zip(&self.errors)
            .map(|(s, e)| {
                s.load(Ordering::Relaxed)
                    .saturating_sub(e.load(Ordering::Relaxed))
            })
            .collect()
    }
}

enum Link {
    Chat(Box<Ws>),
    Nats(Box<Ws>, Parser),
    Http { api: Box<Api>, token: String },
}

/// One connected publisher.
pub struct Publisher {
    pub id: u32,
    room: String,
    link: Link,
}

/// Connects publisher `j` and, for chatroom, signs it in to its room.
pub async fn connect(
    cfg: &RunConfig,
    map: &RoomMap,
    ep: &Endpoint,
    tokens: &TokenMaker,
    j: u32,
) -> Result<Publisher, BenchError> {
    let room = room_name(&cfg.room_prefix, map.publisher_room(j));
    let source = net::source_for(&cfg.source_ips, cfg.sessions + u64::from(j));
    let link = match (cfg.target, cfg.publish) {
        (Target::Chatroom, PublishVia::Ws) => {
            let token = tokens.token(&publisher_uid(j)).await?;
            let mut ws = net::open_ws(ep, source).await?;
            session::sign_in(&mut ws, &token, &room).await?;
            Link::Chat(Box::new(ws))
        }
        (Target::Chatroom, PublishVia::Http) => Link::Http {
            api: Box::new(Api::new(&cfg.http_url)),
            token: tokens.token(&publisher_uid(j)).await?,
        },
        (Target::Nats, _) => {
            let mut ws = net::open_ws(ep, source).await?;
            let mut parser = Parser::default();
            nats::handshake(&mut ws, &mut parser, None).await?;
            Link::Nats(Box::new(ws), parser)
        }
    };
    Ok(Publisher { id: j, room, link })
}

/// When a publisher's messages are due.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// First message.
    pub start: Instant,
    /// No message at or after this.
    pub end: Instant,
    /// Between two messages of this publisher.
    pub interval: Duration,
}

impl Schedule {
    /// Publisher `j` of `publishers` sharing `rate` msgs/s from `t0` to `end`.
    pub fn for_publisher(t0: Instant, end: Instant, rate: f64, j: u32, publishers: u32) -> Self {
        let each = rate / f64::from(publishers.max(1));
        let interval = Duration::from_secs_f64(1.0 / each.max(1e-6)).max(Duration::from_nanos(1));
        let offset = interval.mul_f64(f64::from(j) / f64::from(publishers.max(1)));
        Schedule {
            start: t0 + offset,
            end,
            interval,
        }
    }

    /// Messages due by `now` (a count from the start).
    pub fn due(&self, now: Instant) -> u64 {
        let now = now.min(self.end);
        if now < self.start {
            return 0;
        }
        let last = if now >= self.end {
            self.end - Duration::from_nanos(1)
        } else {
            now
        };
        if last < self.start {
            return 0;
        }
        ((last - self.start).as_secs_f64() / self.interval.as_secs_f64()) as u64 + 1
    }

    /// When message number `k` (from 0) is due.
    pub fn at(&self, k: u64) -> Instant {
        self.start + self.interval.mul_f64(k as f64)
    }

    /// Messages to send now, `slots` having been used so far: the ones due,
    /// at most [`Schedule::burst_cap`]; the rest are skipped (counted, and
    /// their slots used up) so that a publisher that fell behind does not
    /// burst.
    pub fn owed(&self, now: Instant, slots: &mut u64, skipped: &AtomicU64) -> u64 {
        let owed = self.due(now).saturating_sub(*slots);
        let cap = self.burst_cap();
        if owed <= cap {
            return owed;
        }
        skipped.fetch_add(owed - cap, Ordering::Relaxed);
        *slots += owed - cap;
        cap
    }

    /// Most messages sent at once after falling behind.
    pub fn burst_cap(&self) -> u64 {
        ((MAX_CATCH_UP.as_secs_f64() / self.interval.as_secs_f64() + 1e-9) as u64).max(1)
    }
}

/// Publishing parameters shared by all publishers.
#[derive(Debug, Clone, Copy)]
pub struct Params {
    pub size: usize,
    pub level: Level,
    pub http_inflight: u32,
}

/// Sends on `sched` until its end, then keeps reading (late error replies,
/// PINGs) until `close`.
pub async fn run(
    p: Publisher,
    sched: Schedule,
    params: Params,
    stats: Arc<PubStats>,
    close: CancellationToken,
) {
    let id = p.id;
    let mut buf = Vec::with_capacity(params.size);
    let mut make = |seq: u64| -> Bytes {
        let stamp = Stamp {
            sent_ns: payload::now_ns(),
            publisher: id,
            seq: seq as u32,
        };
        payload::encode(stamp, params.size, &mut buf);
        Bytes::copy_from_slice(&buf)
    };
    let sent = &stats.sent[id as usize];
    let errors = &stats.errors[id as usize];
    let mut slots = 0u64;
    let mut seq = 0u64;
    match p.link {
        Link::Http { api, token } => {
            let gate = Arc::new(Semaphore::new(params.http_inflight as usize));
            let room: Arc<str> = p.room.into();
            let token: Arc<str> = token.into();
            while Instant::now() < sched.end {
                let owed = sched.owed(Instant::now(), &mut slots, &stats.skipped);
                for _ in 0..owed {
                    let Ok(permit) = gate.clone().acquire_owned().await else {
                        return;
                    };
                    let body = make(seq);
                    seq += 1;
                    slots += 1;
                    sent.fetch_add(1, Ordering::Relaxed);
                    let (api, token, room, stats) =
                        (Api::clone(&api), token.clone(), room.clone(), stats.clone());
                    tokio::spawn(async move {
                        // The payload is ASCII by construction.
                        let msg = String::from_utf8_lossy(&body);
                        if api.publish(&token, &room, &msg).await.is_err() {
                            stats.errors[id as usize].fetch_add(1, Ordering::Relaxed);
                        }
                        drop(permit);
                    });
                }
                tokio::time::sleep_until(sched.at(slots).min(sched.end)).await;
            }
            // Wait for the requests in flight (each bounded by the API timeout).
            let _ = tokio::time::timeout(
                crate::http::CALL_TIMEOUT + Duration::from_secs(1),
                gate.acquire_many(params.http_inflight),
            )
            .await;
        }
        Link::Chat(mut ws) => {
            let mut open = true;
            while open && Instant::now() < sched.end {
                let owed = sched.owed(Instant::now(), &mut slots, &stats.skipped);
                for _ in 0..owed {
                    let frame = session::message_frame(params.level, make(seq));
                    if ws.feed(frame).await.is_err() {
                        open = false;
                        break;
                    }
                    seq += 1;
                    slots += 1;
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                if open && owed > 0 && ws.flush().await.is_err() {
                    open = false;
                }
                let next = sched.at(slots).min(sched.end);
                while open {
                    tokio::select! {
                        _ = tokio::time::sleep_until(next) => break,
                        m = ws.next() => open = on_chat_frame(m, errors),
                    }
                }
            }
            while open {
                tokio::select! {
                    _ = close.cancelled() => break,
                    m = ws.next() => open = on_chat_frame(m, errors),
                }
            }
        }
        Link::Nats(mut ws, mut parser) => {
            let subject = p.room;
            let mut open = true;
            while open && Instant::now() < sched.end {
                let owed = sched.owed(Instant::now(), &mut slots, &stats.skipped);
                for _ in 0..owed {
                    if ws
                        .feed(nats::pub_frame(&subject, &make(seq)))
                        .await
                        .is_err()
                    {
                        open = false;
                        break;
                    }
                    seq += 1;
                    slots += 1;
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                if open && owed > 0 && ws.flush().await.is_err() {
                    open = false;
                }
                let next = sched.at(slots).min(sched.end);
                while open {
                    tokio::select! {
                        _ = tokio::time::sleep_until(next) => break,
                        m = ws.next() => open = on_nats_frame(m, &mut ws, &mut parser, errors).await,
                    }
                }
            }
            while open {
                tokio::select! {
                    _ = close.cancelled() => break,
                    m = ws.next() => open = on_nats_frame(m, &mut ws, &mut parser, errors).await,
                }
            }
        }
    }
}

type Incoming = Option<Result<Message, tokio_tungstenite::tungstenite::Error>>;

/// A frame on a chatroom publisher's session; false once it has ended.
fn on_chat_frame(m: Incoming, errors: &AtomicU64) -> bool {
    match m {
        Some(Ok(Message::Binary(b))) => {
            if let Ok(Inbound::Error { code, .. }) = session::parse_frame(b)
                && code != 0
            {
                errors.fetch_add(1, Ordering::Relaxed);
            }
            true
        }
        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => false,
        Some(Ok(_)) => true,
    }
}

/// A frame on a NATS publisher's connection; false once it has ended.
async fn on_nats_frame(m: Incoming, ws: &mut Ws, parser: &mut Parser, errors: &AtomicU64) -> bool {
    match m {
        Some(Ok(Message::Binary(b))) => parser.push(&b),
        Some(Ok(Message::Text(t))) => parser.push(t.as_bytes()),
        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return false,
        Some(Ok(_)) => return true,
    }
    loop {
        match parser.next_op() {
            Ok(Some(Op::Ping)) => {
                if ws
                    .send(Message::Binary(Bytes::from_static(b"PONG\r\n")))
                    .await
                    .is_err()
                {
                    return false;
                }
            }
            Ok(Some(Op::Err(_))) => {
                errors.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Some(_)) => {}
            Ok(None) => return true,
            Err(_) => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_paces_and_staggers() {
        let t0 = Instant::now();
        let end = t0 + Duration::from_secs(10);
        // 1000 msg/s over 4 publishers: 250 each, every 4 ms, offset by 1 ms.
        let s0 = Schedule::for_publisher(t0, end, 1000.0, 0, 4);
        let s1 = Schedule::for_publisher(t0, end, 1000.0, 1, 4);
        assert_eq!(s0.interval, Duration::from_millis(4));
        assert_eq!(s1.start - s0.start, Duration::from_millis(1));
        assert_eq!(s0.due(t0), 1);
        assert_eq!(s1.due(t0), 0);
        assert_eq!(s0.due(t0 + Duration::from_millis(3)), 1);
        assert_eq!(s0.due(t0 + Duration::from_millis(4)), 2);
        // The whole run: exactly 2500 each, nothing at the end instant.
        assert_eq!(s0.due(end), 2500);
        assert_eq!(s1.due(end + Duration::from_secs(5)), 2500);
        assert_eq!(s0.at(2), t0 + Duration::from_millis(8));
        assert_eq!(s0.burst_cap(), 12);
        // 100,000 msg/s from one publisher: 50 ms of catch-up is 5000 messages.
        let fast = Schedule::for_publisher(t0, end, 100_000.0, 0, 1);
        assert_eq!(fast.burst_cap(), 5000);
        let slow = Schedule::for_publisher(t0, end, 1.0, 0, 1);
        assert_eq!(slow.burst_cap(), 1);
    }

    #[test]
    fn a_publisher_behind_sends_at_most_the_cap_and_skips_the_rest() {
        let t0 = Instant::now();
        let s = Schedule::for_publisher(t0, t0 + Duration::from_secs(10), 1000.0, 0, 4);
        let skipped = AtomicU64::new(0);
        let mut slots = 0;
        assert_eq!(s.owed(t0, &mut slots, &skipped), 1);
        slots += 1;
        // 100 ms late: 25 due, 12 sent, 13 skipped and their slots used.
        let late = t0 + Duration::from_millis(100);
        assert_eq!(s.owed(late, &mut slots, &skipped), 12);
        assert_eq!((slots, skipped.load(Ordering::Relaxed)), (14, 13));
    }

    #[test]
    fn accepted_is_sent_less_errors() {
        let s = PubStats::new(2);
        s.sent[0].store(10, Ordering::Relaxed);
        s.errors[0].store(3, Ordering::Relaxed);
        s.sent[1].store(4, Ordering::Relaxed);
        assert_eq!(s.accepted(), vec![7, 4]);
        assert_eq!((s.total_sent(), s.total_errors()), (14, 3));
    }
}

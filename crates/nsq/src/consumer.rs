//! Consuming a topic/channel from every nsqd we are given or discover.
//!
//! One task per nsqd address keeps a subscribed connection alive
//! (reconnecting with backoff) and feeds a single bounded channel read by
//! [`Consumer::next`]. Flow control is nsqd's RDY: the consumer's
//! `max_in_flight` is split across live connections so the whole consumer
//! never holds more than that many unacknowledged messages (except that each
//! connection gets at least 1). Shutdown sends `RDY 0` + `CLS` and keeps each
//! connection open until its in-flight messages are acknowledged or
//! `drain_timeout` passes.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::conn::{self, Conn, Identity};
use super::frame::{self, Command, Frame, RawMessage};
use super::message::{Ack, Message};
use super::{NsqError, lookup, valid_name};
use chatroom_backoff::Backoff;

#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub topic: String,
    pub channel: String,
    pub nsqd_tcp_addresses: Vec<String>,
    /// `host:port` or `http://host:port` of each nsqlookupd.
    pub lookupd_http_addresses: Vec<String>,
    pub max_in_flight: u32,
    pub client_id: String,
    /// Asked of nsqd in IDENTIFY (nsqd accepts 1 s to 60 s).
    pub heartbeat_interval: Duration,
    pub lookupd_poll_interval: Duration,
    pub drain_timeout: Duration,
    /// Per-connection message timeout asked of nsqd; `None` keeps nsqd's.
    pub msg_timeout: Option<Duration>,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            topic: String::new(),
            channel: String::new(),
            nsqd_tcp_addresses: vec![],
            lookupd_http_addresses: vec![],
            max_in_flight: 256,
            client_id: String::new(),
            heartbeat_interval: Duration::from_secs(30),
            lookupd_poll_interval: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(10),
            msg_timeout: None,
        }
    }
}

/// Reconnect delays: 100 ms doubling to 10 s (jittered).
const BACKOFF_INITIAL: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A session that lasted this long resets the backoff.
const STABLE_SESSION: Duration = Duration::from_secs(5);
/// Coalesce queued acks into one write up to about this many bytes.
const WRITE_BATCH: usize = 64 * 1024;

/// Receives messages for one topic/channel.
pub struct Consumer {
    rx: mpsc::Receiver<Message>,
}

impl Consumer {
    /// Starts connecting in the background (every task on `tracker`).
    /// Cancelling `shutdown` starts the drain described in the module docs.
    pub fn start(
        cfg: ConsumerConfig,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Consumer {
        let max = cfg.max_in_flight.max(1) as usize;
        // Room for every message nsqd may have in flight to us, plus the
        // "at least 1 per connection" overshoot, so readers rarely block.
        let (tx, rx) = mpsc::channel(max + 64);
        if !valid_name(&cfg.topic) || !valid_name(&cfg.channel) {
            tracing::error!(topic = %cfg.topic, channel = %cfg.channel, "invalid nsq topic or channel name; consuming nothing");
            return Consumer { rx };
        }
        let host = conn::hostname("chatroom");
        let who = Identity {
            client_id: if cfg.client_id.is_empty() {
                host.clone()
            } else {
                cfg.client_id.clone()
            },
            hostname: host,
            heartbeat_interval: cfg.heartbeat_interval,
            msg_timeout: cfg.msg_timeout,
        };
        let shared = Arc::new(Shared {
            budget: Budget::new(cfg.max_in_flight),
            cfg,
            who,
            shutdown,
            tracker: tracker.clone(),
        });
        tracker.spawn(supervise(shared, tx));
        Consumer { rx }
    }

    /// The next message; `None` once shut down, drained and every
    /// connection closed.
    pub async fn next(&mut self) -> Option<Message> {
        self.rx.recv().await
    }
}

struct Shared {
    cfg: ConsumerConfig,
    who: Identity,
    shutdown: CancellationToken,
    budget: Budget,
    tracker: TaskTracker,
}

/// Splits `max_in_flight` between live connections.
///
/// Each connection gets an equal share, but never more than the others
/// leave unclaimed, so the total stays within `max_in_flight` even while a
/// newly joined connection waits for the others to shrink. A connection's
/// claim is the most nsqd may have in flight to it: raising RDY raises the
/// claim at once, but lowering it does not (nsqd may already have sent
/// messages under the old RDY); the claim then shrinks by one per FIN/REQ,
/// which nsqd processes after the lower RDY. With fewer messages allowed
/// than connections, each still gets 1 so none starves.
struct Budget {
    max: usize,
    usage: std::sync::Mutex<HashMap<u64, Usage>>,
    /// Bumped when capacity was freed or the set changed; every connection
    /// then recomputes its RDY.
    changed: watch::Sender<u64>,
}

#[derive(Clone, Copy, Default)]
struct Usage {
    rdy: usize,
    claim: usize,
}

impl Budget {
    fn new(max: u32) -> Self {
        Budget {
            max: max.max(1) as usize,
            usage: Default::default(),
            changed: watch::channel(0).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Usage>> {
        // Plain counters: still meaningful after a panicking holder.
        self.usage.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn join(&self, id: u64) {
        self.lock().insert(id, Usage::default());
        self.bump();
    }

    fn leave(&self, id: u64) {
        self.lock().remove(&id);
        self.bump();
    }

    /// The RDY connection `id` may use now, recorded as sent: the caller
    /// must send it if it differs from what nsqd has.
    fn rdy_for(&self, id: u64, max_rdy: u32) -> u32 {
        let mut usage = self.lock();
        let n = usage.len().max(1);
        let rdy = if self.max >= n {
            let others: usize = usage
                .iter()
                .filter(|(k, _)| **k != id)
                .map(|(_, u)| u.claim)
                .sum();
            (self.max / n).min(self.max.saturating_sub(others))
        } else {
            1
        };
        let rdy = rdy.min(max_rdy as usize);
        let u = usage.entry(id).or_default();
        u.rdy = rdy;
        u.claim = u.claim.max(rdy);
        rdy as u32
    }

    /// `n` messages of connection `id` were acknowledged.
    fn acked(&self, id: u64, n: usize) {
        let mut usage = self.lock();
        let Some(u) = usage.get_mut(&id) else { return };
        let before = u.claim;
        u.claim = u.claim.saturating_sub(n).max(u.rdy);
        let freed = u.claim < before;
        let share = self.max / usage.len().max(1);
        let waiting = usage.values().any(|u| u.rdy < share);
        drop(usage);
        if freed && waiting {
            self.bump();
        }
    }
}

/// Membership in the budget for as long as a connection is subscribed.
struct BudgetSeat<'a> {
    budget: &'a Budget,
    id: u64,
}

impl<'a> BudgetSeat<'a> {
    fn new(budget: &'a Budget) -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        budget.join(id);
        BudgetSeat { budget, id }
    }
}

impl Drop for BudgetSeat<'_> {
    fn drop(&mut self) {
        self.budget.leave(self.id);
    }
}

struct ConnTask {
    /// `None` for configured addresses (always reconnect); for discovered
    /// ones, whether nsqlookupd still lists the address.
    wanted: Option<Arc<AtomicBool>>,
    handle: JoinHandle<()>,
}

/// Owns the per-address tasks and, with nsqlookupd, keeps their set in
/// line with what nsqlookupd reports.
async fn supervise(shared: Arc<Shared>, tx: mpsc::Sender<Message>) {
    let mut conns: HashMap<String, ConnTask> = HashMap::new();
    for addr in conn::clean_addresses(&shared.cfg.nsqd_tcp_addresses) {
        if let std::collections::hash_map::Entry::Vacant(e) = conns.entry(addr) {
            let handle = spawn_conn(&shared, e.key(), None, &tx);
            e.insert(ConnTask {
                wanted: None,
                handle,
            });
        }
    }
    let lookupds = conn::clean_addresses(&shared.cfg.lookupd_http_addresses);
    if lookupds.is_empty() {
        if conns.is_empty() {
            tracing::error!("nsq consumer has neither nsqd nor nsqlookupd addresses");
        }
        tokio::select! {
            _ = shared.shutdown.cancelled() => {}
            _ = tx.closed() => {}
        }
        return;
    }
    let http = lookup::http_client();
    loop {
        let poll = poll_lookupds(&http, &lookupds);
        let found = tokio::select! {
            f = poll => f,
            _ = shared.shutdown.cancelled() => return,
            _ = tx.closed() => return,
        };
        conns.retain(|_, c| !c.handle.is_finished());
        if let Some(found) = found {
            for addr in &found {
                match conns.get(addr) {
                    Some(ConnTask {
                        wanted: Some(w), ..
                    }) => w.store(true, Ordering::Relaxed),
                    Some(ConnTask { wanted: None, .. }) => {}
                    None => {
                        tracing::info!(addr = %addr, topic = %shared.cfg.topic, "nsqlookupd listed a new nsqd");
                        let w = Arc::new(AtomicBool::new(true));
                        let handle = spawn_conn(&shared, addr, Some(w.clone()), &tx);
                        conns.insert(
                            addr.clone(),
                            ConnTask {
                                wanted: Some(w),
                                handle,
                            },
                        );
                    }
                }
            }
            for (addr, c) in &conns {
                if let Some(w) = &c.wanted
                    && !found.contains(addr)
                {
                    w.store(false, Ordering::Relaxed);
                }
            }
        }
        // Jitter keeps many consumers from polling in lockstep.
        let every = shared
            .cfg
            .lookupd_poll_interval
            .max(Duration::from_millis(10));
        let pause = every.mul_f64(rand::Rng::random_range(&mut rand::rng(), 0.9..=1.1));
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shared.shutdown.cancelled() => return,
            _ = tx.closed() => return,
        }
    }
}

/// The union of every nsqlookupd's answer, or `None` if none answered
/// (then nothing is retired on a lookupd outage).
async fn poll_lookupds(http: &lookup::HttpClient, lookupds: &[String]) -> Option<HashSet<String>> {
    let mut found = HashSet::new();
    let mut answered = false;
    for l in lookupds {
        match lookup::nodes(http, l).await {
            Ok(addrs) => {
                answered = true;
                found.extend(addrs);
            }
            Err(e) => tracing::warn!(error = %e, "nsqlookupd query failed"),
        }
    }
    let m = &*crate::metrics::NSQ;
    m.lookupd_up.set(i64::from(answered));
    m.lookupd_nsqds.set(found.len() as i64);
    if !answered {
        m.lookupd_errors.inc();
    }
    answered.then_some(found)
}

fn spawn_conn(
    shared: &Arc<Shared>,
    addr: &str,
    wanted: Option<Arc<AtomicBool>>,
    tx: &mpsc::Sender<Message>,
) -> JoinHandle<()> {
    shared.tracker.spawn(connection(
        shared.clone(),
        addr.to_string(),
        wanted,
        tx.clone(),
    ))
}

/// Keeps one address subscribed until shutdown (or, for a discovered
/// address, until nsqlookupd stops listing it and the connection drops).
async fn connection(
    shared: Arc<Shared>,
    addr: String,
    wanted: Option<Arc<AtomicBool>>,
    tx: mpsc::Sender<Message>,
) {
    let mut backoff = Backoff::new(BACKOFF_INITIAL, BACKOFF_MAX);
    let mut first = true;
    loop {
        if shared.shutdown.is_cancelled() || tx.is_closed() {
            break;
        }
        if !std::mem::take(&mut first) {
            crate::metrics::NSQ.consumer_reconnects.inc();
        }
        if let Some(w) = &wanted
            && !w.load(Ordering::Relaxed)
        {
            tracing::info!(addr = %addr, topic = %shared.cfg.topic,
                "nsqd no longer listed by nsqlookupd; stopped consuming from it");
            break;
        }
        let started = Instant::now();
        match session(&shared, &addr, &tx).await {
            End::Done => {
                tracing::info!(addr = %addr, topic = %shared.cfg.topic, channel = %shared.cfg.channel,
                    "nsq consumer stopped consuming (connection closed)");
                break;
            }
            End::Lost(e) => {
                tracing::warn!(addr = %addr, error = %e, "nsq consumer connection lost; reconnecting");
                if started.elapsed() >= STABLE_SESSION {
                    backoff.reset();
                }
            }
            End::Failed(e) => {
                tracing::warn!(addr = %addr, error = %e, "nsq consumer could not subscribe")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = shared.shutdown.cancelled() => break,
            _ = tx.closed() => break,
        }
    }
}

enum End {
    /// Closed on purpose after draining.
    Done,
    /// Was subscribed, then the connection failed.
    Lost(NsqError),
    /// Never got subscribed.
    Failed(NsqError),
}

/// One connection from connect to close.
async fn session(shared: &Shared, addr: &str, tx: &mpsc::Sender<Message>) -> End {
    let cfg = &shared.cfg;
    let connected = tokio::select! {
        c = subscribe(addr, shared) => c,
        _ = shared.shutdown.cancelled() => return End::Done,
    };
    let Conn {
        mut reader,
        mut writer,
        negotiated,
    } = match connected {
        Ok(c) => c,
        Err(e) => return End::Failed(e),
    };
    tracing::info!(addr = %addr, topic = %cfg.topic, channel = %cfg.channel, "nsq consumer subscribed");
    let seat = BudgetSeat::new(&shared.budget);
    let mut budget_rx = shared.budget.changed.subscribe();
    budget_rx.mark_unchanged();
    let (ack_tx, mut ack_rx) = mpsc::channel::<Ack>(cfg.max_in_flight as usize * 2 + 64);
    let max_rdy = negotiated.max_rdy_count;

    let mut in_flight: usize = 0;
    let mut target = shared.budget.rdy_for(seat.id, max_rdy);
    // Deliveries left before nsqd's RDY (in the "decrementing" reading of
    // the spec) runs out; refilled as messages are acknowledged.
    let mut rdy_left = target;
    let mut closing = false;
    let mut close_wait = false;
    let drain = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(drain);
    let silence_limit = cfg.heartbeat_interval * 3;
    let mut last_read = Instant::now();
    let mut out = BytesMut::new();

    macro_rules! send {
        ($($cmd:expr),+) => {{
            out.clear();
            $( $cmd.encode(&mut out).map_err(conn::proto)?; )+
            conn::write_all(&mut writer, &out).await
        }};
    }

    let nsq_metrics = &*crate::metrics::NSQ;
    nsq_metrics.consumer_connections.inc();
    // What this connection last added to the process-wide gauges; synced
    // once per event (two compares, an atomic add only on change).
    let mut shown_in_flight = 0i64;
    let mut shown_rdy = 0i64;
    let result: Result<End, NsqError> = async {
        send!(Command::Rdy(target))?;
        loop {
            let (now_in_flight, now_rdy) = (in_flight as i64, if closing { 0 } else { target as i64 });
            if now_in_flight != shown_in_flight {
                nsq_metrics.in_flight.inc_by(now_in_flight - shown_in_flight);
                shown_in_flight = now_in_flight;
            }
            if now_rdy != shown_rdy {
                nsq_metrics.rdy.inc_by(now_rdy - shown_rdy);
                shown_rdy = now_rdy;
            }
            tokio::select! {
                f = reader.next_frame() => {
                    last_read = Instant::now();
                    match f? {
                        None => return Err(NsqError::Closed),
                        Some(Frame::Response(b)) if b == frame::HEARTBEAT => send!(Command::Nop)?,
                        Some(Frame::Response(b)) if b == frame::CLOSE_WAIT => {
                            close_wait = true;
                            if closing && in_flight == 0 {
                                return Ok(End::Done);
                            }
                        }
                        Some(Frame::Response(b)) => {
                            tracing::debug!(addr = %addr, response = %String::from_utf8_lossy(&b), "unexpected nsqd response");
                        }
                        Some(Frame::Error(e)) => {
                            let err = conn::server_error(&e);
                            if frame::is_fatal_error(&e) {
                                return Err(err);
                            }
                            tracing::warn!(addr = %addr, error = %err, "nsqd rejected an ack");
                        }
                        Some(Frame::Message(raw)) => {
                            nsq_metrics.received.inc();
                            in_flight += 1;
                            rdy_left = rdy_left.saturating_sub(1);
                            if closing {
                                // Arrived after RDY 0: hand it straight back so
                                // another consumer can take it.
                                in_flight -= 1;
                                send!(Command::Req(&raw.id, 0))?;
                                continue;
                            }
                            let permit = tokio::select! {
                                biased;
                                p = tx.reserve() => p.ok(),
                                _ = shared.shutdown.cancelled() => None,
                            };
                            match permit {
                                Some(p) => p.send(wrap(raw, &ack_tx)),
                                None => {
                                    in_flight -= 1;
                                    send!(Command::Req(&raw.id, 0))?;
                                    closing = true;
                                    drain.as_mut().reset(Instant::now() + cfg.drain_timeout);
                                    send!(Command::Rdy(0), Command::Cls)?;
                                }
                            }
                        }
                    }
                }
                Some(first) = ack_rx.recv() => {
                    out.clear();
                    let mut acked = 0;
                    let mut next = Some(first);
                    while let Some(ack) = next.take() {
                        match ack {
                            Ack::Fin(id) => {
                                Command::Fin(&id).encode(&mut out).map_err(conn::proto)?;
                                in_flight = in_flight.saturating_sub(1);
                                acked += 1;
                            }
                            Ack::Req(id, ms) => {
                                Command::Req(&id, ms).encode(&mut out).map_err(conn::proto)?;
                                in_flight = in_flight.saturating_sub(1);
                                acked += 1;
                            }
                            Ack::Touch(id) => Command::Touch(&id).encode(&mut out).map_err(conn::proto)?,
                        }
                        if out.len() < WRITE_BATCH {
                            next = ack_rx.try_recv().ok();
                        }
                    }
                    shared.budget.acked(seat.id, acked);
                    if !closing {
                        let t = shared.budget.rdy_for(seat.id, max_rdy);
                        // Refill before nsqd runs dry, not after, to keep
                        // the pipe full.
                        if t != target || rdy_left <= (t / 4).max(1) {
                            Command::Rdy(t).encode(&mut out).map_err(conn::proto)?;
                            target = t;
                            rdy_left = t;
                        }
                    }
                    conn::write_all(&mut writer, &out).await?;
                    if closing && close_wait && in_flight == 0 {
                        return Ok(End::Done);
                    }
                }
                _ = shared.shutdown.cancelled(), if !closing => {
                    closing = true;
                    drain.as_mut().reset(Instant::now() + cfg.drain_timeout);
                    send!(Command::Rdy(0), Command::Cls)?;
                }
                _ = tx.closed(), if !closing => {
                    // Nobody reads any more: stop deliveries, return the rest.
                    closing = true;
                    drain.as_mut().reset(Instant::now() + cfg.drain_timeout);
                    send!(Command::Rdy(0), Command::Cls)?;
                }
                Ok(()) = budget_rx.changed(), if !closing => {
                    budget_rx.mark_unchanged();
                    let t = shared.budget.rdy_for(seat.id, max_rdy);
                    if t != target {
                        target = t;
                        rdy_left = t;
                        send!(Command::Rdy(t))?;
                    }
                }
                _ = &mut drain, if closing => {
                    if in_flight > 0 {
                        tracing::warn!(addr = %addr, in_flight, "nsq drain timed out; nsqd will redeliver the rest");
                    }
                    return Ok(End::Done);
                }
                _ = tokio::time::sleep_until(last_read + silence_limit) => {
                    return Err(NsqError::Protocol("no heartbeat from nsqd".into()));
                }
            }
        }
    }
    .await;
    nsq_metrics.consumer_connections.dec();
    nsq_metrics.in_flight.dec_by(shown_in_flight);
    nsq_metrics.rdy.dec_by(shown_rdy);
    match result {
        Ok(end) => end,
        // During a drain a failing connection just ends the drain: nsqd
        // redelivers whatever was still in flight.
        Err(_) if closing => End::Done,
        Err(e) => End::Lost(e),
    }
}

fn wrap(raw: RawMessage, ack: &mpsc::Sender<Ack>) -> Message {
    Message::new(
        raw.id,
        raw.attempts,
        raw.timestamp_ns,
        raw.body,
        ack.clone(),
    )
}

/// Connects, identifies and subscribes; answers heartbeats meanwhile.
async fn subscribe(addr: &str, shared: &Shared) -> Result<Conn, NsqError> {
    let mut c = conn::connect(addr, &shared.who).await?;
    let mut out = BytesMut::new();
    Command::Sub {
        topic: &shared.cfg.topic,
        channel: &shared.cfg.channel,
    }
    .encode(&mut out)
    .map_err(conn::proto)?;
    conn::write_all(&mut c.writer, &out).await?;
    let answer = async {
        loop {
            match c.reader.next_frame().await? {
                Some(Frame::Response(b)) if b == frame::OK => return Ok(()),
                Some(Frame::Response(b)) if b == frame::HEARTBEAT => {
                    conn::write_all(&mut c.writer, b"NOP\n").await?
                }
                Some(Frame::Error(e)) => return Err(conn::server_error(&e)),
                Some(other) => {
                    return Err(NsqError::Protocol(format!(
                        "unexpected answer to SUB: {other:?}"
                    )));
                }
                None => return Err(NsqError::Closed),
            }
        }
    };
    tokio::time::timeout(conn::CONNECT_TIMEOUT, answer)
        .await
        .map_err(|_| NsqError::Timeout)??;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_never_hands_out_more_than_max() {
        let b = Budget::new(4);
        b.join(1);
        assert_eq!(b.rdy_for(1, 2500), 4, "alone: the whole budget");
        // Connection 2 joins while nsqd may have 4 in flight to 1.
        b.join(2);
        assert_eq!(b.rdy_for(2, 2500), 0, "nothing left until 1 shrinks");
        assert_eq!(b.rdy_for(1, 2500), 2, "1 drops to its share");
        assert_eq!(b.rdy_for(2, 2500), 0, "1 may still hold 4 messages");
        let mut rx = b.changed.subscribe();
        rx.mark_unchanged();
        b.acked(1, 1);
        assert!(rx.has_changed().unwrap(), "freed capacity wakes the others");
        assert_eq!(b.rdy_for(2, 2500), 1);
        b.acked(1, 5);
        assert_eq!(b.rdy_for(2, 2500), 2, "1's claim never drops below its RDY");
        assert_eq!(b.rdy_for(1, 2500), 2);
        assert_eq!(b.rdy_for(2, 1), 1, "capped by nsqd's max_rdy_count");
        b.leave(2);
        assert_eq!(b.rdy_for(1, 2500), 4);
    }

    #[test]
    fn budget_gives_each_connection_one_when_max_is_small() {
        let b = Budget::new(2);
        for id in 0..3 {
            b.join(id);
        }
        assert_eq!(
            (0..3).map(|id| b.rdy_for(id, 2500)).collect::<Vec<_>>(),
            vec![1, 1, 1]
        );
    }
}

//! `TestNsqd`: a test NSQ broker implementing the nsqd TCP wire protocol
//! (and nsqlookupd's `/lookup`) for tests; not a production broker.
//!
//! NSQ's server cannot be installed where these tests run, so this double
//! speaks the same bytes as nsqd (protocol V2: IDENTIFY, SUB, PUB, MPUB,
//! DPUB, RDY, FIN, REQ, TOUCH, CLS, NOP; heartbeats; nsqd's error codes and
//! which of them close the connection) and keeps nsqd's delivery semantics:
//! a topic holds messages until a channel exists, then copies each message
//! to every channel; a channel hands each message to one subscriber whose
//! in-flight count is below its RDY; un-FINed messages come back after the
//! message timeout; REQ/DPUB delays are honoured; attempts are counted.
//!
//! Everything lives in memory, is bounded (connections, queue depth, frame
//! and line sizes, per-client output), and shuts down with the value. Stats
//! accessors let tests assert on what the broker saw. Deliberate
//! differences from real nsqd: `/lookup` lists this broker for any valid
//! topic (unless [`TestNsqdConfig::lookup_requires_topic`]), in-flight
//! messages of a dead client wait for the message timeout exactly as in
//! nsqd, and there is no disk spill, TLS, compression, AUTH or sampling.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Knobs, defaulting to nsqd's own defaults where nsqd has one.
#[derive(Debug, Clone)]
pub struct TestNsqdConfig {
    /// `--msg-timeout`: un-FINed messages are redelivered after this.
    pub msg_timeout: Duration,
    /// `--max-msg-timeout`: the largest `msg_timeout` IDENTIFY may ask for.
    pub max_msg_timeout: Duration,
    /// nsqd refuses IDENTIFY heartbeat intervals below 1 s; tests that want
    /// fast heartbeats lower this.
    pub min_heartbeat_interval: Duration,
    pub max_heartbeat_interval: Duration,
    /// Used until (and unless) IDENTIFY asks for another interval.
    pub default_heartbeat_interval: Duration,
    pub max_rdy_count: u64,
    pub max_msg_size: usize,
    pub max_body_size: usize,
    pub max_req_timeout: Duration,
    /// Per topic or channel; beyond it PUB fails with E_PUB_FAILED.
    pub max_queue_depth: usize,
    pub max_connections: usize,
    /// Answer `/lookup` with 404 TOPIC_NOT_FOUND until the topic exists, as
    /// nsqlookupd does. Off by default so consumers find the broker at once.
    pub lookup_requires_topic: bool,
    /// Where the TCP protocol listens (nsqd's `--tcp-address`); default
    /// 127.0.0.1 on an ephemeral port.
    pub tcp_addr: SocketAddr,
    /// Where `/lookup` and `/ping` are served (nsqlookupd's
    /// `--http-address`); default 127.0.0.1 on an ephemeral port.
    pub http_addr: SocketAddr,
}

impl Default for TestNsqdConfig {
    fn default() -> Self {
        TestNsqdConfig {
            msg_timeout: Duration::from_secs(60),
            max_msg_timeout: Duration::from_secs(15 * 60),
            min_heartbeat_interval: Duration::from_secs(1),
            max_heartbeat_interval: Duration::from_secs(60),
            default_heartbeat_interval: Duration::from_secs(30),
            max_rdy_count: 2500,
            max_msg_size: 1024 * 1024,
            max_body_size: 5 * 1024 * 1024,
            max_req_timeout: Duration::from_secs(3600),
            max_queue_depth: 100_000,
            max_connections: 1024,
            lookup_requires_topic: false,
            tcp_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        }
    }
}

/// What the broker knows about one connected client.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub id: u64,
    pub client_id: String,
    pub hostname: String,
    pub user_agent: String,
    /// `None` once IDENTIFY disabled heartbeats.
    pub heartbeat_interval: Option<Duration>,
    pub msg_timeout: Duration,
    pub subscription: Option<(String, String)>,
    pub rdy: u64,
    pub in_flight: usize,
    pub closing: bool,
    /// The highest in-flight count this client ever had.
    pub max_in_flight_seen: usize,
}

/// A test NSQ broker implementing the nsqd TCP wire protocol (and
/// nsqlookupd's `/lookup`) for tests; not a production broker.
pub struct TestNsqd {
    shared: Arc<Shared>,
    tcp: SocketAddr,
    http: SocketAddr,
}

const MAGIC_V2: &[u8; 4] = b"  V2";
/// nsqd reads command lines through a 4 KiB buffer.
const MAX_LINE: usize = 4096;
const FRAME_RESPONSE: u32 = 0;
const FRAME_ERROR: u32 = 1;
const FRAME_MESSAGE: u32 = 2;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Timer resolution for message timeouts and deferred messages.
const TICK: Duration = Duration::from_millis(10);
/// Recent error frames kept for [`TestNsqd::errors`].
const ERROR_LOG: usize = 64;

impl TestNsqd {
    /// Starts with nsqd's defaults on 127.0.0.1 (ephemeral ports).
    pub async fn start() -> TestNsqd {
        Self::start_with(TestNsqdConfig::default()).await
    }

    /// # Panics
    /// If it cannot bind its addresses (a broken test environment).
    pub async fn start_with(cfg: TestNsqdConfig) -> TestNsqd {
        Self::try_start_with(cfg)
            .await
            .expect("test nsqd: binding its listeners")
    }

    /// Starts on `cfg.tcp_addr` and `cfg.http_addr`; fails if either
    /// cannot be bound.
    pub async fn try_start_with(cfg: TestNsqdConfig) -> std::io::Result<TestNsqd> {
        let tcp_l = TcpListener::bind(cfg.tcp_addr).await?;
        let http_l = TcpListener::bind(cfg.http_addr).await?;
        let tcp = tcp_l.local_addr()?;
        let http = http_l.local_addr()?;
        let shared = Arc::new(Shared {
            cfg,
            tcp,
            http,
            state: Mutex::new(State::default()),
            stop: CancellationToken::new(),
            tracker: TaskTracker::new(),
        });
        shared.tracker.spawn(accept_tcp(shared.clone(), tcp_l));
        shared.tracker.spawn(accept_http(shared.clone(), http_l));
        shared.tracker.spawn(ticker(shared.clone()));
        tracing::info!(%tcp, %http, "test nsqd started");
        Ok(TestNsqd { shared, tcp, http })
    }

    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp
    }

    /// Serves `GET /lookup?topic=` (nsqlookupd) and `GET /ping`.
    pub fn http_addr(&self) -> SocketAddr {
        self.http
    }

    /// Messages accepted for `topic` by PUB, MPUB and DPUB.
    pub fn published(&self, topic: &str) -> u64 {
        self.state().topics.get(topic).map_or(0, |t| t.published)
    }

    /// Successful FINs, all channels.
    pub fn finished(&self) -> u64 {
        self.state().stats.finished
    }

    /// Successful REQs, all channels.
    pub fn requeued(&self) -> u64 {
        self.state().stats.requeued
    }

    /// Messages put back because their timeout passed without FIN.
    pub fn timed_out(&self) -> u64 {
        self.state().stats.timed_out
    }

    pub fn touched(&self) -> u64 {
        self.state().stats.touched
    }

    /// Message frames sent to clients (redeliveries included).
    pub fn delivered(&self) -> u64 {
        self.state().stats.delivered
    }

    /// Messages currently in flight, all channels.
    pub fn in_flight(&self) -> usize {
        self.state()
            .topics
            .values()
            .flat_map(|t| t.channels.values())
            .map(|c| c.in_flight.len())
            .sum()
    }

    /// The highest number of messages this channel ever had in flight at once.
    pub fn max_in_flight_seen(&self, topic: &str, channel: &str) -> usize {
        self.with_channel(topic, channel, |c| c.max_in_flight_seen)
    }

    /// Messages ready for delivery on a channel (not in flight, not deferred).
    pub fn depth(&self, topic: &str, channel: &str) -> usize {
        self.with_channel(topic, channel, |c| c.queue.len())
    }

    /// Messages waiting out a REQ or DPUB delay on a channel.
    pub fn deferred(&self, topic: &str, channel: &str) -> usize {
        self.with_channel(topic, channel, |c| c.deferred.len())
    }

    /// Messages held by a topic that has no channel yet.
    pub fn topic_depth(&self, topic: &str) -> usize {
        self.state().topics.get(topic).map_or(0, |t| t.queue.len())
    }

    /// Open client connections.
    pub fn connections(&self) -> usize {
        self.state().clients.len()
    }

    /// Client connections accepted since start.
    pub fn accepted(&self) -> u64 {
        self.state().stats.accepted
    }

    pub fn clients(&self) -> Vec<ClientInfo> {
        let st = self.state();
        let mut v: Vec<_> = st.clients.values().map(|c| c.info.clone()).collect();
        v.sort_by_key(|c| c.id);
        v
    }

    pub fn heartbeats_sent(&self) -> u64 {
        self.state().stats.heartbeats_sent
    }

    /// NOPs received (the answer to heartbeats).
    pub fn nops(&self) -> u64 {
        self.state().stats.nops
    }

    /// The most recent error frames sent (`"E_CODE description"`).
    pub fn errors(&self) -> Vec<String> {
        self.state().stats.errors.iter().cloned().collect()
    }

    /// Cuts every client connection at once, without CLOSE_WAIT or flush,
    /// to exercise reconnection. Their in-flight messages time out as in nsqd.
    pub fn drop_connections(&self) {
        for c in self.state().clients.values() {
            c.kill.cancel();
        }
    }

    /// Writes raw bytes to every client connection as if they were frames,
    /// to check that clients survive a broken broker.
    pub fn send_raw(&self, bytes: &[u8]) {
        let b = Bytes::copy_from_slice(bytes);
        for c in self.state().clients.values() {
            let _ = c.out.try_send(Out::Frame(b.clone()));
        }
    }

    /// Stops listening, closes every connection and waits for its tasks.
    pub async fn shutdown(self) {
        self.shared.stop.cancel();
        self.shared.tracker.close();
        if tokio::time::timeout(Duration::from_secs(5), self.shared.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("test nsqd tasks did not stop in time");
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.lock()
    }

    fn with_channel(&self, topic: &str, channel: &str, f: impl Fn(&Channel) -> usize) -> usize {
        self.state()
            .topics
            .get(topic)
            .and_then(|t| t.channels.get(channel))
            .map_or(0, f)
    }
}

impl Drop for TestNsqd {
    fn drop(&mut self) {
        self.shared.stop.cancel();
    }
}

struct Shared {
    cfg: TestNsqdConfig,
    tcp: SocketAddr,
    http: SocketAddr,
    state: Mutex<State>,
    stop: CancellationToken,
    tracker: TaskTracker,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Plain data; a panicking holder cannot leave it half-updated in a
        // way that matters more than losing the whole test.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Default)]
struct State {
    topics: BTreeMap<String, Topic>,
    clients: HashMap<u64, Client>,
    next_client: u64,
    next_msg: u64,
    stats: Stats,
}

#[derive(Default)]
struct Stats {
    finished: u64,
    requeued: u64,
    timed_out: u64,
    touched: u64,
    delivered: u64,
    accepted: u64,
    heartbeats_sent: u64,
    nops: u64,
    errors: VecDeque<String>,
}

#[derive(Default)]
struct Topic {
    /// Held here only while the topic has no channel; each entry carries
    /// its DPUB delay.
    queue: VecDeque<(Msg, Duration)>,
    channels: BTreeMap<String, Channel>,
    published: u64,
}

#[derive(Default)]
struct Channel {
    queue: VecDeque<Msg>,
    deferred: Vec<(Instant, Msg)>,
    in_flight: HashMap<[u8; 16], InFlight>,
    subscribers: Vec<u64>,
    /// Round-robin position among subscribers.
    next_sub: usize,
    max_in_flight_seen: usize,
}

#[derive(Clone)]
struct Msg {
    id: [u8; 16],
    body: Bytes,
    timestamp_ns: i64,
    attempts: u16,
}

struct InFlight {
    msg: Msg,
    client: u64,
    deadline: Instant,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ClientState {
    Init,
    Subscribed,
    Closing,
}

struct Client {
    out: mpsc::Sender<Out>,
    kill: CancellationToken,
    heartbeat: watch::Sender<Option<Duration>>,
    state: ClientState,
    info: ClientInfo,
}

enum Out {
    Frame(Bytes),
    /// Flush what came before, then close (after a fatal error).
    Close,
}

/// An error frame, as nsqd sends it: `E_CODE description`.
#[derive(Debug)]
struct ClientErr {
    code: &'static str,
    desc: String,
    /// nsqd closes the connection after a fatal error.
    fatal: bool,
}

fn fatal(code: &'static str, desc: impl Into<String>) -> ClientErr {
    ClientErr {
        code,
        desc: desc.into(),
        fatal: true,
    }
}

fn non_fatal(code: &'static str, desc: impl Into<String>) -> ClientErr {
    ClientErr {
        code,
        desc: desc.into(),
        fatal: false,
    }
}

fn frame(kind: u32, data: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(8 + data.len());
    b.put_u32(4 + data.len() as u32);
    b.put_u32(kind);
    b.put_slice(data);
    b.freeze()
}

fn message_frame(m: &Msg) -> Bytes {
    let mut b = BytesMut::with_capacity(34 + m.body.len());
    b.put_u32((4 + 26 + m.body.len()) as u32);
    b.put_u32(FRAME_MESSAGE);
    b.put_i64(m.timestamp_ns);
    b.put_u16(m.attempts);
    b.put_slice(&m.id);
    b.put_slice(&m.body);
    b.freeze()
}

/// nsqd's name rule: 1-64 of `[.a-zA-Z0-9_-]`, optional `#ephemeral`.
fn valid_name(s: &str) -> bool {
    let base = s.strip_suffix("#ephemeral").unwrap_or(s);
    !base.is_empty()
        && s.len() <= 64
        && base
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

async fn accept_tcp(shared: Arc<Shared>, l: TcpListener) {
    loop {
        let (stream, peer) = tokio::select! {
            r = l.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Usually fd exhaustion; pausing avoids a hot loop.
                    tracing::warn!(error = %e, "test nsqd accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shared.stop.cancelled() => return,
        };
        if shared.lock().clients.len() >= shared.cfg.max_connections {
            tracing::warn!(%peer, "test nsqd connection limit reached; refusing");
            continue;
        }
        let _ = stream.set_nodelay(true);
        shared
            .tracker
            .spawn(serve_client(shared.clone(), stream, peer));
    }
}

/// Redelivers timed-out messages and releases deferred ones.
async fn ticker(shared: Arc<Shared>) {
    let mut every = tokio::time::interval(TICK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shared.stop.cancelled() => return,
        }
        let now = Instant::now();
        let mut st = shared.lock();
        let State {
            topics,
            clients,
            stats,
            ..
        } = &mut *st;
        for ch in topics.values_mut().flat_map(|t| t.channels.values_mut()) {
            let expired: Vec<[u8; 16]> = ch
                .in_flight
                .iter()
                .filter(|(_, f)| f.deadline <= now)
                .map(|(id, _)| *id)
                .collect();
            for id in expired {
                if let Some(f) = ch.in_flight.remove(&id) {
                    if let Some(c) = clients.get_mut(&f.client) {
                        c.info.in_flight = c.info.in_flight.saturating_sub(1);
                    }
                    stats.timed_out += 1;
                    ch.queue.push_back(f.msg);
                }
            }
            if !ch.deferred.is_empty() {
                let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut ch.deferred)
                    .into_iter()
                    .partition(|(t, _)| *t <= now);
                ch.deferred = later;
                ch.queue.extend(due.into_iter().map(|(_, m)| m));
            }
        }
        dispatch_all(&mut st);
    }
}

/// Hands queued messages to subscribers whose in-flight count is below
/// their RDY (nsqd's `IsReadyForMessages`).
fn dispatch_all(st: &mut State) {
    let State {
        topics,
        clients,
        stats,
        ..
    } = st;
    for ch in topics.values_mut().flat_map(|t| t.channels.values_mut()) {
        while !ch.queue.is_empty() && !ch.subscribers.is_empty() {
            let n = ch.subscribers.len();
            let pick = (0..n).map(|k| (ch.next_sub + k) % n).find(|&i| {
                clients.get(&ch.subscribers[i]).is_some_and(|c| {
                    c.state == ClientState::Subscribed && (c.info.in_flight as u64) < c.info.rdy
                })
            });
            let Some(i) = pick else { break };
            ch.next_sub = (i + 1) % n;
            let cid = ch.subscribers[i];
            let Some(c) = clients.get_mut(&cid) else {
                break;
            };
            let Some(mut msg) = ch.queue.pop_front() else {
                break;
            };
            msg.attempts = msg.attempts.saturating_add(1);
            if c.out.try_send(Out::Frame(message_frame(&msg))).is_err() {
                // A client that does not read its socket is cut off, as
                // nsqd does when its output buffer cannot drain.
                msg.attempts -= 1;
                ch.queue.push_front(msg);
                c.info.rdy = 0;
                c.kill.cancel();
                continue;
            }
            c.info.in_flight += 1;
            c.info.max_in_flight_seen = c.info.max_in_flight_seen.max(c.info.in_flight);
            stats.delivered += 1;
            let deadline = Instant::now() + c.info.msg_timeout;
            ch.in_flight.insert(
                msg.id,
                InFlight {
                    msg,
                    client: cid,
                    deadline,
                },
            );
            ch.max_in_flight_seen = ch.max_in_flight_seen.max(ch.in_flight.len());
        }
    }
}

async fn serve_client(shared: Arc<Shared>, mut stream: TcpStream, peer: SocketAddr) {
    let mut magic = [0u8; 4];
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.read_exact(&mut magic)).await {
        Ok(Ok(_)) if &magic == MAGIC_V2 => {}
        Ok(Ok(_)) => {
            let f = frame(
                FRAME_ERROR,
                b"E_BAD_PROTOCOL client sent bad protocol magic",
            );
            let _ = tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&f)).await;
            return;
        }
        _ => return,
    }
    let (rd, wr) = stream.into_split();
    let cfg = &shared.cfg;
    let (out_tx, out_rx) = mpsc::channel(cfg.max_rdy_count as usize + 256);
    let kill = shared.stop.child_token();
    let (hb_tx, hb_rx) = watch::channel(Some(cfg.default_heartbeat_interval));
    let id = {
        let mut st = shared.lock();
        st.next_client += 1;
        st.stats.accepted += 1;
        let id = st.next_client;
        st.clients.insert(
            id,
            Client {
                out: out_tx.clone(),
                kill: kill.clone(),
                heartbeat: hb_tx,
                state: ClientState::Init,
                info: ClientInfo {
                    id,
                    client_id: String::new(),
                    hostname: String::new(),
                    user_agent: String::new(),
                    heartbeat_interval: Some(cfg.default_heartbeat_interval),
                    msg_timeout: cfg.msg_timeout,
                    subscription: None,
                    rdy: 0,
                    in_flight: 0,
                    closing: false,
                    max_in_flight_seen: 0,
                },
            },
        );
        id
    };
    tracing::debug!(%peer, id, "test nsqd client connected");
    let writer = shared.tracker.spawn(write_loop(
        shared.clone(),
        wr,
        out_rx,
        hb_rx.clone(),
        kill.clone(),
    ));
    let mut conn = ClientConn {
        shared: shared.clone(),
        id,
        rd: CmdReader {
            rd,
            buf: BytesMut::with_capacity(4096),
        },
        out: out_tx,
        heartbeat: hb_rx,
    };
    tokio::select! {
        _ = conn.run() => {}
        _ = kill.cancelled() => {}
    }
    // Let the writer flush what is queued (e.g. a final error frame) before
    // the socket goes, but never wait long on a client that does not read.
    let _ = conn.out.try_send(Out::Close);
    let _ = tokio::time::timeout(Duration::from_secs(1), kill.cancelled()).await;
    kill.cancel();
    let _ = writer.await;
    let mut st = shared.lock();
    st.clients.remove(&id);
    for ch in st.topics.values_mut().flat_map(|t| t.channels.values_mut()) {
        ch.subscribers.retain(|&c| c != id);
    }
    // Its in-flight messages stay until they time out, as in nsqd.
    drop(st);
    tracing::debug!(%peer, id, "test nsqd client disconnected");
}

async fn write_loop(
    shared: Arc<Shared>,
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Out>,
    mut heartbeat: watch::Receiver<Option<Duration>>,
    kill: CancellationToken,
) {
    let hb_frame = frame(FRAME_RESPONSE, b"_heartbeat_");
    let mut next_hb = heartbeat.borrow().map(|d| Instant::now() + d);
    let mut buf = BytesMut::new();
    loop {
        let hb_at = next_hb.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        let mut close = false;
        buf.clear();
        tokio::select! {
            _ = kill.cancelled() => break,
            r = heartbeat.changed() => {
                if r.is_err() { break; }
                next_hb = heartbeat.borrow_and_update().map(|d| Instant::now() + d);
                continue;
            }
            _ = tokio::time::sleep_until(hb_at), if next_hb.is_some() => {
                buf.extend_from_slice(&hb_frame);
                shared.lock().stats.heartbeats_sent += 1;
                next_hb = heartbeat.borrow().map(|d| hb_at + d);
            }
            item = rx.recv() => {
                let mut item = item;
                while let Some(o) = item.take() {
                    match o {
                        Out::Frame(b) => buf.extend_from_slice(&b),
                        Out::Close => { close = true; break; }
                    }
                    if buf.len() < 256 * 1024 {
                        item = rx.try_recv().ok();
                    }
                }
                if buf.is_empty() && !close {
                    break;
                }
            }
        }
        if !buf.is_empty() {
            match tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(&buf)).await {
                Ok(Ok(())) => {}
                _ => break,
            }
        }
        if close {
            let _ = wr.shutdown().await;
            break;
        }
    }
    kill.cancel();
}

/// Reads nsqd commands: a line, and for some commands a sized body.
struct CmdReader<R> {
    rd: R,
    buf: BytesMut,
}

enum ReadErr {
    Eof,
    Io,
    Client(ClientErr),
}

impl<R: AsyncRead + Unpin> CmdReader<R> {
    async fn fill(&mut self) -> Result<(), ReadErr> {
        match self.rd.read_buf(&mut self.buf).await {
            Ok(0) => Err(ReadErr::Eof),
            Ok(_) => Ok(()),
            Err(_) => Err(ReadErr::Io),
        }
    }

    async fn line(&mut self) -> Result<Bytes, ReadErr> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line = self.buf.split_to(pos + 1).freeze();
                line.truncate(pos);
                if line.last() == Some(&b'\r') {
                    line.truncate(pos - 1);
                }
                return Ok(line);
            }
            if self.buf.len() >= MAX_LINE {
                return Err(ReadErr::Client(fatal("E_INVALID", "command line too long")));
            }
            self.buf.reserve(MAX_LINE);
            self.fill().await?;
        }
    }

    async fn exact(&mut self, n: usize) -> Result<Bytes, ReadErr> {
        while self.buf.len() < n {
            self.buf.reserve(n - self.buf.len());
            self.fill().await?;
        }
        Ok(self.buf.split_to(n).freeze())
    }

    async fn u32(&mut self) -> Result<usize, ReadErr> {
        let b = self.exact(4).await?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }

    /// A `[u32 size][body]` body whose size must be in `1..=max`.
    async fn body(&mut self, max: usize, code: &'static str, what: &str) -> Result<Bytes, ReadErr> {
        let size = self.u32().await?;
        if size == 0 {
            return Err(ReadErr::Client(fatal(
                code,
                format!("{what} invalid body size 0"),
            )));
        }
        if size > max {
            return Err(ReadErr::Client(fatal(
                code,
                format!("{what} body too big {size} > {max}"),
            )));
        }
        self.exact(size).await
    }
}

struct ClientConn {
    shared: Arc<Shared>,
    id: u64,
    rd: CmdReader<tokio::net::tcp::OwnedReadHalf>,
    out: mpsc::Sender<Out>,
    heartbeat: watch::Receiver<Option<Duration>>,
}

impl ClientConn {
    async fn run(&mut self) {
        loop {
            // nsqd's read deadline: two missed heartbeats and the client is gone.
            let idle = self.heartbeat.borrow().map(|d| d * 2);
            let step = async {
                let line = self.rd.line().await?;
                self.command(line).await
            };
            let r = match idle {
                Some(d) => match tokio::time::timeout(d, step).await {
                    Ok(r) => r,
                    Err(_) => {
                        tracing::info!(
                            id = self.id,
                            "test nsqd: client missed heartbeats; closing"
                        );
                        return;
                    }
                },
                None => step.await,
            };
            match r {
                Ok(Some(resp)) => {
                    if !self.send(frame(FRAME_RESPONSE, &resp)) {
                        return;
                    }
                }
                Ok(None) => {}
                Err(ReadErr::Eof | ReadErr::Io) => return,
                Err(ReadErr::Client(e)) => {
                    let text = format!("{} {}", e.code, e.desc);
                    {
                        let mut st = self.shared.lock();
                        if st.stats.errors.len() >= ERROR_LOG {
                            st.stats.errors.pop_front();
                        }
                        st.stats.errors.push_back(text.clone());
                    }
                    let sent = self.send(frame(FRAME_ERROR, text.as_bytes()));
                    if e.fatal || !sent {
                        let _ = self.out.try_send(Out::Close);
                        return;
                    }
                }
            }
        }
    }

    fn send(&self, f: Bytes) -> bool {
        self.out.try_send(Out::Frame(f)).is_ok()
    }

    /// Runs one command; `Ok(Some)` is a response frame to send.
    async fn command(&mut self, line: Bytes) -> Result<Option<Bytes>, ReadErr> {
        let text = String::from_utf8_lossy(&line).into_owned();
        let params: Vec<&str> = text.split(' ').collect();
        let cmd = params[0];
        let r = match cmd {
            "NOP" => {
                self.shared.lock().stats.nops += 1;
                Ok(None)
            }
            "IDENTIFY" => {
                let body = self
                    .rd
                    .body(self.shared.cfg.max_body_size, "E_BAD_BODY", "IDENTIFY")
                    .await?;
                self.identify(&body).map(Some)
            }
            "PUB" => {
                let topic = self.pub_topic(&params, "PUB")?;
                let body = self
                    .rd
                    .body(self.shared.cfg.max_msg_size, "E_BAD_MESSAGE", "PUB")
                    .await?;
                self.publish(&topic, vec![body], Duration::ZERO, "E_PUB_FAILED")
            }
            "DPUB" => {
                let topic = self.pub_topic(&params, "DPUB")?;
                let max = self.shared.cfg.max_req_timeout.as_millis() as i64;
                let ms = params
                    .get(2)
                    .and_then(|p| p.parse::<i64>().ok())
                    .ok_or_else(|| {
                        ReadErr::Client(fatal("E_INVALID", "DPUB could not parse timeout"))
                    })?;
                if !(0..=max).contains(&ms) {
                    return Err(ReadErr::Client(fatal(
                        "E_INVALID",
                        format!("DPUB timeout {ms} out of range 0-{max}"),
                    )));
                }
                let body = self
                    .rd
                    .body(self.shared.cfg.max_msg_size, "E_BAD_MESSAGE", "DPUB")
                    .await?;
                self.publish(
                    &topic,
                    vec![body],
                    Duration::from_millis(ms as u64),
                    "E_DPUB_FAILED",
                )
            }
            "MPUB" => {
                let topic = self.pub_topic(&params, "MPUB")?;
                let body = self
                    .rd
                    .body(self.shared.cfg.max_body_size, "E_BAD_BODY", "MPUB")
                    .await?;
                let msgs =
                    split_mpub(body, self.shared.cfg.max_msg_size).map_err(ReadErr::Client)?;
                self.publish(&topic, msgs, Duration::ZERO, "E_MPUB_FAILED")
            }
            "SUB" => self.sub(&params),
            "RDY" => self.rdy(&params),
            "FIN" | "REQ" | "TOUCH" => self.ack(cmd, &params),
            "CLS" => self.cls(),
            "AUTH" => Err(fatal("E_AUTH_DISABLED", "AUTH disabled")),
            _ => Err(fatal(
                "E_INVALID",
                format!("invalid command {:?}", &text[..text.len().min(64)]),
            )),
        };
        r.map_err(ReadErr::Client)
    }

    fn pub_topic(&self, params: &[&str], what: &str) -> Result<String, ReadErr> {
        let topic = params.get(1).ok_or_else(|| {
            ReadErr::Client(fatal(
                "E_INVALID",
                format!("{what} insufficient number of parameters"),
            ))
        })?;
        if !valid_name(topic) {
            return Err(ReadErr::Client(fatal(
                "E_BAD_TOPIC",
                format!("{what} topic name {topic:?} is not valid"),
            )));
        }
        Ok(topic.to_string())
    }

    fn identify(&self, body: &[u8]) -> Result<Bytes, ClientErr> {
        let cfg = &self.shared.cfg;
        let v: serde_json::Value = serde_json::from_slice(body)
            .map_err(|_| fatal("E_BAD_BODY", "IDENTIFY failed to decode JSON body"))?;
        let mut st = self.shared.lock();
        let c = st
            .clients
            .get_mut(&self.id)
            .ok_or_else(|| fatal("E_INVALID", "client gone"))?;
        if c.state != ClientState::Init {
            return Err(fatal("E_INVALID", "cannot IDENTIFY in current state"));
        }
        let s = |k: &str| {
            v.get(k)
                .and_then(|x| x.as_str())
                .unwrap_or_default()
                .to_string()
        };
        let hb = v
            .get("heartbeat_interval")
            .and_then(|x| x.as_i64())
            .unwrap_or(0);
        let heartbeat = match hb {
            -1 => None,
            0 => Some(cfg.default_heartbeat_interval),
            ms if ms > 0
                && Duration::from_millis(ms as u64) >= cfg.min_heartbeat_interval
                && Duration::from_millis(ms as u64) <= cfg.max_heartbeat_interval =>
            {
                Some(Duration::from_millis(ms as u64))
            }
            ms => {
                return Err(fatal(
                    "E_BAD_BODY",
                    format!("IDENTIFY heartbeat interval ({ms}) is invalid"),
                ));
            }
        };
        let mt = v.get("msg_timeout").and_then(|x| x.as_i64()).unwrap_or(0);
        let msg_timeout = match mt {
            0 => cfg.msg_timeout,
            ms if ms >= 1000 && Duration::from_millis(ms as u64) <= cfg.max_msg_timeout => {
                Duration::from_millis(ms as u64)
            }
            ms => {
                return Err(fatal(
                    "E_BAD_BODY",
                    format!("IDENTIFY msg timeout ({ms}) is invalid"),
                ));
            }
        };
        c.info.client_id = s("client_id");
        c.info.hostname = s("hostname");
        c.info.user_agent = s("user_agent");
        c.info.heartbeat_interval = heartbeat;
        c.info.msg_timeout = msg_timeout;
        c.heartbeat.send_replace(heartbeat);
        if v.get("feature_negotiation").and_then(|x| x.as_bool()) != Some(true) {
            return Ok(Bytes::from_static(b"OK"));
        }
        let resp = serde_json::json!({
            "max_rdy_count": cfg.max_rdy_count,
            "version": "1.3.0-test",
            "max_msg_timeout": cfg.max_msg_timeout.as_millis() as u64,
            "msg_timeout": msg_timeout.as_millis() as u64,
            "tls_v1": false,
            "deflate": false,
            "deflate_level": 0,
            "max_deflate_level": 6,
            "snappy": false,
            "sample_rate": 0,
            "auth_required": false,
            "output_buffer_size": 16384,
            "output_buffer_timeout": 250,
        });
        Ok(Bytes::from(resp.to_string()))
    }

    fn publish(
        &self,
        topic: &str,
        bodies: Vec<Bytes>,
        defer: Duration,
        fail_code: &'static str,
    ) -> Result<Option<Bytes>, ClientErr> {
        let max = self.shared.cfg.max_queue_depth;
        let mut st = self.shared.lock();
        let State {
            topics, next_msg, ..
        } = &mut *st;
        let t = topics.entry(topic.to_string()).or_default();
        let full = t.queue.len() + bodies.len() > max
            || t.channels
                .values()
                .any(|c| c.queue.len() + c.deferred.len() + bodies.len() > max);
        if full {
            return Err(fatal(
                fail_code,
                format!("{fail_code}: topic {topic} is full"),
            ));
        }
        let now = Instant::now();
        for body in bodies {
            *next_msg += 1;
            let mut id = [0u8; 16];
            id.copy_from_slice(format!("{:016x}", *next_msg).as_bytes());
            let msg = Msg {
                id,
                body,
                timestamp_ns: now_ns(),
                attempts: 0,
            };
            t.published += 1;
            if t.channels.is_empty() {
                t.queue.push_back((msg, defer));
            } else {
                for ch in t.channels.values_mut() {
                    put(ch, msg.clone(), defer, now);
                }
            }
        }
        dispatch_all(&mut st);
        Ok(Some(Bytes::from_static(b"OK")))
    }

    fn sub(&self, params: &[&str]) -> Result<Option<Bytes>, ClientErr> {
        let mut st = self.shared.lock();
        let State {
            topics, clients, ..
        } = &mut *st;
        let c = clients
            .get_mut(&self.id)
            .ok_or_else(|| fatal("E_INVALID", "client gone"))?;
        if c.state != ClientState::Init {
            return Err(fatal("E_INVALID", "cannot SUB in current state"));
        }
        if c.info.heartbeat_interval.is_none() {
            return Err(fatal("E_INVALID", "cannot SUB with heartbeats disabled"));
        }
        if params.len() < 3 {
            return Err(fatal("E_INVALID", "SUB insufficient number of parameters"));
        }
        let (topic, channel) = (params[1], params[2]);
        if !valid_name(topic) {
            return Err(fatal(
                "E_BAD_TOPIC",
                format!("SUB topic name {topic:?} is not valid"),
            ));
        }
        if !valid_name(channel) {
            return Err(fatal(
                "E_BAD_CHANNEL",
                format!("SUB channel name {channel:?} is not valid"),
            ));
        }
        let t = topics.entry(topic.to_string()).or_default();
        let first_channel = t.channels.is_empty();
        let ch = t.channels.entry(channel.to_string()).or_default();
        if first_channel {
            // The first channel receives what the topic held meanwhile.
            let now = Instant::now();
            for (m, defer) in std::mem::take(&mut t.queue) {
                put(ch, m, defer, now);
            }
        }
        ch.subscribers.push(self.id);
        c.state = ClientState::Subscribed;
        c.info.subscription = Some((topic.to_string(), channel.to_string()));
        Ok(Some(Bytes::from_static(b"OK")))
    }

    fn rdy(&self, params: &[&str]) -> Result<Option<Bytes>, ClientErr> {
        let max = self.shared.cfg.max_rdy_count;
        let mut st = self.shared.lock();
        let c = st
            .clients
            .get_mut(&self.id)
            .ok_or_else(|| fatal("E_INVALID", "client gone"))?;
        match c.state {
            // nsqd ignores RDY while closing.
            ClientState::Closing => return Ok(None),
            ClientState::Init => return Err(fatal("E_INVALID", "cannot RDY in current state")),
            ClientState::Subscribed => {}
        }
        let count = match params.get(1) {
            None => 1,
            Some(p) => p
                .parse::<i64>()
                .map_err(|_| fatal("E_INVALID", format!("RDY could not parse count {p}")))?,
        };
        if count < 0 || count as u64 > max {
            return Err(fatal(
                "E_INVALID",
                format!("RDY count {count} out of range 0-{max}"),
            ));
        }
        c.info.rdy = count as u64;
        dispatch_all(&mut st);
        Ok(None)
    }

    fn ack(&self, cmd: &str, params: &[&str]) -> Result<Option<Bytes>, ClientErr> {
        let cfg = &self.shared.cfg;
        let mut st = self.shared.lock();
        let State {
            topics,
            clients,
            stats,
            ..
        } = &mut *st;
        let c = clients
            .get_mut(&self.id)
            .ok_or_else(|| fatal("E_INVALID", "client gone"))?;
        if c.state == ClientState::Init {
            return Err(fatal("E_INVALID", format!("cannot {cmd} in current state")));
        }
        let need = if cmd == "REQ" { 3 } else { 2 };
        if params.len() < need {
            return Err(fatal(
                "E_INVALID",
                format!("{cmd} insufficient number of params"),
            ));
        }
        let raw = params[1].as_bytes();
        if raw.len() != 16 {
            return Err(fatal("E_INVALID", "Invalid Message ID"));
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(raw);
        let delay = if cmd == "REQ" {
            let ms = params[2].parse::<i64>().map_err(|_| {
                fatal(
                    "E_INVALID",
                    format!("REQ could not parse timeout {}", params[2]),
                )
            })?;
            // Newer nsqd clamps out-of-range delays instead of failing.
            Duration::from_millis(ms.max(0) as u64).min(cfg.max_req_timeout)
        } else {
            Duration::ZERO
        };
        let failed = |why: &str| {
            let code = match cmd {
                "FIN" => "E_FIN_FAILED",
                "REQ" => "E_REQ_FAILED",
                _ => "E_TOUCH_FAILED",
            };
            non_fatal(code, format!("{cmd} {} failed {why}", params[1]))
        };
        let Some((topic, channel)) = c.info.subscription.clone() else {
            return Err(failed("not subscribed"));
        };
        let Some(ch) = topics
            .get_mut(&topic)
            .and_then(|t| t.channels.get_mut(&channel))
        else {
            return Err(failed("no such channel"));
        };
        match ch.in_flight.get_mut(&id) {
            None => return Err(failed("ID not in flight")),
            Some(f) if f.client != self.id => return Err(failed("client does not own message")),
            Some(f) if cmd == "TOUCH" => {
                f.deadline = Instant::now() + c.info.msg_timeout;
                stats.touched += 1;
                return Ok(None);
            }
            Some(_) => {}
        }
        let Some(f) = ch.in_flight.remove(&id) else {
            return Err(failed("ID not in flight"));
        };
        c.info.in_flight = c.info.in_flight.saturating_sub(1);
        if cmd == "FIN" {
            stats.finished += 1;
        } else {
            stats.requeued += 1;
            put(ch, f.msg, delay, Instant::now());
        }
        dispatch_all(&mut st);
        Ok(None)
    }

    fn cls(&self) -> Result<Option<Bytes>, ClientErr> {
        let mut st = self.shared.lock();
        let c = st
            .clients
            .get_mut(&self.id)
            .ok_or_else(|| fatal("E_INVALID", "client gone"))?;
        if c.state != ClientState::Subscribed {
            return Err(fatal("E_INVALID", "cannot CLS in current state"));
        }
        c.state = ClientState::Closing;
        c.info.closing = true;
        Ok(Some(Bytes::from_static(b"CLOSE_WAIT")))
    }
}

impl From<ClientErr> for ReadErr {
    fn from(e: ClientErr) -> Self {
        ReadErr::Client(e)
    }
}

fn put(ch: &mut Channel, msg: Msg, defer: Duration, now: Instant) {
    if defer.is_zero() {
        ch.queue.push_back(msg);
    } else {
        ch.deferred.push((now + defer, msg));
    }
}

/// MPUB body: `[u32 count]` then `count` times `[u32 size][data]`.
fn split_mpub(mut body: Bytes, max_msg: usize) -> Result<Vec<Bytes>, ClientErr> {
    if body.len() < 4 {
        return Err(fatal("E_BAD_BODY", "MPUB invalid body size"));
    }
    let n = body.get_u32() as usize;
    if n == 0 {
        return Err(fatal("E_BAD_BODY", "MPUB invalid message count 0"));
    }
    // Each message needs at least 5 bytes, so a huge count is a lie.
    if n > body.len() / 4 {
        return Err(fatal(
            "E_BAD_BODY",
            format!("MPUB invalid message count {n}"),
        ));
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        if body.len() < 4 {
            return Err(fatal("E_BAD_BODY", "MPUB body ends early"));
        }
        let size = body.get_u32() as usize;
        if size == 0 {
            return Err(fatal("E_BAD_MESSAGE", "MPUB invalid message body size 0"));
        }
        if size > max_msg {
            return Err(fatal(
                "E_BAD_MESSAGE",
                format!("MPUB message too big {size} > {max_msg}"),
            ));
        }
        if body.len() < size {
            return Err(fatal("E_BAD_BODY", "MPUB body ends early"));
        }
        out.push(body.split_to(size));
    }
    if !body.is_empty() {
        return Err(fatal("E_BAD_BODY", "MPUB trailing bytes after messages"));
    }
    Ok(out)
}

async fn accept_http(shared: Arc<Shared>, l: TcpListener) {
    loop {
        let stream = tokio::select! {
            r = l.accept() => match r {
                Ok((s, _)) => s,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shared.stop.cancelled() => return,
        };
        let s = shared.clone();
        shared.tracker.spawn(async move {
            tokio::select! {
                _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, serve_http(&s, stream)) => {}
                _ = s.stop.cancelled() => {}
            }
        });
    }
}

/// Just enough HTTP/1.1 for nsqlookupd's `/lookup`, `/nodes` and `/ping`: one
/// request per connection, answered with `Connection: close`.
async fn serve_http(shared: &Shared, mut stream: TcpStream) {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        if buf.len() > 8192 {
            return;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let request = lines.next().unwrap_or_default();
    let mut parts = request.split(' ');
    let (method, target) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let v1 = lines.any(|h| {
        let h = h.to_ascii_lowercase();
        h.starts_with("accept:") && h.contains("application/vnd.nsq") && h.contains("version=1.0")
    });
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let (status, body) = match (method, path) {
        ("GET", "/ping") => (200, "OK".to_string()),
        ("GET", "/lookup") => lookup(shared, query, v1),
        ("GET", "/nodes") => nodes(shared, v1),
        _ => (404, r#"{"message":"NOT_FOUND"}"#.to_string()),
    };
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        _ => "Not Found",
    };
    let resp = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(resp.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// This broker as nsqlookupd lists a registered nsqd.
fn producer(shared: &Shared) -> serde_json::Value {
    serde_json::json!({
        "remote_address": shared.tcp.to_string(),
        "hostname": "test-nsqd",
        "broadcast_address": shared.tcp.ip().to_string(),
        "tcp_port": shared.tcp.port(),
        "http_port": shared.http.port(),
        "version": "1.3.0-test",
    })
}

/// What nsqlookupd answers clients that do not ask for the v1 API.
fn versioned(data: serde_json::Value, v1: bool) -> String {
    if v1 {
        data.to_string()
    } else {
        serde_json::json!({ "status_code": 200, "status_txt": "OK", "data": data }).to_string()
    }
}

/// `/nodes`: every registered nsqd, whatever topics it carries.
fn nodes(shared: &Shared, v1: bool) -> (u16, String) {
    let topics: Vec<String> = shared.lock().topics.keys().cloned().collect();
    let mut p = producer(shared);
    p["topics"] = topics.into();
    (200, versioned(serde_json::json!({ "producers": [p] }), v1))
}

fn lookup(shared: &Shared, query: &str, v1: bool) -> (u16, String) {
    let topic = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "topic")
        .map(|(_, v)| v.replace("%23", "#"));
    let Some(topic) = topic else {
        return (400, r#"{"message":"MISSING_ARG_TOPIC"}"#.into());
    };
    if !valid_name(&topic) {
        return (400, r#"{"message":"INVALID_ARG_TOPIC"}"#.into());
    }
    let channels: Option<Vec<String>> = shared
        .lock()
        .topics
        .get(&topic)
        .map(|t| t.channels.keys().cloned().collect());
    if channels.is_none() && shared.cfg.lookup_requires_topic {
        return (404, r#"{"message":"TOPIC_NOT_FOUND"}"#.into());
    }
    let data = serde_json::json!({
        "channels": channels.unwrap_or_default(),
        "producers": [producer(shared)],
    });
    (200, versioned(data, v1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mpub_bodies() {
        let mut b = BytesMut::new();
        b.put_u32(2);
        b.put_u32(1);
        b.put_slice(b"a");
        b.put_u32(2);
        b.put_slice(b"bc");
        let v = split_mpub(b.clone().freeze(), 10).unwrap();
        assert_eq!(v, vec![Bytes::from_static(b"a"), Bytes::from_static(b"bc")]);
        assert!(split_mpub(b.clone().freeze().slice(..8), 10).is_err());
        assert!(split_mpub(b.freeze(), 1).is_err());
        assert!(split_mpub(Bytes::from_static(&[0, 0, 0, 0]), 10).is_err());
        assert!(split_mpub(Bytes::from_static(&[0xff, 0xff, 0xff, 0xff, 0]), 10).is_err());
    }
}

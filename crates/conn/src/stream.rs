//! A room's stream on this node: the recent messages of the room, in offset
//! order, kept once and shared by every session of the room.
//!
//! A push appends to the stream once and wakes the room's writers with one
//! call — O(1) in the room size on the pushing side. Each session's writer
//! keeps only a cursor (the next offset it needs); when it wakes it takes
//! **everything it lacks as one merged frame** (`|len|data|len|data|...`
//! in one `Reply{MESSAGE}`), built once and shared by every session that
//! lacks the same range. A writer that is busy writing thus sends more
//! messages per write as the load grows: the frames per second a room costs
//! are bounded by how fast the node can write, not by the message rate.
//!
//! Offsets come from logic (see `logic::stream`), so every conn node and
//! every receiver sees the same ones. A message that arrives twice (a queue
//! redelivery) is dropped; one that arrives early (two job nodes, two logic
//! nodes publishing one room) waits up to `stream.reorder_wait` for the
//! gap before it, which is then skipped. A newer epoch restarts the stream.
//!
//! The stream is bounded by count and bytes. A session that falls further
//! behind than the stream reaches loses the oldest messages: NORMAL ones
//! are counted; if an IMPORTANT one was among them the session recovers the
//! range from logic's history (see `session::writer`), never silently.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use chatroom_common::batch::HEAD_LEN;
use chatroom_common::metrics;
use chatroom_common::proto::protocol::{BroadcastRoomReq, MsgLevel, PackageType, Reply};
use prost::Message as _;
use serde::Deserialize;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// `[stream]`: what each room's stream keeps and how frames are cut.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    /// Messages kept per room.
    pub retain_messages: usize,
    /// Payload bytes kept per room.
    pub retain_bytes: usize,
    /// Largest merged frame (a catch-up is cut into frames of this size).
    pub max_frame_bytes: usize,
    /// How long an early message waits for the gap before it to fill.
    #[serde(deserialize_with = "chatroom_common::config::duration")]
    pub reorder_wait: Duration,
    /// A room without sessions keeps its stream this long (a session that
    /// reconnects here recovers from it).
    #[serde(deserialize_with = "chatroom_common::config::duration")]
    pub linger: Duration,
}

/// One message of a room's stream.
#[derive(Debug, Clone)]
pub struct Entry {
    pub offset: u64,
    pub level: MsgLevel,
    pub data: Bytes,
}

/// What one push did to a stream.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Messages now in the stream (appended at once or after a wait).
    pub appended: u32,
    /// Already there (a redelivery): dropped.
    pub duplicates: u32,
    /// Waiting for an earlier offset.
    pub early: u32,
    /// Of an older epoch than the stream's: handed back to the caller.
    pub stale: u32,
    /// Of a gap given up on, arriving after all (a queue redelivery after
    /// the reorder wait): handed back to the caller with the stale ones.
    pub late: u32,
    /// Offsets given up on (the gap before an early message never filled).
    pub skipped: u64,
}

/// What a writer at a cursor gets.
#[derive(Debug)]
pub enum Take {
    /// Nothing after the cursor yet.
    Nothing,
    /// A merged frame of consecutive messages; continue from `next`
    /// (`more`: the stream already holds messages after it).
    Frame {
        frame: Bytes,
        next: u64,
        messages: u32,
        more: bool,
    },
    /// The session's epoch is over: continue from `next` in `epoch`.
    Epoch { epoch: u64, next: u64 },
    /// The stream no longer holds `from..next`: `lost` messages are gone
    /// from here, `important` if an IMPORTANT one was among them.
    Lost {
        from: u64,
        next: u64,
        important: bool,
    },
}

/// One epoch of a room's stream as this node holds it.
struct Log {
    /// 0 until the first message.
    epoch: u64,
    /// The offset this epoch starts at here: 1 when the stream saw the
    /// epoch begin, else the first offset that arrived.
    start: u64,
    /// The offset the next appended message must have.
    next: u64,
    entries: VecDeque<Entry>,
    bytes: usize,
    /// The largest offset of an IMPORTANT message dropped by the bounds.
    evicted_important: u64,
    /// Offsets given up on in this epoch, `[from, to)`, oldest first
    /// (bounded): one that arrives after all is still delivered.
    skipped: VecDeque<(u64, u64)>,
    /// Recently built frames: (from, to) -> frame.
    cache: VecDeque<(u64, u64, Bytes)>,
}

impl Log {
    fn new(epoch: u64, next: u64) -> Self {
        Log {
            epoch,
            start: next,
            next,
            entries: VecDeque::new(),
            bytes: 0,
            evicted_important: 0,
            skipped: VecDeque::new(),
            cache: VecDeque::new(),
        }
    }

    fn first(&self) -> u64 {
        self.entries.front().map_or(self.next, |e| e.offset)
    }
}

struct State {
    /// The current epoch.
    log: Log,
    /// The epoch before it, kept after a new one began so that writers
    /// still in it take its last messages instead of jumping past them
    /// (bounded like the current one; replaced at the next epoch).
    prev: Option<Box<Log>>,
    /// Early messages (of the current epoch) by offset, waiting for the
    /// gap before them.
    early: BTreeMap<u64, Entry>,
    /// Since when the oldest gap has been waited for.
    gap_since: Option<Instant>,
}

impl State {
    /// Starts `epoch` at `next`. What the old epoch still waited for is
    /// given up on, its early messages go into its log, and the log is
    /// kept as `prev` for the writers still in it. Returns (appended,
    /// skipped) of the old epoch.
    fn begin_epoch(&mut self, cfg: &StreamConfig, epoch: u64, next: u64) -> (u32, u64) {
        let done = give_up_gaps(self, cfg);
        let old = std::mem::replace(&mut self.log, Log::new(epoch, next));
        if old.epoch != 0 {
            self.prev = Some(Box::new(old));
        }
        done
    }
}

/// Frames kept for sharing between writers at the same cursor.
const CACHE: usize = 8;

/// One room's stream.
pub struct RoomStream {
    pub room: String,
    state: Mutex<State>,
    /// Woken once per push; every writer of the room waits on it.
    pub wake: Notify,
    members: AtomicUsize,
    /// When the last member left (ms since the registry started), for linger.
    idle_since_ms: AtomicU64,
    /// Wall-clock ms when this node made the stream (epochs are logic's
    /// wall-clock ms of a stream's start: one at or after this began here).
    created_ms: u64,
}

impl std::fmt::Debug for RoomStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoomStream")
            .field("room", &self.room)
            .field("members", &self.members.load(Ordering::Relaxed))
            .finish()
    }
}

impl RoomStream {
    fn new(room: String) -> Self {
        RoomStream {
            room,
            state: Mutex::new(State {
                log: Log::new(0, 1),
                prev: None,
                early: BTreeMap::new(),
                gap_since: None,
            }),
            wake: Notify::new(),
            members: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            created_ms: wall_ms(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sessions of this node reading the stream.
    pub fn members(&self) -> usize {
        self.members.load(Ordering::Relaxed)
    }

    /// `(epoch, next offset)`: where a session joining now starts.
    pub fn position(&self) -> (u64, u64) {
        let st = self.lock();
        (st.log.epoch, st.log.next)
    }

    /// `(epoch, oldest offset kept, next offset)`.
    pub fn span(&self) -> (u64, u64, u64) {
        let st = self.lock();
        (st.log.epoch, st.log.first(), st.log.next)
    }

    /// Appends messages of `epoch` (offsets from logic; 0 numbers the
    /// message here, for an older job or logic). Entries of an older epoch,
    /// and late ones of a gap given up on, are moved to `stale`: the
    /// caller delivers them as their own frames. Wakes the writers if
    /// anything was appended.
    pub fn push(
        &self,
        cfg: &StreamConfig,
        epoch: u64,
        entries: impl IntoIterator<Item = Entry>,
        now: Instant,
        stale: &mut Vec<Entry>,
    ) -> Appended {
        let mut out = Appended::default();
        {
            let mut st = self.lock();
            if epoch > st.log.epoch {
                // A new epoch: logic numbers every epoch from 1. Where this
                // stream has seen the epoch from its start — it followed an
                // older one, or the epoch began after the stream was made
                // here — it starts at 1, so that a lower offset arriving
                // after a higher one (two job nodes) is put in order, not
                // dropped. Joining an epoch midway, it starts where the
                // first message to arrive starts.
                let from_start = st.log.epoch != 0 || epoch >= self.created_ms;
                let (n, skipped) = st.begin_epoch(cfg, epoch, if from_start { 1 } else { 0 });
                out.appended += n;
                out.skipped += skipped;
            }
            for mut e in entries {
                if epoch < st.log.epoch {
                    // The epoch before: a redelivery of what it holds is a
                    // duplicate; the rest goes out as its own frames.
                    let seen = st.prev.as_deref_mut().is_some_and(|p| {
                        p.epoch == epoch
                            && e.offset < p.next
                            && !take_skipped(&mut p.skipped, e.offset)
                    });
                    if seen {
                        out.duplicates += 1;
                    } else {
                        out.stale += 1;
                        stale.push(e);
                    }
                    continue;
                }
                if e.offset == 0 {
                    e.offset = st.log.next.max(1);
                }
                if st.log.next == 0 {
                    st.log.next = e.offset;
                    st.log.start = e.offset;
                }
                if e.offset < st.log.next && take_skipped(&mut st.log.skipped, e.offset) {
                    out.late += 1;
                    stale.push(e);
                } else if e.offset < st.log.next || st.early.contains_key(&e.offset) {
                    out.duplicates += 1;
                } else if e.offset == st.log.next {
                    append(&mut st.log, cfg, e);
                    out.appended += 1;
                    out.appended += drain_early(&mut st, cfg);
                } else {
                    out.early += 1;
                    st.early.insert(e.offset, e);
                    st.gap_since.get_or_insert(now);
                }
            }
            let (n, skipped) = resolve_gap(&mut st, cfg, now);
            out.appended += n;
            out.skipped += skipped;
            if st.early.len() > cfg.retain_messages {
                // Far too much waiting for one gap: give up on it now.
                let (n, skipped) = resolve_gap(&mut st, cfg, now + cfg.reorder_wait * 2);
                out.appended += n;
                out.skipped += skipped;
            }
        }
        if out.appended > 0 {
            self.wake.notify_waiters();
        }
        out
    }

    /// Tells a stream that has not seen `epoch` yet where a session of it
    /// goes on (`next`): messages from there on are then kept in order even
    /// if the first to arrive is a later one (two job nodes).
    pub fn expect(&self, cfg: &StreamConfig, epoch: u64, next: u64) {
        let appended = {
            let mut st = self.lock();
            epoch > st.log.epoch && st.begin_epoch(cfg, epoch, next).0 > 0
        };
        if appended {
            self.wake.notify_waiters();
        }
    }

    /// Gives up on gaps waited for longer than `reorder_wait` (periodic).
    pub fn expire_gaps(&self, cfg: &StreamConfig, now: Instant) -> Appended {
        let mut out = Appended::default();
        {
            let mut st = self.lock();
            let (n, skipped) = resolve_gap(&mut st, cfg, now);
            out.appended = n;
            out.skipped = skipped;
        }
        if out.appended > 0 {
            self.wake.notify_waiters();
        }
        out
    }

    /// What a writer whose cursor is `(epoch, from)` should send next.
    pub fn take(&self, cfg: &StreamConfig, epoch: u64, from: u64) -> Take {
        let mut st = self.lock();
        let st = &mut *st;
        if st.log.epoch == epoch {
            return take_from(&mut st.log, cfg, &self.room, from);
        }
        if let Some(p) = st.prev.as_deref_mut().filter(|p| p.epoch == epoch) {
            // Still in the epoch before: its last messages first.
            match take_from(p, cfg, &self.room, from) {
                Take::Nothing => {}
                t => return t,
            }
        } else if st.log.epoch < epoch {
            // An older stream here (this node has not seen the session's
            // epoch yet) is waited out.
            return Take::Nothing;
        }
        // On to the current epoch from its start here: what the bounds
        // dropped of it meanwhile is then reported, not skipped.
        Take::Epoch {
            epoch: st.log.epoch,
            next: st.log.start.max(1),
        }
    }
}

/// What a writer at `from` in `log`'s epoch gets.
fn take_from(log: &mut Log, cfg: &StreamConfig, room: &str, from: u64) -> Take {
    if from >= log.next {
        return Take::Nothing;
    }
    let first = log.first();
    if from < first {
        return Take::Lost {
            from,
            next: first,
            important: log.evicted_important >= from,
        };
    }
    // Entries are in offset order with rare gaps (skipped offsets):
    // find `from`, or the first entry after it.
    let start = match log.entries.binary_search_by_key(&from, |e| e.offset) {
        Ok(i) | Err(i) => i,
    };
    let Some(first_entry) = log.entries.get(start) else {
        return Take::Nothing;
    };
    let from = first_entry.offset;
    let n = run_len(cfg, log.entries.range(start..));
    let to = from + n as u64;
    let more = to < log.next;
    if let Some((_, _, f)) = log.cache.iter().find(|(a, b, _)| *a == from && *b == to) {
        return Take::Frame {
            frame: f.clone(),
            next: to,
            messages: n as u32,
            more,
        };
    }
    let frame = merged_frame(room, log.epoch, log.entries.range(start..start + n));
    if log.cache.len() >= CACHE {
        log.cache.pop_front();
    }
    log.cache.push_back((from, to, frame.clone()));
    Take::Frame {
        frame,
        next: to,
        messages: n as u32,
        more,
    }
}

/// The pushed frame of consecutive messages ending at `last`.
pub fn frame(room: &str, level: MsgLevel, batch: Bytes, last: u64, epoch: u64) -> Bytes {
    let inner = BroadcastRoomReq {
        room_id: room.to_string(),
        msg_lv: level as i32,
        data: batch,
        offset: last,
        epoch,
    };
    Reply {
        r#type: PackageType::Message as i32,
        data: inner.encode_to_vec().into(),
    }
    .encode_to_vec()
    .into()
}

/// How many entries from the start of `run` go in one frame: consecutive
/// offsets within the frame budget (at least one).
fn run_len<'a>(cfg: &StreamConfig, run: impl Iterator<Item = &'a Entry>) -> usize {
    let (mut n, mut bytes, mut prev) = (0, 0, 0);
    for e in run {
        let size = HEAD_LEN + e.data.len();
        if n > 0 && (e.offset != prev + 1 || bytes + size > cfg.max_frame_bytes) {
            break;
        }
        (n, bytes, prev) = (n + 1, bytes + size, e.offset);
    }
    n
}

/// The merged frame of `run` (consecutive offsets, not empty): IMPORTANT
/// if any message in it is, positioned at its last offset.
fn merged_frame<'a>(room: &str, epoch: u64, run: impl Iterator<Item = &'a Entry>) -> Bytes {
    let mut batch = BytesMut::new();
    let (mut important, mut last) = (false, 0);
    for e in run {
        batch.extend_from_slice(&(e.data.len() as u32).to_le_bytes());
        batch.extend_from_slice(&e.data);
        important |= e.level == MsgLevel::Important;
        last = e.offset;
    }
    let level = if important {
        MsgLevel::Important
    } else {
        MsgLevel::Normal
    };
    frame(room, level, batch.freeze(), last, epoch)
}

/// Merged frames of `entries` (in offset order), cut at gaps and to the budget.
pub fn frames_of(cfg: &StreamConfig, room: &str, epoch: u64, entries: &[Entry]) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < entries.len() {
        let n = run_len(cfg, entries[i..].iter());
        out.push(merged_frame(room, epoch, entries[i..i + n].iter()));
        i += n;
    }
    out
}

fn append(log: &mut Log, cfg: &StreamConfig, e: Entry) {
    log.next = e.offset + 1;
    log.bytes += e.data.len();
    log.entries.push_back(e);
    while log.entries.len() > cfg.retain_messages.max(1)
        || (log.bytes > cfg.retain_bytes && log.entries.len() > 1)
    {
        let Some(old) = log.entries.pop_front() else {
            break;
        };
        log.bytes -= old.data.len();
        if old.level == MsgLevel::Important {
            log.evicted_important = old.offset;
        }
    }
}

/// Wall-clock ms since the Unix epoch: the unit of logic's epochs.
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Gaps given up on that a stream remembers, to deliver a late arrival.
const SKIPPED_RANGES: usize = 64;

/// Whether `offset` is in a gap given up on; if so it is taken out of it
/// (a second arrival is a duplicate).
fn take_skipped(skipped: &mut VecDeque<(u64, u64)>, offset: u64) -> bool {
    let Some(i) = skipped
        .iter()
        .position(|&(from, to)| (from..to).contains(&offset))
    else {
        return false;
    };
    let (from, to) = skipped[i];
    match (offset == from, offset + 1 == to) {
        (true, true) => {
            skipped.remove(i);
        }
        (true, false) => skipped[i].0 = offset + 1,
        (false, true) => skipped[i].1 = offset,
        (false, false) => {
            skipped[i].1 = offset;
            skipped.insert(i + 1, (offset + 1, to));
            if skipped.len() > SKIPPED_RANGES {
                skipped.pop_front();
            }
        }
    }
    true
}

/// Appends the early messages that now follow; returns how many.
fn drain_early(st: &mut State, cfg: &StreamConfig) -> u32 {
    let mut n = 0;
    while let Some(e) = st.early.remove(&st.log.next) {
        append(&mut st.log, cfg, e);
        n += 1;
    }
    if st.early.is_empty() {
        st.gap_since = None;
    }
    n
}

/// Skips the gap before the earliest waiting message if it has been waited
/// for long enough; returns (appended, offsets skipped).
fn resolve_gap(st: &mut State, cfg: &StreamConfig, now: Instant) -> (u32, u64) {
    let mut appended = 0;
    let mut skipped = 0;
    while let Some(since) = st.gap_since {
        if now.saturating_duration_since(since) < cfg.reorder_wait {
            break;
        }
        let Some((n, s)) = skip_to_early(st, cfg) else {
            st.gap_since = None;
            break;
        };
        appended += n;
        skipped += s;
        if !st.early.is_empty() {
            // The next gap waits from now on.
            st.gap_since = Some(now);
            break;
        }
    }
    (appended, skipped)
}

/// Skips the gap before the earliest waiting message and appends what then
/// follows; `None` if nothing waits. Returns (appended, offsets skipped).
fn skip_to_early(st: &mut State, cfg: &StreamConfig) -> Option<(u32, u64)> {
    let (&first, _) = st.early.iter().next()?;
    let skipped = first - st.log.next;
    if st.log.skipped.len() == SKIPPED_RANGES {
        st.log.skipped.pop_front();
    }
    let from = st.log.next;
    st.log.skipped.push_back((from, first));
    st.log.next = first;
    Some((drain_early(st, cfg), skipped))
}

/// Gives up on every gap at once (the epoch is over): all that waits is
/// appended. Returns (appended, offsets skipped).
fn give_up_gaps(st: &mut State, cfg: &StreamConfig) -> (u32, u64) {
    let (mut appended, mut skipped) = (0, 0);
    while let Some((n, s)) = skip_to_early(st, cfg) {
        appended += n;
        skipped += s;
    }
    st.gap_since = None;
    (appended, skipped)
}

/// Counters of the room streams of this node (relaxed atomics).
#[derive(Debug, Default)]
pub struct StreamStats {
    /// Messages appended to a stream.
    pub appended: AtomicU64,
    /// Messages that arrived twice (queue redelivery): dropped.
    pub duplicates: AtomicU64,
    /// Offsets given up on after the reorder wait.
    pub skipped: AtomicU64,
    /// Messages of an older epoch, pushed to the room's sessions directly.
    pub stale: AtomicU64,
    /// Messages of a gap given up on that arrived after all, pushed to the
    /// room's sessions directly (out of order, not lost).
    pub late: AtomicU64,
    /// NORMAL messages sessions lost by falling behind the stream's reach.
    pub lost_normal: AtomicU64,
    /// Sessions behind past an IMPORTANT message: recovered from logic, or
    /// told with a 410 notice.
    pub gaps_recovered: AtomicU64,
    pub gaps_unrecovered: AtomicU64,
}

impl StreamStats {
    pub fn record(&self, a: &Appended) {
        self.appended
            .fetch_add(u64::from(a.appended), Ordering::Relaxed);
        self.duplicates
            .fetch_add(u64::from(a.duplicates), Ordering::Relaxed);
        self.skipped.fetch_add(a.skipped, Ordering::Relaxed);
        self.stale.fetch_add(u64::from(a.stale), Ordering::Relaxed);
        self.late.fetch_add(u64::from(a.late), Ordering::Relaxed);
    }
}

type Shard = Mutex<HashMap<String, Arc<RoomStream>>>;

/// Every room stream of this node, sharded by room so no lock is global.
pub struct Streams {
    pub cfg: StreamConfig,
    pub stats: StreamStats,
    shards: Box<[Shard]>,
    hasher: RandomState,
    started: Instant,
}

impl Streams {
    pub fn new(cfg: StreamConfig, shards: usize) -> Self {
        Streams {
            cfg,
            stats: StreamStats::default(),
            shards: (0..shards.max(1)).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            started: Instant::now(),
        }
    }

    fn shard(&self, room: &str) -> MutexGuard<'_, HashMap<String, Arc<RoomStream>>> {
        let i = (self.hasher.hash_one(room) % self.shards.len() as u64) as usize;
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The room's stream, created if needed, with one more member.
    pub fn subscribe(&self, room: &str) -> Arc<RoomStream> {
        let s = self
            .shard(room)
            .entry(room.to_string())
            .or_insert_with(|| Arc::new(RoomStream::new(room.to_string())))
            .clone();
        s.members.fetch_add(1, Ordering::Relaxed);
        s
    }

    /// One member fewer; the stream lingers, then is swept.
    pub fn unsubscribe(&self, s: &RoomStream) {
        if s.members.fetch_sub(1, Ordering::Relaxed) == 1 {
            let ms = self.started.elapsed().as_millis() as u64;
            s.idle_since_ms.store(ms, Ordering::Relaxed);
        }
    }

    /// The room's stream if this node has one (members or lingering).
    pub fn get(&self, room: &str) -> Option<Arc<RoomStream>> {
        self.shard(room).get(room).cloned()
    }

    /// Streams on this node.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Gives up on old gaps and drops streams idle past the linger time;
    /// returns the offsets skipped.
    pub fn sweep(&self, now: Instant) -> u64 {
        let now_ms = self.started.elapsed().as_millis() as u64;
        let linger = u64::try_from(self.cfg.linger.as_millis()).unwrap_or(u64::MAX);
        let mut skipped = 0;
        for shard in self.shards.iter() {
            let streams: Vec<Arc<RoomStream>> = {
                let mut map = shard.lock().unwrap_or_else(|p| p.into_inner());
                map.retain(|_, s| {
                    s.members() > 0
                        || now_ms.saturating_sub(s.idle_since_ms.load(Ordering::Relaxed)) < linger
                });
                map.values().cloned().collect()
            };
            for s in streams {
                let a = s.expire_gaps(&self.cfg, now);
                self.stats.record(&a);
                skipped += a.skipped;
            }
        }
        skipped
    }

    /// Sweeps every `period` until `stop`.
    pub async fn sweep_loop(self: Arc<Self>, period: Duration, stop: CancellationToken) {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {
                    let skipped = self.sweep(Instant::now());
                    if skipped > 0 {
                        tracing::warn!(skipped, "room stream gaps given up on after the reorder wait");
                    }
                }
            }
        }
    }
}

/// Exports the streams' counters (`chatroom_conn_stream_*`), read at
/// scrape time.
#[derive(Debug)]
struct StreamsCollector(Arc<Streams>);

impl std::fmt::Debug for Streams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streams")
            .field("stats", &self.stats)
            .finish()
    }
}

impl metrics::Collector for StreamsCollector {
    fn encode(&self, mut e: metrics::DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0.stats;
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let e = &mut e;
        metrics::encode_gauge(
            e,
            "stream_rooms",
            "Room streams kept on this node",
            self.0.len() as i64,
        )?;
        for (name, help, v) in [
            (
                "stream_appended",
                "Messages appended to a room stream",
                g(&s.appended),
            ),
            (
                "stream_duplicates",
                "Messages that arrived twice (queue redelivery), dropped",
                g(&s.duplicates),
            ),
            (
                "stream_skipped",
                "Offsets given up on after the reorder wait",
                g(&s.skipped),
            ),
            (
                "stream_stale",
                "Messages of an older epoch, pushed directly",
                g(&s.stale),
            ),
            (
                "stream_late",
                "Messages of a gap given up on that arrived after all, pushed directly",
                g(&s.late),
            ),
            (
                "stream_lost_normal",
                "NORMAL messages sessions lost by falling behind the stream",
                g(&s.lost_normal),
            ),
            (
                "stream_gaps_recovered",
                "Sessions behind past an IMPORTANT message, recovered from logic",
                g(&s.gaps_recovered),
            ),
            (
                "stream_gaps_unrecovered",
                "Sessions behind past an IMPORTANT message, told with a 410 notice",
                g(&s.gaps_unrecovered),
            ),
        ] {
            metrics::encode_counter(e, name, help, v)?;
        }
        Ok(())
    }
}

impl Streams {
    /// The registry `/metrics` shows the streams' counters from.
    pub fn registry(self: &Arc<Self>, node: &str) -> metrics::Registry {
        let mut r = metrics::Registry::with_prefix_and_labels(
            "chatroom_conn",
            [(
                std::borrow::Cow::Borrowed("node"),
                std::borrow::Cow::Owned(node.to_string()),
            )]
            .into_iter(),
        );
        r.register_collector(Box::new(StreamsCollector(self.clone())));
        r
    }
}

#[cfg(test)]
mod tests {
    use chatroom_common::batch;

    use super::*;

    fn cfg() -> StreamConfig {
        StreamConfig {
            retain_messages: 100,
            retain_bytes: 1 << 20,
            max_frame_bytes: 1 << 16,
            reorder_wait: Duration::from_millis(100),
            linger: Duration::from_secs(60),
        }
    }

    fn e(offset: u64, s: &str) -> Entry {
        Entry {
            offset,
            level: MsgLevel::Normal,
            data: Bytes::copy_from_slice(s.as_bytes()),
        }
    }

    fn push(
        s: &RoomStream,
        c: &StreamConfig,
        epoch: u64,
        es: Vec<Entry>,
        now: Instant,
    ) -> Appended {
        let mut stale = vec![];
        let a = s.push(c, epoch, es, now, &mut stale);
        assert!(stale.is_empty());
        a
    }

    /// Decodes a frame: (messages, last offset, epoch, level).
    fn open(f: &Bytes) -> (Vec<String>, u64, u64, i32) {
        let r = Reply::decode(f.clone()).unwrap();
        assert_eq!(r.r#type, PackageType::Message as i32);
        let m = BroadcastRoomReq::decode(r.data).unwrap();
        let msgs = batch::decode(&m.data)
            .map(|x| String::from_utf8(x.unwrap().to_vec()).unwrap())
            .collect();
        (msgs, m.offset, m.epoch, m.msg_lv)
    }

    fn take_frame(
        s: &RoomStream,
        c: &StreamConfig,
        epoch: u64,
        from: u64,
    ) -> (Vec<String>, u64, Bytes) {
        match s.take(c, epoch, from) {
            Take::Frame { frame, next, .. } => (open(&frame).0, next, frame),
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    #[test]
    fn a_writer_behind_takes_everything_it_lacks_in_one_shared_frame() {
        let c = cfg();
        let s = RoomStream::new("r".into());
        let now = Instant::now();
        assert_eq!(push(&s, &c, 7, vec![e(1, "a"), e(2, "b")], now).appended, 2);
        push(&s, &c, 7, vec![e(3, "c")], now);
        let (msgs, next, f1) = take_frame(&s, &c, 7, 1);
        assert_eq!((msgs, next), (vec!["a".into(), "b".into(), "c".into()], 4));
        let (_, last, epoch, _) = open(&f1);
        assert_eq!((last, epoch), (3, 7));
        // Another session at the same cursor gets the very same bytes.
        let (_, _, f2) = take_frame(&s, &c, 7, 1);
        assert_eq!(f1.as_ptr(), f2.as_ptr(), "built once, shared");
        let (msgs, next, _) = take_frame(&s, &c, 7, 3);
        assert_eq!((msgs, next), (vec!["c".to_string()], 4));
        assert!(matches!(s.take(&c, 7, 4), Take::Nothing));
    }

    #[test]
    fn duplicates_are_dropped_and_early_messages_wait_for_the_gap() {
        let c = cfg();
        let s = RoomStream::new("r".into());
        let t0 = Instant::now();
        push(&s, &c, 1, vec![e(1, "a")], t0);
        let a = push(&s, &c, 1, vec![e(1, "a"), e(3, "c")], t0);
        assert_eq!((a.duplicates, a.early, a.appended), (1, 1, 0));
        assert_eq!(s.position(), (1, 2));
        // The gap fills: both go in, in order.
        let a = push(&s, &c, 1, vec![e(2, "b")], t0);
        assert_eq!(a.appended, 2);
        let (msgs, next, _) = take_frame(&s, &c, 1, 1);
        assert_eq!((msgs.len(), next), (3, 4));
        // A gap that never fills is skipped after the wait.
        push(&s, &c, 1, vec![e(6, "f")], t0);
        assert_eq!(s.expire_gaps(&c, t0 + Duration::from_millis(50)).skipped, 0);
        let a = s.expire_gaps(&c, t0 + Duration::from_millis(100));
        assert_eq!((a.appended, a.skipped), (1, 2));
        // Frames never span a gap: the writer at 4 gets 6 alone.
        let (msgs, next, f) = take_frame(&s, &c, 1, 4);
        assert_eq!((msgs, next, open(&f).1), (vec!["f".to_string()], 7, 6));
    }

    /// Two job nodes push one room: the later offsets of a new epoch may
    /// arrive first. A stream that saw the epoch begin puts the earlier
    /// ones before them instead of dropping them as already seen.
    #[test]
    fn an_epoch_seen_from_its_start_keeps_earlier_offsets_that_arrive_late() {
        let c = cfg();
        let now = Instant::now();
        let s = RoomStream::new("r".into());
        let fresh = s.created_ms + 5;
        let a = push(&s, &c, fresh, vec![e(4, "d"), e(5, "e")], now);
        assert_eq!((a.appended, a.early), (0, 2), "4 and 5 wait for 1..=3");
        let a = push(&s, &c, fresh, vec![e(2, "b"), e(3, "c"), e(1, "a")], now);
        assert_eq!((a.appended, a.duplicates), (5, 0));
        assert_eq!(s.position(), (fresh, 6));
        // A newer epoch on a stream that followed the older one: from 1 too.
        let a = push(&s, &c, fresh + 1, vec![e(2, "y")], now);
        assert_eq!((a.appended, a.early), (0, 1));
        let a = push(&s, &c, fresh + 1, vec![e(1, "x")], now);
        assert_eq!((a.appended, a.duplicates), (2, 0));
        // An epoch older than the stream here was joined midway: it starts
        // where its first message does (nothing before it is coming).
        let joined = RoomStream::new("q".into());
        let old = joined.created_ms - 60_000;
        let a = push(&joined, &c, old, vec![e(500, "m")], now);
        assert_eq!((a.appended, joined.position()), (1, (old, 501)));
    }

    /// A job dies with messages in flight; the gap they leave is given up
    /// on after the reorder wait; NSQ redelivers them seconds later. They
    /// are handed back for delivery (out of order, not lost), once.
    #[test]
    fn a_late_arrival_for_a_gap_given_up_on_is_still_delivered_once() {
        let c = cfg();
        let s = RoomStream::new("r".into());
        let t0 = Instant::now();
        push(&s, &c, 3, vec![e(1, "a")], t0);
        push(&s, &c, 3, vec![e(5, "e")], t0);
        let later = t0 + c.reorder_wait * 2;
        let a = s.expire_gaps(&c, later);
        assert_eq!((a.appended, a.skipped), (1, 3), "2..=4 given up on");
        let mut stale = vec![];
        let a = s.push(&c, 3, vec![e(3, "c"), e(1, "a")], later, &mut stale);
        assert_eq!((a.late, a.duplicates), (1, 1));
        assert_eq!(stale.iter().map(|e| e.offset).collect::<Vec<_>>(), [3]);
        let mut stale = vec![];
        let a = s.push(
            &c,
            3,
            vec![e(3, "c"), e(2, "b"), e(4, "d")],
            later,
            &mut stale,
        );
        assert_eq!((a.late, a.duplicates), (2, 1), "3 only once");
        assert_eq!(stale.iter().map(|e| e.offset).collect::<Vec<_>>(), [2, 4]);
    }

    #[test]
    fn a_newer_epoch_restarts_the_stream_and_older_ones_are_stale() {
        let c = cfg();
        let s = RoomStream::new("r".into());
        let now = Instant::now();
        push(&s, &c, 5, vec![e(10, "a")], now);
        assert_eq!(
            s.position(),
            (5, 11),
            "a stream starts where its messages do"
        );
        push(&s, &c, 9, vec![e(1, "x")], now);
        assert!(matches!(
            s.take(&c, 5, 11),
            Take::Epoch { epoch: 9, next: 1 }
        ));
        let mut stale = vec![];
        let a = s.push(&c, 5, vec![e(11, "late")], now, &mut stale);
        assert_eq!((a.stale, stale.len()), (1, 1));
        let (msgs, _, _) = take_frame(&s, &c, 9, 1);
        assert_eq!(msgs, vec!["x".to_string()]);
    }

    /// Redis restarts: logic starts a new epoch while messages of the old
    /// one are still on their way through two job nodes. What waited for a
    /// gap of the old epoch, and what a busy writer had not taken yet, still
    /// reaches the writers in the old epoch, in order, before they move on.
    #[test]
    fn a_new_epoch_keeps_the_old_ones_tail_for_the_writers_still_in_it() {
        let c = cfg();
        let s = RoomStream::new("r".into());
        let now = Instant::now();
        push(&s, &c, 5, vec![e(1, "a"), e(2, "b")], now);
        // 4 arrives before 3 (two jobs); then the new epoch's first message.
        assert_eq!(push(&s, &c, 5, vec![e(4, "d")], now).early, 1);
        let a = push(&s, &c, 9, vec![e(1, "x")], now);
        assert_eq!(
            (a.appended, a.skipped),
            (2, 1),
            "4 given up waiting for 3; x"
        );
        // A writer that had taken only "a" gets b, then d, then moves on.
        let (msgs, next, _) = take_frame(&s, &c, 5, 2);
        assert_eq!((msgs, next), (vec!["b".to_string()], 3));
        let (msgs, next, _) = take_frame(&s, &c, 5, 3);
        assert_eq!((msgs, next), (vec!["d".to_string()], 5));
        assert!(matches!(
            s.take(&c, 5, 5),
            Take::Epoch { epoch: 9, next: 1 }
        ));
        let (msgs, _, _) = take_frame(&s, &c, 9, 1);
        assert_eq!(msgs, vec!["x".to_string()]);
        // The old epoch's late 3 goes out once, as its own frame; a second
        // copy of anything it held is a duplicate.
        let mut stale = vec![];
        let a = s.push(
            &c,
            5,
            vec![e(3, "c"), e(2, "b"), e(3, "c")],
            now,
            &mut stale,
        );
        assert_eq!((a.stale, a.duplicates), (1, 2));
        assert_eq!(stale.iter().map(|e| e.offset).collect::<Vec<_>>(), [3]);
    }

    #[test]
    fn a_stream_told_where_a_session_goes_on_keeps_earlier_late_arrivals() {
        let c = cfg();
        let s = RoomStream::new("r".into());
        let now = Instant::now();
        s.expect(&c, 4, 10);
        // 12 arrives first (another job node was quicker): it waits.
        assert_eq!(push(&s, &c, 4, vec![e(12, "c")], now).early, 1);
        assert_eq!(
            push(&s, &c, 4, vec![e(10, "a"), e(11, "b")], now).appended,
            3
        );
        let (msgs, next, _) = take_frame(&s, &c, 4, 10);
        assert_eq!((msgs.len(), next), (3, 13));
        // An older epoch never rewinds it.
        s.expect(&c, 3, 1);
        assert_eq!(s.position(), (4, 13));
    }

    #[test]
    fn bounds_drop_the_oldest_and_say_whether_an_important_one_was_lost() {
        let c = StreamConfig {
            retain_messages: 3,
            ..cfg()
        };
        let s = RoomStream::new("r".into());
        let now = Instant::now();
        push(
            &s,
            &c,
            1,
            vec![e(1, "a"), e(2, "b"), e(3, "c"), e(4, "d")],
            now,
        );
        assert!(matches!(
            s.take(&c, 1, 1),
            Take::Lost {
                from: 1,
                next: 2,
                important: false
            }
        ));
        let mut imp = e(5, "IMP");
        imp.level = MsgLevel::Important;
        push(&s, &c, 1, vec![imp, e(6, "f"), e(7, "g"), e(8, "h")], now);
        assert!(matches!(
            s.take(&c, 1, 2),
            Take::Lost {
                from: 2,
                next: 6,
                important: true
            }
        ));
        assert!(matches!(
            s.take(&c, 1, 6),
            Take::Frame {
                next: 9,
                messages: 3,
                ..
            }
        ));
    }

    #[test]
    fn frames_are_cut_to_the_budget_and_carry_the_level() {
        let c = StreamConfig {
            max_frame_bytes: 10,
            ..cfg()
        };
        let s = RoomStream::new("r".into());
        let mut imp = e(2, "bbbb");
        imp.level = MsgLevel::Important;
        let now = Instant::now();
        push(&s, &c, 1, vec![e(1, "aaaa"), imp, e(3, "cccc")], now);
        // 8 bytes each encoded: one per frame within 10 bytes.
        let (msgs, next, f) = take_frame(&s, &c, 1, 1);
        assert_eq!((msgs.len(), next, open(&f).3), (1, 2, 0));
        let (_, next, f) = take_frame(&s, &c, 1, 2);
        assert_eq!((next, open(&f).3), (3, MsgLevel::Important as i32));
        let fs = frames_of(&c, "r", 1, &[e(7, "x"), e(8, "y"), e(10, "z")]);
        let opened: Vec<_> = fs.iter().map(open).map(|(m, last, ..)| (m, last)).collect();
        assert_eq!(
            opened,
            vec![
                (vec!["x".to_string(), "y".to_string()], 8),
                (vec!["z".to_string()], 10)
            ]
        );
    }

    #[test]
    fn streams_linger_after_the_last_member_then_go() {
        let c = StreamConfig {
            linger: Duration::ZERO,
            ..cfg()
        };
        let all = Streams::new(c, 4);
        let s = all.subscribe("r");
        all.sweep(Instant::now());
        assert!(all.get("r").is_some(), "a member keeps it");
        all.unsubscribe(&s);
        all.sweep(Instant::now());
        assert!(all.get("r").is_none());
    }
}

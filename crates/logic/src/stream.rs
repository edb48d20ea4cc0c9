//! Room streams: each room's messages form one ordered sequence, numbered
//! here — once, when logic accepts them — so that every conn node and every
//! receiver sees the same offsets. An offset counts the room's messages from
//! 1 within an **epoch**; the epoch changes when the sequence restarts (a
//! standalone process restarts, Redis loses the room's keys, a room idle
//! past `stream.idle_ttl`), so a client can tell that offsets are not
//! comparable. Epochs are the wall-clock milliseconds of the restart, so a
//! newer epoch is a larger number.
//!
//! The recent messages of each stream are kept as well (bounded by count
//! and bytes), for sessions that missed more than their conn node retains.
//!
//! Kept in memory for one logic node (standalone), in Redis when several
//! logic nodes must agree (whenever `presence.kind = "redis"`). Redis
//! layout, under `presence.prefix`: `stream:<room>:seq` (the last offset),
//! `stream:<room>:epoch`, `stream:<room>:log` (a list of encoded
//! [`RoomHistoryEntry`] without their offsets: the list is consecutive and
//! ends at the last offset). A Lua script appends atomically, so two logic
//! nodes never hand out the same offset.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use chatroom_common::proto::logic::{RoomHistoryEntry, RoomHistoryReply};
use prost::Message as _;
use redis::aio::ConnectionManager;
use serde::Deserialize;

use crate::config::{PresenceConfig, PresenceKind};

/// Most entries one history call answers.
pub const MAX_HISTORY_PAGE: u32 = 4096;
/// Most payload bytes one history call answers (gRPC messages are limited
/// to 4 MiB); a caller pages on from the last entry it got.
pub const MAX_HISTORY_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis reply: {0}")]
    Reply(#[from] redis::ParsingError),
    #[error("stream history entry undecodable: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("presence.url is not a valid Redis URL")]
    BadUrl,
}

/// `[stream]`: how much of each room's stream logic keeps for recovery.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    /// Messages kept per room (0: none, recovery then relies on conn).
    pub history_messages: usize,
    /// Bytes of payload kept per room (memory store; Redis counts messages).
    pub history_bytes: usize,
    /// A room idle this long starts a new epoch (Redis keys expire).
    #[serde(deserialize_with = "chatroom_common::config::duration")]
    pub idle_ttl: Duration,
}

/// One message to number: its level and payload, kept in the history.
#[derive(Debug, Clone)]
pub struct Entry {
    pub level: i32,
    pub data: Bytes,
}

/// Where the numbers of an appended run start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Numbered {
    pub epoch: u64,
    /// The offset of the first message appended; the others follow.
    pub first: u64,
}

#[derive(Clone)]
pub enum Streams {
    Memory(Arc<MemoryStreams>),
    Redis(RedisStreams),
}

impl Streams {
    /// The store that goes with the presence store: one logic node keeps
    /// streams in memory, several share Redis.
    pub async fn connect(p: &PresenceConfig, s: &StreamConfig) -> Result<Self, StreamError> {
        match p.kind {
            PresenceKind::Memory => Ok(Streams::Memory(Arc::new(MemoryStreams::new(s.clone())))),
            PresenceKind::Redis => Ok(Streams::Redis(RedisStreams::connect(p, s).await?)),
        }
    }

    /// Numbers `entries` (one room's, in order) as the next offsets of the
    /// room's stream and keeps them in its history.
    pub async fn append(&self, room: &str, entries: &[Entry]) -> Result<Numbered, StreamError> {
        match self {
            Streams::Memory(m) => Ok(m.append(room, entries)),
            Streams::Redis(r) => r.append(room, entries).await,
        }
    }

    /// The kept messages of `room` with offsets in `(after, until]`
    /// (`until` 0: up to the newest), at most `limit`.
    pub async fn history(
        &self,
        room: &str,
        epoch: u64,
        after: u64,
        until: u64,
        limit: u32,
    ) -> Result<RoomHistoryReply, StreamError> {
        let limit = limit.clamp(1, MAX_HISTORY_PAGE);
        match self {
            Streams::Memory(m) => Ok(m.history(room, epoch, after, until, limit)),
            Streams::Redis(r) => r.history(room, epoch, after, until, limit).await,
        }
    }
}

// ---------------------------------------------------------------- memory

struct MemRoom {
    epoch: u64,
    last: u64,
    kept: VecDeque<RoomHistoryEntry>,
    bytes: usize,
}

/// Streams of one logic node, sharded by room so no lock is global.
pub struct MemoryStreams {
    cfg: StreamConfig,
    /// The epoch of every stream this process starts.
    epoch: u64,
    shards: Box<[Mutex<HashMap<String, MemRoom>>]>,
    hasher: RandomState,
}

impl MemoryStreams {
    pub fn new(cfg: StreamConfig) -> Self {
        MemoryStreams {
            cfg,
            epoch: crate::id::now_ms(),
            shards: (0..16).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
        }
    }

    fn shard(&self, room: &str) -> MutexGuard<'_, HashMap<String, MemRoom>> {
        let i = (self.hasher.hash_one(room) % self.shards.len() as u64) as usize;
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn append(&self, room: &str, entries: &[Entry]) -> Numbered {
        let mut shard = self.shard(room);
        let r = shard.entry(room.to_string()).or_insert_with(|| MemRoom {
            epoch: self.epoch,
            last: 0,
            kept: VecDeque::new(),
            bytes: 0,
        });
        let first = r.last + 1;
        r.last += entries.len() as u64;
        if self.cfg.history_messages > 0 {
            for e in entries {
                r.bytes += e.data.len();
                r.kept.push_back(RoomHistoryEntry {
                    offset: 0,
                    level: e.level,
                    data: e.data.clone(),
                });
            }
            while r.kept.len() > self.cfg.history_messages
                || (r.bytes > self.cfg.history_bytes && r.kept.len() > 1)
            {
                if let Some(old) = r.kept.pop_front() {
                    r.bytes -= old.data.len();
                }
            }
        }
        Numbered {
            epoch: r.epoch,
            first,
        }
    }

    pub fn history(
        &self,
        room: &str,
        epoch: u64,
        after: u64,
        until: u64,
        limit: u32,
    ) -> RoomHistoryReply {
        let shard = self.shard(room);
        let Some(r) = shard.get(room) else {
            return RoomHistoryReply::default();
        };
        let first_kept = r.last + 1 - r.kept.len() as u64;
        let until = if until == 0 {
            r.last
        } else {
            until.min(r.last)
        };
        let from = (after + 1).max(first_kept);
        let mut entries = Vec::new();
        if epoch == r.epoch && epoch != 0 && from <= until {
            let mut bytes = 0;
            let skip = (from - first_kept) as usize;
            for (i, e) in r.kept.iter().enumerate().skip(skip) {
                let offset = first_kept + i as u64;
                bytes += e.data.len();
                if offset > until
                    || entries.len() as u32 >= limit
                    || (!entries.is_empty() && bytes > MAX_HISTORY_BYTES)
                {
                    break;
                }
                entries.push(RoomHistoryEntry {
                    offset,
                    ..e.clone()
                });
            }
        }
        RoomHistoryReply {
            epoch: r.epoch,
            last_offset: r.last,
            complete: epoch == r.epoch && (after >= until || first_kept <= after + 1),
            entries,
        }
    }
}

// ---------------------------------------------------------------- redis

/// KEYS: seq, epoch, log. ARGV: now_ms, history count, idle ttl secs,
/// then the entries. Answers {epoch, last offset}.
const APPEND: &str = r#"
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  epoch = ARGV[1]
  redis.call('SET', KEYS[2], epoch)
  redis.call('DEL', KEYS[1], KEYS[3])
end
local n = #ARGV - 3
local last = redis.call('INCRBY', KEYS[1], n)
local keep = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
if keep > 0 then
  for i = 4, #ARGV, 1000 do
    redis.call('RPUSH', KEYS[3], unpack(ARGV, i, math.min(i + 999, #ARGV)))
  end
  redis.call('LTRIM', KEYS[3], -keep, -1)
  redis.call('EXPIRE', KEYS[3], ttl)
end
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
return {epoch, last}
"#;

/// KEYS: seq, epoch, log. ARGV: first and last list index wanted (from
/// the end: the list ends at the last offset). Answers {epoch, last, len,
/// items}.
const READ: &str = r#"
local epoch = redis.call('GET', KEYS[2])
if not epoch then return {'0', 0, 0, {}, 0} end
local last = tonumber(redis.call('GET', KEYS[1]) or '0')
local len = redis.call('LLEN', KEYS[3])
local from = tonumber(ARGV[1])
local to = tonumber(ARGV[2])
local first = last - len + 1
if from < first then from = first end
if to > last then to = last end
local items = {}
if from <= to then
  items = redis.call('LRANGE', KEYS[3], from - first, to - first)
end
return {epoch, last, len, items, from}
"#;

#[derive(Clone)]
pub struct RedisStreams {
    conn: ConnectionManager,
    prefix: String,
    cfg: StreamConfig,
    append: Arc<redis::Script>,
    read: Arc<redis::Script>,
}

impl RedisStreams {
    pub async fn connect(p: &PresenceConfig, s: &StreamConfig) -> Result<Self, StreamError> {
        let client = redis::Client::open(p.url.as_str()).map_err(|_| StreamError::BadUrl)?;
        let conn = client
            .get_connection_manager_with_config(crate::presence::manager_config())
            .await?;
        Ok(RedisStreams {
            conn,
            prefix: p.prefix.clone(),
            cfg: s.clone(),
            append: Arc::new(redis::Script::new(APPEND)),
            read: Arc::new(redis::Script::new(READ)),
        })
    }

    fn keys(&self, room: &str) -> [String; 3] {
        let p = &self.prefix;
        [
            format!("{p}stream:{room}:seq"),
            format!("{p}stream:{room}:epoch"),
            format!("{p}stream:{room}:log"),
        ]
    }

    async fn append(&self, room: &str, entries: &[Entry]) -> Result<Numbered, StreamError> {
        let [seq, epoch, log] = self.keys(room);
        let mut inv = self.append.key(seq);
        inv.key(epoch)
            .key(log)
            .arg(crate::id::now_ms())
            .arg(self.cfg.history_messages)
            .arg(self.cfg.idle_ttl.as_secs().max(1));
        for e in entries {
            let item = RoomHistoryEntry {
                offset: 0,
                level: e.level,
                data: e.data.clone(),
            };
            inv.arg(item.encode_to_vec());
        }
        let mut conn = self.conn.clone();
        let (epoch, last): (String, u64) = inv.invoke_async(&mut conn).await?;
        Ok(Numbered {
            epoch: epoch.parse().unwrap_or(0),
            first: last + 1 - entries.len() as u64,
        })
    }

    async fn history(
        &self,
        room: &str,
        epoch: u64,
        after: u64,
        until: u64,
        limit: u32,
    ) -> Result<RoomHistoryReply, StreamError> {
        let [seq, ekey, log] = self.keys(room);
        let from = after + 1;
        let to = if until == 0 { 1u64 << 52 } else { until };
        let to = to.min(from + u64::from(limit) - 1);
        let mut conn = self.conn.clone();
        let (e, last, len, items, start): (String, u64, u64, Vec<Vec<u8>>, u64) = self
            .read
            .key(seq)
            .key(ekey)
            .key(log)
            .arg(from)
            .arg(to)
            .invoke_async(&mut conn)
            .await?;
        let e: u64 = e.parse().unwrap_or(0);
        if e == 0 {
            return Ok(RoomHistoryReply::default());
        }
        let first_kept = last + 1 - len;
        let mut reply = RoomHistoryReply {
            epoch: e,
            last_offset: last,
            complete: epoch == e && (after >= last.min(to) || first_kept <= after + 1),
            entries: Vec::new(),
        };
        if epoch == e {
            let mut bytes = 0;
            for (i, raw) in items.into_iter().enumerate() {
                let mut entry = RoomHistoryEntry::decode(raw.as_slice())?;
                entry.offset = start + i as u64;
                bytes += entry.data.len();
                if !reply.entries.is_empty() && bytes > MAX_HISTORY_BYTES {
                    break;
                }
                reply.entries.push(entry);
            }
        }
        Ok(reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(n: usize, bytes: usize) -> StreamConfig {
        StreamConfig {
            history_messages: n,
            history_bytes: bytes,
            idle_ttl: Duration::from_secs(60),
        }
    }

    fn e(s: &'static str) -> Entry {
        Entry {
            level: 0,
            data: Bytes::from_static(s.as_bytes()),
        }
    }

    fn datas(r: &RoomHistoryReply) -> Vec<(u64, &[u8])> {
        r.entries
            .iter()
            .map(|e| (e.offset, e.data.as_ref()))
            .collect()
    }

    #[test]
    fn offsets_are_consecutive_per_room_and_history_is_bounded() {
        let m = MemoryStreams::new(cfg(3, 1 << 20));
        let a = m.append("r", &[e("a"), e("b")]);
        assert_eq!(a.first, 1);
        assert_eq!(m.append("other", &[e("x")]).first, 1);
        let b = m.append("r", &[e("c"), e("d")]);
        assert_eq!((b.first, b.epoch), (3, a.epoch));
        // Kept: b, c, d (3 messages).
        let h = m.history("r", a.epoch, 0, 0, 100);
        assert!(!h.complete, "offset 1 is gone");
        assert_eq!(datas(&h), vec![(2, &b"b"[..]), (3, b"c"), (4, b"d")]);
        let h = m.history("r", a.epoch, 2, 0, 100);
        assert!(h.complete);
        assert_eq!(datas(&h), vec![(3, &b"c"[..]), (4, b"d")]);
        let h = m.history("r", a.epoch, 1, 3, 100);
        assert_eq!(
            (h.complete, datas(&h)),
            (true, vec![(2, &b"b"[..]), (3, b"c")])
        );
        let h = m.history("r", a.epoch, 1, 0, 1);
        assert_eq!(datas(&h), vec![(2, &b"b"[..])]);
        // Another epoch: nothing, not complete.
        let h = m.history("r", a.epoch + 1, 1, 0, 100);
        assert!(!h.complete && h.entries.is_empty());
        assert_eq!(h.last_offset, 4);
        // Nothing missed: complete.
        assert!(m.history("r", a.epoch, 4, 0, 100).complete);
    }

    #[test]
    fn history_is_bounded_by_bytes() {
        let m = MemoryStreams::new(cfg(100, 2));
        let a = m.append("r", &[e("aa"), e("bb")]);
        let h = m.history("r", a.epoch, 0, 0, 100);
        assert_eq!(datas(&h), vec![(2, &b"bb"[..])]);
    }
}

//! Presence: which sessions are signed in where, and how many sessions each
//! conn node has per room (so `MEMBERS` can answer a cluster-wide count).
//!
//! Everything expires: a session not renewed by a heartbeat within
//! `session_ttl`, and a conn node's counts not reported again within
//! `online_ttl` — so a node that dies without saying goodbye drops out
//! of the totals on its own. In memory for one logic node (standalone), in
//! Redis when several logic nodes must agree.
//!
//! Redis layout (every key under `presence.prefix`, default `chatroom:`):
//! - `user:<uid>`: hash, session key -> `<server>|<room>`, EXPIRE session ttl
//!   (a heartbeat renews the whole hash: per-field expiry needs Redis 7.4);
//! - `online:<server>`: hash, room -> sessions on that conn node, EXPIRE online ttl;
//! - `online:servers`: set of the servers that reported; members whose hash
//!   has expired are removed when totals are computed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::time::Instant;

use crate::config::{PresenceConfig, PresenceKind};

#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    #[error("redis: {0}")]
    Redis(redis::RedisError),
    #[error("redis reply: {0}")]
    Reply(redis::ParsingError),
    #[error("presence.url is not a valid Redis URL")]
    BadUrl,
}

// Every backend failure passes through these (the `?` after each Redis
// call), so they count `chatroom_logic_presence_errors`.
impl From<redis::RedisError> for PresenceError {
    fn from(e: redis::RedisError) -> Self {
        crate::metrics::LOGIC.presence_errors.inc();
        PresenceError::Redis(e)
    }
}

impl From<redis::ParsingError> for PresenceError {
    fn from(e: redis::ParsingError) -> Self {
        crate::metrics::LOGIC.presence_errors.inc();
        PresenceError::Reply(e)
    }
}

/// One signed-in connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub uid: String,
    /// Unique per connection.
    pub key: String,
    /// The conn node holding the connection.
    pub server: String,
    pub room: String,
}

/// Per-room session counts, room id -> count.
pub type RoomCounts = HashMap<String, u32>;
/// Cluster-wide totals, room id -> count.
pub type RoomTotals = HashMap<String, u64>;

/// The presence store chosen by config.
#[derive(Clone)]
pub enum Presence {
    Memory(Arc<MemoryPresence>),
    Redis(RedisPresence),
}

impl Presence {
    /// Opens the configured store; with Redis, fails now if it is unreachable.
    pub async fn connect(cfg: &PresenceConfig) -> Result<Self, PresenceError> {
        match cfg.kind {
            PresenceKind::Memory => Ok(Presence::Memory(Arc::new(MemoryPresence::new(
                cfg.session_ttl,
                cfg.online_ttl,
            )))),
            PresenceKind::Redis => Ok(Presence::Redis(RedisPresence::connect(cfg).await?)),
        }
    }

    /// Records a session (or replaces one with the same key).
    pub async fn sign_in(&self, s: &Session) -> Result<(), PresenceError> {
        match self {
            Presence::Memory(m) => {
                m.sign_in(s, Instant::now());
                Ok(())
            }
            Presence::Redis(r) => r.sign_in(s).await,
        }
    }

    /// Forgets a session; unknown ones are ignored.
    pub async fn sign_out(&self, uid: &str, key: &str) -> Result<(), PresenceError> {
        match self {
            Presence::Memory(m) => {
                m.sign_out(uid, key);
                Ok(())
            }
            Presence::Redis(r) => r.sign_out(uid, key).await,
        }
    }

    /// Renews a session; `false` when it was not known (expired or never seen).
    pub async fn heartbeat(&self, uid: &str, key: &str) -> Result<bool, PresenceError> {
        match self {
            Presence::Memory(m) => Ok(m.heartbeat(uid, key, Instant::now())),
            Presence::Redis(r) => r.heartbeat(uid, key).await,
        }
    }

    /// The live sessions of a user.
    pub async fn sessions(&self, uid: &str) -> Result<Vec<Session>, PresenceError> {
        match self {
            Presence::Memory(m) => Ok(m.sessions(uid, Instant::now())),
            Presence::Redis(r) => r.sessions(uid).await,
        }
    }

    /// The conn nodes where a user has live sessions, sorted, no repeats
    /// (empty: offline).
    pub async fn servers_of(&self, uid: &str) -> Result<Vec<String>, PresenceError> {
        Ok(servers(self.sessions(uid).await?))
    }

    /// [`Presence::servers_of`] for many users at once (one Redis round trip).
    pub async fn servers_of_many(
        &self,
        uids: &[String],
    ) -> Result<Vec<Vec<String>>, PresenceError> {
        match self {
            Presence::Memory(m) => {
                let now = Instant::now();
                Ok(uids.iter().map(|u| servers(m.sessions(u, now))).collect())
            }
            Presence::Redis(r) => r.servers_of_many(uids).await,
        }
    }

    /// Replaces `server`'s per-room counts and answers the cluster totals
    /// (every live server) for the same rooms.
    pub async fn report_online(
        &self,
        server: &str,
        rooms: &RoomCounts,
    ) -> Result<RoomTotals, PresenceError> {
        match self {
            Presence::Memory(m) => Ok(m.report_online(server, rooms, Instant::now())),
            Presence::Redis(r) => r.report_online(server, rooms).await,
        }
    }
}

fn servers(sessions: Vec<Session>) -> Vec<String> {
    let mut out: Vec<String> = sessions.into_iter().map(|s| s.server).collect();
    out.sort();
    out.dedup();
    out
}

// ---------------------------------------------------------------- memory

struct Entry {
    server: String,
    room: String,
    expires: Instant,
}

struct ServerCounts {
    rooms: RoomCounts,
    expires: Instant,
}

/// In-process presence. Short critical sections on std mutexes, never held
/// across an `.await` (there is none inside).
pub struct MemoryPresence {
    session_ttl: Duration,
    online_ttl: Duration,
    /// uid -> (session key, entry). A list, not a map: a user has one or a
    /// few sessions, and a one-entry hash map costs ~0.3 KiB more per
    /// session than a one-entry list (measured with 19,000 sessions).
    sessions: Mutex<HashMap<String, Vec<(String, Entry)>>>,
    /// server -> its last report.
    online: Mutex<HashMap<String, ServerCounts>>,
}

/// A poisoned lock only means another request panicked mid-update; the maps
/// stay usable, so carry on rather than take the node down.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl MemoryPresence {
    pub fn new(session_ttl: Duration, online_ttl: Duration) -> Self {
        MemoryPresence {
            session_ttl,
            online_ttl,
            sessions: Mutex::new(HashMap::new()),
            online: Mutex::new(HashMap::new()),
        }
    }

    pub fn sign_in(&self, s: &Session, now: Instant) {
        let entry = Entry {
            server: s.server.clone(),
            room: s.room.clone(),
            expires: now + self.session_ttl,
        };
        let mut map = lock(&self.sessions);
        let user = map.entry(s.uid.clone()).or_default();
        // Drop this user's stale sessions while we hold the entry anyway.
        user.retain(|(k, e)| e.expires > now && *k != s.key);
        // One at a time: `push` alone would make room for four.
        user.reserve_exact(1);
        user.push((s.key.clone(), entry));
    }

    pub fn sign_out(&self, uid: &str, key: &str) {
        let mut map = lock(&self.sessions);
        if let Some(user) = map.get_mut(uid) {
            user.retain(|(k, _)| k != key);
            if user.is_empty() {
                map.remove(uid);
            }
        }
    }

    pub fn heartbeat(&self, uid: &str, key: &str, now: Instant) -> bool {
        let mut map = lock(&self.sessions);
        let found = map
            .get_mut(uid)
            .and_then(|u| u.iter_mut().find(|(k, _)| k == key));
        match found.map(|(_, e)| e) {
            Some(e) if e.expires > now => {
                e.expires = now + self.session_ttl;
                true
            }
            _ => false,
        }
    }

    pub fn sessions(&self, uid: &str, now: Instant) -> Vec<Session> {
        let map = lock(&self.sessions);
        let mut out: Vec<Session> = map
            .get(uid)
            .into_iter()
            .flatten()
            .filter(|(_, e)| e.expires > now)
            .map(|(key, e)| Session {
                uid: uid.to_string(),
                key: key.clone(),
                server: e.server.clone(),
                room: e.room.clone(),
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }

    pub fn report_online(&self, server: &str, rooms: &RoomCounts, now: Instant) -> RoomTotals {
        let mut online = lock(&self.online);
        online.insert(
            server.to_string(),
            ServerCounts {
                rooms: rooms
                    .iter()
                    .filter(|(_, n)| **n > 0)
                    .map(|(r, n)| (r.clone(), *n))
                    .collect(),
                expires: now + self.online_ttl,
            },
        );
        online.retain(|_, s| s.expires > now);
        rooms
            .keys()
            .map(|room| {
                let total = online
                    .values()
                    .filter_map(|s| s.rooms.get(room))
                    .map(|n| u64::from(*n))
                    .sum();
                (room.clone(), total)
            })
            .collect()
    }

    /// Forgets everything expired; run now and then so users and servers
    /// that went away without a word do not pile up.
    pub fn sweep(&self, now: Instant) {
        {
            let mut map = lock(&self.sessions);
            map.retain(|_, user| {
                user.retain(|(_, e)| e.expires > now);
                !user.is_empty()
            });
        }
        lock(&self.online).retain(|_, s| s.expires > now);
    }

    /// Users and servers currently held (tests, metrics).
    pub fn len(&self) -> (usize, usize) {
        (lock(&self.sessions).len(), lock(&self.online).len())
    }

    /// The period at which [`MemoryPresence::sweep`] is worth running.
    pub fn sweep_period(&self) -> Duration {
        self.online_ttl
            .min(self.session_ttl)
            .max(Duration::from_secs(1))
    }
}

// ---------------------------------------------------------------- redis

/// How logic talks to Redis (presence and room streams): bounded waits, so
/// a hung Redis turns into an error for the one request, not a stuck conn
/// node waiting on us.
pub(crate) fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(3)))
        .set_response_timeout(Some(Duration::from_secs(2)))
        .set_number_of_retries(2)
}

/// Presence in Redis, shared by every logic node.
#[derive(Clone)]
pub struct RedisPresence {
    conn: ConnectionManager,
    prefix: String,
    session_ttl: i64,
    online_ttl: i64,
}

impl RedisPresence {
    pub async fn connect(cfg: &PresenceConfig) -> Result<Self, PresenceError> {
        let client = redis::Client::open(cfg.url.as_str()).map_err(|_| PresenceError::BadUrl)?;
        let conn = client
            .get_connection_manager_with_config(manager_config())
            .await?;
        Ok(RedisPresence {
            conn,
            prefix: cfg.prefix.clone(),
            session_ttl: i64::try_from(cfg.session_ttl.as_secs()).unwrap_or(i64::MAX),
            online_ttl: i64::try_from(cfg.online_ttl.as_secs()).unwrap_or(i64::MAX),
        })
    }

    pub fn user_key(&self, uid: &str) -> String {
        format!("{}user:{uid}", self.prefix)
    }
    pub fn online_key(&self, server: &str) -> String {
        format!("{}online:{server}", self.prefix)
    }
    pub fn servers_key(&self) -> String {
        format!("{}online:servers", self.prefix)
    }

    async fn sign_in(&self, s: &Session) -> Result<(), PresenceError> {
        let k = self.user_key(&s.uid);
        redis::pipe()
            .atomic()
            .hset(&k, &s.key, format!("{}|{}", s.server, s.room))
            .ignore()
            .expire(&k, self.session_ttl)
            .ignore()
            .query_async::<()>(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    async fn sign_out(&self, uid: &str, key: &str) -> Result<(), PresenceError> {
        redis::cmd("HDEL")
            .arg(self.user_key(uid))
            .arg(key)
            .query_async::<()>(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    async fn heartbeat(&self, uid: &str, key: &str) -> Result<bool, PresenceError> {
        let k = self.user_key(uid);
        let (known, _): (bool, bool) = redis::pipe()
            .cmd("HEXISTS")
            .arg(&k)
            .arg(key)
            .expire(&k, self.session_ttl)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(known)
    }

    async fn sessions(&self, uid: &str) -> Result<Vec<Session>, PresenceError> {
        let all: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.user_key(uid))
            .query_async(&mut self.conn.clone())
            .await?;
        let mut out: Vec<Session> = all
            .into_iter()
            .map(|(key, v)| {
                let (server, room) = v.split_once('|').unwrap_or((v.as_str(), ""));
                Session {
                    uid: uid.to_string(),
                    server: server.to_string(),
                    room: room.to_string(),
                    key,
                }
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn servers_of_many(&self, uids: &[String]) -> Result<Vec<Vec<String>>, PresenceError> {
        if uids.is_empty() {
            return Ok(Vec::new());
        }
        let mut p = redis::pipe();
        for uid in uids {
            p.cmd("HVALS").arg(self.user_key(uid));
        }
        let all: Vec<Vec<String>> = p.query_async(&mut self.conn.clone()).await?;
        Ok(all
            .into_iter()
            .map(|values| {
                let mut out: Vec<String> = values
                    .iter()
                    .map(|v| v.split_once('|').map_or(v.as_str(), |(s, _)| s).to_string())
                    .collect();
                out.sort();
                out.dedup();
                out
            })
            .collect())
    }

    async fn report_online(
        &self,
        server: &str,
        rooms: &RoomCounts,
    ) -> Result<RoomTotals, PresenceError> {
        let mut conn = self.conn.clone();
        let mine = self.online_key(server);
        let servers_key = self.servers_key();

        // 1. Replace our counts atomically (readers never see them half
        //    written) and learn who else reported.
        let mut p = redis::pipe();
        p.atomic().del(&mine).ignore();
        let counts: Vec<(&str, u32)> = rooms
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(r, n)| (r.as_str(), *n))
            .collect();
        if !counts.is_empty() {
            p.cmd("HSET").arg(&mine).arg(&counts).ignore();
            p.expire(&mine, self.online_ttl).ignore();
        }
        p.sadd(&servers_key, server).ignore();
        // The set only matters while someone reports; let it go with them.
        p.expire(&servers_key, self.online_ttl).ignore();
        p.smembers(&servers_key);
        let (servers,): (Vec<String>,) = p.query_async(&mut conn).await?;
        if rooms.is_empty() {
            return Ok(RoomTotals::new());
        }

        // 2. Everyone's counts for the asked rooms, and whether each server's
        //    hash still exists (expired = that conn node is gone).
        let room_ids: Vec<&String> = rooms.keys().collect();
        let mut p = redis::pipe();
        for s in &servers {
            let k = self.online_key(s);
            p.exists(&k);
            p.cmd("HMGET").arg(&k).arg(&room_ids);
        }
        let replies: Vec<redis::Value> = p.query_async(&mut conn).await?;
        let mut totals: RoomTotals = room_ids.iter().map(|r| ((*r).clone(), 0)).collect();
        let mut gone = Vec::new();
        for (s, pair) in servers.iter().zip(replies.chunks(2)) {
            let [exists, counts] = pair else { break };
            if !redis::from_redis_value_ref::<bool>(exists)? {
                // Our own entry can be absent too when we have no sessions;
                // SADD puts it back on the next report.
                gone.push(s.as_str());
                continue;
            }
            let counts: Vec<Option<u64>> = redis::from_redis_value_ref(counts)?;
            for (room, n) in room_ids.iter().zip(counts) {
                if let (Some(n), Some(t)) = (n, totals.get_mut(room.as_str())) {
                    *t += n;
                }
            }
        }

        // 3. Forget servers whose counts expired, so the set stays small.
        if !gone.is_empty() {
            redis::cmd("SREM")
                .arg(&servers_key)
                .arg(&gone)
                .query_async::<()>(&mut conn)
                .await?;
        }
        Ok(totals)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(pairs: &[(&str, u32)]) -> RoomCounts {
        pairs.iter().map(|(r, n)| (r.to_string(), *n)).collect()
    }

    #[test]
    fn totals_sum_over_servers_and_replace_old_reports() {
        let p = MemoryPresence::new(Duration::from_secs(90), Duration::from_secs(15));
        let t0 = Instant::now();
        p.report_online("conn-a", &counts(&[("r1", 3), ("r2", 1)]), t0);
        let totals = p.report_online("conn-b", &counts(&[("r1", 4), ("r3", 0)]), t0);
        assert_eq!(totals.get("r1"), Some(&7));
        assert_eq!(totals.get("r3"), Some(&0));
        assert_eq!(totals.get("r2"), None, "only the asked rooms are answered");

        // conn-a's new report replaces its old one: r1 is gone from it.
        let totals = p.report_online("conn-a", &counts(&[("r2", 5)]), t0);
        assert_eq!(totals.get("r2"), Some(&5));
        let totals = p.report_online("conn-b", &counts(&[("r1", 4), ("r2", 0)]), t0);
        assert_eq!(totals.get("r1"), Some(&4));
        assert_eq!(totals.get("r2"), Some(&5));
    }

    #[test]
    fn a_silent_server_drops_out_of_the_totals() {
        let p = MemoryPresence::new(Duration::from_secs(90), Duration::from_secs(15));
        let t0 = Instant::now();
        p.report_online("conn-dead", &counts(&[("r", 10)]), t0);
        let totals = p.report_online("conn-live", &counts(&[("r", 1)]), t0);
        assert_eq!(totals.get("r"), Some(&11));
        // conn-live keeps reporting, conn-dead does not.
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(
            p.report_online("conn-live", &counts(&[("r", 1)]), t1)
                .get("r"),
            Some(&11)
        );
        let t2 = t0 + Duration::from_secs(16);
        assert_eq!(
            p.report_online("conn-live", &counts(&[("r", 1)]), t2)
                .get("r"),
            Some(&1)
        );
        assert_eq!(p.len().1, 1, "the dead server's entry is gone");
    }

    #[tokio::test]
    async fn servers_of_a_user() {
        let p = Presence::Memory(Arc::new(MemoryPresence::new(
            Duration::from_secs(90),
            Duration::from_secs(15),
        )));
        let s = |key: &str, server: &str| Session {
            uid: "7".into(),
            key: key.into(),
            server: server.into(),
            room: String::new(),
        };
        assert!(p.servers_of("7").await.expect("memory").is_empty());
        for (k, srv) in [("k1", "conn-b"), ("k2", "conn-a"), ("k3", "conn-b")] {
            p.sign_in(&s(k, srv)).await.expect("memory");
        }
        assert_eq!(
            p.servers_of("7").await.expect("memory"),
            ["conn-a", "conn-b"]
        );
        let many = p
            .servers_of_many(&["7".into(), "8".into()])
            .await
            .expect("memory");
        assert_eq!(
            many,
            vec![vec!["conn-a".to_string(), "conn-b".into()], vec![]]
        );
    }

    #[test]
    fn sessions_expire_unless_renewed() {
        let p = MemoryPresence::new(Duration::from_secs(90), Duration::from_secs(15));
        let t0 = Instant::now();
        let s = |key: &str| Session {
            uid: "alice".into(),
            key: key.into(),
            server: "conn-a".into(),
            room: "r".into(),
        };
        p.sign_in(&s("k1"), t0);
        p.sign_in(&s("k2"), t0);
        assert_eq!(p.sessions("alice", t0), vec![s("k1"), s("k2")]);

        let t1 = t0 + Duration::from_secs(60);
        assert!(p.heartbeat("alice", "k1", t1));
        assert!(!p.heartbeat("alice", "nope", t1));
        let t2 = t0 + Duration::from_secs(100);
        assert_eq!(p.sessions("alice", t2), vec![s("k1")], "k2 was not renewed");
        assert!(
            !p.heartbeat("alice", "k2", t2),
            "an expired session is not revived"
        );

        p.sign_out("alice", "k1");
        assert!(p.sessions("alice", t2).is_empty());
        assert_eq!(p.len().0, 1, "expired k2 is still held until a sweep");
        p.sweep(t2);
        assert_eq!(p.len().0, 0, "an empty user is removed");

        p.sign_in(&s("k3"), t0);
        p.report_online("conn-a", &counts(&[("r", 1)]), t0);
        p.sweep(t0 + Duration::from_secs(200));
        assert_eq!(p.len(), (0, 0), "sweep forgets expired users and servers");
    }
}

//! logic's typed configuration (see `default.toml` for every key and its
//! default, `deploy/logic.toml` for the cluster settings).

use std::net::SocketAddr;
use std::time::Duration;

use chatroom_common::config::{
    ConfigError, GrpcConfig, LogConfig, NodeConfig, TokenConfig, Validate, check_duration,
    check_whole_seconds,
};
use chatroom_discovery::DiscoveryConfig;
use chatroom_queue::QueueConfig;
use serde::Deserialize;

use crate::id;

/// The built-in defaults (standalone-friendly), lowest config layer.
pub const DEFAULTS: &str = include_str!("default.toml");

/// Everything logic reads at start-up.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogicConfig {
    pub node: NodeConfig,
    pub log: LogConfig,
    /// The gRPC server conn nodes call.
    pub grpc: GrpcConfig,
    pub http: HttpConfig,
    pub token: TokenConfig,
    pub discovery: DiscoveryConfig,
    pub queue: QueueConfig,
    pub presence: PresenceConfig,
    /// Room streams: what is kept for recovery (see `stream`).
    pub stream: crate::stream::StreamConfig,
    pub limits: LimitsConfig,
    /// The IM database.
    pub store: StoreConfig,
    /// IM rules: uploads, message limits, rate limits.
    pub im: ImConfig,
    /// Heartbeat period told to conn (and through it to clients), in
    /// whole seconds.
    #[serde(deserialize_with = "chatroom_common::config::duration")]
    pub heartbeat: Duration,
    /// How long shutdown waits for in-flight requests.
    #[serde(deserialize_with = "chatroom_common::config::duration")]
    pub shutdown_grace: Duration,
    /// Node number inside message ids (0..=1023); -1 derives it from the
    /// node id, which may collide between two nodes (1 in 1024).
    pub id_node: i32,
}

/// The HTTP API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub addr: SocketAddr,
    /// Largest request body; more is answered 413.
    pub max_body_bytes: usize,
    /// Serve `POST /tk`, which hands a token to anyone who asks.
    pub test_token: bool,
    /// `Authorization` value of `POST /admin/broadcast`; empty: route disabled.
    pub admin_token: String,
    /// Folder of the web pages served at `/web/` (its sibling `api/` at
    /// `/api/`); relative to the working directory; empty: not served.
    pub web_dir: String,
}

/// The IM database.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `sqlite://path?mode=rwc` (standalone) or `postgres://user@host:port/db`.
    pub url: String,
    pub max_connections: u32,
    /// How long a request waits for a database connection before it is
    /// answered 503: also how soon the IM routes say the database is gone.
    #[serde(deserialize_with = "chatroom_common::config::duration")]
    pub acquire_timeout: Duration,
}

/// IM rules.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImConfig {
    /// Communities one user may own.
    pub max_owned_communities: u32,
    /// Where uploads are written.
    pub upload_dir: String,
    /// What upload URLs start with (`<upload_url><name>`); a relative path is
    /// served by logic itself at `GET /attach/files/<name>`.
    pub upload_url: String,
    /// Largest upload; more is answered 413.
    pub max_upload_bytes: usize,
    /// Largest `content` of a message (bytes).
    pub max_content_bytes: usize,
    /// Largest `url` / `pic` of a message (bytes).
    pub max_url_bytes: usize,
    /// Largest `memo` of a message (bytes).
    pub max_memo_bytes: usize,
    /// Chat messages per second per user (token bucket refill); 0: unlimited.
    pub chat_rate_per_sec: f64,
    /// Chat messages a user may send at once.
    pub chat_burst: u32,
    /// IM HTTP requests per second per user; 0: unlimited.
    pub api_rate_per_sec: f64,
    /// IM HTTP requests a user may make at once.
    pub api_burst: u32,
    /// argon2 memory cost of new password hashes (KiB).
    pub password_memory_kib: u32,
    /// argon2 passes of new password hashes.
    pub password_iterations: u32,
}

/// Where sessions and online counts live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PresenceKind {
    /// In this process: fine for one logic node (standalone).
    Memory,
    /// Shared by every logic node.
    Redis,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresenceConfig {
    pub kind: PresenceKind,
    /// `redis://host:port/db` (kind = "redis" only).
    pub url: String,
    /// Prefix of every Redis key, so deployments and tests can share a server.
    pub prefix: String,
    /// A session not renewed by a heartbeat for this long is forgotten
    /// (whole seconds: a Redis expiry).
    #[serde(deserialize_with = "chatroom_common::config::duration")]
    pub session_ttl: Duration,
    /// A conn node's counts not reported again for this long are dropped
    /// (the node is presumed dead; whole seconds).
    #[serde(deserialize_with = "chatroom_common::config::duration")]
    pub online_ttl: Duration,
}

/// What a client may send.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest message payload (`BroadcastRoomReq.data`, `/msg` msg).
    pub max_message_bytes: usize,
    /// Longest room id, in bytes.
    pub max_room_id_len: usize,
}

/// tonic refuses gRPC messages over 4 MiB by default; a payload must fit in
/// one with room for the envelope.
const MAX_MESSAGE_BYTES: usize = (4 << 20) - 4096;

impl LogicConfig {
    /// The node number for message ids.
    pub fn id_node(&self, node_id: &str) -> u16 {
        u16::try_from(self.id_node).unwrap_or_else(|_| id::IdGen::node_from_id(node_id))
    }
}

impl LogicConfig {
    fn validate_im(&self) -> Result<(), ConfigError> {
        let s = &self.store;
        let im = &self.im;
        let url_ok = im.upload_url.starts_with('/')
            || im.upload_url.starts_with("http://")
            || im.upload_url.starts_with("https://");
        let checks: [(&str, bool, &str); 11] = [
            (
                "store.url",
                s.url.starts_with("sqlite:")
                    || s.url.starts_with("postgres://")
                    || s.url.starts_with("postgresql://"),
                "must be a sqlite: or postgres:// URL",
            ),
            (
                "store.max_connections",
                (1..=1000).contains(&s.max_connections),
                "must be 1..=1000",
            ),
            (
                "im.max_owned_communities",
                (1..=10_000).contains(&im.max_owned_communities),
                "must be 1..=10000",
            ),
            (
                "im.upload_dir",
                !im.upload_dir.is_empty(),
                "must not be empty",
            ),
            (
                "im.upload_url",
                url_ok && im.upload_url.ends_with('/'),
                "must be a path or http(s) URL ending in '/', e.g. \"/attach/files/\"",
            ),
            (
                "im.max_upload_bytes",
                (1024..=1 << 30).contains(&im.max_upload_bytes),
                "must be 1024..=1073741824",
            ),
            (
                "im.max_content_bytes",
                (1..=1 << 20).contains(&im.max_content_bytes),
                "must be 1..=1048576",
            ),
            (
                "im.max_url_bytes",
                (64..=65536).contains(&im.max_url_bytes),
                "must be 64..=65536",
            ),
            (
                "im.max_memo_bytes",
                (1..=65536).contains(&im.max_memo_bytes),
                "must be 1..=65536",
            ),
            (
                "im.chat_rate_per_sec",
                im.chat_rate_per_sec >= 0.0
                    && im.api_rate_per_sec >= 0.0
                    && im.chat_rate_per_sec.is_finite()
                    && im.api_rate_per_sec.is_finite()
                    && im.chat_burst >= 1
                    && im.api_burst >= 1,
                "rates must be >= 0 (0: unlimited) and bursts >= 1",
            ),
            (
                "im.password_memory_kib",
                (64..=1 << 20).contains(&im.password_memory_kib)
                    && (1..=16).contains(&im.password_iterations),
                "memory must be 64..=1048576 KiB and iterations 1..=16",
            ),
        ];
        for (key, ok, msg) in checks {
            if !ok {
                return Err(ConfigError::invalid(key, msg));
            }
        }
        Ok(())
    }
}

impl chatroom_common::config::Load for LogicConfig {
    fn defaults() -> std::borrow::Cow<'static, str> {
        DEFAULTS.into()
    }
}

impl Validate for LogicConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let h = &self.http;
        let p = &self.presence;
        let l = &self.limits;
        let checks: [(&str, bool, &str); 6] = [
            (
                "http.max_body_bytes",
                (1024..=16 << 20).contains(&h.max_body_bytes),
                "must be 1024..=16777216",
            ),
            (
                "limits.max_message_bytes",
                (1..=MAX_MESSAGE_BYTES).contains(&l.max_message_bytes),
                "must be 1..=4190208 (a gRPC message is at most 4 MiB)",
            ),
            (
                "http.max_body_bytes",
                h.max_body_bytes >= l.max_message_bytes,
                "must be >= limits.max_message_bytes, or /msg could never carry a full message",
            ),
            (
                "limits.max_room_id_len",
                (1..=1024).contains(&l.max_room_id_len),
                "must be 1..=1024",
            ),
            (
                "presence.url",
                p.kind != PresenceKind::Redis || p.url.starts_with("redis://"),
                "must be a redis://host:port/db URL when presence.kind = \"redis\"",
            ),
            (
                "id_node",
                (-1..=i32::from(id::MAX_NODE)).contains(&self.id_node),
                "must be -1 (derive from node.id) or 0..=1023",
            ),
        ];
        for (key, ok, msg) in checks {
            if !ok {
                return Err(ConfigError::invalid(key, msg));
            }
        }
        let secs = Duration::from_secs;
        check_duration("heartbeat", self.heartbeat, secs(1), secs(3600))?;
        check_whole_seconds("heartbeat", self.heartbeat)?;
        if p.session_ttl <= self.heartbeat {
            return Err(ConfigError::invalid(
                "presence.session_ttl",
                "must be > heartbeat, or live sessions expire between heartbeats",
            ));
        }
        check_duration("presence.session_ttl", p.session_ttl, secs(1), secs(86_400))?;
        check_whole_seconds("presence.session_ttl", p.session_ttl)?;
        check_duration("presence.online_ttl", p.online_ttl, secs(1), secs(3600))?;
        check_whole_seconds("presence.online_ttl", p.online_ttl)?;
        check_duration(
            "store.acquire_timeout",
            self.store.acquire_timeout,
            Duration::from_millis(100),
            secs(60),
        )?;
        check_duration(
            "shutdown_grace",
            self.shutdown_grace,
            Duration::ZERO,
            secs(600),
        )?;
        let st = &self.stream;
        for (key, ok, msg) in [
            (
                "stream.history_messages",
                st.history_messages <= 1_000_000,
                "must be 0..=1000000",
            ),
            (
                "stream.history_bytes",
                st.history_bytes >= l.max_message_bytes || st.history_messages == 0,
                "must be at least limits.max_message_bytes",
            ),
        ] {
            if !ok {
                return Err(ConfigError::invalid(key, msg));
            }
        }
        check_duration("stream.idle_ttl", st.idle_ttl, secs(60), secs(30 * 86_400))?;
        check_whole_seconds("stream.idle_ttl", st.idle_ttl)?;
        if p.prefix.is_empty()
            || p.prefix.len() > 64
            || !p.prefix.chars().all(|c| c.is_ascii_graphic())
        {
            return Err(ConfigError::invalid(
                "presence.prefix",
                "must be 1-64 printable characters, e.g. \"chatroom:\"",
            ));
        }
        self.validate_im()?;
        self.token.validate()?;
        self.discovery.validate()?;
        self.queue.validate()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chatroom_common::config::{Load, load_with_env};

    fn load(env: &[(&str, &str)]) -> Result<LogicConfig, ConfigError> {
        LogicConfig::from_overrides(env.iter().copied())
    }

    fn bad_key(env: &[(&str, &str)]) -> String {
        match load(env) {
            Err(ConfigError::Invalid { key, .. }) => key,
            Err(e) => panic!("expected an invalid key for {env:?}, got {e}"),
            Ok(_) => panic!("expected {env:?} to be rejected"),
        }
    }

    #[test]
    fn defaults_are_standalone() {
        let cfg = load(&[]).expect("default.toml must load");
        assert_eq!(cfg.grpc.addr.to_string(), "127.0.0.1:9100");
        assert_eq!(cfg.http.addr.to_string(), "127.0.0.1:8081");
        assert_eq!(cfg.http.max_body_bytes, 64 * 1024);
        assert!(cfg.http.test_token);
        assert_eq!(cfg.presence.kind, PresenceKind::Memory);
        assert_eq!(cfg.presence.session_ttl, Duration::from_secs(90));
        assert_eq!(cfg.presence.online_ttl, Duration::from_secs(15));
        assert_eq!(cfg.presence.prefix, "chatroom:");
        assert_eq!(cfg.limits.max_message_bytes, 16 * 1024);
        assert_eq!(cfg.limits.max_room_id_len, 64);
        assert_eq!(cfg.heartbeat, Duration::from_secs(30));
        assert_eq!(cfg.shutdown_grace, Duration::from_secs(5));
        assert_eq!(cfg.token.ttl, Duration::from_secs(86_400));
        assert_eq!(cfg.stream.idle_ttl, Duration::from_secs(86_400));
        assert_eq!(cfg.store.url, "sqlite://data/chatroom.db?mode=rwc");
        assert_eq!(cfg.im.max_owned_communities, 5);
        assert_eq!(cfg.im.upload_dir, "data/uploads");
        assert_eq!(cfg.im.max_upload_bytes, 10 << 20);
        assert!(
            cfg.http.admin_token.is_empty(),
            "broadcast is off by default"
        );
        assert_eq!(cfg.http.web_dir, "web");
        assert!(matches!(cfg.queue, QueueConfig::Memory { .. }));
        assert!(matches!(cfg.discovery, DiscoveryConfig::Static { .. }));
    }

    #[test]
    fn env_overrides_apply() {
        let cfg = load(&[
            ("CHATROOM__HTTP__ADDR", "0.0.0.0:18081"),
            ("CHATROOM__HTTP__TEST_TOKEN", "false"),
            ("CHATROOM__PRESENCE__KIND", "redis"),
            ("CHATROOM__PRESENCE__URL", "redis://10.0.0.1:6379/2"),
        ])
        .expect("overrides are valid");
        assert_eq!(cfg.http.addr.to_string(), "0.0.0.0:18081");
        assert!(!cfg.http.test_token);
        assert_eq!(cfg.presence.kind, PresenceKind::Redis);
    }

    #[test]
    fn the_deploy_file_loads() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/logic.toml");
        let cfg = LogicConfig::load_with_env(Some(&path), Vec::new())
            .expect("deploy/logic.toml must be valid");
        assert_eq!(cfg.presence.kind, PresenceKind::Redis);
        assert!(matches!(cfg.queue, QueueConfig::Nsq { .. }));
        assert!(matches!(cfg.discovery, DiscoveryConfig::Etcd { .. }));
        assert!(cfg.store.url.starts_with("postgres://"));
    }

    #[test]
    fn bad_values_are_reported_by_key() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[("CHATROOM__HTTP__MAX_BODY_BYTES", "10")],
                "http.max_body_bytes",
            ),
            (&[("CHATROOM__STORE__URL", "mysql://x/y")], "store.url"),
            (
                &[("CHATROOM__STORE__MAX_CONNECTIONS", "0")],
                "store.max_connections",
            ),
            (&[("CHATROOM__IM__UPLOAD_URL", "files")], "im.upload_url"),
            (
                &[("CHATROOM__IM__MAX_UPLOAD_BYTES", "10")],
                "im.max_upload_bytes",
            ),
            (
                &[("CHATROOM__IM__CHAT_RATE_PER_SEC", "-1")],
                "im.chat_rate_per_sec",
            ),
            (
                &[("CHATROOM__IM__MAX_OWNED_COMMUNITIES", "0")],
                "im.max_owned_communities",
            ),
            (
                &[("CHATROOM__LIMITS__MAX_MESSAGE_BYTES", "0")],
                "limits.max_message_bytes",
            ),
            (
                &[
                    ("CHATROOM__LIMITS__MAX_MESSAGE_BYTES", "100000"),
                    ("CHATROOM__HTTP__MAX_BODY_BYTES", "65536"),
                ],
                "http.max_body_bytes",
            ),
            (
                &[("CHATROOM__LIMITS__MAX_ROOM_ID_LEN", "0")],
                "limits.max_room_id_len",
            ),
            (&[("CHATROOM__HEARTBEAT", "0s")], "heartbeat"),
            (&[("CHATROOM__HEARTBEAT", "1500ms")], "heartbeat"),
            (
                &[("CHATROOM__PRESENCE__SESSION_TTL", "30s")],
                "presence.session_ttl",
            ),
            (
                &[("CHATROOM__PRESENCE__SESSION_TTL", "2d")],
                "presence.session_ttl",
            ),
            (
                &[("CHATROOM__PRESENCE__ONLINE_TTL", "0s")],
                "presence.online_ttl",
            ),
            (
                &[("CHATROOM__PRESENCE__ONLINE_TTL", "2500ms")],
                "presence.online_ttl",
            ),
            (&[("CHATROOM__STREAM__IDLE_TTL", "59s")], "stream.idle_ttl"),
            (&[("CHATROOM__TOKEN__TTL", "0s")], "token.ttl"),
            (
                &[
                    ("CHATROOM__PRESENCE__KIND", "redis"),
                    ("CHATROOM__PRESENCE__URL", ""),
                ],
                "presence.url",
            ),
            (&[("CHATROOM__PRESENCE__PREFIX", "")], "presence.prefix"),
            (&[("CHATROOM__SHUTDOWN_GRACE", "11m")], "shutdown_grace"),
            (
                &[("CHATROOM__STORE__ACQUIRE_TIMEOUT", "10ms")],
                "store.acquire_timeout",
            ),
            (&[("CHATROOM__ID_NODE", "1024")], "id_node"),
            (&[("CHATROOM__TOKEN__SECRET", "short")], "token.secret"),
            (&[("CHATROOM__QUEUE__CAPACITY", "0")], "queue.capacity"),
        ];
        for (env, key) in cases {
            assert_eq!(bad_key(env), *key, "for {env:?}");
        }
    }

    #[test]
    fn durations_parse_with_their_unit_and_old_keys_are_reported() {
        let cfg = load(&[
            ("CHATROOM__HEARTBEAT", "1m"),
            ("CHATROOM__PRESENCE__SESSION_TTL", "3m"),
            ("CHATROOM__SHUTDOWN_GRACE", "2s"),
            ("CHATROOM__TOKEN__TTL", "1h"),
        ])
        .unwrap();
        assert_eq!(cfg.heartbeat, Duration::from_secs(60));
        assert_eq!(cfg.presence.session_ttl, Duration::from_secs(180));
        assert_eq!(cfg.shutdown_grace, Duration::from_secs(2));
        assert_eq!(cfg.token.ttl, Duration::from_secs(3600));
        let e = load(&[("CHATROOM__HEARTBEAT", "30")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("heartbeat") && e.contains("no unit"), "{e}");
        for (var, old, new) in [
            ("CHATROOM__HEARTBEAT_SECS", "heartbeat_secs", "heartbeat"),
            (
                "CHATROOM__PRESENCE__ONLINE_TTL_SECS",
                "presence.online_ttl_secs",
                "presence.online_ttl",
            ),
            ("CHATROOM__TOKEN__TTL_SECS", "token.ttl_secs", "token.ttl"),
            (
                "CHATROOM__STREAM__IDLE_TTL_SECS",
                "stream.idle_ttl_secs",
                "stream.idle_ttl",
            ),
        ] {
            let e = load(&[(var, "30")]).unwrap_err().to_string();
            assert!(
                e.contains(&format!("`{old}` was renamed `{new}`")) && e.contains("\"30s\""),
                "{var}: {e}"
            );
        }
    }

    #[test]
    fn unknown_keys_and_kinds_are_refused() {
        assert!(load(&[("CHATROOM__PRESENCE__KIND", "memcached")]).is_err());
        let err = load_with_env::<LogicConfig>(
            &format!("{DEFAULTS}\n[extra]\nx = 1\n"),
            None,
            Vec::new(),
        )
        .expect_err("unknown section must be refused");
        assert!(err.to_string().contains("extra"), "{err}");
    }

    #[test]
    fn id_node_is_explicit_or_derived() {
        let mut cfg = load(&[]).expect("defaults");
        cfg.id_node = 7;
        assert_eq!(cfg.id_node("x"), 7);
        cfg.id_node = -1;
        assert_eq!(cfg.id_node("x"), id::IdGen::node_from_id("x"));
    }
}

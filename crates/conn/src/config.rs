//! conn's typed configuration (see `default.toml` for every key).

use std::net::SocketAddr;
use std::time::Duration;

use chatroom_common::config::{
    AdminConfig, ConfigError, GrpcConfig, LogConfig, NodeConfig, Validate, check_duration,
    check_positive,
};
use chatroom_discovery::DiscoveryConfig;
use serde::Deserialize;

/// Every key with its default; the base layer of every conn config.
pub const DEFAULTS: &str = include_str!("default.toml");

impl chatroom_common::config::Load for ConnConfig {
    fn defaults() -> std::borrow::Cow<'static, str> {
        DEFAULTS.into()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnConfig {
    pub node: NodeConfig,
    pub log: LogConfig,
    pub ws: WsConfig,
    pub grpc: GrpcConfig,
    pub discovery: DiscoveryConfig,
    /// Room streams: what each room keeps, how frames are cut.
    pub stream: crate::stream::StreamConfig,
    /// `/metrics`, `/healthz`, `/readyz` (off when `admin.addr` is empty).
    #[serde(default)]
    pub admin: AdminConfig,
    /// Session shards; more buckets, less lock contention on push.
    pub buckets: usize,
    /// How often per-room counts go to logic (and cluster totals come back).
    #[serde(deserialize_with = "chatroom_common::config::duration")]
    pub report_online: Duration,
    /// How long shutdown waits for sessions and pushes to finish.
    #[serde(deserialize_with = "chatroom_common::config::duration")]
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WsConfig {
    pub addr: SocketAddr,
    /// Concurrent connections; more are refused at accept.
    pub max_connections: usize,
    /// Largest client frame/message accepted.
    pub max_frame_bytes: usize,
    /// Read chunk while a client is sending; an idle session holds no
    /// read buffer at all.
    pub read_buffer_bytes: usize,
    /// Bytes of outbound frames queued per session (answers and IM pushes;
    /// room messages come from the room's stream). A session with this much
    /// waiting is too slow: NORMAL pushes are dropped, an IMPORTANT one
    /// disconnects it.
    pub send_queue_bytes: usize,
    /// A session whose oldest queued push has waited this long is too slow
    /// (the same consequences). Judged by time, not by a count of frames: a
    /// burst that a healthy session drains quickly is not a slow session.
    #[serde(deserialize_with = "chatroom_common::config::duration")]
    pub slow_after: Duration,
    /// Room messages one session may have on their way to logic; at the
    /// bound conn stops reading its socket (TCP back-pressure).
    pub max_in_flight: usize,
    /// A client must sign in within this time.
    #[serde(deserialize_with = "chatroom_common::config::duration")]
    pub sign_in_timeout: Duration,
    /// Fallback heartbeat period if logic does not name one.
    #[serde(deserialize_with = "chatroom_common::config::duration")]
    pub heartbeat: Duration,
    /// Missed heartbeat periods before a silent client is closed.
    pub heartbeat_misses: u32,
    /// Server-side WebSocket ping period.
    #[serde(deserialize_with = "chatroom_common::config::duration")]
    pub ping: Duration,
}

impl Validate for ConnConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let w = &self.ws;
        let checks: [(&str, bool, &str); 6] = [
            ("ws.max_connections", w.max_connections > 0, "must be > 0"),
            (
                "ws.max_frame_bytes",
                (64..=16 << 20).contains(&w.max_frame_bytes),
                "must be 64..=16777216",
            ),
            (
                "ws.read_buffer_bytes",
                (256..=1 << 20).contains(&w.read_buffer_bytes),
                "must be 256..=1048576",
            ),
            (
                "ws.send_queue_bytes",
                (4096..=1 << 30).contains(&w.send_queue_bytes),
                "must be 4096..=1073741824",
            ),
            ("ws.heartbeat_misses", w.heartbeat_misses > 0, "must be > 0"),
            (
                "buckets",
                (1..=4096).contains(&self.buckets),
                "must be 1..=4096",
            ),
        ];
        for (key, ok, msg) in checks {
            if !ok {
                return Err(ConfigError::invalid(key, msg));
            }
        }
        let s = &self.stream;
        let more: [(&str, bool, &str); 4] = [
            (
                "ws.max_in_flight",
                (1..=65_536).contains(&w.max_in_flight),
                "must be 1..=65536",
            ),
            (
                "stream.retain_messages",
                (1..=1_000_000).contains(&s.retain_messages),
                "must be 1..=1000000",
            ),
            (
                "stream.retain_bytes",
                s.retain_bytes >= 1024,
                "must be >= 1024",
            ),
            (
                "stream.max_frame_bytes",
                (1024..=w.max_frame_bytes.max(1 << 20)).contains(&s.max_frame_bytes),
                "must be 1024..=1048576",
            ),
        ];
        for (key, ok, msg) in more {
            if !ok {
                return Err(ConfigError::invalid(key, msg));
            }
        }
        check_duration(
            "ws.slow_after",
            w.slow_after,
            Duration::from_millis(100),
            Duration::from_secs(3600),
        )?;
        check_positive("ws.sign_in_timeout", w.sign_in_timeout)?;
        check_positive("ws.heartbeat", w.heartbeat)?;
        check_positive("ws.ping", w.ping)?;
        check_duration(
            "report_online",
            self.report_online,
            Duration::from_millis(100),
            Duration::MAX,
        )?;
        check_duration(
            "stream.reorder_wait",
            s.reorder_wait,
            Duration::ZERO,
            Duration::from_secs(60),
        )?;
        self.admin.validate()?;
        self.discovery.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chatroom_common::config::Load;

    fn load(env: &[(&str, &str)]) -> Result<ConnConfig, ConfigError> {
        ConnConfig::from_overrides(env.iter().copied())
    }

    #[test]
    fn defaults_load_and_env_overrides() {
        let c = load(&[]).unwrap();
        assert_eq!(c.ws.addr.port(), 8080);
        let c = load(&[
            ("CHATROOM__WS__ADDR", "127.0.0.1:9999"),
            ("CHATROOM__WS__SEND_QUEUE_BYTES", "8192"),
        ])
        .unwrap();
        assert_eq!((c.ws.addr.port(), c.ws.send_queue_bytes), (9999, 8192));
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = load(&[("CHATROOM__WS__SEND_QUEUE_BYTES", "0")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("ws.send_queue_bytes"), "{e}");
        let e = load(&[("CHATROOM__WS__ADDR", "nonsense")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("ws.addr") || e.contains("addr"), "{e}");
        let e = load(&[("CHATROOM__BUCKETS", "0")]).unwrap_err().to_string();
        assert!(e.contains("buckets"), "{e}");
        let e = load(&[("CHATROOM__ADMIN__ADDR", "nowhere")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("admin.addr"), "{e}");
        let c = load(&[("CHATROOM__ADMIN__ADDR", "127.0.0.1:0")]).unwrap();
        assert!(c.admin.socket_addr().unwrap().is_some());
    }

    #[test]
    fn durations_carry_their_unit() {
        let c = load(&[]).unwrap();
        assert_eq!(c.report_online, Duration::from_secs(3));
        assert_eq!(c.ws.slow_after, Duration::from_secs(5));
        assert_eq!(c.ws.heartbeat, Duration::from_secs(30));
        assert_eq!(c.stream.reorder_wait, Duration::from_millis(500));
        assert_eq!(c.stream.linger, Duration::from_secs(60));
        let c = load(&[
            ("CHATROOM__REPORT_ONLINE", "300ms"),
            ("CHATROOM__WS__HEARTBEAT", "1m"),
            ("CHATROOM__STREAM__REORDER_WAIT", "2s"),
        ])
        .unwrap();
        assert_eq!(c.report_online, Duration::from_millis(300));
        assert_eq!(c.ws.heartbeat, Duration::from_secs(60));
        assert_eq!(c.stream.reorder_wait, Duration::from_secs(2));
        for (var, value, key) in [
            ("CHATROOM__WS__SLOW_AFTER", "50ms", "ws.slow_after"),
            ("CHATROOM__WS__SLOW_AFTER", "5000", "ws.slow_after"),
            ("CHATROOM__WS__SIGN_IN_TIMEOUT", "0s", "ws.sign_in_timeout"),
            ("CHATROOM__WS__PING", "0ms", "ws.ping"),
            ("CHATROOM__REPORT_ONLINE", "99ms", "report_online"),
            (
                "CHATROOM__STREAM__REORDER_WAIT",
                "61s",
                "stream.reorder_wait",
            ),
            ("CHATROOM__STREAM__LINGER", "60", "stream.linger"),
        ] {
            let e = load(&[(var, value)]).unwrap_err().to_string();
            assert!(e.contains(key), "{var}={value}: {e}");
        }
        let e = load(&[("CHATROOM__WS__HEARTBEAT_SECS", "30")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("renamed `ws.heartbeat`"), "{e}");
    }
}

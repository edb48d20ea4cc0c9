//! Job's configuration: the shared sections (`node`, `log`, `discovery`,
//! `queue`) plus how messages are merged (`batch`), how batches are pushed to
//! conn nodes (`push`) and how long shutdown may take. Defaults live in
//! `default.toml`; `Validate` rejects values that would make the service
//! misbehave, naming the key.

use std::time::Duration;

use chatroom_common::batch::HEAD_LEN;
use chatroom_common::config::{
    AdminConfig, ConfigError, LogConfig, NodeConfig, Validate, check_duration,
};
use chatroom_discovery::DiscoveryConfig;
use chatroom_queue::QueueConfig;
use serde::Deserialize;

/// The built-in defaults (standalone: memory queue, no conn nodes).
pub const DEFAULTS: &str = include_str!("default.toml");

/// gRPC servers refuse messages over 4 MiB by default; keep a batch (plus the
/// request envelope) under that so a full batch is never rejected by conn.
pub const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024 - 64 * 1024;

/// First back-off step when an IMPORTANT push is retried.
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    pub node: NodeConfig,
    pub log: LogConfig,
    pub discovery: DiscoveryConfig,
    pub queue: QueueConfig,
    pub batch: BatchConfig,
    pub push: PushConfig,
    /// `/metrics`, `/healthz`, `/readyz` (off when `admin.addr` is empty).
    #[serde(default)]
    pub admin: AdminConfig,
    /// After the queue is drained, how long node workers may keep pushing
    /// what they hold before the rest is requeued.
    #[serde(deserialize_with = "chatroom_common::config::duration")]
    pub shutdown_grace: Duration,
}

/// When a room's pending messages are flushed as one batch.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Flush once this many messages are pending in the room.
    pub max_messages: usize,
    /// Flush this long after the room's first pending message.
    #[serde(deserialize_with = "chatroom_common::config::duration")]
    pub window: Duration,
    /// Flush before the encoded batch would grow past this many bytes.
    pub max_bytes: usize,
}

/// How batches reach the conn nodes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushConfig {
    /// Per `PushRoom` call (and per connection attempt).
    #[serde(deserialize_with = "chatroom_common::config::duration")]
    pub timeout: Duration,
    /// Batches waiting per node; when full, that node misses the batch.
    pub node_queue: usize,
    /// Most room batches sent to one node in one `PushRooms` call (taken
    /// from what is already queued, so bundling never waits); 1 turns it off.
    pub bundle_max: usize,
    /// How long a node worker keeps retrying an IMPORTANT batch; longer than
    /// an etcd lease, so a dead node leaves discovery before we give up.
    #[serde(deserialize_with = "chatroom_common::config::duration")]
    pub important_retry: Duration,
    /// Cap of the exponential back-off between IMPORTANT retries.
    #[serde(deserialize_with = "chatroom_common::config::duration")]
    pub max_backoff: Duration,
    /// Base delay of a requeue (multiplied by the delivery's attempts, up to
    /// 10x), so a batch nobody could take does not spin.
    #[serde(deserialize_with = "chatroom_common::config::duration")]
    pub requeue_delay: Duration,
}

impl chatroom_common::config::Load for JobConfig {
    fn defaults() -> std::borrow::Cow<'static, str> {
        DEFAULTS.into()
    }
}

impl Validate for JobConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.discovery.validate()?;
        self.queue.validate()?;
        self.admin.validate()?;
        self.batch.validate()?;
        self.push.validate()?;
        check_duration(
            "shutdown_grace",
            self.shutdown_grace,
            Duration::ZERO,
            Duration::from_secs(600),
        )
    }
}

impl Validate for BatchConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=65_536).contains(&self.max_messages) {
            return Err(ConfigError::invalid(
                "batch.max_messages",
                "must be 1..=65536",
            ));
        }
        check_duration(
            "batch.window",
            self.window,
            Duration::ZERO,
            Duration::from_secs(60),
        )?;
        if !(HEAD_LEN + 1..=MAX_BATCH_BYTES).contains(&self.max_bytes) {
            return Err(ConfigError::invalid(
                "batch.max_bytes",
                format!("must be {}..={MAX_BATCH_BYTES}", HEAD_LEN + 1),
            ));
        }
        Ok(())
    }
}

impl Validate for PushConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        check_duration(
            "push.timeout",
            self.timeout,
            Duration::from_millis(1),
            Duration::from_secs(600),
        )?;
        if !(1..=1_000_000).contains(&self.node_queue) {
            return Err(ConfigError::invalid(
                "push.node_queue",
                "must be 1..=1000000",
            ));
        }
        if !(1..=1024).contains(&self.bundle_max) {
            return Err(ConfigError::invalid("push.bundle_max", "must be 1..=1024"));
        }
        check_duration(
            "push.important_retry",
            self.important_retry,
            Duration::ZERO,
            Duration::from_secs(3600),
        )?;
        check_duration(
            "push.max_backoff",
            self.max_backoff,
            INITIAL_BACKOFF,
            Duration::from_secs(60),
        )?;
        check_duration(
            "push.requeue_delay",
            self.requeue_delay,
            Duration::ZERO,
            Duration::from_secs(600),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use chatroom_common::config::Load;

    use super::*;

    fn load(file: Option<&Path>, env: &[(&str, &str)]) -> Result<JobConfig, ConfigError> {
        JobConfig::load_with_env(
            file,
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn defaults_are_standalone_and_valid() {
        let cfg = load(None, &[]).unwrap();
        assert!(matches!(cfg.queue, QueueConfig::Memory { .. }));
        assert!(matches!(&cfg.discovery, DiscoveryConfig::Static { conn, .. } if conn.is_empty()));
        assert_eq!(cfg.batch.max_messages, 32);
        assert_eq!(cfg.batch.window, Duration::from_millis(10));
        assert_eq!(cfg.batch.max_bytes, 256 * 1024);
        assert_eq!(cfg.push.timeout, Duration::from_secs(2));
        assert_eq!(cfg.push.node_queue, 1024);
        assert_eq!(cfg.push.important_retry, Duration::from_secs(15));
        assert_eq!(cfg.push.max_backoff, Duration::from_secs(1));
        assert_eq!(cfg.push.requeue_delay, Duration::from_secs(1));
        assert_eq!(cfg.shutdown_grace, Duration::from_secs(5));
    }

    #[test]
    fn deploy_file_layers_over_defaults() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/job.toml");
        let cfg = load(Some(&file), &[]).unwrap();
        match &cfg.discovery {
            DiscoveryConfig::Etcd { endpoints, .. } => {
                assert_eq!(endpoints, &["http://127.0.0.1:2379"])
            }
            other => panic!("expected etcd discovery, got {other:?}"),
        }
        match &cfg.queue {
            QueueConfig::Nsq {
                lookupd_http_addresses,
                ..
            } => assert_eq!(lookupd_http_addresses, &["http://127.0.0.1:4161"]),
            other => panic!("expected nsq, got {other:?}"),
        }
    }

    #[test]
    fn env_overrides_and_bad_values_name_the_key() {
        let cfg = load(None, &[("CHATROOM__BATCH__MAX_MESSAGES", "8")]).unwrap();
        assert_eq!(cfg.batch.max_messages, 8);
        for (key, value, named) in [
            ("CHATROOM__BATCH__MAX_MESSAGES", "0", "batch.max_messages"),
            ("CHATROOM__BATCH__MAX_BYTES", "999999999", "batch.max_bytes"),
            ("CHATROOM__PUSH__NODE_QUEUE", "0", "push.node_queue"),
            ("CHATROOM__PUSH__BUNDLE_MAX", "0", "push.bundle_max"),
            ("CHATROOM__PUSH__TIMEOUT", "0s", "push.timeout"),
            ("CHATROOM__PUSH__TIMEOUT", "2000", "push.timeout"),
            ("CHATROOM__PUSH__MAX_BACKOFF", "1ms", "push.max_backoff"),
            (
                "CHATROOM__PUSH__IMPORTANT_RETRY",
                "2h",
                "push.important_retry",
            ),
            ("CHATROOM__PUSH__REQUEUE_DELAY", "11m", "push.requeue_delay"),
            ("CHATROOM__BATCH__WINDOW", "61s", "batch.window"),
            ("CHATROOM__BATCH__WINDOW", "10", "batch.window"),
            ("CHATROOM__SHUTDOWN_GRACE", "1h", "shutdown_grace"),
        ] {
            let err = load(None, &[(key, value)]).unwrap_err().to_string();
            assert!(err.contains(named), "{key}={value}: {err}");
        }
        let err = load(None, &[("CHATROOM__BATCH__WINDOW", "61s")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("must be <= 1m"), "{err}");
    }

    #[test]
    fn durations_parse_with_their_unit() {
        let cfg = load(
            None,
            &[
                ("CHATROOM__BATCH__WINDOW", "2s"),
                ("CHATROOM__PUSH__IMPORTANT_RETRY", "1m"),
                ("CHATROOM__PUSH__TIMEOUT", "10ms"),
            ],
        )
        .unwrap();
        assert_eq!(cfg.batch.window, Duration::from_secs(2));
        assert_eq!(cfg.push.important_retry, Duration::from_secs(60));
        assert_eq!(cfg.push.timeout, Duration::from_millis(10));
    }

    #[test]
    fn old_key_names_are_reported_with_the_new_one() {
        let err = load(None, &[("CHATROOM__BATCH__WINDOW_MS", "10")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`batch.window_ms` was renamed `batch.window`")
                && err.contains("window = \"10ms\""),
            "{err}"
        );
        let dir = std::env::temp_dir().join(format!("chatroom-job-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("old.toml");
        std::fs::write(&path, "[push]\nmax_backoff_ms = 500\n").unwrap();
        let err = load(Some(&path), &[]).unwrap_err().to_string();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            err.contains("renamed `push.max_backoff`") && err.contains("\"500ms\""),
            "{err}"
        );
    }
}

//! Job's configuration: the shared sections (`node`, `log`, `discovery`,
//! `queue`) plus how messages are merged (`batch`), how batches are pushed to
//! conn nodes (`push`) and how long shutdown may take. Defaults live in
//! `default.toml`; `Validate` rejects values that would make the service
//! misbehave, naming the key.

use std::time::Duration;

use chatroom_common::batch::HEAD_LEN;
use chatroom_common::config::{AdminConfig, ConfigError, LogConfig, NodeConfig, Validate, ms};
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
    pub shutdown_grace_ms: u64,
}

/// When a room's pending messages are flushed as one batch.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Flush once this many messages are pending in the room.
    pub max_messages: usize,
    /// Flush this long after the room's first pending message.
    pub window_ms: u64,
    /// Flush before the encoded batch would grow past this many bytes.
    pub max_bytes: usize,
}

/// How batches reach the conn nodes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushConfig {
    /// Per `PushRoom` call (and per connection attempt).
    pub timeout_ms: u64,
    /// Batches waiting per node; when full, that node misses the batch.
    pub node_queue: usize,
    /// Most room batches sent to one node in one `PushRooms` call (taken
    /// from what is already queued, so bundling never waits); 1 turns it off.
    pub bundle_max: usize,
    /// How long a node worker keeps retrying an IMPORTANT batch; longer than
    /// an etcd lease, so a dead node leaves discovery before we give up.
    pub important_retry_ms: u64,
    /// Cap of the exponential back-off between IMPORTANT retries.
    pub max_backoff_ms: u64,
    /// Base delay of a requeue (multiplied by the delivery's attempts, up to
    /// 10x), so a batch nobody could take does not spin.
    pub requeue_delay_ms: u64,
}

impl JobConfig {
    pub fn shutdown_grace(&self) -> Duration {
        ms(self.shutdown_grace_ms)
    }
}

impl BatchConfig {
    pub fn window(&self) -> Duration {
        ms(self.window_ms)
    }
}

impl PushConfig {
    pub fn timeout(&self) -> Duration {
        ms(self.timeout_ms)
    }
    pub fn important_retry(&self) -> Duration {
        ms(self.important_retry_ms)
    }
    pub fn max_backoff(&self) -> Duration {
        ms(self.max_backoff_ms)
    }
    pub fn requeue_delay(&self) -> Duration {
        ms(self.requeue_delay_ms)
    }
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
        if self.shutdown_grace_ms > 600_000 {
            return Err(ConfigError::invalid(
                "shutdown_grace_ms",
                "must be <= 600000",
            ));
        }
        Ok(())
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
        if self.window_ms > 60_000 {
            return Err(ConfigError::invalid("batch.window_ms", "must be <= 60000"));
        }
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
        if !(1..=600_000).contains(&self.timeout_ms) {
            return Err(ConfigError::invalid(
                "push.timeout_ms",
                "must be 1..=600000",
            ));
        }
        if !(1..=1_000_000).contains(&self.node_queue) {
            return Err(ConfigError::invalid(
                "push.node_queue",
                "must be 1..=1000000",
            ));
        }
        if !(1..=1024).contains(&self.bundle_max) {
            return Err(ConfigError::invalid("push.bundle_max", "must be 1..=1024"));
        }
        if self.important_retry_ms > 3_600_000 {
            return Err(ConfigError::invalid(
                "push.important_retry_ms",
                "must be <= 3600000",
            ));
        }
        let min_backoff = INITIAL_BACKOFF.as_millis() as u64;
        if !(min_backoff..=60_000).contains(&self.max_backoff_ms) {
            return Err(ConfigError::invalid(
                "push.max_backoff_ms",
                format!("must be {min_backoff}..=60000"),
            ));
        }
        if self.requeue_delay_ms > 600_000 {
            return Err(ConfigError::invalid(
                "push.requeue_delay_ms",
                "must be <= 600000",
            ));
        }
        Ok(())
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
        assert_eq!(cfg.batch.window_ms, 10);
        assert_eq!(cfg.batch.max_bytes, 256 * 1024);
        assert_eq!(cfg.push.timeout_ms, 2000);
        assert_eq!(cfg.push.node_queue, 1024);
        assert_eq!(cfg.push.important_retry_ms, 15_000);
        assert_eq!(cfg.push.max_backoff_ms, 1000);
        assert_eq!(cfg.shutdown_grace_ms, 5000);
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
            ("CHATROOM__PUSH__TIMEOUT_MS", "0", "push.timeout_ms"),
            ("CHATROOM__PUSH__MAX_BACKOFF_MS", "1", "push.max_backoff_ms"),
            (
                "CHATROOM__SHUTDOWN_GRACE_MS",
                "99999999",
                "shutdown_grace_ms",
            ),
        ] {
            let err = load(None, &[(key, value)]).unwrap_err().to_string();
            assert!(err.contains(named), "{key}={value}: {err}");
        }
    }
}

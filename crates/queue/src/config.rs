//! The `[queue]` config section: which queue logic publishes to and job
//! consumes from, and how it is reached.

use std::time::Duration;

use chatroom_common::config::{ConfigError, Validate, check_duration};
use serde::Deserialize;

/// The message queue between logic and job (unknown keys tolerated, as for
/// discovery).
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum QueueConfig {
    /// In-process queue (standalone only: logic and job share one process).
    Memory {
        #[serde(default = "default_memory_capacity")]
        capacity: usize,
    },
    /// NSQ: logic publishes to nsqd over TCP; job subscribes through
    /// nsqlookupd (or straight to nsqd addresses).
    Nsq {
        #[serde(default = "default_topic")]
        topic: String,
        #[serde(default = "default_channel")]
        channel: String,
        #[serde(default)]
        nsqd_tcp_addresses: Vec<String>,
        #[serde(default)]
        lookupd_http_addresses: Vec<String>,
        #[serde(default = "default_max_in_flight")]
        max_in_flight: u32,
        /// How often job asks nsqlookupd which nsqd nodes exist (a new
        /// nsqd is consumed from at most this long after it registers).
        #[serde(
            default = "default_lookupd_poll_interval",
            deserialize_with = "lookupd_poll_interval"
        )]
        lookupd_poll_interval: Duration,
    },
}

fn default_memory_capacity() -> usize {
    65_536
}
fn default_topic() -> String {
    "chatroom-room".into()
}
fn default_channel() -> String {
    "job".into()
}
fn default_max_in_flight() -> u32 {
    256
}
fn lookupd_poll_interval<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    chatroom_common::config::duration_for("queue.lookupd_poll_interval", d)
}
fn default_lookupd_poll_interval() -> Duration {
    Duration::from_secs(1)
}

impl Validate for QueueConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        match self {
            QueueConfig::Memory { capacity } => {
                if *capacity == 0 {
                    return Err(ConfigError::invalid("queue.capacity", "must be > 0"));
                }
            }
            QueueConfig::Nsq {
                topic,
                channel,
                nsqd_tcp_addresses,
                lookupd_http_addresses,
                max_in_flight,
                lookupd_poll_interval,
            } => {
                check_duration(
                    "queue.lookupd_poll_interval",
                    *lookupd_poll_interval,
                    Duration::from_millis(10),
                    Duration::from_secs(600),
                )?;
                if !chatroom_nsq::valid_name(topic) {
                    return Err(ConfigError::invalid(
                        "queue.topic",
                        "1-64 chars of [.a-zA-Z0-9_-]",
                    ));
                }
                if !chatroom_nsq::valid_name(channel) {
                    return Err(ConfigError::invalid(
                        "queue.channel",
                        "1-64 chars of [.a-zA-Z0-9_-]",
                    ));
                }
                let none = |v: &Vec<String>| v.iter().all(|a| a.trim().is_empty());
                if none(nsqd_tcp_addresses) && none(lookupd_http_addresses) {
                    return Err(ConfigError::invalid(
                        "queue.nsqd_tcp_addresses",
                        "give nsqd_tcp_addresses or lookupd_http_addresses",
                    ));
                }
                if *max_in_flight == 0 {
                    return Err(ConfigError::invalid("queue.max_in_flight", "must be > 0"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use chatroom_common::config::load_with_env;

    use super::*;

    #[derive(Debug, Deserialize)]
    struct T {
        queue: QueueConfig,
    }
    impl Validate for T {
        fn validate(&self) -> Result<(), ConfigError> {
            self.queue.validate()
        }
    }
    const D: &str = "[queue]\nkind = \"memory\"\n";

    fn env(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn env_switches_kind_and_parses_lists() {
        let t: T = load_with_env(
            D,
            None,
            env(&[
                ("CHATROOM__QUEUE__KIND", "nsq"),
                ("CHATROOM__QUEUE__NSQD_TCP_ADDRESSES", "127.0.0.1:4150"),
            ]),
        )
        .unwrap();
        assert!(
            matches!(t.queue, QueueConfig::Nsq { ref nsqd_tcp_addresses, .. } if nsqd_tcp_addresses.len() == 1)
        );
    }

    #[test]
    fn bad_values_are_named() {
        let e = load_with_env::<T>(D, None, env(&[("CHATROOM__QUEUE__KIND", "kafka")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("kafka") || e.contains("queue"), "{e}");
        let e = load_with_env::<T>(D, None, env(&[("CHATROOM__QUEUE__KIND", "nsq")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("queue.nsqd_tcp_addresses"), "{e}");
        let nsq = [
            ("CHATROOM__QUEUE__KIND", "nsq"),
            ("CHATROOM__QUEUE__NSQD_TCP_ADDRESSES", "127.0.0.1:4150"),
        ];
        let t: T = load_with_env(
            D,
            None,
            env(&[
                nsq[0],
                nsq[1],
                ("CHATROOM__QUEUE__LOOKUPD_POLL_INTERVAL", "250ms"),
            ]),
        )
        .unwrap();
        assert!(matches!(
            t.queue,
            QueueConfig::Nsq { lookupd_poll_interval, .. } if lookupd_poll_interval == Duration::from_millis(250)
        ));
        for v in ["5ms", "11m", "1000"] {
            let e = load_with_env::<T>(
                D,
                None,
                env(&[
                    nsq[0],
                    nsq[1],
                    ("CHATROOM__QUEUE__LOOKUPD_POLL_INTERVAL", v),
                ]),
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains("queue.lookupd_poll_interval"), "{v}: {e}");
        }
        let e = load_with_env::<T>(
            D,
            None,
            env(&[
                nsq[0],
                nsq[1],
                ("CHATROOM__QUEUE__LOOKUPD_POLL_INTERVAL_MS", "1000"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("renamed `queue.lookupd_poll_interval`") && e.contains("\"1000ms\""),
            "{e}"
        );
    }
}

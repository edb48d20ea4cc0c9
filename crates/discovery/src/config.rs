//! The `[discovery]` config section: how nodes find each other.

use std::time::Duration;

use chatroom_common::config::{ConfigError, Validate, check_duration, check_whole_seconds};
use serde::Deserialize;

/// How nodes find each other. (Unknown keys are tolerated here so that an
/// override of `kind` alone works over defaults written for the other kind.)
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum DiscoveryConfig {
    /// Fixed addresses (`http://host:port`), for standalone and small setups.
    Static {
        #[serde(default)]
        logic: Vec<String>,
        #[serde(default)]
        conn: Vec<String>,
    },
    /// etcd: nodes register under `<prefix>/<service>/<id>` with a lease.
    Etcd {
        endpoints: Vec<String>,
        #[serde(default = "default_etcd_prefix")]
        prefix: String,
        /// Lease lifetime (whole seconds): a dead node leaves this long
        /// after its last keep-alive.
        #[serde(default = "default_lease_ttl", deserialize_with = "lease_ttl")]
        lease_ttl: Duration,
    },
}

fn default_etcd_prefix() -> String {
    "/chatroom".into()
}
fn lease_ttl<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    chatroom_common::config::duration_for("discovery.lease_ttl", d)
}
fn default_lease_ttl() -> Duration {
    Duration::from_secs(10)
}

impl Validate for DiscoveryConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        match self {
            DiscoveryConfig::Static { .. } => Ok(()),
            DiscoveryConfig::Etcd {
                endpoints,
                prefix,
                lease_ttl,
            } => {
                if endpoints.iter().all(|e| e.trim().is_empty()) {
                    return Err(ConfigError::invalid(
                        "discovery.endpoints",
                        "at least one etcd endpoint is needed",
                    ));
                }
                if prefix.is_empty() || !prefix.starts_with('/') {
                    return Err(ConfigError::invalid(
                        "discovery.prefix",
                        "must start with '/'",
                    ));
                }
                check_duration(
                    "discovery.lease_ttl",
                    *lease_ttl,
                    Duration::from_secs(2),
                    Duration::from_secs(3600),
                )?;
                check_whole_seconds("discovery.lease_ttl", *lease_ttl)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use chatroom_common::config::load_with_env;

    use super::*;

    #[derive(Debug, Deserialize)]
    struct T {
        discovery: DiscoveryConfig,
    }
    impl Validate for T {
        fn validate(&self) -> Result<(), ConfigError> {
            self.discovery.validate()
        }
    }
    const D: &str = "[discovery]\nkind = \"static\"\nlogic = [\"http://a:1\"]\n";

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
                ("CHATROOM__DISCOVERY__KIND", "etcd"),
                (
                    "CHATROOM__DISCOVERY__ENDPOINTS",
                    "http://127.0.0.1:1,http://127.0.0.1:2",
                ),
            ]),
        )
        .unwrap();
        match t.discovery {
            DiscoveryConfig::Etcd {
                endpoints,
                lease_ttl,
                ..
            } => {
                assert_eq!(endpoints.len(), 2);
                assert_eq!(lease_ttl, Duration::from_secs(10));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_values_are_named() {
        let e = load_with_env::<T>(
            D,
            None,
            env(&[
                ("CHATROOM__DISCOVERY__KIND", "etcd"),
                ("CHATROOM__DISCOVERY__ENDPOINTS", ""),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("discovery.endpoints"), "{e}");
        let etcd = [
            ("CHATROOM__DISCOVERY__KIND", "etcd"),
            ("CHATROOM__DISCOVERY__ENDPOINTS", "http://127.0.0.1:1"),
        ];
        for ttl in ["1s", "2500ms", "2h", "10"] {
            let e = load_with_env::<T>(
                D,
                None,
                env(&[etcd[0], etcd[1], ("CHATROOM__DISCOVERY__LEASE_TTL", ttl)]),
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains("discovery.lease_ttl"), "{ttl}: {e}");
        }
        // The old key is reported, not ignored (this section tolerates
        // unknown keys).
        let e = load_with_env::<T>(
            D,
            None,
            env(&[
                etcd[0],
                etcd[1],
                ("CHATROOM__DISCOVERY__LEASE_TTL_SECS", "5"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("renamed `discovery.lease_ttl`"), "{e}");
    }
}

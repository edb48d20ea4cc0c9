//! The `[discovery]` config section: how nodes find each other.

use chatroom_common::config::{ConfigError, Validate};
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
        #[serde(default = "default_lease_ttl")]
        lease_ttl_secs: u64,
    },
}

fn default_etcd_prefix() -> String {
    "/chatroom".into()
}
fn default_lease_ttl() -> u64 {
    10
}

impl Validate for DiscoveryConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        match self {
            DiscoveryConfig::Static { .. } => Ok(()),
            DiscoveryConfig::Etcd {
                endpoints,
                prefix,
                lease_ttl_secs,
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
                if !(2..=3600).contains(lease_ttl_secs) {
                    return Err(ConfigError::invalid(
                        "discovery.lease_ttl_secs",
                        "must be 2..=3600",
                    ));
                }
                Ok(())
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
                lease_ttl_secs,
                ..
            } => {
                assert_eq!(endpoints.len(), 2);
                assert_eq!(lease_ttl_secs, 10);
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
    }
}

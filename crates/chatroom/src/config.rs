//! The standalone configuration: the three services' own configs as the
//! sections `conn`, `logic` and `job`, each starting from that service's
//! defaults, plus one `log` section for the process. Environment overrides
//! name the section first: `CHATROOM__CONN__WS__ADDR=0.0.0.0:8080`.

use chatroom_common::config::{ConfigError, LogConfig, Validate};
use chatroom_conn::ConnConfig;
use chatroom_job::JobConfig;
use chatroom_logic::LogicConfig;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StandaloneConfig {
    pub log: LogConfig,
    pub conn: ConnConfig,
    pub logic: LogicConfig,
    pub job: JobConfig,
}

impl Validate for StandaloneConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let prefixed = |section: &str, e: ConfigError| match e {
            ConfigError::Invalid { key, msg } => {
                ConfigError::invalid(format!("{section}.{key}"), msg)
            }
            other => other,
        };
        self.conn.validate().map_err(|e| prefixed("conn", e))?;
        self.logic.validate().map_err(|e| prefixed("logic", e))?;
        self.job.validate().map_err(|e| prefixed("job", e))
    }
}

const LOG_DEFAULTS: &str = "[log]\ndir = \"log\"\nlevel = \"info\"\n";

/// The built-in defaults: each service's defaults nested under its name.
pub fn defaults() -> String {
    let mut root: toml::Table = toml::from_str(LOG_DEFAULTS).expect("log defaults are valid TOML");
    for (name, text) in [
        ("conn", chatroom_conn::config::DEFAULTS),
        ("logic", chatroom_logic::config::DEFAULTS),
        ("job", chatroom_job::config::DEFAULT_CONFIG),
    ] {
        let t: toml::Table = toml::from_str(text).expect("service defaults are valid TOML");
        root.insert(name.into(), toml::Value::Table(t));
    }
    toml::to_string(&root).expect("defaults serialize")
}

impl StandaloneConfig {
    pub fn load(file: Option<&std::path::Path>) -> Result<Self, ConfigError> {
        chatroom_common::config::load(&defaults(), file)
    }

    pub fn from_overrides<'a>(
        overrides: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, ConfigError> {
        chatroom_common::config::load_with_env(
            &defaults(),
            None,
            overrides
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_standalone_and_overridable() {
        let c = StandaloneConfig::from_overrides([]).unwrap();
        assert_eq!(c.conn.ws.addr.to_string(), "127.0.0.1:8080");
        assert_eq!(c.logic.http.addr.to_string(), "127.0.0.1:8081");
        let c = StandaloneConfig::from_overrides([("CHATROOM__CONN__WS__ADDR", "127.0.0.1:1234")])
            .unwrap();
        assert_eq!(c.conn.ws.addr.port(), 1234);
        let e = StandaloneConfig::from_overrides([("CHATROOM__CONN__WS__SLOW_AFTER_MS", "0")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("conn.ws.slow_after_ms"), "{e}");
    }
}

//! The standalone configuration: the three services' own configs as the
//! sections `conn`, `logic` and `job`, each starting from that service's
//! defaults, plus one `log` section for the process. Environment overrides
//! name the section first: `CHATROOM__CONN__WS__ADDR=0.0.0.0:8080`.

use chatroom_common::config::{ConfigError, Load, LogConfig, Validate};
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
        ("job", chatroom_job::config::DEFAULTS),
    ] {
        let t: toml::Table = toml::from_str(text).expect("service defaults are valid TOML");
        root.insert(name.into(), toml::Value::Table(t));
    }
    toml::to_string(&root).expect("defaults serialize")
}

/// Keys of the three service sections that one process does not use,
/// with what to set instead. A key under one of these is refused, naming
/// it, rather than silently ignored.
const IGNORED: &[(&str, &str)] = &[
    ("conn.log", "the process has one log: set log.*"),
    ("logic.log", "the process has one log: set log.*"),
    ("job.log", "the process has one log: set log.*"),
    ("conn.discovery", "the services find each other in-process"),
    ("logic.discovery", "the services find each other in-process"),
    ("job.discovery", "the services find each other in-process"),
    (
        "conn.grpc.addr",
        "internal gRPC listens on an ephemeral loopback port",
    ),
    (
        "logic.grpc.addr",
        "internal gRPC listens on an ephemeral loopback port",
    ),
    (
        "logic.queue.kind",
        "the queue is in-process; logic.queue.capacity sizes it",
    ),
    (
        "job.queue",
        "job reads logic's in-process queue: set logic.queue.capacity",
    ),
];

/// The first key set that the standalone process would ignore.
fn refuse_ignored(keys: &[String]) -> Result<(), ConfigError> {
    for key in keys {
        for (prefix, instead) in IGNORED {
            let under = key
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'));
            if under {
                return Err(ConfigError::invalid(
                    key.clone(),
                    format!("not used by the standalone process ({instead})"),
                ));
            }
        }
    }
    Ok(())
}

impl Load for StandaloneConfig {
    fn defaults() -> std::borrow::Cow<'static, str> {
        defaults().into()
    }

    fn load_with_env(
        file: Option<&std::path::Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let env: Vec<(String, String)> = env.into_iter().collect();
        refuse_ignored(&chatroom_common::config::keys_set(file, env.clone())?)?;
        chatroom_common::config::load_with_env(&defaults(), file, env)
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
        let e = StandaloneConfig::from_overrides([("CHATROOM__CONN__WS__SLOW_AFTER", "0s")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("conn.ws.slow_after"), "{e}");
        let c =
            StandaloneConfig::from_overrides([("CHATROOM__JOB__BATCH__WINDOW", "100ms")]).unwrap();
        assert_eq!(c.job.batch.window, std::time::Duration::from_millis(100));
    }

    #[test]
    fn an_old_key_is_reported_with_its_new_name() {
        let e = StandaloneConfig::from_overrides([("CHATROOM__JOB__BATCH__WINDOW_MS", "100")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`job.batch.window_ms` was renamed `job.batch.window`")
                && e.contains("window = \"100ms\""),
            "{e}"
        );
        let e = StandaloneConfig::from_overrides([("CHATROOM__CONN__WS__SLOW_AFTER", "5000")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("conn.ws.slow_after") && e.contains("no unit"),
            "{e}"
        );
    }

    #[test]
    fn keys_the_process_would_ignore_are_refused_by_name() {
        for (var, key) in [
            ("CHATROOM__CONN__LOG__DIR", "conn.log.dir"),
            ("CHATROOM__LOGIC__LOG__LEVEL", "logic.log.level"),
            ("CHATROOM__JOB__LOG__DIR", "job.log.dir"),
            ("CHATROOM__JOB__QUEUE__KIND", "job.queue.kind"),
            ("CHATROOM__LOGIC__QUEUE__KIND", "logic.queue.kind"),
            ("CHATROOM__CONN__DISCOVERY__KIND", "conn.discovery.kind"),
            ("CHATROOM__LOGIC__GRPC__ADDR", "logic.grpc.addr"),
        ] {
            let e = StandaloneConfig::from_overrides([(var, "x")])
                .unwrap_err()
                .to_string();
            assert!(e.contains(key) && e.contains("not used"), "{var}: {e}");
        }
        // What the process does use still loads.
        let c = StandaloneConfig::from_overrides([
            ("CHATROOM__LOG__DIR", ""),
            ("CHATROOM__LOGIC__QUEUE__CAPACITY", "10"),
            ("CHATROOM__LOGIC__LOGIN__X", "1"),
        ]);
        assert!(c.is_err(), "unknown keys are still refused");
        let c = StandaloneConfig::from_overrides([
            ("CHATROOM__LOG__DIR", ""),
            ("CHATROOM__LOGIC__QUEUE__CAPACITY", "10"),
        ])
        .unwrap();
        assert!(c.log.dir.as_os_str().is_empty());
    }

    #[test]
    fn a_file_setting_an_ignored_key_is_refused() {
        let dir = std::env::temp_dir().join(format!("chatroom-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("standalone.toml");
        std::fs::write(&path, "[job.log]\ndir = \"elsewhere\"\n").unwrap();
        let e = StandaloneConfig::load_with_env(Some(&path), Vec::new())
            .unwrap_err()
            .to_string();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(e.contains("job.log.dir"), "{e}");
    }
}

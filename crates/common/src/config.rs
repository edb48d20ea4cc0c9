//! Typed configuration: one TOML per service, every key overridable from the
//! environment, loaded once at start-up and passed down.
//!
//! Layering, lowest first: the service's built-in defaults (a TOML string
//! compiled into the binary), the file named on the command line (or by
//! `CHATROOM_CONFIG`), then environment variables `CHATROOM__SECTION__KEY`
//! (for example `CHATROOM__WS__ADDR=0.0.0.0:8080`). A bad or missing value
//! stops the process with an error naming the key.
//!
//! Durations are written with their unit in the value (`window = "10ms"`,
//! `heartbeat = "30s"`, `CHATROOM__BATCH__WINDOW=10ms`), read by
//! [`duration`]; a bare number is refused, naming the key. A key of the
//! old `<name>_ms` / `<name>_secs` form is refused with its new name.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::{DeserializeOwned, Deserializer, Visitor};

/// Environment variable prefix for overrides.
pub const ENV_PREFIX: &str = "CHATROOM";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config: {0}")]
    Load(#[from] config::ConfigError),
    #[error("config key `{key}`: {msg}")]
    Invalid { key: String, msg: String },
    /// A duration key of the old form (`window_ms`): names the new key and
    /// the value to write there.
    #[error(
        "config key `{old}` was renamed `{new}`; write the unit in the value, e.g. `{example}`"
    )]
    Renamed {
        old: String,
        new: String,
        example: String,
    },
}

impl ConfigError {
    pub fn invalid(key: impl Into<String>, msg: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            msg: msg.into(),
        }
    }
}

/// Implemented by every service config: checks what serde cannot (ranges,
/// non-empty lists), naming the offending key.
pub trait Validate {
    fn validate(&self) -> Result<(), ConfigError>;
}

/// The one way a service's config is loaded: its built-in defaults, the
/// optional file, then the environment. A service names its defaults; the
/// rest is shared.
pub trait Load: DeserializeOwned + Validate {
    /// The built-in defaults (TOML), compiled into the binary.
    fn defaults() -> std::borrow::Cow<'static, str>;

    /// Defaults, then the optional file, then the process environment.
    fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(file, std::env::vars())
    }

    /// Like [`Load::load`], with the environment given explicitly.
    fn load_with_env(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        load_with_env(&Self::defaults(), file, env)
    }

    /// Defaults plus explicit `CHATROOM__...` overrides only (tests, embedding).
    fn from_overrides<'a>(
        overrides: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, ConfigError> {
        Self::load_with_env(
            None,
            overrides
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }
}

/// Loads `T` from built-in `defaults`, an optional file and the environment.
pub fn load<T: DeserializeOwned + Validate>(
    defaults: &str,
    file: Option<&Path>,
) -> Result<T, ConfigError> {
    load_with_env(defaults, file, std::env::vars())
}

/// Like [`load`], with the environment given explicitly (tests).
pub fn load_with_env<T: DeserializeOwned + Validate>(
    defaults: &str,
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<T, ConfigError> {
    let env: Vec<(String, String)> = env.into_iter().collect();
    refuse_renamed(&values_set(file, env.clone())?)?;
    let cfg: T = layers(Some(defaults), file, env)
        .build()?
        .try_deserialize()?;
    cfg.validate()?;
    Ok(cfg)
}

/// The dotted keys the file and the environment set (the defaults left
/// out), e.g. `conn.log.dir`: for a binary that must refuse keys it would
/// ignore.
pub fn keys_set(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<String>, ConfigError> {
    Ok(values_set(file, env)?.into_iter().map(|(k, _)| k).collect())
}

/// The dotted keys the file and the environment set, with their values.
fn values_set(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<(String, serde_json::Value)>, ConfigError> {
    fn walk(prefix: &str, v: serde_json::Value, out: &mut Vec<(String, serde_json::Value)>) {
        match v {
            serde_json::Value::Object(m) if !m.is_empty() => {
                for (k, v) in m {
                    let key = if prefix.is_empty() {
                        k
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            v => out.push((prefix.to_string(), v)),
        }
    }
    let tree: serde_json::Value = layers(None, file, env).build()?.try_deserialize()?;
    let mut out = Vec::new();
    walk("", tree, &mut out);
    out.retain(|(k, _)| !k.is_empty());
    Ok(out)
}

/// Refuses the first key of the old form `<name>_ms` / `<name>_secs` (a
/// duration before units went into the values), naming its new key and
/// the value to write there, rather than failing on an unknown key or, in
/// a section that tolerates unknown keys, silently ignoring it.
fn refuse_renamed(set: &[(String, serde_json::Value)]) -> Result<(), ConfigError> {
    for (key, value) in set {
        let (stem, unit, example) = if let Some(stem) = key.strip_suffix("_ms") {
            (stem, "ms", 10)
        } else if let Some(stem) = key.strip_suffix("_secs") {
            (stem, "s", 30)
        } else {
            continue;
        };
        let n = match value {
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::String(s) if s.trim().parse::<u64>().is_ok() => s.trim().to_string(),
            _ => example.to_string(),
        };
        let name = stem.rsplit('.').next().unwrap_or(stem);
        return Err(ConfigError::Renamed {
            old: key.clone(),
            new: stem.to_string(),
            example: format!("{name} = \"{n}{unit}\""),
        });
    }
    Ok(())
}

/// Reads a [`Duration`] written with its unit: `"10ms"`, `"2s"`, `"1m"`,
/// `"1h 30m"` (humantime's syntax). A bare number is refused: its unit
/// would be a guess. Use as `#[serde(deserialize_with = "...::duration")]`.
pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = Duration;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a duration with its unit, e.g. \"10ms\", \"2s\", \"1m\"")
        }
        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Duration, E> {
            humantime::parse_duration(s.trim()).map_err(|e| {
                E::custom(format!(
                    "{s:?} is not a duration ({e}); write it with its unit, e.g. \"10ms\", \"2s\", \"1m\""
                ))
            })
        }
        fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Duration, E> {
            Err(E::custom(format!(
                "{n} has no unit; write it in the value, e.g. \"{n}ms\" or \"{n}s\""
            )))
        }
        fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Duration, E> {
            self.visit_u64(n.unsigned_abs())
        }
        fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<Duration, E> {
            Err(E::custom(format!(
                "{n} has no unit; write it in the value, e.g. \"{n}s\""
            )))
        }
    }
    d.deserialize_any(V)
}

/// [`duration`] with `key` named in its error: for a field of a tagged
/// enum (`discovery`, `queue`), where serde buffers the section and the
/// error would otherwise name the section only.
pub fn duration_for<'de, D: Deserializer<'de>>(key: &str, d: D) -> Result<Duration, D::Error> {
    duration(d).map_err(|e| serde::de::Error::custom(format!("{key}: {e}")))
}

/// A duration as config writes it (`10ms`, `1m 30s`), for messages.
pub fn show(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// `Err` naming `key` unless `min <= d <= max`; the message names the
/// bounds with units ("must be <= 1m", "must be 100ms..=1h").
pub fn check_duration(
    key: &str,
    d: Duration,
    min: Duration,
    max: Duration,
) -> Result<(), ConfigError> {
    if (min..=max).contains(&d) {
        return Ok(());
    }
    let msg = if max == Duration::MAX {
        format!("must be >= {}", show(min))
    } else if min.is_zero() {
        format!("must be <= {}", show(max))
    } else {
        format!("must be {}..={}", show(min), show(max))
    };
    Err(ConfigError::invalid(key, msg))
}

/// `Err` naming `key` when `d` is zero.
pub fn check_positive(key: &str, d: Duration) -> Result<(), ConfigError> {
    if d.is_zero() {
        return Err(ConfigError::invalid(key, "must be > 0"));
    }
    Ok(())
}

/// `Err` naming `key` unless `d` is whole seconds: for what is kept or sent
/// in seconds (etcd leases, Redis expiries, the heartbeat told to clients).
pub fn check_whole_seconds(key: &str, d: Duration) -> Result<(), ConfigError> {
    if d.subsec_nanos() != 0 {
        return Err(ConfigError::invalid(
            key,
            format!(
                "must be whole seconds (it is kept in seconds), not {}",
                show(d)
            ),
        ));
    }
    Ok(())
}

/// The sources, lowest first: defaults, the file, then the environment.
fn layers(
    defaults: Option<&str>,
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> config::ConfigBuilder<config::builder::DefaultState> {
    let mut builder = config::Config::builder();
    if let Some(defaults) = defaults {
        builder = builder.add_source(config::File::from_str(defaults, config::FileFormat::Toml));
    }
    if let Some(file) = file {
        builder = builder.add_source(
            config::File::from(file)
                .format(config::FileFormat::Toml)
                .required(true),
        );
    }
    let env: config::Map<String, String> = env.into_iter().collect();
    builder = builder.add_source(
        config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__")
            .list_separator(",")
            .with_list_parse_key("discovery.endpoints")
            .with_list_parse_key("discovery.logic")
            .with_list_parse_key("discovery.conn")
            .with_list_parse_key("queue.nsqd_tcp_addresses")
            .with_list_parse_key("queue.lookupd_http_addresses")
            .with_list_parse_key("conn.discovery.logic")
            .try_parsing(true)
            .source(Some(env)),
    );
    builder
}

/// The config file named by `--config PATH` or `CHATROOM_CONFIG`, if any.
pub fn file_from_args() -> Option<PathBuf> {
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--config" || a == "-c" {
            return args.next().map(PathBuf::from);
        }
        if let Some(p) = a.strip_prefix("--config=") {
            return Some(PathBuf::from(p));
        }
    }
    std::env::var_os("CHATROOM_CONFIG").map(PathBuf::from)
}

/// Identity of this node in the cluster.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Unique node id; empty means "derive from host name and pid".
    #[serde(default)]
    pub id: String,
}

impl NodeConfig {
    /// The configured id, or `<prefix>-<host>-<pid>` when none was given.
    pub fn id_or(&self, prefix: &str) -> String {
        if !self.id.is_empty() {
            return self.id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        format!("{prefix}-{host}-{}", std::process::id())
    }
}

/// Where logs go.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Folder of `live.log` (daily rolling); empty: stdout only.
    pub dir: PathBuf,
    /// Default filter when `RUST_LOG` is not set (EnvFilter syntax).
    pub level: String,
}

/// The operator listener (`/metrics`, `/healthz`, `/readyz`) of conn and job.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// `host:port`; empty: no admin listener.
    #[serde(default)]
    pub addr: String,
}

impl AdminConfig {
    /// The address to bind, or `None` when the listener is off.
    pub fn socket_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        let a = self.addr.trim();
        if a.is_empty() {
            return Ok(None);
        }
        a.parse()
            .map(Some)
            .map_err(|e| ConfigError::invalid("admin.addr", format!("{a:?}: {e}")))
    }
}

impl Validate for AdminConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.socket_addr().map(|_| ())
    }
}

/// What `--check-config` on the command line asks: load and validate the
/// config (defaults, file, `CHATROOM__*` environment), print it, exit 0;
/// an invalid config exits non-zero naming the key, like a normal start.
pub fn check_config_requested() -> bool {
    std::env::args().skip(1).any(|a| a == "--check-config")
}

/// Prints the loaded config for `--check-config` (the binary then exits).
#[allow(clippy::print_stdout)]
pub fn print_checked<T: std::fmt::Debug>(service: &str, file: Option<&Path>, cfg: &T) {
    let from = file.map_or_else(
        || "built-in defaults".to_string(),
        |f| f.display().to_string(),
    );
    println!("{service}: config OK ({from} + environment)\n{cfg:#?}");
}

/// A gRPC listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcConfig {
    pub addr: SocketAddr,
    /// Address other nodes dial (`host:port`); default: `addr`.
    #[serde(default)]
    pub advertise: String,
}

impl GrpcConfig {
    /// The `http://host:port` URI other nodes should use to reach this one,
    /// given the address the listener actually bound.
    pub fn advertise_uri(&self, bound: SocketAddr) -> String {
        if self.advertise.is_empty() {
            format!("http://{bound}")
        } else if self.advertise.starts_with("http://") {
            self.advertise.clone()
        } else {
            format!("http://{}", self.advertise)
        }
    }
}

/// JWT settings shared by whoever issues or checks tokens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// HMAC secret (HS256).
    pub secret: String,
    /// Lifetime of issued tokens.
    #[serde(deserialize_with = "duration")]
    pub ttl: Duration,
}

impl Validate for TokenConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.secret.len() < 16 {
            return Err(ConfigError::invalid(
                "token.secret",
                "must be at least 16 bytes",
            ));
        }
        check_positive("token.ttl", self.ttl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct T {
        batch: B,
    }
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct B {
        #[serde(deserialize_with = "duration")]
        window: Duration,
    }
    impl Validate for T {
        fn validate(&self) -> Result<(), ConfigError> {
            check_duration(
                "batch.window",
                self.batch.window,
                Duration::ZERO,
                Duration::from_secs(60),
            )
        }
    }
    const D: &str = "[batch]\nwindow = \"10ms\"\n";

    fn load(v: &[(&str, &str)]) -> Result<T, String> {
        let env = v.iter().map(|(a, b)| (a.to_string(), b.to_string()));
        load_with_env::<T>(D, None, env).map_err(|e| e.to_string())
    }

    #[test]
    fn durations_are_written_with_their_unit() {
        assert_eq!(load(&[]).unwrap().batch.window, Duration::from_millis(10));
        for (v, d) in [
            ("10ms", Duration::from_millis(10)),
            ("2s", Duration::from_secs(2)),
            ("1m", Duration::from_secs(60)),
            ("1s 500ms", Duration::from_millis(1500)),
        ] {
            let t = load(&[("CHATROOM__BATCH__WINDOW", v)]).unwrap();
            assert_eq!(t.batch.window, d, "{v}");
        }
    }

    #[test]
    fn a_duration_without_a_unit_is_refused_naming_the_key() {
        for v in ["10", "10 parsecs", ""] {
            let e = load(&[("CHATROOM__BATCH__WINDOW", v)]).unwrap_err();
            assert!(e.contains("batch.window"), "{v:?}: {e}");
        }
        let e = load(&[("CHATROOM__BATCH__WINDOW", "10")]).unwrap_err();
        assert!(e.contains("no unit") && e.contains("\"10ms\""), "{e}");
        let e = load_with_env::<T>("[batch]\nwindow = 10\n", None, Vec::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("batch.window") && e.contains("no unit"), "{e}");
    }

    #[test]
    fn range_checks_name_the_key_and_the_bounds_with_units() {
        let e = load(&[("CHATROOM__BATCH__WINDOW", "61s")]).unwrap_err();
        assert!(e.contains("`batch.window`: must be <= 1m"), "{e}");
        let e = check_duration(
            "k",
            Duration::from_millis(5),
            Duration::from_millis(100),
            Duration::from_secs(3600),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("must be 100ms..=1h"), "{e}");
        let e = check_whole_seconds("k", Duration::from_millis(1500))
            .unwrap_err()
            .to_string();
        assert!(e.contains("whole seconds"), "{e}");
        assert!(check_positive("k", Duration::ZERO).is_err());
    }

    #[test]
    fn an_old_key_is_reported_with_its_new_name() {
        let e = load(&[("CHATROOM__BATCH__WINDOW_MS", "10")]).unwrap_err();
        assert!(
            e.contains("`batch.window_ms` was renamed `batch.window`")
                && e.contains("window = \"10ms\""),
            "{e}"
        );
        let e = load(&[("CHATROOM__HEARTBEAT_SECS", "30")]).unwrap_err();
        assert!(
            e.contains("`heartbeat_secs` was renamed `heartbeat`") && e.contains("\"30s\""),
            "{e}"
        );
        let dir = std::env::temp_dir().join(format!("chatroom-dur-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("old.toml");
        std::fs::write(&path, "[discovery]\nlease_ttl_secs = 5\n").unwrap();
        let e = load_with_env::<T>(D, Some(&path), Vec::new())
            .unwrap_err()
            .to_string();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            e.contains("`discovery.lease_ttl_secs` was renamed `discovery.lease_ttl`")
                && e.contains("lease_ttl = \"5s\""),
            "{e}"
        );
    }
}

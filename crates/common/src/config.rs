//! Typed configuration: one TOML per service, every key overridable from the
//! environment, loaded once at start-up and passed down.
//!
//! Layering, lowest first: the service's built-in defaults (a TOML string
//! compiled into the binary), the file named on the command line (or by
//! `CHATROOM_CONFIG`), then environment variables `CHATROOM__SECTION__KEY`
//! (for example `CHATROOM__WS__ADDR=0.0.0.0:8080`). A bad or missing value
//! stops the process with an error naming the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;

/// Environment variable prefix for overrides.
pub const ENV_PREFIX: &str = "CHATROOM";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config: {0}")]
    Load(#[from] config::ConfigError),
    #[error("config key `{key}`: {msg}")]
    Invalid { key: String, msg: String },
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
    fn walk(prefix: &str, v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) if !m.is_empty() => {
                for (k, v) in m {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            _ => out.push(prefix.to_string()),
        }
    }
    let tree: serde_json::Value = layers(None, file, env).build()?.try_deserialize()?;
    let mut out = Vec::new();
    walk("", &tree, &mut out);
    out.retain(|k| !k.is_empty());
    Ok(out)
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
    pub ttl_secs: u64,
}

impl Validate for TokenConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.secret.len() < 16 {
            return Err(ConfigError::invalid(
                "token.secret",
                "must be at least 16 bytes",
            ));
        }
        if self.ttl_secs == 0 {
            return Err(ConfigError::invalid("token.ttl_secs", "must be > 0"));
        }
        Ok(())
    }
}

/// Milliseconds from config as a `Duration`.
pub fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

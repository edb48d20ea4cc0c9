//! Tracing set-up: human-readable logs to stdout and, when a folder is
//! configured, to `<dir>/live.log` (daily rolling, no ANSI codes). The filter
//! comes from `RUST_LOG`, else from the config's `log.level`.

use std::io::IsTerminal;

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogConfig;

/// Keeps the file writer flushing; drop it last, at process exit.
pub struct LogGuard {
    _file: Option<WorkerGuard>,
}

/// Why logging could not start; each names the path it could not use (the
/// OS's reason is the `source`).
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("log.dir = {}: cannot create the folder", .dir.display())]
    Dir {
        dir: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("log.dir = {}: cannot open {}/live.log", .dir.display(), .dir.display())]
    File {
        dir: std::path::PathBuf,
        source: tracing_appender::rolling::InitError,
    },
    #[error("a global tracing subscriber is already installed")]
    AlreadySet,
}

/// Installs the global subscriber. Call once, from `main`.
pub fn init(service: &str, log: &LogConfig) -> Result<LogGuard, TelemetryError> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&log.level));
    // Colours only for a person at a terminal, never into pipes or files.
    let ansi = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let stdout = tracing_subscriber::fmt::layer()
        .with_target(true)
        .with_ansi(ansi);
    let (file_layer, guard) = if log.dir.as_os_str().is_empty() {
        (None, None)
    } else {
        std::fs::create_dir_all(&log.dir).map_err(|source| TelemetryError::Dir {
            dir: log.dir.clone(),
            source,
        })?;
        // The builder, not `rolling::daily`, which panics when it cannot
        // open the file.
        let appender = tracing_appender::rolling::RollingFileAppender::builder()
            .rotation(tracing_appender::rolling::Rotation::DAILY)
            .filename_prefix("live.log")
            .build(&log.dir)
            .map_err(|source| TelemetryError::File {
                dir: log.dir.clone(),
                source,
            })?;
        let (writer, guard) = tracing_appender::non_blocking(appender);
        let layer = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_target(true)
            .with_writer(writer);
        (Some(layer), Some(guard))
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(stdout)
        .with(file_layer)
        .try_init()
        .map_err(|_| TelemetryError::AlreadySet)?;
    tracing::info!(service, "logging started");
    Ok(LogGuard { _file: guard })
}

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

/// Installs the global subscriber. Call once, from `main`.
pub fn init(service: &str, log: &LogConfig) -> Result<LogGuard, std::io::Error> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&log.level));
    // Colours only for a person at a terminal, never into pipes or files.
    let ansi = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let stdout = tracing_subscriber::fmt::layer()
        .with_target(true)
        .with_ansi(ansi);
    let (file_layer, guard) = if log.dir.as_os_str().is_empty() {
        (None, None)
    } else {
        std::fs::create_dir_all(&log.dir)?;
        let appender = tracing_appender::rolling::daily(&log.dir, "live.log");
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
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    tracing::info!(service, "logging started");
    Ok(LogGuard { _file: guard })
}

//! The job binary: loads config, sets up logging and runs the service until
//! SIGTERM or ctrl-c.

use std::process::ExitCode;

use anyhow::Context;
use chatroom_common::config::Load;
use chatroom_job::{JobConfig, run};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> ExitCode {
    chatroom_common::startup::exit("job", serve().await)
}

async fn serve() -> anyhow::Result<()> {
    let file = chatroom_common::config::file_from_args();
    let cfg = JobConfig::load(file.as_deref()).context("loading job config")?;
    if chatroom_common::config::check_config_requested() {
        chatroom_common::config::print_checked("job", file.as_deref(), &cfg);
        return Ok(());
    }
    let _log = chatroom_common::telemetry::init("job", &cfg.log)?;
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        chatroom_common::stop_signal().await;
        tracing::info!("stop signal received");
        on_signal.cancel();
    });
    run(cfg, None, shutdown).await?;
    Ok(())
}

//! chatroom-conn: loads config, sets up logging, serves until SIGTERM/ctrl-c.

use std::process::ExitCode;

use anyhow::Context;
use chatroom_common::config::Load;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> ExitCode {
    chatroom_common::startup::exit("conn", serve().await)
}

async fn serve() -> anyhow::Result<()> {
    let file = chatroom_common::config::file_from_args();
    let cfg = chatroom_conn::ConnConfig::load(file.as_deref()).context("loading config")?;
    if chatroom_common::config::check_config_requested() {
        chatroom_common::config::print_checked("conn", file.as_deref(), &cfg);
        return Ok(());
    }
    let _log = chatroom_common::telemetry::init("conn", &cfg.log)?;
    let listeners = chatroom_conn::Listeners::bind(&cfg).await?;
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        chatroom_common::stop_signal().await;
        stop.cancel();
    });
    chatroom_conn::run(cfg, listeners, shutdown).await?;
    Ok(())
}

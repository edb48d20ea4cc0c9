//! chatroom: the standalone server (`cargo run --release`).

use anyhow::Context;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let file = chatroom_common::config::file_from_args();
    let cfg = chatroom::StandaloneConfig::load(file.as_deref()).context("loading config")?;
    if chatroom_common::config::check_config_requested() {
        chatroom_common::config::print_checked("chatroom", file.as_deref(), &cfg);
        return Ok(());
    }
    let _log = chatroom_common::telemetry::init("chatroom", &cfg.log)?;
    let listeners = chatroom::Listeners::bind(&cfg)
        .await
        .with_context(|| format!("binding {} / {}", cfg.conn.ws.addr, cfg.logic.http.addr))?;
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        chatroom_common::stop_signal().await;
        stop.cancel();
    });
    chatroom::run(cfg, listeners, shutdown).await?;
    Ok(())
}

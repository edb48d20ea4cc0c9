//! The `chatroom-logic` binary: load config, set up logging, bind, run until
//! SIGTERM or ctrl-c. Everything else lives in the library.

use std::process::ExitCode;

use anyhow::Context;
use chatroom_common::config::{self, Load};
use chatroom_logic::{Listeners, LogicConfig};
use chatroom_queue::MemoryQueue;
use chatroom_queue::QueueConfig;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> ExitCode {
    chatroom_common::startup::exit("logic", serve().await)
}

async fn serve() -> anyhow::Result<()> {
    let file = config::file_from_args();
    let cfg = LogicConfig::load(file.as_deref()).context("loading logic config")?;
    if config::check_config_requested() {
        config::print_checked("logic", file.as_deref(), &cfg);
        return Ok(());
    }
    let _log = chatroom_common::telemetry::init("logic", &cfg.log).context("setting up logging")?;

    // A memory queue only makes sense when job runs in the same process (the
    // `chatroom` binary). Alone, logic still starts so its API can be tried,
    // but nothing consumes what it accepts.
    let memory_queue = match &cfg.queue {
        QueueConfig::Memory { capacity } => {
            tracing::warn!(
                "queue.kind = \"memory\" in a standalone logic process: messages are accepted \
                 but no job consumes them; use the chatroom binary or an nsq queue"
            );
            Some(MemoryQueue::new(*capacity))
        }
        QueueConfig::Nsq { .. } => None,
    };

    let listeners = Listeners::bind(&cfg).context("binding listeners")?;
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        chatroom_common::stop_signal().await;
        stop.cancel();
    });
    chatroom_logic::run(cfg, listeners, memory_queue, shutdown)
        .await
        .context("logic failed")?;
    Ok(())
}

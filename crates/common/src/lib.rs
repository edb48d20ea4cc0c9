//! Shared by every chatroom service: typed config, tracing set-up, sign-in
//! tokens, metrics, the merged batch codec and the generated wire types.
//! Service discovery and the queue between logic and job are crates of their
//! own (`chatroom-discovery`, `chatroom-queue`), so that a crate that needs
//! neither compiles neither etcd-client nor the NSQ client.

pub mod admin;
pub mod batch;
pub mod chat;
pub mod config;
pub mod metrics;
pub mod rooms;
pub mod startup;
pub mod telemetry;
pub mod token;

/// Wire types generated from `api/*.proto` by `build.rs`.
pub mod proto {
    pub mod protocol {
        tonic::include_proto!("chatroom.protocol");
    }
    pub mod logic {
        tonic::include_proto!("chatroom.logic");
    }
    pub mod conn {
        tonic::include_proto!("chatroom.conn");
    }
    pub mod queue {
        tonic::include_proto!("chatroom.queue");
    }
}

/// Waits for SIGTERM or ctrl-c; used by the binaries to start shutdown.
pub async fn stop_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

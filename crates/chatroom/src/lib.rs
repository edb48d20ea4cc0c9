//! Standalone chatroom: conn, logic and job in one process, talking over
//! loopback gRPC exactly as in a cluster, with an in-process queue, static
//! discovery and in-memory presence — no etcd, NSQ or Redis needed.

pub mod config;

use std::net::SocketAddr;

use chatroom_common::config::{DiscoveryConfig, QueueConfig};
use chatroom_common::queue::MemoryQueue;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use crate::config::StandaloneConfig;

#[derive(Debug, thiserror::Error)]
pub enum StandaloneError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("conn: {0}")]
    Conn(#[from] chatroom_conn::ConnError),
    #[error("logic: {0}")]
    Logic(#[from] chatroom_logic::LogicError),
    #[error("job: {0}")]
    Job(#[from] chatroom_job::JobError),
    #[error("a service task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// The public sockets: the WebSocket endpoint and the HTTP API.
pub struct Listeners {
    pub ws: TcpListener,
    pub http: TcpListener,
}

impl Listeners {
    pub async fn bind(cfg: &StandaloneConfig) -> std::io::Result<Self> {
        Ok(Listeners {
            ws: TcpListener::bind(cfg.conn.ws.addr).await?,
            http: TcpListener::bind(cfg.logic.http.addr).await?,
        })
    }
}

/// Where a standalone node listens.
#[derive(Debug, Clone, Copy)]
pub struct Addrs {
    pub ws: SocketAddr,
    pub http: SocketAddr,
}

/// Serves until `shutdown`, then stops all three services and waits for them.
pub async fn run(
    mut cfg: StandaloneConfig,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), StandaloneError> {
    let loopback = |l: &TcpListener| l.local_addr();
    let ws = loopback(&listeners.ws)?;
    let http = loopback(&listeners.http)?;

    // The in-process plumbing is fixed: internal gRPC on ephemeral loopback
    // ports, the shared memory queue, and static discovery of each other.
    let capacity = match cfg.logic.queue {
        QueueConfig::Memory { capacity } => capacity,
        _ => 65_536,
    };
    let queue = MemoryQueue::new(capacity);
    cfg.logic.queue = QueueConfig::Memory { capacity };
    cfg.job.queue = QueueConfig::Memory { capacity };
    let logic_grpc = TcpListener::bind("127.0.0.1:0").await?;
    let logic_uri = format!("http://{}", logic_grpc.local_addr()?);
    cfg.logic.discovery = DiscoveryConfig::Static {
        logic: vec![],
        conn: vec![],
    };
    let conn_grpc = TcpListener::bind("127.0.0.1:0").await?;
    let conn_uri = format!("http://{}", conn_grpc.local_addr()?);
    cfg.conn.discovery = DiscoveryConfig::Static {
        logic: vec![logic_uri],
        conn: vec![],
    };
    // job addresses user messages by conn node id: name the one conn node.
    let conn_id = cfg.conn.node.id_or("conn");
    cfg.conn.node.id = conn_id.clone();
    cfg.job.discovery = DiscoveryConfig::Static {
        logic: vec![],
        conn: vec![format!("{conn_id}={conn_uri}")],
    };

    let logic = tokio::spawn(chatroom_logic::run(
        cfg.logic,
        chatroom_logic::Listeners {
            grpc: logic_grpc,
            http: listeners.http,
        },
        Some(queue.clone()),
        shutdown.clone(),
    ));
    let job = tokio::spawn(chatroom_job::run(cfg.job, Some(queue), shutdown.clone()));
    let conn_admin = chatroom_common::admin::bind_config(&cfg.conn.admin)?;
    let conn = tokio::spawn(chatroom_conn::run(
        cfg.conn,
        chatroom_conn::Listeners {
            ws: listeners.ws,
            grpc: conn_grpc,
            admin: conn_admin,
        },
        shutdown.clone(),
    ));
    info!(
        "chatroom standalone: WebSocket ws://{ws}/room, HTTP API http://{http} (POST /msg, POST /tk)"
    );

    let (c, l, j) = tokio::join!(conn, logic, job);
    c??;
    l??;
    j??;
    info!("chatroom stopped");
    Ok(())
}

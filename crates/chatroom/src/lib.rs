//! Standalone chatroom: conn, logic and job in one process, talking over
//! loopback gRPC exactly as in a cluster, with an in-process queue, static
//! discovery and in-memory presence — no etcd, NSQ or Redis needed.

pub mod config;

use std::net::SocketAddr;

use chatroom_discovery::DiscoveryConfig;
use chatroom_queue::MemoryQueue;
use chatroom_queue::QueueConfig;
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
    /// Binds both; an error names the key and address that failed.
    pub async fn bind(cfg: &StandaloneConfig) -> std::io::Result<Self> {
        use chatroom_common::startup::bind;
        Ok(Listeners {
            ws: bind("conn.ws.addr", cfg.conn.ws.addr).await?,
            http: bind("logic.http.addr", cfg.logic.http.addr).await?,
        })
    }
}

/// Where a standalone node listens.
#[derive(Debug, Clone, Copy)]
pub struct Addrs {
    pub ws: SocketAddr,
    pub http: SocketAddr,
}

/// What the process says once it listens: first the page a person opens
/// (when pages are served), then the sockets for programs. An unspecified
/// bind address (0.0.0.0, ::) is shown as loopback, which a browser on this
/// machine can open.
pub fn start_line(ws: SocketAddr, http: SocketAddr, pages: bool) -> String {
    let shown = |a: SocketAddr| {
        if a.ip().is_unspecified() {
            let ip: std::net::IpAddr = if a.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            };
            SocketAddr::new(ip, a.port())
        } else {
            a
        }
    };
    let (ws, http) = (shown(ws), shown(http));
    let api = format!(
        "WebSocket ws://{ws}/room and ws://{ws}/chat, HTTP API http://{http} (POST /msg, POST /tk, IM routes)"
    );
    if pages {
        format!(
            "chatroom standalone: open http://{http}/ (IM chat; room page http://{http}/web/room.html) · {api}"
        )
    } else {
        format!("chatroom standalone (http.web_dir is empty: no pages) · {api}")
    }
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

    let banner = start_line(ws, http, !cfg.logic.http.web_dir.is_empty());
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
    info!("{banner}");

    let (c, l, j) = tokio::join!(conn, logic, job);
    c??;
    l??;
    j??;
    info!("chatroom stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::start_line;

    #[test]
    fn the_start_line_names_the_page_to_open() {
        let l = start_line(
            "127.0.0.1:8080".parse().unwrap(),
            "127.0.0.1:8081".parse().unwrap(),
            true,
        );
        assert!(l.contains("open http://127.0.0.1:8081/ "), "{l}");
        assert!(l.contains("http://127.0.0.1:8081/web/room.html"), "{l}");
        assert!(l.contains("ws://127.0.0.1:8080/room"), "{l}");
        let l = start_line(
            "0.0.0.0:8080".parse().unwrap(),
            "[::]:9".parse().unwrap(),
            true,
        );
        assert!(l.contains("open http://[::1]:9/ "), "{l}");
        assert!(l.contains("ws://127.0.0.1:8080/room"), "{l}");
        let l = start_line(
            "127.0.0.1:8080".parse().unwrap(),
            "127.0.0.1:8081".parse().unwrap(),
            false,
        );
        assert!(!l.contains("open "), "{l}");
    }
}

//! conn: the WebSocket gateway. It holds client sessions (sign-in,
//! heartbeats, room messages, online counts), asks logic about tokens and
//! messages over gRPC, and serves the gRPC push API that job calls with
//! merged room batches.

pub mod bucket;
pub mod chat;
pub mod config;
pub mod frame;
pub mod heartbeat;
pub mod logic_pool;
pub mod online;
pub mod outbox;
pub mod push;
pub mod receive;
pub mod room;
pub mod session;
pub mod stats;
pub mod stream;
pub mod ws;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chatroom_common::proto::conn::conn_server::ConnServer;
use chatroom_discovery::{Discovery, DiscoveryError, Node, Service};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::bucket::Buckets;
pub use crate::config::ConnConfig;
use crate::logic_pool::LogicPool;
use crate::online::Online;
use crate::receive::Receiver;
use crate::stats::Stats;
use crate::stream::Streams;

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("discovery: {0}")]
    Discovery(#[from] DiscoveryError),
    #[error("grpc server: {0}")]
    Grpc(#[from] tonic::transport::Error),
}

/// The sockets conn serves, bound before `run` so callers (tests, the
/// standalone binary) can bind port 0 and learn the real addresses.
pub struct Listeners {
    pub ws: TcpListener,
    pub grpc: TcpListener,
    pub admin: Option<TcpListener>,
}

impl Listeners {
    /// Binds all three; an error names the key and address that failed.
    pub async fn bind(cfg: &ConnConfig) -> std::io::Result<Self> {
        use chatroom_common::startup::bind;
        Ok(Listeners {
            ws: bind("ws.addr", cfg.ws.addr).await?,
            grpc: bind("grpc.addr", cfg.grpc.addr).await?,
            admin: chatroom_common::admin::bind_config(&cfg.admin)?,
        })
    }
}

/// What every session and service of this node shares.
pub struct Ctx {
    pub cfg: ConnConfig,
    pub server: String,
    pub buckets: Arc<Buckets>,
    pub logic: Arc<LogicPool>,
    /// Client room messages to logic, bundled.
    pub receiver: Receiver,
    pub online: Arc<Online>,
    pub stats: Arc<Stats>,
    /// Every room's stream on this node.
    pub streams: Arc<Streams>,
    pub tracker: TaskTracker,
}

/// Serves until `shutdown`, then stops in stages: deregister (job stops
/// pushing here), stop accepting, close every session with Going Away,
/// stop the push server, and wait for every task within the grace period.
pub async fn run(
    cfg: ConnConfig,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), ConnError> {
    let server = cfg.node.id_or("conn");
    let ws_addr = listeners.ws.local_addr()?;
    let grpc_addr = listeners.grpc.local_addr()?;
    let tracker = TaskTracker::new();
    // Background helpers (discovery watch, reports) stop with `bg`;
    // sessions with `sessions`; both only after deregistration.
    let bg = CancellationToken::new();
    let sessions = CancellationToken::new();

    let discovery = Discovery::connect(&cfg.discovery).await?;
    let logic_nodes = discovery
        .watch(Service::Logic, &tracker, bg.clone())
        .await?;
    let stats = Arc::new(Stats::default());
    let logic = Arc::new(LogicPool::new(
        logic_nodes,
        Duration::from_secs(5),
        stats.clone(),
    ));
    let buckets = Arc::new(Buckets::new(cfg.buckets));
    let online = Arc::new(Online::default());
    let streams = Arc::new(Streams::new(cfg.stream.clone(), cfg.buckets));
    tracker.spawn(
        streams.clone().sweep_loop(
            streams
                .cfg
                .reorder_wait
                .clamp(Duration::from_millis(20), Duration::from_secs(1))
                / 2,
            bg.clone(),
        ),
    );
    let ctx = Arc::new(Ctx {
        server: server.clone(),
        buckets: buckets.clone(),
        logic: logic.clone(),
        receiver: Receiver::start(logic.clone(), &tracker, bg.clone()),
        online: online.clone(),
        stats: stats.clone(),
        streams: streams.clone(),
        tracker: tracker.clone(),
        cfg,
    });

    let health = chatroom_common::admin::Health::new("conn", &["discovery"]);
    let registry = Arc::new(stats.registry(&server));
    let stream_registry = Arc::new(streams.registry(&server));
    chatroom_common::admin::spawn_opt(
        listeners.admin,
        &health,
        vec![registry, stream_registry],
        bg.clone(),
    );
    let grpc_stop = CancellationToken::new();
    let grpc = {
        let svc = push::PushService {
            buckets: buckets.clone(),
            streams: streams.clone(),
            stats: stats.clone(),
            server: server.clone(),
            logic: logic.clone(),
            tracker: tracker.clone(),
            local_epoch: stream::wall_ms().max(1),
        };
        let incoming =
            tonic::transport::server::TcpIncoming::from(listeners.grpc).with_nodelay(Some(true));
        let stop = grpc_stop.clone();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(health.grpc_service("chatroom.conn.Conn").await)
                .add_service(ConnServer::new(svc))
                .serve_with_incoming_shutdown(incoming, async move { stop.cancelled().await }),
        )
    };

    let me = Node {
        id: server.clone(),
        uri: ctx.cfg.grpc.advertise_uri(grpc_addr),
    };
    let registration = discovery
        .register(Service::Conn, me, &tracker, bg.clone())
        .await?;
    health.set("discovery", true).await;
    tracker.spawn(online::report_loop(
        server.clone(),
        buckets,
        logic,
        online,
        stats.clone(),
        ctx.cfg.report_online,
        bg.clone(),
    ));
    info!(%server, ws = %ws_addr, grpc = %grpc_addr, "conn serving ws://{ws_addr}/room");

    accept_loop(&listeners.ws, &ctx, &sessions, &shutdown).await;

    info!("shutting down: deregistering");
    health.set_all(false).await;
    registration.deregister().await;
    drop(listeners.ws);
    info!(sessions = Stats::get(&stats.sessions), "closing sessions");
    sessions.cancel();
    bg.cancel();
    tracker.close();
    let grace = ctx.cfg.shutdown_grace;
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        warn!(?grace, "tasks still running after the grace period");
    }
    grpc_stop.cancel();
    match tokio::time::timeout(Duration::from_secs(2), grpc).await {
        Ok(Ok(Err(e))) => warn!(error = %e, "grpc server ended with an error"),
        Err(_) => warn!("grpc server did not stop in time"),
        _ => {}
    }
    info!("conn stopped");
    Ok(())
}

async fn accept_loop(
    listener: &TcpListener,
    ctx: &Arc<Ctx>,
    sessions: &CancellationToken,
    shutdown: &CancellationToken,
) {
    let limit = Arc::new(Semaphore::new(ctx.cfg.ws.max_connections));
    let next_id = AtomicU64::new(1);
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            ctx.stats.refused.fetch_add(1, Ordering::Relaxed);
            warn!(%peer, max = ctx.cfg.ws.max_connections, "connection limit reached; refusing");
            drop(stream);
            continue;
        };
        ctx.stats.accepted.fetch_add(1, Ordering::Relaxed);
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        // Spawned as it is: wrapped in another async block, the session's
        // future would be kept twice (captured, then moved to be awaited).
        ctx.tracker.spawn(session::serve(
            stream,
            peer,
            ctx.clone(),
            id,
            sessions.clone(),
            permit,
        ));
    }
}

/// Address helper for logs and tests.
pub fn ws_url(addr: SocketAddr) -> String {
    format!("ws://{addr}/room")
}

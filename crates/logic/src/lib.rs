//! chatroom **logic**: verifies sign-in tokens for conn nodes over gRPC, owns
//! the business rules for room messages, keeps presence and online counts,
//! publishes accepted messages to the queue for job, and serves the HTTP API.
//!
//! [`run`] is the whole service; the `chatroom-logic` binary, the all-in-one
//! `chatroom` binary and the tests all start it the same way:
//!
//! ```no_run
//! # async fn demo(cfg: chatroom_logic::LogicConfig) -> Result<(), Box<dyn std::error::Error>> {
//! let listeners = chatroom_logic::Listeners::bind(&cfg)?;
//! let grpc_addr = listeners.grpc.local_addr()?;
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! chatroom_logic::run(cfg, listeners, None, shutdown).await?;
//! # Ok(()) }
//! ```

pub mod app;
pub mod body;
pub mod config;
pub mod error;
pub mod grpc;
pub mod http;
pub mod id;
pub mod im;
pub mod metrics;
pub mod pages;
pub mod password;
pub mod presence;
pub mod ratelimit;
pub mod store;
pub mod stream;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use chatroom_common::admin::Health;
use chatroom_common::proto::logic::logic_server::LogicServer;
use chatroom_discovery::{Discovery, Node, Service};
use chatroom_queue::{MemoryQueue, Publisher};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub use crate::config::LogicConfig;
pub use crate::error::LogicError;
use crate::presence::Presence;
use crate::store::Store;

/// The sockets logic serves on, bound before [`run`] so callers can bind
/// port 0 and learn the real addresses first.
pub struct Listeners {
    pub grpc: TcpListener,
    pub http: TcpListener,
}

impl Listeners {
    /// Binds `grpc.addr` and `http.addr`. Must be called inside a Tokio
    /// runtime (the sockets are registered with it).
    pub fn bind(cfg: &LogicConfig) -> io::Result<Self> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(io::Error::other(
                "Listeners::bind must be called inside a Tokio runtime",
            ));
        }
        Ok(Listeners {
            grpc: bind(cfg.grpc.addr, "grpc.addr")?,
            http: bind(cfg.http.addr, "http.addr")?,
        })
    }
}

fn bind(addr: std::net::SocketAddr, key: &str) -> io::Result<TcpListener> {
    let l = std::net::TcpListener::bind(addr)
        .map_err(|e| io::Error::new(e.kind(), format!("{key} = {addr}: {e}")))?;
    l.set_nonblocking(true)?;
    TcpListener::from_std(l)
}

/// Runs logic until `shutdown` is cancelled (or a server fails), then
/// deregisters, stops accepting, lets in-flight requests finish within
/// `shutdown_grace`, closes the publisher and waits for every task.
///
/// `memory_queue` is the in-process queue shared with job (standalone); it
/// is required when `queue.kind = "memory"`.
pub async fn run(
    cfg: LogicConfig,
    listeners: Listeners,
    memory_queue: Option<MemoryQueue>,
    shutdown: CancellationToken,
) -> Result<(), LogicError> {
    let node_id = cfg.node.id_or("logic");
    metrics::init();
    let grpc_addr = listeners.grpc.local_addr()?;
    let http_addr = listeners.http.local_addr()?;

    // Outside services first: a missing Redis/NSQ/etcd stops start-up with a
    // clear error instead of failing every request later.
    let presence = Presence::connect(&cfg.presence)
        .await
        .map_err(LogicError::at("presence.url", &cfg.presence.url))?;
    let streams = stream::Streams::connect(&cfg.presence, &cfg.stream)
        .await
        .map_err(LogicError::at("presence.url", &cfg.presence.url))?;
    if matches!(
        cfg.discovery,
        chatroom_discovery::DiscoveryConfig::Etcd { .. }
    ) && cfg.presence.kind == config::PresenceKind::Memory
    {
        // Each such node would number rooms on its own.
        warn!(
            "several logic nodes need presence.kind = \"redis\": with \"memory\" each numbers room streams on its own"
        );
    }
    let publisher = Publisher::connect(&cfg.queue, memory_queue.as_ref()).await?;
    let discovery = Discovery::connect(&cfg.discovery).await?;
    let store = Store::connect(&cfg.store)
        .await
        .map_err(LogicError::at("store.url", &cfg.store.url))?;

    let app = Arc::new(app::App::new(
        &cfg,
        node_id.clone(),
        presence,
        streams,
        publisher.clone(),
        store.clone(),
    ));
    let tracker = TaskTracker::new();
    // Cancelled after deregistration: tells the servers to stop accepting.
    let stop_serving = CancellationToken::new();

    // Ready while registered, with the queue connected and the store answering.
    let health = Health::new("logic", &["discovery"]);
    {
        let publisher = publisher.clone();
        health.add_probe("queue", move || {
            let ok = publisher.connected();
            async move { ok.then_some(()).ok_or_else(|| "not connected".to_string()) }
        });
        let store = store.clone();
        health.add_probe("store", move || {
            let store = store.clone();
            async move { store.ping().await.map_err(|e| e.to_string()) }
        });
    }
    let grpc = tonic::transport::Server::builder()
        .layer(metrics::GrpcMetricsLayer)
        .add_service(health.grpc_service("chatroom.logic.Logic").await)
        .add_service(LogicServer::new(grpc::LogicService::new(app.clone())))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listeners.grpc).with_nodelay(Some(true)),
            stop_serving.clone().cancelled_owned(),
        );
    let mut grpc_task: JoinHandle<Result<(), LogicError>> =
        tracker.spawn(async move { grpc.await.map_err(LogicError::Grpc) });

    let admin = chatroom_common::admin::router(chatroom_common::admin::Admin {
        health: health.clone(),
        registries: Vec::new(),
    });
    let routes = http::router(app.clone())
        .merge(pages::router(&cfg.http.web_dir))
        .merge(admin);
    let http = axum::serve(listeners.http, routes)
        .with_graceful_shutdown(stop_serving.clone().cancelled_owned());
    let mut http_task: JoinHandle<Result<(), LogicError>> =
        tracker.spawn(async move { http.await.map_err(LogicError::Http) });

    if let Presence::Memory(m) = &app.rooms.presence() {
        let (m, stop) = (m.clone(), shutdown.clone());
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(m.sweep_period());
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => m.sweep(tokio::time::Instant::now()),
                }
            }
        });
    }

    let node = Node {
        id: node_id.clone(),
        uri: cfg.grpc.advertise_uri(grpc_addr),
    };
    let registration = match discovery
        .register(Service::Logic, node.clone(), &tracker, shutdown.clone())
        .await
    {
        Ok(r) => r,
        Err(e) => {
            stop_serving.cancel();
            finish(
                &tracker,
                &publisher,
                grpc_task,
                http_task,
                cfg.shutdown_grace,
            )
            .await;
            store.close().await;
            return Err(e.into());
        }
    };
    health.set("discovery", true).await;
    info!(node = %node_id, grpc = %grpc_addr, http = %http_addr, uri = %node.uri, "logic started");

    // Until asked to stop, or until a server dies on its own.
    let mut result = Ok(());
    tokio::select! {
        _ = shutdown.cancelled() => info!("logic shutting down"),
        r = &mut grpc_task => result = server_exit("gRPC", r),
        r = &mut http_task => result = server_exit("HTTP", r),
    }

    // conn nodes stop picking us before we stop answering them.
    health.set_all(false).await;
    registration.deregister().await;
    stop_serving.cancel();
    finish(
        &tracker,
        &publisher,
        grpc_task,
        http_task,
        cfg.shutdown_grace,
    )
    .await;
    store.close().await;
    info!("logic stopped");
    result
}

/// A server that returned before shutdown is an error even if it says Ok.
fn server_exit(
    name: &'static str,
    r: Result<Result<(), LogicError>, tokio::task::JoinError>,
) -> Result<(), LogicError> {
    match r {
        Ok(Ok(())) => {
            warn!(server = name, "server stopped unexpectedly");
            Err(LogicError::Io(io::Error::other(format!(
                "{name} server stopped unexpectedly"
            ))))
        }
        Ok(Err(e)) => {
            warn!(server = name, error = %e, "server failed");
            Err(e)
        }
        Err(_) => Err(LogicError::Panicked(name)),
    }
}

/// Drains both servers within the grace period, then closes the publisher
/// and waits for the remaining tasks (discovery, sweeper).
async fn finish(
    tracker: &TaskTracker,
    publisher: &Publisher,
    grpc: JoinHandle<Result<(), LogicError>>,
    http: JoinHandle<Result<(), LogicError>>,
    grace: Duration,
) {
    drain("gRPC", grpc, grace).await;
    drain("HTTP", http, grace).await;
    publisher.close().await;
    tracker.close();
    if tokio::time::timeout(grace.max(Duration::from_secs(1)), tracker.wait())
        .await
        .is_err()
    {
        warn!("background tasks did not stop in time");
    }
}

/// Waits for a server to finish its in-flight requests; past `grace` it is
/// aborted (its remaining connections are dropped).
async fn drain<T>(name: &str, mut task: JoinHandle<T>, grace: Duration) {
    if task.is_finished() {
        return;
    }
    if tokio::time::timeout(grace, &mut task).await.is_err() {
        warn!(
            server = name,
            grace_ms = grace.as_millis() as u64,
            "drain timed out; closing connections"
        );
        task.abort();
    }
}

//! The job service: consumes room messages from the queue, merges them per
//! room into batches and pushes every batch to every conn node that
//! discovery says is alive. Queue messages are acknowledged only once the
//! push is settled (see `ack`).
//!
//! Tasks, all tracked:
//! - the consumer: queue -> decoded messages (bounded channel);
//! - the batching task: owns the per-room [`batcher::Batcher`] and the node
//!   [`pool::Pool`], follows discovery, hands each flushed batch to the pool;
//! - one worker per conn node (`node`), pushing its own bounded queue;
//! - the periodic counter report (`metrics`) and the discovery watch.
//!
//! Shutdown: cancelling `shutdown` stops consumption; the consumer hands out
//! what the queue already gave it and ends; the batching task flushes every
//! pending room and closes the node queues; node workers push what they hold
//! for up to `shutdown_grace`, then are stopped, and every batch they did
//! not push is requeued.

pub mod ack;
pub mod batcher;
pub mod config;
pub mod error;
pub mod metrics;
pub mod node;
pub mod pool;
mod throttle;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chatroom_common::admin::Health;
use chatroom_common::config::{ConfigError, Validate};
use chatroom_common::proto::conn::{JoinRoomReq, PushAllReq, PushUsersReq};
use chatroom_common::proto::protocol::MsgLevel;
use chatroom_common::proto::queue::QueueMsg;
use chatroom_common::proto::queue::queue_msg::Body;
use chatroom_common::rooms;
use chatroom_discovery::{Discovery, NodesRx, Service};
use chatroom_queue::{Delivery, MemoryQueue, Subscriber};
use prost::Message as _;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::ack::{Batch, Target};
use crate::batcher::{Batcher, Seq};
use crate::config::BatchConfig;
pub use crate::config::{DEFAULTS, JobConfig};
pub use crate::error::JobError;
pub use crate::metrics::Metrics;
use crate::pool::Pool;
use crate::throttle::LogThrottle;

/// Decoded messages waiting for the batcher. Small: the batcher never
/// blocks, and the queue (NSQ max-in-flight) bounds what is in flight.
const INTAKE: usize = 1024;

/// How often the counters are logged (when they changed).
const REPORT_EVERY: Duration = Duration::from_secs(10);

/// Runs job until `shutdown` is cancelled and everything consumed has been
/// pushed or requeued. `memory_queue` is the in-process queue shared with
/// logic (standalone); with an NSQ config it is not used.
pub async fn run(
    cfg: JobConfig,
    memory_queue: Option<MemoryQueue>,
    shutdown: CancellationToken,
) -> Result<(), JobError> {
    run_with_metrics(cfg, memory_queue, shutdown, Arc::default()).await
}

/// [`run`], counting into `metrics` (for an embedding process or tests that
/// want to read the counters).
pub async fn run_with_metrics(
    cfg: JobConfig,
    memory_queue: Option<MemoryQueue>,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
) -> Result<(), JobError> {
    cfg.validate()?;
    let admin = chatroom_common::admin::bind_config(&cfg.admin)
        .map_err(|e| ConfigError::invalid("admin.addr", e.to_string()))?;
    run_with_admin(cfg, memory_queue, shutdown, metrics, admin).await
}

/// [`run_with_metrics`] serving `/metrics`, `/healthz` and `/readyz` on
/// `admin` (already bound, so tests can bind port 0) instead of `admin.addr`.
pub async fn run_with_admin(
    cfg: JobConfig,
    memory_queue: Option<MemoryQueue>,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
    admin: Option<tokio::net::TcpListener>,
) -> Result<(), JobError> {
    cfg.validate()?;
    let node_id = cfg.node.id_or("job");
    info!(node = %node_id, "job starting");

    // Background tasks stop with `shutdown`, or when start-up fails below.
    let stop = shutdown.child_token();
    let _stop_on_return = stop.clone().drop_guard();
    let tracker = TaskTracker::new();

    // Ready once discovery is followed and the queue can deliver.
    let health = Health::new("job", &["discovery"]);
    {
        let queue = cfg.queue.clone();
        health.add_probe("queue", move || {
            let ok = chatroom_queue::subscriber_ready(&queue);
            async move {
                if ok {
                    Ok(())
                } else {
                    Err("no nsqd connection and no nsqlookupd answer".to_string())
                }
            }
        });
    }
    let registry = Arc::new(metrics.registry(&node_id));
    chatroom_common::admin::spawn_opt(admin, &health, vec![registry], stop.clone());

    let discovery = Discovery::connect(&cfg.discovery).await?;
    let nodes = discovery
        .watch(Service::Conn, &tracker, stop.clone())
        .await?;
    health.set("discovery", true).await;
    let subscriber = Subscriber::start(
        &cfg.queue,
        memory_queue.as_ref(),
        &node_id,
        &tracker,
        stop.clone(),
    )?;

    {
        let (stop, shutdown) = (stop.clone(), shutdown.clone());
        tracker.spawn(async move {
            stop.cancelled().await;
            if shutdown.is_cancelled() {
                info!("shutdown: stop consuming; draining what the queue already gave us");
            }
        });
    }
    let workers = TaskTracker::new();
    let stop_workers = CancellationToken::new();
    let pool = Pool::new(
        cfg.push.clone(),
        metrics.clone(),
        workers.clone(),
        stop_workers.clone(),
    );
    let (msg_tx, msg_rx) = mpsc::channel(INTAKE);
    tracker.spawn(consume(subscriber, msg_tx, metrics.clone()));
    tracker.spawn(metrics::report_periodically(
        metrics.clone(),
        REPORT_EVERY,
        stop.clone(),
    ));
    let batching = tracker.spawn(batch_loop(cfg.batch.clone(), msg_rx, nodes, pool));
    info!(node = %node_id, "job running");

    // Ends only once the queue is drained after shutdown (or on a panic).
    let batching = batching.await;
    stop.cancel();

    let grace = cfg.shutdown_grace;
    info!(
        grace_ms = grace.as_millis() as u64,
        "shutdown: waiting for node workers to push what they hold"
    );
    workers.close();
    if tokio::time::timeout(grace, workers.wait()).await.is_err() {
        warn!(
            grace_ms = grace.as_millis() as u64,
            "shutdown: grace over; stopping node workers, unpushed batches are requeued"
        );
        stop_workers.cancel();
        workers.wait().await;
    }
    tracker.close();
    tracker.wait().await;
    metrics.snapshot().log_totals();
    info!(node = %node_id, "job stopped");
    batching.map_err(JobError::from)
}

/// One decoded queue message with its delivery.
struct Incoming {
    route: Route,
    delivery: Delivery,
}

/// Where a queue message goes.
enum Route {
    /// A room message, batched per room.
    Room {
        room_id: String,
        level: MsgLevel,
        data: Bytes,
        seq: Seq,
    },
    /// An IM message to users, a broadcast or a live join: pushed at once to
    /// the nodes named (`None`: all nodes).
    Direct {
        batch: Box<Batch>,
        nodes: Option<Vec<String>>,
    },
}

/// Routes a queue message, or says why it cannot be handled (it is then
/// finished, never requeued: a poison message would loop).
fn classify(msg: QueueMsg) -> Result<Route, String> {
    let Some(body) = msg.body else {
        return Err("empty QueueMsg".into());
    };
    Ok(match body {
        Body::Room(m) => {
            if m.room_id.is_empty() {
                return Err("no room_id".into());
            }
            // Community rooms carry only IM messages, and IM messages only
            // go to community rooms: conn renders them differently.
            if m.chat != rooms::is_community(&m.room_id) {
                return Err(format!(
                    "chat flag {} does not match room {}",
                    m.chat, m.room_id
                ));
            }
            // Unknown (future) levels are treated as NORMAL.
            let level = MsgLevel::try_from(m.level).unwrap_or(MsgLevel::Normal);
            Route::Room {
                room_id: m.room_id,
                level,
                data: m.data,
                seq: Seq {
                    offset: m.offset,
                    epoch: m.epoch,
                },
            }
        }
        Body::User(u) => {
            let Some(msg) = u.msg else {
                return Err("UserMsg without msg".into());
            };
            let label = format!("users:{}", u.uids.join(","));
            let req = PushUsersReq {
                uids: u.uids,
                msg: Some(msg),
            };
            Route::Direct {
                batch: Box::new(Batch::direct(label, Target::Users(req))),
                nodes: Some(u.servers),
            }
        }
        Body::Broadcast(b) => Route::Direct {
            batch: Box::new(Batch::direct(
                "broadcast".into(),
                Target::All(PushAllReq { msg: b.msg }),
            )),
            nodes: None,
        },
        Body::Join(j) => {
            let label = format!("join:{}:{}", j.uid, j.room);
            let req = JoinRoomReq {
                uid: j.uid,
                room: j.room,
            };
            Route::Direct {
                batch: Box::new(Batch::direct(label, Target::Join(req))),
                nodes: Some(j.servers),
            }
        }
    })
}

/// Queue -> batcher. Ends when the subscriber is drained after shutdown.
async fn consume(mut sub: Subscriber, tx: mpsc::Sender<Incoming>, metrics: Arc<Metrics>) {
    let mut poison_log = LogThrottle::default();
    while let Some(delivery) = sub.next().await {
        metrics::inc(&metrics.received);
        // Decoding from `Bytes` slices `data` out of the body without a copy.
        let routed = QueueMsg::decode(delivery.body.clone())
            .map_err(|e| e.to_string())
            .and_then(classify);
        let route = match routed {
            Ok(r) => r,
            Err(why) => {
                metrics::inc(&metrics.undecodable);
                if let Some(suppressed) = poison_log.allow() {
                    warn!(error = %why, bytes = delivery.body.len(), attempts = delivery.attempts,
                        suppressed, "undecodable queue message dropped");
                }
                delivery.finish();
                continue;
            }
        };
        if let Err(mpsc::error::SendError(lost)) = tx.send(Incoming { route, delivery }).await {
            // The batching task is gone (it only ends after us unless it
            // crashed); give the message back rather than lose it.
            lost.delivery.requeue(Duration::ZERO);
            break;
        }
    }
    info!("shutdown: queue drained; consumer stopped");
}

/// Owns the per-room batches and the node pool: messages in, batches out.
async fn batch_loop(
    cfg: BatchConfig,
    mut rx: mpsc::Receiver<Incoming>,
    mut nodes: NodesRx,
    mut pool: Pool,
) {
    let mut batcher: Batcher<Delivery> = Batcher::new(&cfg);
    let mut out = Vec::new();
    let initial = nodes.borrow_and_update().clone();
    pool.update(&initial);
    info!(conn_nodes = pool.node_count(), "batching started");
    let mut watching = true;
    let sleep = tokio::time::sleep_until(Instant::now());
    tokio::pin!(sleep);
    loop {
        let deadline = batcher.next_deadline();
        if let Some(d) = deadline
            && sleep.deadline() != d
        {
            sleep.as_mut().reset(d);
        }
        tokio::select! {
            m = rx.recv() => match m {
                Some(Incoming { route: Route::Room { room_id, level, data, seq }, delivery }) => {
                    batcher.push(Instant::now(), &room_id, level, &data, seq, delivery, &mut out);
                }
                Some(Incoming { route: Route::Direct { batch, nodes }, delivery }) => {
                    pool.dispatch_direct(*batch, delivery, nodes.as_deref());
                }
                None => break,
            },
            () = &mut sleep, if deadline.is_some() => batcher.flush_expired(Instant::now(), &mut out),
            changed = nodes.changed(), if watching => match changed {
                Ok(()) => {
                    let now = nodes.borrow_and_update().clone();
                    pool.update(&now);
                }
                // Discovery stops at shutdown: keep pushing to the last
                // known nodes while draining.
                Err(_) => {
                    watching = false;
                    debug!(conn_nodes = pool.node_count(), "discovery watch ended; keeping the last known conn nodes");
                }
            },
        }
        for f in out.drain(..) {
            pool.dispatch(f);
        }
    }
    info!(
        rooms = batcher.pending_rooms(),
        "shutdown: flushing pending rooms"
    );
    batcher.flush_all(&mut out);
    for f in out.drain(..) {
        pool.dispatch(f);
    }
    // Dropping the pool closes every node queue.
    pool.close();
}

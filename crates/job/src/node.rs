//! One conn node's push worker: takes batches from the node's bounded queue
//! in order and calls `Conn.PushRoom` over a lazily connected channel.
//!
//! The first attempt at each batch is reported to its [`Ticket`] (see `ack`).
//! On failure a NORMAL batch is dropped for this node. An IMPORTANT batch is
//! retried with exponential back-off until it succeeds, the batch is handed
//! back to the queue (nobody got it), the worker is stopped (node left
//! discovery, or shutdown grace ran out) or `important_retry_ms` has passed;
//! later batches wait behind it so this node sees them in order. A node whose
//! retry window ran out is "degraded": until a push succeeds again, IMPORTANT
//! batches get one attempt each, so a node that stays registered but broken
//! cannot hold every later batch for a full window.

use std::sync::Arc;
use std::time::Duration;

use chatroom_common::discovery::Node;
use chatroom_common::proto::conn::conn_client::ConnClient;
use chatroom_common::proto::conn::{PushRoomReply, PushRoomReq};
use chatroom_common::proto::protocol::MsgLevel;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, error, info, warn};

use crate::ack::{Batch, Outcome, Target, Ticket};
use crate::config::{INITIAL_BACKOFF, PushConfig};
use crate::metrics::{self, Metrics};
use crate::throttle::LogThrottle;

/// One batch on its way to one node.
pub struct NodeBatch {
    pub batch: Arc<Batch>,
    pub ticket: Ticket,
}

/// A channel to `uri` that connects on first use (and reconnects after
/// failures), so a node that is down costs nothing until we push to it.
pub fn lazy_channel(uri: &str, cfg: &PushConfig) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(uri.to_owned())?
        .connect_timeout(cfg.timeout())
        .timeout(cfg.timeout())
        .connect_lazy())
}

pub struct Worker {
    node: Node,
    client: ConnClient<Channel>,
    rx: mpsc::Receiver<NodeBatch>,
    stop: CancellationToken,
    important_retry: Duration,
    max_backoff: Duration,
    metrics: Arc<Metrics>,
    /// The last IMPORTANT retry window ran out and no push succeeded since.
    degraded: bool,
    failure_log: LogThrottle,
}

/// Why a worker stopped in the middle of a batch.
struct Stopped;

impl Worker {
    pub fn new(
        node: Node,
        channel: Channel,
        rx: mpsc::Receiver<NodeBatch>,
        stop: CancellationToken,
        cfg: &PushConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        Worker {
            node,
            client: ConnClient::new(channel),
            rx,
            stop,
            important_retry: cfg.important_retry(),
            max_backoff: cfg.max_backoff(),
            metrics,
            degraded: false,
            failure_log: LogThrottle::default(),
        }
    }

    /// Pushes until the queue is closed and empty (shutdown, every batch
    /// handled) or `stop` fires. Batches still queued when it stops are
    /// dropped, and their tickets count as never tried.
    pub async fn run(mut self) {
        debug!(node = %self.node.id, uri = %self.node.uri, "node worker started");
        loop {
            let next = tokio::select! {
                biased;
                _ = self.stop.cancelled() => break,
                nb = self.rx.recv() => nb,
            };
            let Some(NodeBatch { batch, ticket }) = next else {
                debug!(node = %self.node.id, "node queue closed and drained");
                break;
            };
            if self.deliver(&batch, ticket).await.is_err() {
                break;
            }
        }
        let left = self.rx.len();
        if left > 0 {
            info!(node = %self.node.id, batches = left, "node worker stopped with batches unpushed");
        }
    }

    async fn deliver(&mut self, batch: &Batch, ticket: Ticket) -> Result<(), Stopped> {
        let err = match self.push(batch).await? {
            Ok(()) => {
                ticket.report(Outcome::Delivered);
                return Ok(());
            }
            Err(status) => status,
        };
        ticket.report(Outcome::Failed);
        if batch.level != MsgLevel::Important {
            metrics::inc(&self.metrics.dropped_normal);
            if let Some(suppressed) = self.failure_log.allow() {
                warn!(node = %self.node.id, room = %batch.room_id, code = ?err.code(), error = %err.message(),
                    suppressed, "push failed; NORMAL batch dropped for this node");
            }
            return Ok(());
        }
        if self.degraded {
            metrics::inc(&self.metrics.dropped_important);
            if let Some(suppressed) = self.failure_log.allow() {
                error!(node = %self.node.id, room = %batch.room_id, code = ?err.code(), error = %err.message(),
                    suppressed, "push failed on a node already failing past its retry window; IMPORTANT batch dropped for this node");
            }
            return Ok(());
        }
        self.retry(batch, err).await
    }

    /// Retries an IMPORTANT batch whose first attempt failed.
    async fn retry(&mut self, batch: &Batch, first: tonic::Status) -> Result<(), Stopped> {
        if batch.handed_back() {
            // This node's failure was the last report: the whole batch went
            // back to the queue, which will deliver it again.
            warn!(node = %self.node.id, room = %batch.room_id, code = ?first.code(), error = %first.message(),
                "push of IMPORTANT batch failed on every node; left to the queue");
            return Ok(());
        }
        warn!(node = %self.node.id, room = %batch.room_id, code = ?first.code(), error = %first.message(),
            "push of IMPORTANT batch failed; retrying");
        let give_up = Instant::now() + self.important_retry;
        let mut backoff = INITIAL_BACKOFF;
        let mut attempts = 1u32;
        let mut last = first;
        loop {
            if batch.handed_back() {
                debug!(node = %self.node.id, room = %batch.room_id, "batch went back to the queue; retry ends");
                return Ok(());
            }
            let now = Instant::now();
            if now >= give_up {
                break;
            }
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => return Err(Stopped),
                _ = tokio::time::sleep_until((now + backoff).min(give_up)) => {}
            }
            backoff = (backoff * 2).min(self.max_backoff);
            if batch.handed_back() {
                continue;
            }
            attempts += 1;
            metrics::inc(&self.metrics.retries);
            match self.push(batch).await? {
                Ok(()) => {
                    batch.mark_delivered_on_retry();
                    info!(node = %self.node.id, room = %batch.room_id, attempts, "IMPORTANT batch delivered after retry");
                    return Ok(());
                }
                Err(status) => last = status,
            }
        }
        metrics::inc(&self.metrics.dropped_important);
        self.degraded = true;
        error!(node = %self.node.id, room = %batch.room_id, attempts, code = ?last.code(), error = %last.message(),
            "IMPORTANT batch not delivered within the retry window; dropped for this node");
        Ok(())
    }

    /// The push the batch asks for, as `(delivered, dropped)` sessions.
    async fn call(mut c: ConnClient<Channel>, batch: &Batch) -> Result<(u32, u32), tonic::Status> {
        match &batch.target {
            Target::Room(kind) => {
                let req = PushRoomReq {
                    room_id: batch.room_id.clone(),
                    level: batch.level as i32,
                    // A clone of the shared bytes, not a copy.
                    batch: batch.data.clone(),
                    kind: *kind as i32,
                };
                let PushRoomReply { delivered, dropped } = c.push_room(req).await?.into_inner();
                Ok((delivered, dropped))
            }
            Target::Users(req) => {
                let r = c.push_users(req.clone()).await?.into_inner();
                Ok((r.delivered, r.dropped))
            }
            Target::All(req) => {
                let r = c.push_all(req.clone()).await?.into_inner();
                Ok((r.delivered, r.dropped))
            }
            Target::Join(req) => {
                let r = c.join_room(req.clone()).await?.into_inner();
                Ok((r.sessions, 0))
            }
        }
    }

    /// One push call; `Err(Stopped)` if the worker was stopped first.
    async fn push(&mut self, batch: &Batch) -> Result<Result<(), tonic::Status>, Stopped> {
        // Clients are cheap handles on one channel.
        let client = self.client.clone();
        let res = tokio::select! {
            biased;
            _ = self.stop.cancelled() => return Err(Stopped),
            res = Self::call(client, batch) => res,
        };
        Ok(match res {
            Ok((delivered, dropped)) => {
                metrics::inc(&self.metrics.pushes_ok);
                metrics::add(&self.metrics.sessions_delivered, u64::from(delivered));
                metrics::add(&self.metrics.sessions_dropped, u64::from(dropped));
                if self.degraded {
                    info!(node = %self.node.id, "node accepts pushes again");
                    self.degraded = false;
                }
                debug!(node = %self.node.id, room = %batch.room_id, messages = batch.messages, delivered, dropped, "pushed");
                Ok(())
            }
            Err(status) => {
                metrics::inc(&self.metrics.push_failures);
                Err(status)
            }
        })
    }
}

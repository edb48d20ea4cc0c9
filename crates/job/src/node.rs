//! One conn node's push worker: takes batches from the node's bounded queue
//! in order and calls `Conn.PushRoom` over a lazily connected channel.
//! Room batches that are already queued when the worker is free go out
//! together in one `Conn.PushRooms` call (in order, up to `bundle_max`
//! batches and [`BUNDLE_MAX_BYTES`]): with many small rooms a node would
//! otherwise cost one call per message. Bundling only takes what is waiting,
//! so it adds no delay; a light load still sends one batch per call.
//!
//! The first attempt at each batch is reported to its [`Ticket`] (see `ack`).
//! On failure a NORMAL batch is dropped for this node. An IMPORTANT batch is
//! retried with exponential back-off until it succeeds, the batch is handed
//! back to the queue (nobody got it), the worker is stopped (node left
//! discovery, or shutdown grace ran out) or `important_retry` has passed;
//! later batches wait behind it so this node sees them in order. A node whose
//! retry window ran out is "degraded": until a push succeeds again, IMPORTANT
//! batches get one attempt each, so a node that stays registered but broken
//! cannot hold every later batch for a full window. A bundle that fails is
//! reported batch by batch as if each had failed on its own; a bundle the
//! node refuses as a whole (an older node without `PushRooms`, or an item
//! it cannot take — it checks them all before pushing any) is pushed again
//! one batch per call.

use std::sync::Arc;
use std::time::Duration;

use chatroom_backoff::Backoff;
use chatroom_common::proto::conn::conn_client::ConnClient;
use chatroom_common::proto::conn::{PushKind, PushRoomReply, PushRoomReq, PushRoomsReq};
use chatroom_common::proto::protocol::MsgLevel;
use chatroom_discovery::Node;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, error, info, warn};

use crate::ack::{Batch, Outcome, Target, Ticket};
use crate::config::{INITIAL_BACKOFF, PushConfig};
use crate::metrics::{self, Metrics};
use crate::throttle::LogThrottle;

/// Most bytes of batch data in one `PushRooms` call: well under tonic's
/// default 4 MiB message limit on the conn side.
pub const BUNDLE_MAX_BYTES: usize = 2 << 20;

/// One batch on its way to one node.
pub struct NodeBatch {
    pub batch: Arc<Batch>,
    pub ticket: Ticket,
}

/// A channel to `uri` that connects on first use (and reconnects after
/// failures), so a node that is down costs nothing until we push to it.
pub fn lazy_channel(uri: &str, cfg: &PushConfig) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(uri.to_owned())?
        .connect_timeout(cfg.timeout)
        .timeout(cfg.timeout)
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
    /// Most room batches per `PushRooms` call; 1 turns bundling off.
    bundle_max: usize,
    /// Taken off the queue while filling a bundle but not bundled (not a
    /// room batch, or too big): the next one to push.
    held: Option<NodeBatch>,
    /// This node's push latency (the handle is made once, here).
    latency: chatroom_common::metrics::Histogram,
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
            latency: metrics.node_push_latency(&node.id),
            node,
            client: ConnClient::new(channel),
            rx,
            stop,
            important_retry: cfg.important_retry,
            max_backoff: cfg.max_backoff,
            metrics,
            degraded: false,
            failure_log: LogThrottle::default(),
            bundle_max: cfg.bundle_max.max(1),
            held: None,
        }
    }

    /// Pushes until the queue is closed and empty (shutdown, every batch
    /// handled) or `stop` fires. Batches still queued when it stops are
    /// dropped, and their tickets count as never tried.
    pub async fn run(mut self) {
        debug!(node = %self.node.id, uri = %self.node.uri, "node worker started");
        loop {
            let next = match self.held.take() {
                Some(nb) => Some(nb),
                None => tokio::select! {
                    biased;
                    _ = self.stop.cancelled() => break,
                    nb = self.rx.recv() => nb,
                },
            };
            let Some(first) = next else {
                debug!(node = %self.node.id, "node queue closed and drained");
                break;
            };
            let mut bundle = self.fill_bundle(first);
            let done = if bundle.len() == 1 {
                let NodeBatch { batch, ticket } = bundle.pop().expect("one batch");
                self.deliver(&batch, ticket).await
            } else {
                self.deliver_bundle(bundle).await
            };
            if done.is_err() {
                break;
            }
        }
        let left = self.rx.len() + usize::from(self.held.is_some());
        if left > 0 {
            info!(node = %self.node.id, batches = left, "node worker stopped with batches unpushed");
        }
    }

    /// `first` and the room batches queued behind it, up to the bundle's
    /// limits, in queue order.
    fn fill_bundle(&mut self, first: NodeBatch) -> Vec<NodeBatch> {
        if self.bundle_max == 1 || first.batch.room_kind().is_none() {
            return vec![first];
        }
        let mut bytes = first.batch.data.len();
        let mut bundle = vec![first];
        while bundle.len() < self.bundle_max {
            let Ok(nb) = self.rx.try_recv() else { break };
            if nb.batch.room_kind().is_none() || bytes + nb.batch.data.len() > BUNDLE_MAX_BYTES {
                self.held = Some(nb);
                break;
            }
            bytes += nb.batch.data.len();
            bundle.push(nb);
        }
        bundle
    }

    /// Pushes several room batches in one `PushRooms` call.
    async fn deliver_bundle(&mut self, bundle: Vec<NodeBatch>) -> Result<(), Stopped> {
        let req = PushRoomsReq {
            rooms: bundle
                .iter()
                .filter_map(|nb| Some(room_req(&nb.batch, nb.batch.room_kind()?)))
                .collect(),
        };
        metrics::inc(&self.metrics.bundles);
        let mut client = self.client.clone();
        let started = Instant::now();
        let res = tokio::select! {
            biased;
            _ = self.stop.cancelled() => return Err(Stopped),
            res = client.push_rooms(req) => res,
        };
        self.latency.observe_duration(started.elapsed());
        let err = match res {
            Ok(reply) => {
                let replies = reply.into_inner().rooms;
                for (i, NodeBatch { batch, ticket }) in bundle.into_iter().enumerate() {
                    let r = replies.get(i).copied().unwrap_or_default();
                    self.pushed(&batch, r.delivered, r.dropped);
                    ticket.report(Outcome::Delivered);
                }
                return Ok(());
            }
            Err(status) => status,
        };
        if matches!(err.code(), Code::Unimplemented | Code::InvalidArgument) {
            // Nothing was pushed: try each batch on its own, as a first attempt.
            if err.code() == Code::Unimplemented {
                warn!(node = %self.node.id, "node does not take PushRooms; pushing one batch per call from now on");
                self.bundle_max = 1;
            } else {
                warn!(node = %self.node.id, error = %err.message(), "node refused a bundle; pushing its batches one by one");
            }
            for NodeBatch { batch, ticket } in bundle {
                self.deliver(&batch, ticket).await?;
            }
            return Ok(());
        }
        metrics::add(&self.metrics.push_failures, bundle.len() as u64);
        for NodeBatch { batch, ticket } in bundle {
            self.failed(&batch, ticket, err.clone()).await?;
        }
        Ok(())
    }

    async fn deliver(&mut self, batch: &Batch, ticket: Ticket) -> Result<(), Stopped> {
        match self.push(batch).await? {
            Ok(()) => {
                ticket.report(Outcome::Delivered);
                Ok(())
            }
            Err(status) => self.failed(batch, ticket, status).await,
        }
    }

    /// What follows a failed first attempt at `batch`: NORMAL is dropped for
    /// this node, IMPORTANT retried (unless the node is degraded).
    async fn failed(
        &mut self,
        batch: &Batch,
        ticket: Ticket,
        err: tonic::Status,
    ) -> Result<(), Stopped> {
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
        let mut backoff = Backoff::new(INITIAL_BACKOFF, self.max_backoff);
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
                _ = tokio::time::sleep_until((now + backoff.next_delay()).min(give_up)) => {}
            }
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
                let PushRoomReply { delivered, dropped } =
                    c.push_room(room_req(batch, *kind)).await?.into_inner();
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
        let started = Instant::now();
        let res = tokio::select! {
            biased;
            _ = self.stop.cancelled() => return Err(Stopped),
            res = Self::call(client, batch) => res,
        };
        self.latency.observe_duration(started.elapsed());
        Ok(match res {
            Ok((delivered, dropped)) => {
                self.pushed(batch, delivered, dropped);
                Ok(())
            }
            Err(status) => {
                metrics::inc(&self.metrics.push_failures);
                Err(status)
            }
        })
    }

    /// Counts a batch the node took.
    fn pushed(&mut self, batch: &Batch, delivered: u32, dropped: u32) {
        metrics::inc(&self.metrics.pushes_ok);
        metrics::add(&self.metrics.sessions_delivered, u64::from(delivered));
        metrics::add(&self.metrics.sessions_dropped, u64::from(dropped));
        if self.degraded {
            info!(node = %self.node.id, "node accepts pushes again");
            self.degraded = false;
        }
        debug!(node = %self.node.id, room = %batch.room_id, messages = batch.messages, delivered, dropped, "pushed");
    }
}

/// The `PushRoom` request of a room batch.
fn room_req(batch: &Batch, kind: PushKind) -> PushRoomReq {
    PushRoomReq {
        room_id: batch.room_id.clone(),
        level: batch.level as i32,
        // A clone of the shared bytes, not a copy.
        batch: batch.data.clone(),
        kind: kind as i32,
        offsets: batch.offsets.clone(),
        epoch: batch.epoch,
    }
}

//! The set of conn nodes job pushes to, following discovery: one worker with
//! a bounded queue per live node. A node that leaves discovery has its
//! worker stopped and its queue dropped (its clients are gone and will
//! reconnect elsewhere); a node that appears gets a new worker.
//!
//! Owned by the batching task, so updates and hand-offs need no lock. Hand-off
//! is `try_send`: a full node queue costs that node the batch, never the
//! batcher's time, and never the other nodes' delivery.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chatroom_common::proto::protocol::MsgLevel;
use chatroom_discovery::Node;
use chatroom_queue::Delivery;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::ack::{Batch, Outcome, Pending, Ticket};
use crate::batcher::Flushed;
use crate::config::PushConfig;
use crate::metrics::{self, Metrics};
use crate::node::{NodeBatch, Worker, lazy_channel};
use crate::throttle::LogThrottle;

struct Handle {
    uri: String,
    tx: mpsc::Sender<NodeBatch>,
    stop: CancellationToken,
    overflow_log: LogThrottle,
}

pub struct Pool {
    cfg: PushConfig,
    metrics: Arc<Metrics>,
    /// Where workers run; `run` waits on it during shutdown.
    workers: TaskTracker,
    /// Parent of every worker's stop token; cancelled when the shutdown
    /// grace runs out.
    stop_all: CancellationToken,
    nodes: HashMap<String, Handle>,
    /// Nodes whose URI is unusable; remembered so it is logged once.
    rejected: HashSet<Node>,
}

impl Pool {
    pub fn new(
        cfg: PushConfig,
        metrics: Arc<Metrics>,
        workers: TaskTracker,
        stop_all: CancellationToken,
    ) -> Self {
        Pool {
            cfg,
            metrics,
            workers,
            stop_all,
            nodes: HashMap::new(),
            rejected: HashSet::new(),
        }
    }

    /// Live nodes now.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Makes the workers match `nodes` (the full current set). A node whose
    /// URI changed is treated as gone and back.
    pub fn update(&mut self, nodes: &[Node]) {
        let wanted: HashMap<&str, &str> = nodes
            .iter()
            .map(|n| (n.id.as_str(), n.uri.as_str()))
            .collect();
        self.nodes.retain(|id, h| {
            let keep = wanted.get(id.as_str()) == Some(&h.uri.as_str());
            if !keep {
                h.stop.cancel();
                info!(node = %id, uri = %h.uri, queued = h.tx.max_capacity() - h.tx.capacity(),
                    "conn node left; worker stopped, its queue dropped");
            }
            keep
        });
        self.rejected
            .retain(|n| wanted.get(n.id.as_str()) == Some(&n.uri.as_str()));
        for node in nodes {
            if self.nodes.contains_key(&node.id) || self.rejected.contains(node) {
                continue;
            }
            self.start(node.clone());
        }
        self.metrics.extra.nodes.store(
            self.nodes.len() as i64,
            std::sync::atomic::Ordering::Relaxed,
        );
        debug!(nodes = self.nodes.len(), "conn node set updated");
    }

    fn start(&mut self, node: Node) {
        let channel = match lazy_channel(&node.uri, &self.cfg) {
            Ok(c) => c,
            Err(e) => {
                error!(node = %node.id, uri = %node.uri, error = %e, "bad conn node URI; not pushing to it");
                self.rejected.insert(node);
                return;
            }
        };
        let (tx, rx) = mpsc::channel(self.cfg.node_queue);
        let stop = self.stop_all.child_token();
        let span = info_span!("node_worker", node = %node.id);
        info!(node = %node.id, uri = %node.uri, "conn node joined; worker started");
        let id = node.id.clone();
        let uri = node.uri.clone();
        let worker = Worker::new(
            node,
            channel,
            rx,
            stop.clone(),
            &self.cfg,
            self.metrics.clone(),
        );
        self.workers.spawn(worker.run().instrument(span));
        self.nodes.insert(
            id,
            Handle {
                uri,
                tx,
                stop,
                overflow_log: LogThrottle::default(),
            },
        );
    }

    /// Hands a flushed batch to every node: encoded once, shared by all.
    /// With no node the batch settles at once (see `ack`).
    pub fn dispatch(&mut self, flushed: Flushed<Delivery>) {
        metrics::inc(&self.metrics.batches);
        let Flushed {
            room_id,
            level,
            data,
            tokens,
            offsets,
            epoch,
            reason,
        } = flushed;
        self.metrics
            .extra
            .batch_messages
            .observe(tokens.len() as u64);
        debug!(room = %room_id, ?level, ?reason, messages = tokens.len(), bytes = data.len(),
            nodes = self.nodes.len(), "batch flushed");
        let mut batch = Batch::new(room_id, level, data, tokens.len());
        batch.seq(offsets, epoch);
        let batch = Arc::new(batch);
        self.hand_off(batch, tokens, None);
    }

    /// Hands one direct message (to users, to all, a live join) to the
    /// nodes named in `only` — the ones its users are on — or to all.
    pub fn dispatch_direct(&mut self, batch: Batch, delivery: Delivery, only: Option<&[String]>) {
        metrics::inc(&self.metrics.batches);
        debug!(what = %batch.room_id, nodes = ?only, "direct message");
        self.hand_off(Arc::new(batch), vec![delivery], only);
    }

    fn hand_off(&mut self, batch: Arc<Batch>, tokens: Vec<Delivery>, only: Option<&[String]>) {
        let level = batch.level;
        let pending = Pending::new(
            batch.clone(),
            tokens,
            self.cfg.requeue_delay,
            self.metrics.clone(),
        );
        for (id, h) in &mut self.nodes {
            if only.is_some_and(|o| !o.iter().any(|n| n == id)) {
                continue;
            }
            let nb = NodeBatch {
                batch: batch.clone(),
                ticket: Ticket::new(&pending),
            };
            match h.tx.try_send(nb) {
                Ok(()) => {}
                Err(TrySendError::Full(nb)) => {
                    nb.ticket.report(Outcome::Failed);
                    metrics::inc(&self.metrics.overflow);
                    let important = level == MsgLevel::Important;
                    metrics::inc(if important {
                        &self.metrics.dropped_important
                    } else {
                        &self.metrics.dropped_normal
                    });
                    if let Some(suppressed) = h.overflow_log.allow() {
                        if important {
                            error!(node = %id, room = %batch.room_id, suppressed,
                                "node queue full; IMPORTANT batch dropped for this node");
                        } else {
                            warn!(node = %id, room = %batch.room_id, suppressed,
                                "node queue full; NORMAL batch dropped for this node");
                        }
                    }
                }
                // The worker has stopped; its ticket, dropped here, counts
                // as never tried.
                Err(TrySendError::Closed(_)) => {
                    debug!(node = %id, "node worker gone; batch not handed over");
                }
            }
        }
    }

    /// No more batches: each worker pushes what it holds, then exits.
    pub fn close(self) {
        info!(
            nodes = self.nodes.len(),
            "no more batches; node workers finish their queues"
        );
    }
}

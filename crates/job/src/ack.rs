//! Completion of a batch: when may its queue messages be acknowledged?
//!
//! A flushed batch is handed to every node worker; each hand-off carries a
//! [`Ticket`] on the batch's shared [`Pending`], which holds the queue
//! deliveries. A node reports once, when its FIRST push attempt for the batch
//! ends (later retries do not hold the acknowledgement back). A ticket dropped
//! without a report (node worker stopped, job shutting down) counts as
//! "abandoned": that node never tried. When the last ticket is gone the
//! `Pending` drops and settles all its deliveries together (see [`settle`]):
//!
//! - no node at all: FIN (the room has no listeners anywhere);
//! - some node got it: FIN, whatever the others did, because a requeue
//!   would push it to that node twice;
//! - nobody got it: REQ if it is IMPORTANT (there is nobody to duplicate to)
//!   or if some node never even tried (shutdown, node left); a NORMAL batch
//!   every node tried and failed is shed: FIN, already counted per node.
//!
//! A requeued batch is marked handed back, so node workers still retrying it
//! stop: the queue redelivers it instead, which would otherwise duplicate.
//! Conversely a node that got the batch on a retry before the last report
//! counts as "got it". (A retry already in flight when the batch is handed
//! back can still land: at-least-once, a rare duplicate, never a loss.)

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use chatroom_common::proto::conn::{JoinRoomReq, PushAllReq, PushKind, PushUsersReq};
use chatroom_common::proto::protocol::MsgLevel;
use chatroom_queue::Delivery;
use tracing::{debug, info, warn};

use crate::metrics::{self, Metrics};

/// What a batch asks of a conn node.
#[derive(Debug)]
pub enum Target {
    /// `PushRoom` of `data` with this kind (opaque payloads or ChatMsgs).
    Room(PushKind),
    /// `PushUsers`: one IM message to some users' sessions.
    Users(PushUsersReq),
    /// `PushAll`: an operator broadcast.
    All(PushAllReq),
    /// `JoinRoom`: a user's live sessions join a room.
    Join(JoinRoomReq),
}

/// One flushed batch, encoded once and shared by every node worker.
#[derive(Debug)]
pub struct Batch {
    /// The room, or a label of the direct message, for logs.
    pub room_id: String,
    pub target: Target,
    pub level: MsgLevel,
    /// `|len1|data1|len2|data2|...`; every node gets a clone of these bytes.
    pub data: Bytes,
    pub messages: usize,
    /// Room stream offset of each message (empty or zeros: unsequenced).
    pub offsets: Vec<u64>,
    pub epoch: u64,
    handed_back: AtomicBool,
    delivered_on_retry: AtomicBool,
}

impl Batch {
    pub fn new(room_id: String, level: MsgLevel, data: Bytes, messages: usize) -> Self {
        let kind = if chatroom_common::rooms::is_community(&room_id) {
            PushKind::Chat
        } else {
            PushKind::Room
        };
        Self::with_target(room_id, Target::Room(kind), level, data, messages)
    }

    /// Sets where the batch's messages sit in their room's stream. Offsets
    /// of 0 come from an older logic: the batch is then sent unsequenced.
    pub fn seq(&mut self, offsets: Vec<u64>, epoch: u64) {
        if epoch != 0 && offsets.iter().all(|&o| o != 0) {
            self.offsets = offsets;
            self.epoch = epoch;
        }
    }

    /// The kind of a room batch; `None` for a direct message.
    pub fn room_kind(&self) -> Option<PushKind> {
        match self.target {
            Target::Room(kind) => Some(kind),
            _ => None,
        }
    }

    /// A batch of one direct (not room-batched) queue message.
    pub fn direct(label: String, target: Target) -> Self {
        Self::with_target(label, target, MsgLevel::Important, Bytes::new(), 1)
    }

    fn with_target(
        room_id: String,
        target: Target,
        level: MsgLevel,
        data: Bytes,
        messages: usize,
    ) -> Self {
        Batch {
            room_id,
            target,
            level,
            data,
            messages,
            offsets: Vec::new(),
            epoch: 0,
            handed_back: AtomicBool::new(false),
            delivered_on_retry: AtomicBool::new(false),
        }
    }

    /// A node got the batch on a retry, after its first attempt had been
    /// reported as failed: requeueing now would duplicate to that node.
    pub fn mark_delivered_on_retry(&self) {
        self.delivered_on_retry.store(true, Ordering::Release);
    }

    /// The queue has the batch's messages back; retrying it would duplicate.
    pub fn handed_back(&self) -> bool {
        self.handed_back.load(Ordering::Acquire)
    }
}

/// How one node's first attempt at a batch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The node accepted the push.
    Delivered,
    /// The push failed, or the node's queue was full.
    Failed,
}

/// What to do with a batch's queue messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// FIN: at least one node got it.
    Finish,
    /// FIN: there was no conn node to push to.
    FinishNoNodes,
    /// FIN: a NORMAL batch every node failed; shed.
    FinishShed,
    /// REQ: nobody got it and it is worth another try.
    Requeue,
}

/// The settlement rule (module docs), from the per-node reports.
pub fn settle(level: MsgLevel, delivered: u32, failed: u32, abandoned: u32) -> Settlement {
    if delivered + failed + abandoned == 0 {
        Settlement::FinishNoNodes
    } else if delivered > 0 {
        Settlement::Finish
    } else if level == MsgLevel::Important || abandoned > 0 {
        Settlement::Requeue
    } else {
        Settlement::FinishShed
    }
}

/// A batch's queue deliveries, settled when the last node has reported.
pub struct Pending {
    batch: Arc<Batch>,
    deliveries: Vec<Delivery>,
    delivered: AtomicU32,
    failed: AtomicU32,
    abandoned: AtomicU32,
    requeue_delay: Duration,
    metrics: Arc<Metrics>,
}

impl Pending {
    pub fn new(
        batch: Arc<Batch>,
        deliveries: Vec<Delivery>,
        requeue_delay: Duration,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Pending {
            batch,
            deliveries,
            delivered: AtomicU32::new(0),
            failed: AtomicU32::new(0),
            abandoned: AtomicU32::new(0),
            requeue_delay,
            metrics,
        })
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        // Every ticket has reported and released its clone; the Arc's
        // release/acquire on the last drop makes their counts visible here.
        let delivered = self.delivered.load(Ordering::Relaxed)
            + u32::from(self.batch.delivered_on_retry.load(Ordering::Acquire));
        let failed = self.failed.load(Ordering::Relaxed);
        let abandoned = self.abandoned.load(Ordering::Relaxed);
        let deliveries = std::mem::take(&mut self.deliveries);
        let n = deliveries.len() as u64;
        let b = &self.batch;
        match settle(b.level, delivered, failed, abandoned) {
            Settlement::Requeue => {
                b.handed_back.store(true, Ordering::Release);
                for d in deliveries {
                    // Later attempts wait longer, so a batch nobody can take
                    // (every node down) does not spin through the queue.
                    let delay = self.requeue_delay * u32::from(d.attempts.clamp(1, 10));
                    d.requeue(delay);
                }
                metrics::add(&self.metrics.requeued, n);
                if failed > 0 {
                    warn!(room = %b.room_id, level = ?b.level, messages = n, failed, abandoned,
                        "no conn node got the batch; requeued");
                } else {
                    info!(room = %b.room_id, level = ?b.level, messages = n, abandoned,
                        "batch was not pushed before its node workers stopped; requeued");
                }
            }
            settled => {
                for d in deliveries {
                    d.finish();
                }
                metrics::add(&self.metrics.finished, n);
                match settled {
                    Settlement::FinishNoNodes => {
                        metrics::add(&self.metrics.no_nodes, n);
                        debug!(room = %b.room_id, messages = n, "no conn nodes; batch finished");
                    }
                    Settlement::FinishShed => {
                        debug!(room = %b.room_id, messages = n, failed, "NORMAL batch reached no node; shed");
                    }
                    _ => {}
                }
            }
        }
    }
}

/// One node's duty to report on one batch; dropping it unreported counts as
/// "never tried" (abandoned).
pub struct Ticket {
    pending: Option<Arc<Pending>>,
}

impl Ticket {
    pub fn new(pending: &Arc<Pending>) -> Self {
        Ticket {
            pending: Some(pending.clone()),
        }
    }

    /// Reports the node's first attempt; the ticket is used up.
    pub fn report(mut self, outcome: Outcome) {
        if let Some(p) = self.pending.take() {
            let counter = match outcome {
                Outcome::Delivered => &p.delivered,
                Outcome::Failed => &p.failed,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(p) = self.pending.take() {
            p.abandoned.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use chatroom_queue::QueueConfig;
    use chatroom_queue::{MemoryQueue, Publisher, Subscriber};
    use tokio::time::Instant;
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    use super::*;

    const N: MsgLevel = MsgLevel::Normal;
    const I: MsgLevel = MsgLevel::Important;

    #[test]
    fn settlement_rule() {
        use Settlement::*;
        assert_eq!(settle(N, 0, 0, 0), FinishNoNodes);
        assert_eq!(settle(I, 0, 0, 0), FinishNoNodes);
        assert_eq!(settle(N, 1, 2, 0), Finish);
        assert_eq!(
            settle(I, 1, 2, 1),
            Finish,
            "a requeue would duplicate to the node that got it"
        );
        assert_eq!(settle(I, 0, 2, 0), Requeue);
        assert_eq!(settle(N, 0, 2, 0), FinishShed);
        assert_eq!(settle(N, 0, 1, 1), Requeue, "one node never tried");
        assert_eq!(settle(N, 0, 0, 2), Requeue);
    }

    /// A memory queue holding `n` consumed deliveries, for settling for real.
    struct Queue {
        q: MemoryQueue,
        sub: Subscriber,
        _stop: CancellationToken,
    }

    async fn queue_with(n: usize) -> (Queue, Vec<Delivery>) {
        let cfg = QueueConfig::Memory { capacity: 16 };
        let q = MemoryQueue::new(16);
        let stop = CancellationToken::new();
        let publisher = Publisher::connect(&cfg, Some(&q)).await.unwrap();
        let mut sub =
            Subscriber::start(&cfg, Some(&q), "t", &TaskTracker::new(), stop.clone()).unwrap();
        let mut ds = Vec::new();
        for i in 0..n {
            publisher
                .publish(Bytes::from(format!("m{i}")))
                .await
                .unwrap();
            ds.push(sub.next().await.unwrap());
        }
        assert_eq!(q.depth(), 0);
        (
            Queue {
                q,
                sub,
                _stop: stop,
            },
            ds,
        )
    }

    fn pending(level: MsgLevel, ds: Vec<Delivery>, m: &Arc<Metrics>) -> (Arc<Batch>, Arc<Pending>) {
        let batch = Arc::new(Batch::new("r".into(), level, Bytes::new(), ds.len()));
        let p = Pending::new(batch.clone(), ds, Duration::ZERO, m.clone());
        (batch, p)
    }

    async fn wait_depth(q: &MemoryQueue, want: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while q.depth() != want {
            assert!(
                Instant::now() < deadline,
                "queue depth {} never became {want}",
                q.depth()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn finishes_only_after_every_node_reported() {
        let m = Arc::new(Metrics::default());
        let (q, ds) = queue_with(2).await;
        let (batch, p) = pending(I, ds, &m);
        let tickets: Vec<_> = (0..3).map(|_| Ticket::new(&p)).collect();
        drop(p);
        let mut tickets = tickets.into_iter();
        tickets.next().unwrap().report(Outcome::Failed);
        tickets.next().unwrap().report(Outcome::Delivered);
        assert_eq!(m.snapshot().finished, 0, "one node has not reported yet");
        tickets.next().unwrap().report(Outcome::Failed);
        let s = m.snapshot();
        assert_eq!((s.finished, s.requeued), (2, 0));
        assert!(!batch.handed_back());
        assert_eq!(q.q.depth(), 0);
    }

    #[tokio::test]
    async fn requeues_important_when_every_node_failed() {
        let m = Arc::new(Metrics::default());
        let (mut q, ds) = queue_with(2).await;
        let (batch, p) = pending(I, ds, &m);
        let (a, b) = (Ticket::new(&p), Ticket::new(&p));
        drop(p);
        a.report(Outcome::Failed);
        assert!(!batch.handed_back());
        b.report(Outcome::Failed);
        assert!(batch.handed_back(), "retrying workers must stop");
        assert_eq!(m.snapshot().requeued, 2);
        wait_depth(&q.q, 2).await;
        let again = q.sub.next().await.unwrap();
        assert_eq!((&again.body[..], again.attempts), (&b"m0"[..], 2));
    }

    #[tokio::test]
    async fn a_retry_that_got_through_prevents_the_requeue() {
        let m = Arc::new(Metrics::default());
        let (_q, ds) = queue_with(1).await;
        let (batch, p) = pending(I, ds, &m);
        let (a, b) = (Ticket::new(&p), Ticket::new(&p));
        drop(p);
        a.report(Outcome::Failed);
        batch.mark_delivered_on_retry();
        b.report(Outcome::Failed);
        let s = m.snapshot();
        assert_eq!((s.finished, s.requeued), (1, 0));
        assert!(!batch.handed_back());
    }

    #[tokio::test]
    async fn finishes_normal_when_every_node_failed() {
        let m = Arc::new(Metrics::default());
        let (q, ds) = queue_with(1).await;
        let (batch, p) = pending(N, ds, &m);
        let (a, b) = (Ticket::new(&p), Ticket::new(&p));
        drop(p);
        a.report(Outcome::Failed);
        b.report(Outcome::Failed);
        let s = m.snapshot();
        assert_eq!((s.finished, s.requeued), (1, 0));
        assert!(!batch.handed_back());
        tokio::task::yield_now().await;
        assert_eq!(q.q.depth(), 0);
    }

    #[tokio::test]
    async fn requeues_what_a_stopped_worker_never_tried() {
        let m = Arc::new(Metrics::default());
        let (q, ds) = queue_with(3).await;
        let (_batch, p) = pending(N, ds, &m);
        let t = Ticket::new(&p);
        drop(p);
        drop(t);
        assert_eq!(m.snapshot().requeued, 3);
        wait_depth(&q.q, 3).await;
    }

    #[tokio::test]
    async fn finishes_with_no_nodes() {
        let m = Arc::new(Metrics::default());
        let (_q, ds) = queue_with(2).await;
        let (_batch, p) = pending(I, ds, &m);
        drop(p);
        let s = m.snapshot();
        assert_eq!((s.finished, s.no_nodes, s.requeued), (2, 2, 0));
    }
}

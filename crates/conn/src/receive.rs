//! Room messages from this node's sessions on their way to logic, bundled.
//!
//! Every session hands its message to one task, which sends whatever has
//! gathered while earlier calls were in flight as one `ReceiveMany` call (up
//! to [`MAX_BUNDLE`] messages, at most [`IN_FLIGHT`] calls at once). Under a
//! light load each message still goes out at once, alone, as a plain
//! `Receive`; under a heavy one the per-call cost (HTTP/2 frames, tonic's
//! layers, a task on each side) is shared by many messages — with many small
//! rooms that cost, not the fan-out, is what limits a node. A session waits
//! for its own answer, so it has one message in flight and its order holds.
//! A logic node without `ReceiveMany` (an older one) gets one `Receive` per
//! message.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use chatroom_common::proto::logic::{ReceiveManyReq, ReceiveReply, ReceiveReq};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Code, Status};
use tracing::{debug, warn};

use crate::logic_pool::LogicPool;

/// Most messages in one `ReceiveMany` call.
pub const MAX_BUNDLE: usize = 256;
/// Calls to logic in flight at once; messages arriving meanwhile gather.
pub const IN_FLIGHT: usize = 8;
/// Messages waiting for a call; beyond this sessions wait to hand theirs over.
const QUEUE: usize = 4096;

type Answer = Result<ReceiveReply, Status>;

struct Pending {
    req: ReceiveReq,
    answer: oneshot::Sender<Answer>,
}

/// The sessions' handle on the bundling task.
pub struct Receiver {
    tx: mpsc::Sender<Pending>,
}

impl Receiver {
    /// Starts the bundling task on `tracker`; it ends once `stop` fires and
    /// the messages already handed over are sent.
    pub fn start(logic: Arc<LogicPool>, tracker: &TaskTracker, stop: CancellationToken) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tracker.spawn(run(logic, rx, tracker.clone(), stop));
        Receiver { tx }
    }

    /// Sends one client message to logic and returns logic's answer.
    pub async fn receive(&self, req: ReceiveReq) -> Answer {
        let gone = || Status::unavailable("this node is shutting down");
        let (answer, rx) = oneshot::channel();
        self.tx
            .send(Pending { req, answer })
            .await
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

async fn run(
    logic: Arc<LogicPool>,
    mut rx: mpsc::Receiver<Pending>,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let single_only = Arc::new(AtomicBool::new(false));
    loop {
        // What is already handed over is sent even when stopping.
        let first = tokio::select! {
            biased;
            p = rx.recv() => match p {
                Some(p) => p,
                None => break,
            },
            _ = stop.cancelled() => break,
        };
        // Wait for a free slot before gathering: what arrives meanwhile
        // rides along in this call.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let mut bundle = vec![first];
        while bundle.len() < MAX_BUNDLE {
            match rx.try_recv() {
                Ok(p) => bundle.push(p),
                Err(_) => break,
            }
        }
        let logic = logic.clone();
        let single_only = single_only.clone();
        tracker.spawn(async move {
            send(&logic, bundle, &single_only).await;
            drop(slot);
        });
    }
    debug!("client message bundling stopped");
}

async fn send(logic: &LogicPool, bundle: Vec<Pending>, single_only: &AtomicBool) {
    let (msgs, answers): (Vec<_>, Vec<_>) = bundle.into_iter().map(|p| (p.req, p.answer)).unzip();
    if msgs.len() == 1 || single_only.load(Ordering::Relaxed) {
        return send_each(logic, msgs, answers).await;
    }
    // Kept here, not moved into the call: a logic node without ReceiveMany
    // gets the same messages one by one.
    let req = ReceiveManyReq { msgs };
    match logic.receive_many(&req).await {
        Ok(reply) if reply.replies.len() == answers.len() => {
            for (answer, r) in answers.into_iter().zip(reply.replies) {
                let _ = answer.send(Ok(r));
            }
        }
        Ok(reply) => {
            warn!(
                sent = answers.len(),
                answers = reply.replies.len(),
                "logic answered a different number of messages"
            );
            let err = Status::internal("logic gave no answer for this message");
            for answer in answers {
                let _ = answer.send(Err(err.clone()));
            }
        }
        Err(e) if e.code() == Code::Unimplemented => {
            warn!("logic does not take ReceiveMany; one call per message from now on");
            single_only.store(true, Ordering::Relaxed);
            send_each(logic, req.msgs, answers).await;
        }
        Err(e) => {
            for answer in answers {
                let _ = answer.send(Err(e.clone()));
            }
        }
    }
}

async fn send_each(
    logic: &LogicPool,
    msgs: Vec<ReceiveReq>,
    answers: Vec<oneshot::Sender<Answer>>,
) {
    futures_util::future::join_all(
        msgs.into_iter()
            .zip(answers)
            .map(|(req, answer)| async move {
                let _ = answer.send(logic.receive(req).await);
            }),
    )
    .await;
}

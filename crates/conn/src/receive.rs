//! Room messages from this node's sessions on their way to logic:
//! pipelined per session, bundled per call, in order.
//!
//! A session hands a message over and reads the client's next frame at
//! once; it may have up to `ws.max_in_flight` messages on their way. At the
//! bound it waits for a slot, so it stops reading its socket and TCP pushes
//! back on the client — nothing is dropped. Only refusals are answered
//! (the seed's clients read `Reply{type 0}` as an error), straight into the
//! session's outbox.
//!
//! Messages go through [`LANES`] lanes, a session always on the same one
//! (by session id). A lane has one call to logic in flight; what arrives
//! meanwhile goes together in the next `ReceiveMany` (up to
//! [`MAX_BUNDLE`]), and logic numbers and publishes a call's messages in
//! the order given. So one session's messages keep their order end to end,
//! under a light load each still goes out at once, alone, and under a heavy
//! one the per-call cost is shared by many. A logic node without
//! `ReceiveMany` (an older one) gets one `Receive` per message, in order.
//! Every message handed over is sent, also after its session ended and
//! while the node shuts down.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use chatroom_common::proto::logic::{ReceiveManyReq, ReceiveReply, ReceiveReq};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Code, Status};
use tracing::{debug, info, warn};

use crate::frame;
use crate::logic_pool::LogicPool;
use crate::outbox::Outbox;
use crate::room::Outbound;
use chatroom_common::proto::protocol::ErrCode;

/// Most messages in one `ReceiveMany` call.
pub const MAX_BUNDLE: usize = 256;
/// Lanes, each with one call to logic in flight.
pub const LANES: usize = 8;
/// Messages waiting per lane; beyond this sessions wait to hand theirs over.
const LANE_QUEUE: usize = 1024;

/// One message on its way, with where its answer goes and the session's
/// in-flight slot it holds until answered.
struct Pending {
    req: ReceiveReq,
    answer: Arc<Outbox>,
    _slot: OwnedSemaphorePermit,
}

/// The sessions' handle on the lanes.
pub struct Receiver {
    lanes: Vec<mpsc::Sender<Pending>>,
}

impl Receiver {
    /// Starts the lane tasks on `tracker`; once `stop` fires they take no
    /// more messages, send what they hold and end.
    pub fn start(logic: Arc<LogicPool>, tracker: &TaskTracker, stop: CancellationToken) -> Self {
        let single_only = Arc::new(AtomicBool::new(false));
        let lanes = (0..LANES)
            .map(|_| {
                let (tx, rx) = mpsc::channel(LANE_QUEUE);
                tracker.spawn(lane(logic.clone(), rx, single_only.clone(), stop.clone()));
                tx
            })
            .collect();
        Receiver { lanes }
    }

    /// Hands one client message of session `session` to logic. Waits only
    /// while the lane's queue is full; refusals are answered into `answer`.
    pub async fn submit(
        &self,
        session: u64,
        req: ReceiveReq,
        answer: Arc<Outbox>,
        slot: OwnedSemaphorePermit,
    ) -> Result<(), ()> {
        let lane = &self.lanes[(session % self.lanes.len() as u64) as usize];
        lane.send(Pending {
            req,
            answer,
            _slot: slot,
        })
        .await
        .map_err(|_| ())
    }
}

async fn lane(
    logic: Arc<LogicPool>,
    mut rx: mpsc::Receiver<Pending>,
    single_only: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let mut bundle = Vec::with_capacity(MAX_BUNDLE);
    let mut closed = false;
    loop {
        let next = tokio::select! {
            biased;
            p = rx.recv() => p,
            _ = stop.cancelled(), if !closed => {
                // What is queued is still sent; then recv() ends.
                rx.close();
                closed = true;
                continue;
            }
        };
        let Some(first) = next else { break };
        bundle.push(first);
        while bundle.len() < MAX_BUNDLE {
            match rx.try_recv() {
                Ok(p) => bundle.push(p),
                Err(_) => break,
            }
        }
        send(&logic, &mut bundle, &single_only).await;
        bundle.clear();
        if bundle.capacity() > MAX_BUNDLE {
            bundle.shrink_to(MAX_BUNDLE);
        }
    }
    debug!("client message lane stopped");
}

/// Sends a bundle and answers its refusals; the bundle's slots are freed
/// when the caller clears it.
async fn send(logic: &LogicPool, bundle: &mut [Pending], single_only: &AtomicBool) {
    if bundle.len() == 1 || single_only.load(Ordering::Relaxed) {
        return send_each(logic, bundle).await;
    }
    // Moved into the call and back after it: the answers name their
    // sender, and an older logic gets the same messages one by one.
    let req = ReceiveManyReq {
        msgs: bundle
            .iter_mut()
            .map(|p| std::mem::take(&mut p.req))
            .collect(),
    };
    let sent = logic.receive_many(&req).await;
    for (p, m) in bundle.iter_mut().zip(req.msgs) {
        p.req = m;
    }
    match sent {
        Ok(reply) if reply.replies.len() == bundle.len() => {
            for (p, r) in bundle.iter().zip(reply.replies) {
                answer(p, Ok(r));
            }
        }
        Ok(reply) => {
            warn!(
                sent = bundle.len(),
                answers = reply.replies.len(),
                "logic answered a different number of messages"
            );
            let err = Status::internal("logic gave no answer for this message");
            for p in bundle.iter() {
                answer(p, Err(err.clone()));
            }
        }
        Err(e) if e.code() == Code::Unimplemented => {
            warn!("logic does not take ReceiveMany; one call per message from now on");
            single_only.store(true, Ordering::Relaxed);
            send_each(logic, bundle).await;
        }
        Err(e) => {
            for p in bundle.iter() {
                answer(p, Err(e.clone()));
            }
        }
    }
}

/// One `Receive` at a time: the order of the bundle is kept.
async fn send_each(logic: &LogicPool, bundle: &mut [Pending]) {
    for p in bundle.iter() {
        let r = logic.receive(p.req.clone()).await;
        answer(p, r);
    }
}

fn answer(p: &Pending, r: Result<ReceiveReply, Status>) {
    let refusal = match r {
        Ok(r) if r.code == ErrCode::Ok as i32 => return,
        Ok(r) => {
            info!(uid = %p.req.uid, code = r.code, msg = %r.msg, "message refused by logic");
            frame::err(r.code, r.msg)
        }
        Err(e) => {
            warn!(uid = %p.req.uid, error = %e.message(), "logic receive call failed");
            frame::err(
                ErrCode::Unavailable,
                "message service unavailable, try again",
            )
        }
    };
    // The session may be gone: then nobody is left to tell.
    let _ = p.answer.reply(Outbound::Frame(refusal));
}

//! gRPC clients for the live logic nodes, kept in step with discovery and
//! used round-robin; a call that finds a node unreachable tries the next one.
//! Calls in flight are bounded ([`MAX_IN_FLIGHT`]): when thousands of
//! sessions sign in or out at once (a restart, a network blip) the rest wait
//! their turn instead of each holding request and HTTP/2 stream buffers.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chatroom_common::discovery::{Node, NodesRx};
use chatroom_common::proto::logic::logic_client::LogicClient;
use chatroom_common::proto::logic::{
    AckPendingReply, AckPendingReq, ChatReply, ChatReq, HeartbeatReply, HeartbeatReq, PendingReply,
    PendingReq, ReceiveManyReply, ReceiveManyReq, ReceiveReply, ReceiveReq, ReportOnlineReply,
    ReportOnlineReq, RoomHistoryReply, RoomHistoryReq, SignInReply, SignInReq, SignOutReply,
    SignOutReq, UndeliveredReply, UndeliveredReq,
};
use tokio::sync::Semaphore;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tracing::{info, warn};

use crate::stats::{LogicCall, Stats};

type Client = LogicClient<Channel>;

/// Calls to logic in flight at once from this node.
pub const MAX_IN_FLIGHT: usize = 256;

pub struct LogicPool {
    state: Mutex<State>,
    /// Call latency and errors, per kind of call.
    stats: Arc<Stats>,
    next: AtomicUsize,
    timeout: Duration,
    in_flight: Semaphore,
}

struct State {
    rx: NodesRx,
    clients: Vec<(Node, Client)>,
}

impl LogicPool {
    pub fn new(rx: NodesRx, timeout: Duration, stats: Arc<Stats>) -> Self {
        let pool = LogicPool {
            stats,
            state: Mutex::new(State {
                rx,
                clients: vec![],
            }),
            next: AtomicUsize::new(0),
            timeout,
            in_flight: Semaphore::new(MAX_IN_FLIGHT),
        };
        pool.refresh(true);
        pool
    }

    /// Rebuilds the client list when discovery changed; channels to nodes
    /// that stay are kept.
    fn refresh(&self, force: bool) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !force && !st.rx.has_changed().unwrap_or(false) {
            return;
        }
        let nodes = st.rx.borrow_and_update().clone();
        let mut clients = Vec::with_capacity(nodes.len());
        for node in nodes {
            if let Some((_, c)) = st.clients.iter().find(|(n, _)| *n == node) {
                clients.push((node, c.clone()));
                continue;
            }
            match Endpoint::from_shared(node.uri.clone()) {
                Ok(ep) => {
                    let ch = ep
                        .connect_timeout(Duration::from_secs(2))
                        .timeout(self.timeout)
                        .tcp_nodelay(true)
                        .connect_lazy();
                    info!(id = %node.id, uri = %node.uri, "logic node added");
                    clients.push((node, LogicClient::new(ch)));
                }
                Err(e) => warn!(id = %node.id, uri = %node.uri, error = %e, "bad logic node uri"),
            }
        }
        st.clients = clients;
    }

    fn pick(&self, skip: usize) -> Option<(usize, Client)> {
        self.refresh(false);
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.clients.is_empty() {
            return None;
        }
        let i = (self.next.fetch_add(1, Ordering::Relaxed) + skip) % st.clients.len();
        Some((st.clients.len(), st.clients[i].1.clone()))
    }

    /// Runs `f` on a logic node (timed and counted as `kind`).
    async fn call<R, F, Fut>(&self, kind: LogicCall, f: F) -> Result<R, Status>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<tonic::Response<R>, Status>>,
    {
        let started = Instant::now();
        let r = self.call_once(f).await;
        self.stats
            .record_logic_call(kind, started.elapsed(), r.is_ok());
        r
    }

    /// Runs `f` on a logic node; on `Unavailable` retries once on another.
    async fn call_once<R, F, Fut>(&self, f: F) -> Result<R, Status>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<tonic::Response<R>, Status>>,
    {
        let Ok(_slot) = self.in_flight.acquire().await else {
            return Err(Status::unavailable("logic calls are closed"));
        };
        let Some((n, c)) = self.pick(0) else {
            return Err(Status::unavailable("no logic node is known"));
        };
        match f(c).await {
            Err(s) if s.code() == Code::Unavailable && n > 1 => {
                warn!(error = %s.message(), "logic node unavailable; trying another");
                let Some((_, c)) = self.pick(1) else {
                    return Err(s);
                };
                f(c).await
            }
            r => r,
        }
        .map(tonic::Response::into_inner)
    }

    pub async fn sign_in(&self, req: SignInReq) -> Result<SignInReply, Status> {
        self.call(LogicCall::SignIn, |mut c| {
            let req = req.clone();
            async move { c.sign_in(req).await }
        })
        .await
    }

    pub async fn sign_out(&self, req: SignOutReq) -> Result<SignOutReply, Status> {
        self.call(LogicCall::Other, |mut c| {
            let req = req.clone();
            async move { c.sign_out(req).await }
        })
        .await
    }

    pub async fn heartbeat(&self, req: HeartbeatReq) -> Result<HeartbeatReply, Status> {
        self.call(LogicCall::Other, |mut c| {
            let req = req.clone();
            async move { c.heartbeat(req).await }
        })
        .await
    }

    pub async fn receive(&self, req: ReceiveReq) -> Result<ReceiveReply, Status> {
        self.call(LogicCall::Receive, |mut c| {
            let req = req.clone();
            async move { c.receive(req).await }
        })
        .await
    }

    /// Borrows the request: the caller keeps it for a fallback.
    pub async fn receive_many(&self, req: &ReceiveManyReq) -> Result<ReceiveManyReply, Status> {
        self.call(LogicCall::ReceiveMany, |mut c| {
            let req = req.clone();
            async move { c.receive_many(req).await }
        })
        .await
    }

    pub async fn report_online(&self, req: ReportOnlineReq) -> Result<ReportOnlineReply, Status> {
        self.call(LogicCall::ReportOnline, |mut c| {
            let req = req.clone();
            async move { c.report_online(req).await }
        })
        .await
    }

    pub async fn chat(&self, req: ChatReq) -> Result<ChatReply, Status> {
        self.call(LogicCall::Chat, |mut c| {
            let req = req.clone();
            async move { c.chat(req).await }
        })
        .await
    }

    pub async fn pending(&self, req: PendingReq) -> Result<PendingReply, Status> {
        self.call(LogicCall::Other, |mut c| {
            let req = req.clone();
            async move { c.pending(req).await }
        })
        .await
    }

    pub async fn ack_pending(&self, req: AckPendingReq) -> Result<AckPendingReply, Status> {
        self.call(LogicCall::Other, |mut c| {
            let req = req.clone();
            async move { c.ack_pending(req).await }
        })
        .await
    }

    pub async fn undelivered(&self, req: UndeliveredReq) -> Result<UndeliveredReply, Status> {
        self.call(LogicCall::Other, |mut c| {
            let req = req.clone();
            async move { c.undelivered(req).await }
        })
        .await
    }

    pub async fn room_history(&self, req: RoomHistoryReq) -> Result<RoomHistoryReply, Status> {
        self.call(LogicCall::Other, |mut c| {
            let req = req.clone();
            async move { c.room_history(req).await }
        })
        .await
    }
}

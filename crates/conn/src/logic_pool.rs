//! gRPC clients for the live logic nodes, kept in step with discovery and
//! used round-robin; a call that finds a node unreachable tries another one,
//! and that node is passed over for [`DOWN_FOR`] (a killed logic node stays
//! in etcd until its lease ends: without this every call would try it first).
//! Calls in flight are bounded ([`MAX_IN_FLIGHT`]): when thousands of
//! sessions sign in or out at once (a restart, a network blip) the rest wait
//! their turn instead of each holding request and HTTP/2 stream buffers.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chatroom_common::proto::logic::logic_client::LogicClient;
use chatroom_common::proto::logic::{
    AckPendingReply, AckPendingReq, ChatReply, ChatReq, HeartbeatReply, HeartbeatReq, PendingReply,
    PendingReq, ReceiveManyReply, ReceiveManyReq, ReceiveReply, ReceiveReq, ReportOnlineReply,
    ReportOnlineReq, RoomHistoryReply, RoomHistoryReq, SignInReply, SignInReq, SignOutReply,
    SignOutReq, UndeliveredReply, UndeliveredReq,
};
use chatroom_discovery::{Node, NodesRx};
use tokio::sync::Semaphore;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tracing::{info, warn};

use crate::stats::{LogicCall, Stats};

type Client = LogicClient<Channel>;

/// Calls to logic in flight at once from this node.
pub const MAX_IN_FLIGHT: usize = 256;
/// How long a node that answered `Unavailable` is passed over while
/// another is up.
pub const DOWN_FOR: Duration = Duration::from_secs(2);

/// One logic node's client and until when it is passed over.
struct Member {
    node: Node,
    client: Client,
    /// ms since the pool started; 0: up.
    down_until_ms: AtomicU64,
}

pub struct LogicPool {
    state: Mutex<State>,
    /// Call latency and errors, per kind of call.
    stats: Arc<Stats>,
    next: AtomicUsize,
    timeout: Duration,
    in_flight: Semaphore,
    started: Instant,
}

struct State {
    rx: NodesRx,
    clients: Vec<Arc<Member>>,
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
            started: Instant::now(),
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
            if let Some(m) = st.clients.iter().find(|m| m.node == node) {
                clients.push(m.clone());
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
                    clients.push(Arc::new(Member {
                        node,
                        client: LogicClient::new(ch),
                        down_until_ms: AtomicU64::new(0),
                    }));
                }
                Err(e) => warn!(id = %node.id, uri = %node.uri, error = %e, "bad logic node uri"),
            }
        }
        st.clients = clients;
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The next node round-robin, passing over `avoid` and nodes recently
    /// found down while another is up; with how many nodes there are.
    fn pick(&self, avoid: Option<&Arc<Member>>) -> Option<(usize, Arc<Member>)> {
        self.refresh(false);
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let n = st.clients.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let now = self.now_ms();
        let candidates = (0..n)
            .map(|k| &st.clients[(start + k) % n])
            .filter(|m| !avoid.is_some_and(|a| Arc::ptr_eq(a, m)));
        let mut fallback = None;
        for m in candidates {
            if m.down_until_ms.load(Ordering::Relaxed) <= now {
                return Some((n, m.clone()));
            }
            fallback.get_or_insert(m);
        }
        fallback.map(|m| (n, m.clone()))
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
        let Some((n, m)) = self.pick(None) else {
            return Err(Status::unavailable("no logic node is known"));
        };
        match f(m.client.clone()).await {
            Err(s) if s.code() == Code::Unavailable => {
                m.down_until_ms.store(
                    self.now_ms() + DOWN_FOR.as_millis() as u64,
                    Ordering::Relaxed,
                );
                let other = if n > 1 { self.pick(Some(&m)) } else { None };
                let Some((_, o)) = other else {
                    return Err(s);
                };
                warn!(node = %m.node.id, other = %o.node.id, error = %s.message(),
                    "logic node unavailable; trying another");
                f(o.client.clone()).await
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

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str) -> Node {
        Node {
            id: id.into(),
            uri: format!("http://127.0.0.1:1/{id}"),
        }
    }

    #[tokio::test]
    async fn a_node_found_down_is_passed_over_and_a_retry_goes_elsewhere() {
        let (_tx, rx) = tokio::sync::watch::channel(vec![node("a"), node("b")]);
        let pool = LogicPool::new(rx, Duration::from_secs(1), Arc::new(Stats::default()));
        let ids = |avoid: Option<&Arc<Member>>| {
            (0..4)
                .map(|_| pool.pick(avoid).unwrap().1.node.id.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(None), ["a", "b", "a", "b"], "round-robin");
        let (_, a) = pool.pick(None).unwrap();
        // The retry after a failure never lands on the node that failed,
        // whatever the round-robin position (two nodes: k + 2 = k).
        assert!(ids(Some(&a)).iter().all(|id| *id != a.node.id));
        a.down_until_ms
            .store(pool.now_ms() + 60_000, Ordering::Relaxed);
        assert!(
            ids(None).iter().all(|id| *id != a.node.id),
            "a node found down is passed over while another is up"
        );
        // With every node down, calls still go somewhere.
        let (_, b) = pool.pick(Some(&a)).unwrap();
        b.down_until_ms
            .store(pool.now_ms() + 60_000, Ordering::Relaxed);
        assert_eq!(ids(None).len(), 4);
    }
}

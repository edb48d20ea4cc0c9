//! Test doubles and helpers shared by job's integration tests: fake conn
//! nodes (real tonic servers on 127.0.0.1:0 that record every push), a job
//! running on a memory queue, and waiting on conditions with a deadline.

#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chatroom_common::batch::decode;
use chatroom_common::config::Load;
use chatroom_common::proto::conn::conn_server::{Conn, ConnServer};
use chatroom_common::proto::conn::{
    JoinRoomReply, JoinRoomReq, PushAllReq, PushRoomReply, PushRoomReq, PushRoomsReply,
    PushRoomsReq, PushUsersReply, PushUsersReq,
};
use chatroom_common::proto::protocol::MsgLevel;
use chatroom_common::proto::queue::queue_msg::Body;
use chatroom_common::proto::queue::{QueueMsg, RoomMsg};
use chatroom_discovery::DiscoveryConfig;
use chatroom_job::{JobConfig, JobError, Metrics, run_with_metrics};
use chatroom_queue::QueueConfig;
use chatroom_queue::{MemoryQueue, Publisher};
use prost::Message as _;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

pub const N: MsgLevel = MsgLevel::Normal;
pub const I: MsgLevel = MsgLevel::Important;

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "chatroom_job=debug".into()),
        )
        .with_test_writer()
        .try_init();
}

/// How a fake conn node answers.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    Ok,
    /// `Status::unavailable` for the first n calls, then Ok.
    FailFirst(usize),
    AlwaysFail,
    /// Never answers (a stuck node).
    Hang,
    /// Answers `PushRoom` but not `PushRooms` (a node from before bundling).
    NoBundles,
}

/// One push as a fake node received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Got {
    pub room: String,
    pub level: MsgLevel,
    pub msgs: Vec<String>,
}

pub fn got(room: &str, level: MsgLevel, msgs: &[&str]) -> Got {
    Got {
        room: room.into(),
        level,
        msgs: msgs.iter().map(|m| m.to_string()).collect(),
    }
}

#[derive(Default)]
struct State {
    got: Mutex<Vec<Got>>,
    calls: AtomicUsize,
    /// `PushRooms` calls answered (several rooms in one call).
    bundles: AtomicUsize,
    /// Room batches in calls, failed ones included.
    tried: AtomicUsize,
    /// When set, the first call waits for a permit (see `FakeConn::release`).
    gate: Option<tokio::sync::Semaphore>,
}

struct Svc {
    mode: Mode,
    state: Arc<State>,
}

#[tonic::async_trait]
impl Conn for Svc {
    async fn push_room(
        &self,
        req: Request<PushRoomReq>,
    ) -> Result<Response<PushRoomReply>, Status> {
        self.answer(1).await?;
        Ok(Response::new(self.record_room(req.into_inner())))
    }

    async fn push_rooms(
        &self,
        req: Request<PushRoomsReq>,
    ) -> Result<Response<PushRoomsReply>, Status> {
        let req = req.into_inner();
        self.answer(req.rooms.len()).await?;
        if matches!(self.mode, Mode::NoBundles) {
            return Err(Status::unimplemented("PushRooms"));
        }
        self.state.bundles.fetch_add(1, Ordering::SeqCst);
        let rooms = req.rooms.into_iter().map(|r| self.record_room(r)).collect();
        Ok(Response::new(PushRoomsReply { rooms }))
    }

    async fn push_users(
        &self,
        req: Request<PushUsersReq>,
    ) -> Result<Response<PushUsersReply>, Status> {
        let req = req.into_inner();
        let content = req.msg.map(|m| m.content).unwrap_or_default();
        self.record(format!("users:{}", req.uids.join(",")), content);
        Ok(Response::new(PushUsersReply {
            delivered: 1,
            dropped: 0,
        }))
    }

    async fn push_all(&self, req: Request<PushAllReq>) -> Result<Response<PushUsersReply>, Status> {
        let content = req.into_inner().msg.map(|m| m.content).unwrap_or_default();
        self.record("all".into(), content);
        Ok(Response::new(PushUsersReply {
            delivered: 1,
            dropped: 0,
        }))
    }

    async fn join_room(
        &self,
        req: Request<JoinRoomReq>,
    ) -> Result<Response<JoinRoomReply>, Status> {
        let req = req.into_inner();
        self.record(format!("join:{}", req.uid), req.room);
        Ok(Response::new(JoinRoomReply { sessions: 1 }))
    }
}

impl Svc {
    /// Counts the call (of `batches` room batches) and fails or hangs as
    /// the mode says.
    async fn answer(&self, batches: usize) -> Result<(), Status> {
        self.state.tried.fetch_add(batches, Ordering::SeqCst);
        let call = self.state.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if let (1, Some(gate)) = (call, &self.state.gate) {
            let _ = gate.acquire().await;
        }
        match self.mode {
            Mode::Ok | Mode::NoBundles => Ok(()),
            Mode::FailFirst(n) if call > n => Ok(()),
            Mode::FailFirst(_) | Mode::AlwaysFail => Err(Status::unavailable("fake conn outage")),
            Mode::Hang => std::future::pending().await,
        }
    }

    fn record_room(&self, req: PushRoomReq) -> PushRoomReply {
        let msgs = decode(&req.batch)
            .map(|m| String::from_utf8(m.expect("well-formed batch").to_vec()).unwrap())
            .collect();
        self.state.got.lock().unwrap().push(Got {
            room: req.room_id,
            level: MsgLevel::try_from(req.level).expect("known level"),
            msgs,
        });
        PushRoomReply {
            delivered: 1,
            dropped: 0,
        }
    }

    /// Direct pushes are recorded as one IMPORTANT message to a pseudo-room.
    fn record(&self, room: String, msg: String) {
        self.state.calls.fetch_add(1, Ordering::SeqCst);
        self.state.got.lock().unwrap().push(Got {
            room,
            level: MsgLevel::Important,
            msgs: vec![msg],
        });
    }
}

/// A conn node's gRPC server that records what job pushes to it.
pub struct FakeConn {
    pub uri: String,
    state: Arc<State>,
    server: JoinHandle<()>,
}

impl FakeConn {
    pub async fn start(mode: Mode) -> FakeConn {
        Self::start_with(mode, false).await
    }

    /// A node whose first call waits until [`FakeConn::release`], so that
    /// batches pile up in job's queue for it meanwhile.
    pub async fn start_held(mode: Mode) -> FakeConn {
        Self::start_with(mode, true).await
    }

    /// Lets the held first call go on.
    pub fn release(&self) {
        if let Some(gate) = &self.state.gate {
            gate.add_permits(1);
        }
    }

    async fn start_with(mode: Mode, held: bool) -> FakeConn {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(State {
            gate: held.then(|| tokio::sync::Semaphore::new(0)),
            ..State::default()
        });
        let svc = ConnServer::new(Svc {
            mode,
            state: state.clone(),
        });
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let server = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(incoming)
                .await
                .unwrap();
        });
        FakeConn { uri, state, server }
    }

    /// Pushes accepted so far, in arrival order.
    pub fn got(&self) -> Vec<Got> {
        self.state.got.lock().unwrap().clone()
    }

    /// Every message accepted so far, in order, whatever the batching.
    pub fn msgs(&self) -> Vec<String> {
        self.got().into_iter().flat_map(|g| g.msgs).collect()
    }

    /// `PushRoom`/`PushRooms` calls, failed ones included.
    pub fn calls(&self) -> usize {
        self.state.calls.load(Ordering::SeqCst)
    }

    /// Room batches pushed to this node, failed attempts included, however
    /// they were bundled into calls.
    pub fn tried(&self) -> usize {
        self.state.tried.load(Ordering::SeqCst)
    }

    /// `PushRooms` calls answered.
    pub fn bundles(&self) -> usize {
        self.state.bundles.load(Ordering::SeqCst)
    }
}

impl Drop for FakeConn {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// A URI where nothing listens.
pub async fn dead_uri() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    format!("http://{}", l.local_addr().unwrap())
}

/// Defaults with static discovery of `conn` and test-friendly timings.
pub fn config(conn: Vec<String>) -> JobConfig {
    let mut cfg = JobConfig::from_overrides([]).unwrap();
    cfg.node.id = "job-test".into();
    cfg.discovery = DiscoveryConfig::Static {
        logic: Vec::new(),
        conn,
    };
    cfg.queue = QueueConfig::Memory { capacity: 1024 };
    cfg.push.requeue_delay = Duration::from_millis(20);
    cfg.push.max_backoff = Duration::from_millis(100);
    cfg.push.timeout = Duration::from_millis(1000);
    cfg.shutdown_grace = Duration::from_millis(2000);
    cfg
}

pub fn room_msg(room: &str, level: MsgLevel, data: &str) -> Bytes {
    let m = RoomMsg {
        id: 0,
        room_id: room.into(),
        level: level as i32,
        data: Bytes::copy_from_slice(data.as_bytes()),
        uid: "u".into(),
        ts_ms: 0,
        chat: false,
        ..Default::default()
    };
    queue_msg(Body::Room(m))
}

pub fn queue_msg(body: Body) -> Bytes {
    QueueMsg { body: Some(body) }.encode_to_vec().into()
}

/// A job running on its own memory queue.
pub struct Job {
    pub queue: MemoryQueue,
    pub publisher: Publisher,
    pub metrics: Arc<Metrics>,
    stop: CancellationToken,
    task: JoinHandle<Result<(), JobError>>,
}

impl Job {
    pub async fn start(cfg: JobConfig) -> Job {
        let queue = MemoryQueue::new(1024);
        let publisher = Publisher::connect(&cfg.queue, Some(&queue)).await.unwrap();
        let metrics = Arc::new(Metrics::default());
        let stop = CancellationToken::new();
        let task = tokio::spawn(run_with_metrics(
            cfg,
            Some(queue.clone()),
            stop.clone(),
            metrics.clone(),
        ));
        Job {
            queue,
            publisher,
            metrics,
            stop,
            task,
        }
    }

    pub async fn publish(&self, room: &str, level: MsgLevel, data: &str) {
        self.publisher
            .publish(room_msg(room, level, data))
            .await
            .unwrap();
    }

    /// Cancels and waits for `run` to return (it must, within `within`).
    pub async fn stop(self, within: Duration) -> MemoryQueue {
        self.stop.cancel();
        tokio::time::timeout(within, self.task)
            .await
            .expect("job did not stop in time")
            .expect("job task panicked")
            .expect("job returned an error");
        self.queue
    }
}

pub use chatroom_tests::wait::until;

pub const SECS5: Duration = Duration::from_secs(5);

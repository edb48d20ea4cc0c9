//! Starts a real logic node on 127.0.0.1:0 with a memory queue, plus small
//! gRPC and HTTP clients, for the integration tests.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use chatroom_common::config::load_with_env;
use chatroom_common::proto::logic::logic_client::LogicClient;
use chatroom_common::proto::queue::RoomMsg;
use chatroom_common::queue::{MemoryQueue, Subscriber};
use chatroom_common::token::Tokens;
use chatroom_logic::{Listeners, LogicConfig, LogicError};
use http_body_util::{BodyExt, Full};
use hyper::StatusCode;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use prost::Message;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Channel;

pub const SECRET: &str = "integration-test-secret-0123456789";
/// How long any single awaited condition may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

pub struct Node {
    pub cfg: LogicConfig,
    pub grpc_uri: String,
    pub http_addr: SocketAddr,
    pub queue: MemoryQueue,
    pub sub: Subscriber,
    pub tokens: Tokens,
    shutdown: CancellationToken,
    sub_stop: CancellationToken,
    task: JoinHandle<Result<(), LogicError>>,
    http: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

/// The default config with test addresses, the test secret and `env` on top.
pub fn config(env: &[(&str, &str)]) -> LogicConfig {
    let mut all: Vec<(String, String)> = vec![
        ("CHATROOM__GRPC__ADDR".into(), "127.0.0.1:0".into()),
        ("CHATROOM__HTTP__ADDR".into(), "127.0.0.1:0".into()),
        ("CHATROOM__LOG__DIR".into(), "".into()),
        ("CHATROOM__NODE__ID".into(), "logic-test".into()),
        ("CHATROOM__TOKEN__SECRET".into(), SECRET.into()),
        ("CHATROOM__SHUTDOWN_GRACE_MS".into(), "2000".into()),
    ];
    all.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    load_with_env::<LogicConfig>(chatroom_logic::config::DEFAULTS, None, all)
        .expect("test config must be valid")
}

impl Node {
    /// Starts logic with a memory queue of `capacity`.
    pub async fn start(env: &[(&str, &str)], capacity: usize) -> Node {
        let cfg = config(env);
        let listeners = Listeners::bind(&cfg).expect("bind 127.0.0.1:0");
        let grpc_uri = format!("http://{}", listeners.grpc.local_addr().expect("grpc addr"));
        let http_addr = listeners.http.local_addr().expect("http addr");
        let queue = MemoryQueue::new(capacity);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(chatroom_logic::run(
            cfg.clone(),
            listeners,
            Some(queue.clone()),
            shutdown.clone(),
        ));
        let sub_stop = CancellationToken::new();
        let sub = Subscriber::start(
            &cfg.queue,
            Some(&queue),
            "test",
            &TaskTracker::new(),
            sub_stop.clone(),
        )
        .expect("memory subscriber");
        let tokens = Tokens::new(SECRET.as_bytes(), Duration::from_secs(600));
        Node {
            cfg,
            grpc_uri,
            http_addr,
            queue,
            sub,
            tokens,
            shutdown,
            sub_stop,
            task,
            http: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub async fn grpc(&self) -> LogicClient<Channel> {
        tokio::time::timeout(DEADLINE, LogicClient::connect(self.grpc_uri.clone()))
            .await
            .expect("gRPC connect timed out")
            .expect("gRPC connect")
    }

    pub fn token(&self, uid: &str) -> String {
        self.tokens.issue(uid).expect("issue test token")
    }

    /// The next message logic published.
    pub async fn next_published(&mut self) -> RoomMsg {
        let d = tokio::time::timeout(DEADLINE, self.sub.next())
            .await
            .expect("nothing was published in time")
            .expect("queue closed");
        let msg = RoomMsg::decode(d.body.clone()).expect("published bytes are a RoomMsg");
        d.finish();
        msg
    }

    /// `POST path` with the given headers and body; the status and JSON reply.
    pub async fn post(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> (StatusCode, serde_json::Value) {
        self.request("POST", path, headers, body.into()).await
    }

    pub async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> (StatusCode, serde_json::Value) {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.http_addr));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body)).expect("request");
        let resp = tokio::time::timeout(DEADLINE, self.http.request(req))
            .await
            .expect("HTTP request timed out")
            .expect("HTTP request");
        let status = resp.status();
        let is_json = resp
            .headers()
            .get("content-type")
            .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
        let bytes = resp
            .into_body()
            .collect()
            .await
            .expect("HTTP body")
            .to_bytes();
        assert!(is_json, "reply must be JSON, got {status} {bytes:?}");
        let json = serde_json::from_slice(&bytes).expect("reply body is JSON");
        (status, json)
    }

    pub async fn post_json(
        &self,
        path: &str,
        auth: Option<&str>,
        body: serde_json::Value,
    ) -> (StatusCode, serde_json::Value) {
        let mut h = vec![("content-type", "application/json")];
        if let Some(a) = auth {
            h.push(("authorization", a));
        }
        self.post(path, &h, body.to_string()).await
    }

    /// Cancels and checks that `run` returns Ok in time.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.sub_stop.cancel();
        let r = tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("logic did not stop in time")
            .expect("logic task panicked");
        assert!(r.is_ok(), "run returned {r:?}");
    }
}

/// Polls `f` until it returns `Some`, failing after [`DEADLINE`].
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

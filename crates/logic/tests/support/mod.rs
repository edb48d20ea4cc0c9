//! Starts a real logic node on 127.0.0.1:0 with a memory queue, plus small
//! gRPC and HTTP clients, for the integration tests.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use chatroom_common::config::Load;
use chatroom_common::proto::logic::logic_client::LogicClient;
use chatroom_common::proto::queue::{QueueMsg, RoomMsg, queue_msg};
use chatroom_common::token::Tokens;
use chatroom_logic::{Listeners, LogicConfig, LogicError};
use chatroom_queue::{MemoryQueue, Subscriber};
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

/// Which database a node's store uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Db {
    /// A SQLite file in the node's temporary folder.
    Sqlite,
    /// A fresh database on the server `CHATROOM_TEST_PG` points at.
    Postgres,
}

/// A folder under the system temp dir, removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(what: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "chatroom-logic-{what}-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The PostgreSQL server for tests. Tests that need it fail (never skip)
/// when it is not configured.
pub fn pg_server() -> String {
    match std::env::var("CHATROOM_TEST_PG") {
        Ok(url) if !url.trim().is_empty() => url.trim().to_string(),
        _ => panic!(
            "CHATROOM_TEST_PG is not set: these tests need a PostgreSQL server, e.g. \
             CHATROOM_TEST_PG=postgres://postgres@127.0.0.1:5432/postgres \
             (scripts/test.sh starts one and sets it)"
        ),
    }
}

/// `url` with its database name replaced by `db`.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let (scheme, rest) = base.split_once("://").expect("postgres URL has a scheme");
    let host = rest.split('/').next().unwrap_or(rest);
    format!("{scheme}://{host}/{db}{query}")
}

/// A database made for one test on the `CHATROOM_TEST_PG` server, dropped
/// by [`PgDatabase::drop_now`].
pub struct PgDatabase {
    pub url: String,
    server: String,
    name: String,
}

impl PgDatabase {
    pub async fn create() -> PgDatabase {
        use sqlx::Connection;
        let server = pg_server();
        let name = format!(
            "chatroom_test_{}_{:012x}",
            std::process::id(),
            rand::random::<u64>() >> 16
        );
        let mut c = sqlx::PgConnection::connect(&server)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to CHATROOM_TEST_PG={server}: {e}"));
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut c)
            .await
            .expect("create test database");
        let _ = c.close().await;
        PgDatabase {
            url: with_database(&server, &name),
            server,
            name,
        }
    }

    pub async fn drop_now(self) {
        use sqlx::Connection;
        if let Ok(mut c) = sqlx::PgConnection::connect(&self.server).await {
            let _ = sqlx::query(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .execute(&mut c)
            .await;
            let _ = c.close().await;
        }
    }
}

/// A store on `db` (and what keeps it alive), for tests of the store itself.
pub struct TestStore {
    pub store: chatroom_logic::store::Store,
    /// The database URL, for raw SQL in tests.
    pub url: String,
    pub dir: TempDir,
    pub pg: Option<PgDatabase>,
}

impl TestStore {
    pub async fn open(db: Db) -> TestStore {
        let dir = TempDir::new("store");
        let pg = match db {
            Db::Sqlite => None,
            Db::Postgres => Some(PgDatabase::create().await),
        };
        let url = match &pg {
            Some(p) => p.url.clone(),
            None => format!("sqlite://{}/nested/im.db?mode=rwc", dir.path().display()),
        };
        let url_copy = url.clone();
        let store = chatroom_logic::store::Store::connect(&chatroom_logic::config::StoreConfig {
            url,
            max_connections: 4,
            acquire_timeout: std::time::Duration::from_secs(5),
        })
        .await
        .expect("open the test store");
        TestStore {
            store,
            url: url_copy,
            dir,
            pg,
        }
    }

    pub async fn close(self) {
        self.store.close().await;
        if let Some(pg) = self.pg {
            pg.drop_now().await;
        }
    }
}

pub struct Node {
    pub cfg: LogicConfig,
    pub dir: TempDir,
    pg: Option<PgDatabase>,
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
        ("CHATROOM__SHUTDOWN_GRACE".into(), "2s".into()),
        // Cheap password hashes: argon2 is slow in debug builds.
        ("CHATROOM__IM__PASSWORD_MEMORY_KIB".into(), "256".into()),
        ("CHATROOM__IM__PASSWORD_ITERATIONS".into(), "1".into()),
    ];
    all.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    LogicConfig::load_with_env(None, all).expect("test config must be valid")
}

impl Node {
    /// Starts logic with a memory queue of `capacity` and a SQLite store.
    pub async fn start(env: &[(&str, &str)], capacity: usize) -> Node {
        Node::start_db(Db::Sqlite, env, capacity).await
    }

    /// Starts logic on a fresh store of kind `db` (uploads in a temp folder).
    pub async fn start_db(db: Db, env: &[(&str, &str)], capacity: usize) -> Node {
        let dir = TempDir::new("node");
        let pg = match db {
            Db::Sqlite => None,
            Db::Postgres => Some(PgDatabase::create().await),
        };
        let url = match &pg {
            Some(p) => p.url.clone(),
            None => format!("sqlite://{}/data/im.db?mode=rwc", dir.path().display()),
        };
        let uploads = dir.path().join("uploads").display().to_string();
        let mut all: Vec<(&str, &str)> = vec![
            ("CHATROOM__STORE__URL", url.as_str()),
            ("CHATROOM__IM__UPLOAD_DIR", uploads.as_str()),
        ];
        all.extend_from_slice(env);
        let cfg = config(&all);
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
            dir,
            pg,
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

    /// The next room message logic published.
    pub async fn next_published(&mut self) -> RoomMsg {
        match self.next_queue_msg().await.body {
            Some(queue_msg::Body::Room(r)) => r,
            other => panic!("expected a room message, got {other:?}"),
        }
    }

    /// The next message logic published, whatever its kind.
    pub async fn next_queue_msg(&mut self) -> QueueMsg {
        let d = tokio::time::timeout(DEADLINE, self.sub.next())
            .await
            .expect("nothing was published in time")
            .expect("queue closed");
        let msg = QueueMsg::decode(d.body.clone()).expect("published bytes are a QueueMsg");
        d.finish();
        msg
    }

    /// Messages published and not yet taken.
    pub fn queued(&self) -> usize {
        self.queue.depth()
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
        if let Some(pg) = self.pg {
            pg.drop_now().await;
        }
    }

    /// `GET path`: status, headers and raw body.
    pub async fn get_raw(&self, path: &str) -> (StatusCode, hyper::HeaderMap, Bytes) {
        let req = hyper::Request::builder()
            .method("GET")
            .uri(format!("http://{}{path}", self.http_addr))
            .body(Full::new(Bytes::new()))
            .expect("request");
        let resp = tokio::time::timeout(DEADLINE, self.http.request(req))
            .await
            .expect("HTTP request timed out")
            .expect("HTTP request");
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .expect("HTTP body")
            .to_bytes();
        (status, headers, body)
    }

    /// A urlencoded `POST` (what the seed's pages send), with an optional
    /// `Authorization` header.
    pub async fn form(
        &self,
        path: &str,
        auth: Option<&str>,
        fields: &[(&str, &str)],
    ) -> (StatusCode, serde_json::Value) {
        let body: String = fields
            .iter()
            .map(|(k, v)| format!("{}={}", urlencode(k), urlencode(v)))
            .collect::<Vec<_>>()
            .join("&");
        let mut h = vec![("content-type", "application/x-www-form-urlencoded")];
        if let Some(a) = auth {
            h.push(("authorization", a));
        }
        self.post(path, &h, body).await
    }

    /// Registers and logs in `mobile`; answers its id and token.
    pub async fn user(&self, mobile: &str) -> (i64, String) {
        let (status, r) = self
            .form(
                "/user/register",
                None,
                &[
                    ("mobile", mobile),
                    ("passwd", "secret-pw"),
                    ("nickname", mobile),
                ],
            )
            .await;
        assert_eq!(
            (status.as_u16(), r["code"].as_i64()),
            (200, Some(0)),
            "register: {r}"
        );
        let (_, r) = self
            .form(
                "/user/login",
                None,
                &[("mobile", mobile), ("passwd", "secret-pw")],
            )
            .await;
        assert_eq!(r["code"], 0, "login: {r}");
        (
            r["data"]["id"].as_i64().expect("id"),
            r["data"]["token"].as_str().expect("token").to_string(),
        )
    }
}

/// Percent-encodes a form value.
pub fn urlencode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A `multipart/form-data` body: its content type and bytes. Each part is
/// (name, file name, bytes).
pub fn multipart(parts: &[(&str, Option<&str>, &[u8])]) -> (String, Vec<u8>) {
    let boundary = format!("----chatroom{:016x}", rand::random::<u64>());
    let mut body = Vec::new();
    for (name, filename, data) in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match filename {
            Some(f) => body.extend_from_slice(
                format!(
                    "Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\n\
                     Content-Type: application/octet-stream\r\n\r\n"
                )
                .as_bytes(),
            ),
            None => body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
            ),
        }
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// Runs an async test body once against SQLite and once against PostgreSQL:
/// `both!(name)` makes `name::sqlite` and `name::postgres` from `async fn
/// name(db: Db)`.
#[macro_export]
macro_rules! both {
    ($name:ident) => {
        mod $name {
            #[tokio::test]
            async fn sqlite() {
                super::$name(super::Db::Sqlite).await
            }
            #[tokio::test]
            async fn postgres() {
                super::$name(super::Db::Postgres).await
            }
        }
    };
}

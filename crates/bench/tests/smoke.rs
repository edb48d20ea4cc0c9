//! Smoke test: the standalone chatroom server in this process on ephemeral
//! loopback ports, and the load generator's library entry point against it
//! in single-process mode: a few hundred sessions for a few seconds, every
//! message delivered exactly once, latency recorded.

use chatroom_common::config::Load;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use chatroom_bench::{PublishVia, Report, RoomDist, RunConfig, TokenSource};
use tokio_util::sync::CancellationToken;

struct Server {
    ws: SocketAddr,
    http: SocketAddr,
    secret: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    dir: std::path::PathBuf,
}

/// A folder of its own for each server's files (SQLite store, uploads).
fn scratch_dir() -> std::path::PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("chatroom-bench-smoke-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

async fn start_server() -> Server {
    let dir = scratch_dir();
    let store = format!("sqlite://{}/chatroom.db?mode=rwc", dir.display());
    let uploads = dir.join("uploads").display().to_string();
    let cfg = chatroom::StandaloneConfig::from_overrides([
        ("CHATROOM__CONN__WS__ADDR", "127.0.0.1:0"),
        ("CHATROOM__LOGIC__HTTP__ADDR", "127.0.0.1:0"),
        ("CHATROOM__LOG__DIR", ""),
        ("CHATROOM__LOGIC__STORE__URL", store.as_str()),
        ("CHATROOM__LOGIC__IM__UPLOAD_DIR", uploads.as_str()),
    ])
    .expect("standalone config");
    let secret = cfg.logic.token.secret.clone();
    let listeners = chatroom::Listeners::bind(&cfg).await.expect("bind");
    let ws = listeners.ws.local_addr().expect("ws addr");
    let http = listeners.http.local_addr().expect("http addr");
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let task = tokio::spawn(async move {
        if let Err(e) = chatroom::run(cfg, listeners, stop).await {
            eprintln!("server: {e}");
        }
    });
    Server {
        ws,
        http,
        secret,
        shutdown,
        task,
        dir,
    }
}

impl Server {
    fn config(&self) -> RunConfig {
        RunConfig {
            ws_urls: vec![format!("ws://{}/room", self.ws)],
            http_url: format!("http://{}", self.http),
            processes: 1,
            warmup: Duration::from_millis(500),
            duration: Duration::from_secs(2),
            settle: Duration::from_millis(300),
            drain: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(20),
            // The server runs in this process: its memory is ours.
            server_pids: vec![std::process::id()],
            progress: true,
            ..RunConfig::default()
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn check(r: &Report, sessions: u64) {
    eprintln!("{}", r.table());
    assert_eq!(r.signed_in, sessions, "every session signs in");
    assert_eq!(r.connect_failed + r.sign_in_failed + r.disconnected, 0);
    assert!(r.sent > 0, "published something");
    assert_eq!(r.publish_errors, 0);
    assert!(r.deliveries > 0, "delivered something");
    assert!(r.window_deliveries > 0 && r.deliveries_per_sec > 0.0);
    assert!(r.loss.expected > 0);
    assert_eq!(r.loss.lost, 0, "no loss");
    assert_eq!(r.loss.unexpected, 0);
    assert_eq!(r.loss.received, r.loss.expected);
    assert_eq!(r.duplicates, 0, "no duplicates");
    assert_eq!(r.stale + r.foreign + r.server_errors, 0);
    assert!(r.latency.count > 0, "latency recorded");
    assert!(r.latency.p50_us > 0 && r.latency.p50_us <= r.latency.max_us);
    assert!(r.server_rss_idle_kib.is_some() && r.server_bytes_per_session.is_some());
    // A note that other processes were busy is fine here (tests run side by side).
    assert!(
        r.notes.iter().all(|n| n.starts_with("other processes")),
        "{:?}",
        r.notes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_publishers_uniform_rooms() {
    let t = Instant::now();
    let server = start_server().await;
    let cfg = RunConfig {
        sessions: 300,
        rooms: 3,
        room_dist: RoomDist::Uniform,
        publishers: 3,
        rate: 150.0,
        publish: PublishVia::Ws,
        tokens: TokenSource::Secret {
            secret: server.secret.clone(),
        },
        ..server.config()
    };
    let r = chatroom_bench::run(cfg).await.expect("run");
    check(&r, 300);
    // 3 rooms of 100, each with one publisher at 50/s.
    assert_eq!(r.largest_room, 100);
    assert_eq!(r.loss.expected, r.sent * 100);
    server.stop().await;
    assert!(
        t.elapsed() < Duration::from_secs(25),
        "took {:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_publishers_one_room_with_http_tokens() {
    let server = start_server().await;
    let cfg = RunConfig {
        sessions: 150,
        rooms: 1,
        room_dist: RoomDist::Single,
        publishers: 2,
        rate: 40.0,
        publish: PublishVia::Http,
        tokens: TokenSource::Http,
        ..server.config()
    };
    let r = chatroom_bench::run(cfg).await.expect("run");
    check(&r, 150);
    assert_eq!(r.loss.expected, r.sent * 150);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_processes_over_pipes() {
    // The binary re-executed as `worker`, two of them, from two source addresses.
    let server = start_server().await;
    let cfg = RunConfig {
        sessions: 200,
        rooms: 2,
        publishers: 2,
        rate: 100.0,
        processes: 2,
        source_ips: vec!["127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap()],
        worker_exe: Some(env!("CARGO_BIN_EXE_chatroom-bench").into()),
        tokens: TokenSource::Secret {
            secret: server.secret.clone(),
        },
        ..server.config()
    };
    let r = chatroom_bench::run(cfg).await.expect("run");
    check(&r, 200);
    assert_eq!(r.processes, 2);
    server.stop().await;
}

#[tokio::test]
async fn unreachable_server_fails_fast_and_cleanly() {
    // Nothing listens on port 9 of 127.0.0.1: every session fails to connect.
    let cfg = RunConfig {
        ws_urls: vec!["ws://127.0.0.1:9/room".into()],
        http_url: "http://127.0.0.1:9".into(),
        sessions: 20,
        publishers: 0,
        duration: Duration::ZERO,
        settle: Duration::ZERO,
        tokens: TokenSource::Secret {
            secret: "chatroom-dev-secret-change-me".into(),
        },
        ..RunConfig::default()
    };
    let r = tokio::time::timeout(Duration::from_secs(20), chatroom_bench::run(cfg))
        .await
        .expect("bounded")
        .expect("a report, not an error");
    assert_eq!((r.signed_in, r.connect_failed), (0, 20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_spread_over_several_urls() {
    // Every other session (and with two workers: all of worker 1's) goes to
    // the second URL, where nothing listens: half sign in, half fail.
    let server = start_server().await;
    let mut cfg = RunConfig {
        sessions: 40,
        publishers: 0,
        duration: Duration::ZERO,
        processes: 2,
        worker_exe: Some(env!("CARGO_BIN_EXE_chatroom-bench").into()),
        tokens: TokenSource::Secret {
            secret: server.secret.clone(),
        },
        ..server.config()
    };
    cfg.ws_urls.push("ws://127.0.0.1:9/room".into());
    let r = chatroom_bench::run(cfg).await.expect("run");
    eprintln!("{}", r.table());
    assert_eq!((r.signed_in, r.connect_failed), (20, 20));
    assert_eq!(r.ws_urls.len(), 2);
    assert_eq!(r.server_pids, vec![std::process::id()]);
    assert_eq!(r.server_processes.len(), 1);
    server.stop().await;
}

/// nats-server over WebSocket, when it is installed (`apt-get install nats-server`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_target_when_installed() {
    let Some(bin) = [
        "/usr/sbin/nats-server",
        "/usr/bin/nats-server",
        "/usr/local/bin/nats-server",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists()) else {
        eprintln!(
            "NOTICE: nats-server is not installed (scripts/test.sh installs it); the NATS comparison smoke test did not run"
        );
        return;
    };
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (port, ws_port) = (free(), free());
    let dir = std::env::temp_dir().join(format!("chatroom-bench-nats-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("nats.conf");
    std::fs::write(
        &conf,
        format!("listen: \"127.0.0.1:{port}\"\nwebsocket {{\n  listen: \"127.0.0.1:{ws_port}\"\n  no_tls: true\n}}\n"),
    )
    .unwrap();
    let mut nats = tokio::process::Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start nats-server");
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", ws_port))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "nats-server did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cfg = RunConfig {
        target: chatroom_bench::Target::Nats,
        ws_urls: vec![format!("ws://127.0.0.1:{ws_port}")],
        sessions: 200,
        rooms: 2,
        publishers: 2,
        rate: 100.0,
        processes: 1,
        warmup: Duration::from_millis(500),
        duration: Duration::from_secs(2),
        settle: Duration::from_millis(300),
        server_pids: nats.id().into_iter().collect(),
        ..RunConfig::default()
    };
    let r = chatroom_bench::run(cfg).await.expect("run");
    check(&r, 200);
    let _ = nats.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
}

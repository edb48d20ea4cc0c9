//! The cluster as separate OS processes: real etcd and Redis (from
//! scripts/test.sh), the test NSQ broker — or a real nsqd when `NSQD_BIN`
//! is set — two logic, two conn and two job nodes.

use std::net::SocketAddr;
use std::time::Duration;

use chatroom_common::config::DiscoveryConfig;
use chatroom_common::discovery::{Discovery, NodesRx, Service};
use chatroom_common::proto::protocol::MsgLevel;
use chatroom_tests::client::Client;
use chatroom_tests::cluster::{Proc, env, free_addr, required_env, unique, wait_listening};
use chatroom_tests::http;
use chatroom_tests::nsq_broker::TestNsqd;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const LEASE_TTL: u64 = 3;
const T: Duration = Duration::from_secs(15);

/// Where the services find the queue.
enum Queue {
    Broker(TestNsqd),
    Real { tcp: SocketAddr, _proc: Proc },
}

struct Cluster {
    _work: tempdir::Dir,
    prefix: String,
    http: String,
    ws_a: String,
    ws_b: String,
    conn_a: Proc,
    conn_b: Proc,
    others: Vec<Proc>,
    _queue: Queue,
}

mod tempdir {
    /// A temporary folder removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new(tag: &str) -> Dir {
            let p = std::env::temp_dir().join(super::unique(tag));
            std::fs::create_dir_all(&p).expect("creating temp dir");
            Dir(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            if !std::thread::panicking() {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }
}

async fn start(queue: Queue) -> Cluster {
    let etcd = required_env("CHATROOM_TEST_ETCD");
    let redis = required_env("CHATROOM_TEST_REDIS");
    let work = tempdir::Dir::new("cluster");
    let id = unique("c");
    let prefix = format!("/test-{id}");
    let topic = format!("room-{}", id.replace(['/', ':'], "-"));
    let topic = &topic[..topic.len().min(60)];
    let ttl = LEASE_TTL.to_string();
    let common = env(&[
        ("CHATROOM__DISCOVERY__KIND", "etcd"),
        ("CHATROOM__DISCOVERY__ENDPOINTS", &etcd),
        ("CHATROOM__DISCOVERY__PREFIX", &prefix),
        ("CHATROOM__DISCOVERY__LEASE_TTL_SECS", &ttl),
        ("CHATROOM__SHUTDOWN_GRACE_MS", "3000"),
        ("RUST_LOG", "info"),
    ]);
    let nsqd_tcp = match &queue {
        Queue::Broker(b) => b.tcp_addr().to_string(),
        Queue::Real { tcp, .. } => tcp.to_string(),
    };
    let consumer_env = match &queue {
        Queue::Broker(b) => env(&[(
            "CHATROOM__QUEUE__LOOKUPD_HTTP_ADDRESSES",
            &format!("http://{}", b.http_addr()),
        )]),
        Queue::Real { tcp, .. } => {
            env(&[("CHATROOM__QUEUE__NSQD_TCP_ADDRESSES", &tcp.to_string())])
        }
    };

    let mut others = vec![];
    let mut http_addrs = vec![];
    for i in 0..2 {
        let grpc = free_addr();
        let http_addr = free_addr();
        let mut e = common.clone();
        e.extend(env(&[
            ("CHATROOM__NODE__ID", &format!("logic-{i}")),
            ("CHATROOM__ID_NODE", &i.to_string()),
            ("CHATROOM__GRPC__ADDR", &grpc.to_string()),
            ("CHATROOM__HTTP__ADDR", &http_addr.to_string()),
            ("CHATROOM__QUEUE__KIND", "nsq"),
            ("CHATROOM__QUEUE__TOPIC", topic),
            ("CHATROOM__QUEUE__NSQD_TCP_ADDRESSES", &nsqd_tcp),
            ("CHATROOM__PRESENCE__KIND", "redis"),
            ("CHATROOM__PRESENCE__URL", &redis),
            ("CHATROOM__PRESENCE__PREFIX", &format!("{id}:")),
            ("CHATROOM__PRESENCE__ONLINE_TTL_SECS", "3"),
            ("CHATROOM__TOKEN__SECRET", "cluster-test-secret-0123456789"),
        ]));
        let mut p = Proc::spawn(&format!("logic-{i}"), "chatroom-logic", &work.0, &e).unwrap();
        wait_listening(&mut p, http_addr, T).await.unwrap();
        wait_listening(&mut p, grpc, T).await.unwrap();
        http_addrs.push(http_addr);
        others.push(p);
    }
    let mut conns = vec![];
    let mut ws = vec![];
    for name in ["conn-a", "conn-b"] {
        let ws_addr = free_addr();
        let mut e = common.clone();
        e.extend(env(&[
            ("CHATROOM__NODE__ID", name),
            ("CHATROOM__WS__ADDR", &ws_addr.to_string()),
            ("CHATROOM__GRPC__ADDR", &free_addr().to_string()),
            ("CHATROOM__REPORT_ONLINE_MS", "300"),
        ]));
        let mut p = Proc::spawn(name, "chatroom-conn", &work.0, &e).unwrap();
        wait_listening(&mut p, ws_addr, T).await.unwrap();
        ws.push(chatroom_conn::ws_url(ws_addr));
        conns.push(p);
    }
    for i in 0..2 {
        let mut e = common.clone();
        e.extend(consumer_env.clone());
        e.extend(env(&[
            ("CHATROOM__NODE__ID", &format!("job-{i}")),
            ("CHATROOM__QUEUE__KIND", "nsq"),
            ("CHATROOM__QUEUE__TOPIC", topic),
            ("CHATROOM__QUEUE__CHANNEL", "job"),
        ]));
        others.push(Proc::spawn(&format!("job-{i}"), "chatroom-job", &work.0, &e).unwrap());
    }
    let conn_b = conns.pop().unwrap();
    let conn_a = conns.pop().unwrap();
    Cluster {
        _work: work,
        prefix,
        http: format!("http://{}", http_addrs[0]),
        ws_a: ws[0].clone(),
        ws_b: ws[1].clone(),
        conn_a,
        conn_b,
        others,
        _queue: queue,
    }
}

impl Cluster {
    async fn watch_conns(&self, tracker: &TaskTracker, stop: CancellationToken) -> NodesRx {
        let cfg = DiscoveryConfig::Etcd {
            endpoints: vec![required_env("CHATROOM_TEST_ETCD")],
            prefix: self.prefix.clone(),
            lease_ttl_secs: LEASE_TTL,
        };
        let d = Discovery::connect(&cfg).await.unwrap();
        d.watch(Service::Conn, tracker, stop).await.unwrap()
    }

    fn dump(&self) -> String {
        let mut s = String::new();
        for p in [&self.conn_a, &self.conn_b]
            .into_iter()
            .chain(self.others.iter())
        {
            s.push_str(&format!(
                "\n===== {} =====\n{}",
                p.name,
                tail(&p.output(), 40)
            ));
        }
        s
    }
}

fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

async fn wait_nodes(
    rx: &mut NodesRx,
    what: &str,
    f: impl Fn(&[String]) -> bool,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let ids: Vec<String> = rx
            .borrow_and_update()
            .iter()
            .map(|n| n.id.clone())
            .collect();
        if f(&ids) {
            return Ok(());
        }
        if tokio::time::timeout_at(deadline, rx.changed())
            .await
            .is_err()
        {
            anyhow::bail!("timed out waiting for {what}; conn nodes in etcd: {ids:?}");
        }
    }
}

async fn scenario(c: &mut Cluster) -> anyhow::Result<()> {
    let tracker = TaskTracker::new();
    let stop = CancellationToken::new();
    let mut conns = c.watch_conns(&tracker, stop.clone()).await;
    wait_nodes(&mut conns, "both conn nodes registered", |ids| {
        ids.len() == 2
    })
    .await?;

    let tok_a = http::token(&c.http, "alice").await?;
    let tok_b = http::token(&c.http, "bob").await?;
    let mut a = Client::signed_in(&c.ws_a, &tok_a, "lobby").await?;
    let mut b = Client::signed_in(&c.ws_b, &tok_b, "lobby").await?;

    // Jobs need a moment to find the topic and subscribe: repeat a probe
    // message until it gets through, then check ordinary traffic.
    let deadline = tokio::time::Instant::now() + T;
    loop {
        a.send_message("lobby", MsgLevel::Normal, b"probe").await?;
        if b.recv_messages(1, Duration::from_millis(500)).await.is_ok() {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no message crossed conn nodes"
        );
    }
    // Drain probes still in flight, then a client on A reaches a client on B.
    a.send_message("lobby", MsgLevel::Normal, b"hello from a")
        .await?;
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let got = b.recv_messages(1, T).await?;
        if &got[0].1[..] == b"hello from a" {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "hello never arrived"
        );
    }

    // POST /msg reaches both nodes, as IMPORTANT.
    let r = http::post_json(
        &format!("{}/msg", c.http),
        Some(&tok_a),
        serde_json::json!({"room_id": "lobby", "msg": "from http"}),
    )
    .await?;
    anyhow::ensure!(r.json["code"] == 1, "POST /msg: {}", r.json);
    for (name, cl) in [("a", &mut a), ("b", &mut b)] {
        let deadline = tokio::time::Instant::now() + T;
        loop {
            let got = cl.recv_messages(1, T).await?;
            if &got[0].1[..] == b"from http" {
                anyhow::ensure!(
                    got[0].0 == MsgLevel::Important,
                    "{name}: /msg not IMPORTANT"
                );
                break;
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{name}: /msg never arrived"
            );
        }
    }

    // MEMBERS counts both nodes, from either side.
    for cl in [&mut a, &mut b] {
        let deadline = tokio::time::Instant::now() + T;
        loop {
            let n = cl.members().await?;
            if n == 2 {
                break;
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "MEMBERS stuck at {n}, want 2"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // SIGKILL conn A: its lease ends within the TTL, job stops pushing to
    // it, and clients on B keep receiving every IMPORTANT message.
    c.conn_a.kill().await;
    let killed = tokio::time::Instant::now();
    let mut sent = vec![];
    for i in 0..20 {
        let msg = format!("important-{i}");
        let r = http::post_json(
            &format!("{}/msg", c.http),
            Some(&tok_b),
            serde_json::json!({"room_id": "lobby", "msg": msg}),
        )
        .await?;
        anyhow::ensure!(r.json["code"] == 1, "POST /msg after kill: {}", r.json);
        sent.push(msg);
        if i == 9 {
            wait_nodes(&mut conns, "conn-a gone from etcd", |ids| ids == ["conn-b"]).await?;
            let gone = killed.elapsed();
            anyhow::ensure!(
                gone <= Duration::from_secs(LEASE_TTL + 2),
                "conn-a stayed registered for {gone:?} (lease {LEASE_TTL}s)"
            );
        }
    }
    let mut got: Vec<String> = vec![];
    let deadline = tokio::time::Instant::now() + T;
    while !sent.iter().all(|m| got.contains(m)) {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "b is missing IMPORTANT messages: sent {sent:?}, got {got:?}"
        );
        for (_, m) in b.recv_messages(1, T).await? {
            got.push(String::from_utf8_lossy(&m).into_owned());
        }
    }
    // B's session still works.
    anyhow::ensure!(&b.heartbeat().await?[..] == b"pong");

    // SIGTERM conn B: it deregisters at once, says Going Away, exits cleanly.
    let status = c.conn_b.terminate(Duration::from_secs(10)).await?;
    anyhow::ensure!(status.success(), "conn-b exit status {status}");
    wait_nodes(&mut conns, "conn-b deregistered", |ids| ids.is_empty()).await?;
    let f = b.expect_close().await?;
    anyhow::ensure!(
        f.as_ref().map(|f| u16::from(f.code)) == Some(1001),
        "conn-b close frame: {f:?}"
    );
    stop.cancel();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_with_test_broker() {
    let broker = TestNsqd::start().await;
    let mut c = start(Queue::Broker(broker)).await;
    if let Err(e) = scenario(&mut c).await {
        panic!("{e:#}\n{}", c.dump());
    }
}

/// The same scenario over a real nsqd, when `NSQD_BIN` names one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_with_real_nsqd() {
    let Some(bin) = std::env::var_os("NSQD_BIN") else {
        eprintln!(
            "NOTICE: NSQD_BIN is not set; the real-nsqd cluster test did not run (set NSQD_BIN=/path/to/nsqd)"
        );
        return;
    };
    let work = tempdir::Dir::new("nsqd");
    let tcp = free_addr();
    let http_addr = free_addr();
    let mut p = tokio::process::Command::new(&bin);
    p.args([
        format!("--tcp-address={tcp}"),
        format!("--http-address={http_addr}"),
        format!("--data-path={}", work.0.display()),
        "--broadcast-address=127.0.0.1".into(),
    ])
    .kill_on_drop(true)
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    let child = p.spawn().expect("starting nsqd");
    let mut proc_ = Proc::adopt("nsqd", child, work.0.clone());
    wait_listening(&mut proc_, tcp, T).await.unwrap();
    let mut c = start(Queue::Real { tcp, _proc: proc_ }).await;
    let r = scenario(&mut c).await;
    drop(work);
    if let Err(e) = r {
        panic!("{e:#}\n{}", c.dump());
    }
}

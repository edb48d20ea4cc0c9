//! The chaos suite: a cluster of two logic, two conn and two job nodes
//! under a steady mixed load (room IMPORTANT and NORMAL, IM 1:1 and
//! community), one fault per scenario, then recovery, drain and a count per
//! class of what was accepted, delivered, lost and duplicated. Each test
//! asserts the promise of its row in RELIABILITY.md and prints its figures
//! (appended as Markdown rows to `CHATROOM_CHAOS_REPORT` when that is set).
//!
//! Scenarios run one at a time (one shared lock): each is a whole cluster
//! on a 2-core machine. Real nsqd + nsqlookupd when `NSQD_BIN` is set (CI),
//! the test broker otherwise — both with a 3 s message timeout, so a dead
//! job's in-flight messages come back quickly.

use std::time::Duration;

use chatroom_discovery::DiscoveryConfig;
use chatroom_discovery::{Discovery, Service};
use chatroom_tests::chaos::{Class, Load, LoadPlan, Reconnect, Report, Target};
use chatroom_tests::client::{Client, eventually};
use chatroom_tests::cluster::{
    Cluster, ClusterOpts, LEASE_TTL, Queue, T, start_cluster_with, start_nsqd_with,
};
use chatroom_tests::http;
use chatroom_tests::nsq_broker::{TestNsqd, TestNsqdConfig};
use chatroom_tests::services::{OwnEtcd, OwnPg, OwnRedis, signal};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// One scenario at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// nsqd's message timeout in these scenarios.
const MSG_TIMEOUT: Duration = Duration::from_secs(3);
/// Load before and after the fault.
const STEADY: Duration = Duration::from_secs(2);
/// How long the drain may take (live, then again after the IM re-sign-in).
const DRAIN: Duration = Duration::from_secs(15);
/// conn's presence report period in the test cluster (`report_online`).
const REPORT_PERIOD: Duration = Duration::from_millis(300);
/// conn's `ws.heartbeat` in the Redis scenario.
const HEARTBEAT: Duration = Duration::from_secs(2);

/// The queue: a real nsqd when `NSQD_BIN` is set, the test broker otherwise.
async fn queue() -> Queue {
    let flag = format!("--msg-timeout={}ms", MSG_TIMEOUT.as_millis());
    if let Some(q) = start_nsqd_with(&[&flag]).await {
        return q;
    }
    Queue::Broker(
        TestNsqd::start_with(TestNsqdConfig {
            msg_timeout: MSG_TIMEOUT,
            ..Default::default()
        })
        .await,
    )
}

fn broker_kind(q: &Queue) -> &'static str {
    match q {
        Queue::Broker(_) => "test broker",
        Queue::Real { .. } => "real nsqd",
    }
}

fn target(c: &Cluster) -> Target {
    Target {
        http: c.https.clone(),
        ws: vec![c.ws_a.clone(), c.ws_b.clone()],
    }
}

/// Prints the figures and appends them to `CHATROOM_CHAOS_REPORT`.
fn publish(r: &Report) {
    let md = r.markdown();
    eprintln!("CHAOS {}:\n{md}", r.scenario);
    if let Some(path) = std::env::var_os("CHATROOM_CHAOS_REPORT") {
        use std::io::Write as _;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = f.write_all(md.as_bytes());
        }
    }
}

/// The promises every scenario keeps: no accepted IMPORTANT, IM or
/// community message lost, and every acknowledged IM message in history.
fn promised(r: &Report) -> anyhow::Result<()> {
    for c in [Class::Important, Class::Im, Class::Community] {
        let f = r.class(c);
        anyhow::ensure!(f.accepted > 0, "{}: nothing accepted: {r:?}", c.name());
        anyhow::ensure!(f.lost == 0, "{}: {} lost: {r:?}", c.name(), f.lost);
    }
    let missing = r
        .notes
        .iter()
        .find(|(k, _)| k == "IM messages missing from history")
        .map(|(_, v)| v.as_str());
    anyhow::ensure!(missing == Some("0"), "IM history incomplete: {r:?}");
    Ok(())
}

/// Fails the test with every node's log when `r` is an error.
fn or_dump<T>(c: &Cluster, r: anyhow::Result<T>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{e:#}\n{}", c.dump()),
    }
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// A cluster on `opts` with the load of `plan` running steadily (warm,
/// then `STEADY` more); which broker it uses.
async fn rig(opts: ClusterOpts, plan: &LoadPlan) -> (Cluster, Load, &'static str) {
    let q = queue().await;
    let kind = broker_kind(&q);
    let c = start_cluster_with(q, opts).await;
    let load = or_dump(&c, Load::start(&target(&c), plan).await);
    tokio::time::sleep(STEADY).await;
    (c, load, kind)
}

/// Waits until the load carries every class end to end again; how long
/// that took from `since`.
async fn recovered(load: &Load, since: Instant) -> anyhow::Result<Duration> {
    load.warm().await?;
    Ok(since.elapsed())
}

// conn skips a stream gap after `stream.reorder_wait`; NSQ redelivers
// the dead job's messages of that gap seconds later, and conn delivers them
// late (out of order, once) instead of dropping them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_sigkill_job() {
    let _one = SERIAL.lock().await;
    let (mut c, load, kind) = rig(ClusterOpts::default(), &LoadPlan::default()).await;
    // Freeze job-0 first so that nsqd has handed it messages it will never
    // FIN (they sit in its socket), then kill it: only the message timeout
    // can bring those back.
    let pid = c.node_mut("job-0").pid().expect("job-0 running");
    signal(pid, "-STOP").unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fault = Instant::now();
    c.node_mut("job-0").kill().await;
    let took = or_dump(&c, recovered(&load, fault).await);
    tokio::time::sleep(STEADY).await;
    let mut r = or_dump(&c, load.finish("SIGKILL job-0", DRAIN).await);
    let redelivered = timed_out(&c).await;
    r.notes.push(("broker".into(), kind.into()));
    r.notes.push(("recovered".into(), secs(took)));
    r.notes.push((
        "redelivered after the timeout".into(),
        redelivered.to_string(),
    ));
    publish(&r);
    or_dump(&c, promised(&r));
    assert!(
        redelivered > 0,
        "job-0 held no message when killed: the scenario proved nothing: {r:?}"
    );
}

/// Messages the broker redelivered because their timeout passed.
async fn timed_out(c: &Cluster) -> u64 {
    match &c.queue {
        Queue::Broker(b) => b.timed_out(),
        Queue::Real { http, .. } => {
            let (_, body) = http::get_text(&format!("http://{http}/stats?format=json"))
                .await
                .expect("nsqd /stats");
            let v: serde_json::Value = serde_json::from_str(&body).expect("nsqd /stats JSON");
            v["topics"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|t| t["channels"].as_array().cloned().unwrap_or_default())
                .map(|ch| ch["timeout_count"].as_u64().unwrap_or(0))
                .sum()
        }
    }
}

/// Refused sign-ins before the first accepted one, on `url`.
async fn sign_in_retries(url: &str, tok: &str) -> anyhow::Result<u32> {
    let mut refused = 0;
    let deadline = Instant::now() + T;
    loop {
        match Client::signed_in(url, tok, "probe").await {
            Ok(_) => return Ok(refused),
            Err(e) => {
                refused += 1;
                anyhow::ensure!(Instant::now() < deadline, "no sign-in on {url}: {e:#}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

// conn's logic pool retries a failed call on the other node and passes over
// a node found down, so sign-ins fail over at once rather than when the dead
// node's lease ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_sigkill_logic() {
    let _one = SERIAL.lock().await;
    let (mut c, load, _) = rig(ClusterOpts::default(), &LoadPlan::default()).await;
    let tok = or_dump(&c, http::token(&c.https[1], "probe-user").await);
    let fault = Instant::now();
    c.node_mut("logic-0").kill().await;
    // Right away, on both conn nodes: a fresh sign-in needs at most one
    // retry (conn fails over to logic-1 on its own). Several, so that the
    // dead node's turn in conn's choice comes up.
    let mut retries = vec![];
    for url in [c.ws_a.clone(), c.ws_b.clone()] {
        for _ in 0..4 {
            retries.push(or_dump(&c, sign_in_retries(&url, &tok).await));
        }
    }
    let took = or_dump(&c, recovered(&load, fault).await);
    tokio::time::sleep(STEADY).await;
    let mut r = or_dump(&c, load.finish("SIGKILL logic-0", DRAIN).await);
    r.notes.push(("recovered".into(), secs(took)));
    r.notes.push((
        "sign-in retries after the kill (4 on conn-a, 4 on conn-b)".into(),
        format!("{retries:?}"),
    ));
    publish(&r);
    or_dump(&c, promised(&r));
    assert!(
        retries.iter().all(|n| *n <= 1),
        "sign-ins refused more than once after logic-0 died: {retries:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_sigkill_conn() {
    let _one = SERIAL.lock().await;
    let (mut c, load, _) = rig(ClusterOpts::default(), &LoadPlan::default()).await;
    let tracker = TaskTracker::new();
    let stop = CancellationToken::new();
    let mut conns = c.watch_conns(&tracker, stop.clone()).await;
    let fault = Instant::now();
    c.conn_a.kill().await;
    let gone = or_dump(
        &c,
        eventually(T, "conn-a gone from etcd", || {
            let ids: Vec<String> = conns
                .borrow_and_update()
                .iter()
                .map(|n| n.id.clone())
                .collect();
            async move { (ids == ["conn-b"]).then(|| fault.elapsed()) }
        })
        .await,
    );
    let took = or_dump(&c, recovered(&load, fault).await);
    tokio::time::sleep(STEADY).await;
    let mut r = or_dump(&c, load.finish("SIGKILL conn-a", DRAIN).await);
    stop.cancel();
    r.notes.push(("recovered".into(), secs(took)));
    r.notes.push(("conn-a left etcd after".into(), secs(gone)));
    publish(&r);
    or_dump(&c, promised(&r));
    assert!(
        gone <= Duration::from_secs(LEASE_TTL + 2),
        "conn-a stayed in etcd {gone:?} (lease {LEASE_TTL} s)"
    );
    assert!(
        r.reconnects.len() >= LoadPlan::default().room_sessions / 2,
        "conn-a's clients did not reconnect: {r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_rolling_sigterm() {
    let _one = SERIAL.lock().await;
    let plan = LoadPlan {
        reconnect: Reconnect::SameNode,
        ..Default::default()
    };
    let (mut c, load, _) = rig(ClusterOpts::default(), &plan).await;
    let mut took = vec![];
    for name in c.node_names() {
        let at = Instant::now();
        let st = c.node_mut(&name).terminate(T).await;
        let st = or_dump(&c, st);
        assert!(st.success(), "{name} exit status {st} after SIGTERM");
        let again = c.respawn(&name).await;
        or_dump(&c, again);
        took.push(format!(
            "{name} {}",
            secs(or_dump(&c, recovered(&load, at).await))
        ));
    }
    tokio::time::sleep(STEADY).await;
    let mut r = or_dump(&c, load.finish("rolling SIGTERM", DRAIN).await);
    r.notes
        .push(("restart to recovered".into(), took.join(", ")));
    publish(&r);
    or_dump(&c, promised(&r));
    assert!(
        r.max_reconnects() <= 1,
        "a client reconnected more than once: {:?}",
        r.reconnects
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_restart_nsqd() {
    let _one = SERIAL.lock().await;
    let (mut c, load, kind) = rig(ClusterOpts::default(), &LoadPlan::default()).await;
    let fault = Instant::now();
    let restarted = c.queue.restart().await;
    or_dump(&c, restarted);
    let took = or_dump(&c, recovered(&load, fault).await);
    tokio::time::sleep(STEADY).await;
    let mut r = or_dump(&c, load.finish("restart nsqd", DRAIN).await);
    r.notes.push(("broker".into(), kind.into()));
    r.notes.push(("recovered".into(), secs(took)));
    publish(&r);
    or_dump(&c, promised(&r));
}

/// `DBSIZE` of the Redis at `url` (`redis://host:port/`), over RESP.
async fn redis_dbsize(url: &str) -> anyhow::Result<u64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = url
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_string();
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"DBSIZE\r\n").await?;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await??;
    let line = std::str::from_utf8(&buf[..n])?;
    Ok(line.trim_start_matches(':').trim().parse()?)
}

// When Redis loses the room's stream keys logic starts a new epoch from
// offset 1; a conn node that sees offset 2 of it first (two jobs) still puts
// offset 1 before it (a stream that followed the old epoch starts the new
// one at 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_restart_redis() {
    let _one = SERIAL.lock().await;
    let mut redis = OwnRedis::start().await;
    // Users' presence comes back with their sessions' next beat, renewed
    // at most once per heartbeat period: a short one here (the sessions
    // beat every second).
    let opts = ClusterOpts {
        redis: Some(redis.url.clone()),
        conn_env: vec![(
            "CHATROOM__WS__HEARTBEAT".into(),
            format!("{}s", HEARTBEAT.as_secs()),
        )],
        ..Default::default()
    };
    let plan = LoadPlan::default();
    let (c, load, _) = rig(opts, &plan).await;
    let tok = or_dump(&c, http::token(&c.http, "members-probe").await);
    let mut probe = or_dump(
        &c,
        Client::signed_in(&c.ws_a, &tok, chatroom_tests::chaos::ROOM).await,
    );
    let want = plan.room_sessions as u64 + 1;
    or_dump(&c, members_reach(&mut probe, want, T).await.map(|_| ()));
    let fault = Instant::now();
    or_dump(&c, redis.restart().await);
    let back = Instant::now();
    let keys = or_dump(
        &c,
        eventually(T, "presence written to the new Redis", || {
            let url = redis.url.clone();
            async move { redis_dbsize(&url).await.ok().filter(|n| *n > 0) }
        })
        .await,
    );
    let rebuilt = back.elapsed();
    let correct = or_dump(&c, members_reach(&mut probe, want, T).await);
    let took = or_dump(&c, recovered(&load, fault).await);
    // IM 1:1 delivered live again means the recipients' presence is back.
    assert!(
        took <= HEARTBEAT * 2 + Duration::from_secs(2),
        "live delivery (users' presence) back only after {took:?} (heartbeat period {HEARTBEAT:?})"
    );
    tokio::time::sleep(STEADY).await;
    let mut r = or_dump(&c, load.finish("restart Redis", DRAIN).await);
    r.notes.push(("recovered".into(), secs(took)));
    r.notes.push((
        "presence keys back after".into(),
        format!("{} ({keys} keys)", secs(rebuilt)),
    ));
    r.notes
        .push(("MEMBERS correct after".into(), secs(correct)));
    publish(&r);
    or_dump(&c, promised(&r));
    // One report period, plus the time a report takes to land and a
    // MEMBERS answer to come back from conn's cache.
    let bound = REPORT_PERIOD * 3 + Duration::from_secs(1);
    assert!(
        rebuilt <= bound && correct <= bound + REPORT_PERIOD,
        "presence rebuilt after {rebuilt:?}, MEMBERS correct after {correct:?} (report period {REPORT_PERIOD:?})"
    );
}

/// Polls MEMBERS until it says `want`; how long that took.
async fn members_reach(p: &mut Client, want: u64, within: Duration) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut last = 0;
    while start.elapsed() < within {
        last = p.members().await?;
        if last == want {
            return Ok(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("MEMBERS stuck at {last}, want {want}")
}

/// The HTTP status and JSON `code` of an IM route on `base`.
async fn im_route(base: &str, token: &str) -> anyhow::Result<(u16, i64)> {
    let a = http::post(
        &format!("{base}/contact/friend"),
        "application/x-www-form-urlencoded",
        None,
        format!("token={token}"),
    )
    .await?;
    Ok((a.status, a.json["code"].as_i64().unwrap_or(-1)))
}

/// Waits until an IM route on every logic node answers `want` (HTTP
/// status, JSON `code`).
async fn im_routes_answer(c: &Cluster, tok: &str, want: (u16, i64)) -> anyhow::Result<()> {
    for base in &c.https {
        eventually(
            T,
            &format!("{base}: IM route answering {want:?}"),
            || async move {
                im_route(base, tok)
                    .await
                    .ok()
                    .filter(|a| *a == want)
                    .map(|_| ())
            },
        )
        .await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_restart_postgres() {
    let _one = SERIAL.lock().await;
    let pg = OwnPg::start().await;
    let opts = ClusterOpts {
        store: Some(pg.database("chaos").await),
        ..Default::default()
    };
    let (c, load, _) = rig(opts, &LoadPlan::default()).await;
    let tok = load.probe_token().to_string();
    let fault = Instant::now();
    or_dump(&c, pg.down().await);
    // Both logic nodes answer 503 (not 500, not a hang) while it is down.
    or_dump(&c, im_routes_answer(&c, &tok, (503, 503)).await);
    let unavailable_after = fault.elapsed();
    // Each node says so within its `store.acquire_timeout` (2 s) and a
    // little: a request does not wait out a longer pool timeout first.
    assert!(
        unavailable_after < Duration::from_secs(8),
        "503 from both nodes only after {unavailable_after:?}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    or_dump(&c, pg.up().await);
    let back = Instant::now();
    or_dump(&c, im_routes_answer(&c, &tok, (200, 0)).await);
    let answering = back.elapsed();
    let took = or_dump(&c, recovered(&load, back).await);
    tokio::time::sleep(STEADY).await;
    let mut r = or_dump(&c, load.finish("restart PostgreSQL", DRAIN).await);
    r.notes
        .push(("503 after stop".into(), secs(unavailable_after)));
    r.notes
        .push(("IM routes answering after start".into(), secs(answering)));
    r.notes.push(("recovered after start".into(), secs(took)));
    publish(&r);
    or_dump(&c, promised(&r));
    assert!(
        r.class(Class::Im).refused > 0,
        "no IM send was refused while PostgreSQL was down: {r:?}"
    );
}

/// Node ids registered under `service` in the etcd at `etcd`.
async fn registered(etcd: &str, prefix: &str, service: Service) -> anyhow::Result<Vec<String>> {
    let cfg = DiscoveryConfig::Etcd {
        endpoints: vec![etcd.to_string()],
        prefix: prefix.to_string(),
        lease_ttl: Duration::from_secs(LEASE_TTL),
    };
    let d = tokio::time::timeout(Duration::from_secs(2), Discovery::connect(&cfg)).await??;
    let tracker = TaskTracker::new();
    let stop = CancellationToken::new();
    let rx = tokio::time::timeout(
        Duration::from_secs(2),
        d.watch(service, &tracker, stop.clone()),
    )
    .await??;
    let mut ids: Vec<String> = rx.borrow().iter().map(|n| n.id.clone()).collect();
    stop.cancel();
    ids.sort();
    Ok(ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_etcd_unreachable() {
    let _one = SERIAL.lock().await;
    let etcd = OwnEtcd::start().await;
    let opts = ClusterOpts {
        etcd: Some(etcd.url.clone()),
        ..Default::default()
    };
    let (c, load, _) = rig(opts, &LoadPlan::default()).await;
    etcd.freeze().unwrap();
    let frozen = Instant::now();
    // Two lease TTLs with etcd unreachable: the nodes keep serving with the
    // pools they knew.
    tokio::time::sleep(Duration::from_secs(2 * LEASE_TTL)).await;
    let thawed = Instant::now();
    or_dump(&c, etcd.thaw().await);
    let rereg = or_dump(
        &c,
        eventually(
            Duration::from_secs(20),
            "every node registered again",
            || {
                let (url, prefix) = (etcd.url.clone(), c.prefix.clone());
                async move {
                    let conn = registered(&url, &prefix, Service::Conn).await.ok()?;
                    let logic = registered(&url, &prefix, Service::Logic).await.ok()?;
                    (conn == ["conn-a", "conn-b"] && logic == ["logic-0", "logic-1"])
                        .then(|| thawed.elapsed())
                }
            },
        )
        .await,
    );
    let took = or_dump(&c, recovered(&load, thawed).await);
    // What was accepted while etcd was frozen has been delivered by now.
    let during = load.window(Class::Important, frozen, thawed);
    let during_im = load.window(Class::Im, frozen, thawed);
    tokio::time::sleep(STEADY).await;
    let mut r = or_dump(&c, load.finish("etcd frozen 2×TTL", DRAIN).await);
    r.notes.push((
        "IMPORTANT accepted / delivered while etcd was frozen".into(),
        format!("{} / {}", during.0, during.1),
    ));
    r.notes.push((
        "IM accepted / delivered while frozen".into(),
        format!("{} / {}", during_im.0, during_im.1),
    ));
    r.notes
        .push(("all registered again after thaw".into(), secs(rereg)));
    r.notes.push(("recovered after thaw".into(), secs(took)));
    publish(&r);
    or_dump(&c, promised(&r));
    assert!(
        during.0 > 0 && during.1 == during.0,
        "IMPORTANT while etcd was unreachable: {during:?} (accepted, delivered)"
    );
    assert!(
        during_im.0 > 0 && during_im.1 == during_im.0,
        "IM while etcd was unreachable: {during_im:?}"
    );
}

//! The cluster as separate OS processes: real etcd and Redis (from
//! scripts/test.sh), the test NSQ broker — or a real nsqd when `NSQD_BIN`
//! is set — two logic, two conn and two job nodes.

use std::time::Duration;

use chatroom_common::metrics::sample;
use chatroom_common::proto::protocol::MsgLevel;
use chatroom_discovery::NodesRx;
use chatroom_tests::client::Client;
use chatroom_tests::cluster::{Cluster, LEASE_TTL, Queue, T, start_cluster, start_nsqd};
use chatroom_tests::http;
use chatroom_tests::nsq_broker::TestNsqd;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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
    // A conn node may start before it has seen the logic nodes in etcd
    // (they register once listening): sign-ins are refused with 503 until
    // it has; retry within the deadline.
    let mut a = Client::signed_in_eventually(&c.ws_a, &tok_a, "lobby", T).await?;
    let mut b = Client::signed_in_eventually(&c.ws_b, &tok_b, "lobby", T).await?;

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

    // One session's pipelined messages reach both nodes in the order sent,
    // with the same offsets on each node (logic numbers them once), even
    // though two job nodes share the queue.
    for i in 0..30 {
        a.send_message("lobby", MsgLevel::Normal, format!("seq-{i}").as_bytes())
            .await?;
    }
    let mut seen = vec![];
    for cl in [&mut a, &mut b] {
        let mut got = vec![];
        let deadline = tokio::time::Instant::now() + T;
        while got.len() < 30 {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "only {} of 30 sequenced messages arrived: {got:?}",
                got.len()
            );
            for m in cl.recv_stream(1, T).await?.msgs {
                if m.data.starts_with(b"seq-") {
                    got.push((
                        String::from_utf8_lossy(&m.data).into_owned(),
                        m.epoch,
                        m.offset,
                    ));
                }
            }
        }
        let order: Vec<String> = got.iter().map(|g| g.0.clone()).collect();
        let want: Vec<String> = (0..30).map(|i| format!("seq-{i}")).collect();
        anyhow::ensure!(order == want, "out of order: {order:?}");
        let first = got[0].2;
        anyhow::ensure!(
            got.iter()
                .enumerate()
                .all(|(i, g)| g.2 == first + i as u64 && g.1 == got[0].1),
            "offsets not consecutive in one epoch: {got:?}"
        );
        seen.push(got);
    }
    anyhow::ensure!(seen[0] == seen[1], "offsets differ between conn nodes");
    let (epoch, last_seen) = (seen[1][29].1, seen[1][29].2);

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

    check_metrics(c).await?;

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

    // A's client comes back on B with the position it had before A died,
    // and recovers every IMPORTANT message it missed, in order, once.
    let mut back = Client::connect(&c.ws_b).await?;
    let e = back
        .sign_in_resume(&tok_a, "lobby", epoch, last_seen)
        .await?;
    anyhow::ensure!(e.code == 0 && e.recovered, "recovery on B: {e:?}");
    let mut rec: Vec<String> = vec![];
    let mut offsets = vec![];
    let deadline = tokio::time::Instant::now() + T;
    while !sent.iter().all(|m| rec.contains(m)) {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "recovery missed IMPORTANT messages: sent {sent:?}, got {rec:?}"
        );
        for m in back.recv_stream(1, T).await?.msgs {
            offsets.push(m.offset);
            rec.push(String::from_utf8_lossy(&m.data).into_owned());
        }
    }
    anyhow::ensure!(
        offsets.windows(2).all(|w| w[1] == w[0] + 1) && offsets[0] == last_seen + 1,
        "recovered offsets not consecutive from {}: {offsets:?}",
        last_seen + 1
    );
    let mut dedup = rec.clone();
    dedup.dedup();
    anyhow::ensure!(dedup == rec, "a message came twice: {rec:?}");

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

/// Every node's `/metrics` after the traffic above: each family the
/// cluster exercised has moved, on the node that did the work.
async fn check_metrics(c: &Cluster) -> anyhow::Result<()> {
    let v = |t: &str, name: &str, labels: &[(&str, &str)]| sample(t, name, labels).unwrap_or(0.0);
    for (name, base) in &c.admin {
        let (s, body) = http::get_text(&format!("{base}/healthz")).await?;
        anyhow::ensure!(s == 200, "{name} /healthz: {s} {body}");
        let (s, body) = http::get_text(&format!("{base}/readyz")).await?;
        anyhow::ensure!(s == 200, "{name} /readyz: {s} {body}");
    }
    // conn: both nodes delivered the messages above to their session.
    for name in ["conn-a", "conn-b"] {
        let t = c.scrape(name).await?;
        let n = [("node", name)];
        for family in [
            "chatroom_conn_pushes_total",
            "chatroom_conn_deliveries_total",
            "chatroom_conn_accepted_total",
            "chatroom_conn_connections",
        ] {
            anyhow::ensure!(v(&t, family, &n) > 0.0, "{name}: {family} is 0:\n{t}");
        }
        anyhow::ensure!(
            v(&t, "chatroom_discovery_nodes", &[("service", "logic")]) == 2.0,
            "{name}: discovery should know 2 logic nodes:\n{t}"
        );
        anyhow::ensure!(
            v(&t, "chatroom_discovery_registrations", &[]) == 1.0,
            "{name}: not registered:\n{t}"
        );
    }
    // job: between them the two consumed, batched, pushed and FINed; each
    // knows both conn nodes and holds an nsqd connection found through
    // nsqlookupd.
    let mut sums = std::collections::HashMap::<&str, f64>::new();
    for name in ["job-0", "job-1"] {
        let t = c.scrape(name).await?;
        let n = [("node", name)];
        anyhow::ensure!(
            v(&t, "chatroom_job_conn_nodes", &n) == 2.0,
            "{name}: conn_nodes != 2:\n{t}"
        );
        anyhow::ensure!(
            v(&t, "chatroom_nsq_connections", &[("role", "consumer")]) >= 1.0,
            "{name}: no nsqd consumer connection:\n{t}"
        );
        anyhow::ensure!(v(&t, "chatroom_nsq_rdy", &[]) >= 1.0, "{name}: RDY 0:\n{t}");
        anyhow::ensure!(
            v(&t, "chatroom_nsq_lookupd_up", &[]) == 1.0,
            "{name}: nsqlookupd not answering:\n{t}"
        );
        for (family, labels) in [
            ("chatroom_job_messages_consumed_total", &n[..]),
            ("chatroom_job_batches_total", &n[..]),
            ("chatroom_job_batch_messages_count", &n[..]),
            ("chatroom_job_pushes_total", &n[..]),
            ("chatroom_job_sessions_delivered_total", &n[..]),
            ("chatroom_nsq_messages_received_total", &[][..]),
        ] {
            *sums.entry(family).or_default() += v(&t, family, labels);
        }
        *sums.entry("fin").or_default() += v(&t, "chatroom_job_acks_total", &[("kind", "fin")]);
    }
    for (family, total) in &sums {
        anyhow::ensure!(*total > 0.0, "jobs: {family} did not move");
    }
    // logic: sign-ins, /tk and /msg requests, publishes over an nsqd connection.
    let mut sign_ins = 0.0;
    let mut published = 0.0;
    for name in ["logic-0", "logic-1"] {
        let t = c.scrape(name).await?;
        sign_ins += v(&t, "chatroom_logic_sign_ins_total", &[]);
        published += v(&t, "chatroom_queue_published_total", &[]);
        anyhow::ensure!(
            v(&t, "chatroom_nsq_connections", &[("role", "producer")]) == 1.0,
            "{name}: no nsqd producer connection:\n{t}"
        );
    }
    anyhow::ensure!(sign_ins >= 2.0, "logic sign-ins {sign_ins}, want >= 2");
    anyhow::ensure!(published > 0.0, "nothing published");
    let t = c.scrape("logic-0").await?;
    anyhow::ensure!(
        v(
            &t,
            "chatroom_logic_http_requests_total",
            &[("route", "/msg"), ("code", "200")]
        ) > 0.0,
        "logic-0 counted no POST /msg:\n{t}"
    );
    // etcd leases are renewed every ttl/3: wait for one renewal.
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let t = c.scrape("conn-a").await?;
        if v(&t, "chatroom_discovery_lease_renewals_total", &[]) > 0.0 {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "conn-a never renewed its lease:\n{t}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_with_test_broker() {
    let broker = TestNsqd::start().await;
    let mut c = start_cluster(Queue::Broker(broker)).await;
    if let Err(e) = scenario(&mut c).await {
        panic!("{e:#}\n{}", c.dump());
    }
}

/// The same scenario over a real nsqd and nsqlookupd, when `NSQD_BIN` names
/// one (`.ci/run` sets it from `../shared/nsq/bin/`): job finds nsqd only
/// through nsqlookupd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_with_real_nsqd() {
    let Some(queue) = start_nsqd().await else {
        return;
    };
    eprintln!("REAL-NSQ: cluster test running against a real nsqd + nsqlookupd");
    let mut c = start_cluster(queue).await;
    if let Err(e) = scenario(&mut c).await {
        panic!("{e:#}\n{}", c.dump());
    }
}

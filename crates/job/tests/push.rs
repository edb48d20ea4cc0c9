//! End to end through `run`: a memory queue in, fake conn nodes (real gRPC
//! servers) out, static discovery.

mod common;

use std::time::Duration;

use chatroom_common::proto::protocol::MsgLevel;
use chatroom_queue::QueueConfig;
use chatroom_queue::Subscriber;
use common::*;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[tokio::test]
async fn merges_per_room_and_pushes_every_batch_to_every_node() {
    init_tracing();
    let (a, b) = (
        FakeConn::start(Mode::Ok).await,
        FakeConn::start(Mode::Ok).await,
    );
    let mut cfg = config(vec![a.uri.clone(), b.uri.clone()]);
    cfg.batch.max_messages = 3;
    cfg.batch.window = Duration::from_millis(300);
    let job = Job::start(cfg).await;

    // The first message of a quiet room goes at once; then the room is
    // busy for a window and its messages gather.
    job.publish("a", N, "a1").await; // quiet: at once
    job.publish("b", N, "b1").await; // quiet: at once
    job.publish("a", N, "a2").await;
    job.publish("a", N, "a3").await;
    job.publish("a", N, "a4").await; // count flush of a
    job.publish("b", N, "b2").await;
    job.publish("b", I, "b3").await; // immediate flush of b, IMPORTANT
    job.publish("c", N, "c1").await; // quiet: at once
    let c_published = Instant::now();
    job.publish("c", N, "c2").await; // window flush of c

    let want = vec![
        got("a", N, &["a1"]),
        got("b", N, &["b1"]),
        got("a", N, &["a2", "a3", "a4"]),
        got("b", I, &["b2", "b3"]),
        got("c", N, &["c1"]),
        got("c", N, &["c2"]),
    ];
    for node in [&a, &b] {
        until(SECS5, "both nodes got six batches", || {
            node.got().len() >= 6
        })
        .await;
    }
    assert!(
        c_published.elapsed() >= Duration::from_millis(250),
        "room c was flushed before its window"
    );
    assert_eq!(a.got(), want);
    assert_eq!(b.got(), want);

    let metrics = job.metrics.clone();
    let q = job.stop(SECS5).await;
    let m = metrics.snapshot();
    assert_eq!((m.received, m.batches, m.pushes_ok), (9, 6, 12));
    assert_eq!((m.finished, m.requeued, m.push_failures), (9, 0, 0));
    assert_eq!(q.depth(), 0);
    assert_eq!(a.got(), want, "nothing more after shutdown");
}

#[tokio::test]
async fn failing_stuck_and_dead_nodes_do_not_hold_back_the_healthy_one() {
    init_tracing();
    let healthy = FakeConn::start(Mode::Ok).await;
    let failing = FakeConn::start(Mode::AlwaysFail).await;
    let stuck = FakeConn::start(Mode::Hang).await;
    let dead = dead_uri().await;
    let mut cfg = config(vec![
        healthy.uri.clone(),
        failing.uri.clone(),
        stuck.uri.clone(),
        dead,
    ]);
    cfg.batch.max_messages = 1;
    cfg.push.timeout = Duration::from_millis(500);
    cfg.shutdown_grace = Duration::from_millis(200);
    let job = Job::start(cfg).await;

    let started = Instant::now();
    let sent: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    for m in &sent {
        job.publish("r", N, m).await;
    }
    until(SECS5, "healthy node got all 20", || {
        healthy.msgs().len() == 20
    })
    .await;
    // The stuck node alone would need 20 x 500 ms to time out every push.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "healthy node was slowed down: {:?}",
        started.elapsed()
    );
    assert_eq!(healthy.msgs(), sent, "order kept");
    // NORMAL batches are tried once per node, never retried.
    until(SECS5, "failing node saw every batch once", || {
        failing.tried() == 20
    })
    .await;
    assert!(failing.got().is_empty());

    let metrics = job.metrics.clone();
    job.stop(SECS5).await;
    assert_eq!(failing.tried(), 20, "no retry of NORMAL batches");
    let m = metrics.snapshot();
    assert_eq!(m.retries, 0);
    assert_eq!(m.pushes_ok, 20);
    // Every batch reached the healthy node: all finished, none requeued,
    // even those the stuck node was still holding at shutdown.
    assert_eq!((m.finished, m.requeued), (20, 0));
    assert!(
        m.dropped_normal >= 40,
        "failing + dead nodes: {}",
        m.dropped_normal
    );
}

#[tokio::test]
async fn important_is_retried_until_the_node_recovers_normal_is_not() {
    init_tracing();
    let healthy = FakeConn::start(Mode::Ok).await;
    let flaky = FakeConn::start(Mode::FailFirst(3)).await;
    let mut cfg = config(vec![healthy.uri.clone(), flaky.uri.clone()]);
    cfg.batch.max_messages = 1;
    cfg.push.important_retry = Duration::from_millis(5000);
    let job = Job::start(cfg).await;

    job.publish("r", N, "n1").await;
    until(
        SECS5,
        "n1 at the healthy node, one failed call at the flaky one",
        || healthy.msgs() == ["n1"] && flaky.calls() == 1,
    )
    .await;

    job.publish("r", I, "i1").await;
    until(SECS5, "flaky node got i1 after retries", || {
        !flaky.got().is_empty()
    })
    .await;
    assert_eq!(
        flaky.got(),
        vec![got("r", I, &["i1"])],
        "n1 was never retried"
    );
    assert_eq!(flaky.calls(), 4, "n1 once, i1 failed twice then succeeded");
    until(SECS5, "healthy got both", || healthy.msgs() == ["n1", "i1"]).await;

    // Later batches still flow to both, in order.
    job.publish("r", N, "n2").await;
    until(SECS5, "n2 everywhere", || {
        healthy.msgs().len() == 3 && flaky.msgs() == ["i1", "n2"]
    })
    .await;

    let metrics = job.metrics.clone();
    job.stop(SECS5).await;
    let m = metrics.snapshot();
    assert_eq!(
        (m.retries, m.dropped_normal, m.dropped_important),
        (2, 1, 0)
    );
    assert_eq!((m.finished, m.requeued), (3, 0));
}

#[tokio::test]
async fn important_that_no_node_took_goes_back_to_the_queue_and_arrives_once() {
    init_tracing();
    let only = FakeConn::start(Mode::FailFirst(2)).await;
    let mut cfg = config(vec![only.uri.clone()]);
    cfg.batch.max_messages = 1;
    let job = Job::start(cfg).await;

    job.publish("r", I, "i1").await;
    until(SECS5, "i1 delivered", || !only.got().is_empty()).await;

    let metrics = job.metrics.clone();
    job.stop(SECS5).await;
    assert_eq!(
        only.got(),
        vec![got("r", I, &["i1"])],
        "delivered exactly once"
    );
    assert_eq!(only.calls(), 3);
    let m = metrics.snapshot();
    // Two failed attempts, each requeued; the worker did not retry on its
    // own (that would have duplicated the redelivery).
    assert_eq!(
        (m.requeued, m.received, m.finished, m.retries),
        (2, 3, 1, 0)
    );
}

#[tokio::test]
async fn shutdown_flushes_pending_rooms_and_pushes_them() {
    init_tracing();
    let a = FakeConn::start(Mode::Ok).await;
    let mut cfg = config(vec![a.uri.clone()]);
    cfg.batch.window = Duration::from_millis(60_000);
    let job = Job::start(cfg).await;

    for (room, m) in [
        ("x", "x1"),
        ("y", "y1"),
        ("x", "x2"),
        ("y", "y2"),
        ("x", "x3"),
    ] {
        job.publish(room, N, m).await;
    }
    let metrics = job.metrics.clone();
    let started = Instant::now();
    let q = job.stop(SECS5).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "did not wait for the window"
    );

    let mut got = a.got();
    got.sort_by(|p, q| p.room.cmp(&q.room));
    assert_eq!(
        got,
        vec![
            got_("x", &["x1"]),
            got_("x", &["x2", "x3"]),
            got_("y", &["y1"]),
            got_("y", &["y2"])
        ]
    );
    let m = metrics.snapshot();
    assert_eq!((m.finished, m.requeued), (5, 0));
    assert_eq!(q.depth(), 0);
}

fn got_(room: &str, msgs: &[&str]) -> Got {
    got(room, N, msgs)
}

#[tokio::test]
async fn shutdown_requeues_what_could_not_be_pushed_within_the_grace() {
    init_tracing();
    let stuck = FakeConn::start(Mode::Hang).await;
    let mut cfg = config(vec![stuck.uri.clone()]);
    cfg.batch.window = Duration::from_millis(60_000);
    cfg.push.timeout = Duration::from_millis(30_000);
    cfg.shutdown_grace = Duration::from_millis(300);
    let job = Job::start(cfg.clone()).await;

    let sent = [
        ("p", N, "p1"),
        ("q", I, "q1"),
        ("r", N, "r1"),
        ("p", N, "p2"),
    ];
    for (room, level, m) in sent {
        job.publish(room, level, m).await;
    }
    // q flushed at once (IMPORTANT) and is stuck in a push.
    until(SECS5, "the stuck node was called", || stuck.calls() == 1).await;
    let metrics = job.metrics.clone();
    let started = Instant::now();
    let q = job.stop(SECS5).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "grace was not enforced"
    );
    assert_eq!(metrics.snapshot().requeued, 4);

    // Nothing lost: every message is back on the queue, marked redelivered.
    until(SECS5, "all four requeued", || q.depth() == 4).await;
    let stop = CancellationToken::new();
    let mut sub = Subscriber::start(
        &QueueConfig::Memory { capacity: 16 },
        Some(&q),
        "check",
        &TaskTracker::new(),
        stop.clone(),
    )
    .unwrap();
    stop.cancel();
    let mut back = Vec::new();
    while let Some(d) = sub.next().await {
        assert_eq!(d.attempts, 2);
        back.push(d.body.clone());
        d.finish();
    }
    let mut want: Vec<_> = sent.iter().map(|(r, l, m)| room_msg(r, *l, m)).collect();
    back.sort();
    want.sort();
    assert_eq!(back, want);
}

#[tokio::test]
async fn poison_messages_are_finished_and_do_not_stop_the_flow() {
    init_tracing();
    let a = FakeConn::start(Mode::Ok).await;
    let mut cfg = config(vec![a.uri.clone()]);
    cfg.batch.max_messages = 1;
    let job = Job::start(cfg).await;

    job.publisher
        .publish(bytes::Bytes::from_static(b"\xff\xff not protobuf"))
        .await
        .unwrap();
    job.publish("", N, "no room").await;
    job.publish("r", N, "ok").await;
    until(SECS5, "the good message arrives", || a.msgs() == ["ok"]).await;

    let metrics = job.metrics.clone();
    let q = job.stop(SECS5).await;
    let m = metrics.snapshot();
    assert_eq!(
        (m.received, m.undecodable, m.finished, m.requeued),
        (3, 2, 1, 0)
    );
    assert_eq!(q.depth(), 0);
}

#[tokio::test]
async fn with_no_conn_nodes_messages_are_finished() {
    init_tracing();
    let mut cfg = config(Vec::new());
    cfg.batch.max_messages = 1;
    let job = Job::start(cfg).await;
    job.publish("r", I, "nobody listens").await;
    let metrics = job.metrics.clone();
    until(SECS5, "settled", || metrics.snapshot().finished == 1).await;
    let q = job.stop(SECS5).await;
    let m = metrics.snapshot();
    assert_eq!((m.no_nodes, m.requeued), (1, 0));
    assert_eq!(q.depth(), 0);
}

#[tokio::test]
async fn a_full_node_queue_costs_only_that_node() {
    init_tracing();
    let healthy = FakeConn::start(Mode::Ok).await;
    let stuck = FakeConn::start(Mode::Hang).await;
    let mut cfg = config(vec![healthy.uri.clone(), stuck.uri.clone()]);
    cfg.batch.max_messages = 1;
    cfg.push.node_queue = 1;
    cfg.push.timeout = Duration::from_millis(30_000);
    cfg.shutdown_grace = Duration::from_millis(200);
    let job = Job::start(cfg).await;

    job.publish("r", N, "m0").await;
    // The stuck node now holds m0 in a push; its queue has room for one.
    until(SECS5, "stuck node busy", || stuck.calls() == 1).await;
    // One at a time, so the healthy node's own queue of one never fills.
    for (level, m) in [(N, "m1"), (N, "m2"), (N, "m3"), (N, "m4"), (I, "i5")] {
        job.publish("r", level, m).await;
        until(SECS5, "healthy got it", || {
            healthy.msgs().last().map(String::as_str) == Some(m)
        })
        .await;
    }
    assert_eq!(healthy.msgs(), ["m0", "m1", "m2", "m3", "m4", "i5"]);

    let metrics = job.metrics.clone();
    job.stop(SECS5).await;
    let m = metrics.snapshot();
    // m1 was queued; m2..m4 and i5 found the stuck node's queue full.
    assert_eq!(
        (m.overflow, m.dropped_normal, m.dropped_important),
        (4, 3, 1)
    );
    // The healthy node got them all, so nothing is requeued.
    assert_eq!((m.finished, m.requeued), (6, 0));
}

#[tokio::test]
async fn important_retries_end_after_the_window_and_a_broken_node_is_not_waited_on_again() {
    init_tracing();
    let healthy = FakeConn::start(Mode::Ok).await;
    let broken = FakeConn::start(Mode::AlwaysFail).await;
    let mut cfg = config(vec![healthy.uri.clone(), broken.uri.clone()]);
    cfg.batch.max_messages = 1;
    cfg.push.important_retry = Duration::from_millis(400);
    let job = Job::start(cfg).await;
    let metrics = job.metrics.clone();

    let started = Instant::now();
    job.publish("r", I, "i1").await;
    until(SECS5, "broken node gave up on i1", || {
        metrics.snapshot().dropped_important == 1
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "gave up early"
    );
    let calls = broken.calls();
    assert!(calls >= 4, "retried with back-off: {calls} calls");

    // The window is spent: the next IMPORTANT batch gets one attempt there.
    job.publish("r", I, "i2").await;
    until(SECS5, "i2 dropped for the broken node", || {
        metrics.snapshot().dropped_important == 2
    })
    .await;
    assert_eq!(broken.calls(), calls + 1);
    assert_eq!(healthy.msgs(), ["i1", "i2"]);

    job.stop(SECS5).await;
    let m = metrics.snapshot();
    assert_eq!((m.finished, m.requeued), (2, 0));
}

#[tokio::test]
async fn user_messages_go_only_to_their_nodes_broadcasts_and_joins_as_asked() {
    use chatroom_common::proto::protocol::ChatMsg;
    use chatroom_common::proto::queue::queue_msg::Body;
    use chatroom_common::proto::queue::{BroadcastMsg, JoinMsg, UserMsg};
    init_tracing();
    let (a, b) = (
        FakeConn::start(Mode::Ok).await,
        FakeConn::start(Mode::Ok).await,
    );
    // Static discovery names nodes `id=uri`; user messages address ids.
    let job = Job::start(config(vec![
        format!("node-a={}", a.uri),
        format!("node-b={}", b.uri),
    ]))
    .await;
    let chat = |content: &str| ChatMsg {
        content: content.into(),
        ..Default::default()
    };
    let user = UserMsg {
        uids: vec!["7".into()],
        servers: vec!["node-b".into()],
        msg: Some(chat("to seven")),
    };
    job.publisher
        .publish(queue_msg(Body::User(user)))
        .await
        .unwrap();
    let bc = BroadcastMsg {
        msg: Some(chat("hear ye")),
    };
    job.publisher
        .publish(queue_msg(Body::Broadcast(bc)))
        .await
        .unwrap();
    let join = JoinMsg {
        uid: "7".into(),
        room: "c:1".into(),
        servers: vec!["node-a".into(), "node-b".into()],
    };
    job.publisher
        .publish(queue_msg(Body::Join(join)))
        .await
        .unwrap();
    // A community room carries chat messages only: a plain one is poison.
    job.publish("c:1", I, "not a chat message").await;

    until(SECS5, "b got user, broadcast and join", || {
        b.got().len() >= 3
    })
    .await;
    until(SECS5, "a got broadcast and join", || a.got().len() >= 2).await;
    let rooms = |n: &FakeConn| n.got().into_iter().map(|g| g.room).collect::<Vec<_>>();
    assert_eq!(rooms(&b), ["users:7", "all", "join:7"]);
    assert_eq!(
        rooms(&a),
        ["all", "join:7"],
        "node-a is not where user 7 is"
    );
    let metrics = job.metrics.clone();
    let q = job.stop(SECS5).await;
    let m = metrics.snapshot();
    // The poison message is finished too, but counted as undecodable.
    assert_eq!((m.received, m.undecodable, m.finished), (4, 1, 3));
    assert_eq!(q.depth(), 0);
}

/// Publishes `m0` (which the held node takes and holds), then `m1..=m20` to
/// twenty rooms, one batch each, and waits until all 21 were handed to the
/// node queues.
async fn pile_up_behind_a_held_call(
    job: &Job,
    held: &FakeConn,
    levels: &[MsgLevel],
) -> Vec<String> {
    job.publish("r0", N, "m0").await;
    until(SECS5, "the held node took m0", || held.calls() == 1).await;
    let mut sent = vec!["m0".to_string()];
    for i in 1..=20 {
        let m = format!("m{i}");
        job.publish(&format!("r{i}"), levels[i % levels.len()], &m)
            .await;
        sent.push(m);
    }
    let metrics = job.metrics.clone();
    until(SECS5, "21 batches flushed", || {
        metrics.snapshot().batches == 21
    })
    .await;
    sent
}

#[tokio::test]
async fn batches_queued_for_a_node_go_out_in_one_call_in_order() {
    init_tracing();
    let node = FakeConn::start_held(Mode::Ok).await;
    let mut cfg = config(vec![node.uri.clone()]);
    cfg.batch.max_messages = 1;
    let job = Job::start(cfg).await;

    let sent = pile_up_behind_a_held_call(&job, &node, &[N, I]).await;
    node.release();
    until(SECS5, "all 21 pushed", || node.msgs().len() == 21).await;
    assert_eq!(node.msgs(), sent, "queue order kept across the bundle");
    // m0 alone, then what piled up in (nearly always) one bundle.
    assert!(
        node.bundles() >= 1 && node.calls() <= 3,
        "calls {}",
        node.calls()
    );
    assert_eq!(node.tried(), 21, "every batch pushed once");

    let metrics = job.metrics.clone();
    job.stop(SECS5).await;
    let m = metrics.snapshot();
    assert_eq!((m.pushes_ok, m.finished, m.requeued), (21, 21, 0));
    assert_eq!(m.bundles as usize, node.bundles());
}

#[tokio::test]
async fn a_failed_bundle_drops_its_normal_batches_and_retries_its_important_ones() {
    init_tracing();
    let healthy = FakeConn::start(Mode::Ok).await;
    // Call 1 (m0, held) and call 2 (the bundle) fail; retries succeed.
    let flaky = FakeConn::start_held(Mode::FailFirst(2)).await;
    let mut cfg = config(vec![healthy.uri.clone(), flaky.uri.clone()]);
    cfg.batch.max_messages = 1;
    cfg.push.important_retry = Duration::from_millis(5000);
    let job = Job::start(cfg).await;

    let sent = pile_up_behind_a_held_call(&job, &flaky, &[N, I]).await;
    // Once the healthy node has m20, every batch is in the flaky node's queue.
    until(SECS5, "the healthy node got everything", || {
        healthy.msgs() == sent
    })
    .await;
    flaky.release();
    let important: Vec<String> = (1..=20)
        .filter(|i| i % 2 == 1)
        .map(|i| format!("m{i}"))
        .collect();
    until(SECS5, "the flaky node got every IMPORTANT batch", || {
        flaky.msgs() == important
    })
    .await;
    assert_eq!(
        flaky.calls(),
        12,
        "m0, the bundle, one retry per IMPORTANT batch"
    );

    let metrics = job.metrics.clone();
    job.stop(SECS5).await;
    let m = metrics.snapshot();
    // m0 and the 10 NORMAL batches of the bundle were lost to the flaky
    // node only; each IMPORTANT one was retried once, none twice.
    assert_eq!(
        (m.dropped_normal, m.dropped_important, m.retries),
        (11, 0, 10)
    );
    assert_eq!((m.finished, m.requeued), (21, 0));
}

#[tokio::test]
async fn a_node_without_push_rooms_gets_one_batch_per_call() {
    init_tracing();
    let old = FakeConn::start_held(Mode::NoBundles).await;
    let mut cfg = config(vec![old.uri.clone()]);
    cfg.batch.max_messages = 1;
    let job = Job::start(cfg).await;

    let sent = pile_up_behind_a_held_call(&job, &old, &[N]).await;
    old.release();
    until(SECS5, "all 21 pushed", || old.msgs().len() == 21).await;
    assert_eq!(old.msgs(), sent, "order kept");
    assert_eq!(old.bundles(), 0);
    // One refused bundle at most; after it, never another.
    let calls = old.calls();
    assert!((21..=22).contains(&calls), "calls {calls}");
    let metrics = job.metrics.clone();
    job.stop(SECS5).await;
    let m = metrics.snapshot();
    assert_eq!((m.pushes_ok, m.dropped_normal, m.finished), (21, 0, 21));
}

//! The NSQ client (`chatroom-nsq`) against `TestNsqd`, the test
//! broker speaking nsqd's wire protocol: publishing, pipelining, RDY flow
//! control, FIN/REQ/TOUCH, reconnects, nsqlookupd discovery, draining
//! shutdown, heartbeats and a broker that sends garbage.

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use chatroom_nsq::{Consumer, ConsumerConfig, Message, NsqError, Producer};
use chatroom_tests::nsq_broker::{TestNsqd, TestNsqdConfig};
use chatroom_tests::wait::until;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const WAIT: Duration = Duration::from_secs(10);
const TOPIC: &str = "chat";

async fn recv(c: &mut Consumer) -> Message {
    tokio::time::timeout(WAIT, c.next())
        .await
        .expect("timed out waiting for a message")
        .expect("consumer closed")
}

/// Asserts that nothing arrives for a while (absence cannot be awaited).
async fn assert_nothing_for(c: &mut Consumer, d: Duration) {
    if let Ok(m) = tokio::time::timeout(d, c.next()).await {
        panic!("expected no message, got {m:?}");
    }
}

fn body(m: &Message) -> String {
    String::from_utf8_lossy(&m.body).into_owned()
}

fn cfg(addrs: &[&TestNsqd], max_in_flight: u32) -> ConsumerConfig {
    ConsumerConfig {
        topic: TOPIC.into(),
        channel: "job".into(),
        nsqd_tcp_addresses: addrs.iter().map(|b| b.tcp_addr().to_string()).collect(),
        max_in_flight,
        client_id: "test-consumer".into(),
        drain_timeout: Duration::from_secs(5),
        ..ConsumerConfig::default()
    }
}

struct Running {
    consumer: Consumer,
    stop: CancellationToken,
    tracker: TaskTracker,
}

fn consume(cfg: ConsumerConfig) -> Running {
    let tracker = TaskTracker::new();
    let stop = CancellationToken::new();
    let consumer = Consumer::start(cfg, &tracker, stop.clone());
    Running {
        consumer,
        stop,
        tracker,
    }
}

impl Running {
    async fn stop(self) {
        self.stop.cancel();
        drop(self.consumer);
        self.tracker.close();
        tokio::time::timeout(WAIT, self.tracker.wait())
            .await
            .expect("consumer tasks did not stop");
    }
}

/// Connections of subscribed clients (the producer is not one).
fn subscribers(b: &TestNsqd) -> usize {
    b.clients()
        .iter()
        .filter(|c| c.subscription.is_some())
        .count()
}

async fn producer(b: &TestNsqd) -> Producer {
    Producer::connect(&[b.tcp_addr().to_string()])
        .await
        .expect("producer connects")
}

#[tokio::test]
async fn publish_and_multi_publish_then_consume() {
    let b = TestNsqd::start().await;
    let p = producer(&b).await;
    p.publish(TOPIC, Bytes::from_static(b"a")).await.unwrap();
    p.multi_publish(TOPIC, &[Bytes::from_static(b"b"), Bytes::from_static(b"c")])
        .await
        .unwrap();
    p.multi_publish(TOPIC, &[]).await.unwrap();
    assert_eq!(b.published(TOPIC), 3);
    // No channel yet: the topic keeps them, as nsqd does.
    assert_eq!(b.topic_depth(TOPIC), 3);

    let mut r = consume(cfg(&[&b], 16));
    let mut got = BTreeSet::new();
    for _ in 0..3 {
        let m = recv(&mut r.consumer).await;
        assert_eq!(m.attempts, 1);
        assert!(m.timestamp_ns > 0);
        got.insert(body(&m));
        m.finish();
    }
    assert_eq!(got, BTreeSet::from(["a".into(), "b".into(), "c".into()]));
    until(WAIT, "3 FINs", || b.finished() == 3 && b.in_flight() == 0).await;
    assert_eq!(b.depth(TOPIC, "job"), 0);

    let info = b
        .clients()
        .into_iter()
        .find(|c| c.subscription.is_some())
        .unwrap();
    assert_eq!(info.user_agent, "chatroom/0.1");
    assert_eq!(info.client_id, "test-consumer");
    assert_eq!(info.heartbeat_interval, Some(Duration::from_secs(30)));
    assert!(b.errors().is_empty(), "broker errors: {:?}", b.errors());

    p.close().await;
    assert!(matches!(
        p.publish(TOPIC, Bytes::from_static(b"x")).await,
        Err(NsqError::Closed)
    ));
    r.stop().await;
    b.shutdown().await;
}

#[tokio::test]
async fn concurrent_publishes_share_one_pipelined_connection() {
    let b = TestNsqd::start().await;
    let p = producer(&b).await;
    let results = futures_util::future::join_all((0..1000).map(|i| {
        let p = p.clone();
        async move { p.publish(TOPIC, Bytes::from(format!("m{i}"))).await }
    }))
    .await;
    let failed: Vec<_> = results.iter().filter(|r| r.is_err()).collect();
    assert!(
        failed.is_empty(),
        "{} failed, e.g. {:?}",
        failed.len(),
        failed.first()
    );
    assert_eq!(b.published(TOPIC), 1000);
    assert_eq!(b.accepted(), 1, "all publishes went over one connection");

    // Every message arrived intact, each exactly once.
    let mut r = consume(cfg(&[&b], 200));
    let mut seen = BTreeSet::new();
    for _ in 0..1000 {
        let m = recv(&mut r.consumer).await;
        assert!(seen.insert(body(&m)), "duplicate {}", body(&m));
        m.finish();
    }
    assert_eq!(seen.len(), 1000);
    until(WAIT, "1000 FINs", || b.finished() == 1000).await;
    r.stop().await;
}

#[tokio::test]
async fn server_errors_are_surfaced_and_the_producer_recovers() {
    let b = TestNsqd::start_with(TestNsqdConfig {
        max_msg_size: 16,
        ..TestNsqdConfig::default()
    })
    .await;
    let p = producer(&b).await;
    // Caught before the wire, so the shared connection is not sacrificed.
    assert!(matches!(
        p.publish("bad topic!", Bytes::from_static(b"x")).await,
        Err(NsqError::Protocol(_))
    ));
    assert_eq!(b.accepted(), 1);
    let e = p
        .publish(TOPIC, Bytes::from(vec![b'x'; 17]))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, NsqError::Server(s) if s.starts_with("E_BAD_MESSAGE")),
        "{e:?}"
    );
    // E_BAD_MESSAGE is fatal: nsqd closes, the producer reconnects.
    let mut ok = false;
    let end = Instant::now() + WAIT;
    while !ok && Instant::now() < end {
        ok = p.publish(TOPIC, Bytes::from_static(b"fine")).await.is_ok();
        if !ok {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert!(ok, "publishing works again after the fatal error");
    assert_eq!(b.accepted(), 2);
    assert_eq!(b.published(TOPIC), 1);
}

/// Publishes until one succeeds (used across reconnects).
async fn publish_eventually(p: &Producer, body: &'static [u8]) {
    let end = Instant::now() + WAIT;
    loop {
        match p.publish(TOPIC, Bytes::from_static(body)).await {
            Ok(()) => return,
            Err(e) => {
                assert!(Instant::now() < end, "publish kept failing: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[tokio::test]
async fn producer_reconnects_fails_fast_in_an_outage_and_fails_over() {
    let a = TestNsqd::start().await;
    let b = TestNsqd::start().await;
    let p = Producer::connect(&[a.tcp_addr().to_string(), b.tcp_addr().to_string()])
        .await
        .unwrap();
    p.publish(TOPIC, Bytes::from_static(b"1")).await.unwrap();
    assert_eq!(
        (a.published(TOPIC), b.accepted()),
        (1, 0),
        "starts on the first address"
    );

    // Registered as a service registers them (logic and job start a queue).
    chatroom_queue::metrics::init();
    let nsq = &*chatroom_queue::metrics::NSQ;
    let reconnects = nsq.producer_reconnects.get();
    assert!(
        nsq.producer_connections.get() >= 1,
        "a live producer connection is counted"
    );
    a.drop_connections();
    until(WAIT, "the drop", || {
        a.connections() == 0 || a.accepted() >= 2
    })
    .await;
    publish_eventually(&p, b"2").await;
    assert_eq!(a.published(TOPIC) + b.published(TOPIC), 2);
    // Counted in chatroom_nsq_reconnects_total{role="producer"}.
    assert!(nsq.producer_reconnects.get() > reconnects);
    let text = chatroom_common::metrics::render(&[]);
    assert!(
        chatroom_common::metrics::sample(
            &text,
            "chatroom_nsq_reconnects_total",
            &[("role", "producer")]
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{text}"
    );

    // The first nsqd goes away: publishing fails over to the second.
    a.shutdown().await;
    publish_eventually(&p, b"3").await;
    assert!(b.published(TOPIC) >= 1);

    // Everything gone: a publish errors promptly instead of hanging.
    b.shutdown().await;
    for _ in 0..3 {
        let t = Instant::now();
        let r = p.publish(TOPIC, Bytes::from_static(b"4")).await;
        assert!(r.is_err());
        assert!(
            t.elapsed() < Duration::from_secs(6),
            "took {:?}",
            t.elapsed()
        );
    }
    p.close().await;
}

#[tokio::test]
async fn connect_fails_when_no_nsqd_is_reachable() {
    let b = TestNsqd::start().await;
    let addr = b.tcp_addr().to_string();
    b.shutdown().await;
    assert!(matches!(
        Producer::connect(&[addr]).await,
        Err(NsqError::NoServer)
    ));
    assert!(matches!(
        Producer::connect(&[]).await,
        Err(NsqError::NoServer)
    ));
}

#[tokio::test]
async fn rdy_caps_messages_in_flight() {
    let b = TestNsqd::start().await;
    let p = producer(&b).await;
    let bodies: Vec<Bytes> = (0..50).map(|i| Bytes::from(format!("{i}"))).collect();
    p.multi_publish(TOPIC, &bodies).await.unwrap();

    let mut r = consume(cfg(&[&b], 5));
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(recv(&mut r.consumer).await);
    }
    assert_nothing_for(&mut r.consumer, Duration::from_millis(300)).await;
    assert_eq!(b.in_flight(), 5);
    assert_eq!(
        b.clients()
            .iter()
            .find(|c| c.subscription.is_some())
            .unwrap()
            .rdy,
        5
    );

    // Finishing lets more in, one for one.
    let mut done = 0;
    for m in held.drain(..) {
        m.finish();
        done += 1;
    }
    while done < 50 {
        recv(&mut r.consumer).await.finish();
        done += 1;
    }
    until(WAIT, "50 FINs", || b.finished() == 50).await;
    assert_eq!(
        b.max_in_flight_seen(TOPIC, "job"),
        5,
        "never more than max_in_flight"
    );
    r.stop().await;
}

#[tokio::test]
async fn max_in_flight_is_split_across_nsqds() {
    let a = TestNsqd::start().await;
    let b = TestNsqd::start().await;
    for broker in [&a, &b] {
        let p = producer(broker).await;
        let bodies: Vec<Bytes> = (0..10).map(|i| Bytes::from(format!("{i}"))).collect();
        p.multi_publish(TOPIC, &bodies).await.unwrap();
        p.close().await;
    }
    let mut r = consume(cfg(&[&a, &b], 4));
    // Whichever connection subscribes first may take all 4; the other must
    // then wait rather than add its own share on top.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(recv(&mut r.consumer).await);
    }
    assert_nothing_for(&mut r.consumer, Duration::from_millis(300)).await;
    assert_eq!(
        a.delivered() + b.delivered(),
        4,
        "4 in flight in total, across both"
    );
    for m in held {
        m.finish();
    }
    for _ in 0..16 {
        recv(&mut r.consumer).await.finish();
    }
    // Once settled, each connection has half.
    until(WAIT, "RDY 2 on each", || {
        [&a, &b].iter().all(|x| {
            x.clients()
                .iter()
                .any(|c| c.subscription.is_some() && c.rdy == 2)
        })
    })
    .await;
    until(WAIT, "20 FINs", || a.finished() + b.finished() == 20).await;
    r.stop().await;
}

#[tokio::test]
async fn fin_req_touch_and_attempts() {
    let b = TestNsqd::start().await;
    let p = producer(&b).await;
    p.publish(TOPIC, Bytes::from_static(b"x")).await.unwrap();
    let mut r = consume(cfg(&[&b], 4));

    let m = recv(&mut r.consumer).await;
    assert_eq!(m.attempts, 1);
    let id = m.id;
    m.touch();
    until(WAIT, "TOUCH", || b.touched() == 1).await;
    m.requeue(Duration::ZERO);

    let m = recv(&mut r.consumer).await;
    assert_eq!((m.id, m.attempts), (id, 2));
    let t = Instant::now();
    m.requeue(Duration::from_millis(300));
    until(WAIT, "the REQ", || b.requeued() == 2).await;

    let m = recv(&mut r.consumer).await;
    assert!(
        t.elapsed() >= Duration::from_millis(290),
        "redelivered after {:?}",
        t.elapsed()
    );
    assert_eq!((m.id, m.attempts), (id, 3));
    m.finish();
    until(WAIT, "the FIN", || b.finished() == 1 && b.in_flight() == 0).await;
    assert_eq!(b.depth(TOPIC, "job") + b.deferred(TOPIC, "job"), 0);
    assert_nothing_for(&mut r.consumer, Duration::from_millis(100)).await;
    assert!(b.errors().is_empty(), "broker errors: {:?}", b.errors());
    r.stop().await;
}

#[tokio::test]
async fn a_dropped_message_is_requeued() {
    let b = TestNsqd::start().await;
    let p = producer(&b).await;
    p.publish(TOPIC, Bytes::from_static(b"x")).await.unwrap();
    let mut r = consume(cfg(&[&b], 4));
    drop(recv(&mut r.consumer).await);
    until(WAIT, "the automatic REQ", || b.requeued() == 1).await;
    let m = recv(&mut r.consumer).await;
    assert_eq!(m.attempts, 2);
    m.finish();
    until(WAIT, "the FIN", || b.finished() == 1).await;
    r.stop().await;
}

#[tokio::test]
async fn timed_out_messages_come_back_and_a_failed_fin_is_not_fatal() {
    let b = TestNsqd::start_with(TestNsqdConfig {
        msg_timeout: Duration::from_millis(300),
        ..TestNsqdConfig::default()
    })
    .await;
    let p = producer(&b).await;
    p.publish(TOPIC, Bytes::from_static(b"slow")).await.unwrap();
    let mut r = consume(cfg(&[&b], 4));
    let stale = recv(&mut r.consumer).await;
    let again = recv(&mut r.consumer).await;
    assert_eq!((again.id, again.attempts), (stale.id, 2));
    assert_eq!(b.timed_out(), 1);
    // Same id, same connection: as in nsqd, the first FIN wins and the
    // second gets E_FIN_FAILED, which must not cost the connection.
    stale.finish();
    until(WAIT, "the FIN", || b.finished() == 1).await;
    again.finish();
    until(WAIT, "E_FIN_FAILED", || {
        b.errors().iter().any(|e| e.starts_with("E_FIN_FAILED"))
    })
    .await;
    p.publish(TOPIC, Bytes::from_static(b"next")).await.unwrap();
    let m = recv(&mut r.consumer).await;
    assert_eq!((body(&m), m.attempts), ("next".to_string(), 1));
    m.finish();
    until(WAIT, "the second FIN", || b.finished() == 2).await;
    assert_eq!(b.accepted(), 2, "producer + consumer, no reconnect");
    r.stop().await;
}

#[tokio::test]
async fn consumer_reconnects_after_the_connection_drops() {
    let b = TestNsqd::start().await;
    let p = producer(&b).await;
    let mut r = consume(cfg(&[&b], 4));
    p.publish(TOPIC, Bytes::from_static(b"before"))
        .await
        .unwrap();
    let m = recv(&mut r.consumer).await;
    assert_eq!(body(&m), "before");
    m.finish();
    until(WAIT, "the FIN", || b.finished() == 1).await;

    // Registered as a service registers them (logic and job start a queue).
    chatroom_queue::metrics::init();
    let nsq = &*chatroom_queue::metrics::NSQ;
    let reconnects = nsq.consumer_reconnects.get();
    assert!(nsq.consumer_connections.get() >= 1);
    assert!(nsq.rdy.get() >= 1, "RDY sent is counted");
    assert!(nsq.received.get() >= 1);
    let before = b.accepted();
    b.drop_connections();
    until(WAIT, "a resubscribed consumer", || {
        b.accepted() > before && subscribers(&b) == 1
    })
    .await;
    until(WAIT, "the consumer reconnect counted", || {
        nsq.consumer_reconnects.get() > reconnects
    })
    .await;
    publish_eventually(&p, b"after").await;
    let m = recv(&mut r.consumer).await;
    assert_eq!(body(&m), "after");
    m.finish();
    until(WAIT, "the FIN", || b.finished() == 2).await;
    r.stop().await;
}

#[tokio::test]
async fn consumer_finds_nsqd_through_lookupd() {
    let b = TestNsqd::start().await;
    let p = producer(&b).await;
    p.publish(TOPIC, Bytes::from_static(b"found"))
        .await
        .unwrap();
    let mut r = consume(ConsumerConfig {
        nsqd_tcp_addresses: vec![],
        lookupd_http_addresses: vec![format!("http://{}", b.http_addr())],
        lookupd_poll_interval: Duration::from_millis(100),
        ..cfg(&[], 4)
    });
    let m = recv(&mut r.consumer).await;
    assert_eq!(body(&m), "found");
    m.finish();
    until(WAIT, "the FIN", || b.finished() == 1).await;
    // Polling again must not open a second connection to the same nsqd.
    let polls_later = Instant::now() + Duration::from_millis(400);
    until(WAIT, "a few more polls", || Instant::now() > polls_later).await;
    assert_eq!(subscribers(&b), 1);
    r.stop().await;
}

/// A fresh cluster: nsqlookupd knows the nsqd but not yet the topic (no
/// one has published). The consumer subscribes anyway (its SUB creates the
/// topic), so the first message flows at once rather than at the next poll.
#[tokio::test]
async fn consumer_subscribes_before_the_topic_exists() {
    let b = TestNsqd::start_with(TestNsqdConfig {
        lookup_requires_topic: true,
        ..TestNsqdConfig::default()
    })
    .await;
    let mut r = consume(ConsumerConfig {
        nsqd_tcp_addresses: vec![],
        // Without a scheme, as nsqlookupd addresses are often written.
        lookupd_http_addresses: vec![b.http_addr().to_string()],
        // Longer than the test: a message must not need a second poll.
        lookupd_poll_interval: Duration::from_secs(600),
        ..cfg(&[], 4)
    });
    until(WAIT, "subscribed before any publish", || {
        subscribers(&b) == 1
    })
    .await;
    let p = producer(&b).await;
    p.publish(TOPIC, Bytes::from_static(b"first"))
        .await
        .unwrap();
    let m = recv(&mut r.consumer).await;
    assert_eq!(body(&m), "first");
    m.finish();
    r.stop().await;
}

#[tokio::test]
async fn shutdown_drains_in_flight_messages() {
    let b = TestNsqd::start().await;
    let p = producer(&b).await;
    let bodies: Vec<Bytes> = (0..3).map(|i| Bytes::from(format!("{i}"))).collect();
    p.multi_publish(TOPIC, &bodies).await.unwrap();
    p.close().await;
    until(WAIT, "the producer gone", || b.connections() == 0).await;

    let Running {
        mut consumer,
        stop,
        tracker,
    } = consume(cfg(&[&b], 3));
    let first = recv(&mut consumer).await;
    until(WAIT, "all 3 in flight", || b.in_flight() == 3).await;
    stop.cancel();
    until(WAIT, "RDY 0 + CLS", || {
        b.clients().iter().any(|c| c.closing && c.rdy == 0)
    })
    .await;

    // Already received: still handed out, and still acknowledgeable.
    first.finish();
    let second = recv(&mut consumer).await;
    let third = recv(&mut consumer).await;
    until(WAIT, "the first FIN", || b.finished() == 1).await;
    assert_eq!(b.connections(), 1, "open while messages are in flight");
    second.finish();
    third.requeue(Duration::ZERO);
    let end = tokio::time::timeout(WAIT, consumer.next())
        .await
        .expect("next() returns");
    assert!(end.is_none());
    until(WAIT, "FIN + REQ", || (b.finished(), b.requeued()) == (2, 1)).await;
    until(WAIT, "the connection closed", || b.connections() == 0).await;
    tracker.close();
    tokio::time::timeout(WAIT, tracker.wait())
        .await
        .expect("tasks end");
}

#[tokio::test]
async fn shutdown_gives_up_after_the_drain_timeout() {
    let b = TestNsqd::start().await;
    let p = producer(&b).await;
    p.publish(TOPIC, Bytes::from_static(b"x")).await.unwrap();
    let mut r = consume(ConsumerConfig {
        drain_timeout: Duration::from_millis(300),
        ..cfg(&[&b], 4)
    });
    let held = recv(&mut r.consumer).await;
    let t = Instant::now();
    r.stop.cancel();
    let end = tokio::time::timeout(WAIT, r.consumer.next())
        .await
        .expect("next() returns");
    assert!(end.is_none());
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "closed after {:?}",
        t.elapsed()
    );
    // Unacknowledged: nsqd keeps it in flight for redelivery.
    assert_eq!((b.finished(), b.in_flight()), (0, 1));
    drop(held);
    r.stop().await;
}

#[tokio::test]
async fn heartbeats_are_answered() {
    let b = TestNsqd::start_with(TestNsqdConfig {
        min_heartbeat_interval: Duration::from_millis(50),
        ..TestNsqdConfig::default()
    })
    .await;
    let mut r = consume(ConsumerConfig {
        heartbeat_interval: Duration::from_millis(100),
        ..cfg(&[&b], 4)
    });
    until(WAIT, "subscribed", || subscribers(&b) == 1).await;
    let hb = b.clients()[0].heartbeat_interval;
    assert_eq!(
        hb,
        Some(Duration::from_millis(100)),
        "interval negotiated by IDENTIFY"
    );
    // The broker drops a client after two unanswered heartbeats, so
    // surviving eight intervals means they were answered.
    until(WAIT, "8 heartbeats", || b.heartbeats_sent() >= 8).await;
    assert!(b.nops() >= 6, "nops: {}", b.nops());
    assert_eq!(b.accepted(), 1, "no reconnect");
    let p = producer(&b).await;
    p.publish(TOPIC, Bytes::from_static(b"alive"))
        .await
        .unwrap();
    recv(&mut r.consumer).await.finish();
    r.stop().await;
}

#[tokio::test]
async fn broker_drops_a_client_that_ignores_heartbeats() {
    // Guards the heartbeat test above: it proves nothing if silence is fine.
    let b = TestNsqd::start_with(TestNsqdConfig {
        min_heartbeat_interval: Duration::from_millis(50),
        ..TestNsqdConfig::default()
    })
    .await;
    let mut s = tokio::net::TcpStream::connect(b.tcp_addr()).await.unwrap();
    let ident = br#"{"heartbeat_interval":100}"#;
    let mut out = b"  V2IDENTIFY\n".to_vec();
    out.extend_from_slice(&(ident.len() as u32).to_be_bytes());
    out.extend_from_slice(ident);
    s.write_all(&out).await.unwrap();
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(WAIT, s.read_to_end(&mut sink)).await;
    assert!(closed.is_ok(), "connection was not closed");
    assert!(sink.windows(11).any(|w| w == b"_heartbeat_"));
}

#[tokio::test]
async fn garbage_from_the_broker_causes_a_reconnect_not_a_panic() {
    let b = TestNsqd::start().await;
    let p = producer(&b).await;
    let mut r = consume(cfg(&[&b], 4));
    until(WAIT, "subscribed", || subscribers(&b) == 1).await;
    let garbage: [&[u8]; 6] = [
        &[0xff, 0xff, 0xff, 0xff],                         // absurd size
        &[0, 0, 0, 2, 0, 0],                               // size below the type field
        &[0, 0, 0, 5, 0, 0, 0, 9, b'x'],                   // unknown frame type
        &[0, 0, 0, 10, 0, 0, 0, 2, 1, 2, 3, 4, 5, 6],      // message shorter than its header
        &[0, 0, 0, 8, 0, 0, 0, 0, b'W', b'H', b'A', b'T'], // a response nobody asked for
        b"HTTP/1.1 400 Bad Request\r\n\r\n",
    ];
    for (i, g) in garbage.iter().enumerate() {
        let before = b.accepted();
        b.send_raw(g);
        until(WAIT, &format!("reconnect after garbage #{i}"), || {
            b.accepted() > before && subscribers(&b) == 1
        })
        .await;
        publish_eventually(&p, b"still works").await;
        let m = recv(&mut r.consumer).await;
        assert_eq!(body(&m), "still works");
        m.finish();
    }
    r.stop().await;
}

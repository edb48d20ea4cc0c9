//! Issue 13: a fresh cluster's first messages must not arrive as one burst
//! that cuts healthy sessions as "too slow". From a fresh start (nobody
//! created the topic; with a real nsqd when `NSQD_BIN` is set, else the test
//! broker behaving like nsqlookupd), 100 sessions per conn node read a room
//! while `POST /msg` (IMPORTANT) runs at 40 msg/s from the first second:
//! nobody is cut, every accepted message reaches every session once, in
//! order, and the first one arrives within a second.

use std::sync::Arc;
use std::time::Duration;

use chatroom_common::proto::protocol::{BroadcastRoomReq, PackageType};
use chatroom_tests::client::{Client, Event};
use chatroom_tests::cluster::{Queue, T, start_cluster, start_nsqd};
use chatroom_tests::http;
use chatroom_tests::nsq_broker::{TestNsqd, TestNsqdConfig};
use prost::Message as _;
use tokio::time::Instant;

const PER_NODE: usize = 100;
const RATE: u64 = 40;
const MESSAGES: usize = 200;
const ROOM: &str = "fresh";

async fn queue() -> Queue {
    if let Some(q) = start_nsqd().await {
        eprintln!("REAL-NSQ: first-burst test running against a real nsqd + nsqlookupd");
        return q;
    }
    // Like nsqlookupd: the topic is unknown to `/lookup` until someone
    // publishes to it, so only a consumer that subscribes without waiting
    // for the topic gets the first messages at once.
    Queue::Broker(
        TestNsqd::start_with(TestNsqdConfig {
            lookup_requires_topic: true,
            ..TestNsqdConfig::default()
        })
        .await,
    )
}

/// A session's view of the run: the payloads in arrival order and when
/// `m0` arrived.
struct Seen {
    payloads: Vec<String>,
    first_at: Option<Instant>,
}

async fn read_all(mut c: Client, deadline: Instant) -> anyhow::Result<Seen> {
    let mut seen = Seen {
        payloads: Vec::with_capacity(MESSAGES),
        first_at: None,
    };
    while seen.payloads.len() < MESSAGES {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.next_event(left).await {
            Ok(Event::Reply(r)) if r.r#type == PackageType::Message as i32 => {
                let m = BroadcastRoomReq::decode(r.data)?;
                for part in chatroom_common::batch::decode(&m.data) {
                    let p = String::from_utf8_lossy(part?).into_owned();
                    if p == "m0" {
                        seen.first_at = Some(Instant::now());
                    }
                    seen.payloads.push(p);
                }
            }
            Ok(Event::Reply(_)) => {}
            Ok(Event::Closed(f)) => {
                anyhow::bail!("cut after {} messages: {f:?}", seen.payloads.len())
            }
            Err(e) => anyhow::bail!("got {} of {MESSAGES}: {e}", seen.payloads.len()),
        }
    }
    Ok(seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_cluster_delivers_its_first_messages_without_a_burst() {
    let c = start_cluster(queue().await).await;
    let publisher = http::token(&c.http, "publisher").await.unwrap();
    let mut clients = Vec::new();
    for i in 0..PER_NODE * 2 {
        let url = if i % 2 == 0 { &c.ws_a } else { &c.ws_b };
        let tok = http::token(&c.http, &format!("reader-{i}")).await.unwrap();
        match Client::signed_in_eventually(url, &tok, ROOM, T).await {
            Ok(cl) => clients.push(cl),
            Err(e) => panic!("reader {i}: {e:#}\n{}", c.dump()),
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let readers: Vec<_> = clients
        .into_iter()
        .map(|cl| tokio::spawn(read_all(cl, deadline)))
        .collect();

    // The cluster's first messages: nothing was published before.
    let url = Arc::new(format!("{}/msg", c.http));
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / RATE));
    let mut first_sent = None;
    for i in 0..MESSAGES {
        tick.tick().await;
        let sent = Instant::now();
        let r = http::post_json(
            &url,
            Some(&publisher),
            serde_json::json!({"room_id": ROOM, "msg": format!("m{i}")}),
        )
        .await
        .unwrap();
        assert_eq!(r.json["code"], 1, "POST /msg {i}: {}", r.json);
        first_sent.get_or_insert(sent);
    }
    let first_sent = first_sent.unwrap();

    let want: Vec<String> = (0..MESSAGES).map(|i| format!("m{i}")).collect();
    let mut worst_first = Duration::ZERO;
    for (i, r) in readers.into_iter().enumerate() {
        let seen = match r.await.unwrap() {
            Ok(s) => s,
            Err(e) => panic!("reader {i}: {e:#}\n{}", c.dump()),
        };
        assert_eq!(
            seen.payloads, want,
            "reader {i}: every accepted message once, in order"
        );
        let first = seen.first_at.expect("m0 arrived") - first_sent;
        worst_first = worst_first.max(first);
    }
    eprintln!(
        "first message reached all {} sessions within {worst_first:?}",
        PER_NODE * 2
    );
    assert!(
        worst_first < Duration::from_secs(1),
        "the first message took {worst_first:?} to reach every session\n{}",
        c.dump()
    );
}

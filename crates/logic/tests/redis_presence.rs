//! Redis presence against a real Redis named by `CHATROOM_TEST_REDIS`
//! (e.g. `redis://127.0.0.1:63790/`). Without it these tests fail: a
//! silently skipped test would hide a broken cluster mode.
//! Every test uses its own key prefix and deletes its keys afterwards.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use chatroom_common::proto::logic::{HeartbeatReq, ReportOnlineReq, SignInReq, SignOutReq};
use chatroom_logic::config::{PresenceConfig, PresenceKind};
use chatroom_logic::presence::{Presence, RoomCounts, Session};
use chatroom_tests::wait::eventually;
use redis::AsyncCommands;
use support::{DEADLINE, Node};

fn redis_url() -> String {
    std::env::var("CHATROOM_TEST_REDIS").unwrap_or_else(|_| {
        panic!(
            "CHATROOM_TEST_REDIS is not set: these tests need a Redis, e.g. \
             CHATROOM_TEST_REDIS=redis://127.0.0.1:63790/ cargo test -p chatroom-logic"
        )
    })
}

fn unique_prefix(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("chatroom-test:{test}:{}:{nanos}:", std::process::id())
}

fn presence_config(prefix: &str, online_ttl_secs: u64) -> PresenceConfig {
    PresenceConfig {
        kind: PresenceKind::Redis,
        url: redis_url(),
        prefix: prefix.to_string(),
        session_ttl: Duration::from_secs(90),
        online_ttl: Duration::from_secs(online_ttl_secs),
    }
}

async fn raw() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url())
        .expect("CHATROOM_TEST_REDIS is a Redis URL")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to CHATROOM_TEST_REDIS")
}

/// Deletes every key under `prefix`.
async fn cleanup(prefix: &str) {
    let mut r = raw().await;
    let keys: Vec<String> = r.keys(format!("{prefix}*")).await.unwrap_or_default();
    if !keys.is_empty() {
        let _: Result<(), _> = r.del(keys).await;
    }
}

fn counts(pairs: &[(&str, u32)]) -> RoomCounts {
    pairs.iter().map(|(r, n)| (r.to_string(), *n)).collect()
}

fn session(key: &str, server: &str, room: &str) -> Session {
    Session {
        uid: "alice".into(),
        key: key.into(),
        server: server.into(),
        room: room.into(),
    }
}

#[tokio::test]
async fn sessions_live_in_a_user_hash_with_expiry() {
    let prefix = unique_prefix("sessions");
    let p = Presence::connect(&presence_config(&prefix, 15))
        .await
        .expect("connect to CHATROOM_TEST_REDIS");
    let mut r = raw().await;
    let user_key = format!("{prefix}user:alice");

    p.sign_in(&session("k1", "conn-a", "room-1")).await.unwrap();
    p.sign_in(&session("k2", "conn-b", "room|2")).await.unwrap();
    let v: String = r.hget(&user_key, "k1").await.unwrap();
    assert_eq!(v, "conn-a|room-1", "layout is <server>|<room>");
    let ttl: i64 = r.ttl(&user_key).await.unwrap();
    assert!((1..=90).contains(&ttl), "the user hash expires (ttl {ttl})");
    assert_eq!(
        p.sessions("alice").await.unwrap(),
        vec![
            session("k1", "conn-a", "room-1"),
            session("k2", "conn-b", "room|2")
        ]
    );

    // A heartbeat renews the expiry.
    let _: () = r.expire(&user_key, 5).await.unwrap();
    assert!(p.heartbeat("alice", "k1").await.unwrap());
    let ttl: i64 = r.ttl(&user_key).await.unwrap();
    assert!(ttl > 5, "heartbeat renewed the ttl (now {ttl})");
    assert!(!p.heartbeat("alice", "unknown").await.unwrap());

    p.sign_out("alice", "k1").await.unwrap();
    p.sign_out("alice", "k2").await.unwrap();
    assert!(p.sessions("alice").await.unwrap().is_empty());
    let exists: bool = r.exists(&user_key).await.unwrap();
    assert!(!exists, "an empty hash disappears");
    cleanup(&prefix).await;
}

#[tokio::test]
async fn online_totals_sum_servers_and_drop_expired_ones() {
    let prefix = unique_prefix("online");
    let p = Presence::connect(&presence_config(&prefix, 2))
        .await
        .expect("connect to CHATROOM_TEST_REDIS");
    let mut r = raw().await;

    p.report_online("conn-a", &counts(&[("r1", 3), ("r2", 1)]))
        .await
        .unwrap();
    let t = p
        .report_online("conn-b", &counts(&[("r1", 4), ("r3", 0)]))
        .await
        .unwrap();
    let want: HashMap<String, u64> = [("r1".into(), 7), ("r3".into(), 0)].into();
    assert_eq!(t, want);
    let servers: Vec<String> = r.smembers(format!("{prefix}online:servers")).await.unwrap();
    assert_eq!(servers.len(), 2, "{servers:?}");

    // A new report replaces the old one.
    let t = p
        .report_online("conn-a", &counts(&[("r2", 5)]))
        .await
        .unwrap();
    assert_eq!(t["r2"], 5);
    let t = p
        .report_online("conn-b", &counts(&[("r1", 4), ("r2", 0)]))
        .await
        .unwrap();
    assert_eq!((t["r1"], t["r2"]), (4, 5));

    // conn-a stops reporting: its hash expires and it leaves the set.
    eventually(DEADLINE, "conn-a to expire", || {
        let p = p.clone();
        async move {
            let t = p
                .report_online("conn-b", &counts(&[("r2", 0)]))
                .await
                .ok()?;
            (t["r2"] == 0).then_some(())
        }
    })
    .await
    .unwrap();
    let servers: Vec<String> = r.smembers(format!("{prefix}online:servers")).await.unwrap();
    assert!(!servers.contains(&"conn-a".to_string()), "{servers:?}");
    cleanup(&prefix).await;
}

#[tokio::test]
async fn logic_uses_redis_and_turns_its_failures_into_grpc_errors() {
    let prefix = unique_prefix("node");
    let url = redis_url();
    let node = Node::start(
        &[
            ("CHATROOM__PRESENCE__KIND", "redis"),
            ("CHATROOM__PRESENCE__URL", url.as_str()),
            ("CHATROOM__PRESENCE__PREFIX", prefix.as_str()),
        ],
        16,
    )
    .await;
    let mut c = node.grpc().await;
    let mut r = raw().await;

    let ok = c
        .sign_in(SignInReq {
            server: "conn-1".into(),
            token: node.token("alice"),
            room_id: "room-1".into(),
            uid: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.code, 0, "{}", ok.msg);
    let v: Option<String> = r
        .hget(format!("{prefix}user:alice"), &ok.key)
        .await
        .unwrap();
    assert_eq!(
        v.as_deref(),
        Some("conn-1|room-1"),
        "sign-in is recorded in Redis"
    );
    // Redis lost it (a restart): the session's next heartbeat records it
    // again, on the server that beats for it.
    let _: () = r.del(format!("{prefix}user:alice")).await.unwrap();
    c.heartbeat(HeartbeatReq {
        server: "conn-1".into(),
        uid: "alice".into(),
        key: ok.key.clone(),
    })
    .await
    .unwrap();
    let v: Option<String> = r
        .hget(format!("{prefix}user:alice"), &ok.key)
        .await
        .unwrap();
    assert_eq!(
        v.as_deref(),
        Some("conn-1|"),
        "a heartbeat records a lost session again"
    );
    c.sign_out(SignOutReq {
        server: "conn-1".into(),
        uid: "alice".into(),
        key: ok.key.clone(),
    })
    .await
    .unwrap();
    let v: Option<String> = r
        .hget(format!("{prefix}user:alice"), &ok.key)
        .await
        .unwrap();
    assert_eq!(v, None, "sign-out removes it");

    // Make the store fail: a key of the wrong type makes HSET / SADD error.
    let _: () = r
        .set(format!("{prefix}user:mallory"), "not a hash")
        .await
        .unwrap();
    let err = c
        .sign_in(SignInReq {
            server: "conn-1".into(),
            token: node.token("mallory"),
            room_id: "room-1".into(),
            uid: String::new(),
        })
        .await
        .expect_err("a failing presence store must fail sign-in");
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert_eq!(err.message(), "presence store unavailable, try again");
    let _: () = r
        .set(format!("{prefix}online:servers"), "not a set")
        .await
        .unwrap();
    let err = c
        .report_online(ReportOnlineReq {
            server: "conn-1".into(),
            rooms: [("room-1".to_string(), 1)].into(),
        })
        .await
        .expect_err("a failing presence store must fail the report");
    assert_eq!(err.code(), tonic::Code::Unavailable);

    // The node is still fine for everyone else.
    let ok = c
        .sign_in(SignInReq {
            server: "conn-1".into(),
            token: node.token("bob"),
            room_id: "room-1".into(),
            uid: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.code, 0);
    node.stop().await;
    cleanup(&prefix).await;
}

#[tokio::test]
async fn an_unreachable_redis_stops_start_up_with_an_error() {
    // Uses the variable like the others so a missing Redis setup is reported.
    let _ = redis_url();
    let mut cfg = presence_config("chatroom-test:unreachable:", 15);
    // Port 1 on localhost: nothing listens there.
    cfg.url = "redis://127.0.0.1:1/".into();
    let r = tokio::time::timeout(Duration::from_secs(20), Presence::connect(&cfg))
        .await
        .expect("connect gives up in time");
    assert!(r.is_err());
}

#[tokio::test]
async fn servers_of_users_for_im_delivery() {
    let prefix = unique_prefix("servers");
    let p = Presence::connect(&presence_config(&prefix, 15))
        .await
        .expect("connect to CHATROOM_TEST_REDIS");
    let s = |uid: &str, key: &str, server: &str| Session {
        uid: uid.into(),
        key: key.into(),
        server: server.into(),
        room: String::new(),
    };
    assert!(p.servers_of("10001").await.unwrap().is_empty());
    for (uid, key, server) in [
        ("10001", "k1", "conn-b"),
        ("10001", "k2", "conn-a"),
        ("10001", "k3", "conn-b"),
        ("10002", "k4", "conn-c"),
    ] {
        p.sign_in(&s(uid, key, server)).await.unwrap();
    }
    assert_eq!(p.servers_of("10001").await.unwrap(), ["conn-a", "conn-b"]);
    let many = p
        .servers_of_many(&["10002".into(), "10003".into(), "10001".into()])
        .await
        .unwrap();
    assert_eq!(
        many,
        vec![
            vec!["conn-c".to_string()],
            vec![],
            vec!["conn-a".to_string(), "conn-b".to_string()]
        ]
    );
    p.sign_out("10002", "k4").await.unwrap();
    assert!(p.servers_of("10002").await.unwrap().is_empty());
    assert!(p.servers_of_many(&[]).await.unwrap().is_empty());
    cleanup(&prefix).await;
}

/// Room streams in Redis: two logic nodes (two `Streams` on one Redis)
/// never hand out the same offset, history is kept and bounded, and a lost
/// stream restarts with a newer epoch.
#[tokio::test]
async fn redis_streams_number_once_across_nodes_and_keep_history() {
    use bytes::Bytes;
    use chatroom_logic::stream::{Entry, StreamConfig, Streams};
    let prefix = unique_prefix("streams");
    let p = presence_config(&prefix, 15);
    let sc = StreamConfig {
        history_messages: 5,
        history_bytes: 1 << 20,
        idle_ttl: Duration::from_secs(60),
    };
    let a = Streams::connect(&p, &sc).await.unwrap();
    let b = Streams::connect(&p, &sc).await.unwrap();
    let e = |s: &str| Entry {
        level: 1,
        data: Bytes::copy_from_slice(s.as_bytes()),
    };
    let n1 = a.append("r", &[e("a1"), e("a2")]).await.unwrap();
    let n2 = b.append("r", &[e("b1")]).await.unwrap();
    let n3 = a
        .append("r", &[e("a3"), e("a4"), e("a5"), e("a6")])
        .await
        .unwrap();
    assert_eq!((n1.first, n2.first, n3.first), (1, 3, 4));
    assert!(n1.epoch > 0 && n1.epoch == n2.epoch && n2.epoch == n3.epoch);
    // Kept: offsets 3..=7 (five).
    let h = b.history("r", n1.epoch, 3, 0, 100).await.unwrap();
    assert!(h.complete);
    let got: Vec<(u64, Vec<u8>)> = h
        .entries
        .iter()
        .map(|e| (e.offset, e.data.to_vec()))
        .collect();
    assert_eq!(
        got,
        vec![
            (4, b"a3".to_vec()),
            (5, b"a4".to_vec()),
            (6, b"a5".to_vec()),
            (7, b"a6".to_vec())
        ]
    );
    assert_eq!(h.entries[0].level, 1);
    let h = b.history("r", n1.epoch, 1, 0, 100).await.unwrap();
    assert!(!h.complete, "offset 2 was trimmed");
    assert_eq!(h.entries.first().map(|e| e.offset), Some(3));
    let h = b.history("r", n1.epoch, 4, 5, 100).await.unwrap();
    assert_eq!(
        h.entries.iter().map(|e| e.offset).collect::<Vec<_>>(),
        vec![5]
    );
    let h = b.history("r", n1.epoch + 1, 4, 0, 100).await.unwrap();
    assert!(!h.complete && h.entries.is_empty());
    // Redis loses the room: a new stream, a newer epoch, offsets from 1.
    let mut r = raw().await;
    let keys: Vec<String> = r.keys(format!("{prefix}*")).await.unwrap();
    let _: () = r.del(&keys).await.unwrap();
    // Epochs are milliseconds: a restart within the same one is not newer.
    while chatroom_logic::id::now_ms() <= n1.epoch {
        tokio::task::yield_now().await;
    }
    let n4 = b.append("r", &[e("new")]).await.unwrap();
    assert_eq!(n4.first, 1);
    assert!(n4.epoch > n1.epoch, "{} > {}", n4.epoch, n1.epoch);
    let keys: Vec<String> = r.keys(format!("{prefix}*")).await.unwrap();
    let _: () = r.del(&keys).await.unwrap();
}

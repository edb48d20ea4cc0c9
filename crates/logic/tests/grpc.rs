//! The Logic gRPC service end to end: a real node on 127.0.0.1:0, the
//! generated client, and the memory queue to see what was published.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use chatroom_common::proto::logic::{
    HeartbeatReq, ReceiveManyReq, ReceiveReq, ReportOnlineReq, SignInReq, SignOutReq,
};
use chatroom_common::proto::protocol::{BroadcastRoomReq, MsgLevel};
use chatroom_common::token::Tokens;
use chatroom_tests::wait::eventually;
use support::{DEADLINE, Node};

fn sign_in(token: &str, room: &str) -> SignInReq {
    SignInReq {
        server: "conn-1".into(),
        token: token.into(),
        room_id: room.into(),
        uid: String::new(),
    }
}

fn receive(uid: &str, room: &str, level: MsgLevel, data: &[u8]) -> ReceiveReq {
    ReceiveReq {
        server: "conn-1".into(),
        uid: uid.into(),
        msg: Some(BroadcastRoomReq {
            room_id: room.into(),
            msg_lv: level as i32,
            data: Bytes::copy_from_slice(data),
            ..Default::default()
        }),
    }
}

#[tokio::test]
async fn sign_in_accepts_good_tokens_and_explains_bad_ones() {
    let node = Node::start(&[], 16).await;
    let mut c = node.grpc().await;

    let ok = c
        .sign_in(sign_in(&node.token("alice"), "room-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((ok.code, ok.uid.as_str()), (0, "alice"));
    assert_eq!(ok.heartbeat_secs, 30);
    assert!(ok.key.starts_with("conn-1-"), "key {}", ok.key);
    let again = c
        .sign_in(sign_in(&node.token("alice"), "room-1"))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(ok.key, again.key, "every connection gets its own key");

    let bearer = format!("Bearer {}", node.token("bob"));
    assert_eq!(
        c.sign_in(sign_in(&bearer, "r"))
            .await
            .unwrap()
            .into_inner()
            .uid,
        "bob"
    );

    let expired = node.tokens.issue_for("alice", Duration::ZERO).unwrap();
    let other = Tokens::new(b"some-other-secret-entirely", Duration::from_secs(60))
        .issue("alice")
        .unwrap();
    let cases = [
        (String::new(), "room-1", 100, "login needed: token is empty"),
        (
            "garbage".to_string(),
            "room-1",
            100,
            "login needed: token is invalid",
        ),
        (expired, "room-1", 100, "login needed: token has expired"),
        (other, "room-1", 100, "login needed: token is invalid"),
        // Community rooms are joined through membership, never by name.
        (
            node.token("alice"),
            "c:1001",
            403,
            "reserved for communities",
        ),
        (
            node.token("alice"),
            &"x".repeat(65),
            1002,
            "room id is longer than 64 bytes",
        ),
        (node.token("alice"), "bad\nroom", 1002, "control characters"),
    ];
    for (token, room, code, msg) in cases {
        let r = c.sign_in(sign_in(&token, room)).await.unwrap().into_inner();
        assert_eq!(r.code, code, "{token:?}/{room:?}: {}", r.msg);
        assert!(
            r.msg.starts_with(msg) || r.msg.contains(msg),
            "{:?} vs {msg:?}",
            r.msg
        );
        assert!(r.uid.is_empty() && r.key.is_empty());
    }

    // An IM session (/chat) signs in without a room.
    let im = c
        .sign_in(sign_in(&node.token("alice"), ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((im.code, im.uid.as_str()), (0, "alice"), "{}", im.msg);
    assert!(
        im.rooms.is_empty(),
        "alice is no IM account: {:?}",
        im.rooms
    );

    // A conn node that sends no server id is a bug on its side: a gRPC error.
    let mut bad = sign_in(&node.token("alice"), "r");
    bad.server.clear();
    let err = c.sign_in(bad).await.expect_err("empty server must fail");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    // The session calls accept what sign-in gave out, and refuse junk.
    c.heartbeat(HeartbeatReq {
        server: "conn-1".into(),
        uid: "alice".into(),
        key: ok.key.clone(),
    })
    .await
    .unwrap();
    c.sign_out(SignOutReq {
        server: "conn-1".into(),
        uid: "alice".into(),
        key: ok.key.clone(),
    })
    .await
    .unwrap();
    let err = c
        .sign_out(SignOutReq {
            server: "conn-1".into(),
            uid: String::new(),
            key: ok.key,
        })
        .await
        .expect_err("empty uid must fail");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    node.stop().await;
}

#[tokio::test]
async fn receive_publishes_room_messages_with_ids() {
    let mut node = Node::start(&[], 16).await;
    let mut c = node.grpc().await;
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;

    let r1 = c
        .receive(receive("alice", "room-1", MsgLevel::Normal, b"{\"t\":1}"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r1.code, r1.msg.as_str()), (0, "ok"));
    let r2 = c
        .receive(receive("bob", "room-2", MsgLevel::Important, b"red packet"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r2.code, 0);
    assert!(r2.id > r1.id, "ids are time-ordered");

    let m1 = node.next_published().await;
    assert_eq!(m1.id, r1.id);
    assert_eq!((m1.uid.as_str(), m1.room_id.as_str()), ("alice", "room-1"));
    assert_eq!(m1.level, MsgLevel::Normal as i32);
    assert_eq!(&m1.data[..], b"{\"t\":1}");
    assert!(
        m1.ts_ms >= before && m1.ts_ms < before + 60_000,
        "ts_ms {}",
        m1.ts_ms
    );
    let m2 = node.next_published().await;
    assert_eq!(
        (m2.id, m2.uid.as_str(), m2.room_id.as_str()),
        (r2.id, "bob", "room-2")
    );
    assert_eq!(m2.level, MsgLevel::Important as i32);
    assert_eq!(&m2.data[..], b"red packet");

    // Refused messages get a code and a reason, and are not published.
    let mut no_msg = receive("alice", "r", MsgLevel::Normal, b"x");
    no_msg.msg = None;
    let mut bad_level = receive("alice", "r", MsgLevel::Normal, b"x");
    if let Some(m) = bad_level.msg.as_mut() {
        m.msg_lv = 7;
    }
    let cases = [
        (
            receive("alice", "", MsgLevel::Normal, b"x"),
            1002,
            "room id is empty",
        ),
        (
            receive("alice", &"r".repeat(65), MsgLevel::Normal, b"x"),
            1002,
            "room id is longer",
        ),
        (
            receive("alice", "r", MsgLevel::Normal, b""),
            1004,
            "msg is missing",
        ),
        (
            receive("alice", "r", MsgLevel::Normal, &vec![b'a'; 16 * 1024 + 1]),
            1003,
            "message is larger than 16384 bytes",
        ),
        (bad_level, 1004, "unknown message level 7"),
        (no_msg, 1004, "msg is missing"),
    ];
    for (req, code, msg) in cases {
        let r = c.receive(req).await.unwrap().into_inner();
        assert_eq!((r.code, r.id), (code, 0), "{}", r.msg);
        assert!(r.msg.starts_with(msg), "{:?} vs {msg:?}", r.msg);
    }
    assert_eq!(
        node.queue.depth(),
        0,
        "refused messages must not be published"
    );

    // Exactly the limit is fine.
    let r = c
        .receive(receive(
            "alice",
            &"r".repeat(64),
            MsgLevel::Normal,
            &vec![b'a'; 16 * 1024],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.code, 0, "{}", r.msg);
    assert_eq!(node.next_published().await.id, r.id);

    node.stop().await;
}

#[tokio::test]
async fn receive_says_try_again_when_the_queue_is_full() {
    let mut node = Node::start(&[], 1).await;
    let mut c = node.grpc().await;
    let ok = c
        .receive(receive("alice", "r", MsgLevel::Normal, b"1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.code, 0);
    let full = c
        .receive(receive("alice", "r", MsgLevel::Normal, b"2"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (full.code, full.msg.as_str()),
        (503, "server busy, try again")
    );
    // Once job catches up, messages flow again.
    assert_eq!(node.next_published().await.id, ok.id);
    let again = c
        .receive(receive("alice", "r", MsgLevel::Normal, b"3"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.code, 0, "{}", again.msg);
    node.stop().await;
}

fn report(server: &str, rooms: &[(&str, u32)]) -> ReportOnlineReq {
    ReportOnlineReq {
        server: server.into(),
        rooms: rooms.iter().map(|(r, n)| (r.to_string(), *n)).collect(),
    }
}

#[tokio::test]
async fn report_online_sums_over_servers() {
    let node = Node::start(&[], 16).await;
    let mut c = node.grpc().await;

    c.report_online(report("conn-a", &[("r1", 3), ("r2", 1)]))
        .await
        .unwrap();
    let totals = c
        .report_online(report("conn-b", &[("r1", 4), ("r3", 2)]))
        .await
        .unwrap()
        .into_inner()
        .rooms;
    let want: HashMap<String, u64> = [("r1".to_string(), 7), ("r3".to_string(), 2)].into();
    assert_eq!(totals, want, "only the asked rooms, summed over servers");

    let totals = c
        .report_online(report("conn-a", &[("r1", 3), ("r2", 1)]))
        .await
        .unwrap()
        .into_inner()
        .rooms;
    assert_eq!((totals["r1"], totals["r2"]), (7, 1));

    let err = c
        .report_online(report("", &[("r1", 1)]))
        .await
        .expect_err("no server id");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    node.stop().await;
}

#[tokio::test]
async fn report_online_forgets_servers_that_stop_reporting() {
    let node = Node::start(&[("CHATROOM__PRESENCE__ONLINE_TTL", "2s")], 16).await;
    let mut c = node.grpc().await;
    c.report_online(report("conn-a", &[("r1", 3), ("r2", 1)]))
        .await
        .unwrap();
    let t = c
        .report_online(report("conn-b", &[("r1", 4), ("r2", 0)]))
        .await
        .unwrap()
        .into_inner()
        .rooms;
    assert_eq!((t["r1"], t["r2"]), (7, 1), "both servers count at first");

    // conn-a goes quiet; conn-b keeps reporting and soon sees only itself.
    let r1 = eventually(DEADLINE, "conn-a's counts to expire", || {
        let mut c = c.clone();
        async move {
            let t = c
                .report_online(report("conn-b", &[("r1", 4), ("r2", 0)]))
                .await
                .ok()?
                .into_inner()
                .rooms;
            (t["r2"] == 0).then_some(t["r1"])
        }
    })
    .await
    .unwrap();
    assert_eq!(r1, 4);
    node.stop().await;
}

#[tokio::test]
async fn receive_many_judges_each_message_and_answers_in_order() {
    let mut node = Node::start(&[], 16).await;
    let mut c = node.grpc().await;

    let msgs = vec![
        receive("alice", "room-1", MsgLevel::Normal, b"a1"),
        receive("bob", "", MsgLevel::Normal, b"refused: no room"),
        receive("carol", "room-2", MsgLevel::Important, b"c1"),
    ];
    let r = c
        .receive_many(ReceiveManyReq { msgs })
        .await
        .unwrap()
        .into_inner()
        .replies;
    assert_eq!(r.len(), 3);
    assert_eq!((r[0].code, r[1].code, r[2].code), (0, 1002, 0));
    assert!(r[1].msg.starts_with("room id is empty"), "{}", r[1].msg);
    assert_ne!(r[0].id, r[2].id);
    let mut published = [node.next_published().await, node.next_published().await];
    published.sort_by_key(|m| m.id);
    let mut want = [(r[0].id, "alice", "a1"), (r[2].id, "carol", "c1")];
    want.sort();
    for (m, (id, uid, data)) in published.iter().zip(want) {
        assert_eq!(
            (m.id, m.uid.as_str(), &m.data[..]),
            (id, uid, data.as_bytes())
        );
    }
    assert_eq!(node.queue.depth(), 0, "the refused one was not published");

    // What conn got wrong refuses the whole call, and nothing is published.
    let mut no_server = receive("dave", "room-1", MsgLevel::Normal, b"d1");
    no_server.server.clear();
    let err = c
        .receive_many(ReceiveManyReq {
            msgs: vec![
                receive("erin", "room-1", MsgLevel::Normal, b"e1"),
                no_server,
            ],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(node.queue.depth(), 0);
    let too_many = (0..4097)
        .map(|_| receive("erin", "room-1", MsgLevel::Normal, b"e"))
        .collect();
    let err = c
        .receive_many(ReceiveManyReq { msgs: too_many })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(node.queue.depth(), 0);

    node.stop().await;
}

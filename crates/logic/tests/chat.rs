//! The IM gRPC path end to end, against SQLite and PostgreSQL: `SignIn`
//! (communities as rooms, uid check, reserved rooms), `Chat` (rules, acks,
//! what is published on the queue, stored before delivery), and the offline
//! inbox through `Pending` / `AckPending`.

mod support;

use chatroom_common::proto::logic::logic_client::LogicClient;
use chatroom_common::proto::logic::{
    AckPendingReq, ChatReply, ChatReq, PendingReq, SignInReply, SignInReq, UndeliveredReq,
};
use chatroom_common::proto::protocol::{ChatMsg, ChatStatus, MsgLevel};
use chatroom_common::proto::queue::queue_msg::Body;
use prost::Message;
use serde_json::Value;
use support::{Db, Node};
use tonic::transport::Channel;

async fn sign_in(
    c: &mut LogicClient<Channel>,
    server: &str,
    token: &str,
    uid: &str,
) -> SignInReply {
    c.sign_in(SignInReq {
        server: server.into(),
        token: token.into(),
        room_id: String::new(),
        uid: uid.into(),
    })
    .await
    .expect("sign_in")
    .into_inner()
}

async fn chat(c: &mut LogicClient<Channel>, uid: i64, m: ChatMsg) -> ChatReply {
    c.chat(ChatReq {
        server: "conn-1".into(),
        uid: uid.to_string(),
        msg: Some(m),
    })
    .await
    .expect("chat")
    .into_inner()
}

fn text(cmd: i32, dst: i64, body: &str) -> ChatMsg {
    ChatMsg {
        id: 77,
        cmd,
        dstid: dst,
        media: 1,
        content: body.into(),
        ..ChatMsg::default()
    }
}

/// Three registered users: a and b are friends, c is nobody's friend; a owns
/// a community that b joined.
struct World {
    node: Node,
    a: (i64, String),
    b: (i64, String),
    c: (i64, String),
    community: i64,
}

async fn world(db: Db, env: &[(&str, &str)]) -> World {
    let node = Node::start_db(db, env, 64).await;
    let a = node.user("13800000001").await;
    let b = node.user("13800000002").await;
    let c = node.user("13800000003").await;
    let (_, r) = node
        .form(
            "/contact/addfriend",
            Some(&a.1),
            &[("dstid", &b.0.to_string())],
        )
        .await;
    assert_eq!(r["code"], 0, "{r}");
    let (_, r) = node
        .form("/contact/createcommunity", Some(&a.1), &[("name", "team")])
        .await;
    assert_eq!(r["code"], 0, "{r}");
    let community = r["data"]["id"].as_i64().expect("community id");
    let (_, r) = node
        .form(
            "/contact/joincommunity",
            Some(&b.1),
            &[("dstid", &community.to_string())],
        )
        .await;
    assert_eq!(r["code"], 0, "{r}");
    World {
        node,
        a,
        b,
        c,
        community,
    }
}

async fn history(node: &Node, token: &str, dst: i64, cmd: i32) -> Vec<Value> {
    let (_, r) = node
        .form(
            "/chat/history",
            Some(token),
            &[("dstid", &dst.to_string()), ("cmd", &cmd.to_string())],
        )
        .await;
    assert_eq!(r["code"], 0, "{r}");
    r["rows"].as_array().expect("rows").clone()
}

async fn sign_in_rooms_and_checks(db: Db) {
    let w = world(db, &[]).await;
    let mut c = w.node.grpc().await;
    let room = format!("c:{}", w.community);

    let r = sign_in(&mut c, "conn-1", &w.b.1, &w.b.0.to_string()).await;
    assert_eq!((r.code, r.uid.clone()), (0, w.b.0.to_string()), "{}", r.msg);
    assert_eq!(
        r.rooms,
        vec![room.clone()],
        "members get their community rooms"
    );
    let r = sign_in(&mut c, "conn-1", &w.c.1, "").await;
    assert_eq!(r.code, 0);
    assert!(r.rooms.is_empty(), "c is in no community");

    let r = sign_in(&mut c, "conn-1", &w.b.1, &w.a.0.to_string()).await;
    assert_eq!((r.code, r.msg.as_str()), (100, "id does not match token"));
    assert!(r.key.is_empty() && r.rooms.is_empty());

    // Nobody names a community room at sign-in, not even a member.
    let r = c
        .sign_in(SignInReq {
            server: "conn-1".into(),
            token: w.b.1.clone(),
            room_id: room,
            uid: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.code, 403, "{}", r.msg);
    assert!(r.msg.contains("reserved"), "{}", r.msg);
    w.node.stop().await;
}
both!(sign_in_rooms_and_checks);

async fn chat_rules(db: Db) {
    // Refused messages count against the rate limit too: room for all cases.
    let mut w = world(db, &[("CHATROOM__IM__CHAT_BURST", "100")]).await;
    let mut c = w.node.grpc().await;
    let (a, b, cc) = (w.a.0, w.b.0, w.c.0);

    let cases: Vec<(i64, ChatMsg, i32, &str)> = vec![
        (a, text(10, cc, "hi"), 403, "friends"),
        (cc, text(11, w.community, "hi"), 403, "joined"),
        (a, text(10, 999_999, "hi"), 403, "friends"),
        (a, text(12, b, "hi"), 403, "operators"),
        (a, text(13, b, "hi"), 400, "unknown cmd"),
        (a, text(10, 0, "hi"), 400, "dstid"),
        (
            a,
            ChatMsg {
                media: 55,
                ..text(10, b, "hi")
            },
            400,
            "unknown media",
        ),
        (a, text(10, b, ""), 400, "media 1 needs content"),
        (
            a,
            ChatMsg {
                media: 2,
                ..text(10, b, "title")
            },
            400,
            "media 2 needs",
        ),
        (
            a,
            ChatMsg {
                media: 3,
                url: "https://x.io/v.mp3".into(),
                ..text(10, b, "")
            },
            400,
            "media 3 needs",
        ),
        (
            a,
            ChatMsg {
                media: 4,
                ..text(10, b, "")
            },
            400,
            "media 4 needs url",
        ),
        (
            a,
            ChatMsg {
                media: 5,
                amount: 0,
                ..text(10, b, "")
            },
            400,
            "media 5 needs",
        ),
        (
            a,
            ChatMsg {
                media: 6,
                ..text(10, b, "")
            },
            400,
            "media 6 needs",
        ),
        (
            a,
            ChatMsg {
                media: 7,
                ..text(10, b, "x")
            },
            400,
            "media 7 needs url",
        ),
        (
            a,
            ChatMsg {
                media: 8,
                pic: "https://x.io/p.jpg".into(),
                ..text(10, b, "")
            },
            400,
            "media 8 needs url",
        ),
        (
            a,
            ChatMsg {
                media: 9,
                ..text(10, b, "")
            },
            400,
            "media 9 needs",
        ),
        (
            a,
            ChatMsg {
                media: 100,
                ..text(10, b, "")
            },
            400,
            "media 100 needs",
        ),
        (
            a,
            ChatMsg {
                media: 4,
                url: "javascript:alert(1)".into(),
                ..text(10, b, "")
            },
            400,
            "http(s) URL",
        ),
        (
            a,
            text(10, b, &"x".repeat(4097)),
            413,
            "content is larger than 4096 bytes",
        ),
        (
            a,
            ChatMsg {
                memo: "m".repeat(2000),
                ..text(10, b, "hi")
            },
            413,
            "memo",
        ),
    ];
    for (from, m, code, msg) in cases {
        let r = chat(&mut c, from, m.clone()).await;
        assert_eq!(r.code, code, "{m:?}: {}", r.msg);
        assert!(r.msg.contains(msg), "{:?} should mention {msg:?}", r.msg);
        assert!(r.ack.is_none());
    }
    // Only IM accounts chat.
    let r = c
        .chat(ChatReq {
            server: "conn-1".into(),
            uid: "alice".into(),
            msg: Some(text(10, b, "x")),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.code, 100, "{}", r.msg);

    // Nothing refused was stored or published.
    assert!(history(&w.node, &w.a.1, b, 10).await.is_empty());
    assert_eq!(w.node.queued(), 0, "a refused message is never published");

    // Every media with what it needs is accepted.
    let good = [
        ChatMsg {
            media: 2,
            url: "https://x.io/n".into(),
            ..text(10, b, "title")
        },
        ChatMsg {
            media: 3,
            url: "/attach/files/0123456789abcdef0123456789abcdef.webm".into(),
            amount: 4,
            ..text(10, b, "")
        },
        ChatMsg {
            media: 4,
            url: "https://x.io/a.jpg".into(),
            ..text(10, b, "")
        },
        ChatMsg {
            media: 5,
            amount: 300,
            memo: "恭喜发财".into(),
            ..text(10, b, "")
        },
        ChatMsg {
            media: 6,
            ..text(10, b, "cry")
        },
        ChatMsg {
            media: 7,
            url: "http://x.io/".into(),
            ..text(10, b, "")
        },
        ChatMsg {
            media: 8,
            url: "https://x.io/a.mp4".into(),
            ..text(10, b, "")
        },
        ChatMsg {
            media: 9,
            pic: "https://x.io/a.png".into(),
            ..text(10, b, "10086")
        },
        ChatMsg {
            media: 100,
            ..text(10, b, "{\"k\":1}")
        },
    ];
    for m in good {
        let r = chat(&mut c, a, m.clone()).await;
        assert_eq!(r.code, 0, "{m:?}: {}", r.msg);
    }
    assert_eq!(history(&w.node, &w.b.1, a, 10).await.len(), 9);
    let _ = &mut w;
    w.node.stop().await;
}
both!(chat_rules);

async fn one_to_one_delivery_and_inbox(db: Db) {
    let mut w = world(db, &[]).await;
    let mut c = w.node.grpc().await;
    let (a, b) = (w.a.0, w.b.0);

    // b offline, a offline too: stored for b, nothing to push.
    let r = chat(
        &mut c,
        a,
        ChatMsg {
            userid: 999,
            ..text(10, b, "first")
        },
    )
    .await;
    assert_eq!(r.code, 0, "{}", r.msg);
    let ack1 = r.ack.expect("ack");
    assert_eq!(ack1.status, ChatStatus::Stored as i32);
    assert_eq!((ack1.client_id, ack1.dstid, ack1.cmd), (77, b, 10));
    assert!(
        ack1.id > 0 && ack1.id < 1 << 53,
        "id {} must be exact in JavaScript",
        ack1.id
    );
    assert_eq!(w.node.queued(), 0, "nobody online: nothing published");

    // a online on conn-1: its own sessions get the copy, b still stores.
    assert_eq!(sign_in(&mut c, "conn-1", &w.a.1, "").await.code, 0);
    let ack2 = chat(&mut c, a, text(10, b, "second"))
        .await
        .ack
        .expect("ack");
    assert_eq!(ack2.status, ChatStatus::Stored as i32);
    assert!(ack2.id > ack1.id, "ids are time-ordered");
    match w.node.next_queue_msg().await.body {
        Some(Body::User(u)) => {
            assert_eq!(u.uids, vec![a.to_string()]);
            assert_eq!(u.servers, vec!["conn-1".to_string()]);
            let m = u.msg.expect("msg");
            assert_eq!((m.id, m.userid, m.content.as_str()), (ack2.id, a, "second"));
        }
        other => panic!("expected a user message, got {other:?}"),
    }

    // b's inbox: oldest first, in pages, gone once acknowledged.
    let p = c
        .pending(PendingReq {
            uid: b.to_string(),
            limit: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.msgs.len(), 1);
    assert!(p.more);
    let first = &p.msgs[0];
    assert_eq!(
        (first.id, first.userid, first.content.as_str()),
        (ack1.id, a, "first")
    );
    assert_eq!(
        first.userid, a,
        "the sender comes from the token, not the client"
    );
    assert_eq!(first.created_ms, ack1.created_ms);
    c.ack_pending(AckPendingReq {
        uid: b.to_string(),
        upto_id: ack1.id,
    })
    .await
    .unwrap();
    let p = c
        .pending(PendingReq {
            uid: b.to_string(),
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        p.msgs.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![ack2.id]
    );
    assert!(!p.more);
    c.ack_pending(AckPendingReq {
        uid: b.to_string(),
        upto_id: ack2.id,
    })
    .await
    .unwrap();
    assert!(
        c.pending(PendingReq {
            uid: b.to_string(),
            limit: 10
        })
        .await
        .unwrap()
        .into_inner()
        .msgs
        .is_empty()
    );
    // Non-IM users simply have none.
    assert!(
        c.pending(PendingReq {
            uid: "alice".into(),
            limit: 10
        })
        .await
        .unwrap()
        .into_inner()
        .msgs
        .is_empty()
    );

    // b online on conn-2: delivered to both users' nodes, no inbox row.
    assert_eq!(
        sign_in(&mut c, "conn-2", &w.b.1, &b.to_string()).await.code,
        0
    );
    let ack3 = chat(&mut c, a, text(10, b, "third"))
        .await
        .ack
        .expect("ack");
    assert_eq!(ack3.status, ChatStatus::Delivered as i32);
    match w.node.next_queue_msg().await.body {
        Some(Body::User(u)) => {
            assert_eq!(u.uids, vec![b.to_string(), a.to_string()]);
            assert_eq!(u.servers, vec!["conn-1".to_string(), "conn-2".to_string()]);
            let m = u.msg.expect("msg");
            assert_eq!(
                (m.id, m.userid, m.dstid, m.cmd, m.media),
                (ack3.id, a, b, 10, 1)
            );
            // Stored before it was handed to the queue.
            let rows = history(&w.node, &w.b.1, a, 10).await;
            assert_eq!(rows[0]["id"].as_i64(), Some(m.id), "{rows:?}");
            assert_eq!(rows[0]["content"], "third");
        }
        other => panic!("expected a user message, got {other:?}"),
    }
    assert!(
        c.pending(PendingReq {
            uid: b.to_string(),
            limit: 10
        })
        .await
        .unwrap()
        .into_inner()
        .msgs
        .is_empty()
    );
    w.node.stop().await;
}
both!(one_to_one_delivery_and_inbox);

/// A conn node that no longer has the recipient reports the message; it is
/// stored for the next sign-in unless the user is online on another node.
async fn undelivered_goes_to_the_inbox(db: Db) {
    let w = world(db, &[]).await;
    let mut c = w.node.grpc().await;
    let (a, b) = (w.a.0, w.b.0);
    assert_eq!(sign_in(&mut c, "conn-2", &w.b.1, "").await.code, 0);
    let ack = chat(&mut c, a, text(10, b, "racing"))
        .await
        .ack
        .expect("ack");
    assert_eq!(ack.status, ChatStatus::Delivered as i32);
    let pending = |c: &mut LogicClient<Channel>| {
        let mut c = c.clone();
        async move {
            c.pending(PendingReq {
                uid: b.to_string(),
                limit: 10,
            })
            .await
            .unwrap()
            .into_inner()
            .msgs
            .iter()
            .map(|m| m.id)
            .collect::<Vec<_>>()
        }
    };
    assert!(pending(&mut c).await.is_empty());
    // conn-1 never had b: b is online on conn-2, so nothing is stored.
    let r = c
        .undelivered(UndeliveredReq {
            server: "conn-1".into(),
            uid: b.to_string(),
            ids: vec![ack.id],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.stored, 0);
    // conn-2 lost b (its presence still names conn-2): stored once, and
    // unknown ids are ignored.
    for _ in 0..2 {
        c.undelivered(UndeliveredReq {
            server: "conn-2".into(),
            uid: b.to_string(),
            ids: vec![ack.id, 123_456],
        })
        .await
        .unwrap();
    }
    assert_eq!(pending(&mut c).await, vec![ack.id]);
    w.node.stop().await;
}
both!(undelivered_goes_to_the_inbox);

async fn community_delivery(db: Db) {
    let mut w = world(db, &[]).await;
    let mut c = w.node.grpc().await;
    let (a, b, cc) = (w.a.0, w.b.0, w.c.0);
    let room = format!("c:{}", w.community);

    // c joins while offline: no live join to publish.
    let (_, r) = w
        .node
        .form(
            "/contact/joincommunity",
            Some(&w.c.1),
            &[("dstid", &w.community.to_string())],
        )
        .await;
    assert_eq!(r["code"], 0, "{r}");
    assert_eq!(w.node.queued(), 0);

    // Every other member offline: STORED, inbox rows for b and c.
    let ack = chat(&mut c, a, text(11, w.community, "all offline"))
        .await
        .ack
        .expect("ack");
    assert_eq!(ack.status, ChatStatus::Stored as i32);
    match w.node.next_queue_msg().await.body {
        Some(Body::Room(r)) => {
            assert_eq!(
                (r.room_id.as_str(), r.chat, r.level),
                (room.as_str(), true, MsgLevel::Important as i32)
            );
            assert_eq!(
                (r.id, r.uid.as_str()),
                (ack.id as u64, a.to_string().as_str())
            );
            let m = ChatMsg::decode(r.data).expect("data is a ChatMsg");
            assert_eq!(
                (m.id, m.userid, m.dstid, m.cmd),
                (ack.id, a, w.community, 11)
            );
            assert_eq!(r.ts_ms, m.created_ms);
        }
        other => panic!("expected a room message, got {other:?}"),
    }
    for uid in [b, cc] {
        let p = c
            .pending(PendingReq {
                uid: uid.to_string(),
                limit: 10,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            p.msgs.iter().map(|m| m.id).collect::<Vec<_>>(),
            vec![ack.id],
            "inbox of {uid}"
        );
    }
    assert!(
        c.pending(PendingReq {
            uid: a.to_string(),
            limit: 10
        })
        .await
        .unwrap()
        .into_inner()
        .msgs
        .is_empty(),
        "not the sender's"
    );

    // b online: DELIVERED; only c (offline) gets an inbox row.
    assert_eq!(sign_in(&mut c, "conn-2", &w.b.1, "").await.code, 0);
    let ack2 = chat(&mut c, a, text(11, w.community, "b is here"))
        .await
        .ack
        .expect("ack");
    assert_eq!(ack2.status, ChatStatus::Delivered as i32);
    assert!(
        matches!(w.node.next_queue_msg().await.body, Some(Body::Room(r)) if r.id == ack2.id as u64)
    );
    let ids = |p: chatroom_common::proto::logic::PendingReply| {
        p.msgs.iter().map(|m| m.id).collect::<Vec<_>>()
    };
    assert_eq!(
        ids(c
            .pending(PendingReq {
                uid: b.to_string(),
                limit: 10
            })
            .await
            .unwrap()
            .into_inner()),
        vec![ack.id]
    );
    assert_eq!(
        ids(c
            .pending(PendingReq {
                uid: cc.to_string(),
                limit: 10
            })
            .await
            .unwrap()
            .into_inner()),
        vec![ack.id, ack2.id]
    );

    // History for members, newest first, paged with `before`; not for others.
    let rows = history(&w.node, &w.c.1, w.community, 11).await;
    assert_eq!(
        rows.iter()
            .map(|r| r["id"].as_i64().unwrap())
            .collect::<Vec<_>>(),
        vec![ack2.id, ack.id]
    );
    let (_, r) = w
        .node
        .form(
            "/chat/history",
            Some(&w.c.1),
            &[
                ("dstid", &w.community.to_string()),
                ("cmd", "11"),
                ("before", &ack2.id.to_string()),
            ],
        )
        .await;
    assert_eq!(r["total"], 1, "{r}");
    assert_eq!(r["rows"][0]["content"], "all offline");

    // b (online) joins a new community of c's: its sessions join the room now.
    let (_, r) = w
        .node
        .form("/contact/createcommunity", Some(&w.c.1), &[("name", "c's")])
        .await;
    let second = r["data"]["id"].as_i64().expect("id");
    let (_, r) = w
        .node
        .form(
            "/contact/joincommunity",
            Some(&w.b.1),
            &[("dstid", &second.to_string())],
        )
        .await;
    assert_eq!(r["code"], 0, "{r}");
    match w.node.next_queue_msg().await.body {
        Some(Body::Join(j)) => {
            assert_eq!(
                (j.uid, j.room, j.servers),
                (
                    b.to_string(),
                    format!("c:{second}"),
                    vec!["conn-2".to_string()]
                )
            );
        }
        other => panic!("expected a join, got {other:?}"),
    }
    // And the next sign-in lists both rooms.
    let r = sign_in(&mut c, "conn-3", &w.b.1, "").await;
    assert_eq!(r.rooms, vec![room, format!("c:{second}")]);
    w.node.stop().await;
}
both!(community_delivery);

#[tokio::test]
async fn chat_is_rate_limited_per_user() {
    let w = world(
        Db::Sqlite,
        &[
            ("CHATROOM__IM__CHAT_RATE_PER_SEC", "0.001"),
            ("CHATROOM__IM__CHAT_BURST", "3"),
        ],
    )
    .await;
    let mut c = w.node.grpc().await;
    for i in 0..3 {
        let r = chat(&mut c, w.a.0, text(10, w.b.0, &format!("m{i}"))).await;
        assert_eq!(r.code, 0, "{}", r.msg);
    }
    let r = chat(&mut c, w.a.0, text(10, w.b.0, "one too many")).await;
    assert_eq!(
        (r.code, r.msg.as_str()),
        (429, "too many requests, slow down")
    );
    // Others are not slowed by a's bucket.
    let r = chat(&mut c, w.b.0, text(10, w.a.0, "b is fine")).await;
    assert_eq!(r.code, 0, "{}", r.msg);
    assert_eq!(history(&w.node, &w.a.1, w.b.0, 10).await.len(), 4);
    w.node.stop().await;
}

//! The IM store against a real SQLite file and a real PostgreSQL database
//! (`CHATROOM_TEST_PG`): accounts, friends, communities, messages, inbox.

mod support;

use chatroom_common::proto::protocol::ChatCmd;
use chatroom_common::proto::protocol::ChatMsg;
use chatroom_logic::store::{NewCommunity, NewUser, Store, StoreError, conv_key};
use support::{Db, TestStore};

fn new_user(mobile: &str) -> NewUser {
    NewUser {
        mobile: mobile.into(),
        passwd_hash: format!("$argon2id$fake-hash-of-{mobile}"),
        nickname: format!("nick {mobile}"),
        avatar: String::new(),
        memo: String::new(),
    }
}

fn new_community(owner: i64, name: &str) -> NewCommunity {
    NewCommunity {
        name: name.into(),
        owner,
        icon: String::new(),
        memo: "m".into(),
        kind: 0,
    }
}

async fn users(s: &Store, n: usize) -> Vec<i64> {
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(
            s.create_user(&new_user(&format!("1380000{i:04}")))
                .await
                .expect("create user")
                .id,
        );
    }
    ids
}

async fn raw(url: &str) -> sqlx::AnyPool {
    sqlx::any::install_default_drivers();
    sqlx::any::AnyPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await
        .expect("raw connection")
}

async fn accounts(db: Db) {
    let t = TestStore::open(db).await;
    let s = &t.store;
    let a = s
        .create_user(&new_user("13800000001"))
        .await
        .expect("register");
    let b = s
        .create_user(&new_user("13800000002"))
        .await
        .expect("register");
    assert_eq!((a.id, b.id), (10001, 10002), "small sequential ids");
    assert_eq!(a.nickname, "nick 13800000001");
    assert!(a.created_ms > 1_700_000_000_000);
    assert!(matches!(
        s.create_user(&new_user("13800000001")).await,
        Err(StoreError::MobileTaken)
    ));
    assert_eq!(s.user(a.id).await.unwrap(), Some(a.clone()));
    assert_eq!(
        s.user_by_mobile("13800000002").await.unwrap(),
        Some(b.clone())
    );
    assert_eq!(s.user(99).await.unwrap(), None);
    let (u, hash) = s
        .credentials("13800000001")
        .await
        .unwrap()
        .expect("credentials");
    assert_eq!(
        (u.id, hash.as_str()),
        (a.id, "$argon2id$fake-hash-of-13800000001")
    );
    assert!(s.credentials("nobody").await.unwrap().is_none());
    // The failed duplicate did not burn an id.
    let c = s.create_user(&new_user("13800000003")).await.unwrap();
    assert_eq!(c.id, 10003);
    t.close().await;
}
both!(accounts);

async fn friends(db: Db) {
    let t = TestStore::open(db).await;
    let s = &t.store;
    let ids = users(s, 4).await;
    let (a, b, c, d) = (ids[0], ids[1], ids[2], ids[3]);
    let friend = s.add_friend(a, b).await.expect("befriend");
    assert_eq!(friend.id, b);
    assert!(
        s.is_friend(a, b).await.unwrap() && s.is_friend(b, a).await.unwrap(),
        "both directions"
    );
    assert!(matches!(
        s.add_friend(a, b).await,
        Err(StoreError::AlreadyFriends)
    ));
    assert!(matches!(
        s.add_friend(b, a).await,
        Err(StoreError::AlreadyFriends)
    ));
    assert!(matches!(
        s.add_friend(a, a).await,
        Err(StoreError::SelfFriend)
    ));
    assert!(matches!(
        s.add_friend(a, 424242).await,
        Err(StoreError::NoSuchUser)
    ));
    s.add_friend(c, a).await.unwrap();
    let list: Vec<i64> = s.friends(a).await.unwrap().iter().map(|u| u.id).collect();
    assert_eq!(list, vec![b, c]);
    assert_eq!(s.friends(b).await.unwrap().len(), 1);
    assert!(s.friends(d).await.unwrap().is_empty());

    // Both rows or neither: with d -> c already there (half a friendship
    // written by hand), befriending c -> d fails on the second row and the
    // first one must be rolled back.
    let pool = raw(&t.url).await;
    sqlx::query(
        "INSERT INTO contacts (owner, target, kind, memo, created_ms) VALUES ($1, $2, 1, '', 0)",
    )
    .bind(d)
    .bind(c)
    .execute(&pool)
    .await
    .unwrap();
    assert!(matches!(
        s.add_friend(c, d).await,
        Err(StoreError::AlreadyFriends)
    ));
    assert!(
        !s.is_friend(c, d).await.unwrap(),
        "the transaction was rolled back"
    );
    pool.close().await;
    t.close().await;
}
both!(friends);

async fn communities(db: Db) {
    let t = TestStore::open(db).await;
    let s = &t.store;
    let ids = users(s, 2).await;
    let (a, b) = (ids[0], ids[1]);
    let mut made = Vec::new();
    for i in 0..5 {
        let c = s
            .create_community(&new_community(a, &format!("g{i}")), 5)
            .await
            .expect("create");
        assert_eq!(c.owner, a);
        assert!(s.is_member(a, c.id).await.unwrap(), "the creator joins");
        made.push(c.id);
    }
    assert_eq!(made[0], 1001);
    assert!(matches!(
        s.create_community(&new_community(a, "sixth"), 5).await,
        Err(StoreError::TooManyCommunities(5))
    ));
    // The refused one took no id.
    let other = s
        .create_community(&new_community(b, "b's"), 5)
        .await
        .unwrap();
    assert_eq!(other.id, 1006);

    let joined = s.join_community(b, made[2]).await.expect("join");
    assert_eq!(joined.name, "g2");
    s.join_community(b, made[2])
        .await
        .expect("joining again is fine");
    assert!(matches!(
        s.join_community(b, 999_999).await,
        Err(StoreError::NoSuchCommunity)
    ));
    assert_eq!(s.members(made[2]).await.unwrap(), vec![a, b]);
    let mine: Vec<i64> = s
        .communities_of(b)
        .await
        .unwrap()
        .iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(mine, vec![made[2], other.id]);
    assert_eq!(s.communities_of(a).await.unwrap().len(), 5);
    assert!(!s.is_member(a, other.id).await.unwrap());
    t.close().await;
}
both!(communities);

fn msg(id: i64, from: i64, to: i64, cmd: i32, text: &str) -> ChatMsg {
    ChatMsg {
        id,
        userid: from,
        dstid: to,
        cmd,
        media: 1,
        content: text.into(),
        amount: 7,
        created_ms: 1_700_000_000_000 + id,
        ..ChatMsg::default()
    }
}

async fn messages_history_and_inbox(db: Db) {
    let t = TestStore::open(db).await;
    let s = &t.store;
    let (a, b, c) = (10001, 10002, 10003);
    // A 1:1 conversation in both directions, another one, and a community.
    for i in 1..=5 {
        let (from, to) = if i % 2 == 0 { (b, a) } else { (a, b) };
        s.insert_message(
            &msg(i, from, to, ChatCmd::Single as i32, &format!("m{i}")),
            &[],
        )
        .await
        .unwrap();
    }
    s.insert_message(&msg(6, a, c, ChatCmd::Single as i32, "other"), &[c])
        .await
        .unwrap();
    s.insert_message(
        &msg(7, a, 1001, ChatCmd::Community as i32, "group"),
        &[b, c],
    )
    .await
    .unwrap();

    let stored = s.message(3).await.unwrap().expect("stored");
    assert_eq!(stored, msg(3, a, b, ChatCmd::Single as i32, "m3"));
    // A reused id is refused, and recognised as such.
    let dup = s
        .insert_message(&msg(3, a, b, ChatCmd::Single as i32, "again"), &[])
        .await
        .unwrap_err();
    assert!(Store::is_duplicate_id(&dup), "{dup}");

    let conv = conv_key(ChatCmd::Single as i32, b, a);
    let page: Vec<i64> = s
        .history(&conv, i64::MAX, 2)
        .await
        .unwrap()
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(page, vec![5, 4], "newest first");
    let page: Vec<i64> = s
        .history(&conv, 4, 2)
        .await
        .unwrap()
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(page, vec![3, 2], "before is exclusive");
    let page: Vec<i64> = s
        .history(&conv, 2, 10)
        .await
        .unwrap()
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(page, vec![1]);
    let group: Vec<i64> = s
        .history(&conv_key(ChatCmd::Community as i32, a, 1001), i64::MAX, 10)
        .await
        .unwrap()
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(group, vec![7]);

    // Inbox: oldest first, removed up to the acknowledged id.
    let pending: Vec<i64> = s
        .pending(c, 10)
        .await
        .unwrap()
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(pending, vec![6, 7]);
    assert_eq!(s.pending(c, 1).await.unwrap()[0].content, "other");
    assert_eq!(s.ack_pending(c, 6).await.unwrap(), 1);
    let pending: Vec<i64> = s
        .pending(c, 10)
        .await
        .unwrap()
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(pending, vec![7]);
    assert_eq!(s.pending(a, 10).await.unwrap().len(), 0);

    // Taking a message back removes its inbox rows too.
    s.delete_message(7).await.unwrap();
    assert!(s.message(7).await.unwrap().is_none());
    assert!(s.pending(b, 10).await.unwrap().is_empty());
    assert!(s.pending(c, 10).await.unwrap().is_empty());
    t.close().await;
}
both!(messages_history_and_inbox);

/// A second connect (a second logic node, or a restart) finds the schema in
/// place and keeps the data.
async fn reopening_keeps_data(db: Db) {
    let t = TestStore::open(db).await;
    let id = t
        .store
        .create_user(&new_user("13900000000"))
        .await
        .unwrap()
        .id;
    let again = Store::connect(&chatroom_logic::config::StoreConfig {
        url: t.url.clone(),
        max_connections: 2,
        acquire_timeout: std::time::Duration::from_secs(5),
    })
    .await
    .expect("reopen");
    assert_eq!(
        again.user(id).await.unwrap().map(|u| u.mobile),
        Some("13900000000".into())
    );
    again.close().await;
    t.close().await;
}
both!(reopening_keeps_data);

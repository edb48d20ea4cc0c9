//! Room streams end to end on standalone (conn, logic and job in one
//! process): a session's pipelined messages reach every receiver in order
//! with consecutive offsets, nothing a client sent before closing is lost,
//! and a client that reconnects with its offset gets what it missed, once.

use chatroom_common::config::Load;
use std::time::Duration;

use chatroom_common::proto::protocol::{BroadcastRoomReq, MsgLevel, PackageType, Req};
use chatroom_tests::client::Client;
use chatroom_tests::cluster::TempDir;
use chatroom_tests::http;
use futures_util::SinkExt;
use prost::Message as _;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

struct Standalone {
    ws: String,
    http: String,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<Result<(), chatroom::StandaloneError>>,
    _dir: TempDir,
}

async fn standalone(extra: &[(&str, &str)]) -> Standalone {
    let dir = TempDir::new("stream-standalone");
    let db = format!("sqlite://{}/im.db?mode=rwc", dir.0.display());
    let mut env = vec![
        ("CHATROOM__LOG__DIR", ""),
        ("CHATROOM__CONN__WS__ADDR", "127.0.0.1:0"),
        ("CHATROOM__LOGIC__HTTP__ADDR", "127.0.0.1:0"),
        ("CHATROOM__LOGIC__STORE__URL", db.as_str()),
    ];
    env.extend_from_slice(extra);
    let cfg = chatroom::StandaloneConfig::from_overrides(env).unwrap();
    let listeners = chatroom::Listeners::bind(&cfg).await.unwrap();
    let ws = format!("ws://{}/room", listeners.ws.local_addr().unwrap());
    let http = format!("http://{}", listeners.http.local_addr().unwrap());
    let stop = CancellationToken::new();
    let server = tokio::spawn(chatroom::run(cfg, listeners, stop.clone()));
    Standalone {
        ws,
        http,
        stop,
        server,
        _dir: dir,
    }
}

impl Standalone {
    async fn client(&self, uid: &str, room: &str) -> Client {
        let tok = http::token(&self.http, uid).await.unwrap();
        Client::signed_in(&self.ws, &tok, room).await.unwrap()
    }

    async fn stop(self) {
        self.stop.cancel();
        self.server.await.unwrap().unwrap();
    }
}

fn message_frame(room: &str, data: String) -> Message {
    let m = BroadcastRoomReq {
        room_id: room.into(),
        msg_lv: MsgLevel::Normal as i32,
        data: data.into(),
        ..Default::default()
    };
    let req = Req {
        r#type: PackageType::Message as i32,
        data: m.encode_to_vec().into(),
    };
    Message::Binary(req.encode_to_vec().into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_messages_sent_then_closed_all_arrive_in_order() {
    let s = standalone(&[]).await;
    let mut rx = s.client("reader", "flood").await;
    let mut tx = s.client("writer", "flood").await;
    let total = 10_000usize;
    // Written back to back without waiting for anything, then closed.
    for i in 0..total {
        tx.ws
            .feed(message_frame("flood", format!("m{i}")))
            .await
            .unwrap();
    }
    tx.ws.close(None).await.unwrap();
    let got = rx
        .recv_stream(total, Duration::from_secs(60))
        .await
        .unwrap();
    let datas: Vec<String> = got
        .msgs
        .iter()
        .map(|m| String::from_utf8(m.data.to_vec()).unwrap())
        .collect();
    let want: Vec<String> = (0..total).map(|i| format!("m{i}")).collect();
    assert_eq!(datas, want, "every message, once, in the order sent");
    let first = got.msgs[0].offset;
    assert_eq!(
        got.offsets(),
        (first..first + total as u64).collect::<Vec<_>>(),
        "consecutive offsets"
    );
    assert!(
        got.frames < total,
        "merged: {} frames for {total} messages",
        got.frames
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_missed_a_thousand_messages_gets_them_all_once_after_reconnecting() {
    let s = standalone(&[]).await;
    let mut away = s.client("away", "lobby").await;
    let mut tx = s.client("writer", "lobby").await;
    tx.send_message("lobby", MsgLevel::Normal, b"before")
        .await
        .unwrap();
    let seen = away.recv_stream(1, Duration::from_secs(10)).await.unwrap();
    let (epoch, last) = (seen.msgs[0].epoch, seen.msgs[0].offset);
    assert_ne!(epoch, 0, "pushed frames carry the stream's epoch");
    drop(away);

    for i in 0..1000 {
        tx.send_message("lobby", MsgLevel::Normal, format!("missed-{i}").as_bytes())
            .await
            .unwrap();
    }
    // The sender is in the room too: once it has its own 1000 back (and
    // "before"), they are all in the stream.
    let w = tx.recv_stream(1001, Duration::from_secs(30)).await.unwrap();
    assert_eq!(w.msgs[1000].offset, last + 1000);

    let tok = http::token(&s.http, "away").await.unwrap();
    let mut back = Client::connect(&s.ws).await.unwrap();
    let e = back
        .sign_in_resume(&tok, "lobby", epoch, last)
        .await
        .unwrap();
    assert_eq!((e.code, e.recovered, e.epoch), (0, true, epoch));
    let got = back
        .recv_stream(1000, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(
        got.offsets(),
        (last + 1..=last + 1000).collect::<Vec<_>>(),
        "all of them, in order, once"
    );
    for (i, m) in got.msgs[..1000].iter().enumerate() {
        assert_eq!(m.data, format!("missed-{i}").as_bytes());
    }
    // Then live, with nothing repeated.
    tx.send_message("lobby", MsgLevel::Normal, b"after")
        .await
        .unwrap();
    let more = back.recv_stream(1, Duration::from_secs(10)).await.unwrap();
    assert_eq!(
        (more.offsets(), &more.msgs[0].data[..]),
        (vec![last + 1001], &b"after"[..])
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_beyond_conns_reach_comes_from_logics_history() {
    // conn keeps 16 messages per room; logic keeps 2048.
    let s = standalone(&[("CHATROOM__CONN__STREAM__RETAIN_MESSAGES", "16")]).await;
    let mut tx = s.client("writer", "hall").await;
    tx.send_message("hall", MsgLevel::Important, b"zero")
        .await
        .unwrap();
    let seen = tx.recv_stream(1, Duration::from_secs(10)).await.unwrap();
    let (epoch, last) = (seen.msgs[0].epoch, seen.msgs[0].offset);
    for i in 0..200 {
        tx.send_message("hall", MsgLevel::Important, format!("i{i}").as_bytes())
            .await
            .unwrap();
    }
    tx.recv_stream(200, Duration::from_secs(30)).await.unwrap();
    let tok = http::token(&s.http, "late").await.unwrap();
    let mut late = Client::connect(&s.ws).await.unwrap();
    let e = late
        .sign_in_resume(&tok, "hall", epoch, last)
        .await
        .unwrap();
    assert_eq!((e.code, e.recovered), (0, true));
    let got = late
        .recv_stream(200, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(got.offsets(), (last + 1..=last + 200).collect::<Vec<_>>());
    assert!(got.msgs.iter().all(|m| m.level == MsgLevel::Important));
    // A stale epoch cannot be recovered, and the answer says so.
    let mut stale = Client::connect(&s.ws).await.unwrap();
    let e = stale
        .sign_in_resume(&tok, "hall", epoch - 1, 5)
        .await
        .unwrap();
    assert_eq!((e.code, e.recovered, e.epoch), (0, false, epoch));
    s.stop().await;
}

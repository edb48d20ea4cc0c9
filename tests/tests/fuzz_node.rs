//! Hostile input against a running node (standalone: conn + logic + job in
//! one process): arbitrary form and multipart bodies to logic's handlers
//! must get a JSON `code` + `msg` refusal, and 10,000 random WebSocket
//! frames — random bytes, valid-looking protobuf, oversized, wrong types,
//! text frames — must leave a well-behaved session able to sign in, send
//! and receive.

use std::time::Duration;

use chatroom_common::config::Load;
use chatroom_common::proto::protocol::{BroadcastRoomReq, ChatMsg, MsgLevel, Req, SignIn};
use chatroom_tests::client::Client;
use chatroom_tests::cluster::TempDir;
use chatroom_tests::http;
use futures_util::{SinkExt, StreamExt};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};
use prost::Message as _;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

struct Node {
    ws: String,
    http: String,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<Result<(), chatroom::StandaloneError>>,
    _dir: TempDir,
}

async fn start() -> Node {
    let dir = TempDir::new("fuzz-node");
    let db = format!("sqlite://{}/im.db?mode=rwc", dir.0.display());
    let uploads = dir.0.join("uploads").display().to_string();
    let cfg = chatroom::StandaloneConfig::from_overrides([
        ("CHATROOM__LOG__DIR", ""),
        ("CHATROOM__CONN__WS__ADDR", "127.0.0.1:0"),
        ("CHATROOM__LOGIC__HTTP__ADDR", "127.0.0.1:0"),
        ("CHATROOM__LOGIC__STORE__URL", db.as_str()),
        ("CHATROOM__LOGIC__IM__UPLOAD_DIR", uploads.as_str()),
        ("CHATROOM__CONN__WS__MAX_FRAME_BYTES", "4096"),
    ])
    .unwrap();
    let listeners = chatroom::Listeners::bind(&cfg).await.unwrap();
    let ws = format!("ws://{}/room", listeners.ws.local_addr().unwrap());
    let http = format!("http://{}", listeners.http.local_addr().unwrap());
    let stop = CancellationToken::new();
    let server = tokio::spawn(chatroom::run(cfg, listeners, stop.clone()));
    Node {
        ws,
        http,
        stop,
        server,
        _dir: dir,
    }
}

impl Node {
    async fn stop(self) {
        self.stop.cancel();
        self.server.await.unwrap().unwrap();
    }
}

/// A refusal in the API's shape: a 4xx status and a JSON body whose `code`
/// is not success, with a message.
fn refused(route: &str, a: &http::Answer) -> Result<(), TestCaseError> {
    prop_assert!(
        (400..500).contains(&a.status),
        "{route}: status {} for garbage: {}",
        a.status,
        a.json
    );
    let ok = if route == "/msg" { 1 } else { 0 };
    prop_assert!(
        a.json["code"].is_i64() && a.json["code"] != ok,
        "{route}: {}",
        a.json
    );
    prop_assert!(
        a.json["msg"].as_str().is_some_and(|m| !m.is_empty()),
        "{route}: {}",
        a.json
    );
    Ok(())
}

/// Runs `cases` of `strategy` through `check` on the current runtime.
async fn run<S: Strategy>(
    cases: u32,
    strategy: S,
    check: impl AsyncFn(S::Value) -> Result<(), TestCaseError>,
) where
    S::Value: Clone + std::fmt::Debug,
{
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    // The runner is synchronous: generate the values first, then await
    // each (no shrinking; the failing value is printed whole).
    let values: Vec<S::Value> = (0..cases)
        .map(|_| strategy.new_tree(&mut runner).expect("a value").current())
        .collect();
    for v in values {
        if let Err(e) = check(v.clone()).await {
            panic!("{e} for {v:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_form_and_multipart_bodies_are_refused_in_json() {
    let node = start().await;
    let base = node.http.clone();
    let form_routes = [
        "/msg",
        "/user/register",
        "/user/login",
        "/contact/addfriend",
        "/contact/joincommunity",
        "/chat/history",
    ];
    // Arbitrary bytes (and URL-encoded-looking junk) as form bodies.
    let body = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        "([a-z_]{0,8}=[%0-9A-Za-z+&=]{0,16}&?){0,6}".prop_map(String::into_bytes),
    ];
    run(
        192,
        (0..form_routes.len(), body),
        async |(r, body): (usize, Vec<u8>)| {
            let route = form_routes[r];
            let a = http::post(
                &format!("{base}{route}"),
                "application/x-www-form-urlencoded",
                None,
                body,
            )
            .await
            .map_err(|e| TestCaseError::fail(format!("{route}: {e:#}")))?;
            refused(route, &a)
        },
    )
    .await;
    // Multipart: a random boundary in the header, random bytes in the body
    // (sometimes around real-looking parts).
    let multipart = (
        "[a-zA-Z0-9'()+_,./:=?-]{0,20}",
        prop::collection::vec(any::<u8>(), 0..512),
        any::<bool>(),
    );
    run(
        128,
        multipart,
        async |(boundary, junk, framed): (String, Vec<u8>, bool)| {
            let body = if framed {
                let mut b = format!(
                    "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n\r\n"
                )
                .into_bytes();
                b.extend_from_slice(&junk);
                b.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
                b
            } else {
                junk
            };
            let a = http::post(
                &format!("{base}/attach/upload"),
                &format!("multipart/form-data; boundary={boundary}"),
                None,
                body,
            )
            .await
            .map_err(|e| TestCaseError::fail(format!("/attach/upload: {e:#}")))?;
            refused("/attach/upload", &a)
        },
    )
    .await;
    // Still serving: a test token is issued.
    http::token(&node.http, "after-garbage").await.unwrap();
    node.stop().await;
}

/// One random frame, of one of the kinds the issue lists.
fn frame() -> impl Strategy<Value = Message> {
    let bytes = prop::collection::vec(any::<u8>(), 0..256);
    prop_oneof![
        // Random bytes.
        bytes.clone().prop_map(|b| Message::Binary(b.into())),
        // A valid Req of any type around random data.
        (any::<i32>(), bytes.clone()).prop_map(|(t, d)| {
            Message::Binary(
                Req {
                    r#type: t,
                    data: d.into(),
                }
                .encode_to_vec()
                .into(),
            )
        }),
        // Valid-looking inner messages, under plausible and wrong types.
        (0i32..16, ".{0,40}", ".{0,20}", any::<i32>(), bytes.clone()).prop_map(
            |(t, tok, room, lv, data)| {
                let inner = match t % 4 {
                    0 => SignIn {
                        token: tok,
                        room_id: room,
                        ..Default::default()
                    }
                    .encode_to_vec(),
                    1 => BroadcastRoomReq {
                        room_id: room,
                        msg_lv: lv,
                        data: data.into(),
                        ..Default::default()
                    }
                    .encode_to_vec(),
                    2 => ChatMsg {
                        dstid: i64::from(lv),
                        cmd: lv,
                        content: tok,
                        ..Default::default()
                    }
                    .encode_to_vec(),
                    _ => data,
                };
                Message::Binary(
                    Req {
                        r#type: t,
                        data: inner.into(),
                    }
                    .encode_to_vec()
                    .into(),
                )
            }
        ),
        // Over the node's 4 KiB frame limit.
        (4097usize..9000).prop_map(|n| Message::Binary(vec![0x0a; n].into())),
        // Text frames: JSON-ish and not.
        ".{0,200}".prop_map(|t| Message::Text(t.into())),
        "\\{\"cmd\":[0-9]{1,3},\"dstid\":-?[0-9]{1,20},\"media\":[0-9]{1,3}\\}"
            .prop_map(|t| Message::Text(t.into())),
        // Control frames.
        bytes.prop_map(|b| Message::Ping(b.into_iter().take(125).collect::<Vec<_>>().into())),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_random_frames_leave_the_node_serving() {
    let node = start().await;
    let tok = http::token(&node.http, "fuzzer").await.unwrap();
    let mut runner = TestRunner::new(Config {
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = frame();
    let frames: Vec<Message> = (0..10_000)
        .map(|_| strategy.new_tree(&mut runner).expect("a frame").current())
        .collect();
    // Spread over sessions: a session the node closes (bad frame, too
    // large, bad sign-in) is replaced by a new one, half of them signed in
    // first so that frames also reach the signed-in paths.
    let mut sent = 0;
    let mut sessions = 0;
    let mut closed_by_node = 0;
    while sent < frames.len() {
        sessions += 1;
        let mut c = Client::connect(&node.ws).await.unwrap();
        if sessions % 2 == 0 {
            let e = c.sign_in(&tok, "fuzz").await.unwrap();
            assert_eq!(e.code, 0, "sign-in refused: {e:?}");
        }
        let (mut tx, mut rx) = c.ws.split();
        // Drain whatever the node answers, so its queue never backs up.
        let reader = tokio::spawn(async move { while let Some(Ok(_)) = rx.next().await {} });
        while sent < frames.len() {
            if tx.send(frames[sent].clone()).await.is_err() {
                closed_by_node += 1;
                break;
            }
            sent += 1;
        }
        let _ = tx.close().await;
        let _ = tokio::time::timeout(Duration::from_secs(10), reader).await;
    }
    assert!(sent == 10_000, "sent {sent}");

    // A well-behaved session: signs in, sends, receives, gets a pong.
    let mut a = Client::signed_in(&node.ws, &tok, "after-fuzz")
        .await
        .unwrap();
    let mut b = Client::signed_in(
        &node.ws,
        &http::token(&node.http, "peer").await.unwrap(),
        "after-fuzz",
    )
    .await
    .unwrap();
    a.send_message("after-fuzz", MsgLevel::Normal, b"still here")
        .await
        .unwrap();
    let got = b.recv_messages(1, Duration::from_secs(10)).await.unwrap();
    assert_eq!(&got[0].1[..], b"still here");
    assert_eq!(&a.heartbeat().await.unwrap()[..], b"pong");
    let n = a.members().await.unwrap();
    assert!(n >= 1, "MEMBERS {n}");
    eprintln!(
        "10,000 random frames over {sessions} sessions ({closed_by_node} closed by the node)"
    );
    node.stop().await;
}

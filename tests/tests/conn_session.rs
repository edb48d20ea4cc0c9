//! conn on its own, against a fake logic: the client protocol, pushes, bad
//! input, heartbeats, slow consumers and shutdown.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chatroom_common::proto::conn::PushRoomReq;
use chatroom_common::proto::conn::conn_client::ConnClient;
use chatroom_common::proto::logic::logic_server::{Logic, LogicServer};
use chatroom_common::proto::logic::*;
use chatroom_common::proto::protocol::{MsgLevel, PackageType};
use chatroom_conn::{ConnConfig, Listeners};
use chatroom_tests::client::{Client, eventually};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// Accepts tokens `good-<uid>`, refuses the rest; records received messages;
/// answers online totals as local count + 1000 (so tests can tell they came
/// from logic).
#[derive(Default, Clone)]
struct FakeLogic {
    received: Arc<Mutex<Vec<ReceiveReq>>>,
    signed_out: Arc<Mutex<Vec<String>>>,
}

#[tonic::async_trait]
impl Logic for FakeLogic {
    async fn sign_in(&self, r: Request<SignInReq>) -> Result<Response<SignInReply>, Status> {
        let r = r.into_inner();
        let reply = match r.token.strip_prefix("good-") {
            Some(uid) => SignInReply {
                code: 0,
                msg: "ok".into(),
                uid: uid.into(),
                key: format!("k-{uid}"),
                heartbeat_secs: 30,
            },
            None => SignInReply {
                code: 100,
                msg: "login needed: token is invalid".into(),
                ..Default::default()
            },
        };
        Ok(Response::new(reply))
    }
    async fn sign_out(&self, r: Request<SignOutReq>) -> Result<Response<SignOutReply>, Status> {
        self.signed_out.lock().unwrap().push(r.into_inner().uid);
        Ok(Response::new(SignOutReply {}))
    }
    async fn heartbeat(
        &self,
        _: Request<HeartbeatReq>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        Ok(Response::new(HeartbeatReply {}))
    }
    async fn receive(&self, r: Request<ReceiveReq>) -> Result<Response<ReceiveReply>, Status> {
        self.received.lock().unwrap().push(r.into_inner());
        Ok(Response::new(ReceiveReply {
            code: 0,
            msg: "ok".into(),
            id: 7,
        }))
    }
    async fn report_online(
        &self,
        r: Request<ReportOnlineReq>,
    ) -> Result<Response<ReportOnlineReply>, Status> {
        let rooms: HashMap<String, u64> = r
            .into_inner()
            .rooms
            .into_iter()
            .map(|(k, v)| (k, v as u64 + 1000))
            .collect();
        Ok(Response::new(ReportOnlineReply { rooms }))
    }
}

struct Node {
    url: String,
    grpc: SocketAddr,
    logic: FakeLogic,
    stop: CancellationToken,
    done: tokio::task::JoinHandle<()>,
}

async fn start(extra: &[(&str, &str)]) -> Node {
    let logic = FakeLogic::default();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let logic_addr = l.local_addr().unwrap();
    let svc = LogicServer::new(logic.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(l)),
    );
    let logic_uri = format!("http://{logic_addr}");
    let mut env: Vec<(&str, &str)> = vec![
        ("CHATROOM__WS__ADDR", "127.0.0.1:0"),
        ("CHATROOM__GRPC__ADDR", "127.0.0.1:0"),
        ("CHATROOM__LOG__DIR", ""),
        ("CHATROOM__REPORT_ONLINE_MS", "100"),
        ("CHATROOM__DISCOVERY__LOGIC", &logic_uri),
        ("CHATROOM__WS__SIGN_IN_TIMEOUT_MS", "1000"),
        ("CHATROOM__WS__MAX_FRAME_BYTES", "4096"),
    ];
    env.extend_from_slice(extra);
    let cfg = ConnConfig::from_overrides(env).unwrap();
    let listeners = Listeners::bind(&cfg).await.unwrap();
    let url = chatroom_conn::ws_url(listeners.ws.local_addr().unwrap());
    let grpc = listeners.grpc.local_addr().unwrap();
    let stop = CancellationToken::new();
    let done = tokio::spawn({
        let stop = stop.clone();
        async move { chatroom_conn::run(cfg, listeners, stop).await.unwrap() }
    });
    Node {
        url,
        grpc,
        logic,
        stop,
        done,
    }
}

async fn push(grpc: SocketAddr, room: &str, level: MsgLevel, msgs: &[&[u8]]) -> (u32, u32) {
    let mut c = ConnClient::connect(format!("http://{grpc}")).await.unwrap();
    let r = c
        .push_room(PushRoomReq {
            room_id: room.into(),
            level: level as i32,
            batch: chatroom_common::batch::encode(msgs.iter().copied()),
        })
        .await
        .unwrap()
        .into_inner();
    (r.delivered, r.dropped)
}

const T: Duration = Duration::from_secs(5);

#[tokio::test]
async fn sign_in_heartbeat_message_members_and_push() {
    let n = start(&[]).await;
    let mut a = Client::signed_in(&n.url, "good-alice", "r1").await.unwrap();
    let mut b = Client::signed_in(&n.url, "good-bob", "r1").await.unwrap();
    let mut c = Client::signed_in(&n.url, "good-carol", "r2").await.unwrap();
    assert_eq!(&a.heartbeat().await.unwrap()[..], b"pong");

    // A client message goes to logic with the session's uid.
    a.send_message("r1", MsgLevel::Normal, b"hello")
        .await
        .unwrap();
    let logic = n.logic.clone();
    let got = eventually(T, "logic received the message", || {
        let l = logic.clone();
        async move { l.received.lock().unwrap().first().cloned() }
    })
    .await
    .unwrap();
    assert_eq!(got.uid, "alice");
    let m = got.msg.unwrap();
    assert_eq!((m.room_id.as_str(), &m.data[..]), ("r1", &b"hello"[..]));

    // Messages to another room are refused.
    a.send_message("r2", MsgLevel::Normal, b"x").await.unwrap();
    assert_eq!(a.expect_err().await.unwrap().code, 403);

    // A merged push reaches every session of the room, decoded in order.
    let (delivered, dropped) = push(n.grpc, "r1", MsgLevel::Important, &[b"m1", b"m2"]).await;
    assert_eq!((delivered, dropped), (2, 0));
    for cl in [&mut a, &mut b] {
        let got = cl.recv_messages(2, T).await.unwrap();
        assert_eq!(got[0], (MsgLevel::Important, Bytes::from_static(b"m1")));
        assert_eq!(got[1].1, Bytes::from_static(b"m2"));
    }
    // ... and not other rooms: carol's next message is her own room's.
    push(n.grpc, "r2", MsgLevel::Normal, &[b"only-r2"]).await;
    let got = c.recv_messages(1, T).await.unwrap();
    assert_eq!(&got[0].1[..], b"only-r2");

    // MEMBERS answers the cluster total logic reported back (2 + 1000).
    eventually(T, "members from logic", || {
        let url = n.url.clone();
        async move {
            let mut x = Client::signed_in(&url, "good-dave", "r1").await.ok()?;
            let m = x.members().await.ok()?;
            (m == 1003).then_some(())
        }
    })
    .await
    .unwrap();

    // Shutdown closes sessions with Going Away.
    n.stop.cancel();
    let f = a.expect_close().await.unwrap().expect("close frame");
    assert_eq!(u16::from(f.code), 1001);
    tokio::time::timeout(T, n.done).await.unwrap().unwrap();
}

#[tokio::test]
async fn bad_input_gets_errors_and_others_keep_being_served() {
    let n = start(&[]).await;
    let mut ok = Client::signed_in(&n.url, "good-ok", "r").await.unwrap();

    // Before sign-in: garbage, MESSAGE, MEMBERS, text, bad token, empty room.
    let mut c = Client::connect(&n.url).await.unwrap();
    c.send_raw(vec![0xff, 0xff, 0xff]).await.unwrap();
    assert_eq!(c.expect_err().await.unwrap().code, 400);
    assert!(c.expect_close().await.is_ok());

    for kind in [PackageType::Message, PackageType::Members] {
        let mut c = Client::connect(&n.url).await.unwrap();
        c.send_req(kind, Bytes::new()).await.unwrap();
        let e = c.expect_err().await.unwrap();
        assert_eq!(e.code, 100, "{kind:?}: {}", e.msg);
        assert!(c.expect_close().await.is_ok());
    }

    let mut c = Client::connect(&n.url).await.unwrap();
    let e = c.sign_in("forged", "r").await.unwrap();
    assert_eq!(e.code, 100);
    assert!(e.msg.contains("token"), "{}", e.msg);
    assert_eq!(
        u16::from(c.expect_close().await.unwrap().unwrap().code),
        1008
    );

    let mut c = Client::connect(&n.url).await.unwrap();
    let e = c.sign_in("good-x", "").await.unwrap();
    assert_eq!((e.code, e.msg.as_str()), (400, "room id is empty"));

    let mut c = Client::connect(&n.url).await.unwrap();
    use futures_util::SinkExt;
    c.ws.send(tokio_tungstenite::tungstenite::Message::Text("hi".into()))
        .await
        .unwrap();
    assert_eq!(c.expect_err().await.unwrap().code, 400);

    // No sign-in within the deadline: closed.
    let mut c = Client::connect(&n.url).await.unwrap();
    let e = c.expect_err().await.unwrap();
    assert_eq!(e.code, 100);
    assert!(c.expect_close().await.is_ok());

    // Signed in: garbage, text, unknown type and a second sign-in get errors
    // and the session goes on.
    let mut s = Client::signed_in(&n.url, "good-s", "r").await.unwrap();
    s.send_raw(vec![0x0a, 0xff]).await.unwrap();
    assert_eq!(s.expect_err().await.unwrap().code, 400);
    s.ws.send(tokio_tungstenite::tungstenite::Message::Text("hi".into()))
        .await
        .unwrap();
    assert_eq!(s.expect_err().await.unwrap().code, 400);
    let raw = chatroom_common::proto::protocol::Req {
        r#type: 9,
        data: Bytes::new(),
    };
    s.send_raw(prost::Message::encode_to_vec(&raw))
        .await
        .unwrap();
    let e = s.expect_err().await.unwrap();
    assert_eq!(e.code, 404);
    assert!(e.msg.contains("unknown"), "{}", e.msg);
    s.send_req(PackageType::SignIn, Bytes::new()).await.unwrap();
    assert_eq!(s.expect_err().await.unwrap().code, 409);
    s.send_req(PackageType::Message, vec![0xff]).await.unwrap();
    assert_eq!(s.expect_err().await.unwrap().code, 400);
    assert_eq!(&s.heartbeat().await.unwrap()[..], b"pong");

    // Oversize frame: an error, then the session is closed (1009).
    s.send_raw(vec![0u8; 8192]).await.unwrap();
    assert_eq!(s.expect_err().await.unwrap().code, 413);
    assert_eq!(
        u16::from(s.expect_close().await.unwrap().unwrap().code),
        1009
    );

    // The session signed in first was served all along.
    assert_eq!(&ok.heartbeat().await.unwrap()[..], b"pong");
    push(n.grpc, "r", MsgLevel::Normal, &[b"still here"]).await;
    assert_eq!(
        &ok.recv_messages(1, T).await.unwrap()[0].1[..],
        b"still here"
    );

    // Wrong path: the handshake is refused.
    assert!(
        Client::connect(&n.url.replace("/room", "/nope"))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn silent_client_is_closed_after_missed_heartbeats() {
    let n = start(&[
        ("CHATROOM__WS__HEARTBEAT_SECS", "1"),
        ("CHATROOM__WS__HEARTBEAT_MISSES", "1"),
    ])
    .await;
    let mut a = Client::signed_in(&n.url, "good-a", "r").await.unwrap();
    let start = tokio::time::Instant::now();
    let f = a.expect_close().await.unwrap().unwrap();
    assert_eq!(f.reason.as_str(), "heartbeat timeout");
    assert!(start.elapsed() >= Duration::from_millis(900));
    // sign-out reached logic
    let logic = n.logic.clone();
    eventually(T, "sign-out", || {
        let l = logic.clone();
        async move {
            l.signed_out
                .lock()
                .unwrap()
                .contains(&"a".to_string())
                .then_some(())
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn slow_consumer_is_cut_off_without_slowing_others() {
    let n = start(&[("CHATROOM__WS__SEND_QUEUE", "4")]).await;
    let _slow = Client::signed_in(&n.url, "good-slow", "r").await.unwrap();
    let mut fast = Client::signed_in(&n.url, "good-fast", "r").await.unwrap();
    let big = vec![b'x'; 32 * 1024];
    let reader = tokio::spawn(async move {
        fast.recv_messages(400, Duration::from_secs(30))
            .await
            .map(|v| v.len())
    });
    let mut cut = false;
    for _ in 0..400 {
        let (_, dropped) = push(n.grpc, "r", MsgLevel::Important, &[&big]).await;
        cut |= dropped > 0;
    }
    assert!(cut, "the slow session was never cut off");
    assert_eq!(
        reader.await.unwrap().unwrap(),
        400,
        "the fast session lost messages"
    );
}

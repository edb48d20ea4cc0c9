//! conn on its own, against a fake logic: the client protocol, pushes, bad
//! input, heartbeats, slow consumers and shutdown.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chatroom_common::config::Load;
use chatroom_common::proto::conn::conn_client::ConnClient;
use chatroom_common::proto::conn::{PushRoomReq, PushRoomsReq};
use chatroom_common::proto::logic::logic_server::{Logic, LogicServer};
use chatroom_common::proto::logic::*;
use chatroom_common::proto::protocol::{ChatAck, ChatMsg, ChatStatus, MsgLevel, PackageType};
use chatroom_conn::{ConnConfig, Listeners};
use chatroom_tests::client::{Client, eventually};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// Accepts tokens `good-<uid>`, refuses the rest; records received messages;
/// answers online totals as local count + 1000 (so tests can tell they came
/// from logic). IM: user "9" is in community 5 and has two stored messages;
/// chat messages to dstid 404 are refused, others acked (STORED for 8).
#[derive(Default, Clone)]
struct FakeLogic {
    received: Arc<Mutex<Vec<ReceiveReq>>>,
    /// Messages per `ReceiveMany` call.
    bundles: Arc<Mutex<Vec<usize>>>,
    /// While set, room message calls wait until `open_gate`.
    gated: Arc<AtomicBool>,
    gate: Arc<tokio::sync::Notify>,
    /// Messages in calls that are waiting at the gate.
    held: Arc<AtomicUsize>,
    /// Answer `ReceiveMany` as an older logic would: unimplemented.
    no_bundles: Arc<AtomicBool>,
    signed_out: Arc<Mutex<Vec<String>>>,
    chats: Arc<Mutex<Vec<ChatReq>>>,
    pending_acked: Arc<Mutex<Vec<(String, i64)>>>,
    undelivered: Arc<Mutex<Vec<UndeliveredReq>>>,
    /// Room history served by `RoomHistory`: (epoch, kept entries).
    history: Arc<Mutex<(u64, Vec<RoomHistoryEntry>)>>,
}

fn stored(id: i64, content: &str) -> ChatMsg {
    ChatMsg {
        id,
        userid: 2,
        dstid: 9,
        cmd: 10,
        media: 1,
        content: content.into(),
        created_ms: id,
        ..Default::default()
    }
}

impl FakeLogic {
    async fn hold(&self, messages: usize) {
        // Registered before looking at the flag, so an opening in between
        // is not missed.
        let opened = self.gate.notified();
        tokio::pin!(opened);
        opened.as_mut().enable();
        if self.gated.load(Ordering::SeqCst) {
            self.held.fetch_add(messages, Ordering::SeqCst);
            opened.await;
        }
    }

    fn open_gate(&self) {
        self.gated.store(false, Ordering::SeqCst);
        self.gate.notify_waiters();
    }
}

#[tonic::async_trait]
impl Logic for FakeLogic {
    async fn sign_in(&self, r: Request<SignInReq>) -> Result<Response<SignInReply>, Status> {
        let r = r.into_inner();
        let reply = match r.token.strip_prefix("good-") {
            Some(uid) if !r.uid.is_empty() && r.uid != uid => SignInReply {
                code: 100,
                msg: "login needed: id does not match token".into(),
                ..Default::default()
            },
            Some(uid) => SignInReply {
                code: 0,
                msg: "ok".into(),
                uid: uid.into(),
                key: format!("k-{uid}"),
                heartbeat_secs: 30,
                rooms: if uid == "9" {
                    vec!["c:5".into()]
                } else {
                    vec![]
                },
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
        self.hold(1).await;
        self.received.lock().unwrap().push(r.into_inner());
        Ok(Response::new(ReceiveReply {
            code: 0,
            msg: "ok".into(),
            id: 7,
        }))
    }
    async fn receive_many(
        &self,
        r: Request<ReceiveManyReq>,
    ) -> Result<Response<ReceiveManyReply>, Status> {
        if self.no_bundles.load(Ordering::SeqCst) {
            return Err(Status::unimplemented("ReceiveMany"));
        }
        let msgs = r.into_inner().msgs;
        let n = msgs.len();
        self.hold(n).await;
        self.received.lock().unwrap().extend(msgs);
        self.bundles.lock().unwrap().push(n);
        let reply = ReceiveReply {
            code: 0,
            msg: "ok".into(),
            id: 7,
        };
        Ok(Response::new(ReceiveManyReply {
            replies: vec![reply; n],
        }))
    }
    async fn chat(&self, r: Request<ChatReq>) -> Result<Response<ChatReply>, Status> {
        let r = r.into_inner();
        self.chats.lock().unwrap().push(r.clone());
        let m = r.msg.unwrap_or_default();
        if m.dstid == 404 {
            return Ok(Response::new(ChatReply {
                code: 403,
                msg: "not friends".into(),
                ack: None,
            }));
        }
        let status = if m.dstid == 8 {
            ChatStatus::Stored
        } else {
            ChatStatus::Delivered
        };
        Ok(Response::new(ChatReply {
            code: 0,
            msg: "ok".into(),
            ack: Some(ChatAck {
                id: 1000 + m.id,
                client_id: m.id,
                dstid: m.dstid,
                cmd: m.cmd,
                status: status as i32,
                created_ms: 1,
            }),
        }))
    }
    async fn pending(&self, r: Request<PendingReq>) -> Result<Response<PendingReply>, Status> {
        let r = r.into_inner();
        let acked = self
            .pending_acked
            .lock()
            .unwrap()
            .iter()
            .any(|(u, _)| *u == r.uid);
        let msgs = if r.uid == "9" && !acked {
            vec![stored(1, "while you were away"), stored(2, "second")]
        } else {
            vec![]
        };
        Ok(Response::new(PendingReply { msgs, more: false }))
    }
    async fn ack_pending(
        &self,
        r: Request<AckPendingReq>,
    ) -> Result<Response<AckPendingReply>, Status> {
        let r = r.into_inner();
        self.pending_acked.lock().unwrap().push((r.uid, r.upto_id));
        Ok(Response::new(AckPendingReply {}))
    }
    async fn undelivered(
        &self,
        r: Request<UndeliveredReq>,
    ) -> Result<Response<UndeliveredReply>, Status> {
        self.undelivered.lock().unwrap().push(r.into_inner());
        Ok(Response::new(UndeliveredReply { stored: 1 }))
    }
    async fn room_history(
        &self,
        r: Request<RoomHistoryReq>,
    ) -> Result<Response<RoomHistoryReply>, Status> {
        let r = r.into_inner();
        let (epoch, kept) = self.history.lock().unwrap().clone();
        let last = kept.last().map_or(0, |e| e.offset);
        let first = kept.first().map_or(last + 1, |e| e.offset);
        let until = if r.until_offset == 0 {
            last
        } else {
            r.until_offset
        };
        // Pages of at most 1 MiB, as logic answers.
        let mut bytes = 0;
        let entries: Vec<_> = if r.epoch == epoch {
            kept.into_iter()
                .filter(|e| e.offset > r.after_offset && e.offset <= until)
                .take(r.limit as usize)
                .take_while(|e| {
                    bytes += e.data.len();
                    bytes <= 1 << 20
                })
                .collect()
        } else {
            vec![]
        };
        Ok(Response::new(RoomHistoryReply {
            epoch,
            last_offset: last,
            complete: r.epoch == epoch && first <= r.after_offset + 1,
            entries,
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
        ("CHATROOM__REPORT_ONLINE", "100ms"),
        ("CHATROOM__DISCOVERY__LOGIC", &logic_uri),
        ("CHATROOM__WS__SIGN_IN_TIMEOUT", "1s"),
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
            kind: 0,
            ..Default::default()
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
        ("CHATROOM__WS__HEARTBEAT", "1s"),
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

/// Pushes messages `first..` of `epoch` to a room, as job does.
async fn push_seq(
    grpc: SocketAddr,
    room: &str,
    level: MsgLevel,
    epoch: u64,
    first: u64,
    msgs: &[&[u8]],
) -> u32 {
    let mut c = ConnClient::connect(format!("http://{grpc}")).await.unwrap();
    c.push_room(PushRoomReq {
        room_id: room.into(),
        level: level as i32,
        batch: chatroom_common::batch::encode(msgs.iter().copied()),
        kind: 0,
        offsets: (first..first + msgs.len() as u64).collect(),
        epoch,
    })
    .await
    .unwrap()
    .into_inner()
    .delivered
}

/// `n` distinct payloads `p<first>`, `p<first+1>`, ...
fn payloads(first: u64, n: u64) -> Vec<Vec<u8>> {
    (first..first + n)
        .map(|i| format!("p{i}").into_bytes())
        .collect()
}

#[tokio::test]
async fn a_slow_session_is_not_cut_off_and_recovers_important_messages_from_logic() {
    // The stream keeps 8 messages: a session that stops reading falls far
    // behind it; IMPORTANT messages it lost come from logic's history.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let n = start(&[("CHATROOM__STREAM__RETAIN_MESSAGES", "8")]).await;
    let mut slow = Client::signed_in(&n.url, "good-slow", "r").await.unwrap();
    let mut fast = Client::signed_in(&n.url, "good-fast", "r").await.unwrap();
    let big = vec![b'x'; 32 * 1024];
    let total = 300u64;
    let reader = tokio::spawn(async move {
        fast.recv_stream(total as usize, Duration::from_secs(30))
            .await
            .map(|r| r.offsets())
    });
    let epoch = 7;
    for i in 1..=total {
        let mut payload = big.clone();
        payload[..8].copy_from_slice(&i.to_le_bytes());
        n.logic.history.lock().unwrap().0 = epoch;
        n.logic.history.lock().unwrap().1.push(RoomHistoryEntry {
            offset: i,
            level: MsgLevel::Important as i32,
            data: payload.clone().into(),
        });
        push_seq(n.grpc, "r", MsgLevel::Important, epoch, i, &[&payload]).await;
    }
    let want: Vec<u64> = (1..=total).collect();
    assert_eq!(
        reader.await.unwrap().unwrap(),
        want,
        "the fast session was held back or lost messages"
    );
    // 300 x 32 KiB is far more than the socket buffers: the slow session's
    // writer was behind the stream's reach, yet it gets every message once.
    let got = slow
        .recv_stream(total as usize, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(got.offsets(), want);
    for m in &got.msgs {
        assert_eq!(&m.data[..8], &m.offset.to_le_bytes());
        assert_eq!(m.level, MsgLevel::Important);
    }
    assert!(got.notices.is_empty(), "{:?}", got.notices);
}

#[tokio::test]
async fn a_session_behind_takes_what_it_lacks_in_few_merged_frames() {
    let n = start(&[]).await;
    let mut a = Client::signed_in(&n.url, "good-a", "r").await.unwrap();
    let first = payloads(1, 100);
    for (i, p) in first.iter().enumerate() {
        push_seq(n.grpc, "r", MsgLevel::Normal, 3, 1 + i as u64, &[p]).await;
    }
    let got = a.recv_stream(100, T).await.unwrap();
    assert_eq!(got.offsets(), (1..=100).collect::<Vec<_>>());
    // A second session that was away since offset 20 gets 21..=100 merged:
    // one frame, not 80.
    let mut b = Client::connect(&n.url).await.unwrap();
    let e = b.sign_in_resume("good-b", "r", 3, 20).await.unwrap();
    assert_eq!((e.code, e.recovered, e.epoch, e.offset), (0, true, 3, 100));
    let got = b.recv_stream(80, T).await.unwrap();
    assert_eq!(got.offsets(), (21..=100).collect::<Vec<_>>());
    let datas: Vec<Vec<u8>> = got.msgs.iter().map(|m| m.data.to_vec()).collect();
    assert_eq!(datas, first[20..].to_vec(), "exactly the missing messages");
    assert_eq!(got.frames, 1);
    // Then live, no gap, no duplicate.
    push_seq(n.grpc, "r", MsgLevel::Normal, 3, 101, &[b"live"]).await;
    let got = b.recv_stream(1, T).await.unwrap();
    assert_eq!(
        (got.offsets(), &got.msgs[0].data[..]),
        (vec![101], &b"live"[..])
    );
}

#[tokio::test]
async fn recovery_from_logic_partial_and_after_an_epoch_change() {
    // The stream keeps 3 messages; logic keeps offsets 3..=10 of epoch 5.
    let n = start(&[("CHATROOM__STREAM__RETAIN_MESSAGES", "3")]).await;
    let mut a = Client::signed_in(&n.url, "good-a", "r").await.unwrap();
    let p = payloads(1, 10);
    for i in 1..=10u64 {
        push_seq(n.grpc, "r", MsgLevel::Normal, 5, i, &[&p[i as usize - 1]]).await;
    }
    a.recv_stream(10, T).await.unwrap();
    *n.logic.history.lock().unwrap() = (
        5,
        (3..=10u64)
            .map(|i| RoomHistoryEntry {
                offset: i,
                level: 0,
                data: p[i as usize - 1].clone().into(),
            })
            .collect(),
    );

    // Complete: 5..=7 from logic, 8..=10 from the stream.
    let mut b = Client::connect(&n.url).await.unwrap();
    let e = b.sign_in_resume("good-b", "r", 5, 4).await.unwrap();
    assert_eq!((e.code, e.recovered), (0, true));
    let got = b.recv_stream(6, T).await.unwrap();
    assert_eq!(got.offsets(), (5..=10).collect::<Vec<_>>());
    assert_eq!(got.msgs[0].data, p[4]);

    // Partial: offsets 2 is gone everywhere; what there is still comes.
    let mut c = Client::connect(&n.url).await.unwrap();
    let e = c.sign_in_resume("good-c", "r", 5, 1).await.unwrap();
    assert_eq!((e.code, e.recovered), (0, false));
    let got = c.recv_stream(8, T).await.unwrap();
    assert_eq!(got.offsets(), (3..=10).collect::<Vec<_>>());

    // Another epoch: offsets are not comparable; live only, and it says so.
    let mut d = Client::connect(&n.url).await.unwrap();
    let e = d.sign_in_resume("good-d", "r", 4, 9).await.unwrap();
    assert_eq!((e.code, e.recovered, e.epoch, e.offset), (0, false, 5, 10));
    push_seq(n.grpc, "r", MsgLevel::Normal, 5, 11, &[b"eleven"]).await;
    let got = d.recv_stream(1, T).await.unwrap();
    assert_eq!(got.offsets(), vec![11]);

    // A pushed duplicate (a queue redelivery) reaches nobody twice.
    push_seq(n.grpc, "r", MsgLevel::Normal, 5, 11, &[b"eleven"]).await;
    push_seq(n.grpc, "r", MsgLevel::Normal, 5, 12, &[b"twelve"]).await;
    let got = d.recv_stream(1, T).await.unwrap();
    assert_eq!(got.offsets(), vec![12]);
}

#[tokio::test]
async fn pipelined_messages_keep_their_order_and_wait_for_slots_instead_of_dropping() {
    let n = start(&[("CHATROOM__WS__MAX_IN_FLIGHT", "16")]).await;
    let mut a = Client::signed_in(&n.url, "good-a", "r").await.unwrap();
    // logic stalls: the session may have 16 messages on their way, then
    // conn stops reading it.
    n.logic.gated.store(true, Ordering::SeqCst);
    for i in 0..200 {
        a.send_message("r", MsgLevel::Normal, format!("m{i}").as_bytes())
            .await
            .unwrap();
    }
    let logic = n.logic.clone();
    eventually(T, "a call waiting at the stalled logic", || {
        let l = logic.clone();
        async move { (l.held.load(Ordering::SeqCst) > 0).then_some(()) }
    })
    .await
    .unwrap();
    n.logic.open_gate();
    let logic = n.logic.clone();
    eventually(T, "all 200 messages at logic", || {
        let l = logic.clone();
        async move { (l.received.lock().unwrap().len() == 200).then_some(()) }
    })
    .await
    .unwrap();
    let got: Vec<Bytes> = n
        .logic
        .received
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.msg.clone().unwrap().data)
        .collect();
    let want: Vec<Bytes> = (0..200).map(|i| Bytes::from(format!("m{i}"))).collect();
    assert_eq!(got, want, "in the order sent, none lost");
    let bundles = n.logic.bundles.lock().unwrap().clone();
    assert!(
        bundles.iter().any(|&b| b > 1),
        "several messages were on their way at once: {bundles:?}"
    );
    assert!(
        bundles.iter().all(|&b| b <= 16),
        "never more than the session's 16 in flight: {bundles:?}"
    );
}

#[tokio::test]
async fn every_message_sent_before_the_close_frame_reaches_logic() {
    let n = start(&[]).await;
    let mut a = Client::signed_in(&n.url, "good-a", "r").await.unwrap();
    let total = 10_000;
    // Written without waiting for anything, then a close frame at once.
    for i in 0..total {
        let m = chatroom_common::proto::protocol::BroadcastRoomReq {
            room_id: "r".into(),
            data: format!("m{i}").into(),
            ..Default::default()
        };
        let req = chatroom_common::proto::protocol::Req {
            r#type: PackageType::Message as i32,
            data: prost::Message::encode_to_vec(&m).into(),
        };
        let frame = tokio_tungstenite::tungstenite::Message::Binary(
            prost::Message::encode_to_vec(&req).into(),
        );
        futures_util::SinkExt::feed(&mut a.ws, frame).await.unwrap();
    }
    futures_util::SinkExt::close(&mut a.ws).await.unwrap();
    let logic = n.logic.clone();
    eventually(
        Duration::from_secs(30),
        "all 10,000 messages at logic",
        || {
            let l = logic.clone();
            async move { (l.received.lock().unwrap().len() >= total).then_some(()) }
        },
    )
    .await
    .unwrap();
    let got = n.logic.received.lock().unwrap();
    assert_eq!(got.len(), total);
    assert!(
        got.iter()
            .enumerate()
            .all(|(i, r)| r.msg.as_ref().unwrap().data == format!("m{i}").as_bytes()),
        "in order"
    );
}

mod im {
    use super::*;
    use chatroom_common::proto::conn::{JoinRoomReq, PushAllReq, PushKind, PushUsersReq};
    use chatroom_common::proto::protocol::{BroadcastRoomReq, Reply};
    use chatroom_tests::client::Event;
    use futures_util::{SinkExt, StreamExt};
    use prost::Message as _;
    use tokio_tungstenite::tungstenite::Message;

    type Json = tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >;

    async fn json_client(n: &Node, query: &str) -> Json {
        let url = format!("{}?{query}", n.url.replace("/room", "/chat"));
        tokio_tungstenite::connect_async(url).await.unwrap().0
    }

    /// The next JSON text frame; panics on anything else or on timeout.
    async fn next_json(ws: &mut Json) -> serde_json::Value {
        loop {
            match tokio::time::timeout(T, ws.next())
                .await
                .expect("a frame in time")
            {
                Some(Ok(Message::Text(t))) => return serde_json::from_str(t.as_str()).unwrap(),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a JSON text frame, got {other:?}"),
            }
        }
    }

    async fn send_json(ws: &mut Json, v: serde_json::Value) {
        ws.send(Message::Text(v.to_string().into())).await.unwrap();
    }

    fn chat(id: i64, content: &str) -> ChatMsg {
        ChatMsg {
            id,
            userid: 2,
            dstid: 9,
            cmd: 11,
            media: 1,
            content: content.into(),
            ..Default::default()
        }
    }

    async fn conn_client(n: &Node) -> ConnClient<tonic::transport::Channel> {
        ConnClient::connect(format!("http://{}", n.grpc))
            .await
            .unwrap()
    }

    /// Reads protobuf replies until a CHAT one arrives.
    async fn next_chat(c: &mut Client) -> ChatMsg {
        loop {
            let r: Reply = c.next_reply().await.unwrap();
            if r.r#type == PackageType::Chat as i32 {
                return ChatMsg::decode(r.data).unwrap();
            }
        }
    }

    #[tokio::test]
    async fn json_session_gets_pending_acks_errors_and_pushes() {
        let n = start(&[]).await;
        let mut j = json_client(&n, "id=9&token=good-9").await;
        let w = next_json(&mut j).await;
        assert_eq!(
            (w["cmd"].as_i64(), w["code"].as_i64()),
            (Some(22), Some(0)),
            "{w}"
        );
        // What was stored while offline comes first, in order, then is acked.
        assert_eq!(next_json(&mut j).await["content"], "while you were away");
        assert_eq!(next_json(&mut j).await["content"], "second");
        let logic = n.logic.clone();
        eventually(T, "pending acked up to 2", || {
            let l = logic.clone();
            async move {
                l.pending_acked
                    .lock()
                    .unwrap()
                    .contains(&("9".to_string(), 2))
                    .then_some(())
            }
        })
        .await
        .unwrap();

        // Sending: acks say delivered / stored and name both ids.
        send_json(&mut j, serde_json::json!({"id": 1, "userid": 777, "dstid": 3, "cmd": 10, "media": 1, "content": "hi"})).await;
        let a = next_json(&mut j).await;
        assert_eq!(
            (a["cmd"].as_i64(), a["cid"].as_i64(), a["id"].as_i64()),
            (Some(20), Some(1), Some(1001))
        );
        assert_eq!(a["content"], "success send");
        // logic saw the sender from the session, whatever the client claimed.
        assert_eq!(n.logic.chats.lock().unwrap()[0].uid, "9");
        send_json(
            &mut j,
            serde_json::json!({"id": 2, "dstid": 8, "cmd": 10, "media": 1, "content": "hi"}),
        )
        .await;
        assert_eq!(next_json(&mut j).await["content"], "not online");
        send_json(
            &mut j,
            serde_json::json!({"id": 3, "dstid": 404, "cmd": 10, "media": 1, "content": "hi"}),
        )
        .await;
        let e = next_json(&mut j).await;
        assert_eq!(
            (e["cmd"].as_i64(), e["code"].as_i64(), e["cid"].as_i64()),
            (Some(21), Some(403), Some(3))
        );

        // Heartbeat, bad input: errors, and the session goes on.
        send_json(&mut j, serde_json::json!({"cmd": 0})).await;
        assert_eq!(next_json(&mut j).await["content"], "pong");
        j.send(Message::Text("{not json".into())).await.unwrap();
        assert_eq!(next_json(&mut j).await["code"], 400);
        send_json(&mut j, serde_json::json!({"cmd": 99})).await;
        assert_eq!(next_json(&mut j).await["code"], 404);
        j.send(Message::Binary(vec![1, 2, 3].into())).await.unwrap();
        assert_eq!(next_json(&mut j).await["code"], 400);

        // Pushes: to the user, to its community room (joined at sign-in), to all.
        let mut c = conn_client(&n).await;
        let r = c
            .push_users(PushUsersReq {
                uids: vec!["9".into()],
                msg: Some(chat(50, "direct")),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.delivered, 1);
        assert_eq!(next_json(&mut j).await["content"], "direct");
        let batch = chatroom_common::batch::encode([
            &chat(51, "g1").encode_to_vec()[..],
            &chat(52, "g2").encode_to_vec()[..],
        ]);
        c.push_room(PushRoomReq {
            room_id: "c:5".into(),
            level: MsgLevel::Important as i32,
            batch,
            kind: PushKind::Chat as i32,
            ..Default::default()
        })
        .await
        .unwrap();
        let (g1, g2) = (next_json(&mut j).await, next_json(&mut j).await);
        assert_eq!(
            (g1["content"].as_str(), g2["content"].as_str()),
            (Some("g1"), Some("g2"))
        );
        assert_eq!(g1["cmd"], 11);
        c.push_all(PushAllReq {
            msg: Some(chat(53, "everyone")),
        })
        .await
        .unwrap();
        assert_eq!(next_json(&mut j).await["content"], "everyone");
    }

    #[tokio::test]
    async fn protobuf_and_json_sessions_share_one_model() {
        let n = start(&[]).await;
        let mut j = json_client(&n, "id=9&token=good-9").await;
        next_json(&mut j).await; // welcome
        next_json(&mut j).await; // pending x2
        next_json(&mut j).await;
        let mut p = Client::signed_in(&n.url, "good-9", "lobby").await.unwrap();

        // A live join reaches both sessions of the user at once.
        let mut c = conn_client(&n).await;
        let r = c
            .join_room(JoinRoomReq {
                uid: "9".into(),
                room: "c:6".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.sessions, 2);
        let batch = chatroom_common::batch::encode([&chat(60, "in six").encode_to_vec()[..]]);
        let r = c
            .push_room(PushRoomReq {
                room_id: "c:6".into(),
                level: MsgLevel::Important as i32,
                batch,
                kind: PushKind::Chat as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.delivered, 2);
        assert_eq!(next_json(&mut j).await["content"], "in six");
        assert_eq!(next_chat(&mut p).await.content, "in six");

        // Protobuf CHAT gets a CHAT_ACK; a refused one an Err naming it.
        let m = ChatMsg {
            id: 7,
            dstid: 3,
            cmd: 10,
            media: 1,
            content: "pb".into(),
            ..Default::default()
        };
        p.send_req(PackageType::Chat, m.encode_to_vec())
            .await
            .unwrap();
        let r = loop {
            let r = p.next_reply().await.unwrap();
            if r.r#type != PackageType::Chat as i32 {
                break r;
            }
        };
        assert_eq!(r.r#type, PackageType::ChatAck as i32);
        let ack = ChatAck::decode(r.data).unwrap();
        assert_eq!((ack.id, ack.client_id), (1007, 7));
        let bad = ChatMsg { dstid: 404, ..m };
        p.send_req(PackageType::Chat, bad.encode_to_vec())
            .await
            .unwrap();
        let e = p.expect_err().await.unwrap();
        assert_eq!((e.code, e.ref_id), (403, 7));
        p.send_req(PackageType::Chat, vec![0xff, 0xff])
            .await
            .unwrap();
        assert_eq!(p.expect_err().await.unwrap().code, 400);
    }

    #[tokio::test]
    async fn a_message_for_a_user_who_left_is_reported_to_logic() {
        let n = start(&[]).await;
        let mut c = conn_client(&n).await;
        // A 1:1 message routed here for user 9, who has no session here:
        // conn tells logic, which stores it for the next sign-in.
        let m = ChatMsg {
            id: 77,
            userid: 2,
            dstid: 9,
            cmd: 10,
            media: 1,
            content: "late".into(),
            ..Default::default()
        };
        let r = c
            .push_users(PushUsersReq {
                uids: vec!["9".into(), "2".into()],
                msg: Some(m.clone()),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.delivered, 0);
        let logic = n.logic.clone();
        let got = eventually(T, "undelivered reported", || {
            let l = logic.clone();
            async move { l.undelivered.lock().unwrap().first().cloned() }
        })
        .await
        .unwrap();
        assert_eq!((got.uid.as_str(), got.ids.as_slice()), ("9", &[77][..]));
        // With the user here, nothing is reported.
        let mut j = json_client(&n, "id=9&token=good-9").await;
        for _ in 0..3 {
            next_json(&mut j).await; // welcome, two pending
        }
        c.push_users(PushUsersReq {
            uids: vec!["9".into()],
            msg: Some(ChatMsg { id: 78, ..m }),
        })
        .await
        .unwrap();
        assert_eq!(next_json(&mut j).await["id"], 78);
        assert_eq!(n.logic.undelivered.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn chat_sign_in_refusals() {
        let n = start(&[]).await;
        for (query, code) in [
            ("id=1&token=good-9", 100),
            ("id=9", 100),
            ("id=9&token=forged", 100),
        ] {
            let mut j = json_client(&n, query).await;
            let e = next_json(&mut j).await;
            assert_eq!(
                (e["cmd"].as_i64(), e["code"].as_i64()),
                (Some(21), Some(code)),
                "{query}: {e}"
            );
            match tokio::time::timeout(T, j.next()).await.unwrap() {
                Some(Ok(Message::Close(Some(f)))) => assert_eq!(u16::from(f.code), 1008),
                other => panic!("{query}: expected close, got {other:?}"),
            }
        }
    }

    /// Issue 13: a burst is not a slow client. 1,000 IMPORTANT room messages
    /// and then 1,000 IMPORTANT IM messages pushed at once to 100 sessions
    /// that read normally: nobody is cut, everything arrives once, in order.
    /// (A queue bounded by a count of frames — 64 — cut them all.)
    #[tokio::test]
    async fn a_burst_of_important_pushes_cuts_nobody() {
        const SESSIONS: usize = 100;
        const MSGS: u64 = 1000;
        let n = start(&[]).await;
        let mut clients = Vec::new();
        for i in 0..SESSIONS {
            clients.push(
                Client::signed_in(&n.url, &format!("good-b{i}"), "burst")
                    .await
                    .unwrap(),
            );
        }
        let mut c = conn_client(&n).await;
        // Room messages: 1,000 batches of one message in one bundle, as job
        // sends what gathered for a node after a pause, before anyone reads.
        let room_msgs = payloads(1, MSGS);
        let rooms = room_msgs
            .iter()
            .enumerate()
            .map(|(i, p)| PushRoomReq {
                room_id: "burst".into(),
                level: MsgLevel::Important as i32,
                batch: chatroom_common::batch::encode([&p[..]]),
                offsets: vec![1 + i as u64],
                epoch: 11,
                ..Default::default()
            })
            .collect();
        c.push_rooms(PushRoomsReq { rooms }).await.unwrap();
        // IM messages to the same room: each its own frame in the session's
        // queue, 1,000 of them waiting at once.
        // In one bundle, as job sends what gathered for a node after a pause.
        let rooms = (1..=MSGS as i64)
            .map(|id| PushRoomReq {
                room_id: "burst".into(),
                level: MsgLevel::Important as i32,
                batch: chatroom_common::batch::encode([
                    &chat(id, &format!("m{id}")).encode_to_vec()[..]
                ]),
                kind: PushKind::Chat as i32,
                ..Default::default()
            })
            .collect();
        c.push_rooms(PushRoomsReq { rooms }).await.unwrap();
        let want: Vec<u64> = (1..=MSGS).collect();
        let readers = clients.into_iter().map(|mut cl| {
            let want = want.clone();
            tokio::spawn(async move {
                let (mut offsets, mut ids) = (Vec::new(), Vec::new());
                let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                while offsets.len() < MSGS as usize || ids.len() < MSGS as usize {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    let r = match cl.next_event(left).await {
                        Ok(Event::Reply(r)) => r,
                        other => panic!(
                            "after {} room and {} IM messages: {other:?}",
                            offsets.len(),
                            ids.len()
                        ),
                    };
                    if r.r#type == PackageType::Message as i32 {
                        let m = BroadcastRoomReq::decode(r.data).unwrap();
                        let k = chatroom_common::batch::decode(&m.data).count() as u64;
                        offsets.extend(m.offset + 1 - k..=m.offset);
                    } else if r.r#type == PackageType::Chat as i32 {
                        ids.push(ChatMsg::decode(r.data).unwrap().id);
                    } else {
                        panic!("unexpected reply {r:?}");
                    }
                }
                assert_eq!(offsets, want, "room messages once, in order");
                let want_ids: Vec<i64> = (1..=MSGS as i64).collect();
                assert_eq!(ids, want_ids, "IM messages once, in order");
                // Still connected and served.
                cl.heartbeat().await.unwrap();
            })
        });
        for r in futures_util::future::join_all(readers).await {
            r.unwrap();
        }
    }
}

#[tokio::test]
async fn client_messages_that_gather_while_logic_is_busy_go_in_one_call() {
    let (bundles, n) = gather_forty_messages(false).await;
    assert!(bundles.iter().any(|&b| b > 1), "bundles: {bundles:?}");
    n.stop.cancel();
}

#[tokio::test]
async fn a_logic_without_receive_many_gets_each_message_on_its_own() {
    let (bundles, n) = gather_forty_messages(true).await;
    assert!(bundles.is_empty(), "bundles: {bundles:?}");
    n.stop.cancel();
}

/// Forty sessions each send a message while logic holds the first eight;
/// returns the sizes of the `ReceiveMany` calls logic answered, once every
/// message reached logic exactly once.
async fn gather_forty_messages(no_bundles: bool) -> (Vec<usize>, Node) {
    let n = start(&[]).await;
    let logic = n.logic.clone();
    logic.no_bundles.store(no_bundles, Ordering::SeqCst);
    logic.gated.store(true, Ordering::SeqCst);
    let mut clients = vec![];
    for i in 0..40 {
        let token = format!("good-u{i}");
        clients.push(Client::signed_in(&n.url, &token, "r1").await.unwrap());
    }
    // Eight messages take conn's eight call slots, held by logic...
    for c in &mut clients[..8] {
        c.send_message("r1", MsgLevel::Normal, b"first")
            .await
            .unwrap();
    }
    eventually(T, "eight messages held by logic", || {
        let held = logic.held.load(Ordering::SeqCst);
        async move { (held == 8).then_some(()) }
    })
    .await
    .unwrap();
    // ... so these wait at conn, and go together once a slot is free.
    for (i, c) in clients[8..].iter_mut().enumerate() {
        let m = format!("m{i}");
        c.send_message("r1", MsgLevel::Normal, m.as_bytes())
            .await
            .unwrap();
    }
    logic.open_gate();
    eventually(T, "every message reached logic", || {
        let n = logic.received.lock().unwrap().len();
        async move { (n == 40).then_some(()) }
    })
    .await
    .unwrap();
    let bundles = logic.bundles.lock().unwrap().clone();
    let mut uids: Vec<String> = logic
        .received
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.uid.clone())
        .collect();
    uids.sort();
    uids.dedup();
    assert_eq!(uids.len(), 40, "each message once, with its session's uid");
    (bundles, n)
}

#[tokio::test]
async fn push_rooms_pushes_several_rooms_in_order_or_nothing() {
    let n = start(&[]).await;
    let mut a = Client::signed_in(&n.url, "good-alice", "r1").await.unwrap();
    let mut b = Client::signed_in(&n.url, "good-bob", "r2").await.unwrap();
    let item = |room: &str, msgs: &[&[u8]]| PushRoomReq {
        room_id: room.into(),
        level: MsgLevel::Normal as i32,
        batch: chatroom_common::batch::encode(msgs.iter().copied()),
        kind: 0,
        ..Default::default()
    };
    let mut c = ConnClient::connect(format!("http://{}", n.grpc))
        .await
        .unwrap();

    // One bad item refuses the call before anything is pushed.
    let err = c
        .push_rooms(PushRoomsReq {
            rooms: vec![item("r1", &[b"never"]), item("", &[b"x"])],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    let r = c
        .push_rooms(PushRoomsReq {
            rooms: vec![
                item("r1", &[b"a1"]),
                item("r2", &[b"b1", b"b2"]),
                item("nobody-here", &[b"z"]),
                item("r1", &[b"a2"]),
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .rooms;
    let counts: Vec<(u32, u32)> = r.iter().map(|r| (r.delivered, r.dropped)).collect();
    assert_eq!(counts, [(1, 0), (1, 0), (0, 0), (1, 0)]);
    let got: Vec<Bytes> = a
        .recv_messages(2, T)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, m)| m)
        .collect();
    assert_eq!(
        got,
        [&b"a1"[..], &b"a2"[..]],
        "the refused call pushed nothing"
    );
    let got = b.recv_messages(2, T).await.unwrap();
    assert_eq!((&got[0].1[..], &got[1].1[..]), (&b"b1"[..], &b"b2"[..]));
    n.stop.cancel();
}

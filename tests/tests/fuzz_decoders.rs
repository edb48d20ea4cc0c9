//! Property tests: arbitrary bytes into every decoder a peer controls —
//! conn's WebSocket frame codec, the protobuf `Req` and the messages inside
//! it, the JSON chat frame, and the NSQ frame parser — must give a value or
//! a clear error, never a panic.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use chatroom_common::proto::protocol::{BroadcastRoomReq, ChatMsg, PackageType, Req, SignIn};
use chatroom_conn::ws::{self, Frame};
use proptest::prelude::*;
use prost::Message;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Reads `bytes` through conn's WebSocket reader (as the bytes a client
/// sent after the upgrade, then EOF); every frame and the final outcome.
async fn read_ws(bytes: Vec<u8>, max_message: usize) -> (Vec<Frame>, Result<(), String>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let peer = tokio::net::TcpStream::connect(l.local_addr().unwrap())
        .await
        .unwrap();
    let (server, _) = l.accept().await.unwrap();
    // EOF after the fuzzed bytes.
    drop(peer);
    let (mut rd, _wr) = ws::split(server, BytesMut::from(&bytes[..]), max_message, 4096);
    let mut frames = vec![];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), rd.next()).await {
            Err(_) => panic!("the reader hung on {} bytes", bytes.len()),
            Ok(Ok(Some(f))) => frames.push(f),
            Ok(Ok(None)) => return (frames, Ok(())),
            Ok(Err(e)) => return (frames, Err(e.to_string())),
        }
    }
}

/// A client frame: header as the fields say (any opcode, any length
/// encoding), masked, with `payload` — valid-looking or not.
fn ws_frame(fin: bool, rsv: u8, op: u8, masked: bool, payload: &[u8], lie: Option<u64>) -> Vec<u8> {
    let mut v = vec![(u8::from(fin) << 7) | ((rsv & 7) << 4) | (op & 0x0f)];
    let len = lie.unwrap_or(payload.len() as u64);
    let m = if masked { 0x80 } else { 0 };
    if len < 126 {
        v.push(m | len as u8);
    } else if len <= u64::from(u16::MAX) {
        v.push(m | 126);
        v.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        v.push(m | 127);
        v.extend_from_slice(&len.to_be_bytes());
    }
    let key = [0x12, 0x34, 0x56, 0x78];
    if masked {
        v.extend_from_slice(&key);
    }
    v.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i & 3]));
    v
}

fn frame_strategy() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<bool>(),
        prop_oneof![Just(0u8), 0u8..8],
        prop_oneof![
            Just(1u8),
            Just(2u8),
            Just(0u8),
            Just(8u8),
            Just(9u8),
            0u8..16
        ],
        prop_oneof![Just(true), any::<bool>()],
        prop::collection::vec(any::<u8>(), 0..300),
        prop_oneof![
            4 => Just(None),
            1 => any::<u64>().prop_map(Some),
            1 => (0u64..70_000).prop_map(Some),
        ],
    )
        .prop_map(|(fin, rsv, op, masked, payload, lie)| {
            ws_frame(fin, rsv, op, masked, &payload, lie)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Raw bytes after the upgrade: frames or a protocol error with a
    /// close code, never a panic or a hang.
    #[test]
    fn ws_reader_takes_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let (_, end) = runtime().block_on(read_ws(bytes, 65_536));
        if let Err(e) = end {
            prop_assert!(!e.is_empty());
        }
    }

    /// Sequences of frames with fuzzed header fields (fragments, control
    /// frames, bad opcodes, unmasked, lying lengths, invalid UTF-8 text).
    #[test]
    fn ws_reader_takes_any_frames(frames in prop::collection::vec(frame_strategy(), 1..8)) {
        let bytes: Vec<u8> = frames.concat();
        let (got, end) = runtime().block_on(read_ws(bytes, 1024));
        for f in &got {
            match f {
                Frame::Text(t) => prop_assert!(std::str::from_utf8(t).is_ok(), "text frame not UTF-8"),
                Frame::Binary(b) => prop_assert!(b.len() <= 1024, "message over the limit"),
                _ => {}
            }
        }
        if let Err(e) = end {
            prop_assert!(!e.is_empty());
        }
    }

    /// `Req` and every message conn decodes from its `data`, as conn does
    /// (`Req::decode`, then by type): a value or a `DecodeError`.
    #[test]
    fn protobuf_decoders_take_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let b = Bytes::from(bytes);
        for r in [
            Req::decode(b.clone()).map(|_| ()),
            SignIn::decode(b.clone()).map(|_| ()),
            BroadcastRoomReq::decode(b.clone()).map(|_| ()),
            ChatMsg::decode(b.clone()).map(|_| ()),
        ] {
            if let Err(e) = r {
                prop_assert!(!e.to_string().is_empty());
            }
        }
        if let Ok(req) = Req::decode(b) {
            let _ = chatroom_conn::frame::type_name(req.r#type);
            let _ = SignIn::decode(req.data.clone());
            let _ = BroadcastRoomReq::decode(req.data.clone());
            let _ = ChatMsg::decode(req.data);
        }
    }

    /// A valid `Req` envelope around fuzzed inner bytes and types.
    #[test]
    fn protobuf_inner_messages(kind in any::<i32>(), data in prop::collection::vec(any::<u8>(), 0..512)) {
        let req = Req { r#type: kind, data: data.into() }.encode_to_vec();
        let back = Req::decode(&req[..]).expect("a Req we encoded");
        prop_assert_eq!(back.r#type, kind);
        match PackageType::try_from(back.r#type) {
            Ok(PackageType::SignIn) => { let _ = SignIn::decode(back.data); }
            Ok(PackageType::Message) => { let _ = BroadcastRoomReq::decode(back.data); }
            _ => { let _ = ChatMsg::decode(back.data); }
        }
    }

    /// conn's JSON chat frame parser: a message or a "malformed" error.
    #[test]
    fn chat_json_takes_any_text(text in ".{0,400}") {
        if let Err(e) = chatroom_conn::chat::parse_json(&text) {
            prop_assert!(e.starts_with("malformed message JSON"), "{}", e);
        }
    }

    /// JSON-looking text: objects with the seed's keys and wrong types.
    #[test]
    fn chat_json_takes_wrong_types(
        keys in prop::collection::vec(
            prop_oneof![Just("id"), Just("userid"), Just("dstid"), Just("cmd"), Just("media"),
                        Just("content"), Just("amount"), Just("pic"), Just("x")], 0..8),
        vals in prop::collection::vec(
            prop_oneof![Just("1".to_string()), Just("-1".to_string()), Just("1e400".to_string()),
                        Just("\"s\"".to_string()), Just("null".to_string()), Just("[]".to_string()),
                        Just("{}".to_string()), Just("9223372036854775808".to_string()),
                        any::<i64>().prop_map(|v| v.to_string())], 0..8),
    ) {
        let body: Vec<String> = keys.iter().zip(&vals).map(|(k, v)| format!("\"{k}\":{v}")).collect();
        let text = format!("{{{}}}", body.join(","));
        if let Err(e) = chatroom_conn::chat::parse_json(&text) {
            prop_assert!(e.starts_with("malformed message JSON"), "{}", e);
        }
    }

    /// The NSQ frame parser on anything a broker might send.
    #[test]
    fn nsq_frames_take_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..1024)) {
        if let Err(e) = chatroom_nsq::parse_frames(&bytes) {
            prop_assert!(!e.to_string().is_empty());
        }
    }

    /// Frames with plausible headers: any size field and type, any body.
    #[test]
    fn nsq_frames_with_fuzzed_headers(
        frames in prop::collection::vec(
            (prop_oneof![any::<u32>(), 0u32..64], prop_oneof![0u32..3, any::<u32>()],
             prop::collection::vec(any::<u8>(), 0..64)), 1..6),
    ) {
        let mut bytes = vec![];
        for (size, kind, body) in frames {
            bytes.extend_from_slice(&size.to_be_bytes());
            bytes.extend_from_slice(&kind.to_be_bytes());
            bytes.extend_from_slice(&body);
        }
        if let Err(e) = chatroom_nsq::parse_frames(&bytes) {
            prop_assert!(e.to_string().starts_with("protocol"), "{}", e);
        }
    }
}

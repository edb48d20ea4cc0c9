//! IM messages at the edge: the seed's JSON `Message` used on `/chat`, its
//! protobuf twin `ChatMsg` used on `/room`, and frames built once per push
//! in both encodings so every session takes the one it speaks.

use bytes::Bytes;
use chatroom_common::chat::{ChatJson, is_zero};
use chatroom_common::proto::protocol::{ChatAck, ChatCmd, ChatMsg, ChatStatus, PackageType};
use prost::Message as _;
use serde::Serialize;

use crate::frame;

/// How a session's frames are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Binary protobuf `Reply` frames (`/room`).
    Protobuf,
    /// Text JSON frames in the IM seed's format (`/chat`).
    Json,
}

/// Parses a client's JSON text frame.
pub fn parse_json(text: &str) -> Result<ChatJson, String> {
    // serde would also take a JSON array for a struct; a message is an object.
    if !text.trim_start().starts_with('{') {
        return Err("malformed message JSON: expected an object".into());
    }
    serde_json::from_str::<ChatJson>(text).map_err(|e| format!("malformed message JSON: {e}"))
}

/// One pushed IM message, encoded once per encoding.
#[derive(Debug, Clone)]
pub struct ChatFrame {
    /// `Reply{CHAT, ChatMsg}`.
    pub proto: Bytes,
    /// The JSON message (UTF-8).
    pub json: Bytes,
}

impl ChatFrame {
    pub fn new(m: &ChatMsg) -> Self {
        ChatFrame {
            proto: frame::reply(PackageType::Chat, m.encode_to_vec()),
            json: json_text(&ChatJson::from(m)),
        }
    }
}

fn json_text(v: &impl Serialize) -> Bytes {
    // Serializing plain structs and maps of strings and numbers cannot fail.
    Bytes::from(serde_json::to_string(v).unwrap_or_else(|_| "{}".into()))
}

#[derive(Serialize)]
struct JsonAck<'a> {
    cmd: i32,
    id: i64,
    cid: i64,
    dstid: i64,
    target: i32,
    status: &'a str,
    content: &'a str,
    createat: i64,
}

/// The ack for a sent message: the seed hub's "success send" / "not online".
pub fn ack_json(a: &ChatAck) -> Bytes {
    let stored = a.status == ChatStatus::Stored as i32;
    json_text(&JsonAck {
        cmd: ChatCmd::Ack.into(),
        id: a.id,
        cid: a.client_id,
        dstid: a.dstid,
        target: a.cmd,
        status: if stored { "stored" } else { "delivered" },
        content: if stored { "not online" } else { "success send" },
        createat: a.created_ms,
    })
}

pub fn ack_proto(a: &ChatAck) -> Bytes {
    frame::reply(PackageType::ChatAck, a.encode_to_vec())
}

#[derive(Serialize)]
struct JsonErr<'a> {
    cmd: i32,
    code: i32,
    msg: &'a str,
    #[serde(skip_serializing_if = "is_zero")]
    cid: i64,
}

pub fn error_json(code: impl Into<i32>, msg: &str, cid: i64) -> Bytes {
    json_text(&JsonErr {
        cmd: ChatCmd::Error.into(),
        code: code.into(),
        msg,
        cid,
    })
}

pub fn pong_json() -> Bytes {
    Bytes::from_static(br#"{"cmd":0,"content":"pong"}"#)
}

pub fn welcome_json(uid: &str) -> Bytes {
    #[derive(Serialize)]
    struct Welcome<'a> {
        cmd: i32,
        code: i32,
        msg: &'a str,
        userid: &'a str,
    }
    json_text(&Welcome {
        cmd: ChatCmd::Welcome.into(),
        code: 0,
        msg: "ok",
        userid: uid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_json_round_trip() {
        let m = parse_json(r#"{"id":1,"userid":2,"dstid":3,"cmd":10,"media":1,"content":"hello"}"#)
            .unwrap();
        let c: ChatMsg = m.clone().into();
        assert_eq!(
            (c.id, c.dstid, c.cmd, c.media, c.content.as_str()),
            (1, 3, 10, 1, "hello")
        );
        let back: ChatJson = (&c).into();
        assert_eq!(back, m);
        let f = ChatFrame::new(&ChatMsg { created_ms: 9, ..c });
        let v: serde_json::Value = serde_json::from_slice(&f.json).unwrap();
        assert_eq!(v["content"], "hello");
        assert_eq!(v["createat"], 9);
        assert!(v.get("pic").is_none(), "empty fields are omitted: {v}");
    }

    #[test]
    fn bad_json_is_an_error_not_a_panic() {
        for bad in ["", "{", "[]", r#"{"cmd":"ten"}"#, r#"{"amount":1e999}"#] {
            assert!(parse_json(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ack_texts() {
        let a = ChatAck {
            id: 5,
            client_id: 1,
            dstid: 3,
            cmd: 10,
            status: ChatStatus::Stored as i32,
            created_ms: 7,
        };
        let v: serde_json::Value = serde_json::from_slice(&ack_json(&a)).unwrap();
        assert_eq!(
            (v["cmd"].as_i64(), v["content"].as_str()),
            (Some(20), Some("not online"))
        );
        let e: serde_json::Value =
            serde_json::from_slice(&error_json(403, "not friends", 1)).unwrap();
        assert_eq!(
            (e["code"].as_i64(), e["cid"].as_i64()),
            (Some(403), Some(1))
        );
    }
}

//! The IM seed's JSON `Message`, the one serde shape of a chat message that
//! every JSON surface uses (conn's /chat frames, logic's IM routes), with
//! its conversions to and from the protobuf `ChatMsg`.

use serde::{Deserialize, Serialize};

use crate::proto::protocol::ChatMsg;

/// The seed's JSON message (`{id, userid, dstid, cmd, media, content, pic,
/// url, memo, amount}`) plus `createat`, the server's time of acceptance
/// (ms): /chat frames and the IM routes' history both speak it. Zero and
/// empty fields are left out, as the seed's pages expect.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ChatJson {
    #[serde(skip_serializing_if = "is_zero")]
    pub id: i64,
    #[serde(skip_serializing_if = "is_zero")]
    pub userid: i64,
    #[serde(skip_serializing_if = "is_zero")]
    pub dstid: i64,
    pub cmd: i32,
    #[serde(skip_serializing_if = "is_zero32")]
    pub media: i32,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub content: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub pic: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub url: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub memo: String,
    #[serde(skip_serializing_if = "is_zero")]
    pub amount: i64,
    #[serde(skip_serializing_if = "is_zero")]
    pub createat: i64,
}

/// For `skip_serializing_if` (also conn's other JSON frames).
pub fn is_zero(v: &i64) -> bool {
    *v == 0
}
fn is_zero32(v: &i32) -> bool {
    *v == 0
}

impl From<ChatJson> for ChatMsg {
    fn from(m: ChatJson) -> Self {
        ChatMsg {
            id: m.id,
            userid: m.userid,
            dstid: m.dstid,
            cmd: m.cmd,
            media: m.media,
            content: m.content,
            pic: m.pic,
            url: m.url,
            memo: m.memo,
            amount: m.amount,
            created_ms: 0,
        }
    }
}

impl From<&ChatMsg> for ChatJson {
    fn from(m: &ChatMsg) -> Self {
        // The same fields copied: the strings are cloned either way.
        ChatJson::from(m.clone())
    }
}

impl From<ChatMsg> for ChatJson {
    fn from(m: ChatMsg) -> Self {
        ChatJson {
            id: m.id,
            userid: m.userid,
            dstid: m.dstid,
            cmd: m.cmd,
            media: m.media,
            content: m.content,
            pic: m.pic,
            url: m.url,
            memo: m.memo,
            amount: m.amount,
            createat: m.created_ms,
        }
    }
}

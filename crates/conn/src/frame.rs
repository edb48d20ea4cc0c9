//! The client protocol's frames: decoding `Req`, encoding `Reply`, and the
//! `Err` codes conn answers with.

use bytes::Bytes;
use chatroom_common::proto::protocol::{Err, PackageType, Reply};
use prost::Message;

/// `Err.code` values. 0 and 100 are the seed's; the rest borrow the meaning
/// of the HTTP status with the same number.
pub mod code {
    pub const OK: i32 = 0;
    /// Not signed in, or the token was refused.
    pub const LOGIN_NEEDED: i32 = 100;
    /// Undecodable frame, text frame, empty room id.
    pub const BAD_REQUEST: i32 = 400;
    /// The session is not in the room it addressed.
    pub const FORBIDDEN: i32 = 403;
    /// Unknown `PackageType`.
    pub const UNKNOWN_TYPE: i32 = 404;
    /// A second SIGN_IN on a signed-in session.
    pub const CONFLICT: i32 = 409;
    /// Frame over `ws.max_frame_bytes`.
    pub const TOO_LARGE: i32 = 413;
    /// Messages this session lacks could not be recovered: reload.
    pub const GONE: i32 = 410;
    /// logic is unreachable or failed.
    pub const UNAVAILABLE: i32 = 503;
}

/// `Reply{type, data}` encoded.
pub fn reply(kind: PackageType, data: impl Into<Bytes>) -> Bytes {
    Reply {
        r#type: kind as i32,
        data: data.into(),
    }
    .encode_to_vec()
    .into()
}

/// `Reply{UNKNOWN, Err{code, msg}}` encoded.
pub fn err(code: i32, msg: impl Into<String>) -> Bytes {
    err_ref(code, msg, 0)
}

/// `Reply{UNKNOWN, Err{code, msg, ref_id}}`: an error about the client's
/// message `ref_id`.
pub fn err_ref(code: i32, msg: impl Into<String>, ref_id: i64) -> Bytes {
    let e = Err {
        code,
        msg: msg.into(),
        ref_id,
        ..Default::default()
    };
    reply(PackageType::Unknown, e.encode_to_vec())
}

/// The answer to a successful `/room` sign-in: the room stream's epoch and
/// newest offset, and whether the recovery asked for is complete.
pub fn signed_in(epoch: u64, offset: u64, recovered: bool) -> Bytes {
    let e = Err {
        code: code::OK,
        msg: "ok".into(),
        epoch,
        offset,
        recovered,
        ..Default::default()
    };
    reply(PackageType::Unknown, e.encode_to_vec())
}

/// Tells a session that messages up to `offset` of `epoch` it lacks are
/// gone; it continues after them.
pub fn gone(epoch: u64, offset: u64, msg: impl Into<String>) -> Bytes {
    let e = Err {
        code: code::GONE,
        msg: msg.into(),
        epoch,
        offset,
        ..Default::default()
    };
    reply(PackageType::Unknown, e.encode_to_vec())
}

/// Human name of a raw package type, for error messages and logs.
pub fn type_name(raw: i32) -> String {
    PackageType::try_from(raw)
        .map(|t| t.as_str_name().to_string())
        .unwrap_or_else(|_| format!("unknown({raw})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn err_round_trip() {
        let b = err(code::LOGIN_NEEDED, "login needed");
        let r = Reply::decode(b).unwrap();
        assert_eq!(r.r#type, PackageType::Unknown as i32);
        let e = Err::decode(r.data).unwrap();
        assert_eq!((e.code, e.msg.as_str()), (100, "login needed"));
    }

    #[test]
    fn type_names() {
        assert_eq!(type_name(3), "MESSAGE");
        assert_eq!(type_name(42), "unknown(42)");
    }
}

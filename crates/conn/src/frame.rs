//! The client protocol's frames: decoding `Req`, encoding `Reply` and `Err`
//! answers (their codes are `ErrCode`, the one table in `api/protocol.proto`).

use bytes::Bytes;
use chatroom_common::proto::protocol::{Err, ErrCode, PackageType, Reply};
use prost::Message;

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
pub fn err(code: impl Into<i32>, msg: impl Into<String>) -> Bytes {
    err_ref(code, msg, 0)
}

/// `Reply{UNKNOWN, Err{code, msg, ref_id}}`: an error about the client's
/// message `ref_id`.
pub fn err_ref(code: impl Into<i32>, msg: impl Into<String>, ref_id: i64) -> Bytes {
    let e = Err {
        code: code.into(),
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
        code: ErrCode::Ok.into(),
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
        code: ErrCode::Gone.into(),
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
        let b = err(ErrCode::LoginNeeded, "login needed");
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

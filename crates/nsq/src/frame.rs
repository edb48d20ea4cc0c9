//! The NSQ V2 wire format: encoding the commands a client sends and decoding
//! the frames nsqd sends back (`[size u32][type u32][data]`, big-endian).
//!
//! Decoding never trusts the peer: sizes are bounded and checked before any
//! slicing, so a broken or hostile broker produces an error, not a panic.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Sent once, right after connecting, to select protocol V2.
pub(crate) const MAGIC_V2: &[u8; 4] = b"  V2";

/// Largest frame we accept from nsqd. nsqd's own limits are far lower
/// (1 MiB messages by default); this only stops a garbage length prefix from
/// making us allocate gigabytes.
pub(crate) const MAX_FRAME_SIZE: usize = 16 * 1024 * 1024;

/// Sent by nsqd on idle connections; must be answered with `NOP`.
pub(crate) const HEARTBEAT: &[u8] = b"_heartbeat_";
pub(crate) const OK: &[u8] = b"OK";
pub(crate) const CLOSE_WAIT: &[u8] = b"CLOSE_WAIT";

const FRAME_RESPONSE: u32 = 0;
const FRAME_ERROR: u32 = 1;
const FRAME_MESSAGE: u32 = 2;

/// timestamp (8) + attempts (2) + id (16).
const MESSAGE_HEADER: usize = 26;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FrameError {
    #[error("frame size {0} is below the 4-byte minimum")]
    TooSmall(usize),
    #[error("frame size {0} exceeds the {MAX_FRAME_SIZE}-byte limit")]
    TooLarge(usize),
    #[error("unknown frame type {0}")]
    UnknownType(u32),
    #[error("message frame of {0} bytes is shorter than its 26-byte header")]
    ShortMessage(usize),
    #[error("command body of {0} bytes exceeds the {MAX_FRAME_SIZE}-byte limit")]
    BodyTooLarge(usize),
    #[error("MPUB needs at least one message")]
    EmptyMpub,
}

/// A message as it arrived, before it is tied to the connection that must
/// acknowledge it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawMessage {
    pub timestamp_ns: i64,
    pub attempts: u16,
    pub id: [u8; 16],
    pub body: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Frame {
    Response(Bytes),
    Error(Bytes),
    Message(RawMessage),
}

/// Takes one complete frame off the front of `buf`, or returns `Ok(None)`
/// when more bytes are needed. On error the stream is unusable (framing is
/// lost), so the caller must drop the connection.
pub(crate) fn decode_frame(buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let size = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if size < 4 {
        return Err(FrameError::TooSmall(size));
    }
    if size > MAX_FRAME_SIZE {
        return Err(FrameError::TooLarge(size));
    }
    if buf.len() < 4 + size {
        // Reserve now so a large frame is read without repeated regrowth.
        buf.reserve(4 + size - buf.len());
        return Ok(None);
    }
    buf.advance(4);
    let mut data = buf.split_to(size).freeze();
    let kind = data.get_u32();
    match kind {
        FRAME_RESPONSE => Ok(Some(Frame::Response(data))),
        FRAME_ERROR => Ok(Some(Frame::Error(data))),
        FRAME_MESSAGE => {
            if data.len() < MESSAGE_HEADER {
                return Err(FrameError::ShortMessage(data.len()));
            }
            let timestamp_ns = data.get_i64();
            let attempts = data.get_u16();
            let mut id = [0u8; 16];
            data.copy_to_slice(&mut id);
            Ok(Some(Frame::Message(RawMessage {
                timestamp_ns,
                attempts,
                id,
                body: data,
            })))
        }
        other => Err(FrameError::UnknownType(other)),
    }
}

/// Client-to-nsqd commands (the subset this client uses).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Command<'a> {
    Identify(&'a [u8]),
    Sub { topic: &'a str, channel: &'a str },
    Pub { topic: &'a str, body: &'a [u8] },
    Mpub { topic: &'a str, bodies: &'a [Bytes] },
    Rdy(u32),
    Fin(&'a [u8; 16]),
    Req(&'a [u8; 16], u64),
    Touch(&'a [u8; 16]),
    Cls,
    Nop,
}

impl Command<'_> {
    /// Appends the wire form to `dst`. Fails only for bodies nsqd could never
    /// accept, before anything is written.
    pub(crate) fn encode(&self, dst: &mut BytesMut) -> Result<(), FrameError> {
        match *self {
            Command::Identify(json) => {
                check_body(json.len())?;
                dst.put_slice(b"IDENTIFY\n");
                put_sized(dst, json);
            }
            Command::Sub { topic, channel } => {
                put_line(dst, &[b"SUB", topic.as_bytes(), channel.as_bytes()]);
            }
            Command::Pub { topic, body } => {
                check_body(body.len())?;
                put_line(dst, &[b"PUB", topic.as_bytes()]);
                put_sized(dst, body);
            }
            Command::Mpub { topic, bodies } => {
                if bodies.is_empty() {
                    return Err(FrameError::EmptyMpub);
                }
                // The size covers the count plus each length-prefixed body.
                let total = bodies.iter().map(|b| 4 + b.len()).sum::<usize>() + 4;
                check_body(total)?;
                put_line(dst, &[b"MPUB", topic.as_bytes()]);
                dst.reserve(4 + total);
                dst.put_u32(total as u32);
                dst.put_u32(bodies.len() as u32);
                for b in bodies {
                    put_sized(dst, b);
                }
            }
            Command::Rdy(n) => put_line(dst, &[b"RDY", n.to_string().as_bytes()]),
            Command::Fin(id) => put_line(dst, &[b"FIN", id]),
            Command::Req(id, ms) => put_line(dst, &[b"REQ", id, ms.to_string().as_bytes()]),
            Command::Touch(id) => put_line(dst, &[b"TOUCH", id]),
            Command::Cls => dst.put_slice(b"CLS\n"),
            Command::Nop => dst.put_slice(b"NOP\n"),
        }
        Ok(())
    }
}

fn check_body(len: usize) -> Result<(), FrameError> {
    if len > MAX_FRAME_SIZE {
        Err(FrameError::BodyTooLarge(len))
    } else {
        Ok(())
    }
}

fn put_line(dst: &mut BytesMut, parts: &[&[u8]]) {
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            dst.put_u8(b' ');
        }
        dst.put_slice(p);
    }
    dst.put_u8(b'\n');
}

fn put_sized(dst: &mut BytesMut, body: &[u8]) {
    dst.reserve(4 + body.len());
    dst.put_u32(body.len() as u32);
    dst.put_slice(body);
}

/// Whether nsqd keeps the connection open after this error. Only failed
/// FIN/REQ/TOUCH are recoverable (the message simply timed out or belonged
/// to an earlier connection); nsqd closes the connection after anything else.
pub(crate) fn is_fatal_error(text: &[u8]) -> bool {
    let code = text.split(|b| *b == b' ').next().unwrap_or(text);
    !matches!(code, b"E_FIN_FAILED" | b"E_REQ_FAILED" | b"E_TOUCH_FAILED")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(c: Command<'_>) -> Vec<u8> {
        let mut b = BytesMut::new();
        c.encode(&mut b).unwrap();
        b.to_vec()
    }

    fn frame(kind: u32, data: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        b.put_u32(4 + data.len() as u32);
        b.put_u32(kind);
        b.put_slice(data);
        b
    }

    const ID: [u8; 16] = *b"0123456789abcdef";

    #[test]
    fn encodes_every_command() {
        assert_eq!(enc(Command::Identify(b"{}")), b"IDENTIFY\n\0\0\0\x02{}");
        assert_eq!(
            enc(Command::Sub {
                topic: "t",
                channel: "c"
            }),
            b"SUB t c\n"
        );
        assert_eq!(
            enc(Command::Pub {
                topic: "t",
                body: b"hey"
            }),
            b"PUB t\n\0\0\0\x03hey"
        );
        let bodies = [Bytes::from_static(b"a"), Bytes::from_static(b"bc")];
        assert_eq!(
            enc(Command::Mpub {
                topic: "t",
                bodies: &bodies
            }),
            b"MPUB t\n\0\0\0\x0f\0\0\0\x02\0\0\0\x01a\0\0\0\x02bc"
        );
        assert_eq!(enc(Command::Rdy(25)), b"RDY 25\n");
        assert_eq!(enc(Command::Fin(&ID)), b"FIN 0123456789abcdef\n");
        assert_eq!(enc(Command::Req(&ID, 1500)), b"REQ 0123456789abcdef 1500\n");
        assert_eq!(enc(Command::Touch(&ID)), b"TOUCH 0123456789abcdef\n");
        assert_eq!(enc(Command::Cls), b"CLS\n");
        assert_eq!(enc(Command::Nop), b"NOP\n");
    }

    #[test]
    fn rejects_empty_mpub_and_oversize_bodies() {
        let mut b = BytesMut::new();
        assert_eq!(
            Command::Mpub {
                topic: "t",
                bodies: &[]
            }
            .encode(&mut b),
            Err(FrameError::EmptyMpub)
        );
        let big = vec![0u8; MAX_FRAME_SIZE + 1];
        assert!(matches!(
            Command::Pub {
                topic: "t",
                body: &big
            }
            .encode(&mut b),
            Err(FrameError::BodyTooLarge(_))
        ));
        assert!(b.is_empty(), "nothing is written for a rejected command");
    }

    #[test]
    fn decodes_response_error_and_message() {
        let mut b = frame(0, b"OK");
        b.extend_from_slice(&frame(1, b"E_INVALID bad"));
        let mut msg = Vec::new();
        msg.extend_from_slice(&1_700_000_000_000_000_000i64.to_be_bytes());
        msg.extend_from_slice(&3u16.to_be_bytes());
        msg.extend_from_slice(&ID);
        msg.extend_from_slice(b"body");
        b.extend_from_slice(&frame(2, &msg));

        assert_eq!(
            decode_frame(&mut b).unwrap(),
            Some(Frame::Response(Bytes::from_static(b"OK")))
        );
        assert_eq!(
            decode_frame(&mut b).unwrap(),
            Some(Frame::Error(Bytes::from_static(b"E_INVALID bad")))
        );
        assert_eq!(
            decode_frame(&mut b).unwrap(),
            Some(Frame::Message(RawMessage {
                timestamp_ns: 1_700_000_000_000_000_000,
                attempts: 3,
                id: ID,
                body: Bytes::from_static(b"body"),
            }))
        );
        assert_eq!(decode_frame(&mut b).unwrap(), None);
        assert!(b.is_empty());
    }

    #[test]
    fn waits_for_truncated_frames() {
        let full = frame(0, b"_heartbeat_");
        for cut in 0..full.len() {
            let mut b = BytesMut::from(&full[..cut]);
            assert_eq!(decode_frame(&mut b).unwrap(), None, "cut at {cut}");
            assert_eq!(b.len(), cut, "a partial frame is left in place");
        }
        let mut b = full.clone();
        assert_eq!(
            decode_frame(&mut b).unwrap(),
            Some(Frame::Response(Bytes::from_static(HEARTBEAT)))
        );
    }

    #[test]
    fn rejects_bad_sizes_and_types() {
        let mut b = BytesMut::from(&[0u8, 0, 0, 2, 0, 0][..]);
        assert_eq!(decode_frame(&mut b), Err(FrameError::TooSmall(2)));
        let mut b = BytesMut::from(&[0xffu8, 0xff, 0xff, 0xff][..]);
        assert_eq!(
            decode_frame(&mut b),
            Err(FrameError::TooLarge(u32::MAX as usize))
        );
        let mut b = frame(7, b"x");
        assert_eq!(decode_frame(&mut b), Err(FrameError::UnknownType(7)));
        let mut b = frame(2, &[0u8; 25]);
        assert_eq!(decode_frame(&mut b), Err(FrameError::ShortMessage(25)));
        let mut b = frame(2, &[0u8; 26]);
        assert!(matches!(
            decode_frame(&mut b),
            Ok(Some(Frame::Message(RawMessage { ref body, .. }))) if body.is_empty()
        ));
    }

    #[test]
    fn fatal_errors() {
        assert!(is_fatal_error(b"E_INVALID cannot SUB in current state"));
        assert!(is_fatal_error(b"E_BAD_TOPIC"));
        assert!(is_fatal_error(b""));
        assert!(!is_fatal_error(b"E_FIN_FAILED FIN 123 failed"));
        assert!(!is_fatal_error(b"E_REQ_FAILED"));
        assert!(!is_fatal_error(b"E_TOUCH_FAILED x"));
    }
}

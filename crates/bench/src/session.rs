//! One chatroom client session: sign-in, heartbeats spread over the
//! period, and reading pushed frames — `Reply{MESSAGE, BroadcastRoomReq}`
//! whose `data` is a merged batch — into the worker's [`Recorder`].

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use chatroom_common::batch;
use chatroom_common::proto::protocol::{
    BroadcastRoomReq, Err as ErrMsg, MsgLevel, PackageType, Reply, Req, SignIn,
};
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::config::Level;
use crate::error::BenchError;
use crate::loss::SessionTracker;
use crate::net::Ws;
use crate::rooms::RoomMap;
use crate::stats::Recorder;

/// A `Req` frame.
pub fn req_frame(kind: PackageType, data: impl Into<Bytes>) -> Message {
    let req = Req {
        r#type: kind as i32,
        data: data.into(),
    };
    Message::Binary(req.encode_to_vec().into())
}

pub fn sign_in_frame(token: &str, room: &str) -> Message {
    let s = SignIn {
        token: token.to_string(),
        room_id: room.to_string(),
        ..Default::default()
    };
    req_frame(PackageType::SignIn, s.encode_to_vec())
}

pub fn heartbeat_frame() -> Message {
    req_frame(PackageType::Heartbeat, Bytes::new())
}

/// A room message to the session's own room.
pub fn message_frame(level: Level, payload: Bytes) -> Message {
    let m = BroadcastRoomReq {
        room_id: String::new(),
        msg_lv: match level {
            Level::Normal => MsgLevel::Normal as i32,
            Level::Important => MsgLevel::Important as i32,
        },
        data: payload,
        ..Default::default()
    };
    req_frame(PackageType::Message, m.encode_to_vec())
}

/// What a server frame was.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound {
    /// A pushed room batch: `|len|msg|len|msg|...`.
    Batch(Bytes),
    /// `Reply{HEARTBEAT}`.
    Pong,
    /// `Reply{UNKNOWN, Err}`.
    Error { code: i32, msg: String },
    /// `Reply{MEMBERS, count}`.
    Members(String),
    /// Any other reply type.
    Other(i32),
}

/// Decodes one binary frame from the server.
pub fn parse_frame(frame: Bytes) -> Result<Inbound, BenchError> {
    let reply =
        Reply::decode(frame).map_err(|e| BenchError::protocol(format!("bad Reply: {e}")))?;
    Ok(match PackageType::try_from(reply.r#type) {
        Ok(PackageType::Message) => {
            let m = BroadcastRoomReq::decode(reply.data)
                .map_err(|e| BenchError::protocol(format!("bad BroadcastRoomReq: {e}")))?;
            Inbound::Batch(m.data)
        }
        Ok(PackageType::Heartbeat) => Inbound::Pong,
        Ok(PackageType::Unknown) => {
            let e = ErrMsg::decode(reply.data)
                .map_err(|e| BenchError::protocol(format!("bad Err: {e}")))?;
            Inbound::Error {
                code: e.code,
                msg: e.msg,
            }
        }
        Ok(PackageType::Members) => {
            Inbound::Members(String::from_utf8_lossy(&reply.data).into_owned())
        }
        _ => Inbound::Other(reply.r#type),
    })
}

/// The messages of a merged batch, stopping at a cut-short one (then
/// [`BatchMessages::truncated`] says so).
pub fn batch_messages(data: &[u8]) -> BatchMessages<'_> {
    BatchMessages {
        inner: batch::decode(data),
        truncated: false,
    }
}

/// Iterator returned by [`batch_messages`].
pub struct BatchMessages<'a> {
    inner: batch::Decode<'a>,
    truncated: bool,
}

impl BatchMessages<'_> {
    /// Whether the batch ended inside a message.
    pub fn truncated(&self) -> bool {
        self.truncated
    }
}

impl<'a> Iterator for BatchMessages<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        match self.inner.next()? {
            Ok(m) => Some(m),
            Err(_) => {
                self.truncated = true;
                None
            }
        }
    }
}

/// Sends SIGN_IN and waits for the `Err{0}` that accepts it.
pub async fn sign_in(ws: &mut Ws, token: &str, room: &str) -> Result<(), BenchError> {
    ws.send(sign_in_frame(token, room)).await?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => {
                return match parse_frame(b)? {
                    Inbound::Error { code: 0, .. } => Ok(()),
                    Inbound::Error { code, msg } => Err(BenchError::SignIn { code, msg }),
                    other => Err(BenchError::protocol(format!(
                        "expected the sign-in answer, got {other:?}"
                    ))),
                };
            }
            Some(Ok(Message::Close(_))) | None => return Err(BenchError::Closed),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
        }
    }
}

/// Where in the heartbeat period session `i` beats first: spread evenly
/// (golden-ratio sequence) so that heartbeats never come in waves.
pub fn heartbeat_offset(i: u64, period: Duration) -> Duration {
    let frac = (i as f64 * 0.618_033_988_749_895).fract();
    period.mul_f64(frac)
}

/// What a receiving session shares with its worker.
pub struct SessionCtx {
    pub recorder: Arc<Recorder>,
    pub map: Arc<RoomMap>,
    pub heartbeat: Duration,
}

/// Reads pushes and beats until `stop` (returns true) or the connection
/// ends (returns false).
pub async fn receive(
    ws: &mut Ws,
    ctx: &SessionCtx,
    tracker: &mut SessionTracker,
    index: u64,
    stop: &CancellationToken,
) -> bool {
    let mut next_beat = Instant::now() + heartbeat_offset(index, ctx.heartbeat);
    let counters = &ctx.recorder.counters;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return true,
            _ = tokio::time::sleep_until(next_beat) => {
                next_beat += ctx.heartbeat;
                if ws.send(heartbeat_frame()).await.is_err() {
                    return false;
                }
            }
            m = ws.next() => match m {
                Some(Ok(Message::Binary(b))) => match parse_frame(b) {
                    Ok(Inbound::Batch(data)) => {
                        let mut msgs = batch_messages(&data);
                        ctx.recorder.deliver(tracker, &ctx.map, &mut msgs);
                        if msgs.truncated() {
                            counters.server_errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(Inbound::Error { .. }) | Err(_) => {
                        counters.server_errors.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                },
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return false,
                Some(Ok(_)) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::{Stamp, decode as decode_payload, encode_vec};

    fn reply(kind: PackageType, data: Vec<u8>) -> Bytes {
        Reply {
            r#type: kind as i32,
            data: data.into(),
        }
        .encode_to_vec()
        .into()
    }

    #[test]
    fn merged_push_decodes_into_messages() {
        let payloads: Vec<Vec<u8>> = (0..3)
            .map(|seq| {
                encode_vec(
                    Stamp {
                        sent_ns: 42,
                        publisher: 1,
                        seq,
                    },
                    48,
                )
            })
            .collect();
        let merged = batch::encode(payloads.iter().map(Vec::as_slice));
        let push = BroadcastRoomReq {
            room_id: "bench-0".into(),
            msg_lv: MsgLevel::Normal as i32,
            data: merged.clone(),
            ..Default::default()
        };
        let frame = reply(PackageType::Message, push.encode_to_vec());
        let Inbound::Batch(data) = parse_frame(frame).unwrap() else {
            panic!("not a batch")
        };
        let msgs: Vec<&[u8]> = batch_messages(&data).collect();
        assert_eq!(msgs.len(), 3);
        let seqs: Vec<u32> = msgs
            .iter()
            .map(|m| decode_payload(m).unwrap().seq)
            .collect();
        assert_eq!(seqs, vec![0, 1, 2]);
        // Cut short: the whole messages before the cut.
        let mut cut = batch_messages(&merged[..merged.len() - 3]);
        assert_eq!(cut.by_ref().count(), 2);
        assert!(cut.truncated());
        let mut empty = batch_messages(&[]);
        assert_eq!(empty.by_ref().count(), 0);
        assert!(!empty.truncated());
    }

    #[test]
    fn other_replies() {
        let e = ErrMsg {
            code: 100,
            msg: "login needed".into(),
            ..ErrMsg::default()
        };
        assert_eq!(
            parse_frame(reply(PackageType::Unknown, e.encode_to_vec())).unwrap(),
            Inbound::Error {
                code: 100,
                msg: "login needed".into()
            }
        );
        assert_eq!(
            parse_frame(reply(PackageType::Heartbeat, b"pong".to_vec())).unwrap(),
            Inbound::Pong
        );
        assert_eq!(
            parse_frame(reply(PackageType::Members, b"12".to_vec())).unwrap(),
            Inbound::Members("12".into())
        );
        assert_eq!(
            parse_frame(Bytes::from_static(&[0xff, 0xff, 0xff])).map_err(|_| ()),
            Err(())
        );
    }

    #[test]
    fn frames_round_trip() {
        let Message::Binary(b) = message_frame(Level::Important, Bytes::from_static(b"x")) else {
            panic!()
        };
        let req = Req::decode(b).unwrap();
        assert_eq!(req.r#type, PackageType::Message as i32);
        let m = BroadcastRoomReq::decode(req.data).unwrap();
        assert_eq!(
            (m.room_id.as_str(), m.msg_lv, &m.data[..]),
            ("", MsgLevel::Important as i32, &b"x"[..])
        );
        let Message::Binary(b) = sign_in_frame("tok", "r") else {
            panic!()
        };
        let s = SignIn::decode(Req::decode(b).unwrap().data).unwrap();
        assert_eq!((s.token.as_str(), s.room_id.as_str()), ("tok", "r"));
    }

    #[test]
    fn heartbeats_are_spread() {
        let p = Duration::from_secs(30);
        let mut offs: Vec<u128> = (0..100)
            .map(|i| heartbeat_offset(i, p).as_millis())
            .collect();
        assert!(offs.iter().all(|&o| o < 30_000));
        offs.sort();
        // No two sessions of the first hundred within 50 ms of each other.
        assert!(offs.windows(2).all(|w| w[1] - w[0] >= 50), "{offs:?}");
    }
}

//! The NATS target: nats-server's text protocol over WebSocket, for the
//! side-by-side comparison. A subscriber reads `INFO`, sends
//! `CONNECT {"verbose":false,"pedantic":false}`, `SUB <subject> 1` and
//! `PING`, and counts as signed in at the `PONG`; then it parses `MSG` (and
//! `HMSG`) into the same [`Recorder`] as chatroom sessions and answers
//! `PING` with `PONG`. The server's frames are a byte stream: an operation
//! may span frames and a frame may hold many, so [`Parser`] buffers.

use std::sync::atomic::Ordering;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::error::BenchError;
use crate::loss::SessionTracker;
use crate::net::Ws;
use crate::session::{SessionCtx, heartbeat_offset};

/// Longest control line accepted (INFO included).
pub const MAX_CONTROL: usize = 64 << 10;
/// Largest message body accepted.
pub const MAX_PAYLOAD: usize = 64 << 20;

pub const CONNECT: &str = "CONNECT {\"verbose\":false,\"pedantic\":false}\r\n";

/// One server operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Info(Bytes),
    Msg {
        subject: Bytes,
        sid: Bytes,
        payload: Bytes,
    },
    Ping,
    Pong,
    Ok,
    Err(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NatsError {
    #[error("control line longer than {MAX_CONTROL} bytes")]
    LineTooLong,
    #[error("malformed {0}")]
    Malformed(String),
    #[error("unknown operation {0:?}")]
    Unknown(String),
    #[error("message of {0} bytes is over the limit")]
    TooLarge(usize),
}

impl From<NatsError> for BenchError {
    fn from(e: NatsError) -> Self {
        BenchError::protocol(format!("nats: {e}"))
    }
}

/// Incremental parser of the server's byte stream.
#[derive(Debug, Default)]
pub struct Parser {
    buf: BytesMut,
}

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

fn parse_len(t: &[u8], line: &[u8]) -> Result<usize, NatsError> {
    std::str::from_utf8(t)
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .ok_or_else(|| NatsError::Malformed(String::from_utf8_lossy(line).into_owned()))
}

impl Parser {
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete operation, `None` if more bytes are needed.
    pub fn next_op(&mut self) -> Result<Option<Op>, NatsError> {
        let Some(eol) = find_crlf(&self.buf) else {
            return if self.buf.len() > MAX_CONTROL {
                Err(NatsError::LineTooLong)
            } else {
                Ok(None)
            };
        };
        if eol > MAX_CONTROL {
            return Err(NatsError::LineTooLong);
        }
        let line = &self.buf[..eol];
        let (verb, rest) = match line.iter().position(|c| *c == b' ' || *c == b'\t') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => (line, &line[line.len()..]),
        };
        let verb = verb.to_ascii_uppercase();
        let simple = |op: Op, buf: &mut BytesMut| {
            buf.advance(eol + 2);
            Ok(Some(op))
        };
        match verb.as_slice() {
            b"PING" => simple(Op::Ping, &mut self.buf),
            b"PONG" => simple(Op::Pong, &mut self.buf),
            b"+OK" => simple(Op::Ok, &mut self.buf),
            b"-ERR" => {
                let msg = String::from_utf8_lossy(rest)
                    .trim()
                    .trim_matches('\'')
                    .to_string();
                simple(Op::Err(msg), &mut self.buf)
            }
            b"INFO" => {
                let info = Bytes::copy_from_slice(rest);
                simple(Op::Info(info), &mut self.buf)
            }
            b"MSG" | b"HMSG" => {
                let headers = verb.as_slice() == b"HMSG";
                let args: Vec<&[u8]> = rest
                    .split(|c| *c == b' ' || *c == b'\t')
                    .filter(|t| !t.is_empty())
                    .collect();
                // MSG subject sid [reply] size; HMSG subject sid [reply] hdr_size total_size
                let sizes = if headers { 2 } else { 1 };
                if args.len() != 2 + sizes && args.len() != 3 + sizes {
                    return Err(NatsError::Malformed(
                        String::from_utf8_lossy(line).into_owned(),
                    ));
                }
                let total = parse_len(args[args.len() - 1], line)?;
                let hdr = if headers {
                    parse_len(args[args.len() - 2], line)?
                } else {
                    0
                };
                if total > MAX_PAYLOAD {
                    return Err(NatsError::TooLarge(total));
                }
                if hdr > total {
                    return Err(NatsError::Malformed(
                        String::from_utf8_lossy(line).into_owned(),
                    ));
                }
                if self.buf.len() < eol + 2 + total + 2 {
                    return Ok(None);
                }
                let (subject, sid) = (
                    Bytes::copy_from_slice(args[0]),
                    Bytes::copy_from_slice(args[1]),
                );
                if &self.buf[eol + 2 + total..eol + 2 + total + 2] != b"\r\n" {
                    return Err(NatsError::Malformed(
                        "message body not followed by CRLF".into(),
                    ));
                }
                self.buf.advance(eol + 2 + hdr);
                let payload = self.buf.split_to(total - hdr).freeze();
                self.buf.advance(2);
                Ok(Some(Op::Msg {
                    subject,
                    sid,
                    payload,
                }))
            }
            _ => Err(NatsError::Unknown(
                String::from_utf8_lossy(&verb[..verb.len().min(32)]).into_owned(),
            )),
        }
    }

    /// Bytes buffered and not yet parsed.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

fn text(s: String) -> Message {
    Message::Binary(Bytes::from(s))
}

/// `PUB subject n\r\n<payload>\r\n` as one frame.
pub fn pub_frame(subject: &str, payload: &[u8]) -> Message {
    let mut b = Vec::with_capacity(subject.len() + payload.len() + 24);
    b.extend_from_slice(format!("PUB {subject} {}\r\n", payload.len()).as_bytes());
    b.extend_from_slice(payload);
    b.extend_from_slice(b"\r\n");
    Message::Binary(b.into())
}

/// Reads frames into `parser` until it yields an operation.
pub async fn next_op(ws: &mut Ws, parser: &mut Parser) -> Result<Op, BenchError> {
    loop {
        if let Some(op) = parser.next_op()? {
            return Ok(op);
        }
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => parser.push(&b),
            Some(Ok(Message::Text(t))) => parser.push(t.as_bytes()),
            Some(Ok(Message::Close(_))) | None => return Err(BenchError::Closed),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
        }
    }
}

/// INFO, CONNECT, the optional SUB, then PING/PONG to know the server took it all.
pub async fn handshake(
    ws: &mut Ws,
    parser: &mut Parser,
    subscribe: Option<&str>,
) -> Result<(), BenchError> {
    match next_op(ws, parser).await? {
        Op::Info(_) => {}
        other => {
            return Err(BenchError::protocol(format!(
                "nats: expected INFO, got {other:?}"
            )));
        }
    }
    let mut hello = String::from(CONNECT);
    if let Some(subject) = subscribe {
        hello.push_str(&format!("SUB {subject} 1\r\n"));
    }
    hello.push_str("PING\r\n");
    ws.send(text(hello)).await?;
    loop {
        match next_op(ws, parser).await? {
            Op::Pong => return Ok(()),
            Op::Ping => ws.send(text("PONG\r\n".into())).await?,
            Op::Err(e) => return Err(BenchError::SignIn { code: -1, msg: e }),
            _ => {}
        }
    }
}

/// A subscriber's life after the handshake: MSG into the recorder, PONG to
/// PING, a PING of its own every heartbeat period. True if stopped, false
/// if the connection ended.
pub async fn receive(
    ws: &mut Ws,
    parser: &mut Parser,
    ctx: &SessionCtx,
    tracker: &mut SessionTracker,
    index: u64,
    stop: &CancellationToken,
) -> bool {
    let mut next_beat = Instant::now() + heartbeat_offset(index, ctx.heartbeat);
    let counters = &ctx.recorder.counters;
    let mut got: Vec<Bytes> = Vec::new();
    loop {
        let frame = tokio::select! {
            _ = stop.cancelled() => return true,
            _ = tokio::time::sleep_until(next_beat) => {
                next_beat += ctx.heartbeat;
                if ws.send(text("PING\r\n".into())).await.is_err() {
                    return false;
                }
                continue;
            }
            m = ws.next() => m,
        };
        match frame {
            Some(Ok(Message::Binary(b))) => parser.push(&b),
            Some(Ok(Message::Text(t))) => parser.push(t.as_bytes()),
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return false,
            Some(Ok(_)) => continue,
        }
        let mut pong = false;
        loop {
            match parser.next_op() {
                Ok(Some(Op::Msg { payload, .. })) => got.push(payload),
                Ok(Some(Op::Ping)) => pong = true,
                Ok(Some(Op::Err(_))) => {
                    counters.server_errors.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => {
                    counters.server_errors.fetch_add(1, Ordering::Relaxed);
                    return false;
                }
            }
        }
        if !got.is_empty() {
            ctx.recorder
                .deliver(tracker, &ctx.map, got.iter().map(|b| &b[..]));
            got.clear();
        }
        if pong && ws.send(text("PONG\r\n".into())).await.is_err() {
            return false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(p: &mut Parser) -> Vec<Op> {
        let mut v = Vec::new();
        while let Some(op) = p.next_op().unwrap() {
            v.push(op);
        }
        v
    }

    #[test]
    fn parses_msg_and_control_ops() {
        let mut p = Parser::default();
        p.push(b"INFO {\"server_id\":\"x\"}\r\n+OK\r\nPING\r\nMSG bench-0 1 5\r\nhello\r\nMSG bench-0 1 _INBOX.r 0\r\n\r\n-ERR 'Slow Consumer'\r\npong\r\n");
        let ops = all(&mut p);
        assert_eq!(
            ops,
            vec![
                Op::Info(Bytes::from_static(b"{\"server_id\":\"x\"}")),
                Op::Ok,
                Op::Ping,
                Op::Msg {
                    subject: Bytes::from_static(b"bench-0"),
                    sid: Bytes::from_static(b"1"),
                    payload: Bytes::from_static(b"hello")
                },
                Op::Msg {
                    subject: Bytes::from_static(b"bench-0"),
                    sid: Bytes::from_static(b"1"),
                    payload: Bytes::new()
                },
                Op::Err("Slow Consumer".into()),
                Op::Pong,
            ]
        );
        assert_eq!(p.pending(), 0);
    }

    #[test]
    fn messages_split_across_frames() {
        let whole = b"MSG s 9 11\r\nhello\r\nworl\r\nPING\r\n";
        // Payload holds a CRLF: only the length counts. Feed byte by byte.
        let mut p = Parser::default();
        let mut ops = Vec::new();
        for b in whole {
            p.push(&[*b]);
            ops.extend(all(&mut p));
        }
        assert_eq!(ops.len(), 2);
        match &ops[0] {
            Op::Msg { payload, sid, .. } => {
                assert_eq!(&payload[..], b"hello\r\nworl");
                assert_eq!(&sid[..], b"9");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(ops[1], Op::Ping);
    }

    #[test]
    fn hmsg_skips_headers() {
        let mut p = Parser::default();
        p.push(b"HMSG s 1 12 17\r\nNATS/1.0\r\n\r\nhello\r\n");
        match p.next_op().unwrap() {
            Some(Op::Msg { payload, .. }) => assert_eq!(&payload[..], b"hello"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rejects_garbage() {
        let mut p = Parser::default();
        p.push(b"MSG s 1 notanumber\r\n");
        assert!(matches!(p.next_op(), Err(NatsError::Malformed(_))));
        let mut p = Parser::default();
        p.push(b"MSG s\r\n");
        assert!(matches!(p.next_op(), Err(NatsError::Malformed(_))));
        let mut p = Parser::default();
        p.push(b"MSG s 1 3\r\nabcXY");
        assert!(matches!(p.next_op(), Err(NatsError::Malformed(_))));
        let mut p = Parser::default();
        p.push(b"WHAT\r\n");
        assert!(matches!(p.next_op(), Err(NatsError::Unknown(_))));
        let mut p = Parser::default();
        p.push(&vec![b'x'; MAX_CONTROL + 1]);
        assert_eq!(p.next_op(), Err(NatsError::LineTooLong));
        let mut p = Parser::default();
        p.push(format!("MSG s 1 {}\r\n", MAX_PAYLOAD + 1).as_bytes());
        assert!(matches!(p.next_op(), Err(NatsError::TooLarge(_))));
        let mut p = Parser::default();
        p.push(b"HMSG s 1 20 10\r\n");
        assert!(matches!(p.next_op(), Err(NatsError::Malformed(_))));
    }

    #[test]
    fn pub_frames() {
        let Message::Binary(b) = pub_frame("bench-1", b"abc") else {
            panic!()
        };
        assert_eq!(&b[..], b"PUB bench-1 3\r\nabc\r\n");
    }
}

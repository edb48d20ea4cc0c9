//! A small RFC 6455 server, written for a push gateway: the HTTP upgrade,
//! then frames read into a buffer that exists only while bytes are in
//! flight (an idle session holds none), and frames written straight from
//! shared `Bytes` with vectored writes — server frames are unmasked, so one
//! encoded push is sent to every session without a per-session copy.

use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// Largest HTTP upgrade request accepted.
const MAX_REQUEST: usize = 8 * 1024;
/// Largest control frame payload (RFC 6455 5.5).
const MAX_CONTROL: usize = 125;

#[derive(Debug, thiserror::Error)]
pub enum WsError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad upgrade request: {0}")]
    BadRequest(&'static str),
    #[error("no such endpoint: {0}")]
    NotFound(String),
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    #[error("message larger than {0} bytes")]
    TooLarge(usize),
    #[error("text frame is not UTF-8")]
    BadUtf8,
}

impl WsError {
    /// The close code to answer this error with, if the socket is still usable.
    pub fn close_code(&self) -> Option<u16> {
        match self {
            WsError::Protocol(_) => Some(1002),
            WsError::TooLarge(_) => Some(1009),
            WsError::BadUtf8 => Some(1007),
            _ => None,
        }
    }
}

/// Frame opcodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    Continuation = 0,
    Text = 1,
    Binary = 2,
    Close = 8,
    Ping = 9,
    Pong = 10,
}

impl OpCode {
    fn from_u8(b: u8) -> Option<OpCode> {
        Some(match b {
            0 => OpCode::Continuation,
            1 => OpCode::Text,
            2 => OpCode::Binary,
            8 => OpCode::Close,
            9 => OpCode::Ping,
            10 => OpCode::Pong,
            _ => return None,
        })
    }
}

/// A whole message (or control frame) from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// Valid UTF-8.
    Text(Bytes),
    Binary(Bytes),
    Ping(Bytes),
    Pong,
    Close(Option<u16>),
}

/// What the client asked for in its upgrade request.
#[derive(Debug)]
pub struct Upgrade {
    pub path: String,
    pub query: String,
}

/// Reads the HTTP upgrade request, answers it (101, or an error status for
/// a bad request or an unknown path), and returns the request's path and
/// query with the bytes the client already sent after it.
pub async fn accept(
    stream: &mut TcpStream,
    paths: &[&str],
) -> Result<(Upgrade, BytesMut), WsError> {
    let mut buf = BytesMut::with_capacity(1024);
    let head_len = loop {
        if let Some(i) = find_head_end(&buf) {
            break i;
        }
        if buf.len() >= MAX_REQUEST {
            respond(stream, "431 Request Header Fields Too Large", "").await;
            return Err(WsError::BadRequest("request head too large"));
        }
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(WsError::BadRequest("connection closed during the upgrade"));
        }
    };
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let parsed = req.parse(&buf[..head_len]);
    if !matches!(parsed, Ok(httparse::Status::Complete(_))) || req.method != Some("GET") {
        respond(
            stream,
            "400 Bad Request",
            "expected a WebSocket upgrade (GET)\n",
        )
        .await;
        return Err(WsError::BadRequest("not a GET request"));
    }
    let target = req.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if !paths.contains(&path) {
        let body = format!("not found: WebSocket endpoints are {}\n", paths.join(", "));
        respond(stream, "404 Not Found", &body).await;
        return Err(WsError::NotFound(path.to_string()));
    }
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).into_owned())
            .unwrap_or_default()
    };
    let has_token = |name: &str, token: &str| {
        header(name)
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
        respond(
            stream,
            "426 Upgrade Required",
            "this endpoint speaks WebSocket only\n",
        )
        .await;
        return Err(WsError::BadRequest("missing Upgrade: websocket"));
    }
    if header("sec-websocket-version").trim() != "13" {
        respond(
            stream,
            "426 Upgrade Required\r\nSec-WebSocket-Version: 13",
            "",
        )
        .await;
        return Err(WsError::BadRequest("unsupported WebSocket version"));
    }
    let key = header("sec-websocket-key");
    if key.trim().is_empty() {
        respond(stream, "400 Bad Request", "missing Sec-WebSocket-Key\n").await;
        return Err(WsError::BadRequest("missing Sec-WebSocket-Key"));
    }
    let accept =
        tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.trim().as_bytes());
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    stream.write_all(resp.as_bytes()).await?;
    let up = Upgrade {
        path: path.to_string(),
        query: query.to_string(),
    };
    buf.advance(head_len);
    Ok((up, buf))
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

async fn respond(stream: &mut TcpStream, status: &str, body: &str) {
    let r = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(r.as_bytes()).await;
}

/// The read half: whole messages, control frames as they come.
pub struct Reader {
    io: OwnedReadHalf,
    /// Unparsed bytes; empty (no allocation) while the session is idle.
    buf: BytesMut,
    /// Fragments of a message in progress.
    partial: Option<(OpCode, BytesMut)>,
    max_message: usize,
    chunk: usize,
}

/// The write half.
pub struct Writer {
    io: OwnedWriteHalf,
}

/// Splits an upgraded stream; `leftover` are bytes read past the request.
pub fn split(
    stream: TcpStream,
    leftover: BytesMut,
    max_message: usize,
    chunk: usize,
) -> (Reader, Writer) {
    let (r, w) = stream.into_split();
    (
        Reader {
            io: r,
            buf: leftover,
            partial: None,
            max_message,
            chunk: chunk.max(64),
        },
        Writer { io: w },
    )
}

impl Reader {
    /// The next message or control frame; `Ok(None)` when the peer closed
    /// the connection without a close frame.
    pub async fn next(&mut self) -> Result<Option<Frame>, WsError> {
        loop {
            if let Some(f) = self.parse()? {
                if self.buf.is_empty() {
                    // Release the buffer: idle sessions should hold none.
                    self.buf = BytesMut::new();
                }
                return Ok(Some(f));
            }
            if self.buf.capacity() == self.buf.len() {
                if self.buf.is_empty() {
                    // Allocate only once the peer has something to say.
                    self.io.readable().await?;
                }
                self.buf.reserve(self.chunk);
            }
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return Ok(None);
            }
        }
    }

    /// One complete frame from the buffer, if there is one.
    fn parse(&mut self) -> Result<Option<Frame>, WsError> {
        loop {
            let b = &self.buf[..];
            if b.len() < 2 {
                return Ok(None);
            }
            let (fin, rsv, op) = (b[0] & 0x80 != 0, b[0] & 0x70, b[0] & 0x0f);
            let masked = b[1] & 0x80 != 0;
            if rsv != 0 {
                return Err(WsError::Protocol("reserved bits set"));
            }
            if !masked {
                return Err(WsError::Protocol("client frames must be masked"));
            }
            let op = OpCode::from_u8(op).ok_or(WsError::Protocol("unknown opcode"))?;
            let (len, mut at) = match b[1] & 0x7f {
                126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as u64, 4),
                127 if b.len() >= 10 => {
                    let mut l = [0u8; 8];
                    l.copy_from_slice(&b[2..10]);
                    (u64::from_be_bytes(l), 10)
                }
                126 | 127 => return Ok(None),
                n => (n as u64, 2),
            };
            let control = matches!(op, OpCode::Close | OpCode::Ping | OpCode::Pong);
            if control && (!fin || len > MAX_CONTROL as u64) {
                return Err(WsError::Protocol("bad control frame"));
            }
            let so_far = self.partial.as_ref().map_or(0, |(_, p)| p.len()) as u64;
            if !control && so_far + len > self.max_message as u64 {
                return Err(WsError::TooLarge(self.max_message));
            }
            let len = len as usize;
            if b.len() < at + 4 + len {
                // Make room for the whole frame at once.
                self.buf.reserve(at + 4 + len - self.buf.len());
                return Ok(None);
            }
            let mask = [b[at], b[at + 1], b[at + 2], b[at + 3]];
            at += 4;
            self.buf.advance(at);
            let mut payload = self.buf.split_to(len);
            for (i, byte) in payload.iter_mut().enumerate() {
                *byte ^= mask[i & 3];
            }
            match op {
                OpCode::Ping => return Ok(Some(Frame::Ping(payload.freeze()))),
                OpCode::Pong => return Ok(Some(Frame::Pong)),
                OpCode::Close => {
                    let code =
                        (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                    return Ok(Some(Frame::Close(code)));
                }
                OpCode::Text | OpCode::Binary => {
                    if self.partial.is_some() {
                        return Err(WsError::Protocol("new message inside a fragmented one"));
                    }
                    if fin {
                        return finish(op, payload).map(Some);
                    }
                    self.partial = Some((op, payload));
                }
                OpCode::Continuation => {
                    let Some((first, mut acc)) = self.partial.take() else {
                        return Err(WsError::Protocol("continuation without a message"));
                    };
                    acc.extend_from_slice(&payload);
                    if fin {
                        return finish(first, acc).map(Some);
                    }
                    self.partial = Some((first, acc));
                }
            }
        }
    }
}

fn finish(op: OpCode, payload: BytesMut) -> Result<Frame, WsError> {
    let b = payload.freeze();
    if op == OpCode::Text {
        std::str::from_utf8(&b).map_err(|_| WsError::BadUtf8)?;
        Ok(Frame::Text(b))
    } else {
        Ok(Frame::Binary(b))
    }
}

/// A frame header for an unmasked server frame.
fn header(op: OpCode, len: usize) -> ([u8; 10], usize) {
    let mut h = [0u8; 10];
    h[0] = 0x80 | op as u8;
    let n = if len < 126 {
        h[1] = len as u8;
        2
    } else if len <= u16::MAX as usize {
        h[1] = 126;
        h[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        h[1] = 127;
        h[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    (h, n)
}

impl Writer {
    /// Writes the frames in one go (vectored: headers and shared payloads,
    /// no copies).
    pub async fn send(&mut self, frames: &[(OpCode, Bytes)]) -> std::io::Result<()> {
        if let [(op, payload)] = frames {
            // The common case in fan-out: nothing allocated.
            let (h, n) = header(*op, payload.len());
            let mut slices = [IoSlice::new(&h[..n]), IoSlice::new(payload)];
            return self.write_all(&mut slices).await;
        }
        let heads: Vec<([u8; 10], usize)> =
            frames.iter().map(|(op, p)| header(*op, p.len())).collect();
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(frames.len() * 2);
        for ((_, p), (h, n)) in frames.iter().zip(heads.iter()) {
            slices.push(IoSlice::new(&h[..*n]));
            slices.push(IoSlice::new(p));
        }
        self.write_all(&mut slices).await
    }

    async fn write_all(&mut self, mut bufs: &mut [IoSlice<'_>]) -> std::io::Result<()> {
        // Skip empty parts up front: a zero-length write would look like EOF.
        IoSlice::advance_slices(&mut bufs, 0);
        while !bufs.is_empty() {
            let upto = bufs.len().min(64);
            let n = self.io.write_vectored(&bufs[..upto]).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut bufs, n);
        }
        Ok(())
    }

    /// Sends a close frame (code and reason) and shuts the write side.
    pub async fn close(&mut self, code: u16, reason: &str) {
        let mut p = Vec::with_capacity(2 + reason.len().min(MAX_CONTROL - 2));
        p.extend_from_slice(&code.to_be_bytes());
        p.extend_from_slice(&reason.as_bytes()[..reason.len().min(MAX_CONTROL - 2)]);
        let _ = self.send(&[(OpCode::Close, Bytes::from(p))]).await;
        let _ = self.io.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

    async fn pair(
        path: &str,
    ) -> (
        Result<(Upgrade, Reader, Writer), WsError>,
        Option<tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>>,
    ) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}{path}", l.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let (up, left) = accept(&mut s, &["/room", "/chat"]).await?;
            let (r, w) = split(s, left, 1024, 256);
            Ok((up, r, w))
        });
        let client = tokio_tungstenite::connect_async_with_config(
            url,
            Some(WebSocketConfig::default()),
            false,
        )
        .await
        .ok()
        .map(|(c, _)| c);
        (server.await.unwrap(), client)
    }

    #[tokio::test]
    async fn talks_to_a_real_client_both_ways() {
        let (srv, client) = pair("/chat?id=1&token=x").await;
        let (up, mut r, mut w) = srv.unwrap();
        let mut c = client.unwrap();
        assert_eq!(
            (up.path.as_str(), up.query.as_str()),
            ("/chat", "id=1&token=x")
        );

        c.send(Message::Binary(Bytes::from_static(b"hello")))
            .await
            .unwrap();
        c.send(Message::Text("héllo".into())).await.unwrap();
        c.send(Message::Ping(Bytes::from_static(b"p")))
            .await
            .unwrap();
        let big = vec![7u8; 1000];
        c.send(Message::Binary(big.clone().into())).await.unwrap();
        assert_eq!(
            r.next().await.unwrap(),
            Some(Frame::Binary(Bytes::from_static(b"hello")))
        );
        assert_eq!(
            r.next().await.unwrap(),
            Some(Frame::Text(Bytes::from("héllo")))
        );
        assert_eq!(
            r.next().await.unwrap(),
            Some(Frame::Ping(Bytes::from_static(b"p")))
        );
        assert_eq!(r.next().await.unwrap(), Some(Frame::Binary(big.into())));
        assert!(r.buf.capacity() == 0, "idle reader holds no buffer");

        // Shared payloads of every size class, in one vectored write.
        let sizes = [0usize, 1, 125, 126, 65535, 65536, 70000];
        let frames: Vec<(OpCode, Bytes)> = sizes
            .iter()
            .map(|&n| (OpCode::Binary, Bytes::from(vec![n as u8; n])))
            .collect();
        w.send(&frames).await.unwrap();
        w.send(&[(OpCode::Text, Bytes::from_static(b"{\"a\":1}"))])
            .await
            .unwrap();
        for &n in &sizes {
            match c.next().await.unwrap().unwrap() {
                Message::Binary(b) => assert_eq!(
                    (b.len(), b.first().copied()),
                    (n, (n > 0).then_some(n as u8))
                ),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            c.next().await.unwrap().unwrap(),
            Message::Text("{\"a\":1}".into())
        );
        w.close(1001, "going away").await;
        match c.next().await.unwrap().unwrap() {
            Message::Close(Some(f)) => assert_eq!(u16::from(f.code), 1001),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn limits_and_violations() {
        let (srv, client) = pair("/room").await;
        let (_, mut r, _w) = srv.unwrap();
        let mut c = client.unwrap();
        c.send(Message::Binary(vec![0u8; 2000].into()))
            .await
            .unwrap();
        assert!(matches!(r.next().await, Err(WsError::TooLarge(1024))));

        let (srv, client) = pair("/nope").await;
        assert!(matches!(srv, Err(WsError::NotFound(_))));
        assert!(client.is_none(), "the client saw a refusal");
    }

    #[test]
    fn parser_rejects_bad_frames() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let a = l.local_addr().unwrap();
            let _c = std::net::TcpStream::connect(a).unwrap();
            let (s, _) = l.accept().unwrap();
            s.set_nonblocking(true).unwrap();
            let s = TcpStream::from_std(s).unwrap();
            let cases: [(&[u8], &str); 5] = [
                (&[0x82, 0x01, b'x'], "unmasked"),
                (&[0xc2, 0x80, 0, 0, 0, 0], "rsv"),
                (&[0x83, 0x80, 0, 0, 0, 0], "opcode"),
                (&[0x09, 0x80, 0, 0, 0, 0], "fragmented ping"),
                (&[0x80, 0x80, 0, 0, 0, 0], "stray continuation"),
            ];
            let (mut r, _w) = split(s, BytesMut::new(), 1024, 64);
            for (bytes, what) in cases {
                r.buf = BytesMut::from(bytes);
                r.partial = None;
                assert!(matches!(r.parse(), Err(WsError::Protocol(_))), "{what}");
            }
            // A fragmented text message is reassembled and checked for UTF-8.
            r.buf = BytesMut::from(
                &[
                    0x01, 0x82, 0, 0, 0, 0, b'a', b'b', 0x80, 0x81, 0, 0, 0, 0, b'c',
                ][..],
            );
            assert_eq!(
                r.parse().unwrap(),
                Some(Frame::Text(Bytes::from_static(b"abc")))
            );
            r.buf = BytesMut::from(&[0x81, 0x81, 0, 0, 0, 0, 0xff][..]);
            assert!(matches!(r.parse(), Err(WsError::BadUtf8)));
            // Truncated input waits for more.
            r.buf = BytesMut::from(&[0x82, 0xfe, 0x01][..]);
            assert_eq!(r.parse().unwrap(), None);
        });
    }
}

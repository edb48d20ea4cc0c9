//! One nsqd TCP connection's set-up and plumbing, shared by the producer and
//! the consumer: connect, magic, IDENTIFY and its negotiated settings, a
//! frame reader over the read half, bounded writes, and reconnect backoff.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::NsqError;
use super::frame::{self, Command, Frame};

/// A TCP connect plus the IDENTIFY exchange must finish within this.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A write that cannot drain for this long means the peer is stuck.
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
pub(crate) const USER_AGENT: &str = "chatroom/0.1";

/// What we tell nsqd about ourselves in IDENTIFY.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    pub client_id: String,
    pub hostname: String,
    pub heartbeat_interval: Duration,
    pub msg_timeout: Option<Duration>,
}

/// The parts of nsqd's IDENTIFY answer we act on.
#[derive(Debug, Clone)]
pub(crate) struct Negotiated {
    /// Upper bound for RDY; nsqd treats a larger count as a fatal error.
    pub max_rdy_count: u32,
}

impl Default for Negotiated {
    fn default() -> Self {
        // nsqd's default --max-rdy-count, assumed when nsqd answers a bare OK.
        Negotiated {
            max_rdy_count: 2500,
        }
    }
}

/// A connected, identified nsqd connection, split for concurrent use.
pub(crate) struct Conn {
    pub reader: FrameReader<OwnedReadHalf>,
    pub writer: OwnedWriteHalf,
    pub negotiated: Negotiated,
}

/// Connects to `addr`, sends the magic and IDENTIFY, and reads the answer.
pub(crate) async fn connect(addr: &str, who: &Identity) -> Result<Conn, NsqError> {
    tokio::time::timeout(CONNECT_TIMEOUT, connect_inner(addr, who))
        .await
        .map_err(|_| NsqError::Timeout)?
}

async fn connect_inner(addr: &str, who: &Identity) -> Result<Conn, NsqError> {
    let stream = TcpStream::connect(addr).await?;
    // Commands are small and latency-sensitive (FIN, RDY, PUB answers).
    stream.set_nodelay(true)?;
    let (rd, mut writer) = stream.into_split();
    let mut reader = FrameReader::new(rd);

    let mut ident = serde_json::json!({
        "client_id": who.client_id,
        "hostname": who.hostname,
        "user_agent": USER_AGENT,
        "heartbeat_interval": who.heartbeat_interval.as_millis() as u64,
        "feature_negotiation": true,
    });
    if let Some(t) = who.msg_timeout {
        ident["msg_timeout"] = serde_json::json!(t.as_millis() as u64);
    }
    let json = serde_json::to_vec(&ident).map_err(|e| NsqError::Protocol(e.to_string()))?;
    let mut out = BytesMut::with_capacity(64 + json.len());
    out.extend_from_slice(frame::MAGIC_V2);
    Command::Identify(&json).encode(&mut out).map_err(proto)?;
    writer.write_all(&out).await?;

    let negotiated = match reader.next_frame().await? {
        Some(Frame::Response(body)) => parse_identify_response(&body)?,
        Some(Frame::Error(e)) => return Err(server_error(&e)),
        Some(Frame::Message(_)) => {
            return Err(NsqError::Protocol(
                "message frame before IDENTIFY answer".into(),
            ));
        }
        None => return Err(NsqError::Closed),
    };
    Ok(Conn {
        reader,
        writer,
        negotiated,
    })
}

/// nsqd answers `OK` without feature negotiation, JSON with it.
fn parse_identify_response(body: &[u8]) -> Result<Negotiated, NsqError> {
    if body == frame::OK {
        return Ok(Negotiated::default());
    }
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
        NsqError::Protocol(format!(
            "IDENTIFY answer is neither OK nor JSON ({e}): {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        ))
    })?;
    let mut n = Negotiated::default();
    if let Some(m) = v.get("max_rdy_count").and_then(|m| m.as_u64()) {
        n.max_rdy_count = m.clamp(1, u32::MAX as u64) as u32;
    }
    for feature in ["tls_v1", "deflate", "snappy"] {
        if v.get(feature).and_then(|f| f.as_bool()) == Some(true) {
            // We never ask for these, so nsqd saying yes means we would
            // misread every following byte.
            return Err(NsqError::Protocol(format!(
                "nsqd enabled {feature}, which this client does not support"
            )));
        }
    }
    if v.get("auth_required").and_then(|f| f.as_bool()) == Some(true) {
        return Err(NsqError::Protocol(
            "nsqd requires AUTH, which this client does not support".into(),
        ));
    }
    Ok(n)
}

pub(crate) fn proto(e: frame::FrameError) -> NsqError {
    NsqError::Protocol(e.to_string())
}

pub(crate) fn server_error(text: &[u8]) -> NsqError {
    NsqError::Server(String::from_utf8_lossy(&text[..text.len().min(1024)]).into_owned())
}

/// Writes a whole buffer or fails within [`WRITE_TIMEOUT`].
pub(crate) async fn write_all(w: &mut OwnedWriteHalf, buf: &[u8]) -> Result<(), NsqError> {
    match tokio::time::timeout(WRITE_TIMEOUT, w.write_all(buf)).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(NsqError::Timeout),
    }
}

/// Reads frames off a byte stream, keeping partial frames between calls.
pub(crate) struct FrameReader<R> {
    rd: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub(crate) fn new(rd: R) -> Self {
        FrameReader {
            rd,
            buf: BytesMut::with_capacity(8 * 1024),
        }
    }

    /// The next frame, `Ok(None)` on a clean EOF between frames.
    ///
    /// Cancel-safe: bytes already read stay in the buffer, so it can be used
    /// as a `select!` branch.
    pub(crate) async fn next_frame(&mut self) -> Result<Option<Frame>, NsqError> {
        loop {
            if let Some(f) = frame::decode_frame(&mut self.buf).map_err(proto)? {
                return Ok(Some(f));
            }
            if self.buf.capacity() - self.buf.len() < 4096 {
                self.buf.reserve(8 * 1024);
            }
            let n = self.rd.read_buf(&mut self.buf).await?;
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(NsqError::Protocol("connection closed mid-frame".into()))
                };
            }
        }
    }
}

/// Reported to nsqd in IDENTIFY; falls back to `fallback` when unknown.
pub(crate) fn hostname(fallback: &str) -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| fallback.to_string())
}

/// Configured addresses with blanks removed (config lists may carry them).
pub(crate) fn clean_addresses(addrs: &[String]) -> Vec<String> {
    addrs
        .iter()
        .map(|a| a.trim().to_string())
        .filter(|a| !a.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identify_answers() {
        assert_eq!(parse_identify_response(b"OK").unwrap().max_rdy_count, 2500);
        let n = parse_identify_response(br#"{"max_rdy_count":100,"tls_v1":false}"#).unwrap();
        assert_eq!(n.max_rdy_count, 100);
        assert!(parse_identify_response(br#"{"snappy":true}"#).is_err());
        assert!(parse_identify_response(b"\xff garbage").is_err());
    }

    #[tokio::test]
    async fn reader_handles_split_reads_and_eof() {
        let mut data = Vec::new();
        data.extend_from_slice(&6u32.to_be_bytes());
        data.extend_from_slice(&0u32.to_be_bytes());
        data.extend_from_slice(b"OK");
        let (mut a, b) = tokio::io::duplex(4);
        let writer = tokio::spawn(async move {
            a.write_all(&data).await.unwrap();
            a.write_all(&[0, 0]).await.unwrap();
        });
        let mut r = FrameReader::new(b);
        assert!(
            matches!(r.next_frame().await, Ok(Some(Frame::Response(ref b))) if &b[..] == b"OK")
        );
        writer.await.unwrap();
        assert!(matches!(r.next_frame().await, Err(NsqError::Protocol(_))));
    }
}

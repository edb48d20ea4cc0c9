//! NSQ client speaking nsqd's TCP protocol V2, plus nsqlookupd discovery.
//!
//! Written in-house because the published Rust clients either do not build
//! on stable or are unmaintained. [`Producer`] publishes over one pipelined
//! connection with fail-over; [`Consumer`] subscribes to every nsqd it is
//! given or discovers, with RDY flow control, reconnects and a draining
//! shutdown. Messages are at-least-once: anything not FINed is redelivered.

mod conn;
mod consumer;
mod frame;
mod lookup;
mod message;
pub mod metrics;
mod producer;

pub use consumer::{Consumer, ConsumerConfig};
pub use message::Message;
pub use producer::Producer;

#[derive(Debug, thiserror::Error)]
pub enum NsqError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("nsqd error: {0}")]
    Server(String),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("no nsqd reachable")]
    NoServer,
    #[error("closed")]
    Closed,
    /// The connection died with the request outstanding: it may or may not
    /// have been applied.
    #[error("connection to nsqd lost before it answered")]
    Disconnected,
    #[error("timed out waiting for nsqd")]
    Timeout,
    #[error("nsqlookupd: {0}")]
    Lookup(String),
}

/// Parses `bytes` as a stream of frames from nsqd, exactly as a
/// connection's reader does: how many whole frames it holds (a partial one
/// at the end is left waiting, as on a socket), or the error that would
/// drop the connection. Public so that property tests can check that
/// nothing a broker sends panics the client.
pub fn parse_frames(bytes: &[u8]) -> Result<usize, NsqError> {
    let mut buf = bytes::BytesMut::from(bytes);
    let mut n = 0;
    while frame::decode_frame(&mut buf)
        .map_err(conn::proto)?
        .is_some()
    {
        n += 1;
    }
    Ok(n)
}

/// Topic and channel names: 1-64 characters of `[.a-zA-Z0-9_-]`
/// (a channel may end in `#ephemeral`).
pub fn valid_name(s: &str) -> bool {
    let base = s.strip_suffix("#ephemeral").unwrap_or(s);
    !base.is_empty()
        && s.len() <= 64
        && base
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::valid_name;

    #[test]
    fn names() {
        assert!(valid_name("chatroom-room"));
        assert!(valid_name("job#ephemeral"));
        assert!(!valid_name(""));
        assert!(!valid_name("#ephemeral"));
        assert!(!valid_name("a b"));
        assert!(!valid_name(&"x".repeat(65)));
    }
}

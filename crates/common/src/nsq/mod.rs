//! NSQ client (TCP protocol V2). API skeleton: being implemented.

use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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

/// Publishes to nsqd.
#[derive(Clone)]
pub struct Producer {}

impl Producer {
    pub async fn connect(_nsqd_tcp_addresses: &[String]) -> Result<Producer, NsqError> {
        Err(NsqError::NoServer)
    }
    pub async fn publish(&self, _topic: &str, _body: Bytes) -> Result<(), NsqError> {
        Err(NsqError::Closed)
    }
    pub async fn multi_publish(&self, _topic: &str, _bodies: &[Bytes]) -> Result<(), NsqError> {
        Err(NsqError::Closed)
    }
    pub async fn close(&self) {}
}

#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub topic: String,
    pub channel: String,
    pub nsqd_tcp_addresses: Vec<String>,
    pub lookupd_http_addresses: Vec<String>,
    pub max_in_flight: u32,
    pub client_id: String,
    pub heartbeat_interval: Duration,
    pub lookupd_poll_interval: Duration,
    pub drain_timeout: Duration,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            topic: String::new(),
            channel: String::new(),
            nsqd_tcp_addresses: vec![],
            lookupd_http_addresses: vec![],
            max_in_flight: 256,
            client_id: String::new(),
            heartbeat_interval: Duration::from_secs(30),
            lookupd_poll_interval: Duration::from_secs(15),
            drain_timeout: Duration::from_secs(10),
        }
    }
}

pub struct Consumer {}

impl Consumer {
    pub fn start(
        _cfg: ConsumerConfig,
        _tracker: &TaskTracker,
        _shutdown: CancellationToken,
    ) -> Consumer {
        Consumer {}
    }
    pub async fn next(&mut self) -> Option<Message> {
        None
    }
}

pub struct Message {
    pub id: [u8; 16],
    pub attempts: u16,
    pub timestamp_ns: i64,
    pub body: Bytes,
}

impl Message {
    pub fn finish(self) {}
    pub fn requeue(self, _delay: Duration) {}
    pub fn touch(&self) {}
}

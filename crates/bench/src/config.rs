//! The parameters of one run, as the library takes them (the CLI in
//! `cli.rs` builds one), with their checks. Workers get a copy inside their
//! plan, so everything here is serializable.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::BenchError;
use crate::payload::{HEADER_LEN, MAX_PUBLISHERS};
use crate::rooms::RoomDist;

/// What server is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// chatroom's protobuf protocol over WebSocket.
    Chatroom,
    /// nats-server's text protocol over WebSocket.
    Nats,
}

/// How publishers publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishVia {
    /// A WebSocket session per publisher (chatroom `MESSAGE`, NATS `PUB`).
    Ws,
    /// chatroom's `POST /msg` (always IMPORTANT).
    Http,
}

/// Level of WebSocket-published chatroom messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Normal,
    Important,
}

/// Where session tokens come from.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum TokenSource {
    /// `POST /tk` once per uid.
    Http,
    /// Signed locally with the server's HS256 secret.
    Secret { secret: String },
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenSource::Http => f.write_str("Http"),
            TokenSource::Secret { .. } => f.write_str("Secret(..)"),
        }
    }
}

/// One run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunConfig {
    pub target: Target,
    /// `ws://host:port/room` (chatroom) or `ws://host:port` (NATS), one or
    /// more: session `i` connects to `ws_urls[i % n]`, publisher `j` to
    /// `ws_urls[j % n]` (several conn nodes of one cluster).
    pub ws_urls: Vec<String>,
    /// chatroom's HTTP API, `http://host:port`.
    pub http_url: String,
    /// Receiving sessions.
    pub sessions: u64,
    pub rooms: u32,
    pub room_dist: RoomDist,
    /// Room ids (and NATS subjects) are `<prefix>-<n>`.
    pub room_prefix: String,
    /// Publishing connections (chatroom WebSocket sessions, HTTP clients or
    /// NATS connections), besides the receiving sessions.
    pub publishers: u32,
    /// Messages per second over all publishers.
    pub rate: f64,
    pub publish: PublishVia,
    pub level: Level,
    /// Payload bytes (at least the 29-byte header).
    pub size: usize,
    /// Measured publishing time, after the warm-up.
    pub duration: Duration,
    /// Publishing before the measurement starts (not in latency figures).
    pub warmup: Duration,
    /// Idle time after every session signed in, before the server's memory is read.
    pub settle: Duration,
    /// Longest wait for in-flight deliveries after publishing stops.
    pub drain: Duration,
    /// Longest time for all sessions to connect and sign in.
    pub connect_timeout: Duration,
    /// Longest time for one session to connect and sign in.
    pub session_timeout: Duration,
    /// Client heartbeat period (spread over sessions).
    pub heartbeat: Duration,
    /// The server's processes (one, or every process of a cluster), for
    /// their memory (`/proc/<pid>/status`) and CPU time, added up.
    pub server_pids: Vec<u32>,
    /// Supporting processes (etcd, the NSQ broker): their CPU time is
    /// reported on its own, neither as the server's nor as other load.
    pub infra_pids: Vec<u32>,
    /// Worker processes; 1 runs every session in this process.
    pub processes: u32,
    /// Local addresses to connect from, round-robin; empty: the OS picks.
    pub source_ips: Vec<Ipv4Addr>,
    /// Sessions connecting at once, over all workers.
    pub connect_concurrency: u32,
    pub tokens: TokenSource,
    /// `POST /msg` requests in flight per HTTP publisher.
    pub http_inflight: u32,
    /// The binary re-executed as `worker`; default: this executable.
    pub worker_exe: Option<PathBuf>,
    /// Print a progress line every second to stderr.
    pub progress: bool,
    /// Latency of one message in this many (by sequence number, the same
    /// messages at every session); loss and duplicates count every message.
    pub latency_every: u32,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            target: Target::Chatroom,
            ws_urls: vec!["ws://127.0.0.1:8080/room".into()],
            http_url: "http://127.0.0.1:8081".into(),
            sessions: 1000,
            rooms: 1,
            room_dist: RoomDist::Uniform,
            room_prefix: "bench".into(),
            publishers: 1,
            rate: 100.0,
            publish: PublishVia::Ws,
            level: Level::Normal,
            size: 64,
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(2),
            settle: Duration::from_secs(2),
            drain: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(180),
            session_timeout: Duration::from_secs(15),
            heartbeat: Duration::from_secs(30),
            server_pids: Vec::new(),
            infra_pids: Vec::new(),
            processes: 1,
            source_ips: Vec::new(),
            connect_concurrency: 256,
            tokens: TokenSource::Http,
            http_inflight: 8,
            worker_exe: None,
            progress: false,
            latency_every: 1,
        }
    }
}

/// Open files one process may hold here (hard limit 20,000), less a margin.
pub const MAX_SOCKETS_PER_PROCESS: u64 = 19_000;

/// Upper bound on a whole run beyond the phases' own limits.
const SLACK: Duration = Duration::from_secs(60);

impl RunConfig {
    pub fn validate(&self) -> Result<(), BenchError> {
        let bad = |m: String| Err(BenchError::Config(m));
        if self.sessions == 0 {
            return bad("--sessions must be at least 1".into());
        }
        if self.rooms == 0 {
            return bad("--rooms must be at least 1".into());
        }
        if self.publishers >= MAX_PUBLISHERS {
            return bad(format!("--publishers must be below {MAX_PUBLISHERS}"));
        }
        if !(self.rate.is_finite() && self.rate >= 0.0) {
            return bad("--rate must be a number >= 0".into());
        }
        if self.size < HEADER_LEN || self.size > 1 << 20 {
            return bad(format!(
                "--size must be {HEADER_LEN}..=1048576 bytes (the payload header is {HEADER_LEN})"
            ));
        }
        if self.processes == 0 || self.processes > 64 {
            return bad("--processes must be 1..=64".into());
        }
        if self.connect_concurrency == 0 {
            return bad("--connect-concurrency must be at least 1".into());
        }
        if self.http_inflight == 0 {
            return bad("--http-inflight must be at least 1".into());
        }
        if self.heartbeat.is_zero() {
            return bad("--heartbeat must be > 0".into());
        }
        if !(1..=1000).contains(&self.latency_every) {
            return bad("--latency-every must be 1..=1000".into());
        }
        if self.target == Target::Nats && self.publish == PublishVia::Http {
            return bad("--publish http is chatroom's POST /msg; NATS publishes over ws".into());
        }
        if self.room_prefix.is_empty()
            || !self
                .room_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return bad("--room-prefix must be ASCII letters, digits or _".into());
        }
        let per_process = self.sessions.div_ceil(u64::from(self.processes));
        if per_process > MAX_SOCKETS_PER_PROCESS {
            return bad(format!(
                "{} sessions per process is over the {MAX_SOCKETS_PER_PROCESS} sockets one process may open here: \
                 use --processes {} or more",
                per_process,
                self.sessions.div_ceil(MAX_SOCKETS_PER_PROCESS)
            ));
        }
        if self.ws_urls.is_empty() {
            return bad("--ws needs at least one URL".into());
        }
        if let Some(u) = self.ws_urls.iter().find(|u| !u.starts_with("ws://")) {
            return bad(format!("--ws must be ws:// URLs, not {u}"));
        }
        if !self.http_url.starts_with("http://") {
            return bad(format!(
                "--http must be an http:// URL, not {}",
                self.http_url
            ));
        }
        Ok(())
    }

    /// Processes to use when the user did not say: about 9,000 sessions each.
    pub fn auto_processes(sessions: u64) -> u32 {
        sessions.div_ceil(9_000).clamp(1, 64) as u32
    }

    /// The index in `ws_urls` of the server session `i` connects to:
    /// round-robin, `i % n`.
    pub fn ws_index_of_session(&self, i: u64) -> usize {
        (i % self.ws_urls.len().max(1) as u64) as usize
    }

    /// The index in `ws_urls` of the server publisher `j` connects to:
    /// round-robin, `j % n`, as for sessions.
    pub fn ws_index_of_publisher(&self, j: u32) -> usize {
        self.ws_index_of_session(u64::from(j))
    }

    /// Whether any message is published.
    pub fn publishing(&self) -> bool {
        self.publishers > 0 && self.rate > 0.0 && !self.duration.is_zero()
    }

    /// The hard limit on the whole run: every phase's own limit plus slack.
    pub fn hard_deadline(&self) -> Duration {
        self.connect_timeout
            + self.settle
            + self.session_timeout
            + self.warmup
            + self.duration
            + self.drain
            + SLACK
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_limits_are_checked() {
        let c = RunConfig::default();
        c.validate().unwrap();
        let e = RunConfig {
            sessions: 30_000,
            ..RunConfig::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("--processes 2"), "{e}");
        assert!(
            RunConfig {
                size: 10,
                ..RunConfig::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            RunConfig {
                target: Target::Nats,
                publish: PublishVia::Http,
                ..RunConfig::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            RunConfig {
                ws_urls: Vec::new(),
                ..RunConfig::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            RunConfig {
                ws_urls: vec!["ws://a:1/room".into(), "http://b:1/room".into()],
                ..RunConfig::default()
            }
            .validate()
            .is_err()
        );
        assert_eq!(RunConfig::auto_processes(19_000), 3);
        assert_eq!(RunConfig::auto_processes(100), 1);
        assert!(
            format!(
                "{:?}",
                TokenSource::Secret {
                    secret: "s3cr3t".into()
                }
            )
            .contains("..")
        );
    }

    #[test]
    fn servers_are_assigned_round_robin() {
        let c = RunConfig {
            ws_urls: vec![
                "ws://a:1/room".into(),
                "ws://b:1/room".into(),
                "ws://c:1/room".into(),
            ],
            ..RunConfig::default()
        };
        let sessions: Vec<usize> = (0..7).map(|i| c.ws_index_of_session(i)).collect();
        assert_eq!(sessions, vec![0, 1, 2, 0, 1, 2, 0]);
        let pubs: Vec<usize> = (0..4).map(|j| c.ws_index_of_publisher(j)).collect();
        assert_eq!(pubs, vec![0, 1, 2, 0]);
        // Two servers, 10,000 sessions: an even split.
        let two = RunConfig {
            ws_urls: vec!["ws://a:1/room".into(), "ws://b:1/room".into()],
            ..RunConfig::default()
        };
        let on_b = (0..10_000u64)
            .filter(|&i| two.ws_index_of_session(i) == 1)
            .count();
        assert_eq!(on_b, 5_000);
        // One server: everyone there.
        let one = RunConfig::default();
        assert!((0..100u64).all(|i| one.ws_index_of_session(i) == 0));
    }
}

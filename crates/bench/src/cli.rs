//! The command line: `chatroom-bench run ...` (and the hidden `worker`
//! subcommand the binary re-executes itself with), parsed with clap and
//! turned into a [`RunConfig`].

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{Level, PublishVia, RunConfig, Target, TokenSource};
use crate::error::BenchError;
use crate::net::parse_source_ips;
use crate::rooms::RoomDist;

/// Load generator for chatroom (and nats-server over WebSocket): how many
/// connections per GiB, how many deliveries per second, how late.
#[derive(Debug, Parser)]
#[command(name = "chatroom-bench", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Open sessions, publish at a rate, report deliveries, latency, loss and server memory.
    Run(Box<RunArgs>),
    /// Internal: one worker process of a multi-process run (JSON lines on stdin/stdout).
    #[command(hide = true)]
    Worker,
    /// The bare-socket floor: one message written to N idle sockets, nothing else.
    Floor(FloorArgs),
    /// Internal: the writer process of `floor`.
    #[command(hide = true)]
    FloorWriter(FloorWriterArgs),
}

#[derive(Debug, Args)]
pub struct FloorArgs {
    /// Sockets written to.
    #[arg(long, default_value_t = 10_000)]
    pub sessions: usize,
    /// Messages per second (each to every socket).
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Seconds of writing.
    #[arg(long, value_parser = secs, default_value = "10")]
    pub duration: Duration,
    /// Payload bytes.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Client source addresses, e.g. 127.0.0.2-127.0.0.20.
    #[arg(long, default_value = "")]
    pub source_ips: String,
    /// Also print the report as one JSON line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct FloorWriterArgs {
    #[arg(long)]
    pub sessions: usize,
    #[arg(long)]
    pub messages: u64,
    #[arg(long)]
    pub interval_us: u64,
    #[arg(long)]
    pub size: usize,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum TargetArg {
    Chatroom,
    Nats,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DistArg {
    Uniform,
    Single,
    Zipf,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PublishArg {
    Ws,
    Http,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LevelArg {
    Normal,
    Important,
}

fn secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(v.is_finite() && (0.0..=86_400.0).contains(&v)) {
        return Err("seconds must be 0..=86400".into());
    }
    Ok(Duration::from_secs_f64(v))
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Server protocol: chatroom (protobuf over WebSocket) or nats (NATS text protocol over WebSocket).
    #[arg(long, value_enum, default_value_t = TargetArg::Chatroom)]
    pub target: TargetArg,
    /// WebSocket endpoint (for nats: the server's websocket listener, e.g. ws://127.0.0.1:8222);
    /// several, comma-separated (conn nodes of a cluster): session i and publisher j
    /// connect to the (i mod n)-th and (j mod n)-th.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "ws://127.0.0.1:8080/room"
    )]
    pub ws: Vec<String>,
    /// chatroom HTTP API (POST /tk, POST /msg).
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    pub http: String,
    /// Receiving sessions.
    #[arg(long, default_value_t = 1000)]
    pub sessions: u64,
    /// Rooms (NATS: subjects).
    #[arg(long, default_value_t = 1)]
    pub rooms: u32,
    /// How sessions spread over rooms.
    #[arg(long, value_enum, default_value_t = DistArg::Uniform)]
    pub room_dist: DistArg,
    /// Exponent of the zipf distribution.
    #[arg(long, default_value_t = 1.0)]
    pub zipf_s: f64,
    /// Room ids are <prefix>-<n>.
    #[arg(long, default_value = "bench")]
    pub room_prefix: String,
    /// Publishing connections (publisher j publishes to room j % rooms).
    #[arg(long, default_value_t = 1)]
    pub publishers: u32,
    /// Messages per second over all publishers.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// How to publish: ws (MESSAGE on a signed-in session / NATS PUB) or http (POST /msg).
    #[arg(long, value_enum, default_value_t = PublishArg::Ws)]
    pub publish: PublishArg,
    /// Level of WebSocket-published messages (POST /msg is always important).
    #[arg(long, value_enum, default_value_t = LevelArg::Normal)]
    pub level: LevelArg,
    /// Payload bytes (at least 29: send time, publisher, sequence).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Measured publishing time, seconds (without publishers: how long to hold the idle sessions).
    #[arg(long, default_value = "10", value_parser = secs)]
    pub duration: Duration,
    /// Publishing before the measurement, seconds.
    #[arg(long, default_value = "2", value_parser = secs)]
    pub warmup: Duration,
    /// Idle time after all sessions signed in, before reading the server's memory, seconds.
    #[arg(long, default_value = "2", value_parser = secs)]
    pub settle: Duration,
    /// Longest wait for in-flight deliveries after publishing stops, seconds.
    #[arg(long, default_value = "5", value_parser = secs)]
    pub drain: Duration,
    /// Longest time for all sessions to connect and sign in, seconds.
    #[arg(long, default_value = "180", value_parser = secs)]
    pub connect_timeout: Duration,
    /// Sessions connecting at once (over all processes).
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: u32,
    /// Client heartbeat period, seconds (spread over sessions).
    #[arg(long, default_value = "30", value_parser = secs)]
    pub heartbeat: Duration,
    /// Server process id: its VmRSS before connecting and once idle gives memory per session.
    /// Several, comma-separated (every process of a cluster): memory and CPU are added up.
    #[arg(long, value_delimiter = ',')]
    pub server_pid: Vec<u32>,
    /// Supporting process ids, comma-separated (etcd, NSQ): their CPU is reported on its own
    /// (infra), not as the server's and not as other load.
    #[arg(long, value_delimiter = ',')]
    pub infra_pid: Vec<u32>,
    /// Worker processes (default: one per 9,000 sessions; at most 19,000 sessions per process).
    #[arg(long)]
    pub processes: Option<u32>,
    /// Local addresses to connect from, e.g. 127.0.0.2-127.0.0.20 (default: the OS picks).
    #[arg(long)]
    pub source_ips: Option<String>,
    /// Sign tokens locally with the server's token.secret instead of POST /tk per session.
    #[arg(long)]
    pub token_secret: Option<String>,
    /// POST /msg requests in flight per HTTP publisher.
    #[arg(long, default_value_t = 8)]
    pub http_inflight: u32,
    /// Binary to re-execute for worker processes (default: this one).
    #[arg(long)]
    pub worker_exe: Option<PathBuf>,
    /// Record the latency of one message in N (those whose sequence number is a multiple of N,
    /// the same messages at every session); loss and duplicates are counted for every message.
    #[arg(long, default_value_t = 1)]
    pub latency_every: u32,
    /// No progress lines on stderr.
    #[arg(long)]
    pub quiet: bool,
    /// Also print the report as one JSON line after the table.
    #[arg(long)]
    pub json: bool,
}

impl RunArgs {
    /// The run's configuration, checked.
    pub fn to_config(&self) -> Result<RunConfig, BenchError> {
        let cfg = RunConfig {
            target: match self.target {
                TargetArg::Chatroom => Target::Chatroom,
                TargetArg::Nats => Target::Nats,
            },
            ws_urls: self
                .ws
                .iter()
                .map(|u| u.trim().to_string())
                .filter(|u| !u.is_empty())
                .collect(),
            http_url: self.http.clone(),
            sessions: self.sessions,
            rooms: self.rooms,
            room_dist: match self.room_dist {
                DistArg::Uniform => RoomDist::Uniform,
                DistArg::Single => RoomDist::Single,
                DistArg::Zipf => RoomDist::Zipf { s: self.zipf_s },
            },
            room_prefix: self.room_prefix.clone(),
            publishers: self.publishers,
            rate: self.rate,
            publish: match self.publish {
                PublishArg::Ws => PublishVia::Ws,
                PublishArg::Http => PublishVia::Http,
            },
            level: match self.level {
                LevelArg::Normal => Level::Normal,
                LevelArg::Important => Level::Important,
            },
            size: self.size,
            duration: self.duration,
            warmup: self.warmup,
            settle: self.settle,
            drain: self.drain,
            connect_timeout: self.connect_timeout,
            session_timeout: RunConfig::default().session_timeout,
            heartbeat: self.heartbeat,
            server_pids: self.server_pid.clone(),
            infra_pids: self.infra_pid.clone(),
            processes: self
                .processes
                .unwrap_or_else(|| RunConfig::auto_processes(self.sessions)),
            source_ips: match &self.source_ips {
                Some(s) => parse_source_ips(s)?,
                None => Vec::new(),
            },
            connect_concurrency: self.connect_concurrency,
            tokens: match &self.token_secret {
                Some(secret) => TokenSource::Secret {
                    secret: secret.clone(),
                },
                None => TokenSource::Http,
            },
            http_inflight: self.http_inflight,
            worker_exe: self.worker_exe.clone(),
            progress: !self.quiet,
            latency_every: self.latency_every,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<RunConfig, String> {
        let mut full = vec!["chatroom-bench", "run"];
        full.extend_from_slice(args);
        let cli = Cli::try_parse_from(full).map_err(|e| e.to_string())?;
        match cli.command {
            Cmd::Run(a) => a.to_config().map_err(|e| e.to_string()),
            _ => Err("not run".into()),
        }
    }

    #[test]
    fn the_documented_command_line_parses() {
        let c = parse(&[
            "--ws",
            "ws://127.0.0.1:8080/room",
            "--http",
            "http://127.0.0.1:8081",
            "--sessions",
            "19000",
            "--rooms",
            "10",
            "--room-dist",
            "zipf",
            "--publishers",
            "4",
            "--rate",
            "500",
            "--publish",
            "http",
            "--size",
            "128",
            "--duration",
            "30",
            "--warmup",
            "5",
            "--server-pid",
            "1234",
            "--processes",
            "3",
            "--source-ips",
            "127.0.0.2-127.0.0.20",
            "--token-secret",
            "chatroom-dev-secret-change-me",
            "--json",
        ])
        .unwrap();
        assert_eq!(c.sessions, 19_000);
        assert_eq!(c.room_dist, RoomDist::Zipf { s: 1.0 });
        assert_eq!(c.publish, PublishVia::Http);
        assert_eq!(c.duration, Duration::from_secs(30));
        assert_eq!(c.server_pids, vec![1234]);
        assert!(c.infra_pids.is_empty());
        assert_eq!(c.ws_urls, vec!["ws://127.0.0.1:8080/room"]);
        assert_eq!(c.source_ips.len(), 19);
        assert!(matches!(c.tokens, TokenSource::Secret { .. }));
        assert_eq!(c.processes, 3);
    }

    #[test]
    fn defaults_and_errors() {
        let c = parse(&["--sessions", "19000"]).unwrap();
        assert_eq!(c.processes, 3);
        assert_eq!(c.ws_urls, vec!["ws://127.0.0.1:8080/room"]);
        assert!(c.server_pids.is_empty());
        assert!(c.progress);
        assert!(
            parse(&["--sessions", "19500", "--processes", "1"])
                .unwrap_err()
                .contains("--processes 2")
        );
        assert!(parse(&["--duration", "soon"]).is_err());
        assert!(parse(&["--room-dist", "pareto"]).is_err());
        assert!(parse(&["--target", "nats", "--publish", "http"]).is_err());
        assert!(parse(&["--source-ips", "127.0.0.9-127.0.0.1"]).is_err());
        assert!(parse(&["--warmup", "0.5"]).is_ok());
        assert!(parse(&["--ws", "http://127.0.0.1:8080/room"]).is_err());
        assert!(parse(&["--ws", "ws://127.0.0.1:8080/room,tcp://x"]).is_err());
        assert!(parse(&["--ws", ""]).is_err());
        assert!(parse(&["--server-pid", "12,x"]).is_err());
    }

    #[test]
    fn several_servers_and_pids() {
        let c = parse(&[
            "--ws",
            "ws://127.0.0.1:18080/room,ws://127.0.0.1:18090/room",
            "--server-pid",
            "101,102,103",
            "--server-pid",
            "104",
            "--infra-pid",
            "7,8",
        ])
        .unwrap();
        assert_eq!(
            c.ws_urls,
            vec!["ws://127.0.0.1:18080/room", "ws://127.0.0.1:18090/room"]
        );
        assert_eq!(c.server_pids, vec![101, 102, 103, 104]);
        assert_eq!(c.infra_pids, vec![7, 8]);
        assert_eq!(c.ws_index_of_session(3), 1);
        assert_eq!(c.ws_index_of_publisher(2), 0);
        // Repeating --ws adds to the list, as a comma does.
        let c = parse(&["--ws", "ws://a:1/room", "--ws", "ws://b:1/room"]).unwrap();
        assert_eq!(c.ws_urls.len(), 2);
    }
}

//! The bare-socket floor: one message written to N idle sockets and nothing
//! else — no protocol, no rooms, no queues — so that the fan-out figures
//! can be read against what this machine's loopback TCP costs.
//!
//! `chatroom-bench floor` re-executes itself as a writer process (the
//! hidden `floor-writer`, which plays the server: it accepts N sockets,
//! answers their WebSocket upgrade, then writes each message to each
//! socket, one `write` per socket, in turn), opens N WebSocket sessions
//! from the given source addresses with the generator's own client
//! settings, and records publish-to-receive latency from the timestamp in
//! every payload. Each message is a 64-byte benchmark payload in a
//! WebSocket binary frame, as a conn node would send it; the receiving side
//! is the same as in the fan-out runs, so the two compare server costs.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message;

use crate::error::BenchError;
use crate::latency::{Latency, LatencySummary};
use crate::net::{client_config, connect_tcp};
use crate::payload::{self, Stamp};

/// CPU seconds this process used so far (clock ticks of 10 ms).
fn cpu_secs() -> f64 {
    crate::procfs::cpu_ticks(std::process::id()).unwrap_or(0) as f64 / 100.0
}

/// What one floor run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FloorReport {
    pub sessions: usize,
    pub rate: f64,
    pub messages: u64,
    pub deliveries: u64,
    /// Writer CPU per socket write, µs.
    pub cpu_us_per_write: f64,
    /// How long writing one message to every socket took (median, ms).
    pub pass_ms: f64,
    /// CPU seconds the writer process used.
    pub writer_cpu_secs: f64,
    pub latency: LatencySummary,
}

fn frame(stamp: Stamp, size: usize) -> Vec<u8> {
    let p = payload::encode_vec(stamp, size);
    let mut f = Vec::with_capacity(p.len() + 4);
    f.push(0x82);
    if p.len() < 126 {
        f.push(p.len() as u8);
    } else {
        f.push(126);
        f.extend_from_slice(&(p.len() as u16).to_be_bytes());
    }
    f.extend_from_slice(&p);
    f
}

/// One line to the parent process (stdout is the pipe it reads).
async fn say(line: &str) -> Result<(), BenchError> {
    let mut out = tokio::io::stdout();
    out.write_all(format!("{line}\n").as_bytes()).await?;
    out.flush().await?;
    Ok(())
}

/// Answers a client's WebSocket upgrade request (the bare minimum).
async fn upgrade(s: &mut TcpStream) -> Result<(), BenchError> {
    let mut req = Vec::with_capacity(512);
    let mut b = [0u8; 512];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut b).await?;
        if n == 0 || req.len() > 8192 {
            return Err(BenchError::config("floor writer: bad upgrade request"));
        }
        req.extend_from_slice(&b[..n]);
    }
    let text = String::from_utf8_lossy(&req);
    let key = text
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("sec-websocket-key")
                .then(|| v.trim().to_string())
        })
        .ok_or_else(|| BenchError::config("floor writer: no Sec-WebSocket-Key"))?;
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    s.write_all(resp.as_bytes()).await?;
    Ok(())
}

/// The writer process: accepts `sessions` sockets on `listener`, then
/// writes `messages` messages to every socket, `interval` apart; prints
/// its port first and `writes <n> cpu <secs>` last.
pub async fn writer(
    sessions: usize,
    messages: u64,
    interval: Duration,
    size: usize,
) -> Result<(), BenchError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    say(&format!("port {}", listener.local_addr()?.port())).await?;
    let mut socks: Vec<TcpStream> = Vec::with_capacity(sessions);
    while socks.len() < sessions {
        let (mut s, _) = listener.accept().await?;
        s.set_nodelay(true)?;
        upgrade(&mut s).await?;
        socks.push(s);
    }
    say("ready").await?;
    let cpu0 = cpu_secs();
    let mut writes = 0u64;
    let mut passes = Vec::with_capacity(messages as usize);
    let mut tick = tokio::time::interval(interval);
    for seq in 0..messages {
        tick.tick().await;
        let pass = tokio::time::Instant::now();
        let f = frame(
            Stamp {
                sent_ns: payload::now_ns(),
                publisher: 0,
                seq: seq as u32,
            },
            size,
        );
        for s in &mut socks {
            s.write_all(&f).await?;
            writes += 1;
        }
        passes.push(pass.elapsed().as_secs_f64() * 1000.0);
    }
    let cpu = cpu_secs() - cpu0;
    passes.sort_by(f64::total_cmp);
    let pass_ms = passes.get(passes.len() / 2).copied().unwrap_or(0.0);
    say(&format!("writes {writes} pass_ms {pass_ms} cpu {cpu}")).await?;
    Ok(())
}

/// Runs the floor measurement: `sessions` sockets, `rate` messages/s for
/// `duration`, clients connecting from `sources` (round-robin).
pub async fn run(
    sessions: usize,
    rate: f64,
    duration: Duration,
    size: usize,
    sources: &[Ipv4Addr],
) -> Result<FloorReport, BenchError> {
    let messages = (rate * duration.as_secs_f64()).ceil().max(1.0) as u64;
    let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let exe = std::env::current_exe()?;
    let mut child = tokio::process::Command::new(exe)
        .args([
            "floor-writer",
            "--sessions",
            &sessions.to_string(),
            "--messages",
            &messages.to_string(),
            "--interval-us",
            &interval.as_micros().to_string(),
            "--size",
            &size.to_string(),
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
    let port: u16 = match lines.next_line().await? {
        Some(l) if l.starts_with("port ") => l[5..]
            .trim()
            .parse()
            .map_err(|_| BenchError::config("floor writer: bad port line"))?,
        other => return Err(BenchError::config(format!("floor writer said {other:?}"))),
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let latency = Arc::new(Mutex::new(Latency::new()));
    let deliveries = Arc::new(AtomicU64::new(0));
    let url = format!("ws://{addr}/floor");
    let mut readers = Vec::with_capacity(sessions);
    for i in 0..sessions {
        let source = (!sources.is_empty()).then(|| sources[i % sources.len()]);
        let tcp = connect_tcp(addr, source).await?;
        let (mut ws, _) =
            tokio_tungstenite::client_async_with_config(url.as_str(), tcp, Some(client_config()))
                .await?;
        let (latency, deliveries) = (latency.clone(), deliveries.clone());
        readers.push(tokio::spawn(async move {
            let mut mine = Latency::new();
            let mut got = 0;
            while got < messages {
                let Some(Ok(m)) = ws.next().await else { break };
                let Message::Binary(b) = m else { continue };
                let recv = payload::now_ns();
                got += 1;
                if let Ok(st) = payload::decode(&b) {
                    mine.record(st.sent_ns, recv);
                    deliveries.fetch_add(1, Ordering::Relaxed);
                }
            }
            latency.lock().await.merge(&mine);
        }));
    }
    match lines.next_line().await? {
        Some(l) if l == "ready" => {}
        other => return Err(BenchError::config(format!("floor writer said {other:?}"))),
    }
    for r in readers {
        let _ = tokio::time::timeout(duration + Duration::from_secs(30), r).await;
    }
    let mut writes = 0u64;
    let mut pass_ms = 0.0f64;
    let mut cpu = 0.0f64;
    if let Some(l) = lines.next_line().await? {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() == 6 {
            writes = f[1].parse().unwrap_or(0);
            pass_ms = f[3].parse().unwrap_or(0.0);
            cpu = f[5].parse().unwrap_or(0.0);
        }
    }
    let _ = child.wait().await;
    let summary = latency.lock().await.summary();
    Ok(FloorReport {
        sessions,
        rate,
        messages,
        deliveries: deliveries.load(Ordering::Relaxed),
        cpu_us_per_write: cpu * 1e6 / writes.max(1) as f64,
        pass_ms,
        writer_cpu_secs: cpu,
        latency: summary,
    })
}

impl FloorReport {
    pub fn table(&self) -> String {
        let l = &self.latency;
        format!(
            "floor: {} sockets, {} msg/s, {} messages, {} deliveries ({} expected)\n\
             writer: {:.1} µs CPU per write, {:.1} ms per message to every socket (median), {:.2} CPU s\n\
             latency ms: p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}\n",
            self.sessions,
            self.rate,
            self.messages,
            self.deliveries,
            self.messages * self.sessions as u64,
            self.cpu_us_per_write,
            self.pass_ms,
            self.writer_cpu_secs,
            l.p50_us as f64 / 1000.0,
            l.p90_us as f64 / 1000.0,
            l.p99_us as f64 / 1000.0,
            l.max_us as f64 / 1000.0,
        )
    }
}

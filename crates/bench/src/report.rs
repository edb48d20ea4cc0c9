//! The result of a run: one struct, shown as a table for people and as
//! one JSON line for scripts.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::latency::LatencySummary;
use crate::loss::LossSummary;

/// One server process's own figures (a cluster has several).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServerProcess {
    pub pid: u32,
    pub rss_before_kib: Option<u64>,
    pub rss_idle_kib: Option<u64>,
    pub rss_end_kib: Option<u64>,
    /// (idle − before) / signed-in sessions; may be negative for a process
    /// that gave memory back.
    pub bytes_per_session: Option<f64>,
    /// Cores used during the measurement (or the idle hold).
    pub cpu_cores: Option<f64>,
}

/// Everything a run measured. Server figures are over every process given
/// with `--server-pid` (one, or all the processes of a cluster), added up;
/// `server_processes` has them one by one.
///
/// Fields added after the first version carry `#[serde(default)]` so that
/// older JSON lines still read.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    pub target: String,
    pub processes: u32,
    pub rooms: u32,
    pub room_dist: String,
    pub largest_room: u64,

    pub sessions: u64,
    pub signed_in: u64,
    pub connect_failed: u64,
    pub sign_in_failed: u64,
    /// Signed-in sessions that lost their connection before the end.
    pub disconnected: u64,
    pub connect_secs: f64,
    /// Sessions signed in per second during the connect phase.
    pub connect_rate: f64,

    /// The WebSocket endpoints sessions were spread over.
    #[serde(default)]
    pub ws_urls: Vec<String>,
    /// The server processes measured.
    #[serde(default)]
    pub server_pids: Vec<u32>,
    /// Sums over the server processes (`None` if one could not be read).
    pub server_rss_before_kib: Option<u64>,
    pub server_rss_idle_kib: Option<u64>,
    pub server_rss_end_kib: Option<u64>,
    /// (idle - before) / signed-in sessions, all server processes together.
    pub server_bytes_per_session: Option<f64>,
    /// Each server process on its own, in `server_pids` order.
    #[serde(default)]
    pub server_processes: Vec<ServerProcess>,
    /// The generator's own memory (all workers) when idle.
    pub client_rss_kib: u64,
    /// Cores the server used during the measurement (or the idle hold),
    /// all server processes together.
    pub server_cpu_cores: Option<f64>,
    /// Cores the supporting processes (`--infra-pid`: etcd, NSQ) used.
    #[serde(default)]
    pub infra_cpu_cores: Option<f64>,
    /// Cores the generator (all its processes) used over the same time.
    pub generator_cpu_cores: f64,
    /// Cores everything else on the machine used over the same time.
    pub other_cpu_cores: Option<f64>,

    pub publishers: u32,
    pub publishers_connected: u32,
    pub publish_via: String,
    pub size: usize,
    pub rate_target: f64,
    pub warmup_secs: f64,
    pub duration_secs: f64,
    pub sent: u64,
    pub publish_errors: u64,
    /// Scheduled messages not sent because publishers fell behind.
    pub publish_skipped: u64,
    /// Messages sent per second over warm-up and measurement.
    pub publish_rate: f64,

    /// All distinct deliveries.
    pub deliveries: u64,
    /// Deliveries received during the measurement window.
    pub window_deliveries: u64,
    /// Frames that carried them (all of the run).
    pub frames: u64,
    pub deliveries_per_sec: f64,
    /// Messages sent in the window, publish to deliver.
    pub latency: LatencySummary,
    /// Latency was recorded for one message in this many (`--latency-every`).
    #[serde(default = "one")]
    pub latency_every: u32,
    pub loss: LossSummary,
    pub duplicates: u64,
    pub stale: u64,
    pub foreign: u64,
    pub server_errors: u64,
    /// Things worth knowing about this run (timeouts, unaccounted sessions).
    pub notes: Vec<String>,
}

fn one() -> u32 {
    1
}

fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

fn kib(k: Option<u64>) -> String {
    match k {
        Some(k) => format!("{:.1} MiB", k as f64 / 1024.0),
        None => "-".into(),
    }
}

/// `12345678.9` as `12.35M`.
pub fn si(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

impl Report {
    /// The human-readable summary.
    pub fn table(&self) -> String {
        let mut rows: Vec<(&str, String)> = vec![
            (
                "target",
                format!("{} ({} process(es))", self.target, self.processes),
            ),
            (
                "rooms",
                format!(
                    "{} {} (largest {})",
                    self.rooms, self.room_dist, self.largest_room
                ),
            ),
            (
                "sessions",
                format!(
                    "{} signed in of {} (connect failed {}, sign-in failed {}, dropped {})",
                    self.signed_in,
                    self.sessions,
                    self.connect_failed,
                    self.sign_in_failed,
                    self.disconnected
                ),
            ),
            (
                "connect",
                format!(
                    "{:.1} s, {:.0} sessions/s",
                    self.connect_secs, self.connect_rate
                ),
            ),
            (
                "server RSS",
                format!(
                    "before {}, idle {}, end {}{}",
                    kib(self.server_rss_before_kib),
                    kib(self.server_rss_idle_kib),
                    kib(self.server_rss_end_kib),
                    if self.server_pids.len() > 1 {
                        format!(" ({} processes together)", self.server_pids.len())
                    } else {
                        String::new()
                    }
                ),
            ),
            (
                "server / session",
                match self.server_bytes_per_session {
                    Some(b) => format!(
                        "{:.2} KiB ({:.0} sessions per GiB)",
                        b / 1024.0,
                        (1u64 << 30) as f64 / b.max(1.0)
                    ),
                    None => "- (no --server-pid)".into(),
                },
            ),
        ];
        if self.server_processes.len() > 1 {
            for p in &self.server_processes {
                rows.push((
                    "server process",
                    format!(
                        "pid {}: before {}, idle {}, end {}, {} KiB/session, {} cores",
                        p.pid,
                        kib(p.rss_before_kib),
                        kib(p.rss_idle_kib),
                        kib(p.rss_end_kib),
                        p.bytes_per_session
                            .map_or("-".into(), |b| format!("{:.2}", b / 1024.0)),
                        p.cpu_cores.map_or("-".into(), |c| format!("{c:.2}")),
                    ),
                ));
            }
        }
        rows.extend([
            ("generator RSS", kib(Some(self.client_rss_kib))),
            (
                "CPU (cores)",
                format!(
                    "server {}, {}generator {:.2}, other {} ({})",
                    self.server_cpu_cores
                        .map_or("-".into(), |c| format!("{c:.2}")),
                    self.infra_cpu_cores
                        .map_or(String::new(), |c| format!("infra {c:.2}, ")),
                    self.generator_cpu_cores,
                    self.other_cpu_cores
                        .map_or("-".into(), |c| format!("{c:.2}")),
                    if self.publishers > 0 {
                        "measurement window"
                    } else {
                        "idle hold"
                    }
                ),
            ),
        ]);
        if self.publishers > 0 {
            rows.extend([
                (
                    "publish",
                    format!(
                        "{}/{} publishers over {}, {} B, target {} msg/s, warm-up {:.1} s + {:.1} s",
                        self.publishers_connected,
                        self.publishers,
                        self.publish_via,
                        self.size,
                        self.rate_target,
                        self.warmup_secs,
                        self.duration_secs
                    ),
                ),
                (
                    "sent",
                    format!(
                        "{} ({:.1} msg/s), refused {}, skipped (behind) {}",
                        self.sent, self.publish_rate, self.publish_errors, self.publish_skipped
                    ),
                ),
                (
                    "deliveries",
                    format!(
                        "{} in window, {}/s (all: {} in {} frames, {:.2} per frame)",
                        self.window_deliveries,
                        si(self.deliveries_per_sec),
                        self.deliveries,
                        self.frames,
                        self.deliveries as f64 / self.frames.max(1) as f64
                    ),
                ),
                (
                    "latency",
                    format!(
                        "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (n={}{})",
                        ms(self.latency.p50_us),
                        ms(self.latency.p90_us),
                        ms(self.latency.p99_us),
                        ms(self.latency.p999_us),
                        ms(self.latency.max_us),
                        self.latency.count,
                        if self.latency_every > 1 {
                            format!(", one message in {}", self.latency_every)
                        } else {
                            String::new()
                        }
                    ),
                ),
                (
                    "loss",
                    format!(
                        "lost {} of {} expected, duplicated {}, unexpected {}, stale {}",
                        self.loss.lost, self.loss.expected, self.duplicates, self.loss.unexpected, self.stale
                    ),
                ),
            ]);
        }
        rows.push((
            "errors",
            format!(
                "server error replies {}, foreign messages {}",
                self.server_errors, self.foreign
            ),
        ));
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut out = String::new();
        for (k, v) in rows {
            let _ = writeln!(out, "{k:>width$}  {v}");
        }
        for n in &self.notes {
            let _ = writeln!(out, "{:>width$}  {n}", "note");
        }
        out
    }

    /// One JSON line.
    pub fn json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_and_json() {
        let r = Report {
            target: "chatroom".into(),
            publishers: 1,
            sessions: 10,
            signed_in: 10,
            server_bytes_per_session: Some(10_240.0),
            latency_every: 1,
            latency: LatencySummary {
                p99_us: 1500,
                ..LatencySummary::default()
            },
            notes: vec!["hello".into()],
            ..Report::default()
        };
        let t = r.table();
        assert!(t.contains("10 signed in of 10"), "{t}");
        assert!(t.contains("p99 1.50 ms"), "{t}");
        assert!(t.contains("10.00 KiB (104858 sessions per GiB)"), "{t}");
        assert!(t.contains("note  hello"), "{t}");
        assert!(!t.contains("server process"), "{t}");
        assert!(!t.contains("infra"), "{t}");
        let cluster = Report {
            server_pids: vec![11, 12],
            server_rss_idle_kib: Some(3072),
            server_processes: vec![
                ServerProcess {
                    pid: 11,
                    rss_idle_kib: Some(2048),
                    bytes_per_session: Some(5120.0),
                    cpu_cores: Some(0.5),
                    ..ServerProcess::default()
                },
                ServerProcess {
                    pid: 12,
                    rss_idle_kib: Some(1024),
                    ..ServerProcess::default()
                },
            ],
            infra_cpu_cores: Some(0.02),
            ..r.clone()
        };
        let t = cluster.table();
        assert!(
            t.contains("idle 3.0 MiB, end - (2 processes together)"),
            "{t}"
        );
        assert!(
            t.contains("pid 11: before -, idle 2.0 MiB, end -, 5.00 KiB/session, 0.50 cores"),
            "{t}"
        );
        assert!(t.contains("infra 0.02, generator"), "{t}");
        let back: Report = serde_json::from_str(&cluster.json()).unwrap();
        assert_eq!(back.server_processes[0].pid, 11);
        // A line written before the cluster fields existed still reads.
        let mut old: serde_json::Value = serde_json::from_str(&r.json()).unwrap();
        for k in [
            "ws_urls",
            "server_pids",
            "server_processes",
            "infra_cpu_cores",
        ] {
            old.as_object_mut().unwrap().remove(k);
        }
        let back: Report = serde_json::from_value(old).unwrap();
        assert!(back.server_processes.is_empty() && back.infra_cpu_cores.is_none());
        let j = r.json();
        assert!(!j.contains('\n'));
        let back: Report = serde_json::from_str(&j).unwrap();
        assert_eq!(back.latency.p99_us, 1500);
        assert_eq!(si(2_345_678.0), "2.35M");
        assert_eq!(si(23_456.0), "23.5k");
        assert_eq!(si(12.4), "12");
    }
}

//! The parent side of a run, phase by phase: read the server's memory;
//! start the workers (processes, or tasks in a single-process run); wait
//! until every session has connected and signed in; let the server settle
//! and read its memory again; connect the publishers and publish for
//! warm-up + duration while the workers measure; drain in-flight
//! deliveries; collect every worker's final counts and add them up into a
//! [`Report`]. A progress line goes to stderr every second. Each phase has
//! its own time limit and the whole run a hard one; workers are killed when
//! the run ends, however it ends.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::auth::TokenMaker;
use crate::config::{PublishVia, RunConfig, Target};
use crate::error::BenchError;
use crate::latency::Latency;
use crate::loss::account;
use crate::net;
use crate::payload::now_ns;
use crate::procfs;
use crate::publish::{self, Params, PubStats, Schedule};
use crate::report::{Report, ServerProcess, si};
use crate::rooms::{RoomDist, RoomMap};
use crate::stats::Snapshot;
use crate::worker::{self, Command, Event, WorkerFinal, WorkerPlan};

/// Longest wait for the workers' final counts.
const FINAL_TIMEOUT: Duration = Duration::from_secs(20);
/// Other processes using more cores than this make a run's figures suspect.
const OTHER_CPU_WARN: f64 = 0.15;
/// Publishing starts this long after the publishers are connected.
const LEAD_IN: Duration = Duration::from_millis(200);

/// Runs a benchmark and reports; stops by itself at the run's hard deadline.
pub async fn run(cfg: RunConfig) -> Result<Report, BenchError> {
    cfg.validate()?;
    let hard = cfg.hard_deadline();
    match tokio::time::timeout(hard, run_phases(cfg)).await {
        Ok(r) => r,
        Err(_) => Err(BenchError::Timeout("the run's hard deadline")),
    }
}

/// The workers, and what keeps them from outliving the run.
struct Workers {
    cmds: Vec<mpsc::Sender<Command>>,
    events: mpsc::Receiver<(u32, Event)>,
    _tasks: Vec<AbortOnDropHandle<()>>,
    _children: Vec<tokio::process::Child>,
}

impl Workers {
    /// This process and the worker processes.
    fn pids(&self) -> Vec<u32> {
        let mut v = vec![std::process::id()];
        v.extend(self._children.iter().filter_map(tokio::process::Child::id));
        v
    }

    async fn tell(&self, c: Command) {
        for tx in &self.cmds {
            let _ = tx.send(c).await;
        }
    }
}

fn spawn_workers(cfg: &RunConfig, deadline_unix_ms: u64) -> Result<Workers, BenchError> {
    let k = cfg.processes;
    let (ev_tx, events) = mpsc::channel(256);
    let mut w = Workers {
        cmds: Vec::new(),
        events,
        _tasks: Vec::new(),
        _children: Vec::new(),
    };
    let plan = |index| WorkerPlan {
        index,
        workers: k,
        cfg: cfg.clone(),
        deadline_unix_ms,
    };
    if k == 1 {
        let (tx, rx) = mpsc::channel(16);
        w.cmds.push(tx);
        w._tasks
            .push(AbortOnDropHandle::new(tokio::spawn(worker::run(
                plan(0),
                rx,
                ev_tx,
            ))));
        return Ok(w);
    }
    let exe = match &cfg.worker_exe {
        Some(p) => p.clone(),
        None => std::env::current_exe()?,
    };
    for index in 0..k {
        let mut child = tokio::process::Command::new(&exe)
            .arg("worker")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| BenchError::Worker {
                worker: index,
                msg: format!("starting {} worker: {e}", exe.display()),
            })?;
        let (Some(mut stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(BenchError::Worker {
                worker: index,
                msg: "no pipes".into(),
            });
        };
        let mut first = serde_json::to_vec(&plan(index))?;
        first.push(b'\n');
        let (tx, mut rx) = mpsc::channel::<Command>(16);
        w._tasks
            .push(AbortOnDropHandle::new(tokio::spawn(async move {
                if stdin.write_all(&first).await.is_err() {
                    return;
                }
                while let Some(c) = rx.recv().await {
                    let Ok(mut line) = serde_json::to_vec(&c) else {
                        continue;
                    };
                    line.push(b'\n');
                    if stdin.write_all(&line).await.is_err() || stdin.flush().await.is_err() {
                        return;
                    }
                }
            })));
        let ev_tx = ev_tx.clone();
        w._tasks
            .push(AbortOnDropHandle::new(tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                loop {
                    let ev = match lines.next_line().await {
                        Ok(Some(line)) => match serde_json::from_str::<Event>(&line) {
                            Ok(ev) => ev,
                            Err(e) => Event::Failed {
                                msg: format!("bad event line: {e}"),
                            },
                        },
                        Ok(None) => Event::Failed {
                            msg: "exited".into(),
                        },
                        Err(e) => Event::Failed {
                            msg: format!("reading its output: {e}"),
                        },
                    };
                    let last = matches!(ev, Event::Failed { .. } | Event::Final(_));
                    if ev_tx.send((index, ev)).await.is_err() || last {
                        return;
                    }
                }
            })));
        w.cmds.push(tx);
        w._children.push(child);
    }
    Ok(w)
}

/// What the workers have said so far.
struct Tally {
    snaps: Vec<Snapshot>,
    ready: Vec<bool>,
    finals: Vec<Option<WorkerFinal>>,
}

impl Tally {
    fn new(k: u32) -> Self {
        Tally {
            snaps: vec![Snapshot::default(); k as usize],
            ready: vec![false; k as usize],
            finals: vec![None; k as usize],
        }
    }

    fn on(&mut self, w: u32, ev: Event) -> Result<(), BenchError> {
        let i = w as usize;
        match ev {
            Event::Progress(s) => self.snaps[i] = s,
            Event::Ready(s) => {
                self.snaps[i] = s;
                self.ready[i] = true;
            }
            Event::Final(f) => {
                self.snaps[i] = f.snapshot;
                self.ready[i] = true;
                self.finals[i] = Some(*f);
            }
            Event::Failed { msg } => {
                if self.finals[i].is_none() {
                    return Err(BenchError::Worker { worker: w, msg });
                }
            }
        }
        Ok(())
    }

    fn total(&self) -> Snapshot {
        let mut t = Snapshot::default();
        for s in &self.snaps {
            t.add(s);
        }
        t
    }

    fn all_ready(&self) -> bool {
        self.ready.iter().all(|r| *r)
    }

    fn all_final(&self) -> bool {
        self.finals.iter().all(Option::is_some)
    }
}

/// Phase name and counters for the progress line.
struct Progress {
    enabled: bool,
    started: Instant,
    last: Instant,
    last_deliveries: u64,
    last_sent: u64,
}

impl Progress {
    fn line(&mut self, phase: &str, t: &Snapshot, planned: u64, pubs: Option<&PubStats>) {
        let now = Instant::now();
        let dt = (now - self.last).as_secs_f64().max(1e-3);
        let deliveries = (t.deliveries.saturating_sub(self.last_deliveries)) as f64 / dt;
        let sent = pubs.map(PubStats::total_sent).unwrap_or(0);
        let send_rate = (sent.saturating_sub(self.last_sent)) as f64 / dt;
        self.last = now;
        self.last_deliveries = t.deliveries;
        self.last_sent = sent;
        if !self.enabled {
            return;
        }
        let mut line = format!(
            "[{:6.1}s] {phase:<8} live {}/{} failed {}+{} dropped {}",
            (now - self.started).as_secs_f64(),
            t.live(),
            planned,
            t.connect_failed,
            t.sign_in_failed,
            t.disconnected
        );
        if pubs.is_some() || t.deliveries > 0 {
            line.push_str(&format!(
                " | sent {sent} ({send_rate:.0}/s) | deliveries {}/s p99 {:.1} ms max {:.1} ms | dup {}",
                si(deliveries),
                t.interval_p99_us as f64 / 1000.0,
                t.interval_max_us as f64 / 1000.0,
                t.duplicates
            ));
        }
        if t.server_errors > 0 {
            line.push_str(&format!(" | server errors {}", t.server_errors));
        }
        eprintln!("{line}");
    }
}

/// The parent's view while a run goes on.
struct Run {
    cfg: RunConfig,
    workers: Workers,
    tally: Tally,
    progress: Progress,
    tick: tokio::time::Interval,
}

impl Run {
    /// Handles worker events and prints progress until `done` holds (true)
    /// or `until` passes (false).
    async fn pump(
        &mut self,
        phase: &str,
        until: Instant,
        pubs: Option<&PubStats>,
        done: impl Fn(&Tally) -> bool,
    ) -> Result<bool, BenchError> {
        if done(&self.tally) {
            return Ok(true);
        }
        loop {
            tokio::select! {
                ev = self.workers.events.recv() => match ev {
                    Some((w, ev)) => {
                        self.tally.on(w, ev)?;
                        if done(&self.tally) {
                            return Ok(true);
                        }
                    }
                    None => return Err(BenchError::protocol("every worker is gone")),
                },
                _ = self.tick.tick() => self.progress.line(phase, &self.tally.total(), self.cfg.sessions, pubs),
                _ = tokio::time::sleep_until(until) => return Ok(false),
            }
        }
    }
}

/// `VmRSS` of each server process (`None` where it cannot be read, with a note).
fn rss(pids: &[u32], notes: &mut Vec<String>) -> Vec<Option<u64>> {
    pids.iter()
        .map(|&pid| match procfs::vm_rss_kib(pid) {
            Ok(k) => Some(k),
            Err(e) => {
                notes.push(format!("server memory: /proc/{pid}/status: {e}"));
                None
            }
        })
        .collect()
}

/// The sum of per-process figures: `None` without processes or when one
/// of them is missing (a partial sum would look like a real figure).
fn sum_all<T: Copy + std::iter::Sum<T>>(v: &[Option<T>]) -> Option<T> {
    if v.is_empty() {
        return None;
    }
    v.iter().copied().sum()
}

/// Server memory per signed-in session: (idle − before) of all server
/// processes together, over the sessions signed in.
fn bytes_per_session(before: Option<u64>, idle: Option<u64>, signed_in: u64) -> Option<f64> {
    match (before, idle) {
        (Some(b), Some(i)) if signed_in > 0 => {
            Some((i.saturating_sub(b) as f64 * 1024.0) / signed_in as f64)
        }
        _ => None,
    }
}

/// CPU time of the server, the supporting processes and the generator at
/// one instant.
struct CpuMark {
    at: Instant,
    /// Per server process.
    server: Vec<Option<u64>>,
    infra: u64,
    generator: u64,
    machine: Option<u64>,
}

/// Cores used between two marks.
struct CpuUse {
    /// All server processes together (`None` if one could not be read).
    server: Option<f64>,
    /// Per server process, in `server_pids` order.
    per_server: Vec<Option<f64>>,
    /// The supporting processes (`None` when there are none).
    infra: Option<f64>,
    generator: f64,
    /// Everything else on the machine (other users, builds).
    other: Option<f64>,
}

impl CpuUse {
    fn none() -> Self {
        CpuUse {
            server: None,
            per_server: Vec::new(),
            infra: None,
            generator: 0.0,
            other: None,
        }
    }
}

impl CpuMark {
    fn now(server: &[u32], infra: &[u32], generator: &[u32]) -> Self {
        CpuMark {
            at: Instant::now(),
            server: server.iter().map(|&p| procfs::cpu_ticks(p).ok()).collect(),
            infra: procfs::cpu_ticks_sum(infra),
            generator: procfs::cpu_ticks_sum(generator),
            machine: procfs::machine_busy_ticks().ok(),
        }
    }

    /// Cores used since `self`.
    fn cores_until(&self, later: &CpuMark, with_infra: bool) -> CpuUse {
        let secs = (later.at - self.at).as_secs_f64().max(1e-3);
        let cores = |a: u64, b: u64| b.saturating_sub(a) as f64 / procfs::TICKS_PER_SEC / secs;
        let per_server: Vec<Option<f64>> = self
            .server
            .iter()
            .zip(&later.server)
            .map(|(a, b)| match (a, b) {
                (Some(a), Some(b)) => Some(cores(*a, *b)),
                _ => None,
            })
            .collect();
        let server = sum_all(&per_server);
        let infra = with_infra.then(|| cores(self.infra, later.infra));
        let generator = cores(self.generator, later.generator);
        let known: f64 = per_server.iter().flatten().sum::<f64>() + infra.unwrap_or(0.0);
        let other = match (self.machine, later.machine) {
            (Some(a), Some(b)) => Some((cores(a, b) - generator - known).max(0.0)),
            _ => None,
        };
        CpuUse {
            server,
            per_server,
            infra,
            generator,
            other,
        }
    }
}

fn unix_ms_in(d: Duration) -> u64 {
    (SystemTime::now() + d)
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

async fn run_phases(cfg: RunConfig) -> Result<Report, BenchError> {
    let map = Arc::new(RoomMap::new(
        cfg.sessions,
        cfg.rooms,
        cfg.publishers,
        cfg.room_dist,
    )?);
    let eps = net::resolve_all(&cfg.ws_urls).await?;
    let mut notes = Vec::new();
    let rss_before = rss(&cfg.server_pids, &mut notes);

    // Workers stop on their own a little after the parent would have given up.
    let workers = spawn_workers(
        &cfg,
        unix_ms_in(cfg.hard_deadline() + Duration::from_secs(5)),
    )?;
    let started = Instant::now();
    let mut tick =
        tokio::time::interval_at(started + Duration::from_secs(1), Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut run = Run {
        tally: Tally::new(cfg.processes),
        progress: Progress {
            enabled: cfg.progress,
            started,
            last: started,
            last_deliveries: 0,
            last_sent: 0,
        },
        workers,
        tick,
        cfg,
    };

    // Connect.
    if !run
        .pump(
            "connect",
            started + run.cfg.connect_timeout,
            None,
            Tally::all_ready,
        )
        .await?
    {
        notes.push(format!(
            "connect phase cut off at {:?}: not every session had connected",
            run.cfg.connect_timeout
        ));
    }
    let connect_secs = started.elapsed().as_secs_f64();
    let connected = run.tally.total();

    // Settle, then the server's idle memory.
    let settle_end = Instant::now() + run.cfg.settle;
    run.pump("settle", settle_end, None, |_| false).await?;
    let rss_idle = rss(&run.cfg.server_pids, &mut notes);
    let client_rss_kib = run.tally.total().rss_kib;

    // Publish (or just hold the sessions for the duration).
    let pubs = Arc::new(PubStats::new(run.cfg.publishers));
    let mut publishers_connected = 0u32;
    let mut publish_secs = 0.0;
    let pids = run.workers.pids();
    let mark_now = |cfg: &RunConfig| CpuMark::now(&cfg.server_pids, &cfg.infra_pids, &pids);
    let with_infra = !run.cfg.infra_pids.is_empty();
    let mut cpu = CpuUse::none();
    if run.cfg.publishing() {
        let tokens = TokenMaker::new(&run.cfg.tokens, &run.cfg.http_url);
        let mut connecting = JoinSet::new();
        for j in 0..run.cfg.publishers {
            let ep = eps[run.cfg.ws_index_of_publisher(j)].clone();
            let (cfg, map, tokens) = (run.cfg.clone(), map.clone(), tokens.clone());
            let limit = cfg.session_timeout;
            connecting.spawn(async move {
                match tokio::time::timeout(limit, publish::connect(&cfg, &map, &ep, &tokens, j))
                    .await
                {
                    Ok(r) => r,
                    Err(_) => Err(BenchError::Timeout("publisher connect")),
                }
            });
        }
        let mut ready = Vec::new();
        let mut first_error = None;
        while let Some(r) = connecting.join_next().await {
            match r {
                Ok(Ok(p)) => ready.push(p),
                Ok(Err(e)) => {
                    first_error.get_or_insert(e.to_string());
                }
                Err(e) => {
                    first_error.get_or_insert(e.to_string());
                }
            }
        }
        publishers_connected = ready.len() as u32;
        if let Some(e) = first_error {
            notes.push(format!(
                "{} publisher(s) could not connect; first error: {e}",
                run.cfg.publishers - publishers_connected
            ));
        }

        let base = (Instant::now(), now_ns());
        let to_ns = |i: Instant| base.1 + (i - base.0).as_nanos() as u64;
        let t0 = base.0 + LEAD_IN;
        let from = t0 + run.cfg.warmup;
        let end = from + run.cfg.duration;
        run.workers
            .tell(Command::Measure {
                from_ns: to_ns(from),
                to_ns: to_ns(end),
            })
            .await;
        let params = Params {
            size: run.cfg.size,
            level: run.cfg.level,
            http_inflight: run.cfg.http_inflight,
        };
        let close = CancellationToken::new();
        let mut publishing = JoinSet::new();
        for p in ready {
            let sched = Schedule::for_publisher(t0, end, run.cfg.rate, p.id, run.cfg.publishers);
            publishing.spawn(publish::run(p, sched, params, pubs.clone(), close.clone()));
        }
        run.pump("warmup", from, Some(&pubs), |_| false).await?;
        let mark = mark_now(&run.cfg);
        run.pump("measure", end, Some(&pubs), |_| false).await?;
        cpu = mark.cores_until(&mark_now(&run.cfg), with_infra);
        publish_secs = (end - t0).as_secs_f64();

        // Drain: until every expected delivery arrived (when that is known
        // exactly), deliveries stop moving for two reports, or the limit.
        let sizes = map.room_sizes();
        let drain_end = Instant::now() + run.cfg.drain;
        let mut last = run.tally.total().deliveries;
        let mut still = 0;
        loop {
            let t = run.tally.total();
            let exact = t.signed_in == run.cfg.sessions && t.disconnected == 0;
            let expected: u64 = pubs
                .accepted()
                .iter()
                .enumerate()
                .map(|(p, n)| n * sizes[map.publisher_room(p as u32) as usize])
                .sum();
            if exact && t.deliveries >= expected {
                break;
            }
            let step = (Instant::now() + Duration::from_millis(1100)).min(drain_end);
            let expected_now = expected;
            let target = run.cfg.sessions;
            let got = run
                .pump("drain", step, Some(&pubs), move |tl| {
                    let t = tl.total();
                    t.signed_in == target && t.disconnected == 0 && t.deliveries >= expected_now
                })
                .await?;
            if got || Instant::now() >= drain_end {
                break;
            }
            let now = run.tally.total().deliveries;
            still = if now == last { still + 1 } else { 0 };
            last = now;
            if still >= 2 {
                break;
            }
        }
        close.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(15), async {
            while publishing.join_next().await.is_some() {}
        })
        .await;
        publishing.abort_all();
    } else if !run.cfg.duration.is_zero() {
        let end = Instant::now() + run.cfg.duration;
        let mark = mark_now(&run.cfg);
        run.pump("idle", end, None, |_| false).await?;
        cpu = mark.cores_until(&mark_now(&run.cfg), with_infra);
    }
    if let Some(o) = cpu.other
        && o > OTHER_CPU_WARN
    {
        notes.push(format!(
            "other processes used {o:.2} cores during the measurement: the machine was not quiet, figures are not clean"
        ));
    }
    let rss_end = rss(&run.cfg.server_pids, &mut notes);

    // Collect.
    run.workers.tell(Command::Finish).await;
    if !run
        .pump(
            "finish",
            Instant::now() + FINAL_TIMEOUT,
            None,
            Tally::all_final,
        )
        .await?
    {
        notes.push("some workers sent no final counts in time: their figures are from their last progress report".into());
    }
    let total = run.tally.total();
    let mut latency = Latency::new();
    let mut received = vec![0u64; map.publishers() as usize];
    let mut alive = vec![0u64; map.rooms() as usize];
    let mut unaccounted = 0;
    for f in run.tally.finals.iter().flatten() {
        latency.merge(&Latency::from_buckets(&f.latency));
        for (a, b) in received.iter_mut().zip(&f.received) {
            *a += b;
        }
        for (a, b) in alive.iter_mut().zip(&f.alive_per_room) {
            *a += b;
        }
        unaccounted += f.unaccounted;
    }
    if unaccounted > 0 {
        notes.push(format!(
            "{unaccounted} session(s) did not hand in their counts in time"
        ));
    }
    let accepted = pubs.accepted();
    let loss = account(&map, &accepted, &alive, &received);
    let cfg = &run.cfg;
    let sent = pubs.total_sent();
    let largest_room = map.room_sizes().into_iter().max().unwrap_or(0);
    let per_session = bytes_per_session(
        sum_all(&rss_before),
        sum_all(&rss_idle),
        connected.signed_in,
    );
    let server_processes = cfg
        .server_pids
        .iter()
        .enumerate()
        .map(|(k, &pid)| {
            let (before, idle) = (rss_before[k], rss_idle[k]);
            ServerProcess {
                pid,
                rss_before_kib: before,
                rss_idle_kib: idle,
                rss_end_kib: rss_end[k],
                bytes_per_session: match (before, idle) {
                    (Some(b), Some(i)) if connected.signed_in > 0 => {
                        Some((i as f64 - b as f64) * 1024.0 / connected.signed_in as f64)
                    }
                    _ => None,
                },
                cpu_cores: cpu.per_server.get(k).copied().flatten(),
            }
        })
        .collect();
    Ok(Report {
        target: match cfg.target {
            Target::Chatroom => "chatroom".into(),
            Target::Nats => "nats".into(),
        },
        processes: cfg.processes,
        rooms: map.rooms(),
        room_dist: match cfg.room_dist {
            RoomDist::Uniform => "uniform".into(),
            RoomDist::Single => "single".into(),
            RoomDist::Zipf { s } => format!("zipf(s={s})"),
        },
        largest_room,
        sessions: cfg.sessions,
        signed_in: total.signed_in,
        connect_failed: total.connect_failed,
        sign_in_failed: total.sign_in_failed,
        disconnected: total.disconnected,
        connect_secs,
        connect_rate: connected.signed_in as f64 / connect_secs.max(1e-3),
        ws_urls: cfg.ws_urls.clone(),
        server_pids: cfg.server_pids.clone(),
        server_rss_before_kib: sum_all(&rss_before),
        server_rss_idle_kib: sum_all(&rss_idle),
        server_rss_end_kib: sum_all(&rss_end),
        server_bytes_per_session: per_session,
        server_processes,
        client_rss_kib,
        server_cpu_cores: cpu.server,
        generator_cpu_cores: cpu.generator,
        infra_cpu_cores: cpu.infra,
        other_cpu_cores: cpu.other,
        publishers: cfg.publishers,
        publishers_connected,
        publish_via: match (cfg.target, cfg.publish) {
            (Target::Nats, _) => "nats PUB".into(),
            (_, PublishVia::Ws) => format!("ws MESSAGE ({:?})", cfg.level).to_lowercase(),
            (_, PublishVia::Http) => "http POST /msg (important)".into(),
        },
        size: cfg.size,
        rate_target: cfg.rate,
        warmup_secs: cfg.warmup.as_secs_f64(),
        duration_secs: cfg.duration.as_secs_f64(),
        sent,
        publish_errors: pubs.total_errors(),
        publish_skipped: pubs.skipped.load(std::sync::atomic::Ordering::Relaxed),
        publish_rate: if publish_secs > 0.0 {
            sent as f64 / publish_secs
        } else {
            0.0
        },
        deliveries: total.deliveries,
        window_deliveries: total.window_deliveries,
        frames: total.frames,
        deliveries_per_sec: if cfg.publishing() {
            total.window_deliveries as f64 / cfg.duration.as_secs_f64()
        } else {
            0.0
        },
        latency: latency.summary(),
        latency_every: cfg.latency_every,
        loss,
        duplicates: total.duplicates,
        stale: total.stale,
        foreign: total.foreign,
        server_errors: total.server_errors,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_figures_add_up_over_processes() {
        assert_eq!(sum_all::<u64>(&[]), None);
        assert_eq!(sum_all(&[Some(100u64), Some(50)]), Some(150));
        assert_eq!(sum_all(&[Some(100u64), None]), None);
        // Two conn nodes grew by 5,000 and 4,000 KiB, logic shrank by 1,000:
        // 8,000 KiB over 1,000 sessions.
        let before = sum_all(&[Some(10_000u64), Some(10_000), Some(20_000)]);
        let idle = sum_all(&[Some(15_000u64), Some(14_000), Some(19_000)]);
        assert_eq!(bytes_per_session(before, idle, 1_000), Some(8_192.0));
        assert_eq!(bytes_per_session(before, idle, 0), None);
        assert_eq!(bytes_per_session(None, idle, 10), None);
    }

    #[test]
    fn cpu_of_several_server_processes() {
        let t0 = Instant::now();
        let a = CpuMark {
            at: t0,
            server: vec![Some(100), Some(200)],
            infra: 10,
            generator: 0,
            machine: Some(1_000),
        };
        let b = CpuMark {
            at: t0 + Duration::from_secs(1),
            server: vec![Some(150), Some(220)],
            infra: 15,
            generator: 40,
            machine: Some(1_130),
        };
        let u = a.cores_until(&b, true);
        let close = |x: f64, y: f64| (x - y).abs() < 1e-9;
        assert!(close(u.server.unwrap(), 0.7), "{:?}", u.server);
        assert!(close(u.per_server[1].unwrap(), 0.2));
        assert!(close(u.infra.unwrap(), 0.05));
        assert!(close(u.generator, 0.4));
        // 1.3 busy - 0.7 server - 0.05 infra - 0.4 generator.
        assert!(close(u.other.unwrap(), 0.15), "{:?}", u.other);
        assert!(a.cores_until(&b, false).infra.is_none());
        let gone = CpuMark {
            server: vec![Some(150), None],
            ..b
        };
        assert!(a.cores_until(&gone, true).server.is_none());
    }

    #[test]
    fn tally_tracks_readiness_and_failures() {
        let mut t = Tally::new(2);
        t.on(
            0,
            Event::Ready(Snapshot {
                signed_in: 3,
                ..Snapshot::default()
            }),
        )
        .unwrap();
        assert!(!t.all_ready());
        t.on(
            1,
            Event::Progress(Snapshot {
                signed_in: 2,
                ..Snapshot::default()
            }),
        )
        .unwrap();
        assert_eq!(t.total().signed_in, 5);
        t.on(1, Event::Final(Box::default())).unwrap();
        assert!(t.all_ready());
        assert!(!t.all_final());
        // A worker that exits after its final counts is fine; before, it is not.
        t.on(
            1,
            Event::Failed {
                msg: "exited".into(),
            },
        )
        .unwrap();
        assert!(
            t.on(
                0,
                Event::Failed {
                    msg: "exited".into()
                }
            )
            .is_err()
        );
    }
}

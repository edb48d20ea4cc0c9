//! A worker: one share of the receiving sessions (sessions `i` with
//! `i % workers == index`), connected with bounded concurrency, kept alive
//! and read until the parent says finish. In a multi-process run each
//! worker is this binary re-executed as `chatroom-bench worker`, talking to
//! the parent over its stdin (a [`WorkerPlan`] line, then [`Command`] lines)
//! and stdout ([`Event`] lines), all JSON; in a single-process run the same
//! [`run`] is a task of the parent, over channels. A worker stops by itself
//! at its plan's deadline or when its stdin closes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::auth::{TokenMaker, session_uid};
use crate::config::{RunConfig, Target};
use crate::error::BenchError;
use crate::loss::SessionTracker;
use crate::nats::{self, Parser};
use crate::net::{self, Endpoint, Ws};
use crate::rooms::{RoomMap, room_name};
use crate::session::{self, SessionCtx};
use crate::stats::{Recorder, Snapshot};

/// Connection errors printed per worker, so a broken run says why.
const ERRORS_SHOWN: u64 = 3;
/// Longest wait for sessions to hand in their counts after `Finish`.
const COLLECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the parent gives a worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerPlan {
    pub index: u32,
    pub workers: u32,
    pub cfg: RunConfig,
    /// Stop at this time (ms since the epoch) whatever happens.
    pub deadline_unix_ms: u64,
}

impl WorkerPlan {
    /// The global indices of this worker's sessions.
    pub fn sessions(&self) -> impl Iterator<Item = u64> + use<> {
        (u64::from(self.index)..self.cfg.sessions).step_by(self.workers.max(1) as usize)
    }
}

/// Parent to worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Command {
    /// Latency and throughput count within `[from_ns, to_ns]`.
    Measure { from_ns: u64, to_ns: u64 },
    /// Stop the sessions and send the final counts.
    Finish,
}

/// Worker to parent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "lowercase")]
pub enum Event {
    /// Every second.
    Progress(Snapshot),
    /// Once: every session has connected and signed in, or failed to.
    Ready(Snapshot),
    /// The last event.
    Final(Box<WorkerFinal>),
    /// The worker could not run at all.
    Failed { msg: String },
}

/// A worker's final counts.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerFinal {
    pub snapshot: Snapshot,
    /// Window latency histogram, `(µs, count)` buckets.
    pub latency: Vec<(u64, u64)>,
    /// Distinct messages received per publisher, over sessions connected to the end.
    pub received: Vec<u64>,
    /// Sessions connected to the end, per room.
    pub alive_per_room: Vec<u64>,
    /// Sessions that did not hand in their counts in time.
    pub unaccounted: u64,
}

/// What a session hands back at the end.
struct Outcome {
    alive: bool,
    tracker: Option<SessionTracker>,
}

struct Shared {
    cfg: RunConfig,
    /// One per `cfg.ws_urls`, same order.
    eps: Vec<Endpoint>,
    tokens: TokenMaker,
    ctx: SessionCtx,
    gate: Semaphore,
    stop: CancellationToken,
    all_attempted: Notify,
    planned: u64,
    errors_shown: AtomicU64,
}

/// Runs one worker until `Finish`, a closed command channel, or the deadline.
/// Events go to `events` tagged with the worker's index.
pub async fn run(
    plan: WorkerPlan,
    mut cmds: mpsc::Receiver<Command>,
    events: mpsc::Sender<(u32, Event)>,
) {
    let me = plan.index;
    let send = |ev: Event| {
        let events = events.clone();
        async move {
            let _ = events.send((me, ev)).await;
        }
    };
    let fail = |e: BenchError| Event::Failed { msg: e.to_string() };
    let cfg = plan.cfg.clone();
    let map = match RoomMap::new(cfg.sessions, cfg.rooms, cfg.publishers, cfg.room_dist) {
        Ok(m) => Arc::new(m),
        Err(e) => return send(fail(e)).await,
    };
    let eps = match net::resolve_all(&cfg.ws_urls).await {
        Ok(eps) => eps,
        Err(e) => return send(fail(e)).await,
    };
    let indices: Vec<u64> = plan.sessions().collect();
    let recorder = Arc::new(Recorder::new(cfg.latency_every));
    recorder
        .counters
        .planned
        .store(indices.len() as u64, Ordering::Relaxed);
    let shared = Arc::new(Shared {
        tokens: TokenMaker::new(&cfg.tokens, &cfg.http_url),
        eps,
        ctx: SessionCtx {
            recorder: recorder.clone(),
            map: map.clone(),
            heartbeat: cfg.heartbeat,
        },
        gate: Semaphore::new((cfg.connect_concurrency / plan.workers.max(1)).max(1) as usize),
        stop: CancellationToken::new(),
        all_attempted: Notify::new(),
        planned: indices.len() as u64,
        errors_shown: AtomicU64::new(0),
        cfg,
    });

    let mut set = JoinSet::new();
    for i in indices {
        set.spawn(one_session(shared.clone(), i));
    }
    if shared.planned == 0 {
        shared.all_attempted.notify_one();
    }

    let deadline = UNIX_EPOCH + Duration::from_millis(plan.deadline_unix_ms);
    let left = deadline
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    let deadline = tokio::time::sleep(left);
    tokio::pin!(deadline);
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    let mut ready = false;
    loop {
        tokio::select! {
            _ = shared.all_attempted.notified(), if !ready => {
                ready = true;
                send(Event::Ready(recorder.snapshot())).await;
            }
            _ = tick.tick() => send(Event::Progress(recorder.snapshot())).await,
            c = cmds.recv() => match c {
                Some(Command::Measure { from_ns, to_ns }) => recorder.set_window(from_ns, to_ns),
                Some(Command::Finish) | None => break,
            },
            _ = &mut deadline => {
                eprintln!("chatroom-bench worker {me}: deadline reached, stopping");
                break;
            }
        }
    }

    shared.stop.cancel();
    let mut fin = WorkerFinal {
        received: vec![0; map.publishers() as usize],
        alive_per_room: vec![0; map.rooms() as usize],
        ..WorkerFinal::default()
    };
    let collect = tokio::time::sleep(COLLECT_TIMEOUT);
    tokio::pin!(collect);
    loop {
        tokio::select! {
            r = set.join_next() => match r {
                None => break,
                Some(Ok(Outcome { alive: true, tracker: Some(t) })) => {
                    t.add_distinct(&map, &mut fin.received);
                    fin.alive_per_room[t.room() as usize] += 1;
                }
                Some(_) => {}
            },
            _ = &mut collect => {
                fin.unaccounted = set.len() as u64;
                set.abort_all();
                break;
            }
        }
    }
    fin.snapshot = recorder.snapshot();
    fin.latency = recorder.window_latency().to_buckets();
    send(Event::Final(Box::new(fin))).await;
}

/// A session's connection, by target.
enum Conn {
    Chat(Box<Ws>),
    Nats(Box<Ws>, Parser),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Connect,
    SignIn,
}

async fn open(shared: &Shared, i: u64, room: &str) -> Result<Conn, (Stage, BenchError)> {
    let cfg = &shared.cfg;
    let limit = cfg.session_timeout;
    let timed = |what| (Stage::Connect, BenchError::Timeout(what));
    let token = match cfg.target {
        Target::Chatroom => Some(
            shared
                .tokens
                .token(&session_uid(i))
                .await
                .map_err(|e| (Stage::SignIn, e))?,
        ),
        Target::Nats => None,
    };
    let source = net::source_for(&cfg.source_ips, i);
    let ep = &shared.eps[cfg.ws_index_of_session(i)];
    let mut ws = tokio::time::timeout(limit, net::open_ws(ep, source))
        .await
        .map_err(|_| timed("connect"))?
        .map_err(|e| (Stage::Connect, e))?;
    let signed = match token {
        Some(token) => tokio::time::timeout(limit, session::sign_in(&mut ws, &token, room))
            .await
            .map(|r| r.map(|()| None)),
        None => {
            let mut parser = Parser::default();
            tokio::time::timeout(limit, nats::handshake(&mut ws, &mut parser, Some(room)))
                .await
                .map(|r| r.map(|()| Some(parser)))
        }
    };
    match signed {
        Err(_) => Err((Stage::SignIn, BenchError::Timeout("sign-in"))),
        Ok(Err(e)) => Err((Stage::SignIn, e)),
        Ok(Ok(None)) => Ok(Conn::Chat(Box::new(ws))),
        Ok(Ok(Some(parser))) => Ok(Conn::Nats(Box::new(ws), parser)),
    }
}

async fn one_session(shared: Arc<Shared>, i: u64) -> Outcome {
    let failed = Outcome {
        alive: false,
        tracker: None,
    };
    let map = &shared.ctx.map;
    let room = map.session_room(i);
    let name = room_name(&shared.cfg.room_prefix, room);
    let counters = &shared.ctx.recorder.counters;
    let opened = {
        let Ok(_permit) = shared.gate.acquire().await else {
            return failed;
        };
        if shared.stop.is_cancelled() {
            return failed;
        }
        tokio::select! {
            r = open(&shared, i, &name) => Some(r),
            _ = shared.stop.cancelled() => None,
        }
    };
    let conn = match opened {
        None => return failed,
        Some(Ok(c)) => {
            counters.signed_in.fetch_add(1, Ordering::Relaxed);
            Some(c)
        }
        Some(Err((stage, e))) => {
            let c = match stage {
                Stage::Connect => &counters.connect_failed,
                Stage::SignIn => &counters.sign_in_failed,
            };
            c.fetch_add(1, Ordering::Relaxed);
            if shared.errors_shown.fetch_add(1, Ordering::Relaxed) < ERRORS_SHOWN {
                eprintln!("chatroom-bench: session {i}: {stage:?} failed: {e}");
            }
            None
        }
    };
    if counters.attempted.fetch_add(1, Ordering::Relaxed) + 1 == shared.planned {
        shared.all_attempted.notify_one();
    }
    let Some(conn) = conn else { return failed };
    let mut tracker = SessionTracker::new(room, map);
    let alive = match conn {
        Conn::Chat(mut ws) => {
            session::receive(&mut ws, &shared.ctx, &mut tracker, i, &shared.stop).await
        }
        Conn::Nats(mut ws, mut parser) => {
            nats::receive(
                &mut ws,
                &mut parser,
                &shared.ctx,
                &mut tracker,
                i,
                &shared.stop,
            )
            .await
        }
    };
    if !alive {
        counters.disconnected.fetch_add(1, Ordering::Relaxed);
    }
    Outcome {
        alive,
        tracker: Some(tracker),
    }
}

/// The `worker` subcommand: reads the plan and commands from stdin, writes
/// events to stdout, on a single-threaded runtime.
pub fn serve_stdio() -> Result<(), BenchError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        let first = lines
            .next_line()
            .await?
            .ok_or_else(|| BenchError::protocol("worker: stdin closed before the plan"))?;
        let plan: WorkerPlan = serde_json::from_str(&first)?;
        let (cmd_tx, cmd_rx) = mpsc::channel(16);
        let reader = tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<Command>(&line) {
                    Ok(c) => {
                        if cmd_tx.send(c).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => eprintln!("chatroom-bench worker: bad command {line:?}: {e}"),
                }
            }
        });
        let (ev_tx, mut ev_rx) = mpsc::channel::<(u32, Event)>(64);
        let writer = tokio::spawn(async move {
            let mut out = tokio::io::stdout();
            while let Some((_, ev)) = ev_rx.recv().await {
                let mut line = serde_json::to_vec(&ev)?;
                line.push(b'\n');
                out.write_all(&line).await?;
                out.flush().await?;
            }
            Ok::<(), BenchError>(())
        });
        run(plan, cmd_rx, ev_tx).await;
        reader.abort();
        writer
            .await
            .map_err(|e| BenchError::protocol(format!("worker writer: {e}")))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_strided_over_workers() {
        let plan = |index, workers| WorkerPlan {
            index,
            workers,
            cfg: RunConfig {
                sessions: 10,
                ..RunConfig::default()
            },
            deadline_unix_ms: 0,
        };
        assert_eq!(plan(0, 3).sessions().collect::<Vec<_>>(), vec![0, 3, 6, 9]);
        assert_eq!(plan(2, 3).sessions().collect::<Vec<_>>(), vec![2, 5, 8]);
        assert_eq!(plan(0, 1).sessions().count(), 10);
        assert_eq!(plan(11, 12).sessions().count(), 0);
    }

    #[test]
    fn messages_round_trip_as_json_lines() {
        let c = Command::Measure {
            from_ns: 1,
            to_ns: 2,
        };
        let line = serde_json::to_string(&c).unwrap();
        assert_eq!(line, r#"{"cmd":"measure","from_ns":1,"to_ns":2}"#);
        assert_eq!(serde_json::from_str::<Command>(&line).unwrap(), c);
        let ev = Event::Final(Box::new(WorkerFinal {
            latency: vec![(5, 2)],
            received: vec![3],
            ..WorkerFinal::default()
        }));
        let back: Event = serde_json::from_str(&serde_json::to_string(&ev).unwrap()).unwrap();
        match back {
            Event::Final(f) => assert_eq!((f.latency, f.received), (vec![(5, 2)], vec![3])),
            other => panic!("{other:?}"),
        }
        let plan = WorkerPlan {
            index: 1,
            workers: 2,
            cfg: RunConfig {
                ws_urls: vec![
                    "ws://127.0.0.1:1/room".into(),
                    "ws://127.0.0.1:2/room".into(),
                ],
                server_pids: vec![3, 4],
                ..RunConfig::default()
            },
            deadline_unix_ms: 1_700_000_000_000,
        };
        let back: WorkerPlan =
            serde_json::from_str(&serde_json::to_string(&plan).unwrap()).unwrap();
        assert_eq!(back.cfg.ws_urls, plan.cfg.ws_urls);
    }
}

//! The chaos suite's steady mixed load and its accounting: room sessions
//! on both conn nodes that receive (and some send NORMAL messages), a
//! `POST /msg` poster of IMPORTANT messages, IM pairs sending 1:1 and a
//! community conversation. Every session reconnects by itself (recovering
//! the room stream by offset, or the IM inbox at sign-in); every receipt is
//! recorded before any de-duplication, so the report can say per class what
//! was accepted, delivered, lost and duplicated, and how long the worst
//! message waited.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use chatroom_common::proto::protocol::{BroadcastRoomReq, Err, MsgLevel, PackageType, Reply};
use futures_util::StreamExt;
use prost::Message as _;
use serde_json::Value;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::chat::{ChatClient, User, call, register, text};
use crate::client::Client;
use crate::http;

/// The room every room session is in.
pub const ROOM: &str = "chaos";

/// A message class of the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    /// `POST /msg`: must reach every room session exactly once after
    /// de-duplication.
    Important,
    /// Room messages sent by sessions: may be dropped, every drop counted.
    Normal,
    /// IM 1:1 (`cmd 10`) acknowledged: never lost.
    Im,
    /// IM community (`cmd 11`) acknowledged: never lost.
    Community,
}

impl Class {
    pub const ALL: [Class; 4] = [Class::Important, Class::Normal, Class::Im, Class::Community];

    pub fn name(self) -> &'static str {
        match self {
            Class::Important => "room IMPORTANT",
            Class::Normal => "room NORMAL",
            Class::Im => "IM 1:1",
            Class::Community => "IM community",
        }
    }
}

/// How a session picks the node to reconnect to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reconnect {
    /// Alternate between the conn nodes, the other one first (a client
    /// behind a load balancer whose node died).
    OtherNode,
    /// Keep trying its own node (a client pinned to one address while that
    /// node restarts).
    SameNode,
}

/// How much load, and how clients behave.
#[derive(Debug, Clone)]
pub struct LoadPlan {
    /// Room sessions (half on each conn node).
    pub room_sessions: usize,
    /// Of those, how many also send NORMAL messages.
    pub normal_senders: usize,
    pub normal_every: Duration,
    pub important_every: Duration,
    /// IM pairs: sender on conn A, recipient on conn B.
    pub im_pairs: usize,
    pub im_every: Duration,
    /// Community members besides the sender (alternating nodes).
    pub community_members: usize,
    pub community_every: Duration,
    pub reconnect: Reconnect,
}

impl Default for LoadPlan {
    fn default() -> Self {
        LoadPlan {
            room_sessions: 8,
            normal_senders: 2,
            normal_every: Duration::from_millis(100),
            important_every: Duration::from_millis(50),
            im_pairs: 3,
            im_every: Duration::from_millis(200),
            community_members: 2,
            community_every: Duration::from_millis(200),
            reconnect: Reconnect::OtherNode,
        }
    }
}

/// One accepted message: when, and who must get it.
#[derive(Debug, Clone)]
struct Sent {
    at: Instant,
    receivers: Vec<usize>,
}

/// Everything the load saw, shared by its tasks (test code: a lock is fine).
#[derive(Debug, Default)]
struct Ledger {
    /// Accepted messages by class and key.
    sent: HashMap<(Class, String), Sent>,
    /// Receipts per (class, key, receiver), before de-duplication.
    got: HashMap<(Class, String, usize), (u32, Instant)>,
    /// Sends the system refused or left unanswered, by class.
    refused: HashMap<Class, u64>,
    /// Successful reconnects per receiver.
    reconnects: HashMap<usize, u32>,
    /// Failed connection or sign-in attempts per receiver.
    failed_attempts: HashMap<usize, u32>,
    /// `Err{410}` notices (messages a session could not recover).
    gone: u64,
    /// Sends on their way whose fate (accepted or refused) is not recorded
    /// yet: the drain judges what is owed only once this is 0.
    sending: u32,
}

/// Marks one send as on its way until dropped, after its fate is recorded.
struct Sending(Arc<Mutex<Ledger>>);

impl Sending {
    fn start(ledger: &Arc<Mutex<Ledger>>) -> Sending {
        ledger.lock().unwrap_or_else(|p| p.into_inner()).sending += 1;
        Sending(ledger.clone())
    }
}

impl Drop for Sending {
    fn drop(&mut self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).sending -= 1;
    }
}

/// Per-class figures of one scenario.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    pub accepted: u64,
    /// Distinct (message, receiver) pairs that arrived.
    pub delivered: u64,
    /// (message, receiver) pairs owed that never arrived.
    pub lost: u64,
    /// Receipts beyond the first of a (message, receiver) pair.
    pub duplicated: u64,
    /// Sends refused or unanswered (not accepted: not owed).
    pub refused: u64,
    /// The longest any delivered message waited, accepted to received.
    pub worst_latency: Duration,
    /// A few of the lost (message, receiver) pairs, for the failure message.
    pub lost_sample: Vec<(String, usize)>,
}

/// What a scenario measured.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub scenario: String,
    pub classes: Vec<(Class, Figures)>,
    pub reconnects: HashMap<usize, u32>,
    pub failed_attempts: u32,
    pub gone_notices: u64,
    /// Scenario-specific measurements (name, value).
    pub notes: Vec<(String, String)>,
}

impl Report {
    pub fn class(&self, c: Class) -> &Figures {
        &self
            .classes
            .iter()
            .find(|(k, _)| *k == c)
            .expect("every class is reported")
            .1
    }

    pub fn max_reconnects(&self) -> u32 {
        self.reconnects.values().copied().max().unwrap_or(0)
    }

    /// The report as Markdown table rows (`| scenario | class | ... |`).
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        for (c, f) in &self.classes {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {:.2} s |",
                self.scenario,
                c.name(),
                f.accepted,
                f.delivered,
                f.lost,
                f.duplicated,
                f.refused,
                f.worst_latency.as_secs_f64()
            );
        }
        let notes: Vec<String> = self
            .notes
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        let _ = writeln!(
            s,
            "<!-- {}: max reconnects per client {}, failed attempts {}, 410 notices {}; {} -->",
            self.scenario,
            self.max_reconnects(),
            self.failed_attempts,
            self.gone_notices,
            notes.join("; ")
        );
        s
    }
}

/// The running load.
pub struct Load {
    ledger: Arc<Mutex<Ledger>>,
    /// Stops the senders.
    senders: CancellationToken,
    /// Stops the receivers (after the drain).
    receivers: CancellationToken,
    /// Asks every IM receiver to sign in again (the "next sign-in").
    resign: Arc<tokio::sync::Notify>,
    tracker: TaskTracker,
    im_users: Vec<(User, User)>,
    http: Vec<String>,
    community: i64,
    owner: User,
}

/// Where the load runs.
#[derive(Debug, Clone)]
pub struct Target {
    /// HTTP API of every logic node (the poster and IM setup use them in
    /// turn, failing over as a client-side balancer would).
    pub http: Vec<String>,
    /// `/room` URL of every conn node.
    pub ws: Vec<String>,
}

/// Tries `f` on each logic node in turn until one answers, up to `within`.
async fn any_logic<T, F, Fut>(http: &[String], within: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let deadline = Instant::now() + within;
    let mut i = 0;
    loop {
        let base = http[i % http.len()].clone();
        i += 1;
        match f(base).await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

impl Load {
    /// Sets up accounts, friendships and the community, starts every task
    /// and returns once each class has delivered at least one message
    /// (the cluster is warm).
    pub async fn start(t: &Target, plan: &LoadPlan) -> anyhow::Result<Load> {
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let senders = CancellationToken::new();
        let receivers = CancellationToken::new();
        let resign = Arc::new(tokio::sync::Notify::new());
        let tracker = TaskTracker::new();
        let tag = crate::cluster::unique("x").replace('-', "");
        let tag = tag[tag.len() - 8..].to_string();
        let base = t.http[0].clone();

        // Room sessions: ids 0..n, half on each node.
        let mut room_ids = vec![];
        for i in 0..plan.room_sessions {
            let tok = http::token(&base, &format!("room-{tag}-{i}")).await?;
            let sender = i < plan.normal_senders;
            let s = RoomSession {
                id: i,
                token: tok,
                ws: t.ws.clone(),
                home: i % t.ws.len(),
                reconnect: plan.reconnect,
                normal_every: sender.then_some(plan.normal_every),
                ledger: ledger.clone(),
                receivers: plan.room_sessions,
            };
            room_ids.push(i);
            tracker.spawn(s.run(senders.clone(), receivers.clone()));
        }

        // IM accounts: pairs, then the community (owner + members).
        let mut next_id = 1000;
        let mut im_users = vec![];
        for p in 0..plan.im_pairs {
            let a = register(&base, &format!("1{tag}{p}1")).await?;
            let b = register(&base, &format!("1{tag}{p}2")).await?;
            call(
                &base,
                "/contact/addfriend",
                Some(&a.token),
                &[("dstid", &b.id.to_string())],
            )
            .await?;
            im_users.push((a, b));
        }
        let owner = register(&base, &format!("1{tag}91")).await?;
        let com = call(
            &base,
            "/contact/createcommunity",
            Some(&owner.token),
            &[("name", "chaos")],
        )
        .await?;
        let community = com["data"]["id"].as_i64().context("community without id")?;
        let mut members = vec![];
        for m in 0..plan.community_members {
            let u = register(&base, &format!("1{tag}8{m}")).await?;
            call(
                &base,
                "/contact/joincommunity",
                Some(&u.token),
                &[("dstid", &community.to_string())],
            )
            .await?;
            members.push(u);
        }

        for (p, (a, b)) in im_users.iter().enumerate() {
            let rid = next_id;
            next_id += 1;
            let recv = ChatSession {
                id: rid,
                user: b.clone(),
                ws: t.ws.clone(),
                home: 1 % t.ws.len(),
                reconnect: plan.reconnect,
                ledger: ledger.clone(),
            };
            tracker.spawn(recv.run(receivers.clone(), resign.clone()));
            let send = ChatSender {
                user: a.clone(),
                ws: t.ws.clone(),
                home: 0,
                reconnect: plan.reconnect,
                ledger: ledger.clone(),
                class: Class::Im,
                dst: b.id,
                every: plan.im_every,
                receivers: vec![rid],
                key_prefix: format!("P{p}"),
            };
            tracker.spawn(send.run(senders.clone()));
        }
        let mut member_ids = vec![];
        for (m, u) in members.iter().enumerate() {
            let rid = next_id;
            next_id += 1;
            member_ids.push(rid);
            let recv = ChatSession {
                id: rid,
                user: u.clone(),
                ws: t.ws.clone(),
                home: (m + 1) % t.ws.len(),
                reconnect: plan.reconnect,
                ledger: ledger.clone(),
            };
            tracker.spawn(recv.run(receivers.clone(), resign.clone()));
        }
        let send = ChatSender {
            user: owner.clone(),
            ws: t.ws.clone(),
            home: 0,
            reconnect: plan.reconnect,
            ledger: ledger.clone(),
            class: Class::Community,
            dst: community,
            every: plan.community_every,
            receivers: member_ids,
            key_prefix: "C".into(),
        };
        tracker.spawn(send.run(senders.clone()));

        let poster = Poster {
            http: t.http.clone(),
            token: http::token(&base, &format!("poster-{tag}")).await?,
            every: plan.important_every,
            ledger: ledger.clone(),
            receivers: room_ids,
        };
        tracker.spawn(poster.run(senders.clone()));
        tracker.close();

        let load = Load {
            ledger,
            senders,
            receivers,
            resign,
            tracker,
            im_users,
            http: t.http.clone(),
            community,
            owner,
        };
        load.warm().await?;
        Ok(load)
    }

    /// Waits until every class has delivered a message accepted from now
    /// on to everyone it was owed to: the cluster carries traffic end to
    /// end (jobs subscribed, community rooms joined, presence written).
    pub async fn warm(&self) -> anyhow::Result<()> {
        let from = Instant::now();
        let flowing = |c: Class| {
            let l = self.ledger.lock().unwrap_or_else(|p| p.into_inner());
            l.sent.iter().any(|((k, key), s)| {
                *k == c
                    && s.at >= from
                    && s.receivers
                        .iter()
                        .all(|r| l.got.contains_key(&(c, key.clone(), *r)))
            })
        };
        let r = crate::client::eventually(
            Duration::from_secs(30),
            "every class delivering end to end",
            || async { Class::ALL.iter().all(|c| flowing(*c)).then_some(()) },
        )
        .await;
        r.with_context(|| {
            let stuck: Vec<&str> = Class::ALL
                .iter()
                .filter(|c| !flowing(**c))
                .map(|c| c.name())
                .collect();
            format!("not delivering end to end: {stuck:?}")
        })
    }

    /// Every accepted message of the promised classes has reached every
    /// receiver it is owed to.
    fn sends_on_their_way(&self) -> u32 {
        self.ledger
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .sending
    }

    fn promised_all_delivered(&self) -> bool {
        let l = self.ledger.lock().unwrap_or_else(|p| p.into_inner());
        l.sent.iter().all(|((c, key), s)| {
            *c == Class::Normal
                || s.receivers
                    .iter()
                    .all(|r| l.got.contains_key(&(*c, key.clone(), *r)))
        })
    }

    /// Stops sending, waits up to `drain` for what is owed (live), then
    /// has every IM receiver sign in again (what an accepted IM message
    /// may wait for) and waits once more; then stops everything and counts.
    pub async fn finish(self, scenario: &str, drain: Duration) -> anyhow::Result<Report> {
        self.senders.cancel();
        // A sender stopped between its send and the answer records the
        // message as accepted only when the answer lands: judging what is
        // owed (and stopping the receivers) before that would count its
        // message lost everywhere. Each send is bounded by a 5 s timeout.
        let on_their_way = self.sends_on_their_way();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.sends_on_their_way() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let deadline = Instant::now() + drain;
        while !self.promised_all_delivered() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if !self.promised_all_delivered() {
            self.resign.notify_waiters();
            let deadline = Instant::now() + drain;
            while !self.promised_all_delivered() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        self.receivers.cancel();
        self.tracker.wait().await;
        let mut report = self.count(scenario);
        report
            .notes
            .push(("sends awaited at stop".into(), on_their_way.to_string()));
        let missing = self.missing_from_history().await?;
        report.notes.push((
            "IM messages missing from history".into(),
            missing.to_string(),
        ));
        Ok(report)
    }

    fn count(&self, scenario: &str) -> Report {
        let l = self.ledger.lock().unwrap_or_else(|p| p.into_inner());
        let mut classes = vec![];
        for c in Class::ALL {
            let mut f = Figures {
                refused: l.refused.get(&c).copied().unwrap_or(0),
                ..Default::default()
            };
            for ((k, key), s) in &l.sent {
                if *k != c {
                    continue;
                }
                f.accepted += 1;
                for r in &s.receivers {
                    match l.got.get(&(c, key.clone(), *r)) {
                        Some((n, at)) => {
                            f.delivered += 1;
                            f.duplicated += u64::from(n - 1);
                            f.worst_latency =
                                f.worst_latency.max(at.saturating_duration_since(s.at));
                        }
                        None => {
                            f.lost += 1;
                            if f.lost_sample.len() < 8 {
                                f.lost_sample.push((key.clone(), *r));
                            }
                        }
                    }
                }
            }
            classes.push((c, f));
        }
        Report {
            scenario: scenario.into(),
            classes,
            reconnects: l.reconnects.clone(),
            failed_attempts: l.failed_attempts.values().sum(),
            gone_notices: l.gone,
            notes: vec![],
        }
    }

    /// How many acknowledged IM messages `/chat/history` does not hold.
    async fn missing_from_history(&self) -> anyhow::Result<usize> {
        let acked: Vec<(Class, String)> = {
            let l = self.ledger.lock().unwrap_or_else(|p| p.into_inner());
            l.sent
                .keys()
                .filter(|(c, _)| matches!(c, Class::Im | Class::Community))
                .cloned()
                .collect()
        };
        let mut found = std::collections::HashSet::new();
        let mut convs: Vec<(User, i64, &str)> = self
            .im_users
            .iter()
            .map(|(a, b)| (a.clone(), b.id, "10"))
            .collect();
        convs.push((self.owner.clone(), self.community, "11"));
        for (u, dst, cmd) in convs {
            let mut before = 0i64;
            loop {
                let dst_s = dst.to_string();
                let before_s = before.to_string();
                let r = any_logic(&self.http, Duration::from_secs(10), |base| {
                    let (tok, d, b) = (u.token.clone(), dst_s.clone(), before_s.clone());
                    async move {
                        call(
                            &base,
                            "/chat/history",
                            Some(&tok),
                            &[
                                ("dstid", &d),
                                ("cmd", cmd),
                                ("limit", "100"),
                                ("before", &b),
                            ],
                        )
                        .await
                    }
                })
                .await?;
                let rows = r["rows"].as_array().cloned().unwrap_or_default();
                for row in &rows {
                    if let Some(c) = row["content"].as_str() {
                        found.insert(c.to_string());
                    }
                }
                match rows.last().and_then(|r| r["id"].as_i64()) {
                    Some(id) if rows.len() == 100 => before = id,
                    _ => break,
                }
            }
        }
        Ok(acked.iter().filter(|(_, k)| !found.contains(k)).count())
    }

    /// A token of an IM account of the load (for probing IM routes).
    pub fn probe_token(&self) -> &str {
        &self.owner.token
    }

    /// Of the `c` messages accepted in `[from, to)`: how many, and how many
    /// reached every receiver they are owed to so far.
    pub fn window(&self, c: Class, from: Instant, to: Instant) -> (usize, usize) {
        let l = self.ledger.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = (0, 0);
        for ((k, key), s) in &l.sent {
            if *k == c && s.at >= from && s.at < to {
                n.0 += 1;
                if s.receivers
                    .iter()
                    .all(|r| l.got.contains_key(&(c, key.clone(), *r)))
                {
                    n.1 += 1;
                }
            }
        }
        n
    }
}

/// Records that receiver `r` got `key` of class `c`.
fn record(ledger: &Mutex<Ledger>, c: Class, key: String, r: usize) {
    let mut l = ledger.lock().unwrap_or_else(|p| p.into_inner());
    let e = l.got.entry((c, key, r)).or_insert((0, Instant::now()));
    e.0 += 1;
}

fn accept(ledger: &Mutex<Ledger>, c: Class, key: String, at: Instant, receivers: Vec<usize>) {
    let mut l = ledger.lock().unwrap_or_else(|p| p.into_inner());
    l.sent.insert((c, key), Sent { at, receivers });
}

fn refuse(ledger: &Mutex<Ledger>, c: Class) {
    let mut l = ledger.lock().unwrap_or_else(|p| p.into_inner());
    *l.refused.entry(c).or_default() += 1;
}

fn attempt(ledger: &Mutex<Ledger>, r: usize, ok: bool, first: bool) {
    let mut l = ledger.lock().unwrap_or_else(|p| p.into_inner());
    if !ok {
        *l.failed_attempts.entry(r).or_default() += 1;
    } else if !first {
        *l.reconnects.entry(r).or_default() += 1;
    }
}

/// The node to try after losing (or failing to reach) `from`.
fn next_node(ws: &[String], home: usize, from: usize, how: Reconnect) -> usize {
    match how {
        Reconnect::SameNode => home,
        Reconnect::OtherNode => (from + 1) % ws.len(),
    }
}

/// Pause between connection attempts (pacing a retry, not synchronising).
const RETRY: Duration = Duration::from_millis(100);

/// How often every session beats, as real clients do (conn renews a
/// user's presence on a beat, at most once per `ws.heartbeat_secs`).
const BEAT: Duration = Duration::from_secs(1);

/// A `/room` session: receives the room stream, recovers by offset after
/// each reconnect, and may send NORMAL messages.
struct RoomSession {
    id: usize,
    token: String,
    ws: Vec<String>,
    home: usize,
    reconnect: Reconnect,
    normal_every: Option<Duration>,
    ledger: Arc<Mutex<Ledger>>,
    receivers: usize,
}

impl RoomSession {
    async fn run(self, senders: CancellationToken, stop: CancellationToken) {
        let mut pos: Option<(u64, u64)> = None;
        let mut node = self.home;
        let mut first = true;
        let mut seq = 0u64;
        let mut tick =
            tokio::time::interval(self.normal_every.unwrap_or(Duration::from_secs(3600)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !stop.is_cancelled() {
            let url = &self.ws[node];
            let signed = async {
                let mut c = Client::connect(url).await?;
                let e = match pos {
                    Some((epoch, off)) => c.sign_in_resume(&self.token, ROOM, epoch, off).await?,
                    None => c.sign_in(&self.token, ROOM).await?,
                };
                anyhow::ensure!(e.code == 0, "sign-in: {} {}", e.code, e.msg);
                if pos.is_none() {
                    pos = Some((e.epoch, e.offset));
                }
                Ok(c)
            };
            let mut c = match tokio::select! {
                r = signed => r,
                () = stop.cancelled() => return,
            } {
                Ok(c) => c,
                Err(_) => {
                    attempt(&self.ledger, self.id, false, first);
                    node = next_node(&self.ws, self.home, node, self.reconnect);
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            };
            attempt(&self.ledger, self.id, true, first);
            first = false;
            let mut beat = tokio::time::interval(BEAT);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = beat.tick() => {
                        if c.send_req(PackageType::Heartbeat, Bytes::new()).await.is_err() {
                            break;
                        }
                    }
                    _ = tick.tick(), if self.normal_every.is_some() && !senders.is_cancelled() => {
                        seq += 1;
                        let key = format!("N|{}|{seq}", self.id);
                        let _sending = Sending::start(&self.ledger);
                        // NORMAL has no ack: a message the socket took counts
                        // as accepted, owed to every other session (best effort).
                        if c.send_message(ROOM, MsgLevel::Normal, key.as_bytes()).await.is_err() {
                            refuse(&self.ledger, Class::Normal);
                            break;
                        }
                        let others = (0..self.receivers).filter(|r| *r != self.id).collect();
                        accept(&self.ledger, Class::Normal, key, Instant::now(), others);
                    }
                    m = c.ws.next() => {
                        match m {
                            Some(Ok(Message::Binary(b))) => self.on_frame(b, &mut pos),
                            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                            Some(Ok(_)) => {}
                        }
                    }
                }
            }
            node = next_node(&self.ws, self.home, node, self.reconnect);
        }
    }

    fn on_frame(&self, b: Bytes, pos: &mut Option<(u64, u64)>) {
        let Ok(r) = Reply::decode(b) else { return };
        if r.r#type == PackageType::Message as i32 {
            let Ok(m) = BroadcastRoomReq::decode(r.data) else {
                return;
            };
            *pos = Some((m.epoch, m.offset));
            for part in chatroom_common::batch::decode(&m.data).flatten() {
                let s = String::from_utf8_lossy(part);
                let class = if s.starts_with("I|") {
                    Class::Important
                } else if s.starts_with("N|") {
                    Class::Normal
                } else {
                    continue;
                };
                record(&self.ledger, class, s.into_owned(), self.id);
            }
        } else if r.r#type == PackageType::Unknown as i32
            && let Ok(e) = Err::decode(r.data)
            && e.code == 410
        {
            *pos = Some((e.epoch, e.offset));
            self.ledger.lock().unwrap_or_else(|p| p.into_inner()).gone += 1;
        }
    }
}

/// `POST /msg` of IMPORTANT messages, failing over between logic nodes.
struct Poster {
    http: Vec<String>,
    token: String,
    every: Duration,
    ledger: Arc<Mutex<Ledger>>,
    receivers: Vec<usize>,
}

impl Poster {
    async fn run(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq = 0u64;
        let mut node = 0;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            seq += 1;
            let key = format!("I|{seq}");
            let _sending = Sending::start(&self.ledger);
            let at = Instant::now();
            let url = format!("{}/msg", self.http[node % self.http.len()]);
            let r = tokio::time::timeout(
                Duration::from_secs(5),
                http::post_json(
                    &url,
                    Some(&self.token),
                    serde_json::json!({"room_id": ROOM, "msg": key}),
                ),
            )
            .await;
            match r {
                Ok(Ok(a)) if a.json["code"] == 1 => {
                    accept(
                        &self.ledger,
                        Class::Important,
                        key,
                        at,
                        self.receivers.clone(),
                    );
                }
                _ => {
                    refuse(&self.ledger, Class::Important);
                    // A client-side balancer: the next try goes to the next node.
                    node += 1;
                }
            }
        }
    }
}

/// Connects an IM session to node `node`, or fails.
async fn chat_connect(ws: &str, user: &User) -> anyhow::Result<ChatClient> {
    tokio::time::timeout(Duration::from_secs(5), ChatClient::connect(ws, user))
        .await
        .context("chat connect timed out")?
}

/// An IM recipient: records every message pushed or delivered from the
/// inbox at sign-in; signs in again when asked.
struct ChatSession {
    id: usize,
    user: User,
    ws: Vec<String>,
    home: usize,
    reconnect: Reconnect,
    ledger: Arc<Mutex<Ledger>>,
}

impl ChatSession {
    async fn run(self, stop: CancellationToken, resign: Arc<tokio::sync::Notify>) {
        let mut node = self.home;
        let mut first = true;
        while !stop.is_cancelled() {
            let c = tokio::select! {
                r = chat_connect(&self.ws[node], &self.user) => r,
                () = stop.cancelled() => return,
            };
            let mut c = match c {
                Ok(c) => c,
                Err(_) => {
                    attempt(&self.ledger, self.id, false, first);
                    node = next_node(&self.ws, self.home, node, self.reconnect);
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            };
            attempt(&self.ledger, self.id, true, first);
            first = false;
            let mut asked = false;
            let mut beat = tokio::time::interval(BEAT);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = beat.tick() => {
                        if c.send(serde_json::json!({"cmd": 0})).await.is_err() {
                            break;
                        }
                    }
                    () = resign.notified() => { asked = true; break; }
                    m = c.ws.next() => match m {
                        Some(Ok(Message::Text(t))) => {
                            let Ok(v) = serde_json::from_str::<Value>(t.as_str()) else { continue };
                            let class = match v["cmd"].as_i64() {
                                Some(10) => Class::Im,
                                Some(11) => Class::Community,
                                _ => continue,
                            };
                            if let Some(k) = v["content"].as_str() {
                                record(&self.ledger, class, k.to_string(), self.id);
                            }
                        }
                        Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                        Some(Ok(_)) => {}
                    }
                }
            }
            let _ = c.ws.close(None).await;
            if asked {
                // The requested sign-in again is not a fault's reconnect.
                first = true;
                continue;
            }
            node = next_node(&self.ws, self.home, node, self.reconnect);
        }
    }
}

/// An IM sender: one message per tick, waiting for its ack; acked ones are
/// owed to `receivers`.
struct ChatSender {
    user: User,
    ws: Vec<String>,
    home: usize,
    reconnect: Reconnect,
    ledger: Arc<Mutex<Ledger>>,
    class: Class,
    dst: i64,
    every: Duration,
    receivers: Vec<usize>,
    key_prefix: String,
}

impl ChatSender {
    async fn run(self, stop: CancellationToken) {
        let cmd = if self.class == Class::Community {
            11
        } else {
            10
        };
        let mut node = self.home;
        let mut seq = 0i64;
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        'outer: while !stop.is_cancelled() {
            let mut c = tokio::select! {
                r = chat_connect(&self.ws[node], &self.user) => match r {
                    Ok(c) => c,
                    Err(_) => {
                        node = next_node(&self.ws, self.home, node, self.reconnect);
                        tokio::time::sleep(RETRY).await;
                        continue;
                    }
                },
                () = stop.cancelled() => return,
            };
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                seq += 1;
                let key = format!("{}|{seq}", self.key_prefix);
                let _sending = Sending::start(&self.ledger);
                let at = Instant::now();
                let r = tokio::time::timeout(
                    Duration::from_secs(5),
                    c.send_msg(text(seq, self.dst, cmd, &key)),
                )
                .await;
                match r {
                    Ok(Ok((ack, _))) if ack["cmd"] == 20 => {
                        accept(&self.ledger, self.class, key, at, self.receivers.clone());
                    }
                    Ok(Ok(_)) => refuse(&self.ledger, self.class),
                    _ => {
                        // No answer: the fate of this one is unknown, so it
                        // is not owed; reconnect.
                        refuse(&self.ledger, self.class);
                        node = next_node(&self.ws, self.home, node, self.reconnect);
                        continue 'outer;
                    }
                }
            }
        }
    }
}

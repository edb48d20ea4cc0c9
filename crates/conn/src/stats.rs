//! Counters of this conn node: relaxed atomics written on the session and
//! push paths (no lock, no allocation) and exported to Prometheus by a
//! [`Collector`] that reads them at scrape time (`/metrics` on the admin
//! listener, every family prefixed `chatroom_conn_` and labelled with the
//! node id).
//!
//! The plain fields are what the session, push and accept code counts
//! today; the `record_*` / `session_*` / `bad_frame` methods are the richer
//! hooks (by reason, by kind, histograms) for the per-message code to call.
//! A total that is counted both ways is exported once: what no richer hook
//! classified shows as `unclassified`.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use chatroom_common::metrics::{
    self, Collector, DescriptorEncoder, Histogram, Registry, encode_counter, encode_counter_family,
    encode_gauge, encode_gauge_family, encode_histogram,
};

use crate::room::PushStats;

/// How a session speaks (protobuf on `/room`, JSON on `/chat`).
pub use crate::chat::Encoding;

/// Why a sign-in was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignInRefusal {
    /// Bad, expired or wrongly signed token (Err 100).
    Token,
    /// No sign-in within `ws.sign_in_timeout`.
    Timeout,
    /// The first frame was not a well-formed SIGN_IN (Err 400, text frame).
    BadFrame,
    /// logic could not be reached (Err 503).
    LogicUnavailable,
    /// Anything else logic refused.
    Other,
}

impl SignInRefusal {
    const ALL: [SignInRefusal; 5] = [
        SignInRefusal::Token,
        SignInRefusal::Timeout,
        SignInRefusal::BadFrame,
        SignInRefusal::LogicUnavailable,
        SignInRefusal::Other,
    ];
    fn label(self) -> &'static str {
        match self {
            SignInRefusal::Token => "token",
            SignInRefusal::Timeout => "timeout",
            SignInRefusal::BadFrame => "bad_frame",
            SignInRefusal::LogicUnavailable => "logic_unavailable",
            SignInRefusal::Other => "other",
        }
    }
}

/// Why a message did not reach a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The session's bounded queue was full (a NORMAL message shed).
    QueueFull,
    /// The session was closing or gone when the message came.
    Closed,
    /// The message was too old for the room stream (a writer far behind).
    Lagged,
}

impl DropReason {
    const ALL: [DropReason; 3] = [
        DropReason::QueueFull,
        DropReason::Closed,
        DropReason::Lagged,
    ];
    fn label(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::Closed => "closed",
            DropReason::Lagged => "lagged",
        }
    }
}

/// What was wrong with a client frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadFrame {
    /// Not a decodable `Req` / JSON message, or a bad field (400).
    Malformed,
    /// A text frame on the protobuf endpoint (400 / close 1003).
    Text,
    /// Over `ws.max_frame_bytes` (413 / close 1009).
    TooLarge,
    /// Unknown package type or cmd (404).
    UnknownType,
    /// A room the session is not in (403).
    NotInRoom,
    /// A second SIGN_IN (409).
    SecondSignIn,
    /// Before sign-in (100).
    NotSignedIn,
    /// A WebSocket protocol violation (bad opcode, masking, fragments).
    Protocol,
}

impl BadFrame {
    const ALL: [BadFrame; 8] = [
        BadFrame::Malformed,
        BadFrame::Text,
        BadFrame::TooLarge,
        BadFrame::UnknownType,
        BadFrame::NotInRoom,
        BadFrame::SecondSignIn,
        BadFrame::NotSignedIn,
        BadFrame::Protocol,
    ];
    fn label(self) -> &'static str {
        match self {
            BadFrame::Malformed => "malformed",
            BadFrame::Text => "text",
            BadFrame::TooLarge => "too_large",
            BadFrame::UnknownType => "unknown_type",
            BadFrame::NotInRoom => "not_in_room",
            BadFrame::SecondSignIn => "second_sign_in",
            BadFrame::NotSignedIn => "not_signed_in",
            BadFrame::Protocol => "protocol",
        }
    }
}

/// Which logic call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogicCall {
    SignIn,
    Receive,
    ReceiveMany,
    ReportOnline,
    Chat,
    Other,
}

impl LogicCall {
    const ALL: [LogicCall; 6] = [
        LogicCall::SignIn,
        LogicCall::Receive,
        LogicCall::ReceiveMany,
        LogicCall::ReportOnline,
        LogicCall::Chat,
        LogicCall::Other,
    ];
    fn label(self) -> &'static str {
        match self {
            LogicCall::SignIn => "sign_in",
            LogicCall::Receive => "receive",
            LogicCall::ReceiveMany => "receive_many",
            LogicCall::ReportOnline => "report_online",
            LogicCall::Chat => "chat",
            LogicCall::Other => "other",
        }
    }
}

#[derive(Debug)]
pub struct Stats {
    /// Open connections (signed in or not).
    pub sessions: AtomicU64,
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections refused at `ws.max_connections`.
    pub refused: AtomicU64,
    /// Room pushes (`PushRoom` items) taken from job.
    pub pushes: AtomicU64,
    /// Sessions a push reached (a frame queued for each).
    pub delivered: AtomicU64,
    /// Sessions a push missed because their queue was full.
    pub dropped: AtomicU64,
    /// Sessions disconnected for being too slow (an IMPORTANT push did not fit).
    pub slow_disconnects: AtomicU64,
    /// Bad client frames of any kind.
    pub bad_frames: AtomicU64,

    /// Signed-in sessions by encoding (see [`Stats::session_signed_in`]).
    pub sessions_proto: AtomicI64,
    pub sessions_json: AtomicI64,
    pub sign_ins_ok: AtomicU64,
    sign_in_refused: [AtomicU64; SignInRefusal::ALL.len()],
    /// Rooms with at least one session on this node.
    pub rooms: AtomicI64,
    /// WebSocket frames written to clients.
    pub frames_written: AtomicU64,
    /// Messages those frames carried (a merged frame carries several).
    pub messages_written: AtomicU64,
    /// Bytes written to clients.
    pub bytes_out: AtomicU64,
    dropped_by: [AtomicU64; DropReason::ALL.len()],
    bad_by: [AtomicU64; BadFrame::ALL.len()],
    logic_errors: [AtomicU64; LogicCall::ALL.len()],
    logic_latency: [Histogram; LogicCall::ALL.len()],
    /// Frames queued in a session's outbox, seen when one is added.
    pub outbox_depth: Histogram,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            sessions: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            pushes: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            slow_disconnects: AtomicU64::new(0),
            bad_frames: AtomicU64::new(0),
            sessions_proto: AtomicI64::new(0),
            sessions_json: AtomicI64::new(0),
            sign_ins_ok: AtomicU64::new(0),
            sign_in_refused: Default::default(),
            rooms: AtomicI64::new(0),
            frames_written: AtomicU64::new(0),
            messages_written: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            dropped_by: Default::default(),
            bad_by: Default::default(),
            logic_errors: Default::default(),
            logic_latency: std::array::from_fn(|_| Histogram::latency()),
            outbox_depth: Histogram::counts(),
        }
    }
}

fn inc(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Stats {
    pub fn record_push(&self, st: PushStats) {
        self.pushes.fetch_add(1, Ordering::Relaxed);
        self.delivered
            .fetch_add(st.delivered as u64, Ordering::Relaxed);
        self.dropped.fetch_add(st.dropped as u64, Ordering::Relaxed);
        self.slow_disconnects
            .fetch_add(st.disconnected as u64, Ordering::Relaxed);
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    /// A session signed in: counts it as ok and under its encoding. Pair
    /// with [`Stats::session_signed_out`] when it ends.
    pub fn session_signed_in(&self, enc: Encoding) {
        inc(&self.sign_ins_ok, 1);
        self.encoding_gauge(enc).fetch_add(1, Ordering::Relaxed);
    }

    /// A signed-in session ended.
    pub fn session_signed_out(&self, enc: Encoding) {
        self.encoding_gauge(enc).fetch_sub(1, Ordering::Relaxed);
    }

    fn encoding_gauge(&self, enc: Encoding) -> &AtomicI64 {
        match enc {
            Encoding::Protobuf => &self.sessions_proto,
            Encoding::Json => &self.sessions_json,
        }
    }

    /// A sign-in was refused.
    pub fn sign_in_refused(&self, why: SignInRefusal) {
        inc(&self.sign_in_refused[why as usize], 1);
    }

    /// Number of rooms with a session on this node now.
    pub fn set_rooms(&self, n: usize) {
        self.rooms.store(n as i64, Ordering::Relaxed);
    }

    /// One write to a client: `frames` WebSocket frames carrying
    /// `messages` messages in `bytes` bytes.
    pub fn record_write(&self, frames: u64, messages: u64, bytes: u64) {
        inc(&self.frames_written, frames);
        inc(&self.messages_written, messages);
        inc(&self.bytes_out, bytes);
    }

    /// Messages that did not reach a session. `QueueFull` drops counted
    /// by [`Stats::record_push`] must not be recorded again here.
    pub fn record_drop(&self, why: DropReason, n: u64) {
        inc(&self.dropped_by[why as usize], n);
    }

    /// A bad client frame of a known kind (also counted in `bad_frames`:
    /// call this instead of incrementing `bad_frames`).
    pub fn bad_frame(&self, kind: BadFrame) {
        inc(&self.bad_frames, 1);
        inc(&self.bad_by[kind as usize], 1);
    }

    /// One call to logic and how long it took; `ok` false for an error
    /// (transport or status).
    pub fn record_logic_call(&self, call: LogicCall, took: Duration, ok: bool) {
        self.logic_latency[call as usize].observe_duration(took);
        if !ok {
            inc(&self.logic_errors[call as usize], 1);
        }
    }

    /// Frames waiting in a session's outbox, seen as one is queued.
    pub fn observe_outbox_depth(&self, depth: usize) {
        self.outbox_depth.observe(depth as u64);
    }

    /// A registry exporting these counters as `chatroom_conn_*{node}`.
    pub fn registry(self: &Arc<Self>, node: &str) -> Registry {
        let mut r = Registry::with_prefix_and_labels(
            "chatroom_conn",
            [(
                std::borrow::Cow::Borrowed("node"),
                std::borrow::Cow::Owned(node.to_string()),
            )]
            .into_iter(),
        );
        r.register_collector(Box::new(StatsCollector(self.clone())));
        r
    }
}

#[derive(Debug)]
struct StatsCollector(Arc<Stats>);

impl Collector for StatsCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &*self.0;
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let gi = |c: &AtomicI64| c.load(Ordering::Relaxed);

        let open = g(&s.sessions) as i64;
        let (proto, json) = (gi(&s.sessions_proto).max(0), gi(&s.sessions_json).max(0));
        encode_gauge(&mut e, "connections", "Open WebSocket connections", open)?;
        encode_gauge_family(
            &mut e,
            "sessions",
            "Sessions by encoding (unclassified: not signed in, or not counted by encoding)",
            "encoding",
            &[
                ("proto", proto),
                ("json", json),
                ("unclassified", (open - proto - json).max(0)),
            ],
        )?;
        encode_counter(&mut e, "accepted", "Connections accepted", g(&s.accepted))?;
        encode_counter(
            &mut e,
            "refused",
            "Connections refused at ws.max_connections",
            g(&s.refused),
        )?;
        encode_counter(
            &mut e,
            "sign_ins",
            "Sign-ins that succeeded",
            g(&s.sign_ins_ok),
        )?;
        let refused: Vec<(&'static str, u64)> = SignInRefusal::ALL
            .iter()
            .map(|r| (r.label(), g(&s.sign_in_refused[*r as usize])))
            .collect();
        encode_counter_family(
            &mut e,
            "sign_ins_refused",
            "Sign-ins refused, by reason",
            "reason",
            &refused,
        )?;
        encode_gauge(
            &mut e,
            "rooms",
            "Rooms with a session on this node",
            gi(&s.rooms),
        )?;
        encode_counter(&mut e, "pushes", "Room pushes taken from job", g(&s.pushes))?;
        encode_counter(
            &mut e,
            "deliveries",
            "Sessions a push reached (one frame queued each)",
            g(&s.delivered),
        )?;
        encode_counter(
            &mut e,
            "frames_written",
            "WebSocket frames written to clients",
            g(&s.frames_written),
        )?;
        encode_counter(
            &mut e,
            "messages_written",
            "Messages written to clients (merged frames carry several)",
            g(&s.messages_written),
        )?;
        encode_counter(
            &mut e,
            "bytes_out",
            "Bytes written to clients",
            g(&s.bytes_out),
        )?;
        let mut dropped: Vec<(&'static str, u64)> = DropReason::ALL
            .iter()
            .map(|r| (r.label(), g(&s.dropped_by[*r as usize])))
            .collect();
        dropped[DropReason::QueueFull as usize].1 += g(&s.dropped);
        encode_counter_family(
            &mut e,
            "dropped",
            "Messages that did not reach a session, by reason",
            "reason",
            &dropped,
        )?;
        encode_counter(
            &mut e,
            "slow_disconnects",
            "Sessions closed for being too slow to read",
            g(&s.slow_disconnects),
        )?;
        let mut bad: Vec<(&'static str, u64)> = BadFrame::ALL
            .iter()
            .map(|k| (k.label(), g(&s.bad_by[*k as usize])))
            .collect();
        let classified: u64 = bad.iter().map(|(_, n)| n).sum();
        bad.push(("unclassified", g(&s.bad_frames).saturating_sub(classified)));
        encode_counter_family(
            &mut e,
            "bad_frames",
            "Bad client frames, by kind",
            "kind",
            &bad,
        )?;
        let errors: Vec<(&'static str, u64)> = LogicCall::ALL
            .iter()
            .map(|c| (c.label(), g(&s.logic_errors[*c as usize])))
            .collect();
        encode_counter_family(
            &mut e,
            "logic_errors",
            "Calls to logic that failed, by call",
            "call",
            &errors,
        )?;
        {
            let mut m = e.encode_descriptor(
                "logic_call_seconds",
                "Latency of calls to logic, by call",
                None,
                metrics::MetricType::Histogram,
            )?;
            for c in LogicCall::ALL {
                let labels = [("call", c.label())];
                metrics::EncodeMetric::encode(
                    &s.logic_latency[c as usize],
                    m.encode_family(&labels)?,
                )?;
            }
        }
        encode_histogram(
            &mut e,
            "outbox_depth",
            "Frames queued in a session's outbox when one is added",
            &s.outbox_depth,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chatroom_common::metrics::sample;

    #[test]
    fn every_hook_moves_its_family() {
        let s = Arc::new(Stats::default());
        let r = s.registry("conn-t");
        s.sessions.fetch_add(3, Ordering::Relaxed);
        s.session_signed_in(Encoding::Json);
        s.sign_in_refused(SignInRefusal::Token);
        s.set_rooms(2);
        s.record_write(1, 4, 100);
        s.record_push(PushStats {
            delivered: 5,
            dropped: 1,
            disconnected: 1,
        });
        s.record_drop(DropReason::Closed, 2);
        s.bad_frames.fetch_add(1, Ordering::Relaxed);
        s.bad_frame(BadFrame::TooLarge);
        s.record_logic_call(LogicCall::SignIn, Duration::from_millis(2), false);
        s.observe_outbox_depth(7);
        let t = metrics::render(&[&r]);
        let n = [("node", "conn-t")];
        let v = |name: &str, extra: &[(&str, &str)]| {
            let mut l = n.to_vec();
            l.extend_from_slice(extra);
            sample(&t, name, &l).unwrap_or_else(|| panic!("{name} {extra:?} missing in\n{t}"))
        };
        assert_eq!(v("chatroom_conn_connections", &[]), 3.0);
        assert_eq!(v("chatroom_conn_sessions", &[("encoding", "json")]), 1.0);
        assert_eq!(
            v("chatroom_conn_sessions", &[("encoding", "unclassified")]),
            2.0
        );
        assert_eq!(v("chatroom_conn_sign_ins_total", &[]), 1.0);
        assert_eq!(
            v(
                "chatroom_conn_sign_ins_refused_total",
                &[("reason", "token")]
            ),
            1.0
        );
        assert_eq!(v("chatroom_conn_rooms", &[]), 2.0);
        assert_eq!(v("chatroom_conn_messages_written_total", &[]), 4.0);
        assert_eq!(v("chatroom_conn_bytes_out_total", &[]), 100.0);
        assert_eq!(v("chatroom_conn_deliveries_total", &[]), 5.0);
        assert_eq!(
            v("chatroom_conn_dropped_total", &[("reason", "queue_full")]),
            1.0
        );
        assert_eq!(
            v("chatroom_conn_dropped_total", &[("reason", "closed")]),
            2.0
        );
        assert_eq!(v("chatroom_conn_slow_disconnects_total", &[]), 1.0);
        assert_eq!(
            v("chatroom_conn_bad_frames_total", &[("kind", "too_large")]),
            1.0
        );
        assert_eq!(
            v(
                "chatroom_conn_bad_frames_total",
                &[("kind", "unclassified")]
            ),
            1.0
        );
        assert_eq!(
            v("chatroom_conn_logic_errors_total", &[("call", "sign_in")]),
            1.0
        );
        assert_eq!(
            v(
                "chatroom_conn_logic_call_seconds_count",
                &[("call", "sign_in")]
            ),
            1.0
        );
        assert_eq!(v("chatroom_conn_outbox_depth_count", &[]), 1.0);
        assert_eq!(
            v("chatroom_conn_outbox_depth_bucket", &[("le", "8.0")]),
            1.0
        );
    }
}

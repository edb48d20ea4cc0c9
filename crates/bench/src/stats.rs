//! A worker's live counters and latency histograms, shared by all of its
//! sessions: [`Recorder::deliver`] turns one pushed frame's payloads into
//! deliveries, duplicates, latency samples; [`Snapshot`] is what a worker
//! reports every second and what the parent adds up.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::latency::Latency;
use crate::loss::{Seen, SessionTracker};
use crate::payload::{self, now_ns};
use crate::rooms::RoomMap;

/// Counters of one worker (or, added up, of the whole run).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Sessions this worker was given.
    pub planned: u64,
    /// Sessions whose connect and sign-in finished, either way.
    pub attempted: u64,
    pub signed_in: u64,
    /// TCP connect or WebSocket handshake failed (or timed out).
    pub connect_failed: u64,
    /// The server refused the sign-in (or did not answer it in time).
    pub sign_in_failed: u64,
    /// Signed-in sessions that later lost their connection.
    pub disconnected: u64,
    /// New (non-duplicate) benchmark messages received.
    pub deliveries: u64,
    /// WebSocket frames that carried messages (deliveries / frames: how
    /// much the server merged).
    pub frames: u64,
    /// Of those, received inside the measurement window.
    pub window_deliveries: u64,
    pub duplicates: u64,
    pub stale: u64,
    /// Messages that are not ours, or not from a publisher of the room.
    pub foreign: u64,
    /// Error replies the server sent to signed-in sessions.
    pub server_errors: u64,
    /// Since the previous snapshot: deliveries and their p99 / max latency.
    pub interval_count: u64,
    pub interval_p99_us: u64,
    pub interval_max_us: u64,
    /// The worker's own resident memory.
    pub rss_kib: u64,
}

impl Snapshot {
    /// Adds another worker's counters; interval latencies take the worst.
    pub fn add(&mut self, o: &Snapshot) {
        self.planned += o.planned;
        self.attempted += o.attempted;
        self.signed_in += o.signed_in;
        self.connect_failed += o.connect_failed;
        self.sign_in_failed += o.sign_in_failed;
        self.disconnected += o.disconnected;
        self.deliveries += o.deliveries;
        self.frames += o.frames;
        self.window_deliveries += o.window_deliveries;
        self.duplicates += o.duplicates;
        self.stale += o.stale;
        self.foreign += o.foreign;
        self.server_errors += o.server_errors;
        self.interval_count += o.interval_count;
        self.interval_p99_us = self.interval_p99_us.max(o.interval_p99_us);
        self.interval_max_us = self.interval_max_us.max(o.interval_max_us);
        self.rss_kib += o.rss_kib;
    }

    /// Sessions still connected.
    pub fn live(&self) -> u64 {
        self.signed_in.saturating_sub(self.disconnected)
    }
}

/// Lock-free counters bumped by sessions.
#[derive(Debug, Default)]
pub struct Counters {
    pub planned: AtomicU64,
    pub attempted: AtomicU64,
    pub signed_in: AtomicU64,
    pub connect_failed: AtomicU64,
    pub sign_in_failed: AtomicU64,
    pub disconnected: AtomicU64,
    pub deliveries: AtomicU64,
    pub frames: AtomicU64,
    pub window_deliveries: AtomicU64,
    pub duplicates: AtomicU64,
    pub stale: AtomicU64,
    pub foreign: AtomicU64,
    pub server_errors: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    if n > 0 {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
struct Histograms {
    /// Messages sent inside the measurement window.
    window: Latency,
    /// Everything since the last snapshot (progress line).
    interval: Latency,
}

/// Where a worker's sessions record what they receive.
#[derive(Debug)]
pub struct Recorder {
    pub counters: Counters,
    /// Measurement window, ns since the epoch; empty until the parent sets it.
    from_ns: AtomicU64,
    to_ns: AtomicU64,
    hist: Mutex<Histograms>,
    /// Latency is recorded for messages whose sequence is a multiple of
    /// this (1: every message); loss and duplicates count every message.
    latency_every: u32,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new(1)
    }
}

impl Recorder {
    /// A recorder that samples latency from one message in `latency_every`
    /// (by sequence number, so every session samples the same messages).
    pub fn new(latency_every: u32) -> Self {
        Recorder {
            counters: Counters::default(),
            from_ns: AtomicU64::new(u64::MAX),
            to_ns: AtomicU64::new(0),
            hist: Mutex::new(Histograms::default()),
            latency_every: latency_every.max(1),
        }
    }

    /// Latency counts for messages sent, and throughput for deliveries
    /// received, within `[from_ns, to_ns]`.
    pub fn set_window(&self, from_ns: u64, to_ns: u64) {
        self.to_ns.store(to_ns, Ordering::Relaxed);
        self.from_ns.store(from_ns, Ordering::Relaxed);
    }

    /// Records the payloads of one received frame (counted as one frame)
    /// for the session that
    /// `tracker` belongs to, received now.
    pub fn deliver<'a>(
        &self,
        tracker: &mut SessionTracker,
        map: &RoomMap,
        payloads: impl IntoIterator<Item = &'a [u8]>,
    ) {
        self.deliver_at(now_ns(), tracker, map, payloads);
    }

    /// [`Recorder::deliver`] with an explicit receive time (tests).
    pub fn deliver_at<'a>(
        &self,
        recv_ns: u64,
        tracker: &mut SessionTracker,
        map: &RoomMap,
        payloads: impl IntoIterator<Item = &'a [u8]>,
    ) {
        let from = self.from_ns.load(Ordering::Relaxed);
        let to = self.to_ns.load(Ordering::Relaxed);
        let recv_in_window = (from..=to).contains(&recv_ns);
        let (mut new, mut in_window, mut dup, mut stale, mut foreign) = (0, 0, 0, 0, 0);
        let mut hist = None;
        for p in payloads {
            let ids = match payload::decode_ids(p) {
                Ok(s) => s,
                Err(_) => {
                    foreign += 1;
                    continue;
                }
            };
            match tracker.observe(ids, map) {
                Seen::New => {
                    new += 1;
                    if recv_in_window {
                        in_window += 1;
                    }
                    if ids.seq % self.latency_every != 0 {
                        continue;
                    }
                    let Ok(sent_ns) = payload::sent_ns(p) else {
                        foreign += 1;
                        continue;
                    };
                    let h = hist
                        .get_or_insert_with(|| self.hist.lock().unwrap_or_else(|p| p.into_inner()));
                    h.interval.record(sent_ns, recv_ns);
                    if (from..=to).contains(&sent_ns) {
                        h.window.record(sent_ns, recv_ns);
                    }
                }
                Seen::Duplicate => dup += 1,
                Seen::Stale => stale += 1,
                Seen::Foreign => foreign += 1,
            }
        }
        drop(hist);
        let c = &self.counters;
        bump(&c.frames, 1);
        bump(&c.deliveries, new);
        bump(&c.window_deliveries, in_window);
        bump(&c.duplicates, dup);
        bump(&c.stale, stale);
        bump(&c.foreign, foreign);
    }

    /// Current counters; the interval histogram starts over.
    pub fn snapshot(&self) -> Snapshot {
        let (interval_count, interval_p99_us, interval_max_us) = {
            let mut h = self.hist.lock().unwrap_or_else(|p| p.into_inner());
            let s = h.interval.summary();
            h.interval.reset();
            (s.count, s.p99_us, s.max_us)
        };
        let c = &self.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Snapshot {
            planned: g(&c.planned),
            attempted: g(&c.attempted),
            signed_in: g(&c.signed_in),
            connect_failed: g(&c.connect_failed),
            sign_in_failed: g(&c.sign_in_failed),
            disconnected: g(&c.disconnected),
            deliveries: g(&c.deliveries),
            frames: g(&c.frames),
            window_deliveries: g(&c.window_deliveries),
            duplicates: g(&c.duplicates),
            stale: g(&c.stale),
            foreign: g(&c.foreign),
            server_errors: g(&c.server_errors),
            interval_count,
            interval_p99_us,
            interval_max_us,
            rss_kib: crate::procfs::self_rss_kib().unwrap_or(0),
        }
    }

    /// The measurement-window latency histogram so far.
    pub fn window_latency(&self) -> Latency {
        self.hist
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .window
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::{Stamp, encode_vec};
    use crate::rooms::RoomDist;

    #[test]
    fn deliveries_latency_window_and_duplicates() {
        let map = RoomMap::new(1, 1, 2, RoomDist::Single).unwrap();
        let rec = Recorder::default();
        let mut t = SessionTracker::new(0, &map);
        let msg = |publisher, seq, sent_ns| {
            encode_vec(
                Stamp {
                    sent_ns,
                    publisher,
                    seq,
                },
                40,
            )
        };
        let base = 1_000_000_000_000u64;
        // Before the window is set: counted, but no window latency.
        let a = msg(0, 0, base);
        rec.deliver_at(base + 1_000_000, &mut t, &map, [a.as_slice()]);
        rec.set_window(base + 10_000_000, base + 20_000_000);
        // In the window: sent at +10 ms, received 2 ms and 5 ms later; one
        // duplicate; one foreign; one from an unknown publisher.
        let b = msg(0, 1, base + 10_000_000);
        let c = msg(1, 0, base + 10_000_000);
        let unknown = msg(7, 0, base + 10_000_000);
        rec.deliver_at(
            base + 12_000_000,
            &mut t,
            &map,
            [b.as_slice(), b.as_slice(), b"hello".as_slice()],
        );
        rec.deliver_at(
            base + 15_000_000,
            &mut t,
            &map,
            [c.as_slice(), unknown.as_slice()],
        );
        // Sent after the window: counted, received outside the window, no latency.
        let d = msg(0, 2, base + 30_000_000);
        rec.deliver_at(base + 31_000_000, &mut t, &map, [d.as_slice()]);

        let s = rec.snapshot();
        assert_eq!(s.deliveries, 4);
        assert_eq!(s.frames, 4);
        assert_eq!(s.window_deliveries, 2);
        assert_eq!(s.duplicates, 1);
        assert_eq!(s.foreign, 2);
        assert_eq!(s.interval_count, 4);
        let w = rec.window_latency().summary();
        assert_eq!(w.count, 2);
        assert!((1995..=2005).contains(&w.min_us), "{w:?}");
        assert!((4995..=5005).contains(&w.max_us), "{w:?}");
        // The interval histogram restarts with every snapshot.
        assert_eq!(rec.snapshot().interval_count, 0);
    }

    #[test]
    fn latency_is_sampled_but_every_message_is_counted() {
        let map = RoomMap::new(1, 1, 1, RoomDist::Single).unwrap();
        let rec = Recorder::new(4);
        let mut t = SessionTracker::new(0, &map);
        let base = 1_000_000_000_000u64;
        let msgs: Vec<Vec<u8>> = (0..8)
            .map(|seq| {
                encode_vec(
                    Stamp {
                        sent_ns: base,
                        publisher: 0,
                        seq,
                    },
                    40,
                )
            })
            .collect();
        rec.deliver_at(base + 1000, &mut t, &map, msgs.iter().map(Vec::as_slice));
        rec.deliver_at(base + 1000, &mut t, &map, [msgs[3].as_slice()]);
        let s = rec.snapshot();
        assert_eq!((s.deliveries, s.duplicates), (8, 1));
        assert_eq!(s.interval_count, 2, "sequences 0 and 4");
    }

    #[test]
    fn snapshots_add_up() {
        let mut a = Snapshot {
            signed_in: 5,
            disconnected: 1,
            interval_p99_us: 10,
            ..Snapshot::default()
        };
        let b = Snapshot {
            signed_in: 3,
            interval_p99_us: 30,
            deliveries: 9,
            ..Snapshot::default()
        };
        a.add(&b);
        assert_eq!(
            (a.signed_in, a.live(), a.deliveries, a.interval_p99_us),
            (8, 7, 9, 30)
        );
    }
}

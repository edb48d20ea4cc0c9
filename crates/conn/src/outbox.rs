//! A session's outbound queue: bounded, never blocking the pusher, and
//! costing nothing while empty (an idle session's queue holds no buffer —
//! a tokio mpsc channel keeps a block of slots allocated for its lifetime).
//! One consumer, the session's writer task.
//!
//! "Too slow" is judged by what a burst cannot fake: the bytes waiting
//! (`ws.send_queue_bytes`) and how long the oldest frame has waited
//! (`ws.slow_after`), not by a count of frames — a healthy session that
//! is handed a thousand frames at once drains them in a few writes (the
//! writer takes up to 64 queued frames per vectored write), and must not
//! be cut for having received them together.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chatroom_common::metrics::Histogram;
use tokio::sync::Notify;

use crate::room::Outbound;

/// Why a frame was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum PushError {
    /// The bytes waiting are at the bound.
    Full,
    /// The oldest queued frame has waited longer than the bound.
    Stale,
    /// The session is ending.
    Closed,
}

/// How much a session may have waiting.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes of pushed frames waiting (answers may use twice this).
    pub bytes: u32,
    /// Longest a queued push may wait before the session counts as slow.
    pub slow_after_ms: u32,
}

impl Limits {
    pub fn new(bytes: usize, slow_after: Duration) -> Limits {
        Limits {
            bytes: u32::try_from(bytes).unwrap_or(u32::MAX),
            slow_after_ms: u32::try_from(slow_after.as_millis()).unwrap_or(u32::MAX),
        }
    }
}

#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<(Instant, Outbound)>,
    /// Sum of the queued frames' costs.
    bytes: usize,
}

#[derive(Debug)]
pub struct Outbox {
    queue: Mutex<Queue>,
    ready: Notify,
    closed: AtomicBool,
    limits: Limits,
    /// Where the queue's depth after each push is observed (the node's
    /// histogram; a shared handle, no lock).
    depth: Option<Histogram>,
}

/// Past this many queued frames a drained queue gives its buffer back.
const KEEP: usize = 8;
/// What a queued frame costs besides its payload (header, slot), so that
/// empty frames are bounded too.
const FRAME_COST: usize = 16;

/// Bytes a frame puts on the session's wire, roughly.
fn cost(o: &Outbound) -> usize {
    FRAME_COST
        + match o {
            Outbound::Frame(b) | Outbound::Text(b) | Outbound::Pong(b) => b.len(),
            Outbound::Chat(items) => items.iter().map(|f| f.proto.len().max(f.json.len())).sum(),
            Outbound::Ping | Outbound::Close(..) | Outbound::Subscribe(_) => 0,
        }
}

impl Outbox {
    pub fn new(limits: Limits) -> Self {
        Outbox {
            queue: Mutex::new(Queue::default()),
            ready: Notify::new(),
            closed: AtomicBool::new(false),
            limits,
            depth: None,
        }
    }

    /// An outbox whose depth after each push goes to `depth`.
    pub fn with_depth(limits: Limits, depth: Histogram) -> Self {
        Outbox {
            depth: Some(depth),
            ..Outbox::new(limits)
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `o` unless `bound` bytes are waiting (a frame on an empty
    /// queue always fits, however big) or, for pushes (`age`), the oldest
    /// waiting frame is older than the limit.
    fn push_within(
        &self,
        o: Outbound,
        now: Instant,
        bound: usize,
        age: bool,
    ) -> Result<(), PushError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(PushError::Closed);
        }
        let c = cost(&o);
        {
            let mut q = self.lock();
            if let Some((oldest, _)) = q.items.front() {
                if q.bytes + c > bound {
                    return Err(PushError::Full);
                }
                if age
                    && now.saturating_duration_since(*oldest)
                        > Duration::from_millis(u64::from(self.limits.slow_after_ms))
                {
                    return Err(PushError::Stale);
                }
            }
            q.items.push_back((now, o));
            q.bytes += c;
            if let Some(h) = &self.depth {
                h.observe(q.items.len() as u64);
            }
        }
        self.ready.notify_one();
        Ok(())
    }

    /// A push to this session, at `now` (one clock read per push, shared by
    /// every session it goes to): refused when `ws.send_queue_bytes` are
    /// waiting or the oldest waiting frame is older than `ws.slow_after`.
    pub fn try_push(&self, o: Outbound, now: Instant) -> Result<(), PushError> {
        self.push_within(o, now, self.limits.bytes as usize, true)
    }

    /// An answer to the client's own request. Answers may go past the push
    /// bound (they must not be lost to a burst of pushes) but not without
    /// limit: a client that sends and never reads is refused at twice it.
    pub fn reply(&self, o: Outbound) -> Result<(), PushError> {
        self.push_within(o, Instant::now(), self.limits.bytes as usize * 2, false)
    }

    /// No more frames are accepted; the writer drains what is queued.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.ready.notify_one();
    }

    /// Frames waiting now.
    pub fn len(&self) -> usize {
        self.lock().items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes the next queued frame without waiting (tests).
    #[cfg(test)]
    pub fn try_take(&self) -> Option<Outbound> {
        let mut q = self.lock();
        let (_, o) = q.items.pop_front()?;
        q.bytes -= cost(&o);
        Some(o)
    }

    /// Moves up to `max` queued frames into `out` without waiting. False
    /// once closed and drained: nothing more will come.
    pub fn take_ready(&self, out: &mut Vec<Outbound>, max: usize) -> bool {
        let mut q = self.lock();
        if q.items.is_empty() {
            return !self.closed.load(Ordering::Acquire);
        }
        let n = q.items.len().min(max);
        let mut taken = 0;
        out.extend(q.items.drain(..n).map(|(_, o)| {
            taken += cost(&o);
            o
        }));
        q.bytes -= taken;
        if q.items.is_empty() && q.items.capacity() > KEEP {
            q.items = VecDeque::new();
        }
        true
    }

    /// Waits until a frame is queued or the outbox is closed.
    pub async fn readable(&self) {
        loop {
            let notified = self.ready.notified();
            if !self.lock().items.is_empty() || self.closed.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    /// Moves up to `max` queued frames into `out`, waiting for one if none
    /// is queued. False once closed and drained. (The writer takes what is
    /// ready and waits on [`Outbox::readable`] beside the room's stream.)
    #[cfg(test)]
    pub async fn take(&self, out: &mut Vec<Outbound>, max: usize) -> bool {
        loop {
            self.readable().await;
            let before = out.len();
            let open = self.take_ready(out, max);
            if out.len() > before || !open {
                return out.len() > before || open;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn f() -> Outbound {
        Outbound::Frame(Bytes::from_static(b"x"))
    }

    /// Room for `n` frames like [`f`].
    fn frames(n: usize) -> Limits {
        Limits::new(n * (FRAME_COST + 1), Duration::from_secs(5))
    }

    fn now() -> Instant {
        Instant::now()
    }

    #[tokio::test]
    async fn bounded_replies_get_headroom_and_close_drains() {
        let o = Outbox::new(frames(2));
        assert_eq!(o.try_push(f(), now()), Ok(()));
        assert_eq!(o.try_push(f(), now()), Ok(()));
        assert_eq!(o.try_push(f(), now()), Err(PushError::Full));
        assert_eq!(o.reply(f()), Ok(()));
        assert_eq!(o.reply(f()), Ok(()));
        assert_eq!(o.reply(f()), Err(PushError::Full));
        let mut out = vec![];
        assert!(o.take(&mut out, 3).await);
        assert_eq!((out.len(), o.len()), (3, 1));
        o.close();
        assert_eq!(o.try_push(f(), now()), Err(PushError::Closed));
        out.clear();
        assert!(
            o.take(&mut out, 10).await,
            "what was queued before close still goes out"
        );
        assert_eq!(out.len(), 1);
        assert!(!o.take(&mut out, 10).await);
        assert_eq!(o.lock().bytes, 0, "every cost given back");
    }

    #[test]
    fn a_burst_fits_by_bytes_and_only_waiting_too_long_is_slow() {
        let o = Outbox::new(Limits::new(64 * 1024, Duration::from_secs(5)));
        let t0 = Instant::now();
        // A thousand small frames at once: a burst, not a slow session.
        for _ in 0..1000 {
            assert_eq!(o.try_push(f(), t0), Ok(()));
        }
        assert_eq!(o.len(), 1000);
        // The same session, its oldest frame 6 s old: now it is slow.
        let later = t0 + Duration::from_secs(6);
        assert_eq!(o.try_push(f(), later), Err(PushError::Stale));
        // Answers are not judged by age (only by bytes).
        assert_eq!(o.reply(f()), Ok(()));
        // Draining the old frames makes it healthy again.
        let mut out = vec![];
        o.take_ready(&mut out, 2000);
        assert_eq!(o.try_push(f(), later), Ok(()));
    }

    #[test]
    fn one_big_frame_fits_an_empty_queue() {
        let o = Outbox::new(frames(1));
        let big = Outbound::Frame(Bytes::from(vec![0u8; 4096]));
        assert_eq!(o.try_push(big, now()), Ok(()));
        assert_eq!(o.try_push(f(), now()), Err(PushError::Full));
    }

    #[tokio::test]
    async fn take_waits_for_a_push() {
        let o = std::sync::Arc::new(Outbox::new(frames(4)));
        let o2 = o.clone();
        let t = tokio::spawn(async move {
            let mut out = vec![];
            o2.take(&mut out, 4).await;
            out.len()
        });
        tokio::task::yield_now().await;
        o.try_push(f(), now()).unwrap();
        assert_eq!(t.await.unwrap(), 1);
    }

    #[tokio::test]
    async fn a_drained_queue_gives_its_buffer_back() {
        let o = Outbox::new(frames(64));
        for _ in 0..32 {
            o.try_push(f(), now()).unwrap();
        }
        let mut out = vec![];
        o.take(&mut out, 64).await;
        assert_eq!(o.lock().items.capacity(), 0);
    }
}

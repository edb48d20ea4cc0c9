//! A session's outbound queue: bounded, never blocking the pusher, and
//! costing nothing while empty (an idle session's queue holds no buffer —
//! a tokio mpsc channel keeps a block of slots allocated for its lifetime).
//! One consumer, the session's writer task.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use chatroom_common::metrics::Histogram;
use tokio::sync::Notify;

use crate::room::Outbound;

/// Why a frame was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum PushError {
    /// The queue is at its bound.
    Full,
    /// The session is ending.
    Closed,
}

#[derive(Debug)]
pub struct Outbox {
    queue: Mutex<VecDeque<Outbound>>,
    ready: Notify,
    closed: AtomicBool,
    cap: usize,
    /// Where the queue's depth after each push is observed (the node's
    /// histogram; a shared handle, no lock).
    depth: Option<Histogram>,
}

/// Past this many queued frames a drained queue gives its buffer back.
const KEEP: usize = 8;

impl Outbox {
    pub fn new(cap: usize) -> Self {
        Outbox {
            queue: Mutex::new(VecDeque::new()),
            ready: Notify::new(),
            closed: AtomicBool::new(false),
            cap: cap.max(1),
            depth: None,
        }
    }

    /// An outbox whose depth after each push goes to `depth`.
    pub fn with_depth(cap: usize, depth: Histogram) -> Self {
        Outbox {
            depth: Some(depth),
            ..Outbox::new(cap)
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Outbound>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push_within(&self, o: Outbound, bound: usize) -> Result<(), PushError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(PushError::Closed);
        }
        {
            let mut q = self.lock();
            if q.len() >= bound {
                return Err(PushError::Full);
            }
            q.push_back(o);
            if let Some(h) = &self.depth {
                h.observe(q.len() as u64);
            }
        }
        self.ready.notify_one();
        Ok(())
    }

    /// A push to this session: refused when `cap` frames are waiting.
    pub fn try_push(&self, o: Outbound) -> Result<(), PushError> {
        self.push_within(o, self.cap)
    }

    /// An answer to the client's own request. Answers may go past the push
    /// bound (they must not be lost to a burst of pushes) but not without
    /// limit: a client that sends and never reads is refused at twice it.
    pub fn reply(&self, o: Outbound) -> Result<(), PushError> {
        self.push_within(o, self.cap * 2)
    }

    /// No more frames are accepted; the writer drains what is queued.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.ready.notify_one();
    }

    /// Frames waiting now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes the next queued frame without waiting (tests).
    #[cfg(test)]
    pub fn try_take(&self) -> Option<Outbound> {
        self.lock().pop_front()
    }

    /// Moves up to `max` queued frames into `out` without waiting. False
    /// once closed and drained: nothing more will come.
    pub fn take_ready(&self, out: &mut Vec<Outbound>, max: usize) -> bool {
        let mut q = self.lock();
        if q.is_empty() {
            return !self.closed.load(Ordering::Acquire);
        }
        let n = q.len().min(max);
        out.extend(q.drain(..n));
        if q.is_empty() && q.capacity() > KEEP {
            *q = VecDeque::new();
        }
        true
    }

    /// Waits until a frame is queued or the outbox is closed.
    pub async fn readable(&self) {
        loop {
            let notified = self.ready.notified();
            if !self.lock().is_empty() || self.closed.load(Ordering::Acquire) {
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

    #[tokio::test]
    async fn bounded_replies_get_headroom_and_close_drains() {
        let o = Outbox::new(2);
        assert_eq!(o.try_push(f()), Ok(()));
        assert_eq!(o.try_push(f()), Ok(()));
        assert_eq!(o.try_push(f()), Err(PushError::Full));
        assert_eq!(o.reply(f()), Ok(()));
        assert_eq!(o.reply(f()), Ok(()));
        assert_eq!(o.reply(f()), Err(PushError::Full));
        let mut out = vec![];
        assert!(o.take(&mut out, 3).await);
        assert_eq!((out.len(), o.len()), (3, 1));
        o.close();
        assert_eq!(o.try_push(f()), Err(PushError::Closed));
        out.clear();
        assert!(
            o.take(&mut out, 10).await,
            "what was queued before close still goes out"
        );
        assert_eq!(out.len(), 1);
        assert!(!o.take(&mut out, 10).await);
    }

    #[tokio::test]
    async fn take_waits_for_a_push() {
        let o = std::sync::Arc::new(Outbox::new(4));
        let o2 = o.clone();
        let t = tokio::spawn(async move {
            let mut out = vec![];
            o2.take(&mut out, 4).await;
            out.len()
        });
        tokio::task::yield_now().await;
        o.try_push(f()).unwrap();
        assert_eq!(t.await.unwrap(), 1);
    }

    #[tokio::test]
    async fn a_drained_queue_gives_its_buffer_back() {
        let o = Outbox::new(64);
        for _ in 0..32 {
            o.try_push(f()).unwrap();
        }
        let mut out = vec![];
        o.take(&mut out, 64).await;
        assert_eq!(o.lock().capacity(), 0);
    }
}

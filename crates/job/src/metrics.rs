//! Counters of what job did with the messages it consumed, kept as relaxed
//! atomics (no lock on the hot path) and logged at info periodically and at
//! shutdown. They are approximate at any instant and exact once stopped.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::info;

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident ),* $(,)?) => {
        /// Live counters, shared by every job task.
        #[derive(Debug, Default)]
        pub struct Metrics {
            $( $(#[$doc])* pub $name: AtomicU64, )*
        }

        /// A copy of the counters at one moment.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct Snapshot {
            $( $(#[$doc])* pub $name: u64, )*
        }

        impl Metrics {
            pub fn snapshot(&self) -> Snapshot {
                Snapshot { $( $name: self.$name.load(Ordering::Relaxed), )* }
            }
        }

        impl Snapshot {
            fn log(&self, what: &str) {
                info!($( $name = self.$name, )* "{what}");
            }
        }
    };
}

counters! {
    /// Deliveries taken off the queue.
    received,
    /// Deliveries that were not a RoomMsg (or had no room); finished unread.
    undecodable,
    /// Batches flushed by the batcher.
    batches,
    /// Batches a node took (first attempt or retry), bundled or not.
    pushes_ok,
    /// Batch pushes that failed (every attempt counts).
    push_failures,
    /// `PushRooms` calls: several room batches to one node in one call.
    bundles,
    /// Retry attempts of IMPORTANT batches.
    retries,
    /// Sessions conn nodes say got a frame (`PushRoomReply.delivered`).
    sessions_delivered,
    /// Sessions conn nodes say missed a frame (`PushRoomReply.dropped`).
    sessions_dropped,
    /// NORMAL batches one node missed (failed push or full node queue).
    dropped_normal,
    /// IMPORTANT batches one node missed (retries exhausted or full queue).
    dropped_important,
    /// Batches refused by a full node queue (also in `dropped_*`).
    overflow,
    /// Messages acknowledged (FIN).
    finished,
    /// Messages put back on the queue (REQ).
    requeued,
    /// Messages finished because no conn node was known (no listeners).
    no_nodes,
}

/// Adds one to a counter.
pub fn inc(c: &AtomicU64) {
    add(c, 1);
}

pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Snapshot {
    /// Logs the totals (used once, when job stops).
    pub fn log_totals(&self) {
        self.log("job totals");
    }
}

/// Logs the counters every `every` while they change, until `shutdown`.
pub async fn report_periodically(
    metrics: Arc<Metrics>,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut last = Snapshot::default();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = metrics.snapshot();
        // An idle job stays quiet.
        if now != last {
            now.log("job counters");
            last = now;
        }
    }
}

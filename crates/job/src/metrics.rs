//! Counters of what job did with the messages it consumed, kept as relaxed
//! atomics (no lock on the hot path) and logged at info periodically and at
//! shutdown. They are approximate at any instant and exact once stopped.
//! [`Metrics::registry`] exports them to Prometheus (`chatroom_job_*`,
//! labelled with the node id), read at scrape time.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use chatroom_common::metrics::{
    Collector, DescriptorEncoder, DynLabels, Histogram, HistogramFamily, Registry, encode_counter,
    encode_counter_family, encode_gauge, encode_histogram, latency_family,
};

use tokio_util::sync::CancellationToken;
use tracing::info;

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident ),* $(,)?) => {
        /// Live counters, shared by every job task.
        #[derive(Debug, Default)]
        pub struct Metrics {
            $( $(#[$doc])* pub $name: AtomicU64, )*
            /// Histograms and gauges (not in the logged snapshot).
            pub extra: Extra,
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

/// What job measures beyond the counters.
#[derive(Debug)]
pub struct Extra {
    /// Messages per flushed room batch.
    pub batch_messages: Histogram,
    /// Conn nodes job pushes to now.
    pub nodes: AtomicI64,
    /// Push call latency (`PushRoom` / `PushRooms`), per conn node.
    pub push_latency: HistogramFamily<DynLabels>,
}

impl Default for Extra {
    fn default() -> Self {
        Extra {
            batch_messages: Histogram::counts(),
            nodes: AtomicI64::new(0),
            push_latency: latency_family(),
        }
    }
}

impl Metrics {
    /// The push latency histogram of one conn node: take it once per node
    /// worker and call `observe_duration` per push (no lookup per push).
    pub fn node_push_latency(&self, node: &str) -> Histogram {
        self.extra
            .push_latency
            .get_or_create_owned(&vec![("conn_node", node.to_string())])
    }

    /// A registry exporting these metrics as `chatroom_job_*{node}`.
    pub fn registry(self: &Arc<Self>, node: &str) -> Registry {
        let mut r = Registry::with_prefix_and_labels(
            "chatroom_job",
            [(
                std::borrow::Cow::Borrowed("node"),
                std::borrow::Cow::Owned(node.to_string()),
            )]
            .into_iter(),
        );
        r.register(
            "push_seconds",
            "Latency of push calls to a conn node",
            self.extra.push_latency.clone(),
        );
        r.register_collector(Box::new(JobCollector(self.clone())));
        r
    }
}

#[derive(Debug)]
struct JobCollector(Arc<Metrics>);

impl Collector for JobCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = self.0.snapshot();
        encode_counter(
            &mut e,
            "messages_consumed",
            "Messages taken off the queue",
            m.received,
        )?;
        encode_counter(
            &mut e,
            "undecodable",
            "Queue messages that could not be read (finished unread)",
            m.undecodable,
        )?;
        encode_counter(&mut e, "batches", "Batches flushed", m.batches)?;
        encode_histogram(
            &mut e,
            "batch_messages",
            "Messages per flushed room batch",
            &self.0.extra.batch_messages,
        )?;
        encode_counter(&mut e, "pushes", "Batches a conn node took", m.pushes_ok)?;
        encode_counter(
            &mut e,
            "push_failures",
            "Batch pushes that failed (every attempt)",
            m.push_failures,
        )?;
        encode_counter(
            &mut e,
            "bundles",
            "PushRooms calls (several batches)",
            m.bundles,
        )?;
        encode_counter(&mut e, "retries", "Retries of IMPORTANT batches", m.retries)?;
        encode_counter(
            &mut e,
            "sessions_delivered",
            "Sessions conn nodes say got a frame",
            m.sessions_delivered,
        )?;
        encode_counter(
            &mut e,
            "sessions_dropped",
            "Sessions conn nodes say missed a frame",
            m.sessions_dropped,
        )?;
        encode_counter_family(
            &mut e,
            "dropped",
            "Batches a conn node missed, by level",
            "level",
            &[
                ("normal", m.dropped_normal),
                ("important", m.dropped_important),
            ],
        )?;
        encode_counter(
            &mut e,
            "node_queue_overflow",
            "Batches refused by a full node queue",
            m.overflow,
        )?;
        encode_counter_family(
            &mut e,
            "acks",
            "Queue acknowledgements, by kind (fin, req)",
            "kind",
            &[("fin", m.finished), ("req", m.requeued)],
        )?;
        encode_counter(
            &mut e,
            "no_nodes",
            "Messages finished with no conn node known",
            m.no_nodes,
        )?;
        encode_gauge(
            &mut e,
            "conn_nodes",
            "Conn nodes pushed to",
            self.0.extra.nodes.load(Ordering::Relaxed),
        )?;
        Ok(())
    }
}

//! The queue between logic (publisher) and job (subscriber): NSQ in a
//! cluster, an in-process bounded queue standalone. Either way a message is
//! acknowledged (`finish`) only after job has pushed it, and can be put back
//! (`requeue`) when the push failed.
//!
//! Its own crate, so that conn, which never touches the queue, does not
//! compile the NSQ client.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use chatroom_nsq as nsq;
/// The NSQ client's error, inside [`QueueError::Nsq`].
pub use chatroom_nsq::NsqError;

pub mod config;
pub mod metrics;

pub use config::QueueConfig;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue is full")]
    Full,
    #[error("queue is closed")]
    Closed,
    #[error("nsq: {0}")]
    Nsq(#[from] nsq::NsqError),
    /// At start-up: names the configured addresses.
    #[error("queue.nsqd_tcp_addresses = {addresses}: cannot connect")]
    Connect {
        addresses: String,
        #[source]
        source: nsq::NsqError,
    },
    #[error("a memory queue needs the shared in-process queue (standalone only)")]
    NoMemoryQueue,
}

/// In-process queue shared by logic and job in one process.
#[derive(Clone)]
pub struct MemoryQueue {
    tx: mpsc::Sender<(Bytes, u16)>,
    rx: Arc<Mutex<mpsc::Receiver<(Bytes, u16)>>>,
}

impl MemoryQueue {
    pub fn new(capacity: usize) -> Self {
        let (tx, rx) = mpsc::channel(capacity);
        MemoryQueue {
            tx,
            rx: Arc::new(Mutex::new(rx)),
        }
    }

    /// Messages waiting to be consumed.
    pub fn depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

/// Where logic publishes.
#[derive(Clone)]
pub enum Publisher {
    Memory(MemoryQueue),
    Nsq {
        producer: nsq::Producer,
        topic: String,
    },
}

impl Publisher {
    pub async fn connect(
        cfg: &QueueConfig,
        memory: Option<&MemoryQueue>,
    ) -> Result<Self, QueueError> {
        metrics::init();
        match cfg {
            QueueConfig::Memory { .. } => memory
                .cloned()
                .map(Publisher::Memory)
                .ok_or(QueueError::NoMemoryQueue),
            QueueConfig::Nsq {
                topic,
                nsqd_tcp_addresses,
                ..
            } => {
                let producer =
                    nsq::Producer::connect(nsqd_tcp_addresses)
                        .await
                        .map_err(|source| QueueError::Connect {
                            addresses: nsqd_tcp_addresses.join(","),
                            source,
                        })?;
                Ok(Publisher::Nsq {
                    producer,
                    topic: topic.clone(),
                })
            }
        }
    }

    /// Hands one message to the queue; `Ok` means the queue has it.
    pub async fn publish(&self, body: Bytes) -> Result<(), QueueError> {
        let m = &*crate::metrics::QUEUE;
        let started = std::time::Instant::now();
        let r = self.publish_inner(body).await;
        m.publish_latency.observe_duration(started.elapsed());
        match &r {
            Ok(()) => m.published.inc(),
            Err(_) => m.publish_errors.inc(),
        };
        r
    }

    async fn publish_inner(&self, body: Bytes) -> Result<(), QueueError> {
        match self {
            Publisher::Memory(q) => q.tx.try_send((body, 1)).map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => QueueError::Full,
                mpsc::error::TrySendError::Closed(_) => QueueError::Closed,
            }),
            Publisher::Nsq { producer, topic } => Ok(producer.publish(topic, body).await?),
        }
    }

    /// Hands several messages to the queue at once, in order: all of them
    /// or none (one MPUB; the memory queue reserves every slot first).
    pub async fn publish_many(&self, bodies: &[Bytes]) -> Result<(), QueueError> {
        let m = &*crate::metrics::QUEUE;
        let started = std::time::Instant::now();
        let r = self.publish_many_inner(bodies).await;
        m.publish_latency.observe_duration(started.elapsed());
        match &r {
            Ok(()) => m.published.inc_by(bodies.len() as u64),
            Err(_) => m.publish_errors.inc(),
        };
        r
    }

    async fn publish_many_inner(&self, bodies: &[Bytes]) -> Result<(), QueueError> {
        match self {
            Publisher::Memory(q) => {
                let permits = q.tx.try_reserve_many(bodies.len()).map_err(|e| match e {
                    mpsc::error::TrySendError::Full(_) => QueueError::Full,
                    mpsc::error::TrySendError::Closed(_) => QueueError::Closed,
                })?;
                for (permit, body) in permits.zip(bodies) {
                    permit.send((body.clone(), 1));
                }
                Ok(())
            }
            Publisher::Nsq { producer, topic } if bodies.len() == 1 => {
                Ok(producer.publish(topic, bodies[0].clone()).await?)
            }
            Publisher::Nsq { producer, topic } => Ok(producer.multi_publish(topic, bodies).await?),
        }
    }

    /// Whether publishing can work now (readiness): the memory queue is
    /// open, or an nsqd connection of this process's producer is up.
    pub fn connected(&self) -> bool {
        match self {
            Publisher::Memory(q) => !q.tx.is_closed(),
            Publisher::Nsq { .. } => crate::metrics::NSQ.producer_connections.get() > 0,
        }
    }

    pub async fn close(&self) {
        if let Publisher::Nsq { producer, .. } = self {
            producer.close().await;
        }
    }
}

/// Whether a subscriber started from `cfg` can receive now (readiness): an
/// nsqd connection is up, or nsqlookupd answers (it lists no nsqd until the
/// topic has been published to once, and the consumer connects then).
pub fn subscriber_ready(cfg: &QueueConfig) -> bool {
    match cfg {
        QueueConfig::Memory { .. } => true,
        QueueConfig::Nsq {
            lookupd_http_addresses,
            ..
        } => {
            let m = &*crate::metrics::NSQ;
            m.consumer_connections.get() > 0
                || (lookupd_http_addresses.iter().any(|a| !a.trim().is_empty())
                    && m.lookupd_up.get() > 0)
        }
    }
}

/// Where job consumes.
pub enum Subscriber {
    Memory {
        queue: MemoryQueue,
        shutdown: CancellationToken,
    },
    Nsq(nsq::Consumer),
}

impl Subscriber {
    /// Starts consuming. After `shutdown`, [`Subscriber::next`] still hands
    /// out what was already received, then returns `None`.
    pub fn start(
        cfg: &QueueConfig,
        memory: Option<&MemoryQueue>,
        client_id: &str,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<Self, QueueError> {
        metrics::init();
        match cfg {
            QueueConfig::Memory { .. } => Ok(Subscriber::Memory {
                queue: memory.cloned().ok_or(QueueError::NoMemoryQueue)?,
                shutdown,
            }),
            QueueConfig::Nsq {
                topic,
                channel,
                nsqd_tcp_addresses,
                lookupd_http_addresses,
                max_in_flight,
                lookupd_poll_interval,
            } => {
                let cfg = nsq::ConsumerConfig {
                    topic: topic.clone(),
                    channel: channel.clone(),
                    nsqd_tcp_addresses: nsqd_tcp_addresses.clone(),
                    lookupd_http_addresses: lookupd_http_addresses.clone(),
                    max_in_flight: *max_in_flight,
                    lookupd_poll_interval: *lookupd_poll_interval,
                    client_id: client_id.to_string(),
                    ..nsq::ConsumerConfig::default()
                };
                Ok(Subscriber::Nsq(nsq::Consumer::start(
                    cfg, tracker, shutdown,
                )))
            }
        }
    }

    /// The next message, or `None` once shut down and drained.
    pub async fn next(&mut self) -> Option<Delivery> {
        match self {
            Subscriber::Memory { queue, shutdown } => {
                let mut rx = queue.rx.lock().await;
                let got = if shutdown.is_cancelled() {
                    rx.try_recv().ok()
                } else {
                    tokio::select! {
                        m = rx.recv() => m,
                        _ = shutdown.cancelled() => rx.try_recv().ok(),
                    }
                };
                got.map(|(body, attempts)| Delivery {
                    body,
                    attempts,
                    ack: Ack::Memory(queue.tx.clone()),
                })
            }
            Subscriber::Nsq(c) => c.next().await.map(|m| Delivery {
                body: m.body.clone(),
                attempts: m.attempts,
                ack: Ack::Nsq(m),
            }),
        }
    }
}

enum Ack {
    Memory(mpsc::Sender<(Bytes, u16)>),
    Nsq(nsq::Message),
}

/// One consumed message; call exactly one of `finish` or `requeue`.
pub struct Delivery {
    pub body: Bytes,
    /// 1 on first delivery.
    pub attempts: u16,
    ack: Ack,
}

impl Delivery {
    /// Done: the queue forgets it.
    pub fn finish(self) {
        if let Ack::Nsq(m) = self.ack {
            m.finish();
        }
    }

    /// Deliver again after `delay`.
    pub fn requeue(self, delay: Duration) {
        match self.ack {
            Ack::Nsq(m) => m.requeue(delay),
            Ack::Memory(tx) => {
                let item = (self.body, self.attempts.saturating_add(1));
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    if tx.send(item).await.is_err() {
                        tracing::warn!("memory queue closed; requeued message lost");
                    }
                });
            }
        }
    }

    /// Still working on it: reset the server's timeout.
    pub fn touch(&self) {
        if let Ack::Nsq(m) = &self.ack {
            m.touch();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_round_trip_requeue_and_drain() {
        let q = MemoryQueue::new(4);
        let cfg = QueueConfig::Memory { capacity: 4 };
        let tracker = TaskTracker::new();
        let stop = CancellationToken::new();
        let p = Publisher::connect(&cfg, Some(&q)).await.unwrap();
        let mut s = Subscriber::start(&cfg, Some(&q), "t", &tracker, stop.clone()).unwrap();
        p.publish(Bytes::from_static(b"a")).await.unwrap();
        let d = s.next().await.unwrap();
        assert_eq!((&d.body[..], d.attempts), (&b"a"[..], 1));
        d.requeue(Duration::ZERO);
        let d = s.next().await.unwrap();
        assert_eq!((&d.body[..], d.attempts), (&b"a"[..], 2));
        d.finish();
        for _ in 0..4 {
            p.publish(Bytes::from_static(b"x")).await.unwrap();
        }
        assert!(matches!(
            p.publish(Bytes::from_static(b"y")).await,
            Err(QueueError::Full)
        ));
        // After shutdown the backlog is still handed out, then None.
        stop.cancel();
        for _ in 0..4 {
            s.next().await.unwrap().finish();
        }
        assert!(s.next().await.is_none());
    }
}

//! Publishing (PUB/MPUB) over one pipelined nsqd connection.
//!
//! Callers never wait for each other: a single connection task writes
//! requests as they come and keeps a FIFO of responders, because nsqd
//! answers PUB/MPUB strictly in order. When the connection is lost the task
//! fails over to the next address and reconnects with backoff; meanwhile
//! publishes fail fast instead of queueing behind an outage.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::conn::{self, Conn, FrameReader, Identity};
use super::frame::{self, Command, Frame};
use super::{NsqError, valid_name};
use chatroom_backoff::Backoff;

/// Longest a `publish` may take end to end (queueing, write, answer).
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `close` waits for answers to publishes already written.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(30);
/// Requests waiting for the connection task; beyond this callers wait
/// (bounded by [`PUBLISH_TIMEOUT`]).
const REQUEST_QUEUE: usize = 4096;
/// Coalesce queued requests into one write up to about this many bytes.
const WRITE_BATCH: usize = 256 * 1024;
/// A session shorter than this counts as a failure for backoff purposes, so
/// an nsqd that accepts and immediately drops us is not hammered.
const STABLE_SESSION: Duration = Duration::from_secs(1);

type Reply = oneshot::Sender<Result<(), NsqError>>;

struct Request {
    wire: Bytes,
    reply: Reply,
}

/// Publishes to nsqd. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct Producer {
    inner: Arc<Inner>,
}

struct Inner {
    tx: mpsc::Sender<Request>,
    stop: CancellationToken,
    /// Cancelled by the connection task once it has finished.
    done: CancellationToken,
}

impl Producer {
    /// Connects to the first reachable address; later failures fail over to
    /// the others in turn. Fails with [`NsqError::NoServer`] when none is
    /// reachable now.
    pub async fn connect(nsqd_tcp_addresses: &[String]) -> Result<Producer, NsqError> {
        let addrs = conn::clean_addresses(nsqd_tcp_addresses);
        let host = conn::hostname("chatroom");
        let who = Identity {
            client_id: host.clone(),
            hostname: host,
            heartbeat_interval: HEARTBEAT_INTERVAL,
            msg_timeout: None,
        };
        let mut first = None;
        for (i, a) in addrs.iter().enumerate() {
            match conn::connect(a, &who).await {
                Ok(c) => {
                    first = Some((i, c));
                    break;
                }
                Err(e) => {
                    tracing::warn!(addr = %a, error = %e, "nsqd unreachable; trying the next")
                }
            }
        }
        let (idx, c) = first.ok_or(NsqError::NoServer)?;
        let (tx, rx) = mpsc::channel(REQUEST_QUEUE);
        let stop = CancellationToken::new();
        let done = CancellationToken::new();
        let task = Task {
            addrs,
            who,
            rx,
            stop: stop.clone(),
        };
        let done2 = done.clone();
        tokio::spawn(async move {
            task.run(idx, c).await;
            done2.cancel();
        });
        Ok(Producer {
            inner: Arc::new(Inner { tx, stop, done }),
        })
    }

    /// Publishes one message; `Ok` once nsqd has acknowledged it.
    pub async fn publish(&self, topic: &str, body: Bytes) -> Result<(), NsqError> {
        check_topic(topic)?;
        let mut wire = BytesMut::with_capacity(16 + topic.len() + body.len());
        Command::Pub { topic, body: &body }
            .encode(&mut wire)
            .map_err(conn::proto)?;
        self.request(wire.freeze()).await
    }

    /// Publishes several messages atomically (one MPUB); empty is a no-op.
    pub async fn multi_publish(&self, topic: &str, bodies: &[Bytes]) -> Result<(), NsqError> {
        check_topic(topic)?;
        if bodies.is_empty() {
            return Ok(());
        }
        let mut wire = BytesMut::new();
        Command::Mpub { topic, bodies }
            .encode(&mut wire)
            .map_err(conn::proto)?;
        self.request(wire.freeze()).await
    }

    /// Stops publishing: waits briefly for answers to what was already sent,
    /// then closes the connection. Later publishes fail with `Closed`.
    pub async fn close(&self) {
        self.inner.stop.cancel();
        if tokio::time::timeout(
            CLOSE_TIMEOUT + Duration::from_secs(1),
            self.inner.done.cancelled(),
        )
        .await
        .is_err()
        {
            tracing::warn!("nsq producer did not close in time");
        }
    }

    async fn request(&self, wire: Bytes) -> Result<(), NsqError> {
        if self.inner.stop.is_cancelled() {
            return Err(NsqError::Closed);
        }
        let (reply, answer) = oneshot::channel();
        let exchange = async {
            self.inner
                .tx
                .send(Request { wire, reply })
                .await
                .map_err(|_| NsqError::Closed)?;
            answer.await.map_err(|_| NsqError::Disconnected)?
        };
        tokio::time::timeout(PUBLISH_TIMEOUT, exchange)
            .await
            .map_err(|_| NsqError::Timeout)?
    }
}

/// Catching a bad name here keeps it from costing every other in-flight
/// publish its connection (nsqd treats E_BAD_TOPIC as fatal).
fn check_topic(topic: &str) -> Result<(), NsqError> {
    if valid_name(topic) {
        Ok(())
    } else {
        Err(NsqError::Protocol(format!("invalid topic name {topic:?}")))
    }
}

/// The connection-owning task behind every clone of a [`Producer`].
struct Task {
    addrs: Vec<String>,
    who: Identity,
    rx: mpsc::Receiver<Request>,
    stop: CancellationToken,
}

enum End {
    /// Closed on purpose (`close`, or every `Producer` dropped).
    Stopped,
    Lost(NsqError),
}

impl Task {
    async fn run(mut self, mut idx: usize, first: Conn) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut conn = Some(first);
        loop {
            if let Some(c) = conn.take() {
                let addr = self.addrs[idx].clone();
                tracing::info!(addr = %addr, "nsq producer connected");
                let started = Instant::now();
                crate::metrics::NSQ.producer_connections.inc();
                let end = self.serve(c).await;
                crate::metrics::NSQ.producer_connections.dec();
                match end {
                    End::Stopped => {
                        tracing::info!(addr = %addr, "nsq producer closed");
                        return;
                    }
                    End::Lost(e) => {
                        tracing::warn!(addr = %addr, error = %e, "nsq producer connection lost")
                    }
                }
                if started.elapsed() >= STABLE_SESSION {
                    backoff.reset();
                } else if self
                    .fail_while(tokio::time::sleep(backoff.next_delay()))
                    .await
                    .is_none()
                {
                    return;
                }
            }
            // Try each address once, starting after the one that failed;
            // requests wait in the queue meanwhile (bounded by their timeout).
            for k in 1..=self.addrs.len() {
                let i = (idx + k) % self.addrs.len();
                crate::metrics::NSQ.producer_reconnects.inc();
                let attempt = tokio::select! {
                    r = conn::connect(&self.addrs[i], &self.who) => r,
                    _ = self.stop.cancelled() => return,
                };
                match attempt {
                    Ok(c) => {
                        idx = i;
                        conn = Some(c);
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(addr = %self.addrs[i], error = %e, "nsqd unreachable")
                    }
                }
            }
            if conn.is_none()
                && self
                    .fail_while(tokio::time::sleep(backoff.next_delay()))
                    .await
                    .is_none()
            {
                return;
            }
        }
    }

    /// Runs `fut` while answering every request with `NoServer`, so callers
    /// learn about an outage at once. `None` when the producer was stopped.
    async fn fail_while<F: Future>(&mut self, fut: F) -> Option<F::Output> {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => return None,
                out = &mut fut => return Some(out),
                r = self.rx.recv() => match r {
                    Some(req) => { let _ = req.reply.send(Err(NsqError::NoServer)); }
                    None => return None,
                },
            }
        }
    }

    async fn serve(&mut self, c: Conn) -> End {
        let Conn {
            reader, mut writer, ..
        } = c;
        let pending: Arc<Mutex<VecDeque<Reply>>> = Arc::default();
        let wake = Arc::new(Wake::default());
        let mut read_task = AbortOnDrop(tokio::spawn(read_loop(
            reader,
            pending.clone(),
            wake.clone(),
            self.who.heartbeat_interval,
        )));
        let mut buf = BytesMut::new();
        let end = loop {
            tokio::select! {
                r = &mut read_task.0 => break End::Lost(r.unwrap_or(NsqError::Closed)),
                _ = self.stop.cancelled() => break End::Stopped,
                _ = wake.nop.notified() => {
                    if let Err(e) = conn::write_all(&mut writer, b"NOP\n").await {
                        break End::Lost(e);
                    }
                }
                r = self.rx.recv() => {
                    let Some(first) = r else { break End::Stopped };
                    buf.clear();
                    let mut next = Some(first);
                    while let Some(req) = next.take() {
                        buf.extend_from_slice(&req.wire);
                        // Queued before the bytes go out, so the answer can
                        // never arrive ahead of its responder.
                        lock(&pending).push_back(req.reply);
                        if buf.len() < WRITE_BATCH {
                            next = self.rx.try_recv().ok();
                        }
                    }
                    if let Err(e) = conn::write_all(&mut writer, &buf).await {
                        break End::Lost(e);
                    }
                }
            }
        };
        if matches!(end, End::Stopped) {
            // Let publishes already on the wire get their answers.
            let deadline = tokio::time::sleep(CLOSE_TIMEOUT);
            tokio::pin!(deadline);
            while !lock(&pending).is_empty() {
                tokio::select! {
                    _ = wake.idle.notified() => {}
                    _ = &mut read_task.0 => break,
                    _ = &mut deadline => break,
                }
            }
            let _ = writer.shutdown().await;
        }
        drop(read_task);
        for reply in lock(&pending).drain(..) {
            let _ = reply.send(Err(NsqError::Disconnected));
        }
        end
    }
}

#[derive(Default)]
struct Wake {
    /// nsqd sent a heartbeat; the writer must answer NOP.
    nop: Notify,
    /// The responder queue became empty.
    idle: Notify,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The data is a plain queue, valid even if a holder panicked.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Matches answers to responders; returns why the connection is unusable.
async fn read_loop(
    mut reader: FrameReader<tokio::net::tcp::OwnedReadHalf>,
    pending: Arc<Mutex<VecDeque<Reply>>>,
    wake: Arc<Wake>,
    heartbeat: Duration,
) -> NsqError {
    let pop = |result: Result<(), NsqError>| -> Result<(), NsqError> {
        let mut q = lock(&pending);
        let reply = q
            .pop_front()
            .ok_or_else(|| NsqError::Protocol("answer with no publish outstanding".into()))?;
        let _ = reply.send(result);
        if q.is_empty() {
            wake.idle.notify_one();
        }
        Ok(())
    };
    loop {
        // nsqd heartbeats every interval, so silence for several means the
        // connection is dead even if TCP has not noticed.
        let f = match tokio::time::timeout(heartbeat * 3, reader.next_frame()).await {
            Err(_) => return NsqError::Timeout,
            Ok(Err(e)) => return e,
            Ok(Ok(None)) => return NsqError::Closed,
            Ok(Ok(Some(f))) => f,
        };
        let step = match f {
            Frame::Response(b) if b == frame::HEARTBEAT => {
                wake.nop.notify_one();
                Ok(())
            }
            Frame::Response(b) if b == frame::OK => pop(Ok(())),
            Frame::Response(b) if b == frame::CLOSE_WAIT => Ok(()),
            Frame::Response(b) => Err(NsqError::Protocol(format!(
                "unexpected response {:?}",
                String::from_utf8_lossy(&b[..b.len().min(100)])
            ))),
            Frame::Error(e) => {
                let err = conn::server_error(&e);
                tracing::warn!(error = %err, "nsqd rejected a publish");
                let fatal = frame::is_fatal_error(&e);
                match pop(Err(err)) {
                    Err(p) => Err(p),
                    Ok(()) if fatal => Err(conn::server_error(&e)),
                    Ok(()) => Ok(()),
                }
            }
            Frame::Message(_) => Err(NsqError::Protocol(
                "message on a producer connection".into(),
            )),
        };
        if let Err(e) = step {
            return e;
        }
    }
}

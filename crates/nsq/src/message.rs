//! A consumed NSQ message and its acknowledgement (FIN / REQ / TOUCH),
//! which travels back to the connection that delivered it.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

/// What a [`Message`] asks its connection to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ack {
    Fin([u8; 16]),
    Req([u8; 16], u64),
    Touch([u8; 16]),
}

/// One message from nsqd. Call exactly one of [`Message::finish`] or
/// [`Message::requeue`]; dropping it requeues it (with a warning) so it is
/// never silently lost.
pub struct Message {
    pub id: [u8; 16],
    /// 1 on first delivery.
    pub attempts: u16,
    pub timestamp_ns: i64,
    pub body: Bytes,
    /// Tied to the connection (not the address) that delivered the message:
    /// after a reconnect nsqd would reject an ack from the new connection.
    ack: Option<mpsc::Sender<Ack>>,
}

impl Message {
    pub(crate) fn new(
        id: [u8; 16],
        attempts: u16,
        timestamp_ns: i64,
        body: Bytes,
        ack: mpsc::Sender<Ack>,
    ) -> Self {
        Message {
            id,
            attempts,
            timestamp_ns,
            body,
            ack: Some(ack),
        }
    }

    /// Done: nsqd forgets the message.
    pub fn finish(mut self) {
        if let Some(tx) = self.ack.take() {
            send(&tx, Ack::Fin(self.id));
        }
    }

    /// Deliver again after `delay` (nsqd caps the delay at its
    /// `--max-req-timeout`).
    pub fn requeue(mut self, delay: Duration) {
        if let Some(tx) = self.ack.take() {
            let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
            send(&tx, Ack::Req(self.id, ms));
        }
    }

    /// Still working on it: resets nsqd's timeout for this message.
    pub fn touch(&self) {
        if let Some(tx) = &self.ack {
            send(tx, Ack::Touch(self.id));
        }
    }

    fn id_str(&self) -> String {
        String::from_utf8_lossy(&self.id).into_owned()
    }
}

fn send(tx: &mpsc::Sender<Ack>, ack: Ack) {
    match tx.try_send(ack) {
        Ok(()) => {}
        // The connection is gone; nsqd redelivers on its own timeout.
        Err(mpsc::error::TrySendError::Closed(_)) => {
            tracing::debug!(?ack, "nsq connection closed; ack dropped");
        }
        Err(mpsc::error::TrySendError::Full(_)) => {
            tracing::warn!(
                ?ack,
                "nsq ack queue full; nsqd will redeliver after its timeout"
            );
        }
    }
}

impl Drop for Message {
    fn drop(&mut self) {
        if let Some(tx) = self.ack.take() {
            if !tx.is_closed() {
                tracing::warn!(
                    id = %self.id_str(),
                    "nsq message dropped without finish or requeue; requeueing it"
                );
            }
            send(&tx, Ack::Req(self.id, 0));
        }
    }
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("id", &self.id_str())
            .field("attempts", &self.attempts)
            .field("timestamp_ns", &self.timestamp_ns)
            .field("body_len", &self.body.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tx: &mpsc::Sender<Ack>) -> Message {
        Message::new(
            *b"0000000000000001",
            1,
            0,
            Bytes::from_static(b"x"),
            tx.clone(),
        )
    }

    #[test]
    fn acks_reach_the_connection() {
        let (tx, mut rx) = mpsc::channel(8);
        let id = *b"0000000000000001";
        let m = msg(&tx);
        m.touch();
        m.finish();
        msg(&tx).requeue(Duration::from_millis(1500));
        drop(msg(&tx));
        assert_eq!(rx.try_recv().unwrap(), Ack::Touch(id));
        assert_eq!(rx.try_recv().unwrap(), Ack::Fin(id));
        assert_eq!(rx.try_recv().unwrap(), Ack::Req(id, 1500));
        assert_eq!(
            rx.try_recv().unwrap(),
            Ack::Req(id, 0),
            "a dropped message is requeued"
        );
        assert!(
            rx.try_recv().is_err(),
            "finish and requeue do not also requeue on drop"
        );
    }
}

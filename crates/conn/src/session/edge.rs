//! The session's side of its writer queue, speaking its encoding: answers,
//! errors and refusals go out through here.

use std::sync::Arc;

use bytes::Bytes;

use crate::chat::{self, Encoding};
use crate::frame;
use crate::outbox::Outbox;
use crate::room::Outbound;

pub(crate) struct Edge {
    pub tx: Arc<Outbox>,
    pub enc: Encoding,
}

impl Edge {
    pub async fn out(&self, o: Outbound) -> Result<(), ()> {
        // Answers never wait; a client that floods requests without
        // reading the answers is cut off (see `Outbox::reply`).
        self.tx.reply(o).map_err(|_| ())
    }

    pub async fn binary(&self, b: Bytes) -> Result<(), ()> {
        self.out(Outbound::Frame(b)).await
    }

    /// An error answer: `Reply{UNKNOWN, Err}` or `{"cmd":21,...}`.
    pub async fn err(
        &self,
        code: impl Into<i32>,
        msg: impl Into<String>,
        ref_id: i64,
    ) -> Result<(), ()> {
        let msg = msg.into();
        match self.enc {
            Encoding::Protobuf => self.binary(frame::err_ref(code, msg, ref_id)).await,
            Encoding::Json => {
                self.out(Outbound::Text(chat::error_json(code, &msg, ref_id)))
                    .await
            }
        }
    }

    /// Answers with an error and closes (policy violation).
    pub async fn refuse(&self, code: impl Into<i32>, msg: impl Into<String>) {
        let _ = self.err(code, msg, 0).await;
        let _ = self.out(Outbound::Close(1008, "sign-in failed")).await;
    }
}

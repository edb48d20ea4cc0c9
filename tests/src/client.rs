//! A protobuf WebSocket client speaking the seed's protocol, for tests.

use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use chatroom_common::proto::protocol::{
    BroadcastRoomReq, Err, MsgLevel, PackageType, Reply, Req, SignIn,
};
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// One message of a room stream as a client reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamMsg {
    pub epoch: u64,
    pub offset: u64,
    pub level: MsgLevel,
    pub data: Bytes,
}

/// What a client read.
#[derive(Debug)]
pub enum Event {
    Reply(Reply),
    Closed(Option<CloseFrame>),
}

impl Client {
    pub async fn connect(url: &str) -> anyhow::Result<Client> {
        let (ws, _) = tokio::time::timeout(
            Duration::from_secs(5),
            tokio_tungstenite::connect_async(url),
        )
        .await
        .context("connect timed out")??;
        Ok(Client { ws })
    }

    pub async fn send_req(
        &mut self,
        kind: PackageType,
        data: impl Into<Bytes>,
    ) -> anyhow::Result<()> {
        let req = Req {
            r#type: kind as i32,
            data: data.into(),
        };
        self.send_raw(req.encode_to_vec()).await
    }

    pub async fn send_raw(&mut self, bytes: impl Into<Bytes>) -> anyhow::Result<()> {
        self.ws.send(Message::Binary(bytes.into())).await?;
        Ok(())
    }

    /// Signs in and returns the `Err` answer (code 0 on success).
    pub async fn sign_in(&mut self, token: &str, room: &str) -> anyhow::Result<Err> {
        let s = SignIn {
            token: token.into(),
            room_id: room.into(),
            ..Default::default()
        };
        self.send_req(PackageType::SignIn, s.encode_to_vec())
            .await?;
        self.expect_err().await
    }

    /// Signs in asking to recover the room's stream after `since` in `epoch`.
    pub async fn sign_in_resume(
        &mut self,
        token: &str,
        room: &str,
        epoch: u64,
        since: u64,
    ) -> anyhow::Result<Err> {
        let s = SignIn {
            token: token.into(),
            room_id: room.into(),
            since_offset: since,
            epoch,
        };
        self.send_req(PackageType::SignIn, s.encode_to_vec())
            .await?;
        self.expect_err().await
    }

    /// Connects and signs in, failing unless the answer is code 0.
    pub async fn signed_in(url: &str, token: &str, room: &str) -> anyhow::Result<Client> {
        let mut c = Client::connect(url).await?;
        let e = c.sign_in(token, room).await?;
        if e.code != 0 {
            bail!("sign-in refused: {} {}", e.code, e.msg);
        }
        Ok(c)
    }

    /// [`Client::signed_in`], retried while refused with 503 until `within`:
    /// a conn node may start before it has seen the logic nodes in etcd.
    pub async fn signed_in_eventually(
        url: &str,
        token: &str,
        room: &str,
        within: Duration,
    ) -> anyhow::Result<Client> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match Client::signed_in(url, token, room).await {
                Ok(c) => return Ok(c),
                Err(e)
                    if tokio::time::Instant::now() < deadline && e.to_string().contains("503") =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub async fn send_message(
        &mut self,
        room: &str,
        level: MsgLevel,
        data: &[u8],
    ) -> anyhow::Result<()> {
        let m = BroadcastRoomReq {
            room_id: room.into(),
            msg_lv: level as i32,
            data: Bytes::copy_from_slice(data),
            ..Default::default()
        };
        self.send_req(PackageType::Message, m.encode_to_vec()).await
    }

    /// The next reply or close, skipping pings; errors after `within`.
    pub async fn next_event(&mut self, within: Duration) -> anyhow::Result<Event> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let m = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .context("no frame before the deadline")?;
            match m {
                Some(Ok(Message::Binary(b))) => return Ok(Event::Reply(Reply::decode(b)?)),
                Some(Ok(Message::Close(f))) => return Ok(Event::Closed(f)),
                Some(Ok(Message::Text(t))) => bail!("unexpected text frame: {t}"),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Ok(Event::Closed(Some(CloseFrame {
                    code:
                        tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Abnormal,
                    reason: e.to_string().into(),
                }))),
                None => return Ok(Event::Closed(None)),
            }
        }
    }

    pub async fn next_reply(&mut self) -> anyhow::Result<Reply> {
        match self.next_event(Duration::from_secs(10)).await? {
            Event::Reply(r) => Ok(r),
            Event::Closed(f) => bail!("closed: {f:?}"),
        }
    }

    /// The next `Reply{UNKNOWN, Err}`, skipping pushed messages.
    pub async fn expect_err(&mut self) -> anyhow::Result<Err> {
        loop {
            let r = self.next_reply().await?;
            if r.r#type == PackageType::Unknown as i32 {
                return Ok(Err::decode(r.data)?);
            }
            if r.r#type == PackageType::Message as i32 {
                continue;
            }
            bail!("expected an Err reply, got type {}", r.r#type);
        }
    }

    /// Waits for the close frame (replies before it are skipped).
    pub async fn expect_close(&mut self) -> anyhow::Result<Option<CloseFrame>> {
        loop {
            if let Event::Closed(f) = self.next_event(Duration::from_secs(10)).await? {
                return Ok(f);
            }
        }
    }

    pub async fn heartbeat(&mut self) -> anyhow::Result<Bytes> {
        self.send_req(PackageType::Heartbeat, Bytes::new()).await?;
        loop {
            let r = self.next_reply().await?;
            if r.r#type == PackageType::Heartbeat as i32 {
                return Ok(r.data);
            }
        }
    }

    pub async fn members(&mut self) -> anyhow::Result<u64> {
        self.send_req(PackageType::Members, Bytes::new()).await?;
        loop {
            let r = self.next_reply().await?;
            if r.r#type == PackageType::Members as i32 {
                return Ok(std::str::from_utf8(&r.data)?.parse()?);
            }
        }
    }

    /// Reads pushed frames until `want` stream messages arrived; returns
    /// them with their offsets (from each frame's last offset and count) and
    /// the number of frames they came in. `Err` notices (410) are returned
    /// as they come, in `notices`.
    pub async fn recv_stream(&mut self, want: usize, within: Duration) -> anyhow::Result<Received> {
        let deadline = tokio::time::Instant::now() + within;
        let mut got = Received::default();
        while got.msgs.len() < want {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                bail!(
                    "got {} of {want} messages before the deadline: {:?}",
                    got.msgs.len(),
                    got.msgs.iter().map(|m| m.offset).collect::<Vec<_>>()
                );
            }
            match self.next_event(left).await {
                Ok(Event::Reply(r)) if r.r#type == PackageType::Message as i32 => {
                    let m = BroadcastRoomReq::decode(r.data)?;
                    let level = MsgLevel::try_from(m.msg_lv).unwrap_or(MsgLevel::Normal);
                    let parts: Vec<Bytes> = chatroom_common::batch::decode(&m.data)
                        .map(|p| p.map(Bytes::copy_from_slice))
                        .collect::<Result<_, _>>()?;
                    let n = parts.len() as u64;
                    for (i, data) in parts.into_iter().enumerate() {
                        got.msgs.push(StreamMsg {
                            epoch: m.epoch,
                            offset: m.offset + 1 + i as u64 - n,
                            level,
                            data,
                        });
                    }
                    got.frames += 1;
                }
                Ok(Event::Reply(r)) if r.r#type == PackageType::Unknown as i32 => {
                    got.notices.push(Err::decode(r.data)?);
                }
                Ok(Event::Reply(_)) => continue,
                Ok(Event::Closed(f)) => bail!("closed after {} messages: {f:?}", got.msgs.len()),
                Err(e) => bail!("got {} of {want} messages: {e}", got.msgs.len()),
            }
        }
        Ok(got)
    }

    /// Reads pushed batches until `want` messages arrived; returns them with
    /// each batch's level. Errors at `within`.
    pub async fn recv_messages(
        &mut self,
        want: usize,
        within: Duration,
    ) -> anyhow::Result<Vec<(MsgLevel, Bytes)>> {
        let deadline = tokio::time::Instant::now() + within;
        let mut out = Vec::new();
        while out.len() < want {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                bail!(
                    "got {} of {want} messages before the deadline: {out:?}",
                    out.len()
                );
            }
            match self.next_event(left).await {
                Ok(Event::Reply(r)) if r.r#type == PackageType::Message as i32 => {
                    let m = BroadcastRoomReq::decode(r.data)?;
                    let level = MsgLevel::try_from(m.msg_lv).unwrap_or(MsgLevel::Normal);
                    for part in chatroom_common::batch::decode(&m.data) {
                        out.push((level, Bytes::copy_from_slice(part?)));
                    }
                }
                Ok(Event::Reply(_)) => continue,
                Ok(Event::Closed(f)) => bail!("closed after {} messages: {f:?}", out.len()),
                Err(e) => bail!("got {} of {want} messages: {e}", out.len()),
            }
        }
        Ok(out)
    }
}

pub use crate::wait::eventually;

/// What [`Client::recv_stream`] read.
#[derive(Debug, Default)]
pub struct Received {
    pub msgs: Vec<StreamMsg>,
    pub frames: usize,
    pub notices: Vec<Err>,
}

impl Received {
    pub fn offsets(&self) -> Vec<u64> {
        self.msgs.iter().map(|m| m.offset).collect()
    }
}

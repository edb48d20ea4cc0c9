//! IM helpers for tests: accounts over the HTTP API and a JSON chat client
//! for `/chat?id=&token=` speaking the IM seed's message format.

use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::http;

/// A registered, logged-in user.
#[derive(Debug, Clone)]
pub struct User {
    pub id: i64,
    pub token: String,
}

/// A form-encoded POST to an IM route; fails unless `code` is 0.
pub async fn call(
    base: &str,
    route: &str,
    token: Option<&str>,
    fields: &[(&str, &str)],
) -> anyhow::Result<Value> {
    let r = call_raw(base, route, token, fields).await?;
    if r["code"] != 0 {
        bail!("{route} failed: {r}");
    }
    Ok(r)
}

/// Like [`call`], returning the reply whatever its code.
pub async fn call_raw(
    base: &str,
    route: &str,
    token: Option<&str>,
    fields: &[(&str, &str)],
) -> anyhow::Result<Value> {
    let mut body: Vec<(String, String)> = fields
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    if let Some(t) = token {
        body.push(("token".into(), t.into()));
    }
    let encoded = body
        .iter()
        .map(|(k, v)| format!("{}={}", urlencode(k), urlencode(v)))
        .collect::<Vec<_>>()
        .join("&");
    let a = http::post(
        &format!("{base}{route}"),
        "application/x-www-form-urlencoded",
        None,
        encoded,
    )
    .await?;
    Ok(a.json)
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Registers `mobile` and logs in.
pub async fn register(base: &str, mobile: &str) -> anyhow::Result<User> {
    call(
        base,
        "/user/register",
        None,
        &[
            ("mobile", mobile),
            ("passwd", "secret-pw"),
            ("nickname", mobile),
        ],
    )
    .await?;
    let r = call(
        base,
        "/user/login",
        None,
        &[("mobile", mobile), ("passwd", "secret-pw")],
    )
    .await?;
    Ok(User {
        id: r["data"]["id"].as_i64().context("login without id")?,
        token: r["data"]["token"]
            .as_str()
            .context("login without token")?
            .to_string(),
    })
}

/// A JSON chat session.
pub struct ChatClient {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl ChatClient {
    /// Connects to the `/chat` endpoint next to `room_url` (`ws://h:p/room`)
    /// and waits for the welcome frame.
    pub async fn connect(room_url: &str, user: &User) -> anyhow::Result<ChatClient> {
        let url = format!(
            "{}?id={}&token={}",
            room_url.replace("/room", "/chat"),
            user.id,
            user.token
        );
        let (ws, _) = tokio_tungstenite::connect_async(url).await?;
        let mut c = ChatClient { ws };
        let w = c.next().await?;
        if w["cmd"] != 22 || w["code"] != 0 {
            bail!("no welcome: {w}");
        }
        Ok(c)
    }

    pub async fn send(&mut self, v: Value) -> anyhow::Result<()> {
        self.ws.send(Message::Text(v.to_string().into())).await?;
        Ok(())
    }

    /// The next JSON frame within 10 s.
    pub async fn next(&mut self) -> anyhow::Result<Value> {
        self.next_within(Duration::from_secs(10)).await
    }

    pub async fn next_within(&mut self, within: Duration) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => bail!("no frame within {within:?}"),
                Ok(Some(Ok(Message::Text(t)))) => return Ok(serde_json::from_str(t.as_str())?),
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                Ok(other) => bail!("expected a JSON frame, got {other:?}"),
            }
        }
    }

    /// Sends a message and returns the server's answer to it (ack or error),
    /// skipping pushed messages, which are returned too.
    pub async fn send_msg(&mut self, msg: Value) -> anyhow::Result<(Value, Vec<Value>)> {
        let cid = msg["id"].clone();
        self.send(msg).await?;
        let mut pushed = vec![];
        loop {
            let v = self.next().await?;
            if (v["cmd"] == 20 || v["cmd"] == 21) && v["cid"] == cid {
                return Ok((v, pushed));
            }
            pushed.push(v);
        }
    }

    /// Reads until `n` pushed messages (cmd 10/11/12) arrived.
    pub async fn messages(&mut self, n: usize) -> anyhow::Result<Vec<Value>> {
        let mut out = vec![];
        while out.len() < n {
            let v = self
                .next()
                .await
                .with_context(|| format!("after {} of {n} messages: {out:?}", out.len()))?;
            if matches!(v["cmd"].as_i64(), Some(10..=12)) {
                out.push(v);
            }
        }
        Ok(out)
    }

    /// True if no message arrives within `quiet`.
    pub async fn silent_for(&mut self, quiet: Duration) -> bool {
        self.next_within(quiet).await.is_err()
    }
}

/// A text message in the seed's format.
pub fn text(cid: i64, dst: i64, cmd: i64, content: &str) -> Value {
    json!({"id": cid, "dstid": dst, "cmd": cmd, "media": 1, "content": content})
}

/// A multipart upload of `bytes` as `file` named `name`; the reply.
pub async fn upload(base: &str, token: &str, name: &str, bytes: &[u8]) -> anyhow::Result<Value> {
    let boundary = "chatroomtestboundary7f3a";
    let mut body = Vec::new();
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"token\"\r\n\r\n{token}\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n")
            .as_bytes(),
    );
    body.extend_from_slice(bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let a = http::post(
        &format!("{base}/attach/upload"),
        &format!("multipart/form-data; boundary={boundary}"),
        None,
        body,
    )
    .await?;
    Ok(a.json)
}

/// GET `url` (absolute, or a path on `base`); status and body.
pub async fn get(base: &str, url: &str) -> anyhow::Result<(u16, bytes::Bytes)> {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    let full = if url.starts_with("http") {
        url.to_string()
    } else {
        format!("{base}{url}")
    };
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
    let resp = client.get(full.parse()?).await?;
    let status = resp.status().as_u16();
    Ok((status, resp.into_body().collect().await?.to_bytes()))
}

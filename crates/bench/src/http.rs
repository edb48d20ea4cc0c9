//! A small HTTP/1 client for chatroom's API: `POST /tk` (a test token per
//! uid) and `POST /msg` (publish an IMPORTANT message), over kept-alive
//! connections, every call bounded in time.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

use crate::error::BenchError;

/// Longest wait for one API call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest answer read.
const MAX_ANSWER: usize = 64 << 10;

/// The API's answer shape: `{code, msg, data}`.
#[derive(Debug, Deserialize)]
struct Answer {
    code: i64,
    #[serde(default)]
    msg: String,
    #[serde(default)]
    data: serde_json::Value,
}

/// chatroom's HTTP API at one base URL.
#[derive(Clone, Debug)]
pub struct Api {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
}

impl Api {
    pub fn new(base: &str) -> Self {
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(conn);
        Api {
            client,
            base: base.trim_end_matches('/').to_string(),
        }
    }

    async fn post(
        &self,
        path: &str,
        auth: Option<&str>,
        body: serde_json::Value,
    ) -> Result<Answer, BenchError> {
        let mut req = hyper::Request::post(format!("{}{path}", self.base))
            .header("content-type", "application/json");
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let req = req
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| BenchError::Http(e.to_string()))?;
        let call = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| BenchError::Http(e.to_string()))?;
            let status = resp.status();
            let bytes = Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| BenchError::Http(format!("reading the answer: {e}")))?
                .to_bytes();
            serde_json::from_slice::<Answer>(&bytes).map_err(|_| {
                let text = String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned();
                BenchError::Http(format!(
                    "{path}: status {status}, not an API answer: {text}"
                ))
            })
        };
        tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .map_err(|_| BenchError::Timeout("HTTP API call"))?
    }

    /// A test token for `uid` (`POST /tk`).
    pub async fn token(&self, uid: &str) -> Result<String, BenchError> {
        let a = self
            .post("/tk", None, serde_json::json!({ "uid": uid }))
            .await?;
        match (a.code, a.data.as_str()) {
            (1, Some(t)) => Ok(t.to_string()),
            _ => Err(BenchError::Http(format!(
                "/tk for {uid}: code {}: {}",
                a.code, a.msg
            ))),
        }
    }

    /// Publishes `msg` to `room` (`POST /msg`).
    pub async fn publish(&self, token: &str, room: &str, msg: &str) -> Result<(), BenchError> {
        let a = self
            .post(
                "/msg",
                Some(token),
                serde_json::json!({ "room_id": room, "msg": msg }),
            )
            .await?;
        if a.code == 1 {
            Ok(())
        } else {
            Err(BenchError::Http(format!(
                "/msg: code {}: {}",
                a.code, a.msg
            )))
        }
    }
}

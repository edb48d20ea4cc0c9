//! A small HTTP/1 client for the logic API in tests.

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Status and parsed JSON body.
pub struct Answer {
    pub status: u16,
    pub json: serde_json::Value,
}

/// POSTs `body` with `content_type` (and an optional Authorization header).
pub async fn post(
    url: &str,
    content_type: &str,
    auth: Option<&str>,
    body: impl Into<Bytes>,
) -> anyhow::Result<Answer> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut req = hyper::Request::post(url).header("content-type", content_type);
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    let resp = client.request(req.body(Full::new(body.into()))?).await?;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await?.to_bytes();
    let json = serde_json::from_slice(&bytes)
        .with_context(|| format!("non-JSON body: {}", String::from_utf8_lossy(&bytes)))?;
    Ok(Answer { status, json })
}

pub async fn post_json(
    url: &str,
    auth: Option<&str>,
    body: serde_json::Value,
) -> anyhow::Result<Answer> {
    post(url, "application/json", auth, body.to_string()).await
}

/// A test token from `POST /tk`.
pub async fn token(http_base: &str, uid: &str) -> anyhow::Result<String> {
    let a = post_json(
        &format!("{http_base}/tk"),
        None,
        serde_json::json!({ "uid": uid }),
    )
    .await?;
    a.json["data"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("no token in {}", a.json))
}

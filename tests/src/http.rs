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

/// `method url` with an empty body: the status and the body as text
/// (`/metrics`, `/readyz`, nsqd's and nsqlookupd's HTTP APIs).
pub async fn request_text(method: &str, url: &str) -> anyhow::Result<(u16, String)> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = hyper::Request::builder()
        .method(method)
        .uri(url)
        .body(Full::new(Bytes::new()))?;
    let resp = tokio::time::timeout(std::time::Duration::from_secs(10), client.request(req))
        .await
        .with_context(|| format!("{method} {url}: no answer in 10 s"))??;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

/// `GET url`: the status and body text.
pub async fn get_text(url: &str) -> anyhow::Result<(u16, String)> {
    request_text("GET", url).await
}

/// Polls `GET url` until it answers 200 or `within` passes (a readiness
/// endpoint); the last answer is in the error.
pub async fn wait_ok(url: &str, within: std::time::Duration) -> anyhow::Result<()> {
    let last = std::cell::RefCell::new(String::new());
    let last = &last;
    crate::wait::eventually(within, url, || async move {
        *last.borrow_mut() = match get_text(url).await {
            Ok((200, _)) => return Some(()),
            Ok((s, body)) => format!("HTTP {s}: {body}"),
            Err(e) => format!("{e:#}"),
        };
        None
    })
    .await
    .map_err(|_| anyhow::anyhow!("{url} not ready after {within:?}: {}", last.borrow()))
}

//! nsqlookupd discovery: every nsqd registered with nsqlookupd
//! (`GET /nodes`), so consumers find producers as they come and go.
//!
//! A consumer subscribes to every listed nsqd, not only to those that
//! already carry its topic (`/lookup?topic=`): its SUB creates the topic and
//! channel there, so the first message published after start flows at once
//! instead of waiting in nsqd until the consumer's next poll.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::NsqError;

const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// A lookup answer is a short JSON list; anything bigger is not nsqlookupd.
const MAX_BODY: usize = 1024 * 1024;

pub(crate) type HttpClient = Client<HttpConnector, Empty<Bytes>>;

pub(crate) fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// The `host:port` TCP addresses of every nsqd registered with `lookupd`.
pub(crate) async fn nodes(client: &HttpClient, lookupd: &str) -> Result<Vec<String>, NsqError> {
    let url = nodes_url(lookupd);
    let req = hyper::Request::get(&url)
        // Asks nsqlookupd for the flat (v1) answer; older ones ignore it.
        .header("accept", "application/vnd.nsq; version=1.0")
        .body(Empty::new())
        .map_err(|e| NsqError::Lookup(format!("{url}: {e}")))?;
    let fetch = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| NsqError::Lookup(format!("{url}: {e}")))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| NsqError::Lookup(format!("{url}: reading body: {e}")))?
            .to_bytes();
        Ok::<_, NsqError>((status, body))
    };
    let (status, body) = tokio::time::timeout(LOOKUP_TIMEOUT, fetch)
        .await
        .map_err(|_| NsqError::Lookup(format!("{url}: timed out")))??;
    if !status.is_success() {
        return Err(NsqError::Lookup(format!("{url}: HTTP {status}")));
    }
    parse_producers(&body).map_err(|e| NsqError::Lookup(format!("{url}: {e}")))
}

/// Accepts `host:port` or a full `http://host:port` base.
fn nodes_url(lookupd: &str) -> String {
    let base = lookupd.trim().trim_end_matches('/');
    if base.contains("://") {
        format!("{base}/nodes")
    } else {
        format!("http://{base}/nodes")
    }
}

/// Reads both answer shapes: `{"producers":[..]}` (v1) and the older
/// `{"status_code":200,"data":{"producers":[..]}}`.
pub(crate) fn parse_producers(body: &[u8]) -> Result<Vec<String>, String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("bad JSON: {e}"))?;
    let producers = v
        .get("producers")
        .or_else(|| v.get("data").and_then(|d| d.get("producers")))
        .and_then(|p| p.as_array())
        .ok_or("no producers list")?;
    let mut out = Vec::new();
    for p in producers {
        let host = p.get("broadcast_address").and_then(|h| h.as_str());
        let port = p.get("tcp_port").and_then(|h| h.as_u64());
        match (host, port) {
            (Some(h), Some(port)) if !h.is_empty() && port > 0 && port <= u16::MAX as u64 => {
                if h.contains(':') && !h.starts_with('[') {
                    out.push(format!("[{h}]:{port}"));
                } else {
                    out.push(format!("{h}:{port}"));
                }
            }
            _ => tracing::warn!(producer = %p, "nsqlookupd listed a producer without an address"),
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_answer_shapes() {
        let v1 = br#"{"channels":["job"],"producers":[
            {"remote_address":"10.0.0.1:5555","hostname":"a","broadcast_address":"nsqd-a","tcp_port":4150,"http_port":4151,"version":"1.3.0"},
            {"broadcast_address":"::1","tcp_port":4152}]}"#;
        assert_eq!(
            parse_producers(v1).unwrap(),
            vec!["[::1]:4152", "nsqd-a:4150"]
        );
        let old = br#"{"status_code":200,"status_txt":"OK","data":{"channels":[],"producers":[{"broadcast_address":"h","tcp_port":1}]}}"#;
        assert_eq!(parse_producers(old).unwrap(), vec!["h:1"]);
    }

    #[test]
    fn bad_answers() {
        assert!(parse_producers(b"not json").is_err());
        assert!(parse_producers(br#"{"message":"TOPIC_NOT_FOUND"}"#).is_err());
        let skip = br#"{"producers":[{"broadcast_address":"h"},{"broadcast_address":"h","tcp_port":70000}]}"#;
        assert_eq!(parse_producers(skip).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn urls() {
        assert_eq!(nodes_url("127.0.0.1:4161"), "http://127.0.0.1:4161/nodes");
        assert_eq!(nodes_url("http://h:1/"), "http://h:1/nodes");
    }
}

//! Request bodies: [`JsonOrForm`] (a typed body as JSON or a urlencoded
//! form) and [`Params`] (an IM request's loose fields from the query and the
//! body). Every rejection is an [`ApiError`], so the caller's convention
//! shapes the reply. Shared by the seed's HTTP API and the IM routes.

use std::sync::Arc;

use axum::Form;
use axum::extract::rejection::FormRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use bytes::Bytes;
use serde::de::DeserializeOwned;

use crate::app::App;
use crate::error::ApiError;

/// A body given as JSON or as a urlencoded form, whichever the
/// `Content-Type` says; every rejection becomes an [`ApiError`].
pub struct JsonOrForm<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Arc<App>> for JsonOrForm<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, app: &Arc<App>) -> Result<Self, ApiError> {
        let content_type = req
            .headers()
            .get(CONTENT_TYPE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default();
        let mime = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let too_large = || ApiError::BodyTooLarge(app.max_body_bytes());
        if mime == "application/json" || mime.ends_with("+json") {
            let bytes = Bytes::from_request(req, app).await.map_err(|r| {
                if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    too_large()
                } else {
                    ApiError::BadBody(r.body_text())
                }
            })?;
            // Via `Value` so that only an object is accepted: serde would
            // otherwise happily read a struct from an array (`["r", "m"]`).
            let value: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| ApiError::BadBody(format!("malformed JSON: {e}")))?;
            if !value.is_object() {
                return Err(ApiError::BadBody("expected a JSON object".into()));
            }
            serde_json::from_value(value)
                .map(JsonOrForm)
                .map_err(|e| ApiError::BadBody(e.to_string()))
        } else if mime == "application/x-www-form-urlencoded" {
            Form::<T>::from_request(req, app)
                .await
                .map(|Form(v)| JsonOrForm(v))
                .map_err(|r: FormRejection| {
                    if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                        too_large()
                    } else {
                        ApiError::BadBody(r.body_text())
                    }
                })
        } else {
            let mut shown = content_type;
            if shown.len() > 64 {
                let mut cut = 64;
                while !shown.is_char_boundary(cut) {
                    cut -= 1;
                }
                shown.truncate(cut);
            }
            Err(ApiError::UnsupportedContentType(shown))
        }
    }
}

/// The fields of an IM request: the query string, then the body (a
/// urlencoded form, a JSON object, or nothing), later ones winning. Numbers
/// in JSON are read as their text, so `{"dstid": 5}` and `dstid=5` agree.
#[derive(Debug, Default)]
pub struct Params(pub std::collections::HashMap<String, String>);

impl Params {
    /// A field, if given.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// An integer field; absent or empty is `None`.
    pub fn int(&self, key: &str) -> Result<Option<i64>, ApiError> {
        match self.get(key).map(str::trim) {
            None | Some("") => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| ApiError::Invalid(format!("{key} must be an integer"))),
        }
    }
}

impl FromRequest<Arc<App>> for Params {
    type Rejection = ApiError;

    async fn from_request(req: Request, app: &Arc<App>) -> Result<Self, ApiError> {
        let mut map = std::collections::HashMap::new();
        if let Some(q) = req.uri().query() {
            let pairs: Vec<(String, String)> = axum::extract::Query::try_from_uri(req.uri())
                .map(|axum::extract::Query(v)| v)
                .map_err(|_| {
                    ApiError::BadBody(format!(
                        "malformed query string {:?}",
                        q.chars().take(64).collect::<String>()
                    ))
                })?;
            map.extend(pairs);
        }
        let has_type = req.headers().contains_key(CONTENT_TYPE);
        let is_json = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            })
            .is_some_and(|m| m == "application/json" || m.ends_with("+json"));
        if !has_type {
            // Nothing but the query (and headers): fine as long as there is no body.
            let bytes = Bytes::from_request(req, app)
                .await
                .map_err(|_| ApiError::BodyTooLarge(app.max_body_bytes()))?;
            if !bytes.is_empty() {
                return Err(ApiError::UnsupportedContentType(String::new()));
            }
        } else if is_json {
            let JsonOrForm(obj) =
                JsonOrForm::<serde_json::Map<String, serde_json::Value>>::from_request(req, app)
                    .await?;
            for (k, v) in obj {
                let text = match v {
                    serde_json::Value::Null => continue,
                    serde_json::Value::String(s) => s,
                    serde_json::Value::Number(n) => n.to_string(),
                    serde_json::Value::Bool(b) => b.to_string(),
                    _ => {
                        return Err(ApiError::BadBody(format!(
                            "{} must be text or a number",
                            k.chars().take(32).collect::<String>()
                        )));
                    }
                };
                map.insert(k, text);
            }
        } else {
            let JsonOrForm(pairs) =
                JsonOrForm::<Vec<(String, String)>>::from_request(req, app).await?;
            map.extend(pairs);
        }
        Ok(Params(map))
    }
}

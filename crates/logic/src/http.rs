//! The HTTP API (the seed's): `POST /msg` pushes an IMPORTANT message to a
//! room, `POST /tk` hands out a test token. Every reply, errors included, is
//! JSON `{code, msg}` / `{code, msg, data}` with `code` 1 ok, 0 error, 1001
//! login needed; the HTTP status says the same thing for tools that look.
//!
//! The IM routes (`crate::im_api`, `crate::upload`) share this router but use
//! the IM seed's codes (0 ok, non-zero error).

use std::fmt;
use std::sync::Arc;

use axum::extract::rejection::FormRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Form, Json, Router};
use bytes::Bytes;
use chatroom_common::proto::protocol::MsgLevel;
use chatroom_common::token::TokenError;
use serde::de::{self, DeserializeOwned, Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use tracing::{Span, debug, info};

use crate::app::{App, im_uid};
use crate::error::{ApiError, Reply};

/// The routes, with the body limit and JSON fallbacks.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/msg", post(post_msg))
        .route("/tk", post(post_tk))
        .merge(crate::im_api::routes())
        .merge(crate::upload::routes(&app))
        // Counts and times every request to a known route (by its pattern).
        .route_layer(axum::middleware::from_fn(track))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Applies to the Json/Form extractors: past it they reject with 413,
        // which `JsonOrForm` turns into the JSON shape.
        .layer(DefaultBodyLimit::max(app.max_body_bytes))
        .with_state(app)
}

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
        let too_large = || ApiError::BodyTooLarge(app.max_body_bytes);
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
                .map_err(|_| ApiError::BodyTooLarge(app.max_body_bytes))?;
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

/// The IM user acting: the token in the `Authorization` header, else the
/// `token` field, must be valid and name an IM account; a `userid` field
/// (the seed's pages send one; 0 or empty means "not given") must be the same.
pub fn im_user(
    app: &App,
    headers: &HeaderMap,
    token_field: Option<&str>,
    userid_field: Option<&str>,
) -> Result<i64, ApiError> {
    let header = match headers.get(AUTHORIZATION) {
        None => None,
        Some(v) => Some(v.to_str().map_err(|_| {
            ApiError::LoginNeeded(TokenError::Invalid(
                "authorization header is not text".into(),
            ))
        })?),
    };
    let token = header
        .filter(|t| !t.trim().is_empty())
        .or(token_field)
        .ok_or(ApiError::LoginNeeded(TokenError::Empty))?;
    let uid = im_uid(&app.verify(token)?)?;
    match userid_field.map(str::trim) {
        None | Some("") | Some("0") => Ok(uid),
        Some(given) if given == uid.to_string() => Ok(uid),
        Some(_) => Err(ApiError::UidMismatch),
    }
}

/// A text field that JSON clients may also send as a number (`"room_id": 42`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Text(pub String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Text;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Text, E> {
                Ok(Text(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

fn text(t: Option<Text>) -> String {
    t.map(|t| t.0).unwrap_or_default()
}

/// `POST /msg` body. Fields are optional so that a missing one gets our own
/// clear message rather than serde's.
#[derive(Debug, Deserialize)]
pub struct MsgBody {
    #[serde(default)]
    pub room_id: Option<Text>,
    #[serde(default)]
    pub msg: Option<Text>,
}

/// `POST /tk` body.
#[derive(Debug, Deserialize)]
pub struct TkBody {
    #[serde(default)]
    pub uid: Option<Text>,
}

#[derive(Debug, Serialize)]
pub struct MsgData {
    /// A string: message ids use 63 bits, more than a JavaScript number holds.
    pub id: String,
}

/// `Ok` as `{code: 1, msg: "ok", data}`; `Err` logged (in the request's span)
/// and shaped by [`ApiError`].
fn respond<T: Serialize>(result: Result<Option<T>, ApiError>) -> Response {
    match result {
        Ok(data) => Json(Reply::ok(data)).into_response(),
        Err(e) => {
            e.log();
            e.into_response()
        }
    }
}

#[tracing::instrument(name = "http.msg", skip_all, fields(uid, room))]
async fn post_msg(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<JsonOrForm<MsgBody>, ApiError>,
) -> Response {
    respond(send_msg(&app, &headers, body).await)
}

async fn send_msg(
    app: &App,
    headers: &HeaderMap,
    body: Result<JsonOrForm<MsgBody>, ApiError>,
) -> Result<Option<MsgData>, ApiError> {
    // The token is checked first: without one, nothing about the body matters.
    let token = match headers.get(AUTHORIZATION) {
        None => return Err(ApiError::LoginNeeded(TokenError::Empty)),
        Some(v) => v.to_str().map_err(|_| {
            ApiError::LoginNeeded(TokenError::Invalid(
                "authorization header is not text".into(),
            ))
        })?,
    };
    let uid = app.verify(token)?;
    Span::current().record("uid", uid.as_str());
    let JsonOrForm(body) = body?;
    let room = text(body.room_id);
    app.check_room(&room)?;
    Span::current().record("room", room.as_str());
    let msg = body.msg.ok_or(ApiError::MissingMessage)?.0;
    let id = app
        .publish(&uid, &room, MsgLevel::Important as i32, Bytes::from(msg))
        .await?;
    debug!(id, "message accepted");
    Ok(Some(MsgData { id: id.to_string() }))
}

#[tracing::instrument(name = "http.tk", skip_all, fields(uid))]
async fn post_tk(
    State(app): State<Arc<App>>,
    body: Result<JsonOrForm<TkBody>, ApiError>,
) -> Response {
    respond(issue_token(&app, body))
}

fn issue_token(
    app: &App,
    body: Result<JsonOrForm<TkBody>, ApiError>,
) -> Result<Option<String>, ApiError> {
    if !app.test_token {
        return Err(ApiError::TestTokenDisabled);
    }
    let JsonOrForm(body) = body?;
    let uid = text(body.uid);
    // Numeric uids are IM accounts: their tokens come from /user/login only,
    // or anyone could act as any IM user.
    if im_uid(&uid).is_ok() {
        return Err(ApiError::Forbidden(
            "numeric uids are IM accounts: log in with /user/login".into(),
        ));
    }
    let token = app.issue(&uid)?;
    Span::current().record("uid", uid.as_str());
    info!("test token issued");
    Ok(Some(token))
}

async fn not_found() -> Response {
    let r = respond::<()>(Err(ApiError::NotFound));
    crate::metrics::record_http("unmatched", r.status().as_u16(), std::time::Duration::ZERO);
    r
}

/// `chatroom_logic_http_requests{route, code}` and the latency histogram.
async fn track(
    path: Option<axum::extract::MatchedPath>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    let route = path.as_ref().map_or("unmatched", |p| p.as_str());
    crate::metrics::record_http(route, resp.status().as_u16(), started.elapsed());
    resp
}

async fn method_not_allowed() -> Response {
    respond::<()>(Err(ApiError::MethodNotAllowed))
}

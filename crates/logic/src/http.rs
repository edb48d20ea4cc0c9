//! The HTTP API (the seed's): `POST /msg` pushes an IMPORTANT message to a
//! room, `POST /tk` hands out a test token. Every reply, errors included, is
//! JSON `{code, msg}` / `{code, msg, data}` with `code` 1 ok, 0 error, 1001
//! login needed; the HTTP status says the same thing for tools that look.
//!
//! The IM layer's routes (`crate::im`, mounted here; it imports nothing
//! from this module) share this router but use the IM seed's codes (0 ok,
//! non-zero error).

use std::fmt;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use chatroom_common::proto::protocol::MsgLevel;
use chatroom_common::token::TokenError;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use tracing::{Span, debug, info};

use crate::app::{App, im_uid};
use crate::body::JsonOrForm;
use crate::error::{ApiError, Reply};

/// The routes, with the body limit and JSON fallbacks.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/msg", post(post_msg))
        .route("/tk", post(post_tk))
        .merge(crate::im::router(&app))
        // Counts and times every request to a known route (by its pattern).
        .route_layer(axum::middleware::from_fn(track))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Applies to the Json/Form extractors: past it they reject with 413,
        // which `JsonOrForm` turns into the JSON shape.
        .layer(DefaultBodyLimit::max(app.max_body_bytes()))
        .with_state(app)
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
    let uid = app.auth.verify(token)?;
    Span::current().record("uid", uid.as_str());
    let JsonOrForm(body) = body?;
    let room = text(body.room_id);
    app.rooms.check_room(&room)?;
    Span::current().record("room", room.as_str());
    let msg = body.msg.ok_or(ApiError::MissingMessage)?.0;
    let id = app
        .rooms
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
    if !app.auth.test_tokens() {
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
    let token = app.auth.issue(&uid)?;
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

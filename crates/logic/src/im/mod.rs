//! The IM layer: accounts, friends, communities, 1:1 and group messages,
//! offline delivery and attachments. The HTTP layer mounts [`router`]; the
//! gRPC service hands chat messages to [`chat`]. Nothing here imports the
//! seed's HTTP API (`crate::http`), so the two layers do not depend on each
//! other.

pub mod chat;
pub mod routes;
pub mod upload;

use std::sync::Arc;

use axum::Router;
use axum::extract::{FromRequest, Request};
use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, HeaderValue};
use chatroom_common::token::TokenError;

use crate::app::{App, im_uid};
use tracing::Span;

use crate::body::Params;
use crate::error::{ApiError, ImError};

/// The IM user acting on a request, with the request's fields: the token
/// (header `Authorization`, else a `token` field) names an IM account, a
/// `userid` field names the same one, and the user is within the API rate
/// limit. A route that takes it runs only for such a request; anything
/// else is refused in the IM shape.
pub struct Acting {
    uid: i64,
    params: Params,
}

impl Acting {
    /// The user and the fields, the user recorded in the handler's span
    /// (extractors run before the span is entered).
    pub fn in_span(self) -> (i64, Params) {
        Span::current().record("uid", self.uid);
        (self.uid, self.params)
    }
}

impl FromRequest<Arc<App>> for Acting {
    type Rejection = ImError;

    async fn from_request(req: Request, app: &Arc<App>) -> Result<Self, ImError> {
        // The body extractor consumes the request; the header is read first.
        let auth = req.headers().get(AUTHORIZATION).cloned();
        let params = Params::from_request(req, app).await?;
        let uid = user_from(
            app,
            auth.as_ref(),
            params.get("token"),
            params.get("userid"),
        )?;
        if !app.im.api_allowed(&uid.to_string()) {
            return Err(ApiError::RateLimited.into());
        }
        Ok(Acting { uid, params })
    }
}

/// Every IM route, with the upload routes' own body limit.
pub fn router(app: &Arc<App>) -> Router<Arc<App>> {
    routes::routes().merge(upload::routes(app))
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
    user_from(app, headers.get(AUTHORIZATION), token_field, userid_field)
}

fn user_from(
    app: &App,
    authorization: Option<&HeaderValue>,
    token_field: Option<&str>,
    userid_field: Option<&str>,
) -> Result<i64, ApiError> {
    let header = match authorization {
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
    let uid = im_uid(&app.auth.verify(token)?)?;
    match userid_field.map(str::trim) {
        None | Some("") | Some("0") => Ok(uid),
        Some(given) if given == uid.to_string() => Ok(uid),
        Some(_) => Err(ApiError::UidMismatch),
    }
}

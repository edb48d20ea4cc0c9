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
use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use chatroom_common::token::TokenError;

use crate::app::{App, im_uid};
use crate::error::ApiError;

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

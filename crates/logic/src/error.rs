//! Errors: [`LogicError`] stops the node; [`ApiError`] fails one request and
//! maps to what the client sees — an `Err` code over gRPC, `{code, msg}` over
//! HTTP — without leaking internals (those go to the log).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chatroom_common::proto::protocol::ErrCode;
use chatroom_common::token::TokenError;
use chatroom_discovery::DiscoveryError;
use chatroom_queue::QueueError;

use crate::presence::PresenceError;
use crate::store::StoreError;

/// Why [`crate::run`] failed.
#[derive(Debug, thiserror::Error)]
pub enum LogicError {
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    #[error("presence store: {0}")]
    Presence(#[from] PresenceError),
    #[error("room streams: {0}")]
    Stream(#[from] crate::stream::StreamError),
    #[error("queue: {0}")]
    Queue(#[from] QueueError),
    #[error("discovery: {0}")]
    Discovery(#[from] DiscoveryError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("HTTP server: {0}")]
    Http(#[source] std::io::Error),
    #[error("{0} task panicked")]
    Panicked(&'static str),
    /// Something opened at start-up failed: names the config key and its
    /// value (passwords hidden).
    #[error("{key} = {value}: {source}")]
    Start {
        key: &'static str,
        value: String,
        source: Box<LogicError>,
    },
}

impl LogicError {
    /// `map_err` for a start-up step that opens what `key = value` names.
    pub fn at<E: Into<LogicError>>(key: &'static str, value: &str) -> impl FnOnce(E) -> Self {
        let value = chatroom_common::startup::redact(value);
        move |e| LogicError::Start {
            key,
            value,
            source: Box::new(e.into()),
        }
    }
}

/// The IM routes' `code` (the IM seed's convention: 0 ok, any other value
/// an error explained by `msg`): the one table's number, with logic's
/// room-message checks folded into the HTTP-style codes an IM client knows.
pub fn im_code(c: ErrCode) -> i32 {
    match c {
        ErrCode::BadRoom | ErrCode::BadMessage => ErrCode::BadRequest as i32,
        ErrCode::MessageTooLarge => ErrCode::TooLarge as i32,
        ErrCode::Ok
        | ErrCode::LoginNeeded
        | ErrCode::BadRequest
        | ErrCode::BadCredentials
        | ErrCode::Forbidden
        | ErrCode::NotFound
        | ErrCode::MethodNotAllowed
        | ErrCode::Conflict
        | ErrCode::Gone
        | ErrCode::TooLarge
        | ErrCode::UnsupportedType
        | ErrCode::RateLimited
        | ErrCode::Internal
        | ErrCode::Unavailable => c as i32,
    }
}

/// `/msg`'s and `/tk`'s `code` (the cluster seed's convention): 1 ok, 1001
/// login needed, 0 any other error — except unknown routes and methods,
/// 404 and 405, which no client can take for success whichever convention
/// it follows (`/msg`'s ok is 1, the IM routes' ok is 0).
pub fn msg_code(c: ErrCode) -> i32 {
    match c {
        ErrCode::Ok => 1,
        ErrCode::LoginNeeded => 1001,
        ErrCode::NotFound => ErrCode::NotFound as i32,
        ErrCode::MethodNotAllowed => ErrCode::MethodNotAllowed as i32,
        ErrCode::BadRequest
        | ErrCode::BadCredentials
        | ErrCode::Forbidden
        | ErrCode::Conflict
        | ErrCode::Gone
        | ErrCode::TooLarge
        | ErrCode::UnsupportedType
        | ErrCode::RateLimited
        | ErrCode::Internal
        | ErrCode::Unavailable
        | ErrCode::BadRoom
        | ErrCode::MessageTooLarge
        | ErrCode::BadMessage => 0,
    }
}

/// Why one request failed. `Display` is what the client is told.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("login needed: {0}")]
    LoginNeeded(TokenError),
    #[error("room id is empty")]
    EmptyRoom,
    #[error("room id is longer than {0} bytes")]
    RoomTooLong(usize),
    #[error("room id contains control characters")]
    BadRoomChars,
    #[error("msg is missing")]
    MissingMessage,
    #[error("message is larger than {0} bytes")]
    MessageTooLarge(usize),
    #[error("unknown message level {0}")]
    BadLevel(i32),
    #[error("uid must be 1-64 printable characters")]
    BadUid,
    #[error("invalid request body: {0}")]
    BadBody(String),
    #[error(
        "unsupported content type {0:?}: send application/json or application/x-www-form-urlencoded"
    )]
    UnsupportedContentType(String),
    #[error("request body is larger than {0} bytes")]
    BodyTooLarge(usize),
    #[error("server busy, try again")]
    Busy,
    #[error("message queue unavailable, try again")]
    QueueUnavailable(#[source] QueueError),
    #[error("presence store unavailable, try again")]
    PresenceUnavailable(#[source] PresenceError),
    #[error("room stream store unavailable, try again")]
    StreamUnavailable(#[source] crate::stream::StreamError),
    #[error("token could not be issued")]
    Issue(#[source] TokenError),
    #[error("test tokens are disabled")]
    TestTokenDisabled,
    #[error("not found")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    // ---- IM
    #[error("log in with an IM account first (/user/login)")]
    NotImUser,
    /// An IM request acting for a user other than the token's.
    #[error("id does not match token")]
    UidMismatch,
    /// A sign-in naming a user other than the token's: sign in again.
    #[error("id does not match token")]
    SignInUidMismatch,
    #[error("room ids starting with \"c:\" are reserved for communities")]
    ReservedRoom,
    /// A field is missing or malformed; the text says which.
    #[error("{0}")]
    Invalid(String),
    /// A field is over its limit; the text says which.
    #[error("{0}")]
    TooLarge(String),
    /// Not allowed; the text says why.
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Missing(String),
    #[error("{0}")]
    Conflict(String),
    #[error("wrong mobile number or password")]
    BadCredentials,
    #[error("too many requests, slow down")]
    RateLimited,
    #[error("{0}")]
    UnsupportedType(String),
    #[error("admin token required")]
    AdminAuth,
    #[error("database unavailable, try again")]
    StoreUnavailable(#[source] StoreError),
    #[error("internal error")]
    Internal(String),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::MobileTaken | StoreError::AlreadyFriends => {
                ApiError::Conflict(e.to_string())
            }
            StoreError::NoSuchUser | StoreError::NoSuchCommunity => {
                ApiError::Missing(e.to_string())
            }
            StoreError::SelfFriend => ApiError::Invalid(e.to_string()),
            StoreError::TooManyCommunities(_) => ApiError::Forbidden(e.to_string()),
            other => ApiError::StoreUnavailable(other),
        }
    }
}

impl From<QueueError> for ApiError {
    fn from(e: QueueError) -> Self {
        match e {
            QueueError::Full => ApiError::Busy,
            other => ApiError::QueueUnavailable(other),
        }
    }
}

impl From<crate::stream::StreamError> for ApiError {
    fn from(e: crate::stream::StreamError) -> Self {
        ApiError::StreamUnavailable(e)
    }
}

impl From<PresenceError> for ApiError {
    fn from(e: PresenceError) -> Self {
        ApiError::PresenceUnavailable(e)
    }
}

impl ApiError {
    /// What went wrong, in the one table; also the `Err.code` a gRPC reply
    /// carries to the client.
    pub fn code(&self) -> ErrCode {
        match self {
            ApiError::LoginNeeded(_) | ApiError::NotImUser | ApiError::SignInUidMismatch => {
                ErrCode::LoginNeeded
            }
            ApiError::EmptyRoom | ApiError::RoomTooLong(_) | ApiError::BadRoomChars => {
                ErrCode::BadRoom
            }
            ApiError::MessageTooLarge(_) => ErrCode::MessageTooLarge,
            ApiError::MissingMessage | ApiError::BadLevel(_) => ErrCode::BadMessage,
            ApiError::BadUid | ApiError::BadBody(_) | ApiError::Invalid(_) => ErrCode::BadRequest,
            ApiError::UnsupportedContentType(_) | ApiError::UnsupportedType(_) => {
                ErrCode::UnsupportedType
            }
            ApiError::BodyTooLarge(_) | ApiError::TooLarge(_) => ErrCode::TooLarge,
            ApiError::Busy
            | ApiError::QueueUnavailable(_)
            | ApiError::PresenceUnavailable(_)
            | ApiError::StreamUnavailable(_)
            | ApiError::StoreUnavailable(_) => ErrCode::Unavailable,
            ApiError::Issue(_) | ApiError::Internal(_) => ErrCode::Internal,
            ApiError::NotFound | ApiError::Missing(_) => ErrCode::NotFound,
            ApiError::MethodNotAllowed => ErrCode::MethodNotAllowed,
            // This node hands out no test tokens: refused, not missing.
            ApiError::TestTokenDisabled
            | ApiError::UidMismatch
            | ApiError::ReservedRoom
            | ApiError::Forbidden(_) => ErrCode::Forbidden,
            ApiError::Conflict(_) => ErrCode::Conflict,
            ApiError::BadCredentials | ApiError::AdminAuth => ErrCode::BadCredentials,
            ApiError::RateLimited => ErrCode::RateLimited,
        }
    }

    /// The `Err` code a gRPC reply carries to the client.
    pub fn client_code(&self) -> i32 {
        self.code() as i32
    }

    /// The `code` of the IM HTTP routes (0 is success, never an error).
    pub fn im_code(&self) -> i32 {
        im_code(self.code())
    }

    /// The `code` of `/msg` and `/tk`.
    pub fn http_code(&self) -> i32 {
        msg_code(self.code())
    }

    pub fn http_status(&self) -> StatusCode {
        match self {
            ApiError::LoginNeeded(_)
            | ApiError::NotImUser
            | ApiError::SignInUidMismatch
            | ApiError::BadCredentials
            | ApiError::AdminAuth => StatusCode::UNAUTHORIZED,
            ApiError::BodyTooLarge(_) | ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedContentType(_) | ApiError::UnsupportedType(_) => {
                StatusCode::UNSUPPORTED_MEDIA_TYPE
            }
            ApiError::Busy
            | ApiError::QueueUnavailable(_)
            | ApiError::PresenceUnavailable(_)
            | ApiError::StreamUnavailable(_)
            | ApiError::StoreUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Issue(_) | ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::UidMismatch | ApiError::ReservedRoom | ApiError::Forbidden(_) => {
                StatusCode::FORBIDDEN
            }
            ApiError::Missing(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ApiError::TestTokenDisabled | ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    /// The internal cause, for the log only.
    pub fn cause(&self) -> Option<String> {
        match self {
            ApiError::QueueUnavailable(e) => Some(e.to_string()),
            ApiError::PresenceUnavailable(e) => Some(e.to_string()),
            ApiError::StreamUnavailable(e) => Some(e.to_string()),
            ApiError::Issue(e) => Some(e.to_string()),
            ApiError::StoreUnavailable(e) => Some(e.to_string()),
            ApiError::Internal(e) => Some(e.clone()),
            _ => None,
        }
    }

    /// Writes the warning every failed request gets (inside the request's span).
    pub fn log(&self) {
        match self.cause() {
            Some(cause) => tracing::warn!(reason = %self, %cause, "request failed"),
            None => tracing::warn!(reason = %self, "request failed"),
        }
    }
}

/// The HTTP API's reply: `{code, msg}` or `{code, msg, data}`.
#[derive(Debug, serde::Serialize)]
pub struct Reply<T: serde::Serialize> {
    pub code: i32,
    pub msg: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<T>,
}

impl<T: serde::Serialize> Reply<T> {
    pub fn ok(data: Option<T>) -> Self {
        Reply {
            code: msg_code(ErrCode::Ok),
            msg: "ok".into(),
            data,
        }
    }
}

/// The IM routes' reply: `{code: 0, msg, data}`, `{code: 0, msg, rows,
/// total}`, or `{code: <non-zero>, msg}`.
#[derive(Debug, serde::Serialize)]
pub struct ImReply<T: serde::Serialize> {
    pub code: i32,
    pub msg: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<T>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows: Option<Vec<T>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total: Option<usize>,
}

impl<T: serde::Serialize> ImReply<T> {
    pub fn data(data: T) -> Self {
        ImReply {
            code: im_code(ErrCode::Ok),
            msg: "ok".into(),
            data: Some(data),
            rows: None,
            total: None,
        }
    }

    pub fn rows(rows: Vec<T>) -> Self {
        ImReply {
            code: im_code(ErrCode::Ok),
            msg: "ok".into(),
            data: None,
            total: Some(rows.len()),
            rows: Some(rows),
        }
    }
}

/// What an IM route answers: its reply, or the error. The one place IM
/// results become responses (an error is logged, inside the request's
/// span, and shaped the IM way).
pub type ImResult<T> = Result<ImReply<T>, ImError>;

/// An [`ApiError`] on an IM route (`?` converts).
#[derive(Debug)]
pub struct ImError(pub ApiError);

impl<E: Into<ApiError>> From<E> for ImError {
    fn from(e: E) -> Self {
        ImError(e.into())
    }
}

impl IntoResponse for ImError {
    fn into_response(self) -> Response {
        self.0.log();
        self.0.into_im_response()
    }
}

impl<T: serde::Serialize> IntoResponse for ImReply<T> {
    fn into_response(self) -> Response {
        axum::Json(self).into_response()
    }
}

impl ApiError {
    /// The IM routes' shape of this error (logging is the caller's job).
    pub fn into_im_response(self) -> Response {
        let body = ImReply::<()> {
            code: self.im_code(),
            msg: self.to_string(),
            data: None,
            rows: None,
            total: None,
        };
        (self.http_status(), axum::Json(body)).into_response()
    }
}

impl IntoResponse for ApiError {
    /// Logging is the caller's job (it knows the request's span); this only
    /// shapes the reply.
    fn into_response(self) -> Response {
        let body = Reply::<()> {
            code: self.http_code(),
            msg: self.to_string(),
            data: None,
        };
        (self.http_status(), axum::Json(body)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internals_stay_out_of_the_client_message() {
        let e = ApiError::from(QueueError::Nsq(chatroom_queue::NsqError::Server(
            "E_INTERNAL secret detail".into(),
        )));
        assert_eq!(e.to_string(), "message queue unavailable, try again");
        assert!(e.cause().is_some_and(|c| c.contains("secret detail")));
        assert_eq!(e.http_status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.code(), ErrCode::Unavailable);
    }

    #[test]
    fn codes() {
        let login = ApiError::LoginNeeded(TokenError::Expired);
        assert_eq!(login.to_string(), "login needed: token has expired");
        assert_eq!((login.client_code(), login.http_code()), (100, 1001));
        assert_eq!(login.http_status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            ApiError::from(QueueError::Full).to_string(),
            "server busy, try again"
        );
        assert_eq!(ApiError::EmptyRoom.client_code(), 1002);
        assert_eq!(ApiError::EmptyRoom.http_code(), 0);
        assert_eq!(
            ApiError::BodyTooLarge(1).http_status(),
            StatusCode::PAYLOAD_TOO_LARGE
        );
    }
}

//! The library's error type: everything that can stop a benchmark run or a
//! single session, with enough context to tell which.

use chatroom_common::token::TokenError;

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("websocket: {0}")]
    Ws(#[from] Box<tokio_tungstenite::tungstenite::Error>),
    #[error("http: {0}")]
    Http(String),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("sign-in refused: code {code}: {msg}")]
    SignIn { code: i32, msg: String },
    #[error("timed out: {0}")]
    Timeout(&'static str),
    #[error("worker {worker}: {msg}")]
    Worker { worker: u32, msg: String },
    #[error("token: {0}")]
    Token(#[from] TokenError),
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("connection closed by the server")]
    Closed,
}

impl From<tokio_tungstenite::tungstenite::Error> for BenchError {
    fn from(e: tokio_tungstenite::tungstenite::Error) -> Self {
        BenchError::Ws(Box::new(e))
    }
}

impl BenchError {
    pub(crate) fn config(msg: impl Into<String>) -> Self {
        BenchError::Config(msg.into())
    }

    pub(crate) fn protocol(msg: impl Into<String>) -> Self {
        BenchError::Protocol(msg.into())
    }
}

//! Where session tokens come from: `POST /tk` once per uid, or signed
//! locally with the server's HS256 secret (`--token-secret`), which spares
//! the server thousands of HTTP calls before a large run.

use std::time::Duration;

use chatroom_common::token::Tokens;

use crate::config::TokenSource;
use crate::error::BenchError;
use crate::http::Api;

/// Lifetime of locally signed tokens.
const LOCAL_TTL: Duration = Duration::from_secs(24 * 3600);

/// Issues a token per uid.
#[derive(Debug, Clone)]
pub enum TokenMaker {
    Http(Api),
    Local(Tokens),
}

impl TokenMaker {
    pub fn new(source: &TokenSource, http_url: &str) -> Self {
        match source {
            TokenSource::Http => TokenMaker::Http(Api::new(http_url)),
            TokenSource::Secret { secret } => {
                TokenMaker::Local(Tokens::new(secret.as_bytes(), LOCAL_TTL))
            }
        }
    }

    pub async fn token(&self, uid: &str) -> Result<String, BenchError> {
        match self {
            TokenMaker::Http(api) => api.token(uid).await,
            TokenMaker::Local(t) => Ok(t.issue(uid)?),
        }
    }
}

/// The uid of receiving session `i`.
pub fn session_uid(i: u64) -> String {
    format!("bench-{i}")
}

/// The uid of publisher `j`.
pub fn publisher_uid(j: u32) -> String {
    format!("bench-pub-{j}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_tokens_verify_with_the_same_secret() {
        let secret = "chatroom-dev-secret-change-me";
        let m = TokenMaker::new(
            &TokenSource::Secret {
                secret: secret.into(),
            },
            "http://unused",
        );
        let tok = m.token(&session_uid(7)).await.unwrap();
        let claims = Tokens::new(secret.as_bytes(), LOCAL_TTL)
            .verify(&tok)
            .unwrap();
        assert_eq!(claims.sub, "bench-7");
        assert!(chatroom_common::token::valid_uid(&publisher_uid(65_535)));
    }
}

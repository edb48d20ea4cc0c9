//! Sign-in tokens: HS256 JWTs whose subject is the user id.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("token is empty")]
    Empty,
    #[error("token has expired")]
    Expired,
    #[error("token is invalid: {0}")]
    Invalid(String),
    #[error("uid must be 1-64 printable characters")]
    BadUid,
}

/// What a token says.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    pub iat: u64,
    pub exp: u64,
}

/// Issues and verifies tokens with one secret.
#[derive(Clone)]
pub struct Tokens {
    enc: EncodingKey,
    dec: DecodingKey,
    validation: Validation,
    ttl: Duration,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// A uid is what ends up in logs, Redis keys and room rosters: keep it tame.
pub fn valid_uid(uid: &str) -> bool {
    !uid.is_empty() && uid.len() <= 64 && uid.chars().all(|c| c.is_ascii_graphic())
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Tokens {
    pub fn new(secret: &[u8], ttl: Duration) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Tokens {
            enc: EncodingKey::from_secret(secret),
            dec: DecodingKey::from_secret(secret),
            validation,
            ttl,
        }
    }

    /// A token for `uid` valid for the configured lifetime.
    pub fn issue(&self, uid: &str) -> Result<String, TokenError> {
        self.issue_for(uid, self.ttl)
    }

    /// A token for `uid` valid for `ttl` (zero gives an already expired one, for tests).
    pub fn issue_for(&self, uid: &str, ttl: Duration) -> Result<String, TokenError> {
        if !valid_uid(uid) {
            return Err(TokenError::BadUid);
        }
        let iat = now_secs();
        let claims = Claims {
            sub: uid.to_string(),
            iat,
            exp: iat + ttl.as_secs(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.enc)
            .map_err(|e| TokenError::Invalid(e.to_string()))
    }

    /// The claims of a valid, unexpired token signed with our secret.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let token = token.trim();
        let token = token.strip_prefix("Bearer ").unwrap_or(token).trim();
        if token.is_empty() {
            return Err(TokenError::Empty);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.dec, &self.validation).map_err(
            |e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Invalid(e.to_string()),
            },
        )?;
        // `exp` is checked with zero leeway, but a token issued with ttl 0 has
        // exp == now and must already count as expired.
        if data.claims.exp <= now_secs() {
            return Err(TokenError::Expired);
        }
        if !valid_uid(&data.claims.sub) {
            return Err(TokenError::BadUid);
        }
        Ok(data.claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Tokens {
        Tokens::new(b"0123456789abcdef-secret", Duration::from_secs(60))
    }

    #[test]
    fn round_trip() {
        let t = tokens();
        let tok = t.issue("alice").unwrap();
        assert_eq!(t.verify(&tok).unwrap().sub, "alice");
        assert_eq!(t.verify(&format!("Bearer {tok}")).unwrap().sub, "alice");
    }

    #[test]
    fn rejects_other_secret_expired_garbage() {
        let t = tokens();
        let other = Tokens::new(b"another-secret-of-16+", Duration::from_secs(60));
        let tok = other.issue("bob").unwrap();
        assert!(matches!(t.verify(&tok), Err(TokenError::Invalid(_))));
        let old = t.issue_for("bob", Duration::ZERO).unwrap();
        assert_eq!(t.verify(&old), Err(TokenError::Expired));
        assert!(matches!(t.verify("not.a.jwt"), Err(TokenError::Invalid(_))));
        assert_eq!(t.verify("  "), Err(TokenError::Empty));
        assert_eq!(t.issue(""), Err(TokenError::BadUid));
        assert_eq!(t.issue("has space"), Err(TokenError::BadUid));
    }
}

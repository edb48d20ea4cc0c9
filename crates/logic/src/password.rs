//! Password hashing: argon2id in PHC strings (the parameters travel inside
//! each hash, so changing the cost only affects new hashes). Hashing is
//! deliberately slow, so it runs on the blocking pool.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};

use crate::error::ApiError;

/// Hashes with one cost setting.
#[derive(Debug, Clone, Copy)]
pub struct Passwords {
    memory_kib: u32,
    iterations: u32,
}

impl Passwords {
    pub fn new(memory_kib: u32, iterations: u32) -> Self {
        Passwords {
            memory_kib,
            iterations,
        }
    }

    fn argon2(&self) -> Result<Argon2<'static>, ApiError> {
        let params = Params::new(self.memory_kib, self.iterations, 1, None)
            .map_err(|e| ApiError::Internal(format!("argon2 params: {e}")))?;
        Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
    }

    /// A PHC string for `password` with a fresh random salt.
    pub async fn hash(&self, password: String) -> Result<String, ApiError> {
        let argon2 = self.argon2()?;
        let salt_bytes: [u8; 16] = rand::random();
        tokio::task::spawn_blocking(move || {
            let salt = SaltString::encode_b64(&salt_bytes)
                .map_err(|e| ApiError::Internal(format!("salt: {e}")))?;
            argon2
                .hash_password(password.as_bytes(), &salt)
                .map(|h| h.to_string())
                .map_err(|e| ApiError::Internal(format!("argon2: {e}")))
        })
        .await
        .map_err(|e| ApiError::Internal(format!("hash task: {e}")))?
    }

    /// Whether `password` matches `hash`; a hash that does not parse never
    /// matches (and is logged).
    pub async fn verify(&self, password: String, hash: String) -> Result<bool, ApiError> {
        tokio::task::spawn_blocking(move || match PasswordHash::new(&hash) {
            Ok(parsed) => Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok(),
            Err(e) => {
                tracing::warn!(error = %e, "stored password hash does not parse");
                false
            }
        })
        .await
        .map_err(|e| ApiError::Internal(format!("verify task: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hash_and_verify() {
        let p = Passwords::new(256, 1);
        let h = p.hash("s3cret-pass".into()).await.expect("hash");
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(!h.contains("s3cret"));
        assert!(
            p.verify("s3cret-pass".into(), h.clone())
                .await
                .expect("verify")
        );
        assert!(!p.verify("wrong".into(), h.clone()).await.expect("verify"));
        let h2 = p.hash("s3cret-pass".into()).await.expect("hash");
        assert_ne!(h, h2, "salts differ");
        assert!(
            !p.verify("x".into(), "not a hash".into())
                .await
                .expect("verify")
        );
    }
}

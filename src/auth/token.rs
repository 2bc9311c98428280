//! Access tokens: HS256 JWTs with the claims of DESIGN.md §2. Validation pins the
//! algorithm, requires `exp`, `iss`, `aud` and `sub`, and judges `exp` and `nbf`
//! against the injected clock with an explicit leeway.

use std::time::Duration;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::AuthError;
use crate::config::JwtConfig;

/// The longest token accepted, in bytes.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Why a token is not valid. Mirrors `auth.v1.InvalidReason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InvalidReason {
    /// Not a JWT of ours in shape.
    Malformed,
    /// The signature does not hold.
    BadSignature,
    /// Past `exp` (plus leeway).
    Expired,
    /// Before `nbf` (minus leeway).
    NotYetValid,
    /// `iss` or `aud` is not ours.
    WrongIssuerOrAudience,
    /// Logged out or revoked.
    Revoked,
    /// Its session has ended.
    SessionNotFound,
}

impl InvalidReason {
    /// A stable lower-case name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            InvalidReason::Malformed => "malformed",
            InvalidReason::BadSignature => "bad_signature",
            InvalidReason::Expired => "expired",
            InvalidReason::NotYetValid => "not_yet_valid",
            InvalidReason::WrongIssuerOrAudience => "wrong_issuer_or_audience",
            InvalidReason::Revoked => "revoked",
            InvalidReason::SessionNotFound => "session_not_found",
        }
    }
}

/// The claims authd writes into every token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Issuer.
    pub iss: String,
    /// Audience.
    pub aud: String,
    /// User id.
    pub sub: String,
    /// Username at the time of login.
    pub username: String,
    /// Session id.
    pub sid: String,
    /// Token id: what the blacklist and the logs name.
    pub jti: String,
    /// Issued at (unix seconds).
    pub iat: i64,
    /// Not before (unix seconds).
    pub nbf: i64,
    /// Expires at (unix seconds).
    pub exp: i64,
}

/// Signs and verifies tokens.
pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    issuer: String,
    audience: String,
    ttl: Duration,
    leeway: i64,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKeys")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// A token just issued.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    /// The compact JWT.
    pub token: String,
    /// What it says.
    pub claims: Claims,
}

impl TokenKeys {
    /// Keys and rules from the configuration.
    pub fn new(config: &JwtConfig) -> Self {
        let secret = config.secret.expose();
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.set_issuer(&[&config.issuer]);
        validation.set_audience(&[&config.audience]);
        // exp and nbf are judged below, against the injected clock.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.leeway = 0;
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            ttl: config.ttl,
            leeway: i64::try_from(config.leeway.as_secs()).unwrap_or(i64::MAX),
        }
    }

    /// The leeway on `exp` and `nbf`, in seconds.
    pub fn leeway_seconds(&self) -> i64 {
        self.leeway
    }

    /// Signs a token for a new session.
    pub fn issue(
        &self,
        user_id: &str,
        username: &str,
        session_id: &str,
        now: i64,
    ) -> Result<IssuedToken, AuthError> {
        let ttl = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX / 2);
        let claims = Claims {
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            sub: user_id.to_owned(),
            username: username.to_owned(),
            sid: session_id.to_owned(),
            jti: random_id(),
            iat: now,
            nbf: now,
            exp: now.saturating_add(ttl),
        };
        let token =
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
                .map_err(|e| AuthError::Internal(anyhow::anyhow!("signing a token failed: {e}")))?;
        Ok(IssuedToken { token, claims })
    }

    /// Checks the signature and every claim. Says nothing about revocation.
    pub fn verify(&self, token: &str, now: i64) -> Result<Claims, InvalidReason> {
        let claims = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| reason_for(e.kind()))?
            .claims;
        if now >= claims.exp.saturating_add(self.leeway) {
            return Err(InvalidReason::Expired);
        }
        if now.saturating_add(self.leeway) < claims.nbf {
            return Err(InvalidReason::NotYetValid);
        }
        Ok(claims)
    }
}

fn reason_for(kind: &ErrorKind) -> InvalidReason {
    match kind {
        ErrorKind::InvalidSignature => InvalidReason::BadSignature,
        ErrorKind::InvalidIssuer | ErrorKind::InvalidAudience => {
            InvalidReason::WrongIssuerOrAudience
        }
        ErrorKind::ExpiredSignature => InvalidReason::Expired,
        ErrorKind::ImmatureSignature => InvalidReason::NotYetValid,
        // Wrong algorithm, bad encoding, missing or ill-typed claims, and key problems
        // all mean the token is not one of ours in shape.
        _ => InvalidReason::Malformed,
    }
}

/// 128 random bits, hex-encoded: session ids and `jti`s.
pub fn random_id() -> String {
    let bytes: [u8; 16] = rand::random();
    let mut s = String::with_capacity(32);
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn keys() -> TokenKeys {
        TokenKeys::new(&JwtConfig {
            secret: Secret::new(b"0123456789abcdef0123456789abcdef".to_vec()),
            issuer: "authd".into(),
            audience: "authd".into(),
            ttl: Duration::from_secs(3600),
            leeway: Duration::from_secs(30),
            generated_secret: false,
        })
    }

    #[test]
    fn a_fresh_token_verifies_with_its_claims() {
        let k = keys();
        let t = k.issue("u1", "alice", "s1", 1_000_000).unwrap();
        let c = k.verify(&t.token, 1_000_000).unwrap();
        assert_eq!(c, t.claims);
        assert_eq!(c.exp, 1_003_600);
    }

    #[test]
    fn expiry_honours_the_leeway() {
        let k = keys();
        let t = k.issue("u1", "alice", "s1", 1_000_000).unwrap();
        assert!(k.verify(&t.token, 1_003_600 + 29).is_ok());
        assert_eq!(
            k.verify(&t.token, 1_003_600 + 30),
            Err(InvalidReason::Expired)
        );
    }

    #[test]
    fn not_before_honours_the_leeway() {
        let k = keys();
        let t = k.issue("u1", "alice", "s1", 1_000_000).unwrap();
        assert!(k.verify(&t.token, 1_000_000 - 30).is_ok());
        assert_eq!(
            k.verify(&t.token, 1_000_000 - 31),
            Err(InvalidReason::NotYetValid)
        );
    }

    #[test]
    fn ids_are_random_and_hex() {
        let a = random_id();
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, random_id());
    }
}

//! Access tokens: HS256 JWTs with the claims of DESIGN.md §2. Validation pins the
//! algorithm, requires `exp`, `iss`, `aud` and `sub`, and judges `exp` and `nbf`
//! against the injected clock with an explicit leeway.

use std::time::Duration;

use std::collections::HashMap;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{Jwk, JwkSet, PublicKeyUse, ThumbprintHash};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

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

/// A key that verifies tokens: the active one, or a retired one until the tokens it
/// signed have expired.
struct VerifyingKey {
    decoding: DecodingKey,
    /// The algorithm is pinned per key: a token must name exactly this one.
    validation: Validation,
    /// Public JWK for the JWKS document; `None` for HS256 (a secret is never published).
    public: Option<Jwk>,
    /// Last moment (unix seconds) the key verifies anything; `None` for the active key.
    valid_until: Option<i64>,
}

/// Signs and verifies tokens.
pub struct TokenKeys {
    kid: String,
    algorithm: Algorithm,
    encoding: EncodingKey,
    verifying: HashMap<String, VerifyingKey>,
    issuer: String,
    audience: String,
    ttl: Duration,
    leeway: i64,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKeys")
            .field("kid", &self.kid)
            .field("algorithm", &self.algorithm)
            .field("verifying", &self.verifying.keys().collect::<Vec<_>>())
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

/// A key file that could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct KeyError(pub String);

impl TokenKeys {
    /// Keys and rules from the configuration: reads and checks every key.
    pub fn new(config: &JwtConfig) -> Result<Self, KeyError> {
        let algorithm = config.algorithm.jwt();
        let (encoding, public) = match &config.private_key {
            None => (EncodingKey::from_secret(config.secret.expose()), None),
            Some(pem) => {
                let encoding = encoding_from_pem(algorithm, pem.expose())?;
                let jwk = Jwk::from_encoding_key(&encoding, algorithm)
                    .map_err(|e| KeyError(format!("cannot derive the public key: {e}")))?;
                (encoding, Some(jwk))
            }
        };
        let decoding = match &public {
            None => DecodingKey::from_secret(config.secret.expose()),
            Some(jwk) => DecodingKey::from_jwk(jwk)
                .map_err(|e| KeyError(format!("cannot use the public key: {e}")))?,
        };
        let kid = match (&config.key_id, &public) {
            (Some(kid), _) => kid.clone(),
            (None, Some(jwk)) => thumbprint(jwk)?,
            // A stable name for the secret that reveals nothing useful about it.
            (None, None) => {
                let digest = Sha256::digest(config.secret.expose());
                format!("hs256-{}", hex(&digest[..8]))
            }
        };
        let mut verifying = HashMap::new();
        let ttl_and_leeway =
            i64::try_from((config.ttl + config.leeway).as_secs()).unwrap_or(i64::MAX / 2);
        for retired in &config.retired_keys {
            let (alg, decoding) = decoding_from_pem(&retired.pem)
                .map_err(|e| KeyError(format!("{}: {}", retired.path.display(), e.0)))?;
            let mut jwk = Jwk::from_decoding_key(&decoding, Some(alg))
                .map_err(|e| KeyError(format!("{}: {e}", retired.path.display())))?;
            let kid = thumbprint(&jwk)?;
            jwk.common.key_id = Some(kid.clone());
            jwk.common.public_key_use = Some(PublicKeyUse::Signature);
            verifying.insert(
                kid,
                VerifyingKey {
                    decoding,
                    validation: validation(alg, config),
                    public: Some(jwk),
                    valid_until: Some(retired.retired_at.saturating_add(ttl_and_leeway)),
                },
            );
        }
        let public = public.map(|mut jwk| {
            jwk.common.key_id = Some(kid.clone());
            jwk.common.public_key_use = Some(PublicKeyUse::Signature);
            jwk
        });
        verifying.insert(
            kid.clone(),
            VerifyingKey {
                decoding,
                validation: validation(algorithm, config),
                public,
                valid_until: None,
            },
        );
        Ok(Self {
            kid,
            algorithm,
            encoding,
            verifying,
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            ttl: config.ttl,
            leeway: i64::try_from(config.leeway.as_secs()).unwrap_or(i64::MAX),
        })
    }

    /// The leeway on `exp` and `nbf`, in seconds.
    pub fn leeway_seconds(&self) -> i64 {
        self.leeway
    }

    /// The `iss` tokens carry.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The algorithm new tokens are signed with, as JOSE names it.
    pub fn algorithm_name(&self) -> &'static str {
        match self.algorithm {
            Algorithm::EdDSA => "EdDSA",
            Algorithm::ES256 => "ES256",
            Algorithm::RS256 => "RS256",
            _ => "HS256",
        }
    }

    /// The `kid` new tokens carry.
    pub fn active_kid(&self) -> &str {
        &self.kid
    }

    /// The public keys that verify tokens at `now` (none for HS256), for a JWKS document.
    pub fn jwks(&self, now: i64) -> JwkSet {
        let mut keys: Vec<Jwk> = self
            .verifying
            .values()
            .filter(|k| k.valid_until.is_none_or(|until| now <= until))
            .filter_map(|k| k.public.clone())
            .collect();
        keys.sort_by(|a, b| a.common.key_id.cmp(&b.common.key_id));
        JwkSet { keys }
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
        let mut header = Header::new(self.algorithm);
        header.kid = Some(self.kid.clone());
        let token = jsonwebtoken::encode(&header, &claims, &self.encoding)
            .map_err(|e| AuthError::Internal(anyhow::anyhow!("signing a token failed: {e}")))?;
        Ok(IssuedToken { token, claims })
    }

    /// Checks the signature and every claim. Says nothing about revocation. The key is
    /// chosen by the token's `kid` among the keys configured here — never fetched from
    /// anywhere the token points at; an unknown `kid` is a bad signature. A token with no
    /// `kid` (issued before keys had ids) is tried with the active key.
    pub fn verify(&self, token: &str, now: i64) -> Result<Claims, InvalidReason> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| InvalidReason::Malformed)?;
        let kid = header.kid.as_deref().unwrap_or(&self.kid);
        let key = self
            .verifying
            .get(kid)
            .filter(|k| k.valid_until.is_none_or(|until| now <= until))
            .ok_or(InvalidReason::BadSignature)?;
        let claims = jsonwebtoken::decode::<Claims>(token, &key.decoding, &key.validation)
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

fn validation(algorithm: Algorithm, config: &JwtConfig) -> Validation {
    let mut validation = Validation::new(algorithm);
    validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    validation.set_issuer(&[&config.issuer]);
    validation.set_audience(&[&config.audience]);
    // exp and nbf are judged in `verify`, against the injected clock.
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.leeway = 0;
    validation
}

fn encoding_from_pem(algorithm: Algorithm, pem: &[u8]) -> Result<EncodingKey, KeyError> {
    let key = match algorithm {
        Algorithm::EdDSA => EncodingKey::from_ed_pem(pem),
        Algorithm::ES256 => EncodingKey::from_ec_pem(pem),
        Algorithm::RS256 => EncodingKey::from_rsa_pem(pem),
        other => return Err(KeyError(format!("{other:?} keys are not read from files"))),
    };
    key.map_err(|e| KeyError(format!("not a {algorithm:?} private key in PEM: {e}")))
}

/// A retired key's algorithm and verifying key, from its PEM (public or private).
fn decoding_from_pem(pem: &[u8]) -> Result<(Algorithm, DecodingKey), KeyError> {
    let text = String::from_utf8_lossy(pem);
    if text.contains("PRIVATE KEY") {
        for alg in [Algorithm::EdDSA, Algorithm::ES256, Algorithm::RS256] {
            if let Ok(encoding) = encoding_from_pem(alg, pem) {
                let jwk = Jwk::from_encoding_key(&encoding, alg)
                    .map_err(|e| KeyError(format!("cannot derive the public key: {e}")))?;
                let decoding = DecodingKey::from_jwk(&jwk)
                    .map_err(|e| KeyError(format!("cannot use the public key: {e}")))?;
                return Ok((alg, decoding));
            }
        }
    } else {
        if let Ok(key) = DecodingKey::from_ed_pem(pem) {
            return Ok((Algorithm::EdDSA, key));
        }
        if let Ok(key) = DecodingKey::from_ec_pem(pem) {
            return Ok((Algorithm::ES256, key));
        }
        if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
            return Ok((Algorithm::RS256, key));
        }
    }
    Err(KeyError(
        "not an Ed25519, P-256 or RSA key in PEM".to_owned(),
    ))
}

/// RFC 7638 thumbprint: the `kid` a key gets unless one is configured.
fn thumbprint(jwk: &Jwk) -> Result<String, KeyError> {
    jwk.thumbprint(ThumbprintHash::SHA256)
        .map_err(|e| KeyError(format!("cannot compute the key's thumbprint: {e}")))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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
            algorithm: crate::config::SigningAlgorithm::Hs256,
            private_key: None,
            key_id: None,
            retired_keys: Vec::new(),
            secret: Secret::new(b"0123456789abcdef0123456789abcdef".to_vec()),
            issuer: "authd".into(),
            audience: "authd".into(),
            ttl: Duration::from_secs(3600),
            leeway: Duration::from_secs(30),
            generated_secret: false,
        })
        .unwrap()
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

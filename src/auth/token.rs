//! Access tokens: HS256 JWTs with the claims of docs/design.md §2. Validation pins the
//! algorithm, requires `exp`, `iss`, `aud` and `sub`, and judges `exp` and `nbf`
//! against the injected clock with an explicit leeway.

use std::time::Duration;

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{Jwk, JwkSet, PublicKeyUse, ThumbprintHash};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::AuthError;
use super::token_config::JwtConfig;

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
    /// Good, but its authentication does not meet what the caller asked for (a
    /// second factor, a recent login): RFC 9470.
    InsufficientAuthentication,
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
            InvalidReason::InsufficientAuthentication => "insufficient_authentication",
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
    /// When the user logged in (unix seconds, OpenID Connect's `auth_time`): a
    /// Refresh carries it over unchanged. Absent from tokens issued before refresh
    /// tokens existed, which were issued at login (their `iat`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_time: Option<i64>,
    /// How the user logged in (RFC 8176 `amr`, e.g. `["pwd"]`); carried over by Refresh.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub amr: Vec<String>,
}

impl Claims {
    /// When the user logged in: `auth_time`, or `iat` for a token without it.
    pub fn login_time(&self) -> i64 {
        self.auth_time.unwrap_or(self.iat)
    }
}

/// What an access token is issued for.
#[derive(Debug, Clone)]
pub struct Grant<'a> {
    /// User id.
    pub user_id: &'a str,
    /// Username.
    pub username: &'a str,
    /// Session id.
    pub session_id: &'a str,
    /// Token id.
    pub jti: String,
    /// Issued at (unix seconds).
    pub iat: i64,
    /// `exp` is `iat + JWT_TTL`, but never past this (the session's absolute end).
    pub not_after: i64,
    /// The login time.
    pub auth_time: i64,
    /// How the user logged in.
    pub amr: Vec<String>,
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
    verified: Verified,
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
pub enum KeyError {
    /// The signing key (`JWT_PRIVATE_KEY_FILE`).
    #[error("{0}")]
    SigningKey(String),
    /// A retired key (`JWT_RETIRED_KEYS`).
    #[error("{}: {reason}", path.display())]
    RetiredKey {
        /// Where it was read from.
        path: std::path::PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

impl TokenKeys {
    /// Keys and rules from the configuration: reads and checks every key.
    pub fn new(config: &JwtConfig) -> Result<Self, KeyError> {
        let algorithm = config.algorithm.jwt();
        let (encoding, public) = match &config.private_key {
            None => (EncodingKey::from_secret(config.secret.expose()), None),
            Some(pem) => {
                let encoding =
                    encoding_from_pem(algorithm, pem.expose()).map_err(KeyError::SigningKey)?;
                let jwk = Jwk::from_encoding_key(&encoding, algorithm).map_err(|e| {
                    KeyError::SigningKey(format!("cannot derive the public key: {e}"))
                })?;
                (encoding, Some(jwk))
            }
        };
        let decoding = match &public {
            None => DecodingKey::from_secret(config.secret.expose()),
            Some(jwk) => DecodingKey::from_jwk(jwk)
                .map_err(|e| KeyError::SigningKey(format!("cannot use the public key: {e}")))?,
        };
        let kid = match (&config.key_id, &public) {
            (Some(kid), _) => kid.clone(),
            (None, Some(jwk)) => thumbprint(jwk).map_err(KeyError::SigningKey)?,
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
            let retired_error = |reason: String| KeyError::RetiredKey {
                path: retired.path.clone(),
                reason,
            };
            let (alg, decoding) = decoding_from_pem(&retired.pem).map_err(retired_error)?;
            let mut jwk = Jwk::from_decoding_key(&decoding, Some(alg))
                .map_err(|e| retired_error(e.to_string()))?;
            let kid = thumbprint(&jwk).map_err(retired_error)?;
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
            verified: Verified::new(),
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

    /// Signs a token for a new session opened by a password login at `now`.
    pub fn issue(
        &self,
        user_id: &str,
        username: &str,
        session_id: &str,
        now: i64,
    ) -> Result<IssuedToken, AuthError> {
        self.issue_grant(Grant {
            user_id,
            username,
            session_id,
            jti: random_id(),
            iat: now,
            not_after: i64::MAX,
            auth_time: now,
            amr: vec!["pwd".to_owned()],
        })
    }

    /// Signs a token for `grant`. The same grant gives a token with the same claims
    /// (and, for the deterministic algorithms HS256, EdDSA and RS256, the same bytes).
    pub fn issue_grant(&self, grant: Grant<'_>) -> Result<IssuedToken, AuthError> {
        let ttl = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX / 2);
        let claims = Claims {
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            sub: grant.user_id.to_owned(),
            username: grant.username.to_owned(),
            sid: grant.session_id.to_owned(),
            jti: grant.jti,
            iat: grant.iat,
            nbf: grant.iat,
            exp: grant.iat.saturating_add(ttl).min(grant.not_after),
            auth_time: Some(grant.auth_time),
            amr: grant.amr,
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
        let digest = Verified::digest(token);
        let claims = match self.verified.get(&digest, now) {
            Some(claims) => claims,
            None => {
                let (claims, key_valid_until) = self.verify_signed(token, now)?;
                self.verified.insert(digest, &claims, key_valid_until);
                claims
            }
        };
        if now >= claims.exp.saturating_add(self.leeway) {
            return Err(InvalidReason::Expired);
        }
        if now.saturating_add(self.leeway) < claims.nbf {
            return Err(InvalidReason::NotYetValid);
        }
        Ok(claims)
    }

    /// What does not depend on the time: the key (by `kid`, while it is not retired),
    /// the signature, the algorithm, the issuer, the audience and the required claims.
    /// Returns the claims and the last moment the key verifies anything.
    fn verify_signed(&self, token: &str, now: i64) -> Result<(Claims, Option<i64>), InvalidReason> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| InvalidReason::Malformed)?;
        if asks_for_extensions(&header) {
            return Err(InvalidReason::Malformed);
        }
        let kid = header.kid.as_deref().unwrap_or(&self.kid);
        let key = self
            .verifying
            .get(kid)
            .filter(|k| k.valid_until.is_none_or(|until| now <= until))
            .ok_or(InvalidReason::BadSignature)?;
        let claims = jsonwebtoken::decode::<Claims>(token, &key.decoding, &key.validation)
            .map_err(|e| reason_for(e.kind()))?
            .claims;
        Ok((claims, key.valid_until))
    }
}

/// Tokens whose signature and time-independent claims have been checked. A service
/// presents the same token on every request of a session, and a second look then costs a
/// SHA-256 and a hash lookup instead of two JSON parses of the header, one of the claims
/// and an HMAC: in perf, `TokenKeys::verify` fell from 11 % to 1 % of authd's CPU under
/// ValidateToken load (BENCHMARKS.md). What depends on the time (`exp`, `nbf`, a retired
/// key's end) is judged again on every call; revocation is the session store's business,
/// asked on every call as before.
///
/// Keyed by the token's SHA-256: a token that differs in any byte is verified afresh,
/// and no bearer token is kept in memory. Bounded: [`VERIFIED_SHARDS`] ×
/// [`VERIFIED_PER_SHARD`] tokens, about 5 MiB (32-byte key and the claims' strings each);
/// a full shard is emptied, which costs only re-verifying.
struct Verified {
    shards: Vec<Mutex<HashMap<[u8; 32], VerifiedToken>>>,
}

struct VerifiedToken {
    claims: Claims,
    /// The key's last moment, for a retired key.
    key_valid_until: Option<i64>,
}

const VERIFIED_SHARDS: usize = 16;
const VERIFIED_PER_SHARD: usize = 1024;

impl Verified {
    fn new() -> Self {
        Self {
            shards: (0..VERIFIED_SHARDS)
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
        }
    }

    fn shard(&self, digest: &[u8; 32]) -> &Mutex<HashMap<[u8; 32], VerifiedToken>> {
        &self.shards[usize::from(digest[0]) % self.shards.len()]
    }

    fn digest(token: &str) -> [u8; 32] {
        Sha256::digest(token.as_bytes()).into()
    }

    /// The claims of the token with this digest if it was verified and its key still
    /// verifies at `now`.
    fn get(&self, digest: &[u8; 32], now: i64) -> Option<Claims> {
        let shard = self
            .shard(digest)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let hit = shard.get(digest)?;
        if hit.key_valid_until.is_some_and(|until| now > until) {
            return None;
        }
        Some(hit.claims.clone())
    }

    fn insert(&self, digest: [u8; 32], claims: &Claims, key_valid_until: Option<i64>) {
        let mut shard = self
            .shard(&digest)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if shard.len() >= VERIFIED_PER_SHARD {
            shard.clear();
        }
        shard.insert(
            digest,
            VerifiedToken {
                claims: claims.clone(),
                key_valid_until,
            },
        );
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }
}

/// Whether the header asks the verifier for a JWS extension. authd implements none and
/// never writes one, and RFC 7515 §4.1.11 says a token whose `crit` names an extension the
/// verifier does not understand must be refused — so any `crit` is (an empty one too,
/// which the RFC forbids). `b64` (RFC 7797) would change what the signature covers;
/// jsonwebtoken would verify as if it were absent, so it is refused in any form.
/// The client library's fail-open path applies the same rule to the raw header.
fn asks_for_extensions(header: &Header) -> bool {
    header.crit.is_some() || header.extras.inner().contains_key("b64")
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

fn encoding_from_pem(algorithm: Algorithm, pem: &[u8]) -> Result<EncodingKey, String> {
    let key = match algorithm {
        Algorithm::EdDSA => EncodingKey::from_ed_pem(pem),
        Algorithm::ES256 => EncodingKey::from_ec_pem(pem),
        Algorithm::RS256 => EncodingKey::from_rsa_pem(pem),
        other => return Err(format!("{other:?} keys are not read from files")),
    };
    key.map_err(|e| format!("not a {algorithm:?} private key in PEM: {e}"))
}

/// A retired key's algorithm and verifying key, from its PEM (public or private).
fn decoding_from_pem(pem: &[u8]) -> Result<(Algorithm, DecodingKey), String> {
    let text = String::from_utf8_lossy(pem);
    if text.contains("PRIVATE KEY") {
        for alg in [Algorithm::EdDSA, Algorithm::ES256, Algorithm::RS256] {
            if let Ok(encoding) = encoding_from_pem(alg, pem) {
                let jwk = Jwk::from_encoding_key(&encoding, alg)
                    .map_err(|e| format!("cannot derive the public key: {e}"))?;
                let decoding = DecodingKey::from_jwk(&jwk)
                    .map_err(|e| format!("cannot use the public key: {e}"))?;
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
    Err("not an Ed25519, P-256 or RSA key in PEM".to_owned())
}

/// RFC 7638 thumbprint: the `kid` a key gets unless one is configured.
fn thumbprint(jwk: &Jwk) -> Result<String, String> {
    jwk.thumbprint(ThumbprintHash::SHA256)
        .map_err(|e| format!("cannot compute the key's thumbprint: {e}"))
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
    use crate::secret::Secret;

    fn keys() -> TokenKeys {
        TokenKeys::new(&JwtConfig {
            algorithm: crate::auth::token_config::SigningAlgorithm::Hs256,
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
    fn a_verified_token_is_remembered_and_its_times_judged_on_every_call() {
        let k = keys();
        let t = k.issue("u1", "alice", "s1", 1_000_000).unwrap();
        assert_eq!(k.verify(&t.token, 1_000_000).unwrap(), t.claims);
        assert_eq!(k.verified.len(), 1);
        // What is remembered is what is answered: planted claims come back.
        let planted = Claims {
            username: "planted".into(),
            ..t.claims.clone()
        };
        k.verified
            .insert(Verified::digest(&t.token), &planted, None);
        assert_eq!(k.verify(&t.token, 1_000_001).unwrap(), planted);
        assert_eq!(k.verified.len(), 1);
        // exp and nbf are still judged against `now`.
        assert_eq!(
            k.verify(&t.token, 1_003_600 + 30),
            Err(InvalidReason::Expired)
        );
        assert_eq!(
            k.verify(&t.token, 1_000_000 - 31),
            Err(InvalidReason::NotYetValid)
        );
    }

    #[test]
    fn a_remembered_token_of_a_retired_key_is_verified_afresh_after_the_key_ends() {
        let k = keys();
        let t = k.issue("u1", "alice", "s1", 1_000_000).unwrap();
        let planted = Claims {
            username: "planted".into(),
            ..t.claims.clone()
        };
        // As if verified by a key retired until 1_000_100.
        k.verified
            .insert(Verified::digest(&t.token), &planted, Some(1_000_100));
        assert_eq!(k.verify(&t.token, 1_000_100).unwrap(), planted);
        // Past the key's end the memory is not used: the token is verified again (here
        // by the active key, which signed it).
        assert_eq!(k.verify(&t.token, 1_000_101).unwrap(), t.claims);
    }

    #[test]
    fn a_token_that_differs_from_a_remembered_one_in_any_byte_is_verified_afresh() {
        let k = keys();
        let t = k.issue("u1", "alice", "s1", 1_000_000).unwrap();
        k.verify(&t.token, 1_000_000).unwrap();
        let (signed, signature) = t.token.rsplit_once('.').unwrap();
        let (header, payload) = signed.split_once('.').unwrap();
        let flip = |s: &str, i: usize| {
            let mut b = s.as_bytes().to_vec();
            b[i] = if b[i] == b'A' { b'B' } else { b'A' };
            String::from_utf8(b).unwrap()
        };
        for forged in [
            format!("{signed}.{}", flip(signature, 3)),
            format!("{header}.{}.{signature}", flip(payload, 10)),
            format!("{signed}.{signature}="),
        ] {
            assert!(k.verify(&forged, 1_000_000).is_err(), "{forged} verified");
        }
        // Refusals are not remembered.
        assert_eq!(k.verified.len(), 1);
    }

    #[test]
    fn a_header_asking_for_an_extension_is_malformed_and_not_remembered() {
        let k = keys();
        let t = k.issue("u1", "alice", "s1", 1_000_000).unwrap();
        let with = |edit: &dyn Fn(&mut Header)| {
            let mut header = Header::new(Algorithm::HS256);
            header.kid = Some(k.active_kid().to_owned());
            edit(&mut header);
            let secret = b"0123456789abcdef0123456789abcdef";
            jsonwebtoken::encode(&header, &t.claims, &EncodingKey::from_secret(secret)).unwrap()
        };
        let plain = with(&|_| {});
        for forged in [
            with(&|h| h.crit = Some(vec!["x-unknown".into()])),
            with(&|h| h.crit = Some(Vec::new())),
            with(&|h| {
                h.crit = Some(vec!["b64".into()]);
                h.extras.insert("b64", false);
            }),
            with(&|h| h.extras.insert("b64", false)),
            with(&|h| h.extras.insert("b64", true)),
        ] {
            // Twice: a second look must not find it remembered.
            for _ in 0..2 {
                assert_eq!(
                    k.verify(&forged, 1_000_000),
                    Err(InvalidReason::Malformed),
                    "{forged}"
                );
            }
        }
        assert_eq!(k.verified.len(), 0);
        // The same token without them verifies.
        assert_eq!(k.verify(&plain, 1_000_000).unwrap(), t.claims);
    }

    #[test]
    fn the_memory_of_verified_tokens_is_bounded() {
        let k = keys();
        let tokens: Vec<IssuedToken> = (0..VERIFIED_SHARDS * VERIFIED_PER_SHARD + 500)
            .map(|i| k.issue(&format!("u{i}"), "alice", "s1", 1_000_000).unwrap())
            .collect();
        for t in &tokens {
            assert_eq!(k.verify(&t.token, 1_000_000).unwrap(), t.claims);
        }
        assert!(k.verified.len() <= VERIFIED_SHARDS * VERIFIED_PER_SHARD);
        // Emptied shards cost a verify, never a wrong answer.
        for t in &tokens {
            assert_eq!(k.verify(&t.token, 1_000_001).unwrap(), t.claims);
        }
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

#[cfg(test)]
mod proptests {
    use std::sync::LazyLock;

    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use proptest::prelude::*;
    use serde_json::{Map, Value, json};

    use super::*;
    use crate::auth::token_config::SigningAlgorithm;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const LEEWAY: i64 = 30;
    const TTL: i64 = 3600;
    const NOW: i64 = 1_700_000_000;
    const ED25519: &[u8] = include_bytes!("../../tests/keys/ed25519-old.pem");
    const ED25519_PUBLIC: &[u8] = include_bytes!("../../tests/keys/ed25519-old-public.pem");
    const ED25519_OTHER: &[u8] = include_bytes!("../../tests/keys/ed25519.pem");
    const P256: &[u8] = include_bytes!("../../tests/keys/p256.pem");
    const RSA: &[u8] = include_bytes!("../../tests/keys/rsa.pem");
    const RSA_PUBLIC: &[u8] = include_bytes!("../../tests/keys/rsa-public.pem");

    fn keys_for(algorithm: SigningAlgorithm, pem: Option<&[u8]>) -> TokenKeys {
        let secret = if pem.is_none() { SECRET } else { b"" };
        let config = crate::fuzzing::jwt_config(
            algorithm,
            pem,
            secret,
            ("authd", "authd-api"),
            (TTL as u64, LEEWAY as u64),
        );
        TokenKeys::new(&config).unwrap()
    }

    fn hs256() -> TokenKeys {
        keys_for(SigningAlgorithm::Hs256, None)
    }

    /// One set of keys per algorithm authd signs with, HS256 first.
    static EVERY_ALGORITHM: LazyLock<[TokenKeys; 4]> = LazyLock::new(|| {
        [
            hs256(),
            keys_for(SigningAlgorithm::EdDsa, Some(ED25519)),
            keys_for(SigningAlgorithm::Es256, Some(P256)),
            keys_for(SigningAlgorithm::Rs256, Some(RSA)),
        ]
    });

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// A claim as a token may carry it: right, wrong, ill-typed or missing.
    #[derive(Debug, Clone)]
    enum Field {
        Absent,
        Null,
        Str(String),
        Int(i64),
        Float(f64),
        List(Vec<String>),
    }

    impl Field {
        fn json(&self) -> Option<Value> {
            match self {
                Field::Absent => None,
                Field::Null => Some(Value::Null),
                Field::Str(s) => Some(json!(s)),
                Field::Int(i) => Some(json!(i)),
                Field::Float(f) => Some(json!(f)),
                Field::List(l) => Some(json!(l)),
            }
        }
    }

    fn other_shapes() -> impl Strategy<Value = Field> {
        prop_oneof![
            Just(Field::Absent),
            Just(Field::Null),
            any::<i64>().prop_map(Field::Int),
            (-1e12f64..1e12).prop_map(Field::Float),
            proptest::collection::vec("[a-z-]{0,12}", 0..3).prop_map(Field::List),
        ]
    }

    fn text_claim() -> impl Strategy<Value = Field> {
        prop_oneof![8 => any::<String>().prop_map(Field::Str), 1 => other_shapes()]
    }

    fn ours_or_not(ours: &'static str) -> impl Strategy<Value = Field> {
        prop_oneof![
            8 => Just(Field::Str(ours.into())),
            2 => prop_oneof![
                "[a-z-]{0,12}".prop_map(Field::Str),
                Just(Field::Str(ours.to_uppercase())),
                Just(Field::Str(format!("{ours} "))),
                Just(Field::List(vec![ours.into()])),
            ],
            1 => other_shapes(),
        ]
    }

    /// Times near `NOW` and the leeway's edges, and the extremes.
    fn time_claim() -> impl Strategy<Value = Field> {
        prop_oneof![
            12 => (-2 * LEEWAY..=2 * LEEWAY).prop_map(|d| Field::Int(NOW + d)),
            2 => any::<i64>().prop_map(Field::Int),
            1 => prop_oneof![Just(Field::Int(i64::MAX)), Just(Field::Int(i64::MIN)), Just(Field::Int(0))],
            1 => other_shapes(),
        ]
    }

    #[derive(Debug, Clone)]
    struct RandomClaims {
        iss: Field,
        aud: Field,
        sub: Field,
        username: Field,
        sid: Field,
        jti: Field,
        iat: Field,
        nbf: Field,
        exp: Field,
        extra: Option<(String, i64)>,
    }

    fn random_claims() -> impl Strategy<Value = RandomClaims> {
        (
            (ours_or_not("authd"), ours_or_not("authd-api")),
            (text_claim(), text_claim(), text_claim(), text_claim()),
            (time_claim(), time_claim(), time_claim()),
            proptest::option::of(("[a-z]{1,8}", any::<i64>())),
        )
            .prop_map(
                |((iss, aud), (sub, username, sid, jti), (iat, nbf, exp), extra)| RandomClaims {
                    iss,
                    aud,
                    sub,
                    username,
                    sid,
                    jti,
                    iat,
                    nbf,
                    exp,
                    extra,
                },
            )
    }

    impl RandomClaims {
        fn payload(&self) -> Value {
            let mut map = Map::new();
            if let Some((key, value)) = &self.extra {
                map.insert(key.clone(), json!(value));
            }
            for (name, field) in [
                ("iss", &self.iss),
                ("aud", &self.aud),
                ("sub", &self.sub),
                ("username", &self.username),
                ("sid", &self.sid),
                ("jti", &self.jti),
                ("iat", &self.iat),
                ("nbf", &self.nbf),
                ("exp", &self.exp),
            ] {
                if let Some(v) = field.json() {
                    map.insert(name.into(), v);
                }
            }
            Value::Object(map)
        }

        /// What `verify` must answer at `NOW`, written from docs/design.md §2 rather than
        /// from the code: every claim present with its type, `iss` and `aud` ours,
        /// inside [nbf - leeway, exp + leeway).
        fn expected(&self) -> Result<Claims, InvalidReason> {
            let text = |f: &Field| match f {
                Field::Str(s) => Some(s.clone()),
                _ => None,
            };
            let int = |f: &Field| match f {
                Field::Int(i) => Some(*i),
                _ => None,
            };
            let (
                Some(iss),
                Some(aud),
                Some(sub),
                Some(username),
                Some(sid),
                Some(jti),
                Some(iat),
                Some(nbf),
                Some(exp),
            ) = (
                text(&self.iss),
                text(&self.aud),
                text(&self.sub),
                text(&self.username),
                text(&self.sid),
                text(&self.jti),
                int(&self.iat),
                int(&self.nbf),
                int(&self.exp),
            )
            else {
                return Err(InvalidReason::Malformed);
            };
            if exp < 0 {
                // Not a NumericDate jsonwebtoken reads: as good as absent.
                return Err(InvalidReason::Malformed);
            }
            if iss != "authd" || aud != "authd-api" {
                return Err(InvalidReason::WrongIssuerOrAudience);
            }
            if NOW >= exp.saturating_add(LEEWAY) {
                return Err(InvalidReason::Expired);
            }
            if NOW.saturating_add(LEEWAY) < nbf {
                return Err(InvalidReason::NotYetValid);
            }
            // Two optional claims have a type: `amr` a list of strings, `auth_time` a
            // number.
            let auth_time = match &self.extra {
                Some((key, _)) if key == "amr" => return Err(InvalidReason::Malformed),
                Some((key, value)) if key == "auth_time" => Some(*value),
                _ => None,
            };
            Ok(Claims {
                iss,
                aud,
                sub,
                username,
                sid,
                jti,
                iat,
                nbf,
                exp,
                auth_time,
                amr: Vec::new(),
            })
        }
    }

    fn sign(keys: &TokenKeys, header: &Header, payload: &Value) -> String {
        jsonwebtoken::encode(header, payload, &keys.encoding).unwrap()
    }

    fn our_header(keys: &TokenKeys) -> Header {
        let mut header = Header::new(keys.algorithm);
        header.kid = Some(keys.kid.clone());
        header
    }

    proptest! {
        #![proptest_config(crate::auth::proptest_config(256))]

        #[test]
        fn any_string_is_refused_with_a_reason(token in any::<String>()) {
            let keys = hs256();
            prop_assert!(keys.verify(&token, NOW).is_err());
        }

        #[test]
        fn three_segments_of_junk_are_malformed_or_badly_signed(
            header in "[A-Za-z0-9_-]{0,40}",
            payload in "[A-Za-z0-9_-]{0,40}",
            signature in "[A-Za-z0-9_=+/-]{0,50}",
        ) {
            let keys = hs256();
            let reason = keys.verify(&format!("{header}.{payload}.{signature}"), NOW).unwrap_err();
            prop_assert!(matches!(reason, InvalidReason::Malformed | InvalidReason::BadSignature));
        }

        #[test]
        fn a_forged_signature_over_any_payload_is_refused(
            payload in any::<Vec<u8>>(),
            signature in any::<Vec<u8>>(),
            with_kid in any::<bool>(),
        ) {
            let keys = hs256();
            let mut header = json!({"alg": "HS256", "typ": "JWT"});
            if with_kid {
                header["kid"] = json!(keys.kid);
            }
            let token = format!(
                "{}.{}.{}",
                b64(header.to_string().as_bytes()),
                b64(&payload),
                b64(&signature)
            );
            let reason = keys.verify(&token, NOW).unwrap_err();
            prop_assert!(matches!(reason, InvalidReason::Malformed | InvalidReason::BadSignature));
        }

        #[test]
        fn issued_tokens_verify_until_exp_plus_leeway_and_not_after(
            user_id in any::<String>(),
            username in any::<String>(),
            session_id in any::<String>(),
            issued_at in 0i64..4_000_000_000,
            offset in -2 * LEEWAY..TTL + 2 * LEEWAY,
            which in 0usize..4,
        ) {
            let keys = &EVERY_ALGORITHM[which];
            let issued = keys.issue(&user_id, &username, &session_id, issued_at).unwrap();
            let at = issued_at + offset;
            let got = keys.verify(&issued.token, at);
            if at < issued_at - LEEWAY {
                prop_assert_eq!(got, Err(InvalidReason::NotYetValid));
            } else if at >= issued_at + TTL + LEEWAY {
                prop_assert_eq!(got, Err(InvalidReason::Expired));
            } else {
                prop_assert_eq!(got, Ok(issued.claims));
            }
        }

        #[test]
        fn one_flipped_byte_anywhere_makes_a_token_fail(
            index in any::<proptest::sample::Index>(),
            mask in 1u8..=127,
            which in 0usize..4,
        ) {
            let keys = &EVERY_ALGORITHM[which];
            let issued = keys.issue("u1", "alice", "s1", NOW).unwrap();
            prop_assert!(keys.verify(&issued.token, NOW).is_ok());
            let mut bytes = issued.token.into_bytes();
            let i = index.index(bytes.len());
            // ASCII stays ASCII: the token is still a string, as gRPC would carry it.
            bytes[i] ^= mask;
            let flipped = String::from_utf8(bytes).unwrap();
            prop_assert!(keys.verify(&flipped, NOW).is_err(), "byte {} ^ {:#x} accepted", i, mask);
        }

        #[test]
        fn claims_signed_with_our_key_are_accepted_only_when_right(
            claims in random_claims(),
            which in 0usize..4,
        ) {
            let keys = &EVERY_ALGORITHM[which];
            let token = sign(keys, &our_header(keys), &claims.payload());
            prop_assert_eq!(keys.verify(&token, NOW), claims.expected(), "{}", claims.payload());
        }

        #[test]
        fn an_unknown_kid_is_a_bad_signature_and_no_kid_means_the_active_key(
            kid in proptest::option::of("[A-Za-z0-9_-]{0,20}"),
        ) {
            let keys = hs256();
            let mut header = Header::new(Algorithm::HS256);
            header.kid = kid.clone();
            let issued = keys.issue("u1", "alice", "s1", NOW).unwrap();
            let token = sign(&keys, &header, &json!(issued.claims));
            let got = keys.verify(&token, NOW);
            match kid {
                None => prop_assert_eq!(got, Ok(issued.claims)),
                Some(kid) if kid == keys.kid => prop_assert!(got.is_ok()),
                Some(_) => prop_assert_eq!(got, Err(InvalidReason::BadSignature)),
            }
        }

        #[test]
        fn alg_none_and_hs256_with_the_public_key_are_refused(
            claims in random_claims(),
            which in 1usize..4,
        ) {
            let keys = &EVERY_ALGORITHM[which];
            let payload = claims.payload();
            let body = b64(payload.to_string().as_bytes());
            let kid = json!(keys.kid);
            // alg "none", with and without a signature, and other spellings of it.
            for alg in ["none", "None", "NONE", ""] {
                let header = b64(json!({"alg": alg, "typ": "JWT", "kid": kid}).to_string().as_bytes());
                for signature in ["", "c2ln"] {
                    let token = format!("{header}.{body}.{signature}");
                    prop_assert_eq!(keys.verify(&token, NOW), Err(InvalidReason::Malformed));
                }
            }
            // HS256 keyed with what a verifier of an asymmetric key can see: the
            // published JWK, its parts, a public key's PEM.
            let jwks = serde_json::to_value(keys.jwks(NOW)).unwrap();
            let jwk = &jwks["keys"][0];
            let mut secrets: Vec<Vec<u8>> = vec![jwk.to_string().into_bytes()];
            for part in ["x", "y", "n", "e"] {
                if let Some(v) = jwk[part].as_str() {
                    secrets.push(v.as_bytes().to_vec());
                    secrets.push(URL_SAFE_NO_PAD.decode(v).unwrap());
                }
            }
            secrets.extend([ED25519_PUBLIC.to_vec(), RSA_PUBLIC.to_vec()]);
            let mut header = Header::new(Algorithm::HS256);
            header.kid = Some(keys.kid.clone());
            for secret in secrets {
                let token = jsonwebtoken::encode(&header, &payload, &EncodingKey::from_secret(&secret)).unwrap();
                prop_assert_eq!(keys.verify(&token, NOW), Err(InvalidReason::Malformed));
            }
        }
    }

    #[test]
    fn a_key_embedded_in_the_header_is_ignored() {
        // Signed by another Ed25519 key that the header carries as `jwk`, under our kid.
        let ours = keys_for(SigningAlgorithm::EdDsa, Some(ED25519));
        let attacker = keys_for(SigningAlgorithm::EdDsa, Some(ED25519_OTHER));
        let issued = ours.issue("u1", "alice", "s1", NOW).unwrap();
        let mut header = our_header(&ours);
        header.jwk = attacker.jwks(NOW).keys.into_iter().next();
        let token = sign(&attacker, &header, &json!(issued.claims));
        assert_eq!(ours.verify(&token, NOW), Err(InvalidReason::BadSignature));
    }
}

//! Tokens made by hand, as an attacker or another issuer would make them, and the key
//! files the tests sign with.

use serde::Serialize;

/// Claims for hand-made tokens; every field optional so a test can leave one out.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RawClaims {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exp: Option<i64>,
}

impl RawClaims {
    /// Claims as authd would write them for `now`.
    pub fn good(now: i64) -> Self {
        Self {
            iss: Some("authd".into()),
            aud: Some("authd".into()),
            sub: Some("u".into()),
            username: Some("someone".into()),
            sid: Some("s".into()),
            jti: Some("j".into()),
            iat: Some(now),
            nbf: Some(now),
            exp: Some(now + 3600),
        }
    }

    /// Signed HS256 with `secret`.
    pub fn sign(&self, secret: &str) -> String {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            self,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }
}

/// The path of a key file in `tests/keys/`.
pub fn key(name: &str) -> String {
    format!("{}/tests/keys/{name}", env!("CARGO_MANIFEST_DIR"))
}

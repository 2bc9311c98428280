//! Keys, clock and oracles shared by the fuzz targets. An oracle states what must hold
//! of an answer, worked out from the input on its own rather than from authd's code,
//! and panics (a crash to libFuzzer) when it does not.

use authd::auth::token::{Claims, TokenKeys};
use authd::config::SigningAlgorithm;
use authd::fuzzing::jwt_config;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::Value;

/// The HS256 secret of the fuzzed keys (test-only; it protects nothing).
pub const SECRET: &[u8] = b"fuzzing-secret-0123456789abcdef!";
/// `iss` the keys write and require.
pub const ISSUER: &str = "authd";
/// `aud` the keys write and require.
pub const AUDIENCE: &str = "authd-api";
/// The clock every token is judged at.
pub const NOW: i64 = 1_700_000_000;
/// Leeway on `exp` and `nbf`, seconds.
pub const LEEWAY: i64 = 30;
/// Lifetime of an issued token, seconds.
pub const TTL: i64 = 3600;
/// An Ed25519 key from the test suite.
pub const ED25519: &[u8] = include_bytes!("../../tests/keys/ed25519.pem");

fn keys(algorithm: SigningAlgorithm, pem: Option<&[u8]>) -> TokenKeys {
    let secret = if pem.is_none() { SECRET } else { b"" };
    let config = jwt_config(
        algorithm,
        pem,
        secret,
        (ISSUER, AUDIENCE),
        (TTL as u64, LEEWAY as u64),
    );
    match TokenKeys::new(&config) {
        Ok(keys) => keys,
        Err(e) => panic!("fuzz keys: {e}"),
    }
}

/// HS256 keys with [`SECRET`].
pub fn hs256_keys() -> TokenKeys {
    keys(SigningAlgorithm::Hs256, None)
}

/// EdDSA keys with [`ED25519`].
pub fn ed25519_keys() -> TokenKeys {
    keys(SigningAlgorithm::EdDsa, Some(ED25519))
}

/// A token `keys` accepted at [`NOW`] must be three base64url segments whose header
/// names the key's algorithm (and its `kid`, or none), and whose payload is a JSON
/// object carrying exactly these claims, ours `iss` and `aud`, inside
/// [nbf - leeway, exp + leeway).
pub fn assert_rightly_accepted(keys: &TokenKeys, token: &str, claims: &Claims) {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "accepted a token of {} parts", parts.len());
    let json = |segment: &str| -> Value {
        let bytes = URL_SAFE_NO_PAD
            .decode(segment)
            .unwrap_or_else(|e| panic!("accepted a segment that is not base64url: {e}"));
        // Lossy: serde_json skips an unknown claim's string without checking its UTF-8,
        // so our signature over such bytes verifies. Only our key can sign them; every
        // claim authd reads is checked as a string.
        serde_json::from_str(&String::from_utf8_lossy(&bytes))
            .unwrap_or_else(|e| panic!("accepted a segment that is not JSON: {e}"))
    };
    let header = json(parts[0]);
    assert_eq!(
        header["alg"].as_str(),
        Some(keys.algorithm_name()),
        "accepted a token whose header names another algorithm: {header}"
    );
    match &header["kid"] {
        Value::Null => {}
        kid => assert_eq!(
            kid.as_str(),
            Some(keys.active_kid()),
            "accepted another key's kid"
        ),
    }
    let payload = json(parts[1]);
    assert!(payload.is_object(), "accepted a payload that is no object");
    assert_eq!(payload["iss"].as_str(), Some(ISSUER), "iss: {payload}");
    assert_eq!(payload["aud"].as_str(), Some(AUDIENCE), "aud: {payload}");
    for (name, value) in [
        ("iss", &claims.iss),
        ("aud", &claims.aud),
        ("sub", &claims.sub),
        ("username", &claims.username),
        ("sid", &claims.sid),
        ("jti", &claims.jti),
    ] {
        assert_eq!(
            payload[name].as_str(),
            Some(value.as_str()),
            "{name}: {payload}"
        );
    }
    for (name, value) in [
        ("iat", claims.iat),
        ("nbf", claims.nbf),
        ("exp", claims.exp),
    ] {
        assert_eq!(payload[name].as_i64(), Some(value), "{name}: {payload}");
    }
    assert!(NOW < claims.exp.saturating_add(LEEWAY), "accepted past exp");
    assert!(
        NOW.saturating_add(LEEWAY) >= claims.nbf,
        "accepted before nbf"
    );
}

//! Keys, clock and oracles shared by the fuzz targets. An oracle states what must hold
//! of an answer, worked out from the input on its own rather than from authd's code,
//! and panics (a crash to libFuzzer) when it does not.

use authd::auth::token::{Claims, TokenKeys};
use authd::config::SigningAlgorithm;
use authd::fuzzing::jwt_config;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
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
    let decode = |segment: &str| {
        URL_SAFE_NO_PAD
            .decode(segment)
            .unwrap_or_else(|e| panic!("accepted a segment that is not base64url: {e}"))
    };
    // The members the checks need, read by serde_json on its own. Lenient as every
    // serde struct is: an unknown member is skipped without checking its string's UTF-8
    // or escapes, so our signature over such bytes verifies (the fuzzer found both).
    // Only our key can sign them, and every claim authd reads is checked.
    let header: Header = serde_json::from_slice(&decode(parts[0]))
        .unwrap_or_else(|e| panic!("accepted a header that is not a JSON object: {e}"));
    assert_eq!(
        header.alg.as_ref().and_then(Value::as_str),
        Some(keys.algorithm_name()),
        "accepted a token whose header names another algorithm"
    );
    if let Some(kid) = header.kid.as_ref().filter(|k| !k.is_null()) {
        assert_eq!(
            kid.as_str(),
            Some(keys.active_kid()),
            "accepted another key's kid"
        );
    }
    let payload: Payload = serde_json::from_slice(&decode(parts[1]))
        .unwrap_or_else(|e| panic!("accepted a payload that is not a JSON object: {e}"));
    let text = |v: &Option<Value>| v.as_ref().and_then(Value::as_str).map(str::to_owned);
    let number = |v: &Option<Value>| v.as_ref().and_then(Value::as_i64);
    assert_eq!(text(&payload.iss).as_deref(), Some(ISSUER), "iss");
    assert_eq!(text(&payload.aud).as_deref(), Some(AUDIENCE), "aud");
    for (name, got, value) in [
        ("iss", &payload.iss, &claims.iss),
        ("aud", &payload.aud, &claims.aud),
        ("sub", &payload.sub, &claims.sub),
        ("username", &payload.username, &claims.username),
        ("sid", &payload.sid, &claims.sid),
        ("jti", &payload.jti, &claims.jti),
    ] {
        assert_eq!(text(got).as_ref(), Some(value), "{name}");
    }
    for (name, got, value) in [
        ("iat", &payload.iat, claims.iat),
        ("nbf", &payload.nbf, claims.nbf),
        ("exp", &payload.exp, claims.exp),
    ] {
        assert_eq!(number(got), Some(value), "{name}");
    }
    assert!(NOW < claims.exp.saturating_add(LEEWAY), "accepted past exp");
    assert!(
        NOW.saturating_add(LEEWAY) >= claims.nbf,
        "accepted before nbf"
    );
}

#[derive(Deserialize)]
struct Header {
    alg: Option<Value>,
    kid: Option<Value>,
}

#[derive(Deserialize)]
struct Payload {
    iss: Option<Value>,
    aud: Option<Value>,
    sub: Option<Value>,
    username: Option<Value>,
    sid: Option<Value>,
    jti: Option<Value>,
    iat: Option<Value>,
    nbf: Option<Value>,
    exp: Option<Value>,
}

//! Fixtures shared by the property tests in `src/auth` and the fuzz targets in `fuzz/`.
//! Not part of authd's API.

use std::time::Duration;

use crate::config::{JwtConfig, Secret, SigningAlgorithm};

/// Every `reason` a password violation may carry, as docs/security.md lists them.
pub const PASSWORD_RULES: [&str; 8] = [
    "PASSWORD_TOO_SHORT",
    "PASSWORD_TOO_LONG",
    "PASSWORD_TOO_COMMON",
    "PASSWORD_TOO_WEAK",
    "PASSWORD_NEEDS_UPPERCASE",
    "PASSWORD_NEEDS_LOWERCASE",
    "PASSWORD_NEEDS_DIGIT",
    "PASSWORD_NEEDS_SPECIAL",
];

/// Token settings with `issuer` and `audience`, a lifetime and a leeway in seconds,
/// signing with `private_key` (PEM), or with `secret` (HS256) when there is none.
pub fn jwt_config(
    algorithm: SigningAlgorithm,
    private_key: Option<&[u8]>,
    secret: &[u8],
    (issuer, audience): (&str, &str),
    (ttl, leeway): (u64, u64),
) -> JwtConfig {
    JwtConfig {
        algorithm,
        private_key: private_key.map(|p| Secret::new(p.to_vec())),
        key_id: None,
        retired_keys: Vec::new(),
        secret: Secret::new(secret.to_vec()),
        issuer: issuer.into(),
        audience: audience.into(),
        ttl: Duration::from_secs(ttl),
        leeway: Duration::from_secs(leeway),
        generated_secret: false,
    }
}

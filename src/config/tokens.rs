//! Token settings (`JWT_*`) and the keys they name.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::error::ConfigError;
use super::raw::RawEnv;
use super::values::duration;
use crate::auth::token::{KeyError, TokenKeys};
use crate::auth::token_config::{JwtConfig, RetiredKey, SigningAlgorithm};
use crate::secret::Secret;

/// The smallest `JWT_SECRET` accepted, in bytes.
pub const MIN_JWT_SECRET_BYTES: usize = 32;

/// `JWT_*`: the token settings, and the keys built from them — once, here, so a bad key
/// stops start-up with the variable that named it, and nothing builds them again.
pub(super) fn jwt(
    raw: &RawEnv,
    embedded: bool,
) -> Result<(JwtConfig, Arc<TokenKeys>), ConfigError> {
    let algorithm = match raw
        .jwt_algorithm
        .as_deref()
        .map(str::to_ascii_uppercase)
        .as_deref()
    {
        None | Some("HS256") => SigningAlgorithm::Hs256,
        Some("EDDSA") => SigningAlgorithm::EdDsa,
        Some("ES256") => SigningAlgorithm::Es256,
        Some("RS256") => SigningAlgorithm::Rs256,
        Some(other) => {
            return Err(ConfigError::new(
                "JWT_ALGORITHM",
                format!("must be HS256, EdDSA, ES256 or RS256, got {other:?}"),
            ));
        }
    };
    let private_key = match (&raw.jwt_private_key_file, algorithm) {
        (None, SigningAlgorithm::Hs256) => None,
        (Some(_), SigningAlgorithm::Hs256) => {
            return Err(ConfigError::new(
                "JWT_PRIVATE_KEY_FILE",
                "is for JWT_ALGORITHM=EdDSA, ES256 or RS256; HS256 signs with JWT_SECRET",
            ));
        }
        (None, _) => {
            return Err(ConfigError::new(
                "JWT_PRIVATE_KEY_FILE",
                "is required with an asymmetric JWT_ALGORITHM (a PEM private key)",
            ));
        }
        (Some(path), _) => Some(Secret::new(std::fs::read(path).map_err(|e| {
            ConfigError::new("JWT_PRIVATE_KEY_FILE", format!("cannot read {path:?}: {e}"))
        })?)),
    };
    let (secret, generated_secret) = match (raw.jwt_secret.clone(), algorithm) {
        (Some(secret), _) => (secret.into_bytes(), false),
        (None, SigningAlgorithm::Hs256) if embedded => {
            // Only a single embedded instance may run without a configured key.
            (rand::random::<[u8; 32]>().to_vec(), true)
        }
        (None, SigningAlgorithm::Hs256) => {
            return Err(ConfigError::new(
                "JWT_SECRET",
                format!(
                    "is required with MySQL or Redis configured (at least {MIN_JWT_SECRET_BYTES} bytes)"
                ),
            ));
        }
        // Asymmetric: the secret is not used.
        (None, _) => (Vec::new(), false),
    };
    if algorithm == SigningAlgorithm::Hs256 && secret.len() < MIN_JWT_SECRET_BYTES {
        return Err(ConfigError::new(
            "JWT_SECRET",
            format!(
                "must be at least {MIN_JWT_SECRET_BYTES} bytes, got {}",
                secret.len()
            ),
        ));
    }
    let jwt = JwtConfig {
        algorithm,
        private_key,
        key_id: raw.jwt_key_id.clone(),
        retired_keys: retired_keys(raw.jwt_retired_keys.as_deref())?,
        secret: Secret::new(secret),
        issuer: raw.jwt_issuer.clone().unwrap_or_else(|| "authd".to_owned()),
        audience: raw
            .jwt_audience
            .clone()
            .unwrap_or_else(|| "authd".to_owned()),
        ttl: duration(
            "JWT_TTL",
            raw.jwt_ttl.clone(),
            Duration::from_secs(24 * 3600),
        )?,
        leeway: duration(
            "JWT_LEEWAY",
            raw.jwt_leeway.clone(),
            Duration::from_secs(30),
        )?,
        generated_secret,
    };
    if jwt.ttl < Duration::from_secs(1) {
        return Err(ConfigError::new("JWT_TTL", "must be at least 1s"));
    }
    if jwt.leeway > Duration::from_secs(300) {
        return Err(ConfigError::new("JWT_LEEWAY", "must be at most 5m"));
    }
    let keys = TokenKeys::new(&jwt).map_err(|e| {
        let variable = match &e {
            KeyError::SigningKey(_) => "JWT_PRIVATE_KEY_FILE",
            KeyError::RetiredKey { .. } => "JWT_RETIRED_KEYS",
        };
        ConfigError::new(variable, e.to_string())
    })?;
    Ok((jwt, Arc::new(keys)))
}

/// `path@RFC3339-time,…`: keys that stopped signing at that time.
fn retired_keys(value: Option<&str>) -> Result<Vec<RetiredKey>, ConfigError> {
    let Some(value) = value else {
        return Ok(Vec::new());
    };
    value
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| {
            let (path, at) = item.rsplit_once('@').ok_or_else(|| {
                ConfigError::new(
                    "JWT_RETIRED_KEYS",
                    format!("{item:?} is not path@time (like old.pem@2026-11-28T08:00:00Z)"),
                )
            })?;
            let retired_at = humantime::parse_rfc3339_weak(at).map_err(|_| {
                ConfigError::new(
                    "JWT_RETIRED_KEYS",
                    format!("{at:?} is not a time like 2026-11-28T08:00:00Z"),
                )
            })?;
            let pem = std::fs::read(path).map_err(|e| {
                ConfigError::new("JWT_RETIRED_KEYS", format!("cannot read {path:?}: {e}"))
            })?;
            Ok(RetiredKey {
                path: PathBuf::from(path),
                pem,
                retired_at: crate::clock::unix_seconds(retired_at),
            })
        })
        .collect()
}

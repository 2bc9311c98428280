//! The key of the usernames' keyed hash (`NAME_HASH_KEY`).

use super::error::ConfigError;
use super::raw::RawEnv;
use super::tokens::MIN_JWT_SECRET_BYTES;
use crate::secret::Secret;

/// The smallest `NAME_HASH_KEY` accepted, in bytes.
pub const MIN_NAME_HASH_KEY_BYTES: usize = 32;

/// The key of the usernames' keyed hash (throttle keys, audit rows). At least
/// [`MIN_NAME_HASH_KEY_BYTES`] bytes: there is no way to make one that is shorter, so the
/// hash can never be a plain SHA-256 that a list of likely names reverses.
#[derive(Debug, Clone)]
pub struct NameHashKey {
    key: Secret<Vec<u8>>,
    source: NameHashKeySource,
}

/// Where the name-hash key came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameHashKeySource {
    /// `NAME_HASH_KEY`.
    Configured,
    /// `JWT_SECRET`, which keyed the hash before `NAME_HASH_KEY` existed: existing
    /// throttle counters and audit hashes stay as they were.
    JwtSecret,
    /// Random, made for this process (embedded mode only): hashes change on restart.
    Generated,
}

impl NameHashKey {
    /// `key`, if it is long enough; else `None`.
    pub fn new(key: Vec<u8>, source: NameHashKeySource) -> Option<Self> {
        (key.len() >= MIN_NAME_HASH_KEY_BYTES).then(|| Self {
            key: Secret::new(key),
            source,
        })
    }

    /// A random key for this process.
    pub fn generate() -> Self {
        Self {
            key: Secret::new(rand::random::<[u8; 32]>().to_vec()),
            source: NameHashKeySource::Generated,
        }
    }

    /// The key itself; call only where it is used.
    pub fn expose(&self) -> &[u8] {
        self.key.expose()
    }

    /// Where it came from.
    pub fn source(&self) -> NameHashKeySource {
        self.source
    }
}

/// `NAME_HASH_KEY`; else `JWT_SECRET` (what keyed the hash before, so counters and audit
/// hashes carry over); else, in embedded mode, a random key for this process. With MySQL
/// or Redis (state several instances share, and hashes they must agree on) one of the two
/// is required: an asymmetric `JWT_ALGORITHM` needs no `JWT_SECRET`, and the hash must not
/// go unkeyed for that.
pub(super) fn name_hash_key(raw: &RawEnv, embedded: bool) -> Result<NameHashKey, ConfigError> {
    if let Some(key) = &raw.name_hash_key {
        return NameHashKey::new(key.clone().into_bytes(), NameHashKeySource::Configured)
            .ok_or_else(|| {
                ConfigError::new(
                    "NAME_HASH_KEY",
                    format!(
                        "must be at least {MIN_NAME_HASH_KEY_BYTES} bytes, got {}",
                        key.len()
                    ),
                )
            });
    }
    let from_jwt_secret = raw
        .jwt_secret
        .clone()
        .and_then(|secret| NameHashKey::new(secret.into_bytes(), NameHashKeySource::JwtSecret));
    match from_jwt_secret {
        Some(key) => Ok(key),
        None if embedded => Ok(NameHashKey::generate()),
        None => Err(ConfigError::new(
            "NAME_HASH_KEY",
            format!(
                "is required with MySQL or Redis configured and no JWT_SECRET of at least {MIN_JWT_SECRET_BYTES} bytes (at least {MIN_NAME_HASH_KEY_BYTES} bytes, the same on every instance)"
            ),
        )),
    }
}

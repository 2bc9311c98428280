//! The second factor: the key that seals TOTP secrets at rest (`TOTP_ENCRYPTION_KEY`)
//! and the issuer name authenticator apps show (`TOTP_ISSUER`).

use std::path::PathBuf;

use data_encoding::{BASE64, HEXLOWER_PERMISSIVE};

use super::error::ConfigError;
use super::raw::RawEnv;
use super::storage::UsersBackend;
use crate::secret::Secret;

/// `TOTP_ISSUER` when not set.
pub const DEFAULT_TOTP_ISSUER: &str = "authd";

/// Where the key that seals TOTP secrets comes from. It is never derived from
/// `JWT_SECRET`: a token key that leaks (or rotates) must not open, or lose, the
/// second factors.
#[derive(Debug, Clone)]
pub enum TotpKey {
    /// `TOTP_ENCRYPTION_KEY`: 32 bytes.
    Configured(Secret<[u8; 32]>),
    /// Embedded mode without the setting: a random key made once, in a file beside the
    /// SQLite file (mode 0600), kept across restarts.
    File(PathBuf),
    /// MySQL without the setting: the second factor cannot be used. EnrollTotp answers
    /// FAILED_PRECONDITION, and authd refuses to start while any credential exists.
    Missing,
}

/// The second factor's settings.
#[derive(Debug, Clone)]
pub struct SecondFactorConfig {
    /// The sealing key.
    pub key: TotpKey,
    /// The issuer in `otpauth://` URIs.
    pub issuer: String,
}

/// `TOTP_ENCRYPTION_KEY` (64 hex digits, or base64 of 32 bytes) and `TOTP_ISSUER`.
pub(super) fn second_factor(
    raw: &RawEnv,
    users: &UsersBackend,
) -> Result<SecondFactorConfig, ConfigError> {
    let key = match raw.totp_encryption_key.as_deref().map(str::trim) {
        Some(text) => TotpKey::Configured(Secret::new(parse_key(text).ok_or_else(|| {
            ConfigError::new(
                "TOTP_ENCRYPTION_KEY",
                "must be 32 bytes: 64 hex digits, or base64 (openssl rand -base64 32)",
            )
        })?)),
        None => match users {
            UsersBackend::Sqlite { path } => {
                let mut name = path.as_os_str().to_owned();
                name.push(".totp-key");
                TotpKey::File(PathBuf::from(name))
            }
            UsersBackend::MySql(_) => TotpKey::Missing,
        },
    };
    let issuer = raw
        .totp_issuer
        .clone()
        .unwrap_or_else(|| DEFAULT_TOTP_ISSUER.to_owned());
    if issuer.len() > 64 || issuer.contains(':') || issuer.chars().any(char::is_control) {
        return Err(ConfigError::new(
            "TOTP_ISSUER",
            "must be at most 64 bytes, without ':' or control characters",
        ));
    }
    Ok(SecondFactorConfig { key, issuer })
}

/// 32 bytes from 64 hex digits or from base64.
pub fn parse_key(text: &str) -> Option<[u8; 32]> {
    let bytes = if text.len() == 64 {
        HEXLOWER_PERMISSIVE.decode(text.as_bytes()).ok()?
    } else {
        BASE64.decode(text.as_bytes()).ok()?
    };
    bytes.try_into().ok()
}

//! Refresh tokens: how long a session may last in all, and how long a replayed refresh
//! token is forgiven (docs/design.md §10).

use std::time::Duration;

use super::error::ConfigError;
use super::raw::RawEnv;
use super::values::duration;

/// `SESSION_MAX_LIFETIME` when not set: a month, as long as common identity providers
/// keep a refresh-token family, and well past the default `JWT_TTL` (24 h), so that the
/// default access token is never cut short by it.
pub const DEFAULT_SESSION_MAX_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

/// `REFRESH_REUSE_GRACE` when not set: long enough for a client to retry a Refresh whose
/// answer was lost, short enough that a stolen predecessor is of little use.
pub const DEFAULT_REFRESH_REUSE_GRACE: Duration = Duration::from_secs(30);

/// The longest grace allowed: a replayed predecessor is honoured this long, so it must
/// stay short.
pub const MAX_REFRESH_REUSE_GRACE: Duration = Duration::from_secs(300);

/// Refresh-token rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefreshConfig {
    /// A session ends this long after its login, whatever happens.
    pub session_max_lifetime: Duration,
    /// A refresh token presented again this soon after it was rotated gets the same
    /// successor instead of ending the session.
    pub reuse_grace: Duration,
}

impl Default for RefreshConfig {
    fn default() -> Self {
        Self {
            session_max_lifetime: DEFAULT_SESSION_MAX_LIFETIME,
            reuse_grace: DEFAULT_REFRESH_REUSE_GRACE,
        }
    }
}

/// `SESSION_MAX_LIFETIME` and `REFRESH_REUSE_GRACE`.
pub(super) fn refresh(raw: &RawEnv) -> Result<RefreshConfig, ConfigError> {
    let session_max_lifetime = duration(
        "SESSION_MAX_LIFETIME",
        raw.session_max_lifetime.clone(),
        DEFAULT_SESSION_MAX_LIFETIME,
    )?;
    if session_max_lifetime < Duration::from_secs(1) {
        return Err(ConfigError::new(
            "SESSION_MAX_LIFETIME",
            "must be at least 1s",
        ));
    }
    let reuse_grace = duration(
        "REFRESH_REUSE_GRACE",
        raw.refresh_reuse_grace.clone(),
        DEFAULT_REFRESH_REUSE_GRACE,
    )?;
    if reuse_grace > MAX_REFRESH_REUSE_GRACE {
        return Err(ConfigError::new(
            "REFRESH_REUSE_GRACE",
            "must be at most 5m: a replayed refresh token is honoured that long",
        ));
    }
    Ok(RefreshConfig {
        session_max_lifetime,
        reuse_grace,
    })
}

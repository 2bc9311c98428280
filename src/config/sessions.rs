//! Sessions' lifetime and number.

use std::time::Duration;

use super::error::ConfigError;
use super::raw::RawEnv;
use super::values::{duration, number};

/// Sessions one user may hold when `MAX_SESSIONS_PER_USER` is not set. A person has a
/// few devices and browsers; past this, what piles up is forgotten logins (scripts that
/// never log out), and every Login and ListSessions walks the user's sessions, so the
/// oldest are ended instead.
pub const DEFAULT_MAX_SESSIONS_PER_USER: u32 = 100;

/// `SESSION_IDLE_TIMEOUT`.
pub(super) fn idle_timeout(raw: &RawEnv) -> Result<Duration, ConfigError> {
    let timeout = duration(
        "SESSION_IDLE_TIMEOUT",
        raw.session_idle_timeout.clone(),
        Duration::from_secs(3600),
    )?;
    if timeout < Duration::from_secs(1) {
        return Err(ConfigError::new(
            "SESSION_IDLE_TIMEOUT",
            "must be at least 1s",
        ));
    }
    Ok(timeout)
}

/// `MAX_SESSIONS_PER_USER`.
pub(super) fn max_per_user(raw: &RawEnv) -> Result<u32, ConfigError> {
    number(
        "MAX_SESSIONS_PER_USER",
        raw.max_sessions_per_user.clone(),
        DEFAULT_MAX_SESSIONS_PER_USER,
    )
}

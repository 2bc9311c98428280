//! The instance-local session cache (`SESSION_CACHE*`): off by default (every
//! ValidateToken asks Redis); see docs/design.md §12.

use std::time::Duration;

use super::error::ConfigError;
use super::raw::RawEnv;
use super::values::{choice, duration, number};

/// `SESSION_CACHE_TTL` when unset.
pub const DEFAULT_SESSION_CACHE_TTL: Duration = Duration::from_secs(30);
/// The shortest `SESSION_CACHE_TTL` accepted.
pub const MIN_SESSION_CACHE_TTL: Duration = Duration::from_secs(1);
/// The longest `SESSION_CACHE_TTL` accepted: the worst case of a revocation that no
/// event announced, so it is kept short.
pub const MAX_SESSION_CACHE_TTL: Duration = Duration::from_secs(600);
/// `SESSION_CACHE_MAX_ENTRIES` when unset.
pub const DEFAULT_SESSION_CACHE_MAX_ENTRIES: usize = 100_000;

/// The cache of live-session answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionCacheConfig {
    /// `SESSION_CACHE=on`.
    pub enabled: bool,
    /// How long one answer read from the store may be used, in whole seconds.
    pub ttl: Duration,
    /// Answers held at most.
    pub max_entries: usize,
}

impl Default for SessionCacheConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            ttl: DEFAULT_SESSION_CACHE_TTL,
            max_entries: DEFAULT_SESSION_CACHE_MAX_ENTRIES,
        }
    }
}

/// `SESSION_CACHE`, `SESSION_CACHE_TTL`, `SESSION_CACHE_MAX_ENTRIES`.
pub(super) fn session_cache(raw: &RawEnv) -> Result<SessionCacheConfig, ConfigError> {
    let enabled = choice(
        "SESSION_CACHE",
        raw.session_cache.as_deref(),
        &[("off", false), ("on", true)],
    )?;
    let ttl = duration(
        "SESSION_CACHE_TTL",
        raw.session_cache_ttl.clone(),
        DEFAULT_SESSION_CACHE_TTL,
    )?;
    if ttl < MIN_SESSION_CACHE_TTL || ttl > MAX_SESSION_CACHE_TTL || ttl.subsec_nanos() != 0 {
        return Err(ConfigError::new(
            "SESSION_CACHE_TTL",
            format!(
                "must be whole seconds from 1s to 10m, got {}",
                humantime::format_duration(ttl)
            ),
        ));
    }
    let max_entries = number(
        "SESSION_CACHE_MAX_ENTRIES",
        raw.session_cache_max_entries.clone(),
        DEFAULT_SESSION_CACHE_MAX_ENTRIES,
    )?;
    if max_entries == 0 {
        return Err(ConfigError::new(
            "SESSION_CACHE_MAX_ENTRIES",
            "must be at least 1",
        ));
    }
    Ok(SessionCacheConfig {
        enabled,
        ttl,
        max_entries,
    })
}

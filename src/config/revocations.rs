//! The revocation log and its watchers (`REVOCATION_*`, `WATCH_*`).

use std::time::Duration;

use super::error::ConfigError;
use super::raw::RawEnv;
use super::values::{duration, number};
use crate::secret::Secret;

/// Who may follow WatchRevocations, and how many streams at once.
#[derive(Debug, Clone)]
pub struct WatchersConfig {
    /// Credentials a watcher presents as `authorization: Bearer <credential>`; none
    /// configured: nobody may watch.
    pub credentials: Vec<Secret<String>>,
    /// Streams open at once on this instance.
    pub max_streams: usize,
    /// Streams open at once on one connection.
    pub max_streams_per_connection: usize,
}

/// The shortest watcher credential accepted, in bytes.
pub const MIN_WATCH_CREDENTIAL_BYTES: usize = 32;

pub(super) fn watchers(raw: &RawEnv) -> Result<WatchersConfig, ConfigError> {
    let credentials = raw
        .watch_credentials
        .as_deref()
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| {
            if c.len() < MIN_WATCH_CREDENTIAL_BYTES {
                Err(ConfigError::new(
                    "WATCH_CREDENTIALS",
                    format!(
                        "each credential must be at least {MIN_WATCH_CREDENTIAL_BYTES} bytes, one is {}",
                        c.len()
                    ),
                ))
            } else {
                Ok(Secret::new(c.to_owned()))
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(WatchersConfig {
        credentials,
        max_streams: at_least_one(
            "WATCH_MAX_STREAMS",
            number(
                "WATCH_MAX_STREAMS",
                raw.watch_max_streams.clone(),
                1024usize,
            )?,
        )?,
        max_streams_per_connection: at_least_one(
            "WATCH_MAX_STREAMS_PER_CONNECTION",
            number(
                "WATCH_MAX_STREAMS_PER_CONNECTION",
                raw.watch_max_streams_per_connection.clone(),
                4usize,
            )?,
        )?,
    })
}

/// `REVOCATION_LOG_MAX_LEN`.
pub(super) fn log_max_len(raw: &RawEnv) -> Result<usize, ConfigError> {
    at_least_one(
        "REVOCATION_LOG_MAX_LEN",
        number(
            "REVOCATION_LOG_MAX_LEN",
            raw.revocation_log_max_len.clone(),
            100_000usize,
        )?,
    )
}

/// `REVOCATION_MEMORY_MAX`.
pub(super) fn memory_max(raw: &RawEnv) -> Result<usize, ConfigError> {
    at_least_one(
        "REVOCATION_MEMORY_MAX",
        number(
            "REVOCATION_MEMORY_MAX",
            raw.revocation_memory_max.clone(),
            100_000usize,
        )?,
    )
}

/// `WATCH_HEARTBEAT`.
pub(super) fn heartbeat(raw: &RawEnv) -> Result<Duration, ConfigError> {
    let heartbeat = duration(
        "WATCH_HEARTBEAT",
        raw.watch_heartbeat.clone(),
        Duration::from_secs(5),
    )?;
    if heartbeat < Duration::from_millis(10) {
        return Err(ConfigError::new("WATCH_HEARTBEAT", "must be at least 10ms"));
    }
    Ok(heartbeat)
}

fn at_least_one(variable: &'static str, n: usize) -> Result<usize, ConfigError> {
    if n == 0 {
        Err(ConfigError::new(variable, "must be at least 1"))
    } else {
        Ok(n)
    }
}

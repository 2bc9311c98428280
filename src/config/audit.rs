//! The audit trail (`AUDIT_*`).

use std::time::Duration;

use super::error::ConfigError;
use super::raw::RawEnv;
use super::values::{duration, number};

/// The audit trail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditConfig {
    /// Rows older than this are deleted.
    pub retention: Duration,
    /// How often old rows are deleted.
    pub purge_interval: Duration,
    /// Events that may wait to be written; beyond, they reach only the log.
    pub queue: usize,
}

pub(super) fn audit(raw: &RawEnv) -> Result<AuditConfig, ConfigError> {
    let retention = duration(
        "AUDIT_RETENTION",
        raw.audit_retention.clone(),
        Duration::from_secs(90 * 24 * 3600),
    )?;
    if retention < Duration::from_secs(60) {
        return Err(ConfigError::new("AUDIT_RETENTION", "must be at least 1m"));
    }
    let purge_interval = duration(
        "AUDIT_PURGE_INTERVAL",
        raw.audit_purge_interval.clone(),
        Duration::from_secs(3600),
    )?;
    if purge_interval < Duration::from_millis(10) {
        return Err(ConfigError::new(
            "AUDIT_PURGE_INTERVAL",
            "must be at least 10ms",
        ));
    }
    let queue = number("AUDIT_QUEUE", raw.audit_queue.clone(), 10_000usize)?;
    if queue == 0 {
        return Err(ConfigError::new("AUDIT_QUEUE", "must be at least 1"));
    }
    Ok(AuditConfig {
        retention,
        purge_interval,
        queue,
    })
}

//! Throttling of failed attempts and registrations (`THROTTLE_*`).

use std::time::Duration;

use super::error::ConfigError;
use super::raw::RawEnv;
use super::values::{duration, number};

/// One throttle: how many failures within a window before callers must wait, and the
/// longest wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottleLimit {
    /// Failures after which every further attempt waits out a backoff.
    pub threshold: u32,
    /// The count is forgotten once this long passes without a failure (after any wait).
    pub window: Duration,
    /// The longest wait the backoff reaches.
    pub max_delay: Duration,
}

/// Login throttling: per canonical account and per client address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottleConfig {
    /// Failed logins (and wrong current passwords) of one account.
    pub account: ThrottleLimit,
    /// Failed logins from one client address (IPv6: its /64).
    pub address: ThrottleLimit,
    /// Register calls from one client address, successful or not: account creation
    /// and name probing are rationed per address.
    pub register: ThrottleLimit,
    /// Wrong second-factor codes of one user (TOTP or recovery codes, at login and at
    /// step-up): a long window, so that waiting it out gives only a handful of guesses
    /// a day (docs/security.md).
    pub second_factor: ThrottleLimit,
    /// The first wait past a threshold; each further failure doubles it, up to the cap.
    pub base_delay: Duration,
}

/// The second factor's default window: a week, so that waiting the count out is slow.
/// A success resets the count, so a user who mistypes a code loses nothing by it.
const SECOND_FACTOR_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);

pub(super) fn throttle(raw: &RawEnv) -> Result<ThrottleConfig, ConfigError> {
    let base_delay = duration(
        "THROTTLE_BASE_DELAY",
        raw.throttle_base_delay.clone(),
        Duration::from_secs(1),
    )?;
    if base_delay < Duration::from_millis(1) {
        return Err(ConfigError::new(
            "THROTTLE_BASE_DELAY",
            "must be at least 1ms",
        ));
    }
    let limit = |names: [&'static str; 3],
                 values: [Option<String>; 3],
                 defaults: (u32, Duration, Duration)|
     -> Result<ThrottleLimit, ConfigError> {
        let [threshold, window, max_delay] = values;
        let limit = ThrottleLimit {
            threshold: number(names[0], threshold, defaults.0)?,
            window: duration(names[1], window, defaults.1)?,
            max_delay: duration(names[2], max_delay, defaults.2)?,
        };
        if limit.threshold == 0 {
            return Err(ConfigError::new(names[0], "must be at least 1"));
        }
        if limit.window < Duration::from_secs(1) {
            return Err(ConfigError::new(names[1], "must be at least 1s"));
        }
        if limit.max_delay < base_delay {
            return Err(ConfigError::new(
                names[2],
                format!("must be at least THROTTLE_BASE_DELAY ({base_delay:?})"),
            ));
        }
        Ok(limit)
    };
    Ok(ThrottleConfig {
        account: limit(
            [
                "THROTTLE_ACCOUNT_THRESHOLD",
                "THROTTLE_ACCOUNT_WINDOW",
                "THROTTLE_ACCOUNT_MAX_DELAY",
            ],
            [
                raw.throttle_account_threshold.clone(),
                raw.throttle_account_window.clone(),
                raw.throttle_account_max_delay.clone(),
            ],
            (
                10,
                Duration::from_secs(15 * 60),
                Duration::from_secs(5 * 60),
            ),
        )?,
        address: limit(
            [
                "THROTTLE_ADDRESS_THRESHOLD",
                "THROTTLE_ADDRESS_WINDOW",
                "THROTTLE_ADDRESS_MAX_DELAY",
            ],
            [
                raw.throttle_address_threshold.clone(),
                raw.throttle_address_window.clone(),
                raw.throttle_address_max_delay.clone(),
            ],
            (5, Duration::from_secs(15 * 60), Duration::from_secs(3600)),
        )?,
        register: limit(
            [
                "THROTTLE_REGISTER_THRESHOLD",
                "THROTTLE_REGISTER_WINDOW",
                "THROTTLE_REGISTER_MAX_DELAY",
            ],
            [
                raw.throttle_register_threshold.clone(),
                raw.throttle_register_window.clone(),
                raw.throttle_register_max_delay.clone(),
            ],
            (20, Duration::from_secs(3600), Duration::from_secs(3600)),
        )?,
        second_factor: limit(
            [
                "THROTTLE_SECOND_FACTOR_THRESHOLD",
                "THROTTLE_SECOND_FACTOR_WINDOW",
                "THROTTLE_SECOND_FACTOR_MAX_DELAY",
            ],
            [
                raw.throttle_second_factor_threshold.clone(),
                raw.throttle_second_factor_window.clone(),
                raw.throttle_second_factor_max_delay.clone(),
            ],
            (5, SECOND_FACTOR_WINDOW, Duration::from_secs(24 * 3600)),
        )?,
        base_delay,
    })
}

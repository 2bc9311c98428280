//! How one value is read: numbers, durations, sizes, booleans, choices.

use std::str::FromStr;
use std::time::Duration;

use super::error::ConfigError;

/// One of `choices` (case-insensitive); the first when unset.
pub(super) fn choice<T: Copy>(
    variable: &'static str,
    value: Option<&str>,
    choices: &[(&str, T)],
) -> Result<T, ConfigError> {
    let Some(value) = value else {
        return choices
            .first()
            .map(|(_, v)| *v)
            .ok_or_else(|| ConfigError::new(variable, "has no possible value"));
    };
    let lower = value.trim().to_ascii_lowercase();
    choices
        .iter()
        .find(|(name, _)| *name == lower)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
            ConfigError::new(
                variable,
                format!("must be {}, got {lower:?}", names.join(" or ")),
            )
        })
}

pub(super) fn duration(
    variable: &'static str,
    value: Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) => humantime::parse_duration(v.trim()).map_err(|_| {
            ConfigError::new(
                variable,
                format!("{v:?} is not a duration (write it like 24h, 90m, 30s or 250ms)"),
            )
        }),
    }
}

/// A duration that must be more than zero.
pub(super) fn positive_duration(
    variable: &'static str,
    value: Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let d = duration(variable, value, default)?;
    if d.is_zero() {
        return Err(ConfigError::new(variable, "must be more than 0s"));
    }
    Ok(d)
}

/// A size in bytes: a plain number, or one with a `KiB` or `MiB` suffix.
pub(super) fn bytes(
    variable: &'static str,
    value: Option<String>,
    default: usize,
) -> Result<usize, ConfigError> {
    let Some(v) = value else {
        return Ok(default);
    };
    let text = v.trim().to_ascii_lowercase();
    let (digits, unit) = if let Some(n) = text.strip_suffix("kib") {
        (n, 1024)
    } else if let Some(n) = text.strip_suffix("mib") {
        (n, 1024 * 1024)
    } else {
        (text.strip_suffix('b').unwrap_or(&text), 1)
    };
    digits
        .trim()
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .ok_or_else(|| {
            ConfigError::new(
                variable,
                format!("{v:?} is not a size (write it like 65536, 64KiB or 1MiB)"),
            )
        })
}

pub(super) fn number<T: FromStr>(
    variable: &'static str,
    value: Option<String>,
    default: T,
) -> Result<T, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) => v
            .trim()
            .parse()
            .map_err(|_| ConfigError::new(variable, format!("{v:?} is not a valid number"))),
    }
}

pub(super) fn boolean(
    variable: &'static str,
    value: Option<String>,
    default: bool,
) -> Result<bool, ConfigError> {
    match value.as_deref().map(str::to_ascii_lowercase).as_deref() {
        None => Ok(default),
        Some("true" | "1" | "yes" | "on") => Ok(true),
        Some("false" | "0" | "no" | "off") => Ok(false),
        Some(other) => Err(ConfigError::new(
            variable,
            format!("must be true or false, got {other:?}"),
        )),
    }
}

pub(super) fn parse<T: FromStr>(
    variable: &'static str,
    value: &str,
    expected: &str,
) -> Result<T, ConfigError> {
    value
        .trim()
        .parse()
        .map_err(|_| ConfigError::new(variable, format!("{value:?} is not {expected}")))
}

/// Percent-encodes everything but unreserved characters, for a password inside a URL.
pub(super) fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

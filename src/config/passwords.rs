//! Password hashing (`BCRYPT_*`) and the policy for new passwords.

use super::error::ConfigError;
use super::raw::RawEnv;
use super::values::{choice, number};

/// Password hashing settings.
#[derive(Debug, Clone)]
pub struct BcryptConfig {
    /// bcrypt cost for new hashes; lower-cost hashes are upgraded on login.
    pub cost: u32,
    /// Threads that hash; defaults to the number of cores.
    pub workers: usize,
    /// Hash jobs that may wait for a thread before Login answers RESOURCE_EXHAUSTED.
    pub queue: usize,
    /// Jobs (running or waiting) one client address may hold at once, whatever the call,
    /// so no address can take the whole pool from the others.
    pub max_per_address: usize,
    /// How the hashing threads yield the CPU to the rest of authd.
    pub priority: HashPriority,
}

/// The CPU priority of the bcrypt threads (`BCRYPT_NICE`), Linux only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashPriority {
    /// `SCHED_IDLE`: run only when no other thread of the machine wants the core, and give
    /// it up at once when one wakes (a ValidateToken during a Login storm).
    Idle,
    /// Unix niceness 0–19 under the normal policy (0: the same as the rest of authd).
    Nice(i32),
}

/// Which rules new passwords follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordPolicyMode {
    /// Upper, lower, digit and special character; at least `min_length` characters.
    Classic,
    /// NIST SP 800-63B: length and strength only, no composition rules.
    Nist,
}

/// The password policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PasswordPolicy {
    /// Which rules.
    pub mode: PasswordPolicyMode,
    /// Shortest password, in characters (Unicode code points).
    pub min_length: usize,
    /// Lowest zxcvbn score (0–4) accepted in `nist` mode.
    pub min_strength: u8,
}

pub(super) fn password_policy(raw: &RawEnv) -> Result<PasswordPolicy, ConfigError> {
    let mode = choice(
        "PASSWORD_POLICY",
        raw.password_policy.as_deref(),
        &[
            ("classic", PasswordPolicyMode::Classic),
            ("nist", PasswordPolicyMode::Nist),
        ],
    )?;
    let default_length = match mode {
        PasswordPolicyMode::Classic => 8,
        PasswordPolicyMode::Nist => 15,
    };
    let min_length = number(
        "PASSWORD_MIN_LENGTH",
        raw.password_min_length.clone(),
        default_length,
    )?;
    if !(8..=64).contains(&min_length) {
        return Err(ConfigError::new(
            "PASSWORD_MIN_LENGTH",
            format!("must be between 8 and 64, got {min_length}"),
        ));
    }
    let min_strength = number(
        "PASSWORD_MIN_STRENGTH",
        raw.password_min_strength.clone(),
        3u8,
    )?;
    if min_strength > 4 {
        return Err(ConfigError::new(
            "PASSWORD_MIN_STRENGTH",
            format!("must be a zxcvbn score from 0 to 4, got {min_strength}"),
        ));
    }
    Ok(PasswordPolicy {
        mode,
        min_length,
        min_strength,
    })
}

/// `BCRYPT_NICE`: `idle` (the default) or a niceness 0–19.
fn hash_priority(value: Option<String>) -> Result<HashPriority, ConfigError> {
    match value.as_deref().map(str::trim) {
        None => Ok(HashPriority::Idle),
        Some(v) if v.eq_ignore_ascii_case("idle") => Ok(HashPriority::Idle),
        Some(v) => v
            .parse::<i32>()
            .ok()
            .filter(|n| (0..=19).contains(n))
            .map(HashPriority::Nice)
            .ok_or_else(|| {
                ConfigError::new(
                    "BCRYPT_NICE",
                    format!("must be idle or between 0 and 19, got {v:?}"),
                )
            }),
    }
}

/// `BCRYPT_*`.
pub(super) fn bcrypt(raw: &RawEnv) -> Result<BcryptConfig, ConfigError> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cost = number("BCRYPT_COST", raw.bcrypt_cost.clone(), 12u32)?;
    if !(4..=31).contains(&cost) {
        return Err(ConfigError::new(
            "BCRYPT_COST",
            format!("must be between 4 and 31, got {cost}"),
        ));
    }
    let workers = number("BCRYPT_WORKERS", raw.bcrypt_workers.clone(), cores)?;
    if workers == 0 {
        return Err(ConfigError::new("BCRYPT_WORKERS", "must be at least 1"));
    }
    let queue = number("BCRYPT_QUEUE", raw.bcrypt_queue.clone(), workers * 4)?;
    // A quarter of the pool by default: it takes four busy addresses to fill it, and
    // everyone else still finds a slot while one address floods.
    let max_per_address = number(
        "BCRYPT_MAX_PER_ADDRESS",
        raw.bcrypt_max_per_address.clone(),
        ((workers + queue) / 4).max(1),
    )?;
    if max_per_address == 0 {
        return Err(ConfigError::new(
            "BCRYPT_MAX_PER_ADDRESS",
            "must be at least 1",
        ));
    }
    Ok(BcryptConfig {
        cost,
        workers,
        queue,
        max_per_address,
        priority: hash_priority(raw.bcrypt_nice.clone())?,
    })
}

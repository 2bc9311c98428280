//! Login throttling: failures are counted per canonical account and per client
//! address; past a threshold the next attempts must wait out a backoff that doubles
//! with each further failure, up to a cap, and then unlock by themselves. A refused
//! attempt costs no bcrypt and is the same for accounts that exist and accounts that
//! do not (both are counted alike, by a keyed hash of the name).

use std::net::IpAddr;
use std::time::Duration;

use super::AuthError;
use super::error::Store;
use crate::config::{ThrottleConfig, ThrottleLimit};
use crate::store::StoreError;
use crate::store::throttle::{Limit, ThrottleStore};

/// Which counter made a caller wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The account's.
    Account,
    /// The client address's.
    Address,
}

impl Scope {
    /// For logs and audit rows.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Account => "account",
            Scope::Address => "address",
        }
    }
}

/// A failure that made its account or address wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lockout {
    /// Whose counter.
    pub scope: Scope,
    /// Failures counted.
    pub failures: u32,
    /// How long attempts now wait.
    pub wait: Duration,
}

/// Who an attempt is counted against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    account: String,
    address: String,
}

impl Subject {
    /// The counters of the account whose canonical name hashes to `name_hash`, and of
    /// the client address `ip` (an IPv6 address counts as its /64, which one client
    /// usually holds whole; anything unparsable counts as one "unknown" address).
    pub fn new(name_hash: &str, ip: &str) -> Self {
        let address = match ip.parse::<IpAddr>().map(|ip| ip.to_canonical()) {
            Ok(IpAddr::V4(v4)) => v4.to_string(),
            Ok(IpAddr::V6(v6)) => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
            Err(_) => "unknown".to_owned(),
        };
        Self {
            account: format!("account:{name_hash}"),
            address: format!("address:{address}"),
        }
    }
}

/// The throttle: its rules and where its counters live.
#[derive(Debug)]
pub struct Throttle {
    store: ThrottleStore,
    account: Limit,
    address: Limit,
}

impl Throttle {
    /// `config`'s rules over `store`.
    pub fn new(config: &ThrottleConfig, store: ThrottleStore) -> Self {
        let limit = |l: &ThrottleLimit| Limit {
            threshold: l.threshold,
            window_ms: millis(l.window),
            base_delay_ms: millis(config.base_delay),
            max_delay_ms: millis(l.max_delay),
        };
        Self {
            store,
            account: limit(&config.account),
            address: limit(&config.address),
        }
    }

    /// `Throttled` while the account or the address must wait. Needs the counters'
    /// store: when it cannot be asked, nothing is checked and the call is UNAVAILABLE.
    pub async fn check(&self, who: &Subject, now_ms: i64) -> Result<(), AuthError> {
        let until = self
            .store
            .locked_until(&[&who.account, &who.address])
            .await
            .map_err(store_error)?;
        if until > now_ms {
            let wait = u64::try_from(until - now_ms).unwrap_or(u64::MAX);
            return Err(AuthError::Throttled {
                retry_after: Duration::from_millis(wait),
            });
        }
        Ok(())
    }

    /// Counts a failure against both; returns the counters it made wait.
    pub async fn failed(&self, who: &Subject, now_ms: i64) -> Result<Vec<Lockout>, StoreError> {
        let counted = self
            .store
            .record_failure(
                &[(&who.account, self.account), (&who.address, self.address)],
                now_ms,
            )
            .await?;
        Ok([Scope::Account, Scope::Address]
            .into_iter()
            .zip(counted)
            .filter(|(_, c)| c.locked_until_ms > now_ms)
            .map(|(scope, c)| Lockout {
                scope,
                failures: c.count,
                wait: Duration::from_millis(
                    u64::try_from(c.locked_until_ms - now_ms).unwrap_or(u64::MAX),
                ),
            })
            .collect())
    }

    /// A success: the account's count starts again. The address's does not, or one
    /// good account would let its owner guess at every other one.
    pub async fn succeeded(&self, who: &Subject) -> Result<(), StoreError> {
        self.store.reset(&who.account).await
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4)
}

fn store_error(e: StoreError) -> AuthError {
    match e {
        StoreError::Unavailable(source) => AuthError::Unavailable {
            store: Store::Sessions,
            source,
        },
        StoreError::Internal(source) => AuthError::Internal(source.context("throttle store")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_addresses_count_by_their_64_and_mapped_ipv4_as_ipv4() {
        let a = Subject::new("h", "2001:db8:1:2:aaaa::1");
        let b = Subject::new("h", "2001:db8:1:2:bbbb::9");
        let c = Subject::new("h", "2001:db8:1:3::1");
        assert_eq!(a.address, b.address);
        assert_ne!(a.address, c.address);
        assert_eq!(
            Subject::new("h", "::ffff:10.0.0.1").address,
            "address:10.0.0.1"
        );
        assert_eq!(Subject::new("h", "").address, "address:unknown");
    }
}

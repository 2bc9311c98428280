//! Login throttling: attempts are counted per canonical account and per client
//! address; past a threshold the next attempts must wait out a backoff that doubles
//! with each further attempt counted, up to a cap, and then unlock by themselves. An
//! attempt is counted *before* its password is checked, in the same atomic step that
//! checks the wait, so no burst, on one instance or across many, gets more than the
//! threshold's worth of guesses checked; a success gives its count back. A refused
//! attempt costs no bcrypt and is the same for accounts that exist and accounts that
//! do not (both are counted alike, by a keyed hash of the name). Register calls are
//! rationed per address on counters of their own.

use std::net::IpAddr;
use std::time::Duration;

use super::AuthError;
use super::error::Store;
use crate::config::{ThrottleConfig, ThrottleLimit};
use crate::store::StoreError;
use crate::store::throttle::{Counted, Limit, Reservation, ThrottleStore};

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
    /// the client address `ip` (see [`address_key`]).
    pub fn new(name_hash: &str, ip: &str) -> Self {
        Self {
            account: format!("account:{name_hash}"),
            address: format!("address:{}", address_key(ip)),
        }
    }

    /// The second factor's counters, apart from the password's: the user (by id) and
    /// the client address. Wrong codes never lock out password attempts, nor the
    /// reverse.
    pub fn second_factor(user_id: &str, ip: &str) -> Self {
        Self {
            account: format!("mfa-user:{user_id}"),
            address: format!("mfa-address:{}", address_key(ip)),
        }
    }
}

/// A client address as it is counted: an IPv6 address as its /64, which one client
/// usually holds whole; an IPv4-mapped one as IPv4; anything unparsable as one
/// "unknown" address.
pub fn address_key(ip: &str) -> String {
    match ip.parse::<IpAddr>().map(|ip| ip.to_canonical()) {
        Ok(IpAddr::V4(v4)) => v4.to_string(),
        Ok(IpAddr::V6(v6)) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
        Err(_) => "unknown".to_owned(),
    }
}

/// An attempt counted on its account and address, before its password is checked.
/// Settle it: a failure keeps the counts ([`Throttle::lockouts`] says which waits it
/// set), a success gives them back ([`Throttle::succeeded`]), and an attempt that never
/// got its password checked gives them back too ([`Throttle::withdraw`]).
#[derive(Debug, Clone, Copy)]
#[must_use = "an attempt is settled as a failure, a success or withdrawn"]
pub struct Attempt {
    account: Counted,
    address: Counted,
    at_ms: i64,
}

/// The throttle: its rules and where its counters live.
#[derive(Debug)]
pub struct Throttle {
    store: ThrottleStore,
    account: Limit,
    address: Limit,
    register: Limit,
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
            register: limit(&config.register),
        }
    }

    /// Counts an attempt against the account and the address, or `Throttled` while
    /// either must wait (then nothing is counted). Needs the counters' store: when it
    /// cannot be asked, nothing is checked and the call is UNAVAILABLE.
    pub async fn admit(&self, who: &Subject, now_ms: i64) -> Result<Attempt, AuthError> {
        let counted = self
            .reserve(
                &[(&who.account, self.account), (&who.address, self.address)],
                now_ms,
            )
            .await?;
        match counted[..] {
            [account, address] => Ok(Attempt {
                account,
                address,
                at_ms: now_ms,
            }),
            _ => Err(AuthError::Internal(anyhow::anyhow!(
                "throttle store answered {} counters for 2",
                counted.len()
            ))),
        }
    }

    /// Counts a Register call from `ip`, or `RegistrationThrottled` while the address
    /// must wait. Every call counts, whatever its outcome: creating accounts and
    /// probing names are what is rationed.
    pub async fn admit_registration(&self, ip: &str, now_ms: i64) -> Result<(), AuthError> {
        let key = format!("register:{}", address_key(ip));
        match self.reserve(&[(&key, self.register)], now_ms).await {
            Err(AuthError::Throttled { retry_after }) => {
                Err(AuthError::RegistrationThrottled { retry_after })
            }
            other => other.map(|_| ()),
        }
    }

    /// Refuses a Refresh from `ip` while the address must wait for its bad refresh
    /// tokens. A look only: a good token costs no write (see [`Throttle::refresh_failed`]).
    pub async fn admit_refresh(&self, ip: &str, now_ms: i64) -> Result<(), AuthError> {
        let key = refresh_key(ip);
        let until = self
            .store
            .locked_until(&[&key])
            .await
            .map_err(store_error)?;
        if until > now_ms {
            return Err(throttled(until, now_ms));
        }
        Ok(())
    }

    /// Counts a bad refresh token from `ip`, with the address limits of failed logins
    /// (its own counter, so bad refresh tokens do not lock the address out of Login).
    /// Returns the lockout it caused, if any.
    pub async fn refresh_failed(
        &self,
        ip: &str,
        now_ms: i64,
    ) -> Result<Option<Lockout>, StoreError> {
        let key = refresh_key(ip);
        Ok(
            match self.store.reserve(&[(&key, self.address)], now_ms).await? {
                Reservation::Admitted(counted) => counted
                    .first()
                    .filter(|c| c.locked_until_ms > now_ms)
                    .map(|c| Lockout {
                        scope: Scope::Address,
                        failures: c.count,
                        wait: Duration::from_millis(
                            u64::try_from(c.locked_until_ms - now_ms).unwrap_or(u64::MAX),
                        ),
                    }),
                Reservation::Refused { .. } => None,
            },
        )
    }

    /// A cheap look first (a refused flood writes nothing), then the atomic count.
    async fn reserve(
        &self,
        counters: &[(&str, Limit)],
        now_ms: i64,
    ) -> Result<Vec<Counted>, AuthError> {
        let keys: Vec<&str> = counters.iter().map(|(k, _)| *k).collect();
        let until = self.store.locked_until(&keys).await.map_err(store_error)?;
        if until > now_ms {
            return Err(throttled(until, now_ms));
        }
        match self
            .store
            .reserve(counters, now_ms)
            .await
            .map_err(store_error)?
        {
            Reservation::Admitted(counted) => Ok(counted),
            Reservation::Refused { until_ms } => Err(throttled(until_ms, now_ms)),
        }
    }

    /// The attempt failed: its counts stay. The counters it made wait, to report.
    pub fn lockouts(&self, attempt: &Attempt) -> Vec<Lockout> {
        [
            (Scope::Account, attempt.account),
            (Scope::Address, attempt.address),
        ]
        .into_iter()
        .filter(|(_, c)| c.locked_until_ms > attempt.at_ms)
        .map(|(scope, c)| Lockout {
            scope,
            failures: c.count,
            wait: Duration::from_millis(
                u64::try_from(c.locked_until_ms - attempt.at_ms).unwrap_or(u64::MAX),
            ),
        })
        .collect()
    }

    /// A success: the account's count starts again. The address only gives this
    /// attempt back, or one good account would let its owner guess at every other one.
    pub async fn succeeded(
        &self,
        who: &Subject,
        attempt: Attempt,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let address = [(who.address.as_str(), self.address, attempt.address)];
        let (reset, release) = tokio::join!(
            self.store.reset(&who.account),
            self.store.release(&address, now_ms)
        );
        reset.and(release)
    }

    /// Forgets the failures counted against the account whose canonical name hashes to
    /// `name_hash` (UnlockUser): its attempts need not wait any more.
    pub async fn unlock_account(&self, name_hash: &str) -> Result<(), StoreError> {
        self.store.reset(&format!("account:{name_hash}")).await
    }

    /// The password was never checked (the call was shed or a store failed): the
    /// attempt is given back on both counters.
    pub async fn withdraw(
        &self,
        who: &Subject,
        attempt: Attempt,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.store
            .release(
                &[
                    (&who.account, self.account, attempt.account),
                    (&who.address, self.address, attempt.address),
                ],
                now_ms,
            )
            .await
    }
}

/// The counter of an address's bad refresh tokens.
fn refresh_key(ip: &str) -> String {
    format!("refresh:{}", address_key(ip))
}

fn throttled(until_ms: i64, now_ms: i64) -> AuthError {
    AuthError::Throttled {
        retry_after: Duration::from_millis(u64::try_from(until_ms - now_ms).unwrap_or(u64::MAX)),
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

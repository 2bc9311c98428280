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

/// Which limits an account counter follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Factor {
    Password,
    Second,
}

/// Who an attempt is counted against: an account (or user), and the client address
/// unless the caller is already identified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    account: String,
    address: Option<String>,
    factor: Factor,
}

impl Subject {
    /// The counters of the account whose canonical name hashes to `name_hash`, and of
    /// the client address `ip` (see [`address_key`]).
    pub fn new(name_hash: &str, ip: &str) -> Self {
        Self {
            account: format!("account:{name_hash}"),
            address: Some(format!("address:{}", address_key(ip))),
            factor: Factor::Password,
        }
    }

    /// The second factor's counters, apart from the password's: the user (by id), with
    /// the second factor's limits, and the client address. Wrong codes never lock out
    /// password attempts, nor the reverse.
    pub fn second_factor(user_id: &str, ip: &str) -> Self {
        Self {
            address: Some(format!("mfa-address:{}", address_key(ip))),
            ..Self::second_factor_of_bearer(user_id)
        }
    }

    /// The second factor's user counter alone, for a caller whose bearer token already
    /// names the user (step-up, ConfirmTotp): its wrong codes are its own, and must not
    /// lock out the others behind its address (a gateway, a NAT).
    pub fn second_factor_of_bearer(user_id: &str) -> Self {
        Self {
            account: format!("mfa-user:{user_id}"),
            address: None,
            factor: Factor::Second,
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
    address: Option<Counted>,
    at_ms: i64,
}

/// The throttle: its rules and where its counters live.
#[derive(Debug)]
pub struct Throttle {
    store: ThrottleStore,
    account: Limit,
    address: Limit,
    register: Limit,
    second_factor: Limit,
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
            second_factor: limit(&config.second_factor),
        }
    }

    /// The counters `who` is counted on, with their limits: the account's, then the
    /// address's if any.
    fn counters<'a>(&self, who: &'a Subject) -> Vec<(&'a str, Limit)> {
        let account = match who.factor {
            Factor::Password => self.account,
            Factor::Second => self.second_factor,
        };
        let mut counters = vec![(who.account.as_str(), account)];
        if let Some(address) = &who.address {
            counters.push((address, self.address));
        }
        counters
    }

    /// Counts an attempt against the account and the address (if `who` has one), or
    /// `Throttled` while either must wait (then nothing is counted). Needs the counters'
    /// store: when it cannot be asked, nothing is checked and the call is UNAVAILABLE.
    pub async fn admit(&self, who: &Subject, now_ms: i64) -> Result<Attempt, AuthError> {
        let counters = self.counters(who);
        let counted = self.reserve(&counters, now_ms).await?;
        match (&counted[..], who.address.is_some()) {
            (&[account, address], true) => Ok(Attempt {
                account,
                address: Some(address),
                at_ms: now_ms,
            }),
            (&[account], false) => Ok(Attempt {
                account,
                address: None,
                at_ms: now_ms,
            }),
            _ => Err(AuthError::Internal(anyhow::anyhow!(
                "throttle store answered {} counters for {}",
                counted.len(),
                counters.len()
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
        self.look(&refresh_key(ip), now_ms).await
    }

    /// Counts a bad refresh token from `ip`, with the address limits of failed logins
    /// (its own counter, so bad refresh tokens do not lock the address out of Login).
    /// Returns the lockout it caused, if any.
    pub async fn refresh_failed(
        &self,
        ip: &str,
        now_ms: i64,
    ) -> Result<Option<Lockout>, StoreError> {
        self.address_failed(&refresh_key(ip), now_ms).await
    }

    /// Refuses a VerifySecondFactor from `ip` while the address must wait for its
    /// malformed or unknown tickets. A look only, like [`Throttle::admit_refresh`].
    pub async fn admit_ticket(&self, ip: &str, now_ms: i64) -> Result<(), AuthError> {
        self.look(&ticket_key(ip), now_ms).await
    }

    /// Counts a malformed or unknown ticket from `ip`, with the address limits of
    /// failed logins, on a counter of its own. Returns the lockout it caused, if any.
    pub async fn ticket_failed(
        &self,
        ip: &str,
        now_ms: i64,
    ) -> Result<Option<Lockout>, StoreError> {
        self.address_failed(&ticket_key(ip), now_ms).await
    }

    /// `Throttled` while the counter `key` must wait; writes nothing.
    async fn look(&self, key: &str, now_ms: i64) -> Result<(), AuthError> {
        let until = self.store.locked_until(&[key]).await.map_err(store_error)?;
        if until > now_ms {
            return Err(throttled(until, now_ms));
        }
        Ok(())
    }

    /// Counts a failure on the address counter `key`; the lockout it caused, if any.
    async fn address_failed(&self, key: &str, now_ms: i64) -> Result<Option<Lockout>, StoreError> {
        Ok(
            match self.store.reserve(&[(key, self.address)], now_ms).await? {
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
            (Scope::Account, Some(attempt.account)),
            (Scope::Address, attempt.address),
        ]
        .into_iter()
        .filter_map(|(scope, c)| Some((scope, c?)))
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
        let address: Vec<_> = who
            .address
            .as_deref()
            .zip(attempt.address)
            .map(|(key, counted)| (key, self.address, counted))
            .into_iter()
            .collect();
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
        let counted = [Some(attempt.account), attempt.address];
        let released: Vec<_> = self
            .counters(who)
            .into_iter()
            .zip(counted)
            .filter_map(|((key, limit), c)| Some((key, limit, c?)))
            .collect();
        self.store.release(&released, now_ms).await
    }
}

/// The counter of an address's bad refresh tokens.
fn refresh_key(ip: &str) -> String {
    format!("refresh:{}", address_key(ip))
}

/// The counter of an address's malformed or unknown second-factor tickets.
fn ticket_key(ip: &str) -> String {
    format!("mfa-ticket:{}", address_key(ip))
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
            Subject::new("h", "::ffff:10.0.0.1").address.as_deref(),
            Some("address:10.0.0.1")
        );
        assert_eq!(
            Subject::new("h", "").address.as_deref(),
            Some("address:unknown")
        );
        assert_eq!(Subject::second_factor_of_bearer("u").address, None);
    }
}

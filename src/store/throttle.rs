//! Attempt counters for throttling: in Redis, shared by every instance, or (embedded
//! mode) in this process with the same semantics.
//!
//! A counter holds the number of attempts counted, the time of the last one and, once
//! the count reaches its threshold, the time until which attempts are refused. An
//! attempt is counted *before* its password is checked, in the same atomic step that
//! checks the wait ([`ThrottleStore::reserve`]): concurrent attempts, on one instance or
//! many, can never all slip in under the threshold. An attempt that turns out not to be
//! a failure gives its count back ([`ThrottleStore::release`]) or clears the counter
//! ([`ThrottleStore::reset`]). Each attempt counted at or past the threshold sets the
//! wait to `base × 2^(count − threshold)`, capped. The counter is forgotten once
//! `window` passes after the last attempt and any wait it set, so every key carries a
//! TTL and nothing is kept for ever. Times are the caller's clock, in milliseconds.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use redis::Script;

use crate::store::StoreError;
use crate::store::redis_conn::RedisConn;

/// One counter's rules, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// Attempts after which further attempts wait.
    pub threshold: u32,
    /// Quiet time after which the count is forgotten.
    pub window_ms: i64,
    /// The first wait.
    pub base_delay_ms: i64,
    /// The longest wait.
    pub max_delay_ms: i64,
}

impl Limit {
    /// The wait the `count`-th counted attempt sets (0 below the threshold).
    pub fn delay_ms(&self, count: u32) -> i64 {
        if count < self.threshold {
            return 0;
        }
        let doublings = (count - self.threshold).min(40);
        self.base_delay_ms
            .saturating_mul(1_i64 << doublings)
            .min(self.max_delay_ms)
    }
}

/// One counter after an attempt was counted on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counted {
    /// Attempts within the window, this one included.
    pub count: u32,
    /// Attempts are refused before this time (ms); in the past when not locked.
    pub locked_until_ms: i64,
    /// The wait before this attempt, restored if it is released.
    pub previous_until_ms: i64,
}

/// The answer to [`ThrottleStore::reserve`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reservation {
    /// Counted on every counter, in order.
    Admitted(Vec<Counted>),
    /// A counter must wait until this time (ms); nothing was counted.
    Refused {
        /// The latest wait among the counters that refused.
        until_ms: i64,
    },
}

/// The stored state of one counter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Entry {
    count: u32,
    last_ms: i64,
    locked_until_ms: i64,
}

impl Entry {
    /// When the counter is forgotten.
    fn expires_at(&self, limit_window_ms: i64) -> i64 {
        self.last_ms
            .max(self.locked_until_ms)
            .saturating_add(limit_window_ms)
    }

    /// As it stands at `now`: forgotten once expired.
    fn current(self, now: i64, limit: &Limit) -> Self {
        if self.expires_at(limit.window_ms) <= now {
            Self::default()
        } else {
            self
        }
    }

    /// The state after an attempt at `now` is counted (the caller has checked that it
    /// need not wait). The same rule as [`RESERVE`] in Lua.
    fn after_attempt(self, now: i64, limit: &Limit) -> Self {
        let mut next = self.current(now, limit);
        next.count = next.count.saturating_add(1);
        next.last_ms = now;
        if next.count >= limit.threshold {
            next.locked_until_ms = now.saturating_add(limit.delay_ms(next.count));
        }
        next
    }

    /// The state after `counted` is given back; `None` when nothing is left. The same
    /// rule as [`RELEASE`] in Lua.
    fn after_release(self, counted: &Counted) -> Option<Self> {
        let mut next = self;
        next.count = next.count.checked_sub(1).filter(|n| *n > 0)?;
        // The wait this attempt set goes, unless a later attempt set another since.
        if next.locked_until_ms == counted.locked_until_ms {
            next.locked_until_ms = counted.previous_until_ms;
        }
        Some(next)
    }
}

/// KEYS: the counter. ARGV: now, window, threshold, base delay, max delay (ms).
/// Refuses ({0, n, until, until}) while the counter's wait lasts; otherwise counts the
/// attempt and returns {1, n, until, until before}. Mirrors `Entry::after_attempt`.
const RESERVE: &str = r"
local now, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local threshold, base, cap = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local f = redis.call('HMGET', KEYS[1], 'n', 'last', 'until')
local n, last, untl = tonumber(f[1]) or 0, tonumber(f[2]) or 0, tonumber(f[3]) or 0
if math.max(last, untl) + window <= now then
  n = 0
  untl = 0
end
if untl > now then
  return {0, n, untl, untl}
end
local before = untl
n = n + 1
if n >= threshold then
  local delay = cap
  local doublings = n - threshold
  if doublings < 40 then delay = math.min(base * 2 ^ doublings, cap) end
  untl = now + delay
end
redis.call('HSET', KEYS[1], 'n', n, 'last', now, 'until', untl)
redis.call('PEXPIRE', KEYS[1], math.max(untl, now) - now + window)
return {1, n, untl, before}
";

/// KEYS: the counter. ARGV: now, window, the wait the attempt set, the wait before it.
/// Gives one counted attempt back. Mirrors `Entry::after_release`.
const RELEASE: &str = r"
local now, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local set, before = tonumber(ARGV[3]), tonumber(ARGV[4])
local f = redis.call('HMGET', KEYS[1], 'n', 'last', 'until')
if not f[1] then return 0 end
local n, last, untl = tonumber(f[1]) - 1, tonumber(f[2]) or 0, tonumber(f[3]) or 0
if untl == set then untl = before end
local ttl = math.max(untl, last) - now + window
if n <= 0 or ttl <= 0 then
  redis.call('DEL', KEYS[1])
  return 0
end
redis.call('HSET', KEYS[1], 'n', n, 'until', untl)
redis.call('PEXPIRE', KEYS[1], ttl)
return n
";

/// Where the counters live.
#[derive(Debug)]
pub enum ThrottleStore {
    /// Redis, shared by every instance.
    Redis(RedisThrottle),
    /// This process only.
    Memory(MemoryThrottle),
}

impl ThrottleStore {
    /// The latest `locked_until` (ms) among `keys`; 0 when none is set. A cheap look
    /// that writes nothing, before [`ThrottleStore::reserve`]: a refused flood costs no
    /// writes.
    pub async fn locked_until(&self, keys: &[&str]) -> Result<i64, StoreError> {
        match self {
            Self::Redis(r) => r.locked_until(keys).await,
            Self::Memory(m) => Ok(m.locked_until(keys)),
        }
    }

    /// Counts one attempt on every counter, unless one of them must wait: then none
    /// keeps it.
    pub async fn reserve(
        &self,
        counters: &[(&str, Limit)],
        now_ms: i64,
    ) -> Result<Reservation, StoreError> {
        match self {
            Self::Redis(r) => r.reserve(counters, now_ms).await,
            Self::Memory(m) => Ok(m.reserve(counters, now_ms)),
        }
    }

    /// Gives back attempts [`ThrottleStore::reserve`] counted, with the waits they set.
    pub async fn release(
        &self,
        counted: &[(&str, Limit, Counted)],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        match self {
            Self::Redis(r) => r.release(counted, now_ms).await,
            Self::Memory(m) => {
                m.release(counted);
                Ok(())
            }
        }
    }

    /// Forgets a counter.
    pub async fn reset(&self, key: &str) -> Result<(), StoreError> {
        match self {
            Self::Redis(r) => r.reset(key).await,
            Self::Memory(m) => {
                m.reset(key);
                Ok(())
            }
        }
    }
}

/// Counters in Redis: `<prefix>throttle:<key>`, a hash `n last until` with a TTL.
pub struct RedisThrottle {
    conn: RedisConn,
    prefix: String,
    reserve: Script,
    release: Script,
}

impl std::fmt::Debug for RedisThrottle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisThrottle")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisThrottle {
    /// Counters on `conn`, under `prefix`.
    pub fn new(conn: RedisConn, prefix: &str) -> Self {
        Self {
            conn,
            prefix: prefix.to_owned(),
            reserve: Script::new(RESERVE),
            release: Script::new(RELEASE),
        }
    }

    fn key(&self, key: &str) -> String {
        format!("{}throttle:{key}", self.prefix)
    }

    async fn locked_until(&self, keys: &[&str]) -> Result<i64, StoreError> {
        // One command per key, sent at once: on a cluster each key has a slot of its
        // own, and on one server the multiplexed connection pipelines them anyway.
        let found = futures::future::try_join_all(keys.iter().map(|key| {
            let key = self.key(key);
            self.conn.run(|mut c| async move {
                redis::cmd("HGET")
                    .arg(&key)
                    .arg("until")
                    .query_async::<Option<i64>>(&mut c)
                    .await
            })
        }))
        .await?;
        Ok(found.into_iter().flatten().max().unwrap_or(0))
    }

    async fn reserve(
        &self,
        counters: &[(&str, Limit)],
        now_ms: i64,
    ) -> Result<Reservation, StoreError> {
        // One script per key (each touches only its own key, as Redis Cluster wants:
        // the keys lie in different slots), sent at once.
        let replies = futures::future::try_join_all(counters.iter().map(|(key, limit)| {
            let mut inv = self.reserve.prepare_invoke();
            inv.key(self.key(key))
                .arg(now_ms)
                .arg(limit.window_ms)
                .arg(limit.threshold)
                .arg(limit.base_delay_ms)
                .arg(limit.max_delay_ms);
            self.conn
                .run(|mut c| async move { inv.invoke_async::<(u8, u32, i64, i64)>(&mut c).await })
        }))
        .await?;
        let counted: Vec<(bool, Counted)> = replies
            .into_iter()
            .map(|(admitted, count, locked_until_ms, previous_until_ms)| {
                (
                    admitted == 1,
                    Counted {
                        count,
                        locked_until_ms,
                        previous_until_ms,
                    },
                )
            })
            .collect();
        if counted.iter().all(|(admitted, _)| *admitted) {
            return Ok(Reservation::Admitted(
                counted.into_iter().map(|(_, c)| c).collect(),
            ));
        }
        // Another key refused: the keys that counted the attempt give it back, or a
        // refused attempt would count.
        let until_ms = counted
            .iter()
            .filter(|(admitted, _)| !admitted)
            .map(|(_, c)| c.locked_until_ms)
            .max()
            .unwrap_or(0);
        let given_back: Vec<(&str, Limit, Counted)> = counters
            .iter()
            .zip(&counted)
            .filter(|(_, (admitted, _))| *admitted)
            .map(|((key, limit), (_, c))| (*key, *limit, *c))
            .collect();
        self.release(&given_back, now_ms).await?;
        Ok(Reservation::Refused { until_ms })
    }

    async fn release(
        &self,
        counted: &[(&str, Limit, Counted)],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        if counted.is_empty() {
            return Ok(());
        }
        futures::future::try_join_all(counted.iter().map(|(key, limit, counted)| {
            let mut inv = self.release.prepare_invoke();
            inv.key(self.key(key))
                .arg(now_ms)
                .arg(limit.window_ms)
                .arg(counted.locked_until_ms)
                .arg(counted.previous_until_ms);
            self.conn
                .run(|mut c| async move { inv.invoke_async::<()>(&mut c).await })
        }))
        .await
        .map(|_| ())
    }

    async fn reset(&self, key: &str) -> Result<(), StoreError> {
        let key = self.key(key);
        self.conn
            .run(|mut c| async move { redis::cmd("DEL").arg(&key).query_async::<()>(&mut c).await })
            .await
    }
}

/// Counters kept at most, in memory; past this, the ones closest to expiry go first.
pub const MAX_MEMORY_COUNTERS: usize = 100_000;
/// Writes between two sweeps of expired counters.
const SWEEP_EVERY: u64 = 1024;

/// Counters in this process's memory. Bounded: expired counters are swept every
/// [`SWEEP_EVERY`] writes, and at most [`MAX_MEMORY_COUNTERS`] are kept.
#[derive(Debug, Default)]
pub struct MemoryThrottle {
    state: Mutex<MemoryState>,
}

#[derive(Debug, Default)]
struct MemoryState {
    /// Each counter with the window it was written with.
    counters: HashMap<String, (Entry, i64)>,
    writes: u64,
}

impl MemoryState {
    fn sweep(&mut self, now: i64) {
        self.counters
            .retain(|_, (entry, window)| entry.expires_at(*window) > now);
        if self.counters.len() > MAX_MEMORY_COUNTERS {
            // Still full of live counters: keep the half that lasts longest.
            let mut by_expiry: Vec<(i64, String)> = self
                .counters
                .iter()
                .map(|(k, (e, w))| (e.expires_at(*w), k.clone()))
                .collect();
            by_expiry.sort_unstable();
            let excess = self.counters.len() - MAX_MEMORY_COUNTERS / 2;
            for (_, key) in by_expiry.into_iter().take(excess) {
                self.counters.remove(&key);
            }
        }
    }
}

impl MemoryThrottle {
    /// No counters yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, MemoryState> {
        // Every change is one insert or remove: a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn locked_until(&self, keys: &[&str]) -> i64 {
        let state = self.lock();
        keys.iter()
            .filter_map(|k| state.counters.get(*k))
            .map(|(e, _)| e.locked_until_ms)
            .max()
            .unwrap_or(0)
    }

    fn reserve(&self, counters: &[(&str, Limit)], now: i64) -> Reservation {
        let mut state = self.lock();
        let current: Vec<Entry> = counters
            .iter()
            .map(|(key, limit)| {
                state
                    .counters
                    .get(*key)
                    .map(|(e, _)| e.current(now, limit))
                    .unwrap_or_default()
            })
            .collect();
        let until_ms = current.iter().map(|e| e.locked_until_ms).max().unwrap_or(0);
        if until_ms > now {
            return Reservation::Refused { until_ms };
        }
        state.writes += 1;
        if state.writes.is_multiple_of(SWEEP_EVERY) || state.counters.len() >= MAX_MEMORY_COUNTERS {
            state.sweep(now);
        }
        let counted = counters
            .iter()
            .zip(current)
            .map(|((key, limit), entry)| {
                let next = entry.after_attempt(now, limit);
                state
                    .counters
                    .insert((*key).to_owned(), (next, limit.window_ms));
                Counted {
                    count: next.count,
                    locked_until_ms: next.locked_until_ms,
                    previous_until_ms: entry.locked_until_ms,
                }
            })
            .collect();
        Reservation::Admitted(counted)
    }

    fn release(&self, counted: &[(&str, Limit, Counted)]) {
        let mut state = self.lock();
        for (key, _, c) in counted {
            let Some((entry, window)) = state.counters.get(*key).copied() else {
                continue;
            };
            match entry.after_release(c) {
                Some(next) => {
                    state.counters.insert((*key).to_owned(), (next, window));
                }
                None => {
                    state.counters.remove(*key);
                }
            }
        }
    }

    fn reset(&self, key: &str) {
        self.lock().counters.remove(key);
    }

    /// Counters held; for tests of boundedness.
    pub fn len(&self) -> usize {
        self.lock().counters.len()
    }

    /// True when no counter is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Limit = Limit {
        threshold: 3,
        window_ms: 60_000,
        base_delay_ms: 1_000,
        max_delay_ms: 5_000,
    };

    #[test]
    fn the_wait_doubles_past_the_threshold_up_to_the_cap() {
        let waits: Vec<i64> = (1..=7).map(|n| LIMIT.delay_ms(n)).collect();
        assert_eq!(waits, [0, 0, 1_000, 2_000, 4_000, 5_000, 5_000]);
        assert_eq!(LIMIT.delay_ms(u32::MAX), 5_000);
    }

    /// Counts one attempt on `key`, which must be admitted.
    fn count(m: &MemoryThrottle, key: &str, now: i64) -> Counted {
        match m.reserve(&[(key, LIMIT)], now) {
            Reservation::Admitted(c) => c[0],
            refused => panic!("{key} at {now}: {refused:?}"),
        }
    }

    #[test]
    fn a_counter_is_forgotten_a_window_after_its_last_attempt_and_wait() {
        let m = MemoryThrottle::new();
        let now = 1_000_000;
        for i in 0..3 {
            count(&m, "a", now + i);
        }
        // Locked for 1 s from the third attempt.
        assert_eq!(m.locked_until(&["a", "b"]), now + 2 + 1_000);
        // Within the window after the wait: the count goes on.
        let c = count(&m, "a", now + 2 + 1_000 + 59_000);
        assert_eq!(c.count, 4);
        // A whole window of quiet after the wait: forgotten.
        let later = c.locked_until_ms + 60_000;
        assert_eq!(count(&m, "a", later).count, 1);
    }

    #[test]
    fn attempts_are_counted_before_they_are_checked_and_past_the_threshold_refused() {
        let m = MemoryThrottle::new();
        let now = 1_000_000;
        // However many arrive at once, only the threshold's worth are admitted.
        let admitted = (0..50)
            .filter(|_| matches!(m.reserve(&[("a", LIMIT)], now), Reservation::Admitted(_)))
            .count();
        assert_eq!(admitted, 3);
        assert_eq!(
            m.reserve(&[("a", LIMIT)], now),
            Reservation::Refused {
                until_ms: now + 1_000
            }
        );
        // Each unlock admits one attempt, which doubles the wait.
        let c = count(&m, "a", now + 1_000);
        assert_eq!((c.count, c.locked_until_ms), (4, now + 3_000));
        assert!(matches!(
            m.reserve(&[("a", LIMIT)], now + 1_000),
            Reservation::Refused { .. }
        ));
    }

    #[test]
    fn a_released_attempt_gives_back_its_count_and_the_wait_it_set() {
        let m = MemoryThrottle::new();
        let now = 1_000_000;
        count(&m, "a", now);
        count(&m, "a", now);
        let third = count(&m, "a", now);
        assert_eq!(m.locked_until(&["a"]), now + 1_000);
        m.release(&[("a", LIMIT, third)]);
        assert_eq!(m.locked_until(&["a"]), 0);
        assert_eq!(count(&m, "a", now).count, 3);
        // Releasing every attempt forgets the counter.
        let m = MemoryThrottle::new();
        let only = count(&m, "b", now);
        m.release(&[("b", LIMIT, only)]);
        assert!(m.is_empty());
    }

    #[test]
    fn one_refusing_counter_means_nothing_is_counted() {
        let m = MemoryThrottle::new();
        let now = 1_000_000;
        for _ in 0..3 {
            count(&m, "locked", now);
        }
        let refused = m.reserve(&[("fresh", LIMIT), ("locked", LIMIT)], now);
        assert!(
            matches!(refused, Reservation::Refused { .. }),
            "{refused:?}"
        );
        assert_eq!(m.locked_until(&["fresh"]), 0);
        assert_eq!(count(&m, "fresh", now).count, 1);
    }

    #[test]
    fn memory_counters_are_bounded() {
        let m = MemoryThrottle::new();
        let quick = Limit {
            window_ms: 10,
            ..LIMIT
        };
        for i in 0..(SWEEP_EVERY * 3) {
            let now = i64::try_from(i).unwrap() * 100;
            m.reserve(&[(&format!("k{i}"), quick)], now);
        }
        assert!(m.len() <= SWEEP_EVERY as usize, "{}", m.len());
        let mut state = m.lock();
        for i in 0..(MAX_MEMORY_COUNTERS + 10) {
            state
                .counters
                .insert(format!("x{i}"), (Entry::default(), i64::MAX / 4));
        }
        state.sweep(0);
        assert!(state.counters.len() <= MAX_MEMORY_COUNTERS);
    }
}

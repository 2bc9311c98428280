//! Failed-attempt counters for throttling: in Redis, shared by every instance, or
//! (embedded mode) in this process with the same semantics.
//!
//! A counter holds the number of failures, the time of the last one and, once the
//! count reaches its threshold, the time until which attempts are refused. Each failure
//! at or past the threshold sets that wait to `base × 2^(count − threshold)`, capped.
//! The counter is forgotten once `window` passes after the last failure and any wait it
//! set, so every key carries a TTL and nothing is kept for ever. Times are the caller's
//! clock, in milliseconds.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use redis::Script;

use crate::store::StoreError;
use crate::store::redis_conn::RedisConn;

/// One counter's rules, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// Failures after which attempts wait.
    pub threshold: u32,
    /// Quiet time after which the count is forgotten.
    pub window_ms: i64,
    /// The first wait.
    pub base_delay_ms: i64,
    /// The longest wait.
    pub max_delay_ms: i64,
}

impl Limit {
    /// The wait the `count`-th failure sets (0 below the threshold).
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

/// A counter after a failure was recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counted {
    /// Failures within the window, this one included.
    pub count: u32,
    /// Attempts are refused before this time (ms); in the past when not locked.
    pub locked_until_ms: i64,
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

    /// The state after a failure at `now`. The same rule as [`FAILURE`] in Lua.
    fn after_failure(self, now: i64, limit: &Limit) -> Self {
        let mut next = if self.expires_at(limit.window_ms) <= now {
            Self::default()
        } else {
            self
        };
        next.count = next.count.saturating_add(1);
        next.last_ms = now;
        if next.count >= limit.threshold {
            next.locked_until_ms = now.saturating_add(limit.delay_ms(next.count));
        }
        next
    }
}

/// KEYS: the counter. ARGV: now, window, threshold, base delay, max delay (ms).
/// Returns {count, locked_until}. Mirrors `Entry::after_failure`.
const FAILURE: &str = r"
local now, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local threshold, base, cap = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local f = redis.call('HMGET', KEYS[1], 'n', 'last', 'until')
local n, last, untl = tonumber(f[1]) or 0, tonumber(f[2]) or 0, tonumber(f[3]) or 0
if math.max(last, untl) + window <= now then
  n = 0
  untl = 0
end
n = n + 1
if n >= threshold then
  local delay = cap
  local doublings = n - threshold
  if doublings < 40 then delay = math.min(base * 2 ^ doublings, cap) end
  untl = now + delay
end
redis.call('HSET', KEYS[1], 'n', n, 'last', now, 'until', untl)
redis.call('PEXPIRE', KEYS[1], math.max(untl, now) - now + window)
return {n, untl}
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
    /// The latest `locked_until` (ms) among `keys`; 0 when none is set.
    pub async fn locked_until(&self, keys: &[&str]) -> Result<i64, StoreError> {
        match self {
            Self::Redis(r) => r.locked_until(keys).await,
            Self::Memory(m) => Ok(m.locked_until(keys)),
        }
    }

    /// Counts a failure on each counter.
    pub async fn record_failure(
        &self,
        counters: &[(&str, Limit)],
        now_ms: i64,
    ) -> Result<Vec<Counted>, StoreError> {
        match self {
            Self::Redis(r) => r.record_failure(counters, now_ms).await,
            Self::Memory(m) => Ok(m.record_failure(counters, now_ms)),
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
    failure: Script,
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
            failure: Script::new(FAILURE),
        }
    }

    fn key(&self, key: &str) -> String {
        format!("{}throttle:{key}", self.prefix)
    }

    async fn locked_until(&self, keys: &[&str]) -> Result<i64, StoreError> {
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.hget(self.key(key), "until");
        }
        let found: Vec<Option<i64>> = self
            .conn
            .run(|mut c| async move { pipe.query_async(&mut c).await })
            .await?;
        Ok(found.into_iter().flatten().max().unwrap_or(0))
    }

    async fn record_failure(
        &self,
        counters: &[(&str, Limit)],
        now_ms: i64,
    ) -> Result<Vec<Counted>, StoreError> {
        // One script per key (each touches only its own key, as Redis Cluster wants),
        // sent together. A pipeline runs scripts by hash only, so it loads the script
        // first (cheap when Redis has it already).
        let mut pipe = redis::pipe();
        pipe.load_script(&self.failure).ignore();
        for (key, limit) in counters {
            pipe.invoke_script(
                self.failure
                    .key(self.key(key))
                    .arg(now_ms)
                    .arg(limit.window_ms)
                    .arg(limit.threshold)
                    .arg(limit.base_delay_ms)
                    .arg(limit.max_delay_ms),
            );
        }
        let replies: Vec<(u32, i64)> = self
            .conn
            .run(|mut c| async move { pipe.query_async(&mut c).await })
            .await?;
        Ok(replies
            .into_iter()
            .map(|(count, locked_until_ms)| Counted {
                count,
                locked_until_ms,
            })
            .collect())
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

    fn record_failure(&self, counters: &[(&str, Limit)], now: i64) -> Vec<Counted> {
        let mut state = self.lock();
        state.writes += 1;
        if state.writes.is_multiple_of(SWEEP_EVERY) || state.counters.len() >= MAX_MEMORY_COUNTERS {
            state.sweep(now);
        }
        counters
            .iter()
            .map(|(key, limit)| {
                let previous = state
                    .counters
                    .get(*key)
                    .map(|(e, _)| *e)
                    .unwrap_or_default();
                let next = previous.after_failure(now, limit);
                state
                    .counters
                    .insert((*key).to_owned(), (next, limit.window_ms));
                Counted {
                    count: next.count,
                    locked_until_ms: next.locked_until_ms,
                }
            })
            .collect()
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

    #[test]
    fn a_counter_is_forgotten_a_window_after_its_last_failure_and_wait() {
        let m = MemoryThrottle::new();
        let now = 1_000_000;
        for i in 0..3 {
            m.record_failure(&[("a", LIMIT)], now + i);
        }
        // Locked for 1 s from the third failure.
        assert_eq!(m.locked_until(&["a", "b"]), now + 2 + 1_000);
        // Within the window after the wait: the count goes on.
        let c = m.record_failure(&[("a", LIMIT)], now + 2 + 1_000 + 59_000);
        assert_eq!(c[0].count, 4);
        // A whole window of quiet after the wait: forgotten.
        let later = c[0].locked_until_ms + 60_000;
        let c = m.record_failure(&[("a", LIMIT)], later);
        assert_eq!(c[0].count, 1);
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
            m.record_failure(&[(&format!("k{i}"), quick)], now);
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

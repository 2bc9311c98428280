//! A failed password check must not tell which hash it was checked against. bcrypt's
//! time doubles with each cost step, so a user whose imported hash costs more than
//! `BCRYPT_COST` (or every user, after `BCRYPT_COST` was lowered) would answer a wrong
//! password visibly slower than an unknown user does. So every failed check (unknown
//! user, wrong or empty password) is padded, with an async sleep that holds no hashing
//! thread, to the time a verify takes at the highest cost any stored hash has.
//!
//! That time is learnt from the verifies themselves: a moving average of the bcrypt
//! work per cost, so it follows the machine's load; a cost never seen yet is estimated
//! from the nearest one seen (each step doubles the work). The target is a quarter
//! above the average, so a check at the highest cost is itself nearly always padded to
//! the same target rather than showing its own spread. The highest cost comes from the
//! users table (read at start-up and every [`REFRESH`]), and is raised at once when a
//! lookup meets a costlier hash than any seen, but never above [`cost_ceiling`]: a
//! hash costlier than that cannot be stored through authd (CreateUser and
//! `authd users import` refuse it) and is never verified (Login treats it as a wrong
//! password), so one such row cannot make every failed login wait for hours.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// How often the highest stored cost is read again (imports happen behind authd's back,
/// and rehashing on login lowers it).
pub const REFRESH: Duration = Duration::from_secs(10 * 60);

/// The lowest ceiling on stored costs, whatever `BCRYPT_COST` says: a cost-14 verify
/// takes about a second on a current core, already more than any deployment uses.
pub const MIN_COST_CEILING: u32 = 14;

/// The highest bcrypt cost authd stores or verifies when `BCRYPT_COST` is `configured`:
/// the larger of the two. Each step doubles the work; a cost-31 hash would hold a
/// hashing worker (and, through the failure padding, every failed login) for hours.
pub fn cost_ceiling(configured: u32) -> u32 {
    configured.max(MIN_COST_CEILING)
}

/// bcrypt's costs are 4..=31.
const COSTS: usize = 32;
/// The weight of a new sample in the moving averages: 1/8.
const SMOOTHING: u64 = 8;

/// What failed password checks are padded to.
#[derive(Debug)]
pub struct FailurePadding {
    configured: u32,
    /// [`cost_ceiling`] of `configured`: `max_cost` never goes above it.
    ceiling: u32,
    /// The highest cost among the stored hashes and `BCRYPT_COST`, at most `ceiling`.
    max_cost: AtomicU32,
    /// Per cost, the moving average of one verify's bcrypt work, in ns (0: none yet).
    work_ns: [AtomicU64; COSTS],
}

impl FailurePadding {
    /// New hashes cost `configured`; one took `took` to make (a first estimate).
    pub fn new(configured: u32, took: Duration) -> Self {
        let padding = Self {
            configured,
            ceiling: cost_ceiling(configured).min(COSTS as u32 - 1),
            max_cost: AtomicU32::new(configured),
            work_ns: std::array::from_fn(|_| AtomicU64::new(0)),
        };
        padding.observe(configured, took);
        padding
    }

    /// The highest cost failed checks are padded to.
    pub fn max_cost(&self) -> u32 {
        self.max_cost.load(Ordering::Relaxed)
    }

    /// The highest cost stored hashes may have (see [`cost_ceiling`]).
    pub fn ceiling(&self) -> u32 {
        self.ceiling
    }

    /// A stored hash of this cost was met: failures are padded to at least its time
    /// (up to the ceiling).
    pub fn saw_stored_cost(&self, cost: u32) {
        self.max_cost
            .fetch_max(cost.min(self.ceiling), Ordering::Relaxed);
    }

    /// The highest cost in the users table now (`None`: no bcrypt hash stored). It may
    /// have gone down, once costlier hashes were rehashed.
    pub fn set_stored_max(&self, stored: Option<u32>) {
        let max = stored.map_or(self.configured, |c| c.max(self.configured));
        self.max_cost
            .store(max.min(self.ceiling), Ordering::Relaxed);
    }

    /// One verify at `cost` took `took` of bcrypt work.
    pub fn observe(&self, cost: u32, took: Duration) {
        let Some(slot) = self.work_ns.get(cost as usize) else {
            return;
        };
        let sample = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX).max(1);
        // Racing updates may lose a sample; an average does not mind.
        let old = slot.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else if sample >= old {
            old + (sample - old) / SMOOTHING
        } else {
            old - (old - sample) / SMOOTHING
        };
        slot.store(new.max(1), Ordering::Relaxed);
    }

    /// How long to sleep after a failed check whose bcrypt work took `took`.
    pub fn padding(&self, took: Duration) -> Duration {
        let target = self.expected(self.max_cost()).saturating_mul(5) / 4;
        target.saturating_sub(took)
    }

    /// The average work of one verify at `cost`, or an estimate from the nearest cost
    /// seen.
    fn expected(&self, cost: u32) -> Duration {
        let cost = cost as usize;
        let seen = (0..COSTS)
            .filter_map(|c| {
                let ns = self.work_ns[c].load(Ordering::Relaxed);
                (ns > 0).then_some((c, ns))
            })
            .min_by_key(|(c, _)| c.abs_diff(cost));
        let Some((c, ns)) = seen else {
            return Duration::ZERO;
        };
        let ns = if c <= cost {
            ns.saturating_mul(1_u64 << (cost - c).min(40))
        } else {
            ns >> (c - cost).min(63)
        };
        Duration::from_nanos(ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn failures_are_padded_to_the_costliest_stored_hash() {
        let p = FailurePadding::new(4, MS);
        // Only cost 4 stored: a quarter above its average.
        assert_eq!(p.padding(MS), MS / 4);
        // A cost-10 hash is met: 64 times the work, estimated from cost 4 until seen.
        p.saw_stored_cost(10);
        assert_eq!(p.padding(MS), MS * 80 - MS);
        p.observe(10, MS * 60);
        assert_eq!(p.padding(MS * 60), MS * 75 - MS * 60);
        // Checks that took longer than the target are not padded.
        assert_eq!(p.padding(MS * 100), Duration::ZERO);
        // Once the table holds nothing costlier than BCRYPT_COST, neither is the target.
        p.set_stored_max(Some(6));
        assert_eq!(p.max_cost(), 6);
        p.set_stored_max(None);
        assert_eq!(p.max_cost(), 4);
    }

    #[test]
    fn the_padding_never_goes_above_the_ceiling() {
        assert_eq!(cost_ceiling(4), 14);
        assert_eq!(cost_ceiling(12), 14);
        assert_eq!(cost_ceiling(16), 16);
        let p = FailurePadding::new(4, MS);
        assert_eq!(p.ceiling(), 14);
        // A cost-31 row (imported before the ceiling existed, or written behind authd's
        // back) raises the target to cost 14, not 31: 2^10 times cost 4, not 2^27.
        p.saw_stored_cost(31);
        assert_eq!(p.max_cost(), 14);
        p.set_stored_max(Some(31));
        assert_eq!(p.max_cost(), 14);
        assert_eq!(p.padding(Duration::ZERO), MS * 1024 * 5 / 4);
        // A configured cost above the floor is its own ceiling.
        let p = FailurePadding::new(16, MS);
        p.saw_stored_cost(31);
        assert_eq!(p.max_cost(), 16);
    }

    #[test]
    fn the_average_follows_the_samples() {
        let p = FailurePadding::new(5, MS * 2);
        for _ in 0..100 {
            p.observe(5, MS * 4);
        }
        let expected = p.expected(5);
        assert!(expected > MS * 3 && expected <= MS * 4, "{expected:?}");
        assert!(p.expected(4) < expected);
    }
}

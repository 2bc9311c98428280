//! Paired rounds: two closed loops alternated in short rounds, their ratio taken per
//! round.
//!
//! On a shared two-core machine the throughput of a 6-second row drifts by tens of
//! per cent from one minute to the next (other tenants, the host), so a ratio of two rows
//! run one after the other carries that drift. Here each round runs A then B (the next
//! round B then A, cancelling a steady drift), and the ratio of each round is kept; the
//! median of the rounds is the figure, with the lowest and highest beside it.

use std::future::Future;
use std::time::Duration;

use crate::load::{Outcome, Stats, Stop, closed_loop};

/// The pairs a run measures, by name.
pub const STRICT_VS_REFERENCE: &str =
    "strict ValidateToken (B) / reference server, one Redis round trip (A)";
pub const CACHE_VS_HEALTH: &str =
    "SESSION_CACHE=on: ValidateToken (B) / Health on the same instance (A)";
pub const STRICT_VS_HEALTH: &str = "strict ValidateToken (B) / Health (A)";
/// The ceiling of any ValidateToken on this stack: a server that does no work at all and
/// only exchanges ValidateToken's messages, against authd's Health.
pub const MESSAGES_VS_HEALTH: &str =
    "reference server, the messages alone, no work (B) / authd Health (A)";

/// Alternating rounds of A and B: per round, B's calls/s over A's.
pub struct Pair {
    /// What is compared, e.g. `ValidateToken / reference server`.
    pub name: String,
    pub seconds: f64,
    /// calls/s of A and of B in each round.
    pub rounds: Vec<(f64, f64)>,
    /// Calls that did not answer as expected, A and B together.
    pub errors: u64,
}

impl Pair {
    /// B over A, per round, in round order.
    pub fn ratios(&self) -> Vec<f64> {
        self.rounds.iter().map(|(a, b)| b / a.max(1e-9)).collect()
    }

    /// The median of the rounds' ratios (the mean of the middle two for an even count).
    pub fn median(&self) -> Option<f64> {
        let mut r = self.ratios();
        if r.is_empty() {
            return None;
        }
        r.sort_by(f64::total_cmp);
        let n = r.len();
        Some(if n % 2 == 1 {
            r[n / 2]
        } else {
            (r[n / 2 - 1] + r[n / 2]) / 2.0
        })
    }

    pub fn range(&self) -> Option<(f64, f64)> {
        let r = self.ratios();
        let lo = r.iter().copied().reduce(f64::min)?;
        let hi = r.iter().copied().reduce(f64::max)?;
        Some((lo, hi))
    }

    /// `median 93 % (88–97 %, 5 rounds × 2 s, errors 0)`.
    pub fn summary(&self) -> String {
        match (self.median(), self.range()) {
            (Some(m), Some((lo, hi))) => format!(
                "median {:.0} % ({:.0}–{:.0} %, {} rounds × {} s, errors {})",
                m * 100.0,
                lo * 100.0,
                hi * 100.0,
                self.rounds.len(),
                self.seconds,
                self.errors
            ),
            _ => "—".into(),
        }
    }
}

/// `rounds` rounds of `a` and `b`, `seconds` each, `workers` calls in flight; a short
/// warm-up of both first.
pub async fn measure<FA, FutA, FB, FutB>(
    name: &str,
    rounds: usize,
    seconds: f64,
    workers: usize,
    a: FA,
    b: FB,
) -> Pair
where
    FA: Fn(u64) -> FutA + Clone + Send + Sync + 'static,
    FutA: Future<Output = Outcome> + Send,
    FB: Fn(u64) -> FutB + Clone + Send + Sync + 'static,
    FutB: Future<Output = Outcome> + Send,
{
    closed_loop("warm-up A", workers, crate::WARM_UP, a.clone()).await;
    closed_loop("warm-up B", workers, crate::WARM_UP, b.clone()).await;
    let each = Stop::After(Duration::from_secs_f64(seconds));
    let mut pair = Pair {
        name: name.to_owned(),
        seconds,
        rounds: Vec::with_capacity(rounds),
        errors: 0,
    };
    for round in 0..rounds {
        let label = |x: &str| format!("{name}, round {} of {rounds}, {x}", round + 1);
        let (ra, rb) = if round % 2 == 0 {
            let ra = closed_loop(&label("A"), workers, each, a.clone()).await;
            let rb = closed_loop(&label("B"), workers, each, b.clone()).await;
            (ra, rb)
        } else {
            let rb = closed_loop(&label("B"), workers, each, b.clone()).await;
            let ra = closed_loop(&label("A"), workers, each, a.clone()).await;
            (ra, rb)
        };
        pair.errors += ra.error_count() + rb.error_count();
        pair.rounds.push((answered(&ra), answered(&rb)));
    }
    pair
}

/// Calls/s that answered as expected: a call that failed is not throughput.
fn answered(s: &Stats) -> f64 {
    s.calls.saturating_sub(s.error_count()) as f64 / s.seconds.max(1e-9)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(rounds: &[(f64, f64)]) -> Pair {
        Pair {
            name: "t".into(),
            seconds: 1.0,
            rounds: rounds.to_vec(),
            errors: 0,
        }
    }

    #[test]
    fn the_median_is_the_middle_round_and_the_range_its_ends() {
        let p = pair(&[(100.0, 90.0), (100.0, 50.0), (200.0, 190.0)]);
        assert_eq!(p.median(), Some(0.9));
        assert_eq!(p.range(), Some((0.5, 0.95)));
        let even = pair(&[(100.0, 80.0), (100.0, 90.0)]);
        assert!((even.median().unwrap_or(0.0) - 0.85).abs() < 1e-12);
        assert_eq!(pair(&[]).median(), None);
        assert_eq!(pair(&[]).summary(), "—");
    }
}

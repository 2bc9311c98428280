//! Closed and open loops, their histograms and the progress line.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// What one call came to: `Ok`, or the label it is counted under (a status code name,
/// or `INVALID:<reason>` for an answer that is not the expected one).
pub type Outcome = Result<(), String>;

/// Latencies (ns) and errors of one scenario.
pub struct Stats {
    pub hist: Histogram<u64>,
    pub errors: BTreeMap<String, u64>,
    pub calls: u64,
    pub seconds: f64,
    /// Open loop: how late the generator sent each call after its intended time (ns).
    pub send_lag: Option<Histogram<u64>>,
}

/// 1 ns .. 10 min at 3 significant digits.
#[expect(
    clippy::expect_used,
    reason = "constant bounds: hdrhistogram refuses only low > high or > 5 digits"
)]
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("valid histogram bounds")
}

impl Stats {
    fn new() -> Self {
        Self {
            hist: histogram(),
            errors: BTreeMap::new(),
            calls: 0,
            seconds: 0.0,
            send_lag: None,
        }
    }

    fn record(&mut self, nanos: u64, outcome: Outcome) {
        self.hist.saturating_record(nanos.max(1));
        self.calls += 1;
        if let Err(label) = outcome {
            *self.errors.entry(label).or_default() += 1;
        }
    }

    fn merge(&mut self, other: &Self) {
        let _ = self.hist.add(&other.hist);
        self.calls += other.calls;
        for (k, v) in &other.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
    }

    /// Calls answered per second.
    pub fn rate(&self) -> f64 {
        self.calls as f64 / self.seconds.max(1e-9)
    }

    /// Latency at quantile `q`, in µs.
    pub fn micros(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }

    /// Largest latency, in µs.
    pub fn max_micros(&self) -> f64 {
        self.hist.max() as f64 / 1000.0
    }

    /// Errors of every kind.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Errors of one label.
    pub fn errors_of(&self, label: &str) -> u64 {
        self.errors.get(label).copied().unwrap_or(0)
    }

    /// `CODE×n, …`, or `0`.
    pub fn error_text(&self) -> String {
        if self.errors.is_empty() {
            return "0".into();
        }
        self.errors
            .iter()
            .map(|(k, v)| format!("{k}×{v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// When a loop stops.
#[derive(Clone, Copy)]
pub enum Stop {
    After(Duration),
    Calls(u64),
}

/// Prints `name: n calls, r/s, errors` every second on stderr until dropped.
struct Progress {
    done: Arc<AtomicBool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    fn start(name: String, calls: Arc<AtomicU64>, errors: Arc<AtomicU64>) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&done);
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut last = 0;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            while !flag.load(Ordering::Relaxed) {
                tick.tick().await;
                let n = calls.load(Ordering::Relaxed);
                eprint!(
                    "\r  {name}: {:>5.1} s, {n} calls, {} /s now, {} errors      ",
                    started.elapsed().as_secs_f64(),
                    n - last,
                    errors.load(Ordering::Relaxed)
                );
                let _ = std::io::stderr().flush();
                last = n;
            }
        });
        Self {
            done,
            task: Some(task),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(task) = self.task.take() {
            task.abort();
        }
        eprintln!();
    }
}

/// Closed loop: `workers` callers, each sending its next call when the last one
/// answered. `call(i)` gets a running call number (to pick among tokens).
pub async fn closed_loop<F, Fut>(name: &str, workers: usize, stop: Stop, call: F) -> Stats
where
    F: Fn(u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send,
{
    let counter = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let progress = Progress::start(name.to_owned(), Arc::clone(&counter), Arc::clone(&errors));
    let started = Instant::now();
    let deadline = match stop {
        Stop::After(d) => Some(started + d),
        Stop::Calls(_) => None,
    };
    let limit = match stop {
        Stop::Calls(n) => n,
        Stop::After(_) => u64::MAX,
    };
    let mut tasks = Vec::with_capacity(workers);
    for _ in 0..workers {
        let call = call.clone();
        let counter = Arc::clone(&counter);
        let errors = Arc::clone(&errors);
        tasks.push(tokio::spawn(async move {
            let mut stats = Stats::new();
            loop {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                let i = counter.fetch_add(1, Ordering::Relaxed);
                if i >= limit {
                    break;
                }
                let t = Instant::now();
                let outcome = call(i).await;
                if outcome.is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                stats.record(nanos(t.elapsed()), outcome);
            }
            stats
        }));
    }
    let mut total = Stats::new();
    for task in tasks {
        if let Ok(stats) = task.await {
            total.merge(&stats);
        }
    }
    total.seconds = started.elapsed().as_secs_f64();
    drop(progress);
    total
}

/// Open loop: call `i` is due at `start + i / rate`, sent then whatever became of the
/// earlier ones, and its latency counts from that intended time, so a server that falls
/// behind shows its queue. A pacing thread (finer sleeps than Tokio's 1 ms timer wheel)
/// spawns each call onto the runtime.
pub async fn open_loop<F, Fut>(name: &str, rate: f64, duration: Duration, call: F) -> Stats
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let total = (rate * duration.as_secs_f64()).round() as u64;
    let counter = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let progress = Progress::start(name.to_owned(), Arc::clone(&counter), Arc::clone(&errors));
    let shared = Arc::new(Mutex::new(Stats::new()));
    let lag = Arc::new(Mutex::new(histogram()));
    let call = Arc::new(call);
    let handle = tokio::runtime::Handle::current();
    let (finished_tx, finished) = tokio::sync::oneshot::channel::<()>();
    let pending = Arc::new(AtomicU64::new(total));
    let finished_tx = Arc::new(Mutex::new(Some(finished_tx)));
    let started = Instant::now();
    {
        let shared = Arc::clone(&shared);
        let lag = Arc::clone(&lag);
        let pending = Arc::clone(&pending);
        let finished_tx = Arc::clone(&finished_tx);
        let counter = Arc::clone(&counter);
        let errors = Arc::clone(&errors);
        std::thread::spawn(move || {
            let interval = 1.0 / rate;
            for i in 0..total {
                let intended = started + Duration::from_secs_f64(i as f64 * interval);
                let now = Instant::now();
                if intended > now {
                    std::thread::sleep(intended - now);
                }
                let sent = Instant::now();
                if let Ok(mut lag) = lag.lock() {
                    lag.saturating_record(nanos(sent.saturating_duration_since(intended)).max(1));
                }
                let call = Arc::clone(&call);
                let shared = Arc::clone(&shared);
                let pending = Arc::clone(&pending);
                let finished_tx = Arc::clone(&finished_tx);
                let counter = Arc::clone(&counter);
                let errors = Arc::clone(&errors);
                handle.spawn(async move {
                    let outcome = call(i).await;
                    let latency = nanos(intended.elapsed());
                    counter.fetch_add(1, Ordering::Relaxed);
                    if outcome.is_err() {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    if let Ok(mut s) = shared.lock() {
                        s.record(latency, outcome);
                    }
                    if pending.fetch_sub(1, Ordering::AcqRel) == 1
                        && let Some(tx) = finished_tx.lock().ok().and_then(|mut t| t.take())
                    {
                        let _ = tx.send(());
                    }
                });
            }
        });
    }
    if total > 0 {
        // Every call carries its own timeout, so this is only a backstop.
        let _ = tokio::time::timeout(duration + Duration::from_secs(60), finished).await;
    }
    drop(progress);
    let mut stats = Stats::new();
    if let Ok(s) = shared.lock() {
        stats.merge(&s);
    }
    // Until the last answer: a server that falls behind shows a lower rate.
    stats.seconds = started.elapsed().as_secs_f64();
    stats.send_lag = lag.lock().ok().map(|h| h.clone());
    stats
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

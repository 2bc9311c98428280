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

    /// The histogram, counts and errors (not the timings of a whole run).
    fn clone_counts(&self) -> Self {
        let mut copy = Self::new();
        copy.merge(self);
        copy
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
        error_text(&self.errors)
    }
}

/// Errors counted by label as `CODE×n, …`, or `0`.
pub fn error_text(errors: &BTreeMap<String, u64>) -> String {
    if errors.is_empty() {
        return "0".into();
    }
    errors
        .iter()
        .map(|(k, v)| format!("{k}×{v}"))
        .collect::<Vec<_>>()
        .join(", ")
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

/// Builds, on a lane's own thread and runtime, the call function of an open loop from
/// that lane's channels.
pub type MakeCall<C> = Arc<dyn Fn(Vec<tonic::transport::Channel>) -> C + Send + Sync>;

/// How an open loop is driven.
#[derive(Clone)]
pub struct OpenLoop {
    /// The server's address (host:port): every lane opens its own connections.
    pub addr: String,
    /// Threads sending, each with its own single-threaded runtime and connections.
    pub lanes: usize,
    /// HTTP/2 connections per lane.
    pub connections: usize,
}

/// Open loop: call `i` is due at `start + i / rate`, sent then whatever became of the
/// earlier ones, and its latency counts from that intended time, so a server that falls
/// behind shows its queue.
///
/// Each lane is one thread with a single-threaded Tokio runtime, its own connections and
/// a timerfd firing at the lane's share of the rate (Tokio's own timer has 1 ms steps, too
/// coarse for 100 µs intervals). A due call is spawned on the lane's own runtime: no
/// cross-thread wake per call, which a pacing thread handing calls to a multi-threaded
/// runtime paid (85 µs of generator CPU per call at 10,000/s, more than authd's own).
pub async fn open_loop<C, Fut>(
    name: &str,
    rate: f64,
    duration: Duration,
    how: &OpenLoop,
    make: MakeCall<C>,
) -> anyhow::Result<Stats>
where
    C: Fn(u64) -> Fut + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let total = (rate * duration.as_secs_f64()).round() as u64;
    let lanes = how.lanes.max(1) as u64;
    // A zero period would make the timerfd fire once and never again.
    if !(rate > 0.0 && rate * 1e-9 < 1.0 / lanes as f64) {
        anyhow::bail!("open loop {name}: rate {rate}/s is not between 0 and 1e9/s per lane");
    }
    let counter = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let progress = Progress::start(name.to_owned(), Arc::clone(&counter), Arc::clone(&errors));
    // Every lane connects first; calls are due from this instant on.
    let started = Instant::now() + Duration::from_millis(300);
    let interval = Duration::from_secs_f64(1.0 / rate.max(1e-9));
    let mut threads = Vec::new();
    for lane in 0..lanes {
        let how = how.clone();
        let make = Arc::clone(&make);
        let counter = Arc::clone(&counter);
        let errors = Arc::clone(&errors);
        let (done_tx, done) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name(format!("open-loop-{lane}"))
            .spawn(move || {
                let lane_run = Lane {
                    lane,
                    lanes,
                    total,
                    interval,
                    started,
                    counter,
                    errors,
                };
                let result = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(anyhow::Error::from)
                    .and_then(|rt| rt.block_on(lane_run.run(&how, make)));
                let _ = done_tx.send(result);
            })?;
        threads.push(done);
    }
    let mut stats = Stats::new();
    let mut lag = histogram();
    for done in threads {
        let (lane_stats, lane_lag) = done.await??;
        stats.merge(&lane_stats);
        let _ = lag.add(&lane_lag);
    }
    drop(progress);
    // Until the last answer: a server that falls behind shows a lower rate.
    stats.seconds = started.elapsed().as_secs_f64();
    stats.send_lag = Some(lag);
    Ok(stats)
}

/// One lane of an open loop: calls `lane`, `lane + lanes`, `lane + 2·lanes`, … of the
/// loop; the call function is given the lane's own running number (0, 1, 2, …), so it
/// spreads the lane's calls over all of the lane's connections.
struct Lane {
    lane: u64,
    lanes: u64,
    total: u64,
    interval: Duration,
    started: Instant,
    counter: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
}

impl Lane {
    async fn run<C, Fut>(
        self,
        how: &OpenLoop,
        make: MakeCall<C>,
    ) -> anyhow::Result<(Stats, Histogram<u64>)>
    where
        C: Fn(u64) -> Fut + 'static,
        Fut: Future<Output = Outcome> + Send + 'static,
    {
        // Wake-ups as asked, not up to 50 µs later (the default timer slack).
        let _ = rustix::thread::set_current_timer_slack(std::num::NonZeroU64::new(1));
        let mut channels = Vec::with_capacity(how.connections.max(1));
        for _ in 0..how.connections.max(1) {
            channels.push(crate::endpoint(&how.addr)?.connect().await?);
        }
        let call = make(channels);
        let own = self.total.saturating_sub(self.lane).div_ceil(self.lanes);
        let period = self.interval * u32::try_from(self.lanes)?;
        let first = self.started + self.interval * u32::try_from(self.lane)?;
        let timer = Pacer::start(first, period)?;
        let shared = Arc::new(Mutex::new(Stats::new()));
        let mut lag = histogram();
        let mut running = tokio::task::JoinSet::new();
        let mut next = 0u64;
        while next < own {
            // The timer only wakes the lane; what is due comes from the clock, so a lane
            // that starts or wakes late sends its backlog at once instead of running late
            // for the rest of the loop.
            timer.wait().await?;
            let Some(since_first) = Instant::now().checked_duration_since(first) else {
                continue;
            };
            let due = u64::try_from(since_first.as_nanos() / period.as_nanos().max(1))
                .unwrap_or(u64::MAX)
                .saturating_add(1)
                .min(own);
            while next < due {
                let intended = first + period * u32::try_from(next)?;
                lag.saturating_record(nanos(intended.elapsed()).max(1));
                let answer = call(next);
                next += 1;
                let shared = Arc::clone(&shared);
                let counter = Arc::clone(&self.counter);
                let errors = Arc::clone(&self.errors);
                running.spawn(async move {
                    let outcome = answer.await;
                    let latency = nanos(intended.elapsed());
                    counter.fetch_add(1, Ordering::Relaxed);
                    if outcome.is_err() {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    if let Ok(mut s) = shared.lock() {
                        s.record(latency, outcome);
                    }
                });
            }
            while let Some(joined) = running.try_join_next() {
                count_panic(&shared, &self.errors, joined);
            }
        }
        // Every call carries its own timeout (the endpoint's).
        while let Some(joined) = running.join_next().await {
            count_panic(&shared, &self.errors, joined);
        }
        let stats = shared
            .lock()
            .map_err(|_| anyhow::anyhow!("a call panicked"))?
            .clone_counts();
        Ok((stats, lag))
    }
}

/// A call whose task panicked counts as an error, `PANIC`, not as a call never made.
fn count_panic(
    shared: &Mutex<Stats>,
    errors: &AtomicU64,
    joined: Result<(), tokio::task::JoinError>,
) {
    if joined.is_err() {
        errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut s) = shared.lock() {
            s.calls += 1;
            *s.errors.entry("PANIC".into()).or_default() += 1;
        }
    }
}

/// A periodic timerfd in the lane's runtime.
struct Pacer {
    fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
}

impl Pacer {
    fn start(first: Instant, period: Duration) -> anyhow::Result<Self> {
        use rustix::time::{
            Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec, timerfd_create,
            timerfd_settime,
        };
        let timespec = |d: Duration| Timespec {
            tv_sec: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(d.subsec_nanos()),
        };
        let fd = timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )?;
        // A zero it_value disarms the timer: the first expiry at least 1 ns from now.
        let until_first = first
            .saturating_duration_since(Instant::now())
            .max(Duration::from_nanos(1));
        timerfd_settime(
            &fd,
            TimerfdTimerFlags::empty(),
            &Itimerspec {
                it_interval: timespec(period),
                it_value: timespec(until_first),
            },
        )?;
        // SAFETY: the descriptor is an `OwnedFd` moved into the `AsyncFd`: it stays open
        // and the same file for the `AsyncFd`'s whole life, and nothing else closes it.
        #[allow(unsafe_code)]
        let fd = unsafe { tokio::io::unix::AsyncFd::register(fd) }
            .map_err(|e| anyhow::anyhow!("cannot register the timerfd: {e}"))?;
        Ok(Self { fd })
    }

    /// Waits for the next expiry.
    async fn wait(&self) -> anyhow::Result<()> {
        loop {
            let mut guard = self.fd.readable().await?;
            let mut buf = [0u8; 8];
            match guard
                .try_io(|fd| rustix::io::read(fd.get_ref(), &mut buf).map_err(std::io::Error::from))
            {
                Ok(Ok(8)) => return Ok(()),
                Ok(Ok(n)) => anyhow::bail!("timerfd read {n} bytes"),
                Ok(Err(e)) => return Err(e.into()),
                Err(_would_block) => continue,
            }
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

//! bcrypt on a bounded pool of dedicated threads, never on the async workers. A job
//! first takes a [`Slot`] (one of `workers + queue`); when none is free it is refused at
//! once, so a login storm is shed instead of queued. One client address may hold at
//! most `BCRYPT_MAX_PER_ADDRESS` slots, whatever calls it makes, so a flood from one
//! address is shed while everyone else still finds a slot. The threads run at a lower
//! CPU priority (`BCRYPT_NICE`), so a storm cannot starve the async workers that answer
//! ValidateToken.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use super::AuthError;
use crate::config::{BcryptConfig, HashPriority, Secret};

/// Advice to callers shed because the queue is full.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// One job's work: bcrypt, or other CPU-heavy work on a password (the policy's strength
/// estimate). It is given its slot, to free before it answers.
type Work = Box<dyn FnOnce(Held) + Send>;

struct Job {
    work: Work,
    span: tracing::Span,
    queued_at: Instant,
    /// Held until the work is done: a slot is free only once its job has finished.
    _slot: Held,
}

/// A slot as a job holds it: one of the pool's, and one of its address's share.
struct Held {
    _permit: OwnedSemaphorePermit,
    _share: Option<Share>,
}

/// How many slots each address holds now.
#[derive(Debug)]
struct Shares {
    max_per_address: usize,
    held: Mutex<HashMap<String, usize>>,
}

impl Shares {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        // Every change is one insert or remove: a poisoned lock is still consistent.
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One slot of an address's share; given back when dropped.
struct Share {
    shares: Arc<Shares>,
    address: String,
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut held = self.shares.lock();
        if let Some(n) = held.get_mut(&self.address) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.address);
            }
        }
    }
}

/// A fixed set of hashing threads with a bounded queue in front.
#[derive(Clone)]
pub struct PasswordHasher {
    queue: Sender<Job>,
    /// `workers + queue` slots: the jobs running plus those that may wait.
    slots: Arc<Semaphore>,
    shares: Arc<Shares>,
    cost: u32,
}

/// The right to run one hashing job, taken before the work that leads to it (Login
/// takes it before looking the user up), so a refused call costs nothing further.
/// Dropping it unused gives the slot back.
#[must_use = "a slot is only useful for hashing"]
pub struct Slot {
    queue: Sender<Job>,
    held: Held,
    cost: u32,
}

impl std::fmt::Debug for PasswordHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasswordHasher")
            .field("cost", &self.cost)
            .finish_non_exhaustive()
    }
}

impl PasswordHasher {
    /// Starts `config.workers` threads at priority `config.priority`. They stop when the
    /// last handle is dropped.
    pub fn start(config: &BcryptConfig) -> std::io::Result<Self> {
        Self::start_named(config, "bcrypt")
    }

    /// `start`, with threads named `{name}-{i}`.
    fn start_named(config: &BcryptConfig, name: &str) -> std::io::Result<Self> {
        // Unbounded, but never holds more than the slots allow.
        let (queue, jobs) = mpsc::channel::<Job>();
        let jobs = Arc::new(Mutex::new(jobs));
        for i in 0..config.workers {
            let jobs = Arc::clone(&jobs);
            let priority = config.priority;
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    lower_priority(priority);
                    work(&jobs);
                })?;
        }
        Ok(Self {
            queue,
            slots: Arc::new(Semaphore::new(config.workers + config.queue)),
            shares: Arc::new(Shares {
                max_per_address: config.max_per_address,
                held: Mutex::new(HashMap::new()),
            }),
            cost: config.cost,
        })
    }

    /// A slot for one job of the client at `address` (a key from
    /// [`crate::auth::throttle::address_key`]; `None`: a caller with no share to keep,
    /// such as a trusted gateway), or RESOURCE_EXHAUSTED at once when all slots are
    /// taken or the address holds its whole share.
    pub fn reserve(&self, address: Option<&str>) -> Result<Slot, AuthError> {
        let overloaded = |share_full: bool| {
            metrics::counter!("authd_bcrypt_rejected_total").increment(1);
            if share_full {
                metrics::counter!("authd_bcrypt_address_share_rejected_total").increment(1);
            }
            AuthError::Overloaded {
                retry_after: RETRY_AFTER,
            }
        };
        let share = match address {
            Some(address) => {
                let mut held = self.shares.lock();
                let n = held.entry(address.to_owned()).or_insert(0);
                if *n >= self.shares.max_per_address {
                    return Err(overloaded(true));
                }
                *n += 1;
                Some(Share {
                    shares: Arc::clone(&self.shares),
                    address: address.to_owned(),
                })
            }
            None => None,
        };
        // On refusal the share (if any) is dropped, and so given back.
        match Arc::clone(&self.slots).try_acquire_owned() {
            Ok(permit) => Ok(Slot {
                queue: self.queue.clone(),
                held: Held {
                    _permit: permit,
                    _share: share,
                },
                cost: self.cost,
            }),
            Err(_) => Err(overloaded(false)),
        }
    }

    /// The cost new hashes get.
    pub fn cost(&self) -> u32 {
        self.cost
    }

    /// Hashes `password` at the configured cost, for the client at `address`.
    pub async fn hash(&self, address: Option<&str>, password: &str) -> Result<String, AuthError> {
        self.reserve(address)?.hash(password).await
    }

    /// Checks `password` against `hash` (any of `$2a$`, `$2b$`, `$2y$`), for the client
    /// at `address`. A hash that cannot be parsed verifies nothing, and is logged.
    pub async fn verify(
        &self,
        address: Option<&str>,
        password: &str,
        hash: &str,
    ) -> Result<bool, AuthError> {
        self.reserve(address)?.verify(password, hash).await
    }

    /// Runs `f` (CPU-heavy work on a password) on the pool for the client at `address`,
    /// shed like a hash when the queue or the address's share is full.
    pub async fn run<T: Send + 'static>(
        &self,
        address: Option<&str>,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, AuthError> {
        self.reserve(address)?.run(f).await
    }
}

impl Slot {
    /// Hashes `password` at the configured cost.
    pub async fn hash(self, password: &str) -> Result<String, AuthError> {
        let (password, cost) = (Secret::new(password.to_owned()), self.cost);
        self.run(move || bcrypt::hash(password.expose(), cost))
            .await?
            .map_err(|e| AuthError::Internal(anyhow::anyhow!("bcrypt hash failed: {e}")))
    }

    /// As [`PasswordHasher::verify`], in this slot.
    pub async fn verify(self, password: &str, hash: &str) -> Result<bool, AuthError> {
        self.verify_timed(password, hash).await.map(|(ok, _)| ok)
    }

    /// As [`Slot::verify`], with how long the bcrypt work itself took (not the wait
    /// for a thread).
    pub async fn verify_timed(
        self,
        password: &str,
        hash: &str,
    ) -> Result<(bool, Duration), AuthError> {
        let (password, hash) = (
            Secret::new(password.to_owned()),
            Secret::new(hash.to_owned()),
        );
        let (verified, took) = self
            .run(move || {
                let started = Instant::now();
                let verified = bcrypt::verify(password.expose(), hash.expose());
                (verified, started.elapsed())
            })
            .await?;
        match verified {
            Ok(ok) => Ok((ok, took)),
            Err(e) => {
                tracing::error!(error = %e, "stored password hash is not a bcrypt hash");
                Ok((false, took))
            }
        }
    }

    /// Runs `f`, CPU-heavy work on a password such as the policy's strength estimate,
    /// in this slot: never on an async worker.
    pub async fn run<T: Send + 'static>(
        self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, AuthError> {
        let (reply, answer) = oneshot::channel();
        // The slot is freed before the answer: the caller may ask again at once, and this
        // thread (at a lower priority) may not run again soon.
        self.submit(Box::new(move |slot| {
            let result = f();
            drop(slot);
            let _ = reply.send(result);
        }))?;
        answer
            .await
            .map_err(|_| AuthError::Internal(anyhow::anyhow!("bcrypt worker stopped")))
    }

    fn submit(self, work: Work) -> Result<(), AuthError> {
        let job = Job {
            work,
            span: tracing::Span::current(),
            queued_at: Instant::now(),
            _slot: self.held,
        };
        // Counted before it is queued, so a worker's decrement never comes first.
        let depth = metrics::gauge!("authd_bcrypt_queue_depth");
        depth.increment(1.0);
        self.queue.send(job).map_err(|_| {
            depth.decrement(1.0);
            AuthError::Internal(anyhow::anyhow!("bcrypt workers stopped"))
        })
    }
}

/// Makes the calling thread less favoured by the scheduler: `SCHED_IDLE`, or `nice` steps
/// (0: unchanged). Only ever lowers the priority, which needs no privilege; a failure is
/// logged.
#[cfg(target_os = "linux")]
fn lower_priority(priority: HashPriority) {
    use thread_priority::unix::{
        NormalThreadSchedulePolicy, ThreadSchedulePolicy, set_thread_priority_and_policy,
        thread_native_id,
    };
    match priority {
        HashPriority::Nice(0) => {}
        HashPriority::Nice(nice) => {
            let me = rustix::thread::gettid();
            if let Err(e) = rustix::process::setpriority_process(Some(me), nice) {
                tracing::warn!(error = %e, nice, "cannot lower the bcrypt threads' priority (BCRYPT_NICE)");
            }
        }
        HashPriority::Idle => {
            let idle = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle);
            let set = set_thread_priority_and_policy(
                thread_native_id(),
                thread_priority::ThreadPriority::Min,
                idle,
            );
            // The crate also resets the niceness after the policy, which fails in a niced
            // process although the policy took: what counts is the policy now.
            let now = thread_priority::unix::thread_schedule_policy();
            if let (Err(e), false) = (set, now.as_ref().is_ok_and(|p| *p == idle)) {
                tracing::warn!(error = ?e, policy = ?now, "cannot move the bcrypt threads to SCHED_IDLE (BCRYPT_NICE)");
            }
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority(priority: HashPriority) {
    if priority != HashPriority::Nice(0) {
        tracing::debug!(?priority, "BCRYPT_NICE is applied on Linux only");
    }
}

fn work(jobs: &Mutex<Receiver<Job>>) {
    loop {
        let job = {
            let jobs = jobs.lock().unwrap_or_else(|e| e.into_inner());
            jobs.recv()
        };
        let Ok(Job {
            work,
            span,
            queued_at,
            _slot: slot,
        }) = job
        else {
            return; // every sender is gone
        };
        metrics::gauge!("authd_bcrypt_queue_depth").decrement(1.0);
        metrics::histogram!("authd_bcrypt_wait_seconds").record(queued_at.elapsed().as_secs_f64());
        let _entered = span.enter();
        // A panic in the work (bcrypt, or a strength estimate) must not take the
        // thread with it: after `workers` of them no job would ever run again. The caller's
        // reply is dropped with the job, so it hears "worker stopped" (INTERNAL).
        let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(slot)));
        if done.is_err() {
            tracing::error!("a hashing job panicked; its caller gets an internal error");
        }
    }
}

/// The cost a bcrypt hash was made with, if it is one.
pub fn hash_cost(hash: &str) -> Option<u32> {
    bcrypt::HashParts::from_str(hash).ok().map(|p| p.get_cost())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_is_read_from_every_prefix() {
        let h = bcrypt::hash("x", 4).unwrap();
        assert_eq!(hash_cost(&h), Some(4));
        assert_eq!(hash_cost(&h.replacen("$2b$", "$2y$", 1)), Some(4));
        assert_eq!(hash_cost(&h.replacen("$2b$", "$2a$", 1)), Some(4));
        assert_eq!(hash_cost("not a hash"), None);
    }

    #[tokio::test]
    async fn other_implementations_hashes_verify() {
        let hasher = PasswordHasher::start(&BcryptConfig {
            cost: 4,
            workers: 1,
            queue: 4,
            max_per_address: 5,
            priority: HashPriority::Nice(0),
        })
        .unwrap();
        let h = bcrypt::hash("Secret-pass-1", 4).unwrap();
        for prefix in ["$2a$", "$2b$", "$2y$"] {
            let h = h.replacen("$2b$", prefix, 1);
            assert!(
                hasher.verify(None, "Secret-pass-1", &h).await.unwrap(),
                "{prefix}"
            );
            assert!(
                !hasher.verify(None, "Secret-pass-2", &h).await.unwrap(),
                "{prefix}"
            );
        }
        assert!(!hasher.verify(None, "x", "garbage").await.unwrap());
    }

    #[tokio::test]
    async fn a_job_that_panics_leaves_its_thread_working() {
        let hasher = PasswordHasher::start(&BcryptConfig {
            cost: 4,
            workers: 1,
            queue: 1,
            max_per_address: 2,
            priority: HashPriority::Nice(0),
        })
        .unwrap();
        for _ in 0..3 {
            let failed = hasher.run(None, || -> u32 { panic!("a job panics") }).await;
            assert!(matches!(failed, Err(AuthError::Internal(_))), "{failed:?}");
        }
        // The one thread still runs jobs, and every slot came back.
        let after = tokio::time::timeout(Duration::from_secs(10), hasher.run(None, || 7)).await;
        assert_eq!(after.expect("the thread died with the panic").unwrap(), 7);
        assert!(
            hasher
                .verify(None, "x", &bcrypt::hash("x", 4).unwrap())
                .await
                .unwrap()
        );
    }

    /// Field `field` (1-based, as in proc(5)) of /proc/self/task/*/stat, for this
    /// process's threads named `name`.
    #[cfg(target_os = "linux")]
    fn stat_of_threads(name: &str, field: usize) -> Vec<i64> {
        let mut values = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if comm.trim() != name {
                continue;
            }
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            // The fields after the parenthesised name start at 3.
            if let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) {
                values.extend(
                    rest.split_whitespace()
                        .nth(field - 3)
                        .and_then(|n| n.parse::<i64>().ok()),
                );
            }
        }
        values
    }

    /// proc(5): field 19 is the niceness, field 41 the scheduling policy.
    #[cfg(target_os = "linux")]
    const NICE: usize = 19;
    #[cfg(target_os = "linux")]
    const POLICY: usize = 41;
    #[cfg(target_os = "linux")]
    const SCHED_IDLE: i64 = 5;

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn hashing_threads_run_at_the_configured_niceness() {
        let hasher = PasswordHasher::start(&BcryptConfig {
            cost: 4,
            workers: 1,
            queue: 1,
            max_per_address: 2,
            priority: HashPriority::Nice(7), // no other test uses 7
        })
        .unwrap();
        // Once a job has run, the thread has set its priority.
        hasher.hash(None, "Secret-pass-1").await.unwrap();
        let nice = stat_of_threads("bcrypt-0", NICE);
        assert!(nice.contains(&7), "bcrypt threads' niceness: {nice:?}");
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn by_default_hashing_threads_run_under_sched_idle() {
        let config = crate::Config::from_vars([("JWT_SECRET".to_owned(), "s".repeat(32))])
            .unwrap()
            .bcrypt;
        assert_eq!(config.priority, HashPriority::Idle);
        // A name of its own: other tests' pools are also called bcrypt-N.
        let hasher = PasswordHasher::start_named(
            &BcryptConfig {
                cost: 4,
                workers: 1,
                ..config
            },
            "idle-pool",
        )
        .unwrap();
        // Once a job has run, the thread has set its priority.
        hasher.hash(None, "Secret-pass-1").await.unwrap();
        assert_eq!(stat_of_threads("idle-pool-0", POLICY), vec![SCHED_IDLE]);
    }

    #[tokio::test]
    async fn a_full_queue_is_refused_at_once() {
        let hasher = PasswordHasher::start(&BcryptConfig {
            cost: 12,
            workers: 1,
            queue: 1,
            max_per_address: 2,
            priority: HashPriority::Nice(0),
        })
        .unwrap();
        let calls: Vec<_> = (0..4).map(|_| hasher.hash(None, "Secret-pass-1")).collect();
        let results = futures::future::join_all(calls).await;
        let shed = results
            .iter()
            .filter(|r| matches!(r, Err(AuthError::Overloaded { .. })))
            .count();
        assert!(shed >= 1, "no job was shed");
        assert!(results.iter().any(Result::is_ok), "no job ran");
    }

    #[tokio::test]
    async fn one_address_holds_at_most_its_share_and_gives_it_back() {
        let hasher = PasswordHasher::start(&BcryptConfig {
            cost: 4,
            workers: 1,
            queue: 5,
            max_per_address: 2,
            priority: HashPriority::Nice(0),
        })
        .unwrap();
        let a1 = hasher.reserve(Some("192.0.2.1")).unwrap();
        let a2 = hasher.reserve(Some("192.0.2.1")).unwrap();
        assert!(matches!(
            hasher.reserve(Some("192.0.2.1")),
            Err(AuthError::Overloaded { .. })
        ));
        // Others still find slots, and callers without a share are not counted in one.
        let b = hasher.reserve(Some("192.0.2.2")).unwrap();
        let free: Vec<Slot> = (0..3).map(|_| hasher.reserve(None).unwrap()).collect();
        assert!(matches!(
            hasher.reserve(Some("192.0.2.3")),
            Err(AuthError::Overloaded { .. })
        ));
        drop((b, free));
        // A slot is given back once its job has run.
        assert!(
            a1.verify("x", &bcrypt::hash("x", 4).unwrap())
                .await
                .unwrap()
        );
        drop(a2);
        let again: Vec<Slot> = (0..2)
            .map(|_| hasher.reserve(Some("192.0.2.1")).unwrap())
            .collect();
        assert_eq!(again.len(), 2);
        assert!(hasher.shares.lock().len() <= 1);
    }
}

//! bcrypt on a bounded pool of dedicated threads, never on the async workers. When the
//! queue is full a job is refused at once, so a login storm is shed instead of queued.

use std::str::FromStr;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::AuthError;
use crate::config::{BcryptConfig, Secret};

/// Advice to callers shed because the queue is full.
const RETRY_AFTER: Duration = Duration::from_secs(1);

enum Work {
    Hash {
        password: Secret<String>,
        cost: u32,
        reply: oneshot::Sender<Result<String, bcrypt::BcryptError>>,
    },
    Verify {
        password: Secret<String>,
        hash: Secret<String>,
        reply: oneshot::Sender<Result<bool, bcrypt::BcryptError>>,
    },
    /// Other CPU-heavy work on a password: the policy's strength estimate.
    Run(Box<dyn FnOnce() + Send>),
}

struct Job {
    work: Work,
    span: tracing::Span,
    queued_at: Instant,
}

/// A fixed set of hashing threads with a bounded queue in front.
#[derive(Clone)]
pub struct PasswordHasher {
    queue: SyncSender<Job>,
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
    /// Starts `config.workers` threads. They stop when the last handle is dropped.
    pub fn start(config: &BcryptConfig) -> std::io::Result<Self> {
        let (queue, jobs) = mpsc::sync_channel::<Job>(config.queue);
        let jobs = Arc::new(Mutex::new(jobs));
        for i in 0..config.workers {
            let jobs = Arc::clone(&jobs);
            std::thread::Builder::new()
                .name(format!("bcrypt-{i}"))
                .spawn(move || work(&jobs))?;
        }
        Ok(Self {
            queue,
            cost: config.cost,
        })
    }

    /// The cost new hashes get.
    pub fn cost(&self) -> u32 {
        self.cost
    }

    /// Hashes `password` at the configured cost.
    pub async fn hash(&self, password: &str) -> Result<String, AuthError> {
        let (reply, answer) = oneshot::channel();
        self.submit(Work::Hash {
            password: Secret::new(password.to_owned()),
            cost: self.cost,
            reply,
        })?;
        answer
            .await
            .map_err(|_| AuthError::Internal(anyhow::anyhow!("bcrypt worker stopped")))?
            .map_err(|e| AuthError::Internal(anyhow::anyhow!("bcrypt hash failed: {e}")))
    }

    /// Checks `password` against `hash` (any of `$2a$`, `$2b$`, `$2y$`). A hash that
    /// cannot be parsed verifies nothing, and is logged.
    pub async fn verify(&self, password: &str, hash: &str) -> Result<bool, AuthError> {
        let (reply, answer) = oneshot::channel();
        self.submit(Work::Verify {
            password: Secret::new(password.to_owned()),
            hash: Secret::new(hash.to_owned()),
            reply,
        })?;
        let verdict = answer
            .await
            .map_err(|_| AuthError::Internal(anyhow::anyhow!("bcrypt worker stopped")))?;
        match verdict {
            Ok(ok) => Ok(ok),
            Err(e) => {
                tracing::error!(error = %e, "stored password hash is not a bcrypt hash");
                Ok(false)
            }
        }
    }

    /// Runs `f`, CPU-heavy work on a password such as the policy's strength estimate,
    /// on the pool: never on an async worker, and shed like a hash when the queue is full.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, AuthError> {
        let (reply, answer) = oneshot::channel();
        self.submit(Work::Run(Box::new(move || {
            let _ = reply.send(f());
        })))?;
        answer
            .await
            .map_err(|_| AuthError::Internal(anyhow::anyhow!("bcrypt worker stopped")))
    }

    fn submit(&self, work: Work) -> Result<(), AuthError> {
        let job = Job {
            work,
            span: tracing::Span::current(),
            queued_at: Instant::now(),
        };
        // Counted before it is queued, so a worker's decrement never comes first.
        let depth = metrics::gauge!("authd_bcrypt_queue_depth");
        depth.increment(1.0);
        let sent = self.queue.try_send(job);
        if sent.is_err() {
            depth.decrement(1.0);
        }
        match sent {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                metrics::counter!("authd_bcrypt_rejected_total").increment(1);
                Err(AuthError::Overloaded {
                    retry_after: RETRY_AFTER,
                })
            }
            Err(TrySendError::Disconnected(_)) => Err(AuthError::Internal(anyhow::anyhow!(
                "bcrypt workers stopped"
            ))),
        }
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
        }) = job
        else {
            return; // every sender is gone
        };
        metrics::gauge!("authd_bcrypt_queue_depth").decrement(1.0);
        metrics::histogram!("authd_bcrypt_wait_seconds").record(queued_at.elapsed().as_secs_f64());
        let _entered = span.enter();
        match work {
            Work::Hash {
                password,
                cost,
                reply,
            } => {
                let _ = reply.send(bcrypt::hash(password.expose(), cost));
            }
            Work::Verify {
                password,
                hash,
                reply,
            } => {
                let _ = reply.send(bcrypt::verify(password.expose(), hash.expose()));
            }
            Work::Run(f) => f(),
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
        })
        .unwrap();
        let h = bcrypt::hash("Secret-pass-1", 4).unwrap();
        for prefix in ["$2a$", "$2b$", "$2y$"] {
            let h = h.replacen("$2b$", prefix, 1);
            assert!(
                hasher.verify("Secret-pass-1", &h).await.unwrap(),
                "{prefix}"
            );
            assert!(
                !hasher.verify("Secret-pass-2", &h).await.unwrap(),
                "{prefix}"
            );
        }
        assert!(!hasher.verify("x", "garbage").await.unwrap());
    }

    #[tokio::test]
    async fn a_full_queue_is_refused_at_once() {
        let hasher = PasswordHasher::start(&BcryptConfig {
            cost: 12,
            workers: 1,
            queue: 1,
        })
        .unwrap();
        let calls: Vec<_> = (0..4).map(|_| hasher.hash("Secret-pass-1")).collect();
        let results = futures::future::join_all(calls).await;
        let shed = results
            .iter()
            .filter(|r| matches!(r, Err(AuthError::Overloaded { .. })))
            .count();
        assert!(shed >= 1, "no job was shed");
        assert!(results.iter().any(Result::is_ok), "no job ran");
    }
}

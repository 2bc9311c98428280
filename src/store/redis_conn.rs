//! One Redis connection pool with a short timeout per command and a small circuit
//! breaker, shared by everything authd keeps in Redis (sessions, throttling).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::io::tcp::TcpSettings;
use redis::{
    AsyncConnectionConfig, Client, ErrorKind, IntoConnectionInfo, RedisError, ServerErrorKind,
};

use crate::config::RedisConfig;
use crate::store::{PoolStats, StoreError};

/// A pooled Redis; cheap to clone, clones share the pool and the breaker.
#[derive(Clone)]
pub struct RedisConn {
    pool: bb8::Pool<Manager>,
    pool_size: u32,
    command_timeout: Duration,
    breaker: Arc<Breaker>,
}

impl std::fmt::Debug for RedisConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConn")
            .field("command_timeout", &self.command_timeout)
            .finish_non_exhaustive()
    }
}

impl RedisConn {
    /// Builds the pool. Connections are opened lazily, so authd starts (and serves in
    /// open mode) while Redis is down.
    pub fn new(config: &RedisConfig) -> anyhow::Result<Self> {
        // TCP_NODELAY: a command is one small write; with Nagle's algorithm it can wait
        // for the ACK of the previous one while other commands share the connection.
        let info = config
            .url
            .expose()
            .as_str()
            .into_connection_info()
            .map_err(|e| anyhow::anyhow!("REDIS_URL/REDIS_ADDR: {e}"))?
            .set_tcp_settings(TcpSettings::default().set_nodelay(true));
        let client =
            Client::open(info).map_err(|e| anyhow::anyhow!("REDIS_URL/REDIS_ADDR: {e}"))?;
        let manager = Manager {
            client,
            // No response timeout here: `run` bounds every command with its own, and a
            // second timer per command cost CPU on every ValidateToken.
            config: AsyncConnectionConfig::new()
                .set_connection_timeout(Some(config.connect_timeout))
                .set_response_timeout(None),
        };
        // test_on_check_out is off: bb8's default sends a PING before every command,
        // doubling the round trips. Broken connections are found by the command that
        // fails on them instead (see `Conn::broken`).
        let pool = bb8::Pool::builder()
            .max_size(config.pool_size)
            .min_idle(None)
            .test_on_check_out(false)
            .connection_timeout(config.connect_timeout)
            .retry_connection(false)
            .build_unchecked(manager);
        Ok(Self {
            pool,
            pool_size: config.pool_size,
            command_timeout: config.command_timeout,
            breaker: Arc::new(Breaker::new(config.retry_interval)),
        })
    }

    /// Answers PING; for start-up checks and health.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.run(|mut c| async move { redis::cmd("PING").query_async::<String>(&mut c).await })
            .await
            .map(|_| ())
    }

    /// How many connections the pool holds.
    pub fn pool_stats(&self) -> PoolStats {
        let state = self.pool.state();
        PoolStats {
            open: state.connections,
            idle: state.idle_connections,
            max: self.pool_size,
        }
    }

    /// Runs one operation on a pooled connection, within the command timeout; failures
    /// are counted in `authd_store_errors_total`.
    pub async fn run<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        self.run_uncounted(op).await.map_err(|e| e.counted("redis"))
    }

    async fn run_uncounted<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        self.breaker.check()?;
        // The pooled connection goes back at once and the command runs on a clone: a
        // multiplexed connection carries any number of commands at a time, while holding
        // the pool's guard for the whole command allows only `pool_size` in flight and
        // queues the rest for a checkout — under load past the connect timeout, which
        // tripped the breaker and sent ValidateToken into degraded mode.
        let (conn, broken) = loop {
            match self.pool.get().await {
                // A command failed on it since it was checked in: dropping the guard makes
                // the pool discard it.
                Ok(pooled) if pooled.broken.load(Ordering::Relaxed) => continue,
                Ok(pooled) => break (pooled.inner.clone(), Arc::clone(&pooled.broken)),
                Err(e) => {
                    self.breaker.trip();
                    return Err(StoreError::Unavailable(anyhow::anyhow!(
                        "no Redis connection: {e}"
                    )));
                }
            }
        };
        match tokio::time::timeout(self.command_timeout, op(conn)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) if is_internal(&e) => Err(StoreError::Internal(e.into())),
            Ok(Err(e)) => {
                broken.store(true, Ordering::Relaxed);
                // A dropped connection says that this connection is dead (Redis restarted,
                // an idle timeout, CLIENT KILL), not that Redis is: the pool replaces it at
                // the next checkout, where a Redis that is really gone fails to connect and
                // trips the breaker. Tripping here turned one dead pooled connection into
                // REDIS_RETRY_INTERVAL of UNAVAILABLE for every caller.
                if !e.is_connection_dropped() {
                    self.breaker.trip();
                }
                Err(StoreError::Unavailable(e.into()))
            }
            Err(_) => {
                broken.store(true, Ordering::Relaxed);
                self.breaker.trip();
                Err(StoreError::Unavailable(anyhow::anyhow!(
                    "Redis did not answer within {:?}",
                    self.command_timeout
                )))
            }
        }
    }
}

/// Errors that mean our request or our reading of the reply is wrong, not that Redis
/// is unreachable.
fn is_internal(e: &RedisError) -> bool {
    matches!(
        e.kind(),
        ErrorKind::Parse
            | ErrorKind::UnexpectedReturnType
            | ErrorKind::Client
            | ErrorKind::Server(
                ServerErrorKind::ResponseError
                    | ServerErrorKind::NoScript
                    | ServerErrorKind::CrossSlot
                    | ServerErrorKind::NoPerm
                    | ServerErrorKind::ExecAbort
            )
    )
}

/// A pooled connection and whether a command failed on it.
pub struct Conn {
    inner: MultiplexedConnection,
    /// Shared with the commands running on clones: the pool drops the connection the next
    /// time it passes through after one of them failed.
    broken: Arc<AtomicBool>,
}

struct Manager {
    client: Client,
    config: AsyncConnectionConfig,
}

impl bb8::ManageConnection for Manager {
    type Connection = Conn;
    type Error = RedisError;

    async fn connect(&self) -> Result<Conn, RedisError> {
        let inner = self
            .client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await?;
        Ok(Conn {
            inner,
            broken: Arc::new(AtomicBool::new(false)),
        })
    }

    async fn is_valid(&self, conn: &mut Conn) -> Result<(), RedisError> {
        redis::cmd("PING")
            .query_async::<String>(&mut conn.inner)
            .await
            .map(|_| ())
    }

    fn has_broken(&self, conn: &mut Conn) -> bool {
        conn.broken.load(Ordering::Relaxed)
    }
}

/// After a failure, fail fast until `interval` has passed, then try Redis again.
struct Breaker {
    start: Instant,
    interval: Duration,
    open_until_ms: AtomicU64,
}

impl Breaker {
    fn new(interval: Duration) -> Self {
        Self {
            start: Instant::now(),
            interval,
            open_until_ms: AtomicU64::new(0),
        }
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn check(&self) -> Result<(), StoreError> {
        if self.elapsed_ms() < self.open_until_ms.load(Ordering::Relaxed) {
            return Err(StoreError::Unavailable(anyhow::anyhow!(
                "Redis failed recently; next attempt within {:?}",
                self.interval
            )));
        }
        Ok(())
    }

    fn trip(&self) {
        if self.interval.is_zero() {
            return;
        }
        let interval = u64::try_from(self.interval.as_millis()).unwrap_or(u64::MAX);
        self.open_until_ms.store(
            self.elapsed_ms().saturating_add(interval),
            Ordering::Relaxed,
        );
        metrics::counter!("authd_redis_failures_total").increment(1);
    }
}

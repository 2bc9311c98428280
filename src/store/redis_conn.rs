//! One Redis connection pool with a short timeout per command and a small circuit
//! breaker, shared by everything authd keeps in Redis (sessions, throttling).
//!
//! The pool holds [`Connection`]s to whichever Redis is configured: one server, a
//! Redis Cluster (the redis crate's cluster client routes each command to the primary
//! of its key's slot and follows the cluster's changes), or the primary that Sentinel
//! names (asked again for every new connection, so a promotion is followed without a
//! restart).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::io::tcp::TcpSettings;
use redis::sentinel::{
    SentinelClient, SentinelClientBuilder, SentinelNodeConnectionInfo, SentinelServerType,
};
use redis::{
    AsyncConnectionConfig, Client, Cmd, ErrorKind, IntoConnectionInfo, Pipeline, RedisError,
    RedisFuture, ServerErrorKind, Value,
};
use redis::{ClientTlsConfig, TlsCertificates};

use crate::config::{RedisConfig, RedisTopology, WaitReplicas};
use crate::store::{PoolStats, StoreError};

/// A pooled Redis; cheap to clone, clones share the pool and the breaker.
#[derive(Clone)]
pub struct RedisConn {
    pool: bb8::Pool<Manager>,
    /// Makes connections outside the pool (the revocation log's blocking reads).
    target: Arc<Target>,
    pool_size: u32,
    command_timeout: Duration,
    wait: Option<WaitReplicas>,
    breaker: Arc<Breaker>,
}

impl std::fmt::Debug for RedisConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConn")
            .field("command_timeout", &self.command_timeout)
            .finish_non_exhaustive()
    }
}

/// A connection to the configured Redis: commands, pipelines and scripts run on it
/// alike, whatever the topology.
#[derive(Clone)]
pub enum Connection {
    /// One server, or the primary Sentinel named when it was opened.
    Node(MultiplexedConnection),
    /// A Redis Cluster: every command goes to the primary of its key's slot.
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Node(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Node(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Node(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

impl Connection {
    /// `WAIT replicas timeout` on the node that holds `key` (on a cluster, its slot's
    /// primary), on this same connection so that it covers the writes just sent on it.
    /// Returns how many replicas confirmed.
    async fn wait_replicas(&mut self, key: &str, wait: WaitReplicas) -> Result<u32, RedisError> {
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(wait.replicas).arg(
            u64::try_from(wait.timeout.as_millis())
                .unwrap_or(u64::MAX)
                .max(1),
        );
        let reply = match self {
            Connection::Node(c) => cmd.query_async::<Value>(c).await?,
            Connection::Cluster(c) => {
                let route = Route::with_key(key, SlotAddr::Master);
                c.route_command(
                    cmd,
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route)),
                )
                .await?
            }
        };
        redis::from_redis_value::<u32>(reply)
            .map_err(|e| RedisError::from((ErrorKind::Parse, "WAIT reply", e.to_string())))
    }
}

/// Where connections go, and how they are opened. One per pool, behind an `Arc`.
#[allow(clippy::large_enum_variant)]
enum Target {
    Node(Client),
    Cluster(ClusterClient),
    Sentinel(Arc<tokio::sync::Mutex<SentinelClient>>),
}

impl Target {
    fn new(config: &RedisConfig) -> anyhow::Result<Self> {
        // TCP_NODELAY: a command is one small write; with Nagle's algorithm it can wait
        // for the ACK of the previous one while other commands share the connection.
        let tcp = || TcpSettings::default().set_nodelay(true);
        Ok(match &config.topology {
            RedisTopology::Single(url) => {
                let info = url
                    .expose()
                    .as_str()
                    .into_connection_info()
                    .map_err(|e| anyhow::anyhow!("REDIS_URL/REDIS_ADDR: {e}"))?
                    .set_tcp_settings(tcp());
                let client = match certificates(config)? {
                    Some(certs) => Client::build_with_tls(info, certs),
                    None => Client::open(info),
                };
                Target::Node(client.map_err(|e| anyhow::anyhow!("REDIS_URL/REDIS_ADDR: {e}"))?)
            }
            RedisTopology::Cluster(nodes) => {
                let builder = ClusterClientBuilder::new(nodes.expose().iter().map(String::as_str))
                    .connection_timeout(config.connect_timeout)
                    .tcp_settings(tcp())
                    // A command is bounded by `run`'s own timeout: a few quick retries
                    // (a slot that moved, a primary being replaced) fit in it.
                    .retries(3)
                    .min_retry_wait(10)
                    .max_retry_wait(100);
                let builder = match certificates(config)? {
                    Some(certs) => builder.certs(certs),
                    None => builder,
                };
                Target::Cluster(
                    builder
                        .build()
                        .map_err(|e| anyhow::anyhow!("REDIS_CLUSTER_NODES/REDIS_URL: {e}"))?,
                )
            }
            RedisTopology::Sentinel {
                sentinels,
                master,
                primary,
            } => {
                let primary = primary
                    .expose()
                    .as_str()
                    .into_connection_info()
                    .map_err(|e| anyhow::anyhow!("REDIS_SENTINELS/REDIS_URL: {e}"))?;
                let mut node = SentinelNodeConnectionInfo::default()
                    .set_redis_connection_info(primary.redis_settings().clone())
                    .set_tcp_settings(tcp());
                if is_tls(primary.addr()) {
                    node = node.set_tls_mode(redis::TlsMode::Secure);
                }
                let client = match certificates(config)? {
                    None => SentinelClient::build(
                        sentinels.iter().map(String::as_str).collect(),
                        master.clone(),
                        Some(node),
                        SentinelServerType::Master,
                    ),
                    // Certificates of our own: the builder takes them for the sentinels
                    // and for the primary they name.
                    Some(certs) => sentinel_with_certificates(sentinels, master, &primary, certs),
                }
                .map_err(|e| anyhow::anyhow!("REDIS_SENTINELS/REDIS_URL: {e}"))?;
                Target::Sentinel(Arc::new(tokio::sync::Mutex::new(client)))
            }
        })
    }

    async fn connect(&self, config: &AsyncConnectionConfig) -> Result<Connection, RedisError> {
        match self {
            Target::Node(client) => client
                .get_multiplexed_async_connection_with_config(config)
                .await
                .map(Connection::Node),
            Target::Cluster(client) => client.get_async_connection().await.map(Connection::Cluster),
            // Sentinel is asked where the primary is now, so a new connection follows a
            // promotion.
            Target::Sentinel(client) => client
                .lock()
                .await
                .get_async_connection_with_config(config)
                .await
                .map(Connection::Node),
        }
    }
}

fn is_tls(addr: &redis::ConnectionAddr) -> bool {
    matches!(addr, redis::ConnectionAddr::TcpTls { .. })
}

/// The configured TLS files, read (`None` when there are none: the system's roots).
fn certificates(config: &RedisConfig) -> anyhow::Result<Option<TlsCertificates>> {
    let Some(tls) = &config.tls else {
        return Ok(None);
    };
    let read = |name: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| anyhow::anyhow!("{name} ({}): {e}", path.display()))
    };
    let root_cert = match &tls.ca_file {
        Some(path) => Some(read("REDIS_TLS_CA_FILE", path)?),
        None => None,
    };
    let client_tls = match &tls.client {
        Some((cert, key)) => Some(ClientTlsConfig {
            client_cert: read("REDIS_TLS_CERT_FILE", cert)?,
            client_key: read("REDIS_TLS_KEY_FILE", key)?,
        }),
        None => None,
    };
    Ok(Some(TlsCertificates {
        client_tls,
        root_cert,
    }))
}

/// A Sentinel client whose connections (to the sentinels and to the primary) use
/// `certs`. The sentinels are `rediss://host:port/` URLs; `primary` holds the primary's
/// credentials and database.
fn sentinel_with_certificates(
    sentinels: &[String],
    master: &str,
    primary: &redis::ConnectionInfo,
    certs: TlsCertificates,
) -> redis::RedisResult<SentinelClient> {
    let addrs = sentinels
        .iter()
        .map(|s| s.as_str().into_connection_info().map(|i| i.addr().clone()))
        .collect::<Result<Vec<_>, _>>()?;
    let settings = primary.redis_settings();
    let mut builder = SentinelClientBuilder::new(addrs, master, SentinelServerType::Master)?
        .set_client_to_redis_tls_mode(redis::TlsMode::Secure)
        .set_client_to_redis_db(settings.db())
        .set_client_to_redis_tcp_settings(TcpSettings::default().set_nodelay(true))
        .set_client_to_redis_certificates(certs.clone())
        .set_client_to_sentinel_tls_mode(redis::TlsMode::Secure)
        .set_client_to_sentinel_certificates(certs);
    if let Some(user) = settings.username() {
        builder = builder.set_client_to_redis_username(user);
    }
    if let Some(password) = settings.password() {
        builder = builder.set_client_to_redis_password(password);
    }
    builder.build()
}

impl RedisConn {
    /// Builds the pool. Connections are opened lazily, so authd starts (and serves in
    /// open mode) while Redis is down.
    pub fn new(config: &RedisConfig) -> anyhow::Result<Self> {
        let target = Arc::new(Target::new(config)?);
        let manager = Manager {
            target: Arc::clone(&target),
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
            target,
            pool_size: config.pool_size,
            command_timeout: config.command_timeout,
            wait: config.wait,
            breaker: Arc::new(Breaker::new(config.retry_interval)),
        })
    }

    /// A connection of its own, outside the pool and without a response timeout, for
    /// blocking reads; within `connect_timeout`.
    pub async fn dedicated(&self, connect_timeout: Duration) -> Result<Connection, RedisError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(None);
        match tokio::time::timeout(connect_timeout * 4, self.target.connect(&config)).await {
            Ok(result) => result,
            Err(_) => Err(RedisError::from((
                ErrorKind::Io,
                "no Redis connection within the connect timeout",
            ))),
        }
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
        F: FnOnce(Connection) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        self.run_uncounted(self.command_timeout, op)
            .await
            .map_err(|e| e.counted("redis"))
    }

    /// [`RedisConn::run`] for an operation that revokes: with `REDIS_WAIT_REPLICAS`
    /// set, it is followed on the same connection by a WAIT on the node that holds
    /// `key`, and answers UNAVAILABLE unless enough replicas confirmed in time (the
    /// change is then on the primary but not known to survive its loss).
    pub async fn run_confirmed<T, F, Fut>(&self, key: &str, op: F) -> Result<T, StoreError>
    where
        F: FnOnce(Connection) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        self.run_confirmed_if(key, op, |_| true).await
    }

    /// [`RedisConn::run_confirmed`], waiting only when `revoked` says that the
    /// operation's result revoked something.
    pub async fn run_confirmed_if<T, F, Fut>(
        &self,
        key: &str,
        op: F,
        revoked: impl FnOnce(&T) -> bool,
    ) -> Result<T, StoreError>
    where
        F: FnOnce(Connection) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let Some(wait) = self.wait else {
            return self.run(op).await;
        };
        let (value, confirmed) = self
            .run_uncounted(self.command_timeout + wait.timeout, |c| async move {
                let mut same = c.clone();
                let value = op(c).await?;
                if !revoked(&value) {
                    return Ok((value, None));
                }
                let confirmed = same.wait_replicas(key, wait).await?;
                Ok((value, Some(confirmed)))
            })
            .await
            .map_err(|e| e.counted("redis"))?;
        match confirmed {
            Some(n) if n < wait.replicas => {
                metrics::counter!("authd_redis_wait_shortfalls_total").increment(1);
                Err(StoreError::Unavailable(anyhow::anyhow!(
                    "{n} of {} Redis replicas confirmed the revocation within {:?}",
                    wait.replicas,
                    wait.timeout
                ))
                .counted("redis"))
            }
            _ => Ok(value),
        }
    }

    async fn run_uncounted<T, F, Fut>(&self, timeout: Duration, op: F) -> Result<T, StoreError>
    where
        F: FnOnce(Connection) -> Fut,
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
        match tokio::time::timeout(timeout, op(conn)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) if is_internal(&e) => Err(StoreError::Internal(e.into())),
            Ok(Err(e)) => {
                broken.store(true, Ordering::Relaxed);
                // A dropped connection says that this connection is dead (Redis restarted,
                // an idle timeout, CLIENT KILL), not that Redis is: the pool replaces it at
                // the next checkout, where a Redis that is really gone fails to connect and
                // trips the breaker. Tripping here turned one dead pooled connection into
                // REDIS_RETRY_INTERVAL of UNAVAILABLE for every caller. READONLY says the
                // same of a connection to a primary that was demoted: the next one asks
                // Sentinel where the primary is now.
                if !(e.is_connection_dropped() || is_demoted(&e)) {
                    self.breaker.trip();
                }
                Err(StoreError::Unavailable(e.into()))
            }
            Err(_) => {
                broken.store(true, Ordering::Relaxed);
                self.breaker.trip();
                Err(StoreError::Unavailable(anyhow::anyhow!(
                    "Redis did not answer within {timeout:?}"
                )))
            }
        }
    }
}

/// A write refused by a replica: the connection's server is no longer the primary.
fn is_demoted(e: &RedisError) -> bool {
    matches!(e.kind(), ErrorKind::Server(ServerErrorKind::ReadOnly))
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
    inner: Connection,
    /// Shared with the commands running on clones: the pool drops the connection the next
    /// time it passes through after one of them failed.
    broken: Arc<AtomicBool>,
}

struct Manager {
    target: Arc<Target>,
    config: AsyncConnectionConfig,
}

impl bb8::ManageConnection for Manager {
    type Connection = Conn;
    type Error = RedisError;

    async fn connect(&self) -> Result<Conn, RedisError> {
        let inner = self.target.connect(&self.config).await?;
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

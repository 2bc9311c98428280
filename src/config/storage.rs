//! Where users and sessions live: MySQL or SQLite, Redis or the process.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use sqlx::mysql::MySqlConnectOptions;

use super::error::ConfigError;
use super::raw::RawEnv;
use super::values::{duration, number, percent_encode, positive_duration};
use crate::secret::Secret;

/// What ValidateToken does when Redis cannot be asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisFailureMode {
    /// Answer from the signature, the claims and the user's `sessions_valid_after`,
    /// with `revocation_checked = false`.
    Open,
    /// Answer UNAVAILABLE.
    Closed,
}

/// How the Redis that authd uses is deployed.
#[derive(Debug, Clone)]
pub enum RedisTopology {
    /// One server (`REDIS_URL`, `REDIS_ADDR`): its URL, with its credentials.
    Single(Secret<String>),
    /// A Redis Cluster (`REDIS_CLUSTER_NODES`, `redis+cluster://`): a URL per seed node,
    /// each with the credentials; the rest of the cluster is discovered from them.
    Cluster(Secret<Vec<String>>),
    /// A primary watched by Sentinel (`REDIS_SENTINELS`, `redis+sentinel://`): the
    /// primary is asked of the sentinels at every new connection.
    Sentinel {
        /// The sentinels' URLs.
        sentinels: Vec<String>,
        /// The name the sentinels monitor the primary under.
        master: String,
        /// The primary's scheme, credentials and database, as a URL with no host
        /// (`redis://:password@/0`): the sentinels say where it is.
        primary: Secret<String>,
    },
}

impl RedisTopology {
    /// Whether its connections are TLS (a `rediss` scheme).
    pub fn uses_tls(&self) -> bool {
        let tls = |url: &str| url.to_ascii_lowercase().starts_with("rediss://");
        match self {
            RedisTopology::Single(url) => tls(url.expose()),
            RedisTopology::Cluster(nodes) => nodes.expose().iter().any(|n| tls(n)),
            RedisTopology::Sentinel { sentinels, .. } => sentinels.iter().any(|s| tls(s)),
        }
    }

    /// What, for log lines and messages.
    pub fn describe(&self) -> String {
        match self {
            RedisTopology::Single(_) => "Redis".to_owned(),
            RedisTopology::Cluster(nodes) => {
                format!("Redis Cluster ({} seed nodes)", nodes.expose().len())
            }
            RedisTopology::Sentinel {
                sentinels, master, ..
            } => format!("Redis primary {master:?} by {} sentinels", sentinels.len()),
        }
    }
}

/// Revocations wait for this many replicas to hold them before they are acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitReplicas {
    /// Replicas that must confirm (`REDIS_WAIT_REPLICAS`, at least 1).
    pub replicas: u32,
    /// How long they have (`REDIS_WAIT_TIMEOUT`); past it the revocation is UNAVAILABLE.
    pub timeout: Duration,
}

/// Redis settings.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// Where Redis is, with its credentials.
    pub topology: RedisTopology,
    /// Prepended to every key authd writes.
    pub key_prefix: String,
    /// Connections in the pool. Each carries any number of commands at once; one (the
    /// default) pipelines every concurrent command into the same writes and reads,
    /// which measured cheaper for authd and for Redis than eight.
    pub pool_size: u32,
    /// Time allowed to open a connection or take one from the pool.
    pub connect_timeout: Duration,
    /// Time allowed for one command or pipeline.
    pub command_timeout: Duration,
    /// After a failure, how long calls skip Redis before trying it again.
    pub retry_interval: Duration,
    /// What ValidateToken does when Redis cannot be asked.
    pub failure_mode: RedisFailureMode,
    /// Whether revocations wait for replicas (`None`: they do not).
    pub wait: Option<WaitReplicas>,
    /// Certificates for TLS to Redis (`None`: the system's roots, no client certificate).
    pub tls: Option<Box<super::redis_tls::RedisTls>>,
}

/// Where users live.
#[derive(Debug, Clone)]
pub enum UsersBackend {
    /// A MySQL/MariaDB server: `DATABASE_URL=mysql://…` or any `DB_*` variable.
    MySql(Box<DatabaseConfig>),
    /// An SQLite file: `DATABASE_URL=sqlite:…`, or the default when no database is set.
    Sqlite {
        /// The file; created if missing.
        path: PathBuf,
    },
}

impl UsersBackend {
    /// Where, for log lines and messages.
    pub fn describe(&self) -> String {
        match self {
            UsersBackend::MySql(db) => format!("MySQL at {}", db.display),
            UsersBackend::Sqlite { path } => format!("SQLite file {}", path.display()),
        }
    }
}

/// Where sessions and the blacklist live.
#[derive(Debug, Clone)]
pub enum SessionsBackend {
    /// Redis: `REDIS_URL` or `REDIS_ADDR`.
    Redis(RedisConfig),
    /// This process's memory, when no Redis is set: one instance only, gone on restart.
    Memory,
}

impl SessionsBackend {
    /// Where, for log lines and messages.
    pub fn describe(&self) -> String {
        match self {
            SessionsBackend::Redis(r) => r.topology.describe(),
            SessionsBackend::Memory => "in-process memory".to_owned(),
        }
    }

    /// What ValidateToken does when the session store cannot be asked.
    pub fn failure_mode(&self) -> RedisFailureMode {
        match self {
            SessionsBackend::Redis(r) => r.failure_mode,
            // Memory always answers.
            SessionsBackend::Memory => RedisFailureMode::Closed,
        }
    }
}

/// MySQL settings.
#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    /// Where the database is, with its credentials.
    pub options: Secret<MySqlConnectOptions>,
    /// Host and port, for messages.
    pub display: String,
    /// Connections in the pool.
    pub pool_size: u32,
    /// Time allowed to take a connection from the pool.
    pub acquire_timeout: Duration,
    /// Time allowed for one query (or one transaction).
    pub query_timeout: Duration,
}

/// The SQLite file used when no database is configured.
pub const DEFAULT_SQLITE_PATH: &str = "authd.db";

pub(super) fn users(raw: &RawEnv) -> Result<UsersBackend, ConfigError> {
    // Checked even when SQLite is chosen, so a typo is never silently ignored.
    let pool = mysql_pool(raw)?;
    let any_db_part = [
        &raw.db_host,
        &raw.db_port,
        &raw.db_user,
        &raw.db_pass,
        &raw.db_name,
    ]
    .iter()
    .any(|v| v.is_some());
    match &raw.database_url {
        Some(url) if url.starts_with("sqlite:") => {
            let path = url
                .trim_start_matches("sqlite:")
                .trim_start_matches("//")
                .split('?')
                .next()
                .unwrap_or_default();
            if path.is_empty() {
                return Err(ConfigError::new(
                    "DATABASE_URL",
                    "names no file (write sqlite://path/to/authd.db)",
                ));
            }
            Ok(UsersBackend::Sqlite {
                path: PathBuf::from(path),
            })
        }
        None if !any_db_part => Ok(UsersBackend::Sqlite {
            path: PathBuf::from(
                raw.sqlite_path
                    .clone()
                    .unwrap_or_else(|| DEFAULT_SQLITE_PATH.to_owned()),
            ),
        }),
        _ => mysql(raw, pool).map(|db| UsersBackend::MySql(Box::new(db))),
    }
}

fn mysql(raw: &RawEnv, pool: MySqlPool) -> Result<DatabaseConfig, ConfigError> {
    let (options, display) = match &raw.database_url {
        Some(url) => {
            if !(url.starts_with("mysql://") || url.starts_with("mariadb://")) {
                return Err(ConfigError::new(
                    "DATABASE_URL",
                    "must start with mysql:// or sqlite: (like mysql://user:password@host:3306/authd)",
                ));
            }
            let options = MySqlConnectOptions::from_str(url).map_err(|_| {
                ConfigError::new(
                    "DATABASE_URL",
                    "is not a MySQL URL like mysql://user:password@host:3306/authd",
                )
            })?;
            let display = format!("{}:{}", options.get_host(), options.get_port());
            (options, display)
        }
        None => {
            let host = raw
                .db_host
                .clone()
                .unwrap_or_else(|| "127.0.0.1".to_owned());
            let port = number("DB_PORT", raw.db_port.clone(), 3306u16)?;
            let mut options = MySqlConnectOptions::new()
                .host(&host)
                .port(port)
                .username(raw.db_user.as_deref().unwrap_or("root"))
                .database(raw.db_name.as_deref().unwrap_or("authd"));
            if let Some(pass) = &raw.db_pass {
                options = options.password(pass);
            }
            (options, format!("{host}:{port}"))
        }
    };
    Ok(DatabaseConfig {
        options: Secret::new(options),
        display,
        pool_size: pool.size,
        acquire_timeout: pool.acquire_timeout,
        query_timeout: pool.query_timeout,
    })
}

/// The MySQL pool's settings.
struct MySqlPool {
    size: u32,
    acquire_timeout: Duration,
    query_timeout: Duration,
}

fn mysql_pool(raw: &RawEnv) -> Result<MySqlPool, ConfigError> {
    let size = number("DB_POOL_SIZE", raw.db_pool_size.clone(), 10u32)?;
    if size == 0 {
        return Err(ConfigError::new("DB_POOL_SIZE", "must be at least 1"));
    }
    Ok(MySqlPool {
        size,
        acquire_timeout: duration(
            "DB_ACQUIRE_TIMEOUT",
            raw.db_acquire_timeout.clone(),
            Duration::from_secs(2),
        )?,
        query_timeout: positive_duration(
            "DB_QUERY_TIMEOUT",
            raw.db_query_timeout.clone(),
            Duration::from_secs(2),
        )?,
    })
}

pub(super) fn redis(raw: &RawEnv) -> Result<Option<RedisConfig>, ConfigError> {
    // Every Redis setting is checked even when Redis is not used, so a typo is never
    // silently ignored.
    let topology = topology(raw)?;
    let key_prefix = raw
        .redis_key_prefix
        .clone()
        .unwrap_or_else(|| "authd:".to_owned());
    if key_prefix.contains('{') || key_prefix.contains('}') {
        // The first {...} in a key is its Redis Cluster hash tag; ours is {user:<id>}.
        return Err(ConfigError::new(
            "REDIS_KEY_PREFIX",
            "must not contain { or }",
        ));
    }
    let pool_size = number("REDIS_POOL_SIZE", raw.redis_pool_size.clone(), 1u32)?;
    if pool_size == 0 {
        return Err(ConfigError::new("REDIS_POOL_SIZE", "must be at least 1"));
    }
    let failure_mode = match raw
        .redis_failure_mode
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None | Some("open") => RedisFailureMode::Open,
        Some("closed") => RedisFailureMode::Closed,
        Some(other) => {
            return Err(ConfigError::new(
                "REDIS_FAILURE_MODE",
                format!("must be open or closed, got {other:?}"),
            ));
        }
    };
    let connect_timeout = positive_duration(
        "REDIS_CONNECT_TIMEOUT",
        raw.redis_connect_timeout.clone(),
        Duration::from_millis(250),
    )?;
    let command_timeout = positive_duration(
        "REDIS_COMMAND_TIMEOUT",
        raw.redis_command_timeout.clone(),
        Duration::from_millis(250),
    )?;
    let retry_interval = duration(
        "REDIS_RETRY_INTERVAL",
        raw.redis_retry_interval.clone(),
        Duration::from_millis(500),
    )?;
    let wait = wait(raw)?;
    let Some(topology) = topology else {
        if wait.is_some() {
            return Err(ConfigError::new(
                "REDIS_WAIT_REPLICAS",
                "is set but no Redis is (set REDIS_URL, REDIS_CLUSTER_NODES or REDIS_SENTINELS)",
            ));
        }
        if raw.redis_tls_ca_file.is_some() || raw.redis_tls_cert_file.is_some() {
            super::redis_tls::redis_tls(raw, false)?;
        }
        return Ok(None);
    };
    let tls = super::redis_tls::redis_tls(raw, topology.uses_tls())?.map(Box::new);
    Ok(Some(RedisConfig {
        topology,
        wait,
        tls,
        key_prefix,
        pool_size,
        connect_timeout,
        command_timeout,
        retry_interval,
        failure_mode,
    }))
}

/// Which Redis, from `REDIS_URL` (any of its schemes), `REDIS_ADDR`,
/// `REDIS_CLUSTER_NODES` or `REDIS_SENTINELS`: one of them, or none.
fn topology(raw: &RawEnv) -> Result<Option<RedisTopology>, ConfigError> {
    let url_kind = raw.redis_url.as_deref().map(|url| {
        url.split_once("://")
            .map_or("", |(scheme, _)| scheme)
            .to_ascii_lowercase()
    });
    let is_sentinel_url = url_kind
        .as_deref()
        .is_some_and(|k| k.ends_with("+sentinel"));
    // One way to say where Redis is: two would leave a reader guessing which one wins.
    let ways = [
        ("REDIS_CLUSTER_NODES", raw.redis_cluster_nodes.is_some()),
        ("REDIS_SENTINELS", raw.redis_sentinels.is_some()),
        ("REDIS_URL", raw.redis_url.is_some()),
    ];
    let chosen: Vec<&str> = ways
        .iter()
        .filter(|(_, set)| *set)
        .map(|(n, _)| *n)
        .collect();
    if chosen.len() > 1 {
        return Err(ConfigError::new(
            chosen[1],
            format!("and {} are both set; set one of them", chosen[0]),
        ));
    }
    if (raw.redis_cluster_nodes.is_some() || raw.redis_sentinels.is_some())
        && raw.redis_addr.is_some()
    {
        let other = if raw.redis_cluster_nodes.is_some() {
            "REDIS_CLUSTER_NODES"
        } else {
            "REDIS_SENTINELS"
        };
        return Err(ConfigError::new(
            "REDIS_ADDR",
            format!("and {other} are both set; set one of them"),
        ));
    }
    if raw.redis_sentinel_master.is_some() && raw.redis_sentinels.is_none() && !is_sentinel_url {
        return Err(ConfigError::new(
            "REDIS_SENTINEL_MASTER",
            "is set but REDIS_SENTINELS is not; set REDIS_SENTINELS (host:port,...) too",
        ));
    }
    let password = raw.redis_password.as_deref();
    if let Some(nodes) = &raw.redis_cluster_nodes {
        let userinfo = password.map(|p| format!(":{}", percent_encode(p)));
        let hosts = host_list("REDIS_CLUSTER_NODES", nodes)?;
        return Ok(Some(cluster("redis", userinfo.as_deref(), &hosts, "")));
    }
    if let Some(sentinels) = &raw.redis_sentinels {
        let hosts = host_list("REDIS_SENTINELS", sentinels)?;
        let Some(master) = raw.redis_sentinel_master.clone().filter(|m| !m.is_empty()) else {
            return Err(ConfigError::new(
                "REDIS_SENTINEL_MASTER",
                "is not set; REDIS_SENTINELS needs the name the sentinels monitor the primary under",
            ));
        };
        let userinfo = password.map(|p| format!(":{}", percent_encode(p)));
        return Ok(Some(sentinel(
            "redis",
            userinfo.as_deref(),
            &hosts,
            master,
            "0",
        )));
    }
    match (&raw.redis_url, &raw.redis_addr) {
        (None, None) => {
            if raw.redis_password.is_some() {
                return Err(ConfigError::new(
                    "REDIS_PASSWORD",
                    "is set but REDIS_ADDR is not; set REDIS_ADDR (host:port) too",
                ));
            }
            Ok(None)
        }
        (Some(url), _) => match url_kind.as_deref() {
            Some("redis" | "rediss") => Ok(Some(RedisTopology::Single(Secret::new(url.clone())))),
            Some(kind @ ("redis+cluster" | "rediss+cluster")) => {
                let (userinfo, hosts, path) = split_multi_host_url(url)?;
                let path = path.split('?').next().unwrap_or_default();
                if !(path.is_empty() || path == "0") {
                    return Err(ConfigError::new(
                        "REDIS_URL",
                        "names a database; a Redis Cluster has only database 0",
                    ));
                }
                let scheme = kind.trim_end_matches("+cluster");
                Ok(Some(cluster(scheme, userinfo, &hosts, "")))
            }
            Some(kind @ ("redis+sentinel" | "rediss+sentinel")) => {
                let (userinfo, hosts, path) = split_multi_host_url(url)?;
                let mut parts = path.splitn(2, '/');
                let in_url = parts.next().unwrap_or_default();
                let db = parts.next().unwrap_or("0");
                let master = match (in_url, raw.redis_sentinel_master.as_deref()) {
                    ("", Some(m)) if !m.is_empty() => m.to_owned(),
                    ("", _) => {
                        return Err(ConfigError::new(
                            "REDIS_URL",
                            "names no primary; write redis+sentinel://host:port,host:port/<name>",
                        ));
                    }
                    (m, Some(other)) if m != other => {
                        return Err(ConfigError::new(
                            "REDIS_SENTINEL_MASTER",
                            format!("is {other:?} but REDIS_URL names {m:?}; set one of them"),
                        ));
                    }
                    (m, _) => m.to_owned(),
                };
                if db.parse::<u16>().is_err() {
                    return Err(ConfigError::new(
                        "REDIS_URL",
                        format!("has database {db:?}; write a number after the primary's name"),
                    ));
                }
                let scheme = kind.trim_end_matches("+sentinel");
                Ok(Some(sentinel(scheme, userinfo, &hosts, master, db)))
            }
            _ => Err(ConfigError::new(
                "REDIS_URL",
                "must start with redis://, rediss://, redis+cluster://, rediss+cluster://, \
                 redis+sentinel:// or rediss+sentinel://",
            )),
        },
        (None, Some(addr)) => {
            if addr.contains('/') || addr.contains('@') || !addr.contains(':') {
                return Err(ConfigError::new(
                    "REDIS_ADDR",
                    format!("must be host:port, got {addr:?}"),
                ));
            }
            Ok(Some(RedisTopology::Single(Secret::new(match password {
                Some(pass) => format!("redis://:{}@{addr}/", percent_encode(pass)),
                None => format!("redis://{addr}/"),
            }))))
        }
    }
}

fn cluster(scheme: &str, userinfo: Option<&str>, hosts: &[String], path: &str) -> RedisTopology {
    let at = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
    RedisTopology::Cluster(Secret::new(
        hosts
            .iter()
            .map(|h| format!("{scheme}://{at}{h}/{path}"))
            .collect(),
    ))
}

fn sentinel(
    scheme: &str,
    userinfo: Option<&str>,
    hosts: &[String],
    master: String,
    db: &str,
) -> RedisTopology {
    let at = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
    RedisTopology::Sentinel {
        // The credentials are the primary's; the sentinels are asked without them.
        sentinels: hosts.iter().map(|h| format!("{scheme}://{h}/")).collect(),
        master,
        primary: Secret::new(format!("{scheme}://{at}primary/{db}")),
    }
}

/// `scheme://[userinfo@]host:port,host:port[/path]` into its userinfo, hosts and path.
fn split_multi_host_url(url: &str) -> Result<(Option<&str>, Vec<String>, &str), ConfigError> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let (userinfo, rest) = match rest.rsplit_once('@') {
        Some((userinfo, rest)) => (Some(userinfo), rest),
        None => (None, rest),
    };
    let (hosts, path) = rest.split_once('/').unwrap_or((rest, ""));
    Ok((userinfo, host_list("REDIS_URL", hosts)?, path))
}

/// `host:port,host:port`: at least one, each with a port.
fn host_list(variable: &'static str, list: &str) -> Result<Vec<String>, ConfigError> {
    let hosts: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(str::to_owned)
        .collect();
    if hosts.is_empty() {
        return Err(ConfigError::new(variable, "names no host:port"));
    }
    for host in &hosts {
        let port = host.rsplit_once(':').map(|(_, p)| p);
        if host.contains('/')
            || host.contains('@')
            || port.is_none_or(|p| p.parse::<u16>().is_err())
        {
            return Err(ConfigError::new(
                variable,
                format!("must list host:port entries separated by commas, got {host:?}"),
            ));
        }
    }
    Ok(hosts)
}

/// `REDIS_WAIT_REPLICAS` and `REDIS_WAIT_TIMEOUT`.
fn wait(raw: &RawEnv) -> Result<Option<WaitReplicas>, ConfigError> {
    let replicas = number("REDIS_WAIT_REPLICAS", raw.redis_wait_replicas.clone(), 0u32)?;
    let timeout = positive_duration(
        "REDIS_WAIT_TIMEOUT",
        raw.redis_wait_timeout.clone(),
        Duration::from_millis(200),
    )?;
    if replicas == 0 {
        if raw.redis_wait_timeout.is_some() {
            return Err(ConfigError::new(
                "REDIS_WAIT_TIMEOUT",
                "is set but REDIS_WAIT_REPLICAS is 0 (off); set REDIS_WAIT_REPLICAS too",
            ));
        }
        return Ok(None);
    }
    Ok(Some(WaitReplicas { replicas, timeout }))
}

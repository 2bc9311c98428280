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

/// Redis settings.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// Where Redis is, with its credentials.
    pub url: Secret<String>,
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
    pub fn describe(&self) -> &'static str {
        match self {
            SessionsBackend::Redis(_) => "Redis",
            SessionsBackend::Memory => "in-process memory",
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
    let url = match (&raw.redis_url, &raw.redis_addr) {
        (None, None) => {
            if raw.redis_password.is_some() {
                return Err(ConfigError::new(
                    "REDIS_PASSWORD",
                    "is set but REDIS_ADDR is not; set REDIS_ADDR (host:port) too",
                ));
            }
            None
        }
        (Some(url), _) => {
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(ConfigError::new(
                    "REDIS_URL",
                    "must start with redis:// or rediss://",
                ));
            }
            Some(url.clone())
        }
        (None, Some(addr)) => {
            if addr.contains('/') || addr.contains('@') || !addr.contains(':') {
                return Err(ConfigError::new(
                    "REDIS_ADDR",
                    format!("must be host:port, got {addr:?}"),
                ));
            }
            Some(match &raw.redis_password {
                Some(pass) => format!("redis://:{}@{addr}/", percent_encode(pass)),
                None => format!("redis://{addr}/"),
            })
        }
    };
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
    let Some(url) = url else {
        return Ok(None);
    };
    Ok(Some(RedisConfig {
        url: Secret::new(url),
        key_prefix,
        pool_size,
        connect_timeout,
        command_timeout,
        retry_interval,
        failure_mode,
    }))
}

//! Configuration from the environment (and an optional `.env` file), validated once at
//! start-up. Every problem is reported as one line that names the variable.

//!
//! One file per concern, each with its types and the parser that reads them; this file
//! puts them together.

mod admin;
mod audit;
mod error;
mod listeners;
mod names;
mod network;
mod passwords;
mod raw;
mod redis_tls;
mod refresh;
mod revocations;
mod second_factor;
mod session_cache;
mod sessions;
mod storage;
mod telemetry;
#[cfg(test)]
mod tests;
mod throttle;
mod tokens;
mod values;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use self::audit::AuditConfig;
pub use self::error::ConfigError;
pub use self::listeners::{ConnectionLimits, DEFAULT_HTTP_ADDR, GrpcLimits, TlsConfig};
pub use self::names::{MIN_NAME_HASH_KEY_BYTES, NameHashKey, NameHashKeySource};
pub use self::network::{IpNetwork, TrustedProxies};
pub use self::passwords::{BcryptConfig, HashPriority, PasswordPolicy, PasswordPolicyMode};
use self::raw::RawEnv;
pub use self::raw::SETTINGS;
pub use self::redis_tls::RedisTls;
pub use self::refresh::{DEFAULT_REFRESH_REUSE_GRACE, DEFAULT_SESSION_MAX_LIFETIME, RefreshConfig};
pub use self::revocations::{MIN_WATCH_CREDENTIAL_BYTES, WatchersConfig};
pub use self::second_factor::{
    DEFAULT_TOTP_ISSUER, SecondFactorConfig, TotpKey, parse_key as parse_totp_key,
};
pub use self::session_cache::{
    DEFAULT_SESSION_CACHE_MAX_ENTRIES, DEFAULT_SESSION_CACHE_TTL, SessionCacheConfig,
};
pub use self::sessions::DEFAULT_MAX_SESSIONS_PER_USER;
pub use self::storage::{
    DEFAULT_SQLITE_PATH, DatabaseConfig, RedisConfig, RedisFailureMode, RedisTopology,
    SessionsBackend, UsersBackend, WaitReplicas,
};
pub use self::telemetry::{LogFormat, OtlpConfig};
pub use self::throttle::{ThrottleConfig, ThrottleLimit};
pub use self::tokens::MIN_JWT_SECRET_BYTES;
use crate::auth::token::TokenKeys;
pub use crate::auth::token_config::{JwtConfig, RetiredKey, SigningAlgorithm};
pub use crate::secret::Secret;

/// Everything authd needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    /// gRPC listen address; port 0 picks a free port.
    pub grpc_addr: SocketAddr,
    /// HTTP listener for `/metrics` and `/healthz`; `None` when `HTTP_ADDR` is empty.
    pub http_addr: Option<SocketAddr>,
    /// TLS for the gRPC listener; `None` serves plaintext (e.g. behind a mesh).
    pub tls: Option<TlsConfig>,
    /// Limits on what callers may cost.
    pub limits: GrpcLimits,
    /// Limits on connections: how many, and how soon they must start.
    pub connections: ConnectionLimits,
    /// Trace export; `None` when `OTEL_EXPORTER_OTLP_ENDPOINT` is unset.
    pub otlp: Option<OtlpConfig>,
    /// Users.
    pub users: UsersBackend,
    /// Sessions and the logout blacklist.
    pub sessions: SessionsBackend,
    /// Tokens.
    pub jwt: JwtConfig,
    /// The keys that sign and verify tokens, built from `jwt` once, at start-up.
    pub keys: Arc<TokenKeys>,
    /// Passwords.
    pub bcrypt: BcryptConfig,
    /// A session ends after this long without activity.
    pub session_idle_timeout: Duration,
    /// 0 = unlimited; otherwise Login ends the oldest sessions past this many
    /// (default [`DEFAULT_MAX_SESSIONS_PER_USER`]).
    pub max_sessions_per_user: u32,
    /// Refresh tokens: the absolute session lifetime and the reuse grace.
    pub refresh: RefreshConfig,
    /// Serve gRPC server reflection (v1 and v1alpha).
    pub grpc_reflection: bool,
    /// How log lines are written.
    pub log_format: LogFormat,
    /// How long in-flight calls may run after SIGTERM.
    pub shutdown_grace: Duration,
    /// Revocations kept for watchers that resume (Redis stream / memory ring length).
    pub revocation_log_max_len: usize,
    /// How often WatchRevocations sends a heartbeat when nothing happens.
    pub watch_heartbeat: Duration,
    /// Who may watch revocations.
    pub watchers: WatchersConfig,
    /// Revocations this instance remembers (made here or seen on the stream), to refuse
    /// those tokens while Redis cannot be asked.
    pub revocation_memory_max: usize,
    /// The instance-local cache of live-session answers (`SESSION_CACHE`, off by default).
    pub session_cache: SessionCacheConfig,
    /// Envoy Check: remove the `authorization` header from allowed requests.
    pub ext_authz_strip_authorization: bool,
    /// Callers allowed to set Login's `client_ip`.
    pub trusted_proxies: TrustedProxies,
    /// Login throttling.
    pub throttle: ThrottleConfig,
    /// Rules for new passwords.
    pub password_policy: PasswordPolicy,
    /// The audit trail.
    pub audit: AuditConfig,
    /// The key of the usernames' keyed hash.
    pub name_hash_key: NameHashKey,
    /// Where verifiers reach the HTTP listener (`PUBLIC_URL`, else `JWT_ISSUER` when it is
    /// an http(s) URL), without a trailing `/`: the base of the discovery document's
    /// `jwks_uri`. `None`: built from each request, and not cacheable.
    pub public_url: Option<String>,
    /// SANs of the mTLS client certificates that may call AdminService
    /// (`ADMIN_CLIENT_SANS`); empty: only admins' bearer tokens may.
    pub admin_client_sans: Vec<String>,
    /// The second factor (TOTP): its sealing key and issuer name.
    pub second_factor: SecondFactorConfig,
}

impl Config {
    /// Reads the process environment, after loading `.env` if one is present.
    pub fn from_env() -> Result<Self, ConfigError> {
        match dotenvy::dotenv() {
            Ok(_) => {}
            Err(e) if e.not_found() => {}
            Err(e) => return Err(ConfigError::new(".env", e.to_string())),
        }
        Self::from_vars(std::env::vars())
    }

    /// Builds a configuration from `NAME=value` pairs; used by `from_env` and by tests.
    pub fn from_vars<I>(vars: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let vars: HashMap<String, String> = vars.into_iter().collect();
        // `HTTP_ADDR=` (set, empty) turns the HTTP listener off; unset keeps the default.
        let http_disabled = vars.get("HTTP_ADDR").is_some_and(|v| v.trim().is_empty());
        // Empty values count as unset, as in most shells' `VAR= cmd`.
        let vars: HashMap<String, String> =
            vars.into_iter().filter(|(_, v)| !v.is_empty()).collect();
        let raw: RawEnv =
            envy::from_iter(vars).map_err(|e| ConfigError::new("environment", e.to_string()))?;
        Self::from_raw(raw, http_disabled)
    }

    fn from_raw(raw: RawEnv, http_disabled: bool) -> Result<Self, ConfigError> {
        // Every concern is parsed, whatever the others say, so that a bad value is
        // reported even for a store that is not in use.
        let users = storage::users(&raw)?;
        let sessions = match storage::redis(&raw)? {
            Some(redis) => SessionsBackend::Redis(redis),
            None => SessionsBackend::Memory,
        };
        let embedded = matches!(users, UsersBackend::Sqlite { .. })
            && matches!(sessions, SessionsBackend::Memory);
        let (jwt, keys) = tokens::jwt(&raw, embedded)?;
        Ok(Self {
            grpc_addr: listeners::grpc_addr(&raw)?,
            http_addr: listeners::http_addr(&raw, http_disabled)?,
            tls: listeners::tls(&raw)?,
            limits: listeners::limits(&raw)?,
            connections: listeners::connections(&raw)?,
            otlp: telemetry::otlp(&raw)?,
            log_format: telemetry::log_format(&raw)?,
            users: users.clone(),
            sessions,
            name_hash_key: names::name_hash_key(&raw, embedded)?,
            public_url: listeners::public_url(&raw, &jwt.issuer)?,
            jwt,
            keys,
            bcrypt: passwords::bcrypt(&raw)?,
            password_policy: passwords::password_policy(&raw)?,
            session_idle_timeout: sessions::idle_timeout(&raw)?,
            max_sessions_per_user: sessions::max_per_user(&raw)?,
            refresh: refresh::refresh(&raw)?,
            grpc_reflection: listeners::reflection(&raw)?,
            shutdown_grace: listeners::shutdown_grace(&raw)?,
            revocation_log_max_len: revocations::log_max_len(&raw)?,
            ext_authz_strip_authorization: listeners::ext_authz_strip_authorization(&raw)?,
            watch_heartbeat: revocations::heartbeat(&raw)?,
            watchers: revocations::watchers(&raw)?,
            revocation_memory_max: revocations::memory_max(&raw)?,
            session_cache: session_cache::session_cache(&raw)?,
            trusted_proxies: network::trusted_proxies(raw.trusted_proxies.clone())?,
            throttle: throttle::throttle(&raw)?,
            audit: audit::audit(&raw)?,
            admin_client_sans: admin::admin_client_sans(&raw)?,
            second_factor: second_factor::second_factor(&raw, &users)?,
        })
    }
}

//! Configuration from the environment (and an optional `.env` file), validated once at
//! start-up. Every problem is reported as one line that names the variable.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use sqlx::mysql::MySqlConnectOptions;

/// The smallest `JWT_SECRET` accepted, in bytes.
pub const MIN_JWT_SECRET_BYTES: usize = 32;

/// The smallest `NAME_HASH_KEY` accepted, in bytes.
pub const MIN_NAME_HASH_KEY_BYTES: usize = 32;

/// A value that must never reach a log line or an error message.
#[derive(Clone)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    /// Wraps a secret value.
    pub fn new(value: T) -> Self {
        Self(value)
    }

    /// The secret value itself; call only where it is used.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// A configuration problem: the variable and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{variable}: {problem}")]
pub struct ConfigError {
    /// The environment variable at fault.
    pub variable: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

impl ConfigError {
    fn new(variable: &'static str, problem: impl Into<String>) -> Self {
        Self {
            variable,
            problem: problem.into(),
        }
    }
}

/// What ValidateToken does when Redis cannot be asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisFailureMode {
    /// Answer from the signature, the claims and the user's `sessions_valid_after`,
    /// with `revocation_checked = false`.
    Open,
    /// Answer UNAVAILABLE.
    Closed,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object a line.
    Json,
}

/// How tokens are signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigningAlgorithm {
    /// HMAC-SHA256 with `JWT_SECRET` (default): every verifier can also sign.
    Hs256,
    /// Ed25519.
    EdDsa,
    /// ECDSA P-256 with SHA-256.
    Es256,
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    Rs256,
}

impl SigningAlgorithm {
    /// The jsonwebtoken algorithm.
    pub fn jwt(self) -> jsonwebtoken::Algorithm {
        match self {
            SigningAlgorithm::Hs256 => jsonwebtoken::Algorithm::HS256,
            SigningAlgorithm::EdDsa => jsonwebtoken::Algorithm::EdDSA,
            SigningAlgorithm::Es256 => jsonwebtoken::Algorithm::ES256,
            SigningAlgorithm::Rs256 => jsonwebtoken::Algorithm::RS256,
        }
    }
}

/// A key that no longer signs but still verifies what it signed.
#[derive(Debug, Clone)]
pub struct RetiredKey {
    /// Where it was read from, for messages.
    pub path: PathBuf,
    /// Its PEM (public or private).
    pub pem: Vec<u8>,
    /// When it stopped signing (unix seconds): it verifies until `JWT_TTL + JWT_LEEWAY`
    /// after that.
    pub retired_at: i64,
}

/// Token settings.
#[derive(Debug, Clone)]
pub struct JwtConfig {
    /// `JWT_ALGORITHM`.
    pub algorithm: SigningAlgorithm,
    /// The signing key for EdDSA/ES256/RS256 (PEM), from `JWT_PRIVATE_KEY_FILE`.
    pub private_key: Option<Secret<Vec<u8>>>,
    /// `JWT_KEY_ID`; by default the key's RFC 7638 thumbprint.
    pub key_id: Option<String>,
    /// `JWT_RETIRED_KEYS`.
    pub retired_keys: Vec<RetiredKey>,
    /// HS256 key (empty with an asymmetric algorithm).
    pub secret: Secret<Vec<u8>>,
    /// `iss` written and required.
    pub issuer: String,
    /// `aud` written and required.
    pub audience: String,
    /// Absolute lifetime of a token.
    pub ttl: Duration,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
    /// True when no `JWT_SECRET` was set and the key was generated for this process
    /// (embedded mode only): tokens will not survive a restart.
    pub generated_secret: bool,
}

/// The key of the usernames' keyed hash (throttle keys, audit rows). At least
/// [`MIN_NAME_HASH_KEY_BYTES`] bytes: there is no way to make one that is shorter, so the
/// hash can never be a plain SHA-256 that a list of likely names reverses.
#[derive(Debug, Clone)]
pub struct NameHashKey {
    key: Secret<Vec<u8>>,
    source: NameHashKeySource,
}

/// Where the name-hash key came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameHashKeySource {
    /// `NAME_HASH_KEY`.
    Configured,
    /// `JWT_SECRET`, which keyed the hash before `NAME_HASH_KEY` existed: existing
    /// throttle counters and audit hashes stay as they were.
    JwtSecret,
    /// Random, made for this process (embedded mode only): hashes change on restart.
    Generated,
}

impl NameHashKey {
    /// `key`, if it is long enough; else `None`.
    pub fn new(key: Vec<u8>, source: NameHashKeySource) -> Option<Self> {
        (key.len() >= MIN_NAME_HASH_KEY_BYTES).then(|| Self {
            key: Secret::new(key),
            source,
        })
    }

    /// A random key for this process.
    pub fn generate() -> Self {
        Self {
            key: Secret::new(rand::random::<[u8; 32]>().to_vec()),
            source: NameHashKeySource::Generated,
        }
    }

    /// The key itself; call only where it is used.
    pub fn expose(&self) -> &[u8] {
        self.key.expose()
    }

    /// Where it came from.
    pub fn source(&self) -> NameHashKeySource {
        self.source
    }
}

/// Password hashing settings.
#[derive(Debug, Clone)]
pub struct BcryptConfig {
    /// bcrypt cost for new hashes; lower-cost hashes are upgraded on login.
    pub cost: u32,
    /// Threads that hash; defaults to the number of cores.
    pub workers: usize,
    /// Hash jobs that may wait for a thread before Login answers RESOURCE_EXHAUSTED.
    pub queue: usize,
    /// Jobs (running or waiting) one client address may hold at once, whatever the call,
    /// so no address can take the whole pool from the others.
    pub max_per_address: usize,
    /// How the hashing threads yield the CPU to the rest of authd.
    pub priority: HashPriority,
}

/// The CPU priority of the bcrypt threads (`BCRYPT_NICE`), Linux only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashPriority {
    /// `SCHED_IDLE`: run only when no other thread of the machine wants the core, and give
    /// it up at once when one wakes (a ValidateToken during a Login storm).
    Idle,
    /// Unix niceness 0–19 under the normal policy (0: the same as the rest of authd).
    Nice(i32),
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

/// TLS on the gRPC listener; read again on change and on SIGHUP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM CA certificates; when set, clients must present a certificate they signed.
    pub client_ca_file: Option<PathBuf>,
    /// How often the files are checked for changes; zero checks only on SIGHUP.
    pub reload_interval: Duration,
}

/// What one client, and all of them together, may cost the gRPC server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcLimits {
    /// Largest request or response message, in bytes.
    pub max_message_bytes: usize,
    /// Largest HTTP/2 header list (metadata) a request may carry, in bytes.
    pub max_header_list_bytes: u32,
    /// Calls in flight on the whole server; more are answered RESOURCE_EXHAUSTED.
    pub concurrency: usize,
    /// Calls in flight on one connection; more are answered RESOURCE_EXHAUSTED.
    pub connection_concurrency: usize,
    /// Longest a call may run; a shorter client `grpc-timeout` wins.
    pub request_timeout: Duration,
    /// HTTP/2 PING interval on idle connections; zero sends none.
    pub keepalive_interval: Duration,
    /// How long a keepalive PING may go unanswered before the connection is closed.
    pub keepalive_timeout: Duration,
}

/// Limits on connections themselves, before and beside the calls they carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// From accept to a complete start: the TLS handshake (if any) and the HTTP/2 client
    /// preface on the gRPC port, a whole request head on the HTTP port (and, there, each
    /// later head on a kept-alive connection). Slower connections are closed.
    pub preface_timeout: Duration,
    /// Open gRPC connections; more are closed as soon as accepted. `None`: derived from
    /// the process's file descriptor limit at start-up.
    pub max_connections: Option<usize>,
    /// Open HTTP (`/metrics`, `/healthz`) connections; more are closed as soon as
    /// accepted. `None`: derived likewise.
    pub http_max_connections: Option<usize>,
}

/// OpenTelemetry trace export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpConfig {
    /// OTLP/gRPC collector, like `http://otel-collector:4317`.
    pub endpoint: String,
    /// `service.name` of the exported spans.
    pub service_name: String,
}

/// An IP network: an address and how many leading bits of it must match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNetwork {
    addr: IpAddr,
    prefix: u8,
}

impl IpNetwork {
    /// Whether `ip` is inside this network (IPv4-mapped IPv6 counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_matches(&net.octets(), &ip.octets(), self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_matches(&net.octets(), &ip.octets(), self.prefix)
            }
            _ => false,
        }
    }
}

impl FromStr for IpNetwork {
    type Err = ();

    /// `203.0.113.7`, `10.0.0.0/8`, `2001:db8::/32`, `::1`.
    fn from_str(s: &str) -> Result<Self, ()> {
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, bits)) => (addr, Some(bits)),
            None => (s, None),
        };
        let addr = addr
            .trim()
            .parse::<IpAddr>()
            .map_err(|_| ())?
            .to_canonical();
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(bits) => bits.trim().parse::<u8>().map_err(|_| ())?,
        };
        if prefix > max {
            return Err(());
        }
        Ok(Self { addr, prefix })
    }
}

fn prefix_matches(net: &[u8], ip: &[u8], prefix: u8) -> bool {
    let mut bits = usize::from(prefix);
    for (n, i) in net.iter().zip(ip) {
        if bits == 0 {
            return true;
        }
        let take = bits.min(8);
        let mask = u8::MAX << (8 - take);
        if n & mask != i & mask {
            return false;
        }
        bits -= take;
    }
    true
}

/// The callers allowed to tell authd the end user's address (Login's `client_ip`):
/// gateways. Everyone else is judged by the address they connect from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNetwork>);

impl TrustedProxies {
    /// Whether a caller connecting from `peer` may set `client_ip`.
    pub fn trusts(&self, peer: IpAddr) -> bool {
        self.0.iter().any(|net| net.contains(peer))
    }

    /// True when no caller is trusted.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One throttle: how many failures within a window before callers must wait, and the
/// longest wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottleLimit {
    /// Failures after which every further attempt waits out a backoff.
    pub threshold: u32,
    /// The count is forgotten once this long passes without a failure (after any wait).
    pub window: Duration,
    /// The longest wait the backoff reaches.
    pub max_delay: Duration,
}

/// Login throttling: per canonical account and per client address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottleConfig {
    /// Failed logins (and wrong current passwords) of one account.
    pub account: ThrottleLimit,
    /// Failed logins from one client address (IPv6: its /64).
    pub address: ThrottleLimit,
    /// Register calls from one client address, successful or not: account creation
    /// and name probing are rationed per address.
    pub register: ThrottleLimit,
    /// The first wait past a threshold; each further failure doubles it, up to the cap.
    pub base_delay: Duration,
}

/// Which rules new passwords follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordPolicyMode {
    /// Upper, lower, digit and special character; at least `min_length` characters.
    Classic,
    /// NIST SP 800-63B: length and strength only, no composition rules.
    Nist,
}

/// The password policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PasswordPolicy {
    /// Which rules.
    pub mode: PasswordPolicyMode,
    /// Shortest password, in characters (Unicode code points).
    pub min_length: usize,
    /// Lowest zxcvbn score (0–4) accepted in `nist` mode.
    pub min_strength: u8,
}

/// The audit trail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditConfig {
    /// Rows older than this are deleted.
    pub retention: Duration,
    /// How often old rows are deleted.
    pub purge_interval: Duration,
    /// Events that may wait to be written; beyond, they reach only the log.
    pub queue: usize,
}

/// Who may follow WatchRevocations, and how many streams at once.
#[derive(Debug, Clone)]
pub struct WatchersConfig {
    /// Credentials a watcher presents as `authorization: Bearer <credential>`; none
    /// configured: nobody may watch.
    pub credentials: Vec<Secret<String>>,
    /// Streams open at once on this instance.
    pub max_streams: usize,
    /// Streams open at once on one connection.
    pub max_streams_per_connection: usize,
}

/// The shortest watcher credential accepted, in bytes.
pub const MIN_WATCH_CREDENTIAL_BYTES: usize = 32;

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
    /// Passwords.
    pub bcrypt: BcryptConfig,
    /// A session ends after this long without activity.
    pub session_idle_timeout: Duration,
    /// 0 = unlimited; otherwise Login ends the oldest sessions past this many
    /// (default [`DEFAULT_MAX_SESSIONS_PER_USER`]).
    pub max_sessions_per_user: u32,
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
}

/// The variables authd reads, exactly as named in the environment.
#[derive(Debug, Default, Deserialize)]
struct RawEnv {
    jwt_secret: Option<String>,
    name_hash_key: Option<String>,
    public_url: Option<String>,
    jwt_algorithm: Option<String>,
    jwt_private_key_file: Option<String>,
    jwt_key_id: Option<String>,
    jwt_retired_keys: Option<String>,
    jwt_issuer: Option<String>,
    jwt_audience: Option<String>,
    jwt_ttl: Option<String>,
    jwt_leeway: Option<String>,
    database_url: Option<String>,
    db_host: Option<String>,
    db_port: Option<String>,
    db_user: Option<String>,
    db_pass: Option<String>,
    db_name: Option<String>,
    db_pool_size: Option<String>,
    db_acquire_timeout: Option<String>,
    db_query_timeout: Option<String>,
    redis_url: Option<String>,
    redis_addr: Option<String>,
    redis_password: Option<String>,
    redis_key_prefix: Option<String>,
    redis_pool_size: Option<String>,
    redis_connect_timeout: Option<String>,
    redis_command_timeout: Option<String>,
    redis_retry_interval: Option<String>,
    redis_failure_mode: Option<String>,
    sqlite_path: Option<String>,
    grpc_addr: Option<String>,
    grpc_reflection: Option<String>,
    bcrypt_cost: Option<String>,
    bcrypt_workers: Option<String>,
    bcrypt_queue: Option<String>,
    bcrypt_max_per_address: Option<String>,
    bcrypt_nice: Option<String>,
    session_idle_timeout: Option<String>,
    max_sessions_per_user: Option<String>,
    log_format: Option<String>,
    shutdown_grace: Option<String>,
    http_addr: Option<String>,
    tls_cert_file: Option<String>,
    tls_key_file: Option<String>,
    tls_client_ca_file: Option<String>,
    tls_reload_interval: Option<String>,
    grpc_max_message_size: Option<String>,
    grpc_max_header_list_size: Option<String>,
    grpc_concurrency_limit: Option<String>,
    grpc_connection_concurrency_limit: Option<String>,
    grpc_request_timeout: Option<String>,
    grpc_keepalive_interval: Option<String>,
    grpc_keepalive_timeout: Option<String>,
    connection_preface_timeout: Option<String>,
    max_connections: Option<String>,
    http_max_connections: Option<String>,
    otel_exporter_otlp_endpoint: Option<String>,
    otel_service_name: Option<String>,
    revocation_log_max_len: Option<String>,
    watch_heartbeat: Option<String>,
    watch_credentials: Option<String>,
    watch_max_streams: Option<String>,
    watch_max_streams_per_connection: Option<String>,
    revocation_memory_max: Option<String>,
    ext_authz_strip_authorization: Option<String>,
    trusted_proxies: Option<String>,
    throttle_account_threshold: Option<String>,
    throttle_account_window: Option<String>,
    throttle_account_max_delay: Option<String>,
    throttle_address_threshold: Option<String>,
    throttle_address_window: Option<String>,
    throttle_address_max_delay: Option<String>,
    throttle_register_threshold: Option<String>,
    throttle_register_window: Option<String>,
    throttle_register_max_delay: Option<String>,
    throttle_base_delay: Option<String>,
    password_policy: Option<String>,
    password_min_length: Option<String>,
    password_min_strength: Option<String>,
    audit_retention: Option<String>,
    audit_purge_interval: Option<String>,
    audit_queue: Option<String>,
}

/// Every environment variable authd reads: the fields of `RawEnv` (kept in step by a
/// unit test) and `RUST_LOG`, read by the log filter. Deployment files are checked
/// against this list, so a misspelt setting there fails a test instead of being ignored.
pub const SETTINGS: &[&str] = &[
    "JWT_SECRET",
    "JWT_ISSUER",
    "JWT_AUDIENCE",
    "JWT_TTL",
    "JWT_LEEWAY",
    "DATABASE_URL",
    "DB_HOST",
    "DB_PORT",
    "DB_USER",
    "DB_PASS",
    "DB_NAME",
    "DB_POOL_SIZE",
    "DB_ACQUIRE_TIMEOUT",
    "DB_QUERY_TIMEOUT",
    "REDIS_URL",
    "REDIS_ADDR",
    "REDIS_PASSWORD",
    "REDIS_KEY_PREFIX",
    "REDIS_POOL_SIZE",
    "REDIS_CONNECT_TIMEOUT",
    "REDIS_COMMAND_TIMEOUT",
    "REDIS_RETRY_INTERVAL",
    "REDIS_FAILURE_MODE",
    "SQLITE_PATH",
    "GRPC_ADDR",
    "GRPC_REFLECTION",
    "BCRYPT_COST",
    "BCRYPT_WORKERS",
    "BCRYPT_QUEUE",
    "BCRYPT_MAX_PER_ADDRESS",
    "BCRYPT_NICE",
    "SESSION_IDLE_TIMEOUT",
    "MAX_SESSIONS_PER_USER",
    "LOG_FORMAT",
    "SHUTDOWN_GRACE",
    "HTTP_ADDR",
    "TLS_CERT_FILE",
    "TLS_KEY_FILE",
    "TLS_CLIENT_CA_FILE",
    "TLS_RELOAD_INTERVAL",
    "GRPC_MAX_MESSAGE_SIZE",
    "GRPC_MAX_HEADER_LIST_SIZE",
    "GRPC_CONCURRENCY_LIMIT",
    "GRPC_CONNECTION_CONCURRENCY_LIMIT",
    "GRPC_REQUEST_TIMEOUT",
    "GRPC_KEEPALIVE_INTERVAL",
    "GRPC_KEEPALIVE_TIMEOUT",
    "CONNECTION_PREFACE_TIMEOUT",
    "MAX_CONNECTIONS",
    "HTTP_MAX_CONNECTIONS",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_SERVICE_NAME",
    "JWT_ALGORITHM",
    "JWT_PRIVATE_KEY_FILE",
    "JWT_KEY_ID",
    "JWT_RETIRED_KEYS",
    "REVOCATION_LOG_MAX_LEN",
    "WATCH_HEARTBEAT",
    "WATCH_CREDENTIALS",
    "WATCH_MAX_STREAMS",
    "WATCH_MAX_STREAMS_PER_CONNECTION",
    "REVOCATION_MEMORY_MAX",
    "EXT_AUTHZ_STRIP_AUTHORIZATION",
    "RUST_LOG",
    "TRUSTED_PROXIES",
    "THROTTLE_ACCOUNT_THRESHOLD",
    "THROTTLE_ACCOUNT_WINDOW",
    "THROTTLE_ACCOUNT_MAX_DELAY",
    "THROTTLE_ADDRESS_THRESHOLD",
    "THROTTLE_ADDRESS_WINDOW",
    "THROTTLE_ADDRESS_MAX_DELAY",
    "THROTTLE_REGISTER_THRESHOLD",
    "THROTTLE_REGISTER_WINDOW",
    "THROTTLE_REGISTER_MAX_DELAY",
    "THROTTLE_BASE_DELAY",
    "PASSWORD_POLICY",
    "PASSWORD_MIN_LENGTH",
    "PASSWORD_MIN_STRENGTH",
    "AUDIT_RETENTION",
    "AUDIT_PURGE_INTERVAL",
    "AUDIT_QUEUE",
    "NAME_HASH_KEY",
    "PUBLIC_URL",
];

/// Sessions one user may hold when `MAX_SESSIONS_PER_USER` is not set. A person has a
/// few devices and browsers; past this, what piles up is forgotten logins (scripts that
/// never log out), and every Login and ListSessions walks the user's sessions, so the
/// oldest are ended instead.
pub const DEFAULT_MAX_SESSIONS_PER_USER: u32 = 100;

/// The HTTP listener's address when `HTTP_ADDR` is not set.
pub const DEFAULT_HTTP_ADDR: &str = "0.0.0.0:8080";

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
        let http_addr = if http_disabled {
            None
        } else {
            Some(parse(
                "HTTP_ADDR",
                raw.http_addr.as_deref().unwrap_or(DEFAULT_HTTP_ADDR),
                "an address like 0.0.0.0:8080 (or empty, to turn it off)",
            )?)
        };
        let tls = tls(&raw)?;
        let limits = limits(&raw)?;
        let connections = connections(&raw)?;
        let otlp = otlp(&raw)?;
        let users = users(&raw)?;
        let sessions = match redis(&raw)? {
            Some(redis) => SessionsBackend::Redis(redis),
            None => SessionsBackend::Memory,
        };
        let embedded = matches!(users, UsersBackend::Sqlite { .. })
            && matches!(sessions, SessionsBackend::Memory);
        let algorithm = match raw
            .jwt_algorithm
            .as_deref()
            .map(str::to_ascii_uppercase)
            .as_deref()
        {
            None | Some("HS256") => SigningAlgorithm::Hs256,
            Some("EDDSA") => SigningAlgorithm::EdDsa,
            Some("ES256") => SigningAlgorithm::Es256,
            Some("RS256") => SigningAlgorithm::Rs256,
            Some(other) => {
                return Err(ConfigError::new(
                    "JWT_ALGORITHM",
                    format!("must be HS256, EdDSA, ES256 or RS256, got {other:?}"),
                ));
            }
        };
        let private_key = match (&raw.jwt_private_key_file, algorithm) {
            (None, SigningAlgorithm::Hs256) => None,
            (Some(_), SigningAlgorithm::Hs256) => {
                return Err(ConfigError::new(
                    "JWT_PRIVATE_KEY_FILE",
                    "is for JWT_ALGORITHM=EdDSA, ES256 or RS256; HS256 signs with JWT_SECRET",
                ));
            }
            (None, _) => {
                return Err(ConfigError::new(
                    "JWT_PRIVATE_KEY_FILE",
                    "is required with an asymmetric JWT_ALGORITHM (a PEM private key)",
                ));
            }
            (Some(path), _) => Some(Secret::new(std::fs::read(path).map_err(|e| {
                ConfigError::new("JWT_PRIVATE_KEY_FILE", format!("cannot read {path:?}: {e}"))
            })?)),
        };
        let (secret, generated_secret) = match (raw.jwt_secret.clone(), algorithm) {
            (Some(secret), _) => (secret.into_bytes(), false),
            (None, SigningAlgorithm::Hs256) if embedded => {
                // Only a single embedded instance may run without a configured key.
                (rand::random::<[u8; 32]>().to_vec(), true)
            }
            (None, SigningAlgorithm::Hs256) => {
                return Err(ConfigError::new(
                    "JWT_SECRET",
                    format!(
                        "is required with MySQL or Redis configured (at least {MIN_JWT_SECRET_BYTES} bytes)"
                    ),
                ));
            }
            // Asymmetric: the secret is not used.
            (None, _) => (Vec::new(), false),
        };
        if algorithm == SigningAlgorithm::Hs256 && secret.len() < MIN_JWT_SECRET_BYTES {
            return Err(ConfigError::new(
                "JWT_SECRET",
                format!(
                    "must be at least {MIN_JWT_SECRET_BYTES} bytes, got {}",
                    secret.len()
                ),
            ));
        }
        let retired_keys = retired_keys(raw.jwt_retired_keys.as_deref())?;
        let jwt = JwtConfig {
            algorithm,
            private_key,
            key_id: raw.jwt_key_id.clone(),
            retired_keys,
            secret: Secret::new(secret),
            issuer: raw.jwt_issuer.clone().unwrap_or_else(|| "authd".to_owned()),
            audience: raw
                .jwt_audience
                .clone()
                .unwrap_or_else(|| "authd".to_owned()),
            ttl: duration(
                "JWT_TTL",
                raw.jwt_ttl.clone(),
                Duration::from_secs(24 * 3600),
            )?,
            leeway: duration(
                "JWT_LEEWAY",
                raw.jwt_leeway.clone(),
                Duration::from_secs(30),
            )?,
            generated_secret,
        };
        if jwt.ttl < Duration::from_secs(1) {
            return Err(ConfigError::new("JWT_TTL", "must be at least 1s"));
        }
        if jwt.leeway > Duration::from_secs(300) {
            return Err(ConfigError::new("JWT_LEEWAY", "must be at most 5m"));
        }
        // Every key is read and checked now, so a bad one stops start-up here.
        if let Err(e) = crate::auth::token::TokenKeys::new(&jwt) {
            // Errors about a retired key start with its path.
            let retired = jwt
                .retired_keys
                .iter()
                .any(|k| e.0.starts_with(&k.path.display().to_string()));
            let variable = if retired {
                "JWT_RETIRED_KEYS"
            } else {
                "JWT_PRIVATE_KEY_FILE"
            };
            return Err(ConfigError::new(variable, e.0));
        }

        let name_hash_key = name_hash_key(&raw, embedded)?;
        let public_url = match &raw.public_url {
            Some(url) => Some(base_url(url).ok_or_else(|| {
                ConfigError::new(
                    "PUBLIC_URL",
                    format!(
                        "must be an http(s) URL without query or fragment, like https://auth.example.com, got {url:?}"
                    ),
                )
            })?),
            // An issuer that is a URL is where verifiers find authd (OpenID discovery).
            None => base_url(&jwt.issuer),
        };
        let trusted_proxies = trusted_proxies(raw.trusted_proxies.clone())?;
        let watchers = watchers(&raw)?;
        let throttle = throttle(&raw)?;
        let password_policy = password_policy(&raw)?;
        let audit = audit(&raw)?;

        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let cost = number("BCRYPT_COST", raw.bcrypt_cost, 12u32)?;
        if !(4..=31).contains(&cost) {
            return Err(ConfigError::new(
                "BCRYPT_COST",
                format!("must be between 4 and 31, got {cost}"),
            ));
        }
        let workers = number("BCRYPT_WORKERS", raw.bcrypt_workers, cores)?;
        if workers == 0 {
            return Err(ConfigError::new("BCRYPT_WORKERS", "must be at least 1"));
        }
        let queue = number("BCRYPT_QUEUE", raw.bcrypt_queue, workers * 4)?;
        // A quarter of the pool by default: it takes four busy addresses to fill it, and
        // everyone else still finds a slot while one address floods.
        let max_per_address = number(
            "BCRYPT_MAX_PER_ADDRESS",
            raw.bcrypt_max_per_address,
            ((workers + queue) / 4).max(1),
        )?;
        if max_per_address == 0 {
            return Err(ConfigError::new(
                "BCRYPT_MAX_PER_ADDRESS",
                "must be at least 1",
            ));
        }
        let bcrypt = BcryptConfig {
            cost,
            workers,
            queue,
            max_per_address,
            priority: hash_priority(raw.bcrypt_nice)?,
        };

        let session_idle_timeout = duration(
            "SESSION_IDLE_TIMEOUT",
            raw.session_idle_timeout,
            Duration::from_secs(3600),
        )?;
        if session_idle_timeout < Duration::from_secs(1) {
            return Err(ConfigError::new(
                "SESSION_IDLE_TIMEOUT",
                "must be at least 1s",
            ));
        }

        Ok(Self {
            grpc_addr: parse(
                "GRPC_ADDR",
                raw.grpc_addr.as_deref().unwrap_or("0.0.0.0:50051"),
                "an address like 0.0.0.0:50051",
            )?,
            http_addr,
            tls,
            limits,
            connections,
            otlp,
            users,
            sessions,
            jwt,
            bcrypt,
            session_idle_timeout,
            max_sessions_per_user: number(
                "MAX_SESSIONS_PER_USER",
                raw.max_sessions_per_user,
                DEFAULT_MAX_SESSIONS_PER_USER,
            )?,
            grpc_reflection: boolean("GRPC_REFLECTION", raw.grpc_reflection, true)?,
            log_format: choice(
                "LOG_FORMAT",
                raw.log_format.as_deref(),
                &[("pretty", LogFormat::Pretty), ("json", LogFormat::Json)],
            )?,
            shutdown_grace: duration(
                "SHUTDOWN_GRACE",
                raw.shutdown_grace.clone(),
                Duration::from_secs(10),
            )?,
            revocation_log_max_len: match number(
                "REVOCATION_LOG_MAX_LEN",
                raw.revocation_log_max_len.clone(),
                100_000usize,
            )? {
                0 => {
                    return Err(ConfigError::new(
                        "REVOCATION_LOG_MAX_LEN",
                        "must be at least 1",
                    ));
                }
                n => n,
            },
            ext_authz_strip_authorization: boolean(
                "EXT_AUTHZ_STRIP_AUTHORIZATION",
                raw.ext_authz_strip_authorization.clone(),
                false,
            )?,
            watch_heartbeat: match duration(
                "WATCH_HEARTBEAT",
                raw.watch_heartbeat.clone(),
                Duration::from_secs(5),
            )? {
                d if d < Duration::from_millis(10) => {
                    return Err(ConfigError::new("WATCH_HEARTBEAT", "must be at least 10ms"));
                }
                d => d,
            },
            watchers,
            revocation_memory_max: match number(
                "REVOCATION_MEMORY_MAX",
                raw.revocation_memory_max.clone(),
                100_000usize,
            )? {
                0 => {
                    return Err(ConfigError::new(
                        "REVOCATION_MEMORY_MAX",
                        "must be at least 1",
                    ));
                }
                n => n,
            },
            trusted_proxies,
            throttle,
            password_policy,
            audit,
            name_hash_key,
            public_url,
        })
    }
}

/// `url` without its trailing `/`, if it is an absolute http(s) URL with a host and no
/// user info, query or fragment.
fn base_url(url: &str) -> Option<String> {
    let uri: http::Uri = url.parse().ok()?;
    let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
    let authority = uri.authority()?;
    let plain = uri.query().is_none() && !url.contains('#') && !authority.as_str().contains('@');
    (scheme_ok && plain && !authority.host().is_empty())
        .then(|| url.trim_end_matches('/').to_owned())
}

/// `NAME_HASH_KEY`; else `JWT_SECRET` (what keyed the hash before, so counters and audit
/// hashes carry over); else, in embedded mode, a random key for this process. With MySQL
/// or Redis (state several instances share, and hashes they must agree on) one of the two
/// is required: an asymmetric `JWT_ALGORITHM` needs no `JWT_SECRET`, and the hash must not
/// go unkeyed for that.
fn name_hash_key(raw: &RawEnv, embedded: bool) -> Result<NameHashKey, ConfigError> {
    if let Some(key) = &raw.name_hash_key {
        return NameHashKey::new(key.clone().into_bytes(), NameHashKeySource::Configured)
            .ok_or_else(|| {
                ConfigError::new(
                    "NAME_HASH_KEY",
                    format!(
                        "must be at least {MIN_NAME_HASH_KEY_BYTES} bytes, got {}",
                        key.len()
                    ),
                )
            });
    }
    let from_jwt_secret = raw
        .jwt_secret
        .clone()
        .and_then(|secret| NameHashKey::new(secret.into_bytes(), NameHashKeySource::JwtSecret));
    match from_jwt_secret {
        Some(key) => Ok(key),
        None if embedded => Ok(NameHashKey::generate()),
        None => Err(ConfigError::new(
            "NAME_HASH_KEY",
            format!(
                "is required with MySQL or Redis configured and no JWT_SECRET of at least {MIN_JWT_SECRET_BYTES} bytes (at least {MIN_NAME_HASH_KEY_BYTES} bytes, the same on every instance)"
            ),
        )),
    }
}

fn tls(raw: &RawEnv) -> Result<Option<TlsConfig>, ConfigError> {
    let reload_interval = duration(
        "TLS_RELOAD_INTERVAL",
        raw.tls_reload_interval.clone(),
        Duration::from_secs(30),
    )?;
    match (&raw.tls_cert_file, &raw.tls_key_file) {
        (Some(cert), Some(key)) => Ok(Some(TlsConfig {
            cert_file: PathBuf::from(cert),
            key_file: PathBuf::from(key),
            client_ca_file: raw.tls_client_ca_file.as_ref().map(PathBuf::from),
            reload_interval,
        })),
        (Some(_), None) => Err(ConfigError::new(
            "TLS_KEY_FILE",
            "is required when TLS_CERT_FILE is set",
        )),
        (None, Some(_)) => Err(ConfigError::new(
            "TLS_CERT_FILE",
            "is required when TLS_KEY_FILE is set",
        )),
        (None, None) if raw.tls_client_ca_file.is_some() => Err(ConfigError::new(
            "TLS_CLIENT_CA_FILE",
            "needs TLS_CERT_FILE and TLS_KEY_FILE: client certificates are checked only over TLS",
        )),
        (None, None) => Ok(None),
    }
}

fn limits(raw: &RawEnv) -> Result<GrpcLimits, ConfigError> {
    let at_least_one = |name: &'static str, n: usize| {
        if n == 0 {
            Err(ConfigError::new(name, "must be at least 1"))
        } else {
            Ok(n)
        }
    };
    let max_message_bytes = at_least_one(
        "GRPC_MAX_MESSAGE_SIZE",
        bytes(
            "GRPC_MAX_MESSAGE_SIZE",
            raw.grpc_max_message_size.clone(),
            64 * 1024,
        )?,
    )?;
    let max_header_list_bytes = at_least_one(
        "GRPC_MAX_HEADER_LIST_SIZE",
        bytes(
            "GRPC_MAX_HEADER_LIST_SIZE",
            raw.grpc_max_header_list_size.clone(),
            16 * 1024,
        )?,
    )?;
    let request_timeout = positive_duration(
        "GRPC_REQUEST_TIMEOUT",
        raw.grpc_request_timeout.clone(),
        Duration::from_secs(10),
    )?;
    Ok(GrpcLimits {
        max_message_bytes,
        max_header_list_bytes: u32::try_from(max_header_list_bytes)
            .map_err(|_| ConfigError::new("GRPC_MAX_HEADER_LIST_SIZE", "must be less than 4GiB"))?,
        concurrency: at_least_one(
            "GRPC_CONCURRENCY_LIMIT",
            number(
                "GRPC_CONCURRENCY_LIMIT",
                raw.grpc_concurrency_limit.clone(),
                1024,
            )?,
        )?,
        connection_concurrency: at_least_one(
            "GRPC_CONNECTION_CONCURRENCY_LIMIT",
            number(
                "GRPC_CONNECTION_CONCURRENCY_LIMIT",
                raw.grpc_connection_concurrency_limit.clone(),
                128,
            )?,
        )?,
        request_timeout,
        keepalive_interval: duration(
            "GRPC_KEEPALIVE_INTERVAL",
            raw.grpc_keepalive_interval.clone(),
            Duration::from_secs(30),
        )?,
        keepalive_timeout: duration(
            "GRPC_KEEPALIVE_TIMEOUT",
            raw.grpc_keepalive_timeout.clone(),
            Duration::from_secs(10),
        )?,
    })
}

fn connections(raw: &RawEnv) -> Result<ConnectionLimits, ConfigError> {
    let preface_timeout = positive_duration(
        "CONNECTION_PREFACE_TIMEOUT",
        raw.connection_preface_timeout.clone(),
        Duration::from_secs(5),
    )?;
    let cap = |variable: &'static str, value: &Option<String>| match value {
        None => Ok(None),
        Some(v) => match number(variable, Some(v.clone()), 0usize)? {
            0 => Err(ConfigError::new(variable, "must be at least 1")),
            n => Ok(Some(n)),
        },
    };
    Ok(ConnectionLimits {
        preface_timeout,
        max_connections: cap("MAX_CONNECTIONS", &raw.max_connections)?,
        http_max_connections: cap("HTTP_MAX_CONNECTIONS", &raw.http_max_connections)?,
    })
}

fn otlp(raw: &RawEnv) -> Result<Option<OtlpConfig>, ConfigError> {
    let service_name = raw
        .otel_service_name
        .clone()
        .unwrap_or_else(|| "authd".to_owned());
    let Some(endpoint) = raw.otel_exporter_otlp_endpoint.clone() else {
        return Ok(None);
    };
    if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
        return Err(ConfigError::new(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "must start with http:// or https:// (OTLP over gRPC, like http://otel-collector:4317)",
        ));
    }
    Ok(Some(OtlpConfig {
        endpoint,
        service_name,
    }))
}

/// `path@RFC3339-time,…`: keys that stopped signing at that time.
fn retired_keys(value: Option<&str>) -> Result<Vec<RetiredKey>, ConfigError> {
    let Some(value) = value else {
        return Ok(Vec::new());
    };
    value
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| {
            let (path, at) = item.rsplit_once('@').ok_or_else(|| {
                ConfigError::new(
                    "JWT_RETIRED_KEYS",
                    format!("{item:?} is not path@time (like old.pem@2026-11-28T08:00:00Z)"),
                )
            })?;
            let retired_at = humantime::parse_rfc3339_weak(at).map_err(|_| {
                ConfigError::new(
                    "JWT_RETIRED_KEYS",
                    format!("{at:?} is not a time like 2026-11-28T08:00:00Z"),
                )
            })?;
            let pem = std::fs::read(path).map_err(|e| {
                ConfigError::new("JWT_RETIRED_KEYS", format!("cannot read {path:?}: {e}"))
            })?;
            Ok(RetiredKey {
                path: PathBuf::from(path),
                pem,
                retired_at: crate::clock::unix_seconds(retired_at),
            })
        })
        .collect()
}

fn watchers(raw: &RawEnv) -> Result<WatchersConfig, ConfigError> {
    let credentials = raw
        .watch_credentials
        .as_deref()
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| {
            if c.len() < MIN_WATCH_CREDENTIAL_BYTES {
                Err(ConfigError::new(
                    "WATCH_CREDENTIALS",
                    format!(
                        "each credential must be at least {MIN_WATCH_CREDENTIAL_BYTES} bytes, one is {}",
                        c.len()
                    ),
                ))
            } else {
                Ok(Secret::new(c.to_owned()))
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    let at_least_one = |name: &'static str, n: usize| {
        if n == 0 {
            Err(ConfigError::new(name, "must be at least 1"))
        } else {
            Ok(n)
        }
    };
    Ok(WatchersConfig {
        credentials,
        max_streams: at_least_one(
            "WATCH_MAX_STREAMS",
            number(
                "WATCH_MAX_STREAMS",
                raw.watch_max_streams.clone(),
                1024usize,
            )?,
        )?,
        max_streams_per_connection: at_least_one(
            "WATCH_MAX_STREAMS_PER_CONNECTION",
            number(
                "WATCH_MAX_STREAMS_PER_CONNECTION",
                raw.watch_max_streams_per_connection.clone(),
                4usize,
            )?,
        )?,
    })
}

fn trusted_proxies(value: Option<String>) -> Result<TrustedProxies, ConfigError> {
    let Some(value) = value else {
        return Ok(TrustedProxies::default());
    };
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<IpNetwork>().map_err(|()| {
                ConfigError::new(
                    "TRUSTED_PROXIES",
                    format!(
                        "{s:?} is not an address or network like 10.0.0.5, 10.0.0.0/8 or fd00::/8"
                    ),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(TrustedProxies)
}

fn throttle(raw: &RawEnv) -> Result<ThrottleConfig, ConfigError> {
    let base_delay = duration(
        "THROTTLE_BASE_DELAY",
        raw.throttle_base_delay.clone(),
        Duration::from_secs(1),
    )?;
    if base_delay < Duration::from_millis(1) {
        return Err(ConfigError::new(
            "THROTTLE_BASE_DELAY",
            "must be at least 1ms",
        ));
    }
    let limit = |names: [&'static str; 3],
                 values: [Option<String>; 3],
                 defaults: (u32, Duration, Duration)|
     -> Result<ThrottleLimit, ConfigError> {
        let [threshold, window, max_delay] = values;
        let limit = ThrottleLimit {
            threshold: number(names[0], threshold, defaults.0)?,
            window: duration(names[1], window, defaults.1)?,
            max_delay: duration(names[2], max_delay, defaults.2)?,
        };
        if limit.threshold == 0 {
            return Err(ConfigError::new(names[0], "must be at least 1"));
        }
        if limit.window < Duration::from_secs(1) {
            return Err(ConfigError::new(names[1], "must be at least 1s"));
        }
        if limit.max_delay < base_delay {
            return Err(ConfigError::new(
                names[2],
                format!("must be at least THROTTLE_BASE_DELAY ({base_delay:?})"),
            ));
        }
        Ok(limit)
    };
    Ok(ThrottleConfig {
        account: limit(
            [
                "THROTTLE_ACCOUNT_THRESHOLD",
                "THROTTLE_ACCOUNT_WINDOW",
                "THROTTLE_ACCOUNT_MAX_DELAY",
            ],
            [
                raw.throttle_account_threshold.clone(),
                raw.throttle_account_window.clone(),
                raw.throttle_account_max_delay.clone(),
            ],
            (
                10,
                Duration::from_secs(15 * 60),
                Duration::from_secs(5 * 60),
            ),
        )?,
        address: limit(
            [
                "THROTTLE_ADDRESS_THRESHOLD",
                "THROTTLE_ADDRESS_WINDOW",
                "THROTTLE_ADDRESS_MAX_DELAY",
            ],
            [
                raw.throttle_address_threshold.clone(),
                raw.throttle_address_window.clone(),
                raw.throttle_address_max_delay.clone(),
            ],
            (5, Duration::from_secs(15 * 60), Duration::from_secs(3600)),
        )?,
        register: limit(
            [
                "THROTTLE_REGISTER_THRESHOLD",
                "THROTTLE_REGISTER_WINDOW",
                "THROTTLE_REGISTER_MAX_DELAY",
            ],
            [
                raw.throttle_register_threshold.clone(),
                raw.throttle_register_window.clone(),
                raw.throttle_register_max_delay.clone(),
            ],
            (20, Duration::from_secs(3600), Duration::from_secs(3600)),
        )?,
        base_delay,
    })
}

fn password_policy(raw: &RawEnv) -> Result<PasswordPolicy, ConfigError> {
    let mode = choice(
        "PASSWORD_POLICY",
        raw.password_policy.as_deref(),
        &[
            ("classic", PasswordPolicyMode::Classic),
            ("nist", PasswordPolicyMode::Nist),
        ],
    )?;
    let default_length = match mode {
        PasswordPolicyMode::Classic => 8,
        PasswordPolicyMode::Nist => 15,
    };
    let min_length = number(
        "PASSWORD_MIN_LENGTH",
        raw.password_min_length.clone(),
        default_length,
    )?;
    if !(8..=64).contains(&min_length) {
        return Err(ConfigError::new(
            "PASSWORD_MIN_LENGTH",
            format!("must be between 8 and 64, got {min_length}"),
        ));
    }
    let min_strength = number(
        "PASSWORD_MIN_STRENGTH",
        raw.password_min_strength.clone(),
        3u8,
    )?;
    if min_strength > 4 {
        return Err(ConfigError::new(
            "PASSWORD_MIN_STRENGTH",
            format!("must be a zxcvbn score from 0 to 4, got {min_strength}"),
        ));
    }
    Ok(PasswordPolicy {
        mode,
        min_length,
        min_strength,
    })
}

fn audit(raw: &RawEnv) -> Result<AuditConfig, ConfigError> {
    let retention = duration(
        "AUDIT_RETENTION",
        raw.audit_retention.clone(),
        Duration::from_secs(90 * 24 * 3600),
    )?;
    if retention < Duration::from_secs(60) {
        return Err(ConfigError::new("AUDIT_RETENTION", "must be at least 1m"));
    }
    let purge_interval = duration(
        "AUDIT_PURGE_INTERVAL",
        raw.audit_purge_interval.clone(),
        Duration::from_secs(3600),
    )?;
    if purge_interval < Duration::from_millis(10) {
        return Err(ConfigError::new(
            "AUDIT_PURGE_INTERVAL",
            "must be at least 10ms",
        ));
    }
    let queue = number("AUDIT_QUEUE", raw.audit_queue.clone(), 10_000usize)?;
    if queue == 0 {
        return Err(ConfigError::new("AUDIT_QUEUE", "must be at least 1"));
    }
    Ok(AuditConfig {
        retention,
        purge_interval,
        queue,
    })
}

/// The SQLite file used when no database is configured.
pub const DEFAULT_SQLITE_PATH: &str = "authd.db";

fn users(raw: &RawEnv) -> Result<UsersBackend, ConfigError> {
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
        _ => mysql(raw).map(|db| UsersBackend::MySql(Box::new(db))),
    }
}

fn mysql(raw: &RawEnv) -> Result<DatabaseConfig, ConfigError> {
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
    let pool_size = number("DB_POOL_SIZE", raw.db_pool_size.clone(), 10u32)?;
    if pool_size == 0 {
        return Err(ConfigError::new("DB_POOL_SIZE", "must be at least 1"));
    }
    Ok(DatabaseConfig {
        options: Secret::new(options),
        display,
        pool_size,
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

fn redis(raw: &RawEnv) -> Result<Option<RedisConfig>, ConfigError> {
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
    let Some(url) = url else {
        return Ok(None);
    };
    Ok(Some(RedisConfig {
        url: Secret::new(url),
        key_prefix,
        pool_size,
        connect_timeout: positive_duration(
            "REDIS_CONNECT_TIMEOUT",
            raw.redis_connect_timeout.clone(),
            Duration::from_millis(250),
        )?,
        command_timeout: positive_duration(
            "REDIS_COMMAND_TIMEOUT",
            raw.redis_command_timeout.clone(),
            Duration::from_millis(250),
        )?,
        retry_interval: duration(
            "REDIS_RETRY_INTERVAL",
            raw.redis_retry_interval.clone(),
            Duration::from_millis(500),
        )?,
        failure_mode,
    }))
}

/// One of `choices` (case-insensitive); the first when unset.
fn choice<T: Copy>(
    variable: &'static str,
    value: Option<&str>,
    choices: &[(&str, T)],
) -> Result<T, ConfigError> {
    let Some(value) = value else {
        return choices
            .first()
            .map(|(_, v)| *v)
            .ok_or_else(|| ConfigError::new(variable, "has no possible value"));
    };
    let lower = value.trim().to_ascii_lowercase();
    choices
        .iter()
        .find(|(name, _)| *name == lower)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
            ConfigError::new(
                variable,
                format!("must be {}, got {lower:?}", names.join(" or ")),
            )
        })
}

fn duration(
    variable: &'static str,
    value: Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) => humantime::parse_duration(v.trim()).map_err(|_| {
            ConfigError::new(
                variable,
                format!("{v:?} is not a duration (write it like 24h, 90m, 30s or 250ms)"),
            )
        }),
    }
}

/// A duration that must be more than zero.
fn positive_duration(
    variable: &'static str,
    value: Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let d = duration(variable, value, default)?;
    if d.is_zero() {
        return Err(ConfigError::new(variable, "must be more than 0s"));
    }
    Ok(d)
}

/// A size in bytes: a plain number, or one with a `KiB` or `MiB` suffix.
fn bytes(
    variable: &'static str,
    value: Option<String>,
    default: usize,
) -> Result<usize, ConfigError> {
    let Some(v) = value else {
        return Ok(default);
    };
    let text = v.trim().to_ascii_lowercase();
    let (digits, unit) = if let Some(n) = text.strip_suffix("kib") {
        (n, 1024)
    } else if let Some(n) = text.strip_suffix("mib") {
        (n, 1024 * 1024)
    } else {
        (text.strip_suffix('b').unwrap_or(&text), 1)
    };
    digits
        .trim()
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .ok_or_else(|| {
            ConfigError::new(
                variable,
                format!("{v:?} is not a size (write it like 65536, 64KiB or 1MiB)"),
            )
        })
}

fn number<T: FromStr>(
    variable: &'static str,
    value: Option<String>,
    default: T,
) -> Result<T, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) => v
            .trim()
            .parse()
            .map_err(|_| ConfigError::new(variable, format!("{v:?} is not a valid number"))),
    }
}

/// `BCRYPT_NICE`: `idle` (the default) or a niceness 0–19.
fn hash_priority(value: Option<String>) -> Result<HashPriority, ConfigError> {
    match value.as_deref().map(str::trim) {
        None => Ok(HashPriority::Idle),
        Some(v) if v.eq_ignore_ascii_case("idle") => Ok(HashPriority::Idle),
        Some(v) => v
            .parse::<i32>()
            .ok()
            .filter(|n| (0..=19).contains(n))
            .map(HashPriority::Nice)
            .ok_or_else(|| {
                ConfigError::new(
                    "BCRYPT_NICE",
                    format!("must be idle or between 0 and 19, got {v:?}"),
                )
            }),
    }
}

fn boolean(
    variable: &'static str,
    value: Option<String>,
    default: bool,
) -> Result<bool, ConfigError> {
    match value.as_deref().map(str::to_ascii_lowercase).as_deref() {
        None => Ok(default),
        Some("true" | "1" | "yes" | "on") => Ok(true),
        Some("false" | "0" | "no" | "off") => Ok(false),
        Some(other) => Err(ConfigError::new(
            variable,
            format!("must be true or false, got {other:?}"),
        )),
    }
}

fn parse<T: FromStr>(
    variable: &'static str,
    value: &str,
    expected: &str,
) -> Result<T, ConfigError> {
    value
        .trim()
        .parse()
        .map_err(|_| ConfigError::new(variable, format!("{value:?} is not {expected}")))
}

/// Percent-encodes everything but unreserved characters, for a password inside a URL.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    const SECRET: (&str, &str) = ("JWT_SECRET", "0123456789abcdef0123456789abcdef");

    #[test]
    fn defaults_apply_when_only_the_secret_is_set() {
        let c = Config::from_vars(vars(&[SECRET])).unwrap();
        assert_eq!(c.jwt.ttl, Duration::from_secs(86_400));
        assert_eq!(c.jwt.leeway, Duration::from_secs(30));
        assert_eq!(c.session_idle_timeout, Duration::from_secs(3600));
        assert_eq!(c.bcrypt.cost, 12);
        assert_eq!(c.bcrypt.priority, HashPriority::Idle);
        assert_eq!(c.grpc_addr.port(), 50051);
        assert!(c.grpc_reflection);
        assert!(!c.jwt.generated_secret);
    }

    #[test]
    fn nothing_configured_means_embedded_storage_and_a_generated_key() {
        let c = Config::from_vars(vars(&[])).unwrap();
        assert!(matches!(&c.users, UsersBackend::Sqlite { path } if path == Path::new("authd.db")));
        assert!(matches!(c.sessions, SessionsBackend::Memory));
        assert!(c.jwt.generated_secret);
        assert_eq!(c.jwt.secret.expose().len(), 32);
        let again = Config::from_vars(vars(&[])).unwrap();
        assert_ne!(c.jwt.secret.expose(), again.jwt.secret.expose());
    }

    #[test]
    fn sqlite_path_and_url_choose_the_file() {
        let c = Config::from_vars(vars(&[("SQLITE_PATH", "data/users.db")])).unwrap();
        assert!(
            matches!(&c.users, UsersBackend::Sqlite { path } if path == Path::new("data/users.db"))
        );
        let c = Config::from_vars(vars(&[(
            "DATABASE_URL",
            "sqlite:///var/lib/authd/u.db?mode=rwc",
        )]))
        .unwrap();
        assert!(
            matches!(&c.users, UsersBackend::Sqlite { path } if path == Path::new("/var/lib/authd/u.db"))
        );
        let e = Config::from_vars(vars(&[("DATABASE_URL", "sqlite://")])).unwrap_err();
        assert_eq!(e.variable, "DATABASE_URL");
    }

    #[test]
    fn mysql_or_redis_configured_require_the_secret() {
        for set in [
            ("DB_HOST", "db"),
            ("DATABASE_URL", "mysql://db/authd"),
            ("REDIS_ADDR", "r:6379"),
        ] {
            let e = Config::from_vars(vars(&[set])).unwrap_err();
            assert_eq!(e.variable, "JWT_SECRET", "{set:?}");
        }
    }

    #[test]
    fn mixed_backends_are_allowed() {
        let c = Config::from_vars(vars(&[SECRET, ("DB_HOST", "db")])).unwrap();
        assert!(matches!(c.users, UsersBackend::MySql(_)));
        assert!(matches!(c.sessions, SessionsBackend::Memory));
        let c = Config::from_vars(vars(&[SECRET, ("REDIS_ADDR", "r:6379")])).unwrap();
        assert!(matches!(c.users, UsersBackend::Sqlite { .. }));
        assert!(matches!(c.sessions, SessionsBackend::Redis(_)));
    }

    #[test]
    fn a_short_secret_names_the_variable() {
        let e = Config::from_vars(vars(&[("JWT_SECRET", "short")])).unwrap_err();
        assert_eq!(e.variable, "JWT_SECRET");
        assert!(e.problem.contains("at least 32 bytes"), "{e}");
    }

    #[test]
    fn an_unparsable_duration_names_the_variable() {
        let e = Config::from_vars(vars(&[SECRET, ("JWT_TTL", "a day")])).unwrap_err();
        assert_eq!(e.variable, "JWT_TTL");
        let e = Config::from_vars(vars(&[SECRET, ("SESSION_IDLE_TIMEOUT", "5")])).unwrap_err();
        assert_eq!(e.variable, "SESSION_IDLE_TIMEOUT");
    }

    #[test]
    fn durations_use_humantime() {
        let c =
            Config::from_vars(vars(&[SECRET, ("JWT_TTL", "90m"), ("JWT_LEEWAY", "5s")])).unwrap();
        assert_eq!(c.jwt.ttl, Duration::from_secs(5400));
        assert_eq!(c.jwt.leeway, Duration::from_secs(5));
    }

    #[test]
    fn old_redis_names_keep_working_and_passwords_are_encoded() {
        let c = Config::from_vars(vars(&[
            SECRET,
            ("REDIS_ADDR", "cache:6380"),
            ("REDIS_PASSWORD", "p@ss/word"),
        ]))
        .unwrap();
        let SessionsBackend::Redis(redis) = c.sessions else {
            panic!("not redis")
        };
        assert_eq!(redis.url.expose(), "redis://:p%40ss%2Fword@cache:6380/");
        assert_eq!(redis.failure_mode, RedisFailureMode::Open);
    }

    #[test]
    fn old_db_names_keep_working() {
        let c = Config::from_vars(vars(&[
            SECRET,
            ("DB_HOST", "db.internal"),
            ("DB_PORT", "3307"),
            ("DB_USER", "authd"),
            ("DB_PASS", "pw"),
            ("DB_NAME", "users"),
        ]))
        .unwrap();
        let UsersBackend::MySql(db) = c.users else {
            panic!("not mysql")
        };
        assert_eq!(db.display, "db.internal:3307");
        let o = db.options.expose();
        assert_eq!(o.get_host(), "db.internal");
        assert_eq!(o.get_port(), 3307);
        assert_eq!(o.get_username(), "authd");
        assert_eq!(o.get_database(), Some("users"));
        assert_eq!(db.query_timeout, Duration::from_secs(2));
        for bad in ["0s", "soon"] {
            let e = Config::from_vars(vars(&[
                SECRET,
                ("DB_HOST", "db"),
                ("DB_QUERY_TIMEOUT", bad),
            ]))
            .unwrap_err();
            assert_eq!(e.variable, "DB_QUERY_TIMEOUT");
        }
    }

    #[test]
    fn whole_urls_win_over_parts() {
        let c = Config::from_vars(vars(&[
            SECRET,
            ("DATABASE_URL", "mysql://u:p@dbhost:3310/x"),
            ("DB_HOST", "ignored"),
            ("REDIS_URL", "redis://r:6390/2"),
            ("REDIS_ADDR", "ignored:1"),
        ]))
        .unwrap();
        assert_eq!(c.users.describe(), "MySQL at dbhost:3310");
        let SessionsBackend::Redis(redis) = c.sessions else {
            panic!("not redis")
        };
        assert_eq!(redis.url.expose(), "redis://r:6390/2");
    }

    #[test]
    fn bcrypt_nice_is_idle_or_a_niceness() {
        for (value, expected) in [
            ("idle", HashPriority::Idle),
            (" IDLE ", HashPriority::Idle),
            ("0", HashPriority::Nice(0)),
            ("19", HashPriority::Nice(19)),
        ] {
            let c = Config::from_vars(vars(&[SECRET, ("BCRYPT_NICE", value)])).unwrap();
            assert_eq!(c.bcrypt.priority, expected, "{value}");
        }
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (name, value) in [
            ("BCRYPT_COST", "3"),
            ("BCRYPT_COST", "twelve"),
            ("BCRYPT_NICE", "20"),
            ("BCRYPT_NICE", "-5"),
            ("BCRYPT_NICE", "lowest"),
            ("REDIS_FAILURE_MODE", "sometimes"),
            ("REDIS_PASSWORD", "no-addr"),
            ("GRPC_ADDR", "nowhere"),
            ("GRPC_REFLECTION", "maybe"),
            ("LOG_FORMAT", "xml"),
            ("DATABASE_URL", "postgres://x"),
            ("REDIS_URL", "http://x"),
            ("REDIS_KEY_PREFIX", "a{b}"),
            ("MAX_SESSIONS_PER_USER", "-1"),
            ("TRUSTED_PROXIES", "10.0.0.0/33"),
            ("TRUSTED_PROXIES", "gateway.internal"),
            ("THROTTLE_ACCOUNT_THRESHOLD", "0"),
            ("THROTTLE_ADDRESS_WINDOW", "soon"),
            ("THROTTLE_ADDRESS_MAX_DELAY", "1ms"),
            ("THROTTLE_BASE_DELAY", "0s"),
            ("THROTTLE_REGISTER_THRESHOLD", "0"),
            ("THROTTLE_REGISTER_WINDOW", "hourly"),
            ("BCRYPT_MAX_PER_ADDRESS", "0"),
            ("PASSWORD_POLICY", "strict"),
            ("PASSWORD_MIN_LENGTH", "7"),
            ("PASSWORD_MIN_STRENGTH", "5"),
            ("AUDIT_RETENTION", "10s"),
            ("AUDIT_PURGE_INTERVAL", "1ms"),
            ("AUDIT_QUEUE", "0"),
            ("HTTP_ADDR", "port 8080"),
            ("TLS_RELOAD_INTERVAL", "often"),
            ("GRPC_MAX_MESSAGE_SIZE", "64 kilobytes"),
            ("GRPC_MAX_MESSAGE_SIZE", "0"),
            ("GRPC_MAX_HEADER_LIST_SIZE", "8GiB-ish"),
            ("GRPC_CONCURRENCY_LIMIT", "0"),
            ("GRPC_CONNECTION_CONCURRENCY_LIMIT", "many"),
            ("GRPC_REQUEST_TIMEOUT", "0s"),
            ("GRPC_KEEPALIVE_INTERVAL", "30"),
            ("GRPC_KEEPALIVE_TIMEOUT", "soon"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317"),
        ] {
            let e = Config::from_vars(vars(&[SECRET, (name, value)])).unwrap_err();
            assert_eq!(e.variable, name, "{name}={value}: {e}");
        }
    }

    fn key(name: &str) -> String {
        format!("{}/tests/keys/{name}", env!("CARGO_MANIFEST_DIR"))
    }

    #[test]
    fn asymmetric_keys_are_read_and_checked_at_start_up() {
        let c = Config::from_vars(vars(&[
            ("JWT_ALGORITHM", "es256"),
            ("JWT_PRIVATE_KEY_FILE", &key("p256.pem")),
        ]))
        .unwrap();
        assert_eq!(c.jwt.algorithm, SigningAlgorithm::Es256);
        assert!(
            !c.jwt.generated_secret,
            "no secret is made for an asymmetric key"
        );

        let e = Config::from_vars(vars(&[("JWT_ALGORITHM", "ES256")])).unwrap_err();
        assert_eq!(e.variable, "JWT_PRIVATE_KEY_FILE");
        let e = Config::from_vars(vars(&[
            ("JWT_ALGORITHM", "ES256"),
            ("JWT_PRIVATE_KEY_FILE", &key("rsa.pem")),
        ]))
        .unwrap_err();
        assert_eq!(e.variable, "JWT_PRIVATE_KEY_FILE");
        let e = Config::from_vars(vars(&[
            ("JWT_ALGORITHM", "EdDSA"),
            ("JWT_PRIVATE_KEY_FILE", "/nonexistent/key.pem"),
        ]))
        .unwrap_err();
        assert_eq!(e.variable, "JWT_PRIVATE_KEY_FILE");
        let e = Config::from_vars(vars(&[("JWT_ALGORITHM", "HS512")])).unwrap_err();
        assert_eq!(e.variable, "JWT_ALGORITHM");
    }

    #[test]
    fn the_name_hash_key_is_never_empty() {
        assert!(NameHashKey::new(Vec::new(), NameHashKeySource::Configured).is_none());
        assert!(NameHashKey::new(vec![7; 31], NameHashKeySource::JwtSecret).is_none());
        assert_eq!(NameHashKey::generate().expose().len(), 32);
        let asymmetric = [
            ("JWT_ALGORITHM", "EdDSA"),
            ("JWT_PRIVATE_KEY_FILE", key("ed25519.pem").leak() as &str),
        ];
        let with = |extra: &[(&str, &str)]| {
            Config::from_vars(vars(&[asymmetric.as_slice(), extra].concat()))
        };
        // Embedded: a random key of this process's own, never an empty one.
        let c = with(&[]).unwrap();
        assert_eq!(c.name_hash_key.source(), NameHashKeySource::Generated);
        assert_eq!(c.name_hash_key.expose().len(), 32);
        assert_ne!(
            c.name_hash_key.expose(),
            with(&[]).unwrap().name_hash_key.expose()
        );
        // Shared state: refused, naming the variable…
        for shared in [("DB_HOST", "db"), ("REDIS_ADDR", "r:6379")] {
            let e = with(&[shared]).unwrap_err();
            assert_eq!(e.variable, "NAME_HASH_KEY", "{shared:?}");
            // …also when a JWT_SECRET too short to key anything is set.
            let e = with(&[shared, ("JWT_SECRET", "short")]).unwrap_err();
            assert_eq!(e.variable, "NAME_HASH_KEY", "{shared:?}");
            let c = with(&[shared, ("NAME_HASH_KEY", SECRET.1)]).unwrap();
            assert_eq!(c.name_hash_key.source(), NameHashKeySource::Configured);
        }
        let e = with(&[("NAME_HASH_KEY", "short")]).unwrap_err();
        assert_eq!(e.variable, "NAME_HASH_KEY");
        assert!(!e.problem.contains("short"), "the key was printed: {e}");
        // JWT_SECRET keys it when NAME_HASH_KEY is absent, as before it existed.
        let c = Config::from_vars(vars(&[SECRET, ("DB_HOST", "db")])).unwrap();
        assert_eq!(c.name_hash_key.source(), NameHashKeySource::JwtSecret);
        assert_eq!(c.name_hash_key.expose(), SECRET.1.as_bytes());
        let c = Config::from_vars(vars(&[
            SECRET,
            ("DB_HOST", "db"),
            ("NAME_HASH_KEY", "another-key-0123456789abcdef-0123"),
        ]))
        .unwrap();
        assert_eq!(
            c.name_hash_key.expose(),
            b"another-key-0123456789abcdef-0123"
        );
    }

    #[test]
    fn the_public_url_is_set_or_taken_from_an_issuer_that_is_a_url() {
        let c = Config::from_vars(vars(&[SECRET])).unwrap();
        assert_eq!(c.public_url, None, "the issuer `authd` is not a URL");
        let c =
            Config::from_vars(vars(&[SECRET, ("JWT_ISSUER", "https://id.example.com/")])).unwrap();
        assert_eq!(c.public_url.as_deref(), Some("https://id.example.com"));
        let c = Config::from_vars(vars(&[
            SECRET,
            ("JWT_ISSUER", "https://id.example.com"),
            ("PUBLIC_URL", "http://authd.internal:8080/auth/"),
        ]))
        .unwrap();
        assert_eq!(
            c.public_url.as_deref(),
            Some("http://authd.internal:8080/auth")
        );
        for bad in [
            "auth.example.com",
            "ftp://auth.example.com",
            "https://",
            "https://auth.example.com/?x=1",
            "https://auth.example.com/#top",
            "https://user@auth.example.com",
        ] {
            let e = Config::from_vars(vars(&[SECRET, ("PUBLIC_URL", bad)])).unwrap_err();
            assert_eq!(e.variable, "PUBLIC_URL", "{bad}");
        }
    }

    #[test]
    fn retired_keys_need_a_readable_key_and_a_time() {
        let active = [
            ("JWT_ALGORITHM", "EdDSA"),
            ("JWT_PRIVATE_KEY_FILE", key("ed25519.pem").leak() as &str),
        ];
        let ok = format!("{}@2026-11-28T08:00:00Z", key("ed25519-old-public.pem"));
        let c =
            Config::from_vars(vars(&[active[0], active[1], ("JWT_RETIRED_KEYS", &ok)])).unwrap();
        assert_eq!(c.jwt.retired_keys.len(), 1);
        for bad in [
            key("ed25519-old-public.pem"),
            format!("{}@yesterday", key("ed25519-old-public.pem")),
            format!("{}@2026-11-28T08:00:00Z", key("README.md")),
        ] {
            let e = Config::from_vars(vars(&[active[0], active[1], ("JWT_RETIRED_KEYS", &bad)]))
                .unwrap_err();
            assert_eq!(e.variable, "JWT_RETIRED_KEYS", "{bad}: {e}");
        }
    }

    #[test]
    fn abuse_settings_have_defaults() {
        let c = Config::from_vars(vars(&[SECRET])).unwrap();
        assert!(c.trusted_proxies.is_empty());
        assert_eq!(c.throttle.account.threshold, 10);
        assert_eq!(c.throttle.account.window, Duration::from_secs(900));
        assert_eq!(c.throttle.account.max_delay, Duration::from_secs(300));
        assert_eq!(c.throttle.address.threshold, 5);
        assert_eq!(c.throttle.address.max_delay, Duration::from_secs(3600));
        assert_eq!(c.throttle.base_delay, Duration::from_secs(1));
        assert_eq!(c.throttle.register.threshold, 20);
        assert_eq!(c.throttle.register.window, Duration::from_secs(3600));
        assert_eq!(c.throttle.register.max_delay, Duration::from_secs(3600));
        assert_eq!(c.password_policy.mode, PasswordPolicyMode::Classic);
        assert_eq!(c.password_policy.min_length, 8);
        assert_eq!(c.audit.retention, Duration::from_secs(90 * 86_400));
        assert_eq!(c.audit.purge_interval, Duration::from_secs(3600));
        let nist = Config::from_vars(vars(&[SECRET, ("PASSWORD_POLICY", "NIST")])).unwrap();
        assert_eq!(nist.password_policy.mode, PasswordPolicyMode::Nist);
        assert_eq!(nist.password_policy.min_length, 15);
        assert_eq!(nist.password_policy.min_strength, 3);
    }

    #[test]
    fn trusted_proxies_take_addresses_and_networks() {
        let c = Config::from_vars(vars(&[
            SECRET,
            ("TRUSTED_PROXIES", "10.1.0.0/16, 192.0.2.7 ,fd00::/8"),
        ]))
        .unwrap();
        let t = &c.trusted_proxies;
        assert!(t.trusts("10.1.200.3".parse().unwrap()));
        assert!(t.trusts("::ffff:10.1.0.1".parse().unwrap()));
        assert!(!t.trusts("10.2.0.1".parse().unwrap()));
        assert!(t.trusts("192.0.2.7".parse().unwrap()));
        assert!(!t.trusts("192.0.2.8".parse().unwrap()));
        assert!(t.trusts("fd12::1".parse().unwrap()));
        assert!(!t.trusts("fe80::1".parse().unwrap()));
        let all: IpNetwork = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("203.0.113.9".parse().unwrap()));
    }

    #[test]
    fn operations_settings_have_their_defaults() {
        let c = Config::from_vars(vars(&[SECRET])).unwrap();
        assert_eq!(c.http_addr, Some("0.0.0.0:8080".parse().unwrap()));
        assert_eq!(c.tls, None);
        assert_eq!(c.otlp, None);
        assert_eq!(
            c.limits,
            GrpcLimits {
                max_message_bytes: 65_536,
                max_header_list_bytes: 16_384,
                concurrency: 1024,
                connection_concurrency: 128,
                request_timeout: Duration::from_secs(10),
                keepalive_interval: Duration::from_secs(30),
                keepalive_timeout: Duration::from_secs(10),
            }
        );
        assert_eq!(
            c.connections,
            ConnectionLimits {
                preface_timeout: Duration::from_secs(5),
                max_connections: None,
                http_max_connections: None,
            }
        );
    }

    #[test]
    fn connection_limits_are_read_and_zero_is_refused() {
        let c = Config::from_vars(vars(&[
            SECRET,
            ("CONNECTION_PREFACE_TIMEOUT", "750ms"),
            ("MAX_CONNECTIONS", "300"),
            ("HTTP_MAX_CONNECTIONS", "8"),
        ]))
        .unwrap();
        assert_eq!(
            c.connections,
            ConnectionLimits {
                preface_timeout: Duration::from_millis(750),
                max_connections: Some(300),
                http_max_connections: Some(8),
            }
        );
        for (name, value) in [
            ("CONNECTION_PREFACE_TIMEOUT", "0s"),
            ("CONNECTION_PREFACE_TIMEOUT", "soon"),
            ("MAX_CONNECTIONS", "0"),
            ("MAX_CONNECTIONS", "lots"),
            ("HTTP_MAX_CONNECTIONS", "0"),
        ] {
            let e = Config::from_vars(vars(&[SECRET, (name, value)])).unwrap_err();
            assert!(e.to_string().contains(name), "{name}={value}: {e}");
        }
    }

    #[test]
    fn an_empty_http_addr_turns_the_http_listener_off() {
        let c = Config::from_vars(vars(&[SECRET, ("HTTP_ADDR", "")])).unwrap();
        assert_eq!(c.http_addr, None);
        let c = Config::from_vars(vars(&[SECRET, ("HTTP_ADDR", "127.0.0.1:0")])).unwrap();
        assert_eq!(c.http_addr, Some("127.0.0.1:0".parse().unwrap()));
    }

    #[test]
    fn sizes_take_kib_and_mib() {
        for (text, expected) in [
            ("65536", 65_536),
            ("64KiB", 65_536),
            ("64kib", 65_536),
            ("1MiB", 1_048_576),
            ("512B", 512),
        ] {
            let c = Config::from_vars(vars(&[SECRET, ("GRPC_MAX_MESSAGE_SIZE", text)])).unwrap();
            assert_eq!(c.limits.max_message_bytes, expected, "{text}");
        }
    }

    #[test]
    fn tls_needs_both_files_and_mtls_needs_tls() {
        let c = Config::from_vars(vars(&[
            SECRET,
            ("TLS_CERT_FILE", "cert.pem"),
            ("TLS_KEY_FILE", "key.pem"),
            ("TLS_CLIENT_CA_FILE", "ca.pem"),
        ]))
        .unwrap();
        let tls = c.tls.unwrap();
        assert_eq!(tls.client_ca_file.as_deref(), Some(Path::new("ca.pem")));
        assert_eq!(tls.reload_interval, Duration::from_secs(30));
        let e = Config::from_vars(vars(&[SECRET, ("TLS_CLIENT_CA_FILE", "ca.pem")])).unwrap_err();
        assert_eq!(e.variable, "TLS_CLIENT_CA_FILE");
        let e = Config::from_vars(vars(&[SECRET, ("TLS_CERT_FILE", "cert.pem")])).unwrap_err();
        assert_eq!(e.variable, "TLS_KEY_FILE");
        let e = Config::from_vars(vars(&[SECRET, ("TLS_KEY_FILE", "key.pem")])).unwrap_err();
        assert_eq!(e.variable, "TLS_CERT_FILE");
    }

    #[test]
    fn otlp_export_follows_the_standard_variables() {
        let c = Config::from_vars(vars(&[
            SECRET,
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
        ]))
        .unwrap();
        let otlp = c.otlp.unwrap();
        assert_eq!(otlp.endpoint, "http://collector:4317");
        assert_eq!(otlp.service_name, "authd");
    }

    /// A deserializer that only records which fields a struct asks for.
    struct FieldNames(Vec<&'static str>);

    impl<'de> serde::Deserializer<'de> for &mut FieldNames {
        type Error = serde::de::value::Error;

        fn deserialize_any<V: serde::de::Visitor<'de>>(
            self,
            _: V,
        ) -> Result<V::Value, Self::Error> {
            Err(serde::de::Error::custom("only structs"))
        }

        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> Result<V::Value, Self::Error> {
            self.0.extend_from_slice(fields);
            Err(serde::de::Error::custom("fields recorded"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }

    #[test]
    fn settings_lists_exactly_what_authd_reads() {
        let mut fields = FieldNames(Vec::new());
        let _ = RawEnv::deserialize(&mut fields);
        let mut read: Vec<String> = fields.0.iter().map(|f| f.to_ascii_uppercase()).collect();
        read.push("RUST_LOG".to_owned());
        read.sort();
        let mut listed: Vec<String> = SETTINGS.iter().map(|s| (*s).to_owned()).collect();
        listed.sort();
        assert_eq!(read, listed);
    }

    #[test]
    fn secrets_do_not_print() {
        let c = Config::from_vars(vars(&[SECRET, ("DB_PASS", "hunter2hunter2")])).unwrap();
        let printed = format!("{c:?}");
        assert!(!printed.contains(SECRET.1));
        assert!(!printed.contains("hunter2hunter2"));
    }
}

//! What authd listens on and how it treats the connections and calls it gets.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::error::ConfigError;
use super::raw::RawEnv;
use super::values::{boolean, bytes, duration, number, parse, positive_duration};

/// The HTTP listener's address when `HTTP_ADDR` is not set.
pub const DEFAULT_HTTP_ADDR: &str = "0.0.0.0:8080";

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

pub(super) fn tls(raw: &RawEnv) -> Result<Option<TlsConfig>, ConfigError> {
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

pub(super) fn limits(raw: &RawEnv) -> Result<GrpcLimits, ConfigError> {
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

pub(super) fn connections(raw: &RawEnv) -> Result<ConnectionLimits, ConfigError> {
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

/// `GRPC_ADDR`.
pub(super) fn grpc_addr(raw: &RawEnv) -> Result<SocketAddr, ConfigError> {
    parse(
        "GRPC_ADDR",
        raw.grpc_addr.as_deref().unwrap_or("0.0.0.0:50051"),
        "an address like 0.0.0.0:50051",
    )
}

/// `HTTP_ADDR`: set and empty turns the HTTP listener off; unset keeps the default.
pub(super) fn http_addr(
    raw: &RawEnv,
    http_disabled: bool,
) -> Result<Option<SocketAddr>, ConfigError> {
    if http_disabled {
        return Ok(None);
    }
    parse(
        "HTTP_ADDR",
        raw.http_addr.as_deref().unwrap_or(DEFAULT_HTTP_ADDR),
        "an address like 0.0.0.0:8080 (or empty, to turn it off)",
    )
    .map(Some)
}

/// `PUBLIC_URL`; by default the issuer, when it is a URL: that is where verifiers find
/// authd (OpenID discovery).
pub(super) fn public_url(raw: &RawEnv, issuer: &str) -> Result<Option<String>, ConfigError> {
    match &raw.public_url {
        Some(url) => Ok(Some(base_url(url).ok_or_else(|| {
            ConfigError::new(
                "PUBLIC_URL",
                format!(
                    "must be an http(s) URL without query or fragment, like https://auth.example.com, got {url:?}"
                ),
            )
        })?)),
        None => Ok(base_url(issuer)),
    }
}

/// `GRPC_REFLECTION`.
pub(super) fn reflection(raw: &RawEnv) -> Result<bool, ConfigError> {
    boolean("GRPC_REFLECTION", raw.grpc_reflection.clone(), true)
}

/// `SHUTDOWN_GRACE`.
pub(super) fn shutdown_grace(raw: &RawEnv) -> Result<Duration, ConfigError> {
    duration(
        "SHUTDOWN_GRACE",
        raw.shutdown_grace.clone(),
        Duration::from_secs(10),
    )
}

/// `EXT_AUTHZ_STRIP_AUTHORIZATION`.
pub(super) fn ext_authz_strip_authorization(raw: &RawEnv) -> Result<bool, ConfigError> {
    boolean(
        "EXT_AUTHZ_STRIP_AUTHORIZATION",
        raw.ext_authz_strip_authorization.clone(),
        false,
    )
}

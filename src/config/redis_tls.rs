//! TLS to Redis: whom to trust and what to show (`REDIS_TLS_CA_FILE`,
//! `REDIS_TLS_CERT_FILE`, `REDIS_TLS_KEY_FILE`). TLS itself is asked for by the scheme:
//! `rediss://`, `rediss+cluster://`, `rediss+sentinel://`.

use std::path::PathBuf;

use super::error::ConfigError;
use super::raw::RawEnv;

/// Certificates for TLS connections to Redis (every node, and the sentinels).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedisTls {
    /// PEM roots that Redis's certificates must chain to, instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// A client certificate and its key (PEM), for a Redis with `tls-auth-clients yes`
    /// (Redis's default once TLS is on).
    pub client: Option<(PathBuf, PathBuf)>,
}

/// The TLS files, or `None` when none is set. `tls` says whether the configured Redis is
/// reached over TLS: the files mean nothing otherwise, so setting them then is an error.
pub(super) fn redis_tls(raw: &RawEnv, tls: bool) -> Result<Option<RedisTls>, ConfigError> {
    let ca_file = raw.redis_tls_ca_file.as_ref().map(PathBuf::from);
    let client = match (&raw.redis_tls_cert_file, &raw.redis_tls_key_file) {
        (Some(cert), Some(key)) => Some((PathBuf::from(cert), PathBuf::from(key))),
        (None, None) => None,
        (Some(_), None) => {
            return Err(ConfigError::new(
                "REDIS_TLS_CERT_FILE",
                "is set but REDIS_TLS_KEY_FILE is not; a client certificate needs its key",
            ));
        }
        (None, Some(_)) => {
            return Err(ConfigError::new(
                "REDIS_TLS_KEY_FILE",
                "is set but REDIS_TLS_CERT_FILE is not; a key needs its certificate",
            ));
        }
    };
    if ca_file.is_none() && client.is_none() {
        return Ok(None);
    }
    if !tls {
        let name = if ca_file.is_some() {
            "REDIS_TLS_CA_FILE"
        } else {
            "REDIS_TLS_CERT_FILE"
        };
        return Err(ConfigError::new(
            name,
            "is set but Redis is not reached over TLS; use rediss://, rediss+cluster:// or rediss+sentinel://",
        ));
    }
    Ok(Some(RedisTls { ca_file, client }))
}

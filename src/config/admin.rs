//! Who may call AdminService without an admin's bearer token (`ADMIN_CLIENT_SANS`).

use super::error::ConfigError;
use super::raw::RawEnv;

/// The SANs (DNS name, URI such as a SPIFFE id, e-mail or IP address, exactly as in the
/// certificate) of the mTLS client certificates that may call AdminService. Empty:
/// only bearers with the `admin` role may. Client certificates are verified only when
/// `TLS_CLIENT_CA_FILE` is set, so a list without it is refused at start-up.
pub(super) fn admin_client_sans(raw: &RawEnv) -> Result<Vec<String>, ConfigError> {
    let sans: Vec<String> = raw
        .admin_client_sans
        .as_deref()
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    if !sans.is_empty() && raw.tls_client_ca_file.is_none() {
        return Err(ConfigError::new(
            "ADMIN_CLIENT_SANS",
            "needs TLS_CLIENT_CA_FILE (and TLS_CERT_FILE, TLS_KEY_FILE): a SAN counts only in a client certificate authd verified",
        ));
    }
    Ok(sans)
}

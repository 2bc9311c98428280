//! The audit trail: every login success and failure, throttle, lockout, logout,
//! password change and session revocation, as a structured event. Each event goes to
//! the log under the target `authd::audit` at once, is counted
//! (`authd_audit_events_total{kind}`), and is queued for the `audit_events` table,
//! which a background task writes in batches. Writing never delays or fails the call
//! that caused the event: a full queue or a failed insert is logged and counted
//! (`authd_audit_dropped_total{reason}`, `authd_audit_write_failures_total`) instead,
//! and a row the database refuses costs only itself, not the rest of its batch.
//!
//! Events never carry a password, a token or a hash of either. A username that was
//! tried appears only as a keyed hash ([`NameHasher`]), so the table does not collect
//! the names attackers guess, yet attempts on one name can be followed.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::ClientInfo;
use crate::clock::Clock;
use crate::config::{AuditConfig, NameHashKey};
use crate::store::StoreError;
use crate::store::audit::{AuditRow, AuditStore, MAX_BATCH};

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditKind {
    /// Login opened a session.
    LoginSucceeded,
    /// Login refused: unknown user, wrong or empty password.
    LoginFailed,
    /// A call refused unchecked because its account or address must wait.
    Throttled,
    /// A failure made an account or address wait.
    Lockout,
    /// Logout.
    Logout,
    /// ChangePassword succeeded.
    PasswordChanged,
    /// ChangePassword refused: wrong current password.
    PasswordChangeFailed,
    /// A session was ended by RevokeSession or by the session limit.
    SessionRevoked,
    /// A refresh token older than the session's current one was presented: the
    /// session was ended as stolen.
    RefreshReuseDetected,
    /// An AdminService call; the detail names the method and the caller.
    AdminAction,
    /// An AdminService call refused: not an administrator.
    AdminDenied,
    /// EnrollTotp started (or restarted) an enrolment.
    MfaEnrolled,
    /// ConfirmTotp enabled the second factor.
    MfaConfirmed,
    /// DisableTotp removed the second factor.
    MfaDisabled,
    /// A second factor was accepted (login or step-up); the detail names the call.
    MfaSucceeded,
    /// A second factor was refused, or a ticket could not be used.
    MfaFailed,
    /// A recovery code was used (also an `mfa_succeeded`).
    RecoveryCodeUsed,
    /// RegenerateRecoveryCodes replaced the recovery codes.
    RecoveryCodesRegenerated,
}

impl AuditKind {
    /// The name in the table, the log and the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LoginSucceeded => "login_succeeded",
            Self::LoginFailed => "login_failed",
            Self::Throttled => "throttled",
            Self::Lockout => "lockout",
            Self::Logout => "logout",
            Self::PasswordChanged => "password_changed",
            Self::PasswordChangeFailed => "password_change_failed",
            Self::SessionRevoked => "session_revoked",
            Self::RefreshReuseDetected => "refresh_reuse_detected",
            Self::AdminAction => "admin_action",
            Self::AdminDenied => "admin_denied",
            Self::MfaEnrolled => "mfa_enrolled",
            Self::MfaConfirmed => "mfa_confirmed",
            Self::MfaDisabled => "mfa_disabled",
            Self::MfaSucceeded => "mfa_succeeded",
            Self::MfaFailed => "mfa_failed",
            Self::RecoveryCodeUsed => "recovery_code_used",
            Self::RecoveryCodesRegenerated => "recovery_codes_regenerated",
        }
    }

    /// Every kind's name, for ListAuditEvents' filter.
    pub const NAMES: &[&str] = &[
        "login_succeeded",
        "login_failed",
        "throttled",
        "lockout",
        "logout",
        "password_changed",
        "password_change_failed",
        "session_revoked",
        "admin_action",
        "admin_denied",
        "mfa_enrolled",
        "mfa_confirmed",
        "mfa_disabled",
        "mfa_succeeded",
        "mfa_failed",
        "recovery_code_used",
        "recovery_codes_regenerated",
    ];
}

/// One event, before it is stamped with the time.
#[derive(Debug, Clone)]
pub struct AuditEvent {
    kind: AuditKind,
    user_id: Option<String>,
    username_hash: Option<String>,
    client: ClientInfo,
    session_id: Option<String>,
    jti: Option<String>,
    detail: String,
}

impl AuditEvent {
    /// An event of `kind` caused by `client`.
    pub fn new(kind: AuditKind, client: &ClientInfo) -> Self {
        Self {
            kind,
            user_id: None,
            username_hash: None,
            client: client.clone(),
            session_id: None,
            jti: None,
            detail: String::new(),
        }
    }

    /// The user concerned.
    pub fn user(mut self, user_id: &str) -> Self {
        self.user_id = Some(user_id.to_owned());
        self
    }

    /// The hashed username tried.
    pub fn username_hash(mut self, hash: &str) -> Self {
        self.username_hash = Some(hash.to_owned());
        self
    }

    /// The session concerned.
    pub fn session(mut self, session_id: &str) -> Self {
        self.session_id = Some(session_id.to_owned());
        self
    }

    /// The token concerned.
    pub fn jti(mut self, jti: &str) -> Self {
        self.jti = Some(jti.to_owned());
        self
    }

    /// A few words more.
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self
    }

    /// The detail set so far.
    pub fn detail_text(&self) -> &str {
        &self.detail
    }
}

/// A keyed hash (HMAC-SHA256) of canonical usernames. Keyed, so a list of likely
/// names cannot be hashed to read the trail back; the key ([`NameHashKey`]: `NAME_HASH_KEY`,
/// else `JWT_SECRET`) is the same on every instance, so every instance hashes a name
/// alike, and it cannot be empty.
#[derive(Clone)]
pub struct NameHasher {
    key: NameHashKey,
}

impl std::fmt::Debug for NameHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NameHasher")
    }
}

impl NameHasher {
    /// Hashes with `key`.
    pub fn new(key: &NameHashKey) -> Self {
        Self { key: key.clone() }
    }

    /// 64 hex digits. The input starts with a label holding a `:`, which a JWT's
    /// signing input (base64url and `.`) never does, so this never signs a token.
    pub fn hash(&self, canonical_username: &str) -> String {
        let mut mac = match Hmac::<Sha256>::new_from_slice(self.key.expose()) {
            Ok(mac) => mac,
            // HMAC takes keys of any length; this arm is never taken.
            Err(_) => return String::new(),
        };
        mac.update(b"authd-username:");
        mac.update(canonical_username.as_bytes());
        mac.finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// Where events go: the log, the metrics and (through a bounded queue) the table.
pub struct AuditLog {
    queue: mpsc::Sender<AuditRow>,
    clock: Arc<dyn Clock>,
    purger: JoinHandle<()>,
    last_drop_warning: AtomicI64,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").finish_non_exhaustive()
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        // The writer ends by itself once the queue is closed and drained.
        self.purger.abort();
    }
}

impl AuditLog {
    /// Starts the writer and the purge task (which deletes rows older than the
    /// retention, at start and then every purge interval). Needs a Tokio runtime.
    pub fn start(store: AuditStore, config: &AuditConfig, clock: Arc<dyn Clock>) -> Self {
        let (queue, rows) = mpsc::channel(config.queue);
        tokio::spawn(write(store.clone(), rows));
        let purger = tokio::spawn(purge(store, *config, Arc::clone(&clock)));
        Self {
            queue,
            clock,
            purger,
            last_drop_warning: AtomicI64::new(i64::MIN),
        }
    }

    /// Records `event` now.
    pub fn record(&self, event: AuditEvent) {
        let kind = event.kind.as_str();
        tracing::info!(
            target: "authd::audit",
            kind,
            user_id = event.user_id.as_deref(),
            username_hash = event.username_hash.as_deref(),
            client_ip = %event.client.ip,
            user_agent = %event.client.user_agent,
            session_id = event.session_id.as_deref(),
            jti = event.jti.as_deref(),
            detail = %event.detail,
            "audit event"
        );
        metrics::counter!("authd_audit_events_total", "kind" => kind).increment(1);
        let row = AuditRow {
            at_ms: self.clock.unix_millis(),
            kind,
            user_id: event.user_id,
            username_hash: event.username_hash,
            client_ip: event.client.ip,
            user_agent: event.client.user_agent,
            session_id: event.session_id,
            jti: event.jti,
            detail: event.detail,
        };
        if self.queue.try_send(row).is_err() {
            metrics::counter!("authd_audit_dropped_total", "reason" => "queue_full").increment(1);
            // One warning a second at most: a flood must not become a log flood too.
            let now = self.clock.unix_seconds();
            if self.last_drop_warning.swap(now, Ordering::Relaxed) != now {
                tracing::warn!(
                    "audit queue full (AUDIT_QUEUE): event kept in the log only, not in the table"
                );
            }
        }
    }
}

/// Writes queued rows in batches until the queue is closed and empty.
async fn write(store: AuditStore, mut rows: mpsc::Receiver<AuditRow>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rows.recv_many(&mut batch, MAX_BATCH).await > 0 {
        write_batch(&store, &batch).await;
        batch.clear();
    }
}

/// Writes `batch` in one statement. If the database refuses it, one row may be at fault
/// (one statement stands or falls whole): the rows are then written one by one, so only
/// the rows it refuses are lost, and counted. If it cannot be reached, nothing is retried.
async fn write_batch(store: &AuditStore, batch: &[AuditRow]) {
    let refused = match store.insert(batch).await {
        Ok(()) => return,
        Err(StoreError::Unavailable(e)) => return unwritten(batch.len(), "unavailable", &e),
        Err(StoreError::Internal(e)) => e,
    };
    if batch.len() == 1 {
        return unwritten(1, "rejected", &refused);
    }
    let mut rejected = 0;
    let mut first_refusal = None;
    for (i, row) in batch.iter().enumerate() {
        match store.insert(std::slice::from_ref(row)).await {
            Ok(()) => {}
            Err(StoreError::Internal(e)) => {
                rejected += 1;
                first_refusal.get_or_insert(e);
            }
            Err(StoreError::Unavailable(e)) => {
                unwritten(batch.len() - i, "unavailable", &e);
                break;
            }
        }
    }
    if let Some(e) = first_refusal {
        unwritten(rejected, "rejected", &e);
    }
}

/// Counts and logs `rows` rows lost for `reason`: `rejected` (the database refused those
/// rows; the rest of their batch was written) or `unavailable` (it could not be reached).
/// One line per batch at most, with no row's content: the events are in the log already.
fn unwritten(rows: usize, reason: &'static str, error: &anyhow::Error) {
    let rows = u64::try_from(rows).unwrap_or(u64::MAX);
    if reason == "unavailable" {
        metrics::counter!("authd_audit_write_failures_total").increment(rows);
    } else {
        metrics::counter!("authd_audit_dropped_total", "reason" => reason).increment(rows);
    }
    tracing::warn!(
        error = format!("{error:#}"),
        rows,
        reason,
        "audit rows not written to the table (they are in the log)"
    );
}

/// Deletes rows older than the retention, now and then every purge interval.
async fn purge(store: AuditStore, config: AuditConfig, clock: Arc<dyn Clock>) {
    let retention_ms = i64::try_from(config.retention.as_millis()).unwrap_or(i64::MAX);
    let mut every = tokio::time::interval(config.purge_interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let before = clock.unix_millis().saturating_sub(retention_ms);
        match store.purge(before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(rows = n, "old audit rows deleted (AUDIT_RETENTION)"),
            Err(e) => tracing::warn!(error = format!("{e:#}"), "deleting old audit rows failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_hash_by_key_and_name() {
        let key = |k: &[u8]| {
            let key = NameHashKey::new(k.to_vec(), crate::config::NameHashKeySource::Configured);
            NameHasher::new(&key.unwrap())
        };
        let a = key(b"key-one-0123456789abcdef012345678");
        let b = key(b"key-two-0123456789abcdef012345678");
        assert_eq!(a.hash("alice"), a.hash("alice"));
        assert_ne!(a.hash("alice"), a.hash("bob"));
        assert_ne!(a.hash("alice"), b.hash("alice"));
        assert_eq!(a.hash("alice").len(), 64);
        assert!(!a.hash("alice").contains("alice"));
    }
}

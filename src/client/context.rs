//! Who the caller is, as the layer puts it into each admitted request.

use std::time::SystemTime;

/// The authenticated caller of a request; in the request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthContext {
    /// The user's id (the token's `sub`).
    pub user_id: String,
    /// The username at login.
    pub username: String,
    /// The session the token belongs to.
    pub session_id: String,
    /// When the token expires.
    pub expires_at: SystemTime,
    /// False only when authd could not be asked and the layer was configured to fail
    /// open: then nothing above was verified, only read from the token.
    pub token_checked: bool,
    /// False when authd answered without checking revocation (its session store was
    /// down and it runs in open mode).
    pub revocation_checked: bool,
    /// The user's roles as authd last said (sorted). A change made with SetRoles reaches
    /// the cache at once through the revocation stream. Empty when the token was not
    /// checked (failing open): roles are never read from the token.
    pub roles: Vec<String>,
    /// When the user logged in (the token's `auth_time`; a Refresh does not move it).
    /// The epoch when the token was not checked (failing open).
    pub auth_time: SystemTime,
    /// How the user logged in (RFC 8176 `amr`): `pwd`, plus `otp` when a second factor
    /// was given. Empty when the token was not checked (failing open).
    pub amr: Vec<String>,
}

impl AuthContext {
    /// Whether the user holds `role`.
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }

    /// Whether the login gave a second factor (`otp` in `amr`): step-up for a
    /// critical operation (RFC 9470). False when the token was not checked.
    pub fn has_second_factor(&self) -> bool {
        self.token_checked && self.amr.iter().any(|a| a == "otp")
    }

    /// Whether the user logged in at most `max_age` before `now` (RFC 9470's
    /// `max_age`; pass `SystemTime::now()`). False when the token was not checked.
    pub fn authenticated_within(&self, max_age: std::time::Duration, now: SystemTime) -> bool {
        self.token_checked
            && now
                .duration_since(self.auth_time)
                .is_ok_and(|age| age <= max_age)
    }
}

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
}

impl AuthContext {
    /// Whether the user holds `role`.
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }
}

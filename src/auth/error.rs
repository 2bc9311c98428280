//! What a caller may learn when a call fails. Internal detail stays in the `source`
//! and in the log; the gRPC layer maps each variant to one status.

use std::time::Duration;

/// One field that breaks a rule, for a `BadRequest` detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// The request field.
    pub field: &'static str,
    /// What rule it breaks, in words a caller can act on.
    pub description: String,
    /// The rule, as a stable SCREAMING_SNAKE_CASE id (`google.rpc` `reason`); empty
    /// when the description says all there is.
    pub reason: &'static str,
}

impl FieldViolation {
    /// A violation of `field`.
    pub fn new(field: &'static str, description: impl Into<String>) -> Self {
        Self {
            field,
            description: description.into(),
            reason: "",
        }
    }

    /// A violation of `field` that breaks the rule named `reason`.
    pub fn rule(field: &'static str, reason: &'static str, description: impl Into<String>) -> Self {
        Self {
            field,
            description: description.into(),
            reason,
        }
    }
}

/// Which store a call needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    /// MySQL: users.
    Users,
    /// Redis: sessions and the blacklist.
    Sessions,
}

impl std::fmt::Display for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Store::Users => "user store",
            Store::Sessions => "session store",
        })
    }
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The request breaks a rule on one or more fields.
    #[error("invalid request")]
    InvalidArgument(Vec<FieldViolation>),
    /// Register: the username is taken (case-insensitively).
    #[error("username is already taken")]
    UsernameTaken,
    /// Login: unknown user, wrong password or empty password; deliberately one variant.
    #[error("invalid username or password")]
    InvalidCredentials,
    /// Login: the right password of a disabled account.
    #[error("account disabled")]
    AccountDisabled,
    /// AdminService: no such user.
    #[error("user not found")]
    UserNotFound,
    /// AdminService: the change would leave no enabled user with the `admin` role.
    #[error("the last enabled admin cannot lose the admin role")]
    LastAdmin,
    /// AdminService: the caller is authenticated but not an administrator.
    #[error("not an administrator")]
    NotAdmin,
    /// An authenticated call without a good bearer token.
    #[error("missing or invalid bearer token")]
    Unauthenticated,
    /// Refresh: the refresh token is not good. `reused`: it was an older token of a live
    /// session, which has now been ended as stolen.
    #[error("refresh token refused")]
    RefreshRefused {
        /// Reuse was detected and the session ended.
        reused: bool,
    },
    /// ChangePassword: the current password is wrong.
    #[error("current password is wrong")]
    WrongCurrentPassword,
    /// RevokeSession: no such session among the caller's.
    #[error("session not found")]
    SessionNotFound,
    /// WatchRevocations: the credential is not a watcher's.
    #[error("this credential may not watch revocations")]
    NotAWatcher,
    /// WatchRevocations: this connection or this instance has all the streams it may.
    #[error("too many revocation watchers; retry later")]
    TooManyWatchers {
        /// When a retry makes sense.
        retry_after: Duration,
    },
    /// The password hashing queue is full.
    #[error("too many password checks in progress; retry later")]
    Overloaded {
        /// When a retry makes sense.
        retry_after: Duration,
    },
    /// Too many failed attempts for this account or from this address: wait and retry.
    /// The same for accounts that exist and accounts that do not.
    #[error("too many failed attempts; retry later")]
    Throttled {
        /// How long until the next attempt is allowed.
        retry_after: Duration,
    },
    /// Register: too many calls from this address; wait and retry.
    #[error("too many registrations from this address; retry later")]
    RegistrationThrottled {
        /// How long until the next call is allowed.
        retry_after: Duration,
    },
    /// A store the call needs cannot be reached.
    #[error("{store} unavailable")]
    Unavailable {
        /// Which store.
        store: Store,
        /// What went wrong, for the log only.
        #[source]
        source: anyhow::Error,
    },
    /// A critical call by a user with a second factor came without a code (step-up).
    #[error("a second factor is required")]
    SecondFactorRequired,
    /// The second-factor code given is wrong, or was already used.
    #[error("wrong second-factor code")]
    SecondFactorInvalid,
    /// VerifySecondFactor: the ticket is unknown, used, expired or past its attempts.
    #[error("invalid or expired second-factor ticket")]
    MfaTicketInvalid,
    /// The call cannot be made in the state the caller is in; the text says why and is
    /// shown to the caller.
    #[error("{0}")]
    FailedPrecondition(&'static str),
    /// Anything else; its text is for the log only.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl AuthError {
    /// An INVALID_ARGUMENT on a single field.
    pub fn invalid(field: &'static str, description: impl Into<String>) -> Self {
        Self::InvalidArgument(vec![FieldViolation::new(field, description)])
    }
}

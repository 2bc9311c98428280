//! What AdminService does, independent of any transport: who may call it, and each
//! operation. Every call — allowed or refused — leaves an audit row naming its caller.
//!
//! Calls that end a user's access (disable, delete, a new password, revoking the
//! sessions) write the users table first and only then end the sessions, announce a
//! `USER` revocation and answer OK. Should the session store fail half-way, the user
//! stays unable to log in (the table says so), open-mode validation refuses the old
//! tokens (`sessions_valid_after` moved), this instance refuses them in every mode and
//! retries the revocation in the background until it is recorded
//! ([`crate::auth::unfinished`]), and the call answers UNAVAILABLE: running it again is
//! safe. Disable, delete and a SetRoles without `admin` never leave no enabled admin.

use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::auth::audit::{AuditEvent, AuditKind, AuditLog};
use crate::auth::hasher::hash_cost;
use crate::auth::roles::{self, ADMIN_ROLE};
use crate::auth::service::{
    AuthCore, DEFAULT_SESSIONS_PAGE, MAX_SESSIONS_PAGE, SessionList, sessions_error, users_error,
};
use crate::auth::unfinished::UnfinishedRevocations;
use crate::auth::username::Username;
use crate::auth::{AuthError, ClientInfo};
use crate::store::User;
use crate::store::audit::{AuditFilter, AuditStore, StoredAuditRow};
use crate::store::sessions::Revocation;
use crate::store::users::{AdminLoss, CreateUserError, Guarded, NewUser, UserFilter};
use crate::store::{SessionStore, StoreError};

/// ListUsers' page when none is asked for, and its largest.
pub const DEFAULT_USERS_PAGE: usize = 50;
/// See [`DEFAULT_USERS_PAGE`].
pub const MAX_USERS_PAGE: usize = 500;
/// ListAuditEvents' page when none is asked for, and its largest.
pub const DEFAULT_AUDIT_PAGE: usize = 100;
/// See [`DEFAULT_AUDIT_PAGE`].
pub const MAX_AUDIT_PAGE: usize = 500;
/// The longest user reference (an id or a username) looked at.
const MAX_USER_REF_BYTES: usize = 64;

/// Who is calling AdminService.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// A user holding the `admin` role now.
    User {
        /// Their id.
        user_id: String,
        /// Their name.
        username: String,
    },
    /// An mTLS client whose certificate names a SAN in `ADMIN_CLIENT_SANS`.
    Certificate {
        /// The SAN that matched.
        san: String,
    },
}

impl Actor {
    /// For audit rows and logs: `user <id>` or `certificate <san>`. Never a username:
    /// audit rows name users by id and a keyed hash only, so deleting a user leaves no
    /// name behind.
    pub fn describe(&self) -> String {
        match self {
            Actor::User { user_id, .. } => format!("user {user_id}"),
            Actor::Certificate { san } => format!("certificate {san}"),
        }
    }
}

/// What the caller's TLS client certificate says, as the transport read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientCert {
    /// No certificate (plaintext, or none presented).
    None,
    /// A verified certificate with a SAN listed in `ADMIN_CLIENT_SANS`.
    Admin(String),
    /// A verified certificate with no listed SAN.
    Other,
}

/// A user as AdminService shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserView {
    /// Id.
    pub user_id: String,
    /// Canonical name.
    pub username: String,
    /// Roles, sorted.
    pub roles: Vec<String>,
    /// Cannot log in.
    pub disabled: bool,
    /// Must change the password set by an operator.
    pub password_change_required: bool,
}

impl From<&User> for UserView {
    fn from(u: &User) -> Self {
        Self {
            user_id: u.id.clone(),
            username: u.username.clone(),
            roles: roles::unframe(&u.roles),
            disabled: u.disabled,
            password_change_required: u.password_change_required,
        }
    }
}

/// A page of users.
#[derive(Debug, Clone)]
pub struct UserPage {
    /// This page, by username.
    pub users: Vec<UserView>,
    /// The token of the next page; `None` on the last.
    pub next_page_token: Option<String>,
}

/// A page of audit rows.
#[derive(Debug, Clone)]
pub struct AuditPage {
    /// This page, newest first.
    pub events: Vec<StoredAuditRow>,
    /// The token of the next (older) page; `None` on the last.
    pub next_page_token: Option<String>,
}

/// CreateUser's request.
#[derive(Debug, Clone, Default)]
pub struct CreateUser {
    /// The name (checked as Register checks it).
    pub username: String,
    /// A password to hash (checked against the policy), or empty…
    pub password: String,
    /// …an existing bcrypt hash (`$2a$`, `$2b$`, `$2y$`), for imports.
    pub password_hash: String,
    /// Roles.
    pub roles: Vec<String>,
    /// Ask for a new password at the first login.
    pub require_password_change: bool,
}

/// Whether `hash` is a bcrypt hash authd can verify: `$2a$`, `$2b$` or `$2y$`, a cost of
/// 4 to `ceiling` (see [`crate::auth::padding::cost_ceiling`]), and 53 characters of
/// bcrypt's base64.
pub fn valid_bcrypt_hash(hash: &str, ceiling: u32) -> bool {
    let b = hash.as_bytes();
    b.len() == 60
        && (hash.starts_with("$2a$") || hash.starts_with("$2b$") || hash.starts_with("$2y$"))
        && b[6] == b'$'
        && hash_cost(hash).is_some_and(|c| (4..=ceiling).contains(&c))
        && b[7..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'.' || *c == b'/')
}

/// The user id `reference` is, if it is one: only the hyphenated form authd gives ids
/// in (`8-4-4-4-12` hex digits), lower-cased. The 32-hex "simple" form uuid also parses is
/// a valid username (`[A-Za-z0-9_]`, 3-32), so it names a user by name.
fn user_id(reference: &str) -> Option<String> {
    let hyphenated = reference.len() == 36
        && reference.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        });
    hyphenated
        .then(|| uuid::Uuid::parse_str(reference).ok())
        .flatten()
        .map(|id| id.hyphenated().to_string())
}

fn page_limit(
    field: &'static str,
    asked: i32,
    default: usize,
    max: usize,
) -> Result<usize, AuthError> {
    match usize::try_from(asked) {
        Err(_) => Err(AuthError::invalid(field, "must not be negative")),
        Ok(0) => Ok(default),
        Ok(n) => Ok(n.min(max)),
    }
}

/// A page token that is a number an earlier page gave (at most 20 digits).
fn numeric_token(field: &'static str, token: &str) -> Result<Option<u64>, AuthError> {
    if token.is_empty() {
        return Ok(None);
    }
    if token.len() > 20 || !token.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AuthError::invalid(
            field,
            "must be the next_page_token of an earlier page",
        ));
    }
    token
        .parse::<u64>()
        .map(Some)
        .map_err(|_| AuthError::invalid(field, "must be the next_page_token of an earlier page"))
}

impl AuthCore {
    /// Who may call AdminService: a bearer whose user holds the `admin` role *now* (read
    /// from the users table on every call, so a demoted admin loses access at once), or
    /// a client certificate with a listed SAN. A certificate wins over a bearer. Anyone
    /// else is PERMISSION_DENIED, and a caller with neither is UNAUTHENTICATED; refusals
    /// of a known caller are audited.
    pub async fn authorize_admin(
        &self,
        method: &str,
        bearer: Option<&str>,
        cert: ClientCert,
        client: &ClientInfo,
    ) -> Result<Actor, AuthError> {
        if let ClientCert::Admin(san) = cert {
            return Ok(Actor::Certificate { san });
        }
        if bearer.is_none() {
            if cert == ClientCert::Other {
                self.record_denied(
                    &format!("address {}", client.ip),
                    AuditEvent::new(AuditKind::AdminDenied, client),
                    method,
                    "client certificate not in ADMIN_CLIENT_SANS",
                );
                return Err(AuthError::NotAdmin);
            }
            return Err(AuthError::Unauthenticated);
        }
        let claims = self.authenticate(bearer).await?;
        let user = self
            .users
            .find_by_id(&claims.sub)
            .await
            .map_err(users_error)?;
        match user {
            Some(user)
                if !user.disabled
                    && roles::unframe(&user.roles).iter().any(|r| r == ADMIN_ROLE) =>
            {
                Ok(Actor::User {
                    user_id: user.id,
                    username: user.username,
                })
            }
            Some(user) => {
                self.record_denied(
                    &format!("user {}", user.id),
                    AuditEvent::new(AuditKind::AdminDenied, client)
                        .user(&user.id)
                        .session(&claims.sid),
                    method,
                    "no admin role",
                );
                Err(AuthError::NotAdmin)
            }
            None => Err(AuthError::Unauthenticated),
        }
    }

    /// Audits a refusal of `caller`, coalesced (see [`crate::auth::denied`]): one row per
    /// caller per minute, written when the minute is over, its detail ending with
    /// `refusals=N …`. The first refusal of a minute is logged at once.
    fn record_denied(&self, caller: &str, event: AuditEvent, method: &str, why: &str) {
        let (rows, first) = self.denied.refused(
            caller,
            self.clock.unix_seconds(),
            event,
            format!("{method}: {why}"),
        );
        if first {
            tracing::warn!(
                caller,
                method,
                why,
                "AdminService call refused (this caller's refusals in the next {} s are counted in one admin_denied row)",
                crate::auth::denied::WINDOW_SECS
            );
        }
        for row in rows {
            self.audit.record(row);
        }
    }

    /// Records an admin call: `what` on `target` (a user id), by `actor`.
    fn audit_admin(
        &self,
        actor: &Actor,
        client: &ClientInfo,
        target: Option<&str>,
        what: impl AsRef<str>,
    ) {
        let detail = format!("{} by {}", what.as_ref(), actor.describe());
        tracing::info!(actor = %actor.describe(), target = target.unwrap_or_default(), "{}", what.as_ref());
        let event = AuditEvent::new(AuditKind::AdminAction, client).detail(detail);
        self.audit.record(match target {
            Some(id) => event.user(id),
            None => event,
        });
    }

    /// The user `reference` names: an id (a UUID) or a username (any case).
    pub async fn resolve_user(&self, reference: &str) -> Result<User, AuthError> {
        let reference = reference.trim();
        if reference.is_empty() {
            return Err(AuthError::invalid(
                "user",
                "must name a user (id or username)",
            ));
        }
        if reference.len() > MAX_USER_REF_BYTES {
            return Err(AuthError::invalid(
                "user",
                format!("must be at most {MAX_USER_REF_BYTES} bytes"),
            ));
        }
        let found = if user_id(reference).is_some() {
            self.users
                .find_by_id(&reference.to_ascii_lowercase())
                .await
                .map_err(users_error)?
        } else {
            match Username::parse(reference) {
                Ok(name) => self
                    .users
                    .find_by_username(name.as_str())
                    .await
                    .map_err(users_error)?,
                Err(_) => None,
            }
        };
        found.ok_or(AuthError::UserNotFound)
    }

    /// Ends every session of the user and announces it, as one `USER` revocation with
    /// no session spared; the count of live sessions ended. When the session store
    /// fails, the revocation is not recorded: the call fails (UNAVAILABLE, and running
    /// it again is safe), this instance refuses the user's tokens issued so far, and a
    /// background task retries until it is recorded (see [`crate::auth::unfinished`]).
    async fn end_sessions(&self, user_id: &str) -> Result<u32, AuthError> {
        let now = self.clock.unix_seconds();
        // Remembered first: open mode here refuses the tokens whatever happens next.
        self.remembered.remember(&user_revocation(user_id), now);
        match end_user_sessions(&self.sessions, user_id, now).await {
            Ok(ended) => {
                self.unfinished.recorded(user_id, now);
                Ok(ended)
            }
            Err(e) => {
                if self.unfinished.add(user_id, now) {
                    tokio::spawn(finish_revocation(
                        Arc::clone(&self.sessions),
                        Arc::downgrade(&self.unfinished),
                        Arc::downgrade(&self.audit),
                        user_id.to_owned(),
                    ));
                }
                Err(sessions_error(e))
            }
        }
    }

    /// CreateUser: a new user with a password (checked against the policy, then hashed)
    /// or an existing bcrypt hash, and roles.
    pub async fn admin_create_user(
        &self,
        actor: &Actor,
        client: &ClientInfo,
        request: CreateUser,
    ) -> Result<UserView, AuthError> {
        let mut violations = Vec::new();
        let username = Username::parse(&request.username)
            .map_err(|v| violations.push(v))
            .ok();
        let roles = roles::parse_roles("roles", &request.roles)
            .map_err(|v| violations.push(v))
            .ok();
        let hash = match (
            request.password.is_empty(),
            request.password_hash.is_empty(),
        ) {
            (true, false) if valid_bcrypt_hash(&request.password_hash, self.padding.ceiling()) => {
                Some(request.password_hash.clone())
            }
            (true, false) => {
                violations.push(crate::auth::FieldViolation::new(
                    "password_hash",
                    format!(
                        "must be a bcrypt hash ($2a$, $2b$ or $2y$, cost 4-{}, 60 characters)",
                        self.padding.ceiling()
                    ),
                ));
                None
            }
            (false, true) => match self
                .check_new_password(None, "password", &request.password, request.username.trim())
                .await?
            {
                Ok(password) => Some(self.hasher.hash(None, password.expose()).await?),
                Err(v) => {
                    violations.extend(v);
                    None
                }
            },
            _ => {
                violations.push(crate::auth::FieldViolation::new(
                    "password",
                    "give exactly one of password and password_hash",
                ));
                None
            }
        };
        let (Some(username), Some(roles), Some(hash)) = (username, roles, hash) else {
            return Err(AuthError::InvalidArgument(violations));
        };
        let user = NewUser {
            id: uuid::Uuid::new_v4().to_string(),
            username: username.as_str().to_owned(),
            password_hash: hash,
            roles: roles::frame(&roles),
            password_change_required: request.require_password_change,
        };
        match self.users.insert(&user).await {
            Ok(()) => {}
            Err(CreateUserError::UsernameTaken) => return Err(AuthError::UsernameTaken),
            Err(CreateUserError::Store(e)) => return Err(users_error(e)),
        }
        if let Some(cost) = hash_cost(&user.password_hash) {
            self.padding.saw_stored_cost(cost);
        }
        self.audit_admin(
            actor,
            client,
            Some(&user.id),
            format!("CreateUser roles [{}]", roles.join(",")),
        );
        Ok(UserView {
            user_id: user.id,
            username: user.username,
            roles,
            disabled: false,
            password_change_required: user.password_change_required,
        })
    }

    /// GetUser.
    pub async fn admin_get_user(
        &self,
        actor: &Actor,
        client: &ClientInfo,
        reference: &str,
    ) -> Result<UserView, AuthError> {
        let user = self.resolve_user(reference).await?;
        self.audit_admin(actor, client, Some(&user.id), "GetUser");
        Ok(UserView::from(&user))
    }

    /// ListUsers: a page by username, filtered by name prefix, role and state.
    pub async fn admin_list_users(
        &self,
        actor: &Actor,
        client: &ClientInfo,
        filter: UserFilter,
        page_size: i32,
        page_token: &str,
    ) -> Result<UserPage, AuthError> {
        let limit = page_limit("page_size", page_size, DEFAULT_USERS_PAGE, MAX_USERS_PAGE)?;
        let prefix = filter.name_prefix.trim().to_ascii_lowercase();
        if prefix.len() > 32
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(AuthError::invalid(
                "name_prefix",
                "must be at most 32 of a-z 0-9 _",
            ));
        }
        if let Some(role) = &filter.role
            && !roles::valid_role(role)
        {
            return Err(AuthError::invalid("role", "is not a role name"));
        }
        // The token is the last username of the previous page.
        if !page_token.is_empty()
            && !Username::parse(page_token).is_ok_and(|n| n.as_str() == page_token)
        {
            return Err(AuthError::invalid(
                "page_token",
                "must be the next_page_token of an earlier page",
            ));
        }
        let filter = UserFilter {
            name_prefix: prefix,
            ..filter
        };
        let mut users = self
            .users
            .list(&filter, page_token, limit + 1)
            .await
            .map_err(users_error)?;
        let more = users.len() > limit;
        users.truncate(limit);
        let next_page_token = if more {
            users.last().map(|u| u.username.clone())
        } else {
            None
        };
        self.audit_admin(actor, client, None, "ListUsers");
        Ok(UserPage {
            users: users.iter().map(UserView::from).collect(),
            next_page_token,
        })
    }

    /// DisableUser: refuses the user's logins (in the users table, first), then ends
    /// every session; the count ended. Disabling a disabled user ends whatever is left.
    pub async fn admin_disable_user(
        &self,
        actor: &Actor,
        client: &ClientInfo,
        reference: &str,
    ) -> Result<u32, AuthError> {
        let user = self.resolve_user(reference).await?;
        self.disable_unless_last_admin(&user.id).await?;
        let ended = self.end_sessions(&user.id).await;
        self.finish(actor, client, &user.id, "DisableUser", ended)
    }

    /// Disables the user in the users table, unless it is the last enabled admin.
    async fn disable_unless_last_admin(&self, user_id: &str) -> Result<(), AuthError> {
        let now = self.clock.unix_seconds();
        match self
            .users
            .change_unless_last_admin(user_id, AdminLoss::Disable(now))
            .await
            .map_err(users_error)?
        {
            Guarded::Done => Ok(()),
            Guarded::LastAdmin => Err(AuthError::LastAdmin),
        }
    }

    /// Audits an operation that ended sessions, saying whether they ended.
    fn finish(
        &self,
        actor: &Actor,
        client: &ClientInfo,
        user_id: &str,
        what: &str,
        ended: Result<u32, AuthError>,
    ) -> Result<u32, AuthError> {
        match &ended {
            Ok(n) => self.audit_admin(
                actor,
                client,
                Some(user_id),
                format!("{what}: {n} sessions ended"),
            ),
            Err(_) => self.audit_admin(
                actor,
                client,
                Some(user_id),
                format!(
                    "{what}: sessions NOT ended yet (session store unavailable): refused here, \
                     retrying in the background; run it again to be sure"
                ),
            ),
        }
        ended
    }

    /// EnableUser.
    pub async fn admin_enable_user(
        &self,
        actor: &Actor,
        client: &ClientInfo,
        reference: &str,
    ) -> Result<UserView, AuthError> {
        let user = self.resolve_user(reference).await?;
        self.users
            .set_disabled(&user.id, false, self.clock.unix_seconds())
            .await
            .map_err(users_error)?;
        self.audit_admin(actor, client, Some(&user.id), "EnableUser");
        Ok(UserView {
            disabled: false,
            ..UserView::from(&user)
        })
    }

    /// DeleteUser: disables the user first (so a failure half-way leaves nobody who can
    /// log in), ends every session, forgets the roles mirror, then removes the row. The
    /// audit rows stay (they name the user by id and a keyed hash of the name only).
    pub async fn admin_delete_user(
        &self,
        actor: &Actor,
        client: &ClientInfo,
        reference: &str,
    ) -> Result<u32, AuthError> {
        let user = self.resolve_user(reference).await?;
        self.disable_unless_last_admin(&user.id).await?;
        let ended = async {
            let ended = self.end_sessions(&user.id).await?;
            self.sessions
                .forget_roles(&user.id)
                .await
                .map_err(sessions_error)?;
            self.users.delete(&user.id).await.map_err(users_error)?;
            Ok(ended)
        }
        .await;
        self.finish(actor, client, &user.id, "DeleteUser", ended)
    }

    /// SetPassword: a new password (checked against the policy), every session ended,
    /// and optionally a change asked for at the next login.
    pub async fn admin_set_password(
        &self,
        actor: &Actor,
        client: &ClientInfo,
        reference: &str,
        password: &str,
        require_change: bool,
    ) -> Result<u32, AuthError> {
        let user = self.resolve_user(reference).await?;
        let password = self
            .check_new_password(None, "password", password, &user.username)
            .await?
            .map_err(AuthError::InvalidArgument)?;
        let hash = self.hasher.hash(None, password.expose()).await?;
        self.users
            .set_password(&user.id, &hash, require_change, self.clock.unix_seconds())
            .await
            .map_err(users_error)?;
        let ended = self.end_sessions(&user.id).await;
        let what = if require_change {
            "SetPassword (change required)"
        } else {
            "SetPassword"
        };
        self.finish(actor, client, &user.id, what, ended)
    }

    /// RevokeUserSessions: every session of the user ends.
    pub async fn admin_revoke_user_sessions(
        &self,
        actor: &Actor,
        client: &ClientInfo,
        reference: &str,
    ) -> Result<u32, AuthError> {
        let user = self.resolve_user(reference).await?;
        // First in the users table, as DisableUser does: the open-mode check and the
        // user's pending second-factor tickets (made with the password before now) are
        // refused from here on, whatever the session store says.
        self.users
            .end_sessions_before(&user.id, self.clock.unix_seconds())
            .await
            .map_err(users_error)?;
        let ended = self.end_sessions(&user.id).await;
        self.finish(actor, client, &user.id, "RevokeUserSessions", ended)
    }

    /// UnlockUser: the account's failed-attempt counter is forgotten.
    pub async fn admin_unlock_user(
        &self,
        actor: &Actor,
        client: &ClientInfo,
        reference: &str,
    ) -> Result<(), AuthError> {
        let user = self.resolve_user(reference).await?;
        self.throttle
            .unlock_account(&self.names.hash(&user.username))
            .await
            .map_err(sessions_error)?;
        self.audit_admin(actor, client, Some(&user.id), "UnlockUser");
        Ok(())
    }

    /// ResetSecondFactor: the user's TOTP credential and recovery codes are removed (an
    /// operator's way back for a user who lost both). True when one was enabled.
    pub async fn admin_reset_second_factor(
        &self,
        actor: &Actor,
        client: &ClientInfo,
        reference: &str,
    ) -> Result<bool, AuthError> {
        let user = self.resolve_user(reference).await?;
        let removed = self
            .users
            .remove_second_factor(&user.id)
            .await
            .map_err(users_error)?;
        if removed {
            metrics::counter!("authd_second_factor_changes_total", "change" => "reset_by_admin")
                .increment(1);
            self.audit.record(
                AuditEvent::new(AuditKind::MfaDisabled, client)
                    .user(&user.id)
                    .detail("ResetSecondFactor by an administrator"),
            );
        }
        self.audit_admin(actor, client, Some(&user.id), "ResetSecondFactor");
        Ok(removed)
    }

    /// SetRoles: the users table first, then the mirror ValidateToken reads, then an
    /// event that makes callers' caches drop the user's answers. Visible in ValidateToken
    /// as soon as this answers, with no new login.
    pub async fn admin_set_roles(
        &self,
        actor: &Actor,
        client: &ClientInfo,
        reference: &str,
        roles: &[String],
    ) -> Result<UserView, AuthError> {
        let roles =
            roles::parse_roles("roles", roles).map_err(|v| AuthError::InvalidArgument(vec![v]))?;
        let user = self.resolve_user(reference).await?;
        let framed = roles::frame(&roles);
        if roles.iter().any(|r| r == ADMIN_ROLE) {
            self.users
                .set_roles(&user.id, &framed)
                .await
                .map_err(users_error)?;
        } else if self
            .users
            .change_unless_last_admin(&user.id, AdminLoss::SetRoles(&framed))
            .await
            .map_err(users_error)?
            == Guarded::LastAdmin
        {
            return Err(AuthError::LastAdmin);
        }
        let now = self.clock.unix_seconds();
        let pushed = async {
            self.sessions
                .mirror_roles(&user.id, &framed, false, self.rules.token_lifetime)
                .await?;
            self.sessions
                .publish(
                    &Revocation::UserUpdated {
                        user_id: user.id.clone(),
                    },
                    now,
                )
                .await
        }
        .await;
        let what = format!("SetRoles [{}]", roles.join(","));
        if let Err(e) = pushed {
            self.audit_admin(
                actor,
                client,
                Some(&user.id),
                format!(
                    "{what}: stored, NOT yet in force (session store unavailable); run it again"
                ),
            );
            return Err(sessions_error(e));
        }
        self.audit_admin(actor, client, Some(&user.id), what);
        Ok(UserView {
            roles,
            ..UserView::from(&user)
        })
    }

    /// ListUserSessions: a page of the user's live sessions.
    pub async fn admin_list_user_sessions(
        &self,
        actor: &Actor,
        client: &ClientInfo,
        reference: &str,
        page_size: i32,
        page_token: &str,
    ) -> Result<SessionList, AuthError> {
        let limit = page_limit(
            "page_size",
            page_size,
            DEFAULT_SESSIONS_PAGE,
            MAX_SESSIONS_PAGE,
        )?;
        let after = numeric_token("page_token", page_token)?.unwrap_or(0);
        let user = self.resolve_user(reference).await?;
        let page = self
            .sessions
            .list(&user.id, self.clock.unix_seconds(), after, limit)
            .await
            .map_err(sessions_error)?;
        self.audit_admin(actor, client, Some(&user.id), "ListUserSessions");
        Ok(SessionList {
            sessions: page.sessions.into_iter().map(|(_, s)| s).collect(),
            current: String::new(),
            total: page.total,
            next_page_token: page.next_after.map(|n| n.to_string()),
            second_factor_enabled: false,
            recovery: Default::default(),
        })
    }

    /// ListAuditEvents: newest first, filtered by user (id or name; a deleted user's id
    /// still finds its rows), kind and time.
    pub async fn admin_list_audit_events(
        &self,
        actor: &Actor,
        client: &ClientInfo,
        user: &str,
        mut filter: AuditFilter,
        page_size: i32,
        page_token: &str,
    ) -> Result<AuditPage, AuthError> {
        let limit = page_limit("page_size", page_size, DEFAULT_AUDIT_PAGE, MAX_AUDIT_PAGE)?;
        let before =
            numeric_token("page_token", page_token)?.map(|n| i64::try_from(n).unwrap_or(i64::MAX));
        if let Some(kind) = &filter.kind
            && !AuditKind::NAMES.contains(&kind.as_str())
        {
            return Err(AuthError::invalid(
                "kind",
                format!("must be one of {}", AuditKind::NAMES.join(", ")),
            ));
        }
        let user = user.trim();
        if !user.is_empty() {
            filter.user_id = Some(match user_id(user) {
                Some(id) => id,
                None => self.resolve_user(user).await?.id,
            });
        }
        let store = AuditStore::new(self.users.pool().clone());
        let mut events = store
            .list(&filter, before, limit + 1)
            .await
            .map_err(users_error)?;
        let more = events.len() > limit;
        events.truncate(limit);
        let next_page_token = if more {
            events.last().map(|e| e.id.to_string())
        } else {
            None
        };
        self.audit_admin(actor, client, filter.user_id.as_deref(), "ListAuditEvents");
        Ok(AuditPage {
            events,
            next_page_token,
        })
    }
}

/// A revocation of every session of `user_id`.
fn user_revocation(user_id: &str) -> Revocation {
    Revocation::User {
        user_id: user_id.to_owned(),
        except_session_id: String::new(),
    }
}

/// Ends every session of `user_id` and announces it: the count ended.
async fn end_user_sessions(
    sessions: &SessionStore,
    user_id: &str,
    at: i64,
) -> Result<u32, StoreError> {
    let ended = sessions.revoke_others(user_id, "", at).await?;
    sessions.publish(&user_revocation(user_id), at).await?;
    Ok(ended)
}

/// The first retry's wait, and the longest: another instance may be answering from
/// the session store as soon as it is back, so the wait stays short.
const RETRY_FIRST: Duration = Duration::from_millis(200);
/// See [`RETRY_FIRST`].
const RETRY_MAX: Duration = Duration::from_secs(2);

/// Retries the user's pending revocation until it is recorded (or the service is gone).
async fn finish_revocation(
    sessions: Arc<SessionStore>,
    unfinished: Weak<UnfinishedRevocations>,
    audit: Weak<AuditLog>,
    user_id: String,
) {
    let mut wait = RETRY_FIRST;
    let mut failures = 0_u64;
    loop {
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(RETRY_MAX);
        let Some(at) = unfinished.upgrade().and_then(|u| u.pending(&user_id)) else {
            return;
        };
        match end_user_sessions(&sessions, &user_id, at).await {
            Ok(ended) => {
                let Some(pending) = unfinished.upgrade() else {
                    return;
                };
                pending.recorded(&user_id, at);
                tracing::info!(
                    user_id,
                    ended,
                    failures,
                    "user revocation recorded after the session store came back"
                );
                if let Some(audit) = audit.upgrade() {
                    audit.record(
                        AuditEvent::new(AuditKind::AdminAction, &ClientInfo::default())
                            .user(&user_id)
                            .detail(format!(
                                "revocation recorded in the background: {ended} sessions ended"
                            )),
                    );
                }
                if pending.pending(&user_id).is_none() {
                    return;
                }
            }
            Err(e) => {
                failures += 1;
                if failures.is_power_of_two() {
                    tracing::warn!(user_id, failures, error = %e, "user revocation still not recorded; retrying");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bcrypt_hashes_of_every_prefix_are_accepted_and_others_are_not() {
        let body = "$04$n4Uy0eSnMfvnESYL.bLwuuj0U/ETSsoTpRT9GVk5bektyVVa5xnIi";
        for prefix in ["$2a", "$2b", "$2y"] {
            assert!(
                valid_bcrypt_hash(&format!("{prefix}{body}"), 14),
                "{prefix}"
            );
        }
        for bad in [
            format!("$2x{body}"),
            format!("$1${body}"),
            "$2b$04$short".to_owned(),
            format!("$2b$03{}", &body[3..]),
            "$2b$04$n4Uy0eSnMfvnESYL bLwuuj0U/ETSsoTpRT9GVk5bektyVVa5xnIi".to_owned(),
            String::new(),
            // Above the ceiling: a cost-31 hash would take hours to verify.
            format!("$2b$31{}", &body[3..]),
            format!("$2b$15{}", &body[3..]),
        ] {
            assert!(!valid_bcrypt_hash(&bad, 14), "{bad}");
        }
        assert!(valid_bcrypt_hash(&format!("$2b$14{}", &body[3..]), 14));
        assert!(valid_bcrypt_hash(&format!("$2b$15{}", &body[3..]), 15));
    }

    #[test]
    fn only_the_hyphenated_form_is_a_user_id() {
        let id = "0B6C3D5E-0000-4000-8000-000000000001";
        assert_eq!(
            user_id(id).as_deref(),
            Some("0b6c3d5e-0000-4000-8000-000000000001")
        );
        for name in [
            "0b6c3d5e000040008000000000000001",
            "{0b6c3d5e-0000-4000-8000-000000000001}",
            "urn:uuid:0b6c3d5e-0000-4000-8000-000000000001",
            "alice",
            "0b6c3d5e-0000-4000-8000-00000000000g",
        ] {
            assert_eq!(user_id(name), None, "{name}");
        }
    }

    #[test]
    fn page_tokens_are_numbers_an_earlier_page_gave() {
        assert_eq!(numeric_token("t", "").unwrap(), None);
        assert_eq!(numeric_token("t", "42").unwrap(), Some(42));
        for bad in ["-1", "x", "1e3", "99999999999999999999999"] {
            assert!(numeric_token("t", bad).is_err(), "{bad}");
        }
    }
}

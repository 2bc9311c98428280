//! The operations of authd, independent of any transport.

use std::sync::Arc;
use std::time::Duration;

use super::audit::{AuditEvent, AuditKind, AuditLog, NameHasher};
use super::denied::DeniedCoalescer;
use super::hasher::{PasswordHasher, hash_cost};
use super::padding::{self, FailurePadding};
use super::password::{NewPassword, check_size};
use super::refresh::{
    self, MAX_REFRESH_TOKEN_BYTES, Presented, RefreshKey, Seen, Verdict, token_hash,
};
use super::remembered::RememberedRevocations;
use super::throttle::{Attempt, Lockout, Subject, Throttle, address_key};
use super::token::{Claims, Grant, IssuedToken, MAX_TOKEN_BYTES, TokenKeys, random_id};
use super::unfinished::UnfinishedRevocations;
use super::username::{MAX_USERNAME_CHARS, Username};
use super::watchers::{WatchPermit, Watchers};
use super::{AuthError, FieldViolation, InvalidReason, error::Store};
use crate::clock::Clock;
use crate::config::{Config, PasswordPolicy, PasswordPolicyMode, RedisFailureMode, TrustedProxies};
use crate::store::audit::AuditStore;
use crate::store::sessions::revocations::RedisLog;
use crate::store::sessions::{
    Cursor, Event, Feed, NewSession, RefreshState, Revocation, Rotation, SessionRecord,
    SessionState, Touch, blacklist_ttl,
};
use crate::store::users::CreateUserError;
use crate::store::{SessionStore, StoreError, UserStore, truncate};
use second_factor::GivenFactor;

#[path = "admin.rs"]
pub mod admin;
#[path = "second_factor.rs"]
pub mod second_factor;

/// The longest session id accepted, in bytes.
pub const MAX_SESSION_ID_BYTES: usize = 64;
pub use crate::store::MAX_USER_AGENT_BYTES;
/// ValidateToken records activity at most this often per session.
pub const TOUCH_INTERVAL_SECONDS: i64 = 60;

/// Who is calling, as the transport saw it.
#[derive(Debug, Clone, Default)]
pub struct ClientInfo {
    /// The client's IP address (no port).
    pub ip: String,
    /// The client's user agent.
    pub user_agent: String,
}

/// A user just registered.
#[derive(Debug, Clone)]
pub struct Registered {
    /// New user id.
    pub user_id: String,
    /// Canonical username.
    pub username: String,
}

/// A successful login, or a refresh: an access token and the refresh token that
/// follows it.
#[derive(Clone)]
pub struct LoggedIn {
    /// The bearer token.
    pub access_token: String,
    /// Its claims.
    pub claims: Claims,
    /// The refresh token to trade for the next access token.
    pub refresh_token: String,
    /// When the refresh token stops working unless used first (idle expiry).
    pub refresh_expires_at: i64,
    /// When the session ends whatever happens.
    pub session_expires_at: i64,
    /// An operator set the password and asked for a new one.
    pub password_change_required: bool,
}

impl std::fmt::Debug for LoggedIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Neither token is ever printed.
        f.debug_struct("LoggedIn")
            .field("claims", &self.claims)
            .field("refresh_expires_at", &self.refresh_expires_at)
            .field("session_expires_at", &self.session_expires_at)
            .finish_non_exhaustive()
    }
}

/// What a correct password gets: tokens, or, for a user with a second factor, a ticket
/// to complete the login with VerifySecondFactor.
#[derive(Clone)]
pub enum Login {
    /// The session is open.
    Tokens(Box<LoggedIn>),
    /// A second factor is needed first.
    SecondFactorRequired {
        /// The opaque, single-use ticket.
        ticket: String,
        /// When it stops working (unix seconds).
        expires_at: i64,
    },
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The ticket is never printed.
        match self {
            Login::Tokens(done) => f.debug_tuple("Tokens").field(done).finish(),
            Login::SecondFactorRequired { expires_at, .. } => f
                .debug_struct("SecondFactorRequired")
                .field("expires_at", expires_at)
                .finish_non_exhaustive(),
        }
    }
}

/// Rounds of read and compare-and-set a Refresh tries before giving up: each lost
/// round means another call rotated the same session in between, and the next round
/// sees its result (and answers the same successor), so a second loss is already rare.
const REFRESH_ROUNDS: usize = 4;

/// A valid token, with how thoroughly it was checked.
#[derive(Debug, Clone)]
pub struct ValidToken {
    /// What it says.
    pub claims: Claims,
    /// False when the session store could not be asked (open mode).
    pub revocation_checked: bool,
    /// The user's roles now (not at login).
    pub roles: Vec<String>,
}

/// ValidateToken's answer.
// One per call, moved once into the reply: boxing the claims would cost an allocation on
// the hottest path to save bytes of a value that never sits in a collection.
#[expect(
    clippy::large_enum_variant,
    reason = "one per call, moved once; a Box would allocate on every ValidateToken"
)]
#[derive(Debug, Clone)]
pub enum Validation {
    /// Good.
    Valid(ValidToken),
    /// Not good, and why.
    Invalid(InvalidReason),
}

/// A page of the caller's sessions.
#[derive(Debug, Clone)]
pub struct SessionList {
    /// Live sessions of this page, oldest login first.
    pub sessions: Vec<SessionRecord>,
    /// The calling token's session.
    pub current: String,
    /// Live sessions in all.
    pub total: u32,
    /// The token for the next page; `None` on the last.
    pub next_page_token: Option<String>,
    /// The user has a confirmed second factor.
    pub second_factor_enabled: bool,
    /// The recovery codes: how many are left, and the latest use.
    pub recovery: crate::store::users::second_factor::RecoveryStatus,
}

/// ListSessions' page size when the caller names none.
pub const DEFAULT_SESSIONS_PAGE: usize = 20;
/// ListSessions' largest page: 50 sessions with the longest user agent and address
/// fit well inside the default 64 KiB message limit.
pub const MAX_SESSIONS_PAGE: usize = 50;

/// Settings the operations need.
#[derive(Debug, Clone)]
struct Rules {
    idle_timeout: i64,
    max_lifetime: i64,
    reuse_grace: i64,
    max_sessions: u32,
    failure_mode: RedisFailureMode,
    /// `JWT_TTL + JWT_LEEWAY`, in seconds: how long a roles mirror is kept.
    token_lifetime: i64,
    password_policy: PasswordPolicy,
    trusted_proxies: TrustedProxies,
}

/// Register, Login, Logout, ChangePassword, ListSessions, RevokeSession, ValidateToken.
pub struct AuthCore {
    users: UserStore,
    /// Shared with the tasks that finish revocations the store could not record at once.
    sessions: Arc<SessionStore>,
    hasher: PasswordHasher,
    tokens: Arc<TokenKeys>,
    clock: Arc<dyn Clock>,
    rules: Rules,
    /// A hash of a random password at the configured cost: unknown users pay one verify
    /// against it, so response time does not tell which usernames exist.
    dummy_hash: String,
    /// What failed password checks are padded to, so that neither an unknown user nor
    /// the cost of a user's hash shows in the time a failure takes.
    padding: Arc<FailurePadding>,
    throttle: Throttle,
    audit: Arc<AuditLog>,
    names: NameHasher,
    watchers: Watchers,
    /// Revocations made here or seen on the stream, for open mode.
    remembered: Arc<RememberedRevocations>,
    /// At most one `admin_denied` row per caller per minute.
    denied: Arc<DeniedCoalescer>,
    /// User-wide revocations not recorded in the session store yet: refused here.
    unfinished: Arc<UnfinishedRevocations>,
    /// Second-factor tickets, beside the sessions.
    tickets: crate::store::mfa::MfaTickets,
    /// The key that seals TOTP secrets; `None` when none is configured (MySQL).
    totp_box: Option<super::totp::SecretBox>,
    /// The issuer authenticator apps show.
    totp_issuer: String,
}

impl Drop for AuthCore {
    fn drop(&mut self) {
        // The refusals counted in windows still open are written before the audit
        // queue closes.
        for row in self.denied.drain() {
            self.audit.record(row);
        }
    }
}

impl std::fmt::Debug for AuthCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthCore")
            .field("rules", &self.rules)
            .finish_non_exhaustive()
    }
}

impl AuthCore {
    /// Puts the parts together; hashes the dummy password on the pool.
    pub async fn new(
        config: &Config,
        users: UserStore,
        mut sessions: SessionStore,
        hasher: PasswordHasher,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, AuthError> {
        if config.session_cache.enabled {
            sessions.enable_cache(&config.session_cache);
            tracing::info!(
                ttl = ?config.session_cache.ttl,
                max_entries = config.session_cache.max_entries,
                "session cache on: live-session answers are reused for up to the TTL while the revocation log is followed"
            );
        }
        // Made once at start-up, outside the queue (which may be sized 0); its time is the
        // first estimate of a verify's.
        let cost = hasher.cost();
        let (dummy_hash, took) = tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            bcrypt::hash(random_id(), cost).map(|h| (h, started.elapsed()))
        })
        .await
        .map_err(|e| AuthError::Internal(e.into()))?
        .map_err(|e| AuthError::Internal(e.into()))?;
        let padding = Arc::new(FailurePadding::new(cost, took));
        refresh_max_cost(&users, &padding).await;
        tokio::spawn(keep_max_cost_fresh(users.clone(), Arc::downgrade(&padding)));
        let throttle = Throttle::new(&config.throttle, sessions.throttle_store());
        let remembered = Arc::new(RememberedRevocations::new(
            config.revocation_memory_max,
            seconds(config.jwt.ttl + config.jwt.leeway),
        ));
        if let Some(log) = sessions.redis_log() {
            tokio::spawn(remember_from_stream(
                Arc::clone(log),
                Arc::downgrade(&remembered),
                Arc::clone(&clock),
            ));
        }
        let enrolled = users.count_totp_credentials().await.map_err(users_error)?;
        let totp_box = second_factor::secret_box(&config.second_factor.key, enrolled)
            .map_err(AuthError::Internal)?;
        if let Some(key) = &totp_box {
            // A different key than the one the secrets were sealed under would lock every
            // enrolled user out at their next code: refuse to start instead.
            let stored = users.any_sealed_totp_secret().await.map_err(users_error)?;
            if let Some((user_id, sealed)) = stored
                && key.open(&user_id, &sealed).is_err()
            {
                return Err(AuthError::Internal(anyhow::anyhow!(
                    "TOTP_ENCRYPTION_KEY does not open the second factors stored in the users \
                     database: it is not the key they were sealed under"
                )));
            }
        }
        let tickets = sessions.mfa_tickets();
        let audit = Arc::new(AuditLog::start(
            AuditStore::new(users.pool().clone()),
            &config.audit,
            Arc::clone(&clock),
        ));
        let denied = Arc::new(DeniedCoalescer::new(super::denied::DEFAULT_CAPACITY));
        tokio::spawn(close_denied_windows(
            Arc::downgrade(&denied),
            Arc::downgrade(&audit),
            Arc::clone(&clock),
        ));
        Ok(Self {
            users,
            sessions: Arc::new(sessions),
            hasher,
            tokens: Arc::clone(&config.keys),
            clock,
            rules: Rules {
                idle_timeout: seconds(config.session_idle_timeout),
                max_lifetime: seconds(config.refresh.session_max_lifetime),
                reuse_grace: seconds(config.refresh.reuse_grace),
                max_sessions: config.max_sessions_per_user,
                failure_mode: config.sessions.failure_mode(),
                token_lifetime: seconds(config.jwt.ttl + config.jwt.leeway),
                password_policy: config.password_policy,
                trusted_proxies: config.trusted_proxies.clone(),
            },
            dummy_hash,
            padding,
            throttle,
            audit,
            names: NameHasher::new(&config.name_hash_key),
            watchers: Watchers::new(&config.watchers),
            remembered,
            denied,
            unfinished: Arc::default(),
            tickets,
            totp_box,
            totp_issuer: config.second_factor.issuer.clone(),
        })
    }

    /// The callers allowed to set Login's `client_ip`.
    pub fn trusted_proxies(&self) -> &TrustedProxies {
        &self.rules.trusted_proxies
    }

    /// The public keys that verify tokens now (none for HS256), for the JWKS document.
    pub fn jwks(&self) -> jsonwebtoken::jwk::JwkSet {
        self.tokens.jwks(self.clock.unix_seconds())
    }

    /// The `iss` tokens carry.
    pub fn issuer(&self) -> &str {
        self.tokens.issuer()
    }

    /// The algorithm new tokens are signed with.
    pub fn signing_algorithm(&self) -> &'static str {
        self.tokens.algorithm_name()
    }

    /// The session store, for health checks.
    pub fn session_store(&self) -> &SessionStore {
        &self.sessions
    }

    /// Creates a user. Register calls are rationed per client address, and a name that
    /// is taken is answered before any hashing.
    pub async fn register(
        &self,
        username: &str,
        password: &str,
        client: ClientInfo,
    ) -> Result<Registered, AuthError> {
        let share = self.pool_share(&client);
        if share.is_some() {
            // Users live in the database: Register keeps working while the counters'
            // store is down, held back only by the address's share of the hashing pool.
            match self
                .throttle
                .admit_registration(&client.ip, self.clock.unix_millis())
                .await
            {
                Err(AuthError::Unavailable { source, .. }) => {
                    tracing::warn!(error = %source, "Register not rationed: the throttle's store is unavailable");
                }
                admitted => admitted?,
            }
        }
        let mut violations = Vec::new();
        let raw_username = username;
        let username = Username::parse(username)
            .map_err(|v| violations.push(v))
            .ok();
        // Register says ALREADY_EXISTS anyway, so looking first reveals nothing more, and
        // a taken name costs no hash. The insert's unique key still settles races.
        if let Some(name) = &username
            && self
                .users
                .find_by_username(name.as_str())
                .await
                .map_err(users_error)?
                .is_some()
        {
            return Err(AuthError::UsernameTaken);
        }
        let password = self
            .check_new_password(share.as_deref(), "password", password, raw_username.trim())
            .await?
            .map_err(|v| violations.extend(v))
            .ok();
        let (Some(username), Some(password)) = (username, password) else {
            return Err(AuthError::InvalidArgument(violations));
        };
        let hash = self
            .hasher
            .hash(share.as_deref(), password.expose())
            .await?;
        let user_id = uuid::Uuid::new_v4().to_string();
        match self.users.create(&user_id, username.as_str(), &hash).await {
            Ok(()) => {}
            Err(CreateUserError::UsernameTaken) => return Err(AuthError::UsernameTaken),
            Err(CreateUserError::Store(e)) => return Err(users_error(e)),
        }
        tracing::info!(user_id = %user_id, "user registered");
        Ok(Registered {
            user_id,
            username: username.as_str().to_owned(),
        })
    }

    /// The share of the hashing pool `client`'s jobs count against: its address, or
    /// none for a caller in `TRUSTED_PROXIES` speaking for many users (a gateway that
    /// rations its own clients). Such a caller's Registers are not rationed either.
    fn pool_share(&self, client: &ClientInfo) -> Option<String> {
        let trusted = client
            .ip
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| self.rules.trusted_proxies.trusts(ip.to_canonical()));
        (!trusted).then(|| address_key(&client.ip))
    }

    /// The policy's verdict on a new password. `nist` mode's zxcvbn estimate can take
    /// seconds of CPU on a crafted 72-byte password (each distinct l33t character
    /// multiplies its work), so it runs on the hashing pool — bounded, shed when full,
    /// in the caller's share — and never blocks an async worker. `classic` mode is cheap
    /// and runs here.
    async fn check_new_password(
        &self,
        share: Option<&str>,
        field: &'static str,
        password: &str,
        username: &str,
    ) -> Result<Result<NewPassword, Vec<FieldViolation>>, AuthError> {
        let policy = self.rules.password_policy;
        if policy.mode == PasswordPolicyMode::Classic {
            return Ok(NewPassword::parse(field, password, &policy, &[username]));
        }
        let (password, username) = (password.to_owned(), username.to_owned());
        self.hasher
            .run(share, move || {
                NewPassword::parse(field, &password, &policy, &[&username])
            })
            .await
    }

    /// Checks a password and opens a session. Unknown user, wrong password and empty
    /// password are one error, after the same time (see [`FailurePadding`]). An account
    /// or address that must wait is refused before any lookup or bcrypt, alike whether
    /// it exists; every other attempt is counted before its password is checked.
    pub async fn login(
        &self,
        username: &str,
        password: &str,
        client: ClientInfo,
    ) -> Result<Login, AuthError> {
        // Case and padding variants of a name are one account, also to the throttle;
        // the padding does not count towards the size limit.
        if username.trim().chars().count() > MAX_USERNAME_CHARS {
            return Err(AuthError::invalid(
                "username",
                format!("must be at most {MAX_USERNAME_CHARS} characters"),
            ));
        }
        check_size("password", password).map_err(|v| AuthError::InvalidArgument(vec![v]))?;
        let canonical = Username::canonical(username);
        let name_hash = self.names.hash(&canonical);
        let who = Subject::new(&name_hash, &client.ip);
        let attempt = self
            .admit(&who, "login", || {
                AuditEvent::new(AuditKind::Throttled, &client).username_hash(&name_hash)
            })
            .await?;

        let checked = async {
            // The bcrypt slot comes before the lookup: under a storm a shed Login costs no
            // database query, and admitted ones do not pile up on the pool. Known and
            // unknown users take it alike, so the refusal says nothing about which names
            // exist.
            let slot = self.hasher.reserve(self.pool_share(&client).as_deref())?;
            let user = match Username::parse(&canonical) {
                Ok(name) => self
                    .users
                    .find_by_username(name.as_str())
                    .await
                    .map_err(users_error)?,
                Err(_) => None,
            };
            let stored = user
                .as_ref()
                .map_or(self.dummy_hash.as_str(), |u| u.password_hash.as_str());
            let hash = self.verifiable(stored);
            let cost = hash_cost(hash);
            if let Some(cost) = cost {
                self.padding.saw_stored_cost(cost);
            }
            let (matches, took) = slot.verify_timed(password, hash).await?;
            if let Some(cost) = cost {
                self.padding.observe(cost, took);
            }
            let matches = matches && hash == stored;
            Ok::<_, AuthError>((user, matches, took))
        };
        let (user, matches, took) = match checked.await {
            Ok(checked) => checked,
            Err(e) => {
                // No password was checked: the attempt is no guess.
                self.settle(&who, attempt, Settle::Withdraw).await;
                return Err(e);
            }
        };
        let user = match user {
            Some(user) if matches && !password.is_empty() && user.disabled => {
                // The right password of a disabled account: saying so is clearer to its
                // owner than a wrong-password answer, and tells a guesser nothing a
                // wrong password would not (the account is closed to them either way).
                self.settle(&who, attempt, Settle::Succeeded).await;
                self.audit.record(
                    AuditEvent::new(AuditKind::LoginFailed, &client)
                        .user(&user.id)
                        .username_hash(&name_hash)
                        .detail("account disabled"),
                );
                return Err(AuthError::AccountDisabled);
            }
            Some(user) if matches && !password.is_empty() => user,
            user => {
                metrics::counter!("authd_logins_total", "outcome" => "failure").increment(1);
                let event = |kind| {
                    let e = AuditEvent::new(kind, &client).username_hash(&name_hash);
                    match &user {
                        Some(u) => e.user(&u.id),
                        None => e,
                    }
                };
                self.audit
                    .record(event(AuditKind::LoginFailed).detail(if user.is_some() {
                        "wrong password"
                    } else {
                        "unknown user"
                    }));
                self.record_lockouts(&attempt, |lockout| {
                    event(AuditKind::Lockout).detail(lockout)
                });
                // An async sleep, not a hashing thread: padding costs no CPU.
                tokio::time::sleep(self.padding.padding(took)).await;
                return Err(AuthError::InvalidCredentials);
            }
        };
        self.settle(&who, attempt, Settle::Succeeded).await;
        // Read only once the password is right: a wrong password costs the same whether
        // or not the user has a second factor.
        if self.second_factor_of(&user.id).await?.is_some() {
            let ticket = self.second_factor_ticket(&user, &client).await?;
            // The password was just verified: its hash is upgraded here, as on the
            // tokens branch (VerifySecondFactor has no password to rehash with).
            self.rehash_at_configured_cost(&client, &user.id, &user.password_hash, password)
                .await;
            return Ok(ticket);
        }
        let done = self
            .open_session(&user, random_id(), PASSWORD_AMR, &client, &name_hash)
            .await?;
        self.rehash_at_configured_cost(&client, &user.id, &user.password_hash, password)
            .await;
        Ok(Login::Tokens(Box::new(done)))
    }

    /// Opens a session for `user`, whose password (and second factor, by `amr`) was
    /// checked: issues its access and refresh tokens, records it, and ends the sessions
    /// past the limit.
    pub(crate) async fn open_session(
        &self,
        user: &crate::store::User,
        session_id: String,
        amr: &str,
        client: &ClientInfo,
        name_hash: &str,
    ) -> Result<LoggedIn, AuthError> {
        let now = self.clock.unix_seconds();
        let absolute_end = now.saturating_add(self.rules.max_lifetime);
        let issued = self.tokens.issue_grant(Grant {
            user_id: &user.id,
            username: &user.username,
            session_id: &session_id,
            jti: random_id(),
            iat: now,
            not_after: absolute_end,
            auth_time: now,
            amr: amr.split_whitespace().map(str::to_owned).collect(),
        })?;
        let refresh_key = RefreshKey::generate();
        let refresh_token = refresh_key.first(&user.id, &session_id);
        let idle_expires_at = now.saturating_add(self.rules.idle_timeout);
        let evicted = self
            .sessions
            .create(
                &NewSession {
                    user_id: &user.id,
                    session_id: &session_id,
                    jti: &issued.claims.jti,
                    now,
                    idle_expires_at,
                    token_expires_at: issued.claims.exp,
                    absolute_end,
                    ip: &client.ip,
                    user_agent: truncate(&client.user_agent, MAX_USER_AGENT_BYTES),
                    username: &user.username,
                    amr,
                    refresh_key: &refresh_key.to_hex(),
                    refresh_hash: &token_hash(&refresh_token),
                },
                self.rules.max_sessions,
            )
            .await
            .map_err(sessions_error)?;
        let user = match self.recheck_after_login(&user.id, &session_id, now).await {
            Ok(user) => user,
            Err(e) => {
                self.audit.record(
                    AuditEvent::new(AuditKind::LoginFailed, client)
                        .user(&user.id)
                        .username_hash(name_hash)
                        .session(&session_id)
                        .detail(match &e {
                            AuthError::AccountDisabled => "disabled during login; session ended",
                            AuthError::InvalidCredentials => "deleted during login; session ended",
                            _ => "user not read again after login; session ended",
                        }),
                );
                return Err(e);
            }
        };
        if !evicted.is_empty() {
            tracing::info!(user_id = %user.id, ended = evicted.len(), "oldest sessions ended: MAX_SESSIONS_PER_USER");
        }
        for ended in evicted {
            self.audit.record(
                AuditEvent::new(AuditKind::SessionRevoked, client)
                    .user(&user.id)
                    .session(&ended)
                    .detail("MAX_SESSIONS_PER_USER"),
            );
            self.announce(
                Revocation::Session {
                    user_id: user.id.clone(),
                    session_id: ended,
                },
                now,
            )
            .await;
        }
        metrics::counter!("authd_logins_total", "outcome" => "success").increment(1);
        tracing::info!(user_id = %user.id, jti = %issued.claims.jti, session_id = %session_id, amr, "login");
        self.audit.record(
            AuditEvent::new(AuditKind::LoginSucceeded, client)
                .user(&user.id)
                .username_hash(name_hash)
                .session(&session_id)
                .jti(&issued.claims.jti),
        );
        Ok(LoggedIn {
            access_token: issued.token,
            claims: issued.claims,
            refresh_token,
            refresh_expires_at: idle_expires_at.min(absolute_end),
            session_expires_at: absolute_end,
            password_change_required: user.password_change_required,
        })
    }

    /// Trades a refresh token for a new access token and its successor (docs/design.md
    /// §10). The current token rotates once, however many calls present it at once; the
    /// previous one gets the same successor again when the rotation overlapped the call
    /// (this call lost the compare-and-set to it, or it is within the grace or the race
    /// window); an older one, or the previous one after that, ends the session as stolen. A token that is not the session's (forged, or of an ended
    /// session) is refused and changes nothing. A refusal of what might be a guess (no
    /// shape, a failing tag, no live session) counts against the address; a token made
    /// for a live session is never locked out. Needs the session store: without it,
    /// UNAVAILABLE, and nothing rotates.
    pub async fn refresh(
        &self,
        refresh_token: &str,
        client: ClientInfo,
    ) -> Result<LoggedIn, AuthError> {
        if refresh_token.is_empty() {
            return Err(AuthError::invalid("refresh_token", "must not be empty"));
        }
        if refresh_token.len() > MAX_REFRESH_TOKEN_BYTES {
            return Err(AuthError::invalid(
                "refresh_token",
                format!("must be at most {MAX_REFRESH_TOKEN_BYTES} bytes"),
            ));
        }
        let presented = refresh::parse(refresh_token);
        // The throttle's look and the session's read go together: one round trip's time.
        let (admitted, state) = tokio::join!(
            self.throttle
                .admit_refresh(&client.ip, self.clock.unix_millis()),
            async {
                match &presented {
                    Some(p) => {
                        self.sessions
                            .refresh_state(p.user_id, p.session_id, self.clock.unix_seconds())
                            .await
                    }
                    None => Ok(None),
                }
            }
        );
        // A token made for a live session is let through a locked address: it cannot
        // be a guess, and the lock is there for guesses (a shared address's stale or
        // garbage tokens must not lock its honest clients out).
        let genuine = match (&presented, &state) {
            (Some(p), Ok(s)) => refresh::genuine(p, s.as_ref(), self.clock.unix_seconds()),
            _ => false,
        };
        match admitted {
            Err(AuthError::Throttled { .. }) if genuine => {}
            Err(AuthError::Throttled { retry_after }) => {
                tracing::info!(retry_after = ?retry_after, "Refresh refused unchecked: too many bad refresh tokens");
                self.audit.record(
                    AuditEvent::new(AuditKind::Throttled, &client).detail(format!(
                        "refresh; retry after {}ms",
                        retry_after.as_millis()
                    )),
                );
                return Err(AuthError::Throttled { retry_after });
            }
            admitted => admitted?,
        }
        let Some(presented) = presented else {
            tracing::info!("refresh token refused: not one in shape");
            return Err(self.refresh_refused(&client, true).await);
        };
        if self.unfinished.pending(presented.user_id).is_some() {
            // The user's sessions are being ended (see `unfinished`): none is renewed.
            return Err(self.refresh_refused(&client, false).await);
        }
        let mut state = state.map_err(sessions_error)?;
        let mut seen = Seen::First;
        for _ in 0..REFRESH_ROUNDS {
            let now = self.clock.unix_seconds();
            let Some(s) = state.as_ref() else {
                // The ids come from the unverified token (checked to be short and
                // plain): they say what was claimed, not who called.
                tracing::info!(
                    claimed_user_id = presented.user_id,
                    claimed_session_id = presented.session_id,
                    "refresh token of no live session"
                );
                return Err(self.refresh_refused(&client, true).await);
            };
            match refresh::judge(&presented, Some(s), now, self.rules.reuse_grace, seen) {
                Verdict::Invalid => {
                    tracing::info!(
                        claimed_user_id = presented.user_id,
                        claimed_session_id = presented.session_id,
                        "refresh token refused"
                    );
                    // Only a token that might be a guess counts against the address.
                    let count = !refresh::genuine(&presented, Some(s), now);
                    return Err(self.refresh_refused(&client, count).await);
                }
                Verdict::Reused => return Err(self.refresh_reused(&client, &presented, now).await),
                Verdict::Replay { successor } => {
                    crate::telemetry::record_user_id(presented.user_id);
                    metrics::counter!("authd_refreshes_total", "outcome" => "replay").increment(1);
                    // A retry or a parallel call of the owner's, as a rule: nothing
                    // to raise an eyebrow at, so not at info.
                    tracing::debug!(
                        user_id = presented.user_id,
                        session_id = presented.session_id,
                        lost_race = seen == Seen::LostRace,
                        "refresh replayed: same successor"
                    );
                    let issued = self.issue_refreshed(&presented, s, &successor, s.rotated_at)?;
                    return Ok(refreshed(issued, successor, s, s.idle_expires_at));
                }
                Verdict::Rotate { successor } => {
                    crate::telemetry::record_user_id(presented.user_id);
                    let issued = self.issue_refreshed(&presented, s, &successor, now)?;
                    let idle_expires_at = now.saturating_add(self.rules.idle_timeout);
                    let recorded = self
                        .sessions
                        .rotate(&Rotation {
                            user_id: presented.user_id,
                            session_id: presented.session_id,
                            expected: &s.current,
                            next: &token_hash(&successor),
                            generation: presented.generation.saturating_add(1),
                            now,
                            jti: &issued.claims.jti,
                            token_expires_at: issued.claims.exp,
                            idle_expires_at,
                        })
                        .await
                        .map_err(sessions_error)?;
                    if recorded {
                        metrics::counter!("authd_refreshes_total", "outcome" => "rotated")
                            .increment(1);
                        tracing::debug!(
                            user_id = presented.user_id,
                            session_id = presented.session_id,
                            generation = presented.generation.saturating_add(1),
                            "refresh token rotated"
                        );
                        return Ok(refreshed(issued, successor, s, idle_expires_at));
                    }
                    // Another call rotated (or ended) the session first, after this
                    // one read the token as current: judge again against what it
                    // recorded, as the loser of that race (never as a late replay,
                    // whatever the grace or this instance's clock).
                    seen = Seen::LostRace;
                    state = self
                        .sessions
                        .refresh_state(presented.user_id, presented.session_id, now)
                        .await
                        .map_err(sessions_error)?;
                }
            }
        }
        Err(AuthError::Unavailable {
            store: Store::Sessions,
            source: anyhow::anyhow!(
                "refresh: the session changed under every one of {REFRESH_ROUNDS} rounds"
            ),
        })
    }

    /// The access token that goes with refresh token `successor`: its `jti` derived
    /// from it, issued at `iat` (the rotation's time), never past the session's end,
    /// with the login's `auth_time` and `amr`. Every call that gets `successor` gets
    /// this token.
    fn issue_refreshed(
        &self,
        presented: &Presented<'_>,
        s: &RefreshState,
        successor: &str,
        iat: i64,
    ) -> Result<IssuedToken, AuthError> {
        let key = RefreshKey::from_hex(&s.key).ok_or_else(|| {
            AuthError::Internal(anyhow::anyhow!("a session's refresh key is malformed"))
        })?;
        self.tokens.issue_grant(Grant {
            user_id: presented.user_id,
            username: &s.username,
            session_id: presented.session_id,
            jti: key.access_jti(successor),
            iat,
            not_after: s.ends_at,
            auth_time: s.login_time,
            amr: s.amr.split_whitespace().map(str::to_owned).collect(),
        })
    }

    /// A refresh token that is not good: refused, and with `count` (it might be a
    /// guess: unparseable, its tag failing, or of no live session) counted against the
    /// address. Nothing else changes.
    async fn refresh_refused(&self, client: &ClientInfo, count: bool) -> AuthError {
        metrics::counter!("authd_refreshes_total", "outcome" => "refused").increment(1);
        if count {
            self.count_bad_refresh(client).await;
        }
        AuthError::RefreshRefused { reused: false }
    }

    /// An older refresh token of a live session: someone holds a token that was already
    /// traded, so the session is ended at once, announced, audited, and the call refused.
    async fn refresh_reused(
        &self,
        client: &ClientInfo,
        presented: &Presented<'_>,
        now: i64,
    ) -> AuthError {
        metrics::counter!("authd_refreshes_total", "outcome" => "reused").increment(1);
        let (user_id, session_id) = (presented.user_id, presented.session_id);
        let ended = match self.sessions.revoke(user_id, session_id, now).await {
            Ok(ended) => ended,
            // Not recorded, so not reported as done: the caller may retry.
            Err(e) => return sessions_error(e),
        };
        crate::telemetry::record_user_id(user_id);
        if ended {
            self.announce(
                Revocation::Session {
                    user_id: user_id.to_owned(),
                    session_id: session_id.to_owned(),
                },
                now,
            )
            .await;
            tracing::warn!(
                user_id,
                session_id,
                generation = presented.generation,
                "refresh token reuse detected: session ended"
            );
            self.audit.record(
                AuditEvent::new(AuditKind::RefreshReuseDetected, client)
                    .user(user_id)
                    .session(session_id)
                    .detail(format!("generation {} presented", presented.generation)),
            );
        }
        // Not counted against the address: the token's tag held, so it is no guess.
        AuthError::RefreshRefused { reused: true }
    }

    /// Counts a bad refresh token against the caller's address; records the lockout
    /// it caused. A counter that cannot be written is logged, and the refusal stands.
    async fn count_bad_refresh(&self, client: &ClientInfo) {
        let counted = self
            .throttle
            .refresh_failed(&client.ip, self.clock.unix_millis())
            .await;
        self.record_address_lockout(client, counted, "Refresh", "refresh", "refresh tokens");
    }

    /// Records the lockout that a bad `what` (refresh tokens, tickets) counted against
    /// the caller's address caused, so that `call` from it must wait; the audit row
    /// names the address's `counter`. A counter that cannot be written is logged, and
    /// the refusal stands.
    pub(super) fn record_address_lockout(
        &self,
        client: &ClientInfo,
        counted: Result<Option<Lockout>, StoreError>,
        call: &'static str,
        counter: &str,
        what: &'static str,
    ) {
        match counted {
            Ok(Some(Lockout { failures, wait, .. })) => {
                tracing::info!(call, failures, wait = ?wait, "lockout: calls from this address must wait");
                self.audit
                    .record(AuditEvent::new(AuditKind::Lockout, client).detail(format!(
                        "{counter} address after {failures} bad {what}; wait {}ms",
                        wait.as_millis()
                    )));
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, what, "bad credential not counted"),
        }
    }

    /// Counts an attempt against `who` before its password is checked, or `Throttled`
    /// (recorded as such) while `who` must wait.
    async fn admit(
        &self,
        who: &Subject,
        call: &str,
        throttled: impl FnOnce() -> AuditEvent,
    ) -> Result<Attempt, AuthError> {
        let admitted = self.throttle.admit(who, self.clock.unix_millis()).await;
        if let Err(AuthError::Throttled { retry_after }) = &admitted {
            tracing::info!(retry_after = ?retry_after, "refused unchecked: too many failed attempts");
            self.audit.record(
                throttled().detail(format!("{call}; retry after {}ms", retry_after.as_millis())),
            );
        }
        admitted
    }

    /// A failed attempt keeps its count; records each lockout it caused.
    fn record_lockouts(&self, attempt: &Attempt, lockout: impl Fn(String) -> AuditEvent) {
        for Lockout {
            scope,
            failures,
            wait,
        } in self.throttle.lockouts(attempt)
        {
            tracing::info!(scope = scope.as_str(), failures, wait = ?wait, "lockout: attempts must wait");
            self.audit.record(lockout(format!(
                "{} after {failures} failures; wait {}ms",
                scope.as_str(),
                wait.as_millis()
            )));
        }
    }

    /// Gives back an attempt that was no failure. A counter that cannot be written is
    /// logged: it then counts one attempt too many until its window ends, which errs on
    /// the safe side.
    async fn settle(&self, who: &Subject, attempt: Attempt, how: Settle) {
        let now = self.clock.unix_millis();
        let settled = match how {
            Settle::Succeeded => self.throttle.succeeded(who, attempt, now).await,
            Settle::Withdraw => self.throttle.withdraw(who, attempt, now).await,
        };
        if let Err(e) = settled {
            tracing::warn!(error = %e, "attempt count not given back");
        }
    }

    /// The hash to verify a password against in place of `stored`: `stored` itself, or
    /// the dummy hash when `stored` costs more than the ceiling (see
    /// [`padding::cost_ceiling`]), which would hold a hashing worker for minutes to
    /// hours. Such a row cannot be written through authd; one written behind its back
    /// never matches (an admin sets a new password), and costs a normal verify.
    fn verifiable<'a>(&'a self, stored: &'a str) -> &'a str {
        match hash_cost(stored) {
            Some(cost) if cost > self.padding.ceiling() => {
                tracing::warn!(
                    cost,
                    ceiling = self.padding.ceiling(),
                    "a stored password hash costs more than the ceiling; it is not verified"
                );
                self.dummy_hash.as_str()
            }
            _ => stored,
        }
    }

    /// Rehashes at `BCRYPT_COST` a password whose stored hash has another cost: cheaper
    /// ones are upgraded, and costlier ones (an import, or `BCRYPT_COST` lowered) come
    /// down, so the costliest stored hash, which every failed check is padded to, goes
    /// with them. Failure only delays this to the next login.
    async fn rehash_at_configured_cost(
        &self,
        client: &ClientInfo,
        user_id: &str,
        old_hash: &str,
        password: &str,
    ) {
        if hash_cost(old_hash).is_none_or(|cost| cost == self.hasher.cost()) {
            return;
        }
        let share = self.pool_share(client);
        let rehashed = match self.hasher.hash(share.as_deref(), password).await {
            Ok(new_hash) => self.users.upgrade_hash(user_id, old_hash, &new_hash).await,
            Err(e) => {
                tracing::debug!(user_id, error = %e, "password rehash deferred");
                return;
            }
        };
        match rehashed {
            Ok(true) => tracing::info!(user_id, "password rehashed at the configured cost"),
            Ok(false) => {}
            Err(e) => tracing::warn!(user_id, error = %e, "password rehash failed"),
        }
    }

    /// Revokes the bearer token and ends its session. A correctly signed token that was
    /// already revoked is fine — Logout is idempotent — and records nothing: only the
    /// first revocation is an event, an audit row and a log line, so repeating a Logout
    /// cannot flood the revocation log or the audit trail.
    pub async fn logout(&self, bearer: Option<&str>, client: ClientInfo) -> Result<(), AuthError> {
        let token = bearer_token(bearer)?;
        let now = self.clock.unix_seconds();
        let claims = self
            .tokens
            .verify(token, now)
            .map_err(|_| AuthError::Unauthenticated)?;
        crate::telemetry::record_user_id(&claims.sub);
        let ttl = blacklist_ttl(claims.exp, now, self.tokens.leeway_seconds());
        let revocation = Revocation::Token {
            user_id: claims.sub.clone(),
            session_id: claims.sid.clone(),
            jti: claims.jti.clone(),
        };
        // Remembered before it is recorded: should the store record it and its answer be
        // lost, open mode here refuses the token all the same (the safe side).
        self.remembered.remember(&revocation, now);
        let logged_out = self
            .sessions
            .logout(
                &claims.sub,
                &claims.sid,
                &claims.jti,
                self.clock.unix_millis(),
                ttl,
            )
            .await
            .map_err(sessions_error)?;
        let Some(refreshed) = logged_out else {
            tracing::debug!(user_id = %claims.sub, jti = %claims.jti, "logout of a token already revoked");
            return Ok(());
        };
        self.announce(revocation, now).await;
        if refreshed {
            // The session held a second access token (the one before or after a
            // Refresh): caches must drop that one too.
            self.announce(
                Revocation::Session {
                    user_id: claims.sub.clone(),
                    session_id: claims.sid.clone(),
                },
                now,
            )
            .await;
        }
        tracing::info!(user_id = %claims.sub, jti = %claims.jti, "logout");
        self.audit.record(
            AuditEvent::new(AuditKind::Logout, &client)
                .user(&claims.sub)
                .session(&claims.sid)
                .jti(&claims.jti),
        );
        Ok(())
    }

    /// Replaces the password and ends every other session of the user.
    ///
    /// The current password is checked against the hash read, and the new hash takes its
    /// place only if that hash is still the stored one (one conditional update, which
    /// also moves `sessions_valid_after`): of concurrent changes exactly one wins, and
    /// the others, whose current password is no longer current, answer PERMISSION_DENIED
    /// and revoke nothing. The winner then ends every session but its own, and announces
    /// it. Should the session store fail at that point, the password has changed but the
    /// other sessions may still be live in it, so the call answers UNAVAILABLE, never
    /// OK: a revocation not recorded is not reported as done. Meanwhile the moved
    /// `sessions_valid_after` refuses the old tokens wherever Redis cannot be asked
    /// (open mode); calling again with the new password as the current one ends them.
    pub async fn change_password(
        &self,
        bearer: Option<&str>,
        current_password: &str,
        new_password: &str,
        factor: &GivenFactor,
        client: ClientInfo,
    ) -> Result<u32, AuthError> {
        let claims = self.authenticate(bearer).await?;
        let share = self.pool_share(&client);
        let mut violations = Vec::new();
        if let Err(v) = check_size("current_password", current_password) {
            violations.push(v);
        }
        let new_password = self
            .check_new_password(
                share.as_deref(),
                "new_password",
                new_password,
                &claims.username,
            )
            .await?
            .map_err(|v| violations.extend(v))
            .ok();
        let Some(new_password) = new_password.filter(|_| violations.is_empty()) else {
            return Err(AuthError::InvalidArgument(violations));
        };
        // A code must be given before the current password is checked (a token thief
        // without one learns nothing), but is used up only once the password is right:
        // a mistyped password does not burn it.
        let step_up = self
            .step_up_given(&claims, factor, "ChangePassword")
            .await?;
        let user = self
            .check_current_password(
                &claims,
                current_password,
                &client,
                share.as_deref(),
                "change_password",
                (AuditKind::PasswordChangeFailed, "wrong current password"),
            )
            .await?;
        let name_hash = self.names.hash(&claims.username);
        let event = |kind| {
            AuditEvent::new(kind, &client)
                .user(&claims.sub)
                .username_hash(&name_hash)
                .session(&claims.sid)
                .jti(&claims.jti)
        };
        if let Some(cred) = &step_up {
            self.step_up_check(&claims, cred, factor, &client, "ChangePassword")
                .await?;
        }
        let new_hash = self
            .hasher
            .hash(share.as_deref(), new_password.expose())
            .await?;

        let now = self.clock.unix_seconds();
        let changed = self
            .users
            .change_password(&user.id, &user.password_hash, &new_hash, now)
            .await
            .map_err(users_error)?;
        if !changed {
            // Another change won the race: this one's current password is not current
            // any more, and it revokes nothing.
            tracing::info!(user_id = %user.id, "password change refused: another change came first");
            self.audit
                .record(event(AuditKind::PasswordChangeFailed).detail("another change came first"));
            return Err(AuthError::WrongCurrentPassword);
        }
        // Only the winner gets here. A login that checked the old password before the
        // swap has had its session created by now, or is so close to it that this sweep
        // is the best place to end it.
        let revoked = match self
            .sessions
            .revoke_others(&user.id, &claims.sid, now)
            .await
        {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(user_id = %user.id, error = %e, "password changed, but the other sessions could not be ended");
                self.audit.record(
                    event(AuditKind::PasswordChanged)
                        .detail("other sessions NOT ended: session store unavailable"),
                );
                return Err(sessions_error(e));
            }
        };
        self.announce(
            Revocation::User {
                user_id: user.id.clone(),
                except_session_id: claims.sid.clone(),
            },
            now,
        )
        .await;
        tracing::info!(user_id = %user.id, jti = %claims.jti, revoked_sessions = revoked, "password changed");
        self.audit.record(
            event(AuditKind::PasswordChanged).detail(format!("{revoked} other sessions ended")),
        );
        Ok(revoked)
    }

    /// The caller's user row, once `current_password` is checked against it: counted
    /// against the same account as failed logins, and before it is checked, like them.
    /// A wrong (or empty) one is audited as `failed` and answers
    /// [`AuthError::WrongCurrentPassword`].
    async fn check_current_password(
        &self,
        claims: &Claims,
        current_password: &str,
        client: &ClientInfo,
        share: Option<&str>,
        call: &'static str,
        failed: (AuditKind, &str),
    ) -> Result<crate::store::User, AuthError> {
        let name_hash = self.names.hash(&claims.username);
        let who = Subject::new(&name_hash, &client.ip);
        let event = |kind| {
            AuditEvent::new(kind, client)
                .user(&claims.sub)
                .username_hash(&name_hash)
                .session(&claims.sid)
                .jti(&claims.jti)
        };
        let attempt = self
            .admit(&who, call, || event(AuditKind::Throttled))
            .await?;
        let checked = async {
            let user = self
                .users
                .find_by_id(&claims.sub)
                .await
                .map_err(users_error)?
                .ok_or(AuthError::Unauthenticated)?;
            let hash = self.verifiable(&user.password_hash);
            let matches = self.hasher.verify(share, current_password, hash).await?;
            let matches = matches && hash == user.password_hash;
            Ok::<_, AuthError>((user, matches))
        };
        match checked.await {
            Ok((user, true)) if !current_password.is_empty() => {
                self.settle(&who, attempt, Settle::Succeeded).await;
                Ok(user)
            }
            Ok((user, _)) => {
                tracing::info!(user_id = %user.id, call, "refused: wrong current password");
                self.audit.record(event(failed.0).detail(failed.1));
                self.record_lockouts(&attempt, |lockout| {
                    event(AuditKind::Lockout).detail(lockout)
                });
                Err(AuthError::WrongCurrentPassword)
            }
            Err(e) => {
                self.settle(&who, attempt, Settle::Withdraw).await;
                Err(e)
            }
        }
    }

    /// A page of the caller's live sessions: `page_size` of them (0: the default; past
    /// the most, the most), after the page that `page_token` ended.
    pub async fn list_sessions(
        &self,
        bearer: Option<&str>,
        page_size: i32,
        page_token: &str,
    ) -> Result<SessionList, AuthError> {
        let limit = match usize::try_from(page_size) {
            Err(_) => return Err(AuthError::invalid("page_size", "must not be negative")),
            Ok(0) => DEFAULT_SESSIONS_PAGE,
            Ok(n) => n.min(MAX_SESSIONS_PAGE),
        };
        let after = if page_token.is_empty() {
            0
        } else {
            page_token
                .parse::<u64>()
                .ok()
                .filter(|_| {
                    page_token.len() <= 20 && page_token.bytes().all(|b| b.is_ascii_digit())
                })
                .ok_or_else(|| {
                    AuthError::invalid(
                        "page_token",
                        "must be the next_page_token of an earlier page",
                    )
                })?
        };
        let claims = self.authenticate(bearer).await?;
        let page = self
            .sessions
            .list(&claims.sub, self.clock.unix_seconds(), after, limit)
            .await
            .map_err(sessions_error)?;
        let (second_factor_enabled, recovery) = self.second_factor_status(&claims.sub).await?;
        Ok(SessionList {
            sessions: page.sessions.into_iter().map(|(_, s)| s).collect(),
            current: claims.sid,
            total: page.total,
            next_page_token: page.next_after.map(|n| n.to_string()),
            second_factor_enabled,
            recovery,
        })
    }

    /// Ends one of the caller's own sessions. Someone else's and unknown ones are the
    /// same NOT_FOUND.
    pub async fn revoke_session(
        &self,
        bearer: Option<&str>,
        session_id: &str,
        factor: &GivenFactor,
        client: ClientInfo,
    ) -> Result<(), AuthError> {
        if session_id.is_empty() {
            return Err(AuthError::invalid("session_id", "must not be empty"));
        }
        if session_id.len() > MAX_SESSION_ID_BYTES {
            return Err(AuthError::invalid(
                "session_id",
                format!("must be at most {MAX_SESSION_ID_BYTES} bytes"),
            ));
        }
        let claims = self.authenticate(bearer).await?;
        if session_id != claims.sid {
            self.step_up(&claims, factor, &client, "RevokeSession")
                .await?;
        }
        let now = self.clock.unix_seconds();
        let found = self
            .sessions
            .revoke(&claims.sub, session_id, now)
            .await
            .map_err(sessions_error)?;
        if !found {
            return Err(AuthError::SessionNotFound);
        }
        self.announce(
            Revocation::Session {
                user_id: claims.sub.clone(),
                session_id: session_id.to_owned(),
            },
            now,
        )
        .await;
        tracing::info!(user_id = %claims.sub, session_id, "session revoked");
        self.audit.record(
            AuditEvent::new(AuditKind::SessionRevoked, &client)
                .user(&claims.sub)
                .session(session_id)
                .jti(&claims.jti)
                .detail("RevokeSession"),
        );
        Ok(())
    }

    /// Tells watchers (caches in other services) about a revocation that is already
    /// recorded. A failure here does not undo or fail the revocation: caches then hold
    /// the old answer for at most their TTL, which is logged and counted.
    async fn announce(&self, revocation: Revocation, now: i64) {
        self.remembered.remember(&revocation, now);
        if let Err(e) = self.sessions.publish(&revocation, now).await {
            metrics::counter!("authd_revocation_publish_failures_total").increment(1);
            tracing::warn!(error = %e, revocation = ?revocation, "revocation recorded but not announced to watchers");
        }
    }

    /// Revocations after `after` (a cursor from an earlier event; `None`: from now), then
    /// live ones, for a watcher presenting `credential` on `connection`. The permit
    /// holds the watcher's place until the stream ends.
    pub async fn watch_revocations(
        &self,
        credential: Option<&str>,
        connection: Option<std::net::SocketAddr>,
        after: Option<&str>,
    ) -> Result<(Feed, WatchPermit), AuthError> {
        let permit = self.watchers.admit(credential, connection)?;
        let after = match after {
            None => None,
            Some(a) if a.len() > MAX_SESSION_ID_BYTES => {
                return Err(AuthError::invalid(
                    "after",
                    format!("must be at most {MAX_SESSION_ID_BYTES} bytes"),
                ));
            }
            Some(a) => Some(Cursor::parse(a).ok_or_else(|| {
                AuthError::invalid(
                    "after",
                    "must be the cursor of an earlier event (like 1700000000000-0), or empty",
                )
            })?),
        };
        let feed = self
            .sessions
            .subscribe(after)
            .await
            .map_err(sessions_error)?;
        Ok((feed, permit))
    }

    /// Says whether a token is good. A bad token is an answer, not an error; an error
    /// means authd could not answer.
    pub async fn validate(&self, token: &str) -> Result<Validation, AuthError> {
        check_token_size("token", token)?;
        let now = self.clock.unix_seconds();
        let claims = match self.tokens.verify(token, now) {
            Ok(claims) => claims,
            Err(reason) => return Ok(Validation::Invalid(reason)),
        };
        match self.check_session(&claims, now).await {
            Ok(Ok(Some(roles))) => Ok(Validation::Valid(ValidToken {
                claims,
                revocation_checked: true,
                roles: super::roles::unframe(&roles),
            })),
            Ok(Ok(None)) => Box::pin(self.validate_from_users(claims)).await,
            Ok(Err(reason)) => Ok(Validation::Invalid(reason)),
            Err(StoreError::Unavailable(e))
                if self.rules.failure_mode == RedisFailureMode::Open =>
            {
                Box::pin(self.validate_degraded(claims, &e)).await
            }
            Err(e) => Err(sessions_error(e)),
        }
    }

    /// Open mode: the session store cannot be asked, so the durable check stands in:
    /// the token must be issued no earlier than the user's last password change.
    async fn validate_degraded(
        &self,
        claims: Claims,
        cause: &anyhow::Error,
    ) -> Result<Validation, AuthError> {
        metrics::counter!("authd_redis_fallbacks_total").increment(1);
        tracing::warn!(jti = %claims.jti, error = %cause, "session store unavailable: validating without revocation check (REDIS_FAILURE_MODE=open)");
        if self.remembered.revokes(&claims, self.clock.unix_seconds())
            || self.unfinished.revokes(&claims.sub, claims.iat)
        {
            return Ok(Validation::Invalid(InvalidReason::Revoked));
        }
        let user = self
            .users
            .find_by_id(&claims.sub)
            .await
            .map_err(users_error)?;
        Ok(match user {
            None => Validation::Invalid(InvalidReason::SessionNotFound),
            // A token issued in the same second as a password change may be older than
            // it: `iat` has whole seconds, so that second counts as before (the safe side).
            Some(user) if claims.iat <= user.sessions_valid_after || user.disabled => {
                Validation::Invalid(InvalidReason::Revoked)
            }
            Some(user) => Validation::Valid(ValidToken {
                claims,
                revocation_checked: false,
                roles: super::roles::unframe(&user.roles),
            }),
        })
    }

    /// A live session whose user's roles are not mirrored beside it: the users table
    /// says, and the mirror is filled again (unless SetRoles wrote it meanwhile). A user
    /// gone or disabled since has no valid token.
    async fn validate_from_users(&self, claims: Claims) -> Result<Validation, AuthError> {
        let user = self
            .users
            .find_by_id(&claims.sub)
            .await
            .map_err(users_error)?;
        let user = match user {
            None => return Ok(Validation::Invalid(InvalidReason::SessionNotFound)),
            Some(user) if user.disabled => return Ok(Validation::Invalid(InvalidReason::Revoked)),
            Some(user) => user,
        };
        self.mirror_roles(&user.id, &user.roles, true).await;
        Ok(Validation::Valid(ValidToken {
            claims,
            revocation_checked: true,
            roles: super::roles::unframe(&user.roles),
        }))
    }

    /// Mirrors a user's roles beside the sessions (see `SessionStore::mirror_roles`), for
    /// as long as any token can live. A mirror not written is only a slower
    /// ValidateToken (it reads the users table), so a failure is logged, not returned.
    async fn mirror_roles(&self, user_id: &str, roles: &str, only_if_missing: bool) {
        if let Err(e) = self
            .sessions
            .mirror_roles(user_id, roles, only_if_missing, self.rules.token_lifetime)
            .await
        {
            tracing::warn!(user_id, error = %e, "roles not mirrored beside the sessions");
        }
    }

    /// After a Login created its session: the user as stored now. A user disabled or
    /// deleted while this Login checked the password loses the session at once. Disable
    /// writes the users table before it ends the sessions, so either this read sees it,
    /// or the session was created before that sweep, which ends it.
    async fn recheck_after_login(
        &self,
        user_id: &str,
        session_id: &str,
        now: i64,
    ) -> Result<crate::store::User, AuthError> {
        let user = self.users.find_by_id(user_id).await.map_err(users_error);
        match user {
            Ok(Some(user)) if !user.disabled => {
                self.mirror_roles(&user.id, &user.roles, true).await;
                Ok(user)
            }
            outcome => {
                self.sessions
                    .revoke(user_id, session_id, now)
                    .await
                    .map_err(sessions_error)?;
                match outcome {
                    Err(e) => Err(e),
                    Ok(Some(_)) => Err(AuthError::AccountDisabled),
                    Ok(None) => Err(AuthError::InvalidCredentials),
                }
            }
        }
    }

    /// The mirrored roles (`None`: no mirror) when the session is live (extending it if
    /// a minute has passed), or why it is not.
    async fn check_session(
        &self,
        claims: &Claims,
        now: i64,
    ) -> Result<Result<Option<String>, InvalidReason>, StoreError> {
        if self.unfinished.revokes(&claims.sub, claims.iat) {
            // Revoked here, not yet in the session store (see `unfinished`).
            return Ok(Err(InvalidReason::Revoked));
        }
        match self
            .sessions
            .check(&claims.sub, &claims.sid, &claims.jti, now)
            .await?
        {
            SessionState::Revoked => Ok(Err(InvalidReason::Revoked)),
            SessionState::Missing => Ok(Err(InvalidReason::SessionNotFound)),
            SessionState::Live {
                idle_expires_at, ..
            } if idle_expires_at <= now => Ok(Err(InvalidReason::SessionNotFound)),
            SessionState::Live {
                last_seen, roles, ..
            } => {
                if now - last_seen >= TOUCH_INTERVAL_SECONDS {
                    let touch = Touch {
                        user_id: &claims.sub,
                        session_id: &claims.sid,
                        jti: &claims.jti,
                        now,
                        idle_expires_at: now.saturating_add(self.rules.idle_timeout),
                    };
                    // Boxed, once a minute: its state would otherwise ride in every call's
                    // future (see `SessionStore::check`).
                    let touched = Box::pin(self.sessions.touch(&touch)).await?;
                    if !touched {
                        // Revoked between the check and the touch.
                        return Ok(Err(InvalidReason::SessionNotFound));
                    }
                }
                Ok(Ok(roles))
            }
        }
    }

    /// The claims of a bearer token that is fully valid, revocation included. Calls that
    /// need this also need the session store, so there is no open-mode fallback here.
    async fn authenticate(&self, bearer: Option<&str>) -> Result<Claims, AuthError> {
        let token = bearer_token(bearer)?;
        let now = self.clock.unix_seconds();
        let claims = self
            .tokens
            .verify(token, now)
            .map_err(|_| AuthError::Unauthenticated)?;
        crate::telemetry::record_user_id(&claims.sub);
        match self.check_session(&claims, now).await {
            Ok(Ok(_)) => Ok(claims),
            Ok(Err(_)) => Err(AuthError::Unauthenticated),
            Err(e) => Err(sessions_error(e)),
        }
    }
}

/// Follows the revocation stream for as long as `remembered` lives, remembering every
/// revocation any instance records; resumes from its last cursor after a break.
async fn remember_from_stream(
    log: Arc<RedisLog>,
    remembered: std::sync::Weak<RememberedRevocations>,
    clock: Arc<dyn Clock>,
) {
    const CHECK_EVERY: Duration = Duration::from_secs(2);
    let mut after: Option<Cursor> = None;
    let mut backoff = Duration::from_millis(100);
    while remembered.strong_count() > 0 {
        // The first time, everything the log still holds: a fresh instance starts with
        // the revocations made before it, not with none.
        let subscribed = match after {
            None => log.subscribe_from_oldest().await,
            Some(_) => log.subscribe(after).await,
        };
        let mut feed = match subscribed {
            Ok(feed) => feed,
            Err(e) => {
                tracing::debug!(error = %e, "revocation stream not followed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        // Resume from where this feed starts, even if the stream breaks before any event.
        after = Cursor::parse(&feed.cursor());
        loop {
            match tokio::time::timeout(CHECK_EVERY, feed.next()).await {
                Err(_) if remembered.strong_count() == 0 => return,
                Err(_) => continue,
                Ok(Some(Ok(event))) => {
                    let Some(memory) = remembered.upgrade() else {
                        return;
                    };
                    match &event {
                        Event::Revoked { revocation, at, .. } => memory.remember(revocation, *at),
                        // Events may have been lost: refuse what they could have covered.
                        Event::Reset { .. } => memory.lost_track(clock.unix_seconds()),
                    }
                    after = Cursor::parse(&feed.cursor());
                }
                Ok(Some(Err(_)) | None) => break,
            }
        }
    }
}

/// The `amr` of a password login (RFC 8176).
const PASSWORD_AMR: &str = "pwd";

/// Refresh's answer from the access token issued and the successor.
fn refreshed(
    issued: IssuedToken,
    successor: String,
    s: &RefreshState,
    idle_expires_at: i64,
) -> LoggedIn {
    LoggedIn {
        access_token: issued.token,
        claims: issued.claims,
        refresh_token: successor,
        refresh_expires_at: idle_expires_at.min(s.ends_at),
        session_expires_at: s.ends_at,
        // Login's word on it; Refresh does not read the user.
        password_change_required: false,
    }
}

fn bearer_token(bearer: Option<&str>) -> Result<&str, AuthError> {
    let token = bearer.ok_or(AuthError::Unauthenticated)?;
    check_token_size("authorization", token)?;
    Ok(token)
}

fn check_token_size(field: &'static str, token: &str) -> Result<(), AuthError> {
    if token.is_empty() {
        return Err(AuthError::InvalidArgument(vec![FieldViolation::new(
            field,
            "must not be empty",
        )]));
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(AuthError::InvalidArgument(vec![FieldViolation::new(
            field,
            format!("must be at most {MAX_TOKEN_BYTES} bytes"),
        )]));
    }
    Ok(())
}

fn seconds(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX / 4)
}

/// How an attempt that was no failure is given back.
#[derive(Debug, Clone, Copy)]
enum Settle {
    /// The password was right.
    Succeeded,
    /// The password was never checked.
    Withdraw,
}

/// Reads the highest cost among the stored hashes into `padding`; on failure the
/// previous value stays (lookups still raise it), and the failure is logged.
async fn refresh_max_cost(users: &UserStore, padding: &FailurePadding) {
    match users.max_hash_cost().await {
        Ok(max) => padding.set_stored_max(max),
        Err(e) => {
            tracing::warn!(error = %e, "highest stored bcrypt cost not read; failed logins are padded to the highest seen")
        }
    }
}

/// Every [`padding::REFRESH`], reads the highest stored cost again, until the service
/// is gone.
/// Every second, writes the `admin_denied` rows of the windows that are over, until the
/// service is gone.
async fn close_denied_windows(
    denied: std::sync::Weak<DeniedCoalescer>,
    audit: std::sync::Weak<AuditLog>,
    clock: Arc<dyn Clock>,
) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (Some(denied), Some(audit)) = (denied.upgrade(), audit.upgrade()) else {
            return;
        };
        for row in denied.due(clock.unix_seconds()) {
            audit.record(row);
        }
    }
}

async fn keep_max_cost_fresh(users: UserStore, padding: std::sync::Weak<FailurePadding>) {
    loop {
        tokio::time::sleep(padding::REFRESH).await;
        let Some(padding) = padding.upgrade() else {
            return;
        };
        refresh_max_cost(&users, &padding).await;
    }
}

fn users_error(e: StoreError) -> AuthError {
    store_error(Store::Users, e)
}

/// A session store failure as the caller learns of it.
pub(crate) fn sessions_error(e: StoreError) -> AuthError {
    store_error(Store::Sessions, e)
}

fn store_error(store: Store, e: StoreError) -> AuthError {
    match e {
        StoreError::Unavailable(source) => AuthError::Unavailable { store, source },
        StoreError::Internal(source) => AuthError::Internal(source.context(store.to_string())),
    }
}

//! The second factor, independent of any transport: TOTP enrolment, the login ticket
//! and its completion, recovery codes, and step-up for critical calls (docs/design.md
//! §11).
//!
//! Every code is accepted by one conditional write in the users database (the
//! credential's `last_step` moved forward, or a recovery code marked used), so no code
//! counts twice, across instances and restarts. Wrong codes count on throttle counters
//! of their own (the user and the address), before the code is checked; a ticket also
//! dies after [`TICKET_ATTEMPTS`] attempts. Tickets and the counters live in the session
//! store: without it the second-factor calls answer UNAVAILABLE and accept nothing.

use std::path::Path;

use sha2::{Digest, Sha256};

use super::Settle;
use crate::auth::audit::{AuditEvent, AuditKind};
use crate::auth::password::check_size;
use crate::auth::service::{AuthCore, LoggedIn, Login, sessions_error, users_error};
use crate::auth::throttle::Subject;
use crate::auth::token::{Claims, random_id};
use crate::auth::totp::{
    self, MAX_CODE_BYTES, Params, SecretBox, generate_recovery_codes, normalize_recovery_code,
    recovery_code_hash,
};
use crate::auth::{AuthError, ClientInfo};
use crate::config::TotpKey;
use crate::store::mfa::Ticket;
use crate::store::users::second_factor::{NewTotp, RecoveryStatus, TotpCredential};

/// How long a ticket lives, in seconds.
pub const TICKET_TTL_SECONDS: i64 = 300;
/// Codes a ticket takes before it dies, right or wrong.
pub const TICKET_ATTEMPTS: u32 = 5;
/// The first field of every ticket.
const TICKET_PREFIX: &str = "mt1";
/// The longest ticket looked at, in bytes.
const MAX_TICKET_BYTES: usize = 160;
/// The `amr` value of a second factor given (RFC 8176 `otp`): a TOTP code or a
/// recovery code.
pub const OTP_AMR: &str = "otp";
/// The `amr` of a login that gave a password and a second factor.
const TWO_FACTOR_AMR: &str = "pwd otp";

/// What EnrollTotp answers.
#[derive(Clone)]
pub struct Enrolment {
    /// The secret in base32, for manual entry.
    pub secret_base32: String,
    /// The `otpauth://` URI.
    pub uri: String,
    /// A PNG of a QR code of `uri`.
    pub qr_png: Vec<u8>,
    /// The credential's parameters.
    pub params: Params,
}

impl std::fmt::Debug for Enrolment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enrolment")
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

/// A second factor given with a call: a TOTP code or a recovery code.
#[derive(Clone, Default)]
pub struct GivenFactor {
    /// A TOTP code, or empty.
    pub totp_code: String,
    /// A recovery code, or empty.
    pub recovery_code: String,
}

impl std::fmt::Debug for GivenFactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GivenFactor")
            .field("totp_code", &!self.totp_code.is_empty())
            .field("recovery_code", &!self.recovery_code.is_empty())
            .finish()
    }
}

impl GivenFactor {
    /// Neither code.
    pub fn is_empty(&self) -> bool {
        self.totp_code.is_empty() && self.recovery_code.is_empty()
    }

    /// Sizes and shape: at most one code, neither oversize.
    fn check(&self) -> Result<(), AuthError> {
        for (field, value) in [
            ("totp_code", &self.totp_code),
            ("recovery_code", &self.recovery_code),
        ] {
            if value.len() > MAX_CODE_BYTES {
                return Err(AuthError::invalid(
                    field,
                    format!("must be at most {MAX_CODE_BYTES} bytes"),
                ));
            }
        }
        if !self.totp_code.is_empty() && !self.recovery_code.is_empty() {
            return Err(AuthError::invalid(
                "recovery_code",
                "give either totp_code or recovery_code, not both",
            ));
        }
        Ok(())
    }
}

/// Which factor was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Totp,
    RecoveryCode,
}

impl Method {
    fn as_str(self) -> &'static str {
        match self {
            Method::Totp => "totp",
            Method::RecoveryCode => "recovery_code",
        }
    }
}

/// What a ValidateToken caller demands of a token's authentication (RFC 9470).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Requirements {
    /// The login may be at most this many seconds old.
    pub max_auth_age: Option<i64>,
    /// The login must have given a second factor.
    pub require_second_factor: bool,
}

impl Requirements {
    /// Whether `claims` meet these at `now`.
    pub fn met_by(&self, claims: &Claims, now: i64) -> bool {
        let fresh = self
            .max_auth_age
            .is_none_or(|max| now.saturating_sub(claims.login_time()) <= max);
        let factor = !self.require_second_factor || claims.amr.iter().any(|a| a == OTP_AMR);
        fresh && factor
    }
}

/// The parameters stored with a credential; an error for a row authd did not write.
fn params_of(cred: &TotpCredential) -> Result<Params, AuthError> {
    let params = Params {
        digits: u32::try_from(cred.digits).unwrap_or(0),
        period: cred.period_seconds,
        skew: cred.skew_steps,
    };
    if cred.algorithm != totp::ALGORITHM
        || !(6..=8).contains(&params.digits)
        || !(1..=300).contains(&params.period)
        || !(0..=2).contains(&params.skew)
    {
        return Err(AuthError::Internal(anyhow::anyhow!(
            "a TOTP credential has parameters authd does not use ({} {} digits {} s ±{})",
            cred.algorithm,
            cred.digits,
            cred.period_seconds,
            cred.skew_steps
        )));
    }
    Ok(params)
}

/// SHA-256 (hex) of a ticket: what the store keys it by.
fn ticket_hash(ticket: &str) -> String {
    Sha256::digest(ticket.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The user id a ticket names, if it has a ticket's shape: `mt1.<user id>.<secret>`.
fn ticket_user(ticket: &str) -> Option<&str> {
    let mut parts = ticket.split('.');
    let (Some(TICKET_PREFIX), Some(user), Some(secret), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let plain = |s: &str, max: usize| {
        !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    // A user id is at most 36 characters (the users table's column): a longer one names
    // no user, and would not fit the audit row's column either.
    (plain(user, 36) && plain(secret, 64)).then_some(user)
}

/// The key that seals TOTP secrets, as configured; `None` when there is none (MySQL
/// without `TOTP_ENCRYPTION_KEY`). `enrolled` is how many TOTP credentials are stored:
/// with any, a missing key is an error, never a fresh one (it would not open them).
pub(crate) fn secret_box(key: &TotpKey, enrolled: i64) -> anyhow::Result<Option<SecretBox>> {
    match key {
        TotpKey::Configured(k) => SecretBox::new(k.expose()).map(Some),
        TotpKey::File(path) => SecretBox::new(&key_file(path, enrolled)?).map(Some),
        TotpKey::Missing if enrolled > 0 => Err(anyhow::anyhow!(
            "TOTP_ENCRYPTION_KEY is required: {enrolled} users have a second factor sealed under it"
        )),
        TotpKey::Missing => Ok(None),
    }
}

/// The embedded mode's key: read from `path`, or made and written there (mode 0600)
/// the first time, while no credential is stored (`enrolled` is 0). Past that, a missing
/// file is an error: a new key would lock every enrolled user out.
fn key_file(path: &Path, enrolled: i64) -> anyhow::Result<[u8; 32]> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    match std::fs::read_to_string(path) {
        Ok(text) => crate::config::parse_totp_key(text.trim()).ok_or_else(|| {
            anyhow::anyhow!(
                "{} does not hold a TOTP key (64 hex digits)",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && enrolled > 0 => Err(anyhow::anyhow!(
            "the TOTP sealing key file {} is missing, but {enrolled} users have a second factor \
             sealed under the key it held: restore it (or set TOTP_ENCRYPTION_KEY to that \
             key); a new key would not open them",
            path.display()
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key: [u8; 32] = rand::random();
            let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))?;
            file.write_all(format!("{hex}\n").as_bytes())?;
            file.sync_all()?;
            tracing::info!(path = %path.display(), "made the TOTP sealing key (embedded mode; set TOTP_ENCRYPTION_KEY to choose one)");
            Ok(key)
        }
        Err(e) => Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
    }
}

impl AuthCore {
    /// Whether a valid token's authentication meets `requirements` now.
    pub fn meets(&self, claims: &Claims, requirements: &Requirements) -> bool {
        requirements.met_by(claims, self.clock.unix_seconds())
    }

    fn sealer(&self) -> Result<&SecretBox, AuthError> {
        self.totp_box.as_ref().ok_or(AuthError::FailedPrecondition(
            "the second factor is not available: authd has no TOTP_ENCRYPTION_KEY",
        ))
    }

    /// The user's confirmed TOTP credential, if any (a pending one does not count).
    pub(crate) async fn second_factor_of(
        &self,
        user_id: &str,
    ) -> Result<Option<TotpCredential>, AuthError> {
        Ok(self
            .users
            .totp_credential(user_id)
            .await
            .map_err(users_error)?
            .filter(|c| c.confirmed_at.is_some()))
    }

    /// A correct password of a user with a second factor: a ticket for
    /// VerifySecondFactor, bound to the user and to the session it will make.
    pub(crate) async fn second_factor_ticket(
        &self,
        user: &crate::store::User,
        client: &ClientInfo,
    ) -> Result<Login, AuthError> {
        let now = self.clock.unix_seconds();
        let ticket = format!("{TICKET_PREFIX}.{}.{}", user.id, random_id());
        let session_id = random_id();
        self.tickets
            .create(
                &user.id,
                &ticket_hash(&ticket),
                &Ticket {
                    session_id: session_id.clone(),
                    ip: client.ip.clone(),
                    user_agent: crate::store::truncate(
                        &client.user_agent,
                        crate::store::MAX_USER_AGENT_BYTES,
                    )
                    .to_owned(),
                    created_at: now,
                },
                TICKET_TTL_SECONDS,
            )
            .await
            .map_err(sessions_error)?;
        metrics::counter!("authd_logins_total", "outcome" => "second_factor_required").increment(1);
        // No `login_succeeded` yet: the login succeeds (and is audited) only when
        // VerifySecondFactor opens the session.
        tracing::info!(user_id = %user.id, session_id = %session_id, "password accepted; second factor required");
        Ok(Login::SecondFactorRequired {
            ticket,
            expires_at: now.saturating_add(TICKET_TTL_SECONDS),
        })
    }

    /// Checks `factor` against the user's confirmed credential, counted on the second
    /// factor's throttle counters (`who`) first. `Some(method)` when it was accepted (and
    /// is now used up), `None` when it was not (audited, counted).
    async fn try_factor(
        &self,
        who: &Subject,
        user_id: &str,
        cred: &TotpCredential,
        factor: &GivenFactor,
        client: &ClientInfo,
        call: &'static str,
    ) -> Result<Option<Method>, AuthError> {
        let attempt = self
            .admit(who, call, || {
                AuditEvent::new(AuditKind::Throttled, client)
                    .user(user_id)
                    .detail("second factor")
            })
            .await?;
        let checked = self.check_factor(user_id, cred, factor, client).await;
        let accepted = match checked {
            Ok(accepted) => accepted,
            Err(e) => {
                self.settle(who, attempt, Settle::Withdraw).await;
                return Err(e);
            }
        };
        match accepted {
            Some(method) => {
                self.settle(who, attempt, Settle::Succeeded).await;
                metrics::counter!("authd_second_factor_checks_total", "outcome" => "accepted", "method" => method.as_str()).increment(1);
                self.audit.record(
                    AuditEvent::new(AuditKind::MfaSucceeded, client)
                        .user(user_id)
                        .detail(format!("{call}: {}", method.as_str())),
                );
                if method == Method::RecoveryCode {
                    metrics::counter!("authd_recovery_codes_used_total").increment(1);
                    tracing::warn!(user_id, call, "recovery code used");
                    self.audit.record(
                        AuditEvent::new(AuditKind::RecoveryCodeUsed, client)
                            .user(user_id)
                            .detail(call),
                    );
                }
                Ok(Some(method))
            }
            None => {
                let method = if factor.totp_code.is_empty() {
                    Method::RecoveryCode
                } else {
                    Method::Totp
                };
                metrics::counter!("authd_second_factor_checks_total", "outcome" => "refused", "method" => method.as_str()).increment(1);
                tracing::info!(
                    user_id,
                    call,
                    method = method.as_str(),
                    "second factor refused"
                );
                let event = |kind| AuditEvent::new(kind, client).user(user_id);
                self.audit.record(
                    event(AuditKind::MfaFailed)
                        .detail(format!("{call}: wrong or used {}", method.as_str())),
                );
                self.record_lockouts(&attempt, |lockout| {
                    event(AuditKind::Lockout).detail(format!("second factor: {lockout}"))
                });
                Ok(None)
            }
        }
    }

    /// The check itself, and the one write that uses the code up.
    async fn check_factor(
        &self,
        user_id: &str,
        cred: &TotpCredential,
        factor: &GivenFactor,
        client: &ClientInfo,
    ) -> Result<Option<Method>, AuthError> {
        let now = self.clock.unix_seconds();
        if !factor.totp_code.is_empty() {
            let params = params_of(cred)?;
            let Some(code) = totp::parse_code(&factor.totp_code, params.digits) else {
                return Ok(None);
            };
            let secret = self
                .sealer()?
                .open(user_id, &cred.secret_sealed)
                .map_err(AuthError::Internal)?;
            let Some(step) =
                totp::matching_step(secret.expose(), code, now, params, cred.last_step)
            else {
                return Ok(None);
            };
            let accepted = self
                .users
                .accept_totp_step(user_id, step)
                .await
                .map_err(users_error)?;
            return Ok(accepted.then_some(Method::Totp));
        }
        let Some(normalized) = normalize_recovery_code(&factor.recovery_code) else {
            return Ok(None);
        };
        let used = self
            .users
            .use_recovery_code(
                user_id,
                &recovery_code_hash(user_id, &normalized),
                now,
                &client.ip,
            )
            .await
            .map_err(users_error)?;
        Ok(used.then_some(Method::RecoveryCode))
    }

    /// Step-up: for a user with a second factor, a critical call (`call`) needs a
    /// current code in the request. Users without one pass. Wrong codes count on the
    /// user's counter only: the bearer names the guesser, and its address may be
    /// everyone's (a gateway, a NAT).
    pub(crate) async fn step_up(
        &self,
        claims: &Claims,
        factor: &GivenFactor,
        client: &ClientInfo,
        call: &'static str,
    ) -> Result<(), AuthError> {
        match self.step_up_given(claims, factor, call).await? {
            Some(cred) => {
                self.step_up_check(claims, &cred, factor, client, call)
                    .await
            }
            None => Ok(()),
        }
    }

    /// Step-up's first half, which uses nothing up: the user's credential when the call
    /// needs a code and one was given; `None` when the user has no second factor;
    /// SecondFactorRequired when no code was given.
    pub(crate) async fn step_up_given(
        &self,
        claims: &Claims,
        factor: &GivenFactor,
        call: &'static str,
    ) -> Result<Option<TotpCredential>, AuthError> {
        factor.check()?;
        let Some(cred) = self.second_factor_of(&claims.sub).await? else {
            return Ok(None);
        };
        if factor.is_empty() {
            metrics::counter!("authd_step_up_total", "outcome" => "missing").increment(1);
            tracing::info!(user_id = %claims.sub, call, "refused: second factor required");
            return Err(AuthError::SecondFactorRequired);
        }
        Ok(Some(cred))
    }

    /// Step-up's second half: checks the code given (counted, and used up when right).
    pub(crate) async fn step_up_check(
        &self,
        claims: &Claims,
        cred: &TotpCredential,
        factor: &GivenFactor,
        client: &ClientInfo,
        call: &'static str,
    ) -> Result<(), AuthError> {
        match self
            .try_factor(
                &Subject::second_factor_of_bearer(&claims.sub),
                &claims.sub,
                cred,
                factor,
                client,
                call,
            )
            .await?
        {
            Some(_) => {
                metrics::counter!("authd_step_up_total", "outcome" => "accepted").increment(1);
                Ok(())
            }
            None => {
                metrics::counter!("authd_step_up_total", "outcome" => "refused").increment(1);
                Err(AuthError::SecondFactorInvalid)
            }
        }
    }

    /// Starts (or restarts) the caller's TOTP enrolment.
    pub async fn enroll_totp(
        &self,
        bearer: Option<&str>,
        client: ClientInfo,
    ) -> Result<Enrolment, AuthError> {
        let claims = self.authenticate(bearer).await?;
        let sealer = self.sealer()?;
        let params = Params::DEFAULT;
        let secret = totp::generate_secret();
        let sealed = sealer
            .seal(&claims.sub, secret.expose())
            .map_err(AuthError::Internal)?;
        let begun = self
            .users
            .begin_totp(&NewTotp {
                user_id: &claims.sub,
                secret_sealed: &sealed,
                digits: i64::from(params.digits),
                period_seconds: params.period,
                skew_steps: params.skew,
                now: self.clock.unix_seconds(),
            })
            .await
            .map_err(users_error)?;
        if !begun {
            return Err(AuthError::FailedPrecondition(
                "a second factor is already enabled: DisableTotp first",
            ));
        }
        let uri = totp::otpauth_uri(&self.totp_issuer, &claims.username, secret.expose(), params);
        let qr_png = totp::qr_png(&uri).map_err(AuthError::Internal)?;
        metrics::counter!("authd_second_factor_changes_total", "change" => "enrolled").increment(1);
        tracing::info!(user_id = %claims.sub, "TOTP enrolment started");
        self.audit.record(
            AuditEvent::new(AuditKind::MfaEnrolled, &client)
                .user(&claims.sub)
                .session(&claims.sid)
                .jti(&claims.jti),
        );
        Ok(Enrolment {
            secret_base32: totp::secret_base32(secret.expose()),
            uri,
            qr_png,
            params,
        })
    }

    /// Activates the caller's pending enrolment with a correct code (which counts as
    /// used) and the caller's current password, and answers a fresh set of recovery
    /// codes.
    ///
    /// The password is what keeps a stolen bearer token from putting the thief's
    /// authenticator on the account: once confirmed, every remedy the owner has
    /// (ChangePassword, RevokeSession, DisableTotp) needs a code of it. It is checked as
    /// ChangePassword checks its current password, on the same throttle.
    pub async fn confirm_totp(
        &self,
        bearer: Option<&str>,
        code: &str,
        current_password: &str,
        client: ClientInfo,
    ) -> Result<Vec<String>, AuthError> {
        if code.is_empty() {
            return Err(AuthError::invalid("code", "must not be empty"));
        }
        if code.len() > MAX_CODE_BYTES {
            return Err(AuthError::invalid(
                "code",
                format!("must be at most {MAX_CODE_BYTES} bytes"),
            ));
        }
        if current_password.is_empty() {
            return Err(AuthError::invalid("current_password", "must not be empty"));
        }
        check_size("current_password", current_password)
            .map_err(|v| AuthError::InvalidArgument(vec![v]))?;
        let claims = self.authenticate(bearer).await?;
        let cred = match self
            .users
            .totp_credential(&claims.sub)
            .await
            .map_err(users_error)?
        {
            None => {
                return Err(AuthError::FailedPrecondition(
                    "no TOTP enrolment is pending: call EnrollTotp first",
                ));
            }
            Some(c) if c.confirmed_at.is_some() => {
                return Err(AuthError::FailedPrecondition(
                    "a second factor is already enabled",
                ));
            }
            Some(c) => c,
        };
        let params = params_of(&cred)?;
        let secret = self
            .sealer()?
            .open(&claims.sub, &cred.secret_sealed)
            .map_err(AuthError::Internal)?;
        let share = self.pool_share(&client);
        self.check_current_password(
            &claims,
            current_password,
            &client,
            share.as_deref(),
            "confirm_totp",
            (AuditKind::MfaFailed, "ConfirmTotp: wrong current password"),
        )
        .await?;
        // The bearer names the guesser: its user counter only, not its address's.
        let who = Subject::second_factor_of_bearer(&claims.sub);
        let event = |kind| {
            AuditEvent::new(kind, &client)
                .user(&claims.sub)
                .session(&claims.sid)
                .jti(&claims.jti)
        };
        let attempt = self
            .admit(&who, "confirm_totp", || event(AuditKind::Throttled))
            .await?;
        let now = self.clock.unix_seconds();
        let step = totp::parse_code(code, params.digits)
            .and_then(|c| totp::matching_step(secret.expose(), c, now, params, cred.last_step));
        let Some(step) = step else {
            metrics::counter!("authd_second_factor_checks_total", "outcome" => "refused", "method" => "totp").increment(1);
            self.audit
                .record(event(AuditKind::MfaFailed).detail("ConfirmTotp: wrong code"));
            self.record_lockouts(&attempt, |lockout| {
                event(AuditKind::Lockout).detail(format!("second factor: {lockout}"))
            });
            return Err(AuthError::SecondFactorInvalid);
        };
        let codes = generate_recovery_codes();
        let hashes = hashes_of(&claims.sub, &codes);
        let confirmed = self
            .users
            .confirm_totp(&claims.sub, &cred.secret_sealed, step, now, &hashes)
            .await
            .map_err(users_error);
        match confirmed {
            Ok(true) => self.settle(&who, attempt, Settle::Succeeded).await,
            Ok(false) => {
                self.settle(&who, attempt, Settle::Withdraw).await;
                return Err(AuthError::FailedPrecondition(
                    "the enrolment changed meanwhile: call EnrollTotp again",
                ));
            }
            Err(e) => {
                self.settle(&who, attempt, Settle::Withdraw).await;
                return Err(e);
            }
        }
        metrics::counter!("authd_second_factor_changes_total", "change" => "confirmed")
            .increment(1);
        tracing::info!(user_id = %claims.sub, "second factor enabled");
        self.audit.record(event(AuditKind::MfaConfirmed));
        Ok(codes)
    }

    /// Completes a Login that needed a second factor: the ticket and a code get what
    /// Login answers without one.
    pub async fn verify_second_factor(
        &self,
        ticket: &str,
        factor: &GivenFactor,
        client: ClientInfo,
    ) -> Result<LoggedIn, AuthError> {
        if ticket.is_empty() {
            return Err(AuthError::invalid("mfa_ticket", "must not be empty"));
        }
        if ticket.len() > MAX_TICKET_BYTES {
            return Err(AuthError::invalid(
                "mfa_ticket",
                format!("must be at most {MAX_TICKET_BYTES} bytes"),
            ));
        }
        factor.check()?;
        if factor.is_empty() {
            return Err(AuthError::invalid(
                "totp_code",
                "give totp_code or recovery_code",
            ));
        }
        // An address that sent too many malformed or unknown tickets waits, before any
        // work is done (like bad refresh tokens).
        if let Err(e) = self
            .throttle
            .admit_ticket(&client.ip, self.clock.unix_millis())
            .await
        {
            metrics::counter!("authd_second_factor_checks_total", "outcome" => "throttled", "method" => "ticket").increment(1);
            tracing::debug!(error = %e, "VerifySecondFactor refused unchecked: too many bad tickets");
            return Err(e);
        }
        let Some(user_id) = ticket_user(ticket) else {
            return Err(self.bad_ticket(None, &client, "malformed ticket").await);
        };
        let hash = ticket_hash(ticket);
        let now = self.clock.unix_seconds();
        let Some(attempted) = self
            .tickets
            .attempt(user_id, &hash, TICKET_ATTEMPTS, now)
            .await
            .map_err(sessions_error)?
        else {
            return Err(self
                .bad_ticket(
                    Some(user_id),
                    &client,
                    "ticket unknown, used, expired or past its attempts",
                )
                .await);
        };
        let user = self.users.find_by_id(user_id).await.map_err(users_error)?;
        let cred = match &user {
            Some(u) if !u.disabled => self.second_factor_of(user_id).await?,
            _ => None,
        };
        let usable = match (user, cred) {
            // The password it proved was replaced since (ChangePassword, SetPassword), the
            // user disabled, or forced out (RevokeUserSessions): as with a token, what came
            // before is refused.
            (Some(u), Some(_)) if u.sessions_valid_after >= attempted.ticket.created_at => {
                Err("password changed, user disabled or sessions revoked since the ticket was made")
            }
            (Some(u), Some(c)) => Ok((u, c)),
            // Deleted, disabled, or the second factor removed since the password step.
            _ => Err("user or second factor gone"),
        };
        let (user, cred) = match usable {
            Ok(found) => found,
            Err(why) => {
                self.tickets
                    .take(user_id, &hash)
                    .await
                    .map_err(sessions_error)?;
                return Err(self.ticket_refused(Some(user_id), &client, why));
            }
        };
        let accepted = self
            .try_factor(
                &Subject::second_factor(&user.id, &client.ip),
                &user.id,
                &cred,
                factor,
                &client,
                "VerifySecondFactor",
            )
            .await?;
        if accepted.is_none() {
            if attempted.attempts >= TICKET_ATTEMPTS {
                // Dead from now on (the store answers no further attempt); not deleted,
                // so a right code already in flight still completes it.
                tracing::info!(
                    user_id,
                    "second-factor ticket used up: too many wrong codes"
                );
            }
            return Err(AuthError::SecondFactorInvalid);
        }
        // The code is used up; the ticket goes with it, for exactly one caller.
        if !self
            .tickets
            .take(user_id, &hash)
            .await
            .map_err(sessions_error)?
        {
            return Err(self.ticket_refused(Some(user_id), &client, "ticket used meanwhile"));
        }
        let name_hash = self.names.hash(&user.username);
        self.open_session(
            &user,
            attempted.ticket.session_id,
            TWO_FACTOR_AMR,
            &client,
            &name_hash,
        )
        .await
    }

    /// A ticket that is malformed or the store does not know (it might be a guess):
    /// counted against the address, then refused like [`Self::ticket_refused`], except
    /// that the user id it names is unverified, so it goes in the audit row's detail,
    /// never its user column.
    async fn bad_ticket(
        &self,
        claimed_user_id: Option<&str>,
        client: &ClientInfo,
        why: &str,
    ) -> AuthError {
        let counted = self
            .throttle
            .ticket_failed(&client.ip, self.clock.unix_millis())
            .await;
        self.record_address_lockout(
            client,
            counted,
            "VerifySecondFactor",
            "mfa-ticket",
            "second-factor tickets",
        );
        let why = match claimed_user_id {
            Some(id) => format!("{why}; claimed_user_id={id}"),
            None => why.to_owned(),
        };
        self.ticket_refused(None, client, &why)
    }

    /// A ticket that cannot be used: counted, audited (under `user_id`, which the
    /// ticket store vouched for), refused.
    fn ticket_refused(&self, user_id: Option<&str>, client: &ClientInfo, why: &str) -> AuthError {
        metrics::counter!("authd_second_factor_checks_total", "outcome" => "ticket_refused", "method" => "ticket").increment(1);
        tracing::info!(
            claimed_user_id = user_id,
            why,
            "second-factor ticket refused"
        );
        let event = AuditEvent::new(AuditKind::MfaFailed, client)
            .detail(format!("VerifySecondFactor: {why}"));
        self.audit.record(match user_id {
            Some(id) => event.user(id),
            None => event,
        });
        AuthError::MfaTicketInvalid
    }

    /// Removes the caller's second factor (step-up: a current code is needed).
    pub async fn disable_totp(
        &self,
        bearer: Option<&str>,
        factor: &GivenFactor,
        client: ClientInfo,
    ) -> Result<(), AuthError> {
        let claims = self.authenticate(bearer).await?;
        factor.check()?;
        self.step_up(&claims, factor, &client, "DisableTotp")
            .await?;
        let removed = self
            .users
            .remove_second_factor(&claims.sub)
            .await
            .map_err(users_error)?;
        if removed {
            metrics::counter!("authd_second_factor_changes_total", "change" => "disabled")
                .increment(1);
            tracing::info!(user_id = %claims.sub, "second factor disabled");
            self.audit.record(
                AuditEvent::new(AuditKind::MfaDisabled, &client)
                    .user(&claims.sub)
                    .session(&claims.sid)
                    .jti(&claims.jti),
            );
        }
        Ok(())
    }

    /// Replaces the caller's recovery codes (step-up: a current code is needed).
    pub async fn regenerate_recovery_codes(
        &self,
        bearer: Option<&str>,
        factor: &GivenFactor,
        client: ClientInfo,
    ) -> Result<Vec<String>, AuthError> {
        let claims = self.authenticate(bearer).await?;
        factor.check()?;
        if self.second_factor_of(&claims.sub).await?.is_none() {
            return Err(AuthError::FailedPrecondition(
                "no second factor is enabled: EnrollTotp and ConfirmTotp first",
            ));
        }
        self.step_up(&claims, factor, &client, "RegenerateRecoveryCodes")
            .await?;
        let codes = generate_recovery_codes();
        self.users
            .replace_recovery_codes(&claims.sub, &hashes_of(&claims.sub, &codes))
            .await
            .map_err(users_error)?;
        metrics::counter!("authd_second_factor_changes_total", "change" => "recovery_codes_regenerated").increment(1);
        tracing::info!(user_id = %claims.sub, "recovery codes regenerated");
        self.audit.record(
            AuditEvent::new(AuditKind::RecoveryCodesRegenerated, &client)
                .user(&claims.sub)
                .session(&claims.sid)
                .jti(&claims.jti),
        );
        Ok(codes)
    }

    /// Whether the user has a second factor, and the state of the recovery codes.
    pub(crate) async fn second_factor_status(
        &self,
        user_id: &str,
    ) -> Result<(bool, RecoveryStatus), AuthError> {
        let enabled = self.second_factor_of(user_id).await?.is_some();
        if !enabled {
            return Ok((false, RecoveryStatus::default()));
        }
        let status = self
            .users
            .recovery_status(user_id)
            .await
            .map_err(users_error)?;
        Ok((true, status))
    }
}

fn hashes_of(user_id: &str, codes: &[String]) -> Vec<String> {
    codes
        .iter()
        .filter_map(|c| normalize_recovery_code(c))
        .map(|n| recovery_code_hash(user_id, &n))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_have_one_shape() {
        assert_eq!(ticket_user("mt1.abc-1.ff00"), Some("abc-1"));
        let longest = format!("mt1.{}.ff", "a".repeat(36));
        assert!(ticket_user(&longest).is_some());
        assert_eq!(ticket_user(&format!("mt1.{}.ff", "a".repeat(37))), None);
        for bad in [
            "",
            "mt1",
            "mt1.a",
            "mt1.a.b.c",
            "mt2.a.b",
            "mt1..b",
            "mt1.a b.c",
            "mt1.a.:",
        ] {
            assert_eq!(ticket_user(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn requirements_follow_rfc9470() {
        let claims = |auth_time: i64, amr: &[&str]| Claims {
            iss: String::new(),
            aud: String::new(),
            sub: String::new(),
            username: String::new(),
            sid: String::new(),
            jti: String::new(),
            iat: auth_time,
            nbf: auth_time,
            exp: auth_time + 60,
            auth_time: Some(auth_time),
            amr: amr.iter().map(|s| (*s).to_owned()).collect(),
        };
        let none = Requirements::default();
        assert!(none.met_by(&claims(0, &["pwd"]), 1_000_000));
        let fresh = Requirements {
            max_auth_age: Some(300),
            require_second_factor: false,
        };
        assert!(fresh.met_by(&claims(1000, &["pwd"]), 1300));
        assert!(!fresh.met_by(&claims(1000, &["pwd"]), 1301));
        let otp = Requirements {
            max_auth_age: None,
            require_second_factor: true,
        };
        assert!(!otp.met_by(&claims(1000, &["pwd"]), 1000));
        assert!(otp.met_by(&claims(1000, &["pwd", "otp"]), 1000));
    }
}

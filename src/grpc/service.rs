//! `auth.v1.AuthService` over tonic: reads requests and metadata, calls the core,
//! and writes responses.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use std::pin::Pin;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::auth::service::second_factor::{GivenFactor, Requirements};
use crate::auth::service::{LoggedIn, Login, SessionList, Validation, sessions_error};
use crate::auth::watchers::WatchPermit;
use crate::auth::{AuthCore, AuthError, ClientInfo, InvalidReason};
use crate::bearer::bearer_token;
use crate::clock::{Clock as _, SystemClock};
use crate::config::TrustedProxies;
use crate::proto::auth::v1 as pb;
use crate::proto::auth::v1::auth_service_server::{self, AuthService};
use crate::store::sessions::{Event, Feed, Revocation};
use crate::telemetry::record_user_id;
use crate::transport::Peer;

/// The gRPC face of [`AuthCore`].
#[derive(Debug, Clone)]
pub struct AuthGrpc {
    core: Arc<AuthCore>,
    heartbeat: Duration,
    stopping: watch::Receiver<bool>,
}

impl AuthGrpc {
    /// Serves `core`. WatchRevocations streams send a heartbeat every `heartbeat`, and end
    /// when `stopping` turns true (watchers then resume on another instance).
    pub fn new(core: Arc<AuthCore>, heartbeat: Duration, stopping: watch::Receiver<bool>) -> Self {
        Self {
            core,
            heartbeat,
            stopping,
        }
    }

    /// The caller of a request without `client_ip`/`user_agent` fields.
    fn caller<T>(&self, request: &Request<T>) -> Result<ClientInfo, AuthError> {
        client_info(request, self.core.trusted_proxies(), "", "")
    }
}

/// A revocation event as the proto has it.
fn event_message(event: Event) -> pb::RevocationEvent {
    match event {
        Event::Reset { cursor } => pb::RevocationEvent {
            cursor,
            kind: pb::RevocationKind::Reset.into(),
            ..Default::default()
        },
        Event::Revoked {
            cursor,
            revocation,
            at,
        } => {
            let mut m = pb::RevocationEvent {
                cursor,
                revoked_at: Some(timestamp(at)),
                ..Default::default()
            };
            match revocation {
                Revocation::Token {
                    user_id,
                    session_id,
                    jti,
                } => {
                    m.kind = pb::RevocationKind::Token.into();
                    m.user_id = user_id;
                    m.session_id = session_id;
                    m.jti = jti;
                }
                Revocation::Session {
                    user_id,
                    session_id,
                } => {
                    m.kind = pb::RevocationKind::Session.into();
                    m.user_id = user_id;
                    m.session_id = session_id;
                }
                Revocation::User {
                    user_id,
                    except_session_id,
                } => {
                    m.kind = pb::RevocationKind::User.into();
                    m.user_id = user_id;
                    m.except_session_id = except_session_id;
                }
                Revocation::UserUpdated { user_id } => {
                    m.kind = pb::RevocationKind::UserUpdated.into();
                    m.user_id = user_id;
                }
            }
            m
        }
    }
}

/// Forwards a feed to one watcher: replay, then live events and heartbeats, until the
/// watcher goes away or the server stops. The replay is read only as fast as the
/// watcher takes it (the channel is small), and the watcher's place (`_permit`) is held
/// until then. A replay page that cannot be read ends the stream with UNAVAILABLE: the
/// watcher resumes from its last cursor.
async fn pump(
    mut feed: Feed,
    _permit: WatchPermit,
    out: mpsc::Sender<Result<pb::RevocationEvent, Status>>,
    heartbeat: Duration,
    mut stopping: watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval(heartbeat);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let message = tokio::select! {
            event = feed.next() => match event {
                Some(Ok(event)) => Ok(event_message(event)),
                Some(Err(e)) => Err(Status::from(sessions_error(e))),
                None => return,
            },
            _ = ticks.tick() => Ok(pb::RevocationEvent {
                cursor: feed.cursor(),
                kind: pb::RevocationKind::Heartbeat.into(),
                ..Default::default()
            }),
            _ = stopping.wait_for(|stop| *stop) => return,
            () = out.closed() => return,
        };
        let failed = message.is_err();
        // A watcher that stops reading must not hold its place, nor delay shutdown.
        let sent = tokio::select! {
            sent = out.send(message) => sent.is_ok(),
            _ = stopping.wait_for(|stop| *stop) => false,
        };
        if !sent || failed {
            return;
        }
    }
}

/// Runs one RPC's work and turns its error into a `Status`. The span, the metrics and
/// the log line of the call come from [`super::layer::RpcLayer`].
pub(crate) async fn rpc<T, F>(call: F) -> Result<Response<T>, Status>
where
    F: Future<Output = Result<T, AuthError>>,
{
    call.await.map(Response::new).map_err(Status::from)
}

/// A refused token is an answer, not an error: it is counted in
/// `authd_tokens_refused_total`. A token that does not verify (malformed, forged, for
/// another issuer) is logged at info, as a sign of an attack or a misconfigured caller;
/// one at the end of its life (expired, not yet valid, revoked, session ended) only at
/// debug, so a client retrying its logged-out token cannot flood the log.
pub(crate) fn log_refusal(method: &'static str, reason: Option<InvalidReason>) {
    let name = reason.map_or("missing", InvalidReason::as_str);
    metrics::counter!("authd_tokens_refused_total", "method" => method, "reason" => name)
        .increment(1);
    match reason {
        Some(
            InvalidReason::Malformed
            | InvalidReason::BadSignature
            | InvalidReason::WrongIssuerOrAudience,
        ) => tracing::info!(method, reason = name, "token refused"),
        _ => tracing::debug!(method, reason = name, "token refused"),
    }
}

/// `rpc` for a hot call (ValidateToken, Envoy's Check), whose span is off at info (see
/// `grpc::layer`): an error is turned into its status — which logs it — inside a span
/// that names the call, so its warning or error line says which call failed.
pub(crate) async fn hot_rpc<T, F>(
    service: &'static str,
    method: &'static str,
    call: F,
) -> Result<Response<T>, Status>
where
    F: Future<Output = Result<T, AuthError>>,
{
    call.await.map(Response::new).map_err(|e| {
        if tracing::Span::current().is_disabled() {
            tracing::info_span!("rpc", service, method).in_scope(|| Status::from(e))
        } else {
            Status::from(e)
        }
    })
}

/// The bearer token from `authorization: Bearer <token>`, if there is one.
pub(crate) fn bearer<T>(request: &Request<T>) -> Option<String> {
    bearer_token(request.metadata().get("authorization")?.to_str().ok()?).map(str::to_owned)
}

/// The client's address and agent. `client_ip` (a gateway's word for the end user's
/// address) counts only when the caller connects from a `TRUSTED_PROXIES` address;
/// from anyone else it is ignored, or a client could pick the address it is throttled
/// and audited by. Without it: the peer address. The agent is the request's field when
/// filled, else the `user-agent` metadata.
pub(crate) fn client_info<T>(
    request: &Request<T>,
    trusted: &TrustedProxies,
    client_ip: &str,
    user_agent: &str,
) -> Result<ClientInfo, AuthError> {
    let peer = request
        .extensions()
        .get::<Peer>()
        .and_then(Peer::remote_addr)
        .or_else(|| request.remote_addr())
        .map(|a| a.ip().to_canonical());
    let claimed = if client_ip.is_empty() {
        None
    } else {
        Some(parse_ip(client_ip).ok_or_else(|| {
            AuthError::invalid(
                "client_ip",
                "must be an IP address, like 203.0.113.7 or 2001:db8::1",
            )
        })?)
    };
    let ip = match (claimed, peer) {
        (Some(claimed), Some(peer)) if trusted.trusts(peer) => Some(claimed),
        (Some(_), peer) => {
            warn_untrusted_client_ip(peer);
            peer
        }
        (None, peer) => peer,
    };
    let user_agent = if user_agent.is_empty() {
        request
            .metadata()
            .get("user-agent")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    } else {
        user_agent.to_owned()
    };
    Ok(ClientInfo {
        ip: ip.map(|ip| ip.to_string()).unwrap_or_default(),
        user_agent,
    })
}

/// Says, at most once a minute, that a caller sent `client_ip` without being trusted:
/// a gateway missing from `TRUSTED_PROXIES` makes all its users one address.
fn warn_untrusted_client_ip(peer: Option<IpAddr>) {
    static LAST_MINUTE: AtomicU64 = AtomicU64::new(u64::MAX);
    let minute = u64::try_from(SystemClock.unix_seconds() / 60).unwrap_or_default();
    if LAST_MINUTE.swap(minute, Ordering::Relaxed) != minute {
        tracing::warn!(
            peer = peer.map(|p| p.to_string()).unwrap_or_default(),
            "client_ip ignored: the caller is not in TRUSTED_PROXIES, so its own address is used"
        );
    }
}

/// An IP, with any port a gateway left on it removed.
fn parse_ip(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    if s.len() > 64 {
        return None;
    }
    s.parse::<IpAddr>()
        .or_else(|_| s.parse::<SocketAddr>().map(|a| a.ip()))
        .ok()
        .map(|ip| ip.to_canonical())
}

pub(crate) fn timestamp(unix_seconds: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: unix_seconds,
        nanos: 0,
    }
}

/// Login's and Refresh's answer: the access token, and the refresh token after it.
fn token_answer(done: LoggedIn) -> pb::RefreshResponse {
    pb::RefreshResponse {
        token_type: "Bearer".to_owned(),
        expires_at: Some(timestamp(done.claims.exp)),
        expires_in: done.claims.exp - done.claims.iat,
        access_token: done.access_token,
        session_id: done.claims.sid,
        refresh_token: done.refresh_token,
        refresh_expires_at: Some(timestamp(done.refresh_expires_at)),
        session_expires_at: Some(timestamp(done.session_expires_at)),
    }
}

fn reason(r: InvalidReason) -> pb::InvalidReason {
    match r {
        InvalidReason::Malformed => pb::InvalidReason::Malformed,
        InvalidReason::BadSignature => pb::InvalidReason::BadSignature,
        InvalidReason::Expired => pb::InvalidReason::Expired,
        InvalidReason::NotYetValid => pb::InvalidReason::NotYetValid,
        InvalidReason::WrongIssuerOrAudience => pb::InvalidReason::WrongIssuerOrAudience,
        InvalidReason::Revoked => pb::InvalidReason::Revoked,
        InvalidReason::SessionNotFound => pb::InvalidReason::SessionNotFound,
        InvalidReason::InsufficientAuthentication => pb::InvalidReason::InsufficientAuthentication,
    }
}

/// The second factor a request carries (none when the field is unset).
fn factor(f: Option<&pb::SecondFactor>) -> GivenFactor {
    f.map(|f| GivenFactor {
        totp_code: f.totp_code.clone(),
        recovery_code: f.recovery_code.clone(),
    })
    .unwrap_or_default()
}

/// What a ValidateToken caller demands of the token's authentication.
fn requirements(req: &pb::ValidateTokenRequest) -> Result<Requirements, AuthError> {
    let max_auth_age = match req.max_auth_age {
        None => None,
        Some(d) if d.seconds < 0 || d.nanos < 0 => {
            return Err(AuthError::invalid("max_auth_age", "must not be negative"));
        }
        // Whole seconds, as auth_time has them.
        Some(d) => Some(d.seconds),
    };
    Ok(Requirements {
        max_auth_age,
        require_second_factor: req.require_second_factor,
    })
}

/// VerifySecondFactor's answer: Login's.
fn verified_answer(done: LoggedIn) -> pb::VerifySecondFactorResponse {
    let password_change_required = done.password_change_required;
    let r = token_answer(done);
    pb::VerifySecondFactorResponse {
        access_token: r.access_token,
        token_type: r.token_type,
        expires_at: r.expires_at,
        expires_in: r.expires_in,
        session_id: r.session_id,
        refresh_token: r.refresh_token,
        refresh_expires_at: r.refresh_expires_at,
        session_expires_at: r.session_expires_at,
        password_change_required,
    }
}

#[tonic::async_trait]
impl AuthService for AuthGrpc {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        rpc(async {
            let req = request.get_ref();
            let client = self.caller(&request)?;
            let user = self
                .core
                .register(&req.username, &req.password, client)
                .await?;
            record_user_id(&user.user_id);
            Ok(pb::RegisterResponse {
                user_id: user.user_id,
                username: user.username,
            })
        })
        .await
    }

    async fn login(
        &self,
        request: Request<pb::LoginRequest>,
    ) -> Result<Response<pb::LoginResponse>, Status> {
        rpc(async {
            let req = request.get_ref();
            let client = client_info(
                &request,
                self.core.trusted_proxies(),
                &req.client_ip,
                &req.user_agent,
            )?;
            let done = match self
                .core
                .login(&req.username, &req.password, client)
                .await?
            {
                Login::Tokens(done) => *done,
                Login::SecondFactorRequired { ticket, expires_at } => {
                    return Ok(pb::LoginResponse {
                        second_factor_required: true,
                        mfa_ticket: ticket,
                        mfa_ticket_expires_at: Some(timestamp(expires_at)),
                        ..Default::default()
                    });
                }
            };
            record_user_id(&done.claims.sub);
            let password_change_required = done.password_change_required;
            let r = token_answer(done);
            Ok(pb::LoginResponse {
                access_token: r.access_token,
                token_type: r.token_type,
                expires_at: r.expires_at,
                expires_in: r.expires_in,
                session_id: r.session_id,
                refresh_token: r.refresh_token,
                refresh_expires_at: r.refresh_expires_at,
                session_expires_at: r.session_expires_at,
                password_change_required,
                ..Default::default()
            })
        })
        .await
    }

    async fn refresh(
        &self,
        request: Request<pb::RefreshRequest>,
    ) -> Result<Response<pb::RefreshResponse>, Status> {
        rpc(async {
            let req = request.get_ref();
            let client = client_info(
                &request,
                self.core.trusted_proxies(),
                &req.client_ip,
                &req.user_agent,
            )?;
            let done = self.core.refresh(&req.refresh_token, client).await?;
            Ok(token_answer(done))
        })
        .await
    }

    async fn logout(
        &self,
        request: Request<pb::LogoutRequest>,
    ) -> Result<Response<pb::LogoutResponse>, Status> {
        rpc(async {
            let client = self.caller(&request)?;
            self.core
                .logout(bearer(&request).as_deref(), client)
                .await?;
            Ok(pb::LogoutResponse {})
        })
        .await
    }

    async fn change_password(
        &self,
        request: Request<pb::ChangePasswordRequest>,
    ) -> Result<Response<pb::ChangePasswordResponse>, Status> {
        rpc(async {
            let req = request.get_ref();
            let revoked = self
                .core
                .change_password(
                    bearer(&request).as_deref(),
                    &req.current_password,
                    &req.new_password,
                    &factor(req.second_factor.as_ref()),
                    self.caller(&request)?,
                )
                .await?;
            Ok(pb::ChangePasswordResponse {
                revoked_sessions: revoked,
            })
        })
        .await
    }

    async fn list_sessions(
        &self,
        request: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        rpc(async {
            let req = request.get_ref();
            let SessionList {
                sessions,
                current,
                total,
                next_page_token,
                second_factor_enabled,
                recovery,
            } = self
                .core
                .list_sessions(bearer(&request).as_deref(), req.page_size, &req.page_token)
                .await?;
            let sessions: Vec<pb::Session> = sessions
                .into_iter()
                .map(|s| pb::Session {
                    current: s.session_id == current,
                    login_time: Some(timestamp(s.login_time)),
                    last_seen: Some(timestamp(s.last_seen)),
                    expires_at: Some(timestamp(s.expires_at())),
                    session_expires_at: Some(timestamp(s.absolute_end)),
                    amr: s.amr.split_whitespace().map(str::to_owned).collect(),
                    session_id: s.session_id,
                    ip: s.ip,
                    user_agent: s.user_agent,
                })
                .collect();
            let (recovery_code_used_at, recovery_code_used_ip) = match recovery.last_used {
                Some((at, ip)) => (Some(timestamp(at)), ip),
                None => (None, String::new()),
            };
            Ok(pb::ListSessionsResponse {
                active_count: total,
                sessions,
                next_page_token: next_page_token.unwrap_or_default(),
                second_factor_enabled,
                recovery_code_used_at,
                recovery_code_used_ip,
                recovery_codes_remaining: recovery.remaining,
            })
        })
        .await
    }

    async fn revoke_session(
        &self,
        request: Request<pb::RevokeSessionRequest>,
    ) -> Result<Response<pb::RevokeSessionResponse>, Status> {
        rpc(async {
            self.core
                .revoke_session(
                    bearer(&request).as_deref(),
                    &request.get_ref().session_id,
                    &factor(request.get_ref().second_factor.as_ref()),
                    self.caller(&request)?,
                )
                .await?;
            Ok(pb::RevokeSessionResponse {})
        })
        .await
    }

    async fn enroll_totp(
        &self,
        request: Request<pb::EnrollTotpRequest>,
    ) -> Result<Response<pb::EnrollTotpResponse>, Status> {
        rpc(async {
            let e = self
                .core
                .enroll_totp(bearer(&request).as_deref(), self.caller(&request)?)
                .await?;
            Ok(pb::EnrollTotpResponse {
                secret: e.secret_base32,
                otpauth_uri: e.uri,
                qr_png: e.qr_png,
                algorithm: crate::auth::totp::ALGORITHM.to_owned(),
                digits: e.params.digits,
                period_seconds: u32::try_from(e.params.period).unwrap_or_default(),
            })
        })
        .await
    }

    async fn confirm_totp(
        &self,
        request: Request<pb::ConfirmTotpRequest>,
    ) -> Result<Response<pb::ConfirmTotpResponse>, Status> {
        rpc(async {
            let recovery_codes = self
                .core
                .confirm_totp(
                    bearer(&request).as_deref(),
                    &request.get_ref().code,
                    &request.get_ref().current_password,
                    self.caller(&request)?,
                )
                .await?;
            Ok(pb::ConfirmTotpResponse { recovery_codes })
        })
        .await
    }

    async fn verify_second_factor(
        &self,
        request: Request<pb::VerifySecondFactorRequest>,
    ) -> Result<Response<pb::VerifySecondFactorResponse>, Status> {
        rpc(async {
            let req = request.get_ref();
            let client = client_info(
                &request,
                self.core.trusted_proxies(),
                &req.client_ip,
                &req.user_agent,
            )?;
            let given = GivenFactor {
                totp_code: req.totp_code.clone(),
                recovery_code: req.recovery_code.clone(),
            };
            let done = self
                .core
                .verify_second_factor(&req.mfa_ticket, &given, client)
                .await?;
            record_user_id(&done.claims.sub);
            Ok(verified_answer(done))
        })
        .await
    }

    async fn disable_totp(
        &self,
        request: Request<pb::DisableTotpRequest>,
    ) -> Result<Response<pb::DisableTotpResponse>, Status> {
        rpc(async {
            self.core
                .disable_totp(
                    bearer(&request).as_deref(),
                    &factor(request.get_ref().second_factor.as_ref()),
                    self.caller(&request)?,
                )
                .await?;
            Ok(pb::DisableTotpResponse {})
        })
        .await
    }

    async fn regenerate_recovery_codes(
        &self,
        request: Request<pb::RegenerateRecoveryCodesRequest>,
    ) -> Result<Response<pb::RegenerateRecoveryCodesResponse>, Status> {
        rpc(async {
            let recovery_codes = self
                .core
                .regenerate_recovery_codes(
                    bearer(&request).as_deref(),
                    &factor(request.get_ref().second_factor.as_ref()),
                    self.caller(&request)?,
                )
                .await?;
            Ok(pb::RegenerateRecoveryCodesResponse { recovery_codes })
        })
        .await
    }

    type WatchRevocationsStream =
        Pin<Box<dyn Stream<Item = Result<pb::RevocationEvent, Status>> + Send + 'static>>;

    async fn watch_revocations(
        &self,
        request: Request<pb::WatchRevocationsRequest>,
    ) -> Result<Response<Self::WatchRevocationsStream>, Status> {
        let credential = bearer(&request);
        let connection = request
            .extensions()
            .get::<Peer>()
            .and_then(Peer::remote_addr)
            .or_else(|| request.remote_addr());
        let after = request.into_inner().after;
        let (feed, permit) = rpc(async {
            self.core
                .watch_revocations(
                    credential.as_deref(),
                    connection,
                    Some(after.as_str()).filter(|a| !a.is_empty()),
                )
                .await
        })
        .await?
        .into_inner();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(pump(
            feed,
            permit,
            tx,
            self.heartbeat,
            self.stopping.clone(),
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn validate_token(
        &self,
        request: Request<pb::ValidateTokenRequest>,
    ) -> Result<Response<pb::ValidateTokenResponse>, Status> {
        hot_rpc(auth_service_server::SERVICE_NAME, "ValidateToken", async {
            let req = request.get_ref();
            let requirements = requirements(req)?;
            Ok(match self.core.validate(&req.token).await? {
                Validation::Valid(v) if !self.core.meets(&v.claims, &requirements) => {
                    log_refusal(
                        "ValidateToken",
                        Some(InvalidReason::InsufficientAuthentication),
                    );
                    // RFC 9470: say what the token has, so the caller knows what to ask for.
                    pb::ValidateTokenResponse {
                        valid: false,
                        reason: pb::InvalidReason::InsufficientAuthentication.into(),
                        user_id: v.claims.sub.clone(),
                        session_id: v.claims.sid.clone(),
                        auth_time: Some(timestamp(v.claims.login_time())),
                        amr: v.claims.amr,
                        ..Default::default()
                    }
                }
                Validation::Valid(v) => {
                    record_user_id(&v.claims.sub);
                    let auth_time = v.claims.login_time();
                    pb::ValidateTokenResponse {
                        valid: true,
                        reason: pb::InvalidReason::Unspecified.into(),
                        user_id: v.claims.sub,
                        username: v.claims.username,
                        session_id: v.claims.sid,
                        issued_at: Some(timestamp(v.claims.iat)),
                        expires_at: Some(timestamp(v.claims.exp)),
                        revocation_checked: v.revocation_checked,
                        auth_time: Some(timestamp(auth_time)),
                        amr: v.claims.amr,
                        roles: v.roles,
                    }
                }
                Validation::Invalid(r) => {
                    log_refusal("ValidateToken", Some(r));
                    pb::ValidateTokenResponse {
                        valid: false,
                        reason: reason(r).into(),
                        ..Default::default()
                    }
                }
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_dropped_from_gateway_addresses() {
        assert_eq!(
            parse_ip("203.0.113.7:5555").unwrap().to_string(),
            "203.0.113.7"
        );
        assert_eq!(
            parse_ip("[2001:db8::1]:443").unwrap().to_string(),
            "2001:db8::1"
        );
        assert_eq!(parse_ip("::ffff:10.0.0.1").unwrap().to_string(), "10.0.0.1");
        assert!(parse_ip("not an ip").is_none());
    }

    #[test]
    fn bearer_scheme_is_case_insensitive_and_required() {
        let mut r = Request::new(());
        r.metadata_mut()
            .insert("authorization", "bearer abc".parse().unwrap());
        assert_eq!(bearer(&r).as_deref(), Some("abc"));
        r.metadata_mut()
            .insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(bearer(&r), None);
    }
}

//! The reference server: the least a ValidateToken can cost on this machine and stack.
//!
//! A tonic server (same tonic, same h2, same generator, same loopback) that answers
//! AuthService/ValidateToken with the reply authd gives for the live session, built from
//! fixed fields, after — with `--reference-redis` — the one pipelined Redis round trip
//! that docs/design.md §2 requires (`EXISTS` of the blacklist entry, `HMGET` of the session),
//! on one multiplexed connection. No JWT verify, no logging, no metrics, no middleware.
//! Without `--reference-redis` it is the message exchange alone.
//!
//! authd-bench starts it as a child process of its own (`--serve-reference`), so its CPU
//! is measured apart from the generator's, as authd's is.

use std::pin::Pin;

use anyhow::Context;
use authd::proto::auth::v1 as pb;
use authd::proto::auth::v1::auth_service_server::{AuthService, AuthServiceServer};
use futures::Stream;
use redis::IntoConnectionInfo;
use redis::aio::MultiplexedConnection;
use redis::io::tcp::TcpSettings;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

/// What the reference answers and which Redis keys it reads.
#[derive(Clone, Debug)]
pub struct Settings {
    pub redis_url: Option<String>,
    /// The live session's blacklist key and session key.
    pub revoked_key: String,
    pub session_key: String,
    pub jti: String,
    pub reply: pb::ValidateTokenResponse,
}

impl Settings {
    /// As command-line arguments for the child process.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            "--reference-keys".to_owned(),
            self.revoked_key.clone(),
            self.session_key.clone(),
            self.jti.clone(),
            "--reference-reply".to_owned(),
            self.reply.user_id.clone(),
            self.reply.username.clone(),
            self.reply.session_id.clone(),
            self.reply.issued_at.map_or(0, |t| t.seconds).to_string(),
            self.reply.expires_at.map_or(0, |t| t.seconds).to_string(),
        ];
        if let Some(url) = &self.redis_url {
            args.push("--reference-redis".to_owned());
            args.push(url.clone());
        }
        args
    }

    /// From `--reference-keys REVOKED SESSION JTI` and
    /// `--reference-reply USER NAME SID IAT EXP`.
    pub fn from_args(
        redis_url: Option<String>,
        keys: &[String],
        reply: &[String],
    ) -> anyhow::Result<Self> {
        let [revoked_key, session_key, jti] = keys else {
            anyhow::bail!("--reference-keys takes REVOKED SESSION JTI");
        };
        let [user_id, username, session_id, iat, exp] = reply else {
            anyhow::bail!("--reference-reply takes USER NAME SID IAT EXP");
        };
        let time = |s: &str| -> anyhow::Result<prost_types::Timestamp> {
            Ok(prost_types::Timestamp {
                seconds: s.parse().with_context(|| format!("not a time: {s}"))?,
                nanos: 0,
            })
        };
        Ok(Self {
            redis_url,
            revoked_key: revoked_key.clone(),
            session_key: session_key.clone(),
            jti: jti.clone(),
            reply: pb::ValidateTokenResponse {
                valid: true,
                reason: pb::InvalidReason::Unspecified.into(),
                user_id: user_id.clone(),
                username: username.clone(),
                session_id: session_id.clone(),
                issued_at: Some(time(iat)?),
                expires_at: Some(time(exp)?),
                // authd's bytes, also without Redis: the same messages either way.
                revocation_checked: true,
                // A Login's token: logged in when issued, by password.
                auth_time: Some(time(iat)?),
                amr: vec!["pwd".to_owned()],
                roles: Vec::new(),
            },
        })
    }
}

/// Serves until killed; prints `listening <addr>` on stdout once bound.
pub async fn serve(settings: Settings) -> anyhow::Result<()> {
    // TCP_NODELAY on both sides, as authd sets it (src/transport.rs, redis_conn.rs).
    let redis = match &settings.redis_url {
        Some(url) => {
            let info = url
                .as_str()
                .into_connection_info()?
                .set_tcp_settings(TcpSettings::default().set_nodelay(true));
            Some(
                redis::Client::open(info)?
                    .get_multiplexed_async_connection()
                    .await
                    .context("reference server: Redis")?,
            )
        }
        None => None,
    };
    let incoming = TcpIncoming::bind(([127, 0, 0, 1], 0).into())?.with_nodelay(Some(true));
    println!("listening {}", incoming.local_addr()?);
    tonic::transport::Server::builder()
        .add_service(AuthServiceServer::new(Reference { settings, redis }))
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}

struct Reference {
    settings: Settings,
    redis: Option<MultiplexedConnection>,
}

impl Reference {
    /// The session check's round trip; whether the session holds the token.
    async fn check(&self) -> Result<bool, Status> {
        let Some(conn) = &self.redis else {
            return Ok(true);
        };
        let mut conn = conn.clone();
        let mut pipe = redis::pipe();
        pipe.exists(&self.settings.revoked_key)
            .hmget(&self.settings.session_key, &["jti", "seen", "idle"]);
        type Reply = (bool, (Option<String>, Option<i64>, Option<i64>));
        let (revoked, (jti, _, _)): Reply = pipe
            .query_async(&mut conn)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(!revoked && jti.as_deref() == Some(self.settings.jti.as_str()))
    }
}

fn unimplemented<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented(
        "the reference server answers ValidateToken only",
    ))
}

#[tonic::async_trait]
impl AuthService for Reference {
    async fn register(
        &self,
        _: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        unimplemented()
    }

    async fn login(
        &self,
        _: Request<pb::LoginRequest>,
    ) -> Result<Response<pb::LoginResponse>, Status> {
        unimplemented()
    }

    async fn refresh(
        &self,
        _: Request<pb::RefreshRequest>,
    ) -> Result<Response<pb::RefreshResponse>, Status> {
        unimplemented()
    }

    async fn logout(
        &self,
        _: Request<pb::LogoutRequest>,
    ) -> Result<Response<pb::LogoutResponse>, Status> {
        unimplemented()
    }

    async fn change_password(
        &self,
        _: Request<pb::ChangePasswordRequest>,
    ) -> Result<Response<pb::ChangePasswordResponse>, Status> {
        unimplemented()
    }

    async fn list_sessions(
        &self,
        _: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        unimplemented()
    }

    async fn revoke_session(
        &self,
        _: Request<pb::RevokeSessionRequest>,
    ) -> Result<Response<pb::RevokeSessionResponse>, Status> {
        unimplemented()
    }

    async fn enroll_totp(
        &self,
        _: Request<pb::EnrollTotpRequest>,
    ) -> Result<Response<pb::EnrollTotpResponse>, Status> {
        unimplemented()
    }

    async fn confirm_totp(
        &self,
        _: Request<pb::ConfirmTotpRequest>,
    ) -> Result<Response<pb::ConfirmTotpResponse>, Status> {
        unimplemented()
    }

    async fn verify_second_factor(
        &self,
        _: Request<pb::VerifySecondFactorRequest>,
    ) -> Result<Response<pb::VerifySecondFactorResponse>, Status> {
        unimplemented()
    }

    async fn disable_totp(
        &self,
        _: Request<pb::DisableTotpRequest>,
    ) -> Result<Response<pb::DisableTotpResponse>, Status> {
        unimplemented()
    }

    async fn regenerate_recovery_codes(
        &self,
        _: Request<pb::RegenerateRecoveryCodesRequest>,
    ) -> Result<Response<pb::RegenerateRecoveryCodesResponse>, Status> {
        unimplemented()
    }

    async fn validate_token(
        &self,
        request: Request<pb::ValidateTokenRequest>,
    ) -> Result<Response<pb::ValidateTokenResponse>, Status> {
        if request.get_ref().token.is_empty() {
            return Err(Status::invalid_argument("token: must not be empty"));
        }
        let reply = if self.check().await? {
            self.settings.reply.clone()
        } else {
            pb::ValidateTokenResponse {
                valid: false,
                reason: pb::InvalidReason::SessionNotFound.into(),
                ..Default::default()
            }
        };
        Ok(Response::new(reply))
    }

    type WatchRevocationsStream =
        Pin<Box<dyn Stream<Item = Result<pb::RevocationEvent, Status>> + Send + 'static>>;

    async fn watch_revocations(
        &self,
        _: Request<pb::WatchRevocationsRequest>,
    ) -> Result<Response<Self::WatchRevocationsStream>, Status> {
        unimplemented()
    }
}

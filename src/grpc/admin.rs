//! `auth.v1.AdminService` over tonic: who is calling (bearer or client certificate),
//! then the core's admin operations.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::service::{bearer, client_info, rpc, timestamp};
use crate::auth::service::SessionList;
use crate::auth::service::admin::{Actor, ClientCert, CreateUser, UserView};
use crate::auth::{AuthCore, AuthError, ClientInfo};
use crate::proto::auth::v1 as pb;
use crate::proto::auth::v1::admin_service_server::AdminService;
use crate::store::audit::AuditFilter;
use crate::store::users::UserFilter;
use crate::transport::Peer;

/// The gRPC face of the admin operations.
#[derive(Debug, Clone)]
pub struct AdminGrpc {
    core: Arc<AuthCore>,
    /// `ADMIN_CLIENT_SANS`.
    client_sans: Arc<[String]>,
}

impl AdminGrpc {
    /// Serves `core`'s admin operations; certificates with one of `client_sans` may call.
    pub fn new(core: Arc<AuthCore>, client_sans: Vec<String>) -> Self {
        Self {
            core,
            client_sans: client_sans.into(),
        }
    }

    /// The caller, if it may call AdminService, and where it called from.
    async fn admit<T>(
        &self,
        method: &str,
        request: &Request<T>,
    ) -> Result<(Actor, ClientInfo), AuthError> {
        let client = client_info(request, self.core.trusted_proxies(), "", "")?;
        let cert = match request
            .extensions()
            .get::<Peer>()
            .and_then(Peer::client_sans)
        {
            None => ClientCert::None,
            Some(sans) => match sans
                .iter()
                .find(|san| self.client_sans.iter().any(|listed| san.is(listed)))
            {
                Some(san) => ClientCert::Admin(san.to_string()),
                None => ClientCert::Other,
            },
        };
        let actor = self
            .core
            .authorize_admin(method, bearer(request).as_deref(), cert, &client)
            .await?;
        if let Actor::User { user_id, .. } = &actor {
            crate::telemetry::record_user_id(user_id);
        }
        Ok((actor, client))
    }
}

fn user_message(u: UserView) -> pb::User {
    pb::User {
        user_id: u.user_id,
        username: u.username,
        roles: u.roles,
        disabled: u.disabled,
        password_change_required: u.password_change_required,
    }
}

fn millis(t: &prost_types::Timestamp) -> i64 {
    t.seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(t.nanos) / 1_000_000)
}

fn session_message(s: crate::store::sessions::SessionRecord) -> pb::Session {
    pb::Session {
        current: false,
        login_time: Some(timestamp(s.login_time)),
        last_seen: Some(timestamp(s.last_seen)),
        expires_at: Some(timestamp(s.expires_at())),
        session_expires_at: Some(timestamp(s.absolute_end)),
        amr: s.amr.split_whitespace().map(str::to_owned).collect(),
        session_id: s.session_id,
        ip: s.ip,
        user_agent: s.user_agent,
    }
}

#[tonic::async_trait]
impl AdminService for AdminGrpc {
    async fn create_user(
        &self,
        request: Request<pb::CreateUserRequest>,
    ) -> Result<Response<pb::CreateUserResponse>, Status> {
        rpc(async {
            let (actor, client) = self.admit("CreateUser", &request).await?;
            let r = request.into_inner();
            let user = self
                .core
                .admin_create_user(
                    &actor,
                    &client,
                    CreateUser {
                        username: r.username,
                        password: r.password,
                        password_hash: r.password_hash,
                        roles: r.roles,
                        require_password_change: r.require_password_change,
                    },
                )
                .await?;
            Ok(pb::CreateUserResponse {
                user: Some(user_message(user)),
            })
        })
        .await
    }

    async fn get_user(
        &self,
        request: Request<pb::GetUserRequest>,
    ) -> Result<Response<pb::GetUserResponse>, Status> {
        rpc(async {
            let (actor, client) = self.admit("GetUser", &request).await?;
            let user = self
                .core
                .admin_get_user(&actor, &client, &request.get_ref().user)
                .await?;
            Ok(pb::GetUserResponse {
                user: Some(user_message(user)),
            })
        })
        .await
    }

    async fn list_users(
        &self,
        request: Request<pb::ListUsersRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, Status> {
        rpc(async {
            let (actor, client) = self.admit("ListUsers", &request).await?;
            let r = request.get_ref();
            let filter = UserFilter {
                name_prefix: r.name_prefix.clone(),
                role: Some(r.role.trim().to_owned()).filter(|r| !r.is_empty()),
                disabled: r.disabled,
            };
            let page = self
                .core
                .admin_list_users(&actor, &client, filter, r.page_size, &r.page_token)
                .await?;
            Ok(pb::ListUsersResponse {
                users: page.users.into_iter().map(user_message).collect(),
                next_page_token: page.next_page_token.unwrap_or_default(),
            })
        })
        .await
    }

    async fn disable_user(
        &self,
        request: Request<pb::DisableUserRequest>,
    ) -> Result<Response<pb::DisableUserResponse>, Status> {
        rpc(async {
            let (actor, client) = self.admit("DisableUser", &request).await?;
            let revoked_sessions = self
                .core
                .admin_disable_user(&actor, &client, &request.get_ref().user)
                .await?;
            Ok(pb::DisableUserResponse { revoked_sessions })
        })
        .await
    }

    async fn enable_user(
        &self,
        request: Request<pb::EnableUserRequest>,
    ) -> Result<Response<pb::EnableUserResponse>, Status> {
        rpc(async {
            let (actor, client) = self.admit("EnableUser", &request).await?;
            let user = self
                .core
                .admin_enable_user(&actor, &client, &request.get_ref().user)
                .await?;
            Ok(pb::EnableUserResponse {
                user: Some(user_message(user)),
            })
        })
        .await
    }

    async fn delete_user(
        &self,
        request: Request<pb::DeleteUserRequest>,
    ) -> Result<Response<pb::DeleteUserResponse>, Status> {
        rpc(async {
            let (actor, client) = self.admit("DeleteUser", &request).await?;
            let revoked_sessions = self
                .core
                .admin_delete_user(&actor, &client, &request.get_ref().user)
                .await?;
            Ok(pb::DeleteUserResponse { revoked_sessions })
        })
        .await
    }

    async fn set_password(
        &self,
        request: Request<pb::SetPasswordRequest>,
    ) -> Result<Response<pb::SetPasswordResponse>, Status> {
        rpc(async {
            let (actor, client) = self.admit("SetPassword", &request).await?;
            let r = request.get_ref();
            let revoked_sessions = self
                .core
                .admin_set_password(&actor, &client, &r.user, &r.password, r.require_change)
                .await?;
            Ok(pb::SetPasswordResponse { revoked_sessions })
        })
        .await
    }

    async fn revoke_user_sessions(
        &self,
        request: Request<pb::RevokeUserSessionsRequest>,
    ) -> Result<Response<pb::RevokeUserSessionsResponse>, Status> {
        rpc(async {
            let (actor, client) = self.admit("RevokeUserSessions", &request).await?;
            let revoked_sessions = self
                .core
                .admin_revoke_user_sessions(&actor, &client, &request.get_ref().user)
                .await?;
            Ok(pb::RevokeUserSessionsResponse { revoked_sessions })
        })
        .await
    }

    async fn unlock_user(
        &self,
        request: Request<pb::UnlockUserRequest>,
    ) -> Result<Response<pb::UnlockUserResponse>, Status> {
        rpc(async {
            let (actor, client) = self.admit("UnlockUser", &request).await?;
            self.core
                .admin_unlock_user(&actor, &client, &request.get_ref().user)
                .await?;
            Ok(pb::UnlockUserResponse {})
        })
        .await
    }

    async fn reset_second_factor(
        &self,
        request: Request<pb::ResetSecondFactorRequest>,
    ) -> Result<Response<pb::ResetSecondFactorResponse>, Status> {
        rpc(async {
            let (actor, client) = self.admit("ResetSecondFactor", &request).await?;
            let removed = self
                .core
                .admin_reset_second_factor(&actor, &client, &request.get_ref().user)
                .await?;
            Ok(pb::ResetSecondFactorResponse { removed })
        })
        .await
    }

    async fn set_roles(
        &self,
        request: Request<pb::SetRolesRequest>,
    ) -> Result<Response<pb::SetRolesResponse>, Status> {
        rpc(async {
            let (actor, client) = self.admit("SetRoles", &request).await?;
            let r = request.get_ref();
            let user = self
                .core
                .admin_set_roles(&actor, &client, &r.user, &r.roles)
                .await?;
            Ok(pb::SetRolesResponse {
                user: Some(user_message(user)),
            })
        })
        .await
    }

    async fn list_user_sessions(
        &self,
        request: Request<pb::ListUserSessionsRequest>,
    ) -> Result<Response<pb::ListUserSessionsResponse>, Status> {
        rpc(async {
            let (actor, client) = self.admit("ListUserSessions", &request).await?;
            let r = request.get_ref();
            let SessionList {
                sessions,
                total,
                next_page_token,
                ..
            } = self
                .core
                .admin_list_user_sessions(&actor, &client, &r.user, r.page_size, &r.page_token)
                .await?;
            Ok(pb::ListUserSessionsResponse {
                sessions: sessions.into_iter().map(session_message).collect(),
                active_count: total,
                next_page_token: next_page_token.unwrap_or_default(),
            })
        })
        .await
    }

    async fn list_audit_events(
        &self,
        request: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        rpc(async {
            let (actor, client) = self.admit("ListAuditEvents", &request).await?;
            let r = request.get_ref();
            let filter = AuditFilter {
                user_id: None,
                kind: Some(r.kind.trim().to_owned()).filter(|k| !k.is_empty()),
                since_ms: r.since.as_ref().map(millis),
                until_ms: r.until.as_ref().map(millis),
            };
            let page = self
                .core
                .admin_list_audit_events(
                    &actor,
                    &client,
                    &r.user,
                    filter,
                    r.page_size,
                    &r.page_token,
                )
                .await?;
            Ok(pb::ListAuditEventsResponse {
                events: page
                    .events
                    .into_iter()
                    .map(|e| pb::AuditEvent {
                        id: e.id,
                        at: Some(prost_types::Timestamp {
                            seconds: e.at_ms.div_euclid(1000),
                            nanos: i32::try_from(e.at_ms.rem_euclid(1000) * 1_000_000)
                                .unwrap_or_default(),
                        }),
                        kind: e.kind,
                        user_id: e.user_id.unwrap_or_default(),
                        username_hash: e.username_hash.unwrap_or_default(),
                        client_ip: e.client_ip,
                        user_agent: e.user_agent,
                        session_id: e.session_id.unwrap_or_default(),
                        jti: e.jti.unwrap_or_default(),
                        detail: e.detail,
                    })
                    .collect(),
                next_page_token: page.next_page_token.unwrap_or_default(),
            })
        })
        .await
    }
}

//! Envoy's external authorization (`envoy.service.auth.v3.Authorization/Check`), on the
//! same port and from the same validation core as ValidateToken.

use std::sync::Arc;

use envoy_types::ext_authz::v3::pb::{
    Authorization, CheckRequest, CheckResponse, HeaderAppendAction, HttpStatusCode,
};
use envoy_types::ext_authz::v3::{
    CheckRequestExt, CheckResponseExt, DeniedHttpResponseBuilder, OkHttpResponseBuilder,
};
use envoy_types::pb::google::protobuf::value::Kind;
use envoy_types::pb::google::protobuf::{ListValue, Struct, Value};
use tonic::{Request, Response, Status};

use super::service::{hot_rpc, log_refusal};
use crate::auth::service::Validation;
use crate::auth::{AuthCore, AuthError, InvalidReason};
use crate::bearer::bearer_token;

/// Headers authd sets on an allowed request for the upstream.
pub const USER_ID_HEADER: &str = "x-auth-user-id";
/// The username.
pub const USERNAME_HEADER: &str = "x-auth-username";
/// The session id.
pub const SESSION_ID_HEADER: &str = "x-auth-session-id";
/// Present (value `revocation-unchecked`) when the session store could not be asked.
pub const DEGRADED_HEADER: &str = "x-auth-degraded";
/// The user's roles, comma-separated (empty for none).
pub const ROLES_HEADER: &str = "x-auth-roles";
/// The token's `amr`, comma-separated (`pwd`, or `pwd,otp` after a second factor).
pub const AMR_HEADER: &str = "x-auth-amr";
/// When the user logged in (the token's `auth_time`), unix seconds.
pub const AUTH_TIME_HEADER: &str = "x-auth-time";

/// The Check service.
#[derive(Debug, Clone)]
pub struct ExtAuthz {
    core: Arc<AuthCore>,
    strip_authorization: bool,
}

impl ExtAuthz {
    /// Checks with `core`; `strip_authorization` removes the bearer from allowed requests.
    pub fn new(core: Arc<AuthCore>, strip_authorization: bool) -> Self {
        Self {
            core,
            strip_authorization,
        }
    }

    async fn decide(&self, request: &CheckRequest) -> Result<CheckResponse, AuthError> {
        let token = request
            .get_client_headers()
            .and_then(|h| h.get("authorization"))
            .and_then(|v| bearer_token(v))
            .map(str::to_owned);
        let Some(token) = token else {
            return Ok(denied(None));
        };
        let verdict = match self.core.validate(&token).await {
            Ok(verdict) => verdict,
            Err(AuthError::InvalidArgument(_)) => Validation::Invalid(InvalidReason::Malformed),
            Err(e) => return Err(e),
        };
        let valid = match verdict {
            Validation::Valid(valid) => valid,
            Validation::Invalid(reason) => return Ok(denied(Some(reason))),
        };
        crate::telemetry::record_user_id(&valid.claims.sub);
        let mut ok = OkHttpResponseBuilder::new();
        // Overwrite whatever the client sent under these names.
        let overwrite = Some(HeaderAppendAction::OverwriteIfExistsOrAdd);
        ok.add_header(USER_ID_HEADER, &valid.claims.sub, overwrite, false)
            .add_header(USERNAME_HEADER, &valid.claims.username, overwrite, false)
            .add_header(SESSION_ID_HEADER, &valid.claims.sid, overwrite, false)
            .add_header(ROLES_HEADER, valid.roles.join(","), overwrite, false)
            .add_header(AMR_HEADER, valid.claims.amr.join(","), overwrite, false)
            .add_header(
                AUTH_TIME_HEADER,
                valid.claims.login_time().to_string(),
                overwrite,
                false,
            );
        if valid.revocation_checked {
            ok.remove_header(DEGRADED_HEADER);
        } else {
            ok.add_header(DEGRADED_HEADER, "revocation-unchecked", overwrite, false);
        }
        if self.strip_authorization {
            ok.remove_header("authorization");
        }
        let mut response = CheckResponse::with_status(Status::ok("allowed"));
        response.set_http_response(ok);
        response.set_dynamic_metadata(Some(metadata(&valid)));
        Ok(response)
    }
}

/// What Envoy's filters after ext_authz (RBAC, say) can match, under the namespace
/// `envoy.filters.http.ext_authz`: `user_id`, `username`, `session_id`, `roles` and `amr`
/// as lists of strings, and `auth_time` (unix seconds) as a number.
fn metadata(valid: &crate::auth::service::ValidToken) -> Struct {
    let text = |s: &str| Value {
        kind: Some(Kind::StringValue(s.to_owned())),
    };
    let roles = Value {
        kind: Some(Kind::ListValue(ListValue {
            values: valid.roles.iter().map(|r| text(r)).collect(),
        })),
    };
    Struct {
        fields: [
            ("user_id".to_owned(), text(&valid.claims.sub)),
            ("username".to_owned(), text(&valid.claims.username)),
            ("session_id".to_owned(), text(&valid.claims.sid)),
            ("roles".to_owned(), roles),
            (
                "amr".to_owned(),
                Value {
                    kind: Some(Kind::ListValue(ListValue {
                        values: valid.claims.amr.iter().map(|a| text(a)).collect(),
                    })),
                },
            ),
            (
                "auth_time".to_owned(),
                Value {
                    kind: Some(Kind::NumberValue(valid.claims.login_time() as f64)),
                },
            ),
        ]
        .into_iter()
        .collect(),
    }
}

/// 401 with a `WWW-Authenticate` challenge (RFC 6750): no error code when no token was
/// presented, `invalid_token` and the reason otherwise.
fn denied(reason: Option<InvalidReason>) -> CheckResponse {
    log_refusal("Check", reason);
    let (challenge, body) = match reason {
        None => (
            r#"Bearer realm="authd""#.to_owned(),
            "missing bearer token".to_owned(),
        ),
        Some(reason) => (
            format!(
                r#"Bearer realm="authd", error="invalid_token", error_description="{}""#,
                reason.as_str()
            ),
            format!("invalid token: {}", reason.as_str()),
        ),
    };
    let mut deny = DeniedHttpResponseBuilder::new();
    deny.set_http_status(HttpStatusCode::Unauthorized)
        .add_header(
            "www-authenticate",
            challenge,
            Some(HeaderAppendAction::OverwriteIfExistsOrAdd),
            false,
        )
        .set_body(body.clone());
    let mut response = CheckResponse::with_status(Status::unauthenticated(body));
    response.set_http_response(deny);
    response
}

#[tonic::async_trait]
impl Authorization for ExtAuthz {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        hot_rpc(
            "envoy.service.auth.v3.Authorization",
            "Check",
            self.decide(request.get_ref()),
        )
        .await
    }
}

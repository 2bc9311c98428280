//! Calls to authd as its clients make them: the RPCs over gRPC (on a [`TestApp`] or any
//! client), the revocation stream, Envoy's Check, and a bare HTTP `GET`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use authd::proto::auth::v1 as pb;
use authd::proto::auth::v1::auth_service_client::AuthServiceClient;
use authd::proto::auth::v1::{RevocationEvent, RevocationKind, WatchRevocationsRequest};
use envoy_types::ext_authz::v3::pb::{CheckRequest, CheckResponse, HttpResponse};
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
    HttpRequest, Request as AttrRequest,
};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use tonic::transport::Channel;
use tonic::{Request, Status, Streaming};

use super::app::{PASSWORD, TestApp};

/// `request` with `authorization: Bearer <token>`.
pub fn bearer<T>(token: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii token"),
    );
    request
}

impl TestApp {
    /// Login as a gateway would call it, passing the end user's address.
    pub async fn login_from(
        &self,
        username: &str,
        password: &str,
        client_ip: &str,
    ) -> Result<pb::LoginResponse, Status> {
        self.client
            .clone()
            .login(pb::LoginRequest {
                username: username.into(),
                password: password.into(),
                client_ip: client_ip.into(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn register(
        &self,
        username: &str,
        password: &str,
    ) -> Result<pb::RegisterResponse, Status> {
        register_on(&self.client, username, password).await
    }

    pub async fn login(&self, username: &str, password: &str) -> Result<pb::LoginResponse, Status> {
        self.login_from(username, password, "").await
    }

    /// Registers `username` with [`PASSWORD`] and logs in.
    pub async fn user_with_session(
        &self,
        username: &str,
    ) -> (pb::RegisterResponse, pb::LoginResponse) {
        let user = self.register(username, PASSWORD).await.expect("register");
        let login = self.login(username, PASSWORD).await.expect("login");
        (user, login)
    }

    pub async fn validate(&self, token: &str) -> Result<pb::ValidateTokenResponse, Status> {
        self.client
            .clone()
            .validate_token(pb::ValidateTokenRequest {
                token: token.into(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
    }

    /// The reason ValidateToken gives; panics if it errs.
    pub async fn reason(&self, token: &str) -> pb::InvalidReason {
        let v = self.validate(token).await.expect("ValidateToken answers");
        v.reason()
    }

    pub async fn logout(&self, token: &str) -> Result<(), Status> {
        self.client
            .clone()
            .logout(bearer(token, pb::LogoutRequest {}))
            .await
            .map(|_| ())
    }

    /// The first page of the caller's sessions, at the default size.
    pub async fn list_sessions(&self, token: &str) -> Result<pb::ListSessionsResponse, Status> {
        self.list_sessions_page(token, 0, "").await
    }

    pub async fn list_sessions_page(
        &self,
        token: &str,
        page_size: i32,
        page_token: &str,
    ) -> Result<pb::ListSessionsResponse, Status> {
        let request = pb::ListSessionsRequest {
            page_size,
            page_token: page_token.into(),
        };
        self.client
            .clone()
            .list_sessions(bearer(token, request))
            .await
            .map(|r| r.into_inner())
    }

    pub async fn revoke_session(&self, token: &str, session_id: &str) -> Result<(), Status> {
        self.client
            .clone()
            .revoke_session(bearer(
                token,
                pb::RevokeSessionRequest {
                    session_id: session_id.into(),
                    ..Default::default()
                },
            ))
            .await
            .map(|_| ())
    }

    pub async fn change_password(
        &self,
        token: &str,
        current: &str,
        new: &str,
    ) -> Result<pb::ChangePasswordResponse, Status> {
        self.client
            .clone()
            .change_password(bearer(
                token,
                pb::ChangePasswordRequest {
                    current_password: current.into(),
                    new_password: new.into(),
                    ..Default::default()
                },
            ))
            .await
            .map(|r| r.into_inner())
    }

    /// Refresh with `refresh_token`.
    pub async fn refresh(&self, refresh_token: &str) -> Result<pb::RefreshResponse, Status> {
        self.client
            .clone()
            .refresh(pb::RefreshRequest {
                refresh_token: refresh_token.into(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
    }

    /// `GET path` on the HTTP listener: the status code and the body.
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        http_get(self.http_addr.expect("HTTP listener on"), path).await
    }

    /// The `/metrics` page.
    pub async fn scrape(&self) -> String {
        let (status, body) = self.http_get("/metrics").await;
        assert_eq!(status, 200, "{body}");
        body
    }
}

/// Register through any client (another process's, say).
pub async fn register_on(
    client: &AuthServiceClient<Channel>,
    username: &str,
    password: &str,
) -> Result<pb::RegisterResponse, Status> {
    client
        .clone()
        .register(pb::RegisterRequest {
            username: username.into(),
            password: password.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// Login through any client, with no client address or agent.
pub async fn login_on(
    client: &AuthServiceClient<Channel>,
    username: &str,
    password: &str,
) -> Result<pb::LoginResponse, Status> {
    client
        .clone()
        .login(pb::LoginRequest {
            username: username.into(),
            password: password.into(),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

/// A bare HTTP/1.1 `GET`: the status code and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

/// Opens a stream on `client`, with `credential` as the bearer if there is one.
pub async fn try_watch(
    client: &AuthServiceClient<Channel>,
    credential: Option<&str>,
    after: &str,
) -> Result<Streaming<RevocationEvent>, Status> {
    let request = WatchRevocationsRequest {
        after: after.into(),
    };
    let request = match credential {
        Some(credential) => bearer(credential, request),
        None => Request::new(request),
    };
    Ok(client
        .clone()
        .watch_revocations(request)
        .await?
        .into_inner())
}

/// The next event that is not a heartbeat.
pub async fn next_event(stream: &mut Streaming<RevocationEvent>) -> RevocationEvent {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .expect("an event within 5 s")
            .unwrap()
            .expect("stream open");
        if event.kind() != RevocationKind::Heartbeat {
            return event;
        }
    }
}

/// An Envoy Check request for `GET /orders` with `headers`.
fn check_request(headers: &[(&str, &str)]) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(AttrRequest {
                http: Some(HttpRequest {
                    method: "GET".into(),
                    path: "/orders".into(),
                    headers: headers
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// Envoy's Check on `app`, as the proxy asks it.
pub async fn check(app: &TestApp, headers: &[(&str, &str)]) -> CheckResponse {
    AuthorizationClient::new(app.channel.clone())
        .check(check_request(headers))
        .await
        .unwrap()
        .into_inner()
}

/// The headers an allowed answer sets, and those it removes.
pub fn allowed(r: &CheckResponse) -> (HashMap<String, String>, Vec<String>) {
    assert_eq!(r.status.as_ref().unwrap().code, 0, "{r:?}");
    let Some(HttpResponse::OkResponse(ok)) = &r.http_response else {
        panic!("not allowed: {r:?}")
    };
    let set = ok
        .headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .map(|h| (h.key.clone(), h.value.clone()))
        .collect();
    (set, ok.headers_to_remove.clone())
}

/// HTTP status, `www-authenticate` and body of a denied answer.
pub fn denied(r: &CheckResponse) -> (i32, String, String) {
    assert_eq!(r.status.as_ref().unwrap().code, 16, "{r:?}");
    let Some(HttpResponse::DeniedResponse(d)) = &r.http_response else {
        panic!("not denied: {r:?}")
    };
    let challenge = d
        .headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .find(|h| h.key == "www-authenticate")
        .map(|h| h.value.clone())
        .unwrap_or_default();
    (d.status.as_ref().unwrap().code, challenge, d.body.clone())
}

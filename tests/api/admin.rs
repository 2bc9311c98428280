//! AdminService over real gRPC: every call, who may make it, what ending a user's access
//! does to live tokens (in ValidateToken and behind the client layer), roles in every
//! answer, and the hostile cases.

use std::time::{Duration, Instant};

use authd::client::{AuthConfig, AuthContext, AuthLayer, AuthValidator, WatchCredential};
use authd::proto::auth::v1 as pb;
use authd::proto::auth::v1::admin_service_client::AdminServiceClient;
use authd::proto::example::v1::greeter_client::GreeterClient;
use authd::proto::example::v1::greeter_server::{Greeter, GreeterServer};
use authd::proto::example::v1::{HelloReply, HelloRequest};
use envoy_types::ext_authz::v3::pb::HttpResponse;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Channel, Server};
use tonic::{Code, Request, Response, Status};

use crate::support::*;

on_every_backend!(
    an_admin_can_make_every_call,
    anonymous_plain_demoted_and_disabled_callers_are_refused,
    disable_delete_and_revoke_end_live_tokens_at_once,
    a_disabled_user_with_the_right_password_hears_account_disabled,
    roles_are_in_every_answer_and_change_without_a_new_login,
    set_password_can_require_a_change_at_the_next_login,
    unlock_lifts_the_account_throttle,
    hostile_pages_tokens_and_sizes_are_refused,
    replays_and_unknown_users_answer_plainly,
    every_admin_call_is_audited_with_its_caller,
    an_mtls_client_with_a_listed_san_may_call_without_a_token,
    a_user_stored_before_the_migration_keeps_working,
    admin_service_is_described_by_reflection_and_reported_by_health,
);

/// An AdminService client on `app`.
pub(crate) fn admin_client(app: &TestApp) -> AdminServiceClient<Channel> {
    AdminServiceClient::new(app.channel.clone())
}

/// A user `name` with the admin role (given in the users table, as `authd users create
/// --role admin` does) and a token.
pub(crate) async fn admin(app: &TestApp, name: &str) -> String {
    let (user, _) = app.user_with_session(name).await;
    sqlx::query("UPDATE users SET roles = ',admin,' WHERE id = ?")
        .bind(&user.user_id)
        .execute(&app.db().await)
        .await
        .unwrap();
    // A fresh login: the roles mirror is written at login.
    app.login(name, PASSWORD).await.unwrap().access_token
}

pub(crate) fn user_req<T>(token: &str, message: T) -> Request<T> {
    bearer(token, message)
}

pub(crate) async fn get_user(app: &TestApp, token: &str, user: &str) -> Result<pb::User, Status> {
    admin_client(app)
        .get_user(user_req(token, pb::GetUserRequest { user: user.into() }))
        .await
        .map(|r| r.into_inner().user.unwrap())
}

pub(crate) async fn set_roles(app: &TestApp, token: &str, user: &str, roles: &[&str]) -> pb::User {
    admin_client(app)
        .set_roles(user_req(
            token,
            pb::SetRolesRequest {
                user: user.into(),
                roles: roles.iter().map(|r| (*r).to_owned()).collect(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap()
}

async fn list_users(
    app: &TestApp,
    token: &str,
    request: pb::ListUsersRequest,
) -> Result<pb::ListUsersResponse, Status> {
    admin_client(app)
        .list_users(user_req(token, request))
        .await
        .map(|r| r.into_inner())
}

pub(crate) async fn audit_rows(
    app: &TestApp,
    token: &str,
    request: pb::ListAuditEventsRequest,
) -> Result<pb::ListAuditEventsResponse, Status> {
    admin_client(app)
        .list_audit_events(user_req(token, request))
        .await
        .map(|r| r.into_inner())
}

async fn an_admin_can_make_every_call(backend: Backend) {
    let app = backend.app().spawn().await;
    let root = admin(&app, "root").await;
    let mut c = admin_client(&app);

    // CreateUser with a password, and with a hash made elsewhere.
    let ann = c
        .create_user(user_req(
            &root,
            pb::CreateUserRequest {
                username: "Ann".into(),
                password: PASSWORD.into(),
                roles: vec!["ops".into(), "billing:read".into()],
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(ann.username, "ann");
    assert_eq!(ann.roles, ["billing:read", "ops"]);
    let hash = bcrypt::hash("Imported-Pass-4", 4).unwrap();
    let bob = c
        .create_user(user_req(
            &root,
            pb::CreateUserRequest {
                username: "bob".into(),
                password_hash: hash.replacen("$2b$", "$2y$", 1),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    app.login("bob", "Imported-Pass-4").await.unwrap();
    assert_code(
        c.create_user(user_req(
            &root,
            pb::CreateUserRequest {
                username: "ANN".into(),
                password: PASSWORD.into(),
                ..Default::default()
            },
        ))
        .await,
        Code::AlreadyExists,
    );

    // GetUser by name (any case) and by id.
    assert_eq!(get_user(&app, &root, "ANN").await.unwrap(), ann);
    assert_eq!(get_user(&app, &root, &bob.user_id).await.unwrap(), bob);

    // ListUsers: pages, and each filter.
    let first = list_users(
        &app,
        &root,
        pb::ListUsersRequest {
            page_size: 2,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let names: Vec<_> = first.users.iter().map(|u| u.username.as_str()).collect();
    assert_eq!(names, ["ann", "bob"]);
    let rest = list_users(
        &app,
        &root,
        pb::ListUsersRequest {
            page_size: 2,
            page_token: first.next_page_token.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(rest.users.len(), 1);
    assert_eq!(rest.users[0].username, "root");
    assert!(rest.next_page_token.is_empty());
    let ops = list_users(
        &app,
        &root,
        pb::ListUsersRequest {
            role: "ops".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(ops.users, std::slice::from_ref(&ann));
    let prefixed = list_users(
        &app,
        &root,
        pb::ListUsersRequest {
            name_prefix: "b".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(prefixed.users, std::slice::from_ref(&bob));

    // SetRoles, ListUserSessions.
    assert_eq!(set_roles(&app, &root, "bob", &["ops"]).await.roles, ["ops"]);
    let sessions = c
        .list_user_sessions(user_req(
            &root,
            pb::ListUserSessionsRequest {
                user: "bob".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sessions.active_count, 1);
    assert_eq!(sessions.sessions.len(), 1);

    // DisableUser, the disabled filter, EnableUser.
    let disabled = c
        .disable_user(user_req(
            &root,
            pb::DisableUserRequest { user: "bob".into() },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(disabled.revoked_sessions, 1);
    let only_disabled = list_users(
        &app,
        &root,
        pb::ListUsersRequest {
            disabled: Some(true),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(only_disabled.users.len(), 1);
    assert_eq!(only_disabled.users[0].username, "bob");
    let enabled = c
        .enable_user(user_req(
            &root,
            pb::EnableUserRequest { user: "bob".into() },
        ))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert!(!enabled.disabled);
    app.login("bob", "Imported-Pass-4").await.unwrap();

    // RevokeUserSessions, SetPassword.
    let revoked = c
        .revoke_user_sessions(user_req(
            &root,
            pb::RevokeUserSessionsRequest { user: "bob".into() },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revoked.revoked_sessions, 1);
    c.set_password(user_req(
        &root,
        pb::SetPasswordRequest {
            user: "bob".into(),
            password: "Reset-By-Ops-55".into(),
            require_change: false,
        },
    ))
    .await
    .unwrap();
    assert_code(
        app.login("bob", "Imported-Pass-4").await,
        Code::Unauthenticated,
    );
    app.login("bob", "Reset-By-Ops-55").await.unwrap();

    // UnlockUser, DeleteUser; the audit rows of the deleted user stay.
    c.unlock_user(user_req(
        &root,
        pb::UnlockUserRequest { user: "bob".into() },
    ))
    .await
    .unwrap();
    c.delete_user(user_req(
        &root,
        pb::DeleteUserRequest { user: "bob".into() },
    ))
    .await
    .unwrap();
    assert_code(get_user(&app, &root, "bob").await, Code::NotFound);
    assert_code(
        app.login("bob", "Reset-By-Ops-55").await,
        Code::Unauthenticated,
    );
    let kept = eventually(Duration::from_secs(5), || async {
        audit_rows(
            &app,
            &root,
            pb::ListAuditEventsRequest {
                user: bob.user_id.clone(),
                kind: "login_succeeded".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .events
        .len()
            >= 3
    })
    .await;
    assert!(kept, "the deleted user's audit rows are gone");
}

async fn anonymous_plain_demoted_and_disabled_callers_are_refused(backend: Backend) {
    let app = backend.app().spawn().await;
    let root = admin(&app, "root").await;
    let (_, plain) = app.user_with_session("plain").await;
    let second = admin(&app, "second").await;

    // Anonymous: UNAUTHENTICATED, and a bad token too.
    let anonymous = admin_client(&app)
        .get_user(pb::GetUserRequest {
            user: "plain".into(),
        })
        .await;
    assert_code(anonymous, Code::Unauthenticated);
    assert_code(
        get_user(&app, "not.a.token", "plain").await,
        Code::Unauthenticated,
    );
    // A plain user: PERMISSION_DENIED, on every call.
    assert_code(
        get_user(&app, &plain.access_token, "plain").await,
        Code::PermissionDenied,
    );
    assert_code(
        admin_client(&app)
            .disable_user(user_req(
                &plain.access_token,
                pb::DisableUserRequest {
                    user: "root".into(),
                },
            ))
            .await,
        Code::PermissionDenied,
    );
    assert!(!get_user(&app, &root, "root").await.unwrap().disabled);
    // An admin: yes. Demoted: refused at once, with the same token.
    get_user(&app, &second, "plain").await.unwrap();
    set_roles(&app, &root, "second", &[]).await;
    assert_code(
        get_user(&app, &second, "plain").await,
        Code::PermissionDenied,
    );
    // Promoted again: in at once.
    set_roles(&app, &root, "second", &["admin"]).await;
    get_user(&app, &second, "plain").await.unwrap();
    // Disabled: its token is gone.
    admin_client(&app)
        .disable_user(user_req(
            &root,
            pb::DisableUserRequest {
                user: "second".into(),
            },
        ))
        .await
        .unwrap();
    assert_code(
        get_user(&app, &second, "plain").await,
        Code::Unauthenticated,
    );
}

async fn disable_delete_and_revoke_end_live_tokens_at_once(backend: Backend) {
    let app = backend.app().env("WATCH_HEARTBEAT", "100ms").spawn().await;
    let root = admin(&app, "root").await;
    let svc = protected(&app).await;
    for (name, call) in [("dora", "disable"), ("dave", "delete"), ("dina", "revoke")] {
        let (_, phone) = app.user_with_session(name).await;
        let laptop = app.login(name, PASSWORD).await.unwrap();
        for token in [&phone.access_token, &laptop.access_token] {
            assert!(app.validate(token).await.unwrap().valid);
            svc.hello(Some(token)).await.unwrap(); // cached for 60 s
        }
        let mut c = admin_client(&app);
        let ended = match call {
            "disable" => {
                c.disable_user(user_req(
                    &root,
                    pb::DisableUserRequest { user: name.into() },
                ))
                .await
                .unwrap()
                .into_inner()
                .revoked_sessions
            }
            "delete" => {
                c.delete_user(user_req(&root, pb::DeleteUserRequest { user: name.into() }))
                    .await
                    .unwrap()
                    .into_inner()
                    .revoked_sessions
            }
            _ => {
                c.revoke_user_sessions(user_req(
                    &root,
                    pb::RevokeUserSessionsRequest { user: name.into() },
                ))
                .await
                .unwrap()
                .into_inner()
                .revoked_sessions
            }
        };
        assert_eq!(ended, 2, "{call}");
        // ValidateToken: at once, no waiting at all.
        for token in [&phone.access_token, &laptop.access_token] {
            let v = app.validate(token).await.unwrap();
            assert!(!v.valid, "{call}: still valid");
        }
        // Behind the client layer: within a second (the revocation stream).
        for token in [&phone.access_token, &laptop.access_token] {
            let started = Instant::now();
            loop {
                match svc.hello(Some(token)).await {
                    Err(status) => {
                        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
                        break;
                    }
                    Ok(_) => assert!(
                        started.elapsed() < Duration::from_secs(1),
                        "{call}: still admitted after 1 s"
                    ),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    // Force-logout leaves the account usable.
    app.login("dina", PASSWORD).await.unwrap();
}

async fn a_disabled_user_with_the_right_password_hears_account_disabled(backend: Backend) {
    let app = backend.app().spawn().await;
    let root = admin(&app, "root").await;
    app.register("eve", PASSWORD).await.unwrap();
    admin_client(&app)
        .disable_user(user_req(
            &root,
            pb::DisableUserRequest { user: "eve".into() },
        ))
        .await
        .unwrap();
    let right = assert_code(app.login("eve", PASSWORD).await, Code::FailedPrecondition);
    assert_eq!(right.message(), "account disabled");
    let wrong = assert_code(
        app.login("eve", "Wrong-Pass-99").await,
        Code::Unauthenticated,
    );
    assert_eq!(wrong.message(), "invalid username or password");
    admin_client(&app)
        .enable_user(user_req(
            &root,
            pb::EnableUserRequest { user: "eve".into() },
        ))
        .await
        .unwrap();
    app.login("eve", PASSWORD).await.unwrap();
}

async fn roles_are_in_every_answer_and_change_without_a_new_login(backend: Backend) {
    let app = backend.app().env("WATCH_HEARTBEAT", "100ms").spawn().await;
    let root = admin(&app, "root").await;
    let (_, login) = app.user_with_session("fay").await;
    set_roles(&app, &root, "fay", &["ops"]).await;
    let token = login.access_token.as_str();

    // ValidateToken.
    assert_eq!(app.validate(token).await.unwrap().roles, ["ops"]);
    // Envoy's Check: a header and dynamic metadata.
    let bearer_header = format!("Bearer {token}");
    let r = check(&app, &[("authorization", &bearer_header)]).await;
    let (set, _) = allowed(&r);
    assert_eq!(set["x-auth-roles"], "ops");
    let metadata = r.dynamic_metadata.clone().expect("dynamic metadata");
    let roles = metadata.fields["roles"].clone();
    let listed: Vec<String> = match roles.kind {
        Some(envoy_types::pb::google::protobuf::value::Kind::ListValue(list)) => list
            .values
            .into_iter()
            .filter_map(|v| match v.kind {
                Some(envoy_types::pb::google::protobuf::value::Kind::StringValue(s)) => Some(s),
                _ => None,
            })
            .collect(),
        other => panic!("roles: {other:?}"),
    };
    assert_eq!(listed, ["ops"]);
    assert!(matches!(r.http_response, Some(HttpResponse::OkResponse(_))));
    // The client layer's AuthContext.
    let svc = protected(&app).await;
    assert_eq!(svc.hello(Some(token)).await.unwrap().message, "ops");

    // A change, with no new login: ValidateToken at once, Check at once, the cached
    // answer behind the layer within a second (a USER_UPDATED event told it).
    let mut stream = try_watch(&app.client, Some(WATCH_CREDENTIAL), "")
        .await
        .unwrap();
    set_roles(&app, &root, "fay", &["admin", "ops"]).await;
    let event = next_event(&mut stream).await;
    assert_eq!(event.kind(), pb::RevocationKind::UserUpdated);
    assert_eq!(event.user_id, app.validate(token).await.unwrap().user_id);
    assert_eq!(app.validate(token).await.unwrap().roles, ["admin", "ops"]);
    let r = check(&app, &[("authorization", &bearer_header)]).await;
    assert_eq!(allowed(&r).0["x-auth-roles"], "admin,ops");
    let started = Instant::now();
    while svc.hello(Some(token)).await.unwrap().message != "admin,ops" {
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "the cached roles were not refreshed within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // And removed.
    set_roles(&app, &root, "fay", &[]).await;
    assert!(app.validate(token).await.unwrap().roles.is_empty());
}

async fn set_password_can_require_a_change_at_the_next_login(backend: Backend) {
    let app = backend.app().spawn().await;
    let root = admin(&app, "root").await;
    let (_, old) = app.user_with_session("gil").await;
    let reset = admin_client(&app)
        .set_password(user_req(
            &root,
            pb::SetPasswordRequest {
                user: "gil".into(),
                password: "Temporary-Pass-31".into(),
                require_change: true,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reset.revoked_sessions, 1);
    assert!(!app.validate(&old.access_token).await.unwrap().valid);
    let login = app.login("gil", "Temporary-Pass-31").await.unwrap();
    assert!(login.password_change_required);
    app.change_password(
        &login.access_token,
        "Temporary-Pass-31",
        "Own-Choice-Pass-8",
    )
    .await
    .unwrap();
    let login = app.login("gil", "Own-Choice-Pass-8").await.unwrap();
    assert!(!login.password_change_required);
    // A policy-breaking password is refused and changes nothing.
    assert_code(
        admin_client(&app)
            .set_password(user_req(
                &root,
                pb::SetPasswordRequest {
                    user: "gil".into(),
                    password: "short".into(),
                    require_change: false,
                },
            ))
            .await,
        Code::InvalidArgument,
    );
    app.login("gil", "Own-Choice-Pass-8").await.unwrap();
}

async fn unlock_lifts_the_account_throttle(backend: Backend) {
    let app = backend
        .app()
        .envs(&[
            ("THROTTLE_ACCOUNT_THRESHOLD", "2"),
            ("THROTTLE_ACCOUNT_MAX_DELAY", "1h"),
            ("THROTTLE_BASE_DELAY", "10m"),
        ])
        .spawn()
        .await;
    let root = admin(&app, "root").await;
    app.register("hal", PASSWORD).await.unwrap();
    for _ in 0..3 {
        let _ = app.login("hal", "Wrong-Pass-99").await;
    }
    assert_code(app.login("hal", PASSWORD).await, Code::ResourceExhausted);
    admin_client(&app)
        .unlock_user(user_req(
            &root,
            pb::UnlockUserRequest { user: "hal".into() },
        ))
        .await
        .unwrap();
    app.login("hal", PASSWORD).await.unwrap();
}

async fn hostile_pages_tokens_and_sizes_are_refused(backend: Backend) {
    let app = backend.app().spawn().await;
    let root = admin(&app, "root").await;
    let mut c = admin_client(&app);
    for i in 0..3 {
        app.register(&format!("user{i}"), PASSWORD).await.unwrap();
    }
    // Page sizes: negative refused, huge capped.
    let negative = list_users(
        &app,
        &root,
        pb::ListUsersRequest {
            page_size: -1,
            ..Default::default()
        },
    )
    .await;
    assert_code(negative, Code::InvalidArgument);
    let huge = list_users(
        &app,
        &root,
        pb::ListUsersRequest {
            page_size: i32::MAX,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(huge.users.len(), 4);
    let audit = audit_rows(
        &app,
        &root,
        pb::ListAuditEventsRequest {
            page_size: -5,
            ..Default::default()
        },
    )
    .await;
    assert_code(audit, Code::InvalidArgument);
    // Forged page tokens.
    for token in ["' OR 1=1 --", "%", "x".repeat(100).as_str()] {
        let users = list_users(
            &app,
            &root,
            pb::ListUsersRequest {
                page_token: token.into(),
                ..Default::default()
            },
        )
        .await;
        assert_code(users, Code::InvalidArgument);
        let rows = audit_rows(
            &app,
            &root,
            pb::ListAuditEventsRequest {
                page_token: token.into(),
                ..Default::default()
            },
        )
        .await;
        assert_code(rows, Code::InvalidArgument);
        let sessions = c
            .list_user_sessions(user_req(
                &root,
                pb::ListUserSessionsRequest {
                    user: "user0".into(),
                    page_token: token.into(),
                    ..Default::default()
                },
            ))
            .await;
        assert_code(sessions, Code::InvalidArgument);
    }
    // A LIKE wildcard in a filter is refused, not matched.
    let wildcard = list_users(
        &app,
        &root,
        pb::ListUsersRequest {
            name_prefix: "%".into(),
            ..Default::default()
        },
    )
    .await;
    assert_code(wildcard, Code::InvalidArgument);
    let underscore = list_users(
        &app,
        &root,
        pb::ListUsersRequest {
            name_prefix: "us_r".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(underscore.users.is_empty(), "{:?}", underscore.users);
    // Oversize input.
    assert_code(
        get_user(&app, &root, &"a".repeat(10_000)).await,
        Code::InvalidArgument,
    );
    let many: Vec<String> = (0..1000).map(|i| format!("r{i}")).collect();
    let too_many = c
        .set_roles(user_req(
            &root,
            pb::SetRolesRequest {
                user: "user0".into(),
                roles: many,
            },
        ))
        .await;
    assert_code(too_many, Code::InvalidArgument);
    let bad_role = c
        .set_roles(user_req(
            &root,
            pb::SetRolesRequest {
                user: "user0".into(),
                roles: vec!["Admin".into()],
            },
        ))
        .await;
    assert_code(bad_role, Code::InvalidArgument);
    let bad_kind = audit_rows(
        &app,
        &root,
        pb::ListAuditEventsRequest {
            kind: "x".repeat(5000),
            ..Default::default()
        },
    )
    .await;
    assert_code(bad_kind, Code::InvalidArgument);
    let bad_hash = c
        .create_user(user_req(
            &root,
            pb::CreateUserRequest {
                username: "hashy".into(),
                password_hash: "$1$md5crypt$notbcrypt".into(),
                ..Default::default()
            },
        ))
        .await;
    assert_code(bad_hash, Code::InvalidArgument);
    let both = c
        .create_user(user_req(
            &root,
            pb::CreateUserRequest {
                username: "both".into(),
                password: PASSWORD.into(),
                password_hash: bcrypt::hash("x", 4).unwrap(),
                ..Default::default()
            },
        ))
        .await;
    assert_code(both, Code::InvalidArgument);
}

async fn replays_and_unknown_users_answer_plainly(backend: Backend) {
    let app = backend.app().spawn().await;
    let root = admin(&app, "root").await;
    let mut c = admin_client(&app);
    app.user_with_session("ivy").await;
    // Disabling twice: the second ends nothing more, and is OK.
    for expected in [1, 0] {
        let r = c
            .disable_user(user_req(
                &root,
                pb::DisableUserRequest { user: "ivy".into() },
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.revoked_sessions, expected);
    }
    c.delete_user(user_req(
        &root,
        pb::DeleteUserRequest { user: "ivy".into() },
    ))
    .await
    .unwrap();
    // Deleting again, or anyone unknown: NOT_FOUND.
    for user in ["ivy", "nobody", "00000000-0000-0000-0000-000000000000"] {
        assert_code(
            c.delete_user(user_req(&root, pb::DeleteUserRequest { user: user.into() }))
                .await,
            Code::NotFound,
        );
        assert_code(get_user(&app, &root, user).await, Code::NotFound);
    }
    // A name registered again after a delete is a new user.
    app.register("ivy", PASSWORD).await.unwrap();
    app.login("ivy", PASSWORD).await.unwrap();
}

async fn every_admin_call_is_audited_with_its_caller(backend: Backend) {
    let app = backend.app().spawn().await;
    let root = admin(&app, "root").await;
    let (_, plain) = app.user_with_session("kim").await;
    let root_id = get_user(&app, &root, "root").await.unwrap().user_id;
    let kim = get_user(&app, &root, "kim").await.unwrap();
    assert_code(
        get_user(&app, &plain.access_token, "root").await,
        Code::PermissionDenied,
    );
    admin_client(&app)
        .disable_user(user_req(
            &root,
            pb::DisableUserRequest { user: "kim".into() },
        ))
        .await
        .unwrap();
    let found = eventually(Duration::from_secs(5), || async {
        let actions = audit_rows(
            &app,
            &root,
            pb::ListAuditEventsRequest {
                user: kim.user_id.clone(),
                kind: "admin_action".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .events;
        actions.iter().any(|e| {
            e.detail.starts_with("DisableUser")
                && e.detail.contains(&format!("by user {root_id}"))
                && !e.detail.contains("kim")
        })
    })
    .await;
    assert!(found, "no audit row for DisableUser naming its caller");
    // Refusals are written once their minute is over (see admin_safety).
    advance(&app, Duration::from_secs(61));
    let denied = eventually(Duration::from_secs(5), || async {
        audit_rows(
            &app,
            &root,
            pb::ListAuditEventsRequest {
                kind: "admin_denied".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .events
        .iter()
        .any(|e| e.user_id == kim.user_id && e.detail.starts_with("GetUser"))
    })
    .await;
    assert!(denied, "no admin_denied row for the plain user's call");
    // Time filters: nothing from the future, everything since a minute ago.
    let future = audit_rows(
        &app,
        &root,
        pb::ListAuditEventsRequest {
            since: Some(prost_types::Timestamp {
                seconds: unix(&app.clock) + 3600,
                nanos: 0,
            }),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(future.events.is_empty());
    // Paged, newest first, without repeats.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = audit_rows(
            &app,
            &root,
            pb::ListAuditEventsRequest {
                page_size: 2,
                page_token: token.clone(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        seen.extend(page.events.iter().map(|e| e.id));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    let mut sorted = seen.clone();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    sorted.dedup();
    assert_eq!(seen, sorted);
}

/// Greets with the caller's roles, behind the client layer.
#[derive(Debug, Default)]
struct Roles;

#[tonic::async_trait]
impl Greeter for Roles {
    async fn hello(&self, request: Request<HelloRequest>) -> Result<Response<HelloReply>, Status> {
        let ctx = request
            .extensions()
            .get::<AuthContext>()
            .cloned()
            .ok_or_else(|| Status::internal("no AuthContext"))?;
        Ok(Response::new(HelloReply {
            message: ctx.roles.join(","),
            user_id: ctx.user_id,
            username: ctx.username,
            session_id: ctx.session_id,
            token_checked: ctx.token_checked,
        }))
    }
}

pub(crate) struct Protected {
    client: GreeterClient<Channel>,
}

impl Protected {
    pub(crate) async fn hello(&self, token: Option<&str>) -> Result<HelloReply, Status> {
        let mut request = Request::new(HelloRequest { name: "you".into() });
        if let Some(token) = token {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        self.client
            .clone()
            .hello(request)
            .await
            .map(Response::into_inner)
    }
}

/// A service behind the client layer, caching answers for a minute, following the
/// revocation stream.
pub(crate) async fn protected(app: &TestApp) -> Protected {
    let config = AuthConfig {
        cache_ttl: Duration::from_secs(60),
        watch_credential: Some(WatchCredential::new(WATCH_CREDENTIAL)),
        ..AuthConfig::default()
    };
    let layer = AuthLayer::new(app.channel.clone(), config);
    let validator: AuthValidator = layer.validator().clone();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        Server::builder()
            .layer(layer)
            .add_service(GreeterServer::new(Roles))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let v = validator.clone();
    assert!(
        eventually(Duration::from_secs(5), || {
            let v = v.clone();
            async move { v.watching() }
        })
        .await,
        "the revocation stream never came up"
    );
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    Protected {
        client: GreeterClient::new(channel),
    }
}

/// A TLS channel to `app`, trusting `ca`, presenting `identity`.
pub(crate) async fn tls_channel(
    app: &TestApp,
    ca: &str,
    identity: Option<&crate::support::tls::Leaf>,
) -> Channel {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some(leaf) = identity {
        tls = tls.identity(Identity::from_pem(&leaf.cert, &leaf.key));
    }
    Channel::from_shared(format!("https://{}", app.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn an_mtls_client_with_a_listed_san_may_call_without_a_token(backend: Backend) {
    use crate::support::tls::{Ca, PemDir};
    use authd::proto::auth::v1::auth_service_client::AuthServiceClient;

    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let dir = PemDir::new();
    let (cert, key) = dir.server(&server_ca.server());
    let clients = dir.write("clients.pem", &client_ca.pem());
    let app = backend
        .app()
        .envs(&[
            ("TLS_CERT_FILE", &cert),
            ("TLS_KEY_FILE", &key),
            ("TLS_CLIENT_CA_FILE", &clients),
            (
                "ADMIN_CLIENT_SANS",
                "ops.example.com, spiffe://example.org/ops",
            ),
        ])
        .spawn()
        .await;
    let ops = client_ca.client("ops.example.com");
    let gateway = client_ca.client("gateway.example.com");
    let listed = tls_channel(&app, &server_ca.pem(), Some(&ops)).await;
    let unlisted = tls_channel(&app, &server_ca.pem(), Some(&gateway)).await;
    register_on(&AuthServiceClient::new(unlisted.clone()), "lou", PASSWORD)
        .await
        .unwrap();

    // A listed SAN: no token needed, and the audit row names the certificate.
    let user = AdminServiceClient::new(listed.clone())
        .set_roles(pb::SetRolesRequest {
            user: "lou".into(),
            roles: vec!["admin".into()],
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(user.roles, ["admin"]);
    // Another certificate of the same CA: PERMISSION_DENIED without a token…
    let denied = AdminServiceClient::new(unlisted.clone())
        .get_user(pb::GetUserRequest { user: "lou".into() })
        .await;
    assert_code(denied, Code::PermissionDenied);
    // …and an admin's token still works over it.
    let token = login_on(&AuthServiceClient::new(unlisted.clone()), "lou", PASSWORD)
        .await
        .unwrap()
        .access_token;
    AdminServiceClient::new(unlisted)
        .get_user(user_req(&token, pb::GetUserRequest { user: "lou".into() }))
        .await
        .unwrap();
    let named = eventually(Duration::from_secs(5), || async {
        AdminServiceClient::new(listed.clone())
            .list_audit_events(pb::ListAuditEventsRequest {
                kind: "admin_action".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .events
            .iter()
            .any(|e| e.detail.contains("by certificate ops.example.com"))
    })
    .await;
    assert!(named, "no audit row names the certificate");

    // The CLI over mTLS, with no token.
    let ops_cert = dir.write("ops.pem", &ops.cert);
    let ops_key = dir.write("ops-key.pem", &ops.key);
    let ca = dir.write("server-ca.pem", &server_ca.pem());
    let addr = app.addr.to_string();
    let (code, err) = crate::support::binary::run_authd(
        &[
            "admin",
            "--addr",
            &addr,
            "--ca-file",
            &ca,
            "--cert-file",
            &ops_cert,
            "--key-file",
            &ops_key,
            "--tls-server-name",
            "localhost",
            "get-user",
            "lou",
        ],
        Vec::new(),
    )
    .await;
    assert_eq!(code, 0, "{err}");
}

async fn a_user_stored_before_the_migration_keeps_working(backend: Backend) {
    let app = backend.app().spawn().await;
    // A row written with only the columns the users table had before (as an older
    // authd wrote it): the new columns take their defaults.
    sqlx::query(
        "INSERT INTO users (id, username, password_hash, sessions_valid_after) VALUES (?, ?, ?, 0)",
    )
    .bind("0b6c3d5e-0000-4000-8000-000000000001")
    .bind("olduser")
    .bind(bcrypt::hash(PASSWORD, 4).unwrap())
    .execute(&app.db().await)
    .await
    .unwrap();
    let login = app.login("olduser", PASSWORD).await.unwrap();
    assert!(!login.password_change_required);
    let v = app.validate(&login.access_token).await.unwrap();
    assert!(v.valid);
    assert!(v.roles.is_empty());
}

async fn admin_service_is_described_by_reflection_and_reported_by_health(backend: Backend) {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let app = backend.app().spawn().await;
    let status = HealthClient::new(app.channel.clone())
        .check(HealthCheckRequest {
            service: "auth.v1.AdminService".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status();
    assert_eq!(status, ServingStatus::Serving);

    use tokio_stream::StreamExt;
    use tonic_reflection::pb::v1 as r1;
    let mut c = r1::server_reflection_client::ServerReflectionClient::new(app.channel.clone());
    let request = r1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            r1::server_reflection_request::MessageRequest::FileContainingSymbol(
                "auth.v1.AdminService".into(),
            ),
        ),
    };
    let mut answers = c
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.next().await.unwrap().unwrap();
    assert!(
        matches!(
            answer.message_response,
            Some(r1::server_reflection_response::MessageResponse::FileDescriptorResponse(_))
        ),
        "AdminService is not described: {answer:?}"
    );
}

/// An app under TLS on a Redis of the test's own, where the client certificate
/// `ops.example.com` is an admin: the way to administer it while Redis is down (a
/// bearer needs Redis).
pub(crate) struct OpsApp {
    pub app: TestApp,
    server_ca: crate::support::tls::Ca,
    client_ca: crate::support::tls::Ca,
    _pems: crate::support::tls::PemDir,
}

impl OpsApp {
    /// On the Redis at `redis_url`, with `env` besides.
    pub async fn spawn(redis_url: &str, env: &[(&str, &str)]) -> Self {
        use crate::support::tls::{Ca, PemDir};
        let server_ca = Ca::new("server CA");
        let client_ca = Ca::new("client CA");
        let pems = PemDir::new();
        let (cert, key) = pems.server(&server_ca.server());
        let clients = pems.write("clients.pem", &client_ca.pem());
        let app = TestApp::builder()
            .envs(&[
                ("REDIS_URL", redis_url),
                ("TLS_CERT_FILE", &cert),
                ("TLS_KEY_FILE", &key),
                ("TLS_CLIENT_CA_FILE", &clients),
                ("ADMIN_CLIENT_SANS", "ops.example.com"),
            ])
            .envs(env)
            .spawn()
            .await;
        Self {
            app,
            server_ca,
            client_ca,
            _pems: pems,
        }
    }

    /// A channel to `app` (this one or a sibling) presenting the admin certificate.
    pub async fn ops_channel(&self, app: &TestApp) -> Channel {
        tls_channel(
            app,
            &self.server_ca.pem(),
            Some(&self.client_ca.client("ops.example.com")),
        )
        .await
    }
}

/// DisableUser of `user` while the session store cannot be reached: the users table is
/// written first (the user is disabled), the sessions cannot be ended: UNAVAILABLE, not
/// OK.
pub(crate) async fn disable_with_the_session_store_down(
    admin: &mut AdminServiceClient<Channel>,
    user: &str,
) {
    let status = assert_code(
        admin
            .disable_user(pb::DisableUserRequest { user: user.into() })
            .await,
        Code::Unavailable,
    );
    assert!(status.message().contains("session store"), "{status:?}");
    assert!(
        admin
            .get_user(pb::GetUserRequest { user: user.into() })
            .await
            .unwrap()
            .into_inner()
            .user
            .unwrap()
            .disabled
    );
}

#[tokio::test]
async fn with_redis_down_a_disable_fails_safe_and_open_mode_refuses_the_disabled() {
    use authd::proto::auth::v1::auth_service_client::AuthServiceClient;

    let mut redis = OwnRedis::start().await;
    let ops_app = OpsApp::spawn(&redis.url(), &[("REDIS_FAILURE_MODE", "open")]).await;
    let app = &ops_app.app;
    let ops = ops_app.ops_channel(app).await;
    let users = AuthServiceClient::new(ops.clone());
    let mut admin = AdminServiceClient::new(ops);
    register_on(&users, "mia", PASSWORD).await.unwrap();
    register_on(&users, "max", PASSWORD).await.unwrap();
    admin
        .set_roles(pb::SetRolesRequest {
            user: "max".into(),
            roles: vec!["ops".into()],
        })
        .await
        .unwrap();
    let mia = login_on(&users, "mia", PASSWORD)
        .await
        .unwrap()
        .access_token;
    let max = login_on(&users, "max", PASSWORD)
        .await
        .unwrap()
        .access_token;
    let validate = |token: String| {
        let mut users = users.clone();
        async move {
            users
                .validate_token(pb::ValidateTokenRequest {
                    token,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
        }
    };
    advance(app, Duration::from_secs(2));

    redis.kill();
    disable_with_the_session_store_down(&mut admin, "mia").await;
    // Open mode answers from the users table: mia's token is refused, max keeps his
    // roles.
    let v = validate(mia.clone()).await;
    assert!(!v.valid, "{v:?}");
    let v = validate(max.clone()).await;
    assert!(v.valid && !v.revocation_checked, "{v:?}");
    assert_eq!(v.roles, ["ops"]);
    // A delete half-way leaves a disabled user, not one who can log in.
    assert_code(
        admin
            .delete_user(pb::DeleteUserRequest { user: "max".into() })
            .await,
        Code::Unavailable,
    );
    assert!(!validate(max.clone()).await.valid);

    redis.restart().await;
    let refused = eventually(Duration::from_secs(5), || async {
        login_on(&users, "mia", PASSWORD)
            .await
            .is_err_and(|s| s.code() == Code::FailedPrecondition)
    })
    .await;
    assert!(refused, "a disabled user logged in after the failure");
    assert_code(
        login_on(&users, "max", PASSWORD).await,
        Code::FailedPrecondition,
    );
    // Run again, the delete finishes.
    admin
        .delete_user(pb::DeleteUserRequest { user: "max".into() })
        .await
        .unwrap();
    assert_code(
        admin
            .get_user(pb::GetUserRequest { user: "max".into() })
            .await,
        Code::NotFound,
    );
}

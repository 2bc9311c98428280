//! AdminService's safety rails: refusals coalesced in the audit trail, the last admin
//! kept, a revocation the session store could not record finished in the background,
//! and a login that races a disable.

use std::time::{Duration, Instant};

use authd::proto::auth::v1 as pb;
use authd::proto::auth::v1::admin_service_client::AdminServiceClient;
use tonic::Code;

use crate::admin::{
    OpsApp, admin, admin_client, audit_rows, disable_with_the_session_store_down, get_user,
    set_roles, user_req,
};
use crate::support::*;

on_every_backend!(
    a_refusal_flood_is_one_admin_denied_row_and_real_rows_still_land,
    the_last_enabled_admin_cannot_be_disabled_deleted_or_demoted,
    two_concurrent_demotions_of_the_last_two_admins_do_not_both_succeed,
    a_login_racing_a_disable_never_keeps_a_session,
);

/// The audit rows of `kind` for `user_id`.
async fn rows_of(app: &TestApp, token: &str, user_id: &str, kind: &str) -> Vec<pb::AuditEvent> {
    audit_rows(
        app,
        token,
        pb::ListAuditEventsRequest {
            user: user_id.to_owned(),
            kind: kind.to_owned(),
            page_size: 500,
            ..Default::default()
        },
    )
    .await
    .unwrap()
    .events
}

/// Whether, within 5 s, a row of `kind` for `user_id` passes `wanted`.
async fn row_shows(
    app: &TestApp,
    token: &str,
    user_id: &str,
    kind: &str,
    wanted: impl Fn(&pb::AuditEvent) -> bool,
) -> bool {
    eventually(Duration::from_secs(5), || async {
        rows_of(app, token, user_id, kind).await.iter().any(&wanted)
    })
    .await
}

async fn a_refusal_flood_is_one_admin_denied_row_and_real_rows_still_land(backend: Backend) {
    let app = backend.app().spawn().await;
    let root = admin(&app, "root").await;
    let (plain_user, plain) = app.user_with_session("plain").await;
    for _ in 0..200 {
        assert_code(
            get_user(&app, &plain.access_token, "root").await,
            Code::PermissionDenied,
        );
    }
    // A real event in the middle of the flood.
    assert_code(
        app.login("plain", "not the password").await,
        Code::Unauthenticated,
    );
    let failed = row_shows(&app, &root, &plain_user.user_id, "login_failed", |e| {
        e.detail == "wrong password"
    })
    .await;
    assert!(failed, "the login_failed row was not written");
    // The window is open: nothing yet (the closing task looks every second).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let early = rows_of(&app, &root, &plain_user.user_id, "admin_denied").await;
    assert!(
        early.is_empty(),
        "{} rows before the minute is over, the first: {:?}",
        early.len(),
        early.first().map(|e| &e.detail)
    );

    advance(&app, Duration::from_secs(61));
    let written = row_shows(&app, &root, &plain_user.user_id, "admin_denied", |_| true).await;
    assert!(written, "no admin_denied row after the minute");
    // Let a second row show, were there one.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let rows = rows_of(&app, &root, &plain_user.user_id, "admin_denied").await;
    assert_eq!(
        rows.len(),
        1,
        "{:?}",
        rows.iter().map(|e| &e.detail).collect::<Vec<_>>()
    );
    assert!(
        rows[0]
            .detail
            .starts_with("GetUser: no admin role; refusals=200 "),
        "{}",
        rows[0].detail
    );
    assert_eq!(rows[0].session_id, plain.session_id);
    // The next minute is a new window.
    assert_code(
        get_user(&app, &plain.access_token, "root").await,
        Code::PermissionDenied,
    );
    advance(&app, Duration::from_secs(61));
    let second = row_shows(&app, &root, &plain_user.user_id, "admin_denied", |e| {
        e.detail.contains("refusals=1 ")
    })
    .await;
    assert!(second, "the next minute's refusal was not written");
}

/// DisableUser, DeleteUser and SetRoles on `user`, by `token`.
async fn take_admin_away(app: &TestApp, token: &str, user: &str) -> Vec<Result<(), tonic::Status>> {
    let mut admin = admin_client(app);
    vec![
        admin
            .disable_user(user_req(
                token,
                pb::DisableUserRequest { user: user.into() },
            ))
            .await
            .map(drop),
        admin
            .delete_user(user_req(token, pb::DeleteUserRequest { user: user.into() }))
            .await
            .map(drop),
        admin
            .set_roles(user_req(
                token,
                pb::SetRolesRequest {
                    user: user.into(),
                    roles: vec![],
                },
            ))
            .await
            .map(drop),
        admin
            .set_roles(user_req(
                token,
                pb::SetRolesRequest {
                    user: user.into(),
                    roles: vec!["ops".into()],
                },
            ))
            .await
            .map(drop),
    ]
}

async fn the_last_enabled_admin_cannot_be_disabled_deleted_or_demoted(backend: Backend) {
    let app = backend.app().spawn().await;
    let root = admin(&app, "root").await;
    // A disabled admin does not count.
    let _old = admin(&app, "old").await;
    admin_client(&app)
        .disable_user(user_req(
            &root,
            pb::DisableUserRequest { user: "old".into() },
        ))
        .await
        .unwrap();
    for refused in take_admin_away(&app, &root, "root").await {
        let status = assert_code(refused, Code::FailedPrecondition);
        assert!(
            status.message().contains("last enabled admin"),
            "{status:?}"
        );
    }
    let me = get_user(&app, &root, "root").await.unwrap();
    assert!(!me.disabled && me.roles == ["admin"], "{me:?}");
    // Keeping the role is no loss.
    set_roles(&app, &root, "root", &["admin", "ops"]).await;
    // With a second admin, the first may go.
    let _second = admin(&app, "second").await;
    set_roles(&app, &root, "root", &["ops"]).await;
    // Now "second" is the last: root (no longer admin) cannot call, and second cannot
    // remove itself.
    let second = app.login("second", PASSWORD).await.unwrap().access_token;
    for refused in take_admin_away(&app, &second, "second").await {
        assert_code(refused, Code::FailedPrecondition);
    }
    // Deleting a non-admin, or a disabled admin, is fine.
    admin_client(&app)
        .delete_user(user_req(
            &second,
            pb::DeleteUserRequest { user: "old".into() },
        ))
        .await
        .unwrap();
    admin_client(&app)
        .disable_user(user_req(
            &second,
            pb::DisableUserRequest {
                user: "root".into(),
            },
        ))
        .await
        .unwrap();
}

/// Enabled holders of the admin role.
async fn enabled_admins(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM users WHERE disabled = 0 AND roles LIKE '%,admin,%'")
        .fetch_one(&app.db().await)
        .await
        .unwrap()
}

async fn two_concurrent_demotions_of_the_last_two_admins_do_not_both_succeed(backend: Backend) {
    let app = backend.app().spawn().await;
    let mut refused = 0;
    for round in 0..6 {
        let (a, b) = (format!("ann{round}"), format!("bob{round}"));
        let ta = admin(&app, &a).await;
        let tb = admin(&app, &b).await;
        // Everyone else steps down, so a and b are the last two.
        let db = app.db().await;
        sqlx::query("UPDATE users SET roles = '' WHERE username <> ? AND username <> ?")
            .bind(&a)
            .bind(&b)
            .execute(&db)
            .await
            .unwrap();
        assert_eq!(enabled_admins(&app).await, 2);
        // Each takes the other's role away (even rounds) or disables the other (odd).
        let call = |token: String, target: String| {
            let mut admin = admin_client(&app);
            async move {
                if round % 2 == 0 {
                    admin
                        .set_roles(user_req(
                            &token,
                            pb::SetRolesRequest {
                                user: target,
                                roles: vec![],
                            },
                        ))
                        .await
                        .map(drop)
                } else {
                    admin
                        .disable_user(user_req(&token, pb::DisableUserRequest { user: target }))
                        .await
                        .map(drop)
                }
            }
        };
        let (one, other) = tokio::join!(call(ta, b.clone()), call(tb, a.clone()));
        assert!(
            one.is_err() || other.is_err(),
            "round {round}: both demotions succeeded"
        );
        for result in [&one, &other] {
            if let Err(status) = result {
                // Refused by the guard, or (the other won first) no longer an admin.
                assert!(
                    matches!(
                        status.code(),
                        Code::FailedPrecondition | Code::PermissionDenied | Code::Unauthenticated
                    ),
                    "round {round}: {status:?}"
                );
                if status.code() == Code::FailedPrecondition {
                    refused += 1;
                }
            }
        }
        assert_eq!(enabled_admins(&app).await, 1, "round {round}");
    }
    eprintln!("guard refusals in 6 rounds: {refused}");
}

async fn a_login_racing_a_disable_never_keeps_a_session(backend: Backend) {
    // A real cost: each check takes long enough for the disable to land in the middle.
    let app = backend.app().env("BCRYPT_COST", "12").spawn().await;
    let root = admin(&app, "root").await;
    app.register("jay", PASSWORD).await.unwrap();
    let jay = get_user(&app, &root, "jay").await.unwrap().user_id;
    let started = Instant::now();
    app.login("root", PASSWORD).await.unwrap();
    let check = started.elapsed();
    let logins: Vec<_> = (0..4)
        .map(|_| {
            let client = app.client.clone();
            tokio::spawn(async move { login_on(&client, "jay", PASSWORD).await })
        })
        .collect();
    // The logins are checking the password now.
    tokio::time::sleep(check / 3).await;
    admin_client(&app)
        .disable_user(user_req(
            &root,
            pb::DisableUserRequest { user: "jay".into() },
        ))
        .await
        .unwrap();
    let mut tokens = Vec::new();
    let mut disabled_during = 0;
    for login in logins {
        match login.await.unwrap() {
            Ok(login) => tokens.push(login.access_token),
            Err(status) => {
                assert!(
                    matches!(
                        status.code(),
                        Code::FailedPrecondition | Code::ResourceExhausted
                    ),
                    "{status:?}"
                );
                if status.code() == Code::FailedPrecondition {
                    disabled_during += 1;
                }
            }
        }
    }
    // Whatever won the race, no token of a disabled user stays valid.
    for token in tokens {
        assert!(!app.validate(&token).await.unwrap().valid);
    }
    assert_code(app.login("jay", PASSWORD).await, Code::FailedPrecondition);
    // A login whose password check straddled the disable got its session ended, and
    // the trail says so.
    assert!(
        disabled_during > 0,
        "no login straddled the disable ({check:?})"
    );
    let audited = row_shows(&app, &root, &jay, "login_failed", |e| {
        e.detail == "disabled during login; session ended" && !e.session_id.is_empty()
    })
    .await;
    assert!(
        audited,
        "no login_failed row for the login that raced the disable"
    );
}

#[tokio::test]
async fn a_revocation_the_session_store_missed_is_refused_here_and_finished_in_the_background() {
    use authd::proto::auth::v1::auth_service_client::AuthServiceClient;

    let redis = OwnRedis::start().await;
    let ops_app = OpsApp::spawn(
        &redis.url(),
        &[
            ("REDIS_COMMAND_TIMEOUT", "250ms"),
            ("REDIS_CONNECT_TIMEOUT", "250ms"),
        ],
    )
    .await;
    let app = &ops_app.app;
    let other = app.sibling().spawn().await;
    let here = ops_app.ops_channel(app).await;
    let there = ops_app.ops_channel(&other).await;
    let users = AuthServiceClient::new(here.clone());
    let users_there = AuthServiceClient::new(there);
    let mut admin = AdminServiceClient::new(here);
    register_on(&users, "mia", PASSWORD).await.unwrap();
    let mia = login_on(&users, "mia", PASSWORD).await.unwrap();
    let mia_id = admin
        .get_user(pb::GetUserRequest { user: "mia".into() })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap()
        .user_id;
    let valid = |client: &AuthServiceClient<tonic::transport::Channel>, token: &str| {
        let mut client = client.clone();
        let token = token.to_owned();
        async move {
            client
                .validate_token(pb::ValidateTokenRequest {
                    token,
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner().valid)
        }
    };
    assert!(valid(&users_there, &mia.access_token).await.unwrap());
    advance(app, Duration::from_secs(2));

    // A hung Redis: the session store keeps its data, but answers nothing for now.
    redis.pause();
    // The users table is written first: mia cannot log in, whatever happens next.
    disable_with_the_session_store_down(&mut admin, "mia").await;

    redis.resume();
    // The instance that took the call refuses mia's token at once, though Redis still
    // holds her session...
    assert!(!valid(&users, &mia.access_token).await.unwrap());
    // ...and the retry records the revocation, after which every instance refuses it and
    // her refresh token no longer renews anything.
    let everywhere = eventually(Duration::from_secs(10), || async {
        valid(&users_there, &mia.access_token)
            .await
            .is_ok_and(|v| !v)
    })
    .await;
    assert!(
        everywhere,
        "the other instance still accepts the disabled user's token"
    );
    let mut refresh_there = users_there.clone();
    assert_code(
        refresh_there
            .refresh(pb::RefreshRequest {
                refresh_token: mia.refresh_token.clone(),
                ..Default::default()
            })
            .await,
        Code::Unauthenticated,
    );
    assert_code(
        login_on(&users_there, "mia", PASSWORD).await,
        Code::FailedPrecondition,
    );
    let recorded = eventually(Duration::from_secs(5), || async {
        admin
            .clone()
            .list_audit_events(pb::ListAuditEventsRequest {
                user: mia_id.clone(),
                kind: "admin_action".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .events
            .iter()
            .any(|e| {
                e.detail
                    .starts_with("revocation recorded in the background: 1 sessions ended")
            })
    })
    .await;
    assert!(recorded, "the background revocation left no audit row");
    // Running the call again is safe, and now answers OK.
    admin
        .disable_user(pb::DisableUserRequest { user: "mia".into() })
        .await
        .unwrap();
}

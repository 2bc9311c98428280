//! AdminService under the findings of its security review: hash costs above the
//! ceiling, roles seen at once behind the client layer after a password change, a
//! disable that meets Redis down, audit floods by refused callers, the last admin, and
//! user ids that look like usernames.

use std::time::Duration;

use authd::proto::auth::v1 as pb;
use tonic::Code;

use crate::admin::{admin, admin_client, get_user, protected, set_roles, user_req};
use crate::support::*;

on_every_backend!(
    a_hash_above_the_cost_ceiling_is_refused_and_never_verified,
    a_demotion_then_a_password_change_still_reaches_the_client_cache,
    a_username_of_32_hex_digits_names_that_user,
);

/// A bcrypt-shaped hash of cost 31 (never computed: verifying it would take hours).
const COST_31: &str = "$2b$31$n4Uy0eSnMfvnESYL.bLwuuj0U/ETSsoTpRT9GVk5bektyVVa5xnIi";

async fn a_hash_above_the_cost_ceiling_is_refused_and_never_verified(backend: Backend) {
    let app = backend.app().spawn().await;
    let root = admin(&app, "root").await;
    let refused = admin_client(&app)
        .create_user(user_req(
            &root,
            pb::CreateUserRequest {
                username: "costly".into(),
                password_hash: COST_31.into(),
                ..Default::default()
            },
        ))
        .await;
    let status = assert_code(refused, Code::InvalidArgument);
    assert!(status.message().contains("cost 4-14"), "{status:?}");
    assert_eq!(
        get_user(&app, &root, "costly").await.unwrap_err().code(),
        Code::NotFound
    );
    // Cost 14 (the ceiling with BCRYPT_COST 4) is taken.
    let at_ceiling = COST_31.replace("$31$", "$14$");
    admin_client(&app)
        .create_user(user_req(
            &root,
            pb::CreateUserRequest {
                username: "ceiling".into(),
                password_hash: at_ceiling,
                ..Default::default()
            },
        ))
        .await
        .unwrap();

    // A row written behind authd's back (or imported before the ceiling existed): a
    // second instance reads the costliest stored hash at start-up. Neither a login to
    // that account nor any failed login may wait for a cost-31 verify (hours): the
    // bound below only keeps a broken build from hanging the suite.
    sqlx::query(
        "INSERT INTO users (id, username, password_hash, sessions_valid_after) VALUES (?, ?, ?, 0)",
    )
    .bind(uuid::Uuid::new_v4().to_string())
    .bind("legacy")
    .bind(COST_31)
    .execute(&app.db().await)
    .await
    .unwrap();
    let sibling = app.sibling().spawn().await;
    for (name, password) in [("legacy", PASSWORD), ("legacy", ""), ("nobody_here", "x")] {
        let login = tokio::time::timeout(Duration::from_secs(120), sibling.login(name, password))
            .await
            .expect("a login waited for a verify above the cost ceiling");
        assert_code(login, Code::Unauthenticated);
    }
    let login = tokio::time::timeout(Duration::from_secs(120), app.login("legacy", PASSWORD))
        .await
        .expect("a login waited for a verify above the cost ceiling");
    assert_code(login, Code::Unauthenticated);
}

async fn a_demotion_then_a_password_change_still_reaches_the_client_cache(backend: Backend) {
    let app = backend.app().spawn().await;
    let root = admin(&app, "root").await;
    let (user, login) = app.user_with_session("demoted").await;
    let token = login.access_token;
    set_roles(&app, &root, &user.user_id, &["ops"]).await;
    let service = protected(&app).await;
    // The answer with "ops" is cached (for a minute).
    assert_eq!(service.hello(Some(&token)).await.unwrap().message, "ops");
    set_roles(&app, &root, &user.user_id, &[]).await;
    // ChangePassword ends the user's other sessions and spares this one: its USER
    // event must not undo the USER_UPDATED before it.
    app.change_password(&token, PASSWORD, "Another-Horse-77")
        .await
        .unwrap();
    let fresh = eventually(Duration::from_secs(1), || {
        let service = &service;
        let token = &token;
        async move {
            service
                .hello(Some(token))
                .await
                .is_ok_and(|r| r.message.is_empty())
        }
    })
    .await;
    assert!(fresh, "the protected service still sees the old roles");
}

async fn a_username_of_32_hex_digits_names_that_user(backend: Backend) {
    let app = backend.app().spawn().await;
    let root = admin(&app, "root").await;
    // A valid username that uuid's "simple" form would also parse.
    let name = "0b6c3d5e000040008000000000000001";
    let (user, _) = app.user_with_session(name).await;
    let found = get_user(&app, &root, name).await.unwrap();
    assert_eq!(
        (found.user_id.as_str(), found.username.as_str()),
        (user.user_id.as_str(), name)
    );
    // The id still names the user.
    let by_id = get_user(&app, &root, &user.user_id).await.unwrap();
    assert_eq!(by_id.username, name);
    let rows = crate::admin::audit_rows(
        &app,
        &root,
        pb::ListAuditEventsRequest {
            user: name.into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(!rows.events.is_empty());
    assert!(rows.events.iter().all(|e| e.user_id == user.user_id));
}

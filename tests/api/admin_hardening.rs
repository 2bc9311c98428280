//! AdminService under the findings of its security review: hash costs above the
//! ceiling, roles seen at once behind the client layer after a password change, a
//! disable that meets Redis down, audit floods by refused callers, the last admin, and
//! user ids that look like usernames.

use std::time::Duration;

use authd::proto::auth::v1 as pb;
use tonic::Code;

use crate::admin::{admin, admin_client, get_user, user_req};
use crate::support::*;

on_every_backend!(a_hash_above_the_cost_ceiling_is_refused_and_never_verified,);

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

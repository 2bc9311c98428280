use authd::proto::auth::v1::InvalidReason;
use tonic::Code;

use crate::support::*;

const NEW: &str = "Brand-New-Pass-7";

on_every_backend!(
    change_password_ends_the_other_sessions_and_keeps_the_callers,
    a_wrong_current_password_is_permission_denied_and_changes_nothing,
    a_weak_new_password_or_a_missing_bearer_is_refused
);

async fn change_password_ends_the_other_sessions_and_keeps_the_callers(backend: Backend) {
    let app = backend.app().spawn().await;
    let (user, other) = app.user_with_session("yara").await;
    let third = app.login("yara", PASSWORD).await.unwrap();
    let caller = app.login("yara", PASSWORD).await.unwrap();

    let done = app
        .change_password(&caller.access_token, PASSWORD, NEW)
        .await
        .unwrap();
    assert_eq!(done.revoked_sessions, 2);
    assert_eq!(
        app.reason(&other.access_token).await,
        InvalidReason::Revoked
    );
    assert_eq!(
        app.reason(&third.access_token).await,
        InvalidReason::Revoked
    );
    let v = app.validate(&caller.access_token).await.unwrap();
    assert!(v.valid && v.revocation_checked);

    assert_code(app.login("yara", PASSWORD).await, Code::Unauthenticated);
    assert!(app.login("yara", NEW).await.is_ok());

    let valid_after: i64 =
        sqlx::query_scalar("SELECT sessions_valid_after FROM users WHERE id = ?")
            .bind(&user.user_id)
            .fetch_one(&app.db().await)
            .await
            .unwrap();
    assert_eq!(valid_after, unix(&app.clock));
}

async fn a_wrong_current_password_is_permission_denied_and_changes_nothing(backend: Backend) {
    let app = backend.app().spawn().await;
    let (_, other) = app.user_with_session("zack").await;
    let caller = app.login("zack", PASSWORD).await.unwrap();
    assert_code(
        app.change_password(&caller.access_token, "Wrong-Horse-9", NEW)
            .await,
        Code::PermissionDenied,
    );
    assert_code(
        app.change_password(&caller.access_token, "", NEW).await,
        Code::PermissionDenied,
    );
    assert!(app.validate(&other.access_token).await.unwrap().valid);
    assert!(app.login("zack", PASSWORD).await.is_ok());
}

async fn a_weak_new_password_or_a_missing_bearer_is_refused(backend: Backend) {
    let app = backend.app().spawn().await;
    let (_, caller) = app.user_with_session("amy").await;
    let s = assert_code(
        app.change_password(&caller.access_token, PASSWORD, "short")
            .await,
        Code::InvalidArgument,
    );
    assert!(s.message().contains("new_password"), "{}", s.message());
    assert_code(
        app.change_password("garbage", PASSWORD, NEW).await,
        Code::Unauthenticated,
    );
    assert!(app.login("amy", PASSWORD).await.is_ok());
}

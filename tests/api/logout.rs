use authd::proto::auth::v1::InvalidReason;
use redis::AsyncCommands;
use tonic::Code;

use crate::support::*;

on_every_backend!(
    after_logout_the_token_is_revoked_and_its_session_gone,
    logout_is_idempotent_for_a_correctly_signed_token,
    logout_without_a_good_bearer_is_unauthenticated
);

async fn after_logout_the_token_is_revoked_and_its_session_gone(backend: Backend) {
    let app = backend.app().spawn().await;
    let (_, login) = app.user_with_session("kate").await;
    let other = app.login("kate", PASSWORD).await.unwrap();
    app.logout(&login.access_token).await.unwrap();

    assert_eq!(
        app.reason(&login.access_token).await,
        InvalidReason::Revoked
    );
    // Only this session ended, and it is gone from the list.
    let list = app.list_sessions(&other.access_token).await.unwrap();
    assert_eq!(list.active_count, 1);
    assert_eq!(list.sessions[0].session_id, other.session_id);
}

async fn logout_is_idempotent_for_a_correctly_signed_token(backend: Backend) {
    let app = backend.app().spawn().await;
    let (_, login) = app.user_with_session("liam").await;
    app.logout(&login.access_token).await.unwrap();
    app.logout(&login.access_token).await.unwrap();
    assert_eq!(
        app.reason(&login.access_token).await,
        InvalidReason::Revoked
    );
}

async fn logout_without_a_good_bearer_is_unauthenticated(backend: Backend) {
    let app = backend.app().spawn().await;
    let no_bearer = app
        .client
        .clone()
        .logout(authd::proto::auth::v1::LogoutRequest {})
        .await;
    assert_code(no_bearer, Code::Unauthenticated);
    assert_code(app.logout("not-a-token").await, Code::Unauthenticated);
    let forged = RawClaims::good(unix(&app.clock)).sign("another-secret-0123456789abcdef01234");
    assert_code(app.logout(&forged).await, Code::Unauthenticated);
    // The scheme with nothing after it is no bearer at all.
    assert_code(app.logout("").await, Code::Unauthenticated);
}

#[tokio::test]
async fn the_blacklist_entry_lives_as_long_as_the_token_could_verify() {
    let app = TestApp::builder()
        .envs(&[("JWT_TTL", "10m"), ("JWT_LEEWAY", "30s")])
        .spawn()
        .await;
    let (user, login) = app.user_with_session("mia").await;
    let claims: serde_json::Value = {
        use base64::Engine;
        let payload = login.access_token.split('.').nth(1).unwrap();
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .unwrap(),
        )
        .unwrap()
    };
    let jti = claims["jti"].as_str().unwrap();
    app.logout(&login.access_token).await.unwrap();
    let key = format!("{}{{user:{}}}:revoked:{jti}", app.key_prefix, user.user_id);
    let ttl: i64 = app.redis().await.ttl(&key).await.unwrap();
    // exp − now + leeway = 600 + 30.
    assert!((625..=630).contains(&ttl), "ttl {ttl}");
}

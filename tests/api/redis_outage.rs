use std::time::Duration;

use authd::proto::auth::v1::InvalidReason;
use tonic::Code;

use crate::support::*;

#[tokio::test]
async fn open_mode_validates_without_redis_and_refuses_writes_then_recovers() {
    let mut redis = OwnRedis::start().await;
    let url = redis.url();
    let app = TestApp::builder()
        .envs(&[("REDIS_URL", &url), ("REDIS_FAILURE_MODE", "open")])
        .spawn()
        .await;
    let (_, login) = app.user_with_session("olga").await;
    let second = app.login("olga", PASSWORD).await.unwrap();

    redis.kill();

    let v = app.validate(&login.access_token).await.unwrap();
    assert!(v.valid, "{v:?}");
    assert!(!v.revocation_checked);
    // Still only what the signature says: a forged token stays invalid.
    let forged = RawClaims::good(unix(&app.clock)).sign("another-secret-0123456789abcdef01234");
    assert_eq!(app.reason(&forged).await, InvalidReason::BadSignature);

    // Every call that must write or read sessions is UNAVAILABLE, never a false OK.
    assert_code(app.login("olga", PASSWORD).await, Code::Unavailable);
    assert_code(app.logout(&login.access_token).await, Code::Unavailable);
    assert_code(
        app.list_sessions(&login.access_token).await,
        Code::Unavailable,
    );
    assert_code(
        app.revoke_session(&login.access_token, &second.session_id)
            .await,
        Code::Unavailable,
    );
    assert_code(
        app.change_password(&login.access_token, PASSWORD, "Brand-New-Pass-7")
            .await,
        Code::Unavailable,
    );
    // Users live in MySQL: registering still works.
    app.register("olga2", PASSWORD).await.unwrap();

    redis.restart().await;
    // Recovery without a restart of authd.
    let recovered = eventually(Duration::from_secs(5), || async {
        app.login("olga", PASSWORD).await.is_ok()
    })
    .await;
    assert!(recovered, "authd did not recover after Redis came back");
    let fresh = app.login("olga", PASSWORD).await.unwrap();
    let v = app.validate(&fresh.access_token).await.unwrap();
    assert!(v.valid && v.revocation_checked);
    // Redis came back empty: the old session is gone, not resurrected.
    assert_eq!(
        app.reason(&login.access_token).await,
        InvalidReason::SessionNotFound
    );
}

#[tokio::test]
async fn open_mode_refuses_tokens_older_than_the_last_password_change() {
    let mut redis = OwnRedis::start().await;
    let url = redis.url();
    let app = TestApp::builder().env("REDIS_URL", &url).spawn().await;
    let (_, caller) = app.user_with_session("pete").await;
    advance(&app, Duration::from_secs(5));
    app.change_password(&caller.access_token, PASSWORD, "Brand-New-Pass-7")
        .await
        .unwrap();
    advance(&app, Duration::from_secs(1));
    let after = app.login("pete", "Brand-New-Pass-7").await.unwrap();

    // While Redis answers, the caller keeps their session.
    assert!(app.validate(&caller.access_token).await.unwrap().valid);

    redis.kill();
    // During the outage only the durable check is left: the caller's older token is
    // refused too (the safe side), the newer one passes unchecked.
    assert_eq!(
        app.reason(&caller.access_token).await,
        InvalidReason::Revoked
    );
    let v = app.validate(&after.access_token).await.unwrap();
    assert!(v.valid && !v.revocation_checked);
}

#[tokio::test]
async fn closed_mode_answers_unavailable_without_redis() {
    let mut redis = OwnRedis::start().await;
    let url = redis.url();
    let app = TestApp::builder()
        .envs(&[("REDIS_URL", &url), ("REDIS_FAILURE_MODE", "closed")])
        .spawn()
        .await;
    let (_, login) = app.user_with_session("quincy").await;
    redis.kill();
    let s = assert_code(app.validate(&login.access_token).await, Code::Unavailable);
    assert!(
        !s.message().contains("127.0.0.1"),
        "internal detail leaked: {}",
        s.message()
    );
    // A token that is bad on its face is still answered: no store is needed for that.
    assert_eq!(app.reason("garbage").await, InvalidReason::Malformed);

    redis.restart().await;
    let recovered = eventually(Duration::from_secs(5), || async {
        app.login("quincy", PASSWORD).await.is_ok()
    })
    .await;
    assert!(recovered);
}

#[tokio::test]
async fn validate_token_costs_one_redis_round_trip_and_no_ping() {
    let redis = OwnRedis::start().await;
    let url = redis.url();
    let app = TestApp::builder().env("REDIS_URL", &url).spawn().await;
    let (_, login) = app.user_with_session("rosa").await;
    let pings = redis.command_calls("ping").await;
    let hmgets = redis.command_calls("hmget").await;
    for _ in 0..200 {
        assert!(app.validate(&login.access_token).await.unwrap().valid);
    }
    assert_eq!(
        redis.command_calls("ping").await,
        pings,
        "a PING per checkout"
    );
    assert_eq!(redis.command_calls("hmget").await, hmgets + 200);
}

use tonic::Code;
use tonic_types::StatusExt;

use crate::support::*;

on_every_backend!(
    register_returns_an_id_and_the_lower_cased_username,
    a_taken_username_is_already_exists_whatever_its_case,
    a_bad_username_and_a_weak_password_are_each_named_in_bad_request,
    common_and_overlong_passwords_are_refused_not_truncated,
    username_length_limits_hold_on_register
);

async fn register_returns_an_id_and_the_lower_cased_username(backend: Backend) {
    let app = backend.app().spawn().await;
    let user = app.register("Alice_1", PASSWORD).await.unwrap();
    assert_eq!(user.username, "alice_1");
    assert!(
        uuid::Uuid::parse_str(&user.user_id).is_ok(),
        "{}",
        user.user_id
    );

    let stored: (String, String) = sqlx::query_as("SELECT id, username FROM users")
        .fetch_one(&app.db().await)
        .await
        .unwrap();
    assert_eq!(stored, (user.user_id, "alice_1".to_owned()));
}

async fn a_taken_username_is_already_exists_whatever_its_case(backend: Backend) {
    let app = backend.app().spawn().await;
    app.register("bob", PASSWORD).await.unwrap();
    let s = assert_code(app.register("BoB", PASSWORD).await, Code::AlreadyExists);
    assert!(!s.message().contains(PASSWORD));
}

async fn a_bad_username_and_a_weak_password_are_each_named_in_bad_request(backend: Backend) {
    let app = backend.app().spawn().await;
    let s = assert_code(app.register("a b", "weak").await, Code::InvalidArgument);
    let bad = s.get_details_bad_request().expect("BadRequest detail");
    let fields: Vec<_> = bad
        .field_violations
        .iter()
        .map(|v| v.field.as_str())
        .collect();
    assert!(fields.contains(&"username"), "{fields:?}");
    assert!(fields.contains(&"password"), "{fields:?}");
    let text: Vec<_> = bad
        .field_violations
        .iter()
        .map(|v| v.description.as_str())
        .collect();
    assert!(text.iter().any(|t| t.contains("upper-case")), "{text:?}");
    assert!(text.iter().any(|t| t.contains("digit")), "{text:?}");

    // Nothing was stored.
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users")
        .fetch_one(&app.db().await)
        .await
        .unwrap();
    assert_eq!(n, 0);
}

async fn common_and_overlong_passwords_are_refused_not_truncated(backend: Backend) {
    let app = backend.app().spawn().await;
    let s = assert_code(
        app.register("carol", "P@ssw0rd123!").await,
        Code::InvalidArgument,
    );
    assert!(s.message().contains("too common"), "{}", s.message());

    let long = format!("Aa1!{}", "x".repeat(69)); // 73 bytes
    let s = assert_code(app.register("carol", &long).await, Code::InvalidArgument);
    assert!(s.message().contains("72 bytes"), "{}", s.message());

    // Exactly 72 bytes is fine, and the 73rd byte matters at login.
    let exact = format!("Aa1!{}", "x".repeat(68));
    app.register("carol", &exact).await.unwrap();
    assert!(app.login("carol", &exact).await.is_ok());
    let s = assert_code(
        app.login("carol", &format!("{exact}y")).await,
        Code::InvalidArgument,
    );
    assert!(s.message().contains("72 bytes"));
}

async fn username_length_limits_hold_on_register(backend: Backend) {
    let app = backend.app().spawn().await;
    assert_code(app.register("ab", PASSWORD).await, Code::InvalidArgument);
    assert_code(
        app.register(&"a".repeat(33), PASSWORD).await,
        Code::InvalidArgument,
    );
    app.register(&"a".repeat(32), PASSWORD).await.unwrap();
    app.register("abc", PASSWORD).await.unwrap();
}

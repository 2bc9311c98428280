use std::time::Duration;

use authd::proto::auth::v1 as pb;
use tonic::{Code, Request};
use tonic_types::StatusExt;

use crate::support::*;

on_every_backend!(
    login_answers_a_bearer_token_for_a_new_session,
    unknown_user_wrong_password_and_empty_password_look_the_same,
    login_records_the_peer_address_and_user_agent_metadata,
    login_records_a_trusted_gateways_client_ip_and_user_agent_without_port,
    an_imported_2y_hash_logs_in_and_a_cheaper_hash_is_upgraded,
    logins_beyond_the_bcrypt_queue_are_shed_with_retry_info,
    an_overlong_username_is_invalid_argument_on_login,
    a_padded_name_of_the_longest_length_is_the_same_account
);

async fn login_answers_a_bearer_token_for_a_new_session(backend: Backend) {
    let app = backend.app().spawn().await;
    let user = app.register("dave", PASSWORD).await.unwrap();
    let now = unix(&app.clock);
    let login = app.login("DAVE", PASSWORD).await.unwrap();
    assert_eq!(login.token_type, "Bearer");
    assert_eq!(login.expires_in, 24 * 3600);
    assert_eq!(login.expires_at.unwrap().seconds, now + 24 * 3600);
    assert_eq!(login.session_id.len(), 32);

    let v = app.validate(&login.access_token).await.unwrap();
    assert!(v.valid);
    assert!(v.revocation_checked);
    assert_eq!(v.reason(), pb::InvalidReason::Unspecified);
    assert_eq!(v.user_id, user.user_id);
    assert_eq!(v.username, "dave");
    assert_eq!(v.session_id, login.session_id);
    assert_eq!(v.issued_at.unwrap().seconds, now);
    assert_eq!(v.expires_at.unwrap().seconds, now + 24 * 3600);
}

async fn unknown_user_wrong_password_and_empty_password_look_the_same(backend: Backend) {
    let app = backend.app().spawn().await;
    app.register("erin", PASSWORD).await.unwrap();
    let unknown = assert_code(app.login("nobody", PASSWORD).await, Code::Unauthenticated);
    let wrong = assert_code(
        app.login("erin", "Wrong-Horse-9").await,
        Code::Unauthenticated,
    );
    let empty = assert_code(app.login("erin", "").await, Code::Unauthenticated);
    let malformed = assert_code(
        app.login("no such user!", PASSWORD).await,
        Code::Unauthenticated,
    );
    for other in [&wrong, &empty, &malformed] {
        assert_eq!(unknown.message(), other.message());
        assert_eq!(unknown.details(), other.details());
    }
    assert!(!unknown.message().contains("erin"));
}

async fn login_records_the_peer_address_and_user_agent_metadata(backend: Backend) {
    let app = backend.app().spawn().await;
    app.register("frank", PASSWORD).await.unwrap();
    let mut request = Request::new(pb::LoginRequest {
        username: "frank".into(),
        password: PASSWORD.into(),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("user-agent", "authd-tests/1.0".parse().unwrap());
    let login = app
        .client
        .clone()
        .login(request)
        .await
        .unwrap()
        .into_inner();
    let list = app.list_sessions(&login.access_token).await.unwrap();
    assert_eq!(list.sessions[0].ip, "127.0.0.1");
    assert!(
        list.sessions[0].user_agent.starts_with("authd-tests/1.0"),
        "{}",
        list.sessions[0].user_agent
    );
}

async fn login_records_a_trusted_gateways_client_ip_and_user_agent_without_port(backend: Backend) {
    let app = backend
        .app()
        .env("TRUSTED_PROXIES", "10.0.0.0/8, 127.0.0.1")
        .spawn()
        .await;
    app.register("grace", PASSWORD).await.unwrap();
    let login = app
        .client
        .clone()
        .login(pb::LoginRequest {
            username: "grace".into(),
            password: PASSWORD.into(),
            client_ip: "203.0.113.7:4444".into(),
            user_agent: "Mozilla/5.0 (gateway)".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let list = app.list_sessions(&login.access_token).await.unwrap();
    assert_eq!(list.sessions[0].ip, "203.0.113.7");
    assert_eq!(list.sessions[0].user_agent, "Mozilla/5.0 (gateway)");

    let s = assert_code(
        app.client
            .clone()
            .login(pb::LoginRequest {
                username: "grace".into(),
                password: PASSWORD.into(),
                client_ip: "not-an-ip".into(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
    );
    assert!(s.message().contains("client_ip"));
}

async fn an_imported_2y_hash_logs_in_and_a_cheaper_hash_is_upgraded(backend: Backend) {
    let app = backend.app().env("BCRYPT_COST", "5").spawn().await;
    let db = app.db().await;
    // As PHP's password_hash writes it: $2y$, cost 4.
    let imported = bcrypt::hash("Imported-Pass-1", 4)
        .unwrap()
        .replacen("$2b$", "$2y$", 1);
    sqlx::query(
        "INSERT INTO users (id, username, password_hash) VALUES ('imported-1', 'legacy', ?)",
    )
    .bind(&imported)
    .execute(&db)
    .await
    .unwrap();

    let login = app.login("legacy", "Imported-Pass-1").await.unwrap();
    assert!(app.validate(&login.access_token).await.unwrap().valid);

    let stored: String =
        sqlx::query_scalar("SELECT password_hash FROM users WHERE id = 'imported-1'")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_ne!(stored, imported, "the hash was not upgraded");
    assert_eq!(authd::auth::hasher::hash_cost(&stored), Some(5));
    // The upgraded hash still holds the same password.
    assert!(app.login("legacy", "Imported-Pass-1").await.is_ok());
    assert_code(
        app.login("legacy", "Imported-Pass-2").await,
        Code::Unauthenticated,
    );
}

async fn logins_beyond_the_bcrypt_queue_are_shed_with_retry_info(backend: Backend) {
    // One hashing thread, no queue, and a cost that keeps it busy for tens of ms.
    let app = backend
        .app()
        .envs(&[
            ("BCRYPT_COST", "10"),
            ("BCRYPT_WORKERS", "1"),
            ("BCRYPT_QUEUE", "0"),
        ])
        .spawn()
        .await;
    app.register("hank", PASSWORD).await.unwrap();
    let calls: Vec<_> = (0..6).map(|_| app.login("hank", PASSWORD)).collect();
    let results = futures::future::join_all(calls).await;
    let shed: Vec<_> = results
        .iter()
        .filter_map(|r| r.as_ref().err())
        .filter(|s| s.code() == Code::ResourceExhausted)
        .collect();
    assert!(!shed.is_empty(), "nothing was shed: {results:?}");
    assert!(results.iter().any(Result::is_ok), "nothing was served");
    let retry = shed[0].get_details_retry_info().expect("RetryInfo detail");
    assert!(retry.retry_delay.unwrap() >= Duration::from_millis(100));
    // Every failure is the shedding kind, nothing else.
    assert!(
        results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .all(|s| s.code() == Code::ResourceExhausted)
    );
}

async fn an_overlong_username_is_invalid_argument_on_login(backend: Backend) {
    let app = backend.app().spawn().await;
    let s = assert_code(
        app.login(&"a".repeat(33), PASSWORD).await,
        Code::InvalidArgument,
    );
    assert!(s.get_details_bad_request().is_some());
}

// Found by the username property tests: the size limit counted the padding, so a
// padded 32-character name was refused while a padded 31-character one logged in.
async fn a_padded_name_of_the_longest_length_is_the_same_account(backend: Backend) {
    let app = backend.app().spawn().await;
    let name = format!("long_{}", "n".repeat(27));
    assert_eq!(name.len(), 32);
    let user = app.register(&name, PASSWORD).await.unwrap();
    let padded = format!(" \t{}\n ", name.to_uppercase());
    let login = app.login(&padded, PASSWORD).await.unwrap();
    let v = app.validate(&login.access_token).await.unwrap();
    assert_eq!(v.user_id, user.user_id);
    assert_eq!(v.username, name);
}

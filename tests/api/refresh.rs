//! Refresh: rotating refresh tokens with reuse detection (docs/design.md §10). Every
//! behaviour on both backends; the Redis faults on a Redis of the test's own.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use authd::auth::refresh::{self, RefreshKey};
use authd::proto::auth::v1::{self as pb, InvalidReason, RevocationKind};
use authd::store::sessions::{NewSession, Rotation};
use futures::stream::{FuturesUnordered, StreamExt};
use redis::AsyncCommands;
use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::support::proxy::Proxy;
use crate::support::*;

on_every_backend!(
    login_returns_a_refresh_token_and_the_default_access_token_is_unchanged,
    fifty_concurrent_refreshes_with_one_token_rotate_once_and_agree,
    a_replay_within_the_grace_gets_the_same_successor_and_no_second_branch,
    a_reuse_after_the_grace_ends_the_session_announces_and_audits_it,
    the_absolute_lifetime_holds_across_many_rotations,
    rotation_renews_the_idle_expiry_only,
    logout_ends_the_refresh_token,
    logout_with_the_previous_access_token_ends_the_session_too,
    logout_with_an_access_token_two_rotations_old_ends_the_session,
    revoke_session_ends_the_refresh_token,
    change_password_ends_the_other_sessions_refresh_tokens,
    the_session_limit_ends_the_evicted_sessions_refresh_token,
    admin_disable_delete_and_revoke_end_the_refresh_tokens,
    a_forged_token_naming_a_real_session_ends_nothing_and_is_throttled,
    with_the_address_locked_by_garbage_a_valid_refresh_token_still_rotates,
    oversize_and_garbage_refresh_tokens_are_refused_cleanly,
    the_previous_access_token_stays_valid_until_its_own_exp,
    with_no_grace_a_call_judged_just_after_the_rotation_replays_and_a_late_one_is_reuse,
    concurrent_refreshes_with_no_grace_while_the_clock_ticks_never_end_the_session,
    a_rotation_expecting_a_stale_token_changes_nothing_in_the_store,
    a_refresh_racing_a_logout_never_leaves_a_working_refresh_token
);

/// A JWT's claims, unverified.
fn claims(token: &str) -> serde_json::Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap()
}

/// A refresh token's generation (its fourth field).
fn generation(refresh_token: &str) -> u64 {
    refresh_token.split('.').nth(3).unwrap().parse().unwrap()
}

/// The ErrorInfo reason of a refused Refresh.
#[track_caller]
fn refused<T: std::fmt::Debug>(result: Result<T, Status>) -> String {
    let status = assert_code(result, Code::Unauthenticated);
    let info = status
        .get_details_error_info()
        .expect("an ErrorInfo detail");
    assert_eq!(info.domain, "authd");
    info.reason
}

async fn stored_generation(app: &TestApp, user_id: &str, session_id: &str) -> Option<u64> {
    if app.backend != Backend::MySqlRedis {
        return None;
    }
    let key = format!("{}{{user:{user_id}}}:session:{session_id}", app.key_prefix);
    app.redis().await.hget(&key, "gen").await.unwrap()
}

async fn login_returns_a_refresh_token_and_the_default_access_token_is_unchanged(backend: Backend) {
    let app = backend.app().spawn().await;
    let (user, login) = app.user_with_session("rhea").await;
    let now = unix(&app.clock);
    // A client that never calls Refresh sees what it always saw: a 24 h token.
    assert_eq!(login.expires_in, 86_400);
    assert_eq!(login.expires_at.unwrap().seconds, now + 86_400);
    assert!(login.refresh_token.starts_with("rt1."));
    assert_eq!(generation(&login.refresh_token), 0);
    // 256 random bits: 64 hex digits of secret.
    assert_eq!(login.refresh_token.split('.').nth(4).unwrap().len(), 64);
    // Defaults: 1 h idle, 30 days in all.
    assert_eq!(login.refresh_expires_at.unwrap().seconds, now + 3600);
    assert_eq!(login.session_expires_at.unwrap().seconds, now + 30 * 86_400);
    let v = app.validate(&login.access_token).await.unwrap();
    assert!(v.valid);
    assert_eq!(v.auth_time.unwrap().seconds, now);
    assert_eq!(v.amr, ["pwd"]);
    let list = app.list_sessions(&login.access_token).await.unwrap();
    assert_eq!(
        list.sessions[0].session_expires_at.unwrap().seconds,
        now + 30 * 86_400
    );
    // Only a hash is stored: no field of the session holds the token or its secret.
    if backend == Backend::MySqlRedis {
        let key = format!(
            "{}{{user:{}}}:session:{}",
            app.key_prefix, user.user_id, login.session_id
        );
        let fields: std::collections::HashMap<String, String> =
            app.redis().await.hgetall(&key).await.unwrap();
        let secret = login.refresh_token.split('.').nth(4).unwrap();
        assert!(fields.contains_key("rh"), "{fields:?}");
        for value in fields.values() {
            assert!(!value.contains(secret), "a stored secret: {value}");
        }
    }
}

async fn fifty_concurrent_refreshes_with_one_token_rotate_once_and_agree(backend: Backend) {
    let app = backend.app().spawn().await;
    let (user, login) = app.user_with_session("castor").await;
    let calls = (0..50).map(|_| app.refresh(&login.refresh_token));
    let answers: Vec<pb::RefreshResponse> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| r.expect("every concurrent Refresh answers OK"))
        .collect();
    let successors: BTreeSet<&str> = answers.iter().map(|a| a.refresh_token.as_str()).collect();
    assert_eq!(successors.len(), 1, "{successors:#?}");
    let successor = answers[0].refresh_token.clone();
    assert_eq!(generation(&successor), 1);
    // One access token too (HS256 signs deterministically): every caller's is valid.
    let jtis: BTreeSet<String> = answers
        .iter()
        .map(|a| claims(&a.access_token)["jti"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(jtis.len(), 1);
    assert!(app.validate(&answers[0].access_token).await.unwrap().valid);
    // Exactly one rotation was recorded.
    if let Some(g) = stored_generation(&app, &user.user_id, &login.session_id).await {
        assert_eq!(g, 1);
    }
    // The chain goes on from the one successor.
    let next = app.refresh(&successor).await.unwrap();
    assert_eq!(generation(&next.refresh_token), 2);
    if let Some(g) = stored_generation(&app, &user.user_id, &login.session_id).await {
        assert_eq!(g, 2);
    }
}

async fn a_replay_within_the_grace_gets_the_same_successor_and_no_second_branch(backend: Backend) {
    let app = backend.app().spawn().await;
    let (user, login) = app.user_with_session("pollux").await;
    let first = app.refresh(&login.refresh_token).await.unwrap();
    // The answer was lost; the client retries 29 s later.
    advance(&app, Duration::from_secs(29));
    let again = app.refresh(&login.refresh_token).await.unwrap();
    assert_eq!(again.refresh_token, first.refresh_token);
    assert_eq!(
        claims(&again.access_token)["jti"],
        claims(&first.access_token)["jti"]
    );
    // Issued at the rotation, not at the replay.
    assert_eq!(
        again.expires_at.unwrap().seconds,
        first.expires_at.unwrap().seconds
    );
    assert!(app.validate(&again.access_token).await.unwrap().valid);
    if let Some(g) = stored_generation(&app, &user.user_id, &login.session_id).await {
        assert_eq!(g, 1);
    }
    // Right at the end of the grace (30 s): still forgiven, and the chain goes on.
    advance(&app, Duration::from_secs(1));
    assert_eq!(
        app.refresh(&login.refresh_token)
            .await
            .unwrap()
            .refresh_token,
        first.refresh_token
    );
    let next = app.refresh(&first.refresh_token).await.unwrap();
    assert_eq!(generation(&next.refresh_token), 2);
    assert!(app.validate(&next.access_token).await.unwrap().valid);
}

async fn a_reuse_after_the_grace_ends_the_session_announces_and_audits_it(backend: Backend) {
    let app = backend.app().spawn().await;
    let (user, login) = app.user_with_session("theft").await;
    let other = app.login("theft", PASSWORD).await.unwrap();
    let mut stream = try_watch(&app.client, Some(WATCH_CREDENTIAL), "")
        .await
        .unwrap();
    let first = app.refresh(&login.refresh_token).await.unwrap();
    advance(&app, Duration::from_secs(31));
    // The old token again, past the grace: someone else holds it.
    let reason = refused(app.refresh(&login.refresh_token).await);
    assert_eq!(reason, "REFRESH_TOKEN_REUSED");

    // The whole session ended: the successor, and both access tokens.
    assert_eq!(
        refused(app.refresh(&first.refresh_token).await),
        "REFRESH_TOKEN_INVALID"
    );
    for token in [&login.access_token, &first.access_token] {
        assert!(!app.validate(token).await.unwrap().valid);
    }
    // Watchers and their caches hear of it.
    let e = next_event(&mut stream).await;
    assert_eq!(e.kind(), RevocationKind::Session);
    assert_eq!(
        (e.user_id.as_str(), e.session_id.as_str()),
        (user.user_id.as_str(), login.session_id.as_str())
    );
    // The user's other session is untouched.
    assert!(app.validate(&other.access_token).await.unwrap().valid);
    app.refresh(&other.refresh_token).await.unwrap();
    // And the audit trail says what happened.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let rows: Vec<(Option<String>, Option<String>)> = sqlx::query_as(
            "SELECT user_id, session_id FROM audit_events WHERE kind = 'refresh_reuse_detected'",
        )
        .fetch_all(&app.db().await)
        .await
        .unwrap();
        if !rows.is_empty() {
            assert_eq!(
                rows,
                [(Some(user.user_id.clone()), Some(login.session_id.clone()))]
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no audit row");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Presenting the stolen token again changes nothing more: one event, one row.
    assert_eq!(
        refused(app.refresh(&login.refresh_token).await),
        "REFRESH_TOKEN_INVALID"
    );
}

async fn the_absolute_lifetime_holds_across_many_rotations(backend: Backend) {
    let app = backend
        .app()
        .envs(&[
            ("JWT_TTL", "5m"),
            ("SESSION_IDLE_TIMEOUT", "30m"),
            ("SESSION_MAX_LIFETIME", "2h"),
        ])
        .spawn()
        .await;
    let (_, login) = app.user_with_session("tithonus").await;
    let login_time = unix(&app.clock);
    let end = login_time + 7200;
    assert_eq!(login.session_expires_at.unwrap().seconds, end);
    let mut token = login.refresh_token.clone();
    let mut last = None;
    // A rotation every 4 minutes: 29 of them fit before the end, none after.
    for i in 1..=40 {
        advance(&app, Duration::from_secs(240));
        let now = unix(&app.clock);
        match app.refresh(&token).await {
            Ok(r) => {
                assert!(now < end, "rotation {i} at {now}, past the end {end}");
                // The absolute end never moves, and no token outlives it.
                assert_eq!(r.session_expires_at.unwrap().seconds, end);
                let exp = r.expires_at.unwrap().seconds;
                assert_eq!(exp, (now + 300).min(end));
                assert_eq!(r.refresh_expires_at.unwrap().seconds, (now + 1800).min(end));
                let c = claims(&r.access_token);
                assert_eq!(c["auth_time"], login_time);
                assert_eq!(c["amr"], serde_json::json!(["pwd"]));
                let v = app.validate(&r.access_token).await.unwrap();
                assert!(v.valid);
                assert_eq!(v.auth_time.unwrap().seconds, login_time);
                token = r.refresh_token.clone();
                last = Some(r);
            }
            Err(status) => {
                assert!(now >= end, "refused at {now}, before the end {end}");
                assert_eq!(refused::<()>(Err(status)), "REFRESH_TOKEN_INVALID");
                break;
            }
        }
    }
    let last = last.unwrap();
    assert_eq!(generation(&last.refresh_token), 29);
    // Past the end and the leeway, nothing of the session verifies.
    advance(&app, Duration::from_secs(31));
    // The last access token ended with the session.
    assert!(!app.validate(&last.access_token).await.unwrap().valid);
}

async fn rotation_renews_the_idle_expiry_only(backend: Backend) {
    let app = backend
        .app()
        .envs(&[("JWT_TTL", "5m"), ("SESSION_IDLE_TIMEOUT", "10m")])
        .spawn()
        .await;
    let (_, login) = app.user_with_session("idler").await;
    // Used every 9 minutes, the session lives on past many idle timeouts…
    let mut token = login.refresh_token.clone();
    for _ in 0..5 {
        advance(&app, Duration::from_secs(540));
        token = app.refresh(&token).await.unwrap().refresh_token;
    }
    // …and left alone for longer than the idle timeout, it ends.
    advance(&app, Duration::from_secs(601));
    assert_eq!(refused(app.refresh(&token).await), "REFRESH_TOKEN_INVALID");
}

async fn logout_ends_the_refresh_token(backend: Backend) {
    let app = backend.app().spawn().await;
    let (_, login) = app.user_with_session("lethe").await;
    app.logout(&login.access_token).await.unwrap();
    assert_eq!(
        refused(app.refresh(&login.refresh_token).await),
        "REFRESH_TOKEN_INVALID"
    );
}

async fn logout_with_the_previous_access_token_ends_the_session_too(backend: Backend) {
    let app = backend.app().spawn().await;
    let (_, login) = app.user_with_session("janus").await;
    let rotated = app.refresh(&login.refresh_token).await.unwrap();
    let mut stream = try_watch(&app.client, Some(WATCH_CREDENTIAL), "")
        .await
        .unwrap();
    // A client logs out with the token it had before the rotation.
    app.logout(&login.access_token).await.unwrap();
    assert_eq!(
        refused(app.refresh(&rotated.refresh_token).await),
        "REFRESH_TOKEN_INVALID"
    );
    assert!(!app.validate(&rotated.access_token).await.unwrap().valid);
    // Caches hear of the token, and of the session: they may hold the other token.
    let e = next_event(&mut stream).await;
    assert_eq!(e.kind(), RevocationKind::Token);
    let e = next_event(&mut stream).await;
    assert_eq!(e.kind(), RevocationKind::Session);
    assert_eq!(e.session_id, login.session_id);
}

async fn logout_with_an_access_token_two_rotations_old_ends_the_session(backend: Backend) {
    let app = backend.app().spawn().await;
    let (_, login) = app.user_with_session("cronus").await;
    let first = app.refresh(&login.refresh_token).await.unwrap();
    let second = app.refresh(&first.refresh_token).await.unwrap();
    let mut stream = try_watch(&app.client, Some(WATCH_CREDENTIAL), "")
        .await
        .unwrap();
    // Generation 0's access token is neither the session's current one nor the one
    // before it, but it is unexpired and was issued for this session.
    app.logout(&login.access_token).await.unwrap();
    assert_eq!(
        refused(app.refresh(&second.refresh_token).await),
        "REFRESH_TOKEN_INVALID"
    );
    for token in [
        &login.access_token,
        &first.access_token,
        &second.access_token,
    ] {
        assert!(!app.validate(token).await.unwrap().valid);
    }
    let e = next_event(&mut stream).await;
    assert_eq!(e.kind(), RevocationKind::Token);
    let e = next_event(&mut stream).await;
    assert_eq!(e.kind(), RevocationKind::Session);
    assert_eq!(e.session_id, login.session_id);
}

async fn revoke_session_ends_the_refresh_token(backend: Backend) {
    let app = backend.app().spawn().await;
    let (_, phone) = app.user_with_session("hestia").await;
    let laptop = app.login("hestia", PASSWORD).await.unwrap();
    let rotated = app.refresh(&phone.refresh_token).await.unwrap();
    app.revoke_session(&laptop.access_token, &phone.session_id)
        .await
        .unwrap();
    // Neither the current token nor the previous one (inside its grace) works.
    for token in [&rotated.refresh_token, &phone.refresh_token] {
        assert_eq!(refused(app.refresh(token).await), "REFRESH_TOKEN_INVALID");
    }
    app.refresh(&laptop.refresh_token).await.unwrap();
}

async fn change_password_ends_the_other_sessions_refresh_tokens(backend: Backend) {
    let app = backend.app().spawn().await;
    let (_, phone) = app.user_with_session("iris").await;
    let laptop = app.login("iris", PASSWORD).await.unwrap();
    app.change_password(&laptop.access_token, PASSWORD, "Brand-New-Pass-7")
        .await
        .unwrap();
    assert_eq!(
        refused(app.refresh(&phone.refresh_token).await),
        "REFRESH_TOKEN_INVALID"
    );
    // The session that changed the password goes on, and so does its refresh token.
    advance(&app, Duration::from_secs(1));
    let r = app.refresh(&laptop.refresh_token).await.unwrap();
    assert!(app.validate(&r.access_token).await.unwrap().valid);
}

async fn the_session_limit_ends_the_evicted_sessions_refresh_token(backend: Backend) {
    let app = backend
        .app()
        .env("MAX_SESSIONS_PER_USER", "2")
        .spawn()
        .await;
    let (_, oldest) = app.user_with_session("hydra").await;
    let rotated = app.refresh(&oldest.refresh_token).await.unwrap();
    let second = app.login("hydra", PASSWORD).await.unwrap();
    let third = app.login("hydra", PASSWORD).await.unwrap();
    assert_eq!(
        refused(app.refresh(&rotated.refresh_token).await),
        "REFRESH_TOKEN_INVALID"
    );
    for live in [second, third] {
        app.refresh(&live.refresh_token).await.unwrap();
    }
}

async fn admin_disable_delete_and_revoke_end_the_refresh_tokens(backend: Backend) {
    use authd::proto::auth::v1::admin_service_client::AdminServiceClient;
    // Six refusals from one address: more than the default threshold lets through.
    let app = backend
        .app()
        .env("THROTTLE_ADDRESS_THRESHOLD", "100")
        .spawn()
        .await;
    let (root, _) = app.user_with_session("root").await;
    sqlx::query("UPDATE users SET roles = ',admin,' WHERE id = ?")
        .bind(&root.user_id)
        .execute(&app.db().await)
        .await
        .unwrap();
    let root = app.login("root", PASSWORD).await.unwrap().access_token;
    let mut admin = AdminServiceClient::new(app.channel.clone());
    for (name, call) in [("dora", "disable"), ("dave", "delete"), ("dina", "revoke")] {
        let (_, login) = app.user_with_session(name).await;
        let rotated = app.refresh(&login.refresh_token).await.unwrap();
        let user = name.to_owned();
        match call {
            "disable" => {
                admin
                    .disable_user(bearer(&root, pb::DisableUserRequest { user }))
                    .await
                    .unwrap();
            }
            "delete" => {
                admin
                    .delete_user(bearer(&root, pb::DeleteUserRequest { user }))
                    .await
                    .unwrap();
            }
            _ => {
                admin
                    .revoke_user_sessions(bearer(&root, pb::RevokeUserSessionsRequest { user }))
                    .await
                    .unwrap();
            }
        }
        for token in [&rotated.refresh_token, &login.refresh_token] {
            assert_eq!(
                refused(app.refresh(token).await),
                "REFRESH_TOKEN_INVALID",
                "{call}"
            );
        }
    }
}

/// A token of the right shape naming a real user and session, made with another key.
fn forged_for(user_id: &str, session_id: &str, generation: u64) -> String {
    format!(
        "rt1.{user_id}.{session_id}.{generation}.{}.{}",
        "ab".repeat(32),
        "cd".repeat(16)
    )
}

async fn a_forged_token_naming_a_real_session_ends_nothing_and_is_throttled(backend: Backend) {
    let app = backend
        .app()
        .envs(&[
            ("THROTTLE_ADDRESS_THRESHOLD", "3"),
            ("THROTTLE_BASE_DELAY", "10s"),
        ])
        .spawn()
        .await;
    let (user, login) = app.user_with_session("nemesis").await;
    let rotated = app.refresh(&login.refresh_token).await.unwrap();
    // The session id is public (every access token carries it), the key is not: an
    // "older generation" made up by someone else must not pass for reuse.
    for generation in [0, 1, 5] {
        assert_eq!(
            refused(
                app.refresh(&forged_for(&user.user_id, &login.session_id, generation))
                    .await
            ),
            "REFRESH_TOKEN_INVALID"
        );
    }
    // Three bad tokens from this address: the next guess waits.
    let status = assert_code(
        app.refresh(&forged_for(&user.user_id, &login.session_id, 0))
            .await,
        Code::ResourceExhausted,
    );
    assert!(status.get_details_retry_info().is_some());
    // The victim's session was never touched, and its genuine token is no guess: it
    // rotates even from the locked address.
    assert!(app.validate(&rotated.access_token).await.unwrap().valid);
    let next = app.refresh(&rotated.refresh_token).await.unwrap();
    assert_eq!(generation(&next.refresh_token), 2);
    assert_code(
        app.refresh(&forged_for(&user.user_id, &login.session_id, 3))
            .await,
        Code::ResourceExhausted,
    );
    advance(&app, Duration::from_secs(11));
    assert_eq!(
        refused(
            app.refresh(&forged_for(&user.user_id, &login.session_id, 0))
                .await
        ),
        "REFRESH_TOKEN_INVALID"
    );
}

async fn with_the_address_locked_by_garbage_a_valid_refresh_token_still_rotates(backend: Backend) {
    let app = backend
        .app()
        .envs(&[
            ("THROTTLE_ADDRESS_THRESHOLD", "3"),
            ("THROTTLE_BASE_DELAY", "10s"),
        ])
        .spawn()
        .await;
    let (_, login) = app.user_with_session("office").await;
    let (_, stale) = app.user_with_session("leaver").await;
    app.logout(&stale.access_token).await.unwrap();
    // A shared address: someone's garbage, someone's token of a session that ended.
    for token in ["garbage", "rt1.....", stale.refresh_token.as_str()] {
        assert_eq!(refused(app.refresh(token).await), "REFRESH_TOKEN_INVALID");
    }
    assert_code(app.refresh("garbage").await, Code::ResourceExhausted);
    assert_code(
        app.refresh(&stale.refresh_token).await,
        Code::ResourceExhausted,
    );
    // The office's live session refreshes all the same, again and again.
    let first = app.refresh(&login.refresh_token).await.unwrap();
    let second = app.refresh(&first.refresh_token).await.unwrap();
    assert_eq!(generation(&second.refresh_token), 2);
    assert!(app.validate(&second.access_token).await.unwrap().valid);
    // And its genuine tokens did not count: garbage is still what is refused unchecked.
    assert_code(app.refresh("garbage").await, Code::ResourceExhausted);
}

async fn oversize_and_garbage_refresh_tokens_are_refused_cleanly(backend: Backend) {
    let app = backend
        .app()
        .env("THROTTLE_ADDRESS_THRESHOLD", "1000")
        .spawn()
        .await;
    let (user, login) = app.user_with_session("eris").await;
    for (token, code) in [
        (String::new(), Code::InvalidArgument),
        ("x".repeat(513), Code::InvalidArgument),
        (
            format!("{}.{}", login.refresh_token, "a".repeat(600)),
            Code::InvalidArgument,
        ),
        ("x".repeat(32 * 1024), Code::InvalidArgument),
    ] {
        assert_code(app.refresh(&token).await, code);
    }
    let secret = "ab".repeat(32);
    let tag = "cd".repeat(16);
    for garbage in [
        "garbage".to_owned(),
        login.access_token.clone(),
        "rt1.....".to_owned(),
        format!(
            "rt1.{}.{}.18446744073709551616.{secret}.{tag}",
            user.user_id, login.session_id
        ),
        format!(
            "rt1.{}.{}.007.{secret}.{tag}",
            user.user_id, login.session_id
        ),
        format!("rt1.{{user:x}}.s.0.{secret}.{tag}"),
        format!("rt1.u.s.0.{secret}.{tag}"),
        format!(
            "rt1.{}.{}.0.{secret}.{tag}\u{0}",
            user.user_id, login.session_id
        ),
        format!(
            "rt1.{}.{}.0.{}.{tag}",
            user.user_id,
            login.session_id,
            "é".repeat(32)
        ),
    ] {
        assert_eq!(
            refused(app.refresh(&garbage).await),
            "REFRESH_TOKEN_INVALID",
            "{garbage}"
        );
    }
    // None of it touched the session.
    app.refresh(&login.refresh_token).await.unwrap();
}

async fn the_previous_access_token_stays_valid_until_its_own_exp(backend: Backend) {
    let app = backend.app().env("JWT_TTL", "5m").spawn().await;
    let (_, login) = app.user_with_session("hermes").await;
    advance(&app, Duration::from_secs(200));
    let rotated = app.refresh(&login.refresh_token).await.unwrap();
    // Calls already in flight with the old token do not fail because of the rotation…
    assert!(app.validate(&login.access_token).await.unwrap().valid);
    assert!(app.validate(&rotated.access_token).await.unwrap().valid);
    // …but it still ends at its own exp (plus the leeway).
    advance(&app, Duration::from_secs(131));
    assert_eq!(
        app.reason(&login.access_token).await,
        InvalidReason::Expired
    );
    assert!(app.validate(&rotated.access_token).await.unwrap().valid);
    // Two rotations on, the first token is no longer the session's.
    let again = app.refresh(&rotated.refresh_token).await.unwrap();
    app.refresh(&again.refresh_token).await.unwrap();
    assert!(!app.validate(&rotated.access_token).await.unwrap().valid);
}

async fn with_no_grace_a_call_judged_just_after_the_rotation_replays_and_a_late_one_is_reuse(
    backend: Backend,
) {
    let app = backend.app().env("REFRESH_REUSE_GRACE", "0s").spawn().await;
    let (_, login) = app.user_with_session("zeno").await;
    let first = app.refresh(&login.refresh_token).await.unwrap();
    // The client's second call, sent with the first, is judged by an instance whose
    // clock is two seconds ahead (Redis: another instance), or a second on (the
    // rotation's second ended in between): the same race, not a theft.
    if backend != Backend::Embedded {
        let ahead = app
            .sibling()
            .clock_ahead(Duration::from_secs(2))
            .spawn()
            .await;
        let again = ahead.refresh(&login.refresh_token).await.unwrap();
        assert_eq!(again.refresh_token, first.refresh_token);
        assert_eq!(
            claims(&again.access_token)["jti"],
            claims(&first.access_token)["jti"]
        );
    }
    advance(&app, Duration::from_secs(1));
    let again = app.refresh(&login.refresh_token).await.unwrap();
    assert_eq!(again.refresh_token, first.refresh_token);
    assert_eq!(
        again.expires_at.unwrap().seconds,
        first.expires_at.unwrap().seconds
    );
    assert!(app.validate(&again.access_token).await.unwrap().valid);
    // Three seconds after the rotation, with no grace, the old token is a thief's.
    advance(&app, Duration::from_secs(2));
    assert_eq!(
        refused(app.refresh(&login.refresh_token).await),
        "REFRESH_TOKEN_REUSED"
    );
    assert_eq!(
        refused(app.refresh(&first.refresh_token).await),
        "REFRESH_TOKEN_INVALID"
    );
    assert!(!app.validate(&first.access_token).await.unwrap().valid);
}

async fn concurrent_refreshes_with_no_grace_while_the_clock_ticks_never_end_the_session(
    backend: Backend,
) {
    let app = backend.app().env("REFRESH_REUSE_GRACE", "0s").spawn().await;
    let (user, login) = app.user_with_session("hydra2").await;
    let mut token = login.refresh_token.clone();
    // Each round, 30 calls with one token; the second changes as soon as the first
    // answer (a rotation recorded) is back: the calls still under way, losers of that
    // race, are judged a second after the rotation they lost to.
    for round in 1..=4u64 {
        let mut pending: FuturesUnordered<_> = (0..30).map(|_| app.refresh(&token)).collect();
        let mut answers: Vec<pb::RefreshResponse> = Vec::new();
        while let Some(answer) = pending.next().await {
            if answers.is_empty() {
                advance(&app, Duration::from_secs(1));
            }
            answers.push(answer.expect("no call of a race is reuse"));
        }
        drop(pending);
        let successors: BTreeSet<&str> = answers.iter().map(|a| a.refresh_token.as_str()).collect();
        assert_eq!(successors.len(), 1, "round {round}: {successors:#?}");
        token = answers[0].refresh_token.clone();
        assert_eq!(generation(&token), round);
        if let Some(g) = stored_generation(&app, &user.user_id, &login.session_id).await {
            assert_eq!(g, round);
        }
        assert!(app.validate(&answers[0].access_token).await.unwrap().valid);
    }
    let last = app.refresh(&token).await.unwrap();
    assert_eq!(generation(&last.refresh_token), 5);
}

async fn a_rotation_expecting_a_stale_token_changes_nothing_in_the_store(backend: Backend) {
    let app = backend.app().spawn().await;
    let store = app.session_store();
    let now = unix(&app.clock);
    let (user_id, session_id) = ("u-stale", "s-stale");
    let key = RefreshKey::generate();
    let t0 = key.first(user_id, session_id);
    let t1 = key.successor(&refresh::parse(&t0).unwrap());
    let (h0, h1) = (refresh::token_hash(&t0), refresh::token_hash(&t1));
    store
        .create(
            &NewSession {
                user_id,
                session_id,
                jti: "jti-0",
                now,
                idle_expires_at: now + 3600,
                token_expires_at: now + 600,
                absolute_end: now + 86_400,
                ip: "127.0.0.1",
                user_agent: "test",
                username: "stale",
                amr: "pwd",
                refresh_key: &key.to_hex(),
                refresh_hash: &h0,
            },
            0,
        )
        .await
        .unwrap();
    let rotate = |expected: String, next: String, at: i64, jti: &'static str| {
        let store = &store;
        async move {
            store
                .rotate(&Rotation {
                    user_id,
                    session_id,
                    expected: &expected,
                    next: &next,
                    generation: 1,
                    now: at,
                    jti,
                    token_expires_at: at + 600,
                    idle_expires_at: at + 3600,
                })
                .await
                .unwrap()
        }
    };
    let state = || async {
        store
            .refresh_state(user_id, session_id, now)
            .await
            .unwrap()
            .expect("the session is live")
    };
    // An expected hash the session never held: nothing changes.
    let before = state().await;
    assert!(!rotate("0".repeat(64), h1.clone(), now + 5, "jti-x").await);
    assert_eq!(state().await, before);
    // The winner rotates; the loser, still expecting t0, changes nothing it wrote.
    assert!(rotate(h0.clone(), h1.clone(), now + 10, "jti-1").await);
    let after = state().await;
    assert_eq!(after.current, h1);
    assert_eq!(after.previous.as_deref(), Some(h0.as_str()));
    assert_eq!((after.generation, after.rotated_at), (1, now + 10));
    assert!(!rotate(h0.clone(), "f".repeat(64), now + 20, "jti-loser").await);
    assert_eq!(state().await, after);
    let seen = |jti: &'static str| store.check(user_id, session_id, jti, now + 20);
    assert!(matches!(
        seen("jti-1").await.unwrap(),
        authd::store::sessions::SessionState::Live { .. }
    ));
    assert_eq!(
        seen("jti-loser").await.unwrap(),
        authd::store::sessions::SessionState::Missing
    );
    // An ended session is not rotated back to life, even with its current hash.
    assert!(store.revoke(user_id, session_id, now + 30).await.unwrap());
    assert!(!rotate(h1.clone(), "e".repeat(64), now + 40, "jti-2").await);
    assert_eq!(
        store
            .refresh_state(user_id, session_id, now + 40)
            .await
            .unwrap(),
        None
    );
}

async fn a_refresh_racing_a_logout_never_leaves_a_working_refresh_token(backend: Backend) {
    // Refusals of tokens of ended sessions count against the address: not the subject.
    let app = backend
        .app()
        .env("THROTTLE_ADDRESS_THRESHOLD", "10000")
        .spawn()
        .await;
    app.register("orpheus", PASSWORD).await.unwrap();
    let mut rotated_first = 0;
    for round in 0..12u64 {
        let login = app.login("orpheus", PASSWORD).await.unwrap();
        // Each call held back in turn by 0–5 ms, so both orders (and the overlap in
        // between) come up on every backend.
        let (hold_refresh, hold_logout) = match round % 2 {
            0 => (Duration::from_millis(round / 2), Duration::ZERO),
            _ => (Duration::ZERO, Duration::from_millis(round / 2)),
        };
        let (refreshed, logged_out) = tokio::join!(
            async {
                tokio::time::sleep(hold_refresh).await;
                app.refresh(&login.refresh_token).await
            },
            async {
                tokio::time::sleep(hold_logout).await;
                app.logout(&login.access_token).await
            }
        );
        logged_out.unwrap();
        // Whichever came first, the session is over: no refresh token of it works, and
        // no access token of it verifies.
        let mut tokens = vec![login.refresh_token.clone()];
        let mut access = vec![login.access_token.clone()];
        match refreshed {
            Ok(r) => {
                rotated_first += 1;
                tokens.push(r.refresh_token);
                access.push(r.access_token);
            }
            Err(status) => {
                assert_eq!(refused::<()>(Err(status)), "REFRESH_TOKEN_INVALID");
            }
        }
        for token in &tokens {
            let reason = refused(app.refresh(token).await);
            assert_eq!(reason, "REFRESH_TOKEN_INVALID", "round {round}");
        }
        for token in &access {
            assert!(
                !app.validate(token).await.unwrap().valid,
                "round {round}: an access token of the ended session"
            );
        }
        let live = app
            .list_sessions(&app.login("orpheus", PASSWORD).await.unwrap().access_token)
            .await
            .unwrap();
        assert!(
            live.sessions
                .iter()
                .all(|s| s.session_id != login.session_id),
            "round {round}: the session came back"
        );
    }
    eprintln!("the refresh came first in {rotated_first} of 12 rounds");
}

/// The loser of a race judged on an instance whose clock is a minute ahead (past the
/// grace): it read the token as current, lost the compare-and-set to another instance,
/// and must answer that rotation's successor, not end the session. Redis is reached
/// through a slow link from that instance, so its read lands before the rotation and its
/// compare-and-set after. (The race of two instances needs shared Redis; the Cluster
/// cannot sit behind one proxy; the same rule on every backend is
/// `concurrent_refreshes_with_no_grace_while_the_clock_ticks_never_end_the_session`.)
#[tokio::test]
async fn the_loser_of_a_race_on_an_instance_with_its_clock_ahead_replays() {
    let redis = OwnRedis::start().await;
    let a = TestApp::builder()
        .env("REDIS_URL", &redis.url())
        .spawn()
        .await;
    let proxy = Proxy::start(SocketAddr::from(([127, 0, 0, 1], redis.port))).await;
    let b = a
        .sibling()
        .envs(&[
            ("REDIS_URL", &format!("redis://{}/", proxy.addr)),
            ("REDIS_COMMAND_TIMEOUT", "5s"),
        ])
        .clock_ahead(Duration::from_secs(60))
        .spawn()
        .await;
    let (user, login) = a.user_with_session("zeno2").await;
    // B's connections are made (and its scripts loaded) before the link slows down.
    let (_, warm) = a.user_with_session("warm").await;
    b.refresh(&warm.refresh_token).await.unwrap();
    proxy.add_latency(Duration::from_millis(200));
    let late = tokio::spawn({
        let b_client = b.client.clone();
        let token = login.refresh_token.clone();
        async move {
            b_client
                .clone()
                .refresh(pb::RefreshRequest {
                    refresh_token: token,
                    ..Default::default()
                })
                .await
                .map(tonic::Response::into_inner)
        }
    });
    // B's read reaches Redis at ~200 ms, its compare-and-set at ~600 ms.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let first = a.refresh(&login.refresh_token).await.unwrap();
    let late = late.await.unwrap();
    proxy.heal();
    let late = late.expect("the loser of the race is answered, not judged reuse");
    assert_eq!(late.refresh_token, first.refresh_token);
    assert_eq!(
        claims(&late.access_token)["jti"],
        claims(&first.access_token)["jti"]
    );
    assert_eq!(
        stored_generation(&a, &user.user_id, &login.session_id).await,
        Some(1)
    );
    // The session lives on, and the same token read afresh by B, a minute after the
    // rotation by B's clock, is a replay after the grace: reuse.
    assert!(a.validate(&first.access_token).await.unwrap().valid);
    assert_eq!(
        refused(b.refresh(&login.refresh_token).await),
        "REFRESH_TOKEN_REUSED"
    );
}

async fn redis_down_refresh_is_unavailable(mode: &str) {
    let mut redis = OwnRedis::start().await;
    let url = redis.url();
    let app = TestApp::builder()
        .envs(&[("REDIS_URL", &url), ("REDIS_FAILURE_MODE", mode)])
        .spawn()
        .await;
    let (_, login) = app.user_with_session("atlas").await;
    redis.kill();
    assert_code(app.refresh(&login.refresh_token).await, Code::Unavailable);
    assert_code(app.refresh(&login.refresh_token).await, Code::Unavailable);
    redis.restart().await;
    // Redis came back empty: the session is gone, and so is its refresh token.
    let answered = eventually(Duration::from_secs(5), || async {
        app.refresh(&login.refresh_token)
            .await
            .err()
            .map(|s| s.code())
            == Some(Code::Unauthenticated)
    })
    .await;
    assert!(answered, "Refresh did not recover");
}

#[tokio::test]
async fn with_redis_down_refresh_is_unavailable_in_open_mode() {
    redis_down_refresh_is_unavailable("open").await;
}

#[tokio::test]
async fn with_redis_down_refresh_is_unavailable_in_closed_mode() {
    redis_down_refresh_is_unavailable("closed").await;
}

/// The Redis connection is cut at every point of a Refresh in turn (the reads, the
/// rotation's script): each call answers OK with a rotation that was recorded, or
/// UNAVAILABLE, and a retry with the same token then gets the one successor. Never
/// two branches, never an answer that was not recorded.
#[tokio::test]
async fn a_redis_connection_cut_in_the_middle_of_a_rotation_leaves_one_chain() {
    let redis = OwnRedis::start().await;
    let proxy = Proxy::start(([127, 0, 0, 1], redis.port).into()).await;
    let app = TestApp::builder()
        .env("REDIS_URL", &format!("redis://{}/", proxy.addr))
        .spawn()
        .await;
    let (user, login) = app.user_with_session("icarus").await;
    let mut token = login.refresh_token.clone();
    let mut failures = 0;
    for cut_at in 0..6 {
        proxy.cut_after(cut_at);
        let answer = app.refresh(&token).await;
        let cut = proxy.cut_done();
        proxy.heal();
        let expected_generation = generation(&token) + 1;
        let successor = match answer {
            Ok(r) => r.refresh_token,
            Err(s) => {
                failures += 1;
                assert!(cut, "failed without a cut: {s:?}");
                assert_eq!(s.code(), Code::Unavailable, "cut at {cut_at}: {s:?}");
                // The client retries with the same token: rotated now, or answered the
                // rotation that was recorded.
                let retried = eventually(Duration::from_secs(5), || async {
                    app.refresh(&token).await.is_ok()
                })
                .await;
                assert!(retried, "cut at {cut_at}: the retry never succeeded");
                app.refresh(&token).await.unwrap().refresh_token
            }
        };
        assert_eq!(generation(&successor), expected_generation);
        let stored = stored_generation(&app, &user.user_id, &login.session_id).await;
        assert_eq!(stored, Some(expected_generation), "cut at {cut_at}");
        token = successor;
    }
    assert!(failures > 0, "no cut landed inside a Refresh");
    // The chain is whole: its current token works.
    app.refresh(&token).await.unwrap();
}

/// The rotated access token is a JWT a library no one here wrote accepts, with the
/// login's auth_time and amr.
#[tokio::test]
async fn pyjwt_reads_the_logins_auth_time_and_amr_from_a_rotated_token() {
    let app = Backend::Embedded.app().spawn().await;
    let (_, login) = app.user_with_session("clio").await;
    let login_time = unix(&app.clock);
    advance(&app, Duration::from_secs(120));
    let rotated = app.refresh(&login.refresh_token).await.unwrap();
    let python =
        tokio::task::spawn_blocking(|| crate::support::python::python_with(&["pyjwt>=2.8,<3"]))
            .await
            .unwrap();
    let script = "import json, sys, jwt\n\
        c = jwt.decode(sys.argv[1], sys.argv[2], algorithms=['HS256'], audience='authd', \
        issuer='authd', options={'verify_exp': False, 'verify_nbf': False, 'verify_iat': False})\n\
        print(json.dumps({'auth_time': c['auth_time'], 'amr': c['amr'], 'iat': c['iat']}))";
    let out = tokio::process::Command::new(python)
        .args(["-c", script, &rotated.access_token, SECRET])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "PyJWT refused the token: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(c["auth_time"], login_time);
    assert_eq!(c["amr"], serde_json::json!(["pwd"]));
    assert_eq!(c["iat"], login_time + 120);
}

/// Neither a refresh token nor its secret reaches the log, whatever happens to it.
#[tokio::test]
async fn refresh_tokens_never_reach_the_log() {
    let app = Backend::Embedded.app().spawn().await;
    let (_, login) = app.user_with_session("lethe2").await;
    let first = app.refresh(&login.refresh_token).await.unwrap();
    advance(&app, Duration::from_secs(10));
    app.refresh(&login.refresh_token).await.unwrap();
    advance(&app, Duration::from_secs(60));
    refused(app.refresh(&login.refresh_token).await);
    refused(app.refresh(&first.refresh_token).await);
    let logs = captured_logs();
    assert!(
        logs.contains("refresh token reuse detected"),
        "the reuse was not logged"
    );
    // A replay is a retry or a parallel call of the owner's, as a rule: debug only.
    let replays: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("refresh replayed"))
        .collect();
    assert!(!replays.is_empty(), "the replay was not logged at debug");
    for line in replays {
        assert!(
            line.contains("DEBUG") && !line.contains("INFO") && !line.contains("WARN"),
            "{line}"
        );
    }
    for token in [&login.refresh_token, &first.refresh_token] {
        let secret = token.split('.').nth(4).unwrap();
        let tag = token.split('.').nth(5).unwrap();
        assert!(!logs.contains(secret), "a refresh secret in the log");
        assert!(!logs.contains(tag), "a refresh tag in the log");
    }
}

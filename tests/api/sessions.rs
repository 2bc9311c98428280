use std::time::Duration;

use authd::proto::auth::v1::InvalidReason;
use redis::AsyncCommands;
use tonic::Code;

use crate::support::*;

on_every_backend!(
    list_sessions_shows_live_sessions_and_marks_the_current_one,
    idle_sessions_are_pruned_from_the_list,
    an_idle_session_expires_and_activity_extends_it,
    revoke_session_ends_another_of_the_callers_sessions,
    someone_elses_session_and_an_unknown_one_are_the_same_not_found,
    revoke_session_checks_its_input_and_the_bearer,
    past_max_sessions_the_oldest_session_ends,
    activity_is_recorded_at_most_once_a_minute
);

async fn list_sessions_shows_live_sessions_and_marks_the_current_one(backend: Backend) {
    let app = backend.app().spawn().await;
    let (_, first) = app.user_with_session("nina").await;
    advance(&app, Duration::from_secs(5));
    let second = app.login("nina", PASSWORD).await.unwrap();
    let now = unix(&app.clock);

    let list = app.list_sessions(&second.access_token).await.unwrap();
    assert_eq!(list.active_count, 2);
    let ids: Vec<_> = list
        .sessions
        .iter()
        .map(|s| s.session_id.as_str())
        .collect();
    assert_eq!(ids, [first.session_id.as_str(), second.session_id.as_str()]);
    assert!(!list.sessions[0].current);
    assert!(list.sessions[1].current);
    let s = &list.sessions[1];
    assert_eq!(s.login_time.unwrap().seconds, now);
    assert_eq!(s.last_seen.unwrap().seconds, now);
    // The earlier of idle expiry (1 h) and the token's exp (24 h).
    assert_eq!(s.expires_at.unwrap().seconds, now + 3600);

    // Another user's sessions never show.
    let (_, other) = app.user_with_session("oscar").await;
    let list = app.list_sessions(&other.access_token).await.unwrap();
    assert_eq!(list.active_count, 1);
}

async fn idle_sessions_are_pruned_from_the_list(backend: Backend) {
    let app = backend.app().spawn().await;
    let (_, old) = app.user_with_session("paul").await;
    advance(&app, Duration::from_secs(50 * 60));
    let fresh = app.login("paul", PASSWORD).await.unwrap();
    advance(&app, Duration::from_secs(15 * 60)); // old: idle 65 min; fresh: 15 min
    let list = app.list_sessions(&fresh.access_token).await.unwrap();
    assert_eq!(list.active_count, 1);
    assert_eq!(list.sessions[0].session_id, fresh.session_id);
    assert_eq!(
        app.reason(&old.access_token).await,
        InvalidReason::SessionNotFound
    );
}

async fn an_idle_session_expires_and_activity_extends_it(backend: Backend) {
    let app = backend.app().spawn().await; // idle timeout 1 h
    let (_, login) = app.user_with_session("quinn").await;
    advance(&app, Duration::from_secs(59 * 60));
    assert!(app.validate(&login.access_token).await.unwrap().valid);
    advance(&app, Duration::from_secs(59 * 60)); // 118 min after login, 59 after activity
    assert!(app.validate(&login.access_token).await.unwrap().valid);
    advance(&app, Duration::from_secs(60 * 60)); // 60 min idle
    assert_eq!(
        app.reason(&login.access_token).await,
        InvalidReason::SessionNotFound
    );
}

async fn revoke_session_ends_another_of_the_callers_sessions(backend: Backend) {
    let app = backend.app().spawn().await;
    let (_, phone) = app.user_with_session("sam").await;
    let laptop = app.login("sam", PASSWORD).await.unwrap();
    app.revoke_session(&laptop.access_token, &phone.session_id)
        .await
        .unwrap();
    assert_eq!(
        app.reason(&phone.access_token).await,
        InvalidReason::Revoked
    );
    assert!(app.validate(&laptop.access_token).await.unwrap().valid);
    let list = app.list_sessions(&laptop.access_token).await.unwrap();
    assert_eq!(list.active_count, 1);
    // Revoking it again: it no longer exists.
    assert_code(
        app.revoke_session(&laptop.access_token, &phone.session_id)
            .await,
        Code::NotFound,
    );
}

async fn someone_elses_session_and_an_unknown_one_are_the_same_not_found(backend: Backend) {
    let app = backend.app().spawn().await;
    let (_, mine) = app.user_with_session("tara").await;
    let (_, theirs) = app.user_with_session("umar").await;
    let foreign = assert_code(
        app.revoke_session(&mine.access_token, &theirs.session_id)
            .await,
        Code::NotFound,
    );
    let unknown = assert_code(
        app.revoke_session(&mine.access_token, "00000000000000000000000000000000")
            .await,
        Code::NotFound,
    );
    assert_eq!(foreign.message(), unknown.message());
    assert_eq!(foreign.details(), unknown.details());
    // Theirs is untouched.
    assert!(app.validate(&theirs.access_token).await.unwrap().valid);
}

async fn revoke_session_checks_its_input_and_the_bearer(backend: Backend) {
    let app = backend.app().spawn().await;
    let (_, login) = app.user_with_session("vera").await;
    assert_code(
        app.revoke_session(&login.access_token, "").await,
        Code::InvalidArgument,
    );
    assert_code(
        app.revoke_session(&login.access_token, &"x".repeat(65))
            .await,
        Code::InvalidArgument,
    );
    assert_code(
        app.revoke_session("garbage", &login.session_id).await,
        Code::Unauthenticated,
    );
    assert_code(app.list_sessions("garbage").await, Code::Unauthenticated);
    let no_bearer = app
        .client
        .clone()
        .list_sessions(authd::proto::auth::v1::ListSessionsRequest::default())
        .await;
    assert_code(no_bearer, Code::Unauthenticated);
    // A logged-out token cannot list.
    app.logout(&login.access_token).await.unwrap();
    assert_code(
        app.list_sessions(&login.access_token).await,
        Code::Unauthenticated,
    );
}

async fn past_max_sessions_the_oldest_session_ends(backend: Backend) {
    let app = backend
        .app()
        .env("MAX_SESSIONS_PER_USER", "2")
        .spawn()
        .await;
    let (_, first) = app.user_with_session("wade").await;
    let second = app.login("wade", PASSWORD).await.unwrap();
    let third = app.login("wade", PASSWORD).await.unwrap();
    assert_eq!(
        app.reason(&first.access_token).await,
        InvalidReason::Revoked
    );
    assert!(app.validate(&second.access_token).await.unwrap().valid);
    let list = app.list_sessions(&third.access_token).await.unwrap();
    assert_eq!(list.active_count, 2);
    let ids: Vec<_> = list.sessions.iter().map(|s| s.session_id.clone()).collect();
    assert_eq!(ids, [second.session_id, third.session_id]);
}

async fn activity_is_recorded_at_most_once_a_minute(backend: Backend) {
    let app = backend.app().spawn().await;
    let (_, login) = app.user_with_session("rita").await;
    // A second session lists the first without touching it.
    let observer = app.login("rita", PASSWORD).await.unwrap();
    let t0 = unix(&app.clock);
    let first = |list: authd::proto::auth::v1::ListSessionsResponse| {
        let s = list.sessions.into_iter().find(|s| !s.current).unwrap();
        (s.last_seen.unwrap().seconds, s.expires_at.unwrap().seconds)
    };

    advance(&app, Duration::from_secs(59));
    for _ in 0..5 {
        assert!(app.validate(&login.access_token).await.unwrap().valid);
    }
    let seen = first(app.list_sessions(&observer.access_token).await.unwrap());
    assert_eq!(seen, (t0, t0 + 3600), "written before a minute passed");

    advance(&app, Duration::from_secs(1));
    assert!(app.validate(&login.access_token).await.unwrap().valid);
    let seen = first(app.list_sessions(&observer.access_token).await.unwrap());
    assert_eq!(seen, (t0 + 60, t0 + 60 + 3600));
}

#[tokio::test]
async fn all_of_a_users_keys_share_one_hash_slot_and_expire() {
    let app = TestApp::builder().spawn().await;
    let (user, login) = app.user_with_session("xena").await;
    let mut r = app.redis().await;
    let keys: Vec<String> = r.keys(format!("{}*", app.key_prefix)).await.unwrap();
    // Throttle counters belong to addresses and name hashes, not to a user.
    let throttle = format!("{}throttle:", app.key_prefix);
    let keys: Vec<String> = keys
        .into_iter()
        .filter(|k| !k.starts_with(&throttle))
        .collect();
    assert!(keys.len() >= 3, "{keys:?}");
    let tag = format!("{{user:{}}}", user.user_id);
    for key in &keys {
        assert!(
            key.starts_with(&format!("{}{tag}", app.key_prefix)),
            "{key}"
        );
        let ttl: i64 = r.ttl(key).await.unwrap();
        assert!(ttl > 0, "{key} has no expiry");
    }
    app.logout(&login.access_token).await.unwrap();
    let members: Vec<String> = r
        .zrange(format!("{}{tag}:sessions", app.key_prefix), 0, -1)
        .await
        .unwrap();
    assert!(
        members.is_empty(),
        "logged-out session left in the set: {members:?}"
    );
    // Every key still expires on its own, the revocation log too: it is the one key
    // outside a user's hash slot, a stream capped by REVOCATION_LOG_MAX_LEN.
    let log = format!("{}revocations", app.key_prefix);
    let keys: Vec<String> = r.keys(format!("{}*", app.key_prefix)).await.unwrap();
    assert!(keys.contains(&log), "{keys:?}");
    for key in &keys {
        let ttl: i64 = r.ttl(key).await.unwrap();
        assert!(ttl > 0, "{key} has no expiry");
    }
    let kind: String = redis::cmd("TYPE")
        .arg(&log)
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(kind, "stream");
}

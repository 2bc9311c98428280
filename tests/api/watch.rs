//! WatchRevocations on authd itself.

use std::time::Duration;

use authd::proto::auth::v1::{RevocationEvent, RevocationKind};
use tonic::Streaming;

use crate::support::*;

async fn watch(app: &TestApp, after: &str) -> Streaming<RevocationEvent> {
    try_watch(&app.client, Some(WATCH_CREDENTIAL), after)
        .await
        .unwrap()
}

on_every_backend!(
    every_kind_of_revocation_is_streamed_as_it_happens,
    a_watcher_resuming_from_its_cursor_gets_what_it_missed,
    a_cursor_authd_cannot_vouch_for_gets_a_reset,
    a_quiet_stream_sends_heartbeats
);

async fn every_kind_of_revocation_is_streamed_as_it_happens(backend: Backend) {
    let app = backend
        .app()
        .env("MAX_SESSIONS_PER_USER", "3")
        .spawn()
        .await;
    let (user, first) = app.user_with_session("ivy").await;
    let second = app.login("ivy", PASSWORD).await.unwrap();
    let mut stream = watch(&app, "").await;

    app.logout(&first.access_token).await.unwrap();
    let e = next_event(&mut stream).await;
    assert_eq!(e.kind(), RevocationKind::Token);
    assert_eq!(
        (e.user_id.as_str(), e.session_id.as_str()),
        (user.user_id.as_str(), first.session_id.as_str())
    );
    assert!(!e.jti.is_empty());
    assert!(e.revoked_at.is_some());

    let third = app.login("ivy", PASSWORD).await.unwrap();
    app.revoke_session(&third.access_token, &second.session_id)
        .await
        .unwrap();
    let e = next_event(&mut stream).await;
    assert_eq!(e.kind(), RevocationKind::Session);
    assert_eq!(e.session_id, second.session_id);

    app.change_password(&third.access_token, PASSWORD, "Brand-New-Pass-7")
        .await
        .unwrap();
    let e = next_event(&mut stream).await;
    assert_eq!(e.kind(), RevocationKind::User);
    assert_eq!(e.except_session_id, third.session_id);

    // The session limit: three more logins push the oldest live session out.
    for _ in 0..3 {
        app.login("ivy", "Brand-New-Pass-7").await.unwrap();
    }
    let e = next_event(&mut stream).await;
    assert_eq!(e.kind(), RevocationKind::Session);
    assert_eq!(e.session_id, third.session_id);
}

async fn a_watcher_resuming_from_its_cursor_gets_what_it_missed(backend: Backend) {
    let app = backend.app().spawn().await;
    let (_, a) = app.user_with_session("jade").await;
    let b = app.login("jade", PASSWORD).await.unwrap();
    let c = app.login("jade", PASSWORD).await.unwrap();
    let mut stream = watch(&app, "").await;
    app.logout(&a.access_token).await.unwrap();
    let seen = next_event(&mut stream).await;
    drop(stream);

    // Missed while away.
    app.logout(&b.access_token).await.unwrap();
    app.logout(&c.access_token).await.unwrap();

    let mut resumed = watch(&app, &seen.cursor).await;
    let e1 = next_event(&mut resumed).await;
    let e2 = next_event(&mut resumed).await;
    assert_eq!(
        (e1.session_id.as_str(), e2.session_id.as_str()),
        (b.session_id.as_str(), c.session_id.as_str())
    );
    assert_eq!(e1.kind(), RevocationKind::Token);
}

async fn a_cursor_authd_cannot_vouch_for_gets_a_reset(backend: Backend) {
    let app = backend.app().spawn().await;
    let mut stream = watch(&app, "99999999999999-0").await;
    let e = next_event(&mut stream).await;
    assert_eq!(e.kind(), RevocationKind::Reset);
}

async fn a_quiet_stream_sends_heartbeats(backend: Backend) {
    let app = backend.app().env("WATCH_HEARTBEAT", "50ms").spawn().await;
    let mut stream = watch(&app, "").await;
    for _ in 0..2 {
        let e = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(e.kind(), RevocationKind::Heartbeat);
    }
}

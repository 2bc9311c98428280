//! The audit trail: a row (and a log line under `authd::audit`) for every login
//! success and failure, throttle, lockout, logout, password change and session
//! revocation; never a secret; old rows deleted; a failed write fails no call.

use std::collections::BTreeSet;
use std::time::Duration;

use authd::proto::auth::v1 as pb;
use tonic::{Code, Request};

use crate::support::*;

/// Every row, oldest first: (kind, user_id, username_hash, client_ip, user_agent,
/// session_id, jti, detail).
type Row = (
    String,
    Option<String>,
    Option<String>,
    String,
    String,
    Option<String>,
    Option<String>,
    String,
);

async fn rows(app: &TestApp) -> Vec<Row> {
    sqlx::query_as(
        "SELECT kind, user_id, username_hash, client_ip, user_agent, session_id, jti, detail \
         FROM audit_events ORDER BY id",
    )
    .fetch_all(&app.db().await)
    .await
    .unwrap()
}

/// Waits until the table holds `kinds` and at least `at_least` rows (the writer is
/// asynchronous).
async fn rows_with(app: &TestApp, kinds: &[&str], at_least: usize) -> Vec<Row> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let all = rows(app).await;
        let have: BTreeSet<&str> = all.iter().map(|r| r.0.as_str()).collect();
        if all.len() >= at_least && kinds.iter().all(|k| have.contains(k)) {
            return all;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "missing some of {kinds:?} in {all:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

on_every_backend!(
    every_event_is_a_row_and_a_log_line_without_a_secret,
    rows_older_than_the_retention_are_deleted,
    a_failed_audit_write_does_not_fail_the_login
);

async fn every_event_is_a_row_and_a_log_line_without_a_secret(backend: Backend) {
    let app = backend
        .app()
        .envs(&[
            ("THROTTLE_ACCOUNT_THRESHOLD", "2"),
            ("THROTTLE_BASE_DELAY", "1s"),
        ])
        .spawn()
        .await;
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..10];
    let password = format!("Audit-Pass-{tag}!");
    let wrong = format!("Wrong-Pass-{tag}!");
    let new = format!("Newer-Pass-{tag}!");
    let ghost = format!("ghost{tag}");
    let user = app.register("quinn", &password).await.unwrap();

    let mut request = Request::new(pb::LoginRequest {
        username: "quinn".into(),
        password: password.clone(),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("user-agent", "audit-tests/1.0".parse().unwrap());
    let first = app
        .client
        .clone()
        .login(request)
        .await
        .unwrap()
        .into_inner();
    for _ in 0..2 {
        assert_code(app.login("quinn", &wrong).await, Code::Unauthenticated);
    }
    assert_code(app.login("quinn", &password).await, Code::ResourceExhausted);
    advance(&app, Duration::from_secs(1));
    let second = app.login("quinn", &password).await.unwrap();
    app.revoke_session(&second.access_token, &first.session_id)
        .await
        .unwrap();
    assert_code(
        app.change_password(&second.access_token, &wrong, &new)
            .await,
        Code::PermissionDenied,
    );
    app.change_password(&second.access_token, &password, &new)
        .await
        .unwrap();
    app.logout(&second.access_token).await.unwrap();
    assert_code(app.login(&ghost, &wrong).await, Code::Unauthenticated);

    let kinds = [
        "login_succeeded",
        "login_failed",
        "lockout",
        "throttled",
        "session_revoked",
        "password_change_failed",
        "password_changed",
        "logout",
    ];
    // 2 successes, 3 failures and one row for each other kind.
    let all = rows_with(&app, &kinds, 11).await;
    let of = |kind: &str| {
        all.iter()
            .filter(|r| r.0 == kind)
            .cloned()
            .collect::<Vec<_>>()
    };

    let succeeded = of("login_succeeded");
    assert_eq!(succeeded.len(), 2, "{all:#?}");
    assert_eq!(succeeded[0].1.as_deref(), Some(user.user_id.as_str()));
    assert_eq!(succeeded[0].3, "127.0.0.1");
    assert!(
        succeeded[0].4.starts_with("audit-tests/1.0"),
        "{:?}",
        succeeded[0].4
    );
    assert_eq!(succeeded[0].5.as_deref(), Some(first.session_id.as_str()));
    assert_eq!(succeeded[0].6.as_ref().map(String::len), Some(32), "a jti");
    let hash = succeeded[0].2.clone().expect("a username hash");
    assert_eq!(hash.len(), 64);

    let failed = of("login_failed");
    assert_eq!(failed.len(), 3, "{all:#?}");
    assert!(
        failed[..2]
            .iter()
            .all(|r| r.1.as_deref() == Some(user.user_id.as_str())
                && r.2.as_deref() == Some(hash.as_str()))
    );
    // The unknown name: no user, its hash only.
    assert_eq!(failed[2].1, None);
    assert!(
        failed[2]
            .2
            .as_ref()
            .is_some_and(|h| h.len() == 64 && *h != hash)
    );

    let lockout = of("lockout");
    assert_eq!(lockout.len(), 1, "{all:#?}");
    assert!(lockout[0].7.contains("account"), "{:?}", lockout[0].7);
    assert_eq!(of("throttled")[0].2.as_deref(), Some(hash.as_str()));
    assert_eq!(
        of("session_revoked")[0].5.as_deref(),
        Some(first.session_id.as_str())
    );
    for kind in ["password_change_failed", "password_changed", "logout"] {
        let row = &of(kind)[0];
        assert_eq!(row.1.as_deref(), Some(user.user_id.as_str()), "{kind}");
        assert_eq!(row.5.as_deref(), Some(second.session_id.as_str()), "{kind}");
    }

    // No secret anywhere: not in a row, not in any log line of the whole run.
    let stored_hash: String = sqlx::query_scalar("SELECT password_hash FROM users WHERE id = ?")
        .bind(&user.user_id)
        .fetch_one(&app.db().await)
        .await
        .unwrap();
    let secrets = [
        password.as_str(),
        wrong.as_str(),
        new.as_str(),
        first.access_token.as_str(),
        second.access_token.as_str(),
        stored_hash.as_str(),
        &stored_hash[7..29],
        &first.access_token[first.access_token.len() - 20..],
        ghost.as_str(),
    ];
    let text = format!("{all:?}");
    let logs = captured_logs();
    for secret in secrets {
        assert!(!text.contains(secret), "{secret:?} in an audit row");
        assert!(!logs.contains(secret), "{secret:?} in the log");
    }
    // The log carries the same events under their own target.
    let audit_lines: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("authd::audit") && l.contains(&user.user_id))
        .collect();
    for kind in kinds
        .iter()
        .filter(|k| **k != "lockout" && **k != "throttled")
    {
        assert!(
            audit_lines
                .iter()
                .any(|l| l.contains(&format!("kind=\"{kind}\""))
                    || l.contains(&format!("kind={kind}"))),
            "no {kind} audit log line for this user"
        );
    }
}

async fn rows_older_than_the_retention_are_deleted(backend: Backend) {
    let app = backend
        .app()
        .envs(&[("AUDIT_RETENTION", "1h"), ("AUDIT_PURGE_INTERVAL", "20ms")])
        .spawn()
        .await;
    assert_code(
        app.login("oldname", "Wrong-Horse-9").await,
        Code::Unauthenticated,
    );
    rows_with(&app, &["login_failed"], 1).await;
    advance(&app, Duration::from_secs(2 * 3600));
    app.register("fresh", PASSWORD).await.unwrap();
    app.login("fresh", PASSWORD).await.unwrap();
    let purged = eventually(Duration::from_secs(5), || async {
        let kinds: Vec<String> = rows(&app).await.into_iter().map(|r| r.0).collect();
        kinds == ["login_succeeded"]
    })
    .await;
    assert!(purged, "{:#?}", rows(&app).await);
}

async fn a_failed_audit_write_does_not_fail_the_login(backend: Backend) {
    let app = backend.app().spawn().await;
    app.register("rita", PASSWORD).await.unwrap();
    sqlx::query("DROP TABLE audit_events")
        .execute(&app.db().await)
        .await
        .unwrap();
    let login = app.login("rita", PASSWORD).await.unwrap();
    assert!(app.validate(&login.access_token).await.unwrap().valid);
    let logged = eventually(Duration::from_secs(5), || async {
        captured_logs().contains("audit rows not written")
    })
    .await;
    assert!(logged, "the failed write was not logged");
}

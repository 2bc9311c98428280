//! The audit table under attack: what a client sends about itself must never cost
//! another event its row.

use std::time::Duration;

use authd::proto::auth::v1 as pb;
use futures::StreamExt;
use tonic::{Code, Request};

use crate::support::*;

/// Settings under which no failed login is throttled, so every attempt is a
/// `login_failed` row, and a burst is hashed rather than shed.
const UNTHROTTLED: &[(&str, &str)] = &[
    ("THROTTLE_ACCOUNT_THRESHOLD", "100000"),
    ("THROTTLE_ADDRESS_THRESHOLD", "100000"),
    ("BCRYPT_QUEUE", "1000"),
];

/// `count` failed logins, 16 at a time (so the writer sees them in batches), the
/// `i`-th with the user agent `agent(i)`.
async fn failed_logins(app: &TestApp, count: usize, agent: impl Fn(usize) -> String) {
    let calls = (0..count).map(|i| {
        let mut request = Request::new(pb::LoginRequest {
            username: format!("nobody{i}"),
            password: "Wrong-Horse-9".into(),
            ..Default::default()
        });
        request
            .metadata_mut()
            .insert("user-agent", agent(i).parse().unwrap());
        let mut client = app.client.clone();
        async move { client.login(request).await }
    });
    let answers: Vec<_> = futures::stream::iter(calls)
        .buffer_unordered(16)
        .collect()
        .await;
    for answer in answers {
        assert_code(answer, Code::Unauthenticated);
    }
}

/// The `login_failed` rows' user agents, once `expected` rows are in (or 5 s passed).
async fn failed_login_agents(app: &TestApp, expected: usize) -> Vec<String> {
    let db = app.db().await;
    let read = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT user_agent FROM audit_events WHERE kind = 'login_failed' ORDER BY id",
        )
        .fetch_all(&db)
        .await
        .unwrap()
    };
    eventually(Duration::from_secs(5), || async {
        read().await.len() >= expected
    })
    .await;
    // A moment more, so rows written past `expected` would show.
    tokio::time::sleep(Duration::from_millis(100)).await;
    read().await
}

on_every_backend!(
    long_user_agents_cost_no_other_event_its_row,
    a_row_the_database_refuses_costs_only_itself
);

async fn long_user_agents_cost_no_other_event_its_row(backend: Backend) {
    let app = backend.app().envs(UNTHROTTLED).spawn().await;
    let long = format!("Mozilla/5.0 {}", "A".repeat(1_000));
    // One call in ten carries a user agent longer than the column.
    failed_logins(&app, 200, |i| {
        if i % 10 == 0 {
            long.clone()
        } else {
            format!("curl/8.{i}")
        }
    })
    .await;

    let agents = failed_login_agents(&app, 200).await;
    assert_eq!(agents.len(), 200, "audit rows missing");
    let cut: Vec<&String> = agents
        .iter()
        .filter(|a| a.starts_with("Mozilla/5.0 "))
        .collect();
    assert_eq!(cut.len(), 20, "the long agents' own rows");
    assert!(
        agents.iter().all(|a| a.len() <= 512),
        "a user agent longer than its column was stored"
    );
    // Cut as sessions cut it: the first 512 bytes.
    assert!(
        cut.iter()
            .all(|a| long.starts_with(a.as_str()) && a.len() == 512)
    );
}

async fn a_row_the_database_refuses_costs_only_itself(backend: Backend) {
    let app = backend.app().envs(UNTHROTTLED).spawn().await;
    // Whatever the database may refuse one day (a constraint, a trigger, a character
    // set), simulated by a trigger that refuses one user agent.
    let db = app.db().await;
    let trigger = match backend {
        Backend::MySqlRedis | Backend::MySqlCluster => {
            "CREATE TRIGGER refuse_poison BEFORE INSERT ON audit_events FOR EACH ROW \
             IF NEW.user_agent LIKE 'poison%' THEN \
             SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'refused'; END IF"
        }
        Backend::Embedded => {
            "CREATE TRIGGER refuse_poison BEFORE INSERT ON audit_events \
             WHEN NEW.user_agent LIKE 'poison%' BEGIN SELECT RAISE(ABORT, 'refused'); END"
        }
    };
    sqlx::raw_sql(trigger).execute(&db).await.unwrap();
    let dropped_before = metric(
        &app.scrape().await,
        "authd_audit_dropped_total",
        &[("reason", "rejected")],
    );

    failed_logins(&app, 200, |i| {
        if i % 10 == 0 {
            format!("poison/{i}")
        } else {
            format!("curl/8.{i}")
        }
    })
    .await;

    let agents = failed_login_agents(&app, 180).await;
    assert_eq!(agents.len(), 180, "rows lost beside the refused ones");
    assert!(agents.iter().all(|a| a.starts_with("curl/8.")));
    let dropped = metric(
        &app.scrape().await,
        "authd_audit_dropped_total",
        &[("reason", "rejected")],
    );
    // The registry is the process's: another test may add to it, never take away.
    assert!(
        dropped - dropped_before >= 20.0,
        "refused rows not counted: {dropped_before} -> {dropped}"
    );
    assert!(
        captured_logs().contains("audit rows not written to the table"),
        "the refused rows were not logged"
    );
}

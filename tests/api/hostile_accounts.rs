//! Attacks on accounts: Register floods, password-change races, guess bursts. Clients
//! that must count as different addresses connect from different loopback addresses
//! (127.0.0.2, 127.0.0.3, ...).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use authd::proto::auth::v1 as pb;
use authd::proto::auth::v1::RevocationKind;
use authd::proto::auth::v1::auth_service_client::AuthServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::support::*;

const WRONG: &str = "Wrong-Horse-9";

/// A client of `app` whose connections come from `source`, a loopback address.
async fn client_from(app: &TestApp, source: &str) -> AuthServiceClient<Channel> {
    let source: IpAddr = source.parse().unwrap();
    let target = app.addr;
    let channel = Endpoint::from_shared(format!("http://{target}"))
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| async move {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(source, 0))?;
            let stream = socket.connect(target).await?;
            stream.set_nodelay(true)?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }))
        .await
        .unwrap();
    AuthServiceClient::new(channel)
}

fn code<T>(answer: &Result<T, Status>) -> Option<Code> {
    answer.as_ref().err().map(Status::code)
}

/// How many of `answers` have each outcome: OK, and every error code.
fn tally<T>(answers: &[Result<T, Status>]) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for answer in answers {
        let key = code(answer).map_or("OK".to_owned(), |c| format!("{c:?}"));
        *counts.entry(key).or_insert(0) += 1;
    }
    counts
}

/// Inserts a user with a cheap hash of `PASSWORD`, as an import would.
async fn insert_user(app: &TestApp, name: &str) {
    sqlx::query("INSERT INTO users (id, username, password_hash) VALUES (?, ?, ?)")
        .bind(format!("imported-{name}"))
        .bind(name)
        .bind(bcrypt::hash(PASSWORD, 4).unwrap())
        .execute(&app.db().await)
        .await
        .unwrap();
}

on_every_backend!(
    a_hashing_flood_from_one_address_leaves_the_pool_to_the_others,
    a_taken_name_is_answered_without_hashing,
    register_calls_are_rationed_per_address,
    concurrent_password_changes_have_one_winner_that_keeps_its_session,
    a_burst_of_guesses_gets_exactly_the_threshold_checked_and_one_per_unlock,
    a_burst_spread_over_many_names_gets_exactly_the_address_threshold_checked,
    wrong_current_passwords_and_failed_logins_share_one_bound
);

// Finding: 32 threads registering from one address left legitimate Logins from
// elsewhere with RESOURCE_EXHAUSTED. The Register limit is out of the way here (the
// test settings): what protects the others is the flooder's share of the bcrypt pool.
async fn a_hashing_flood_from_one_address_leaves_the_pool_to_the_others(backend: Backend) {
    // Cost 8 (about 15 ms a hash here): the flood keeps both threads and the queue busy.
    let app = backend
        .app()
        .envs(&[
            ("BCRYPT_COST", "8"),
            ("BCRYPT_WORKERS", "2"),
            ("BCRYPT_QUEUE", "8"),
            // The default share: a quarter of the 10 places.
            ("BCRYPT_MAX_PER_ADDRESS", "2"),
            ("THROTTLE_ACCOUNT_THRESHOLD", "1000000"),
            ("THROTTLE_ADDRESS_THRESHOLD", "1000000"),
        ])
        .spawn()
        .await;
    let users = ["legit_a", "legit_b", "legit_c"];
    for name in users {
        app.register(name, PASSWORD).await.unwrap();
    }
    let attacker = client_from(&app, "127.0.0.2").await;
    let stop = Arc::new(AtomicBool::new(false));
    let flooded = Arc::new(AtomicUsize::new(0));
    let shed = Arc::new(AtomicUsize::new(0));
    // Register (a full hash each) and Login (a verify each), 32 at a time.
    let flood: Vec<_> = (0..32)
        .map(|t| {
            let (mut client, stop, flooded, shed) = (
                attacker.clone(),
                stop.clone(),
                flooded.clone(),
                shed.clone(),
            );
            tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let name = format!("flood_{t}_{i}");
                    let answer = if t % 2 == 0 {
                        client
                            .register(pb::RegisterRequest {
                                username: name,
                                password: PASSWORD.into(),
                            })
                            .await
                            .map(|_| ())
                    } else {
                        client
                            .login(pb::LoginRequest {
                                username: name,
                                password: WRONG.into(),
                                ..Default::default()
                            })
                            .await
                            .map(|_| ())
                    };
                    flooded.fetch_add(1, Ordering::Relaxed);
                    if code(&answer) == Some(Code::ResourceExhausted) {
                        shed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    // Wait until the flood is being shed: the pool is contended.
    assert!(
        eventually(Duration::from_secs(30), || async {
            shed.load(Ordering::Relaxed) >= 32
        })
        .await,
        "the flood was never shed ({} calls)",
        flooded.load(Ordering::Relaxed)
    );
    let mut failures = Vec::new();
    for (k, name) in users.iter().enumerate() {
        let client = client_from(&app, &format!("127.0.0.{}", k + 3)).await;
        for _ in 0..10 {
            if let Err(s) = login_on(&client, name, PASSWORD).await {
                failures.push(format!("{name}: {:?} {}", s.code(), s.message()));
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for task in flood {
        task.await.unwrap();
    }
    assert!(
        failures.is_empty(),
        "{} of 30 Logins from other addresses failed during the flood ({} flood calls, {} shed): {failures:?}",
        failures.len(),
        flooded.load(Ordering::Relaxed),
        shed.load(Ordering::Relaxed)
    );
}

// Finding: registering a name that exists cost a full bcrypt hash. With the one hashing
// slot held by someone else's job, a taken name is still answered ALREADY_EXISTS: it
// needed no slot.
async fn a_taken_name_is_answered_without_hashing(backend: Backend) {
    // One slot, and a cost that holds it for a while (about half a second).
    let app = backend
        .app()
        .envs(&[
            ("BCRYPT_COST", "13"),
            ("BCRYPT_WORKERS", "1"),
            ("BCRYPT_QUEUE", "0"),
            ("THROTTLE_ACCOUNT_THRESHOLD", "1000000"),
            ("THROTTLE_ADDRESS_THRESHOLD", "1000000"),
        ])
        .spawn()
        .await;
    insert_user(&app, "taken").await;
    let busy = client_from(&app, "127.0.0.2").await;
    let prober = client_from(&app, "127.0.0.3").await;
    let pool_full = || async {
        code(&login_on(&prober, "nobody", WRONG).await) == Some(Code::ResourceExhausted)
    };
    // Someone else keeps the slot busy.
    let stop = Arc::new(AtomicBool::new(false));
    let holder = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let _ = register_on(&busy, &format!("holder{i}"), PASSWORD).await;
            }
        }
    });
    let mut answer = None;
    for _ in 0..20 {
        // The slot is held before and after the Register of a taken name: held during it.
        if !eventually(Duration::from_secs(10), pool_full).await {
            continue;
        }
        let taken = register_on(&prober, "Taken", PASSWORD).await;
        if pool_full().await {
            answer = Some(taken);
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    holder.await.unwrap();
    assert_code(
        answer.expect("never caught the slot held"),
        Code::AlreadyExists,
    );
}

// Finding: the same flood created 4,636 accounts in 6 s. Register calls are rationed
// per address, successful or not, and a burst gets no more than the limit.
async fn register_calls_are_rationed_per_address(backend: Backend) {
    let app = backend
        .app()
        .envs(&[
            ("THROTTLE_REGISTER_THRESHOLD", "5"),
            ("THROTTLE_REGISTER_MAX_DELAY", "4s"),
            ("BCRYPT_QUEUE", "64"),
            ("BCRYPT_MAX_PER_ADDRESS", "64"),
        ])
        .spawn()
        .await;
    insert_user(&app, "taken").await;
    let a = client_from(&app, "127.0.0.2").await;
    // New names, a taken one, an invalid one: all count.
    for name in ["reg_a1", "reg_a2", "reg_a3"] {
        register_on(&a, name, PASSWORD).await.unwrap();
    }
    assert_code(
        register_on(&a, "taken", PASSWORD).await,
        Code::AlreadyExists,
    );
    assert_code(
        register_on(&a, "a b", PASSWORD).await,
        Code::InvalidArgument,
    );
    let s = assert_code(
        register_on(&a, "reg_a4", PASSWORD).await,
        Code::ResourceExhausted,
    );
    assert!(s.message().contains("registrations"), "{}", s.message());
    let retry = s
        .get_details_retry_info()
        .expect("RetryInfo")
        .retry_delay
        .unwrap();
    assert_eq!(retry, Duration::from_secs(1));
    // A refused name is not even looked up: a taken one is refused alike.
    assert_code(
        register_on(&a, "taken", PASSWORD).await,
        Code::ResourceExhausted,
    );
    // Another address is not held up.
    let b = client_from(&app, "127.0.0.3").await;
    register_on(&b, "reg_b1", PASSWORD).await.unwrap();
    // Once the wait is over, one more call, and the next wait is twice as long.
    advance(&app, Duration::from_secs(1));
    register_on(&a, "reg_a4", PASSWORD).await.unwrap();
    let s = assert_code(
        register_on(&a, "reg_a5", PASSWORD).await,
        Code::ResourceExhausted,
    );
    assert_eq!(
        s.get_details_retry_info().unwrap().retry_delay.unwrap(),
        Duration::from_secs(2)
    );

    // A burst from a fresh address: exactly the limit gets through.
    let c = client_from(&app, "127.0.0.4").await;
    let burst: Vec<_> = (0..32)
        .map(|i| {
            let c = &c;
            async move { register_on(c, &format!("burst{i}"), PASSWORD).await }
        })
        .collect();
    let answers = futures::future::join_all(burst).await;
    let counts = tally(&answers);
    assert_eq!(counts.get("OK"), Some(&5), "{counts:?}");
    assert_eq!(counts.get("ResourceExhausted"), Some(&27), "{counts:?}");
    let created: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM users WHERE username LIKE 'burst%'")
            .fetch_one(&app.db().await)
            .await
            .unwrap();
    assert_eq!(created, 5);
}

// Finding: of two concurrent ChangePasswords, the winner got OK but lost its own session,
// and the loser's "revoke all but me" ran although it answered PERMISSION_DENIED, with no
// event for it. Now: exactly one OK, the winner keeps its session, every other session
// ends, and watchers hear exactly one USER revocation, sparing the winner's session.
async fn concurrent_password_changes_have_one_winner_that_keeps_its_session(backend: Backend) {
    const SESSIONS: usize = 16;
    // Nothing but the race decides: neither the pool nor the throttle (which counts
    // the attempts in flight) refuses any of them.
    let app = backend
        .app()
        .envs(&[
            ("BCRYPT_QUEUE", "64"),
            ("BCRYPT_MAX_PER_ADDRESS", "64"),
            ("THROTTLE_ACCOUNT_THRESHOLD", "1000"),
            ("THROTTLE_ADDRESS_THRESHOLD", "1000"),
        ])
        .spawn()
        .await;
    let (user, first) = app.user_with_session("racer").await;
    let mut logins = vec![first];
    for _ in 1..SESSIONS {
        logins.push(app.login("racer", PASSWORD).await.unwrap());
    }
    let (_, bystander) = app.user_with_session("bystander").await;
    let mut events = try_watch(&app.client, Some(WATCH_CREDENTIAL), "")
        .await
        .unwrap();

    let changes: Vec<_> = logins
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let app = &app;
            async move {
                app.change_password(&l.access_token, PASSWORD, &format!("Brand-New-Pass-{i}"))
                    .await
            }
        })
        .collect();
    let answers = futures::future::join_all(changes).await;
    let counts = tally(&answers);
    assert_eq!(counts.get("OK"), Some(&1), "{counts:?}");
    assert_eq!(
        counts.get("PermissionDenied"),
        Some(&(SESSIONS - 1)),
        "{counts:?}"
    );
    let winner = answers.iter().position(Result::is_ok).unwrap();
    assert_eq!(
        answers[winner].as_ref().unwrap().revoked_sessions,
        SESSIONS as u32 - 1
    );

    // The winner's session lives; every other one has ended.
    let v = app.validate(&logins[winner].access_token).await.unwrap();
    assert!(
        v.valid && v.revocation_checked,
        "the winner's session ended: {v:?}"
    );
    for (i, l) in logins.iter().enumerate().filter(|(i, _)| *i != winner) {
        assert_eq!(
            app.reason(&l.access_token).await,
            pb::InvalidReason::Revoked,
            "session {i} outlived the change"
        );
    }
    // The winner's new password is the password.
    assert!(
        app.login("racer", &format!("Brand-New-Pass-{winner}"))
            .await
            .is_ok()
    );
    assert_code(app.login("racer", PASSWORD).await, Code::Unauthenticated);

    // Events up to a marker: one USER revocation, sparing the winner's session.
    app.logout(&bystander.access_token).await.unwrap();
    let mut user_events = Vec::new();
    loop {
        let e = tokio::time::timeout(Duration::from_secs(5), events.message())
            .await
            .expect("an event within 5 s")
            .unwrap()
            .expect("stream open");
        match e.kind() {
            RevocationKind::User => user_events.push(e),
            RevocationKind::Token if e.session_id == bystander.session_id => break,
            _ => {}
        }
    }
    assert_eq!(user_events.len(), 1, "{user_events:?}");
    assert_eq!(user_events[0].user_id, user.user_id);
    assert_eq!(user_events[0].except_session_id, logins[winner].session_id);
}

// Finding: with a threshold of 10, a burst had 19 guesses checked, and each unlock
// admitted a new burst. Attempts are now counted before they are checked: a burst of
// 64 gets exactly the threshold's worth checked, and each unlock exactly one more.
async fn a_burst_of_guesses_gets_exactly_the_threshold_checked_and_one_per_unlock(
    backend: Backend,
) {
    let app = backend.app().envs(&burst_settings()).spawn().await;
    app.register("target", PASSWORD).await.unwrap();
    let mut checked = Vec::new();
    for round in 0..5 {
        let (verified, wait) = guess_burst(&[&app], "target", 64).await;
        checked.push(verified);
        assert!(wait > Duration::ZERO, "round {round}: nothing was refused");
        advance(&app, wait);
    }
    assert_eq!(checked, [10, 1, 1, 1, 1], "guesses checked per round");
    // The right password after the last wait: admitted, and it resets the account.
    assert!(app.login("target", PASSWORD).await.is_ok());
    assert_code(app.login("target", WRONG).await, Code::Unauthenticated);
}

async fn a_burst_spread_over_many_names_gets_exactly_the_address_threshold_checked(
    backend: Backend,
) {
    let app = backend
        .app()
        .envs(&[
            ("THROTTLE_ADDRESS_THRESHOLD", "5"),
            ("TRUSTED_PROXIES", "127.0.0.1"),
            ("BCRYPT_QUEUE", "128"),
            ("BCRYPT_MAX_PER_ADDRESS", "128"),
        ])
        .spawn()
        .await;
    let burst: Vec<_> = (0..64)
        .map(|i| {
            let app = &app;
            async move {
                app.login_from(&format!("spread{i}"), WRONG, "198.51.100.9")
                    .await
            }
        })
        .collect();
    let counts = tally(&futures::future::join_all(burst).await);
    assert_eq!(counts.get("Unauthenticated"), Some(&5), "{counts:?}");
    assert_eq!(counts.get("ResourceExhausted"), Some(&59), "{counts:?}");
}

async fn wrong_current_passwords_and_failed_logins_share_one_bound(backend: Backend) {
    let app = backend.app().envs(&burst_settings()).spawn().await;
    let (_, session) = app.user_with_session("shared").await;
    let calls = (0..64).map(|i| {
        let app = &app;
        let token = session.access_token.clone();
        async move {
            if i % 2 == 0 {
                app.change_password(&token, WRONG, "Brand-New-Pass-7")
                    .await
                    .map(|_| ())
            } else {
                app.login("shared", WRONG).await.map(|_| ())
            }
        }
    });
    let counts = tally(&futures::future::join_all(calls).await);
    let checked =
        counts.get("Unauthenticated").unwrap_or(&0) + counts.get("PermissionDenied").unwrap_or(&0);
    assert_eq!(checked, 10, "{counts:?}");
    assert_eq!(counts.get("ResourceExhausted"), Some(&54), "{counts:?}");
}

/// An account waits after 10 failures; the address limit and the pool stay out of the
/// way, so every refusal is the account's.
fn burst_settings() -> Vec<(&'static str, &'static str)> {
    vec![
        ("THROTTLE_ACCOUNT_THRESHOLD", "10"),
        ("THROTTLE_ACCOUNT_MAX_DELAY", "1h"),
        ("THROTTLE_ADDRESS_THRESHOLD", "1000000"),
        ("BCRYPT_QUEUE", "128"),
        ("BCRYPT_MAX_PER_ADDRESS", "128"),
    ]
}

/// `n` wrong guesses at `name` at once, spread over `apps`: how many were checked
/// (answered UNAUTHENTICATED), and the longest wait the refused ones were told.
async fn guess_burst(apps: &[&TestApp], name: &str, n: usize) -> (usize, Duration) {
    let burst: Vec<_> = (0..n)
        .map(|i| apps[i % apps.len()].login(name, WRONG))
        .collect();
    let answers = futures::future::join_all(burst).await;
    let mut wait = Duration::ZERO;
    let mut checked = 0;
    for answer in &answers {
        match answer {
            Err(s) if s.code() == Code::Unauthenticated => checked += 1,
            Err(s) if s.code() == Code::ResourceExhausted => {
                assert!(
                    s.message().contains("failed attempts"),
                    "shed, not throttled: {s:?}"
                );
                wait = wait.max(s.get_details_retry_info().unwrap().retry_delay.unwrap());
            }
            other => panic!("unexpected answer to a wrong guess: {other:?}"),
        }
    }
    (checked, wait)
}

#[tokio::test]
async fn a_burst_across_two_instances_gets_exactly_the_threshold_checked() {
    let a = TestApp::builder().envs(&burst_settings()).spawn().await;
    let b = a.sibling().spawn().await;
    a.register("twins", PASSWORD).await.unwrap();
    let mut checked = Vec::new();
    for _ in 0..3 {
        let (verified, wait) = guess_burst(&[&a, &b], "twins", 64).await;
        checked.push(verified);
        advance(&a, wait);
    }
    assert_eq!(
        checked,
        [10, 1, 1],
        "guesses checked per round, on both instances together"
    );
}

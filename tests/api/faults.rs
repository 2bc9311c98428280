//! Store faults on purpose (issue #9): the test's own Redis killed, hung (SIGSTOP) or
//! restarted empty, and a TCP proxy in front of Redis or MariaDB that adds latency,
//! stalls, resets and cuts connections. Each test asserts what docs/design.md §4 promises:
//! a clear UNAVAILABLE (never a false OK, never INTERNAL), deadlines kept, nothing
//! half-written, no revoked token alive again, recovery without a restart.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use authd::proto::auth::v1 as pb;
use authd::proto::auth::v1::InvalidReason;
use authd::proto::auth::v1::auth_service_client::AuthServiceClient;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::support::proxy::Proxy;
use crate::support::raw::*;
use crate::support::*;

/// A bound on any one call while a store is broken: far above the 250 ms store timeouts,
/// far below the 10 s request timeout that would hide a hang.
const PROMPTLY: Duration = Duration::from_secs(3);

fn code<T>(result: &Result<T, Status>) -> Code {
    match result {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

/// A call and how long it took.
async fn timed<T>(call: impl Future<Output = T>) -> (T, Duration) {
    let started = Instant::now();
    let answer = call.await;
    (answer, started.elapsed())
}

async fn validate_on(
    client: &AuthServiceClient<Channel>,
    token: &str,
) -> Result<pb::ValidateTokenResponse, Status> {
    client
        .clone()
        .validate_token(pb::ValidateTokenRequest {
            token: token.into(),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

/// The test's own Redis, a proxy in front of it, and authd reaching it through the proxy.
async fn redis_behind_proxy(overrides: &[(&str, &str)]) -> (OwnRedis, Proxy, TestApp) {
    let redis = OwnRedis::start().await;
    let proxy = Proxy::start(([127, 0, 0, 1], redis.port).into()).await;
    let url = format!("redis://{}/", proxy.addr);
    let app = TestApp::builder()
        .env("REDIS_URL", &url)
        .envs(overrides)
        .spawn()
        .await;
    (redis, proxy, app)
}

async fn killed_before_traffic(mode: &str) {
    let mut redis = OwnRedis::start().await;
    let url = redis.url();
    redis.kill();
    let app = TestApp::builder()
        .envs(&[("REDIS_URL", &url), ("REDIS_FAILURE_MODE", mode)])
        .spawn()
        .await;
    // Users live in MariaDB: registering works without Redis.
    let user = app.register("early", PASSWORD).await.unwrap();
    assert_code(app.login("early", PASSWORD).await, Code::Unavailable);
    // A correctly signed token whose session cannot be looked up.
    let now = unix(&app.clock);
    let token = RawClaims {
        sub: Some(user.user_id.clone()),
        username: Some("early".into()),
        ..RawClaims::good(now)
    }
    .sign(SECRET);
    let answer = app.validate(&token).await;
    match mode {
        "open" => {
            let v = answer.unwrap();
            assert!(v.valid && !v.revocation_checked, "{v:?}");
        }
        _ => {
            assert_code(answer, Code::Unavailable);
        }
    }
    assert_eq!(app.reason("garbage").await, InvalidReason::Malformed);

    redis.restart().await;
    logs_in_checked_again(&app, "early").await;
    // Checked now: that token never had a session.
    assert_eq!(app.reason(&token).await, InvalidReason::SessionNotFound);
}

/// Once Redis is back: Login works again (no restart of authd) and its token is fully
/// checked.
async fn logs_in_checked_again(app: &TestApp, username: &str) {
    let up = eventually(Duration::from_secs(5), || async {
        app.login(username, PASSWORD).await.is_ok()
    })
    .await;
    assert!(up, "no recovery once Redis came back");
    let login = app.login(username, PASSWORD).await.unwrap();
    let v = app.validate(&login.access_token).await.unwrap();
    assert!(v.valid && v.revocation_checked, "{v:?}");
}

#[tokio::test]
async fn redis_killed_before_any_traffic_in_open_mode() {
    killed_before_traffic("open").await;
}

#[tokio::test]
async fn redis_killed_before_any_traffic_in_closed_mode() {
    killed_before_traffic("closed").await;
}

/// One call made while Redis was killed under load.
#[derive(Debug, Clone)]
struct Seen {
    method: &'static str,
    code: Code,
    /// ValidateToken's `valid` and `revocation_checked`, when it answered.
    valid: Option<bool>,
    checked: Option<bool>,
    took: Duration,
}

async fn killed_during_traffic(mode: &str) {
    let mut redis = OwnRedis::start().await;
    let url = redis.url();
    let app = TestApp::builder()
        .envs(&[("REDIS_URL", &url), ("REDIS_FAILURE_MODE", mode)])
        .spawn()
        .await;
    let (_, login) = app.user_with_session("busy").await;
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(std::sync::Mutex::new(Vec::<Seen>::new()));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (client, token, stop, seen) = (
                app.client.clone(),
                login.access_token.clone(),
                stop.clone(),
                seen.clone(),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let (v, took) = timed(validate_on(&client, &token)).await;
                    seen.lock().unwrap().push(Seen {
                        method: "ValidateToken",
                        code: code(&v),
                        valid: v.as_ref().ok().map(|v| v.valid),
                        checked: v.as_ref().ok().map(|v| v.revocation_checked),
                        took,
                    });
                    let (l, took) = timed(client.clone().login(pb::LoginRequest {
                        username: "busy".into(),
                        password: PASSWORD.into(),
                        ..Default::default()
                    }))
                    .await;
                    seen.lock().unwrap().push(Seen {
                        method: "Login",
                        code: code(&l),
                        valid: None,
                        checked: None,
                        took,
                    });
                }
            })
        })
        .collect();
    let any = |pred: &dyn Fn(&Seen) -> bool| seen.lock().unwrap().iter().any(pred);
    // The kill lands during the traffic: after a fully checked answer, and the traffic
    // goes on until an answer shows Redis gone (no fixed sleeps: a loaded CI machine
    // may take longer to get there).
    let checked_first = eventually(Duration::from_secs(10), || async {
        any(&|s| s.checked == Some(true))
    })
    .await;
    redis.kill();
    let degraded = |s: &Seen| match mode {
        "open" => s.checked == Some(false),
        _ => s.method == "ValidateToken" && s.code == Code::Unavailable,
    };
    let saw_degraded = eventually(Duration::from_secs(10), || async { any(&degraded) }).await;
    // A few more rounds with Redis gone.
    let settled = seen.lock().unwrap().len();
    let went_on = eventually(Duration::from_secs(5), || async {
        seen.lock().unwrap().len() >= settled + 40
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }
    let seen = seen.lock().unwrap().clone();
    assert!(checked_first, "no checked answer before the kill: {seen:?}");
    assert!(saw_degraded, "no answer showed Redis gone: {seen:?}");
    assert!(went_on, "the traffic stalled after the kill: {seen:?}");

    for s in &seen {
        assert!(s.took < PROMPTLY, "{s:?}");
        assert_ne!(s.valid, Some(false), "a live session refused: {s:?}");
        let allowed = match (s.method, mode) {
            ("ValidateToken", "open") => s.code == Code::Ok,
            // Closed mode never answers unchecked: valid only with Redis asked.
            ("ValidateToken", _) => {
                s.code == Code::Unavailable || (s.code == Code::Ok && s.checked == Some(true))
            }
            _ => matches!(s.code, Code::Ok | Code::Unavailable),
        };
        assert!(allowed, "{mode} mode: {s:?}");
    }

    redis.restart().await;
    logs_in_checked_again(&app, "busy").await;
}

#[tokio::test]
async fn redis_killed_during_traffic_in_open_mode() {
    killed_during_traffic("open").await;
}

#[tokio::test]
async fn redis_killed_during_traffic_in_closed_mode() {
    killed_during_traffic("closed").await;
}

/// Waits (5 s at most) until `token` is valid and checked against Redis again: the pool
/// recovered without a restart.
async fn checked_again(app: &TestApp, token: &str, when: &str) {
    let recovered = eventually(Duration::from_secs(5), || async {
        validate_on(&app.client, token)
            .await
            .is_ok_and(|v| v.valid && v.revocation_checked)
    })
    .await;
    assert!(recovered, "no recovery {when}");
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// What the calls started has ended with them: the runtime's tasks (the app runs on
/// the test's runtime) come back to about `before`.
async fn tasks_settle_to(before: usize) {
    let settled = eventually(Duration::from_secs(5), || async {
        alive_tasks() <= before + 8
    })
    .await;
    assert!(
        settled,
        "tasks piled up: {before} before, {} after",
        alive_tasks()
    );
}

async fn connected_clients(redis: &OwnRedis) -> u64 {
    let mut c = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let info: String = redis::cmd("INFO")
        .arg("clients")
        .query_async(&mut c)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("connected_clients:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

async fn hung_redis(mode: &str) {
    let redis = OwnRedis::start().await;
    let url = redis.url();
    // No circuit breaker: every call goes to the hung Redis and waits its timeouts.
    let app = TestApp::builder()
        .envs(&[
            ("REDIS_URL", &url),
            ("REDIS_FAILURE_MODE", mode),
            ("REDIS_RETRY_INTERVAL", "0s"),
            ("REDIS_CONNECT_TIMEOUT", "250ms"),
            ("REDIS_COMMAND_TIMEOUT", "250ms"),
        ])
        .spawn()
        .await;
    let (_, login) = app.user_with_session("frozen").await;
    assert!(app.validate(&login.access_token).await.unwrap().valid);
    let clients_before = connected_clients(&redis).await;
    let tasks_before = alive_tasks();

    redis.pause();
    let mut slowest = Duration::ZERO;
    for _ in 0..3 {
        let validations = (0..100).map(|_| timed(validate_on(&app.client, &login.access_token)));
        let logins = (0..10).map(|_| timed(app.login("frozen", PASSWORD)));
        let (validations, logins) = tokio::join!(
            futures::future::join_all(validations),
            futures::future::join_all(logins)
        );
        for (answer, took) in validations {
            // Connect (250 ms) plus command (250 ms), on a loaded machine.
            assert!(took < PROMPTLY, "took {took:?}");
            slowest = slowest.max(took);
            match mode {
                "open" => {
                    let v = answer.unwrap();
                    assert!(v.valid && !v.revocation_checked, "{v:?}");
                }
                _ => {
                    assert_code(answer, Code::Unavailable);
                }
            }
        }
        for (answer, took) in logins {
            assert!(took < PROMPTLY, "took {took:?}");
            slowest = slowest.max(took);
            assert_code(answer, Code::Unavailable);
        }
    }
    tasks_settle_to(tasks_before).await;

    redis.resume();
    checked_again(&app, &login.access_token, "after SIGCONT").await;
    app.login("frozen", PASSWORD).await.unwrap();
    // The connections opened during the hang were closed, not kept: the pool (8) and
    // the test's own at most.
    let clients = eventually(Duration::from_secs(5), || async {
        connected_clients(&redis).await <= clients_before.max(2) + 8
    })
    .await;
    eprintln!(
        "hung Redis ({mode}): slowest call {slowest:?}; tasks {tasks_before} before, {} after; \
         Redis clients {clients_before} before, {} after",
        alive_tasks(),
        connected_clients(&redis).await
    );
    assert!(clients, "Redis connections piled up");
}

#[tokio::test]
async fn a_hung_redis_in_open_mode_degrades_within_the_timeout_and_piles_nothing_up() {
    hung_redis("open").await;
}

#[tokio::test]
async fn a_hung_redis_in_closed_mode_fails_within_the_timeout_and_piles_nothing_up() {
    hung_redis("closed").await;
}

#[tokio::test]
async fn after_redis_restarts_empty_no_revoked_or_vanished_session_validates() {
    let mut redis = OwnRedis::start().await;
    let url = redis.url();
    let app = TestApp::builder()
        .envs(&[("REDIS_URL", &url), ("REDIS_FAILURE_MODE", "open")])
        .spawn()
        .await;
    let (_, logged_out) = app.user_with_session("phoenix").await;
    let revoked = app.login("phoenix", PASSWORD).await.unwrap();
    let swept = app.login("phoenix", PASSWORD).await.unwrap();
    let changer = app.login("phoenix", PASSWORD).await.unwrap();
    app.logout(&logged_out.access_token).await.unwrap();
    app.revoke_session(&changer.access_token, &revoked.session_id)
        .await
        .unwrap();
    advance(&app, Duration::from_secs(2));
    app.change_password(&changer.access_token, PASSWORD, "Brand-New-Pass-7")
        .await
        .unwrap();
    for token in [&logged_out, &revoked, &swept] {
        assert!(!app.validate(&token.access_token).await.unwrap().valid);
    }

    redis.kill();
    redis.restart().await;
    // Back, empty: its blacklist and sessions are gone. Gone means not valid, for the
    // revoked tokens and for the one whose session simply vanished.
    let checked = eventually(Duration::from_secs(5), || async {
        app.validate(&changer.access_token)
            .await
            .is_ok_and(|v| v.reason() == InvalidReason::SessionNotFound)
    })
    .await;
    assert!(checked, "Redis not asked again after its restart");
    for token in [&logged_out, &revoked, &swept, &changer] {
        let v = app.validate(&token.access_token).await.unwrap();
        assert!(!v.valid, "came back to life: {v:?}");
    }
    let fresh = app.login("phoenix", "Brand-New-Pass-7").await.unwrap();
    assert!(app.validate(&fresh.access_token).await.unwrap().valid);
}

/// ValidateToken with a `grpc-timeout`.
async fn validate_within(
    app: &TestApp,
    token: &str,
    deadline: Duration,
) -> Result<pb::ValidateTokenResponse, Status> {
    let mut request = tonic::Request::new(pb::ValidateTokenRequest {
        token: token.into(),
        ..Default::default()
    });
    request.set_timeout(deadline);
    app.client
        .clone()
        .validate_token(request)
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn with_redis_slow_callers_deadlines_are_kept_not_overrun() {
    // Store timeouts far away: only the callers' deadlines can end these calls.
    let (_redis, proxy, app) = redis_behind_proxy(&[
        ("REDIS_CONNECT_TIMEOUT", "5s"),
        ("REDIS_COMMAND_TIMEOUT", "5s"),
    ])
    .await;
    let (_, login) = app.user_with_session("sloth").await;

    proxy.add_latency(Duration::from_millis(1500));
    let mut raw = RawConn::open(app.addr).await;
    for deadline in [Duration::from_millis(200), Duration::from_millis(600)] {
        // The server keeps the deadline itself: a bare HTTP/2 client does not time out.
        let timeout = format!("{}m", deadline.as_millis());
        let calls = [
            (VALIDATE, field(1, login.access_token.as_bytes())),
            (
                LOGIN,
                [field(1, b"sloth"), field(2, PASSWORD.as_bytes())].concat(),
            ),
        ];
        for (path, payload) in calls {
            let (answer, took) =
                timed(raw.call(path, &[("grpc-timeout", &timeout)], message(&payload))).await;
            assert_eq!(
                answer.code,
                Some(Code::DeadlineExceeded),
                "{path}: {answer:?}"
            );
            assert!(
                took >= deadline.mul_f64(0.9) && took < deadline + Duration::from_millis(500),
                "{path}: deadline {deadline:?}, answered after {took:?}"
            );
        }
        // A tonic client also keeps time, and may give up first (CANCELLED, "Timeout
        // expired"): either way the call ends at its deadline, not at Redis's pace.
        let (answer, took) = timed(validate_within(&app, &login.access_token, deadline)).await;
        let status = answer.unwrap_err();
        assert!(
            matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
            "{status:?}"
        );
        assert!(took < deadline + Duration::from_millis(500), "{took:?}");
    }
    // Slow but within the deadline: answered, and checked.
    proxy.add_latency(Duration::from_millis(100));
    let v = validate_within(&app, &login.access_token, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(v.valid && v.revocation_checked, "{v:?}");
    // Healed: fast again once the delayed bytes in flight have drained.
    proxy.heal();
    let fast = eventually(Duration::from_secs(5), || async {
        let (v, took) = timed(app.validate(&login.access_token)).await;
        v.is_ok_and(|v| v.valid) && took < Duration::from_millis(300)
    })
    .await;
    assert!(fast, "still slow after the latency was gone");
}

#[tokio::test]
async fn the_redis_pool_recovers_from_reset_and_refused_connections_without_a_restart() {
    let (_redis, proxy, app) = redis_behind_proxy(&[("REDIS_FAILURE_MODE", "closed")]).await;
    let (_, login) = app.user_with_session("phoebe").await;
    for round in 0..3 {
        if round == 0 {
            proxy.reset(); // every pooled connection dies at once
        } else {
            proxy.refuse(); // Redis unreachable for a while
            let (answer, took) = timed(app.validate(&login.access_token)).await;
            assert_code(answer, Code::Unavailable);
            assert!(took < PROMPTLY);
            assert_code(app.login("phoebe", PASSWORD).await, Code::Unavailable);
            proxy.heal();
        }
        checked_again(&app, &login.access_token, &format!("round {round}")).await;
        app.login("phoebe", PASSWORD).await.unwrap();
    }
    // Dead connections were dropped, not hoarded: the pool's 8 and the watch stream.
    assert!(
        proxy.open_connections() <= 10,
        "{} connections",
        proxy.open_connections()
    );
}

/// An app whose MariaDB is reached through `proxy`, with short database timeouts.
async fn app_behind(proxy: &Proxy, overrides: &[(&str, &str)]) -> TestApp {
    TestApp::builder()
        .mysql_at(proxy.addr)
        .env("DB_QUERY_TIMEOUT", "300ms")
        .env("DB_ACQUIRE_TIMEOUT", "300ms")
        .envs(overrides)
        .spawn()
        .await
}

/// Login for a known user (right and wrong password) and an unknown one, with MariaDB
/// broken: the same UNAVAILABLE, promptly, in about the same time.
async fn login_is_unavailable_alike(app: &TestApp) {
    let mut answers = Vec::new();
    for _ in 0..3 {
        for (name, password) in [
            ("known", PASSWORD),
            ("known", "Wrong-Horse-9"),
            ("nobody_here", PASSWORD),
        ] {
            let (answer, took) = timed(app.login(name, password)).await;
            let status = assert_code(answer, Code::Unavailable);
            assert!(took < PROMPTLY, "{name}: {took:?}");
            answers.push((name, status.message().to_owned(), took));
        }
    }
    let message = &answers[0].1;
    assert!(
        answers.iter().all(|(_, m, _)| m == message),
        "answers differ: {answers:?}"
    );
    let median = |who: &str| {
        let mut t: Vec<_> = answers
            .iter()
            .filter(|(n, _, _)| *n == who)
            .map(|(_, _, t)| *t)
            .collect();
        t.sort();
        t[t.len() / 2]
    };
    let (known, unknown) = (median("known"), median("nobody_here"));
    eprintln!(
        "MariaDB broken: Login UNAVAILABLE after {known:?} (known user), {unknown:?} (unknown)"
    );
    assert!(
        known.abs_diff(unknown) < Duration::from_millis(250),
        "known {known:?}, unknown {unknown:?}"
    );
}

#[tokio::test]
async fn with_mariadb_slow_stalled_or_down_login_is_unavailable_alike_and_validate_keeps_answering()
{
    let proxy = Proxy::start(mysql_addr()).await;
    let app = app_behind(&proxy, &[]).await;
    let (_, login) = app.user_with_session("known").await;

    let tasks_before = alive_tasks();
    // Slower than DB_QUERY_TIMEOUT, stuck, down.
    let slow = |p: &Proxy| p.add_latency(Duration::from_secs(1));
    for break_it in [slow as fn(&Proxy), Proxy::stall, Proxy::refuse] {
        break_it(&proxy);
        login_is_unavailable_alike(&app).await;
        // A burst does not queue up behind the broken pool. A Login holds its bcrypt
        // slot from before the user lookup, so once the slots are taken the rest are
        // shed (RESOURCE_EXHAUSTED) at once; the others wait for the database's timeout
        // and answer UNAVAILABLE. Nothing else, and nothing late.
        let burst = (0..40)
            .map(|i| timed(app.login(if i % 2 == 0 { "known" } else { "nobody_here" }, PASSWORD)));
        let mut unavailable = 0;
        for (answer, took) in futures::future::join_all(burst).await {
            match code(&answer) {
                Code::Unavailable => unavailable += 1,
                Code::ResourceExhausted => {}
                other => panic!("unexpected {other:?}: {answer:?}"),
            }
            assert!(took < PROMPTLY, "{took:?}");
        }
        assert!(unavailable > 0, "every Login of the burst was shed");
        // Sessions are in Redis: tokens keep being checked, fully.
        let (v, took) = timed(app.validate(&login.access_token)).await;
        let v = v.unwrap();
        assert!(v.valid && v.revocation_checked, "{v:?}");
        assert!(took < Duration::from_secs(1), "{took:?}");
        assert_code(
            app.register("newcomer_x", PASSWORD).await,
            Code::Unavailable,
        );

        // The pool recovers by itself once the database is reachable again.
        proxy.heal();
        let recovered = eventually(Duration::from_secs(10), || async {
            app.login("known", PASSWORD).await.is_ok()
        })
        .await;
        assert!(recovered, "the MySQL pool did not recover");
    }
    // Nothing half-written by the refused registrations: the name is still free. (A
    // retry on UNAVAILABLE only: on a loaded machine the first new connection may take
    // longer than this test's 300 ms DB_ACQUIRE_TIMEOUT; ALREADY_EXISTS fails at once.)
    let mut answer = app.register("newcomer_x", PASSWORD).await;
    for _ in 0..20 {
        if code(&answer) != Code::Unavailable {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        answer = app.register("newcomer_x", PASSWORD).await;
    }
    answer.unwrap();
    tasks_settle_to(tasks_before).await;
    assert!(
        proxy.open_connections() <= 10,
        "{} connections to MariaDB",
        proxy.open_connections()
    );
}

/// The user's stored hash and `sessions_valid_after`, read straight from MariaDB.
async fn stored(app: &TestApp, username: &str) -> Option<(String, i64)> {
    sqlx::query_as::<_, (String, i64)>(
        "SELECT password_hash, sessions_valid_after FROM users WHERE username = ?",
    )
    .bind(username)
    .fetch_optional(&app.db().await)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_password_change_cut_midway_leaves_the_old_or_the_new_state_whole() {
    let proxy = Proxy::start(mysql_addr()).await;
    let app = app_behind(&proxy, &[("DB_QUERY_TIMEOUT", "2s")]).await;
    app.register("halfway", PASSWORD).await.unwrap();
    let passwords = [PASSWORD, "Brand-New-Pass-7"];
    let mut current = 0;
    let mut failures = 0;
    // Eight cut points, then again until one has landed inside a change (at most three
    // passes): on a loaded machine a cut can land on other traffic through the proxy
    // (the previous Login's background writes) and the change then runs whole.
    for round in 0..24 {
        let cut_at = round % 8;
        if round >= 8 && failures > 0 {
            break;
        }
        advance(&app, Duration::from_secs(10));
        let login = app.login("halfway", passwords[current]).await.unwrap();
        let (_, valid_after_before) = stored(&app, "halfway").await.unwrap();
        let next = 1 - current;

        proxy.cut_after(cut_at);
        let answer = app
            .change_password(&login.access_token, passwords[current], passwords[next])
            .await;
        let cut = proxy.cut_done();
        proxy.heal();

        let (hash, valid_after) = stored(&app, "halfway").await.unwrap();
        let is_new = bcrypt::verify(passwords[next], &hash).unwrap();
        let is_old = bcrypt::verify(passwords[current], &hash).unwrap();
        assert!(is_new != is_old, "cut at {cut_at}: a hash of neither");
        if is_new {
            // The new password comes with the bump, never without it.
            assert!(valid_after > valid_after_before, "cut at {cut_at}: no bump");
        } else {
            assert_eq!(valid_after, valid_after_before, "cut at {cut_at}");
        }
        match &answer {
            Ok(_) => assert!(is_new, "cut at {cut_at}: OK without the change"),
            Err(s) => {
                failures += 1;
                assert!(cut, "failed without a cut: {s:?}");
                assert_eq!(s.code(), Code::Unavailable, "cut at {cut_at}: {s:?}");
            }
        }
        if is_new {
            current = next;
        }
        // Whatever is stored is what logs in, once the pool has a good connection.
        let works = eventually(Duration::from_secs(5), || async {
            app.login("halfway", passwords[current]).await.is_ok()
        })
        .await;
        assert!(
            works,
            "cut at {cut_at}: the stored password does not log in"
        );
    }
    assert!(failures > 0, "no cut landed inside a change");
}

#[tokio::test]
async fn a_registration_cut_midway_leaves_a_whole_user_or_none() {
    let proxy = Proxy::start(mysql_addr()).await;
    let app = app_behind(&proxy, &[("DB_QUERY_TIMEOUT", "2s")]).await;
    app.register("warmup", PASSWORD).await.unwrap();
    let mut landed = 0;
    for cut_at in 0..4 {
        let name = format!("cut_{cut_at}");
        proxy.cut_after(cut_at);
        let answer = app.register(&name, PASSWORD).await;
        landed += usize::from(proxy.cut_done());
        proxy.heal();
        let row = stored(&app, &name).await;
        match &answer {
            Ok(_) => assert!(row.is_some(), "{name}: OK but not stored"),
            Err(s) => assert_eq!(s.code(), Code::Unavailable, "{name}: {s:?}"),
        }
        if let Some((hash, _)) = &row {
            assert!(bcrypt::verify(PASSWORD, hash).unwrap(), "{name}: bad hash");
        }
        // A retry settles it either way.
        let retry = eventually(Duration::from_secs(5), || async {
            matches!(
                code(&app.register(&name, PASSWORD).await),
                Code::Ok | Code::AlreadyExists
            )
        })
        .await;
        assert!(retry, "{name}: retry did not settle");
        app.login(&name, PASSWORD).await.unwrap();
    }
    assert!(landed > 0, "no cut landed during a registration");
}

/// Logs out `tokens` from three concurrent loops; once `kill_after` have answered OK,
/// `break_redis` runs (the loops hold off new calls until it has, so some surely come
/// after) and the rest go on. Every answer is OK or UNAVAILABLE.
async fn logout_burst(
    app: &TestApp,
    tokens: Vec<String>,
    kill_after: usize,
    break_redis: impl FnOnce(),
) -> Vec<(String, Code)> {
    let tokens = Arc::new(tokio::sync::Mutex::new(tokens));
    let oks = Arc::new(AtomicUsize::new(0));
    let (enough, mut enough_rx) = tokio::sync::watch::channel(false);
    let (broken, broken_rx) = tokio::sync::watch::channel(false);
    let loops: Vec<_> = (0..3)
        .map(|_| {
            let (client, tokens, oks, enough) = (
                app.client.clone(),
                tokens.clone(),
                oks.clone(),
                enough.clone(),
            );
            let mut broken = broken_rx.clone();
            tokio::spawn(async move {
                let mut answers = Vec::new();
                loop {
                    if oks.load(Ordering::SeqCst) >= kill_after {
                        enough.send_replace(true);
                        broken.wait_for(|b| *b).await.unwrap();
                    }
                    let Some(token) = tokens.lock().await.pop() else {
                        return answers;
                    };
                    let answer = client
                        .clone()
                        .logout(bearer(&token, pb::LogoutRequest {}))
                        .await;
                    if answer.is_ok() {
                        oks.fetch_add(1, Ordering::SeqCst);
                    }
                    answers.push((token, code(&answer)));
                }
            })
        })
        .collect();
    drop(enough);
    // Every loop may have finished first only if there were too few tokens.
    let _ = enough_rx.wait_for(|e| *e).await;
    break_redis();
    broken.send_replace(true);
    let mut answers = Vec::new();
    for l in loops {
        answers.extend(l.await.unwrap());
    }
    for (_, c) in &answers {
        assert!(
            matches!(c, Code::Ok | Code::Unavailable),
            "Logout answered {c:?}"
        );
    }
    let failed = answers
        .iter()
        .filter(|(_, c)| *c == Code::Unavailable)
        .count();
    assert!(
        failed > 0,
        "no Logout failed: Redis broke too late ({answers:?})"
    );
    answers
}

/// Waits until ValidateToken asks Redis again: a fresh session of `username` is
/// answered with `revocation_checked`. (A logged-out token cannot tell: open mode
/// refuses the tokens this instance revoked before the outage too.)
async fn redis_answers_again(app: &TestApp, username: &str) {
    let back = eventually(Duration::from_secs(5), || async {
        let Ok(fresh) = app.login(username, PASSWORD).await else {
            return false;
        };
        app.validate(&fresh.access_token)
            .await
            .is_ok_and(|v| v.valid && v.revocation_checked)
    })
    .await;
    assert!(back, "Redis not asked again");
}

async fn tokens_of(app: &TestApp, users: usize, each: usize) -> Vec<String> {
    let mut tokens = Vec::new();
    for u in 0..users {
        let name = format!("leaver_{u}");
        app.register(&name, PASSWORD).await.unwrap();
        for _ in 0..each {
            tokens.push(app.login(&name, PASSWORD).await.unwrap().access_token);
        }
    }
    tokens
}

#[tokio::test]
async fn logouts_answered_ok_before_redis_was_killed_stay_revoked_after_it_returns_empty() {
    let mut redis = OwnRedis::start().await;
    let url = redis.url();
    let app = TestApp::builder()
        .envs(&[("REDIS_URL", &url), ("REDIS_FAILURE_MODE", "open")])
        .spawn()
        .await;
    let tokens = tokens_of(&app, 10, 4).await;
    let answers = logout_burst(&app, tokens, 15, || redis.kill()).await;
    redis.restart().await;
    redis_answers_again(&app, "leaver_0").await;
    // No persistence: the blacklist went with the sessions. Either way a token whose
    // Logout answered OK does not validate.
    for (token, c) in &answers {
        let v = app.validate(token).await.unwrap();
        assert!(!v.valid, "{c:?} logout, token valid again: {v:?}");
        if *c == Code::Ok {
            assert!(
                matches!(
                    v.reason(),
                    InvalidReason::Revoked | InvalidReason::SessionNotFound
                ),
                "{v:?}"
            );
        }
    }
}

#[tokio::test]
async fn logouts_answered_ok_before_redis_was_cut_off_stay_revoked_after_it_returns() {
    let (_redis, proxy, app) = redis_behind_proxy(&[("REDIS_FAILURE_MODE", "open")]).await;
    let tokens = tokens_of(&app, 10, 4).await;
    let answers = logout_burst(&app, tokens, 15, || proxy.refuse()).await;
    proxy.heal();
    redis_answers_again(&app, "leaver_0").await;
    // Redis kept its data: every OK'd Logout is on the blacklist exactly.
    for (token, c) in &answers {
        let v = app.validate(token).await.unwrap();
        assert!(v.revocation_checked || !v.valid, "{v:?}");
        if *c == Code::Ok {
            assert_eq!(v.reason(), InvalidReason::Revoked, "{v:?}");
        }
    }
}

#[tokio::test]
async fn dropped_redis_connections_cost_one_call_each_not_an_outage() {
    // A long breaker interval: tripping it would show as seconds of UNAVAILABLE.
    let (_redis, proxy, app) = redis_behind_proxy(&[
        ("REDIS_FAILURE_MODE", "closed"),
        ("REDIS_RETRY_INTERVAL", "5s"),
    ])
    .await;
    let (_, login) = app.user_with_session("dropped").await;
    assert!(app.validate(&login.access_token).await.unwrap().valid);
    let pooled = proxy.open_connections();

    // Redis is fine; only the connections die (a restart behind a load balancer, an idle
    // timeout, CLIENT KILL).
    proxy.reset();
    let mut failed = 0;
    for _ in 0..20 {
        match app.validate(&login.access_token).await {
            Ok(v) => assert!(v.valid && v.revocation_checked, "{v:?}"),
            Err(s) => {
                assert_eq!(s.code(), Code::Unavailable, "{s:?}");
                failed += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        failed <= pooled,
        "{failed} calls failed for {pooled} dropped connections"
    );
    app.login("dropped", PASSWORD).await.unwrap();
}

#[tokio::test]
async fn dropped_mariadb_connections_are_replaced_before_a_call_sees_them() {
    let proxy = Proxy::start(mysql_addr()).await;
    let app = app_behind(&proxy, &[]).await;
    app.register("reconnect", PASSWORD).await.unwrap();
    app.login("reconnect", PASSWORD).await.unwrap();
    // MariaDB is fine; only the pooled connections die.
    proxy.reset();
    tokio::time::sleep(Duration::from_millis(50)).await;
    for i in 0..5 {
        app.login("reconnect", PASSWORD)
            .await
            .unwrap_or_else(|s| panic!("login {i} after the reset: {s:?}"));
    }
}

#[tokio::test]
async fn redis_slower_than_its_timeout_fails_calls_promptly_and_leaves_no_connections_behind() {
    let (_redis, proxy, app) = redis_behind_proxy(&[
        ("REDIS_FAILURE_MODE", "closed"),
        ("REDIS_RETRY_INTERVAL", "0s"),
        ("REDIS_COMMAND_TIMEOUT", "250ms"),
    ])
    .await;
    let (_, login) = app.user_with_session("laggard").await;
    let tasks_before = alive_tasks();

    proxy.add_latency(Duration::from_millis(400));
    for _ in 0..3 {
        let calls = (0..50).map(|_| timed(validate_on(&app.client, &login.access_token)));
        for (answer, took) in futures::future::join_all(calls).await {
            assert_code(answer, Code::Unavailable);
            assert!(took < PROMPTLY, "{took:?}");
        }
    }
    proxy.heal();
    checked_again(&app, &login.access_token, "once Redis was fast again").await;
    tasks_settle_to(tasks_before).await;
    // Each timed-out connection was dropped once its late answers came in.
    let drained = eventually(Duration::from_secs(5), || async {
        proxy.open_connections() <= 8
    })
    .await;
    assert!(
        drained,
        "{} connections left open",
        proxy.open_connections()
    );
}

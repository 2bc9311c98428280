//! The instance-local session cache (`SESSION_CACHE=on`, issue #21; docs/design.md §12):
//! a warm session costs no Redis round trip; a revocation made here is in force when the
//! call returns, one made on another instance as soon as the event is read; losing the
//! revocation log (or its RESET) empties the cache and every call goes to Redis; idle
//! expiry and activity still hold. `SESSION_CACHE=off` is the rest of the suite.
//!
//! Waits here are correctness bounds (poll until it holds, or fail), never figures: the
//! stream's delay is measured by the benchmark.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use authd::proto::auth::v1 as pb;
use authd::proto::auth::v1::InvalidReason;

use crate::admin::{admin, admin_client, set_roles, user_req};
use crate::support::proxy::Proxy;
use crate::support::*;

on_every_backend!(
    logout_revoke_session_and_change_password_here_are_in_force_when_they_return,
    set_roles_and_disable_user_here_are_in_force_when_they_return,
    a_reused_refresh_token_ends_the_cached_session_here_at_once,
    idle_expiry_holds_and_activity_is_still_written,
    no_validation_sent_after_the_logout_is_acknowledged_accepts_the_token,
);

/// Long enough that no answer lapses during a test: what is refused is refused because
/// it was invalidated, not because it aged out.
const LONG_TTL: &str = "10m";

/// An app with the cache on (and `env` on top), once its cache can have started
/// following the log.
async fn cached(builder: AppBuilder<'_>, env: &[(&str, &str)]) -> TestApp {
    let app = builder
        .envs(&[("SESSION_CACHE", "on"), ("SESSION_CACHE_TTL", LONG_TTL)])
        .envs(env)
        .spawn()
        .await;
    // The follower subscribes and the tail fixes its position in a few milliseconds; an
    // answer read before that is only not kept (the tests would pass without a cache,
    // never fail wrongly). The private-Redis tests below prove the hits themselves.
    tokio::time::sleep(Duration::from_millis(300)).await;
    app
}

/// Validates each token twice: the first fills the cache, the second is a hit.
async fn warm(app: &TestApp, tokens: &[&str]) {
    for token in tokens {
        for _ in 0..2 {
            let v = app.validate(token).await.unwrap();
            assert!(v.valid, "{v:?}");
        }
    }
}

async fn valid(app: &TestApp, token: &str) -> bool {
    app.validate(token).await.unwrap().valid
}

async fn logout_revoke_session_and_change_password_here_are_in_force_when_they_return(
    backend: Backend,
) {
    let app = cached(backend.app(), &[]).await;
    let (_, a) = app.user_with_session("cara").await;
    let b = app.login("cara", PASSWORD).await.unwrap();
    let c = app.login("cara", PASSWORD).await.unwrap();
    let d = app.login("cara", PASSWORD).await.unwrap();
    let tokens = [&a, &b, &c, &d].map(|l| l.access_token.as_str());
    warm(&app, &tokens).await;

    // Each checked on the very next call, without waiting for the log.
    app.logout(&a.access_token).await.unwrap();
    assert_eq!(app.reason(&a.access_token).await, InvalidReason::Revoked);
    assert!(valid(&app, &b.access_token).await);

    app.revoke_session(&c.access_token, &b.session_id)
        .await
        .unwrap();
    assert!(!valid(&app, &b.access_token).await);
    assert!(valid(&app, &c.access_token).await);

    app.change_password(&c.access_token, PASSWORD, "Brand-New-Pass-7")
        .await
        .unwrap();
    assert!(!valid(&app, &d.access_token).await);
    assert!(
        valid(&app, &c.access_token).await,
        "the caller's session stays"
    );
}

async fn set_roles_and_disable_user_here_are_in_force_when_they_return(backend: Backend) {
    let app = cached(backend.app(), &[]).await;
    let root = admin(&app, "root").await;
    let (_, dora) = app.user_with_session("dora").await;
    warm(&app, &[&dora.access_token]).await;
    assert!(
        app.validate(&dora.access_token)
            .await
            .unwrap()
            .roles
            .is_empty()
    );

    set_roles(&app, &root, "dora", &["ops"]).await;
    assert_eq!(
        app.validate(&dora.access_token).await.unwrap().roles,
        ["ops"],
        "the new roles on the next call"
    );
    warm(&app, &[&dora.access_token]).await;

    admin_client(&app)
        .disable_user(user_req(
            &root,
            pb::DisableUserRequest {
                user: "dora".into(),
            },
        ))
        .await
        .unwrap();
    assert!(!valid(&app, &dora.access_token).await);
}

async fn a_reused_refresh_token_ends_the_cached_session_here_at_once(backend: Backend) {
    let app = cached(backend.app(), &[]).await;
    let (_, login) = app.user_with_session("theft").await;
    let first = app.refresh(&login.refresh_token).await.unwrap();
    warm(&app, &[&login.access_token, &first.access_token]).await;
    // Past the reuse grace (the answers are kept far longer: LONG_TTL).
    advance(&app, Duration::from_secs(31));
    warm(&app, &[&first.access_token]).await;
    assert!(app.refresh(&login.refresh_token).await.is_err(), "reuse");
    for token in [&login.access_token, &first.access_token] {
        assert!(!valid(&app, token).await);
    }
}

async fn idle_expiry_holds_and_activity_is_still_written(backend: Backend) {
    let app = cached(backend.app(), &[("SESSION_IDLE_TIMEOUT", "300s")]).await;
    let (_, login) = app.user_with_session("idle").await;
    let token = login.access_token.as_str();
    let started = unix(&app.clock);
    warm(&app, &[token]).await;

    // A minute on, a call answered from the cache still records the activity.
    advance(&app, Duration::from_secs(61));
    assert!(valid(&app, token).await);
    let sessions = app.list_sessions(token).await.unwrap().sessions;
    assert_eq!(
        sessions[0].last_seen.as_ref().map(|t| t.seconds),
        Some(started + 61),
        "activity written"
    );
    // ...which moved the idle expiry: still valid past the first one.
    advance(&app, Duration::from_secs(269)); // started + 330
    assert!(valid(&app, token).await);

    // Idle past the expiry (the answer is still within its TTL): refused.
    let (_, other) = app.user_with_session("idler").await;
    warm(&app, &[&other.access_token]).await;
    advance(&app, Duration::from_secs(301));
    assert_eq!(
        app.reason(&other.access_token).await,
        InvalidReason::SessionNotFound
    );
}

async fn no_validation_sent_after_the_logout_is_acknowledged_accepts_the_token(backend: Backend) {
    let app = cached(backend.app(), &[]).await;
    let (_, login) = app.user_with_session("racer").await;
    warm(&app, &[&login.access_token]).await;
    let acknowledged = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let (before, after, accepted_after) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let racers: Vec<_> = (0..8)
        .map(|_| {
            let mut client = app.client.clone();
            let token = login.access_token.clone();
            let (acknowledged, stop) = (acknowledged.clone(), stop.clone());
            let (before, after, accepted_after) =
                (before.clone(), after.clone(), accepted_after.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let sent_after_ack = acknowledged.load(Ordering::SeqCst);
                    let v = client
                        .validate_token(pb::ValidateTokenRequest {
                            token: token.clone(),
                            ..Default::default()
                        })
                        .await
                        .unwrap()
                        .into_inner();
                    if sent_after_ack {
                        after.fetch_add(1, Ordering::SeqCst);
                        if v.valid {
                            accepted_after.fetch_add(1, Ordering::SeqCst);
                        }
                    } else {
                        before.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    assert!(
        eventually(Duration::from_secs(5), || async {
            before.load(Ordering::SeqCst) >= 50
        })
        .await
    );
    app.logout(&login.access_token).await.unwrap();
    acknowledged.store(true, Ordering::SeqCst);
    assert!(
        eventually(Duration::from_secs(5), || async {
            after.load(Ordering::SeqCst) >= 200
        })
        .await
    );
    stop.store(true, Ordering::SeqCst);
    for racer in racers {
        racer.await.unwrap();
    }
    assert_eq!(accepted_after.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn on_redis_a_revocation_on_one_instance_is_seen_by_a_cached_other() {
    seen_by_a_cached_other(Backend::MySqlRedis).await;
}

#[tokio::test]
async fn on_a_cluster_a_revocation_on_one_instance_is_seen_by_a_cached_other() {
    seen_by_a_cached_other(Backend::MySqlCluster).await;
}

/// Two instances on one store, both caching: what A revokes, B refuses once it reads the
/// event — polled for a few seconds, far less than the TTL that would otherwise keep it.
async fn seen_by_a_cached_other(backend: Backend) {
    let a = cached(backend.app(), &[]).await;
    let b = cached(a.sibling(), &[]).await;
    let root = admin(&a, "root").await;
    let (_, one) = a.user_with_session("twin").await;
    let two = a.login("twin", PASSWORD).await.unwrap();
    let three = a.login("twin", PASSWORD).await.unwrap();
    let tokens = [&one, &two, &three].map(|l| l.access_token.as_str());
    warm(&b, &tokens).await;
    let refused_on_b = |token: String| {
        let b = &b;
        async move {
            eventually(Duration::from_secs(5), || {
                let token = token.clone();
                async move { !b.validate(&token).await.unwrap().valid }
            })
            .await
        }
    };

    a.logout(&one.access_token).await.unwrap();
    assert!(refused_on_b(one.access_token.clone()).await, "Logout");
    assert!(valid(&b, &two.access_token).await);

    a.revoke_session(&three.access_token, &two.session_id)
        .await
        .unwrap();
    assert!(
        refused_on_b(two.access_token.clone()).await,
        "RevokeSession"
    );

    warm(&b, &[&three.access_token]).await;
    set_roles(&a, &root, "twin", &["ops"]).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            b.validate(&three.access_token).await.unwrap().roles == ["ops"]
        })
        .await,
        "SetRoles"
    );
    // And the other way round: a password changed on B ends A's cached answers.
    let four = a.login("twin", PASSWORD).await.unwrap();
    warm(&a, &[&four.access_token, &three.access_token]).await;
    b.change_password(&three.access_token, PASSWORD, "Brand-New-Pass-7")
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            !a.validate(&four.access_token).await.unwrap().valid
        })
        .await,
        "ChangePassword"
    );
}

/// A private Redis and an app on it with the cache `setting`.
async fn on_own_redis(setting: &str) -> (OwnRedis, TestApp) {
    let redis = OwnRedis::start().await;
    let url = redis.url();
    let app = cached(
        TestApp::builder(),
        &[("REDIS_URL", &url), ("SESSION_CACHE", setting)],
    )
    .await;
    (redis, app)
}

/// Session reads (`HMGET`) the private Redis has served.
async fn session_reads(redis: &OwnRedis) -> u64 {
    redis.command_calls("hmget").await
}

/// Waits until the token's session is answered from the cache: a few validations that
/// cost no session read.
async fn until_cached(redis: &OwnRedis, app: &TestApp, token: &str) -> bool {
    eventually(Duration::from_secs(10), || async {
        assert!(valid(app, token).await);
        let before = session_reads(redis).await;
        for _ in 0..3 {
            assert!(valid(app, token).await);
        }
        session_reads(redis).await == before
    })
    .await
}

fn hits(page: &str) -> f64 {
    metric(page, "authd_session_cache_hits_total", &[])
}

#[tokio::test]
async fn a_cache_hit_makes_no_redis_round_trip_and_off_makes_one_per_call() {
    const CALLS: u64 = 50;
    for (setting, reads_per_call) in [("on", 0), ("off", 1)] {
        let (redis, app) = on_own_redis(setting).await;
        let (_, login) = app.user_with_session("hugo").await;
        let token = login.access_token.as_str();
        if setting == "on" {
            assert!(until_cached(&redis, &app, token).await, "never cached");
        }
        let (hmgets, exists, hits_before) = (
            session_reads(&redis).await,
            redis.command_calls("exists").await,
            hits(&app.scrape().await),
        );
        for _ in 0..CALLS {
            assert!(valid(&app, token).await);
        }
        assert_eq!(
            session_reads(&redis).await,
            hmgets + CALLS * reads_per_call,
            "SESSION_CACHE={setting}"
        );
        assert_eq!(
            redis.command_calls("exists").await,
            exists + CALLS * reads_per_call,
            "SESSION_CACHE={setting}"
        );
        if setting == "on" {
            // Counted by every app of this test binary: at least this one's.
            assert!(hits(&app.scrape().await) - hits_before >= CALLS as f64);
        }
    }
}

/// The key of a session in the app's Redis.
fn session_key(app: &TestApp, user_id: &str, session_id: &str) -> String {
    format!("{}{{user:{user_id}}}:session:{session_id}", app.key_prefix)
}

async fn redis_cmd<T: redis::FromRedisValue>(redis: &OwnRedis, cmd: &mut redis::Cmd) -> T {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    cmd.query_async(&mut c).await.unwrap()
}

#[tokio::test]
async fn losing_the_revocation_log_empties_the_cache_and_a_reset_keeps_it_empty() {
    let (redis, app) = on_own_redis("on").await;
    let (user, login) = app.user_with_session("ines").await;
    let token = login.access_token.as_str();
    // An event on the log, so the tail's position is past the stream's start.
    let other = app.login("ines", PASSWORD).await.unwrap();
    app.logout(&other.access_token).await.unwrap();
    assert!(until_cached(&redis, &app, token).await, "never cached");

    // The session ended behind authd's back (no event): the cached answer still says
    // live — the trade-off the TTL bounds.
    let _: i64 = redis_cmd(
        &redis,
        redis::cmd("DEL").arg(session_key(&app, &user.user_id, &login.session_id)),
    )
    .await;
    assert!(valid(&app, token).await, "answered from the cache");

    // The log lost (stream gone: the tail's position is no longer vouched for) and every
    // connection cut: the tail stops following, then comes back with a RESET. Either way
    // the cached answer is gone, and the store says the session is gone.
    let _: i64 = redis_cmd(
        &redis,
        redis::cmd("DEL").arg(format!("{}revocations", app.key_prefix)),
    )
    .await;
    let _: redis::Value = redis_cmd(
        &redis,
        redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("normal"),
    )
    .await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            matches!(app.validate(token).await, Ok(v) if !v.valid)
        })
        .await,
        "the cached answer outlived the log"
    );
    // Caching resumes once the tail follows again, without the answer from before.
    let fresh = app.login("ines", PASSWORD).await.unwrap();
    assert!(until_cached(&redis, &app, &fresh.access_token).await);
    assert!(!valid(&app, token).await);
}

#[tokio::test]
async fn while_the_log_is_unreadable_every_call_asks_redis_then_caching_resumes() {
    let (redis, app) = on_own_redis("on").await;
    let (user, login) = app.user_with_session("jana").await;
    let second = app.login("jana", PASSWORD).await.unwrap();
    assert!(until_cached(&redis, &app, &login.access_token).await);
    assert!(until_cached(&redis, &app, &second.access_token).await);

    // The stream's key replaced by a string: XREAD fails (WRONGTYPE) while sessions
    // still answer.
    let stream = format!("{}revocations", app.key_prefix);
    let _: () = redis_cmd(&redis, redis::cmd("SET").arg(&stream).arg("broken")).await;
    let _: i64 = redis_cmd(
        &redis,
        redis::cmd("DEL").arg(session_key(&app, &user.user_id, &login.session_id)),
    )
    .await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            !valid(&app, &login.access_token).await
        })
        .await,
        "a cached answer was used while the log was not followed"
    );
    // Strict: each call reads the session.
    let before = session_reads(&redis).await;
    for _ in 0..5 {
        assert!(valid(&app, &second.access_token).await);
    }
    assert_eq!(session_reads(&redis).await, before + 5);

    // Repaired: the tail follows again and answers are cached again.
    let _: i64 = redis_cmd(&redis, redis::cmd("DEL").arg(&stream)).await;
    assert!(
        until_cached(&redis, &app, &second.access_token).await,
        "caching did not resume"
    );
    // What was cached before the log was lost was dropped then: not used again.
    assert!(!valid(&app, &login.access_token).await);
}

#[tokio::test]
async fn a_stalled_link_to_redis_stops_the_cache_answering() {
    // The tail's blocking read gets no answer and no error (a partition, a hung
    // server): past its block time and a margin it is taken for lost, and the cache
    // stops answering: calls go to Redis and fail, as with the cache off.
    let redis = OwnRedis::start().await;
    let proxy = Proxy::start(([127, 0, 0, 1], redis.port).into()).await;
    let url = format!("redis://{}/", proxy.addr);
    let app = cached(
        TestApp::builder(),
        &[
            ("REDIS_URL", &url),
            ("REDIS_COMMAND_TIMEOUT", "200ms"),
            ("REDIS_FAILURE_MODE", "closed"),
        ],
    )
    .await;
    let (_, login) = app.user_with_session("kira").await;
    let token = login.access_token.as_str();
    assert!(until_cached(&redis, &app, token).await);
    proxy.stall();
    assert!(
        eventually(Duration::from_secs(5), || async {
            !matches!(app.validate(token).await, Ok(v) if v.valid)
        })
        .await,
        "the cache kept answering over a stalled link"
    );
    proxy.heal();
    assert!(
        eventually(Duration::from_secs(10), || async {
            matches!(app.validate(token).await, Ok(v) if v.valid)
        })
        .await
    );
    assert!(
        until_cached(&redis, &app, token).await,
        "caching did not resume"
    );
}

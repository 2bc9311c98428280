//! Redis Cluster and Sentinel (issue #20): the primary killed under traffic, with
//! processes of the test's own (never the shared Redis). authd follows the promotion
//! without a restart, ValidateToken degrades as `REDIS_FAILURE_MODE` says, no call
//! hangs, and with `REDIS_WAIT_REPLICAS` no acknowledged revocation is lost.
//!
//! The figures these tests print (how long ValidateToken was degraded, how many
//! revocations came back) are measurements for BENCHMARKS.md; the tests assert on
//! behaviour only.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use authd::proto::auth::v1::{InvalidReason, RevocationKind};
use tokio::task::JoinHandle;
use tonic::Code;

use crate::support::*;

/// A Redis with replicas and automatic failover, whichever kind.
enum Ha {
    Sentinel(SentinelSetup),
    Cluster(RedisCluster),
}

impl Ha {
    /// 1 primary + 1 replica + 3 sentinels (down after 500 ms).
    fn sentinel() -> Self {
        Ha::Sentinel(tokio::task::block_in_place(|| {
            SentinelSetup::start(Duration::from_millis(500))
        }))
    }

    /// 3 primaries + 3 replicas (node timeout 1 s).
    fn cluster() -> Self {
        Ha::Cluster(tokio::task::block_in_place(|| {
            RedisCluster::start(3, 1, Duration::from_millis(1000))
        }))
    }

    /// The settings that point authd at it.
    fn env(&self) -> Vec<(&'static str, String)> {
        match self {
            Ha::Sentinel(s) => vec![
                ("REDIS_SENTINELS", s.sentinel_addrs()),
                ("REDIS_SENTINEL_MASTER", SENTINEL_MASTER.to_owned()),
            ],
            Ha::Cluster(c) => vec![("REDIS_CLUSTER_NODES", c.seeds())],
        }
    }

    /// SIGKILL to the primary that holds `key`.
    fn kill_primary_of(&mut self, key: &str) {
        match self {
            Ha::Sentinel(s) => s.primary.kill(),
            Ha::Cluster(c) => {
                let i = c.primary_of(key);
                c.nodes[i].kill();
            }
        }
    }

    /// Whether a replica now serves `key` as primary.
    fn promoted(&self, key: &str) -> bool {
        match self {
            Ha::Sentinel(s) => s.named_primary() == Some(s.replica.port),
            Ha::Cluster(c) => {
                let i = c.primary_of(key);
                c.nodes[i].is_running()
            }
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Ha::Sentinel(_) => "sentinel",
            Ha::Cluster(_) => "cluster",
        }
    }
}

/// An app on `ha` with `extra` settings; REDIS_URL is replaced by `ha`'s own.
async fn app_on(ha: &Ha, extra: &[(&str, &str)]) -> TestApp {
    let env = ha.env();
    let mut builder = TestApp::builder();
    for (k, v) in &env {
        builder = builder.env(k, v);
    }
    // An empty setting counts as unset: REDIS_URL gives way to the topology's own.
    builder.env("REDIS_URL", "").envs(extra).spawn().await
}

/// What one ValidateToken answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// Valid, and the revocation was checked.
    Checked,
    /// Valid from the signature alone (open mode).
    Unchecked,
    Invalid,
    Unavailable,
    OtherError,
}

struct Sample {
    at: Instant,
    took: Duration,
    answer: Answer,
}

/// ValidateToken on `token`, over and over, until stopped.
struct Traffic {
    stop: Arc<AtomicBool>,
    task: JoinHandle<Vec<Sample>>,
}

impl Traffic {
    fn start(app: &TestApp, token: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let client = app.client.clone();
        let token = token.to_owned();
        let s = Arc::clone(&stop);
        let task = tokio::spawn(async move {
            let mut samples = Vec::new();
            while !s.load(Ordering::Relaxed) {
                let at = Instant::now();
                let answer = match client
                    .clone()
                    .validate_token(authd::proto::auth::v1::ValidateTokenRequest {
                        token: token.clone(),
                        ..Default::default()
                    })
                    .await
                {
                    Ok(r) if r.get_ref().valid && r.get_ref().revocation_checked => Answer::Checked,
                    Ok(r) if r.get_ref().valid => Answer::Unchecked,
                    Ok(_) => Answer::Invalid,
                    Err(s) if s.code() == Code::Unavailable => Answer::Unavailable,
                    Err(_) => Answer::OtherError,
                };
                samples.push(Sample {
                    at,
                    took: at.elapsed(),
                    answer,
                });
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            samples
        });
        Self { stop, task }
    }

    async fn stop(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

/// The user's session key, whose slot (and primary) holds every key of the user.
fn session_key(app: &TestApp, user_id: &str, session_id: &str) -> String {
    format!("{}{{user:{user_id}}}:session:{session_id}", app.key_prefix)
}

/// Kills the primary under ValidateToken traffic, waits for the promotion and for
/// authd to check revocations again, and checks how it answered meanwhile.
async fn failover_under_traffic(mut ha: Ha, mode: &str) {
    let app = app_on(&ha, &[("REDIS_FAILURE_MODE", mode)]).await;
    let (user, login) = app.user_with_session("fay").await;
    let key = session_key(&app, &user.user_id, &login.session_id);
    assert!(
        app.validate(&login.access_token)
            .await
            .unwrap()
            .revocation_checked
    );

    let traffic = Traffic::start(&app, &login.access_token);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed_at = Instant::now();
    tokio::task::block_in_place(|| ha.kill_primary_of(&key));
    let promoted = eventually(Duration::from_secs(30), || async { ha.promoted(&key) }).await;
    assert!(promoted, "{}: no replica took over", ha.name());
    let promoted_after = killed_at.elapsed();
    // authd follows without a restart: revocations are checked again.
    let followed = eventually(Duration::from_secs(15), || async {
        app.validate(&login.access_token)
            .await
            .is_ok_and(|v| v.valid && v.revocation_checked)
    })
    .await;
    assert!(
        followed,
        "{}: authd did not follow the promotion",
        ha.name()
    );
    let recovered_after = killed_at.elapsed();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let samples = traffic.stop().await;

    let degraded: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.answer != Answer::Checked)
        .collect();
    let slowest = samples.iter().map(|s| s.took).max().unwrap();
    let window = match (degraded.first(), degraded.last()) {
        (Some(first), Some(last)) => last.at + last.took - first.at,
        _ => Duration::ZERO,
    };
    println!(
        "FIGURE failover {} mode={mode}: promoted after {promoted_after:?}, authd checking again \
         after {recovered_after:?}; {} of {} ValidateToken answers degraded over {window:?}; \
         slowest call {slowest:?}",
        ha.name(),
        degraded.len(),
        samples.len()
    );
    // No call hangs: each is bounded by the Redis command timeout (250 ms) plus its
    // pool checkout; 5 s is far past both.
    assert!(
        slowest < Duration::from_secs(5),
        "a call hung for {slowest:?}"
    );
    for s in &samples {
        match (mode, s.answer) {
            (_, Answer::Checked) => {}
            ("open", Answer::Unchecked) => {}
            ("closed", Answer::Unavailable) => {}
            (_, other) => panic!("{mode} mode answered {other:?} during the failover"),
        }
    }
    // Degraded no longer than the failover: once authd checks again it stays so.
    let back = samples
        .iter()
        .rposition(|s| s.answer != Answer::Checked)
        .map_or(0, |i| i + 1);
    assert!(
        samples[back..].iter().all(|s| s.answer == Answer::Checked),
        "degraded again after recovering"
    );
    // Writes work again, on the new primary.
    app.logout(&login.access_token).await.unwrap();
    assert_eq!(
        app.reason(&login.access_token).await,
        InvalidReason::Revoked
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_open_mode_answers_from_the_signature_then_follows_the_new_primary() {
    failover_under_traffic(Ha::sentinel(), "open").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_failover_closed_mode_answers_unavailable_then_follows_the_new_primary() {
    failover_under_traffic(Ha::cluster(), "closed").await;
}

/// Logs out `sessions` tokens of one user from 8 callers at once, kills the primary
/// a third of the way, lets a replica take over, and counts the tokens that are valid
/// again although their Logout was acknowledged.
async fn acknowledged_revocations_lost(mut ha: Ha, wait: bool) -> (usize, usize) {
    let sessions = 90;
    let mut extra = vec![("MAX_SESSIONS_PER_USER", "100")];
    if wait {
        extra.push(("REDIS_WAIT_REPLICAS", "1"));
        extra.push(("REDIS_WAIT_TIMEOUT", "500ms"));
    }
    let app = Arc::new(app_on(&ha, &extra).await);
    let (user, first) = app.user_with_session("lou").await;
    let mut tokens = vec![first.access_token.clone()];
    for _ in 1..sessions {
        tokens.push(app.login("lou", PASSWORD).await.unwrap().access_token);
    }
    let key = session_key(&app, &user.user_id, &first.session_id);
    let queue = Arc::new(std::sync::Mutex::new(tokens));
    let acknowledged = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let callers: Vec<_> = (0..8)
        .map(|_| {
            let (app, queue, acked) = (
                Arc::clone(&app),
                Arc::clone(&queue),
                Arc::clone(&acknowledged),
            );
            tokio::spawn(async move {
                loop {
                    let Some(token) = queue.lock().unwrap().pop() else {
                        return;
                    };
                    if app.logout(&token).await.is_ok() {
                        acked.lock().unwrap().push(token);
                    }
                }
            })
        })
        .collect();
    let _ = eventually(Duration::from_secs(20), || async {
        acknowledged.lock().unwrap().len() >= sessions / 3
    })
    .await;
    tokio::task::block_in_place(|| ha.kill_primary_of(&key));
    for c in callers {
        c.await.unwrap();
    }
    let promoted = eventually(Duration::from_secs(30), || async { ha.promoted(&key) }).await;
    assert!(promoted, "{}: no replica took over", ha.name());
    let acked = acknowledged.lock().unwrap().clone();
    // Counted by a fresh instance, which knows only what Redis kept (the instance that
    // revoked also remembers the revocations it read from the log).
    let fresh = app.sibling().spawn().await;
    let app = &fresh;
    let mut lost = 0;
    for token in &acked {
        // Asked until authd answers for sure (it follows the new primary).
        let deadline = Instant::now() + Duration::from_secs(15);
        let v = loop {
            match app.validate(token).await {
                // Refused (from Redis, or from what this instance remembers of the
                // revocation log), or valid with the revocation checked.
                Ok(v) if !v.valid || v.revocation_checked => break v,
                _ if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => panic!("ValidateToken does not check revocations again: {other:?}"),
            }
        };
        if v.valid {
            lost += 1;
        }
    }
    println!(
        "FIGURE lost revocations {} wait={wait}: {lost} of {} acknowledged Logouts valid again",
        ha.name(),
        acked.len()
    );
    (lost, acked.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_wait_replicas_no_acknowledged_logout_is_lost_when_the_sentinel_primary_dies() {
    let (lost, acked) = acknowledged_revocations_lost(Ha::sentinel(), true).await;
    assert!(acked > 0, "no Logout was acknowledged");
    assert_eq!(
        lost, 0,
        "acknowledged revocations came back after the failover"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_wait_replicas_no_acknowledged_logout_is_lost_when_a_cluster_primary_dies() {
    let (lost, acked) = acknowledged_revocations_lost(Ha::cluster(), true).await;
    assert!(acked > 0, "no Logout was acknowledged");
    assert_eq!(
        lost, 0,
        "acknowledged revocations came back after the failover"
    );
}

/// The same without WAIT: a measurement (asynchronous replication may or may not lose
/// some on a loopback link), reported, not asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_wait_replicas_the_lost_revocations_are_counted() {
    let (_, acked) = acknowledged_revocations_lost(Ha::sentinel(), false).await;
    assert!(acked > 0, "no Logout was acknowledged");
    let (_, acked) = acknowledged_revocations_lost(Ha::cluster(), false).await;
    assert!(acked > 0, "no Logout was acknowledged");
}

/// Logs out `count` sessions while the replica's link is stalled, promotes the replica,
/// and returns (Logouts acknowledged, acknowledged tokens valid again on the promoted
/// replica). Replication lag made on purpose, so the loss is certain without WAIT.
async fn revocations_lost_behind_a_lagging_replica(wait: bool) -> (usize, usize) {
    let count = 12;
    let mut setup = LaggingReplica::start().await;
    let primary_url = format!("redis://{}/", setup.primary.addr());
    let mut env = vec![
        ("REDIS_URL", primary_url.as_str()),
        ("MAX_SESSIONS_PER_USER", "100"),
    ];
    if wait {
        env.extend([
            ("REDIS_WAIT_REPLICAS", "1"),
            ("REDIS_WAIT_TIMEOUT", "200ms"),
        ]);
    }
    let app = TestApp::builder().envs(&env).spawn().await;
    let (_, first) = app.user_with_session("lag").await;
    let mut tokens = vec![first.access_token];
    for _ in 1..count {
        tokens.push(app.login("lag", PASSWORD).await.unwrap().access_token);
    }
    setup.wait_in_sync().await;
    setup.link.stall();
    let mut acknowledged = Vec::new();
    for token in &tokens {
        match app.logout(token).await {
            Ok(()) => acknowledged.push(token.clone()),
            Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
        }
    }
    tokio::task::block_in_place(|| setup.fail_over());
    // A fresh instance on the promoted replica: it knows only what the replica kept.
    let replica_url = format!("redis://{}/", setup.replica.addr());
    let fresh = app.sibling().env("REDIS_URL", &replica_url).spawn().await;
    let mut lost = 0;
    for token in &acknowledged {
        let v = fresh.validate(token).await.unwrap();
        assert!(v.revocation_checked || !v.valid, "{v:?}");
        lost += usize::from(v.valid);
    }
    // Every token whose Logout was refused is still the replica's to judge: none of them
    // was reported as revoked, so none is owed.
    println!(
        "FIGURE lagging replica wait={wait}: {lost} of {} acknowledged Logouts valid again ({} refused)",
        acknowledged.len(),
        tokens.len() - acknowledged.len()
    );
    (acknowledged.len(), lost)
}

/// Asynchronous replication loses acknowledged revocations when the replica lags and
/// then takes over: without WAIT every Logout made during the lag comes back; with
/// `REDIS_WAIT_REPLICAS=1` none is acknowledged (UNAVAILABLE), so none is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_replica_loses_acknowledged_logouts_unless_revocations_wait() {
    let (acked, lost) = revocations_lost_behind_a_lagging_replica(false).await;
    assert_eq!(acked, 12, "without WAIT every Logout is acknowledged");
    assert_eq!(
        lost, acked,
        "the lag made on purpose lost nothing: the test proves nothing"
    );
    let (acked, lost) = revocations_lost_behind_a_lagging_replica(true).await;
    assert_eq!(lost, 0, "an acknowledged revocation came back");
    assert_eq!(acked, 0, "a Logout no replica held was acknowledged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_no_replica_confirms_is_unavailable_never_done() {
    // The shared cluster has no replicas: WAIT can never be satisfied.
    let app = Backend::MySqlCluster
        .app()
        .envs(&[("REDIS_WAIT_REPLICAS", "1"), ("REDIS_WAIT_TIMEOUT", "50ms")])
        .spawn()
        .await;
    let (_, login) = app.user_with_session("una").await;
    let second = app.login("una", PASSWORD).await.unwrap();
    // Logins revoke nothing and do not wait.
    assert_code(app.logout(&login.access_token).await, Code::Unavailable);
    assert_code(
        app.revoke_session(&second.access_token, &login.session_id)
            .await,
        Code::Unavailable,
    );
    assert_code(
        app.change_password(&second.access_token, PASSWORD, "Brand-New-Pass-7")
            .await,
        Code::Unavailable,
    );
    let page = app.scrape().await;
    assert!(
        metric(&page, "authd_redis_wait_shortfalls_total", &[]) >= 3.0,
        "shortfalls not counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_replica_per_primary_revocations_wait_and_succeed() {
    let ha = Ha::cluster();
    let app = app_on(
        &ha,
        &[("REDIS_WAIT_REPLICAS", "1"), ("REDIS_WAIT_TIMEOUT", "2s")],
    )
    .await;
    let (_, login) = app.user_with_session("vic").await;
    let second = app.login("vic", PASSWORD).await.unwrap();
    app.revoke_session(&second.access_token, &login.session_id)
        .await
        .unwrap();
    assert_eq!(
        app.reason(&login.access_token).await,
        InvalidReason::Revoked
    );
    app.logout(&second.access_token).await.unwrap();
    assert_eq!(
        app.reason(&second.access_token).await,
        InvalidReason::Revoked
    );

    // What the wait costs a Logout: the same Logouts with and without it (a figure).
    let without = app_on(&ha, &[]).await;
    let mut figures = Vec::new();
    for (name, app) in [("on", &app), ("off", &without)] {
        let user = format!("cost{name}");
        app.register(&user, PASSWORD).await.unwrap();
        let mut tokens = Vec::new();
        for _ in 0..30 {
            tokens.push(app.login(&user, PASSWORD).await.unwrap().access_token);
        }
        let mut took: Vec<Duration> = Vec::new();
        for token in &tokens {
            let t = Instant::now();
            app.logout(token).await.unwrap();
            took.push(t.elapsed());
        }
        took.sort();
        figures.push(format!(
            "wait {name}: median {:?}, max {:?}",
            took[15], took[29]
        ));
    }
    println!("FIGURE Logout latency on a cluster with replicas: {figures:?}");
}

/// Two instances on the shared cluster: a Logout on one is refused by the other at
/// once and reaches the watchers of both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_a_revocation_on_one_instance_reaches_the_other_and_every_watcher() {
    let a = Backend::MySqlCluster.app().spawn().await;
    let b = a.sibling().spawn().await;
    let (_, login) = a.user_with_session("wes").await;
    assert!(b.validate(&login.access_token).await.unwrap().valid);
    let mut watchers = Vec::new();
    for app in [&a, &b, &a, &b] {
        watchers.push(
            try_watch(&app.client, Some(WATCH_CREDENTIAL), "")
                .await
                .unwrap(),
        );
    }
    // The watchers are live once their stream answered the subscription.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sent = Instant::now();
    a.logout(&login.access_token).await.unwrap();
    assert_eq!(b.reason(&login.access_token).await, InvalidReason::Revoked);
    let mut latencies = Vec::new();
    for w in &mut watchers {
        let event = next_event(w).await;
        latencies.push(sent.elapsed());
        assert_eq!(event.kind(), RevocationKind::Token);
        assert_eq!(event.session_id, login.session_id);
    }
    println!("FIGURE watchers on a cluster: Logout to each of 4 watchers {latencies:?}");
}

/// A failover by hand (`SENTINEL FAILOVER`): the old primary stays up as a replica, and
/// authd's open connection to it now gets READONLY for every write. authd drops that
/// connection and asks the sentinels again, so writes reach the new primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_sentinel_failover_a_connection_to_the_demoted_primary_is_dropped() {
    let ha = Ha::sentinel();
    let Ha::Sentinel(setup) = &ha else {
        unreachable!()
    };
    let app = app_on(&ha, &[]).await;
    let (_, login) = app.user_with_session("dee").await;
    tokio::task::block_in_place(|| {
        let _: redis::Value = redis::cmd("SENTINEL")
            .arg("FAILOVER")
            .arg(SENTINEL_MASTER)
            .query(&mut setup.sentinels[0].sync())
            .unwrap();
    });
    let demoted = eventually(Duration::from_secs(30), || async {
        setup.named_primary() == Some(setup.replica.port)
            && redis::cmd("ROLE")
                .query::<Vec<redis::Value>>(&mut setup.primary.sync())
                .is_ok_and(|role| {
                    role.first() == Some(&redis::Value::BulkString(b"slave".to_vec()))
                })
    })
    .await;
    assert!(demoted, "the sentinels did not fail over");
    // The first write may meet the stale connection; the next ones go to the new
    // primary, without a restart.
    let refused = std::sync::atomic::AtomicUsize::new(0);
    let wrote = eventually(Duration::from_secs(10), || async {
        let ok = app.login("dee", PASSWORD).await.is_ok();
        refused.fetch_add(usize::from(!ok), Ordering::Relaxed);
        ok
    })
    .await;
    let refused = refused.into_inner();
    assert!(wrote, "writes never reached the new primary");
    app.logout(&login.access_token).await.unwrap();
    assert_eq!(
        app.reason(&login.access_token).await,
        InvalidReason::Revoked
    );
    // The revocation is on the new primary.
    let on_new: Vec<String> = tokio::task::block_in_place(|| {
        redis::cmd("KEYS")
            .arg(format!("{}*:revoked:*", app.key_prefix))
            .query(&mut setup.replica.sync())
            .unwrap()
    });
    assert_eq!(on_new.len(), 1, "{on_new:?}");
    println!("FIGURE demoted primary: {refused} Login(s) refused before writes moved");
}

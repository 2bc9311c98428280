//! Login throttling: per account and per address, shared by instances, bounded.

use std::time::Duration;

use authd::proto::auth::v1 as pb;
use futures::StreamExt;
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;

use crate::support::*;

const WRONG: &str = "Wrong-Horse-9";

/// An account waits after 3 failures (1 s, doubling, at most 4 s); the address limit
/// stays out of the way unless a test lowers it.
const SMALL: &[(&str, &str)] = &[
    ("THROTTLE_ACCOUNT_THRESHOLD", "3"),
    ("THROTTLE_ACCOUNT_MAX_DELAY", "4s"),
    ("THROTTLE_ADDRESS_THRESHOLD", "1000"),
    ("THROTTLE_BASE_DELAY", "1s"),
];

/// The wait a throttled call advises.
#[track_caller]
fn retry_after(status: &Status) -> Duration {
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    status
        .get_details_retry_info()
        .expect("RetryInfo detail")
        .retry_delay
        .expect("a delay")
}

on_every_backend!(
    past_the_threshold_even_the_right_password_waits_alike_for_unknown_accounts,
    a_lockout_ends_by_itself_and_its_backoff_doubles_up_to_the_cap,
    a_success_resets_the_accounts_count,
    case_and_padding_variants_of_a_name_share_one_count,
    an_address_failing_across_many_usernames_is_held_off_alone,
    a_spoofed_client_ip_from_an_untrusted_caller_is_ignored,
    wrong_current_passwords_on_change_password_count_against_the_account
);

async fn past_the_threshold_even_the_right_password_waits_alike_for_unknown_accounts(
    backend: Backend,
) {
    let app = backend.app().envs(SMALL).spawn().await;
    app.register("ivan", PASSWORD).await.unwrap();
    for _ in 0..3 {
        assert_code(app.login("ivan", WRONG).await, Code::Unauthenticated);
        assert_code(app.login("ghost", WRONG).await, Code::Unauthenticated);
    }
    let known = assert_code(app.login("ivan", PASSWORD).await, Code::ResourceExhausted);
    let unknown = assert_code(app.login("ghost", PASSWORD).await, Code::ResourceExhausted);
    assert_eq!(known.message(), unknown.message());
    assert_eq!(retry_after(&known), Duration::from_secs(1));
    assert_eq!(retry_after(&unknown), Duration::from_secs(1));
    assert_eq!(known.details(), unknown.details());
    assert!(!known.message().contains("ivan"));
}

async fn a_lockout_ends_by_itself_and_its_backoff_doubles_up_to_the_cap(backend: Backend) {
    let app = backend.app().envs(SMALL).spawn().await;
    app.register("kate", PASSWORD).await.unwrap();
    for _ in 0..3 {
        assert_code(app.login("kate", WRONG).await, Code::Unauthenticated);
    }
    let mut waits = Vec::new();
    for _ in 0..4 {
        let wait = retry_after(&app.login("kate", WRONG).await.unwrap_err());
        waits.push(wait);
        // Waiting out all but a millisecond is not enough…
        advance(&app, wait - Duration::from_millis(1));
        assert_code(app.login("kate", PASSWORD).await, Code::ResourceExhausted);
        // …and then the next attempt is checked again (and fails again).
        advance(&app, Duration::from_millis(1));
        assert_code(app.login("kate", WRONG).await, Code::Unauthenticated);
    }
    assert_eq!(
        waits,
        [1, 2, 4, 4].map(Duration::from_secs),
        "1 s after the third failure, doubling, capped at THROTTLE_ACCOUNT_MAX_DELAY"
    );
    let wait = retry_after(&app.login("kate", PASSWORD).await.unwrap_err());
    advance(&app, wait);
    assert!(app.login("kate", PASSWORD).await.is_ok());
}

async fn a_success_resets_the_accounts_count(backend: Backend) {
    let app = backend.app().envs(SMALL).spawn().await;
    app.register("liam", PASSWORD).await.unwrap();
    for _ in 0..2 {
        assert_code(app.login("liam", WRONG).await, Code::Unauthenticated);
    }
    assert!(app.login("liam", PASSWORD).await.is_ok());
    for _ in 0..2 {
        assert_code(app.login("liam", WRONG).await, Code::Unauthenticated);
    }
    // Four failures in all, but never three since the success.
    assert!(app.login("liam", PASSWORD).await.is_ok());
}

async fn case_and_padding_variants_of_a_name_share_one_count(backend: Backend) {
    let app = backend.app().envs(SMALL).spawn().await;
    app.register("judy", PASSWORD).await.unwrap();
    for variant in ["Judy", " JUDY ", "judy\t"] {
        assert_code(app.login(variant, WRONG).await, Code::Unauthenticated);
    }
    assert_code(app.login("jUdY", PASSWORD).await, Code::ResourceExhausted);
    // Unknown names too.
    for variant in ["Nobody", "NOBODY ", " nobody"] {
        assert_code(app.login(variant, WRONG).await, Code::Unauthenticated);
    }
    assert_code(app.login("nobody", WRONG).await, Code::ResourceExhausted);
}

async fn an_address_failing_across_many_usernames_is_held_off_alone(backend: Backend) {
    let app = backend
        .app()
        .envs(SMALL)
        .env("THROTTLE_ADDRESS_THRESHOLD", "5")
        .env("TRUSTED_PROXIES", "127.0.0.1")
        .spawn()
        .await;
    app.register("mona", PASSWORD).await.unwrap();
    let attacker = "198.51.100.66";
    for i in 0..5 {
        assert_code(
            app.login_from(&format!("user{i}"), WRONG, attacker).await,
            Code::Unauthenticated,
        );
    }
    // No account reached its own threshold, but the address did: even a right
    // password from there waits.
    let s = assert_code(
        app.login_from("mona", PASSWORD, attacker).await,
        Code::ResourceExhausted,
    );
    assert_eq!(retry_after(&s), Duration::from_secs(1));
    assert_code(
        app.login_from("user9", WRONG, attacker).await,
        Code::ResourceExhausted,
    );
    // Mona, elsewhere, is not locked out by someone else's guessing.
    assert!(
        app.login_from("mona", PASSWORD, "198.51.100.7")
            .await
            .is_ok()
    );
    // An IPv6 client is one address across its /64.
    for i in 0..5 {
        let ip = format!("2001:db8:7:7::{i}");
        assert_code(
            app.login_from(&format!("v6user{i}"), WRONG, &ip).await,
            Code::Unauthenticated,
        );
    }
    assert_code(
        app.login_from("mona", PASSWORD, "2001:db8:7:7:ffff::1")
            .await,
        Code::ResourceExhausted,
    );
}

async fn a_spoofed_client_ip_from_an_untrusted_caller_is_ignored(backend: Backend) {
    let app = backend
        .app()
        .envs(SMALL)
        .env("THROTTLE_ADDRESS_THRESHOLD", "3")
        .spawn()
        .await;
    app.register("nora", PASSWORD).await.unwrap();
    let login = app
        .login_from("nora", PASSWORD, "203.0.113.50")
        .await
        .unwrap();
    let list = app.list_sessions(&login.access_token).await.unwrap();
    assert_eq!(
        list.sessions[0].ip, "127.0.0.1",
        "the claimed address was recorded"
    );
    // A new claimed address per guess does not escape the per-address limit.
    for i in 0..3 {
        assert_code(
            app.login_from(&format!("guess{i}"), WRONG, &format!("203.0.113.{i}"))
                .await,
            Code::Unauthenticated,
        );
    }
    assert_code(
        app.login_from("nora", PASSWORD, "203.0.113.99").await,
        Code::ResourceExhausted,
    );
    // A malformed claim is still a malformed request.
    assert_code(
        app.login_from("nora", PASSWORD, "not-an-ip").await,
        Code::InvalidArgument,
    );
}

async fn wrong_current_passwords_on_change_password_count_against_the_account(backend: Backend) {
    let app = backend.app().envs(SMALL).spawn().await;
    let (_, login) = app.user_with_session("otto").await;
    for _ in 0..2 {
        assert_code(
            app.change_password(&login.access_token, WRONG, "Brand-New-Pass-7")
                .await,
            Code::PermissionDenied,
        );
    }
    assert_code(app.login("otto", WRONG).await, Code::Unauthenticated);
    // Three failures on the account, from either call: both now wait, unchecked.
    assert_code(app.login("otto", PASSWORD).await, Code::ResourceExhausted);
    let s = assert_code(
        app.change_password(&login.access_token, PASSWORD, "Brand-New-Pass-7")
            .await,
        Code::ResourceExhausted,
    );
    assert_eq!(retry_after(&s), Duration::from_secs(1));
    advance(&app, Duration::from_secs(1));
    assert!(
        app.change_password(&login.access_token, PASSWORD, "Brand-New-Pass-7")
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn two_instances_sharing_redis_share_the_counts() {
    let a = TestApp::builder().envs(SMALL).spawn().await;
    let b = a.sibling().spawn().await;
    a.register("pia", PASSWORD).await.unwrap();
    assert_code(a.login("pia", WRONG).await, Code::Unauthenticated);
    assert_code(b.login("PIA", WRONG).await, Code::Unauthenticated);
    assert_code(a.login("pia", WRONG).await, Code::Unauthenticated);
    // Locked on both, whichever counted the failures.
    assert_code(b.login("pia", PASSWORD).await, Code::ResourceExhausted);
    assert_code(a.login("pia", PASSWORD).await, Code::ResourceExhausted);
    // A success on one resets the count for both.
    advance(&a, Duration::from_secs(1));
    assert!(b.login("pia", PASSWORD).await.is_ok());
    for _ in 0..2 {
        assert_code(a.login("pia", WRONG).await, Code::Unauthenticated);
    }
    assert!(b.login("pia", PASSWORD).await.is_ok());
}

/// The keys under a prefix, with their remaining lifetimes in ms.
async fn keys_with_ttls(app: &TestApp) -> Vec<(String, i64)> {
    let mut redis = app.redis().await;
    let mut keys: Vec<String> = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{}*", app.key_prefix))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut redis)
            .await
            .unwrap();
        keys.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    let mut out = Vec::new();
    for key in keys {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut redis)
            .await
            .unwrap();
        out.push((key, ttl));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_unknown_usernames_leave_few_keys_and_all_expire() {
    // Default limits: an address waits after 5 failures, at most 1 h; the window is 15 m.
    let app = TestApp::builder()
        .env("TRUSTED_PROXIES", "127.0.0.1")
        .spawn()
        .await;
    let results: Vec<Code> = futures::stream::iter(0..10_000)
        .map(|i| {
            let mut client = app.client.clone();
            async move {
                let request = Request::new(pb::LoginRequest {
                    username: format!("nobody{i}"),
                    password: WRONG.into(),
                    client_ip: "192.0.2.1".into(),
                    ..Default::default()
                });
                client.login(request).await.unwrap_err().code()
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let count = |code| results.iter().filter(|c| **c == code).count();
    let refused = count(Code::ResourceExhausted);
    assert!(
        refused > 9_900,
        "only {refused} throttled; {} checked, {} unavailable",
        count(Code::Unauthenticated),
        count(Code::Unavailable)
    );
    let keys = keys_with_ttls(&app).await;
    // One per name that was actually checked, plus the address.
    assert!(keys.len() <= 1 + 10_000 - refused, "{} keys", keys.len());
    assert!(keys.len() < 100, "{} keys", keys.len());
    let max_ttl = Duration::from_secs(3600 + 15 * 60).as_millis() as i64;
    for (key, ttl) in &keys {
        assert!(*ttl > 0 && *ttl <= max_ttl, "{key}: TTL {ttl} ms");
        assert!(!key.contains("nobody"), "a username in clear in {key}");
    }

    // Spread over many addresses (as a botnet through a gateway would be), every
    // counter still expires, a window after its last failure.
    for i in 0..100 {
        let ip = format!("198.18.0.{i}");
        assert_code(
            app.login_from(&format!("spread{i}"), WRONG, &ip).await,
            Code::Unauthenticated,
        );
    }
    let keys = keys_with_ttls(&app).await;
    assert!(keys.len() >= 200, "{} keys", keys.len());
    for (key, ttl) in &keys {
        assert!(*ttl > 0 && *ttl <= max_ttl, "{key}: TTL {ttl} ms");
    }
}

//! The second factor (issue 18): TOTP enrolment, Login's ticket and VerifySecondFactor,
//! recovery codes, step-up, and ValidateToken's requirements. Codes are computed by
//! pyotp, an implementation no one on this project wrote, at the test clock's time.

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use authd::proto::auth::v1 as pb;
use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::support::python::python_with;
use crate::support::*;

on_every_backend!(
    enrolment_login_and_verify_with_pyotp,
    codes_are_single_use_and_skew_is_one_step,
    tickets_expire_die_after_five_wrong_codes_and_are_single_use,
    wrong_codes_are_throttled_apart_from_passwords,
    recovery_codes_are_single_use_and_show_in_list_sessions,
    step_up_guards_critical_calls,
    validate_token_demands_step_up,
    the_client_layer_and_envoy_see_the_second_factor,
    an_administrator_can_reset_a_lost_second_factor,
    no_secret_ticket_or_recovery_code_reaches_the_log_or_the_audit_trail,
    a_stolen_token_alone_cannot_confirm_a_second_factor,
    a_ticket_from_before_a_password_change_is_refused,
    the_ticket_branch_of_login_rehashes_at_the_configured_cost,
    wrong_codes_are_a_handful_a_day_and_a_success_resets_them,
    step_up_and_confirm_count_wrong_codes_on_the_user_not_the_address,
    junk_tickets_are_counted_on_the_address_and_name_no_user,
    a_wrong_current_password_does_not_use_up_the_step_up_code
);

/// The sealing key the MySQL apps get (embedded mode makes its own key file).
pub const TOTP_KEY: &str = "8f3c1e0a9b7d5f2e4c6a8b0d1f3e5a7c9b1d3f5e7a9c0b2d4f6e8a0c2e4f6a8b";

/// pyotp's code for `secret` at each of `times` (unix seconds).
pub fn pyotp_codes(secret: &str, times: &[i64]) -> Vec<String> {
    let python = python_with(&["pyotp==2.9.0"]);
    let out = Command::new(python)
        .args([
            "-c",
            "import pyotp, sys\nt = pyotp.TOTP(sys.argv[1])\nfor s in sys.argv[2:]:\n    print(t.at(int(s)))",
            secret,
        ])
        .args(times.iter().map(|t| t.to_string()))
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// pyotp's code for `secret` now (on the test clock) plus `offset` seconds.
pub fn code_at(app: &TestApp, secret: &str, offset: i64) -> String {
    pyotp_codes(secret, &[unix(&app.clock) + offset]).remove(0)
}

/// An app with the second factor available on `backend`, and `env` besides.
pub async fn totp_app(backend: Backend, env: &[(&str, &str)]) -> TestApp {
    let mut builder = backend.app().envs(env);
    if backend != Backend::Embedded {
        builder = builder.env("TOTP_ENCRYPTION_KEY", TOTP_KEY);
    }
    // Each test below makes more wrong codes than the default threshold on purpose.
    for name in [
        "THROTTLE_ACCOUNT_THRESHOLD",
        "THROTTLE_ADDRESS_THRESHOLD",
        "THROTTLE_SECOND_FACTOR_THRESHOLD",
    ] {
        if !env.iter().any(|(k, _)| *k == name) {
            builder = builder.env(name, "100");
        }
    }
    builder.spawn().await
}

pub async fn enroll(app: &TestApp, token: &str) -> Result<pb::EnrollTotpResponse, Status> {
    app.client
        .clone()
        .enroll_totp(bearer(token, pb::EnrollTotpRequest {}))
        .await
        .map(|r| r.into_inner())
}

/// ConfirmTotp with `code` and the test users' password.
pub async fn confirm(app: &TestApp, token: &str, code: &str) -> Result<Vec<String>, Status> {
    confirm_with(app, token, code, PASSWORD).await
}

/// ConfirmTotp with `code` and `current_password`.
pub async fn confirm_with(
    app: &TestApp,
    token: &str,
    code: &str,
    current_password: &str,
) -> Result<Vec<String>, Status> {
    app.client
        .clone()
        .confirm_totp(bearer(
            token,
            pb::ConfirmTotpRequest {
                code: code.into(),
                current_password: current_password.into(),
            },
        ))
        .await
        .map(|r| r.into_inner().recovery_codes)
}

pub async fn verify(
    app: &TestApp,
    ticket: &str,
    totp_code: &str,
    recovery_code: &str,
) -> Result<pb::VerifySecondFactorResponse, Status> {
    app.client
        .clone()
        .verify_second_factor(pb::VerifySecondFactorRequest {
            mfa_ticket: ticket.into(),
            totp_code: totp_code.into(),
            recovery_code: recovery_code.into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

/// Login's ticket for a user with a second factor.
pub async fn ticket(app: &TestApp, username: &str) -> String {
    let login = app.login(username, PASSWORD).await.unwrap();
    assert!(login.second_factor_required, "{login:?}");
    assert!(login.access_token.is_empty() && login.refresh_token.is_empty());
    login.mfa_ticket
}

/// A registered user with a confirmed second factor: (user id, password-only token
/// from before the enrolment, base32 secret, recovery codes). The clock is then moved a
/// step on, so the next code is a fresh one.
pub async fn enrolled(app: &TestApp, username: &str) -> (String, String, String, Vec<String>) {
    let (user, login) = app.user_with_session(username).await;
    let e = enroll(app, &login.access_token).await.unwrap();
    let codes = confirm(app, &login.access_token, &code_at(app, &e.secret, 0))
        .await
        .unwrap();
    advance(app, Duration::from_secs(30));
    (user.user_id, login.access_token, e.secret, codes)
}

fn factor(totp_code: &str, recovery_code: &str) -> Option<pb::SecondFactor> {
    Some(pb::SecondFactor {
        totp_code: totp_code.into(),
        recovery_code: recovery_code.into(),
    })
}

/// The ErrorInfo reason of a refusal with `code`, checking the domain and, for the
/// second factor's reasons, that the factor is named.
#[track_caller]
fn reason<T: std::fmt::Debug>(result: Result<T, Status>, code: Code) -> String {
    let status = assert_code(result, code);
    let info = status
        .get_details_error_info()
        .expect("an ErrorInfo detail");
    assert_eq!(info.domain, "authd");
    assert_eq!(info.metadata.get("factor").map(String::as_str), Some("otp"));
    info.reason
}

async fn audit_kinds(app: &TestApp, user_id: &str) -> Vec<String> {
    sqlx::query_scalar("SELECT kind FROM audit_events WHERE user_id = ? ORDER BY id")
        .bind(user_id)
        .fetch_all(&app.db().await)
        .await
        .unwrap()
}

/// Waits until the user's audit rows include every one of `kinds` (the writer is
/// asynchronous).
async fn assert_audited(app: &TestApp, user_id: &str, kinds: &[&str]) {
    let ok = eventually(Duration::from_secs(5), || async {
        let have = audit_kinds(app, user_id).await;
        kinds.iter().all(|k| have.iter().any(|h| h == k))
    })
    .await;
    assert!(
        ok,
        "{kinds:?} not all in {:?}",
        audit_kinds(app, user_id).await
    );
}

/// Waits until one of the user's `kind` audit rows has a detail containing `needle`.
async fn assert_audited_detail(app: &TestApp, user_id: &str, kind: &str, needle: &str) {
    let details = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT detail FROM audit_events WHERE user_id = ? AND kind = ?",
        )
        .bind(user_id)
        .bind(kind)
        .fetch_all(&app.db().await)
        .await
        .unwrap()
    };
    let ok = eventually(Duration::from_secs(5), || async {
        details().await.iter().any(|d| d.contains(needle))
    })
    .await;
    assert!(ok, "no {kind} row says {needle:?}: {:?}", details().await);
}

async fn last_step(app: &TestApp, user_id: &str) -> i64 {
    sqlx::query_scalar("SELECT last_step FROM totp_credentials WHERE user_id = ?")
        .bind(user_id)
        .fetch_one(&app.db().await)
        .await
        .unwrap()
}

async fn enrolment_login_and_verify_with_pyotp(backend: Backend) {
    let app = totp_app(backend, &[]).await;
    let (user, login) = app.user_with_session("tess").await;
    let token = login.access_token;

    let first = enroll(&app, &token).await.unwrap();
    // 160 bits: 32 base32 characters; the URI carries it and its parameters.
    assert_eq!(first.secret.len(), 32, "{}", first.secret);
    assert!(
        first
            .otpauth_uri
            .starts_with("otpauth://totp/authd:tess?secret="),
        "{}",
        first.otpauth_uri
    );
    assert!(first.otpauth_uri.contains(&first.secret));
    assert!(
        first
            .otpauth_uri
            .contains("issuer=authd&algorithm=SHA1&digits=6&period=30")
    );
    assert_eq!(
        (first.algorithm.as_str(), first.digits, first.period_seconds),
        ("SHA1", 6, 30)
    );
    assert!(first.qr_png.starts_with(b"\x89PNG\r\n\x1a\n"));
    assert_eq!(&first.qr_png[12..16], b"IHDR");
    // The secret is not stored in the clear.
    let sealed: String =
        sqlx::query_scalar("SELECT secret_sealed FROM totp_credentials WHERE user_id = ?")
            .bind(&user.user_id)
            .fetch_one(&app.db().await)
            .await
            .unwrap();
    assert!(sealed.starts_with("v1:") && !sealed.contains(&first.secret));

    // An unconfirmed enrolment changes nothing for Login.
    let plain = app.login("tess", PASSWORD).await.unwrap();
    assert!(!plain.second_factor_required && !plain.access_token.is_empty());

    // A new EnrollTotp replaces it: the first secret's codes stop counting.
    let second = enroll(&app, &token).await.unwrap();
    assert_ne!(first.secret, second.secret);
    let stale = code_at(&app, &first.secret, 0);
    let now = code_at(&app, &second.secret, 0);
    if stale != now {
        assert_eq!(
            reason(confirm(&app, &token, &stale).await, Code::Unauthenticated),
            "SECOND_FACTOR_INVALID"
        );
    }
    let codes = confirm(&app, &token, &now).await.unwrap();
    assert_eq!(codes.len(), 10);
    assert_eq!(codes.iter().collect::<HashSet<_>>().len(), 10);
    assert_code(confirm(&app, &token, &now).await, Code::FailedPrecondition);
    assert_code(enroll(&app, &token).await, Code::FailedPrecondition);

    // Login now answers a ticket and no token.
    let login = app.login("tess", PASSWORD).await.unwrap();
    assert!(login.second_factor_required);
    assert!(login.access_token.is_empty() && login.refresh_token.is_empty());
    assert_eq!(
        login.mfa_ticket_expires_at.unwrap().seconds,
        unix(&app.clock) + 300
    );
    // The code given at confirmation counts as used.
    assert_eq!(
        reason(
            verify(&app, &login.mfa_ticket, &now, "").await,
            Code::Unauthenticated
        ),
        "SECOND_FACTOR_INVALID"
    );
    advance(&app, Duration::from_secs(30));
    let done = verify(
        &app,
        &login.mfa_ticket,
        &code_at(&app, &second.secret, 0),
        "",
    )
    .await
    .unwrap();
    // What Login answers: access token, refresh token, session.
    assert_eq!(done.token_type, "Bearer");
    assert_eq!(done.expires_in, 86_400);
    assert!(done.refresh_token.starts_with("rt1."));
    let v = app.validate(&done.access_token).await.unwrap();
    assert!(v.valid, "{v:?}");
    assert_eq!(v.amr, ["pwd", "otp"]);
    assert_eq!(v.session_id, done.session_id);
    assert_eq!(v.auth_time.unwrap().seconds, unix(&app.clock));
    // The ticket is single-use, even with a fresh code.
    advance(&app, Duration::from_secs(30));
    assert_eq!(
        reason(
            verify(
                &app,
                &login.mfa_ticket,
                &code_at(&app, &second.secret, 0),
                ""
            )
            .await,
            Code::Unauthenticated
        ),
        "MFA_TICKET_INVALID"
    );
    // Refresh keeps the second factor in amr, and auth_time.
    let refreshed = app.refresh(&done.refresh_token).await.unwrap();
    let v = app.validate(&refreshed.access_token).await.unwrap();
    assert_eq!(v.amr, ["pwd", "otp"]);
    assert_eq!(v.auth_time.unwrap().seconds, unix(&app.clock) - 30);
    // Envoy's Check passes both on.
    let (headers, _) = allowed(
        &check(
            &app,
            &[(
                "authorization",
                &format!("Bearer {}", refreshed.access_token),
            )],
        )
        .await,
    );
    assert_eq!(headers["x-auth-amr"], "pwd,otp");
    assert_eq!(headers["x-auth-time"], (unix(&app.clock) - 30).to_string());

    assert_audited(
        &app,
        &user.user_id,
        &[
            "mfa_enrolled",
            "mfa_confirmed",
            "mfa_succeeded",
            "mfa_failed",
        ],
    )
    .await;
    let page = app.scrape().await;
    assert!(
        metric(
            &page,
            "authd_second_factor_checks_total",
            &[("outcome", "accepted"), ("method", "totp")]
        ) >= 1.0,
        "{page}"
    );
}

async fn codes_are_single_use_and_skew_is_one_step(backend: Backend) {
    let app = totp_app(backend, &[]).await;
    let (user_id, _, secret, _) = enrolled(&app, "skew").await;
    advance(&app, Duration::from_secs(300));
    let refused = |r: Result<pb::VerifySecondFactorResponse, Status>| {
        reason(r, Code::Unauthenticated) == "SECOND_FACTOR_INVALID"
    };

    // ±2 steps are refused; −1 is accepted.
    let t = ticket(&app, "skew").await;
    let codes = pyotp_codes(
        &secret,
        &[-60, 60, -30, 0, 30].map(|o| unix(&app.clock) + o),
    );
    let (minus2, plus2, minus1, now, plus1) =
        (&codes[0], &codes[1], &codes[2], &codes[3], &codes[4]);
    let before = last_step(&app, &user_id).await;
    assert!(refused(verify(&app, &t, minus2, "").await));
    assert!(refused(verify(&app, &t, plus2, "").await));
    assert_eq!(
        last_step(&app, &user_id).await,
        before,
        "refusals use nothing"
    );
    verify(&app, &t, minus1, "").await.unwrap();

    // The same code again (replay within its step), on a fresh ticket: refused.
    let t = ticket(&app, "skew").await;
    assert!(refused(verify(&app, &t, minus1, "").await));
    verify(&app, &t, now, "").await.unwrap();
    let t = ticket(&app, "skew").await;
    assert!(refused(verify(&app, &t, now, "").await));
    // +1 step is accepted; after it, nothing earlier is.
    verify(&app, &t, plus1, "").await.unwrap();
    let t = ticket(&app, "skew").await;
    assert!(refused(verify(&app, &t, now, "").await));
    assert_eq!(
        last_step(&app, &user_id).await,
        (unix(&app.clock) + 30) / 30
    );

    // Ten concurrent calls with one fresh code, each on its own ticket: one wins.
    advance(&app, Duration::from_secs(90));
    let code = code_at(&app, &secret, 0);
    let mut tickets = Vec::new();
    for _ in 0..10 {
        tickets.push(ticket(&app, "skew").await);
    }
    let results =
        futures::future::join_all(tickets.iter().map(|t| verify(&app, t, &code, ""))).await;
    let won = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(won, 1, "{results:?}");
}

async fn tickets_expire_die_after_five_wrong_codes_and_are_single_use(backend: Backend) {
    let app = totp_app(backend, &[]).await;
    let (user_id, _, secret, _) = enrolled(&app, "tina").await;

    // Expiry: 5 minutes.
    let t = ticket(&app, "tina").await;
    advance(&app, Duration::from_secs(301));
    assert_eq!(
        reason(
            verify(&app, &t, &code_at(&app, &secret, 0), "").await,
            Code::Unauthenticated
        ),
        "MFA_TICKET_INVALID"
    );

    // Five wrong codes kill the ticket: the right one then gets nothing, and is not
    // used up.
    let t = ticket(&app, "tina").await;
    let right = code_at(&app, &secret, 0);
    let wrong = if right == "000000" {
        "111111"
    } else {
        "000000"
    };
    for _ in 0..5 {
        assert_eq!(
            reason(verify(&app, &t, wrong, "").await, Code::Unauthenticated),
            "SECOND_FACTOR_INVALID"
        );
    }
    assert_eq!(
        reason(verify(&app, &t, &right, "").await, Code::Unauthenticated),
        "MFA_TICKET_INVALID"
    );
    let t = ticket(&app, "tina").await;
    verify(&app, &t, &right, "").await.unwrap();

    // Tickets that are not ours: garbage, another user's id, oversize.
    let other = app.register("tom", PASSWORD).await.unwrap();
    let t = ticket(&app, "tina").await;
    let forged = t.replace(&user_id, &other.user_id);
    advance(&app, Duration::from_secs(30));
    let code = code_at(&app, &secret, 0);
    for bad in [
        "nonsense".to_owned(),
        "mt1.x.y".to_owned(),
        format!("mt1.{}.ff", "a".repeat(60)),
        forged,
        format!("{t}x"),
    ] {
        assert_eq!(
            reason(verify(&app, &bad, &code, "").await, Code::Unauthenticated),
            "MFA_TICKET_INVALID",
            "{bad}"
        );
    }
    assert_code(
        verify(&app, &"m".repeat(10_000), &code, "").await,
        Code::InvalidArgument,
    );
    assert_code(verify(&app, &t, "", "").await, Code::InvalidArgument);
    assert_code(
        verify(&app, &t, &"1".repeat(100), "").await,
        Code::InvalidArgument,
    );
    // Ten concurrent calls with one ticket and the right code: one session.
    let results = futures::future::join_all((0..10).map(|_| verify(&app, &t, &code, ""))).await;
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        1,
        "{results:?}"
    );
}

async fn wrong_codes_are_throttled_apart_from_passwords(backend: Backend) {
    let app = totp_app(
        backend,
        &[
            ("THROTTLE_ACCOUNT_THRESHOLD", "3"),
            ("THROTTLE_SECOND_FACTOR_THRESHOLD", "3"),
            ("THROTTLE_BASE_DELAY", "60s"),
        ],
    )
    .await;
    let (_, _, secret, _) = enrolled(&app, "theo").await;
    let right = code_at(&app, &secret, 0);
    let wrong = if right == "000000" {
        "111111"
    } else {
        "000000"
    };
    for _ in 0..3 {
        let t = ticket(&app, "theo").await;
        assert_code(verify(&app, &t, wrong, "").await, Code::Unauthenticated);
    }
    // The second factor's counter is full; the password's is not.
    let t = ticket(&app, "theo").await;
    assert_code(verify(&app, &t, &right, "").await, Code::ResourceExhausted);
    // Wrong passwords do not block codes either: another user's counter is untouched.
    let (_, _, other_secret, _) = enrolled(&app, "thea").await;
    for _ in 0..3 {
        assert_code(
            app.login("thea", "Wrong-Horse-9").await,
            Code::Unauthenticated,
        );
    }
    assert_code(app.login("thea", PASSWORD).await, Code::ResourceExhausted);
    let _ = other_secret;
}

async fn recovery_codes_are_single_use_and_show_in_list_sessions(backend: Backend) {
    let app = totp_app(backend, &[]).await;
    let (user_id, _, secret, codes) = enrolled(&app, "rosa").await;

    let before = app.login("rosa", PASSWORD).await.unwrap();
    // Case and dashes do not matter.
    let typed = codes[0].to_uppercase().replace('-', " ");
    let done = verify(&app, &before.mfa_ticket, "", &typed).await.unwrap();
    let v = app.validate(&done.access_token).await.unwrap();
    assert_eq!(v.amr, ["pwd", "otp"]);
    let list = app.list_sessions(&done.access_token).await.unwrap();
    assert!(list.second_factor_enabled);
    assert_eq!(list.recovery_codes_remaining, 9);
    // Each session says how its login was made.
    let amrs: Vec<(bool, Vec<String>)> = list
        .sessions
        .iter()
        .map(|s| (s.current, s.amr.clone()))
        .collect();
    assert!(
        amrs.contains(&(true, vec!["pwd".to_owned(), "otp".to_owned()])),
        "{amrs:?}"
    );
    assert!(amrs.contains(&(false, vec!["pwd".to_owned()])), "{amrs:?}");
    assert_eq!(
        list.recovery_code_used_at.unwrap().seconds,
        unix(&app.clock)
    );
    assert_eq!(list.recovery_code_used_ip, "127.0.0.1");

    // Single use.
    let t = ticket(&app, "rosa").await;
    assert_eq!(
        reason(verify(&app, &t, "", &codes[0]).await, Code::Unauthenticated),
        "SECOND_FACTOR_INVALID"
    );
    assert_code(
        verify(&app, &t, "123456", &codes[1]).await,
        Code::InvalidArgument,
    );
    assert_audited(&app, &user_id, &["recovery_code_used"]).await;

    // Regenerating needs a second factor, and replaces the whole set.
    let regenerate = |sf: Option<pb::SecondFactor>| {
        let mut client = app.client.clone();
        let request = bearer(
            &done.access_token,
            pb::RegenerateRecoveryCodesRequest { second_factor: sf },
        );
        async move { client.regenerate_recovery_codes(request).await }
    };
    assert_eq!(
        reason(regenerate(None).await, Code::Unauthenticated),
        "SECOND_FACTOR_REQUIRED"
    );
    let fresh = regenerate(factor("", &codes[1]))
        .await
        .unwrap()
        .into_inner()
        .recovery_codes;
    assert_eq!(fresh.len(), 10);
    assert!(fresh.iter().all(|c| !codes.contains(c)));
    let list = app.list_sessions(&done.access_token).await.unwrap();
    assert_eq!(list.recovery_codes_remaining, 10);
    assert_eq!(list.recovery_code_used_at, None);
    let t = ticket(&app, "rosa").await;
    assert_code(verify(&app, &t, "", &codes[2]).await, Code::Unauthenticated);
    verify(&app, &t, "", &fresh[0]).await.unwrap();
    let _ = secret;
    assert_audited(&app, &user_id, &["recovery_codes_regenerated"]).await;
}

async fn step_up_guards_critical_calls(backend: Backend) {
    let app = totp_app(backend, &[]).await;
    let (_, old_token, secret, _) = enrolled(&app, "sten").await;
    let t = ticket(&app, "sten").await;
    let mine = verify(&app, &t, &code_at(&app, &secret, 0), "")
        .await
        .unwrap();
    advance(&app, Duration::from_secs(30));
    let t = ticket(&app, "sten").await;
    let other = verify(&app, &t, &code_at(&app, &secret, 0), "")
        .await
        .unwrap();
    advance(&app, Duration::from_secs(30));

    let change = |sf: Option<pb::SecondFactor>, new: &str| {
        let mut client = app.client.clone();
        let request = bearer(
            &mine.access_token,
            pb::ChangePasswordRequest {
                current_password: PASSWORD.into(),
                new_password: new.into(),
                second_factor: sf,
            },
        );
        async move { client.change_password(request).await }
    };
    assert_eq!(
        reason(
            change(None, "Brand-New-Pass-7").await,
            Code::Unauthenticated
        ),
        "SECOND_FACTOR_REQUIRED"
    );
    let code = code_at(&app, &secret, 0);
    let wrong = if code == "000000" { "111111" } else { "000000" };
    assert_eq!(
        reason(
            change(factor(wrong, ""), "Brand-New-Pass-7").await,
            Code::Unauthenticated
        ),
        "SECOND_FACTOR_INVALID"
    );

    // RevokeSession: one's own session needs nothing more, another one a code.
    let revoke = |sid: &str, sf: Option<pb::SecondFactor>| {
        let mut client = app.client.clone();
        let request = bearer(
            &mine.access_token,
            pb::RevokeSessionRequest {
                session_id: sid.into(),
                second_factor: sf,
            },
        );
        async move { client.revoke_session(request).await }
    };
    assert_eq!(
        reason(revoke(&other.session_id, None).await, Code::Unauthenticated),
        "SECOND_FACTOR_REQUIRED"
    );
    assert!(app.validate(&other.access_token).await.unwrap().valid);
    revoke(&other.session_id, factor(&code, "")).await.unwrap();
    assert!(!app.validate(&other.access_token).await.unwrap().valid);

    // ChangePassword with a fresh code.
    advance(&app, Duration::from_secs(30));
    change(factor(&code_at(&app, &secret, 0), ""), "Brand-New-Pass-7")
        .await
        .unwrap();
    // The password-only token from before the enrolment was ended by it.
    assert!(!app.validate(&old_token).await.unwrap().valid);

    // DisableTotp needs one too; then Login answers tokens again.
    let disable = |sf: Option<pb::SecondFactor>| {
        let mut client = app.client.clone();
        let request = bearer(
            &mine.access_token,
            pb::DisableTotpRequest { second_factor: sf },
        );
        async move { client.disable_totp(request).await }
    };
    assert_eq!(
        reason(disable(None).await, Code::Unauthenticated),
        "SECOND_FACTOR_REQUIRED"
    );
    advance(&app, Duration::from_secs(30));
    disable(factor(&code_at(&app, &secret, 0), ""))
        .await
        .unwrap();
    let plain = app.login("sten", "Brand-New-Pass-7").await.unwrap();
    assert!(!plain.second_factor_required && !plain.access_token.is_empty());
    // Without a second factor, nothing needs one.
    app.change_password(&plain.access_token, "Brand-New-Pass-7", "Third-New-Pass-8")
        .await
        .unwrap();
    let list = app.list_sessions(&plain.access_token).await.unwrap();
    assert!(!list.second_factor_enabled);
}

async fn validate_token_demands_step_up(backend: Backend) {
    let app = totp_app(backend, &[]).await;
    let (user, login) = app.user_with_session("vera").await;
    let ask = |token: &str, max_age: Option<i64>, second: bool| {
        let mut client = app.client.clone();
        let request = pb::ValidateTokenRequest {
            token: token.into(),
            max_auth_age: max_age.map(|s| prost_types::Duration {
                seconds: s,
                nanos: 0,
            }),
            require_second_factor: second,
        };
        async move { client.validate_token(request).await }
    };
    let insufficient = pb::InvalidReason::InsufficientAuthentication as i32;
    let v = ask(&login.access_token, None, true)
        .await
        .unwrap()
        .into_inner();
    assert!(!v.valid);
    assert_eq!(v.reason, insufficient);
    // RFC 9470: the answer says what the token has.
    assert_eq!(v.amr, ["pwd"]);
    assert_eq!(v.user_id, user.user_id);
    assert!(
        ask(&login.access_token, None, false)
            .await
            .unwrap()
            .into_inner()
            .valid
    );
    assert!(
        ask(&login.access_token, Some(60), false)
            .await
            .unwrap()
            .into_inner()
            .valid
    );
    advance(&app, Duration::from_secs(61));
    let v = ask(&login.access_token, Some(60), false)
        .await
        .unwrap()
        .into_inner();
    assert_eq!((v.valid, v.reason), (false, insufficient));
    // A Refresh does not make a login recent.
    let refreshed = app.refresh(&login.refresh_token).await.unwrap();
    let v = ask(&refreshed.access_token, Some(60), false)
        .await
        .unwrap()
        .into_inner();
    assert_eq!((v.valid, v.reason), (false, insufficient));
    assert_code(
        ask(&login.access_token, Some(-1), false).await,
        Code::InvalidArgument,
    );

    // After a second factor: both demands met.
    let e = enroll(&app, &refreshed.access_token).await.unwrap();
    confirm(&app, &refreshed.access_token, &code_at(&app, &e.secret, 0))
        .await
        .unwrap();
    advance(&app, Duration::from_secs(30));
    let t = ticket(&app, "vera").await;
    let done = verify(&app, &t, &code_at(&app, &e.secret, 0), "")
        .await
        .unwrap();
    let v = ask(&done.access_token, Some(60), true)
        .await
        .unwrap()
        .into_inner();
    assert!(v.valid, "{v:?}");
    // A revoked token stays revoked, whatever is asked.
    app.logout(&done.access_token).await.unwrap();
    let v = ask(&done.access_token, Some(60), true)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.reason, pb::InvalidReason::Revoked as i32);
}

#[tokio::test]
async fn without_redis_second_factor_calls_are_unavailable_and_use_no_code() {
    let mut redis = OwnRedis::start().await;
    let app = TestApp::builder()
        .envs(&[
            ("REDIS_URL", &redis.url()),
            ("TOTP_ENCRYPTION_KEY", TOTP_KEY),
        ])
        .spawn()
        .await;
    let (user_id, _, secret, codes) = enrolled(&app, "una").await;
    let t = ticket(&app, "una").await;
    let step = last_step(&app, &user_id).await;
    redis.kill();
    let code = code_at(&app, &secret, 0);
    assert_code(verify(&app, &t, &code, "").await, Code::Unavailable);
    assert_code(verify(&app, &t, "", &codes[0]).await, Code::Unavailable);
    assert_eq!(last_step(&app, &user_id).await, step, "no code was used");
    let unused: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM recovery_codes WHERE user_id = ? AND used_at IS NULL",
    )
    .bind(&user_id)
    .fetch_one(&app.db().await)
    .await
    .unwrap();
    assert_eq!(unused, 10);
    assert_code(app.login("una", PASSWORD).await, Code::Unavailable);
}

#[tokio::test]
async fn mysql_without_a_key_offers_no_second_factor() {
    let app = TestApp::builder().spawn().await;
    let (_, login) = app.user_with_session("kim").await;
    let status = assert_code(
        enroll(&app, &login.access_token).await,
        Code::FailedPrecondition,
    );
    assert!(
        status.message().contains("TOTP_ENCRYPTION_KEY"),
        "{status:?}"
    );
}

#[tokio::test]
async fn enrolment_calls_refuse_callers_without_a_good_token() {
    let app = totp_app(Backend::Embedded, &[]).await;
    assert_code(enroll(&app, "not-a-token").await, Code::Unauthenticated);
    assert_code(
        confirm(&app, "not-a-token", "123456").await,
        Code::Unauthenticated,
    );
    let (_, login) = app.user_with_session("nia").await;
    // Nothing pending to confirm; an oversize code is refused before any work.
    assert_code(
        confirm(&app, &login.access_token, "123456").await,
        Code::FailedPrecondition,
    );
    assert_code(
        confirm(&app, &login.access_token, &"9".repeat(65)).await,
        Code::InvalidArgument,
    );
    app.logout(&login.access_token).await.unwrap();
    assert_code(
        enroll(&app, &login.access_token).await,
        Code::Unauthenticated,
    );
}

async fn no_secret_ticket_or_recovery_code_reaches_the_log_or_the_audit_trail(backend: Backend) {
    let app = totp_app(backend, &[]).await;
    let (user_id, _, secret, codes) = enrolled(&app, "lena").await;
    let first = ticket(&app, "lena").await;
    let wrong = if code_at(&app, &secret, 0) == "000000" {
        "111111"
    } else {
        "000000"
    };
    assert_code(verify(&app, &first, wrong, "").await, Code::Unauthenticated);
    verify(&app, &first, &code_at(&app, &secret, 0), "")
        .await
        .unwrap();
    let second = ticket(&app, "lena").await;
    verify(&app, &second, "", &codes[0]).await.unwrap();
    verify(&app, &second, "", &codes[1]).await.unwrap_err();
    assert_audited(&app, &user_id, &["recovery_code_used"]).await;
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT kind, detail FROM audit_events WHERE user_id = ?")
            .bind(&user_id)
            .fetch_all(&app.db().await)
            .await
            .unwrap();
    let rows = format!("{rows:?}");
    let logs = captured_logs();
    let mut secrets = vec![
        secret.clone(),
        secret.to_lowercase(),
        first.clone(),
        first.rsplit('.').next().unwrap().to_owned(),
        second.rsplit('.').next().unwrap().to_owned(),
    ];
    for code in &codes[..2] {
        secrets.push(code.clone());
        secrets.push(code.replace('-', ""));
    }
    for s in &secrets {
        assert!(!rows.contains(s.as_str()), "{s:?} in an audit row");
        assert!(!logs.contains(s.as_str()), "{s:?} in the log");
    }
}

async fn the_client_layer_and_envoy_see_the_second_factor(backend: Backend) {
    use authd::client::{AuthConfig, AuthValidator};
    let app = totp_app(backend, &[]).await;
    let (_, password_only, secret, _) = enrolled(&app, "cleo").await;
    let t = ticket(&app, "cleo").await;
    let done = verify(&app, &t, &code_at(&app, &secret, 0), "")
        .await
        .unwrap();
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .connect_lazy();
    let validator = AuthValidator::new(channel, AuthConfig::default());
    let ctx = validator.authorize(Some(&done.access_token)).await.unwrap();
    assert_eq!(ctx.amr, ["pwd", "otp"]);
    assert!(ctx.has_second_factor());
    let auth_time = ctx
        .auth_time
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert_eq!(auth_time as i64, unix(&app.clock));
    let ctx = validator.authorize(Some(&password_only)).await.unwrap();
    assert_eq!(ctx.amr, ["pwd"]);
    assert!(!ctx.has_second_factor());
    // Envoy: headers (what a client sent under these names is overwritten) and metadata.
    let r = check(
        &app,
        &[
            ("authorization", &format!("Bearer {password_only}")),
            ("x-auth-amr", "pwd,otp"),
        ],
    )
    .await;
    let (headers, _) = allowed(&r);
    assert_eq!(headers["x-auth-amr"], "pwd");
    let metadata = format!("{:?}", r.dynamic_metadata);
    assert!(
        metadata.contains("amr") && metadata.contains("auth_time"),
        "{metadata}"
    );
}

async fn an_administrator_can_reset_a_lost_second_factor(backend: Backend) {
    use crate::admin::{admin, admin_client, user_req};
    let app = totp_app(backend, &[]).await;
    let (user_id, password_only, _, _) = enrolled(&app, "lost").await;
    let reset = |token: String| {
        let mut client = admin_client(&app);
        let request = user_req(
            &token,
            pb::ResetSecondFactorRequest {
                user: "lost".into(),
            },
        );
        async move { client.reset_second_factor(request).await }
    };
    // Only an administrator.
    assert_code(reset(password_only).await, Code::PermissionDenied);
    let root = admin(&app, "root").await;
    assert!(reset(root.clone()).await.unwrap().into_inner().removed);
    assert!(!reset(root).await.unwrap().into_inner().removed);
    let plain = app.login("lost", PASSWORD).await.unwrap();
    assert!(!plain.second_factor_required && !plain.access_token.is_empty());
    assert_audited(&app, &user_id, &["mfa_disabled"]).await;
}

#[tokio::test]
async fn with_second_factors_stored_mysql_refuses_to_start_without_the_key() {
    let app = totp_app(Backend::MySqlRedis, &[]).await;
    enrolled(&app, "kept").await;
    let vars = test_env(&app.db_url, &redis_base(), &app.key_prefix);
    let config = authd::config::Config::from_vars(vars).unwrap();
    let built = authd::Application::build_with_clock(config, app.clock.clone()).await;
    let Err(error) = built else {
        panic!("authd started without the key that opens its second factors");
    };
    let error = format!("{error:#}");
    assert!(error.contains("TOTP_ENCRYPTION_KEY"), "{error}");

    // Nor with another key: it would open none of them.
    let other_key = "ab".repeat(32);
    let vars = with_overrides(
        test_env(&app.db_url, &redis_base(), &app.key_prefix),
        &[("TOTP_ENCRYPTION_KEY", other_key.as_str())],
    );
    let config = authd::config::Config::from_vars(vars).unwrap();
    let built = authd::Application::build_with_clock(config, app.clock.clone()).await;
    let Err(error) = built else {
        panic!("authd started with a key that opens none of its second factors");
    };
    let error = format!("{error:#}");
    assert!(
        error.contains("not the key they were sealed under"),
        "{error}"
    );

    // The right key still starts.
    let vars = with_overrides(
        test_env(&app.db_url, &redis_base(), &app.key_prefix),
        &[("TOTP_ENCRYPTION_KEY", TOTP_KEY)],
    );
    let config = authd::config::Config::from_vars(vars).unwrap();
    assert!(
        authd::Application::build_with_clock(config, app.clock.clone())
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn embedded_mode_keeps_its_key_across_restarts() {
    let app = totp_app(Backend::Embedded, &[]).await;
    let (_, _, secret, _) = enrolled(&app, "emma").await;
    let key_file = std::path::Path::new(&std::env::temp_dir())
        .join(&app.db_name)
        .join("users.db.totp-key");
    let key = std::fs::read_to_string(&key_file).unwrap();
    assert_eq!(key.trim().len(), 64);
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // Another process on the same file (a restart) opens the same secrets.
    let restarted = app.sibling().spawn().await;
    let t = ticket(&restarted, "emma").await;
    verify(&restarted, &t, &code_at(&restarted, &secret, 0), "")
        .await
        .unwrap();
    assert_eq!(std::fs::read_to_string(&key_file).unwrap(), key);
}

/// A thief with only the bearer token (no password) cannot put their authenticator on
/// the account: ConfirmTotp needs the current password, checked and throttled as
/// ChangePassword's is.
async fn a_stolen_token_alone_cannot_confirm_a_second_factor(backend: Backend) {
    let app = totp_app(backend, &[("THROTTLE_ACCOUNT_THRESHOLD", "3")]).await;
    let (user, login) = app.user_with_session("eve_victim").await;
    let stolen = login.access_token;
    let e = enroll(&app, &stolen).await.unwrap();
    let code = code_at(&app, &e.secret, 0);

    // No password, or a wrong one: nothing confirmed, the code not used up.
    let status = assert_code(
        confirm_with(&app, &stolen, &code, "").await,
        Code::InvalidArgument,
    );
    assert!(status.message().contains("current_password"), "{status:?}");
    let status = assert_code(
        confirm_with(&app, &stolen, &code, "Guessed-Pass-1").await,
        Code::PermissionDenied,
    );
    // As ChangePassword answers a wrong current password.
    let change = assert_code(
        app.change_password(&stolen, "Guessed-Pass-1", "Brand-New-Pass-7")
            .await,
        Code::PermissionDenied,
    );
    assert_eq!(status.message(), change.message());
    assert_audited(
        &app,
        &user.user_id,
        &["mfa_failed", "password_change_failed"],
    )
    .await;
    let detail: String = sqlx::query_scalar(
        "SELECT detail FROM audit_events WHERE user_id = ? AND kind = 'mfa_failed'",
    )
    .bind(&user.user_id)
    .fetch_one(&app.db().await)
    .await
    .unwrap();
    assert_eq!(detail, "ConfirmTotp: wrong current password");

    // Wrong passwords count on the password's throttle (the account's, shared with
    // Login and ChangePassword): the third failure locks, the right one then waits.
    assert_code(
        confirm_with(&app, &stolen, &code, "Guessed-Pass-2").await,
        Code::PermissionDenied,
    );
    assert_code(
        confirm_with(&app, &stolen, &code, PASSWORD).await,
        Code::ResourceExhausted,
    );
    assert_code(
        app.login("eve_victim", PASSWORD).await,
        Code::ResourceExhausted,
    );
    advance(&app, Duration::from_secs(20 * 60));
    let plain = app.login("eve_victim", PASSWORD).await.unwrap();
    assert!(
        !plain.second_factor_required && !plain.access_token.is_empty(),
        "nothing was confirmed"
    );

    // With the password (the owner), the same token confirms.
    let code = code_at(&app, &e.secret, 0);
    let codes = confirm_with(&app, &stolen, &code, PASSWORD).await.unwrap();
    assert_eq!(codes.len(), 10);
    assert!(
        app.login("eve_victim", PASSWORD)
            .await
            .unwrap()
            .second_factor_required
    );
}

/// A ticket proves the password it was made with: once that password is replaced
/// (ChangePassword, admin SetPassword), the ticket opens no session, even with a right
/// code, and the code is not used up.
async fn a_ticket_from_before_a_password_change_is_refused(backend: Backend) {
    use crate::admin::{admin, admin_client, user_req};
    let app = totp_app(backend, &[]).await;
    let (user_id, old_token, secret, _) = enrolled(&app, "pat").await;
    // The attacker's: the old password, a code still to find.
    let stale = ticket(&app, "pat").await;
    advance(&app, Duration::from_secs(1));
    // The owner changes the password (with a code: step-up).
    let mut client = app.client.clone();
    client
        .change_password(bearer(
            &old_token,
            pb::ChangePasswordRequest {
                current_password: PASSWORD.into(),
                new_password: "Brand-New-Pass-7".into(),
                second_factor: factor(&code_at(&app, &secret, 0), ""),
            },
        ))
        .await
        .unwrap();
    advance(&app, Duration::from_secs(30));
    let code = code_at(&app, &secret, 0);
    let step = last_step(&app, &user_id).await;
    assert_eq!(
        reason(verify(&app, &stale, &code, "").await, Code::Unauthenticated),
        "MFA_TICKET_INVALID"
    );
    assert_eq!(last_step(&app, &user_id).await, step, "no code was used");
    assert_audited_detail(&app, &user_id, "mfa_failed", "password changed").await;
    // A ticket of the new password works with that very code.
    let login = app.login("pat", "Brand-New-Pass-7").await.unwrap();
    let fresh = login.mfa_ticket;
    verify(&app, &fresh, &code, "").await.unwrap();

    // An administrator's SetPassword ends the tickets of the password it replaces too.
    let root = admin(&app, "root").await;
    let stale = app
        .login("pat", "Brand-New-Pass-7")
        .await
        .unwrap()
        .mfa_ticket;
    advance(&app, Duration::from_secs(1));
    admin_client(&app)
        .set_password(user_req(
            &root,
            pb::SetPasswordRequest {
                user: "pat".into(),
                password: "Admin-Set-Pass-8".into(),
                require_change: false,
            },
        ))
        .await
        .unwrap();
    advance(&app, Duration::from_secs(30));
    assert_eq!(
        reason(
            verify(&app, &stale, &code_at(&app, &secret, 0), "").await,
            Code::Unauthenticated
        ),
        "MFA_TICKET_INVALID"
    );

    // And an operator's RevokeUserSessions (forcing the user out everywhere) ends the
    // tickets waiting for a code as well as the sessions.
    let stale = app
        .login("pat", "Admin-Set-Pass-8")
        .await
        .unwrap()
        .mfa_ticket;
    advance(&app, Duration::from_secs(1));
    admin_client(&app)
        .revoke_user_sessions(user_req(
            &root,
            pb::RevokeUserSessionsRequest { user: "pat".into() },
        ))
        .await
        .unwrap();
    advance(&app, Duration::from_secs(30));
    assert_eq!(
        reason(
            verify(&app, &stale, &code_at(&app, &secret, 0), "").await,
            Code::Unauthenticated
        ),
        "MFA_TICKET_INVALID"
    );
}

async fn stored_hash(app: &TestApp, user_id: &str) -> String {
    sqlx::query_scalar("SELECT password_hash FROM users WHERE id = ?")
        .bind(user_id)
        .fetch_one(&app.db().await)
        .await
        .unwrap()
}

/// Raising BCRYPT_COST upgrades the hash of a user with a second factor at the
/// password step, as it does a password-only user's.
async fn the_ticket_branch_of_login_rehashes_at_the_configured_cost(backend: Backend) {
    let app = totp_app(backend, &[]).await;
    let (user_id, _, secret, _) = enrolled(&app, "hugo").await;
    let before = stored_hash(&app, &user_id).await;
    assert_eq!(authd::auth::hasher::hash_cost(&before), Some(4));
    let costlier = app.sibling().env("BCRYPT_COST", "5").spawn().await;
    let t = ticket(&costlier, "hugo").await;
    let after = stored_hash(&app, &user_id).await;
    assert_eq!(authd::auth::hasher::hash_cost(&after), Some(5), "{after}");
    // The upgraded hash holds the same password, and the ticket still completes.
    verify(&costlier, &t, &code_at(&app, &secret, 0), "")
        .await
        .unwrap();
    assert!(ticket(&costlier, "hugo").await.starts_with("mt1."));
}

#[tokio::test]
async fn embedded_mode_refuses_to_start_when_its_key_file_is_gone() {
    let app = totp_app(Backend::Embedded, &[]).await;
    enrolled(&app, "ines").await;
    let key_file = std::path::Path::new(&app.db_name).join("users.db.totp-key");
    std::fs::remove_file(&key_file).unwrap();
    let built = authd::Application::build_with_clock(app.config(), app.clock.clone()).await;
    let Err(error) = built else {
        panic!("authd made a new key that opens none of the stored second factors");
    };
    let error = format!("{error:#}");
    assert!(
        error.contains("users.db.totp-key") && error.contains("missing"),
        "{error}"
    );
    assert!(!key_file.exists(), "a new key file was written");
}

/// A wrong code that no credential ever accepts (7 digits where 6 are expected); it is
/// counted like any wrong code.
const NEVER_RIGHT: &str = "0000000";

/// The wait a RESOURCE_EXHAUSTED refusal asks for (at least 1 s).
#[track_caller]
fn retry_delay<T: std::fmt::Debug>(result: Result<T, Status>) -> Duration {
    let status = assert_code(result, Code::ResourceExhausted);
    let delay = status
        .get_details_retry_info()
        .and_then(|r| r.retry_delay)
        .expect("a RetryInfo delay");
    delay.max(Duration::from_secs(1))
}

async fn wrong_codes_are_a_handful_a_day_and_a_success_resets_them(backend: Backend) {
    // The password and address limits as an attacker who knows the password meets them
    // (it spreads its logins over addresses); the second factor's at their defaults.
    let app = totp_app(
        backend,
        &[
            ("THROTTLE_ACCOUNT_THRESHOLD", "10"),
            ("THROTTLE_ADDRESS_THRESHOLD", "1000"),
            ("THROTTLE_SECOND_FACTOR_THRESHOLD", "5"),
        ],
    )
    .await;
    let (_, _, secret, _) = enrolled(&app, "gus").await;
    // The greediest schedule: each code as soon as the throttle allows, for two days.
    let start = unix(&app.clock);
    let mut checked = 0;
    while unix(&app.clock) - start < 2 * 24 * 3600 && checked <= 25 {
        let t = ticket(&app, "gus").await;
        match verify(&app, &t, NEVER_RIGHT, "").await {
            Err(s) if s.code() == Code::Unauthenticated => checked += 1,
            other => advance(&app, retry_delay(other)),
        }
    }
    // 5, then waits of 1 s, 2 s, 4 s … doubling to a day: 22 in 48 h (the old limits,
    // shared with passwords, let about 600 through).
    assert_eq!(checked, 22, "codes checked in two days");
    // The loop waited out the last wait: the next code is checked, and past the cap each
    // one costs a day, even the owner's right one …
    let t = ticket(&app, "gus").await;
    assert_code(
        verify(&app, &t, NEVER_RIGHT, "").await,
        Code::Unauthenticated,
    );
    let t = ticket(&app, "gus").await;
    let wait = retry_delay(verify(&app, &t, &code_at(&app, &secret, 0), "").await);
    assert!(wait > Duration::from_secs(23 * 3600), "{wait:?}");
    // … which, once the wait is over, resets the count.
    advance(&app, wait);
    let t = ticket(&app, "gus").await;
    verify(&app, &t, &code_at(&app, &secret, 0), "")
        .await
        .unwrap();
    let t = ticket(&app, "gus").await;
    assert_code(
        verify(&app, &t, NEVER_RIGHT, "").await,
        Code::Unauthenticated,
    );
}

async fn step_up_and_confirm_count_wrong_codes_on_the_user_not_the_address(backend: Backend) {
    // The default limits, every caller on one address (127.0.0.1), as behind a gateway.
    let app = totp_app(
        backend,
        &[
            ("THROTTLE_ADDRESS_THRESHOLD", "5"),
            ("THROTTLE_SECOND_FACTOR_THRESHOLD", "5"),
        ],
    )
    .await;
    let (_, mallory, _, _) = enrolled(&app, "mallory").await;
    let (_, bob, bob_secret, _) = enrolled(&app, "bob").await;
    let (_, carol) = app.user_with_session("carol").await;
    let carol_secret = enroll(&app, &carol.access_token).await.unwrap().secret;
    let disable = |token: &str, sf: Option<pb::SecondFactor>| {
        let mut client = app.client.clone();
        let request = bearer(token, pb::DisableTotpRequest { second_factor: sf });
        async move { client.disable_totp(request).await }
    };
    // Mallory sends wrong codes to the step-up calls and to her own enrolment.
    let (_, mallory_login) = app.user_with_session("mallory2").await;
    enroll(&app, &mallory_login.access_token).await.unwrap();
    for _ in 0..4 {
        assert_code(
            disable(&mallory, factor(NEVER_RIGHT, "")).await,
            Code::Unauthenticated,
        );
        assert_code(
            confirm(&app, &mallory_login.access_token, NEVER_RIGHT).await,
            Code::Unauthenticated,
        );
    }
    // Her own counters stop her …
    assert_code(
        disable(&mallory, factor(NEVER_RIGHT, "")).await,
        Code::Unauthenticated,
    );
    assert_code(
        disable(&mallory, factor(NEVER_RIGHT, "")).await,
        Code::ResourceExhausted,
    );
    // … and nobody else behind the address: Bob's step-up and Carol's enrolment work.
    disable(&bob, factor(&code_at(&app, &bob_secret, 0), ""))
        .await
        .unwrap();
    confirm(&app, &carol.access_token, &code_at(&app, &carol_secret, 0))
        .await
        .unwrap();
    // VerifySecondFactor names no caller: there, wrong codes count on the address too.
    let (_, _, _, _) = enrolled(&app, "dora").await;
    let (_, _, eve_secret, _) = enrolled(&app, "eve").await;
    for _ in 0..5 {
        let t = ticket(&app, "dora").await;
        assert_code(
            verify(&app, &t, NEVER_RIGHT, "").await,
            Code::Unauthenticated,
        );
    }
    let t = ticket(&app, "eve").await;
    assert_code(
        verify(&app, &t, &code_at(&app, &eve_secret, 0), "").await,
        Code::ResourceExhausted,
    );
}

async fn junk_tickets_are_counted_on_the_address_and_name_no_user(backend: Backend) {
    let app = totp_app(backend, &[("THROTTLE_ADDRESS_THRESHOLD", "5")]).await;
    let (victim, _, secret, _) = enrolled(&app, "vic").await;
    let mut refused = 0;
    let mut exhausted = 0;
    for i in 0..200 {
        let junk = if i % 10 == 9 {
            format!("not-a-ticket-{i}")
        } else {
            format!("mt1.{victim}.{i:x}")
        };
        match verify(&app, &junk, "123456", "").await {
            Err(s) if s.code() == Code::Unauthenticated => refused += 1,
            Err(s) if s.code() == Code::ResourceExhausted => exhausted += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((refused, exhausted), (5, 195));
    // The claimed id is in the rows' detail, never their user column.
    let db = app.db().await;
    let claimed = format!("%claimed_user_id={victim}%");
    let ok = eventually(Duration::from_secs(5), || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM audit_events WHERE kind = 'mfa_failed' AND detail LIKE ?",
        )
        .bind(&claimed)
        .fetch_one(&db)
        .await
        .unwrap();
        n == 5
    })
    .await;
    assert!(ok, "the claimed id is not in the rows' detail");
    let lockouts: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM audit_events WHERE kind = 'lockout' \
             AND detail LIKE 'mfa-ticket address after 5 bad second-factor tickets%'",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(lockouts, 1);
    assert!(
        !audit_kinds(&app, &victim)
            .await
            .contains(&"mfa_failed".to_owned()),
        "{:?}",
        audit_kinds(&app, &victim).await
    );
    // Once the wait is over, the victim's own ticket works.
    let wait = retry_delay(verify(&app, "mt1.x.y", "123456", "").await);
    advance(&app, wait);
    let t = ticket(&app, "vic").await;
    verify(&app, &t, &code_at(&app, &secret, 0), "")
        .await
        .unwrap();
}

async fn a_wrong_current_password_does_not_use_up_the_step_up_code(backend: Backend) {
    let app = totp_app(backend, &[]).await;
    let (user_id, token, secret, _) = enrolled(&app, "lou").await;
    let change = |current: &str, sf: Option<pb::SecondFactor>| {
        let mut client = app.client.clone();
        let request = bearer(
            &token,
            pb::ChangePasswordRequest {
                current_password: current.into(),
                new_password: "Brand-New-Pass-7".into(),
                second_factor: sf,
            },
        );
        async move { client.change_password(request).await }
    };
    // No code: refused before the password is looked at.
    assert_eq!(
        reason(change("Wrong-Horse-9", None).await, Code::Unauthenticated),
        "SECOND_FACTOR_REQUIRED"
    );
    let code = code_at(&app, &secret, 0);
    assert_code(
        change("Wrong-Horse-9", factor(&code, "")).await,
        Code::PermissionDenied,
    );
    // The same code, in the same step, with the right password.
    change(PASSWORD, factor(&code, "")).await.unwrap();
    assert_audited(&app, &user_id, &["password_changed"]).await;
}

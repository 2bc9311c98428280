//! PASSWORD_POLICY: `classic` (the default) and `nist`, each at its boundaries, with
//! the rule that failed named in a `BadRequest` field violation.

use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::support::*;

/// The (field, reason) of every violation in an INVALID_ARGUMENT.
#[track_caller]
fn rules(result: Result<impl std::fmt::Debug, Status>) -> Vec<(String, String)> {
    let s = assert_code(result, Code::InvalidArgument);
    s.get_details_bad_request()
        .expect("BadRequest detail")
        .field_violations
        .into_iter()
        .map(|v| (v.field, v.reason))
        .collect()
}

fn only(field: &str, reason: &str) -> Vec<(String, String)> {
    vec![(field.to_owned(), reason.to_owned())]
}

on_every_backend!(
    classic_policy_at_its_boundaries,
    nist_policy_at_its_boundaries,
    nist_minimum_length_is_configurable
);

async fn classic_policy_at_its_boundaries(backend: Backend) {
    let app = backend.app().spawn().await;
    assert_eq!(
        rules(app.register("cl1", "Ab1!xyz").await),
        only("password", "PASSWORD_TOO_SHORT")
    );
    assert!(app.register("cl2", "Ab1!xyzw").await.is_ok());
    let max = format!("Aa1!{}", "x".repeat(68));
    assert!(app.register("cl3", &max).await.is_ok());
    assert_eq!(
        rules(app.register("cl4", &format!("{max}x")).await),
        only("password", "PASSWORD_TOO_LONG")
    );
    // A long passphrase still needs every class in classic mode.
    let reasons = rules(app.register("cl5", "correct horse battery staple").await);
    assert_eq!(
        reasons,
        [
            "PASSWORD_NEEDS_UPPERCASE",
            "PASSWORD_NEEDS_DIGIT",
            "PASSWORD_NEEDS_SPECIAL"
        ]
        .map(|r| ("password".to_owned(), r.to_owned()))
    );
    assert!(
        rules(app.register("cl6", "Password123!").await)
            .contains(&("password".to_owned(), "PASSWORD_TOO_COMMON".to_owned()))
    );
}

async fn nist_policy_at_its_boundaries(backend: Backend) {
    let app = backend.app().env("PASSWORD_POLICY", "nist").spawn().await;
    // 14 and 15 characters, no composition rules.
    let s = assert_code(
        app.register("ni1", "zq8 vlk3 mtr9x").await,
        Code::InvalidArgument,
    );
    assert!(
        s.message().contains("at least 15 characters"),
        "{}",
        s.message()
    );
    assert_eq!(
        rules(app.register("ni1", "zq8 vlk3 mtr9x").await),
        only("password", "PASSWORD_TOO_SHORT")
    );
    assert!(app.register("ni2", "zq8 vlk3 mtr9xw").await.is_ok());
    // Spaces and Unicode, counted by characters but limited to 72 bytes.
    let long = "žltý kôň úpel ďábelské ódy pod mostom v hmle ťažko čítaťô";
    assert_eq!((long.chars().count(), long.len()), (57, 72));
    assert!(app.register("ni3", long).await.is_ok());
    assert!(app.login("ni3", long).await.is_ok());
    let over = format!("{long}x");
    let s = assert_code(app.register("ni4", &over).await, Code::InvalidArgument);
    assert!(s.message().contains("at most 72 bytes"), "{}", s.message());
    assert_eq!(
        rules(app.register("ni4", &over).await),
        only("password", "PASSWORD_TOO_LONG")
    );
    // Common and weak passwords.
    assert!(
        rules(app.register("ni6", "passwordpassword1").await)
            .iter()
            .any(|(_, r)| r == "PASSWORD_TOO_COMMON" || r == "PASSWORD_TOO_WEAK")
    );
    assert_eq!(
        rules(app.register("ni7", "aaaaaaaaaaaaaaaaaaaa").await)
            .last()
            .unwrap()
            .1,
        "PASSWORD_TOO_COMMON"
    );
    assert!(
        rules(app.register("ni8", "qwertyuiopasdfghjkl").await)
            .contains(&("password".to_owned(), "PASSWORD_TOO_WEAK".to_owned()))
    );
    // ChangePassword follows the same policy, on new_password.
    let login = app.login("ni2", "zq8 vlk3 mtr9xw").await.unwrap();
    assert_eq!(
        rules(
            app.change_password(&login.access_token, "zq8 vlk3 mtr9xw", "zq8 vlk3 mtr9x")
                .await
        ),
        only("new_password", "PASSWORD_TOO_SHORT")
    );
    assert!(
        app.change_password(
            &login.access_token,
            "zq8 vlk3 mtr9xw",
            "meadow lantern quietly 42"
        )
        .await
        .is_ok()
    );
}

async fn nist_minimum_length_is_configurable(backend: Backend) {
    let app = backend
        .app()
        .envs(&[("PASSWORD_POLICY", "nist"), ("PASSWORD_MIN_LENGTH", "20")])
        .spawn()
        .await;
    assert_eq!(
        rules(app.register("nl1", "zq8 vlk3 mtr9xw 12c").await),
        only("password", "PASSWORD_TOO_SHORT")
    );
    assert!(app.register("nl2", "zq8 vlk3 mtr9xw 12cd").await.is_ok());
}

/// Found by the `password` fuzz target: zxcvbn's l33t matching multiplies its work by
/// every distinct l33t character, so a crafted password costs it tenths of a second of
/// CPU (72 bytes of them: seconds, even in a release build). That work runs on the
/// hashing pool: a call that arrives meanwhile is answered at once, even on this
/// single-threaded test runtime, where work on the async worker would hold everything up.
#[tokio::test]
async fn a_slow_strength_estimate_holds_up_no_other_call() {
    let app = Backend::Embedded
        .app()
        .env("PASSWORD_POLICY", "nist")
        .spawn()
        .await;
    let crafted = "4@8({[<3691!|70$5+%2Qz4@8({[<36";
    let started = std::time::Instant::now();
    let (registered, (validated, validated_after)) = tokio::join!(
        async {
            // An invalid username: nothing is hashed or stored, only the policy runs.
            let r = app.register("x", crafted).await;
            (r, started.elapsed())
        },
        async {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            let v = app.validate("not-a-token").await;
            (v, started.elapsed())
        }
    );
    let (registered, register_took) = registered;
    assert_code(registered, Code::InvalidArgument);
    assert!(!validated.unwrap().valid);
    assert!(
        validated_after * 3 < register_took,
        "ValidateToken waited for the strength estimate: answered after {validated_after:?}, \
         Register took {register_took:?}"
    );
}

use std::time::Duration;

use authd::proto::auth::v1::InvalidReason;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use tonic::Code;

use crate::support::*;

on_every_backend!(
    hand_made_bad_tokens_get_their_reason,
    an_empty_or_oversized_token_is_invalid_argument,
    a_token_expires_with_its_ttl_judged_by_the_clock
);

async fn hand_made_bad_tokens_get_their_reason(backend: Backend) {
    let app = backend.app().spawn().await;
    let (_, login) = app.user_with_session("ivan").await;
    let now = unix(&app.clock);
    let good = RawClaims::good(now);

    // Tampered: payload changed, signature kept.
    let parts: Vec<&str> = login.access_token.split('.').collect();
    let payload = String::from_utf8(URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    let forged = payload.replace("\"ivan\"", "\"root\"");
    assert_ne!(forged, payload);
    let tampered = format!("{}.{}.{}", parts[0], b64(&forged), parts[2]);
    assert_eq!(app.reason(&tampered).await, InvalidReason::BadSignature);

    // Signed with another key.
    let other_key = good.sign("another-secret-0123456789abcdef01234");
    assert_eq!(app.reason(&other_key).await, InvalidReason::BadSignature);

    // alg: none, no signature.
    let none = format!(
        "{}.{}.",
        b64(r#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&good).unwrap())
    );
    assert_eq!(app.reason(&none).await, InvalidReason::Malformed);

    let wrong_iss = RawClaims {
        iss: Some("evil".into()),
        ..good.clone()
    }
    .sign(SECRET);
    assert_eq!(
        app.reason(&wrong_iss).await,
        InvalidReason::WrongIssuerOrAudience
    );

    let wrong_aud = RawClaims {
        aud: Some("billing".into()),
        ..good.clone()
    }
    .sign(SECRET);
    assert_eq!(
        app.reason(&wrong_aud).await,
        InvalidReason::WrongIssuerOrAudience
    );

    let expired = RawClaims {
        exp: Some(now - 31),
        iat: Some(now - 100),
        nbf: Some(now - 100),
        ..good.clone()
    }
    .sign(SECRET);
    assert_eq!(app.reason(&expired).await, InvalidReason::Expired);

    // Within the 30 s leeway an expired-by-a-little token still verifies (its
    // session does not exist, which is the next check).
    let just_expired = RawClaims {
        exp: Some(now - 29),
        ..good.clone()
    }
    .sign(SECRET);
    assert_eq!(
        app.reason(&just_expired).await,
        InvalidReason::SessionNotFound
    );

    let not_yet = RawClaims {
        nbf: Some(now + 600),
        ..good.clone()
    }
    .sign(SECRET);
    assert_eq!(app.reason(&not_yet).await, InvalidReason::NotYetValid);

    let no_exp = RawClaims {
        exp: None,
        ..good.clone()
    }
    .sign(SECRET);
    assert_eq!(app.reason(&no_exp).await, InvalidReason::Malformed);

    let no_sub = RawClaims {
        sub: None,
        ..good.clone()
    }
    .sign(SECRET);
    assert_eq!(app.reason(&no_sub).await, InvalidReason::Malformed);

    // Another HMAC algorithm with the right key: the algorithm is pinned.
    let hs512 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512),
        &good,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    assert_eq!(app.reason(&hs512).await, InvalidReason::Malformed);

    for garbage in [
        "abc",
        "a.b.c",
        "...",
        "eyJhbGciOiJIUzI1NiJ9.e30",
        "\u{0}\u{1}",
    ] {
        assert_eq!(
            app.reason(garbage).await,
            InvalidReason::Malformed,
            "{garbage:?}"
        );
    }

    // A well-formed, correctly signed token whose session never existed.
    assert_eq!(
        app.reason(&good.sign(SECRET)).await,
        InvalidReason::SessionNotFound
    );

    // And the real one is still fine.
    assert!(app.validate(&login.access_token).await.unwrap().valid);
}

async fn an_empty_or_oversized_token_is_invalid_argument(backend: Backend) {
    let app = backend.app().spawn().await;
    assert_code(app.validate("").await, Code::InvalidArgument);
    let s = assert_code(
        app.validate(&"a".repeat(8 * 1024 + 1)).await,
        Code::InvalidArgument,
    );
    assert!(s.message().contains("8192"), "{}", s.message());
    // 8 KiB exactly is looked at (and is garbage).
    assert_eq!(
        app.reason(&"a".repeat(8 * 1024)).await,
        InvalidReason::Malformed
    );
}

async fn a_token_expires_with_its_ttl_judged_by_the_clock(backend: Backend) {
    let app = backend
        .app()
        .envs(&[("JWT_TTL", "2h"), ("SESSION_IDLE_TIMEOUT", "1h")])
        .spawn()
        .await;
    let (_, login) = app.user_with_session("judy").await;
    assert_eq!(login.expires_in, 7200);
    // Keep the session active so only the absolute lifetime can end it.
    for _ in 0..4 {
        advance(&app, Duration::from_secs(30 * 60));
        assert!(app.validate(&login.access_token).await.unwrap().valid);
    }
    advance(&app, Duration::from_secs(29));
    assert!(
        app.validate(&login.access_token).await.unwrap().valid,
        "leeway"
    );
    advance(&app, Duration::from_secs(1));
    assert_eq!(
        app.reason(&login.access_token).await,
        InvalidReason::Expired
    );
}

fn b64(s: &str) -> String {
    URL_SAFE_NO_PAD.encode(s)
}

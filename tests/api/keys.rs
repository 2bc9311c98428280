//! Signing algorithms, key ids and rotation.

use std::time::Duration;

use authd::proto::auth::v1::InvalidReason;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::helpers::*;

pub fn key(name: &str) -> String {
    format!("{}/tests/keys/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn header(token: &str) -> serde_json::Value {
    let part = token.split('.').next().unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

#[tokio::test]
async fn every_algorithm_signs_tokens_that_carry_a_kid_and_validate() {
    for (alg, file) in [
        ("EdDSA", "ed25519.pem"),
        ("ES256", "p256.pem"),
        ("RS256", "rsa.pem"),
        ("HS256", ""),
    ] {
        let path = key(file);
        let mut settings = vec![("JWT_ALGORITHM", alg)];
        if !file.is_empty() {
            settings.push(("JWT_PRIVATE_KEY_FILE", path.as_str()));
        }
        let app = spawn_embedded_with(&settings).await;
        let (_, login) = app.user_with_session("olaf").await;
        let h = header(&login.access_token);
        assert_eq!(h["alg"], alg, "{h}");
        assert!(
            h["kid"].as_str().is_some_and(|k| !k.is_empty()),
            "{alg}: no kid"
        );
        let v = app.validate(&login.access_token).await.unwrap();
        assert!(v.valid, "{alg}: {v:?}");
    }
}

#[tokio::test]
async fn an_unknown_kid_is_a_bad_signature() {
    let app = spawn_app().await;
    let now = unix(&app.clock);
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    h.kid = Some("someone-elses-key".into());
    h.jku = Some("http://127.0.0.1:1/keys.json".into());
    let token = jsonwebtoken::encode(
        &h,
        &RawClaims::good(now),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    assert_eq!(app.reason(&token).await, InvalidReason::BadSignature);
}

#[tokio::test]
async fn an_hs256_token_signed_with_the_public_key_is_refused() {
    let app = spawn_embedded_with(&[
        ("JWT_ALGORITHM", "RS256"),
        ("JWT_PRIVATE_KEY_FILE", &key("rsa.pem")),
    ])
    .await;
    let (_, login) = app.user_with_session("pia").await;
    let kid = header(&login.access_token)["kid"]
        .as_str()
        .unwrap()
        .to_owned();
    let claims: serde_json::Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(login.access_token.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    // The classic confusion: the verifier's public key used as an HMAC secret.
    let public = std::fs::read(key("rsa-public.pem")).unwrap();
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    h.kid = Some(kid);
    let forged = jsonwebtoken::encode(
        &h,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(&public),
    )
    .unwrap();
    let v = app.validate(&forged).await.unwrap();
    assert!(!v.valid);
    assert_eq!(v.reason(), InvalidReason::Malformed);
    // The genuine token is still fine.
    assert!(app.validate(&login.access_token).await.unwrap().valid);
}

#[tokio::test]
async fn after_rotation_tokens_of_the_retired_key_stay_valid_until_they_expire() {
    let old = spawn_app_with(&[
        ("JWT_ALGORITHM", "EdDSA"),
        ("JWT_PRIVATE_KEY_FILE", &key("ed25519-old.pem")),
        ("JWT_TTL", "1h"),
    ])
    .await;
    let (_, before) = old.user_with_session("quin").await;
    let old_kid = header(&before.access_token)["kid"]
        .as_str()
        .unwrap()
        .to_owned();

    // The next deployment: a new signing key, the old one retired now.
    let retired = format!(
        "{}@{}",
        key("ed25519-old-public.pem"),
        humantime::format_rfc3339_seconds(std::time::SystemTime::now())
    );
    let new = spawn_app_with(&[
        ("DATABASE_URL", &old.db_url),
        ("REDIS_KEY_PREFIX", &old.key_prefix),
        ("JWT_ALGORITHM", "EdDSA"),
        ("JWT_PRIVATE_KEY_FILE", &key("ed25519.pem")),
        ("JWT_RETIRED_KEYS", &retired),
        ("JWT_TTL", "1h"),
    ])
    .await;
    assert!(new.validate(&before.access_token).await.unwrap().valid);
    let after = new.login("quin", PASSWORD).await.unwrap();
    let new_kid = header(&after.access_token)["kid"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(new_kid, old_kid);
    assert!(new.validate(&after.access_token).await.unwrap().valid);
    // The old instance never knew the new key.
    assert_eq!(
        old.reason(&after.access_token).await,
        InvalidReason::BadSignature
    );

    // Past the old tokens' lifetime the retired key drops out.
    new.clock.advance(Duration::from_secs(3600 + 31));
    assert_eq!(
        new.reason(&before.access_token).await,
        InvalidReason::BadSignature
    );
}

//! Signing algorithms, key ids and rotation.

use std::time::Duration;

use authd::proto::auth::v1::InvalidReason;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::support::*;

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
        let app = Backend::Embedded.app().envs(&settings).spawn().await;
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
    let app = TestApp::builder().spawn().await;
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
    let app = Backend::Embedded
        .app()
        .envs(&[
            ("JWT_ALGORITHM", "RS256"),
            ("JWT_PRIVATE_KEY_FILE", &key("rsa.pem")),
        ])
        .spawn()
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

/// The old deployment (signing with the old Ed25519 key, 1 h tokens) with a user logged
/// in, and the next one on the same stores: a new signing key, the old one retired now.
async fn rotation(username: &str) -> (TestApp, TestApp, authd::proto::auth::v1::LoginResponse) {
    let old = TestApp::builder()
        .envs(&[
            ("JWT_ALGORITHM", "EdDSA"),
            ("JWT_PRIVATE_KEY_FILE", &key("ed25519-old.pem")),
            ("JWT_TTL", "1h"),
        ])
        .spawn()
        .await;
    let (_, before) = old.user_with_session(username).await;
    let retired = format!(
        "{}@{}",
        key("ed25519-old-public.pem"),
        humantime::format_rfc3339_seconds(authd::clock::Clock::now(&authd::clock::SystemClock))
    );
    let new = TestApp::builder()
        .envs(&[
            ("DATABASE_URL", &old.db_url),
            ("REDIS_KEY_PREFIX", &old.key_prefix),
            ("JWT_ALGORITHM", "EdDSA"),
            ("JWT_PRIVATE_KEY_FILE", &key("ed25519.pem")),
            ("JWT_RETIRED_KEYS", &retired),
            ("JWT_TTL", "1h"),
        ])
        .spawn()
        .await;
    (old, new, before)
}

#[tokio::test]
async fn after_rotation_tokens_of_the_retired_key_stay_valid_until_they_expire() {
    let (old, new, before) = rotation("quin").await;
    let old_kid = header(&before.access_token)["kid"]
        .as_str()
        .unwrap()
        .to_owned();
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

/// Runs the PyJWT script (a JWT library no one on this project wrote) against authd's
/// JWKS URL; its output, one JSON line per token. (Async: authd serves the JWKS from
/// this test's runtime while the script runs.)
async fn verify_with_pyjwt(jwks_url: &str, tokens: &[&str]) -> Vec<serde_json::Value> {
    let script = format!(
        "{}/tests/jwks/verify_with_pyjwt.py",
        env!("CARGO_MANIFEST_DIR")
    );
    let python = tokio::task::spawn_blocking(|| {
        crate::support::python::python_with(&["pyjwt>=2.8,<3", "cryptography>=42"])
    })
    .await
    .unwrap();
    let out = tokio::process::Command::new(python)
        .arg(script)
        .args([jwks_url, "authd", "authd"])
        .args(tokens)
        .output()
        .await
        .expect("the test environment's python");
    assert!(
        out.status.success(),
        "PyJWT refused a token: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn tokens_of_every_asymmetric_algorithm_verify_with_pyjwt_against_the_jwks_url() {
    for (alg, file, kty) in [
        ("EdDSA", "ed25519.pem", "OKP"),
        ("ES256", "p256.pem", "EC"),
        ("RS256", "rsa.pem", "RSA"),
    ] {
        let app = Backend::Embedded
            .app()
            .envs(&[("JWT_ALGORITHM", alg), ("JWT_PRIVATE_KEY_FILE", &key(file))])
            .spawn()
            .await;
        let (user, login) = app.user_with_session("rafa").await;

        let (status, body) = app.http_get("/.well-known/jwks.json").await;
        assert_eq!(status, 200);
        let jwks: serde_json::Value = serde_json::from_str(&body).unwrap();
        let keys = jwks["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 1, "{body}");
        let k = &keys[0];
        assert_eq!(k["kty"], kty, "{body}");
        assert_eq!(k["alg"], alg, "{body}");
        assert_eq!(k["use"], "sig", "{body}");
        assert_eq!(k["kid"], header(&login.access_token)["kid"], "{body}");
        assert!(
            k.get("d").is_none() && k.get("k").is_none(),
            "private material: {body}"
        );

        let url = format!("http://{}/.well-known/jwks.json", app.http_addr.unwrap());
        let verified = verify_with_pyjwt(&url, &[&login.access_token]).await;
        assert_eq!(verified[0]["sub"], user.user_id.as_str(), "{alg}");
        assert_eq!(verified[0]["alg"], alg);

        let (status, body) = app.http_get("/.well-known/openid-configuration").await;
        assert_eq!(status, 200);
        let oidc: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(oidc["issuer"], "authd");
        assert!(
            oidc["jwks_uri"]
                .as_str()
                .unwrap()
                .ends_with("/.well-known/jwks.json")
        );
    }
}

#[tokio::test]
async fn hs256_keys_are_never_published() {
    let app = TestApp::builder().spawn().await;
    let (status, body) = app.http_get("/.well-known/jwks.json").await;
    assert_eq!(status, 200);
    assert_eq!(body, r#"{"keys":[]}"#);
    assert!(!body.contains(SECRET));
}

#[tokio::test]
async fn after_rotation_the_jwks_serves_both_keys_and_pyjwt_verifies_old_and_new_tokens() {
    let (_old, new, before) = rotation("sven").await;
    let after = new.login("sven", PASSWORD).await.unwrap();
    let (_, body) = new.http_get("/.well-known/jwks.json").await;
    let jwks: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 2, "{body}");
    let url = format!("http://{}/.well-known/jwks.json", new.http_addr.unwrap());
    let verified = verify_with_pyjwt(&url, &[&before.access_token, &after.access_token]).await;
    assert_eq!(verified.len(), 2);
    assert_ne!(verified[0]["kid"], verified[1]["kid"]);
    // Once the old tokens have expired, the retired key leaves the document.
    new.clock.advance(Duration::from_secs(3600 + 31));
    let (_, body) = new.http_get("/.well-known/jwks.json").await;
    let jwks: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 1, "{body}");
}

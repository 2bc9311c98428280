//! Tokens that ask the verifier for a JWS extension authd does not implement (RFC 7515
//! §4.1.11 `crit`, RFC 7797 `b64`), correctly signed for a live session: refused as
//! malformed by ValidateToken and by Envoy's Check.

use authd::proto::auth::v1::InvalidReason;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

use crate::support::*;

/// The claims of `token`, signed again with the test secret under a header `edit`ed.
fn resigned(token: &str, edit: impl Fn(&mut Header)) -> String {
    let payload = token.split('.').nth(1).unwrap();
    let claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    let original = jsonwebtoken::decode_header(token).unwrap();
    let mut header = Header::new(Algorithm::HS256);
    header.kid = original.kid;
    edit(&mut header);
    jsonwebtoken::encode(
        &header,
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

on_every_backend!(a_token_asking_for_an_unknown_extension_is_malformed_everywhere);

async fn a_token_asking_for_an_unknown_extension_is_malformed_everywhere(backend: Backend) {
    let app = backend.app().spawn().await;
    let (_, login) = app.user_with_session("crit").await;
    let token = &login.access_token;
    // Re-signed with no extension, the same claims are good: only the header differs.
    assert!(app.validate(&resigned(token, |_| {})).await.unwrap().valid);

    let forged = [
        resigned(token, |h| {
            h.crit = Some(vec!["x-unknown".into()]);
            h.extras.insert("x-unknown", 1);
        }),
        resigned(token, |h| {
            h.crit = Some(vec!["b64".into()]);
            h.extras.insert("b64", false);
        }),
        resigned(token, |h| h.extras.insert("b64", false)),
    ];
    for forged in &forged {
        // Twice: refused before anything is remembered about it.
        for _ in 0..2 {
            let answer = app.validate(forged).await.unwrap();
            assert!(!answer.valid, "{forged} is valid");
            assert_eq!(answer.reason(), InvalidReason::Malformed, "{forged}");
        }
        let (status, challenge, _) =
            denied(&check(&app, &[("authorization", &format!("Bearer {forged}"))]).await);
        assert_eq!(status, 401);
        assert!(challenge.contains("malformed"), "{challenge}");
    }
    // The real token was never affected.
    assert!(app.validate(token).await.unwrap().valid);
}

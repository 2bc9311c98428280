//! Envoy's Check, over real gRPC.

use envoy_types::ext_authz::v3::pb::HttpResponse;

use crate::support::*;

on_every_backend!(
    check_allows_a_valid_token_with_headers_for_the_upstream,
    check_denies_missing_malformed_expired_and_revoked_tokens_with_401
);

async fn check_allows_a_valid_token_with_headers_for_the_upstream(backend: Backend) {
    let app = backend.app().spawn().await;
    let (user, login) = app.user_with_session("lena").await;
    let bearer = format!("Bearer {}", login.access_token);
    let r = check(
        &app,
        &[("authorization", &bearer), ("x-auth-user-id", "spoofed")],
    )
    .await;
    let (set, removed) = allowed(&r);
    assert_eq!(set["x-auth-user-id"], user.user_id);
    assert_eq!(set["x-auth-username"], "lena");
    assert_eq!(set["x-auth-session-id"], login.session_id);
    assert!(!set.contains_key("x-auth-degraded"));
    assert!(
        removed.contains(&"x-auth-degraded".to_owned()),
        "{removed:?}"
    );
    // Kept by default.
    assert!(!removed.contains(&"authorization".to_owned()));
    // Overwrites a client's own x-auth-* header rather than appending to it.
    let ok = match &r.http_response {
        Some(HttpResponse::OkResponse(ok)) => ok,
        _ => unreachable!(),
    };
    assert!(
        ok.headers.iter().all(|h| h.append_action == 2),
        "{:?}",
        ok.headers
    );
}

async fn check_denies_missing_malformed_expired_and_revoked_tokens_with_401(backend: Backend) {
    let app = backend.app().spawn().await;
    let (_, login) = app.user_with_session("mona").await;

    let (status, challenge, body) = denied(&check(&app, &[]).await);
    assert_eq!(status, 401);
    assert_eq!(challenge, r#"Bearer realm="authd""#);
    assert!(body.contains("missing"));

    let (status, challenge, _) = denied(&check(&app, &[("authorization", "Bearer garbage")]).await);
    assert_eq!(status, 401);
    assert!(
        challenge.contains(r#"error="invalid_token""#),
        "{challenge}"
    );
    assert!(challenge.contains("malformed"), "{challenge}");

    let now = unix(&app.clock);
    let expired = RawClaims {
        exp: Some(now - 120),
        iat: Some(now - 600),
        nbf: Some(now - 600),
        ..RawClaims::good(now)
    }
    .sign(SECRET);
    let (_, challenge, _) =
        denied(&check(&app, &[("authorization", &format!("Bearer {expired}"))]).await);
    assert!(challenge.contains("expired"), "{challenge}");

    app.logout(&login.access_token).await.unwrap();
    let (status, challenge, body) = denied(
        &check(
            &app,
            &[("authorization", &format!("Bearer {}", login.access_token))],
        )
        .await,
    );
    assert_eq!(status, 401);
    assert!(challenge.contains("revoked"), "{challenge}");
    assert!(body.contains("revoked"));
}

#[tokio::test]
async fn check_can_strip_the_bearer_and_says_when_revocation_was_not_checked() {
    let mut redis = OwnRedis::start().await;
    let url = redis.url();
    let app = TestApp::builder()
        .envs(&[
            ("REDIS_URL", &url),
            ("EXT_AUTHZ_STRIP_AUTHORIZATION", "true"),
        ])
        .spawn()
        .await;
    let (_, login) = app.user_with_session("nils").await;
    let bearer = format!("Bearer {}", login.access_token);
    let (_, removed) = allowed(&check(&app, &[("authorization", &bearer)]).await);
    assert!(removed.contains(&"authorization".to_owned()));

    redis.kill();
    let (set, _) = allowed(&check(&app, &[("authorization", &bearer)]).await);
    assert_eq!(set["x-auth-degraded"], "revocation-unchecked");
}

/// An operator debugging a denial with nothing but reflection (what `grpcurl describe`
/// and `grpcurl -d '{…}' … Authorization/Check` do): a reflection client no one on this
/// project wrote (Python's grpcio-reflection) resolves Check, every file it imports, and
/// calls it from JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_alone_is_enough_to_call_check() {
    let app = TestApp::builder().spawn().await;
    let (_, login) = app.user_with_session("rhea").await;
    let python = tokio::task::spawn_blocking(|| {
        crate::support::python::python_with(&[
            "grpcio>=1.60",
            "grpcio-reflection>=1.60",
            "protobuf>=4.25",
        ])
    })
    .await
    .unwrap();
    let script = format!(
        "{}/tests/reflection/call_through_reflection.py",
        env!("CARGO_MANIFEST_DIR")
    );
    let call = |token: String| {
        let (python, script, addr) = (python.clone(), script.clone(), app.addr.to_string());
        async move {
            let request = serde_json::json!({
                "attributes": {"request": {"http": {
                    "method": "GET",
                    "path": "/orders",
                    "headers": {"authorization": format!("Bearer {token}")}
                }}}
            });
            let out = tokio::process::Command::new(python)
                .arg(script)
                .args([&addr, "envoy.service.auth.v3.Authorization", "Check"])
                .arg(request.to_string())
                .output()
                .await
                .unwrap();
            assert!(
                out.status.success(),
                "the reflection client failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
        }
    };
    let ok = call(login.access_token.clone()).await;
    assert_eq!(ok["status"].get("code"), None, "allowed is code 0: {ok}");
    assert!(ok["okResponse"].is_object(), "{ok}");
    let denied = call("garbage".into()).await;
    assert_eq!(denied["status"]["code"], 16, "{denied}");
    assert!(denied["deniedResponse"].is_object(), "{denied}");
}

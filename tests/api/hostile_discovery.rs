//! `/.well-known/openid-configuration` under a forged `Host` and `X-Forwarded-Proto`
//! from a peer that is no proxy of ours: the document it serves for everyone to cache must
//! not send verifiers to the attacker's keys.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

/// `GET /.well-known/openid-configuration` from 127.0.0.1 with `host` and
/// `X-Forwarded-Proto: forwarded_proto`: `jwks_uri` and `cache-control`.
async fn discover(app: &TestApp, host: &str, forwarded_proto: &str) -> (String, String) {
    let mut stream = tokio::net::TcpStream::connect(app.http_addr.unwrap())
        .await
        .unwrap();
    let request = format!(
        "GET /.well-known/openid-configuration HTTP/1.1\r\nHost: {host}\r\n\
         X-Forwarded-Proto: {forwarded_proto}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let cache_control = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("cache-control: ")
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let document: serde_json::Value = serde_json::from_str(body).unwrap();
    (
        document["jwks_uri"].as_str().unwrap().to_owned(),
        cache_control,
    )
}

#[tokio::test]
async fn with_a_public_url_a_forged_host_and_proto_change_nothing() {
    let app = Backend::Embedded
        .app()
        .env("PUBLIC_URL", "https://auth.example.com/")
        .spawn()
        .await;
    let (jwks_uri, cache_control) = discover(&app, "evil.example", "http").await;
    assert_eq!(jwks_uri, "https://auth.example.com/.well-known/jwks.json");
    assert!(cache_control.contains("public"), "{cache_control}");
}

#[tokio::test]
async fn an_issuer_that_is_a_url_is_the_public_url() {
    let app = Backend::Embedded
        .app()
        .env("JWT_ISSUER", "https://id.example.com")
        .spawn()
        .await;
    let (jwks_uri, _) = discover(&app, "evil.example", "http").await;
    assert_eq!(jwks_uri, "https://id.example.com/.well-known/jwks.json");
}

#[tokio::test]
async fn without_a_public_url_the_answer_follows_the_request_and_is_not_cacheable() {
    // 127.0.0.1 is not a trusted proxy: its X-Forwarded-Proto is ignored.
    let app = Backend::Embedded.app().spawn().await;
    let (jwks_uri, cache_control) = discover(&app, "evil.example", "https").await;
    assert_eq!(jwks_uri, "http://evil.example/.well-known/jwks.json");
    assert!(
        !cache_control.contains("public"),
        "a shared cache may keep it: {cache_control}"
    );
    assert!(cache_control.contains("no-store"), "{cache_control}");

    // From a trusted proxy it counts.
    let app = Backend::Embedded
        .app()
        .env("TRUSTED_PROXIES", "127.0.0.1")
        .spawn()
        .await;
    let (jwks_uri, _) = discover(&app, "auth.example.com", "https").await;
    assert_eq!(jwks_uri, "https://auth.example.com/.well-known/jwks.json");
}

//! TLS and mTLS on the gRPC listener, with certificates made by rcgen for each test.

use std::time::Duration;

use tonic_health::pb::health_check_response::ServingStatus;

use crate::support::tls::*;
use crate::support::*;

#[tokio::test]
async fn tls_serves_clients_that_trust_its_ca_and_refuses_plaintext() {
    let ca = Ca::new("authd test CA");
    let dir = PemDir::new();
    let (cert, key) = dir.server(&ca.server());
    let app = Backend::Embedded
        .app()
        .envs(&[("TLS_CERT_FILE", &cert), ("TLS_KEY_FILE", &key)])
        .spawn()
        .await;

    assert_eq!(
        health_over_tls(app.addr, &ca.pem(), None).await,
        Ok(ServingStatus::Serving)
    );
    let plaintext = app.register("plain", PASSWORD).await;
    assert!(plaintext.is_err(), "served over plaintext: {plaintext:?}");
    // The container health check cannot present a client certificate, so under TLS it
    // asks the HTTP listener instead.
    let env = [
        ("TLS_CERT_FILE", cert.clone()),
        ("TLS_KEY_FILE", key.clone()),
        ("GRPC_ADDR", app.addr.to_string()),
        ("HTTP_ADDR", app.http_addr.unwrap().to_string()),
    ]
    .map(|(k, v)| (k.to_owned(), v));
    let (code, err) = crate::support::binary::run_authd(&["healthcheck"], env.to_vec()).await;
    assert_eq!(code, 0, "{err}");
    let stranger = Ca::new("someone else");
    assert!(
        health_over_tls(app.addr, &stranger.pem(), None)
            .await
            .is_err(),
        "a client that does not trust the server's CA got an answer"
    );
}

#[tokio::test]
async fn mtls_refuses_clients_without_a_certificate_from_the_client_ca() {
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let dir = PemDir::new();
    let (cert, key) = dir.server(&server_ca.server());
    let clients = dir.write("clients.pem", &client_ca.pem());
    let app = Backend::Embedded
        .app()
        .envs(&[
            ("TLS_CERT_FILE", &cert),
            ("TLS_KEY_FILE", &key),
            ("TLS_CLIENT_CA_FILE", &clients),
        ])
        .spawn()
        .await;

    let no_certificate = health_over_tls(app.addr, &server_ca.pem(), None).await;
    assert!(no_certificate.is_err(), "{no_certificate:?}");
    let wrong_ca = server_ca.client("impostor");
    let impostor = health_over_tls(app.addr, &server_ca.pem(), Some(&wrong_ca)).await;
    assert!(impostor.is_err(), "{impostor:?}");
    let good = client_ca.client("gateway");
    assert_eq!(
        health_over_tls(app.addr, &server_ca.pem(), Some(&good)).await,
        Ok(ServingStatus::Serving)
    );
}

#[tokio::test]
async fn a_rotated_certificate_is_served_without_a_restart() {
    let old_ca = Ca::new("old CA");
    let new_ca = Ca::new("new CA");
    let dir = PemDir::new();
    let (cert, key) = dir.server(&old_ca.server());
    let app = Backend::Embedded
        .app()
        .envs(&[
            ("TLS_CERT_FILE", &cert),
            ("TLS_KEY_FILE", &key),
            ("TLS_RELOAD_INTERVAL", "50ms"),
        ])
        .spawn()
        .await;
    assert!(
        health_over_tls(app.addr, &new_ca.pem(), None)
            .await
            .is_err()
    );

    // A broken file is not taken: the old certificate stays in force.
    let errors = |page: &str| metric(page, "authd_tls_reloads_total", &[("outcome", "error")]);
    let before = errors(&app.scrape().await);
    dir.write("cert.pem", "not a certificate");
    let refused = eventually(Duration::from_secs(5), || async {
        errors(&app.scrape().await) > before
    })
    .await;
    assert!(refused, "the broken certificate was not tried");
    assert_eq!(
        health_over_tls(app.addr, &old_ca.pem(), None).await,
        Ok(ServingStatus::Serving)
    );

    dir.server(&new_ca.server());
    let rotated = eventually(Duration::from_secs(5), || async {
        health_over_tls(app.addr, &new_ca.pem(), None).await == Ok(ServingStatus::Serving)
    })
    .await;
    assert!(rotated, "the new certificate was not served");
    assert!(dir.path().exists());
}

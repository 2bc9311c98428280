//! TLS and mTLS on the gRPC listener, with certificates made by rcgen for each test.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::helpers::*;

/// A certificate authority for one test.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A PEM certificate and its PEM key.
pub struct Leaf {
    pub cert: String,
    pub key: String,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        Self {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `localhost` and 127.0.0.1.
    pub fn server(&self) -> Leaf {
        self.leaf(
            vec!["localhost".into(), "127.0.0.1".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate.
    pub fn client(&self, name: &str) -> Leaf {
        self.leaf(vec![name.into()], ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn leaf(&self, names: Vec<String>, usage: ExtendedKeyUsagePurpose) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names).unwrap();
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// A folder for one test's PEM files.
pub struct PemDir(pub PathBuf);

impl Default for PemDir {
    fn default() -> Self {
        Self::new()
    }
}

impl PemDir {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("authd-tls-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// Writes `contents` to `name` at once (a rename), as a secret mount would.
    pub fn write(&self, name: &str, contents: &str) -> String {
        let path = self.0.join(name);
        let tmp = self.0.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, contents).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path.to_str().unwrap().to_owned()
    }

    /// Writes a server certificate and key as `cert.pem` and `key.pem`.
    pub fn server(&self, leaf: &Leaf) -> (String, String) {
        (
            self.write("cert.pem", &leaf.cert),
            self.write("key.pem", &leaf.key),
        )
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PemDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Asks health over TLS on a new connection, trusting `ca`, presenting `identity`.
pub async fn health_over_tls(
    addr: std::net::SocketAddr,
    ca: &str,
    identity: Option<&Leaf>,
) -> Result<ServingStatus, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some(leaf) = identity {
        tls = tls.identity(Identity::from_pem(&leaf.cert, &leaf.key));
    }
    let channel = Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .map_err(|s| format!("call: {s:?}"))?;
    Ok(answer.into_inner().status())
}

#[tokio::test]
async fn tls_serves_clients_that_trust_its_ca_and_refuses_plaintext() {
    let ca = Ca::new("authd test CA");
    let dir = PemDir::new();
    let (cert, key) = dir.server(&ca.server());
    let app = spawn_embedded_with(&[("TLS_CERT_FILE", &cert), ("TLS_KEY_FILE", &key)]).await;

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
    let (code, err) = crate::binary::run_authd(&["healthcheck"], env.to_vec()).await;
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
    let app = spawn_embedded_with(&[
        ("TLS_CERT_FILE", &cert),
        ("TLS_KEY_FILE", &key),
        ("TLS_CLIENT_CA_FILE", &clients),
    ])
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
    let app = spawn_embedded_with(&[
        ("TLS_CERT_FILE", &cert),
        ("TLS_KEY_FILE", &key),
        ("TLS_RELOAD_INTERVAL", "50ms"),
    ])
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

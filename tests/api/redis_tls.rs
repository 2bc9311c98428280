//! TLS to Redis (`rediss://`, `rediss+cluster://`): a Redis of the test's own that
//! speaks TLS with certificates from a test CA and, as Redis does by default once TLS is
//! on, demands a client certificate. authd trusts only the CA it is given
//! (`REDIS_TLS_CA_FILE`) and shows the certificate it is given (`REDIS_TLS_CERT_FILE`,
//! `REDIS_TLS_KEY_FILE`).

use std::time::Duration;

use authd::proto::auth::v1::InvalidReason;
use tonic::Code;

use crate::support::tls::{Ca, PemDir};
use crate::support::*;

/// A test CA's files: the CA, a node certificate and a client certificate.
struct Files {
    _dir: PemDir,
    ca: String,
    node_cert: String,
    node_key: String,
    client_cert: String,
    client_key: String,
}

fn files(ca: &Ca) -> Files {
    let dir = PemDir::new();
    let node = ca.redis_node();
    let client = ca.client("authd");
    Files {
        ca: dir.write("ca.pem", &ca.pem()),
        node_cert: dir.write("node.pem", &node.cert),
        node_key: dir.write("node-key.pem", &node.key),
        client_cert: dir.write("client.pem", &client.cert),
        client_key: dir.write("client-key.pem", &client.key),
        _dir: dir,
    }
}

/// An app on the Redis at `url`, trusting the test CA and showing its client certificate;
/// closed mode, so a Redis it cannot reach shows as UNAVAILABLE.
async fn app_over(url: &str, f: &Files) -> TestApp {
    TestApp::builder()
        .envs(&[
            ("REDIS_URL", url),
            ("REDIS_TLS_CA_FILE", &f.ca),
            ("REDIS_TLS_CERT_FILE", &f.client_cert),
            ("REDIS_TLS_KEY_FILE", &f.client_key),
            ("REDIS_FAILURE_MODE", "closed"),
            // A TLS handshake (and a cluster's slot discovery) on a loaded test machine
            // can take longer than the 250 ms default; these tests are about TLS.
            ("REDIS_CONNECT_TIMEOUT", "3s"),
            ("REDIS_COMMAND_TIMEOUT", "3s"),
        ])
        .spawn()
        .await
}

/// Login, a Logout, and the logged-out token refused with its revocation checked: every
/// kind of Redis command went over the TLS connection.
async fn works_over(app: &TestApp) {
    app.register("tess", PASSWORD).await.unwrap();
    // The first connection is opened by the first call that needs Redis.
    let reached = eventually(Duration::from_secs(20), || async {
        app.login("tess", PASSWORD).await.is_ok()
    })
    .await;
    assert!(reached, "Redis over TLS never answered");
    let login = app.login("tess", PASSWORD).await.unwrap();
    let v = app.validate(&login.access_token).await.unwrap();
    assert!(v.valid && v.revocation_checked, "{v:?}");
    app.logout(&login.access_token).await.unwrap();
    assert_eq!(
        app.reason(&login.access_token).await,
        InvalidReason::Revoked
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_redis_over_tls_with_a_client_certificate() {
    let ca = Ca::new("redis test CA");
    let f = files(&ca);
    let dir = scratch_dir("redis-tls");
    let (node, tls_port) = tokio::task::block_in_place(|| {
        Node::data_with_tls(&dir, (&f.node_cert, &f.node_key, &f.ca), &[])
    });
    let url = format!("rediss://localhost:{tls_port}/");
    let app = app_over(&url, &f).await;
    works_over(&app).await;
    // The sessions are on the TLS node, not on the shared Redis.
    let keys: Vec<String> = tokio::task::block_in_place(|| {
        redis::cmd("KEYS")
            .arg(format!("{}*", app.key_prefix))
            .query(&mut node.sync())
            .unwrap()
    });
    assert!(!keys.is_empty(), "nothing written to the TLS node");
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A Redis whose certificate chains to a CA authd was not given is not trusted (the
/// system's roots do not hold the test CA), and a Redis that demands a client
/// certificate refuses an authd that has none: either way nothing is written and the
/// calls that need Redis answer UNAVAILABLE, never success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_redis_or_a_missing_client_certificate_is_unavailable() {
    let ca = Ca::new("redis test CA");
    let f = files(&ca);
    let other = Ca::new("some other CA");
    let other_files = files(&other);
    let dir = scratch_dir("redis-tls");
    let (node, tls_port) = tokio::task::block_in_place(|| {
        Node::data_with_tls(&dir, (&f.node_cert, &f.node_key, &f.ca), &[])
    });
    let url = format!("rediss://localhost:{tls_port}/");
    let cases: [(&str, Vec<(&str, &str)>); 3] = [
        (
            "the system's roots",
            vec![
                ("REDIS_TLS_CERT_FILE", &f.client_cert),
                ("REDIS_TLS_KEY_FILE", &f.client_key),
            ],
        ),
        (
            "another CA",
            vec![
                ("REDIS_TLS_CA_FILE", &other_files.ca),
                ("REDIS_TLS_CERT_FILE", &f.client_cert),
                ("REDIS_TLS_KEY_FILE", &f.client_key),
            ],
        ),
        ("no client certificate", vec![("REDIS_TLS_CA_FILE", &f.ca)]),
    ];
    for (what, tls) in cases {
        let mut env = vec![
            ("REDIS_URL", url.as_str()),
            ("REDIS_FAILURE_MODE", "closed"),
        ];
        env.extend(tls);
        let app = TestApp::builder().envs(&env).spawn().await;
        app.register("tina", PASSWORD).await.unwrap();
        let status = app.login("tina", PASSWORD).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{what}: {status:?}");
        assert!(
            !status.message().contains("certificate"),
            "{what}: the TLS failure leaks to the caller: {status:?}"
        );
    }
    let keys: Vec<String> = tokio::task::block_in_place(|| {
        redis::cmd("KEYS").arg("*").query(&mut node.sync()).unwrap()
    });
    assert!(keys.is_empty(), "written without trust: {keys:?}");
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_over_tls() {
    let ca = Ca::new("redis test CA");
    let f = files(&ca);
    let dir = scratch_dir("redis-tls-cluster");
    let nodes: Vec<(Node, u16)> = tokio::task::block_in_place(|| {
        (0..3)
            .map(|_| {
                Node::data_with_tls(
                    &dir,
                    (&f.node_cert, &f.node_key, &f.ca),
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-node-timeout",
                        "2000",
                        "--tls-cluster",
                        "yes",
                        "--tls-replication",
                        "yes",
                    ],
                )
            })
            .collect()
    });
    let created = tokio::task::block_in_place(|| {
        std::process::Command::new("redis-cli")
            .args(["--tls", "--cacert", &f.ca, "--cert", &f.client_cert])
            .args(["--key", &f.client_key, "--cluster", "create"])
            .args(nodes.iter().map(|(_, port)| format!("127.0.0.1:{port}")))
            .args(["--cluster-yes"])
            .output()
            .unwrap()
    });
    assert!(
        created.status.success(),
        "redis-cli --cluster create: {}",
        String::from_utf8_lossy(&created.stderr)
    );
    let ok = eventually(Duration::from_secs(30), || async {
        tokio::task::block_in_place(|| {
            nodes.iter().all(|(n, _)| {
                redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query::<String>(&mut n.sync())
                    .is_ok_and(|i| i.contains("cluster_state:ok"))
            })
        })
    })
    .await;
    assert!(ok, "the TLS cluster did not become ok");
    let seeds = nodes
        .iter()
        .map(|(_, port)| format!("localhost:{port}"))
        .collect::<Vec<_>>()
        .join(",");
    let url = format!("rediss+cluster://{seeds}/");
    let app = app_over(&url, &f).await;
    works_over(&app).await;
    drop(nodes);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_primary_over_tls() {
    use std::io::Write;
    let ca = Ca::new("redis test CA");
    let f = files(&ca);
    let dir = scratch_dir("redis-tls-sentinel");
    let tls = (f.node_cert.as_str(), f.node_key.as_str(), f.ca.as_str());
    let (primary, primary_tls) = tokio::task::block_in_place(|| {
        Node::data_with_tls(&dir, tls, &["--tls-replication", "yes"])
    });
    let primary_tls_port = primary_tls.to_string();
    let (replica, _) = tokio::task::block_in_place(|| {
        Node::data_with_tls(
            &dir,
            tls,
            &[
                "--tls-replication",
                "yes",
                "--replicaof",
                "127.0.0.1",
                &primary_tls_port,
            ],
        )
    });
    let mut sentinel_ports = Vec::new();
    let sentinels: Vec<Node> = tokio::task::block_in_place(|| {
        (0..3)
            .map(|i| {
                let (port, tls_port) = (free_port(), free_port());
                sentinel_ports.push(tls_port);
                let conf = dir.join(format!("sentinel-{i}.conf"));
                let mut file = std::fs::File::create(&conf).unwrap();
                writeln!(
                    file,
                    "port {port}\nbind 127.0.0.1\ndir {}\ntls-port {tls_port}\n\
                     tls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\n\
                     tls-replication yes\n\
                     sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {primary_tls} 2\n\
                     sentinel down-after-milliseconds {SENTINEL_MASTER} 1000",
                    dir.display(),
                    f.node_cert,
                    f.node_key,
                    f.ca
                )
                .unwrap();
                Node::sentinel(port, &conf)
            })
            .collect()
    });
    let hosts = sentinel_ports
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let url = format!("rediss+sentinel://{hosts}/{SENTINEL_MASTER}");
    let app = app_over(&url, &f).await;
    works_over(&app).await;
    let keys: Vec<String> = tokio::task::block_in_place(|| {
        redis::cmd("KEYS")
            .arg(format!("{}*", app.key_prefix))
            .query(&mut primary.sync())
            .unwrap()
    });
    assert!(
        !keys.is_empty(),
        "nothing written to the primary the sentinels name"
    );
    drop((sentinels, replica, primary));
    let _ = std::fs::remove_dir_all(&dir);
}

//! The built `authd` binary: start-up errors, SIGTERM, and what it writes to its log.

use std::process::Command;
use std::time::Duration;

use authd::proto::auth::v1 as pb;
use authd::proto::auth::v1::auth_service_client::AuthServiceClient;

use crate::support::binary::*;
use crate::support::*;

/// Runs the binary with exactly `env`, in an empty directory (no `.env` to pick up),
/// and waits for it to exit.
fn run_with_env(env: &[(&str, &str)]) -> (i32, String) {
    run_authd_blocking(&[], owned(env))
}

#[track_caller]
fn assert_one_clear_line(code: i32, stderr: &str, mentions: &str) {
    assert_ne!(code, 0, "exited 0: {stderr}");
    let lines: Vec<_> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "not one line: {stderr:?}");
    assert!(
        lines[0].contains(mentions),
        "{mentions} not named: {stderr:?}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.contains("RUST_BACKTRACE"), "{stderr}");
}

#[test]
fn a_missing_or_short_secret_stops_start_up_with_one_line() {
    // With MySQL or Redis configured the secret is required…
    let (code, err) = run_with_env(&[("DB_HOST", "127.0.0.1")]);
    assert_one_clear_line(code, &err, "JWT_SECRET");
    let (code, err) = run_with_env(&[("REDIS_ADDR", "127.0.0.1:6379")]);
    assert_one_clear_line(code, &err, "JWT_SECRET");
    // …and a short one is refused in every mode.
    let (code, err) = run_with_env(&[("JWT_SECRET", "too-short")]);
    assert_one_clear_line(code, &err, "JWT_SECRET");
    assert!(!err.contains("too-short"), "the secret was printed: {err}");
}

#[test]
fn an_unparsable_duration_stops_start_up_with_one_line() {
    let (code, err) = run_with_env(&[("JWT_SECRET", SECRET), ("SESSION_IDLE_TIMEOUT", "an hour")]);
    assert_one_clear_line(code, &err, "SESSION_IDLE_TIMEOUT");
    let (code, err) = run_with_env(&[("JWT_SECRET", SECRET), ("JWT_TTL", "24")]);
    assert_one_clear_line(code, &err, "JWT_TTL");
}

#[test]
fn an_unreachable_database_stops_start_up_with_one_line() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let port = port.to_string();
    let (code, err) = run_with_env(&[
        ("JWT_SECRET", SECRET),
        ("DB_HOST", "127.0.0.1"),
        ("DB_PORT", &port),
        ("DB_PASS", "db-password-never-printed"),
    ]);
    assert_one_clear_line(code, &err, "database");
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(!err.contains("db-password-never-printed"), "{err}");
}

#[tokio::test]
async fn sigterm_finishes_in_flight_calls_exits_0_and_the_log_holds_no_secret() {
    let Running {
        mut child,
        lines: lines_rx,
        mut log,
        grpc: addr,
        db_name,
        ..
    } = spawn_logging(&[
        ("BCRYPT_COST", "12"),
        ("LOG_FORMAT", "json"),
        ("RUST_LOG", "debug"),
    ]);

    let mut client = AuthServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    register_on(&client, "uma", PASSWORD).await.unwrap();
    let token = login_on(&client, "uma", PASSWORD)
        .await
        .unwrap()
        .access_token;
    let _ = client
        .login(pb::LoginRequest {
            username: "uma".into(),
            password: "Wrong-Horse-9".into(),
            ..Default::default()
        })
        .await;
    let _ = client
        .validate_token(pb::ValidateTokenRequest {
            token: token.clone(),
            ..Default::default()
        })
        .await
        .unwrap();

    // A login in flight (bcrypt cost 12 ≈ 200 ms) when SIGTERM arrives.
    let mut in_flight = client.clone();
    let login = tokio::spawn(async move {
        in_flight
            .login(pb::LoginRequest {
                username: "uma".into(),
                password: PASSWORD.into(),
                ..Default::default()
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(40)).await;
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());

    let answered = login.await.unwrap();
    assert!(answered.is_ok(), "in-flight login dropped: {answered:?}");
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    while let Ok(line) = lines_rx.recv_timeout(Duration::from_secs(2)) {
        log.push(line);
    }
    let log = log.join("\n");
    assert!(log.contains("SIGTERM received"), "{log}");
    assert!(
        log.contains("\"method\":\"Login\""),
        "RPC not named in the log"
    );
    // Each call's line names its outcome, and its user once the caller is known.
    let login_done = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| {
            v["fields"]["message"] == "rpc finished"
                && v["span"]["method"] == "Login"
                && v["fields"]["code"] == "OK"
        })
        .expect("a finished Login in the log");
    assert!(
        login_done["span"]["user_id"].is_string(),
        "no user id: {login_done}"
    );
    assert!(login_done["fields"]["micros"].is_u64(), "{login_done}");
    for secret in [
        SECRET,
        PASSWORD,
        "Wrong-Horse-9",
        token.as_str(),
        "$2b$",
        "$2y$",
    ] {
        assert!(!log.contains(secret), "the log holds a secret: {secret}");
    }
    drop_database(&db_name);
}

#[tokio::test]
async fn with_an_empty_environment_in_an_empty_directory_it_serves_from_embedded_storage() {
    let dir = std::env::temp_dir().join(format!("authd-empty-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut child = spawn_in(&dir, Vec::new());
    let lines = stderr_lines(&mut child);
    let mut log = Vec::new();
    let port = loop {
        let line = match lines.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => line,
            Err(e) => {
                let _ = child.kill();
                panic!("authd did not start ({e}): {log:#?}");
            }
        };
        log.push(line.clone());
        if line.contains("authd serving gRPC") {
            let addr = line
                .split("addr=")
                .nth(1)
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap();
            break addr.rsplit(':').next().unwrap().parse::<u16>().unwrap();
        }
    };
    let log_text = log.join("\n");
    assert!(log_text.contains("SQLite file authd.db"), "{log_text}");
    assert!(log_text.contains("in-process memory"), "{log_text}");
    assert!(log_text.contains("JWT_SECRET is not set"), "{log_text}");

    let mut client = AuthServiceClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .unwrap();
    let user = client
        .register(pb::RegisterRequest {
            username: "newcomer".into(),
            password: PASSWORD.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let login = client
        .login(pb::LoginRequest {
            username: "newcomer".into(),
            password: PASSWORD.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let v = client
        .validate_token(pb::ValidateTokenRequest {
            token: login.access_token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(v.valid && v.revocation_checked, "{v:?}");
    assert_eq!(v.user_id, user.user_id);
    assert!(
        dir.join("authd.db").exists(),
        "no SQLite file in the working directory"
    );

    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn healthcheck_exits_0_while_the_server_serves_and_1_once_it_is_gone() {
    let mut app = Backend::Embedded.app().spawn().await;
    let addr = app.addr.to_string();
    let env = owned(&[("GRPC_ADDR", &addr), ("HTTP_ADDR", "")]);

    let (code, err) = run_authd(&["healthcheck"], env.clone()).await;
    assert_eq!(code, 0, "{err}");

    app.stop().await.unwrap();
    let (code, err) = run_authd(&["healthcheck"], env).await;
    assert_eq!(code, 1, "{err}");
    assert_one_clear_line(code, &err, "not healthy");

    let (code, err) = run_authd(&["heathcheck"], vec![]).await;
    assert_eq!(code, 2, "{err}");
    assert_one_clear_line(code, &err, "usage: authd [serve|healthcheck|users|admin]");
}

#[tokio::test]
async fn sighup_puts_a_rotated_tls_certificate_in_force() {
    use crate::support::tls::{Ca, PemDir, health_over_tls};
    use tonic_health::pb::health_check_response::ServingStatus;

    let old_ca = Ca::new("old CA");
    let new_ca = Ca::new("new CA");
    let pem = PemDir::new();
    let (cert, key) = pem.server(&old_ca.server());
    let mut authd = Authd::start(&[
        ("TLS_CERT_FILE", &cert),
        ("TLS_KEY_FILE", &key),
        ("TLS_RELOAD_INTERVAL", "0s"),
    ]);
    let addr = authd.addr.parse().unwrap();
    assert_eq!(
        health_over_tls(addr, &old_ca.pem(), None).await,
        Ok(ServingStatus::Serving)
    );

    pem.server(&new_ca.server());
    // Files are not watched (TLS_RELOAD_INTERVAL=0s): nothing changes until SIGHUP.
    assert!(health_over_tls(addr, &new_ca.pem(), None).await.is_err());
    authd.signal("HUP");
    authd.wait_for("TLS certificates reloaded");
    assert_eq!(
        health_over_tls(addr, &new_ca.pem(), None).await,
        Ok(ServingStatus::Serving)
    );
    assert_eq!(authd.terminate().await, 0);
}

/// At `RUST_LOG=info` the hot calls' spans are off (their cost per call): their errors
/// still come with a span naming the call, a forged token is logged, a successful or a
/// logged-out one is not, and every refusal is counted.
#[tokio::test]
async fn at_info_a_hot_call_logs_its_errors_and_forged_tokens_named_and_nothing_else() {
    let Running {
        mut child,
        lines: lines_rx,
        mut log,
        grpc,
        http,
        db_name,
    } = spawn_logging(&[
        ("LOG_FORMAT", "json"),
        ("RUST_LOG", "info"),
        ("HTTP_ADDR", "127.0.0.1:0"),
    ]);
    let http = http.expect("HTTP listener on");

    let mut client = AuthServiceClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    register_on(&client, "una", PASSWORD).await.unwrap();
    let live = login_on(&client, "una", PASSWORD)
        .await
        .unwrap()
        .access_token;
    let gone = login_on(&client, "una", PASSWORD)
        .await
        .unwrap()
        .access_token;
    client
        .logout(bearer(&gone, pb::LogoutRequest {}))
        .await
        .unwrap();
    let validate = |token: &str| pb::ValidateTokenRequest {
        token: token.to_owned(),
        ..Default::default()
    };
    let mut c = client.clone();
    assert!(
        c.validate_token(validate(&live))
            .await
            .unwrap()
            .into_inner()
            .valid
    );
    assert!(
        !c.validate_token(validate(&gone))
            .await
            .unwrap()
            .into_inner()
            .valid
    );
    assert!(
        !c.validate_token(validate("forged"))
            .await
            .unwrap()
            .into_inner()
            .valid
    );
    let empty = c.validate_token(validate("")).await.unwrap_err();
    assert_eq!(empty.code(), tonic::Code::InvalidArgument);

    let (_, metrics) = http_get(http.parse().unwrap(), "/metrics").await;
    for reason in ["revoked", "malformed"] {
        let series =
            format!("authd_tokens_refused_total{{method=\"ValidateToken\",reason=\"{reason}\"}} 1");
        assert!(metrics.contains(&series), "no {series} in:\n{metrics}");
    }
    let _ = child.kill();
    let _ = child.wait();
    while let Ok(line) = lines_rx.recv_timeout(Duration::from_secs(2)) {
        log.push(line);
    }
    let json: Vec<serde_json::Value> = log
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let all = log.join("\n");
    let validate_lines: Vec<&serde_json::Value> = json
        .iter()
        .filter(|v| {
            v["span"]["method"] == "ValidateToken" || v["fields"]["method"] == "ValidateToken"
        })
        .collect();
    // The error, in a span naming the call.
    assert!(
        validate_lines
            .iter()
            .any(|v| v["fields"]["message"] == "rpc finished"
                && v["fields"]["code"] == "INVALID_ARGUMENT"
                && v["span"]["service"] == "auth.v1.AuthService"),
        "no named INVALID_ARGUMENT line:\n{all}"
    );
    // The forged token, by reason; the logged-out one and the good one: nothing.
    let refused: Vec<&str> = validate_lines
        .iter()
        .filter(|v| v["fields"]["message"] == "token refused")
        .filter_map(|v| v["fields"]["reason"].as_str())
        .collect();
    assert_eq!(refused, ["malformed"], "{all}");
    assert!(
        !validate_lines.iter().any(|v| v["fields"]["code"] == "OK"),
        "a successful ValidateToken logged at info:\n{all}"
    );
    drop_database(&db_name);
}

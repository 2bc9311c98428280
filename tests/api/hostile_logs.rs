//! Forged log lines: a client's user agent and username carrying CR, LF, ANSI escapes and
//! a whole fake `ERROR authd::audit` line reach the log as data on the line of the event
//! that carried them, in every format, never as a line of their own.

use std::process::Child;
use std::time::Duration;

use authd::proto::auth::v1 as pb;
use authd::proto::auth::v1::auth_service_client::AuthServiceClient;
use tonic::Code;

use crate::support::binary::{spawn_in, stderr_lines};
use crate::support::*;

/// A fake timestamp that starts the forged line, so a forged line is easy to spot.
const FAKE_TIME: &str = "2020-01-01T00:00:00.000000Z";

/// A user agent and a username that try to end the line, recolor the terminal and start
/// a fake one; `tag` marks them.
fn hostile(tag: &str) -> (String, String) {
    let fake = format!(
        "{FAKE_TIME} ERROR authd::audit: audit event kind=\"login_succeeded\" user_id=admin {tag}"
    );
    (
        format!("curl/8 {tag}\r\n{fake}\u{1b}[31m\u{1b}[2K\u{9b}0m\n"),
        format!("mallory{tag}\r\n{fake}"),
    )
}

async fn failed_logins(client: &AuthServiceClient<tonic::transport::Channel>, tag: &str) {
    let (agent, name) = hostile(tag);
    // The hostile name is refused before anything is logged about it; the hostile agent
    // comes with an acceptable name, so the failure is an audit event.
    for (username, user_agent, code) in [
        (name, "curl/8".to_owned(), Code::InvalidArgument),
        ("mallory".to_owned(), agent, Code::Unauthenticated),
    ] {
        let answer = client
            .clone()
            .login(pb::LoginRequest {
                username,
                password: "Wrong-Horse-9".into(),
                user_agent,
                ..Default::default()
            })
            .await;
        assert_eq!(answer.unwrap_err().code(), code);
    }
}

#[track_caller]
fn assert_no_forged_line(log: &[String], tag: &str) {
    let all = log.join("\n");
    assert!(
        log.iter().any(|l| l.contains(tag)),
        "the event was not logged:\n{all}"
    );
    for line in log {
        assert!(!line.starts_with(FAKE_TIME), "a forged line:\n{line}");
        assert!(
            !line
                .chars()
                .any(|c| c.is_control() && c != '\t' || ('\u{80}'..='\u{9f}').contains(&c)),
            "a raw control character: {line:?}"
        );
    }
}

on_every_backend!(a_hostile_user_agent_and_username_forge_no_log_line);

async fn a_hostile_user_agent_and_username_forge_no_log_line(backend: Backend) {
    let app = backend.app().spawn().await;
    let tag = format!("tag{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    failed_logins(&app.client, &tag).await;
    let logged = eventually(Duration::from_secs(5), || async {
        captured_logs().contains(&tag)
    })
    .await;
    assert!(logged, "nothing logged");
    // Every line of every test so far: the formatter escapes for all of them.
    let log: Vec<String> = captured_logs().split('\n').map(str::to_owned).collect();
    assert_no_forged_line(&log, &tag);
    let line = log
        .iter()
        .find(|l| l.contains("authd::audit") && l.contains(&tag))
        .unwrap();
    assert!(line.contains(r"\r\n"), "{line}");
    assert!(line.contains(r"\u{1b}[31m"), "{line}");
}

/// The binary on embedded storage, logging in `format` to a pipe; its gRPC address.
fn start(
    format: &str,
    dir: &std::path::Path,
) -> (
    Child,
    std::sync::mpsc::Receiver<String>,
    Vec<String>,
    String,
) {
    let env = [
        ("JWT_SECRET", SECRET),
        ("GRPC_ADDR", "127.0.0.1:0"),
        ("HTTP_ADDR", ""),
        ("BCRYPT_COST", "4"),
        ("LOG_FORMAT", format),
        ("RUST_LOG", "info"),
    ];
    let mut child = spawn_in(
        dir,
        env.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    );
    let lines = stderr_lines(&mut child);
    let mut log = Vec::new();
    loop {
        let line = lines
            .recv_timeout(Duration::from_secs(30))
            .expect("authd started");
        log.push(line.clone());
        if line.contains("authd serving gRPC") {
            let addr = match serde_json::from_str::<serde_json::Value>(&line) {
                Ok(v) => v["fields"]["addr"].as_str().unwrap().to_owned(),
                Err(_) => line
                    .split("addr=")
                    .nth(1)
                    .unwrap()
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .to_owned(),
            };
            return (child, lines, log, addr);
        }
    }
}

#[tokio::test]
async fn the_binary_writes_no_forged_line_in_any_format() {
    for format in ["pretty", "json"] {
        let dir =
            std::env::temp_dir().join(format!("authd-logs-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let (mut child, lines, mut log, addr) = start(format, &dir);
        let tag = format!("tag{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let client = AuthServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        failed_logins(&client, &tag).await;
        // Until the audit line, and a moment after it.
        while let Ok(line) = lines.recv_timeout(Duration::from_secs(5)) {
            let done = line.contains(&tag);
            log.push(line);
            if done {
                break;
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        while let Ok(line) = lines.recv_timeout(Duration::from_millis(200)) {
            log.push(line);
        }
        let _ = std::fs::remove_dir_all(&dir);
        assert_no_forged_line(&log, &tag);
        if format == "json" {
            // Every line is one JSON object, and the user agent comes back exactly.
            let (agent, _) = hostile(&tag);
            let audit: Vec<serde_json::Value> = log
                .iter()
                .map(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .unwrap_or_else(|e| panic!("{e}: {l:?}"))
                })
                .filter(|v| v["target"] == "authd::audit")
                .collect();
            assert!(
                audit
                    .iter()
                    .any(|v| v["fields"]["user_agent"] == agent.as_str()),
                "{audit:#?}"
            );
        }
    }
}

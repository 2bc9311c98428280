//! The built `authd` binary, run as a process: with exactly the environment a test
//! gives it, in a directory of its own, its log read line by line.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::app::*;

/// `authd <args>` with exactly `env`, in an empty directory: the exit code and stderr.
pub fn run_authd_blocking(args: &[String], env: Vec<(String, String)>) -> (i32, String) {
    let dir = std::env::temp_dir().join(format!("authd-test-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_authd"))
        .args(args)
        .env_clear()
        .envs(env)
        .current_dir(&dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The server, in `dir` with exactly `env`, its stderr piped.
pub fn spawn_in(dir: &std::path::Path, env: Vec<(String, String)>) -> std::process::Child {
    spawn_under(&[], dir, env)
}

/// [`spawn_in`], run by `wrapper` (like `prlimit --nofile=200:200 --`) when not empty.
fn spawn_under(
    wrapper: &[&str],
    dir: &std::path::Path,
    env: Vec<(String, String)>,
) -> std::process::Child {
    let authd = env!("CARGO_BIN_EXE_authd");
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(authd);
            c
        }
        None => Command::new(authd),
    };
    command
        .env_clear()
        .envs(env)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The binary as [`spawn_logging`] started it.
pub struct Running {
    pub child: std::process::Child,
    pub lines: std::sync::mpsc::Receiver<String>,
    /// What it logged up to then.
    pub log: Vec<String>,
    pub grpc: String,
    /// The HTTP listener's address, when it logged one (with `LOG_FORMAT=json`).
    pub http: Option<String>,
    /// Its database, for `drop_database` at the end.
    pub db_name: String,
}

/// The binary on this test's own database and key prefix, `overrides` on top of the test
/// settings, its stderr read line by line; returned once it serves gRPC.
pub fn spawn_logging(overrides: &[(&str, &str)]) -> Running {
    let (db_name, key_prefix) = fresh_names();
    let db_url = format!("{}/{db_name}", mysql_base());
    let env = with_overrides(test_env(&db_url, &redis_base(), &key_prefix), overrides);
    let mut child = Command::new(env!("CARGO_BIN_EXE_authd"))
        .env_clear()
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The log says where it listens (port 0): HTTP first, then gRPC.
    let lines = stderr_lines(&mut child);
    let mut log = Vec::new();
    let mut http = None;
    loop {
        let line = lines
            .recv_timeout(Duration::from_secs(30))
            .expect("authd started");
        log.push(line.clone());
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        let message = v["fields"]["message"].as_str().unwrap_or_default();
        if message.starts_with("authd serving HTTP") {
            http = v["fields"]["http_addr"].as_str().map(str::to_owned);
        } else if message == "authd serving gRPC" {
            let grpc = v["fields"]["addr"].as_str().unwrap().to_owned();
            return Running {
                child,
                lines,
                log,
                grpc,
                http,
                db_name,
            };
        }
    }
}

/// Reads stderr lines of a child into a channel, so a test can wait for one.
pub fn stderr_lines(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    let stderr = child.stderr.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    lines_rx
}

/// `authd <args>` with exactly `env`, in an empty directory; off the async workers, so
/// an in-process server can answer it.
pub async fn run_authd(args: &[&str], env: Vec<(String, String)>) -> (i32, String) {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || run_authd_blocking(&args, env))
        .await
        .unwrap()
}

/// The binary, started with `env` in its own directory, logging JSON.
pub struct Authd {
    pub child: std::process::Child,
    pub lines: std::sync::mpsc::Receiver<String>,
    pub log: Vec<String>,
    /// The gRPC address it logged.
    pub addr: String,
    _dir: TempDir,
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Authd {
    /// Starts on embedded storage and 127.0.0.1:0, with `env` added; waits until it serves.
    pub fn start(env: &[(&str, &str)]) -> Self {
        Self::start_under(&[], env)
    }

    /// [`Authd::start`], run by `wrapper` (like `prlimit --nofile=200:200 --`).
    pub fn start_under(wrapper: &[&str], env: &[(&str, &str)]) -> Self {
        let dir = std::env::temp_dir().join(format!("authd-bin-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut vars = owned(&[
            ("JWT_SECRET", SECRET),
            ("GRPC_ADDR", "127.0.0.1:0"),
            ("HTTP_ADDR", ""),
            ("BCRYPT_COST", "4"),
            ("LOG_FORMAT", "json"),
        ]);
        vars.extend(owned(env));
        let mut child = spawn_under(wrapper, &dir, vars);
        let lines = stderr_lines(&mut child);
        let mut authd = Self {
            child,
            lines,
            log: Vec::new(),
            addr: String::new(),
            _dir: TempDir(dir),
        };
        let line = authd.wait_for("authd serving gRPC");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        authd.addr = v["fields"]["addr"].as_str().unwrap().to_owned();
        authd
    }

    /// Reads the log until a line whose message is `message`; returns that line.
    pub fn wait_for(&mut self, message: &str) -> String {
        loop {
            let Ok(line) = self.lines.recv_timeout(Duration::from_secs(30)) else {
                let _ = self.child.kill();
                panic!("no {message:?} in the log: {:#?}", self.log);
            };
            self.log.push(line.clone());
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if v["fields"]["message"] == message {
                return line;
            }
        }
    }

    pub fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    }

    /// SIGTERM, and the exit code.
    pub async fn terminate(mut self) -> i32 {
        self.signal("TERM");
        let mut child = std::mem::replace(&mut self.child, Command::new("true").spawn().unwrap());
        tokio::task::spawn_blocking(move || child.wait())
            .await
            .unwrap()
            .unwrap()
            .code()
            .unwrap_or(-1)
    }
}

impl Drop for Authd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

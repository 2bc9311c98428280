//! The operator commands of the built binary: `authd users create|import` on the store,
//! `authd admin …` over gRPC; their output, `--json`, `--help` and exit codes.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::support::python::python_with;
use crate::support::*;

on_every_backend!(
    users_create_bootstraps_an_admin_that_admin_commands_then_use,
    import_takes_hashes_of_another_implementation_and_reruns_idempotently,
    import_of_many_rows_runs_in_batches,
    import_refuses_hashes_above_the_cost_ceiling,
    import_numbers_bad_rows_by_their_real_line_and_takes_only_an_exact_header,
);

/// What a run of the binary gave.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// `authd <args>` with exactly `env`, `stdin` on its standard input.
async fn authd(args: &[&str], env: Vec<(String, String)>, stdin: &str) -> Run {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let stdin = stdin.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_authd"))
            .args(&args)
            .env_clear()
            .envs(env)
            .current_dir(std::env::temp_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
        let out = child.wait_with_output().unwrap();
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    })
    .await
    .unwrap()
}

/// The settings that point the binary at `app`'s users store.
fn store_env(app: &TestApp) -> Vec<(String, String)> {
    match app.backend {
        Backend::MySqlRedis | Backend::MySqlCluster => owned(&[
            ("DATABASE_URL", &app.db_url),
            ("REDIS_URL", &app.redis_url),
            ("REDIS_KEY_PREFIX", &app.key_prefix),
            ("JWT_SECRET", SECRET),
            ("BCRYPT_COST", "4"),
        ]),
        Backend::Embedded => owned(&[
            ("SQLITE_PATH", app.db_url.trim_start_matches("sqlite://")),
            ("JWT_SECRET", SECRET),
            ("BCRYPT_COST", "4"),
        ]),
    }
}

/// `authd admin --addr <app> …` settings, with `token` in AUTHD_TOKEN.
fn admin_env(token: Option<&str>) -> Vec<(String, String)> {
    match token {
        Some(t) => owned(&[("AUTHD_TOKEN", t)]),
        None => Vec::new(),
    }
}

async fn users_create_bootstraps_an_admin_that_admin_commands_then_use(backend: Backend) {
    let app = backend.app().spawn().await;
    let addr = app.addr.to_string();

    // The password never on the command line.
    let argv = authd(
        &["users", "create", "root", "--password", PASSWORD],
        store_env(&app),
        "",
    )
    .await;
    assert_eq!(argv.code, 2, "{}", argv.stderr);
    // From a variable.
    let mut env = store_env(&app);
    env.push(("ROOT_PASSWORD".into(), PASSWORD.into()));
    let created = authd(
        &[
            "users",
            "create",
            "root",
            "--role",
            "admin",
            "--password-env",
            "ROOT_PASSWORD",
        ],
        env.clone(),
        "",
    )
    .await;
    assert_eq!(created.code, 0, "{}", created.stderr);
    assert!(
        created.stdout.contains("created user root"),
        "{}",
        created.stdout
    );
    // Again: exists (5).
    let again = authd(
        &["users", "create", "root", "--password-env", "ROOT_PASSWORD"],
        env,
        "",
    )
    .await;
    assert_eq!(again.code, 5, "{}", again.stderr);
    // From stdin; a weak one is refused (2).
    let weak = authd(
        &["users", "create", "ops1", "--password-stdin"],
        store_env(&app),
        "short\n",
    )
    .await;
    assert_eq!(weak.code, 2, "{}", weak.stderr);
    let piped = authd(
        &["users", "create", "ops1", "--password-stdin"],
        store_env(&app),
        &format!("{PASSWORD}\n"),
    )
    .await;
    assert_eq!(piped.code, 0, "{}", piped.stderr);
    // No terminal and no source: refused, not hung.
    let nowhere = authd(&["users", "create", "ops2"], store_env(&app), "").await;
    assert_eq!(nowhere.code, 2, "{}", nowhere.stderr);

    let token = app.login("root", PASSWORD).await.unwrap().access_token;
    let admin = |args: &'static [&'static str]| {
        let mut full = vec!["admin", "--addr", addr.as_str()];
        full.extend_from_slice(args);
        full
    };
    // Human output by default, JSON on request.
    let got = authd(&admin(&["get-user", "ops1"]), admin_env(Some(&token)), "").await;
    assert_eq!(got.code, 0, "{}", got.stderr);
    assert!(got.stdout.contains("ops1 ("), "{}", got.stdout);
    assert!(got.stdout.contains("enabled"), "{}", got.stdout);
    let set = authd(
        &admin(&["--json", "set-roles", "ops1", "ops", "billing"]),
        admin_env(Some(&token)),
        "",
    )
    .await;
    assert_eq!(set.code, 0, "{}", set.stderr);
    let v: serde_json::Value = serde_json::from_str(&set.stdout).unwrap();
    assert_eq!(v["roles"], serde_json::json!(["billing", "ops"]));
    let disabled = authd(
        &admin(&["--json", "disable", "ops1"]),
        admin_env(Some(&token)),
        "",
    )
    .await;
    assert_eq!(disabled.code, 0, "{}", disabled.stderr);
    let v: serde_json::Value = serde_json::from_str(&disabled.stdout).unwrap();
    assert_eq!(v["revoked_sessions"], 0);
    let listed = authd(
        &admin(&["list-users", "--disabled"]),
        admin_env(Some(&token)),
        "",
    )
    .await;
    assert!(listed.stdout.contains("ops1"), "{}", listed.stdout);
    assert!(!listed.stdout.contains("root"), "{}", listed.stdout);
    let reset = authd(
        &admin(&[
            "set-password",
            "ops1",
            "--password-stdin",
            "--require-change",
        ]),
        admin_env(Some(&token)),
        "Ops-Reset-Pass-12\n",
    )
    .await;
    assert_eq!(reset.code, 0, "{}", reset.stderr);
    let audit = authd(
        &admin(&["audit", "--kind", "admin_action"]),
        admin_env(Some(&token)),
        "",
    )
    .await;
    assert_eq!(audit.code, 0, "{}", audit.stderr);
    // A user from an existing hash, read from a variable.
    let mut hashed = admin_env(Some(&token));
    hashed.push((
        "LEGACY_HASH".into(),
        bcrypt::hash("Legacy-Pass-2019", 4)
            .unwrap()
            .replacen("$2b$", "$2a$", 1),
    ));
    let from_hash = authd(
        &admin(&[
            "create-user",
            "legacy",
            "--password-hash-env",
            "LEGACY_HASH",
        ]),
        hashed,
        "",
    )
    .await;
    assert_eq!(from_hash.code, 0, "{}", from_hash.stderr);
    app.login("legacy", "Legacy-Pass-2019").await.unwrap();
    // Exit codes scripts can tell apart.
    let missing = authd(&admin(&["get-user", "nobody"]), admin_env(Some(&token)), "").await;
    assert_eq!(missing.code, 3, "{}", missing.stderr);
    assert_eq!(missing.stderr.lines().count(), 1, "{}", missing.stderr);
    let anonymous = authd(&admin(&["get-user", "ops1"]), admin_env(None), "").await;
    assert_eq!(anonymous.code, 4, "{}", anonymous.stderr);
    let unsure = authd(&admin(&["delete", "ops1"]), admin_env(Some(&token)), "").await;
    assert_eq!(unsure.code, 2, "{}", unsure.stderr);
    let deleted = authd(
        &admin(&["delete", "ops1", "--yes"]),
        admin_env(Some(&token)),
        "",
    )
    .await;
    assert_eq!(deleted.code, 0, "{}", deleted.stderr);
    let nobody_home = authd(
        &["admin", "--addr", "127.0.0.1:1", "get-user", "x"],
        admin_env(Some(&token)),
        "",
    )
    .await;
    assert_eq!(nobody_home.code, 6, "{}", nobody_home.stderr);
    // --help on each command.
    for args in [
        &["--help"][..],
        &["users", "--help"],
        &["users", "create", "--help"],
        &["users", "import", "--help"],
        &["admin", "--help"],
        &["admin", "disable", "--help"],
        &["admin", "set-password", "--help"],
        &["admin", "audit", "--help"],
    ] {
        let help = authd(args, Vec::new(), "").await;
        assert_eq!(help.code, 0, "{args:?}: {}", help.stderr);
        assert!(
            help.stdout.contains("Usage: authd"),
            "{args:?}: {}",
            help.stdout
        );
    }
}

/// bcrypt hashes of `password` made by Python's `bcrypt` (an implementation other than
/// authd's): `$2a$` and `$2b$` as it makes them, and `$2y$` (PHP's name for the same).
fn python_hashes(password: &str) -> [String; 3] {
    let python = python_with(&["bcrypt"]);
    let out = Command::new(python)
        .args([
            "-c",
            "import bcrypt, sys\n\
             p = sys.argv[1].encode()\n\
             a = bcrypt.hashpw(p, bcrypt.gensalt(rounds=4, prefix=b'2a')).decode()\n\
             b = bcrypt.hashpw(p, bcrypt.gensalt(rounds=5, prefix=b'2b')).decode()\n\
             y = bcrypt.hashpw(p, bcrypt.gensalt(rounds=4)).decode().replace('$2b$', '$2y$', 1)\n\
             print(a); print(b); print(y)",
            password,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<String> = text.lines().map(str::to_owned).collect();
    [lines[0].clone(), lines[1].clone(), lines[2].clone()]
}

async fn import_takes_hashes_of_another_implementation_and_reruns_idempotently(backend: Backend) {
    let app = backend.app().spawn().await;
    let [a, b, y] = python_hashes("Legacy-Pass-2019");
    assert!(a.starts_with("$2a$") && b.starts_with("$2b$") && y.starts_with("$2y$"));
    let dir = std::env::temp_dir().join(format!("authd-import-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let csv = dir.join("users.csv");
    std::fs::write(
        &csv,
        format!(
            "username,password_hash,roles\n\
             alpha,{a},ops\n\
             not a name,{a}\n\
             bravo,{b},ops;billing\n\
             charlie,plaintext-password\n\
             \n\
             delta,{y}\n"
        ),
    )
    .unwrap();
    let jsonl = dir.join("more.jsonl");
    std::fs::write(
        &jsonl,
        format!(
            "{{\"username\":\"echo\",\"password_hash\":\"{y}\",\"roles\":[\"admin\"]}}\n\
             {{\"username\":\"foxtrot\"}}\n\
             {{\"username\":\"alpha\",\"password_hash\":\"{a}\"}}\n"
        ),
    )
    .unwrap();

    let first = authd(
        &["users", "import", csv.to_str().unwrap()],
        store_env(&app),
        "",
    )
    .await;
    assert_eq!(first.code, 7, "bad rows exit 7: {}", first.stderr);
    assert!(
        first.stderr.contains("line 3: username"),
        "{}",
        first.stderr
    );
    assert!(
        first.stderr.contains("line 5: password_hash"),
        "{}",
        first.stderr
    );
    assert!(
        first
            .stdout
            .contains("5 rows: 3 imported, 0 skipped (already there), 2 bad"),
        "{}",
        first.stdout
    );
    let second = authd(
        &["users", "import", jsonl.to_str().unwrap()],
        store_env(&app),
        "",
    )
    .await;
    assert_eq!(second.code, 7, "{}", second.stderr);
    assert!(second.stderr.contains("line 2: "), "{}", second.stderr);
    assert!(
        second.stdout.contains("1 imported, 1 skipped"),
        "{}",
        second.stdout
    );
    // Every imported hash verifies at Login, whatever its prefix.
    for name in ["alpha", "bravo", "delta", "echo"] {
        let login = app.login(name, "Legacy-Pass-2019").await;
        assert!(login.is_ok(), "{name}: {login:?}");
    }
    let bravo = app.login("bravo", "Legacy-Pass-2019").await.unwrap();
    let roles = app.validate(&bravo.access_token).await.unwrap().roles;
    assert_eq!(roles, ["billing", "ops"]);
    // Run again: nothing new.
    let rerun = authd(
        &["users", "import", csv.to_str().unwrap()],
        store_env(&app),
        "",
    )
    .await;
    assert!(
        rerun.stdout.contains("0 imported, 3 skipped"),
        "{}",
        rerun.stdout
    );
    let _ = std::fs::remove_dir_all(dir);
}

async fn import_of_many_rows_runs_in_batches(backend: Backend) {
    // The timed run of 100,000 rows is in BENCHMARKS.md; here a test-sized one.
    const ROWS: usize = 5000;
    let app = backend.app().spawn().await;
    let hash = bcrypt::hash("Bulk-Pass-77", 4).unwrap();
    let dir = std::env::temp_dir().join(format!("authd-bulk-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bulk.csv");
    let mut text = String::with_capacity(ROWS * 80);
    for i in 0..ROWS {
        text.push_str(&format!("bulk{i},{hash}\n"));
    }
    std::fs::write(&path, text).unwrap();
    let run = authd(
        &["users", "import", "--progress", path.to_str().unwrap()],
        store_env(&app),
        "",
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout
            .contains(&format!("{ROWS} rows: {ROWS} imported")),
        "{}",
        run.stdout
    );
    assert!(
        run.stderr.contains("100%"),
        "no progress bar: {}",
        run.stderr
    );
    let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users")
        .fetch_one(&app.db().await)
        .await
        .unwrap();
    assert_eq!(count, i64::try_from(ROWS).unwrap());
    app.login(&format!("bulk{}", ROWS - 1), "Bulk-Pass-77")
        .await
        .unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

async fn import_refuses_hashes_above_the_cost_ceiling(backend: Backend) {
    let app = backend.app().spawn().await;
    let cheap = bcrypt::hash("Legacy-Pass-2019", 4).unwrap();
    let costly = cheap.replacen("$04$", "$31$", 1);
    let dir = std::env::temp_dir().join(format!("authd-import-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let csv = dir.join("users.csv");
    std::fs::write(&csv, format!("alpha,{cheap}\nbravo,{costly}\n")).unwrap();
    let run = authd(
        &["users", "import", csv.to_str().unwrap()],
        store_env(&app),
        "",
    )
    .await;
    assert_eq!(run.code, 7, "a bad row exits 7: {}", run.stderr);
    assert!(
        run.stderr.contains("line 2: password_hash") && run.stderr.contains("cost 4-14"),
        "{}",
        run.stderr
    );
    assert!(run.stdout.contains("1 imported"), "{}", run.stdout);
    assert!(app.login("alpha", "Legacy-Pass-2019").await.is_ok());
    let stored: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users WHERE username = 'bravo'")
        .fetch_one(&app.db().await)
        .await
        .unwrap();
    assert_eq!(stored, 0);
    let _ = std::fs::remove_dir_all(dir);
}

async fn import_numbers_bad_rows_by_their_real_line_and_takes_only_an_exact_header(
    backend: Backend,
) {
    let app = backend.app().spawn().await;
    let hash = bcrypt::hash("Legacy-Pass-2019", 4).unwrap();
    let dir = std::env::temp_dir().join(format!("authd-import-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    // A header, blank lines, CRLF endings and a line that is not UTF-8: every bad row
    // is reported by its line in the file, and the rest are imported.
    let csv = dir.join("users.csv");
    let mut text = format!(
        "username,password_hash,roles\r\n\nalpha,{hash}\r\n\n\nnot a name,{hash}\nbravo,{hash},ops\n"
    )
    .into_bytes();
    text.extend_from_slice(b"caf\xe9,x\n");
    text.extend_from_slice(format!("charlie,short\n\ndelta,{hash}\n").as_bytes());
    std::fs::write(&csv, &text).unwrap();
    let run = authd(
        &["users", "import", csv.to_str().unwrap()],
        store_env(&app),
        "",
    )
    .await;
    assert_eq!(run.code, 7, "bad rows exit 7: {}", run.stderr);
    let lines: Vec<&str> = run
        .stderr
        .lines()
        .filter_map(|l| l.split(':').next())
        .filter(|l| l.starts_with("line "))
        .collect();
    assert_eq!(lines, ["line 6", "line 8", "line 9"], "{}", run.stderr);
    assert!(run.stderr.contains("line 8: not UTF-8"), "{}", run.stderr);
    assert!(
        run.stdout
            .contains("6 rows: 3 imported, 0 skipped (already there), 3 bad"),
        "{}",
        run.stdout
    );
    // A first line that merely starts with "username" is a user, not a header.
    let named = dir.join("named.csv");
    std::fs::write(&named, format!("usernames,{hash}\necho,{hash}\n")).unwrap();
    let run = authd(
        &["users", "import", named.to_str().unwrap()],
        store_env(&app),
        "",
    )
    .await;
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("2 rows: 2 imported"), "{}", run.stdout);
    assert!(app.login("usernames", "Legacy-Pass-2019").await.is_ok());
    // A header-like first line that is no known header is a bad row, reported.
    let odd = dir.join("odd.csv");
    std::fs::write(&odd, format!("username,hash\nfoxtrot,{hash}\n")).unwrap();
    let run = authd(
        &["users", "import", odd.to_str().unwrap()],
        store_env(&app),
        "",
    )
    .await;
    assert_eq!(run.code, 7, "{}", run.stderr);
    assert!(
        run.stderr.contains("line 1: password_hash"),
        "{}",
        run.stderr
    );
    assert!(run.stdout.contains("2 rows: 1 imported"), "{}", run.stdout);
    let _ = std::fs::remove_dir_all(dir);
}

//! The keyed hash of usernames (throttle keys, audit rows) always has a key: with an
//! asymmetric `JWT_ALGORITHM` and no `JWT_SECRET` it is not a plain hash that a list of
//! likely names reverses.

use std::time::Duration;

use authd::config::Config;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use tonic::Code;

use crate::support::*;

const NAME_HASH_KEY: &str = "name-hash-key-0123456789abcdef-0123";

/// What authd's name hasher computes for `name` under `key`.
fn keyed_hash(key: &[u8], name: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
    mac.update(b"authd-username:");
    mac.update(name.as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The username hash of the first `login_failed` row.
async fn failed_login_hash(app: &TestApp, name: &str) -> String {
    assert_code(
        app.login(name, "Wrong-Horse-9").await,
        Code::Unauthenticated,
    );
    let db = app.db().await;
    let read = || async {
        sqlx::query_scalar::<_, Option<String>>(
            "SELECT username_hash FROM audit_events WHERE kind = 'login_failed'",
        )
        .fetch_optional(&db)
        .await
        .unwrap()
        .flatten()
    };
    eventually(Duration::from_secs(5), || async { read().await.is_some() }).await;
    read()
        .await
        .expect("a login_failed row with a username hash")
}

on_every_backend!(
    without_a_jwt_secret_usernames_are_still_hashed_with_a_key,
    with_jwt_secret_and_no_name_hash_key_hashes_stay_as_they_were
);

async fn without_a_jwt_secret_usernames_are_still_hashed_with_a_key(backend: Backend) {
    let pem = key("ed25519.pem");
    // `JWT_SECRET=` (empty) counts as unset.
    let asymmetric = [
        ("JWT_ALGORITHM", "EdDSA"),
        ("JWT_PRIVATE_KEY_FILE", pem.as_str()),
        ("JWT_SECRET", ""),
    ];
    let unkeyed = keyed_hash(b"", "victim");
    match backend {
        Backend::Embedded => {
            // One instance, nothing shared: a random key of the process's own.
            let app = backend.app().envs(&asymmetric).spawn().await;
            let hash = failed_login_hash(&app, "victim").await;
            assert_ne!(hash, unkeyed, "the username was hashed without a key");
            assert_eq!(hash.len(), 64);
        }
        Backend::MySqlRedis | Backend::MySqlCluster => {
            // Shared state: start-up refused, naming the setting to give.
            let (db_name, prefix) = fresh_names();
            let mut vars = test_env(
                &format!("{}/{db_name}", mysql_base()),
                &redis_base(),
                &prefix,
            );
            vars.retain(|(k, _)| asymmetric.iter().all(|(o, _)| o != k));
            vars.extend(
                asymmetric
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
            );
            let refused = Config::from_vars(vars).map(|_| ()).unwrap_err();
            assert_eq!(refused.variable, "NAME_HASH_KEY", "{refused}");

            let with_key = [asymmetric.as_slice(), &[("NAME_HASH_KEY", NAME_HASH_KEY)]].concat();
            let app = backend.app().envs(&with_key).spawn().await;
            let hash = failed_login_hash(&app, "victim").await;
            assert_ne!(hash, unkeyed, "the username was hashed without a key");
            assert_eq!(hash, keyed_hash(NAME_HASH_KEY.as_bytes(), "victim"));
        }
    }
}

async fn with_jwt_secret_and_no_name_hash_key_hashes_stay_as_they_were(backend: Backend) {
    // Existing deployments keep their throttle counters and audit hashes.
    let app = backend.app().spawn().await;
    let hash = failed_login_hash(&app, "victim").await;
    assert_eq!(hash, keyed_hash(SECRET.as_bytes(), "victim"));
}

#[tokio::test]
async fn with_shared_state_and_no_key_the_binary_refuses_to_start_with_one_line() {
    let pem = key("ed25519.pem");
    let env = [
        ("JWT_ALGORITHM", "EdDSA"),
        ("JWT_PRIVATE_KEY_FILE", pem.as_str()),
        ("REDIS_ADDR", "127.0.0.1:6379"),
    ];
    let env = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let (code, stderr) = crate::support::binary::run_authd(&[], env).await;
    assert_ne!(code, 0, "started: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "not one line: {stderr}");
    assert!(lines[0].contains("NAME_HASH_KEY"), "{stderr}");
}

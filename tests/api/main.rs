//! authd end to end: real gRPC on 127.0.0.1:0, real MariaDB and Redis.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

/// Runs each listed test on every storage backend, so they cannot drift. Each name is
/// an ordinary `async fn name(backend: Backend)` in the same module (formatted and
/// documented like any function); `mod mysql_redis`, `mod embedded` and `mod
/// mysql_cluster` (sessions on a Redis Cluster) each get a `#[tokio::test]` of that
/// name calling it. Use it once per module.
macro_rules! on_every_backend {
    ($($name:ident),+ $(,)?) => {
        mod mysql_redis {
            $(#[tokio::test]
            async fn $name() {
                super::$name(crate::support::Backend::MySqlRedis).await
            })+
        }

        mod embedded {
            $(#[tokio::test]
            async fn $name() {
                super::$name(crate::support::Backend::Embedded).await
            })+
        }

        mod mysql_cluster {
            $(#[tokio::test]
            async fn $name() {
                super::$name(crate::support::Backend::MySqlCluster).await
            })+
        }
    };
}

mod support;

mod admin;
mod admin_cli;
mod admin_hardening;
mod admin_safety;
mod audit;
mod binary;
mod change_password;
mod client_layer;
mod cluster;
mod connections;
mod deploy;
mod ext_authz;
mod faults;
mod health;
mod hostile;
mod hostile_accounts;
mod hostile_audit;
mod hostile_discovery;
mod hostile_logs;
mod hostile_tokens;
mod instances;
mod keys;
mod login;
mod logout;
mod name_hash;
mod ops;
mod otlp;
mod password_policy;
mod redis_outage;
mod redis_tls;
mod refresh;
mod register;
mod revocation_integrity;
mod session_cache;
mod sessions;
mod throttle;
mod timing;
mod tls;
mod totp;
mod validate;
mod watch;

//! authd end to end: real gRPC on 127.0.0.1:0, real MariaDB and Redis.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod helpers;

mod binary;
mod change_password;
mod health;
mod login;
mod logout;
mod redis_outage;
mod register;
mod sessions;
mod validate;

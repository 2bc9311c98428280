//! The rules of authd: usernames, passwords, tokens, and the service that every
//! transport (gRPC today) calls. No tonic types here.

pub mod audit;
pub mod denied;
pub mod error;
pub mod hasher;
pub mod padding;
pub mod password;
pub mod refresh;
pub mod remembered;
pub mod roles;
pub mod service;
pub mod throttle;
pub mod token;
pub mod token_config;
pub mod totp;
pub mod unfinished;
pub mod username;
pub mod watchers;

pub use error::{AuthError, FieldViolation};
pub use service::{AuthCore, ClientInfo};
pub use token::{Claims, InvalidReason};

/// The property tests' configuration: `cases` per property, or `PROPTEST_CASES` when
/// set, for a longer run than `cargo test`'s few seconds.
#[cfg(test)]
pub(crate) fn proptest_config(cases: u32) -> proptest::test_runner::Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    proptest::test_runner::Config::with_cases(cases)
}

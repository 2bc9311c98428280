//! The test harness. An app is built in one place, [`TestApp::builder`]; the rest is
//! what tests do with it: call it ([`client`]), wait and read its answers ([`checks`]),
//! forge tokens ([`tokens`]), read its log ([`logs`]), break its Redis ([`OwnRedis`]) or the
//! network ([`proxy`]), start Redis Clusters and Sentinel set-ups ([`RedisCluster`],
//! [`SentinelSetup`]), speak raw HTTP/2 to it ([`raw`]), run the real binary
//! ([`binary`]), make certificates ([`tls`]) and provision Python verifiers ([`python`]).
//!
//! Tests `use crate::support::*` for the app and the everyday helpers, and name the
//! specialised modules (`support::raw`, `support::proxy`, ...) where they use them.

mod app;
pub mod binary;
mod checks;
mod client;
mod cluster;
mod logs;
mod own_redis;
pub mod proxy;
pub mod python;
pub mod raw;
pub mod tls;
mod tokens;

pub use app::*;
pub use checks::*;
pub use client::*;
pub use cluster::*;
pub use logs::*;
pub use own_redis::*;
pub use tokens::*;

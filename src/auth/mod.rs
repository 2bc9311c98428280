//! The rules of authd: usernames, passwords, tokens, and the service that every
//! transport (gRPC today) calls. No tonic types here.

pub mod audit;
pub mod error;
pub mod hasher;
pub mod password;
pub mod service;
pub mod throttle;
pub mod token;
pub mod username;

pub use error::{AuthError, FieldViolation};
pub use service::{AuthCore, ClientInfo};
pub use token::{Claims, InvalidReason};

//! gRPC: proto ↔ domain conversion, metadata, and the one place errors become Status.

pub mod admin;
pub mod ext_authz;
pub mod layer;
pub mod service;
pub mod status;

pub use service::AuthGrpc;

//! authd: a gRPC authentication service. Users in MySQL, sessions and the logout
//! blacklist in Redis, bcrypt passwords, HS256 JWTs.
//!
//! [`startup::Application`] builds and serves it; [`auth::AuthCore`] holds the rules.

pub mod auth;
pub mod clock;
pub mod config;
pub mod grpc;
pub mod healthcheck;
pub mod http;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod transport;

/// Code generated from `proto/`.
pub mod proto {
    /// `auth.v1`.
    pub mod auth {
        /// The public contract.
        #[allow(missing_docs, clippy::all, clippy::pedantic)]
        pub mod v1 {
            tonic::include_proto!("auth.v1");
        }
    }

    /// Encoded descriptors of our protos, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/authd_descriptor.bin"));
}

pub use config::Config;
pub use startup::Application;

//! authd: a gRPC authentication service. Users in MySQL (or SQLite), sessions and the
//! logout blacklist in Redis (or in the process), bcrypt passwords, HS256 JWTs.
//!
//! With the `server` feature (default), [`startup::Application`] builds and serves it and
//! `auth::AuthCore` holds the rules. With the `client` feature, [`client`] is what other
//! services add to accept authd's tokens: a tower layer (or an interceptor) with a
//! revocation-aware cache.

#[cfg(feature = "server")]
pub mod auth;
pub mod bearer;
#[cfg(feature = "server")]
pub mod cli;
#[cfg(feature = "client")]
pub mod client;
pub mod clock;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
#[doc(hidden)]
pub mod fuzzing;
#[cfg(feature = "server")]
pub mod grpc;
#[cfg(feature = "server")]
pub mod healthcheck;
#[cfg(feature = "server")]
pub mod http;
#[cfg(feature = "server")]
pub mod secret;
#[cfg(feature = "server")]
pub mod startup;
#[cfg(feature = "server")]
pub mod store;
#[cfg(feature = "server")]
pub mod telemetry;
#[cfg(feature = "server")]
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

    /// `example.v1`: a tiny service used by `examples/` and the tests of the client layer.
    #[doc(hidden)]
    pub mod example {
        #[allow(missing_docs, clippy::all, clippy::pedantic)]
        pub mod v1 {
            tonic::include_proto!("example.v1");
        }
    }

    /// Encoded descriptors of our protos, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/authd_descriptor.bin"));

    /// Encoded descriptors of Envoy's `envoy.service.auth.v3.Authorization` and what it
    /// imports (`proto/vendor/`), for server reflection.
    pub const ENVOY_FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/envoy_descriptor.bin"));
}

#[cfg(feature = "server")]
pub use config::Config;
#[cfg(feature = "server")]
pub use startup::Application;

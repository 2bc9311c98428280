//! What a service adds to accept authd's tokens (cargo feature `client`, which pulls in
//! none of the server's dependencies).
//!
//! ```ignore
//! let authd = tonic::transport::Channel::from_static("http://authd:50051").connect_lazy();
//! let auth = authd::client::AuthLayer::new(authd, authd::client::AuthConfig::default());
//! Server::builder().layer(auth).add_service(MyServer::new(my_service)).serve(addr).await?;
//! ```
//!
//! Handlers then read the caller from the request:
//! `request.extensions().get::<authd::client::AuthContext>()`.
//!
//! Each request's bearer token is checked with authd's ValidateToken, and the answer is
//! cached: a valid answer for at most [`AuthConfig::cache_ttl`] and never past the token's
//! `exp`, an invalid one for [`AuthConfig::negative_ttl`]. Concurrent requests with the same
//! uncached token make one call. A background task follows authd's WatchRevocations
//! stream and drops cached answers the moment a token, session or user is revoked; while
//! that stream is down, cached answers older than [`AuthConfig::stale_after`] are checked
//! again.

mod context;
mod interceptor;
mod layer;
mod validator;

pub use context::AuthContext;
pub use interceptor::AuthInterceptor;
pub use layer::{AuthLayer, RequireAuth};
pub use validator::{AuthConfig, AuthStats, AuthValidator, WatchCredential};

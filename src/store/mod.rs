//! Where authd keeps things: users in MySQL (or SQLite), sessions and the blacklist in
//! Redis (or this process's memory).

pub mod sessions;
pub mod users;

pub use sessions::SessionStore;
pub use users::{User, UserStore};

/// A store call that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store could not be reached in time; a retry may succeed.
    #[error("store unavailable")]
    Unavailable(#[source] anyhow::Error),
    /// The store answered with something we did not expect.
    #[error("store error")]
    Internal(#[source] anyhow::Error),
}

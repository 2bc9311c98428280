//! Where authd keeps things: users in MySQL (or SQLite), sessions and the blacklist in
//! Redis (or this process's memory).

/// Runs the same sqlx expression against whichever pool a store has: the queries are
/// written once, and each driver checks its own types.
macro_rules! on_pool {
    ($store:expr, |$pool:ident| $body:expr) => {
        match &$store.pool {
            $crate::store::users::Pool::MySql($pool) => $body,
            $crate::store::users::Pool::Sqlite($pool) => $body,
        }
    };
}

pub mod audit;
pub mod mfa;
pub mod redis_conn;
pub mod sessions;
pub mod throttle;
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

impl StoreError {
    /// Counts this error in `authd_store_errors_total` for `store`, and returns it.
    pub(crate) fn counted(self, store: &'static str) -> Self {
        let kind = match &self {
            StoreError::Unavailable(_) => "unavailable",
            StoreError::Internal(_) => "internal",
        };
        metrics::counter!("authd_store_errors_total", "store" => store, "kind" => kind)
            .increment(1);
        self
    }
}

/// The longest user agent kept, in bytes, in a session or an audit row; longer ones are
/// cut by [`truncate`].
pub const MAX_USER_AGENT_BYTES: usize = 512;

/// `s` cut to at most `max_bytes` bytes, at a char boundary. What a client says about
/// itself (its user agent, say) is kept this way rather than refused: it is data, and a
/// column too short for it must not cost the call or the row.
pub fn truncate(s: &str, max_bytes: usize) -> &str {
    if s.len() <= max_bytes {
        return s;
    }
    let mut end = max_bytes;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The connections of a store's pool, for the `authd_pool_*` gauges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Connections open now.
    pub open: u32,
    /// Of those, the ones not in use.
    pub idle: u32,
    /// The most the pool opens.
    pub max: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("hello", 10), "hello");
        assert_eq!(truncate("hello", 0), "");
    }
}

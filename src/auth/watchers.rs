//! Who may follow the revocation stream, and how many at once.
//!
//! The stream names every user, session and `jti` that is revoked, and resuming it
//! reads the store, so it is neither public nor unbounded: a watcher presents one of the
//! configured credentials (`WATCH_CREDENTIALS`) as a bearer, and the streams open at once
//! are capped per connection and per instance.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::AuthError;
use crate::config::WatchersConfig;

/// How long a refused watcher is told to wait before it tries again.
pub const RETRY_AFTER: Duration = Duration::from_secs(5);

/// The door to WatchRevocations.
#[derive(Debug)]
pub struct Watchers {
    /// SHA-256 of each accepted credential: compared digest to digest, so the time a
    /// comparison takes says nothing about how much of a credential was right.
    credentials: Vec<[u8; 32]>,
    total: Arc<Semaphore>,
    per_connection: usize,
    open: Arc<Mutex<HashMap<Option<SocketAddr>, usize>>>,
}

/// A watcher's place: the stream holds it, and gives it back when it ends.
#[derive(Debug)]
pub struct WatchPermit {
    _total: OwnedSemaphorePermit,
    connection: Option<SocketAddr>,
    open: Arc<Mutex<HashMap<Option<SocketAddr>, usize>>>,
}

impl Drop for WatchPermit {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.connection) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.connection);
            }
        }
    }
}

impl Watchers {
    /// Admits the holders of `config`'s credentials, within its caps.
    pub fn new(config: &WatchersConfig) -> Self {
        Self {
            credentials: config
                .credentials
                .iter()
                .map(|c| Sha256::digest(c.expose().as_bytes()).into())
                .collect(),
            total: Arc::new(Semaphore::new(config.max_streams)),
            per_connection: config.max_streams_per_connection,
            open: Arc::default(),
        }
    }

    /// A place for a watcher presenting `credential` on `connection`: UNAUTHENTICATED
    /// without a credential, PERMISSION_DENIED with one that is not a watcher's (a user's
    /// access token, say), RESOURCE_EXHAUSTED when the connection or the instance has
    /// all the streams it may.
    pub fn admit(
        &self,
        credential: Option<&str>,
        connection: Option<SocketAddr>,
    ) -> Result<WatchPermit, AuthError> {
        let credential = credential.ok_or(AuthError::Unauthenticated)?;
        let digest: [u8; 32] = Sha256::digest(credential.as_bytes()).into();
        if !self
            .credentials
            .iter()
            .any(|known| same_digest(known, &digest))
        {
            return Err(AuthError::NotAWatcher);
        }
        let full = || AuthError::TooManyWatchers {
            retry_after: RETRY_AFTER,
        };
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.get(&connection).copied().unwrap_or(0) >= self.per_connection {
            return Err(full());
        }
        let total = Arc::clone(&self.total)
            .try_acquire_owned()
            .map_err(|_| full())?;
        *open.entry(connection).or_default() += 1;
        Ok(WatchPermit {
            _total: total,
            connection,
            open: Arc::clone(&self.open),
        })
    }

    /// Streams open now.
    pub fn open_streams(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .sum()
    }
}

fn same_digest(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    fn watchers(per_connection: usize, total: usize) -> Watchers {
        Watchers::new(&WatchersConfig {
            credentials: vec![Secret::new("a-watcher-credential-of-32-bytes!".to_owned())],
            max_streams: total,
            max_streams_per_connection: per_connection,
        })
    }

    const GOOD: Option<&str> = Some("a-watcher-credential-of-32-bytes!");

    fn addr(port: u16) -> Option<SocketAddr> {
        Some(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    #[test]
    fn only_a_configured_credential_is_admitted() {
        let w = watchers(4, 4);
        assert!(matches!(
            w.admit(None, addr(1)),
            Err(AuthError::Unauthenticated)
        ));
        assert!(matches!(
            w.admit(Some("a-watcher-credential-of-32-bytes?"), addr(1)),
            Err(AuthError::NotAWatcher)
        ));
        assert!(w.admit(GOOD, addr(1)).is_ok());
        let nobody = Watchers::new(&WatchersConfig {
            credentials: Vec::new(),
            max_streams: 4,
            max_streams_per_connection: 4,
        });
        assert!(matches!(
            nobody.admit(Some(""), addr(1)),
            Err(AuthError::NotAWatcher)
        ));
    }

    #[test]
    fn streams_are_capped_per_connection_and_in_all_and_given_back() {
        let w = watchers(2, 3);
        let a1 = w.admit(GOOD, addr(1)).unwrap();
        let _a2 = w.admit(GOOD, addr(1)).unwrap();
        assert!(matches!(
            w.admit(GOOD, addr(1)),
            Err(AuthError::TooManyWatchers { .. })
        ));
        let _b1 = w.admit(GOOD, addr(2)).unwrap();
        assert!(matches!(
            w.admit(GOOD, addr(3)),
            Err(AuthError::TooManyWatchers { .. })
        ));
        assert_eq!(w.open_streams(), 3);
        drop(a1);
        assert_eq!(w.open_streams(), 2);
        assert!(w.admit(GOOD, addr(1)).is_ok());
    }
}

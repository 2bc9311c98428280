//! Sessions and the logout blacklist: in Redis, or (embedded mode) in this process.
//! Both keep the same semantics; every time passed in is the caller's clock.

pub mod cache;
pub mod memory;
pub mod redis;
pub mod revocations;

use crate::config::SessionsBackend;
use crate::store::redis_conn::RedisConn;
use crate::store::throttle::{MemoryThrottle, RedisThrottle, ThrottleStore};
use crate::store::{PoolStats, StoreError};

pub use cache::SessionCache;
pub use memory::MemorySessions;
pub use redis::RedisSessions;
pub use revocations::{Cursor, Event, Feed, Revocation};

/// A session as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// Session id.
    pub session_id: String,
    /// The `jti` of the session's token.
    pub jti: String,
    /// Login time (unix seconds).
    pub login_time: i64,
    /// Last activity seen by ValidateToken, at one-minute granularity.
    pub last_seen: i64,
    /// When the session ends unless extended.
    pub idle_expires_at: i64,
    /// The token's `exp`.
    pub token_expires_at: i64,
    /// The absolute end, fixed at login: `login + SESSION_MAX_LIFETIME`.
    pub absolute_end: i64,
    /// Client IP, without port.
    pub ip: String,
    /// Client user agent.
    pub user_agent: String,
    /// How the user logged in, space-separated (`pwd`, `pwd otp`); empty for a session
    /// stored before this was kept.
    pub amr: String,
}

impl SessionRecord {
    /// The earlier of the idle expiry and the token's expiry: what ListSessions shows.
    pub fn expires_at(&self) -> i64 {
        self.idle_expires_at.min(self.token_expires_at)
    }

    /// When the store lets the session go: at its idle expiry, or once no token of it
    /// can verify any more (its absolute end + leeway), whichever comes first.
    pub fn ends_at(&self, leeway: i64) -> i64 {
        session_end(self.idle_expires_at, self.absolute_end, leeway)
    }
}

/// What Refresh needs of a session, read in one round trip. Its `Debug` leaves out the
/// key and the token hashes.
#[derive(Clone, PartialEq, Eq)]
pub struct RefreshState {
    /// The session's refresh key `k`, 64 hex digits.
    pub key: String,
    /// SHA-256 (hex) of the current refresh token.
    pub current: String,
    /// SHA-256 (hex) of the one before it; `None` before the first rotation.
    pub previous: Option<String>,
    /// The current token's generation.
    pub generation: u64,
    /// When the current token was made (unix seconds): login or the last rotation.
    pub rotated_at: i64,
    /// The absolute end.
    pub ends_at: i64,
    /// The idle expiry.
    pub idle_expires_at: i64,
    /// Login time: the tokens' `auth_time`.
    pub login_time: i64,
    /// The username the tokens carry.
    pub username: String,
    /// How the user logged in (the tokens' `amr`), space-separated.
    pub amr: String,
}

impl std::fmt::Debug for RefreshState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // With the key, anyone who reads this can mint the session's tokens; the hashes
        // say which token is live. None of them is ever printed.
        f.debug_struct("RefreshState")
            .field("generation", &self.generation)
            .field("rotated_at", &self.rotated_at)
            .field("ends_at", &self.ends_at)
            .field("idle_expires_at", &self.idle_expires_at)
            .field("login_time", &self.login_time)
            .field("username", &self.username)
            .field("amr", &self.amr)
            .finish_non_exhaustive()
    }
}

/// A rotation to record, if the session still holds the token it replaces. Its `Debug`
/// leaves out the token hashes.
#[derive(Clone)]
pub struct Rotation<'a> {
    /// Owner.
    pub user_id: &'a str,
    /// Session id.
    pub session_id: &'a str,
    /// Hash of the token being replaced: the session must still hold it.
    pub expected: &'a str,
    /// Hash of its successor.
    pub next: &'a str,
    /// The successor's generation.
    pub generation: u64,
    /// Now (unix seconds): the rotation time, the new access token's `iat`.
    pub now: i64,
    /// The new access token's `jti`.
    pub jti: &'a str,
    /// The new access token's `exp`.
    pub token_expires_at: i64,
    /// The new idle expiry.
    pub idle_expires_at: i64,
}

impl std::fmt::Debug for Rotation<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rotation")
            .field("user_id", &self.user_id)
            .field("session_id", &self.session_id)
            .field("generation", &self.generation)
            .field("now", &self.now)
            .field("jti", &self.jti)
            .field("token_expires_at", &self.token_expires_at)
            .field("idle_expires_at", &self.idle_expires_at)
            .finish_non_exhaustive()
    }
}

/// A page of a user's sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionPage {
    /// Live sessions in all.
    pub total: u32,
    /// This page's, each with its login number, oldest first.
    pub sessions: Vec<(u64, SessionRecord)>,
    /// The login number to continue after, when there are more.
    pub next_after: Option<u64>,
}

impl SessionPage {
    /// A page from up to `limit` + 1 sessions: the one past `limit` only says that there
    /// are more.
    fn new(total: u32, mut sessions: Vec<(u64, SessionRecord)>, limit: usize) -> Self {
        let more = sessions.len() > limit;
        sessions.truncate(limit);
        let next_after = if more {
            sessions.last().map(|(order, _)| *order)
        } else {
            None
        };
        Self {
            total,
            sessions,
            next_after,
        }
    }
}

/// What one round trip learns about a token's session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionState {
    /// The token's `jti` is blacklisted.
    Revoked,
    /// No session with this id holds this token.
    Missing,
    /// The session exists.
    Live {
        /// Last activity recorded.
        last_seen: i64,
        /// When it ends unless extended.
        idle_expires_at: i64,
        /// The user's roles as mirrored beside the sessions (comma-framed), read in the
        /// same round trip; `None` when the mirror is missing (the users table then says).
        roles: Option<String>,
    },
}

/// A session to create. Its `Debug` leaves out the refresh key and token hash.
#[derive(Clone)]
pub struct NewSession<'a> {
    /// Owner.
    pub user_id: &'a str,
    /// Session id.
    pub session_id: &'a str,
    /// The token's `jti`.
    pub jti: &'a str,
    /// Login time (unix seconds).
    pub now: i64,
    /// Idle expiry.
    pub idle_expires_at: i64,
    /// The token's `exp`.
    pub token_expires_at: i64,
    /// The absolute end: `now + SESSION_MAX_LIFETIME`.
    pub absolute_end: i64,
    /// Client IP.
    pub ip: &'a str,
    /// Client user agent.
    pub user_agent: &'a str,
    /// The username, for the access tokens Refresh issues.
    pub username: &'a str,
    /// How the user logged in, space-separated (`pwd`).
    pub amr: &'a str,
    /// The refresh key, 64 hex digits.
    pub refresh_key: &'a str,
    /// SHA-256 (hex) of the first refresh token.
    pub refresh_hash: &'a str,
}

impl std::fmt::Debug for NewSession<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewSession")
            .field("user_id", &self.user_id)
            .field("session_id", &self.session_id)
            .field("jti", &self.jti)
            .field("now", &self.now)
            .field("idle_expires_at", &self.idle_expires_at)
            .field("token_expires_at", &self.token_expires_at)
            .field("absolute_end", &self.absolute_end)
            .field("ip", &self.ip)
            .field("user_agent", &self.user_agent)
            .field("username", &self.username)
            .field("amr", &self.amr)
            .finish_non_exhaustive()
    }
}

/// Where sessions live, and (`SESSION_CACHE=on`) this instance's cache of live-session
/// answers in front of them.
///
/// Every method here that writes something that may end a session or change what
/// ValidateToken answers (create with its evictions, logout, rotate, revoke,
/// revoke_others, a touch that finds the token gone, mirror_roles, forget_roles,
/// publish) invalidates the user's cached answers before its write and again after it,
/// however it ends: the one place where no caller can forget it (docs/design.md §12).
#[derive(Debug)]
pub struct SessionStore {
    backend: Backend,
    cache: Option<std::sync::Arc<SessionCache>>,
}

/// The store itself.
#[derive(Debug)]
pub enum Backend {
    /// Redis, shared by every instance.
    Redis(Box<RedisSessions>),
    /// This process only.
    Memory(MemorySessions),
}

impl SessionStore {
    /// Opens the configured backend (Redis connections are made lazily). `leeway` is the
    /// token leeway in seconds: a session outlives its token's `exp` by that much.
    pub fn new(
        backend: &SessionsBackend,
        leeway: i64,
        log_max_len: usize,
        token_ttl: std::time::Duration,
    ) -> anyhow::Result<Self> {
        let retention =
            token_ttl + std::time::Duration::from_secs(u64::try_from(leeway).unwrap_or(0));
        Ok(Self::from_backend(match backend {
            SessionsBackend::Redis(config) => Backend::Redis(Box::new(RedisSessions::new(
                RedisConn::new(config)?,
                config,
                leeway,
                log_max_len,
                retention,
            )?)),
            SessionsBackend::Memory => Backend::Memory(MemorySessions::new(leeway, log_max_len)),
        }))
    }

    /// A store on `backend`, without a cache.
    pub fn from_backend(backend: Backend) -> Self {
        Self {
            backend,
            cache: None,
        }
    }

    /// The store itself.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// The Redis revocation log, when the sessions are in Redis.
    pub fn redis_log(&self) -> Option<&std::sync::Arc<revocations::RedisLog>> {
        match &self.backend {
            Backend::Redis(r) => Some(r.log()),
            Backend::Memory(_) => None,
        }
    }

    /// Puts a cache of live-session answers in front of the store (`SESSION_CACHE=on`),
    /// and starts the task that keeps it in step with the revocation log; it ends with
    /// the store. Call within a Tokio runtime.
    pub fn enable_cache(&mut self, config: &crate::config::SessionCacheConfig) {
        let cache = std::sync::Arc::new(SessionCache::new(config.ttl, config.max_entries));
        let source = match &self.backend {
            Backend::Redis(r) => cache::LogSource::Redis(std::sync::Arc::clone(r.log())),
            Backend::Memory(m) => cache::LogSource::Memory(std::sync::Arc::clone(m.log())),
        };
        tokio::spawn(cache::follow(std::sync::Arc::downgrade(&cache), source));
        self.cache = Some(cache);
    }

    /// The cache, when there is one.
    pub fn cache(&self) -> Option<&SessionCache> {
        self.cache.as_deref()
    }

    /// Invalidates the user's cached answers now and when the guard drops.
    fn invalidating<'a>(&'a self, user_id: &'a str) -> cache::Invalidation<'a> {
        cache::Invalidation::begin(self.cache(), user_id)
    }

    /// How many Redis connections the pool holds; `None` in memory.
    pub fn pool_stats(&self) -> Option<PoolStats> {
        match &self.backend {
            Backend::Redis(s) => Some(s.pool_stats()),
            Backend::Memory(_) => None,
        }
    }

    /// Appends a revocation to the log that caching callers watch.
    pub async fn publish(&self, revocation: &Revocation, at: i64) -> Result<(), StoreError> {
        let _invalidated = self.invalidating(revocation.user_id());
        match &self.backend {
            Backend::Redis(r) => r.publish(revocation, at).await,
            Backend::Memory(m) => {
                m.log().publish(revocation.clone(), at);
                Ok(())
            }
        }
    }

    /// Revocations missed after `after` (or none: from now), then live ones.
    pub async fn subscribe(&self, after: Option<Cursor>) -> Result<Feed, StoreError> {
        match &self.backend {
            Backend::Redis(r) => r.subscribe(after).await,
            Backend::Memory(m) => Ok(m.log().subscribe(after)),
        }
    }

    /// A store for throttle counters beside the sessions: the same Redis (so every
    /// instance shares them), or this process.
    pub fn throttle_store(&self) -> ThrottleStore {
        match &self.backend {
            Backend::Redis(r) => {
                ThrottleStore::Redis(RedisThrottle::new(r.conn().clone(), r.prefix()))
            }
            Backend::Memory(_) => ThrottleStore::Memory(MemoryThrottle::new()),
        }
    }

    /// A store for second-factor tickets beside the sessions: the same Redis, or this
    /// process.
    pub fn mfa_tickets(&self) -> crate::store::mfa::MfaTickets {
        match &self.backend {
            Backend::Redis(r) => crate::store::mfa::MfaTickets::redis(r.conn().clone(), r.prefix()),
            Backend::Memory(_) => crate::store::mfa::MfaTickets::memory(),
        }
    }

    /// Answers when the store is reachable.
    pub async fn ping(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Redis(s) => s.ping().await,
            Backend::Memory(_) => Ok(()),
        }
    }

    /// Stores a new session; past `max_sessions` (0 = unlimited) the user's oldest
    /// sessions are revoked. Returns the ids of the sessions so ended.
    pub async fn create(
        &self,
        s: &NewSession<'_>,
        max_sessions: u32,
    ) -> Result<Vec<String>, StoreError> {
        // Past the limit, the user's oldest sessions are revoked in the same write.
        let _invalidated = self.invalidating(s.user_id);
        match &self.backend {
            Backend::Redis(r) => r.create(s, max_sessions).await,
            Backend::Memory(m) => Ok(m.create(s, max_sessions)),
        }
    }

    /// Is the `jti` blacklisted, and does the session hold this token? With the cache,
    /// a live answer read less than its TTL ago (and whose session is not idle past
    /// `now`) is answered without asking the store; live answers read from the store
    /// with the user's roles mirrored are kept for the next calls.
    pub async fn check(
        &self,
        user_id: &str,
        session_id: &str,
        jti: &str,
        now: i64,
    ) -> Result<SessionState, StoreError> {
        let ticket = match self.cache() {
            None => None,
            Some(cache) => match cache.lookup(user_id, session_id, jti, now) {
                cache::Lookup::Hit(state) => return Ok(state),
                cache::Lookup::Miss(ticket) => ticket,
            },
        };
        // The ticket is taken before this read: whatever is invalidated for the user
        // from here on voids the answer's insertion (the fill race).
        let state = match &self.backend {
            // Boxed: the Redis call's state is large, and every caller's future (each
            // ValidateToken's) would otherwise carry it, and move it, even on a hit.
            Backend::Redis(r) => Box::pin(r.check(user_id, session_id, jti)).await,
            Backend::Memory(m) => Ok(m.check(user_id, session_id, jti, now)),
        }?;
        if let (Some(cache), Some(ticket)) = (self.cache(), ticket) {
            cache.fill(ticket, user_id, session_id, jti, &state, now);
        }
        Ok(state)
    }

    /// Mirrors the user's roles (comma-framed) beside the sessions, for `ttl_seconds`.
    /// With `only_if_missing` (Login, and ValidateToken refilling a missing mirror from
    /// the users table) an existing mirror is kept: it was written by SetRoles, or from a
    /// read no older than this one's, so an answer read before a SetRoles can never
    /// overwrite what SetRoles wrote after it.
    pub async fn mirror_roles(
        &self,
        user_id: &str,
        roles: &str,
        only_if_missing: bool,
        ttl_seconds: i64,
    ) -> Result<(), StoreError> {
        let _invalidated = self.invalidating(user_id);
        match &self.backend {
            Backend::Redis(r) => {
                r.mirror_roles(user_id, roles, only_if_missing, ttl_seconds)
                    .await
            }
            Backend::Memory(m) => {
                m.mirror_roles(user_id, roles, only_if_missing);
                Ok(())
            }
        }
    }

    /// Forgets the mirror of a user's roles (a deleted user).
    pub async fn forget_roles(&self, user_id: &str) -> Result<(), StoreError> {
        let _invalidated = self.invalidating(user_id);
        match &self.backend {
            Backend::Redis(r) => r.forget_roles(user_id).await,
            Backend::Memory(m) => {
                m.forget_roles(user_id);
                Ok(())
            }
        }
    }

    /// Records activity: moves `seen` to `now` and the idle expiry forward. False when
    /// the session no longer holds this token.
    pub async fn touch(&self, t: &Touch<'_>) -> Result<bool, StoreError> {
        let touched = match &self.backend {
            Backend::Redis(r) => r.touch(t).await,
            Backend::Memory(m) => Ok(m.touch(t)),
        };
        if let Some(cache) = self.cache() {
            match touched {
                // The held answer (if any) now says what the store says.
                Ok(true) => cache.touched(t.user_id, t.jti, t.now, t.idle_expires_at),
                // The token is no longer its session's (or the store could not say).
                _ => cache.invalidate_user(t.user_id),
            }
        }
        touched
    }

    /// Blacklists the token for `blacklist_ttl_seconds` and ends the session it names,
    /// if that still exists: a verified token naming a session was issued for it, even
    /// when rotations have replaced it since. `None` when the token was already revoked
    /// and that announced (or being announced): nothing changed, there is nothing new to
    /// record. `Some(true)` when another access token of the ended session may be live
    /// (it had been refreshed, or the token was not its current one): the whole session
    /// must be announced, not only this token.
    pub async fn logout(
        &self,
        user_id: &str,
        session_id: &str,
        jti: &str,
        now_ms: i64,
        blacklist_ttl_seconds: i64,
    ) -> Result<Option<bool>, StoreError> {
        let _invalidated = self.invalidating(user_id);
        match &self.backend {
            Backend::Redis(r) => {
                r.logout(user_id, session_id, jti, now_ms, blacklist_ttl_seconds)
                    .await
            }
            Backend::Memory(m) => Ok(m.logout(
                user_id,
                session_id,
                jti,
                now_ms.div_euclid(1000),
                blacklist_ttl_seconds,
            )),
        }
    }

    /// What Refresh needs of a session; `None` when it does not exist (or has no
    /// refresh key).
    pub async fn refresh_state(
        &self,
        user_id: &str,
        session_id: &str,
        now: i64,
    ) -> Result<Option<RefreshState>, StoreError> {
        match &self.backend {
            Backend::Redis(r) => r.refresh_state(user_id, session_id).await,
            Backend::Memory(m) => Ok(m.refresh_state(user_id, session_id, now)),
        }
    }

    /// Records a rotation in one atomic step, if the session still holds the token it
    /// replaces. False when it does not (another call rotated first, or the session
    /// ended): nothing changed.
    pub async fn rotate(&self, r: &Rotation<'_>) -> Result<bool, StoreError> {
        // The access token two rotations old stops being the session's.
        let _invalidated = self.invalidating(r.user_id);
        match &self.backend {
            Backend::Redis(s) => s.rotate(r).await,
            Backend::Memory(m) => Ok(m.rotate(r)),
        }
    }

    /// Ends one of the user's sessions. False when it did not exist (or had already ended).
    pub async fn revoke(
        &self,
        user_id: &str,
        session_id: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        let _invalidated = self.invalidating(user_id);
        match &self.backend {
            Backend::Redis(r) => r.revoke(user_id, session_id, now).await,
            Backend::Memory(m) => Ok(m.revoke(user_id, session_id, now)),
        }
    }

    /// Ends every session of the user but `keep`. Returns how many live ones ended.
    pub async fn revoke_others(
        &self,
        user_id: &str,
        keep: &str,
        now: i64,
    ) -> Result<u32, StoreError> {
        let _invalidated = self.invalidating(user_id);
        match &self.backend {
            Backend::Redis(r) => r.revoke_others(user_id, keep, now).await,
            Backend::Memory(m) => Ok(m.revoke_others(user_id, keep, now)),
        }
    }

    /// At most `limit` of the user's live sessions, in login order, after the one
    /// with login number `after` (0: from the first).
    pub async fn list(
        &self,
        user_id: &str,
        now: i64,
        after: u64,
        limit: usize,
    ) -> Result<SessionPage, StoreError> {
        match &self.backend {
            Backend::Redis(r) => r.list(user_id, now, after, limit).await,
            Backend::Memory(m) => Ok(m.list(user_id, now, after, limit)),
        }
    }
}

/// A session's activity to record.
#[derive(Debug, Clone)]
pub struct Touch<'a> {
    /// Owner.
    pub user_id: &'a str,
    /// Session id.
    pub session_id: &'a str,
    /// The token's `jti`: only a session still holding it is extended.
    pub jti: &'a str,
    /// Now (unix seconds).
    pub now: i64,
    /// The new idle expiry.
    pub idle_expires_at: i64,
}

/// When a session ends: the earlier of its idle expiry and its absolute end + leeway
/// (the last moment a token of it can verify).
pub fn session_end(idle_expires_at: i64, absolute_end: i64, leeway: i64) -> i64 {
    idle_expires_at.min(absolute_end.saturating_add(leeway))
}

/// How long a revoked `jti` must stay blacklisted: as long as the token could verify.
pub fn blacklist_ttl(token_expires_at: i64, now: i64, leeway: i64) -> i64 {
    token_expires_at
        .saturating_sub(now)
        .saturating_add(leeway)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b";
    const CURRENT: &str = "c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0";
    const PREVIOUS: &str = "9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e9e";

    #[track_caller]
    fn shows_no_secret(shown: &str) {
        for secret in [KEY, CURRENT, PREVIOUS] {
            assert!(!shown.contains(secret), "{shown}");
        }
    }

    /// A session of user `u` to create, for this module's tests and its stores'.
    pub(super) fn new_session<'a>(sid: &'a str, jti: &'a str, now: i64) -> NewSession<'a> {
        NewSession {
            user_id: "u",
            session_id: sid,
            jti,
            now,
            idle_expires_at: now + 3600,
            token_expires_at: now + 86_400,
            absolute_end: now + 86_400,
            ip: "127.0.0.1",
            user_agent: "t",
            username: "alice",
            amr: "pwd",
            refresh_key: KEY,
            refresh_hash: CURRENT,
        }
    }

    #[test]
    fn nothing_that_holds_a_refresh_key_or_token_hash_shows_it() {
        let state = RefreshState {
            key: KEY.into(),
            current: CURRENT.into(),
            previous: Some(PREVIOUS.into()),
            generation: 3,
            rotated_at: 1000,
            ends_at: 9000,
            idle_expires_at: 5000,
            login_time: 900,
            username: "alice".into(),
            amr: "pwd".into(),
        };
        let rotation = Rotation {
            user_id: "u",
            session_id: "s",
            expected: PREVIOUS,
            next: CURRENT,
            generation: 4,
            now: 1000,
            jti: "j",
            token_expires_at: 2000,
            idle_expires_at: 4600,
        };
        let new = new_session("s", "j", 1000);
        for shown in [
            format!("{state:?} {state:#?}"),
            format!("{rotation:?} {rotation:#?}"),
            format!("{new:?} {new:#?}"),
        ] {
            shows_no_secret(&shown);
            assert!(
                shown.contains("alice") || shown.contains("\"u\""),
                "{shown}"
            );
        }
        // The in-process store, holding a session and its rotation.
        let m = MemorySessions::new(30, 16);
        m.create(&new, 0);
        assert!(m.rotate(&Rotation {
            expected: CURRENT,
            next: PREVIOUS,
            ..rotation
        }));
        let shown = format!("{m:?} {m:#?}");
        assert!(shown.contains("alice"), "{shown}");
        shows_no_secret(&shown);
        let store = SessionStore::from_backend(Backend::Memory(m));
        shows_no_secret(&format!("{store:?}"));
    }

    /// A memory store with a following cache and no follower task: only the store's
    /// own invalidations can drop an answer.
    fn cached_store() -> SessionStore {
        let cache =
            std::sync::Arc::new(SessionCache::new(std::time::Duration::from_secs(600), 100));
        cache.set_following(true);
        SessionStore {
            backend: Backend::Memory(MemorySessions::new(30, 16)),
            cache: Some(cache),
        }
    }

    async fn warm(store: &SessionStore, sid: &str, jti: &str) {
        store.mirror_roles("u", ",user,", true, 3600).await.unwrap();
        for _ in 0..2 {
            assert!(matches!(
                store.check("u", sid, jti, 1000).await.unwrap(),
                SessionState::Live { .. }
            ));
        }
        assert_eq!(store.cache().unwrap().len(), 1, "{sid} is cached");
    }

    /// A write through the store, by name.
    type Write = Box<dyn Fn(&SessionStore) -> futures::future::BoxFuture<'_, ()>>;

    #[tokio::test]
    async fn every_write_that_may_revoke_drops_the_users_cached_answers_before_it_returns() {
        let store = cached_store();
        let cache = || store.cache().unwrap();
        store
            .create(&new_session("s1", "j1", 1000), 0)
            .await
            .unwrap();
        warm(&store, "s1", "j1").await;
        // A hit: the store itself changed behind the cache's back is not seen...
        if let Backend::Memory(m) = &store.backend {
            m.revoke("u", "s1", 1000);
        }
        assert!(matches!(
            store.check("u", "s1", "j1", 1000).await.unwrap(),
            SessionState::Live { .. }
        ));
        cache().reset();
        // ...but every write through the store is.
        let writes: Vec<(&str, Write)> = vec![
            (
                "logout",
                Box::new(|s| {
                    Box::pin(async move {
                        s.logout("u", "s2", "j2", 1_000_000, 60).await.unwrap();
                    })
                }),
            ),
            (
                "revoke",
                Box::new(|s| {
                    Box::pin(async move {
                        s.revoke("u", "s2", 1000).await.unwrap();
                    })
                }),
            ),
            (
                "revoke_others",
                Box::new(|s| {
                    Box::pin(async move {
                        s.revoke_others("u", "none", 1000).await.unwrap();
                    })
                }),
            ),
            (
                "mirror_roles",
                Box::new(|s| {
                    Box::pin(async move {
                        s.mirror_roles("u", ",admin,", false, 3600).await.unwrap();
                    })
                }),
            ),
            (
                "forget_roles",
                Box::new(|s| {
                    Box::pin(async move {
                        s.forget_roles("u").await.unwrap();
                    })
                }),
            ),
            (
                "create",
                Box::new(|s| {
                    Box::pin(async move {
                        s.create(&new_session("s3", "j3", 1000), 1).await.unwrap();
                    })
                }),
            ),
            (
                "publish",
                Box::new(|s| {
                    Box::pin(async move {
                        s.publish(
                            &Revocation::UserUpdated {
                                user_id: "u".into(),
                            },
                            1000,
                        )
                        .await
                        .unwrap();
                    })
                }),
            ),
            (
                "rotate",
                Box::new(|s| {
                    Box::pin(async move {
                        s.rotate(&Rotation {
                            user_id: "u",
                            session_id: "s2",
                            expected: CURRENT,
                            next: PREVIOUS,
                            generation: 1,
                            now: 1000,
                            jti: "j2b",
                            token_expires_at: 5000,
                            idle_expires_at: 4600,
                        })
                        .await
                        .unwrap();
                    })
                }),
            ),
            (
                "a touch that finds the token gone",
                Box::new(|s| {
                    Box::pin(async move {
                        let touched = s
                            .touch(&Touch {
                                user_id: "u",
                                session_id: "s2",
                                jti: "gone",
                                now: 1000,
                                idle_expires_at: 4600,
                            })
                            .await
                            .unwrap();
                        assert!(!touched);
                    })
                }),
            ),
        ];
        for (i, (what, write)) in writes.into_iter().enumerate() {
            // The first write, Logout, blacklists its token: each round has its own.
            let jti = format!("j2-{i}");
            store
                .create(&new_session("s2", &jti, 1000), 0)
                .await
                .unwrap();
            warm(&store, "s2", &jti).await;
            write(&store).await;
            assert!(cache().is_empty(), "{what} left the user's answers cached");
        }
    }

    #[tokio::test]
    async fn a_touch_that_lands_keeps_the_answer_and_moves_it_forward() {
        let store = cached_store();
        store
            .create(&new_session("s1", "j1", 1000), 0)
            .await
            .unwrap();
        warm(&store, "s1", "j1").await;
        let touched = store
            .touch(&Touch {
                user_id: "u",
                session_id: "s1",
                jti: "j1",
                now: 1070,
                idle_expires_at: 4670,
            })
            .await
            .unwrap();
        assert!(touched);
        assert_eq!(
            store.check("u", "s1", "j1", 1071).await.unwrap(),
            SessionState::Live {
                last_seen: 1070,
                idle_expires_at: 4670,
                roles: Some(",user,".into())
            }
        );
    }

    #[test]
    fn blacklist_ttl_covers_the_leeway_and_is_never_zero() {
        assert_eq!(blacklist_ttl(1000, 400, 30), 630);
        assert_eq!(blacklist_ttl(1000, 1030, 30), 1);
        assert_eq!(blacklist_ttl(1000, 5000, 30), 1);
    }
}

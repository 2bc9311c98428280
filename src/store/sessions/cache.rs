//! The instance-local cache of live-session answers (`SESSION_CACHE=on`; docs/design.md
//! §12): what [`super::SessionStore::check`] read from the store, used again for at most
//! the TTL without a round trip, while this instance follows the revocation log.
//!
//! Correctness rests on three rules:
//! - **Invalidation by user.** Every revocation names a user; the user's answers are
//!   dropped when it is read on the log, and, on the instance that makes it, by the
//!   store's own mutating methods before and after their write (see
//!   [`super::SessionStore`]), so it is in force here before the call returns.
//! - **Epochs against the fill race.** A miss reads the store, then inserts what it
//!   read. A revocation applied between the read and the insert must win: the miss takes
//!   a [`Ticket`] (its shard's epoch and the global one) before the read, every
//!   invalidation bumps the shard's epoch, every reset and every loss of the log bumps
//!   the global one, and an answer is inserted only if neither moved.
//! - **Following.** Answers are used and kept only while this instance is known to
//!   follow the log; losing it empties the cache and every call goes to the store.
//!
//! Memory: an answer holds its `jti`, session id and four integers, in a short list per
//! user beside the user's roles (shared); users in a hash map per shard. Measured (RSS,
//! 100,000 answers with ids of authd's sizes): about 310 bytes an answer when every user
//! has one session (the worst case: 30 MiB at the default 100,000), 160–220 with several
//! sessions per user.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use super::SessionState;
use super::revocations::{Event, Feed, TailState};
use crate::store::StoreError;

/// Shards of the cache: each a lock and an invalidation epoch of its own.
const SHARDS: usize = 64;

/// Answers kept for one user at most (each look-up of the user's reads them in turn);
/// the user's other sessions are read from the store each time.
pub const MAX_ANSWERS_PER_USER: usize = 64;

/// The cache.
pub struct SessionCache {
    shards: Box<[Mutex<Shard>]>,
    hasher: std::collections::hash_map::RandomState,
    /// Bumped by every reset and every loss of the log: fills taken before it are void.
    global_epoch: AtomicU64,
    /// Whether this instance is known to follow the revocation log now.
    following: AtomicBool,
    /// Entries held, across the shards.
    entries: AtomicUsize,
    max_entries: usize,
    /// TTL in whole seconds.
    ttl: i64,
    /// When the last sweep of a full cache ran (unix seconds, the caller's clock).
    last_sweep: AtomicI64,
    /// The hot path's counters, looked up once (a registry lookup per call otherwise).
    hits: metrics::Counter,
    misses: metrics::Counter,
}

impl std::fmt::Debug for SessionCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionCache")
            .field("entries", &self.entries.load(Ordering::Relaxed))
            .field("max_entries", &self.max_entries)
            .field("ttl", &self.ttl)
            .field("following", &self.following.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Shard {
    epoch: u64,
    /// User → the user's roles and answers.
    users: HashMap<String, UserEntries>,
}

struct UserEntries {
    /// The user's mirrored roles as the answers read them. Every change of roles
    /// drops the user's answers (SetRoles' invalidation), so one value serves them all.
    roles: Arc<str>,
    /// By `jti`: a short list (a user has few sessions, at most
    /// [`MAX_ANSWERS_PER_USER`] answers are kept), far smaller than a map per user.
    answers: Vec<(String, Entry)>,
}

impl UserEntries {
    fn find(&self, jti: &str) -> Option<&Entry> {
        self.answers.iter().find(|(j, _)| j == jti).map(|(_, e)| e)
    }

    fn find_mut(&mut self, jti: &str) -> Option<&mut Entry> {
        self.answers
            .iter_mut()
            .find(|(j, _)| j == jti)
            .map(|(_, e)| e)
    }
}

struct Entry {
    session_id: String,
    last_seen: i64,
    idle_expires_at: i64,
    /// When it was read from the store (unix seconds, the caller's clock).
    filled_at: i64,
}

/// Taken before a store read: the epochs the answer must still hold to be inserted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    shard: usize,
    epoch: u64,
    global: u64,
}

/// What a look-up found.
#[derive(Debug)]
pub enum Lookup {
    /// A usable answer: no round trip.
    Hit(SessionState),
    /// Ask the store; insert what it says with this ticket (`None`: not following, do
    /// not insert).
    Miss(Option<Ticket>),
}

impl SessionCache {
    /// An empty cache of at most `max_entries` answers, each used for at most `ttl`
    /// (counted in whole seconds, at least one). Not following until told.
    pub fn new(ttl: Duration, max_entries: usize) -> Self {
        let shards = (0..SHARDS).map(|_| Mutex::default()).collect();
        metrics::gauge!("authd_session_cache_following").set(0.0);
        Self {
            shards,
            hasher: std::collections::hash_map::RandomState::new(),
            global_epoch: AtomicU64::new(0),
            following: AtomicBool::new(false),
            entries: AtomicUsize::new(0),
            max_entries: max_entries.max(1),
            ttl: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX).max(1),
            last_sweep: AtomicI64::new(i64::MIN),
            hits: metrics::counter!("authd_session_cache_hits_total"),
            misses: metrics::counter!("authd_session_cache_misses_total"),
        }
    }

    fn shard_of(&self, user_id: &str) -> usize {
        usize::try_from(self.hasher.hash_one(user_id) % SHARDS as u64).unwrap_or(0)
    }

    fn lock(&self, shard: usize) -> MutexGuard<'_, Shard> {
        // Every change is one insert or remove and a counter: a panic cannot leave a
        // shard half-changed.
        self.shards[shard].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Answers held now (entries past their TTL included until swept).
    pub fn len(&self) -> usize {
        self.entries.load(Ordering::Acquire)
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether answers are used now.
    pub fn is_following(&self) -> bool {
        self.following.load(Ordering::SeqCst)
    }

    /// The answer for the token `jti` of `session_id`, if one is held that is younger
    /// than the TTL and whose session is not idle past `now`; otherwise a ticket for
    /// the store read.
    pub fn lookup(&self, user_id: &str, session_id: &str, jti: &str, now: i64) -> Lookup {
        if !self.is_following() {
            self.misses.increment(1);
            return Lookup::Miss(None);
        }
        let shard = self.shard_of(user_id);
        // Read before the shard's epoch: a reset after this voids the ticket.
        let global = self.global_epoch.load(Ordering::SeqCst);
        let mut guard = self.lock(shard);
        let mut stale = false;
        if let Some(user) = guard.users.get(user_id)
            && let Some(entry) = user.find(jti)
        {
            if entry.session_id == session_id
                && now.saturating_sub(entry.filled_at) < self.ttl
                && now >= entry.filled_at
                && entry.idle_expires_at > now
            {
                self.hits.increment(1);
                return Lookup::Hit(SessionState::Live {
                    last_seen: entry.last_seen,
                    idle_expires_at: entry.idle_expires_at,
                    roles: Some(user.roles.to_string()),
                });
            }
            stale = true;
        }
        if stale {
            self.remove_answer(&mut guard, user_id, jti);
        }
        self.misses.increment(1);
        Lookup::Miss(Some(Ticket {
            shard,
            epoch: guard.epoch,
            global,
        }))
    }

    /// Inserts what the store answered for a miss, if it is a live session with its
    /// roles mirrored, not idle past `now`, and nothing was invalidated for the user (or
    /// reset) since `ticket` was taken. True when inserted.
    pub fn fill(
        &self,
        ticket: Ticket,
        user_id: &str,
        session_id: &str,
        jti: &str,
        state: &SessionState,
        now: i64,
    ) -> bool {
        let SessionState::Live {
            last_seen,
            idle_expires_at,
            roles: Some(roles),
        } = state
        else {
            return false;
        };
        if *idle_expires_at <= now {
            return false;
        }
        if self.len() >= self.max_entries {
            self.sweep_if_due(now);
        }
        let mut guard = self.lock(ticket.shard);
        // Checked under the shard's lock: an invalidation or reset either came first
        // (and moved an epoch) or comes after and drops what is inserted here.
        if !self.is_following()
            || guard.epoch != ticket.epoch
            || self.global_epoch.load(Ordering::SeqCst) != ticket.global
        {
            metrics::counter!("authd_session_cache_fills_refused_total").increment(1);
            return false;
        }
        let shard = &mut *guard;
        let (replaces, user_full) = shard.users.get(user_id).map_or((false, false), |u| {
            (
                u.find(jti).is_some(),
                u.answers.len() >= MAX_ANSWERS_PER_USER,
            )
        });
        if !replaces && (user_full || !self.reserve()) {
            metrics::counter!("authd_session_cache_full_total").increment(1);
            return false;
        }
        let user = shard
            .users
            .entry(user_id.to_owned())
            .or_insert_with(|| UserEntries {
                roles: Arc::from(roles.as_str()),
                answers: Vec::with_capacity(1),
            });
        if *user.roles != **roles {
            // Answers read at different times differ only while the SetRoles event that
            // drops them all is on its way: the latest read serves them all meanwhile.
            user.roles = Arc::from(roles.as_str());
        }
        let entry = Entry {
            session_id: session_id.to_owned(),
            last_seen: *last_seen,
            idle_expires_at: *idle_expires_at,
            filled_at: now,
        };
        match user.find_mut(jti) {
            Some(held) => *held = entry,
            None => user.answers.push((jti.to_owned(), entry)),
        }
        self.report_size();
        true
    }

    /// Counts one more entry unless the cache is full.
    fn reserve(&self) -> bool {
        self.entries
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_entries).then_some(n + 1)
            })
            .is_ok()
    }

    /// A touch of the session recorded activity: the held answer (if any) says so.
    pub fn touched(&self, user_id: &str, jti: &str, now: i64, idle_expires_at: i64) {
        let shard = self.shard_of(user_id);
        let mut guard = self.lock(shard);
        if let Some(entry) = guard.users.get_mut(user_id).and_then(|u| u.find_mut(jti)) {
            entry.last_seen = now;
            entry.idle_expires_at = idle_expires_at;
        }
    }

    /// Drops every answer of the user, and voids the fills under way for it (and for
    /// the others of its shard).
    pub fn invalidate_user(&self, user_id: &str) {
        let shard = self.shard_of(user_id);
        let mut guard = self.lock(shard);
        guard.epoch = guard.epoch.wrapping_add(1);
        if let Some(user) = guard.users.remove(user_id) {
            self.entries.fetch_sub(user.answers.len(), Ordering::AcqRel);
            self.report_size();
        }
        metrics::counter!("authd_session_cache_invalidations_total").increment(1);
    }

    /// Events may have been lost: drops everything, and voids every fill under way.
    pub fn reset(&self) {
        self.global_epoch.fetch_add(1, Ordering::SeqCst);
        self.clear();
        metrics::counter!("authd_session_cache_resets_total").increment(1);
    }

    /// This instance follows the log (again): answers may be used and kept.
    pub fn set_following(&self, following: bool) {
        if following {
            if !self.following.swap(true, Ordering::SeqCst) {
                tracing::info!("session cache: following the revocation log, answering");
            }
            metrics::gauge!("authd_session_cache_following").set(1.0);
        } else {
            let was = self.following.swap(false, Ordering::SeqCst);
            // Emptied even if it was not following (a fill cannot have started since,
            // but this costs nothing).
            self.reset();
            if was {
                tracing::warn!(
                    "session cache: not following the revocation log; emptied, every call asks the store"
                );
            }
            metrics::gauge!("authd_session_cache_following").set(0.0);
        }
    }

    fn clear(&self) {
        for shard in 0..SHARDS {
            let mut guard = self.lock(shard);
            let held: usize = guard.users.values().map(|u| u.answers.len()).sum();
            guard.users.clear();
            self.entries.fetch_sub(held, Ordering::AcqRel);
        }
        self.report_size();
    }

    /// Drops the answers past their TTL or idle expiry; at most once a second (of the
    /// caller's clock) when called for a full cache.
    fn sweep_if_due(&self, now: i64) {
        let last = self.last_sweep.load(Ordering::Acquire);
        if now <= last
            || self
                .last_sweep
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return;
        }
        self.sweep(now);
    }

    /// Drops the answers past their TTL or idle expiry at `now`.
    pub fn sweep(&self, now: i64) {
        let ttl = self.ttl;
        for shard in 0..SHARDS {
            let mut guard = self.lock(shard);
            let mut dropped = 0;
            guard.users.retain(|_, user| {
                let before = user.answers.len();
                user.answers.retain(|(_, e)| {
                    now.saturating_sub(e.filled_at) < ttl
                        && now >= e.filled_at
                        && e.idle_expires_at > now
                });
                dropped += before - user.answers.len();
                !user.answers.is_empty()
            });
            self.entries.fetch_sub(dropped, Ordering::AcqRel);
        }
        self.report_size();
    }

    fn remove_answer(&self, shard: &mut Shard, user_id: &str, jti: &str) {
        if let Some(user) = shard.users.get_mut(user_id)
            && let Some(at) = user.answers.iter().position(|(j, _)| j == jti)
        {
            user.answers.swap_remove(at);
            self.entries.fetch_sub(1, Ordering::AcqRel);
            if user.answers.is_empty() {
                shard.users.remove(user_id);
            }
            self.report_size();
        }
    }

    fn report_size(&self) {
        metrics::gauge!("authd_session_cache_entries").set(self.len() as f64);
    }
}

/// Invalidates a user's answers now and again when dropped: a store write that may
/// revoke holds one across the write, so the user's answers are gone before it starts
/// and after it ends — however it ends (an error, or the call cancelled half-way).
#[derive(Debug)]
pub struct Invalidation<'a> {
    cache: Option<&'a SessionCache>,
    user_id: &'a str,
}

impl<'a> Invalidation<'a> {
    /// Invalidates now (if there is a cache) and on drop.
    pub fn begin(cache: Option<&'a SessionCache>, user_id: &'a str) -> Self {
        if let Some(cache) = cache {
            cache.invalidate_user(user_id);
        }
        Self { cache, user_id }
    }
}

impl Drop for Invalidation<'_> {
    fn drop(&mut self) {
        if let Some(cache) = self.cache {
            cache.invalidate_user(self.user_id);
        }
    }
}

/// Where the cache's follower reads the log.
pub enum LogSource {
    /// The Redis stream, through this process's tail.
    Redis(Arc<super::revocations::RedisLog>),
    /// The in-process ring (embedded mode): always followed.
    Memory(Arc<super::revocations::MemoryLog>),
}

impl LogSource {
    async fn subscribe(&self) -> Result<Feed, StoreError> {
        match self {
            Self::Redis(log) => log.subscribe(None).await,
            Self::Memory(log) => Ok(log.subscribe(None)),
        }
    }

    /// The tail's state; the in-process ring is always followed (a channel whose
    /// sender is gone: it never changes).
    fn following(&self) -> tokio::sync::watch::Receiver<TailState> {
        match self {
            Self::Redis(log) => log.following(),
            Self::Memory(_) => {
                tokio::sync::watch::channel(TailState {
                    following: true,
                    breaks: 0,
                })
                .1
            }
        }
    }
}

/// Follows the log for as long as the cache lives: drops the user's answers on each
/// revocation, everything on a reset, and stops the cache answering whenever this
/// instance is not known to follow the log (the tail is down or stalled, this feed
/// broke).
pub async fn follow(cache: Weak<SessionCache>, source: LogSource) {
    const CHECK_EVERY: Duration = Duration::from_secs(1);
    let mut backoff = Duration::from_millis(100);
    loop {
        match cache.upgrade() {
            Some(c) => c.set_following(false),
            None => return,
        }
        let mut following = source.following();
        let mut feed = match source.subscribe().await {
            Ok(feed) => feed,
            Err(e) => {
                tracing::debug!(error = %e, "session cache: revocation log not followed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        // Subscribed: every event from the tail's position on reaches this feed.
        let mut state = *following.borrow_and_update();
        match cache.upgrade() {
            Some(c) => c.set_following(state.following),
            None => return,
        }
        let mut changes = true;
        loop {
            tokio::select! {
                event = tokio::time::timeout(CHECK_EVERY, feed.next()) => {
                    let Some(c) = cache.upgrade() else { return };
                    match event {
                        Err(_) => {
                            use crate::clock::Clock as _;
                            c.sweep(crate::clock::SystemClock.unix_seconds());
                        }
                        Ok(Some(Ok(Event::Revoked { revocation, .. }))) => {
                            c.invalidate_user(revocation.user_id());
                        }
                        Ok(Some(Ok(Event::Reset { .. }))) => c.reset(),
                        Ok(Some(Err(_)) | None) => break,
                    }
                }
                changed = following.changed(), if changes => {
                    let Some(c) = cache.upgrade() else { return };
                    if changed.is_err() {
                        // Nothing will change it any more (the in-process ring).
                        changes = false;
                        continue;
                    }
                    let now = *following.borrow_and_update();
                    // A break seen late (down and up again between two looks) still
                    // empties the cache.
                    if !now.following || now.breaks != state.breaks {
                        c.set_following(false);
                    }
                    c.set_following(now.following);
                    state = now;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::revocations::Revocation;
    use super::*;

    fn live(last_seen: i64, idle: i64) -> SessionState {
        SessionState::Live {
            last_seen,
            idle_expires_at: idle,
            roles: Some(",user,".into()),
        }
    }

    fn following(ttl: u64, max: usize) -> SessionCache {
        let c = SessionCache::new(Duration::from_secs(ttl), max);
        c.set_following(true);
        c
    }

    fn ticket(c: &SessionCache, user: &str, jti: &str, now: i64) -> Ticket {
        match c.lookup(user, "s", jti, now) {
            Lookup::Miss(Some(t)) => t,
            other => panic!("{other:?}"),
        }
    }

    fn hit(c: &SessionCache, user: &str, jti: &str, now: i64) -> bool {
        matches!(c.lookup(user, "s", jti, now), Lookup::Hit(_))
    }

    #[test]
    fn a_filled_answer_is_used_until_its_ttl_or_idle_expiry() {
        let c = following(30, 10);
        let t = ticket(&c, "u", "j", 1000);
        assert!(c.fill(t, "u", "s", "j", &live(990, 1040), 1000));
        assert!(hit(&c, "u", "j", 1000));
        assert!(hit(&c, "u", "j", 1029));
        assert!(!hit(&c, "u", "j", 1030), "past the TTL");
        assert!(c.is_empty(), "a stale answer is dropped when met");
        let t = ticket(&c, "u", "j", 1000);
        assert!(c.fill(t, "u", "s", "j", &live(990, 1010), 1000));
        assert!(!hit(&c, "u", "j", 1010), "idle past its expiry");
        // Another session's id with the same jti is not this answer.
        let t = ticket(&c, "u", "j", 1000);
        assert!(c.fill(t, "u", "s", "j", &live(990, 1040), 1000));
        assert!(matches!(
            c.lookup("u", "other", "j", 1000),
            Lookup::Miss(Some(_))
        ));
    }

    #[test]
    fn only_live_answers_with_mirrored_roles_are_kept() {
        let c = following(30, 10);
        for state in [
            SessionState::Revoked,
            SessionState::Missing,
            SessionState::Live {
                last_seen: 1000,
                idle_expires_at: 2000,
                roles: None,
            },
            live(900, 1000),
        ] {
            let t = ticket(&c, "u", "j", 1000);
            assert!(!c.fill(t, "u", "s", "j", &state, 1000), "{state:?}");
        }
        assert!(c.is_empty());
    }

    #[test]
    fn a_revocation_applied_during_the_store_read_wins_over_the_fill() {
        // The fill race: live read from the store, then the revocation is applied
        // (event or the store's own write), then the stale answer comes to be inserted.
        let c = following(30, 10);
        let t = ticket(&c, "u", "j", 1000);
        c.invalidate_user("u");
        assert!(!c.fill(t, "u", "s", "j", &live(1000, 2000), 1000));
        assert!(!hit(&c, "u", "j", 1000));
        // The same with a reset, and with the log lost (and found again) meanwhile.
        let t = ticket(&c, "u", "j", 1000);
        c.reset();
        assert!(!c.fill(t, "u", "s", "j", &live(1000, 2000), 1000));
        let t = ticket(&c, "u", "j", 1000);
        c.set_following(false);
        c.set_following(true);
        assert!(!c.fill(t, "u", "s", "j", &live(1000, 2000), 1000));
        // Another shard's invalidation does not void the ticket; nothing void, it goes in.
        let t = ticket(&c, "u", "j", 1000);
        let other = (0..1000)
            .map(|i| format!("v{i}"))
            .find(|v| c.shard_of(v) != c.shard_of("u"))
            .unwrap();
        c.invalidate_user(&other);
        assert!(c.fill(t, "u", "s", "j", &live(1000, 2000), 1000));
        assert!(hit(&c, "u", "j", 1000));
        // Invalidation after the insert drops it.
        c.invalidate_user("u");
        assert!(!hit(&c, "u", "j", 1000));
    }

    #[test]
    fn the_fill_race_under_threads_never_leaves_a_revoked_answer() {
        // Many rounds of: a filler that read "live" before the revocation, and the
        // revocation applied concurrently. After the revocation returns, no hit.
        let c = Arc::new(following(30, 1000));
        for round in 0..500 {
            let jti = format!("j{round}");
            let t = ticket(&c, "u", &jti, 1000);
            let filler = {
                let c = Arc::clone(&c);
                let jti = jti.clone();
                std::thread::spawn(move || {
                    c.fill(t, "u", "s", &jti, &live(1000, 2000), 1000);
                })
            };
            c.invalidate_user("u");
            // Revocation done: from here on nothing read before it may answer.
            let answered = hit(&c, "u", &jti, 1000);
            filler.join().unwrap();
            assert!(!answered, "round {round}");
            assert!(!hit(&c, "u", &jti, 1000), "round {round}");
        }
    }

    #[test]
    fn nothing_is_used_or_kept_while_the_log_is_not_followed() {
        let c = SessionCache::new(Duration::from_secs(30), 10);
        assert!(matches!(c.lookup("u", "s", "j", 1000), Lookup::Miss(None)));
        c.set_following(true);
        let t = ticket(&c, "u", "j", 1000);
        assert!(c.fill(t, "u", "s", "j", &live(1000, 2000), 1000));
        c.set_following(false);
        assert!(c.is_empty(), "losing the log empties the cache");
        assert!(matches!(c.lookup("u", "s", "j", 1000), Lookup::Miss(None)));
        c.set_following(true);
        assert!(!hit(&c, "u", "j", 1000));
    }

    #[test]
    fn the_cache_stays_bounded_and_a_full_one_sweeps_what_lapsed() {
        let c = following(30, 5);
        for i in 0..20 {
            let jti = format!("j{i}");
            let t = ticket(&c, &format!("u{i}"), &jti, 1000);
            c.fill(t, &format!("u{i}"), "s", &jti, &live(1000, 2000), 1000);
            assert!(c.len() <= 5);
        }
        assert_eq!(c.len(), 5);
        // Once the held answers lapsed, a full cache makes room (the sweep is
        // rationed to one a second; the first is due).
        let t = ticket(&c, "late", "j", 1100);
        assert!(c.fill(t, "late", "s", "j", &live(1100, 2000), 1100));
        assert_eq!(c.len(), 1);
        // Invalidation and reset keep the count right.
        c.invalidate_user("late");
        assert!(c.is_empty());
        let t = ticket(&c, "x", "j", 1100);
        assert!(c.fill(t, "x", "s", "j", &live(1100, 2000), 1100));
        c.reset();
        assert!(c.is_empty());
        // One user's answers are bounded too.
        let c = following(30, 1000);
        for i in 0..(MAX_ANSWERS_PER_USER + 10) {
            let jti = format!("j{i}");
            let t = ticket(&c, "many", &jti, 1000);
            c.fill(t, "many", "s", &jti, &live(1000, 2000), 1000);
        }
        assert_eq!(c.len(), MAX_ANSWERS_PER_USER);
        assert!(hit(&c, "many", "j0", 1000));
    }

    #[test]
    fn a_touch_moves_the_held_answer_forward() {
        let c = following(600, 10);
        let t = ticket(&c, "u", "j", 1000);
        assert!(c.fill(t, "u", "s", "j", &live(1000, 1100), 1000));
        c.touched("u", "j", 1070, 1170);
        match c.lookup("u", "s", "j", 1150) {
            Lookup::Hit(SessionState::Live {
                last_seen,
                idle_expires_at,
                ..
            }) => assert_eq!((last_seen, idle_expires_at), (1070, 1170)),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn the_follower_drops_a_users_answers_on_an_event_and_all_on_a_reset() {
        let log = super::super::revocations::MemoryLog::new(10_000);
        let cache = Arc::new(SessionCache::new(Duration::from_secs(600), 100));
        tokio::spawn(follow(
            Arc::downgrade(&cache),
            LogSource::Memory(Arc::clone(&log)),
        ));
        let filled = |user: &str| {
            let t = ticket(&cache, user, "j", 1000);
            assert!(cache.fill(t, user, "s", "j", &live(1000, 2000), 1000));
        };
        assert!(
            tokio::time::timeout(Duration::from_secs(5), async {
                while !cache.is_following() {
                    tokio::task::yield_now().await;
                }
            })
            .await
            .is_ok()
        );
        filled("u");
        filled("v");
        log.publish(
            Revocation::Session {
                user_id: "u".into(),
                session_id: "s".into(),
            },
            1000,
        );
        for _ in 0..100 {
            tokio::task::yield_now().await;
            if !hit(&cache, "u", "j", 1000) {
                break;
            }
        }
        assert!(!hit(&cache, "u", "j", 1000), "the event's user");
        assert!(hit(&cache, "v", "j", 1000), "another user");
        // More events than the fan-out holds, without the follower running: it lags,
        // and a lag is a RESET (none of these events names `v`).
        for i in 0..5000 {
            log.publish(
                Revocation::Session {
                    user_id: format!("w{i}"),
                    session_id: "s".into(),
                },
                1000,
            );
        }
        for _ in 0..100 {
            tokio::task::yield_now().await;
            if cache.is_empty() {
                break;
            }
        }
        assert!(cache.is_empty(), "the reset emptied the cache");
    }

    #[test]
    fn the_per_answer_size_stays_well_under_the_budget() {
        // The estimate in the module doc, checked against the types' sizes.
        let entry = std::mem::size_of::<Entry>() + std::mem::size_of::<String>();
        assert!(entry <= 96, "{entry}");
    }
}

//! Sessions and the blacklist in this process's memory, for embedded mode: the same
//! semantics as the Redis store (a session ends at the earlier of its idle expiry and
//! its token's `exp`; a blacklist entry lasts `exp − now + leeway`, at least 1 s), judged
//! by the caller's clock. One instance only, and nothing survives a restart.
//!
//! Ended sessions and lapsed blacklist entries are dropped when their user is next
//! touched, and the whole map is swept every [`SWEEP_EVERY`] writes, so memory stays
//! bounded by what is live.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::revocations::MemoryLog;
use super::{
    NewSession, RefreshState, Rotation, SessionPage, SessionRecord, SessionState, Touch,
    blacklist_ttl,
};

/// Writes between two sweeps of every user.
pub const SWEEP_EVERY: u64 = 1024;

/// In-process session store.
#[derive(Debug)]
pub struct MemorySessions {
    state: Mutex<State>,
    leeway: i64,
    log: Arc<MemoryLog>,
}

#[derive(Debug, Default)]
struct State {
    users: HashMap<String, UserSessions>,
    writes: u64,
}

#[derive(Debug, Default)]
struct UserSessions {
    /// Login counter: orders sessions oldest first.
    seq: u64,
    sessions: HashMap<String, Stored>,
    /// `jti` → blacklisted until (unix seconds, exclusive).
    revoked: HashMap<String, i64>,
    /// The mirror of the user's roles (comma-framed); kept while the user has sessions.
    roles: Option<String>,
}

/// A session as held. Its derived `Debug` is safe to print: the refresh key and token
/// hashes sit in a [`RefreshState`], whose `Debug` leaves them out.
#[derive(Debug)]
struct Stored {
    order: u64,
    record: SessionRecord,
    /// The access token before the last rotation, valid until its own `exp`.
    previous_jti: Option<String>,
    /// What Refresh reads and rotates.
    refresh: RefreshState,
}

impl Stored {
    /// Whether `jti` is one of the session's access tokens: the current one, or the
    /// one before the last rotation.
    fn holds(&self, jti: &str) -> bool {
        self.record.jti == jti || self.previous_jti.as_deref() == Some(jti)
    }
}

impl UserSessions {
    /// Drops what has ended by `now`.
    fn prune(&mut self, now: i64, leeway: i64) {
        self.sessions.retain(|_, s| s.record.ends_at(leeway) > now);
        self.revoked.retain(|_, until| *until > now);
    }

    fn is_empty(&self) -> bool {
        self.sessions.is_empty() && self.revoked.is_empty()
    }

    /// Blacklists the session's token and removes it. True if it was live.
    fn revoke(&mut self, session_id: &str, now: i64, leeway: i64) -> bool {
        let Some(stored) = self.sessions.remove(session_id) else {
            return false;
        };
        let r = stored.record;
        let ttl = blacklist_ttl(r.token_expires_at, now, leeway);
        self.revoked.insert(r.jti.clone(), now.saturating_add(ttl));
        r.ends_at(leeway) > now
    }
}

impl MemorySessions {
    /// An empty store; sessions outlive their token's `exp` by `leeway` seconds. The
    /// revocation log keeps the last `log_max_len` events.
    pub fn new(leeway: i64, log_max_len: usize) -> Self {
        Self {
            state: Mutex::default(),
            leeway,
            log: MemoryLog::new(log_max_len),
        }
    }

    /// The revocation log watchers follow.
    pub fn log(&self) -> &Arc<MemoryLog> {
        &self.log
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave a half-made entry behind (every
        // change is one insert or remove), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the user's entry (created if absent), then tidies up.
    fn with_user<T>(&self, user_id: &str, now: i64, f: impl FnOnce(&mut UserSessions) -> T) -> T {
        let leeway = self.leeway;
        let mut state = self.lock();
        state.writes += 1;
        if state.writes.is_multiple_of(SWEEP_EVERY) {
            state.users.retain(|_, u| {
                u.prune(now, leeway);
                !u.is_empty()
            });
        }
        let user = state.users.entry(user_id.to_owned()).or_default();
        user.prune(now, leeway);
        let result = f(user);
        if user.is_empty() {
            state.users.remove(user_id);
        }
        result
    }

    /// See [`super::SessionStore::create`].
    pub fn create(&self, s: &NewSession<'_>, max_sessions: u32) -> Vec<String> {
        let leeway = self.leeway;
        self.with_user(s.user_id, s.now, |user| {
            user.seq += 1;
            user.sessions.insert(
                s.session_id.to_owned(),
                Stored {
                    order: user.seq,
                    record: SessionRecord {
                        session_id: s.session_id.to_owned(),
                        jti: s.jti.to_owned(),
                        login_time: s.now,
                        last_seen: s.now,
                        idle_expires_at: s.idle_expires_at,
                        token_expires_at: s.token_expires_at,
                        absolute_end: s.absolute_end,
                        ip: s.ip.to_owned(),
                        user_agent: s.user_agent.to_owned(),
                        amr: s.amr.to_owned(),
                    },
                    previous_jti: None,
                    refresh: RefreshState {
                        key: s.refresh_key.to_owned(),
                        current: s.refresh_hash.to_owned(),
                        previous: None,
                        generation: 0,
                        rotated_at: s.now,
                        ends_at: s.absolute_end,
                        idle_expires_at: s.idle_expires_at,
                        login_time: s.now,
                        username: s.username.to_owned(),
                        amr: s.amr.to_owned(),
                    },
                },
            );
            let max = usize::try_from(max_sessions).unwrap_or(usize::MAX);
            if max == 0 || user.sessions.len() <= max {
                return Vec::new();
            }
            let mut by_age: Vec<(u64, String)> = user
                .sessions
                .iter()
                .map(|(id, s)| (s.order, id.clone()))
                .collect();
            by_age.sort_unstable();
            let excess = user.sessions.len() - max;
            by_age
                .into_iter()
                .take(excess)
                .map(|(_, id)| {
                    user.revoke(&id, s.now, leeway);
                    id
                })
                .collect()
        })
    }

    /// See [`super::SessionStore::check`].
    pub fn check(&self, user_id: &str, session_id: &str, jti: &str, now: i64) -> SessionState {
        let state = self.lock();
        let Some(user) = state.users.get(user_id) else {
            return SessionState::Missing;
        };
        if user.revoked.get(jti).is_some_and(|until| *until > now) {
            return SessionState::Revoked;
        }
        match user.sessions.get(session_id) {
            Some(s) if s.holds(jti) && s.record.ends_at(self.leeway) > now => SessionState::Live {
                last_seen: s.record.last_seen,
                idle_expires_at: s.record.idle_expires_at,
                roles: user.roles.clone(),
            },
            _ => SessionState::Missing,
        }
    }

    /// See [`super::SessionStore::mirror_roles`]. A user with no sessions keeps no
    /// mirror: nothing would read it.
    pub fn mirror_roles(&self, user_id: &str, roles: &str, only_if_missing: bool) {
        let mut state = self.lock();
        if let Some(user) = state.users.get_mut(user_id)
            && (!only_if_missing || user.roles.is_none())
        {
            user.roles = Some(roles.to_owned());
        }
    }

    /// See [`super::SessionStore::forget_roles`].
    pub fn forget_roles(&self, user_id: &str) {
        if let Some(user) = self.lock().users.get_mut(user_id) {
            user.roles = None;
        }
    }

    /// See [`super::SessionStore::touch`].
    pub fn touch(&self, t: &Touch<'_>) -> bool {
        self.with_user(t.user_id, t.now, |user| {
            match user.sessions.get_mut(t.session_id) {
                Some(s) if s.holds(t.jti) => {
                    s.record.last_seen = t.now;
                    s.record.idle_expires_at = t.idle_expires_at;
                    s.refresh.idle_expires_at = t.idle_expires_at;
                    true
                }
                _ => false,
            }
        })
    }

    /// See [`super::SessionStore::logout`].
    pub fn logout(
        &self,
        user_id: &str,
        session_id: &str,
        jti: &str,
        now: i64,
        ttl: i64,
    ) -> Option<bool> {
        self.with_user(user_id, now, |user| {
            // `with_user` pruned lapsed entries: one still here is in force.
            if user.revoked.contains_key(jti) {
                return None;
            }
            user.revoked
                .insert(jti.to_owned(), now.saturating_add(ttl.max(1)));
            // A verified token naming the session was issued for it, however many
            // rotations old: the session ends (see the Redis store's LOGOUT).
            let ended = user
                .sessions
                .get(session_id)
                .map(|s| s.previous_jti.is_some() || s.record.jti != jti);
            if ended.is_some() {
                user.sessions.remove(session_id);
            }
            Some(ended.unwrap_or(false))
        })
    }

    /// See [`super::SessionStore::refresh_state`].
    pub fn refresh_state(&self, user_id: &str, session_id: &str, now: i64) -> Option<RefreshState> {
        let state = self.lock();
        let s = state.users.get(user_id)?.sessions.get(session_id)?;
        (s.record.ends_at(self.leeway) > now).then(|| s.refresh.clone())
    }

    /// See [`super::SessionStore::rotate`]: the same compare-and-set as the Redis
    /// script, under the lock.
    pub fn rotate(&self, r: &Rotation<'_>) -> bool {
        self.with_user(r.user_id, r.now, |user| {
            let Some(s) = user.sessions.get_mut(r.session_id) else {
                return false;
            };
            if s.refresh.current != r.expected {
                return false;
            }
            s.refresh.previous = Some(std::mem::replace(&mut s.refresh.current, r.next.to_owned()));
            s.refresh.generation = r.generation;
            s.refresh.rotated_at = r.now;
            s.refresh.idle_expires_at = r.idle_expires_at;
            s.previous_jti = Some(std::mem::replace(&mut s.record.jti, r.jti.to_owned()));
            s.record.token_expires_at = r.token_expires_at;
            s.record.last_seen = r.now;
            s.record.idle_expires_at = r.idle_expires_at;
            true
        })
    }

    /// See [`super::SessionStore::revoke`].
    pub fn revoke(&self, user_id: &str, session_id: &str, now: i64) -> bool {
        let leeway = self.leeway;
        self.with_user(user_id, now, |user| user.revoke(session_id, now, leeway))
    }

    /// See [`super::SessionStore::revoke_others`].
    pub fn revoke_others(&self, user_id: &str, keep: &str, now: i64) -> u32 {
        let leeway = self.leeway;
        self.with_user(user_id, now, |user| {
            let others: Vec<String> = user
                .sessions
                .keys()
                .filter(|id| id.as_str() != keep)
                .cloned()
                .collect();
            let live = others
                .iter()
                .filter(|id| user.revoke(id, now, leeway))
                .count();
            u32::try_from(live).unwrap_or(u32::MAX)
        })
    }

    /// See [`super::SessionStore::list`].
    pub fn list(&self, user_id: &str, now: i64, after: u64, limit: usize) -> SessionPage {
        self.with_user(user_id, now, |user| {
            let mut page: Vec<&Stored> =
                user.sessions.values().filter(|s| s.order > after).collect();
            page.sort_unstable_by_key(|s| s.order);
            let page = page
                .into_iter()
                .take(limit.saturating_add(1))
                .map(|s| (s.order, s.record.clone()))
                .collect();
            let total = u32::try_from(user.sessions.len()).unwrap_or(u32::MAX);
            SessionPage::new(total, page, limit)
        })
    }

    /// Users with anything stored; for tests of boundedness.
    pub fn users_held(&self) -> usize {
        self.lock().users.len()
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::new_session;
    use super::*;

    #[test]
    fn a_blacklist_entry_lasts_until_exp_plus_leeway() {
        let m = MemorySessions::new(30, 16);
        m.create(&new_session("s", "j", 1000), 0);
        assert!(m.revoke("u", "s", 1000));
        // exp 87_400 + 30 leeway: revoked through 87_429, gone at 87_430.
        assert_eq!(m.check("u", "s", "j", 87_429), SessionState::Revoked);
        assert_eq!(m.check("u", "s", "j", 87_430), SessionState::Missing);
    }

    #[test]
    fn ended_sessions_and_lapsed_entries_are_dropped() {
        let m = MemorySessions::new(30, 16);
        for i in 0..(SWEEP_EVERY + 10) {
            let user = format!("user{i}");
            let s = NewSession {
                user_id: &user,
                ..new_session("s", "j", 1000)
            };
            m.create(&s, 0);
        }
        assert!(m.users_held() > 1000);
        // Far past every expiry: the next sweep leaves nothing behind.
        let later = 1000 + 90_000;
        for i in 0..SWEEP_EVERY {
            m.logout(&format!("other{i}"), "s", "j", later, 1);
        }
        assert!(m.users_held() <= SWEEP_EVERY as usize, "{}", m.users_held());
    }

    #[test]
    fn a_rotation_expecting_a_stale_token_changes_nothing() {
        let m = MemorySessions::new(30, 16);
        let first = NewSession {
            refresh_key: "k",
            refresh_hash: "h0",
            ..new_session("s", "j0", 1000)
        };
        m.create(&first, 0);
        let rotation = |expected, next, generation, now, jti| Rotation {
            user_id: "u",
            session_id: "s",
            expected,
            next,
            generation,
            now,
            jti,
            token_expires_at: now + 600,
            idle_expires_at: now + 3600,
        };
        // Never the session's token.
        let before = m.refresh_state("u", "s", 1000);
        assert!(!m.rotate(&rotation("nope", "h9", 1, 1010, "j9")));
        assert_eq!(m.refresh_state("u", "s", 1000), before);
        assert_eq!(m.check("u", "s", "j9", 1010), SessionState::Missing);
        // Rotated once; the loser of that race expected h0 and must change nothing.
        assert!(m.rotate(&rotation("h0", "h1", 1, 1020, "j1")));
        let after = m.refresh_state("u", "s", 1020);
        assert!(!m.rotate(&rotation("h0", "h1x", 1, 1030, "j1x")));
        assert_eq!(m.refresh_state("u", "s", 1020), after);
        let after = after.unwrap();
        assert_eq!(
            (after.current.as_str(), after.previous.as_deref()),
            ("h1", Some("h0"))
        );
        assert_eq!((after.generation, after.rotated_at), (1, 1020));
        assert_eq!(m.check("u", "s", "j1x", 1030), SessionState::Missing);
        assert!(matches!(
            m.check("u", "s", "j1", 1030),
            SessionState::Live { .. }
        ));
        // A session that ended cannot be rotated back to life.
        assert!(m.revoke("u", "s", 1040));
        assert!(!m.rotate(&rotation("h1", "h2", 2, 1050, "j2")));
        assert_eq!(m.refresh_state("u", "s", 1050), None);
    }

    #[test]
    fn touch_needs_the_sessions_own_token() {
        let m = MemorySessions::new(30, 16);
        m.create(&new_session("s", "j", 1000), 0);
        let t = Touch {
            user_id: "u",
            session_id: "s",
            jti: "other",
            now: 1100,
            idle_expires_at: 4700,
        };
        assert!(!m.touch(&t));
        assert!(m.touch(&Touch { jti: "j", ..t }));
        assert_eq!(
            m.check("u", "s", "j", 1100),
            SessionState::Live {
                last_seen: 1100,
                idle_expires_at: 4700,
                roles: None,
            }
        );
    }
}

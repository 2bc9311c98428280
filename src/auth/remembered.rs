//! The revocations this instance knows of — the ones it made, and the ones it read on
//! the revocation stream — kept so that open mode (Redis unreachable) still refuses
//! those tokens instead of judging them by signature alone.
//!
//! What it cannot know: revocations that another instance recorded while this one
//! could not read the stream (a partition between this instance and Redis). Those
//! tokens pass in open mode until Redis is back, at which point every answer is strict
//! again; `REDIS_FAILURE_MODE=closed` is the setting for those who cannot accept that.
//!
//! Bounded twice: an entry is dropped once no token it covers can still verify (the
//! longest token lifetime, plus the leeway, after the revocation), and past
//! `capacity` entries the oldest go first (counted in
//! `authd_revocation_memory_evictions_total`). What is forgotten early is not forgotten
//! quietly: every token issued no later than the newest revocation evicted is refused
//! (and so, after a `Reset` of the stream, is every token issued before it). A flood of
//! revocations can thus make open mode stricter, never laxer.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use super::Claims;
use crate::store::sessions::Revocation;

/// Revocations remembered, newest last.
#[derive(Debug)]
pub struct RememberedRevocations {
    inner: Mutex<Inner>,
    capacity: usize,
    /// Seconds an entry is kept: the longest a token it covers can still verify.
    keep_for: i64,
}

#[derive(Debug, Default)]
struct Inner {
    /// `jti` → kept until.
    tokens: HashMap<String, i64>,
    /// (user, session) → kept until.
    sessions: HashMap<(String, String), i64>,
    /// User → the latest user-wide revocation: (at, session spared, kept until). The
    /// latest is enough: a session spared by an earlier one that a later one does not
    /// spare is ended by the later one.
    users: HashMap<String, (i64, String, i64)>,
    /// What to forget, oldest first: (kept until, which entry).
    order: VecDeque<(i64, Key)>,
    /// Tokens issued at or before this (unix seconds) may be covered by a revocation
    /// that was evicted or never seen: refused. Cleared once no such token can verify.
    forgotten: Option<(i64, i64)>,
}

#[derive(Debug)]
enum Key {
    /// A token, and the session it ended with it.
    Token(String, String, String),
    Session(String, String),
    User(String),
}

impl RememberedRevocations {
    /// At most `capacity` entries, each kept `keep_for` seconds after its revocation.
    pub fn new(capacity: usize, keep_for: i64) -> Self {
        Self {
            inner: Mutex::default(),
            capacity: capacity.max(1),
            keep_for,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every change is a few inserts and removes: a panic cannot leave it unusable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Remembers a revocation recorded at `at` (unix seconds). One already held (this
    /// instance's own, read back from the stream) is not held twice.
    pub fn remember(&self, revocation: &Revocation, at: i64) {
        if matches!(revocation, Revocation::UserUpdated { .. }) {
            // Revokes nothing.
            return;
        }
        let until = at.saturating_add(self.keep_for);
        let mut inner = self.lock();
        let key = match revocation {
            Revocation::Token {
                user_id,
                session_id,
                jti,
            } => {
                if inner.tokens.get(jti).is_some_and(|u| *u >= until) {
                    return;
                }
                // A logout ends the session too: the session's entry covers the token.
                inner
                    .sessions
                    .insert((user_id.clone(), session_id.clone()), until);
                inner.tokens.insert(jti.clone(), until);
                Key::Token(jti.clone(), user_id.clone(), session_id.clone())
            }
            Revocation::Session {
                user_id,
                session_id,
            } => {
                let id = (user_id.clone(), session_id.clone());
                if inner.sessions.get(&id).is_some_and(|u| *u >= until) {
                    return;
                }
                inner.sessions.insert(id, until);
                Key::Session(user_id.clone(), session_id.clone())
            }
            Revocation::User {
                user_id,
                except_session_id,
            } => {
                if inner
                    .users
                    .get(user_id)
                    .is_some_and(|(earlier, ..)| *earlier >= at)
                {
                    return;
                }
                inner
                    .users
                    .insert(user_id.clone(), (at, except_session_id.clone(), until));
                Key::User(user_id.clone())
            }
            Revocation::UserUpdated { .. } => return,
        };
        inner.order.push_back((until, key));
        let mut evicted = 0u64;
        while inner.order.len() > self.capacity {
            if let Some((until, key)) = inner.order.pop_front() {
                inner.forget(until, &key);
                // The evicted revocation was made at `until - keep_for`.
                inner.forget_before(until.saturating_sub(self.keep_for), until);
                evicted += 1;
            }
        }
        if evicted > 0 {
            metrics::counter!("authd_revocation_memory_evictions_total").increment(evicted);
        }
        metrics::gauge!("authd_revocations_remembered").set(inner.order.len() as f64);
    }

    /// Events may have been lost (the stream said `Reset` at `at`): every token issued
    /// no later than that is refused until it could no longer verify anyway.
    pub fn lost_track(&self, at: i64) {
        let until = at.saturating_add(self.keep_for);
        self.lock().forget_before(at, until);
    }

    /// Whether the token is one this instance knows to be revoked, or may have been
    /// revoked without this instance knowing, at `now`.
    pub fn revokes(&self, claims: &Claims, now: i64) -> bool {
        let mut inner = self.lock();
        while inner.order.front().is_some_and(|(until, _)| *until <= now) {
            if let Some((until, key)) = inner.order.pop_front() {
                inner.forget(until, &key);
            }
        }
        if inner.forgotten.is_some_and(|(_, until)| until <= now) {
            inner.forgotten = None;
        }
        if inner
            .forgotten
            .is_some_and(|(before, _)| claims.iat <= before)
        {
            return true;
        }
        if inner.tokens.contains_key(&claims.jti)
            || inner
                .sessions
                .contains_key(&(claims.sub.clone(), claims.sid.clone()))
        {
            return true;
        }
        // Issued no later than a user-wide revocation (in the same second counts: the
        // safe side), and not in the session it spared.
        inner
            .users
            .get(&claims.sub)
            .is_some_and(|(at, spared, _)| claims.iat <= *at && *spared != claims.sid)
    }

    /// Entries held, for tests of boundedness.
    pub fn len(&self) -> usize {
        self.lock().order.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Inner {
    /// Refuses every token issued at or before `at` until `until`.
    fn forget_before(&mut self, at: i64, until: i64) {
        let (before, until) = match self.forgotten {
            Some((b, u)) => (b.max(at), u.max(until)),
            None => (at, until),
        };
        self.forgotten = Some((before, until));
    }

    /// Drops the entry `key` if it is still the one that expires at `until` (a later
    /// revocation of the same thing keeps it longer).
    fn forget(&mut self, until: i64, key: &Key) {
        match key {
            Key::Token(jti, user, session) => {
                if self.tokens.get(jti) == Some(&until) {
                    self.tokens.remove(jti);
                }
                let id = (user.clone(), session.clone());
                if self.sessions.get(&id) == Some(&until) {
                    self.sessions.remove(&id);
                }
            }
            Key::Session(user, session) => {
                let id = (user.clone(), session.clone());
                if self.sessions.get(&id) == Some(&until) {
                    self.sessions.remove(&id);
                }
            }
            Key::User(user) => {
                if self.users.get(user).is_some_and(|(.., u)| *u == until) {
                    self.users.remove(user);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(sub: &str, sid: &str, jti: &str, iat: i64) -> Claims {
        Claims {
            iss: "authd".into(),
            aud: "authd".into(),
            sub: sub.into(),
            username: "u".into(),
            sid: sid.into(),
            jti: jti.into(),
            iat,
            nbf: iat,
            exp: iat + 3600,
            auth_time: None,
            amr: Vec::new(),
        }
    }

    #[test]
    fn each_kind_of_revocation_is_refused_until_it_lapses() {
        let m = RememberedRevocations::new(100, 3600);
        m.remember(
            &Revocation::Token {
                user_id: "u".into(),
                session_id: "s1".into(),
                jti: "j1".into(),
            },
            1000,
        );
        m.remember(
            &Revocation::Session {
                user_id: "u".into(),
                session_id: "s2".into(),
            },
            1000,
        );
        m.remember(
            &Revocation::User {
                user_id: "v".into(),
                except_session_id: "keep".into(),
            },
            1000,
        );
        assert!(m.revokes(&claims("u", "s1", "j1", 900), 1001));
        assert!(m.revokes(&claims("u", "s2", "j2", 900), 1001));
        assert!(!m.revokes(&claims("u", "s3", "j3", 900), 1001));
        // User-wide: older tokens of other sessions, the same second included.
        assert!(m.revokes(&claims("v", "other", "j4", 1000), 1001));
        assert!(!m.revokes(&claims("v", "keep", "j5", 900), 1001));
        assert!(!m.revokes(&claims("v", "new", "j6", 1001), 1001));
        // Past every token's lifetime: forgotten.
        assert!(!m.revokes(&claims("u", "s1", "j1", 900), 4600));
        assert!(m.is_empty());
    }

    #[test]
    fn memory_is_bounded_oldest_first() {
        let m = RememberedRevocations::new(10, 3600);
        for n in 0..50 {
            m.remember(
                &Revocation::Session {
                    user_id: "u".into(),
                    session_id: format!("s{n}"),
                },
                1000,
            );
        }
        assert_eq!(m.len(), 10);
        assert!(m.revokes(&claims("u", "s49", "j", 900), 1001));
        // What was evicted is refused all the same: every token issued no later than
        // the newest revocation evicted (1000), known or not.
        assert!(m.revokes(&claims("u", "s0", "j", 900), 1001));
        assert!(m.revokes(&claims("u", "never-revoked", "j", 1000), 1001));
        assert!(!m.revokes(&claims("u", "never-revoked", "j", 1001), 1001));
        // Once no such token could verify, the rule lapses.
        assert!(!m.revokes(&claims("u", "never-revoked", "j", 4600), 4600));
    }

    #[test]
    fn a_revocation_seen_twice_is_held_once() {
        let m = RememberedRevocations::new(100, 3600);
        let logout = Revocation::Token {
            user_id: "u".into(),
            session_id: "s".into(),
            jti: "j".into(),
        };
        m.remember(&logout, 1000);
        m.remember(&logout, 1000);
        assert_eq!(m.len(), 1);
    }

    #[test]
    fn after_lost_track_older_tokens_are_refused() {
        let m = RememberedRevocations::new(100, 3600);
        m.lost_track(2000);
        assert!(m.revokes(&claims("u", "s", "j", 2000), 2001));
        assert!(!m.revokes(&claims("u", "s", "j", 2001), 2001));
    }
}

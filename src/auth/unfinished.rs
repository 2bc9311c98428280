//! User-wide revocations (DisableUser, DeleteUser, SetPassword, RevokeUserSessions) that
//! this instance could not record in the session store yet.
//!
//! The users table is written first, so nobody can log in who should not; but the
//! user's sessions live in the session store, and while it cannot be reached they are
//! not ended. Until they are, this instance refuses every token of such a user issued no
//! later than the revocation (in ValidateToken, in the calls that take a bearer, and in
//! Refresh), and a background task ([`crate::auth::service`]'s retry) keeps trying to
//! end the sessions and announce the revocation, until it is recorded. The call itself
//! answers UNAVAILABLE: it is not done until recorded, and running it again is safe.
//!
//! One entry per user at most (the latest revocation's time), so the memory is bounded
//! by the number of users; an entry goes once the revocation is recorded.

use std::collections::HashMap;
use std::sync::Mutex;

/// Users with a revocation not recorded yet: user id → when (unix seconds).
#[derive(Debug, Default)]
pub struct UnfinishedRevocations {
    users: Mutex<HashMap<String, i64>>,
}

impl UnfinishedRevocations {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, i64>> {
        // Every change is one insert or remove: a panic cannot leave it unusable.
        self.users.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Remembers that `user_id`'s revocation at `at` is not recorded. True when the
    /// user had none pending (a retry is to be started); false when one is running
    /// (it picks up the later time).
    pub fn add(&self, user_id: &str, at: i64) -> bool {
        let mut users = self.lock();
        match users.get_mut(user_id) {
            Some(pending) => {
                *pending = (*pending).max(at);
                false
            }
            None => {
                users.insert(user_id.to_owned(), at);
                true
            }
        }
    }

    /// The time of the user's pending revocation, if any.
    pub fn pending(&self, user_id: &str) -> Option<i64> {
        self.lock().get(user_id).copied()
    }

    /// A revocation of `user_id` at `at` is recorded: one pending no later is done.
    pub fn recorded(&self, user_id: &str, at: i64) {
        let mut users = self.lock();
        if users.get(user_id).is_some_and(|pending| *pending <= at) {
            users.remove(user_id);
        }
    }

    /// Whether a token of `user_id` issued at `iat` is covered by a pending revocation.
    /// A token issued in the revocation's second counts as before it (the safe side).
    pub fn revokes(&self, user_id: &str, iat: i64) -> bool {
        self.pending(user_id).is_some_and(|at| iat <= at)
    }

    /// Users pending now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pending_revocation_refuses_older_tokens_until_recorded() {
        let u = UnfinishedRevocations::default();
        assert!(u.add("a", 100));
        assert!(u.revokes("a", 99) && u.revokes("a", 100));
        assert!(!u.revokes("a", 101) && !u.revokes("b", 0));
        // A later one while the first is pending: no new retry, the later time kept.
        assert!(!u.add("a", 200));
        assert!(u.revokes("a", 150));
        // The retry recorded the first only: still pending.
        u.recorded("a", 100);
        assert_eq!(u.pending("a"), Some(200));
        u.recorded("a", 200);
        assert!(u.len() == 0 && !u.revokes("a", 150));
    }
}

//! Second-factor tickets: what Login hands an enrolled user in place of tokens, until
//! VerifySecondFactor completes it. In Redis beside the user's sessions (the
//! `{user:<id>}` hash tag: one slot on a cluster), or in this process.
//!
//! `<prefix>{user:<id>}:mfa:<sha256 of the ticket>`: hash `sid ip ua at n exp` (the
//! session the ticket will make, the login's address and agent, when it was made,
//! attempts so far, its end; times in unix seconds by authd's clock), expiring with the
//! ticket. Every attempt is counted
//! before its code is checked, in the same script that reads the ticket; past the limit
//! the ticket answers nothing more (it is not deleted: an attempt still in flight with the
//! right code completes it). Using it deletes it: exactly one caller sees the delete
//! succeed.

use std::collections::HashMap;
use std::sync::Mutex;

use redis::Script;

use super::StoreError;
use super::redis_conn::RedisConn;

/// A ticket's contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    /// The session id the completed login gets.
    pub session_id: String,
    /// The login's client address.
    pub ip: String,
    /// The login's user agent.
    pub user_agent: String,
    /// When the password was checked and the ticket made (unix seconds): a ticket no
    /// newer than the user's `sessions_valid_after` (a password change, a disable) is
    /// refused.
    pub created_at: i64,
}

/// A ticket as an attempt found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempted {
    /// The ticket.
    pub ticket: Ticket,
    /// Attempts counted so far, this one included.
    pub attempts: u32,
}

/// KEYS: ticket. ARGV: limit, now. Counts an attempt; nil when the ticket is missing,
/// past its end or past its limit.
const ATTEMPT: &str = r"
local exp = redis.call('HGET', KEYS[1], 'exp')
if not exp then return false end
if tonumber(exp) <= tonumber(ARGV[2]) then
  redis.call('DEL', KEYS[1])
  return false
end
local n = redis.call('HINCRBY', KEYS[1], 'n', 1)
if n > tonumber(ARGV[1]) then return false end
local f = redis.call('HMGET', KEYS[1], 'sid', 'ip', 'ua', 'at')
return {n, f[1] or '', f[2] or '', f[3] or '', tonumber(f[4]) or 0}
";

/// KEYS: ticket. ARGV: sid, ip, ua, ttl_ms, exp, at.
const CREATE: &str = r"
redis.call('HSET', KEYS[1], 'sid', ARGV[1], 'ip', ARGV[2], 'ua', ARGV[3], 'at', ARGV[6], 'n', 0, 'exp', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
";

/// Where tickets live.
#[derive(Debug)]
pub enum MfaTickets {
    /// Redis, shared by every instance.
    Redis {
        /// The sessions' connection pool.
        conn: RedisConn,
        /// The key prefix.
        prefix: String,
        /// The attempt script.
        attempt: Box<Script>,
        /// The creation script.
        create: Box<Script>,
    },
    /// This process.
    Memory(Mutex<HashMap<String, (Ticket, u32, i64)>>),
}

/// The most tickets kept in memory; past it, expired ones are swept, then the oldest.
const MAX_MEMORY_TICKETS: usize = 100_000;

impl MfaTickets {
    /// Tickets in Redis.
    pub fn redis(conn: RedisConn, prefix: &str) -> Self {
        Self::Redis {
            conn,
            prefix: prefix.to_owned(),
            attempt: Box::new(Script::new(ATTEMPT)),
            create: Box::new(Script::new(CREATE)),
        }
    }

    /// Tickets in memory.
    pub fn memory() -> Self {
        Self::Memory(Mutex::new(HashMap::new()))
    }

    fn key(prefix: &str, user_id: &str, hash: &str) -> String {
        format!("{prefix}{{user:{user_id}}}:mfa:{hash}")
    }

    /// Stores a ticket (by the hash of its text) for `ttl` seconds from its
    /// `created_at`.
    pub async fn create(
        &self,
        user_id: &str,
        hash: &str,
        ticket: &Ticket,
        ttl: i64,
    ) -> Result<(), StoreError> {
        let now = ticket.created_at;
        match self {
            Self::Redis {
                conn,
                prefix,
                create,
                ..
            } => {
                let mut inv = create.prepare_invoke();
                inv.key(Self::key(prefix, user_id, hash))
                    .arg(&ticket.session_id)
                    .arg(&ticket.ip)
                    .arg(&ticket.user_agent)
                    .arg(ttl.saturating_mul(1000).max(1))
                    .arg(now.saturating_add(ttl))
                    .arg(now);
                conn.run(|mut c| async move { inv.invoke_async::<i64>(&mut c).await })
                    .await
                    .map(|_| ())
            }
            Self::Memory(m) => {
                let mut map = m.lock().unwrap_or_else(|e| e.into_inner());
                if map.len() >= MAX_MEMORY_TICKETS {
                    map.retain(|_, (_, _, expires)| *expires > now);
                    if map.len() >= MAX_MEMORY_TICKETS {
                        let oldest = map
                            .iter()
                            .min_by_key(|(_, (_, _, e))| *e)
                            .map(|(k, _)| k.clone());
                        if let Some(k) = oldest {
                            map.remove(&k);
                        }
                    }
                }
                map.insert(
                    Self::key("", user_id, hash),
                    (ticket.clone(), 0, now.saturating_add(ttl)),
                );
                Ok(())
            }
        }
    }

    /// Counts an attempt on the ticket and reads it. `None` when it does not exist
    /// (never did, expired, used) or is past `limit` attempts.
    pub async fn attempt(
        &self,
        user_id: &str,
        hash: &str,
        limit: u32,
        now: i64,
    ) -> Result<Option<Attempted>, StoreError> {
        match self {
            Self::Redis {
                conn,
                prefix,
                attempt,
                ..
            } => {
                let mut inv = attempt.prepare_invoke();
                inv.key(Self::key(prefix, user_id, hash))
                    .arg(limit)
                    .arg(now);
                let found = conn
                    .run(|mut c| async move {
                        inv.invoke_async::<Option<(i64, String, String, String, i64)>>(&mut c)
                            .await
                    })
                    .await?;
                Ok(
                    found.map(|(n, session_id, ip, user_agent, created_at)| Attempted {
                        ticket: Ticket {
                            session_id,
                            ip,
                            user_agent,
                            created_at,
                        },
                        attempts: u32::try_from(n).unwrap_or(u32::MAX),
                    }),
                )
            }
            Self::Memory(m) => {
                let mut map = m.lock().unwrap_or_else(|e| e.into_inner());
                let key = Self::key("", user_id, hash);
                let Some((ticket, n, expires)) = map.get_mut(&key) else {
                    return Ok(None);
                };
                if *expires <= now {
                    map.remove(&key);
                    return Ok(None);
                }
                *n = n.saturating_add(1);
                if *n > limit {
                    return Ok(None);
                }
                Ok(Some(Attempted {
                    ticket: ticket.clone(),
                    attempts: *n,
                }))
            }
        }
    }

    /// Deletes the ticket. True for the one caller that deleted it.
    pub async fn take(&self, user_id: &str, hash: &str) -> Result<bool, StoreError> {
        match self {
            Self::Redis { conn, prefix, .. } => {
                let key = Self::key(prefix, user_id, hash);
                let confirm = key.clone();
                conn.run_confirmed(&confirm, |mut c| async move {
                    redis::cmd("DEL").arg(key).query_async::<i64>(&mut c).await
                })
                .await
                .map(|n| n == 1)
            }
            Self::Memory(m) => {
                let mut map = m.lock().unwrap_or_else(|e| e.into_inner());
                Ok(map.remove(&Self::key("", user_id, hash)).is_some())
            }
        }
    }
}

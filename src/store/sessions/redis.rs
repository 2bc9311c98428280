//! Sessions and the logout blacklist in Redis, through a bb8 pool.
//!
//! Keys (all of one user's share the `{user:<id>}` hash tag, so on a Redis Cluster they
//! live in one slot and every script below touches a single slot):
//! - `<prefix>{user:<id>}:session:<sid>`: hash `jti login seen idle exp ip ua`
//!   (times in unix seconds), and for refresh tokens (docs/design.md §10) `end` (the
//!   absolute end), `un amr` (what rotated access tokens carry), `rk` (the refresh
//!   key), `rh prh` (hashes of the current and previous refresh token), `gen rot`
//!   (generation, rotation time) and `pjti` (the previous access token); expiring
//!   with the session;
//! - `<prefix>{user:<id>}:sessions`: sorted set of the user's session ids, by login order;
//! - `<prefix>{user:<id>}:seq`: the login counter that orders that set;
//! - `<prefix>{user:<id>}:revoked:<jti>`: blacklist entry, expiring `exp − now + leeway`
//!   (at least 1 s) from the revocation;
//! - `<prefix>{user:<id>}:roles`: a mirror of the user's roles (comma-framed), read with
//!   the session in ValidateToken's one round trip; the users table is the truth.
//!
//! Every change that revokes is one Lua script, so it is recorded whole or not at all.
//! Calls go through [`RedisConn`]: a short timeout each, and a circuit breaker.

use redis::Script;

use std::sync::Arc;
use std::time::Duration;

use super::revocations::{Cursor, Feed, RedisLog, Revocation};
use super::{
    NewSession, RefreshState, Rotation, SessionPage, SessionRecord, SessionState, Touch,
    session_end,
};
use crate::config::RedisConfig;
use crate::store::redis_conn::RedisConn;
use crate::store::{PoolStats, StoreError};

/// The Redis side of authd.
pub struct RedisSessions {
    conn: RedisConn,
    leeway: i64,
    log: Arc<RedisLog>,
    prefix: String,
    scripts: Scripts,
}

impl std::fmt::Debug for RedisSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSessions")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

struct Scripts {
    create: Script,
    touch: Script,
    logout: Script,
    revoke: Script,
    revoke_others: Script,
    list: Script,
    rotate: Script,
}

/// Shared by the scripts that revoke: blacklists the session's `jti` for as long as
/// the token could still verify, deletes the session and drops it from the user's set.
/// Returns 1 when the session was live, 0 when it was missing or already past its end.
const REVOKE_FN: &str = r"
local function revoke(tag, sid, now, leeway)
  local skey = tag .. ':session:' .. sid
  local f = redis.call('HMGET', skey, 'jti', 'exp', 'idle', 'end')
  redis.call('ZREM', tag .. ':sessions', sid)
  if not f[1] then return 0 end
  local exp = tonumber(f[2])
  local ttl = exp - now + leeway
  if ttl < 1 then ttl = 1 end
  redis.call('SET', tag .. ':revoked:' .. f[1], '1', 'EX', ttl)
  redis.call('DEL', skey)
  if math.min((tonumber(f[4]) or exp) + leeway, tonumber(f[3])) <= now then return 0 end
  return 1
end
-- Forgets the user's sessions that ended on their own; with `blacklist`, their
-- tokens are blacklisted as a revocation's are.
local function prune(tag, set, now, leeway, blacklist)
  for _, sid in ipairs(redis.call('ZRANGE', set, 0, -1)) do
    local skey = tag .. ':session:' .. sid
    local f = redis.call('HMGET', skey, 'idle', 'exp', 'end')
    if not f[1] or math.min(tonumber(f[1]), (tonumber(f[3]) or tonumber(f[2])) + leeway) <= now then
      if blacklist then
        revoke(tag, sid, now, leeway)
      else
        redis.call('ZREM', set, sid)
        redis.call('DEL', skey)
      end
    end
  end
end
";

/// KEYS: session, set, seq. ARGV: tag, sid, jti, now, idle_exp, exp, ip, ua,
/// session_ttl_ms, set_ttl_ms, max_sessions, leeway, end, username, amr, refresh key,
/// refresh hash. Returns the evicted session ids.
const CREATE_BODY: &str = r"
local tag, sid, now = ARGV[1], ARGV[2], tonumber(ARGV[4])
local leeway, max = tonumber(ARGV[12]), tonumber(ARGV[11])
redis.call('HSET', KEYS[1], 'jti', ARGV[3], 'login', ARGV[4], 'seen', ARGV[4],
  'idle', ARGV[5], 'exp', ARGV[6], 'ip', ARGV[7], 'ua', ARGV[8], 'end', ARGV[13],
  'un', ARGV[14], 'amr', ARGV[15], 'rk', ARGV[16], 'rh', ARGV[17], 'gen', '0',
  'rot', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[9])
local seq = redis.call('INCR', KEYS[3])
redis.call('PEXPIRE', KEYS[3], ARGV[10])
redis.call('ZADD', KEYS[2], seq, sid)
redis.call('PEXPIRE', KEYS[2], ARGV[10])
prune(tag, KEYS[2], now, leeway, true)
local evicted = {}
if max > 0 then
  local n = redis.call('ZCARD', KEYS[2])
  if n > max then
    for _, old in ipairs(redis.call('ZRANGE', KEYS[2], 0, n - max - 1)) do
      revoke(tag, old, now, leeway)
      table.insert(evicted, old)
    end
  end
end
return evicted
";

/// KEYS: session. ARGV: jti, now, idle_exp, leeway. Extends a session only if it still
/// holds this token (the current one or the one before the last rotation), so a touch
/// never resurrects a revoked session; never past its absolute end.
const TOUCH: &str = r"
local f = redis.call('HMGET', KEYS[1], 'jti', 'pjti', 'end', 'exp')
if f[1] and (f[1] == ARGV[1] or f[2] == ARGV[1]) then
  local now = tonumber(ARGV[2])
  redis.call('HSET', KEYS[1], 'seen', ARGV[2], 'idle', ARGV[3])
  local ttl = math.min(tonumber(ARGV[3]), tonumber(f[3] or f[4]) + tonumber(ARGV[4])) - now
  if ttl < 1 then ttl = 1 end
  redis.call('PEXPIRE', KEYS[1], ttl * 1000)
  return 1
end
return 0
";

/// KEYS: session. ARGV: expected refresh hash, next hash, generation, now, jti, exp,
/// idle_exp, leeway. The rotation's compare-and-set: only a session still holding the
/// expected token is changed, so of concurrent rotations exactly one is recorded, and
/// an ended session is never brought back. Returns 1 when recorded, else 0.
const ROTATE: &str = r"
local f = redis.call('HMGET', KEYS[1], 'rh', 'jti', 'end')
if not f[1] or f[1] ~= ARGV[1] then return 0 end
local now = tonumber(ARGV[4])
redis.call('HSET', KEYS[1], 'prh', ARGV[1], 'rh', ARGV[2], 'gen', ARGV[3], 'rot', ARGV[4],
  'seen', ARGV[4], 'pjti', f[2], 'jti', ARGV[5], 'exp', ARGV[6], 'idle', ARGV[7])
local ttl = math.min(tonumber(ARGV[7]), tonumber(f[3]) + tonumber(ARGV[8])) - now
if ttl < 1 then ttl = 1 end
redis.call('PEXPIRE', KEYS[1], ttl * 1000)
return 1
";

/// KEYS: session, set, revoked. ARGV: sid, jti, blacklist_ttl_s, now (unix ms), lease
/// (ms). The
/// blacklist entry holds the time its announcement was claimed until the revocation is
/// announced on the log, then `1`. Returns -1 when nothing is left to do (announced, or
/// claimed less than [`ANNOUNCE_LEASE_MS`] ago by a Logout still under way), -2 when
/// it was claimed longer ago and never announced (a Logout whose answer was lost: this
/// call claims it and announces it), else 2, 1 or 0: the session ended and another
/// access token of it may be live (it had been refreshed, or the token presented was
/// not its current one), it ended, or it was not live. A verified token naming the
/// session was issued for it (session ids are random), however many rotations old: its
/// Logout ends the session, so a stale token cannot be used to look logged out while
/// the refresh token and the current access token live on.
const LOGOUT: &str = r"
if not redis.call('SET', KEYS[3], ARGV[4], 'EX', ARGV[3], 'NX') then
  local claimed = tonumber(redis.call('GET', KEYS[3]))
  if claimed == 1 or claimed == nil or tonumber(ARGV[4]) - claimed < tonumber(ARGV[5]) then
    return -1
  end
  redis.call('SET', KEYS[3], ARGV[4], 'XX', 'KEEPTTL')
  return -2
end
local held = redis.call('HMGET', KEYS[1], 'jti', 'pjti')
if held[1] then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  if held[2] or held[1] ~= ARGV[2] then return 2 end
  return 1
end
return 0
";

/// How long a Logout that claimed a revocation's announcement has to make it before a
/// retry takes the claim over: long enough for the announcement that follows the
/// recording (one command, bounded by the command timeout), short enough that a client
/// retrying a Logout whose answer was lost is unlikely to come sooner.
const ANNOUNCE_LEASE_MS: i64 = 1000;

/// KEYS: session. ARGV: tag, sid, now, leeway.
const REVOKE_BODY: &str = r"
return revoke(ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]))
";

/// KEYS: set. ARGV: tag, now, leeway, after, limit. Forgets ended sessions, then
/// returns how many are live and the first `limit` + 1 after login number `after`, each
/// as {sid, order, jti, login, seen, idle, exp, ip, ua, end, amr}.
const LIST_BODY: &str = r"
local tag, now, leeway = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
prune(tag, KEYS[1], now, leeway, false)
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[4], '+inf', 'WITHSCORES',
  'LIMIT', 0, tonumber(ARGV[5]) + 1)
local page = {}
for i = 1, #ids, 2 do
  local f = redis.call('HMGET', tag .. ':session:' .. ids[i],
    'jti', 'login', 'seen', 'idle', 'exp', 'ip', 'ua', 'end', 'amr')
  table.insert(page, {ids[i], ids[i + 1], f[1] or '', f[2] or '0', f[3] or '0',
    f[4] or '0', f[5] or '0', f[6] or '', f[7] or '', f[8] or f[5] or '0', f[9] or ''})
end
return {redis.call('ZCARD', KEYS[1]), page}
";

/// KEYS: set. ARGV: tag, keep_sid, now, leeway. Returns how many live sessions ended.
const REVOKE_OTHERS_BODY: &str = r"
local n = 0
for _, sid in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if sid ~= ARGV[2] then
    n = n + revoke(ARGV[1], sid, tonumber(ARGV[3]), tonumber(ARGV[4]))
  end
end
return n
";

impl RedisSessions {
    /// Sessions on `conn`, under the configured key prefix, with the revocation log
    /// beside them.
    pub fn new(
        conn: RedisConn,
        config: &RedisConfig,
        leeway: i64,
        log_max_len: usize,
        log_retention: Duration,
    ) -> anyhow::Result<Self> {
        let log = RedisLog::new(
            conn.clone(),
            format!("{}revocations", config.key_prefix),
            log_max_len,
            log_retention,
        );
        Ok(Self {
            conn,
            leeway,
            log,
            prefix: config.key_prefix.clone(),
            scripts: Scripts {
                create: Script::new(&format!("{REVOKE_FN}{CREATE_BODY}")),
                touch: Script::new(TOUCH),
                logout: Script::new(LOGOUT),
                revoke: Script::new(&format!("{REVOKE_FN}{REVOKE_BODY}")),
                revoke_others: Script::new(&format!("{REVOKE_FN}{REVOKE_OTHERS_BODY}")),
                list: Script::new(&format!("{REVOKE_FN}{LIST_BODY}")),
                rotate: Script::new(ROTATE),
            },
        })
    }

    /// The connection pool, for other stores that live in the same Redis.
    pub fn conn(&self) -> &RedisConn {
        &self.conn
    }

    /// The revocation log.
    pub fn log(&self) -> &Arc<RedisLog> {
        &self.log
    }

    /// The prefix of every key.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Answers PING; for start-up checks and health.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.conn.ping().await
    }

    /// Appends a revocation to the log watchers follow; a logged-out token's blacklist
    /// entry is then marked announced (see `LOGOUT`). Two steps, since the log's key and
    /// the user's keys lie in different slots of a cluster; a failure between them is a
    /// Logout whose answer was lost, which a retry announces again.
    pub async fn publish(&self, revocation: &Revocation, at: i64) -> Result<(), StoreError> {
        let pipe = self.log.append_command(revocation, at);
        self.conn
            .run_confirmed(self.log.key(), |mut c| async move {
                pipe.query_async::<(String,)>(&mut c).await
            })
            .await?;
        if let Revocation::Token { user_id, jti, .. } = revocation {
            let key = format!("{}:revoked:{jti}", self.tag(user_id));
            self.conn
                .run(|mut c| async move {
                    redis::cmd("SET")
                        .arg(&key)
                        .arg("1")
                        .arg("XX")
                        .arg("KEEPTTL")
                        .query_async::<()>(&mut c)
                        .await
                })
                .await?;
        }
        Ok(())
    }

    /// Missed revocations after `after`, then live ones.
    pub async fn subscribe(&self, after: Option<Cursor>) -> Result<Feed, StoreError> {
        self.log.subscribe(after).await
    }

    fn tag(&self, user_id: &str) -> String {
        format!("{}{{user:{user_id}}}", self.prefix)
    }

    /// Stores a new session; past `max_sessions` (0 = unlimited) the user's oldest
    /// sessions are revoked. Returns the ids of the sessions so ended.
    pub async fn create(
        &self,
        s: &NewSession<'_>,
        max_sessions: u32,
    ) -> Result<Vec<String>, StoreError> {
        let leeway = self.leeway;
        let tag = self.tag(s.user_id);
        let session_ttl_ms = ttl_ms(session_end(s.idle_expires_at, s.absolute_end, leeway) - s.now);
        // The set outlives every session in it: each ends by its absolute end, and
        // later logins end later.
        let set_ttl_ms = ttl_ms(s.absolute_end + leeway - s.now);
        let session_key = format!("{tag}:session:{}", s.session_id);
        let mut inv = self.scripts.create.prepare_invoke();
        inv.key(&session_key)
            .key(format!("{tag}:sessions"))
            .key(format!("{tag}:seq"))
            .arg(&tag)
            .arg(s.session_id)
            .arg(s.jti)
            .arg(s.now)
            .arg(s.idle_expires_at)
            .arg(s.token_expires_at)
            .arg(s.ip)
            .arg(s.user_agent)
            .arg(session_ttl_ms)
            .arg(set_ttl_ms)
            .arg(max_sessions)
            .arg(leeway)
            .arg(s.absolute_end)
            .arg(s.username)
            .arg(s.amr)
            .arg(s.refresh_key)
            .arg(s.refresh_hash);
        // Sessions evicted past the limit are revocations: confirmed like any other.
        self.conn
            .run_confirmed_if(
                &session_key,
                |mut c| async move { inv.invoke_async::<Vec<String>>(&mut c).await },
                |evicted| !evicted.is_empty(),
            )
            .await
    }

    /// One round trip: is the `jti` blacklisted, and does the session hold this token?
    pub async fn check(
        &self,
        user_id: &str,
        session_id: &str,
        jti: &str,
    ) -> Result<SessionState, StoreError> {
        let tag = self.tag(user_id);
        let mut pipe = redis::pipe();
        pipe.exists(format!("{tag}:revoked:{jti}"))
            .hmget(
                format!("{tag}:session:{session_id}"),
                &["jti", "seen", "idle", "pjti"],
            )
            .get(format!("{tag}:roles"));
        type Reply = (
            bool,
            (Option<String>, Option<i64>, Option<i64>, Option<String>),
            Option<String>,
        );
        let (revoked, (stored_jti, seen, idle, previous_jti), roles) = self
            .conn
            .run(|mut c| async move { pipe.query_async::<Reply>(&mut c).await })
            .await?;
        Ok(match (revoked, stored_jti, seen, idle) {
            (true, ..) => SessionState::Revoked,
            (false, Some(stored), Some(last_seen), Some(idle_expires_at))
                if stored == jti || previous_jti.as_deref() == Some(jti) =>
            {
                SessionState::Live {
                    last_seen,
                    idle_expires_at,
                    roles,
                }
            }
            _ => SessionState::Missing,
        })
    }

    /// See [`super::SessionStore::mirror_roles`].
    pub async fn mirror_roles(
        &self,
        user_id: &str,
        roles: &str,
        only_if_missing: bool,
        ttl_seconds: i64,
    ) -> Result<(), StoreError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(format!("{}:roles", self.tag(user_id)))
            .arg(roles)
            .arg("EX")
            .arg(ttl_seconds.max(1));
        if only_if_missing {
            cmd.arg("NX");
        }
        self.conn
            .run(|mut c| async move { cmd.query_async::<Option<String>>(&mut c).await })
            .await
            .map(|_| ())
    }

    /// See [`super::SessionStore::forget_roles`].
    pub async fn forget_roles(&self, user_id: &str) -> Result<(), StoreError> {
        let key = format!("{}:roles", self.tag(user_id));
        self.conn
            .run(|mut c| async move { redis::cmd("DEL").arg(key).query_async::<i64>(&mut c).await })
            .await
            .map(|_| ())
    }

    /// Records activity: moves `seen` to `now` and the idle expiry forward.
    pub async fn touch(&self, t: &Touch<'_>) -> Result<bool, StoreError> {
        let tag = self.tag(t.user_id);
        let mut inv = self.scripts.touch.prepare_invoke();
        inv.key(format!("{tag}:session:{}", t.session_id))
            .arg(t.jti)
            .arg(t.now)
            .arg(t.idle_expires_at)
            .arg(self.leeway);
        self.conn
            .run(|mut c| async move { inv.invoke_async::<i64>(&mut c).await })
            .await
            .map(|n| n == 1)
    }

    /// Blacklists the token and ends its session (if the session still holds it).
    /// See [`super::SessionStore::logout`] for the answer.
    pub async fn logout(
        &self,
        user_id: &str,
        session_id: &str,
        jti: &str,
        now_ms: i64,
        blacklist_ttl_seconds: i64,
    ) -> Result<Option<bool>, StoreError> {
        let tag = self.tag(user_id);
        let revoked_key = format!("{tag}:revoked:{jti}");
        let mut inv = self.scripts.logout.prepare_invoke();
        inv.key(format!("{tag}:session:{session_id}"))
            .key(format!("{tag}:sessions"))
            .key(&revoked_key)
            .arg(session_id)
            .arg(jti)
            .arg(blacklist_ttl_seconds.max(1))
            .arg(now_ms)
            .arg(ANNOUNCE_LEASE_MS);
        self.conn
            .run_confirmed(&revoked_key, |mut c| async move {
                inv.invoke_async::<i64>(&mut c).await
            })
            .await
            .map(|n| (n != -1).then_some(n == 2))
    }

    /// One round trip: what Refresh needs of the session.
    pub async fn refresh_state(
        &self,
        user_id: &str,
        session_id: &str,
    ) -> Result<Option<RefreshState>, StoreError> {
        let key = format!("{}:session:{session_id}", self.tag(user_id));
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(key).arg(&[
            "rk", "rh", "prh", "gen", "rot", "end", "idle", "login", "un", "amr",
        ]);
        type Reply = (
            Option<String>,
            Option<String>,
            Option<String>,
            Option<u64>,
            Option<i64>,
            Option<i64>,
            Option<i64>,
            Option<i64>,
            Option<String>,
            Option<String>,
        );
        let reply: Reply = self
            .conn
            .run(|mut c| async move { cmd.query_async::<Reply>(&mut c).await })
            .await?;
        let (rk, rh, prh, generation, rot, end, idle, login, un, amr) = reply;
        Ok(match (rk, rh, generation, rot, end, idle, login) {
            (
                Some(key),
                Some(current),
                Some(generation),
                Some(rotated_at),
                Some(ends_at),
                Some(idle_expires_at),
                Some(login_time),
            ) => Some(RefreshState {
                key,
                current,
                previous: prh,
                generation,
                rotated_at,
                ends_at,
                idle_expires_at,
                login_time,
                username: un.unwrap_or_default(),
                amr: amr.unwrap_or_default(),
            }),
            // No such session, or one made before refresh tokens.
            _ => None,
        })
    }

    /// The rotation's compare-and-set, one script in the user's slot.
    pub async fn rotate(&self, r: &Rotation<'_>) -> Result<bool, StoreError> {
        let mut inv = self.scripts.rotate.prepare_invoke();
        inv.key(format!("{}:session:{}", self.tag(r.user_id), r.session_id))
            .arg(r.expected)
            .arg(r.next)
            .arg(r.generation)
            .arg(r.now)
            .arg(r.jti)
            .arg(r.token_expires_at)
            .arg(r.idle_expires_at)
            .arg(self.leeway);
        self.conn
            .run(|mut c| async move { inv.invoke_async::<i64>(&mut c).await })
            .await
            .map(|n| n == 1)
    }

    /// Ends one of the user's sessions. False when it did not exist (or had already ended).
    pub async fn revoke(
        &self,
        user_id: &str,
        session_id: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        let tag = self.tag(user_id);
        let session_key = format!("{tag}:session:{session_id}");
        let mut inv = self.scripts.revoke.prepare_invoke();
        inv.key(&session_key)
            .arg(&tag)
            .arg(session_id)
            .arg(now)
            .arg(self.leeway);
        self.conn
            .run_confirmed(&session_key, |mut c| async move {
                inv.invoke_async::<i64>(&mut c).await
            })
            .await
            .map(|n| n == 1)
    }

    /// Ends every session of the user but `keep`. Returns how many live ones ended.
    pub async fn revoke_others(
        &self,
        user_id: &str,
        keep: &str,
        now: i64,
    ) -> Result<u32, StoreError> {
        let tag = self.tag(user_id);
        let set_key = format!("{tag}:sessions");
        let mut inv = self.scripts.revoke_others.prepare_invoke();
        inv.key(&set_key)
            .arg(&tag)
            .arg(keep)
            .arg(now)
            .arg(self.leeway);
        self.conn
            .run_confirmed(&set_key, |mut c| async move {
                inv.invoke_async::<u32>(&mut c).await
            })
            .await
    }

    /// A page of the user's live sessions in login order, after login number `after`;
    /// ended ones are dropped from the set first, in the same step.
    pub async fn list(
        &self,
        user_id: &str,
        now: i64,
        after: u64,
        limit: usize,
    ) -> Result<SessionPage, StoreError> {
        let tag = self.tag(user_id);
        let mut inv = self.scripts.list.prepare_invoke();
        inv.key(format!("{tag}:sessions"))
            .arg(&tag)
            .arg(now)
            .arg(self.leeway)
            .arg(after)
            .arg(limit);
        type Row = (
            String,
            u64,
            String,
            i64,
            i64,
            i64,
            i64,
            String,
            String,
            i64,
            String,
        );
        let (total, rows): (u32, Vec<Row>) = self
            .conn
            .run(|mut c| async move { inv.invoke_async(&mut c).await })
            .await?;
        let sessions = rows
            .into_iter()
            .map(
                |(session_id, order, jti, login, seen, idle, exp, ip, user_agent, end, amr)| {
                    (
                        order,
                        SessionRecord {
                            session_id,
                            jti,
                            login_time: login,
                            last_seen: seen,
                            idle_expires_at: idle,
                            token_expires_at: exp,
                            absolute_end: end,
                            ip,
                            user_agent,
                            amr,
                        },
                    )
                },
            )
            .collect();
        Ok(SessionPage::new(total, sessions, limit))
    }

    /// How many connections the pool holds.
    pub fn pool_stats(&self) -> PoolStats {
        self.conn.pool_stats()
    }
}

fn ttl_ms(seconds: i64) -> i64 {
    seconds.max(1).saturating_mul(1000)
}

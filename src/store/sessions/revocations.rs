//! The revocation log: every revocation authd records is also appended here, so callers
//! that cache ValidateToken answers (the `client` layer) can drop them at once.
//!
//! Redis: a stream (`<prefix>revocations`, capped at `max_len` entries) shared by every
//! instance; one task per process tails it with a blocking XREAD while anyone watches, and
//! fans events out to the watchers. A watcher that resumes from a cursor first gets what it
//! missed (XRANGE), then the live events, without a gap: it subscribes to the fan-out
//! before the read, and the tail's starting point is fixed before the read too.
//! Memory: a ring of the last `max_len` events, for embedded mode.
//!
//! When events may have been lost (cursor older than what is kept, Redis restarted
//! empty, a watcher too slow for the fan-out) the watcher gets a `Reset`: drop everything.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::streams::{StreamId, StreamRangeReply, StreamReadOptions, StreamReadReply};
use redis::{AsyncCommands, Client, Value};
use tokio::sync::{broadcast, watch};

use crate::store::StoreError;

/// What was revoked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revocation {
    /// One token (Logout).
    Token {
        /// Owner.
        user_id: String,
        /// Its session.
        session_id: String,
        /// The token.
        jti: String,
    },
    /// One session (RevokeSession, the session limit).
    Session {
        /// Owner.
        user_id: String,
        /// The session.
        session_id: String,
    },
    /// Every session of a user but one (ChangePassword).
    User {
        /// The user.
        user_id: String,
        /// The session that stays.
        except_session_id: String,
    },
}

/// One entry of the log, or a signal about the log itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A revocation at `cursor`, recorded at `at` (unix seconds).
    Revoked {
        /// Position in the log.
        cursor: String,
        /// What.
        revocation: Revocation,
        /// When.
        at: i64,
    },
    /// Events may have been lost: drop every cached answer. Resume from `cursor`.
    Reset {
        /// Position to resume from.
        cursor: String,
    },
}

/// What a watcher gets: the missed events, then the live ones.
#[derive(Debug)]
pub struct Feed {
    /// Events after the watcher's cursor (possibly starting with a `Reset`).
    pub replay: Vec<Event>,
    /// Live events; those at or before the last replayed cursor are skipped by `next`.
    live: broadcast::Receiver<Event>,
    last: Cursor,
}

impl Feed {
    /// The next live event. A watcher that fell behind the fan-out gets a `Reset`.
    /// `None` when the log is closed.
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            match self.live.recv().await {
                Ok(event) => {
                    if let Event::Revoked { cursor, .. } = &event {
                        let c = Cursor::parse(cursor);
                        if c <= self.last {
                            continue; // already replayed
                        }
                        self.last = c;
                    }
                    return Some(event);
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    return Some(Event::Reset {
                        cursor: self.last.to_string(),
                    });
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    /// The position of the last event handed out.
    pub fn cursor(&self) -> String {
        self.last.to_string()
    }
}

/// A position: a Redis stream id `ms-seq`, or the memory log's sequence as `0-seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
struct Cursor(u64, u64);

impl Cursor {
    /// Parses `ms-seq`; anything else is the beginning (which leads to a `Reset` when
    /// resuming, the safe side).
    fn parse(s: &str) -> Self {
        let mut parts = s.splitn(2, '-');
        match (
            parts.next().and_then(|p| p.parse().ok()),
            parts.next().and_then(|p| p.parse().ok()),
        ) {
            (Some(ms), Some(seq)) => Self(ms, seq),
            _ => Self(0, 0),
        }
    }
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

const FANOUT_CAPACITY: usize = 4096;

/// The embedded log.
#[derive(Debug)]
pub struct MemoryLog {
    inner: Mutex<MemoryInner>,
    max_len: usize,
}

#[derive(Debug)]
struct MemoryInner {
    seq: u64,
    ring: VecDeque<Event>,
    tx: broadcast::Sender<Event>,
}

impl MemoryLog {
    /// Keeps the last `max_len` events for watchers that resume.
    pub fn new(max_len: usize) -> Self {
        let (tx, _) = broadcast::channel(FANOUT_CAPACITY);
        Self {
            inner: Mutex::new(MemoryInner {
                seq: 0,
                ring: VecDeque::new(),
                tx,
            }),
            max_len: max_len.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends and fans out.
    pub fn publish(&self, revocation: Revocation, at: i64) {
        let mut inner = self.lock();
        inner.seq += 1;
        let event = Event::Revoked {
            cursor: Cursor(0, inner.seq).to_string(),
            revocation,
            at,
        };
        if inner.ring.len() == self.max_len {
            inner.ring.pop_front();
        }
        inner.ring.push_back(event.clone());
        let _ = inner.tx.send(event);
    }

    /// Missed events after `after` (or none, from now), then live ones.
    pub fn subscribe(&self, after: Option<&str>) -> Feed {
        let inner = self.lock();
        let now = Cursor(0, inner.seq);
        let live = inner.tx.subscribe();
        let replay = match after {
            None => Vec::new(),
            Some(after) => {
                let after = Cursor::parse(after);
                let oldest_kept = inner.seq + 1 - inner.ring.len() as u64;
                if after > now || after.0 != 0 || after.1 + 1 < oldest_kept {
                    // Not a cursor of this log's lifetime, or older than what is kept.
                    vec![Event::Reset {
                        cursor: now.to_string(),
                    }]
                } else {
                    inner
                        .ring
                        .iter()
                        .filter(|e| matches!(e, Event::Revoked { cursor, .. } if Cursor::parse(cursor) > after))
                        .cloned()
                        .collect()
                }
            }
        };
        Feed {
            replay,
            live,
            last: now,
        }
    }
}

/// The Redis log: a capped stream and this process's tail of it.
pub struct RedisLog {
    client: Client,
    key: String,
    max_len: usize,
    /// Events older than any token's lifetime matter to no one: the stream expires
    /// this long after its last event.
    retention_ms: i64,
    tx: broadcast::Sender<Event>,
    tailing: AtomicBool,
    /// The id the running tail reads after; `None` until it has fixed its start.
    tail_from: watch::Sender<Option<Cursor>>,
}

impl std::fmt::Debug for RedisLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLog")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// How long one blocking XREAD waits before the tail checks whether anyone still watches.
const TAIL_BLOCK: Duration = Duration::from_millis(1000);

impl RedisLog {
    /// A log at `key`, capped at about `max_len` entries, gone `retention` after its
    /// last event.
    pub fn new(client: Client, key: String, max_len: usize, retention: Duration) -> Arc<Self> {
        let (tx, _) = broadcast::channel(FANOUT_CAPACITY);
        let (tail_from, _) = watch::channel(None);
        Arc::new(Self {
            client,
            key,
            max_len: max_len.max(1),
            retention_ms: i64::try_from(retention.as_millis()).unwrap_or(i64::MAX),
            tx,
            tailing: AtomicBool::new(false),
            tail_from,
        })
    }

    /// The XADD (and expiry) for one revocation, to run on a pooled connection.
    pub fn append_command(&self, revocation: &Revocation, at: i64) -> redis::Pipeline {
        let (kind, user, session, jti, except) = match revocation {
            Revocation::Token {
                user_id,
                session_id,
                jti,
            } => ("token", user_id, session_id.as_str(), jti.as_str(), ""),
            Revocation::Session {
                user_id,
                session_id,
            } => ("session", user_id, session_id.as_str(), "", ""),
            Revocation::User {
                user_id,
                except_session_id,
            } => ("user", user_id, "", "", except_session_id.as_str()),
        };
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&self.key)
            .arg("MAXLEN")
            .arg("~")
            .arg(self.max_len)
            .arg("*")
            .arg("kind")
            .arg(kind)
            .arg("user")
            .arg(user)
            .arg("session")
            .arg(session)
            .arg("jti")
            .arg(jti)
            .arg("except")
            .arg(except)
            .arg("at")
            .arg(at);
        let mut pipe = redis::pipe();
        pipe.add_command(cmd)
            .cmd("PEXPIRE")
            .arg(&self.key)
            .arg(self.retention_ms.max(1000))
            .ignore();
        pipe
    }

    /// Missed events after `after` (or none, from now), then live ones.
    pub async fn subscribe(self: &Arc<Self>, after: Option<&str>) -> Result<Feed, StoreError> {
        let live = self.tx.subscribe();
        let mut started = self.tail_from.subscribe();
        self.ensure_tail();
        // Wait until the tail has fixed where it reads from: everything after that point
        // reaches `live`, so the replay below leaves no gap.
        let tail_from = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Some(c) = *started.borrow_and_update() {
                    return Ok(c);
                }
                if started.changed().await.is_err() {
                    return Err(());
                }
            }
        })
        .await
        .map_err(|_| StoreError::Unavailable(anyhow::anyhow!("revocation log tail did not start")))?
        .map_err(|()| StoreError::Unavailable(anyhow::anyhow!("revocation log closed")))?;

        let Some(after) = after else {
            return Ok(Feed {
                replay: Vec::new(),
                live,
                last: tail_from,
            });
        };
        let after = Cursor::parse(after);
        let mut conn = self
            .client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| StoreError::Unavailable(e.into()))?;
        let marks = stream_marks(&mut conn, &self.key)
            .await
            .map_err(|e| StoreError::Unavailable(e.into()))?;
        let lost = match marks {
            // No stream: nothing was ever logged here, or Redis restarted empty.
            None => after > Cursor(0, 0),
            // Past the head: a cursor from a stream that was lost since. Behind what was
            // trimmed: entries after the cursor are gone.
            Some(m) => after > m.last_generated || after < m.max_deleted,
        };
        if lost {
            let now = marks.map_or(tail_from, |m| m.last_generated.max(tail_from));
            return Ok(Feed {
                replay: vec![Event::Reset {
                    cursor: now.to_string(),
                }],
                live,
                last: now,
            });
        }
        let range: StreamRangeReply = conn
            .xrange(&self.key, format!("({after}"), "+")
            .await
            .map_err(|e| StoreError::Unavailable(e.into()))?;
        let mut last = after.max(tail_from);
        let mut replay = Vec::with_capacity(range.ids.len());
        for entry in &range.ids {
            if let Some(event) = decode(entry) {
                last = last.max(Cursor::parse(&entry.id));
                replay.push(event);
            }
        }
        Ok(Feed { replay, live, last })
    }

    fn ensure_tail(self: &Arc<Self>) {
        if !self.tailing.swap(true, Ordering::AcqRel) {
            tokio::spawn(tail(Arc::clone(self)));
        }
    }
}

/// Reads the stream while anyone watches, fanning events out; reconnects with backoff,
/// and tells watchers to reset when Redis lost the stream meanwhile.
async fn tail(log: Arc<RedisLog>) {
    let mut from: Option<Cursor> = None;
    let mut backoff = Duration::from_millis(50);
    loop {
        if log.tx.receiver_count() == 0 {
            log.tailing.store(false, Ordering::Release);
            log.tail_from.send_replace(None);
            // A watcher may have arrived between the check and the store.
            if log.tx.receiver_count() == 0 || log.tailing.swap(true, Ordering::AcqRel) {
                return;
            }
        }
        let mut conn = match log.client.get_multiplexed_async_connection().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::debug!(error = %e, "revocation log: Redis unreachable");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        // Where the stream stands now.
        let head = match stream_marks(&mut conn, &log.key).await {
            Ok(marks) => marks.map_or(Cursor(0, 0), |m| m.last_generated),
            Err(e) => {
                tracing::debug!(error = %e, "revocation log: cannot read the stream");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        match from {
            None => from = Some(head),
            Some(prev) if head < prev => {
                // The stream went back in time: Redis restarted empty.
                let _ = log.tx.send(Event::Reset {
                    cursor: head.to_string(),
                });
                from = Some(head);
            }
            Some(_) => {}
        }
        log.tail_from.send_replace(from);
        backoff = Duration::from_millis(50);
        // Read until the connection fails or nobody watches.
        loop {
            if log.tx.receiver_count() == 0 {
                break;
            }
            let position = from.unwrap_or_default();
            let options = StreamReadOptions::default()
                .block(usize::try_from(TAIL_BLOCK.as_millis()).unwrap_or(1000))
                .count(512);
            let reply: Result<Option<StreamReadReply>, _> = conn
                .xread_options(&[&log.key], &[position.to_string()], &options)
                .await;
            match reply {
                Ok(Some(reply)) => {
                    for entry in reply.keys.iter().flat_map(|k| k.ids.iter()) {
                        from = Some(Cursor::parse(&entry.id).max(position));
                        if let Some(event) = decode(entry) {
                            let _ = log.tx.send(event);
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "revocation log: read failed; reconnecting");
                    tokio::time::sleep(backoff).await;
                    break;
                }
            }
        }
    }
}

/// Where a stream stands: its newest id ever, and the newest id trimmed or deleted.
#[derive(Debug, Clone, Copy)]
struct Marks {
    last_generated: Cursor,
    max_deleted: Cursor,
}

/// XINFO STREAM's marks; `None` when the stream does not exist.
async fn stream_marks(
    conn: &mut redis::aio::MultiplexedConnection,
    key: &str,
) -> redis::RedisResult<Option<Marks>> {
    let exists: bool = conn.exists(key).await?;
    if !exists {
        return Ok(None);
    }
    let info: Value = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(key)
        .query_async(conn)
        .await?;
    let pairs: Vec<(Value, Value)> = match info {
        Value::Map(pairs) => pairs,
        Value::Array(items) => {
            let mut items = items.into_iter();
            let mut pairs = Vec::new();
            while let (Some(k), Some(v)) = (items.next(), items.next()) {
                pairs.push((k, v));
            }
            pairs
        }
        _ => Vec::new(),
    };
    let text = |v: &Value| match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        _ => String::new(),
    };
    let mut marks = Marks {
        last_generated: Cursor(0, 0),
        max_deleted: Cursor(0, 0),
    };
    for (k, v) in &pairs {
        match text(k).as_str() {
            "last-generated-id" => marks.last_generated = Cursor::parse(&text(v)),
            "max-deleted-entry-id" => marks.max_deleted = Cursor::parse(&text(v)),
            _ => {}
        }
    }
    Ok(Some(marks))
}

fn decode(entry: &StreamId) -> Option<Event> {
    let field = |name: &str| -> String {
        match entry.map.get(name) {
            Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            Some(Value::SimpleString(s)) => s.clone(),
            _ => String::new(),
        }
    };
    let user_id = field("user");
    let revocation = match field("kind").as_str() {
        "token" => Revocation::Token {
            user_id,
            session_id: field("session"),
            jti: field("jti"),
        },
        "session" => Revocation::Session {
            user_id,
            session_id: field("session"),
        },
        "user" => Revocation::User {
            user_id,
            except_session_id: field("except"),
        },
        _ => return None,
    };
    Some(Event::Revoked {
        cursor: entry.id.clone(),
        revocation,
        at: field("at").parse().unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(n: u32) -> Revocation {
        Revocation::Token {
            user_id: "u".into(),
            session_id: "s".into(),
            jti: format!("j{n}"),
        }
    }

    #[test]
    fn cursors_order_like_stream_ids() {
        assert!(Cursor::parse("5-1") > Cursor::parse("5-0"));
        assert!(Cursor::parse("6-0") > Cursor::parse("5-9"));
        assert_eq!(Cursor::parse("garbage"), Cursor(0, 0));
        assert_eq!(Cursor::parse("17-3").to_string(), "17-3");
    }

    #[tokio::test]
    async fn the_memory_log_replays_what_a_watcher_missed_then_goes_live() {
        let log = MemoryLog::new(100);
        log.publish(token(1), 1);
        let first = log.subscribe(None);
        let cursor = first.cursor();
        drop(first);
        log.publish(token(2), 2);
        log.publish(token(3), 3);
        let mut feed = log.subscribe(Some(&cursor));
        assert_eq!(feed.replay.len(), 2);
        log.publish(token(4), 4);
        let Some(Event::Revoked { revocation, .. }) = feed.next().await else {
            panic!("no live event")
        };
        assert_eq!(revocation, token(4));
    }

    #[tokio::test]
    async fn a_cursor_older_than_the_ring_gets_a_reset() {
        let log = MemoryLog::new(2);
        let cursor = log.subscribe(None).cursor();
        for n in 0..5 {
            log.publish(token(n), 0);
        }
        let feed = log.subscribe(Some(&cursor));
        assert!(matches!(feed.replay.as_slice(), [Event::Reset { .. }]));
        let foreign = log.subscribe(Some("1700000000000-0"));
        assert!(matches!(foreign.replay.as_slice(), [Event::Reset { .. }]));
    }
}

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
use redis::{AsyncCommands, Script, Value};
use tokio::sync::{Semaphore, broadcast, watch};

use crate::store::StoreError;
use crate::store::redis_conn::{Connection, RedisConn};

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
    /// Not a revocation: the user's roles changed (SetRoles). Caches drop the user's
    /// answers, so the next one carries the new roles.
    UserUpdated {
        /// The user.
        user_id: String,
    },
    /// Every session of a user but one (ChangePassword).
    User {
        /// The user.
        user_id: String,
        /// The session that stays.
        except_session_id: String,
    },
}

impl Revocation {
    /// The user it concerns.
    pub fn user_id(&self) -> &str {
        match self {
            Self::Token { user_id, .. }
            | Self::Session { user_id, .. }
            | Self::UserUpdated { user_id }
            | Self::User { user_id, .. } => user_id,
        }
    }
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

/// What a watcher gets: the events it missed after its cursor, page by page as it
/// reads them, then the live ones.
///
/// The replay is read lazily, [`REPLAY_PAGE`] events at a time, so a watcher that
/// resumes from far back costs the store one small read per page it actually consumes,
/// never one read of the whole log.
#[derive(Debug)]
pub struct Feed {
    /// Events fetched and not yet handed out (possibly a `Reset`).
    pending: VecDeque<Event>,
    /// Where the rest of the replay comes from; `None` once it has caught up.
    source: Option<Source>,
    /// Live events; those at or before `last` are skipped (already replayed).
    live: broadcast::Receiver<Event>,
    /// The position of the last event handed out.
    last: Cursor,
    /// How far the replay has read, events that could not be decoded included: the
    /// next page starts after it.
    read_to: Cursor,
}

#[derive(Debug)]
enum Source {
    Memory(Arc<MemoryLog>),
    Redis(Arc<RedisLog>),
}

/// Events read from the log per replay page.
pub const REPLAY_PAGE: usize = 256;

impl Feed {
    /// The next event: the replay first, then live ones. A watcher that fell behind the
    /// fan-out, or whose replay was trimmed away under it, gets a `Reset`. `None` when
    /// the log is closed; an error when a replay page cannot be read (the watcher
    /// resumes later from its cursor).
    pub async fn next(&mut self) -> Option<Result<Event, StoreError>> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                self.advance(&event);
                return Some(Ok(event));
            }
            if let Some(source) = &self.source {
                let page = match source {
                    Source::Memory(log) => Ok(log.page(self.read_to)),
                    Source::Redis(log) => log.page(self.read_to, false).await,
                };
                match page {
                    Ok(Page::Events { events, read, to }) => self.take(events, read, to),
                    Ok(Page::Lost { now }) => {
                        self.source = None;
                        self.pending.push_back(Event::Reset {
                            cursor: now.to_string(),
                        });
                    }
                    Err(e) => return Some(Err(e)),
                }
                continue;
            }
            match self.live.recv().await {
                Ok(event) => {
                    if let Event::Revoked { cursor, .. } = &event
                        && Cursor::parse(cursor).is_some_and(|c| c <= self.last)
                    {
                        continue; // already replayed
                    }
                    self.advance(&event);
                    return Some(Ok(event));
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    return Some(Ok(Event::Reset {
                        cursor: self.last.to_string(),
                    }));
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    fn advance(&mut self, event: &Event) {
        let cursor = match event {
            Event::Revoked { cursor, .. } | Event::Reset { cursor } => cursor,
        };
        if let Some(c) = Cursor::parse(cursor) {
            // A reset moves the position to the log's head, which may be behind `last`
            // after a store restart: take it as it is.
            self.last = match event {
                Event::Reset { .. } => c,
                Event::Revoked { .. } => self.last.max(c),
            };
        }
    }

    /// The position of the last event handed out.
    pub fn cursor(&self) -> String {
        self.last.to_string()
    }

    fn new(source: Option<Source>, live: broadcast::Receiver<Event>, last: Cursor) -> Self {
        Self {
            pending: VecDeque::new(),
            source,
            live,
            last,
            read_to: last,
        }
    }

    /// Queues a page's events. A page of fewer than [`REPLAY_PAGE`] entries read (not
    /// decoded: an entry this version cannot decode still counts) ends the replay.
    fn take(&mut self, events: Vec<Event>, read: usize, to: Option<Cursor>) {
        if read < REPLAY_PAGE {
            self.source = None;
        }
        if let Some(to) = to {
            self.read_to = self.read_to.max(to);
        }
        self.pending.extend(events);
    }

    fn reset(live: broadcast::Receiver<Event>, now: Cursor) -> Self {
        Self {
            pending: VecDeque::from([Event::Reset {
                cursor: now.to_string(),
            }]),
            source: None,
            live,
            last: now,
            read_to: now,
        }
    }
}

/// One page of a replay.
enum Page {
    /// The events after the position asked for, how many entries were read, and the id
    /// of the last one (fewer than a page read: the replay is done).
    Events {
        events: Vec<Event>,
        read: usize,
        to: Option<Cursor>,
    },
    /// Events after the position are gone: the watcher must reset.
    Lost {
        /// The log's head.
        now: Cursor,
    },
}

/// A position: a Redis stream id `ms-seq`, or the memory log's sequence as `0-seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Cursor(u64, u64);

impl Cursor {
    /// Parses `ms-seq`: two unsigned decimal numbers that fit in 64 bits. Anything else
    /// (`$`, `-1`, `0`, `+`, garbage, overflow) is `None`: the caller answers
    /// INVALID_ARGUMENT rather than guess a position.
    pub fn parse(s: &str) -> Option<Self> {
        let (ms, seq) = s.split_once('-')?;
        let number = |p: &str| {
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            p.parse::<u64>().ok()
        };
        Some(Self(number(ms)?, number(seq)?))
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
    /// This log's lifetime (the process's start, in unix ms): the first half of every
    /// cursor, so a cursor from before a restart is never taken for one of now.
    epoch: u64,
    seq: u64,
    ring: VecDeque<Event>,
    tx: broadcast::Sender<Event>,
}

impl MemoryInner {
    fn head(&self) -> Cursor {
        Cursor(self.epoch, self.seq)
    }

    /// Whether the events after `after` are all still in the ring. A cursor of another
    /// log (a Redis id, one past the head) cannot be vouched for either.
    fn holds_after(&self, after: Cursor) -> bool {
        let oldest_kept = self.seq + 1 - self.ring.len() as u64;
        after.0 == self.epoch && after <= self.head() && after.1 + 1 >= oldest_kept
    }
}

impl MemoryLog {
    /// Keeps the last `max_len` events for watchers that resume.
    pub fn new(max_len: usize) -> Arc<Self> {
        use crate::clock::Clock as _;
        let epoch = u64::try_from(crate::clock::SystemClock.unix_millis()).unwrap_or(1);
        Self::with_epoch(max_len, epoch)
    }

    fn with_epoch(max_len: usize, epoch: u64) -> Arc<Self> {
        let (tx, _) = broadcast::channel(FANOUT_CAPACITY);
        Arc::new(Self {
            inner: Mutex::new(MemoryInner {
                epoch,
                seq: 0,
                ring: VecDeque::new(),
                tx,
            }),
            max_len: max_len.max(1),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends and fans out.
    pub fn publish(&self, revocation: Revocation, at: i64) {
        let mut inner = self.lock();
        inner.seq += 1;
        let event = Event::Revoked {
            cursor: inner.head().to_string(),
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
    pub fn subscribe(self: &Arc<Self>, after: Option<Cursor>) -> Feed {
        let inner = self.lock();
        let live = inner.tx.subscribe();
        match after {
            None => Feed::new(None, live, inner.head()),
            Some(after) if inner.holds_after(after) => {
                Feed::new(Some(Source::Memory(Arc::clone(self))), live, after)
            }
            Some(_) => Feed::reset(live, inner.head()),
        }
    }

    /// Up to a page of events after `after`.
    fn page(&self, after: Cursor) -> Page {
        let inner = self.lock();
        if !inner.holds_after(after) {
            return Page::Lost { now: inner.head() };
        }
        let oldest_kept = inner.seq + 1 - inner.ring.len() as u64;
        // `holds_after` makes this index at most the ring's length.
        let skip = usize::try_from(after.1 + 1 - oldest_kept).unwrap_or(usize::MAX);
        let events: Vec<Event> = inner
            .ring
            .iter()
            .skip(skip)
            .take(REPLAY_PAGE)
            .cloned()
            .collect();
        let to = events.last().and_then(|e| match e {
            Event::Revoked { cursor, .. } => Cursor::parse(cursor),
            Event::Reset { .. } => None,
        });
        Page::Events {
            read: events.len(),
            events,
            to,
        }
    }
}

/// The Redis log: a capped stream and this process's tail of it.
pub struct RedisLog {
    /// Replay reads share the pool, its timeout and its breaker; the tail's blocking
    /// reads hold a connection of their own ([`RedisConn::dedicated`]).
    conn: RedisConn,
    key: String,
    max_len: usize,
    /// Events older than any token's lifetime matter to no one: the stream expires
    /// this long after its last event.
    retention_ms: i64,
    tx: broadcast::Sender<Event>,
    tailing: AtomicBool,
    /// The id the running tail reads after; `None` until it has fixed its start.
    tail_from: watch::Sender<Option<Cursor>>,
    /// Whether the tail follows the stream now, and how often it stopped following.
    tail_state: watch::Sender<TailState>,
    /// Replay reads in flight from this process: however many watchers resume at once,
    /// Redis sees at most this many page reads from us at a time.
    replay_reads: Semaphore,
    page_script: Script,
}

/// KEYS: the stream. ARGV: `(after`, count. The stream's XINFO and a page of XRANGE in
/// one atomic step; nil when there is no stream.
const PAGE_SCRIPT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
return {redis.call('XINFO', 'STREAM', KEYS[1]),
  redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', ARGV[2])}
";

/// Replay page reads one process runs against Redis at once.
pub const REPLAY_READS_IN_FLIGHT: usize = 2;

impl std::fmt::Debug for RedisLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLog")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// How long one blocking XREAD waits before the tail checks whether anyone still watches.
const TAIL_BLOCK: Duration = Duration::from_millis(1000);

/// How long the tail waits for a connection before it backs off and tries again.
const TAIL_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// How much longer than [`TAIL_BLOCK`] a blocking XREAD may take to answer before the
/// tail takes its connection for stalled (a partition, a hung server) and reconnects;
/// also the bound on the tail's other reads.
const TAIL_STALL_MARGIN: Duration = Duration::from_millis(500);

/// Whether this process's tail follows the stream: it has fixed its read position
/// and its reads answer. While it does, every event appended from that position on
/// reaches the fan-out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TailState {
    /// Following now.
    pub following: bool,
    /// How many times it stopped following (failed, stalled or stopped) so far: a
    /// watcher that sees this move knows it was down, however briefly.
    pub breaks: u64,
}

impl RedisLog {
    /// A log at `key`, capped at about `max_len` entries, gone `retention` after its
    /// last event.
    pub fn new(conn: RedisConn, key: String, max_len: usize, retention: Duration) -> Arc<Self> {
        let (tx, _) = broadcast::channel(FANOUT_CAPACITY);
        let (tail_from, _) = watch::channel(None);
        let (tail_state, _) = watch::channel(TailState::default());
        Arc::new(Self {
            conn,
            key,
            max_len: max_len.max(1),
            retention_ms: i64::try_from(retention.as_millis()).unwrap_or(i64::MAX),
            tx,
            tailing: AtomicBool::new(false),
            tail_from,
            tail_state,
            replay_reads: Semaphore::new(REPLAY_READS_IN_FLIGHT),
            page_script: Script::new(PAGE_SCRIPT),
        })
    }

    /// The stream's key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The tail's state, for those who may only trust what they hold while the stream
    /// is followed (the session cache).
    pub fn following(&self) -> watch::Receiver<TailState> {
        self.tail_state.subscribe()
    }

    /// The tail follows again, or stopped following.
    fn set_following(&self, following: bool) {
        self.tail_state.send_if_modified(|state| {
            if state.following == following {
                return false;
            }
            state.following = following;
            if !following {
                state.breaks += 1;
            }
            true
        });
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
            Revocation::UserUpdated { user_id } => ("user_updated", user_id, "", "", ""),
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

    /// Missed events after `after` (or none, from now), then live ones. A cursor from
    /// before the oldest entry kept, or past the newest, starts with a `Reset`.
    pub async fn subscribe(self: &Arc<Self>, after: Option<Cursor>) -> Result<Feed, StoreError> {
        self.subscribe_at(after, false).await
    }

    /// Everything the log still holds, however much was trimmed before it, then live
    /// events: for this instance's own memory of revocations, which wants what it can
    /// get rather than a `Reset`.
    pub async fn subscribe_from_oldest(self: &Arc<Self>) -> Result<Feed, StoreError> {
        self.subscribe_at(Some(Cursor(0, 0)), true).await
    }

    async fn subscribe_at(
        self: &Arc<Self>,
        after: Option<Cursor>,
        from_oldest: bool,
    ) -> Result<Feed, StoreError> {
        let live = self.tx.subscribe();
        let mut started = self.tail_from.subscribe();
        self.ensure_tail();
        // Wait until the tail has fixed where it reads from: everything after that point
        // reaches `live`, so the replay leaves no gap.
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
            return Ok(Feed::new(None, live, tail_from));
        };
        // The first page decides whether the cursor can be vouched for.
        let mut feed = Feed::new(Some(Source::Redis(Arc::clone(self))), live, after);
        match self.page(after, from_oldest).await? {
            Page::Events { events, read, to } => {
                feed.take(events, read, to);
                Ok(feed)
            }
            Page::Lost { now } => Ok(Feed::reset(feed.live, now.max(tail_from))),
        }
    }

    /// Up to a page of entries after `after`, read in the same round trip (one script)
    /// as the stream's marks, so a trim between two pages is seen.
    /// With `from_oldest`, entries trimmed before the oldest kept one are not a reason
    /// to answer `Lost`.
    async fn page(&self, after: Cursor, from_oldest: bool) -> Result<Page, StoreError> {
        let _permit = self
            .replay_reads
            .acquire()
            .await
            .map_err(|_| StoreError::Unavailable(anyhow::anyhow!("revocation log closed")))?;
        let mut invocation = self.page_script.prepare_invoke();
        invocation
            .key(&self.key)
            .arg(format!("({after}"))
            .arg(REPLAY_PAGE);
        let reply: Value = self
            .conn
            .run(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await?;
        let (marks, range) = match reply {
            Value::Array(mut parts) if parts.len() == 2 => {
                let range = parts.pop().unwrap_or(Value::Nil);
                let info = parts.pop().unwrap_or(Value::Nil);
                let range: StreamRangeReply = redis::from_redis_value(range)
                    .map_err(|e| StoreError::Internal(anyhow::anyhow!("XRANGE reply: {e}")))?;
                (Marks::from_info(&info), range)
            }
            _ => (None, StreamRangeReply::default()),
        };
        let vouched = holds_after(marks, after)
            || (from_oldest && marks.is_none_or(|m| after <= m.last_generated));
        if !vouched {
            return Ok(Page::Lost {
                now: marks.map_or(Cursor(0, 0), |m| m.last_generated),
            });
        }
        Ok(Page::Events {
            events: range.ids.iter().filter_map(decode).collect(),
            read: range.ids.len(),
            to: range.ids.last().and_then(|e| Cursor::parse(&e.id)),
        })
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
            log.set_following(false);
            log.tailing.store(false, Ordering::Release);
            log.tail_from.send_replace(None);
            // A watcher may have arrived between the check and the store.
            if log.tx.receiver_count() == 0 || log.tailing.swap(true, Ordering::AcqRel) {
                return;
            }
        }
        let mut conn = match log.conn.dedicated(TAIL_CONNECT_TIMEOUT).await {
            Ok(conn) => conn,
            Err(e) => {
                log.set_following(false);
                tracing::debug!(error = %e, "revocation log: Redis unreachable");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        // Where the stream stands now.
        let marks = match tokio::time::timeout(
            TAIL_CONNECT_TIMEOUT + TAIL_STALL_MARGIN,
            stream_marks(&mut conn, &log.key),
        )
        .await
        {
            Ok(Ok(marks)) => marks,
            outcome => {
                log.set_following(false);
                match outcome {
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "revocation log: cannot read the stream");
                    }
                    _ => tracing::debug!("revocation log: the stream's marks did not come back"),
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        let head = marks.map_or(Cursor(0, 0), |m| m.last_generated);
        match from {
            None => from = Some(head),
            // The stream went back in time (Redis restarted empty), or entries after
            // where the tail stopped were trimmed while it was away: what the watchers
            // missed is gone.
            Some(prev) if !holds_after(marks, prev) => {
                let _ = log.tx.send(Event::Reset {
                    cursor: head.to_string(),
                });
                from = Some(head);
            }
            Some(_) => {}
        }
        log.tail_from.send_replace(from);
        // The read position is fixed: every event from here on reaches the fan-out.
        log.set_following(true);
        backoff = Duration::from_millis(50);
        // Read until the connection fails or stalls, or nobody watches.
        loop {
            if log.tx.receiver_count() == 0 {
                break;
            }
            let position = from.unwrap_or_default();
            let options = StreamReadOptions::default()
                .block(usize::try_from(TAIL_BLOCK.as_millis()).unwrap_or(1000))
                .count(512);
            let reply: Result<Option<StreamReadReply>, _> = match tokio::time::timeout(
                TAIL_BLOCK + TAIL_STALL_MARGIN,
                conn.xread_options(&[&log.key], &[position.to_string()], &options),
            )
            .await
            {
                Ok(reply) => reply,
                Err(_) => {
                    // The connection is stalled (or its answer lost): what it may still
                    // deliver is read again from `position` on a new one.
                    log.set_following(false);
                    tracing::debug!(
                        "revocation log: a blocking read did not come back; reconnecting"
                    );
                    break;
                }
            };
            match reply {
                Ok(Some(reply)) => {
                    for entry in reply.keys.iter().flat_map(|k| k.ids.iter()) {
                        if let Some(c) = Cursor::parse(&entry.id) {
                            from = Some(c.max(position));
                        }
                        if let Some(event) = decode(entry) {
                            let _ = log.tx.send(event);
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    log.set_following(false);
                    tracing::debug!(error = %e, "revocation log: read failed; reconnecting");
                    tokio::time::sleep(backoff).await;
                    break;
                }
            }
        }
    }
}

/// Where a stream stands.
#[derive(Debug, Clone, Copy)]
struct Marks {
    /// The newest id ever added.
    last_generated: Cursor,
    /// The oldest entry kept, if any.
    first: Option<Cursor>,
    /// Whether entries were ever removed (trimmed). Redis does not move
    /// `max-deleted-entry-id` when it trims, so this is read from `entries-added`
    /// against `length`; a server that does not report `entries-added` is assumed to
    /// have trimmed.
    trimmed: bool,
}

impl Marks {
    /// XINFO STREAM's reply; `None` for no stream (`Nil`).
    fn from_info(info: &Value) -> Option<Self> {
        let pairs: Vec<(&Value, &Value)> = match info {
            Value::Map(pairs) => pairs.iter().map(|(k, v)| (k, v)).collect(),
            Value::Array(items) => items
                .chunks_exact(2)
                .map(|pair| (&pair[0], &pair[1]))
                .collect(),
            _ => return None,
        };
        let mut last_generated = Cursor(0, 0);
        let mut first = None;
        let mut length = None;
        let mut added = None;
        for (k, v) in pairs {
            match text(k).as_str() {
                "last-generated-id" => {
                    last_generated = Cursor::parse(&text(v)).unwrap_or_default();
                }
                "length" => length = integer(v),
                "entries-added" => added = integer(v),
                "first-entry" => {
                    if let Value::Array(entry) = v {
                        first = entry.first().and_then(|id| Cursor::parse(&text(id)));
                    }
                }
                _ => {}
            }
        }
        Some(Self {
            last_generated,
            first,
            trimmed: match (length, added) {
                (Some(length), Some(added)) => added > length,
                _ => true,
            },
        })
    }
}

/// Whether every entry after `after` is still in the stream these marks describe.
fn holds_after(marks: Option<Marks>, after: Cursor) -> bool {
    match marks {
        // No stream: nothing was logged here yet, or Redis lost it (restarted empty,
        // or it expired after a quiet retention period).
        None => after == Cursor(0, 0),
        // Past the head: a cursor from a stream that was lost since. Before the oldest
        // entry of a trimmed stream: entries after the cursor may be gone. (The entry
        // just before the oldest may have been the cursor itself; a reset then is
        // only a spurious one, the safe side.)
        Some(m) => {
            after <= m.last_generated && !(m.trimmed && m.first.is_none_or(|first| after < first))
        }
    }
}

/// Where the stream stands; `None` when there is none.
async fn stream_marks(conn: &mut Connection, key: &str) -> redis::RedisResult<Option<Marks>> {
    let exists: bool = conn.exists(key).await?;
    if !exists {
        return Ok(None);
    }
    let info: Value = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(key)
        .query_async(conn)
        .await?;
    Ok(Marks::from_info(&info))
}

fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        _ => String::new(),
    }
}

fn integer(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        other => text(other).parse().ok(),
    }
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
        "user_updated" => Revocation::UserUpdated { user_id },
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

    fn cursor(s: &str) -> Cursor {
        Cursor::parse(s).unwrap()
    }

    async fn next(feed: &mut Feed) -> Event {
        feed.next().await.unwrap().unwrap()
    }

    #[test]
    fn cursors_order_like_stream_ids_and_only_stream_ids_parse() {
        assert!(cursor("5-1") > cursor("5-0"));
        assert!(cursor("6-0") > cursor("5-9"));
        assert_eq!(cursor("17-3").to_string(), "17-3");
        for bad in [
            "",
            "garbage",
            "0",
            "$",
            "-1",
            "-",
            "+",
            "1-",
            "-1-1",
            "1-+2",
            "+1-2",
            "1-2-3",
            " 1-2",
            "18446744073709551616-0",
            "0-18446744073709551616",
        ] {
            assert_eq!(Cursor::parse(bad), None, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn the_memory_log_replays_what_a_watcher_missed_then_goes_live() {
        let log = MemoryLog::with_epoch(100, 0);
        log.publish(token(1), 1);
        let first = log.subscribe(None);
        let after = cursor(&first.cursor());
        drop(first);
        log.publish(token(2), 2);
        log.publish(token(3), 3);
        let mut feed = log.subscribe(Some(after));
        for n in [2, 3, 4] {
            if n == 4 {
                log.publish(token(4), 4);
            }
            let Event::Revoked { revocation, .. } = next(&mut feed).await else {
                panic!("not a revocation")
            };
            assert_eq!(revocation, token(n));
        }
    }

    #[tokio::test]
    async fn a_long_replay_comes_in_pages_without_a_gap_or_a_repeat() {
        let n = REPLAY_PAGE * 3 + 7;
        let log = MemoryLog::with_epoch(n, 0);
        for i in 0..n {
            log.publish(token(u32::try_from(i).unwrap()), 0);
        }
        let mut feed = log.subscribe(Some(Cursor(0, 0)));
        assert!(
            feed.pending.is_empty(),
            "nothing is read before it is asked for"
        );
        for i in 0..n {
            let Event::Revoked { revocation, .. } = next(&mut feed).await else {
                panic!("reset at {i}")
            };
            assert_eq!(revocation, token(u32::try_from(i).unwrap()));
        }
        log.publish(token(9999), 0);
        let Event::Revoked { revocation, .. } = next(&mut feed).await else {
            panic!("no live event")
        };
        assert_eq!(revocation, token(9999));
    }

    #[tokio::test]
    async fn a_cursor_older_than_the_ring_or_not_of_this_log_gets_a_reset() {
        let log = MemoryLog::with_epoch(2, 0);
        let start = cursor(&log.subscribe(None).cursor());
        for n in 0..5 {
            log.publish(token(n), 0);
        }
        for after in [
            start,
            cursor("1700000000000-0"),
            cursor("0-6"),
            cursor("1-1"),
        ] {
            let mut feed = log.subscribe(Some(after));
            assert_eq!(
                next(&mut feed).await,
                Event::Reset {
                    cursor: "0-5".into()
                },
                "{after}"
            );
        }
    }

    #[tokio::test]
    async fn a_replay_overtaken_by_the_ring_ends_in_a_reset() {
        let log = MemoryLog::with_epoch(REPLAY_PAGE + 1, 0);
        for n in 0..=REPLAY_PAGE {
            log.publish(token(u32::try_from(n).unwrap()), 0);
        }
        let mut feed = log.subscribe(Some(Cursor(0, 0)));
        next(&mut feed).await; // the first page is read
        for n in 0..(2 * REPLAY_PAGE) {
            log.publish(token(u32::try_from(n).unwrap()), 0);
        }
        let mut events = Vec::new();
        while let Ok(Some(Ok(e))) =
            tokio::time::timeout(Duration::from_millis(50), feed.next()).await
        {
            events.push(e);
        }
        assert!(
            events.iter().any(|e| matches!(e, Event::Reset { .. })),
            "the lost events were not signalled"
        );
    }

    #[test]
    fn trimmed_streams_vouch_only_for_cursors_from_their_oldest_entry_on() {
        let marks = Some(Marks {
            last_generated: Cursor(50, 0),
            first: Some(Cursor(20, 0)),
            trimmed: true,
        });
        assert!(holds_after(marks, Cursor(20, 0)));
        assert!(holds_after(marks, Cursor(50, 0)));
        assert!(!holds_after(marks, Cursor(19, 9)));
        assert!(!holds_after(marks, Cursor(0, 0)));
        assert!(!holds_after(marks, Cursor(50, 1)));
        let untrimmed = marks.map(|m| Marks {
            trimmed: false,
            ..m
        });
        assert!(holds_after(untrimmed, Cursor(0, 0)));
        assert!(holds_after(None, Cursor(0, 0)));
        assert!(!holds_after(None, Cursor(1, 1)));
    }
}

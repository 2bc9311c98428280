//! Token checks against authd with a revocation-aware local cache.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use moka::sync::Cache;
use sha2::{Digest, Sha256};
use tonic::transport::Channel;

use crate::clock::{Clock as _, SystemClock};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use super::AuthContext;
use crate::proto::auth::v1 as pb;
use crate::proto::auth::v1::auth_service_client::AuthServiceClient;

/// The longest token looked at, as authd's own limit.
const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// How the layer checks tokens.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// Longest a valid answer is reused (never past the token's `exp`).
    pub cache_ttl: Duration,
    /// How long an invalid answer is reused.
    pub negative_ttl: Duration,
    /// Most answers cached.
    pub max_entries: u64,
    /// When authd cannot be reached: `false` (default) rejects with UNAVAILABLE; `true`
    /// admits a token that is well-formed and not expired, with
    /// `AuthContext::token_checked == false`.
    pub fail_open: bool,
    /// Follow authd's WatchRevocations stream to drop revoked answers at once.
    pub watch_revocations: bool,
    /// The credential authd's WatchRevocations asks for (one of its
    /// `WATCH_CREDENTIALS`). Without it the stream is not followed, and cached answers
    /// are checked again after `stale_after`.
    pub watch_credential: Option<WatchCredential>,
    /// While that stream is down, a cached answer older than this is checked again.
    pub stale_after: Duration,
    /// With no message (not even a heartbeat) for this long, the stream counts as down.
    pub watch_timeout: Duration,
    /// Time allowed for one ValidateToken call.
    pub request_timeout: Duration,
    /// Request paths let through without a token (prefix match).
    pub exempt_prefixes: Vec<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            cache_ttl: Duration::from_secs(30),
            negative_ttl: Duration::from_secs(2),
            max_entries: 100_000,
            fail_open: false,
            watch_revocations: true,
            watch_credential: None,
            stale_after: Duration::from_secs(1),
            watch_timeout: Duration::from_secs(15),
            request_timeout: Duration::from_secs(1),
            exempt_prefixes: vec![
                "/grpc.health.v1.Health/".into(),
                "/grpc.reflection.v1.ServerReflection/".into(),
                "/grpc.reflection.v1alpha.ServerReflection/".into(),
            ],
        }
    }
}

/// A watcher's credential; kept out of `Debug` output.
#[derive(Clone)]
pub struct WatchCredential(String);

impl WatchCredential {
    /// Wraps `credential`.
    pub fn new(credential: impl Into<String>) -> Self {
        Self(credential.into())
    }
}

impl std::fmt::Debug for WatchCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WatchCredential(..)")
    }
}

/// Counters, for tests and dashboards.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AuthStats {
    /// Answers served from the cache.
    pub hits: u64,
    /// ValidateToken calls made to authd.
    pub authd_calls: u64,
    /// Revocation events applied (resets included).
    pub revocations: u64,
    /// Resets applied: every cached answer dropped because events may have been lost.
    pub resets: u64,
}

/// A cached answer.
#[derive(Debug, Clone)]
enum Answer {
    Valid(AuthContext),
    Invalid(pb::InvalidReason),
}

#[derive(Debug)]
struct Entry {
    answer: Answer,
    cached_at: Instant,
    /// The token's `jti`, for Logout events (only for valid answers).
    jti: String,
}

type Key = [u8; 32];
type Pending = Shared<BoxFuture<'static, Result<Arc<Entry>, Status>>>;

/// Per-entry lifetimes: valid answers until the earlier of the TTL and `exp`.
struct Lifetime {
    ttl: Duration,
    negative_ttl: Duration,
}

impl moka::Expiry<Key, Arc<Entry>> for Lifetime {
    fn expire_after_create(&self, _: &Key, entry: &Arc<Entry>, _: Instant) -> Option<Duration> {
        Some(match &entry.answer {
            Answer::Valid(ctx) => ctx
                .expires_at
                .duration_since(SystemClock.now())
                .unwrap_or_default()
                .min(self.ttl),
            Answer::Invalid(_) => self.negative_ttl,
        })
    }
}

struct Inner {
    client: AuthServiceClient<Channel>,
    config: AuthConfig,
    answers: Cache<Key, Arc<Entry>>,
    inflight: Mutex<HashMap<Key, Pending>>,
    /// Revoked `jti`s and `(user, session)`s, kept as long as a cached answer could live.
    revoked_tokens: Cache<String, ()>,
    revoked_sessions: Cache<(String, String), ()>,
    /// User-wide revocations: when, and the session spared.
    revoked_users: Cache<String, (Instant, String)>,
    /// Role changes (`USER_UPDATED`): when. Kept apart from `revoked_users`, so a later
    /// `USER` revocation that spares a session (ChangePassword) cannot replace it and
    /// let that session's answers with the old roles stand.
    updated_users: Cache<String, Instant>,
    /// Answers cached before this were made before a Reset: all stale.
    reset_at: Mutex<Option<Instant>>,
    watch_up: AtomicBool,
    last_message: Mutex<Option<Instant>>,
    hits: AtomicU64,
    authd_calls: AtomicU64,
    revocations: AtomicU64,
    resets: AtomicU64,
}

/// Checks bearer tokens against authd, with the cache. Cheap to clone.
#[derive(Clone)]
pub struct AuthValidator {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AuthValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthValidator")
            .field("config", &self.inner.config)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl AuthValidator {
    /// Talks to authd over `channel`. With `watch_revocations`, starts the task that
    /// follows the revocation stream (so call it inside a Tokio runtime); the task ends
    /// when the last clone of the validator is dropped.
    pub fn new(channel: Channel, config: AuthConfig) -> Self {
        let marker_ttl = config.cache_ttl.max(config.negative_ttl) + Duration::from_secs(1);
        let inner = Arc::new(Inner {
            client: AuthServiceClient::new(channel),
            answers: Cache::builder()
                .max_capacity(config.max_entries)
                .expire_after(Lifetime {
                    ttl: config.cache_ttl,
                    negative_ttl: config.negative_ttl,
                })
                .build(),
            inflight: Mutex::new(HashMap::new()),
            revoked_tokens: markers(config.max_entries, marker_ttl),
            revoked_sessions: markers(config.max_entries, marker_ttl),
            revoked_users: markers(config.max_entries, marker_ttl),
            updated_users: markers(config.max_entries, marker_ttl),
            reset_at: Mutex::new(None),
            watch_up: AtomicBool::new(false),
            last_message: Mutex::new(None),
            hits: AtomicU64::new(0),
            authd_calls: AtomicU64::new(0),
            revocations: AtomicU64::new(0),
            resets: AtomicU64::new(0),
            config,
        });
        if inner.config.watch_revocations {
            match inner.config.watch_credential.clone() {
                Some(credential) => {
                    tokio::spawn(watch(Arc::downgrade(&inner), credential));
                }
                None => tracing::warn!(
                    "authd revocation stream not followed: no watch_credential; cached answers are checked again after stale_after"
                ),
            }
        }
        Self { inner }
    }

    /// The configuration in use.
    pub fn config(&self) -> &AuthConfig {
        &self.inner.config
    }

    /// Counters so far.
    pub fn stats(&self) -> AuthStats {
        AuthStats {
            hits: self.inner.hits.load(Ordering::Relaxed),
            authd_calls: self.inner.authd_calls.load(Ordering::Relaxed),
            revocations: self.inner.revocations.load(Ordering::Relaxed),
            resets: self.inner.resets.load(Ordering::Relaxed),
        }
    }

    /// Whether the revocation stream is live right now.
    pub fn watching(&self) -> bool {
        self.inner.watching()
    }

    /// Whether `path` is let through without a token.
    pub fn is_exempt(&self, path: &str) -> bool {
        self.inner
            .config
            .exempt_prefixes
            .iter()
            .any(|p| path.starts_with(p.as_str()))
    }

    /// The caller behind a bearer token, or the status to reject the request with:
    /// UNAUTHENTICATED (with an `ErrorInfo` naming the reason) for a missing or bad token,
    /// UNAVAILABLE when authd cannot be asked (unless failing open).
    pub async fn authorize(&self, token: Option<&str>) -> Result<AuthContext, Status> {
        let token = check_shape(token)?;
        let key = key_of(token);
        if let Some(answer) = self.cached(&key) {
            return verdict(answer);
        }
        match self.fetch(key, token).await {
            Ok(entry) => verdict(entry.answer.clone()),
            Err(status) => self.unreachable(token, status),
        }
    }

    /// The cached answer, if there is one still to be trusted; no waiting, no I/O.
    pub fn authorize_cached(&self, token: Option<&str>) -> Option<Result<AuthContext, Status>> {
        let token = match check_shape(token) {
            Ok(token) => token,
            Err(status) => return Some(Err(status)),
        };
        self.cached(&key_of(token)).map(verdict)
    }

    fn cached(&self, key: &Key) -> Option<Answer> {
        let inner = &self.inner;
        let entry = inner.answers.get(key)?;
        if !inner.trusts(&entry) {
            inner.answers.invalidate(key);
            return None;
        }
        inner.hits.fetch_add(1, Ordering::Relaxed);
        Some(entry.answer.clone())
    }

    /// Asks authd, one call per token however many requests wait for it.
    async fn fetch(&self, key: Key, token: &str) -> Result<Arc<Entry>, Status> {
        let pending = {
            let mut inflight = self
                .inner
                .inflight
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            inflight
                .entry(key)
                .or_insert_with(|| {
                    let inner = Arc::clone(&self.inner);
                    let token = token.to_owned();
                    async move {
                        let result = inner.ask(&token).await;
                        if let Ok(entry) = &result {
                            inner.answers.insert(key, Arc::clone(entry));
                        }
                        inner
                            .inflight
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&key);
                        result
                    }
                    .boxed()
                    .shared()
                })
                .clone()
        };
        pending.await
    }

    fn unreachable(&self, token: &str, status: Status) -> Result<AuthContext, Status> {
        if !self.inner.config.fail_open {
            return Err(Status::unavailable(format!(
                "cannot check the token: authd unavailable ({})",
                status.message()
            )));
        }
        // Fail-open, by explicit choice: read the claims without verifying them, and
        // still refuse what is visibly bad.
        match unverified_context(token) {
            Some(ctx) if ctx.expires_at > SystemClock.now() => {
                tracing::warn!(user_id = %ctx.user_id, "authd unreachable: admitting an unchecked token (fail-open)");
                Ok(ctx)
            }
            Some(_) => Err(rejection(pb::InvalidReason::Expired)),
            None => Err(rejection(pb::InvalidReason::Malformed)),
        }
    }
}

impl Inner {
    fn watching(&self) -> bool {
        self.watch_up.load(Ordering::Acquire)
            && self
                .last_message
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some_and(|t| t.elapsed() < self.config.watch_timeout)
    }

    /// Whether a cached entry may still be used.
    fn trusts(&self, entry: &Entry) -> bool {
        if self
            .reset_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|reset| entry.cached_at <= reset)
        {
            return false;
        }
        if self.config.watch_revocations
            && !self.watching()
            && entry.cached_at.elapsed() > self.config.stale_after
        {
            return false;
        }
        let Answer::Valid(ctx) = &entry.answer else {
            return true;
        };
        if self.revoked_tokens.contains_key(&entry.jti)
            || self
                .revoked_sessions
                .contains_key(&(ctx.user_id.clone(), ctx.session_id.clone()))
        {
            return false;
        }
        if self
            .updated_users
            .get(&ctx.user_id)
            .is_some_and(|at| entry.cached_at <= at)
        {
            return false;
        }
        match self.revoked_users.get(&ctx.user_id) {
            Some((at, spared)) => entry.cached_at > at || spared == ctx.session_id,
            None => true,
        }
    }

    async fn ask(&self, token: &str) -> Result<Arc<Entry>, Status> {
        self.authd_calls.fetch_add(1, Ordering::Relaxed);
        let cached_at = Instant::now();
        let mut request = tonic::Request::new(pb::ValidateTokenRequest {
            token: token.to_owned(),
            ..Default::default()
        });
        request.set_timeout(self.config.request_timeout);
        let reply = self
            .client
            .clone()
            .validate_token(request)
            .await?
            .into_inner();
        let answer = if reply.valid {
            Answer::Valid(AuthContext {
                user_id: reply.user_id,
                username: reply.username,
                session_id: reply.session_id,
                expires_at: reply
                    .expires_at
                    .map_or(UNIX_EPOCH, |t| system_time(t.seconds)),
                token_checked: true,
                revocation_checked: reply.revocation_checked,
                roles: reply.roles,
                auth_time: reply
                    .auth_time
                    .map_or(UNIX_EPOCH, |t| system_time(t.seconds)),
                amr: reply.amr,
            })
        } else {
            Answer::Invalid(reply.reason())
        };
        let jti = match &answer {
            Answer::Valid(_) => unverified_claims(token)
                .and_then(|c| c.jti)
                .unwrap_or_default(),
            Answer::Invalid(_) => String::new(),
        };
        Ok(Arc::new(Entry {
            answer,
            cached_at,
            jti,
        }))
    }

    fn apply(&self, event: &pb::RevocationEvent) {
        use pb::RevocationKind as Kind;
        match event.kind() {
            Kind::Token => {
                self.revoked_tokens.insert(event.jti.clone(), ());
                self.revoked_sessions
                    .insert((event.user_id.clone(), event.session_id.clone()), ());
            }
            Kind::Session => {
                self.revoked_sessions
                    .insert((event.user_id.clone(), event.session_id.clone()), ());
            }
            Kind::User => {
                self.revoked_users.insert(
                    event.user_id.clone(),
                    (Instant::now(), event.except_session_id.clone()),
                );
            }
            // The user's roles changed: every answer cached before now is asked again.
            Kind::UserUpdated => {
                self.updated_users
                    .insert(event.user_id.clone(), Instant::now());
            }
            Kind::Reset => {
                *self.reset_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                self.resets.fetch_add(1, Ordering::Relaxed);
            }
            Kind::Heartbeat | Kind::Unspecified => return,
        }
        self.revocations.fetch_add(1, Ordering::Relaxed);
    }
}

/// Follows WatchRevocations, resuming from the last cursor after any break, with
/// backoff; stops when the validator is gone.
async fn watch(inner: Weak<Inner>, credential: WatchCredential) {
    let mut cursor = String::new();
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let mut client = strong.client.clone();
        let timeout = strong.config.watch_timeout;
        drop(strong);
        let mut request = tonic::Request::new(pb::WatchRevocationsRequest {
            after: cursor.clone(),
        });
        match format!("Bearer {}", credential.0).parse() {
            Ok(value) => {
                request.metadata_mut().insert("authorization", value);
            }
            Err(_) => {
                tracing::warn!("watch_credential is not a valid header value; not watching");
                return;
            }
        }
        let mut stream = match client.watch_revocations(request).await {
            Ok(s) => s.into_inner(),
            Err(e) => {
                if matches!(
                    e.code(),
                    tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
                ) {
                    tracing::warn!(error = %e, "authd refused the watch credential; retrying");
                } else {
                    tracing::debug!(error = %e, "cannot watch authd revocations; retrying");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        loop {
            let message = tokio::time::timeout(timeout, stream.message()).await;
            let Some(strong) = inner.upgrade() else {
                return;
            };
            match message {
                Ok(Ok(Some(event))) => {
                    strong.watch_up.store(true, Ordering::Release);
                    *strong
                        .last_message
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                    strong.apply(&event);
                    if !event.cursor.is_empty() {
                        cursor = event.cursor;
                    }
                    backoff = Duration::from_millis(100);
                }
                Ok(Ok(None)) | Ok(Err(_)) | Err(_) => {
                    strong.watch_up.store(false, Ordering::Release);
                    tracing::debug!("authd revocation stream ended; resuming");
                    break;
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// A bounded set of revocation markers, each kept as long as a cached answer could live.
fn markers<K, V>(capacity: u64, ttl: Duration) -> Cache<K, V>
where
    K: std::hash::Hash + Eq + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    Cache::builder()
        .max_capacity(capacity)
        .time_to_live(ttl)
        .build()
}

fn check_shape(token: Option<&str>) -> Result<&str, Status> {
    match token {
        None | Some("") => Err(Status::unauthenticated("missing bearer token")),
        Some(t) if t.len() > MAX_TOKEN_BYTES => Err(rejection(pb::InvalidReason::Malformed)),
        Some(t) => Ok(t),
    }
}

fn key_of(token: &str) -> Key {
    Sha256::digest(token.as_bytes()).into()
}

fn verdict(answer: Answer) -> Result<AuthContext, Status> {
    match answer {
        Answer::Valid(ctx) => Ok(ctx),
        Answer::Invalid(reason) => Err(rejection(reason)),
    }
}

/// UNAUTHENTICATED with the reason in an `ErrorInfo` detail (domain `authd`).
fn rejection(reason: pb::InvalidReason) -> Status {
    Status::with_error_details(
        Code::Unauthenticated,
        format!("invalid token: {}", reason.as_str_name()),
        ErrorDetails::with_error_info(reason.as_str_name(), "authd", HashMap::new()),
    )
}

fn system_time(unix_seconds: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(unix_seconds).unwrap_or_default())
}

#[derive(serde::Deserialize)]
struct UnverifiedClaims {
    sub: Option<String>,
    username: Option<String>,
    sid: Option<String>,
    jti: Option<String>,
    exp: Option<i64>,
}

/// The token's payload, read without checking anything.
fn unverified_claims(token: &str) -> Option<UnverifiedClaims> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Whether the token's header asks for a JWS extension (`crit`, `b64`), which authd
/// refuses as malformed (see `auth::token`): visibly bad even unverified.
fn asks_for_extensions(token: &str) -> bool {
    let header = token
        .split('.')
        .next()
        .and_then(|h| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(h)
                .ok()
        })
        .and_then(|bytes| serde_json::from_slice::<serde_json::Map<_, _>>(&bytes).ok());
    header.is_none_or(|h| h.contains_key("crit") || h.contains_key("b64"))
}

fn unverified_context(token: &str) -> Option<AuthContext> {
    if asks_for_extensions(token) {
        return None;
    }
    let c = unverified_claims(token)?;
    Some(AuthContext {
        user_id: c.sub?,
        username: c.username.unwrap_or_default(),
        session_id: c.sid.unwrap_or_default(),
        expires_at: system_time(c.exp?),
        token_checked: false,
        revocation_checked: false,
        roles: Vec::new(),
        // Never read from an unchecked token: failing open grants no step-up.
        auth_time: UNIX_EPOCH,
        amr: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rejection_names_its_reason_in_error_info() {
        let s = rejection(pb::InvalidReason::Revoked);
        assert_eq!(s.code(), Code::Unauthenticated);
        let info = s.get_details_error_info().unwrap();
        assert_eq!(info.reason, "INVALID_REASON_REVOKED");
        assert_eq!(info.domain, "authd");
    }

    #[test]
    fn unverified_claims_are_read_but_marked_unchecked() {
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(r#"{"sub":"u1","username":"a","sid":"s1","jti":"j1","exp":4000000000}"#);
        let ctx = unverified_context(&format!("e30.{payload}.sig")).unwrap();
        assert_eq!(ctx.user_id, "u1");
        assert!(!ctx.token_checked);
        assert!(unverified_context("not a token").is_none());
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        for header in [
            r#"{"alg":"HS256","crit":["x-unknown"],"x-unknown":1}"#,
            r#"{"alg":"HS256","b64":false}"#,
        ] {
            let token = format!("{}.{payload}.sig", b64(header));
            assert!(unverified_context(&token).is_none(), "{header}");
        }
    }

    #[test]
    fn missing_and_oversized_tokens_are_refused_before_any_call() {
        assert_eq!(check_shape(None).unwrap_err().code(), Code::Unauthenticated);
        let big = "a".repeat(MAX_TOKEN_BYTES + 1);
        assert_eq!(
            check_shape(Some(&big)).unwrap_err().code(),
            Code::Unauthenticated
        );
    }
}

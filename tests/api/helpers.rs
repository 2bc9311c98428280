//! The test harness: authd served on 127.0.0.1:0 against the real MariaDB and Redis,
//! with a fresh database and a fresh Redis key prefix per test, and a clock the test
//! moves by hand.

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, SystemTime};

use authd::Application;
use authd::clock::ManualClock;
use authd::config::Config;
use authd::proto::auth::v1 as pb;
use authd::proto::auth::v1::auth_service_client::AuthServiceClient;
use serde::Serialize;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

/// The JWT secret every test server uses.
pub const SECRET: &str = "test-secret-0123456789abcdef0123456789";
/// The credential every test server accepts from revocation watchers.
pub const WATCH_CREDENTIAL: &str = "test-watch-credential-0123456789abcdef";
/// Register calls one address may make in the test servers' settings (see `test_env`).
pub const REGISTER_THRESHOLD: &str = "100000";
/// Hashing jobs one address may hold in the test servers' settings (see `test_env`).
pub const MAX_PER_ADDRESS: &str = "1000";
/// A password that meets the policy.
pub const PASSWORD: &str = "Correct-Horse-9";

/// Where the shared MariaDB is; override with AUTHD_TEST_MYSQL.
pub fn mysql_base() -> String {
    std::env::var("AUTHD_TEST_MYSQL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into())
}

/// Where the shared Redis is; override with AUTHD_TEST_REDIS.
pub fn redis_base() -> String {
    std::env::var("AUTHD_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into())
}

/// The storage a test server runs on. Tests that hold for both are written once and
/// run on each (see `on_every_backend!`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// MySQL (MariaDB) users, Redis sessions.
    MySqlRedis,
    /// SQLite users, in-process sessions.
    Embedded,
}

impl Backend {
    pub async fn spawn(self) -> TestApp {
        self.spawn_with(&[]).await
    }

    pub async fn spawn_with(self, overrides: &[(&str, &str)]) -> TestApp {
        match self {
            Backend::MySqlRedis => spawn_app_with(overrides).await,
            Backend::Embedded => spawn_embedded_with(overrides).await,
        }
    }
}

/// A running authd for one test.
pub struct TestApp {
    pub backend: Backend,
    /// The gRPC address.
    pub addr: SocketAddr,
    pub client: AuthServiceClient<Channel>,
    pub channel: Channel,
    /// The HTTP listener (`/metrics`, `/healthz`), unless the test turned it off.
    pub http_addr: Option<SocketAddr>,
    pub clock: Arc<ManualClock>,
    /// The MySQL database name, or the SQLite file's folder.
    pub db_name: String,
    /// A sqlx URL for the users database, whichever it is.
    pub db_url: String,
    pub redis_url: String,
    pub key_prefix: String,
    stop: Option<oneshot::Sender<()>>,
    pub server: Option<JoinHandle<anyhow::Result<()>>>,
    /// The settings it was started with.
    vars: Vec<(String, String)>,
    /// False for a sibling, which shares another app's database and must not drop it.
    owns_db: bool,
}

/// The settings a test server gets unless the test overrides them.
pub fn test_env(db_url: &str, redis_url: &str, key_prefix: &str) -> Vec<(String, String)> {
    [
        ("JWT_SECRET", SECRET),
        ("DATABASE_URL", db_url),
        ("REDIS_URL", redis_url),
        ("REDIS_KEY_PREFIX", key_prefix),
        ("GRPC_ADDR", "127.0.0.1:0"),
        ("HTTP_ADDR", "127.0.0.1:0"),
        ("BCRYPT_COST", "4"),
        // Many apps share the two cores during the suite: hashing at normal priority keeps
        // one test's Logins from waiting out another test's CPU (SCHED_IDLE, the default,
        // is tested in auth::hasher and measured by authd-bench).
        ("BCRYPT_NICE", "0"),
        ("REDIS_RETRY_INTERVAL", "50ms"),
        ("WATCH_CREDENTIALS", WATCH_CREDENTIAL),
        // Every test client calls from 127.0.0.1, and many tests register more users, or
        // hash more at once, than one address may by default; the tests of those limits
        // set them themselves.
        ("THROTTLE_REGISTER_THRESHOLD", REGISTER_THRESHOLD),
        ("BCRYPT_MAX_PER_ADDRESS", MAX_PER_ADDRESS),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// A fresh database name and key prefix.
pub fn fresh_names() -> (String, String) {
    let id = uuid::Uuid::new_v4().simple().to_string();
    (format!("authd_t_{}", &id[..16]), format!("t{}:", &id[..16]))
}

/// authd with the default test settings.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[]).await
}

/// authd on MySQL and Redis with some settings overridden (`REDIS_URL` included).
pub async fn spawn_app_with(overrides: &[(&str, &str)]) -> TestApp {
    spawn_app_reaching_mysql_at(None, overrides).await
}

/// The shared MariaDB's `host:port`.
pub fn mysql_addr() -> SocketAddr {
    let base = mysql_base();
    let host = base.rsplit_once('@').map_or(base.as_str(), |(_, h)| h);
    let host = host.trim_start_matches("mysql://").trim_end_matches('/');
    std::net::ToSocketAddrs::to_socket_addrs(host)
        .unwrap()
        .next()
        .unwrap()
}

/// Like [`spawn_app_with`], with authd reaching MariaDB at `via` (a proxy) while the
/// test's own [`TestApp::db`] goes straight to it.
pub async fn spawn_app_reaching_mysql_at(
    via: Option<SocketAddr>,
    overrides: &[(&str, &str)],
) -> TestApp {
    let (db_name, key_prefix) = fresh_names();
    let db_url = format!("{}/{db_name}", mysql_base());
    let served_url = match via {
        Some(via) => {
            let base = mysql_base();
            let credentials = base.rsplit_once('@').map_or("mysql://", |(c, _)| c);
            let at = if credentials.ends_with("//") { "" } else { "@" };
            format!("{credentials}{at}{via}/{db_name}")
        }
        None => db_url.clone(),
    };
    let vars = with_overrides(test_env(&served_url, &redis_base(), &key_prefix), overrides);
    let redis_url = vars
        .iter()
        .find(|(k, _)| k == "REDIS_URL")
        .map(|(_, v)| v.clone())
        .unwrap();
    start(
        Backend::MySqlRedis,
        vars,
        db_name,
        db_url,
        redis_url,
        key_prefix,
        fresh_clock(),
    )
    .await
}

/// authd on an SQLite file and in-process sessions, as with nothing configured.
pub async fn spawn_embedded_with(overrides: &[(&str, &str)]) -> TestApp {
    let (db_name, _) = fresh_names();
    let dir = std::env::temp_dir().join(&db_name);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("users.db");
    let vars: Vec<(String, String)> = [
        ("JWT_SECRET", SECRET),
        ("SQLITE_PATH", path.to_str().unwrap()),
        ("GRPC_ADDR", "127.0.0.1:0"),
        ("HTTP_ADDR", "127.0.0.1:0"),
        ("BCRYPT_COST", "4"),
        ("BCRYPT_NICE", "0"),
        ("WATCH_CREDENTIALS", WATCH_CREDENTIAL),
        ("THROTTLE_REGISTER_THRESHOLD", REGISTER_THRESHOLD),
        ("BCRYPT_MAX_PER_ADDRESS", MAX_PER_ADDRESS),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let vars = with_overrides(vars, overrides);
    let db_url = format!("sqlite://{}", path.display());
    start(
        Backend::Embedded,
        vars,
        dir.display().to_string(),
        db_url,
        String::new(),
        String::new(),
        fresh_clock(),
    )
    .await
}

/// A test clock standing at the current time.
fn fresh_clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(SystemTime::now()))
}

fn with_overrides(
    mut vars: Vec<(String, String)>,
    overrides: &[(&str, &str)],
) -> Vec<(String, String)> {
    for (k, v) in overrides {
        vars.retain(|(name, _)| name != k);
        vars.push(((*k).to_owned(), (*v).to_owned()));
    }
    vars
}

async fn start(
    backend: Backend,
    vars: Vec<(String, String)>,
    db_name: String,
    db_url: String,
    redis_url: String,
    key_prefix: String,
    clock: Arc<ManualClock>,
) -> TestApp {
    capture_logs();
    let config = Config::from_vars(vars.clone()).expect("test config");
    let app = Application::build_with_clock(config, clock.clone())
        .await
        .expect("authd builds");
    let addr = app.local_addr();
    let http_addr = app.http_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until(async {
        let _ = stopped.await;
    }));
    // Lazy: a TLS server refuses this plaintext channel, and TLS tests check just that.
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    TestApp {
        backend,
        addr,
        client: AuthServiceClient::new(channel.clone()),
        channel,
        http_addr,
        clock,
        db_name,
        db_url,
        redis_url,
        key_prefix,
        stop: Some(stop),
        server: Some(server),
        vars,
        owns_db: true,
    }
}

/// Everything every test server logged (at `authd=debug`), from the start of the run.
static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Sends the log of every server in this test binary to one buffer (a process has one
/// global subscriber), so tests can look for what must never be logged. Written as
/// authd's default `pretty` format writes it.
fn capture_logs() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let _ = tracing_subscriber::registry()
            .with(tracing_subscriber::EnvFilter::new("authd=debug"))
            .with(authd::telemetry::log_layer(
                authd::config::LogFormat::Pretty,
                || LogWriter,
                false,
            ))
            .try_init();
    });
}

/// The logs captured so far, from every test in the binary.
pub fn captured_logs() -> String {
    String::from_utf8_lossy(&LOGS.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
}

/// `request` with `authorization: Bearer <token>`.
pub fn bearer<T>(token: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii token"),
    );
    request
}

impl TestApp {
    /// A second authd on the same database, Redis, key prefix and clock: another
    /// instance of the same deployment.
    pub async fn spawn_sibling(&self) -> TestApp {
        self.spawn_sibling_with(&[]).await
    }

    /// [`TestApp::spawn_sibling`] with some settings overridden (a `REDIS_URL` through a
    /// proxy, say).
    pub async fn spawn_sibling_with(&self, overrides: &[(&str, &str)]) -> TestApp {
        let mut sibling = start(
            self.backend,
            with_overrides(self.vars.clone(), overrides),
            self.db_name.clone(),
            self.db_url.clone(),
            self.redis_url.clone(),
            self.key_prefix.clone(),
            self.clock.clone(),
        )
        .await;
        sibling.owns_db = false;
        sibling
    }

    /// Login as a gateway would call it, passing the end user's address.
    pub async fn login_from(
        &self,
        username: &str,
        password: &str,
        client_ip: &str,
    ) -> Result<pb::LoginResponse, Status> {
        self.client
            .clone()
            .login(pb::LoginRequest {
                username: username.into(),
                password: password.into(),
                client_ip: client_ip.into(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn register(
        &self,
        username: &str,
        password: &str,
    ) -> Result<pb::RegisterResponse, Status> {
        register_on(&self.client, username, password).await
    }

    pub async fn login(&self, username: &str, password: &str) -> Result<pb::LoginResponse, Status> {
        self.login_from(username, password, "").await
    }

    /// Registers `username` with [`PASSWORD`] and logs in.
    pub async fn user_with_session(
        &self,
        username: &str,
    ) -> (pb::RegisterResponse, pb::LoginResponse) {
        let user = self.register(username, PASSWORD).await.expect("register");
        let login = self.login(username, PASSWORD).await.expect("login");
        (user, login)
    }

    pub async fn validate(&self, token: &str) -> Result<pb::ValidateTokenResponse, Status> {
        self.client
            .clone()
            .validate_token(pb::ValidateTokenRequest {
                token: token.into(),
            })
            .await
            .map(|r| r.into_inner())
    }

    /// The reason ValidateToken gives; panics if it errs.
    pub async fn reason(&self, token: &str) -> pb::InvalidReason {
        let v = self.validate(token).await.expect("ValidateToken answers");
        v.reason()
    }

    pub async fn logout(&self, token: &str) -> Result<(), Status> {
        self.client
            .clone()
            .logout(bearer(token, pb::LogoutRequest {}))
            .await
            .map(|_| ())
    }

    /// The first page of the caller's sessions, at the default size.
    pub async fn list_sessions(&self, token: &str) -> Result<pb::ListSessionsResponse, Status> {
        self.list_sessions_page(token, 0, "").await
    }

    pub async fn list_sessions_page(
        &self,
        token: &str,
        page_size: i32,
        page_token: &str,
    ) -> Result<pb::ListSessionsResponse, Status> {
        let request = pb::ListSessionsRequest {
            page_size,
            page_token: page_token.into(),
        };
        self.client
            .clone()
            .list_sessions(bearer(token, request))
            .await
            .map(|r| r.into_inner())
    }

    pub async fn revoke_session(&self, token: &str, session_id: &str) -> Result<(), Status> {
        self.client
            .clone()
            .revoke_session(bearer(
                token,
                pb::RevokeSessionRequest {
                    session_id: session_id.into(),
                },
            ))
            .await
            .map(|_| ())
    }

    pub async fn change_password(
        &self,
        token: &str,
        current: &str,
        new: &str,
    ) -> Result<pb::ChangePasswordResponse, Status> {
        self.client
            .clone()
            .change_password(bearer(
                token,
                pb::ChangePasswordRequest {
                    current_password: current.into(),
                    new_password: new.into(),
                },
            ))
            .await
            .map(|r| r.into_inner())
    }

    /// A connection to this test's users database, MySQL or SQLite alike (queries
    /// with `?` placeholders and plain types read the same on both).
    pub async fn db(&self) -> sqlx::AnyPool {
        sqlx::any::install_default_drivers();
        sqlx::AnyPool::connect(&self.db_url).await.expect("db")
    }

    /// `GET path` on the HTTP listener: the status code and the body.
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        http_get(self.http_addr.expect("HTTP listener on"), path).await
    }

    /// The `/metrics` page.
    pub async fn scrape(&self) -> String {
        let (status, body) = self.http_get("/metrics").await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// A connection to this test's Redis.
    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.redis_url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .expect("redis")
    }

    /// Starts shutting down (as on SIGTERM) without waiting for it.
    pub fn begin_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Stops serving (as on SIGTERM) and waits for the server to finish.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.server.take() {
            Some(server) => server.await.expect("server task"),
            None => Ok(()),
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
        if !self.owns_db {
            return;
        }
        if self.backend == Backend::Embedded {
            let _ = std::fs::remove_dir_all(&self.db_name);
            return;
        }
        drop_database(&self.db_name);
    }
}

/// Drops a test's MySQL database, from a `Drop`: on a runtime of its own, since Drop
/// cannot await and the test's runtime may be ending.
pub fn drop_database(name: &str) {
    let name = name.to_owned();
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            if let Ok(pool) = sqlx::MySqlPool::connect(&mysql_base()).await {
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS `{name}`"
                )))
                .execute(&pool)
                .await;
            }
        });
    })
    .join();
}

/// Register through any client (another process's, say).
pub async fn register_on(
    client: &AuthServiceClient<Channel>,
    username: &str,
    password: &str,
) -> Result<pb::RegisterResponse, Status> {
    client
        .clone()
        .register(pb::RegisterRequest {
            username: username.into(),
            password: password.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// Login through any client, with no client address or agent.
pub async fn login_on(
    client: &AuthServiceClient<Channel>,
    username: &str,
    password: &str,
) -> Result<pb::LoginResponse, Status> {
    client
        .clone()
        .login(pb::LoginRequest {
            username: username.into(),
            password: password.into(),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

/// Claims for hand-made tokens; every field optional so a test can leave one out.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RawClaims {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exp: Option<i64>,
}

impl RawClaims {
    /// Claims as authd would write them for `now`.
    pub fn good(now: i64) -> Self {
        Self {
            iss: Some("authd".into()),
            aud: Some("authd".into()),
            sub: Some("u".into()),
            username: Some("someone".into()),
            sid: Some("s".into()),
            jti: Some("j".into()),
            iat: Some(now),
            nbf: Some(now),
            exp: Some(now + 3600),
        }
    }

    /// Signed HS256 with `secret`.
    pub fn sign(&self, secret: &str) -> String {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            self,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }
}

/// The current unix time of the test clock.
pub fn unix(clock: &ManualClock) -> i64 {
    use authd::clock::Clock;
    clock.unix_seconds()
}

/// Asserts a status code, with the message in the failure.
#[track_caller]
pub fn assert_code<T: std::fmt::Debug>(result: Result<T, Status>, code: Code) -> Status {
    match result {
        Ok(v) => panic!("expected {code:?}, got Ok({v:?})"),
        Err(s) => {
            assert_eq!(s.code(), code, "unexpected status: {s:?}");
            s
        }
    }
}

/// A `redis-server` of the test's own, on a free port, that the test may kill.
pub struct OwnRedis {
    pub port: u16,
    child: Option<Child>,
}

impl OwnRedis {
    pub async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut redis = Self { port, child: None };
        redis.restart().await;
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Starts (again) on the same port, empty, and waits until it answers.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH");
        self.child = Some(child);
        let client = redis::Client::open(self.url()).unwrap();
        for _ in 0..200 {
            if let Ok(mut c) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("redis-server on port {} did not start", self.port);
    }

    /// SIGSTOP: the process holds its connections open and answers nothing, as a hung
    /// server does.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// SIGCONT after [`OwnRedis::pause`].
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("redis-server running");
        let sent = Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()
            .expect("kill on PATH");
        assert!(sent.success(), "kill -{signal} failed");
    }

    /// SIGKILL, and wait until it is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// How many times a command has run, from INFO commandstats.
    pub async fn command_calls(&self, command: &str) -> u64 {
        let client = redis::Client::open(self.url()).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut c)
            .await
            .unwrap();
        let prefix = format!("cmdstat_{command}:calls=");
        info.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next())
            .map_or(0, |n| n.parse().unwrap())
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `check` every 20 ms until it holds or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Moves the test clock.
pub fn advance(app: &TestApp, by: Duration) {
    app.clock.advance(by);
}

/// A bare HTTP/1.1 `GET`: the status code and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

/// The sum of a metric's samples whose labels include all of `labels`, from a
/// Prometheus text page; 0 when there is none.
pub fn metric(page: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric_name, rest) = match series.split_once('{') {
                Some((n, rest)) => (n, rest),
                None => (series, ""),
            };
            (metric_name == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().ok())
            .flatten()
        })
        .sum()
}

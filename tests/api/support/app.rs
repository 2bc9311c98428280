//! authd served in-process on 127.0.0.1:0 against the real MariaDB and Redis (or
//! embedded storage), with a fresh database and a fresh Redis key prefix per test, and a
//! clock the test moves by hand.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use authd::Application;
use authd::clock::{Clock as _, ManualClock, SystemClock};
use authd::config::Config;
use authd::proto::auth::v1::auth_service_client::AuthServiceClient;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use super::logs::capture_logs;

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

/// The storage a test server runs on. Tests that hold for both are written once and
/// run on each (see `on_every_backend!`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// MySQL (MariaDB) users, Redis sessions.
    MySqlRedis,
    /// SQLite users, in-process sessions.
    Embedded,
    /// MySQL (MariaDB) users, sessions on a 3-primary Redis Cluster the tests start
    /// ([`shared_cluster`](super::shared_cluster)).
    MySqlCluster,
}

impl Backend {
    /// [`TestApp::builder`] on this backend.
    pub fn app(self) -> AppBuilder<'static> {
        TestApp::builder().backend(self)
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

impl TestApp {
    /// A test app on MySQL and Redis, the deployed shape, with the test settings
    /// ([`test_env`]): choose its backend and settings, then [`AppBuilder::spawn`] it.
    pub fn builder() -> AppBuilder<'static> {
        AppBuilder {
            backend: Backend::MySqlRedis,
            env: Vec::new(),
            mysql_at: None,
            sibling_of: None,
            clock_ahead: None,
        }
    }

    /// Another instance of this app's deployment: the same database, Redis, key prefix,
    /// clock and settings, which `env` may override (a `REDIS_URL` through a proxy, say).
    pub fn sibling(&self) -> AppBuilder<'_> {
        AppBuilder {
            backend: self.backend,
            sibling_of: Some(self),
            ..TestApp::builder()
        }
    }
}

impl TestApp {
    /// A connection to this test's users database, MySQL or SQLite alike (queries
    /// with `?` placeholders and plain types read the same on both).
    pub async fn db(&self) -> sqlx::AnyPool {
        sqlx::any::install_default_drivers();
        sqlx::AnyPool::connect(&self.db_url).await.expect("db")
    }

    /// A connection to this test's Redis, one server or a cluster.
    pub async fn redis(&self) -> super::TestRedis {
        match self.redis_url.strip_prefix("redis+cluster://") {
            Some(seeds) => super::TestRedis::Cluster(super::cluster_conn(seeds).await),
            None => super::TestRedis::Node(
                redis::Client::open(self.redis_url.as_str())
                    .unwrap()
                    .get_multiplexed_async_connection()
                    .await
                    .expect("redis"),
            ),
        }
    }

    /// The settings it was started with, as authd reads them: to build another authd
    /// on its storage by hand (and see it refuse to start).
    pub fn config(&self) -> Config {
        Config::from_vars(self.vars.clone()).expect("test config")
    }

    /// A session store of the test's own on this app's sessions, to drive directly: the
    /// same Redis and key prefix, or (embedded) a fresh in-process store like the app's.
    pub fn session_store(&self) -> authd::store::sessions::SessionStore {
        let config = self.config();
        let leeway = i64::try_from(config.jwt.leeway.as_secs()).unwrap();
        authd::store::sessions::SessionStore::new(
            &config.sessions,
            leeway,
            config.revocation_log_max_len,
            config.jwt.ttl,
        )
        .expect("session store")
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

/// A test app to be: what the test chose, on top of the test settings. The one place
/// a [`TestApp`] is made ([`AppBuilder::spawn`]).
#[must_use = "an app starts with `spawn`"]
pub struct AppBuilder<'a> {
    backend: Backend,
    /// Settings in place of the test settings of those names, the last one winning.
    env: Vec<(String, String)>,
    /// Where authd reaches MariaDB (a proxy), when not at [`mysql_base`].
    mysql_at: Option<SocketAddr>,
    /// The app whose storage, clock and settings this one shares.
    sibling_of: Option<&'a TestApp>,
    /// A sibling's clock of its own, this far ahead of its app's (instance clock skew).
    clock_ahead: Option<std::time::Duration>,
}

impl AppBuilder<'_> {
    /// Which storage it runs on ([`Backend::MySqlRedis`] unless told).
    pub fn backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// Sets `name` to `value`, in place of the test setting.
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Sets each of `vars`, as [`AppBuilder::env`] does.
    pub fn envs(mut self, vars: &[(&str, &str)]) -> Self {
        self.env.extend(owned(vars));
        self
    }

    /// authd reaches MariaDB at `via` (a proxy) while the test's own [`TestApp::db`]
    /// goes straight to it.
    pub fn mysql_at(mut self, via: SocketAddr) -> Self {
        self.mysql_at = Some(via);
        self
    }

    /// A sibling whose clock runs `by` ahead of its app's (and is moved on its own).
    pub fn clock_ahead(mut self, by: std::time::Duration) -> Self {
        self.clock_ahead = Some(by);
        self
    }

    /// Starts serving, and returns once it listens.
    pub async fn spawn(self) -> TestApp {
        let (storage, clock) = match self.sibling_of {
            Some(app) => {
                assert!(
                    self.backend == app.backend && self.mysql_at.is_none(),
                    "a sibling runs on its app's storage"
                );
                let clock = match self.clock_ahead {
                    Some(by) => Arc::new(ManualClock::new(app.clock.now() + by)),
                    None => app.clock.clone(),
                };
                (Storage::of(app), clock)
            }
            None => {
                let storage = match self.backend {
                    Backend::MySqlRedis => Storage::mysql_redis(self.mysql_at),
                    Backend::Embedded => Storage::embedded(),
                    Backend::MySqlCluster => Storage::mysql_cluster(self.mysql_at),
                };
                (storage, fresh_clock())
            }
        };
        let vars = with_overrides(storage.vars, &self.env);
        // A sibling keeps its app's Redis (the test's view of it) whatever it reaches it by.
        let redis_url = match self.sibling_of {
            Some(app) => app.redis_url.clone(),
            None => vars
                .iter()
                .find(|(k, _)| k == "REDIS_URL")
                .map(|(_, v)| v.clone())
                .unwrap_or_default(),
        };

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
            backend: self.backend,
            addr,
            client: AuthServiceClient::new(channel.clone()),
            channel,
            http_addr,
            clock,
            db_name: storage.db_name,
            db_url: storage.db_url,
            redis_url,
            key_prefix: storage.key_prefix,
            stop: Some(stop),
            server: Some(server),
            vars,
            owns_db: self.sibling_of.is_none(),
        }
    }
}

/// A fresh app's storage and the test settings that point authd at it.
struct Storage {
    vars: Vec<(String, String)>,
    /// The MySQL database name, or the SQLite file's folder.
    db_name: String,
    /// The test's own way into the users database.
    db_url: String,
    key_prefix: String,
}

impl Storage {
    /// A fresh database and key prefix on the shared MariaDB and Redis, MariaDB reached
    /// at `via` when there is one.
    fn mysql_redis(via: Option<SocketAddr>) -> Self {
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
        Self {
            vars: test_env(&served_url, &redis_base(), &key_prefix),
            db_name,
            db_url,
            key_prefix,
        }
    }

    /// [`Storage::mysql_redis`], with the sessions on the shared Redis Cluster.
    fn mysql_cluster(via: Option<SocketAddr>) -> Self {
        let mut storage = Self::mysql_redis(via);
        // Started once per test binary, at the first test that asks (a few seconds).
        let seeds = super::shared_cluster().seeds();
        storage.vars.retain(|(k, _)| k != "REDIS_URL");
        storage
            .vars
            .push(("REDIS_URL".to_owned(), format!("redis+cluster://{seeds}")));
        storage
    }

    /// A fresh SQLite file and in-process sessions, as with nothing configured.
    fn embedded() -> Self {
        let (db_name, _) = fresh_names();
        let dir = std::env::temp_dir().join(&db_name);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("users.db");
        let vars = owned(&[
            ("JWT_SECRET", SECRET),
            ("SQLITE_PATH", path.to_str().unwrap()),
            ("GRPC_ADDR", "127.0.0.1:0"),
            ("HTTP_ADDR", "127.0.0.1:0"),
            ("BCRYPT_COST", "4"),
            ("BCRYPT_NICE", "0"),
            ("WATCH_CREDENTIALS", WATCH_CREDENTIAL),
            ("THROTTLE_REGISTER_THRESHOLD", REGISTER_THRESHOLD),
            ("BCRYPT_MAX_PER_ADDRESS", MAX_PER_ADDRESS),
        ]);
        Self {
            vars,
            db_name: dir.display().to_string(),
            db_url: format!("sqlite://{}", path.display()),
            key_prefix: String::new(),
        }
    }

    /// What `app` runs on, for a sibling to share.
    fn of(app: &TestApp) -> Self {
        Self {
            vars: app.vars.clone(),
            db_name: app.db_name.clone(),
            db_url: app.db_url.clone(),
            key_prefix: app.key_prefix.clone(),
        }
    }
}

/// The settings a test server gets unless the test overrides them.
pub fn test_env(db_url: &str, redis_url: &str, key_prefix: &str) -> Vec<(String, String)> {
    owned(&[
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
    ])
}

/// Settings as owned pairs, as `Config::from_vars` and `Command::envs` take them.
pub fn owned(env: &[(&str, &str)]) -> Vec<(String, String)> {
    env.iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// `vars` with each of `overrides` in place of the setting of that name.
pub fn with_overrides(
    mut vars: Vec<(String, String)>,
    overrides: &[(impl AsRef<str>, impl AsRef<str>)],
) -> Vec<(String, String)> {
    for (k, v) in overrides {
        let (k, v) = (k.as_ref(), v.as_ref());
        vars.retain(|(name, _)| name != k);
        vars.push((k.to_owned(), v.to_owned()));
    }
    vars
}

/// A fresh database name and key prefix.
pub fn fresh_names() -> (String, String) {
    let id = uuid::Uuid::new_v4().simple().to_string();
    (format!("authd_t_{}", &id[..16]), format!("t{}:", &id[..16]))
}

/// A test clock standing at the current time.
fn fresh_clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(SystemClock.now()))
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

/// The current unix time of the test clock.
pub fn unix(clock: &ManualClock) -> i64 {
    use authd::clock::Clock;
    clock.unix_seconds()
}

/// Moves the test clock.
pub fn advance(app: &TestApp, by: Duration) {
    app.clock.advance(by);
}

//! authd-bench: how fast authd is, side by side with the limit of the machine (issue #6).
//!
//! ```sh
//! cargo run --release -p authd-bench               # everything, ~5 minutes
//! cargo run --release -p authd-bench -- --quick    # the same, scaled down, < 1 minute
//! ```
//!
//! Starts a private redis-server and the authd release binary of this workspace (on
//! MariaDB), prepares users and tokens, runs every scenario, prints a summary table with
//! each target met or not, and rewrites its section of BENCHMARKS.md.

mod h2load;
mod load;
mod pairs;
mod procs;
mod reference;
mod report;
mod window;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use authd::proto::auth::v1 as pb;
use authd::proto::auth::v1::auth_service_client::AuthServiceClient;
use clap::Parser;
use futures::StreamExt;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use load::{MakeCall, OpenLoop, Outcome, Stats, Stop, closed_loop, open_loop};
use procs::{CpuMark, Owned};
use report::{Check, Report, Row};

const PASSWORD: &str = "Bench-Pass-2026!";

/// Before each closed loop and the open loop: connections and caches warm.
const WARM_UP: Stop = Stop::After(Duration::from_millis(500));

/// Load generator for authd. Scenarios: health baseline, ValidateToken (live, revoked),
/// Refresh (closed loop, each call rotating one of as many sessions as calls in flight),
/// the reference server (the same calls with no auth work), Login, ValidateToken during a
/// Login storm, ValidateToken open loop, memory; issue #21: a second instance with
/// SESSION_CACHE=on (cache), the revocation window between two instances (window),
/// capacity at 10k/100k/1M live sessions (capacity), and the h2load check (h2load).
#[derive(Parser, Debug, Clone)]
#[command(version, about)]
struct Args {
    /// Scaled down: 3 s scenarios, 100,000 validations over 10,000 sessions.
    #[arg(long)]
    quick: bool,
    /// Benchmark an authd already running at this address (host:port) instead of
    /// starting one; sessions are then prepared through Login.
    #[arg(long)]
    target: Option<String>,
    /// With --target: its process id, for CPU and memory figures.
    #[arg(long)]
    pid: Option<u32>,
    /// The authd binary to start (default: built from this workspace).
    #[arg(long)]
    authd: Option<PathBuf>,
    /// Seconds per timed scenario (default 10, --quick 3).
    #[arg(long)]
    seconds: Option<f64>,
    /// Connections of a closed loop.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Calls in flight per connection, closed loop.
    #[arg(long, default_value_t = 16)]
    in_flight: usize,
    /// Open-loop rate of the ValidateToken scenario, calls/s.
    #[arg(long, default_value_t = 10_000.0)]
    rate: f64,
    /// Open-loop rate of ValidateToken during the Login storm, calls/s.
    #[arg(long, default_value_t = 2_000.0)]
    storm_rate: f64,
    /// Logins offered per second during the storm (open loop), far above what bcrypt serves.
    #[arg(long, default_value_t = 200.0)]
    storm_logins: f64,
    /// Logins in flight in the Login throughput scenario (default: what one address may
    /// hold of the bcrypt pool by default, a quarter of workers + queue = 5/4 × cores: the
    /// generator is one address, and more in flight is shed at once and retried in a
    /// loop that takes the CPU the SCHED_IDLE hashing threads need).
    #[arg(long)]
    login_in_flight: Option<usize>,
    /// bcrypt cost authd runs with.
    #[arg(long, default_value_t = 12)]
    cost: u32,
    /// Distinct sessions of the memory scenario (default 100,000; --quick 10,000).
    #[arg(long)]
    sessions: Option<usize>,
    /// ValidateTokens of the memory scenario (default 1,000,000; --quick 100,000).
    #[arg(long)]
    validations: Option<u64>,
    /// Open loops: sending threads, each with its own runtime and connections.
    #[arg(long, default_value_t = 1)]
    lanes: usize,
    /// Open loops: HTTP/2 connections per lane.
    #[arg(long, default_value_t = 2)]
    lane_connections: usize,
    /// Worker threads of the load generator's runtime (closed loops).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Capacity: live sessions at each step (default 10000,100000,1000000; --quick
    /// 10000,100000); sessions are added, so the last is the total in Redis.
    #[arg(long, value_delimiter = ',')]
    capacity: Vec<usize>,
    /// Paired rounds (scenario `pairs`): rounds of each pair, and seconds per loop.
    #[arg(long, default_value_t = 6)]
    pair_rounds: usize,
    #[arg(long, default_value_t = 2.0)]
    pair_seconds: f64,
    /// Revocation window: trials per pair of instances.
    #[arg(long, default_value_t = 1000)]
    window_trials: u64,
    /// Revocation window: skip the control with B in strict mode.
    #[arg(long)]
    no_window_control: bool,
    /// The h2load program (Debian: nghttp2-client).
    #[arg(long, default_value = "h2load")]
    h2load: String,
    /// h2load: connections (-c) and streams per connection (-m).
    #[arg(long, default_value_t = 4)]
    h2load_connections: usize,
    #[arg(long, default_value_t = 32)]
    h2load_streams: usize,
    /// Only these scenarios (comma-separated: health,live,revoked,refresh,reference,login,
    /// storm,open,memory,cache,pairs,window,h2load,capacity; and failover, which only runs when
    /// named, on --redis-cluster of our own); BENCHMARKS.md is then left alone. A full
    /// run includes h2load only when the h2load program is found.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Extra authd setting, KEY=VALUE (repeatable), e.g. --env RUST_LOG=warn.
    #[arg(long = "env", value_name = "KEY=VALUE")]
    extra_env: Vec<String>,
    /// MariaDB/MySQL host, port, user, password and database for the started authd.
    #[arg(long, default_value = "127.0.0.1")]
    db_host: String,
    #[arg(long, default_value_t = 3306)]
    db_port: u16,
    #[arg(long, default_value = "root")]
    db_user: String,
    #[arg(long, default_value = "")]
    db_pass: String,
    #[arg(long, default_value = "authd_bench")]
    db_name: String,
    /// The redis-server program to start.
    #[arg(long, default_value = "redis-server")]
    redis_server: String,
    /// Run authd on a Redis Cluster: the given nodes (host:port,…), or, with no value,
    /// a 3-primary cluster of our own (with a replica each when the failover scenario
    /// runs). The reference scenario is skipped (it reads one server's keys).
    #[arg(long, num_args = 0..=1, default_missing_value = "start", value_name = "NODES")]
    redis_cluster: Option<String>,
    /// Do not rewrite BENCHMARKS.md.
    #[arg(long)]
    no_write: bool,
    /// Internal: run as the reference server (authd-bench starts itself so).
    #[arg(long, hide = true)]
    serve_reference: bool,
    #[arg(long, hide = true, num_args = 3)]
    reference_keys: Vec<String>,
    #[arg(long, hide = true, num_args = 5)]
    reference_reply: Vec<String>,
    #[arg(long, hide = true)]
    reference_redis: Option<String>,
}

impl Args {
    fn seconds(&self) -> f64 {
        self.seconds.unwrap_or(if self.quick { 3.0 } else { 10.0 })
    }
    fn sessions(&self) -> usize {
        self.sessions
            .unwrap_or(if self.quick { 10_000 } else { 100_000 })
    }
    fn validations(&self) -> u64 {
        self.validations
            .unwrap_or(if self.quick { 100_000 } else { 1_000_000 })
    }
    fn runs(&self, scenario: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == scenario)
    }
    fn capacity(&self) -> Vec<usize> {
        let mut sizes = if self.capacity.is_empty() {
            if self.quick {
                vec![10_000, 100_000]
            } else {
                vec![10_000, 100_000, 1_000_000]
            }
        } else {
            self.capacity.clone()
        };
        sizes.sort_unstable();
        sizes.dedup();
        sizes
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = procs::OWN_EXE.set(std::env::current_exe()?);
    if args.serve_reference {
        // Tokio's default worker count (one per core), as authd runs.
        let settings = reference::Settings::from_args(
            args.reference_redis,
            &args.reference_keys,
            &args.reference_reply,
        )?;
        return tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(reference::serve(settings));
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?
        .block_on(run(args))
}

/// What authd runs on: its address, and the processes we own.
struct Server {
    addr: String,
    authd_pid: Option<u32>,
    redis_pid: Option<u32>,
    /// authd's settings (secret included), for preparing sessions through the library.
    env: Vec<(String, String)>,
    log: Option<PathBuf>,
    /// The nodes (port, pid) of a Redis Cluster we started, for the failover.
    cluster_ports: Vec<(u16, u32)>,
    /// The authd binary, to start more instances on the same store.
    binary: Option<PathBuf>,
    dir: PathBuf,
    _owned: Vec<Owned>,
}

/// One more authd process on the same store (same settings, secret and prefix, another
/// port), with `changes` applied to its settings; its address once health answers.
struct Instance {
    addr: String,
    pid: u32,
    _process: Owned,
}

impl Server {
    async fn another(&self, name: &str, changes: &[(&str, &str)]) -> anyhow::Result<Instance> {
        let binary = self
            .binary
            .as_deref()
            .context("a second authd needs an authd this program started (not --target)")?;
        let port = procs::free_port()?;
        let mut env = self.env.clone();
        env.retain(|(k, _)| k != "GRPC_ADDR" && !changes.iter().any(|(c, _)| c == k));
        env.push(("GRPC_ADDR".into(), format!("127.0.0.1:{port}")));
        env.extend(
            changes
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        let log = self.dir.join(format!("authd-{name}.log"));
        let (process, addr) = spawn_authd(binary, &env, &self.dir, &log).await?;
        eprintln!("started a second authd ({name}) on {addr}");
        Ok(Instance {
            addr,
            pid: process.pid(),
            _process: process,
        })
    }
}

async fn start_server(args: &Args, dir: &std::path::Path) -> anyhow::Result<Server> {
    if let Some(addr) = &args.target {
        return Ok(Server {
            addr: addr.clone(),
            authd_pid: args.pid,
            redis_pid: None,
            env: Vec::new(),
            log: None,
            cluster_ports: Vec::new(),
            binary: None,
            dir: dir.to_owned(),
            _owned: Vec::new(),
        });
    }
    let binary = procs::authd_binary(args.authd.as_deref())?;
    let mut owned = Vec::new();
    let mut cluster_ports = Vec::new();
    let (redis_setting, redis_pid) = match args.redis_cluster.as_deref() {
        None => {
            let (redis, redis_port) = procs::start_redis(&args.redis_server, dir)?;
            let pid = redis.pid();
            owned.push(redis);
            (("REDIS_ADDR", format!("127.0.0.1:{redis_port}")), Some(pid))
        }
        Some("start") => {
            let replicas = usize::from(args.only.iter().any(|s| s == "failover"));
            let (nodes, ports) = procs::start_cluster(&args.redis_server, dir, 3, replicas)?;
            let pids: Vec<u32> = nodes.iter().map(Owned::pid).collect();
            owned.extend(nodes);
            let seeds = ports
                .iter()
                .map(|p| format!("127.0.0.1:{p}"))
                .collect::<Vec<_>>()
                .join(",");
            cluster_ports = ports.iter().copied().zip(pids).collect();
            (("REDIS_CLUSTER_NODES", seeds), None)
        }
        Some(nodes) => (("REDIS_CLUSTER_NODES", nodes.to_owned()), None),
    };
    let grpc_port = procs::free_port()?;
    let mut env: Vec<(String, String)> = vec![
        (
            "JWT_SECRET".into(),
            format!(
                "{}{}",
                authd::auth::token::random_id(),
                authd::auth::token::random_id()
            ),
        ),
        ("DB_HOST".into(), args.db_host.clone()),
        ("DB_PORT".into(), args.db_port.to_string()),
        ("DB_USER".into(), args.db_user.clone()),
        ("DB_NAME".into(), args.db_name.clone()),
        (redis_setting.0.into(), redis_setting.1),
        ("REDIS_KEY_PREFIX".into(), "bench:".into()),
        ("GRPC_ADDR".into(), format!("127.0.0.1:{grpc_port}")),
        ("HTTP_ADDR".into(), String::new()),
        ("BCRYPT_COST".into(), args.cost.to_string()),
        // As deployed (deploy/k8s, docker-compose): JSON lines at info.
        ("LOG_FORMAT".into(), "json".into()),
        ("RUST_LOG".into(), "info".into()),
    ];
    if !args.db_pass.is_empty() {
        env.push(("DB_PASS".into(), args.db_pass.clone()));
    }
    for (k, v) in extra_env(&args.extra_env)? {
        env.retain(|(key, _)| *key != k);
        env.push((k, v));
    }
    let log = dir.join("authd.log");
    let (authd, addr) = spawn_authd(&binary, &env, dir, &log).await?;
    let authd_pid = authd.pid();
    owned.insert(0, authd);
    Ok(Server {
        addr,
        authd_pid: Some(authd_pid),
        redis_pid,
        env,
        log: Some(log),
        cluster_ports,
        binary: Some(binary),
        dir: dir.to_owned(),
        _owned: owned,
    })
}

/// Starts authd with `env` (its GRPC_ADDR on 127.0.0.1) and waits until health answers.
async fn spawn_authd(
    binary: &Path,
    env: &[(String, String)],
    dir: &Path,
    log: &Path,
) -> anyhow::Result<(Owned, String)> {
    let addr = env
        .iter()
        .find(|(k, _)| k == "GRPC_ADDR")
        .map(|(_, v)| v.clone())
        .context("GRPC_ADDR is not among authd's settings")?;
    let mut authd = procs::start_authd(binary, env, dir, log)?;
    // Up when health answers (start-up hashes a dummy password at the configured cost).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Err(e) = authd.check_alive() {
            bail!("{e}; its log ends:\n{}", procs::tail(log, 20));
        }
        if let Ok(ch) = endpoint(&addr)?.connect().await
            && HealthClient::new(ch)
                .check(HealthCheckRequest::default())
                .await
                .is_ok()
        {
            return Ok((authd, addr));
        }
        if Instant::now() > deadline {
            bail!(
                "authd did not answer within 60 s; its log ends:\n{}",
                procs::tail(log, 20)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `--env KEY=VALUE` settings as pairs.
fn extra_env(given: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    given
        .iter()
        .map(|kv| {
            let (k, v) = kv
                .split_once('=')
                .with_context(|| format!("--env {kv}: expected KEY=VALUE"))?;
            Ok((k.to_owned(), v.to_owned()))
        })
        .collect()
}

fn endpoint(addr: &str) -> anyhow::Result<Endpoint> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .connect_timeout(Duration::from_secs(5)))
}

async fn connect(addr: &str, n: usize) -> anyhow::Result<Vec<Channel>> {
    let mut channels = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        channels.push(endpoint(addr)?.connect().await?);
    }
    Ok(channels)
}

/// `RESOURCE_EXHAUSTED` for `Code::ResourceExhausted`.
fn code_label(status: &tonic::Status) -> String {
    authd::grpc::status::code_name(status.code()).to_owned()
}

fn bearer<T>(token: &str, message: T) -> anyhow::Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    Ok(request)
}

#[derive(Clone)]
struct Clients {
    auth: Arc<Vec<AuthServiceClient<Channel>>>,
    health: Arc<Vec<HealthClient<Channel>>>,
}

impl Clients {
    fn new(channels: &[Channel]) -> Self {
        Self {
            auth: Arc::new(
                channels
                    .iter()
                    .map(|c| AuthServiceClient::new(c.clone()))
                    .collect(),
            ),
            health: Arc::new(
                channels
                    .iter()
                    .map(|c| HealthClient::new(c.clone()))
                    .collect(),
            ),
        }
    }

    fn auth(&self, i: u64) -> AuthServiceClient<Channel> {
        self.auth[(i % self.auth.len() as u64) as usize].clone()
    }

    fn health(&self, i: u64) -> HealthClient<Channel> {
        self.health[(i % self.health.len() as u64) as usize].clone()
    }
}

/// ValidateToken of `tokens[i % len]`, expecting `valid` (or the `reason` when not).
fn validate_call(
    clients: Clients,
    tokens: Arc<Vec<String>>,
    expect_reason: Option<pb::InvalidReason>,
) -> impl Fn(u64) -> std::pin::Pin<Box<dyn Future<Output = Outcome> + Send>> + Clone + Send + Sync {
    move |i| {
        let mut client = clients.auth(i);
        let token = tokens[(i % tokens.len() as u64) as usize].clone();
        Box::pin(async move {
            match client
                .validate_token(pb::ValidateTokenRequest {
                    token,
                    ..Default::default()
                })
                .await
            {
                Ok(r) => {
                    let r = r.into_inner();
                    match expect_reason {
                        None if r.valid => Ok(()),
                        Some(reason) if !r.valid && r.reason == reason as i32 => Ok(()),
                        _ => Err(format!(
                            "INVALID:{}",
                            pb::InvalidReason::try_from(r.reason).map_or("?", |r| r.as_str_name())
                        )),
                    }
                }
                Err(s) => Err(code_label(&s)),
            }
        })
    }
}

/// `grpc.health.v1.Health/Check`: the baseline, a call that does no auth work.
fn health_call(
    clients: Clients,
) -> impl Fn(u64) -> std::pin::Pin<Box<dyn Future<Output = Outcome> + Send>> + Clone + Send + Sync {
    move |i| {
        let mut c = clients.health(i);
        Box::pin(async move {
            c.check(HealthCheckRequest::default())
                .await
                .map(|_| ())
                .map_err(|s| code_label(&s))
        })
    }
}

/// `validate_call` on an open-loop lane's own channels.
fn validate_maker(
    tokens: Arc<Vec<String>>,
    expect_reason: Option<pb::InvalidReason>,
) -> MakeCall<impl Fn(u64) -> std::pin::Pin<Box<dyn Future<Output = Outcome> + Send>>> {
    Arc::new(move |channels: Vec<Channel>| {
        validate_call(Clients::new(&channels), Arc::clone(&tokens), expect_reason)
    })
}

fn login_call(
    clients: Clients,
    users: Arc<Vec<String>>,
) -> impl Fn(u64) -> std::pin::Pin<Box<dyn Future<Output = Outcome> + Send>> + Clone + Send + Sync {
    move |i| {
        let mut client = clients.auth(i);
        let username = users[(i % users.len() as u64) as usize].clone();
        Box::pin(async move {
            client
                .login(pb::LoginRequest {
                    username,
                    password: PASSWORD.into(),
                    ..Default::default()
                })
                .await
                .map(|_| ())
                .map_err(|s| code_label(&s))
        })
    }
}

/// Refresh with a token from `chains` (one per call in flight, so no two calls present
/// the same token); its successor goes back. A failed call puts its token back: a retry
/// with it is answered with the same successor (docs/design.md §10).
fn refresh_call(
    clients: Clients,
    chains: Arc<std::sync::Mutex<Vec<String>>>,
) -> impl Fn(u64) -> std::pin::Pin<Box<dyn Future<Output = Outcome> + Send>> + Clone + Send + Sync {
    move |i| {
        let mut client = clients.auth(i);
        let chains = Arc::clone(&chains);
        Box::pin(async move {
            let taken = chains.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let Some(token) = taken else {
                return Err("NO_FREE_CHAIN".to_owned());
            };
            let answer = client
                .refresh(pb::RefreshRequest {
                    refresh_token: token.clone(),
                    ..Default::default()
                })
                .await;
            let (back, outcome) = match answer {
                Ok(r) => (r.into_inner().refresh_token, Ok(())),
                Err(s) => (token, Err(code_label(&s))),
            };
            chains.lock().unwrap_or_else(|e| e.into_inner()).push(back);
            outcome
        })
    }
}

/// A session's refresh token, from a Login.
async fn login_refresh(
    client: &mut AuthServiceClient<Channel>,
    username: &str,
) -> anyhow::Result<String> {
    Ok(client
        .login(pb::LoginRequest {
            username: username.into(),
            password: PASSWORD.into(),
            ..Default::default()
        })
        .await
        .with_context(|| format!("Login {username}"))?
        .into_inner()
        .refresh_token)
}

async fn login(client: &mut AuthServiceClient<Channel>, username: &str) -> anyhow::Result<String> {
    Ok(client
        .login(pb::LoginRequest {
            username: username.into(),
            password: PASSWORD.into(),
            ..Default::default()
        })
        .await
        .with_context(|| format!("Login {username}"))?
        .into_inner()
        .access_token)
}

/// The closed-loop scenarios: the same connections, calls in flight and duration.
struct Closed<'a> {
    meter: &'a Meter,
    mode: String,
    workers: usize,
    duration: Duration,
}

impl Closed<'_> {
    /// Half a second of warm-up, then the measured run and its row.
    async fn run<F, Fut>(&self, name: &str, label: &str, call: F) -> Row
    where
        F: Fn(u64) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Outcome> + Send,
    {
        closed_loop("warm-up", self.workers, WARM_UP, call.clone()).await;
        self.meter
            .row(
                name,
                self.mode.clone(),
                closed_loop(label, self.workers, Stop::After(self.duration), call),
            )
            .await
    }
}

/// A Login storm (Logins offered far above what bcrypt serves, open loop) with a call at
/// a steady rate beside it.
struct Storm<'a, S> {
    meter: &'a Meter,
    how: &'a OpenLoop,
    logins: f64,
    rate: f64,
    duration: Duration,
    storm: MakeCall<S>,
}

impl<S, SFut> Storm<'_, S>
where
    S: Fn(u64) -> SFut + 'static,
    SFut: Future<Output = Outcome> + Send + 'static,
{
    /// The storm's row and the call's row (its CPU counts the Logins' work too).
    async fn run<C, Fut>(&self, name: &str, call: MakeCall<C>) -> anyhow::Result<(Row, Row)>
    where
        C: Fn(u64) -> Fut + 'static,
        Fut: Future<Output = Outcome> + Send + 'static,
    {
        let storm_run = async {
            let load = procs::load_average();
            let stats = open_loop(
                "storm Logins",
                self.logins,
                self.duration + Duration::from_secs(1),
                self.how,
                Arc::clone(&self.storm),
            )
            .await?;
            anyhow::Ok(Row {
                name: "Login storm".into(),
                mode: format!("open {}/s", self.logins),
                load,
                stats,
                cpu: [None; 3],
            })
        };
        // The call starts once the storm has filled the bcrypt queue.
        let call_run = async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            self.meter
                .try_row(
                    name,
                    format!("open {}/s", self.rate),
                    open_loop(name, self.rate, self.duration, self.how, call),
                )
                .await
        };
        let (storm_row, call_row) = tokio::join!(storm_run, call_run);
        // Let the admitted Logins finish before what comes next.
        tokio::time::sleep(Duration::from_secs(2)).await;
        Ok((storm_row?, call_row?))
    }
}

/// Runs a scenario between two CPU marks and makes its row.
struct Meter {
    authd: Option<u32>,
    redis: Option<u32>,
}

impl Meter {
    async fn row<Fut>(&self, name: &str, mode: String, run: Fut) -> Row
    where
        Fut: Future<Output = Stats>,
    {
        let start = self.start();
        let stats = run.await;
        self.finish(start, name, mode, stats)
    }

    /// `row` of a scenario that can fail to start.
    async fn try_row<Fut>(&self, name: &str, mode: String, run: Fut) -> anyhow::Result<Row>
    where
        Fut: Future<Output = anyhow::Result<Stats>>,
    {
        let start = self.start();
        let stats = run.await?;
        Ok(self.finish(start, name, mode, stats))
    }

    fn start(&self) -> (String, CpuMark) {
        (procs::load_average(), CpuMark::now(self.authd, self.redis))
    }

    fn finish(
        &self,
        (load, before): (String, CpuMark),
        name: &str,
        mode: String,
        stats: Stats,
    ) -> Row {
        let after = CpuMark::now(self.authd, self.redis);
        let cpu = before.per_call(&after, stats.calls);
        let row = Row {
            name: name.to_owned(),
            mode,
            load,
            stats,
            cpu,
        };
        eprintln!("{}", report::row_line(&row));
        row
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    // The report names the command, not this machine's paths: `--authd <path>` (a
    // prebuilt binary) is left out, as it runs what `cargo run` would build.
    let mut shown = Vec::new();
    let mut given = std::env::args().skip(1);
    while let Some(arg) = given.next() {
        if arg == "--authd" {
            given.next();
        } else if !arg.starts_with("--authd=") {
            shown.push(arg);
        }
    }
    let command = std::iter::once("cargo run --release -p authd-bench --".to_owned())
        .chain(shown)
        .collect::<Vec<_>>()
        .join(" ");
    let command = command.trim_end_matches(" --").to_owned();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load_at_start = procs::load_average();
    let seconds = args.seconds();
    let dir = std::env::temp_dir().join(format!("authd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run_in(&args, &dir, cores, &command, load_at_start, seconds).await;
    // authd's log outlives the run, for the errors the table only counts.
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .map(|r| r.join("target"))
        });
    let kept = target.map(|t| t.join("authd-bench-last.log"));
    if let Some(kept) = kept
        && std::fs::copy(dir.join("authd.log"), &kept).is_ok()
    {
        eprintln!("authd's log of this run: {}", kept.display());
    }
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run_in(
    args: &Args,
    dir: &std::path::Path,
    cores: usize,
    command: &str,
    load_at_start: String,
    seconds: f64,
) -> anyhow::Result<()> {
    let server = start_server(args, dir).await?;
    let meter = Meter {
        authd: server.authd_pid,
        redis: server.redis_pid,
    };
    let closed_workers = args.connections.max(1) * args.in_flight.max(1);
    let closed_mode = format!("closed {}×{}", args.connections, args.in_flight);
    let channels = connect(&server.addr, args.connections).await?;
    let clients = Clients::new(&channels);
    let duration = Duration::from_secs_f64(seconds);
    let open_how = OpenLoop {
        addr: server.addr.clone(),
        lanes: args.lanes,
        connections: args.lane_connections,
    };

    // Users (bcrypt at the configured cost, so a few) and the two single tokens.
    let stamp = format!(
        "b{}{}",
        authd::clock::Clock::unix_seconds(&authd::clock::SystemClock) % 100_000_000,
        std::process::id() % 10_000
    );
    let users: Vec<String> = (0..8).map(|i| format!("{stamp}u{i}")).collect();
    eprintln!(
        "registering {} users at bcrypt cost {}…",
        users.len(),
        args.cost
    );
    // Two at a time, each retried: on a busy machine a cost-12 hash can outlast the
    // request timeout when many queue up.
    let registered = futures::stream::iter(users.iter().enumerate())
        .map(|(i, u)| {
            let mut c = clients.auth(i as u64);
            let u = u.clone();
            async move {
                let mut tries = 0;
                loop {
                    tries += 1;
                    let answer = c
                        .register(pb::RegisterRequest {
                            username: u.clone(),
                            password: PASSWORD.into(),
                        })
                        .await;
                    match answer {
                        Ok(_) => return Ok(()),
                        Err(s) if s.code() == tonic::Code::AlreadyExists && tries > 1 => {
                            return Ok(());
                        }
                        Err(s) if tries >= 3 => return Err(s),
                        Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
                    }
                }
            }
        })
        .buffer_unordered(2)
        .collect::<Vec<_>>()
        .await;
    for r in registered {
        r.context("Register")?;
    }
    let users = Arc::new(users);
    let mut c = clients.auth(0);
    let live = Arc::new(vec![login(&mut c, &users[0]).await?]);
    let revoked_token = login(&mut c, &users[1]).await?;
    c.logout(bearer(&revoked_token, pb::LogoutRequest {})?)
        .await
        .context("Logout")?;
    let revoked = Arc::new(vec![revoked_token]);

    let mut report = Report::new(command, cores, load_at_start);
    report.settings = server
        .env
        .iter()
        .filter(|(k, _)| k != "JWT_SECRET" && k != "DB_PASS")
        .map(|(k, v)| {
            if k.ends_with("_ADDR") && !v.is_empty() {
                format!("{k}=127.0.0.1:<free port>")
            } else {
                format!("{k}={v}")
            }
        })
        .collect();
    report.generator = format!(
        "{} runtime threads; closed loop {} connections × {} in flight; open loops on {} lane(s) × {} connection(s); {seconds} s per timed scenario",
        args.threads, args.connections, args.in_flight, args.lanes, args.lane_connections
    );

    let closed = Closed {
        meter: &meter,
        mode: closed_mode.clone(),
        workers: closed_workers,
        duration,
    };
    if args.runs("health") {
        let call = health_call(clients.clone());
        report.health = Some(closed.run("Health/Check (baseline)", "health", call).await);
    }
    if args.runs("live") {
        let call = validate_call(clients.clone(), Arc::clone(&live), None);
        report.live = Some(
            closed
                .run("ValidateToken, live session", "live", call)
                .await,
        );
    }
    if args.runs("revoked") {
        let call = validate_call(
            clients.clone(),
            Arc::clone(&revoked),
            Some(pb::InvalidReason::Revoked),
        );
        report.revoked = Some(
            closed
                .run("ValidateToken, revoked token", "revoked", call)
                .await,
        );
    }
    if args.runs("refresh") {
        // As many sessions as calls in flight, spread over the users (each well under
        // MAX_SESSIONS_PER_USER), made by Login at the configured bcrypt cost.
        eprintln!("logging in {closed_workers} sessions for the Refresh scenario…");
        let made = futures::stream::iter(0..closed_workers)
            .map(|i| {
                let mut c = clients.auth(i as u64);
                let user = users[i % users.len()].clone();
                async move { login_refresh(&mut c, &user).await }
            })
            .buffer_unordered(2)
            .collect::<Vec<_>>()
            .await;
        let chains = made.into_iter().collect::<anyhow::Result<Vec<String>>>()?;
        let call = refresh_call(clients.clone(), Arc::new(std::sync::Mutex::new(chains)));
        report.refresh = Some(
            closed
                .run("Refresh, one rotation per call", "refresh", call)
                .await,
        );
    }
    if args.runs("reference") {
        if server.env.is_empty() || args.redis_cluster.is_some() {
            eprintln!(
                "reference: skipped (it reads the keys of a session of an authd this program started)"
            );
        } else {
            for redis in [false, true] {
                let (process, addr) = start_reference(args, &server, &live[0], redis).await?;
                let meter = Meter {
                    authd: Some(process.pid()),
                    redis: server.redis_pid,
                };
                let channels = connect(&addr, args.connections).await?;
                let call = validate_call(Clients::new(&channels), Arc::clone(&live), None);
                let closed = Closed {
                    meter: &meter,
                    mode: closed_mode.clone(),
                    workers: closed_workers,
                    duration,
                };
                if !redis {
                    report.reference_messages = Some(
                        closed
                            .run("Reference server: the messages alone", "reference", call)
                            .await,
                    );
                    continue;
                }
                report.reference_redis = Some(
                    closed
                        .run("Reference server: one Redis round trip", "reference", call)
                        .await,
                );
                let open_how = OpenLoop {
                    addr,
                    ..open_how.clone()
                };
                report.reference_open = Some(
                    meter
                        .try_row(
                            "Reference server: one Redis round trip, open loop",
                            format!("open {}/s", args.rate),
                            open_loop(
                                "reference open",
                                args.rate,
                                duration,
                                &open_how,
                                validate_maker(Arc::clone(&live), None),
                            ),
                        )
                        .await?,
                );
            }
        }
    }
    if args.runs("login") {
        // One verify here, with authd idle: the machine's limit is cores ÷ this.
        let cost = args.cost;
        let verify = tokio::task::spawn_blocking(move || -> anyhow::Result<f64> {
            let hash = bcrypt::hash(PASSWORD, cost)?;
            let mut times = Vec::new();
            for _ in 0..3 {
                let t = Instant::now();
                bcrypt::verify(PASSWORD, &hash)?;
                times.push(t.elapsed().as_secs_f64());
            }
            times.sort_by(f64::total_cmp);
            Ok(times[1])
        })
        .await??;
        report.verify_seconds = Some(verify);
        // authd's default BCRYPT_MAX_PER_ADDRESS: (workers + 4 × workers) / 4.
        let in_flight = args.login_in_flight.unwrap_or((5 * cores / 4).max(1));
        let call = login_call(clients.clone(), Arc::clone(&users));
        let login_seconds = (seconds * 1.5).max(3.0);
        report.login = Some(
            meter
                .row(
                    &format!("Login, bcrypt cost {cost}"),
                    format!("closed {in_flight} in flight"),
                    closed_loop(
                        "login",
                        in_flight,
                        Stop::After(Duration::from_secs_f64(login_seconds)),
                        call,
                    ),
                )
                .await,
        );
    }
    if args.runs("storm") {
        let storm: MakeCall<_> = {
            let users = Arc::clone(&users);
            Arc::new(move |channels: Vec<Channel>| {
                login_call(Clients::new(&channels), Arc::clone(&users))
            })
        };
        let storm = Storm {
            meter: &meter,
            how: &open_how,
            logins: args.storm_logins,
            rate: args.storm_rate,
            duration,
            storm,
        };
        // The floor first: a call that does no auth work, at the same rate, during the
        // same kind of storm. What it loses is the machine's, not ValidateToken's.
        let health: MakeCall<_> =
            Arc::new(|channels: Vec<Channel>| health_call(Clients::new(&channels)));
        let (_, health_row) = storm
            .run("Health/Check during the Login storm (floor)", health)
            .await?;
        report.storm_health = Some(health_row);
        let validate = validate_maker(Arc::clone(&live), None);
        let (storm_row, validate_row) = storm
            .run("ValidateToken during the Login storm", validate)
            .await?;
        eprintln!("{}", report::row_line(&storm_row));
        report.storm_logins = Some(storm_row);
        report.storm_validate = Some(validate_row);
    }
    if args.runs("open") {
        // The floor: a call that does no auth work, in the same loop at the same rate.
        let health: MakeCall<_> =
            Arc::new(|channels: Vec<Channel>| health_call(Clients::new(&channels)));
        report.health_open = Some(
            meter
                .try_row(
                    "Health/Check, open loop (floor)",
                    format!("open {}/s", args.rate),
                    open_loop("open health", args.rate, duration, &open_how, health),
                )
                .await?,
        );
        let call = validate_call(clients.clone(), Arc::clone(&live), None);
        closed_loop("warm-up", closed_workers, WARM_UP, call).await;
        report.open = Some(
            meter
                .try_row(
                    "ValidateToken, open loop",
                    format!("open {}/s", args.rate),
                    open_loop(
                        "open",
                        args.rate,
                        duration,
                        &open_how,
                        validate_maker(Arc::clone(&live), None),
                    ),
                )
                .await?,
        );
    }
    if args.only.iter().any(|s| s == "failover") {
        failover(&server, &clients, &users, args.rate, duration, &open_how).await?;
    }
    if args.runs("memory") {
        let n = args.sessions();
        let t = Instant::now();
        let (tokens, how) = if server.env.is_empty() {
            (
                prepare_by_login(&clients, &users, n).await?,
                "through Login (an authd we did not start)",
            )
        } else {
            (
                prepare_in_redis(&server.env, n).await?,
                "written to Redis through authd's library (TokenKeys::issue + SessionStore::create, same secret and prefix)",
            )
        };
        report.sessions_note = Some(format!(
            "{n} sessions prepared in {:.1} s, {how}",
            t.elapsed().as_secs_f64()
        ));
        let tokens = Arc::new(tokens);
        report.rss_before_kib = server.authd_pid.and_then(procs::rss_kib);
        let validations = args.validations();
        let call = validate_call(clients.clone(), tokens, None);
        report.memory = Some(
            meter
                .row(
                    &format!("ValidateToken over {n} sessions"),
                    closed_mode.clone(),
                    closed_loop("memory", closed_workers, Stop::Calls(validations), call),
                )
                .await,
        );
        report.rss_after_kib = server.authd_pid.and_then(procs::rss_kib);
        report.validations = validations;
        report.sessions = n;
    }
    issue21(
        args,
        &server,
        &meter,
        &closed,
        &clients,
        &live,
        &stamp,
        &mut report,
    )
    .await?;
    report.load_at_end = procs::load_average();
    if let Some(log) = &server.log {
        report.log_bytes = std::fs::metadata(log).map(|m| m.len()).ok();
    }
    let mut checks: Vec<Check> = report.checks(cores);
    checks.extend(report.checks_issue21());
    let text = report.render(&checks);
    println!("\n{text}");
    if args.only.is_empty() && !args.no_write {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("bench/ has no parent")?
            .join("BENCHMARKS.md");
        report::write_section(&path, &text)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// Issue #21's scenarios: h2load, a second instance with SESSION_CACHE=on, the
/// revocation window between two instances, capacity (last: it fills Redis).
#[allow(clippy::too_many_arguments)]
async fn issue21(
    args: &Args,
    server: &Server,
    meter: &Meter,
    closed: &Closed<'_>,
    clients: &Clients,
    live: &Arc<Vec<String>>,
    stamp: &str,
    report: &mut Report,
) -> anyhow::Result<()> {
    let h2load_named = args.only.iter().any(|s| s == "h2load");
    if h2load_named || (args.only.is_empty() && h2load_found(&args.h2load)) {
        let shape = h2load::Shape {
            program: args.h2load.clone(),
            connections: args.h2load_connections,
            streams: args.h2load_streams,
            seconds: args.seconds(),
            warm_up: 1.0,
        };
        report.h2load = Some(run_h2load(&shape, &server.addr, meter, &live[0], &server.dir).await?);
    } else if args.only.is_empty() {
        eprintln!(
            "h2load: {} not found, skipped (Debian: apt-get install nghttp2-client)",
            args.h2load
        );
    }
    let mut cache_instance = None;
    if args.runs("cache") || args.runs("window") || args.runs("pairs") {
        if server.binary.is_some() {
            cache_instance = Some(server.another("cache", &[("SESSION_CACHE", "on")]).await?);
        } else {
            eprintln!(
                "cache, window: skipped (they start more authd processes: not with --target)"
            );
        }
    }
    if let Some(b) = cache_instance.as_ref().filter(|_| args.runs("cache")) {
        let meter = Meter {
            authd: Some(b.pid),
            redis: server.redis_pid,
        };
        let channels = connect(&b.addr, args.connections).await?;
        let on_b = Closed {
            meter: &meter,
            mode: closed.mode.clone(),
            workers: closed.workers,
            duration: closed.duration,
        };
        report.cache_health = Some(
            on_b.run(
                "Health/Check (cache instance)",
                "cache health",
                health_call(Clients::new(&channels)),
            )
            .await,
        );
        report.cache_live = Some(
            on_b.run(
                "ValidateToken, SESSION_CACHE=on",
                "cache live",
                validate_call(Clients::new(&channels), Arc::clone(live), None),
            )
            .await,
        );
    }
    if args.runs("pairs") {
        report.pairs = run_pairs(args, server, cache_instance.as_ref(), clients, live).await?;
    }
    if let Some(b) = cache_instance.as_ref().filter(|_| args.runs("window")) {
        let preparer = Preparer::new(&server.env)?;
        let a = endpoint(&server.addr)?.connect().await?;
        report.windows.push(
            window::measure(
                "SESSION_CACHE=on",
                true,
                &preparer,
                &format!("{stamp}w"),
                a.clone(),
                endpoint(&b.addr)?.connect().await?,
                args.window_trials,
            )
            .await?,
        );
        if !args.no_window_control {
            let strict = server
                .another("strict", &[("SESSION_CACHE", "off")])
                .await?;
            report.windows.push(
                window::measure(
                    "strict (control)",
                    false,
                    &preparer,
                    &format!("{stamp}s"),
                    a,
                    endpoint(&strict.addr)?.connect().await?,
                    args.window_trials,
                )
                .await?,
            );
        }
    }
    drop(cache_instance);
    if args.runs("capacity") {
        if server.env.is_empty() {
            eprintln!(
                "capacity: skipped (it writes sessions through the settings of an authd this program started)"
            );
        } else {
            capacity(args, server, closed, clients, stamp, report).await?;
        }
    }
    Ok(())
}

/// Whether `program --version` runs.
fn h2load_found(program: &str) -> bool {
    std::process::Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// h2load against authd: Health/Check, then ValidateToken of the live session, in the
/// same shape, each with authd's and redis's CPU meanwhile.
async fn run_h2load(
    shape: &h2load::Shape,
    addr: &str,
    meter: &Meter,
    token: &str,
    dir: &Path,
) -> anyhow::Result<report::H2load> {
    let health_body = h2load::grpc_body(&HealthCheckRequest::default())?;
    let live_body = h2load::grpc_body(&pb::ValidateTokenRequest {
        token: token.to_owned(),
        ..Default::default()
    })?;
    // h2load reads neither the gRPC status nor the reply: what it sends must decode back
    // to the messages, and authd must answer them (health SERVING, the token valid).
    let validate: pb::ValidateTokenRequest = h2load::decode_body(&live_body)?;
    if validate.token != token {
        bail!("h2load: the ValidateToken body does not hold the live token");
    }
    let check: HealthCheckRequest = h2load::decode_body(&health_body)?;
    let channel = endpoint(addr)?.connect().await?;
    let answer = AuthServiceClient::new(channel.clone())
        .validate_token(validate.clone())
        .await
        .context("h2load: ValidateToken of its body")?
        .into_inner();
    if !answer.valid {
        bail!("h2load: authd does not find the live token valid: {answer:?}");
    }
    let status = HealthClient::new(channel.clone())
        .check(check)
        .await
        .context("h2load: Health/Check of its body")?
        .into_inner()
        .status;
    if status != tonic_health::pb::health_check_response::ServingStatus::Serving as i32 {
        bail!("h2load: authd's health is {status}, not SERVING");
    }
    let health_file = dir.join("health-check.grpc");
    let live_file = dir.join("validate-token.grpc");
    std::fs::write(&health_file, &health_body)?;
    std::fs::write(&live_file, &live_body)?;
    let mut runs = Vec::new();
    for (path, file) in [
        ("/grpc.health.v1.Health/Check", health_file),
        ("/auth.v1.AuthService/ValidateToken", live_file),
    ] {
        eprintln!("h2load {path}: {}…", shape.describe());
        let before = CpuMark::now(meter.authd, meter.redis);
        let (s, a) = (shape.clone(), addr.to_owned());
        let outcome =
            tokio::task::spawn_blocking(move || h2load::run(&s, &a, path, &file)).await??;
        let after = CpuMark::now(meter.authd, meter.redis);
        let calls = (outcome.req_per_s * (shape.seconds + shape.warm_up)) as u64;
        let cpu = before.per_call(&after, calls);
        eprintln!(
            "  {:.0} req/s, {} succeeded, {} failed, {} errored, {} 2xx, {} other statuses",
            outcome.req_per_s,
            outcome.succeeded,
            outcome.failed,
            outcome.errored,
            outcome.status_2xx,
            outcome.status_other
        );
        runs.push(report::H2loadRun { outcome, cpu });
    }
    // Still valid after the run: the ValidateTokens were answered valid, not refused.
    let after = AuthServiceClient::new(channel)
        .validate_token(validate)
        .await
        .context("h2load: ValidateToken after the run")?
        .into_inner();
    if !after.valid {
        bail!("h2load: the live token is no longer valid after the run: {after:?}");
    }
    let mut runs = runs.into_iter();
    let (Some(health), Some(live)) = (runs.next(), runs.next()) else {
        bail!("h2load: a run is missing");
    };
    let report = report::H2load {
        shape: shape.describe(),
        health,
        live,
    };
    eprintln!(
        "h2load: Health {:.0}/s, ValidateToken {:.0}/s, ratio {:.2}",
        report.health.outcome.req_per_s,
        report.live.outcome.req_per_s,
        report.ratio()
    );
    Ok(report)
}

/// The Redis servers holding the sessions, for `INFO memory`: the one server, or the
/// primaries of a cluster of our own.
fn redis_nodes(server: &Server) -> Vec<String> {
    if let Some((_, addr)) = server.env.iter().find(|(k, _)| k == "REDIS_ADDR") {
        return vec![addr.clone()];
    }
    server
        .cluster_ports
        .iter()
        .filter(|(port, _)| procs::is_primary(*port))
        .map(|(port, _)| format!("127.0.0.1:{port}"))
        .collect()
}

/// The sum of `used_memory` over `nodes` (`None` when one cannot be read).
async fn used_memory(nodes: &[String]) -> Option<i64> {
    if nodes.is_empty() {
        return None;
    }
    let mut total = 0;
    for node in nodes {
        let client = redis::Client::open(format!("redis://{node}")).ok()?;
        let mut c = client.get_multiplexed_async_connection().await.ok()?;
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut c)
            .await
            .ok()?;
        total += info
            .lines()
            .find_map(|l| l.strip_prefix("used_memory:"))?
            .trim()
            .parse::<i64>()
            .ok()?;
    }
    Some(total)
}

/// Capacity: live sessions added up to each size of `--capacity`; at each, Redis memory
/// per session, a closed loop of ValidateToken over all of them, authd's RSS after.
async fn capacity(
    args: &Args,
    server: &Server,
    closed: &Closed<'_>,
    clients: &Clients,
    stamp: &str,
    report: &mut Report,
) -> anyhow::Result<()> {
    let preparer = Preparer::new(&server.env)?;
    let nodes = redis_nodes(server);
    let before = used_memory(&nodes).await;
    let prefix = format!("{stamp}k");
    let mut tokens = Vec::new();
    for n in args.capacity() {
        let from = tokens.len();
        eprintln!("capacity: writing sessions {from}..{n}…");
        let t = Instant::now();
        preparer.extend(&mut tokens, &prefix, from, n).await?;
        let prepare_seconds = t.elapsed().as_secs_f64();
        let after = used_memory(&nodes).await;
        let used_memory_delta = before.zip(after).map(|(b, a)| a - b);
        eprintln!(
            "capacity: {n} sessions ({} written in {prepare_seconds:.1} s), Redis used_memory +{}",
            n - from,
            used_memory_delta.map_or("?".into(), |d| d.to_string())
        );
        let shared = Arc::new(std::mem::take(&mut tokens));
        let call = validate_call(clients.clone(), Arc::clone(&shared), None);
        let row = closed
            .run(
                &format!("ValidateToken over {n} live sessions"),
                "capacity",
                call,
            )
            .await;
        let rss_kib = server.authd_pid.and_then(procs::rss_kib);
        tokens = Arc::try_unwrap(shared)
            .map_err(|_| anyhow::anyhow!("capacity: the tokens are still shared"))?;
        report.capacity.push(report::Capacity {
            sessions: n,
            prepare_seconds,
            used_memory_delta,
            row,
            rss_kib,
        });
    }
    report.capacity_note = Some(format!(
        "Capacity: sessions written through authd's library ({} in flight on 4 Redis connections), each of a user of its own, so each also brings its user's session set and sequence keys (the most Redis memory per session); the sizes add up (the sessions of a smaller size stay for the larger). The closed loop ({} s per size) takes the tokens in turn over all the sessions, so at the larger sizes few calls find a session validated in the last minute. Calls/s per core = 1,000,000 ÷ CPU µs per call.",
        Preparer::IN_FLIGHT,
        args.seconds()
    ));
    Ok(())
}

/// The paired rounds: strict ValidateToken against Health and against the reference
/// server, the reference's messages alone against Health (the ceiling), and on the
/// caching instance ValidateToken against its Health.
async fn run_pairs(
    args: &Args,
    server: &Server,
    cache_instance: Option<&Instance>,
    clients: &Clients,
    live: &Arc<Vec<String>>,
) -> anyhow::Result<Vec<pairs::Pair>> {
    let workers = args.connections.max(1) * args.in_flight.max(1);
    let (rounds, seconds) = (args.pair_rounds.max(1), args.pair_seconds.max(0.5));
    let mut found = Vec::new();
    found.push(
        pairs::measure(
            pairs::STRICT_VS_HEALTH,
            rounds,
            seconds,
            workers,
            health_call(clients.clone()),
            validate_call(clients.clone(), Arc::clone(live), None),
        )
        .await,
    );
    if server.env.is_empty() || args.redis_cluster.is_some() {
        eprintln!(
            "pairs: the reference server skipped (it reads the keys of a session of an authd this program started)"
        );
    } else {
        for redis in [true, false] {
            let (process, addr) = start_reference(args, server, &live[0], redis).await?;
            let reference = Clients::new(&connect(&addr, args.connections).await?);
            let reference = validate_call(reference, Arc::clone(live), None);
            found.push(if redis {
                pairs::measure(
                    pairs::STRICT_VS_REFERENCE,
                    rounds,
                    seconds,
                    workers,
                    reference,
                    validate_call(clients.clone(), Arc::clone(live), None),
                )
                .await
            } else {
                pairs::measure(
                    pairs::MESSAGES_VS_HEALTH,
                    rounds,
                    seconds,
                    workers,
                    health_call(clients.clone()),
                    reference,
                )
                .await
            });
            drop(process);
        }
    }
    if let Some(b) = cache_instance {
        let on_b = Clients::new(&connect(&b.addr, args.connections).await?);
        found.push(
            pairs::measure(
                pairs::CACHE_VS_HEALTH,
                rounds,
                seconds,
                workers,
                health_call(on_b.clone()),
                validate_call(on_b, Arc::clone(live), None),
            )
            .await,
        );
    }
    for p in &found {
        eprintln!("{}: {}", p.name, p.summary());
    }
    Ok(found)
}

/// Starts the reference server (reference.rs) for `token`'s session on `server`: after
/// its one Redis round trip, or (`redis` false) the messages alone. Its process and address.
async fn start_reference(
    args: &Args,
    server: &Server,
    token: &str,
    redis: bool,
) -> anyhow::Result<(Owned, String)> {
    let mut settings = reference_settings(&server.env, token)?;
    if !redis {
        settings.redis_url = None;
    }
    let extra = extra_env(&args.extra_env)?;
    tokio::task::spawn_blocking(move || procs::start_reference(&settings.to_args(), &extra)).await?
}

/// The reference server's keys and reply for `token`, from authd's own settings: the
/// keys authd's session check reads, the reply authd gives.
fn reference_settings(
    env: &[(String, String)],
    token: &str,
) -> anyhow::Result<reference::Settings> {
    let var = |name: &str| {
        env.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .with_context(|| format!("{name} is not among authd's settings"))
    };
    let config = authd::Config::from_vars(env.iter().cloned())?;
    let keys = std::sync::Arc::clone(&config.keys);
    let now = authd::clock::Clock::unix_seconds(&authd::clock::SystemClock);
    let claims = keys
        .verify(token, now)
        .map_err(|r| anyhow::anyhow!("the live token does not verify: {}", r.as_str()))?;
    let tag = format!("{}{{user:{}}}", var("REDIS_KEY_PREFIX")?, claims.sub);
    let time = |seconds| Some(prost_types::Timestamp { seconds, nanos: 0 });
    let auth_time = claims.login_time();
    Ok(reference::Settings {
        redis_url: Some(format!("redis://{}", var("REDIS_ADDR")?)),
        revoked_key: format!("{tag}:revoked:{}", claims.jti),
        session_key: format!("{tag}:session:{}", claims.sid),
        jti: claims.jti,
        reply: pb::ValidateTokenResponse {
            valid: true,
            reason: pb::InvalidReason::Unspecified.into(),
            user_id: claims.sub,
            username: claims.username,
            session_id: claims.sid,
            issued_at: time(claims.iat),
            expires_at: time(claims.exp),
            revocation_checked: true,
            auth_time: time(auth_time),
            amr: claims.amr,
            roles: Vec::new(),
        },
    })
}

/// Sessions written straight to authd's Redis with authd's own code (TokenKeys::issue +
/// SessionStore::create, same secret and prefix): what a Login stores, without a bcrypt
/// verify each.
struct Preparer {
    store: authd::store::SessionStore,
    keys: Arc<authd::auth::token::TokenKeys>,
    idle: i64,
    /// How long authd keeps a user's roles mirrored beside the sessions.
    token_lifetime: i64,
}

impl Preparer {
    /// Calls in flight while preparing many sessions: enough to fill the pipelines of
    /// the connections below.
    const IN_FLIGHT: usize = 512;

    fn new(env: &[(String, String)]) -> anyhow::Result<Self> {
        // A few multiplexed connections of our own, whatever authd's pool size.
        let vars = env
            .iter()
            .filter(|(k, _)| k != "REDIS_POOL_SIZE")
            .cloned()
            .chain(std::iter::once(("REDIS_POOL_SIZE".into(), "4".into())));
        let config = authd::Config::from_vars(vars)?;
        let leeway = i64::try_from(config.jwt.leeway.as_secs())?;
        let store = authd::store::SessionStore::new(
            &config.sessions,
            leeway,
            config.revocation_log_max_len,
            config.jwt.ttl,
        )?;
        Ok(Self {
            store,
            keys: Arc::clone(&config.keys),
            idle: i64::try_from(config.session_idle_timeout.as_secs())?,
            token_lifetime: i64::try_from(config.jwt.ttl.as_secs())?,
        })
    }

    /// One live session of `user_id` (a user of its own: no session limit applies); its
    /// access token.
    async fn session(&self, user_id: &str) -> anyhow::Result<String> {
        let now = authd::clock::Clock::unix_seconds(&authd::clock::SystemClock);
        let session_id = authd::auth::token::random_id();
        let issued = self.keys.issue(user_id, user_id, &session_id, now)?;
        self.store
            .create(
                &authd::store::sessions::NewSession {
                    user_id,
                    session_id: &session_id,
                    jti: &issued.claims.jti,
                    now,
                    idle_expires_at: now + self.idle,
                    token_expires_at: issued.claims.exp,
                    absolute_end: issued.claims.exp,
                    ip: "127.0.0.1",
                    user_agent: "authd-bench",
                    username: user_id,
                    amr: "pwd",
                    // Sessions for ValidateToken only: no refresh token.
                    refresh_key: "",
                    refresh_hash: "",
                },
                0,
            )
            .await?;
        // The user's roles (none) beside the session, as Login leaves them: without
        // them ValidateToken reads the users table, where these users are not.
        self.store
            .mirror_roles(user_id, "", false, self.token_lifetime)
            .await?;
        Ok(issued.token)
    }

    /// Sessions `from..to` of users `{prefix}{i}`, appended to `tokens` (in no
    /// particular order).
    async fn extend(
        &self,
        tokens: &mut Vec<String>,
        prefix: &str,
        from: usize,
        to: usize,
    ) -> anyhow::Result<()> {
        use futures::TryStreamExt;
        tokens.reserve(to.saturating_sub(from));
        let mut made = futures::stream::iter(from..to)
            .map(|i| async move { self.session(&format!("{prefix}{i}")).await })
            .buffer_unordered(Self::IN_FLIGHT);
        while let Some(token) = made.try_next().await? {
            tokens.push(token);
        }
        Ok(())
    }
}

/// `n` sessions through authd's library (see `Preparer`).
async fn prepare_in_redis(env: &[(String, String)], n: usize) -> anyhow::Result<Vec<String>> {
    let mut tokens = Vec::new();
    Preparer::new(env)?
        .extend(&mut tokens, "bench-user-", 0, n)
        .await?;
    Ok(tokens)
}

/// `n` sessions through Login (slow at a production cost: for an authd we did not start).
async fn prepare_by_login(
    clients: &Clients,
    users: &Arc<Vec<String>>,
    n: usize,
) -> anyhow::Result<Vec<String>> {
    let made = futures::stream::iter(0..n)
        .map(|i| {
            let mut c = clients.auth(i as u64);
            let user = users[i % users.len()].clone();
            async move { login(&mut c, &user).await }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    made.into_iter().collect()
}

/// The failover gap an open-loop client sees: ValidateToken on a token of each user (so
/// on every primary's slots) at `rate`, a primary killed a third of the way; printed,
/// not written to BENCHMARKS.md.
async fn failover(
    server: &Server,
    clients: &Clients,
    users: &Arc<Vec<String>>,
    rate: f64,
    duration: Duration,
    how: &OpenLoop,
) -> anyhow::Result<()> {
    let Some(&(port, pid)) = server
        .cluster_ports
        .iter()
        .find(|(port, _)| procs::is_primary(*port))
    else {
        bail!("failover: needs --redis-cluster with no value (a cluster of our own)");
    };
    let mut c = clients.auth(0);
    let mut tokens = Vec::new();
    for u in users.iter() {
        tokens.push(login(&mut c, u).await?);
    }
    let tokens = Arc::new(tokens);
    let started = Instant::now();
    // When each call that was not a checked answer was due to start, and what it was.
    let misses: Arc<std::sync::Mutex<Vec<(Duration, String)>>> = Arc::default();
    let make: MakeCall<_> = {
        let (tokens, misses) = (Arc::clone(&tokens), Arc::clone(&misses));
        Arc::new(move |channels: Vec<Channel>| {
            let clients = Clients::new(&channels);
            let (tokens, misses) = (Arc::clone(&tokens), Arc::clone(&misses));
            move |i: u64| {
                let mut client = clients.auth(i);
                let token = tokens[(i % tokens.len() as u64) as usize].clone();
                let misses = Arc::clone(&misses);
                let at = started.elapsed();
                Box::pin(async move {
                    let outcome = match client
                        .validate_token(pb::ValidateTokenRequest {
                            token,
                            ..Default::default()
                        })
                        .await
                    {
                        Ok(r) if r.get_ref().valid && r.get_ref().revocation_checked => Ok(()),
                        Ok(r) if r.get_ref().valid => Err("UNCHECKED".to_owned()),
                        Ok(_) => Err("INVALID".to_owned()),
                        Err(s) => Err(code_label(&s)),
                    };
                    if let Err(label) = &outcome
                        && let Ok(mut m) = misses.lock()
                    {
                        m.push((at, label.clone()));
                    }
                    outcome
                }) as std::pin::Pin<Box<dyn Future<Output = Outcome> + Send>>
            }
        })
    };
    let kill_after = duration / 3;
    let killer = async {
        tokio::time::sleep(kill_after).await;
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
        eprintln!("failover: killed the primary on port {port} at {kill_after:?}");
    };
    let load = procs::load_average();
    let (stats, ()) = tokio::join!(
        open_loop("failover ValidateToken", rate, duration, how, make),
        killer
    );
    let stats = stats?;
    let misses = misses.lock().map(|m| m.clone()).unwrap_or_default();
    let gap = match (
        misses.iter().map(|m| m.0).min(),
        misses.iter().map(|m| m.0).max(),
    ) {
        (Some(first), Some(last)) => last.saturating_sub(first),
        _ => Duration::ZERO,
    };
    let first = misses.iter().map(|m| m.0).min().unwrap_or_default();
    println!(
        "failover: open loop {rate}/s for {duration:?} over {} tokens, load {load}: {} calls, \
         {} not a checked answer ({}), from {first:?} (kill at {kill_after:?}) over {gap:?}; \
         p50 {:.0} µs, p99 {:.0} µs, p99.9 {:.0} µs, max {:.0} µs",
        tokens.len(),
        stats.calls,
        misses.len(),
        stats.error_text(),
        stats.micros(0.5),
        stats.micros(0.99),
        stats.micros(0.999),
        stats.max_micros(),
    );
    Ok(())
}

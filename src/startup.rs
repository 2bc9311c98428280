//! Builds the stores, the core and the tonic router, binds the gRPC and HTTP listeners
//! (port 0 works, for tests) and serves until told to stop.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::auth::AuthCore;
use crate::auth::hasher::PasswordHasher;
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, GrpcLimits, NameHashKeySource, SessionsBackend, UsersBackend};
use crate::grpc::AuthGrpc;
use crate::grpc::admin::AdminGrpc;
use crate::grpc::ext_authz::ExtAuthz;
use crate::grpc::layer::RpcLayer;
use crate::http::HttpState;
use crate::proto::auth::v1::admin_service_server::AdminServiceServer;
use crate::proto::auth::v1::auth_service_server::AuthServiceServer;
use crate::store::{PoolStats, SessionStore, UserStore};
use crate::transport::{Admission, TlsReloader};
use envoy_types::ext_authz::v3::pb::AuthorizationServer;

/// The name health checks use for the admin service.
pub use crate::proto::auth::v1::admin_service_server::SERVICE_NAME as ADMIN_SERVICE_NAME;
/// The name health checks use for the auth service (the generated one).
pub use crate::proto::auth::v1::auth_service_server::SERVICE_NAME as AUTH_SERVICE_NAME;
/// How long the HTTP listener gets to finish its requests after the gRPC server stopped.
const HTTP_GRACE: Duration = Duration::from_secs(1);

/// A built, bound, not yet serving authd.
pub struct Application {
    listener: TcpListener,
    addr: SocketAddr,
    http: Option<(TcpListener, SocketAddr)>,
    tls: Option<Arc<TlsReloader>>,
    core: Arc<AuthCore>,
    users: UserStore,
    metrics: PrometheusHandle,
    health: HealthReporter,
    reflection: bool,
    limits: GrpcLimits,
    /// The gRPC listener's connections.
    grpc_admission: Admission,
    /// The HTTP listener's connections.
    http_admission: Admission,
    traces: bool,
    grace: Duration,
    watch_heartbeat: Duration,
    strip_authorization: bool,
    public_url: Option<String>,
    admin_client_sans: Vec<String>,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("addr", &self.addr)
            .field("http_addr", &self.http_addr())
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Application {
    /// Connects the stores (applying migrations), reads the TLS files, and binds
    /// `config.grpc_addr` and `config.http_addr`.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        Self::build_with_clock(config, Arc::new(SystemClock)).await
    }

    /// As [`Application::build`], with the clock every expiry is judged by.
    pub async fn build_with_clock(config: Config, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        let metrics = crate::telemetry::meters::prometheus();
        let tls = config
            .tls
            .as_ref()
            .map(TlsReloader::load)
            .transpose()?
            .map(Arc::new);
        let users = UserStore::connect(&config.users)
            .await
            .with_context(|| format!("cannot use the {}", config.users.describe()))?;
        let leeway = i64::try_from(config.jwt.leeway.as_secs()).unwrap_or(i64::MAX / 4);
        let sessions = SessionStore::new(
            &config.sessions,
            leeway,
            config.revocation_log_max_len,
            config.jwt.ttl,
        )?;
        if let Err(e) = sessions.ping().await {
            tracing::warn!(error = %e, "Redis is not reachable at start-up; serving without it until it is (REDIS_FAILURE_MODE decides ValidateToken)");
        }
        tracing::info!(
            users = %config.users.describe(),
            sessions = config.sessions.describe(),
            "storage backends"
        );
        if matches!(config.sessions, SessionsBackend::Memory) {
            tracing::warn!(
                "sessions are kept in this process: run a single instance, and expect every session to end on restart (set REDIS_URL or REDIS_ADDR to share them)"
            );
        }
        if config.jwt.generated_secret {
            tracing::warn!(
                "JWT_SECRET is not set: signing with a random key made for this process; tokens will not survive a restart"
            );
        }
        if config.name_hash_key.source() == NameHashKeySource::Generated {
            tracing::warn!(
                "NAME_HASH_KEY is not set: usernames are hashed (throttle keys, audit rows) with a random key made for this process; audit rows from before a restart will not match later ones"
            );
        }
        let hasher =
            PasswordHasher::start(&config.bcrypt).context("cannot start bcrypt threads")?;
        let core = AuthCore::new(&config, users.clone(), sessions, hasher, clock)
            .await
            .context("cannot prepare the password hasher")?;

        let listener = crate::transport::listen(config.grpc_addr)
            .with_context(|| format!("cannot listen on GRPC_ADDR {}", config.grpc_addr))?;
        let addr = listener.local_addr()?;
        let http = match config.http_addr {
            Some(http_addr) => {
                let listener = crate::transport::listen(http_addr)
                    .with_context(|| format!("cannot listen on HTTP_ADDR {http_addr}"))?;
                let bound = listener.local_addr()?;
                Some((listener, bound))
            }
            None => None,
        };
        let (grpc_admission, http_admission) = admissions(&config);
        let (health, _) = tonic_health::server::health_reporter();
        Ok(Self {
            listener,
            addr,
            http,
            tls,
            core: Arc::new(core),
            users,
            metrics,
            health,
            reflection: config.grpc_reflection,
            limits: config.limits,
            grpc_admission,
            http_admission,
            traces: config.otlp.is_some(),
            grace: config.shutdown_grace,
            watch_heartbeat: config.watch_heartbeat,
            strip_authorization: config.ext_authz_strip_authorization,
            public_url: config.public_url,
            admin_client_sans: config.admin_client_sans,
        })
    }

    /// The gRPC address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The gRPC port actually bound.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The HTTP (`/metrics`, `/healthz`) address actually bound, unless `HTTP_ADDR` is
    /// empty.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().map(|(_, addr)| *addr)
    }

    /// Serves until `shutdown` resolves; then reports NOT_SERVING, stops accepting, and
    /// lets in-flight calls finish within the grace period.
    pub async fn run_until<F>(self, shutdown: F) -> anyhow::Result<()>
    where
        F: Future<Output = ()> + Send,
    {
        let Self {
            listener,
            addr,
            http,
            tls,
            core,
            users,
            metrics,
            health,
            reflection,
            limits,
            grpc_admission,
            http_admission,
            traces,
            grace,
            watch_heartbeat,
            strip_authorization,
            public_url,
            admin_client_sans,
        } = self;
        let max_message = limits.max_message_bytes;
        let health_service = tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(health.clone()),
        )
        .max_decoding_message_size(max_message);
        health.set_service_status("", ServingStatus::Serving).await;
        health
            .set_service_status(AUTH_SERVICE_NAME, ServingStatus::Serving)
            .await;
        health
            .set_service_status(ADMIN_SERVICE_NAME, ServingStatus::Serving)
            .await;
        let (serving_tx, serving) = watch::channel(true);

        let (reflection_v1, reflection_v1alpha) = if reflection {
            let (v1, v1alpha) = reflection_services()?;
            (
                Some(v1.max_decoding_message_size(max_message)),
                Some(v1alpha.max_decoding_message_size(max_message)),
            )
        } else {
            (None, None)
        };

        // Background work that ends with the server: the HTTP listener and the TLS file
        // watcher. (Histogram upkeep runs beside the metrics recorder, once a process:
        // `telemetry::meters`.)
        let (background_stop, background_stopped) = watch::channel(false);
        let http_task = http.map(|(listener, http_addr)| {
            let keys = Arc::clone(&core);
            let state = HttpState {
                metrics: metrics.clone(),
                gauges: pool_gauges(users, Arc::clone(&core)),
                serving: serving.clone(),
                jwks: Arc::new(move || keys.jwks()),
                issuer: core.issuer().to_owned(),
                algorithm: core.signing_algorithm().to_owned(),
                public_url: public_url.clone(),
                trusted_proxies: core.trusted_proxies().clone(),
            };
            spawn_http(
                listener,
                http_addr,
                state,
                http_admission,
                background_stopped.clone(),
            )
        });
        if let Some(tls) = &tls {
            tokio::spawn(Arc::clone(tls).watch(background_stopped.clone()));
        }

        let keepalive = (!limits.keepalive_interval.is_zero()).then_some(limits.keepalive_interval);
        let incoming = crate::transport::incoming(
            listener,
            tls.clone(),
            grpc_admission,
            limits.connection_concurrency,
        );
        let core_for_ext_authz = Arc::clone(&core);
        let admin = AdminGrpc::new(Arc::clone(&core), admin_client_sans);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
        let server = Server::builder()
            .http2_keepalive_interval(keepalive)
            .http2_keepalive_timeout(Some(limits.keepalive_timeout))
            .http2_max_header_list_size(limits.max_header_list_bytes)
            // The protocol's own bound, above the limit that sheds, so that callers over
            // the limit hear RESOURCE_EXHAUSTED instead of queueing unseen.
            .max_concurrent_streams(
                u32::try_from(limits.connection_concurrency.saturating_mul(2)).unwrap_or(u32::MAX),
            )
            .layer(RpcLayer::new(
                limits.concurrency,
                limits.request_timeout,
                traces,
            ))
            .add_service(health_service)
            .add_service(
                AuthServiceServer::new(AuthGrpc::new(core, watch_heartbeat, stopping))
                    .max_decoding_message_size(max_message)
                    .max_encoding_message_size(max_message),
            )
            .add_service(
                AdminServiceServer::new(admin)
                    .max_decoding_message_size(max_message)
                    .max_encoding_message_size(max_message),
            )
            .add_service(
                AuthorizationServer::new(ExtAuthz::new(core_for_ext_authz, strip_authorization))
                    .max_decoding_message_size(max_message)
                    .max_encoding_message_size(max_message),
            )
            .add_optional_service(reflection_v1)
            .add_optional_service(reflection_v1alpha)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop_rx.await;
            });
        tracing::info!(%addr, reflection, tls = tls.is_some(), "authd serving gRPC");

        let result = serve_then_drain(
            server,
            shutdown,
            Drain {
                grace,
                health: &health,
                serving: serving_tx,
                stopping: stopping_tx,
                stop: stop_tx,
            },
        )
        .await;
        let _ = background_stop.send(true);
        if let Some(http_task) = http_task {
            finish_http(http_task).await;
        }
        result?;
        tracing::info!("authd stopped");
        Ok(())
    }
}

/// How many connections each listener takes, and how soon each must start. Unless set,
/// the caps share what the file descriptor limit leaves after the store pools: an eighth
/// to the HTTP listener (probes and scrapes need few), the rest to gRPC.
fn admissions(config: &Config) -> (Admission, Admission) {
    let limits = config.connections;
    let users = match &config.users {
        UsersBackend::MySql(db) => u64::from(db.pool_size),
        UsersBackend::Sqlite { .. } => 0,
    };
    let sessions = match &config.sessions {
        SessionsBackend::Redis(redis) => u64::from(redis.pool_size),
        SessionsBackend::Memory => 0,
    };
    let fd_limit = crate::transport::fd_limit();
    let budget = crate::transport::connection_budget(fd_limit, users.saturating_add(sessions));
    let http = limits
        .http_max_connections
        .unwrap_or_else(|| (budget / 8).max(1));
    let http_share = if config.http_addr.is_some() { http } else { 0 };
    let grpc = limits
        .max_connections
        .unwrap_or_else(|| budget.saturating_sub(http_share).max(1));
    tracing::info!(
        max_connections = grpc,
        http_max_connections = http,
        fd_limit,
        preface_timeout = ?limits.preface_timeout,
        "connection limits"
    );
    (
        Admission::new("grpc", grpc, limits.preface_timeout),
        Admission::new("http", http, limits.preface_timeout),
    )
}

/// Samples the store pools into `authd_pool_connections` and `authd_pool_max_connections`.
fn pool_gauges(users: UserStore, core: Arc<AuthCore>) -> Arc<dyn Fn() + Send + Sync> {
    Arc::new(move || {
        let pools = [
            ("users", Some(users.pool_stats())),
            ("sessions", core.session_store().pool_stats()),
        ];
        for (pool, stats) in pools {
            let Some(PoolStats { open, idle, max }) = stats else {
                continue;
            };
            metrics::gauge!("authd_pool_connections", "pool" => pool, "state" => "idle")
                .set(f64::from(idle));
            metrics::gauge!("authd_pool_connections", "pool" => pool, "state" => "in_use")
                .set(f64::from(open.saturating_sub(idle)));
            metrics::gauge!("authd_pool_max_connections", "pool" => pool).set(f64::from(max));
        }
    })
}

/// Serves `/metrics`, `/healthz` and `/.well-known/` on `listener` until `stopped`.
fn spawn_http(
    listener: TcpListener,
    http_addr: SocketAddr,
    state: HttpState,
    admission: Admission,
    mut stopped: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    tracing::info!(%http_addr, "authd serving HTTP (/metrics, /healthz, /.well-known/)");
    match &state.public_url {
        Some(url) => tracing::info!(public_url = %url, "discovery names the keys under PUBLIC_URL"),
        None => tracing::info!(
            "PUBLIC_URL is not set and JWT_ISSUER is not a URL: discovery names the keys under each request's Host, uncacheable"
        ),
    }
    tokio::spawn(crate::http::serve(
        listener,
        crate::http::router(state),
        admission,
        async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        },
    ))
}

/// Lets the HTTP listener finish its requests, for at most [`HTTP_GRACE`].
async fn finish_http(task: tokio::task::JoinHandle<std::io::Result<()>>) {
    match tokio::time::timeout(HTTP_GRACE, task).await {
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "HTTP listener failed"),
        Ok(_) => {}
        Err(_) => tracing::warn!("HTTP listener still busy; leaving it"),
    }
}

/// The reflection services (v1 and v1alpha: grpcurl of every age asks one or the
/// other), describing authd's protos, health, the `google.rpc` error details and Envoy's
/// Check.
fn reflection_services() -> anyhow::Result<(
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
)> {
    const SETS: [&[u8]; 4] = [
        crate::proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_types::pb::FILE_DESCRIPTOR_SET,
        crate::proto::ENVOY_FILE_DESCRIPTOR_SET,
    ];
    let builder = || {
        SETS.iter().fold(
            tonic_reflection::server::Builder::configure(),
            |builder, set| builder.register_encoded_file_descriptor_set(set),
        )
    };
    Ok((builder().build_v1()?, builder().build_v1alpha()?))
}

/// What stopping needs: how long calls in flight get, and whom to tell.
struct Drain<'a> {
    grace: Duration,
    health: &'a HealthReporter,
    /// `/healthz`'s view.
    serving: watch::Sender<bool>,
    /// WatchRevocations streams end when this turns true.
    stopping: watch::Sender<bool>,
    /// Stops the gRPC server accepting.
    stop: tokio::sync::oneshot::Sender<()>,
}

/// Serves until `shutdown`; then reports NOT_SERVING everywhere, ends the revocation
/// streams (their watchers resume elsewhere), stops accepting, and gives the calls in
/// flight `grace` to finish.
async fn serve_then_drain<S, F>(server: S, shutdown: F, drain: Drain<'_>) -> anyhow::Result<()>
where
    S: Future<Output = Result<(), tonic::transport::Error>>,
    F: Future<Output = ()>,
{
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => result.context("gRPC server failed"),
        () = shutdown => {
            tracing::info!(grace = ?drain.grace, "shutting down: NOT_SERVING, finishing in-flight calls");
            let _ = drain.serving.send(false);
            drain.health.set_service_status("", ServingStatus::NotServing).await;
            drain
                .health
                .set_service_status(AUTH_SERVICE_NAME, ServingStatus::NotServing)
                .await;
            drain
                .health
                .set_service_status(ADMIN_SERVICE_NAME, ServingStatus::NotServing)
                .await;
            let _ = drain.stopping.send(true);
            let _ = drain.stop.send(());
            match tokio::time::timeout(drain.grace, server).await {
                Ok(result) => result.context("gRPC server failed"),
                Err(_) => {
                    tracing::warn!("grace period over; exiting with calls still in flight");
                    Ok(())
                }
            }
        }
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}

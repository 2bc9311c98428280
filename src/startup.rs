//! Builds the stores, the core and the tonic router, binds the listener (port 0 works,
//! for tests) and serves until told to stop.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::auth::AuthCore;
use crate::auth::hasher::PasswordHasher;
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, SessionsBackend};
use crate::grpc::AuthGrpc;
use crate::grpc::ext_authz::ExtAuthz;
use crate::proto::auth::v1::auth_service_server::AuthServiceServer;
use crate::store::{SessionStore, UserStore};
use envoy_types::ext_authz::v3::pb::AuthorizationServer;

/// The name health checks use for the auth service.
pub const AUTH_SERVICE_NAME: &str = "auth.v1.AuthService";

/// A built, bound, not yet serving authd.
pub struct Application {
    listener: TcpListener,
    addr: SocketAddr,
    core: Arc<AuthCore>,
    health: HealthReporter,
    reflection: bool,
    grace: std::time::Duration,
    watch_heartbeat: std::time::Duration,
    strip_authorization: bool,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Application {
    /// Connects the stores (applying migrations) and binds `config.grpc_addr`.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        Self::build_with_clock(config, Arc::new(SystemClock)).await
    }

    /// As [`Application::build`], with the clock every expiry is judged by.
    pub async fn build_with_clock(config: Config, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
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
        let hasher =
            PasswordHasher::start(&config.bcrypt).context("cannot start bcrypt threads")?;
        let core = AuthCore::new(&config, users, sessions, hasher, clock)
            .await
            .context("cannot prepare the password hasher")?;

        let listener = TcpListener::bind(config.grpc_addr)
            .await
            .with_context(|| format!("cannot listen on GRPC_ADDR {}", config.grpc_addr))?;
        let addr = listener.local_addr()?;
        let (health, _) = tonic_health::server::health_reporter();
        Ok(Self {
            listener,
            addr,
            core: Arc::new(core),
            health,
            reflection: config.grpc_reflection,
            grace: config.shutdown_grace,
            watch_heartbeat: config.watch_heartbeat,
            strip_authorization: config.ext_authz_strip_authorization,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port actually bound.
    pub fn port(&self) -> u16 {
        self.addr.port()
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
            core,
            health,
            reflection,
            grace,
            watch_heartbeat,
            strip_authorization,
        } = self;
        let health_service = tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(health.clone()),
        );
        health.set_service_status("", ServingStatus::Serving).await;
        health
            .set_service_status(AUTH_SERVICE_NAME, ServingStatus::Serving)
            .await;

        let (reflection_v1, reflection_v1alpha) = if reflection {
            let v1 = tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
                .register_file_descriptor_set(envoy_ext_authz_descriptor())
                .build_v1()?;
            let v1alpha = tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
                .register_file_descriptor_set(envoy_ext_authz_descriptor())
                .build_v1alpha()?;
            (Some(v1), Some(v1alpha))
        } else {
            (None, None)
        };

        let core_for_ext_authz = Arc::clone(&core);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
        let server = Server::builder()
            .tcp_nodelay(true)
            .add_service(health_service)
            .add_service(AuthServiceServer::new(AuthGrpc::new(
                core,
                watch_heartbeat,
                stopping,
            )))
            .add_service(AuthorizationServer::new(ExtAuthz::new(
                core_for_ext_authz,
                strip_authorization,
            )))
            .add_optional_service(reflection_v1)
            .add_optional_service(reflection_v1alpha)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stop_rx.await;
            });
        tracing::info!(%addr, reflection, "authd serving gRPC");

        tokio::pin!(server);
        tokio::select! {
            result = &mut server => return result.context("gRPC server failed"),
            () = shutdown => {}
        }
        tracing::info!(grace = ?grace, "shutting down: NOT_SERVING, finishing in-flight calls");
        health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        health
            .set_service_status(AUTH_SERVICE_NAME, ServingStatus::NotServing)
            .await;
        // Long-lived WatchRevocations streams end now; their watchers resume elsewhere.
        let _ = stopping_tx.send(true);
        let _ = stop_tx.send(());
        match tokio::time::timeout(grace, server).await {
            Ok(result) => result.context("gRPC server failed")?,
            Err(_) => tracing::warn!("grace period over; exiting with calls still in flight"),
        }
        tracing::info!("authd stopped");
        Ok(())
    }
}

/// The Envoy Check service for reflection: envoy-types ships the generated code but no
/// descriptors, so this names the service and its method (enough for `grpcurl list`);
/// Envoy itself needs no reflection.
fn envoy_ext_authz_descriptor() -> prost_types::FileDescriptorSet {
    use prost_types::{FileDescriptorProto, MethodDescriptorProto, ServiceDescriptorProto};
    prost_types::FileDescriptorSet {
        file: vec![FileDescriptorProto {
            name: Some("envoy/service/auth/v3/external_auth.proto".into()),
            package: Some("envoy.service.auth.v3".into()),
            service: vec![ServiceDescriptorProto {
                name: Some("Authorization".into()),
                method: vec![MethodDescriptorProto {
                    name: Some("Check".into()),
                    input_type: Some(".envoy.service.auth.v3.CheckRequest".into()),
                    output_type: Some(".envoy.service.auth.v3.CheckResponse".into()),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            syntax: Some("proto3".into()),
            ..Default::default()
        }],
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

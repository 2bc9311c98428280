//! The HTTP listener (`HTTP_ADDR`): `/metrics` in Prometheus text format and `/healthz`.
//! [`router`] is the one place routes are added (the JWKS document comes next).

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// What the HTTP routes read.
#[derive(Clone)]
pub struct HttpState {
    /// The registry `/metrics` renders.
    pub metrics: PrometheusHandle,
    /// Sampled just before each scrape (pool sizes and the like).
    pub gauges: Arc<dyn Fn() + Send + Sync>,
    /// True while the gRPC server is SERVING.
    pub serving: watch::Receiver<bool>,
}

impl std::fmt::Debug for HttpState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpState").finish_non_exhaustive()
    }
}

/// Every HTTP route authd serves.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` resolves.
pub async fn serve<F>(listener: TcpListener, router: Router, shutdown: F) -> std::io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    (state.gauges)();
    state.metrics.run_upkeep();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

/// 200 `SERVING` while the gRPC server serves, 503 `NOT_SERVING` once shutdown began:
/// the same answer as `grpc.health.v1.Health/Check` for `""`.
async fn healthz(State(state): State<HttpState>) -> impl IntoResponse {
    if *state.serving.borrow() {
        (StatusCode::OK, "SERVING\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "NOT_SERVING\n")
    }
}

//! The HTTP listener (`HTTP_ADDR`): `/metrics` in Prometheus text format, `/healthz`, and
//! the public signing keys: `/.well-known/jwks.json` and an OpenID-style
//! `/.well-known/openid-configuration`. [`router`] is the one place routes are added.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::{ConnectInfo, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use hyper::service::Service as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::config::TrustedProxies;
use crate::transport::Admission;

/// What the HTTP routes read.
#[derive(Clone)]
pub struct HttpState {
    /// The registry `/metrics` renders.
    pub metrics: PrometheusHandle,
    /// Sampled just before each scrape (pool sizes and the like).
    pub gauges: Arc<dyn Fn() + Send + Sync>,
    /// True while the gRPC server is SERVING.
    pub serving: watch::Receiver<bool>,
    /// The public keys that verify tokens now (none for HS256).
    pub jwks: Arc<dyn Fn() -> jsonwebtoken::jwk::JwkSet + Send + Sync>,
    /// The `iss` tokens carry.
    pub issuer: String,
    /// The algorithm new tokens are signed with (`HS256`, `EdDSA`, …).
    pub algorithm: String,
    /// Where verifiers reach this listener (`PUBLIC_URL`), the base of `jwks_uri`.
    pub public_url: Option<String>,
    /// Peers whose `X-Forwarded-Proto` counts when there is no `public_url`.
    pub trusted_proxies: TrustedProxies,
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
        .route("/.well-known/jwks.json", get(jwks))
        .route(
            "/.well-known/openid-configuration",
            get(openid_configuration),
        )
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` resolves, then lets the requests under
/// way finish. HTTP/1.1 only. `admission` caps the open connections and bounds how long
/// a client may take to send its first byte, and then each request head (the first, and
/// each later one on a kept-alive connection): a client that connects and stays silent,
/// trickles a head, or idles between requests is closed after `admission.preface_timeout`.
pub async fn serve<F>(
    listener: TcpListener,
    router: Router,
    admission: Admission,
    shutdown: F,
) -> std::io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let service = TowerToHyperService::new(router);
    let (stop, stopping) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let (stream, remote_addr, slot) = tokio::select! {
            () = &mut shutdown => break,
            accepted = admission.accept(&listener) => accepted,
        };
        let admission = admission.clone();
        let mut stopping = stopping.clone();
        let service = service.clone();
        let task = async move {
            // Nothing is allocated for a connection until its first bytes arrive: a
            // silent one costs its socket and this small task, not hyper's state.
            let mut first = [0u8; 1];
            let first_bytes =
                tokio::time::timeout(admission.preface_timeout, stream.peek(&mut first));
            let stopped = async {
                let _ = stopping.wait_for(|stop| *stop).await;
            };
            tokio::select! {
                first = first_bytes => if first.is_err() {
                    admission.timed_out(remote_addr);
                    return;
                },
                () = stopped => return,
            }
            // Boxed in a statement of its own, so the task's state holds only the box.
            let served = Box::pin(serve_connection(
                stream,
                remote_addr,
                service,
                &admission,
                stopping,
            ));
            served.await;
            drop(slot);
        };
        tokio::spawn(task);
    }
    drop(listener);
    // Each connection's task holds a receiver: once none is left, all have ended.
    stop.send_replace(true);
    drop(stopping);
    stop.closed().await;
    Ok(())
}

/// One HTTP connection, from its first bytes until it ends or, once `stopping`, its
/// request under way is answered.
async fn serve_connection(
    stream: TcpStream,
    remote_addr: SocketAddr,
    service: TowerToHyperService<Router>,
    admission: &Admission,
    mut stopping: watch::Receiver<bool>,
) {
    // A connection that times out after a request was only idle between requests; one
    // that never got a request head through is what the timeout is for.
    let requested = Arc::new(AtomicBool::new(false));
    let service = {
        let requested = Arc::clone(&requested);
        hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
            requested.store(true, Ordering::Relaxed);
            // The peer's address, for `X-Forwarded-Proto` from trusted proxies only.
            request
                .extensions_mut()
                .insert(axum::extract::ConnectInfo(remote_addr));
            service.call(request)
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(admission.preface_timeout);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let stopped = async move {
        let _ = stopping.wait_for(|stop| *stop).await;
    };
    let served = tokio::select! {
        served = conn.as_mut() => served,
        () = stopped => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    match served {
        Err(e) if e.is_timeout() && !requested.load(Ordering::Relaxed) => {
            admission.timed_out(remote_addr);
        }
        Err(e) => tracing::debug!(%remote_addr, error = %e, "HTTP connection ended"),
        Ok(()) => {}
    }
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

/// How long verifiers may cache the key set. A retired key keeps verifying for the
/// tokens' lifetime, and a verifier that meets an unknown `kid` fetches again.
const JWKS_MAX_AGE: &str = "public, max-age=300";

async fn jwks(State(state): State<HttpState>) -> impl IntoResponse {
    let body = serde_json::to_string(&(state.jwks)()).unwrap_or_else(|_| r#"{"keys":[]}"#.into());
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, JWKS_MAX_AGE),
        ],
        body,
    )
}

/// Discovery for verifiers: the issuer and where its keys are. `jwks_uri` is under the
/// configured public URL, whatever the request says, and then the document may be cached
/// by anyone. Without one it is built from the request — its `Host`, and its
/// `X-Forwarded-Proto` only from a `TRUSTED_PROXIES` peer — and may not be cached: a
/// forged `Host` then misleads only the client that forged it, never a shared cache.
async fn openid_configuration(
    State(state): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: axum::http::HeaderMap,
) -> impl IntoResponse {
    let (base, cache_control) = match &state.public_url {
        Some(url) => (url.clone(), JWKS_MAX_AGE),
        None => (
            request_base_url(&headers, peer, &state.trusted_proxies),
            "no-store",
        ),
    };
    let body = serde_json::json!({
        "issuer": state.issuer,
        "jwks_uri": format!("{base}/.well-known/jwks.json"),
        "id_token_signing_alg_values_supported": [state.algorithm],
        "token_endpoint_auth_methods_supported": ["none"],
        "response_types_supported": ["token"],
        "subject_types_supported": ["public"],
        "claims_supported": ["iss", "aud", "sub", "username", "sid", "jti", "iat", "nbf", "exp"],
    });
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, cache_control),
        ],
        body.to_string(),
    )
}

/// `scheme://host` as this request reached authd: the `Host` header when it is a plain
/// `host[:port]`, the scheme from `X-Forwarded-Proto` when a trusted proxy sent it.
fn request_base_url(
    headers: &axum::http::HeaderMap,
    peer: SocketAddr,
    trusted_proxies: &TrustedProxies,
) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse::<axum::http::uri::Authority>().ok())
        .filter(|a| !a.as_str().contains('@'))
        .map_or_else(|| "localhost".to_owned(), |a| a.as_str().to_owned());
    let scheme = headers
        .get("x-forwarded-proto")
        .filter(|_| trusted_proxies.trusts(peer.ip()))
        .and_then(|h| h.to_str().ok())
        .filter(|p| *p == "https" || *p == "http")
        .unwrap_or("http");
    format!("{scheme}://{host}")
}

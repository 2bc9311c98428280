//! The tower layer every gRPC call passes through: one span per call (joined to the
//! caller's trace through W3C `traceparent`), the concurrency limits that shed load,
//! the request timeout, and the RPC metrics and log line.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body::{Frame, SizeHint};
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tokio::sync::Semaphore;
use tonic::Code;
use tonic::body::Body;
use tower::{Layer, Service};
use tracing::Instrument;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::status::{ShedScope, code_name, deadline_exceeded, overloaded};
use crate::proto::auth::v1::admin_service_server::SERVICE_NAME as ADMIN_SERVICE;
use crate::proto::auth::v1::auth_service_server::SERVICE_NAME as AUTH_SERVICE;
use crate::transport::Peer;

const ENVOY_SERVICE: &str = "envoy.service.auth.v3.Authorization";
const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

/// Services whose names may appear as metric labels; any other path is `unknown`, so a
/// client cannot grow the label set.
const KNOWN_SERVICES: &[&str] = &[
    AUTH_SERVICE,
    ADMIN_SERVICE,
    ENVOY_SERVICE,
    HEALTH_SERVICE,
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// Adds telemetry and limits to every call.
#[derive(Debug, Clone)]
pub struct RpcLayer {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    in_flight: Arc<Semaphore>,
    request_timeout: Duration,
    traces: bool,
}

impl RpcLayer {
    /// At most `concurrency` calls in flight on the server, each cut off after
    /// `request_timeout` (or the client's shorter `grpc-timeout`). The per-connection limit
    /// travels with each connection's [`Peer`]. With `traces`, spans carry what
    /// OpenTelemetry reads (name, kind, error status) and join the caller's trace.
    pub fn new(concurrency: usize, request_timeout: Duration, traces: bool) -> Self {
        Self {
            shared: Arc::new(Shared {
                in_flight: Arc::new(Semaphore::new(concurrency)),
                request_timeout,
                traces,
            }),
        }
    }
}

impl<S> Layer<S> for RpcLayer {
    type Service = RpcService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcService {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

/// See [`RpcLayer`].
#[derive(Debug, Clone)]
pub struct RpcService<S> {
    inner: S,
    shared: Arc<Shared>,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S> Service<http::Request<Body>> for RpcService<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<RecordedBody>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // The clone that was made ready serves this call; a fresh one waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = Arc::clone(&self.shared);
        let mut record = CallRecord::start(&request, shared.traces);
        Box::pin(async move {
            let Ok(_server_permit) = Arc::clone(&shared.in_flight).try_acquire_owned() else {
                return Ok(record.refuse(ShedScope::Server));
            };
            let connection_permit = request.extensions().get::<Peer>().map(Peer::try_call);
            let _connection_permit = match connection_permit {
                Some(None) => return Ok(record.refuse(ShedScope::Connection)),
                Some(Some(permit)) => Some(permit),
                None => None,
            };
            let limit = match grpc_timeout(request.headers()) {
                // tonic also enforces `grpc-timeout` (answering CANCELLED), on a clock it
                // started a little earlier: answer 5 % before the client's deadline so
                // the caller hears DEADLINE_EXCEEDED, whichever timer wakes first.
                Some(t) if t < shared.request_timeout => t - t / 20,
                _ => shared.request_timeout,
            };
            let _in_flight = InFlight::enter();
            let call = inner.call(request).instrument(record.span.clone());
            match tokio::time::timeout(limit, call).await {
                Ok(Ok(mut response)) => {
                    record.code = response_code(response.headers());
                    if record.code == Some(Code::Internal) {
                        response = undecodable_as_invalid_argument(response);
                        record.code = response_code(response.headers());
                    }
                    Ok(response.map(|body| RecordedBody {
                        inner: body,
                        record: Some(record),
                    }))
                }
                Ok(Err(e)) => Err(e),
                Err(_) => {
                    let response = deadline_exceeded(limit).into_http::<Body>();
                    record.code = Some(Code::DeadlineExceeded);
                    Ok(response.map(|body| RecordedBody {
                        inner: body,
                        record: Some(record),
                    }))
                }
            }
        })
    }
}

/// Counts a call in `authd_rpc_in_flight` while it lives.
struct InFlight(&'static metrics::Gauge);

impl InFlight {
    fn enter() -> Self {
        static GAUGE: OnceLock<metrics::Gauge> = OnceLock::new();
        let gauge = GAUGE.get_or_init(|| metrics::gauge!("authd_rpc_in_flight"));
        gauge.increment(1.0);
        Self(gauge)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// The metric handles of a hot call that succeeded, looked up once: the registry
/// lookup, and the three label strings it needs, cost every call otherwise (issue #21).
/// The handles are made on first use, after start-up installed the recorder.
struct HotMetrics {
    total: metrics::Counter,
    duration: metrics::Histogram,
}

fn hot_metrics(service: &'static str, method: &str) -> Option<&'static HotMetrics> {
    static HOT: OnceLock<[(&'static str, &'static str, HotMetrics); 3]> = OnceLock::new();
    let hot = HOT.get_or_init(|| {
        let make = |service: &'static str, method: &'static str| {
            let labels = [
                ("service", service.to_owned()),
                ("method", method.to_owned()),
                ("code", code_name(Code::Ok).to_owned()),
            ];
            (
                service,
                method,
                HotMetrics {
                    total: metrics::counter!("authd_rpc_total", &labels),
                    duration: metrics::histogram!("authd_rpc_duration_seconds", &labels),
                },
            )
        };
        [
            make(AUTH_SERVICE, "ValidateToken"),
            make(ENVOY_SERVICE, "Check"),
            make(HEALTH_SERVICE, "Check"),
        ]
    });
    hot.iter()
        .find(|(s, m, _)| *s == service && *m == method)
        .map(|(.., handles)| handles)
}

/// One call, from its arrival to the last byte of its answer (or the client giving up).
/// Dropping it writes the metrics and the `rpc finished` line.
struct CallRecord {
    span: tracing::Span,
    service: &'static str,
    method: String,
    started: Instant,
    code: Option<Code>,
    ended: bool,
    traces: bool,
}

impl CallRecord {
    fn start(request: &http::Request<Body>, traces: bool) -> Self {
        let path = request.uri().path();
        let (service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or(("", ""));
        let service = KNOWN_SERVICES
            .iter()
            .find(|s| **s == service)
            .copied()
            .unwrap_or("unknown");
        let method = if service == "unknown" {
            "unknown".to_owned()
        } else {
            method.to_owned()
        };
        // Each field costs every log line of the call, so the OpenTelemetry ones are
        // there only when traces are exported.
        let span = if traces {
            tracing::info_span!(
                "rpc",
                otel.name = if service == "unknown" {
                    "unknown"
                } else {
                    path.trim_start_matches('/')
                },
                otel.kind = "server",
                otel.status_code = Empty,
                service,
                method = method.as_str(),
                code = Empty,
                micros = Empty,
                user_id = Empty,
            )
        } else if is_hot(service, &method) {
            // These calls log only their errors at info, each in a span of its own that
            // names the call (see `Drop` and `service::hot_rpc`). A span at info would
            // cost every call the formatting of its fields (with LOG_FORMAT=json, again
            // at each `record`): 17 µs of a ValidateToken's 119 in authd, measured with
            // authd-bench at RUST_LOG=info against warn (BENCHMARKS.md).
            tracing::debug_span!("rpc", service, method = method.as_str(), user_id = Empty)
        } else {
            tracing::info_span!("rpc", service, method = method.as_str(), user_id = Empty)
        };
        if traces && request.headers().contains_key("traceparent") {
            let parent = TraceContextPropagator::new().extract(&Headers(request.headers()));
            let _ = span.set_parent(parent);
        }
        Self {
            span,
            service,
            method,
            started: Instant::now(),
            code: None,
            ended: false,
            traces,
        }
    }

    fn refuse(mut self, scope: ShedScope) -> http::Response<RecordedBody> {
        metrics::counter!("authd_rpc_shed_total", "scope" => scope.as_str()).increment(1);
        self.code = Some(Code::ResourceExhausted);
        overloaded(scope)
            .into_http::<Body>()
            .map(|body| RecordedBody {
                inner: body,
                record: Some(self),
            })
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        // No status at all: the client went away first (or the stream broke).
        let code = self.code.unwrap_or(if self.ended {
            Code::Unknown
        } else {
            Code::Cancelled
        });
        let name = code_name(code);
        // Only real methods answer something other than UNIMPLEMENTED.
        let method = if code == Code::Unimplemented {
            "unknown".to_owned()
        } else {
            std::mem::take(&mut self.method)
        };
        // The token checks every other service makes on each of its requests (and health
        // probes) log their successes at debug: at info that line was a third of such a
        // call's CPU. A refused token is an answer (OK), counted by the services in
        // `authd_tokens_refused_total`; errors are logged here at info.
        let elapsed = self.started.elapsed();
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let hot = if code == Code::Ok {
            hot_metrics(self.service, &method)
        } else {
            None
        };
        let quiet = hot.is_some();
        if let Some(handles) = hot {
            handles.total.increment(1);
            handles.duration.record(elapsed.as_secs_f64());
        } else {
            let labels = [
                ("service", self.service.to_owned()),
                ("method", method.clone()),
                ("code", name.to_owned()),
            ];
            metrics::counter!("authd_rpc_total", &labels).increment(1);
            metrics::histogram!("authd_rpc_duration_seconds", &labels)
                .record(elapsed.as_secs_f64());
        }
        // The exported span carries the outcome. In the logs the line below does, so the
        // span is not written to again (with LOG_FORMAT=json each write re-encodes all of
        // its fields).
        if self.traces {
            self.span.record("code", name);
            self.span.record("micros", micros);
            if is_server_error(code) {
                self.span.record("otel.status_code", "ERROR");
            }
        }
        let _entered = self.span.enter();
        if quiet {
            tracing::debug!(code = name, micros, "rpc finished");
        } else if self.span.is_disabled() {
            // A hot call's span is off at info: its error line gets a span of its own,
            // so it reads like every other call's.
            let _named =
                tracing::info_span!("rpc", service = self.service, method = method.as_str())
                    .entered();
            tracing::info!(code = name, micros, "rpc finished");
        } else {
            tracing::info!(code = name, micros, "rpc finished");
        }
    }
}

/// The calls made once per request of a protected service, or by probes.
fn is_hot(service: &str, method: &str) -> bool {
    matches!(
        (service, method),
        (AUTH_SERVICE, "ValidateToken") | (ENVOY_SERVICE, "Check") | (HEALTH_SERVICE, "Check")
    )
}

/// The codes that mean the server failed, not the caller (OpenTelemetry's rule for gRPC
/// server spans).
fn is_server_error(code: Code) -> bool {
    matches!(
        code,
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    )
}

pin_project_lite::pin_project! {
    /// A response body that notes the call's final status as it goes out.
    pub struct RecordedBody {
        #[pin]
        inner: Body,
        record: Option<CallRecord>,
    }
}

impl http_body::Body for RecordedBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let (Poll::Ready(item), Some(record)) = (&polled, this.record.as_mut()) {
            match item {
                Some(Ok(frame)) => {
                    if let Some(code) = frame.trailers_ref().and_then(response_code) {
                        record.code = Some(code);
                    }
                }
                Some(Err(status)) => record.code = Some(status.code()),
                None => record.ended = true,
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What tonic says (as INTERNAL) when it cannot read a request: a message that is not
/// protobuf or not UTF-8 where a string belongs, a frame cut short, a bad
/// compressed flag, no message at all.
const UNDECODABLE_REQUEST: &[&str] = &[
    "failed to decode Protobuf message",
    "protocol error: received message with",
    "Unexpected EOF decoding stream",
    "Missing request message",
];

/// Rewrites tonic's INTERNAL for a request it could not decode to INVALID_ARGUMENT: the
/// caller sent garbage, the server did not fail (and must not page anyone who watches
/// INTERNAL). The answer to an unreadable request is trailers-only, so the status is in
/// the headers. Called only for an INTERNAL answer, off the path of every other call.
fn undecodable_as_invalid_argument(response: http::Response<Body>) -> http::Response<Body> {
    let Some(status) = tonic::Status::from_header_map(response.headers()) else {
        return response;
    };
    if status.code() != Code::Internal
        || !UNDECODABLE_REQUEST
            .iter()
            .any(|m| status.message().starts_with(m))
    {
        return response;
    }
    // tonic's text names internals (message types, decoder wording): the log has it,
    // the caller gets a plain refusal.
    tracing::debug!(detail = status.message(), "malformed request");
    tonic::Status::invalid_argument("malformed request").into_http()
}

/// The `grpc-status` in a header map (a trailers-only answer, or the trailers).
fn response_code(headers: &http::HeaderMap) -> Option<Code> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    value.parse::<i32>().ok().map(Code::from_i32)
}

/// The client's deadline, from `grpc-timeout` (like `100m`: at most 8 digits and a unit).
fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Request headers as OpenTelemetry's propagator reads them.
struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(name: &'static str, value: &'static str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(name, http::HeaderValue::from_static(value));
        h
    }

    #[test]
    fn grpc_timeout_reads_every_unit_and_refuses_nonsense() {
        for (text, expected) in [
            ("1H", Duration::from_secs(3600)),
            ("2M", Duration::from_secs(120)),
            ("3S", Duration::from_secs(3)),
            ("250m", Duration::from_millis(250)),
            ("99999999u", Duration::from_micros(99_999_999)),
            ("5n", Duration::from_nanos(5)),
        ] {
            assert_eq!(
                grpc_timeout(&headers("grpc-timeout", text)),
                Some(expected),
                "{text}"
            );
        }
        for text in ["", "S", "100", "123456789S", "1x", "-1S"] {
            assert_eq!(grpc_timeout(&headers("grpc-timeout", text)), None, "{text}");
        }
    }

    #[test]
    fn an_undecodable_request_is_invalid_argument_and_other_internals_stay() {
        let rewritten = |status: tonic::Status| {
            let response = undecodable_as_invalid_argument(status.into_http());
            tonic::Status::from_header_map(response.headers()).map(|s| s.code())
        };
        for message in [
            "failed to decode Protobuf message: RegisterRequest.username: invalid string value",
            "Unexpected EOF decoding stream.",
            "Missing request message.",
            "protocol error: received message with compressed-flag but no grpc-encoding was specified",
        ] {
            assert_eq!(
                rewritten(tonic::Status::internal(message)),
                Some(Code::InvalidArgument),
                "{message}"
            );
        }
        assert_eq!(
            rewritten(tonic::Status::internal("internal error")),
            Some(Code::Internal)
        );
        assert_eq!(
            rewritten(tonic::Status::unavailable(
                "failed to decode Protobuf message"
            )),
            Some(Code::Unavailable)
        );
    }

    #[test]
    fn status_codes_are_read_from_headers_or_trailers() {
        assert_eq!(
            response_code(&headers("grpc-status", "16")),
            Some(Code::Unauthenticated)
        );
        assert_eq!(response_code(&http::HeaderMap::new()), None);
    }
}

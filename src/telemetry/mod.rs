//! Logs, traces and metrics.
//!
//! - Logs: `RUST_LOG` filters (default `info`); `LOG_FORMAT` picks json or pretty. In
//!   either, no field can write a raw line break or terminal escape ([`escape`]).
//! - Traces: every span goes to an OTLP/gRPC collector when
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` is set; [`Telemetry::shutdown`] flushes them.
//! - Metrics: one Prometheus registry per process ([`meters::prometheus`]), served at
//!   `/metrics` by [`crate::http`].

pub mod escape;
pub mod meters;

use anyhow::Context;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Subscriber;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogFormat, OtlpConfig};

/// What [`init`] set up; flush it with [`Telemetry::shutdown`] before the process exits.
#[derive(Debug, Default)]
#[must_use = "spans are lost unless shutdown() flushes them"]
pub struct Telemetry {
    traces: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Sends the spans still buffered and stops the exporter. Blocks until the collector
    /// answered or the exporter's timeout passed; call it outside async code, while the
    /// Tokio runtime that created the exporter still runs.
    pub fn shutdown(self) {
        if let Some(traces) = self.traces
            && let Err(e) = traces.shutdown()
        {
            tracing::warn!(error = %e, "could not flush traces");
        }
    }
}

/// Installs the global subscriber: logs, and trace export when `otlp` is set. Must run
/// inside a Tokio runtime when `otlp` is set (the gRPC exporter's channel lives there).
/// Harmless if a subscriber is already installed (tests): nothing is replaced.
pub fn init(format: LogFormat, otlp: Option<&OtlpConfig>) -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = log_layer(format, std::io::stderr, ansi);
    let traces = otlp.map(tracer_provider).transpose()?;
    let otel = traces.as_ref().map(|provider| {
        tracing_opentelemetry::layer().with_tracer(provider.tracer(env!("CARGO_PKG_NAME")))
    });
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(otel)
        .try_init()
        .is_ok();
    if let Some(otlp) = otlp.filter(|_| installed) {
        tracing::info!(endpoint = %otlp.endpoint, "exporting traces over OTLP");
    }
    Ok(Telemetry { traces })
}

/// The log lines in `format`, written to `writer` (colored when `ansi`). Every field of
/// every event and span is escaped: `pretty` through [`escape::EscapedFields`], `json`
/// through serde_json and [`escape::EscapedJson`].
pub fn log_layer<S, W>(format: LogFormat, writer: W, ansi: bool) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let logs = tracing_subscriber::fmt::layer().with_ansi(ansi);
    match format {
        LogFormat::Json => logs
            .with_writer(escape::EscapedJson(writer))
            .json()
            .with_current_span(true)
            .boxed(),
        LogFormat::Pretty => logs
            .with_writer(writer)
            .compact()
            .fmt_fields(escape::EscapedFields)
            .boxed(),
    }
}

fn tracer_provider(otlp: &OtlpConfig) -> anyhow::Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(otlp.endpoint.clone())
        .build()
        .context("OTEL_EXPORTER_OTLP_ENDPOINT: cannot build the OTLP exporter")?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            Resource::builder()
                .with_service_name(otlp.service_name.clone())
                .build(),
        )
        .build())
}

/// Notes the authenticated user on the current RPC's span (logs and traces), once the
/// caller is known. Never a secret: the user id is the token's `sub`.
pub fn record_user_id(user_id: &str) {
    tracing::Span::current().record("user_id", user_id);
}

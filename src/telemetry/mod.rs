//! Logs, traces and metrics.
//!
//! - Logs: `RUST_LOG` filters (default `info`); `LOG_FORMAT` picks json or pretty.
//! - Traces: every span goes to an OTLP/gRPC collector when
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` is set; [`Telemetry::shutdown`] flushes them.
//! - Metrics: one Prometheus registry per process ([`meters::prometheus`]), served at
//!   `/metrics` by [`crate::http`].

pub mod meters;

use anyhow::Context;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
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
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let logs = match format {
        LogFormat::Json => logs.json().with_current_span(true).boxed(),
        LogFormat::Pretty => logs.compact().boxed(),
    };
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

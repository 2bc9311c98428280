//! Logs and trace export.

use super::error::ConfigError;
use super::raw::RawEnv;
use super::values::choice;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object a line.
    Json,
}

/// OpenTelemetry trace export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpConfig {
    /// OTLP/gRPC collector, like `http://otel-collector:4317`.
    pub endpoint: String,
    /// `service.name` of the exported spans.
    pub service_name: String,
}

pub(super) fn otlp(raw: &RawEnv) -> Result<Option<OtlpConfig>, ConfigError> {
    let service_name = raw
        .otel_service_name
        .clone()
        .unwrap_or_else(|| "authd".to_owned());
    let Some(endpoint) = raw.otel_exporter_otlp_endpoint.clone() else {
        return Ok(None);
    };
    if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
        return Err(ConfigError::new(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "must start with http:// or https:// (OTLP over gRPC, like http://otel-collector:4317)",
        ));
    }
    Ok(Some(OtlpConfig {
        endpoint,
        service_name,
    }))
}

/// `LOG_FORMAT`.
pub(super) fn log_format(raw: &RawEnv) -> Result<LogFormat, ConfigError> {
    choice(
        "LOG_FORMAT",
        raw.log_format.as_deref(),
        &[("pretty", LogFormat::Pretty), ("json", LogFormat::Json)],
    )
}

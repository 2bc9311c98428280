//! Traces: the binary exports its spans over OTLP/gRPC to a collector run by the test,
//! joined to the caller's trace through `traceparent`, and flushes them on SIGTERM.

use std::time::Duration;

use authd::proto::auth::v1 as pb;
use authd::proto::auth::v1::auth_service_client::AuthServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use tokio::sync::mpsc;

use crate::support::binary::Authd;

/// An OTLP trace collector that hands every export to the test.
struct Collector(mpsc::UnboundedSender<ExportTraceServiceRequest>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let _ = self.0.send(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(value: Option<&Value>) -> String {
    match value {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        other => format!("{other:?}"),
    }
}

#[tokio::test]
async fn spans_reach_the_collector_in_the_callers_trace() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector_addr = listener.local_addr().unwrap();
    let (exports_tx, mut exports) = mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Collector(exports_tx)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let endpoint = format!("http://{collector_addr}");
    let authd = Authd::start(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
        ("OTEL_SERVICE_NAME", "authd-under-test"),
    ]);

    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let parent_id = &uuid::Uuid::new_v4().simple().to_string()[..16];
    let mut client = AuthServiceClient::connect(format!("http://{}", authd.addr))
        .await
        .unwrap();
    let mut request = tonic::Request::new(pb::ValidateTokenRequest {
        token: "not-a-token".into(),
        ..Default::default()
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{parent_id}-01").parse().unwrap(),
    );
    client.validate_token(request).await.unwrap();

    // The batch is sent at the latest when SIGTERM flushes it.
    assert_eq!(authd.terminate().await, 0);
    let mut seen = Vec::new();
    let found = loop {
        let export = tokio::time::timeout(Duration::from_secs(10), exports.recv())
            .await
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("no span of the call reached the collector: {seen:#?}"));
        let service_names: Vec<String> = export
            .resource_spans
            .iter()
            .flat_map(|r| r.resource.iter().flat_map(|r| r.attributes.iter()))
            .filter(|kv| kv.key == "service.name")
            .map(|kv| text(kv.value.as_ref().and_then(|v| v.value.as_ref())))
            .collect();
        let spans: Vec<_> = export
            .resource_spans
            .into_iter()
            .flat_map(|r| r.scope_spans)
            .flat_map(|s| s.spans)
            .collect();
        seen.extend(spans.iter().map(|s| (s.name.clone(), hex(&s.trace_id))));
        if let Some(span) = spans
            .into_iter()
            .find(|s| s.name == "auth.v1.AuthService/ValidateToken")
        {
            break (span, service_names);
        }
    };
    let (span, service_names) = found;
    assert_eq!(hex(&span.trace_id), trace_id, "not in the caller's trace");
    assert_eq!(hex(&span.parent_span_id), parent_id);
    assert_eq!(span.kind, SpanKind::Server as i32);
    assert_eq!(service_names, vec!["authd-under-test".to_owned()]);
    let attribute = |key: &str| {
        span.attributes
            .iter()
            .find(|kv| kv.key == key)
            .map(|kv| text(kv.value.as_ref().and_then(|v| v.value.as_ref())))
    };
    assert_eq!(attribute("method").as_deref(), Some("ValidateToken"));
    assert_eq!(attribute("code").as_deref(), Some("OK"));
    assert!(attribute("micros").is_some(), "{:?}", span.attributes);
}

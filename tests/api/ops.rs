//! Operations: `/metrics` and `/healthz`, message size, concurrency limits and load
//! shedding, request timeouts, and what the HTTP listener says during shutdown.

use std::time::Duration;

use authd::proto::auth::v1 as pb;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt;

use crate::support::*;

/// A ValidateToken call whose request message never comes: the server holds it in
/// flight (it waits for the message) until the client gives up or the deadline passes.
fn hold_a_call(
    channel: Channel,
    timeout: Option<Duration>,
) -> JoinHandle<Result<pb::ValidateTokenResponse, Status>> {
    tokio::spawn(async move {
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.unwrap();
        let mut request =
            tonic::Request::new(futures::stream::pending::<pb::ValidateTokenRequest>());
        if let Some(timeout) = timeout {
            request.set_timeout(timeout);
        }
        grpc.client_streaming(
            request,
            http::uri::PathAndQuery::from_static("/auth.v1.AuthService/ValidateToken"),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .map(tonic::Response::into_inner)
    })
}

/// Calls ValidateToken on `channel` until it is shed (true) or `within` passes.
async fn shed_on(channel: &Channel, within: Duration) -> Option<Status> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let answer =
            authd::proto::auth::v1::auth_service_client::AuthServiceClient::new(channel.clone())
                .validate_token(pb::ValidateTokenRequest {
                    token: "not-a-token".into(),
                    ..Default::default()
                })
                .await;
        match answer {
            Err(s) if s.code() == Code::ResourceExhausted => return Some(s),
            _ if tokio::time::Instant::now() >= deadline => return None,
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

async fn new_connection(app: &TestApp) -> Channel {
    Channel::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

#[tokio::test]
async fn metrics_after_a_few_calls_show_the_counters_moved() {
    let app = TestApp::builder().spawn().await;
    let before = app.scrape().await;

    let (_, login) = app.user_with_session("mia").await;
    assert_code(
        app.login("mia", "Wrong-Horse-9").await,
        Code::Unauthenticated,
    );
    assert!(app.validate(&login.access_token).await.unwrap().valid);
    assert_eq!(
        app.reason("not-a-token").await,
        pb::InvalidReason::Malformed
    );

    // A call is counted once its answer has gone out, which can be just after the
    // client has it.
    let validations = |page: &str| {
        metric(
            page,
            "authd_rpc_total",
            &[("method", "ValidateToken"), ("code", "OK")],
        )
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let after = loop {
        let page = app.scrape().await;
        if validations(&page) > validations(&before) {
            break page;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "ValidateToken not counted:\n{page}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let moved = |name: &str, labels: &[(&str, &str)]| {
        metric(&after, name, labels) - metric(&before, name, labels)
    };
    for (name, labels) in [
        (
            "authd_rpc_total",
            vec![("method", "Register"), ("code", "OK")],
        ),
        ("authd_rpc_total", vec![("method", "Login"), ("code", "OK")]),
        (
            "authd_rpc_total",
            vec![("method", "Login"), ("code", "UNAUTHENTICATED")],
        ),
        (
            "authd_rpc_duration_seconds_count",
            vec![("service", "auth.v1.AuthService"), ("method", "Login")],
        ),
        ("authd_logins_total", vec![("outcome", "success")]),
        ("authd_logins_total", vec![("outcome", "failure")]),
        ("authd_bcrypt_wait_seconds_count", vec![]),
        (
            "authd_tokens_refused_total",
            vec![("method", "ValidateToken"), ("reason", "malformed")],
        ),
    ] {
        assert!(moved(name, &labels) >= 1.0, "{name}{labels:?} did not move");
    }
    for present in [
        "# TYPE authd_rpc_duration_seconds histogram",
        "authd_rpc_duration_seconds_bucket{",
        "# TYPE authd_bcrypt_queue_depth gauge",
        "authd_pool_max_connections{pool=\"users\"} 10",
        "authd_pool_max_connections{pool=\"sessions\"} 1",
        "authd_pool_connections{pool=\"users\",state=\"idle\"}",
    ] {
        assert!(after.contains(present), "no {present:?} in:\n{after}");
    }
    assert!(!after.contains(&login.access_token), "a token in /metrics");
    assert_eq!(
        app.http_get("/healthz").await,
        (200, "SERVING\n".to_owned())
    );
}

#[tokio::test]
async fn an_oversize_request_is_refused_and_the_server_keeps_serving() {
    let app = Backend::Embedded.app().spawn().await;
    let huge = "x".repeat(65 * 1024);
    let refused = assert_code(app.validate(&huge).await, Code::OutOfRange);
    assert!(refused.message().contains("too large"), "{refused:?}");

    let health = HealthClient::new(app.channel.clone())
        .check(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status(), ServingStatus::Serving);
    app.register("after_big", PASSWORD).await.unwrap();
}

#[tokio::test]
async fn oversize_metadata_is_refused_and_the_server_keeps_serving() {
    let app = Backend::Embedded
        .app()
        .env("GRPC_MAX_HEADER_LIST_SIZE", "8KiB")
        .spawn()
        .await;
    let mut request = tonic::Request::new(pb::ValidateTokenRequest {
        token: "not-a-token".into(),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("x-padding", "p".repeat(16 * 1024).parse().unwrap());
    let refused = app.client.clone().validate_token(request).await;
    assert!(refused.is_err(), "16 KiB of metadata accepted: {refused:?}");

    let v = app.validate("not-a-token").await.unwrap();
    assert!(!v.valid);
}

#[tokio::test]
async fn calls_over_the_server_concurrency_limit_are_shed_with_retry_advice() {
    let app = Backend::Embedded
        .app()
        .env("GRPC_CONCURRENCY_LIMIT", "1")
        .spawn()
        .await;
    let before = app.scrape().await;
    let held = hold_a_call(app.channel.clone(), None);

    // Another connection does not help: the limit is the server's.
    let other = new_connection(&app).await;
    let shed = shed_on(&other, Duration::from_secs(5))
        .await
        .expect("a call over the limit was served");
    assert!(shed.get_details_retry_info().is_some(), "{shed:?}");
    let after = app.scrape().await;
    assert!(
        metric(&after, "authd_rpc_shed_total", &[("scope", "server")])
            > metric(&before, "authd_rpc_shed_total", &[("scope", "server")])
    );

    // Once the call in flight ends, calls are served again.
    held.abort();
    let served = eventually(Duration::from_secs(5), || async {
        app.validate("not-a-token").await.is_ok()
    })
    .await;
    assert!(served, "still shedding after the held call ended");
}

#[tokio::test]
async fn one_connection_over_its_limit_is_shed_while_others_are_served() {
    let app = Backend::Embedded
        .app()
        .env("GRPC_CONNECTION_CONCURRENCY_LIMIT", "1")
        .spawn()
        .await;
    let busy = new_connection(&app).await;
    let held = hold_a_call(busy.clone(), None);

    let shed = shed_on(&busy, Duration::from_secs(5))
        .await
        .expect("the busy connection was not limited");
    assert!(shed.message().contains("connection"), "{shed:?}");
    let v = app.validate("not-a-token").await.unwrap();
    assert!(!v.valid);
    held.abort();
}

#[tokio::test]
async fn a_call_past_the_request_timeout_ends_deadline_exceeded() {
    let app = Backend::Embedded
        .app()
        .env("GRPC_REQUEST_TIMEOUT", "100ms")
        .spawn()
        .await;
    let answer = tokio::time::timeout(
        Duration::from_secs(5),
        hold_a_call(app.channel.clone(), None),
    )
    .await
    .expect("the server did not cut the call")
    .unwrap();
    let status = assert_code(answer, Code::DeadlineExceeded);
    assert!(status.message().contains("100ms"), "{status:?}");
}

#[tokio::test]
async fn a_shorter_client_grpc_timeout_wins_over_the_server_timeout() {
    use http_body_util::BodyExt;
    let app = Backend::Embedded.app().spawn().await;
    // A bare HTTP/2 client, so that only the server keeps time.
    let tcp = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let never = http_body_util::StreamBody::new(futures::stream::pending::<
        Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>,
    >());
    let request = http::Request::post(format!(
        "http://{}/auth.v1.AuthService/ValidateToken",
        app.addr
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .header("grpc-timeout", "150m")
    .body(never)
    .unwrap();
    let started = std::time::Instant::now();
    let response = tokio::time::timeout(Duration::from_secs(5), sender.send_request(request))
        .await
        .expect("no answer")
        .unwrap();
    let (parts, body) = response.into_parts();
    let trailers = body.collect().await.unwrap().trailers().cloned();
    let status = parts
        .headers
        .get("grpc-status")
        .or_else(|| trailers.as_ref().and_then(|t| t.get("grpc-status")))
        .map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(
        status.as_deref(),
        Some("4"),
        "not DEADLINE_EXCEEDED: {parts:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn healthz_says_not_serving_while_in_flight_calls_finish() {
    let mut app = Backend::Embedded
        .app()
        .envs(&[
            ("GRPC_CONNECTION_CONCURRENCY_LIMIT", "1"),
            ("SHUTDOWN_GRACE", "10s"),
        ])
        .spawn()
        .await;
    let busy = new_connection(&app).await;
    let held = hold_a_call(busy.clone(), None);
    assert!(shed_on(&busy, Duration::from_secs(5)).await.is_some());

    app.begin_stop();
    let not_serving = eventually(Duration::from_secs(5), || async {
        app.http_get("/healthz").await == (503, "NOT_SERVING\n".to_owned())
    })
    .await;
    assert!(not_serving, "/healthz did not turn NOT_SERVING");

    held.abort();
    tokio::time::timeout(Duration::from_secs(5), app.stop())
        .await
        .expect("the server did not stop once the call ended")
        .unwrap();
}

#[tokio::test]
async fn a_stuck_users_database_answers_unavailable_within_the_query_timeout() {
    let app = TestApp::builder()
        .env("DB_QUERY_TIMEOUT", "200ms")
        .spawn()
        .await;
    app.register("stuck", PASSWORD).await.unwrap();

    // Another session holds the table: every query on it waits.
    let pool = sqlx::MySqlPool::connect(&app.db_url).await.unwrap();
    let mut locker = pool.acquire().await.unwrap();
    sqlx::query("LOCK TABLES users WRITE")
        .execute(&mut *locker)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let status = assert_code(app.login("stuck", PASSWORD).await, Code::Unavailable);
    assert!(started.elapsed() < Duration::from_secs(5), "{status:?}");
    assert!(
        !status.message().contains("DB_QUERY_TIMEOUT"),
        "detail leaked: {status:?}"
    );

    sqlx::query("UNLOCK TABLES")
        .execute(&mut *locker)
        .await
        .unwrap();
    app.login("stuck", PASSWORD).await.unwrap();
}

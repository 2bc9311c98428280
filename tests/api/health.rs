use std::time::Duration;

use authd::proto::auth::v1 as pb;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::support::*;

async fn status(app: &TestApp, service: &str) -> ServingStatus {
    HealthClient::new(app.channel.clone())
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status()
}

#[tokio::test]
async fn health_reports_serving_overall_and_for_the_auth_service() {
    let app = TestApp::builder().spawn().await;
    assert_eq!(status(&app, "").await, ServingStatus::Serving);
    assert_eq!(
        status(&app, "auth.v1.AuthService").await,
        ServingStatus::Serving
    );
    let unknown = HealthClient::new(app.channel.clone())
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await;
    assert_code(unknown, Code::NotFound);
}

use tonic_reflection::pb::v1 as r1;
use tonic_reflection::pb::v1alpha as ra;

/// One v1 reflection request; its first answer.
async fn reflect_v1(
    app: &TestApp,
    request: r1::server_reflection_request::MessageRequest,
) -> Result<Option<r1::server_reflection_response::MessageResponse>, tonic::Status> {
    use tokio_stream::StreamExt;
    let mut c = r1::server_reflection_client::ServerReflectionClient::new(app.channel.clone());
    let req = r1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut answers = c
        .server_reflection_info(tokio_stream::iter([req]))
        .await?
        .into_inner();
    Ok(answers
        .next()
        .await
        .and_then(Result::ok)
        .and_then(|a| a.message_response))
}

#[tokio::test]
async fn reflection_v1_and_v1alpha_list_the_services() {
    use tokio_stream::StreamExt;
    let app = TestApp::builder().spawn().await;

    let answer = reflect_v1(
        &app,
        r1::server_reflection_request::MessageRequest::ListServices(String::new()),
    )
    .await
    .unwrap();
    let Some(r1::server_reflection_response::MessageResponse::ListServicesResponse(list)) = answer
    else {
        panic!("unexpected v1 answer: {answer:?}")
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"auth.v1.AuthService"), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");

    // v1alpha, for older grpcurl; it also describes the google.rpc error details.
    let mut c = ra::server_reflection_client::ServerReflectionClient::new(app.channel.clone());
    let req = ra::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            ra::server_reflection_request::MessageRequest::FileContainingSymbol(
                "google.rpc.BadRequest".into(),
            ),
        ),
    };
    let mut answers = c
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let Some(Ok(answer)) = answers.next().await else {
        panic!("no v1alpha answer")
    };
    assert!(
        matches!(
            answer.message_response,
            Some(ra::server_reflection_response::MessageResponse::FileDescriptorResponse(_))
        ),
        "error details are not described: {answer:?}"
    );
}

#[tokio::test]
async fn reflection_can_be_switched_off() {
    let app = TestApp::builder()
        .env("GRPC_REFLECTION", "false")
        .spawn()
        .await;
    let result = reflect_v1(
        &app,
        r1::server_reflection_request::MessageRequest::ListServices(String::new()),
    )
    .await;
    assert_code(result, Code::Unimplemented);
}

#[tokio::test]
async fn stopping_reports_not_serving_and_lets_in_flight_calls_finish() {
    // Cost 12: a login takes a couple of hundred ms, long enough to stop mid-call.
    let mut app = TestApp::builder().env("BCRYPT_COST", "12").spawn().await;
    app.register("tina", PASSWORD).await.unwrap();
    let mut watch = HealthClient::new(app.channel.clone())
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );

    let client = app.client.clone();
    let login = tokio::spawn(async move {
        client
            .clone()
            .login(pb::LoginRequest {
                username: "tina".into(),
                password: PASSWORD.into(),
                ..Default::default()
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let stopping = {
        let server_done = app.stop();
        tokio::pin!(server_done);
        // NOT_SERVING is announced while the login is still running.
        let next = tokio::select! {
            m = watch.message() => m,
            r = &mut server_done => panic!("server stopped before announcing: {r:?}"),
        };
        assert_eq!(next.unwrap().unwrap().status(), ServingStatus::NotServing);
        drop(watch);
        server_done.await
    };
    assert!(stopping.is_ok(), "{stopping:?}");
    let login = login.await.unwrap().expect("the in-flight login completes");
    assert!(!login.into_inner().access_token.is_empty());
}

//! The client layer: a protected service in front of a real authd.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use authd::client::{
    AuthConfig, AuthContext, AuthInterceptor, AuthLayer, AuthValidator, WatchCredential,
};
use authd::proto::example::v1::greeter_client::GreeterClient;
use authd::proto::example::v1::greeter_server::{Greeter, GreeterServer};
use authd::proto::example::v1::{HelloReply, HelloRequest};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Channel, Server};
use tonic::{Code, Request, Response, Status};
use tonic_types::StatusExt;

use crate::support::proxy::Proxy;
use crate::support::*;

/// Greets the caller the layer let in.
#[derive(Debug, Default)]
struct Hello;

#[tonic::async_trait]
impl Greeter for Hello {
    async fn hello(&self, request: Request<HelloRequest>) -> Result<Response<HelloReply>, Status> {
        let ctx = request
            .extensions()
            .get::<AuthContext>()
            .cloned()
            .ok_or_else(|| Status::internal("no AuthContext"))?;
        Ok(Response::new(HelloReply {
            message: format!("hello {}", request.get_ref().name),
            user_id: ctx.user_id,
            username: ctx.username,
            session_id: ctx.session_id,
            token_checked: ctx.token_checked,
        }))
    }
}

struct Protected {
    client: GreeterClient<Channel>,
    validator: AuthValidator,
    channel: Channel,
}

impl Protected {
    async fn hello(&self, token: Option<&str>) -> Result<HelloReply, Status> {
        let mut request = Request::new(HelloRequest { name: "you".into() });
        if let Some(token) = token {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        self.client
            .clone()
            .hello(request)
            .await
            .map(Response::into_inner)
    }

    async fn wait_watching(&self) {
        let v = self.validator.clone();
        assert!(
            eventually(Duration::from_secs(5), || {
                let v = v.clone();
                async move { v.watching() }
            })
            .await,
            "the revocation stream never came up"
        );
    }
}

/// Serves `Hello` behind the layer, asking the authd at `authd` (with the test servers'
/// watch credential unless `config` has one).
async fn protected_at(authd: SocketAddr, mut config: AuthConfig) -> Protected {
    if config.watch_credential.is_none() {
        config.watch_credential = Some(WatchCredential::new(WATCH_CREDENTIAL));
    }
    let authd = Channel::from_shared(format!("http://{authd}"))
        .unwrap()
        .connect_lazy();
    let layer = AuthLayer::new(authd, config);
    let validator = layer.validator().clone();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_, health) = tonic_health::server::health_reporter();
    tokio::spawn(
        Server::builder()
            .layer(layer)
            .add_service(health)
            .add_service(GreeterServer::new(Hello))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    Protected {
        client: GreeterClient::new(channel.clone()),
        validator,
        channel,
    }
}

async fn protected(app: &TestApp, config: AuthConfig) -> Protected {
    protected_at(app.addr, config).await
}

fn long_cache() -> AuthConfig {
    AuthConfig {
        cache_ttl: Duration::from_secs(60),
        ..AuthConfig::default()
    }
}

#[track_caller]
fn assert_reason(result: Result<HelloReply, Status>, reason: &str) {
    let status = assert_code(result, Code::Unauthenticated);
    let info = status.get_details_error_info().expect("ErrorInfo detail");
    assert_eq!(info.reason, reason, "{status:?}");
}

#[tokio::test]
async fn a_valid_token_reaches_the_handler_with_its_context() {
    let app = TestApp::builder().spawn().await;
    let (user, login) = app.user_with_session("alma").await;
    let svc = protected(&app, AuthConfig::default()).await;
    let reply = svc.hello(Some(&login.access_token)).await.unwrap();
    assert_eq!(reply.message, "hello you");
    assert_eq!(reply.user_id, user.user_id);
    assert_eq!(reply.username, "alma");
    assert_eq!(reply.session_id, login.session_id);
    assert!(reply.token_checked);
    // Health is exempt by default: no token needed.
    let health = tonic_health::pb::health_client::HealthClient::new(svc.channel.clone())
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await;
    assert!(health.is_ok(), "{health:?}");
}

#[tokio::test]
async fn missing_malformed_expired_and_revoked_tokens_are_rejected_with_their_reason() {
    let app = TestApp::builder().spawn().await;
    let (_, login) = app.user_with_session("bert").await;
    let svc = protected(&app, long_cache()).await;

    let missing = assert_code(svc.hello(None).await, Code::Unauthenticated);
    assert!(missing.message().contains("missing"), "{missing:?}");
    assert_reason(
        svc.hello(Some("not-a-jwt")).await,
        "INVALID_REASON_MALFORMED",
    );
    let now = unix(&app.clock);
    let expired = RawClaims {
        exp: Some(now - 120),
        iat: Some(now - 600),
        nbf: Some(now - 600),
        ..RawClaims::good(now)
    }
    .sign(SECRET);
    assert_reason(svc.hello(Some(&expired)).await, "INVALID_REASON_EXPIRED");

    app.logout(&login.access_token).await.unwrap();
    assert_reason(
        svc.hello(Some(&login.access_token)).await,
        "INVALID_REASON_REVOKED",
    );
}

#[tokio::test]
async fn a_repeated_token_is_served_from_the_cache() {
    let redis = OwnRedis::start().await;
    let url = redis.url();
    let app = TestApp::builder().env("REDIS_URL", &url).spawn().await;
    let (_, login) = app.user_with_session("cleo").await;
    let svc = protected(&app, long_cache()).await;
    let checks_before = redis.command_calls("hmget").await;
    for _ in 0..20 {
        svc.hello(Some(&login.access_token)).await.unwrap();
    }
    let stats = svc.validator.stats();
    assert_eq!(stats.authd_calls, 1, "{stats:?}");
    assert_eq!(stats.hits, 19, "{stats:?}");
    // authd itself looked the session up once.
    assert_eq!(redis.command_calls("hmget").await, checks_before + 1);
}

#[tokio::test]
async fn concurrent_requests_with_one_uncached_token_make_one_call() {
    let app = TestApp::builder().spawn().await;
    let (_, login) = app.user_with_session("dina").await;
    let svc = protected(&app, long_cache()).await;
    let calls: Vec<_> = (0..32)
        .map(|_| svc.hello(Some(&login.access_token)))
        .collect();
    for result in futures::future::join_all(calls).await {
        result.unwrap();
    }
    assert_eq!(svc.validator.stats().authd_calls, 1);
}

/// Polls the protected service until it rejects `token`, up to 100 ms.
async fn rejected_within_100ms(svc: &Protected, token: &str) -> Duration {
    let started = Instant::now();
    loop {
        if let Err(status) = svc.hello(Some(token)).await {
            assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "still admitted after 100 ms"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test]
async fn after_logout_the_cached_token_is_rejected_within_100_ms() {
    let app = TestApp::builder().spawn().await;
    let (_, login) = app.user_with_session("emil").await;
    let svc = protected(&app, long_cache()).await;
    svc.wait_watching().await;
    svc.hello(Some(&login.access_token)).await.unwrap(); // cached for 60 s
    app.logout(&login.access_token).await.unwrap();
    let took = rejected_within_100ms(&svc, &login.access_token).await;
    assert!(took < Duration::from_millis(100), "{took:?}");
}

#[tokio::test]
async fn after_a_password_change_the_other_sessions_are_rejected_within_100_ms() {
    let app = TestApp::builder()
        .env("WATCH_HEARTBEAT", "100ms")
        .spawn()
        .await;
    let (_, phone) = app.user_with_session("fern").await;
    let laptop = app.login("fern", PASSWORD).await.unwrap();
    let svc = protected(&app, long_cache()).await;
    svc.wait_watching().await;
    svc.hello(Some(&phone.access_token)).await.unwrap();
    svc.hello(Some(&laptop.access_token)).await.unwrap();
    app.change_password(&laptop.access_token, PASSWORD, "Brand-New-Pass-7")
        .await
        .unwrap();
    rejected_within_100ms(&svc, &phone.access_token).await;
    // The caller's session stays, still from the cache.
    let calls = svc.validator.stats().authd_calls;
    svc.hello(Some(&laptop.access_token)).await.unwrap();
    assert_eq!(svc.validator.stats().authd_calls, calls);
}

#[tokio::test]
async fn with_authd_stopped_the_default_is_unavailable_and_fail_open_admits_unchecked() {
    let mut app = TestApp::builder().spawn().await;
    let (user, login) = app.user_with_session("gina").await;
    let addr = app.addr;
    let closed = protected_at(addr, AuthConfig::default()).await;
    let open = protected_at(
        addr,
        AuthConfig {
            fail_open: true,
            ..AuthConfig::default()
        },
    )
    .await;
    app.stop().await.unwrap();

    assert_code(
        closed.hello(Some(&login.access_token)).await,
        Code::Unavailable,
    );
    let reply = open.hello(Some(&login.access_token)).await.unwrap();
    assert!(!reply.token_checked);
    assert_eq!(reply.user_id, user.user_id);
    // Fail-open still refuses what is visibly bad.
    assert_reason(
        open.hello(Some("garbage")).await,
        "INVALID_REASON_MALFORMED",
    );
}

/// A protected service reaching authd through a proxy, with `token` cached (60 s) and the
/// proxy then cut: the revocation stream is down.
async fn cached_then_cut(app: &TestApp, token: &str, stale_after: Duration) -> (Proxy, Protected) {
    let proxy = Proxy::start(app.addr).await;
    let svc = protected_at(
        proxy.addr,
        AuthConfig {
            cache_ttl: Duration::from_secs(60),
            stale_after,
            ..AuthConfig::default()
        },
    )
    .await;
    svc.wait_watching().await;
    svc.hello(Some(token)).await.unwrap();
    proxy.refuse();
    let v = svc.validator.clone();
    assert!(
        eventually(Duration::from_secs(5), || {
            let v = v.clone();
            async move { !v.watching() }
        })
        .await,
        "the stream did not notice the cut"
    );
    (proxy, svc)
}

#[tokio::test]
async fn a_revocation_issued_while_the_stream_is_down_is_not_lost() {
    let app = TestApp::builder().spawn().await;
    let (_, login) = app.user_with_session("hugo").await;
    // Only the stream can drop this cached answer: no staleness bound to hide a loss.
    let (proxy, svc) = cached_then_cut(&app, &login.access_token, Duration::from_secs(3600)).await;
    // Revoked directly at authd while the layer cannot hear about it.
    app.logout(&login.access_token).await.unwrap();
    let applied = svc.validator.stats().revocations;
    let resets = svc.validator.stats().resets;
    proxy.heal();

    let v = svc.validator.clone();
    assert!(
        eventually(Duration::from_secs(10), || {
            let v = v.clone();
            async move { v.stats().revocations > applied }
        })
        .await,
        "the missed revocation was never replayed"
    );
    // Replayed as the revocation itself, not papered over with a reset.
    assert_eq!(svc.validator.stats().resets, resets);
    assert_reason(
        svc.hello(Some(&login.access_token)).await,
        "INVALID_REASON_REVOKED",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_interceptor_admits_valid_tokens_and_rejects_bad_ones() {
    let app = TestApp::builder().spawn().await;
    let (user, login) = app.user_with_session("ines").await;
    let authd = Channel::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .connect_lazy();
    let validator = AuthValidator::new(
        authd,
        AuthConfig {
            watch_credential: Some(WatchCredential::new(WATCH_CREDENTIAL)),
            ..AuthConfig::default()
        },
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        Server::builder()
            .add_service(GreeterServer::with_interceptor(
                Hello,
                AuthInterceptor::new(validator.clone()),
            ))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let svc = Protected {
        client: GreeterClient::new(channel.clone()),
        validator,
        channel,
    };
    for _ in 0..2 {
        let reply = svc.hello(Some(&login.access_token)).await.unwrap();
        assert_eq!(reply.user_id, user.user_id);
    }
    assert_eq!(svc.validator.stats().authd_calls, 1);
    assert_reason(svc.hello(Some("nope")).await, "INVALID_REASON_MALFORMED");
    assert_code(svc.hello(None).await, Code::Unauthenticated);
}

#[tokio::test]
async fn a_logout_on_another_authd_instance_reaches_the_layer_too() {
    let a = TestApp::builder().spawn().await;
    // A second instance on the same database and Redis keys.
    let b = TestApp::builder()
        .envs(&[
            ("DATABASE_URL", &a.db_url),
            ("REDIS_KEY_PREFIX", &a.key_prefix),
        ])
        .spawn()
        .await;
    let (_, login) = a.user_with_session("jona").await;
    let svc = protected(&a, long_cache()).await;
    svc.wait_watching().await;
    svc.hello(Some(&login.access_token)).await.unwrap();
    b.logout(&login.access_token).await.unwrap();
    rejected_within_100ms(&svc, &login.access_token).await;
}

#[tokio::test]
async fn while_the_stream_is_down_old_cached_answers_are_not_trusted() {
    let app = TestApp::builder().spawn().await;
    let (_, login) = app.user_with_session("kurt").await;
    let (proxy, svc) = cached_then_cut(&app, &login.access_token, Duration::from_millis(300)).await;
    // Past the bound, the answer is checked again, and authd cannot be reached.
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_code(
        svc.hello(Some(&login.access_token)).await,
        Code::Unavailable,
    );
    // Back up: checked again, admitted, cached.
    proxy.heal();
    let ok = eventually(Duration::from_secs(10), || async {
        svc.hello(Some(&login.access_token)).await.is_ok()
    })
    .await;
    assert!(ok);
}

//! What the client layer costs per request, in one run: no layer, a cache hit, a cache
//! miss (a real ValidateToken to a real authd), both inside the tower stack (the layer's
//! own cost) and over gRPC on loopback (what a protected service sees).
//!
//! ```sh
//! cargo bench --bench auth_layer
//! ```
//!
//! authd runs in-process with the settings of the environment (so `DB_*`/`REDIS_*` point
//! it at MySQL and Redis; with none, embedded storage in a temporary folder).

use std::convert::Infallible;
use std::time::{Duration, Instant};

use authd::client::{AuthConfig, AuthContext, AuthLayer, WatchCredential};
use authd::proto::auth::v1 as pb;
use authd::proto::auth::v1::auth_service_client::AuthServiceClient;
use authd::proto::example::v1::greeter_client::GreeterClient;
use authd::proto::example::v1::greeter_server::{Greeter, GreeterServer};
use authd::proto::example::v1::{HelloReply, HelloRequest};
use authd::{Application, Config};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Channel, Server};
use tonic::{Request, Response, Status};
use tower::{Layer, Service, ServiceExt};

const PASSWORD: &str = "Bench-Pass-2026!";
const HITS: usize = 200_000;
const MISSES: usize = 2_000;
const GRPC_CALLS: usize = 10_000;

#[derive(Debug, Default, Clone)]
struct Hello;

#[tonic::async_trait]
impl Greeter for Hello {
    async fn hello(&self, request: Request<HelloRequest>) -> Result<Response<HelloReply>, Status> {
        let user_id = request
            .extensions()
            .get::<AuthContext>()
            .map(|c| c.user_id.clone())
            .unwrap_or_default();
        Ok(Response::new(HelloReply {
            user_id,
            ..Default::default()
        }))
    }
}

/// Per-request figures in microseconds.
struct Figures {
    name: &'static str,
    samples: Vec<u64>,
}

impl Figures {
    fn row(&mut self) -> String {
        self.samples.sort_unstable();
        let n = self.samples.len().max(1);
        let mean = self.samples.iter().sum::<u64>() as f64 / n as f64 / 1000.0;
        let pct = |p: f64| self.samples[((n as f64 * p) as usize).min(n - 1)] as f64 / 1000.0;
        format!(
            "| {} | {} | {:.2} | {:.2} | {:.2} |",
            self.name,
            n,
            mean,
            pct(0.5),
            pct(0.99)
        )
    }
}

fn request(token: &str) -> http::Request<tonic::body::Body> {
    http::Request::builder()
        .uri("/example.v1.Greeter/Hello")
        .header("authorization", format!("Bearer {token}"))
        .body(tonic::body::Body::default())
        .unwrap_or_default()
}

async fn time<F, Fut>(name: &'static str, n: usize, mut f: F) -> Figures
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        f(i).await;
        samples.push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
    }
    Figures { name, samples }
}

fn main() -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run())
}

/// What the benchmark's authd accepts from the layer's revocation watcher.
const WATCH_CREDENTIAL: &str = "bench-watch-credential-0123456789abcdef";

/// The layer's defaults, following authd's revocation stream.
fn watching() -> AuthConfig {
    AuthConfig {
        watch_credential: Some(WatchCredential::new(WATCH_CREDENTIAL)),
        ..AuthConfig::default()
    }
}

async fn run() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("authd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut vars: Vec<(String, String)> = std::env::vars().collect();
    vars.push(("GRPC_ADDR".into(), "127.0.0.1:0".into()));
    vars.push(("BCRYPT_COST".into(), "4".into()));
    vars.push(("MAX_SESSIONS_PER_USER".into(), "0".into()));
    vars.push(("WATCH_CREDENTIALS".into(), WATCH_CREDENTIAL.into()));
    if !vars.iter().any(|(k, _)| k == "SQLITE_PATH") {
        vars.push((
            "SQLITE_PATH".into(),
            dir.join("users.db").display().to_string(),
        ));
    }
    let config = Config::from_vars(vars)?;
    let storage = format!(
        "{} + {}",
        config.users.describe(),
        config.sessions.describe()
    );
    let app = Application::build(config).await?;
    let authd_addr = app.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until(async {
        let _ = stopped.await;
    }));

    // A user and enough sessions for the misses.
    let authd = Channel::from_shared(format!("http://{authd_addr}"))?
        .connect()
        .await?;
    let mut client = AuthServiceClient::new(authd.clone());
    let username = format!("bench{}", std::process::id());
    client
        .register(pb::RegisterRequest {
            username: username.clone(),
            password: PASSWORD.into(),
        })
        .await?;
    let mut tokens = Vec::with_capacity(MISSES + 1);
    for _ in 0..=MISSES {
        let login = client
            .login(pb::LoginRequest {
                username: username.clone(),
                password: PASSWORD.into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        tokens.push(login.access_token);
    }
    let hot = tokens[0].clone();

    // 1. Inside the tower stack: the layer around a service that answers at once.
    let inner = tower::service_fn(|_req: http::Request<tonic::body::Body>| async {
        Ok::<_, Infallible>(http::Response::new(tonic::body::Body::default()))
    });
    let layer = AuthLayer::new(
        authd.clone(),
        AuthConfig {
            cache_ttl: Duration::from_secs(600),
            ..watching()
        },
    );
    let guarded = layer.layer(inner);
    anyhow::ensure!(
        admitted(guarded.clone(), request(&hot)).await,
        "the layer refused a valid token"
    );
    // Warm up: first connection, the hot token cached.
    for _ in 0..1000 {
        let _ = guarded.clone().oneshot(request(&hot)).await;
        let _ = inner.oneshot(request(&hot)).await;
    }
    let mut rows = vec![
        time("tower: no layer", HITS, |_| {
            let svc = inner;
            let req = request(&hot);
            async move {
                let _ = svc.oneshot(req).await;
            }
        })
        .await,
        time("tower: layer, cache hit", HITS, |_| {
            let svc = guarded.clone();
            let req = request(&hot);
            async move {
                let _ = svc.oneshot(req).await;
            }
        })
        .await,
        time("tower: layer, cache miss (ValidateToken)", MISSES, |i| {
            let svc = guarded.clone();
            let req = request(&tokens[i + 1]);
            async move {
                let _ = svc.oneshot(req).await;
            }
        })
        .await,
    ];
    let stats = layer.validator().stats();

    // 2. Over gRPC on loopback: the same Greeter with and without the layer.
    let plain = serve(None).await?;
    let protected = serve(Some(AuthLayer::new(authd.clone(), watching()))).await?;
    for (name, addr) in [
        ("gRPC: no layer", plain),
        ("gRPC: layer, cache hit", protected),
    ] {
        let channel = Channel::from_shared(format!("http://{addr}"))?
            .connect()
            .await?;
        let greeter = GreeterClient::new(channel);
        let call = |greeter: GreeterClient<Channel>| {
            let mut req = Request::new(HelloRequest::default());
            if let Ok(v) = format!("Bearer {hot}").parse() {
                req.metadata_mut().insert("authorization", v);
            }
            async move {
                let _ = greeter.clone().hello(req).await;
            }
        };
        for _ in 0..1000 {
            call(greeter.clone()).await;
        }
        rows.push(time(name, GRPC_CALLS, |_| call(greeter.clone())).await);
    }

    println!("authd storage: {storage}; cores: {}", num_cores());
    println!("| what | requests | mean µs | p50 µs | p99 µs |");
    println!("|---|---|---|---|---|");
    for row in &mut rows {
        println!("{}", row.row());
    }
    println!(
        "(layer in the tower run: {} cache hits, {} calls to authd)",
        stats.hits, stats.authd_calls
    );

    let _ = stop.send(());
    let _ = server.await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Whether the layer let the request through to the inner service.
async fn admitted<S>(svc: S, req: http::Request<tonic::body::Body>) -> bool
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<tonic::body::Body>>,
{
    match svc.oneshot(req).await {
        Ok(response) => !response.headers().contains_key("grpc-status"),
        Err(_) => false,
    }
}

async fn serve(layer: Option<AuthLayer>) -> anyhow::Result<std::net::SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let incoming = TcpListenerStream::new(listener);
    match layer {
        Some(layer) => {
            tokio::spawn(
                Server::builder()
                    .layer(layer)
                    .add_service(GreeterServer::new(Hello))
                    .serve_with_incoming(incoming),
            );
        }
        None => {
            tokio::spawn(
                Server::builder()
                    .add_service(GreeterServer::new(Hello))
                    .serve_with_incoming(incoming),
            );
        }
    }
    Ok(addr)
}

fn num_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

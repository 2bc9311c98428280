//! Token checks, side by side in one run: verifying a signature per algorithm (in
//! process), and ValidateToken per algorithm next to Envoy's Check and a health check,
//! over gRPC on loopback with the load generator on the same machine.
//!
//! ```sh
//! cargo bench --bench validate            # AUTHD_BENCH_SECONDS=3 per scenario
//! ```
//!
//! authd runs in-process with the environment's settings plus the algorithm under test
//! (with no `DB_*`/`REDIS_*`, embedded storage in a temporary folder).

use std::time::{Duration, Instant};

use authd::proto::auth::v1 as pb;
use authd::proto::auth::v1::auth_service_client::AuthServiceClient;
use authd::{Application, Config};
use envoy_types::ext_authz::v3::pb::CheckRequest;
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
    HttpRequest, Request as AttrRequest,
};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use tonic::transport::Channel;

const PASSWORD: &str = "Bench-Pass-2026!";
const IN_FLIGHT: usize = 32;

struct Run {
    name: String,
    calls: usize,
    errors: usize,
    seconds: f64,
    latencies_ns: Vec<u64>,
}

impl Run {
    fn row(&mut self) -> String {
        self.latencies_ns.sort_unstable();
        let n = self.latencies_ns.len().max(1);
        let pct = |p: f64| self.latencies_ns[((n as f64 * p) as usize).min(n - 1)] as f64 / 1000.0;
        format!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {} |",
            self.name,
            self.calls as f64 / self.seconds,
            pct(0.5),
            pct(0.99),
            pct(0.999),
            self.errors
        )
    }
}

/// Closed loop: `IN_FLIGHT` callers, each sending its next request when the last answers.
async fn closed_loop<F, Fut>(name: String, seconds: f64, call: F) -> Run
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    // Warm-up.
    for _ in 0..200 {
        call().await;
    }
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..IN_FLIGHT {
        let call = call.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0;
            while Instant::now() < deadline {
                let t = Instant::now();
                if !call().await {
                    errors += 1;
                }
                lat.push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
            }
            (lat, errors)
        }));
    }
    let mut latencies_ns = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((lat, e)) = t.await {
            latencies_ns.extend(lat);
            errors += e;
        }
    }
    Run {
        name,
        calls: latencies_ns.len(),
        errors,
        seconds: started.elapsed().as_secs_f64(),
        latencies_ns,
    }
}

fn key(name: &str) -> String {
    format!("{}/tests/keys/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn config(alg: &str, file: &str, dir: &std::path::Path) -> anyhow::Result<Config> {
    let mut vars: Vec<(String, String)> = std::env::vars().collect();
    vars.push(("GRPC_ADDR".into(), "127.0.0.1:0".into()));
    vars.push(("BCRYPT_COST".into(), "4".into()));
    vars.push(("JWT_ALGORITHM".into(), alg.into()));
    if !file.is_empty() {
        vars.push(("JWT_PRIVATE_KEY_FILE".into(), key(file)));
    }
    if !vars.iter().any(|(k, _)| k == "SQLITE_PATH") {
        vars.push((
            "SQLITE_PATH".into(),
            dir.join(format!("{alg}.db")).display().to_string(),
        ));
    }
    Ok(Config::from_vars(vars)?)
}

fn main() -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let seconds: f64 = std::env::var("AUTHD_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let dir = std::env::temp_dir().join(format!("authd-bench-validate-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let algorithms = [
        ("HS256", ""),
        ("EdDSA", "ed25519.pem"),
        ("ES256", "p256.pem"),
        ("RS256", "rsa.pem"),
    ];

    // 1. Signature and claims alone, in process.
    println!("| algorithm | verify µs (mean of 20,000) |");
    println!("|---|---|");
    for (alg, file) in algorithms {
        let config = config(alg, file, &dir)?;
        let keys = std::sync::Arc::clone(&config.keys);
        let now = authd::clock::Clock::unix_seconds(&authd::clock::SystemClock);
        let token = keys.issue("user", "bench", "session", now)?.token;
        let n = 20_000;
        let t = Instant::now();
        for _ in 0..n {
            let _ = std::hint::black_box(keys.verify(std::hint::black_box(&token), now));
        }
        println!(
            "| {alg} | {:.1} |",
            t.elapsed().as_secs_f64() * 1e6 / n as f64
        );
    }

    // 2. Over gRPC, closed loop, IN_FLIGHT at a time.
    let mut runs = Vec::new();
    let mut storage = String::new();
    for (alg, file) in algorithms {
        let config = config(alg, file, &dir)?;
        storage = format!(
            "{} + {}",
            config.users.describe(),
            config.sessions.describe()
        );
        let app = Application::build(config).await?;
        let addr = app.local_addr();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until(async {
            let _ = stopped.await;
        }));
        let channel = Channel::from_shared(format!("http://{addr}"))?
            .connect()
            .await?;
        let mut client = AuthServiceClient::new(channel.clone());
        let username = format!("bench{}{}", alg.to_lowercase(), std::process::id());
        client
            .register(pb::RegisterRequest {
                username: username.clone(),
                password: PASSWORD.into(),
            })
            .await?;
        let token = client
            .login(pb::LoginRequest {
                username,
                password: PASSWORD.into(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .access_token;

        if alg == "HS256" {
            let health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
            runs.push(
                closed_loop("Health/Check (baseline)".into(), seconds, move || {
                    let mut h = health.clone();
                    async move {
                        h.check(tonic_health::pb::HealthCheckRequest::default())
                            .await
                            .is_ok()
                    }
                })
                .await,
            );
        }
        let c = client.clone();
        let t = token.clone();
        runs.push(
            closed_loop(format!("ValidateToken {alg}"), seconds, move || {
                let mut c = c.clone();
                let token = t.clone();
                async move {
                    c.validate_token(pb::ValidateTokenRequest {
                        token,
                        ..Default::default()
                    })
                    .await
                    .is_ok_and(|r| r.get_ref().valid)
                }
            })
            .await,
        );
        if alg == "HS256" {
            let authz = AuthorizationClient::new(channel.clone());
            let bearer = format!("Bearer {token}");
            runs.push(
                closed_loop("Envoy Check HS256".into(), seconds, move || {
                    let mut a = authz.clone();
                    let request = check_request(&bearer);
                    async move {
                        a.check(request)
                            .await
                            .is_ok_and(|r| r.get_ref().status.as_ref().is_some_and(|s| s.code == 0))
                    }
                })
                .await,
            );
        }
        let _ = stop.send(());
        let _ = server.await;
    }

    println!();
    println!(
        "authd storage: {storage}; cores: {}; {IN_FLIGHT} in flight; {seconds} s each",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!("| scenario | calls/s | p50 µs | p99 µs | p99.9 µs | errors |");
    println!("|---|---|---|---|---|---|");
    for run in &mut runs {
        println!("{}", run.row());
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn check_request(bearer: &str) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(AttrRequest {
                http: Some(HttpRequest {
                    method: "GET".into(),
                    path: "/".into(),
                    headers: [("authorization".to_owned(), bearer.to_owned())].into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

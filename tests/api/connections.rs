//! Connections that never start (no HTTP/2 preface, no request head, no TLS handshake)
//! are closed after `CONNECTION_PREFACE_TIMEOUT`, connections over `MAX_CONNECTIONS` /
//! `HTTP_MAX_CONNECTIONS` are closed at once, and through both the service keeps
//! answering: thousands of silent sockets once held authd's descriptors and memory
//! forever, and under a low descriptor limit starved every new call and `/healthz`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use authd::proto::auth::v1 as pb;
use authd::proto::auth::v1::auth_service_client::AuthServiceClient;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::support::binary::Authd;
use crate::support::raw::{RawConn, VALIDATE, field, message};
use crate::support::tls::{Ca, PemDir, health_over_tls};
use crate::support::*;

/// How long a normal call or probe may take here: generous, so a loaded machine
/// does not fail the test; a starved server never answers at all.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// `n` TCP connections to `addr` that send nothing.
async fn open_silent(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    futures::stream::iter(0..n)
        .map(|_| async move { TcpStream::connect(addr).await.expect("connect") })
        .buffer_unordered(100)
        .collect()
        .await
}

/// How many of `streams` the server closes within `within` (EOF or reset; anything
/// the server sends first is read past).
async fn closed_within<S>(streams: Vec<S>, within: Duration) -> usize
where
    S: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    let deadline = tokio::time::Instant::now() + within;
    let waits = streams.into_iter().map(|mut s| {
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
                    Ok(Ok(0) | Err(_)) => return true,
                    Ok(Ok(_)) => {}
                    Err(_) => return false,
                }
            }
        })
    });
    futures::future::join_all(waits)
        .await
        .into_iter()
        .filter(|closed| matches!(closed, Ok(true)))
        .count()
}

/// Whether `stream` is still open: nothing read and no EOF for a moment.
async fn still_open(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1];
    tokio::time::timeout(Duration::from_millis(300), stream.read(&mut buf))
        .await
        .is_err()
}

/// A new connection to `addr` whose calls must answer within [`ANSWER_WITHIN`].
async fn fresh_channel(addr: SocketAddr) -> Result<Channel, tonic::Status> {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(ANSWER_WITHIN)
        .timeout(ANSWER_WITHIN)
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connect: {e:?}")))
}

/// gRPC health on a new connection, within [`ANSWER_WITHIN`].
async fn fresh_health(addr: SocketAddr) -> Result<ServingStatus, String> {
    let channel = fresh_channel(addr).await.map_err(|s| format!("{s:?}"))?;
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .map_err(|s| format!("health: {s:?}"))?;
    Ok(answer.into_inner().status())
}

/// ValidateToken on a new connection, within [`ANSWER_WITHIN`].
async fn fresh_validate(addr: SocketAddr, token: &str) -> Result<bool, tonic::Status> {
    AuthServiceClient::new(fresh_channel(addr).await?)
        .validate_token(pb::ValidateTokenRequest {
            token: token.into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().valid)
}

/// `GET /healthz` on a new connection: the status code, or why there was none within
/// [`ANSWER_WITHIN`].
async fn fresh_healthz(addr: SocketAddr) -> Result<u16, String> {
    let get = async {
        let mut tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: authd\r\nConnection: close\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut answer = String::new();
        tcp.read_to_string(&mut answer)
            .await
            .map_err(|e| e.to_string())?;
        answer
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| format!("no HTTP answer: {answer:?}"))
    };
    tokio::time::timeout(ANSWER_WITHIN, get)
        .await
        .map_err(|_| "no answer in time".to_owned())?
}

/// The HTTP address the binary logged.
fn logged_http_addr(authd: &Authd) -> SocketAddr {
    authd
        .log
        .iter()
        .find_map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            v["fields"]["http_addr"].as_str()?.parse().ok()
        })
        .expect("the HTTP address in the log")
}

/// The binary (run by `wrapper`, with `env` and the HTTP listener on), a client
/// connected to it, and the access token of a user logged in through that client.
async fn binary_with_a_session(
    wrapper: &[&str],
    env: &[(&str, &str)],
) -> (Authd, AuthServiceClient<Channel>, String) {
    let mut env = env.to_vec();
    env.push(("HTTP_ADDR", "127.0.0.1:0"));
    let authd = tokio::task::block_in_place(|| Authd::start_under(wrapper, &env));
    let client = AuthServiceClient::new(
        Channel::from_shared(format!("http://{}", authd.addr))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    register_on(&client, "patient", PASSWORD).await.unwrap();
    let token = login_on(&client, "patient", PASSWORD)
        .await
        .unwrap()
        .access_token;
    (authd, client, token)
}

/// Raises this process's open-file limit to its hard limit (children inherit it) and
/// returns it.
fn raise_fd_limit() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    limit.current = limit.maximum;
    setrlimit(Resource::Nofile, limit).expect("raise RLIMIT_NOFILE");
    limit.current.unwrap_or(u64::MAX)
}

/// Connections the server has counted off `listener`'s queue so far, admitted or
/// refused.
async fn counted(http: SocketAddr, listener: &str) -> f64 {
    let (status, page) = http_get(http, "/metrics").await;
    assert_eq!(status, 200);
    [
        "authd_connections_accepted_total",
        "authd_connections_refused_total",
    ]
    .iter()
    .map(|name| metric(&page, name, &[("listener", listener)]))
    .sum()
}

/// `n` silent connections to `addr`, opened a thousand at a time, each thousand once
/// the server (process `pid`) has taken the one before off its queue: past the listen
/// backlog the kernel would drop connections the server never sees (and so cannot
/// close). Taken is what its counters say, or its descriptors for a server that
/// counts none (and closes none).
async fn open_silent_paced(
    addr: SocketAddr,
    n: usize,
    pid: u32,
    http: SocketAddr,
    listener: &str,
) -> Vec<TcpStream> {
    let (counted_before, fds_before) = (counted(http, listener).await, rss_and_fds(pid).1);
    let taken = || async {
        let by_count = counted(http, listener).await - counted_before;
        let by_fds = rss_and_fds(pid).1.saturating_sub(fds_before) as f64;
        by_count.max(by_fds)
    };
    let mut silent = Vec::with_capacity(n);
    while silent.len() < n {
        let batch = (n - silent.len()).min(1000);
        silent.extend(open_silent(addr, batch).await);
        let target = silent.len() as f64;
        let caught_up = eventually(Duration::from_secs(20), || async {
            taken().await >= target
        })
        .await;
        assert!(
            caught_up,
            "the {listener} listener took {} of {target} connections",
            taken().await
        );
    }
    silent
}

/// Resident memory (KiB) and open descriptors of a process.
fn rss_and_fds(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    (rss, fds)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_silent_sockets_are_closed_and_the_service_answers_meanwhile() {
    // This process holds the silent sockets (authd, a child, holds its own ends), plus
    // what the rest of the suite uses.
    let limit = raise_fd_limit();
    let n = usize::try_from(limit.saturating_sub(2_000).min(10_000)).unwrap();
    if n < 10_000 {
        eprintln!("RLIMIT_NOFILE hard limit {limit}: {n} silent sockets instead of 10000");
    }
    // The default CONNECTION_PREFACE_TIMEOUT (5s). The caps share the descriptor
    // budget, an eighth of it to HTTP: both are set here so that each port takes
    // 10,000 and the timeout, not a cap, is what this test sees.
    let timeout = Duration::from_secs(5);
    let (authd, mut client, token) = binary_with_a_session(
        &[],
        &[
            ("MAX_CONNECTIONS", "12000"),
            ("HTTP_MAX_CONNECTIONS", "12000"),
        ],
    )
    .await;
    let pid = authd.child.id();
    let grpc: SocketAddr = authd.addr.parse().unwrap();
    let http = logged_http_addr(&authd);
    let (idle_rss, idle_fds) = rss_and_fds(pid);

    for (port, addr, listener) in [("gRPC", grpc, "grpc"), ("HTTP", http, "http")] {
        let opening = Instant::now();
        let silent = open_silent_paced(addr, n, pid, http, listener).await;
        let opened = opening.elapsed();
        let (rss, fds) = rss_and_fds(pid);
        // A fresh connection on either port is still served while they are held.
        assert_eq!(
            fresh_health(grpc).await,
            Ok(ServingStatus::Serving),
            "{port}"
        );
        assert!(fresh_validate(grpc, &token).await.unwrap(), "{port}");
        assert_eq!(fresh_healthz(http).await, Ok(200), "{port}");
        // ...and the established one.
        let v = client
            .validate_token(pb::ValidateTokenRequest {
                token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(v.into_inner().valid);
        let answered = opening.elapsed();
        let closed = closed_within(silent, timeout + Duration::from_secs(15)).await;
        let (rss_after, fds_after) = rss_and_fds(pid);
        eprintln!(
            "{port}: {n} silent sockets opened in {opened:?} (authd: RSS {idle_rss} KiB and \
             {idle_fds} fds idle, {rss} KiB and {fds} fds with them open); fresh calls \
             answered by {answered:?}; {closed} closed by the server by {:?} (then {rss_after} \
             KiB, {fds_after} fds)",
            opening.elapsed()
        );
        assert_eq!(closed, n, "{port}: silent sockets left open");
    }
    assert_eq!(authd.terminate().await, 0);
}

#[tokio::test]
async fn a_silent_or_half_started_connection_is_closed_after_the_preface_timeout() {
    let app = Backend::Embedded
        .app()
        .env("CONNECTION_PREFACE_TIMEOUT", "1s")
        .spawn()
        .await;
    let http = app.http_addr.unwrap();
    let timed_out_before = metric(
        &app.scrape().await,
        "authd_connections_closed_total",
        &[("reason", "timeout")],
    );
    let mut grpc_silent = open_silent(app.addr, 50).await;
    let mut http_silent = open_silent(http, 50).await;
    // Half a preface, half a request head: slow, never finished.
    let mut half_preface = TcpStream::connect(app.addr).await.unwrap();
    half_preface.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let mut preface_only = TcpStream::connect(app.addr).await.unwrap();
    preface_only
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut half_head = TcpStream::connect(http).await.unwrap();
    half_head
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: authd\r\n")
        .await
        .unwrap();
    grpc_silent.extend([half_preface, preface_only]);
    http_silent.push(half_head);

    assert_eq!(fresh_health(app.addr).await, Ok(ServingStatus::Serving));
    assert_eq!(fresh_healthz(http).await, Ok(200));
    let (g, h) = (grpc_silent.len(), http_silent.len());
    assert_eq!(closed_within(grpc_silent, Duration::from_secs(6)).await, g);
    assert_eq!(closed_within(http_silent, Duration::from_secs(6)).await, h);
    let timed_out = metric(
        &app.scrape().await,
        "authd_connections_closed_total",
        &[("reason", "timeout")],
    );
    assert!(
        timed_out - timed_out_before >= (g + h) as f64,
        "{timed_out} - {timed_out_before} timeouts counted for {g} + {h}"
    );
    // A client that starts promptly is untouched by the timeout: its connection (one
    // that does not reconnect behind the test's back) is still served after idling
    // several timeouts long.
    let mut conn = RawConn::open(app.addr).await;
    let request = message(&field(1, b"not-a-token"));
    assert_eq!(
        conn.call(VALIDATE, &[], request.clone()).await.code,
        Some(Code::Ok)
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(conn.call(VALIDATE, &[], request).await.code, Some(Code::Ok));
}

#[tokio::test]
async fn a_tls_connection_that_stays_silent_after_or_during_the_handshake_is_closed() {
    let ca = Ca::new("authd test CA");
    let dir = PemDir::new();
    let (cert, key) = dir.server(&ca.server());
    let app = Backend::Embedded
        .app()
        .envs(&[
            ("TLS_CERT_FILE", &cert),
            ("TLS_KEY_FILE", &key),
            ("CONNECTION_PREFACE_TIMEOUT", "1s"),
        ])
        .spawn()
        .await;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(
            rustls::pki_types::pem::PemObject::from_pem_slice(ca.pem().as_bytes()).expect("CA PEM"),
        )
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut handshaken = Vec::new();
    for _ in 0..20 {
        let tcp = TcpStream::connect(app.addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        handshaken.push(connector.connect(name, tcp).await.expect("TLS handshake"));
    }
    // And some that never begin the handshake.
    let no_handshake = open_silent(app.addr, 20).await;

    assert_eq!(
        health_over_tls(app.addr, &ca.pem(), None).await,
        Ok(ServingStatus::Serving)
    );
    assert_eq!(
        closed_within(handshaken, Duration::from_secs(5)).await,
        20,
        "TLS connections silent after the handshake left open"
    );
    assert_eq!(
        closed_within(no_handshake, Duration::from_secs(5)).await,
        20,
        "connections that never began the handshake left open"
    );
    assert_eq!(
        health_over_tls(app.addr, &ca.pem(), None).await,
        Ok(ServingStatus::Serving)
    );
}

#[tokio::test]
async fn connections_over_the_cap_are_closed_at_once_and_the_service_recovers() {
    // A long preface timeout: here only the cap closes anything.
    let app = Backend::Embedded
        .app()
        .envs(&[
            ("MAX_CONNECTIONS", "20"),
            ("HTTP_MAX_CONNECTIONS", "4"),
            ("CONNECTION_PREFACE_TIMEOUT", "60s"),
        ])
        .spawn()
        .await;
    let http = app.http_addr.unwrap();
    let refused = |page: &str, listener| {
        metric(
            page,
            "authd_connections_refused_total",
            &[("listener", listener)],
        )
    };
    let page = app.scrape().await;
    let (grpc_before, http_before) = (refused(&page, "grpc"), refused(&page, "http"));
    // The test's own channel takes one place.
    assert!(!app.validate("not-a-token").await.unwrap().valid);

    let mut held = open_silent(app.addr, 19).await;
    let mut held_http = open_silent(http, 4).await;
    // Accepted in order: the places are taken before the excess arrives.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let excess = open_silent(app.addr, 10).await;
    let excess_http = open_silent(http, 10).await;
    assert_eq!(closed_within(excess, Duration::from_secs(2)).await, 10);
    assert_eq!(closed_within(excess_http, Duration::from_secs(2)).await, 10);
    for s in held.iter_mut().chain(held_http.iter_mut()) {
        assert!(still_open(s).await, "a connection under the cap was closed");
    }
    // New connections are refused, not queued; the one already open is served.
    // Closed at once: the client hears the connection end, not a deadline.
    let refused_call = fresh_validate(app.addr, "not-a-token").await;
    let code = refused_call.map(|_| "served").map_err(|s| s.code());
    assert!(
        matches!(code, Err(Code::Unavailable | Code::Cancelled)),
        "{code:?}"
    );
    assert!(fresh_healthz(http).await.is_err());
    assert!(!app.validate("not-a-token").await.unwrap().valid);

    drop(held);
    drop(held_http);
    assert!(
        eventually(ANSWER_WITHIN, || async {
            fresh_validate(app.addr, "not-a-token").await.is_ok()
        })
        .await,
        "gRPC did not recover once the connections closed"
    );
    assert!(
        eventually(ANSWER_WITHIN, || async {
            fresh_healthz(http).await == Ok(200)
        })
        .await,
        "HTTP did not recover once the connections closed"
    );
    let page = app.scrape().await;
    assert!(refused(&page, "grpc") - grpc_before >= 10.0);
    assert!(refused(&page, "http") - http_before >= 10.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_low_descriptor_limit_silent_sockets_starve_neither_calls_nor_healthz() {
    let (authd, mut client, token) = binary_with_a_session(
        &["prlimit", "--nofile=200:200", "--"],
        &[("CONNECTION_PREFACE_TIMEOUT", "2s")],
    )
    .await;
    let grpc: SocketAddr = authd.addr.parse().unwrap();
    let http = logged_http_addr(&authd);

    let silent = open_silent(grpc, 300).await;
    assert_eq!(fresh_healthz(http).await, Ok(200));
    let v = tokio::time::timeout(
        ANSWER_WITHIN,
        client.validate_token(pb::ValidateTokenRequest {
            token: token.clone(),
            ..Default::default()
        }),
    )
    .await
    .expect("ValidateToken on an open connection answers")
    .unwrap();
    assert!(v.into_inner().valid);
    // Logins still reach the database (the cap left it descriptors).
    tokio::time::timeout(ANSWER_WITHIN, login_on(&client, "patient", PASSWORD))
        .await
        .expect("Login answers")
        .unwrap();
    // Once the silent ones are closed, new connections are served again.
    assert!(
        eventually(Duration::from_secs(10), || async {
            matches!(fresh_validate(grpc, &token).await, Ok(true))
        })
        .await,
        "new connections still starved"
    );
    assert_eq!(closed_within(silent, Duration::from_secs(10)).await, 300);
    assert_eq!(authd.terminate().await, 0);
}

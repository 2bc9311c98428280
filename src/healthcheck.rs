//! `authd healthcheck`: asks the server on this machine whether it is SERVING, for
//! container health checks (Docker's `HEALTHCHECK`, compose). It reads the same settings
//! as the server, so it knows the port.
//!
//! Plaintext gRPC is asked with `grpc.health.v1.Health/Check`. With TLS on, a client
//! certificate could be required (mTLS), so the HTTP listener's `/healthz`, which gives
//! the same answer, is asked instead.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::config::Config;

/// How long the whole check may take.
pub const TIMEOUT: Duration = Duration::from_secs(3);

/// `Ok` when the local server answers SERVING; otherwise what it said or why it could
/// not be asked.
pub async fn check(config: &Config) -> anyhow::Result<()> {
    tokio::time::timeout(TIMEOUT, ask(config))
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {TIMEOUT:?}"))?
}

async fn ask(config: &Config) -> anyhow::Result<()> {
    if config.tls.is_none() {
        return ask_grpc(local(config.grpc_addr)).await;
    }
    let Some(http_addr) = config.http_addr else {
        anyhow::bail!(
            "TLS is on and HTTP_ADDR is empty: nothing to ask without a client certificate"
        );
    };
    ask_http(local(http_addr)).await
}

/// The address to reach a listener bound to `addr` from this machine.
fn local(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    }
}

async fn ask_grpc(addr: SocketAddr) -> anyhow::Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("health check failed: {:?} {}", s.code(), s.message()))?;
    match answer.into_inner().status() {
        ServingStatus::Serving => Ok(()),
        other => anyhow::bail!("{}", other.as_str_name()),
    }
}

async fn ask_http(addr: SocketAddr) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream
        .write_all(
            format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut answer = Vec::new();
    stream.take(4096).read_to_end(&mut answer).await?;
    let answer = String::from_utf8_lossy(&answer);
    let status_line = answer.lines().next().unwrap_or_default();
    if status_line.split_whitespace().nth(1) == Some("200") {
        Ok(())
    } else {
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default().trim();
        anyhow::bail!("/healthz answered {status_line:?} {body}")
    }
}

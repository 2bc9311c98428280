//! The gRPC listener's connections: accepted here (so each carries its own call limit
//! and, with TLS, goes through a handshake first) and handed to tonic as a stream.
//!
//! TLS is rustls. The server configuration sits behind a lock and is replaced whole when
//! the certificate, key or client CA files change (checked every `TLS_RELOAD_INTERVAL`)
//! or on SIGHUP; each new connection takes the configuration current when it arrives, so
//! a rotation needs no restart and never drops a connection.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::config::TlsConfig;

/// How long a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed `accept` (out of file descriptors, say) before the next one.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What a call learns about its connection (tonic puts it in the request extensions).
#[derive(Debug, Clone)]
pub struct Peer {
    remote_addr: Option<SocketAddr>,
    calls: Arc<Semaphore>,
}

impl Peer {
    /// The client's address.
    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.remote_addr
    }

    /// A place among the connection's calls in flight, if one is free.
    pub fn try_call(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.calls).try_acquire_owned().ok()
    }
}

/// An accepted connection, plaintext or TLS.
#[derive(Debug)]
pub struct Conn {
    io: Io,
    peer: Peer,
}

#[derive(Debug)]
enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Connected for Conn {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.peer.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Accepts connections on `listener` until the returned stream is dropped (tonic drops
/// it when shutdown begins, which closes the listening socket). With `tls`, only
/// connections that complete a handshake are yielded.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<TlsReloader>>,
    connection_concurrency: usize,
) -> ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel::<io::Result<Conn>>(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = tx.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let (stream, remote_addr) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let peer = Peer {
                remote_addr: Some(remote_addr),
                calls: Arc::new(Semaphore::new(connection_concurrency)),
            };
            match &tls {
                None => {
                    let conn = Conn {
                        io: Io::Plain(stream),
                        peer,
                    };
                    if tx.send(Ok(conn)).await.is_err() {
                        return;
                    }
                }
                Some(tls) => {
                    // Handshakes run beside the accept loop, so a slow client holds up
                    // no one else.
                    let acceptor = tls.acceptor();
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let handshake =
                            tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await;
                        match handshake {
                            Ok(Ok(stream)) => {
                                let conn = Conn {
                                    io: Io::Tls(Box::new(stream)),
                                    peer,
                                };
                                let _ = tx.send(Ok(conn)).await;
                            }
                            Ok(Err(e)) => {
                                tracing::debug!(%remote_addr, error = %e, "TLS handshake failed");
                            }
                            Err(_) => {
                                tracing::debug!(%remote_addr, "TLS handshake timed out");
                            }
                        }
                    });
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

/// The TLS configuration in force, and what it was built from.
#[derive(Debug)]
pub struct TlsReloader {
    files: TlsConfig,
    current: RwLock<Arc<ServerConfig>>,
    /// A digest of the files' contents when `current` was built.
    loaded: Mutex<u64>,
}

impl TlsReloader {
    /// Reads the files; an error names the variable whose file is wrong.
    pub fn load(files: &TlsConfig) -> anyhow::Result<Self> {
        let (contents, digest) = read_files(files)?;
        let config = server_config(files, &contents)?;
        Ok(Self {
            files: files.clone(),
            current: RwLock::new(Arc::new(config)),
            loaded: Mutex::new(digest),
        })
    }

    /// An acceptor with the configuration in force now.
    pub fn acceptor(&self) -> TlsAcceptor {
        let config = self
            .current
            .read()
            .map_or_else(|e| Arc::clone(&e.into_inner()), |c| Arc::clone(&c));
        TlsAcceptor::from(config)
    }

    /// Reads the files again and, if they changed and make a valid configuration, puts
    /// it in force. Returns whether it did. A broken file keeps the configuration in
    /// force, so a half-written rotation never takes the server down.
    pub fn reload(&self) -> anyhow::Result<bool> {
        let result = self.try_reload();
        let outcome = match result {
            Ok(true) => "ok",
            Ok(false) => return result,
            Err(_) => "error",
        };
        metrics::counter!("authd_tls_reloads_total", "outcome" => outcome).increment(1);
        result
    }

    fn try_reload(&self) -> anyhow::Result<bool> {
        let (contents, digest) = read_files(&self.files)?;
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if *loaded == digest {
            return Ok(false);
        }
        let config = server_config(&self.files, &contents)?;
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        *current = Arc::new(config);
        *loaded = digest;
        Ok(true)
    }

    /// Reloads every `TLS_RELOAD_INTERVAL` (if not zero) and on SIGHUP, until `stop`.
    pub async fn watch(self: Arc<Self>, stop: tokio::sync::watch::Receiver<bool>) {
        let mut stop = stop;
        let interval = self.files.reload_interval;
        let mut tick = (!interval.is_zero()).then(|| {
            let mut t = tokio::time::interval(interval);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        let mut hangup = hangup_signal();
        loop {
            let why = tokio::select! {
                _ = stop.changed() => return,
                () = async {
                    match tick.as_mut() {
                        Some(t) => { t.tick().await; }
                        None => std::future::pending::<()>().await,
                    }
                } => "file check",
                () = async {
                    match hangup.as_mut() {
                        Some(h) => { if h.recv().await.is_none() { std::future::pending::<()>().await } }
                        None => std::future::pending::<()>().await,
                    }
                } => "SIGHUP",
            };
            match self.reload() {
                Ok(true) => tracing::info!(trigger = why, "TLS certificates reloaded"),
                Ok(false) if why == "SIGHUP" => {
                    tracing::info!("SIGHUP: TLS files unchanged");
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(
                    trigger = why,
                    error = format!("{e:#}"),
                    "TLS reload failed; keeping the certificates in force"
                ),
            }
        }
    }
}

#[cfg(unix)]
fn hangup_signal() -> Option<tokio::signal::unix::Signal> {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; TLS files are still checked every TLS_RELOAD_INTERVAL");
            None
        }
    }
}

#[cfg(not(unix))]
fn hangup_signal() -> Option<NoSignal> {
    None
}

#[cfg(not(unix))]
struct NoSignal;

#[cfg(not(unix))]
impl NoSignal {
    async fn recv(&mut self) -> Option<()> {
        None
    }
}

struct Contents {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

fn read_files(files: &TlsConfig) -> anyhow::Result<(Contents, u64)> {
    let read = |variable: &str, path: &std::path::Path| {
        std::fs::read(path).with_context(|| format!("{variable} {}", path.display()))
    };
    let contents = Contents {
        cert: read("TLS_CERT_FILE", &files.cert_file)?,
        key: read("TLS_KEY_FILE", &files.key_file)?,
        client_ca: files
            .client_ca_file
            .as_deref()
            .map(|p| read("TLS_CLIENT_CA_FILE", p))
            .transpose()?,
    };
    let mut digest = DefaultHasher::new();
    contents.cert.hash(&mut digest);
    contents.key.hash(&mut digest);
    contents.client_ca.hash(&mut digest);
    Ok((contents, digest.finish()))
}

fn server_config(files: &TlsConfig, contents: &Contents) -> anyhow::Result<ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cert_file = files.cert_file.display();
    let certs = CertificateDer::pem_slice_iter(&contents.cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("TLS_CERT_FILE {cert_file}: {e}"))?;
    if certs.is_empty() {
        anyhow::bail!("TLS_CERT_FILE {cert_file}: no certificate in it");
    }
    // The key's own error could quote it; say only what is wrong.
    let key = PrivateKeyDer::from_pem_slice(&contents.key).map_err(|_| {
        anyhow::anyhow!(
            "TLS_KEY_FILE {}: no PEM private key (PKCS#8, PKCS#1 or SEC1) in it",
            files.key_file.display()
        )
    })?;
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .context("TLS: no protocol version available")?;
    let builder = match (&files.client_ca_file, &contents.client_ca) {
        (Some(path), Some(pem)) => {
            let mut roots = RootCertStore::empty();
            for ca in CertificateDer::pem_slice_iter(pem) {
                let ca =
                    ca.map_err(|e| anyhow::anyhow!("TLS_CLIENT_CA_FILE {}: {e}", path.display()))?;
                roots
                    .add(ca)
                    .map_err(|e| anyhow::anyhow!("TLS_CLIENT_CA_FILE {}: {e}", path.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| anyhow::anyhow!("TLS_CLIENT_CA_FILE {}: {e}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| anyhow::anyhow!("TLS_CERT_FILE/TLS_KEY_FILE: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

//! The listeners' connections. Both listeners admit them here, up to a cap, and close
//! those that do not start within `CONNECTION_PREFACE_TIMEOUT`. gRPC connections are then
//! accepted here in full (each carries its own call limit and, with TLS, goes through a
//! handshake first) and handed to tonic as a stream once their HTTP/2 preface is in.
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
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::config::TlsConfig;

/// Pause after a failed `accept` (out of file descriptors, say) before the next one.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// What every HTTP/2 client sends first (RFC 9113 §3.4), before its SETTINGS frame.
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An HTTP/2 frame header: length (3 bytes), type, flags, stream (4 bytes).
const FRAME_HEADER: usize = 9;
const SETTINGS_FRAME: u8 = 0x4;
/// The largest frame a peer may send before it has seen our SETTINGS (RFC 9113 §4.2).
const INITIAL_MAX_FRAME: usize = 16_384;
/// File descriptors kept out of the connection budget beside the store pools: the
/// listeners, the runtime's own, the log, OTLP, files read at start-up, and a margin.
const FD_RESERVE: u64 = 64;
/// The limit assumed where the process's is not read.
#[cfg(not(target_os = "linux"))]
const FALLBACK_FD_LIMIT: u64 = 1024;

/// The connections both listeners may hold by default, together: what the file
/// descriptor limit leaves after `reserved` (the store pools) and [`FD_RESERVE`]. A
/// flood of connections then runs into a cap, refused one by one, before it runs the
/// process out of descriptors and every store connection and every accept fails.
pub fn connection_budget(fd_limit: u64, reserved: u64) -> usize {
    let left = fd_limit.saturating_sub(reserved.saturating_add(FD_RESERVE));
    usize::try_from(left).unwrap_or(usize::MAX).max(2)
}

/// Connections the kernel may hold completed for a listener before it accepts them.
/// tokio's own bind asks for 128, and a burst beyond it (clients reconnecting together,
/// say) is dropped by the kernel after the client believes it connected.
const LISTEN_BACKLOG: u32 = 1024;

/// A listening socket on `addr`, with a [`LISTEN_BACKLOG`] long queue.
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // As tokio's bind: a restarted server rebinds at once, past old connections'
    // TIME_WAIT.
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// The process's soft limit on open files (`u64::MAX` when unlimited).
pub fn fd_limit() -> u64 {
    #[cfg(target_os = "linux")]
    {
        rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(u64::MAX)
    }
    #[cfg(not(target_os = "linux"))]
    {
        FALLBACK_FD_LIMIT
    }
}

/// Which connections a listener takes: at most so many open at once (more are closed as
/// soon as accepted, so the excess costs a moment, not a descriptor each), each given
/// so long to start.
#[derive(Debug, Clone)]
pub struct Admission {
    /// `grpc` or `http`: the metrics' `listener` label.
    listener: &'static str,
    slots: Arc<Semaphore>,
    /// From accept to a complete start (handshake, preface or request head).
    pub preface_timeout: Duration,
}

impl Admission {
    /// `max_connections` open at once on the `listener` (`grpc`, `http`) port.
    pub fn new(listener: &'static str, max_connections: usize, preface_timeout: Duration) -> Self {
        Self {
            listener,
            slots: Arc::new(Semaphore::new(max_connections.min(Semaphore::MAX_PERMITS))),
            preface_timeout,
        }
    }

    /// The next connection a place is free for. Connections over the cap are closed
    /// here at once and counted; a failed `accept` (no descriptor left, say) waits
    /// [`ACCEPT_BACKOFF`] so it does not spin.
    pub async fn accept(&self, listener: &TcpListener) -> (TcpStream, SocketAddr, Slot) {
        loop {
            let (stream, remote_addr) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(listener = self.listener, error = %e, "cannot accept a connection");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&self.slots).try_acquire_owned() else {
                metrics::counter!("authd_connections_refused_total", "listener" => self.listener)
                    .increment(1);
                tracing::debug!(listener = self.listener, %remote_addr, "connection limit reached; connection closed");
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            metrics::counter!("authd_connections_accepted_total", "listener" => self.listener)
                .increment(1);
            metrics::gauge!("authd_connections", "listener" => self.listener).increment(1.0);
            let slot = Slot {
                _permit: permit,
                listener: self.listener,
            };
            return (stream, remote_addr, slot);
        }
    }

    /// Counts and logs a connection closed because it did not start in time.
    pub fn timed_out(&self, remote_addr: SocketAddr) {
        closed(self.listener, "timeout");
        tracing::debug!(listener = self.listener, %remote_addr, timeout = ?self.preface_timeout, "connection closed: it did not start in time");
    }
}

/// Counts a connection closed before it was served, by `reason`.
fn closed(listener: &'static str, reason: &'static str) {
    metrics::counter!("authd_connections_closed_total", "listener" => listener, "reason" => reason)
        .increment(1);
}

/// A connection's place under its listener's cap, given back when the connection is
/// dropped.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    listener: &'static str,
}

impl Drop for Slot {
    fn drop(&mut self) {
        metrics::gauge!("authd_connections", "listener" => self.listener).decrement(1.0);
    }
}

/// What a call learns about its connection (tonic puts it in the request extensions).
#[derive(Debug, Clone)]
pub struct Peer {
    remote_addr: Option<SocketAddr>,
    calls: Arc<Semaphore>,
    client_cert: Option<Arc<[San]>>,
}

impl Peer {
    /// The SANs of the client certificate the TLS handshake verified (DNS names, URIs,
    /// e-mail addresses and IP addresses, as written); `None` when there was none.
    pub fn client_sans(&self) -> Option<&[San]> {
        self.client_cert.as_deref()
    }

    /// The client's address.
    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.remote_addr
    }

    /// A place among the connection's calls in flight, if one is free.
    pub fn try_call(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.calls).try_acquire_owned().ok()
    }
}

/// An accepted connection, plaintext or TLS, that has sent its HTTP/2 preface.
#[derive(Debug)]
pub struct Conn {
    io: Io,
    /// What was read to see the preface, given to tonic before anything else.
    started: Vec<u8>,
    /// How much of `started` tonic has read.
    replayed: usize,
    peer: Peer,
    _slot: Slot,
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
        let this = self.get_mut();
        if this.replayed < this.started.len() {
            let rest = &this.started[this.replayed..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.replayed += n;
            if this.replayed == this.started.len() {
                this.started = Vec::new();
                this.replayed = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
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
/// it when shutdown begins, which closes the listening socket), as `admission` allows.
/// A connection is yielded once it has completed the TLS handshake (with `tls`) and sent
/// the HTTP/2 client preface; one that has not within `admission.preface_timeout` is
/// closed. Each starts in a task of its own, so a slow client holds up no one else, and
/// those tasks are bounded by the cap and the timeout.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<TlsReloader>>,
    admission: Admission,
    connection_concurrency: usize,
) -> ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel::<io::Result<Conn>>(64);
    tokio::spawn(async move {
        loop {
            let (stream, remote_addr, slot) = tokio::select! {
                () = tx.closed() => return,
                accepted = admission.accept(&listener) => accepted,
            };
            let mut peer = Peer {
                remote_addr: Some(remote_addr),
                calls: Arc::new(Semaphore::new(connection_concurrency)),
                client_cert: None,
            };
            let acceptor = tls.as_ref().map(|tls| tls.acceptor());
            let tx = tx.clone();
            let admission = admission.clone();
            tokio::spawn(async move {
                let started = tokio::time::timeout(
                    admission.preface_timeout,
                    start(stream, remote_addr, acceptor, admission.listener),
                )
                .await;
                match started {
                    Ok(Some((io, started))) => {
                        if let Io::Tls(tls) = &io {
                            peer.client_cert = tls
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|chain| chain.first())
                                .map(|leaf| subject_alt_names(leaf).into());
                        }
                        let conn = Conn {
                            io,
                            started,
                            replayed: 0,
                            peer,
                            _slot: slot,
                        };
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Ok(None) => {}
                    Err(_) => admission.timed_out(remote_addr),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// The TLS handshake (with `acceptor`), then the client's first bytes up to the end of
/// its preface: what was read, to be replayed. `None` when the handshake fails or the
/// client leaves first.
async fn start(
    stream: TcpStream,
    remote_addr: SocketAddr,
    acceptor: Option<TlsAcceptor>,
    listener: &'static str,
) -> Option<(Io, Vec<u8>)> {
    let mut io = match acceptor {
        None => Io::Plain(stream),
        Some(acceptor) => match acceptor.accept(stream).await {
            Ok(stream) => Io::Tls(Box::new(stream)),
            Err(e) => {
                closed(listener, "tls_handshake");
                tracing::debug!(%remote_addr, error = %e, "TLS handshake failed");
                return None;
            }
        },
    };
    let mut started = Vec::new();
    while preface_needs_more(&started) {
        match io.read_buf(&mut started).await {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
    }
    Some((io, started))
}

/// Whether `read`, a connection's first bytes, falls short of a complete start: the
/// preface and the SETTINGS frame that must follow it. Bytes that cannot become one need
/// no more; hyper refuses them as it always has.
fn preface_needs_more(read: &[u8]) -> bool {
    let magic = read.len().min(PREFACE.len());
    if read[..magic] != PREFACE[..magic] {
        return false;
    }
    let Some(header) = read.get(PREFACE.len()..PREFACE.len() + FRAME_HEADER) else {
        return true;
    };
    let length =
        usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
    if header[3] != SETTINGS_FRAME || length > INITIAL_MAX_FRAME {
        return false;
    }
    read.len() < PREFACE.len() + FRAME_HEADER + length
}

/// A subject alternative name of a client certificate, with its type: a listed name
/// only matches a SAN of the same type (a DNS name never matches a listed URI).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum San {
    /// A DNS name (compared without regard to ASCII case).
    Dns(String),
    /// A URI (compared exactly).
    Uri(String),
    /// An e-mail address (compared exactly).
    Email(String),
    /// An IP address.
    Ip(std::net::IpAddr),
}

impl San {
    /// Whether this SAN is `listed`, an `ADMIN_CLIENT_SANS` entry whose type is read from
    /// its shape: containing `://` a URI, parsing as an IP address an IP, containing `@`
    /// an e-mail address, else a DNS name.
    pub fn is(&self, listed: &str) -> bool {
        if listed.contains("://") {
            matches!(self, San::Uri(u) if u == listed)
        } else if let Ok(ip) = listed.parse::<std::net::IpAddr>() {
            matches!(self, San::Ip(a) if *a == ip)
        } else if listed.contains('@') {
            matches!(self, San::Email(e) if e == listed)
        } else {
            matches!(self, San::Dns(d) if d.eq_ignore_ascii_case(listed))
        }
    }
}

impl std::fmt::Display for San {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            San::Dns(s) | San::Uri(s) | San::Email(s) => f.write_str(s),
            San::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// The subject alternative names of a certificate: DNS names, URIs, e-mail addresses
/// and IP addresses, each with its type. An unreadable certificate has none.
pub fn subject_alt_names(der: &[u8]) -> Vec<San> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(s) => Some(San::Dns((*s).to_owned())),
            GeneralName::URI(s) => Some(San::Uri((*s).to_owned())),
            GeneralName::RFC822Name(s) => Some(San::Email((*s).to_owned())),
            GeneralName::IPAddress(b) => match b.len() {
                4 => <[u8; 4]>::try_from(*b)
                    .ok()
                    .map(|a| San::Ip(std::net::IpAddr::from(a))),
                16 => <[u8; 16]>::try_from(*b)
                    .ok()
                    .map(|a| San::Ip(std::net::IpAddr::from(a))),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod san_tests {
    use super::San;

    #[test]
    fn a_listed_san_matches_only_a_san_of_its_type() {
        let uri = "spiffe://example.org/admin";
        assert!(San::Uri(uri.into()).is(uri));
        assert!(!San::Dns(uri.into()).is(uri));
        assert!(!San::Email(uri.into()).is(uri));
        assert!(San::Dns("Admin.Example.org".into()).is("admin.example.org"));
        assert!(!San::Uri("admin.example.org".into()).is("admin.example.org"));
        assert!(!San::Email("admin.example.org".into()).is("admin.example.org"));
        assert!(San::Email("ops@example.org".into()).is("ops@example.org"));
        assert!(!San::Dns("ops@example.org".into()).is("ops@example.org"));
        let ip: std::net::IpAddr = "10.0.0.7".parse().unwrap();
        assert!(San::Ip(ip).is("10.0.0.7"));
        assert!(!San::Dns("10.0.0.7".into()).is("10.0.0.7"));
        assert!(San::Ip("::1".parse().unwrap()).is("0:0:0:0:0:0:0:1"));
        assert_eq!(San::Ip(ip).to_string(), "10.0.0.7");
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(payload_len: usize) -> Vec<u8> {
        let mut bytes = PREFACE.to_vec();
        let len = u32::try_from(payload_len).unwrap().to_be_bytes();
        bytes.extend_from_slice(&[len[1], len[2], len[3], SETTINGS_FRAME, 0, 0, 0, 0, 0]);
        bytes.extend(std::iter::repeat_n(0u8, payload_len));
        bytes
    }

    #[test]
    fn a_start_is_complete_with_the_preface_and_its_whole_settings_frame() {
        let full = settings(12);
        for cut in 0..full.len() {
            assert!(
                preface_needs_more(&full[..cut]),
                "complete after {cut} bytes"
            );
        }
        assert!(!preface_needs_more(&full));
        // Frames sent along with it are read too, and replayed.
        let mut more = full.clone();
        more.extend_from_slice(b"headers");
        assert!(!preface_needs_more(&more));
        assert!(!preface_needs_more(&settings(0)));
    }

    #[test]
    fn bytes_that_cannot_start_http2_need_no_more() {
        assert!(!preface_needs_more(b"GET / HTTP/1.1\r\n"));
        assert!(!preface_needs_more(b"PRX"));
        // The preface, then a frame that is not SETTINGS.
        let mut ping = PREFACE.to_vec();
        ping.extend_from_slice(&[0, 0, 8, 0x6, 0, 0, 0, 0, 0]);
        assert!(!preface_needs_more(&ping));
        // A SETTINGS frame larger than any peer may send first.
        let mut huge = PREFACE.to_vec();
        huge.extend_from_slice(&[0, 0x40, 0x01, SETTINGS_FRAME, 0, 0, 0, 0, 0]);
        assert!(!preface_needs_more(&huge));
    }

    #[test]
    fn the_connection_budget_leaves_room_for_the_stores_and_the_rest() {
        assert_eq!(connection_budget(1024, 11), 1024 - 11 - 64);
        // Unlimited: no cap worth speaking of.
        assert!(connection_budget(u64::MAX, 11) > 1 << 40);
        // A limit below the reserve still admits someone on each listener.
        assert_eq!(connection_budget(100, 500), 2);
    }
}

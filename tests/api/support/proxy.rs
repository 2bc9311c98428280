//! A TCP proxy a test puts in front of a server (authd, Redis, MariaDB) to break the
//! link on purpose: add latency, stall, reset connections, refuse new ones, or cut a
//! connection in the middle of what it carries.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy does to the bytes it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Forwards everything.
    Pass,
    /// Holds each chunk this long before forwarding it.
    Latency(Duration),
    /// Accepts and reads, forwards nothing (held until the mode changes, as a healed
    /// network delivers what was in flight).
    Stall,
    /// Resets every connection, new ones as soon as they are accepted.
    Refuse,
}

struct Shared {
    target: SocketAddr,
    mode: watch::Sender<Mode>,
    /// Bumped to reset every open connection.
    resets: watch::Sender<u64>,
    /// Client-to-server chunks still forwarded before the connection carrying the next
    /// one is reset; negative: not armed.
    cut_after: AtomicI64,
    open: AtomicUsize,
}

impl Shared {
    /// True (once) when the armed count of chunks has gone through.
    fn cut_due(&self) -> bool {
        self.cut_after
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n >= 0).then_some(n - 1)
            })
            == Ok(0)
    }
}

/// See the module documentation. Dropping it resets every connection it carries.
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: JoinHandle<()>,
}

impl Proxy {
    /// Listens on 127.0.0.1:0 and forwards to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            target,
            mode: watch::channel(Mode::Pass).0,
            resets: watch::channel(0).0,
            cut_after: AtomicI64::new(-1),
            open: AtomicUsize::new(0),
        });
        let s = Arc::clone(&shared);
        let acceptor = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if *s.mode.borrow() == Mode::Refuse {
                    reset(&inbound);
                    continue;
                }
                tokio::spawn(carry(inbound, Arc::clone(&s)));
            }
        });
        Self {
            addr,
            shared,
            acceptor,
        }
    }

    /// Back to forwarding everything; what a stall held goes through.
    pub fn heal(&self) {
        self.shared.cut_after.store(-1, Ordering::SeqCst);
        self.shared.mode.send_replace(Mode::Pass);
    }

    /// Delays every chunk, both ways, by `delay`.
    pub fn add_latency(&self, delay: Duration) {
        self.shared.mode.send_replace(Mode::Latency(delay));
    }

    /// Accepts and reads but forwards nothing, on open and new connections alike.
    pub fn stall(&self) {
        self.shared.mode.send_replace(Mode::Stall);
    }

    /// Resets (RST, SO_LINGER 0) every open connection; new ones are served as before.
    pub fn reset(&self) {
        self.shared.resets.send_modify(|n| *n += 1);
    }

    /// Resets every open connection and every new one: the server is down.
    pub fn refuse(&self) {
        self.shared.mode.send_replace(Mode::Refuse);
        self.reset();
    }

    /// Forwards `chunks` more client-to-server chunks, then resets the connection that
    /// carries the next one instead of forwarding it: data cut mid-stream. Once.
    pub fn cut_after(&self, chunks: i64) {
        self.shared.cut_after.store(chunks, Ordering::SeqCst);
    }

    /// Whether an armed cut has happened.
    pub fn cut_done(&self) -> bool {
        self.shared.cut_after.load(Ordering::SeqCst) < 0
    }

    /// Connections open through the proxy now.
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.acceptor.abort();
        self.reset();
    }
}

/// Closes with RST instead of FIN. (Deprecated because a non-zero linger blocks the
/// thread on drop; a zero one does not: the kernel sends RST and frees the socket.)
#[allow(deprecated)]
fn reset(stream: &TcpStream) {
    let _ = stream.set_linger(Some(Duration::ZERO));
}

struct Open<'a>(&'a AtomicUsize);

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One connection, both ways, until either side closes or the test breaks it.
async fn carry(inbound: TcpStream, shared: Arc<Shared>) {
    shared.open.fetch_add(1, Ordering::SeqCst);
    let _open = Open(&shared.open);
    let mut resets = shared.resets.subscribe();
    let Ok(outbound) = TcpStream::connect(shared.target).await else {
        reset(&inbound);
        return;
    };
    let (mut in_read, mut in_write) = inbound.into_split();
    let (mut out_read, mut out_write) = outbound.into_split();
    let broken = tokio::select! {
        _ = resets.changed() => true,
        carried = async {
            tokio::try_join!(
                pump(&mut in_read, &mut out_write, &shared, true),
                pump(&mut out_read, &mut in_write, &shared, false),
            )
        } => carried.is_err(),
    };
    if broken {
        reset(in_read.as_ref());
        reset(out_read.as_ref());
    }
}

/// Copies one direction; `Err` when the connection is to be cut.
async fn pump(
    from: &mut OwnedReadHalf,
    to: &mut OwnedWriteHalf,
    shared: &Shared,
    client_to_server: bool,
) -> Result<(), ()> {
    let mut mode = shared.mode.subscribe();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return Ok(());
            }
            Ok(n) => n,
        };
        if client_to_server && shared.cut_due() {
            return Err(());
        }
        loop {
            let current = *mode.borrow_and_update();
            match current {
                Mode::Pass => break,
                Mode::Latency(delay) => {
                    tokio::time::sleep(delay).await;
                    break;
                }
                Mode::Stall => {
                    if mode.changed().await.is_err() {
                        return Err(());
                    }
                }
                Mode::Refuse => return Err(()),
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return Err(());
        }
    }
}

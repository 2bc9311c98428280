//! What the in-process servers log, captured for the tests that look for what must
//! never be logged.

use std::io::Write;
use std::sync::{Mutex, Once};

/// Everything every test server logged (at `authd=debug`), from the start of the run.
static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Sends the log of every server in this test binary to one buffer (a process has one
/// global subscriber), so tests can look for what must never be logged. Written as
/// authd's default `pretty` format writes it.
pub(super) fn capture_logs() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let _ = tracing_subscriber::registry()
            .with(tracing_subscriber::EnvFilter::new("authd=debug"))
            .with(authd::telemetry::log_layer(
                authd::config::LogFormat::Pretty,
                || LogWriter,
                false,
            ))
            .try_init();
    });
}

/// The logs captured so far, from every test in the binary.
pub fn captured_logs() -> String {
    String::from_utf8_lossy(&LOGS.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
}

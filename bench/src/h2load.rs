//! The independent check of issue #21: the closed-loop ValidateToken/Health ratio as
//! h2load (nghttp2, a load generator this project did not write) sees it.
//!
//! h2load sends one fixed request body per call, so the two gRPC requests are written to
//! files first: the 5-byte gRPC frame prefix (not compressed, length big-endian) and the
//! protobuf bytes of the message. h2load counts HTTP statuses; a gRPC error comes with
//! HTTP 200 and `grpc-status` in the trailers, which it does not read. So the caller
//! checks the bodies (they decode back to the messages) and authd's answer to the same
//! request through a gRPC client before the run.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};
use prost::Message;

/// A gRPC request body: frame prefix + protobuf bytes.
pub fn grpc_body(message: &impl Message) -> anyhow::Result<Vec<u8>> {
    let bytes = message.encode_to_vec();
    let len = u32::try_from(bytes.len()).context("message too long for a gRPC frame")?;
    let mut body = Vec::with_capacity(5 + bytes.len());
    body.push(0);
    body.extend_from_slice(&len.to_be_bytes());
    body.extend_from_slice(&bytes);
    Ok(body)
}

/// The message inside a body made by `grpc_body` (to check what h2load will send).
pub fn decode_body<M: Message + Default>(body: &[u8]) -> anyhow::Result<M> {
    let (prefix, bytes) = body
        .split_at_checked(5)
        .context("a gRPC body is at least 5 bytes")?;
    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]);
    if prefix[0] != 0 || usize::try_from(len)? != bytes.len() {
        bail!("bad gRPC frame prefix {prefix:?} for {} bytes", bytes.len());
    }
    Ok(M::decode(bytes)?)
}

/// How h2load is run.
#[derive(Clone, Debug)]
pub struct Shape {
    pub program: String,
    pub connections: usize,
    pub streams: usize,
    pub seconds: f64,
    pub warm_up: f64,
}

impl Shape {
    pub fn describe(&self) -> String {
        format!(
            "h2load -c {} -m {} -t 1 --warm-up-time {} -D {}",
            self.connections,
            self.streams,
            millis(self.warm_up),
            millis(self.seconds)
        )
    }
}

/// A duration as h2load takes it: an integer with a unit.
fn millis(seconds: f64) -> String {
    format!("{}ms", (seconds * 1000.0).round().max(1.0) as u64)
}

/// What h2load printed about one run.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub req_per_s: f64,
    pub done: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub errored: u64,
    pub timeout: u64,
    pub status_2xx: u64,
    pub status_other: u64,
}

/// Runs h2load against `http://{addr}{path}` with `body` as the POST body (blocking: run
/// it on a blocking thread).
pub fn run(shape: &Shape, addr: &str, path: &str, body: &Path) -> anyhow::Result<Outcome> {
    let output = Command::new(&shape.program)
        .args(["-c", &shape.connections.to_string()])
        .args(["-m", &shape.streams.to_string()])
        .args(["-t", "1"])
        .args(["--warm-up-time", &millis(shape.warm_up)])
        .args(["-D", &millis(shape.seconds)])
        .args(["-H", "content-type: application/grpc"])
        .args(["-H", "te: trailers"])
        .arg("-d")
        .arg(body)
        .arg(format!("http://{addr}{path}"))
        .output()
        .with_context(|| {
            format!(
                "cannot run {} (Debian: apt-get install nghttp2-client; or --h2load PATH)",
                shape.program
            )
        })?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "{} failed ({}): {}{}",
            shape.program,
            output.status,
            text,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    parse(&text).with_context(|| format!("cannot read h2load's output:\n{text}"))
}

/// The number just before `label` in `line` ("…, 0 failed, …").
fn count_before(line: &str, label: &str) -> Option<u64> {
    let at = line.find(label)?;
    line[..at]
        .trim_end()
        .rsplit([' ', ','])
        .next()?
        .parse()
        .ok()
}

/// Reads `finished in …, X req/s, …`, `requests: …` and `status codes: …`.
pub fn parse(text: &str) -> anyhow::Result<Outcome> {
    let mut out = Outcome::default();
    let mut seen = (false, false, false);
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("finished in ") {
            let at = rest.find(" req/s").context("no req/s")?;
            out.req_per_s = rest[..at]
                .rsplit([' ', ','])
                .next()
                .context("no req/s figure")?
                .parse()?;
            seen.0 = true;
        } else if let Some(rest) = line.strip_prefix("requests: ") {
            out.done = count_before(rest, " done").context("no done count")?;
            out.succeeded = count_before(rest, " succeeded").context("no succeeded count")?;
            out.failed = count_before(rest, " failed").context("no failed count")?;
            out.errored = count_before(rest, " errored").context("no errored count")?;
            out.timeout = count_before(rest, " timeout").unwrap_or(0);
            seen.1 = true;
        } else if let Some(rest) = line.strip_prefix("status codes: ") {
            out.status_2xx = count_before(rest, " 2xx").context("no 2xx count")?;
            out.status_other = ["3xx", "4xx", "5xx"]
                .iter()
                .filter_map(|c| count_before(rest, &format!(" {c}")))
                .sum();
            seen.2 = true;
        }
    }
    if seen != (true, true, true) {
        bail!("a summary line is missing");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_summary() -> anyhow::Result<()> {
        let text = "\
starting benchmark...
finished in 10.00s, 52012.30 req/s, 4.12MB/s
requests: 520123 total, 520251 started, 520123 done, 520120 succeeded, 3 failed, 0 errored, 0 timeout
status codes: 520120 2xx, 0 3xx, 0 4xx, 3 5xx
traffic: 41.20MB (43200000) total, 1.00MB (1000000) headers (space savings 95.00%), 20.00MB (20000000) data
";
        let o = parse(text)?;
        assert!((o.req_per_s - 52012.3).abs() < 1e-6);
        assert_eq!(
            (o.done, o.succeeded, o.failed, o.errored, o.timeout),
            (520_123, 520_120, 3, 0, 0)
        );
        assert_eq!((o.status_2xx, o.status_other), (520_120, 3));
        assert!(parse("finished in 1.00s, 5.0 req/s, 1MB/s").is_err());
        Ok(())
    }

    #[test]
    fn bodies_round_trip() -> anyhow::Result<()> {
        let m = authd::proto::auth::v1::ValidateTokenRequest {
            token: "a.b.c".into(),
            ..Default::default()
        };
        let body = grpc_body(&m)?;
        assert_eq!(&body[..5], &[0, 0, 0, 0, 7]);
        let back: authd::proto::auth::v1::ValidateTokenRequest = decode_body(&body)?;
        assert_eq!(back.token, "a.b.c");
        assert_eq!(
            grpc_body(&tonic_health::pb::HealthCheckRequest::default())?,
            vec![0, 0, 0, 0, 0]
        );
        assert!(decode_body::<tonic_health::pb::HealthCheckRequest>(&[1, 0, 0, 0, 0]).is_err());
        Ok(())
    }
}

//! A bare HTTP/2 client for gRPC, with no gRPC library in the way: it sends whatever
//! bytes and headers a test makes up, and reads the status the server answers.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use tonic::Code;

pub const VALIDATE: &str = "/auth.v1.AuthService/ValidateToken";
pub const REGISTER: &str = "/auth.v1.AuthService/Register";
pub const LOGIN: &str = "/auth.v1.AuthService/Login";

/// A gRPC message frame: compressed flag, declared length, payload.
pub fn frame(flag: u8, declared_len: u32, payload: &[u8]) -> Bytes {
    let mut out = vec![flag];
    out.extend_from_slice(&declared_len.to_be_bytes());
    out.extend_from_slice(payload);
    out.into()
}

/// A well-formed frame around `payload`.
pub fn message(payload: &[u8]) -> Bytes {
    frame(0, u32::try_from(payload.len()).unwrap(), payload)
}

/// A protobuf length-delimited field (field `number`, wire type 2), hand-encoded so it
/// may hold what no protobuf library would write, like invalid UTF-8.
pub fn field(number: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![(number << 3) | 2];
    let mut len = value.len();
    while len >= 0x80 {
        out.push(u8::try_from(len & 0x7f).unwrap() | 0x80);
        len >>= 7;
    }
    out.push(u8::try_from(len).unwrap());
    out.extend_from_slice(value);
    out
}

/// A gRPC status as a bare HTTP/2 client reads it: `grpc-status` and `grpc-message`
/// from the headers (trailers-only) or the trailers.
#[derive(Debug)]
pub struct RawAnswer {
    pub code: Option<Code>,
    pub message: String,
}

/// One HTTP/2 connection with no gRPC library in the way.
pub struct RawConn {
    pub sender: hyper::client::conn::http2::SendRequest<
        http_body_util::combinators::BoxBody<Bytes, Infallible>,
    >,
    pub connection: tokio::task::JoinHandle<()>,
    addr: SocketAddr,
}

impl RawConn {
    pub async fn open(addr: SocketAddr) -> Self {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (sender, connection) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .unwrap();
        let connection = tokio::spawn(async move {
            let _ = connection.await;
        });
        Self {
            sender,
            connection,
            addr,
        }
    }

    pub fn request(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: http_body_util::combinators::BoxBody<Bytes, Infallible>,
    ) -> http::Request<http_body_util::combinators::BoxBody<Bytes, Infallible>> {
        let mut request = http::Request::post(format!("http://{}{path}", self.addr))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        request.body(body).unwrap()
    }

    /// Sends `body` as the whole request body and reads the status.
    pub async fn call(&mut self, path: &str, headers: &[(&str, &str)], body: Bytes) -> RawAnswer {
        let body = http_body_util::Full::new(body).boxed();
        let request = self.request(path, headers, body);
        let answer = async {
            let response = self.sender.send_request(request).await.unwrap();
            let (parts, body) = response.into_parts();
            let trailers = body.collect().await.unwrap().trailers().cloned();
            let read = |name: &str| {
                parts
                    .headers
                    .get(name)
                    .or_else(|| trailers.as_ref().and_then(|t| t.get(name)))
                    .map(|v| v.to_str().unwrap().to_owned())
            };
            RawAnswer {
                code: read("grpc-status").map(|c| Code::from_i32(c.parse().unwrap())),
                message: percent_decoded(&read("grpc-message").unwrap_or_default()),
            }
        };
        tokio::time::timeout(Duration::from_secs(10), answer)
            .await
            .expect("no answer: the call hangs")
    }
}

impl Drop for RawConn {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

/// `grpc-message` is percent-encoded on the wire.
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

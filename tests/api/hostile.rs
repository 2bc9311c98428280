//! Hostile input (issue #9): oversize fields, invalid UTF-8, huge metadata, garbage and
//! truncated gRPC frames, bytes that are not HTTP/2, and a flood of calls. Each gets a
//! clear status (never INTERNAL, never a hang), and the server keeps serving.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use authd::proto::auth::v1 as pb;
use authd::proto::auth::v1::auth_service_client::AuthServiceClient;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use tonic::transport::Channel;

use crate::support::binary::Authd;
use crate::support::raw::*;
use crate::support::*;

/// The server still answers a normal call.
async fn still_serving(app: &TestApp) {
    let v = app.validate("not-a-token").await.unwrap();
    assert!(!v.valid);
    app.register("still_here", PASSWORD)
        .await
        .map(|_| ())
        .or_else(|s| (s.code() == Code::AlreadyExists).then_some(()).ok_or(s))
        .unwrap();
}

#[tokio::test]
async fn invalid_utf8_in_string_fields_is_invalid_argument_not_internal() {
    let app = Backend::Embedded.app().spawn().await;
    let mut conn = RawConn::open(app.addr).await;
    let not_utf8: &[u8] = b"ab\xff\xfecd";
    for (path, payload) in [
        (
            REGISTER,
            [field(1, not_utf8), field(2, PASSWORD.as_bytes())].concat(),
        ),
        (LOGIN, [field(1, b"someone"), field(2, not_utf8)].concat()),
        (
            LOGIN,
            [field(1, b"someone"), field(2, b"pw"), field(4, not_utf8)].concat(),
        ),
        (VALIDATE, field(1, not_utf8)),
    ] {
        let answer = conn.call(path, &[], message(&payload)).await;
        assert_eq!(
            answer.code,
            Some(Code::InvalidArgument),
            "{path}: {answer:?}"
        );
        // A plain refusal: tonic's decoder text (message types, field names) stays in
        // the log.
        assert_eq!(answer.message, "malformed request", "{path}: {answer:?}");
    }
    // Well-formed bytes on the same connection still work.
    let answer = conn
        .call(VALIDATE, &[], message(&field(1, b"not-a-token")))
        .await;
    assert_eq!(answer.code, Some(Code::Ok), "{answer:?}");
    still_serving(&app).await;
}

/// Deterministic noise (xorshift), so a failure can be replayed.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

#[tokio::test]
async fn garbage_and_truncated_grpc_frames_get_a_clear_status_never_internal() {
    let app = Backend::Embedded.app().spawn().await;
    let token = field(1, b"not-a-token");
    let cases: Vec<(&str, Bytes, &[Code])> = vec![
        (
            "length prefix longer than the body",
            frame(0, 100, &token),
            &[Code::InvalidArgument],
        ),
        (
            "compressed flag without grpc-encoding",
            frame(1, u32::try_from(token.len()).unwrap(), &token),
            &[Code::InvalidArgument],
        ),
        (
            "a compressed flag that is no flag",
            frame(7, u32::try_from(token.len()).unwrap(), &token),
            &[Code::InvalidArgument],
        ),
        ("no message at all", Bytes::new(), &[Code::InvalidArgument]),
        (
            "half a frame header",
            Bytes::from_static(&[0, 0]),
            &[Code::InvalidArgument],
        ),
        (
            "a length over the message limit",
            frame(0, u32::MAX, &token),
            &[Code::OutOfRange],
        ),
        (
            "not protobuf inside a good frame",
            message(&[0xff; 16]),
            &[Code::InvalidArgument],
        ),
    ];
    let mut conn = RawConn::open(app.addr).await;
    for (what, body, expected) in cases {
        let answer = conn.call(VALIDATE, &[], body).await;
        assert!(
            answer.code.is_some_and(|c| expected.contains(&c)),
            "{what}: {answer:?}"
        );
    }
    // Random bytes, raw and inside a well-formed frame: some code the caller can act on.
    for seed in 1..=40 {
        let bytes = noise(seed, 64 + usize::try_from(seed).unwrap() * 7);
        for body in [Bytes::from(bytes.clone()), message(&bytes)] {
            let answer = conn.call(VALIDATE, &[], body).await;
            assert!(
                matches!(
                    answer.code,
                    Some(Code::Ok | Code::InvalidArgument | Code::OutOfRange)
                ),
                "seed {seed}: {answer:?}"
            );
        }
    }
    still_serving(&app).await;
}

#[tokio::test]
async fn connections_closed_mid_frame_leave_the_server_serving() {
    let app = Backend::Embedded
        .app()
        .env("GRPC_CONCURRENCY_LIMIT", "4")
        .spawn()
        .await;
    // More abandoned calls than the server admits at once: if any stayed in flight,
    // the later ones (and the check after) would be shed.
    for _ in 0..12 {
        let mut conn = RawConn::open(app.addr).await;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
        let body = http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let request = conn.request(VALIDATE, &[], body.boxed());
        let call = conn.sender.send_request(request);
        tx.send(Ok(Frame::data(frame(0, 50, b"\x0a\x30part"))))
            .await
            .unwrap();
        let _ = tokio::time::timeout(Duration::from_millis(50), call).await;
        // The client vanishes: TCP closed in the middle of the frame.
        conn.connection.abort();
        drop(conn);
        drop(tx);
    }
    let served = eventually(Duration::from_secs(5), || async {
        app.validate("not-a-token").await.is_ok()
    })
    .await;
    assert!(served, "abandoned calls still hold the concurrency limit");
    still_serving(&app).await;
}

/// Writes `bytes` to the gRPC port and waits for the server to close the connection.
async fn closed_after(addr: SocketAddr, bytes: &[u8]) {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = tcp.write_all(bytes).await;
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut sink)).await;
    assert!(
        closed.is_ok(),
        "connection held open after {} bytes",
        bytes.len()
    );
}

#[tokio::test]
async fn bytes_that_are_not_http2_are_refused_and_the_server_keeps_serving() {
    let app = Backend::Embedded.app().spawn().await;
    closed_after(app.addr, b"GET / HTTP/1.1\r\nHost: authd\r\n\r\n").await;
    closed_after(app.addr, &noise(7, 4096)).await;
    // The HTTP/2 preface, then garbage where frames belong.
    let mut preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    preface.extend(noise(11, 512));
    closed_after(app.addr, &preface).await;
    still_serving(&app).await;
}

#[tokio::test]
async fn a_64_kib_authorization_header_gets_a_clear_refusal() {
    let big = format!("Bearer {}", "a".repeat(64 * 1024));
    // The default header list limit (16 KiB) refuses it before authd reads it...
    let app = Backend::Embedded.app().spawn().await;
    let mut request = tonic::Request::new(pb::LogoutRequest {});
    request
        .metadata_mut()
        .insert("authorization", big.parse().unwrap());
    let refused = tokio::time::timeout(Duration::from_secs(10), app.client.clone().logout(request))
        .await
        .expect("no answer");
    let status = refused.expect_err("64 KiB of authorization accepted");
    // HTTP/2 itself refuses a header list this far over the limit (GOAWAY,
    // ENHANCE_YOUR_CALM), which a gRPC client reads as RESOURCE_EXHAUSTED.
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    // Less far over (up to 4x), only the call is refused: HTTP 431, which gRPC's
    // HTTP-to-status table maps to UNKNOWN, with the 431 in the message.
    let mut request = tonic::Request::new(pb::LogoutRequest {});
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", "a".repeat(32 * 1024)).parse().unwrap(),
    );
    let status = assert_code(app.client.clone().logout(request).await, Code::Unknown);
    assert!(status.message().contains("431"), "{status:?}");
    still_serving(&app).await;

    // ...and with a limit that lets it through, the token's own limit (8 KiB) does.
    let app = Backend::Embedded
        .app()
        .env("GRPC_MAX_HEADER_LIST_SIZE", "128KiB")
        .spawn()
        .await;
    let mut request = tonic::Request::new(pb::LogoutRequest {});
    request
        .metadata_mut()
        .insert("authorization", big.parse().unwrap());
    let status = assert_code(
        app.client.clone().logout(request).await,
        Code::InvalidArgument,
    );
    assert!(status.message().contains("authorization"), "{status:?}");
    still_serving(&app).await;
}

#[tokio::test]
async fn oversize_fields_are_invalid_argument_before_any_work() {
    let app = TestApp::builder().spawn().await;
    let (_, login) = app.user_with_session("sizes").await;
    let long_name = "n".repeat(10_000);
    let long_password = format!("Aa1!{}", "p".repeat(100));
    for (what, answer) in [
        (
            "username",
            app.register(&long_name, PASSWORD).await.map(|_| ()),
        ),
        (
            "password",
            app.register("sizes2", &long_password).await.map(|_| ()),
        ),
        (
            "username",
            app.login(&long_name, PASSWORD).await.map(|_| ()),
        ),
        (
            "password",
            app.login("sizes", &long_password).await.map(|_| ()),
        ),
        (
            "token",
            app.validate(&"t".repeat(9 * 1024)).await.map(|_| ()),
        ),
        (
            "session_id",
            app.revoke_session(&login.access_token, &"s".repeat(100))
                .await,
        ),
        (
            "new_password",
            app.change_password(&login.access_token, PASSWORD, &long_password)
                .await
                .map(|_| ()),
        ),
    ] {
        let status = assert_code(answer, Code::InvalidArgument);
        assert!(status.message().contains(what), "{what}: {status:?}");
    }
    still_serving(&app).await;
}

/// The resident set of a process, from /proc.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// `n` ValidateTokens at once over `channels`: each answers OK (valid) or is shed with
/// RESOURCE_EXHAUSTED, within the time limit.
async fn flood(channels: &[Channel], token: &str, n: usize) -> (usize, usize) {
    let calls = (0..n).map(|i| {
        let mut client = AuthServiceClient::new(channels[i % channels.len()].clone());
        let token = token.to_owned();
        tokio::spawn(async move {
            client
                .validate_token(pb::ValidateTokenRequest {
                    token,
                    ..Default::default()
                })
                .await
        })
    });
    let answers = tokio::time::timeout(Duration::from_secs(60), futures::future::join_all(calls))
        .await
        .expect("the flood hangs");
    let (mut ok, mut shed) = (0, 0);
    for answer in answers {
        match answer.unwrap() {
            Ok(v) => {
                assert!(v.into_inner().valid);
                ok += 1;
            }
            Err(s) if s.code() == Code::ResourceExhausted => shed += 1,
            Err(s) => panic!("unclear answer to the flood: {s:?}"),
        }
    }
    (ok, shed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_concurrent_validations_get_clear_answers_in_bounded_memory() {
    let authd = tokio::task::block_in_place(|| Authd::start(&[]));
    let pid = authd.child.id();
    let channels: Vec<Channel> = {
        let mut v = Vec::new();
        for _ in 0..8 {
            v.push(
                Channel::from_shared(format!("http://{}", authd.addr))
                    .unwrap()
                    .connect()
                    .await
                    .unwrap(),
            );
        }
        v
    };
    let mut client = AuthServiceClient::new(channels[0].clone());
    register_on(&client, "crowd", PASSWORD).await.unwrap();
    let token = login_on(&client, "crowd", PASSWORD)
        .await
        .unwrap()
        .access_token;
    let idle = rss_kib(pid);

    let (ok1, shed1) = flood(&channels, &token, 10_000).await;
    let after_first = rss_kib(pid);
    let (ok2, shed2) = flood(&channels, &token, 10_000).await;
    let after_second = rss_kib(pid);
    eprintln!(
        "10k ValidateTokens: {ok1} ok + {shed1} shed, then {ok2} ok + {shed2} shed; \
         RSS {idle} KiB idle, {after_first} KiB after one flood, {after_second} KiB after two"
    );
    assert!(ok1 > 0 && ok2 > 0);
    assert!(after_first < 200 * 1024, "RSS {after_first} KiB");
    // A second flood reuses what the first grew: no leak per call.
    assert!(
        after_second < after_first + 20 * 1024,
        "RSS grew from {after_first} KiB to {after_second} KiB"
    );
    // Still serving normally.
    let v = client
        .validate_token(pb::ValidateTokenRequest {
            token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(v.valid);
    assert_eq!(authd.terminate().await, 0);
}

#[tokio::test]
async fn odd_session_ids_and_client_details_are_plain_data() {
    let app = TestApp::builder().spawn().await;
    let (_, mine) = app.user_with_session("odd_one").await;
    let (_, theirs) = app.user_with_session("odd_two").await;
    // Key syntax, patterns and other users' hash tags are just an unknown session.
    for id in [
        "*",
        "?",
        "[a-z]*",
        &format!("{{user:{}}}", theirs.session_id),
        &theirs.session_id,
        "\n",
        "../..",
        "\u{0}",
        "é",
    ] {
        assert_code(
            app.revoke_session(&mine.access_token, id).await,
            Code::NotFound,
        );
    }
    assert!(app.validate(&mine.access_token).await.unwrap().valid);
    assert!(app.validate(&theirs.access_token).await.unwrap().valid);

    // Whatever a client says about itself is recorded as data (cut to size), or refused
    // clearly; never INTERNAL.
    let big_agent = "ä".repeat(20_000);
    for (ip, agent) in [
        ("not-an-ip", "curl/8"),
        ("999.1.1.1", "curl/8"),
        ("", big_agent.as_str()),
        ("::1", "\u{0}\u{7f}"),
    ] {
        let answer = app
            .client
            .clone()
            .login(pb::LoginRequest {
                username: "odd_one".into(),
                password: PASSWORD.into(),
                client_ip: ip.into(),
                user_agent: agent.into(),
            })
            .await;
        match answer {
            Ok(_) => {}
            Err(s) => assert_eq!(s.code(), Code::InvalidArgument, "{ip:?}: {s:?}"),
        }
    }
    let sessions = app.list_sessions(&mine.access_token).await.unwrap();
    assert!(
        sessions.sessions.iter().all(|s| s.user_agent.len() <= 512),
        "an unbounded user agent was stored"
    );
}

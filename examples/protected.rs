//! A small gRPC service protected by authd's client layer.
//!
//! With authd running (`cargo run --release`), in another terminal:
//!
//! ```sh
//! cargo run --example protected                       # listens on 127.0.0.1:50052
//! TOKEN=…                                             # from authd's Login (see README)
//! grpcurl -plaintext -import-path proto -proto example/v1/greeter.proto \
//!   -H "authorization: Bearer $TOKEN" -d '{"name":"world"}' \
//!   127.0.0.1:50052 example.v1.Greeter/Hello
//! ```
//!
//! `AUTHD_URL` (default `http://127.0.0.1:50051`) and `LISTEN_ADDR` (default
//! `127.0.0.1:50052`) change where it talks and listens. `AUTHD_WATCH_CREDENTIAL`, one of
//! authd's `WATCH_CREDENTIALS`, lets the layer follow revocations as they happen;
//! without it, cached answers are checked again after a second.

use authd::client::{AuthConfig, AuthContext, AuthLayer, WatchCredential};
use authd::proto::example::v1::greeter_server::{Greeter, GreeterServer};
use authd::proto::example::v1::{HelloReply, HelloRequest};
use tonic::transport::{Channel, Server};
use tonic::{Request, Response, Status};

#[derive(Debug, Default)]
struct Hello;

#[tonic::async_trait]
impl Greeter for Hello {
    async fn hello(&self, request: Request<HelloRequest>) -> Result<Response<HelloReply>, Status> {
        // The layer only lets in requests with a good token, and says who sent them.
        let caller = request
            .extensions()
            .get::<AuthContext>()
            .cloned()
            .ok_or_else(|| Status::internal("no AuthContext: is the layer installed?"))?;
        Ok(Response::new(HelloReply {
            message: format!("hello {}, from {}", request.get_ref().name, caller.username),
            user_id: caller.user_id,
            username: caller.username,
            session_id: caller.session_id,
            token_checked: caller.token_checked,
        }))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let authd_url = std::env::var("AUTHD_URL").unwrap_or_else(|_| "http://127.0.0.1:50051".into());
    let listen = std::env::var("LISTEN_ADDR").unwrap_or_else(|_| "127.0.0.1:50052".into());

    // The three lines a service adds:
    let authd = Channel::from_shared(authd_url.clone())?.connect_lazy();
    let config = AuthConfig {
        watch_credential: std::env::var("AUTHD_WATCH_CREDENTIAL")
            .ok()
            .map(WatchCredential::new),
        ..AuthConfig::default()
    };
    let auth = AuthLayer::new(authd, config);
    let mut server = Server::builder().layer(auth);

    println!("protected Greeter on {listen}, checking tokens with {authd_url}");
    server
        .add_service(GreeterServer::new(Hello))
        .serve(listen.parse()?)
        .await?;
    Ok(())
}

# syntax=docker/dockerfile:1
# Build: docker build -t authd .
FROM rust:1.95-bookworm AS build
WORKDIR /src

# Dependencies first, in their own layer: rebuilt only when Cargo.toml/Cargo.lock change.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY migrations ./migrations
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src target/release/.fingerprint/authd-* target/release/deps/authd-* target/release/deps/libauthd-*

COPY src ./src
RUN cargo build --release --locked --bin authd

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin authd \
    && mkdir -p /var/lib/authd && chown 10001 /var/lib/authd
COPY --from=build /src/target/release/authd /usr/local/bin/authd
# With no database configured, authd keeps its SQLite file here.
WORKDIR /var/lib/authd
USER 10001
ENV GRPC_ADDR=0.0.0.0:50051 HTTP_ADDR=0.0.0.0:8080 LOG_FORMAT=json
# 50051: gRPC; 8080: /metrics and /healthz.
EXPOSE 50051 8080
# `authd healthcheck` asks the local server (gRPC health, or /healthz under TLS) and
# exits 0 only when it answers SERVING.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/authd", "healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/authd"]

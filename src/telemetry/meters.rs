//! The Prometheus registry. The `metrics` facade has one recorder per process, so every
//! `Application` in a process (tests run many) shares this one; counters only grow, so a
//! test reads a value before and after its calls.

use std::sync::OnceLock;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

/// Latency buckets, in seconds: from a cached ValidateToken (~100 µs) to a request
/// timeout.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0,
];

/// How often histogram samples are folded into their buckets when nobody scrapes.
const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// The process's registry, installed as the global recorder on first use. When another
/// recorder was installed first (authd embedded in a bigger program), the handle renders
/// nothing and a warning says why.
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(install).clone()
}

fn install() -> PrometheusHandle {
    let builder = with_buckets().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "latency histograms fall back to summaries");
        PrometheusBuilder::new()
    });
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    let installed = metrics::set_global_recorder(recorder).is_ok();
    describe();
    if !installed {
        // Its samples go elsewhere: nothing to fold here.
        tracing::warn!("another metrics recorder is installed: /metrics will be empty");
        return handle;
    }
    // Histogram samples pile up until a scrape or an upkeep folds them into buckets: with
    // nobody scraping (HTTP_ADDR off, or no Prometheus), 8 bytes per call forever. Found by
    // the benchmark's memory scenario (issue #6).
    let upkeep = handle.clone();
    let started = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_INTERVAL);
                upkeep.run_upkeep();
            }
        });
    if let Err(e) = started {
        tracing::warn!(error = %e, "no metrics upkeep thread: histograms grow until scraped");
    }
    handle
}

fn with_buckets() -> Result<PrometheusBuilder, BuildError> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("authd_rpc_duration_seconds".to_owned()),
            LATENCY_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full("authd_bcrypt_wait_seconds".to_owned()),
            LATENCY_BUCKETS,
        )
}

fn describe() {
    describe_counter!(
        "authd_rpc_total",
        "gRPC calls answered, by service, method and status code"
    );
    describe_histogram!(
        "authd_rpc_duration_seconds",
        Unit::Seconds,
        "gRPC call latency, by service, method and status code"
    );
    describe_gauge!("authd_rpc_in_flight", "gRPC calls being served now");
    describe_counter!(
        "authd_rpc_shed_total",
        "gRPC calls refused RESOURCE_EXHAUSTED by a concurrency limit (scope: server or connection)"
    );
    describe_counter!(
        "authd_logins_total",
        "Login attempts that reached a password check, by outcome"
    );
    describe_counter!(
        "authd_bcrypt_rejected_total",
        "password hashing jobs refused because the bcrypt queue was full"
    );
    describe_gauge!(
        "authd_bcrypt_queue_depth",
        "password hashing jobs waiting for a bcrypt thread"
    );
    describe_histogram!(
        "authd_bcrypt_wait_seconds",
        Unit::Seconds,
        "time a password hashing job waited for a bcrypt thread"
    );
    describe_counter!(
        "authd_redis_fallbacks_total",
        "ValidateToken answers given without Redis (REDIS_FAILURE_MODE=open)"
    );
    describe_counter!(
        "authd_tokens_refused_total",
        "tokens refused by ValidateToken (valid=false) or Envoy's Check, by method and reason"
    );
    describe_counter!(
        "authd_redis_failures_total",
        "Redis failures that made authd skip Redis for REDIS_RETRY_INTERVAL"
    );
    describe_counter!(
        "authd_store_errors_total",
        "failed store calls, by store (users, sessions) and kind (unavailable, internal)"
    );
    describe_gauge!(
        "authd_pool_connections",
        "open store connections, by pool (users, sessions) and state (idle, in_use)"
    );
    describe_gauge!(
        "authd_pool_max_connections",
        "configured size of each store pool"
    );
    describe_counter!(
        "authd_tls_reloads_total",
        "TLS certificate reloads, by outcome (ok, error)"
    );
    describe_gauge!(
        "authd_connections",
        "open connections, by listener (grpc, http)"
    );
    describe_counter!(
        "authd_connections_accepted_total",
        "connections accepted under the listener's cap, by listener"
    );
    describe_counter!(
        "authd_connections_refused_total",
        "connections closed as soon as accepted because the listener's cap was reached"
    );
    describe_counter!(
        "authd_connections_closed_total",
        "connections closed before they were served, by listener and reason (timeout, tls_handshake)"
    );
    describe_counter!(
        "authd_session_cache_hits_total",
        "session checks answered from the session cache, without a Redis round trip"
    );
    describe_counter!(
        "authd_session_cache_misses_total",
        "session checks the session cache could not answer"
    );
    describe_counter!(
        "authd_session_cache_fills_refused_total",
        "answers read from the store and not cached: invalidated or reset during the read"
    );
    describe_counter!(
        "authd_session_cache_full_total",
        "answers not cached because SESSION_CACHE_MAX_ENTRIES was reached"
    );
    describe_counter!(
        "authd_session_cache_invalidations_total",
        "invalidations of one user's cached answers"
    );
    describe_counter!(
        "authd_session_cache_resets_total",
        "times the session cache was emptied (RESET, or the revocation log not followed)"
    );
    describe_gauge!(
        "authd_session_cache_entries",
        "answers the session cache holds"
    );
    describe_gauge!(
        "authd_session_cache_following",
        "1 while the revocation log is followed and the session cache answers"
    );
}

//! The `authd` binary: configuration, telemetry, serve until SIGTERM or SIGINT; or, as
//! `authd healthcheck`, ask the local server whether it is SERVING.

use std::process::ExitCode;

use authd::{Application, Config, healthcheck, startup, telemetry};

const USAGE: &str = "usage: authd [healthcheck]";

// Every call allocates (HTTP/2 frames, headers, protobuf, claims): glibc's malloc and
// free were 13 % of authd's CPU under ValidateToken load (#6, perf), mimalloc costs less.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let command = std::env::args().nth(1);
    let healthcheck = match command.as_deref() {
        None => false,
        Some("healthcheck") => true,
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!("authd: unknown command {other:?} ({USAGE})");
            return ExitCode::from(2);
        }
    };
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("authd: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("authd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if healthcheck {
        return match runtime.block_on(healthcheck::check(&config)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("authd: not healthy: {}", one_line(&e));
                ExitCode::FAILURE
            }
        };
    }
    // The OTLP exporter's channel is made on this runtime.
    let telemetry = {
        let _runtime = runtime.enter();
        match telemetry::init(config.log_format, config.otlp.as_ref()) {
            Ok(telemetry) => telemetry,
            Err(e) => {
                eprintln!("authd: {}", one_line(&e));
                return ExitCode::FAILURE;
            }
        }
    };
    let result = runtime.block_on(async {
        let app = Application::build(config).await?;
        app.run_until(startup::shutdown_signal()).await
    });
    // Flushed while the runtime that drives the exporter still runs.
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("authd: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, without the repeats that wrapped errors
/// often carry (a cause whose text its parent already shows).
fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = cause.to_string().replace('\n', " ");
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ")
}

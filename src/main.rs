//! The `authd` binary: configuration, telemetry, serve until SIGTERM or SIGINT; or, as
//! `authd healthcheck`, ask the local server whether it is SERVING; or an operator
//! command (`authd users …`, `authd admin …`: see `authd::cli`).

use std::path::PathBuf;
use std::process::ExitCode;

use authd::cli::admin::{AdminArgs, PasswordArgs};
use authd::cli::users::ImportFormat;
use authd::cli::{self, Failure, exit};
use authd::{Application, Config, healthcheck, startup, telemetry};
use clap::{Parser, Subcommand};

// Every call allocates (HTTP/2 frames, headers, protobuf, claims): glibc's malloc and
// free were 13 % of authd's CPU under ValidateToken load (#6, perf), mimalloc costs less.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// authd: users, sessions and token validation over gRPC. Without a command it serves,
/// configured by environment variables (docs/configuration.md).
#[derive(Debug, Parser)]
#[command(name = "authd", version, after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

const EXIT_CODES: &str = "Exit codes: 0 done, 1 failed, 2 bad usage or configuration, 3 not found, \
4 not allowed, 5 already exists or refused in its state, 6 unavailable (retry), 7 import with bad rows.";

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve (what authd does without a command).
    Serve,
    /// Ask the local server whether it is SERVING (exit 0) or not (exit 1).
    Healthcheck,
    /// Users, straight in the configured store (no server needed): bootstrap, import.
    #[command(subcommand, after_help = EXIT_CODES)]
    Users(UsersCommand),
    /// A running authd's AdminService, over gRPC.
    #[command(after_help = EXIT_CODES)]
    Admin(AdminArgs),
}

#[derive(Debug, Subcommand)]
enum UsersCommand {
    /// Create a user (the first admin: `authd users create alice --role admin`). The
    /// password is prompted for, or read with --password-stdin or --password-env VAR.
    Create {
        /// Username.
        name: String,
        /// A role to give (repeatable).
        #[arg(long = "role", value_name = "ROLE")]
        roles: Vec<String>,
        /// Ask for a new password at the first login.
        #[arg(long)]
        require_password_change: bool,
        #[command(flatten)]
        password: PasswordArgs,
    },
    /// Import users with their bcrypt hashes from CSV (`username,password_hash[,roles]`,
    /// roles separated by `;`) or JSON Lines (`{"username","password_hash","roles"}`).
    /// Users already there are skipped; bad rows are reported by line number.
    Import {
        /// The file.
        file: PathBuf,
        /// csv or jsonl (default: from the file's extension).
        #[arg(long, value_enum)]
        format: Option<ImportFormat>,
        /// Draw the progress bar even when stderr is not a terminal.
        #[arg(long)]
        progress: bool,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help, --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            eprintln!(
                "authd: {} (usage: authd [serve|healthcheck|users|admin]; see authd --help)",
                first.trim_start_matches("error: ")
            );
            return ExitCode::from(exit::USAGE);
        }
    };
    let healthcheck = match cli.command {
        None | Some(Command::Serve) => false,
        Some(Command::Healthcheck) => true,
        Some(Command::Users(command)) => return operate(users(command)),
        Some(Command::Admin(args)) => return operate(cli::admin::run(args)),
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

/// Runs an operator command on a runtime of its own; its failure is one line on stderr
/// and an exit code scripts can tell apart (see `authd::cli`).
fn operate(command: impl std::future::Future<Output = Result<(), Failure>>) -> ExitCode {
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
    cli::finish(runtime.block_on(command))
}

async fn users(command: UsersCommand) -> Result<(), Failure> {
    match command {
        UsersCommand::Create {
            name,
            roles,
            require_password_change,
            password,
        } => cli::users::create(&name, &roles, password.source(), require_password_change).await,
        UsersCommand::Import {
            file,
            format,
            progress,
        } => {
            let summary = cli::users::import(&file, format, progress).await?;
            if summary.bad > 0 {
                return Err(Failure::new(
                    exit::PARTIAL,
                    format!("{} bad rows (reported above by line number)", summary.bad),
                ));
            }
            Ok(())
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

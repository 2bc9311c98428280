//! The operator commands of the `authd` binary: `authd users …` works on the configured
//! users store directly (to make the first admin, or to import users), and
//! `authd admin …` drives a running authd's AdminService over gRPC.
//!
//! Exit codes, for scripts (also in docs/administration.md):
//!
//! | code | meaning |
//! |---|---|
//! | 0 | done |
//! | 1 | failed (a store or server error, or anything else) |
//! | 2 | bad usage or configuration |
//! | 3 | not found |
//! | 4 | not allowed (UNAUTHENTICATED, PERMISSION_DENIED) |
//! | 5 | already exists, or refused in its state (e.g. the user is disabled) |
//! | 6 | unavailable: a store or the server could not be reached; retry |
//! | 7 | an import finished, but some rows were bad (each reported by line number) |

pub mod admin;
pub mod users;

use std::process::ExitCode;

/// Exit codes (see the module doc).
pub mod exit {
    /// Done.
    pub const OK: u8 = 0;
    /// Failed.
    pub const FAILED: u8 = 1;
    /// Bad usage or configuration.
    pub const USAGE: u8 = 2;
    /// Not found.
    pub const NOT_FOUND: u8 = 3;
    /// Not allowed.
    pub const DENIED: u8 = 4;
    /// Already exists, or refused in its state.
    pub const CONFLICT: u8 = 5;
    /// Unavailable; retry.
    pub const UNAVAILABLE: u8 = 6;
    /// An import with bad rows.
    pub const PARTIAL: u8 = 7;
}

/// A command's failure: what to print (one line) and the exit code.
#[derive(Debug)]
pub struct Failure {
    /// Exit code.
    pub code: u8,
    /// One line for stderr.
    pub message: String,
}

impl Failure {
    /// A failure with `code`.
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// The exit code of a gRPC status.
    pub fn from_status(status: &tonic::Status) -> Self {
        use tonic::Code;
        let code = match status.code() {
            Code::NotFound => exit::NOT_FOUND,
            Code::Unauthenticated | Code::PermissionDenied => exit::DENIED,
            Code::AlreadyExists | Code::FailedPrecondition => exit::CONFLICT,
            Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted => {
                exit::UNAVAILABLE
            }
            Code::InvalidArgument => exit::USAGE,
            _ => exit::FAILED,
        };
        let name = crate::grpc::status::code_name(status.code());
        Self::new(
            code,
            format!("{name}: {}", status.message().replace('\n', " ")),
        )
    }
}

/// Prints a failure and turns it into the process's exit code.
pub fn finish(result: Result<(), Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("authd: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

/// A store error and its cause, on one line.
pub fn store_text(e: &crate::store::StoreError) -> String {
    let (crate::store::StoreError::Unavailable(source)
    | crate::store::StoreError::Internal(source)) = e;
    format!("{e}: {source:#}").replace('\n', " ")
}

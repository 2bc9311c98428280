//! The one place an `AuthError` (or a refusal by the server's own limits) becomes a
//! `tonic::Status`. Internal detail goes to the log, never to the caller.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::auth::AuthError;

/// The message every INTERNAL carries, whatever happened.
const INTERNAL_MESSAGE: &str = "internal error";

/// The `domain` of every `google.rpc.ErrorInfo` authd sends.
pub const ERROR_DOMAIN: &str = "authd";
/// ErrorInfo reason: an older refresh token was presented, and its session ended.
pub const REFRESH_TOKEN_REUSED: &str = "REFRESH_TOKEN_REUSED";
/// ErrorInfo reason: the refresh token is not one authd can use (forged, malformed,
/// of an ended session).
pub const REFRESH_TOKEN_INVALID: &str = "REFRESH_TOKEN_INVALID";

/// ErrorInfo reason: a critical call needs a second factor the request did not carry.
/// Its metadata `factor` names the factor (`otp`).
pub const SECOND_FACTOR_REQUIRED: &str = "SECOND_FACTOR_REQUIRED";
/// ErrorInfo reason: the second-factor code is wrong, or was already used.
pub const SECOND_FACTOR_INVALID: &str = "SECOND_FACTOR_INVALID";
/// ErrorInfo reason: the second-factor ticket is unknown, used, expired or past its
/// attempts: log in again.
pub const MFA_TICKET_INVALID: &str = "MFA_TICKET_INVALID";

/// A status with an authd ErrorInfo of `reason` and the metadata `factor=otp`.
fn second_factor_status(code: Code, message: &str, reason: &str) -> Status {
    Status::with_error_details(
        code,
        message,
        ErrorDetails::with_error_info(
            reason,
            ERROR_DOMAIN,
            [("factor".to_owned(), "otp".to_owned())]
                .into_iter()
                .collect::<std::collections::HashMap<String, String>>(),
        ),
    )
}

/// Advice to callers shed by a concurrency limit.
const SHED_RETRY_AFTER: Duration = Duration::from_millis(500);

/// Where a concurrency limit that refused a call applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShedScope {
    /// `GRPC_CONCURRENCY_LIMIT`: the whole server.
    Server,
    /// `GRPC_CONNECTION_CONCURRENCY_LIMIT`: the caller's connection.
    Connection,
}

impl ShedScope {
    /// The scope's name, for metrics and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            ShedScope::Server => "server",
            ShedScope::Connection => "connection",
        }
    }
}

/// The answer to a call refused because too many are in flight: retryable, with advice.
pub fn overloaded(scope: ShedScope) -> Status {
    Status::with_error_details(
        Code::ResourceExhausted,
        format!(
            "too many calls in flight on this {}; retry later",
            scope.as_str()
        ),
        ErrorDetails::with_retry_info(Some(SHED_RETRY_AFTER)),
    )
}

/// The answer to a call still running at its deadline (the server's request timeout or
/// the client's shorter `grpc-timeout`).
pub fn deadline_exceeded(limit: Duration) -> Status {
    Status::deadline_exceeded(format!("no answer within {limit:?}"))
}

/// A status code as gRPC spells it (`OK`, `INVALID_ARGUMENT`…), for logs and metrics.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

impl From<AuthError> for Status {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::InvalidArgument(violations) => {
                let message = violations
                    .iter()
                    .map(|v| format!("{} {}", v.field, v.description))
                    .collect::<Vec<_>>()
                    .join("; ");
                let details = ErrorDetails::with_bad_request(
                    violations
                        .into_iter()
                        .map(|v| tonic_types::FieldViolation {
                            reason: v.reason.to_owned(),
                            ..tonic_types::FieldViolation::new(v.field, v.description)
                        })
                        .collect::<Vec<_>>(),
                );
                Status::with_error_details(Code::InvalidArgument, message, details)
            }
            AuthError::UsernameTaken => Status::already_exists("username is already taken"),
            AuthError::InvalidCredentials => {
                Status::unauthenticated("invalid username or password")
            }
            AuthError::AccountDisabled => Status::failed_precondition("account disabled"),
            AuthError::UserNotFound => Status::not_found("user not found"),
            AuthError::LastAdmin => Status::failed_precondition(
                "refused: this is the last enabled admin (disabling, deleting or demoting it would leave nobody to administer authd); give another user the admin role first",
            ),
            AuthError::NotAdmin => Status::permission_denied(
                "not an administrator: AdminService needs the admin role or an ADMIN_CLIENT_SANS certificate",
            ),
            AuthError::Unauthenticated => {
                Status::unauthenticated("missing or invalid bearer token")
            }
            AuthError::RefreshRefused { reused } => {
                let (reason, message) = if reused {
                    (
                        REFRESH_TOKEN_REUSED,
                        "refresh token reused: the session has been ended; log in again",
                    )
                } else {
                    (
                        REFRESH_TOKEN_INVALID,
                        "invalid or expired refresh token; log in again",
                    )
                };
                Status::with_error_details(
                    Code::Unauthenticated,
                    message,
                    ErrorDetails::with_error_info(
                        reason,
                        ERROR_DOMAIN,
                        std::collections::HashMap::<String, String>::new(),
                    ),
                )
            }
            AuthError::WrongCurrentPassword => {
                Status::permission_denied("current password is wrong")
            }
            AuthError::SessionNotFound => Status::not_found("session not found"),
            AuthError::NotAWatcher => {
                Status::permission_denied("this credential may not watch revocations")
            }
            AuthError::TooManyWatchers { retry_after } => Status::with_error_details(
                Code::ResourceExhausted,
                "too many revocation watchers; retry later",
                ErrorDetails::with_retry_info(Some(retry_after)),
            ),
            AuthError::Overloaded { retry_after } => Status::with_error_details(
                Code::ResourceExhausted,
                "too many password checks in progress; retry later",
                ErrorDetails::with_retry_info(Some(retry_after)),
            ),
            AuthError::Throttled { retry_after } => Status::with_error_details(
                Code::ResourceExhausted,
                "too many failed attempts; retry later",
                ErrorDetails::with_retry_info(Some(retry_after)),
            ),
            AuthError::RegistrationThrottled { retry_after } => Status::with_error_details(
                Code::ResourceExhausted,
                "too many registrations from this address; retry later",
                ErrorDetails::with_retry_info(Some(retry_after)),
            ),
            AuthError::Unavailable { store, source } => {
                tracing::warn!(error = format!("{source:#}"), "{store} unavailable");
                Status::unavailable(format!("{store} unavailable; retry later"))
            }
            AuthError::SecondFactorRequired => second_factor_status(
                Code::Unauthenticated,
                "a second factor is required: send second_factor with a current code",
                SECOND_FACTOR_REQUIRED,
            ),
            AuthError::SecondFactorInvalid => second_factor_status(
                Code::Unauthenticated,
                "wrong or already used second-factor code",
                SECOND_FACTOR_INVALID,
            ),
            AuthError::MfaTicketInvalid => second_factor_status(
                Code::Unauthenticated,
                "invalid or expired second-factor ticket; log in again",
                MFA_TICKET_INVALID,
            ),
            AuthError::FailedPrecondition(why) => Status::failed_precondition(why),
            AuthError::Internal(source) => {
                tracing::error!(error = format!("{source:#}"), "internal error");
                Status::internal(INTERNAL_MESSAGE)
            }
        }
    }
}

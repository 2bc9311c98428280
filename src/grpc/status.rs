//! The one place an `AuthError` becomes a `tonic::Status`. Internal detail goes to the
//! log, never to the caller.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::auth::AuthError;

/// The message every INTERNAL carries, whatever happened.
const INTERNAL_MESSAGE: &str = "internal error";

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
            AuthError::Unauthenticated => {
                Status::unauthenticated("missing or invalid bearer token")
            }
            AuthError::WrongCurrentPassword => {
                Status::permission_denied("current password is wrong")
            }
            AuthError::SessionNotFound => Status::not_found("session not found"),
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
            AuthError::Unavailable { store, source } => {
                tracing::warn!(error = format!("{source:#}"), "{store} unavailable");
                Status::unavailable(format!("{store} unavailable; retry later"))
            }
            AuthError::Internal(source) => {
                tracing::error!(error = format!("{source:#}"), "internal error");
                Status::internal(INTERNAL_MESSAGE)
            }
        }
    }
}

//! The tower layer for tonic servers.

use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tonic::transport::Channel;
use tower::{Layer, Service};

use super::{AuthConfig, AuthValidator};
use crate::bearer::bearer_token;

/// Requires a valid authd bearer token on every request but the exempt paths, and puts
/// the caller's [`super::AuthContext`] into the request extensions.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    validator: AuthValidator,
}

impl AuthLayer {
    /// Checks tokens with authd over `channel` (see [`AuthValidator::new`]).
    pub fn new(channel: Channel, config: AuthConfig) -> Self {
        Self::from_validator(AuthValidator::new(channel, config))
    }

    /// Shares an existing validator (and its cache).
    pub fn from_validator(validator: AuthValidator) -> Self {
        Self { validator }
    }

    /// The validator, for its stats.
    pub fn validator(&self) -> &AuthValidator {
        &self.validator
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = RequireAuth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequireAuth {
            inner,
            validator: self.validator.clone(),
        }
    }
}

/// The service [`AuthLayer`] wraps around each tonic service.
#[derive(Debug, Clone)]
pub struct RequireAuth<S> {
    inner: S,
    validator: AuthValidator,
}

/// The token in `authorization: Bearer <token>`.
pub(crate) fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    bearer_token(headers.get(http::header::AUTHORIZATION)?.to_str().ok()?)
}

impl<S, B, R> Service<http::Request<B>> for RequireAuth<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The clone that was made ready is the one to call; keep a fresh clone here.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let validator = self.validator.clone();
        Box::pin(async move {
            if validator.is_exempt(request.uri().path()) {
                return inner.call(request).await;
            }
            // `authorize` serves a cached answer without awaiting anything; on a miss it
            // asks authd once.
            let checked = validator.authorize(bearer(request.headers())).await;
            match checked {
                Ok(context) => {
                    request.extensions_mut().insert(context);
                    inner.call(request).await
                }
                Err(status) => Ok(status.into_http()),
            }
        })
    }
}

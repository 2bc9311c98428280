//! A plain tonic interceptor, for the simplest case.

use tokio::runtime::{Handle, RuntimeFlavor};
use tonic::service::Interceptor;
use tonic::{Request, Status};

use super::AuthValidator;
use crate::bearer::bearer_token;

/// Like [`super::AuthLayer`], as an interceptor for one service:
/// `MyServer::with_interceptor(svc, AuthInterceptor::new(validator))`.
///
/// Interceptors are synchronous. A cached answer is served at once; on a miss the call to
/// authd blocks this worker thread with `block_in_place`, which needs Tokio's
/// multi-threaded runtime (on a current-thread runtime a miss answers UNAVAILABLE). The
/// layer has no such limit and also exempts health and reflection; prefer it.
#[derive(Debug, Clone)]
pub struct AuthInterceptor {
    validator: AuthValidator,
}

impl AuthInterceptor {
    /// Checks tokens with `validator`.
    pub fn new(validator: AuthValidator) -> Self {
        Self { validator }
    }
}

impl Interceptor for AuthInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token);
        let answer = match self.validator.authorize_cached(token) {
            Some(answer) => answer,
            None => {
                let handle = Handle::try_current()
                    .map_err(|_| Status::unavailable("no Tokio runtime to ask authd from"))?;
                if handle.runtime_flavor() == RuntimeFlavor::CurrentThread {
                    return Err(Status::unavailable(
                        "AuthInterceptor needs the multi-threaded runtime on a cache miss; use AuthLayer",
                    ));
                }
                let validator = self.validator.clone();
                tokio::task::block_in_place(|| handle.block_on(validator.authorize(token)))
            }
        }?;
        request.extensions_mut().insert(answer);
        Ok(request)
    }
}

//! Bearer tokens, checked the same way on both protocols: the HTTP middlewares (admin token,
//! API key of `/v1`) and a tower layer on the gRPC server that asks for the API key on the
//! methods that run models (`Generate`, `GenerateStream`, KServe `ModelInfer`), leaving health,
//! readiness, metadata and reflection open for probes.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::http::{HeaderMap, Request, Response, header};
use subtle::ConstantTimeEq;

use super::error::{ErrorKind, InferError};

/// The token of an `Authorization: Bearer <token>` header (HTTP header or gRPC metadata).
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// Whether `given` is `expected`, in time that does not depend on where they differ.
pub fn matches(expected: &str, given: &str) -> bool {
    expected.as_bytes().ct_eq(given.as_bytes()).into()
}

/// The API key check: `Ok` when no key is configured or the right one is given.
pub fn check_api_key(expected: Option<&str>, headers: &HeaderMap) -> Result<(), InferError> {
    match (expected, bearer(headers)) {
        (None, _) => Ok(()),
        (Some(expected), Some(given)) if matches(expected, given) => Ok(()),
        _ => Err(InferError::new(
            ErrorKind::Unauthenticated,
            "invalid or missing API key",
        )),
    }
}

/// gRPC methods that run a model, and so need the API key.
fn guarded(path: &str) -> bool {
    path.starts_with("/distill_serve.v1.Generate/") || path == "/inference.GRPCInferenceService/ModelInfer"
}

/// Asks for the API key on the gRPC methods that run models.
#[derive(Clone)]
pub struct GrpcApiKeyLayer {
    key: Option<Arc<str>>,
}

impl GrpcApiKeyLayer {
    /// A layer for `key` (none: every call passes).
    pub fn new(key: Option<Arc<str>>) -> Self {
        Self { key }
    }
}

impl<S> tower_layer::Layer<S> for GrpcApiKeyLayer {
    type Service = GrpcApiKey<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcApiKey {
            inner,
            key: self.key.clone(),
        }
    }
}

/// See [`GrpcApiKeyLayer`].
#[derive(Clone)]
pub struct GrpcApiKey<S> {
    inner: S,
    key: Option<Arc<str>>,
}

impl<S, B, R> tower_service::Service<Request<B>> for GrpcApiKey<S>
where
    S: tower_service::Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<R>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if guarded(request.uri().path())
            && let Err(e) = check_api_key(self.key.as_deref(), request.headers())
        {
            // A trailers-only gRPC answer: UNAUTHENTICATED, as HTTP answers 401.
            let status: tonic::Status = e.into();
            return Box::pin(std::future::ready(Ok(status.into_http())));
        }
        Box::pin(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_only_exactly_and_only_model_methods_are_guarded() {
        assert!(matches("secret", "secret"));
        assert!(!matches("secret", "secreT") && !matches("secret", "secret2") && !matches("secret", ""));
        let mut headers = HeaderMap::new();
        assert!(check_api_key(None, &headers).is_ok());
        assert_eq!(
            check_api_key(Some("k"), &headers).unwrap_err().kind,
            ErrorKind::Unauthenticated
        );
        headers.insert(header::AUTHORIZATION, "Bearer k".parse().unwrap());
        assert!(check_api_key(Some("k"), &headers).is_ok());
        assert!(guarded("/distill_serve.v1.Generate/GenerateStream"));
        assert!(guarded("/inference.GRPCInferenceService/ModelInfer"));
        assert!(!guarded("/inference.GRPCInferenceService/ServerReady"));
        assert!(!guarded("/grpc.health.v1.Health/Check"));
    }
}

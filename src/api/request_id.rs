//! `x-request-id` on both protocols: one tower layer, on the HTTP router and the gRPC server,
//! takes the client's id (or makes one), serves the request inside it (log span and
//! [`request_id`] scope) and returns it in the response headers (gRPC: initial metadata).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::http::{HeaderName, HeaderValue, Request, Response};
use tracing::Instrument;

use crate::request_id;

/// The header, as TGI, vLLM and most proxies name it.
pub const HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Wraps a service so each request runs under its id.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestIdLayer;

impl<S> tower_layer::Layer<S> for RequestIdLayer {
    type Service = RequestIdService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestIdService { inner }
    }
}

/// See [`RequestIdLayer`].
#[derive(Debug, Clone)]
pub struct RequestIdService<S> {
    inner: S,
}

impl<S, B, R> tower_service::Service<Request<B>> for RequestIdService<S>
where
    S: tower_service::Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
{
    type Response = Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<R>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let given = request.headers().get(&HEADER).and_then(|v| v.to_str().ok());
        let id = request_id::accept(given);
        // The path names the route or gRPC method; never the body (it may be a medical record).
        let span = tracing::info_span!("request", id = %id, path = %request.uri().path());
        let header = HeaderValue::from_str(&id).ok();
        let response = self.inner.call(request);
        Box::pin(request_id::scope(id, async move {
            let mut response = response.instrument(span).await?;
            if let Some(header) = header {
                response.headers_mut().insert(HEADER, header);
            }
            Ok(response)
        }))
    }
}

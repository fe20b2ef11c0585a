//! `x-request-id` and `traceparent` on both protocols: one tower layer, on the HTTP router and
//! the gRPC server, takes the client's id (or makes one), serves the request inside it (log
//! span and [`request_id`] scope) and returns it in the response headers (gRPC: initial
//! metadata). The same span is the request's server span in an exported trace, continuing the
//! trace of the client's W3C `traceparent`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::http::{HeaderName, HeaderValue, Request, Response};
use tracing::Instrument;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::{request_id, telemetry};

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
    type Response = Response<InSpan<R>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let given = request.headers().get(&HEADER).and_then(|v| v.to_str().ok());
        let id = request_id::accept(given);
        // The path names the route or gRPC method; never the body (it may be a medical record).
        let path = request.uri().path();
        let span = tracing::info_span!(
            "request",
            id = %id,
            path = %path,
            otel.name = Empty,
            otel.kind = Empty,
            http.response.status_code = Empty,
            otel.status_code = Empty,
        );
        // Set only when exporting, so log lines do not carry them.
        if telemetry::exporting() {
            span.record("otel.name", span_name(&request));
            span.record("otel.kind", "server");
            // Without a usable traceparent there is no parent to set.
            let _ = span.set_parent(telemetry::remote_parent(request.headers()));
        }
        let header = HeaderValue::from_str(&id).ok();
        let response = self.inner.call(request);
        Box::pin(request_id::scope(id, async move {
            let mut response = response.instrument(span.clone()).await?;
            let status = response.status();
            span.record("http.response.status_code", i64::from(status.as_u16()));
            if status.is_server_error() && telemetry::exporting() {
                span.record("otel.status_code", "error");
            }
            if let Some(header) = header {
                response.headers_mut().insert(HEADER, header);
            }
            Ok(response.map(|body| InSpan { body, span }))
        }))
    }
}

pin_project_lite::pin_project! {
    /// A response body read inside its request's span, so the span (and an exported server
    /// span) lasts until a streamed answer's last frame, not just its headers.
    pub struct InSpan<B> {
        #[pin]
        body: B,
        span: tracing::Span,
    }
}

impl<B: http_body::Body> http_body::Body for InSpan<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let _entered = this.span.enter();
        this.body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The span's name as OpenTelemetry's conventions give it: `METHOD /path` for HTTP, the
/// `package.Service/Method` for gRPC.
fn span_name<B>(request: &Request<B>) -> String {
    let path = request.uri().path();
    let grpc = request
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if grpc {
        path.trim_start_matches('/').to_string()
    } else {
        format!("{} {path}", request.method())
    }
}

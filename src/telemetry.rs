//! OpenTelemetry traces, off unless `--otlp-endpoint` is given: spans of the `distill_serve`
//! crate (a request, its generation, and the generation's queue, prefill and decode stages) go
//! to an OTLP/HTTP collector as protobuf, and each request continues the trace its client
//! names in a W3C `traceparent` header (HTTP) or metadata entry (gRPC).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_http::{Bytes, HeaderExtractor, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::Layer;
use tracing_subscriber::registry::Registry;

/// The `service.name` of exported spans when neither `--otlp-service-name` nor
/// `OTEL_SERVICE_NAME` names one.
pub const DEFAULT_SERVICE_NAME: &str = "distill-serve";

/// Whether spans are exported (set once, at start).
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether this process exports traces.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// How long one export may take before it is given up (the spans are dropped, never retried).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where and as what spans are exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceSettings {
    /// The collector's OTLP/HTTP traces URL (`…/v1/traces`).
    pub traces_url: String,
    /// The `service.name` resource attribute.
    pub service_name: String,
}

impl TraceSettings {
    /// Settings for the collector at `endpoint`: a base URL such as `http://collector:4318`
    /// (the way `OTEL_EXPORTER_OTLP_ENDPOINT` is read: `/v1/traces` is appended) or the full
    /// traces URL.
    pub fn new(endpoint: &str, service_name: Option<String>) -> Result<Self> {
        let url = url::Url::parse(endpoint).with_context(|| format!("--otlp-endpoint {endpoint:?} is not a URL"))?;
        anyhow::ensure!(
            matches!(url.scheme(), "http" | "https"),
            "--otlp-endpoint must be an http or https URL (OTLP/HTTP), not {endpoint:?}"
        );
        let base = endpoint.trim_end_matches('/');
        let traces_url = if base.ends_with("/v1/traces") {
            base.to_string()
        } else {
            format!("{base}/v1/traces")
        };
        let service_name = service_name
            .or_else(|| std::env::var("OTEL_SERVICE_NAME").ok())
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_string());
        Ok(Self {
            traces_url,
            service_name,
        })
    }
}

/// The running exporter; [`Tracing::shutdown`] sends what is still buffered.
pub struct Tracing {
    provider: SdkTracerProvider,
}

/// A tracing layer that turns the crate's spans into OpenTelemetry spans.
pub type TraceLayer = Box<dyn Layer<Registry> + Send + Sync>;

impl Tracing {
    /// Starts exporting to `settings`' collector; exports are sent from `runtime`. Sets the
    /// W3C trace-context propagator that [`remote_parent`] reads.
    pub fn start(settings: &TraceSettings, runtime: tokio::runtime::Handle) -> Result<(Self, TraceLayer)> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(EXPORT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .context("building the OTLP HTTP client")?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(settings.traces_url.clone())
            .with_timeout(EXPORT_TIMEOUT)
            .with_http_client(OnRuntime { client, runtime })
            .build()
            .context("building the OTLP span exporter")?;
        let resource = Resource::builder()
            .with_service_name(settings.service_name.clone())
            .with_attribute(opentelemetry::KeyValue::new(
                "service.version",
                env!("CARGO_PKG_VERSION"),
            ))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        EXPORTING.store(true, Ordering::Relaxed);
        let tracer = provider.tracer("distill-serve");
        // Spans only: events (log lines) stay in the log, where --log-prompts governs them.
        let only_our_spans = tracing_subscriber::filter::filter_fn(|meta| {
            meta.is_span() && meta.target().starts_with("distill_serve") && *meta.level() <= tracing::Level::INFO
        });
        let layer = tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_threads(false)
            .with_location(false)
            .with_target(false)
            .with_tracked_inactivity(false)
            .with_filter(only_our_spans);
        Ok((Self { provider }, Box::new(layer)))
    }

    /// Exports the spans still buffered and stops.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "the last spans could not be exported");
        }
    }
}

/// The trace context a request's client sent in its `traceparent` header (none: an empty
/// context, so the request starts a trace).
pub fn remote_parent(headers: &axum::http::HeaderMap) -> opentelemetry::Context {
    opentelemetry::global::get_text_map_propagator(|propagator| propagator.extract(&HeaderExtractor(headers)))
}

/// Sends exports with the server's reqwest client on its runtime. The SDK's batch processor
/// runs exports on a thread of its own, outside any runtime, where reqwest cannot run; a task
/// spawned on the runtime can be awaited from anywhere.
#[derive(Debug)]
struct OnRuntime {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl HttpClient for OnRuntime {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let request = reqwest::Request::try_from(request)?;
        let client = self.client.clone();
        let sent = self.runtime.spawn(async move {
            let response = client.execute(request).await?;
            let status = response.status();
            let body = response.bytes().await?;
            Ok::<_, reqwest::Error>((status, body))
        });
        let (status, body) = sent.await??;
        Ok(Response::builder().status(status).body(body)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_read_like_otel_exporter_otlp_endpoint() {
        let base = TraceSettings::new("http://collector:4318", Some("svc".into())).unwrap();
        assert_eq!(base.traces_url, "http://collector:4318/v1/traces");
        assert_eq!(base.service_name, "svc");
        let full = TraceSettings::new("https://collector/v1/traces/", None).unwrap();
        assert_eq!(full.traces_url, "https://collector/v1/traces");
        for bad in ["collector:4318", "grpc://collector:4317", "not a url"] {
            assert!(TraceSettings::new(bad, None).is_err(), "{bad}");
        }
    }
}

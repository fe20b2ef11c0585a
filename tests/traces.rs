//! OpenTelemetry traces of a real server process: with `--otlp-endpoint` pointed at a small
//! OTLP/HTTP receiver on loopback (a collector's stand-in), each request is one trace with a
//! server span, its generation, and the generation's queue, prefill and decode stages; a
//! client's W3C `traceparent` (HTTP header, gRPC metadata) names the trace and the parent.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use common::server::TestServer;
use distill_serve::api::grpc::proto::generate::{GenerateRequest, generate_client::GenerateClient};
use futures::StreamExt;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::{Span, span::SpanKind};
use prost::Message;
use serde_json::json;

/// A collector's stand-in: every span it was sent, with its resource's `service.name`.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

impl Receiver {
    /// Listens on loopback; returns the base URL to give `--otlp-endpoint`.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let spans = Arc::clone(&self.spans);
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |headers: axum::http::HeaderMap, body: Bytes| async move {
                assert_eq!(headers["content-type"], "application/x-protobuf");
                let request = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf export");
                let mut spans = spans.lock().unwrap();
                for resource in request.resource_spans {
                    let service = resource
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .find(|a| a.key == "service.name")
                        .and_then(|a| string(a.value.as_ref()?.value.as_ref()?))
                        .unwrap_or_default();
                    for scope in resource.scope_spans {
                        spans.extend(scope.spans.into_iter().map(|s| (service.clone(), s)));
                    }
                }
                // An empty ExportTraceServiceResponse.
                ([("content-type", "application/x-protobuf")], Vec::<u8>::new())
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}")
    }

    /// The spans of `trace_id` once its `decode` span and server span have arrived.
    async fn trace(&self, trace_id: &[u8]) -> Vec<Span> {
        let spans = Arc::clone(&self.spans);
        let id = trace_id.to_vec();
        let complete = move || {
            let spans = spans.lock().unwrap();
            let of_trace: Vec<&Span> = spans.iter().map(|(_, s)| s).filter(|s| s.trace_id == id).collect();
            let has = |name: &str| of_trace.iter().any(|s| s.name == name);
            has("decode") && of_trace.iter().any(|s| s.kind == SpanKind::Server as i32)
        };
        assert!(
            TestServer::wait_for(Duration::from_secs(30), || {
                let complete = complete.clone();
                async move { complete() }
            })
            .await,
            "no complete trace {} arrived",
            hex(trace_id)
        );
        let spans = self.spans.lock().unwrap();
        for (service, _) in spans.iter() {
            assert_eq!(service, "distill-serve");
        }
        spans
            .iter()
            .map(|(_, s)| s.clone())
            .filter(|s| s.trace_id == trace_id)
            .collect()
    }
}

fn string(value: &AnyValue) -> Option<String> {
    match value {
        AnyValue::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn int(span: &Span, key: &str) -> Option<i64> {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
            AnyValue::IntValue(i) => Some(*i),
            _ => None,
        })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn one<'a>(spans: &'a [Span], name: &str) -> &'a Span {
    let found: Vec<&Span> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(found.len(), 1, "one {name:?} span in {:#?}", names(spans));
    found[0]
}

fn names(spans: &[Span]) -> Vec<&str> {
    spans.iter().map(|s| s.name.as_str()).collect()
}

/// Checks one request's trace: the server span `name` under `remote_parent` (a root when
/// none), its `generate` span, and the stages in order under that; returns the server span.
fn check_request_trace<'a>(spans: &'a [Span], name: &str, remote_parent: Option<&[u8]>) -> &'a Span {
    assert_eq!(
        spans.len(),
        5,
        "request, generate, queue, prefill, decode: {:#?}",
        names(spans)
    );
    let request = one(spans, name);
    assert_eq!(request.kind, SpanKind::Server as i32);
    assert_eq!(request.parent_span_id, remote_parent.unwrap_or_default());
    let generate = one(spans, "generate");
    assert_eq!(generate.parent_span_id, request.span_id);
    assert!(int(generate, "prompt_tokens").unwrap() > 0);
    assert!(int(generate, "completion_tokens").unwrap() > 0);
    let (queue, prefill, decode) = (one(spans, "queue"), one(spans, "prefill"), one(spans, "decode"));
    for stage in [queue, prefill, decode] {
        assert_eq!(stage.parent_span_id, generate.span_id, "{}", stage.name);
        assert!(stage.start_time_unix_nano <= stage.end_time_unix_nano);
    }
    assert_eq!(int(prefill, "batch_size"), Some(1));
    assert!(queue.end_time_unix_nano <= prefill.start_time_unix_nano);
    assert!(prefill.end_time_unix_nano <= decode.start_time_unix_nano);
    // The server span lasts until the answer's end, streamed or not.
    assert!(request.start_time_unix_nano <= queue.start_time_unix_nano);
    assert!(decode.end_time_unix_nano <= request.end_time_unix_nano);
    request
}

#[tokio::test]
async fn each_request_is_one_trace_continuing_its_clients_traceparent() {
    let receiver = Receiver::default();
    let endpoint = receiver.start().await;
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("models");
    common::server::add_version(&repo, "tiny", 1, 1);
    // Export within 100 ms instead of the SDK's 5 s.
    let server = tokio::task::spawn_blocking(move || {
        TestServer::start_with_env(
            dir,
            repo,
            &["--otlp-endpoint", &endpoint],
            &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
        )
    })
    .await
    .unwrap();

    // HTTP, with the client's trace.
    let (http_trace, http_parent) = ([0x11; 16], [0x22; 8]);
    let r = reqwest::Client::new()
        .post(server.url("/v1/completions"))
        .header(
            "traceparent",
            format!("00-{}-{}-01", hex(&http_trace), hex(&http_parent)),
        )
        .json(&json!({"model": "tiny", "prompt": "The patient", "max_tokens": 4, "temperature": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let spans = receiver.trace(&http_trace).await;
    let request = check_request_trace(&spans, "POST /v1/completions", Some(&http_parent));
    assert_eq!(int(request, "http.response.status_code"), Some(200));

    // gRPC, with the client's trace in the metadata, streamed.
    let (grpc_trace, grpc_parent) = ([0x33; 16], [0x44; 8]);
    let mut client = GenerateClient::connect(server.grpc.clone()).await.unwrap();
    let mut request = tonic::Request::new(GenerateRequest {
        model: "tiny".into(),
        prompt: "The patient".into(),
        max_tokens: Some(4),
        temperature: Some(0.0),
        ..Default::default()
    });
    let traceparent = format!("00-{}-{}-01", hex(&grpc_trace), hex(&grpc_parent));
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().unwrap());
    let mut stream = client.generate_stream(request).await.unwrap().into_inner();
    while let Some(message) = stream.next().await {
        message.unwrap();
    }
    let spans = receiver.trace(&grpc_trace).await;
    check_request_trace(&spans, "distill_serve.v1.Generate/GenerateStream", Some(&grpc_parent));

    // No traceparent (or a malformed one): the request starts a trace of its own.
    let before: Vec<Vec<u8>> = receiver
        .spans
        .lock()
        .unwrap()
        .iter()
        .map(|(_, s)| s.trace_id.clone())
        .collect();
    let r = reqwest::Client::new()
        .post(server.url("/v1/chat/completions"))
        .header("traceparent", "00-not-a-trace-01")
        .json(
            &json!({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": true}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.text().await.unwrap();
    let fresh = TestServer::wait_for(Duration::from_secs(30), || {
        let spans = Arc::clone(&receiver.spans);
        let before = before.clone();
        async move {
            spans
                .lock()
                .unwrap()
                .iter()
                .any(|(_, s)| s.name == "POST /v1/chat/completions" && !before.contains(&s.trace_id))
        }
    })
    .await;
    assert!(fresh, "the chat request's trace never arrived");
    let trace_id = receiver
        .spans
        .lock()
        .unwrap()
        .iter()
        .find(|(_, s)| s.name == "POST /v1/chat/completions")
        .map(|(_, s)| s.trace_id.clone())
        .unwrap();
    assert_ne!(trace_id, vec![0; 16]);
    let spans = receiver.trace(&trace_id).await;
    check_request_trace(&spans, "POST /v1/chat/completions", None);
}

//! SIGTERM, as Kubernetes sends it on every rollout: readiness turns off at once, new requests
//! get 503, streams in flight finish within the grace period (or end with an error when it is
//! over, never with a finish reason that calls a cut answer complete), and the process exits 0.

mod common;

use std::time::Duration;

use common::server::{TestServer, add_shaped_version};
use distill_serve::api::grpc::proto::generate::{GenerateRequest, generate_client::GenerateClient};
use distill_serve::tiny::ShapePreset;
use futures::StreamExt;
use serde_json::{Value, json};

/// A server over the 16M student (a decode step costs milliseconds, so an answer of a few
/// hundred tokens is still running when the signal comes).
fn server(extra: &[&str]) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("models");
    add_shaped_version(&repo, "mid", 1, 5, ShapePreset::Mid);
    TestServer::start_with_repo(dir, repo, extra)
}

/// A streamed completion of exactly `max_tokens` tokens.
async fn open_stream(server: &TestServer, max_tokens: usize) -> reqwest::Response {
    let body = json!({"model": "mid", "prompt": "Discharge summary:", "max_tokens": max_tokens,
                      "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}});
    let r = server.post("/v1/completions", &body).await;
    assert_eq!(r.status(), 200);
    r
}

/// The SSE `data:` payloads of a response, read to its end, after `first` already read.
async fn events(mut first: Vec<Value>, response: reqwest::Response) -> Vec<Value> {
    let mut body = response.bytes_stream();
    let mut buffer = String::new();
    while let Some(chunk) = body.next().await {
        buffer.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    first.extend(
        buffer
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).unwrap()),
    );
    first
}

/// Reads until the first chunk with text arrives: the answer is under way.
async fn first_chunks(response: &mut reqwest::Response) -> Vec<Value> {
    let mut buffer = String::new();
    loop {
        let chunk = response
            .chunk()
            .await
            .unwrap()
            .expect("the stream ended before any text");
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        let Some(end) = buffer.rfind("\n\n") else { continue };
        let complete: Vec<Value> = buffer[..end]
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        if complete
            .iter()
            .any(|c| c["choices"][0]["text"].as_str().is_some_and(|t| !t.is_empty()))
        {
            assert!(buffer[end..].trim().is_empty(), "a chunk boundary fell mid-event");
            return complete;
        }
    }
}

fn finish_reasons(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| e["choices"].get(0)?["finish_reason"].as_str().map(String::from))
        .collect()
}

#[tokio::test]
async fn sigterm_lets_a_stream_finish_refuses_new_work_and_exits_0() {
    let mut server = server(&[]);
    let mut stream = open_stream(&server, 300).await;
    let first = first_chunks(&mut stream).await;
    server.terminate();
    let not_ready = TestServer::wait_for(Duration::from_secs(5), || async {
        reqwest::get(server.url("/v2/health/ready"))
            .await
            .is_ok_and(|r| r.status() == 503)
    })
    .await;
    assert!(not_ready, "readiness stayed on after SIGTERM");
    assert_eq!(reqwest::get(server.url("/health")).await.unwrap().status(), 503);
    let refused = server
        .post(
            "/v1/completions",
            &json!({"model": "mid", "prompt": "x", "max_tokens": 4}),
        )
        .await;
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    let v: Value = refused.json().await.unwrap();
    assert_eq!(v["error"]["type"], "unavailable", "{v}");

    let events = events(first, stream).await;
    assert_eq!(finish_reasons(&events), vec!["length"]);
    let usage = events
        .iter()
        .find_map(|e| e.get("usage").filter(|u| !u.is_null()))
        .unwrap();
    assert_eq!(usage["completion_tokens"], 300, "every token arrived");
    let status = server
        .wait_exit(Duration::from_secs(30))
        .expect("the server did not exit");
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn answers_cut_by_the_grace_period_end_with_an_error_on_every_protocol() {
    let mut server = server(&["--shutdown-grace-s", "1"]);
    let mut stream = open_stream(&server, 1500).await;
    let mut grpc = GenerateClient::connect(server.grpc.clone()).await.unwrap();
    let request = GenerateRequest {
        model: "mid".into(),
        prompt: "Discharge summary:".into(),
        max_tokens: Some(1500),
        ignore_eos: true,
        ..Default::default()
    };
    let mut grpc_stream = grpc.generate_stream(request).await.unwrap().into_inner();
    grpc_stream.next().await.unwrap().unwrap();
    let first = first_chunks(&mut stream).await;
    server.terminate();

    let events = events(first, stream).await;
    assert_eq!(
        finish_reasons(&events),
        Vec::<String>::new(),
        "a cut answer has no finish reason"
    );
    let error = events.last().unwrap();
    assert_eq!(error["error"]["type"], "unavailable", "{error}");
    let mut status = None;
    while let Some(message) = grpc_stream.next().await {
        match message {
            Ok(m) => assert!(m.finish_reason.is_empty(), "{m:?}"),
            Err(s) => status = Some(s),
        }
    }
    assert_eq!(
        status.expect("the gRPC stream ended without a status").code(),
        tonic::Code::Unavailable
    );
    // The client keeps its channel open, as a service would: the server exits all the same.
    let exit = server
        .wait_exit(Duration::from_secs(30))
        .expect("the server did not exit");
    assert_eq!(exit.code(), Some(0));
}

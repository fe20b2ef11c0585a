//! Every named limit of a request, at the limit (not refused for it) and one past it (refused
//! with a 4xx that names it): body sizes by route, prompt tokens and bytes, `max_tokens`, `n`,
//! stop strings, `top_logprobs`, constraint items and separators, JSON schema size, gRPC
//! message size, upload size and lines, refresh jobs at once. Per-key limits are in
//! `security.rs`; deadlines (which bound every stream's life) in `http_api.rs`.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::server::{ADMIN_TOKEN, TestServer, add_trainable_version, add_version};
use distill_serve::api::grpc::proto::generate::{GenerateRequest, generate_client::GenerateClient};
use distill_serve::api::limits::{MAX_ADMIN_BODY_BYTES, MAX_REQUEST_BODY_BYTES, MAX_UPLOAD_BYTES, MAX_UPLOAD_LINES};
use distill_serve::constrain::{MAX_SCHEMA_ENUM_VALUES, MAX_SCHEMA_PROPERTIES};
use distill_serve::infer::{
    MAX_CONSTRAINT_ITEMS, MAX_PROMPT_BYTES_PER_TOKEN, MAX_SEPARATOR_BYTES, MAX_STOP_BYTES, MAX_STOP_STRINGS,
};
use prost::Message;
use serde_json::{Value, json};

fn context_length(repo: &Path) -> usize {
    let config: Value = serde_json::from_slice(&std::fs::read(repo.join("tiny/1/config.json")).unwrap()).unwrap();
    config["max_position_embeddings"].as_u64().unwrap() as usize
}

/// Posts `body` (raw bytes) to `path` and returns the status and the error message, if any.
async fn send(server: &TestServer, path: &str, body: Vec<u8>) -> (u16, String) {
    let mut request = reqwest::Client::new().post(server.url(path)).body(body);
    request = request.header("content-type", "application/json");
    if path.starts_with("/admin/") {
        request = request.bearer_auth(ADMIN_TOKEN);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let message = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(String::from))
        .unwrap_or(text);
    (status, message)
}

/// At `at` the request is not refused for the limit; one past it, it is refused with `status`
/// and a message holding `names`.
async fn limit(server: &TestServer, path: &str, at: Vec<u8>, over: Vec<u8>, status: u16, names: &str) {
    let (at_status, at_message) = send(server, path, at).await;
    assert!(
        !(at_status == status && at_message.contains(names)),
        "{names}: refused at the limit: {at_status} {at_message}"
    );
    let (over_status, over_message) = send(server, path, over).await;
    assert_eq!(over_status, status, "{names}: one past the limit: {over_message}");
    assert!(over_message.contains(names), "{names}: {over_message}");
}

fn body(value: Value) -> Vec<u8> {
    value.to_string().into_bytes()
}

/// A completion request with `field` set to each of `at` and `over`.
fn pair(base: &Value, field: &str, at: Value, over: Value) -> (Vec<u8>, Vec<u8>) {
    let (mut a, mut o) = (base.clone(), base.clone());
    a[field] = at;
    o[field] = over;
    (body(a), body(o))
}

/// A JSON body of exactly `size` bytes (a prompt padded to fit).
fn body_of_size(size: usize) -> Vec<u8> {
    let empty = body(json!({"model": "tiny", "prompt": ""})).len();
    body(json!({"model": "tiny", "prompt": "a".repeat(size - empty)}))
}

#[tokio::test]
async fn generation_limits_hold_at_their_value_and_refuse_one_past_it() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("models");
    add_version(&repo, "tiny", 1, 1);
    let context = context_length(&repo);
    let terminology =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/terminology/icd10cm_tabular_small.xml");
    let server = TestServer::start_with_repo(
        dir,
        repo,
        &["--terminology", &format!("icd=icd10cm-xml:{}", terminology.display())],
    );
    let c = "/v1/completions";
    let base = json!({"model": "tiny", "prompt": "The patient", "max_tokens": 1});

    let ids = |n: usize| json!(vec![5; n]);
    let mut at = json!({"model": "tiny", "prompt": ids(context - 1), "max_tokens": 1});
    let mut over = at.clone();
    over["prompt"] = ids(context);
    limit(&server, c, body(at.clone()), body(over), 400, "context length").await;
    at["prompt"] = ids(3);
    let (a, o) = pair(&at, "max_tokens", json!(context - 3), json!(context - 2));
    limit(&server, c, a, o, 400, "max_tokens").await;

    let bytes = context * MAX_PROMPT_BYTES_PER_TOKEN;
    let (a, o) = pair(&base, "prompt", json!("a".repeat(bytes)), json!("a".repeat(bytes + 1)));
    limit(&server, c, a, o, 400, "bytes per token").await;
    let (a, o) = pair(&base, "n", json!(1), json!(2));
    limit(&server, c, a, o, 400, "only n = 1").await;
    let stops = |n: usize| json!((0..n).map(|i| format!("stop{i}")).collect::<Vec<_>>());
    let (a, o) = pair(&base, "stop", stops(MAX_STOP_STRINGS), stops(MAX_STOP_STRINGS + 1));
    limit(&server, c, a, o, 400, "stop strings").await;
    let (a, o) = pair(
        &base,
        "stop",
        json!(["s".repeat(MAX_STOP_BYTES)]),
        json!(["s".repeat(MAX_STOP_BYTES + 1)]),
    );
    limit(&server, c, a, o, 400, "stop string may be at most").await;
    let (a, o) = pair(&base, "logprobs", json!(20), json!(21));
    limit(&server, c, a, o, 400, "alternatives per token").await;

    let constraint =
        |items: usize, separator: &str| json!({"terminology": "icd", "max_items": items, "separator": separator});
    let (a, o) = pair(
        &base,
        "constraint",
        constraint(MAX_CONSTRAINT_ITEMS, "; "),
        constraint(MAX_CONSTRAINT_ITEMS + 1, "; "),
    );
    limit(&server, c, a, o, 400, "max_items").await;
    let (sep_at, sep_over) = (";".repeat(MAX_SEPARATOR_BYTES), ";".repeat(MAX_SEPARATOR_BYTES + 1));
    let (a, o) = pair(&base, "constraint", constraint(2, &sep_at), constraint(2, &sep_over));
    limit(&server, c, a, o, 400, "separator may be at most").await;

    let chat = json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1});
    let schema = |properties: usize| {
        let props: serde_json::Map<String, Value> = (0..properties)
            .map(|i| (format!("p{i}"), json!({"type": "integer"})))
            .collect();
        json!({"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object", "properties": props}}})
    };
    let (a, o) = pair(
        &chat,
        "response_format",
        schema(MAX_SCHEMA_PROPERTIES),
        schema(MAX_SCHEMA_PROPERTIES + 1),
    );
    limit(&server, "/v1/chat/completions", a, o, 400, "properties").await;
    let enumerated = |n: usize| {
        let values: Vec<String> = (0..n).map(|i| format!("v{i}")).collect();
        json!({"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object",
               "properties": {"e": {"type": "string", "enum": values}}}}})
    };
    let (a, o) = pair(
        &chat,
        "response_format",
        enumerated(MAX_SCHEMA_ENUM_VALUES),
        enumerated(MAX_SCHEMA_ENUM_VALUES + 1),
    );
    limit(&server, "/v1/chat/completions", a, o, 400, "enum").await;

    let named = format!("limit of {MAX_REQUEST_BODY_BYTES} bytes");
    limit(
        &server,
        c,
        body_of_size(MAX_REQUEST_BODY_BYTES),
        body_of_size(MAX_REQUEST_BODY_BYTES + 1),
        413,
        &named,
    )
    .await;
    let coverage = "/v1/terminologies/icd/coverage";
    limit(
        &server,
        coverage,
        body_of_size(MAX_REQUEST_BODY_BYTES),
        body_of_size(MAX_REQUEST_BODY_BYTES + 1),
        413,
        &named,
    )
    .await;

    // gRPC: tonic refuses a message past the limit before it is decoded.
    let message = |size: usize| {
        let empty = GenerateRequest {
            model: "tiny".into(),
            ..Default::default()
        };
        let mut m = empty.clone();
        m.prompt = "a".repeat(size - empty.encoded_len() - 5);
        while m.encoded_len() < size {
            m.prompt.push('a');
        }
        assert_eq!(m.encoded_len(), size);
        m
    };
    let mut client = GenerateClient::connect(server.grpc.clone())
        .await
        .unwrap()
        .max_encoding_message_size(usize::MAX);
    let at = client.generate(message(MAX_REQUEST_BODY_BYTES)).await.unwrap_err();
    assert_eq!(at.code(), tonic::Code::InvalidArgument, "{at:?}");
    let over = client.generate(message(MAX_REQUEST_BODY_BYTES + 1)).await.unwrap_err();
    assert_eq!(over.code(), tonic::Code::OutOfRange, "{over:?}");
}

/// JSONL of `lines` distinct prompts, padded so the body is `size` bytes when given.
fn jsonl(lines: usize, size: Option<usize>) -> Vec<u8> {
    let mut out: Vec<u8> = (0..lines)
        .flat_map(|i| format!("{{\"prompt\": \"p{i}\"}}\n").into_bytes())
        .collect();
    if let Some(size) = size {
        let pad = size - out.len() - "{\"prompt\": \"\"}\n".len();
        out.extend(format!("{{\"prompt\": \"{}\"}}\n", "x".repeat(pad)).into_bytes());
        assert_eq!(out.len(), size);
    }
    out
}

#[tokio::test]
async fn upload_and_admin_limits_hold_at_their_value_and_refuse_one_past_it() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("models");
    add_trainable_version(&repo, "first", 1, 1);
    add_trainable_version(&repo, "second", 1, 2);
    let server = TestServer::start_with_repo(dir, repo, &[]);

    let upload = "/admin/v1/datasets/notes";
    let lines = format!("at most {MAX_UPLOAD_LINES}");
    limit(
        &server,
        upload,
        jsonl(MAX_UPLOAD_LINES, None),
        jsonl(MAX_UPLOAD_LINES + 1, None),
        413,
        &lines,
    )
    .await;
    let named = format!("limit of {MAX_UPLOAD_BYTES} bytes");
    limit(
        &server,
        upload,
        jsonl(10, Some(MAX_UPLOAD_BYTES)),
        jsonl(10, Some(MAX_UPLOAD_BYTES + 1)),
        413,
        &named,
    )
    .await;
    let refresh = "/admin/v1/models/first/refresh";
    let padded = |size: usize| {
        let empty = body(json!({"pad": ""})).len();
        body(json!({"pad": "x".repeat(size - empty)}))
    };
    let named = format!("limit of {MAX_ADMIN_BODY_BYTES} bytes");
    limit(
        &server,
        refresh,
        padded(MAX_ADMIN_BODY_BYTES),
        padded(MAX_ADMIN_BODY_BYTES + 1),
        413,
        &named,
    )
    .await;

    // One refresh job at a time (the default): a teacher that never answers keeps the first
    // running while the second is refused.
    let teacher = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", teacher.local_addr().unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let held = Arc::clone(&stop);
    tokio::spawn(async move {
        let mut open = Vec::new();
        while !held.load(Ordering::Relaxed) && open.len() < 16 {
            if let Ok((socket, _)) = teacher.accept().await {
                open.push(socket);
            }
        }
    });
    let job = body(json!({"dataset": "notes", "train": {"steps": 1},
                          "teacher": {"url": url, "model": "t", "timeout_ms": 60000, "max_retries": 0}}));
    let (first, message) = send(&server, refresh, job.clone()).await;
    assert_eq!(first, 202, "{message}");
    let (second, message) = send(&server, "/admin/v1/models/second/refresh", job).await;
    assert_eq!(second, 409);
    assert!(message.contains("--max-refresh-jobs"), "{message}");
    stop.store(true, Ordering::Relaxed);
}

//! What the server says on stderr: start-up at the default level, JSON lines for log shippers,
//! the request id on every line about a request (and in its response), and never a prompt's or
//! an answer's text below `trace` (these are medical records).

mod common;

use std::ffi::OsStr;
use std::sync::{Arc, Mutex};

use common::launch::{Launched, launch};
use common::server::add_version;
use serde_json::{Value, json};

/// Starts a server over one tiny model with `args` and `env`, collecting its log lines.
fn start(args: &[&str], env: &[(&str, &str)]) -> (Launched, Arc<Mutex<Vec<String>>>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("models");
    add_version(&repo, "tiny", 1, 1);
    let mut all: Vec<&OsStr> = vec!["--model-repository".as_ref(), repo.as_os_str()];
    all.extend(args.iter().map(OsStr::new));
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&lines);
    let server = launch(common::binary(), &all, env, move |l| {
        sink.lock().unwrap().push(l.to_string())
    })
    .unwrap();
    (server, lines, dir)
}

#[test]
fn start_up_is_logged_at_the_default_level() {
    // An empty RUST_LOG is the default level.
    let (_server, lines, _dir) = start(&[], &[("RUST_LOG", "")]);
    let log = lines.lock().unwrap().join("\n");
    for needle in [
        "distill-serve starting",
        "model loaded",
        "model=tiny",
        "precision=",
        "HTTP listening",
        "gRPC listening",
    ] {
        assert!(log.contains(needle), "no {needle:?} in:\n{log}");
    }
}

#[tokio::test]
async fn warm_up_runs_the_largest_prefill_at_load_when_asked() {
    let (server, lines, _dir) = start(&["--warmup"], &[("RUST_LOG", "")]);
    let log = lines.lock().unwrap().join("\n");
    // The token budget (4096) over the longest bucket (the context, 2048, less one): two rows.
    assert!(log.contains("warmed up") && log.contains("rows=2 tokens=2047"), "{log}");
    let answer = reqwest::Client::new()
        .post(format!("http://{}/v1/completions", server.http))
        .json(&json!({"model": "tiny", "prompt": "x", "max_tokens": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
}

#[tokio::test]
async fn json_lines_carry_the_request_id_and_no_prompt_or_answer_text() {
    let (server, lines, _dir) = start(&["--log-format", "json"], &[("RUST_LOG", "debug")]);
    let secret = "SECRET-PATIENT-NOTE";
    let body = json!({"model": "tiny", "prompt": secret, "max_tokens": 6, "temperature": 0});
    let r = reqwest::Client::new()
        .post(format!("http://{}/v1/completions", server.http))
        .header("x-request-id", "trace-7")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "trace-7");
    let answer: Value = r.json().await.unwrap();
    let text = answer["choices"][0]["text"].as_str().unwrap().to_string();
    let r = reqwest::Client::new()
        .post(format!("http://{}/v1/completions", server.http))
        .json(&json!({"model": "nope", "prompt": secret}))
        .send()
        .await
        .unwrap();
    let fresh = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(fresh.len(), 32, "a request without an id gets one: {fresh}");

    use distill_serve::api::grpc::proto::generate::{GenerateRequest, generate_client::GenerateClient};
    let mut grpc = GenerateClient::connect(format!("http://{}", server.grpc))
        .await
        .unwrap();
    let mut request = tonic::Request::new(GenerateRequest {
        model: "tiny".into(),
        prompt: secret.into(),
        max_tokens: Some(4),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("x-request-id", "grpc-trace-9".parse().unwrap());
    let reply = grpc.generate(request).await.unwrap();
    assert_eq!(reply.metadata().get("x-request-id").unwrap(), "grpc-trace-9");

    // The lines of the ended requests may trail the answers a little.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let lines = lines.lock().unwrap().clone();
    let parsed: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(parsed.iter().all(Value::is_object));
    let about = |id: &str| {
        parsed
            .iter()
            .filter(|l| l["span"]["id"] == id || l["spans"].as_array().is_some_and(|s| s.iter().any(|s| s["id"] == id)))
            .count()
    };
    assert!(
        about("trace-7") >= 2,
        "the request's lines carry its id:\n{}",
        lines.join("\n")
    );
    assert!(about(&fresh) >= 1, "a failed request is logged with its id");
    assert!(about("grpc-trace-9") >= 1, "gRPC requests too");
    for line in &lines {
        assert!(!line.contains(secret), "the prompt leaked into the log: {line}");
        if text.trim().len() > 3 {
            assert!(!line.contains(&text), "the answer leaked into the log: {line}");
        }
    }
}

/// `--log-prompts` logs prompts and answers at info, with the model's `capture_redact`
/// patterns applied; without it neither appears (see above).
#[tokio::test]
async fn log_prompts_logs_them_redacted_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("models");
    add_version(&repo, "tiny", 1, 1);
    std::fs::write(
        repo.join("tiny/model.toml"),
        "name = \"tiny\"\ncapture_redact = ['\\d{3}-\\d{2}-\\d{4}']\n",
    )
    .unwrap();
    let mut args: Vec<&OsStr> = vec![
        "--model-repository".as_ref(),
        repo.as_os_str(),
        "--log-prompts".as_ref(),
    ];
    args.push("--log-format".as_ref());
    args.push("json".as_ref());
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&lines);
    let server = launch(common::binary(), &args, &[("RUST_LOG", "")], move |l| {
        sink.lock().unwrap().push(l.to_string())
    })
    .unwrap();
    let body = json!({"model": "tiny", "prompt": "VISIBLE-NOTE ssn 123-45-6789", "max_tokens": 4, "temperature": 0});
    let r = reqwest::Client::new()
        .post(format!("http://{}/v1/completions", server.http))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let log = lines.lock().unwrap().join("\n");
    assert!(log.contains("VISIBLE-NOTE ssn [REDACTED]"), "{log}");
    assert!(!log.contains("123-45-6789"), "an unredacted number reached the log");
    assert!(log.contains("answer (--log-prompts)"), "{log}");
}

#[tokio::test]
async fn constrained_requests_name_their_terminology_release_in_the_log() {
    let fixture = common::repo_file("tests/fixtures/terminology/icd10cm_tabular_small.xml");
    let terminology = format!("icd=icd10cm-xml:{}", fixture.display());
    let args = ["--log-format", "json", "--terminology", &terminology];
    let (server, lines, _dir) = start(&args, &[("RUST_LOG", "debug")]);
    let body = json!({"model": "tiny", "prompt": "Code:", "max_tokens": 20,
                      "constraint": {"terminology": "icd", "subset": ["E11", "I10"]}});
    let r = reqwest::Client::new()
        .post(format!("http://{}/v1/completions", server.http))
        .header("x-request-id", "coded-1")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let lines = lines.lock().unwrap().clone();
    let named = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| {
            l["spans"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s["id"] == "coded-1"))
        })
        .filter_map(|l| l["span"]["terminology"].as_str().map(String::from))
        .collect::<Vec<_>>();
    assert!(
        named.iter().any(|t| t == "icd@2026 [E11,I10]"),
        "no line of the request names its release: {named:?}\n{}",
        lines.join("\n")
    );
}

//! The HTTP API of a real server process on loopback, as OpenAI SDK and KServe clients use it.

mod common;

use std::time::Duration;

use common::server::{ADMIN_TOKEN, TestServer, add_version};
use futures::StreamExt;
use serde_json::{Value, json};

async fn post(server: &TestServer, path: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(server.url(path))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

async fn completion_text(server: &TestServer, prompt: &str, seed: u64) -> String {
    let body = json!({"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0.8, "seed": seed});
    let (status, v) = post(server, "/v1/completions", body).await;
    assert_eq!(status, 200, "{v}");
    v["choices"][0]["text"].as_str().unwrap().to_string()
}

/// Concatenated content of an SSE chat stream, checking it ends with `[DONE]`.
async fn stream_chat(server: &TestServer, body: Value) -> (String, Vec<Value>) {
    let r = server.post("/v1/chat/completions", &body).await;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let text = r.text().await.unwrap();
    let data: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{text}");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let content = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0)?["delta"]["content"].as_str().map(str::to_string))
        .collect();
    (content, chunks)
}

#[tokio::test]
async fn greedy_text_is_the_same_on_every_route() {
    let server = TestServer::start(&[]);
    let messages = json!([{"role": "user", "content": "What is the code for essential hypertension?"}]);
    let chat = json!({"model": "tiny", "messages": messages, "max_tokens": 20, "temperature": 0});
    let (status, v) = post(&server, "/v1/chat/completions", chat.clone()).await;
    assert_eq!(status, 200, "{v}");
    let chat_text = v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(!chat_text.is_empty());
    assert_eq!(
        v["usage"]["completion_tokens"].as_u64().unwrap() + v["usage"]["prompt_tokens"].as_u64().unwrap(),
        v["usage"]["total_tokens"].as_u64().unwrap()
    );

    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let (stream_text, chunks) = stream_chat(&server, streamed).await;
    assert_eq!(stream_text, chat_text);
    assert_eq!(chunks.last().unwrap()["usage"], v["usage"]);

    // The same prompt, rendered by hand with the student's template, through /v1/completions.
    let prompt = "<|im_start|>user\nWhat is the code for essential hypertension?<|im_end|>\n<|im_start|>assistant\n";
    let completion = json!({"model": "tiny", "prompt": prompt, "max_tokens": 20, "temperature": 0});
    let (status, v) = post(&server, "/v1/completions", completion).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["text"].as_str().unwrap(), chat_text);
}

#[tokio::test]
async fn sixty_four_concurrent_requests_each_get_their_own_answer() {
    let server = TestServer::start(&[]);
    let prompts: Vec<String> = (0..64).map(|i| format!("Patient {i} reports")).collect();
    let mut expected = Vec::new();
    for (i, p) in prompts.iter().enumerate().take(8) {
        expected.push(completion_text(&server, p, i as u64).await);
    }
    let answers = futures::future::join_all(
        prompts
            .iter()
            .enumerate()
            .map(|(i, p)| completion_text(&server, p, i as u64)),
    )
    .await;
    assert_eq!(answers.len(), 64);
    assert_eq!(
        &answers[..8],
        &expected[..],
        "concurrent answers differ from sequential ones"
    );
    let distinct: std::collections::HashSet<_> = answers.iter().collect();
    assert!(
        distinct.len() > 32,
        "answers are not per request: {} distinct",
        distinct.len()
    );
}

#[tokio::test]
async fn bad_input_gets_a_clear_error_and_the_server_stays_up() {
    let server = TestServer::start(&[]);
    let client = reqwest::Client::new();
    let raw = |body: Vec<u8>| {
        client
            .post(server.url("/v1/completions"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let r = raw(b"{\"model\": \"tiny\", \"prompt\": ".to_vec()).await.unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");

    let r = raw(b"{\"model\": \"tiny\", \"prompt\": \"\xff\xfe\"}".to_vec())
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "invalid UTF-8");

    let (status, v) = post(&server, "/v1/completions", json!({"model": "nope", "prompt": "x"})).await;
    assert_eq!((status, v["error"]["param"].as_str()), (404, Some("model")));

    let long = "word ".repeat(3000);
    let (status, v) = post(&server, "/v1/completions", json!({"model": "tiny", "prompt": long})).await;
    assert_eq!(status, 400);
    assert!(v["error"]["message"].as_str().unwrap().contains("2048"), "{v}");

    for max_tokens in [json!(0), json!(-5), json!(5000)] {
        let (status, v) = post(
            &server,
            "/v1/completions",
            json!({"model": "tiny", "prompt": "x", "max_tokens": max_tokens}),
        )
        .await;
        assert_eq!((status, v["error"]["param"].as_str()), (400, Some("max_tokens")), "{v}");
    }
    let (status, v) = post(
        &server,
        "/v1/completions",
        json!({"model": "tiny", "prompt": "x", "max_tokens": "many"}),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        v["error"]["message"].as_str().unwrap().contains("max_tokens")
            || v["error"]["message"].as_str().unwrap().contains("invalid type"),
        "{v}"
    );
    let (status, _) = post(
        &server,
        "/v1/chat/completions",
        json!({"model": "tiny", "messages": []}),
    )
    .await;
    assert_eq!(status, 400);
    let (status, v) = post(
        &server,
        "/v1/chat/completions",
        json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 21}),
    )
    .await;
    assert_eq!((status, v["error"]["param"].as_str()), (400, Some("top_logprobs")));
    let long_stop = "x".repeat(distill_serve::infer::MAX_STOP_BYTES + 1);
    let (status, v) = post(
        &server,
        "/v1/completions",
        json!({"model": "tiny", "prompt": "x", "stop": [long_stop]}),
    )
    .await;
    assert_eq!((status, v["error"]["param"].as_str()), (400, Some("stop")), "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("256"), "{v}");
    for min_tokens in [-1, 9] {
        let body = json!({"model": "tiny", "prompt": "x", "max_tokens": 8, "min_tokens": min_tokens});
        let (status, v) = post(&server, "/v1/completions", body).await;
        assert_eq!((status, v["error"]["param"].as_str()), (400, Some("min_tokens")), "{v}");
    }

    assert!(!completion_text(&server, "still up?", 1).await.is_empty());
}

/// Load generators' conventions (vLLM's names): `ignore_eos` gives exactly `max_tokens`, on
/// both protocols; `priority` is accepted.
#[tokio::test]
async fn ignore_eos_generates_max_tokens_on_every_protocol() {
    use distill_serve::api::grpc::proto::generate::{GenerateRequest, generate_client::GenerateClient};
    let server = TestServer::start(&[]);
    for seed in 0..4 {
        let body = json!({"model": "tiny", "prompt": "x", "max_tokens": 40, "ignore_eos": true,
                          "temperature": 1.0, "seed": seed, "priority": -1});
        let (status, v) = post(&server, "/v1/completions", body).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 40);
        assert_eq!(v["choices"][0]["finish_reason"], "length");
    }
    let mut client = GenerateClient::connect(server.grpc.clone()).await.unwrap();
    let request = GenerateRequest {
        model: "tiny".into(),
        prompt: "x".into(),
        max_tokens: Some(40),
        ignore_eos: true,
        priority: Some(1),
        ..Default::default()
    };
    let answer = client.generate(request).await.unwrap().into_inner();
    assert_eq!(answer.usage.unwrap().completion_tokens, 40);
}

#[tokio::test]
async fn logprobs_are_reported_with_alternatives() {
    let server = TestServer::start(&[]);
    let body = json!({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5,
                      "temperature": 0, "logprobs": true, "top_logprobs": 3});
    let (status, v) = post(&server, "/v1/chat/completions", body).await;
    assert_eq!(status, 200, "{v}");
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 5);
    for entry in content {
        let top = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(entry["logprob"], top[0]["logprob"]);
        assert!(top[0]["logprob"].as_f64().unwrap() >= top[1]["logprob"].as_f64().unwrap());
        assert!(entry["logprob"].as_f64().unwrap() <= 0.0);
    }
}

#[tokio::test]
async fn a_client_that_disconnects_mid_stream_frees_its_work() {
    let server = TestServer::start(&[]);
    let body = json!({"model": "tiny", "prompt": "Once", "max_tokens": 2000, "stream": true, "temperature": 0,
                      "stop": ["never-appears-xyz"]});
    let r = reqwest::Client::new()
        .post(server.url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut stream = r.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).starts_with("data: "));
    drop(stream);
    let cancelled = TestServer::wait_for(Duration::from_secs(20), || async {
        server
            .metric("distill_serve_cancelled_requests_total{model=\"tiny\"}")
            .await
            >= 1.0
    })
    .await;
    assert!(cancelled, "the disconnected request was not cancelled");
    let generated = server
        .metric("distill_serve_generated_tokens_total{model=\"tiny\"}")
        .await;
    assert!(generated < 2000.0, "generation ran to the end: {generated} tokens");
    // The worker is free for the next request.
    assert!(!completion_text(&server, "next", 2).await.is_empty());
}

#[tokio::test]
async fn admin_routes_check_the_bearer_token() {
    let server = TestServer::start(&[]);
    let client = reqwest::Client::new();
    let url = server.url("/admin/v1/models");
    assert_eq!(client.get(&url).send().await.unwrap().status(), 401);
    assert_eq!(
        client.get(&url).bearer_auth("wrong").send().await.unwrap().status(),
        403
    );
    let r = client.get(&url).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["models"][0]["state"], "READY");
    let r = client
        .post(server.url("/admin/v1/models/missing/load"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn kserve_health_and_metadata() {
    let server = TestServer::start(&[]);
    let get = |path: &str| reqwest::get(server.url(path));
    assert_eq!(get("/v2/health/live").await.unwrap().status(), 200);
    assert_eq!(get("/v2/health/ready").await.unwrap().status(), 200);
    assert_eq!(get("/v2/models/tiny/ready").await.unwrap().status(), 200);
    assert_eq!(get("/v2/models/nope/ready").await.unwrap().status(), 404);
    let v: Value = get("/v2/models/tiny").await.unwrap().json().await.unwrap();
    assert_eq!(v["versions"], json!(["1"]));
    assert_eq!(v["inputs"][0]["datatype"], "BYTES");
    let models: Value = get("/v1/models").await.unwrap().json().await.unwrap();
    assert_eq!(models["data"][0]["id"], "tiny");
}

/// Sends a burst of 12 long requests to a server started with `flags`: some must be refused
/// with 429 (counted under `reason`) and every admitted one must finish.
async fn burst_gets_429s_and_admitted_requests_finish(flags: &[&str], reason: &str) {
    let server = TestServer::start(flags);
    let client = reqwest::Client::new();
    let body = json!({"model": "tiny", "prompt": "Long", "max_tokens": 300, "temperature": 0,
                      "stop": ["never-appears-xyz"]});
    let responses =
        futures::future::join_all((0..12).map(|_| client.post(server.url("/v1/completions")).json(&body).send())).await;
    let mut ok = 0;
    let mut rejected = 0;
    for r in responses {
        let r = r.unwrap();
        match r.status().as_u16() {
            200 => {
                let v: Value = r.json().await.unwrap();
                assert!(v["choices"][0]["finish_reason"].is_string(), "{v}");
                ok += 1;
            }
            429 => {
                assert!(r.headers().contains_key("retry-after"));
                let v: Value = r.json().await.unwrap();
                assert_eq!(v["error"]["type"], "overloaded");
                rejected += 1;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(ok >= 1 && rejected >= 1, "{ok} admitted, {rejected} rejected");
    let counted = server
        .metric(&format!(
            "distill_serve_rejected_requests_total{{model=\"tiny\",reason=\"{reason}\"}}"
        ))
        .await;
    assert_eq!(counted, rejected as f64, "rejections counted under {reason}");
}

#[tokio::test]
async fn a_full_queue_answers_429_with_retry_after_and_admitted_requests_finish() {
    burst_gets_429s_and_admitted_requests_finish(&["--max-queue", "2"], "queue_full").await;
}

#[tokio::test]
async fn the_concurrency_limit_answers_429_and_admitted_requests_finish() {
    let flags = ["--max-concurrent-requests", "3", "--max-batch-size", "2"];
    burst_gets_429s_and_admitted_requests_finish(&flags, "max_concurrent").await;
}

#[tokio::test]
async fn hot_reload_swaps_versions_without_failing_requests() {
    let server = TestServer::start(&[]);
    let before = completion_text(&server, "Reload test", 5).await;
    add_version(&server.repo, "tiny", 2, 99);
    let client = reqwest::Client::new();
    let completions =
        (0..40u64).map(|i| json!({"model": "tiny", "prompt": format!("Load {i}"), "max_tokens": 8, "seed": i}));
    let chats = (0..40u64).map(
        |i| json!({"model": "tiny", "messages": [{"role": "user", "content": format!("Chat {i}")}], "max_tokens": 8}),
    );
    let reload = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let r = client
            .post(server.url("/admin/v1/models/tiny/reload"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json::<Value>().await.unwrap()
    };
    let (statuses_a, statuses_b, reloaded) = tokio::join!(
        server.statuses("/v1/completions", completions),
        server.statuses("/v1/chat/completions", chats),
        reload
    );
    assert_eq!(reloaded["version"], 2);
    assert!(
        statuses_a.iter().chain(&statuses_b).all(|&s| s == 200),
        "{statuses_a:?} {statuses_b:?}"
    );
    let meta: Value = reqwest::get(server.url("/v2/models/tiny"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(meta["versions"], json!(["2"]));
    assert_ne!(
        completion_text(&server, "Reload test", 5).await,
        before,
        "version 2 must answer differently"
    );
    assert_eq!(
        server
            .metric("distill_serve_model_version_info{model=\"tiny\",version=\"2\"}")
            .await,
        1.0
    );
}

/// A newest version that cannot load (a torn copy, a bad export) does not take the model down:
/// the version before it serves, at start and at a reload.
#[tokio::test]
async fn a_broken_newest_version_falls_back_to_the_one_before() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    add_version(&repo, "tiny", 1, 1);
    add_version(&repo, "tiny", 2, 2);
    std::fs::write(repo.join("tiny/2/model.onnx"), b"not an onnx file").unwrap();
    let server = TestServer::start_with_repo(dir, repo, &[]);
    let version = || async {
        let v = server.admin_get("/admin/v1/models").await;
        (v["models"][0]["state"].clone(), v["models"][0]["version"].clone())
    };
    assert_eq!(version().await, (json!("READY"), json!(1)));
    let reload = reqwest::Client::new()
        .post(server.url("/admin/v1/models/tiny/reload"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(reload.status(), 200);
    assert_eq!(version().await, (json!("READY"), json!(1)));
    let body = json!({"model": "tiny", "prompt": "The patient", "max_tokens": 2});
    assert_eq!(server.post("/v1/completions", &body).await.status(), 200);
}

#[tokio::test]
async fn a_model_that_fails_to_load_is_reported_and_others_keep_serving() {
    // A GPU execution provider in a CPU build fails to load; `tiny` must not care.
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    add_version(&repo, "tiny", 1, 1);
    add_version(&repo, "gpu", 1, 2);
    std::fs::write(
        repo.join("gpu/model.toml"),
        "name = \"gpu\"\nexecution_provider = \"cuda\"\n",
    )
    .unwrap();
    let server = TestServer::start_with_repo(dir, repo, &[]);
    assert_eq!(
        reqwest::get(server.url("/v2/health/ready")).await.unwrap().status(),
        503
    );
    assert_eq!(
        reqwest::get(server.url("/v2/models/tiny/ready"))
            .await
            .unwrap()
            .status(),
        200
    );
    let r = reqwest::get(server.url("/v2/models/gpu/ready")).await.unwrap();
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"].as_str().unwrap().contains("cuda"), "{v}");
    let r = reqwest::Client::new()
        .get(server.url("/admin/v1/models"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    let gpu = v["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "gpu")
        .unwrap()
        .clone();
    assert_eq!(gpu["state"], "UNAVAILABLE");
    assert!(gpu["reason"].as_str().unwrap().contains("--features cuda"), "{gpu}");
    assert!(!completion_text(&server, "still serving", 3).await.is_empty());
}

#[tokio::test]
async fn a_version_without_config_json_serves_with_limits_from_the_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    add_version(&repo, "tiny", 1, 1);
    std::fs::remove_file(repo.join("tiny/1/config.json")).unwrap();
    let server = TestServer::start_with_repo(dir, repo, &[]);
    assert!(!completion_text(&server, "no config", 4).await.is_empty());
    // tokenizer_config.json of tiny students says model_max_length = 2048.
    let long = "word ".repeat(3000);
    let (status, v) = post(&server, "/v1/completions", json!({"model": "tiny", "prompt": long})).await;
    assert_eq!(status, 400);
    assert!(v["error"]["message"].as_str().unwrap().contains("2048"), "{v}");
}

#[tokio::test]
async fn a_client_that_gives_up_on_a_non_streamed_request_frees_its_work() {
    let server = TestServer::start(&[]);
    let body = json!({"model": "tiny", "prompt": "Once", "max_tokens": 2000, "temperature": 0,
                      "stop": ["never-appears-xyz"]});
    // Under the time 2000 tokens take (a run took about 600 ms once), and long enough for the
    // request to reach the server on a loaded machine (10 ms once was not): the client leaves
    // while the request waits or runs, and either way it is cancelled.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let gave_up = client.post(server.url("/v1/completions")).json(&body).send().await;
    assert!(gave_up.is_err(), "the request should have timed out on the client");
    let cancelled = TestServer::wait_for(Duration::from_secs(20), || async {
        server
            .metric("distill_serve_cancelled_requests_total{model=\"tiny\"}")
            .await
            >= 1.0
    })
    .await;
    assert!(cancelled, "the abandoned request was not cancelled");
    assert!(
        server
            .metric("distill_serve_generated_tokens_total{model=\"tiny\"}")
            .await
            < 2000.0
    );
}

#[tokio::test]
async fn responses_carry_timing_headers() {
    let server = TestServer::start(&[]);
    let body = json!({"model": "tiny", "prompt": "Timing", "max_tokens": 8});
    let r = reqwest::Client::new()
        .post(server.url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let header = |name: &str| -> f64 { r.headers()[name].to_str().unwrap().parse().unwrap() };
    let (queue, inference, total) = (
        header("x-queue-time"),
        header("x-inference-time"),
        header("x-total-time"),
    );
    assert!(
        queue >= 0.0 && inference > 0.0,
        "queue {queue} ms, inference {inference} ms"
    );
    assert!(
        total >= inference + queue,
        "total {total} ms < queue {queue} + inference {inference}"
    );
}

/// Deadlines the estimate cannot foresee (a fresh server has measured no step yet; a bucket
/// delay) end the work with 504 wherever it is; once steps are measured, a request that cannot
/// finish in time is refused at once with 429 and a Retry-After.
#[tokio::test]
async fn requests_past_their_deadline_are_dropped_with_504_or_refused_at_once() {
    let long = json!({"model": "tiny", "prompt": "Long", "max_tokens": 1500, "temperature": 0, "stop": ["never-xyz"]});
    let send = |server: &TestServer, timeout_ms: &'static str| {
        reqwest::Client::new()
            .post(server.url("/v1/completions"))
            .header("x-request-timeout-ms", timeout_ms)
            .json(&long)
            .send()
    };
    let expired = "distill_serve_rejected_requests_total{model=\"tiny\",reason=\"deadline_exceeded\"}";
    // Running: the deadline passes mid-generation.
    let server = TestServer::start(&["--max-batch-size", "1"]);
    let r = send(&server, "5").await.unwrap();
    assert_eq!(r.status(), 504);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "deadline_exceeded");
    // Once steps are measured (an answer of a few tokens; the cut one may have ended in its
    // prefill), 1500 tokens cannot come in 5 ms, and the client hears so at once.
    let few = json!({"model": "tiny", "prompt": "Short", "max_tokens": 8});
    assert_eq!(server.post("/v1/completions", &few).await.status(), 200);
    let r = send(&server, "5").await.unwrap();
    assert_eq!(r.status(), 429);
    let retry_after: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry_after >= 1);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "overloaded", "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("deadline"), "{v}");
    let refused = "distill_serve_rejected_requests_total{model=\"tiny\",reason=\"deadline_estimate\"}";
    assert_eq!(server.metric(refused).await, 1.0);
    assert_eq!(server.metric(expired).await, 1.0, "refused, not queued to expire");
    // Waiting: a lone request waits up to the bucket delay (which the estimate leaves out for a
    // free slot) and its deadline passes in the queue; it hears so at its deadline, not at the
    // end of the delay.
    let server = TestServer::start(&["--max-queue-delay-ms", "5000"]);
    let sent = std::time::Instant::now();
    let short = json!({"model": "tiny", "prompt": "Short", "max_tokens": 1});
    let r = reqwest::Client::new()
        .post(server.url("/v1/completions"))
        .header("x-request-timeout-ms", "100")
        .json(&short)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    assert!(
        sent.elapsed() < Duration::from_secs(4),
        "expired only when the bucket went"
    );
    // The worker counts the expiry as it sends the error: the count may trail the answer.
    let counted = TestServer::wait_for(Duration::from_secs(5), || async { server.metric(expired).await == 1.0 }).await;
    assert!(counted, "the expiry was not counted");
    let r = reqwest::Client::new()
        .post(server.url("/v1/completions"))
        .header("x-request-timeout-ms", "soon")
        .json(&long)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

/// `--ready-file` is written once both listeners answer, and names them.
#[tokio::test]
async fn the_ready_file_names_both_listeners_once_they_answer() {
    use distill_serve::api::grpc::proto::inference::ServerLiveRequest;
    use distill_serve::api::grpc::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;

    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("models");
    add_version(&repo, "tiny", 1, 1);
    let ready = dir.path().join("ready.json");
    let mut child = std::process::Command::new(common::binary())
        .args(["serve", "--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0"])
        .arg("--model-repository")
        .arg(&repo)
        .arg("--ready-file")
        .arg(&ready)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while !ready.exists() {
        assert!(child.try_wait().unwrap().is_none(), "the server exited");
        assert!(started.elapsed() < Duration::from_secs(90), "no ready file");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let file: Value = serde_json::from_str(&std::fs::read_to_string(&ready).unwrap()).unwrap();
    assert_eq!(file.as_object().unwrap().len(), 2, "{file}");
    let live = reqwest::get(format!("http://{}/v2/health/live", file["http"].as_str().unwrap()))
        .await
        .unwrap();
    assert_eq!(live.status(), 200);
    let mut grpc = GrpcInferenceServiceClient::connect(format!("http://{}", file["grpc"].as_str().unwrap()))
        .await
        .unwrap();
    assert!(grpc.server_live(ServerLiveRequest {}).await.unwrap().into_inner().live);
    let _ = child.kill();
    let _ = child.wait();
}

/// Under saturation (two decode slots, forty requests at once), the high class waits less: its
/// median queue time (TEI's `x-queue-time`) is below the low class's, though the low requests
/// were sent first.
#[tokio::test]
async fn the_high_priority_class_waits_less_under_saturation() {
    let server = TestServer::start(&["--max-batch-size", "2"]);
    let client = reqwest::Client::new();
    let send = |priority: i64| {
        let body = json!({"model": "tiny", "prompt": "Triage note", "max_tokens": 48, "ignore_eos": true,
                          "priority": priority});
        let request = client.post(server.url("/v1/completions")).json(&body).send();
        async move {
            let r = request.await.unwrap();
            assert_eq!(r.status(), 200);
            r.headers()["x-queue-time"].to_str().unwrap().parse::<f64>().unwrap()
        }
    };
    let low: Vec<_> = (0..20).map(|_| tokio::spawn(send(1))).collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let high: Vec<_> = (0..20).map(|_| tokio::spawn(send(-1))).collect();
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut times = Vec::new();
    for class in [low, high] {
        let mut waited = Vec::new();
        for handle in class {
            waited.push(handle.await.unwrap());
        }
        times.push(median(waited));
    }
    assert!(
        times[1] < times[0],
        "median queue ms: high {} vs low {}",
        times[1],
        times[0]
    );
}

/// A client's deadline may shorten the server's, never lengthen it, and one past what the clock
/// holds is no deadline rather than a panic (audit defects of issue 13, item 9).
#[tokio::test]
async fn client_deadlines_cannot_outlast_the_servers_or_overflow() {
    let server = TestServer::start(&["--request-timeout-ms", "40"]);
    let long = json!({"model": "tiny", "prompt": "Long", "max_tokens": 1500, "temperature": 0, "stop": ["never-xyz"]});
    let send = |timeout_ms: &'static str, body: Value| {
        reqwest::Client::new()
            .post(server.url("/v1/completions"))
            .header("x-request-timeout-ms", timeout_ms)
            .json(&body)
            .send()
    };
    // A fresh server has measured no step, so the long answer is admitted and cut at 40 ms.
    let r = send("600000", long).await.unwrap();
    assert_eq!(r.status(), 504, "the client's 10 minutes outlasted the server's 40 ms");
    let short = json!({"model": "tiny", "prompt": "x", "max_tokens": 2});
    let r = send("18446744073709551615", short).await.unwrap();
    assert_eq!(r.status(), 200);
}

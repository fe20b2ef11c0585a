//! Continuous batching against a real server: every sequence's greedy output under concurrent
//! load, joining mid-way included, equals its output when it runs alone.

mod common;

use std::time::Duration;

use common::server::TestServer;
use serde_json::{Value, json};

async fn greedy(server: &TestServer, prompt: &str, max_tokens: u32) -> String {
    let body = json!({"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0});
    let r = server.post("/v1/completions", &body).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    v["choices"][0]["text"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn outputs_under_concurrent_load_equal_outputs_alone() {
    let server = TestServer::start(&["--max-batch-size", "6", "--max-queue-delay-ms", "2"]);
    // Prompts of very different lengths (different buckets) and answers of different lengths,
    // so sequences leave at different steps and others join mid-way.
    let cases: Vec<(String, u32)> = (0..14)
        .map(|i| {
            (
                format!("Case {i}: {}", "the patient reports pain ".repeat(1 + (i % 5) * 6)),
                8 + (i as u32 % 4) * 10,
            )
        })
        .collect();
    let mut alone = Vec::new();
    for (prompt, n) in &cases {
        alone.push(greedy(&server, prompt, *n).await);
    }
    let together = futures::future::join_all(cases.iter().enumerate().map(|(i, (prompt, n))| {
        let server = &server;
        async move {
            // Staggered arrivals: later requests join a batch that is already decoding.
            tokio::time::sleep(Duration::from_millis(3 * i as u64)).await;
            greedy(server, prompt, *n).await
        }
    }))
    .await;
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a, b, "case {i}: batched output differs from the output alone");
    }
    let text = reqwest::get(server.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let count = |prefix: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0.0)
    };
    let steps = count("distill_serve_batch_size_count{model=\"tiny\"}");
    let single = count("distill_serve_batch_size_bucket{model=\"tiny\",le=\"1\"}");
    assert!(
        steps > single,
        "no decode step ran more than one sequence ({single} of {steps} were single)"
    );
    assert!(
        text.contains("distill_serve_bucket_dispatches_total{bucket=\"16\",model=\"tiny\"}"),
        "no dispatch from bucket 16"
    );
    assert!(
        text.contains("distill_serve_bucket_dispatches_total{bucket=\"128\",model=\"tiny\"}"),
        "no dispatch from bucket 128"
    );
}

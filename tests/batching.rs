//! Continuous batching against a real server: every sequence's greedy output under concurrent
//! load, joining mid-way included, equals its output when it runs alone.

mod common;

use std::time::Duration;

use common::server::{TestServer, add_exported_version};
use distill_serve::export::{Attention, Form, Precision};
use distill_serve::tiny::ShapePreset;
use serde_json::{Value, json};

async fn greedy_on(server: &TestServer, model: &str, prompt: &str, max_tokens: u32) -> String {
    let body =
        json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true});
    let r = server.post("/v1/completions", &body).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    v["choices"][0]["text"].as_str().unwrap().to_string()
}

/// Prompts of very different lengths (different buckets) and answers of different lengths,
/// so sequences leave at different steps and others join mid-way.
fn cases() -> Vec<(String, u32)> {
    (0..14)
        .map(|i| {
            (
                format!("Case {i}: {}", "the patient reports pain ".repeat(1 + (i % 5) * 6)),
                8 + (i as u32 % 4) * 10,
            )
        })
        .collect()
}

/// Each case alone, one after another, on `model`.
async fn alone(server: &TestServer, model: &str, cases: &[(String, u32)]) -> Vec<String> {
    let mut answers = Vec::new();
    for (prompt, n) in cases {
        answers.push(greedy_on(server, model, prompt, *n).await);
    }
    answers
}

/// All cases at once on `model`, arrivals staggered so later requests join a batch that is
/// already decoding.
async fn together(server: &TestServer, model: &str, cases: &[(String, u32)]) -> Vec<String> {
    futures::future::join_all(cases.iter().enumerate().map(|(i, (prompt, n))| async move {
        tokio::time::sleep(Duration::from_millis(3 * i as u64)).await;
        greedy_on(server, model, prompt, *n).await
    }))
    .await
}

/// Asserts that some decode step of `model` ran more than one sequence.
async fn assert_batched(server: &TestServer, model: &str) {
    let steps = server
        .metric(&format!("distill_serve_batch_size_count{{model=\"{model}\"}}"))
        .await;
    let single = server
        .metric(&format!(
            "distill_serve_batch_size_bucket{{model=\"{model}\",le=\"1\"}}"
        ))
        .await;
    assert!(
        steps > single,
        "{model}: no decode step ran more than one sequence ({single} of {steps} were single)"
    );
}

#[tokio::test]
async fn outputs_under_concurrent_load_equal_outputs_alone() {
    let server = TestServer::start(&["--max-batch-size", "6", "--max-queue-delay-ms", "2"]);
    let cases = cases();
    let alone = alone(&server, "tiny", &cases).await;
    let together = together(&server, "tiny", &cases).await;
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a, b, "case {i}: batched output differs from the output alone");
    }
    assert_batched(&server, "tiny").await;
    let text = reqwest::get(server.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("distill_serve_bucket_dispatches_total{bucket=\"16\",model=\"tiny\"}"),
        "no dispatch from bucket 16"
    );
    assert!(
        text.contains("distill_serve_bucket_dispatches_total{bucket=\"128\",model=\"tiny\"}"),
        "no dispatch from bucket 128"
    );
}

/// The fused-attention graph (`--attention gqa`) under the scheduler: rows in the slots of one
/// shared cache, joining, leaving, the buffer growing past its first capacity and compacting.
/// In FP32 every answer equals the with-past graph's answer alone; in INT8 and in the FP16 GPU
/// form the fused graph's batched answers equal its answers alone.
#[tokio::test]
async fn fused_attention_serves_the_answers_of_the_with_past_graph() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("models");
    let student = (5, ShapePreset::Tiny);
    let gqa = Form {
        attention: Attention::Gqa,
        ..Form::default()
    };
    add_exported_version(&repo, "past", 1, student, Precision::Fp32, Form::default());
    add_exported_version(&repo, "fused", 1, student, Precision::Fp32, gqa);
    add_exported_version(&repo, "fused-int8", 1, student, Precision::DEFAULT_INT8, gqa);
    add_exported_version(&repo, "gpu-form", 1, student, Precision::Fp32, Form::GPU);
    let server = TestServer::start_with_repo(dir, repo, &["--max-batch-size", "6", "--max-queue-delay-ms", "2"]);
    let cases = cases();

    let reference = alone(&server, "past", &cases).await;
    batched_equals(&server, "fused", &cases, &reference).await;
    for model in ["fused-int8", "gpu-form"] {
        // INT8, and the GPU form (FP16 cache in the slots, last-position logits) on the CPU.
        let own = alone(&server, model, &cases).await;
        batched_equals(&server, model, &cases, &own).await;
    }
}

/// Asserts that all `cases` at once on `model` give `expected`, and were batched.
async fn batched_equals(server: &TestServer, model: &str, cases: &[(String, u32)], expected: &[String]) {
    let batched = together(server, model, cases).await;
    for (i, (want, got)) in expected.iter().zip(&batched).enumerate() {
        assert_eq!(want, got, "case {i}: {model}, batched, differs from the answer alone");
    }
    assert_batched(server, model).await;
}

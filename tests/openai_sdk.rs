//! The official OpenAI Python SDK (installed by scripts/setup.sh) against a real server.

mod common;

use std::process::Command;

use common::server::{TestServer, add_shaped_version};
use distill_serve::tiny::ShapePreset;

#[test]
fn the_openai_python_sdk_works_against_the_server() {
    let server = TestServer::start(&[]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/openai_check.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(&server.base)
        .arg("tiny")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the SDK check failed:\n{stdout}\n{stderr}");
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["errors"]["not_found"], 404);
    assert!(report["chat"].is_string());
}

/// The 10x load test on the defaults: 16 clients of the SDK are the normal load of the 16M
/// student, then 160 (a queue four times the old fixed bound of 64); 160 requests of 96 tokens
/// in each phase. Every request gets its answer (the SDK's default retries honour
/// Retry-After), and throughput does not collapse at 160 clients. How much batching gains at
/// 10x is measured by `cargo bench --bench overload`, not here: on this shared 2-core machine
/// the ratio of the two phases ranged 0.97-1.57 between runs, so a test asserting a gain
/// failed on noise; half the normal rate is far below any run seen and far above a server
/// that thrashes or serialises its queue.
#[test]
fn ten_times_the_normal_concurrency_is_answered_on_the_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("models");
    add_shaped_version(&repo, "mid", 1, 3, ShapePreset::Mid);
    let server = TestServer::start_with_repo(dir, repo, &[]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/openai_10x.py");
    let out = Command::new("python3")
        .args([script, &server.base, "mid", "16", "1", "96"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the load script failed:\n{stdout}\n{stderr}");
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    println!("{report}");
    for phase in ["normal", "tenfold"] {
        let p = &report[phase];
        assert_eq!(p["errors"], serde_json::json!({}), "{phase}: {report}");
        assert_eq!(p["answers"], p["requests"], "{phase}: {report}");
        assert_eq!(p["full_length"], p["answers"], "{phase}: ignore_eos gives max_tokens");
    }
    let (normal, tenfold) = (
        report["normal"]["tokens_per_s"].as_f64().unwrap(),
        report["tenfold"]["tokens_per_s"].as_f64().unwrap(),
    );
    assert!(tenfold >= 0.5 * normal, "throughput collapsed under load: {report}");
}

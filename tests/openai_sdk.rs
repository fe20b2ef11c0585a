//! The official OpenAI Python SDK (installed by scripts/setup.sh) against a real server.

mod common;

use std::process::Command;

use common::server::TestServer;

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

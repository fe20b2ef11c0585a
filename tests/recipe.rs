//! The recipe of the embedded default student, end to end at toy scale: dataset, teacher
//! training, two servers on loopback, a refresh that distils the student, the held-out
//! evaluation.

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn free_loopback_addr() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

#[test]
fn the_icd10cm_recipe_runs_end_to_end_at_toy_scale() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let (out, work) = (dir.path().join("out"), dir.path().join("work"));
    let output = Command::new("bash")
        .arg(root.join("models/recipe-icd10cm.sh"))
        .env("SCALE", "toy")
        .env("SEED", "3")
        .env(
            "ICD10CM_XML",
            root.join("tests/fixtures/terminology/icd10cm_tabular_small.xml"),
        )
        .env("OUT", &out)
        .env("WORK", &work)
        .env("DISTILL_SERVE_BIN", common::binary())
        .env("TEACHER_ADDR", free_loopback_addr())
        .env("STUDENT_ADDR", free_loopback_addr())
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{log}");
    for stage in ["teacher: 20 steps", "stage: training", "stage: promote", "evaluation"] {
        assert!(log.contains(stage), "no {stage:?} in {log}");
    }
    for file in [
        "1/model.onnx",
        "1/tokenizer.json",
        "1/config.json",
        "1/checkpoint/model.safetensors",
        "eval.json",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    let eval: Value = serde_json::from_slice(&std::fs::read(out.join("eval.json")).unwrap()).unwrap();
    let constrained = &eval["constrained"];
    assert!(constrained["prompts"].as_u64().unwrap() >= 1, "{eval}");
    assert_eq!(constrained["invalid"], 0.0, "{eval}");
    let refresh: Value = serde_json::from_slice(&std::fs::read(work.join("refresh.json")).unwrap()).unwrap();
    assert_eq!(refresh["state"], "succeeded", "{refresh}");
    assert_eq!(refresh["result"]["version"], 2, "{refresh}");
}

//! The recipe of the embedded default student, end to end at toy scale: augmented dataset,
//! teacher training, two servers on loopback, black-box and white-box refreshes from the same
//! version, the held-out evaluations and the choice between the two.

mod common;

use std::path::Path;

use serde_json::Value;

#[test]
fn the_icd10cm_recipe_runs_end_to_end_at_toy_scale() {
    let dir = tempfile::tempdir().unwrap();
    let (out, work) = (dir.path().join("out"), dir.path().join("work"));
    let output = common::toy_recipe("recipe-icd10cm.sh", &out, &work)
        .env("SEED", "3")
        .env("TEACHER_ADDR", common::free_loopback_addr())
        .env("STUDENT_ADDR", common::free_loopback_addr())
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{log}");
    for stage in [
        "teacher: 20 steps",
        "stage: training",
        "stage: promote",
        "evaluation",
        "\"rolled_back_from\": 2",
    ] {
        assert!(log.contains(stage), "no {stage:?} in {log}");
    }
    for file in [
        "1/model.onnx",
        "1/tokenizer.json",
        "1/config.json",
        "1/checkpoint/model.safetensors",
        "eval.json",
        "eval-sample.json",
        "ablation.json",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    let eval: Value = serde_json::from_slice(&std::fs::read(out.join("eval.json")).unwrap()).unwrap();
    let constrained = &eval["constrained"];
    assert!(constrained["prompts"].as_u64().unwrap() >= 1, "{eval}");
    assert_eq!(constrained["invalid"], 0.0, "{eval}");
    let read = |path: &Path| -> Value { serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap() };
    // Both jobs start from the random version 1: the white-box one after a rollback.
    for (name, version) in [("black-box", 2), ("white-box", 3)] {
        let refresh = read(&work.join(format!("refresh-{name}.json")));
        assert_eq!(refresh["state"], "succeeded", "{refresh}");
        assert_eq!(refresh["result"]["previous_version"], 1, "{refresh}");
        assert_eq!(refresh["result"]["version"], version, "{refresh}");
    }
    let job = read(&work.join("job-white-box.json"));
    assert_eq!(job["white_box"]["teacher_model"], "teacher", "{job}");
    let ablation = read(&out.join("ablation.json"));
    let chosen = ablation["chosen"].as_str().unwrap();
    assert!(["black-box", "white-box"].contains(&chosen), "{ablation}");
    // jq writes 1.0 as 1: compare numbers as numbers.
    let figure = |v: &Value, side: &str, name: &str| v[side][name].as_f64().unwrap();
    for (side, name) in [("constrained", "exact_match"), ("unconstrained", "latency_ms_p50")] {
        assert_eq!(
            figure(&ablation[chosen]["held_out"], side, name),
            figure(&eval, side, name),
            "{ablation}"
        );
    }
    for part in ["teacher", "black-box", "white-box"] {
        let held_out = if part == "teacher" {
            &ablation[part]
        } else {
            &ablation[part]["held_out"]
        };
        assert_eq!(figure(held_out, "constrained", "invalid"), 0.0, "{part}: {ablation}");
    }
    assert!(
        ablation["black-box"]["job_evaluation"]["candidate"]["agreement"].is_number(),
        "{ablation}"
    );

    // Augmented phrasings train; none of them is a held-out phrase.
    let augmented = &ablation["dataset"]["augmented"];
    assert!(augmented["unspecified"].as_u64().unwrap() > 0, "{augmented}");
    let phrases = |file: &str| -> Vec<String> {
        std::fs::read_to_string(work.join("data").join(file))
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["messages"][0]["content"]
                    .to_string()
                    .to_lowercase()
            })
            .collect()
    };
    let train = phrases("train.jsonl");
    assert_eq!(train.len() as u64, ablation["dataset"]["train"].as_u64().unwrap());
    for held_out in phrases("heldout.jsonl") {
        assert!(!train.contains(&held_out), "{held_out} trains");
    }
}

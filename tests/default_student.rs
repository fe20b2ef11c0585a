//! The committed default student (`models/default`, built by `models/recipe-icd10cm.sh`) served
//! with the full ICD-10-CM release that `scripts/setup.sh` installs: constrained answers are
//! always billable codes, and its accuracy on the committed held-out sample is what the README
//! claims.

mod common;

use std::path::Path;

use common::server::TestServer;
use distill_serve::distill::finetune::read_jsonl;
use distill_serve::distill::job::PromptInput;
use serde_json::{Value, json};

/// Exact-match accuracy of the constrained default student on `models/default/heldout-sample.jsonl`,
/// as the README states it.
const README_CONSTRAINED_ACCURACY: f64 = 0.119;
/// Allowed shortfall (greedy decoding is deterministic; this covers kernel differences).
const MARGIN: f64 = 0.05;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_student_answers_with_billable_codes_as_accurately_as_the_readme_says() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let xml = distill_serve::paths::setup_cache_dir().join("icd10cm-2026/icd10cm_tabular_2026.xml");
    assert!(
        xml.is_file(),
        "run scripts/setup.sh first: {} is missing",
        xml.display()
    );
    let billable = common::billable_codes(&xml);
    // Serve a copy, so the test writes nothing into the repository.
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("models");
    copy_dir(&root.join("models/default"), &repo.join("default"));
    let flag = format!("icd10cm=icd10cm-xml:{}", xml.display());
    let server = TestServer::start_with_repo(dir, repo, &["--terminology", &flag]);

    let sample: Vec<PromptInput> = read_jsonl(&root.join("models/default/heldout-sample.jsonl")).unwrap();
    assert!(sample.len() >= 20);
    let mut correct = 0;
    for p in sample.iter().cloned() {
        let (messages, label) = p.into_messages().unwrap();
        let body = json!({"model": "default", "messages": messages, "max_tokens": 12, "temperature": 0.0,
            "constraint": {"terminology": "icd10cm", "match": "code"}});
        let reply: Value = server.post("/v1/chat/completions", &body).await.json().await.unwrap();
        let answer = reply["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .trim()
            .to_string();
        assert!(
            billable.contains(&answer),
            "{answer:?} is not a billable ICD-10-CM code: {reply}"
        );
        correct += usize::from(Some(answer) == label);
    }
    let accuracy = correct as f64 / sample.len() as f64;
    assert!(
        accuracy >= README_CONSTRAINED_ACCURACY - MARGIN,
        "constrained accuracy {accuracy} below the README's {README_CONSTRAINED_ACCURACY}"
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

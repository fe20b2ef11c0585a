//! White-box distillation in a refresh job: a wider local teacher's hidden states and attention
//! maps train the student beside its token outputs, for its last layers or an explicit layer map
//! with heads matched one by one; a teacher of another family, too few layers or a map outside
//! them is refused before any teacher is asked.

mod common;

use std::path::Path;
use std::time::Duration;

use common::server::TestServer;
use distill_serve::checkpoint::Family;
use distill_serve::export::{self, ExternalData, Form, Precision};
use distill_serve::tiny::{TinySpec, write_tiny};
use reqwest::Method;
use serde_json::{Value, json};

/// Version 1 of `name`: a tiny student of `family` and `hidden` width, with its checkpoint.
fn add_trainable(repo: &Path, name: &str, family: Family, seed: u64, hidden: usize) {
    let out = repo.join(name).join("1");
    let checkpoint = out.join("checkpoint");
    let mut spec = TinySpec::new(family, seed);
    spec.init_std = Some(0.3);
    spec.hidden_size = Some(hidden);
    write_tiny(&spec, &checkpoint).unwrap();
    export::export_form(
        &checkpoint,
        &out,
        Precision::DEFAULT_INT8,
        ExternalData::Never,
        Form::default(),
    )
    .unwrap();
    std::fs::write(repo.join(name).join("model.toml"), format!("name = \"{name}\"\n")).unwrap();
}

async fn run_job(server: &TestServer, job: &Value) -> Value {
    let id = server.start_refresh("coder", job).await;
    server.finished_job(&id, Duration::from_secs(120)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wider_local_teacher_teaches_white_box_and_a_foreign_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("models");
    add_trainable(&repo, "coder", Family::Qwen2, 1, 64);
    add_trainable(&repo, "wide", Family::Qwen2, 9, 96);
    add_trainable(&repo, "other-family", Family::Llama, 3, 64);
    let server = TestServer::start_with_repo(dir, repo, &[]);
    let prompts: String = (0..24)
        .map(|i| {
            format!(
                "{}\n",
                json!({"prompt": format!("Patient {i} has chest pain; code it.")})
            )
        })
        .collect();
    let r = server
        .admin(Method::POST, "/admin/v1/datasets/notes")
        .body(prompts)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The wide model is both the black-box teacher (its tokens over HTTP) and the white-box one.
    let job = |white_box: Value| {
        json!({"dataset": "notes", "eval_fraction": 0.25, "eval_max_new_tokens": 4,
               "teacher": {"url": server.url("/v1"), "model": "wide", "mode": "token", "top_logprobs": 5,
                           "max_tokens": 8, "temperature": 0.0, "concurrency": 2},
               "train": {"steps": 6, "batch_size": 4, "learning_rate": 0.003, "warmup_steps": 1, "nice": 0},
               "gate": {"min_agreement_gain": -1.0, "max_kl_ratio": 1000.0},
               "white_box": white_box})
    };
    let j = run_job(
        &server,
        &job(json!({"teacher_model": "wide", "layers": 2, "attention_weight": 2.0})),
    )
    .await;
    assert_eq!(j["state"], "succeeded", "{j}");
    let losses = j["result"]["losses"].as_array().unwrap();
    assert_eq!(losses.len(), 6);
    for row in losses {
        let (hidden, attention) = (row["hidden"].as_f64().unwrap(), row["attention"].as_f64().unwrap());
        assert!(hidden > 0.0 && attention > 0.0 && hidden.is_finite(), "{row}");
        let total = row["loss"].as_f64().unwrap();
        let base = 0.5 * row["kl"].as_f64().unwrap() + 0.5 * row["ce"].as_f64().unwrap();
        assert!(
            (total - (base + hidden + 2.0 * attention)).abs() < 1e-3 * total.max(1.0),
            "{row}"
        );
    }
    // An explicit layer map (one student layer taught by two of the teacher's) and heads
    // matched one by one.
    let j = run_job(
        &server,
        &job(json!({"teacher_model": "wide", "layer_map": [[1, 1], [1, 0]], "heads": "mapped"})),
    )
    .await;
    assert_eq!(j["state"], "succeeded", "{j}");
    let row = &j["result"]["losses"][0];
    assert!(
        row["hidden"].as_f64().unwrap() > 0.0 && row["attention"].as_f64().unwrap() > 0.0,
        "{row}"
    );

    let r = server
        .admin(Method::POST, "/admin/v1/models/coder/refresh")
        .json(&job(json!({"teacher_model": "wide", "hidden_weight": -1.0})))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("white_box weights"));

    for (white_box, needle) in [
        (json!({"teacher_model": "other-family"}), "one family"),
        (json!({"teacher_model": "wide", "layers": 9}), "white_box.layers"),
        (json!({"teacher_model": "wide", "layer_map": [[0, 7]]}), "outside"),
        (json!({"teacher_model": "nope"}), "nope"),
    ] {
        let j = run_job(&server, &job(white_box)).await;
        assert_eq!(
            (j["state"].as_str(), j["stage"].as_str()),
            (Some("failed"), Some("prepare")),
            "{j}"
        );
        assert!(j["error"].as_str().unwrap().contains(needle), "{needle}: {j}");
    }
}

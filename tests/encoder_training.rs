//! Training encoder students: the trainable forward against candle-transformers, gradients on
//! every tensor, an entity student trained, exported and served whose entities come back over
//! HTTP, refusals of data that does not fit the model, and the README's recipe at toy scale.

mod common;

use std::path::Path;

use candle_core::Tensor;
use common::server::TestServer;
use common::{PROMPTS, student};
use distill_serve::checkpoint::Family;
use distill_serve::distill::encoder_model::TrainableEncoder;
use distill_serve::distill::encoder_train::{LabelledText, train_encoder_checkpoint};
use distill_serve::distill::trainer::TrainConfig;
use distill_serve::export::{self, ExternalData, Precision};
use distill_serve::recipe::encoders::zh_en_entities;
use distill_serve::reference::{ReferenceEncoder, max_abs_diff};
use distill_serve::tiny::{BertHeadArg, TinySpec, write_tiny};
use serde_json::{Value, json};

#[test]
fn the_trainable_encoder_matches_candle_and_every_tensor_gets_a_gradient() {
    let cases = [
        (Family::Bert, BertHeadArg::Sequence),
        (Family::Bert, BertHeadArg::Token),
        (Family::XlmRoberta, BertHeadArg::Sequence),
        (Family::XlmRoberta, BertHeadArg::Token),
        (Family::XlmRoberta, BertHeadArg::Embedding),
    ];
    for (family, head) in cases {
        let st = student(family, 5, |s| s.bert_head = head);
        let model = TrainableEncoder::load(&st.checkpoint).unwrap();
        let reference = ReferenceEncoder::load(&st.checkpoint).unwrap();
        let tok = tokenizers::Tokenizer::from_file(st.checkpoint.join("tokenizer.json")).unwrap();
        let seqs: Vec<Vec<u32>> = PROMPTS
            .iter()
            .map(|p| tok.encode(*p, true).unwrap().get_ids().to_vec())
            .collect();
        let longest = seqs.iter().map(Vec::len).max().unwrap();
        let pad = model.config().pad_token_id;
        let ids: Vec<u32> = seqs
            .iter()
            .flat_map(|s| s.iter().copied().chain(std::iter::repeat_n(pad, longest - s.len())))
            .collect();
        let ids = Tensor::from_vec(ids, (seqs.len(), longest), &candle_core::Device::Cpu).unwrap();
        let lengths: Vec<usize> = seqs.iter().map(Vec::len).collect();
        let out = model.forward(&ids, &lengths).unwrap();
        for (b, seq) in seqs.iter().enumerate() {
            let want = reference.logits(seq).unwrap();
            let row = out.get(b).unwrap();
            let got: Vec<Vec<f32>> = match head {
                BertHeadArg::Sequence => vec![row.to_vec1().unwrap()],
                _ => row.narrow(0, 0, seq.len()).unwrap().to_vec2().unwrap(),
            };
            for (g, w) in got.iter().zip(&want) {
                let diff = max_abs_diff(g, w);
                assert!(diff < 1e-3, "{family:?} {head:?} row {b}: {diff}");
            }
        }
        let grads = out.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        for (name, var) in model.vars() {
            let norm = grads
                .get(var.as_tensor())
                .map(|g| g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap())
                .unwrap_or(0.0);
            assert!(norm > 0.0, "{family:?} {head:?}: {name} gets no gradient");
        }
    }
}

/// Writes a tiny XLM-RoBERTa token classifier with `labels` and a tokenizer trained on
/// `corpus` into `dir`.
fn entity_student(dir: &Path, labels: &[String], corpus: &str) {
    let corpus_file = dir.join("corpus.txt");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(&corpus_file, corpus).unwrap();
    let mut spec = TinySpec::new(Family::XlmRoberta, 2);
    spec.bert_head = BertHeadArg::Token;
    spec.labels = labels.to_vec();
    spec.corpus = Some(corpus_file);
    spec.tokenizer_vocab_size = 1200;
    write_tiny(&spec, &dir.join("random")).unwrap();
}

/// Entity-level F1 (exact character span and type) of `/v1/classify` on `texts`.
async fn served_f1(server: &TestServer, texts: &[LabelledText]) -> f64 {
    let inputs: Vec<&str> = texts.iter().map(|t| t.text.as_str()).collect();
    let (mut hit, mut predicted, mut gold) = (0, 0, 0);
    for (chunk, batch) in inputs.chunks(32).zip(texts.chunks(32)) {
        let r = server
            .post("/v1/classify", &json!({"model": "ner", "input": chunk}))
            .await;
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        for (row, t) in v["data"].as_array().unwrap().iter().zip(batch) {
            let want: Vec<(u64, u64, String)> = t
                .entities
                .iter()
                .flatten()
                .map(|e| (e.start as u64, e.end as u64, e.label.clone()))
                .collect();
            let got: Vec<(u64, u64, String)> = row["entities"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| {
                    let group = e["entity_group"].as_str().unwrap().to_string();
                    (e["start"].as_u64().unwrap(), e["end"].as_u64().unwrap(), group)
                })
                .collect();
            hit += got.iter().filter(|g| want.contains(g)).count();
            (predicted, gold) = (predicted + got.len(), gold + want.len());
        }
    }
    let (p, r) = (hit as f64 / predicted.max(1) as f64, hit as f64 / gold.max(1) as f64);
    if p + r > 0.0 { 2.0 * p * r / (p + r) } else { 0.0 }
}

#[tokio::test]
async fn an_entity_student_trains_exports_and_serves_the_entities_it_learnt() {
    let dir = tempfile::tempdir().unwrap();
    let d = zh_en_entities(800, 60, 1);
    entity_student(dir.path(), &d.labels, &d.corpus());
    let config = TrainConfig {
        steps: 150,
        batch_size: 16,
        learning_rate: 3e-3,
        warmup_steps: 10,
        ..TrainConfig::default()
    };
    let trained = dir.path().join("trained");
    let report = train_encoder_checkpoint(
        &dir.path().join("random"),
        &d.train,
        &d.held_out,
        &config,
        &trained,
        |_| {},
    )
    .unwrap();
    println!("{}", serde_json::to_string(&report).unwrap());
    assert!(report.last_loss < report.first_loss / 4.0, "{report:?}");
    let before = report.held_out_before.as_ref().unwrap().micro_f1.unwrap();
    let after = report.held_out_after.as_ref().unwrap().micro_f1.unwrap();
    // Untrained it finds almost nothing (F1 ~0.002); 150 steps reach ~0.3 on names it never
    // saw. The margins leave room for float differences between CPUs over 150 steps.
    assert!(after > before + 0.15, "held-out entity F1 {before} -> {after}");

    let repo = dir.path().join("models");
    export::export(&trained, &repo.join("ner/1"), Precision::Fp32, ExternalData::Never).unwrap();
    std::fs::write(repo.join("ner/model.toml"), "name = \"ner\"\n").unwrap();
    let served_dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with_repo(served_dir, repo, &[]);
    let served = served_f1(&server, &d.held_out).await;
    println!("served entity F1 {served:.3} (trained checkpoint, token tags: {after:.3})");
    assert!(served > before + 0.1, "served F1 {served}");
}

#[test]
fn training_data_that_does_not_fit_the_model_is_refused_naming_the_text() {
    let dir = tempfile::tempdir().unwrap();
    let d = zh_en_entities(20, 5, 1);
    entity_student(dir.path(), &d.labels, &d.corpus());
    let random = dir.path().join("random");
    let config = TrainConfig {
        steps: 1,
        ..TrainConfig::default()
    };
    let text = |json: Value| -> LabelledText { serde_json::from_value(json).unwrap() };
    let good = d.train[0].clone();
    let cases = [
        (
            text(json!({"text": "Acme paid", "entities": [{"start": 0, "end": 4, "label": "PERSON"}]})),
            "label \"B-PERSON\" is not in the model's id2label",
        ),
        (
            text(json!({"text": "Acme paid", "label": "ORG"})),
            "a token classifier needs `entities`",
        ),
    ];
    for (bad, needle) in cases {
        let err = train_encoder_checkpoint(
            &random,
            &[good.clone(), bad],
            &[],
            &config,
            &dir.path().join("out"),
            |_| {},
        )
        .unwrap_err();
        let message = format!("{err:#}");
        assert!(message.contains(needle) && message.contains("text 2"), "{message}");
    }
    let embedder = student(Family::Bert, 1, |s| s.bert_head = BertHeadArg::Embedding);
    let err = train_encoder_checkpoint(
        &embedder.checkpoint,
        &[good],
        &[],
        &config,
        &dir.path().join("out2"),
        |_| {},
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("no labels to train on"), "{err:#}");
}

#[test]
fn the_encoder_recipe_runs_end_to_end_at_toy_scale() {
    let dir = tempfile::tempdir().unwrap();
    let (out, work) = (dir.path().join("out"), dir.path().join("work"));
    let output = common::toy_recipe("recipe-encoders.sh", &out, &work)
        .env("ADDR", common::free_loopback_addr())
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{log}");
    let report = |name: &str| -> Value {
        serde_json::from_slice(&std::fs::read(out.join(name).join("report.json")).unwrap()).unwrap()
    };
    let icd = report("icd-chapters");
    let accuracy = icd["served_int8"]["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&accuracy), "{icd}");
    assert!(icd["train"]["held_out_after"]["accuracy"].is_number(), "{icd}");
    let ner = report("ner-zh-en");
    for key in ["served_int8", "served_int8_new_phrasing"] {
        assert!(ner[key]["entities"].as_u64().unwrap() > 0, "{ner}");
    }
    assert!(out.join("ner-zh-en/1/model.onnx").is_file());
}

//! Encoder students served over HTTP: TEI's `/predict` (single- and multi-label sequence
//! classification) and `/v1/classify` (entities with character offsets on mixed zh/en text),
//! batched by length; each answer equals its input run alone; bad input is a clear 4xx and
//! leaves the server serving.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::server::{EncoderSpec, TestServer, add_version};
use distill_serve::checkpoint::Family;
use distill_serve::engine::{EncoderSession, SessionOptions};
use distill_serve::export::{MODEL_FILE, Precision};
use distill_serve::reference::max_abs_diff;
use distill_serve::tiny::BertHeadArg;
use ndarray::Array2;
use serde_json::{Value, json};

const NER_LABELS: [&str; 5] = ["O", "B-ORG", "I-ORG", "B-MONEY", "I-MONEY"];
const ICD_LABELS: [&str; 3] = ["I10", "E11.9", "J45.909"];

/// Writes version 1 of BERT encoder `name` with `head` and `labels`, multi-label when
/// `multi_label`, exported in FP32.
fn add_encoder(repo: &Path, name: &str, head: BertHeadArg, labels: &[&str], multi_label: bool) {
    add_encoder_at(repo, name, head, labels, multi_label, Precision::Fp32);
}

fn add_encoder_at(
    repo: &Path,
    name: &str,
    head: BertHeadArg,
    labels: &[&str],
    multi_label: bool,
    precision: Precision,
) {
    let spec = EncoderSpec {
        family: Family::Bert,
        head,
        labels,
        multi_label,
        precision,
    };
    common::server::add_encoder(repo, name, &spec);
}

fn server() -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("models");
    add_encoder(&repo, "icd", BertHeadArg::Sequence, &ICD_LABELS, true);
    add_encoder(&repo, "ner", BertHeadArg::Token, &NER_LABELS, false);
    add_encoder(&repo, "triage", BertHeadArg::Sequence, &["low", "high"], false);
    add_encoder(&repo, "embedder", BertHeadArg::Embedding, &[], false);
    add_encoder(&repo, "reranker", BertHeadArg::Sequence, &["relevance"], false);
    let int8 = Precision::DEFAULT_INT8;
    add_encoder_at(&repo, "embedder-int8", BertHeadArg::Embedding, &[], false, int8);
    add_version(&repo, "tiny", 1, 1);
    let icd = common::repo_file("tests/fixtures/terminology/icd10cm_tabular_small.xml");
    let terminology = format!("icd10cm=icd10cm-xml:{}", icd.display());
    // A wide delay so concurrent requests share batches.
    TestServer::start_with_repo(
        dir,
        repo,
        &["--max-queue-delay-ms", "50", "--terminology", &terminology],
    )
}

/// The logits of `text` run alone through the version's ONNX file.
fn alone(server: &TestServer, model: &str, text: &str) -> Vec<f32> {
    let dir = server.repo.join(model).join("1");
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let ids: Vec<i64> = tokenizer
        .encode(text, true)
        .unwrap()
        .get_ids()
        .iter()
        .map(|&i| i64::from(i))
        .collect();
    let mut session = EncoderSession::open(&dir.join(MODEL_FILE), SessionOptions::default()).unwrap();
    let n = ids.len();
    let ids = Array2::from_shape_vec((1, n), ids).unwrap();
    let logits = session.forward(&ids, &Array2::ones((1, n))).unwrap();
    logits.iter().copied().collect()
}

/// Posts each body to `path` and checks it is a 400 whose message contains its needle.
async fn refused(server: &TestServer, path: &str, cases: Vec<(Value, &str)>) {
    for (body, needle) in cases {
        let r = server.post(path, &body).await;
        assert_eq!(r.status(), 400, "{path} {body}");
        let v: Value = r.json().await.unwrap();
        assert!(v["error"]["message"].as_str().unwrap().contains(needle), "{v}");
    }
}

const TEXTS: [&str; 4] = [
    "Hypertension.",
    "Type 2 diabetes mellitus without complications, follow up in three months.",
    "阿里巴巴集团 reported revenue of 2,345 million yuan; 腾讯控股 paid $1.2 billion.",
    "Asthma",
];

#[tokio::test]
async fn predict_answers_each_input_as_if_alone_whatever_its_batch_mates() {
    let server = server();
    // Concurrent requests of different lengths: they share padded batches.
    let calls = TEXTS.iter().map(|text| {
        let body = json!({"model": "icd", "inputs": text, "raw_scores": true});
        let server = &server;
        async move { server.post("/predict", &body).await.json::<Value>().await.unwrap() }
    });
    let answers = futures::future::join_all(calls).await;
    for (text, answer) in TEXTS.iter().zip(&answers) {
        let expected = alone(&server, "icd", text);
        let got: BTreeMap<String, f32> = answer
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["label"].as_str().unwrap().to_string(),
                    s["score"].as_f64().unwrap() as f32,
                )
            })
            .collect();
        for (i, label) in ICD_LABELS.iter().enumerate() {
            assert!(
                (got[*label] - expected[i]).abs() < 1e-4,
                "{text}: {label} {} vs {}",
                got[*label],
                expected[i]
            );
        }
    }
    let batches = server.metric("distill_serve_batch_size_sum{model=\"icd\"}").await;
    let count = server.metric("distill_serve_batch_size_count{model=\"icd\"}").await;
    // The two short inputs share a length bucket, so at least one batch held two rows.
    assert!(batches >= 4.0 && count < batches, "{batches} rows in {count} batches");

    // Multi-label: a sigmoid per label (independent), best first; a list answers a list.
    let body = json!({"inputs": ["Hypertension.", "Asthma"], "model": "icd"});
    let v: Value = server.post("/predict", &body).await.json().await.unwrap();
    let first = v[0].as_array().unwrap();
    assert_eq!(first.len(), 3);
    let scores: Vec<f64> = first.iter().map(|s| s["score"].as_f64().unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    let sigmoid = |x: f32| 1.0 / (1.0 + (-x).exp());
    let expected = alone(&server, "icd", "Hypertension.");
    let label = first[0]["label"].as_str().unwrap();
    let i = ICD_LABELS.iter().position(|l| *l == label).unwrap();
    assert!((scores[0] as f32 - sigmoid(expected[i])).abs() < 1e-4);
    // Single-label: a softmax, and `top_k`.
    let body = json!({"inputs": "Asthma", "model": "triage", "top_k": 1});
    let v: Value = server.post("/predict", &body).await.json().await.unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1, "{v}");
    let logits = alone(&server, "triage", "Asthma");
    let best = logits.iter().copied().fold(f32::MIN, f32::max);
    let softmax = 1.0 / logits.iter().map(|l| (l - best).exp()).sum::<f32>();
    assert!((v[0]["score"].as_f64().unwrap() as f32 - softmax).abs() < 1e-4, "{v}");
}

/// Groups `none` entities (one per labelled token) as `simple` does, independently.
fn group(tokens: &[Value], text: &[char]) -> Vec<(String, usize, usize)> {
    let mut out: Vec<(String, usize, usize)> = Vec::new();
    let mut last_end = None;
    for t in tokens {
        let label = t["entity_group"].as_str().unwrap();
        let (begins, kind) = match label.split_once('-') {
            Some(("B", k)) => (true, k),
            Some((_, k)) => (false, k),
            None => (false, label),
        };
        let (start, end) = (
            t["start"].as_u64().unwrap() as usize,
            t["end"].as_u64().unwrap() as usize,
        );
        // Tokens are adjacent when only spaces lie between them.
        let adjacent = last_end.is_some_and(|e: usize| text[e..start].iter().all(|c| c.is_whitespace()));
        match out.last_mut() {
            Some((k, _, e)) if !begins && k == kind && adjacent => *e = end,
            _ => out.push((kind.to_string(), start, end)),
        }
        last_end = Some(end);
    }
    out
}

#[tokio::test]
async fn classify_finds_entities_with_character_offsets_in_mixed_text() {
    let server = server();
    let text = TEXTS[2];
    let chars: Vec<char> = text.chars().collect();
    let mut found = BTreeMap::new();
    for strategy in ["none", "simple", "first", "max"] {
        let body = json!({"model": "ner", "input": text, "aggregation_strategy": strategy});
        let r = server.post("/v1/classify", &body).await;
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        let entities = v["data"][0]["entities"].as_array().unwrap().clone();
        let mut previous_end = 0;
        for e in &entities {
            let (start, end) = (
                e["start"].as_u64().unwrap() as usize,
                e["end"].as_u64().unwrap() as usize,
            );
            assert!(start < end && end <= chars.len(), "{strategy}: {e}");
            let word: String = chars[start..end].iter().collect();
            assert_eq!(e["word"], word, "{strategy}: offsets are characters of the text");
            assert!(!word.starts_with(' '), "{strategy}: {e}");
            if strategy == "none" {
                // Byte-level pieces of one Chinese character share its span.
                assert!(start + 1 >= previous_end, "{strategy}: tokens in order");
            } else {
                assert!(start >= previous_end, "{strategy}: entities in order, not overlapping");
            }
            previous_end = end;
            let score = e["score"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&score));
        }
        found.insert(strategy, entities);
    }
    assert!(!found["none"].is_empty(), "the random student labels some tokens");

    // On English text (no character split into pieces), `simple` is `none` grouped.
    let text = "Acme Holdings paid 1.2 billion dollars to Globex Corporation on Tuesday.";
    let chars: Vec<char> = text.chars().collect();
    let mut by_strategy = BTreeMap::new();
    for strategy in ["none", "simple"] {
        let body = json!({"model": "ner", "input": [text], "aggregation_strategy": strategy});
        let v: Value = server.post("/v1/classify", &body).await.json().await.unwrap();
        by_strategy.insert(strategy, v["data"][0]["entities"].as_array().unwrap().clone());
    }
    let simple: Vec<(String, usize, usize)> = by_strategy["simple"]
        .iter()
        .map(|e| {
            let kind = e["entity_group"].as_str().unwrap().to_string();
            (
                kind,
                e["start"].as_u64().unwrap() as usize,
                e["end"].as_u64().unwrap() as usize,
            )
        })
        .collect();
    assert!(!simple.is_empty(), "the random student finds some entity");
    assert_eq!(simple, group(&by_strategy["none"], &chars));
}

#[tokio::test]
async fn bad_encoder_input_is_a_clear_4xx_and_the_server_keeps_serving() {
    let server = server();
    let cases = [
        (json!({"model": "icd", "inputs": []}), 400, "must not be empty"),
        (json!({"model": "icd", "inputs": ""}), 400, "input 0 is empty"),
        (json!({"model": "icd", "inputs": vec!["x"; 33]}), 413, "at most 32"),
        (json!({"model": "icd", "inputs": "word ".repeat(2000)}), 413, "truncate"),
        (json!({"model": "tiny", "inputs": "x"}), 400, "is a decoder"),
        (json!({"model": "nope", "inputs": "x"}), 404, "not found"),
        (json!({"inputs": "x"}), 400, "several encoders are loaded"),
        (json!({"model": "ner", "inputs": "x"}), 400, "/v1/classify"),
        (json!({"model": "embedder", "inputs": "x"}), 400, "/embed"),
        (json!({"model": "icd", "inputs": "x", "bogus": 1}), 400, "unknown field"),
    ];
    for (body, status, needle) in cases {
        let r = server.post("/predict", &body).await;
        assert_eq!(r.status(), status, "{body}");
        let v: Value = r.json().await.unwrap();
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{body}: {v}");
    }
    let r = reqwest::Client::new()
        .post(server.url("/predict"))
        .header("content-type", "application/json")
        .body(b"{\"inputs\": \"\xff\xfe\"}".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // A 10 MB text: refused by its size before it is read. The server may answer while the
    // client still writes and then close the connection; either way it never reads it.
    let mut huge = b"{\"model\": \"icd\", \"inputs\": \"".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 10 << 20));
    huge.extend(b"\"}");
    let sent = reqwest::Client::new()
        .post(server.url("/predict"))
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await;
    match sent {
        Ok(r) => assert_eq!(r.status(), 413),
        Err(e) => assert!(e.is_request() || e.is_body(), "{e}"),
    }
    let r = server.post("/embed", &json!({"model": "tiny", "inputs": "x"})).await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("is a decoder"), "{v}");
    let completion = json!({"model": "icd", "prompt": "x", "max_tokens": 2});
    let r = server.post("/v1/completions", &completion).await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("is an encoder"), "{v}");
    // A long input is cut to the model's length when asked.
    let body = json!({"model": "icd", "inputs": "word ".repeat(2000), "truncate": true});
    assert_eq!(server.post("/predict", &body).await.status(), 200);
    // Nothing else was affected.
    let body = json!({"model": "tiny", "prompt": "x", "max_tokens": 2});
    assert_eq!(server.post("/v1/completions", &body).await.status(), 200);
    let body = json!({"model": "ner", "input": "Acme paid 5 dollars"});
    assert_eq!(server.post("/v1/classify", &body).await.status(), 200);
    let models = server.admin_get("/admin/v1/models").await;
    let ready = models["models"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["state"] == "READY")
        .count();
    assert_eq!(ready, 7, "{models}");
    let r = reqwest::get(server.url("/v2/models/ner/ready")).await.unwrap();
    assert_eq!(r.status(), 200);
}

/// The embedding of `text` run alone: the mean of its token states, normalised.
fn embedded_alone(server: &TestServer, text: &str) -> Vec<f32> {
    let states = alone(server, "embedder", text);
    let hidden = states.len() / tokens(server, text);
    let rows: Vec<&[f32]> = states.chunks(hidden).collect();
    let mean: Vec<f32> = (0..hidden)
        .map(|i| rows.iter().map(|r| r[i]).sum::<f32>() / rows.len() as f32)
        .collect();
    let norm = mean.iter().map(|x| x * x).sum::<f32>().sqrt();
    mean.iter().map(|x| x / norm).collect()
}

fn tokens(server: &TestServer, text: &str) -> usize {
    let dir = server.repo.join("embedder").join("1");
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    tokenizer.encode(text, true).unwrap().len()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[tokio::test]
async fn embeddings_equal_each_text_alone_over_tei_and_openai_routes() {
    let server = server();
    let calls = TEXTS.iter().map(|text| {
        let body = json!({"model": "embedder", "inputs": text});
        let server = &server;
        async move { server.post("/embed", &body).await.json::<Value>().await.unwrap() }
    });
    let answers = futures::future::join_all(calls).await;
    for (text, answer) in TEXTS.iter().zip(&answers) {
        let got = floats(&answer[0]);
        let want = embedded_alone(&server, text);
        assert_eq!(got.len(), want.len());
        let diff = max_abs_diff(&got, &want);
        assert!(diff < 1e-4, "{text}: {diff}");
        let norm = got.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "normalised as modules.json says: {norm}");
    }
    // OpenAI's route, as floats and as base64 (what the SDKs ask for by default).
    let body = json!({"model": "embedder", "input": TEXTS});
    let v: Value = server.post("/v1/embeddings", &body).await.json().await.unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"].as_array().unwrap().len(), TEXTS.len());
    let tokens: usize = TEXTS.iter().map(|t| tokens(&server, t)).sum();
    assert_eq!(v["usage"]["prompt_tokens"], tokens);
    for (i, answer) in answers.iter().enumerate() {
        assert_eq!(v["data"][i]["index"], i);
        let diff = max_abs_diff(&floats(&v["data"][i]["embedding"]), &floats(&answer[0]));
        assert!(diff < 1e-5, "{diff}");
    }
    let body = json!({"model": "embedder", "input": TEXTS[1], "encoding_format": "base64"});
    let v: Value = server.post("/v1/embeddings", &body).await.json().await.unwrap();
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(v["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(decoded, floats(&answers[1][0]));
    // INT8 weights stay close to FP32.
    for text in TEXTS {
        let body = json!({"model": "embedder-int8", "inputs": text});
        let v: Value = server.post("/embed", &body).await.json().await.unwrap();
        let (q, f) = (floats(&v[0]), embedded_alone(&server, text));
        let cosine: f32 = q.iter().zip(&f).map(|(a, b)| a * b).sum();
        assert!(cosine >= 0.99, "{text}: cosine {cosine}");
    }
    let cases = vec![
        (
            json!({"model": "embedder", "input": "x", "dimensions": 3}),
            "dimensions",
        ),
        (
            json!({"model": "embedder", "input": "x", "encoding_format": "int8"}),
            "encoding_format",
        ),
        (json!({"model": "icd", "input": "x"}), "/predict"),
    ];
    refused(&server, "/v1/embeddings", cases).await;
}

#[tokio::test]
async fn icd_classifiers_answer_codes_of_the_terminology_within_a_range() {
    let server = server();
    // At load, the labels are checked against the loaded release: J45.909 is not in it.
    let r = server
        .admin(reqwest::Method::POST, "/admin/v1/models/icd/load")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let coverage = &v["label_coverage"][0];
    assert_eq!(coverage["terminology"], "icd10cm", "{v}");
    assert_eq!(
        (coverage["known"].as_u64(), coverage["unknown"].clone()),
        (Some(2), json!(["J45.909"]))
    );

    let body = json!({"model": "icd", "inputs": "Hypertension.", "terminology": "icd10cm"});
    let v: Value = server.post("/predict", &body).await.json().await.unwrap();
    let labels: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels.len(), 2, "only codes of the release: {v}");
    assert!(labels.contains(&"I10") && labels.contains(&"E11.9"), "{v}");
    let body = json!({"model": "icd", "inputs": ["Hypertension.", "Asthma"], "codes": "I00-I99"});
    let v: Value = server.post("/predict", &body).await.json().await.unwrap();
    for answer in v.as_array().unwrap() {
        assert_eq!(answer.as_array().unwrap().len(), 1, "{v}");
        assert_eq!(answer[0]["label"], "I10");
        assert_eq!(answer[0]["description"], "Essential (primary) hypertension");
    }
    let body = json!({"model": "icd", "inputs": "x", "codes": "I99-I00"});
    let r = server.post("/predict", &body).await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["param"], "codes", "{v}");
}

#[tokio::test]
async fn kserve_model_infer_answers_fp32_tensors_from_encoders() {
    use distill_serve::api::grpc::proto::inference::{
        ModelInferRequest, ModelMetadataRequest, grpc_inference_service_client::GrpcInferenceServiceClient,
        model_infer_request::InferInputTensor,
    };
    let server = server();
    let mut client = GrpcInferenceServiceClient::connect(server.grpc.clone()).await.unwrap();
    let request = |model: &str, texts: &[&str]| {
        let mut raw = Vec::new();
        for t in texts {
            raw.extend((t.len() as u32).to_le_bytes());
            raw.extend(t.as_bytes());
        }
        ModelInferRequest {
            model_name: model.into(),
            inputs: vec![InferInputTensor {
                name: "text_input".into(),
                datatype: "BYTES".into(),
                shape: vec![texts.len() as i64, 1],
                ..Default::default()
            }],
            raw_input_contents: vec![raw],
            ..Default::default()
        }
    };
    let floats = |raw: &[u8]| -> Vec<f32> {
        raw.chunks(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    };
    let texts = [TEXTS[0], TEXTS[2]];
    let reply = client.model_infer(request("icd", &texts)).await.unwrap().into_inner();
    assert_eq!(reply.outputs[0].name, "logits");
    assert_eq!(
        (reply.outputs[0].datatype.as_str(), reply.outputs[0].shape.clone()),
        ("FP32", vec![2, 3])
    );
    let got = floats(&reply.raw_output_contents[0]);
    for (i, text) in texts.iter().enumerate() {
        let want = alone(&server, "icd", text);
        let diff = max_abs_diff(&got[i * 3..i * 3 + 3], &want);
        assert!(diff < 1e-4, "{text}: {diff}");
    }
    let reply = client
        .model_infer(request("embedder", &[TEXTS[1]]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.outputs[0].name, "embeddings");
    let got = floats(&reply.raw_output_contents[0]);
    let want = embedded_alone(&server, TEXTS[1]);
    assert_eq!(reply.outputs[0].shape, vec![1, want.len() as i64]);
    let diff = max_abs_diff(&got, &want);
    assert!(diff < 1e-4, "{diff}");
    let metadata = client
        .model_metadata(ModelMetadataRequest {
            name: "embedder".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (metadata.outputs[0].name.as_str(), metadata.outputs[0].datatype.as_str()),
        ("embeddings", "FP32")
    );
    let status = client.model_infer(request("ner", &["x"])).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("/v1/classify"), "{}", status.message());
    let mut wrong = request("icd", &["a", "b"]);
    wrong.inputs[0].shape = vec![3];
    let status = client.model_infer(wrong).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("holds 2 elements"), "{}", status.message());
}

#[tokio::test]
async fn tokenize_and_decode_round_trip_with_character_offsets() {
    let server = server();
    let text = TEXTS[2];
    let chars: Vec<char> = text.chars().collect();
    let body = json!({"model": "ner", "inputs": [text]});
    let r = server.post("/tokenize", &body).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let tokens = v[0].as_array().unwrap();
    assert!(
        tokens.first().unwrap()["special"].as_bool().unwrap(),
        "[CLS] first: {}",
        tokens[0]
    );
    assert_eq!(tokens.first().unwrap()["text"], "[CLS]");
    let ids: Vec<u64> = tokens.iter().map(|t| t["id"].as_u64().unwrap()).collect();
    let dir = server.repo.join("ner").join("1");
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let want: Vec<u64> = tokenizer
        .encode(text, true)
        .unwrap()
        .get_ids()
        .iter()
        .map(|&i| u64::from(i))
        .collect();
    assert_eq!(ids, want);
    for t in tokens.iter().filter(|t| !t["special"].as_bool().unwrap()) {
        let (start, stop) = (
            t["start"].as_u64().unwrap() as usize,
            t["stop"].as_u64().unwrap() as usize,
        );
        let piece: String = chars[start..stop].iter().collect();
        assert_eq!(t["text"], piece, "{t}");
    }
    let body = json!({"model": "ner", "ids": ids});
    let v: Value = server.post("/decode", &body).await.json().await.unwrap();
    assert_eq!(
        v[0], text,
        "decoding the ids without special tokens gives the text back"
    );
    let r = server.post("/decode", &json!({"model": "ner", "ids": [999999]})).await;
    assert_eq!(r.status(), 400);
    let r = server
        .post("/tokenize", &json!({"model": "ner", "inputs": vec!["x"; 33]}))
        .await;
    assert_eq!(r.status(), 413);
}

#[tokio::test]
async fn long_texts_are_classified_in_overlapping_windows() {
    let server = server();
    let text = [TEXTS[1], TEXTS[2]].join(" ").repeat(20);
    let chars: Vec<char> = text.chars().collect();
    let dir = server.repo.join("ner").join("1");
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let encoding = tokenizer.encode_char_offsets(text.as_str(), false).unwrap();
    let offsets = encoding.get_offsets();
    assert!(offsets.len() > 1200, "{} tokens: several windows", offsets.len());
    let classify = |input: String| {
        let body = json!({"model": "ner", "input": input, "aggregation_strategy": "none"});
        let server = &server;
        async move {
            let r = server.post("/v1/classify", &body).await;
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()["data"][0]["entities"]
                .as_array()
                .unwrap()
                .clone()
        }
    };
    let whole = classify(text.clone()).await;
    let beyond = offsets[600].0;
    assert!(
        whole.iter().any(|e| e["start"].as_u64().unwrap() as usize > beyond),
        "entities past the first window"
    );
    for e in &whole {
        let (start, end) = (
            e["start"].as_u64().unwrap() as usize,
            e["end"].as_u64().unwrap() as usize,
        );
        assert_eq!(e["word"], chars[start..end].iter().collect::<String>());
    }
    // The first window holds the first 510 tokens, the second starts at token 383 (a quarter
    // overlaps). Tokens up to about 445 are nearer the first window's centre than the
    // second's, so up to token 440 the labels are the first window's: those of the text cut
    // after token 510 classified by itself.
    let prefix: String = chars[..offsets[509].1].iter().collect();
    let alone = classify(prefix).await;
    let settled = offsets[440].1;
    let early = |list: &[Value]| -> Vec<(String, u64, u64, f64)> {
        list.iter()
            .filter(|e| (e["end"].as_u64().unwrap() as usize) <= settled)
            .map(|e| {
                let kind = e["entity_group"].as_str().unwrap().to_string();
                (
                    kind,
                    e["start"].as_u64().unwrap(),
                    e["end"].as_u64().unwrap(),
                    e["score"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    let (a, b) = (early(&whole), early(&alone));
    assert!(!a.is_empty());
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!((&x.0, x.1, x.2), (&y.0, y.1, y.2));
        assert!((x.3 - y.3).abs() < 1e-4, "{x:?} vs {y:?}");
    }
    // Asked to cut instead, nothing past the model's length is labelled.
    let body = json!({"model": "ner", "input": text, "aggregation_strategy": "none", "truncate": true});
    let v: Value = server.post("/v1/classify", &body).await.json().await.unwrap();
    let cut = offsets[510].1 as u64;
    assert!(
        v["data"][0]["entities"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["end"].as_u64().unwrap() <= cut)
    );
}

/// The reranker's logit for (query, text) run alone, with the pair's segments (or all 0).
fn pair_alone(server: &TestServer, query: &str, text: &str, segments: bool) -> f32 {
    let dir = server.repo.join("reranker").join("1");
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let encoding = tokenizer.encode((query, text), true).unwrap();
    let n = encoding.len();
    let row = |v: &[u32]| Array2::from_shape_vec((1, n), v.iter().map(|&x| i64::from(x)).collect()).unwrap();
    let (ids, types) = (row(encoding.get_ids()), row(encoding.get_type_ids()));
    assert!(types.iter().any(|&t| t == 1), "the text is segment 1");
    let mut session = EncoderSession::open(&dir.join(MODEL_FILE), SessionOptions::default()).unwrap();
    let types = segments.then_some(&types);
    session.forward_typed(&ids, &Array2::ones((1, n)), types).unwrap()[[0, 0]]
}

#[tokio::test]
async fn rerank_scores_each_text_against_the_query_as_a_pair() {
    let server = server();
    let query = "chest pain and shortness of breath";
    let body = json!({"model": "reranker", "query": query, "texts": TEXTS, "return_text": true});
    let r = server.post("/rerank", &body).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let ranked = v.as_array().unwrap();
    assert_eq!(ranked.len(), TEXTS.len());
    let scores: Vec<f64> = ranked.iter().map(|x| x["score"].as_f64().unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "best first: {scores:?}");
    for x in ranked {
        let index = x["index"].as_u64().unwrap() as usize;
        assert_eq!(x["text"], TEXTS[index]);
        let logit = pair_alone(&server, query, TEXTS[index], true);
        let want = 1.0 / (1.0 + (-logit).exp());
        assert!(
            (x["score"].as_f64().unwrap() as f32 - want).abs() < 1e-4,
            "{x} vs {want}"
        );
        // The segments reach the model: without them the score differs.
        let flat = 1.0 / (1.0 + (-pair_alone(&server, query, TEXTS[index], false)).exp());
        assert!((want - flat).abs() > 1e-6, "{index}: segment ids change nothing");
    }
    let cases = vec![
        (
            json!({"model": "icd", "query": "q", "texts": ["a"]}),
            "a reranker (cross-encoder) has one",
        ),
        (
            json!({"model": "reranker", "query": " ", "texts": ["a"]}),
            "query must not be empty",
        ),
        (
            json!({"model": "reranker", "query": "q", "texts": []}),
            "must not be empty",
        ),
    ];
    refused(&server, "/rerank", cases).await;
}

#[tokio::test]
async fn kserve_http_json_infer_answers_encoders() {
    let server = server();
    let texts = [TEXTS[0], TEXTS[3]];
    let body =
        json!({"id": "r1", "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [2], "data": texts}]});
    let r = server.post("/v2/models/icd/infer", &body).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["id"], "r1");
    let output = &v["outputs"][0];
    assert_eq!(
        (output["name"].as_str(), output["datatype"].as_str()),
        (Some("logits"), Some("FP32"))
    );
    assert_eq!(output["shape"], json!([2, 3]));
    let got = floats(&output["data"]);
    for (i, text) in texts.iter().enumerate() {
        let want = alone(&server, "icd", text);
        let diff = max_abs_diff(&got[i * 3..i * 3 + 3], &want);
        assert!(diff < 1e-4, "{text}: {diff}");
    }
    let metadata: Value = reqwest::get(server.url("/v2/models/embedder"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(metadata["outputs"][0]["name"], "embeddings", "{metadata}");
    for (model, body, needle) in [
        ("tiny", body.clone(), "is a decoder"),
        (
            "icd",
            json!({"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [3], "data": ["a"]}]}),
            "holds 3 elements",
        ),
        (
            "icd",
            json!({"inputs": [{"name": "text_input", "datatype": "FP32", "shape": [1], "data": [1.0]}]}),
            "BYTES",
        ),
        ("ner", body.clone(), "/v1/classify"),
    ] {
        let r = server.post(&format!("/v2/models/{model}/infer"), &body).await;
        assert_eq!(r.status(), 400, "{model} {body}");
        // KServe's error shape: the message is the string under `error`.
        let v: Value = r.json().await.unwrap();
        assert!(v["error"].as_str().unwrap().contains(needle), "{v}");
    }
}

/// Posts a binary-extension body: `header` as JSON, then `binary`.
async fn post_binary(server: &TestServer, path: &str, header: &Value, length: usize, binary: &[u8]) -> Value {
    let mut body = header.to_string().into_bytes();
    body.extend_from_slice(binary);
    let r = reqwest::Client::new()
        .post(server.url(path))
        .header("Inference-Header-Content-Length", length.to_string())
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "{header}");
    r.json().await.unwrap()
}

#[tokio::test]
async fn kserve_binary_tensor_data_that_disagrees_with_itself_is_a_400() {
    let server = server();
    let input = |size: usize| {
        json!({"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1],
            "parameters": {"binary_data_size": size}}]})
    };
    let element = |bytes: &[u8]| [&(bytes.len() as u32).to_le_bytes()[..], bytes].concat();
    let good = element(b"Asthma");
    let cases: Vec<(Value, Option<usize>, Vec<u8>, &str)> = vec![
        (
            input(good.len()),
            Some(100_000),
            good.clone(),
            "no larger than the body",
        ),
        (input(good.len() + 8), None, good.clone(), "binary bytes"),
        (input(7), None, element(&[0xff, 0xfe, b'a']), "not valid UTF-8"),
        (
            input(7),
            None,
            [&100u32.to_le_bytes()[..], b"abc"].concat(),
            "4-byte little-endian length",
        ),
        // Sizes that would overflow an offset are refused, not a panic.
        (
            json!({"inputs": [
                {"name": "other", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 1}},
                {"name": "text_input", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": usize::MAX}}]}),
            None,
            good.clone(),
            "binary bytes",
        ),
    ];
    for (header, length, binary, needle) in cases {
        let length = length.unwrap_or(header.to_string().len());
        let v = post_binary(&server, "/v2/models/icd/infer", &header, length, &binary).await;
        assert!(v["error"].as_str().unwrap().contains(needle), "{needle}: {v}");
    }
}

/// Rows of a JSON report's `key`: a list of lists of floats.
fn report_rows(report: &Value, key: &str) -> Vec<Vec<f32>> {
    report[key]
        .as_array()
        .unwrap_or_else(|| panic!("{key} missing: {report}"))
        .iter()
        .map(floats)
        .collect()
}

#[test]
fn tritonclient_drives_encoders_over_http_and_grpc() {
    let server = server();
    let script = common::repo_file("tests/clients/triton_check.py");
    let texts = [TEXTS[0], TEXTS[2], TEXTS[3]];
    let host = |url: &str| url.trim_start_matches("http://").to_string();
    let out = std::process::Command::new("python3")
        .arg(script)
        .args([host(&server.base), host(&server.grpc), "icd".into(), "tiny".into()])
        .args(texts)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "tritonclient failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["live"], true);
    assert_eq!(report["metadata"]["outputs"][0]["name"], "logits", "{report}");
    let want: Vec<Vec<f32>> = texts.iter().map(|t| alone(&server, "icd", t)).collect();
    for transport in ["http_binary", "http_json", "http_default", "grpc"] {
        let got = report_rows(&report, transport);
        assert_eq!(got.len(), texts.len(), "{transport}: {report}");
        for (row, want) in got.iter().zip(&want) {
            let diff = max_abs_diff(row, want);
            assert!(diff < 1e-4, "{transport}: {diff}");
        }
    }
    assert_eq!(report["http_decoder"]["status"], "400", "{report}");
    assert!(
        report["http_decoder"]["message"]
            .as_str()
            .unwrap()
            .contains("is a decoder"),
        "{report}"
    );
    assert_eq!(
        report["grpc_wrong_type"]["status"], "StatusCode.INVALID_ARGUMENT",
        "{report}"
    );
}

#[tokio::test]
async fn truncation_cuts_the_end_or_the_start_as_asked() {
    let server = server();
    let text: String = (0..900).map(|i| format!("w{i} ")).collect();
    let dir = server.repo.join("icd").join("1");
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let ids: Vec<i64> = tokenizer
        .encode(text.as_str(), true)
        .unwrap()
        .get_ids()
        .iter()
        .map(|&i| i64::from(i))
        .collect();
    let keep = 512;
    assert!(ids.len() > keep + 100, "{} tokens", ids.len());
    let mut session = EncoderSession::open(&dir.join(MODEL_FILE), SessionOptions::default()).unwrap();
    let mut run = |kept: Vec<i64>| -> Vec<f32> {
        let n = kept.len();
        let ids = Array2::from_shape_vec((1, n), kept).unwrap();
        session
            .forward(&ids, &Array2::ones((1, n)))
            .unwrap()
            .iter()
            .copied()
            .collect()
    };
    // [CLS] and [SEP] stay; the start or the end of the text goes.
    let right = run([&ids[..keep - 1], &ids[ids.len() - 1..]].concat());
    let left = run([&ids[..1], &ids[ids.len() - keep + 1..]].concat());
    assert!(
        max_abs_diff(&right, &left) > 1e-4,
        "the two cuts must differ for this test to mean anything"
    );
    for (direction, want) in [(None, &right), (Some("Right"), &right), (Some("Left"), &left)] {
        let mut body = json!({"model": "icd", "inputs": text, "truncate": true, "raw_scores": true});
        if let Some(d) = direction {
            body["truncation_direction"] = json!(d);
        }
        let v: Value = server.post("/predict", &body).await.json().await.unwrap();
        let mut got = [0f32; 3];
        for s in v.as_array().unwrap() {
            let i = ICD_LABELS.iter().position(|l| s["label"] == *l).unwrap();
            got[i] = s["score"].as_f64().unwrap() as f32;
        }
        assert!(max_abs_diff(&got, want) < 1e-4, "{direction:?}: {got:?} vs {want:?}");
    }
    let body = json!({"model": "icd", "inputs": "x", "truncation_direction": "middle"});
    assert_eq!(server.post("/predict", &body).await.status(), 400);
}

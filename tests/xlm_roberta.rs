//! XLM-RoBERTa encoder students (a SentencePiece-style unigram tokenizer, positions counted
//! from the padding id, one token type) served over HTTP beside each other: entities with
//! character offsets on mixed Chinese/English text, classification, reranking and embeddings,
//! each answer equal to its input run alone through the exported graph.

mod common;

use common::server::{EncoderSpec, TestServer, add_encoder};
use distill_serve::checkpoint::Family;
use distill_serve::engine::{EncoderSession, SessionOptions};
use distill_serve::export::{MODEL_FILE, Precision};
use distill_serve::reference::max_abs_diff;
use distill_serve::tiny::BertHeadArg;
use ndarray::Array2;
use serde_json::{Value, json};
use tokenizers::{Encoding, Tokenizer};

const NER_LABELS: [&str; 7] = ["O", "B-ORG", "I-ORG", "B-MONEY", "I-MONEY", "B-DATE", "I-DATE"];

const TEXTS: [&str; 3] = [
    "阿里巴巴集团 reported revenue of 2,345 million yuan on 3 March; 腾讯控股 paid $1.2 billion.",
    "Acme Holdings paid 1.2 billion dollars to Globex Corporation.",
    "招商银行 2024年 净利润 1,484 亿元",
];

fn server() -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("models");
    let spec = |head, labels| EncoderSpec {
        family: Family::XlmRoberta,
        head,
        labels,
        multi_label: false,
        precision: Precision::Fp32,
    };
    add_encoder(&repo, "ner", &spec(BertHeadArg::Token, &NER_LABELS));
    add_encoder(
        &repo,
        "topics",
        &spec(BertHeadArg::Sequence, &["earnings", "m&a", "other"]),
    );
    add_encoder(&repo, "ranker", &spec(BertHeadArg::Sequence, &["relevance"]));
    add_encoder(&repo, "embedder", &spec(BertHeadArg::Embedding, &[]));
    TestServer::start_with_repo(dir, repo, &["--max-queue-delay-ms", "50"])
}

fn tokenizer(server: &TestServer, model: &str) -> Tokenizer {
    Tokenizer::from_file(server.repo.join(model).join("1/tokenizer.json")).unwrap()
}

/// The outputs of `encoding` run alone through the model's ONNX file, one row per output
/// position (one row for a sequence classifier).
fn alone(server: &TestServer, model: &str, encoding: &Encoding) -> Vec<Vec<f32>> {
    let n = encoding.len();
    let ids: Vec<i64> = encoding.get_ids().iter().map(|&i| i64::from(i)).collect();
    let ids = Array2::from_shape_vec((1, n), ids).unwrap();
    let path = server.repo.join(model).join("1").join(MODEL_FILE);
    let mut session = EncoderSession::open(&path, SessionOptions::default()).unwrap();
    let out = session.forward(&ids, &Array2::ones((1, n))).unwrap();
    let width = *out.shape().last().unwrap();
    out.iter()
        .copied()
        .collect::<Vec<f32>>()
        .chunks(width)
        .map(<[f32]>::to_vec)
        .collect()
}

fn softmax(row: &[f32]) -> Vec<f32> {
    distill_serve::reference::softmax(row)
}

/// The entities `none` must give, worked out here from the tokenizer and the model alone: every
/// non-special token whose best label is not `O`, its span in characters without the space its
/// `▁` stands for.
fn expected_entities(server: &TestServer, text: &str) -> Vec<(String, usize, usize, f32)> {
    let encoding = tokenizer(server, "ner").encode(text, true).unwrap();
    let rows = alone(server, "ner", &encoding);
    let chars: Vec<char> = text.chars().collect();
    let char_at = |byte: usize| text[..byte].chars().count();
    let mut out = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        if encoding.get_special_tokens_mask()[i] == 1 {
            continue;
        }
        let probs = softmax(row);
        let best = (0..probs.len()).max_by(|&a, &b| probs[a].total_cmp(&probs[b])).unwrap();
        if NER_LABELS[best] == "O" {
            continue;
        }
        let (start, end) = encoding.get_offsets()[i];
        let (mut start, end) = (char_at(start), char_at(end));
        while start < end && chars[start].is_whitespace() {
            start += 1;
        }
        if start < end {
            out.push((NER_LABELS[best].to_string(), start, end, probs[best]));
        }
    }
    out
}

#[tokio::test]
async fn xlm_roberta_token_classifier_gives_character_offsets_on_zh_en_text() {
    let server = server();
    let tok = tokenizer(&server, "ner");
    // The tokenizer is SentencePiece-style: `▁` pieces, no byte pieces.
    let pieces = tok.encode(TEXTS[1], true).unwrap().get_tokens().to_vec();
    assert!(pieces.iter().any(|p| p.starts_with('▁')), "{pieces:?}");
    let mut labelled = 0;
    for text in TEXTS {
        let body = json!({"model": "ner", "input": text, "aggregation_strategy": "none"});
        let r = server.post("/v1/classify", &body).await;
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        let chars: Vec<char> = text.chars().collect();
        let got: Vec<(String, usize, usize, f32)> = v["data"][0]["entities"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let (start, end) = (
                    e["start"].as_u64().unwrap() as usize,
                    e["end"].as_u64().unwrap() as usize,
                );
                let word: String = chars[start..end].iter().collect();
                assert_eq!(e["word"], word, "{e}");
                let label = e["entity_group"].as_str().unwrap().to_string();
                (label, start, end, e["score"].as_f64().unwrap() as f32)
            })
            .collect();
        let want = expected_entities(&server, text);
        assert_eq!(got.len(), want.len(), "{text}: {got:?} vs {want:?}");
        for (g, w) in got.iter().zip(&want) {
            assert_eq!((&g.0, g.1, g.2), (&w.0, w.1, w.2), "{text}");
            assert!((g.3 - w.3).abs() < 1e-4, "{text}: {g:?} vs {w:?}");
        }
        labelled += got.len();
        // Grouped entities stay inside the text and in order.
        let body = json!({"model": "ner", "input": text, "aggregation_strategy": "simple"});
        let v: Value = server.post("/v1/classify", &body).await.json().await.unwrap();
        let mut previous_end = 0;
        for e in v["data"][0]["entities"].as_array().unwrap() {
            let (start, end) = (
                e["start"].as_u64().unwrap() as usize,
                e["end"].as_u64().unwrap() as usize,
            );
            assert!(previous_end <= start && start < end && end <= chars.len(), "{e}");
            previous_end = end;
        }
    }
    assert!(labelled > 0, "the random student labels some tokens");
}

#[tokio::test]
async fn xlm_roberta_classifier_reranker_and_embedder_answer_as_if_alone() {
    let server = server();
    // Concurrent requests of different lengths share padded batches.
    let calls = TEXTS.iter().map(|text| {
        let body = json!({"model": "topics", "inputs": text, "raw_scores": true});
        let server = &server;
        async move { server.post("/predict", &body).await.json::<Value>().await.unwrap() }
    });
    let answers = futures::future::join_all(calls).await;
    let labels = ["earnings", "m&a", "other"];
    for (text, answer) in TEXTS.iter().zip(&answers) {
        let want = &alone(
            &server,
            "topics",
            &tokenizer(&server, "topics").encode(*text, true).unwrap(),
        )[0];
        for s in answer.as_array().unwrap() {
            let i = labels.iter().position(|l| s["label"] == *l).unwrap();
            assert!(
                (s["score"].as_f64().unwrap() as f32 - want[i]).abs() < 1e-4,
                "{text}: {s}"
            );
        }
    }

    let query = "净利润 net profit";
    let body = json!({"model": "ranker", "query": query, "texts": TEXTS, "raw_scores": true});
    let r = server.post("/rerank", &body).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    for x in v.as_array().unwrap() {
        let text = TEXTS[x["index"].as_u64().unwrap() as usize];
        let pair = tokenizer(&server, "ranker").encode((query, text), true).unwrap();
        assert!(pair.get_type_ids().iter().all(|&t| t == 0), "one token type");
        let want = alone(&server, "ranker", &pair)[0][0];
        assert!(
            (x["score"].as_f64().unwrap() as f32 - want).abs() < 1e-4,
            "{x} vs {want}"
        );
    }

    let body = json!({"model": "embedder", "inputs": TEXTS});
    let v: Value = server.post("/embed", &body).await.json().await.unwrap();
    for (i, text) in TEXTS.iter().enumerate() {
        let states = alone(
            &server,
            "embedder",
            &tokenizer(&server, "embedder").encode(*text, true).unwrap(),
        );
        let hidden = states[0].len();
        let mean: Vec<f32> = (0..hidden)
            .map(|j| states.iter().map(|r| r[j]).sum::<f32>() / states.len() as f32)
            .collect();
        let norm = mean.iter().map(|x| x * x).sum::<f32>().sqrt();
        let want: Vec<f32> = mean.iter().map(|x| x / norm).collect();
        let got: Vec<f32> = v[i]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        let diff = max_abs_diff(&got, &want);
        assert!(diff < 1e-4, "{text}: {diff}");
    }
}

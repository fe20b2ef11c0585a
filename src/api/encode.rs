//! Encoder routes: TEI's `POST /predict` (sequence classification: labels and scores of each
//! input) and `POST /v1/classify` (token classification: the entities of each input with
//! character offsets). The handlers translate wire formats; [`crate::infer`] does the rest.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::error::InferError;
use super::openai::{parse_json, timeout};
use crate::infer::{Aggregation, EncodeRequest, Endpoint, entities, label_scores};
use crate::repository::EncoderTask;

/// One text or several, as TEI and OpenAI take `inputs` / `input`.
#[derive(Deserialize)]
#[serde(untagged)]
enum Texts {
    One(String),
    Many(Vec<String>),
}

impl Texts {
    fn into_vec(self) -> (Vec<String>, bool) {
        match self {
            Texts::One(text) => (vec![text], false),
            Texts::Many(texts) => (texts, true),
        }
    }
}

/// `POST /predict` body (TEI).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PredictRequest {
    #[serde(default)]
    model: Option<String>,
    inputs: Texts,
    /// Logits instead of probabilities.
    #[serde(default)]
    raw_scores: bool,
    #[serde(default)]
    truncate: bool,
    /// Only the best `top_k` labels of each input.
    #[serde(default)]
    top_k: Option<usize>,
}

/// `POST /predict`: each input's labels, best first (`[{"label", "score"}]`; a list of those
/// for a list of inputs).
pub async fn predict(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let run = async {
        let req: PredictRequest = parse_json(&body)?;
        let (inputs, many) = req.inputs.into_vec();
        let request = EncodeRequest {
            model: req.model,
            inputs,
            truncate: req.truncate,
            timeout: timeout(&headers)?,
        };
        let (model, encoded) = state.infer.encode(Endpoint::Predict, request).await?;
        if model.task == EncoderTask::TokenClassification {
            return Err(InferError::invalid(
                "model",
                format!("model `{}` labels tokens: use POST /v1/classify", model.name),
            ));
        }
        let answers: Vec<Value> = encoded
            .iter()
            .map(|e| {
                let mut scores = label_scores(&model, &e.output.values, req.raw_scores);
                scores.truncate(req.top_k.unwrap_or(usize::MAX));
                json!(scores)
            })
            .collect();
        Ok::<_, InferError>(if many { json!(answers) } else { answers[0].clone() })
    };
    match run.await {
        Ok(body) => Json(body).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `POST /v1/classify` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClassifyRequest {
    #[serde(default)]
    model: Option<String>,
    input: Texts,
    #[serde(default)]
    aggregation_strategy: Aggregation,
    #[serde(default)]
    truncate: bool,
}

/// `POST /v1/classify`: the entities of each input (`{"object": "list", "data": [{"index",
/// "entities": [{"entity_group", "score", "word", "start", "end"}]}]}`).
pub async fn classify(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let run = async {
        let req: ClassifyRequest = parse_json(&body)?;
        let (inputs, _) = req.input.into_vec();
        let texts = inputs.clone();
        let request = EncodeRequest {
            model: req.model,
            inputs,
            truncate: req.truncate,
            timeout: timeout(&headers)?,
        };
        let (model, encoded) = state.infer.encode(Endpoint::Classify, request).await?;
        if model.task != EncoderTask::TokenClassification {
            return Err(InferError::invalid(
                "model",
                format!("model `{}` labels whole texts: use POST /predict", model.name),
            ));
        }
        let data: Vec<Value> = encoded
            .iter()
            .zip(&texts)
            .enumerate()
            .map(|(index, (e, text))| {
                json!({"index": index, "entities": entities(&model, e, text, req.aggregation_strategy)})
            })
            .collect();
        Ok::<_, InferError>(json!({"object": "list", "model": model.name, "data": data}))
    };
    match run.await {
        Ok(body) => Json(body).into_response(),
        Err(e) => e.into_response(),
    }
}

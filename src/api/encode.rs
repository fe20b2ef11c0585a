//! Encoder routes: TEI's `POST /predict` (sequence classification: labels and scores of each
//! input), `POST /rerank` (a cross-encoder's score of each text against a query), `POST /embed`,
//! `POST /tokenize` and `POST /decode`, OpenAI's `POST /v1/embeddings`,
//! and `POST /v1/classify` (token classification: the entities of each input with character
//! offsets). The handlers translate wire formats; [`crate::infer`] does the rest.

use std::collections::HashMap;

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
use crate::constrain::{ConstraintError, SubsetText};
use crate::infer::{
    Aggregation, EncodeRequest, Encoded, Endpoint, TruncationDirection, check_count, embedding, entities, label_scores,
};
use crate::repository::{EncoderTask, EncoderVersion};

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

fn respond(answer: Result<Value, InferError>) -> Response {
    match answer {
        Ok(body) => Json(body).into_response(),
        Err(e) => e.into_response(),
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
    /// Which end `truncate` cuts (`Right`, the default, or `Left`).
    #[serde(default)]
    truncation_direction: TruncationDirection,
    /// Only the best `top_k` labels of each input.
    #[serde(default)]
    top_k: Option<usize>,
    /// A terminology whose codes the labels are: each label gets its description.
    #[serde(default)]
    terminology: Option<String>,
    /// Only labels in this subset of the terminology (`"I00-I99"`, `"chapter:9"`, ECL).
    #[serde(default)]
    codes: Option<String>,
}

/// `POST /predict`: each input's labels, best first (`[{"label", "score"}]`; a list of those
/// for a list of inputs).
pub async fn predict(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let run = async {
        let req: PredictRequest = parse_json(&body)?;
        let (inputs, many) = req.inputs.into_vec();
        let truncate = req.truncate.then_some(req.truncation_direction);
        let request = EncodeRequest::new(req.model, inputs, truncate, timeout(&headers)?);
        let (model, encoded) = state.infer.encode(Endpoint::Predict, request).await?;
        wrong_route(
            &model,
            &[
                EncoderTask::SingleLabelClassification,
                EncoderTask::MultiLabelClassification,
            ],
        )?;
        let codes = coded_labels(&state, &model.labels, req.terminology.as_deref(), req.codes.as_deref())?;
        let answers: Vec<Value> = encoded
            .iter()
            .map(|e| {
                let mut scores = label_scores(&model, &e.output.values, req.raw_scores);
                if let Some(codes) = &codes {
                    scores.retain_mut(|s| {
                        s.description = codes.get(&s.label).cloned();
                        s.description.is_some()
                    });
                }
                scores.truncate(req.top_k.unwrap_or(usize::MAX));
                json!(scores)
            })
            .collect();
        Ok::<_, InferError>(if many { json!(answers) } else { answers[0].clone() })
    };
    respond(run.await)
}

/// The description of each of `labels` that is a code of `terminology` (default: the only
/// one loaded), within `codes` when given (`None` for the others); nothing when the request
/// names neither.
fn coded_labels(
    state: &AppState,
    labels: &[String],
    terminology: Option<&str>,
    codes: Option<&str>,
) -> Result<Option<HashMap<String, String>>, InferError> {
    if terminology.is_none() && codes.is_none() {
        return Ok(None);
    }
    let name = match terminology {
        Some(name) => name.to_string(),
        None => match state.terminologies.summaries().as_slice() {
            [one] => one.name.clone(),
            _ => {
                return Err(InferError::invalid(
                    "terminology",
                    "`codes` needs `terminology` where not exactly one terminology is loaded",
                ));
            }
        },
    };
    let subset = codes.map(|c| SubsetText::One(c.to_string()));
    let selected = state
        .terminologies
        .select(&name, subset.as_ref())
        .map_err(|e| match e {
            ConstraintError::UnknownTerminology { .. } => InferError::invalid("terminology", e.to_string()),
            ConstraintError::Invalid(_) => InferError::invalid("codes", e.to_string()),
        })?;
    let entries = &selected.terminology.entries;
    // Only the model's labels are looked up, not the whole release.
    let mut described = HashMap::new();
    for label in labels {
        let Ok(i) = entries.binary_search_by(|e| e.code.as_str().cmp(label)) else {
            continue;
        };
        // Members are entry indices in order.
        if selected.members.binary_search(&i).is_ok() {
            described.insert(label.clone(), entries[i].description.clone());
        }
    }
    Ok(Some(described))
}

/// `POST /rerank` body (TEI).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RerankRequest {
    #[serde(default)]
    model: Option<String>,
    query: String,
    texts: Vec<String>,
    /// The logit instead of its sigmoid.
    #[serde(default)]
    raw_scores: bool,
    #[serde(default)]
    return_text: bool,
    #[serde(default)]
    truncate: bool,
    /// Which end `truncate` cuts (`Right`, the default, or `Left`).
    #[serde(default)]
    truncation_direction: TruncationDirection,
}

/// `POST /rerank`: each text's relevance to the query by a cross-encoder (a one-label sequence
/// classifier reading `[CLS] query [SEP] text [SEP]`), best first: `[{"index", "score"}]`
/// (with `"text"` when `return_text`).
pub async fn rerank(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let run = async {
        let req: RerankRequest = parse_json(&body)?;
        if req.query.trim().is_empty() {
            return Err(InferError::invalid("query", "the query must not be empty"));
        }
        let texts = req.texts.clone();
        let truncate = req.truncate.then_some(req.truncation_direction);
        let request = EncodeRequest {
            query: Some(req.query),
            ..EncodeRequest::new(req.model, req.texts, truncate, timeout(&headers)?)
        };
        let (model, encoded) = state.infer.encode(Endpoint::Rerank, request).await?;
        wrong_route(
            &model,
            &[
                EncoderTask::SingleLabelClassification,
                EncoderTask::MultiLabelClassification,
            ],
        )?;
        if model.labels.len() != 1 {
            return Err(InferError::invalid(
                "model",
                format!(
                    "model `{}` has {} labels; a reranker (cross-encoder) has one",
                    model.name,
                    model.labels.len()
                ),
            ));
        }
        let mut ranked: Vec<(usize, f32)> = encoded
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let logit = e.output.values.first().copied().unwrap_or(f32::NEG_INFINITY);
                (
                    i,
                    if req.raw_scores {
                        logit
                    } else {
                        1.0 / (1.0 + (-logit).exp())
                    },
                )
            })
            .collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
        let answer: Vec<Value> = ranked
            .into_iter()
            .map(|(index, score)| match req.return_text {
                true => json!({"index": index, "score": score, "text": texts[index]}),
                false => json!({"index": index, "score": score}),
            })
            .collect();
        Ok(json!(answer))
    };
    respond(run.await)
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
    /// Which end `truncate` cuts (`Right`, the default, or `Left`).
    #[serde(default)]
    truncation_direction: TruncationDirection,
}

/// `POST /v1/classify`: the entities of each input (`{"object": "list", "data": [{"index",
/// "entities": [{"entity_group", "score", "word", "start", "end"}]}]}`).
pub async fn classify(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let run = async {
        let req: ClassifyRequest = parse_json(&body)?;
        let (inputs, _) = req.input.into_vec();
        let texts = inputs.clone();
        let truncate = req.truncate.then_some(req.truncation_direction);
        let request = EncodeRequest {
            // Long texts run in overlapping windows unless the client asked to cut them.
            window: !req.truncate,
            ..EncodeRequest::new(req.model, inputs, truncate, timeout(&headers)?)
        };
        let (model, encoded) = state.infer.encode(Endpoint::Classify, request).await?;
        wrong_route(&model, &[EncoderTask::TokenClassification])?;
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
    respond(run.await)
}

/// Refuses a model whose task is none of `tasks`, naming the route that serves it.
fn wrong_route(model: &EncoderVersion, tasks: &[EncoderTask]) -> Result<(), InferError> {
    if tasks.contains(&model.task) {
        return Ok(());
    }
    let route = match model.task {
        EncoderTask::TokenClassification => "it labels tokens: use POST /v1/classify",
        EncoderTask::Embedding => "it embeds texts: use POST /embed or /v1/embeddings",
        _ => "it labels whole texts: use POST /predict",
    };
    Err(InferError::invalid("model", format!("model `{}`: {route}", model.name)))
}

/// `POST /embed` body (TEI).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmbedRequest {
    #[serde(default)]
    model: Option<String>,
    inputs: Texts,
    /// Default: as the model's sentence-transformers modules say.
    #[serde(default)]
    normalize: Option<bool>,
    #[serde(default)]
    truncate: bool,
    /// Which end `truncate` cuts (`Right`, the default, or `Left`).
    #[serde(default)]
    truncation_direction: TruncationDirection,
}

/// `POST /embed`: one vector per input (`[[f32]]`, for one input too, as TEI).
pub async fn embed(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let run = async {
        let req: EmbedRequest = parse_json(&body)?;
        let (inputs, _) = req.inputs.into_vec();
        let truncate = req.truncate.then_some(req.truncation_direction);
        let request = EncodeRequest::new(req.model, inputs, truncate, timeout(&headers)?);
        let (model, encoded) = state.infer.encode(Endpoint::Embed, request).await?;
        wrong_route(&model, &[EncoderTask::Embedding])?;
        let normalize = req.normalize.unwrap_or(model.normalize);
        let vectors: Vec<Vec<f32>> = encoded.iter().map(|e| embedding(&model, e, normalize)).collect();
        Ok::<_, InferError>(json!(vectors))
    };
    respond(run.await)
}

/// `POST /v1/embeddings` body (OpenAI).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmbeddingsRequest {
    model: String,
    input: Texts,
    /// `float` (default) or `base64` (little-endian f32s, as the OpenAI SDKs ask by default).
    #[serde(default)]
    encoding_format: Option<String>,
    /// Fewer dimensions than the model's are not supported (the model is not Matryoshka-trained).
    #[serde(default)]
    dimensions: Option<usize>,
    /// OpenAI's end-user id: taken and not used.
    #[serde(default, rename = "user")]
    _user: Option<String>,
}

/// `POST /v1/embeddings`: `{"object": "list", "data": [{"object": "embedding", "index",
/// "embedding"}], "model", "usage"}`.
pub async fn embeddings(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let run = async {
        let req: EmbeddingsRequest = parse_json(&body)?;
        let base64 = match req.encoding_format.as_deref() {
            None | Some("float") => false,
            Some("base64") => true,
            Some(other) => {
                return Err(InferError::invalid(
                    "encoding_format",
                    format!("encoding_format `{other}`: `float` or `base64`"),
                ));
            }
        };
        let (inputs, _) = req.input.into_vec();
        let request = EncodeRequest::new(Some(req.model), inputs, None, timeout(&headers)?);
        let (model, encoded) = state.infer.encode(Endpoint::Embed, request).await?;
        wrong_route(&model, &[EncoderTask::Embedding])?;
        let width = encoded
            .first()
            .and_then(|e| e.output.shape.last().copied())
            .unwrap_or(0);
        if let Some(d) = req.dimensions.filter(|&d| d != width) {
            return Err(InferError::invalid(
                "dimensions",
                format!("model `{}` gives {width} dimensions, not {d}", model.name),
            ));
        }
        let tokens: usize = encoded.iter().map(|e: &Encoded| e.offsets.len()).sum();
        let data: Vec<Value> = encoded
            .iter()
            .enumerate()
            .map(|(index, e)| {
                let vector = embedding(&model, e, model.normalize);
                let embedding = if base64 {
                    use base64::Engine;
                    let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                    json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                } else {
                    json!(vector)
                };
                json!({"object": "embedding", "index": index, "embedding": embedding})
            })
            .collect();
        Ok::<_, InferError>(json!({
            "object": "list",
            "data": data,
            "model": model.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }))
    };
    respond(run.await)
}

fn yes() -> bool {
    true
}

/// `POST /tokenize` body (TEI).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenizeRequest {
    #[serde(default)]
    model: Option<String>,
    inputs: Texts,
    #[serde(default = "yes")]
    add_special_tokens: bool,
}

/// `POST /tokenize`: each input's tokens, `[[{"id", "text", "special", "start", "stop"}]]`
/// (`start`/`stop` in characters; a special token's text is the token itself).
pub async fn tokenize(State(state): State<AppState>, body: Bytes) -> Response {
    let run = async {
        let req: TokenizeRequest = parse_json(&body)?;
        let model = state.infer.encoder(req.model.as_deref())?;
        let (inputs, _) = req.inputs.into_vec();
        check_count("inputs", inputs.len())?;
        let add_special = req.add_special_tokens;
        let tokens = tokio::task::spawn_blocking(move || {
            inputs
                .iter()
                .enumerate()
                .map(|(i, text)| {
                    let encoding = model
                        .tokenizer
                        .encode_char_offsets(text.as_str(), add_special)
                        .map_err(|e| InferError::invalid("inputs", format!("input {i}: {e}")))?;
                    let chars: Vec<char> = text.chars().collect();
                    let tokens: Vec<Value> = encoding
                        .get_ids()
                        .iter()
                        .zip(encoding.get_offsets())
                        .zip(encoding.get_special_tokens_mask())
                        .zip(encoding.get_tokens())
                        .map(|(((&id, &(start, stop)), &special), token)| {
                            let special = special == 1;
                            let piece = match special {
                                true => token.clone(),
                                false => chars[start.min(chars.len())..stop.min(chars.len())].iter().collect(),
                            };
                            json!({"id": id, "text": piece, "special": special, "start": start, "stop": stop})
                        })
                        .collect();
                    Ok(json!(tokens))
                })
                .collect::<Result<Vec<Value>, InferError>>()
        })
        .await
        .map_err(|e| InferError::internal(format!("tokenizing stopped: {e}")))??;
        Ok(json!(tokens))
    };
    respond(run.await)
}

/// Token ids: one list, or several.
#[derive(Deserialize)]
#[serde(untagged)]
enum Ids {
    One(Vec<u32>),
    Many(Vec<Vec<u32>>),
}

/// `POST /decode` body (TEI).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DecodeRequest {
    #[serde(default)]
    model: Option<String>,
    ids: Ids,
    #[serde(default = "yes")]
    skip_special_tokens: bool,
}

/// `POST /decode`: the text of each list of ids (`["..."]`).
pub async fn decode(State(state): State<AppState>, body: Bytes) -> Response {
    let run = async {
        let req: DecodeRequest = parse_json(&body)?;
        let model = state.infer.encoder(req.model.as_deref())?;
        let lists = match req.ids {
            Ids::One(ids) => vec![ids],
            Ids::Many(lists) => lists,
        };
        check_count("ids", lists.len())?;
        let vocab = model.tokenizer.get_vocab_size(true) as u32;
        let mut texts = Vec::with_capacity(lists.len());
        for ids in &lists {
            if let Some(id) = ids.iter().find(|&&id| id >= vocab) {
                return Err(InferError::invalid(
                    "ids",
                    format!("token id {id} is outside the vocabulary of {vocab}"),
                ));
            }
            let text = model
                .tokenizer
                .decode(ids, req.skip_special_tokens)
                .map_err(|e| InferError::invalid("ids", e.to_string()))?;
            texts.push(text);
        }
        Ok(json!(texts))
    };
    respond(run.await)
}

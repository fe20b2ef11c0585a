//! Checks shared by every protocol: sampling settings, prompt length against the context, and
//! the [`GenerationRequest`] they become.

use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use serde::Deserialize;

use super::error::ApiError;
use crate::constrain::{ConstraintRequest, Guide, JsonMachine, Terminologies};
use crate::generate::{GenerationRequest, MAX_TOP_LOGPROBS, SamplingParams};
use crate::repository::ModelVersion;
use crate::tokenize::ChatMessage;

/// `stop`: one string or up to four.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling fields shared by both routes.
#[derive(Debug, Default, Deserialize)]
pub struct Sampling {
    pub max_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// Not in OpenAI's API; vLLM and TGI accept it.
    pub top_k: Option<i64>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    pub n: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// Not in OpenAI's API: keep the answer inside a loaded terminology.
    pub constraint: Option<ConstraintRequest>,
    /// `{"type": "json_schema", "json_schema": {"schema": ...}}`: a JSON object of that schema,
    /// whose string properties may carry `"x-terminology"`.
    pub response_format: Option<serde_json::Value>,
    /// Not in OpenAI's API (vLLM's extension): tokens in `logprobs` as `token_id:N`.
    #[serde(default)]
    pub return_tokens_as_token_ids: bool,
}

/// Most items a constrained answer may hold.
pub const MAX_CONSTRAINT_ITEMS: usize = 64;

/// The guide of a request's `response_format` (a JSON schema) or `constraint`, over `model`'s
/// vocabulary.
pub fn guide(
    terminologies: &Terminologies,
    model: &ModelVersion,
    sampling: &Sampling,
) -> Result<Option<Guide>, ApiError> {
    let schema = match &sampling.response_format {
        None => None,
        Some(format) => match format.get("type").and_then(serde_json::Value::as_str) {
            Some("text") => None,
            Some("json_schema") => Some(
                format
                    .pointer("/json_schema/schema")
                    .ok_or_else(|| ApiError::invalid("response_format", "json_schema needs a \"schema\""))?,
            ),
            other => {
                return Err(ApiError::invalid(
                    "response_format",
                    format!("type {other:?} is not supported (\"text\" or \"json_schema\")"),
                ));
            }
        },
    };
    match (schema, &sampling.constraint) {
        (Some(_), Some(_)) => Err(ApiError::invalid(
            "constraint",
            "give either a constraint or a json_schema response_format",
        )),
        (Some(schema), None) => {
            let machine = JsonMachine::compile(schema, terminologies)
                .map_err(|e| ApiError::invalid("response_format", e.to_string()))?;
            Ok(Some(Guide::json(
                std::sync::Arc::new(machine),
                std::sync::Arc::clone(&model.token_trie),
            )))
        }
        (None, spec) => constraint(terminologies, model, spec.as_ref()),
    }
}

/// Checks `spec` and builds the sequence's guide over `model`'s vocabulary.
fn constraint(
    terminologies: &Terminologies,
    model: &ModelVersion,
    spec: Option<&ConstraintRequest>,
) -> Result<Option<Guide>, ApiError> {
    let Some(spec) = spec else { return Ok(None) };
    if !(1..=MAX_CONSTRAINT_ITEMS).contains(&spec.max_items) {
        return Err(ApiError::invalid(
            "constraint.max_items",
            format!("max_items must be 1 to {MAX_CONSTRAINT_ITEMS}, got {}", spec.max_items),
        ));
    }
    if spec.max_items > 1 && spec.separator.is_empty() {
        return Err(ApiError::invalid(
            "constraint.separator",
            "several items need a non-empty separator",
        ));
    }
    let terms = terminologies
        .term_set(&spec.terminology, spec.match_kind, spec.code_format, spec.billable_only)
        .map_err(|e| ApiError::invalid("constraint.terminology", e.to_string()))?;
    let guide = Guide::new(
        terms,
        std::sync::Arc::clone(&model.token_trie),
        spec.max_items,
        spec.separator.as_bytes().to_vec(),
    );
    Ok(Some(guide.after(spec.after.as_deref().unwrap_or_default().as_bytes())))
}

/// Checks the sampling fields and builds the request for `prompt` on `model`, to be dropped
/// at `deadline` if it has not finished by then.
pub fn build_request(
    model: &ModelVersion,
    prompt: Vec<u32>,
    sampling: &Sampling,
    max_tokens: Option<i64>,
    logprobs: Option<i64>,
    deadline: Option<Instant>,
) -> Result<GenerationRequest, ApiError> {
    if prompt.is_empty() {
        return Err(ApiError::invalid("prompt", "the prompt is empty"));
    }
    let context = model.context_length;
    if prompt.len() >= context {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "the prompt has {} tokens; the context length of model `{}` is {context} tokens",
                prompt.len(),
                model.name
            ),
        ));
    }
    let room = context - prompt.len();
    let max_new_tokens = match max_tokens {
        None => model.max_tokens.min(room),
        Some(n) if n < 1 => {
            return Err(ApiError::invalid(
                "max_tokens",
                format!("max_tokens must be at least 1, got {n}"),
            ));
        }
        Some(n) if n as u64 > room as u64 => {
            return Err(ApiError::invalid(
                "max_tokens",
                format!(
                    "max_tokens {n} plus the prompt's {} tokens exceeds the context length of {context} tokens",
                    prompt.len()
                ),
            ));
        }
        Some(n) => n as usize,
    };
    if let Some(n) = sampling.n
        && n != 1
    {
        return Err(ApiError::invalid("n", format!("only n = 1 is supported, got {n}")));
    }
    let temperature = sampling.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            "temperature",
            format!("temperature must be in [0, 2], got {temperature}"),
        ));
    }
    let top_p = sampling.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            "top_p",
            format!("top_p must be in (0, 1], got {top_p}"),
        ));
    }
    let top_k = match sampling.top_k {
        None | Some(-1) => 0,
        Some(k) if k >= 0 => k as usize,
        Some(k) => {
            return Err(ApiError::invalid(
                "top_k",
                format!("top_k must be -1 (off) or >= 0, got {k}"),
            ));
        }
    };
    let stop = match &sampling.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) if v.len() <= 4 => v.clone(),
        Some(Stop::Many(v)) => {
            return Err(ApiError::invalid(
                "stop",
                format!("at most 4 stop strings, got {}", v.len()),
            ));
        }
    };
    let logprobs = match logprobs {
        None => None,
        Some(n) if (0..=MAX_TOP_LOGPROBS as i64).contains(&n) => Some(n as usize),
        Some(n) => {
            return Err(ApiError::invalid(
                "top_logprobs",
                format!("at most {MAX_TOP_LOGPROBS} alternatives per token, got {n}"),
            ));
        }
    };
    Ok(GenerationRequest {
        prompt,
        max_new_tokens,
        sampling: SamplingParams {
            temperature,
            top_k,
            top_p,
            seed: sampling.seed,
        },
        stop,
        stop_token_ids: model.stop_token_ids.clone(),
        logprobs,
        token_ids_in_logprobs: sampling.return_tokens_as_token_ids,
        stream: sampling.stream,
        deadline,
        constraint: None,
    })
}

/// Token ids of a raw prompt (the tokenizer adds its special tokens, as `transformers` does).
pub fn text_prompt(model: &ModelVersion, text: &str) -> Result<Vec<u32>, ApiError> {
    encode(model, text, true)
}

/// Token ids of `messages` rendered with the model's chat template.
pub fn chat_prompt(model: &ModelVersion, messages: &[ChatMessage]) -> Result<Vec<u32>, ApiError> {
    let template = model.chat_template.as_ref().ok_or_else(|| {
        ApiError::invalid(
            "messages",
            format!("model `{}` has no chat template; send a raw prompt", model.name),
        )
    })?;
    let text = template
        .render(messages)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    // The template already wrote the special tokens.
    encode(model, &text, false)
}

/// Checks that client-given token ids are in the vocabulary.
pub fn check_token_ids(model: &ModelVersion, ids: Vec<u32>) -> Result<Vec<u32>, ApiError> {
    let vocab = model.tokenizer.get_vocab_size(true) as u32;
    match ids.iter().find(|&&id| id >= vocab) {
        Some(id) => Err(ApiError::invalid(
            "prompt",
            format!("token id {id} is outside the vocabulary of {vocab}"),
        )),
        None => Ok(ids),
    }
}

fn encode(model: &ModelVersion, text: &str, special: bool) -> Result<Vec<u32>, ApiError> {
    model
        .tokenizer
        .encode(text, special)
        .map(|e| e.get_ids().to_vec())
        .map_err(|e| ApiError::invalid("prompt", format!("cannot tokenize the prompt: {e}")))
}

/// Header giving a request's timeout in milliseconds (overrides the server default).
pub const TIMEOUT_HEADER: &str = "x-request-timeout-ms";

/// The deadline of a request: its timeout header, else the server default (none when neither).
pub fn deadline(headers: &HeaderMap, default: Option<Duration>) -> Result<Option<Instant>, ApiError> {
    let timeout = match headers.get(TIMEOUT_HEADER) {
        Some(value) => {
            let ms = value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    ApiError::invalid(
                        "x-request-timeout-ms",
                        "the x-request-timeout-ms header must be whole milliseconds",
                    )
                })?;
            Some(Duration::from_millis(ms))
        }
        None => default,
    };
    Ok(timeout.map(|t| Instant::now() + t))
}

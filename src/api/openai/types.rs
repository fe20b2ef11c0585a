//! Request bodies of the OpenAI-compatible routes, and their validation into a
//! [`GenerationRequest`].

use serde::Deserialize;

use crate::api::error::ApiError;
use crate::generate::{GenerationRequest, MAX_TOP_LOGPROBS, SamplingParams};
use crate::repository::ModelVersion;

/// `prompt` of `/v1/completions`: a string, a one-element list of strings, or token ids.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
}

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
}

/// Body of `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Prompt,
    #[serde(flatten)]
    pub sampling: Sampling,
    /// Number of alternatives per token to report (0..=20), as in the legacy completions API.
    pub logprobs: Option<i64>,
    pub echo: Option<bool>,
}

/// Content of a chat message: a string or a list of text parts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// One part of a multi-part message; only `text` parts are supported.
#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

/// One chat message.
#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Option<Content>,
}

/// Body of `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<Message>,
    #[serde(flatten)]
    pub sampling: Sampling,
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<i64>,
}

impl Message {
    /// The message's text, parts joined.
    pub fn text(&self) -> Result<String, ApiError> {
        match &self.content {
            None => Ok(String::new()),
            Some(Content::Text(t)) => Ok(t.clone()),
            Some(Content::Parts(parts)) => parts
                .iter()
                .map(|p| match (p.kind.as_str(), &p.text) {
                    ("text", Some(t)) => Ok(t.as_str()),
                    (kind, _) => Err(ApiError::invalid(
                        "messages",
                        format!("content part of type {kind:?} is not supported (only text)"),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(|parts| parts.concat()),
        }
    }
}

/// Checks the sampling fields and builds the request for `prompt` on `model`.
pub fn build_request(
    model: &ModelVersion,
    prompt: Vec<u32>,
    sampling: &Sampling,
    max_tokens: Option<i64>,
    logprobs: Option<i64>,
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
    })
}

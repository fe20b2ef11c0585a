//! Request bodies of the OpenAI-compatible routes, and their translation into the
//! protocol-neutral [`InferRequest`].

use std::time::Duration;

use serde::Deserialize;

use crate::constrain::ConstraintRequest;
use crate::infer::{Endpoint, GuideSpec, InferError, InferRequest, Params, Prompt as InferPrompt};
use crate::tokenize::ChatMessage;

/// `stop`: one string or a list.
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
    /// vLLM's extension, sent by load generators: generate `max_tokens` whatever EOS says.
    #[serde(default)]
    pub ignore_eos: bool,
    /// vLLM's extension: tokens before EOS may end the answer.
    pub min_tokens: Option<i64>,
    /// vLLM's extension: lower is served earlier (below 0 high, 0 normal, above 0 low).
    pub priority: Option<i64>,
}

impl Sampling {
    /// Whether a streamed answer ends with a usage chunk.
    pub fn include_usage(&self) -> bool {
        self.stream_options.as_ref().is_some_and(|o| o.include_usage)
    }

    /// The neutral request of `prompt` to `model` with these settings.
    fn request(
        self,
        model: String,
        endpoint: Endpoint,
        prompt: InferPrompt,
        max_tokens: Option<i64>,
        logprobs: Option<i64>,
        timeout: Option<Duration>,
    ) -> Result<InferRequest, InferError> {
        let guide = guide(self.response_format.as_ref(), self.constraint)?;
        Ok(InferRequest {
            params: Params {
                max_tokens,
                temperature: self.temperature,
                top_p: self.top_p,
                top_k: self.top_k,
                seed: self.seed,
                stop: match self.stop {
                    None => Vec::new(),
                    Some(Stop::One(s)) => vec![s],
                    Some(Stop::Many(v)) => v,
                },
                n: self.n,
                logprobs,
                token_ids_in_logprobs: self.return_tokens_as_token_ids,
                ignore_eos: self.ignore_eos,
                min_tokens: self.min_tokens,
                priority: self.priority,
            },
            guide,
            stream: self.stream,
            timeout,
            ..InferRequest::new(model, endpoint, prompt)
        })
    }
}

/// The guide of `response_format` (a JSON schema) or `constraint`; not both.
fn guide(
    response_format: Option<&serde_json::Value>,
    constraint: Option<ConstraintRequest>,
) -> Result<Option<GuideSpec>, InferError> {
    let schema = match response_format {
        None => None,
        Some(format) => match format.get("type").and_then(serde_json::Value::as_str) {
            Some("text") => None,
            Some("json_schema") => Some(
                format
                    .pointer("/json_schema/schema")
                    .ok_or_else(|| InferError::invalid("response_format", "json_schema needs a \"schema\""))?,
            ),
            other => {
                return Err(InferError::invalid(
                    "response_format",
                    format!("type {other:?} is not supported (\"text\" or \"json_schema\")"),
                ));
            }
        },
    };
    match (schema, constraint) {
        (Some(_), Some(_)) => Err(InferError::invalid(
            "constraint",
            "give either a constraint or a json_schema response_format",
        )),
        (Some(schema), None) => Ok(Some(GuideSpec::JsonSchema(schema.clone()))),
        (None, constraint) => Ok(constraint.map(GuideSpec::Terms)),
    }
}

/// `prompt` of `/v1/completions`: a string, a one-element list of strings, or token ids.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
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

impl CompletionRequest {
    /// The neutral request, waiting at most `timeout`.
    pub fn into_request(self, timeout: Option<Duration>) -> Result<InferRequest, InferError> {
        if self.echo == Some(true) {
            return Err(InferError::invalid("echo", "echo is not supported"));
        }
        let prompt = match self.prompt {
            Prompt::Text(text) => InferPrompt::Text(text),
            Prompt::Texts(mut texts) if texts.len() == 1 => InferPrompt::Text(texts.remove(0)),
            Prompt::Texts(texts) => {
                return Err(InferError::invalid(
                    "prompt",
                    format!("one prompt per request, got {}", texts.len()),
                ));
            }
            Prompt::Tokens(ids) => InferPrompt::Tokens(ids),
        };
        let max_tokens = self.sampling.max_tokens;
        self.sampling.request(
            self.model,
            Endpoint::Completions,
            prompt,
            max_tokens,
            self.logprobs,
            timeout,
        )
    }
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

impl ChatRequest {
    /// The neutral request, waiting at most `timeout`.
    pub fn into_request(self, timeout: Option<Duration>) -> Result<InferRequest, InferError> {
        let messages = self
            .messages
            .into_iter()
            .map(Message::into_chat)
            .collect::<Result<Vec<_>, _>>()?;
        let max_tokens = self.max_completion_tokens.or(self.sampling.max_tokens);
        let logprobs = match (self.logprobs, self.top_logprobs) {
            (true, n) => Some(n.unwrap_or(0)),
            (false, None) => None,
            (false, Some(_)) => return Err(InferError::invalid("top_logprobs", "top_logprobs needs logprobs: true")),
        };
        self.sampling.request(
            self.model,
            Endpoint::ChatCompletions,
            InferPrompt::Chat(messages),
            max_tokens,
            logprobs,
            timeout,
        )
    }
}

impl Message {
    /// The message with its parts joined.
    fn into_chat(self) -> Result<ChatMessage, InferError> {
        let content = match self.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => parts
                .into_iter()
                .map(|p| match (p.kind.as_str(), p.text) {
                    ("text", Some(t)) => Ok(t),
                    (kind, _) => Err(InferError::invalid(
                        "messages",
                        format!("content part of type {kind:?} is not supported (only text)"),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?
                .concat(),
        };
        Ok(ChatMessage {
            role: self.role,
            content,
        })
    }
}

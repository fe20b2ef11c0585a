//! A generation request as every protocol hands it over: the wire formats (OpenAI JSON, the
//! `Generate` protobuf, KServe tensors) are translated into these types and nothing else.

use std::time::Duration;

use crate::constrain::ConstraintRequest;
use crate::tokenize::ChatMessage;

/// Which route or method a request came through: the `endpoint` label of request metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/completions`.
    Completions,
    /// `POST /v1/chat/completions`.
    ChatCompletions,
    /// gRPC `distill_serve.v1.Generate/Generate`.
    Generate,
    /// gRPC `distill_serve.v1.Generate/GenerateStream`.
    GenerateStream,
    /// gRPC KServe v2 `ModelInfer`.
    ModelInfer,
    /// `POST /predict` (sequence classification).
    Predict,
    /// `POST /v1/classify` (token classification).
    Classify,
    /// `POST /embed` and `POST /v1/embeddings`.
    Embed,
    /// `POST /rerank`.
    Rerank,
}

impl Endpoint {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Completions => "completions",
            Endpoint::ChatCompletions => "chat_completions",
            Endpoint::Generate => "generate",
            Endpoint::GenerateStream => "generate_stream",
            Endpoint::ModelInfer => "model_infer",
            Endpoint::Predict => "predict",
            Endpoint::Classify => "classify",
            Endpoint::Embed => "embed",
            Endpoint::Rerank => "rerank",
        }
    }
}

/// What the model continues.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Raw text; the tokenizer adds its special tokens, as `transformers` does.
    Text(String),
    /// Messages rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
    /// Token ids, used as they are.
    Tokens(Vec<u32>),
}

impl Prompt {
    /// The text's size in bytes (messages: their roles and contents), before any rendering;
    /// token ids count nothing here (their number is checked against the context).
    pub fn text_bytes(&self) -> usize {
        match self {
            Prompt::Text(text) => text.len(),
            Prompt::Chat(messages) => messages.iter().map(|m| m.role.len() + m.content.len()).sum(),
            Prompt::Tokens(_) => 0,
        }
    }
}

/// Sampling and output settings as the client gave them; checked by validation, which names
/// the field at fault with the names below (OpenAI's).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Params {
    pub max_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// `-1` or absent: off.
    pub top_k: Option<i64>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    /// Answers per prompt; only 1 is supported.
    pub n: Option<i64>,
    /// `Some(k)`: each token's log-probability and its `k` best alternatives.
    pub logprobs: Option<i64>,
    /// Name tokens in log-probabilities `token_id:N` (vLLM's `return_tokens_as_token_ids`).
    pub token_ids_in_logprobs: bool,
    /// Generate until `max_tokens`, never stopping at EOS (vLLM's `ignore_eos`).
    pub ignore_eos: bool,
    /// Tokens to generate before EOS may end the answer (vLLM's `min_tokens`).
    pub min_tokens: Option<i64>,
    /// vLLM's `priority`: lower is served earlier; below 0 high, 0 normal, above 0 low.
    pub priority: Option<i64>,
}

/// What the answer must be.
#[derive(Debug, Clone, PartialEq)]
pub enum GuideSpec {
    /// Members of a loaded terminology.
    Terms(ConstraintRequest),
    /// A JSON object of this schema (`response_format` `json_schema`).
    JsonSchema(serde_json::Value),
}

/// One generation request, independent of the protocol it came through.
#[derive(Debug, Clone, PartialEq)]
pub struct InferRequest {
    pub model: String,
    pub endpoint: Endpoint,
    pub prompt: Prompt,
    pub params: Params,
    pub guide: Option<GuideSpec>,
    /// Whether the client reads tokens as they are generated.
    pub stream: bool,
    /// How long the client waits; the server's default when `None`.
    pub timeout: Option<Duration>,
}

impl InferRequest {
    /// A request of `prompt` to `model` through `endpoint`, every setting at its default.
    pub fn new(model: impl Into<String>, endpoint: Endpoint, prompt: Prompt) -> Self {
        Self {
            model: model.into(),
            endpoint,
            prompt,
            params: Params::default(),
            guide: None,
            stream: false,
            timeout: None,
        }
    }
}

//! The teacher client: any OpenAI-compatible chat completions endpoint (DeepSeek API, vLLM,
//! TGI, another distill-serve), with bounded concurrency, a rate limit, retries with backoff
//! and timeouts.
//!
//! Sequence-level KD needs only the teacher's text (and `reasoning_content` where it returns
//! one). Token-level KD needs its top-k log-probabilities in the student's vocabulary, so the
//! teacher must share the student's tokenizer: every teacher token must map to a student token
//! and the tokens must spell the teacher's text, or the job fails saying so.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokenizers::Tokenizer;

use super::outbound::KEY_ENV_PREFIX;
use super::store::TeacherOutput;
use crate::generate::MAX_TOP_LOGPROBS;
use crate::tokenize::ChatMessage;

/// Which knowledge the teacher hands over.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KdMode {
    /// Its completions (cross-entropy on the teacher's text).
    #[default]
    Sequence,
    /// Its completions with top-k log-probabilities (KL at temperature).
    Token,
}

/// Where and how to ask the teacher.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherSpec {
    /// Base URL of the OpenAI-compatible API, e.g. `https://api.deepseek.com/v1`.
    pub url: String,
    pub model: String,
    /// Name of the environment variable holding the API key (never the key itself).
    #[serde(default)]
    pub api_key_env: Option<String>,
    #[serde(default)]
    pub mode: KdMode,
    /// Alternatives per token in token-level KD (at most 20).
    #[serde(default = "default_top_logprobs")]
    pub top_logprobs: usize,
    #[serde(default = "default_max_tokens")]
    pub max_tokens: usize,
    #[serde(default)]
    pub temperature: f64,
    /// Requests in flight at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Most requests started per second (no limit when absent).
    #[serde(default)]
    pub requests_per_second: Option<f64>,
    /// Per-request timeout.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Retries of a failed request (connection errors, timeouts, 429 and 5xx).
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
}

fn default_top_logprobs() -> usize {
    5
}
fn default_max_tokens() -> usize {
    64
}
fn default_concurrency() -> usize {
    4
}
fn default_timeout_ms() -> u64 {
    60_000
}
fn default_max_retries() -> u32 {
    3
}

impl TeacherSpec {
    /// Identifies outputs that can be reused: same endpoint, model and generation settings.
    pub fn cache_key(&self) -> String {
        let k = match self.mode {
            KdMode::Sequence => 0,
            KdMode::Token => self.top_logprobs,
        };
        format!(
            "{}|{}|{:?}|k={k}|max_tokens={}|temperature={}",
            self.url.trim_end_matches('/'),
            self.model,
            self.mode,
            self.max_tokens,
            self.temperature
        )
    }

    /// Checks the settings before anything is sent.
    pub fn validate(&self) -> Result<(), TeacherError> {
        let bad = |m: String| Err(TeacherError::Config(m));
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return bad(format!("teacher.url {:?} must be an http(s) URL", self.url));
        }
        if self.mode == KdMode::Token && !(1..=MAX_TOP_LOGPROBS).contains(&self.top_logprobs) {
            return bad(format!("teacher.top_logprobs must be 1..={MAX_TOP_LOGPROBS}"));
        }
        if self.concurrency == 0 || self.max_tokens == 0 || self.timeout_ms == 0 {
            return bad("teacher.concurrency, max_tokens and timeout_ms must be positive".into());
        }
        if self
            .requests_per_second
            .is_some_and(|r| !(MIN_REQUESTS_PER_SECOND..=MAX_REQUESTS_PER_SECOND).contains(&r))
        {
            return bad(format!(
                "teacher.requests_per_second must be {MIN_REQUESTS_PER_SECOND} to {MAX_REQUESTS_PER_SECOND}"
            ));
        }
        if let Some(var) = &self.api_key_env
            && !var.starts_with(KEY_ENV_PREFIX)
        {
            return bad(format!(
                "teacher.api_key_env {var:?} must name a variable starting with {KEY_ENV_PREFIX} (jobs may not read the server's other secrets)"
            ));
        }
        Ok(())
    }
}

/// Slowest teacher rate a job may ask for: one request every 1000 s.
const MIN_REQUESTS_PER_SECOND: f64 = 0.001;
/// Fastest: beyond it the limit means nothing.
const MAX_REQUESTS_PER_SECOND: f64 = 1e6;
/// Longest wait a teacher's `Retry-After` may ask for.
const MAX_RETRY_AFTER_S: f64 = 30.0;

/// Why the teacher could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TeacherError {
    #[error("{0}")]
    Config(String),
    #[error("teacher {url}: {message}")]
    Request { url: String, message: String },
    #[error("teacher {url} rejected the request ({status}): {body}")]
    Rejected { url: String, status: u16, body: String },
    #[error("token-level KD: {0}; the teacher must share the student's tokenizer (or use mode \"sequence\")")]
    TokenizerMismatch(String),
}

/// The student's vocabulary, to read the teacher's tokens in it.
pub struct StudentVocab {
    tokenizer: Arc<Tokenizer>,
    by_bytes: HashMap<Vec<u8>, u32>,
}

impl StudentVocab {
    /// Indexes the tokens of `tokenizer` by their bytes (`token_bytes[id]`).
    pub fn new(tokenizer: Arc<Tokenizer>, token_bytes: &[Vec<u8>]) -> Self {
        let mut by_bytes = HashMap::with_capacity(token_bytes.len());
        for (id, b) in token_bytes.iter().enumerate() {
            if !b.is_empty() {
                by_bytes.entry(b.clone()).or_insert(id as u32);
            }
        }
        Self { tokenizer, by_bytes }
    }

    /// The student id of a teacher token: `token_id:N` (vLLM's `return_tokens_as_token_ids`),
    /// else its `bytes`, else its text.
    fn id_of(&self, entry: &Value) -> Result<u32, TeacherError> {
        let token = entry.get("token").and_then(Value::as_str).unwrap_or_default();
        if let Some(id) = token.strip_prefix("token_id:").and_then(|n| n.parse::<u32>().ok()) {
            if (id as usize) < self.tokenizer.get_vocab_size(true) {
                return Ok(id);
            }
            return Err(TeacherError::TokenizerMismatch(format!(
                "teacher token id {id} is outside the student's vocabulary"
            )));
        }
        let bytes: Vec<u8> = match entry.get("bytes").and_then(Value::as_array) {
            Some(b) => b.iter().filter_map(|v| v.as_u64().map(|x| x as u8)).collect(),
            None => token.as_bytes().to_vec(),
        };
        self.by_bytes
            .get(&bytes)
            .copied()
            .ok_or_else(|| TeacherError::TokenizerMismatch(format!("teacher token {token:?} is not a student token")))
    }
}

/// A connection to the teacher.
pub struct Teacher {
    spec: TeacherSpec,
    http: reqwest::Client,
    api_key: Option<String>,
    vocab: Arc<StudentVocab>,
    /// When the next request may start (rate limit).
    next_slot: tokio::sync::Mutex<Instant>,
}

impl Teacher {
    /// Checks the settings and reads the API key from the named environment variable.
    pub fn new(spec: TeacherSpec, vocab: Arc<StudentVocab>) -> Result<Self, TeacherError> {
        spec.validate()?;
        let api_key = match &spec.api_key_env {
            Some(var) => Some(std::env::var(var).map_err(|_| {
                TeacherError::Config(format!(
                    "teacher.api_key_env names {var}, which is not set in the server's environment"
                ))
            })?),
            None => None,
        };
        // No redirects: a redirect could lead past the allow-list (see `outbound`).
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_millis(spec.timeout_ms.min(10_000)))
            .timeout(Duration::from_millis(spec.timeout_ms))
            .build()
            .map_err(|e| TeacherError::Config(format!("HTTP client: {e}")))?;
        Ok(Self {
            spec,
            http,
            api_key,
            vocab,
            next_slot: tokio::sync::Mutex::new(Instant::now()),
        })
    }

    /// The settings.
    pub fn spec(&self) -> &TeacherSpec {
        &self.spec
    }

    async fn wait_for_slot(&self) {
        let Some(rps) = self.spec.requests_per_second else {
            return;
        };
        let start = {
            let mut next = self.next_slot.lock().await;
            let start = (*next).max(Instant::now());
            *next = start + Duration::from_secs_f64(1.0 / rps);
            start
        };
        tokio::time::sleep_until(start.into()).await;
    }

    fn body(&self, messages: &[ChatMessage]) -> Value {
        let mut body = json!({
            "model": self.spec.model,
            "messages": messages,
            "max_tokens": self.spec.max_tokens,
            "temperature": self.spec.temperature,
        });
        if self.spec.mode == KdMode::Token {
            body["logprobs"] = json!(true);
            body["top_logprobs"] = json!(self.spec.top_logprobs);
            body["return_tokens_as_token_ids"] = json!(true);
        }
        body
    }

    /// Asks for one completion, retrying transient failures with exponential backoff (or the
    /// server's `Retry-After`).
    pub async fn complete(&self, messages: &[ChatMessage]) -> Result<TeacherOutput, TeacherError> {
        let url = format!("{}/chat/completions", self.spec.url.trim_end_matches('/'));
        let body = self.body(messages);
        let mut attempt = 0;
        loop {
            self.wait_for_slot().await;
            let mut request = self.http.post(&url).json(&body);
            if let Some(key) = &self.api_key {
                request = request.bearer_auth(key);
            }
            let (retry_after, failure) = match request.send().await {
                Ok(response) if response.status().is_success() => {
                    let value: Value = response.json().await.map_err(|e| TeacherError::Request {
                        url: url.clone(),
                        message: format!("unreadable response: {e}"),
                    })?;
                    return self.parse(&url, &value);
                }
                Ok(response) => {
                    let status = response.status();
                    let retry_after = response
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<f64>().ok())
                        // Negative, NaN or endless values are the teacher's mistake: back off.
                        .filter(|s| s.is_finite() && *s >= 0.0)
                        .map(|s| Duration::from_secs_f64(s.min(MAX_RETRY_AFTER_S)));
                    let text = response.text().await.unwrap_or_default();
                    let rejected = TeacherError::Rejected {
                        url: url.clone(),
                        status: status.as_u16(),
                        body: text.chars().take(300).collect(),
                    };
                    if status != StatusCode::TOO_MANY_REQUESTS && !status.is_server_error() {
                        return Err(rejected);
                    }
                    (retry_after, rejected)
                }
                Err(e) => (
                    None,
                    TeacherError::Request {
                        url: url.clone(),
                        message: error_chain(&e),
                    },
                ),
            };
            if attempt >= self.spec.max_retries {
                return Err(failure);
            }
            let backoff = Duration::from_millis(200 << attempt.min(6));
            tokio::time::sleep(retry_after.unwrap_or(backoff)).await;
            attempt += 1;
        }
    }

    fn parse(&self, url: &str, value: &Value) -> Result<TeacherOutput, TeacherError> {
        let malformed = |what: &str| TeacherError::Request {
            url: url.to_string(),
            message: format!("malformed response: {what}"),
        };
        let choice = value.pointer("/choices/0").ok_or_else(|| malformed("no choices[0]"))?;
        let message = choice.get("message").ok_or_else(|| malformed("no message"))?;
        let content = message
            .get("content")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let reasoning = message
            .get("reasoning_content")
            .and_then(Value::as_str)
            .filter(|r| !r.is_empty())
            .map(str::to_string);
        let stopped = choice.get("finish_reason").and_then(Value::as_str) == Some("stop");
        let mut output = TeacherOutput {
            content,
            reasoning,
            stopped,
            token_ids: None,
            top_logprobs: None,
        };
        if self.spec.mode == KdMode::Token {
            let entries = choice
                .pointer("/logprobs/content")
                .and_then(Value::as_array)
                .ok_or_else(|| {
                    TeacherError::TokenizerMismatch(
                        "the teacher returned no logprobs (the DeepSeek API never does)".into(),
                    )
                })?;
            let mut ids = Vec::with_capacity(entries.len());
            let mut tops = Vec::with_capacity(entries.len());
            for entry in entries {
                ids.push(self.vocab.id_of(entry)?);
                let top = entry
                    .get("top_logprobs")
                    .and_then(Value::as_array)
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                tops.push(
                    top.iter()
                        .map(|t| {
                            Ok((
                                self.vocab.id_of(t)?,
                                t.get("logprob").and_then(Value::as_f64).unwrap_or(f64::NEG_INFINITY) as f32,
                            ))
                        })
                        .collect::<Result<Vec<_>, TeacherError>>()?,
                );
            }
            let spelled = self
                .vocab
                .tokenizer
                .decode(&ids, false)
                .map_err(|e| TeacherError::TokenizerMismatch(e.to_string()))?;
            // A server may hold back a last, incomplete character that its tokens do spell.
            let whole = |s: &str| s.trim_end_matches('\u{FFFD}').to_string();
            if whole(&spelled) != whole(&output.content) {
                return Err(TeacherError::TokenizerMismatch(format!(
                    "the teacher's tokens spell {:?} in the student's vocabulary, but its text is {:?}",
                    spelled.chars().take(60).collect::<String>(),
                    output.content.chars().take(60).collect::<String>()
                )));
            }
            output.token_ids = Some(ids);
            output.top_logprobs = Some(tops);
        }
        Ok(output)
    }
}

/// An error with its causes, e.g. "error sending request: connection refused".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> TeacherSpec {
        serde_json::from_value(json!({"url": "http://127.0.0.1:1/v1", "model": "t"})).unwrap()
    }

    #[test]
    fn defaults_validation_and_cache_key() {
        let s = spec();
        assert_eq!(
            (s.mode, s.top_logprobs, s.max_tokens, s.concurrency),
            (KdMode::Sequence, 5, 64, 4)
        );
        s.validate().unwrap();
        let token = TeacherSpec {
            mode: KdMode::Token,
            top_logprobs: 21,
            ..s.clone()
        };
        assert!(token.validate().unwrap_err().to_string().contains("top_logprobs"));
        let ftp = TeacherSpec {
            url: "ftp://x".into(),
            ..s.clone()
        };
        assert!(ftp.validate().is_err());
        let other = TeacherSpec {
            temperature: 0.7,
            ..s.clone()
        };
        assert_ne!(s.cache_key(), other.cache_key());
        let unknown = serde_json::from_value::<TeacherSpec>(json!({"url": "http://x", "model": "t", "modle": 1}));
        assert!(unknown.is_err());
    }

    #[test]
    fn a_missing_api_key_variable_is_named() {
        let s = TeacherSpec {
            api_key_env: Some("TEACHER_DISTILL_SERVE_TEST_UNSET_KEY".into()),
            ..spec()
        };
        let vocab = Arc::new(StudentVocab::new(
            Arc::new(Tokenizer::new(tokenizers::models::bpe::BPE::default())),
            &[],
        ));
        let err = Teacher::new(s, vocab).err().unwrap().to_string();
        assert!(err.contains("DISTILL_SERVE_TEST_UNSET_KEY"), "{err}");
    }
}

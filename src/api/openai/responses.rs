//! Response bodies of the OpenAI-compatible routes: whole answers and the chunks of streamed
//! ones share their parts.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::constrain::Provenance;
use crate::generate::TokenLogprob;

/// `GET /v1/models`.
#[derive(Debug, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

/// One entry of `GET /v1/models`.
#[derive(Debug, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
}

/// Token counts of an answer.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    /// The usage of `prompt` prompt and `completion` generated tokens.
    pub fn new(prompt: usize, completion: usize) -> Self {
        Self {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
        }
    }
}

/// The legacy completions shape of log-probabilities: parallel lists.
#[derive(Debug, Serialize)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Vec<Map<String, Value>>,
}

impl CompletionLogprobs {
    /// The lists of `lps`.
    pub fn new(lps: &[TokenLogprob]) -> Self {
        Self {
            tokens: lps.iter().map(|l| l.token.clone()).collect(),
            token_logprobs: lps.iter().map(|l| l.logprob).collect(),
            top_logprobs: lps
                .iter()
                .map(|l| l.top.iter().map(|(t, p)| (t.clone(), Value::from(*p))).collect())
                .collect(),
        }
    }
}

/// The chat shape of log-probabilities: one entry per token with its alternatives.
#[derive(Debug, Serialize)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

/// One token of [`ChatLogprobs`] (alternatives carry no alternatives of their own).
#[derive(Debug, Serialize)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<Vec<ChatTokenLogprob>>,
}

impl ChatLogprobs {
    /// The entries of `lps`.
    pub fn new(lps: &[TokenLogprob]) -> Self {
        let entry = |token: &str, logprob: f32, top| ChatTokenLogprob {
            token: token.to_string(),
            logprob,
            bytes: token.as_bytes().to_vec(),
            top_logprobs: top,
        };
        Self {
            content: lps
                .iter()
                .map(|l| {
                    let top = l.top.iter().map(|(t, p)| entry(t, *p, None)).collect();
                    entry(&l.token, l.logprob, Some(top))
                })
                .collect(),
        }
    }
}

/// The envelope of every answer and chunk: `choices` of the route's kind, `usage` where the
/// answer reports it, and (an extension) the terminology releases a constrained answer came
/// from, on the whole answer and a stream's last chunks.
#[derive(Debug, Serialize)]
pub struct Answer<'a, C> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<C>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(skip_serializing_if = "<[Provenance]>::is_empty")]
    pub terminologies: &'a [Provenance],
}

/// A body of `/v1/completions`: the whole answer (`text_completion`), or one chunk of a stream
/// (the same object, holding a piece of the text).
pub type Completion<'a> = Answer<'a, CompletionChoice>;

/// A whole answer of `/v1/chat/completions` (`chat.completion`).
pub type ChatCompletion<'a> = Answer<'a, ChatChoice>;

/// The one choice of a [`Completion`].
#[derive(Debug, Serialize)]
pub struct CompletionChoice {
    pub index: u32,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
}

/// The one choice of a [`ChatCompletion`].
#[derive(Debug, Serialize)]
pub struct ChatChoice {
    pub index: u32,
    pub message: AssistantMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: &'static str,
}

/// The answer as a chat message.
#[derive(Debug, Serialize)]
pub struct AssistantMessage {
    pub role: &'static str,
    pub content: String,
}

/// The one choice of a chunk of a streamed chat answer (`chat.completion.chunk`).
#[derive(Debug, Serialize)]
pub struct ChatChunkChoice {
    pub index: u32,
    pub delta: Delta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

/// What a chat chunk adds to the message.
#[derive(Debug, Default, Serialize)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

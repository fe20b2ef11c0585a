//! The decode loop of one sequence: prefill, then one token at a time with the KV cache,
//! sampling, stop tokens and stop strings, log-probabilities, streamed text deltas.

mod sampling;
mod text;

use ndarray::Array2;
use tokenizers::Tokenizer;

use crate::engine::{DecoderSession, EngineError};
pub use sampling::{Choice, Sampler, SamplingParams, argmax, log_softmax};
pub use text::{IncrementalDecoder, StopMatcher, StopStep};

/// The most alternatives `top_logprobs` may ask for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// What to generate for one prompt.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    /// Prompt token ids (at least one).
    pub prompt: Vec<u32>,
    /// Upper bound on generated tokens.
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends before any of these strings; they are not returned.
    pub stop: Vec<String>,
    /// Generation ends at any of these tokens (EOS); they are not returned.
    pub stop_token_ids: Vec<u32>,
    /// `Some(n)`: report each token's log-probability and its `n` best alternatives.
    pub logprobs: Option<usize>,
}

/// Why generation ended, in OpenAI's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FinishReason {
    /// `max_new_tokens` reached.
    #[default]
    Length,
    /// A stop token or stop string.
    Stop,
}

impl FinishReason {
    /// The OpenAI `finish_reason` string.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
        }
    }
}

/// Log-probability of a generated token, with alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

/// One step of output.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A generated token and the text that can be sent now (may be empty while a character or
    /// a possible stop string is incomplete).
    Token {
        id: u32,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    /// The end: remaining text, the reason and the token counts.
    Finished {
        text: String,
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
}

/// Why generation failed.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

fn token_text(tokenizer: &Tokenizer, id: u32) -> Result<String, GenerateError> {
    tokenizer
        .decode(&[id], false)
        .map_err(|e| GenerateError::Tokenizer(e.to_string()))
}

/// Runs `request` on `session`, handing each event to `emit`; `emit` returning `false` means
/// the client is gone, and generation stops at once. Returns the number of tokens generated.
pub fn generate(
    session: &mut DecoderSession,
    tokenizer: &Tokenizer,
    request: &GenerationRequest,
    mut emit: impl FnMut(Event) -> bool,
) -> Result<usize, GenerateError> {
    let prompt_len = request.prompt.len();
    let ids = Array2::from_shape_fn((1, prompt_len), |(_, i)| i64::from(request.prompt[i]));
    let positions = Array2::from_shape_fn((1, prompt_len), |(_, i)| i as i64);
    let (mut logits, mut cache) = session.forward(
        &ids,
        &Array2::ones((1, prompt_len)),
        &positions,
        session.empty_cache(1)?,
    )?;
    let mut sampler = Sampler::new(request.sampling.clone());
    let mut decoder = IncrementalDecoder::new();
    let mut stops = StopMatcher::new(request.stop.clone());
    let mut generated = 0;
    let finish = |text: String, reason, generated| Event::Finished {
        text,
        reason,
        prompt_tokens: prompt_len,
        completion_tokens: generated,
    };
    loop {
        if generated == request.max_new_tokens {
            emit(finish(stops.flush(), FinishReason::Length, generated));
            return Ok(generated);
        }
        let last = logits.slice(ndarray::s![0, -1, ..]).to_vec();
        let choice = sampler.choose(&last, request.logprobs.unwrap_or(0));
        generated += 1;
        if request.stop_token_ids.contains(&choice.token) {
            emit(finish(stops.flush(), FinishReason::Stop, generated));
            return Ok(generated);
        }
        let delta = decoder
            .push(tokenizer, choice.token)
            .map_err(|e| GenerateError::Tokenizer(e.to_string()))?;
        let step = stops.push(&delta);
        let logprob = match request.logprobs {
            Some(_) => Some(TokenLogprob {
                token: token_text(tokenizer, choice.token)?,
                logprob: choice.logprob,
                top: choice
                    .top
                    .iter()
                    .map(|&(id, lp)| Ok((token_text(tokenizer, id)?, lp)))
                    .collect::<Result<_, GenerateError>>()?,
            }),
            None => None,
        };
        if !emit(Event::Token {
            id: choice.token,
            text: step.emit,
            logprob,
        }) {
            return Ok(generated);
        }
        if step.stopped {
            emit(finish(String::new(), FinishReason::Stop, generated));
            return Ok(generated);
        }
        let total = cache.len() + 1;
        let (next_logits, next_cache) = session.forward(
            &Array2::from_elem((1, 1), i64::from(choice.token)),
            &Array2::ones((1, total)),
            &Array2::from_elem((1, 1), (total - 1) as i64),
            cache,
        )?;
        logits = next_logits;
        cache = next_cache;
    }
}

//! Turning an [`InferRequest`] into the scheduler's [`GenerationRequest`]: the prompt rendered
//! and tokenized, every setting checked against the model, the constraint compiled. It costs
//! CPU (templates, tokenizers, first compiles of term sets and schemas), so it runs on a
//! blocking worker, never on the async executor.

use std::sync::Arc;
use std::time::Instant;

use super::error::InferError;
use super::request::{GuideSpec, InferRequest, Params, Prompt};
use crate::constrain::{ConstraintError, ConstraintRequest, Guide, JsonMachine, Provenance, Terminologies};
use crate::generate::{GenerationRequest, MAX_TOP_LOGPROBS, SamplingParams};
use crate::repository::ModelVersion;
use crate::tokenize::ChatMessage;

/// Most items a constrained answer may hold.
pub const MAX_CONSTRAINT_ITEMS: usize = 64;

/// Most stop strings a request may give (OpenAI's limit).
pub const MAX_STOP_STRINGS: usize = 4;

/// Longest separator between constrained items, in bytes (each distinct separator compiles and
/// caches its own start mask).
pub const MAX_SEPARATOR_BYTES: usize = 32;

/// Longest stop string, in bytes: each generated token checks the tail of the text against
/// every prefix of every stop string on the model's worker thread, so their length is
/// everyone's cost.
pub const MAX_STOP_BYTES: usize = 256;

/// Most prompt bytes per token of a model's context: a prompt longer than the context times
/// this cannot fit whatever it tokenizes to, and is refused before the tokenizer spends time on
/// it.
pub const MAX_PROMPT_BYTES_PER_TOKEN: usize = 32;

/// Refuses a prompt whose text alone is too long for `model` (see
/// [`MAX_PROMPT_BYTES_PER_TOKEN`]); cheap, so it runs before validation is scheduled.
pub fn prompt_size(model: &ModelVersion, prompt: &Prompt) -> Result<(), InferError> {
    let limit = model.context_length.saturating_mul(MAX_PROMPT_BYTES_PER_TOKEN);
    let bytes = prompt.text_bytes();
    if bytes > limit {
        let param = if matches!(prompt, Prompt::Chat(_)) {
            "messages"
        } else {
            "prompt"
        };
        return Err(InferError::invalid(
            param,
            format!(
                "the prompt is {bytes} bytes; model `{}` takes at most {limit} ({MAX_PROMPT_BYTES_PER_TOKEN} bytes per token of its {}-token context)",
                model.name, model.context_length
            ),
        ));
    }
    Ok(())
}

/// The checked request for `request` on `model`, to be dropped at `deadline`, and the
/// terminology releases its constraint was compiled from.
pub fn generation_request(
    terminologies: &Terminologies,
    model: &ModelVersion,
    request: &InferRequest,
    deadline: Option<Instant>,
) -> Result<(GenerationRequest, Vec<Provenance>), InferError> {
    let prompt = prompt_ids(model, &request.prompt)?;
    let mut generation = sampling(model, prompt, &request.params)?;
    let mut provenance = Vec::new();
    generation.constraint = match &request.guide {
        None => None,
        Some(GuideSpec::Terms(spec)) => {
            let (guide, from) = constraint(terminologies, model, spec)?;
            provenance.push(from);
            Some(guide)
        }
        Some(GuideSpec::JsonSchema(schema)) => {
            let machine = JsonMachine::compile(schema, terminologies)
                .map_err(|e| InferError::invalid("response_format", e.to_string()))?;
            provenance = machine.provenance().to_vec();
            Some(Guide::json(Arc::new(machine), Arc::clone(&model.token_trie)))
        }
    };
    let generation = GenerationRequest {
        stream: request.stream,
        deadline,
        ..generation
    };
    Ok((generation, provenance))
}

/// Token ids of `prompt` on `model`.
fn prompt_ids(model: &ModelVersion, prompt: &Prompt) -> Result<Vec<u32>, InferError> {
    match prompt {
        Prompt::Text(text) => encode(model, text, true),
        Prompt::Chat(messages) => chat_prompt(model, messages),
        Prompt::Tokens(ids) => check_token_ids(model, ids),
    }
}

/// Token ids of `messages` rendered with the model's chat template.
fn chat_prompt(model: &ModelVersion, messages: &[ChatMessage]) -> Result<Vec<u32>, InferError> {
    if messages.is_empty() {
        return Err(InferError::invalid("messages", "messages must not be empty"));
    }
    let template = model.chat_template.as_ref().ok_or_else(|| {
        InferError::invalid(
            "messages",
            format!("model `{}` has no chat template; send a raw prompt", model.name),
        )
    })?;
    let text = template
        .render(messages)
        .map_err(|e| InferError::invalid("messages", e.to_string()))?;
    // The template already wrote the special tokens.
    encode(model, &text, false)
}

/// Checks that client-given token ids are in the vocabulary.
fn check_token_ids(model: &ModelVersion, ids: &[u32]) -> Result<Vec<u32>, InferError> {
    let vocab = model.tokenizer.get_vocab_size(true) as u32;
    match ids.iter().find(|&&id| id >= vocab) {
        Some(id) => Err(InferError::invalid(
            "prompt",
            format!("token id {id} is outside the vocabulary of {vocab}"),
        )),
        None => Ok(ids.to_vec()),
    }
}

fn encode(model: &ModelVersion, text: &str, special: bool) -> Result<Vec<u32>, InferError> {
    model
        .tokenizer
        .encode(text, special)
        .map(|e| e.get_ids().to_vec())
        .map_err(|e| InferError::invalid("prompt", format!("cannot tokenize the prompt: {e}")))
}

/// Checks the prompt's length and the sampling settings against `model`.
fn sampling(model: &ModelVersion, prompt: Vec<u32>, params: &Params) -> Result<GenerationRequest, InferError> {
    if prompt.is_empty() {
        return Err(InferError::invalid("prompt", "the prompt is empty"));
    }
    let context = model.context_length;
    if prompt.len() >= context {
        return Err(InferError::invalid(
            "prompt",
            format!(
                "the prompt has {} tokens; the context length of model `{}` is {context} tokens",
                prompt.len(),
                model.name
            ),
        ));
    }
    let room = context - prompt.len();
    let max_new_tokens = match params.max_tokens {
        None => model.max_tokens.min(room),
        Some(n) if n < 1 => {
            return Err(InferError::invalid(
                "max_tokens",
                format!("max_tokens must be at least 1, got {n}"),
            ));
        }
        Some(n) if n as u64 > room as u64 => {
            return Err(InferError::invalid(
                "max_tokens",
                format!(
                    "max_tokens {n} plus the prompt's {} tokens exceeds the context length of {context} tokens",
                    prompt.len()
                ),
            ));
        }
        Some(n) => n as usize,
    };
    if let Some(n) = params.n
        && n != 1
    {
        return Err(InferError::invalid("n", format!("only n = 1 is supported, got {n}")));
    }
    let min_new_tokens = match params.min_tokens {
        _ if params.ignore_eos => max_new_tokens,
        None => 0,
        Some(n) if n < 0 || n as u64 > max_new_tokens as u64 => {
            return Err(InferError::invalid(
                "min_tokens",
                format!("min_tokens must be 0 to max_tokens ({max_new_tokens}), got {n}"),
            ));
        }
        Some(n) => n as usize,
    };
    let temperature = params.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(InferError::invalid(
            "temperature",
            format!("temperature must be in [0, 2], got {temperature}"),
        ));
    }
    let top_p = params.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(InferError::invalid(
            "top_p",
            format!("top_p must be in (0, 1], got {top_p}"),
        ));
    }
    let top_k = match params.top_k {
        None | Some(-1) => 0,
        Some(k) if k >= 0 => k as usize,
        Some(k) => {
            return Err(InferError::invalid(
                "top_k",
                format!("top_k must be -1 (off) or >= 0, got {k}"),
            ));
        }
    };
    if params.stop.len() > MAX_STOP_STRINGS {
        return Err(InferError::invalid(
            "stop",
            format!("at most {MAX_STOP_STRINGS} stop strings, got {}", params.stop.len()),
        ));
    }
    if let Some(long) = params.stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
        return Err(InferError::invalid(
            "stop",
            format!(
                "a stop string may be at most {MAX_STOP_BYTES} bytes, got {}",
                long.len()
            ),
        ));
    }
    let logprobs = match params.logprobs {
        None => None,
        Some(n) if (0..=MAX_TOP_LOGPROBS as i64).contains(&n) => Some(n as usize),
        Some(n) => {
            return Err(InferError::invalid(
                "top_logprobs",
                format!("at most {MAX_TOP_LOGPROBS} alternatives per token, got {n}"),
            ));
        }
    };
    Ok(GenerationRequest {
        prompt,
        max_new_tokens,
        min_new_tokens,
        sampling: SamplingParams {
            temperature,
            top_k,
            top_p,
            seed: params.seed,
        },
        stop: params.stop.clone(),
        stop_token_ids: model.stop_token_ids.clone(),
        logprobs,
        token_ids_in_logprobs: params.token_ids_in_logprobs,
        stream: false,
        deadline: None,
        constraint: None,
    })
}

/// Checks `spec` and builds the sequence's guide over `model`'s vocabulary.
fn constraint(
    terminologies: &Terminologies,
    model: &ModelVersion,
    spec: &ConstraintRequest,
) -> Result<(Guide, Provenance), InferError> {
    if !(1..=MAX_CONSTRAINT_ITEMS).contains(&spec.max_items) {
        return Err(InferError::invalid(
            "constraint.max_items",
            format!("max_items must be 1 to {MAX_CONSTRAINT_ITEMS}, got {}", spec.max_items),
        ));
    }
    if spec.separator.len() > MAX_SEPARATOR_BYTES {
        return Err(InferError::invalid(
            "constraint.separator",
            format!(
                "the separator may be at most {MAX_SEPARATOR_BYTES} bytes, got {}",
                spec.separator.len()
            ),
        ));
    }
    if spec.max_items > 1 && spec.separator.is_empty() {
        return Err(InferError::invalid(
            "constraint.separator",
            "several items need a non-empty separator",
        ));
    }
    let (terms, provenance) = match &spec.subset {
        None => terminologies
            .term_set(&spec.terminology, spec.match_kind, spec.code_format, spec.billable_only)
            .map_err(|e| InferError::invalid("constraint.terminology", e.to_string()))?,
        Some(subset) => {
            let what = (spec.match_kind, spec.code_format, spec.billable_only, false);
            terminologies
                .subset_term_set(&spec.terminology, what, subset)
                .map_err(|e| match e {
                    ConstraintError::UnknownTerminology { .. } => {
                        InferError::invalid("constraint.terminology", e.to_string())
                    }
                    ConstraintError::Invalid(_) => InferError::invalid("constraint.subset", e.to_string()),
                })?
        }
    };
    let guide = Guide::new(
        terms,
        Arc::clone(&model.token_trie),
        spec.max_items,
        spec.separator.as_bytes(),
    );
    Ok((
        guide.after(spec.after.as_deref().unwrap_or_default().as_bytes()),
        provenance,
    ))
}

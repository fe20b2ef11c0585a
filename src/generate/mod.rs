//! Generating one sequence: sampling, stop tokens and stop strings, log-probabilities and
//! streamed text deltas, one position at a time (the scheduler runs the model).

mod sampling;
mod single;
mod text;

use std::time::Duration;

use tokenizers::Tokenizer;

use crate::constrain::Guide;
use crate::engine::EngineError;
use crate::kernels::sampling::{RowPlan, RowSampling};
pub use sampling::{Choice, Sampler, SamplingParams, argmax, log_softmax};
pub use single::{decode_single, greedy};
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
    /// Tokens generated before a stop token may end the answer (`max_new_tokens` for vLLM's
    /// `ignore_eos`). Stop strings still apply.
    pub min_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends before any of these strings; they are not returned.
    pub stop: Vec<String>,
    /// Generation ends at any of these tokens (EOS); they are not returned.
    pub stop_token_ids: Vec<u32>,
    /// `Some(n)`: report each token's log-probability and its `n` best alternatives.
    pub logprobs: Option<usize>,
    /// Name tokens in log-probabilities `token_id:N` instead of by their text (vLLM's
    /// `return_tokens_as_token_ids`): exact even for tokens that are part of a character.
    pub token_ids_in_logprobs: bool,
    /// Whether the client reads events as they happen; otherwise they are delivered together
    /// at the end, which spares a wake-up per token.
    pub stream: bool,
    /// When the client stops waiting: work still queued or running then is dropped.
    pub deadline: Option<std::time::Instant>,
    /// Keeps the output inside a terminology.
    pub constraint: Option<Guide>,
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
    /// The end: remaining text, the reason, the token counts and where the time went.
    Finished {
        text: String,
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
        timings: Timings,
    },
}

/// Where a request's time went; the scheduler fills it in.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Timings {
    /// From admission to the start of its prefill.
    pub queue: Duration,
    /// From the start of its prefill to its first token.
    pub prefill: Duration,
    /// From the start of its prefill to its last token.
    pub inference: Duration,
}

/// Why generation failed.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

/// Rules out `stop_ids`. A guide may have ruled out everything else (an answer that can only
/// end): then the stop tokens stay, which only a `constrained` sequence needs to check.
fn suppress(logits: &mut [f32], stop_ids: &[u32], constrained: bool) {
    let stops = |i: usize| stop_ids.contains(&(i as u32));
    if constrained
        && !logits
            .iter()
            .enumerate()
            .any(|(i, &l)| l > f32::NEG_INFINITY && !stops(i))
    {
        return;
    }
    for &id in stop_ids {
        if let Some(l) = logits.get_mut(id as usize) {
            *l = f32::NEG_INFINITY;
        }
    }
}

fn token_text(tokenizer: &Tokenizer, id: u32) -> Result<String, GenerateError> {
    tokenizer
        .decode(&[id], false)
        .map_err(|e| GenerateError::Tokenizer(e.to_string()))
}

/// One sequence being generated: it turns each position's logits into events and the next
/// token, whatever batch it runs in.
pub struct Sequence {
    request: GenerationRequest,
    sampler: Sampler,
    /// The seed of an outside sampler's draws ([`Sequence::plan`]): the request's, else random.
    seed: u64,
    decoder: IncrementalDecoder,
    stops: StopMatcher,
    generated: usize,
}

/// The outcome of one step of a sequence.
#[derive(Debug)]
pub struct Advance {
    /// Events to send, in order (a token, and the end when there is one).
    pub events: Vec<Event>,
    /// The token to feed next, or `None` when the sequence has finished.
    pub next: Option<u32>,
}

impl Sequence {
    /// Starts a sequence for `request`.
    pub fn new(request: GenerationRequest) -> Self {
        Self {
            sampler: Sampler::new(request.sampling.clone()),
            seed: request.sampling.seed.unwrap_or_else(rand::random),
            decoder: IncrementalDecoder::new(),
            stops: StopMatcher::new(request.stop.clone()),
            generated: 0,
            request,
        }
    }

    /// The request's prompt.
    pub fn prompt(&self) -> &[u32] {
        &self.request.prompt
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> usize {
        self.generated
    }

    fn finish(&mut self, text: String, reason: FinishReason) -> Event {
        Event::Finished {
            text,
            reason,
            prompt_tokens: self.request.prompt.len(),
            completion_tokens: self.generated,
            timings: Timings::default(),
        }
    }

    /// The end of an answer that no stop string cut: the bytes of an unfinished character go
    /// out as U+FFFD (unless they complete a stop string), then any text held back for a stop
    /// string that never came.
    fn finish_flushed(&mut self, tokenizer: &Tokenizer, reason: FinishReason) -> Result<Event, GenerateError> {
        let tail = self
            .decoder
            .flush(tokenizer)
            .map_err(|e| GenerateError::Tokenizer(e.to_string()))?;
        let step = self.stops.push(&tail);
        if step.stopped {
            return Ok(self.finish(step.emit, FinishReason::Stop));
        }
        let text = step.emit + &self.stops.flush();
        Ok(self.finish(text, reason))
    }

    /// Chooses the token after the last position whose `logits` are given.
    pub fn advance(&mut self, tokenizer: &Tokenizer, logits: &[f32]) -> Result<Advance, GenerateError> {
        let suppress_stop = self.generated < self.request.min_new_tokens;
        let masked;
        let logits = if self.request.constraint.is_some() || suppress_stop {
            let mut copy = logits.to_vec();
            if let Some(guide) = &self.request.constraint {
                guide.apply(&mut copy, &self.request.stop_token_ids);
            }
            if suppress_stop {
                suppress(
                    &mut copy,
                    &self.request.stop_token_ids,
                    self.request.constraint.is_some(),
                );
            }
            masked = copy;
            &masked[..]
        } else {
            logits
        };
        let choice = self.sampler.choose(logits, self.request.logprobs.unwrap_or(0));
        self.accept(tokenizer, choice)
    }

    /// This step's choice for an outside sampler over a vocabulary of `vocab` tokens: the
    /// tokens [`Sequence::advance`] would leave unmasked, and its sampling settings.
    pub fn plan(&self, vocab: usize) -> RowPlan {
        let stop_ids = &self.request.stop_token_ids;
        let mut allowed = self
            .request
            .constraint
            .as_ref()
            .and_then(|g| g.allowed_words(vocab, stop_ids));
        if self.generated < self.request.min_new_tokens {
            // As `suppress`: stop tokens are ruled out, unless a guide allows nothing else.
            let mut words = allowed.clone().unwrap_or_else(|| {
                let mut all = vec![u32::MAX; vocab.div_ceil(32)];
                if let Some(last) = all.last_mut().filter(|_| !vocab.is_multiple_of(32)) {
                    *last = (1 << (vocab % 32)) - 1;
                }
                all
            });
            for &id in stop_ids {
                if let Some(word) = words.get_mut(id as usize / 32) {
                    *word &= !(1 << (id % 32));
                }
            }
            if self.request.constraint.is_none() || words.iter().any(|&w| w != 0) {
                allowed = Some(words);
            }
        }
        let p = &self.request.sampling;
        RowPlan {
            allowed,
            sampling: RowSampling {
                temperature: p.temperature,
                top_k: u32::try_from(p.top_k).unwrap_or(u32::MAX),
                top_p: p.top_p,
                seed: self.seed,
                step: self.generated as u64,
            },
            top_n: self.request.logprobs.unwrap_or(0),
        }
    }

    /// Takes `choice` (made from this step's logits, by this sequence's sampler or an outside
    /// one following [`Sequence::plan`]) as the next token.
    pub fn accept(&mut self, tokenizer: &Tokenizer, choice: Choice) -> Result<Advance, GenerateError> {
        self.generated += 1;
        if self.request.stop_token_ids.contains(&choice.token) {
            return Ok(Advance {
                events: vec![self.finish_flushed(tokenizer, FinishReason::Stop)?],
                next: None,
            });
        }
        let delta = self
            .decoder
            .push(tokenizer, choice.token)
            .map_err(|e| GenerateError::Tokenizer(e.to_string()))?;
        let step = self.stops.push(&delta);
        if let Some(guide) = &mut self.request.constraint {
            guide.commit(choice.token);
        }
        let exhausted = self.request.constraint.as_ref().is_some_and(Guide::is_exhausted);
        let logprob = match self.request.logprobs {
            Some(_) => {
                let name = |id: u32| match self.request.token_ids_in_logprobs {
                    true => Ok(format!("token_id:{id}")),
                    false => token_text(tokenizer, id),
                };
                Some(TokenLogprob {
                    token: name(choice.token)?,
                    logprob: choice.logprob,
                    top: choice
                        .top
                        .iter()
                        .map(|&(id, lp)| Ok((name(id)?, lp)))
                        .collect::<Result<_, GenerateError>>()?,
                })
            }
            None => None,
        };
        let mut events = vec![Event::Token {
            id: choice.token,
            text: step.emit,
            logprob,
        }];
        let next = if step.stopped {
            events.push(self.finish(String::new(), FinishReason::Stop));
            None
        } else if exhausted {
            // The constrained answer is complete: nothing may follow but the end.
            events.push(self.finish_flushed(tokenizer, FinishReason::Stop)?);
            None
        } else if self.generated >= self.request.max_new_tokens {
            events.push(self.finish_flushed(tokenizer, FinishReason::Length)?);
            None
        } else {
            Some(choice.token)
        };
        Ok(Advance { events, next })
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::checkpoint::Family;
    use crate::tiny::{ENDOFTEXT_ID, train_tokenizer};

    fn greedy_request(max_new_tokens: usize, stop_token_ids: Vec<u32>) -> GenerationRequest {
        GenerationRequest {
            prompt: vec![1],
            max_new_tokens,
            min_new_tokens: 0,
            sampling: SamplingParams {
                temperature: 0.0,
                ..SamplingParams::default()
            },
            stop: Vec::new(),
            stop_token_ids,
            logprobs: None,
            token_ids_in_logprobs: false,
            stream: true,
            deadline: None,
            constraint: None,
        }
    }

    /// Generates `ids` (one-hot logits, greedy) and returns the text of every event.
    fn answer(tokenizer: &Tokenizer, vocab: usize, ids: &[u32], stop_ids: Vec<u32>) -> (String, Vec<u32>) {
        let mut seq = Sequence::new(greedy_request(ids.len(), stop_ids));
        let (mut text, mut generated) = (String::new(), Vec::new());
        for &id in ids {
            let mut logits = vec![0.0; vocab];
            logits[id as usize] = 1.0;
            let advance = seq.advance(tokenizer, &logits).unwrap();
            for event in advance.events {
                match event {
                    Event::Token { id, text: t, .. } => {
                        generated.push(id);
                        text.push_str(&t);
                    }
                    Event::Finished { text: t, .. } => text.push_str(&t),
                }
            }
            if advance.next.is_none() {
                break;
            }
        }
        (text, generated)
    }

    #[test]
    fn the_answer_is_the_decoding_of_its_tokens_even_when_it_ends_inside_a_character() {
        let corpus = "病人有糖尿病。 Patient has diabetes; naïve café ✓ 中文字符\n".repeat(20);
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for vocab_size in [300, 420, 700] {
            let tokenizer = train_tokenizer(Family::Qwen2, vocab_size, Some(&corpus))
                .unwrap()
                .tokenizer;
            let vocab = tokenizer.get_vocab_size(true);
            for _ in 0..150 {
                let len = rng.random_range(1..24);
                // Mostly raw bytes and merges (ids past the five special tokens), so characters
                // are split and left unfinished often.
                let ids: Vec<u32> = (0..len).map(|_| rng.random_range(5..vocab as u32)).collect();
                let (text, generated) = answer(&tokenizer, vocab, &ids, vec![ENDOFTEXT_ID]);
                assert_eq!(generated, ids);
                assert_eq!(text, tokenizer.decode(&ids, false).unwrap(), "{ids:?}");
            }
        }
    }

    #[test]
    fn a_stop_token_after_half_a_character_flushes_it_as_a_replacement_character() {
        let tokenizer = train_tokenizer(Family::Qwen2, 300, None).unwrap().tokenizer;
        let vocab = tokenizer.get_vocab_size(true);
        // "中" is three bytes; the first alone decodes to U+FFFD.
        let first_byte = tokenizer.encode("中", false).unwrap().get_ids()[0];
        let (text, generated) = answer(&tokenizer, vocab, &[first_byte, ENDOFTEXT_ID], vec![ENDOFTEXT_ID]);
        assert_eq!(generated, vec![first_byte]);
        assert_eq!(text, "\u{FFFD}");
    }

    /// The tokens a plan allows are exactly those `advance` leaves unmasked, constrained or not,
    /// with stop tokens held back or not, at the start of an answer and inside one.
    #[test]
    fn plans_allow_exactly_what_advance_leaves_unmasked() {
        use std::sync::Arc;

        use crate::constrain::{TermSet, TokenTrie};
        let tokenizer = train_tokenizer(Family::Qwen2, 300, None).unwrap().tokenizer;
        // A model vocabulary past the tokenizer's, and not a multiple of 32.
        let vocab = tokenizer.get_vocab_size(true) + 7;
        let trie = Arc::new(TokenTrie::new(&tokenizer));
        let set = Arc::new(TermSet::new(["E11.9", "E11.65", "I10"].iter()));
        let unmasked = |guide: Option<&Guide>, suppressing: bool, stops: &[u32]| -> Vec<u32> {
            let mut logits = vec![0.0f32; vocab];
            if let Some(guide) = guide {
                guide.apply(&mut logits, stops);
            }
            if suppressing {
                suppress(&mut logits, stops, guide.is_some());
            }
            (0..vocab as u32).filter(|&i| logits[i as usize].is_finite()).collect()
        };
        let allowed = |words: Option<Vec<u32>>| -> Vec<u32> {
            (0..vocab as u32)
                .filter(|&i| words.as_ref().is_none_or(|w| (w[i as usize / 32] >> (i % 32)) & 1 == 1))
                .collect()
        };
        for (constrained, min_new_tokens) in [(false, 0), (false, 2), (true, 0), (true, 5)] {
            let guide = constrained.then(|| Guide::new(Arc::clone(&set), Arc::clone(&trie), 1, b", "));
            let request = GenerationRequest {
                min_new_tokens,
                constraint: guide.clone(),
                ..greedy_request(4, vec![ENDOFTEXT_ID])
            };
            let stops = request.stop_token_ids.clone();
            let mut seq = Sequence::new(request);
            let plan = seq.plan(vocab);
            let want = unmasked(guide.as_ref(), min_new_tokens > 0, &stops);
            assert_eq!(allowed(plan.allowed.clone()), want, "{constrained} {min_new_tokens}");
            // One token into the answer.
            let token = want.iter().copied().find(|&t| t != ENDOFTEXT_ID).unwrap();
            let choice = Choice {
                token,
                logprob: 0.0,
                top: Vec::new(),
            };
            seq.accept(&tokenizer, choice).unwrap();
            let mut guide = guide;
            if let Some(g) = &mut guide {
                g.commit(token);
            }
            let want = unmasked(guide.as_ref(), min_new_tokens > 1, &stops);
            assert_eq!(
                allowed(seq.plan(vocab).allowed),
                want,
                "{constrained} {min_new_tokens}, one in"
            );
            assert_eq!(plan.sampling.step, 0);
            assert_eq!(seq.plan(vocab).sampling.step, 1);
        }
    }

    #[test]
    fn min_new_tokens_holds_the_stop_token_back_until_then() {
        let tokenizer = train_tokenizer(Family::Qwen2, 300, None).unwrap().tokenizer;
        let vocab = tokenizer.get_vocab_size(true);
        // The stop token is always the most likely; token 100 comes second.
        let mut logits = vec![0.0; vocab];
        logits[ENDOFTEXT_ID as usize] = 2.0;
        logits[100] = 1.0;
        let run = |min_new_tokens| {
            let mut seq = Sequence::new(GenerationRequest {
                min_new_tokens,
                ..greedy_request(10, vec![ENDOFTEXT_ID])
            });
            let mut tokens = Vec::new();
            loop {
                let advance = seq.advance(&tokenizer, &logits).unwrap();
                for event in advance.events {
                    match event {
                        Event::Token { id, .. } => tokens.push(id),
                        Event::Finished { reason, .. } => return (tokens, reason),
                    }
                }
            }
        };
        assert_eq!(run(0), (vec![], FinishReason::Stop));
        assert_eq!(run(3), (vec![100; 3], FinishReason::Stop));
        assert_eq!(run(10), (vec![100; 10], FinishReason::Length), "ignore_eos");
    }
}

//! The decode batch of the native engine: a sequence lives in one of the engine's slots from
//! its prefill to its end, so nothing is ever re-laid. A prefill runs the new prompts' rows
//! into free slots; a step runs one row per live slot. Tokens are chosen by the engine
//! (on the GPU for native-cuda) from each sequence's plan: its allowed tokens (terminology
//! constraints, held-back stop tokens) and sampling settings. Rows that reach a slot's
//! capacity end with an error instead of failing the batch.

use tokenizers::Tokenizer;

use super::batch::deliver_next;
use crate::engine::EngineError;
use crate::engine::cuda::{NativeEngine, NativeError, StepRows};
use crate::generate::{Advance, Choice, GenerateError, Sequence};
use crate::kernels::sampling::Sampled;

struct Row<T> {
    seq: Sequence,
    meta: T,
    next_token: u32,
    next_position: usize,
}

/// Sequences decoding in the native engine's slots (`rows[slot]`).
pub struct NativeBatch<T> {
    rows: Vec<Option<Row<T>>>,
}

impl<T> NativeBatch<T> {
    /// An empty batch over `slots` slots.
    pub fn new(slots: usize) -> Self {
        Self {
            rows: (0..slots).map(|_| None).collect(),
        }
    }

    /// Number of sequences decoding.
    pub fn len(&self) -> usize {
        self.rows.iter().flatten().count()
    }

    /// The sequences' bookkeeping.
    pub fn metas(&self) -> impl Iterator<Item = &T> {
        self.rows.iter().flatten().map(|r| &r.meta)
    }

    /// Ends every sequence (after an engine failure).
    pub fn clear(&mut self) {
        self.rows.iter_mut().for_each(|r| *r = None);
    }

    /// Prefills `seqs` into free slots in one step (at most as many as are free; the rest get
    /// an error), chooses each one's first token, and keeps those still generating.
    pub fn prefill(
        &mut self,
        engine: &mut NativeEngine,
        tokenizer: &Tokenizer,
        seqs: Vec<(Sequence, T)>,
        mut on_advance: impl FnMut(&mut T, Result<Advance, GenerateError>) -> bool,
    ) -> Result<(), NativeError> {
        let capacity = engine.capacity();
        let mut free = (0..self.rows.len()).filter(|&s| self.rows[s].is_none());
        let mut rows = StepRows::default();
        let mut placed = Vec::new();
        for (seq, mut meta) in seqs {
            let prompt = seq.prompt();
            let slot = match free.next() {
                Some(slot) if !prompt.is_empty() && prompt.len() < capacity => slot,
                slot => {
                    let why = match slot {
                        None => "no free slot in the native engine".to_string(),
                        Some(_) => format!("a prompt of {} tokens for slots of {capacity}", prompt.len()),
                    };
                    on_advance(&mut meta, Err(EngineError::Input(why).into()));
                    continue;
                }
            };
            let last = rows.push_prompt(slot as u32, prompt);
            placed.push((slot, last, seq, meta));
        }
        if placed.is_empty() {
            return Ok(());
        }
        let last: Vec<u32> = placed.iter().map(|p| p.1).collect();
        let vocab = engine.config().vocab_size;
        let plans: Vec<_> = placed.iter().map(|p| p.2.plan(vocab)).collect();
        let sampled = engine.step_and_sample(&rows, &last, &plans)?;
        for ((slot, _, mut seq, mut meta), sampled) in placed.into_iter().zip(sampled) {
            let advance = accept(&mut seq, tokenizer, sampled);
            if let Some(token) = deliver_next(&mut meta, advance, &mut on_advance) {
                let next_position = seq.prompt().len();
                self.rows[slot] = Some(Row {
                    seq,
                    meta,
                    next_token: token,
                    next_position,
                });
            }
        }
        Ok(())
    }

    /// Runs one decode step for every live slot; `on_advance` as in [`Self::prefill`].
    pub fn step(
        &mut self,
        engine: &mut NativeEngine,
        tokenizer: &Tokenizer,
        mut on_advance: impl FnMut(&mut T, Result<Advance, GenerateError>) -> bool,
    ) -> Result<(), NativeError> {
        let capacity = engine.capacity();
        for slot in self.rows.iter_mut() {
            if let Some(row) = slot
                && row.next_position >= capacity
            {
                let why = format!("the sequence reached the native engine's {capacity} tokens a slot");
                on_advance(&mut row.meta, Err(EngineError::Input(why).into()));
                *slot = None;
            }
        }
        let live: Vec<usize> = (0..self.rows.len()).filter(|&s| self.rows[s].is_some()).collect();
        if live.is_empty() {
            return Ok(());
        }
        let mut rows = StepRows::default();
        for (slot, row) in self.rows.iter().enumerate() {
            if let Some(row) = row {
                rows.push(row.next_token, slot as u32, row.next_position as u32);
            }
        }
        let all: Vec<u32> = (0..live.len() as u32).collect();
        let vocab = engine.config().vocab_size;
        let plans: Vec<_> = self.rows.iter().flatten().map(|r| r.seq.plan(vocab)).collect();
        let sampled = engine.step_and_sample(&rows, &all, &plans)?;
        for (&slot, sampled) in live.iter().zip(sampled) {
            let Some(row) = &mut self.rows[slot] else { continue };
            let advance = accept(&mut row.seq, tokenizer, sampled);
            if let Some(token) = deliver_next(&mut row.meta, advance, &mut on_advance) {
                row.next_token = token;
                row.next_position += 1;
            } else {
                self.rows[slot] = None;
            }
        }
        Ok(())
    }
}

/// Takes the engine's choice as `seq`'s next token; a row whose plan allowed nothing fails.
fn accept(seq: &mut Sequence, tokenizer: &Tokenizer, sampled: Sampled) -> Result<Advance, GenerateError> {
    let token = sampled
        .token
        .ok_or_else(|| EngineError::Input("no token is allowed at this step".into()))?;
    let choice = Choice {
        token,
        logprob: sampled.logprob,
        top: sampled.top,
    };
    seq.accept(tokenizer, choice)
}

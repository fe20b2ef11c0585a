//! One sequence's constraint during generation: masks the logits of each step to the tokens
//! that keep the answer inside the terminology (or the JSON schema), and follows the chosen
//! tokens.

use std::sync::Arc;

use super::automaton::{Automaton, TermSet, TokenMask};
use super::json::JsonMachine;
use super::machine::{ByteMachine, StateSet};
use super::vocab::TokenTrie;

/// A machine and where the answer is in it; the guide holds one behind [`Cursor`] so it
/// needs no match per machine.
struct Walk<M: ByteMachine> {
    machine: Arc<M>,
    states: StateSet<M::State>,
}

/// What the guide asks of the answer's machine, whichever it is.
trait Cursor: Send + Sync {
    fn accepts(&self) -> bool;
    fn advance(&mut self, bytes: &[u8]);
    /// The allowed tokens now; the start of an answer comes from the machine's cache.
    fn fill_mask(&self, trie: &Arc<TokenTrie>, mask: &mut TokenMask);
    fn boxed(&self) -> Box<dyn Cursor>;
    /// What kind of answer, for debug output.
    fn kind(&self) -> &'static str;
}

impl<M> Cursor for Walk<M>
where
    M: ByteMachine + Send + Sync + 'static,
    M::State: Send + Sync,
{
    fn accepts(&self) -> bool {
        self.machine.accepts(&self.states)
    }

    fn advance(&mut self, bytes: &[u8]) {
        self.states = self.machine.advance(&self.states, bytes);
    }

    fn fill_mask(&self, trie: &Arc<TokenTrie>, mask: &mut TokenMask) {
        if self.states == self.machine.start()
            && let Some(start) = self.machine.start_mask(trie)
        {
            *mask = (*start).clone();
            return;
        }
        mask.clear();
        self.machine.fill_mask(trie, &self.states, mask);
    }

    fn boxed(&self) -> Box<dyn Cursor> {
        Box::new(Walk {
            machine: Arc::clone(&self.machine),
            states: self.states.clone(),
        })
    }

    fn kind(&self) -> &'static str {
        std::any::type_name::<M>().rsplit("::").next().unwrap_or_default()
    }
}

/// The constraint state of one generating sequence.
pub struct Guide {
    cursor: Box<dyn Cursor>,
    trie: Arc<TokenTrie>,
    /// Tokens allowed at the current state.
    mask: TokenMask,
    /// While set, the constraint waits for this text (`</think>`) before it applies; holds
    /// the marker and the tail of the text written so far.
    waiting: Option<(Vec<u8>, Vec<u8>)>,
}

impl Clone for Guide {
    fn clone(&self) -> Self {
        Self {
            cursor: self.cursor.boxed(),
            trie: Arc::clone(&self.trie),
            mask: self.mask.clone(),
            waiting: self.waiting.clone(),
        }
    }
}

impl std::fmt::Debug for Guide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guide")
            .field("machine", &self.cursor.kind())
            .field("allowed", &self.mask.count())
            .field("waiting", &self.waiting.is_some())
            .finish()
    }
}

impl Guide {
    /// A guide at the start of an answer of up to `max_items` members of `terms`.
    pub fn new(terms: Arc<TermSet>, trie: Arc<TokenTrie>, max_items: usize, separator: &[u8]) -> Self {
        Self::with(Arc::new(Automaton::new(terms, max_items, separator)), trie)
    }

    /// A guide at the start of a JSON document of `machine`'s schema.
    pub fn json(machine: Arc<JsonMachine>, trie: Arc<TokenTrie>) -> Self {
        Self::with(machine, trie)
    }

    /// A guide at the start of `machine`.
    fn with<M>(machine: Arc<M>, trie: Arc<TokenTrie>) -> Self
    where
        M: ByteMachine + Send + Sync + 'static,
        M::State: Send + Sync,
    {
        let states = machine.start();
        let cursor: Box<dyn Cursor> = Box::new(Walk { machine, states });
        let mut mask = TokenMask::new(trie.vocab_size());
        cursor.fill_mask(&trie, &mut mask);
        Self {
            cursor,
            trie,
            mask,
            waiting: None,
        }
    }

    /// The same guide, applying only once the text `marker` has been generated (a reasoning
    /// student thinks freely first); an empty marker applies at once.
    pub fn after(mut self, marker: &[u8]) -> Self {
        if !marker.is_empty() {
            self.waiting = Some((marker.to_vec(), Vec::new()));
        }
        self
    }

    /// Whether the answer may end now (a whole item, or the whole document, was written).
    pub fn accepts(&self) -> bool {
        self.cursor.accepts()
    }

    /// Whether no token may extend the answer: it is finished (or, defensively, stuck).
    pub fn is_exhausted(&self) -> bool {
        self.waiting.is_none() && self.mask.count() == 0
    }

    /// Sets every disallowed logit to minus infinity; `stop_ids` stay allowed only where the
    /// answer may end.
    pub fn apply(&self, logits: &mut [f32], stop_ids: &[u32]) {
        if self.waiting.is_some() {
            return;
        }
        let kept: Vec<(usize, f32)> = if self.accepts() {
            stop_ids
                .iter()
                .filter_map(|&id| logits.get(id as usize).map(|&l| (id as usize, l)))
                .collect()
        } else {
            Vec::new()
        };
        self.mask.mask_out(logits);
        for (id, logit) in kept {
            logits[id] = logit;
        }
    }

    /// The tokens [`Self::apply`] leaves, as a bitset of 32-bit words over `vocab` tokens (bit
    /// `i % 32` of word `i / 32`: what the sampling kernel reads); None while waiting for the
    /// marker, when every token is allowed.
    pub fn allowed_words(&self, vocab: usize, stop_ids: &[u32]) -> Option<Vec<u32>> {
        if self.waiting.is_some() {
            return None;
        }
        let stops = if self.accepts() { stop_ids } else { &[] };
        Some(crate::kernels::sampling::bitset(
            vocab,
            self.mask.iter().chain(stops.iter().copied()),
        ))
    }

    /// Follows the chosen (allowed) token.
    pub fn commit(&mut self, token: u32) {
        if let Some((marker, tail)) = &mut self.waiting {
            tail.extend_from_slice(self.trie.text(token));
            if tail.ends_with(marker) {
                self.waiting = None;
            } else {
                let keep = tail.len().saturating_sub(marker.len());
                tail.drain(..keep);
            }
            return;
        }
        self.cursor.advance(self.trie.bytes(token));
        self.cursor.fill_mask(&self.trie, &mut self.mask);
    }

    /// The tokens allowed now.
    pub fn mask(&self) -> &TokenMask {
        &self.mask
    }
}

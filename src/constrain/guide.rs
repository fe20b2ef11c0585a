//! One sequence's constraint during generation: masks the logits of each step to the tokens
//! that keep the answer inside the terminology, and follows the chosen tokens.

use std::sync::Arc;

use super::automaton::{Automaton, States, TermSet, TokenMask};
use super::vocab::TokenTrie;

/// The constraint state of one generating sequence.
#[derive(Clone)]
pub struct Guide {
    terms: Arc<TermSet>,
    trie: Arc<TokenTrie>,
    max_items: usize,
    separator: Vec<u8>,
    states: States,
    /// Tokens allowed at the current state.
    mask: TokenMask,
    /// While set, the constraint waits for this text (`</think>`) before it applies; holds
    /// the marker and the tail of the text written so far.
    waiting: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for Guide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guide")
            .field("terms", &self.terms.len())
            .field("max_items", &self.max_items)
            .field("states", &self.states)
            .field("allowed", &self.mask.count())
            .finish()
    }
}

impl Guide {
    /// A guide at the start of an answer.
    pub fn new(terms: Arc<TermSet>, trie: Arc<TokenTrie>, max_items: usize, separator: Vec<u8>) -> Self {
        let mask = TokenMask::new(trie.vocab_size());
        let mut guide = Self {
            terms,
            trie,
            max_items,
            separator,
            states: States::new(),
            mask,
            waiting: None,
        };
        guide.states = guide.automaton().start();
        guide.mask = (*guide.terms.start_mask(&guide.trie, max_items, &guide.separator)).clone();
        guide
    }

    /// The same guide, applying only once the text `marker` has been generated (a reasoning
    /// student thinks freely first); an empty marker applies at once.
    pub fn after(mut self, marker: &[u8]) -> Self {
        if !marker.is_empty() {
            self.waiting = Some((marker.to_vec(), Vec::new()));
        }
        self
    }

    fn automaton(&self) -> Automaton<'_> {
        Automaton::new(&self.terms, self.max_items, &self.separator)
    }

    fn refresh_mask(&mut self) {
        let automaton = self.automaton();
        if self.states == automaton.start() {
            self.mask = (*self.terms.start_mask(&self.trie, self.max_items, &self.separator)).clone();
            return;
        }
        let mut mask = std::mem::replace(&mut self.mask, TokenMask::new(0));
        mask.clear();
        self.automaton().fill_mask(&self.trie, &self.states, &mut mask);
        self.mask = mask;
    }

    /// Whether the answer may end now (a whole item was just written).
    pub fn accepts(&self) -> bool {
        self.automaton().accepts(&self.states)
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
        let accepts = self.accepts();
        for (id, logit) in logits.iter_mut().enumerate() {
            let id = id as u32;
            let allowed = self.mask.contains(id) || (accepts && stop_ids.contains(&id));
            if !allowed {
                *logit = f32::NEG_INFINITY;
            }
        }
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
        let bytes = self.trie.bytes(token).to_vec();
        self.states = self.automaton().advance(&self.states, &bytes);
        self.refresh_mask();
    }

    /// The tokens allowed now.
    pub fn mask(&self) -> &TokenMask {
        &self.mask
    }
}

//! One sequence's constraint during generation: masks the logits of each step to the tokens
//! that keep the answer inside the terminology (or the JSON schema), and follows the chosen
//! tokens.

use std::sync::Arc;

use super::automaton::{Automaton, States, TermSet, TokenMask};
use super::json::{JsonMachine, JsonStates};
use super::vocab::TokenTrie;

/// What the answer must be, and where it is.
#[derive(Clone)]
enum Program {
    /// Up to `max_items` members of a term set, joined by `separator`.
    Terms {
        terms: Arc<TermSet>,
        max_items: usize,
        separator: Vec<u8>,
        states: States,
    },
    /// A JSON document of a schema.
    Json {
        machine: Arc<JsonMachine>,
        states: JsonStates,
    },
}

impl Program {
    fn accepts(&self) -> bool {
        match self {
            Program::Terms {
                terms,
                max_items,
                separator,
                states,
            } => Automaton::new(terms, *max_items, separator).accepts(states),
            Program::Json { machine, states } => machine.accepts(states),
        }
    }

    fn advance(&mut self, bytes: &[u8]) {
        match self {
            Program::Terms {
                terms,
                max_items,
                separator,
                states,
            } => *states = Automaton::new(terms, *max_items, separator).advance(states, bytes),
            Program::Json { machine, states } => *states = machine.advance(states, bytes),
        }
    }

    /// The allowed tokens now; the start of a terminology answer comes from its cache.
    fn fill_mask(&self, trie: &Arc<TokenTrie>, mask: &mut TokenMask) {
        match self {
            Program::Terms {
                terms,
                max_items,
                separator,
                states,
            } => {
                let automaton = Automaton::new(terms, *max_items, separator);
                if *states == automaton.start() {
                    *mask = (*terms.start_mask(trie, *max_items, separator)).clone();
                } else {
                    mask.clear();
                    automaton.fill_mask(trie, states, mask);
                }
            }
            Program::Json { machine, states } => {
                mask.clear();
                machine.fill_mask(trie, states, mask);
            }
        }
    }
}

/// The constraint state of one generating sequence.
#[derive(Clone)]
pub struct Guide {
    program: Program,
    trie: Arc<TokenTrie>,
    /// Tokens allowed at the current state.
    mask: TokenMask,
    /// While set, the constraint waits for this text (`</think>`) before it applies; holds
    /// the marker and the tail of the text written so far.
    waiting: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for Guide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.program {
            Program::Terms { .. } => "terms",
            Program::Json { .. } => "json",
        };
        f.debug_struct("Guide")
            .field("kind", &kind)
            .field("allowed", &self.mask.count())
            .field("waiting", &self.waiting.is_some())
            .finish()
    }
}

impl Guide {
    /// A guide at the start of an answer of up to `max_items` members of `terms`.
    pub fn new(terms: Arc<TermSet>, trie: Arc<TokenTrie>, max_items: usize, separator: Vec<u8>) -> Self {
        let states = Automaton::new(&terms, max_items, &separator).start();
        Self::with(
            Program::Terms {
                terms,
                max_items,
                separator,
                states,
            },
            trie,
        )
    }

    /// A guide at the start of a JSON document of `machine`'s schema.
    pub fn json(machine: Arc<JsonMachine>, trie: Arc<TokenTrie>) -> Self {
        let states = machine.start();
        Self::with(Program::Json { machine, states }, trie)
    }

    fn with(program: Program, trie: Arc<TokenTrie>) -> Self {
        let mut mask = TokenMask::new(trie.vocab_size());
        program.fill_mask(&trie, &mut mask);
        Self {
            program,
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
        self.program.accepts()
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
        self.program.advance(self.trie.bytes(token));
        self.program.fill_mask(&self.trie, &mut self.mask);
    }

    /// The tokens allowed now.
    pub fn mask(&self) -> &TokenMask {
        &self.mask
    }
}

//! What the per-sequence guide walks: a byte-level machine of allowed answers (a term list, a
//! JSON schema), read byte by byte and token by token through the vocabulary trie.

use std::sync::Arc;

use smallvec::SmallVec;

use super::automaton::TokenMask;
use super::vocab::TokenTrie;

/// The places an answer may be at once (usually one: a byte may lead to several).
pub type StateSet<S> = SmallVec<[S; 2]>;

/// A byte-level recogniser of allowed answers.
pub trait ByteMachine {
    /// One place in the machine.
    type State: Copy + PartialEq;

    /// The states before any byte.
    fn start(&self) -> StateSet<Self::State>;

    /// The states after `byte` (empty: the byte leads nowhere).
    fn step(&self, states: &StateSet<Self::State>, byte: u8) -> StateSet<Self::State>;

    /// Whether the answer may end here.
    fn accepts(&self, states: &StateSet<Self::State>) -> bool;

    /// The states after `bytes`.
    fn advance(&self, states: &StateSet<Self::State>, bytes: &[u8]) -> StateSet<Self::State> {
        let mut states = states.clone();
        for &b in bytes {
            if states.is_empty() {
                break;
            }
            states = self.step(&states, b);
        }
        states
    }

    /// Marks in `mask` every token whose bytes lead somewhere from `states`.
    fn fill_mask(&self, trie: &TokenTrie, states: &StateSet<Self::State>, mask: &mut TokenMask) {
        trie.walk(
            states.clone(),
            |s, b| Some(self.step(s, b)).filter(|n| !n.is_empty()),
            mask,
        );
    }

    /// The mask at the start of an answer, where the machine keeps it cached.
    fn start_mask(&self, _trie: &Arc<TokenTrie>) -> Option<Arc<TokenMask>> {
        None
    }
}

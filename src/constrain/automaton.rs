//! The byte automaton of allowed answers: up to `max_items` members of a term set, joined by a
//! separator. The term set is an `fst` (a minimal automaton over sorted strings, compact for
//! millions of terms); a state is a node of it, or a position in the separator. Terms may
//! contain the separator (", " inside "Fracture of femur, initial encounter"), so a byte can
//! lead to two states: states travel as small sets.

use std::sync::{Arc, Mutex};

use fst::raw::{CompiledAddr, Fst};

use super::machine::{ByteMachine, StateSet};
use super::vocab::TokenTrie;

/// Key of a cached start mask: the vocabulary trie's id, max items, separator.
type StartKey = (u64, usize, Vec<u8>);

/// Start masks a term set keeps (one per vocabulary and answer shape in use); the least
/// recently used goes first.
pub const MAX_START_MASKS: usize = 16;

/// A set of allowed strings, compiled once and shared.
pub struct TermSet {
    set: fst::Set<Vec<u8>>,
    /// The mask at the start of an answer is the widest (every token that begins a term) and
    /// the same for every request: computed once per vocabulary and answer shape.
    start_masks: Mutex<Vec<(StartKey, Arc<TokenMask>)>>,
}

impl TermSet {
    /// The set of `terms` (empty strings are dropped).
    pub fn new<I, T>(terms: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: AsRef<[u8]>,
    {
        let mut all: Vec<Vec<u8>> = terms
            .into_iter()
            .map(|t| t.as_ref().to_vec())
            .filter(|t| !t.is_empty())
            .collect();
        all.sort_unstable();
        all.dedup();
        // Sorted, deduplicated input cannot fail to build.
        let set = fst::Set::from_iter(all).unwrap_or_default();
        Self {
            set,
            start_masks: Mutex::default(),
        }
    }

    /// Number of strings.
    pub fn len(&self) -> usize {
        self.set.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// Whether `term` is a member.
    pub fn contains(&self, term: &[u8]) -> bool {
        self.set.contains(term)
    }

    /// Bytes of the compiled automaton.
    pub fn heap_bytes(&self) -> usize {
        self.set.as_fst().as_bytes().len()
    }

    fn fst(&self) -> &Fst<Vec<u8>> {
        self.set.as_fst()
    }
}

/// Where an answer is: inside a term (at an fst node), or `sep` bytes into a separator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct State {
    node: CompiledAddr,
    /// 0 inside a term; k: k bytes of the separator read.
    sep: u16,
    /// Items completed before this one.
    done: u16,
}

/// The states an answer may be in (usually one).
pub type States = StateSet<State>;

/// Up to `max_items` terms of a [`TermSet`], joined by `separator`.
pub struct Automaton {
    terms: Arc<TermSet>,
    max_items: usize,
    separator: Arc<[u8]>,
}

impl Automaton {
    /// An automaton over `terms` (`max_items` at least 1).
    pub fn new(terms: Arc<TermSet>, max_items: usize, separator: &[u8]) -> Self {
        Self {
            terms,
            max_items: max_items.max(1),
            separator: separator.into(),
        }
    }

    fn step_one(&self, s: State, byte: u8, out: &mut States) {
        let fst = self.terms.fst();
        let mut push = |next: State| {
            if !out.contains(&next) {
                out.push(next);
            }
        };
        let root = fst.root().addr();
        if s.sep == 0 {
            let node = fst.node(s.node);
            if let Some(i) = node.find_input(byte) {
                push(State {
                    node: node.transition_addr(i),
                    ..s
                });
            }
            let more = usize::from(s.done) + 1 < self.max_items;
            if node.is_final() && more && self.separator.first() == Some(&byte) {
                push(State {
                    node: root,
                    sep: if self.separator.len() == 1 { 0 } else { 1 },
                    done: s.done + 1,
                });
            }
        } else if self.separator.get(usize::from(s.sep)) == Some(&byte) {
            let read = usize::from(s.sep) + 1;
            push(State {
                node: root,
                sep: if read == self.separator.len() { 0 } else { read as u16 },
                done: s.done,
            });
        }
    }

    /// The common case, walked without state sets: one state inside a term. Where a separator
    /// could start (a whole term was read and more items are allowed), the frame goes back to
    /// the general walk.
    fn fill_term(
        &self,
        trie: &TokenTrie,
        trie_node: u32,
        node: fst::raw::Node<'_>,
        done: u16,
        mask: &mut TokenMask,
        stack: &mut Vec<(u32, States, bool)>,
    ) {
        let more = usize::from(done) + 1 < self.max_items && !self.separator.is_empty();
        if node.is_final() && more {
            let state = State {
                node: node.addr(),
                sep: 0,
                done,
            };
            stack.push((trie_node, smallvec::smallvec![state], false));
            return;
        }
        let fst = self.terms.fst();
        let children = trie.children(trie_node);
        let mut visit = |child: u32, i: usize, mask: &mut TokenMask| {
            for &id in trie.tokens_at(child) {
                mask.insert(id);
            }
            if !trie.children(child).is_empty() {
                self.fill_term(trie, child, fst.node(node.transition_addr(i)), done, mask, stack);
            }
        };
        // Walk whichever side is smaller: the automaton's transitions or the trie's children.
        if node.len() < children.len() {
            for i in 0..node.len() {
                let byte = node.transition(i).inp;
                if let Ok(k) = children.binary_search_by_key(&byte, |&(b, _)| b) {
                    visit(children[k].1, i, mask);
                }
            }
        } else {
            for &(byte, child) in children {
                if let Some(i) = node.find_input(byte) {
                    visit(child, i, mask);
                }
            }
        }
    }
}

impl ByteMachine for Automaton {
    type State = State;

    fn start(&self) -> States {
        let mut s = States::new();
        if !self.terms.is_empty() {
            s.push(State {
                node: self.terms.fst().root().addr(),
                sep: 0,
                done: 0,
            });
        }
        s
    }

    fn step(&self, states: &States, byte: u8) -> States {
        let mut out = States::new();
        for &s in states {
            self.step_one(s, byte, &mut out);
        }
        out
    }

    /// A whole term was just read.
    fn accepts(&self, states: &States) -> bool {
        states
            .iter()
            .any(|s| s.sep == 0 && self.terms.fst().node(s.node).is_final())
    }

    /// The trie walk with a fast path for one state inside a term.
    fn fill_mask(&self, trie: &TokenTrie, states: &States, mask: &mut TokenMask) {
        // (trie node, states, whether the fast single-term path may take it)
        let mut stack: Vec<(u32, States, bool)> = vec![(TokenTrie::ROOT, states.clone(), true)];
        while let Some((node, states, fast)) = stack.pop() {
            if fast
                && let [s] = states[..]
                && s.sep == 0
            {
                self.fill_term(trie, node, self.terms.fst().node(s.node), s.done, mask, &mut stack);
                continue;
            }
            for &(byte, child) in trie.children(node) {
                let next = self.step(&states, byte);
                if next.is_empty() {
                    continue;
                }
                for &id in trie.tokens_at(child) {
                    mask.insert(id);
                }
                if !trie.children(child).is_empty() {
                    stack.push((child, next, true));
                }
            }
        }
    }

    /// The start is the widest mask (every token that begins a term) and the same for every
    /// request: computed once per vocabulary and answer shape, kept in the term set.
    fn start_mask(&self, trie: &Arc<TokenTrie>) -> Option<Arc<TokenMask>> {
        let key = (trie.id(), self.max_items, self.separator.to_vec());
        let mut cached = self.terms.start_masks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = cached.iter().position(|(k, _)| *k == key) {
            let hit = cached.remove(i);
            let mask = Arc::clone(&hit.1);
            cached.push(hit);
            return Some(mask);
        }
        let mut mask = TokenMask::new(trie.vocab_size());
        self.fill_mask(trie, &self.start(), &mut mask);
        let mask = Arc::new(mask);
        if cached.len() >= MAX_START_MASKS {
            cached.remove(0);
        }
        cached.push((key, Arc::clone(&mask)));
        Some(mask)
    }
}

/// A set of token ids as a bitset over the vocabulary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenMask {
    words: Vec<u64>,
}

impl TokenMask {
    /// An empty mask for `vocab_size` tokens.
    pub fn new(vocab_size: usize) -> Self {
        Self {
            words: vec![0; vocab_size.div_ceil(64)],
        }
    }

    /// Adds `id` (ids past the vocabulary are ignored).
    pub fn insert(&mut self, id: u32) {
        if let Some(w) = self.words.get_mut(id as usize / 64) {
            *w |= 1 << (id % 64);
        }
    }

    /// Whether `id` is in.
    pub fn contains(&self, id: u32) -> bool {
        self.words
            .get(id as usize / 64)
            .is_some_and(|w| w & (1 << (id % 64)) != 0)
    }

    /// Number of ids in.
    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// The ids in, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.words.iter().enumerate().flat_map(|(w, &bits)| {
            (0..64u32)
                .filter(move |b| bits & (1 << b) != 0)
                .map(move |b| w as u32 * 64 + b)
        })
    }

    /// Sets `values[id]` to minus infinity for every id not in the mask (64 at a time).
    pub fn mask_out(&self, values: &mut [f32]) {
        for (chunk, &word) in values
            .chunks_mut(64)
            .zip(self.words.iter().chain(std::iter::repeat(&0)))
        {
            match word {
                u64::MAX => {}
                0 => chunk.fill(f32::NEG_INFINITY),
                _ => {
                    for (bit, v) in chunk.iter_mut().enumerate() {
                        if word & (1 << bit) == 0 {
                            *v = f32::NEG_INFINITY;
                        }
                    }
                }
            }
        }
    }

    /// Empties the mask.
    pub fn clear(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepts_text(a: &Automaton, text: &str) -> bool {
        let s = a.advance(&a.start(), text.as_bytes());
        a.accepts(&s)
    }

    #[test]
    fn start_masks_are_bounded_and_keyed_by_trie_id() {
        let terms = Arc::new(TermSet::new(["ab", "b"]));
        let bytes = |extra: &[u8]| vec![b"a".to_vec(), b"b".to_vec(), extra.to_vec()];
        let trie = Arc::new(TokenTrie::from_token_bytes(bytes(b"ab")));
        for items in 1..=MAX_START_MASKS + 4 {
            Automaton::new(Arc::clone(&terms), items, b", ").start_mask(&trie);
        }
        assert_eq!(terms.start_masks.lock().unwrap().len(), MAX_START_MASKS);
        // A new vocabulary (a reloaded model) never gets the old one's mask, even if it were
        // built where the old one was.
        let a = Automaton::new(Arc::clone(&terms), 1, b"");
        let first = a.start_mask(&trie).unwrap();
        assert!(first.contains(2), "token `ab` starts a term");
        drop(trie);
        let other = Arc::new(TokenTrie::from_token_bytes(bytes(b"zz")));
        let second = a.start_mask(&other).unwrap();
        assert!(!second.contains(2), "a stale start mask was served");
    }

    #[test]
    fn masking_out_keeps_exactly_the_ids_in() {
        let mut mask = TokenMask::new(200);
        for id in [0, 63, 64, 130, 199] {
            mask.insert(id);
        }
        let mut values = vec![1.0f32; 200];
        mask.mask_out(&mut values);
        let kept: Vec<u32> = (0..200u32).filter(|&i| values[i as usize].is_finite()).collect();
        assert_eq!(kept, vec![0, 63, 64, 130, 199]);
        assert_eq!(mask.iter().collect::<Vec<_>>(), kept);
        let mut full = TokenMask::new(128);
        (0..128).for_each(|i| full.insert(i));
        let mut values = vec![2.0f32; 130];
        full.mask_out(&mut values);
        assert!(values[..128].iter().all(|v| *v == 2.0) && values[128..].iter().all(|v| v.is_infinite()));
    }

    #[test]
    fn single_items_are_exact_members() {
        let terms = TermSet::new(["E11.9", "E11.65", "I10"]);
        let a = Automaton::new(Arc::new(terms), 1, b", ");
        assert!(accepts_text(&a, "E11.9") && accepts_text(&a, "I10"));
        assert!(!accepts_text(&a, "E11") && !accepts_text(&a, "E11.9, I10"));
        assert!(a.advance(&a.start(), b"E12").is_empty());
    }

    #[test]
    fn items_join_with_the_separator_even_when_terms_contain_it() {
        let terms = TermSet::new(["fracture of femur", "fracture of femur, initial encounter", "fever"]);
        let a = Automaton::new(Arc::new(terms), 2, b", ");
        assert!(accepts_text(&a, "fever, fracture of femur"));
        assert!(accepts_text(&a, "fracture of femur, initial encounter"), "one item");
        assert!(accepts_text(&a, "fracture of femur, fever"), "two items");
        let ambiguous = a.advance(&a.start(), b"fracture of femur, ");
        assert_eq!(ambiguous.len(), 2, "inside the term and past a separator");
        assert!(!accepts_text(&a, "fever, fever, fever"), "at most two items");
        assert!(!accepts_text(&a, "fever, "));
    }
}

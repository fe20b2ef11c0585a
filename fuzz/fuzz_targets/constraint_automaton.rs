//! The constraint automaton over random vocabularies and term sets: every token the mask
//! allows must lead to a live state, and walking any bytes must never panic.
#![no_main]

use std::sync::Arc;

use arbitrary::Arbitrary;
use distill_serve::constrain::{Automaton, ByteMachine, TermSet, TokenMask, TokenTrie};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Case {
    vocab: Vec<Vec<u8>>,
    terms: Vec<Vec<u8>>,
    max_items: u8,
    separator: Vec<u8>,
    walk: Vec<u8>,
}

fuzz_target!(|case: Case| {
    if case.vocab.len() > 512 || case.terms.len() > 256 || case.separator.len() > 32 {
        return;
    }
    let trie = Arc::new(TokenTrie::from_token_bytes(case.vocab.clone()));
    let terms = Arc::new(TermSet::new(&case.terms));
    let max_items = usize::from(case.max_items % 8).max(1);
    let automaton = Automaton::new(terms, max_items, &case.separator);
    let mut states = automaton.start();
    for &byte in case.walk.iter().take(256) {
        let mut mask = TokenMask::new(case.vocab.len());
        automaton.fill_mask(&trie, &states, &mut mask);
        for (id, token) in case.vocab.iter().enumerate() {
            if mask.contains(id as u32) {
                assert!(!token.is_empty(), "an empty token was allowed");
                assert!(
                    !automaton.advance(&states, token).is_empty(),
                    "token {id} allowed into a dead end"
                );
            }
        }
        let next = automaton.step(&states, byte);
        if next.is_empty() {
            break;
        }
        states = next;
        let _ = automaton.accepts(&states);
    }
});

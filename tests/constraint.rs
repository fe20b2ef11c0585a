//! The terminology constraint against brute force: at every reachable state, the tokens it
//! allows are exactly those whose bytes extend the text so far into a prefix of some valid
//! answer, checked over the whole vocabulary of a real byte-level BPE tokenizer.

use std::collections::BTreeSet;

use distill_serve::checkpoint::Family;
use distill_serve::constrain::{Automaton, ByteMachine, TermSet, TokenMask, TokenTrie};
use distill_serve::tiny::{TinySpec, write_tiny};
use tokenizers::Tokenizer;

fn tokenizer() -> Tokenizer {
    let dir = tempfile::tempdir().unwrap();
    write_tiny(&TinySpec::new(Family::Qwen2, 0), dir.path()).unwrap();
    Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap()
}

/// Every answer of up to `max_items` terms joined by `sep`.
fn answers(terms: &[&str], max_items: usize, sep: &str) -> BTreeSet<String> {
    let mut all: BTreeSet<String> = terms.iter().map(|t| t.to_string()).collect();
    let mut last = all.clone();
    for _ in 1..max_items {
        last = last
            .iter()
            .flat_map(|a| terms.iter().map(move |t| format!("{a}{sep}{t}")))
            .collect();
        all.extend(last.iter().cloned());
    }
    all
}

fn check(terms: &[&str], max_items: usize, sep: &str) {
    let tokenizer = tokenizer();
    let trie = TokenTrie::new(&tokenizer);
    assert!(trie.vocab_size() >= 256, "the tokenizer covers every byte");
    let set = TermSet::new(terms);
    let automaton = Automaton::new(std::sync::Arc::new(set), max_items, sep.as_bytes());
    let answers = answers(terms, max_items, sep);
    let prefixes: BTreeSet<&[u8]> = answers
        .iter()
        .flat_map(|a| (0..a.len()).map(move |i| &a.as_bytes()[..i]))
        .collect();
    for prefix in prefixes {
        let states = automaton.advance(&automaton.start(), prefix);
        assert!(
            !states.is_empty(),
            "{:?} is a valid prefix",
            String::from_utf8_lossy(prefix)
        );
        let mut mask = TokenMask::new(trie.vocab_size());
        automaton.fill_mask(&trie, &states, &mut mask);
        for id in 0..trie.vocab_size() as u32 {
            let bytes = trie.bytes(id);
            let extended = [prefix, bytes].concat();
            let valid = !bytes.is_empty() && answers.iter().any(|a| a.as_bytes().starts_with(&extended));
            assert_eq!(
                mask.contains(id),
                valid,
                "after {:?}, token {id} {:?}",
                String::from_utf8_lossy(prefix),
                String::from_utf8_lossy(bytes)
            );
        }
        let complete = answers.contains(std::str::from_utf8(prefix).unwrap());
        assert_eq!(
            automaton.accepts(&states),
            complete,
            "{:?}",
            String::from_utf8_lossy(prefix)
        );
    }
}

#[test]
fn icd_codes_with_and_without_dots() {
    check(
        &["E11.9", "E119", "E11.65", "E1165", "I10", "S72.001A", "S72001A"],
        1,
        ", ",
    );
}

#[test]
fn terms_with_spaces_and_separators_inside_as_multi_item_answers() {
    check(
        &[
            "the patient",
            "chest pain",
            "pain",
            "fracture of femur",
            "fracture of femur, initial encounter",
            "diabetes",
        ],
        2,
        ", ",
    );
}

#[test]
fn a_guide_after_a_marker_lets_the_model_think_first() {
    use distill_serve::constrain::Guide;
    use std::sync::Arc;
    let tokenizer = tokenizer();
    let trie = Arc::new(TokenTrie::new(&tokenizer));
    let set = Arc::new(TermSet::new(["E11.9", "I10"]));
    let think_end = tokenizer.token_to_id("</think>").unwrap();
    let free_text: Vec<u32> = tokenizer.encode("the patient", false).unwrap().get_ids().to_vec();
    let masked = |guide: &Guide| {
        let mut logits = vec![0.0f32; trie.vocab_size()];
        guide.apply(&mut logits, &[]);
        logits.iter().filter(|l| l.is_infinite()).count()
    };
    for (marker, opening) in [
        (b"</think>".to_vec(), vec![think_end]),
        (
            b"Answer:".to_vec(),
            tokenizer.encode("Answer:", false).unwrap().get_ids().to_vec(),
        ),
    ] {
        let mut guide = Guide::new(Arc::clone(&set), Arc::clone(&trie), 1, b", ").after(&marker);
        assert_eq!(masked(&guide), 0, "nothing is masked while thinking");
        for &t in &free_text {
            guide.commit(t);
        }
        assert_eq!(masked(&guide), 0);
        assert!(!guide.is_exhausted());
        for &t in &opening {
            guide.commit(t);
        }
        let allowed = trie.vocab_size() - masked(&guide);
        assert_eq!(
            allowed,
            guide.mask().count(),
            "after {:?} only the terminology",
            String::from_utf8_lossy(&marker)
        );
        assert!(allowed > 0 && allowed < 50);
    }
}

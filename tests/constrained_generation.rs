//! Property test: constrained generation with random tiny students, greedy and sampled, always
//! yields exact members of the list: ICD codes with and without dots, terms, and multi-item
//! answers whose terms contain the separator.

mod common;

use std::sync::Arc;

use common::student;
use distill_serve::checkpoint::Family;
use distill_serve::constrain::{Guide, TermSet, TokenTrie};
use distill_serve::engine::DecoderSession;
use distill_serve::export::Precision;
use distill_serve::generate::{Event, FinishReason, GenerationRequest, SamplingParams, Sequence, decode_single};
use tokenizers::Tokenizer;

/// Generates for `prompt` with `guide` until the sequence finishes; returns the text and why.
fn generate(
    session: &mut DecoderSession,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    guide: Guide,
    seed: u64,
) -> (String, FinishReason) {
    let stop_token_ids = ["<|endoftext|>", "<|im_end|>"]
        .iter()
        .filter_map(|t| tokenizer.token_to_id(t))
        .collect();
    let mut seq = Sequence::new(GenerationRequest {
        prompt: prompt.to_vec(),
        max_new_tokens: 400,
        min_new_tokens: 0,
        sampling: SamplingParams {
            temperature: if seed == 0 { 0.0 } else { 1.0 },
            top_k: 0,
            top_p: 1.0,
            seed: Some(seed),
        },
        stop: Vec::new(),
        stop_token_ids,
        logprobs: None,
        token_ids_in_logprobs: false,
        stream: false,
        deadline: None,
        constraint: Some(guide),
    });
    let mut text = String::new();
    let mut end = None;
    decode_single(session, prompt, |logits| {
        let advance = seq.advance(tokenizer, logits).unwrap();
        for event in advance.events {
            match event {
                Event::Token { text: piece, .. } => text.push_str(&piece),
                Event::Finished { text: rest, reason, .. } => {
                    text.push_str(&rest);
                    end = Some(reason);
                }
            }
        }
        advance.next
    })
    .unwrap();
    (text, end.expect("the sequence finished"))
}

/// Whether `text` is 1..=`max_items` members of `terms` joined by `sep`.
fn is_answer(text: &str, terms: &[&str], max_items: usize, sep: &str) -> bool {
    if max_items == 0 {
        return false;
    }
    terms.iter().any(|t| {
        text == *t
            || text
                .strip_prefix(t)
                .and_then(|rest| rest.strip_prefix(sep))
                .is_some_and(|rest| is_answer(rest, terms, max_items - 1, sep))
    })
}

#[test]
fn constrained_generation_yields_exact_members() {
    let codes = ["E11.9", "E11.65", "I10", "S72.001A", "S72.002B", "S06.1X7A", "T36.0X1A"];
    let compact: Vec<String> = codes.iter().map(|c| c.replace('.', "")).collect();
    let compact: Vec<&str> = compact.iter().map(String::as_str).collect();
    let both: Vec<&str> = codes.iter().chain(&compact).copied().collect();
    let terms = [
        "Type 2 diabetes mellitus without complications",
        "Essential (primary) hypertension",
        "high blood pressure",
        "Fracture of femur, initial encounter for closed fracture",
        "Fracture of femur",
        "Intracranial injury",
    ];
    let cases: [(&[&str], usize, &str); 5] = [
        (&codes, 1, ", "),
        (&compact, 1, ", "),
        (&both, 3, ", "),
        (&terms, 1, ", "),
        (&terms, 3, ", "),
    ];
    let mut outcomes = 0;
    for (family, student_seed) in [(Family::Qwen2, 1), (Family::Llama, 2), (Family::Qwen2, 3)] {
        let st = student(family, student_seed, |s| s.init_std = Some(0.3));
        let mut session = st.decoder("int8", Precision::DEFAULT_INT8);
        let tokenizer = Tokenizer::from_file(st.checkpoint.join("tokenizer.json")).unwrap();
        let trie = Arc::new(TokenTrie::new(&tokenizer));
        let prompt = st.encode("The diagnosis code is");
        for (list, max_items, sep) in cases {
            let set = Arc::new(TermSet::new(list.iter()));
            for seed in 0..4 {
                let guide = Guide::new(Arc::clone(&set), Arc::clone(&trie), max_items, sep.as_bytes());
                let (text, reason) = generate(&mut session, &tokenizer, &prompt, guide, seed);
                assert_eq!(reason, FinishReason::Stop, "{text:?}");
                assert!(
                    is_answer(&text, list, max_items, sep),
                    "{family:?} seed {seed}: {text:?} is not up to {max_items} members of {list:?}"
                );
                outcomes += 1;
            }
        }
    }
    assert_eq!(outcomes, 60);
}

#[test]
fn constrained_json_records_parse_and_hold_members() {
    use distill_serve::constrain::{JsonMachine, Terminologies, TerminologySpec};
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/terminology/icd10cm_tabular_small.xml");
    let spec: TerminologySpec = format!("icd=icd10cm-xml:{}", fixture.display()).parse().unwrap();
    let terminologies = Terminologies::load(&[spec]).unwrap();
    let icd = terminologies.get("icd").unwrap();
    let schema = serde_json::json!({"type": "object", "properties": {
        "code": {"type": "string", "x-terminology": "icd"},
        "count": {"type": "integer"},
        "note": {"type": "string", "maxLength": 12},
        "also": {"type": "array", "items": {"type": "string", "x-terminology": "icd"}, "maxItems": 3}
    }});
    let machine = Arc::new(JsonMachine::compile(&schema, &terminologies).unwrap());
    for (family, student_seed) in [(Family::Qwen2, 4), (Family::Llama, 5)] {
        let st = student(family, student_seed, |s| s.init_std = Some(0.3));
        let mut session = st.decoder("int8", Precision::DEFAULT_INT8);
        let tokenizer = Tokenizer::from_file(st.checkpoint.join("tokenizer.json")).unwrap();
        let trie = Arc::new(TokenTrie::new(&tokenizer));
        let prompt = st.encode("Record:");
        for seed in 0..4 {
            let guide = Guide::json(Arc::clone(&machine), Arc::clone(&trie));
            let (text, reason) = generate(&mut session, &tokenizer, &prompt, guide, seed);
            assert_eq!(reason, FinishReason::Stop, "{text:?}");
            let record: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            let billable = |v: &serde_json::Value| v.as_str().and_then(|c| icd.get(c)).is_some_and(|e| e.billable);
            assert!(billable(&record["code"]), "{text}");
            assert!(record["count"].is_i64(), "{text}");
            assert!(record["note"].as_str().is_some_and(|n| n.len() <= 12), "{text}");
            let also = record["also"].as_array().unwrap();
            assert!((1..=3).contains(&also.len()) && also.iter().all(billable), "{text}");
        }
    }
}

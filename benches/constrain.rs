//! Terminology constraints at full size: build time and memory of the term sets, and the time
//! to compute one sequence's token mask per step, on the full ICD-10-CM release and on a
//! SNOMED-sized synthetic list of 1M descriptions, with real 100k- and 200k-token byte-level
//! BPE vocabularies (tiktoken cl100k_base and o200k_base, bracketing Qwen2's 151k).
//!
//! ```sh
//! bash scripts/setup.sh && bash scripts/fetch-bench-vocab.sh
//! cargo bench --bench constrain
//! ```
//! The last table puts the per-row cost of a constraint (masking a 152k-logit row and following
//! the token) next to a batch-32 decode step of the 1.5B-shape INT8 student, when `cargo bench
//! --bench student -- --shape r1-distill-qwen-1.5b` has left it in `target/bench-models`.
//!
//! Each answer is walked token by token as a model would write it (the longest allowed token
//! that continues it), timing the mask at every step, as a sequence's `Guide` computes it (the
//! start-of-answer mask is computed once per term set and vocabulary, then copied).

mod masking;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use distill_serve::constrain::{
    CodeFormat, Guide, MatchKind, SourceKind, TermSet, Terminologies, TerminologySpec, TokenTrie, icd10cm_release,
};

use masking::{llguidance_side_by_side, mask_times, percentile, sample, synthetic_descriptions, tiktoken, walk};

fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()))
        .map_or(0, |pages| pages * 4096)
}

fn report(name: &str, set: &Arc<TermSet>, vocab: &str, trie: &Arc<TokenTrie>, answers: &[Vec<u8>]) {
    let (steps, [median, p99, single_median, single_p99]) = mask_times(set, trie, answers);
    println!(
        "| {name} | {vocab} | {} | {steps} | {median:.1} | {p99:.1} | {single_median:.1} | {single_p99:.1} |",
        answers.len(),
    );
}

/// Mean time one constrained row adds to a decode step with a `vocab`-sized logits row: copying
/// the logits, masking them, and following the chosen token.
fn per_row_overhead(set: &Arc<TermSet>, trie: &Arc<TokenTrie>, answers: &[Vec<u8>], vocab: usize) -> Duration {
    let logits: Vec<f32> = (0..vocab).map(|i| (i as f32 * 0.37).sin()).collect();
    let (mut total, mut steps) = (Duration::ZERO, 0u32);
    for answer in answers {
        let mut guide = Guide::new(Arc::clone(set), Arc::clone(trie), 1, b", ");
        let mut at = 0;
        while at < answer.len() {
            let rest = &answer[at..];
            let Some((id, len)) = guide
                .mask()
                .iter()
                .map(|id| (id, trie.bytes(id).len()))
                .filter(|&(id, _)| rest.starts_with(trie.bytes(id)))
                .max_by_key(|&(_, len)| len)
            else {
                break;
            };
            let started = Instant::now();
            let mut row = logits.clone();
            guide.apply(&mut row, &[0]);
            guide.commit(id);
            total += started.elapsed();
            steps += 1;
            at += len;
        }
    }
    total / steps.max(1)
}

/// One decode step of the 1.5B-shape INT8 student at batch 32, if `cargo bench --bench student`
/// has made it.
fn decode_step_1_5b() -> Result<Option<(Duration, usize)>> {
    use distill_serve::engine::{DecoderSession, SessionOptions};
    use ndarray::Array2;
    let model = Path::new("target/bench-models/r1-distill-qwen-1.5b/int8-matmul-integer/model.onnx");
    if !model.exists() {
        return Ok(None);
    }
    let mut session = DecoderSession::open(model, SessionOptions::default())?;
    let (batch, prompt) = (32, 16);
    let ids = Array2::from_shape_fn((batch, prompt), |(b, i)| ((b * 131 + i * 17) % 5000) as i64);
    let positions = Array2::from_shape_fn((batch, prompt), |(_, i)| i as i64);
    let (_, mut cache) = session.forward_last(
        &ids,
        &Array2::ones((batch, prompt)),
        &positions,
        session.empty_cache(batch)?,
    )?;
    let steps = 4;
    let started = Instant::now();
    for step in 0..steps {
        let total = prompt + step + 1;
        let (_, c) = session.forward_last(
            &Array2::from_elem((batch, 1), 42),
            &Array2::ones((batch, total)),
            &Array2::from_elem((batch, 1), (total - 1) as i64),
            cache,
        )?;
        cache = c;
    }
    Ok(Some((started.elapsed() / steps as u32, session.vocab_size())))
}

/// Our engine on the same terms: compile time, then single-run figures along the answers.
fn ours_side_by_side(name: &str, strings: &[String], trie: &Arc<TokenTrie>, answers: &[Vec<u8>]) -> String {
    let started = Instant::now();
    let set = Arc::new(TermSet::new(strings));
    let build = started.elapsed();
    let (mut least, mut single) = (Vec::new(), Vec::new());
    let mut setup = Vec::new();
    for a in answers {
        let from = single.len();
        walk(&set, trie, a, &mut least, &mut single);
        setup.push(single[from]);
    }
    single.sort();
    setup.sort();
    format!(
        "| {name} | distill-serve (fst + vocabulary trie) | {:.2} s | {:.0} | {:.1} | {:.1} |",
        build.as_secs_f64(),
        percentile(&setup, 0.5),
        percentile(&single, 0.5),
        percentile(&single, 0.99)
    )
}

fn main() -> Result<()> {
    let (xml, _) = icd10cm_release();
    let spec = TerminologySpec {
        name: "icd10cm".into(),
        kind: SourceKind::Icd10cmXml,
        path: xml,
    };
    let before = resident_bytes();
    let started = Instant::now();
    let terminologies = Terminologies::load(&[spec])?;
    let icd_build = started.elapsed();
    let icd_memory = resident_bytes().saturating_sub(before);
    let stats = terminologies.summaries()[0].stats;
    let sets: Vec<(&str, Arc<TermSet>)> = [
        ("ICD-10-CM codes", MatchKind::Code),
        ("ICD-10-CM terms", MatchKind::Term),
        ("ICD-10-CM codes or terms", MatchKind::CodeOrTerm),
    ]
    .into_iter()
    .map(|(name, kind)| {
        Ok((
            name,
            terminologies.term_set("icd10cm", kind, CodeFormat::Dotted, true)?.0,
        ))
    })
    .collect::<Result<_>>()?;
    let terminology = terminologies.get("icd10cm").context("loaded")?;
    let billable: Vec<_> = terminology.entries.iter().filter(|e| e.billable).collect();
    let codes: Vec<String> = billable.iter().map(|e| e.code.clone()).collect();
    let terms: Vec<String> = billable
        .iter()
        .flat_map(|e| std::iter::once(e.description.clone()).chain(e.synonyms.iter().cloned()))
        .collect();

    println!("\n### constrain: build (this 2-core machine)\n");
    println!("| what | strings | build s | memory MB |");
    println!("|---|---|---|---|");
    println!(
        "| ICD-10-CM 2026: load XML + compile codes, terms, codes-or-terms | {} codes, {} terms | {:.2} | {:.0} (resident growth) |",
        stats.codes,
        stats.terms,
        icd_build.as_secs_f64(),
        icd_memory as f64 / 1e6
    );
    for (name, set) in &sets {
        println!(
            "| {name} (fst) | {} | - | {:.1} |",
            set.len(),
            set.heap_bytes() as f64 / 1e6
        );
    }
    let synthetic = synthetic_descriptions(1_000_000);
    let before = resident_bytes();
    let started = Instant::now();
    let big = Arc::new(TermSet::new(&synthetic));
    println!(
        "| synthetic SNOMED-sized list | {} | {:.2} | {:.1} fst ({:.0} resident growth) |",
        big.len(),
        started.elapsed().as_secs_f64(),
        big.heap_bytes() as f64 / 1e6,
        resident_bytes().saturating_sub(before) as f64 / 1e6
    );

    let cache = distill_serve::paths::setup_cache_dir().join("bench-vocab");
    let mut tries = Vec::new();
    let cl100k = tiktoken(&cache.join("cl100k_base.tiktoken"))?;
    for vocab in ["cl100k_base", "o200k_base"] {
        let started = Instant::now();
        let trie = Arc::new(TokenTrie::from_token_bytes(tiktoken(
            &cache.join(format!("{vocab}.tiktoken")),
        )?));
        println!(
            "| {vocab} vocabulary trie | {} tokens | {:.2} | {:.1} |",
            trie.vocab_size(),
            started.elapsed().as_secs_f64(),
            trie.heap_bytes() as f64 / 1e6
        );
        tries.push((vocab, trie));
    }

    println!("\n### constrain: mask per sequence step, microseconds (least of three runs, then single runs)\n");
    println!("| list | vocabulary | answers | steps | median | p99 | single-run median | single-run p99 |");
    println!("|---|---|---|---|---|---|---|---|");
    let code_answers = sample(&codes, 200, 1);
    let term_answers = sample(&terms, 100, 2);
    let big_answers = sample(&synthetic, 100, 3);
    for (vocab, trie) in &tries {
        report("ICD-10-CM codes", &sets[0].1, vocab, trie, &code_answers);
        report("ICD-10-CM terms", &sets[1].1, vocab, trie, &term_answers);
        report("ICD-10-CM codes or terms", &sets[2].1, vocab, trie, &term_answers);
        report("1M synthetic descriptions", &big, vocab, trie, &big_answers);
    }
    println!("\n### constrain: decoding throughput at batch 32, constrained vs not\n");
    match decode_step_1_5b()? {
        None => println!(
            "(skipped: make the 1.5B-shape student with `cargo bench --bench student -- --shape r1-distill-qwen-1.5b`)"
        ),
        Some((step, vocab)) => {
            println!(
                "| list | vocabulary | decode step, batch 32 (ms) | added per row (us) | constrained / unconstrained throughput |"
            );
            println!("|---|---|---|---|---|");
            for (vocab_name, trie) in &tries {
                for (name, set, answers) in [
                    ("ICD-10-CM codes", &sets[0].1, &code_answers),
                    ("ICD-10-CM terms", &sets[1].1, &term_answers),
                ] {
                    let extra = per_row_overhead(set, trie, answers, vocab);
                    let ratio = step.as_secs_f64() / (step + extra * 32).as_secs_f64();
                    println!(
                        "| {name} | {vocab_name} (logits of {vocab}) | {:.1} | {:.1} | {:.1}% |",
                        step.as_secs_f64() * 1e3,
                        extra.as_secs_f64() * 1e6,
                        ratio * 100.0
                    );
                }
            }
        }
    }

    println!("\n### constrain: the same lists in llguidance, cl100k_base, single runs\n");
    println!("| list | engine | compile | per-request setup (us) | mask median (us) | mask p99 (us) |");
    println!("|---|---|---|---|---|---|");
    let cl = &tries[0].1;
    let some_terms = &term_answers[..20];
    println!(
        "{}",
        ours_side_by_side("ICD-10-CM codes", &codes, cl, &code_answers[..50])
    );
    println!(
        "{}",
        llguidance_side_by_side("ICD-10-CM codes", &codes, &cl100k, &code_answers[..50])
    );
    println!("{}", ours_side_by_side("ICD-10-CM terms", &terms, cl, some_terms));
    println!(
        "{}",
        llguidance_side_by_side("ICD-10-CM terms", &terms, &cl100k, some_terms)
    );
    Ok(())
}

//! What the constraint benches share: real tiktoken vocabularies, walking an answer through a
//! [`Guide`] as a model writes it while timing each step's mask, synthetic clinical-looking
//! descriptions, and the same list compiled by llguidance for comparison.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use base64::Engine;
use distill_serve::constrain::{Guide, TermSet, TokenTrie};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Token bytes of a tiktoken file (`base64 rank` per line).
pub fn tiktoken(path: &Path) -> Result<Vec<Vec<u8>>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: run scripts/fetch-bench-vocab.sh", path.display()))?;
    let mut tokens = Vec::new();
    for line in text.lines() {
        let (b64, rank) = line.split_once(' ').context("bad tiktoken line")?;
        let rank: usize = rank.parse()?;
        if tokens.len() <= rank {
            tokens.resize(rank + 1, Vec::new());
        }
        tokens[rank] = base64::engine::general_purpose::STANDARD.decode(b64)?;
    }
    Ok(tokens)
}

/// Writes `answer` through a [`Guide`] as a model would (the longest allowed token that
/// continues it), timing each step's mask: the first from creating the guide, then each commit.
/// `least` gets the least of three runs on copies of the guide (this shared machine's
/// preemptions are not the step's cost), `single` the first run.
pub fn walk(
    set: &Arc<TermSet>,
    trie: &Arc<TokenTrie>,
    answer: &[u8],
    least: &mut Vec<Duration>,
    single: &mut Vec<Duration>,
) {
    let started = Instant::now();
    let mut guide = Guide::new(Arc::clone(set), Arc::clone(trie), 1, b", ");
    least.push(started.elapsed());
    single.push(started.elapsed());
    let mut at = 0;
    while at < answer.len() {
        let rest = &answer[at..];
        let Some((id, len)) = guide
            .mask()
            .iter()
            .map(|id| (id, trie.bytes(id)))
            .filter(|(_, b)| rest.starts_with(b))
            .map(|(id, b)| (id, b.len()))
            .max_by_key(|&(_, len)| len)
        else {
            panic!("no allowed token continues {:?}", String::from_utf8_lossy(rest));
        };
        let runs: Vec<Duration> = (0..3)
            .map(|_| {
                let mut trial = guide.clone();
                let started = Instant::now();
                trial.commit(id);
                started.elapsed()
            })
            .collect();
        single.push(runs[0]);
        least.push(runs.into_iter().min().unwrap_or_default());
        guide.commit(id);
        at += len;
    }
}

/// `n` strings drawn from `strings` (with repeats), as answers to walk.
pub fn sample(strings: &[String], n: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| strings[rng.random_range(0..strings.len())].as_bytes().to_vec())
        .collect()
}

/// Mask times along `answers`, microseconds: steps, then median and p99 of the least of three
/// runs, then of single runs.
pub fn mask_times(set: &Arc<TermSet>, trie: &Arc<TokenTrie>, answers: &[Vec<u8>]) -> (usize, [f64; 4]) {
    let (mut least, mut single) = (Vec::new(), Vec::new());
    for a in answers {
        walk(set, trie, a, &mut least, &mut single);
    }
    least.sort();
    single.sort();
    let figures = [
        percentile(&least, 0.5),
        percentile(&least, 0.99),
        percentile(&single, 0.5),
        percentile(&single, 0.99),
    ];
    (least.len(), figures)
}

pub fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

/// A synthetic SNOMED-sized list: `n` distinct clinical-looking descriptions.
pub fn synthetic_descriptions(n: usize) -> Vec<String> {
    const WORDS: &[&str] = &[
        "acute",
        "chronic",
        "left",
        "right",
        "bilateral",
        "fracture",
        "of",
        "the",
        "femur",
        "tibia",
        "disorder",
        "disease",
        "infection",
        "due",
        "to",
        "with",
        "without",
        "complication",
        "syndrome",
        "congenital",
        "primary",
        "secondary",
        "malignant",
        "benign",
        "neoplasm",
        "lesion",
        "injury",
        "pain",
        "ulcer",
        "stenosis",
        "artery",
        "vein",
        "kidney",
        "liver",
        "lung",
        "heart",
        "valve",
        "muscle",
        "tendon",
        "nerve",
        "skin",
        "bone",
        "joint",
        "upper",
        "lower",
        "limb",
        "hand",
        "foot",
        "finding",
        "procedure",
        "history",
        "family",
        "diabetic",
        "renal",
    ];
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut out = std::collections::BTreeSet::new();
    while out.len() < n {
        let words = rng.random_range(2..9);
        let mut d: Vec<&str> = (0..words).map(|_| WORDS[rng.random_range(0..WORDS.len())]).collect();
        let id = rng.random_range(0..1000u32);
        let kind = ["(disorder)", "(finding)", "(procedure)", "(body structure)"][rng.random_range(0..4)];
        let id_text = id.to_string();
        d.push(&id_text);
        out.insert(format!("{} {kind}", d.join(" ")));
    }
    out.into_iter().collect()
}

/// The same list as a Lark grammar in llguidance (`start: TERM`, `TERM: "a" | "b" | ...`), over
/// the same vocabulary: the time to compile it, then the mask per step along the same answers.
pub fn llguidance_side_by_side(name: &str, strings: &[String], words: &[Vec<u8>], answers: &[Vec<u8>]) -> String {
    use llguidance::api::TopLevelGrammar;
    use llguidance::toktrie::{ApproximateTokEnv, TokRxInfo, TokTrie};
    use llguidance::{Matcher, ParserFactory};
    let run = || -> Result<String> {
        let mut words = words.to_vec();
        let eos = words.len() as u32;
        words.push([&[TokTrie::SPECIAL_TOKEN_MARKER][..], b"<eos>"].concat());
        let trie = TokTrie::from(&TokRxInfo::new(words.len() as u32, eos), &words);
        let env: llguidance::toktrie::TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&env)?;
        factory.quiet();
        let limits = factory.limits_mut();
        limits.initial_lexer_fuel = u64::MAX / 4;
        limits.max_grammar_size = usize::MAX / 4;
        limits.max_lexer_states = usize::MAX / 4;
        limits.step_lexer_fuel = u64::MAX / 4;
        let alternatives: Vec<String> = strings
            .iter()
            .map(|t| serde_json::to_string(t).unwrap_or_default())
            .collect();
        let grammar = TopLevelGrammar::from_lark(format!("start: TERM\nTERM: {}\n", alternatives.join(" | ")));
        let started = Instant::now();
        let first = factory.create_parser(grammar.clone())?;
        let build = started.elapsed();
        let by_bytes: std::collections::HashMap<&[u8], u32> = words
            .iter()
            .enumerate()
            .map(|(id, w)| (w.as_slice(), id as u32))
            .collect();
        let mut times = Vec::new();
        let mut create = Vec::new();
        for answer in answers {
            // A compiled parser is copied per request, as a server would.
            let started = Instant::now();
            let mut matcher = Matcher::new(Ok(first.deep_clone()));
            create.push(started.elapsed());
            let mut at = 0;
            while at < answer.len() {
                let started = Instant::now();
                let mask = matcher.compute_mask()?;
                times.push(started.elapsed());
                let rest = &answer[at..];
                let Some((id, len)) = (1..=rest.len().min(48))
                    .rev()
                    .filter_map(|n| by_bytes.get(&rest[..n]).map(|&id| (id, n)))
                    .find(|&(id, _)| mask.is_allowed(id))
                else {
                    anyhow::bail!(
                        "llguidance allows no token continuing {:?}",
                        String::from_utf8_lossy(rest)
                    );
                };
                matcher.consume_token(id)?;
                at += len;
            }
        }
        times.sort();
        create.sort();
        Ok(format!(
            "| {name} | llguidance (Lark alternation) | {:.2} s | {:.0} | {:.1} | {:.1} |",
            build.as_secs_f64(),
            percentile(&create, 0.5),
            percentile(&times, 0.5),
            percentile(&times, 0.99)
        ))
    };
    run().unwrap_or_else(|e| {
        format!(
            "| {name} | llguidance | failed: {} | - | - | - |",
            e.to_string().lines().next().unwrap_or_default()
        )
    })
}

//! Subsets of a terminology at full size: the time to compile a subset into its term set and
//! the automaton's size, for subsets of about 100, 10,000 and 300,000 concepts of a
//! SNOMED-sized synthetic RF2 release (350,001 concepts, two descriptions each, selected by ECL
//! `<<` through the server's own loader and evaluator) and for ICD-10-CM ranges of the real
//! 2026 release; the mask per step along sampled answers, beside the whole terminology; and
//! the same subsets through llguidance as a Lark alternation.
//!
//! ```sh
//! bash scripts/setup.sh && bash scripts/fetch-bench-vocab.sh
//! cargo bench --bench subsets
//! ```
//! The synthetic release is written once to `target/bench-data/snomed-synthetic-2`.

mod masking;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use distill_serve::constrain::{
    CodeFormat, MatchKind, SourceKind, SubsetText, TermSet, Terminologies, TerminologySpec, TokenTrie, icd10cm_release,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use masking::{llguidance_side_by_side, mask_times, sample, synthetic_descriptions, tiktoken};

/// The synthetic release's concepts: the root, then three nested bands whose `<<` closures
/// hold exactly 300,000, 10,000 and 100 concepts, then 50,000 more under the root.
const BIG: usize = 300_000;
const MID: usize = 10_000;
const SMALL: usize = 100;
const REST: usize = 50_000;

/// Concept `n`'s id: scattered over nine digits as real SNOMED CT ids are (consecutive ids
/// would make any subset a range that an automaton stores in a few bytes).
fn id(n: usize) -> String {
    (100_000_000 + (n as u64 * 2_654_435_761) % 899_999_999).to_string()
}

/// Writes the synthetic RF2 release (descriptions and is-a relationships) unless it is there.
/// Concept 1 heads the big band, 2 the mid band inside it, 3 the small band inside that; each
/// concept's parents are earlier concepts of its own band (one in twenty has two), so the
/// closures' sizes are exact.
fn synthetic_release() -> Result<PathBuf> {
    let dir = Path::new("target/bench-data/snomed-synthetic-2");
    let done = dir.join("complete");
    if done.exists() {
        return Ok(dir.to_path_buf());
    }
    std::fs::create_dir_all(dir)?;
    let total = 1 + BIG + REST;
    // Bands in creation order: (head, its parent, how many concepts in the band only).
    let bands = [(3, 2, SMALL), (2, 1, MID - SMALL), (1, 0, BIG - MID), (0, 0, REST + 1)];
    let mut rng = ChaCha8Rng::seed_from_u64(18);
    let mut next = 4;
    let mut edges: Vec<(usize, usize)> = Vec::new();
    for (head, parent, count) in bands {
        if head != 0 {
            edges.push((head, parent));
        }
        let mut members = vec![head];
        for _ in 1..count {
            let child = next;
            next += 1;
            edges.push((child, members[rng.random_range(0..members.len())]));
            if rng.random_range(0..20) == 0 {
                let second = members[rng.random_range(0..members.len())];
                if !edges.contains(&(child, second)) {
                    edges.push((child, second));
                }
            }
            members.push(child);
        }
    }
    anyhow::ensure!(next == total, "{next} concepts written, {total} planned");
    let names = synthetic_descriptions(2 * total);
    let mut text = String::from(
        "id\teffectiveTime\tactive\tmoduleId\tconceptId\tlanguageCode\ttypeId\tterm\tcaseSignificanceId\n",
    );
    for n in 0..total {
        for (k, type_id) in ["900000000000003001", "900000000000013009"].iter().enumerate() {
            let name = &names[2 * n + k];
            writeln!(
                text,
                "{}\t20260301\t1\t9990000001\t{}\ten\t{type_id}\t{name}\t900000000000448009",
                2 * n + k + 1,
                id(n)
            )?;
        }
    }
    std::fs::write(dir.join("sct2_Description_Snapshot-en_SYN_20260301.txt"), text)?;
    let mut text = String::from(
        "id\teffectiveTime\tactive\tmoduleId\tsourceId\tdestinationId\trelationshipGroup\ttypeId\tcharacteristicTypeId\tmodifierId\n",
    );
    for (i, (child, parent)) in edges.iter().enumerate() {
        writeln!(
            text,
            "{}\t20260301\t1\t9990000001\t{}\t{}\t0\t116680003\t900000000000011006\t900000000000451002",
            i + 1,
            id(*child),
            id(*parent)
        )?;
    }
    std::fs::write(dir.join("sct2_Relationship_Snapshot_SYN_20260301.txt"), text)?;
    std::fs::write(done, "")?;
    Ok(dir.to_path_buf())
}

/// One subset to measure: a label, the terminology, the subset (none: the whole release) and
/// what its answers match.
struct Case {
    label: String,
    terminology: &'static str,
    subset: Option<String>,
    kind: MatchKind,
}

/// The strings `case` allows (billable codes, or their terms), as the server selects them.
fn strings(terminologies: &Terminologies, case: &Case) -> Result<Vec<String>> {
    let text = case.subset.clone().map(SubsetText::One);
    let selected = terminologies.select(case.terminology, text.as_ref())?;
    let entries = &selected.terminology.entries;
    let billable = selected.members.iter().map(|&i| &entries[i]).filter(|e| e.billable);
    Ok(match case.kind {
        MatchKind::Code => billable.map(|e| e.code.clone()).collect(),
        _ => billable
            .flat_map(|e| std::iter::once(e.description.clone()).chain(e.synonyms.iter().cloned()))
            .collect(),
    })
}

/// Compiles `case` as a request would (first time, then from the cache).
fn compile(terminologies: &Terminologies, case: &Case) -> Result<(Arc<TermSet>, Duration, Duration)> {
    let run = || -> Result<Arc<TermSet>> {
        Ok(match &case.subset {
            Some(subset) => {
                let what = (case.kind, CodeFormat::Dotted, true, false);
                terminologies
                    .subset_term_set(case.terminology, what, &SubsetText::One(subset.clone()))?
                    .0
            }
            None => {
                terminologies
                    .term_set(case.terminology, case.kind, CodeFormat::Dotted, true)?
                    .0
            }
        })
    };
    let started = Instant::now();
    let set = run()?;
    let first = started.elapsed();
    let started = Instant::now();
    run()?;
    Ok((set, first, started.elapsed()))
}

fn mask_row(case: &Case, members: usize, set: &Arc<TermSet>, trie: &Arc<TokenTrie>, answers: &[Vec<u8>]) -> String {
    let (steps, [median, p99, single_median, single_p99]) = mask_times(set, trie, answers);
    format!(
        "| {} | {members} | {:?} | {steps} | {median:.1} | {p99:.1} | {single_median:.1} | {single_p99:.1} |",
        case.label, case.kind,
    )
}

fn main() -> Result<()> {
    let started = Instant::now();
    let release = synthetic_release()?;
    println!("synthetic release ready in {:.1} s", started.elapsed().as_secs_f64());
    let mut specs = vec![TerminologySpec {
        name: "sct".into(),
        kind: SourceKind::SnomedRf2,
        path: release,
    }];
    let (xml, _) = icd10cm_release();
    let icd = xml.exists();
    if icd {
        specs.push(TerminologySpec {
            name: "icd".into(),
            kind: SourceKind::Icd10cmXml,
            path: xml,
        });
    }
    let started = Instant::now();
    let terminologies = Terminologies::load(&specs)?;
    println!(
        "loaded (descriptions, hierarchy, default term sets) in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let mut cases = Vec::new();
    for (label, subset) in [
        ("SNOMED CT synthetic, whole release", None),
        ("<< 300k", Some(id(1))),
        ("<< 10k", Some(id(2))),
        ("<< 100", Some(id(3))),
    ] {
        for kind in [MatchKind::Code, MatchKind::Term] {
            cases.push(Case {
                label: label.to_string(),
                terminology: "sct",
                subset: subset.clone().map(|s| format!("<< {s}")),
                kind,
            });
        }
    }
    if icd {
        for (label, subset) in [
            ("ICD-10-CM 2026, whole release", None),
            ("chapter:19 (S00-T88)", Some("chapter:19")),
            ("I20-I25", Some("I20-I25")),
            ("E11.6", Some("E11.6")),
        ] {
            cases.push(Case {
                label: label.to_string(),
                terminology: "icd",
                subset: subset.map(String::from),
                kind: MatchKind::Code,
            });
        }
    } else {
        println!("(ICD-10-CM rows skipped: run scripts/setup.sh to install the 2026 release)");
    }

    println!("\n### subsets: compile (this machine)\n");
    println!("| subset | match | members | strings | first compile (s) | from cache (us) | automaton (KB) |");
    println!("|---|---|---|---|---|---|---|");
    let mut compiled = Vec::new();
    for case in &cases {
        let strings = strings(&terminologies, case)?;
        let (set, first, cached) = compile(&terminologies, case)?;
        let members = if case.kind == MatchKind::Code {
            strings.len()
        } else {
            strings.len() / 2
        };
        // The whole release's sets are compiled while it loads; time a fresh compile instead.
        let first = if case.subset.is_none() {
            let started = Instant::now();
            TermSet::new(&strings);
            started.elapsed()
        } else {
            first
        };
        println!(
            "| {} | {:?} | {members} | {} | {:.3} | {:.0} | {:.0} |",
            case.label,
            case.kind,
            set.len(),
            first.as_secs_f64(),
            cached.as_secs_f64() * 1e6,
            set.heap_bytes() as f64 / 1e3
        );
        compiled.push((set, strings, members));
    }

    let cache = distill_serve::paths::setup_cache_dir().join("bench-vocab");
    let words = tiktoken(&cache.join("cl100k_base.tiktoken"))?;
    let trie = Arc::new(TokenTrie::from_token_bytes(words.clone()));
    println!("\n### subsets: mask per sequence step, cl100k_base, microseconds\n");
    println!("| subset | members | match | steps | median | p99 | single-run median | single-run p99 |");
    println!("|---|---|---|---|---|---|---|---|");
    for (i, (case, (set, strings, members))) in cases.iter().zip(&compiled).enumerate() {
        let answers = sample(strings, 50, i as u64);
        println!("{}", mask_row(case, *members, set, &trie, &answers));
    }

    println!("\n### subsets: the same terms in llguidance (Lark alternation), cl100k_base, single runs\n");
    println!("| subset | engine | compile | per-request setup (us) | mask median (us) | mask p99 (us) |");
    println!("|---|---|---|---|---|---|");
    for (case, (_, strings, _)) in cases.iter().zip(&compiled) {
        if case.terminology != "sct" || case.kind != MatchKind::Term || case.subset.is_none() {
            continue;
        }
        let answers = sample(strings, 20, 99);
        println!("{}", llguidance_side_by_side(&case.label, strings, &words, &answers));
    }
    Ok(())
}

//! Augmentation of the ICD-10-CM coding dataset: new training phrasings made from the training
//! phrases by the conventions of the classification itself — `, unspecified` / `NOS`, the
//! nonessential modifiers in parentheses, the abbreviations in square brackets — and by entity
//! substitution between sibling codes (codes whose descriptions differ in one short span, such
//! as `right`/`left` or `Type 1`/`Type 2 diabetes mellitus`, trade that span in each other's
//! inclusion terms). No generated phrase equals a held-out one: the evaluation stays on
//! phrasings the student never trained on.

use std::collections::{BTreeMap, HashMap, HashSet};

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::dataset::{Dataset, Pair};
use crate::constrain::Terminology;

/// Clinical abbreviations with the long form the classification writes, beside the ones its
/// own square brackets define (`Body mass index [BMI]`).
const ABBREVIATIONS: [(&str, &str); 10] = [
    ("diabetes mellitus", "DM"),
    ("hypertension", "HTN"),
    ("chronic obstructive pulmonary disease", "COPD"),
    ("myocardial infarction", "MI"),
    ("chronic kidney disease", "CKD"),
    ("atrial fibrillation", "AF"),
    ("respiratory syncytial virus", "RSV"),
    ("heart failure", "HF"),
    ("deep vein thrombosis", "DVT"),
    ("pulmonary embolism", "PE"),
];

/// The longest span (in words) entity substitution trades between two sibling descriptions.
const MAX_SPAN_WORDS: usize = 4;

/// What augmentation made and what it left out.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AugmentReport {
    /// Phrasings kept, by rule.
    pub unspecified: usize,
    pub modifiers: usize,
    pub abbreviations: usize,
    pub substitutions: usize,
    /// Generated phrasings equal to a held-out phrase (dropped).
    pub dropped_held_out: usize,
    /// Generated phrasings already in the dataset, or made for two codes (dropped).
    pub dropped_known_or_ambiguous: usize,
    /// Dropped by the per-code cap.
    pub dropped_cap: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Rule {
    Unspecified,
    Modifiers,
    Abbreviations,
    Substitutions,
}

/// New training pairs for `d` (built from `terminology`), at most `per_code` for each code,
/// drawn with `seed`.
pub fn augment(terminology: &Terminology, d: &Dataset, per_code: usize, seed: u64) -> (Vec<Pair>, AugmentReport) {
    let mut report = AugmentReport::default();
    if per_code == 0 {
        return (Vec::new(), report);
    }
    let abbreviations = abbreviation_table(terminology);
    let mut candidates: Vec<(Rule, Pair)> = Vec::new();
    for p in &d.train {
        let mut add = |rule, phrase: String| {
            candidates.push((
                rule,
                Pair {
                    phrase,
                    code: p.code.clone(),
                },
            ))
        };
        for v in unspecified_forms(&p.phrase) {
            add(Rule::Unspecified, v);
        }
        for v in modifier_forms(&p.phrase) {
            add(Rule::Modifiers, v);
        }
        for v in abbreviated_forms(&p.phrase, &abbreviations) {
            add(Rule::Abbreviations, v);
        }
    }
    candidates.extend(
        substitutions(terminology, d)
            .into_iter()
            .map(|p| (Rule::Substitutions, p)),
    );

    let held_out: HashSet<String> = d.held_out.iter().map(|p| key(&p.phrase)).collect();
    let known: HashSet<String> = d.train.iter().map(|p| key(&p.phrase)).collect();
    let mut codes_of: HashMap<String, HashSet<&str>> = HashMap::new();
    for (_, p) in &candidates {
        codes_of.entry(key(&p.phrase)).or_default().insert(&p.code);
    }
    let mut by_code: BTreeMap<&str, Vec<(Rule, &Pair)>> = BTreeMap::new();
    let mut seen = HashSet::new();
    for (rule, p) in &candidates {
        let k = key(&p.phrase);
        if held_out.contains(&k) {
            report.dropped_held_out += 1;
        } else if known.contains(&k) || codes_of[&k].len() > 1 {
            report.dropped_known_or_ambiguous += 1;
        } else if seen.insert(k) {
            by_code.entry(&p.code).or_default().push((*rule, p));
        }
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::new();
    for (_, mut pairs) in by_code {
        pairs.shuffle(&mut rng);
        report.dropped_cap += pairs.len().saturating_sub(per_code);
        for (rule, p) in pairs.into_iter().take(per_code) {
            *match rule {
                Rule::Unspecified => &mut report.unspecified,
                Rule::Modifiers => &mut report.modifiers,
                Rule::Abbreviations => &mut report.abbreviations,
                Rule::Substitutions => &mut report.substitutions,
            } += 1;
            out.push(p.clone());
        }
    }
    (out, report)
}

/// Case- and space-insensitive identity of a phrase.
fn key(phrase: &str) -> String {
    phrase.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

/// Tidies spaces left by removals: single spaces, none before a comma, none at the ends.
fn tidy(phrase: &str) -> String {
    phrase
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace(" ,", ",")
}

fn capitalise(s: &str) -> String {
    let mut chars = s.chars();
    chars
        .next()
        .map(|c| c.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

/// The classification's two ways of saying "unspecified": `X, unspecified` and `Unspecified X`
/// are `X NOS`; so are `X, uncomplicated` and `X without complications`; `X NOS` is
/// `X, unspecified`.
fn unspecified_forms(phrase: &str) -> Vec<String> {
    let mut out = Vec::new();
    for suffix in [", unspecified", ", uncomplicated", " without complications"] {
        if let Some(base) = phrase.strip_suffix(suffix) {
            out.push(format!("{base} NOS"));
        }
    }
    if let Some(rest) = phrase.strip_prefix("Unspecified ") {
        out.push(format!("{} NOS", capitalise(rest)));
    }
    if let Some(base) = phrase.strip_suffix(" NOS") {
        out.push(format!("{base}, unspecified"));
    }
    out
}

/// Nonessential modifiers (in parentheses) may be left out or written inline; square brackets
/// hold alternative wording that may be left out.
fn modifier_forms(phrase: &str) -> Vec<String> {
    let mut out = Vec::new();
    if phrase.contains('(') {
        out.push(tidy(&remove_groups(phrase, '(', ')')));
        out.push(tidy(&phrase.replace(['(', ')'], "")));
    }
    if phrase.contains('[') {
        out.push(tidy(&remove_groups(phrase, '[', ']')));
    }
    out.retain(|v| !v.is_empty() && v != phrase);
    out
}

fn remove_groups(phrase: &str, open: char, close: char) -> String {
    let mut out = String::new();
    let mut depth = 0usize;
    for c in phrase.chars() {
        if c == open {
            depth += 1;
        } else if c == close {
            depth = depth.saturating_sub(1);
        } else if depth == 0 {
            out.push(c);
        }
    }
    out
}

/// Long form → abbreviation: the fixed list, and every `words [ABBR]` of the release whose
/// words' initials spell the abbreviation.
fn abbreviation_table(terminology: &Terminology) -> Vec<(String, String)> {
    let mut table: BTreeMap<String, String> = ABBREVIATIONS
        .iter()
        .map(|(long, short)| (long.to_string(), short.to_string()))
        .collect();
    for e in &terminology.entries {
        for phrase in std::iter::once(&e.description).chain(&e.synonyms) {
            for (long, short) in bracketed_abbreviations(phrase) {
                table.entry(long).or_insert(short);
            }
        }
    }
    table.into_iter().collect()
}

fn bracketed_abbreviations(phrase: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = phrase;
    while let Some(open) = rest.find('[') {
        let Some(close) = rest[open..].find(']').map(|c| open + c) else {
            break;
        };
        let short = &rest[open + 1..close];
        let letters = short.len();
        if (2..=6).contains(&letters) && short.chars().all(|c| c.is_ascii_uppercase()) {
            let words: Vec<&str> = rest[..open].split_whitespace().collect();
            if words.len() >= letters {
                let long = &words[words.len() - letters..];
                let initials: String = long.iter().filter_map(|w| w.chars().next()).collect();
                if initials.eq_ignore_ascii_case(short) {
                    out.push((long.join(" ").to_lowercase(), short.to_string()));
                }
            }
        }
        rest = &rest[close + 1..];
    }
    out
}

/// The phrase with one long form written as its abbreviation, or one abbreviation spelt out.
fn abbreviated_forms(phrase: &str, table: &[(String, String)]) -> Vec<String> {
    if phrase.contains('[') {
        return Vec::new();
    }
    let lower = phrase.to_lowercase();
    let mut out = Vec::new();
    for (long, short) in table {
        if let Some(at) = find_words(&lower, long) {
            out.push(tidy(&format!("{}{short}{}", &phrase[..at], &phrase[at + long.len()..])));
        } else if let Some(at) = find_words(phrase, short) {
            out.push(tidy(&format!("{}{long}{}", &phrase[..at], &phrase[at + short.len()..])));
        }
    }
    out
}

/// Byte offset of `needle` in `haystack` as whole words.
fn find_words(haystack: &str, needle: &str) -> Option<usize> {
    let is_word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric());
    haystack.match_indices(needle).map(|(at, _)| at).find(|&at| {
        !is_word(haystack[..at].chars().next_back()) && !is_word(haystack[at + needle.len()..].chars().next())
    })
}

/// Entity substitution: two codes of one category, or of one chapter with the same
/// subdivision (`E10.21`, `E11.21`), whose descriptions differ in one span of at most
/// [`MAX_SPAN_WORDS`] words trade that span in each other's training inclusion terms.
fn substitutions(terminology: &Terminology, d: &Dataset) -> Vec<Pair> {
    let descriptions: HashMap<&str, Vec<&str>> = terminology
        .entries
        .iter()
        .filter(|e| d.codes.contains(&e.code))
        .map(|e| (e.code.as_str(), e.description.split_whitespace().collect()))
        .collect();
    let mut inclusions: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for p in &d.train {
        let is_description = descriptions
            .get(p.code.as_str())
            .is_some_and(|w| key(&w.join(" ")) == key(&p.phrase));
        if !is_description {
            inclusions.entry(&p.code).or_default().push(&p.phrase);
        }
    }
    let mut groups: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for code in descriptions.keys() {
        groups.entry(code.chars().take(3).collect()).or_default().push(code);
        if let (Some(letter), Some((_, sub))) = (code.chars().next(), code.split_once('.')) {
            groups.entry(format!("{letter}*.{sub}")).or_default().push(code);
        }
    }
    let mut out = Vec::new();
    for codes in groups.values() {
        for &a in codes {
            let Some(phrases) = inclusions.get(a) else {
                continue;
            };
            for &b in codes.iter().filter(|&&b| b != a) {
                let Some((from, to)) = differing_span(&descriptions[a], &descriptions[b]) else {
                    continue;
                };
                for phrase in phrases {
                    if let Some(at) = find_words(phrase, &from) {
                        out.push(Pair {
                            phrase: tidy(&format!("{}{to}{}", &phrase[..at], &phrase[at + from.len()..])),
                            code: b.to_string(),
                        });
                    }
                }
            }
        }
    }
    out
}

/// The one span in which two descriptions differ, when both sides are short and they share
/// at least two words around it.
fn differing_span(a: &[&str], b: &[&str]) -> Option<(String, String)> {
    let prefix = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let suffix = a[prefix..]
        .iter()
        .rev()
        .zip(b[prefix..].iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    let (from, to) = (&a[prefix..a.len() - suffix], &b[prefix..b.len() - suffix]);
    let short = |s: &[&str]| (1..=MAX_SPAN_WORDS).contains(&s.len());
    (short(from) && short(to) && prefix + suffix >= 2).then(|| (from.join(" "), to.join(" ")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::dataset::tests::entry;
    use crate::recipe::dataset::{DatasetSpec, build};

    #[test]
    fn the_conventions_of_the_classification_make_new_phrasings() {
        assert_eq!(unspecified_forms("Hypothyroidism, unspecified"), ["Hypothyroidism NOS"]);
        assert_eq!(unspecified_forms("Unspecified asthma"), ["Asthma NOS"]);
        assert_eq!(unspecified_forms("Myocarditis NOS"), ["Myocarditis, unspecified"]);
        assert_eq!(
            modifier_forms("Chronic (interstitial) myocarditis"),
            ["Chronic myocarditis", "Chronic interstitial myocarditis"]
        );
        assert_eq!(
            modifier_forms("Multiple endocrine neoplasia [MEN] type I"),
            ["Multiple endocrine neoplasia type I"]
        );
        assert_eq!(
            bracketed_abbreviations("Multiple endocrine neoplasia [MEN] type I, and Body mass index [BMI] 40"),
            [
                ("multiple endocrine neoplasia".to_string(), "MEN".to_string()),
                ("body mass index".to_string(), "BMI".to_string())
            ]
        );
        let table = vec![("respiratory syncytial virus".to_string(), "RSV".to_string())];
        assert_eq!(
            abbreviated_forms("Acute bronchitis due to respiratory syncytial virus", &table),
            ["Acute bronchitis due to RSV"]
        );
        assert_eq!(
            abbreviated_forms("RSV pneumonia", &table),
            ["respiratory syncytial virus pneumonia"]
        );
        assert!(abbreviated_forms("RSVP pneumonia", &table).is_empty());
        assert_eq!(
            differing_span(
                &["Type", "1", "diabetes", "mellitus", "with", "ketoacidosis"],
                &["Type", "2", "diabetes", "mellitus", "with", "ketoacidosis"]
            ),
            Some(("1".to_string(), "2".to_string()))
        );
        assert_eq!(differing_span(&["Asthma"], &["Reflux"]), None);
    }

    #[test]
    fn siblings_trade_spans_and_no_held_out_phrase_is_ever_generated() {
        let t = Terminology::new(
            "test",
            vec![
                entry(
                    "E10.21",
                    "Type 1 diabetes mellitus with diabetic nephropathy",
                    &[
                        "Type 1 diabetes mellitus with intercapillary glomerulosclerosis",
                        "Type 1 diabetes mellitus with Kimmelstiel-Wilson disease",
                    ],
                ),
                entry(
                    "E11.21",
                    "Type 2 diabetes mellitus with diabetic nephropathy",
                    &[
                        "Type 2 diabetes mellitus with Kimmelstiel-Wilson disease",
                        "Type 2 diabetes mellitus with intercapillary glomerulosclerosis",
                    ],
                ),
                entry("E03.9", "Hypothyroidism, unspecified", &["Myxedema NOS"]),
            ],
        );
        let spec = DatasetSpec {
            prefixes: vec!["E".into()],
            max_codes: None,
            seed: 0,
            augment_per_code: 8,
        };
        let d = build(&t, &spec);
        let (pairs, report) = augment(&t, &d, 8, 0);
        let made: Vec<(&str, &str)> = pairs.iter().map(|p| (p.code.as_str(), p.phrase.as_str())).collect();
        // E10.21's training term becomes E11.21's held-out term, which is dropped; E11.21's
        // becomes E10.21's held-out term likewise. The description rules still apply.
        assert!(made.contains(&("E03.9", "Hypothyroidism NOS")), "{made:?}");
        assert!(
            made.contains(&("E10.21", "Type 1 DM with diabetic nephropathy")),
            "{made:?}"
        );
        assert_eq!(report.substitutions, 0, "{made:?}");
        assert_eq!(report.dropped_held_out, 2, "{report:?}");
        let held: HashSet<String> = d.held_out.iter().map(|p| key(&p.phrase)).collect();
        assert!(pairs.iter().all(|p| !held.contains(&key(&p.phrase))));
        assert_eq!(augment(&t, &d, 0, 0).0, Vec::new());
    }
}

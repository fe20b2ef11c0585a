//! The ICD-10-CM coding dataset: clinical phrases (descriptions and inclusion terms) to their
//! billable codes, in a short chat format. One inclusion term of each code that has any is held
//! out, so the evaluation asks for phrases the student never trained on.

use std::collections::BTreeSet;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::constrain::Terminology;
use crate::distill::job::PromptInput;
use crate::tokenize::ChatMessage;

/// The question every prompt asks.
pub const QUESTION: &str = "ICD-10-CM code for: ";

/// What goes into the dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetSpec {
    /// Code prefixes to keep (`E`, `I10`, ...); every billable code when empty.
    pub prefixes: Vec<String>,
    /// At most this many codes (chosen at random with `seed`); all when `None`.
    pub max_codes: Option<usize>,
    pub seed: u64,
    /// At most this many augmented phrasings per code join the training pairs
    /// ([`super::augment`]); none when 0.
    #[serde(default)]
    pub augment_per_code: usize,
}

/// One phrase and its code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pair {
    pub phrase: String,
    pub code: String,
}

impl Pair {
    /// The prompt the student answers, with the code as its label.
    pub fn prompt(&self) -> PromptInput {
        PromptInput {
            prompt: None,
            messages: Some(vec![ChatMessage {
                role: "user".into(),
                content: format!("{QUESTION}{}", self.phrase),
            }]),
            label: Some(self.code.clone()),
        }
    }
}

/// Training and held-out pairs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Dataset {
    pub train: Vec<Pair>,
    pub held_out: Vec<Pair>,
    /// The codes the dataset covers.
    pub codes: BTreeSet<String>,
}

/// Builds the dataset from the billable entries of `terminology`: each description is a
/// training pair; of each code's inclusion terms the last is held out and the others train.
/// A phrase that names two codes is dropped (it has no single answer).
pub fn build(terminology: &Terminology, spec: &DatasetSpec) -> Dataset {
    let mut entries: Vec<_> = terminology
        .entries
        .iter()
        .filter(|e| e.billable)
        .filter(|e| spec.prefixes.is_empty() || spec.prefixes.iter().any(|p| e.code.starts_with(p.as_str())))
        .collect();
    if let Some(max) = spec.max_codes
        && entries.len() > max
    {
        entries.shuffle(&mut ChaCha8Rng::seed_from_u64(spec.seed));
        entries.truncate(max);
        entries.sort_by(|a, b| a.code.cmp(&b.code));
    }
    let mut seen = std::collections::HashMap::<String, usize>::new();
    for e in &entries {
        for phrase in std::iter::once(&e.description).chain(&e.synonyms) {
            *seen.entry(phrase.to_lowercase()).or_default() += 1;
        }
    }
    let unique = |p: &String| seen.get(&p.to_lowercase()) == Some(&1);
    let mut d = Dataset::default();
    for e in entries {
        d.codes.insert(e.code.clone());
        let pair = |phrase: &String| Pair {
            phrase: phrase.clone(),
            code: e.code.clone(),
        };
        if unique(&e.description) {
            d.train.push(pair(&e.description));
        }
        let synonyms: Vec<&String> = e.synonyms.iter().filter(|s| unique(s)).collect();
        if let Some((last, rest)) = synonyms.split_last() {
            d.train.extend(rest.iter().map(|s| pair(s)));
            d.held_out.push(pair(last));
        }
    }
    d
}

/// Text to train the tokenizer on: every phrase and code of the dataset.
pub fn corpus(d: &Dataset) -> String {
    let mut out = String::new();
    for p in d.train.iter().chain(&d.held_out) {
        out.push_str(QUESTION);
        out.push_str(&p.phrase);
        out.push('\n');
        out.push_str(&p.code);
        out.push('\n');
    }
    out
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::constrain::Entry;

    /// A billable entry, for the recipe's tests.
    pub(in crate::recipe) fn entry(code: &str, description: &str, synonyms: &[&str]) -> Entry {
        Entry {
            code: code.into(),
            description: description.into(),
            synonyms: synonyms.iter().map(|s| s.to_string()).collect(),
            billable: true,
        }
    }

    #[test]
    fn held_out_terms_never_train_and_ambiguous_phrases_are_dropped() {
        let t = Terminology::new(
            "test",
            vec![
                entry(
                    "E11.9",
                    "Type 2 diabetes mellitus without complications",
                    &["Diabetes NOS", "Type 2 DM"],
                ),
                entry("I10", "Essential (primary) hypertension", &["High blood pressure"]),
                entry("J45.909", "Unspecified asthma, uncomplicated", &["Diabetes NOS"]),
                entry("K21.9", "Reflux", &[]),
            ],
        );
        let spec = DatasetSpec {
            prefixes: vec!["E".into(), "I".into(), "J".into()],
            max_codes: None,
            seed: 0,
            augment_per_code: 0,
        };
        let d = build(&t, &spec);
        let phrases = |ps: &[Pair]| ps.iter().map(|p| p.phrase.clone()).collect::<Vec<_>>();
        assert_eq!(
            phrases(&d.train),
            [
                "Type 2 diabetes mellitus without complications",
                "Essential (primary) hypertension",
                "Unspecified asthma, uncomplicated"
            ]
        );
        assert_eq!(phrases(&d.held_out), ["Type 2 DM", "High blood pressure"]);
        assert_eq!(d.codes.len(), 3);
        let prompt = d.held_out[0].prompt();
        assert_eq!(prompt.label.as_deref(), Some("E11.9"));
        assert!(corpus(&d).contains("ICD-10-CM code for: Type 2 DM\nE11.9\n"));
    }
}

//! The terminologies a server has loaded, and the term sets compiled from them, built once per
//! (terminology, what to match) and shared by every request.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::automaton::TermSet;
use super::coverage::{CodeShape, Coverage, coverage};
use super::subset::Subset;
use super::terminology::{LoadError, Terminology, TerminologyStats};
use super::{SnomedOptions, SourceKind, load};

/// What an answer may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MatchKind {
    /// A code (`E11.9`).
    #[default]
    Code,
    /// A description or synonym.
    Term,
    /// Either.
    CodeOrTerm,
}

/// How codes are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CodeFormat {
    /// As the release writes them (`E11.9`).
    #[default]
    Dotted,
    /// Without the dot (`E119`).
    Compact,
    /// Either.
    Both,
}

/// A request's constraint, as the API takes it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConstraintRequest {
    /// Name of a loaded terminology.
    pub terminology: String,
    #[serde(default, rename = "match")]
    pub match_kind: MatchKind,
    /// Most items in the answer (default 1).
    #[serde(default = "one")]
    pub max_items: usize,
    /// Between items (default `", "`).
    #[serde(default = "comma")]
    pub separator: String,
    #[serde(default)]
    pub code_format: CodeFormat,
    /// Only billable (leaf) codes, and their terms (default true).
    #[serde(default = "yes")]
    pub billable_only: bool,
    /// Apply only after this text is generated (`"</think>"` for reasoning students).
    #[serde(default)]
    pub after: Option<String>,
    /// Only codes in these ICD-10-CM categories and ranges (`"I20-I25, E11"`, or a list).
    #[serde(default)]
    pub subset: Option<SubsetText>,
}

/// A subset as a request writes it: one string of comma-separated parts, or a list of parts.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum SubsetText {
    One(String),
    Many(Vec<String>),
}

impl SubsetText {
    /// The parts as one comma-separated string.
    pub fn joined(&self) -> String {
        match self {
            SubsetText::One(text) => text.clone(),
            SubsetText::Many(parts) => parts.join(","),
        }
    }
}

impl ConstraintRequest {
    /// A constraint to one code of `terminology`, every other setting at its default.
    pub fn new(terminology: impl Into<String>) -> Self {
        Self {
            terminology: terminology.into(),
            match_kind: MatchKind::default(),
            max_items: one(),
            separator: comma(),
            code_format: CodeFormat::default(),
            billable_only: yes(),
            after: None,
            subset: None,
        }
    }
}

fn one() -> usize {
    1
}

fn comma() -> String {
    ", ".into()
}

fn yes() -> bool {
    true
}

/// A terminology to load at start-up: `NAME=KIND:PATH` (e.g. `icd10cm=icd10cm-xml:/data/icd.xml`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct TerminologySpec {
    pub name: String,
    pub kind: SourceKind,
    pub path: PathBuf,
}

impl FromStr for TerminologySpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let usage = || format!("`{s}`: expected NAME=KIND:PATH (kinds: icd10cm-xml, icd10cm-order, snomed-rf2, tsv)");
        let (name, rest) = s.split_once('=').ok_or_else(usage)?;
        let (kind, path) = rest.split_once(':').ok_or_else(usage)?;
        let kind = <SourceKind as clap::ValueEnum>::from_str(kind, true).map_err(|_| usage())?;
        if name.is_empty() || path.is_empty() {
            return Err(usage());
        }
        Ok(Self {
            name: name.to_string(),
            kind,
            path: PathBuf::from(path),
        })
    }
}

impl TryFrom<String> for TerminologySpec {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<TerminologySpec> for String {
    fn from(spec: TerminologySpec) -> String {
        let kind = clap::ValueEnum::to_possible_value(&spec.kind)
            .map(|v| v.get_name().to_string())
            .unwrap_or_default();
        format!("{}={kind}:{}", spec.name, spec.path.display())
    }
}

/// Why a constraint cannot be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConstraintError {
    #[error("unknown terminology `{name}` (loaded: {loaded})")]
    UnknownTerminology { name: String, loaded: String },
    #[error("{0}")]
    Invalid(String),
}

/// (what to match, code format, billable only, JSON-quoted, subset)
type SetKey = (MatchKind, CodeFormat, bool, bool, Option<Subset>);

/// Most subset term sets kept compiled per terminology; past it they are compiled afresh.
const MAX_CACHED_SUBSETS: usize = 256;

struct Loaded {
    spec: TerminologySpec,
    terminology: Terminology,
    shape: CodeShape,
    sets: Mutex<HashMap<SetKey, Arc<TermSet>>>,
}

/// One loaded terminology, as the admin API lists it.
#[derive(Debug, Clone, Serialize)]
pub struct TerminologySummary {
    pub name: String,
    pub kind: SourceKind,
    pub path: PathBuf,
    pub stats: TerminologyStats,
}

/// Every terminology the server loaded.
#[derive(Default)]
pub struct Terminologies {
    loaded: BTreeMap<String, Loaded>,
}

impl Terminologies {
    /// Loads `specs` and compiles the default term sets of each.
    pub fn load(specs: &[TerminologySpec]) -> Result<Self, LoadError> {
        let mut loaded = BTreeMap::new();
        for spec in specs {
            let terminology = load(spec.kind, &spec.path, &SnomedOptions::default())?;
            loaded.insert(
                spec.name.clone(),
                Loaded {
                    spec: spec.clone(),
                    shape: CodeShape::of(&terminology),
                    terminology,
                    sets: Mutex::default(),
                },
            );
        }
        let all = Self { loaded };
        for name in all.loaded.keys() {
            for kind in [MatchKind::Code, MatchKind::Term, MatchKind::CodeOrTerm] {
                let _ = all.term_set(name, kind, CodeFormat::default(), true);
            }
        }
        Ok(all)
    }

    /// What is loaded.
    pub fn summaries(&self) -> Vec<TerminologySummary> {
        self.loaded
            .iter()
            .map(|(name, l)| TerminologySummary {
                name: name.clone(),
                kind: l.spec.kind,
                path: l.spec.path.clone(),
                stats: l.terminology.stats(),
            })
            .collect()
    }

    /// The terminology named `name`.
    pub fn get(&self, name: &str) -> Option<&Terminology> {
        self.loaded.get(name).map(|l| &l.terminology)
    }

    fn loaded(&self, name: &str) -> Result<&Loaded, ConstraintError> {
        self.loaded
            .get(name)
            .ok_or_else(|| ConstraintError::UnknownTerminology {
                name: name.to_string(),
                loaded: if self.loaded.is_empty() {
                    "none".into()
                } else {
                    self.loaded.keys().cloned().collect::<Vec<_>>().join(", ")
                },
            })
    }

    /// The code mentions of `text` checked against terminology `name`.
    pub fn coverage(&self, name: &str, text: &str) -> Result<Coverage, ConstraintError> {
        let loaded = self.loaded(name)?;
        Ok(coverage(&loaded.terminology, &loaded.shape, text))
    }

    /// The compiled set of what `kind` allows from terminology `name`.
    pub fn term_set(
        &self,
        name: &str,
        kind: MatchKind,
        format: CodeFormat,
        billable_only: bool,
    ) -> Result<Arc<TermSet>, ConstraintError> {
        self.compiled(name, (kind, format, billable_only, false, None))
    }

    /// As [`Terminologies::term_set`] (JSON-quoted when `quoted`), limited to the codes of
    /// `subset` (ICD-10-CM only).
    pub fn subset_term_set(
        &self,
        name: &str,
        (kind, format, billable_only, quoted): (MatchKind, CodeFormat, bool, bool),
        subset: &Subset,
    ) -> Result<Arc<TermSet>, ConstraintError> {
        let loaded = self.loaded(name)?;
        if !matches!(loaded.spec.kind, SourceKind::Icd10cmXml | SourceKind::Icd10cmOrder) {
            return Err(ConstraintError::Invalid(format!(
                "subsets are ranges of ICD-10-CM codes; terminology `{name}` is not ICD-10-CM"
            )));
        }
        let subset = subset.clone().resolve(&loaded.terminology)?;
        self.compiled(name, (kind, format, billable_only, quoted, Some(subset)))
    }

    /// As [`Terminologies::term_set`], each string as a JSON string literal (`"E11.9"`), for
    /// structured output.
    pub fn quoted_term_set(
        &self,
        name: &str,
        kind: MatchKind,
        format: CodeFormat,
        billable_only: bool,
    ) -> Result<Arc<TermSet>, ConstraintError> {
        self.compiled(name, (kind, format, billable_only, true, None))
    }

    fn compiled(&self, name: &str, key: SetKey) -> Result<Arc<TermSet>, ConstraintError> {
        let (kind, format, billable_only, quoted, subset) = key.clone();
        let loaded = self.loaded(name)?;
        let mut sets = loaded.sets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(set) = sets.get(&key) {
            return Ok(Arc::clone(set));
        }
        let entries = loaded
            .terminology
            .entries
            .iter()
            .filter(|e| e.billable || !billable_only)
            .filter(|e| subset.as_ref().is_none_or(|s| s.contains(&e.code)));
        let mut strings: Vec<String> = Vec::new();
        for e in entries {
            if kind != MatchKind::Term {
                if format != CodeFormat::Compact {
                    strings.push(e.code.clone());
                }
                if format != CodeFormat::Dotted {
                    strings.push(e.code.replace('.', ""));
                }
            }
            if kind != MatchKind::Code {
                strings.push(e.description.clone());
                strings.extend(e.synonyms.iter().cloned());
            }
        }
        if quoted {
            strings = strings
                .iter()
                .map(|s| serde_json::to_string(s).unwrap_or_else(|_| format!("\"{s}\"")))
                .collect();
        }
        let set = Arc::new(TermSet::new(strings));
        if set.is_empty() {
            let what = if subset.is_some() { " in this subset" } else { "" };
            return Err(ConstraintError::Invalid(format!(
                "terminology `{name}` has nothing{what} to match as {kind:?}"
            )));
        }
        if subset.is_some() && sets.len() >= MAX_CACHED_SUBSETS {
            sets.retain(|k, _| k.4.is_none());
        }
        sets.insert(key, Arc::clone(&set));
        Ok(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print_back() {
        let spec: TerminologySpec = "icd10cm=icd10cm-xml:/data/icd.xml".parse().unwrap();
        assert_eq!(spec.kind, SourceKind::Icd10cmXml);
        assert_eq!(String::from(spec.clone()), "icd10cm=icd10cm-xml:/data/icd.xml");
        for bad in ["icd10cm", "x=unknown:/p", "=tsv:/p", "x=tsv:"] {
            assert!(bad.parse::<TerminologySpec>().is_err(), "{bad}");
        }
    }
}

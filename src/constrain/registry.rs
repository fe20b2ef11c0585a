//! The terminologies a server has loaded, and the term sets compiled from them, built once per
//! (terminology, what to match) and shared by every request.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};

use super::automaton::TermSet;
use super::coverage::{CodeShape, Coverage, coverage};
use super::ecl::Ecl;
use super::subset::Subset;
use super::terminology::{LoadError, Release, Terminology, TerminologyStats};
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
    /// Only codes in this subset: ICD-10-CM categories, ranges and chapters (`"I20-I25, E11"`),
    /// or a SNOMED CT expression constraint (`"<< 404684003"`); a list is their union.
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

/// (what to match, code format, billable only, JSON-quoted, normalised subset)
type SetKey = (MatchKind, CodeFormat, bool, bool, Option<String>);

/// Most subset term sets kept compiled per terminology; past it they are compiled afresh.
const MAX_CACHED_SUBSETS: usize = 256;

/// One loaded release and the term sets compiled from it.
struct Loaded {
    spec: TerminologySpec,
    terminology: Arc<Terminology>,
    /// Counted once at load: summaries are read on request paths (FHIR, classification).
    stats: TerminologyStats,
    shape: CodeShape,
    sets: Mutex<HashMap<SetKey, Arc<TermSet>>>,
}

impl Loaded {
    fn new(spec: TerminologySpec) -> Result<Self, LoadError> {
        let terminology = load(spec.kind, &spec.path, &SnomedOptions::default())?;
        let loaded = Self {
            spec,
            stats: terminology.stats(),
            shape: CodeShape::of(&terminology),
            terminology: Arc::new(terminology),
            sets: Mutex::default(),
        };
        // The sets requests ask for most, compiled before the release serves.
        for kind in [MatchKind::Code, MatchKind::Term, MatchKind::CodeOrTerm] {
            let _ = loaded.compiled("", (kind, CodeFormat::default(), true, false, None), None);
        }
        Ok(loaded)
    }

    fn provenance(&self, name: &str, subset: Option<String>) -> Provenance {
        Provenance {
            terminology: name.to_string(),
            release: self.terminology.release.version.clone(),
            subset,
        }
    }

    fn compiled(&self, name: &str, key: SetKey, subset: Option<&Selection>) -> Result<Arc<TermSet>, ConstraintError> {
        let (kind, format, billable_only, quoted, _) = key.clone();
        let mut sets = self.sets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(set) = sets.get(&key) {
            return Ok(Arc::clone(set));
        }
        let members = subset.map(|s| s.members(&self.terminology)).transpose()?;
        let entries = self
            .terminology
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.billable || !billable_only)
            .filter(|(i, _)| members.as_ref().is_none_or(|m| m[*i]))
            .map(|(_, e)| e);
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

    /// Parses `text` as this terminology's kind of subset.
    fn selection(&self, name: &str, text: &SubsetText) -> Result<Selection, ConstraintError> {
        match self.spec.kind {
            SourceKind::Icd10cmXml | SourceKind::Icd10cmOrder => Ok(Selection::Icd(
                Subset::parse(&text.joined())?.resolve(&self.terminology)?,
            )),
            SourceKind::SnomedRf2 => {
                let expression = match text {
                    SubsetText::One(one) => one.clone(),
                    SubsetText::Many(parts) => parts.iter().map(|p| format!("({p})")).collect::<Vec<_>>().join(" OR "),
                };
                if self.terminology.hierarchy.is_none() {
                    return Err(ConstraintError::Invalid(format!(
                        "terminology `{name}` was loaded without its hierarchy: load the RF2 release folder \
                         (with sct2_Relationship_Snapshot) to use ECL"
                    )));
                }
                Ok(Selection::Ecl(Ecl::parse(&expression)?))
            }
            SourceKind::Tsv => Err(ConstraintError::Invalid(format!(
                "subsets are ICD-10-CM ranges or SNOMED CT ECL; terminology `{name}` is a plain list"
            ))),
        }
    }
}

/// A parsed subset of one terminology.
#[derive(Debug, Clone)]
enum Selection {
    Icd(Subset),
    Ecl(Ecl),
}

impl Selection {
    /// The normalised expression: equal for equal subsets however they were written.
    fn normal(&self) -> String {
        match self {
            Selection::Icd(subset) => subset.to_string(),
            Selection::Ecl(ecl) => ecl.to_string(),
        }
    }

    /// Flags by entry of `terminology`: whether each is in the subset.
    fn members(&self, terminology: &Terminology) -> Result<Vec<bool>, ConstraintError> {
        match self {
            Selection::Icd(subset) => Ok(terminology.entries.iter().map(|e| subset.contains(&e.code)).collect()),
            Selection::Ecl(ecl) => {
                let hierarchy = terminology
                    .hierarchy
                    .as_ref()
                    .ok_or_else(|| ConstraintError::Invalid("this release has no hierarchy".into()))?;
                let concepts = ecl.evaluate(hierarchy)?;
                let mut flags = vec![false; terminology.entries.len()];
                let selected = concepts.iter().enumerate().filter(|&(_, &c)| c);
                for i in selected.filter_map(|(n, _)| hierarchy.entry(n as u32)) {
                    flags[i] = true;
                }
                Ok(flags)
            }
        }
    }
}

/// Which release (and subset) a constraint was compiled from, as its answer names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Provenance {
    /// The terminology's name on this server.
    pub terminology: String,
    /// Its release (see [`crate::constrain::Release::version`]).
    pub release: String,
    /// The subset, normalised, when the request named one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
}

/// A term set and the release it came from.
pub type Compiled = (Arc<TermSet>, Provenance);

/// One loaded terminology, as the admin API lists it.
#[derive(Debug, Clone, Serialize)]
pub struct TerminologySummary {
    pub name: String,
    pub kind: SourceKind,
    pub path: PathBuf,
    pub release: Release,
    pub stats: TerminologyStats,
}

/// Every terminology the server serves, by name. A name may be given a new release while the
/// server runs ([`Terminologies::install`]); requests already compiled keep the release they
/// were compiled from.
#[derive(Default)]
pub struct Terminologies {
    loaded: RwLock<BTreeMap<String, Arc<Loaded>>>,
}

impl Terminologies {
    /// Loads `specs` and compiles the default term sets of each.
    pub fn load(specs: &[TerminologySpec]) -> Result<Self, LoadError> {
        let mut loaded = BTreeMap::new();
        for spec in specs {
            loaded.insert(spec.name.clone(), Arc::new(Loaded::new(spec.clone())?));
        }
        Ok(Self {
            loaded: RwLock::new(loaded),
        })
    }

    /// Loads `spec` beside what is served, then serves it under its name (replacing the
    /// release that name served, if any). Returns the new release's summary and the replaced
    /// one's. Slow (it reads and compiles a release): call it off the async executor.
    pub fn install(
        &self,
        spec: TerminologySpec,
    ) -> Result<(TerminologySummary, Option<TerminologySummary>), LoadError> {
        let loaded = Arc::new(Loaded::new(spec.clone())?);
        let new = summary(&spec.name, &loaded);
        let old = self
            .loaded
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(spec.name.clone(), loaded);
        Ok((new, old.map(|old| summary(&spec.name, &old))))
    }

    /// What is loaded.
    pub fn summaries(&self) -> Vec<TerminologySummary> {
        self.read().iter().map(|(name, l)| summary(name, l)).collect()
    }

    /// The release served as `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Terminology>> {
        self.read().get(name).map(|l| Arc::clone(&l.terminology))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Loaded>>> {
        self.loaded.read().unwrap_or_else(|p| p.into_inner())
    }

    fn loaded(&self, name: &str) -> Result<Arc<Loaded>, ConstraintError> {
        let loaded = self.read();
        loaded
            .get(name)
            .cloned()
            .ok_or_else(|| ConstraintError::UnknownTerminology {
                name: name.to_string(),
                loaded: if loaded.is_empty() {
                    "none".into()
                } else {
                    loaded.keys().cloned().collect::<Vec<_>>().join(", ")
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
    ) -> Result<Compiled, ConstraintError> {
        let loaded = self.loaded(name)?;
        let set = loaded.compiled(name, (kind, format, billable_only, false, None), None)?;
        Ok((set, loaded.provenance(name, None)))
    }

    /// As [`Terminologies::term_set`] (JSON-quoted when `quoted`), limited to `subset`:
    /// ICD-10-CM codes, ranges and chapters, or a SNOMED CT expression constraint.
    pub fn subset_term_set(
        &self,
        name: &str,
        (kind, format, billable_only, quoted): (MatchKind, CodeFormat, bool, bool),
        subset: &SubsetText,
    ) -> Result<Compiled, ConstraintError> {
        let loaded = self.loaded(name)?;
        let selection = loaded.selection(name, subset)?;
        let normal = selection.normal();
        let key = (kind, format, billable_only, quoted, Some(normal.clone()));
        let set = loaded.compiled(name, key, Some(&selection))?;
        Ok((set, loaded.provenance(name, Some(normal))))
    }

    /// As [`Terminologies::term_set`], each string as a JSON string literal (`"E11.9"`), for
    /// structured output.
    pub fn quoted_term_set(
        &self,
        name: &str,
        kind: MatchKind,
        format: CodeFormat,
        billable_only: bool,
    ) -> Result<Compiled, ConstraintError> {
        let loaded = self.loaded(name)?;
        let set = loaded.compiled(name, (kind, format, billable_only, true, None), None)?;
        Ok((set, loaded.provenance(name, None)))
    }

    /// The release served as `name` and the indices of its entries in `subset` (all of them
    /// without one), in code order.
    pub fn select(&self, name: &str, subset: Option<&SubsetText>) -> Result<Selected, ConstraintError> {
        let loaded = self.loaded(name)?;
        let (members, normal) = match subset {
            None => ((0..loaded.terminology.entries.len()).collect(), None),
            Some(text) => {
                let selection = loaded.selection(name, text)?;
                let flags = selection.members(&loaded.terminology)?;
                let members = flags.iter().enumerate().filter(|(_, f)| **f).map(|(i, _)| i).collect();
                (members, Some(selection.normal()))
            }
        };
        Ok(Selected {
            provenance: loaded.provenance(name, normal),
            terminology: Arc::clone(&loaded.terminology),
            kind: loaded.spec.kind,
            members,
        })
    }
}

/// Entries of one release that a subset selects.
pub struct Selected {
    pub terminology: Arc<Terminology>,
    pub kind: SourceKind,
    /// Indices into `terminology.entries`.
    pub members: Vec<usize>,
    pub provenance: Provenance,
}

fn summary(name: &str, loaded: &Loaded) -> TerminologySummary {
    TerminologySummary {
        name: name.to_string(),
        kind: loaded.spec.kind,
        path: loaded.spec.path.clone(),
        release: loaded.terminology.release.clone(),
        stats: loaded.stats,
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

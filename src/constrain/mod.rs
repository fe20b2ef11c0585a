//! Terminology-constrained decoding: loaders for professional vocabularies (ICD-10-CM,
//! SNOMED CT, plain lists); the byte automata that keep generation inside one of them, or
//! inside a JSON schema whose fields name one; the per-sequence guide that turns them into
//! token masks; and knowledge coverage (which code mentions in a text exist).

mod automaton;
mod coverage;
mod ecl;
mod guide;
mod hierarchy;
mod icd10cm;
mod json;
mod machine;
mod registry;
mod snomed;
mod subset;
mod terminology;
mod tsv;
mod vocab;

pub use automaton::{Automaton, State, States, TermSet, TokenMask};
pub use coverage::{CodeShape, Coverage, Mention, coverage};
pub use ecl::{Ecl, HierarchyOp, MAX_ECL_BYTES};
pub use guide::Guide;
pub use hierarchy::Hierarchy;
pub use icd10cm::{load_icd10cm_order, load_icd10cm_xml};
pub use json::{JsonMachine, JsonState, JsonStates, MAX_SCHEMA_ENUM_VALUES, MAX_SCHEMA_PROPERTIES};
pub use machine::{ByteMachine, StateSet};
pub use registry::{
    CodeFormat, Compiled, ConstraintError, ConstraintRequest, MatchKind, Provenance, Selected, SubsetText,
    Terminologies, TerminologySpec, TerminologySummary,
};
pub use snomed::{DescriptionTypes, SnomedOptions, load_snomed_rf2};
pub use subset::{MAX_SUBSET_PARTS, Subset};
pub use terminology::{Entry, LoadError, Release, Terminology, TerminologyStats};
pub use tsv::load_list;
pub use vocab::{TokenTrie, token_bytes};

use std::path::Path;

/// The release formats a terminology is loaded from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceKind {
    /// CMS ICD-10-CM tabular XML (`icd10cm_tabular_*.xml`).
    Icd10cmXml,
    /// CMS ICD-10-CM order file (`icd10cm_order_*.txt`).
    Icd10cmOrder,
    /// SNOMED CT RF2 description snapshot (`sct2_Description_Snapshot-*.txt`).
    SnomedRf2,
    /// A TSV (or `.csv`) list with `code`, `term` and optionally `synonyms` columns.
    Tsv,
}

/// Loads `path` as a terminology of `kind` (`snomed` applies to RF2 files only). A release
/// that does not state its version is named by the year in its file name
/// (`icd10cm_order_2026.txt`), else by the file name.
pub fn load(kind: SourceKind, path: &Path, snomed: &SnomedOptions) -> Result<Terminology, LoadError> {
    let mut terminology = match kind {
        SourceKind::Icd10cmXml => load_icd10cm_xml(path),
        SourceKind::Icd10cmOrder => load_icd10cm_order(path),
        SourceKind::SnomedRf2 => load_snomed_rf2(path, snomed),
        SourceKind::Tsv => load_list(path),
    }?;
    if terminology.release.version.is_empty() {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let year = name
            .split(|c: char| !c.is_ascii_digit())
            .find(|digits| digits.len() == 4 && digits.starts_with("20"));
        terminology.release.version = year.unwrap_or(name).to_string();
    }
    Ok(terminology)
}

/// The ICD-10-CM release `scripts/setup.sh` installs: the CMS tabular XML and the code list.
pub fn icd10cm_release() -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = crate::paths::setup_cache_dir().join("icd10cm-2026");
    (dir.join("icd10cm_tabular_2026.xml"), dir.join("icd10cm_codes_2026.txt"))
}

//! Terminology-constrained decoding: loaders for professional vocabularies (ICD-10-CM,
//! SNOMED CT, plain lists) and, on top of them, the automata that keep generation inside a
//! vocabulary.

mod icd10cm;
mod snomed;
mod terminology;
mod tsv;

pub use icd10cm::{load_icd10cm_order, load_icd10cm_xml};
pub use snomed::{DescriptionTypes, SnomedOptions, load_snomed_rf2};
pub use terminology::{Entry, LoadError, Terminology, TerminologyStats};
pub use tsv::load_list;

/// The ICD-10-CM release `scripts/setup.sh` installs: the CMS tabular XML and the code list.
pub fn icd10cm_release() -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = crate::config::setup_cache_dir().join("icd10cm-2026");
    (dir.join("icd10cm_tabular_2026.xml"), dir.join("icd10cm_codes_2026.txt"))
}

//! A loaded terminology: codes, their descriptions and synonyms.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::hierarchy::Hierarchy;

/// One code of a terminology.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The code as the release writes it (ICD-10-CM with its dot: `E11.9`).
    pub code: String,
    /// The code's description (ICD-10-CM) or fully specified name (SNOMED CT).
    pub description: String,
    /// Other terms for the same code: inclusion terms, SNOMED CT synonyms, listed synonyms.
    pub synonyms: Vec<String>,
    /// Whether the code may be reported (an ICD-10-CM leaf, after 7th-character expansion).
    pub billable: bool,
}

/// A terminology as loaded from one release file.
#[derive(Debug, Clone)]
pub struct Terminology {
    /// What it was loaded from (`icd10cm-xml`, `snomed-rf2`, ...).
    pub kind: &'static str,
    /// Every code, sorted by code.
    pub entries: Vec<Entry>,
    /// Chapters of a classification that has them (ICD-10-CM's tabular XML): name and range
    /// of codes (`("9", "I00-I99")`), in release order.
    pub chapters: Vec<(String, String)>,
    /// Which release of the terminology this is.
    pub release: Release,
    /// The hierarchy: SNOMED CT's is-a relationships and refsets, ICD-10-CM's tabular tree
    /// (codes, categories, blocks, chapters by their ranges).
    pub hierarchy: Option<Hierarchy>,
}

/// Which release a terminology was loaded from, as answers and FHIR operations name it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Release {
    /// The version: the CMS fiscal year for ICD-10-CM (`2026`), SNOMED CT's version URI
    /// (`http://snomed.info/sct/900000000000207008/version/20250101`), a list's file name.
    pub version: String,
    /// SNOMED CT: the module most of the release's rows come from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    /// SNOMED CT: the newest effectiveTime in the release (`20250101`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub date: Option<String>,
}

/// What a terminology holds, as `terminology inspect` and the admin API report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TerminologyStats {
    pub codes: usize,
    /// Billable (leaf) codes.
    pub billable: usize,
    /// Descriptions plus synonyms.
    pub terms: usize,
    pub synonyms: usize,
    /// Bytes of text held (codes and terms).
    pub text_bytes: usize,
}

impl Terminology {
    /// Sorts `entries` by code and wraps them.
    pub fn new(kind: &'static str, mut entries: Vec<Entry>) -> Self {
        entries.sort_by(|a, b| a.code.cmp(&b.code));
        Self {
            kind,
            entries,
            chapters: Vec::new(),
            release: Release::default(),
            hierarchy: None,
        }
    }

    /// Counts.
    pub fn stats(&self) -> TerminologyStats {
        let synonyms = self.entries.iter().map(|e| e.synonyms.len()).sum();
        TerminologyStats {
            codes: self.entries.len(),
            billable: self.entries.iter().filter(|e| e.billable).count(),
            terms: self.entries.len() + synonyms,
            synonyms,
            text_bytes: self
                .entries
                .iter()
                .map(|e| e.code.len() + e.description.len() + e.synonyms.iter().map(String::len).sum::<usize>())
                .sum(),
        }
    }

    /// The entry of `code`, if any.
    pub fn get(&self, code: &str) -> Option<&Entry> {
        self.entries
            .binary_search_by(|e| e.code.as_str().cmp(code))
            .ok()
            .map(|i| &self.entries[i])
    }
}

/// A release file that could not be read; names the file and, where known, the line.
#[derive(Debug, thiserror::Error)]
#[error("{}{}: {message}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct LoadError {
    pub path: PathBuf,
    pub line: Option<usize>,
    pub message: String,
}

impl LoadError {
    /// An error at `line` (1-based) of `path`.
    pub fn at(path: &Path, line: usize, message: impl Into<String>) -> Self {
        Self {
            path: path.to_path_buf(),
            line: Some(line),
            message: message.into(),
        }
    }

    /// An error about `path` as a whole.
    pub fn file(path: &Path, message: impl Into<String>) -> Self {
        Self {
            path: path.to_path_buf(),
            line: None,
            message: message.into(),
        }
    }
}

/// Reads `path` as UTF-8 text.
pub fn read_text(path: &Path) -> Result<String, LoadError> {
    let bytes = std::fs::read(path).map_err(|e| LoadError::file(path, e.to_string()))?;
    String::from_utf8(bytes).map_err(|e| {
        let line = 1 + e.as_bytes()[..e.utf8_error().valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        LoadError::at(path, line, "not UTF-8")
    })
}

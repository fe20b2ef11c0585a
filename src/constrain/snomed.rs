//! SNOMED CT descriptions from an RF2 `sct2_Description_Snapshot-*` file (tab-separated, with a
//! header row). SNOMED CT content is licensed: it is never shipped; tests write their own
//! RF2-format files.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use super::terminology::{Entry, LoadError, Terminology, read_text};

/// The RF2 description file's columns, in order.
const HEADER: [&str; 9] = [
    "id",
    "effectiveTime",
    "active",
    "moduleId",
    "conceptId",
    "languageCode",
    "typeId",
    "term",
    "caseSignificanceId",
];

/// typeId of a fully specified name.
pub const FSN_TYPE: &str = "900000000000003001";
/// typeId of a synonym.
pub const SYNONYM_TYPE: &str = "900000000000013009";

/// Which descriptions become terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DescriptionTypes {
    /// Fully specified names and synonyms.
    #[default]
    All,
    /// Fully specified names only.
    Fsn,
    /// Synonyms only.
    Synonyms,
}

/// What to take from an RF2 file.
#[derive(Debug, Clone, Default)]
pub struct SnomedOptions {
    /// Language codes kept (`en`); all when empty.
    pub languages: Vec<String>,
    pub types: DescriptionTypes,
    /// Only these concept ids, when given.
    pub concepts: Option<HashSet<String>>,
}

#[derive(Default)]
struct Concept {
    fsn: Option<String>,
    synonyms: Vec<String>,
}

/// Reads active descriptions, one entry per concept: its fully specified name as the
/// description (the first synonym when the FSN is filtered out) and its synonyms.
pub fn load_snomed_rf2(path: &Path, options: &SnomedOptions) -> Result<Terminology, LoadError> {
    let text = read_text(path)?;
    let mut lines = text.lines().enumerate();
    let header: Vec<&str> = lines
        .next()
        .map(|(_, l)| l.trim_end_matches('\r').split('\t').collect())
        .unwrap_or_default();
    if header != HEADER {
        return Err(LoadError::at(
            path,
            1,
            format!(
                "not an RF2 description file: the header must be `{}`",
                HEADER.join("\\t")
            ),
        ));
    }
    let mut concepts: BTreeMap<String, Concept> = BTreeMap::new();
    for (i, line) in lines {
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split('\t').collect();
        let [_, _, active, _, concept, language, type_id, term, _] = fields[..] else {
            return Err(LoadError::at(
                path,
                i + 1,
                format!("{} columns, RF2 has 9", fields.len()),
            ));
        };
        match active {
            "1" => {}
            "0" => continue,
            other => return Err(LoadError::at(path, i + 1, format!("active is `{other}`, not 0 or 1"))),
        }
        if !options.languages.is_empty() && !options.languages.iter().any(|l| l == language) {
            continue;
        }
        if options.concepts.as_ref().is_some_and(|c| !c.contains(concept)) {
            continue;
        }
        let is_fsn = match type_id {
            FSN_TYPE => true,
            SYNONYM_TYPE => false,
            _ => continue,
        };
        let wanted = match options.types {
            DescriptionTypes::All => true,
            DescriptionTypes::Fsn => is_fsn,
            DescriptionTypes::Synonyms => !is_fsn,
        };
        if !wanted || term.is_empty() {
            continue;
        }
        let c = concepts.entry(concept.to_string()).or_default();
        if is_fsn {
            c.fsn = Some(term.to_string());
        } else {
            c.synonyms.push(term.to_string());
        }
    }
    let entries: Vec<Entry> = concepts
        .into_iter()
        .filter_map(|(code, mut c)| {
            let description = match c.fsn {
                Some(fsn) => fsn,
                None if !c.synonyms.is_empty() => c.synonyms.remove(0),
                None => return None,
            };
            Some(Entry {
                code,
                description,
                synonyms: c.synonyms,
                billable: true,
            })
        })
        .collect();
    if entries.is_empty() {
        return Err(LoadError::file(path, "no active descriptions matched"));
    }
    Ok(Terminology::new("snomed-rf2", entries))
}

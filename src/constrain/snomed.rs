//! SNOMED CT from an RF2 release: descriptions from `sct2_Description_Snapshot-*` files, the
//! is-a hierarchy from `sct2_Relationship_Snapshot_*` (active `116680003 |Is a|` rows) and
//! simple refsets from `der2_Refset_SimpleSnapshot_*` (all tab-separated, with a header row).
//! SNOMED CT content is licensed: it is never shipped; tests write their own RF2-format files.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use super::hierarchy::Hierarchy;
use super::terminology::{Entry, LoadError, Release, Terminology, read_text};

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

/// The relationship file's columns, in order.
const RELATIONSHIP_HEADER: [&str; 10] = [
    "id",
    "effectiveTime",
    "active",
    "moduleId",
    "sourceId",
    "destinationId",
    "relationshipGroup",
    "typeId",
    "characteristicTypeId",
    "modifierId",
];

/// The simple refset file's columns, in order.
const REFSET_HEADER: [&str; 6] = [
    "id",
    "effectiveTime",
    "active",
    "moduleId",
    "refsetId",
    "referencedComponentId",
];

/// typeId of an is-a relationship.
pub const IS_A: &str = "116680003";

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

/// The RF2 files of one release.
struct Files {
    descriptions: Vec<PathBuf>,
    relationships: Vec<PathBuf>,
    refsets: Vec<PathBuf>,
}

impl Files {
    /// `path` is a description file (its relationships and refsets are looked for in its
    /// folder, or from the release's `Snapshot` folder when it sits in `Terminology/`) or a
    /// folder holding the whole release.
    fn find(path: &Path) -> Self {
        let (root, given) = if path.is_dir() {
            (path.to_path_buf(), None)
        } else {
            let parent = path.parent().unwrap_or(Path::new(".")).to_path_buf();
            let root = match parent.file_name().and_then(|n| n.to_str()) {
                Some("Terminology") => parent.parent().map_or(parent.clone(), Path::to_path_buf),
                _ => parent,
            };
            (root, Some(path.to_path_buf()))
        };
        let mut found = Vec::new();
        walk(&root, 4, &mut found);
        found.sort();
        let named = |prefix: &str| -> Vec<PathBuf> {
            found
                .iter()
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(prefix))
                })
                .cloned()
                .collect()
        };
        Self {
            descriptions: given.map_or_else(|| named("sct2_Description_Snapshot"), |p| vec![p]),
            relationships: named("sct2_Relationship_Snapshot"),
            refsets: named("der2_Refset_SimpleSnapshot"),
        }
    }
}

/// Files under `dir`, `depth` folders down at most.
fn walk(dir: &Path, depth: usize, into: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if depth > 0 {
                walk(&path, depth - 1, into);
            }
        } else {
            into.push(path);
        }
    }
}

/// The newest effectiveTime seen and how often each module appears.
#[derive(Default)]
struct ReleaseSeen {
    effective_time: String,
    modules: HashMap<String, usize>,
}

impl ReleaseSeen {
    fn saw(&mut self, effective_time: &str, module: &str) {
        if effective_time > self.effective_time.as_str() {
            self.effective_time = effective_time.to_string();
        }
        *self.modules.entry(module.to_string()).or_default() += 1;
    }

    /// SNOMED CT's version URI: the module most rows come from, and the newest effectiveTime.
    fn release(self) -> Release {
        let module = self
            .modules
            .into_iter()
            .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
            .map(|(m, _)| m)
            .unwrap_or_default();
        Release {
            version: format!("http://snomed.info/sct/{module}/version/{}", self.effective_time),
            module: Some(module),
            date: Some(self.effective_time),
        }
    }
}

/// The rows of an RF2 file with `header`: the fields of each non-empty line after it, with
/// its line number.
fn rows<'a, const N: usize>(
    path: &'a Path,
    text: &'a str,
    header: &[&str; N],
    what: &str,
) -> Result<impl Iterator<Item = Result<(usize, [&'a str; N]), LoadError>> + 'a, LoadError> {
    let mut lines = text.lines().enumerate();
    let first: Vec<&str> = lines
        .next()
        .map(|(_, l)| l.trim_end_matches('\r').split('\t').collect())
        .unwrap_or_default();
    if first != header {
        return Err(LoadError::at(
            path,
            1,
            format!("not an RF2 {what} file: the header must be `{}`", header.join("\\t")),
        ));
    }
    Ok(lines.filter_map(move |(i, line)| {
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            return None;
        }
        let fields: Vec<&str> = line.split('\t').collect();
        Some(
            <[&str; N]>::try_from(fields.as_slice())
                .map(|f| (i + 1, f))
                .map_err(|_| LoadError::at(path, i + 1, format!("{} columns, RF2 has {N}", fields.len()))),
        )
    }))
}

/// Whether a row is active (`1`), or an error for anything but `0`.
fn active(path: &Path, line: usize, value: &str) -> Result<bool, LoadError> {
    match value {
        "1" => Ok(true),
        "0" => Ok(false),
        other => Err(LoadError::at(path, line, format!("active is `{other}`, not 0 or 1"))),
    }
}

/// Reads a release (see [`Files::find`] for what `path` may be): active descriptions, one
/// entry per concept — its fully specified name as the description (the first synonym when the
/// FSN is filtered out) and its synonyms — and, where the release has them, the is-a hierarchy
/// and simple refsets.
pub fn load_snomed_rf2(path: &Path, options: &SnomedOptions) -> Result<Terminology, LoadError> {
    let files = Files::find(path);
    if files.descriptions.is_empty() {
        return Err(LoadError::file(path, "no sct2_Description_Snapshot file here"));
    }
    let mut concepts: BTreeMap<String, Concept> = BTreeMap::new();
    let mut seen = ReleaseSeen::default();
    for file in &files.descriptions {
        read_descriptions(file, options, &mut concepts, &mut seen)?;
    }
    let mut hierarchy = Hierarchy::default();
    for file in &files.relationships {
        let text = read_text(file)?;
        for row in rows(file, &text, &RELATIONSHIP_HEADER, "relationship")? {
            let (line, [_, time, is_active, module, source, destination, _, type_id, _, _]) = row?;
            if active(file, line, is_active)? && type_id == IS_A {
                seen.saw(time, module);
                hierarchy.add_is_a(source, destination);
            }
        }
    }
    for file in &files.refsets {
        let text = read_text(file)?;
        for row in rows(file, &text, &REFSET_HEADER, "simple refset")? {
            let (line, [_, time, is_active, module, refset, member]) = row?;
            if active(file, line, is_active)? {
                seen.saw(time, module);
                hierarchy.add_member(refset, member);
            }
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
    let mut terminology = Terminology::new("snomed-rf2", entries);
    for (i, e) in terminology.entries.iter().enumerate() {
        hierarchy.set_entry(&e.code, i);
    }
    terminology.release = seen.release();
    terminology.hierarchy = Some(hierarchy);
    Ok(terminology)
}

/// Adds the active descriptions of `path` that `options` keeps to `concepts`.
fn read_descriptions(
    path: &Path,
    options: &SnomedOptions,
    concepts: &mut BTreeMap<String, Concept>,
    seen: &mut ReleaseSeen,
) -> Result<(), LoadError> {
    let text = read_text(path)?;
    for row in rows(path, &text, &HEADER, "description")? {
        let (line, [_, time, is_active, module, concept, language, type_id, term, _]) = row?;
        if !active(path, line, is_active)? {
            continue;
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
        seen.saw(time, module);
        let c = concepts.entry(concept.to_string()).or_default();
        if is_fsn {
            c.fsn = Some(term.to_string());
        } else {
            c.synonyms.push(term.to_string());
        }
    }
    Ok(())
}

//! ICD-10-CM from CMS release files: the tabular XML (`icd10cm_tabular_*.xml`) and the order
//! file (`icd10cm_order_*.txt`).
//!
//! In the XML every `<diag>` is a code; a code without child codes is billable. Categories that
//! carry a `<sevenChrDef>` (fractures, injuries, ...) require a 7th character on each billable
//! code below them: the code is padded to six characters with the placeholder `X` and each
//! extension character appended (`S72.001` -> `S72.001A`, `S00.00` -> `S00.00XA`).
//!
//! The XML's nesting is kept as the terminology's hierarchy: each code under the code it
//! extends, each category under its block (`E08-E13`), each block under its chapter's range
//! (`E00-E89`).

use std::path::Path;

use quick_xml::Reader;
use quick_xml::events::Event;

use super::hierarchy::Hierarchy;
use super::terminology::{Entry, LoadError, Terminology, read_text};

/// A `<diag>` being read.
#[derive(Default)]
struct Diag {
    name: Option<String>,
    desc: String,
    inclusion: Vec<String>,
    /// The 7th-character extensions in force here: `(char, description)`.
    seventh: Option<Vec<(char, String)>>,
    /// Whether this diag defines its own `<sevenChrDef>` (replacing the inherited one).
    own_seventh: bool,
    has_children: bool,
}

/// The 7th characters a code may take. CMS states one exception only in a note, not in the
/// XML structure: in category S06, codes whose 6th character is 7 or 8 (death before regaining
/// consciousness) take `A` only.
fn allowed_seventh(code: &str, ch: char) -> bool {
    let compact: Vec<char> = code.chars().filter(|&c| c != '.').collect();
    !(code.starts_with("S06") && matches!(compact.get(5), Some('7' | '8')) && ch != 'A')
}

/// `S72.001` + `A` -> `S72.001A`; `S00.00` + `A` -> `S00.00XA` (placeholders to six characters).
fn with_seventh(code: &str, ch: char) -> String {
    let compact_len = code.chars().filter(|&c| c != '.').count();
    let mut out = code.to_string();
    if !out.contains('.') && compact_len > 3 {
        out.insert(3, '.');
    }
    if !out.contains('.') {
        out.push('.');
    }
    for _ in compact_len..6 {
        out.push('X');
    }
    out.push(ch);
    out
}

/// Reads the CMS tabular XML.
pub fn load_icd10cm_xml(path: &Path) -> Result<Terminology, LoadError> {
    let text = read_text(path)?;
    let line_of = |pos: u64| {
        1 + text.as_bytes()[..(pos as usize).min(text.len())]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
    };
    let mut reader = Reader::from_str(&text);
    reader.config_mut().trim_text(true);
    let mut elements: Vec<String> = Vec::new();
    let mut diags: Vec<Diag> = Vec::new();
    let mut entries = Vec::new();
    let mut pending_extension: Option<char> = None;
    let mut saw_root = false;
    // The chapter being read: its name and the range its description ends with.
    let (mut chapter, mut chapters) = ((String::new(), String::new()), Vec::new());
    // The CMS fiscal year, `<version>2026</version>`.
    let mut version = String::new();
    // The tabular tree: chapters (by range) hold blocks (`<section id="E08-E13">`), blocks hold
    // categories, codes hold the codes that extend them.
    let mut tree = Hierarchy::default();
    let mut section = String::new();
    loop {
        let event = reader
            .read_event()
            .map_err(|e| LoadError::at(path, line_of(reader.error_position()), format!("malformed XML: {e}")))?;
        // Where the event ends: the line of its tag.
        let pos = reader.buffer_position();
        match event {
            Event::Start(e) => {
                let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
                if elements.is_empty() {
                    if name != "ICD10CM.tabular" {
                        return Err(LoadError::at(
                            path,
                            line_of(pos),
                            format!("root element is <{name}>, not <ICD10CM.tabular>"),
                        ));
                    }
                    saw_root = true;
                }
                match name.as_str() {
                    "section" => {
                        section = e
                            .try_get_attribute("id")
                            .ok()
                            .flatten()
                            .and_then(|a| a.unescape_value().ok().map(|v| v.into_owned()))
                            .unwrap_or_default();
                        if !section.is_empty() && !chapter.1.is_empty() {
                            tree.add_is_a(&section, &chapter.1);
                        }
                    }
                    "diag" => {
                        if let Some(parent) = diags.last_mut() {
                            parent.has_children = true;
                        }
                        let seventh = diags.last().and_then(|d| d.seventh.clone());
                        diags.push(Diag {
                            seventh,
                            ..Diag::default()
                        });
                    }
                    "sevenChrDef" if elements.last().is_some_and(|p| p == "diag") => {
                        if let Some(d) = diags.last_mut() {
                            d.seventh = Some(Vec::new());
                            d.own_seventh = true;
                        }
                    }
                    "extension" => {
                        let ch = e
                            .try_get_attribute("char")
                            .ok()
                            .flatten()
                            .and_then(|a| a.unescape_value().ok().and_then(|v| v.chars().next()));
                        pending_extension = Some(ch.ok_or_else(|| {
                            LoadError::at(path, line_of(pos), "<extension> without a `char` attribute")
                        })?);
                    }
                    _ => {}
                }
                elements.push(name);
            }
            Event::Text(t) => {
                let value = t
                    .unescape()
                    .map_err(|e| LoadError::at(path, line_of(pos), format!("bad text: {e}")))?
                    .trim()
                    .to_string();
                let n = elements.len();
                let parent = |k: usize| elements.get(n.wrapping_sub(k)).map(String::as_str);
                match (parent(1), parent(2)) {
                    (Some("name"), Some("chapter")) => chapter.0 = value.clone(),
                    (Some("version"), Some("ICD10CM.tabular")) => version = value.clone(),
                    // "Diseases of the circulatory system (I00-I99)"
                    (Some("desc"), Some("chapter")) => {
                        let range = value.rsplit_once('(').and_then(|(_, r)| r.strip_suffix(')'));
                        chapter.1 = range.unwrap_or_default().to_string();
                    }
                    _ => {}
                }
                let Some(diag) = diags.last_mut() else { continue };
                match (parent(1), parent(2), parent(3)) {
                    (Some("name"), Some("diag"), _) => diag.name = Some(value),
                    (Some("desc"), Some("diag"), _) => diag.desc = value,
                    (Some("note"), Some("inclusionTerm"), Some("diag")) => diag.inclusion.push(value),
                    (Some("extension"), Some("sevenChrDef"), Some("diag")) => {
                        if let (Some(ch), Some(list)) = (pending_extension.take(), diag.seventh.as_mut())
                            && diag.own_seventh
                        {
                            list.push((ch, value));
                        }
                    }
                    _ => {}
                }
            }
            Event::End(_) => {
                let Some(name) = elements.pop() else {
                    return Err(LoadError::at(path, line_of(pos), "closing tag without an opening one"));
                };
                if name == "chapter" {
                    let (name, range) = std::mem::take(&mut chapter);
                    if !name.is_empty() && !range.is_empty() {
                        chapters.push((name, range));
                    }
                }
                if name == "diag" {
                    let Some(diag) = diags.pop() else { continue };
                    let code = diag
                        .name
                        .ok_or_else(|| LoadError::at(path, line_of(pos), "<diag> without a <name>"))?;
                    let leaf = !diag.has_children;
                    match diags.last().and_then(|parent| parent.name.as_deref()) {
                        Some(parent) => tree.add_is_a(&code, parent),
                        None if !section.is_empty() => tree.add_is_a(&code, &section),
                        None => {}
                    }
                    match (&diag.seventh, leaf) {
                        (Some(extensions), true) if !extensions.is_empty() => {
                            entries.push(Entry {
                                code: code.clone(),
                                description: diag.desc.clone(),
                                synonyms: diag.inclusion.clone(),
                                billable: false,
                            });
                            for (ch, meaning) in extensions.iter().filter(|(c, _)| allowed_seventh(&code, *c)) {
                                let extended = with_seventh(&code, *ch);
                                tree.add_is_a(&extended, &code);
                                entries.push(Entry {
                                    code: extended,
                                    description: format!("{}, {meaning}", diag.desc),
                                    synonyms: diag.inclusion.iter().map(|s| format!("{s}, {meaning}")).collect(),
                                    billable: true,
                                });
                            }
                        }
                        _ => entries.push(Entry {
                            code,
                            description: diag.desc,
                            synonyms: diag.inclusion,
                            billable: leaf,
                        }),
                    }
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if !saw_root || !elements.is_empty() {
        return Err(LoadError::file(path, "the XML ends before </ICD10CM.tabular>"));
    }
    if entries.is_empty() {
        return Err(LoadError::file(path, "no <diag> codes found"));
    }
    let mut terminology = Terminology::new("icd10cm-xml", entries);
    terminology.chapters = chapters;
    terminology.release.version = version;
    for (i, e) in terminology.entries.iter().enumerate() {
        tree.set_entry(&e.code, i);
    }
    terminology.hierarchy = Some(tree);
    Ok(terminology)
}

/// Reads the CMS order file: fixed width, one code per line: order number (5), code (7, no
/// dot), billable flag `0`/`1`, short description (60), long description.
pub fn load_icd10cm_order(path: &Path) -> Result<Terminology, LoadError> {
    let text = read_text(path)?;
    let mut entries = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let n = i + 1;
        let field = |range: std::ops::Range<usize>| line.get(range).map(str::trim);
        let (Some(order), Some(code), Some(flag)) = (field(0..5), field(6..13), field(14..15)) else {
            return Err(LoadError::at(path, n, "line too short for the order file layout"));
        };
        if order.parse::<u32>().is_err() {
            return Err(LoadError::at(
                path,
                n,
                format!("order number `{order}` is not a number"),
            ));
        }
        if code.is_empty() || !code.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(LoadError::at(path, n, format!("invalid code `{code}`")));
        }
        let billable = match flag {
            "0" => false,
            "1" => true,
            other => return Err(LoadError::at(path, n, format!("billable flag `{other}` is not 0 or 1"))),
        };
        let long = line.get(77..).map(str::trim).unwrap_or_default();
        let short = field(16..76.min(line.len())).unwrap_or_default();
        let mut dotted = code.to_string();
        if dotted.len() > 3 {
            dotted.insert(3, '.');
        }
        entries.push(Entry {
            code: dotted,
            description: if long.is_empty() {
                short.to_string()
            } else {
                long.to_string()
            },
            synonyms: Vec::new(),
            billable,
        });
    }
    if entries.is_empty() {
        return Err(LoadError::file(path, "no codes"));
    }
    Ok(Terminology::new("icd10cm-order", entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seventh_characters_pad_with_placeholders() {
        assert_eq!(with_seventh("S72.001", 'A'), "S72.001A");
        assert_eq!(with_seventh("S00.00", 'D'), "S00.00XD");
        assert_eq!(with_seventh("T36.0X1", 'A'), "T36.0X1A");
        assert_eq!(with_seventh("S62.9", 'S'), "S62.9XXS");
        assert!(allowed_seventh("S06.1X7", 'A') && !allowed_seventh("S06.1X7", 'D'));
        assert!(allowed_seventh("S06.1X1", 'D') && allowed_seventh("S72.001", 'S'));
    }
}

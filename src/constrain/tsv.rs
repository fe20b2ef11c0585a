//! Plain lists for any other vocabulary (LOINC, RxNorm, a ticker list): TSV, or CSV when the
//! file name ends in `.csv`, with a header naming the columns `code` and `term` and optionally
//! `synonyms` (separated by `|`).

use std::path::Path;

use super::terminology::{Entry, LoadError, Terminology};

/// Reads a list.
pub fn load_list(path: &Path) -> Result<Terminology, LoadError> {
    let delimiter = if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv")) {
        b','
    } else {
        b'\t'
    };
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .flexible(true)
        .from_path(path)
        .map_err(|e| LoadError::file(path, e.to_string()))?;
    let header = reader
        .headers()
        .map_err(|e| LoadError::at(path, 1, e.to_string()))?
        .clone();
    let column = |name: &str| header.iter().position(|h| h.trim().eq_ignore_ascii_case(name));
    let (Some(code_col), Some(term_col)) = (column("code"), column("term")) else {
        return Err(LoadError::at(
            path,
            1,
            "the header must name the columns `code` and `term` (and optionally `synonyms`)",
        ));
    };
    let synonyms_col = column("synonyms");
    let mut entries = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let line = i + 2;
        let record = record.map_err(|e| LoadError::at(path, line, e.to_string()))?;
        let field = |col: usize| record.get(col).map(str::trim).filter(|v| !v.is_empty());
        let code = field(code_col).ok_or_else(|| LoadError::at(path, line, "missing code"))?;
        let term = field(term_col).ok_or_else(|| LoadError::at(path, line, "missing term"))?;
        let synonyms = synonyms_col
            .and_then(field)
            .map(|s| {
                s.split('|')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default();
        entries.push(Entry {
            code: code.to_string(),
            description: term.to_string(),
            synonyms,
            billable: true,
        });
    }
    if entries.is_empty() {
        return Err(LoadError::file(path, "no rows"));
    }
    Ok(Terminology::new("list", entries))
}

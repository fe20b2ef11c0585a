//! Parts of an ICD-10-CM release a request may restrict its answer to: categories and codes
//! (`"E11"`, `"E11.6"`: the code and everything under it), ranges of them (`"I20-I25"`, every
//! code from `I20` through everything under `I25`) and chapters (`"chapter:9"`, the range the
//! release gives the chapter), several at once (`"I20-I25, E11"`). Codes compare by their
//! characters without the dot, so a range follows the tabular order.

use super::ConstraintError;
use super::terminology::Terminology;

/// Most parts one subset may list.
pub const MAX_SUBSET_PARTS: usize = 64;

/// A parsed subset: inclusive ranges of dotless, upper-case code prefixes, and chapters until
/// [`Subset::resolve`] turns them into ranges.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Subset {
    ranges: Vec<(String, String)>,
    chapters: Vec<String>,
}

impl Subset {
    /// Parses `text`: parts separated by commas, each a code or `LOW-HIGH`.
    pub fn parse(text: &str) -> Result<Self, ConstraintError> {
        let parts: Vec<&str> = text.split(',').map(str::trim).collect();
        if parts.len() > MAX_SUBSET_PARTS {
            return Err(ConstraintError::Invalid(format!(
                "a subset may list at most {MAX_SUBSET_PARTS} parts, got {}",
                parts.len()
            )));
        }
        let mut ranges = Vec::with_capacity(parts.len());
        let mut chapters = Vec::new();
        for part in parts {
            if let Some(chapter) = part.strip_prefix("chapter:") {
                let chapter = chapter.trim();
                if chapter.is_empty() || !chapter.chars().all(|c| c.is_ascii_alphanumeric()) {
                    return Err(ConstraintError::Invalid(format!(
                        "subset part `{part}`: a chapter is named by its number, like `chapter:9`"
                    )));
                }
                chapters.push(chapter.to_string());
                continue;
            }
            let (low, high) = part.split_once('-').unwrap_or((part, part));
            let (low, high) = (bound(part, low)?, bound(part, high)?);
            if low > high {
                return Err(ConstraintError::Invalid(format!(
                    "subset part `{part}`: its start comes after its end"
                )));
            }
            ranges.push((low, high));
        }
        ranges.sort();
        ranges.dedup();
        Ok(Self { ranges, chapters })
    }

    /// The subset with its chapters replaced by the ranges `terminology` gives them.
    pub fn resolve(mut self, terminology: &Terminology) -> Result<Self, ConstraintError> {
        for chapter in std::mem::take(&mut self.chapters) {
            let Some((_, range)) = terminology.chapters.iter().find(|(name, _)| *name == chapter) else {
                let known: Vec<&str> = terminology.chapters.iter().map(|(n, _)| n.as_str()).collect();
                return Err(ConstraintError::Invalid(format!(
                    "subset part `chapter:{chapter}`: this release has no such chapter (it has: {})",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                )));
            };
            let (low, high) = range.split_once('-').unwrap_or((range, range));
            let part = format!("chapter:{chapter}");
            self.ranges.push((bound(&part, low)?, bound(&part, high)?));
        }
        self.ranges.sort();
        self.ranges.dedup();
        Ok(self)
    }

    /// Whether `code` (dotted or not) falls in the subset.
    pub fn contains(&self, code: &str) -> bool {
        let code = dotless(code);
        let head = |n: usize| &code[..n.min(code.len())];
        self.ranges
            .iter()
            .any(|(low, high)| head(low.len()) >= low.as_str() && head(high.len()) <= high.as_str())
    }
}

impl std::fmt::Display for Subset {
    /// The normalised subset: sorted ranges of dotless codes (`E116,I20-I25`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts = self.ranges.iter().map(|(low, high)| {
            if low == high {
                low.clone()
            } else {
                format!("{low}-{high}")
            }
        });
        let chapters = self.chapters.iter().map(|c| format!("chapter:{c}"));
        write!(f, "{}", parts.chain(chapters).collect::<Vec<_>>().join(","))
    }
}

fn dotless(code: &str) -> String {
    code.chars()
        .filter(|&c| c != '.')
        .map(|c| c.to_ascii_uppercase())
        .collect()
}

/// One end of a range: a letter, a digit, a digit or letter (the category), then up to four
/// more characters, with or without the dot.
fn bound(part: &str, text: &str) -> Result<String, ConstraintError> {
    let code = dotless(text.trim());
    let chars: Vec<char> = code.chars().collect();
    let valid = (3..=7).contains(&chars.len())
        && chars[0].is_ascii_uppercase()
        && chars[1].is_ascii_digit()
        && chars[2..].iter().all(char::is_ascii_alphanumeric)
        && text.trim().matches('.').count() <= 1;
    if valid {
        Ok(code)
    } else {
        Err(ConstraintError::Invalid(format!(
            "subset part `{part}` is not an ICD-10-CM code or range of codes (like `I20-I25` or \
             `E11.6`) or a chapter (`chapter:9`)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_take_everything_under_their_ends() {
        let s = Subset::parse("I20-I25, e11.6").unwrap();
        for inside in ["I20.0", "I21.A1", "I25.10", "I25", "E11.65", "E116"] {
            assert!(s.contains(inside), "{inside}");
        }
        for outside in ["I26.01", "I1A.0", "E11.9", "E11", "E12.6", "A00.0"] {
            assert!(!s.contains(outside), "{outside}");
        }
    }

    #[test]
    fn chapters_resolve_to_the_ranges_of_the_release() {
        let mut t = Terminology::new("icd10cm-xml", Vec::new());
        t.chapters = vec![("9".into(), "I00-I99".into()), ("19".into(), "S00-T88".into())];
        let s = Subset::parse("chapter:19, E11").unwrap().resolve(&t).unwrap();
        assert!(s.contains("T88.9XXA") && s.contains("S72.001A") && s.contains("E11.9"));
        assert!(!s.contains("I10") && !s.contains("T89"));
        let err = Subset::parse("chapter:23")
            .unwrap()
            .resolve(&t)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no such chapter (it has: 9, 19)"), "{err}");
    }

    #[test]
    fn bad_parts_are_named() {
        for bad in [
            "chapter:",
            "chapter:9-10",
            "<< 404684003",
            "I25-I20",
            "",
            "I2",
            "E11..6",
            "I20-",
        ] {
            let err = Subset::parse(bad).unwrap_err().to_string();
            assert!(err.contains("subset part"), "{bad}: {err}");
        }
        let at_limit = vec!["E11"; MAX_SUBSET_PARTS].join(",");
        assert!(Subset::parse(&at_limit).is_ok());
        let many = vec!["E11"; MAX_SUBSET_PARTS + 1].join(",");
        assert!(Subset::parse(&many).unwrap_err().to_string().contains("at most"));
    }
}

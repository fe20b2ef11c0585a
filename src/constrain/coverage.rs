//! Knowledge coverage: how many of the codes a text mentions exist in a terminology. A mention
//! is a maximal run of characters that look like the terminology's codes (its code alphabet,
//! its code lengths, a letter first and a digit inside when all its codes are so); the share of
//! mentions that are codes of the terminology is the text's coverage.

use std::collections::BTreeSet;

use serde::Serialize;

use super::terminology::Terminology;

/// One code-shaped mention.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Mention {
    pub text: String,
    /// Byte offsets in the text.
    pub start: usize,
    pub end: usize,
    /// The terminology's code it names (matched with or without the dot), if any.
    pub code: Option<String>,
    pub billable: bool,
}

/// Most mentions listed in a [`Coverage`] (the counts cover them all): a long text of
/// code-shaped words must not make an answer many times its size.
pub const MAX_LISTED_MENTIONS: usize = 1000;

/// The coverage of one text.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Coverage {
    pub mentions: usize,
    /// Mentions that name a code of the terminology.
    pub matched: usize,
    /// `matched / mentions` (1 when there is no mention).
    pub share: f64,
    /// The first [`MAX_LISTED_MENTIONS`] mentions.
    pub items: Vec<Mention>,
    /// Whether `items` stops short of `mentions`.
    pub truncated: bool,
}

/// What the codes of a terminology look like.
pub struct CodeShape {
    alphabet: BTreeSet<char>,
    min_len: usize,
    max_len: usize,
    letter_first: bool,
    has_digit: bool,
}

impl CodeShape {
    /// The shape of `terminology`'s codes.
    pub fn of(terminology: &Terminology) -> Self {
        let codes = terminology.entries.iter().map(|e| e.code.as_str());
        let mut shape = Self {
            alphabet: BTreeSet::new(),
            min_len: usize::MAX,
            max_len: 0,
            letter_first: true,
            has_digit: true,
        };
        for code in codes {
            shape.alphabet.extend(code.chars());
            let n = code.chars().count();
            shape.min_len = shape.min_len.min(n);
            shape.max_len = shape.max_len.max(n);
            shape.letter_first &= code.starts_with(|c: char| c.is_alphabetic());
            shape.has_digit &= code.chars().any(|c| c.is_ascii_digit());
        }
        shape
    }

    fn fits(&self, candidate: &str) -> bool {
        let n = candidate.chars().count();
        (self.min_len..=self.max_len).contains(&n)
            && (!self.letter_first || candidate.starts_with(|c: char| c.is_alphabetic()))
            && (!self.has_digit || candidate.chars().any(|c| c.is_ascii_digit()))
    }
}

/// The code mentions in `text` and the share that are codes of `terminology`.
pub fn coverage(terminology: &Terminology, shape: &CodeShape, text: &str) -> Coverage {
    let mut items = Vec::new();
    let (mut mentions, mut matched) = (0, 0);
    let mut start = None;
    let chars: Vec<(usize, char)> = text.char_indices().chain(std::iter::once((text.len(), ' '))).collect();
    for &(i, c) in &chars {
        match (shape.alphabet.contains(&c), start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                start = None;
                // Sentence punctuation is not part of a code.
                let candidate = text[s..i].trim_end_matches(['.', '-']);
                if shape.fits(candidate) {
                    // The dot goes after the third character (ICD-10's category), wherever
                    // that falls in bytes: a list's codes need not be ASCII.
                    let entry = terminology.get(candidate).or_else(|| {
                        let (third, _) = candidate.char_indices().nth(3)?;
                        let dotted = (!candidate.contains('.'))
                            .then(|| format!("{}.{}", &candidate[..third], &candidate[third..]))?;
                        terminology.get(&dotted)
                    });
                    mentions += 1;
                    matched += usize::from(entry.is_some());
                    if items.len() == MAX_LISTED_MENTIONS {
                        continue;
                    }
                    items.push(Mention {
                        text: candidate.to_string(),
                        start: s,
                        end: s + candidate.len(),
                        code: entry.map(|e| e.code.clone()),
                        billable: entry.is_some_and(|e| e.billable),
                    });
                }
            }
            _ => {}
        }
    }
    Coverage {
        mentions,
        matched,
        share: if mentions == 0 {
            1.0
        } else {
            matched as f64 / mentions as f64
        },
        truncated: items.len() < mentions,
        items,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::constrain::Entry;

    fn icd() -> Terminology {
        let entry = |code: &str, billable| Entry {
            code: code.into(),
            description: String::new(),
            synonyms: Vec::new(),
            billable,
        };
        Terminology::new(
            "list",
            vec![
                entry("E11", false),
                entry("E11.9", true),
                entry("S72.001A", true),
                entry("I10", true),
            ],
        )
    }

    #[test]
    fn code_mentions_are_found_and_checked() {
        let t = icd();
        let shape = CodeShape::of(&t);
        let c = coverage(
            &t,
            &shape,
            "Codes: E11.9, I10 and E99.9; also S72001A. Not codes: the 2 patients, A1.",
        );
        let texts: Vec<&str> = c.items.iter().map(|m| m.text.as_str()).collect();
        assert_eq!(texts, ["E11.9", "I10", "E99.9", "S72001A"]);
        assert_eq!((c.mentions, c.matched), (4, 3));
        assert!((c.share - 0.75).abs() < 1e-12);
        assert_eq!(c.items[3].code.as_deref(), Some("S72.001A"), "matched without the dot");
        assert!(c.items[0].billable && c.items[2].code.is_none());
        let none = coverage(&t, &shape, "no codes here");
        assert_eq!((none.mentions, none.share), (0, 1.0));
    }

    #[test]
    fn non_ascii_codes_and_long_texts_are_handled() {
        let entry = |code: &str| Entry {
            code: code.into(),
            description: String::new(),
            synonyms: Vec::new(),
            billable: true,
        };
        let t = Terminology::new("list", vec![entry("ÄÖ1"), entry("ÄÖ1.23"), entry("ÄÖ1.99")]);
        let shape = CodeShape::of(&t);
        // Byte 3 falls inside a character here: the dot is placed by characters.
        let c = coverage(&t, &shape, "see ÄÖ123 and ÄÖ1.99");
        assert_eq!((c.mentions, c.matched), (2, 2), "{c:?}");
        let text = "ÄÖ1.23 ".repeat(MAX_LISTED_MENTIONS + 500);
        let c = coverage(&t, &shape, &text);
        assert_eq!(
            (c.mentions, c.matched),
            (MAX_LISTED_MENTIONS + 500, MAX_LISTED_MENTIONS + 500)
        );
        assert_eq!(c.items.len(), MAX_LISTED_MENTIONS);
        assert!(c.truncated);
    }
}

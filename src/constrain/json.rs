//! Structured output: a JSON object whose shape a JSON Schema gives, written in one fixed
//! layout (`{"a": 1, "b": "x"}`), where a string property may carry `"x-terminology": "icd10cm"`
//! so its value is a code or term of that terminology. The object is a sequence of segments
//! (literal text, terminology values, integers, free strings), walked as a byte automaton like
//! a plain terminology answer.

use std::sync::Arc;

use serde_json::Value;
use smallvec::SmallVec;

use super::automaton::{Automaton, State, TermSet};
use super::machine::{ByteMachine, StateSet};
use super::registry::{CodeFormat, Compiled, ConstraintError, MatchKind, Provenance, SubsetText, Terminologies};

/// Longest free string when a schema gives no `maxLength`.
const DEFAULT_MAX_LENGTH: usize = 64;
/// Most items of an array when a schema gives no `maxItems`.
const DEFAULT_MAX_ITEMS: usize = 3;

/// Most properties a schema may have (the document is one flat object: nested objects are
/// refused, so the depth is one).
pub const MAX_SCHEMA_PROPERTIES: usize = 64;
/// Most values of one `enum`.
pub const MAX_SCHEMA_ENUM_VALUES: usize = 256;

/// One piece of the document.
enum Segment {
    Literal(Vec<u8>),
    /// Members of a term set (JSON-quoted strings, or literals), as many as the automaton allows.
    Terms(Automaton),
    /// `-?(0|[1-9][0-9]*)`, at most 16 digits.
    Integer,
    /// A JSON string of at most `max_len` bytes, without escapes or control characters.
    Text {
        max_len: usize,
    },
}

/// Where the document is inside the current segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inner {
    /// Bytes of a literal read.
    Literal(u32),
    Terms(State),
    /// Digits read (a leading `-` does not count), and whether the first was `0`.
    Integer {
        minus: bool,
        digits: u8,
        zero: bool,
    },
    /// `None` before the opening quote; then bytes read and UTF-8 continuation bytes awaited.
    Text {
        open: Option<(u16, u8)>,
        closed: bool,
    },
}

/// A position in the document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JsonState {
    segment: u16,
    inner: Inner,
}

/// The positions the document may be at.
pub type JsonStates = StateSet<JsonState>;

/// The automaton of the documents a schema allows.
pub struct JsonMachine {
    segments: Vec<Segment>,
    /// The releases (and subsets) its terminology fields were compiled from.
    provenance: Vec<Provenance>,
}

fn push(out: &mut JsonStates, s: JsonState) {
    if !out.contains(&s) {
        out.push(s);
    }
}

impl JsonMachine {
    fn terms(&self, segment: usize) -> Option<&Automaton> {
        match &self.segments[segment] {
            Segment::Terms(automaton) => Some(automaton),
            _ => None,
        }
    }

    fn enter(&self, segment: usize, out: &mut JsonStates) {
        let at = segment as u16;
        match &self.segments[segment] {
            Segment::Literal(_) => push(
                out,
                JsonState {
                    segment: at,
                    inner: Inner::Literal(0),
                },
            ),
            Segment::Terms(_) => {
                if let Some(a) = self.terms(segment) {
                    for s in a.start() {
                        push(
                            out,
                            JsonState {
                                segment: at,
                                inner: Inner::Terms(s),
                            },
                        );
                    }
                }
            }
            Segment::Integer => push(
                out,
                JsonState {
                    segment: at,
                    inner: Inner::Integer {
                        minus: false,
                        digits: 0,
                        zero: false,
                    },
                },
            ),
            Segment::Text { .. } => push(
                out,
                JsonState {
                    segment: at,
                    inner: Inner::Text {
                        open: None,
                        closed: false,
                    },
                },
            ),
        }
    }

    /// The state before any byte.
    fn start_states(&self) -> JsonStates {
        let mut out = JsonStates::new();
        if !self.segments.is_empty() {
            self.enter(0, &mut out);
        }
        out
    }

    fn complete(&self, s: &JsonState) -> bool {
        let segment = usize::from(s.segment);
        match (&self.segments[segment], s.inner) {
            (Segment::Literal(bytes), Inner::Literal(k)) => k as usize == bytes.len(),
            (Segment::Terms(_), Inner::Terms(t)) => self
                .terms(segment)
                .is_some_and(|a| a.accepts(&SmallVec::from_slice(&[t]))),
            (Segment::Integer, Inner::Integer { digits, .. }) => digits > 0,
            (Segment::Text { .. }, Inner::Text { closed, .. }) => closed,
            _ => false,
        }
    }

    fn step_inside(&self, s: JsonState, byte: u8, out: &mut JsonStates) {
        let segment = usize::from(s.segment);
        let next = |inner| JsonState {
            segment: s.segment,
            inner,
        };
        match (&self.segments[segment], s.inner) {
            (Segment::Literal(bytes), Inner::Literal(k)) if bytes.get(k as usize) == Some(&byte) => {
                push(out, next(Inner::Literal(k + 1)));
            }
            (Segment::Terms(_), Inner::Terms(t)) => {
                if let Some(a) = self.terms(segment) {
                    for t in a.step(&SmallVec::from_slice(&[t]), byte) {
                        push(out, next(Inner::Terms(t)));
                    }
                }
            }
            (Segment::Integer, Inner::Integer { minus, digits, zero }) => match byte {
                b'-' if !minus && digits == 0 => push(
                    out,
                    next(Inner::Integer {
                        minus: true,
                        digits,
                        zero,
                    }),
                ),
                b'0'..=b'9' if !zero && digits < 16 => push(
                    out,
                    next(Inner::Integer {
                        minus,
                        digits: digits + 1,
                        zero: digits == 0 && byte == b'0',
                    }),
                ),
                _ => {}
            },
            (Segment::Text { max_len }, Inner::Text { open, closed: false }) => match open {
                None if byte == b'"' => push(
                    out,
                    next(Inner::Text {
                        open: Some((0, 0)),
                        closed: false,
                    }),
                ),
                None => {}
                Some((len, cont)) => {
                    // A character starts only where all of its bytes fit.
                    let fits = |bytes: usize| usize::from(len) + bytes <= *max_len;
                    let text = |cont| {
                        next(Inner::Text {
                            open: Some((len + 1, cont)),
                            closed: false,
                        })
                    };
                    match byte {
                        b'"' if cont == 0 => push(
                            out,
                            next(Inner::Text {
                                open: Some((len, 0)),
                                closed: true,
                            }),
                        ),
                        0x20..=0x7e if cont == 0 && byte != b'\\' && byte != b'"' && fits(1) => push(out, text(0)),
                        0xc2..=0xdf if cont == 0 && fits(2) => push(out, text(1)),
                        0xe0..=0xef if cont == 0 && fits(3) => push(out, text(2)),
                        0xf0..=0xf4 if cont == 0 && fits(4) => push(out, text(3)),
                        0x80..=0xbf if cont > 0 => push(out, text(cont - 1)),
                        _ => {}
                    }
                }
            },
            _ => {}
        }
    }

    /// Compiles `schema` (an object schema; see the module docs for what it may hold).
    pub fn compile(schema: &Value, terminologies: &Terminologies) -> Result<Self, ConstraintError> {
        let invalid = |m: String| ConstraintError::Invalid(m);
        if schema.get("type").and_then(Value::as_str) != Some("object") {
            return Err(invalid(
                "the schema must be an object schema (\"type\": \"object\")".into(),
            ));
        }
        let properties = schema
            .get("properties")
            .and_then(Value::as_object)
            .filter(|p| !p.is_empty())
            .ok_or_else(|| invalid("the schema needs \"properties\"".into()))?;
        if properties.len() > MAX_SCHEMA_PROPERTIES {
            return Err(invalid(format!(
                "the schema has {} properties; at most {MAX_SCHEMA_PROPERTIES} are allowed",
                properties.len()
            )));
        }
        let mut machine = Self {
            segments: Vec::new(),
            provenance: Vec::new(),
        };
        for (i, (name, property)) in properties.iter().enumerate() {
            let key = serde_json::to_string(name).map_err(|e| invalid(e.to_string()))?;
            machine.literal(format!("{}{key}: ", if i == 0 { "{" } else { ", " }).as_bytes());
            machine.value(name, property, terminologies)?;
        }
        machine.literal(b"}");
        Ok(machine)
    }

    /// The releases (and subsets) its terminology fields were compiled from.
    pub fn provenance(&self) -> &[Provenance] {
        &self.provenance
    }

    fn note(&mut self, provenance: Provenance) {
        if !self.provenance.contains(&provenance) {
            self.provenance.push(provenance);
        }
    }

    fn literal(&mut self, bytes: &[u8]) {
        match self.segments.last_mut() {
            Some(Segment::Literal(text)) => text.extend_from_slice(bytes),
            _ => self.segments.push(Segment::Literal(bytes.to_vec())),
        }
    }

    fn value(&mut self, name: &str, property: &Value, terminologies: &Terminologies) -> Result<(), ConstraintError> {
        let unsupported =
            |what: &str| ConstraintError::Invalid(format!("property `{name}`: {what} is not supported in a schema"));
        let kind = property.get("type").and_then(Value::as_str).unwrap_or_default();
        match kind {
            "string" => {
                if let Some((set, provenance)) = quoted_terms(name, property, terminologies)? {
                    self.segments.push(Segment::Terms(Automaton::new(set, 1, b"")));
                    self.note(provenance);
                } else if let Some(options) = property.get("enum").and_then(Value::as_array) {
                    if options.len() > MAX_SCHEMA_ENUM_VALUES {
                        return Err(unsupported(&format!(
                            "an enum of {} values (at most {MAX_SCHEMA_ENUM_VALUES})",
                            options.len()
                        )));
                    }
                    let quoted: Vec<String> = options.iter().filter_map(Value::as_str).map(json_quote).collect();
                    if quoted.is_empty() {
                        return Err(unsupported("an empty or non-string enum"));
                    }
                    self.segments
                        .push(Segment::Terms(Automaton::new(Arc::new(TermSet::new(quoted)), 1, b"")));
                } else {
                    let max_len = property
                        .get("maxLength")
                        .and_then(Value::as_u64)
                        .map_or(DEFAULT_MAX_LENGTH, |n| n as usize);
                    self.segments.push(Segment::Text {
                        max_len: max_len.clamp(1, 1024),
                    });
                }
            }
            "integer" => self.segments.push(Segment::Integer),
            "boolean" => self.segments.push(Segment::Terms(Automaton::new(
                Arc::new(TermSet::new(["true", "false"])),
                1,
                b"",
            ))),
            "array" => {
                let items = property
                    .get("items")
                    .ok_or_else(|| unsupported("an array without \"items\""))?;
                let (set, provenance) = quoted_terms(name, items, terminologies)?
                    .ok_or_else(|| unsupported("an array whose items carry no \"x-terminology\""))?;
                self.note(provenance);
                let max_items = property
                    .get("maxItems")
                    .and_then(Value::as_u64)
                    .map_or(DEFAULT_MAX_ITEMS, |n| n as usize);
                self.literal(b"[");
                self.segments
                    .push(Segment::Terms(Automaton::new(set, max_items.clamp(1, 64), b", ")));
                self.literal(b"]");
            }
            other => return Err(unsupported(&format!("type `{other}`"))),
        }
        Ok(())
    }
}

impl ByteMachine for JsonMachine {
    type State = JsonState;

    fn start(&self) -> JsonStates {
        self.start_states()
    }

    fn step(&self, states: &JsonStates, byte: u8) -> JsonStates {
        let mut out = JsonStates::new();
        for &s in states {
            self.step_inside(s, byte, &mut out);
            let following = usize::from(s.segment) + 1;
            if following < self.segments.len() && self.complete(&s) {
                let mut entered = JsonStates::new();
                self.enter(following, &mut entered);
                for t in entered {
                    self.step_inside(t, byte, &mut out);
                }
            }
        }
        out
    }

    /// The document may end here.
    fn accepts(&self, states: &JsonStates) -> bool {
        states
            .iter()
            .any(|s| usize::from(s.segment) + 1 == self.segments.len() && self.complete(s))
    }
}

/// `"text"` as a JSON string.
fn json_quote(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| format!("\"{text}\""))
}

/// The JSON-quoted codes or terms of the terminology a string schema names, if it names one.
fn quoted_terms(
    name: &str,
    schema: &Value,
    terminologies: &Terminologies,
) -> Result<Option<Compiled>, ConstraintError> {
    let Some(terminology) = schema.get("x-terminology") else {
        return Ok(None);
    };
    let terminology = terminology
        .as_str()
        .ok_or_else(|| ConstraintError::Invalid(format!("property `{name}`: x-terminology must be a name")))?;
    let kind: MatchKind = match schema.get("x-match") {
        None => MatchKind::Code,
        Some(m) => serde_json::from_value(m.clone())
            .map_err(|e| ConstraintError::Invalid(format!("property `{name}`: x-match: {e}")))?,
    };
    let Some(subset) = schema.get("x-subset") else {
        return terminologies
            .quoted_term_set(terminology, kind, CodeFormat::Dotted, true)
            .map(Some);
    };
    let subset: SubsetText = serde_json::from_value(subset.clone()).map_err(|_| {
        ConstraintError::Invalid(format!(
            "property `{name}`: x-subset must be a string or a list of strings"
        ))
    })?;
    terminologies
        .subset_term_set(terminology, (kind, CodeFormat::Dotted, true, true), &subset)
        .map(Some)
        .map_err(|e| match e {
            ConstraintError::Invalid(m) => ConstraintError::Invalid(format!("property `{name}`: x-subset: {m}")),
            other => other,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::constrain::TerminologySpec;

    fn terminologies(dir: &std::path::Path) -> Terminologies {
        let path = dir.join("codes.tsv");
        std::fs::write(&path, "code\tterm\nA1\tAlpha one\nB2\tBeta \"two\"\n").unwrap();
        let spec: TerminologySpec = format!("t=tsv:{}", path.display()).parse().unwrap();
        Terminologies::load(&[spec]).unwrap()
    }

    #[test]
    fn documents_of_the_schema_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let t = terminologies(dir.path());
        let schema = serde_json::json!({"type": "object", "properties": {
            "code": {"type": "string", "x-terminology": "t"},
            "term": {"type": "string", "x-terminology": "t", "x-match": "term"},
            "ok": {"type": "boolean"},
            "n": {"type": "integer"},
            "note": {"type": "string", "maxLength": 5},
            "codes": {"type": "array", "items": {"type": "string", "x-terminology": "t"}, "maxItems": 2},
            "level": {"type": "string", "enum": ["low", "high"]}
        }});
        let m = JsonMachine::compile(&schema, &t).unwrap();
        let accepts = |doc: &str| m.accepts(&m.advance(&m.start(), doc.as_bytes()));
        let good = r#"{"code": "A1", "term": "Beta \"two\"", "ok": true, "n": -12, "note": "hé!", "codes": ["A1", "B2"], "level": "low"}"#;
        assert!(accepts(good), "{good}");
        let doc: serde_json::Value = serde_json::from_str(good).unwrap();
        assert_eq!(doc["term"], "Beta \"two\"", "terms are JSON-escaped");
        let prefix = r#"{"code": "A1", "term": "Alpha one", "ok": false, "n": 0, "note": "abcd"#;
        let states = m.advance(&m.start(), prefix.as_bytes());
        assert!(!states.is_empty());
        assert!(
            m.step(&states, 0xc3).is_empty(),
            "no room left for a two-byte character"
        );
        assert!(!m.step(&states, b'e').is_empty());
        for bad in [
            good.replace("\"A1\", \"B2\"", "\"A1\", \"B2\", \"A1\""),
            good.replace("\"code\": \"A1\"", "\"code\": \"C3\""),
            good.replace("-12", "012"),
            good.replace("hé!", "hello!"),
            good.replace("true", "yes"),
            good.replace("\"low\"", "\"medium\""),
            good.replace(", \"ok\"", ",\"ok\""),
            good.replace("}", ""),
        ] {
            assert!(!accepts(&bad), "{bad}");
        }
    }

    #[test]
    fn unsupported_schemas_are_errors_naming_the_property() {
        let dir = tempfile::tempdir().unwrap();
        let t = terminologies(dir.path());
        let cases = [
            (serde_json::json!({"type": "array"}), "object schema"),
            (
                serde_json::json!({"type": "object", "properties": {"x": {"type": "number"}}}),
                "property `x`: type `number`",
            ),
            (
                serde_json::json!({"type": "object", "properties": {"y": {"type": "string", "x-terminology": "nope"}}}),
                "unknown terminology `nope`",
            ),
            (
                serde_json::json!({"type": "object", "properties": {"z": {"type": "array", "items": {"type": "string"}}}}),
                "property `z`",
            ),
        ];
        for (schema, needle) in cases {
            let e = JsonMachine::compile(&schema, &t).err().unwrap().to_string();
            assert!(e.contains(needle), "{schema}: {e}");
        }
    }
}

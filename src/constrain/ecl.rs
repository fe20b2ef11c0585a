//! A practical part of SNOMED CT's Expression Constraint Language: concepts, `*`, the
//! hierarchy operators `<`, `<<`, `<!`, `>`, `>>`, `>!`, refset membership `^`, `OR`, `AND`
//! (or `,`), `MINUS` and parentheses. Terms between pipes (`404684003 |Clinical finding|`) are
//! ignored. Anything else (refinements, filters, dot notation, cardinality) is refused with the
//! part named.

use std::fmt;

use super::ConstraintError;
use super::hierarchy::Hierarchy;

/// Longest expression accepted, in bytes.
pub const MAX_ECL_BYTES: usize = 4096;

/// Deepest nesting of parentheses and operators accepted.
const MAX_DEPTH: usize = 32;

/// A hierarchy operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HierarchyOp {
    /// `<`
    Descendants,
    /// `<<`
    DescendantsOrSelf,
    /// `<!`
    Children,
    /// `>`
    Ancestors,
    /// `>>`
    AncestorsOrSelf,
    /// `>!`
    Parents,
}

impl HierarchyOp {
    fn symbol(self) -> &'static str {
        match self {
            HierarchyOp::Descendants => "<",
            HierarchyOp::DescendantsOrSelf => "<<",
            HierarchyOp::Children => "<!",
            HierarchyOp::Ancestors => ">",
            HierarchyOp::AncestorsOrSelf => ">>",
            HierarchyOp::Parents => ">!",
        }
    }
}

/// A parsed expression constraint.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Ecl {
    /// One concept, by id.
    Concept(String),
    /// `*`: every concept.
    Any,
    /// `^ X`: the members of the refsets X names.
    MemberOf(Box<Ecl>),
    /// An operator over the concepts of its operand.
    Hierarchy(HierarchyOp, Box<Ecl>),
    Or(Vec<Ecl>),
    And(Vec<Ecl>),
    Minus(Box<Ecl>, Box<Ecl>),
}

impl fmt::Display for Ecl {
    /// The normalised expression: ids only, single spaces, parentheses around compounds.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let join = |f: &mut fmt::Formatter<'_>, parts: &[Ecl], word: &str| {
            write!(f, "(")?;
            for (i, p) in parts.iter().enumerate() {
                if i > 0 {
                    write!(f, " {word} ")?;
                }
                write!(f, "{p}")?;
            }
            write!(f, ")")
        };
        match self {
            Ecl::Concept(id) => write!(f, "{id}"),
            Ecl::Any => write!(f, "*"),
            Ecl::MemberOf(inner) => write!(f, "^ {inner}"),
            Ecl::Hierarchy(op, inner) => write!(f, "{} {inner}", op.symbol()),
            Ecl::Or(parts) => join(f, parts, "OR"),
            Ecl::And(parts) => join(f, parts, "AND"),
            Ecl::Minus(a, b) => join(f, &[(**a).clone(), (**b).clone()], "MINUS"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Op(HierarchyOp),
    Caret,
    Open,
    Close,
    Star,
    Id(String),
    Or,
    And,
    Minus,
}

fn invalid(message: impl Into<String>) -> ConstraintError {
    ConstraintError::Invalid(message.into())
}

const SUPPORTED: &str = "supported: concept ids, *, <, <<, <!, >, >>, >!, ^, OR, AND, MINUS and parentheses";

fn tokens(text: &str) -> Result<Vec<Token>, ConstraintError> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &text[i..];
        let c = bytes[i];
        let (token, len) = match c {
            b' ' | b'\t' | b'\r' | b'\n' => {
                i += 1;
                continue;
            }
            b'|' => {
                let end = rest[1..]
                    .find('|')
                    .ok_or_else(|| invalid(format!("ECL: the term at byte {i} has no closing `|`")))?;
                i += end + 2;
                continue;
            }
            b'<' | b'>' => {
                let down = c == b'<';
                let next = bytes.get(i + 1).copied();
                match (down, next) {
                    (_, Some(b'<' | b'>')) if next != Some(c) => {
                        return Err(invalid(format!(
                            "ECL: `{}` is not an operator; {SUPPORTED}",
                            &rest[..2]
                        )));
                    }
                    (_, Some(n)) if n == c => {
                        if bytes.get(i + 2) == Some(&b'!') {
                            return Err(invalid(format!("ECL: `{}` is not supported; {SUPPORTED}", &rest[..3])));
                        }
                        let op = if down {
                            HierarchyOp::DescendantsOrSelf
                        } else {
                            HierarchyOp::AncestorsOrSelf
                        };
                        (Token::Op(op), 2)
                    }
                    (true, Some(b'!')) => (Token::Op(HierarchyOp::Children), 2),
                    (false, Some(b'!')) => (Token::Op(HierarchyOp::Parents), 2),
                    (true, _) => (Token::Op(HierarchyOp::Descendants), 1),
                    (false, _) => (Token::Op(HierarchyOp::Ancestors), 1),
                }
            }
            b'^' => (Token::Caret, 1),
            b'(' => (Token::Open, 1),
            b')' => (Token::Close, 1),
            b'*' => (Token::Star, 1),
            b',' => (Token::And, 1),
            b'0'..=b'9' => {
                let len = rest.bytes().take_while(u8::is_ascii_digit).count();
                (Token::Id(rest[..len].to_string()), len)
            }
            b'a'..=b'z' | b'A'..=b'Z' => {
                let len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
                let word = &rest[..len];
                let token = match word.to_ascii_uppercase().as_str() {
                    "OR" => Token::Or,
                    "AND" => Token::And,
                    "MINUS" => Token::Minus,
                    _ => return Err(invalid(format!("ECL: `{word}` is not a keyword; {SUPPORTED}"))),
                };
                (token, len)
            }
            _ => {
                let ch = rest.chars().next().unwrap_or('?');
                let what = match ch {
                    ':' => "refinements (`:`) are not supported",
                    '{' | '}' => "filters (`{{ }}`) are not supported",
                    '.' => "dot notation (`.`) is not supported",
                    '[' | ']' => "cardinality (`[ ]`) is not supported",
                    '!' => "`!` outside `<!` and `>!` is not supported",
                    _ => "an unexpected character",
                };
                return Err(invalid(format!("ECL: `{ch}` at byte {i}: {what}; {SUPPORTED}")));
            }
        };
        out.push(token);
        i += len;
    }
    Ok(out)
}

struct Parser {
    tokens: Vec<Token>,
    at: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn next(&mut self) -> Option<Token> {
        let t = self.tokens.get(self.at).cloned();
        self.at += 1;
        t
    }

    /// A compound: sub-expressions joined by one kind of OR, AND or a single MINUS.
    fn expression(&mut self, depth: usize) -> Result<Ecl, ConstraintError> {
        let first = self.sub(depth)?;
        let Some(joiner) = self
            .peek()
            .filter(|t| matches!(t, Token::Or | Token::And | Token::Minus))
            .cloned()
        else {
            return Ok(first);
        };
        let mut parts = vec![first];
        while let Some(t) = self
            .peek()
            .filter(|t| matches!(t, Token::Or | Token::And | Token::Minus))
        {
            if *t != joiner {
                return Err(invalid(
                    "ECL: mixing OR, AND and MINUS needs parentheses, like `(A OR B) MINUS C`",
                ));
            }
            self.next();
            parts.push(self.sub(depth)?);
        }
        Ok(match joiner {
            Token::Or => Ecl::Or(parts),
            Token::And => Ecl::And(parts),
            _ if parts.len() > 2 => {
                return Err(invalid(
                    "ECL: a chain of MINUS needs parentheses, like `(A MINUS B) MINUS C`",
                ));
            }
            _ => {
                let b = parts.pop().unwrap_or(Ecl::Any);
                let a = parts.pop().unwrap_or(Ecl::Any);
                Ecl::Minus(Box::new(a), Box::new(b))
            }
        })
    }

    /// `[op] [^] (id | * | ( expression ))`
    fn sub(&mut self, depth: usize) -> Result<Ecl, ConstraintError> {
        if depth > MAX_DEPTH {
            return Err(invalid(format!("ECL: nested deeper than {MAX_DEPTH}")));
        }
        match self.next() {
            Some(Token::Op(op)) => Ok(Ecl::Hierarchy(op, Box::new(self.sub(depth + 1)?))),
            Some(Token::Caret) => Ok(Ecl::MemberOf(Box::new(self.sub(depth + 1)?))),
            Some(Token::Id(id)) => Ok(Ecl::Concept(id)),
            Some(Token::Star) => Ok(Ecl::Any),
            Some(Token::Open) => {
                let inner = self.expression(depth + 1)?;
                match self.next() {
                    Some(Token::Close) => Ok(inner),
                    _ => Err(invalid("ECL: a `(` is not closed")),
                }
            }
            Some(t) => Err(invalid(format!(
                "ECL: expected a concept, `*` or `(`, found {}",
                describe(&t)
            ))),
            None => Err(invalid("ECL: the expression ends where a concept was expected")),
        }
    }
}

fn describe(t: &Token) -> String {
    match t {
        Token::Op(op) => format!("`{}`", op.symbol()),
        Token::Caret => "`^`".into(),
        Token::Open => "`(`".into(),
        Token::Close => "`)`".into(),
        Token::Star => "`*`".into(),
        Token::Id(id) => format!("`{id}`"),
        Token::Or => "`OR`".into(),
        Token::And => "`AND`".into(),
        Token::Minus => "`MINUS`".into(),
    }
}

impl Ecl {
    /// Parses `text`.
    pub fn parse(text: &str) -> Result<Self, ConstraintError> {
        if text.len() > MAX_ECL_BYTES {
            return Err(invalid(format!(
                "ECL: an expression may be at most {MAX_ECL_BYTES} bytes, got {}",
                text.len()
            )));
        }
        let mut parser = Parser {
            tokens: tokens(text)?,
            at: 0,
        };
        let ecl = parser.expression(0)?;
        match parser.next() {
            None => Ok(ecl),
            Some(t) => Err(invalid(format!(
                "ECL: unexpected {} after a complete expression",
                describe(&t)
            ))),
        }
    }

    /// The concepts of `hierarchy` the expression selects, as flags by concept number.
    pub fn evaluate(&self, hierarchy: &Hierarchy) -> Result<Vec<bool>, ConstraintError> {
        let n = hierarchy.len();
        Ok(match self {
            Ecl::Concept(id) => {
                let c = concept(hierarchy, id)?;
                let mut set = vec![false; n];
                set[c as usize] = true;
                set
            }
            Ecl::Any => vec![true; n],
            Ecl::MemberOf(inner) => {
                let refsets = inner.evaluate(hierarchy)?;
                if let Ecl::Concept(id) = &**inner
                    && !hierarchy.is_refset(concept(hierarchy, id)?)
                {
                    return Err(invalid(format!(
                        "ECL: concept {id} is not a reference set of this release"
                    )));
                }
                let mut set = vec![false; n];
                for r in numbers(&refsets) {
                    for &m in hierarchy.members(r) {
                        set[m as usize] = true;
                    }
                }
                set
            }
            Ecl::Hierarchy(op, inner) => {
                let focus = inner.evaluate(hierarchy)?;
                let start = numbers(&focus);
                let mut set = vec![false; n];
                match op {
                    HierarchyOp::Descendants | HierarchyOp::DescendantsOrSelf => {
                        hierarchy.closure(&start, true, &mut set)
                    }
                    HierarchyOp::Ancestors | HierarchyOp::AncestorsOrSelf => hierarchy.closure(&start, false, &mut set),
                    HierarchyOp::Children | HierarchyOp::Parents => {
                        let down = *op == HierarchyOp::Children;
                        for &c in &start {
                            for &m in hierarchy.neighbours(c, down) {
                                set[m as usize] = true;
                            }
                        }
                    }
                }
                if matches!(op, HierarchyOp::DescendantsOrSelf | HierarchyOp::AncestorsOrSelf) {
                    for c in start {
                        set[c as usize] = true;
                    }
                }
                set
            }
            Ecl::Or(parts) | Ecl::And(parts) => {
                let or = matches!(self, Ecl::Or(_));
                let mut set = vec![!or; n];
                for p in parts {
                    for (s, x) in set.iter_mut().zip(p.evaluate(hierarchy)?) {
                        *s = if or { *s || x } else { *s && x };
                    }
                }
                set
            }
            Ecl::Minus(a, b) => {
                let mut set = a.evaluate(hierarchy)?;
                for (s, x) in set.iter_mut().zip(b.evaluate(hierarchy)?) {
                    *s = *s && !x;
                }
                set
            }
        })
    }
}

fn concept(hierarchy: &Hierarchy, id: &str) -> Result<u32, ConstraintError> {
    hierarchy
        .get(id)
        .ok_or_else(|| invalid(format!("ECL: concept {id} is not in this release")))
}

fn numbers(set: &[bool]) -> Vec<u32> {
    set.iter()
        .enumerate()
        .filter(|&(_, &x)| x)
        .map(|(i, _)| i as u32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expressions_normalise() {
        for (text, normal) in [
            ("<< 404684003 |Clinical finding|", "<< 404684003"),
            ("<<404684003 OR <  71388002", "(<< 404684003 OR < 71388002)"),
            ("(< 1 , 2) minus ^ 3", "((< 1 AND 2) MINUS ^ 3)"),
            ("<! (1 OR 2)", "<! (1 OR 2)"),
            ("> > 5", "> > 5"),
        ] {
            assert_eq!(Ecl::parse(text).unwrap().to_string(), normal, "{text}");
            assert_eq!(Ecl::parse(normal).unwrap().to_string(), normal);
        }
    }

    #[test]
    fn unsupported_parts_are_named() {
        for (text, named) in [
            ("< 404684003 : 363698007 = << 39057004", "refinements"),
            ("< 1 {{ term = \"heart\" }}", "filters"),
            ("< 1 . 2", "dot notation"),
            ("<<! 1", "`<<!` is not supported"),
            ("1 OR 2 AND 3", "parentheses"),
            ("1 MINUS 2 MINUS 3", "chain of MINUS"),
            ("(1 OR 2", "not closed"),
            ("1 2", "unexpected `2`"),
            ("<", "ends where"),
            ("1 NOT 2", "`NOT` is not a keyword"),
            ("<< 1 |open", "no closing `|`"),
        ] {
            let err = Ecl::parse(text).unwrap_err().to_string();
            assert!(err.contains(named), "{text}: {err}");
        }
        let deep = format!("{}1{}", "(".repeat(40), ")".repeat(40));
        assert!(Ecl::parse(&deep).unwrap_err().to_string().contains("nested"));
    }
}

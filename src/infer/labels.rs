//! What an encoder's outputs mean, for every protocol: label scores of a sequence (softmax for
//! one label, a sigmoid per label for multi-label models), the entities of a text from its
//! tokens' labels, grouped as `transformers`' token-classification pipeline groups them
//! (`none`, `simple`, `first`, `max`) with character offsets into the original text, and the
//! embedding of a text pooled from its token states.

use serde::{Deserialize, Serialize};

use super::Encoded;
use crate::constrain::Terminologies;
use crate::repository::{EncoderTask, EncoderVersion, Pooling};

/// One label and its score.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LabelScore {
    pub label: String,
    pub score: f32,
    /// The label's description in a terminology, when the request named one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// How a classifier's labels meet a loaded terminology whose codes they are.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LabelCoverage {
    pub terminology: String,
    pub release: String,
    /// Labels that are codes of it.
    pub known: usize,
    /// Labels that are not (at most 20 listed).
    pub unknown: Vec<String>,
    pub unknown_count: usize,
}

/// For each loaded terminology that has at least one of `model`'s labels as a code: how many
/// labels it knows and which it does not (a classifier of ICD-10-CM codes checked against the
/// release it is served beside).
pub fn label_coverage(model: &EncoderVersion, terminologies: &Terminologies) -> Vec<LabelCoverage> {
    let mut out = Vec::new();
    for summary in terminologies.summaries() {
        let Some(t) = terminologies.get(&summary.name) else {
            continue;
        };
        let unknown: Vec<&String> = model.labels.iter().filter(|l| t.get(l).is_none()).collect();
        let known = model.labels.len() - unknown.len();
        if known == 0 {
            continue;
        }
        out.push(LabelCoverage {
            terminology: summary.name.clone(),
            release: t.release.version.clone(),
            known,
            unknown_count: unknown.len(),
            unknown: unknown.into_iter().take(20).cloned().collect(),
        });
    }
    out
}

/// Logs how a classifier's labels meet the loaded terminologies (unknown codes as a warning).
pub fn log_label_coverage(model: &EncoderVersion, terminologies: &Terminologies) {
    for c in label_coverage(model, terminologies) {
        if c.unknown_count > 0 {
            tracing::warn!(
                model = %model.name, terminology = %c.terminology, release = %c.release, known = c.known,
                unknown = c.unknown_count, examples = ?c.unknown, "classifier labels that are not codes of the terminology"
            );
        } else {
            tracing::info!(model = %model.name, terminology = %c.terminology, release = %c.release, known = c.known, "classifier labels are codes of the terminology");
        }
    }
}

/// The labels of a sequence output, best first: probabilities (softmax, or a sigmoid per label
/// for multi-label models), or the logits when `raw`.
pub fn label_scores(model: &EncoderVersion, logits: &[f32], raw: bool) -> Vec<LabelScore> {
    let scores = match (raw, model.task) {
        (true, _) => logits.to_vec(),
        (false, EncoderTask::MultiLabelClassification) => logits.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect(),
        (false, _) => softmax(logits),
    };
    let mut out: Vec<LabelScore> = scores
        .into_iter()
        .enumerate()
        .map(|(i, score)| LabelScore {
            label: model.labels.get(i).cloned().unwrap_or_else(|| format!("LABEL_{i}")),
            score,
            description: None,
        })
        .collect();
    out.sort_by(|a, b| b.score.total_cmp(&a.score));
    out
}

fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|&x| (x - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// The embedding of an encoded text: its token states pooled as the model says (mean, or the
/// first token), L2-normalised when `normalize`.
pub fn embedding(model: &EncoderVersion, encoded: &Encoded, normalize: bool) -> Vec<f32> {
    let hidden = encoded.output.shape.last().copied().unwrap_or(0).max(1);
    let rows = encoded.output.values.chunks(hidden);
    let count = rows.len().max(1) as f32;
    let mut pooled = match model.pooling {
        Pooling::Cls => rows.take(1).flatten().copied().collect::<Vec<f32>>(),
        Pooling::Mean => {
            let mut sum = vec![0f32; hidden];
            for row in rows {
                for (s, x) in sum.iter_mut().zip(row) {
                    *s += x;
                }
            }
            sum.into_iter().map(|s| s / count).collect()
        }
    };
    if normalize {
        let norm = pooled.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        for x in &mut pooled {
            *x /= norm;
        }
    }
    pooled
}

/// How token labels become entities (as `transformers`' `aggregation_strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Aggregation {
    /// Every labelled token on its own.
    None,
    /// Consecutive tokens of one entity type (`B-X` then `I-X`) form an entity.
    #[default]
    Simple,
    /// Words take their first token's label, then group as `simple`.
    First,
    /// Words take the label of their highest-scoring token, then group as `simple`.
    Max,
}

/// An entity found in a text.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entity {
    /// The entity type (`ORG`), or the token's full label with `none` (`B-ORG`).
    #[serde(rename = "entity_group")]
    pub group: String,
    /// The mean score of its tokens (with `none`: the token's).
    pub score: f32,
    /// The text it covers.
    pub word: String,
    /// Its span of the text, in characters.
    pub start: usize,
    pub end: usize,
}

/// A token (or word) with its label.
struct Labelled {
    label: usize,
    score: f32,
    start: usize,
    end: usize,
}

/// `B-ORG` -> (true, `ORG`); `I-ORG` -> (false, `ORG`); `ORG` -> (false, `ORG`).
fn split_tag(label: &str) -> (bool, &str) {
    match label.split_once('-') {
        Some(("B", kind)) => (true, kind),
        Some(("I", kind)) => (false, kind),
        _ => (false, label),
    }
}

/// The entities of `text` from its encoded tokens.
pub fn entities(model: &EncoderVersion, encoded: &Encoded, text: &str, aggregation: Aggregation) -> Vec<Entity> {
    let chars: Vec<char> = text.chars().collect();
    let labels = model.labels.len().max(1);
    let mut tokens = Vec::new();
    for ((&(start, end), &special), logits) in encoded
        .offsets
        .iter()
        .zip(&encoded.special)
        .zip(encoded.output.values.chunks(labels))
    {
        let end = end.min(chars.len());
        // Special tokens and tokens of spaces only cover no text of an entity.
        if special || start >= end || chars[start..end].iter().all(|c| c.is_whitespace()) {
            continue;
        }
        let probs = softmax(logits);
        let (label, score) = probs
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or((0, 0.0), |(i, &p)| (i, p));
        tokens.push(Labelled {
            label,
            score,
            start,
            end,
        });
    }
    let name = |label: usize| model.labels.get(label).map_or("O", String::as_str);
    let span = |start: usize, end: usize| -> (usize, usize) {
        // Byte-level tokens carry their leading space: an entity starts at its first letter.
        let mut start = start;
        while start < end && chars[start].is_whitespace() {
            start += 1;
        }
        (start, end)
    };
    let word = |start: usize, end: usize| chars[start..end].iter().collect::<String>();
    if aggregation == Aggregation::None {
        return tokens
            .iter()
            .filter(|t| name(t.label) != "O")
            .map(|t| {
                let (start, end) = span(t.start, t.end);
                Entity {
                    group: name(t.label).to_string(),
                    score: t.score,
                    word: word(start, end),
                    start,
                    end,
                }
            })
            .collect();
    }
    // Byte-level pieces of one character (CJK, emoji) share its span: one unit, labelled by
    // its first piece, since part of a character cannot start an entity.
    let mut pieces_joined: Vec<Labelled> = Vec::with_capacity(tokens.len());
    for token in tokens {
        match pieces_joined.last_mut() {
            Some(last) if token.start < last.end => last.end = last.end.max(token.end),
            _ => pieces_joined.push(token),
        }
    }
    let units: Vec<Labelled> = match aggregation {
        Aggregation::First | Aggregation::Max => words(&chars, pieces_joined, aggregation),
        _ => pieces_joined,
    };
    // Group consecutive units of one type: a `B-` tag or another type starts a new entity.
    let mut out: Vec<Entity> = Vec::new();
    let mut current: Option<(String, Vec<f32>, usize, usize)> = None;
    let close = |current: &mut Option<(String, Vec<f32>, usize, usize)>, out: &mut Vec<Entity>| {
        if let Some((group, scores, start, end)) = current.take() {
            let (start, end) = span(start, end);
            out.push(Entity {
                group,
                score: scores.iter().sum::<f32>() / scores.len() as f32,
                word: word(start, end),
                start,
                end,
            });
        }
    };
    for unit in units {
        let label = name(unit.label);
        if label == "O" {
            close(&mut current, &mut out);
            continue;
        }
        let (begins, kind) = split_tag(label);
        match &mut current {
            Some((group, scores, _, end)) if !begins && group == kind => {
                scores.push(unit.score);
                *end = unit.end;
            }
            _ => {
                close(&mut current, &mut out);
                current = Some((kind.to_string(), vec![unit.score], unit.start, unit.end));
            }
        }
    }
    close(&mut current, &mut out);
    out
}

/// Tokens joined into words (a token continues a word when it starts where the previous one
/// ended and not with a space), labelled by their first token or their best one.
fn words(chars: &[char], tokens: Vec<Labelled>, aggregation: Aggregation) -> Vec<Labelled> {
    let mut out: Vec<Labelled> = Vec::new();
    let mut previous_end = None;
    for token in tokens {
        let continues = previous_end == Some(token.start) && !chars[token.start].is_whitespace();
        previous_end = Some(token.end);
        match out.last_mut() {
            Some(word) if continues => {
                word.end = token.end;
                if aggregation == Aggregation::Max && token.score > word.score {
                    word.label = token.label;
                    word.score = token.score;
                }
            }
            _ => out.push(token),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_split_into_position_and_type() {
        assert_eq!(split_tag("B-ORG"), (true, "ORG"));
        assert_eq!(split_tag("I-MONEY"), (false, "MONEY"));
        assert_eq!(split_tag("O"), (false, "O"));
        let p = softmax(&[1.0, 2.0, 3.0]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6 && p[2] > p[1]);
    }
}

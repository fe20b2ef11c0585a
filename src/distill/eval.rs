//! The evaluation behind the gate, on held-out prompts and the exported ONNX model that would
//! serve, along the three axes of the distillation recipe: task accuracy (agreement with the
//! teacher; exact match where the dataset has labels), knowledge coverage (terminology
//! mentions that are real entries) and efficiency (latency, tokens per second).

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use ndarray::Array2;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::constrain::Terminologies;
use crate::engine::{DecoderSession, SessionOptions};
use crate::generate::{argmax, greedy, log_softmax};

/// A held-out prompt with the teacher's answer.
#[derive(Debug, Clone)]
pub struct EvalExample {
    pub prompt: Vec<u32>,
    /// The teacher's completion in the student's tokens.
    pub completion: Vec<u32>,
    /// The teacher's top-k per completion token, when it gave them.
    pub top: Option<Vec<Vec<(u32, f32)>>>,
    /// The dataset's expected answer.
    pub label: Option<String>,
}

/// What the evaluation needs besides the examples.
pub struct EvalContext<'a> {
    pub tokenizer: &'a Tokenizer,
    pub stop_ids: &'a [u32],
    /// Tokens generated per prompt for exact match, coverage and speed.
    pub max_new_tokens: usize,
    /// Terminology whose mentions coverage counts, if any.
    pub terminology: Option<(&'a Terminologies, &'a str)>,
    pub intra_threads: usize,
}

/// The figures of one model on the held-out set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub examples: usize,
    /// Teacher tokens scored (teacher-forced).
    pub positions: usize,
    /// Share of positions where the student's greedy next token is the teacher's.
    pub agreement: f64,
    /// Mean KL(teacher || student) over the teacher's top-k plus the missing mass, tau = 1.
    pub kl: Option<f64>,
    /// Mean negative log-likelihood of the teacher's tokens.
    pub nll: f64,
    /// Share of greedy answers equal to the label (trimmed), where labels exist.
    pub exact_match: Option<f64>,
    /// Share of terminology mentions in greedy answers that are real entries.
    pub coverage: Option<f64>,
    pub tokens_per_second: f64,
    pub latency_ms_p50: f64,
}

/// KL over the teacher's top-k tokens and "other" (see `loss`), at temperature 1.
pub fn topk_kl(student_logprobs: &[f32], top: &[(u32, f32)]) -> f64 {
    let mut kept_t = 0f64;
    let mut kept_s = 0f64;
    let mut kl = 0f64;
    for &(id, lp) in top {
        let (p, logq) = (f64::from(lp).exp(), f64::from(student_logprobs[id as usize]));
        kept_t += p;
        kept_s += logq.exp();
        if p > 0.0 {
            kl += p * (f64::from(lp) - logq);
        }
    }
    let rest_t = (1.0 - kept_t).max(0.0);
    let rest_s = (1.0 - kept_s).max(1e-8);
    if rest_t > 0.0 {
        kl += rest_t * (rest_t.ln() - rest_s.ln());
    }
    kl
}

fn single_row(tokens: &[u32]) -> (Array2<i64>, Array2<i64>, Array2<i64>) {
    let n = tokens.len();
    (
        Array2::from_shape_fn((1, n), |(_, i)| i64::from(tokens[i])),
        Array2::ones((1, n)),
        Array2::from_shape_fn((1, n), |(_, i)| i as i64),
    )
}

/// Evaluates the ONNX model at `model` on `examples`.
pub fn evaluate(model: &Path, examples: &[EvalExample], cx: &EvalContext<'_>) -> Result<Evaluation> {
    let options = SessionOptions {
        intra_threads: cx.intra_threads.max(1),
        ..SessionOptions::default()
    };
    let mut session = DecoderSession::open(model, options)?;
    let mut e = Evaluation {
        examples: examples.len(),
        ..Evaluation::default()
    };
    let (mut agree, mut nll, mut kl, mut kl_positions) = (0usize, 0f64, 0f64, 0usize);
    let (mut exact, mut labelled) = (0usize, 0usize);
    let (mut mentions, mut matched) = (0usize, 0usize);
    let (mut generated, mut latencies) = (0usize, Vec::with_capacity(examples.len()));
    let started = Instant::now();
    for ex in examples {
        let mut tokens = ex.prompt.clone();
        tokens.extend(&ex.completion);
        if !ex.completion.is_empty() {
            let (ids, mask, pos) = single_row(&tokens);
            let (logits, _) = session.forward(&ids, &mask, &pos, session.empty_cache(1)?)?;
            for (j, &target) in ex.completion.iter().enumerate() {
                let t = ex.prompt.len() + j;
                let row = logits.slice(ndarray::s![0, t - 1, ..]);
                let row = row.as_slice().context("logits layout")?;
                let logp = log_softmax(row);
                agree += usize::from(argmax(row) == target);
                nll -= f64::from(logp[target as usize]);
                if let Some(top) = ex.top.as_ref().and_then(|t| t.get(j)).filter(|t| !t.is_empty()) {
                    kl += topk_kl(&logp, top);
                    kl_positions += 1;
                }
                e.positions += 1;
            }
        }
        let t0 = Instant::now();
        let answer = greedy(&mut session, &ex.prompt, cx.max_new_tokens, cx.stop_ids)?;
        latencies.push(t0.elapsed().as_secs_f64() * 1000.0);
        generated += answer.len();
        let text = cx
            .tokenizer
            .decode(&answer, true)
            .map_err(|e| anyhow::anyhow!("decoding an answer: {e}"))?;
        if let Some(label) = &ex.label {
            labelled += 1;
            exact += usize::from(text.trim() == label.trim());
        }
        if let Some((terminologies, name)) = cx.terminology {
            let c = terminologies.coverage(name, &text)?;
            mentions += c.mentions;
            matched += c.matched;
        }
    }
    let share = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    e.agreement = share(agree, e.positions);
    e.nll = if e.positions == 0 {
        0.0
    } else {
        nll / e.positions as f64
    };
    e.kl = (kl_positions > 0).then(|| kl / kl_positions as f64);
    e.exact_match = (labelled > 0).then(|| share(exact, labelled));
    e.coverage = cx.terminology.map(|_| share(matched, mentions));
    e.tokens_per_second = generated as f64 / started.elapsed().as_secs_f64().max(1e-9);
    latencies.sort_by(f64::total_cmp);
    e.latency_ms_p50 = latencies.get(latencies.len() / 2).copied().unwrap_or(0.0);
    Ok(e)
}

/// Promotion thresholds: the candidate against the serving version on the same held-out set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GateSpec {
    /// Candidate agreement must be at least the current one plus this.
    pub min_agreement_gain: f64,
    /// Candidate KL (or NLL when the teacher gave no log-probabilities) at most the current
    /// one times this.
    pub max_kl_ratio: f64,
    /// Candidate exact match at least the current one plus this (where labels exist).
    pub min_exact_match_gain: Option<f64>,
    /// Candidate terminology coverage at least this.
    pub min_coverage: Option<f64>,
    /// Candidate p50 latency at most the current one times this.
    pub max_latency_ratio: Option<f64>,
    /// Checked before any teacher is asked: the job's prompts may drift from the reference
    /// traffic (`drift_reference`) by at most this unigram KL divergence, in nats.
    pub max_drift_kl: Option<f64>,
    /// Checked before training: the teacher's answers to the labelled held-out prompts must
    /// equal their labels (trimmed) at least this often.
    pub min_teacher_accuracy: Option<f64>,
}

impl Default for GateSpec {
    fn default() -> Self {
        Self {
            min_agreement_gain: 0.0,
            max_kl_ratio: 1.0,
            min_exact_match_gain: None,
            min_coverage: None,
            max_latency_ratio: None,
            max_drift_kl: None,
            min_teacher_accuracy: None,
        }
    }
}

impl GateSpec {
    /// The reasons the candidate fails; empty when it passes.
    pub fn failures(&self, current: &Evaluation, candidate: &Evaluation) -> Vec<String> {
        let mut out = Vec::new();
        if candidate.agreement < current.agreement + self.min_agreement_gain {
            out.push(format!(
                "agreement {:.4} < current {:.4} + {}",
                candidate.agreement, current.agreement, self.min_agreement_gain
            ));
        }
        let (name, cur, cand) = match (current.kl, candidate.kl) {
            (Some(a), Some(b)) => ("kl", a, b),
            _ => ("nll", current.nll, candidate.nll),
        };
        if cand > cur * self.max_kl_ratio {
            out.push(format!("{name} {cand:.4} > current {cur:.4} x {}", self.max_kl_ratio));
        }
        if let (Some(gain), Some(cur), Some(cand)) =
            (self.min_exact_match_gain, current.exact_match, candidate.exact_match)
            && cand < cur + gain
        {
            out.push(format!("exact match {cand:.4} < current {cur:.4} + {gain}"));
        }
        if let Some(min) = self.min_coverage
            && candidate.coverage.unwrap_or(0.0) < min
        {
            out.push(format!("coverage {:?} < {min}", candidate.coverage));
        }
        if let Some(ratio) = self.max_latency_ratio
            && candidate.latency_ms_p50 > current.latency_ms_p50 * ratio
        {
            out.push(format!(
                "p50 latency {:.2} ms > current {:.2} ms x {ratio}",
                candidate.latency_ms_p50, current.latency_ms_p50
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topk_kl_matches_the_training_loss_definition() {
        let logq = log_softmax(&[0.0, 0.0, 0.0]);
        let kl = topk_kl(&logq, &[(0, 0.5f32.ln()), (1, 0.25f32.ln())]);
        assert!((kl - (0.5 * 1.5f64.ln() + 0.5 * 0.75f64.ln())).abs() < 1e-6, "{kl}");
    }

    #[test]
    fn the_gate_names_every_failed_threshold() {
        let current = Evaluation {
            agreement: 0.5,
            kl: Some(1.0),
            latency_ms_p50: 10.0,
            ..Evaluation::default()
        };
        let better = Evaluation {
            agreement: 0.6,
            kl: Some(0.8),
            latency_ms_p50: 11.0,
            ..Evaluation::default()
        };
        let gate = GateSpec::default();
        assert!(gate.failures(&current, &better).is_empty());
        let strict = GateSpec {
            min_agreement_gain: 0.2,
            max_kl_ratio: 0.5,
            max_latency_ratio: Some(1.05),
            min_coverage: Some(0.9),
            ..GateSpec::default()
        };
        let failures = strict.failures(&current, &better);
        assert_eq!(failures.len(), 4, "{failures:?}");
        assert!(failures[0].starts_with("agreement"));
        assert!(failures[1].starts_with("kl"));
    }
}

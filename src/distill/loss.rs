//! Knowledge-distillation losses on candle tensors, from differentiable ops only.
//!
//! Token-level KD compares the student with the teacher's top-k log-probabilities. The teacher
//! shares only k tokens per position, so both distributions are compared on k + 1 outcomes:
//! the k tokens and "any other token" carrying the missing mass. At temperature tau the
//! teacher's missing mass is tempered as one outcome (exact at tau = 1, an approximation
//! otherwise, since the teacher's tail is unknown); the student's is exact.

use anyhow::Result;
use candle_core::{D, Device, Tensor};

/// Smallest probability the "other tokens" bucket may have, so its log stays finite.
const MIN_PROB: f64 = 1e-8;

/// Temperature at `step` of `total`, decayed linearly from `start` to `end` (5 -> 1 in the
/// recipe this project follows).
pub fn temperature(step: usize, total: usize, start: f64, end: f64) -> f64 {
    if total <= 1 {
        return end;
    }
    let progress = (step.min(total - 1)) as f64 / (total - 1) as f64;
    start + (end - start) * progress
}

/// `log_softmax` along the last axis.
pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    // The max is a constant shift: detached, it needs no gradient.
    let shifted = logits.broadcast_sub(&logits.max_keepdim(D::Minus1)?.detach())?;
    let norm = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&norm)?)
}

/// Mean cross-entropy of `logits` (`[n, vocab]`) against `targets` (`[n]`, u32).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logp = log_softmax(logits)?;
    let picked = logp.gather(&targets.unsqueeze(1)?, 1)?;
    Ok(picked.neg()?.mean_all()?)
}

/// The teacher's top-k log-probabilities at each of `n` positions, all of the same k.
#[derive(Debug, Clone)]
pub struct TeacherTopK {
    /// Token ids `[n, k]`, u32.
    pub ids: Tensor,
    /// Log-probabilities at temperature 1, row-major `n * k`.
    pub logprobs: Vec<f32>,
    pub k: usize,
}

impl TeacherTopK {
    /// Builds the tensors from per-position `(id, logprob)` lists, truncated to the shortest.
    pub fn new(rows: &[Vec<(u32, f32)>], device: &Device) -> Result<Self> {
        let k = rows.iter().map(Vec::len).min().unwrap_or(0);
        anyhow::ensure!(k > 0, "teacher top-k log-probabilities are empty");
        let ids: Vec<u32> = rows.iter().flat_map(|r| r[..k].iter().map(|p| p.0)).collect();
        let logprobs = rows.iter().flat_map(|r| r[..k].iter().map(|p| p.1)).collect();
        Ok(Self {
            ids: Tensor::from_vec(ids, (rows.len(), k), device)?,
            logprobs,
            k,
        })
    }

    /// The teacher's distribution over the k tokens and "other" at temperature `tau`,
    /// `[n, k + 1]`.
    fn tempered(&self, tau: f64, device: &Device) -> Result<Tensor> {
        let mut out = Vec::with_capacity(self.logprobs.len() / self.k * (self.k + 1));
        for row in self.logprobs.chunks_exact(self.k) {
            let kept: f64 = row.iter().map(|&lp| f64::from(lp).exp()).sum();
            let rest = (1.0 - kept).max(0.0);
            let mut weights: Vec<f64> = row.iter().map(|&lp| (f64::from(lp) / tau).exp()).collect();
            weights.push(rest.powf(1.0 / tau));
            let total: f64 = weights.iter().sum();
            out.extend(weights.iter().map(|w| (w / total) as f32));
        }
        let n = out.len() / (self.k + 1);
        Ok(Tensor::from_vec(out, (n, self.k + 1), device)?)
    }
}

/// The student's log-probabilities over the teacher's k tokens and "other" at temperature
/// `tau`, `[n, k + 1]`.
fn student_buckets(logits: &Tensor, teacher: &TeacherTopK, tau: f64) -> Result<Tensor> {
    let logq = log_softmax(&(logits / tau)?)?;
    let picked = logq.gather(&teacher.ids, 1)?;
    let rest = (1.0 - picked.exp()?.sum_keepdim(1)?)?.clamp(MIN_PROB, 1.0)?.log()?;
    Ok(Tensor::cat(&[&picked, &rest], 1)?)
}

/// `tau^2 * KL(p_teacher^tau || p_student^tau)` over the k + 1 outcomes, mean over positions.
pub fn topk_kl(logits: &Tensor, teacher: &TeacherTopK, tau: f64) -> Result<Tensor> {
    let p = teacher.tempered(tau, logits.device())?;
    let logp = p.clamp(MIN_PROB, 1.0)?.log()?;
    let logq = student_buckets(logits, teacher, tau)?;
    let kl = (p * (logp - logq)?)?.sum(1)?;
    Ok((kl.mean_all()? * (tau * tau))?)
}

/// Squared gap between the student's and the teacher's entropies over the k + 1 outcomes at
/// temperature `tau`, mean over positions: keeps the student as (un)certain as the teacher
/// where the teacher is.
pub fn entropy_gap(logits: &Tensor, teacher: &TeacherTopK, tau: f64) -> Result<Tensor> {
    let p = teacher.tempered(tau, logits.device())?;
    let teacher_entropy = (&p * p.clamp(MIN_PROB, 1.0)?.log()?)?.sum(1)?.neg()?;
    let logq = student_buckets(logits, teacher, tau)?;
    let student_entropy = (logq.exp()? * &logq)?.sum(1)?.neg()?;
    Ok((student_entropy - teacher_entropy)?.sqr()?.mean_all()?)
}

/// How the pieces are mixed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossWeights {
    /// Share of the KD term; `1 - alpha` goes to cross-entropy on the teacher's tokens.
    pub alpha: f64,
    /// Weight of [`entropy_gap`] (0 turns it off).
    pub entropy: f64,
}

/// The parts of one step's loss, for progress reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct LossParts {
    pub total: f32,
    pub ce: f32,
    /// `tau^2 * KL`; absent in sequence-level KD.
    pub kl: Option<f32>,
    /// White-box terms (unweighted), where a local teacher teaches.
    pub hidden: Option<f32>,
    pub attention: Option<f32>,
}

/// `alpha * tau^2 * KL + (1 - alpha) * CE (+ entropy * gap)`; plain CE when the teacher gave no
/// log-probabilities (sequence-level KD).
pub fn distillation_loss(
    logits: &Tensor,
    targets: &Tensor,
    teacher: Option<&TeacherTopK>,
    tau: f64,
    weights: LossWeights,
) -> Result<(Tensor, LossParts)> {
    let ce = cross_entropy(logits, targets)?;
    let ce_value = ce.to_scalar::<f32>()?;
    let Some(teacher) = teacher else {
        return Ok((
            ce,
            LossParts {
                total: ce_value,
                ce: ce_value,
                kl: None,
                hidden: None,
                attention: None,
            },
        ));
    };
    let kl = topk_kl(logits, teacher, tau)?;
    let kl_value = kl.to_scalar::<f32>()?;
    let mut total = ((kl * weights.alpha)? + (ce * (1.0 - weights.alpha))?)?;
    if weights.entropy > 0.0 {
        total = (total + (entropy_gap(logits, teacher, tau)? * weights.entropy)?)?;
    }
    let total_value = total.to_scalar::<f32>()?;
    Ok((
        total,
        LossParts {
            total: total_value,
            ce: ce_value,
            kl: Some(kl_value),
            hidden: None,
            attention: None,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f32, b: f64) {
        assert!((f64::from(a) - b).abs() < 1e-5, "{a} != {b}");
    }

    /// Uniform student over 3 tokens; teacher top-2 = {0: 0.5, 1: 0.25}, 0.25 missing.
    fn uniform_case() -> (Tensor, TeacherTopK) {
        let logits = Tensor::new(&[[0.0f32, 0.0, 0.0]], &Device::Cpu).unwrap();
        let teacher = TeacherTopK::new(&[vec![(0, 0.5f32.ln()), (1, 0.25f32.ln())]], &Device::Cpu).unwrap();
        (logits, teacher)
    }

    #[test]
    fn kl_at_temperature_one_matches_the_hand_value() {
        let (logits, teacher) = uniform_case();
        // 0.5 ln(0.5 / (1/3)) + 0.25 ln(0.25 / (1/3)) + 0.25 ln(0.25 / (1/3)), the last term
        // being the missing mass against the student's third token.
        let expected = 0.5 * 1.5f64.ln() + 0.5 * 0.75f64.ln();
        close(topk_kl(&logits, &teacher, 1.0).unwrap().to_scalar().unwrap(), expected);
    }

    #[test]
    fn kl_at_temperature_two_is_tempered_and_scaled_by_tau_squared() {
        let (logits, teacher) = uniform_case();
        // Tempered teacher: sqrt(0.5), sqrt(0.25), sqrt(0.25), normalised; student stays uniform.
        let w = [0.5f64.sqrt(), 0.5, 0.5];
        let sum: f64 = w.iter().sum();
        let kl: f64 = w.iter().map(|x| x / sum * (x / sum * 3.0).ln()).sum();
        close(topk_kl(&logits, &teacher, 2.0).unwrap().to_scalar().unwrap(), 4.0 * kl);
    }

    #[test]
    fn kl_is_zero_when_the_student_is_the_teacher() {
        let logits = Tensor::new(&[[2.0f32, 1.0, -1.0, 0.5]], &Device::Cpu).unwrap();
        let logp = log_softmax(&logits).unwrap().to_vec2::<f32>().unwrap();
        let teacher = TeacherTopK::new(&[vec![(0, logp[0][0]), (3, logp[0][3])]], &Device::Cpu).unwrap();
        close(topk_kl(&logits, &teacher, 1.0).unwrap().to_scalar().unwrap(), 0.0);
    }

    #[test]
    fn cross_entropy_and_the_mix() {
        let (logits, teacher) = uniform_case();
        let targets = Tensor::new(&[1u32], &Device::Cpu).unwrap();
        close(
            cross_entropy(&logits, &targets).unwrap().to_scalar().unwrap(),
            3f64.ln(),
        );
        let weights = LossWeights {
            alpha: 0.25,
            entropy: 0.0,
        };
        let (_, parts) = distillation_loss(&logits, &targets, Some(&teacher), 1.0, weights).unwrap();
        let kl = 0.5 * 1.5f64.ln() + 0.5 * 0.75f64.ln();
        close(parts.total, 0.25 * kl + 0.75 * 3f64.ln());
        let (_, parts) = distillation_loss(&logits, &targets, None, 1.0, weights).unwrap();
        close(parts.total, 3f64.ln());
        assert_eq!(parts.kl, None);
    }

    #[test]
    fn entropy_gap_compares_both_entropies() {
        let (logits, teacher) = uniform_case();
        let teacher_h = -(0.5 * 0.5f64.ln() + 0.5 * 0.25f64.ln());
        let gap = (3f64.ln() - teacher_h).powi(2);
        close(entropy_gap(&logits, &teacher, 1.0).unwrap().to_scalar().unwrap(), gap);
    }

    #[test]
    fn temperature_decays_linearly_from_start_to_end() {
        assert_eq!(temperature(0, 5, 5.0, 1.0), 5.0);
        assert_eq!(temperature(2, 5, 5.0, 1.0), 3.0);
        assert_eq!(temperature(4, 5, 5.0, 1.0), 1.0);
        assert_eq!(temperature(9, 5, 5.0, 1.0), 1.0);
        assert_eq!(temperature(0, 1, 5.0, 1.0), 1.0);
    }
}

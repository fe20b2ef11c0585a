//! The KD fine-tuning loop: AdamW, warm-up + cosine learning rate, global gradient-norm
//! clipping, temperature schedule, seeded batch order, on a bounded thread pool.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor, Var, backprop::GradStore};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::loss::{LossParts, LossWeights, TeacherTopK, distillation_loss, temperature};
use super::model::TrainableDecoder;
use super::whitebox::WhiteBox;

/// Training hyper-parameters (every field has a default, so a job may name only some).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub steps: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    /// Global gradient-norm limit (0 turns clipping off).
    pub max_grad_norm: f64,
    /// Share of the KD term in token-level KD.
    pub alpha: f64,
    pub tau_start: f64,
    pub tau_end: f64,
    /// Weight of the teacher-entropy regulariser (0 = off).
    pub entropy_weight: f64,
    /// Quantisation-aware training: INT8-rounded linear weights in the forward pass.
    pub fake_quant: bool,
    pub seed: u64,
    /// Threads training may use; serving keeps the rest.
    pub threads: usize,
    /// CPU priority (nice, 0..=19) of the training threads: higher yields more to serving.
    pub nice: i32,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 100,
            batch_size: 8,
            learning_rate: 1e-3,
            warmup_steps: 10,
            weight_decay: 0.01,
            max_grad_norm: 1.0,
            alpha: 0.5,
            tau_start: 5.0,
            tau_end: 1.0,
            entropy_weight: 0.0,
            fake_quant: false,
            seed: 0,
            threads: 1,
            nice: 10,
        }
    }
}

/// One training sequence: prompt then the teacher's completion.
#[derive(Debug, Clone)]
pub struct Example {
    pub tokens: Vec<u32>,
    /// Index of the first completion token; loss is taken on `tokens[completion_start..]`.
    pub completion_start: usize,
    /// The teacher's top-k for each completion token (token-level KD), if it gave them.
    pub top: Option<Vec<Vec<(u32, f32)>>>,
}

/// Progress of one step.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct StepReport {
    pub step: usize,
    pub steps: usize,
    pub loss: LossParts,
    pub tau: f64,
    pub learning_rate: f64,
    pub grad_norm: f32,
}

/// Learning rate at `step`: linear warm-up to `peak`, then cosine down to a tenth of it.
pub fn learning_rate(step: usize, total: usize, warmup: usize, peak: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    let floor = peak * 0.1;
    floor + (peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// A batch as tensors: padded tokens, and the flat positions whose next token is learned.
struct Batch {
    input_ids: Tensor,
    lengths: Vec<usize>,
    /// Index into the flattened `[batch * seq]` logits of each learned position.
    positions: Tensor,
    targets: Tensor,
    top: Option<TeacherTopK>,
}

fn make_batch(examples: &[&Example], device: &Device) -> Result<Batch> {
    let seq = examples.iter().map(|e| e.tokens.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(examples.len() * seq);
    let (mut positions, mut targets, mut top) = (Vec::new(), Vec::new(), Vec::new());
    let token_level = examples.iter().all(|e| e.top.is_some());
    for (row, e) in examples.iter().enumerate() {
        ids.extend(&e.tokens);
        ids.extend(std::iter::repeat_n(0, seq - e.tokens.len()));
        for t in e.completion_start.max(1)..e.tokens.len() {
            positions.push((row * seq + t - 1) as u32);
            targets.push(e.tokens[t]);
            if let (true, Some(rows)) = (token_level, &e.top) {
                top.push(rows.get(t - e.completion_start).cloned().unwrap_or_default());
            }
        }
    }
    if positions.is_empty() {
        bail!("the batch has no completion tokens to learn from");
    }
    let n = positions.len();
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, (examples.len(), seq), device)?,
        lengths: examples.iter().map(|e| e.tokens.len()).collect(),
        positions: Tensor::from_vec(positions, n, device)?,
        targets: Tensor::from_vec(targets, n, device)?,
        top: if token_level && top.iter().all(|r| !r.is_empty()) {
            Some(TeacherTopK::new(&top, device)?)
        } else {
            None
        },
    })
}

/// Scales the gradients so their global L2 norm is at most `max_norm`; returns the norm before.
pub(super) fn clip_gradients(grads: &mut GradStore, vars: &[Var], max_norm: f64) -> Result<f32> {
    let mut sum = 0f32;
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            sum += g.sqr()?.sum_all()?.to_scalar::<f32>()?;
        }
    }
    let norm = sum.sqrt();
    if max_norm > 0.0 && f64::from(norm) > max_norm {
        let scale = max_norm / f64::from(norm);
        for v in vars {
            if let Some(g) = grads.remove(v.as_tensor()) {
                grads.insert(v.as_tensor(), (g * scale)?);
            }
        }
    }
    Ok(norm)
}

/// Loss and gradients of one batch (no update): what a step does before the optimiser.
pub fn loss_and_gradients(
    model: &TrainableDecoder,
    examples: &[&Example],
    tau: f64,
    weights: LossWeights,
) -> Result<(LossParts, GradStore)> {
    step_gradients(model, examples, tau, weights, None)
}

/// As [`loss_and_gradients`], with the white-box terms of a local teacher where there is one.
fn step_gradients(
    model: &TrainableDecoder,
    examples: &[&Example],
    tau: f64,
    weights: LossWeights,
    white_box: Option<&WhiteBox>,
) -> Result<(LossParts, GradStore)> {
    let batch = make_batch(examples, &Device::Cpu)?;
    let layers = white_box.map(WhiteBox::student_layers).unwrap_or_default();
    let (picked, trace) = model.traced_at(&batch.input_ids, &batch.lengths, &batch.positions, &layers)?;
    let (mut loss, mut parts) = distillation_loss(&picked, &batch.targets, batch.top.as_ref(), tau, weights)?;
    if let Some(w) = white_box {
        let (hidden, attention) = w.losses(&trace, &batch.input_ids, &batch.lengths)?;
        parts.hidden = Some(hidden.to_scalar::<f32>()?);
        parts.attention = Some(attention.to_scalar::<f32>()?);
        loss = ((loss + (hidden * w.spec.hidden_weight)?)? + (attention * w.spec.attention_weight)?)?;
        parts.total = loss.to_scalar::<f32>()?;
    }
    Ok((parts, loss.backward()?))
}

/// Lowers the calling thread's CPU priority to `nice`, so serving threads win where they
/// compete with training for a core. On Linux the nice value is per thread.
fn lower_priority(nice: i32) {
    // SAFETY: setpriority only reads its integer arguments; who = 0 is the calling thread.
    let result = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    if result != 0 {
        tracing::debug!("could not lower the training threads' priority");
    }
}

/// AdamW over `vars` with the configured peak learning rate and weight decay.
pub(super) fn adamw(vars: &[Var], config: &TrainConfig) -> Result<AdamW> {
    let params = ParamsAdamW {
        lr: config.learning_rate,
        weight_decay: config.weight_decay,
        ..ParamsAdamW::default()
    };
    Ok(AdamW::new(vars.to_vec(), params)?)
}

/// The bounded, lower-priority thread pool training runs on.
pub(super) fn training_pool(config: &TrainConfig) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(config.threads.max(1))
        .thread_name(|i| format!("distill-train-{i}"))
        .start_handler({
            let nice = config.nice.clamp(0, 19);
            move |_| lower_priority(nice)
        })
        .build()
        .context("starting the training threads")
}

/// The indices of the next batch of `size` out of `count` examples: epochs in a seeded
/// shuffled order, refilled as `order` runs out.
pub(super) fn next_batch(order: &mut Vec<usize>, rng: &mut ChaCha8Rng, count: usize, size: usize) -> Vec<usize> {
    let mut batch = Vec::with_capacity(size);
    while batch.len() < size.min(count) {
        if order.is_empty() {
            *order = (0..count).collect();
            order.shuffle(rng);
        }
        batch.extend(order.pop());
    }
    batch
}

/// Trains `model` on `examples` for `config.steps` steps (with the white-box terms of a local
/// teacher where `white_box` has one, its projection trained alongside), calling `progress`
/// after each; stops early with an error when `cancel` is set.
pub fn train(
    model: &mut TrainableDecoder,
    examples: &[Example],
    config: &TrainConfig,
    cancel: &AtomicBool,
    white_box: Option<&WhiteBox>,
    mut progress: impl FnMut(&StepReport) + Send,
) -> Result<()> {
    if examples.is_empty() {
        bail!("no training examples");
    }
    model.fake_quant = config.fake_quant;
    training_pool(config)?.install(|| {
        let mut vars: Vec<Var> = model.vars().map(|(_, v)| v.clone()).collect();
        vars.extend(white_box.map(WhiteBox::vars).unwrap_or_default());
        let mut optimizer = adamw(&vars, config)?;
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let mut order: Vec<usize> = Vec::new();
        let weights = LossWeights {
            alpha: config.alpha,
            entropy: config.entropy_weight,
        };
        for step in 0..config.steps {
            if cancel.load(Ordering::Relaxed) {
                bail!("cancelled");
            }
            let batch: Vec<&Example> = next_batch(&mut order, &mut rng, examples.len(), config.batch_size)
                .into_iter()
                .map(|i| &examples[i])
                .collect();
            let tau = temperature(step, config.steps, config.tau_start, config.tau_end);
            let lr = learning_rate(step, config.steps, config.warmup_steps, config.learning_rate);
            let (loss, mut grads) = step_gradients(model, &batch, tau, weights, white_box)?;
            if !loss.total.is_finite() {
                bail!("the loss diverged at step {step} ({})", loss.total);
            }
            let grad_norm = clip_gradients(&mut grads, &vars, config.max_grad_norm)?;
            optimizer.set_learning_rate(lr);
            optimizer.step(&grads)?;
            progress(&StepReport {
                step: step + 1,
                steps: config.steps,
                loss,
                tau,
                learning_rate: lr,
                grad_norm,
            });
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learning_rate_warms_up_then_follows_a_cosine_to_a_tenth() {
        assert!((learning_rate(0, 100, 10, 1.0) - 0.1).abs() < 1e-12);
        assert!((learning_rate(9, 100, 10, 1.0) - 1.0).abs() < 1e-12);
        assert!((learning_rate(10, 100, 10, 1.0) - 1.0).abs() < 1e-12);
        assert!((learning_rate(55, 100, 10, 1.0) - 0.55).abs() < 1e-12);
        assert!((learning_rate(100, 100, 10, 1.0) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn batches_learn_only_completion_tokens_of_real_positions() {
        let a = Example {
            tokens: vec![5, 6, 7, 8],
            completion_start: 2,
            top: None,
        };
        let b = Example {
            tokens: vec![1, 2, 3],
            completion_start: 1,
            top: None,
        };
        let batch = make_batch(&[&a, &b], &Device::Cpu).unwrap();
        // Row a: logits at 1 and 2 predict 7 and 8; row b (offset 4): logits at 4, 5 -> 2, 3.
        assert_eq!(batch.positions.to_vec1::<u32>().unwrap(), vec![1, 2, 4, 5]);
        assert_eq!(batch.targets.to_vec1::<u32>().unwrap(), vec![7, 8, 2, 3]);
        assert_eq!(batch.input_ids.to_vec2::<u32>().unwrap()[1], vec![1, 2, 3, 0]);
        assert!(batch.top.is_none());
    }
}

//! The native decoder engine (issue 15): a Qwen2/Llama checkpoint loaded straight from its
//! safetensors, weights quantised to INT8 per channel (or FP16) at load, a KV cache allocated
//! once per slot, and a step that runs any mix of prompt rows and decode rows — each row one
//! token of the sequence in one slot at one position — so continuous batching is a matter of
//! which rows a step holds. The step is written once against [`Backend`]: the CUDA backend
//! (feature `cuda-native`) launches `kernels/decoder.cu`, and [`reference::CpuBackend`] is the
//! CPU reference every kernel is checked against.

pub mod backend;
#[cfg(feature = "cuda-native")]
pub mod device;
pub mod reference;
mod serving;

use std::path::Path;

pub use backend::{Backend, CacheShape, HostWeight, StepRows, WeightFormat};
pub use serving::NativeEngine;

use crate::checkpoint::{Checkpoint, CheckpointError, DecoderConfig, ModelConfig};

/// Largest head size the attention kernel takes.
pub const MAX_HEAD_DIM: usize = 256;

/// Why the native engine could not load or run a model.
#[derive(Debug, thiserror::Error)]
pub enum NativeError {
    /// The checkpoint could not be read.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The model is not one the engine runs (an encoder, too large a head).
    #[error("the native engine cannot run this model: {0}")]
    Unsupported(String),
    /// A step's rows do not fit the model or its slots.
    #[error("invalid step: {0}")]
    Shape(String),
    /// The weights and caches do not fit in the GPU's free memory.
    #[error(
        "not enough GPU memory: the model needs {needed_mib} MiB (weights and a KV cache of {slots} slots x {capacity} tokens), {free_mib} MiB are free"
    )]
    OutOfMemory {
        needed_mib: usize,
        free_mib: usize,
        slots: usize,
        capacity: usize,
    },
    /// The GPU or its kernels failed.
    #[cfg(feature = "cuda-native")]
    #[error(transparent)]
    Kernel(#[from] crate::kernels::KernelError),
}

struct Layer<B: Backend> {
    input_norm: B::Tensor,
    q: B::Linear,
    k: B::Linear,
    v: B::Linear,
    o: B::Linear,
    post_norm: B::Tensor,
    gate: B::Linear,
    up: B::Linear,
    down: B::Linear,
    cache: B::Cache,
}

/// A decoder checkpoint on a backend, with its slots.
pub struct NativeDecoder<B: Backend> {
    backend: B,
    config: DecoderConfig,
    embed: B::Table,
    layers: Vec<Layer<B>>,
    final_norm: B::Tensor,
    lm_head: B::Linear,
    inv_freq: B::Tensor,
    slots: usize,
    capacity: usize,
}

/// Loads the linear layer `name` (`.weight`, and `.bias` when `bias`).
fn linear<B: Backend>(
    backend: &B,
    ckpt: &Checkpoint,
    name: &str,
    (out, inputs): (usize, usize),
    bias: bool,
    format: WeightFormat,
) -> Result<B::Linear, NativeError> {
    let weight = ckpt.weights.f32(&format!("{name}.weight"))?;
    let bias = bias.then(|| ckpt.weights.f32(&format!("{name}.bias"))).transpose()?;
    backend.linear_weight(
        HostWeight::new(&weight, out, inputs, format),
        bias.as_deref(),
        out,
        inputs,
    )
}

/// Bytes of the weights in `format` and of the caches of `slots x capacity` tokens.
pub fn memory_needed(c: &DecoderConfig, format: WeightFormat, slots: usize, capacity: usize) -> usize {
    let per_weight = match format {
        WeightFormat::Int8 => 1,
        WeightFormat::Fp16 | WeightFormat::Bf16 => 2,
    };
    let (h, q, kv, m) = (
        c.hidden_size,
        c.num_heads * c.head_dim,
        c.num_kv_heads * c.head_dim,
        c.intermediate_size,
    );
    let layer = (h * q + 2 * h * kv + q * h + 3 * h * m) * per_weight;
    let cache = 2 * slots * capacity * kv * 2;
    c.vocab_size * h * 2 + c.vocab_size * h * per_weight + c.num_layers * (layer + cache)
}

impl<B: Backend> NativeDecoder<B> {
    /// Loads the decoder checkpoint in `dir` onto `backend` with `slots` sequences of up to
    /// `capacity` tokens each.
    pub fn load(
        dir: &Path,
        backend: B,
        format: WeightFormat,
        slots: usize,
        capacity: usize,
    ) -> Result<Self, NativeError> {
        let ckpt = Checkpoint::open(dir)?;
        let ModelConfig::Decoder(c) = ckpt.config.clone() else {
            return Err(NativeError::Unsupported(format!("{} is an encoder", dir.display())));
        };
        if c.head_dim > MAX_HEAD_DIM || !c.head_dim.is_multiple_of(2) {
            return Err(NativeError::Unsupported(format!(
                "head size {} (the kernels take even sizes up to {MAX_HEAD_DIM})",
                c.head_dim
            )));
        }
        if slots == 0 || capacity == 0 {
            return Err(NativeError::Unsupported("zero slots or a zero capacity".into()));
        }
        if let Some(free) = backend.free_bytes() {
            let needed = memory_needed(&c, format, slots, capacity);
            if needed > free {
                return Err(NativeError::OutOfMemory {
                    needed_mib: needed >> 20,
                    free_mib: free >> 20,
                    slots,
                    capacity,
                });
            }
        }
        let (h, q_out, kv_out, m) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
            c.intermediate_size,
        );
        let embed_values = ckpt.weights.f32("model.embed_tokens.weight")?;
        let embed = backend.table(&embed_values, h)?;
        let shape = CacheShape {
            slots,
            kv_heads: c.num_kv_heads,
            capacity,
            head_dim: c.head_dim,
        };
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            let norm = |name: &str| -> Result<B::Tensor, NativeError> {
                backend.tensor(&ckpt.weights.f32(&format!("{p}.{name}.weight"))?, h)
            };
            let lin = |name: &str, dims, bias| linear(&backend, &ckpt, &format!("{p}.{name}"), dims, bias, format);
            layers.push(Layer {
                input_norm: norm("input_layernorm")?,
                q: lin("self_attn.q_proj", (q_out, h), c.qkv_bias)?,
                k: lin("self_attn.k_proj", (kv_out, h), c.qkv_bias)?,
                v: lin("self_attn.v_proj", (kv_out, h), c.qkv_bias)?,
                o: lin("self_attn.o_proj", (h, q_out), c.o_bias)?,
                post_norm: norm("post_attention_layernorm")?,
                gate: lin("mlp.gate_proj", (m, h), c.mlp_bias)?,
                up: lin("mlp.up_proj", (m, h), c.mlp_bias)?,
                down: lin("mlp.down_proj", (h, m), c.mlp_bias)?,
                cache: backend.cache(shape)?,
            });
        }
        let final_norm = backend.tensor(&ckpt.weights.f32("model.norm.weight")?, h)?;
        let lm_head = if c.tie_word_embeddings {
            let weight = HostWeight::new(&embed_values, c.vocab_size, h, format);
            backend.linear_weight(weight, None, c.vocab_size, h)?
        } else {
            linear(&backend, &ckpt, "lm_head", (c.vocab_size, h), false, format)?
        };
        let inv_freq = c.rope.inv_freq(c.head_dim);
        let inv_freq = backend.tensor(&inv_freq, inv_freq.len())?;
        Ok(Self {
            backend,
            config: c,
            embed,
            layers,
            final_norm,
            lm_head,
            inv_freq,
            slots,
            capacity,
        })
    }

    /// The checkpoint's configuration.
    pub fn config(&self) -> &DecoderConfig {
        &self.config
    }

    /// Sequences the cache holds at once.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Tokens a slot holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The backend the model runs on.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Runs one step over `rows` (each row's K and V are written into its slot first, so a
    /// prompt's rows see each other causally) and returns the logits of the rows listed in
    /// `logits_of`, in that order. A slot's positions before a row's must have been run.
    pub fn step(&mut self, rows: &StepRows, logits_of: &[u32]) -> Result<Vec<Vec<f32>>, NativeError> {
        let Some(logits) = self.step_logits(rows, logits_of)? else {
            return Ok(Vec::new());
        };
        let values = self.backend.to_host(&logits)?;
        Ok(values.chunks(self.config.vocab_size).map(<[f32]>::to_vec).collect())
    }

    /// As [`Self::step`], leaving the logits `[logits_of.len(), vocab]` on the backend (for
    /// sampling on the device); None when `logits_of` is empty.
    pub fn step_logits(&mut self, rows: &StepRows, logits_of: &[u32]) -> Result<Option<B::Tensor>, NativeError> {
        self.check(rows, logits_of)?;
        let c = &self.config;
        let b = &self.backend;
        let eps = c.rms_norm_eps as f32;
        let device_rows = b.rows(rows)?;
        let mut x = b.embed(&self.embed, &rows.tokens)?;
        for layer in &mut self.layers {
            let normed = b.rms_norm(&x, &layer.input_norm, eps)?;
            let mut q = b.linear(&normed, &layer.q)?;
            let mut k = b.linear(&normed, &layer.k)?;
            let v = b.linear(&normed, &layer.v)?;
            b.rope(&mut q, &device_rows, &self.inv_freq, c.num_heads, c.head_dim)?;
            b.rope(&mut k, &device_rows, &self.inv_freq, c.num_kv_heads, c.head_dim)?;
            b.kv_append(&mut layer.cache, &k, &v, &device_rows)?;
            let attended = b.attention(&q, &layer.cache, &device_rows, c.num_heads)?;
            b.add(&mut x, &b.linear(&attended, &layer.o)?)?;
            let normed = b.rms_norm(&x, &layer.post_norm, eps)?;
            let mixed = b.silu_mul(&b.linear(&normed, &layer.gate)?, &b.linear(&normed, &layer.up)?)?;
            b.add(&mut x, &b.linear(&mixed, &layer.down)?)?;
        }
        if logits_of.is_empty() {
            return Ok(None);
        }
        let last = b.rms_norm(&b.gather(&x, logits_of)?, &self.final_norm, eps)?;
        Ok(Some(b.linear(&last, &self.lm_head)?))
    }

    /// Rejects rows outside the slots, the capacity or the vocabulary before any kernel runs.
    fn check(&self, rows: &StepRows, logits_of: &[u32]) -> Result<(), NativeError> {
        let n = rows.len();
        if n == 0 || rows.slots.len() != n || rows.positions.len() != n {
            return Err(NativeError::Shape(format!(
                "{n} tokens, {} slots, {} positions",
                rows.slots.len(),
                rows.positions.len()
            )));
        }
        for r in 0..n {
            let (token, slot, position) = (
                rows.tokens[r] as usize,
                rows.slots[r] as usize,
                rows.positions[r] as usize,
            );
            if token >= self.config.vocab_size || slot >= self.slots || position >= self.capacity {
                return Err(NativeError::Shape(format!(
                    "row {r}: token {token} (vocabulary {}), slot {slot} (of {}), position {position} (capacity {})",
                    self.config.vocab_size, self.slots, self.capacity
                )));
            }
        }
        if let Some(bad) = logits_of.iter().find(|&&r| r as usize >= n) {
            return Err(NativeError::Shape(format!("logits of row {bad} of {n}")));
        }
        Ok(())
    }
}

//! The native decoder engine (issue 15): a Qwen2/Llama checkpoint loaded straight from its
//! safetensors, weights quantised to INT8 per channel (or FP16) at load, a KV cache allocated
//! once per slot, and a step that runs any mix of prompt rows and decode rows — each row one
//! token of the sequence in one slot at one position — so continuous batching is a matter of
//! which rows a step holds. The step is written once against [`Backend`]: the CUDA backend
//! (feature `cuda-native`) launches `kernels/decoder.cu`, and [`reference::CpuBackend`] is the
//! CPU reference every kernel is checked against.
//!
//! A step writes its activations into a [`Workspace`] allocated at load for a decode step of
//! every slot, so a decode step of n rows launches the same kernels on the same buffers each
//! time: the first one of each n is recorded as a CUDA graph and later ones replay it (as
//! vLLM and TensorRT-LLM do), which saves the launch overhead of the ~16 kernels a layer.
//! Steps with more rows (prefills) run eagerly in a workspace of their own.

pub mod backend;
#[cfg(feature = "cuda-native")]
pub mod device;
pub mod reference;
mod serving;
mod workspace;

use std::collections::HashMap;
use std::path::Path;

pub use backend::{Backend, CacheShape, HostWeight, StepRows, WeightFormat};
pub use serving::NativeEngine;
use workspace::Workspace;

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

/// The weights and caches of a decoder on a backend.
struct Model<B: Backend> {
    embed: B::Table,
    layers: Vec<Layer<B>>,
    final_norm: B::Tensor,
    lm_head: B::Linear,
    inv_freq: B::Tensor,
}

/// A decoder checkpoint on a backend, with its slots.
pub struct NativeDecoder<B: Backend> {
    backend: B,
    config: DecoderConfig,
    model: Model<B>,
    /// Activations of steps of up to `slots` rows (what graphs are recorded on).
    workspace: Workspace<B>,
    /// Activations of the last step too big for `workspace`, until a step fits again.
    spill: Option<Workspace<B>>,
    /// A recorded decode step for each row count seen, while graphs are on.
    graphs: HashMap<usize, B::Graph>,
    use_graphs: bool,
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
    c.vocab_size * h * 2
        + c.vocab_size * h * per_weight
        + c.num_layers * (layer + cache)
        + workspace::bytes(c, slots, slots)
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
        let workspace = Workspace::new(&backend, &c, slots, slots)?;
        Ok(Self {
            backend,
            config: c,
            model: Model {
                embed,
                layers,
                final_norm,
                lm_head,
                inv_freq,
            },
            workspace,
            spill: None,
            graphs: HashMap::new(),
            use_graphs: true,
            slots,
            capacity,
        })
    }

    /// Whether decode steps are recorded as graphs and replayed (on by default; the CPU
    /// backend has none and always runs eagerly).
    pub fn set_graphs(&mut self, on: bool) {
        self.use_graphs = on;
        if !on {
            self.graphs.clear();
        }
    }

    /// How many decode step shapes (row counts) are recorded as graphs.
    pub fn recorded_graphs(&self) -> usize {
        self.graphs.len()
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
        self.run(rows, logits_of)?;
        if logits_of.is_empty() {
            return Ok(Vec::new());
        }
        let values = self.backend.to_host(self.logits(), logits_of.len())?;
        Ok(values.chunks(self.config.vocab_size).map(<[f32]>::to_vec).collect())
    }

    /// As [`Self::step`], leaving the logits on the backend (for sampling on the device): their
    /// first `logits_of.len()` rows of `vocab`; None when `logits_of` is empty.
    pub fn step_logits(&mut self, rows: &StepRows, logits_of: &[u32]) -> Result<Option<&B::Tensor>, NativeError> {
        self.run(rows, logits_of)?;
        Ok((!logits_of.is_empty()).then(|| self.logits()))
    }

    /// The logits of the last step: in the spill workspace when it had one.
    fn logits(&self) -> &B::Tensor {
        &self.spill.as_ref().unwrap_or(&self.workspace).logits
    }

    /// Runs a step, leaving its logits in [`Self::logits`].
    fn run(&mut self, rows: &StepRows, logits_of: &[u32]) -> Result<(), NativeError> {
        self.check(rows, logits_of)?;
        let (n, wanted) = (rows.len(), logits_of.len());
        let Self {
            backend,
            config,
            model,
            workspace,
            spill,
            graphs,
            use_graphs,
            ..
        } = self;
        let fits = workspace.fits(n, wanted);
        let ws = if fits {
            *spill = None;
            workspace
        } else {
            match spill {
                Some(big) if big.fits(n, wanted) => big,
                other => {
                    *other = None;
                    other.insert(Workspace::new(backend, config, n, wanted)?)
                }
            }
        };
        backend.write_rows(rows, logits_of, &mut ws.inputs)?;
        // A decode step (every row's logits, in order) repeats its shape: record it once.
        let decode = logits_of.iter().enumerate().all(|(i, &r)| r as usize == i) && wanted == n;
        if !(*use_graphs && decode && fits) {
            forward(backend, config, model, ws, wanted > 0)?;
        } else if let Some(graph) = graphs.get(&n) {
            backend.replay(graph)?;
        } else {
            let recorded = backend.record(&mut || forward(backend, config, model, ws, true));
            match recorded {
                Ok(Some(graph)) => {
                    backend.replay(&graph)?;
                    graphs.insert(n, graph);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, rows = n, "recording a decode step as a CUDA graph failed; running eagerly from now on");
                    *use_graphs = false;
                    forward(backend, config, model, ws, true)?;
                }
            }
        }
        Ok(())
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

/// Enqueues a step whose inputs are in `ws.inputs`: every layer over its rows, then (when
/// `logits`) the final norm and the LM head over the rows whose logits are wanted.
fn forward<B: Backend>(
    b: &B,
    c: &DecoderConfig,
    model: &mut Model<B>,
    ws: &mut Workspace<B>,
    logits: bool,
) -> Result<(), NativeError> {
    let eps = c.rms_norm_eps as f32;
    let rows = &ws.inputs;
    b.embed(&model.embed, rows, &mut ws.x)?;
    for layer in &mut model.layers {
        b.rms_norm(&ws.x, &layer.input_norm, eps, &mut ws.normed)?;
        b.linear(&ws.normed, &layer.q, &mut ws.q)?;
        b.linear(&ws.normed, &layer.k, &mut ws.k)?;
        b.linear(&ws.normed, &layer.v, &mut ws.v)?;
        b.rope(&mut ws.q, rows, &model.inv_freq, c.num_heads, c.head_dim)?;
        b.rope(&mut ws.k, rows, &model.inv_freq, c.num_kv_heads, c.head_dim)?;
        b.kv_append(&mut layer.cache, &ws.k, &ws.v, rows)?;
        b.attention(&ws.q, &layer.cache, rows, c.num_heads, &mut ws.attended)?;
        b.linear(&ws.attended, &layer.o, &mut ws.delta)?;
        b.add(&mut ws.x, &ws.delta)?;
        b.rms_norm(&ws.x, &layer.post_norm, eps, &mut ws.normed)?;
        b.linear(&ws.normed, &layer.gate, &mut ws.gate)?;
        b.linear(&ws.normed, &layer.up, &mut ws.up)?;
        b.silu_mul(&ws.gate, &ws.up, &mut ws.mixed)?;
        b.linear(&ws.mixed, &layer.down, &mut ws.delta)?;
        b.add(&mut ws.x, &ws.delta)?;
    }
    if logits {
        b.gather(&ws.x, rows, &mut ws.gathered)?;
        b.rms_norm(&ws.gathered, &model.final_norm, eps, &mut ws.last)?;
        b.linear(&ws.last, &model.lm_head, &mut ws.logits)?;
    }
    Ok(())
}

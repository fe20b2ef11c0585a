//! A trainable Qwen2 / Llama decoder in candle, on the checkpoint's own tensor names.
//!
//! `candle-transformers`' models use fused kernels (rope, softmax, RMS norm) that have no
//! backward pass, so training through them leaves most weights without a gradient (see
//! `NOTES.md`). This forward uses plain differentiable ops only; a test checks it against the
//! `candle-transformers` reference and that every tensor receives a gradient.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{D, DType, Device, Tensor, Var};

use crate::checkpoint::{Checkpoint, DecoderConfig, ModelConfig, TensorRole, tensor_specs};

/// Large negative score for masked attention positions (finite, so a fully masked padding row
/// stays free of NaNs).
const MASKED: f32 = -1e9;

/// A decoder whose weights are trainable variables.
pub struct TrainableDecoder {
    config: DecoderConfig,
    weights: Weights,
    inv_freq: Tensor,
    /// Round linear weights to INT8 in the forward pass (quantisation-aware training).
    pub fake_quant: bool,
}

impl TrainableDecoder {
    /// Loads the decoder checkpoint in `dir` as FP32 variables on the CPU.
    pub fn load(dir: &Path) -> Result<Self> {
        let ckpt = Checkpoint::open(dir)?;
        let ModelConfig::Decoder(config) = ckpt.config.clone() else {
            bail!("{}: only decoders (Qwen2, Llama) can be distilled", dir.display())
        };
        let weights = Weights::load(&ckpt)?;
        let inv_freq = Tensor::new(config.rope.inv_freq(config.head_dim), &Device::Cpu)?;
        Ok(Self {
            config,
            weights,
            inv_freq,
            fake_quant: false,
        })
    }

    /// The architecture.
    pub fn config(&self) -> &DecoderConfig {
        &self.config
    }

    /// Every trainable variable with its name.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.weights.iter()
    }

    /// Writes the weights as `model.safetensors` in `dir` (the checkpoint layout it came from),
    /// in the element type the checkpoint had (a bf16 student stays bf16).
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.weights.save(dir)
    }

    fn weight(&self, name: &str) -> Result<Tensor> {
        let w = self.weights.get(name)?;
        if self.fake_quant && self.weights.role(name) == Some(TensorRole::Linear) {
            // Straight-through estimator: the forward sees the INT8-rounded weight, the
            // gradient flows to the FP32 one as if rounding were the identity.
            let rounded = fake_quantize_rows(&w)?;
            return Ok((&w + (rounded - &w)?.detach())?);
        }
        Ok(w)
    }

    fn linear(&self, x: &Tensor, prefix: &str, bias: bool) -> Result<Tensor> {
        let w = self.weight(&format!("{prefix}.weight"))?;
        let y = matmul_rows(x, &w)?;
        if bias {
            Ok(y.broadcast_add(&self.weight(&format!("{prefix}.bias"))?)?)
        } else {
            Ok(y)
        }
    }

    fn rms_norm(&self, x: &Tensor, name: &str) -> Result<Tensor> {
        let variance = x.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = x.broadcast_div(&(variance + self.config.rms_norm_eps)?.sqrt()?)?;
        Ok(normed.broadcast_mul(&self.weight(name)?)?)
    }

    /// Logits `[batch, seq, vocab]` of right-padded `input_ids` (`[batch, seq]`, u32);
    /// `lengths` are the real lengths of the rows.
    pub fn forward(&self, input_ids: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let hidden = self.hidden(input_ids, lengths)?;
        self.project(&hidden)
    }

    /// Logits `[n, vocab]` of the flat positions `positions` (indices into `batch * seq`):
    /// training needs only the positions it learns from, and the vocabulary projection is the
    /// widest matrix.
    pub fn forward_at(&self, input_ids: &Tensor, lengths: &[usize], positions: &Tensor) -> Result<Tensor> {
        Ok(self.traced_at(input_ids, lengths, positions, &[])?.0)
    }

    /// As [`Self::forward_at`], with the internals white-box distillation compares: the
    /// output of each layer in `layers` (0-based, increasing; `[batch, seq, hidden]`) and its
    /// attention probabilities (`[batch, heads, seq, seq]`), first layer first.
    pub fn traced_at(
        &self,
        input_ids: &Tensor,
        lengths: &[usize],
        positions: &Tensor,
        layers: &[usize],
    ) -> Result<(Tensor, Trace)> {
        let (hidden, trace) = self.hidden_traced(input_ids, lengths, layers)?;
        let flat = hidden.reshape(((), self.config.hidden_size))?;
        Ok((self.project(&flat.index_select(positions, 0)?)?, trace))
    }

    fn project(&self, hidden: &Tensor) -> Result<Tensor> {
        let head = if self.config.tie_word_embeddings {
            self.weight("model.embed_tokens.weight")?
        } else {
            self.weight("lm_head.weight")?
        };
        matmul_rows(hidden, &head)
    }

    /// Final hidden states `[batch, seq, hidden]`, after the last norm.
    fn hidden(&self, input_ids: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        Ok(self.hidden_traced(input_ids, lengths, &[])?.0)
    }

    /// Final hidden states, and the trace of the layers in `layers`.
    pub(super) fn hidden_traced(
        &self,
        input_ids: &Tensor,
        lengths: &[usize],
        layers: &[usize],
    ) -> Result<(Tensor, Trace)> {
        let c = &self.config;
        let mut trace = Trace::default();
        let (batch, seq) = input_ids.dims2()?;
        let dev = input_ids.device();
        let embed = self.weight("model.embed_tokens.weight")?;
        let mut x = embed
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((batch, seq, c.hidden_size))?;
        let (cos, sin) = self.rope_tables(seq)?;
        let mask = attention_mask(lengths, seq, dev)?;
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            let h = self.rms_norm(&x, &format!("{p}.input_layernorm.weight"))?;
            let (attn, probs) = self.attention(&h, &p, &cos, &sin, &mask)?;
            let traced = layers.contains(&i);
            if traced {
                trace.attentions.push(probs);
            }
            x = (x + attn)?;
            let h = self.rms_norm(&x, &format!("{p}.post_attention_layernorm.weight"))?;
            let gate = self.linear(&h, &format!("{p}.mlp.gate_proj"), c.mlp_bias)?;
            let up = self.linear(&h, &format!("{p}.mlp.up_proj"), c.mlp_bias)?;
            let act = silu(&gate)?.mul(&up)?;
            x = (x + self.linear(&act, &format!("{p}.mlp.down_proj"), c.mlp_bias)?)?;
            if traced {
                trace.hidden.push(x.clone());
            }
        }
        Ok((self.rms_norm(&x, "model.norm.weight")?, trace))
    }

    /// `cos` and `sin` tables `[seq, head_dim]` in the rotate-half layout `transformers` uses.
    fn rope_tables(&self, seq: usize) -> Result<(Tensor, Tensor)> {
        let positions = Tensor::arange(0u32, seq as u32, &Device::Cpu)?.to_dtype(DType::F32)?;
        let freqs = positions.unsqueeze(1)?.broadcast_mul(&self.inv_freq.unsqueeze(0)?)?;
        let freqs = Tensor::cat(&[&freqs, &freqs], 1)?;
        Ok((freqs.cos()?, freqs.sin()?))
    }

    /// The attention block's output and its attention probabilities `[batch, heads, seq, seq]`.
    fn attention(&self, h: &Tensor, p: &str, cos: &Tensor, sin: &Tensor, mask: &Tensor) -> Result<(Tensor, Tensor)> {
        let c = &self.config;
        let (batch, seq, _) = h.dims3()?;
        let heads = |x: Tensor, n: usize| -> Result<Tensor> {
            Ok(x.reshape((batch, seq, n, c.head_dim))?.transpose(1, 2)?.contiguous()?)
        };
        let q = heads(
            self.linear(h, &format!("{p}.self_attn.q_proj"), c.qkv_bias)?,
            c.num_heads,
        )?;
        let k = heads(
            self.linear(h, &format!("{p}.self_attn.k_proj"), c.qkv_bias)?,
            c.num_kv_heads,
        )?;
        let v = heads(
            self.linear(h, &format!("{p}.self_attn.v_proj"), c.qkv_bias)?,
            c.num_kv_heads,
        )?;
        let (q, k) = (rotate(&q, cos, sin)?, rotate(&k, cos, sin)?);
        let (k, v) = (self.repeat_kv(k)?, self.repeat_kv(v)?);
        let scores = (q.matmul(&k.t()?)? / (c.head_dim as f64).sqrt())?.broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let out = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((batch, seq, c.num_heads * c.head_dim))?;
        Ok((self.linear(&out, &format!("{p}.self_attn.o_proj"), c.o_bias)?, probs))
    }

    /// Grouped-query attention: each key/value head serves `num_heads / num_kv_heads`
    /// consecutive query heads.
    fn repeat_kv(&self, x: Tensor) -> Result<Tensor> {
        let c = &self.config;
        let groups = c.num_heads / c.num_kv_heads;
        if groups == 1 {
            return Ok(x);
        }
        let (batch, kv, seq, dim) = x.dims4()?;
        Ok(x.unsqueeze(2)?
            .broadcast_as((batch, kv, groups, seq, dim))?
            .reshape((batch, kv * groups, seq, dim))?)
    }
}

/// What a traced forward keeps of its last layers, first layer first.
#[derive(Debug, Default)]
pub struct Trace {
    /// Each layer's output (the residual stream), `[batch, seq, hidden]`.
    pub hidden: Vec<Tensor>,
    /// Each layer's attention probabilities, `[batch, heads, seq, seq]`.
    pub attentions: Vec<Tensor>,
}

/// A checkpoint's tensors as trainable FP32 variables by their Hugging Face names, with their
/// roles and the element type the checkpoint stored them in (saving keeps it: a bf16 student
/// stays bf16).
pub(super) struct Weights {
    vars: BTreeMap<String, Var>,
    roles: BTreeMap<String, TensorRole>,
    stored: DType,
}

impl Weights {
    /// Every tensor of `ckpt`, on the CPU.
    pub(super) fn load(ckpt: &Checkpoint) -> Result<Self> {
        let mut vars = BTreeMap::new();
        let mut roles = BTreeMap::new();
        let specs = tensor_specs(&ckpt.config);
        let stored = match specs.first().map(|s| ckpt.weights.meta(&s.name)).transpose()? {
            Some(meta) if meta.dtype == safetensors::Dtype::BF16 => DType::BF16,
            Some(meta) if meta.dtype == safetensors::Dtype::F16 => DType::F16,
            _ => DType::F32,
        };
        for spec in specs {
            let data = ckpt.weights.f32(&spec.name)?;
            let tensor = Tensor::from_vec(data, spec.shape.as_slice(), &Device::Cpu)?;
            vars.insert(spec.name.clone(), Var::from_tensor(&tensor)?);
            roles.insert(spec.name, spec.role);
        }
        Ok(Self { vars, roles, stored })
    }

    /// Every variable with its name.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.vars.iter().map(|(n, v)| (n.as_str(), v))
    }

    /// The current value of tensor `name`.
    pub(super) fn get(&self, name: &str) -> Result<Tensor> {
        let var = self.vars.get(name).with_context(|| format!("no tensor {name}"))?;
        Ok(var.as_tensor().clone())
    }

    /// What tensor `name` is.
    pub(super) fn role(&self, name: &str) -> Option<TensorRole> {
        self.roles.get(name).copied()
    }

    /// Writes the weights as `model.safetensors` in `dir`, in the stored element type.
    pub(super) fn save(&self, dir: &Path) -> Result<()> {
        let tensors = self
            .vars
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().to_dtype(self.stored)?)))
            .collect::<Result<std::collections::HashMap<String, Tensor>>>()?;
        let path = dir.join("model.safetensors");
        candle_core::safetensors::save(&tensors, &path).with_context(|| format!("writing {}", path.display()))
    }
}

/// `x @ w^T` for `x` of any rank (`[..., in]`) and `w` `[out, in]`: one 2-D matmul over the
/// flattened rows, since a broadcast batched matmul copies the weight once per batch row.
pub(super) fn matmul_rows(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    let inner = dims.pop().context("matmul of a scalar")?;
    let rows = x.reshape(((), inner))?.matmul(&w.t()?)?;
    dims.push(w.dim(0)?);
    Ok(rows.reshape(dims)?)
}

/// `x * sigmoid(x)` from plain ops.
fn silu(x: &Tensor) -> Result<Tensor> {
    Ok(x.div(&(x.neg()?.exp()? + 1.0)?)?)
}

/// Rotary embedding, rotate-half form, from plain ops.
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?)
}

/// Causal mask plus right-padding mask, `[batch, 1, seq, seq]`, added to attention scores.
fn attention_mask(lengths: &[usize], seq: usize, dev: &Device) -> Result<Tensor> {
    let mut data = Vec::with_capacity(lengths.len() * seq * seq);
    for &len in lengths {
        for q in 0..seq {
            data.extend((0..seq).map(|k| if k <= q && k < len.max(1) { 0.0 } else { MASKED }));
        }
    }
    Ok(Tensor::from_vec(data, (lengths.len(), 1, seq, seq), dev)?)
}

/// Symmetric per-output-row INT8 rounding (`[out, in]` weights), as the exporter quantises.
fn fake_quantize_rows(w: &Tensor) -> Result<Tensor> {
    let scale = (w.abs()?.max_keepdim(D::Minus1)? / 127.0)?.clamp(1e-12, f32::MAX)?;
    let q = w.broadcast_div(&scale)?.round()?.clamp(-127.0, 127.0)?;
    Ok(q.broadcast_mul(&scale)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_quantisation_keeps_row_extremes_and_rounds_to_127_levels() {
        let w = Tensor::new(&[[1.0f32, -0.5, 0.003], [0.0, 0.0, 0.0]], &Device::Cpu).unwrap();
        let q = fake_quantize_rows(&w).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(q[0][0], 1.0);
        assert!((q[0][1] + 64.0 / 127.0).abs() < 1e-6, "{}", q[0][1]);
        assert_eq!(q[0][2], 0.0);
        assert_eq!(q[1], vec![0.0, 0.0, 0.0]);
    }

    #[test]
    fn the_mask_is_causal_and_hides_padding() {
        let m = attention_mask(&[2, 3], 3, &Device::Cpu).unwrap();
        let m = m.squeeze(1).unwrap().to_vec3::<f32>().unwrap();
        assert_eq!(m[0][2], vec![0.0, 0.0, MASKED]);
        assert_eq!(m[1][0], vec![0.0, MASKED, MASKED]);
        assert_eq!(m[1][2], vec![0.0, 0.0, 0.0]);
    }
}

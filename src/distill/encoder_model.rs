//! A trainable BERT / XLM-RoBERTa encoder in candle, on the checkpoint's own tensor names and
//! from plain differentiable ops (as [`super::model`] for decoders): the forward the exported
//! graph computes, so a trained checkpoint exports unchanged. Tests check it against the
//! `candle-transformers` reference and that every tensor receives a gradient.

use std::path::Path;

use anyhow::{Result, bail};
use candle_core::{D, Device, Tensor, Var};

use super::model::{Weights, matmul_rows};
use crate::checkpoint::{Checkpoint, EncoderConfig, EncoderHead, Family, ModelConfig};

/// Large negative score on padding keys (finite: no NaNs).
const MASKED: f32 = -1e9;

/// An encoder whose weights are trainable variables.
pub struct TrainableEncoder {
    config: EncoderConfig,
    weights: Weights,
}

impl TrainableEncoder {
    /// Loads the encoder checkpoint in `dir` as FP32 variables on the CPU.
    pub fn load(dir: &Path) -> Result<Self> {
        let ckpt = Checkpoint::open(dir)?;
        let ModelConfig::Encoder(config) = ckpt.config.clone() else {
            bail!("{} is not an encoder (BERT, XLM-RoBERTa)", dir.display())
        };
        let weights = Weights::load(&ckpt)?;
        Ok(Self { config, weights })
    }

    /// The architecture.
    pub fn config(&self) -> &EncoderConfig {
        &self.config
    }

    /// Every trainable variable with its name.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.weights.iter()
    }

    /// Writes the weights as `model.safetensors` in `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.weights.save(dir)
    }

    fn weight(&self, name: &str) -> Result<Tensor> {
        self.weights.get(name)
    }

    fn linear(&self, x: &Tensor, prefix: &str) -> Result<Tensor> {
        let y = matmul_rows(x, &self.weight(&format!("{prefix}.weight"))?)?;
        Ok(y.broadcast_add(&self.weight(&format!("{prefix}.bias"))?)?)
    }

    fn layer_norm(&self, x: &Tensor, prefix: &str) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let centred = x.broadcast_sub(&mean)?;
        let variance = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(variance + self.config.layer_norm_eps)?.sqrt()?)?;
        let scaled = normed.broadcast_mul(&self.weight(&format!("{prefix}.weight"))?)?;
        Ok(scaled.broadcast_add(&self.weight(&format!("{prefix}.bias"))?)?)
    }

    /// The head's output for right-padded `input_ids` (`[batch, seq]`, u32) whose rows are
    /// `lengths` long: `[batch, labels]` for sequence classification, `[batch, seq, labels]` per
    /// token, `[batch, seq, hidden]` without a head.
    pub fn forward(&self, input_ids: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let x = self.hidden(input_ids, lengths)?;
        match (self.config.head, self.config.family) {
            (EncoderHead::SequenceClassification, family) => {
                let (dense, out) = match family {
                    Family::XlmRoberta => ("classifier.dense", "classifier.out_proj"),
                    _ => ("bert.pooler.dense", "classifier"),
                };
                let first = x.narrow(1, 0, 1)?.squeeze(1)?;
                let pooled = self.linear(&first, dense)?.tanh()?;
                self.linear(&pooled, out)
            }
            (EncoderHead::TokenClassification, _) => self.linear(&x, "classifier"),
            (EncoderHead::Embeddings, _) => Ok(x),
        }
    }

    /// Last hidden states `[batch, seq, hidden]`.
    fn hidden(&self, input_ids: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let c = &self.config;
        let (batch, seq) = input_ids.dims2()?;
        let dev = input_ids.device();
        let e = format!("{}embeddings", c.prefix());
        let gather = |name: &str, ids: &Tensor| -> Result<Tensor> {
            let table = self.weight(&format!("{e}.{name}.weight"))?;
            Ok(table
                .index_select(&ids.flatten_all()?, 0)?
                .reshape((batch, seq, c.hidden_size))?)
        };
        // Positions as the export numbers them (offset by XLM-RoBERTa's padding id; padding
        // keys are masked, so their position does not matter).
        let offset = c.position_offset() as u32;
        let positions: Vec<u32> = (0..batch).flat_map(|_| (0..seq as u32).map(|p| p + offset)).collect();
        let positions = Tensor::from_vec(positions, (batch, seq), dev)?;
        let types = self
            .weight(&format!("{e}.token_type_embeddings.weight"))?
            .narrow(0, 0, 1)?;
        let x = (gather("word_embeddings", input_ids)? + gather("position_embeddings", &positions)?)?;
        let mut x = self.layer_norm(&x.broadcast_add(&types)?, &format!("{e}.LayerNorm"))?;
        let mask = padding_mask(lengths, seq, dev)?;
        for layer in 0..c.num_layers {
            x = self.layer(&x, &mask, layer)?;
        }
        Ok(x)
    }

    fn layer(&self, x: &Tensor, mask: &Tensor, layer: usize) -> Result<Tensor> {
        let c = &self.config;
        let p = format!("{}encoder.layer.{layer}", c.prefix());
        let (batch, seq, hidden) = x.dims3()?;
        let d = hidden / c.num_heads;
        let heads = |name: &str| -> Result<Tensor> {
            let y = self.linear(x, &format!("{p}.attention.self.{name}"))?;
            Ok(y.reshape((batch, seq, c.num_heads, d))?.transpose(1, 2)?.contiguous()?)
        };
        let (q, k, v) = (heads("query")?, heads("key")?, heads("value")?);
        let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?.broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((batch, seq, hidden))?;
        let attn = self.linear(&ctx, &format!("{p}.attention.output.dense"))?;
        let x = self.layer_norm(&(x + attn)?, &format!("{p}.attention.output.LayerNorm"))?;
        let h = self.linear(&x, &format!("{p}.intermediate.dense"))?.gelu_erf()?;
        let h = self.linear(&h, &format!("{p}.output.dense"))?;
        self.layer_norm(&(x + h)?, &format!("{p}.output.LayerNorm"))
    }
}

/// `[batch, 1, 1, seq]`: 0 on each row's first `length` keys, [`MASKED`] on its padding.
fn padding_mask(lengths: &[usize], seq: usize, dev: &Device) -> Result<Tensor> {
    let data: Vec<f32> = lengths
        .iter()
        .flat_map(|&len| (0..seq).map(move |k| if k < len { 0.0 } else { MASKED }))
        .collect();
    Ok(Tensor::from_vec(data, (lengths.len(), 1, 1, seq), dev)?)
}

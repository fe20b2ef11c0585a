//! Reference forward passes with `candle-transformers`, an implementation this project did not
//! write, on the same checkpoint files: tests compare the ONNX exports against them.
//!
//! Sequences are run one at a time, unpadded, so a padded ONNX batch is checked against the
//! padding-free answer.

use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::{Linear, VarBuilder};
use candle_transformers::models::{bert, llama, qwen2, xlm_roberta};

use crate::checkpoint::{Checkpoint, DecoderConfig, EncoderConfig, EncoderHead, Family, ModelConfig, RopeScaling};

/// A causal decoder from `candle-transformers`.
pub struct ReferenceDecoder {
    inner: DecoderImpl,
}

enum DecoderImpl {
    Qwen2 { model: qwen2::Model, lm_head: Linear },
    Llama { model: llama::Llama, config: llama::Config },
}

fn var_builder(ckpt: &Checkpoint) -> Result<VarBuilder<'static>> {
    let files: Vec<&Path> = ckpt.weights.files().collect();
    // SAFETY: the checkpoint files are read-only for the lifetime of the reference model.
    Ok(unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, &Device::Cpu)? })
}

fn row(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

impl ReferenceDecoder {
    /// Loads the decoder checkpoint in `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let ckpt = Checkpoint::open(dir)?;
        let ModelConfig::Decoder(c) = &ckpt.config else {
            bail!("{} is not a decoder", dir.display())
        };
        let vb = var_builder(&ckpt)?;
        let inner = match c.family {
            Family::Qwen2 => {
                let config = qwen2_config(c);
                let model = qwen2::Model::new(&config, vb.clone())?;
                let head = if c.tie_word_embeddings {
                    "model.embed_tokens"
                } else {
                    "lm_head"
                };
                let lm_head = candle_nn::linear_no_bias(c.hidden_size, c.vocab_size, vb.pp(head))?;
                DecoderImpl::Qwen2 { model, lm_head }
            }
            Family::Llama => {
                let config = llama_config(c);
                let model = llama::Llama::load(vb, &config)?;
                DecoderImpl::Llama { model, config }
            }
            Family::Bert | Family::XlmRoberta => bail!("{} is an encoder, not a decoder", dir.display()),
        };
        Ok(Self { inner })
    }

    /// Logits `[position][vocab]` of every position of `tokens`, from an empty cache.
    pub fn logits(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        match &mut self.inner {
            DecoderImpl::Qwen2 { model, lm_head } => {
                model.clear_kv_cache();
                let ids = Tensor::new(tokens, &Device::Cpu)?.unsqueeze(0)?;
                let logits = model.forward(&ids, 0, None)?.apply(lm_head)?.squeeze(0)?;
                Ok(logits.to_vec2::<f32>()?)
            }
            // candle's Llama returns the last position only: step through the sequence with
            // its cache.
            DecoderImpl::Llama { model, config } => {
                let mut cache = llama::Cache::new(true, DType::F32, config, &Device::Cpu)?;
                tokens
                    .iter()
                    .enumerate()
                    .map(|(pos, &t)| row(&model.forward(&Tensor::new(&[[t]], &Device::Cpu)?, pos, &mut cache)?))
                    .collect()
            }
        }
    }

    /// Greedy continuation of `prompt` by `n` tokens, using the model's own cache.
    pub fn greedy(&mut self, prompt: &[u32], n: usize) -> Result<Vec<u32>> {
        let argmax = |v: &[f32]| {
            v.iter()
                .enumerate()
                .fold(
                    (0u32, f32::NEG_INFINITY),
                    |best, (i, &x)| if x > best.1 { (i as u32, x) } else { best },
                )
                .0
        };
        let mut out = Vec::with_capacity(n);
        let dev = Device::Cpu;
        match &mut self.inner {
            DecoderImpl::Qwen2 { model, lm_head } => {
                model.clear_kv_cache();
                let ids = Tensor::new(prompt, &dev)?.unsqueeze(0)?;
                let hidden = model.forward(&ids, 0, None)?;
                let mut logits = row(&hidden.i((.., prompt.len() - 1, ..))?.apply(lm_head)?)?;
                for step in 0..n {
                    let next = argmax(&logits);
                    out.push(next);
                    if step + 1 < n {
                        let hidden = model.forward(&Tensor::new(&[[next]], &dev)?, prompt.len() + step, None)?;
                        logits = row(&hidden.apply(lm_head)?)?;
                    }
                }
            }
            DecoderImpl::Llama { model, config } => {
                let mut cache = llama::Cache::new(true, DType::F32, config, &dev)?;
                let ids = Tensor::new(prompt, &dev)?.unsqueeze(0)?;
                let mut logits = row(&model.forward(&ids, 0, &mut cache)?)?;
                for step in 0..n {
                    let next = argmax(&logits);
                    out.push(next);
                    if step + 1 < n {
                        logits =
                            row(&model.forward(&Tensor::new(&[[next]], &dev)?, prompt.len() + step, &mut cache)?)?;
                    }
                }
            }
        }
        Ok(out)
    }
}

fn qwen2_config(c: &DecoderConfig) -> qwen2::Config {
    qwen2::Config {
        vocab_size: c.vocab_size,
        hidden_size: c.hidden_size,
        intermediate_size: c.intermediate_size,
        num_hidden_layers: c.num_layers,
        num_attention_heads: c.num_heads,
        num_key_value_heads: c.num_kv_heads,
        max_position_embeddings: c.max_position_embeddings,
        sliding_window: c.max_position_embeddings,
        max_window_layers: c.num_layers,
        tie_word_embeddings: c.tie_word_embeddings,
        rope_theta: c.rope.theta,
        rms_norm_eps: c.rms_norm_eps,
        use_sliding_window: false,
        hidden_act: candle_nn::Activation::Silu,
    }
}

fn llama_config(c: &DecoderConfig) -> llama::Config {
    let rope_scaling = match c.rope.scaling {
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => Some(llama::Llama3RopeConfig {
            factor: factor as f32,
            low_freq_factor: low_freq_factor as f32,
            high_freq_factor: high_freq_factor as f32,
            original_max_position_embeddings: original_max_position_embeddings as usize,
            rope_type: llama::Llama3RopeType::Llama3,
        }),
        _ => None,
    };
    llama::Config {
        hidden_size: c.hidden_size,
        intermediate_size: c.intermediate_size,
        vocab_size: c.vocab_size,
        num_hidden_layers: c.num_layers,
        num_attention_heads: c.num_heads,
        num_key_value_heads: c.num_kv_heads,
        use_flash_attn: false,
        rms_norm_eps: c.rms_norm_eps,
        rope_theta: c.rope.theta as f32,
        bos_token_id: c.bos_token_id,
        eos_token_id: None,
        rope_scaling,
        max_position_embeddings: c.max_position_embeddings,
        tie_word_embeddings: c.tie_word_embeddings,
    }
}

/// An encoder from `candle-transformers` (its BERT or XLM-RoBERTa) with the task head on top
/// (none for a bare model).
pub struct ReferenceEncoder {
    inner: EncoderImpl,
}

enum EncoderImpl {
    Bert {
        model: bert::BertModel,
        pooler: Option<Linear>,
        classifier: Option<Linear>,
    },
    /// candle's own XLM-RoBERTa classification head.
    XlmRobertaSequence(xlm_roberta::XLMRobertaForSequenceClassification),
    XlmRoberta {
        model: xlm_roberta::XLMRobertaModel,
        classifier: Option<Linear>,
    },
}

impl ReferenceEncoder {
    /// Loads the encoder checkpoint in `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let ckpt = Checkpoint::open(dir)?;
        let ModelConfig::Encoder(c) = &ckpt.config else {
            bail!("{} is not an encoder", dir.display())
        };
        let vb = var_builder(&ckpt)?;
        let classifier = match c.head {
            EncoderHead::TokenClassification => {
                Some(candle_nn::linear(c.hidden_size, c.labels.len(), vb.pp("classifier"))?)
            }
            _ => None,
        };
        let inner = match (c.family, c.head) {
            (Family::XlmRoberta, EncoderHead::SequenceClassification) => EncoderImpl::XlmRobertaSequence(
                xlm_roberta::XLMRobertaForSequenceClassification::new(c.labels.len(), &xlm_roberta_config(c), vb)
                    .context("loading XLM-RoBERTa")?,
            ),
            (Family::XlmRoberta, _) => {
                let body = match c.head {
                    EncoderHead::Embeddings => vb,
                    _ => vb.pp("roberta"),
                };
                EncoderImpl::XlmRoberta {
                    model: xlm_roberta::XLMRobertaModel::new(&xlm_roberta_config(c), body)
                        .context("loading XLM-RoBERTa")?,
                    classifier,
                }
            }
            _ => {
                let model = bert::BertModel::load(vb.clone(), &bert_config(c)).context("loading BERT")?;
                let (pooler, classifier) = match c.head {
                    EncoderHead::SequenceClassification => (
                        Some(candle_nn::linear(
                            c.hidden_size,
                            c.hidden_size,
                            vb.pp("bert.pooler.dense"),
                        )?),
                        Some(candle_nn::linear(c.hidden_size, c.labels.len(), vb.pp("classifier"))?),
                    ),
                    _ => (None, classifier),
                };
                EncoderImpl::Bert {
                    model,
                    pooler,
                    classifier,
                }
            }
        };
        Ok(Self { inner })
    }

    /// Logits of one unpadded sequence: `[labels]` (one row) for sequence classification,
    /// `[position][labels]` per token, `[position][hidden]` (the last hidden states) without
    /// a head.
    pub fn logits(&self, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        let dev = Device::Cpu;
        let ids = Tensor::new(tokens, &dev)?.unsqueeze(0)?;
        let types = ids.zeros_like()?;
        let mask = ids.ones_like()?;
        let logits = match &self.inner {
            EncoderImpl::Bert {
                model,
                pooler,
                classifier,
            } => {
                let hidden = model.forward(&ids, &types, None)?.squeeze(0)?;
                match (pooler, classifier) {
                    (Some(pooler), Some(classifier)) => hidden.i(0..1)?.apply(pooler)?.tanh()?.apply(classifier)?,
                    (_, Some(classifier)) => hidden.apply(classifier)?,
                    (_, None) => hidden,
                }
            }
            EncoderImpl::XlmRobertaSequence(model) => model.forward(&ids, &mask, &types)?,
            EncoderImpl::XlmRoberta { model, classifier } => {
                let hidden = model.forward(&ids, &mask, &types, None, None, None)?.squeeze(0)?;
                match classifier {
                    Some(classifier) => hidden.apply(classifier)?,
                    None => hidden,
                }
            }
        };
        Ok(logits.to_vec2::<f32>()?)
    }
}

fn xlm_roberta_config(c: &EncoderConfig) -> xlm_roberta::Config {
    xlm_roberta::Config {
        hidden_size: c.hidden_size,
        layer_norm_eps: c.layer_norm_eps,
        attention_probs_dropout_prob: 0.0,
        hidden_dropout_prob: 0.0,
        num_attention_heads: c.num_heads,
        position_embedding_type: "absolute".into(),
        intermediate_size: c.intermediate_size,
        hidden_act: candle_nn::Activation::Gelu,
        num_hidden_layers: c.num_layers,
        vocab_size: c.vocab_size,
        max_position_embeddings: c.max_position_embeddings,
        type_vocab_size: c.type_vocab_size,
        pad_token_id: c.pad_token_id,
    }
}

fn bert_config(c: &EncoderConfig) -> bert::Config {
    bert::Config {
        vocab_size: c.vocab_size,
        hidden_size: c.hidden_size,
        num_hidden_layers: c.num_layers,
        num_attention_heads: c.num_heads,
        intermediate_size: c.intermediate_size,
        hidden_act: bert::HiddenAct::Gelu,
        max_position_embeddings: c.max_position_embeddings,
        type_vocab_size: c.type_vocab_size,
        layer_norm_eps: c.layer_norm_eps,
        model_type: Some("bert".into()),
        ..Default::default()
    }
}

/// Softmax over `logits` (for comparisons in probability space).
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|&x| (x - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.into_iter().map(|x| x / sum).collect()
}

/// Cosine similarity of two vectors.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| f64::from(x) * f64::from(y)).sum();
    let na: f64 = a.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    (dot / (na * nb)) as f32
}

/// KL(softmax(p_logits) || softmax(q_logits)) in nats.
pub fn kl_divergence(p_logits: &[f32], q_logits: &[f32]) -> f32 {
    let (p, q) = (softmax(p_logits), softmax(q_logits));
    p.iter()
        .zip(&q)
        .filter(|(pi, _)| **pi > 0.0)
        .map(|(&pi, &qi)| pi * (pi / qi.max(1e-30)).ln())
        .sum()
}

/// Largest absolute element-wise difference.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

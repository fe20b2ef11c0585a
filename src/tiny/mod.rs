//! Deterministic random-weight students in the Hugging Face checkpoint layout.
//!
//! No weights can be downloaded here, so tests and benchmarks make their own students: a
//! byte-level BPE tokenizer trained on text the repository ships, random weights drawn from a
//! seeded generator (one stream per tensor, so the result does not depend on the order tensors
//! are made in), and the same files `transformers` writes.

mod tokenizer;

use std::path::Path;

use anyhow::{Context, Result, bail};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;
use safetensors::{Dtype, tensor::TensorView};
use serde_json::json;

use crate::checkpoint::{
    DecoderConfig, EncoderConfig, EncoderHead, Family, ModelConfig, RopeConfig, TensorRole, TensorSpec, tensor_specs,
};

pub use tokenizer::{CHAT_TEMPLATE, ENDOFTEXT_ID, train_tokenizer};

/// Named shapes for `--shape`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ShapePreset {
    /// A few hundred thousand parameters: tests make it in milliseconds.
    Tiny,
    /// About 16M parameters: big enough for quantisation error to show.
    Mid,
    /// The real dimensions of DeepSeek-R1-Distill-Qwen-1.5B (random weights), for benchmarks.
    #[value(name = "r1-distill-qwen-1.5b")]
    R1DistillQwen1_5b,
}

/// The `config.json` / tokenizer file layout to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TransformersFormat {
    /// `rope_theta` at the top level, `torch_dtype`, chat template inside `tokenizer_config.json`.
    #[value(name = "4")]
    V4,
    /// `rope_parameters`, `dtype`, chat template in `chat_template.jinja`.
    #[value(name = "5")]
    V5,
}

/// Stored element type of the random weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WeightDtype {
    F32,
    Bf16,
}

/// Everything that decides a tiny student; the same spec and seed give the same bytes.
#[derive(Debug, Clone, clap::Args)]
pub struct TinySpec {
    /// Model family.
    #[arg(long, value_parser = clap::value_parser!(Family))]
    pub family: Family,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Dimension preset; the flags below override single fields of it.
    #[arg(long, value_enum, default_value = "tiny")]
    pub shape: ShapePreset,
    #[arg(long)]
    pub hidden_size: Option<usize>,
    #[arg(long)]
    pub intermediate_size: Option<usize>,
    #[arg(long)]
    pub num_layers: Option<usize>,
    #[arg(long)]
    pub num_heads: Option<usize>,
    /// Key/value heads (grouped-query attention); decoders only.
    #[arg(long)]
    pub num_kv_heads: Option<usize>,
    /// Model vocabulary (embedding rows); at least the tokenizer's size.
    #[arg(long)]
    pub vocab_size: Option<usize>,
    /// Target size of the trained BPE tokenizer.
    #[arg(long, default_value_t = 512)]
    pub tokenizer_vocab_size: usize,
    /// Standard deviation of the random weights (large values make greedy choices clear-cut).
    #[arg(long)]
    pub init_std: Option<f32>,
    /// Share the input embedding with the output head (decoders).
    #[arg(long)]
    pub tie_word_embeddings: Option<bool>,
    /// RoPE base frequency (decoders).
    #[arg(long, default_value_t = 10_000.0)]
    pub rope_theta: f64,
    /// Head of an encoder student (BERT or XLM-RoBERTa).
    #[arg(long, value_enum, default_value = "sequence")]
    pub bert_head: BertHeadArg,
    /// Number of labels of an encoder student.
    #[arg(long, default_value_t = 3)]
    pub num_labels: usize,
    /// Label names of an encoder student (its `id2label`, in order), instead of `--num-labels`
    /// names `LABEL_i`.
    #[arg(long, value_delimiter = ',')]
    pub labels: Vec<String>,
    /// Number of safetensors shards (1 writes `model.safetensors`).
    #[arg(long, default_value_t = 1)]
    pub shards: usize,
    /// Which `transformers` file layout to write.
    #[arg(long, value_enum, default_value = "4")]
    pub format: TransformersFormat,
    /// Stored dtype of the weights (the 1.5B preset defaults to bf16, as the real model).
    #[arg(long, value_enum)]
    pub dtype: Option<WeightDtype>,
    /// Train the tokenizer on this text file (one line per text) instead of the shipped corpus.
    #[arg(long)]
    pub corpus: Option<std::path::PathBuf>,
}

/// `--bert-head` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BertHeadArg {
    Sequence,
    Token,
    /// A bare `BertModel` with sentence-transformers' mean pooling and normalisation.
    Embedding,
}

impl TinySpec {
    /// A spec with every field at its default for `family`.
    pub fn new(family: Family, seed: u64) -> Self {
        Self {
            family,
            seed,
            shape: ShapePreset::Tiny,
            hidden_size: None,
            intermediate_size: None,
            num_layers: None,
            num_heads: None,
            num_kv_heads: None,
            vocab_size: None,
            tokenizer_vocab_size: 512,
            init_std: None,
            tie_word_embeddings: None,
            rope_theta: 10_000.0,
            bert_head: BertHeadArg::Sequence,
            num_labels: 3,
            labels: Vec::new(),
            shards: 1,
            format: TransformersFormat::V4,
            dtype: None,
            corpus: None,
        }
    }

    /// The architecture this spec describes, given the trained tokenizer's size.
    pub fn model_config(&self, tokenizer_vocab: usize) -> Result<ModelConfig> {
        // (hidden, intermediate, layers, heads, kv heads, vocab)
        let (h, i, l, nh, kv, vocab) = match self.shape {
            ShapePreset::Tiny => (64, 128, 2, 4, 2, None),
            ShapePreset::Mid => (512, 1408, 4, 8, 2, None),
            ShapePreset::R1DistillQwen1_5b => (1536, 8960, 28, 12, 2, Some(151_936)),
        };
        let hidden_size = self.hidden_size.unwrap_or(h);
        let num_heads = self.num_heads.unwrap_or(nh);
        let vocab_size = self
            .vocab_size
            .or(vocab)
            .unwrap_or(tokenizer_vocab.next_multiple_of(64));
        if vocab_size < tokenizer_vocab {
            bail!("--vocab-size {vocab_size} is smaller than the tokenizer's {tokenizer_vocab} tokens");
        }
        if num_heads == 0 || !hidden_size.is_multiple_of(num_heads) {
            bail!("--hidden-size {hidden_size} must be a multiple of --num-heads {num_heads}");
        }
        Ok(match self.family {
            Family::Qwen2 | Family::Llama => ModelConfig::Decoder(DecoderConfig {
                family: self.family,
                vocab_size,
                hidden_size,
                intermediate_size: self.intermediate_size.unwrap_or(i),
                num_layers: self.num_layers.unwrap_or(l),
                num_heads,
                num_kv_heads: self.num_kv_heads.unwrap_or(kv),
                head_dim: hidden_size / num_heads,
                rms_norm_eps: 1e-6,
                rope: RopeConfig {
                    theta: self.rope_theta,
                    scaling: None,
                },
                max_position_embeddings: if self.shape == ShapePreset::R1DistillQwen1_5b {
                    131_072
                } else {
                    2048
                },
                tie_word_embeddings: self
                    .tie_word_embeddings
                    .unwrap_or(self.family == Family::Qwen2 && self.shape != ShapePreset::R1DistillQwen1_5b),
                qkv_bias: self.family == Family::Qwen2,
                o_bias: false,
                mlp_bias: false,
                bos_token_id: None,
                eos_token_ids: vec![tokenizer::IM_END_ID, tokenizer::ENDOFTEXT_ID],
            }),
            Family::Bert | Family::XlmRoberta => ModelConfig::Encoder(EncoderConfig {
                family: self.family,
                pad_token_id: match self.family {
                    Family::XlmRoberta => tokenizer::XLM_ROBERTA_PAD_ID,
                    _ => tokenizer::BERT_PAD_ID,
                },
                vocab_size,
                hidden_size,
                intermediate_size: self.intermediate_size.unwrap_or(i),
                num_layers: self.num_layers.unwrap_or(l),
                num_heads,
                // XLM-RoBERTa's table starts after the padding id: 514 rows hold 512 tokens.
                max_position_embeddings: if self.family == Family::XlmRoberta { 514 } else { 512 },
                type_vocab_size: if self.family == Family::XlmRoberta { 1 } else { 2 },
                layer_norm_eps: if self.family == Family::XlmRoberta { 1e-5 } else { 1e-12 },
                head: match self.bert_head {
                    BertHeadArg::Sequence => EncoderHead::SequenceClassification,
                    BertHeadArg::Token => EncoderHead::TokenClassification,
                    BertHeadArg::Embedding => EncoderHead::Embeddings,
                },
                labels: match self.bert_head {
                    BertHeadArg::Embedding => Vec::new(),
                    _ if !self.labels.is_empty() => self.labels.clone(),
                    _ => (0..self.num_labels).map(|n| format!("LABEL_{n}")).collect(),
                },
                multi_label: false,
            }),
        })
    }

    fn init_std(&self) -> f32 {
        self.init_std.unwrap_or(match self.shape {
            ShapePreset::Tiny => 0.1,
            ShapePreset::Mid => 0.05,
            ShapePreset::R1DistillQwen1_5b => 0.02,
        })
    }

    fn dtype(&self) -> WeightDtype {
        self.dtype.unwrap_or(match self.shape {
            ShapePreset::R1DistillQwen1_5b => WeightDtype::Bf16,
            _ => WeightDtype::F32,
        })
    }
}

/// Writes a checkpoint for `spec` into `out` (created if needed) and returns its configuration.
pub fn write_tiny(spec: &TinySpec, out: &Path) -> Result<ModelConfig> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let corpus = match &spec.corpus {
        Some(path) => Some(std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?),
        None => None,
    };
    let tok = train_tokenizer(spec.family, spec.tokenizer_vocab_size, corpus.as_deref())?;
    let config = spec.model_config(tok.vocab_size)?;
    tok.write(out, spec.format)?;
    write_config(&config, spec, out)?;
    write_weights(&tensor_specs(&config), spec, out)?;
    Ok(config)
}

fn write_config(config: &ModelConfig, spec: &TinySpec, out: &Path) -> Result<()> {
    let dtype = match spec.dtype() {
        WeightDtype::F32 => "float32",
        WeightDtype::Bf16 => "bfloat16",
    };
    let dtype_key = match spec.format {
        TransformersFormat::V4 => "torch_dtype",
        TransformersFormat::V5 => "dtype",
    };
    let mut value = match config {
        ModelConfig::Decoder(c) => {
            let architecture = match c.family {
                Family::Llama => "LlamaForCausalLM",
                _ => "Qwen2ForCausalLM",
            };
            let mut v = json!({
                "architectures": [architecture],
                "model_type": c.family.model_type(),
                "vocab_size": c.vocab_size,
                "hidden_size": c.hidden_size,
                "intermediate_size": c.intermediate_size,
                "num_hidden_layers": c.num_layers,
                "num_attention_heads": c.num_heads,
                "num_key_value_heads": c.num_kv_heads,
                "hidden_act": "silu",
                "rms_norm_eps": c.rms_norm_eps,
                "max_position_embeddings": c.max_position_embeddings,
                "tie_word_embeddings": c.tie_word_embeddings,
                "eos_token_id": c.eos_token_ids,
                "use_cache": true,
            });
            match spec.format {
                TransformersFormat::V4 => v["rope_theta"] = json!(c.rope.theta),
                TransformersFormat::V5 => {
                    v["rope_parameters"] = json!({"rope_type": "default", "rope_theta": c.rope.theta})
                }
            }
            if c.family == Family::Qwen2 {
                v["sliding_window"] = json!(c.max_position_embeddings);
                v["max_window_layers"] = json!(c.num_layers);
                v["use_sliding_window"] = json!(false);
            }
            v
        }
        ModelConfig::Encoder(c) => {
            let stem = match c.family {
                Family::XlmRoberta => "XLMRoberta",
                _ => "Bert",
            };
            let architecture = match c.head {
                EncoderHead::SequenceClassification => format!("{stem}ForSequenceClassification"),
                EncoderHead::TokenClassification => format!("{stem}ForTokenClassification"),
                EncoderHead::Embeddings => format!("{stem}Model"),
            };
            let id2label: serde_json::Map<String, serde_json::Value> = c
                .labels
                .iter()
                .enumerate()
                .map(|(i, l)| (i.to_string(), json!(l)))
                .collect();
            let mut v = json!({
                "architectures": [architecture],
                "model_type": c.family.model_type(),
                "vocab_size": c.vocab_size,
                "hidden_size": c.hidden_size,
                "intermediate_size": c.intermediate_size,
                "num_hidden_layers": c.num_layers,
                "num_attention_heads": c.num_heads,
                "hidden_act": "gelu",
                "max_position_embeddings": c.max_position_embeddings,
                "type_vocab_size": c.type_vocab_size,
                "layer_norm_eps": c.layer_norm_eps,
                "pad_token_id": c.pad_token_id,
                "id2label": id2label,
            });
            if c.multi_label {
                v["problem_type"] = json!("multi_label_classification");
            }
            v
        }
    };
    value[dtype_key] = json!(dtype);
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&value)?)?;
    if let ModelConfig::Encoder(c) = config
        && c.head == EncoderHead::Embeddings
    {
        // sentence-transformers' layout: the model, mean pooling, then normalisation.
        let modules = json!([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ]);
        std::fs::write(out.join("modules.json"), serde_json::to_string_pretty(&modules)?)?;
        std::fs::create_dir_all(out.join("1_Pooling"))?;
        let pooling = json!({"word_embedding_dimension": c.hidden_size, "pooling_mode_cls_token": false,
                             "pooling_mode_mean_tokens": true, "pooling_mode_max_tokens": false});
        std::fs::write(
            out.join("1_Pooling/config.json"),
            serde_json::to_string_pretty(&pooling)?,
        )?;
    }
    Ok(())
}

/// A tensor's random values as stored bytes.
fn random_tensor(spec: &TensorSpec, seed: u64, std: f32, dtype: WeightDtype) -> Result<Vec<u8>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ crate::hash::fnv1a(spec.name.bytes()));
    let n: usize = spec.shape.iter().product();
    let (mean, std) = match spec.role {
        TensorRole::Linear | TensorRole::Embedding | TensorRole::Bias => (0.0, std),
        // Scales near one and shifts near zero, but not exactly: a test then sees whether they
        // are applied.
        TensorRole::NormWeight => (1.0, 0.1),
        TensorRole::NormBias => (0.0, 0.1),
    };
    let normal = Normal::new(mean, std).context("invalid --init-std")?;
    let values = (0..n).map(|_| normal.sample(&mut rng));
    Ok(match dtype {
        WeightDtype::F32 => values.flat_map(f32::to_le_bytes).collect(),
        WeightDtype::Bf16 => values.flat_map(|v| half::bf16::from_f32(v).to_le_bytes()).collect(),
    })
}

fn write_weights(specs: &[TensorSpec], spec: &TinySpec, out: &Path) -> Result<()> {
    let (std, dtype) = (spec.init_std(), spec.dtype());
    let data: Vec<Vec<u8>> = specs
        .par_iter()
        .map(|s| random_tensor(s, spec.seed, std, dtype))
        .collect::<Result<_>>()?;
    let st_dtype = match dtype {
        WeightDtype::F32 => Dtype::F32,
        WeightDtype::Bf16 => Dtype::BF16,
    };
    let shards = spec.shards.clamp(1, specs.len());
    let per_shard = specs.len().div_ceil(shards);
    let mut weight_map = serde_json::Map::new();
    let mut total_size = 0usize;
    for (index, (chunk, bytes)) in specs.chunks(per_shard).zip(data.chunks(per_shard)).enumerate() {
        let file = if shards == 1 {
            crate::checkpoint::SINGLE_FILE.to_string()
        } else {
            format!(
                "model-{:05}-of-{:05}.safetensors",
                index + 1,
                specs.len().div_ceil(per_shard)
            )
        };
        let views = chunk
            .iter()
            .zip(bytes)
            .map(|(s, b)| Ok((s.name.clone(), TensorView::new(st_dtype, s.shape.clone(), b)?)))
            .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
        let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize_to_file(views, Some(metadata), &out.join(&file))?;
        for (s, b) in chunk.iter().zip(bytes) {
            weight_map.insert(s.name.clone(), json!(file));
            total_size += b.len();
        }
    }
    if shards > 1 {
        let index = json!({"metadata": {"total_size": total_size}, "weight_map": weight_map});
        std::fs::write(
            out.join(crate::checkpoint::SHARD_INDEX),
            serde_json::to_string_pretty(&index)?,
        )?;
    }
    Ok(())
}

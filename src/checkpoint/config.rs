//! `config.json` of a Hugging Face checkpoint, normalised into one shape per model kind.
//!
//! `transformers` 4.x and 5.x write different shapes: 4.x keeps `rope_theta` at the top level and
//! RoPE scaling under `rope_scaling` (with `type` or `rope_type`), 5.x nests both under
//! `rope_parameters`; 4.x names the weight dtype `torch_dtype`, 5.x `dtype`. Both are read here
//! so the rest of the project sees a single [`ModelConfig`].

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::CheckpointError;

/// The model families the exporter and the reference forward know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// Qwen2 / Qwen2.5 decoders (q/k/v projections carry a bias): the R1-Distill-Qwen students.
    Qwen2,
    /// Llama decoders (no bias): the R1-Distill-Llama students.
    Llama,
    /// BERT encoders (a task head, or none as sentence-transformers saves them).
    Bert,
    /// XLM-RoBERTa (and RoBERTa) encoders: BERT's layers, positions counted after the padding
    /// id, a classification head of its own; the multilingual (zh/en) students.
    XlmRoberta,
}

impl Family {
    /// The `model_type` string `transformers` writes for this family.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Qwen2 => "qwen2",
            Family::Llama => "llama",
            Family::Bert => "bert",
            Family::XlmRoberta => "xlm-roberta",
        }
    }

    /// Whether this family is an encoder (BERT, XLM-RoBERTa).
    pub fn is_encoder(self) -> bool {
        matches!(self, Family::Bert | Family::XlmRoberta)
    }

    fn from_model_type(model_type: &str) -> Option<Self> {
        match model_type {
            "qwen2" => Some(Family::Qwen2),
            "llama" => Some(Family::Llama),
            "bert" => Some(Family::Bert),
            "xlm-roberta" | "roberta" => Some(Family::XlmRoberta),
            _ => None,
        }
    }
}

impl std::str::FromStr for Family {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Family::from_model_type(s).ok_or_else(|| format!("unknown family {s:?} (qwen2, llama, bert, xlm-roberta)"))
    }
}

/// RoPE frequency scaling beyond the plain `theta` schedule.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Llama 3.1 style: low frequencies divided by `factor`, a smooth band in between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// Positions divided by `factor` (all frequencies scaled).
    Linear { factor: f64 },
}

/// Rotary position embedding settings.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    /// Base of the frequency schedule (`rope_theta`).
    pub theta: f64,
    /// Optional frequency scaling.
    pub scaling: Option<RopeScaling>,
}

impl RopeConfig {
    /// The `head_dim / 2` inverse frequencies, with any scaling applied, as `transformers` computes
    /// them.
    pub fn inv_freq(&self, head_dim: usize) -> Vec<f32> {
        let base: Vec<f64> = (0..head_dim)
            .step_by(2)
            .map(|i| 1.0 / self.theta.powf(i as f64 / head_dim as f64))
            .collect();
        let scaled: Vec<f64> = match &self.scaling {
            None => base,
            Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old_ctx,
            }) => {
                let low_wavelen = old_ctx / low_freq_factor;
                let high_wavelen = old_ctx / high_freq_factor;
                base.iter()
                    .map(|&freq| {
                        let wavelen = 2.0 * std::f64::consts::PI / freq;
                        if wavelen < high_wavelen {
                            freq
                        } else if wavelen > low_wavelen {
                            freq / factor
                        } else {
                            let smooth = (old_ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * freq / factor + smooth * freq
                        }
                    })
                    .collect()
            }
        };
        scaled.into_iter().map(|f| f as f32).collect()
    }
}

/// A causal decoder (Qwen2 or Llama).
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope: RopeConfig,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Whether q/k/v projections carry a bias (Qwen2 always; Llama when `attention_bias`).
    pub qkv_bias: bool,
    /// Whether the output projection carries a bias (Llama `attention_bias`).
    pub o_bias: bool,
    /// Whether the MLP projections carry a bias (Llama `mlp_bias`).
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// What sits on top of an encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncoderHead {
    /// Pooler (dense + tanh on the first token) then a classifier: `[batch, num_labels]`.
    SequenceClassification,
    /// A classifier on every token: `[batch, seq, num_labels]`.
    TokenClassification,
    /// No head (`BertModel`, as sentence-transformers saves it): the last hidden states
    /// `[batch, seq, hidden]`, pooled into an embedding by the server.
    Embeddings,
}

/// A BERT-style encoder (BERT or XLM-RoBERTa) with its head.
#[derive(Debug, Clone, PartialEq)]
pub struct EncoderConfig {
    /// [`Family::Bert`] or [`Family::XlmRoberta`].
    pub family: Family,
    /// The padding token (`pad_token_id`); XLM-RoBERTa counts positions from the one after it.
    pub pad_token_id: u32,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    pub head: EncoderHead,
    /// Label names by index (`id2label`), `LABEL_i` when the checkpoint has none.
    pub labels: Vec<String>,
    /// Any number of labels may hold (`problem_type` `multi_label_classification`).
    pub multi_label: bool,
}

impl EncoderConfig {
    /// The prefix of its encoder's tensor names: `bert.` or `roberta.` under a task head, none
    /// in a bare model (`BertModel`, `XLMRobertaModel`).
    pub fn prefix(&self) -> &'static str {
        match (self.head, self.family) {
            (EncoderHead::Embeddings, _) => "",
            (_, Family::XlmRoberta) => "roberta.",
            _ => "bert.",
        }
    }

    /// The first position id: XLM-RoBERTa numbers positions from `pad_token_id + 1`.
    pub fn position_offset(&self) -> usize {
        match self.family {
            Family::XlmRoberta => self.pad_token_id as usize + 1,
            _ => 0,
        }
    }

    /// The longest input its position table holds.
    pub fn max_tokens(&self) -> usize {
        self.max_position_embeddings.saturating_sub(self.position_offset())
    }
}

/// A checkpoint's architecture, normalised.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelConfig {
    Decoder(DecoderConfig),
    Encoder(EncoderConfig),
}

impl ModelConfig {
    /// The family this configuration belongs to.
    pub fn family(&self) -> Family {
        match self {
            ModelConfig::Decoder(d) => d.family,
            ModelConfig::Encoder(c) => c.family,
        }
    }

    /// Parses the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Self, CheckpointError> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| CheckpointError::Config(format!("config.json is not valid JSON: {e}")))?;
        let obj = value
            .as_object()
            .ok_or_else(|| CheckpointError::Config("config.json is not a JSON object".into()))?;
        let fields = Fields(obj);
        let model_type = fields.str("model_type")?;
        let family = Family::from_model_type(model_type).ok_or_else(|| {
            CheckpointError::Config(format!(
                "field `model_type` is {model_type:?}; supported: qwen2, llama, bert, xlm-roberta"
            ))
        })?;
        match family {
            Family::Qwen2 | Family::Llama => parse_decoder(family, &fields).map(ModelConfig::Decoder),
            Family::Bert | Family::XlmRoberta => parse_encoder(family, &fields).map(ModelConfig::Encoder),
        }
    }
}

/// Typed access to the fields of a JSON object, with errors naming the field.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    fn str(&self, key: &str) -> Result<&str, CheckpointError> {
        match self.get(key) {
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(bad_field(key, "a string")),
            None => Err(CheckpointError::Config(format!("field `{key}` is missing"))),
        }
    }

    fn usize(&self, key: &str) -> Result<usize, CheckpointError> {
        match self.opt_usize(key)? {
            Some(0) => Err(bad_field(key, "a positive integer")),
            Some(n) => Ok(n),
            None => Err(CheckpointError::Config(format!("field `{key}` is missing"))),
        }
    }

    /// An optional field that, where given, must be positive (a divisor or a size).
    fn opt_positive_usize(&self, key: &str) -> Result<Option<usize>, CheckpointError> {
        match self.opt_usize(key)? {
            Some(0) => Err(bad_field(key, "a positive integer")),
            n => Ok(n),
        }
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>, CheckpointError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| bad_field(key, "a non-negative integer")),
        }
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>, CheckpointError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| bad_field(key, "a number")),
        }
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>, CheckpointError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| bad_field(key, "a boolean")),
        }
    }

    fn opt_object(&self, key: &str) -> Result<Option<Fields<'_>>, CheckpointError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(m)) => Ok(Some(Fields(m))),
            Some(_) => Err(bad_field(key, "an object")),
        }
    }
}

fn bad_field(key: &str, expected: &str) -> CheckpointError {
    CheckpointError::Config(format!("field `{key}` must be {expected}"))
}

fn token_ids(value: Option<&Value>, key: &str) -> Result<Vec<u32>, CheckpointError> {
    let as_id = |v: &Value| {
        v.as_u64()
            .map(|n| n as u32)
            .ok_or_else(|| bad_field(key, "a token id or a list of them"))
    };
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(as_id).collect(),
        Some(v) => Ok(vec![as_id(v)?]),
    }
}

fn parse_rope(fields: &Fields) -> Result<RopeConfig, CheckpointError> {
    // 5.x: everything under `rope_parameters`; 4.x: `rope_theta` + `rope_scaling`.
    let params = fields.opt_object("rope_parameters")?;
    let theta = match &params {
        Some(p) => p.opt_f64("rope_theta")?,
        None => None,
    }
    .or(fields.opt_f64("rope_theta")?)
    .unwrap_or(10_000.0);
    let scaling_fields = match params {
        Some(p) => Some(p),
        None => fields.opt_object("rope_scaling")?,
    };
    let scaling = match scaling_fields {
        None => None,
        Some(s) => {
            let kind = match (s.get("rope_type"), s.get("type")) {
                (Some(Value::String(k)), _) | (None, Some(Value::String(k))) => k.as_str(),
                _ => "default",
            };
            let factor = || {
                s.opt_f64("factor")?
                    .ok_or_else(|| CheckpointError::Config("field `rope_scaling.factor` is missing".into()))
            };
            match kind {
                "default" => None,
                "linear" => Some(RopeScaling::Linear { factor: factor()? }),
                "llama3" => Some(RopeScaling::Llama3 {
                    factor: factor()?,
                    low_freq_factor: s.opt_f64("low_freq_factor")?.unwrap_or(1.0),
                    high_freq_factor: s.opt_f64("high_freq_factor")?.unwrap_or(4.0),
                    original_max_position_embeddings: s.opt_f64("original_max_position_embeddings")?.unwrap_or(8192.0),
                }),
                other => {
                    return Err(CheckpointError::Config(format!(
                        "field `rope_scaling.rope_type` is {other:?}; supported: default, linear, llama3"
                    )));
                }
            }
        }
    };
    Ok(RopeConfig { theta, scaling })
}

fn parse_decoder(family: Family, f: &Fields) -> Result<DecoderConfig, CheckpointError> {
    let hidden_size = f.usize("hidden_size")?;
    let num_heads = f.usize("num_attention_heads")?;
    let num_kv_heads = f.opt_positive_usize("num_key_value_heads")?.unwrap_or(num_heads);
    let head_dim = f.opt_positive_usize("head_dim")?.unwrap_or(hidden_size / num_heads);
    if head_dim == 0 {
        return Err(CheckpointError::Config(format!(
            "field `hidden_size` ({hidden_size}) is smaller than `num_attention_heads` ({num_heads})"
        )));
    }
    if num_heads % num_kv_heads != 0 {
        return Err(CheckpointError::Config(format!(
            "field `num_attention_heads` ({num_heads}) is not a multiple of `num_key_value_heads` ({num_kv_heads})"
        )));
    }
    if head_dim % 2 != 0 {
        return Err(CheckpointError::Config(format!(
            "head dimension {head_dim} must be even for RoPE"
        )));
    }
    if let Some(act) = f.get("hidden_act")
        && act.as_str() != Some("silu")
    {
        return Err(CheckpointError::Config(format!(
            "field `hidden_act` is {act}; supported: \"silu\""
        )));
    }
    let attention_bias = f.opt_bool("attention_bias")?.unwrap_or(false);
    Ok(DecoderConfig {
        family,
        vocab_size: f.usize("vocab_size")?,
        hidden_size,
        intermediate_size: f.usize("intermediate_size")?,
        num_layers: f.usize("num_hidden_layers")?,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
        rope: parse_rope(f)?,
        max_position_embeddings: f.opt_usize("max_position_embeddings")?.unwrap_or(4096),
        tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
        qkv_bias: family == Family::Qwen2 || attention_bias,
        o_bias: family == Family::Llama && attention_bias,
        mlp_bias: family == Family::Llama && f.opt_bool("mlp_bias")?.unwrap_or(false),
        bos_token_id: f.opt_usize("bos_token_id")?.map(|n| n as u32),
        eos_token_ids: token_ids(f.get("eos_token_id"), "eos_token_id")?,
    })
}

fn parse_encoder(family: Family, f: &Fields) -> Result<EncoderConfig, CheckpointError> {
    let architecture = match f.get("architectures").and_then(Value::as_array) {
        Some(list) => list.first().and_then(Value::as_str).unwrap_or_default().to_string(),
        None => String::new(),
    };
    let stem = match family {
        Family::XlmRoberta if architecture.starts_with("Roberta") => "Roberta",
        Family::XlmRoberta => "XLMRoberta",
        _ => "Bert",
    };
    let head = match architecture.strip_prefix(stem) {
        Some("ForSequenceClassification") => EncoderHead::SequenceClassification,
        Some("ForTokenClassification") => EncoderHead::TokenClassification,
        Some("Model") => EncoderHead::Embeddings,
        _ => {
            return Err(CheckpointError::Config(format!(
                "field `architectures` is {architecture:?}; supported: {stem}ForSequenceClassification, {stem}ForTokenClassification, {stem}Model"
            )));
        }
    };
    if let Some(act) = f.get("hidden_act")
        && act.as_str() != Some("gelu")
    {
        return Err(CheckpointError::Config(format!(
            "field `hidden_act` is {act}; supported: \"gelu\""
        )));
    }
    let labels = match f.opt_object("id2label")? {
        _ if head == EncoderHead::Embeddings => Vec::new(),
        Some(map) => {
            let mut by_index = BTreeMap::new();
            for (k, v) in map.0 {
                let index: usize = k.parse().map_err(|_| bad_field("id2label", "keyed by label indices"))?;
                let name = v.as_str().ok_or_else(|| bad_field("id2label", "a map of strings"))?;
                by_index.insert(index, name.to_string());
            }
            if by_index.keys().copied().ne(0..by_index.len()) {
                return Err(bad_field("id2label", "keyed by 0..num_labels"));
            }
            by_index.into_values().collect()
        }
        None => {
            let n = f.opt_usize("num_labels")?.unwrap_or(2);
            (0..n).map(|i| format!("LABEL_{i}")).collect()
        }
    };
    let default_pad = match family {
        Family::XlmRoberta => 1,
        _ => 0,
    };
    Ok(EncoderConfig {
        family,
        pad_token_id: f.opt_usize("pad_token_id")?.map_or(default_pad, |n| n as u32),
        vocab_size: f.usize("vocab_size")?,
        hidden_size: f.usize("hidden_size")?,
        intermediate_size: f.usize("intermediate_size")?,
        num_layers: f.usize("num_hidden_layers")?,
        num_heads: f.usize("num_attention_heads")?,
        max_position_embeddings: f.usize("max_position_embeddings")?,
        type_vocab_size: f.opt_usize("type_vocab_size")?.unwrap_or(2),
        layer_norm_eps: f.opt_f64("layer_norm_eps")?.unwrap_or(1e-12),
        head,
        labels,
        multi_label: f.get("problem_type").and_then(Value::as_str) == Some("multi_label_classification"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const QWEN_4X: &str = r#"{"model_type":"qwen2","architectures":["Qwen2ForCausalLM"],
        "vocab_size":151936,"hidden_size":1536,"intermediate_size":8960,"num_hidden_layers":28,
        "num_attention_heads":12,"num_key_value_heads":2,"rms_norm_eps":1e-6,"rope_theta":10000,
        "max_position_embeddings":131072,"tie_word_embeddings":false,"torch_dtype":"bfloat16",
        "bos_token_id":151643,"eos_token_id":151643,"hidden_act":"silu","rope_scaling":null}"#;

    #[test]
    fn reads_transformers_4x_qwen2() {
        let ModelConfig::Decoder(c) = ModelConfig::from_json(QWEN_4X).unwrap() else {
            panic!("not a decoder")
        };
        assert_eq!((c.head_dim, c.num_kv_heads, c.rope.theta), (128, 2, 10000.0));
        assert!(c.qkv_bias && !c.o_bias && !c.tie_word_embeddings);
        assert_eq!(c.eos_token_ids, vec![151643]);
    }

    #[test]
    fn reads_transformers_5x_rope_parameters() {
        let text = r#"{"model_type":"llama","vocab_size":128,"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"dtype":"float32",
            "eos_token_id":[1,2],"rope_parameters":{"rope_type":"llama3","rope_theta":500000.0,
            "factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}}"#;
        let ModelConfig::Decoder(c) = ModelConfig::from_json(text).unwrap() else {
            panic!("not a decoder")
        };
        assert_eq!(c.rope.theta, 500000.0);
        assert!(matches!(c.rope.scaling, Some(RopeScaling::Llama3 { factor, .. }) if factor == 8.0));
        assert!(!c.qkv_bias);
        assert_eq!(c.eos_token_ids, vec![1, 2]);
        let inv = c.rope.inv_freq(16);
        assert_eq!(inv.len(), 8);
        assert_eq!(inv[0], 1.0);
    }

    #[test]
    fn zero_heads_or_head_sizes_are_errors_not_panics() {
        // Found by the model_files fuzz target: 0 key/value heads divided by zero.
        let base = r#""model_type":"qwen2","vocab_size":512,"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4"#;
        for (extra, field) in [
            (r#","num_key_value_heads":0"#, "num_key_value_heads"),
            (r#","head_dim":0"#, "head_dim"),
        ] {
            let err = ModelConfig::from_json(&format!("{{{base}{extra}}}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{err}");
        }
        let narrow = base.replace(r#""hidden_size":64"#, r#""hidden_size":2"#);
        let err = ModelConfig::from_json(&format!("{{{narrow}}}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("hidden_size"), "{err}");
    }

    #[test]
    fn errors_name_the_field() {
        let err = ModelConfig::from_json(r#"{"model_type":"gpt2"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("model_type") && err.contains("gpt2"), "{err}");
        let err = ModelConfig::from_json(r#"{"model_type":"qwen2","hidden_size":64}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("num_attention_heads"), "{err}");
        let err = ModelConfig::from_json(r#"{"model_type":"qwen2","hidden_size":"x"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("hidden_size"), "{err}");
    }

    #[test]
    fn reads_bert_labels() {
        let text = r#"{"model_type":"bert","architectures":["BertForTokenClassification"],"vocab_size":100,
            "hidden_size":32,"intermediate_size":64,"num_hidden_layers":1,"num_attention_heads":2,
            "max_position_embeddings":64,"id2label":{"1":"B-DX","0":"O"}}"#;
        let ModelConfig::Encoder(c) = ModelConfig::from_json(text).unwrap() else {
            panic!("not an encoder")
        };
        assert_eq!(c.head, EncoderHead::TokenClassification);
        assert_eq!(c.labels, vec!["O", "B-DX"]);
    }
}

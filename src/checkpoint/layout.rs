//! The tensors each architecture needs, with their Hugging Face names and shapes.
//!
//! One list serves three users: [`super::Checkpoint::open`] validates against it, the `tiny`
//! generator fills it with random values, and the exporter reads it.

use super::{DecoderConfig, EncoderConfig, EncoderHead, Family, ModelConfig};

/// What a tensor does, which decides how it is initialised and quantised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorRole {
    /// A token, position or type embedding table `[rows, hidden]`.
    Embedding,
    /// A linear layer's weight `[out, in]`.
    Linear,
    /// A linear layer's bias `[out]`.
    Bias,
    /// A normalisation scale `[hidden]` (initialised to one).
    NormWeight,
    /// A normalisation shift `[hidden]` (initialised to zero).
    NormBias,
}

/// One tensor an architecture needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// The Hugging Face name, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    /// Expected shape.
    pub shape: Vec<usize>,
    /// What it does.
    pub role: TensorRole,
}

/// Every tensor `config` needs, in a stable order.
pub fn tensor_specs(config: &ModelConfig) -> Vec<TensorSpec> {
    let mut specs = Specs(Vec::new());
    match config {
        ModelConfig::Decoder(c) => decoder_specs(c, &mut specs),
        ModelConfig::Encoder(c) => encoder_specs(c, &mut specs),
    }
    specs.0
}

struct Specs(Vec<TensorSpec>);

impl Specs {
    fn push(&mut self, name: String, shape: &[usize], role: TensorRole) {
        self.0.push(TensorSpec {
            name,
            shape: shape.to_vec(),
            role,
        });
    }

    fn linear(&mut self, prefix: &str, out: usize, inp: usize, bias: bool) {
        self.push(format!("{prefix}.weight"), &[out, inp], TensorRole::Linear);
        if bias {
            self.push(format!("{prefix}.bias"), &[out], TensorRole::Bias);
        }
    }

    fn layer_norm(&mut self, prefix: &str, hidden: usize) {
        self.push(format!("{prefix}.weight"), &[hidden], TensorRole::NormWeight);
        self.push(format!("{prefix}.bias"), &[hidden], TensorRole::NormBias);
    }
}

fn decoder_specs(c: &DecoderConfig, s: &mut Specs) {
    let (h, q_out, kv_out) = (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    s.push(
        "model.embed_tokens.weight".into(),
        &[c.vocab_size, h],
        TensorRole::Embedding,
    );
    for i in 0..c.num_layers {
        let p = format!("model.layers.{i}");
        s.push(format!("{p}.input_layernorm.weight"), &[h], TensorRole::NormWeight);
        s.linear(&format!("{p}.self_attn.q_proj"), q_out, h, c.qkv_bias);
        s.linear(&format!("{p}.self_attn.k_proj"), kv_out, h, c.qkv_bias);
        s.linear(&format!("{p}.self_attn.v_proj"), kv_out, h, c.qkv_bias);
        s.linear(&format!("{p}.self_attn.o_proj"), h, q_out, c.o_bias);
        s.push(
            format!("{p}.post_attention_layernorm.weight"),
            &[h],
            TensorRole::NormWeight,
        );
        s.linear(&format!("{p}.mlp.gate_proj"), c.intermediate_size, h, c.mlp_bias);
        s.linear(&format!("{p}.mlp.up_proj"), c.intermediate_size, h, c.mlp_bias);
        s.linear(&format!("{p}.mlp.down_proj"), h, c.intermediate_size, c.mlp_bias);
    }
    s.push("model.norm.weight".into(), &[h], TensorRole::NormWeight);
    if !c.tie_word_embeddings {
        s.linear("lm_head", c.vocab_size, h, false);
    }
}

fn encoder_specs(c: &EncoderConfig, s: &mut Specs) {
    let h = c.hidden_size;
    let e = &format!("{}embeddings", c.prefix());
    s.push(
        format!("{e}.word_embeddings.weight"),
        &[c.vocab_size, h],
        TensorRole::Embedding,
    );
    s.push(
        format!("{e}.position_embeddings.weight"),
        &[c.max_position_embeddings, h],
        TensorRole::Embedding,
    );
    s.push(
        format!("{e}.token_type_embeddings.weight"),
        &[c.type_vocab_size, h],
        TensorRole::Embedding,
    );
    s.layer_norm(&format!("{e}.LayerNorm"), h);
    for i in 0..c.num_layers {
        let p = format!("{}encoder.layer.{i}", c.prefix());
        s.linear(&format!("{p}.attention.self.query"), h, h, true);
        s.linear(&format!("{p}.attention.self.key"), h, h, true);
        s.linear(&format!("{p}.attention.self.value"), h, h, true);
        s.linear(&format!("{p}.attention.output.dense"), h, h, true);
        s.layer_norm(&format!("{p}.attention.output.LayerNorm"), h);
        s.linear(&format!("{p}.intermediate.dense"), c.intermediate_size, h, true);
        s.linear(&format!("{p}.output.dense"), h, c.intermediate_size, true);
        s.layer_norm(&format!("{p}.output.LayerNorm"), h);
    }
    match (c.head, c.family) {
        (EncoderHead::SequenceClassification, Family::XlmRoberta) => {
            s.linear("classifier.dense", h, h, true);
            s.linear("classifier.out_proj", c.labels.len(), h, true);
        }
        (EncoderHead::SequenceClassification, _) => {
            s.linear("bert.pooler.dense", h, h, true);
            s.linear("classifier", c.labels.len(), h, true);
        }
        (EncoderHead::TokenClassification, _) => s.linear("classifier", c.labels.len(), h, true),
        (EncoderHead::Embeddings, _) => {}
    }
}

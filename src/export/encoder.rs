//! The encoder graph (BERT, XLM-RoBERTa): `input_ids`, `attention_mask`, `token_type_ids` ->
//! `logits` (`[batch, labels]` for sequence classification, `[batch, seq, labels]` per token),
//! or `last_hidden_state` (`[batch, seq, hidden]`) for a bare model.

use anyhow::Result;

use super::emit::Emitter;
use super::graph::{Attr, Dim, Elem};
use crate::checkpoint::{EncoderConfig, EncoderHead, Family};

/// Emits the whole encoder graph and declares its inputs and outputs.
pub fn build(e: &mut Emitter, c: &EncoderConfig) -> Result<()> {
    let (batch, seq) = (Dim::Named("batch_size"), Dim::Named("sequence_length"));
    for name in ["input_ids", "attention_mask", "token_type_ids"] {
        e.b.input(name, Elem::I64, &[batch.clone(), seq.clone()]);
    }
    let labels = Dim::Fixed(c.labels.len());
    match c.head {
        EncoderHead::SequenceClassification => e.b.output("logits", Elem::F32, &[batch, labels]),
        EncoderHead::TokenClassification => e.b.output("logits", Elem::F32, &[batch, seq, labels]),
        EncoderHead::Embeddings => {
            let hidden = Dim::Fixed(c.hidden_size);
            e.b.output("last_hidden_state", Elem::F32, &[batch, seq, hidden])
        }
    }

    let emb = &format!("{}embeddings", c.prefix());
    let words = e.embedding("input_ids", &format!("{emb}.word_embeddings.weight"), true)?;
    // A one-row type table (XLM-RoBERTa) is added to every token whatever ids arrive.
    let type_ids = match c.type_vocab_size {
        1 => {
            let zero = e.b.scalar_i64(0);
            e.b.op("Mul", &["token_type_ids", &zero], vec![])
        }
        _ => "token_type_ids".to_string(),
    };
    let types = e.embedding(&type_ids, &format!("{emb}.token_type_embeddings.weight"), false)?;
    let positions = match c.family {
        // As transformers numbers them: real tokens count on from `pad_token_id + 1`,
        // padding sits at `pad_token_id`, whichever side it is on.
        Family::XlmRoberta => {
            let axis = e.b.scalar_i64(1);
            let counted = e.b.op("CumSum", &["attention_mask", &axis], vec![]);
            let counted = e.b.op("Mul", &[&counted, "attention_mask"], vec![]);
            let pad = e.b.scalar_i64(i64::from(c.pad_token_id));
            e.b.op("Add", &[&counted, &pad], vec![])
        }
        _ => {
            let shape = e.b.op("Shape", &["input_ids"], vec![]);
            let idx1 = e.b.scalar_i64(1);
            let seq_len = e.b.op("Gather", &[&shape, &idx1], vec![("axis", Attr::Int(0))]);
            let (zero, one) = (e.b.scalar_i64(0), e.b.scalar_i64(1));
            e.b.op("Range", &[&zero, &seq_len, &one], vec![])
        }
    };
    let pos = e.embedding(&positions, &format!("{emb}.position_embeddings.weight"), false)?;
    let x = e.b.op("Add", &[&words, &types], vec![]);
    let x = e.b.op("Add", &[&x, &pos], vec![]);
    let mut x = e.layer_norm(&x, &format!("{emb}.LayerNorm"), c.layer_norm_eps)?;

    // Additive mask [batch, 1, 1, seq]: 0 where attended, the smallest float on padding.
    let axes = e.b.i64s(&[1, 2]);
    let keep = e.b.op("Cast", &["attention_mask"], vec![("to", Attr::Int(9))]);
    let keep = e.b.op("Unsqueeze", &[&keep, &axes], vec![]);
    let (open, closed) = (e.b.scalar_float(0.0), e.b.scalar_float(f32::MIN));
    let bias = e.b.op("Where", &[&keep, &open, &closed], vec![]);

    for layer in 0..c.num_layers {
        x = encoder_layer(e, c, &bias, layer, &x)?;
    }
    let (output, logits) = match c.head {
        EncoderHead::SequenceClassification => {
            // Dense + tanh on the first token, then the classifier: BERT's pooler, or
            // XLM-RoBERTa's classification head.
            let (dense, out) = match c.family {
                Family::XlmRoberta => ("classifier.dense", "classifier.out_proj"),
                _ => ("bert.pooler.dense", "classifier"),
            };
            let first = e.b.scalar_i64(0);
            let cls = e.b.op("Gather", &[&x, &first], vec![("axis", Attr::Int(1))]);
            let pooled = e.linear(&cls, dense, true)?;
            let pooled = e.b.op("Tanh", &[&pooled], vec![]);
            ("logits", e.linear(&pooled, out, true)?)
        }
        EncoderHead::TokenClassification => ("logits", e.linear(&x, "classifier", true)?),
        EncoderHead::Embeddings => ("last_hidden_state", x),
    };
    e.b.node_in("", "Identity", &[&logits], &[output], vec![]);
    Ok(())
}

fn encoder_layer(e: &mut Emitter, c: &EncoderConfig, bias: &str, layer: usize, x: &str) -> Result<String> {
    let p = format!("{}encoder.layer.{layer}", c.prefix());
    let (heads, d) = (c.num_heads as i64, (c.hidden_size / c.num_heads) as i64);
    let split = e.b.i64s(&[0, 0, heads, d]);
    let project = |e: &mut Emitter, name: &str| -> Result<String> {
        let y = e.linear(x, &format!("{p}.attention.self.{name}"), true)?;
        let y = e.b.op("Reshape", &[&y, &split], vec![]);
        Ok(e.b.op("Transpose", &[&y], vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))]))
    };
    let q = project(e, "query")?;
    let k = project(e, "key")?;
    let v = project(e, "value")?;
    let scale = e.b.scalar_float(1.0 / (d as f32).sqrt());
    let q = e.b.op("Mul", &[&q, &scale], vec![]);
    let kt = e.b.op("Transpose", &[&k], vec![("perm", Attr::Ints(vec![0, 1, 3, 2]))]);
    let scores = e.b.op("MatMul", &[&q, &kt], vec![]);
    let scores = e.b.op("Add", &[&scores, bias], vec![]);
    let probs = e.b.op("Softmax", &[&scores], vec![("axis", Attr::Int(-1))]);
    let ctx = e.b.op("MatMul", &[&probs, &v], vec![]);
    let ctx =
        e.b.op("Transpose", &[&ctx], vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))]);
    let merged = e.b.i64s(&[0, 0, heads * d]);
    let ctx = e.b.op("Reshape", &[&ctx, &merged], vec![]);
    let attn = e.linear(&ctx, &format!("{p}.attention.output.dense"), true)?;
    let x = e.b.op("Add", &[x, &attn], vec![]);
    let x = e.layer_norm(&x, &format!("{p}.attention.output.LayerNorm"), c.layer_norm_eps)?;
    let h = e.linear(&x, &format!("{p}.intermediate.dense"), true)?;
    let h = gelu(e, &h);
    let h = e.linear(&h, &format!("{p}.output.dense"), true)?;
    let x = e.b.op("Add", &[&x, &h], vec![]);
    e.layer_norm(&x, &format!("{p}.output.LayerNorm"), c.layer_norm_eps)
}

/// Exact (erf) GELU; ONNX Runtime fuses the pattern into its `Gelu` kernel.
fn gelu(e: &mut Emitter, x: &str) -> String {
    let inv_sqrt2 = e.b.scalar_float(std::f32::consts::FRAC_1_SQRT_2);
    let (half, one) = (e.b.scalar_float(0.5), e.b.scalar_float(1.0));
    let scaled = e.b.op("Mul", &[x, &inv_sqrt2], vec![]);
    let erf = e.b.op("Erf", &[&scaled], vec![]);
    let erf1 = e.b.op("Add", &[&erf, &one], vec![]);
    let y = e.b.op("Mul", &[x, &erf1], vec![]);
    e.b.op("Mul", &[&y, &half], vec![])
}

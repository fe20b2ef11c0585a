//! The decoder graph (Qwen2, Llama) in Hugging Face Optimum's "with past" layout:
//! `input_ids`, `attention_mask`, `position_ids`, `past_key_values.{i}.key|value` in;
//! `logits`, `present.{i}.key|value` out. Batch and sequence axes are dynamic, and an empty past
//! (length 0) serves the prefill.
//!
//! With [`Attention::Gqa`] each layer's attention is ONNX Runtime's fused `GroupQueryAttention`
//! instead, rotary embedding inside: rows are right-padded (a row's keys start at position 0),
//! each row's length is the sum of its `attention_mask` row, and there is no `position_ids`
//! (positions follow from the lengths), so no row attends over another's padding.

use anyhow::Result;

use super::Attention;
use super::emit::Emitter;
use super::graph::{Attr, Dim, Elem, MS_DOMAIN};
use crate::checkpoint::DecoderConfig;

/// The value every masked attention score is replaced with (as `transformers` does, the
/// smallest finite float, so a fully masked row stays finite).
const MASKED: f32 = f32::MIN;

/// Values computed once and used by every layer.
enum Shared {
    WithPast(WithPast),
    Gqa(Fused),
}

/// What the with-past attention of every layer shares.
struct WithPast {
    /// `[batch, 1, S, head_dim]` RoPE cosines and sines.
    cos: String,
    sin: String,
    /// `[batch, 1, groups * S, total]` bool: which key each query row may attend to.
    allowed: String,
    masked: String,
    /// `[head_dim / 2, head_dim / 2]` split sizes for `rotate_half`.
    halves: String,
}

/// What the fused attention of every layer shares.
struct Fused {
    /// `[batch]` int32: each row's length minus one (its last key's position).
    seqlens_k: String,
    /// int32 scalar: the width of `attention_mask`, the longest row's length.
    total: String,
    /// `[max_position_embeddings, head_dim / 2]` RoPE tables.
    cos_cache: String,
    sin_cache: String,
    /// `[batch]` int64: the position of each row's last token in this run's input.
    last_index: String,
}

/// Emits the whole decoder graph and declares its inputs and outputs.
pub fn build(e: &mut Emitter, c: &DecoderConfig, attention: Attention) -> Result<()> {
    declare_io(e, c, attention);
    let shared = match attention {
        Attention::WithPast => Shared::WithPast(shared_values(e, c)?),
        Attention::Gqa => Shared::Gqa(fused_values(e, c)?),
    };
    let mut x = e.embedding("input_ids", "model.embed_tokens.weight", true)?;
    for layer in 0..c.num_layers {
        x = decoder_layer(e, c, &shared, layer, &x)?;
    }
    let mut x = e.rms_norm(&x, "model.norm.weight", c.rms_norm_eps)?;
    let fp16 = e.b.float() == Elem::F16;
    if let (true, Shared::Gqa(s)) = (fp16, &shared) {
        x = last_positions(e, s, &x, c.hidden_size);
    }
    let head = if c.tie_word_embeddings {
        "model.embed_tokens.weight"
    } else {
        "lm_head.weight"
    };
    let logits = e.linear_from(&x, head, None)?;
    if fp16 {
        let to = i64::from(Elem::F32.code());
        e.b.node_in("", "Cast", &[&logits], &["logits"], vec![("to", Attr::Int(to))]);
    } else {
        e.b.node_in("", "Identity", &[&logits], &["logits"], vec![]);
    }
    Ok(())
}

/// `[batch, S, hidden]` -> `[batch, 1, hidden]`: each row's last token (a right-padded prefill
/// row's last real token; a decode step's only one), so the output head runs once a row.
fn last_positions(e: &mut Emitter, s: &Fused, x: &str, hidden: usize) -> String {
    let b = &mut e.b;
    let shape = b.op("Shape", &["input_ids"], vec![]);
    let (zero, one) = (b.scalar_i64(0), b.scalar_i64(1));
    let rows = b.op("Gather", &[&shape, &zero], vec![("axis", Attr::Int(0))]);
    let width = b.op("Gather", &[&shape, &one], vec![("axis", Attr::Int(0))]);
    let starts = b.op("Range", &[&zero, &rows, &one], vec![]);
    let starts = b.op("Mul", &[&starts, &width], vec![]);
    let flat_index = b.op("Add", &[&starts, &s.last_index], vec![]);
    let flat_shape = b.i64s(&[-1, hidden as i64]);
    let flat = b.op("Reshape", &[x, &flat_shape], vec![]);
    let picked = b.op("Gather", &[&flat, &flat_index], vec![("axis", Attr::Int(0))]);
    let axes = b.i64s(&[1]);
    b.op("Unsqueeze", &[&picked, &axes], vec![])
}

fn declare_io(e: &mut Emitter, c: &DecoderConfig, attention: Attention) {
    let (batch, seq) = (Dim::Named("batch_size"), Dim::Named("sequence_length"));
    let (past, total) = (Dim::Named("past_sequence_length"), Dim::Named("total_sequence_length"));
    let kv = |len: &Dim| {
        [
            Dim::Named("batch_size"),
            Dim::Fixed(c.num_kv_heads),
            len.clone(),
            Dim::Fixed(c.head_dim),
        ]
    };
    let float = e.b.float();
    e.b.input("input_ids", Elem::I64, &[batch.clone(), seq.clone()]);
    e.b.input("attention_mask", Elem::I64, &[batch.clone(), total.clone()]);
    if attention == Attention::WithPast {
        e.b.input("position_ids", Elem::I64, &[batch.clone(), seq.clone()]);
    }
    for i in 0..c.num_layers {
        e.b.input(&format!("past_key_values.{i}.key"), float, &kv(&past));
        e.b.input(&format!("past_key_values.{i}.value"), float, &kv(&past));
    }
    // The GPU form gives each row's last position only.
    let positions = if e.b.float() == Elem::F16 { Dim::Fixed(1) } else { seq };
    e.b.output("logits", Elem::F32, &[batch, positions, Dim::Fixed(c.vocab_size)]);
    for i in 0..c.num_layers {
        e.b.output(&format!("present.{i}.key"), float, &kv(&total));
        e.b.output(&format!("present.{i}.value"), float, &kv(&total));
    }
}

fn shared_values(e: &mut Emitter, c: &DecoderConfig) -> Result<WithPast> {
    let b = &mut e.b;
    // RoPE: angles = position_ids * inv_freq, duplicated over both halves of the head.
    let inv_freq = c.rope.inv_freq(c.head_dim);
    let inv_freq = b.float_init("rope.inv_freq", &[inv_freq.len()], &inv_freq)?;
    let to = i64::from(b.float().code());
    let pos = b.op("Cast", &["position_ids"], vec![("to", Attr::Int(to))]);
    let last = b.i64s(&[-1]);
    let pos = b.op("Unsqueeze", &[&pos, &last], vec![]);
    let freqs = b.op("Mul", &[&pos, &inv_freq], vec![]);
    let angles = b.op("Concat", &[&freqs, &freqs], vec![("axis", Attr::Int(-1))]);
    let heads_axis = b.i64s(&[1]);
    let cos = b.op("Cos", &[&angles], vec![]);
    let cos = b.op("Unsqueeze", &[&cos, &heads_axis], vec![]);
    let sin = b.op("Sin", &[&angles], vec![]);
    let sin = b.op("Unsqueeze", &[&sin, &heads_axis], vec![]);

    // Mask: query i (absolute position past + i) sees key j when j <= past + i and key j is
    // not padding.
    let one = b.i64s(&[1]);
    let ids_shape = b.op("Shape", &["input_ids"], vec![]);
    let mask_shape = b.op("Shape", &["attention_mask"], vec![]);
    let idx1 = b.scalar_i64(1);
    let seq = b.op("Gather", &[&ids_shape, &idx1], vec![("axis", Attr::Int(0))]);
    let total = b.op("Gather", &[&mask_shape, &idx1], vec![("axis", Attr::Int(0))]);
    let past = b.op("Sub", &[&total, &seq], vec![]);
    let zero = b.scalar_i64(0);
    let step = b.scalar_i64(1);
    let key_idx = b.op("Range", &[&zero, &total, &step], vec![]);
    let query_idx = b.op("Range", &[&past, &total, &step], vec![]);
    // Queries of a key/value group are stacked along the sequence axis (see `attention`), so
    // query positions repeat once per query head of a group.
    let groups = b.i64s(&[(c.num_heads / c.num_kv_heads) as i64]);
    let query_idx = b.op("Tile", &[&query_idx, &groups], vec![]);
    let first = b.i64s(&[0]);
    let key_idx = b.op("Unsqueeze", &[&key_idx, &first], vec![]);
    let query_idx = b.op("Unsqueeze", &[&query_idx, &one], vec![]);
    let causal = b.op("LessOrEqual", &[&key_idx, &query_idx], vec![]);
    let pad_axes = b.i64s(&[1, 2]);
    let not_pad = b.op("Cast", &["attention_mask"], vec![("to", Attr::Int(9))]);
    let not_pad = b.op("Unsqueeze", &[&not_pad, &pad_axes], vec![]);
    let allowed = b.op("And", &[&causal, &not_pad], vec![]);
    let masked = b.scalar_float(MASKED);
    let half = (c.head_dim / 2) as i64;
    let halves = b.i64s(&[half, half]);
    Ok(WithPast {
        cos,
        sin,
        allowed,
        masked,
        halves,
    })
}

/// The sequence lengths and RoPE tables of the fused attention. `GroupQueryAttention` rotates
/// by position tables of `head_dim / 2` columns, which it takes in multiples of 8.
fn fused_values(e: &mut Emitter, c: &DecoderConfig) -> Result<Fused> {
    anyhow::ensure!(
        c.head_dim.is_multiple_of(16),
        "fused attention (GroupQueryAttention) needs a head_dim that is a multiple of 16, not {}",
        c.head_dim
    );
    let b = &mut e.b;
    let axis = b.i64s(&[1]);
    let lengths = b.op(
        "ReduceSum",
        &["attention_mask", &axis],
        vec![("keepdims", Attr::Int(0))],
    );
    let one = b.scalar_i64(1);
    let last = b.op("Sub", &[&lengths, &one], vec![]);
    let seqlens_k = b.op("Cast", &[&last], vec![("to", Attr::Int(6))]);
    // A row's last token in this run: a prefill row's at its length - 1, a step's at 0.
    let ids_shape = b.op("Shape", &["input_ids"], vec![]);
    let seq_axis = b.scalar_i64(1);
    let seq = b.op("Gather", &[&ids_shape, &seq_axis], vec![("axis", Attr::Int(0))]);
    let seq_last = b.op("Sub", &[&seq, &one], vec![]);
    let last_index = b.op("Min", &[&last, &seq_last], vec![]);
    let mask_shape = b.op("Shape", &["attention_mask"], vec![]);
    let idx1 = b.scalar_i64(1);
    let width = b.op("Gather", &[&mask_shape, &idx1], vec![("axis", Attr::Int(0))]);
    let total = b.op("Cast", &[&width], vec![("to", Attr::Int(6))]);
    // The tables as the with-past graph computes its angles: f32 position times f32 frequency.
    let inv_freq = c.rope.inv_freq(c.head_dim);
    let positions = c.max_position_embeddings;
    let mut cos = Vec::with_capacity(positions * inv_freq.len());
    let mut sin = Vec::with_capacity(positions * inv_freq.len());
    for pos in 0..positions {
        for &f in &inv_freq {
            let angle = pos as f32 * f;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    let dims = [positions, inv_freq.len()];
    let cos_cache = b.float_init("rope.cos_cache", &dims, &cos)?;
    let sin_cache = b.float_init("rope.sin_cache", &dims, &sin)?;
    Ok(Fused {
        seqlens_k,
        total,
        cos_cache,
        sin_cache,
        last_index,
    })
}

fn decoder_layer(e: &mut Emitter, c: &DecoderConfig, s: &Shared, layer: usize, x: &str) -> Result<String> {
    let p = format!("model.layers.{layer}");
    let h = e.rms_norm(x, &format!("{p}.input_layernorm.weight"), c.rms_norm_eps)?;
    let attn = match s {
        Shared::WithPast(s) => attention(e, c, s, layer, &h)?,
        Shared::Gqa(s) => fused_attention(e, c, s, layer, &h)?,
    };
    let attn = e.linear(&attn, &format!("{p}.self_attn.o_proj"), c.o_bias)?;
    let x = e.b.op("Add", &[x, &attn], vec![]);
    let h = e.rms_norm(&x, &format!("{p}.post_attention_layernorm.weight"), c.rms_norm_eps)?;
    let gate = e.linear(&h, &format!("{p}.mlp.gate_proj"), c.mlp_bias)?;
    let up = e.linear(&h, &format!("{p}.mlp.up_proj"), c.mlp_bias)?;
    let sig = e.b.op("Sigmoid", &[&gate], vec![]);
    let silu = e.b.op("Mul", &[&gate, &sig], vec![]);
    let act = e.b.op("Mul", &[&silu, &up], vec![]);
    let down = e.linear(&act, &format!("{p}.mlp.down_proj"), c.mlp_bias)?;
    Ok(e.b.op("Add", &[&x, &down], vec![]))
}

/// `[batch, S, heads * head_dim]` -> `[batch, heads, S, head_dim]`.
fn split_heads(e: &mut Emitter, x: &str, heads: usize, head_dim: usize) -> String {
    let shape = e.b.i64s(&[0, 0, heads as i64, head_dim as i64]);
    let x = e.b.op("Reshape", &[x, &shape], vec![]);
    e.b.op("Transpose", &[&x], vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))])
}

fn rope(e: &mut Emitter, s: &WithPast, x: &str) -> String {
    let (x1, x2) = (e.b.fresh("x1"), e.b.fresh("x2"));
    e.b.node_in("", "Split", &[x, &s.halves], &[&x1, &x2], vec![("axis", Attr::Int(-1))]);
    let neg = e.b.op("Neg", &[&x2], vec![]);
    let rotated = e.b.op("Concat", &[&neg, &x1], vec![("axis", Attr::Int(-1))]);
    let a = e.b.op("Mul", &[x, &s.cos], vec![]);
    let r = e.b.op("Mul", &[&rotated, &s.sin], vec![]);
    e.b.op("Add", &[&a, &r], vec![])
}

/// One layer's attention in one `GroupQueryAttention` node: projections in, RoPE, the cache
/// extended row by row at each row's own length, causal attention within each row's length.
fn fused_attention(e: &mut Emitter, c: &DecoderConfig, s: &Fused, layer: usize, h: &str) -> Result<String> {
    let p = format!("model.layers.{layer}.self_attn");
    let q = e.linear(h, &format!("{p}.q_proj"), c.qkv_bias)?;
    let k = e.linear(h, &format!("{p}.k_proj"), c.qkv_bias)?;
    let v = e.linear(h, &format!("{p}.v_proj"), c.qkv_bias)?;
    let out = e.b.fresh("attn");
    e.b.node_in(
        MS_DOMAIN,
        "GroupQueryAttention",
        &[
            &q,
            &k,
            &v,
            &format!("past_key_values.{layer}.key"),
            &format!("past_key_values.{layer}.value"),
            &s.seqlens_k,
            &s.total,
            &s.cos_cache,
            &s.sin_cache,
        ],
        &[&out, &format!("present.{layer}.key"), &format!("present.{layer}.value")],
        vec![
            ("num_heads", Attr::Int(c.num_heads as i64)),
            ("kv_num_heads", Attr::Int(c.num_kv_heads as i64)),
            ("do_rotary", Attr::Int(1)),
            ("rotary_interleaved", Attr::Int(0)),
            ("scale", Attr::Float(1.0 / (c.head_dim as f32).sqrt())),
        ],
    );
    Ok(out)
}

fn attention(e: &mut Emitter, c: &DecoderConfig, s: &WithPast, layer: usize, h: &str) -> Result<String> {
    let p = format!("model.layers.{layer}.self_attn");
    let (nh, kvh, d) = (c.num_heads as i64, c.num_kv_heads as i64, c.head_dim as i64);
    let q = e.linear(h, &format!("{p}.q_proj"), c.qkv_bias)?;
    let k = e.linear(h, &format!("{p}.k_proj"), c.qkv_bias)?;
    let v = e.linear(h, &format!("{p}.v_proj"), c.qkv_bias)?;
    let q = split_heads(e, &q, c.num_heads, c.head_dim);
    let k = split_heads(e, &k, c.num_kv_heads, c.head_dim);
    let v = split_heads(e, &v, c.num_kv_heads, c.head_dim);
    let q = rope(e, s, &q);
    let k = rope(e, s, &k);
    let (present_k, present_v) = (format!("present.{layer}.key"), format!("present.{layer}.value"));
    let (past_k, past_v) = (
        format!("past_key_values.{layer}.key"),
        format!("past_key_values.{layer}.value"),
    );
    e.b.node_in(
        "",
        "Concat",
        &[&past_k, &k],
        &[&present_k],
        vec![("axis", Attr::Int(2))],
    );
    e.b.node_in(
        "",
        "Concat",
        &[&past_v, &v],
        &[&present_v],
        vec![("axis", Attr::Int(2))],
    );
    // Grouped-query attention without copying keys: the query heads of one key/value head are
    // contiguous, so [B, H, S, D] reshapes to [B, KV, groups * S, D] and attends to [B, KV, T, D].
    let scale = e.b.scalar_float(1.0 / (c.head_dim as f32).sqrt());
    let q = e.b.op("Mul", &[&q, &scale], vec![]);
    let grouped = e.b.i64s(&[0, kvh, -1, d]);
    let q = e.b.op("Reshape", &[&q, &grouped], vec![]);
    let kt =
        e.b.op("Transpose", &[&present_k], vec![("perm", Attr::Ints(vec![0, 1, 3, 2]))]);
    let scores = e.b.op("MatMul", &[&q, &kt], vec![]);
    let scores = e.b.op("Where", &[&s.allowed, &scores, &s.masked], vec![]);
    let probs = e.b.op("Softmax", &[&scores], vec![("axis", Attr::Int(-1))]);
    let ctx = e.b.op("MatMul", &[&probs, &present_v], vec![]);
    let per_head = e.b.i64s(&[0, nh, -1, d]);
    let ctx = e.b.op("Reshape", &[&ctx, &per_head], vec![]);
    let ctx =
        e.b.op("Transpose", &[&ctx], vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))]);
    let merged = e.b.i64s(&[0, 0, nh * d]);
    Ok(e.b.op("Reshape", &[&ctx, &merged], vec![]))
}

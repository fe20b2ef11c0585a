//! Decode throughput of the with-past graph against the fused `GroupQueryAttention` graph
//! (`--attention gqa`), same student and precision, one run, so the figures are ratios on the
//! same machine state. Rows have different prompt lengths (a quarter to all of
//! `--prompt-len`), as a serving batch does: the with-past graph left-pads them, attends every
//! row over the longest and copies the whole cache each step; the fused one attends each row
//! over its own length, and with a shared cache (bound as past and present) copies nothing.
//!
//! ```sh
//! cargo bench --bench attention                                   # mid shape, INT8
//! cargo bench --bench attention -- --shape r1-distill-qwen-1.5b   # the real 1.5B dimensions
//! ```
//! Flags: `--shape S`, `--batch 1,16,32`, `--prompt-len 128`, `--decode-steps 32`, `--fp32`,
//! `--threads N`, `--work-dir DIR` (default `target/bench-models`, shared with `student`).

mod bench_models;

use std::borrow::Cow;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use distill_serve::engine::{DecoderSession, SessionOptions, open_session};
use distill_serve::export::{Attention, Form, Precision};
use distill_serve::reference::max_abs_diff;
use distill_serve::tiny::ShapePreset;
use ndarray::{Array2, Array4};
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor};

#[derive(clap::Parser)]
struct Options {
    #[arg(long, value_enum, default_value = "mid")]
    shape: ShapePreset,
    /// Batch sizes, comma-separated.
    #[arg(long = "batch", value_delimiter = ',', default_value = "1,16,32")]
    batches: Vec<usize>,
    /// The longest prompt; rows hold a quarter to all of it.
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    #[arg(long, default_value_t = 32)]
    decode_steps: usize,
    /// FP32 instead of the default INT8 layout.
    #[arg(long)]
    fp32: bool,
    /// ONNX Runtime intra-op threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    #[arg(long, default_value = "target/bench-models")]
    work_dir: PathBuf,
    /// `cargo bench` passes `--bench` to every bench target.
    #[arg(long, hide = true)]
    bench: bool,
}

/// Exports (or reuses) the student of `o.shape` with `attention`.
fn model(o: &Options, attention: Attention) -> Result<PathBuf> {
    let (precision, precision_label) = match o.fp32 {
        true => (Precision::Fp32, "fp32"),
        false => (Precision::DEFAULT_INT8, "int8"),
    };
    let name = attention.to_possible_value().context("an attention without a name")?;
    let label = format!("{}-{precision_label}", name.get_name());
    let form = Form {
        attention,
        ..Form::default()
    };
    bench_models::bench_model(&o.work_dir, ("attention", &label), o.shape, precision, form)
}

/// Row `b`'s prompt length: a quarter to all of the longest.
fn lengths(batch: usize, longest: usize) -> Vec<usize> {
    (0..batch).map(|b| (longest * (1 + b % 4) / 4).max(1)).collect()
}

fn token(b: usize, i: usize) -> i64 {
    ((b * 131 + i * 17 + 5) % 500) as i64
}

/// Decode tokens/s of the with-past graph: left-padded rows, the cache grown by the graph; and
/// the prefill's time.
fn with_past(session: &mut DecoderSession, lengths: &[usize], steps: usize) -> Result<(f64, Duration)> {
    let (batch, width) = (lengths.len(), *lengths.iter().max().context("no rows")?);
    let pad = |b: usize| width - lengths[b];
    let ids = Array2::from_shape_fn(
        (batch, width),
        |(b, i)| if i < pad(b) { 0 } else { token(b, i - pad(b)) },
    );
    let mask = Array2::from_shape_fn((batch, width), |(b, i)| i64::from(i >= pad(b)));
    let pos = Array2::from_shape_fn((batch, width), |(b, i)| i.saturating_sub(pad(b)) as i64);
    let started = Instant::now();
    let (_, mut cache) = session.forward_last(&ids, &mask, &pos, session.empty_cache(batch)?)?;
    let prefill = started.elapsed();
    let started = Instant::now();
    for k in 0..steps {
        let ids = Array2::from_shape_fn((batch, 1), |(b, _)| token(b, k));
        let mask = Array2::from_shape_fn((batch, width + k + 1), |(b, i)| i64::from(i >= pad(b)));
        let pos = Array2::from_shape_fn((batch, 1), |(b, _)| (lengths[b] + k) as i64);
        cache = session.forward_last(&ids, &mask, &pos, cache)?.1;
    }
    Ok(((batch * steps) as f64 / started.elapsed().as_secs_f64(), prefill))
}

/// Decode tokens/s of the fused graph: right-padded rows, each at its own length; the last
/// step's logits; and the prefill's time.
fn fused(session: &mut Session, lengths: &[usize], steps: usize, layers: usize) -> Result<(f64, Vec<f32>, Duration)> {
    let batch = lengths.len();
    let (kv_heads, head_dim) = kv_shape(session)?;
    let mut past: Vec<DynValue> = (0..2 * layers)
        .map(|_| Ok(Tensor::from_array(Array4::<f32>::zeros((batch, kv_heads, 0, head_dim)))?.into_dyn()))
        .collect::<Result<_>>()?;
    let (mut elapsed, mut last, mut prefill) = (Duration::ZERO, Vec::new(), Duration::ZERO);
    for k in 0..=steps {
        let (ids, mask) = fused_inputs(lengths, k);
        let mut inputs: Vec<(Cow<str>, SessionInputValue)> = vec![
            ("input_ids".into(), Tensor::from_array(ids)?.into()),
            ("attention_mask".into(), Tensor::from_array(mask)?.into()),
        ];
        for (i, value) in past.drain(..).enumerate() {
            let kind = if i % 2 == 0 { "key" } else { "value" };
            inputs.push((format!("past_key_values.{}.{kind}", i / 2).into(), value.into()));
        }
        let started = Instant::now();
        let mut outputs = session.run(inputs)?;
        if k > 0 {
            elapsed += started.elapsed();
        } else {
            prefill = started.elapsed();
        }
        for l in 0..layers {
            for kind in ["key", "value"] {
                past.push(
                    outputs
                        .remove(format!("present.{l}.{kind}"))
                        .context("no present output")?,
                );
            }
        }
        if k == steps {
            let (_, logits) = outputs["logits"].try_extract_tensor::<f32>()?;
            last = logits.to_vec();
        }
    }
    Ok(((batch * steps) as f64 / elapsed.as_secs_f64(), last, prefill))
}

/// As [`fused`], with the cache preallocated for the whole run and bound as both each layer's
/// past and present (I/O binding): the op writes each new position in place, no copy.
fn fused_shared(session: &mut Session, lengths: &[usize], steps: usize, layers: usize) -> Result<(f64, Vec<f32>)> {
    let (batch, width) = (lengths.len(), *lengths.iter().max().context("no rows")?);
    let (kv_heads, head_dim) = kv_shape(session)?;
    let mut binding = session.create_binding()?;
    let mut caches = Vec::with_capacity(2 * layers);
    for l in 0..layers {
        for kind in ["key", "value"] {
            let mut cache = Tensor::<f32>::new(session.allocator(), [batch, kv_heads, width + steps, head_dim])?;
            binding.bind_input(format!("past_key_values.{l}.{kind}"), &cache)?;
            binding.bind_output(format!("present.{l}.{kind}"), &mut cache)?;
            caches.push(cache);
        }
    }
    let (mut elapsed, mut last) = (Duration::ZERO, Vec::new());
    for k in 0..=steps {
        let (ids, mask) = fused_inputs(lengths, k);
        binding.bind_input("input_ids", &Tensor::from_array(ids)?)?;
        binding.bind_input("attention_mask", &Tensor::from_array(mask)?)?;
        // Bound afresh each run: the prefill's logits have another shape than a step's.
        binding.bind_output_to_device("logits", session.allocator().memory_info())?;
        let started = Instant::now();
        let outputs = session.run_binding(&binding)?;
        if k > 0 {
            elapsed += started.elapsed();
        }
        if k == steps {
            let (_, logits) = outputs["logits"].try_extract_tensor::<f32>()?;
            last = logits.to_vec();
        }
    }
    Ok(((batch * steps) as f64 / elapsed.as_secs_f64(), last))
}

/// The fused graph's `input_ids` and `attention_mask` at run `k`: the right-padded prompts
/// first, then one token a row, each row's mask covering its own length.
fn fused_inputs(lengths: &[usize], k: usize) -> (Array2<i64>, Array2<i64>) {
    let (batch, width) = (lengths.len(), lengths.iter().copied().max().unwrap_or(0));
    let ids = match k {
        0 => Array2::from_shape_fn((batch, width), |(b, i)| if i < lengths[b] { token(b, i) } else { 0 }),
        _ => Array2::from_shape_fn((batch, 1), |(b, _)| token(b, k - 1)),
    };
    let mask = Array2::from_shape_fn((batch, width + k), |(b, i)| i64::from(i < lengths[b] + k));
    (ids, mask)
}

fn kv_shape(session: &Session) -> Result<(usize, usize)> {
    let input = session
        .inputs()
        .iter()
        .find(|i| i.name() == "past_key_values.0.key")
        .context("no past_key_values.0.key input")?;
    match input.dtype() {
        ort::value::ValueType::Tensor { shape, .. } if shape.len() == 4 => Ok((shape[1] as usize, shape[3] as usize)),
        other => anyhow::bail!("past key of shape {other:?}"),
    }
}

fn main() -> Result<()> {
    let o = Options::parse();
    let options = SessionOptions {
        intra_threads: o.threads,
        ..Default::default()
    };
    let mut reference = DecoderSession::open(&model(&o, Attention::WithPast)?, options)?;
    let mut gqa = open_session(&model(&o, Attention::Gqa)?, options)?;
    let layers = reference.num_layers();
    println!(
        "\n### attention: {:?} student, {}, prompts of {} to {} tokens, {} decode steps\n",
        o.shape,
        if o.fp32 { "FP32" } else { "INT8" },
        (o.prompt_len / 4).max(1),
        o.prompt_len,
        o.decode_steps
    );
    println!(
        "| batch | with-past decode tok/s | fused | x with-past | fused, shared cache | x with-past | max abs diff fused vs shared | prefill ms with-past | fused |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for &batch in &o.batches {
        let rows = lengths(batch, o.prompt_len);
        // A warm-up of each, then the timed runs.
        with_past(&mut reference, &rows, 2)?;
        fused(&mut gqa, &rows, 2, layers)?;
        fused_shared(&mut gqa, &rows, 2, layers)?;
        let (old, old_prefill) = with_past(&mut reference, &rows, o.decode_steps)?;
        let (new, copied, new_prefill) = fused(&mut gqa, &rows, o.decode_steps, layers)?;
        let (shared, in_place) = fused_shared(&mut gqa, &rows, o.decode_steps, layers)?;
        println!(
            "| {batch} | {old:.1} | {new:.1} | {:.2} | {shared:.1} | {:.2} | {:.1e} | {:.1} | {:.1} |",
            new / old,
            shared / old,
            max_abs_diff(&copied, &in_place),
            old_prefill.as_secs_f64() * 1e3,
            new_prefill.as_secs_f64() * 1e3
        );
    }
    Ok(())
}

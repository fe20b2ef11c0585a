//! Prefill and decode throughput of exported students, FP32 against each INT8 layout, in one
//! run so the figures are ratios on the same machine state.
//!
//! ```sh
//! cargo bench --bench student                                   # tiny and mid shapes
//! cargo bench --bench student -- --shape r1-distill-qwen-1.5b   # the real 1.5B dimensions
//! ```
//! Flags: `--shape S` (repeatable), `--batch 1,16`, `--prompt-len 32`, `--decode-steps 16`,
//! `--threads N` (ONNX Runtime intra-op threads, default all cores), `--work-dir DIR` (keeps the
//! generated checkpoints and exports between runs; default `target/bench-models`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use distill_serve::checkpoint::Family;
use distill_serve::engine::{DecoderSession, SessionOptions};
use distill_serve::export::{self, ExternalData, Int8Format, Precision};
use distill_serve::reference::{cosine, kl_divergence};
use distill_serve::tiny::{ShapePreset, TinySpec, write_tiny};
use ndarray::Array2;

/// Prefill and decode throughput of the exported student, FP32 against each INT8 form.
#[derive(clap::Parser)]
struct Options {
    /// Shapes to measure (repeatable) [default: tiny and mid].
    #[arg(long = "shape", value_enum)]
    shapes: Vec<ShapePreset>,
    /// Batch sizes, comma-separated.
    #[arg(long = "batch", value_delimiter = ',', default_value = "1,16")]
    batches: Vec<usize>,
    #[arg(long, default_value_t = 32)]
    prompt_len: usize,
    #[arg(long, default_value_t = 16)]
    decode_steps: usize,
    /// ONNX Runtime intra-op threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    #[arg(long, default_value = "target/bench-models")]
    work_dir: PathBuf,
    /// `cargo bench` passes `--bench` to every bench target.
    #[arg(long, hide = true)]
    bench: bool,
}

fn shape_name(shape: ShapePreset) -> &'static str {
    match shape {
        ShapePreset::Tiny => "tiny",
        ShapePreset::Mid => "mid",
        ShapePreset::R1DistillQwen1_5b => "r1-distill-qwen-1.5b",
    }
}

const PRECISIONS: [(&str, Precision); 4] = [
    ("fp32", Precision::Fp32),
    ("int8-matmul-integer", Precision::Int8(Int8Format::MatMulInteger)),
    ("int8-matmul-nbits", Precision::Int8(Int8Format::MatMulNBits)),
    ("int8-qdq", Precision::Int8(Int8Format::Qdq)),
];

/// Makes (or reuses) the checkpoint and the exports of one shape.
fn prepare(o: &Options, shape: ShapePreset) -> Result<Vec<(&'static str, Precision, PathBuf, u64)>> {
    let dir = o.work_dir.join(shape_name(shape));
    let ckpt = dir.join("checkpoint");
    if !ckpt.join("config.json").exists() {
        let mut spec = TinySpec::new(Family::Qwen2, 0);
        spec.shape = shape;
        let t = Instant::now();
        write_tiny(&spec, &ckpt)?;
        eprintln!("{}: checkpoint in {:.1}s", shape_name(shape), t.elapsed().as_secs_f64());
    }
    let mut out = Vec::new();
    for (label, precision) in PRECISIONS {
        let model_dir = dir.join(label);
        let model = model_dir.join(export::MODEL_FILE);
        if !model.exists() {
            let t = Instant::now();
            export::export(&ckpt, &model_dir, precision, ExternalData::Auto)?;
            eprintln!(
                "{}: {label} export in {:.1}s",
                shape_name(shape),
                t.elapsed().as_secs_f64()
            );
        }
        let bytes = [export::MODEL_FILE, export::EXTERNAL_DATA_FILE]
            .iter()
            .filter_map(|f| std::fs::metadata(model_dir.join(f)).ok())
            .map(|m| m.len())
            .sum();
        out.push((label, precision, model, bytes));
    }
    Ok(out)
}

struct Measured {
    prefill_tps: f64,
    decode_tps: f64,
    /// Prefill logits of the last position per sequence, for accuracy against FP32.
    last_logits: Vec<Vec<f32>>,
}

fn prompt_batch(batch: usize, len: usize, vocab: usize) -> Array2<i64> {
    // Deterministic, varied token ids within the tokenizer's range.
    Array2::from_shape_fn((batch, len), |(b, i)| ((b * 131 + i * 17 + 5) % vocab.min(500)) as i64)
}

fn measure(session: &mut DecoderSession, batch: usize, o: &Options) -> Result<Measured> {
    let ids = prompt_batch(batch, o.prompt_len, session.vocab_size());
    let mask = Array2::<i64>::ones((batch, o.prompt_len));
    let pos = Array2::from_shape_fn((batch, o.prompt_len), |(_, i)| i as i64);
    // Warm-up run (allocations, kernel selection), then timed runs.
    session.forward(&ids, &mask, &pos, session.empty_cache(batch)?)?;
    let mut prefill = Duration::ZERO;
    let reps = 2;
    let mut last = None;
    for _ in 0..reps {
        let t = Instant::now();
        let out = session.forward(&ids, &mask, &pos, session.empty_cache(batch)?)?;
        prefill += t.elapsed();
        last = Some(out);
    }
    let (logits, mut cache) = last.context("no prefill run")?;
    let last_logits = (0..batch)
        .map(|b| logits.slice(ndarray::s![b, -1, ..]).to_vec())
        .collect();
    let mut next: Vec<i64> = (0..batch).map(|b| (b as i64 * 7 + 3) % 500).collect();
    let t = Instant::now();
    for step in 0..o.decode_steps {
        let total = o.prompt_len + step + 1;
        let ids = Array2::from_shape_fn((batch, 1), |(b, _)| next[b]);
        let (logits, c) = session.forward(
            &ids,
            &Array2::ones((batch, total)),
            &Array2::from_elem((batch, 1), (total - 1) as i64),
            cache,
        )?;
        cache = c;
        next = (0..batch)
            .map(|b| (logits[[b, 0, step % 7]] * 1000.0).abs() as i64 % 500)
            .collect();
    }
    let decode = t.elapsed();
    Ok(Measured {
        prefill_tps: (batch * o.prompt_len * reps) as f64 / prefill.as_secs_f64(),
        decode_tps: (batch * o.decode_steps) as f64 / decode.as_secs_f64(),
        last_logits,
    })
}

fn run_shape(o: &Options, shape: ShapePreset) -> Result<()> {
    let models = prepare(o, shape)?;
    let fp32_bytes = models[0].3;
    println!(
        "\n### {} (prompt {} tokens, {} decode steps, threads {})\n",
        shape_name(shape),
        o.prompt_len,
        o.decode_steps,
        if o.threads == 0 {
            "all".to_string()
        } else {
            o.threads.to_string()
        }
    );
    println!(
        "| precision | file MB (x FP32) | batch | prefill tok/s | x FP32 | decode tok/s | x FP32 | min cos vs FP32 | mean KL |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut baseline: Vec<Measured> = Vec::new();
    for (label, _, model, bytes) in &models {
        let mut session = DecoderSession::open(
            model,
            SessionOptions {
                intra_threads: o.threads,
                ..Default::default()
            },
        )?;
        for (i, &batch) in o.batches.iter().enumerate() {
            let m = measure(&mut session, batch, o)?;
            let base = baseline.get(i).unwrap_or(&m);
            let (cos, kl) = accuracy(&base.last_logits, &m.last_logits);
            println!(
                "| {label} | {:.1} ({:.2}) | {batch} | {:.1} | {:.2} | {:.1} | {:.2} | {cos:.4} | {kl:.5} |",
                *bytes as f64 / 1e6,
                *bytes as f64 / fp32_bytes as f64,
                m.prefill_tps,
                m.prefill_tps / base.prefill_tps,
                m.decode_tps,
                m.decode_tps / base.decode_tps,
            );
            if baseline.len() <= i {
                baseline.push(m);
            }
        }
    }
    Ok(())
}

fn accuracy(a: &[Vec<f32>], b: &[Vec<f32>]) -> (f32, f32) {
    let cos = a.iter().zip(b).map(|(x, y)| cosine(x, y)).fold(1.0, f32::min);
    let kl = a.iter().zip(b).map(|(x, y)| kl_divergence(x, y)).sum::<f32>() / a.len() as f32;
    (cos, kl)
}

fn main() -> Result<()> {
    let mut o = Options::parse();
    if o.shapes.is_empty() {
        o.shapes = vec![ShapePreset::Tiny, ShapePreset::Mid];
    }
    std::fs::create_dir_all(&o.work_dir)?;
    for &shape in &o.shapes {
        run_shape(&o, shape)?;
    }
    let _ = Path::new("");
    Ok(())
}

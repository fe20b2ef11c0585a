//! Engine throughput of the GPU form (`export --attention gqa --activations fp16`) on one
//! execution provider, as the server runs it: a right-padded prefill through `prefill_rows`,
//! then decode steps over a `SlotCache` bound as past and present. Per form and batch size:
//! the prefill's time, decode tokens/s, and requests/s for requests of `--prompt-len` prompt
//! tokens and `--decode-steps` new ones at that batch; per form, the time to open the session
//! (for TensorRT, where it builds its engines) and the first prefill's (TensorRT builds for each
//! new shape on its first run).
//!
//! ```sh
//! scripts/gpu-bench.sh                                          # what a user with a GPU runs
//! cargo bench --features cuda --bench gpu -- --provider cuda    # the same, one provider
//! cargo bench --bench gpu -- --provider cpu --shape mid --batch 1,8   # no GPU: a smoke run
//! ```
//! Flags: `--provider cpu|cuda|tensorrt`, `--device-id N`, `--shape S` (default the 1.5B
//! dimensions), `--forms fp16,int8`, `--batch 1,2,4,8,16,32,64`, `--prompt-len 128`,
//! `--decode-steps 64`, `--work-dir DIR` (default `target/bench-models`).

mod bench_models;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::{Parser, ValueEnum};
use distill_serve::engine::{DecoderSession, ExecutionProvider, SessionOptions, SlotCache};
use distill_serve::export::{Form, Int8Format, Precision};
use distill_serve::tiny::ShapePreset;

/// The weights of a GPU-form export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Weights {
    /// FP16 weights.
    Fp16,
    /// INT8 weights, FP16 activations (`MatMulNBits`, 8 bits).
    Int8,
}

#[derive(clap::Parser)]
struct Options {
    #[arg(long, value_enum, default_value = "cuda")]
    provider: ExecutionProvider,
    #[arg(long, default_value_t = 0)]
    device_id: u32,
    #[arg(long, value_enum, default_value = "r1-distill-qwen-1.5b")]
    shape: ShapePreset,
    /// Weight forms, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "fp16,int8")]
    forms: Vec<Weights>,
    /// Batch sizes, comma-separated.
    #[arg(long = "batch", value_delimiter = ',', default_value = "1,2,4,8,16,32,64")]
    batches: Vec<usize>,
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    #[arg(long, default_value_t = 64)]
    decode_steps: usize,
    #[arg(long, default_value = "target/bench-models")]
    work_dir: PathBuf,
    /// `cargo bench` passes `--bench` to every bench target.
    #[arg(long, hide = true)]
    bench: bool,
}

/// Exports (or reuses) the student of `o.shape` in the GPU form with `weights`.
fn model(o: &Options, weights: Weights) -> Result<PathBuf> {
    let (precision, label) = match weights {
        Weights::Fp16 => (Precision::Fp32, "fp16"),
        Weights::Int8 => (Precision::Int8(Int8Format::MatMulNBits), "int8"),
    };
    bench_models::bench_model(&o.work_dir, ("gpu", label), o.shape, precision, Form::GPU)
}

/// One batch: the prefill's time and the decode steps' time.
fn run(session: &mut DecoderSession, batch: usize, o: &Options) -> Result<(Duration, Duration)> {
    let vocab = session.vocab_size();
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|b| (0..o.prompt_len).map(|i| ((b * 31 + i * 7) % vocab) as u32).collect())
        .collect();
    let rows: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let started = Instant::now();
    let (_, prefill) = session.prefill_rows(&rows)?;
    let prefill_time = started.elapsed();
    let mut slots = SlotCache::new(session, batch, o.prompt_len + o.decode_steps + 1)?;
    for b in 0..batch {
        slots.write(b, &prefill, b)?;
    }
    let tokens = vec![42i64; batch];
    let started = Instant::now();
    for _ in 0..o.decode_steps {
        slots.step(session, &tokens)?;
    }
    Ok((prefill_time, started.elapsed()))
}

fn main() -> Result<()> {
    let o = Options::parse();
    let options = SessionOptions {
        execution_provider: o.provider,
        device_id: o.device_id,
        ..Default::default()
    };
    println!(
        "\n### gpu: {:?} student, GPU form, provider {:?}, prompts of {} tokens, {} decode steps\n",
        o.shape, o.provider, o.prompt_len, o.decode_steps
    );
    println!("| weights | batch | prefill ms | decode tok/s | requests/s |");
    println!("|---|---|---|---|---|");
    let mut notes = Vec::new();
    for &weights in &o.forms {
        let path = model(&o, weights)?;
        let started = Instant::now();
        let mut session = DecoderSession::open(&path, options)?;
        let open = started.elapsed();
        let first = o.batches.first().copied().unwrap_or(1);
        let (first_prefill, _) = run(&mut session, first, &o)?;
        notes.push(format!(
            "{weights:?}: session opened in {:.2} s; first prefill (batch {first}) {:.2} s",
            open.as_secs_f64(),
            first_prefill.as_secs_f64()
        ));
        for &batch in &o.batches {
            let (prefill, decode) = run(&mut session, batch, &o)?;
            let tokens_per_s = (batch * o.decode_steps) as f64 / decode.as_secs_f64();
            let requests_per_s = batch as f64 / (prefill + decode).as_secs_f64();
            println!(
                "| {weights:?} | {batch} | {:.1} | {tokens_per_s:.0} | {requests_per_s:.2} |",
                prefill.as_secs_f64() * 1e3
            );
        }
    }
    println!();
    for note in notes {
        println!("- {note}");
    }
    Ok(())
}

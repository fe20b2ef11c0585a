//! The native decoder engine (`src/engine/cuda/`) on a GPU: decode tokens/s per batch size for
//! INT8 and FP16 weights, against the card's memory bandwidth (a decode step reads every weight
//! once: weight bytes x steps/s over the bandwidth is the share of the roofline reached), and
//! the time to first token of a `--prompt-len` prompt. On a GPU each batch runs with its decode
//! steps replayed as CUDA graphs and then eagerly, so their ratio comes from one run. The
//! student is the random qwen2 of `--shape` (default the 1.5B dimensions), written once under
//! `--work-dir`. A decode step here copies its logits to the host (as `NativeDecoder::step`).
//!
//! ```sh
//! cargo bench --bench native_engine                               # on a GPU machine
//! cargo bench --bench native_engine -- --backend cpu --shape tiny --batch 1,4   # no GPU: smoke
//! ```
//! Flags: `--backend cuda|cpu` (cpu: the kernels' CPU reference), `--shape S`, `--formats
//! int8,fp16` (bf16 too), `--batch 1,8,32,64`, `--decode-steps 32`, `--prompt-len 512`, `--bandwidth-gbs G`
//! (default: the card's datasheet figure when the bench knows its name), `--work-dir DIR`.

// Only the checkpoint helper is used here, not the ONNX exports.
#[allow(dead_code)]
mod bench_models;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::{Parser, ValueEnum};
use distill_serve::engine::cuda::reference::CpuBackend;
use distill_serve::engine::cuda::{Backend, NativeDecoder, StepRows, WeightFormat, memory_needed};
use distill_serve::tiny::ShapePreset;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BackendChoice {
    Cuda,
    Cpu,
}

#[derive(Parser)]
struct Options {
    #[arg(long, value_enum, default_value = "cuda")]
    backend: BackendChoice,
    #[arg(long, value_enum, default_value = "r1-distill-qwen-1.5b")]
    shape: ShapePreset,
    #[arg(long, value_enum, value_delimiter = ',', default_value = "int8,fp16")]
    formats: Vec<WeightFormat>,
    #[arg(long = "batch", value_delimiter = ',', default_value = "1,8,32,64")]
    batches: Vec<usize>,
    #[arg(long, default_value_t = 32)]
    decode_steps: usize,
    #[arg(long, default_value_t = 512)]
    prompt_len: usize,
    /// Memory bandwidth of the card in GB/s (the roofline's yardstick).
    #[arg(long)]
    bandwidth_gbs: Option<f64>,
    #[arg(long, default_value = "target/bench-models")]
    work_dir: PathBuf,
    /// `cargo bench` passes `--bench` to every bench target.
    #[arg(long, hide = true)]
    bench: bool,
}

/// Datasheet memory bandwidth (GB/s) of the cards this project meets.
fn datasheet_bandwidth(name: &str) -> Option<f64> {
    [
        ("H200", 4_800.0),
        ("H100", 3_350.0),
        ("A100", 2_039.0),
        ("L4", 300.0),
        ("T4", 320.0),
        ("A10", 600.0),
    ]
    .iter()
    .find(|(card, _)| name.contains(card))
    .map(|&(_, gbs)| gbs)
}

/// Time to first token of one prompt, then `steps` decode steps of `batch` rows; (ttft s, tok/s).
fn run<B: Backend>(engine: &mut NativeDecoder<B>, o: &Options, batch: usize) -> Result<(f64, f64)> {
    let vocab = engine.config().vocab_size as u32;
    let prompt: Vec<u32> = (0..o.prompt_len as u32).map(|i| (i * 7919) % vocab).collect();
    let rows = StepRows {
        tokens: prompt.clone(),
        slots: vec![0; prompt.len()],
        positions: (0..prompt.len() as u32).collect(),
    };
    let started = Instant::now();
    engine.step(&rows, &[prompt.len() as u32 - 1])?;
    let ttft = started.elapsed().as_secs_f64();
    // Every slot continues from the same 512 positions (slot 0's cache is what they attend to
    // for slot 0; the others attend to zeros: the work per step is the same).
    let all: Vec<u32> = (0..batch as u32).collect();
    let started = Instant::now();
    for step in 0..o.decode_steps {
        let rows = StepRows {
            tokens: vec![42; batch],
            slots: all.clone(),
            positions: vec![(o.prompt_len + step) as u32; batch],
        };
        engine.step(&rows, &all)?;
    }
    let tokens_per_s = (batch * o.decode_steps) as f64 / started.elapsed().as_secs_f64();
    Ok((ttft, tokens_per_s))
}

/// Runs the table on backends from `make`, each batch once per entry of `graphs` (whether decode
/// steps replay as CUDA graphs).
fn bench<B: Backend>(o: &Options, make: impl Fn() -> Result<B>, bandwidth: Option<f64>, graphs: &[bool]) -> Result<()> {
    let ckpt = bench_models::bench_checkpoint(&o.work_dir, "native", o.shape)?;
    let slots = o.batches.iter().copied().max().unwrap_or(1);
    let capacity = o.prompt_len + o.decode_steps + 1;
    println!(
        "| weights | batch | CUDA graphs | TTFT ({} tokens) ms | decode tok/s | weight GB/s | of bandwidth |",
        o.prompt_len
    );
    println!("|---|---|---|---|---|---|---|");
    for &format in &o.formats {
        let started = Instant::now();
        let mut engine = NativeDecoder::load(&ckpt, make()?, format, slots, capacity)?;
        let loaded = started.elapsed().as_secs_f64();
        let c = engine.config().clone();
        let cache_bytes = memory_needed(&c, format, slots, capacity) - memory_needed(&c, format, 0, 0);
        // Bytes a decode step reads: every weight but the embedding table (one row a token).
        let weights = memory_needed(&c, format, 0, 0) - c.vocab_size * c.hidden_size * 2;
        for &batch in &o.batches {
            for &on in graphs {
                engine.set_graphs(on);
                let (ttft, tokens_per_s) = run(&mut engine, o, batch)?;
                let gbs = weights as f64 * tokens_per_s / batch as f64 / 1e9;
                let share = bandwidth.map_or("not known".into(), |b| format!("{:.0}%", 100.0 * gbs / b));
                let on = if on { "on" } else { "off" };
                println!(
                    "| {format:?} | {batch} | {on} | {:.1} | {tokens_per_s:.0} | {gbs:.1} | {share} |",
                    ttft * 1e3
                );
            }
        }
        println!(
            "\n{format:?}: loaded in {loaded:.1} s; weights {:.0} MiB, KV cache {:.0} MiB\n",
            weights as f64 / (1 << 20) as f64,
            cache_bytes as f64 / (1 << 20) as f64
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    let o = Options::parse();
    println!(
        "\n### native_engine: {:?} random qwen2, backend {:?}, {} decode steps after a {}-token prompt\n",
        o.shape, o.backend, o.decode_steps, o.prompt_len
    );
    match o.backend {
        // The CPU backend has no graphs.
        BackendChoice::Cpu => bench(&o, || Ok(CpuBackend), None, &[false]),
        BackendChoice::Cuda => cuda(&o),
    }
}

fn cuda(o: &Options) -> Result<()> {
    use distill_serve::engine::cuda::device::CudaBackend;
    use distill_serve::kernels::device::CudaDevice;
    let probe = match CudaDevice::open(0) {
        Ok(device) => device,
        Err(e) => {
            println!("Not measured: {e}.");
            return Ok(());
        }
    };
    let name = probe.name().to_string();
    let bandwidth = o.bandwidth_gbs.or_else(|| datasheet_bandwidth(&name));
    println!(
        "GPU: {name}; bandwidth {}\n",
        bandwidth.map_or("not known".into(), |b| format!("{b:.0} GB/s"))
    );
    drop(probe);
    bench(
        o,
        || Ok(CudaBackend::new(CudaDevice::open(0)?, None)?),
        bandwidth,
        &[true, false],
    )
}

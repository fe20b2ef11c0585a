//! Masked sampling of a decode step on the GPU against what the server does with a GPU
//! provider today: copy the step's logits to the host, mask each constrained row there and
//! sample with `generate::Sampler`. Rows: half with a terminology mask (a bitset with
//! `--allowed` tokens), a mix of greedy, temperature, top-k and top-p. Both paths time whole
//! steps, results on the host; the host path is measured on any machine, the device path where
//! a GPU is (otherwise the bench says why it was not measured).
//!
//! ```sh
//! cargo bench --bench device_sampling                      # batch 32 x 151,936, 50 steps
//! cargo bench --bench device_sampling -- --rows 64 --steps 20
//! ```

use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;
use distill_serve::generate::{Sampler, SamplingParams};
use distill_serve::kernels::device::CudaDevice;
use distill_serve::kernels::sampling::{DeviceSampler, RowSampling, bitset};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Parser)]
struct Options {
    #[arg(long, default_value_t = 32)]
    rows: usize,
    #[arg(long, default_value_t = 151_936)]
    vocab: usize,
    #[arg(long, default_value_t = 50)]
    steps: u64,
    /// Tokens a masked row allows (a start-of-answer mask of a code list allows thousands).
    #[arg(long, default_value_t = 2_000)]
    allowed: usize,
    /// Alternatives reported a row (`top_logprobs`).
    #[arg(long, default_value_t = 0)]
    top_n: usize,
    /// `cargo bench` passes `--bench` to every bench target.
    #[arg(long, hide = true)]
    bench: bool,
}

fn row_params(rows: usize, step: u64) -> Vec<RowSampling> {
    (0..rows)
        .map(|r| RowSampling {
            temperature: [0.0, 0.7, 1.0, 1.0][r % 4],
            top_k: if r % 4 == 2 { 40 } else { 0 },
            top_p: if r % 4 == 3 { 0.9 } else { 1.0 },
            seed: r as u64,
            step,
        })
        .collect()
}

/// The host path of one step: masks applied by setting forbidden logits to -inf, then the
/// CPU sampler per row.
fn host_step(logits: &mut [f32], vocab: usize, masks: &[Option<Vec<u32>>], samplers: &mut [Sampler], top_n: usize) {
    for (r, row) in logits.chunks_mut(vocab).enumerate() {
        if let Some(mask) = &masks[r] {
            for (t, l) in row.iter_mut().enumerate() {
                if (mask[t / 32] >> (t % 32)) & 1 == 0 {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        std::hint::black_box(samplers[r].choose(row, top_n));
    }
}

fn per_step(total: Duration, steps: u64) -> f64 {
    total.as_secs_f64() * 1e3 / steps as f64
}

fn main() -> Result<()> {
    let o = Options::parse();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let logits: Vec<f32> = (0..o.rows * o.vocab).map(|_| rng.random_range(-8.0f32..8.0)).collect();
    let masks: Vec<Option<Vec<u32>>> = (0..o.rows)
        .map(|r| (r % 2 == 1).then(|| bitset(o.vocab, (0..o.allowed).map(|_| rng.random_range(0..o.vocab as u32)))))
        .collect();
    println!(
        "\n### device_sampling: {} rows x {} logits ({:.1} MB a step), half masked ({} allowed), top_n {}, {} steps\n",
        o.rows,
        o.vocab,
        (o.rows * o.vocab * 4) as f64 / 1e6,
        o.allowed,
        o.top_n,
        o.steps
    );
    println!("| path | ms per step | vs host |");
    println!("|---|---|---|");

    let mut samplers: Vec<Sampler> = row_params(o.rows, 0)
        .iter()
        .map(|p| {
            Sampler::new(SamplingParams {
                temperature: p.temperature,
                top_k: p.top_k as usize,
                top_p: p.top_p,
                seed: Some(p.seed),
            })
        })
        .collect();
    let mut scratch = logits.clone();
    let started = Instant::now();
    for _ in 0..o.steps {
        scratch.copy_from_slice(&logits);
        host_step(&mut scratch, o.vocab, &masks, &mut samplers, o.top_n);
    }
    let host = per_step(started.elapsed(), o.steps);
    println!("| host: mask + sample (logits already on the host) | {host:.2} | 1.00x |");

    let device = match CudaDevice::open(0) {
        Ok(device) => device,
        Err(e) => {
            println!("\nDevice path not measured: {e}.");
            return Ok(());
        }
    };
    let sampler = DeviceSampler::new(&device, None)?;
    let stream = sampler.stream().clone();
    let device_logits = stream.clone_htod(&logits)?;
    let device_masks: Vec<_> = masks
        .iter()
        .map(|m| m.as_ref().map(|m| sampler.upload_mask(m)).transpose())
        .collect::<Result<_, _>>()?;
    let mask_refs: Vec<_> = device_masks.iter().map(Option::as_ref).collect();
    sampler.sample(&device_logits, o.vocab, &mask_refs, &row_params(o.rows, 0), o.top_n)?;

    let mut host_copy = vec![0f32; logits.len()];
    let started = Instant::now();
    for _ in 0..o.steps {
        stream.memcpy_dtoh(&device_logits, &mut host_copy)?;
        stream.synchronize()?;
        host_step(&mut host_copy, o.vocab, &masks, &mut samplers, o.top_n);
    }
    let copy_and_host = per_step(started.elapsed(), o.steps);
    let started = Instant::now();
    for step in 0..o.steps {
        std::hint::black_box(sampler.sample(
            &device_logits,
            o.vocab,
            &mask_refs,
            &row_params(o.rows, step),
            o.top_n,
        )?);
    }
    let on_device = per_step(started.elapsed(), o.steps);
    println!(
        "| copy to host + mask + sample | {copy_and_host:.2} | {:.2}x |",
        copy_and_host / host
    );
    println!(
        "| device: sample_rows, ids back | {on_device:.3} | {:.3}x |",
        on_device / host
    );
    println!(
        "\nGPU: {} (compute capability {:?}); device / copy-and-host: {:.3}x",
        device.name(),
        device.compute_capability(),
        on_device / copy_and_host
    );
    Ok(())
}

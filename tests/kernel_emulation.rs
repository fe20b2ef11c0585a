//! The CUDA kernels and the host code that drives them, where no GPU is: this binary loads the
//! emulated driver of `tests/emulate/` (a `libcuda.so` whose device memory is the host's and
//! whose kernels are `kernels/*.cu` compiled for the CPU against a small CUDA shim) before
//! anything touches CUDA, so `CudaDevice`, `CudaBackend` and `DeviceSampler` run unchanged through
//! cudarc, with the PTX NVRTC compiles for them. Each decoder operation of the CUDA backend must
//! compute what the CPU backend computes, and the GPU checks of `tests/gpu_checks/` run here in
//! full: the kernels' logic and our launches are checked (their speed, and the CUDA compiler's
//! code, only on a GPU).
#![cfg(feature = "cuda-native")]

mod common;
mod gpu_checks;

use distill_serve::engine::cuda::device::CudaBackend;
use distill_serve::engine::cuda::reference::CpuBackend;
use distill_serve::engine::cuda::{Backend, CacheShape, HostWeight, StepRows, WeightFormat};
use distill_serve::kernels::device::CudaDevice;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A mid-shape step costs about a second on the emulated GPU: 8 greedy steps there (32 on a
/// real one; the tiny shapes take 32 here too).
const MID_STEPS: usize = 8;

/// The emulated GPU.
fn gpu() -> Option<CudaDevice> {
    common::fake_gpu::install();
    let device = CudaDevice::open(0).expect("the emulated GPU");
    println!("GPU: {}", device.name());
    Some(device)
}

fn random(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// Runs every operation of a decoder step on `backend` over the same seeded inputs; each
/// operation's name and result on the host.
fn every_operation<B: Backend>(backend: &B) -> Vec<(String, Vec<f32>)> {
    let mut rng = ChaCha8Rng::seed_from_u64(22);
    let mut results = Vec::new();
    let mut keep = |name: &str, tensor: &B::Tensor| results.push((name.to_string(), backend.to_host(tensor).unwrap()));

    let (vocab, hidden) = (50, 40);
    let table = backend.table(&random(&mut rng, vocab * hidden), hidden).unwrap();
    keep("embed", &backend.embed(&table, &[3, 49, 0, 3]).unwrap());

    let x = backend.tensor(&random(&mut rng, 3 * hidden), hidden).unwrap();
    let weight = backend.tensor(&random(&mut rng, hidden), hidden).unwrap();
    keep("rms_norm", &backend.rms_norm(&x, &weight, 1e-6).unwrap());

    // 10 rows (two groups of eight), 19 outputs (not a multiple of the eight a block takes).
    let (rows, inputs, outputs) = (10, 70, 19);
    let x = backend.tensor(&random(&mut rng, rows * inputs), inputs).unwrap();
    let w = random(&mut rng, outputs * inputs);
    let bias = random(&mut rng, outputs);
    for format in [WeightFormat::Int8, WeightFormat::Fp16, WeightFormat::Bf16] {
        for with_bias in [false, true] {
            let host = HostWeight::new(&w, outputs, inputs, format);
            let layer = backend
                .linear_weight(host, with_bias.then_some(&bias[..]), outputs, inputs)
                .unwrap();
            keep(
                &format!("linear {format:?} bias {with_bias}"),
                &backend.linear(&x, &layer).unwrap(),
            );
        }
    }

    let (heads, kv_heads, dim) = (4usize, 2usize, 8usize);
    let inv_freq: Vec<f32> = (0..dim / 2)
        .map(|i| 1.0 / 10_000f32.powf(2.0 * i as f32 / dim as f32))
        .collect();
    let inv_freq = backend.tensor(&inv_freq, dim / 2).unwrap();
    let step = StepRows {
        tokens: vec![0; 9],
        slots: vec![0, 0, 0, 0, 0, 1, 1, 1, 1],
        positions: vec![0, 1, 2, 3, 4, 0, 1, 2, 3],
    };
    let step_rows = backend.rows(&step).unwrap();
    let mut q = backend
        .tensor(&random(&mut rng, step.len() * heads * dim), heads * dim)
        .unwrap();
    backend.rope(&mut q, &step_rows, &inv_freq, heads, dim).unwrap();
    keep("rope", &q);
    let shape = CacheShape {
        slots: 2,
        kv_heads,
        capacity: 16,
        head_dim: dim,
    };
    let mut cache = backend.cache(shape).unwrap();
    let k = backend
        .tensor(&random(&mut rng, step.len() * kv_heads * dim), kv_heads * dim)
        .unwrap();
    let v = backend
        .tensor(&random(&mut rng, step.len() * kv_heads * dim), kv_heads * dim)
        .unwrap();
    backend.kv_append(&mut cache, &k, &v, &step_rows).unwrap();
    keep("attention", &backend.attention(&q, &cache, &step_rows, heads).unwrap());

    let gate = backend.tensor(&random(&mut rng, 300), 30).unwrap();
    let up = backend.tensor(&random(&mut rng, 300), 30).unwrap();
    keep("silu_mul", &backend.silu_mul(&gate, &up).unwrap());
    keep("gather", &backend.gather(&gate, &[9, 0, 4]).unwrap());
    let mut sum = backend.tensor(&backend.to_host(&gate).unwrap(), 30).unwrap();
    backend.add(&mut sum, &up).unwrap();
    keep("add", &sum);
    results
}

#[test]
fn each_cuda_backend_operation_computes_what_the_cpu_backend_computes() {
    let device = gpu().unwrap();
    let got = every_operation(&CudaBackend::new(device, None).unwrap());
    let want = every_operation(&CpuBackend);
    assert_eq!(got.len(), want.len());
    for ((name, got), (_, want)) in got.iter().zip(&want) {
        assert_eq!(got.len(), want.len(), "{name}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= 1e-5 + 1e-5 * w.abs(), "{name}[{i}]: {g} vs {w}");
        }
    }
}

/// The emulated driver is no softer than a GPU on the one mistake it can see: a pointer
/// argument outside every allocation fails the launch instead of touching host memory.
#[test]
fn a_launch_with_a_stray_pointer_fails_instead_of_running() {
    use cudarc::driver::{LaunchConfig, PushKernelArg};
    let device = gpu().unwrap();
    let module = device
        .load(distill_serve::kernels::source("decoder").unwrap(), None)
        .unwrap();
    let add = module.load_function("add_in_place").unwrap();
    let stream = device.stream();
    let y = stream.clone_htod(&[1.0f32; 4]).unwrap();
    let (stray, count) = (0x1000u64, 4u32);
    let mut args = stream.launch_builder(&add);
    args.arg(&stray).arg(&y).arg(&count);
    // SAFETY: the emulated driver checks pointer arguments before running anything.
    let launched = unsafe { args.launch(LaunchConfig::for_num_elems(4)) };
    assert!(launched.is_err(), "a stray pointer launched");
    let mut x = stream.clone_htod(&[2.0f32; 4]).unwrap();
    let mut args = stream.launch_builder(&add);
    args.arg(&mut x).arg(&y).arg(&count);
    // SAFETY: x and y hold the 4 values the kernel adds.
    unsafe { args.launch(LaunchConfig::for_num_elems(4)) }.unwrap();
    assert_eq!(stream.clone_dtoh(&x).unwrap(), vec![3.0; 4]);
}

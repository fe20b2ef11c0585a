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

use cudarc::driver::{CudaSlice, DevicePtr, DriverError};
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

/// Runs every operation of a decoder step on `backend` over the same seeded inputs, each
/// into an output buffer with room to spare; each operation's name and result on the host.
fn every_operation<B: Backend>(backend: &B) -> Vec<(String, Vec<f32>)> {
    let mut rng = ChaCha8Rng::seed_from_u64(22);
    let mut results = Vec::new();
    let mut keep = |name: &str, tensor: &B::Tensor, rows: usize| {
        results.push((name.to_string(), backend.to_host(tensor, rows).unwrap()))
    };
    let out = |width: usize| backend.zeros(12, width).unwrap();

    let (vocab, hidden) = (50, 40);
    let table = backend.table(&random(&mut rng, vocab * hidden), hidden).unwrap();
    let mut inputs = backend.step_inputs(12, 4).unwrap();
    let tokens = StepRows {
        tokens: vec![3, 49, 0, 3],
        slots: vec![0; 4],
        positions: vec![0; 4],
    };
    backend.write_rows(&tokens, &[], &mut inputs).unwrap();
    let mut embedded = out(hidden);
    backend.embed(&table, &inputs, &mut embedded).unwrap();
    keep("embed", &embedded, 4);

    let x = backend.tensor(&random(&mut rng, 3 * hidden), hidden).unwrap();
    let weight = backend.tensor(&random(&mut rng, hidden), hidden).unwrap();
    let mut normed = out(hidden);
    backend.rms_norm(&x, &weight, 1e-6, &mut normed).unwrap();
    keep("rms_norm", &normed, 3);

    // 10 rows (two groups of eight), 19 outputs (not a multiple of the eight a block takes).
    let (rows, inputs_width, outputs) = (10, 70, 19);
    let x = backend
        .tensor(&random(&mut rng, rows * inputs_width), inputs_width)
        .unwrap();
    let w = random(&mut rng, outputs * inputs_width);
    let bias = random(&mut rng, outputs);
    for format in [WeightFormat::Int8, WeightFormat::Fp16, WeightFormat::Bf16] {
        for with_bias in [false, true] {
            let host = HostWeight::new(&w, outputs, inputs_width, format);
            let layer = backend
                .linear_weight(host, with_bias.then_some(&bias[..]), outputs, inputs_width)
                .unwrap();
            let mut y = out(outputs);
            backend.linear(&x, &layer, &mut y).unwrap();
            keep(&format!("linear {format:?} bias {with_bias}"), &y, rows);
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
    backend.write_rows(&step, &[8, 0, 4], &mut inputs).unwrap();
    let mut q = backend
        .tensor(&random(&mut rng, step.len() * heads * dim), heads * dim)
        .unwrap();
    backend.rope(&mut q, &inputs, &inv_freq, heads, dim).unwrap();
    keep("rope", &q, step.len());
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
    backend.kv_append(&mut cache, &k, &v, &inputs).unwrap();
    let mut attended = out(heads * dim);
    backend.attention(&q, &cache, &inputs, heads, &mut attended).unwrap();
    keep("attention", &attended, step.len());
    let mut gathered = out(heads * dim);
    backend.gather(&attended, &inputs, &mut gathered).unwrap();
    keep("gather", &gathered, 3);

    let gate = backend.tensor(&random(&mut rng, 300), 30).unwrap();
    let up = backend.tensor(&random(&mut rng, 300), 30).unwrap();
    let mut mixed = out(30);
    backend.silu_mul(&gate, &up, &mut mixed).unwrap();
    keep("silu_mul", &mixed, 10);
    let mut sum = backend.tensor(&backend.to_host(&gate, 10).unwrap(), 30).unwrap();
    backend.add(&mut sum, &up).unwrap();
    keep("add", &sum, 10);
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

/// The `add_in_place` kernel (`x += y` over `count` values) on `device`.
fn add_in_place(device: &CudaDevice) -> cudarc::driver::CudaFunction {
    let module = device
        .load(distill_serve::kernels::source("decoder").unwrap(), None)
        .unwrap();
    module.load_function("add_in_place").unwrap()
}

/// Launches `x += y` over 4 values, `x` given as a device address.
fn add_four(
    device: &CudaDevice,
    add: &cudarc::driver::CudaFunction,
    x: &u64,
    y: &CudaSlice<f32>,
) -> Result<(), DriverError> {
    use cudarc::driver::{LaunchConfig, PushKernelArg};
    let count = 4u32;
    let mut args = device.stream().launch_builder(add);
    args.arg(x).arg(y).arg(&count);
    // SAFETY: the emulated driver checks pointer arguments before running anything.
    unsafe { args.launch(LaunchConfig::for_num_elems(4)) }.map(|_| ())
}

/// The emulated driver is no softer than a GPU on the one mistake it can see: a pointer
/// argument outside every allocation fails the launch instead of touching host memory.
#[test]
fn a_launch_with_a_stray_pointer_fails_instead_of_running() {
    let device = gpu().unwrap();
    let add = add_in_place(&device);
    let stream = device.stream();
    let y = stream.clone_htod(&[1.0f32; 4]).unwrap();
    assert!(
        add_four(&device, &add, &0x1000, &y).is_err(),
        "a stray pointer launched"
    );
    let x = stream.clone_htod(&[2.0f32; 4]).unwrap();
    add_four(&device, &add, &x.device_ptr(stream).0, &y).unwrap();
    assert_eq!(stream.clone_dtoh(&x).unwrap(), vec![3.0; 4]);
}

/// While a stream captures a graph, the emulated driver refuses what CUDA's thread-local
/// capture mode refuses (here an allocation) and spoils the capture, so a step that allocated
/// or copied while being recorded fails here as on a GPU; the stream works again afterwards.
#[test]
fn a_capture_refuses_memory_calls_and_is_spoiled_by_them() {
    use cudarc::driver::sys::{CUgraphInstantiate_flags, CUresult, CUstreamCaptureMode};
    let device = gpu().unwrap();
    let stream = device.stream();
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    let refused = stream.alloc_zeros::<f32>(4).unwrap_err();
    assert_eq!(refused.0, CUresult::CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
    let ended = stream.end_capture(CUgraphInstantiate_flags(0)).err().unwrap();
    assert_eq!(ended.0, CUresult::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);
    assert_eq!(stream.clone_dtoh(&stream.clone_htod(&[5u32]).unwrap()).unwrap(), [5]);
}

/// A graph holds its launches' pointers: replaying it after one of its buffers was freed fails
/// (the emulated driver checks them again at each replay), which is why the native engine
/// records decode steps on a workspace allocated once.
#[test]
fn a_graph_replayed_after_its_buffer_was_freed_fails() {
    use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    let device = gpu().unwrap();
    let add = add_in_place(&device);
    let stream = device.stream();
    let x = stream.clone_htod(&[2.0f32; 4]).unwrap();
    let y = stream.clone_htod(&[1.0f32; 4]).unwrap();
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    add_four(&device, &add, &x.device_ptr(stream).0, &y).unwrap();
    let graph = stream.end_capture(CUgraphInstantiate_flags(0)).unwrap().unwrap();
    assert_eq!(stream.clone_dtoh(&x).unwrap(), vec![2.0; 4], "capturing ran the launch");
    graph.launch().unwrap();
    graph.launch().unwrap();
    assert_eq!(stream.clone_dtoh(&x).unwrap(), vec![4.0; 4]);
    drop(y);
    assert!(graph.launch().is_err(), "a graph ran on a freed buffer");
}

/// Once a decode step of a batch size has run, later ones allocate nothing on the device: the
/// step replays its graph on the workspace, a start-of-answer mask stays cached, and the
/// sampler reuses its parameter and result buffers (grown when a step has more rows). The
/// tokens are the CPU reference engine's, so the reused buffers hold each step's own values.
#[test]
fn steady_decode_steps_allocate_nothing_on_the_device() {
    use distill_serve::engine::ExecutionProvider;
    use distill_serve::engine::cuda::NativeEngine;
    use distill_serve::kernels::sampling::{RowPlan, RowSampling, bitset};
    gpu().unwrap();
    let st = common::student(distill_serve::checkpoint::Family::Qwen2, 4, |_| {});
    let open = |provider| NativeEngine::open(&st.checkpoint, provider, 0, WeightFormat::Int8, 2, 64).unwrap();
    let (mut gpu_engine, mut cpu_engine) = (open(ExecutionProvider::NativeCuda), open(ExecutionProvider::NativeCpu));
    let vocab = gpu_engine.config().vocab_size;
    let even = bitset(vocab, (0..vocab as u32).step_by(2));
    // Slot 0 greedy; slot 1 seeded top-p over even tokens, with 3 alternatives.
    let plan = |slot: u32, step: u64| RowPlan {
        allowed: (slot == 1).then(|| even.clone()),
        sampling: RowSampling {
            temperature: [0.0, 0.9][slot as usize],
            top_k: 0,
            top_p: [1.0, 0.8][slot as usize],
            seed: 11,
            step,
        },
        top_n: [0, 3][slot as usize],
    };
    let mut both = |rows: &StepRows, logits_of: &[u32]| {
        let plans: Vec<RowPlan> = logits_of
            .iter()
            .map(|&r| plan(rows.slots[r as usize], rows.positions[r as usize] as u64))
            .collect();
        let got = gpu_engine.step_and_sample(rows, logits_of, &plans).unwrap();
        let want = cpu_engine.step_and_sample(rows, logits_of, &plans).unwrap();
        let tokens: Vec<u32> = got.iter().map(|s| s.token.unwrap()).collect();
        assert_eq!(
            tokens,
            want.iter().map(|s| s.token.unwrap()).collect::<Vec<_>>(),
            "{rows:?}"
        );
        assert_eq!(got[got.len() - 1].top.len(), plans[plans.len() - 1].top_n);
        tokens
    };
    // Slot 0's prompt alone (one row sampled), then slot 1's beside slot 0's first decode row.
    let mut rows = StepRows::default();
    let last = rows.push_prompt(0, &st.encode(common::PROMPTS[0]));
    let mut next = vec![(both(&rows, &[last])[0], rows.positions[last as usize] + 1)];
    let mut rows = StepRows::default();
    let first = rows.push(next[0].0, 0, next[0].1);
    let last = rows.push_prompt(1, &st.encode(common::PROMPTS[1]));
    let tokens = both(&rows, &[first, last]);
    next = vec![
        (tokens[0], next[0].1 + 1),
        (tokens[1], rows.positions[last as usize] + 1),
    ];
    let mut allocations = Vec::new();
    for _ in 0..5 {
        let rows = StepRows {
            tokens: next.iter().map(|n| n.0).collect(),
            slots: vec![0, 1],
            positions: next.iter().map(|n| n.1).collect(),
        };
        let tokens = both(&rows, &[0, 1]);
        next = tokens.into_iter().zip(&next).map(|(t, n)| (t, n.1 + 1)).collect();
        allocations.push(common::fake_gpu::allocations_made());
    }
    assert!(
        allocations.iter().all(|&a| a == allocations[0]),
        "allocations after each decode step: {allocations:?}"
    );
    assert_eq!(gpu_engine.recorded_graphs(), 1);
}

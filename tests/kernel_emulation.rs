//! The CUDA kernels themselves, run on the CPU: `tests/emulate/` compiles `kernels/*.cu` with
//! g++ against a small CUDA shim (a thread per CUDA thread, barriers for `__syncthreads`, an
//! exchange for warp shuffles) and launches a kernel as the CUDA backend does. The sampling
//! kernel must pick exactly what its CPU reference picks, and each decoder kernel must compute
//! what the native engine's CPU backend computes: the kernels' logic is checked where no GPU is
//! (their speed, and the CUDA compiler's code, only on a GPU).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use distill_serve::engine::cuda::reference::{CpuBackend, HostTensor};
use distill_serve::engine::cuda::{Backend, CacheShape, HostWeight, StepRows, WeightFormat};
use distill_serve::kernels::reference::sample_rows;
use distill_serve::kernels::sampling::{RowSampling, TOP_N_MAX, bitset};
use half::f16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The harness, compiled once per test run.
fn harness() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/emulate");
        let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("kernel-harness-{}", std::process::id()));
        let out = Command::new("g++")
            .args(["-std=c++20", "-O2", "-pthread", "-Wall", "-Werror"])
            .arg(dir.join("harness.cpp"))
            .arg("-o")
            .arg(&exe)
            .output()
            .expect("g++ (the C++ compiler cc builds need)");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        exe
    })
}

/// A kernel argument: a buffer, a scalar (8 zero bytes: a null pointer), or a table of buffer
/// addresses (indices into the arguments; -1 for null).
enum Arg {
    Buf(Vec<u8>),
    Scalar(Vec<u8>),
    Ptrs(Vec<i64>),
}

fn f32s(v: &[f32]) -> Arg {
    Arg::Buf(v.iter().flat_map(|x| x.to_le_bytes()).collect())
}
fn u32s(v: &[u32]) -> Arg {
    Arg::Buf(v.iter().flat_map(|x| x.to_le_bytes()).collect())
}
fn u64s(v: &[u64]) -> Arg {
    Arg::Buf(v.iter().flat_map(|x| x.to_le_bytes()).collect())
}
fn halves(v: &[f32]) -> Arg {
    Arg::Buf(v.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect())
}
fn zeros(bytes: usize) -> Arg {
    Arg::Buf(vec![0; bytes])
}
fn u32_(v: u32) -> Arg {
    Arg::Scalar(v.to_le_bytes().to_vec())
}
fn f32_(v: f32) -> Arg {
    Arg::Scalar(v.to_le_bytes().to_vec())
}
fn null() -> Arg {
    Arg::Scalar(vec![0; 8])
}
fn read_f32(b: &[u8]) -> Vec<f32> {
    b.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}
fn read_u32(b: &[u8]) -> Vec<u32> {
    b.chunks(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect()
}

/// Launches `kernel` on a `grid` of blocks of `block` threads; every argument's bytes after.
fn launch(kernel: &str, grid: (usize, usize), block: u32, args: &[Arg]) -> Vec<Vec<u8>> {
    let dir = tempfile::tempdir().unwrap();
    let mut input = (args.len() as u32).to_le_bytes().to_vec();
    for arg in args {
        let (kind, bytes): (u8, Vec<u8>) = match arg {
            Arg::Buf(b) => (0, b.clone()),
            Arg::Scalar(b) => (1, b.clone()),
            Arg::Ptrs(p) => (2, p.iter().flat_map(|x| x.to_le_bytes()).collect()),
        };
        input.push(kind);
        input.extend((bytes.len() as u64).to_le_bytes());
        input.extend(bytes);
    }
    let (inp, out) = (dir.path().join("in"), dir.path().join("out"));
    std::fs::write(&inp, input).unwrap();
    let status = Command::new(harness())
        .args([kernel, &grid.0.to_string(), &grid.1.to_string(), &block.to_string()])
        .arg(&inp)
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "{kernel}: {status}");
    let bytes = std::fs::read(&out).unwrap();
    let mut results = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
        results.push(bytes[at + 8..at + 8 + len].to_vec());
        at += 8 + len;
    }
    results
}

#[test]
fn the_sampling_kernel_picks_what_its_reference_picks() {
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    for (rows, vocab) in [(12usize, 1000usize), (4, 37), (3, 5000), (4, 151_936)] {
        let logits: Vec<f32> = (0..rows * vocab).map(|_| rng.random_range(-5.0f32..5.0)).collect();
        // The last of twelve rows allows nothing.
        let masks: Vec<Option<Vec<u32>>> = (0..rows)
            .map(|r| match r % 4 {
                _ if rows == 12 && r == 11 => Some(bitset(vocab, [])),
                1 => Some(bitset(vocab, (0..vocab as u32).filter(|t| t % 3 == 1))),
                3 => Some(bitset(vocab, [0, 5, vocab as u32 - 1])),
                _ => None,
            })
            .collect();
        let params: Vec<RowSampling> = (0..rows)
            .map(|r| RowSampling {
                temperature: [0.0, 1.0, 0.6, 1.4][r % 4],
                top_k: [0, 10, 0, 3][(r / 2) % 4],
                top_p: [1.0, 0.8, 0.5][r % 3],
                seed: 77 + r as u64,
                step: 3 * r as u64,
            })
            .collect();
        let top_n = 5;
        let mut args = vec![
            f32s(&logits),
            u32_(vocab as u32),
            Arg::Ptrs(
                masks
                    .iter()
                    .enumerate()
                    .map(|(r, m)| if m.is_some() { 13 + r as i64 } else { -1 })
                    .collect(),
            ),
            f32s(&params.iter().map(|p| p.temperature).collect::<Vec<_>>()),
            u32s(&params.iter().map(|p| p.top_k).collect::<Vec<_>>()),
            f32s(&params.iter().map(|p| p.top_p).collect::<Vec<_>>()),
            u64s(&params.iter().map(|p| p.seed).collect::<Vec<_>>()),
            u64s(&params.iter().map(|p| p.step).collect::<Vec<_>>()),
            u32_(top_n as u32),
            zeros(rows * 4),
            zeros(rows * 4),
            zeros(rows * TOP_N_MAX * 4),
            zeros(rows * TOP_N_MAX * 4),
        ];
        args.extend(masks.iter().map(|m| u32s(m.as_deref().unwrap_or(&[]))));
        let out = launch("sample_rows", (rows, 1), 256, &args);
        let (tokens, logprobs) = (read_u32(&out[9]), read_f32(&out[10]));
        let (top_ids, top_logprobs) = (read_u32(&out[11]), read_f32(&out[12]));
        let host_masks: Vec<Option<&[u32]>> = masks.iter().map(|m| m.as_deref()).collect();
        let want = sample_rows(&logits, vocab, &host_masks, &params, top_n);
        for r in 0..rows {
            let token = (tokens[r] != u32::MAX).then_some(tokens[r]);
            assert_eq!(token, want[r].token, "vocab {vocab} row {r} {:?}", params[r]);
            if token.is_some() {
                assert!((logprobs[r] - want[r].logprob).abs() < 1e-5, "row {r}");
            }
            let ids: Vec<u32> = top_ids[r * TOP_N_MAX..][..top_n]
                .iter()
                .copied()
                .take_while(|&id| id != u32::MAX)
                .collect();
            assert_eq!(
                ids,
                want[r].top.iter().map(|t| t.0).collect::<Vec<_>>(),
                "vocab {vocab} row {r}"
            );
            for (m, &(_, lp)) in want[r].top.iter().enumerate() {
                assert!((top_logprobs[r * TOP_N_MAX + m] - lp).abs() < 1e-5, "row {r} top {m}");
            }
        }
        if rows == 12 {
            assert_eq!(want[11].token, None, "a row with nothing allowed");
        }
    }
}

fn random(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-5 + 1e-5 * w.abs(), "{what}[{i}]: {g} vs {w}");
    }
}

fn tensor(values: Vec<f32>, width: usize) -> HostTensor {
    HostTensor { values, width }
}

#[test]
fn the_decoder_kernels_compute_what_the_cpu_backend_computes() {
    let cpu = CpuBackend;
    let mut rng = ChaCha8Rng::seed_from_u64(22);

    let (vocab, hidden) = (50, 40);
    let table = random(&mut rng, vocab * hidden);
    let tokens = [3u32, 49, 0, 3];
    let out = launch(
        "embed",
        (tokens.len(), 1),
        256,
        &[
            halves(&table),
            u32s(&tokens),
            u32_(hidden as u32),
            zeros(tokens.len() * hidden * 4),
        ],
    );
    let want = cpu.embed(&cpu.table(&table, hidden).unwrap(), &tokens).unwrap();
    assert_close(&read_f32(&out[3]), &want.values, "embed");

    let x = random(&mut rng, 3 * hidden);
    let weight = random(&mut rng, hidden);
    let out = launch(
        "rms_norm",
        (3, 1),
        256,
        &[
            f32s(&x),
            f32s(&weight),
            f32_(1e-6),
            u32_(hidden as u32),
            zeros(x.len() * 4),
        ],
    );
    let want = cpu
        .rms_norm(&tensor(x.clone(), hidden), &tensor(weight, hidden), 1e-6)
        .unwrap();
    assert_close(&read_f32(&out[4]), &want.values, "rms_norm");

    // 10 rows (two groups of eight), 19 outputs (not a multiple of the eight a block takes).
    let (rows, inputs, outputs) = (10, 70, 19);
    let x = random(&mut rng, rows * inputs);
    let w = random(&mut rng, outputs * inputs);
    let bias = random(&mut rng, outputs);
    for format in [WeightFormat::Int8, WeightFormat::Fp16] {
        for with_bias in [false, true] {
            let host = HostWeight::new(&w, outputs, inputs, format);
            let bias_arg = if with_bias { f32s(&bias) } else { null() };
            let dims = [u32_(rows as u32), u32_(inputs as u32), u32_(outputs as u32)];
            let (kernel, mut args) = match &host {
                HostWeight::Int8 { values, scales } => {
                    let q: Vec<u8> = values.iter().map(|&v| v as u8).collect();
                    ("linear_i8", vec![f32s(&x), Arg::Buf(q), f32s(scales), bias_arg])
                }
                HostWeight::Fp16(values) => {
                    let bits: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                    ("linear_f16", vec![f32s(&x), Arg::Buf(bits), bias_arg])
                }
            };
            args.extend(dims);
            args.push(zeros(rows * outputs * 4));
            let last = args.len() - 1;
            let out = launch(kernel, (outputs.div_ceil(8), rows.div_ceil(8)), 256, &args);
            let layer = cpu
                .linear_weight(host.clone(), with_bias.then_some(&bias[..]), outputs, inputs)
                .unwrap();
            let want = cpu.linear(&tensor(x.clone(), inputs), &layer).unwrap();
            assert_close(
                &read_f32(&out[last]),
                &want.values,
                &format!("{kernel} bias {with_bias}"),
            );
        }
    }

    let (heads, kv_heads, dim) = (4usize, 2usize, 8usize);
    let inv_freq: Vec<f32> = (0..dim / 2)
        .map(|i| 1.0 / 10_000f32.powf(2.0 * i as f32 / dim as f32))
        .collect();
    let step = StepRows {
        tokens: vec![0; 9],
        slots: vec![0, 0, 0, 0, 0, 1, 1, 1, 1],
        positions: vec![0, 1, 2, 3, 4, 0, 1, 2, 3],
    };
    let q = random(&mut rng, step.len() * heads * dim);
    let out = launch(
        "rope",
        (step.len(), 1),
        256,
        &[
            f32s(&q),
            u32s(&step.positions),
            f32s(&inv_freq),
            u32_(heads as u32),
            u32_(dim as u32),
        ],
    );
    let mut want = tensor(q.clone(), heads * dim);
    cpu.rope(&mut want, &step, &tensor(inv_freq.clone(), inv_freq.len()), heads, dim)
        .unwrap();
    assert_close(&read_f32(&out[0]), &want.values, "rope");

    let shape = CacheShape {
        slots: 2,
        kv_heads,
        capacity: 16,
        head_dim: dim,
    };
    let k = random(&mut rng, step.len() * kv_heads * dim);
    let v = random(&mut rng, step.len() * kv_heads * dim);
    let cache_bytes = shape.len() * 2;
    let appended = launch(
        "kv_append",
        (step.len(), 1),
        256,
        &[
            f32s(&k),
            f32s(&v),
            u32s(&step.slots),
            u32s(&step.positions),
            u32_(kv_heads as u32),
            u32_(dim as u32),
            u32_(16),
            zeros(cache_bytes),
            zeros(cache_bytes),
        ],
    );
    let scale = 1.0 / (dim as f32).sqrt();
    let out = launch(
        "attention",
        (step.len(), heads),
        128,
        &[
            f32s(&q),
            Arg::Buf(appended[7].clone()),
            Arg::Buf(appended[8].clone()),
            u32s(&step.slots),
            u32s(&step.positions),
            u32_(heads as u32),
            u32_(kv_heads as u32),
            u32_(dim as u32),
            u32_(16),
            f32_(scale),
            zeros(q.len() * 4),
        ],
    );
    let mut cache = cpu.cache(shape).unwrap();
    cpu.kv_append(
        &mut cache,
        &tensor(k, kv_heads * dim),
        &tensor(v, kv_heads * dim),
        &step,
    )
    .unwrap();
    let want = cpu
        .attention(&tensor(q.clone(), heads * dim), &cache, &step, heads)
        .unwrap();
    assert_close(&read_f32(&out[10]), &want.values, "attention");

    let (gate, up) = (random(&mut rng, 300), random(&mut rng, 300));
    let out = launch(
        "silu_mul",
        (2, 1),
        256,
        &[f32s(&gate), f32s(&up), u32_(300), zeros(1200)],
    );
    let want = cpu
        .silu_mul(&tensor(gate.clone(), 30), &tensor(up.clone(), 30))
        .unwrap();
    assert_close(&read_f32(&out[3]), &want.values, "silu_mul");
    let out = launch("add_in_place", (2, 1), 256, &[f32s(&gate), f32s(&up), u32_(300)]);
    let mut want = tensor(gate.clone(), 30);
    cpu.add(&mut want, &tensor(up, 30)).unwrap();
    assert_close(&read_f32(&out[0]), &want.values, "add_in_place");
    let which = [9u32, 0, 4];
    let out = launch(
        "gather_rows",
        (which.len(), 1),
        256,
        &[f32s(&gate), u32s(&which), u32_(30), zeros(which.len() * 120)],
    );
    let want = cpu.gather(&tensor(gate, 30), &which).unwrap();
    assert_close(&read_f32(&out[3]), &want.values, "gather_rows");
}

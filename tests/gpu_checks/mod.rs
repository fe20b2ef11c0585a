//! The GPU checks of our kernels and the native engine, compiled into two test binaries: in
//! `tests/kernels.rs` against the real GPU (skipped, saying why, where none is) and in
//! `tests/kernel_emulation.rs` against the emulated one of `tests/emulate/`. Each binary
//! supplies `gpu()`, the device or None, and `MID_STEPS`, the greedy steps of the mid-shape
//! engine checks. The sampling kernel picks what its CPU reference picks and masks hold; the
//! CUDA backend's logits match the CPU backend's and ONNX Runtime's; logits stay on the device
//! for the sampler; a model too big for the device is an error at load.

use cudarc::driver::DevicePtr;
use distill_serve::checkpoint::Family;
use distill_serve::engine::cuda::device::CudaBackend;
use distill_serve::engine::cuda::reference::CpuBackend;
use distill_serve::engine::cuda::{NativeDecoder, NativeError, StepRows, WeightFormat};
use distill_serve::generate::argmax;
use distill_serve::kernels::reference;
use distill_serve::kernels::sampling::{DeviceSampler, RowSampling, TOP_N_MAX, bitset};
use distill_serve::reference::cosine;
use distill_serve::tiny::ShapePreset;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::common::native::{assert_matches_onnx_runtime, greedy_alone};
use super::common::{PROMPTS, student};
use super::gpu;

fn backend() -> Option<CudaBackend> {
    gpu().map(|device| CudaBackend::new(device, None).unwrap())
}

/// Random rows with a mix of sampling settings, half of them masked.
struct Case {
    logits: Vec<f32>,
    masks: Vec<Option<Vec<u32>>>,
    params: Vec<RowSampling>,
}

fn case(rng: &mut ChaCha8Rng, rows: usize, vocab: usize) -> Case {
    let logits = (0..rows * vocab).map(|_| rng.random_range(-6.0f32..6.0)).collect();
    let masks = (0..rows)
        .map(|r| match r % 4 {
            0 | 1 => None,
            2 => Some(bitset(
                vocab,
                (0..vocab as u32).filter(|_| rng.random_bool(0.01)).chain([7]),
            )),
            _ => Some(bitset(vocab, (0..vocab as u32).filter(|t| t % 3 == 0))),
        })
        .collect();
    let params = (0..rows)
        .map(|r| RowSampling {
            temperature: [0.0, 1.0, 0.7, 1.3][r % 4],
            top_k: [0, 0, 40, 0][(r / 4) % 4],
            top_p: [1.0, 0.9, 1.0, 0.5][(r / 8) % 4],
            seed: 1000 + r as u64,
            step: r as u64 * 3,
        })
        .collect();
    Case { logits, masks, params }
}

#[test]
fn device_sampling_matches_the_cpu_reference_token_for_token() {
    let Some(device) = gpu() else { return };
    let mut sampler = DeviceSampler::new(&device, None).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(15);
    for (rows, vocab) in [(32, 151_936), (9, 1_000), (4, 37)] {
        let c = case(&mut rng, rows, vocab);
        let logits = sampler.stream().clone_htod(&c.logits).unwrap();
        sampler
            .cache_mask(1, || bitset(vocab, (0..vocab as u32).filter(|t| t % 3 == 0)))
            .unwrap();
        let uploaded: Vec<_> = c
            .masks
            .iter()
            .map(|m| m.as_ref().map(|m| sampler.upload_mask(m).unwrap()))
            .collect();
        let device_masks: Vec<_> = c
            .masks
            .iter()
            .enumerate()
            .map(|(r, m)| match (r % 4, m) {
                (3, Some(_)) => sampler.cached_mask(1),
                _ => uploaded[r].as_ref(),
            })
            .collect();
        let host_masks: Vec<Option<&[u32]>> = c.masks.iter().map(|m| m.as_deref()).collect();
        let got = sampler.sample(&logits, vocab, &device_masks, &c.params, 5).unwrap();
        let want = reference::sample_rows(&c.logits, vocab, &host_masks, &c.params, 5);
        for r in 0..rows {
            assert_eq!(got[r].token, want[r].token, "vocab {vocab} row {r} {:?}", c.params[r]);
            assert!((got[r].logprob - want[r].logprob).abs() < 1e-3, "row {r}");
            let ids = |s: &distill_serve::kernels::sampling::Sampled| s.top.iter().map(|t| t.0).collect::<Vec<_>>();
            assert_eq!(ids(&got[r]), ids(&want[r]), "row {r}");
            for (m, (g, w)) in got[r].top.iter().zip(&want[r].top).enumerate() {
                assert!((g.1 - w.1).abs() < 1e-3, "row {r} top {m}: {} vs {}", g.1, w.1);
            }
            let token = got[r].token.unwrap() as usize;
            if let Some(mask) = &c.masks[r] {
                assert!(
                    (mask[token / 32] >> (token % 32)) & 1 == 1,
                    "row {r}: masked token {token}"
                );
            }
        }
        let again = sampler.sample(&logits, vocab, &device_masks, &c.params, 5).unwrap();
        assert_eq!(again, got, "a second run differs");
        // By device address, as a buffer another library owns (ONNX Runtime's) is sampled.
        let (address, _guard) = logits.device_ptr(sampler.stream());
        // SAFETY: `logits` holds its values on the sampler's stream and outlives the call.
        let by_address = unsafe { sampler.sample_at(address, logits.len(), vocab, &device_masks, &c.params, 5) };
        assert_eq!(by_address.unwrap(), got, "sampled by address");
        // SAFETY: as above; the length vouched for is short of the rows, which is refused.
        let short = unsafe { sampler.sample_at(address, rows * vocab - 1, vocab, &device_masks, &c.params, 5) };
        assert!(short.is_err(), "too few logits accepted");
    }
}

#[test]
fn device_masks_never_let_a_forbidden_token_through() {
    let Some(device) = gpu() else { return };
    let sampler = DeviceSampler::new(&device, None).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(16);
    let (rows, vocab) = (64, 151_936);
    let mut logits: Vec<f32> = (0..rows * vocab).map(|_| rng.random_range(-2.0f32..2.0)).collect();
    let allowed: Vec<Vec<u32>> = (0..rows)
        .map(|_| (0..6).map(|_| rng.random_range(0..vocab as u32)).collect())
        .collect();
    // Make the forbidden tokens the likeliest by far.
    for (r, row) in logits.chunks_mut(vocab).enumerate() {
        for (t, l) in row.iter_mut().enumerate() {
            if !allowed[r].contains(&(t as u32)) && t % 97 == 0 {
                *l = 40.0;
            }
        }
    }
    let masks: Vec<_> = allowed
        .iter()
        .map(|a| sampler.upload_mask(&bitset(vocab, a.iter().copied())).unwrap())
        .collect();
    let empty = sampler.upload_mask(&bitset(vocab, [])).unwrap();
    let device_logits = sampler.stream().clone_htod(&logits).unwrap();
    for step in 0..8 {
        let params: Vec<RowSampling> = (0..rows)
            .map(|r| RowSampling {
                temperature: if r % 2 == 0 { 0.0 } else { 2.0 },
                top_k: 0,
                top_p: 1.0,
                seed: r as u64,
                step,
            })
            .collect();
        let mut row_masks: Vec<_> = masks.iter().map(Some).collect();
        row_masks[rows - 1] = Some(&empty);
        let got = sampler
            .sample(&device_logits, vocab, &row_masks, &params, TOP_N_MAX)
            .unwrap();
        for r in 0..rows - 1 {
            let token = got[r].token.unwrap();
            assert!(allowed[r].contains(&token), "row {r} step {step}: {token}");
            assert!(got[r].top.iter().all(|(id, _)| allowed[r].contains(id)));
        }
        assert_eq!(got[rows - 1].token, None);
    }
}

/// Greedy steps of the engine checks: 32 (the issue's), or the including binary's
/// `MID_STEPS` for the mid shape.
fn steps(shape: ShapePreset) -> usize {
    match shape {
        ShapePreset::Mid => super::MID_STEPS,
        _ => 32,
    }
}

/// The GPU's logits against the CPU reference's (cosine >= 0.9999 at every position) and
/// the same greedy tokens, FP16, BF16 and INT8, tiny and mid.
#[test]
fn the_cuda_backend_matches_the_cpu_reference() {
    let Some(_) = backend() else { return };
    for (shape, family) in [
        (ShapePreset::Tiny, Family::Qwen2),
        (ShapePreset::Tiny, Family::Llama),
        (ShapePreset::Mid, Family::Qwen2),
    ] {
        let st = student(family, 9, |s| s.shape = shape);
        // A shorter prompt for mid, whose CPU reference runs unoptimised in the test build.
        let prompt = st.encode(PROMPTS[if shape == ShapePreset::Mid { 1 } else { 2 }]);
        for format in [WeightFormat::Fp16, WeightFormat::Bf16, WeightFormat::Int8] {
            let mut cpu = NativeDecoder::load(&st.checkpoint, CpuBackend, format, 1, 128).unwrap();
            let mut gpu = NativeDecoder::load(&st.checkpoint, backend().unwrap(), format, 1, 128).unwrap();
            let (want_tokens, want) = greedy_alone(&mut cpu, &prompt, steps(shape));
            let (got_tokens, got) = greedy_alone(&mut gpu, &prompt, steps(shape));
            for (step, (g, w)) in got.iter().zip(&want).enumerate() {
                let similarity = cosine(g, w);
                assert!(
                    similarity >= 0.9999,
                    "{shape:?} {family:?} {format:?} step {step}: cosine {similarity}"
                );
            }
            assert_eq!(got_tokens, want_tokens, "{shape:?} {family:?} {format:?}");
        }
    }
}

/// The check against the ONNX Runtime CPU engine on the same checkpoint (see
/// `assert_matches_onnx_runtime`), tiny and mid.
#[test]
fn the_cuda_backend_matches_onnx_runtime_on_the_same_checkpoint() {
    let Some(_) = backend() else { return };
    for shape in [ShapePreset::Tiny, ShapePreset::Mid] {
        assert_matches_onnx_runtime(|| backend().unwrap(), shape, steps(shape));
    }
}

/// Logits stay on the GPU and the sampling kernel picks from them: greedy rows pick what
/// the CPU reference engine's argmax picks, sampled rows what the sampler's CPU reference
/// picks from the same logits.
#[test]
fn the_engine_samples_on_the_device() {
    use distill_serve::kernels::reference::sample_rows;
    use distill_serve::kernels::sampling::{DeviceSampler, RowSampling};
    let Some(backend) = backend() else { return };
    let sampler = DeviceSampler::new(backend.device(), None).unwrap();
    let st = student(Family::Qwen2, 4, |_| {});
    let prompts: Vec<Vec<u32>> = PROMPTS.iter().map(|p| st.encode(p)).collect();
    let mut gpu = NativeDecoder::load(&st.checkpoint, backend, WeightFormat::Int8, 3, 128).unwrap();
    let mut cpu = NativeDecoder::load(&st.checkpoint, CpuBackend, WeightFormat::Int8, 3, 128).unwrap();
    let mut rows = StepRows::default();
    let mut last = Vec::new();
    for (slot, prompt) in prompts.iter().enumerate() {
        last.push(rows.push_prompt(slot as u32, prompt));
    }
    let vocab = gpu.config().vocab_size;
    let logits = gpu.step_logits(&rows, &last).unwrap().unwrap();
    let host = sampler.stream().clone_dtoh(&logits.data().slice(..3 * vocab)).unwrap();
    let params: Vec<RowSampling> = (0..3)
        .map(|r| RowSampling {
            temperature: [0.0, 0.8, 1.2][r],
            top_k: [0, 20, 0][r],
            top_p: [1.0, 1.0, 0.9][r],
            seed: 5,
            step: 0,
        })
        .collect();
    let got = sampler
        .sample(logits.data(), vocab, &[None, None, None], &params, 3)
        .unwrap();
    let want = sample_rows(&host, vocab, &[None, None, None], &params, 3);
    assert_eq!(
        got.iter().map(|s| s.token).collect::<Vec<_>>(),
        want.iter().map(|s| s.token).collect::<Vec<_>>()
    );
    let cpu_logits = cpu.step(&rows, &last).unwrap();
    assert_eq!(got[0].token, Some(argmax(&cpu_logits[0])));
}

/// Decode steps replayed as CUDA graphs give bit for bit what the same steps give run
/// eagerly, while sequences leave and join: three rows, then two (slot 1 ends), then three
/// again with a new sequence in slot 1, so the three-row graph replays on new tokens and
/// positions. Each decode shape is recorded once; prefills run eagerly.
#[test]
fn decode_steps_replayed_as_cuda_graphs_equal_eager_steps() {
    let Some(recording) = backend() else { return };
    let st = student(Family::Qwen2, 4, |_| {});
    let mut graphs = NativeDecoder::load(&st.checkpoint, recording, WeightFormat::Int8, 3, 128).unwrap();
    let mut eager = NativeDecoder::load(&st.checkpoint, backend().unwrap(), WeightFormat::Int8, 3, 128).unwrap();
    eager.set_graphs(false);
    let mut both = |rows: &StepRows, logits_of: &[u32]| -> Vec<u32> {
        let got = graphs.step(rows, logits_of).unwrap();
        assert_eq!(got, eager.step(rows, logits_of).unwrap(), "{rows:?}");
        got.iter().map(|l| argmax(l)).collect()
    };
    // (token, position) to run next in each slot.
    let mut next: Vec<Option<(u32, u32)>> = vec![None; 3];
    let prefill = |slots: &[usize], prompts: &[&str], next: &mut Vec<Option<(u32, u32)>>| {
        let mut rows = StepRows::default();
        let mut last = Vec::new();
        for (&slot, prompt) in slots.iter().zip(prompts) {
            let prompt = st.encode(prompt);
            last.push(rows.push_prompt(slot as u32, &prompt));
            next[slot] = Some((0, prompt.len() as u32));
        }
        (rows, last)
    };
    let decode = |next: &[Option<(u32, u32)>]| {
        let live: Vec<usize> = (0..next.len()).filter(|&s| next[s].is_some()).collect();
        StepRows {
            tokens: live.iter().filter_map(|&s| next[s]).map(|n| n.0).collect(),
            slots: live.iter().map(|&s| s as u32).collect(),
            positions: live.iter().filter_map(|&s| next[s]).map(|n| n.1).collect(),
        }
    };
    // Takes each row's greedy token as its slot's next, one position on for decode rows.
    let advance = |next: &mut Vec<Option<(u32, u32)>>, rows: &StepRows, last: &[u32], tokens: Vec<u32>| {
        for (&row, token) in last.iter().zip(tokens) {
            let slot = rows.slots[row as usize] as usize;
            let position = rows.positions[row as usize] + 1;
            next[slot] = Some((token, position));
        }
    };
    for (slots, prompts, steps) in [(&[0, 1, 2][..], &PROMPTS[..], 4), (&[1], &["Code: I10"], 4)] {
        let (rows, last) = prefill(slots, prompts, &mut next);
        let tokens = both(&rows, &last);
        advance(&mut next, &rows, &last, tokens);
        for step in 0..2 * steps {
            if step == steps && slots.len() == 3 {
                next[1] = None; // slot 1 ends: two-row steps
            }
            let rows = decode(&next);
            let all: Vec<u32> = (0..rows.len() as u32).collect();
            let tokens = both(&rows, &all);
            advance(&mut next, &rows, &all, tokens);
        }
    }
    assert_eq!(graphs.recorded_graphs(), 2, "the 3-row and 2-row decode steps");
    assert_eq!(eager.recorded_graphs(), 0);
}

#[test]
fn a_model_too_big_for_the_gpu_is_an_error_at_load() {
    let Some(backend) = backend() else { return };
    let st = student(Family::Qwen2, 2, |_| {});
    match NativeDecoder::load(&st.checkpoint, backend, WeightFormat::Fp16, 1 << 20, 1 << 16) {
        Err(NativeError::OutOfMemory { .. }) => {}
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a 2^36-token cache fit"),
    }
}

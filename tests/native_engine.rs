//! The native decoder engine (`src/engine/cuda/`): its step, run on the CPU reference of the
//! kernels, against candle-transformers on the same checkpoint; continuous batching against
//! each sequence alone; bad steps and models as errors. Where a GPU is, the CUDA backend
//! against the CPU reference (skipped here, saying why).

mod common;

use common::{PROMPTS, student};
use distill_serve::checkpoint::Family;
use distill_serve::engine::cuda::reference::CpuBackend;
use distill_serve::engine::cuda::{Backend, NativeDecoder, NativeError, StepRows, WeightFormat};
use distill_serve::generate::argmax;
use distill_serve::reference::{ReferenceDecoder, cosine};

/// Runs `prompt` into `slot` from position 0 in one step; the logits of every position.
fn prompt_logits<B: Backend>(engine: &mut NativeDecoder<B>, slot: u32, prompt: &[u32]) -> Vec<Vec<f32>> {
    let rows = StepRows {
        tokens: prompt.to_vec(),
        slots: vec![slot; prompt.len()],
        positions: (0..prompt.len() as u32).collect(),
    };
    let all: Vec<u32> = (0..prompt.len() as u32).collect();
    engine.step(&rows, &all).unwrap()
}

/// Greedy continuation of `prompt` by `n` tokens in slot 0, one sequence alone; with the logits
/// each token was chosen from.
fn greedy_alone<B: Backend>(engine: &mut NativeDecoder<B>, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut logits = vec![prompt_logits(engine, 0, prompt).pop().unwrap()];
    let mut tokens = vec![argmax(&logits[0])];
    while tokens.len() < n {
        let position = (prompt.len() + tokens.len() - 1) as u32;
        let rows = StepRows {
            tokens: vec![*tokens.last().unwrap()],
            slots: vec![0],
            positions: vec![position],
        };
        let next = engine.step(&rows, &[0]).unwrap().remove(0);
        tokens.push(argmax(&next));
        logits.push(next);
    }
    (tokens, logits)
}

fn assert_matches_candle(family: Family, format: WeightFormat, min_cosine: f32) {
    let st = student(family, 7, |_| {});
    let mut reference = ReferenceDecoder::load(&st.checkpoint).unwrap();
    let mut engine = NativeDecoder::load(&st.checkpoint, CpuBackend, format, 3, 128).unwrap();
    for (slot, text) in PROMPTS.iter().enumerate() {
        let prompt = st.encode(text);
        let want = reference.logits(&prompt).unwrap();
        let got = prompt_logits(&mut engine, slot as u32, &prompt);
        for (position, (got, want)) in got.iter().zip(&want).enumerate() {
            let similarity = cosine(got, want);
            assert!(
                similarity >= min_cosine,
                "{family:?} {format:?} slot {slot} position {position}: cosine {similarity}"
            );
        }
    }
}

#[test]
fn fp16_qwen2_matches_candle() {
    assert_matches_candle(Family::Qwen2, WeightFormat::Fp16, 0.999);
}

#[test]
fn fp16_llama_matches_candle() {
    assert_matches_candle(Family::Llama, WeightFormat::Fp16, 0.999);
}

#[test]
fn int8_qwen2_and_llama_stay_close_to_candle() {
    assert_matches_candle(Family::Qwen2, WeightFormat::Int8, 0.99);
    assert_matches_candle(Family::Llama, WeightFormat::Int8, 0.99);
}

#[test]
fn untied_grouped_query_checkpoints_match_candle() {
    let st = student(Family::Qwen2, 3, |s| {
        s.tie_word_embeddings = Some(false);
        s.num_kv_heads = Some(1);
        s.rope_theta = 1_000_000.0;
    });
    let mut reference = ReferenceDecoder::load(&st.checkpoint).unwrap();
    let mut engine = NativeDecoder::load(&st.checkpoint, CpuBackend, WeightFormat::Fp16, 1, 64).unwrap();
    let prompt = st.encode(PROMPTS[0]);
    let (tokens, _) = greedy_alone(&mut engine, &prompt, 16);
    assert_eq!(tokens, reference.greedy(&prompt, 16).unwrap());
}

/// Four sequences through three slots: B joins while A decodes (its prompt rows in A's decode
/// step), C joins later, A ends and D takes its slot. Each gets exactly what it gets alone.
#[test]
fn continuous_batching_gives_each_sequence_its_output_alone() {
    let st = student(Family::Qwen2, 11, |_| {});
    let prompts: Vec<Vec<u32>> = [PROMPTS[0], PROMPTS[1], PROMPTS[2], "Code: I10"]
        .iter()
        .map(|p| st.encode(p))
        .collect();
    let steps = 10;
    let mut alone = NativeDecoder::load(&st.checkpoint, CpuBackend, WeightFormat::Int8, 1, 128).unwrap();
    let expected: Vec<_> = prompts.iter().map(|p| greedy_alone(&mut alone, p, steps)).collect();

    struct Running {
        seq: usize,
        slot: u32,
        tokens: Vec<u32>,
        logits: Vec<Vec<f32>>,
    }
    let mut engine = NativeDecoder::load(&st.checkpoint, CpuBackend, WeightFormat::Int8, 3, 128).unwrap();
    // (step, sequence, slot) of each join.
    let joins = [(0, 0, 0u32), (3, 1, 1), (5, 2, 2), (0, 3, 0)];
    let mut running: Vec<Running> = Vec::new();
    let mut done: Vec<Running> = Vec::new();
    let mut d_joined = false;
    for step in 0..40 {
        let mut rows = StepRows::default();
        let mut last_row = Vec::new();
        for r in &running {
            let position = prompts[r.seq].len() + r.tokens.len() - 1;
            rows.tokens.push(*r.tokens.last().unwrap());
            rows.slots.push(r.slot);
            rows.positions.push(position as u32);
            last_row.push(rows.len() as u32 - 1);
        }
        let a_done = done.iter().any(|r| r.seq == 0);
        for &(at, seq, slot) in &joins {
            let joins_now = if seq == 3 { a_done && !d_joined } else { at == step };
            if !joins_now {
                continue;
            }
            d_joined |= seq == 3;
            for (i, &t) in prompts[seq].iter().enumerate() {
                rows.tokens.push(t);
                rows.slots.push(slot);
                rows.positions.push(i as u32);
            }
            last_row.push(rows.len() as u32 - 1);
            running.push(Running {
                seq,
                slot,
                tokens: Vec::new(),
                logits: Vec::new(),
            });
        }
        if rows.is_empty() {
            break;
        }
        let logits = engine.step(&rows, &last_row).unwrap();
        for (r, l) in running.iter_mut().zip(logits) {
            r.tokens.push(argmax(&l));
            r.logits.push(l);
        }
        let (finished, still): (Vec<_>, Vec<_>) = running.into_iter().partition(|r| r.tokens.len() == steps);
        done.extend(finished);
        running = still;
    }
    assert_eq!(done.len(), 4, "every sequence finished");
    for r in &done {
        let (tokens, logits) = &expected[r.seq];
        assert_eq!(&r.tokens, tokens, "sequence {}", r.seq);
        assert_eq!(
            &r.logits, logits,
            "sequence {}: batched logits differ from alone",
            r.seq
        );
    }
}

#[test]
fn bad_steps_are_errors_before_any_kernel_runs() {
    let st = student(Family::Llama, 5, |_| {});
    let mut engine = NativeDecoder::load(&st.checkpoint, CpuBackend, WeightFormat::Int8, 2, 16).unwrap();
    let vocab = engine.config().vocab_size as u32;
    let cases = [
        (vec![1], vec![2], vec![0], "slot 2"),
        (vec![1], vec![0], vec![16], "position 16"),
        (vec![vocab], vec![0], vec![0], "token"),
    ];
    for (tokens, slots, positions, says) in cases {
        let rows = StepRows {
            tokens,
            slots,
            positions,
        };
        match engine.step(&rows, &[0]) {
            Err(NativeError::Shape(why)) => assert!(why.contains(says), "{why}"),
            other => panic!("expected a shape error naming {says}, got {other:?}"),
        }
    }
    let rows = StepRows {
        tokens: vec![1, 2],
        slots: vec![0],
        positions: vec![0, 1],
    };
    assert!(matches!(engine.step(&rows, &[0]), Err(NativeError::Shape(_))));
    let ok = StepRows {
        tokens: vec![1],
        slots: vec![0],
        positions: vec![0],
    };
    assert!(
        matches!(engine.step(&ok, &[1]), Err(NativeError::Shape(_))),
        "logits of a row the step lacks"
    );
    assert_eq!(engine.step(&ok, &[0]).unwrap().len(), 1);
}

#[test]
fn an_encoder_checkpoint_is_refused() {
    let st = student(Family::Bert, 1, |_| {});
    match NativeDecoder::load(&st.checkpoint, CpuBackend, WeightFormat::Int8, 1, 8) {
        Err(NativeError::Unsupported(why)) => assert!(why.contains("encoder"), "{why}"),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("an encoder loaded as a decoder"),
    }
}

#[cfg(feature = "cuda-native")]
mod gpu {
    use super::*;
    use distill_serve::engine::cuda::device::CudaBackend;
    use distill_serve::kernels::KernelError;
    use distill_serve::kernels::device::CudaDevice;

    fn backend() -> Option<CudaBackend> {
        match CudaDevice::open(0) {
            Ok(device) => {
                println!("GPU: {}", device.name());
                Some(CudaBackend::new(device, None).unwrap())
            }
            Err(e @ (KernelError::NoDriver | KernelError::NoDevice { .. })) => {
                println!("skipped: {e}");
                None
            }
            Err(e) => panic!("opening the GPU failed: {e}"),
        }
    }

    /// The GPU's logits against the CPU reference's (cosine >= 0.9999 at every position) and
    /// the same greedy tokens for 32 steps, FP16 and INT8, tiny and mid.
    #[test]
    fn the_cuda_backend_matches_the_cpu_reference() {
        let Some(_) = backend() else { return };
        for (shape, family) in [
            (distill_serve::tiny::ShapePreset::Tiny, Family::Qwen2),
            (distill_serve::tiny::ShapePreset::Tiny, Family::Llama),
            (distill_serve::tiny::ShapePreset::Mid, Family::Qwen2),
        ] {
            let st = student(family, 9, |s| s.shape = shape);
            let prompt = st.encode(PROMPTS[2]);
            for format in [WeightFormat::Fp16, WeightFormat::Int8] {
                let mut cpu = NativeDecoder::load(&st.checkpoint, CpuBackend, format, 1, 128).unwrap();
                let mut gpu = NativeDecoder::load(&st.checkpoint, backend().unwrap(), format, 1, 128).unwrap();
                let (want_tokens, want) = greedy_alone(&mut cpu, &prompt, 32);
                let (got_tokens, got) = greedy_alone(&mut gpu, &prompt, 32);
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
            for (i, &t) in prompt.iter().enumerate() {
                rows.tokens.push(t);
                rows.slots.push(slot as u32);
                rows.positions.push(i as u32);
            }
            last.push(rows.len() as u32 - 1);
        }
        let vocab = gpu.config().vocab_size;
        let logits = gpu.step_logits(&rows, &last).unwrap().unwrap();
        let host = gpu.backend().to_host(&logits).unwrap();
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
}
